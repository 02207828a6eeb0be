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
                 bf_interval: int = 1, sched_interval: int = 2, nodes: int = 1):
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
        # nodes > 1: that many slurmd on this host (Slurm's multiple-slurmd mode), named n1, n2,
        # ..., each on its own port with its own spool, pid and log (%n), all at 127.0.0.1; each
        # has cpus and memory_mb of its own
        self.names = ["localhost"] if nodes == 1 else [f"n{i + 1}" for i in range(nodes)]
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
        for name in self.names:
            (r / "spool" / name).mkdir(parents=True, exist_ok=True)
        one = f"CPUs={self.cpus} RealMemory={self.memory_mb} State=UNKNOWN"
        nodes = (f"NodeName=localhost {one}" if self.names == ["localhost"] else "\n".join(
            f"NodeName={name} NodeHostname=localhost NodeAddr=127.0.0.1 Port={_free_port()} {one}"
            for name in self.names))
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
SlurmdSpoolDir={r / 'spool'}/%n
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd'}-%n.pid
SlurmctldLogFile={r / 'log' / 'slurmctld.log'}
SlurmdLogFile={r / 'log' / 'slurmd'}-%n.log
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
{nodes}
PartitionName=debug Nodes={",".join(self.names)} Default=YES MaxTime=INFINITE State=UP
""")
        self.env["SLURM_CONF"] = str(conf)
        daemons = [("slurmctld", ["-D", "-i"]), *(("slurmd", ["-D", "-N", name]) for name in self.names)]
        for daemon, args in daemons:
            self.procs.append(subprocess.Popen([_exe(daemon), *args, "-f", str(conf)], env=self.env,
                                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-N", "-h", "-o", "%T"], env=self.env, capture_output=True,
                                 text=True)
            states = out.stdout.split()
            if out.returncode == 0 and len(states) == len(self.names) \
                    and all(s in ("idle", "mixed", "allocated") for s in states):
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
