"""The configs' schema: nested dataclasses, one per section, with every choice a Literal
type (OmegaConf checks them at the merge; validate.py checks them again for a config built
in code, from the same Literal: `choices(T)`). What each key means is said beside it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, get_args

from lingua_mem.model.args import MemoryArgs, ModelArgs, MoEArgs, llama_ffn_hidden_dim

Device = Literal["auto", "cpu", "cuda"]
Dtype = Literal["fp32", "bf16"]
ValueDtype = Literal["auto", "fp32", "bf16"]  # memory.value_compute_dtype (auto: the compute dtype)
# data.facts.style: mixed (a few biographies a person, facts and templates drawn at random) or
# capacity (docs_per_person full biographies a person, one template an attribute, random order)
FactsStyle = Literal["mixed", "capacity"]
Attention = Literal["causal", "doc_causal"]  # doc_causal: within the token's own document only
# doc_causal's implementation: auto (xformers on CUDA when installed, else flex_attention;
# sdpa with a bool mask elsewhere) | sdpa | flex | xformers (off CUDA: a slow twin, for tests)
AttentionImpl = Literal["auto", "sdpa", "flex", "xformers"]
# the value bag's implementation: auto (triton on CUDA when installed, else torch) | torch |
# triton (on the CPU only under TRITON_INTERPRET=1: the tests' way)
Kernel = Literal["auto", "torch", "triton"]
TokenizerName = Literal["bytes", "sentencepiece", "tiktoken"]
SourceFormat = Literal["auto", "jsonl", "parquet", "text", "hf"]
Prefetch = Literal["none", "thread", "process"]
Scheduler = Literal["cosine", "linear", "constant"]
ACMode = Literal["none", "selective", "full"]  # activation checkpointing, least recompute first
WandbMode = Literal["online", "offline", "disabled"]
PreemptSignal = Literal["SIGUSR1", "SIGUSR2", "SIGTERM", "SIGINT", "SIGHUP"]
EvalSourceKind = Literal["text", "qa"]
LoraTarget = Literal["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
FinetuneMode = Literal["full", "sparse_memory", "lora"]
Ranking = Literal["tfidf", "kl"]
RowOptimizer = Literal["sgd", "adamw"]
# the value tables' update in training: adamw every row every step (the paper's), or only the
# rows a step reads: lazy_adamw (their moments), adagrad (row-wise: one accumulator per row)
ValueOptimizer = Literal["adamw", "lazy_adamw", "adagrad"]
# the product-key layer's family: pkm (Memory+ with memory.swilu, vanilla "Memory" without) or
# peer (He 2024: single-neuron experts found by product keys; memory.swilu=false) or ultramem
# (Huang 2025: Tucker-scored key grid, implicit value expansion; memory.swilu=false)
MemoryKind = Literal["pkm", "peer", "ultramem"]


def choices(literal) -> tuple[str, ...]:
    """The values of a Literal type, in the order it lists them."""
    return get_args(literal)


AC_MODES = choices(ACMode)
LORA_TARGETS = choices(LoraTarget)


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
    attention: Attention = "doc_causal"
    attention_impl: AttentionImpl = "auto"


@dataclass
class MemoryConfig:
    """Product-key memory (Memory+) replacing the FFN at `layers`."""

    layers: list[int] = field(default_factory=list)  # empty: a dense model
    kind: MemoryKind = "pkm"
    n_keys: int = 1024  # sub-keys per half; memory size n_keys**2
    heads: int = 4
    knn: int = 32  # top-k per head
    k_dim: int | None = None  # None: model dim / 2
    v_dim: int | None = None  # None: model dim
    shared_values: bool = True  # one value table for all memory layers
    swilu: bool = True  # Memory+ gated output; False: vanilla PKM
    qk_norm: bool = False  # RMSNorm on query halves and sub-keys
    query_batchnorm: bool = False  # BatchNorm on the query (Lample 2019)
    tucker_rank: int = 2  # ultramem: rank of the Tucker core scoring the key grid
    value_expansion: int = 1  # ultramem: virtual values per physical row (n_keys**2 / this rows)
    kernel: Kernel = "auto"
    # the dtype the bags of the rows a batch reads are made, sent and differentiated in
    # (accumulated in fp32 either way; the rows are read from the fp32 shards): bf16 halves
    # the bytes of the bags and their gradients; the shards and optimizer state stay fp32.
    # auto: distributed.compute_dtype's (a bf16 run computes its values in bf16)
    value_compute_dtype: ValueDtype = "auto"


@dataclass
class MoEConfig:
    """Token-choice top-k mixture of SwiGLU experts replacing the FFN at `layers` (the paper's
    MoE baseline): a router picks each token's top_k experts, dropless (no capacity limit)."""

    layers: list[int] = field(default_factory=list)  # empty: no MoE layer
    experts: int = 8
    top_k: int = 1  # top-1: the gate is the router's probability (Switch); more: renormalised
    hidden_dim: int | None = None  # an expert's width; None: the dense FFN's (model's rule)
    aux_loss_weight: float = 0.01  # Switch's load-balancing loss, added to the training loss


@dataclass
class TokenizerConfig:
    name: str = "bytes"  # a TokenizerName ("" in eval.py: the run's)
    path: str | None = None  # .model file (sentencepiece) or BPE ranks file (tiktoken)


@dataclass
class SourceConfig:
    path: str = ""  # directory, file or glob of jsonl(.gz) / parquet / txt(.gz) files, or a HF dataset
    weight: float = 1.0
    text_field: str = "text"
    # auto: a save_to_disk folder is hf, else the first of jsonl, parquet, text (*.txt(.gz), a
    # document per non-blank line) its files are named as; an explicit hf also streams local
    # data files through datasets.load_dataset
    format: SourceFormat = "auto"
    split: str = "train"  # the split of a Hugging Face dataset


@dataclass
class FactsConfig:
    """The generated synthetic facts corpus, used when data.sources is empty."""

    people: int = 1000
    seed: int = 0
    style: FactsStyle = "mixed"
    docs_per_person: int = 3  # biographies a person (capacity: copies of the whole biography)
    # mixed training (Physics of LMs 3.1): this fraction of the people also has its facts as
    # answered questions in the training text; the QA set asks the others only
    qa_fraction: float = 0.0


@dataclass
class DataConfig:
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    facts: FactsConfig = field(default_factory=FactsConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    batch_size: int = 8  # sequences per micro-batch
    seq_len: int = 256
    seed: int = 0
    prefetch: Prefetch = "thread"  # batches made ahead in the background
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
    scheduler: Scheduler = "cosine"
    lr_min_ratio: float = 0.1  # final lr as a fraction of the peak
    clip: float = 1.0  # max grad norm of the dense parameters (0: off)
    grad_accum: int = 1  # micro-batches per optimizer step
    value_lr: float = 1e-3  # value tables' own peak lr
    value_weight_decay: float = 0.0
    value_clip: float = 1.0  # max grad norm of the value tables (0: off)
    value_optimizer: ValueOptimizer = "adamw"  # see ValueOptimizer; optim.py
    # a step whose gradient norm is not finite makes no update and is counted (skipped_steps)
    # instead of stopping the run; costs one host sync per step
    skip_nonfinite: bool = False


@dataclass
class DistributedConfig:
    device: Device = "auto"
    compute_dtype: Dtype = "fp32"  # FSDP2's param dtype (one process too), fp32 reduce
    dp_replicate: int = 1  # replicas of the dense parameters (HSDP when dp_shard > 1 too)
    dp_shard: int = -1  # ranks the dense parameters are sharded over; -1: world / dp_replicate
    memory_parallel_size: int = 1  # consecutive ranks sharing the value tables by columns
    # recompute activations in backward, per block (memory layers included):
    # selective keeps matmul, attention, top-k and bag outputs
    activation_checkpointing: ACMode = "none"
    compile: bool = False  # torch.compile each block (memory layers included)
    # dtype in which each rank sends its value reads' gradients (one per token and owner) to
    # the rows' owners, who sum the rows' gradients in fp32 (dense parameters reduce in fp32)
    value_reduce_dtype: Dtype = "fp32"
    # fp32 matmuls on CUDA in TF32 (a 10-bit mantissa, 8x the fp32 FLOP/s on an H100; the
    # plan's fp32 peak assumes it); false: full fp32 matmuls
    tf32: bool = True
    # bit-exact resume on CUDA where torch allows it: torch.use_deterministic_algorithms (an op
    # without a deterministic kernel stops the run), cuBLAS's fixed workspace, the torch value
    # bag for memory.kernel=auto (Triton's row backward adds a hot row's segments by atomics);
    # slower (docs/distributed.md, Determinism)
    deterministic: bool = False


@dataclass
class WandbConfig:
    enabled: bool = False
    project: str = "lingua_mem"
    entity: str | None = None
    name: str | None = None
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    mode: WandbMode = "offline"


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
    # each: checkpoint at the end of the step, then exit (SIGINT, Ctrl-C: exit 130, no requeue)
    preempt_signals: list[PreemptSignal] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM",
                                                                          "SIGINT"])
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
    kind: EvalSourceKind = "text"
    text_field: str = "text"
    format: SourceFormat = "auto"  # as data.sources (text kind)
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
    targets: list[LoraTarget] = field(default_factory=lambda: list(LORA_TARGETS))


@dataclass
class FinetuneConfig:
    """What a run trains. full: every parameter (pretraining, full finetuning). sparse_memory:
    only the value rows a step's batch reads most specifically against background usage
    (Lin et al. 2025); every other parameter and row is frozen. lora: low-rank adapters only."""

    mode: FinetuneMode = "full"
    # sparse_memory: the background read counts (python -m lingua_mem.eval.usage)
    background: str | None = None
    ranking: Ranking = "tfidf"  # how a batch's rows are scored against the background
    top_t: int = 500  # rows updated per step, per value table (selected over the global batch)
    optimizer: RowOptimizer = "sgd"  # the selected rows' update (lr: optim.value_lr)
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
    moe: MoEConfig = field(default_factory=MoEConfig)
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
    out: str = ""  # "": <dump_dir>/memory_usage/<step>.safetensors (run_dir.usage_file)
    batches: int = 64  # per process
    # defaults: the run's own data section (config.yaml of a training checkpoint), then these keys
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)


def model_args(m: ModelConfig, mem: MemoryConfig, moe: MoEConfig | None = None) -> ModelArgs:
    """The model's arguments from the YAML's `model`, `memory` and `moe` sections; the defaults
    left open there (n_kv_heads, k_dim, v_dim, the FFN and expert widths) are resolved here, once."""
    moe = moe or MoEConfig()
    ffn_hidden_dim = llama_ffn_hidden_dim(m.dim, m.ffn_dim_multiplier, m.multiple_of)
    return ModelArgs(
        dim=m.dim, n_layers=m.n_layers, n_heads=m.n_heads,
        n_kv_heads=m.n_kv_heads if m.n_kv_heads is not None else m.n_heads,
        vocab_size=m.vocab_size,
        ffn_hidden_dim=ffn_hidden_dim,
        norm_eps=m.norm_eps, rope_theta=m.rope_theta, max_seq_len=m.max_seq_len,
        tie_embeddings=m.tie_embeddings, init_std=m.init_std, attention=m.attention,
        memory=MemoryArgs(
            layers=tuple(mem.layers), kind=mem.kind, n_keys=mem.n_keys, heads=mem.heads, knn=mem.knn,
            k_dim=mem.k_dim if mem.k_dim is not None else m.dim // 2,
            v_dim=mem.v_dim if mem.v_dim is not None else m.dim,
            shared_values=mem.shared_values, swilu=mem.swilu, qk_norm=mem.qk_norm,
            query_batchnorm=mem.query_batchnorm, tucker_rank=mem.tucker_rank,
            value_expansion=mem.value_expansion),
        moe=MoEArgs(layers=tuple(moe.layers), experts=moe.experts, top_k=moe.top_k,
                    hidden_dim=moe.hidden_dim if moe.hidden_dim is not None else ffn_hidden_dim,
                    aux_loss_weight=moe.aux_loss_weight))
