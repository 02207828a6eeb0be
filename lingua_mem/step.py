"""One step of the model: the loss of a batch (training and evaluation share it) and the
optimizer step. The same code runs on one process and on many: the model is always
parallelized (FSDP2 at every degree), so precision and gradient reduction are FSDP2's.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lingua_mem.config import OptimConfig
from lingua_mem.optim import clip_grads


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits (B, T, V), targets (B, T) -> mean loss over tokens, in fp32
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def forward_loss(model, batch: dict) -> torch.Tensor:
    """Mean next-token loss of {"inputs", "targets"} (B, T) on the model's device."""
    return cross_entropy(model(batch["inputs"]), batch["targets"])


def train_step(model, optimizer, micro_batches: list[dict], optim: OptimConfig, dense_params: list,
               value_params: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimizer step over this rank's micro-batches ({"inputs", "targets"} on the device).

    Gradients are reduced once, after the last micro-batch (FSDP2), and clipped once
    (dense and value tables apart). Returns tensors, read only when logged: (mean loss
    of the micro-batches, dense grad norm, value grad norm).
    """
    loss_sum = torch.zeros((), device=micro_batches[0]["inputs"].device)
    for i, batch in enumerate(micro_batches):
        if hasattr(model, "set_requires_gradient_sync"):  # FSDP2 (a plain reference model has none)
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)  # sync on the last one only
        loss = forward_loss(model, batch)
        (loss / len(micro_batches)).backward()
        loss_sum += loss.detach()
    grad_norm = clip_grads(dense_params, optim.clip)
    value_grad_norm = clip_grads(value_params, optim.value_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum / len(micro_batches), grad_norm, value_grad_norm
