"""Tensor names: lingua_mem's state dict <-> transformers' (Llama's, and the exported memory
model's, hf_remote/modeling_lingua_mem.py). One table, read both ways.

    layers.3.attention.wq.weight      <-> model.layers.3.self_attn.q_proj.weight
    layers.3.feed_forward.w1.weight   <-> model.layers.3.mlp.gate_proj.weight
    layers.1.feed_forward.keys        <-> model.layers.1.mlp.keys          (a memory layer)
    values.shared.weight              <-> model.values.shared.weight

The RoPE layouts agree (both rotate the two halves of each head), so no weight is permuted.
"""

from __future__ import annotations

import re

# (lingua_mem pattern, transformers pattern); {i} is a layer number
_TABLE = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.feed_forward.{rest}", "model.layers.{i}.mlp.{rest}"),  # a memory layer's own
    ("values.{rest}", "model.values.{rest}"),
]


def _regex(pattern: str) -> re.Pattern:
    parts = re.split(r"(\{i\}|\{rest\})", pattern)
    groups = {"{i}": r"(?P<i>\d+)", "{rest}": r"(?P<rest>.+)"}
    return re.compile("".join(groups.get(p, re.escape(p)) for p in parts) + r"\Z")


_FORWARD = [(_regex(ours), theirs) for ours, theirs in _TABLE]
_BACKWARD = [(_regex(theirs), ours) for ours, theirs in _TABLE]


def _map(name: str, table) -> str | None:
    for regex, target in table:
        m = regex.match(name)
        if m:
            return target.format(**m.groupdict())
    return None


def hf_name(name: str) -> str:
    """The transformers name of a lingua_mem state-dict entry."""
    new = _map(name, _FORWARD)
    if new is None:
        raise ValueError(f"{name}: no transformers name for this tensor")
    return new


def lingua_name(name: str) -> str | None:
    """The lingua_mem name of a transformers tensor; None for one lingua_mem has no use for
    (e.g. rotary_emb.inv_freq in older Llama exports)."""
    return _map(name, _BACKWARD)
