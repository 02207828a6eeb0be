"""The knowledge experiment's command end to end on its tiny preset (two runs of four steps):
the runs train and evaluate, the report, results and plots are written, and a rerun reads the
finished runs back instead of training them again."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments.knowledge.report import at_flops, headline

ROOT = Path(__file__).resolve().parents[1]


def test_the_tiny_preset_runs_end_to_end_and_resumes(tmp_path):
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "experiments.knowledge", "--preset", "tiny", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "[2/2] d32_mem8_vlr0.01: recall EM " in proc.stdout and "ETA" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results] == ["d32_dense_lr0.003", "d32_mem8_vlr0.01"]
    dense, memory = results
    assert dense["value_params"] == 0 and memory["value_params"] == 64 * 32  # 8**2 rows of v_dim = dim
    assert dense["tokens"] == memory["tokens"] == 4 * 4 * 64  # the same tokens for every run
    assert dense["flops_per_token"] != memory["flops_per_token"]
    assert [c["step"] for c in memory["curve"]] == [2, 4]  # evals=2: every 2 steps and the last
    assert memory["memory"]["memory/layer1/usage"] > 0
    assert memory["train_loss"] < 5.6 and memory["val_loss"] == memory["curve"][-1]["val_loss"]
    report = (tmp_path / "report.md").read_text()
    assert "| d32_dense_lr0.003 |" in report
    assert "| recall | d32 | d32_dense_lr0.003 | d32_mem8_vlr0.01 |" in report
    assert "| qa | d32 | d32_dense_lr0.003 | d32_mem8_vlr0.01 |" in report
    # both question sets: every fact, in training's words and in new ones
    assert all(0 <= r[k] <= 1 for r in results for k in ("recall_em", "qa_em"))
    for png in ("facts_vs_flops.png", "bits_vs_params.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"
    # a rerun trains nothing: the finished runs are read back
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "runs" / "d32_dense_lr0.003" / "train.log").read_text().count("model:") == 1


def test_equal_flops_reads_the_curves_between_evaluations():
    curve = [{"flops": 10.0, "recall_em": 0.2}, {"flops": 20.0, "recall_em": 0.6}]
    assert at_flops(curve, 5.0) == pytest.approx(0.1) and at_flops(curve, 15.0) == pytest.approx(0.4)
    assert at_flops(curve, 30.0) == 0.6
    run = {"size": "s", "val_loss": 1.0, "curve": curve}
    rows = headline([{**run, "name": "d", "kind": "dense", "recall_em": 0.6, "train_flops": 20.0},
                     {**run, "name": "m", "kind": "memory", "recall_em": 0.6, "train_flops": 15.0,
                      "curve": [{"flops": 15.0, "recall_em": 0.6}]}])
    # compared at the smaller budget, 15: the dense run had 0.4 there
    assert rows == [{"size": "s", "dense": "d", "memory": "m", "flops": 15.0, "dense_em": pytest.approx(0.4),
                     "memory_em": 0.6, "ratio": pytest.approx(1.5)}]
