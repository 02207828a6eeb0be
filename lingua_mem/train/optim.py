"""AdamW with a dense group and a value-table group, lr schedules, clipping."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from lingua_mem.config import OptimConfig


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, values): the value tables' parameters apart from all others."""
    value_ids = {id(p) for t in model.value_tables() for p in t.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return ([p for p in params if id(p) not in value_ids],
            [p for p in params if id(p) in value_ids])


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, in groups: dense (weight decay on matrices only)
    and values (own lr and decay). A finetune mode may bring its own (finetune/modes.py)."""
    dense, values = split_params(model)
    groups = [
        {"name": "dense", "params": [p for p in dense if p.dim() >= 2],
         "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "dense_no_decay", "params": [p for p in dense if p.dim() < 2],
         "lr": cfg.lr, "weight_decay": 0.0},
        {"name": "values", "params": values, "lr": cfg.value_lr, "weight_decay": cfg.value_weight_decay},
    ]
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["peak_lr"] = g["lr"]
    return torch.optim.AdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of each group's peak lr at optimizer step `step` (1-based)."""
    if cfg.warmup > 0 and step <= cfg.warmup:
        return step / cfg.warmup
    if cfg.scheduler == "constant" or total <= cfg.warmup:
        return 1.0
    progress = min(1.0, (step - cfg.warmup) / (total - cfg.warmup))
    if cfg.scheduler == "linear":
        decay = 1.0 - progress
    else:  # cosine
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.lr_min_ratio + (1.0 - cfg.lr_min_ratio) * decay


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig):
    """LambdaLR over optimizer steps; its state_dict holds the step count."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i + 1, total_steps, cfg))


def clip_grads(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip to max_norm (0: measure only); returns the norm before clipping, as a
    tensor (no host sync until it is read). Sharded (DTensor) gradients count in full:
    the norm of a DTensor is reduced over its mesh, whatever its placements."""
    with_grad = [p for p in params if p.grad is not None]
    if not with_grad:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad])
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    if max_norm > 0:
        torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
    return norm
