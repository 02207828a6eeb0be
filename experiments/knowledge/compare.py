"""Run a table1 or scaling comparison (families.py) and write its report: mean and standard
error over seeds of each group's final recall and QA exact match, a table and a plot.

    <out>/runs/<run>/      each run (run.py: a run already done is read back)
    <out>/report.md, <out>/results.json, <out>/table1.png or <out>/scaling.png
"""

from __future__ import annotations

import datetime
import json
import math
import platform
import time
from pathlib import Path

from experiments.knowledge.families import Comparison, common, runs
from experiments.knowledge.run import train_run
from experiments.run_record import write_file

MEASURES = (("recall_em", "recall EM"), ("qa_em", "QA EM"), ("val_loss", "val loss"))


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    mean = sum(xs) / len(xs)
    if len(xs) < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def summarise(results: list[dict]) -> list[dict]:
    """One row a group (in the order of first appearance): its seeds' mean and SE of each
    measure, and what every seed of it shares (parameters, FLOPs)."""
    rows = []
    for group in dict.fromkeys(r["size"] for r in results):
        rs = [r for r in results if r["size"] == group]
        row = {"group": group, "kind": rs[0]["kind"], "seeds": len(rs), "n_keys": rs[0]["n_keys"],
               "values": rs[0]["value_params"], "total_params": rs[0]["total_params"],
               "dense_params": rs[0]["dense_params"], "flops_per_token": rs[0]["flops_per_token"],
               "steps": rs[0]["steps"], "train_flops": rs[0]["train_flops"],
               "seconds": sum(r["seconds"] for r in rs) / len(rs)}
        for key, _ in MEASURES:
            row[key], row[f"{key}_se"] = mean_se([r[key] for r in rs])
        row["bits"], _ = mean_se([r["recall_bits"] for r in rs])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| group | seeds | params (total) | sparse / values | FLOPs/token | steps | train FLOPs | "
            "recall EM | QA EM | val loss | bits | bits/param | s a run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [f"{r[k]:.3f} ± {r[f'{k}_se']:.3f}" for k, _ in MEASURES]
        sparse = r["total_params"] - r["dense_params"]
        lines.append(f"| {r['group']} | {r['seeds']} | {r['total_params']:,} | "
                     f"{sparse:,} / {r['values']:,} | {r['flops_per_token']:,} | "
                     f"{r['steps']:,} | {r['train_flops']:.3g} | {' | '.join(cells)} | {r['bits']:,.0f} | "
                     f"{r['bits'] / r['total_params']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(c: Comparison, rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if c.kind == "table1":
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = [r["group"] for r in rows]
        for ax, (key, label) in zip(axes, MEASURES[:2], strict=True):
            ax.bar(names, [r[key] for r in rows], yerr=[r[f"{key}_se"] for r in rows], capsize=4,
                   color=[f"C{i}" for i in range(len(rows))])
            ax.set_ylabel(f"{label} (mean ± SE, {rows[0]['seeds']} seeds)")
            ax.tick_params(axis="x", rotation=30)
        fig.suptitle(f"{c.name}: families at equal training FLOPs ({rows[0]['train_flops']:.3g})")
        path = out / "table1.png"
    else:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        memory = [r for r in rows if r["kind"] == "memory"]
        ax.errorbar([r["n_keys"] ** 2 for r in memory], [r["recall_em"] for r in memory],
                    yerr=[r["recall_em_se"] for r in memory], marker="o", capsize=4, label="Memory+")
        base = next(r for r in rows if r["group"] == "dense")
        for i, r in enumerate(r for r in rows if r["kind"] == "dense"):
            ratio = r["flops_per_token"] / base["flops_per_token"]
            ax.axhline(r["recall_em"], color=f"C{i + 1}", linestyle="--",
                       label=f"{r['group']} ({ratio:.1f}x the base's FLOPs)")
            ax.axhspan(r["recall_em"] - r["recall_em_se"], r["recall_em"] + r["recall_em_se"],
                       color=f"C{i + 1}", alpha=0.15)
        ax.set_xscale("log")
        ax.set_xlabel("memory values (n_keys²)")
        ax.set_ylabel(f"recall EM (mean ± SE, {base['seeds']} seeds)")
        ax.set_title(f"{c.name}: facts recalled against memory size at the base's FLOPs")
        ax.legend(fontsize=8)
        path = out / "scaling.png"
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_comparison(c: Comparison, out: Path) -> list[Path]:
    """Train every run (progress lines, ETA), then write the report; returns what it wrote."""
    plan, base, results = runs(c), common(c), []
    started = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    for i, run in enumerate(plan, 1):
        print(f"[{i}/{len(plan)}] {run.name} ...", flush=True)
        r = train_run(run, base, out, c.name)
        results.append(r)
        elapsed = time.perf_counter() - started
        print(f"[{i}/{len(plan)}] {run.name}: recall EM {r['recall_em']:.3f}, QA EM {r['qa_em']:.3f}, "
              f"val loss {r['val_loss']:.3f}, {r['seconds']:.0f} s; elapsed {elapsed / 60:.1f} min, "
              f"ETA {elapsed / i * (len(plan) - i) / 60:.1f} min", flush=True)
    rows = summarise(results)
    write_file(out / "results.json", json.dumps({"runs": results, "groups": rows}, indent=2) + "\n")
    header = (f"# Knowledge experiment, preset {c.name}\n\n{datetime.date.today()}, {platform.node()} "
              f"({platform.machine()}), `python -m experiments.knowledge --preset {c.name} --out {out}`, "
              f"{(time.perf_counter() - started) / 60:.1f} min. {c.people} people ({6 * c.people} facts); "
              f"base {c.base.name} x {c.base.n_layers} layers; {c.batch_size} x {c.seq_len} tokens a step; "
              f"seeds {', '.join(map(str, c.seeds))}.")
    report = out / "report.md"
    write_file(report, f"{header}\n\n{table(rows)}\n")
    picture = plot(c, rows, out)
    print(table(rows))
    return [report, out / "results.json", picture]
