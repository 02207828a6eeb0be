"""Train a (memory-augmented) Llama model.

    python train.py [config=FILE.yaml] [key=value ...] [--print-config | --help]
"""

import os
import sys
from dataclasses import fields
from pathlib import Path

from lingua_mem.cli import STOPPED, Stopped, fail, reports
from lingua_mem.config import ConfigError, TrainConfig, load_config

DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "debug.yaml"  # the quickstart
INTERRUPTED = 130  # Ctrl-C (SIGINT): 128 + 2, as a shell reports it


def usage() -> str:
    sections = [f.name for f in fields(TrainConfig) if f.name not in ("dump_dir", "name", "steps",
                                                                       "log_every", "seed")]
    return "\n".join([
        "usage: python train.py [config=FILE.yaml] [key=value ...] [--print-config]",
        "",
        "Trains a Llama model with product-key memory layers. Without config=, configs/debug.yaml",
        "(the quickstart: a small memory model on the generated facts corpus, a few minutes on CPU).",
        "The config merges dataclass defaults <- the YAML file <- key=value items (nested keys with",
        "dots: optim.lr=1e-3 memory.layers=[1,3]); a bad key or value stops with one line, exit 2.",
        "",
        "  top level: dump_dir, name, steps, log_every, seed",
        f"  sections:  {', '.join(sections)}",
        "  --print-config  print the resolved config as YAML and exit (nothing is run)",
        "",
        "Several processes: torchrun --nproc-per-node N train.py ... (see docs/distributed.md).",
    ])


@reports(ConfigError)
def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(usage())
        return 0
    print_config = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    if not any(a.startswith("config=") for a in argv):
        argv = [f"config={DEFAULT_CONFIG}", *argv]
    cfg = load_config(argv)  # before torch is imported: a bad key fails at once
    if print_config:
        from omegaconf import OmegaConf

        print(OmegaConf.to_yaml(OmegaConf.structured(cfg)), end="")
        return 0
    from lingua_mem.train.trainer import train

    try:
        last = train(cfg)
    except Stopped as exc:  # diverged, or a checkpoint that cannot be written: one line, exit 1
        return fail(exc, code=STOPPED)
    except KeyboardInterrupt:  # Ctrl-C outside the loop's handler: before training, or SIGINT left out
        print("interrupted (SIGINT) outside the training loop (or SIGINT not in checkpoint.preempt_signals): "
              "no checkpoint written", file=sys.stderr, flush=True)
        return INTERRUPTED
    # Ctrl-C during training: the step's checkpoint is written (the trainer said so). Under
    # torchrun every rank exits 0: it takes any other code for a failure (its traceback, or a
    # restart of every rank), and the ranks agree on the signal, so none exits otherwise.
    if (last or {}).get("preempted_by") == "SIGINT" and "TORCHELASTIC_RUN_ID" not in os.environ:
        return INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
