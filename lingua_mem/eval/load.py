"""A trained model for evaluation: its weights only (no optimizer), from a training
checkpoint written by any layout or from a consolidated export directory.

One process, fp32: the whole model, plain PyTorch (read_checkpoint / read_consolidated).
Several processes (torchrun, srun), or bf16: the model parallelized as in training
(FSDP2, memory-parallel value tables; bf16 is FSDP2's parameter dtype), each rank
loading its shards, so memory parallelism works as it does in training and each rank
evaluates its share of the data.

A LoRA run's training checkpoint (finetune.mode: lora): on one process read as the plain
model, its adapters merged (read_checkpoint); parallelized, the adapted model as trained
(LoRALinear: the same function, W x + alpha/rank B A x), each rank loading its shards.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lingua_mem.checkpoint.checkpointer import Checkpointer
from lingua_mem.checkpoint.consolidate import (
    checkpoint_lora,
    checkpoint_meta_model,
    model_from_state_dict,
    read_checkpoint,
    read_consolidated,
)
from lingua_mem.checkpoint.records import checkpoint_model_args, consolidated_model_args, missing_checkpoint
from lingua_mem.checkpoint.safetensors_stream import INDEX
from lingua_mem.cli import one_line
from lingua_mem.config import CheckpointConfig, DistributedConfig, LoraConfig, TokenizerConfig
from lingua_mem.data.tokenizer import build_tokenizer
from lingua_mem.errors import ConfigError
from lingua_mem.model.args import ModelArgs
from lingua_mem.model.llama import Transformer
from lingua_mem.run_dir import dump_dir_of


@dataclass
class LoadedModel:
    model: Transformer  # in eval mode; parallelized when several processes share it
    args: ModelArgs
    tokenizer: object  # lingua_mem.data.tokenizer.Tokenizer
    step: int | None  # the training step of the weights (None: unknown)
    path: Path
    run_config: dict  # the training run's config (config.yaml as a dict); {} for an export


def checkpoint_kind(path: Path) -> str:
    """"training" (a checkpoints/<step> DCP directory), "consolidated" (consolidate's or
    export-hf's safetensors) or ConfigError naming `ckpt`."""
    if (path / ".metadata").is_file():
        return "training"
    if (path / "model.safetensors").is_file() or (path / INDEX).is_file():
        return "consolidated"
    if not path.exists():
        raise ConfigError(f"ckpt: {missing_checkpoint(path)}")
    raise ConfigError(f"ckpt: {path} is neither a training checkpoint (no .metadata) nor a "
                      f"consolidated export (no model.safetensors or {INDEX})")


def tokenizer_config(kind: str, meta: dict, override: TokenizerConfig, path: Path) -> TokenizerConfig:
    """The tokenizer: `override` when it names one, else the run's (training config.yaml's
    data.tokenizer, or the export's config.json "tokenizer")."""
    if override.name:
        return override
    raw = (meta.get("data") or {}).get("tokenizer") if kind == "training" else meta.get("tokenizer")
    if not isinstance(raw, dict) or not raw.get("name"):
        where = "config.yaml has no data.tokenizer" if kind == "training" else "config.json has no tokenizer"
        raise ConfigError(f"tokenizer.name: required: the {where} ({path}); give tokenizer.name= "
                          "(and tokenizer.path=)")
    return TokenizerConfig(name=raw["name"], path=raw.get("path"))


@dataclass
class CheckpointInfo:
    """What a checkpoint is, read from its config alone (no weights)."""

    path: Path
    kind: str  # training | consolidated
    args: ModelArgs
    tokenizer: object
    step: int | None
    run_config: dict  # the training run's config.yaml as a dict; {} for an export
    meta: dict  # config.yaml or config.json as read


def inspect_checkpoint(ckpt: str | Path, tokenizer: TokenizerConfig) -> CheckpointInfo:
    """The model arguments, step and tokenizer of `ckpt`; ConfigError (one line, naming `ckpt`
    or the tokenizer) for a missing or unreadable checkpoint, or a tokenizer whose ids the
    model cannot embed."""
    path = Path(ckpt)
    kind = checkpoint_kind(path)
    try:
        args, meta = checkpoint_model_args(path) if kind == "training" else consolidated_model_args(path)
    except ValueError as exc:  # ConfigError included: names the path or key
        raise ConfigError(f"ckpt: {exc}") from None
    step = int(path.name) if kind == "training" and path.name.isdigit() else meta.get("step")
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        # it names the output file (evals/<step>.json): a path there would leave the folder
        raise ConfigError(f"ckpt: {path / 'config.json'}: \"step\" is {step!r}, not a step number")
    tok_cfg = tokenizer_config(kind, meta, tokenizer, path)
    try:
        tok = build_tokenizer(tok_cfg)
    except ConfigError as exc:  # the key as eval.py spells it, or as the run's config does
        if tokenizer.name:
            raise ConfigError(str(exc).replace("data.tokenizer.", "tokenizer.")) from None
        raise ConfigError(f"ckpt: the run's {exc}") from None
    if tok.n_words > args.vocab_size:
        raise ConfigError(f"tokenizer: {tok_cfg.name} has {tok.n_words} tokens, the model of {path} embeds "
                          f"only {args.vocab_size} (model.vocab_size): not the tokenizer it was trained with")
    return CheckpointInfo(path, kind, args, tok, step, meta if kind == "training" else {}, meta)


def load_model(ckpt: str | Path | CheckpointInfo, device, tokenizer: TokenizerConfig | None = None,
               meshes=None, distributed: DistributedConfig | None = None) -> LoadedModel:
    """The model of `ckpt` (a path, or inspect_checkpoint's info) on `device`. With `meshes`
    of several processes, or bf16, parallelized by `distributed` (as training is) and
    loaded shard by shard. ConfigError (one line) as inspect_checkpoint, or for weights that
    cannot be read or do not match the config."""
    if not isinstance(ckpt, CheckpointInfo):
        ckpt = inspect_checkpoint(ckpt, tokenizer or TokenizerConfig(name=""))
    info = ckpt
    path, args = info.path, info.args
    distributed = distributed or DistributedConfig()
    # FSDP2 on several processes, and on one for bf16 (FSDP2's bf16 parameters, as in training)
    parallel = meshes is not None and (meshes.dims.world_size > 1 or distributed.compute_dtype != "fp32")
    try:
        if info.kind == "consolidated":
            _, sd, _ = read_consolidated(path)
        elif parallel:  # each rank reads its own shards below
            sd = None
        else:
            _, sd, _ = read_checkpoint(path, verified=True)  # by inspect_checkpoint
        if parallel:
            lora = checkpoint_lora(info.run_config, path / "config.yaml") if sd is None else None
            model = _parallel_model(args, sd, path, device, meshes, distributed, lora)
        else:
            model = model_from_state_dict(args, sd, device)
    except ValueError as exc:  # ConfigError included: names the path or key
        raise ConfigError(f"ckpt: {exc}") from None
    except RuntimeError as exc:  # a tensor missing, unexpected or of another shape
        raise ConfigError(f"ckpt: {path}: the weights do not match the config "
                          f"({one_line(exc)[:300]})") from None
    return LoadedModel(model.eval(), args, info.tokenizer, info.step, path, info.run_config)


def _parallel_model(args: ModelArgs, sd: dict | None, path: Path, device, meshes, distributed,
                    lora: LoraConfig | None = None):
    """The model parallelized as in training; a training checkpoint's shards are read by DCP
    (each rank its own), an export's full tensors are sharded by parallelize. A LoRA run's
    (`lora`) is built adapted, as it was trained, and keeps its adapters."""
    from lingua_mem.parallel import parallelize

    if sd is not None:
        model = model_from_state_dict(args, sd, "cpu")
        return parallelize(model, meshes, distributed).to(device)
    model = parallelize(checkpoint_meta_model(args, lora), meshes, distributed)
    model.to_empty(device=device)
    model.init_rope()
    Checkpointer(CheckpointConfig(), dump_dir_of(path), model, None).load_weights(path, key="ckpt")
    return model
