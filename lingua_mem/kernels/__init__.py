from lingua_mem.kernels.embedding_bag import SAVED_OPS as _EMBEDDING_BAG_OPS
from lingua_mem.kernels.embedding_bag import embedding_bag, embedding_bag_torch

# the ops of every kernel here whose outputs selective activation checkpointing keeps
# (a new kernel adds its own)
SAVED_OPS = _EMBEDDING_BAG_OPS

__all__ = ["SAVED_OPS", "embedding_bag", "embedding_bag_torch"]
