"""Training curves of one or several runs, side by side, in one PNG.

    python -m lingua_mem.plot DUMP_DIR [DUMP_DIR ...] --out plot.png [--x tokens|flops|both]

One row per x axis (tokens; training FLOPs = tokens * flops_per_token), log scale; one column
per metric (train loss | val loss | facts QA exact match); one line per run, labelled by the
run's name (`name:` of DUMP_DIR/config.yaml, else the directory's name), and one legend.
Read: DUMP_DIR/metrics.jsonl (training rows, and eval rows with "eval": true) and
DUMP_DIR/evals/*.json (the eval command's), the latter for the steps metrics.jsonl has no
eval row at. Lines that are not JSON (cut short by a kill) and rows without "step" are
skipped; of two rows of the same kind and step the last is kept.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lingua_mem.cli import fail
from lingua_mem.metrics import read_rows

try:
    from matplotlib.figure import Figure  # no pyplot: no screen, no global figure state
    from matplotlib.lines import Line2D
except ImportError:  # main() says so in one line
    Figure = Line2D = None

X_AXES = {"tokens": "tokens", "flops": "training FLOPs"}
PANELS = [  # (title, series, eval metric)
    ("train loss", "train", None),
    ("val loss", "eval", "val/loss"),
    ("facts QA exact match", "eval", "facts_qa/exact_match"),
]




def _flops(tokens, flops_per_token) -> float | None:
    return None if tokens is None or flops_per_token is None else tokens * flops_per_token


def run_name(dump_dir: Path) -> str:
    """`name:` of dump_dir/config.yaml when it has one, else the directory's name."""
    try:
        name = OmegaConf.load(dump_dir / "config.yaml").get("name")
    except Exception:  # no config.yaml, or one OmegaConf cannot read: the directory's name
        name = None
    return str(name) if name else dump_dir.resolve().name


def load_run(dump_dir: str | Path) -> dict:
    """The series of one run, each in step order:
    {"name": str, "train": [(tokens, flops, loss)], "eval": [(tokens, flops, {metric: value})]};
    flops is None where flops_per_token is unknown, tokens where an evals/ file has none."""
    dump_dir = Path(dump_dir)
    train, evals = {}, {}  # step -> row; the last row of a step wins
    metrics_file = dump_dir / "metrics.jsonl"
    for row in read_rows(metrics_file) if metrics_file.is_file() else []:
        (evals if row.get("eval") is True else train)[row["step"]] = row
    for path in sorted((dump_dir / "evals").glob("*.json")):  # the eval command's
        try:
            row = json.loads(path.read_text())
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] not in evals:
            metrics = row.get("metrics") if isinstance(row.get("metrics"), dict) else {}
            evals[row["step"]] = {"step": row["step"], "tokens": row.get("tokens"), **metrics}

    per_token = next((r["flops_per_token"] for r in train.values() if "flops_per_token" in r), None)
    out = {"name": run_name(dump_dir), "train": [], "eval": []}
    for _, row in sorted(train.items()):
        if "loss" in row and "tokens" in row:
            tokens = row["tokens"]
            flops = row["flops"] if "flops" in row else _flops(tokens, row.get("flops_per_token"))
            out["train"].append((tokens, flops, row["loss"]))
    for step, row in sorted(evals.items()):
        tokens = row.get("tokens")
        if tokens is None and step in train:  # an evals/ file without tokens: those of its step
            tokens = train[step].get("tokens")
        metrics = {k: v for k, v in row.items() if "/" in k and isinstance(v, (int, float))}
        out["eval"].append((tokens, _flops(tokens, row.get("flops_per_token", per_token)), metrics))
    return out


def _points(run: dict, x: str, series: str, metric: str | None) -> tuple[list, list]:
    """The (x, y) of one panel's line: only positive x (log axes) and numbers for y."""
    xs, ys = [], []
    for tokens, flops, value in run[series]:
        xv = tokens if x == "tokens" else flops
        yv = value if metric is None else value.get(metric)
        if isinstance(xv, (int, float)) and xv > 0 and isinstance(yv, (int, float)) and math.isfinite(yv):
            xs.append(xv)
            ys.append(yv)
    return xs, ys


def plot(runs: list[dict], out: Path, x_axes: list[str]) -> Figure:
    """Write the grid of `runs` (load_run's, each with its "dir") to `out`; returns the figure."""
    rows, cols = len(x_axes), len(PANELS)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows + 0.6), dpi=120, layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for r, x in enumerate(x_axes):
        for c, (title, series, metric) in enumerate(PANELS):
            ax = axes[r][c]
            ax.set_title(title)
            ax.set_xlabel(X_AXES[x])
            empty = True
            for i, run in enumerate(runs):
                xs, ys = _points(run, x, series, metric)
                if xs:
                    ax.plot(xs, ys, color=f"C{i % 10}", lw=1.2,
                            marker="o" if series == "eval" else None, ms=3)
                    empty = False
            if empty:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
                ax.set_xticks([])
                ax.set_yticks([])
            else:
                ax.set_xscale("log")
                ax.grid(True, which="major", alpha=0.3)
                if metric == "facts_qa/exact_match":  # a fraction: its whole range, 0 included
                    ax.set_ylim(-0.02, max(0.1, ax.get_ylim()[1]))
    names = [run["name"] for run in runs]  # a name that two runs share (the default "run") gets the dir
    labels = [n if names.count(n) == 1 else f"{n} ({run['dir']})" for n, run in zip(names, runs, strict=True)]
    handles = [Line2D([], [], color=f"C{i % 10}", lw=1.5, label=label) for i, label in enumerate(labels)]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5), frameon=False)
    fig.savefig(out)
    return fig


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a one-line ValueError instead of usage + exit
        raise ValueError(message)


def _check(dump_dirs: list[str], out: str) -> None:
    """ValueError naming the path, before any work: an unusable DUMP_DIR or --out."""
    for d in map(Path, dump_dirs):
        if not d.is_dir():
            raise ValueError(f"{d}: no such directory" if not d.exists() else f"{d}: not a directory")
        if not (d / "metrics.jsonl").is_file() and not (d / "evals").is_dir():
            raise ValueError(f"{d}: no metrics.jsonl and no evals/ (not a run's dump dir?)")
    parent = Path(out).parent
    if Path(out).is_dir():
        raise ValueError(f"{out}: a directory, not a file")
    if not parent.is_dir():
        raise ValueError(f"{parent}: no such directory (for --out {out})")
    if not os.access(parent, os.W_OK) or (Path(out).exists() and not os.access(out, os.W_OK)):
        raise ValueError(f"{out}: not writable")


def main(argv: list[str]) -> int:
    if Figure is None:
        return fail("matplotlib is not installed: pip install -e '.[eval]'")
    parser = _Parser(prog="python -m lingua_mem.plot",
                     description="Train loss, val loss and facts QA exact match of runs, against tokens "
                                 "and training FLOPs.")
    parser.add_argument("dump_dirs", nargs="+", metavar="DUMP_DIR", help="a training run's dump dir")
    parser.add_argument("--out", required=True, help="the PNG to write")
    parser.add_argument("--x", choices=["tokens", "flops", "both"], default="both", help="the x axes")
    try:
        args = parser.parse_args(argv)
        _check(args.dump_dirs, args.out)
    except ValueError as exc:
        return fail(exc)
    runs = [{**load_run(d), "dir": d} for d in args.dump_dirs]
    try:
        plot(runs, Path(args.out), ["tokens", "flops"] if args.x == "both" else [args.x])
    except OSError as exc:
        return fail(f"{args.out}: cannot write ({exc})")
    points = sum(len(run["train"]) + len(run["eval"]) for run in runs)
    print(f"wrote {args.out} ({len(runs)} runs, {points} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
