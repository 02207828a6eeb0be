"""Triton kernels of the weighted embedding bag, as PyTorch custom ops.

    out[n] = sum_m weights[n, m] * table[indices[n, m]]        (N, M), (N, M), (R, D) -> (N, D)

forward   one program per (bag, block of D columns): BLOCK_M rows gathered at a time,
          weighted and summed in fp32; the result in the table's dtype
backward  grad_weights[n, m] = grad_out[n] . table[indices[n, m]]: one program per
          (bag, block of BLOCK_M indices), the dot products over D in fp32
          grad_table, two variants (`table_grad`):
            atomic   one program per (bag, D block) adds weights * grad_out[n] into the
                     rows it read (fp32 atomics)
            sorted   the "reverse index": the N*M reads sorted by row, one program per
                     (distinct row, D block) sums its reads and writes once, no atomics
                     (the paper finds it faster for D > 128 with balanced usage)
          auto picks sorted for D > 128, else atomic (the paper's finding: not yet
          measured on a GPU here, see docs/performance.md)

Registered with torch.library (lingua_mem::embedding_bag_triton and its backward), so
torch.compile traces through them and selective activation checkpointing can keep their
outputs (SAVED_OPS). On CUDA they run compiled; on the CPU only under
TRITON_INTERPRET=1 (set before triton is imported), which is how the tests check them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_D = 128  # columns per program
BLOCK_M = 16  # indices gathered at a time
SORTED_ABOVE_D = 128  # table_grad=auto: the sorted variant for D above this


@triton.jit
def _bag_slice(idx_ptr, w_ptr, n, start, M, BLOCK_M: tl.constexpr):
    """Bag n's indices start .. start + BLOCK_M: (rows int64, weights fp32, in-range mask)."""
    ms = start + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    m_ok = ms < M
    rows = tl.load(idx_ptr + n * M + ms, mask=m_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + n * M + ms, mask=m_ok, other=0.0).to(tl.float32)
    return rows, w, m_ok


@triton.jit
def _bag_forward(idx_ptr, w_ptr, table_ptr, out_ptr, M, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for start in range(0, M, BLOCK_M):
        rows, w, m_ok = _bag_slice(idx_ptr, w_ptr, n, start, M, BLOCK_M)
        vals = tl.load(table_ptr + rows[:, None] * D + cols[None, :], mask=m_ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
        acc += tl.sum(w[:, None] * vals, axis=0)
    tl.store(out_ptr + n.to(tl.int64) * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _bag_weight_grad(idx_ptr, table_ptr, grad_out_ptr, grad_w_ptr, M, D, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    ms = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = ms < M
    rows = tl.load(idx_ptr + n * M + ms, mask=m_ok, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, D, BLOCK_D):
        cols = start + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        g = tl.load(grad_out_ptr + n.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(tl.float32)
        vals = tl.load(table_ptr + rows[:, None] * D + cols[None, :], mask=m_ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)
        acc += tl.sum(vals * g[None, :], axis=1)
    tl.store(grad_w_ptr + n * M + ms, acc, mask=m_ok)


@triton.jit
def _bag_table_grad_atomic(idx_ptr, w_ptr, grad_out_ptr, grad_table_ptr, M, D, BLOCK_M: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    g = tl.load(grad_out_ptr + n.to(tl.int64) * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    for start in range(0, M, BLOCK_M):
        rows, w, m_ok = _bag_slice(idx_ptr, w_ptr, n, start, M, BLOCK_M)
        tl.atomic_add(grad_table_ptr + rows[:, None] * D + cols[None, :], w[:, None] * g[None, :],
                      mask=m_ok[:, None] & col_ok[None, :])


@triton.jit
def _bag_table_grad_sorted(rows_ptr, starts_ptr, bags_ptr, w_ptr, grad_out_ptr, grad_table_ptr, D,
                           BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    u = tl.program_id(0)  # one distinct row; its reads are sorted[start:end]
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    row = tl.load(rows_ptr + u).to(tl.int64)
    start = tl.load(starts_ptr + u)
    end = tl.load(starts_ptr + u + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_M):
        js = j0 + tl.arange(0, BLOCK_M)
        j_ok = js < end
        bags = tl.load(bags_ptr + js, mask=j_ok, other=0).to(tl.int64)
        w = tl.load(w_ptr + js, mask=j_ok, other=0.0).to(tl.float32)
        g = tl.load(grad_out_ptr + bags[:, None] * D + cols[None, :], mask=j_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w[:, None] * g, axis=0)
    tl.store(grad_table_ptr + row * D + cols, acc, mask=col_ok)


def _check(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> None:
    if indices.dim() != 2 or weights.shape != indices.shape or table.dim() != 2:
        raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and weights "
                         f"{tuple(weights.shape)} must both be (N, M), the table (R, D)")


@torch.library.custom_op("lingua_mem::embedding_bag_triton", mutates_args=())
def embedding_bag_triton(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The weighted bag (N, D) in the table's dtype (fp32 accumulation)."""
    _check(indices, weights, table)
    n, m = indices.shape
    d = table.shape[1]
    out = table.new_empty((n, d))
    if n and d:
        grid = (n, triton.cdiv(d, BLOCK_D))
        _bag_forward[grid](indices.contiguous(), weights.contiguous(), table.contiguous(), out, m, d,
                           BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return out


@embedding_bag_triton.register_fake
def _(indices, weights, table):
    return table.new_empty((indices.shape[0], table.shape[1]))


def table_grad_variant(d: int, table_grad: str = "auto") -> str:
    return table_grad if table_grad != "auto" else ("sorted" if d > SORTED_ABOVE_D else "atomic")


@torch.library.custom_op("lingua_mem::embedding_bag_triton_backward", mutates_args=())
def embedding_bag_triton_backward(grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                                  table: torch.Tensor,
                                  table_grad: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_weights in the weights' dtype, grad_table in the table's dtype)."""
    n, m = indices.shape
    rows, d = table.shape
    grad_out, indices, weights = grad_out.contiguous(), indices.contiguous(), weights.contiguous()
    table = table.contiguous()
    grad_w = torch.empty((n, m), dtype=torch.float32, device=weights.device)
    grad_table = torch.zeros((rows, d), dtype=torch.float32, device=table.device)
    if n and m and d:
        _bag_weight_grad[(n, triton.cdiv(m, BLOCK_M))](indices, table, grad_out, grad_w, m, d,
                                                      BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        if table_grad_variant(d, table_grad) == "atomic":
            _bag_table_grad_atomic[(n, triton.cdiv(d, BLOCK_D))](indices, weights, grad_out, grad_table, m, d,
                                                                BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
        else:  # the reverse index: reads sorted by row, each distinct row summed by one program
            flat = indices.flatten()
            sorted_rows, order = torch.sort(flat, stable=True)
            distinct, counts = torch.unique_consecutive(sorted_rows, return_counts=True)
            starts = torch.zeros(distinct.numel() + 1, dtype=torch.int64, device=flat.device)
            starts[1:] = counts.cumsum(0)
            bags = (order // m).contiguous()
            w_sorted = weights.flatten()[order].contiguous()
            _bag_table_grad_sorted[(distinct.numel(), triton.cdiv(d, BLOCK_D))](
                distinct, starts, bags, w_sorted, grad_out, grad_table, d, BLOCK_M=BLOCK_M, BLOCK_D=BLOCK_D)
    return grad_w.to(weights.dtype), grad_table.to(table.dtype)


@embedding_bag_triton_backward.register_fake
def _(grad_out, indices, weights, table, table_grad="auto"):
    return weights.new_empty(weights.shape), table.new_empty(table.shape)


def _setup_context(ctx, inputs, output):
    indices, weights, table = inputs
    ctx.save_for_backward(indices, weights, table)


def _backward(ctx, grad_out):
    indices, weights, table = ctx.saved_tensors
    grad_w, grad_table = embedding_bag_triton_backward(grad_out, indices, weights, table)
    return None, grad_w, grad_table


embedding_bag_triton.register_autograd(_backward, setup_context=_setup_context)

# the outputs selective activation checkpointing keeps
SAVED_OPS = frozenset({torch.ops.lingua_mem.embedding_bag_triton.default})
