"""Llama decoder whose FFN at chosen layers is a product-key memory.

Plain PyTorch: no process groups. Parameters are created uninitialised (build
on the meta device, then `to_empty`) and get their values from `init_weights`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingua_mem.config import MemoryConfig, ModelConfig
from lingua_mem.memory import ProductKeyMemory, ValueTable
from lingua_mem.param_init import ParamInit


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (max_seq_len, head_dim), the half-split ("rotate half") layout."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, hd); cos, sin: (T, hd)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE through scaled_dot_product_attention."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.wq = nn.Linear(cfg.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, cfg.dim, bias=False)

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        for lin, s in ((self.wq, std), (self.wk, std), (self.wv, std), (self.wo, out_std)):
            init.trunc_normal_(lin.weight, std=s)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        b, t, _ = x.shape  # (B, T, dim)
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=self.kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        for lin, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            init.trunc_normal_(lin.weight, std=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn_or_memory(norm(h))."""

    def __init__(self, layer_id: int, cfg: ModelConfig, mem: MemoryConfig):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if layer_id in mem.layers:
            self.feed_forward = ProductKeyMemory(
                cfg.dim, mem.n_keys, mem.heads, mem.knn, memory_k_dim(cfg, mem), memory_v_dim(cfg, mem),
                swilu=mem.swilu, qk_norm=mem.qk_norm, query_batchnorm=mem.query_batchnorm,
                norm_eps=cfg.norm_eps)
        else:
            self.feed_forward = FeedForward(cfg.dim, cfg.ffn_hidden_dim)

    @property
    def is_memory(self) -> bool:
        return isinstance(self.feed_forward, ProductKeyMemory)

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        init.constant_(self.attention_norm.weight, 1.0)
        init.constant_(self.ffn_norm.weight, 1.0)
        self.attention.init_weights(init, std, out_std)
        if self.is_memory:
            self.feed_forward.init_weights(init, out_std)
        else:
            self.feed_forward.init_weights(init, std, out_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                values: ValueTable | None = None) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope)
        if self.is_memory:
            return h + self.feed_forward(self.ffn_norm(h), values)
        return h + self.feed_forward(self.ffn_norm(h))


def memory_k_dim(cfg: ModelConfig, mem: MemoryConfig) -> int:
    return mem.k_dim if mem.k_dim is not None else cfg.dim // 2


def memory_v_dim(cfg: ModelConfig, mem: MemoryConfig) -> int:
    return mem.v_dim if mem.v_dim is not None else cfg.dim


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab).

    Owns the value tables in `values` (key "shared", or "layer<i>" per memory
    layer when not shared) and hands each memory block its table at call time.
    """

    def __init__(self, cfg: ModelConfig, mem: MemoryConfig):
        super().__init__()
        self.cfg, self.mem = cfg, mem
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(i, cfg, mem) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        v_dim = memory_v_dim(cfg, mem)
        if mem.layers and mem.shared_values:
            self.value_key = {i: "shared" for i in mem.layers}
        else:
            self.value_key = {i: f"layer{i}" for i in mem.layers}
        self.values = nn.ModuleDict({k: ValueTable(mem.n_values, v_dim)
                                     for k in sorted(set(self.value_key.values()))})
        self.register_buffer("rope_cos", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.max_seq_len, cfg.head_dim), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Give every parameter and buffer a defined value (after to_empty), a function
        of `seed` alone: the same whether the model is whole or sharded (param_init.py)."""
        init = ParamInit(seed)
        cos, sin = rope_tables(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)  # residual-stream writers
        init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            block.init_weights(init, std, out_std)
        init.constant_(self.norm.weight, 1.0)
        if self.output is not None:
            init.trunc_normal_(self.output.weight, std=std)
        for table in self.values.values():
            table.init_weights(init)

    def value_tables(self) -> list[ValueTable]:
        return list(self.values.values())

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        t = tokens.shape[1]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        rope = (self.rope_cos[:t], self.rope_sin[:t])
        for block in self.layers:
            key = self.value_key.get(block.layer_id)
            h = block(h, rope, self.values[key] if key else None)
        h = self.norm(h)
        if self.output is None:
            return F.linear(h, self.tok_embeddings.weight)  # (B, T, vocab)
        return self.output(h)


def build_model(cfg: ModelConfig, mem: MemoryConfig, device: torch.device | str = "cpu",
                init: bool = True, seed: int = 0) -> Transformer:
    """Build on the meta device, materialise on `device`, then init_weights(seed)."""
    with torch.device("meta"):
        model = Transformer(cfg, mem)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights(seed)
    return model
