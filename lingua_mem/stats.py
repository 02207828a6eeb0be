"""Parameter and FLOP accounting of a model config, on the meta device.

    python -m lingua_mem.stats config=configs/memory_373m.yaml [key=value ...]

prints one JSON line. Training FLOPs per token count every weight a token is multiplied by at
6x (forward 2, backward 4) and attention scores and values at 12 * layers * dim * seq_len
(the usual convention, as in PaLM and Meta Lingua). Sparse parameters (those a token reads
only a part of) count what a token reads, by family (sparse_reads), NOT 6x the whole table:
    memory (pkm)  heads * knn value rows of v_dim a layer
    peer          heads * knn experts: a value row and a row of u (dim each)
    ultramem      heads * knn value rows of v_dim, once per projector (value_expansion bags)
    moe           top_k experts' three SwiGLU matrices
"""

from __future__ import annotations

import json
import sys

import torch.nn as nn

from lingua_mem.cli import reports
from lingua_mem.config import TrainConfig, load_config, model_args
from lingua_mem.errors import ConfigError
from lingua_mem.memory import ProductKeyMemory
from lingua_mem.memory.peer import PEER
from lingua_mem.memory.ultramem import UltraMem
from lingua_mem.model.llama import Transformer, build_model
from lingua_mem.model.moe import MoEFeedForward


def sparse_reads(ffn: nn.Module) -> tuple[int, int]:
    """(sparse parameters the FFN slot owns, sparse elements a token reads) of one block's FFN;
    a memory layer's value table is the Transformer's, counted apart (its reads are here)."""
    if isinstance(ffn, PEER):
        picked = ffn.heads * ffn.knn
        return ffn.down.numel(), picked * (ffn.v_dim + ffn.dim)  # v_i bagged, u_i . x
    if isinstance(ffn, UltraMem):
        return 0, ffn.heads * ffn.knn * ffn.v_dim * ffn.expansion
    if isinstance(ffn, ProductKeyMemory):
        return 0, ffn.heads * ffn.knn * ffn.v_dim
    if isinstance(ffn, MoEFeedForward):
        experts = ffn.w1.numel() + ffn.w2.numel() + ffn.w3.numel()
        return experts, experts // ffn.n_experts * ffn.top_k
    return 0, 0


def model_stats(model: Transformer, seq_len: int) -> dict:
    args = model.args
    n_params = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total = n_params(model)
    values = sum(n_params(t) for t in model.value_tables())
    owned, read = zip(*(sparse_reads(b.feed_forward) for b in model.layers), strict=True)
    sparse = values + sum(owned)
    # weights every token is multiplied by: every Linear (a router's included), the memory
    # sub-keys (scored against every query; ultramem's by `rank` queries a half), ultramem's
    # projectors, and the output head (the tied embedding when there is no separate head)
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    memories = [m for m in model.modules() if isinstance(m, ProductKeyMemory)]
    matmul += sum(m.keys.numel() * (m.rank if isinstance(m, UltraMem) else 1) for m in memories)
    matmul += sum(m.projectors.numel() for m in memories if isinstance(m, UltraMem))
    if model.output is None:
        matmul += model.tok_embeddings.weight.numel()
    flops = 6 * matmul + 12 * args.n_layers * args.dim * seq_len + 6 * sum(read)
    return {
        "total_params": total,
        "memory_value_params": values,
        "sparse_params": sparse,  # value tables, PEER's u, MoE experts
        "dense_params": total - sparse,
        "active_params_per_token": total - sparse + sum(read),
        "flops_per_token": flops,
        "memory_layers": sorted(model.value_key),
        "moe_layers": sorted(args.moe.layers),
        "n_values": args.memory.n_values if memories else 0,  # rows per table
        "seq_len": seq_len,
    }


def config_stats(cfg: TrainConfig) -> dict:
    args = model_args(cfg.model, cfg.memory, cfg.moe)
    return model_stats(build_model(args, device="meta"), cfg.data.seq_len)


# bytes a value of a table holds on its rank beyond its fp32 weight, by optim.value_optimizer:
# AdamW's two moments (and, over every row, a dense fp32 gradient); Adagrad's and SGD's are
# per row or nothing
_VALUE_STATE_BYTES = {"adamw": 12, "lazy_adamw": 8, "adagrad": 0, "sgd": 0}


def table_bytes_per_rank(cfg: TrainConfig, world: int) -> int:
    """The bytes the value tables take on each of `world` ranks (they are sharded over all of
    them): fp32 weights, the value optimizer's state, and a bf16 copy where values compute in
    bf16 (parallel/memory_parallel.py). Dense layers and activations not included."""
    from lingua_mem.parallel.parallelize import value_dtype

    args = model_args(cfg.model, cfg.memory, cfg.moe)
    mem = args.memory
    if not mem.layers or mem.kind not in ("pkm", "ultramem", "peer"):
        return 0
    tables = 1 if mem.shared_values else len(mem.layers)
    per_value = 4 + _VALUE_STATE_BYTES.get(cfg.optim.value_optimizer, 12)
    per_value += 2 if value_dtype(cfg.memory.value_compute_dtype, cfg.distributed) == "bf16" else 0
    return tables * mem.n_values * mem.v_dim * per_value // max(world, 1)


@reports(ConfigError)
def main(argv: list[str]) -> int:
    print(json.dumps(config_stats(load_config(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
