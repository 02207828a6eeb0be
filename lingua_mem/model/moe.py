"""Token-choice top-k mixture of SwiGLU experts: the paper's MoE baseline in a block's FFN slot.

A router scores every token against the experts; each token goes to its top_k experts
(dropless: no capacity limit, no token dropped), whose outputs are summed, weighted by the
gate. Top-1 gates by the router's probability (Switch Transformer), top-k > 1 by the top-k
probabilities renormalised (Mixtral). Training adds Switch's load-balancing loss,
experts * sum_e f_e * P_e (f_e: the share of assignments routed to expert e, P_e: its mean
router probability), weighted by aux_loss_weight: 1.0 at perfect balance.

Plain PyTorch: each expert's tokens are gathered, run through its SwiGLU and scattered back
(a host sync for the token counts each call; not compilable as one graph).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from lingua_mem.param_init import ParamInit


class AuxLosses:
    """The auxiliary losses of one forward (the MoE layers' balancing terms), owned by the
    Transformer's forward, which adds them to the training loss. A plain object on purpose:
    FSDP2 rebuilds the lists, tuples and dicts among a block's arguments, not a plain object,
    so what a block appends here reaches the caller."""

    __slots__ = ("terms",)

    def __init__(self):
        self.terms: list[torch.Tensor] = []

    def total(self) -> torch.Tensor | None:
        return torch.stack(self.terms).sum() if self.terms else None


def balancing_loss(probs: torch.Tensor, load: torch.Tensor) -> torch.Tensor:
    """Switch's load-balancing loss: probs (N, E) the router's probabilities, load (E,) the
    assignments each expert got -> E * sum_e f_e * P_e (fp32 scalar; 1 when routing is uniform)."""
    share = load.float() / load.sum()  # f_e
    return probs.shape[-1] * (share * probs.float().mean(0)).sum()


class MoEFeedForward(nn.Module):
    """x (B, T, dim) -> (B, T, dim): each token through its top_k of `experts` SwiGLU experts
    w2_e(silu(w1_e x) * w3_e x), weighted by its gates."""

    def __init__(self, dim: int, hidden_dim: int, experts: int, top_k: int, aux_loss_weight: float):
        super().__init__()
        self.dim, self.hidden_dim, self.n_experts, self.top_k = dim, hidden_dim, experts, top_k
        self.aux_loss_weight = aux_loss_weight
        self.router = nn.Linear(dim, experts, bias=False)
        # the experts' weights stacked, one row per expert (as FeedForward's w1, w3, w2)
        self.w1 = nn.Parameter(torch.empty(experts, hidden_dim, dim))
        self.w3 = nn.Parameter(torch.empty(experts, hidden_dim, dim))
        self.w2 = nn.Parameter(torch.empty(experts, dim, hidden_dim))

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        init.trunc_normal_(self.router.weight, std=std)
        for w, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            init.trunc_normal_(w, std=s)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, dim) -> (probabilities (N, E) fp32, gates (N, k) fp32, experts (N, k))."""
        probs = self.router(x).float().softmax(dim=-1)  # (N, E)
        gates, experts = probs.topk(self.top_k, dim=-1)  # (N, k)
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, gates, experts

    def forward(self, x: torch.Tensor, aux: AuxLosses | None = None) -> torch.Tensor:
        shape = x.shape  # (B, T, dim)
        x = x.reshape(-1, self.dim)  # (N, dim)
        probs, gates, experts = self.route(x)
        flat = experts.flatten()  # (N*k,) assignment j: token j // k
        order = flat.argsort(stable=True)  # assignments grouped by expert
        token = order // self.top_k  # (N*k,) each grouped assignment's token
        load = torch.bincount(flat, minlength=self.n_experts)  # (E,) assignments an expert
        xs = x[token]  # (N*k, dim)
        outs = []
        for e, xe in enumerate(xs.split(load.tolist())):  # xe: (n_e, dim); tolist: a host sync
            outs.append(F.linear(F.silu(F.linear(xe, self.w1[e])) * F.linear(xe, self.w3[e]), self.w2[e]))
        ys = torch.cat(outs) * gates.flatten()[order, None].to(x.dtype)  # (N*k, dim)
        out = torch.zeros_like(x).index_add_(0, token, ys)  # (N, dim)
        if aux is not None and self.aux_loss_weight > 0:
            aux.terms.append(self.aux_loss_weight * balancing_loss(probs, load))
        return out.view(shape)
