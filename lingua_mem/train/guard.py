"""The divergence guard: the first step whose loss or gradient norm was not finite is kept
on the device (a healthy step never waits for it) and checked, over all ranks, only when a
step is logged or checkpointed; no checkpoint is ever written of non-finite state."""

from __future__ import annotations

import torch
import torch.distributed as dist

from lingua_mem.checkpoint.records import complete_checkpoints
from lingua_mem.train.step import StepResult, TrainingDiverged, state_is_finite


class DivergenceGuard:
    def __init__(self, checkpointer, skip_nonfinite: bool, device: torch.device):
        self.checkpointer = checkpointer
        self.skip_nonfinite = skip_nonfinite
        self.first_nonfinite = torch.zeros((), dtype=torch.int64, device=device)  # 0: none
        self.skipped_steps = 0

    def observe(self, step: int, result: StepResult) -> None:
        self.skipped_steps += result.skipped
        if not result.skipped:
            self.first_nonfinite = torch.where((self.first_nonfinite == 0) & ~result.finite, step,
                                               self.first_nonfinite)

    def check(self) -> None:
        """TrainingDiverged naming the first step (over all ranks) whose loss or gradient norm
        was not finite, if any: one host sync."""
        never = torch.iinfo(torch.int64).max
        first = torch.where(self.first_nonfinite == 0, never, self.first_nonfinite)
        dist.all_reduce(first, op=dist.ReduceOp.MIN)
        if first.item() != never:
            raise TrainingDiverged(f"training diverged: non-finite loss or gradient norm at step "
                                   f"{first.item()}; {self._newest_checkpoint()}")

    def check_state(self, model, optimizer, step: int) -> None:
        """Before a checkpoint: every weight and optimizer state finite on every rank."""
        if not state_is_finite(model, optimizer):
            raise TrainingDiverged(f"training diverged: non-finite weights or optimizer state after "
                                   f"step {step}; {self._newest_checkpoint()}")

    def row(self) -> dict:
        return {"skipped_steps": self.skipped_steps} if self.skip_nonfinite else {}

    def _newest_checkpoint(self) -> str:
        self.checkpointer.wait()  # an async save of finite weights still counts
        done = complete_checkpoints(self.checkpointer.dump_dir)
        kept = (f"the newest checkpoint, {done[-1]}, is from before it" if done
                else "no checkpoint was written")
        return f"{kept}; lower optim.lr, or set optim.skip_nonfinite=true to skip such steps"
