from lingua_mem.memory.layer import ProductKeyMemory, ValueTable
from lingua_mem.memory.product_topk import product_topk

__all__ = ["ProductKeyMemory", "ValueTable", "product_topk"]
