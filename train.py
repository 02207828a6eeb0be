"""Train a (memory-augmented) Llama model.

    python train.py config=configs/debug.yaml [key=value ...]
"""

import sys

from lingua_mem.cli import STOPPED, Stopped, fail, reports
from lingua_mem.config import ConfigError, load_config


@reports(ConfigError)
def main(argv: list[str]) -> int:
    cfg = load_config(argv)  # before torch is imported: a bad key fails at once
    from lingua_mem.trainer import train

    try:
        train(cfg)
    except Stopped as exc:  # diverged, or a checkpoint that cannot be written: one line, exit 1
        return fail(exc, code=STOPPED)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
