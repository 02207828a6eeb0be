from lingua_mem.model.llama import Attention, Block, FeedForward, Transformer, build_model

__all__ = ["Attention", "Block", "FeedForward", "Transformer", "build_model"]
