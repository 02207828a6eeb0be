"""What every process of a run does the same way, whatever command it runs: the device,
the seeds, work done on rank 0 alone with its outcome agreed by all ranks, and the few
collectives that library code (evaluation, the finite check) calls whether or not its caller
started a process group: without one, or at world size 1, each is the one-process result."""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from lingua_mem.cli import one_line
from lingua_mem.errors import ConfigError


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """distributed.device (auto|cuda|cpu) as this process's device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distributed.device: cuda requested but no GPU is available")
    return torch.device("cuda", local_rank) if name == "cuda" else torch.device(name)


def prepare_cuda(device_type: str, tf32: bool, environ=os.environ) -> None:
    """What a training process sets before its first CUDA allocation (nothing off CUDA): the
    caching allocator's expandable segments, unless the user configured the allocator
    (PYTORCH_CUDA_ALLOC_CONF or PYTORCH_ALLOC_CONF): a step's buffers change size from step to
    step (the routed reads' rows and bags), which fragments fixed segments; and TF32 for fp32
    matmuls when `tf32` (distributed.tf32), set through torch.set_float32_matmul_precision."""
    if device_type != "cuda":
        return
    if "PYTORCH_CUDA_ALLOC_CONF" not in environ and "PYTORCH_ALLOC_CONF" not in environ:
        environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    # the API every library reads (Inductor's autotuning, transformers, lm-eval read
    # allow_tf32 or get_float32_matmul_precision(): after the newer fp32_precision setter, any
    # such read raises "mix of the legacy and new APIs")
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def make_deterministic(environ=os.environ) -> None:
    """distributed.deterministic: torch's deterministic kernels (an op without one raises),
    and cuBLAS's fixed workspace (set before cuBLAS starts: with prepare_cuda)."""
    environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`tensor` reduced in place over every rank (nothing to do on one); returned."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def gather(obj) -> list:
    """obj of every rank, in rank order (a one-element list on one process)."""
    size = world()[1]
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out


def agree(value, is_main: bool):
    """Rank 0's `value` on every rank (a broadcast; any picklable object)."""
    box = [value if is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def first_error(error: str | None) -> str | None:
    """The first error any rank reports, on every rank (an all-gather); without a process
    group (a plain one-process tool) the error as it is."""
    return next((e for e in gather(error) if e), None)


def on_rank_0(fn, is_main: bool):
    """fn() on rank 0; whatever it raises is raised on every rank as a one-line ConfigError
    (no rank is left waiting in the broadcast). fn's result on rank 0."""
    result, error = None, None
    if is_main:
        try:
            result = fn()
        except ConfigError as exc:
            error = str(exc)
        except Exception as exc:  # an OSError on the dump dir and the like
            error = f"dump_dir: {one_line(f'{type(exc).__name__}: {exc}')}"
    error = agree(error, is_main)
    if error is not None:
        raise ConfigError(error)
    return result
