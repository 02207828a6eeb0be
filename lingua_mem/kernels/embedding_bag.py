"""Weighted embedding bag: the value gathering of a memory layer.

    out[n] = sum_m weights[n, m] * table[indices[n, m]]

indices (N, M) int64, weights (N, M) float, table (R, D) -> out (N, D); or ragged bags:
indices and weights flat (K,) with `offsets` (S + 1,), bag s reading positions
offsets[s] .. offsets[s + 1] -> out (S, D).
Gradients flow to both `table` and `weights`.

`embedding_bag` is the one entry point; `kernel` picks the implementation:
torch (F.embedding_bag, any device), triton (kernels/triton_bag.py: compiled on
CUDA, interpreted on the CPU under TRITON_INTERPRET=1) or auto (triton on CUDA
when triton is installed, else torch).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sysconfig
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from lingua_mem.errors import ConfigError

KERNELS = ("auto", "torch", "triton")

# the ops of this kernel whose outputs selective activation checkpointing keeps
SAVED_OPS = frozenset({torch.ops.aten._embedding_bag.default})


def embedding_bag_torch(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                        offsets: torch.Tensor | None = None,
                        dtype: torch.dtype | None = None) -> torch.Tensor:
    """PyTorch path, any device.

    Built on F.embedding_bag(mode="sum", per_sample_weights=...): its backward
    accumulates the table gradient row by row (index_add style) and computes the
    weight gradients as per-row dot products, so no (N, M, D) tensor is ever
    materialised, unlike `(weights[..., None] * table[indices]).sum(1)`.
    The bag is computed in the table's dtype; the result is returned in `dtype` (None: the table's).
    """
    if offsets is not None:
        if indices.dim() != 1 or weights.shape != indices.shape:
            raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and weights "
                             f"{tuple(weights.shape)} must both be (K,) with offsets")
        out = F.embedding_bag(indices, table, offsets, per_sample_weights=weights.to(table.dtype),
                              mode="sum", include_last_offset=True)
    else:
        if indices.dim() != 2 or weights.shape != indices.shape:
            raise ValueError(f"embedding_bag: indices {tuple(indices.shape)} and weights "
                             f"{tuple(weights.shape)} must both be (N, M)")
        out = F.embedding_bag(indices, table, per_sample_weights=weights.to(table.dtype), mode="sum")
    return out if dtype is None else out.to(dtype)


def embedding_bag_backward(grad_out: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor,
                           table: torch.Tensor, kernel: str = "torch", offsets: torch.Tensor | None = None,
                           weights_grad: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The bag's gradients without autograd: (grad_weights in the weights' shape and dtype,
    grad_table (R, D) in the table's dtype), for a caller that keeps a table's gradient itself
    (a routed value table's owner, whose `table` is the rows it was asked: never table-sized).
    Bags as in `embedding_bag`. `weights_grad=False`: the torch path skips the weights'
    gradient (None; the Triton op computes both)."""
    if _runs_triton(kernel, table):
        from lingua_mem.kernels.triton_bag import embedding_bag_triton_backward

        return embedding_bag_triton_backward(grad_out, indices, weights, table, offsets)
    flat, w = indices.flatten(), weights.flatten().to(table.dtype)
    if offsets is None:
        n, m = indices.shape
        starts = torch.arange(0, n * m, m, device=flat.device)
        bag = torch.arange(flat.numel(), device=flat.device) // m  # (K,) each read's bag
        sizes = torch.full((n,), m, device=flat.device)
    else:
        starts, sizes = offsets[:-1], offsets.diff()
        bag = torch.repeat_interleave(torch.arange(sizes.numel(), device=flat.device), sizes,
                                      output_size=flat.numel())
    grad_out = grad_out.to(table.dtype).contiguous()
    # the two backward ops autograd runs for F.embedding_bag(mode="sum"), called directly
    grad_table = torch.ops.aten._embedding_bag_dense_backward(
        grad_out, flat, bag, sizes, flat.new_empty(0), table.shape[0], False, 0, w, -1)
    if not weights_grad:
        return None, grad_table
    grad_w = torch.ops.aten._embedding_bag_per_sample_weights_backward(
        grad_out, table, flat, starts, bag, 0, -1)
    return grad_w.view(weights.shape).to(weights.dtype), grad_table


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_problem(device: torch.device | str) -> str | None:
    """Why Triton's kernels cannot run on `device`, in one line; None when they can. Not
    installed, or a one-launch probe (a tiny bag: compiled, its launcher built, launched)
    fails there: Triton builds each kernel's launcher with a C compiler against Python.h, and
    an image without them fails at the first launch, which would be a training run's step 1."""
    if not triton_available():
        return "triton is not installed (pip install triton, or the gpu extra)"
    try:
        from lingua_mem.kernels.triton_bag import embedding_bag_triton

        indices = torch.zeros(1, 1, dtype=torch.int64, device=device)
        out = embedding_bag_triton(indices, torch.ones(1, 1, device=device), torch.ones(2, 8, device=device))
        out.sum().item()  # the launch done
    except Exception as exc:  # noqa: BLE001 - whatever stops the kernel: no compiler, no driver, ...
        compiler = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
        header = Path(sysconfig.get_paths()["include"]) / "Python.h"
        missing = [m for m, ok in (("a C compiler", compiler), (f"{header}", header.exists())) if not ok]
        why = f" ({' and '.join(missing)} missing)" if missing else ""
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
        return f"triton cannot run on {torch.device(device).type}{why}: {first[:200]}"
    return None


@functools.cache
def triton_problem_on(device_type: str) -> str | None:
    """triton_problem, probed once a process (CUDA: its current device)."""
    return triton_problem(device_type)


def choose_kernel(kernel: str, device_type: str, problem: str | None) -> str:
    """torch or triton for memory.kernel on a device, given what stops Triton there (`problem`,
    None if nothing): auto is triton on CUDA when it runs (else torch, with one warning line
    when triton is installed but cannot run); an explicit triton that cannot run is one
    ConfigError line."""
    if kernel == "auto":
        if device_type != "cuda" or not triton_available():
            return "torch"
        if problem is not None:  # shown once a process (the default warning filter)
            warnings.warn(f"memory.kernel=auto: {problem}; using the torch kernel", stacklevel=2)
            return "torch"
        return "triton"
    if kernel == "triton" and problem is not None:
        raise ConfigError(f"memory.kernel: {problem}")
    return kernel


def resolve_kernel(kernel: str, device_type: str) -> str:
    """torch or triton for memory.kernel on a device (choose_kernel; Triton probed once, on
    CUDA); off CUDA triton runs only in Triton's interpreter (TRITON_INTERPRET=1: tests)."""
    if kernel == "triton" and not triton_available():
        raise ConfigError("memory.kernel: triton is not installed (pip install triton, or the gpu extra)")
    if kernel == "triton" and device_type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError(f"memory.kernel: triton on {device_type} runs only in Triton's interpreter: "
                              "set TRITON_INTERPRET=1 (slow: for tests), or use memory.kernel=torch")
        return "triton"
    probe = device_type == "cuda" and kernel in ("auto", "triton") and triton_available()
    return choose_kernel(kernel, device_type, triton_problem_on(device_type) if probe else None)


def _runs_triton(kernel: str, table: torch.Tensor) -> bool:
    return kernel == "triton" or (kernel == "auto" and resolve_kernel(kernel, table.device.type) == "triton")


def embedding_bag(indices: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                  kernel: str = "torch", offsets: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Weighted sum of table rows per bag: (N, M), (N, M), (R, D) -> (N, D); with offsets
    (S + 1,): (K,), (K,), (R, D) -> (S, D). In `dtype` (None: the table's); the rows are read
    as the table stores them (Triton casts them in the kernel)."""
    if _runs_triton(kernel, table):
        from lingua_mem.kernels.triton_bag import embedding_bag_triton

        return embedding_bag_triton(indices, weights, table, offsets, dtype)
    return embedding_bag_torch(indices, weights, table, offsets, dtype)


def bag_rows_backward(grad_out: torch.Tensor, reads: torch.Tensor, weights: torch.Tensor, table: torch.Tensor,
                      rows: torch.Tensor, slots: torch.Tensor, order: torch.Tensor | None,
                      segments: torch.Tensor | None, slot_of_row: torch.Tensor, grad_rows: torch.Tensor,
                      scale: float = 1.0, kernel: str = "torch",
                      offsets: torch.Tensor | None = None) -> torch.Tensor:
    """The backward of a routed table's bags at the rows' owner, where `table` is its shard as
    stored (never copied): the weights' gradient, returned (weights' shape, fp32), and the rows'
    gradient, scale * sum over a row's reads of weight x bag gradient, added in fp32 into
    `grad_rows` (C, D) at slot_of_row[row].

    reads, weights: (N, M) bags or flat (K,) with offsets, reads being shard rows; rows (U,) the
    distinct rows read and slots (reads' shape) each read's place among them; order (K,) the
    reads sorted by row and segments (G + 1,) their cut into runs of at most SEGMENT_READS
    reads of one row (triton_bag.SEGMENT_READS: the Triton kernel's programs; the torch path
    needs neither)."""
    flat, w = reads.flatten(), weights.flatten()
    if offsets is None:
        n, m = reads.shape
        bag = torch.arange(flat.numel(), device=flat.device) // m  # (K,) each read's bag
        starts = torch.arange(0, n * m, m, device=flat.device)
        sizes = torch.full((n,), m, device=flat.device)
    else:
        starts, sizes = offsets[:-1], offsets.diff()
        bag = torch.repeat_interleave(torch.arange(sizes.numel(), device=flat.device), sizes,
                                      output_size=flat.numel())
    if _runs_triton(kernel, table):
        from lingua_mem.kernels.triton_bag import bag_rows_backward_triton

        grad_w = bag_rows_backward_triton(grad_out, flat, w, bag, order, segments, table, slot_of_row,
                                          grad_rows, scale)
        return grad_w.view(weights.shape)
    grad = grad_out.to(table.dtype).contiguous()
    grad_w = torch.ops.aten._embedding_bag_per_sample_weights_backward(grad, table, flat, starts, bag, 0, -1)
    # the distinct rows' gradients (U, D): the reads as indices into them
    grad_u = torch.ops.aten._embedding_bag_dense_backward(
        grad, slots.flatten(), bag, sizes, flat.new_empty(0), rows.numel(), False, 0, w.to(table.dtype), -1)
    grad_rows.index_add_(0, slot_of_row[rows].long(), grad_u.float(), alpha=scale)
    return grad_w.view(weights.shape).float()
