"""Train a (memory-augmented) Llama model.

    python train.py config=configs/debug.yaml [key=value ...]
"""

import sys

from lingua_mem.cli import fail, reports
from lingua_mem.config import ConfigError, load_config


@reports(ConfigError)
def main(argv: list[str]) -> int:
    cfg = load_config(argv)  # before torch is imported: a bad key fails at once
    from lingua_mem.trainer import TrainingDiverged, train

    try:
        train(cfg)
    except TrainingDiverged as exc:  # one line, exit 1; the checkpoints before it are kept
        return fail(exc, code=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
