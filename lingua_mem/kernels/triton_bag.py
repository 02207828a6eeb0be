"""Triton kernels of the weighted embedding bag, as PyTorch custom ops.

    out[s] = sum_{j in bag s} weights[j] * table[indices[j]]

Bags are (N, M) (N bags of M reads) or ragged: flat reads (K,) with offsets (S + 1,), bag s
reading positions offsets[s] .. offsets[s + 1] (what a value table's owner bags when it
returns partial bags, parallel/memory_parallel.py). (N, M) bags run as offsets 0, M, 2M, ...;
positions are int64.

forward   one program per (bag, block of D columns): BLOCK_M rows gathered at a time from the
          table as stored (an fp32 shard), weighted and summed in fp32, the result written in
          the dtype asked (the compute dtype: the cast happens in the kernel, no copy of the
          rows is made)
backward of a plain table (autograd of the forward op, a table that is not routed):
          grad_weights[j] = grad_out[s] . table[indices[j]], one program per bag; the table's
          gradient by fp32 atomics, one program per (bag, D block) adding into the rows read
backward of a routed table's rows (bag_rows_backward_triton, the owner's backward): one
          program per SEGMENT of at most SEGMENT_READS reads of ONE distinct row (the reads
          sorted by row, a row's reads cut into segments: memory_parallel.TableReader.distinct
          plans them): the row is read once (fp32, a D block at a time), each read's weight
          gradient is its bag's gradient . the row, and the row's gradient, sum of weight x bag
          gradient, is added in fp32 into the table's step gradient at the row's slot (atomics:
          a hot row's segments run in parallel); no grid over reads, no row copy
          ("reverse indices" backward, fused with the weight gradient)

Block sizes and warps are autotuned on a GPU (AUTOTUNE_CONFIGS, keyed on D and the tensors'
dtypes, pruned to blocks that fit D; an atomic gradient is zeroed between trials); the
interpreter runs the default config alone (a trial there measures nothing).

Registered with torch.library (lingua_mem::embedding_bag_triton and its backwards), so
torch.compile traces through them and selective activation checkpointing can keep their
outputs (SAVED_OPS). On CUDA they run compiled; on the CPU only under
TRITON_INTERPRET=1 (set before triton is imported), which is how the tests check them.
Each op declares the bytes it moves (TRAFFIC, read by lingua_mem.plan.traffic).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

BLOCK_D = 128  # columns per program (the default config)
BLOCK_M = 16  # indices gathered at a time (the default config)
# a routed table's row backward runs a program per segment of at most this many reads of one
# row (a row read more often is cut into several segments, added together by atomics)
SEGMENT_READS = 16
# (BLOCK_D, BLOCK_M, num_warps) tried on a GPU, the default first
AUTOTUNE_CONFIGS = ((BLOCK_D, BLOCK_M, 4), (64, 16, 2), (64, 32, 4), (128, 32, 4), (256, 16, 4), (256, 32, 8))
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # Triton reads it at import, like this


def _configs() -> list[triton.Config]:
    chosen = AUTOTUNE_CONFIGS[:1] if INTERPRETED else AUTOTUNE_CONFIGS
    return [triton.Config({"BLOCK_D": d, "BLOCK_M": m}, num_warps=w) for d, m, w in chosen]


def fitting_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The configs whose BLOCK_D is no wider than D needs (the next power of two, at least
    64): a wider block only masks columns off. Never empty."""
    widest = max(64, triton.next_power_of_2(int(named_args["D"])))
    return [c for c in configs if c.kwargs["BLOCK_D"] <= widest] or configs[:1]


def _autotuned(reset_to_zero: list[str] | None = None, restore_value: list[str] | None = None):
    prune = {"early_config_prune": fitting_configs}
    return triton.autotune(configs=_configs(), key=["D"], reset_to_zero=reset_to_zero,
                           restore_value=restore_value, prune_configs_by=prune)


@triton.jit
def _segment(off_ptr, s):
    """Bag s's reads: positions [start, end) of the flat indices and weights."""
    return tl.load(off_ptr + s), tl.load(off_ptr + s + 1)


@triton.jit
def _reads(idx_ptr, w_ptr, j0, end, BLOCK_M: tl.constexpr):
    """Reads j0 .. j0 + BLOCK_M of a bag ending at `end`: (rows int64, weights fp32, in-range mask)."""
    js = j0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,) int64: positions in the flat reads
    j_ok = js < end
    rows = tl.load(idx_ptr + js, mask=j_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + js, mask=j_ok, other=0.0).to(tl.float32)
    return js, rows, w, j_ok


@_autotuned()
@triton.jit
def _bag_forward(idx_ptr, w_ptr, off_ptr, table_ptr, out_ptr, D, BLOCK_M: tl.constexpr,
                 BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    start, end = _segment(off_ptr, s)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(start, end, BLOCK_M):
        _, rows, w, j_ok = _reads(idx_ptr, w_ptr, j0, end, BLOCK_M)
        vals = tl.load(table_ptr + rows[:, None] * D + cols[None, :], mask=j_ok[:, None] & col_ok[None, :],
                       other=0.0).to(tl.float32)  # (BLOCK_M, BLOCK_D)
        acc += tl.sum(w[:, None] * vals, axis=0)
    tl.store(out_ptr + s * D + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@_autotuned()
@triton.jit
def _bag_weight_grad(idx_ptr, w_ptr, off_ptr, table_ptr, grad_out_ptr, grad_w_ptr, D, BLOCK_M: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    start, end = _segment(off_ptr, s)
    for j0 in range(start, end, BLOCK_M):
        js, rows, _, j_ok = _reads(idx_ptr, w_ptr, j0, end, BLOCK_M)
        acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            cols = d0 + tl.arange(0, BLOCK_D)
            col_ok = cols < D
            g = tl.load(grad_out_ptr + s * D + cols, mask=col_ok, other=0.0).to(tl.float32)
            vals = tl.load(table_ptr + rows[:, None] * D + cols[None, :],
                           mask=j_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)
            acc += tl.sum(vals * g[None, :], axis=1)
        tl.store(grad_w_ptr + js, acc, mask=j_ok)


@_autotuned(["grad_table_ptr"])
@triton.jit
def _bag_table_grad_atomic(idx_ptr, w_ptr, off_ptr, grad_out_ptr, grad_table_ptr, D, BLOCK_M: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    s = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    col_ok = cols < D
    start, end = _segment(off_ptr, s)
    g = tl.load(grad_out_ptr + s * D + cols, mask=col_ok, other=0.0).to(tl.float32)
    for j0 in range(start, end, BLOCK_M):
        _, rows, w, j_ok = _reads(idx_ptr, w_ptr, j0, end, BLOCK_M)
        # relaxed: a sum has no ordering to keep (the default acq_rel fences every add on a GPU)
        tl.atomic_add(grad_table_ptr + rows[:, None] * D + cols[None, :], w[:, None] * g[None, :],
                      mask=j_ok[:, None] & col_ok[None, :], sem="relaxed")


@_autotuned(restore_value=["grad_rows_ptr"])  # a trial adds into the step's gradient: put back
@triton.jit
def _bag_rows_backward(order_ptr, seg_ptr, reads_ptr, bags_ptr, w_ptr, grad_out_ptr, table_ptr, slot_ptr,
                       grad_rows_ptr, grad_w_ptr, scale, D, SEGMENT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    seg = tl.program_id(0).to(tl.int64)  # one segment: up to SEGMENT reads of one row
    start, end = _segment(seg_ptr, seg)
    js = start + tl.arange(0, SEGMENT)
    j_ok = js < end
    pos = tl.load(order_ptr + js, mask=j_ok, other=0).to(tl.int64)  # (SEGMENT,) the reads, as read
    bags = tl.load(bags_ptr + pos, mask=j_ok, other=0).to(tl.int64)
    w = tl.load(w_ptr + pos, mask=j_ok, other=0.0).to(tl.float32)
    row = tl.load(reads_ptr + tl.load(order_ptr + start)).to(tl.int64)  # the segment's row
    slot = tl.load(slot_ptr + row).to(tl.int64)  # its place in the step's row gradient
    dots = tl.zeros((SEGMENT,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        col_ok = cols < D
        r = tl.load(table_ptr + row * D + cols, mask=col_ok, other=0.0).to(tl.float32)  # (BLOCK_D,)
        g = tl.load(grad_out_ptr + bags[:, None] * D + cols[None, :], mask=j_ok[:, None] & col_ok[None, :],
                    other=0.0).to(tl.float32)  # (SEGMENT, BLOCK_D)
        dots += tl.sum(g * r[None, :], axis=1)
        tl.atomic_add(grad_rows_ptr + slot * D + cols, tl.sum(w[:, None] * g, axis=0) * scale, mask=col_ok,
                      sem="relaxed")
    tl.store(grad_w_ptr + pos, dots, mask=j_ok)


def _by_bags_and_columns(n: int, d: int):
    """The grid of n programs by the D blocks of the config being run."""
    return lambda meta: (n, triton.cdiv(d, meta["BLOCK_D"]))


def _check(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor, offsets) -> None:
    if offsets is None:
        ok = indices.dim() == 2 and weights.shape == indices.shape
        want = "both be (N, M)"
    else:
        ok = indices.dim() == 1 and weights.shape == indices.shape and offsets.dim() == 1
        want = "both be (K,) with offsets (S + 1,)"
    if not ok or table.dim() != 2:
        raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and weights "
                         f"{tuple(weights.shape)} must {want}, the table (R, D)")


def _flat(indices: torch.Tensor, weights: torch.Tensor, offsets: torch.Tensor | None):
    """(N, M) bags, or flat reads with offsets -> (flat indices, flat weights, int64 offsets (S + 1,))."""
    if offsets is None:
        n, m = indices.shape
        offsets = torch.arange(n + 1, device=indices.device, dtype=torch.int64) * m
    offsets = offsets.to(torch.int64).contiguous()
    return indices.contiguous().flatten(), weights.contiguous().flatten(), offsets


@torch.library.custom_op("lingua_mem::embedding_bag_triton", mutates_args=())
def embedding_bag_triton(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                         offsets: torch.Tensor | None = None,
                         dtype: torch.dtype | None = None) -> torch.Tensor:
    """The weighted bag (S, D) in `dtype` (None: the table's), accumulated in fp32."""
    _check(indices, weights, table, offsets)
    idx, w, off = _flat(indices, weights, offsets)
    s, d = off.numel() - 1, table.shape[1]
    out = table.new_empty((s, d), dtype=dtype or table.dtype)
    if s and d:
        _bag_forward[_by_bags_and_columns(s, d)](idx, w, off, table.contiguous(), out, d)
    return out


@embedding_bag_triton.register_fake
def _(indices, weights, table, offsets=None, dtype=None):
    bags = indices.shape[0] if offsets is None else offsets.shape[0] - 1
    return table.new_empty((bags, table.shape[1]), dtype=dtype or table.dtype)


@torch.library.custom_op("lingua_mem::embedding_bag_triton_backward", mutates_args=())
def embedding_bag_triton_backward(grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                                  table: torch.Tensor, offsets: torch.Tensor | None = None
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """A plain table's gradients: (grad_weights in the weights' dtype and shape, grad_table in
    the table's dtype: the parameter's .grad)."""
    idx, w, off = _flat(indices, weights, offsets)
    s, (rows, d) = off.numel() - 1, table.shape
    grad_out, table = grad_out.contiguous(), table.contiguous()
    grad_w = torch.zeros(idx.shape, dtype=torch.float32, device=weights.device)
    grad_table = torch.zeros((rows, d), dtype=torch.float32, device=table.device)
    if s and idx.numel() and d:
        _bag_weight_grad[(s,)](idx, w, off, table, grad_out, grad_w, d)
        _bag_table_grad_atomic[_by_bags_and_columns(s, d)](idx, w, off, grad_out, grad_table, d)
    return grad_w.view(weights.shape).to(weights.dtype), grad_table.to(table.dtype)


@embedding_bag_triton_backward.register_fake
def _(grad_out, indices, weights, table, offsets=None):
    return weights.new_empty(weights.shape), table.new_empty(table.shape)


@torch.library.custom_op("lingua_mem::bag_rows_backward_triton", mutates_args=("grad_rows",))
def bag_rows_backward_triton(grad_out: torch.Tensor, reads: torch.Tensor, weights: torch.Tensor,
                             bags: torch.Tensor, order: torch.Tensor, segments: torch.Tensor,
                             table: torch.Tensor, slot_of_row: torch.Tensor, grad_rows: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """A routed table's bags' backward, one program per segment of one row's reads.

    grad_out (S, D) the bags' gradients; reads, weights, bags (K,): each read's shard row,
    weight and bag; order (K,) the reads sorted by row; segments (G + 1,) where each segment of
    `order` starts (a segment: at most SEGMENT_READS reads of one row); table (R, D) the shard
    as stored; slot_of_row (R,) each row's place in grad_rows (C, D) fp32, to which
    scale * sum(weight x bag gradient) is added. Returns the weights' gradient (K,) fp32."""
    grad_w = torch.empty(reads.shape, dtype=torch.float32, device=reads.device)
    g, d = segments.numel() - 1, table.shape[1]
    if g > 0 and d:
        _bag_rows_backward[(g,)](order, segments, reads, bags, weights, grad_out.contiguous(),
                                 table.contiguous(), slot_of_row, grad_rows, grad_w, scale, d,
                                 SEGMENT=SEGMENT_READS)
    return grad_w


@bag_rows_backward_triton.register_fake
def _(grad_out, reads, weights, bags, order, segments, table, slot_of_row, grad_rows, scale):
    return reads.new_empty(reads.shape, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    indices, weights, table, offsets, _ = inputs
    ctx.save_for_backward(indices, weights, table, offsets)


def _backward(ctx, grad_out):
    indices, weights, table, offsets = ctx.saved_tensors
    grad_w, grad_table = embedding_bag_triton_backward(grad_out, indices, weights, table, offsets)
    return None, grad_w, grad_table, None, None


embedding_bag_triton.register_autograd(_backward, setup_context=_setup_context)

# the outputs selective activation checkpointing keeps
SAVED_OPS = frozenset({torch.ops.lingua_mem.embedding_bag_triton.default})


# -- what each op moves through device memory (lingua_mem.plan.traffic counts it) -----------
# A program's own re-reads of a row count once; nothing is assumed cached across programs.

def _n(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _forward_traffic(args, kwargs, out):
    indices, weights, table = args[0], args[1], args[2]
    offsets = args[3] if len(args) > 3 else kwargs.get("offsets")
    k, row = indices.numel(), table.shape[1] * table.element_size()
    return k * row + _n(indices) + _n(weights) + _n(offsets), _n(out)


def _backward_traffic(args, kwargs, out):
    grad_out, indices, weights, table = args[0], args[1], args[2], args[3]
    k, (rows, d) = indices.numel(), table.shape
    grad_w, grad_table = out
    read = written = k * 4 + rows * d * 4  # grad_w and the fp32 table gradient, zeroed
    # the weights' gradient: each read's row and its bag's gradient (once a bag)
    read += k * d * table.element_size() + _n(grad_out) + 2 * _n(indices) + _n(weights)
    written += k * 4
    # fp32 atomics: each read's row of the gradient updated
    read += _n(grad_out) + _n(indices) + _n(weights) + k * d * 4
    written += k * d * 4
    if table.dtype != torch.float32:  # the fp32 gradient cast to the table's dtype
        read += rows * d * 4
        written += _n(grad_table)
    return read, written


def _rows_backward_traffic(args, kwargs, out):
    grad_out, reads, weights, bags, order, segments, table = args[:7]
    k, d, g = reads.numel(), table.shape[1], segments.numel() - 1
    # a segment: its reads' positions, bags and weights; its row (the segment's first read)
    # and slot; each read's bag gradient; the row once; its gradient added (atomics: read and
    # written) once a segment; each read's weight gradient written
    read = _n(order) + _n(segments) + k * (bags.element_size() + weights.element_size())
    read += g * (reads.element_size() + 4 + d * table.element_size() + d * 4)
    read += k * d * grad_out.element_size()
    written = g * d * 4 + k * 4
    return read, written


TRAFFIC = {torch.ops.lingua_mem.embedding_bag_triton.default: _forward_traffic,
           torch.ops.lingua_mem.embedding_bag_triton_backward.default: _backward_traffic,
           torch.ops.lingua_mem.bag_rows_backward_triton.default: _rows_backward_traffic}
