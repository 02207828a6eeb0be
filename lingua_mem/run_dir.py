"""The dump dir a run owns: checked writable before any work, and locked against a
second run.

<dump_dir>/run.lock holds {host, pid, start, slurm_job, token} of the run training
there. It is written aside and hard-linked into place (link fails when the lock exists,
as O_EXCL does, and is atomic on local filesystems, NFS and Lustre, where flock may be
missing or unreliable), so a lock file is never seen half-written. While the run lives
a thread touches the file every `heartbeat_s` seconds. A lock is stale, and
taken over, when
  - its holder ran on this host and that process is gone (kill -9, a crash),
  - its holder is this SLURM job (a requeued job re-takes its own lock), or
  - it has not been touched for `stale_s` seconds (its node died), measured against
    the mtime of a file touched now in the same folder (the NFS server's clock, not
    this host's; on Lustre the clients set it, so their clocks must agree).
Any other lock refuses the run: one line naming the holder, exit 2.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from lingua_mem.errors import ConfigError

LOCK = "run.lock"


@contextlib.contextmanager
def written_atomically(path: str | Path) -> Iterator[Path]:
    """A temporary file beside `path` (yielded) that becomes `path` by a rename when the block
    ends without error, and is removed otherwise: a reader sees the old file or the whole new
    one. Mode 0644, as every file the project writes (mkstemp makes 0600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def facts_dir(dump_dir: str | Path) -> Path:
    """Where a run on the default data keeps its generated facts corpus."""
    return Path(dump_dir) / "data" / "facts"


def dump_dir_of(checkpoint: str | Path) -> Path:
    """The dump dir of a training checkpoint, <dump_dir>/checkpoints/<step>."""
    return Path(checkpoint).parent.parent


def usage_file(checkpoint: str | Path, training: bool) -> Path:
    """Where `python -m lingua_mem.eval.usage` writes a checkpoint's row counts by default:
    <dump_dir>/memory_usage/<step>.safetensors for a training checkpoint (beside its
    checkpoints/, which retention prunes), an export's own folder otherwise."""
    checkpoint = Path(checkpoint)
    if training:
        return dump_dir_of(checkpoint) / "memory_usage" / f"{checkpoint.name}.safetensors"
    return checkpoint / "memory_usage.safetensors"


def check_output(out: str | Path, reads: list[str | Path], key: str = "--out", replaces: bool = True) -> None:
    """Refuse (ValueError, one line naming `key`) an output a command would write, or replace
    with --force, that
      - is, contains or lies inside anything the command reads (`reads`);
      - is, contains or lies inside a run's checkpoints/ folder: the read checkpoint's, or
        a live run's (retention prunes what is there; a sibling step is another checkpoint);
      - is or contains a run's dump dir while it holds run.lock (a run is training there).
    A folder of its own inside a dump dir (memory_usage/, exports/) is fine: training never
    touches it. `replaces=False`: a command that only adds its own files to `out` (eval.py's
    evals/<step>.json), so only an output that is or lies inside a checkpoints/ folder is
    refused (writing beside what it reads, or into a live run's dump dir, destroys nothing).
    Checked before anything is written or removed."""
    target = Path(out).resolve()
    guarded = []  # (path, why, whether an output inside it is refused too)
    for path in map(Path, reads):
        if replaces:
            guarded.append((path.resolve(), "which this command reads", True))
        if path.parent.name == "checkpoints":
            guarded.append((path.parent.resolve(), "a run's checkpoints, which retention prunes", True))
    locks = [d / LOCK for d in (target, *target.parents)]
    if target.is_dir():
        locks += list(target.rglob(LOCK))
    for lock in filter(Path.is_file, locks):
        if replaces:
            guarded.append((lock.parent, f"the dump dir of a live run ({LOCK})", False))
        guarded.append((lock.parent / "checkpoints", "a live run's checkpoints (retention prunes)", True))
    for path, why, inside_too in guarded:
        if target == path:
            where = "is"
        elif replaces and path.is_relative_to(target):
            where = "contains"
        elif inside_too and target.is_relative_to(path):
            where = "lies inside"
        else:
            continue
        raise ValueError(f"{key} {out}: {where} {path}, {why}; choose another {key}")


def staging_dir(out: str | Path) -> Path:
    """Where a command writes `out` before renaming it into place: a hidden folder beside it
    named by this process (.<name>.partial-<pid>). Those a killed run of the same output left
    behind (their process gone) are removed first; a live writer's are left alone."""
    out = Path(out)
    for left in out.parent.glob(f".{glob.escape(out.name)}.partial-*"):
        pid = left.name.rpartition("-")[2]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(left, ignore_errors=True)
    return out.with_name(f".{out.name}.partial-{os.getpid()}")


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


def pid_alive(pid: int) -> bool:
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
        if holder.get("host") == socket.gethostname() and not pid_alive(int(holder.get("pid", -1))):
            return True
        return self._now_on_fs() - mtime > self.stale_s

    def _take_over(self, judged: bytes) -> None:
        """Set the stale lock aside, unless someone else replaced it meanwhile (its bytes differ
        from those judged stale: a lock file is never seen half-written, see _create)."""
        aside = self.path.with_name(f"{LOCK}.stale-{self.token}")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:  # another taker was first: look again
            return
        if aside.read_bytes() == judged:
            aside.unlink()
            return
        try:  # it was a new holder's lock: put it back
            os.link(aside, self.path)
        except FileExistsError:
            pass
        aside.unlink()

    def _create(self, me: dict) -> bool:
        """Publish a complete lock file atomically: written aside, then hard-linked into place
        (link fails if the lock exists, like O_EXCL, and works on NFS and Lustre)."""
        staged = self.path.with_name(f".{LOCK}.{self.token}")
        with staged.open("w") as f:
            json.dump(me, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(staged, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            staged.unlink()

    def acquire(self) -> None:
        """Take the lock or raise ConfigError naming its live holder."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.strftime("%Y-%m-%d %H:%M:%S"),
              "slurm_job": _slurm_job(), "token": self.token}
        for _ in range(5):
            if self._create(me):
                self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
                self._thread.start()
                return
            try:
                raw, mtime = self.path.read_bytes(), self.path.stat().st_mtime
            except FileNotFoundError:  # released meanwhile: try again
                continue
            try:
                holder = json.loads(raw)
            except ValueError:  # not a lock this code wrote: judged by its age alone
                holder = {}
            if not self._stale(holder, mtime):
                if not holder:
                    raise ConfigError(f"dump_dir: {self.path} exists but is not a lock this code wrote; "
                                      "delete it if no run uses this dump_dir") from None
                raise ConfigError(
                    f"dump_dir: {self.path.parent} is in use by the run of host {holder.get('host')}, "
                    f"pid {holder.get('pid')}, started {holder.get('start')} (lock {self.path}); use "
                    "another dump_dir, or delete the lock if that run is dead") from None
            self._take_over(raw)
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


def take_lock(dump_dir: str | Path) -> RunLock:
    """The run's lock on dump_dir, created if need be (the lock may be its first file)."""
    Path(dump_dir).mkdir(parents=True, exist_ok=True)
    lock = RunLock(dump_dir)
    lock.acquire()
    return lock
