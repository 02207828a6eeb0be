"""The smallest layout that fits, for every shipped config: the table in docs/scaling.md.

    python benchmarks/scale_plan.py [--gpu h100] [--configs configs/memory_8b.yaml ...] [--out FILE.md]

For each config, GPU counts 1, 2, 4, 8 (one node) then 16, 32, ... (nodes of 8) are tried in
turn; at each, activation checkpointing none, selective, full, and for each memory
parallelism 1, 2, 4, ... up to the GPU count: the first plan (lingua_mem.plan) whose peak
fits is the recommendation. A GPU count whose fp32 weights, gradients and AdamW moments
alone (16 bytes a parameter) cannot fit is skipped without a plan. Beside it, the paper's
layout at that GPU count (memory parallelism 8, no activation checkpointing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lingua_mem.config import (
    AC_MODES,  # noqa: E402
    load_config,  # noqa: E402
)
from lingua_mem.plan.estimate import make_plan  # noqa: E402
from lingua_mem.plan.hardware import GiB, accelerator  # noqa: E402
from lingua_mem.stats import config_stats  # noqa: E402

GPU_COUNTS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def layout_of(gpus: int) -> tuple[int, int]:
    return (1, gpus) if gpus <= 8 else (gpus // 8, 8)


def with_layout(cfg, mp: int, ac: str):
    return replace(cfg, distributed=replace(cfg.distributed, memory_parallel_size=mp,
                                            activation_checkpointing=ac, dp_shard=-1))


def smallest_fit(cfg, gpu: str):
    total = config_stats(cfg)["total_params"]
    budget = accelerator(gpu).memory_bytes * 0.9
    v_dim = cfg.memory.v_dim or cfg.model.dim
    tried = 0
    for gpus in GPU_COUNTS:
        if total * 16 / gpus > budget:
            continue
        nodes, per_node = layout_of(gpus)
        mps = [m for m in (1, 2, 4, 8, 16, 32, 64, 128, 256) if m <= gpus and v_dim % m == 0]
        for ac in AC_MODES:
            for mp in (mps if cfg.memory.layers else [1]):
                plan = make_plan(with_layout(cfg, mp, ac), nodes, per_node, gpu)
                tried += 1
                if plan.fits:
                    return plan, tried
    return None, tried


def row(plan) -> dict:
    s, b = plan.step, plan.bound_seconds()
    d = plan.cfg.distributed
    return {
        "config": plan.name, "gpus": plan.world, "nodes": plan.nodes,
        "mp": d.memory_parallel_size, "dp_shard": plan.world // d.dp_replicate,
        "ac": d.activation_checkpointing,
        "micro_batch": f"{plan.cfg.data.batch_size} x {plan.cfg.data.seq_len}",
        "states_gib": plan.states / GiB, "activations_gib": s.activations / GiB, "peak_gib": s.peak / GiB,
        "bound": max(b, key=b.get), "step_s": plan.step_seconds,
        "tokens_per_s_per_gpu": plan.tokens_per_s_per_gpu,
    }


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gpu", default="h100")
    ap.add_argument("--configs", nargs="*", default=sorted(str(p) for p in Path("configs").glob("*.yaml")))
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for path in args.configs:
        start = time.time()
        cfg = load_config([f"config={path}"])
        plan, tried = smallest_fit(cfg, args.gpu)
        if plan is None:
            print(f"{path}: nothing fits up to {GPU_COUNTS[-1]} GPUs ({tried} plans)", flush=True)
            continue
        r = row(plan)
        if cfg.memory.layers and plan.world % 8 == 0:  # the paper's layout at that GPU count
            paper = make_plan(with_layout(cfg, 8, "none"), plan.nodes, plan.gpus_per_node, args.gpu)
            r["paper_peak_gib"], r["paper_fits"] = paper.step.peak / GiB, paper.fits
        rows.append(r)
        print(json.dumps(r), f"({tried} plans, {time.time() - start:.0f} s)", flush=True)
    lines = ["| config | GPUs | mp | dp_shard | activation ckpt | micro-batch | states GiB | activations GiB "
             "| peak GiB | bound | step s (bound) | tokens/s/GPU (bound) "
             "| paper layout (mp 8, no ckpt) peak GiB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        paper = (f"{r['paper_peak_gib']:.1f} ({'fits' if r['paper_fits'] else 'does not fit'})"
                 if "paper_peak_gib" in r else "")
        lines.append(f"| {r['config']} | {r['gpus']} | {r['mp']} | {r['dp_shard']} | {r['ac']} "
                     f"| {r['micro_batch']} | {r['states_gib']:.1f} | {r['activations_gib']:.1f} "
                     f"| {r['peak_gib']:.1f} | {r['bound']} | {r['step_s']:.3f} "
                     f"| {r['tokens_per_s_per_gpu']:,.0f} | {paper} |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
