"""How often each value row is read: the hooks that count it (RowReads), the counts summed
over processes (count_usage) and their file (save_usage / load_usage). The command that
writes a checkpoint's background usage is `python -m lingua_mem.eval.usage`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from lingua_mem.run_dir import written_atomically

FORMAT = "lingua_mem.memory_usage"


class RowReads:
    """Counts the value rows each memory layer reads, per value table, while `enabled`.

    Forward hooks on each memory layer's `reads` (its (indices, weights)); the counts are
    this process's own tokens' (int64 (n_values,) per table key, on the model's device). A
    forward recomputed in backward (activation checkpointing) is not counted again."""

    def __init__(self, model):
        self.value_key = dict(model.value_key)  # memory layer id -> its table's key
        self.memories = {b.layer_id: b.feed_forward for b in model.layers if b.layer_id in self.value_key}
        device = model.rope_cos.device
        keys = sorted(set(self.value_key.values()))
        self.n_values = {key: model.values[key].weight.shape[0] for key in keys}
        self.counts = {key: torch.zeros(n, dtype=torch.int64, device=device)
                       for key, n in self.n_values.items()}
        self.enabled = True
        self.handles = []

    def __enter__(self) -> RowReads:
        for layer, memory in self.memories.items():
            self.handles.append(memory.reads.register_forward_hook(self._hook(self.value_key[layer])))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, key: str):
        counts = self.counts[key]

        def hook(module, inputs, output):
            # -1: not inside a backward pass (a checkpointed block's recompute runs inside one)
            if not self.enabled or torch._C._current_graph_task_id() != -1:
                return
            indices = output[0]  # (N, heads * knn)
            counts.add_(torch.bincount(indices.flatten(), minlength=counts.numel()))
        return hook

    def take(self, reduce: bool = True) -> dict[str, torch.Tensor]:
        """The counts since the last take (summed over every process when `reduce`: a
        collective), and zero them."""
        out = {}
        for key, counts in self.counts.items():
            total = counts.clone()
            if reduce and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(total)
            counts.zero_()
            out[key] = total
        return out


@dataclass
class Usage:
    """Background read counts of each value table (see the module's docstring)."""

    reads: dict[str, torch.Tensor]  # key -> int64 (n_values,)
    batches: dict[str, torch.Tensor]  # key -> int64 (n_values,): batches reading the row
    n_batches: int
    tokens: int
    meta: dict


def save_usage(path: Path, usage: Usage) -> None:
    """Write atomically (a temporary file renamed into place)."""
    from safetensors.torch import save_file

    tensors = {}
    for key in usage.reads:
        tensors[f"{key}.reads"] = usage.reads[key].cpu().contiguous()
        tensors[f"{key}.batches"] = usage.batches[key].cpu().contiguous()
    meta = {**usage.meta, "format": FORMAT, "n_batches": str(usage.n_batches), "tokens": str(usage.tokens)}
    with written_atomically(path) as tmp:
        save_file(tensors, str(tmp), metadata={k: str(v) for k, v in meta.items()})


def load_usage(path: str | Path, n_values: dict[str, int], key: str = "finetune.background") -> Usage:
    """The counts of `path`, checked against a model's tables ({key: rows}); ConfigError
    (one line, naming `key`) for a file that is not usage counts or does not fit."""
    from safetensors import safe_open

    from lingua_mem.errors import ConfigError

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:
        raise ConfigError(f"{key}: {path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{key}: {path} is not memory usage counts (python -m lingua_mem.eval.usage)")
    theirs = {name.rsplit(".", 1)[0]: t.numel() for name, t in tensors.items() if name.endswith(".reads")}
    if theirs != n_values:
        raise ConfigError(f"{key}: {path} counts the rows of tables {theirs}, this model has {n_values}")
    return Usage({k: tensors[f"{k}.reads"] for k in n_values}, {k: tensors[f"{k}.batches"] for k in n_values},
                 int(meta["n_batches"]), int(meta["tokens"]), meta)


@torch.no_grad()
def count_usage(model, batches, n_batches: int, device, say=lambda msg: None) -> Usage:
    """Read `n_batches` of `batches` (an iterator of {"inputs", "targets", "doc_ids"} (B, T))
    through `model` and count its value rows' reads (over every process: a collective)."""
    with RowReads(model) as reads:
        n_rows = reads.n_values
        total_reads = {k: torch.zeros(n, dtype=torch.int64, device=device) for k, n in n_rows.items()}
        total_batches = {k: torch.zeros(n, dtype=torch.int64, device=device) for k, n in n_rows.items()}
        tokens, started = 0, time.perf_counter()
        for i in range(n_batches):
            batch = next(batches)
            inputs = batch["inputs"].to(device)
            model(inputs, doc_ids=batch["doc_ids"].to(device) if "doc_ids" in batch else None)
            for key, counts in reads.take(reduce=False).items():
                total_reads[key] += counts
                total_batches[key] += (counts > 0).long()
            tokens += inputs.numel()
            if (i + 1) % max(1, n_batches // 10) == 0 or i + 1 == n_batches:
                rate = tokens / (time.perf_counter() - started)
                eta = (n_batches - i - 1) * inputs.numel() / rate
                say(f"usage: batch {i + 1}/{n_batches}, {tokens:,} tokens, {rate:,.0f} tok/s, "
                    f"ETA {eta:.0f} s")
    _reshard(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        for t in [*total_reads.values(), *total_batches.values()]:
            dist.all_reduce(t)
    return Usage({k: v.cpu() for k, v in total_reads.items()}, {k: v.cpu() for k, v in total_batches.items()},
                 n_batches * world, tokens * world, {})


def _reshard(model) -> None:
    """Leave FSDP2 modules sharded, as they were before the forwards (a value table is kept
    gathered after its forward until a backward that no-grad counting never runs)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
