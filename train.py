"""Train a (memory-augmented) Llama model.

    python train.py config=configs/debug.yaml [key=value ...]
"""

import sys

from lingua_mem.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    try:
        cfg = load_config(argv)
        from lingua_mem.trainer import train

        train(cfg)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
