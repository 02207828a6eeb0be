"""Launch one training run on SLURM.

    python -m lingua_mem.launch config=configs/memory_373m.yaml nodes=2 gpus_per_node=8 \
        partition=... [account=... qos=... time=... gpu=h100 profile=...] [key=value ...] \
        [--dry-run] [--force]

Launcher keys (lingua_mem.launch.slurm.LaunchConfig) and training config keys mix on
one command line. The config is validated first (the same errors as train.py) and, on GPU
nodes, planned (lingua_mem.plan): a layout whose peak memory per GPU does not fit the `gpu`
is refused with the nearest one that does, unless --force. Then the dump dir is created
with a snapshot of the code and the resolved config, the sbatch
script is rendered and submitted, and the job id and log path are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from lingua_mem.cli import reports
from lingua_mem.config import load_config
from lingua_mem.errors import ConfigError
from lingua_mem.launch import slurm


@reports(ConfigError)
def main(argv: list[str]) -> int:
    dry_run, force = "--dry-run" in argv, "--force" in argv
    launch_items, train_items = slurm.split_args([a for a in argv if a not in ("--dry-run", "--force")])
    launch = slurm.load_launch_config(launch_items)
    cfg = load_config(train_items)
    slurm.check_layout(launch, cfg)
    if not force:  # the plan: does the peak memory per GPU fit (lingua_mem.plan)
        verdict = slurm.check_fits(launch, cfg)
        if verdict:
            print(f"plan: {verdict}", file=sys.stderr)
    launch.job_name = launch.job_name or cfg.name
    dump_dir = Path(cfg.dump_dir).resolve()
    config, code_dir = slurm.run_config_path(dump_dir), dump_dir / "launch" / "code"
    script_path = dump_dir / "launch" / "job.sbatch"
    log_pattern = str(dump_dir / "logs" / "%j.log")
    script = slurm.render_script(launch, [config], [dump_dir], code_dir, log_pattern)
    if dry_run:  # the script that would be submitted; nothing written, nothing submitted
        print(script)
        return 0
    slurm.check_cluster(launch)
    slurm.prepare_run(cfg)
    slurm.snapshot_code(code_dir)
    if launch.backend == "submitit":
        job_id = slurm.submit_submitit(launch, config, dump_dir, code_dir)
        log = dump_dir / "launch" / "submitit" / f"{job_id}_0_log.out"
    else:
        job_id = slurm.submit_sbatch(script, script_path)
        log = dump_dir / "logs" / f"{job_id}.log"
    slurm.write_job_record(dump_dir, job_id, script_path, log)
    print(f"submitted job {job_id}: {cfg.name}, {launch.nodes} node(s) x {launch.tasks_per_node} task(s)\n"
          f"  dump dir {dump_dir}\n  log {log}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
