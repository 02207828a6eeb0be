"""The plan's predicted peak memory against a real step's torch.cuda.max_memory_allocated.

    python benchmarks/plan_vs_measured.py [--device cuda|cpu] [--steps 3] [--out FILE.json]

For configs/debug.yaml and configs/memory_134m.yaml (each also with selective activation
checkpointing) on one GPU: `python -m lingua_mem.plan ... format=json` in a subprocess (its
fake process group must not meet this process's real one), then the same step for real
(build, parallelize, AdamW, train_step on random tokens, causal attention as the plan), its
peak over the steps after the first. The aim (issue 18): within 15%. --device cpu rehearses
the script with tiny shapes (no allocator statistics there: measured is left empty).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from lingua_mem.config import load_config, model_args  # noqa: E402
from lingua_mem.model.llama import build_model  # noqa: E402
from lingua_mem.optim import build_optimizer, split_params  # noqa: E402
from lingua_mem.parallel import init_distributed, parallelize  # noqa: E402
from lingua_mem.train.step import train_step  # noqa: E402

CASES = {
    "debug": ["config=configs/debug.yaml", "distributed.compute_dtype=bf16"],
    "debug selective": ["config=configs/debug.yaml", "distributed.compute_dtype=bf16",
                        "distributed.activation_checkpointing=selective"],
    "memory_134m": ["config=configs/memory_134m.yaml"],
    "memory_134m selective": ["config=configs/memory_134m.yaml",
                              "distributed.activation_checkpointing=selective"],
}
TINY = ["data.batch_size=2", "data.seq_len=64", "model.max_seq_len=64", "memory.n_keys=64"]  # --device cpu


def planned_peak(items: list[str]) -> int:
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.plan", *items, "nodes=1", "gpus_per_node=1",
                           "format=json", "suggest=false"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode not in (0, 1):
        raise SystemExit(f"plan failed: {proc.stderr.strip().splitlines()[-1]}")
    return json.loads(proc.stdout)["peak"]


def measured_peak(items: list[str], device: str, steps: int) -> int | None:
    cfg = load_config(items + ["model.attention=causal"])
    meshes = init_distributed(cfg.distributed, device)
    model = optimizer = None
    try:
        model = build_model(model_args(cfg.model, cfg.memory, cfg.moe), "meta", kernel=cfg.memory.kernel)
        parallelize(model, meshes, cfg.distributed, cfg.memory.value_compute_dtype)
        model.to_empty(device=device)
        model.init_weights(cfg.seed)
        optimizer = build_optimizer(model, cfg.optim)
        dense, values = split_params(model)
        shape = (cfg.data.batch_size, cfg.data.seq_len + 1)
        tokens = torch.randint(0, cfg.model.vocab_size, shape, device=device)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        for step in range(steps):
            if step == 1 and device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            train_step(model, optimizer, [batch], cfg.optim, dense, values)
        if device != "cuda":
            return None
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    finally:
        del model, optimizer
        meshes.close()
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for name, items in CASES.items():
        items = items + (TINY if args.device == "cpu" else [])
        predicted = planned_peak(items)
        measured = measured_peak(items, args.device, args.steps)
        ratio = predicted / measured if measured else None
        rows.append({"case": name, "predicted_gib": predicted / 2**30,
                     "measured_gib": measured / 2**30 if measured else None,
                     "predicted_over_measured": ratio})
        print(json.dumps(rows[-1]), flush=True)
    print("| case | predicted GiB | measured GiB | predicted / measured |\n|---|---|---|---|")
    for r in rows:
        m = f"{r['measured_gib']:.2f}" if r["measured_gib"] is not None else "n/a"
        q = f"{r['predicted_over_measured']:.2f}" if r["predicted_over_measured"] is not None else "n/a"
        print(f"| {r['case']} | {r['predicted_gib']:.2f} | {m} | {q} |")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
