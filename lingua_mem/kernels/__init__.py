from lingua_mem.kernels.embedding_bag import (
    KERNELS,
    embedding_bag,
    embedding_bag_torch,
    resolve_kernel,
    triton_available,
    triton_problem,
)
from lingua_mem.kernels.embedding_bag import SAVED_OPS as _EMBEDDING_BAG_OPS

# the ops of every kernel here whose outputs selective activation checkpointing keeps
# (a new kernel adds its own); the Triton ops exist once triton_bag is imported
SAVED_OPS = _EMBEDDING_BAG_OPS
if triton_available():
    from lingua_mem.kernels.triton_bag import SAVED_OPS as _TRITON_OPS

    SAVED_OPS = SAVED_OPS | _TRITON_OPS

__all__ = ["KERNELS", "SAVED_OPS", "embedding_bag", "embedding_bag_torch", "resolve_kernel",
           "triton_available", "triton_problem"]
