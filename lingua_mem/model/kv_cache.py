"""Attention keys and values kept between the forward calls of one generation.

A KVCache holds, for each attention layer, the (rotated) keys and values of B
sequences at slots 0..max_len-1; a forward call of T tokens writes slots
[length, length + T) and then attends over slots [0, length + T). Slots are
shared by the batch (prompts of different lengths are left-padded to one
length), so a slot is not a position: positions (for RoPE) are given apart, and
`valid` marks the slots that hold real tokens, the only keys anything attends to.
Memory layers need no cache: they read the memory per token.
"""

from __future__ import annotations

import torch


def attention_mask(valid: torch.Tensor, start: int, t: int) -> torch.Tensor:
    """(B, 1, T, start + T) bool: query slot start + i sees key slot j <= start + i that is
    valid. A padding query sees itself too (never an empty row: no NaN to spread)."""
    s = start + t
    q_slot = torch.arange(start, s, device=valid.device).view(t, 1)  # (T, 1)
    k_slot = torch.arange(s, device=valid.device).view(1, s)  # (1, S)
    causal = k_slot <= q_slot  # (T, S)
    mask = (causal & valid[:, None, :s]) | (k_slot == q_slot)  # (B, T, S)
    return mask.unsqueeze(1)


class KVCache:
    """Keys and values (B, kv_heads, max_len, head_dim) per layer, filled slot by slot."""

    def __init__(self, n_layers: int, batch: int, max_len: int, device: torch.device | str):
        self.n_layers, self.batch, self.max_len = n_layers, batch, max_len
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # slot holds a token
        self.length = 0  # slots written by completed forward calls
        self.mask: torch.Tensor | None = None  # the forward call in progress's (B, 1, T, length + T)

    def begin(self, valid: torch.Tensor) -> None:
        """Start a forward call of T tokens; valid: (B, T) bool, False for padding."""
        t = valid.shape[1]
        if self.length + t > self.max_len:
            raise ValueError(f"KV cache full: {self.length} + {t} tokens exceed max_len {self.max_len}")
        self.valid[:, self.length : self.length + t] = valid
        self.mask = attention_mask(self.valid, self.length, t)

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this call's k, v (B, KV, T, hd) of `layer`; returns its keys and values so far."""
        if self.keys[layer] is None:
            shape = (self.batch, k.shape[1], self.max_len, k.shape[3])
            self.keys[layer] = k.new_zeros(shape)
            self.values[layer] = v.new_zeros(shape)
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def end(self, t: int) -> None:
        self.length += t
        self.mask = None
