"""LoRA on the dense projections: y = W x + (alpha / rank) B A x, W frozen, A and B trained.

Applied in place to a built model (on the meta device or materialised), before parallelize,
like every transformation of this project; the model code is untouched:

    model = build_model(args, "meta")
    apply_lora(model, cfg.finetune.lora)   # targeted nn.Linear -> LoRALinear; all else frozen
    parallelize(model, meshes, cfg.distributed)
    model.to_empty(device=device)
    model.init_weights(seed)               # the base model's values, as without LoRA
    init_lora(model, seed)                 # A drawn (layout-independent), B = 0

An adapted linear keeps the linear's parameter `weight` and adds `lora_a` (rank, in) and
`lora_b` (out, rank) beside it, so a dense checkpoint's tensors keep their names and a LoRA
run's checkpoint holds layers.<i>.attention.wq.{weight,lora_a,lora_b}. merge_lora folds the
adapters into the weights: a plain model's state dict. Only Attention's wq wk wv wo and the
dense FeedForward's w1 w2 w3 are targets; memory layers (ProductKeyMemory), value tables,
embeddings and norms are frozen and get no adapter.

FSDP2 (torch 2.13) shards frozen and trainable parameters of one fully_shard unit alike
(per-parameter DTensors, requires_grad kept) and reduce-scatters only the gradients that
exist; its uniform-dtype check covers the trainable parameters only.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingua_mem.config import LoraConfig, validate_lora
from lingua_mem.errors import ConfigError
from lingua_mem.model.llama import Attention, FeedForward
from lingua_mem.param_init import ParamInit

ATTENTION_TARGETS = ("wq", "wk", "wv", "wo")  # config.LORA_TARGETS, by module
FFN_TARGETS = ("w1", "w2", "w3")
LORA_PARAMS = ("lora_a", "lora_b")
# init_lora draws from ParamInit(seed + LORA_SEED_OFFSET): streams apart from the base model's
# (ParamInit(seed)), which stay as they are without LoRA
LORA_SEED_OFFSET = 104_729


def lora_scale(cfg: LoraConfig) -> float:
    """alpha / rank: the adapters' output multiplier."""
    return cfg.alpha / cfg.rank


class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank update: x W^T + scale (x A^T) B^T. `weight` (and `bias`) as
    nn.Linear's; lora_a (rank, in), lora_b (out, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 bias: bool = False, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._add_adapters(rank, alpha)

    def _add_adapters(self, rank: int, alpha: float) -> None:
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        like = dict(device=self.weight.device, dtype=self.weight.dtype)
        make = torch.empty if self.weight.is_meta else torch.zeros  # defined until init_lora
        self.lora_a = nn.Parameter(make(rank, self.in_features, **like))  # (r, in)
        self.lora_b = nn.Parameter(make(self.out_features, rank, **like))  # (out, r)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float) -> LoRALinear:
        """An adapted `linear` holding its very Parameter objects (weight, bias): no copy, and
        on the meta device nothing allocated."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features = linear.in_features, linear.out_features
        new.weight = linear.weight
        new.register_parameter("bias", linear.bias)  # a Parameter or None, as nn.Linear registers it
        new._add_adapters(rank, alpha)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out)
        base = F.linear(x, self.weight, self.bias)  # (..., out)
        down = F.linear(x, self.lora_a)  # (..., r)
        return base + self.scale * F.linear(down, self.lora_b)  # (..., out)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha}"


def _blocks(model: nn.Module):
    """The model's blocks, under an activation checkpointing wrapper or not."""
    for block in model.layers:
        yield getattr(block, "_checkpoint_wrapped_module", block)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> None:
    """In place, before parallelize: every targeted nn.Linear of each block's Attention and
    dense FeedForward becomes a LoRALinear holding the same weight Parameter; every other
    parameter (value tables, memory layers, embeddings, norms, the adapted weights) gets
    requires_grad=False. ConfigError (naming the key) for bad settings or a model already
    adapted."""
    validate_lora(cfg)
    for block in _blocks(model):
        for module, names in ((block.attention, ATTENTION_TARGETS), (block.feed_forward, FFN_TARGETS)):
            if not isinstance(module, Attention | FeedForward):  # a memory layer: no adapters
                continue
            for name in names:
                if name not in cfg.targets:
                    continue
                linear = getattr(module, name)
                if isinstance(linear, LoRALinear):
                    raise ConfigError("finetune.lora: the model has adapters already (apply_lora twice?)")
                setattr(module, name, LoRALinear.from_linear(linear, cfg.rank, cfg.alpha))
    trainable = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)


def lora_modules(model: nn.Module) -> list[LoRALinear]:
    """The adapted linears, in the model's module order (blocks in order; wq wk wv wo, then
    w1 w3 w2 as FeedForward declares them)."""
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model) for p in (m.lora_a, m.lora_b)]


@torch.no_grad()
def init_lora(model: nn.Module, seed: int) -> None:
    """After model.init_weights(seed): lora_a ~ U(-1/sqrt(in), 1/sqrt(in)) (kaiming-uniform
    with a = sqrt(5), as nn.Linear and PEFT), drawn by ParamInit(seed + LORA_SEED_OFFSET) in
    module order: the same values whole or sharded; lora_b = 0, so the adapted model
    computes the base model's function exactly."""
    init = ParamInit(seed + LORA_SEED_OFFSET)
    for m in lora_modules(model):
        bound = 1.0 / math.sqrt(m.in_features)
        init.uniform_(m.lora_a, -bound, bound)
        init.constant_(m.lora_b, 0.0)


def lora_prefixes(names) -> list[str]:
    """The adapted linears' prefixes ("layers.0.attention.wq") among state-dict names."""
    return [n.removesuffix(".lora_a") for n in names if n.endswith(".lora_a")]


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """weight + scale * lora_b @ lora_a, computed in fp32, in weight's dtype. Also for a row
    block: weight[r0:r1] with lora_b[r0:r1] (lora_a whole)."""
    # weight: (out, in); lora_b: (out, r); lora_a: (r, in)
    delta = lora_b.float() @ lora_a.float()  # (out, in)
    return (weight.float() + scale * delta).to(weight.dtype)


def merge_lora(state_dict: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A plain model's state dict from an adapted one's: each `<p>.weight` with `<p>.lora_a`
    and `<p>.lora_b` beside it becomes weight + scale * lora_b @ lora_a, and the lora tensors
    are left out. Other tensors are the same objects (not copied); `state_dict` is unchanged.
    ValueError for an adapter without its weight or partner."""
    out = {}
    prefixes = set(lora_prefixes(state_dict))
    for p in prefixes:
        missing = [f"{p}.{n}" for n in ("weight", "lora_b") if f"{p}.{n}" not in state_dict]
        if missing:
            raise ValueError(f"merge_lora: {missing[0]} missing (beside {p}.lora_a)")
    orphans = [n for n in state_dict if n.endswith(".lora_b") and n.removesuffix(".lora_b") not in prefixes]
    if orphans:
        raise ValueError(f"merge_lora: {orphans[0]} without its lora_a")
    for name, t in state_dict.items():
        prefix, _, leaf = name.rpartition(".")
        if prefix in prefixes:
            if leaf in LORA_PARAMS:
                continue
            if leaf == "weight":
                t = merged_weight(t, state_dict[f"{prefix}.lora_a"], state_dict[f"{prefix}.lora_b"], scale)
        out[name] = t
    return out
