"""checkpoint.init_from a Hugging Face directory: a transformers Llama (config.json with
model_type "llama" + safetensors), or any lingua_mem export (consolidate, export-hf).

The weights load by name into the run's model, whatever its parallel layout: each rank reads
one tensor at a time from the safetensors files and keeps its own slice of it. A Llama's
FFN weights at the run's memory layers are skipped and the memory layers keep their init
(retrofitting memory into a dense model); the summary is one line.

init_from a DCP training checkpoint (Checkpointer.init_from) checks its recorded settings
with the same check_settings and prints the same ImportSummary line.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.tensor import DTensor, distribute_tensor

from lingua_mem.checkpoint.hf_names import lingua_name
from lingua_mem.checkpoint.records import consolidated_model_args
from lingua_mem.checkpoint.safetensors_stream import weight_files
from lingua_mem.errors import ConfigError
from lingua_mem.model.args import ModelArgs

KEY = "checkpoint.init_from"


def is_hf_dir(path: Path) -> bool:
    """A directory of config.json + safetensors (not a DCP checkpoint)."""
    if (path / ".metadata").is_file() or not (path / "config.json").is_file():
        return False
    try:
        weight_files(path)
    except ValueError:
        return False
    return True


def _settings(args: ModelArgs) -> dict[str, tuple[str, object]]:
    """Every setting init_from compares, those that change the function, shapes or not:
    transformers' name -> (the run config's name for it, its value in `args`)."""
    return {
        "hidden_size": ("model.dim", args.dim), "num_hidden_layers": ("model.n_layers", args.n_layers),
        "num_attention_heads": ("model.n_heads", args.n_heads),
        "num_key_value_heads": ("model.n_kv_heads", args.n_kv_heads),
        "vocab_size": ("model.vocab_size", args.vocab_size),
        "intermediate_size": ("FFN width (model.ffn_dim_multiplier, model.multiple_of)", args.ffn_hidden_dim),
        "rms_norm_eps": ("model.norm_eps", args.norm_eps),
        "rope_theta": ("model.rope_theta", args.rope_theta),
        "tie_word_embeddings": ("model.tie_embeddings", args.tie_embeddings),
        "head_dim": ("model.dim / model.n_heads", args.head_dim),
    }


def _differs(theirs, value) -> bool:
    """!=, except floats equal up to rounding (a value written in another precision)."""
    if theirs == value:
        return False
    if isinstance(value, float) and theirs is not None:
        try:
            return abs(float(theirs) - value) > 1e-12 * max(1.0, abs(value))
        except (TypeError, ValueError):
            return True
    return True


def check_settings(path: Path, found: dict, args: ModelArgs, hf_names: bool = True) -> None:
    """ConfigError (one line) naming the first setting whose value in `found` (keyed by
    transformers' names) differs from the run's model `args`, and both values. The checked
    model is named as its own config names it: transformers' keys for a Llama's config.json
    or an export, the run config's (model.dim, ...) for a lingua_mem training checkpoint."""
    for hf_key, (ours, value) in _settings(args).items():
        theirs = found.get(hf_key)
        if _differs(theirs, value):
            raise ConfigError(f"{KEY}: {path} has {hf_key if hf_names else ours}={theirs}, this run's "
                              f"{ours} is {value}")


def check_model_args(path: Path, theirs: ModelArgs, args: ModelArgs, hf_names: bool = False) -> None:
    """check_settings for a model whose arguments are known (an export, a training checkpoint)."""
    check_settings(path, {hf_key: value for hf_key, (_, value) in _settings(theirs).items()}, args, hf_names)


def _check_config(path: Path, args: ModelArgs) -> str:
    """ConfigError naming the first setting of the directory's model (a transformers Llama's
    config.json, or a lingua_mem export's recorded arguments) that differs from the run's
    dense model; returns the naming scheme of its tensors ("hf" or "lingua_mem")."""
    try:
        raw = json.loads((path / "config.json").read_text())
    except ValueError as exc:
        raise ConfigError(f"{KEY}: {path / 'config.json'}: unreadable ({exc})") from None
    if (path / "lingua_mem.json").is_file() or raw.get("format") == "lingua_mem":  # an export
        try:
            theirs, meta = consolidated_model_args(path)
        except ValueError as exc:
            raise ConfigError(f"{KEY}: {exc}") from None
        check_model_args(path, theirs, args, hf_names=True)
        return meta.get("names", "lingua_mem")
    if raw.get("model_type") != "llama":
        raise ConfigError(f"{KEY}: {path / 'config.json'}: model_type {raw.get('model_type')!r} is not "
                          "llama (only Llama checkpoints and lingua_mem exports are read)")
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConfigError(f"{KEY}: {path / 'config.json'}: rope_type {rope_type!r} (only the default RoPE is "
                          "implemented)")
    heads = raw.get("num_attention_heads")
    head_dim = raw.get("head_dim") or (raw.get("hidden_size", 0) // max(1, heads or 1))
    check_settings(path, {**raw, "rope_theta": rope.get("rope_theta", raw.get("rope_theta", 10000.0)),
                          "num_key_value_heads": raw.get("num_key_value_heads") or heads,
                          "head_dim": head_dim,
                          "tie_word_embeddings": bool(raw.get("tie_word_embeddings", False))}, args)
    return "hf"


@dataclass
class ImportSummary:
    loaded: list[str]
    skipped: list[str]  # in the files, not in this model (e.g. the FFN at a memory layer)
    new: list[str]  # in this model, not in the files: they keep their init

    def line(self, path: Path) -> str:
        def few(names: list[str]) -> str:
            return ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")

        text = f"init_from {path}: loaded {len(self.loaded)} tensors"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} not in this model: {few(self.skipped)}"
        if self.new:
            text += f"; {len(self.new)} new, from init: {few(self.new)}"
        return text


@torch.no_grad()
def load_hf_weights(model: torch.nn.Module, path: Path, args: ModelArgs) -> ImportSummary:
    """Copy the tensors of the HF directory `path` into `model` (plain or parallelized: a
    DTensor gets its own slice); ConfigError (one line) for a config or shape that differs."""
    names = _check_config(path, args)
    rename = lingua_name if names == "hf" else (lambda n: n)
    targets = model.state_dict()  # FQN -> tensor or DTensor (its local shard is written in place)
    files = weight_files(path)
    loaded, skipped = [], []
    by_file: dict[Path, list[str]] = {}
    for name, f in files.items():
        by_file.setdefault(f, []).append(name)
    for file, file_names in by_file.items():
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as exc:
            raise ConfigError(f"{KEY}: {file}: unreadable ({type(exc).__name__}: {exc})") from None
        with handle:
            for name in file_names:
                ours = rename(name)
                if ours is None or ours not in targets:
                    skipped.append(ours or name)
                    continue
                target = targets[ours]
                shape = tuple(handle.get_slice(name).get_shape())
                if shape != tuple(target.shape):
                    raise ConfigError(f"{KEY}: {path}: {name} has shape {shape}, this run's {ours} "
                                      f"{tuple(target.shape)}")
                full = handle.get_tensor(name)
                if isinstance(target, DTensor):
                    local = distribute_tensor(full.to(target.dtype), target.device_mesh, target.placements,
                                              src_data_rank=None).to_local()
                    target.to_local().copy_(local)
                else:
                    target.copy_(full)
                loaded.append(ours)
    new = sorted(set(targets) - set(loaded))
    return ImportSummary(sorted(loaded), sorted(skipped), new)
