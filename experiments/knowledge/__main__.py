"""python -m experiments.knowledge --preset NAME --out DIR [--dry-run]

Presets small, gpu, tiny: memory against dense bases, phase by phase (plan.py): DIR/report.md,
DIR/results.json, DIR/facts_vs_flops.png and DIR/bits_vs_params.png.
Presets table1, scaling (and their _gpu and _tiny variants): the layer families at equal
training FLOPs, and recall against memory size, over seeds (families.py): DIR/report.md,
DIR/results.json, DIR/table1.png or DIR/scaling.png.

Each run trains in its own train.py process; a run already done is read back, so rerunning
the command continues an interrupted experiment. Prints progress (run i of n, its result,
the ETA).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

from experiments.knowledge import capacity, families, plan
from experiments.knowledge.compare import run_comparison
from experiments.knowledge.presets import PRESETS
from experiments.knowledge.report import headline, plots, write_report
from experiments.knowledge.run import train_run
from experiments.train_process import experiment_main


def n_runs(p) -> int:
    per = len(p.lrs) + len(p.value_lrs) + len(p.n_keys) - 1
    return per * len(p.sizes) + len(p.ablations) * min(p.ablation_sizes, len(p.sizes))


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.knowledge", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    presets = sorted({*PRESETS, *families.COMPARISONS, *capacity.STUDIES})
    ap.add_argument("--preset", default="small", choices=presets)
    ap.add_argument("--out", default=None, help="default: dumps/knowledge/<preset>")
    ap.add_argument("--dry-run", action="store_true", help="list the runs (small, gpu, tiny: of phase 1)")
    a = ap.parse_args(argv)
    if a.preset in capacity.STUDIES:
        written = capacity.run_study(capacity.STUDIES[a.preset], Path(a.out or f"dumps/knowledge/{a.preset}"),
                                     a.dry_run)
        if written:
            print(f"wrote {', '.join(map(str, written))}")
        return 0
    if a.preset in families.COMPARISONS:
        return compare(families.COMPARISONS[a.preset], a.out, a.dry_run)
    p = PRESETS[a.preset]
    out = Path(a.out or f"dumps/knowledge/{p.name}")
    base = plan.common(p)
    total = n_runs(p)
    if a.dry_run:
        print(f"preset {p.name}: {total} runs of {p.steps} steps x {p.batch_size * p.seq_len} tokens on "
              f"{p.people} people's facts; expected {p.expected_minutes:g} min on {p.machine}")
        for s in p.sizes:
            for run in plan.dense_runs(p, s):
                print(f"  {run.name}: {' '.join(run.overrides)}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    started = time.perf_counter()

    def do(run: plan.Run) -> dict:
        i = len(results) + 1
        print(f"[{i}/{total}] {run.name} ...", flush=True)
        r = train_run(run, base, out, p.name)
        results.append(r)
        elapsed = time.perf_counter() - started
        eta = elapsed / i * (total - i)
        print(f"[{i}/{total}] {run.name}: recall EM {r['recall_em']:.3f}, QA EM {r['qa_em']:.3f}, "
              f"val loss {r['val_loss']:.3f}, "
              f"{r['seconds']:.0f} s; elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)
        return r

    for size_index, s in enumerate(p.sizes):
        lr = plan.best([do(r) for r in plan.dense_runs(p, s)])["lr"]
        vlr = plan.best([do(r) for r in plan.value_lr_runs(p, s, lr)])["value_lr"]
        for r in plan.memory_runs(p, s, lr, vlr, ablate=size_index < p.ablation_sizes):
            do(r)
    header = (f"# Knowledge experiment, preset {p.name}\n\n{datetime.date.today()}, {platform.node()} "
              f"({platform.machine()}), `python -m experiments.knowledge --preset {p.name} --out {out}`, "
              f"{(time.perf_counter() - started) / 60:.1f} min. {p.people} people ({6 * p.people} facts), "
              f"{p.steps} steps of {p.batch_size} x {p.seq_len} tokens.")
    report = write_report(results, out, header)
    pictures = plots(results, out)
    for key in ("recall_em", "qa_em"):
        for h in headline(results, key):
            print(f"{h['size']}: memory / dense {key} at {h['flops']:.3g} FLOPs = {h['ratio']:.3g} "
                  f"({h['memory']} {h['memory_em']:.3f} vs {h['dense']} {h['dense_em']:.3f})")
    print(f"wrote {report}, {out / 'results.json'}, {', '.join(map(str, pictures))}")
    return 0


def compare(c: families.Comparison, out: str | None, dry_run: bool) -> int:
    runs = families.runs(c)
    if dry_run:
        tokens = c.batch_size * c.seq_len
        print(f"preset {c.name}: {len(runs)} runs ({len(c.seeds)} seeds) of {tokens} tokens a step on "
              f"{c.people} people's facts, base {c.base.name} x {c.base.n_layers}; expected "
              f"{c.expected_minutes:g} min on {c.machine}")
        for run in runs:
            print(f"  {run.name}: {' '.join(run.overrides)}")
        return 0
    written = run_comparison(c, Path(out or f"dumps/knowledge/{c.name}"))
    print(f"wrote {', '.join(map(str, written))}")
    return 0


if __name__ == "__main__":
    sys.exit(experiment_main(main, sys.argv[1:]))
