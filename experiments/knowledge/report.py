"""The experiment's table, headline ratios and plots, from the runs' results.

Two measures of knowledge: recall (a fact asked in the words training used: is it stored?)
and QA (asked in words training never used: can the model answer it?). Bits of knowledge
count the facts recalled.

Equal compute: every run of a preset trains on the same tokens, and a memory model spends
a different number of FLOPs per token than its dense base (its memory layers replace FFNs).
The headline compares the best memory run and the best dense run of a size at the same
training FLOPs: the smaller of their two budgets, each run's exact match read off its
evaluation curve there (linear between evaluations).
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.run_record import write_file


def at_flops(curve: list[dict], flops: float, key: str = "recall_em") -> float:
    """`key` of an evaluation curve at `flops` training FLOPs (linear between points; 0 before
    the first evaluation's 0 FLOPs)."""
    points = [(0.0, 0.0)] + [(c["flops"], c[key]) for c in curve]
    for (f0, v0), (f1, v1) in zip(points, points[1:], strict=False):
        if flops <= f1:
            return v0 + (v1 - v0) * (flops - f0) / (f1 - f0) if f1 > f0 else v1
    return points[-1][1]


def headline(results: list[dict], key: str = "recall_em") -> list[dict]:
    """Per size: the best dense and memory runs (by `key`, then val loss) and their `key`
    (recall_em: facts stored; qa_em: facts answered in new words) at equal training FLOPs."""
    rows = []
    for size in dict.fromkeys(r["size"] for r in results):
        dense = [r for r in results if r["size"] == size and r["kind"] == "dense"]
        memory = [r for r in results if r["size"] == size and r["kind"] == "memory"]
        if not dense or not memory:
            continue
        order = lambda r: (r[key], -r["val_loss"])  # noqa: E731
        d, m = max(dense, key=order), max(memory, key=order)
        flops = min(d["train_flops"], m["train_flops"])
        em_d, em_m = at_flops(d["curve"], flops, key), at_flops(m["curve"], flops, key)
        rows.append({"size": size, "dense": d["name"], "memory": m["name"], "flops": flops,
                     "dense_em": em_d, "memory_em": em_m,
                     "ratio": em_m / em_d if em_d > 0 else float("inf") if em_m > 0 else float("nan")})
    return rows


def _fmt(x: float, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def table(results: list[dict]) -> str:
    head = ("| run | params (dense / values) | FLOPs/token | tokens | train loss | val loss | recall EM | "
            "QA EM | bits | bits/param | bits/dense param | wall s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        lines.append(f"| {r['name']} | {r['dense_params']:,} / {r['value_params']:,} | "
                     f"{r['flops_per_token']:,} | {r['tokens']:,} | {r['train_loss']:.3f} | "
                     f"{r['val_loss']:.3f} | {r['recall_em']:.3f} | {r['qa_em']:.3f} | "
                     f"{r['recall_bits']:,.0f} | {r['bits_per_param']:.4f} | "
                     f"{r['bits_per_dense_param']:.4f} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def memory_table(results: list[dict]) -> str:
    lines = ["| run | layer | usage | KL from uniform | top-1 weight |", "|---|---|---|---|---|"]
    for r in results:
        layers = sorted({k.split("/")[1] for k in r["memory"]})
        for layer in layers:
            m = r["memory"]
            lines.append(f"| {r['name']} | {layer} | {m.get(f'memory/{layer}/usage', 0):.3f} | "
                         f"{m.get(f'memory/{layer}/kl_uniform', 0):.3f} | "
                         f"{m.get(f'memory/{layer}/top1_weight', 0):.3f} |")
    return "\n".join(lines)


def plots(results: list[dict], out: Path) -> list[Path]:
    """recall EM against training FLOPs (every run), bits of knowledge against parameters."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(dict.fromkeys(r["size"] for r in results))
    colours = {s: f"C{i}" for i, s in enumerate(sizes)}
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        xs = [0.0] + [c["flops"] for c in r["curve"]]
        ys = [0.0] + [c["recall_em"] for c in r["curve"]]
        ax.plot(xs, ys, ("--" if r["kind"] == "dense" else "-"), color=colours[r["size"]], marker=".",
                alpha=0.8, label=r["name"])
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("facts recalled (exact match, training wording)")
    ax.set_title("facts stored against training compute (dashed: dense)")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    first = out / "facts_vs_flops.png"
    fig.savefig(first, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 5))
    for r in results:
        ax.scatter(r["total_params"], r["recall_bits"], color=colours[r["size"]],
                   marker="o" if r["kind"] == "dense" else "^")
        ax.annotate(r["name"], (r["total_params"], r["recall_bits"]), fontsize=6)
    ax.set_xscale("log")
    ax.set_xlabel("parameters (dense + values)")
    ax.set_ylabel("bits of knowledge (facts recalled exactly)")
    ax.set_title("bits of knowledge against parameters (o dense, ^ memory)")
    fig.tight_layout()
    second = out / "bits_vs_params.png"
    fig.savefig(second, dpi=120)
    plt.close(fig)
    return [first, second]


def write_report(results: list[dict], out: Path, header: str) -> Path:
    """out/report.md (the tables and headline) and out/results.json."""
    write_file(out / "results.json", json.dumps(results, indent=2) + "\n")
    lines = [header, "", "## Runs", "", table(results), "", "## Equal training FLOPs", "",
             "| measure | size | best dense | best memory | FLOPs | dense EM | memory EM | memory / dense |",
             "|---|---|---|---|---|---|---|---|"]
    for key in ("recall_em", "qa_em"):
        for h in headline(results, key):
            lines.append(f"| {key.removesuffix('_em')} | {h['size']} | {h['dense']} | {h['memory']} | "
                         f"{h['flops']:.3g} | {h['dense_em']:.3f} | {h['memory_em']:.3f} | "
                         f"{_fmt(h['ratio'])} |")
    memory = [r for r in results if r["kind"] == "memory"]
    if memory:
        lines += ["", "## Memory reads (the last evaluation's val tokens)", "", memory_table(memory)]
    report = out / "report.md"
    write_file(report, "\n".join(lines) + "\n")
    return report
