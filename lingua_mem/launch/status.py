"""The state of launched runs: a sweep's points or one run, as a table.

    python -m lingua_mem.launch.status DIR   (a sweep's dump_root, or one run's dump dir)

point | job | status (SLURM's, while it knows the job; else from the dump dir) | last step | last loss
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lingua_mem.cli import fail


def slurm_state(job: str) -> str | None:
    """PENDING, RUNNING, COMPLETED, FAILED ... while SLURM still knows the job; else None."""
    try:
        out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for token in out.stdout.split():
        if token.startswith("JobState="):
            return token.split("=", 1)[1]
    return None


def last_row(dump_dir: Path) -> dict:
    path = dump_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    try:
        return json.loads(rows[-1]) if rows else {}
    except ValueError:
        return {}


def rows_of(directory: Path) -> list[dict]:
    if (directory / "sweep.json").exists():
        points = json.loads((directory / "sweep.json").read_text())["points"]
    elif (directory / "launch" / "job.json").exists():
        job = json.loads((directory / "launch" / "job.json").read_text())
        points = [{"name": directory.name, "dump_dir": str(directory), "job": job["job_id"]}]
    else:
        raise FileNotFoundError(f"{directory}: neither a sweep (sweep.json) nor a launched run "
                                "(launch/job.json)")
    out = []
    for p in points:
        last = last_row(Path(p["dump_dir"]))
        status = slurm_state(p["job"]) or "UNKNOWN"
        out.append({"point": p["name"], "job": p["job"], "status": status, "last_step": last.get("step", "-"),
                    "last_loss": f"{last['loss']:.4f}" if "loss" in last else "-"})
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m lingua_mem.launch.status DIR", file=sys.stderr)
        return 2
    try:
        rows = rows_of(Path(argv[0]))
    except (FileNotFoundError, ValueError, KeyError) as exc:
        return fail(exc)
    cols = ["point", "job", "status", "last_step", "last_loss"]
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in cols))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
