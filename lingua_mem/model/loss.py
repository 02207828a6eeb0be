"""The next-token loss of a batch: the training step's (mean) and validation's (sum).

The loss is computed from the final hidden states and the output weight a chunk of tokens at
a time (linear_cross_entropy), never as whole (B, T, vocab) logits: at an 8B model's 128k
vocabulary and 8k tokens a GPU, the logits, their fp32 copy and log-softmax would be about
10 GiB. With gradients needed, each chunk's gradients (the hidden states', the weight's) are
made in the forward and the chunk's logits dropped; the backward only scales them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100  # a target that is not scored
_CHUNK_ELEMENTS = 1 << 25  # logits a chunk: 32M (128 MiB in fp32), whatever the vocabulary


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    # logits (B, T, V), targets (B, T) -> the loss over tokens (mean or sum), in fp32; a target
    # of -100 is not scored
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction=reduction)


def _chunks(n: int, vocab: int) -> list[slice]:
    rows = max(1, _CHUNK_ELEMENTS // vocab)
    return [slice(i, min(i + rows, n)) for i in range(0, n, rows)]


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor):
    """One chunk: h (c, D), weight (V, D), targets (c,) -> (summed loss fp32, logits fp32 (c, V),
    the scored tokens (c,) bool, their targets with unscored ones at 0)."""
    logits = F.linear(h, weight).float()  # (c, V): in h's dtype, as the model's output layer
    scored = targets != IGNORE
    safe = targets.masked_fill(~scored, 0)
    lse = torch.logsumexp(logits, dim=-1)  # (c,)
    picked = logits.gather(1, safe[:, None]).squeeze(1)
    return ((lse - picked) * scored).sum(), logits, lse, scored, safe


class _LinearCrossEntropy(torch.autograd.Function):
    """(h (N, D), weight (V, D), targets (N,)) -> the summed loss, with both gradients made
    chunk by chunk in the forward (fp32 logits of one chunk at a time)."""

    @staticmethod
    def forward(ctx, h, weight, targets):
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for rows in _chunks(h.shape[0], weight.shape[0]):
            loss, logits, lse, scored, safe = _chunk_loss(h[rows], weight, targets[rows])
            total += loss
            # d loss / d logits = softmax - onehot(target), on scored tokens only   (c, V)
            grad = torch.exp(logits.sub_(lse[:, None]))
            grad[torch.arange(grad.shape[0], device=grad.device), safe] -= 1.0
            grad.mul_(scored[:, None])
            grad = grad.to(h.dtype)  # as autograd casts it back through the model's .float()
            grad_h[rows] = grad @ weight
            grad_w += grad.t() @ h[rows]  # (V, D), summed over the chunks in fp32
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_total.to(grad_h.dtype), grad_w * grad_total.to(grad_w.dtype), None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         reduction: str = "mean") -> torch.Tensor:
    """The loss of the logits F.linear(h, weight) (h (B, T, D), weight (V, D)) against targets
    (B, T), mean over the scored tokens or sum, in fp32: equal to cross_entropy on the whole
    logits, without them."""
    h, targets = h.flatten(0, 1), targets.flatten()
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        total = _LinearCrossEntropy.apply(h, weight, targets)
    else:
        chunks = _chunks(h.shape[0], weight.shape[0])
        total = sum(_chunk_loss(h[rows], weight, targets[rows])[0] for rows in chunks)
    if reduction == "sum":
        return total
    return total / (targets != IGNORE).sum()


def forward_loss(model, batch: dict, reduction: str = "mean") -> torch.Tensor:
    """The next-token loss of {"inputs", "targets"[, "doc_ids"]} (B, T) on the model's device.
    doc_ids confine attention to each document when the model's attention is doc_causal."""
    return model(batch["inputs"], doc_ids=batch.get("doc_ids"), targets=batch["targets"], reduction=reduction)
