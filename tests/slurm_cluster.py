"""A one-node SLURM cluster on localhost for the tests: munged, slurmctld and slurmd
with a generated slurm.conf under a temporary directory (proctrack/linuxproc,
task/none, no accounting, no cgroups). It installs nothing: slurm-wlm and munge
come from Debian's packages (.ci/run installs them). Needs root (slurmd starts
jobs as the submitting user)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing() -> str | None:
    """Why a cluster cannot start here, or None."""
    absent = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if absent:
        return f"SLURM/munge not installed ({', '.join(absent)} missing; .ci/run installs slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the local SLURM cluster needs root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _exe(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class LocalSlurm:
    """start() -> env (SLURM_CONF, PATH) for sbatch/squeue/scontrol; stop() ends every daemon."""

    def __init__(self, root: Path, cpus: int = 8, memory_mb: int = 16000, cred_expire: int = 10,
                 bf_interval: int = 1, sched_interval: int = 2):
        # cred_expire: the lifetime of a job step's credential, and so how long slurmctld holds a
        # requeued job before it may start again (slurmd refuses a job id whose credentials it has
        # revoked until they expire). Debian's default is 120 s, the hold the requeue tests used to
        # wait out; on one localhost node a credential is used within a second, so 10 s keeps the
        # hold (every requeue still waits it out) at a twelfth of the cost. Slurm's minimum is 5.
        # sched_interval: seconds between the main scheduler's passes over the whole queue. A
        # requeued job whose hold has ended is started by that pass alone (no event wakes the
        # scheduler then, and the backfill pass does not take it): the default 60 s left it
        # pending up to a minute after its hold. bf_interval (default 30 s): new jobs start
        # within a second. Neither changes what runs, only when the scheduler looks.
        self.root, self.cpus, self.memory_mb, self.cred_expire = Path(root), cpus, memory_mb, cred_expire
        self.bf_interval, self.sched_interval = bf_interval, sched_interval
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ)

    def start(self) -> dict:
        r = self.root
        for d in ("munge", "state", "spool", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        os.chmod(r / "munge", 0o700)
        key, sock = r / "munge" / "munge.key", r / "munge" / "munge.socket"
        subprocess.run([_exe("mungekey"), "--create", "--keyfile", str(key), "--force"], check=True,
                       capture_output=True)
        os.chmod(key, 0o400)
        self.procs.append(subprocess.Popen(
            [_exe("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
             f"--pid-file={r / 'munge' / 'munged.pid'}", f"--log-file={r / 'log' / 'munged.log'}",
             f"--seed-file={r / 'munge' / 'munged.seed'}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        conf = r / "slurm.conf"
        conf.write_text(f"""\
ClusterName=lingua-test
SlurmctldHost=localhost
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire={self.cred_expire}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval={self.bf_interval},sched_interval={self.sched_interval}
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=3600
KillWait=10
SlurmdParameters=config_overrides
NodeName=localhost CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        self.env["SLURM_CONF"] = str(conf)
        for daemon, args in (("slurmctld", ["-D", "-i"]), ("slurmd", ["-D", "-N", "localhost"])):
            self.procs.append(subprocess.Popen([_exe(daemon), *args, "-f", str(conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip() in ("idle", "mixed", "allocated"):
                return self.env
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-2000:] for p in (r / "log").glob("*.log"))
        self.stop()
        raise RuntimeError(f"the local SLURM cluster did not come up:\n{logs}")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user=root"], env=self.env, capture_output=True)
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        self.procs = []
