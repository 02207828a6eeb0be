"""Nested dataclass configs: dataclass defaults <- YAML file <- CLI dotlist.

`load_config(argv)` is the single entry: it merges, type-checks and validates
once, and raises ConfigError with a one-line message naming the offending key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lingua_mem.errors import ConfigError  # noqa: F401 (re-exported: config is where users look)
from lingua_mem.model.args import MemoryArgs, ModelArgs, llama_ffn_hidden_dim, validate_args

# distributed.activation_checkpointing, least recompute first
AC_MODES = ("none", "selective", "full")


@dataclass
class ModelConfig:
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None  # None: n_heads (no grouping)
    vocab_size: int = 258
    ffn_dim_multiplier: float | None = None
    multiple_of: int = 256
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    attention: str = "doc_causal"  # causal | doc_causal: attend within the token's own document only
    # doc_causal's implementation: auto (xformers on CUDA when installed, else flex_attention;
    # sdpa with a bool mask elsewhere) | sdpa | flex | xformers (off CUDA: a slow twin, for tests)
    attention_impl: str = "auto"


@dataclass
class MemoryConfig:
    """Product-key memory (Memory+) replacing the FFN at `layers`."""

    layers: list[int] = field(default_factory=list)  # empty: a dense model
    n_keys: int = 1024  # sub-keys per half; memory size n_keys**2
    heads: int = 4
    knn: int = 32  # top-k per head
    k_dim: int | None = None  # None: model dim / 2
    v_dim: int | None = None  # None: model dim
    shared_values: bool = True  # one value table for all memory layers
    swilu: bool = True  # Memory+ gated output; False: vanilla PKM
    qk_norm: bool = False  # RMSNorm on query halves and sub-keys
    query_batchnorm: bool = False  # BatchNorm on the query (Lample 2019)
    # the value bag's implementation: auto (triton on CUDA when installed, else torch) | torch |
    # triton (on the CPU only under TRITON_INTERPRET=1: the tests' way)
    kernel: str = "auto"
    # the dtype the bag reads the value tables in: bf16 gathers a bf16 copy (FSDP2's bf16
    # all-gather) and halves the bytes read; master weights and optimizer state stay fp32
    value_compute_dtype: str = "fp32"  # fp32 | bf16


@dataclass
class TokenizerConfig:
    name: str = "bytes"  # bytes | sentencepiece | tiktoken
    path: str | None = None  # .model file (sentencepiece) or BPE ranks file (tiktoken)


@dataclass
class SourceConfig:
    path: str = ""  # directory, file or glob of jsonl(.gz) / parquet / txt(.gz) files, or a HF dataset
    weight: float = 1.0
    text_field: str = "text"
    # auto: a save_to_disk folder is hf, else the first of jsonl, parquet, text (*.txt(.gz), a
    # document per non-blank line) its files are named as; an explicit hf also streams local
    # data files through datasets.load_dataset
    format: str = "auto"  # auto | jsonl | parquet | text | hf
    split: str = "train"  # the split of a Hugging Face dataset


@dataclass
class FactsConfig:
    """The generated synthetic facts corpus, used when data.sources is empty."""

    people: int = 1000
    seed: int = 0


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    facts: FactsConfig = field(default_factory=FactsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 256
    seed: int = 0
    prefetch: str = "thread"  # none | thread | process: batches made ahead in the background
    prefetch_depth: int = 8  # batches kept ready
    # a longer document is truncated to this many tokens (counted as data/truncated), which
    # bounds the loader's state in every checkpoint (about 2 MB of JSON) whatever the data;
    # 0: no cap
    max_doc_tokens: int = 262144


@dataclass
class OptimConfig:
    lr: float = 3e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup: int = 100
    scheduler: str = "cosine"  # cosine | linear | constant
    lr_min_ratio: float = 0.1  # final lr as a fraction of the peak
    clip: float = 1.0  # max grad norm of the dense parameters (0: off)
    grad_accum: int = 1  # micro-batches per optimizer step
    value_lr: float = 1e-3  # value tables' own peak lr
    value_weight_decay: float = 0.0
    value_clip: float = 1.0  # max grad norm of the value tables (0: off)
    # a step whose gradient norm is not finite makes no update and is counted (skipped_steps)
    # instead of stopping the run; costs one host sync per step
    skip_nonfinite: bool = False


@dataclass
class DistributedConfig:
    device: str = "auto"  # auto | cpu | cuda
    compute_dtype: str = "fp32"  # fp32 | bf16: FSDP2's param dtype (one process too), fp32 reduce
    dp_replicate: int = 1  # replicas of the dense parameters (HSDP when dp_shard > 1 too)
    dp_shard: int = -1  # ranks the dense parameters are sharded over; -1: world / dp_replicate
    memory_parallel_size: int = 1  # consecutive ranks sharing the value tables by columns
    # recompute activations in backward, per block (memory layers included):
    # none | selective (keep matmul, attention, top-k and bag outputs) | full
    activation_checkpointing: str = "none"
    compile: bool = False  # torch.compile each block (memory layers included)
    # dtype in which the value tables' gradients are averaged over data-parallel ranks
    # (fp32 | bf16); the dense parameters always reduce in fp32
    value_reduce_dtype: str = "fp32"


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "lingua_mem"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: str = "offline"  # online | offline | disabled


@dataclass
class LoggingConfig:
    console: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    every: int = 0  # steps between checkpoints (and one at the last step); 0: none but on preemption
    keep_last: int = 3  # the newest complete checkpoints kept; 0 keeps all
    keep_every: int = 0  # also keep forever every checkpoint whose step is a multiple of this
    async_save: bool = False  # write in the background; the step loop does not wait for the disk
    # a new run starts from the weights only of: a checkpoints/<step> dir, a transformers Llama
    # directory (its FFN at memory layers skipped) or a lingua_mem export (consolidate, export-hf)
    init_from: str | None = None
    # signals that mean "preempted": finish the step, checkpoint, requeue under SLURM, exit 0
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    requeue: bool = True  # under SLURM, `scontrol requeue $SLURM_JOB_ID` after a preemption checkpoint


@dataclass
class GenerateConfig:
    prompts: list[str] = field(default_factory=lambda: ["Ada Dorvane was born in", "The alma mater of"])
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0  # sampling keeps the smallest set of tokens reaching this probability
    seed: int = 0  # of the sampling generator (its own: training's RNGs are not touched)
    cache: bool = True  # KV cache; false recomputes the whole sequence at every step
    batch_size: int = 16  # prompts per forward call


@dataclass
class EvalSourceConfig:
    """Held-out data: documents (kind text: loss, perplexity, bits per byte) or questions
    (kind qa: {"question", "answer"[, "attribute", "person"]} jsonl rows: facts QA)."""

    path: str = ""
    kind: str = "text"  # text | qa
    text_field: str = "text"
    format: str = "auto"  # as data.sources (text kind)
    split: str = "validation"  # of a Hugging Face dataset


@dataclass
class EvalConfig:
    """Evaluation during training (every `every` steps and at the last) and by eval.py."""

    every: int = 0  # 0: no evaluation during training
    tasks: str = "val,facts_qa"  # comma-separated: val, facts_qa, generate, lm_eval:<task>
    # empty: the facts corpus's val.jsonl and qa.jsonl when the run trains on it, and for each
    # training source <dir>/train the val/ folder beside it (lingua_mem.data.prepare's layout)
    sources: dict[str, EvalSourceConfig] = field(default_factory=dict)
    max_tokens: int = 65536  # per text source: documents until this many tokens are scored (0: all)
    max_questions: int = 500  # per qa source: a fixed sample of questions (0: all)
    batch_tokens: int = 8192  # val tokens per forward call (rows of seq_len: at least one)
    batch_size: int = 32  # questions per forward call (facts QA)
    seq_len: int = 0  # val window; 0: data.seq_len of the run
    max_answer_tokens: int = 48  # greedy answer length cap (facts QA)
    analytics: bool = True  # memory-layer read statistics over the val tokens
    generate: GenerateConfig = field(default_factory=lambda: GenerateConfig(max_new_tokens=48))


@dataclass
class LoraConfig:
    """Low-rank adapters on the dense projections (finetune.mode=lora): W x + (alpha/rank) B A x,
    W frozen, A (rank, in) and B (out, rank) trained, B starting at zero."""

    rank: int = 8
    alpha: float = 16.0
    targets: list[str] = field(default_factory=lambda: ["wq", "wk", "wv", "wo", "w1", "w2", "w3"])


@dataclass
class FinetuneConfig:
    """What a run trains. full: every parameter (pretraining, full finetuning). sparse_memory:
    only the value rows a step's batch reads most specifically against background usage
    (Lin et al. 2025); every other parameter and row is frozen. lora: low-rank adapters only."""

    mode: str = "full"  # full | sparse_memory | lora
    # sparse_memory: the background read counts (python -m lingua_mem.eval.usage)
    background: str | None = None
    ranking: str = "tfidf"  # tfidf | kl: how a batch's rows are scored against the background
    top_t: int = 500  # rows updated per step, per value table (selected over the global batch)
    optimizer: str = "sgd"  # sgd | adamw: the selected rows' update (lr: optim.value_lr)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TrainConfig:
    dump_dir: str = "dumps/run"
    name: str = "run"
    steps: int = 1000  # optimizer steps
    log_every: int = 10
    seed: int = 42
    model: ModelConfig = field(default_factory=ModelConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)


@dataclass
class LmEvalConfig:
    include_path: str | None = None  # a folder of local lm-eval task YAMLs
    limit: int | None = None  # examples per task (None: all)
    num_fewshot: int | None = None


@dataclass
class EvalCommandConfig:
    """eval.py's configuration (defaults <- YAML <- key=value, like training's)."""

    ckpt: str = ""  # a checkpoints/<step> directory, or a consolidated export directory
    tasks: str = "val,facts_qa,generate"  # comma-separated: val, facts_qa, generate, lm_eval:<task>
    out: str = ""  # "": the run's dump dir (a training checkpoint) or the export's directory
    eval: EvalConfig = field(default_factory=EvalConfig)
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(name=""))  # "": the run's
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)


@dataclass
class UsageCommandConfig:
    """python -m lingua_mem.eval.usage: background read counts of a checkpoint's value rows."""

    ckpt: str = ""  # a checkpoints/<step> directory, or a consolidated export directory
    out: str = ""  # "": <ckpt>/memory_usage.safetensors
    batches: int = 64  # per process
    # defaults: the run's own data section (config.yaml of a training checkpoint), then these keys
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def validate_usage_command(cfg: UsageCommandConfig) -> None:
    _check(bool(cfg.ckpt), "ckpt", "required (a checkpoints/<step> directory or a consolidated export)")
    _check(cfg.batches > 0, "batches", "must be positive")
    _check(cfg.data.batch_size > 0, "data.batch_size", "must be positive")
    _check(cfg.data.seq_len > 0, "data.seq_len", "must be positive")
    for name, src in cfg.data.sources.items():
        _check(bool(src.path), f"data.sources.{name}.path", "must be set")
    _check_choice(cfg.data.prefetch, "data.prefetch", ("none", "thread", "process"))
    d = cfg.distributed
    _check_choice(d.device, "distributed.device", ("auto", "cpu", "cuda"))
    _check_choice(d.compute_dtype, "distributed.compute_dtype", ("fp32", "bf16"))
    _check(d.memory_parallel_size > 0, "distributed.memory_parallel_size", "must be positive")


def run_data_defaults(args: list[str]) -> dict | None:
    """{"data": the data section of the run whose checkpoint `ckpt=` names} (None: none
    readable), for commands whose data defaults to what the model was trained on."""
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("ckpt=")), None)
    path = Path(ckpt) / "config.yaml" if ckpt else None
    if path is None or not path.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path)).get("data")
    except Exception:  # an unreadable config.yaml is reported when the checkpoint is read
        return None
    return {"data": data} if isinstance(data, dict) else None


EVAL_TASKS = ("val", "facts_qa", "generate")


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
        _check_choice(src.kind, f"eval.sources.{name}.kind", ("text", "qa"))
        _check_choice(src.format, f"eval.sources.{name}.format", ("auto", "jsonl", "parquet", "text", "hf"))
    validate_generate(e.generate, key)


def validate_generate(g: GenerateConfig, key: str) -> None:
    _check(g.max_new_tokens > 0, f"{key}.max_new_tokens", "must be positive")
    _check(g.batch_size > 0, f"{key}.batch_size", "must be positive")
    _check(math.isfinite(g.temperature) and g.temperature >= 0, f"{key}.temperature", "must be >= 0")
    _check(0 < g.top_p <= 1, f"{key}.top_p", "must be in (0, 1]")


def validate_eval_command(cfg: EvalCommandConfig) -> None:
    _check(bool(cfg.ckpt), "ckpt", "required (a checkpoints/<step> directory or a consolidated export)")
    parse_tasks(cfg.tasks, "tasks")
    validate_eval(cfg.eval)
    d = cfg.distributed
    _check_choice(d.device, "distributed.device", ("auto", "cpu", "cuda"))
    _check_choice(d.compute_dtype, "distributed.compute_dtype", ("fp32", "bf16"))
    _check(d.memory_parallel_size > 0, "distributed.memory_parallel_size", "must be positive")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {why}")


def _check_positive_finite(value: float, key: str) -> None:
    _check(math.isfinite(value) and value > 0, key, f"{value} must be a positive finite number")


def _check_choice(value: str, key: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, key, f"{value!r} is not one of {', '.join(choices)}")


def model_args(m: ModelConfig, mem: MemoryConfig) -> ModelArgs:
    """The model's arguments from the YAML's `model` and `memory` sections; the defaults
    left open there (n_kv_heads, k_dim, v_dim, the FFN width) are resolved here, once."""
    return ModelArgs(
        dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads if m.n_kv_heads is not None else m.n_heads,
        vocab_size=m.vocab_size,
        ffn_hidden_dim=llama_ffn_hidden_dim(m.dim, m.ffn_dim_multiplier, m.multiple_of),
        norm_eps=m.norm_eps, rope_theta=m.rope_theta, max_seq_len=m.max_seq_len,
        tie_embeddings=m.tie_embeddings, init_std=m.init_std, attention=m.attention,
        memory=MemoryArgs(
            layers=tuple(mem.layers), n_keys=mem.n_keys, heads=mem.heads, knn=mem.knn,
            k_dim=mem.k_dim if mem.k_dim is not None else m.dim // 2,
            v_dim=mem.v_dim if mem.v_dim is not None else m.dim,
            shared_values=mem.shared_values, swilu=mem.swilu, qk_norm=mem.qk_norm,
            query_batchnorm=mem.query_batchnorm))


def validate_model(m: ModelConfig, mem: MemoryConfig) -> ModelArgs:
    """The model's arguments, or ConfigError naming the key of an impossible shape
    (shared by train, stats and export)."""
    _check(m.multiple_of > 0, "model.multiple_of", "must be positive")
    if m.ffn_dim_multiplier is not None:
        _check_positive_finite(m.ffn_dim_multiplier, "model.ffn_dim_multiplier")
    args = model_args(m, mem)
    try:
        validate_args(args)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return args


def validate(cfg: TrainConfig) -> None:
    args = validate_model(cfg.model, cfg.memory)
    _check(cfg.steps > 0, "steps", "must be positive")
    _check(cfg.log_every > 0, "log_every", "must be positive")
    _check(0 <= cfg.seed < 2**32, "seed", "must be in [0, 2**32)")
    _check(bool(cfg.dump_dir), "dump_dir", "must not be empty")
    _check(not Path(cfg.dump_dir).is_file(), "dump_dir", f"{cfg.dump_dir} is a file")
    d = cfg.data
    _check(d.batch_size > 0, "data.batch_size", "must be positive")
    _check(d.seq_len > 0, "data.seq_len", "must be positive")
    _check(d.seq_len <= cfg.model.max_seq_len, "data.seq_len",
           f"{d.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len}")
    _check_choice(d.tokenizer.name, "data.tokenizer.name", ("bytes", "sentencepiece", "tiktoken"))
    if d.tokenizer.name != "bytes":
        _check(bool(d.tokenizer.path), "data.tokenizer.path", f"required for {d.tokenizer.name}")
    for name, src in d.sources.items():
        _check(bool(src.path), f"data.sources.{name}.path", "must be set")
        _check_positive_finite(src.weight, f"data.sources.{name}.weight")
        _check_choice(src.format, f"data.sources.{name}.format", ("auto", "jsonl", "parquet", "text", "hf"))
    _check_choice(d.prefetch, "data.prefetch", ("none", "thread", "process"))
    _check(d.prefetch_depth > 0, "data.prefetch_depth", "must be positive")
    _check(d.max_doc_tokens >= 0, "data.max_doc_tokens", "must be >= 0 (0: no cap)")
    _check(d.facts.people > 0, "data.facts.people", "must be positive")
    o = cfg.optim
    for key in ("lr", "value_lr", "eps"):
        _check_positive_finite(getattr(o, key), f"optim.{key}")
    for key in ("weight_decay", "value_weight_decay", "clip", "value_clip", "warmup"):
        value = getattr(o, key)
        _check(math.isfinite(value) and value >= 0, f"optim.{key}", f"{value} must be finite, >= 0")
    _check(0 <= o.beta1 < 1, "optim.beta1", "must be in [0, 1)")
    _check(0 <= o.beta2 < 1, "optim.beta2", "must be in [0, 1)")
    _check(0 <= o.lr_min_ratio <= 1, "optim.lr_min_ratio", "must be in [0, 1]")
    _check(o.grad_accum > 0, "optim.grad_accum", "must be positive")
    _check_choice(o.scheduler, "optim.scheduler", ("cosine", "linear", "constant"))
    _check_choice(cfg.distributed.device, "distributed.device", ("auto", "cpu", "cuda"))
    _check_choice(cfg.memory.kernel, "memory.kernel", ("auto", "torch", "triton"))
    _check_choice(cfg.model.attention_impl, "model.attention_impl", ("auto", "sdpa", "flex", "xformers"))
    _check_choice(cfg.memory.value_compute_dtype, "memory.value_compute_dtype", ("fp32", "bf16"))
    dist = cfg.distributed
    _check_choice(dist.activation_checkpointing, "distributed.activation_checkpointing", AC_MODES)
    _check(not (cfg.memory.query_batchnorm and dist.activation_checkpointing != "none"),
           "distributed.activation_checkpointing", "cannot be used with memory.query_batchnorm "
           "(recomputing the forward would update the BatchNorm running statistics twice)")
    _check(dist.dp_replicate > 0, "distributed.dp_replicate", "must be positive")
    _check(dist.dp_shard == -1 or dist.dp_shard > 0, "distributed.dp_shard", "must be positive or -1")
    mp = dist.memory_parallel_size
    _check(mp > 0, "distributed.memory_parallel_size", "must be positive")
    if cfg.memory.layers:
        v_dim = args.memory.v_dim
        _check(v_dim % mp == 0, "distributed.memory_parallel_size", f"{mp} does not divide v_dim={v_dim}")
    _check_choice(cfg.distributed.compute_dtype, "distributed.compute_dtype", ("fp32", "bf16"))
    _check_choice(dist.value_reduce_dtype, "distributed.value_reduce_dtype", ("fp32", "bf16"))
    _check_choice(cfg.logging.wandb.mode, "logging.wandb.mode", ("online", "offline", "disabled"))
    validate_eval(cfg.eval)
    if cfg.eval.every:
        parse_tasks(cfg.eval.tasks, "eval.tasks", lm_eval=False)
    validate_finetune(cfg)
    c = cfg.checkpoint
    _check(c.every >= 0, "checkpoint.every", "must be >= 0")
    _check(c.keep_last >= 0, "checkpoint.keep_last", "must be >= 0")
    _check(c.keep_every >= 0, "checkpoint.keep_every", "must be >= 0")
    for name in c.preempt_signals:
        _check_choice(name, "checkpoint.preempt_signals",
                      ("SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"))
    if c.init_from is not None:
        init = Path(c.init_from)
        _check((init / ".metadata").is_file() or (init / "config.json").is_file(), "checkpoint.init_from",
               f"no checkpoint at {c.init_from} (expected a checkpoints/<step> directory, or a Hugging "
               "Face directory: config.json + safetensors)")


LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def validate_lora(lora: LoraConfig) -> None:
    """ConfigError naming the finetune.lora key of a bad setting (training's config, and the
    config.yaml of a LoRA run's checkpoint when it is read)."""
    _check(isinstance(lora.rank, int) and lora.rank > 0, "finetune.lora.rank", "must be a positive integer")
    _check_positive_finite(lora.alpha, "finetune.lora.alpha")
    _check(bool(lora.targets), "finetune.lora.targets", f"must name some of {', '.join(LORA_TARGETS)}")
    for t in lora.targets:
        _check_choice(t, "finetune.lora.targets", LORA_TARGETS)


def validate_finetune(cfg: TrainConfig) -> None:
    f = cfg.finetune
    _check_choice(f.mode, "finetune.mode", ("full", "sparse_memory", "lora"))
    _check_choice(f.ranking, "finetune.ranking", ("tfidf", "kl"))
    _check_choice(f.optimizer, "finetune.optimizer", ("sgd", "adamw"))
    _check(f.top_t > 0, "finetune.top_t", "must be positive")
    validate_lora(f.lora)
    if f.mode == "sparse_memory":
        _check(bool(cfg.memory.layers), "finetune.mode", "sparse_memory needs memory layers (memory.layers)")
        _check(bool(f.background), "finetune.background", "required for sparse_memory: the background read "
               "counts (python -m lingua_mem.eval.usage ckpt=... out=...)")
        _check(Path(f.background).is_file(), "finetune.background", f"no such file {f.background}")
        _check(not cfg.distributed.compile, "distributed.compile", "cannot be used with "
               "finetune.mode=sparse_memory (its read counts hook the memory layers in eager code)")


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0].strip()
    return f"{key}: {msg}" if key else msg


def load_config(args: list[str], schema: type = TrainConfig, check=validate, base: dict | None = None):
    """Build a config from `config=<yaml>` and `key=value` items.

    Merge order: dataclass defaults <- `base` <- YAML <- dotlist. Returns a dataclass
    instance of `schema`, validated by `check`.
    """
    yaml_path = None
    dotlist = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected key=value (e.g. config=configs/debug.yaml)")
        key, value = arg.split("=", 1)
        if key == "config":
            yaml_path = value
        else:
            dotlist.append(arg)
    merged = OmegaConf.structured(schema)
    if base is not None:
        try:
            merged = OmegaConf.merge(merged, OmegaConf.create(base))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{_one_line(exc)} (in the run's config.yaml)") from None
    if yaml_path is not None:  # its errors name the file
        path = Path(yaml_path)
        if not path.is_file():
            raise ConfigError(f"config: no such file {yaml_path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{_one_line(exc)} (in {yaml_path})") from None
        except Exception as exc:  # a YAML syntax error and the like
            raise ConfigError(f"config: cannot read {yaml_path}: {str(exc).splitlines()[0]}") from None
    try:  # the command line's errors say so
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(dotlist))
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{_one_line(exc)} (on the command line)") from None
    except Exception as exc:
        raise ConfigError(f"command line: {str(exc).splitlines()[0]}") from None
    check(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """A plain dict of a config dataclass (for logging and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
