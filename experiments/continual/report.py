"""The continual-learning experiment's report: each method compared at matched learning (the
same B recall), on what it forgot (A recall, held-out loss); the run table; the plot."""

from __future__ import annotations

import json
from pathlib import Path

from experiments.run_record import write_file


def at_b_recall(curve: list[dict], target: float, key: str) -> float | None:
    """`key` where the curve first reaches B recall `target` (linear between evaluations);
    None if it never does."""
    if curve and curve[0]["b_recall"] >= target:
        return curve[0][key]
    for before, after in zip(curve, curve[1:], strict=False):
        if after["b_recall"] >= target:
            span = after["b_recall"] - before["b_recall"]
            w = 1.0 if span <= 0 else (target - before["b_recall"]) / span
            w = min(max(w, 0.0), 1.0)
            return before[key] + w * (after[key] - before[key])
    return None


LEARNED = 0.05  # a method has learned B once some run of it gains this much B recall


def matched_target(results: list[dict], start: dict) -> float:
    """The highest B recall every method that learned B reaches in some run: where they are
    all compared (a method that never gains LEARNED is reported as not having learned)."""
    best = {}
    for r in results:
        best[r["method"]] = max(best.get(r["method"], 0.0), max(c["b_recall"] for c in r["curve"]))
    learned = [b for b in best.values() if b >= start["b_recall"] + LEARNED]
    return min(learned) if learned else start["b_recall"]


def matched(results: list[dict], start: dict) -> tuple[float, list[dict]]:
    """(target, per method its run that forgets least at the target: the highest A recall
    there, then the lowest held-out loss; None values for a method that never reaches it)."""
    target = matched_target(results, start)
    rows = []
    for method in dict.fromkeys(r["method"] for r in results):
        candidates = []
        for r in results:
            if r["method"] != method:
                continue
            a = at_b_recall(r["curve"], target, "a_recall")
            loss = at_b_recall(r["curve"], target, "heldout_loss")
            if a is not None:
                candidates.append((a, -loss, r, loss))
        if not candidates:
            best = max((r for r in results if r["method"] == method),
                       key=lambda r: max(c["b_recall"] for c in r["curve"]))
            highest = max(c["b_recall"] for c in best["curve"])
            rows.append({"method": method, "run": best["name"], "lr": best["lr"], "lr_key": best["lr_key"],
                         "step": None, "b_recall": highest, "a_recall": None,
                         "a_kept": None, "a_drop": None, "heldout_loss": None, "heldout_increase": None})
            continue
        a, _, r, loss = max(candidates, key=lambda c: (c[0], c[1]))
        step = at_b_recall(r["curve"], target, "step")
        kept = a / start["a_recall"] if start["a_recall"] else None
        rows.append({"method": method, "run": r["name"], "lr": r["lr"], "lr_key": r["lr_key"], "step": step,
                     "b_recall": target, "a_recall": a, "a_kept": kept,
                     "a_drop": None if kept is None else 1 - kept,
                     "heldout_loss": loss, "heldout_increase": loss - start["heldout_loss"]})
    return target, rows


def _f(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def matched_table(target: float, rows: list[dict], start: dict) -> str:
    lines = [f"At B recall {target:.3f}: the highest that every method which learned B (gained at least "
             f"{LEARNED:.2f} B recall in some run) reaches. Before finetuning: A recall "
             f"{start['a_recall']:.3f}, B recall {start['b_recall']:.3f}, held-out loss "
             f"{start['heldout_loss']:.4f}. A method that never reached it shows its best run's highest "
             "B recall and dashes.", "",
             "| method | best run | step at target | B recall | A recall | A recall drop | held-out loss | "
             "held-out loss increase |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        drop = "-" if r["a_drop"] is None else f"{100 * r['a_drop']:.0f}%"
        increase = "-" if r["heldout_increase"] is None else f"{r['heldout_increase']:+.4f}"
        lines.append(f"| {r['method']} | {r['run']} | {_f(r['step'], 0)} | {r['b_recall']:.3f} | "
                     f"{_f(r['a_recall'])} | {drop} | {_f(r['heldout_loss'], 4)} | {increase} |")
    return "\n".join(lines)


def runs_table(results: list[dict]) -> str:
    lines = ["| run | mode | lr | steps | final B recall | final A recall | final held-out loss | "
             "train loss | rows updated / step | wall s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r["curve"][-1]
        rows = "-" if r.get("rows_updated") is None else f"{r['rows_updated']:.0f}"
        lines.append(f"| {r['name']} | {r['mode']} | {r['lr_key']}={r['lr']:g} | {r['steps']} | "
                     f"{last['b_recall']:.3f} | {last['a_recall']:.3f} | {last['heldout_loss']:.4f} | "
                     f"{r['train_loss']:.4f} | {rows} | {r['seconds']:.0f} |")
    return "\n".join(lines)


COLORS = {"full": "tab:red", "lora": "tab:orange", "sparse": "tab:gray", "sparse_adamw": "tab:olive",
          "sparse_kl": "tab:blue", "sparse_kl_adamw": "tab:cyan"}


def plot(results: list[dict], target: float, best: list[dict], out: Path) -> Path:
    """Learning (B recall, x) against forgetting (A recall; held-out loss), every run's curve
    from the pretrained model; the best run of each method drawn bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    bold = {r["run"] for r in best}
    for r in results:
        b = [c["b_recall"] for c in r["curve"]]
        style = {"color": COLORS.get(r["method"], "gray"), "marker": "o", "markersize": 3,
                 "linewidth": 2.2 if r["name"] in bold else 0.8, "alpha": 1.0 if r["name"] in bold else 0.45}
        label = r["name"] if r["name"] in bold else None
        axes[0].plot(b, [c["a_recall"] for c in r["curve"]], label=label, **style)
        axes[1].plot(b, [c["heldout_loss"] for c in r["curve"]], label=label, **style)
    ylabels = ("A recall (exact match): kept knowledge", "held-out A text loss (nats/byte)")
    for ax, ylabel in zip(axes, ylabels, strict=True):
        ax.axvline(target, color="black", linestyle="--", linewidth=0.8)
        ax.set_xlabel("B recall (exact match): new knowledge")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("Learning new facts (B) against forgetting the pretraining's (A)")
    fig.tight_layout()
    path = out / "learning_vs_forgetting.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: list[dict], start: dict, out: Path, header: str) -> tuple[Path, list[dict], float]:
    target, best = matched(results, start)
    text = "\n\n".join([header, "## At matched learning", matched_table(target, best, start),
                        "## Every run (final evaluation)", runs_table(results)]) + "\n"
    path = out / "report.md"
    write_file(path, text)
    write_file(out / "results.json", json.dumps({"start": start, "target": target, "matched": best,
                                                 "runs": results}, indent=2) + "\n")
    return path, best, target
