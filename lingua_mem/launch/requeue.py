"""After a failed training step of a SLURM job: requeue it, unless it has failed
`--max-attempts` times in a row at the same checkpoint step (then stop, exit 1).

    python -m lingua_mem.launch.requeue DUMP_DIR --max-attempts 3   (from slurm/job.sbatch)

<dump_dir>/launch/attempts.json: {"step": newest checkpoint step, "failures": n}.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lingua_mem.checkpoint.records import complete_checkpoints
from lingua_mem.preemption import requeue_slurm_job


def record_failure(dump_dir: Path) -> tuple[int, int]:
    """(step, failures at that step so far, this one included)."""
    done = complete_checkpoints(dump_dir)
    step = int(done[-1].name) if done else 0
    path = dump_dir / "launch" / "attempts.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    failures = previous.get("failures", 0) + 1 if previous.get("step") == step else 1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"step": step, "failures": failures}))
    return step, failures


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingua_mem.launch.requeue")
    parser.add_argument("dump_dir", type=Path)
    parser.add_argument("--max-attempts", type=int, default=3)
    args = parser.parse_args(argv)
    step, failures = record_failure(args.dump_dir)
    if failures >= args.max_attempts:
        print(f"giving up: {failures} failures in a row from the checkpoint of step {step}", file=sys.stderr)
        return 1
    failure = f"failure {failures}/{args.max_attempts} from step {step}"
    if requeue_slurm_job(announce=failure, file=sys.stderr):
        return 0
    print(f"{failure}: could not requeue", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
