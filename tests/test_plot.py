"""lingua_mem.plot: the series read from a run's dump dir, the PNG, and the input errors."""

import json
import os

import matplotlib.image
import pytest

from lingua_mem.plot import load_run, main, plot

FPT_A, FPT_B = 6.0e6, 1.2e7  # flops_per_token of the two runs


def _write(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


@pytest.fixture
def runs(tmp_path):
    """Two runs: run_a (config.yaml name "baseline", resumed: step 20 logged twice, a cut-short
    last line, an evals/ file at step 10 and one at step 20 that metrics.jsonl already has) and
    run_b (no config.yaml, no facts QA, flops_per_token in its eval rows)."""
    a, b = tmp_path / "run_a", tmp_path / "run_b"
    train = lambda step, loss, fpt: {"step": step, "loss": loss, "tokens": step * 1000,
                                     "flops_per_token": fpt, "lr": 1e-3}
    _write(a / "metrics.jsonl", [
        train(10, 5.0, FPT_A), train(20, 4.8, FPT_A),
        {"step": 20, "tokens": 20000, "eval": True, "val/loss": 4.9, "val/ppl": 134.3,
         "facts_qa/exact_match": 0.1, "facts_qa/f1": 0.2},
        train(20, 4.5, FPT_A),  # the resumed run logs step 20 again: this one is kept
        {"loss": 9.9, "tokens": 1},  # no step: skipped
        train(30, 4.0, FPT_A),
        {"step": 30, "tokens": 30000, "eval": True, "val/loss": 4.2},  # no facts_qa
    ], tail='{"step": 40, "loss": 3.')  # cut short by a kill
    (a / "config.yaml").write_text("name: baseline\nsteps: 40\n")
    _write(a / "evals" / "0000000010.json",
           [{"step": 10, "tokens": None, "metrics": {"val/loss": 5.1, "facts_qa/exact_match": 0.05}}])
    _write(a / "evals" / "0000000020.json",
           [{"step": 20, "tokens": 20000, "metrics": {"val/loss": 99.0}}])  # metrics.jsonl has step 20
    _write(b / "metrics.jsonl", [
        train(5, 6.0, FPT_B), train(10, 5.5, FPT_B),
        {"step": 10, "tokens": 10000, "eval": True, "val/loss": 5.6, "flops_per_token": FPT_B},
    ])
    return a, b


def test_load_run(runs):
    a, b = runs
    run = load_run(a)
    assert run["name"] == "baseline"
    assert run["train"] == [(10000, 10000 * FPT_A, 5.0), (20000, 20000 * FPT_A, 4.5),
                            (30000, 30000 * FPT_A, 4.0)]
    tokens = [t for t, _, _ in run["eval"]]
    assert tokens == [10000, 20000, 30000]  # the evals/ file of step 10 takes its step's tokens
    assert [f for _, f, _ in run["eval"]] == [t * FPT_A for t in tokens]  # flops_per_token of the train rows
    assert [m["val/loss"] for _, _, m in run["eval"]] == [5.1, 4.9, 4.2]  # not evals/'s 99.0 at step 20
    assert [m.get("facts_qa/exact_match") for _, _, m in run["eval"]] == [0.05, 0.1, None]
    assert run["eval"][1][2]["val/ppl"] == 134.3

    run = load_run(b)
    assert run["name"] == "run_b"
    assert run["train"] == [(5000, 5000 * FPT_B, 6.0), (10000, 10000 * FPT_B, 5.5)]
    assert run["eval"] == [(10000, 10000 * FPT_B, {"val/loss": 5.6})]


def test_evals_only(tmp_path):
    d = tmp_path / "evals_only"
    _write(d / "evals" / "5.json", [{"step": 5, "tokens": 500, "metrics": {"val/loss": 3.0}}])
    (d / "evals" / "6.json").write_text('{"step": 6, "tok')  # cut short
    run = load_run(d)
    assert run["train"] == [] and run["eval"] == [(500, None, {"val/loss": 3.0})]  # FLOPs unknown


@pytest.mark.parametrize("x, rows", [("both", 2), ("tokens", 1)])
def test_main_writes_png(runs, tmp_path, capsys, x, rows):
    out = tmp_path / "plot.png"
    assert main([str(runs[0]), str(runs[1]), "--out", str(out), "--x", x]) == 0
    assert capsys.readouterr().out.strip() == f"wrote {out} (2 runs, 9 points)"
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    height, width, _ = matplotlib.image.imread(out).shape
    assert height / width == pytest.approx((3.2 * rows + 0.6) / 13.5, abs=0.01)  # plot()'s figsize


def test_no_data_panel(runs, tmp_path):
    run = {**load_run(runs[1]), "dir": str(runs[1])}  # no facts QA
    fig = plot([run], tmp_path / "b.png", ["tokens", "flops"])
    axes = fig.axes
    assert [t.get_text() for t in axes[2].texts] == ["no data"]  # tokens x facts QA
    assert [t.get_text() for t in axes[5].texts] == ["no data"]  # flops x facts QA
    assert len(axes[1].texts) == 0 and axes[1].get_xscale() == "log"
    assert [label.get_text() for label in fig.legends[0].get_texts()] == ["run_b"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_errors(runs, tmp_path, capsys):
    out = str(tmp_path / "plot.png")
    missing, empty = tmp_path / "missing", tmp_path / "empty"
    empty.mkdir()
    assert main([str(runs[0]), str(missing), "--out", out]) == 2
    assert f"{missing}: no such directory" in _error(capsys)
    assert main([str(empty), "--out", out]) == 2
    assert f"{empty}: no metrics.jsonl and no evals/" in _error(capsys)
    assert main([str(runs[0]), "--out", str(tmp_path / "nodir" / "plot.png")]) == 2
    assert f"{tmp_path / 'nodir'}: no such directory" in _error(capsys)
    assert main([str(runs[0]), "--out", out, "--x", "steps"]) == 2
    assert "--x" in _error(capsys)
    assert main([str(runs[0]), "--out", str(tmp_path)]) == 2
    assert f"{tmp_path}: a directory, not a file" in _error(capsys)
    assert not os.path.exists(out)
