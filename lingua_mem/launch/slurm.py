"""Submitting training runs to SLURM: launcher options and site profiles, the code
snapshot, the sbatch script rendered from slurm/job.sbatch, and submission (sbatch or
submitit). Used by `python -m lingua_mem.launch` (one run) and `.sweep` (a job array).

<dump_dir>/launch/   job.sbatch, config.yaml (the resolved config the job trains), job.json
<dump_dir>/logs/     <job id>.log: every attempt of the job, appended (requeues keep the id)
<code snapshot>/     lingua_mem/ and train.py as they were at submission
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf

from lingua_mem.config import TrainConfig, check_word, load_config, to_dict
from lingua_mem.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]  # the checkout: lingua_mem/, train.py, slurm/
TEMPLATE = REPO / "slurm" / "job.sbatch"
PROFILES = REPO / "slurm" / "profiles"


@dataclass
class LaunchConfig:
    nodes: int = 1
    gpus_per_node: int = 8  # 0: a CPU-only cluster (gloo ranks)
    tasks_per_node: int | None = None  # default: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None
    mem: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str | None = None  # e.g. 48:00:00
    constraint: str | None = None
    exclude: str | None = None
    job_name: str | None = None  # default: the config's name
    profile: str | None = None  # slurm/profiles/<name>.yaml, or a path: site defaults for the keys above
    setup: list[str] = field(default_factory=list)  # shell lines before srun (module load, venv ...)
    python: str | None = None  # the interpreter on the nodes; default: this one
    signal_seconds: int = 120  # SIGUSR1 this long before the time limit: checkpoint and requeue
    max_attempts: int = 3  # failures at the same step before a job stops requeueing itself
    backend: str = "sbatch"  # sbatch | submitit
    # the nodes' GPU (lingua_mem.plan.hardware: h100 | h200 | a100): a job whose planned peak
    # memory per GPU does not fit it is refused before submission (--force submits anyway)
    gpu: str = "h100"


LAUNCH_KEYS = set(LaunchConfig.__dataclass_fields__)
_STRING_KEYS = {k for k, f in LaunchConfig.__dataclass_fields__.items() if "str" in str(f.type)
                and "list" not in str(f.type)}


# what sbatch accepts for --time and --mem
_TIME = re.compile(r"(\d+|\d+:\d{1,2}|\d+:\d{1,2}:\d{1,2}|\d+-\d+|\d+-\d+:\d{1,2}|\d+-\d+:\d{1,2}:\d{1,2}"
                   r"|UNLIMITED|INFINITE)")
_MEM = re.compile(r"\d+[KMGT]?")


def time_seconds(time: str) -> int | None:
    """A SLURM time in seconds (None: UNLIMITED / INFINITE): minutes, minutes:seconds,
    hours:minutes:seconds, days-hours, days-hours:minutes, days-hours:minutes:seconds."""
    if time in ("UNLIMITED", "INFINITE"):
        return None
    days, _, rest = time.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:  # days-hours[:minutes[:seconds]]
        h, m, sec = (parts + [0, 0])[:3]
        return ((int(days) * 24 + h) * 60 + m) * 60 + sec
    if len(parts) == 1:
        return parts[0] * 60  # minutes
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]  # minutes:seconds
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def _check_launch(c: LaunchConfig) -> None:
    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {why}")

    need(c.nodes > 0, "nodes", "must be positive")
    need(c.gpus_per_node >= 0, "gpus_per_node", "must be >= 0")
    need(c.tasks_per_node is None or c.tasks_per_node > 0, "tasks_per_node", "must be positive")
    need(c.gpus_per_node == 0 or c.tasks_per_node in (None, c.gpus_per_node), "tasks_per_node",
         "one task per GPU: leave it unset, or equal to gpus_per_node")
    need(c.max_attempts > 0, "max_attempts", "must be positive")
    need(c.signal_seconds >= 0, "signal_seconds", "must be >= 0")
    need(c.backend in ("sbatch", "submitit"), "backend", f"{c.backend!r} is not one of sbatch, submitit")
    from lingua_mem.plan.hardware import accelerator

    accelerator(c.gpu)  # an unknown name: ConfigError naming the key
    need(c.time is None or _TIME.fullmatch(c.time) is not None, "time",
         f"{c.time!r} is not a SLURM time (minutes, [days-]hours:minutes:seconds, days-hours, ...)")
    limit = time_seconds(c.time) if c.time is not None else None
    need(limit is None or not c.signal_seconds or limit > c.signal_seconds, "time",
         f"{c.time} ({limit} s) is not longer than signal_seconds={c.signal_seconds}: the checkpoint signal "
         "(USR1) would be due before the job trains a step; give more time or a smaller signal_seconds")
    need(c.mem is None or _MEM.fullmatch(c.mem) is not None, "mem",
         f"{c.mem!r} is not a SLURM size (a number with an optional K, M, G or T suffix)")
    for key in ("job_name", "partition", "account", "qos", "constraint", "exclude"):
        value = getattr(c, key)  # a #SBATCH line's value: a newline would end the directives
        if value is not None:
            check_word(value, key)


def split_args(argv: list[str]) -> tuple[list[str], list[str]]:
    """(launcher key=value items, training config items) of a command line."""
    launch, train = [], []
    for arg in argv:
        key = arg.split("=", 1)[0]
        (launch if key in LAUNCH_KEYS else train).append(arg)
    return launch, train


def load_launch_config(items: list[str]) -> LaunchConfig:
    """Defaults <- profile <- command line; ConfigError names the key."""
    profiles = [i.split("=", 1)[1] for i in items if i.startswith("profile=")]
    profile = profiles[-1] if profiles else None  # the last one given wins, like any key
    base = []
    if profile is not None:
        path = Path(profile) if profile.endswith((".yaml", ".yml")) else PROFILES / f"{profile}.yaml"
        if not path.is_file():
            raise ConfigError(f"profile: no such profile {profile} (looked for {path})")
        base = [f"config={path}"]
    # string options stay strings: YAML would read time=48:00:00 as a number of seconds
    items = [f"{k}={json.dumps(v)}" if k in _STRING_KEYS and not v.startswith(('"', "'")) else f"{k}={v}"
             for k, v in (i.split("=", 1) for i in items)]
    cfg = load_config(base + items, schema=LaunchConfig, check=_check_launch)
    if cfg.tasks_per_node is None:
        cfg.tasks_per_node = cfg.gpus_per_node or 1
    cfg.python = cfg.python or sys.executable
    return cfg


def check_layout(c: LaunchConfig, cfg: TrainConfig) -> None:
    """The training mesh fits nodes x tasks_per_node ranks (ConfigError naming the key)."""
    from lingua_mem.parallel.mesh import resolve_dims

    world = c.nodes * c.tasks_per_node
    try:
        resolve_dims(cfg.distributed, world)
    except ConfigError as exc:
        raise ConfigError(f"{exc} ({c.nodes} node(s) x {c.tasks_per_node} task(s))") from None


def check_fits(c: LaunchConfig, cfg: TrainConfig) -> str | None:
    """The plan of the job on its GPUs (lingua_mem.plan): its one-line verdict when the peak
    memory per GPU fits, else ConfigError naming the figure and the nearest layout that fits.
    None on a CPU cluster (gpus_per_node=0: nothing to plan)."""
    if c.gpus_per_node == 0:
        return None
    from lingua_mem.plan.estimate import make_plan, nearest_fit
    from lingua_mem.plan.hardware import HEADROOM, GiB

    plan = make_plan(cfg, c.nodes, c.gpus_per_node, c.gpu)
    if plan.fits:
        return plan.verdict()
    near = nearest_fit(cfg, c.nodes, c.gpus_per_node, c.gpu, max_nodes=4 * c.nodes)
    hint = f"nearest layout that fits: {near.layout()}" if near else "no layout up to 4x the nodes fits"
    raise ConfigError(f"gpu: the plan's peak of {plan.step.peak / GiB:.1f} GiB per GPU does not fit "
                      f"{plan.budget / GiB:.1f} GiB of the {plan.gpu.name} ({HEADROOM:.0%} kept free) on "
                      f"{c.nodes} x {c.gpus_per_node}; {hint} (python -m lingua_mem.plan for the details, "
                      "--force to submit anyway)")


def check_cluster(c: LaunchConfig) -> None:
    """Before anything is written or submitted: sbatch is there, the partition exists."""
    if shutil.which("sbatch") is None:
        raise ConfigError("sbatch: not found on PATH (is this a SLURM login node?)")
    if c.partition is not None:
        out = subprocess.run(["scontrol", "show", "partition", c.partition], capture_output=True, text=True)
        said = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[0]
        if out.returncode != 0 and ("not found" in said or "invalid partition" in said.lower()):
            raise ConfigError(f"partition: {c.partition} does not exist on this cluster ({said})")
        if out.returncode != 0:  # slurmctld down, munge, permissions: scontrol's own words
            raise ConfigError(f"partition: cannot check {c.partition}: scontrol show partition: {said}")


def snapshot_code(dest: Path) -> Path:
    """Copy lingua_mem/ and train.py to `dest` (replacing an older snapshot)."""
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(REPO / "lingua_mem", dest / "lingua_mem", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(REPO / "train.py", dest / "train.py")
    return dest


def run_config_path(dump_dir: Path) -> Path:
    """Where the resolved config a job trains is written."""
    return dump_dir / "launch" / "config.yaml"


def prepare_run(cfg: TrainConfig) -> tuple[Path, Path]:
    """Create the dump dir and write the resolved config the job trains; (config path, dump dir)."""
    dump_dir = Path(cfg.dump_dir).resolve()
    cfg.dump_dir = str(dump_dir)
    (dump_dir / "launch").mkdir(parents=True, exist_ok=True)
    (dump_dir / "logs").mkdir(exist_ok=True)
    config = run_config_path(dump_dir)
    OmegaConf.save(OmegaConf.create(to_dict(cfg)), config)
    return config, dump_dir


# torch.distributed's rendezvous, in the job's shell: the first node of the allocation at its
# NodeAddr (the address slurmctld reaches it at; the node's name unless the site set one), a
# port from the job id. The sbatch template and submitit's setup both run it.
RENDEZVOUS = [
    'FIRST_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
    "MASTER_ADDR=$(scontrol show node \"$FIRST_NODE\" 2>/dev/null"
    " | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p')",
    "export MASTER_ADDR=${MASTER_ADDR:-$FIRST_NODE}",
    "export MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
]


def render_script(c: LaunchConfig, configs: list[Path], dump_dirs: list[Path], code_dir: Path,
                  log_pattern: str, array: bool = False) -> str:
    """The sbatch script: slurm/job.sbatch with this job's #SBATCH lines and paths."""
    directives = {
        "job-name": c.job_name, "nodes": c.nodes, "ntasks-per-node": c.tasks_per_node,
        "gpus-per-node": c.gpus_per_node or None, "cpus-per-task": c.cpus_per_task, "mem": c.mem,
        "partition": c.partition, "account": c.account, "qos": c.qos, "time": c.time,
        "constraint": c.constraint, "exclude": c.exclude, "output": log_pattern, "error": log_pattern,
        "open-mode": "append", "requeue": True,
        "signal": f"USR1@{c.signal_seconds}" if c.signal_seconds else None,
        "array": f"0-{len(configs) - 1}" if array else None,
    }
    lines = [f"#SBATCH --{k}" if v is True else f"#SBATCH --{k}={v}"
             for k, v in directives.items() if v is not None]
    values = {
        "directives": "\n".join(lines), "n_points": str(len(configs)), "code_dir": shlex.quote(str(code_dir)),
        "configs": " ".join(shlex.quote(str(p)) for p in configs),
        "dump_dirs": " ".join(shlex.quote(str(p)) for p in dump_dirs),
        "setup": "\n".join(c.setup), "omp_threads": str(c.cpus_per_task or 1),
        "signal_seconds": str(c.signal_seconds), "python": shlex.quote(c.python),
        "max_attempts": str(c.max_attempts), "rendezvous": "\n".join(RENDEZVOUS),
    }
    return re.sub(r"\{\{(\w+)\}\}", lambda m: values[m.group(1)], TEMPLATE.read_text())


def submit_sbatch(script: str, script_path: Path) -> str:
    """Write and submit the script with sbatch; the job id."""
    script_path.write_text(script)
    proc = subprocess.run(["sbatch", "--parsable", str(script_path)], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"
        raise ConfigError(f"sbatch: {reason}")
    return proc.stdout.strip().split(";")[0]


def submit_submitit(c: LaunchConfig, config: Path, dump_dir: Path, code_dir: Path) -> str:
    """The same allocation through submitit (its files in <dump_dir>/launch/submitit): each
    task runs train.py from the snapshot. Preemption requeues through the trainer; the
    attempt-limited requeue after failures is the sbatch backend's."""
    import submitit

    executor = submitit.SlurmExecutor(folder=str(dump_dir / "launch" / "submitit"), max_num_timeout=0)
    extra = {k: v for k, v in (("account", c.account), ("qos", c.qos), ("constraint", c.constraint),
                               ("exclude", c.exclude), ("mem", c.mem), ("requeue", True),
                               ("open-mode", "append")) if v is not None}
    executor.update_parameters(
        nodes=c.nodes, ntasks_per_node=c.tasks_per_node, cpus_per_task=c.cpus_per_task or 1,
        gpus_per_node=c.gpus_per_node or None, partition=c.partition, time=c.time or 0,
        job_name=c.job_name or "lingua_mem", signal_delay_s=c.signal_seconds, additional_parameters=extra,
        setup=[*c.setup, *RENDEZVOUS, f"export PYTHONPATH={shlex.quote(str(code_dir))}"],
        srun_args=["--cpu-bind=none"])
    command = submitit.helpers.CommandFunction([c.python, "-u", "train.py", f"config={config}"],
                                               cwd=str(code_dir))
    return str(executor.submit(command).job_id)


def write_job_record(dump_dir: Path, job_id: str, script_path: Path, log: Path) -> None:
    (dump_dir / "launch" / "job.json").write_text(json.dumps(
        {"job_id": job_id, "script": str(script_path), "log": str(log)}, indent=1))
