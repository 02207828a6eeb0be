"""Exact top-k over the sums of two score vectors (product-key search)."""

from __future__ import annotations

import torch


def product_topk(s1: torch.Tensor, s2: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of s1[i1] + s2[i2] over all n_keys**2 pairs.

    s1, s2: (..., n_keys) scores of the two query halves against their sub-keys.
    Returns (scores, indices), both (..., k), scores sorted descending and
    indices = i1 * n_keys + i2. See product_topk_halves, which takes both in one tensor.
    """
    if s2.shape != s1.shape:
        raise ValueError(f"product_topk: s1 {tuple(s1.shape)} and s2 {tuple(s2.shape)} differ")
    return product_topk_halves(torch.stack((s1, s2), dim=-2), k)


def product_topk_halves(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """product_topk of s[..., 0, :] and s[..., 1, :]: s (..., 2, n_keys) -> (scores, indices) (..., k).

    Exact: a pair in the overall top-k has both halves in their own top-k, so only the k*k
    candidate sums are searched. Differentiable in s, through one top-k over both halves:
    its backward writes one (..., 2, n_keys) gradient (per-half top-k on views of s would
    write three: one per top-k, then each view's whole-s gradient).
    """
    n_keys = s.shape[-1]
    if s.dim() < 2 or s.shape[-2] != 2:
        raise ValueError(f"product_topk: scores {tuple(s.shape)} must be (..., 2, n_keys)")
    if not 0 < k <= n_keys:
        raise ValueError(f"product_topk: k={k} must be in 1..{n_keys}")
    v, i = s.topk(k, dim=-1)  # (..., 2, k): each half's own top-k
    (v1, v2), (i1, i2) = v.unbind(-2), i.unbind(-2)
    cand = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (..., k, k)
    scores, best = cand.flatten(-2).topk(k, dim=-1)  # (..., k), sorted descending
    rows = i1.gather(-1, best // k)  # (..., k) index into the first half
    cols = i2.gather(-1, best % k)  # (..., k) index into the second half
    return scores, rows * n_keys + cols
