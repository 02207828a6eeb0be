"""Exact top-k over the sums of two score vectors (product-key search)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch._subclasses.fake_tensor import is_fake

from lingua_mem.kernels import embedding_bag
from lingua_mem.kernels.embedding_bag import embedding_bag_backward


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
    return _pairs(v, i, k, n_keys)


def _pairs(v: torch.Tensor, i: torch.Tensor, k: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each half's top-k (values, sub-key indices) (..., 2, k) -> the best k of the k*k sums."""
    (v1, v2), (i1, i2) = v.unbind(-2), i.unbind(-2)
    with torch.no_grad():  # the choice only: its gradient is the picked pairs' (below)
        cand = v1.unsqueeze(-1) + v2.unsqueeze(-2)  # (..., k, k)
        best = cand.flatten(-2).topk(k, dim=-1).indices  # (..., k), best first
    first, second = best // k, best % k
    # the same sums, differentiable through the 2k picked halves alone: no (..., k, k) gradient
    scores = v1.gather(-1, first) + v2.gather(-1, second)  # (..., k), sorted descending
    return scores, i1.gather(-1, first) * n_keys + i2.gather(-1, second)


def product_key_search(q: torch.Tensor, keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The memory layer's search: q (N, heads, 2, half) against sub-keys (heads, 2, n_keys, half)
    -> (scores, indices) (N, heads, k), as product_topk_halves of their dot products.

    Differentiable in q and keys through the sub-keys each (token, head, half) picked only:
    the gradient of the picked scores (N, heads, 2, k) goes to q as a bag of the picked
    sub-keys and to the sub-keys as that bag's table gradient, N * heads * 2 * k rows of
    work, where the backward of the dense scores would be two (N*heads*2, n_keys) matmuls
    and a score-sized gradient, growing with n_keys (the square root of the table).
    """
    n_keys = keys.shape[-2]
    if not 0 < k <= n_keys:
        raise ValueError(f"product_topk: k={k} must be in 1..{n_keys}")
    v, i = _PickedScores.apply(q, keys, k)  # (N, heads, 2, k)
    return _pairs(v, i, k, n_keys)


# a CPU key search in chunks of tokens whose scores (chunk, heads, 2, n_keys) fit in this many
# bytes: a larger buffer is mapped fresh from the OS at every call (glibc maps blocks over
# 32 MiB), and its page faults cost more than the matmul (2x at memory n_keys 512). A GPU's
# caching allocator reuses its blocks: one chunk there, one launch of each kernel.
CPU_SCORE_CHUNK_BYTES = 8 << 20


def on_cpu(t: torch.Tensor) -> bool:
    """Whether the key search takes its CPU algorithms for `t`: a real CPU tensor, in eager
    code (the traffic model's fake tensors stand for a GPU's, plan/memory_step.py; a compiled
    graph plans its own buffers)."""
    return not torch.compiler.is_compiling() and t.device.type == "cpu" and not is_fake(t)


def token_chunks(q: torch.Tensor, keys: torch.Tensor) -> list[slice]:
    """Slices of q's tokens (dim 0) for the key search: all of them but on the CPU."""
    n = q.shape[0]
    per_token = q.shape[1] * q.shape[2] * keys.shape[2] * q.element_size()
    step = max(1, CPU_SCORE_CHUNK_BYTES // per_token)
    if not on_cpu(q) or n <= step:
        return [slice(None)]
    return [slice(c, c + step) for c in range(0, n, step)]


def topk_unsorted(s: torch.Tensor, k: int, groups: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """s (..., n) -> its top k (values, indices) (..., k), in no order.

    On the CPU, where torch's top-k costs about 3 ns an element (a selection per row) and a
    max 0.3, a long row is searched through the maxima of `groups` interleaved groups
    (group j: s[j], s[j + n/groups], ...): the k groups of largest maximum hold the top k
    (a top-k value whose group is left out would have the k picked maxima above it), so a
    top-k of n/groups maxima and one of groups * k candidates replace the top-k of n, exactly
    (ties aside, which either picks at random): 29 ms against 45 at 16,384 rows of 512.
    """
    n = s.shape[-1]
    width = n // groups  # the groups' number
    if not on_cpu(s) or n % groups or width < 4 * k:
        return s.topk(k, dim=-1, sorted=False)
    grouped = s.unflatten(-1, (groups, width))  # (..., groups, width): group j is column j
    top = grouped.amax(-2).topk(k, dim=-1, sorted=False).indices  # (..., k) the groups picked
    cand = grouped.gather(-1, top.unsqueeze(-2).expand(*top.shape[:-1], groups, k))  # (..., groups, k)
    v, j = cand.flatten(-2).topk(k, dim=-1, sorted=False)  # (..., k), j = row * k + pick
    return v, (j // k) * width + top.gather(-1, j % k)


@contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 matmuls in full fp32 (no TF32) inside, whatever the process set; restored after."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


@torch.library.custom_op("lingua_mem::key_scores", mutates_args=())
def key_scores(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q (N, heads, 2, half) against the sub-keys (heads, 2, n_keys, half): the scores (N, heads,
    2, n_keys), in IEEE fp32 whatever distributed.tf32 says (TF32 keeps 10 mantissa bits of the
    inputs: close scores tie or swap and other slots are picked). An op of its own, so the
    precision is set around this matmul alone, outside any compiled graph."""
    with ieee_fp32():  # a batched matmul (heads, 2, N, n_keys), seen as (N, heads, 2, n_keys)
        return torch.matmul(q.permute(1, 2, 0, 3), keys.transpose(-1, -2)).permute(2, 0, 1, 3)


@key_scores.register_fake
def _(q, keys):
    return q.new_empty((q.shape[1], q.shape[2], q.shape[0], keys.shape[2])).permute(2, 0, 1, 3)


class _PickedScores(torch.autograd.Function):
    """(q, keys, k) -> each half's top-k scores and sub-keys (N, heads, 2, k); see product_key_search."""

    @staticmethod
    def forward(ctx, q, keys, k):
        with torch.no_grad():
            # each chunk's scores (chunk, heads, 2, n_keys) in IEEE fp32, then their top-k,
            # unsorted: _pairs searches the k*k sums whatever the halves' order
            picks = [topk_unsorted(key_scores(q[c], keys), k) for c in token_chunks(q, keys)]
            v, i = picks[0] if len(picks) == 1 else map(torch.cat, zip(*picks, strict=True))
        ctx.mark_non_differentiable(i)
        ctx.save_for_backward(q, keys, i)
        return v, i

    @staticmethod
    def backward(ctx, grad_v, _):
        q, keys, i = ctx.saved_tensors
        n, heads, halves, half = q.shape
        n_keys, k = keys.shape[2], i.shape[-1]
        # the picked sub-keys as rows of all heads' and halves' keys:
        # (N*heads*2, k) into (heads*2*n_keys, half)
        first = torch.arange(heads * halves, device=i.device).view(1, heads, halves, 1) * n_keys
        rows = (i + first).reshape(-1, k)
        table, w = keys.reshape(-1, half), grad_v.reshape(-1, k).to(keys.dtype)
        grad_q = grad_keys = None
        if ctx.needs_input_grad[0]:
            grad_q = embedding_bag(rows, w, table).view(q.shape)  # sum_j grad_v[j] keys[picked j]
        if ctx.needs_input_grad[1]:  # sum over the (token, j) that picked a sub-key of grad_v * q
            if n_keys <= k * half:  # no more bytes: the picked scores' gradient made dense,
                # (N, heads, 2, n_keys) written and read once, against each pick reading its q
                chunks, grad_keys = token_chunks(q, keys), None
                zeros = q.new_zeros((*q[chunks[0]].shape[:3], n_keys))  # (chunk, heads, 2, n_keys)
                for j, c in enumerate(chunks):
                    dense = zeros[: q[c].shape[0]].scatter_(-1, i[c], grad_v[c].to(q.dtype))
                    part = torch.einsum("nhpk,nhpd->hpkd", dense, q[c])
                    grad_keys = part if grad_keys is None else grad_keys.add_(part)
                    if j + 1 < len(chunks):  # zeros again for the next chunk: k a row, not n_keys
                        dense.scatter_(-1, i[c], 0.0)
            else:
                _, grad_keys = embedding_bag_backward(q.reshape(-1, half), rows, w, table, weights_grad=False)
                grad_keys = grad_keys.view(keys.shape)
        return grad_q, grad_keys, None
