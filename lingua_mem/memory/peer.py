"""PEER (He 2024, "Mixture of A Million Experts"): product keys over single-neuron experts.

Expert i is a pair (u_i, v_i) of dim-vectors. A token's query finds its heads * knn experts by
the memory layer's product-key search (each head's scores softmaxed), and

    out = sum_j g_j * gelu(u_{i_j} . x) * v_{i_j}

The v_i are a value table like the memory layer's (shared across layers with
memory.shared_values, read as a weighted bag, memory-parallel by columns); the bag's weights
are the scores times the experts' activations, so the search, the u_i and the table train
through the same routed read as Memory+. The u_i are the layer's own (n_keys**2, dim)
parameter, sharded by FSDP2 like the rest of the block and gathered whole for its forward:
not memory-parallel (u_i . x needs every column of a row).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingua_mem.memory.layer import Bag, ProductKeyMemory, ValueTable
from lingua_mem.param_init import ParamInit


class PEER(ProductKeyMemory):
    """x (B, T, dim) -> (B, T, dim) through heads * knn of n_keys**2 single-neuron experts."""

    def __init__(self, dim: int, n_keys: int, heads: int, knn: int, k_dim: int, qk_norm: bool = False,
                 query_batchnorm: bool = True, norm_eps: float = 1e-5):
        super().__init__(dim, n_keys, heads, knn, k_dim, v_dim=dim, swilu=False, qk_norm=qk_norm,
                         query_batchnorm=query_batchnorm, norm_eps=norm_eps)
        self.down = nn.Parameter(torch.empty(n_keys**2, dim))  # u_i, one row an expert

    @torch.no_grad()
    def init_weights(self, init: ParamInit, out_std: float) -> None:
        super().init_weights(init, out_std)
        init.normal_(self.down, std=self.dim**-0.5)  # u_i . x ~ N(0, 1) for x of unit RMS

    def forward(self, x: torch.Tensor, values: ValueTable) -> torch.Tensor:
        shape = x.shape  # (B, T, dim)
        x = x.reshape(-1, self.dim)  # (N, dim)
        indices, scores = self.reads(*self.lookup(x))  # (N, heads * knn) each
        u = F.embedding(indices, self.down)  # (N, M, dim)
        act = F.gelu(torch.einsum("nmd,nd->nm", u, x))  # (N, M): each picked expert's neuron
        out = values(Bag(indices, scores * act.to(scores.dtype)))  # (N, dim)
        return out.to(x.dtype).view(shape)
