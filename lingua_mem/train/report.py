"""What a run says: the start-up lines, the logged row of a step (losses and bad-line counts
reduced over ranks, speed per rank and in all), the throughput window it is measured over,
and the closing line."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from lingua_mem.checkpoint.records import checkpoint_dir, complete_checkpoints
from lingua_mem.config import TrainConfig
from lingua_mem.metrics import bf16_peak_flops, format_duration


class TrainedCounts:
    """The tokens and training FLOPs of every step so far, added as steps are taken and
    checkpointed with the train state (not recomputed as step x batch: a resume with another
    number of processes or another batch keeps counting from what was trained)."""

    def __init__(self, tokens_per_step: int, flops_per_token: float):
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token  # global
        self.tokens, self.flops = 0, 0.0
        self.resumed_per_step = None  # the tokens a step of the checkpoint resumed from took

    def step(self) -> None:
        self.tokens += self.tokens_per_step
        self.flops += self.tokens_per_step * self.flops_per_token

    def state_dict(self) -> dict:
        return {"tokens": self.tokens, "flops": self.flops, "tokens_per_step": self.tokens_per_step}

    def load_state_dict(self, state: dict) -> None:
        self.tokens, self.flops = int(state["tokens"]), float(state["flops"])
        self.resumed_per_step = int(state["tokens_per_step"])

    def guess(self, step: int) -> None:
        """A checkpoint from before these counts were kept: step x this run's batch."""
        self.tokens = step * self.tokens_per_step
        self.flops = self.tokens * self.flops_per_token

    def change_line(self) -> str | None:
        """One line when the global batch differs from the resumed checkpoint's, else None."""
        if self.resumed_per_step in (None, self.tokens_per_step):
            return None
        return (f"warning: the global batch changed on resume: {self.resumed_per_step:,} tokens a step "
                f"before, {self.tokens_per_step:,} now (processes x grad_accum x batch_size x seq_len); the "
                f"token count goes on from {self.tokens:,}, and the LR schedule counts steps, not tokens")


class StepReport:
    def __init__(self, cfg: TrainConfig, dims, device: torch.device, stats: dict, loader,
                 counts: TrainedCounts):
        self.cfg, self.dims, self.device, self.stats, self.loader = cfg, dims, device, stats, loader
        self.counts = counts
        self.peak = bf16_peak_flops(device) if cfg.distributed.compute_dtype == "bf16" else None
        self.tokens_per_step = cfg.optim.grad_accum * cfg.data.batch_size * cfg.data.seq_len  # per rank
        self.started = time.perf_counter()
        self.window_start, self.window_steps = time.perf_counter(), 0

    def begin(self) -> None:
        """The first window opens as the loop starts."""
        self.window_start, self.window_steps = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        return step == 1 or step % self.cfg.log_every == 0 or step == self.cfg.steps

    def stepped(self) -> None:
        self.window_steps += 1

    def pause(self, seconds: float) -> None:
        """Time spent on something else (an evaluation) is not the steps'."""
        self.window_start += seconds

    def row(self, step: int, result, lrs: dict) -> tuple[dict, float]:
        """(the logged row, seconds per step) over the window since the last row; opens a new one."""
        seconds = time.perf_counter() - self.window_start
        tokens_per_s = self.window_steps * self.tokens_per_step / seconds
        row = self._reduce(step, result, lrs, tokens_per_s)
        seconds_per_step = seconds / self.window_steps
        self.window_start, self.window_steps = time.perf_counter(), 0
        return row, seconds_per_step

    def _reduce(self, step: int, result, lrs: dict, tokens_per_s: float) -> dict:
        dims, device, stats = self.dims, self.device, self.stats
        skipped = self.loader.skipped  # bad lines, per source
        # the mean loss and the totals (skipped, truncated) over all ranks, reduced on the device
        counts = torch.cat([result.loss.detach().double().view(1),
                            torch.tensor([*skipped.values(), self.loader.truncated], dtype=torch.float64,
                                         device=device)])
        dist.all_reduce(counts)
        counts = counts.tolist()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        row = {
            "step": step,
            "loss": counts[0] / dims.world_size,
            "lr": lrs.get("dense", 0.0),  # none: sparse memory finetuning trains the values only
            "value_lr": lrs.get("values", 0.0),
            "grad_norm": result.grad_norm.item(),
            "value_grad_norm": result.value_grad_norm.item(),
            "tokens": self.counts.tokens,
            "flops": self.counts.flops,
            "tokens_per_s": tokens_per_s * dims.world_size,
            "tokens_per_s_per_rank": tokens_per_s,
            "flops_per_token": stats["flops_per_token"],
        }
        if self.peak is not None:
            row["mfu"] = stats["flops_per_token"] * tokens_per_s / self.peak
        if device.type == "cuda":
            row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        for name, count in zip(skipped, counts[1:-1], strict=True):
            row[f"data/skipped/{name}"] = int(count)
        row["data/truncated"] = int(counts[-1])
        return row

    def startup(self, finetune_line: str | None, start: int) -> list[str]:
        cfg, dims, stats = self.cfg, self.dims, self.stats
        lines = [f"model: {stats['total_params']:,} params ({stats['memory_value_params']:,} in value "
                 f"tables, memory at layers {stats['memory_layers']}), device {self.device}, "
                 f"{dims.world_size} process(es) ({dist.get_backend_config()}): dp_replicate "
                 f"{dims.dp_replicate} x dp_shard {dims.dp_shard}, memory parallel {dims.mp}"]
        if finetune_line:
            lines.append(finetune_line)
        if start:
            lines.append(f"resumed from {checkpoint_dir(cfg.dump_dir, start)} ({self.counts.tokens:,} tokens "
                         "trained)")
            if (change := self.counts.change_line()) is not None:
                lines.append(change)
            if start >= cfg.steps:
                lines.append(f"nothing to train: the run is complete ({cfg.steps} steps); raise `steps` "
                             "or use another dump_dir")
        elif cfg.checkpoint.init_from:
            lines.append(f"started from the weights of {cfg.checkpoint.init_from}")
        return lines

    def summary(self, last: dict, start: int) -> str:
        """The closing line: what was trained, how long it took, where its outputs are."""
        cfg = self.cfg
        done = complete_checkpoints(cfg.dump_dir)
        saved = f"checkpoint {done[-1]}" if done else "no checkpoint (checkpoint.every=0)"
        resumed = f" (resumed at step {start})" if start else ""
        metrics = Path(cfg.dump_dir) / "metrics.jsonl"
        return (f"done: {last['step'] - start} steps{resumed} in "
                f"{format_duration(time.perf_counter() - self.started)}, final loss "
                f"{last['loss']:.4f}, {last['tokens']:,} tokens; {saved}; metrics {metrics}")
