"""What the value tables' optimizer (optim.value_optimizer) does to what a memory model learns:
the knowledge experiment's runs (its preset's corpus, steps, schedule and dense base) with
each value optimizer, side by side.

    python -m experiments.knowledge.value_optimizers [--preset small] [--size d64]
        [--n-keys 32,256] [--value-lrs 0.1] [--optimizers adamw,lazy_adamw,adagrad]
        [--seeds 0] [--lr 0.006] [--out dumps/knowledge/value_optimizers]

Every run is a memory run of the preset (its first dense size unless --size, Memory+ at the
preset's layers, shared values) at the dense base's lr; runs differ only in n_keys, the
value lr, the value optimizer and the seed (model initialisation and data order; the corpus
stays the same). A run already done is read back. Prints one row per run (final recall
and QA exact match, val loss), then the mean and standard error over seeds, and writes
OUT/value_optimizers.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from experiments.knowledge import plan
from experiments.knowledge.compare import mean_se
from experiments.knowledge.presets import PRESETS
from experiments.knowledge.run import train_run
from experiments.run_record import write_file
from experiments.train_process import experiment_main
from lingua_mem.cli import fail

OPTIMIZERS = ("adamw", "lazy_adamw", "adagrad")


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _mean_se(xs: list[float]) -> str:
    """mean +- standard error (the mean alone for one value)."""
    mean, se = mean_se(xs)
    return f"{mean:.3f}" if len(xs) < 2 else f"{mean:.3f} +- {se:.3f}"


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m experiments.knowledge.value_optimizers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--size", default=None, help="a dense size of the preset (default: its first)")
    ap.add_argument("--n-keys", default="32,256", help="memory sizes, n_keys**2 values each")
    ap.add_argument("--value-lrs", default="0.1")
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds")
    ap.add_argument("--lr", type=float, default=6e-3, help="the dense lr (optim.lr)")
    ap.add_argument("--out", default="dumps/knowledge/value_optimizers")
    a = ap.parse_args(argv)
    p = PRESETS[a.preset]
    sizes = {s.name: s for s in p.sizes}
    size = sizes.get(a.size or p.sizes[0].name)
    optimizers = [o.strip() for o in a.optimizers.split(",") if o.strip()]
    if size is None:
        return fail(f"--size: {a.size} is not a size of preset {p.name} ({', '.join(sizes)})")
    if not optimizers or any(o not in OPTIMIZERS for o in optimizers):
        return fail(f"--optimizers: {a.optimizers}: choose from {', '.join(OPTIMIZERS)}")
    seeds = [int(x) for x in _floats(a.seeds)]
    runs = []
    for k in map(int, _floats(a.n_keys)):
        for vlr in _floats(a.value_lrs):
            for opt in optimizers:
                for seed in seeds:
                    name = f"{size.name}_mem{k}_vlr{vlr:g}_{opt}" + (f"_seed{seed}" if seed else "")
                    keys = (*plan.size_keys(size), *plan.memory_keys(p, k), f"optim.lr={a.lr}",
                            f"optim.value_lr={vlr}", f"optim.value_optimizer={opt}", f"seed={seed}")
                    runs.append(plan.Run(name, size.name, "memory", 2, keys, k))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    base, rows, started = plan.common(p), [], time.perf_counter()
    for i, run in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] {run.name} ...", flush=True)
        r = train_run(run, base, out, f"value_optimizers:{p.name}")
        keys = dict(o.split("=", 1) for o in run.overrides)
        rows.append((run.n_keys**2, keys["optim.value_lr"], keys["optim.value_optimizer"], keys["seed"],
                     r["recall_em"], r["qa_em"], r["val_loss"], r["seconds"]))
        eta = (time.perf_counter() - started) / i * (len(runs) - i)
        print(f"[{i}/{len(runs)}] {run.name}: recall EM {r['recall_em']:.3f}, QA EM {r['qa_em']:.3f}, "
              f"val loss {r['val_loss']:.3f}, {r['seconds']:.0f} s; ETA {eta / 60:.1f} min", flush=True)
    lines = [f"preset {p.name}, base {size.name} (lr {a.lr:g}), {p.steps} steps, {p.people} people, "
             f"seeds {a.seeds}", "",
             "| values | value_lr | value_optimizer | seed | recall EM | QA EM | val loss | seconds |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {v:,} | {vlr} | {opt} | {seed} | {rec:.3f} | {qa:.3f} | {loss:.4f} | {sec:.0f} |"
              for v, vlr, opt, seed, rec, qa, loss, sec in rows]
    lines += ["", "| values | value_lr | value_optimizer | seeds | recall EM | QA EM | val loss |",
              "|---:|---:|---|---:|---:|---:|---:|"]
    groups: dict[tuple, list] = {}
    for v, vlr, opt, _, rec, qa, loss, _ in rows:
        groups.setdefault((v, vlr, opt), []).append((rec, qa, loss))
    for (v, vlr, opt), got in groups.items():
        cells = [_mean_se([g[i] for g in got]) for i in range(3)]
        lines.append(f"| {v:,} | {vlr} | {opt} | {len(got)} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    write_file(out / "value_optimizers.md", text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(experiment_main(main, sys.argv[1:]))
