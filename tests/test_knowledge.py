"""The knowledge experiment's command end to end on its tiny preset (two runs of four steps):
the runs train and evaluate, the report, results and plots are written, and a rerun reads the
finished runs back instead of training them again. A SIGTERM to the command stops its run too
(no process left behind) and the same command continues; a folder of another preset's run is
refused, not read back."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.knowledge.report import at_flops, headline

ROOT = Path(__file__).resolve().parents[1]


def run_preset(preset: str, out: Path) -> subprocess.CompletedProcess:
    """`python -m experiments.knowledge --preset PRESET --out OUT`, which must succeed."""
    pytest.importorskip("matplotlib")
    cmd = [sys.executable, "-m", "experiments.knowledge", "--preset", preset, "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


def processes_naming(text: str) -> list[int]:
    """The pids of the processes whose command line holds `text`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            pass
    return pids


def stop_while_training(preset: str, out: Path) -> subprocess.CompletedProcess:
    """Start the preset, send the command SIGTERM once its first run trains; its result."""
    cmd = [sys.executable, "-m", "experiments.knowledge", "--preset", preset, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not any("step " in log.read_text() for log in out.glob("runs/*/train.log")):
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def test_the_tiny_preset_runs_end_to_end_and_resumes(tmp_path):
    stopped = stop_while_training("tiny", tmp_path)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    assert stopped.stderr.startswith("error: stopped by SIGTERM: run d32_dense_lr0.003 stopped too")
    assert stopped.stderr.count("\n") == 1 and "the same command continues" in stopped.stderr
    assert processes_naming(str(tmp_path)) == []  # the run's train.py went with it: no lock held
    assert not (tmp_path / "runs" / "d32_dense_lr0.003" / "result.json").exists()
    proc = run_preset("tiny", tmp_path)  # continues
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
    run_preset("tiny", tmp_path)
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert (tmp_path / "runs" / "d32_dense_lr0.003" / "train.log").read_text().count("model:") == 2


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


# --- the family comparisons (table1, scaling) ----------------------------------------------


def test_table1_tiny_runs_end_to_end_and_reports_over_seeds(tmp_path):
    proc = run_preset("table1_tiny", tmp_path)
    assert "[2/2] memory+_seed0: recall EM " in proc.stdout and "ETA" in proc.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["dense_seed0", "memory+_seed0"]
    assert [g["group"] for g in results["groups"]] == ["dense", "memory+"]
    dense, memory = results["runs"]
    # equal training FLOPs: the cheaper memory model trains on more steps, to within one step
    assert memory["flops_per_token"] < dense["flops_per_token"] and memory["steps"] > dense["steps"]
    assert abs(memory["train_flops"] - dense["train_flops"]) <= memory["train_flops"] / memory["steps"]
    assert "| memory+ | 1 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "table1.png").read_bytes()[:4] == b"\x89PNG"
    # table1 into the same folder: its dense_seed0 is not table1_tiny's (one line, exit 2, kept)
    cmd = [sys.executable, "-m", "experiments.knowledge", "--preset", "table1", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "runs/dense_seed0 holds another run (experiment 'table1_tiny' there, 'table1' here" in proc.stderr
    assert json.loads((tmp_path / "runs" / "dense_seed0" / "result.json").read_text()) == dense


COUNTS = [("table1", 18), ("scaling", 24), ("table1_gpu", 18), ("scaling_gpu", 27)]


@pytest.mark.parametrize("preset,n", COUNTS)
def test_the_comparisons_dry_run_lists_their_runs_at_equal_flops(preset, n):
    from experiments.knowledge.families import COMPARISONS, common, flops_per_token, runs

    c = COMPARISONS[preset]
    plan = runs(c)
    assert len(plan) == n and len({r.name for r in plan}) == n
    assert {r.name.rsplit("_seed", 1)[1] for r in plan} == {"0", "1", "2"}
    budget = flops_per_token(c, plan[0].overrides) * c.dense_steps  # the dense base's
    for r in plan:
        steps = int(dict(o.split("=", 1) for o in r.overrides)["steps"])
        fpt = flops_per_token(c, r.overrides)
        if r.size.startswith("dense_"):  # scaling's references: the base's tokens, more FLOPs
            assert steps == c.dense_steps and fpt > 1.8 * budget / c.dense_steps
        else:
            assert abs(steps * fpt - budget) <= fpt / 2
    if c.kind == "scaling":  # at least 5 memory sizes, log-spaced
        sizes = sorted({r.n_keys**2 for r in plan if r.kind == "memory"})
        ratios = {b / a for a, b in zip(sizes, sizes[1:], strict=False)}
        assert len(sizes) >= 5 and len(ratios) == 1
    else:
        assert {r.size for r in plan} == {"dense", "moe", "peer", "memory", "memory+", "ultramem"}
    if not preset.endswith("_gpu"):  # the command itself, once a kind
        cmd = [sys.executable, "-m", "experiments.knowledge", "--preset", preset, "--dry-run"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and len(proc.stdout.splitlines()) == n + 1
        assert f"expected {c.expected_minutes:g} min on {c.machine}" in proc.stdout
    assert all(k in " ".join(common(c)) for k in ("memory.k_dim=null", "eval.tasks=val,facts_qa"))


def test_the_scaling_report_takes_means_and_standard_errors(tmp_path):
    pytest.importorskip("matplotlib")
    from experiments.knowledge.compare import mean_se, plot, summarise
    from experiments.knowledge.families import COMPARISONS

    def result(group, kind, n_keys, recall, fpt):
        return {"size": group, "kind": kind, "n_keys": n_keys, "value_params": n_keys**2 * 64,
                "total_params": 1000, "dense_params": 900, "flops_per_token": fpt, "steps": 10,
                "train_flops": 10 * fpt, "seconds": 1.0, "recall_em": recall, "qa_em": 0.0, "val_loss": 1.0,
                "recall_bits": 100 * recall}

    results = [result("dense", "dense", 0, x, 100) for x in (0.1, 0.2, 0.3)]
    results += [result(f"mem{k * k}", "memory", k, x, 90) for k in (64, 128) for x in (0.3, 0.4)]
    results += [result("dense_d96", "dense", 0, 0.5, 200)]
    rows = summarise(results)
    assert [r["group"] for r in rows] == ["dense", "mem4096", "mem16384", "dense_d96"]
    assert rows[0]["recall_em"] == pytest.approx(0.2)
    assert rows[0]["recall_em_se"] == pytest.approx(0.1 / 3**0.5)
    assert mean_se([0.5]) == (0.5, 0.0)
    assert plot(COMPARISONS["scaling"], rows, tmp_path).read_bytes()[:4] == b"\x89PNG"
