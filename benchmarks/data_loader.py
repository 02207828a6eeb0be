"""Tokens/s of the data loader (read + tokenize + pack + batch), with and without prefetch.

    python benchmarks/data_loader.py [--people 20000] [--tokens 4000000] [--work-batches 100]
                                     [--step-ms 20] [--json rows.json]

Data: the synthetic facts corpus (generated into a temp dir), bytes tokenizer.
Batches of 16 x 256 tokens (configs/debug.yaml) and 8 x 4096 (the 134m..1.3b
configs). For each of data.prefetch = none / thread / process, a fresh loader
(after its first batch, so a process's start-up is not timed) is timed:
  - alone: the consumer only takes batches (--tokens of them) -> the loader's tokens/s
  - with simulated work per batch (--step-ms), as a training step would do:
      sleep   the CPU is free (a GPU step)
      matmul  torch matmuls on the consumer's cores (a CPU step)
    -> "wait": time spent inside next() per batch; prefetch should hide the loader's time.
The loader must make tokens at least 20x as fast as the debug model trains
(DEBUG_MODEL_TOK_S, docs/performance.md). About 45 s on 2 cores. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lingua_mem.config import DataConfig  # noqa: E402
from lingua_mem.data.facts import ensure_facts  # noqa: E402
from lingua_mem.data.loader import build_loader  # noqa: E402
from lingua_mem.data.tokenizer import BytesTokenizer  # noqa: E402

DEBUG_MODEL_TOK_S = 6_800  # debug model training tokens/s on the 2-core CPU (docs/performance.md)
REQUIRED_RATIO = 20


def matmul_work(step_s: float):
    """A function doing about `step_s` of matmuls, calibrated here (best of 5, after a warm-up)."""
    a = torch.randn(256, 256)
    per_mm = []
    for _ in range(6):
        start = time.perf_counter()
        for _ in range(100):
            torch.mm(a, a)
        per_mm.append((time.perf_counter() - start) / 100)
    n = max(1, round(step_s / min(per_mm[1:])))

    def work():
        for _ in range(n):
            torch.mm(a, a)

    return work


def run(cfg: DataConfig, dump_dir: str, batches: int, work) -> dict:
    """Time `batches` batches after the first: wall seconds, and seconds in next() and in the work."""
    loader = build_loader(cfg, BytesTokenizer(), dump_dir)
    next(loader)  # opens files; starts (and waits for) the producer
    if work is not None:
        work()  # the producer fills its queue during the first step, as in training
    wait = busy = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        t0 = time.perf_counter()
        next(loader)
        t1 = time.perf_counter()
        if work is not None:
            work()
        wait, busy = wait + t1 - t0, busy + time.perf_counter() - t1
    wall = time.perf_counter() - start
    loader.close()
    return {"wall_s": wall, "wait_s": wait, "work_s": busy}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--people", type=int, default=20_000, help="facts corpus size")
    p.add_argument("--shapes", default="16x256,8x4096", help="batch_size x seq_len, comma-separated")
    p.add_argument("--tokens", type=int, default=4_000_000, help="tokens timed with no work")
    p.add_argument("--work-batches", type=int, default=100, help="batches timed with simulated work")
    p.add_argument("--step-ms", type=float, default=20.0, help="simulated work per batch")
    p.add_argument("--depth", type=int, default=8, help="data.prefetch_depth")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]

    step_s = args.step_ms / 1e3
    works = {"none": None, "sleep": lambda: time.sleep(step_s), "matmul": matmul_work(step_s)}
    rows = []
    with tempfile.TemporaryDirectory() as dump_dir:
        t0 = time.perf_counter()
        ensure_facts(Path(dump_dir) / "data" / "facts", args.people, 0)  # where build_loader looks
        gen_s = time.perf_counter() - t0
        for batch_size, seq_len in shapes:
            base = DataConfig(batch_size=batch_size, seq_len=seq_len, prefetch_depth=args.depth)
            base.facts.people = args.people
            tokens = batch_size * seq_len
            for mode in ("none", "thread", "process"):
                for kind, work in works.items():
                    n = max(1, args.tokens // tokens) if work is None else args.work_batches
                    r = run(dataclasses.replace(base, prefetch=mode), dump_dir, n, work)
                    rows.append({"batch": f"{batch_size}x{seq_len}", "prefetch": mode,
                                 "work": "none" if work is None else kind,
                                 "work_ms": 1e3 * r["work_s"] / n,
                                 "batches": n, "wall_s": r["wall_s"], "wait_ms": 1e3 * r["wait_s"] / n,
                                 "tok_s": n * tokens / r["wall_s"]})

    print(f"# data loader: facts corpus ({args.people} people, generated in {gen_s:.1f} s), bytes tokenizer, "
          f"prefetch_depth {args.depth}")
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), python {platform.python_version()}")
    print("| batch | prefetch | work per batch | work ms/batch | batches | wall s | wait in next() ms/batch "
          f"| tok/s | x debug model ({DEBUG_MODEL_TOK_S:,} tok/s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['tok_s'] / DEBUG_MODEL_TOK_S:,.0f}x" if r["work"] == "none" else ""
        print(f"| {r['batch']} | {r['prefetch']} | {r['work']} | {r['work_ms']:.1f} | {r['batches']} | "
              f"{r['wall_s']:.2f} | "
              f"{r['wait_ms']:.2f} | {r['tok_s']:,.0f} | {ratio} |")
    worst = min(r["tok_s"] for r in rows if r["work"] == "none") / DEBUG_MODEL_TOK_S
    verdict = "ok" if worst >= REQUIRED_RATIO else "TOO SLOW"
    print(f"\nslowest loader: {worst:,.0f}x the debug model's training tokens/s "
          f"(required: {REQUIRED_RATIO}x): {verdict}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
