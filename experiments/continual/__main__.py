"""python -m experiments.continual --preset small|tiny --out DIR [--dry-run]

Pretrains a memory model on facts corpus A, counts its value rows' background usage, then
learns a new facts corpus B from those weights with each method of the preset (full
finetuning, LoRA, sparse memory finetuning) at each of its learning rates, evaluating B
recall (learning), A recall and held-out A text loss (forgetting) during finetuning.
Every stage is done once: rerunning the command continues an interrupted experiment.
Writes DIR/report.md, DIR/results.json and DIR/learning_vs_forgetting.png.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
from pathlib import Path

from experiments.continual import run
from experiments.continual.presets import PRESETS
from experiments.continual.report import plot, write_report
from experiments.train_process import experiment_main


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.continual", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--out", default=None, help="default: dumps/continual/<preset>")
    ap.add_argument("--dry-run", action="store_true", help="list the runs, train nothing")
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    out = Path(a.out or f"dumps/continual/{p.name}")
    runs = [(m, lr) for m in p.methods for lr in m.lrs]
    if a.dry_run:
        print(f"preset {p.name}: pretrain {p.pretrain_steps} steps on {p.people_a} people (A), then "
              f"{len(runs)} finetunings of {p.finetune_steps} steps on {p.people_b} new people (B); expected "
              f"{p.expected_minutes:g} min on {p.machine}")
        for m, lr in runs:
            keys = " ".join(m.overrides)
            print(f"  {run.run_name(m, lr)}: finetune.mode={m.mode} {m.lr_key}={lr:g} {keys}")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say = lambda msg: print(f"[{(time.perf_counter() - started) / 60:5.1f} min] {msg}", flush=True)  # noqa: E731
    files = run.corpora(p, out)
    say(f"corpora: A {p.people_a} people, B {p.people_b} people ({files['shared_people']} names in both: "
        "their questions left out)")
    say(f"pretraining on A ({p.pretrain_steps} steps) ...")
    ckpt = run.pretrain(p, out, files)
    usage = run.background(p, out, ckpt)
    start = run.start_point(p, out, ckpt, files)
    say(f"pretrained: A recall {start['a_recall']:.3f}, B recall {start['b_recall']:.3f}, held-out loss "
        f"{start['heldout_loss']:.4f}; background usage {usage}")
    results, finetuning = [], time.perf_counter()
    for i, (m, lr) in enumerate(runs, 1):
        r = run.finetune(p, out, m, lr, ckpt, usage, files, start)
        results.append(r)
        last = r["curve"][-1]
        eta = (time.perf_counter() - finetuning) / i * (len(runs) - i)
        say(f"[{i}/{len(runs)}] {r['name']}: B recall {last['b_recall']:.3f}, "
            f"A recall {last['a_recall']:.3f}, "
            f"held-out loss {last['heldout_loss']:.4f}, {r['seconds']:.0f} s; ETA {eta / 60:.1f} min")
    header = (f"# Continual-learning experiment, preset {p.name}\n\n{datetime.date.today()}, "
              f"{platform.node()} "
              f"({platform.machine()}), `python -m experiments.continual --preset {p.name} --out {out}`; "
              f"the finetunings took {sum(r['seconds'] for r in results) / 60:.1f} min in all (this "
              f"invocation {(time.perf_counter() - started) / 60:.1f}). A: {p.people_a} people (seed 0), "
              "pretrained "
              f"{p.pretrain_steps} steps; B: {p.people_b} new people (seed 1), {p.finetune_steps} "
              "finetuning steps per run.")
    report, best, target = write_report(results, start, out, header)
    picture = plot(results, target, best, out)
    for b in best:
        if b["a_recall"] is None:
            say(f"{b['method']}: never reached B recall {target:.3f} (at most {b['b_recall']:.3f}, "
                f"{b['run']})")
            continue
        drop = "-" if b["a_drop"] is None else f"{100 * b['a_drop']:.0f}%"
        say(f"at B recall {target:.3f}: {b['method']} ({b['run']}) A recall {b['a_recall']:.3f} "
            f"(drop {drop}), held-out loss {b['heldout_loss']:.4f} vs {start['heldout_loss']:.4f}")
    say(f"wrote {report}, {out / 'results.json'}, {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(experiment_main(main, sys.argv[1:]))
