"""The model's own arguments: every dimension resolved, nothing about training.

A Transformer is built from a ModelArgs alone, so evaluation and export need no
training config. `lingua_mem.config.model_args` maps the YAML's `model` and
`memory` sections onto it (where the defaults such as k_dim = dim / 2 are applied).
"""

from __future__ import annotations

import math
from dataclasses import MISSING, asdict, dataclass, field, fields


def llama_ffn_hidden_dim(dim: int, multiplier: float | None, multiple_of: int) -> int:
    """Llama's rule: 2/3 of 4*dim, scaled by `multiplier`, rounded up to multiple_of."""
    hidden = int(2 * (4 * dim) / 3)
    if multiplier is not None:
        hidden = int(multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


# the product-key layer families (memory.kind): pkm reads a weighted bag of value rows
# (Memory+ with swilu, the paper's "Memory" without); peer reads n_keys**2 single-neuron
# experts (He 2024): the same search, each picked expert's weight gelu(u_i . x) times its score;
# ultramem (Huang 2025): Tucker-scored key grid, values expanded through projectors
MEMORY_KINDS = ("pkm", "peer", "ultramem")


@dataclass(frozen=True)
class MemoryArgs:
    """Product-key memory (Memory+) replacing the FFN at `layers` (empty: a dense model)."""

    layers: tuple[int, ...] = ()
    kind: str = "pkm"  # MEMORY_KINDS
    n_keys: int = 1024  # sub-keys per half; n_keys**2 values
    heads: int = 4
    knn: int = 32  # top-k per head
    k_dim: int = 128  # query / key dim of one head (two halves of k_dim / 2)
    v_dim: int = 256  # value dim
    shared_values: bool = True  # one value table for all memory layers
    swilu: bool = True  # Memory+ gated output; False: vanilla PKM
    qk_norm: bool = False
    query_batchnorm: bool = False
    tucker_rank: int = 2  # ultramem: rank of the key grid's Tucker core
    value_expansion: int = 1  # ultramem: virtual values per physical row (projectors)

    @property
    def n_values(self) -> int:
        """Rows of a value table: the n_keys**2 slots, or for ultramem their physical rows."""
        return self.n_keys**2 // self.value_expansion


@dataclass(frozen=True)
class MoEArgs:
    """Token-choice top-k mixture of SwiGLU experts replacing the FFN at `layers` (the paper's
    MoE baseline; empty: none)."""

    layers: tuple[int, ...] = ()
    experts: int = 8
    top_k: int = 1
    hidden_dim: int = 0  # an expert's SwiGLU width (config: the dense FFN's by default)
    aux_loss_weight: float = 0.01  # the load-balancing loss's weight in the training loss


@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    init_std: float = 0.02
    memory: MemoryArgs = field(default_factory=MemoryArgs)
    moe: MoEArgs = field(default_factory=MoEArgs)
    # causal: every earlier token of the window; doc_causal: only those of the token's own
    # document (the batch's doc_ids; without them, causal). "causal" is the default of
    # checkpoints and exports that predate the key
    attention: str = "causal"

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        """Plain JSON-able values (tuples as lists)."""
        out = asdict(self)
        out["memory"]["layers"] = list(self.memory.layers)
        out["moe"]["layers"] = list(self.moe.layers)
        return out

    @classmethod
    def from_dict(cls, raw: dict) -> ModelArgs:
        """The inverse of to_dict; ValueError (one line) naming a missing or unknown key as
        the YAML spells it (model.<x>, memory.<x>, moe.<x>); a section an older lingua_mem did
        not write (moe) takes its defaults."""
        if not isinstance(raw, dict):
            raise ValueError(f"model: must be a mapping, not {type(raw).__name__}")
        _check_keys(raw, cls, "model.")
        sections = {}
        for name, schema in (("memory", MemoryArgs), ("moe", MoEArgs)):
            section = raw.get(name, {})
            if not isinstance(section, dict):
                raise ValueError(f"{name}: must be a mapping, not {type(section).__name__}")
            _check_keys(section, schema, f"{name}.")
            sections[name] = schema(**{**section, "layers": tuple(section.get("layers", ()))})
        return cls(**{**raw, **sections})


def _check_keys(raw: dict, schema, prefix: str) -> None:
    names = {f.name for f in fields(schema)}
    required = {f.name for f in fields(schema) if f.default is MISSING and f.default_factory is MISSING}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"{prefix}{unknown[0]}: not a model argument")
    missing = sorted(required - set(raw))
    if missing:
        raise ValueError(f"{prefix}{missing[0]}: missing")


def _check(ok: bool, key: str, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}: {why}")


def validate_args(args: ModelArgs) -> None:
    """ValueError (one line, naming the key as the YAML spells it: model.<x>, memory.<x>)
    for a shape no model can have."""
    for key in ("dim", "n_layers", "n_heads", "vocab_size", "max_seq_len", "ffn_hidden_dim"):
        _check(isinstance(getattr(args, key), int) and getattr(args, key) > 0, f"model.{key}",
               "must be a positive integer")
    _check(args.dim % args.n_heads == 0, "model.n_heads",
           f"{args.n_heads} does not divide model.dim={args.dim}")
    _check(args.head_dim % 2 == 0, "model.n_heads", f"head dim {args.head_dim} must be even for RoPE")
    _check(args.n_kv_heads > 0 and args.n_heads % args.n_kv_heads == 0, "model.n_kv_heads",
           f"{args.n_kv_heads} does not divide model.n_heads={args.n_heads}")
    _check(args.attention in ("causal", "doc_causal"), "model.attention",
           f"{args.attention!r} is not one of causal, doc_causal")
    for key in ("norm_eps", "rope_theta", "init_std"):
        value = getattr(args, key)
        _check(math.isfinite(value) and value > 0, f"model.{key}",
               f"{value} must be a positive finite number")
    _validate_moe(args)
    mem = args.memory
    if not mem.layers:
        return
    _check(mem.kind in MEMORY_KINDS, "memory.kind", f"{mem.kind!r} is not one of {', '.join(MEMORY_KINDS)}")
    if mem.kind == "peer":
        _check(not mem.swilu, "memory.swilu", "PEER has no gated output: set memory.swilu=false with "
               "memory.kind=peer")
        _check(mem.v_dim == args.dim, "memory.v_dim", f"{mem.v_dim}: PEER's experts write model.dim="
               f"{args.dim} (leave memory.v_dim unset)")
    if mem.kind == "ultramem":
        _check(not mem.swilu, "memory.swilu", "UltraMem has no gated output: set memory.swilu=false with "
               "memory.kind=ultramem")
        _check(mem.tucker_rank > 0, "memory.tucker_rank", "must be positive")
        _check(2 * mem.knn <= mem.n_keys, "memory.knn", f"{mem.knn}: UltraMem's search takes 2 * knn rows "
               f"of memory.n_keys={mem.n_keys}")
    _check(mem.value_expansion > 0 and mem.n_keys**2 % mem.value_expansion == 0, "memory.value_expansion",
           f"{mem.value_expansion} must be positive and divide n_keys**2={mem.n_keys**2}")
    _check(mem.value_expansion == 1 or mem.kind == "ultramem", "memory.value_expansion",
           "only memory.kind=ultramem expands values")
    for i in mem.layers:
        _check(0 <= i < args.n_layers, "memory.layers", f"layer {i} outside 0..{args.n_layers - 1}")
    _check(len(set(mem.layers)) == len(mem.layers), "memory.layers", "repeats a layer")
    for key in ("n_keys", "heads", "knn"):
        _check(getattr(mem, key) > 0, f"memory.{key}", "must be positive")
    _check(mem.knn <= mem.n_keys, "memory.knn", f"{mem.knn} exceeds memory.n_keys={mem.n_keys}")
    _check(mem.k_dim > 0 and mem.k_dim % 2 == 0, "memory.k_dim", f"{mem.k_dim} must be positive and even")
    _check(mem.v_dim > 0, "memory.v_dim", "must be positive")


def _validate_moe(args: ModelArgs) -> None:
    moe = args.moe
    if not moe.layers:
        return
    for i in moe.layers:
        _check(0 <= i < args.n_layers, "moe.layers", f"layer {i} outside 0..{args.n_layers - 1}")
    _check(len(set(moe.layers)) == len(moe.layers), "moe.layers", "repeats a layer")
    both = sorted(set(moe.layers) & set(args.memory.layers))
    _check(not both, "moe.layers", f"layer {both[0] if both else 0} is also a memory layer (memory.layers): "
           "a block has one FFN")
    _check(moe.experts > 0, "moe.experts", "must be positive")
    _check(0 < moe.top_k <= moe.experts, "moe.top_k", f"{moe.top_k} must be in 1..moe.experts={moe.experts}")
    _check(moe.hidden_dim > 0, "moe.hidden_dim", "must be positive")
    _check(math.isfinite(moe.aux_loss_weight) and moe.aux_loss_weight >= 0, "moe.aux_loss_weight",
           f"{moe.aux_loss_weight} must be finite, >= 0")
