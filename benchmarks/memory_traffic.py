"""How many bytes a memory step moves through GPU memory, against the least it must, on no GPU.

    python benchmarks/memory_traffic.py [--configs configs/memory_134m.yaml,configs/memory_1.3b.yaml]
        [--kernel triton|torch] [--hbm-tb-s 3.35] [--ops 6] [--no-syncs] [--json FILE]
        [--set key=value ...]

A config may end in @G: the share of one of G GPUs (configs/memory_8b.yaml@64: its table's rows
over 64 ranks, each rank's own batch). For each config, one training step of its memory
layers (forward, backward, the value tables' clipping and optimizer step) runs at its real
shapes on fake tensors as rank 0 (lingua_mem.plan.memory_step): every op's bytes read and
written, the minimum a step must move (docs/performance.md states it), their ratio, and both
in milliseconds at the HBM bandwidth (an H100's 3.35 TB/s by default). The path counted is
the CUDA one: the `--kernel` value bag (triton: the kernels' declared traffic) and torch's
fused AdamW. Host syncs are counted on a real step of the same layers at a tiny shape (their
number does not depend on it): one process, and a row group of two gloo processes.

The JSON holds one object per config: config, gpus, traffic_bytes, minimum_bytes, ratio,
traffic_ms, minimum_ms, phases ({phase: {traffic_bytes, minimum_bytes, ops: {op: [calls,
read, written]}}}), host_syncs ({world_1, row_group_2: per step; reads: table reads a step;
places: {world: {op at file:function: count}}}).
Not part of the test suite (tests/test_traffic.py checks the instrument).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lingua_mem.config import load_config  # noqa: E402
from lingua_mem.errors import ConfigError  # noqa: E402
from lingua_mem.plan.memory_step import PHASES, measure_host_syncs, measure_memory_traffic  # noqa: E402


def measure(spec: str, a) -> dict:
    path, _, gpus = spec.partition("@")
    gpus = int(gpus or 1)
    cfg = load_config([f"config={path}", *a.set])
    if not cfg.memory.layers:
        raise ConfigError(f"{path}: memory.layers is empty: a dense model reads no value table")
    t = measure_memory_traffic(cfg, gpus, a.kernel, path)
    bandwidth = a.hbm_tb_s * 1e12
    out = {"config": path, "gpus": gpus, "kernel": a.kernel, "traffic_bytes": t.traffic_bytes,
           "minimum_bytes": t.minimum_bytes, "ratio": round(t.ratio, 3),
           "traffic_ms": round(1e3 * t.traffic_bytes / bandwidth, 2),
           "minimum_ms": round(1e3 * t.minimum_bytes / bandwidth, 2),
           "distinct_rows": t.shape.distinct, "reads": t.shape.bagged * t.shape.reads,
           "phases": {p: {"traffic_bytes": t.phases[p].bytes, "minimum_bytes": t.minimum[p],
                          "ops": {name: [x.calls, x.read, x.written] for name, x in t.phases[p].top(a.ops)}}
                      for p in PHASES}}
    if not a.no_syncs:
        reads = len(cfg.memory.layers)
        syncs = {"reads": reads, "places": {}}
        for world, key in ((1, "world_1"), (2, "row_group_2")):
            calls = [c for phase in measure_host_syncs(cfg, world).values() for c in phase]
            syncs[key] = len(calls)
            syncs["places"][key] = dict(Counter(f"{op} at {where}" for op, where in calls))
        out["host_syncs"] = syncs
    return out


def table(results: list[dict], hbm: float) -> str:
    gb = lambda b: f"{b / 1e9:,.1f}"  # noqa: E731
    lines = [f"{'config':<28} {'phase':<10} {'traffic GB':>11} {'minimum GB':>11} {'ratio':>6}"]
    for r in results:
        name = r["config"] + (f"@{r['gpus']}" if r["gpus"] > 1 else "")
        for p in PHASES:
            ph = r["phases"][p]
            lines.append(f"{name:<28} {p:<10} {gb(ph['traffic_bytes']):>11} {gb(ph['minimum_bytes']):>11} "
                         f"{ph['traffic_bytes'] / ph['minimum_bytes']:>6.2f}")
            name = ""
        lines.append(f"{'':<28} {'step':<10} {gb(r['traffic_bytes']):>11} {gb(r['minimum_bytes']):>11} "
                     f"{r['ratio']:>6.2f}   {r['traffic_ms']:,.1f} ms against {r['minimum_ms']:,.1f} ms "
                     f"at {hbm} TB/s")
        if "host_syncs" in r:
            s = r["host_syncs"]
            lines.append(f"{'':<28} host syncs a step ({s['reads']} table reads): {s['world_1']} on one "
                         f"process, {s['row_group_2']} in a row group of 2")
        lines.append(f"{'':<28} U (distinct rows a read) {r['distinct_rows']:,} of {r['reads']:,} reads")
    lines.append("op breakdown (GB read + written): " + "; ".join(
        f"{r['config']} {p}: "
        + ", ".join(f"{op} {(x[1] + x[2]) / 1e9:,.1f}" for op, x in r["phases"][p]["ops"].items())
        for r in results for p in PHASES))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs",
                   default="configs/memory_134m.yaml,configs/memory_1.3b.yaml,configs/memory_8b.yaml@64")
    p.add_argument("--kernel", default="triton", choices=("triton", "torch"))
    p.add_argument("--hbm-tb-s", type=float, default=3.35, help="HBM bandwidth for the milliseconds")
    p.add_argument("--ops", type=int, default=6, help="the largest ops of each phase kept in the JSON")
    p.add_argument("--no-syncs", action="store_true", help="skip counting host syncs (two gloo processes)")
    p.add_argument("--json", default=None, help="also write the objects to this file")
    p.add_argument("--set", nargs="*", default=[], help="training keys for every config (key=value)")
    a = p.parse_args(argv)
    specs = [s.strip() for s in a.configs.split(",") if s.strip()]
    try:
        results = [measure(spec, a) for spec in specs]
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(table(results, a.hbm_tb_s))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
