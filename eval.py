"""Evaluate a trained model: a training checkpoint (any layout) or a consolidated export.

    python eval.py ckpt=dumps/debug/checkpoints/0000000200 [tasks=val,facts_qa,generate] [key=value ...]
    torchrun --nproc-per-node 2 eval.py ckpt=... distributed.memory_parallel_size=2

Writes <out>/evals/<step>.json (out: the run's dump dir for a training checkpoint, the
export's directory else) and prints a table. Configuration: EvalCommandConfig in
lingua_mem/config.py (defaults <- config=FILE.yaml <- key=value); see docs/eval.md.
"""

import sys

from lingua_mem.cli import STOPPED, Stopped, fail, reports
from lingua_mem.config import ConfigError, EvalCommandConfig, load_config, validate_eval_command


@reports(ConfigError)
def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__.strip())
        return 0
    cfg = load_config(argv, EvalCommandConfig, validate_eval_command)  # before torch: a bad key fails at once
    from lingua_mem.eval.runner import run

    try:
        run(cfg)
    except Stopped as exc:
        return fail(exc, code=STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
