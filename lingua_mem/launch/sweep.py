"""Sweep any config keys: one SLURM job array, one task (run) per point.

    python -m lingua_mem.launch.sweep sweep=configs/sweeps/sizes.yaml [launcher keys] [--dry-run] [--force]

A sweep file:
    name: sizes                    # W&B group and run-name prefix
    config: configs/debug.yaml     # the base config of every point
    dump_root: dumps/sweeps/sizes  # <dump_root>/<point>/ is each point's dump dir
    overrides: [steps=100]         # for every point
    grid: {model.dim: [64, 128], optim.lr: [1e-3, 3e-3]}   # every combination, or
    points: [{model.dim: 64}, {model.dim: 128, optim.lr: 1e-3}]
    launch: {profile: local}       # launcher keys (the command line overrides them)
Every point's config is validated before anything is written or submitted.
`python -m lingua_mem.launch.status <dump_root>` shows the points.
"""

from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

from omegaconf import OmegaConf

from lingua_mem.cli import fail
from lingua_mem.config import load_config
from lingua_mem.errors import ConfigError
from lingua_mem.launch import slurm


def _point_name(point: dict) -> str:
    parts = []
    for key, value in point.items():
        short = key.rsplit(".", 1)[-1]
        shown = Path(str(value)).stem if key == "config" else value
        parts.append(f"{short}{shown}" if short != "config" else str(shown))
    return re.sub(r"[^A-Za-z0-9._=-]", "-", "_".join(parts)) or "point"


def expand(spec: dict) -> list[dict]:
    """The points of a sweep file: a grid's combinations, or its list."""
    if ("grid" in spec) == ("points" in spec):
        raise ConfigError("sweep: give exactly one of grid and points")
    if "grid" in spec:
        keys = list(spec["grid"] or {})
        values = [v if isinstance(v, list) else [v] for v in (spec["grid"] or {}).values()]
        empty = [k for k, v in zip(keys, values, strict=True) if not v]
        if not keys or empty:
            raise ConfigError(f"sweep: grid{'.' + empty[0] if empty else ''} is empty: no point to run")
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]
    if not spec["points"]:
        raise ConfigError("sweep: points is empty: no point to run")
    return [dict(p) for p in spec["points"]]


def main(argv: list[str]) -> int:
    dry_run, force = "--dry-run" in argv, "--force" in argv
    items = [a for a in argv if a not in ("--dry-run", "--force")]
    try:
        sweep_file = next((a.split("=", 1)[1] for a in items if a.startswith("sweep=")), None)
        if sweep_file is None or not Path(sweep_file).is_file():
            raise ConfigError(f"sweep: no such sweep file {sweep_file} (sweep=PATH is required)")
        spec = OmegaConf.to_container(OmegaConf.load(sweep_file))
        unknown = set(spec) - {"name", "config", "dump_root", "overrides", "grid", "points", "launch"}
        if unknown:
            raise ConfigError(f"sweep: unknown key {sorted(unknown)[0]} in {sweep_file}")
        name = spec.get("name") or Path(sweep_file).stem
        root = Path(spec.get("dump_root") or f"dumps/sweeps/{name}").resolve()
        launch_items, train_items = slurm.split_args([a for a in items if not a.startswith("sweep=")])
        launch_base = [f"{k}={v}" for k, v in (spec.get("launch") or {}).items()]
        launch = slurm.load_launch_config(launch_base + launch_items)
        launch.job_name = launch.job_name or name

        points = expand(spec)
        configs = []
        for point in points:  # every point valid before anything is written
            pname = _point_name(point)
            base = [f"config={point.get('config', spec.get('config'))}"] if point.get(
                "config", spec.get("config")) else []
            keyed = [f"{k}={v}" for k, v in point.items() if k != "config"]
            try:
                cfg = load_config(base + list(spec.get("overrides") or []) + train_items + keyed + [
                    f"dump_dir={root / pname}", f"name={name}_{pname}", f"logging.wandb.group={name}"])
                slurm.check_layout(launch, cfg)
                if not force:
                    slurm.check_fits(launch, cfg)
            except ConfigError as exc:
                raise ConfigError(f"sweep point {pname}: {exc}") from None
            configs.append((pname, cfg))
        if len({p for p, _ in configs}) != len(configs):
            raise ConfigError("sweep: two points have the same name")

        log_pattern = str(root / "logs" / "%A_%a.log")
        if dry_run:
            print(slurm.render_script(launch, [slurm.run_config_path(root / p) for p, _ in configs],
                                      [root / p for p, _ in configs], root / "code", log_pattern,
                                      array=True))
            return 0
        slurm.check_cluster(launch)
        (root / "logs").mkdir(parents=True, exist_ok=True)
        prepared = [slurm.prepare_run(cfg) for _, cfg in configs]
        code_dir = slurm.snapshot_code(root / "code")
        script = slurm.render_script(launch, [c for c, _ in prepared], [d for _, d in prepared], code_dir,
                                     log_pattern, array=True)
        job_id = slurm.submit_sbatch(script, root / "sweep.sbatch")
    except ConfigError as exc:
        return fail(exc)
    record = {"name": name, "job_id": job_id, "points": [
        {"name": p, "dump_dir": str(d), "job": f"{job_id}_{i}",
         "log": str(root / "logs" / f"{job_id}_{i}.log")}
        for i, ((p, _), (_, d)) in enumerate(zip(configs, prepared, strict=True))]}
    (root / "sweep.json").write_text(json.dumps(record, indent=1))
    print(f"submitted job array {job_id}: {len(configs)} points of sweep {name}\n  dump root {root}\n"
          f"  status: python -m lingua_mem.launch.status {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
