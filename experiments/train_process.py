"""train.py (or another entry point) in a process of its own, logged to a file: how the
experiments run each of their runs."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class RunFailed(RuntimeError):
    """A run that exited non-zero; the message names its log."""


def run_logged(cmd: list[str], log_path: Path, what: str) -> float:
    """Run `python <cmd...>` from the repository root, stdout and stderr appended to log_path;
    RunFailed naming the log if it fails. Returns the seconds it took."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(log_path, "a") as log:
        proc = subprocess.run([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise RunFailed(f"{what} failed (exit {proc.returncode}); see {log_path}")
    return time.perf_counter() - started
