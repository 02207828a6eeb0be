"""Consolidate a sharded training checkpoint into one safetensors file, and load it back.

    <checkpoint dir>/ (DCP of {"model", "optim"} + config.yaml)  ->  <out>/model.safetensors
                                                                      <out>/config.json

`consolidate` runs in one plain process (no torch.distributed): it reads only the "model"
part of the checkpoint, whatever layout wrote it, into full-shaped CPU tensors.
`load_consolidated` rebuilds the model from the two files, again without torch.distributed.

    python -m lingua_mem.checkpoint consolidate <checkpoint dir> --out DIR
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from lingua_mem.checkpoint.checkpointer import check_model_shapes, missing_checkpoint, quiet_single_process
from lingua_mem.cli import fail
from lingua_mem.config import ConfigError, MemoryConfig, ModelConfig, validate_model
from lingua_mem.model.args import ModelArgs, validate_args
from lingua_mem.model.llama import Transformer, build_model

FORMAT = "lingua_mem"


def _first_line(exc: Exception) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:300]}" if msg else type(exc).__name__


def _training_model_args(raw, where: Path) -> ModelArgs:
    """The model's arguments from the "model" and "memory" sections of a training run's
    config.yaml, type-checked by OmegaConf and validated; the rest is ignored."""
    parts = []
    for section, schema in (("model", ModelConfig), ("memory", MemoryConfig)):
        try:
            parts.append(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                             raw.get(section) or {})))
        except OmegaConfBaseException as exc:
            key = f"{section}.{exc.full_key}" if getattr(exc, "full_key", None) else section
            raise ConfigError(f"{where}: {key}: {str(exc).strip().splitlines()[0]}") from None
    try:
        return validate_model(*parts)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def checkpoint_model_args(checkpoint_dir: str | Path) -> tuple[ModelArgs, dict]:
    """(model args, the run's config.yaml as a dict) of a training checkpoint; ValueError
    (one line, naming the path or key) for a missing directory or config."""
    path = Path(checkpoint_dir)
    if not path.is_dir():
        raise ValueError(missing_checkpoint(path))
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing (not a checkpoint directory?)")
    try:
        raw = OmegaConf.load(config_file)
    except Exception as exc:  # YAML syntax and the like
        raise ValueError(f"{config_file}: unreadable ({_first_line(exc)})") from None
    return _training_model_args(raw, config_file), OmegaConf.to_container(raw, resolve=False)


def read_checkpoint(checkpoint_dir: str | Path) -> tuple[ModelArgs, dict, dict]:
    """(model args, every model tensor in full on the CPU, the run's config.yaml as a dict) of
    a training checkpoint written by any layout, read in this one process (no
    torch.distributed). ValueError (one line, naming the path or key) when the checkpoint is
    missing, unreadable or does not match its own config.yaml."""
    path = Path(checkpoint_dir)
    args, run_config = checkpoint_model_args(path)

    # the model on meta gives every state-dict entry's FQN, full shape and dtype (no memory used)
    meta_sd = build_model(args, "meta").state_dict()
    check_model_shapes(path, {name: tuple(t.shape) for name, t in meta_sd.items()})

    # full-shaped CPU tensors; DCP fills them from however many shards wrote them. Only the
    # "model" part is asked for (allow_partial_load: "optim" is skipped), in this one process.
    sd = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in meta_sd.items()}
    try:
        with quiet_single_process():
            dcp.load({"model": sd}, checkpoint_id=str(path), no_dist=True,
                     planner=DefaultLoadPlanner(allow_partial_load=True))
    except CheckpointException as exc:  # a BaseException, not an Exception; wraps each rank's error
        inner = next(iter(exc.failures.values()))[0] if exc.failures else exc
        raise ValueError(f"{path}: DCP load failed ({_first_line(inner)})") from None
    except Exception as exc:
        raise ValueError(f"{path}: DCP load failed ({_first_line(exc)})") from None
    return args, sd, run_config


def consolidate(checkpoint_dir: str | Path, out_dir: str | Path) -> Path:
    """Write out_dir/model.safetensors (every model tensor in full) and out_dir/config.json
    (the model's arguments, the step and the run's tokenizer); returns the safetensors path.
    ValueError (one line, naming the path or key) as read_checkpoint."""
    path, out = Path(checkpoint_dir), Path(out_dir)
    args, sd, run_config = read_checkpoint(path)
    weights = out / "model.safetensors"
    step = int(path.name) if path.name.isdigit() else None  # checkpoints/<step, 10 digits>/
    tokenizer = (run_config.get("data") or {}).get("tokenizer") or {"name": "bytes", "path": None}
    config = {"format": FORMAT, "step": step, "model": args.to_dict(), "tokenizer": tokenizer}
    try:
        out.mkdir(parents=True, exist_ok=True)
        save_file({name: t.contiguous() for name, t in sd.items()}, str(weights), metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    except OSError as exc:
        raise ValueError(f"{out}: cannot write ({_first_line(exc)})") from None
    return weights


def model_from_state_dict(args: ModelArgs, state_dict: dict,
                          device: torch.device | str = "cpu") -> Transformer:
    """The model of `args` holding the tensors of `state_dict` (taken, not copied), in eval mode."""
    model = build_model(args, "meta")
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=True, assign=True)
    model.init_rope(device)  # non-persistent buffers (not in any file): computed here
    return model.eval()


def consolidated_model_args(directory: str | Path) -> tuple[ModelArgs, dict]:
    """(model args, config.json) of a consolidate() output directory, its weights unread."""
    directory = Path(directory)
    config_file, weights = directory / "config.json", directory / "model.safetensors"
    for f in (config_file, weights):
        if not f.is_file():
            raise ValueError(f"{f}: missing (not a consolidated checkpoint?)")
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_file}: unreadable ({_first_line(exc)})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{config_file}: not a {FORMAT} config (no \"format\": \"{FORMAT}\")")
    if "memory" in raw:  # the model and memory config sections, before 2026-12-01
        raise ValueError(f"{config_file}: an export of an older lingua_mem; consolidate its checkpoint again")
    try:
        args = ModelArgs.from_dict(raw.get("model"))
        validate_args(args)
    except ValueError as exc:  # names the key
        raise ValueError(f"{config_file}: {exc}") from None
    except TypeError as exc:  # a value of the wrong type
        raise ValueError(f"{config_file}: model: {_first_line(exc)}") from None
    return args, raw


def read_consolidated(directory: str | Path) -> tuple[ModelArgs, dict, dict]:
    """(model args, CPU tensors, config.json) of a consolidate() output directory."""
    args, raw = consolidated_model_args(directory)
    weights = Path(directory) / "model.safetensors"
    try:
        sd = load_file(str(weights))
    except Exception as exc:  # a truncated or corrupt file
        raise ValueError(f"{weights}: unreadable ({_first_line(exc)})") from None
    return args, sd, raw


def load_consolidated(directory: str | Path, device: torch.device | str = "cpu") -> Transformer:
    """The model of a consolidate() output directory, on `device`, in eval mode."""
    args, sd, _ = read_consolidated(directory)
    try:
        return model_from_state_dict(args, sd, device)
    except RuntimeError as exc:  # a tensor missing, unexpected or of another shape
        raise ValueError(f"{Path(directory) / 'model.safetensors'}: does not match config.json "
                         f"({_first_line(exc)})") from None


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a one-line ValueError instead of usage + exit
        raise ValueError(message)


def main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m lingua_mem.checkpoint",
                     description="Consolidate a training checkpoint into model.safetensors + config.json.")
    parser.add_argument("command", choices=["consolidate"])
    parser.add_argument("checkpoint", help="a checkpoints/<step> directory")
    parser.add_argument("--out", required=True, help="output directory")
    try:
        args = parser.parse_args(argv)
        weights = consolidate(args.checkpoint, args.out)
    except ValueError as exc:  # ConfigError included
        return fail(exc)
    with safe_open(str(weights), framework="pt") as f:  # the header only
        n = len(f.keys())
    size = weights.stat().st_size / 1e9
    print(f"wrote {weights} ({n} tensors, {size:.3g} GB) and {weights.parent / 'config.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
