"""Parameter and FLOP accounting of a model config, on the meta device.

    python -m lingua_mem.stats config=configs/memory_373m.yaml [key=value ...]

prints one JSON line. Training FLOPs per token count every matmul weight at 6x
(forward 2, backward 4), attention scores and values at 12 * layers * dim *
seq_len (the usual convention, as in PaLM and Meta Lingua), and each memory
lookup as what it really does: heads * knn rows of v_dim read, weighted and
back-propagated (6 FLOPs per element), NOT 6x the whole value table.
"""

from __future__ import annotations

import json
import sys

import torch.nn as nn

from lingua_mem.cli import reports
from lingua_mem.config import TrainConfig, load_config, model_args
from lingua_mem.errors import ConfigError
from lingua_mem.memory import ProductKeyMemory
from lingua_mem.model.llama import Transformer, build_model


def model_stats(model: Transformer, seq_len: int) -> dict:
    args = model.args
    n_params = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total = n_params(model)
    values = sum(n_params(t) for t in model.value_tables())
    # matmul weights: every Linear, the memory sub-keys (scored against every query),
    # and the output head (the tied embedding when there is no separate head)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    memories = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    matmul += sum(m.keys.numel() for m in memories)
    if model.output is None:
        matmul += model.tok_embeddings.weight.numel()
    rows_read = sum(m.heads * m.knn * m.v_dim for m in memories)  # value elements per token
    flops = 6 * matmul + 12 * args.n_layers * args.dim * seq_len + 6 * rows_read
    return {
        "total_params": total,
        "memory_value_params": values,
        "dense_params": total - values,
        "active_params_per_token": total - values + rows_read,
        "flops_per_token": flops,
        "memory_layers": sorted(model.value_key),
        "n_values": args.memory.n_values if memories else 0,  # rows per table
        "seq_len": seq_len,
    }


def config_stats(cfg: TrainConfig) -> dict:
    return model_stats(build_model(model_args(cfg.model, cfg.memory), device="meta"), cfg.data.seq_len)


@reports(ConfigError)
def main(argv: list[str]) -> int:
    print(json.dumps(config_stats(load_config(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
