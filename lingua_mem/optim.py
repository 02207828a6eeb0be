"""AdamW with a dense group and a value-table group, lr schedules, clipping."""

from __future__ import annotations

import logging
import math

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from lingua_mem.config import OptimConfig
from lingua_mem.parallel.runtime import all_reduce


def split_params(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(dense, values): the value tables' parameters apart from all others."""
    value_ids = {id(p) for t in model.value_tables() for p in t.parameters()}
    params = [p for p in model.parameters() if p.requires_grad]
    return ([p for p in params if id(p) not in value_ids],
            [p for p in params if id(p) in value_ids])


class MemoryAdamW(torch.optim.AdamW):
    """AdamW, except for groups with a `row_update`: those parameters (value tables) are
    updated only in the rows their step read, from row gradients handed over with
    `set_row_grad` (their `.grad` is not used). Row updates, for a table's local shard:
        sgd          w[r] -= lr * g[r]
        lazy_adamw   AdamW on rows r only: their moments, decay and update; the other rows'
                     moments stay as they are (lazy Adam, as torch.optim.SparseAdam); bias
                     correction by the table's step count
        adagrad      row-wise Adagrad: s[r] += mean over the row's columns of g[r]^2 (one fp32
                     accumulator per row), w[r] -= lr * g[r] / (sqrt(s[r]) + eps)
    Weight decay (decoupled, the group's) applies to the rows read only. The state keys are
    AdamW's (step, exp_avg, exp_avg_sq) for lazy_adamw and sgd's none, (step, sum) for
    adagrad. A row-sparse group's state exists from the first step (or DCP's state-initialising
    one), read or not."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.row_grads: dict[int, tuple[torch.Tensor, torch.Tensor] | None] = {}  # id(param) -> (rows, grads)

    def updates_rows(self, param: torch.Tensor) -> bool:
        return any(g.get("row_update") and any(p is param for p in g["params"]) for g in self.param_groups)

    def set_row_grad(self, param: torch.Tensor,
                     row_grad: tuple[torch.Tensor | None, torch.Tensor] | None) -> None:
        """The step's gradient of `param`'s local shard: (local rows (K,), gradients (K, cols)),
        or (None, the shard's gradient) for a group updated over every row."""
        self.row_grads[id(param)] = row_grad

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self.row_grads.clear()

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if group.get("row_update"):
                    p.grad = None  # rows only (DCP's state-initialising step sets zeros here)
                    self._update_rows(p, group, self.row_grads.pop(id(p), None))
                elif id(p) in self.row_grads:  # AdamW over every row: the rows as a dense gradient
                    p.grad = _dense(p, self.row_grads.pop(id(p)))
        return super().step(closure)

    def _update_rows(self, p: torch.Tensor, group: dict, row_grad) -> None:
        kind, lr, decay, eps = group["row_update"], group["lr"], group["weight_decay"], group["eps"]
        state = self.state[p]
        if not state and kind != "sgd":
            state["step"] = torch.zeros((), dtype=torch.float32)
            if kind == "lazy_adamw":
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            else:  # one accumulator per row: (n_values,), rows sharded as the table's
                state["sum"] = _row_state_like(p)
        if row_grad is None or row_grad[0].numel() == 0:
            return
        rows, g = row_grad  # (K,), (K, cols); rows distinct
        w = _local(p)
        w_rows = w.index_select(0, rows)  # (K, cols): the rows are gathered once and written once
        if decay:
            w_rows.mul_(1 - lr * decay)
        if kind == "sgd":
            w.index_copy_(0, rows, w_rows.add_(g, alpha=-lr))
            return
        state["step"] += 1
        if kind == "lazy_adamw":
            beta1, beta2 = group["betas"]
            t = float(state["step"])
            m, v = _local(state["exp_avg"]), _local(state["exp_avg_sq"])
            m_rows = m.index_select(0, rows).lerp_(g, 1 - beta1)
            v_rows = v.index_select(0, rows).mul_(beta2).addcmul_(g, g, value=1 - beta2)
            m.index_copy_(0, rows, m_rows)
            v.index_copy_(0, rows, v_rows)
            denom = v_rows.div_(1 - beta2**t).sqrt_().add_(eps)
            w_rows.addcdiv_(m_rows, denom, value=-lr / (1 - beta1**t))
        else:  # row-wise adagrad
            s = _local(state["sum"])
            sq = (g * g).sum(dim=1)  # (K,): this shard's columns of each row
            if isinstance(p, DTensor) and p.device_mesh.size(1) > 1:  # the row's other columns
                dist.all_reduce(sq, group=p.device_mesh.get_group(1))  # same rows on every column shard
            s_rows = s.index_select(0, rows).add_(sq, alpha=1 / p.shape[1])
            s.index_copy_(0, rows, s_rows)
            w_rows.addcdiv_(g, s_rows.sqrt_().add_(eps)[:, None], value=-lr)
        w.index_copy_(0, rows, w_rows)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _dense(p: torch.Tensor, row_grad: tuple[torch.Tensor | None, torch.Tensor] | None) -> torch.Tensor:
    """A row gradient of `p`'s local shard as a dense gradient like `p`: a shard-shaped one
    (rows None) as it is, rows scattered into zeros (one buffer of the shard's size, made in
    the optimizer's step: not one per memory layer)."""
    if row_grad is not None and row_grad[0] is None:
        local = row_grad[1].to(_local(p).dtype)
        if not isinstance(p, DTensor):
            return local
        return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                  stride=p.stride())
    grad = torch.zeros_like(p)
    if row_grad is not None:
        _local(grad)[row_grad[0]] = row_grad[1].to(grad.dtype)
    return grad


def _row_state_like(p: torch.Tensor) -> torch.Tensor:
    """Zeros of one value per row of `p`, sharded over rows as `p` is (replicated over its column shards)."""
    if not isinstance(p, DTensor):
        return torch.zeros(p.shape[0], dtype=torch.float32, device=p.device)
    local = p.to_local()
    placements = [Shard(0) if isinstance(pl, Shard) and pl.dim == 0 else Replicate() for pl in p.placements]
    return DTensor.from_local(torch.zeros(local.shape[0], dtype=torch.float32, device=local.device),
                              p.device_mesh, placements, run_check=False, shape=(p.shape[0],), stride=(1,))


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> MemoryAdamW:
    """AdamW over the trainable parameters, in groups: dense (weight decay on matrices only)
    and values (own lr and decay, and optim.value_optimizer: adamw over every row, or a
    row-sparse update of the rows read). A finetune mode may bring its own (finetune/modes.py)."""
    dense, values = split_params(model)
    row_update = None if cfg.value_optimizer == "adamw" else cfg.value_optimizer
    groups = [
        {"name": "dense", "params": [p for p in dense if p.dim() >= 2],
         "lr": cfg.lr, "weight_decay": cfg.weight_decay},
        {"name": "dense_no_decay", "params": [p for p in dense if p.dim() < 2],
         "lr": cfg.lr, "weight_decay": 0.0},
        {"name": "values", "params": values, "lr": cfg.value_lr, "weight_decay": cfg.value_weight_decay,
         "row_update": row_update},
    ]
    return build_memory_adamw(groups, cfg)


def build_memory_adamw(groups: list[dict], cfg: OptimConfig, fused: bool | None = None) -> MemoryAdamW:
    """`fused` (None: on CUDA): torch's fused AdamW kernel for the groups updated over every row,
    one pass over each parameter, its gradient and moments, where the default (foreach) makes
    about ten; the row-sparse groups' updates are MemoryAdamW's own either way."""
    groups = [g for g in groups if g["params"]]
    for g in groups:
        g["peak_lr"] = g["lr"]
    if fused is None:
        fused = bool(groups) and _local(groups[0]["params"][0]).device.type == "cuda"
    return MemoryAdamW(groups, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None)


def hand_over_value_grads(model: nn.Module, optimizer: MemoryAdamW) -> None:
    """Once a step's backward is done: each routed table's row gradients (summed over its
    reads, parallel/memory_parallel.py) to the optimizer, which clips them as rows and
    updates the rows (a row-sparse group) or every row (AdamW, from them made dense in its
    step). Tables of a model that is not parallelized keep the dense `.grad` autograd gave
    them, or, for a row-sparse update, hand over its nonzero rows."""
    for table in model.value_tables():
        p = table.weight
        if hasattr(table, "take_row_grad") and p.requires_grad:
            # AdamW over every row takes a shard-shaped gradient (no scatter into one)
            optimizer.set_row_grad(p, table.take_row_grad(dense=not optimizer.updates_rows(p)))
        elif p.grad is not None and optimizer.updates_rows(p):
            rows = p.grad.abs().sum(dim=1).nonzero().flatten()  # a plain table: the rows with a gradient
            optimizer.set_row_grad(p, (rows, p.grad[rows]))
            p.grad = None


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


def clip_grads(params: list[nn.Parameter], max_norm: float,
               optimizer: MemoryAdamW | None = None) -> torch.Tensor:
    """Clip to max_norm (0: measure only); returns the norm before clipping, as a
    tensor (no host sync until it is read). Sharded (DTensor) gradients count in full:
    the norm of a DTensor is reduced over its mesh, whatever its placements. Row gradients
    the optimizer holds for `params` (MemoryAdamW.set_row_grad) count and are clipped too:
    each (row, column) is held by one rank, so their squares add up over the world."""
    with_grad = [p for p in params if p.grad is not None]
    row_grads = [] if optimizer is None else [optimizer.row_grads.get(id(p)) for p in params]
    row_grads = [g for _, g in filter(None, row_grads)]
    if not with_grad and not row_grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm([p.grad for p in with_grad]) if with_grad else None
    if isinstance(norm, DTensor):
        # a scalar over a 2-D memory mesh: torch 2.11 warns on every step that it takes two
        # all-reduces (one per mesh dim); for one scalar that costs nothing worth a line
        redistribute_log = logging.getLogger("torch.distributed.tensor._redistribute")
        level = redistribute_log.level
        redistribute_log.setLevel(logging.ERROR)
        try:
            norm = norm.full_tensor()
        finally:
            redistribute_log.setLevel(level)
    if row_grads:
        squares = all_reduce(sum(torch.linalg.vector_norm(g) ** 2 for g in row_grads))
        norm = squares.sqrt() if norm is None else (norm**2 + squares.to(norm.device)).sqrt()
    if max_norm > 0:
        if with_grad:
            torch.nn.utils.clip_grads_with_norm_(with_grad, max_norm, norm)
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for g in row_grads:
            g.mul_(scale.to(g.device))
    return norm
