"""Weighted embedding bag: the value gathering of a memory layer.

    out[n] = sum_m weights[n, m] * table[indices[n, m]]

indices (N, M) int64, weights (N, M) float, table (R, D) -> out (N, D).
Gradients flow to both `table` and `weights`.

`embedding_bag` is the one entry point; it picks an implementation by device.
Today that is the PyTorch path everywhere; a Triton GPU path plugs in here
behind the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# the ops of this kernel whose outputs selective activation checkpointing keeps
SAVED_OPS = frozenset({torch.ops.aten._embedding_bag.default})


def embedding_bag_torch(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """PyTorch path, any device.

    Built on F.embedding_bag(mode="sum", per_sample_weights=...): its backward
    accumulates the table gradient row by row (index_add style) and computes the
    weight gradients as per-row dot products, so no (N, M, D) tensor is ever
    materialised, unlike `(weights[..., None] * table[indices]).sum(1)`.
    The bag is computed in the table's dtype; the result is returned in it.
    """
    if indices.dim() != 2 or weights.shape != indices.shape:
        raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and weights "
                         f"{tuple(weights.shape)} must both be (N, M)")
    return F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")


def embedding_bag(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """Weighted sum of table rows per bag: (N, M), (N, M), (R, D) -> (N, D)."""
    return embedding_bag_torch(indices, weights, table)
