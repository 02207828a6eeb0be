"""Parallelism, applied to a built model from outside (the model stays plain PyTorch)."""

from lingua_mem.parallel.mesh import Meshes, ParallelDims, distributed_session, init_distributed, resolve_dims
from lingua_mem.parallel.parallelize import parallelize

__all__ = ["Meshes", "ParallelDims", "distributed_session", "init_distributed", "parallelize", "resolve_dims"]
