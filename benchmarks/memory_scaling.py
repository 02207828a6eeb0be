"""What a training step costs as the value table grows, side by side in one run.

    python benchmarks/memory_scaling.py [--rows 4k,65k,262k,1m] [--steps 40] [--rounds 3]
        [--value-optimizers adamw,lazy_adamw,adagrad] [--config configs/debug.yaml]
        [--out dumps/memory_scaling] [--json rows.json] [--set key=value ...]

Each case is `python train.py config=<config> memory.n_keys=<sqrt(rows)>` in its own
process (the same base model, the generated facts corpus, no checkpoints, one process),
run for --steps steps (--rounds N: all the cases N times over, one after another, and
each case's median round reported). From its metrics.jsonl: the median tokens/s of its logging windows
(8 of them) but the first (warm-up and compilation); its peak memory: the process's max
RSS on the CPU (wait4), torch.cuda.max_memory_allocated on a GPU. The table gives every case's
ratio to the first (smallest) one of the same value optimizer (optim.value_optimizer: each
is a block of the table). A memory layer reads heads x knn rows per token,
whatever the table's size, so the ratio should stay near 1; a step that touches the
whole table (a dense gradient, a dense optimizer update) makes it fall with the rows.

Sizes are rows = n_keys**2: 4k (64), 65k (256), 262k (512), 1m (1024), 4m (2048),
16m (4096). --set adds training keys to every case (e.g. distributed.device=cuda
distributed.compute_dtype=bf16 on a GPU).
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VALUE_OPTIMIZERS = ("adamw", "lazy_adamw", "adagrad")  # optim.value_optimizer
SIZES = {"4k": 64, "65k": 256, "262k": 512, "1m": 1024, "4m": 2048, "16m": 4096}


def run_case(label: str, optimizer: str, a) -> dict:
    n_keys = SIZES[label]
    dump = Path(a.out) / f"{optimizer}_rows_{label}"
    log_every = max(1, a.steps // 8)
    cmd = [sys.executable, "train.py", f"config={a.config}", f"dump_dir={dump}", f"steps={a.steps}",
           f"log_every={log_every}", f"memory.n_keys={n_keys}", "checkpoint.every=0", "eval.every=0",
           "logging.console=false", "logging.wandb.enabled=false", f"optim.value_optimizer={optimizer}",
           *a.set]
    dump.mkdir(parents=True, exist_ok=True)
    with open(dump / "stdout.txt", "w") as out, open(dump / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=err)
        # wait4: the child's own resource usage, its peak resident memory included (KiB)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = usage.ru_maxrss * 1024
    if proc.returncode != 0:
        text = (dump / "stderr.txt").read_text() or (dump / "stdout.txt").read_text()
        tail = text.strip().splitlines()[-1:] or ["no output"]
        return {"rows": label, "n_values": n_keys**2, "optimizer": optimizer, "error": tail[0]}
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    steady = sorted(r["tokens_per_s"] for r in rows[1:]) or [last["tokens_per_s"]]  # the first: warm-up
    return {"rows": label, "n_values": n_keys**2, "optimizer": optimizer,
            "tokens_per_s": steady[len(steady) // 2],
            "loss": last["loss"], "peak_memory_gib": last.get("peak_memory_gib", rss / 2**30),
            "peak_kind": "cuda allocated" if "peak_memory_gib" in last else "max RSS"}


def median_case(cases: tuple[dict, ...]) -> dict:
    """One case's rounds -> its row: the median tokens/s (and the round it came from), every
    round's tokens/s under `rounds`; a failed round fails the case."""
    failed = [c for c in cases if "error" in c]
    if failed:
        return failed[0]
    ranked = sorted(cases, key=lambda c: c["tokens_per_s"])
    return {**ranked[(len(ranked) - 1) // 2], "rounds": [c["tokens_per_s"] for c in cases]}


def table(results: list[dict]) -> str:
    """One block per value optimizer; ratios to its own smallest table."""
    lines = [f"{'optimizer':>10} {'rows':>6} {'values':>10} {'tok/s':>9} {'x first':>8} {'peak GiB':>9} "
             f"{'x first':>8}  loss"]
    base = None
    for r in results:
        if base is None or base["optimizer"] != r["optimizer"]:
            base = next((b for b in results if b["optimizer"] == r["optimizer"] and "error" not in b), None)
        head = f"{r['optimizer']:>10} {r['rows']:>6} {r['n_values']:>10,}"
        if "error" in r or base is None:
            lines.append(f"{head}  failed: {r.get('error', '')}")
            continue
        speed = r["tokens_per_s"] / base["tokens_per_s"]
        memory = r["peak_memory_gib"] / base["peak_memory_gib"]
        rounds = f"  rounds {' / '.join(f'{t:,.0f}' for t in r['rounds'])}" if len(r["rounds"]) > 1 else ""
        lines.append(f"{head} {r['tokens_per_s']:>9,.0f} {speed:>8.2f} "
                     f"{r['peak_memory_gib']:>9.2f} {memory:>8.2f}  {r['loss']:.4f}{rounds}")
    kinds = {r["peak_kind"] for r in results if "peak_kind" in r}
    if kinds:
        lines.append(f"peak memory: {', '.join(sorted(kinds))}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", default="4k,65k,262k,1m", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every case this many times, interleaved; each case's median is reported")
    p.add_argument("--value-optimizers", default="adamw,lazy_adamw,adagrad",
                   help="comma-separated optim.value_optimizer choices, each a block of the table")
    p.add_argument("--config", default="configs/debug.yaml")
    p.add_argument("--out", default="dumps/memory_scaling")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--set", nargs="*", default=[], help="training keys for every case (key=value)")
    a = p.parse_args(argv)
    labels = [s.strip() for s in a.rows.split(",") if s.strip()]
    bad = [s for s in labels if s not in SIZES]
    if bad or not labels:
        given = ", ".join(bad) or "none given"
        print(f"error: --rows: {given}: sizes are {', '.join(SIZES)}", file=sys.stderr)
        return 2
    if a.steps < 8:
        print("error: --steps: at least 8 (the first logging window, warm-up, is left out)", file=sys.stderr)
        return 2
    optimizers = [s.strip() for s in a.value_optimizers.split(",") if s.strip()]
    if not optimizers or any(o not in VALUE_OPTIMIZERS for o in optimizers):
        print(f"error: --value-optimizers: {a.value_optimizers!r}: choose from {', '.join(VALUE_OPTIMIZERS)}",
              file=sys.stderr)
        return 2
    if a.rounds < 1:
        print("error: --rounds: at least 1", file=sys.stderr)
        return 2
    labels.sort(key=SIZES.get)  # smallest first: the ratios' base
    rounds = []  # rounds[r]: every case once; the cases interleaved, so a slow spell hits them all
    for r in range(a.rounds):
        rounds.append([])
        for optimizer in optimizers:
            for label in labels:
                rounds[-1].append(run_case(label, optimizer, a))
                case = rounds[-1][-1]
                done = case.get("error") or (f"{case['tokens_per_s']:,.0f} tok/s, "
                                             f"peak {case['peak_memory_gib']:.2f} GiB")
                print(f"round {r + 1}/{a.rounds} {optimizer} {label}: {done}", flush=True)
    results = [median_case(cases) for cases in zip(*rounds, strict=True)]
    print(table(results))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
