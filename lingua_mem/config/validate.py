"""Validation, one function per section: ConfigError (errors.py) with a one-line message
naming the key. `validate` checks a training config; validate_eval_command and
validate_usage_command check eval.py's and the usage command's. A choice is checked
against its Literal type in schema.py (a config built in code was never merged)."""

from __future__ import annotations

import math
from pathlib import Path

from lingua_mem.config.schema import (
    LORA_TARGETS,
    ACMode,
    AttentionImpl,
    CheckpointConfig,
    DataConfig,
    Device,
    DistributedConfig,
    Dtype,
    EvalCommandConfig,
    EvalConfig,
    EvalSourceKind,
    FactsStyle,
    FinetuneMode,
    GenerateConfig,
    Kernel,
    LoraConfig,
    LoraTarget,
    MemoryConfig,
    MemoryKind,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    PreemptSignal,
    Prefetch,
    Ranking,
    RowOptimizer,
    Scheduler,
    SourceFormat,
    TokenizerName,
    TrainConfig,
    UsageCommandConfig,
    ValueDtype,
    ValueOptimizer,
    WandbMode,
    choices,
    model_args,
)
from lingua_mem.errors import ConfigError
from lingua_mem.model.args import ModelArgs, validate_args

EVAL_TASKS = ("val", "facts_qa", "generate")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _check_positive_finite(value: float, key: str) -> None:
    _check(math.isfinite(value) and value > 0, key, f"{value} must be a positive finite number")


def _check_choice(value: str, key: str, literal) -> None:
    options = choices(literal)
    _check(value in options, key, f"{value!r} is not one of {', '.join(options)}")


def check_word(value: str, key: str) -> None:
    """`value` becomes a shell word, a #SBATCH value, a W&B name or part of a file name: one
    word of printable characters (no whitespace, control character, quote or path separator
    that would end its line or word, or leave its folder; not "." or "..")."""
    bad = next((c for c in value if not c.isprintable() or c.isspace() or c in "'\"`$;\\/"), None)
    _check(value not in (".", ".."), key, f"{value!r} would name the folder it is in, or the one above")
    _check(bool(value) and bad is None, key, f"{value!r} must be one word of printable characters "
           f"(no space, newline, quote, $, ;, \\ or /){'' if bad is None else f': it holds {bad!r}'}")


def validate(cfg: TrainConfig) -> None:
    """A training config (train.py, the plan, the launcher)."""
    check_word(cfg.name, "name")
    args = validate_model(cfg.model, cfg.memory, cfg.moe)
    _check(cfg.steps > 0, "steps", "must be positive")
    _check(cfg.log_every > 0, "log_every", "must be positive")
    _check(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)")
    _check(bool(cfg.dump_dir), "dump_dir", "must not be empty")
    _check(not Path(cfg.dump_dir).is_file(), "dump_dir", f"{cfg.dump_dir} is a file")
    validate_data(cfg.data, cfg.model.max_seq_len)
    validate_optim(cfg.optim)
    validate_distributed(cfg.distributed, cfg.memory, args)
    _check(not (cfg.distributed.compile and args.moe.layers), "distributed.compile",
           "cannot be used with moe.layers (each expert's tokens are a data-dependent shape); "
           "turn one of them off")
    _check_choice(cfg.logging.wandb.mode, "logging.wandb.mode", WandbMode)
    validate_eval(cfg.eval)
    if cfg.eval.every:
        parse_tasks(cfg.eval.tasks, "eval.tasks", lm_eval=False)
    validate_finetune(cfg)
    validate_checkpoint(cfg.checkpoint)


def validate_model(m: ModelConfig, mem: MemoryConfig, moe: MoEConfig | None = None) -> ModelArgs:
    """The model's arguments, or ConfigError naming the key of an impossible shape
    (shared by train, stats and export)."""
    _check_choice(mem.kind, "memory.kind", MemoryKind)
    _check(m.multiple_of > 0, "model.multiple_of", "must be positive")
    _check_choice(m.attention_impl, "model.attention_impl", AttentionImpl)
    if m.ffn_dim_multiplier is not None:
        _check_positive_finite(m.ffn_dim_multiplier, "model.ffn_dim_multiplier")
    args = model_args(m, mem, moe)
    try:
        validate_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return args


def validate_data(d: DataConfig, max_seq_len: int) -> None:
    _check(d.batch_size > 0, "data.batch_size", "must be positive")
    _check(d.seq_len > 0, "data.seq_len", "must be positive")
    _check(d.seq_len <= max_seq_len, "data.seq_len", f"{d.seq_len} exceeds model.max_seq_len={max_seq_len}")
    _check_choice(d.tokenizer.name, "data.tokenizer.name", TokenizerName)
    if d.tokenizer.name != "bytes":
        _check(bool(d.tokenizer.path), "data.tokenizer.path", f"required for {d.tokenizer.name}")
    for name, src in d.sources.items():
        _check(bool(src.path), f"data.sources.{name}.path", "must be set")
        _check_positive_finite(src.weight, f"data.sources.{name}.weight")
        _check_choice(src.format, f"data.sources.{name}.format", SourceFormat)
    _check_choice(d.prefetch, "data.prefetch", Prefetch)
    _check(d.prefetch_depth > 0, "data.prefetch_depth", "must be positive")
    _check(d.max_doc_tokens >= 0, "data.max_doc_tokens", "must be >= 0 (0: no cap)")
    _check(d.facts.people > 0, "data.facts.people", "must be positive")
    _check_choice(d.facts.style, "data.facts.style", FactsStyle)
    _check(d.facts.docs_per_person > 0, "data.facts.docs_per_person", "must be positive")
    _check(0.0 <= d.facts.qa_fraction < 1.0, "data.facts.qa_fraction", "must be in [0, 1)")


def validate_optim(o: OptimConfig) -> None:
    for key in ("lr", "value_lr", "eps"):
        _check_positive_finite(getattr(o, key), f"optim.{key}")
    for key in ("weight_decay", "value_weight_decay", "clip", "value_clip", "warmup"):
        value = getattr(o, key)
        _check(math.isfinite(value) and value >= 0, f"optim.{key}", f"{value} must be finite, >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _check(0 <= o.lr_min_ratio <= 1, "optim.lr_min_ratio", "must be in [0, 1]")
    _check(o.grad_accum > 0, "optim.grad_accum", "must be positive")
    _check_choice(o.scheduler, "optim.scheduler", Scheduler)
    _check_choice(o.value_optimizer, "optim.value_optimizer", ValueOptimizer)


def validate_devices(d: DistributedConfig) -> None:
    """What every command that runs a model asks of `distributed`."""
    _check_choice(d.device, "distributed.device", Device)
    _check_choice(d.compute_dtype, "distributed.compute_dtype", Dtype)
    _check(d.memory_parallel_size > 0, "distributed.memory_parallel_size", "must be positive")


def validate_distributed(d: DistributedConfig, memory: MemoryConfig, args: ModelArgs) -> None:
    """The layout training runs with, and the memory's kernel and read dtype (choices of how
    the model is computed, not of what it is)."""
    validate_devices(d)
    _check_choice(memory.kernel, "memory.kernel", Kernel)
    _check(not (d.deterministic and memory.kernel == "triton"), "distributed.deterministic",
           "memory.kernel=triton adds a hot row's gradient segments by atomics (not deterministic); "
           "use memory.kernel=auto or torch")
    _check_choice(memory.value_compute_dtype, "memory.value_compute_dtype", ValueDtype)
    _check_choice(d.activation_checkpointing, "distributed.activation_checkpointing", ACMode)
    _check(not (memory.query_batchnorm and d.activation_checkpointing != "none"),
           "distributed.activation_checkpointing", "cannot be used with memory.query_batchnorm "
           "(recomputing the forward would update the BatchNorm running statistics twice)")
    _check(d.dp_replicate > 0, "distributed.dp_replicate", "must be positive")
    _check(d.dp_shard == -1 or d.dp_shard > 0, "distributed.dp_shard", "must be positive or -1")
    mp = d.memory_parallel_size
    if memory.layers:
        v_dim = args.memory.v_dim
        _check(v_dim % mp == 0, "distributed.memory_parallel_size", f"{mp} does not divide v_dim={v_dim}")
    _check_choice(d.value_reduce_dtype, "distributed.value_reduce_dtype", Dtype)


def parse_tasks(spec: str, key: str, lm_eval: bool = True) -> list[str]:
    """The comma-separated task list; ConfigError naming `key` for an unknown task."""
    tasks = [t.strip() for t in spec.split(",") if t.strip()]
    if not tasks:
        raise ConfigError(f"{key}: no task given (val, facts_qa, generate, lm_eval:<task>)")
    for t in tasks:
        if t.startswith("lm_eval:") and not lm_eval:
            raise ConfigError(f"{key}: {t}: lm-evaluation-harness tasks run in eval.py, not during training")
        if t not in EVAL_TASKS and not (t.startswith("lm_eval:") and len(t) > len("lm_eval:")):
            raise ConfigError(f"{key}: {t!r} is not a task (val, facts_qa, generate, lm_eval:<task>)")
    return tasks


def validate_eval(e: EvalConfig, key: str = "eval.generate") -> None:
    _check(e.every >= 0, "eval.every", "must be >= 0 (0: no evaluation during training)")
    for name in ("batch_tokens", "batch_size", "max_answer_tokens"):
        _check(getattr(e, name) > 0, f"eval.{name}", "must be positive")
    for name in ("max_tokens", "max_questions", "seq_len"):
        _check(getattr(e, name) >= 0, f"eval.{name}", "must be >= 0")
    for name, src in e.sources.items():
        _check(bool(src.path), f"eval.sources.{name}.path", "must be set")
        _check_choice(src.kind, f"eval.sources.{name}.kind", EvalSourceKind)
        _check_choice(src.format, f"eval.sources.{name}.format", SourceFormat)
    validate_generate(e.generate, key)


def validate_generate(g: GenerateConfig, key: str) -> None:
    _check(g.max_new_tokens > 0, f"{key}.max_new_tokens", "must be positive")
    _check(g.batch_size > 0, f"{key}.batch_size", "must be positive")
    _check(math.isfinite(g.temperature) and g.temperature >= 0, f"{key}.temperature", "must be >= 0")
    _check(0 < g.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")


def validate_lora(lora: LoraConfig) -> None:
    """ConfigError naming the finetune.lora key of a bad setting (training's config, and the
    config.yaml of a LoRA run's checkpoint when it is read)."""
    _check(isinstance(lora.rank, int) and lora.rank > 0, "finetune.lora.rank", "must be a positive integer")
    _check_positive_finite(lora.alpha, "finetune.lora.alpha")
    _check(bool(lora.targets), "finetune.lora.targets", f"must name some of {', '.join(LORA_TARGETS)}")
    for t in lora.targets:
        _check_choice(t, "finetune.lora.targets", LoraTarget)


def validate_finetune(cfg: TrainConfig) -> None:
    f = cfg.finetune
    _check_choice(f.mode, "finetune.mode", FinetuneMode)
    _check_choice(f.ranking, "finetune.ranking", Ranking)
    _check_choice(f.optimizer, "finetune.optimizer", RowOptimizer)
    _check(f.top_t > 0, "finetune.top_t", "must be positive")
    validate_lora(f.lora)
    if f.mode == "sparse_memory":
        _check(bool(cfg.memory.layers), "finetune.mode", "sparse_memory needs memory layers (memory.layers)")
        _check(bool(f.background), "finetune.background", "required for sparse_memory: the background read "
               "counts (python -m lingua_mem.eval.usage ckpt=... out=...)")
        _check(Path(f.background).is_file(), "finetune.background", f"no such file {f.background}")
        counted, start = _counted_checkpoint(f.background), cfg.checkpoint.init_from
        _check(counted is None or start is None or Path(counted).resolve() == Path(start).resolve(),
               "finetune.background", f"{f.background} counts the reads of {counted}, and this run starts "
               f"from checkpoint.init_from={start}: count that model's (python -m lingua_mem.eval.usage "
               f"ckpt={start} out=...)")
        _check(not cfg.distributed.compile, "distributed.compile", "cannot be used with "
               "finetune.mode=sparse_memory (its read counts hook the memory layers in eager code)")


def _counted_checkpoint(usage_file: str) -> str | None:
    """The checkpoint whose reads a usage file counts (its metadata's "ckpt"), or None when it
    does not say (or is no safetensors file: reading it says so later, in one line)."""
    from safetensors import safe_open

    try:
        with safe_open(usage_file, framework="numpy") as f:
            return (f.metadata() or {}).get("ckpt")
    except Exception:  # noqa: BLE001 (safetensors raises its own kinds for a bad header)
        return None


def validate_checkpoint(c: CheckpointConfig) -> None:
    _check(c.every >= 0, "checkpoint.every", "must be >= 0")
    _check(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
    _check(c.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
    for name in c.preempt_signals:
        _check_choice(name, "checkpoint.preempt_signals", PreemptSignal)
    if c.init_from is not None:
        init = Path(c.init_from)
        _check((init / ".metadata").is_file() or (init / "config.json").is_file(), "checkpoint.init_from",
               f"no checkpoint at {c.init_from} (expected a checkpoints/<step> directory, or a Hugging "
               "Face directory: config.json + safetensors)")


def validate_eval_command(cfg: EvalCommandConfig) -> None:
    _check(bool(cfg.ckpt), "ckpt", "required (a checkpoints/<step> directory or a consolidated export)")
    parse_tasks(cfg.tasks, "tasks")
    validate_eval(cfg.eval)
    validate_devices(cfg.distributed)


def validate_usage_command(cfg: UsageCommandConfig) -> None:
    _check(bool(cfg.ckpt), "ckpt", "required (a checkpoints/<step> directory or a consolidated export)")
    _check(cfg.batches > 0, "batches", "must be positive")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be positive")
    _check(cfg.data.seq_len > 0, "data.seq_len", "must be positive")
    for name, src in cfg.data.sources.items():
        _check(bool(src.path), f"data.sources.{name}.path", "must be set")
    _check_choice(cfg.data.prefetch, "data.prefetch", Prefetch)
    validate_devices(cfg.distributed)
