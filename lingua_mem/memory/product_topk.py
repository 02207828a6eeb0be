"""Exact top-k over the sums of two score vectors (product-key search)."""

from __future__ import annotations

import torch


def product_topk(s1: torch.Tensor, s2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of s1[i1] + s2[i2] over all n_keys**2 pairs.

    s1, s2: (..., n_keys) scores of the two query halves against their sub-keys.
    Returns (scores, indices), both (..., k), scores sorted descending and
    indices = i1 * n_keys + i2. Exact: a pair in the overall top-k has both
    halves in their own top-k, so only the k*k candidate sums are searched.
    Differentiable in s1 and s2 (through topk and gather).
    """
    n_keys = s1.shape[-1]
    if s2.shape != s1.shape:
        raise ValueError(f"product_topk: s1 {tuple(s1.shape)} and s2 {tuple(s2.shape)} differ")
    if not 0 < k <= n_keys:
        raise ValueError(f"product_topk: k={k} must be in 1..{n_keys}")
    v1, i1 = s1.topk(k, dim=-1)  # (..., k)
    v2, i2 = s2.topk(k, dim=-1)  # (..., k)
    cand = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (..., k, k)
    scores, best = cand.flatten(-2).topk(k, dim=-1)  # (..., k), sorted descending
    rows = i1.gather(-1, best // k)  # (..., k) index into the first half
    cols = i2.gather(-1, best % k)  # (..., k) index into the second half
    return scores, rows * n_keys + cols
