"""train.py (or another entry point) in a process of its own, logged to a file: how the
experiments run each of their runs.

A signal that asks the experiment to stop (SIGTERM, SIGINT, SIGHUP) is passed on to the run's
process, which checkpoints at the end of its step and exits; the experiment then stops in one
line (exit 128 + the signal's number), leaving no process behind and no lock held, and the
same command continues. The run's process has a session of its own, so a terminal's Ctrl-C
reaches it once, through the experiment.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from lingua_mem.cli import BAD_INPUT, fail
from lingua_mem.config import ConfigError

ROOT = Path(__file__).resolve().parents[1]
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class RunFailed(RuntimeError):
    """A run that exited non-zero; the message names its log."""


class Stopped(RunFailed):
    """The experiment was asked to stop by a signal while a run was going on."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def run_logged(cmd: list[str], log_path: Path, what: str) -> float:
    """Run `python <cmd...>` from the repository root, stdout and stderr appended to log_path;
    RunFailed naming the log if it fails, Stopped if a stop signal came meanwhile. Returns the
    seconds it took."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    received: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, frame) -> None:
        received.append(signum)
        if child and child[0].poll() is None:
            # SIGHUP (the terminal went away) is asked of the run as SIGTERM, which it checkpoints on
            child[0].send_signal(signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS} if main_thread else {}
    try:
        with open(log_path, "a") as log:
            child.append(subprocess.Popen([sys.executable, *cmd], cwd=ROOT, stdout=log,
                                          stderr=subprocess.STDOUT, start_new_session=True))
            if received:  # came between the handlers and the start: the run stops at once
                forward(received[0], None)
            returncode = child[0].wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        name = signal.Signals(received[0]).name
        raise Stopped(f"stopped by {name}: {what} stopped too (exit {returncode}; see {log_path}); "
                      "the same command continues", received[0])
    if returncode != 0:
        raise RunFailed(f"{what} failed (exit {returncode}); see {log_path}")
    return time.perf_counter() - started


def stop_on_signals() -> None:
    """Between runs (main thread), SIGTERM and SIGHUP end the experiment as Ctrl-C does: in
    one line, not a silent death. Call once, at the start of an experiment's command."""
    def stop(signum, frame) -> None:
        raise Stopped(f"stopped by {signal.Signals(signum).name} between runs; the same command continues",
                      signum)

    for s in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, stop)


def exit_line(exc: BaseException) -> int:
    """One line on stderr for an experiment that failed, was stopped or was interrupted
    between runs; returns its exit code (2 for bad input or a failed run, 128 + the signal)."""
    if isinstance(exc, KeyboardInterrupt):
        return fail("interrupted (SIGINT) between runs; the same command continues", 130)
    return fail(exc, getattr(exc, "exit_code", BAD_INPUT))


def experiment_main(main: Callable[[list[str]], int], argv: list[str]) -> int:
    """An experiment's command: stop signals between runs end it in one line (stop_on_signals),
    and a failed run, bad input or a stop is one line on stderr with its exit code."""
    stop_on_signals()
    try:
        return main(argv)
    except (RunFailed, ConfigError, KeyboardInterrupt) as exc:
        return exit_line(exc)
