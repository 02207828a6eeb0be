"""The next-token loss of a batch: the training step's (mean) and validation's (sum)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # logits (B, T, V), targets (B, T) -> the loss over tokens (mean or sum), in fp32; a target
    # of -100 is not scored
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def forward_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The next-token loss of {"inputs", "targets"[, "doc_ids"]} (B, T) on the model's device.
    doc_ids confine attention to each document when the model's attention is doc_causal."""
    return cross_entropy(model(batch["inputs"], doc_ids=batch.get("doc_ids")), batch["targets"], reduction)
