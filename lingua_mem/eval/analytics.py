"""What the memory layers read, over the tokens of an evaluation (Lample et al. 2019 report
usage and KL; a collapsed memory reads a few rows for every token).

Per memory layer:
  usage           fraction of the value rows read at least once
  kl_uniform      KL(p || uniform) of p, the softmax weight each row received, normalised
                  (0: every row read alike; log(n_values): one row takes all)
  top1_weight     mean over tokens and heads of the largest of a head's knn weights
  weight_entropy  mean over tokens and heads of the entropy (nats) of a head's weights

    with MemoryReadStats(model) as reads:
        reads.count = mask  # (B*T,) bool: the tokens of the next forward to count
        model(tokens)
    reads.result()  # {"memory/layer1/usage": ..., ...}, summed over all ranks
"""

from __future__ import annotations

import torch

from lingua_mem.model.llama import Transformer
from lingua_mem.parallel.runtime import all_reduce


class MemoryReadStats:
    """Forward hooks on each memory layer's `reads` (its indices and weights); sums kept on
    the model's device in float64 until result()."""

    def __init__(self, model: Transformer):
        self.memories = {b.layer_id: b.feed_forward for b in model.layers if b.is_memory}
        device = model.rope_cos.device
        self.sums = {i: {"counts": torch.zeros(m.rows, dtype=torch.float64, device=device),
                         "mass": torch.zeros(m.rows, dtype=torch.float64, device=device),
                         "scalars": torch.zeros(3, dtype=torch.float64, device=device)}  # top1, entropy, n
                     for i, m in self.memories.items()}
        self.count: torch.Tensor | None = None  # (N,) bool mask of the next forward's tokens
        self.handles = []

    def __enter__(self) -> MemoryReadStats:
        for i, m in self.memories.items():
            self.handles.append(m.reads.register_forward_hook(self._hook(i, m.heads, m.knn)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, layer: int, heads: int, knn: int):
        sums = self.sums[layer]

        def hook(module, inputs, output):
            indices, weights = output  # (N, heads * knn) each
            if self.count is not None:
                keep = self.count.to(indices.device)
                indices, weights = indices[keep], weights[keep]
            weights = weights.detach().double()
            sums["counts"].index_add_(0, indices.flatten(), torch.ones_like(weights).flatten())
            sums["mass"].index_add_(0, indices.flatten(), weights.flatten())
            w = weights.view(-1, heads, knn)  # (N, heads, knn)
            entropy = -(w * w.clamp_min(1e-30).log()).sum()
            sums["scalars"] += torch.stack([w.amax(dim=-1).sum(), entropy,
                                            torch.tensor(float(w.shape[0] * heads), device=w.device,
                                                         dtype=torch.float64)])
        return hook

    def result(self) -> dict[str, float]:
        """The statistics per layer, over every rank's tokens (a collective when distributed)."""
        out = {}
        for layer, sums in self.sums.items():
            flat = torch.cat([sums["counts"], sums["mass"], sums["scalars"]])
            all_reduce(flat)
            n_values = sums["counts"].numel()
            counts, mass = flat[:n_values], flat[n_values : 2 * n_values]
            top1, entropy, n = flat[-3:].tolist()
            if n == 0:
                continue
            p = mass / mass.sum()
            nz = p[p > 0]
            kl = float((nz * (nz * n_values).log()).sum())
            out[f"memory/layer{layer}/usage"] = float((counts > 0).double().mean())
            out[f"memory/layer{layer}/kl_uniform"] = kl
            out[f"memory/layer{layer}/top1_weight"] = top1 / n
            out[f"memory/layer{layer}/weight_entropy"] = entropy / n
        return out
