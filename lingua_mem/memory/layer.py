"""Product-key memory layer (Memory+) and the value table it reads.

The layer does not own its values: the Transformer owns one ValueTable (or one
per memory layer) and passes it to the layer at call time, so a table shared by
several layers is one parameter with one name in the state dict.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingua_mem import kernels
from lingua_mem.kernels import embedding_bag
from lingua_mem.memory.product_topk import product_key_search
from lingua_mem.param_init import ParamInit

# ops of a memory layer whose outputs selective activation checkpointing keeps: the
# product-key search's top-k and the value kernels'
SAVED_OPS = frozenset({torch.ops.aten.topk.default}) | kernels.SAVED_OPS


class Bag:
    """One read of a value table: indices and weights, (N, M) each.

    A table call takes one Bag, not two tensors, on purpose: FSDP2 hooks a post-backward
    onto every call's tensor arguments that need gradients, so a table shared by k memory
    layers would be reduce-scattered and re-gathered k times in each backward, and re-gathered
    inside a later layer's activation-checkpointed recompute (which selective checkpointing
    refuses). FSDP2 looks into tuples, lists, dicts and dataclasses, not into a plain object:
    inside a Bag the weights are not seen, the table stays gathered from its first read to
    the end of the backward and its gradient is reduced once, there."""

    __slots__ = ("indices", "weights")

    def __init__(self, indices: torch.Tensor, weights: torch.Tensor):
        self.indices, self.weights = indices, weights


class ValueTable(nn.Module):
    """The memory's values: (n_values, v_dim), read as weighted bags of rows."""

    def __init__(self, n_values: int, v_dim: int, kernel: str = "auto"):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_values, v_dim))
        self.kernel = kernel  # the bag's implementation: auto | torch | triton (kernels.embedding_bag)

    def init_weights(self, init: ParamInit) -> None:
        init.normal_(self.weight, std=self.weight.shape[1] ** -0.5)

    def forward(self, bag: Bag) -> torch.Tensor:
        # bag.indices, bag.weights: (N, M) -> (N, v_dim)
        return embedding_bag(bag.indices, bag.weights, self.weight, self.kernel)


class MemoryReads(nn.Module):
    """Identity on a memory layer's (indices, weights): where evaluation hooks in to see what
    the layer reads (lingua_mem.eval.analytics). No parameters, nothing in the state dict."""

    def forward(self, indices: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return indices, weights


class ProductKeyMemory(nn.Module):
    """x -> query -> product-key top-k per head -> softmax -> bag of values -> out.

    With `swilu` (Memory+): out = W2 (bag * silu(W1 x)). Without: the bag itself
    (projected by W2 only when v_dim != dim), a vanilla PKM layer.
    """

    def __init__(self, dim: int, n_keys: int, heads: int, knn: int, k_dim: int, v_dim: int,
                 swilu: bool = True, qk_norm: bool = False, query_batchnorm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.dim, self.n_keys, self.heads, self.knn = dim, n_keys, heads, knn
        self.k_dim, self.v_dim, self.half = k_dim, v_dim, k_dim // 2
        self.rows = n_keys**2  # rows of the value table it reads
        self.query = nn.Linear(dim, heads * k_dim, bias=True)
        self.query_bn = nn.BatchNorm1d(heads * k_dim) if query_batchnorm else None
        # sub-keys: (heads, 2 halves, n_keys, k_dim / 2)
        self.keys = nn.Parameter(torch.empty(heads, 2, n_keys, self.half))
        self.q_norm = nn.RMSNorm(self.half, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.half, eps=norm_eps) if qk_norm else None
        self.gate = nn.Linear(dim, v_dim, bias=True) if swilu else None
        self.out = nn.Linear(v_dim, dim, bias=True) if (swilu or v_dim != dim) else None
        self.reads = MemoryReads()

    @torch.no_grad()
    def init_weights(self, init: ParamInit, out_std: float) -> None:
        for proj in (self.query, self.gate):
            if proj is not None:
                init.normal_(proj.weight, std=proj.in_features**-0.5)
                init.constant_(proj.bias, 0.0)
        bound = 1 / math.sqrt(self.k_dim)
        init.uniform_(self.keys, -bound, bound)
        for norm in (self.q_norm, self.k_norm):
            if norm is not None:
                init.constant_(norm.weight, 1.0)
        if self.query_bn is not None:
            init.constant_(self.query_bn.weight, 1.0)
            init.constant_(self.query_bn.bias, 0.0)
            self.query_bn.reset_running_stats()
        if self.out is not None:
            init.trunc_normal_(self.out.weight, std=out_std)
            init.constant_(self.out.bias, 0.0)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim) -> (indices, weights), each (N, heads * knn)."""
        n = x.shape[0]
        q = self.query(x)  # (N, heads * k_dim)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q = q.view(n, self.heads, 2, self.half)  # (N, heads, 2, half)
        # the key search runs in fp32 whatever the compute dtype (FSDP2's bf16 parameters,
        # or autocast): bf16 scores tie and pick different slots (3% of them at 134m shapes).
        # Under bf16 parameters the sub-keys arrive rounded to bf16 and are upcast here.
        with torch.autocast(device_type=x.device.type, enabled=False):
            dtype = torch.promote_types(self.keys.dtype, torch.float32)
            q, keys = q.to(dtype), self.keys.to(dtype)  # keys: (heads, 2, n_keys, half)
            if self.q_norm is not None:  # their weights upcast too
                q = F.rms_norm(q, (self.half,), self.q_norm.weight.to(dtype), self.q_norm.eps)
                keys = F.rms_norm(keys, (self.half,), self.k_norm.weight.to(dtype), self.k_norm.eps)
                q = q * self.half**-0.5  # keep scores O(1), as attention scales q.k
            scores, indices = product_key_search(q, keys, self.knn)  # (N, heads, knn)
            weights = scores.softmax(dim=-1)  # each head's own softmax
        return indices.view(n, -1), weights.view(n, -1)  # heads' bags summed as one bag

    def forward(self, x: torch.Tensor, values: ValueTable) -> torch.Tensor:
        shape = x.shape  # (B, T, dim)
        x = x.reshape(-1, self.dim)  # (N, dim)
        indices, weights = self.reads(*self.lookup(x))
        out = values(Bag(indices, weights)).to(x.dtype)  # (N, v_dim); tables stay fp32
        if self.gate is not None:
            out = out * F.silu(self.gate(x))
        if self.out is not None:
            out = self.out(out)  # (N, dim)
        return out.view(shape)
