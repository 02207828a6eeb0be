"""Consolidate a sharded training checkpoint into one safetensors file, and load it back.

    <checkpoint dir>/ (DCP of {"model", "optim"} + config.yaml)  ->  <out>/model.safetensors
                                                                      <out>/config.json

`consolidate` runs in one plain process (no torch.distributed): it reads only the "model"
part of the checkpoint, whatever layout wrote it, into full-shaped CPU tensors.
`load_consolidated` rebuilds the model from the two files, again without torch.distributed.
A LoRA run's checkpoint (finetune.mode: lora) consolidates to the plain model: each adapted
weight merged with its adapters (W + alpha/rank B A), the lora tensors left out.

    python -m lingua_mem.checkpoint consolidate <checkpoint dir> --out DIR
"""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.checkpoint.api import CheckpointException

from lingua_mem.checkpoint.dcp_stream import DCPStreamReader
from lingua_mem.checkpoint.records import (
    FORMAT,
    _first_line,
    check_model_shapes,
    checkpoint_model_args,
    consolidated_model_args,
    quiet_single_process,
)
from lingua_mem.checkpoint.safe_load import UnsafeCheckpoint, dcp_load
from lingua_mem.checkpoint.safetensors_stream import (
    TensorSource,
    read_tensors,
    replace_dir,
    write_sharded,
)
from lingua_mem.config import (
    FinetuneConfig,
    LoraConfig,
    validate_lora,
)
from lingua_mem.errors import ConfigError
from lingua_mem.finetune.lora import (
    LORA_PARAMS,
    lora_prefixes,
    lora_scale,
    merge_lora,
    merged_weight,
)
from lingua_mem.finetune.modes import build_finetune, build_model_as_trained
from lingua_mem.model.args import ModelArgs
from lingua_mem.model.llama import Transformer, build_model
from lingua_mem.run_dir import check_output, staging_dir


def checkpoint_lora(run_config: dict, where: str | Path) -> LoraConfig | None:
    """The LoRA settings of a run whose config (config.yaml as a dict) has finetune.mode: lora
    (its checkpoints hold <linear>.lora_a and .lora_b beside the frozen weights), else None.
    ConfigError naming `where` and the key for a bad finetune section."""
    raw = run_config.get("finetune") or {}
    try:
        finetune = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(FinetuneConfig), raw))
    except OmegaConfBaseException as exc:
        key = f"finetune.{exc.full_key}" if getattr(exc, "full_key", None) else "finetune"
        raise ConfigError(f"{where}: {key}: {str(exc).strip().splitlines()[0]}") from None
    if finetune.mode != "lora":
        return None
    try:
        validate_lora(finetune.lora)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return finetune.lora


def checkpoint_meta_model(args: ModelArgs, lora: LoraConfig | None) -> Transformer:
    """The model on meta as the run trained it (adapted when `lora`): its state dict names
    every tensor of the checkpoint, with its full shape and dtype (no memory used)."""
    finetune = FinetuneConfig(mode="lora", lora=lora) if lora is not None else FinetuneConfig()
    return build_model_as_trained(args, build_finetune(finetune))


def read_checkpoint(checkpoint_dir: str | Path, verified: bool = False) -> tuple[ModelArgs, dict, dict]:
    """(model args, every model tensor in full on the CPU, the run's config.yaml as a dict) of
    a training checkpoint written by any layout, read in this one process (no
    torch.distributed). A LoRA run's adapters are merged into their weights (merge_lora):
    the tensors are a plain model's. ValueError (one line, naming the path or key) when the
    checkpoint is missing, set aside, corrupt (records.verify; `verified`: the caller did),
    unreadable or does not match its own config.yaml."""
    path = Path(checkpoint_dir)
    args, run_config = checkpoint_model_args(path, verified)
    lora = checkpoint_lora(run_config, path / "config.yaml")

    # the model on meta gives every state-dict entry's FQN, full shape and dtype (no memory used)
    meta_sd = checkpoint_meta_model(args, lora).state_dict()
    check_model_shapes(path, {name: tuple(t.shape) for name, t in meta_sd.items()})

    # full-shaped CPU tensors; DCP fills them from however many shards wrote them. Only the
    # "model" part is asked for (allow_partial_load: "optim" is skipped), in this one process.
    sd = {name: torch.empty(t.shape, dtype=t.dtype) for name, t in meta_sd.items()}
    try:
        with quiet_single_process():
            dcp_load({"model": sd}, path, distributed=False, partial=True)
    except UnsafeCheckpoint:
        raise
    except CheckpointException as exc:  # a BaseException, not an Exception; wraps each rank's error
        inner = next(iter(exc.failures.values()))[0] if exc.failures else exc
        raise ValueError(f"{path}: DCP load failed ({_first_line(inner)})") from None
    except Exception as exc:
        raise ValueError(f"{path}: DCP load failed ({_first_line(exc)})") from None
    if lora is not None:
        sd = merge_lora(sd, lora_scale(lora))
    return args, sd, run_config


def parse_size(text: str | int) -> int:
    """Bytes of "5GB", "500MB", "64KiB", "1.5GB" or a plain integer; ValueError (one line)."""
    if isinstance(text, int):
        return text
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    raw = str(text).strip().upper()
    number = raw.rstrip("KMGTIB")
    try:
        size = int(float(number) * units[raw[len(number):]])
    except (KeyError, ValueError):
        raise ValueError(f"--max-shard-size: {text!r} is not a size (e.g. 5GB, 500MB)") from None
    if size <= 0:
        raise ValueError(f"--max-shard-size: {text!r} must be positive")
    return size


def checkpoint_sources(path: Path, args: ModelArgs, rename=lambda name: name,
                       dtype: torch.dtype | None = None) -> list[TensorSource]:
    """Every model tensor of the training checkpoint at `path`, as sources that read it row
    block by row block (dcp_stream; verified by the caller: checkpoint_model_args), named
    rename(name) (None: left out), floating tensors cast to `dtype` when given. A LoRA run's
    (its config.yaml's finetune.mode) are a plain model's: each adapted weight merged row
    block by row block (merge_lora's arithmetic), the lora tensors left out. ValueError (one
    line) when the checkpoint does not match args."""
    lora = checkpoint_lora(checkpoint_model_args(path, verified=True)[1], path / "config.yaml")
    meta_sd = checkpoint_meta_model(args, lora).state_dict()
    check_model_shapes(path, {name: tuple(t.shape) for name, t in meta_sd.items()})
    adapted = set(lora_prefixes(meta_sd))
    try:
        reader = DCPStreamReader(path)
    except UnsafeCheckpoint:
        raise
    except Exception as exc:
        raise ValueError(f"{path / '.metadata'}: unreadable ({_first_line(exc)})") from None

    def read(fqn: str):
        def rows(r0: int, r1: int) -> torch.Tensor:
            try:
                return reader.read(fqn, r0, r1)
            except Exception as exc:  # a truncated or corrupt .distcp file
                name = fqn.removeprefix("model.")
                raise ValueError(f"{path}: {name} unreadable ({_first_line(exc)})") from None
        return rows

    def read_merged(prefix: str):
        weight, lora_b = read(f"model.{prefix}.weight"), read(f"model.{prefix}.lora_b")
        lora_a = read(f"model.{prefix}.lora_a")
        rank = meta_sd[f"{prefix}.lora_a"].shape[0]

        def rows(r0: int, r1: int) -> torch.Tensor:
            # weight rows (r1 - r0, in) + scale * lora_b rows (r1 - r0, r) @ lora_a (r, in): small
            return merged_weight(weight(r0, r1), lora_a(0, rank), lora_b(r0, r1), scale)
        return rows

    scale = lora_scale(lora) if lora is not None else 1.0
    sources = []
    for name, t in meta_sd.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in adapted and leaf in LORA_PARAMS:  # merged into the weight
            continue
        new = rename(name)
        if new is None:
            continue
        out_dtype = dtype if dtype is not None and t.dtype.is_floating_point else t.dtype
        source = read_merged(prefix) if prefix in adapted and leaf == "weight" else read(f"model.{name}")
        sources.append(TensorSource(new, tuple(t.shape), out_dtype, source))
    return sources


@contextlib.contextmanager
def staged_output(out: Path, force: bool):
    """A staging directory beside `out` to write into; on success it replaces `out`, on any
    error it is removed (nothing half-written is left), and a staging directory a killed
    run of the same output left behind (its process gone) is removed first. ValueError (one
    line) when `out` exists and is not empty without `force`, or cannot be written. (Its
    callers first refuse an `out` that would destroy what they read: run_dir.check_output.)"""
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: cannot write (a file, not a directory)")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"{out}: exists and is not empty (give --force to replace it)")
    staging = staging_dir(out)  # a killed run's left behind are removed
    try:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    except OSError as exc:
        raise ValueError(f"{out}: cannot write ({_first_line(exc)})") from None
    try:
        yield staging
        replace_dir(staging, out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ValueError(f"{out}: cannot write ({_first_line(exc)})") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def run_tokenizer(run_config: dict) -> dict:
    return (run_config.get("data") or {}).get("tokenizer") or {"name": "bytes", "path": None}


def consolidate(checkpoint_dir: str | Path, out_dir: str | Path, max_shard_bytes: int = 5 * 10**9,
                force: bool = False) -> Path:
    """Write out_dir/model.safetensors (or shards of at most max_shard_bytes and their index)
    holding every model tensor in full, and out_dir/config.json (the model's arguments, the
    step and the run's tokenizer), streaming: peak memory is one block, whatever the model's
    size. Returns out_dir. ValueError (one line, naming the path or key) as read_checkpoint,
    or for an out_dir that is not empty (without `force`)."""
    path, out = Path(checkpoint_dir), Path(out_dir)
    check_output(out, [path])  # with --force too: before anything is read or written
    args, run_config = checkpoint_model_args(path)
    sources = checkpoint_sources(path, args)
    step = int(path.name) if path.name.isdigit() else None  # checkpoints/<step, 10 digits>/
    config = {"format": FORMAT, "step": step, "model": args.to_dict(), "tokenizer": run_tokenizer(run_config)}
    with staged_output(out, force) as staging:
        write_sharded(staging, sources, max_shard_bytes)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def model_from_state_dict(args: ModelArgs, state_dict: dict,
                          device: torch.device | str = "cpu") -> Transformer:
    """The model of `args` holding the tensors of `state_dict` (taken, not copied), in eval mode."""
    model = build_model(args, "meta")
    model.load_state_dict({k: v.to(device) for k, v in state_dict.items()}, strict=True, assign=True)
    model.init_rope(device)  # non-persistent buffers (not in any file): computed here
    return model.eval()


def read_consolidated(directory: str | Path) -> tuple[ModelArgs, dict, dict]:
    """(model args, CPU tensors under lingua_mem's names, its lingua_mem config) of a
    consolidate() or export-hf output directory; floating tensors in fp32."""
    from lingua_mem.checkpoint.hf_names import lingua_name

    args, raw = consolidated_model_args(directory)
    sd = read_tensors(Path(directory), rename=lingua_name if raw.get("names") == "hf" else (lambda n: n))
    return args, {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, raw


def load_consolidated(directory: str | Path, device: torch.device | str = "cpu") -> Transformer:
    """The model of a consolidate() or export-hf output directory, on `device`, in eval mode."""
    args, sd, _ = read_consolidated(directory)
    try:
        return model_from_state_dict(args, sd, device)
    except RuntimeError as exc:  # a tensor missing, unexpected or of another shape
        raise ValueError(f"{Path(directory)}: the weights do not match its config "
                         f"({_first_line(exc)})") from None

