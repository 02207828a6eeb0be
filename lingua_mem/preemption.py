"""Preemption: a signal (SIGUSR1 from SLURM's --signal, SIGTERM, ...) asks the run to
stop. The handler only sets a flag; the trainer checks it after each step (all
ranks agree, since a signal may reach only some), checkpoints, requeues the SLURM
job and exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import torch
import torch.distributed as dist

# the signals ranks agree on, by code (index + 1); the highest code any rank received wins, so a
# preemption (SIGTERM, SIGUSR*) that reached any rank is acted on (requeue) over a Ctrl-C
AGREED_SIGNALS = ("SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2", "SIGTERM")


class PreemptionFlag:
    """Installs handlers for `signal_names` (main thread only); `close` restores the old ones.
    `received`: the signal this run stops for, once `requested` says so: on every rank the
    same (agreed), and `elsewhere` is True on a rank the signal did not reach."""

    def __init__(self, signal_names: list[str]):
        self.received: str | None = None
        self.elsewhere = False
        self._previous = {}
        if threading.current_thread() is not threading.main_thread():
            return
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def requested(self, distributed: bool, device: torch.device) -> bool:
        """True on every rank once any rank has received a signal (a collective when distributed).
        The flag travels as a CPU tensor where the default group serves CPU tensors (the
        trainer's does: cuda:nccl,cpu:gloo): asked after every step, it must not wait for the
        GPU (a CUDA tensor's .item() would, each step); else on `device`."""
        if not distributed:
            return self.received is not None
        if "cpu:" in dist.get_backend_config():
            device = torch.device("cpu")
        mine = AGREED_SIGNALS.index(self.received) + 1 if self.received in AGREED_SIGNALS else 0
        flag = torch.tensor([float(mine)], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        agreed = int(flag.item())
        if agreed:
            self.elsewhere = self.received is None
            self.received = AGREED_SIGNALS[agreed - 1]
        return bool(agreed)

    def close(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}


def requeue_slurm_job(announce: str = "", file=None) -> bool:
    """`scontrol requeue $SLURM_JOB_ID` when running under SLURM; True if requeued.
    `announce` is printed first, as "<announce>: requeueing SLURM job <id>": the requeue ends
    the job's processes, possibly before a line printed after it reaches the log."""
    job = os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID")
    job_id = (f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}" if job
              else os.environ.get("SLURM_JOB_ID"))
    if not job_id:
        return False
    if announce:
        print(f"{announce}: requeueing SLURM job {job_id}", file=file or sys.stdout, flush=True)
    try:
        proc = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"warning: scontrol requeue {job_id} failed: {exc}", file=sys.stderr, flush=True)
        return False
    if proc.returncode != 0:
        print(f"warning: scontrol requeue {job_id} failed: {proc.stderr.strip()}", file=sys.stderr,
              flush=True)
        return False
    return True
