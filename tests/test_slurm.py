"""The SLURM launcher on a real one-node cluster on localhost (tests/slurm_cluster.py):
a 2-task job trains, a preempted job checkpoints, requeues and ends where an
uninterrupted job ends, a 2-point sweep completes and `status` shows it, a job that
keeps failing stops requeueing. Bad input fails before anything is submitted."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_cluster import LocalSlurm, missing
from test_parallel import free_port

ROOT = Path(__file__).resolve().parents[1]
RUN = ["config=configs/debug.yaml", "profile=local", "log_every=1", "checkpoint.every=4",
       "data.batch_size=4", "data.seq_len=64", "model.n_layers=2", "memory.layers=[1]"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    why = missing()
    if why:
        pytest.skip(why)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    env = slurm.start()
    yield env
    slurm.stop()


def launch(env, module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def job_state(env, job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return next((t.split("=", 1)[1] for t in out.split() if t.startswith("JobState=")), "UNKNOWN")


def wait_until(env, job: str, states: set[str], timeout: float = 300) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job_state(env, job)
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job} still {job_state(env, job)} after {timeout}s")


def metrics(dump: Path) -> list[dict]:
    path = dump / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def submitted_job(proc) -> str:
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("submitted job ")[1].split(":")[0]


@pytest.fixture(scope="module")
def uninterrupted(cluster, tmp_path_factory):
    """A 2-task job that runs to the end: (dump dir, job id)."""
    dump = tmp_path_factory.mktemp("run") / "full"
    job = submitted_job(launch(cluster, "lingua_mem.launch", *RUN, "steps=16", f"dump_dir={dump}"))
    assert wait_until(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED", \
        (dump / "logs" / f"{job}.log").read_text()[-3000:]
    return dump, job


def test_a_two_task_job_trains_to_the_end(cluster, uninterrupted):
    dump, job = uninterrupted
    rows = metrics(dump)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert rows[-1]["tokens"] == 16 * 2 * 4 * 64  # steps x 2 ranks x batch x seq_len
    log = (dump / "logs" / f"{job}.log").read_text()
    assert "2 process(es)" in log and "memory parallel 1" in log
    assert (dump / "launch" / "code" / "lingua_mem" / "train" / "trainer.py").is_file()  # the code snapshot
    assert (dump / "launch" / "job.sbatch").read_text().count("#SBATCH --ntasks-per-node=2") == 1
    status = launch(cluster, "lingua_mem.launch.status", str(dump))
    assert status.returncode == 0
    assert status.stdout.splitlines()[1].split()[1:4] == [job, "COMPLETED", "16"]


def test_a_preempted_job_checkpoints_requeues_and_ends_like_an_uninterrupted_one(cluster, uninterrupted,
                                                                                  tmp_path):
    dump = tmp_path / "preempted"
    job = submitted_job(launch(cluster, "lingua_mem.launch", *RUN, "steps=16", f"dump_dir={dump}"))
    deadline = time.monotonic() + 240
    # signalled early: a step of this model takes tens of milliseconds, and the signal travels
    # through scancel, slurmctld and slurmd (on a loaded CI machine, seconds); signalled at step
    # 5, one CI run finished all 16 steps before it arrived
    while not any(r["step"] >= 2 for r in metrics(dump)):
        assert time.monotonic() < deadline and job_state(cluster, job) in ("PENDING", "RUNNING")
        time.sleep(0.1)
    # what the scheduler's --signal does ahead of a time limit: SIGUSR1 to every task
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster, check=True)
    assert wait_until(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400) == "COMPLETED"
    log = (dump / "logs" / f"{job}.log").read_text()
    assert "preempted (SIGUSR1)" in log and f"requeueing SLURM job {job}" in log and "(restart 1)" in log
    assert "resumed from" in log
    want = metrics(uninterrupted[0])
    got = metrics(dump)
    assert [r["step"] for r in got] == list(range(1, 17))
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]


def test_the_submitit_backend_runs_the_same_job(cluster, tmp_path):
    dump = tmp_path / "submitit"
    proc = launch(cluster, "lingua_mem.launch", *RUN, "backend=submitit", "steps=6", "data.batch_size=2",
                  f"dump_dir={dump}")
    job = submitted_job(proc)
    assert wait_until(cluster, job, {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
    rows = metrics(dump)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[-1]["tokens"] == 6 * 2 * 2 * 64  # 2 tasks
    assert (dump / "launch" / "submitit" / f"{job}_submission.sh").is_file()


def test_a_two_point_sweep_completes_and_status_shows_both(cluster, tmp_path):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"""\
name: tiny
config: configs/debug.yaml
dump_root: {tmp_path / 'sweep'}
overrides: [steps=6, log_every=1, data.batch_size=2, data.seq_len=32, model.n_layers=2, "memory.layers=[1]"]
grid:
  optim.lr: [0.001, 0.003]
launch:
  profile: local
  tasks_per_node: 1
""")
    proc = launch(cluster, "lingua_mem.launch.sweep", f"sweep={sweep}")
    assert proc.returncode == 0, proc.stderr
    record = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [p["name"] for p in record["points"]] == ["lr0.001", "lr0.003"]
    for p in record["points"]:
        assert wait_until(cluster, p["job"], {"COMPLETED", "FAILED", "CANCELLED"}) == "COMPLETED"
        cfg = (Path(p["dump_dir"]) / "launch" / "config.yaml").read_text()
        assert "group: tiny" in cfg
    status = launch(cluster, "lingua_mem.launch.status", str(tmp_path / "sweep"))
    lines = status.stdout.splitlines()
    assert lines[0].split() == ["point", "job", "status", "last_step", "last_loss"]
    array = record["job_id"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["lr0.001", f"{array}_0", "COMPLETED", "6"], ["lr0.003", f"{array}_1", "COMPLETED", "6"]]
    losses = [float(line.split()[4]) for line in lines[1:]]
    assert losses[0] != losses[1]  # two different runs


def test_a_job_failing_at_the_same_step_stops_requeueing(cluster, tmp_path):
    dump = tmp_path / "failing"
    code = dump / "launch" / "code"
    # the job's training command fails every time (its snapshot has no train.py), the requeue logic works
    proc = launch(cluster, "lingua_mem.launch", *RUN, "steps=4", f"dump_dir={dump}", "max_attempts=2",
                  f"setup=[rm -f {code}/train.py]")
    job = submitted_job(proc)
    assert wait_until(cluster, job, {"FAILED", "COMPLETED", "CANCELLED"}, timeout=400) == "FAILED"
    assert json.loads((dump / "launch" / "attempts.json").read_text()) == {"step": 0, "failures": 2}
    log = (dump / "logs" / f"{job}.log").read_text()
    assert f"failure 1/2 from step 0: requeueing SLURM job {job}" in log and "giving up: 2 failures" in log


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """A cluster of two nodes on this host (two slurmd, n1 and n2, at 127.0.0.1), 2 CPUs each."""
    why = missing()
    if why:
        pytest.skip(why)
    slurm = LocalSlurm(tmp_path_factory.mktemp("slurm2"), cpus=2, memory_mb=8000, nodes=2)
    env = slurm.start()
    yield env
    slurm.stop()


def tasks_on(node: str) -> list[int]:
    """The pids of this host's training processes that SLURM started as tasks of `node`."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"train.py" in cmdline and f"SLURMD_NODENAME={node}".encode() in environ:
            pids.append(int(proc.name))
    return pids


def test_a_two_node_job_trains_as_one_node_does_and_a_lost_node_is_requeued_exactly(two_nodes, uninterrupted,
                                                                                    tmp_path):
    dump = tmp_path / "two"
    job = submitted_job(launch(two_nodes, "lingua_mem.launch", *RUN, "steps=16", "nodes=2",
                               "tasks_per_node=1", f"dump_dir={dump}"))
    deadline = time.monotonic() + 240
    while not any(r["step"] >= 6 for r in metrics(dump)):  # past the checkpoint of step 4
        assert time.monotonic() < deadline and job_state(two_nodes, job) in ("PENDING", "RUNNING")
        time.sleep(0.1)
    victims = tasks_on("n2")
    assert victims, "no task of node n2 found"
    for pid in victims:  # node n2's processes die (as with a node lost): SIGKILL, no checkpoint
        os.kill(pid, signal.SIGKILL)
    assert wait_until(two_nodes, job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=400) == "COMPLETED"
    log = (dump / "logs" / f"{job}.log").read_text()
    assert "on n[1-2]" in log and "2 process(es)" in log  # one task on each node
    # the job failed as a whole (srun ended n1's task too) and was requeued by its own script
    assert re.search(rf"failure 1/\d+ from step \d+: requeueing SLURM job {job}\n", log)
    assert "(restart 1)" in log and "resumed from" in log
    want, got = metrics(uninterrupted[0]), metrics(dump)  # the 1-node, 2-task run of the same config
    assert [r["step"] for r in got] == list(range(1, 17))
    assert [(r["loss"], r["grad_norm"]) for r in got] == [(r["loss"], r["grad_norm"]) for r in want]


def one_line_error(proc, key: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], proc.stderr


def test_bad_input_fails_before_anything_is_submitted(cluster, tmp_path):
    dump = tmp_path / "never"
    run = [*RUN, f"dump_dir={dump}"]
    nope = launch(cluster, "lingua_mem.launch", *run, "partition=nope")
    one_line_error(nope, "partition: nope does not exist on this cluster (")
    # a controller that does not answer is not a missing partition: scontrol's own words
    conf = Path(cluster["SLURM_CONF"])
    dead = tmp_path / "dead.conf"
    dead.write_text(re.sub(r"SlurmctldPort=\d+", f"SlurmctldPort={free_port()}", conf.read_text())
                    + "MessageTimeout=1\n")
    unreachable = launch(dict(cluster, SLURM_CONF=str(dead)), "lingua_mem.launch", *run, "partition=debug")
    one_line_error(unreachable, "partition: cannot check debug: scontrol show partition: ")
    assert "does not exist" not in unreachable.stderr
    no_sbatch = dict(cluster, PATH=str(Path(sys.executable).parent))
    one_line_error(launch(no_sbatch, "lingua_mem.launch", *run), "sbatch")
    one_line_error(launch(cluster, "lingua_mem.launch", *run, "optim.lrr=1"), "optim.lrr")
    one_line_error(launch(cluster, "lingua_mem.launch", *run, "profile=nowhere"), "profile")
    sweep = tmp_path / "bad.yaml"
    sweep.write_text(f"config: configs/debug.yaml\ndump_root: {dump}\ngrid:\n  optim.nope: [1, 2]\n")
    one_line_error(launch(cluster, "lingua_mem.launch.sweep", f"sweep={sweep}"), "optim.nope")
    assert not dump.exists()
    queue = subprocess.run(["squeue", "-h"], env=cluster, capture_output=True, text=True).stdout
    assert queue.strip() == ""


def test_dry_run_prints_the_script_and_writes_nothing(tmp_path):
    dump = tmp_path / "dry"
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.launch", "config=configs/memory_373m.yaml",
                           "nodes=2", "gpus_per_node=8", "partition=gpu", "account=acme", "time=48:00:00",
                           f"dump_dir={dump}", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PATH=str(Path(sys.executable).parent)))  # no sbatch needed
    assert proc.returncode == 0, proc.stderr
    script = proc.stdout
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=acme", "#SBATCH --time=48:00:00",
                 "#SBATCH --requeue", "#SBATCH --signal=USR1@120", f"#SBATCH --output={dump}/logs/%j.log"):
        assert line in script.splitlines(), line
    assert "srun --kill-on-bad-exit=1" in script and "lingua_mem.launch.requeue" in script
    assert not dump.exists()


@pytest.mark.parametrize("args,key", [
    (["time=2days"], "time"),
    (["time=12:3:4:5"], "time"),
    (["time=1"], "time"),  # one minute: the default USR1 is due 120 s before the end
    (["time=2", "signal_seconds=120"], "time"),
    (["mem=lots"], "mem"),
    (["mem=64GB"], "mem"),
    (["partition=gpu\n#SBATCH --nodes=64"], "partition"),  # would end the directives' lines
    (["account=a b"], "account"),
    (["job_name=x\ny"], "job_name"),
    (["name=x\ny"], "name"),  # the job's name by default
    (["nodes=1", "gpus_per_node=8", "distributed.dp_replicate=3"], "distributed.dp_shard"),
    (["nodes=2", "gpus_per_node=4", "distributed.memory_parallel_size=3"],
     "distributed.memory_parallel_size"),
])
def test_dry_run_refuses_what_sbatch_or_the_mesh_would_reject_later(tmp_path, args, key):
    dump = tmp_path / "dry"
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.launch", "config=configs/debug.yaml", *args,
                           f"dump_dir={dump}", "--dry-run"], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, PATH=str(Path(sys.executable).parent)))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), proc.stderr
    assert proc.stdout == "" and not dump.exists()


@pytest.mark.parametrize("spec,needle", [
    ("grid:\n  optim.lr: []\n", "sweep: grid.optim.lr is empty"),
    ("grid: {}\n", "sweep: grid is empty"),
    ("points: []\n", "sweep: points is empty"),
])
def test_a_sweep_with_no_point_is_refused(tmp_path, spec, needle):
    sweep = tmp_path / "s.yaml"
    sweep.write_text(f"config: configs/debug.yaml\ndump_root: {tmp_path / 'never'}\n{spec}")
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.launch.sweep", f"sweep={sweep}", "--dry-run"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {needle}: no point to run"]
    assert not (tmp_path / "never").exists()
