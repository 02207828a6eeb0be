"""The continual-learning experiment's command end to end on its tiny preset: pretraining,
background usage, the three finetuning methods, the report and the plot; a rerun reads every
stage back; and the matched-learning comparison reads the curves between evaluations."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.continual.report import at_b_recall, matched

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_preset_runs_end_to_end_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "experiments.continual", "--preset", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[3/3] sparse_lr10: B recall " in proc.stdout and "ETA" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    runs = results["runs"]
    assert [r["name"] for r in runs] == ["full_lr0.001", "lora_lr0.01", "sparse_lr10"]
    for r in runs:  # step 0 is the pretrained model, then evals=2 of 4 steps
        assert [c["step"] for c in r["curve"]] == [0, 2, 4]
        assert r["curve"][0] == results["start"]
    # at most finetune.top_t=8 rows a step: those of positive tf-idf, and with 2 background
    # batches a row both read scores log(3/3) = 0 (4 of the last step's rows on corpus v4)
    assert 1 <= runs[2]["rows_updated"] <= 8
    full, lora, sparse = (r["curve"][-1]["heldout_loss"] for r in runs)
    assert full != results["start"]["heldout_loss"] and lora != full and sparse != full
    report = (tmp_path / "report.md").read_text()
    assert "## At matched learning" in report and "| sparse | sparse_lr10 |" in report
    assert (tmp_path / "learning_vs_forgetting.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "usage.safetensors").is_file()
    # a rerun trains nothing: every stage is read back
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert json.loads((tmp_path / "results.json").read_text())["runs"] == runs
    assert (tmp_path / "runs" / "pretrain" / "train.log").read_text().count("model:") == 1


def test_matched_learning_reads_the_curves_between_evaluations():
    def curve(*points):
        return [{"step": 10 * i, "b_recall": b, "a_recall": a, "heldout_loss": loss}
                for i, (b, a, loss) in enumerate(points)]

    start = {"b_recall": 0.0, "a_recall": 0.5, "heldout_loss": 1.0}
    fast = curve((0.0, 0.5, 1.0), (0.4, 0.1, 2.0))  # learns B fast, forgets A
    slow = curve((0.0, 0.5, 1.0), (0.1, 0.5, 1.0), (0.2, 0.4, 1.2))  # reaches 0.2 only
    assert at_b_recall(fast, 0.2, "a_recall") == pytest.approx(0.3)
    assert at_b_recall(slow, 0.2, "a_recall") == pytest.approx(0.4)
    assert at_b_recall(slow, 0.3, "a_recall") is None and at_b_recall(fast, 0.0, "step") == 0
    flat = curve((0.0, 0.5, 1.0), (0.02, 0.5, 1.0))  # never learns B: not where the others are compared
    results = [{"name": "f", "method": "full", "lr": 1, "lr_key": "optim.lr", "curve": fast},
               {"name": "s", "method": "sparse", "lr": 1, "lr_key": "optim.value_lr", "curve": slow},
               {"name": "n", "method": "none", "lr": 1, "lr_key": "optim.value_lr", "curve": flat}]
    target, rows = matched(results, start)
    assert target == pytest.approx(0.2)  # the highest B recall both learning methods reach
    by = {r["method"]: r for r in rows}
    assert by["full"]["a_drop"] == pytest.approx(0.4) and by["sparse"]["a_drop"] == pytest.approx(0.2)
    assert by["full"]["step"] == pytest.approx(5) and by["sparse"]["heldout_increase"] == pytest.approx(0.2)
    assert by["none"]["a_recall"] is None and by["none"]["b_recall"] == pytest.approx(0.02)
