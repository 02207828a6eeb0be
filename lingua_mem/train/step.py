"""One optimizer step of the model over a rank's micro-batches.
The same code runs on one process and on many: the model is always
parallelized (FSDP2 at every degree), so precision and gradient reduction are FSDP2's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from lingua_mem.cli import Stopped
from lingua_mem.config import OptimConfig
from lingua_mem.model.loss import forward_loss
from lingua_mem.optim import clip_grads, hand_over_value_grads
from lingua_mem.parallel.runtime import all_reduce


class TrainingDiverged(Stopped):
    """A non-finite loss, gradient norm, weight or optimizer state; the message names the step."""


class StepResult(NamedTuple):
    loss: torch.Tensor  # mean loss of this rank's micro-batches
    grad_norm: torch.Tensor  # of the dense parameters, before clipping
    value_grad_norm: torch.Tensor  # of the value tables
    finite: torch.Tensor  # bool: loss and both norms finite (read on the device, not here)
    skipped: bool  # optim.skip_nonfinite and not finite: no update was made


def train_step(model, optimizer, micro_batches: list[dict], optim: OptimConfig, dense_params: list,
               value_params: list, after_backward=None) -> StepResult:
    """One optimizer step over this rank's micro-batches ({"inputs", "targets"} on the device).

    Gradients are reduced once, after the last micro-batch (FSDP2), and clipped once
    (dense and value tables apart). The returned tensors are read only when logged; with
    `optim.skip_nonfinite` a step whose gradient norm is not finite makes no update (that
    costs one host sync per step: the norms are global, so every rank skips alike).
    `after_backward()`, if given, runs once the gradients are reduced, before clipping (sparse
    memory finetuning masks the value tables' gradients there).
    """
    loss_sum = torch.zeros((), device=micro_batches[0]["inputs"].device)
    for i, batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (a plain reference model has none)
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)  # sync on the last one only
        loss = forward_loss(model, batch)
        (loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    hand_over_value_grads(model, optimizer)  # the tables' row gradients, summed over their reads
    if after_backward is not None:
        after_backward()
    grad_norm = clip_grads(dense_params, optim.clip)
    value_grad_norm = clip_grads(value_params, optim.value_clip, optimizer)
    loss = loss_sum / len(micro_batches)
    finite = loss.isfinite() & grad_norm.isfinite() & value_grad_norm.isfinite()
    skipped = optim.skip_nonfinite and not bool(grad_norm.isfinite() & value_grad_norm.isfinite())
    if not skipped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, value_grad_norm, finite, skipped)


def state_is_finite(model, optimizer) -> bool:
    """Every weight and optimizer-state tensor finite, on every rank (a collective; one pass
    over this rank's shards, made before a checkpoint is written)."""
    local = lambda t: t.to_local() if isinstance(t, DTensor) else t  # noqa: E731
    tensors = [local(p).detach() for p in model.parameters()]
    tensors += [local(v) for state in optimizer.state.values() for v in state.values()
                if torch.is_tensor(v) and v.is_floating_point()]
    device = tensors[0].device  # the optimizer's step counts may live on the CPU
    finite = torch.stack([torch.isfinite(t).all().to(device) for t in tensors if t.numel()]).all()
    finite = finite.to(torch.int32)
    return bool(all_reduce(finite, dist.ReduceOp.MIN).item())
