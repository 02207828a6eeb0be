"""LinguaMemForCausalLM: a Llama decoder whose FFN at `config.memory_layers` is a product-key
memory (Memory+: gated, values shared by the memory layers unless memory_shared_values is
false). Written by lingua_mem's export-hf; needs torch and transformers only.

Inference and finetuning in plain PyTorch: SDPA attention with transformers' KV cache, exact
product-key top-k, the value bag through F.embedding_bag. The query BatchNorm, where the model
has one, uses its running statistics in eval mode, as lingua_mem evaluates.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_lingua_mem import LinguaMemConfig

# the output's cache field: "cache" since transformers 5.x renamed it, "past_key_values" before
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def rope(positions, head_dim, theta):
    """cos, sin (B, 1, T, head_dim) at positions (B, T): the half-split layout, angles in float64."""
    half = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)
    inv_freq = theta ** (-half / head_dim)  # (hd/2,)
    angles = positions.to(torch.float64)[..., None] * inv_freq  # (B, T, hd/2)
    angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (B, 1, T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x, cos, sin):
    x1, x2 = x.float().chunk(2, dim=-1)
    return (x.float() * cos + torch.cat([-x2, x1], dim=-1) * sin).type_as(x)


def product_topk(s1, s2, k):
    """Exact top-k of s1[i] + s2[j] over all pairs: (scores, i * n_keys + j), each (..., k)."""
    n_keys = s1.shape[-1]
    v1, i1 = s1.topk(k, dim=-1)
    v2, i2 = s2.topk(k, dim=-1)
    scores, best = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2).topk(k, dim=-1)
    return scores, i1.gather(-1, best // k) * n_keys + i2.gather(-1, best % k)


class LinguaMemAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, KV, S, hd)
        if self.kv_heads != self.n_heads:
            k, v = (z.repeat_interleave(self.n_heads // self.kv_heads, dim=1) for z in (k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class LinguaMemMLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x, values=None):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LinguaMemMemory(nn.Module):
    """x -> query -> product-key top-k per head -> softmax -> weighted bag of values ->
    (Memory+) out(bag * silu(gate x))."""

    def __init__(self, config):
        super().__init__()
        dim, self.heads, self.knn = config.hidden_size, config.memory_heads, config.memory_knn
        self.k_dim, self.half, v_dim = config.memory_k_dim, config.memory_k_dim // 2, config.memory_v_dim
        self.query = nn.Linear(dim, self.heads * self.k_dim, bias=True)
        self.query_bn = nn.BatchNorm1d(self.heads * self.k_dim) if config.memory_query_batchnorm else None
        self.keys = nn.Parameter(torch.empty(self.heads, 2, config.memory_n_keys, self.half))
        self.q_norm = nn.RMSNorm(self.half, eps=config.rms_norm_eps) if config.memory_qk_norm else None
        self.k_norm = nn.RMSNorm(self.half, eps=config.rms_norm_eps) if config.memory_qk_norm else None
        self.gate = nn.Linear(dim, v_dim, bias=True) if config.memory_swilu else None
        self.out = nn.Linear(v_dim, dim, bias=True) if (config.memory_swilu or v_dim != dim) else None

    def forward(self, x, values):
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, dim)
        n = x.shape[0]
        q = self.query(x)
        if self.query_bn is not None:
            q = self.query_bn(q)
        q = q.view(n, self.heads, 2, self.half)
        with torch.autocast(device_type=x.device.type, enabled=False):  # the key search in fp32
            dtype = torch.promote_types(self.keys.dtype, torch.float32)
            q, keys = q.to(dtype), self.keys.to(dtype)
            if self.q_norm is not None:
                q = F.rms_norm(q, (self.half,), self.q_norm.weight.to(dtype), self.q_norm.eps)
                keys = F.rms_norm(keys, (self.half,), self.k_norm.weight.to(dtype), self.k_norm.eps)
                q = q * self.half**-0.5
            s = torch.einsum("nhpd,hpkd->nhpk", q, keys)  # (N, heads, 2, n_keys)
            scores, indices = product_topk(s[:, :, 0], s[:, :, 1], self.knn)  # (N, heads, knn)
            weights = scores.softmax(dim=-1)
        table = values.weight
        out = F.embedding_bag(indices.view(n, -1), table, mode="sum",
                              per_sample_weights=weights.view(n, -1).to(table.dtype)).to(x.dtype)  # (N, v)
        if self.gate is not None:
            out = out * F.silu(self.gate(x))
        if self.out is not None:
            out = self.out(out)
        return out.view(shape)


class LinguaMemValues(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(config.memory_n_keys**2, config.memory_v_dim))


class LinguaMemDecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = LinguaMemAttention(config, layer_idx)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        memory = layer_idx in config.memory_layers
        self.mlp = LinguaMemMemory(config) if memory else LinguaMemMLP(config)

    def forward(self, h, cos, sin, mask, cache, values):
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h), values)


class LinguaMemPreTrainedModel(PreTrainedModel):
    config_class = LinguaMemConfig
    base_model_prefix = "model"
    _no_split_modules = ["LinguaMemDecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module):  # a fresh model (not from_pretrained): lingua_mem's init
        std = 0.02
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, LinguaMemValues):
            nn.init.normal_(module.weight, std=module.weight.shape[1] ** -0.5)
        elif isinstance(module, LinguaMemMemory):
            bound = 1 / math.sqrt(module.k_dim)
            nn.init.uniform_(module.keys, -bound, bound)
        elif isinstance(module, (nn.RMSNorm, nn.BatchNorm1d)):
            if module.weight is not None:
                nn.init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)


class LinguaMemModel(LinguaMemPreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(LinguaMemDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        keys = {i: "shared" if config.memory_shared_values else f"layer{i}" for i in config.memory_layers}
        self.value_key = keys
        self.values = nn.ModuleDict({k: LinguaMemValues(config) for k in sorted(set(keys.values()))})
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                use_cache=None, past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        b, t, _ = h.shape
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        past = cache.get_seq_length() if cache is not None else 0
        s = past + t
        valid = (torch.ones(b, s, dtype=torch.bool, device=h.device) if attention_mask is None
                 else attention_mask[:, -s:].to(torch.bool))  # (B, S): False is padding
        if position_ids is None:
            if attention_mask is None:
                position_ids = torch.arange(past, s, device=h.device).expand(b, t)
            else:  # positions count the real tokens: left padding starts each row at 0
                position_ids = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, -t:]
        q_slot = torch.arange(past, s, device=h.device).view(t, 1)
        k_slot = torch.arange(s, device=h.device).view(1, s)
        mask = (((k_slot <= q_slot) & valid[:, None, :]) | (k_slot == q_slot)).unsqueeze(1)  # (B, 1, T, S)
        cos, sin = rope(position_ids, self.config.head_dim, self.config.rope_theta)
        for i, layer in enumerate(self.layers):
            key = self.value_key.get(i)
            h = layer(h, cos, sin, mask, cache, self.values[key] if key else None)
        return self.norm(h), cache


class LinguaMemForCausalLM(LinguaMemPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config):
        super().__init__(config)
        self.model = LinguaMemModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, inputs_embeds=None,
                labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        h, cache = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              cache=cache if cache is not None else past_key_values,
                              inputs_embeds=inputs_embeds, use_cache=use_cache)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            h = h[:, -logits_to_keep:]
        logits = self.lm_head(h)  # (B, T, vocab)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: cache})
