"""The dump dir a run owns: checked writable before any work, and locked against a
second run.

<dump_dir>/run.lock holds {host, pid, start, slurm_job, token} of the run training
there. It is created with O_CREAT | O_EXCL, which is atomic on local filesystems and
on NFS (v3 and later) and Lustre, where flock may be missing or unreliable. While the
run lives a thread touches the file every `heartbeat_s` seconds. A lock is stale, and
taken over, when
  - its holder ran on this host and that process is gone (kill -9, a crash),
  - its holder is this SLURM job (a requeued job re-takes its own lock), or
  - it has not been touched for `stale_s` seconds (its node died), measured against
    the filesystem's own clock (the mtime of a file touched now), not this host's.
Any other lock refuses the run: one line naming the holder, exit 2.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
import uuid
from pathlib import Path

from lingua_mem.config import ConfigError

LOCK = "run.lock"


def check_writable(dump_dir: str | Path) -> None:
    """Prove that dump_dir can be written (a file created and removed in it, or in the
    nearest folder that exists when it does not yet: nothing is left behind); ConfigError
    naming the path and the reason (under a file, read-only, no permission) otherwise."""
    path = Path(dump_dir).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"dump_dir: cannot write to {dump_dir}: {existing} is a file, not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".lingua_mem-write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"dump_dir: cannot write to {dump_dir}: {exc.strerror or exc}") from None


def _slurm_job() -> str | None:
    job, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{job}_{task}" if job and task else os.environ.get("SLURM_JOB_ID")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    try:  # a zombie (killed, not yet reaped) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


class RunLock:
    def __init__(self, dump_dir: str | Path, heartbeat_s: float = 30.0, stale_s: float = 300.0):
        self.path = Path(dump_dir) / LOCK
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _now_on_fs(self) -> float:
        probe = self.path.with_name(f".clock-{self.token}")
        probe.write_bytes(b"")
        try:
            return probe.stat().st_mtime
        finally:
            probe.unlink()

    def _stale(self, holder: dict, mtime: float) -> bool:
        if holder.get("slurm_job") and holder.get("slurm_job") == _slurm_job():
            return True
        if holder.get("host") == socket.gethostname() and not _alive(int(holder.get("pid", -1))):
            return True
        return self._now_on_fs() - mtime > self.stale_s

    def _take_over(self, holder: dict) -> None:
        """Set the stale lock aside, unless someone else replaced it meanwhile."""
        aside = self.path.with_name(f"{LOCK}.stale-{self.token}")
        os.replace(self.path, aside)
        try:
            moved = json.loads(aside.read_text())
        except (OSError, ValueError):
            moved = {}
        if moved.get("token") == holder.get("token"):
            aside.unlink()
            return
        try:  # it was a new holder's lock: put it back
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink()

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming its live holder."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slurm_job": _slurm_job(), "token": self.token}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder, mtime = json.loads(self.path.read_text()), self.path.stat().st_mtime
                except FileNotFoundError:  # released meanwhile: try again
                    continue
                except ValueError:  # half-written by a holder killed while writing it
                    holder, mtime = {}, self.path.stat().st_mtime
                if not self._stale(holder, mtime):
                    raise ConfigError(
                        f"dump_dir: {self.path.parent} is in use by the run of host {holder.get('host')}, "
                        f"pid {holder.get('pid')}, started {holder.get('start')} (lock {self.path}); use "
                        "another dump_dir, or delete the lock if that run is dead") from None
                self._take_over(holder)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise ConfigError(f"dump_dir: could not take the lock {self.path} (contended)")

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def release(self) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, ValueError):
            pass
