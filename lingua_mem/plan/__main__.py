"""Plan a training run's layout before queueing it: per-GPU memory, communication and a
step-time bound, from one fake step (no GPU, no ranks: lingua_mem.plan.fake_step).

    python -m lingua_mem.plan config=configs/memory_8b.yaml nodes=8 gpus_per_node=8 \\
        [gpu=h100|h200|a100] [rank=0] [format=text|json] [distributed.* and other training keys]

Exit 0 when the peak fits the GPU (with headroom), 1 when it does not (the nearest layout
that fits is printed), 2 on bad input.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

from lingua_mem.cli import reports
from lingua_mem.config import load_config
from lingua_mem.errors import ConfigError
from lingua_mem.plan.estimate import format_plan, make_plan, nearest_fit
from lingua_mem.plan.hardware import accelerator


@dataclass
class PlanArgs:
    nodes: int = 1
    gpus_per_node: int = 8
    gpu: str = "h100"  # h100 | h200 | a100 (lingua_mem.plan.hardware)
    rank: int = 0  # the rank to plan (rank 0 holds the largest shards)
    format: str = "text"  # text | json
    suggest: bool = True  # when it does not fit: search the nearest layout that does


def _check(a: PlanArgs) -> None:
    if a.nodes < 1:
        raise ConfigError("nodes: must be positive")
    if a.gpus_per_node < 1:
        raise ConfigError("gpus_per_node: must be positive (the plan is of GPU ranks)")
    accelerator(a.gpu)  # a name it does not know: ConfigError naming the key
    if a.format not in ("text", "json"):
        raise ConfigError(f"format: {a.format!r} is not one of text, json")


PLAN_KEYS = set(PlanArgs.__dataclass_fields__)


@reports(ConfigError)
def main(argv: list[str]) -> int:
    mine = [a for a in argv if a.split("=", 1)[0] in PLAN_KEYS]
    args = load_config(mine, schema=PlanArgs, check=_check)
    cfg = load_config([a for a in argv if a not in mine])
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, args.gpu, args.rank)
    near = None
    if not plan.fits and args.suggest:
        near = nearest_fit(cfg, args.nodes, args.gpus_per_node, args.gpu)
    if args.format == "json":
        out = plan.to_dict()
        out["nearest_fit"] = near.layout() if near is not None else None
        print(json.dumps(out))
    else:
        print(format_plan(plan))
        print(plan.verdict())
        if not plan.fits:
            print(f"nearest layout that fits: {near.layout()}" if near is not None
                  else "no layout up to 4x the nodes fits")
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
