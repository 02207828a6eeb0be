"""UltraMem (Huang et al., ICLR 2025, "Ultra-Sparse Memory Network") in a block's FFN slot: a
product-key memory whose grid of n_keys x n_keys keys is scored by a Tucker decomposition and
whose values are expanded implicitly.

Tucker-decomposed retrieval (TDQKR). Each head has `rank` row queries and `rank` column
queries; against the row and column sub-keys they give S_row, S_col (rank, n_keys). Slot (i, j)
scores S_row[:, i]^T C S_col[:, j] with a learned core C (rank x rank): a bilinear score, where
product keys add two. The search takes the best knn rows and columns of the core's rank-1
approximation (C's first singular vectors u, v: S ~ sigma (u . S_row[:, i]) (v . S_col[:, j])),
top and bottom (a product is largest where both factors are, or both are smallest), and scores
those 2 * knn**2 candidates exactly. Exact when C has rank 1; approximate otherwise, as in the
paper. Not kept from the paper: its auxiliary loss on C's other singular values.

Implicit value expansion (IVE). The n_keys**2 slots are virtual: slot s reads physical row
s mod P of a table of P = n_keys**2 / expansion rows and maps it through projector s div P,
out = sum_e (bag of the slots of projector e) @ W_e, W_e (v_dim, dim). The table is an ordinary
value table (shared, memory-parallel, row optimizers); each projector is one more weighted bag
of it (expansion bags a layer).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingua_mem.memory.layer import Bag, ProductKeyMemory, ValueTable
from lingua_mem.param_init import ParamInit


class UltraMem(ProductKeyMemory):
    """x (B, T, dim) -> (B, T, dim) through heads * knn of n_keys**2 virtual values."""

    def __init__(self, dim: int, n_keys: int, heads: int, knn: int, k_dim: int, v_dim: int, rank: int = 2,
                 expansion: int = 1, qk_norm: bool = False, query_batchnorm: bool = False,
                 norm_eps: float = 1e-5):
        super().__init__(dim, n_keys, heads, knn, k_dim, v_dim=dim, swilu=False, qk_norm=qk_norm,
                         query_batchnorm=False, norm_eps=norm_eps)
        self.v_dim, self.rank, self.expansion = v_dim, rank, expansion
        self.rows = n_keys**2 // expansion  # physical rows of the value table
        width = heads * 2 * rank * self.half  # per head: rank row and rank column queries
        self.query = nn.Linear(dim, width, bias=True)
        self.query_bn = nn.BatchNorm1d(width) if query_batchnorm else None
        self.core = nn.Parameter(torch.empty(heads, rank, rank))  # C, one a head
        self.projectors = nn.Parameter(torch.empty(expansion, v_dim, dim))  # W_e

    @torch.no_grad()
    def init_weights(self, init: ParamInit, out_std: float) -> None:
        super().init_weights(init, out_std)
        init.normal_(self.core, std=self.rank**-0.5)
        init.trunc_normal_(self.projectors, std=out_std)

    def lookup(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, dim) -> (virtual slots, weights), each (N, heads * knn)."""
        n, h, r, half, k = x.shape[0], self.heads, self.rank, self.half, self.knn
        q = self.query(x)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q = q.view(n, h, 2, r, half)
        with torch.autocast(device_type=x.device.type, enabled=False):  # fp32 search (see the PKM's)
            dtype = torch.promote_types(self.keys.dtype, torch.float32)
            q, keys, core = q.to(dtype), self.keys.to(dtype), self.core.to(dtype)
            if self.q_norm is not None:
                q = F.rms_norm(q, (half,), self.q_norm.weight.to(dtype), self.q_norm.eps) * half**-0.5
                keys = F.rms_norm(keys, (half,), self.k_norm.weight.to(dtype), self.k_norm.eps)
            s = torch.einsum("nhpad,hpkd->nhpak", q, keys)  # (N, H, 2, r, n_keys): S_row, S_col
            with torch.no_grad():  # the candidates, from C's rank-1 approximation
                u, _, vh = torch.linalg.svd(core)  # (H, r, r) each
                a = torch.einsum("nhak,ha->nhk", s[:, :, 0], u[..., 0])  # (N, H, n_keys)
                b = torch.einsum("nhak,ha->nhk", s[:, :, 1], vh[:, 0])
                rows = torch.cat([a.topk(k).indices, (-a).topk(k).indices], dim=-1)  # (N, H, 2k)
                cols = torch.cat([b.topk(k).indices, (-b).topk(k).indices], dim=-1)
            pick = lambda sc, idx: sc.gather(-1, idx[:, :, None].expand(-1, -1, r, -1))  # noqa: E731
            s_row = pick(s[:, :, 0], rows).view(n, h, r, 2, k)  # (N, H, r, top|bottom, k)
            s_col = pick(s[:, :, 1], cols).view(n, h, r, 2, k)
            grid = torch.einsum("nhaxi,hab,nhbxj->nhxij", s_row, core, s_col)  # (N, H, 2, k, k)
            scores, best = grid.flatten(-3).topk(k, dim=-1)  # (N, H, k)
            half_of, cell = best // (k * k), best % (k * k)
            row = rows.gather(-1, half_of * k + cell // k)
            col = cols.gather(-1, half_of * k + cell % k)
            weights = scores.softmax(dim=-1)
        return (row * self.n_keys + col).view(n, -1), weights.view(n, -1)

    def forward(self, x: torch.Tensor, values: ValueTable) -> torch.Tensor:
        shape = x.shape  # (B, T, dim)
        x = x.reshape(-1, self.dim)  # (N, dim)
        slots, weights = self.lookup(x)  # (N, M) virtual slots
        rows, weights = self.reads(slots % self.rows, weights)  # the physical rows read
        projector = slots // self.rows
        out = 0
        for e in range(self.expansion):
            bag = Bag(rows, weights * (projector == e)) if self.expansion > 1 else Bag(rows, weights)
            out = out + values(bag).to(x.dtype) @ self.projectors[e].to(x.dtype)  # (N, dim)
        return out.view(shape)
