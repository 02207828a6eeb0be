from lingua_mem.kernels.embedding_bag import embedding_bag, embedding_bag_torch

__all__ = ["embedding_bag", "embedding_bag_torch"]
