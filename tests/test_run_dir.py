"""The dump dir: checked writable before any work, and locked against a second run
(run.lock: live holders refuse, dead or stale ones are taken over)."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lingua_mem.config import ConfigError, load_config
from lingua_mem.run_dir import LOCK, RunLock
from lingua_mem.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32",
        "memory.layers=[1]", "memory.n_keys=8", "memory.heads=2", "memory.knn=4", "data.seq_len=16",
        "data.batch_size=2", "data.facts.people=20", "logging.console=false", "steps=2",
        "checkpoint.every=0"]


def tiny(dump_dir, *overrides):
    return load_config(["config=configs/debug.yaml", f"dump_dir={dump_dir}", *TINY, *overrides])


def run_train(dump_dir, *overrides):
    cmd = [sys.executable, "train.py", "config=configs/debug.yaml", f"dump_dir={dump_dir}", *TINY, *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def write_lock(dump_dir: Path, mtime_age: float = 0.0, **holder) -> Path:
    dump_dir.mkdir(parents=True, exist_ok=True)
    path = dump_dir / LOCK
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start": "then",
                                "slurm_job": None, "token": "t0", **holder}))
    if mtime_age:
        old = time.time() - mtime_age
        os.utime(path, (old, old))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()  # reaped: its pid names no process now
    return proc.pid


def test_a_dump_dir_under_a_file_stops_before_any_work(tmp_path):
    (tmp_path / "file").write_text("")
    proc = run_train(tmp_path / "file" / "run")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: dump_dir: cannot write to "), proc.stderr
    assert lines[0] == (f"error: dump_dir: cannot write to {tmp_path / 'file' / 'run'}: "
                        f"{tmp_path / 'file'} is a file, not a directory")


def test_a_dump_dir_without_write_permission_stops_before_any_work(tmp_path):
    if os.geteuid() == 0:  # root ignores file modes; sysfs refuses root too
        target = Path("/sys/lingua_mem_test_run")
    else:
        (tmp_path / "locked").mkdir(mode=0o500)
        target = tmp_path / "locked" / "run"
    proc = run_train(target)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"error: dump_dir: cannot write to {target}: " in lines[0], proc.stderr
    reason = lines[0].rsplit(": ", 1)[1]
    assert reason in ("Permission denied", "Operation not permitted", "Read-only file system"), reason
    assert not target.exists()


def test_a_live_run_holds_its_dump_dir(tmp_path):
    write_lock(tmp_path)  # this test's own (live) process on this host
    proc = run_train(tmp_path)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"host {socket.gethostname()}, pid {os.getpid()}, started then" in lines[0]
    assert not (tmp_path / "metrics.jsonl").exists()  # nothing written
    assert json.loads((tmp_path / LOCK).read_text())["token"] == "t0"  # the holder's lock is kept


@pytest.mark.parametrize("holder,age,taken", [
    ({"pid": None}, 0, True),  # killed on this host (pid filled in below)
    ({"host": "node-that-died"}, 3600, True),  # not touched for an hour: its node died
    ({"host": "other-node"}, 0, False),  # touched just now on another node: alive
    ({"host": "other-node", "slurm_job": "4242"}, 0, True),  # this SLURM job, requeued
])
def test_stale_locks_are_taken_over_and_live_ones_refuse(tmp_path, monkeypatch, holder, age, taken):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    if holder.get("pid", 0) is None:
        holder = {"pid": dead_pid()}
    write_lock(tmp_path, mtime_age=age, **holder)
    if taken:
        assert train(tiny(tmp_path))["step"] == 2
        assert not (tmp_path / LOCK).exists()  # released at the end
    else:
        with pytest.raises(ConfigError, match="is in use by the run of host other-node"):
            train(tiny(tmp_path))


def test_the_lock_is_held_while_training_and_beats(tmp_path):
    lock = RunLock(tmp_path, heartbeat_s=0.05)
    lock.acquire()
    try:
        holder = json.loads((tmp_path / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        before = (tmp_path / LOCK).stat().st_mtime
        os.utime(tmp_path / LOCK, (before - 100, before - 100))
        time.sleep(0.3)
        assert (tmp_path / LOCK).stat().st_mtime > before - 50  # the heartbeat touched it
        with pytest.raises(ConfigError, match="is in use"):
            RunLock(tmp_path).acquire()  # a second run in this process's lifetime
    finally:
        lock.release()
    assert not (tmp_path / LOCK).exists()


def test_a_fresh_dump_dir_with_real_sources_gets_its_lock(tmp_path):
    src = tmp_path / "corpus"
    src.mkdir()
    docs = [json.dumps({"text": f"document {i} " * 8}) + "\n" for i in range(40)]
    (src / "a.jsonl").write_text("".join(docs))
    dump = tmp_path / "new" / "run"  # nothing there yet: the lock is the dump dir's first file
    assert train(tiny(dump, f"data.sources.web.path={src}"))["step"] == 2
    assert not (dump / LOCK).exists()


def test_lock_takeover_races_and_foreign_files(tmp_path):
    lock = RunLock(tmp_path)
    lock._take_over(b"gone")  # another taker moved it first: no error, acquire looks again
    (tmp_path / LOCK).write_text("")  # not a lock this code writes (it never leaves one half-written)
    with pytest.raises(ConfigError, match="exists but is not a lock this code wrote"):
        RunLock(tmp_path).acquire()
    old = time.time() - 3600
    os.utime(tmp_path / LOCK, (old, old))  # ... and an hour old: taken over
    lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK).read_text())["token"] == lock.token
    finally:
        lock.release()


def test_a_fresh_start_keeps_the_earlier_metrics(tmp_path):
    train(tiny(tmp_path, "log_every=1"))  # no checkpoint: a rerun starts afresh
    first = (tmp_path / "metrics.jsonl").read_text()
    train(tiny(tmp_path, "log_every=1", "seed=3"))
    assert (tmp_path / "metrics.1.jsonl").read_text() == first
    assert (tmp_path / "metrics.jsonl").read_text() != first


def test_files_written_atomically_are_0644_and_a_failed_write_leaves_the_old_one(tmp_path):
    # eval's JSON, the usage files and the facts corpus: mkstemp's 0600 made them unreadable
    # to the rest of a team (every other file the project writes is 0644)
    import os
    import stat

    from lingua_mem.eval.runner import _write_json
    from lingua_mem.run_dir import written_atomically

    out = tmp_path / "evals" / "42.json"
    _write_json(out, {"step": 42})
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o644 and out.read_text() == '{\n  "step": 42\n}\n'
    try:
        with written_atomically(out) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert out.read_text() == '{\n  "step": 42\n}\n'
    assert sorted(p.name for p in out.parent.iterdir()) == ["42.json"]  # no temporary left
