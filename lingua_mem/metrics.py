"""Metrics out: <dump_dir>/metrics.jsonl, a console line with ETA, and W&B."""

from __future__ import annotations

import itertools
import json
import math
import secrets
from pathlib import Path

import torch

from lingua_mem.config import WandbConfig

# dense bf16 peak FLOP/s by device name (no sparsity)
# (first match wins: "H100 PCIe" before "H100")
BF16_PEAK_FLOPS = {"H200": 989e12, "GH200": 989e12, "H100 PCIe": 756e12, "H100": 989e12,
                   "A100": 312e12, "L40S": 362e12}


def bf16_peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak, or None when unknown (CPUs included)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in BF16_PEAK_FLOPS.items():
        if key in name:
            return peak
    return None


def _step_of(line: str) -> int | None:
    """The step of a metrics.jsonl row; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl (the JSON objects with an int "step"); other lines (one cut
    short by a kill) are skipped, and a missing file has none."""
    path = Path(path)
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
    return rows


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricLogger:
    """One JSON object per logged step; the same dict goes to the console and W&B."""

    def __init__(self, dump_dir: str | Path, total_steps: int, wandb_cfg: WandbConfig | None = None,
                 run_config: dict | None = None, console: bool = True, resume_step: int = 0):
        """A new run (resume_step 0) starts a new metrics.jsonl and W&B run; a run resumed
        from the checkpoint of `resume_step` keeps the rows up to it (later ones, logged
        after that checkpoint, are logged again) and continues the same W&B run."""
        dump_dir = Path(dump_dir)
        self.path = dump_dir / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.total_steps, self.console = total_steps, console
        kept = []
        if resume_step > 0 and self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
        elif self.path.exists() and self.path.stat().st_size:  # a fresh start: the old rows stay
            aside = next(p for k in itertools.count(1) if not (p := dump_dir / f"metrics.{k}.jsonl").exists())
            self.path.rename(aside)
            if console:
                print(f"a fresh start: the earlier metrics.jsonl of {dump_dir} is kept as {aside.name}",
                      flush=True)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(self.path)
        self.file = self.path.open("a")
        self.wandb_run = None
        if wandb_cfg is not None and wandb_cfg.enabled and wandb_cfg.mode != "disabled":
            import wandb

            id_file = dump_dir / "wandb_run_id"
            resuming = resume_step > 0 and id_file.exists()
            run_id = id_file.read_text().strip() if resuming else secrets.token_hex(4)  # not the seeded RNGs
            id_file.write_text(run_id + "\n")
            self.wandb_run = wandb.init(
                project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                group=wandb_cfg.group, tags=list(wandb_cfg.tags), mode=wandb_cfg.mode,
                dir=str(dump_dir), config=run_config, id=run_id, resume="allow" if resuming else None)

    def log(self, metrics: dict, seconds_per_step: float = float("nan")) -> None:
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "step"}, step=metrics["step"])
        if self.console:
            eta = format_duration((self.total_steps - metrics["step"]) * seconds_per_step)
            mfu = f" mfu {metrics['mfu']:.1%}" if "mfu" in metrics else ""
            rows = "finetune/rows_updated" in metrics  # sparse memory finetuning: the values alone train
            lr = f"vlr {metrics['value_lr']:.2e}" if rows else f"lr {metrics['lr']:.2e}"
            updated = f" | rows {metrics['finetune/rows_updated']:.0f}" if rows else ""
            print(f"step {metrics['step']:>6}/{self.total_steps} | loss {metrics['loss']:.4f} | "
                  f"{lr} | gnorm {metrics['grad_norm']:.3f} "
                  f"vnorm {metrics['value_grad_norm']:.3g}{updated} | "
                  f"{metrics['tokens_per_s']:,.0f} tok/s{mfu} | eta {eta}", flush=True)

    def log_eval(self, metrics: dict, seconds: float, samples: list[dict] = ()) -> None:
        """An evaluation's row ({"step", "tokens", "eval": true, "val/loss", ...}); generated
        samples ({"prompt", "completion"}) go to the console only."""
        self.file.write(json.dumps(metrics) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k not in ("step", "eval")},
                               step=metrics["step"])
        if self.console:
            parts = [f"eval {metrics['step']:>6}/{self.total_steps}"]
            if "val/loss" in metrics:
                parts.append(f"val loss {metrics['val/loss']:.4f} ppl {metrics['val/ppl']:.2f} "
                             f"bpb {metrics['val/bits_per_byte']:.3f}")
            if "facts_qa/recall/exact_match" in metrics:  # asked as trained: stored?
                parts.append(f"facts recall EM {metrics['facts_qa/recall/exact_match']:.3f}")
            if "facts_qa/exact_match" in metrics:  # asked in new words
                parts.append(f"facts QA EM {metrics['facts_qa/exact_match']:.3f} "
                             f"F1 {metrics['facts_qa/f1']:.3f}")
            parts.append(f"{seconds:.1f}s")
            print(" | ".join(parts), flush=True)
            for sample in samples:
                print(f"  {sample['prompt']!r} -> {sample['completion']!r}", flush=True)

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None
