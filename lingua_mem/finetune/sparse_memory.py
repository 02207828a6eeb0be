"""Sparse memory finetuning (finetune.mode=sparse_memory; Lin et al. 2025, "Continual
Learning via Sparse Memory Finetuning"): each step updates only the value rows its batch reads
much more than the pretraining data did; every other parameter is frozen.

Each optimizer step, on every process alike:
  1. the memory layers' reads during the step's micro-batches are counted per value table
     (memory.usage.RowReads) and summed over all processes: c_i for row i;
  2. the rows read are scored against the background usage (python -m lingua_mem.eval.usage:
     r_i reads, b_i of its B batches reading row i):
        tfidf   (c_i / sum c) * log((B + 1) / (b_i + 1))
        kl      p_i * log(p_i / q_i),  p = c / sum c,  q_i = (r_i + 1) / (sum r + n_values)
     (kl: row i's term of KL(p || q), the background add-one smoothed);
  3. the top finetune.top_t rows of positive score are selected (ties: the lower row), the
     same rows on every process, since every process scores the same summed counts;
  4. the tables' row gradients are dropped outside those rows (before clipping), and
     the optimizer (optim.MemoryAdamW, row-sparse) changes those rows only: plain SGD,
     or AdamW whose moments of the other rows stay as they are (lazy Adam, as
     torch.optim.SparseAdam: one step count per table). Weight decay
     (optim.value_weight_decay) touches the selected rows only too.
Frozen (requires_grad=False, set before parallelize): the dense weights, the memory layers'
keys, query, gate and output projections, every table row not selected.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from lingua_mem.config import FinetuneConfig
from lingua_mem.memory.usage import RowReads, Usage
from lingua_mem.optim import MemoryAdamW, build_memory_adamw


def freeze_all_but_values(model: nn.Module) -> None:
    """requires_grad=False on every parameter but the value tables' (on the built model,
    before parallelize: FSDP2 takes the flags as they are then)."""
    values = {id(p) for table in model.value_tables() for p in table.parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in values)


def score_rows(counts: torch.Tensor, usage: Usage, key: str, ranking: str) -> torch.Tensor:
    """counts (n_values,) int64: this step's reads -> scores (n_values,) float64 (0 where unread)."""
    c = counts.double()
    total = c.sum()
    if total == 0:
        return c
    p = c / total
    if ranking == "tfidf":
        df = usage.batches[key].to(c.device).double()
        return p * torch.log((usage.n_batches + 1) / (df + 1))
    background = usage.reads[key].to(c.device).double()
    q = (background + 1) / (background.sum() + background.numel())
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-300) / q), torch.zeros_like(p))


def select_rows(scores: torch.Tensor, top_t: int) -> torch.Tensor:
    """The (at most) top_t rows of positive score, highest first, ties to the lower row; int64."""
    order = torch.sort(-scores, stable=True).indices  # stable: equal scores keep row order
    order = order[:top_t]
    return order[scores[order] > 0]


def local_rows(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The global `rows` of a (possibly row-sharded DTensor) table that this process holds,
    as indices into its local shard."""
    if not isinstance(param, DTensor):
        return rows
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    rows = rows.to(param.device)
    mine = (rows >= offset[0]) & (rows < offset[0] + shape[0])
    return rows[mine] - offset[0]


def build_sparse_optimizer(model: nn.Module, finetune: FinetuneConfig, optim) -> MemoryAdamW:
    """One group, "values": the selected rows of the tables at optim.value_lr (its schedule
    applies), by finetune.optimizer: sgd, or adamw on those rows (lazy AdamW)."""
    params = [t.weight for t in model.value_tables()]
    row_update = "lazy_adamw" if finetune.optimizer == "adamw" else "sgd"
    group = {"name": "values", "params": params, "lr": optim.value_lr,
             "weight_decay": optim.value_weight_decay, "row_update": row_update}
    return build_memory_adamw([group], optim)


class SparseMemoryFinetune:
    """The per-step row selection of a run (see the module's docstring).

        with finetune.counting():
            train_step(..., after_backward=finetune.after_backward)
    """

    def __init__(self, model: nn.Module, cfg: FinetuneConfig, usage: Usage, optimizer: MemoryAdamW):
        self.model, self.cfg, self.usage, self.optimizer = model, cfg, usage, optimizer
        self.reads = RowReads(model).__enter__()  # hooks for the whole run; counting only in counting()
        self.reads.enabled = False
        self.rows: dict[str, torch.Tensor] = {}  # key -> the last step's selected rows (global)
        self.stats: dict[str, float] = {}

    def close(self) -> None:
        self.reads.__exit__()

    def describe(self) -> str:
        """One line for the console: what is selected, against what, by which optimizer."""
        cfg, usage = self.cfg, self.usage
        return (f"sparse memory finetuning: the top {cfg.top_t} rows per step by {cfg.ranking} against "
                f"{usage.n_batches} background batches ({usage.tokens:,} tokens, step "
                f"{usage.meta.get('step')}), {cfg.optimizer}; everything else frozen")

    @contextmanager
    def counting(self):
        """Count the reads of the forwards inside (a training step's, not an evaluation's)."""
        self.reads.enabled = True
        try:
            yield
        finally:
            self.reads.enabled = False

    @torch.no_grad()
    def after_backward(self) -> None:
        """Select this step's rows (a collective: the counts are summed over all processes)
        and keep the tables' row gradients of those rows only."""
        counts = self.reads.take(reduce=True)
        read = updated = 0
        for key, c in counts.items():
            rows = select_rows(score_rows(c, self.usage, key, self.cfg.ranking), self.cfg.top_t)
            self.rows[key] = rows
            read, updated = read + int((c > 0).sum()), updated + rows.numel()
            param = self.model.values[key].weight
            row_grad = self.optimizer.row_grads.get(id(param))
            if row_grad is not None:
                keep = torch.isin(row_grad[0], local_rows(param, rows))
                self.optimizer.set_row_grad(param, (row_grad[0][keep], row_grad[1][keep]))
        self.stats = {"finetune/rows_read": float(read), "finetune/rows_updated": float(updated)}

