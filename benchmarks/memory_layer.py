"""Time one memory layer (ProductKeyMemory + its ValueTable) against one SwiGLU FFN.

    python benchmarks/memory_layer.py [--shapes debug,134m] [--tokens N] [--json rows.json]

Shapes come from the YAML configs (configs/debug.yaml, configs/memory_134m.yaml),
so the benchmark follows them. Each timed call is zero_grad(set_to_none) + forward +
backward of one layer on (1, tokens, dim) inputs, as in a training step: the
memory layer frees and allocates anew its dense value-table gradient every call.
Runs on CPU (fp32), and on CUDA (bf16 autocast) when there is one. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lingua_mem.config import load_config, model_args  # noqa: E402
from lingua_mem.memory import ProductKeyMemory, ValueTable  # noqa: E402
from lingua_mem.memory.layer import Bag  # noqa: E402
from lingua_mem.model.llama import FeedForward  # noqa: E402
from lingua_mem.param_init import ParamInit  # noqa: E402

SHAPES = {"debug": "configs/debug.yaml", "134m": "configs/memory_134m.yaml"}
DEFAULT_TOKENS = {"debug": 2048, "134m": 1024}


def build(name: str, device: str):
    """Modules of one shape, initialised, on `device`: (ffn, memory, values, shape dict)."""
    path = SHAPES.get(name, name)
    cfg = load_config([f"config={ROOT / path if not Path(path).is_absolute() else path}"])
    m = model_args(cfg.model, cfg.memory)
    mem = m.memory
    k_dim, v_dim = mem.k_dim, mem.v_dim
    ffn = FeedForward(m.dim, m.ffn_hidden_dim)
    ffn.init_weights(ParamInit(0), m.init_std, m.init_std)
    pkm = ProductKeyMemory(m.dim, mem.n_keys, mem.heads, mem.knn, k_dim, v_dim, swilu=mem.swilu,
                           qk_norm=mem.qk_norm, query_batchnorm=mem.query_batchnorm, norm_eps=m.norm_eps)
    pkm.init_weights(ParamInit(1), m.init_std)
    values = ValueTable(mem.n_values, v_dim)
    values.init_weights(ParamInit(2))
    shape = dict(dim=m.dim, ffn_hidden=m.ffn_hidden_dim, n_keys=mem.n_keys, n_values=mem.n_values,
                 heads=mem.heads, knn=mem.knn, k_dim=k_dim, v_dim=v_dim)
    return ffn.to(device), pkm.to(device), values.to(device), shape


def n_params(*modules: torch.nn.Module) -> int:
    return sum(p.numel() for mod in modules for p in mod.parameters())


def timeit(step, modules, device: str, repeats: int, warmup: int) -> float:
    """Median ms of zero_grad(set_to_none) + `step()` (a fwd+bwd), as in a training step."""
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for mod in modules:
            mod.zero_grad(set_to_none=True)  # frees last call's grads: the next backward allocates anew
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench(name: str, device: str, dtype: str, tokens: int, repeats: int, warmup: int) -> dict:
    torch.manual_seed(0)
    ffn, pkm, values, shape = build(name, device)
    dim, v_dim = shape["dim"], shape["v_dim"]
    autocast = (torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext())
    x = torch.randn(1, tokens, dim, device=device, requires_grad=True)  # (B, T, dim)
    grad_out = torch.randn(1, tokens, dim, device=device)  # d loss / d out

    def ffn_step():
        with autocast:
            out = ffn(x)  # (B, T, dim)
        out.backward(grad_out)

    def mem_step():
        with autocast:
            out = pkm(x, values)  # (B, T, dim)
        out.backward(grad_out)

    # the memory layer's parts: query + product top-k + softmax, then the value bag
    with torch.no_grad(), autocast:
        idx, w = pkm.lookup(x.view(tokens, dim))  # (N, heads * knn) each
    w = w.detach().requires_grad_(True)
    grad_w, grad_bag = torch.randn_like(w), torch.randn(tokens, v_dim, device=device)

    def lookup_step():
        with autocast:
            _, weights = pkm.lookup(x.view(tokens, dim))  # (N, heads * knn)
        weights.backward(grad_w)

    def bag_step():
        w.grad = None
        with autocast:
            bag = values(Bag(idx, w))  # (N, v_dim)
        bag.backward(grad_bag.to(bag.dtype))

    def vgrad_step():  # what backward pays for the dense value-table gradient alone
        torch.zeros_like(values.weight)  # (n_values, v_dim), freed at once

    steps = (("ffn", ffn_step), ("memory", mem_step), ("lookup", lookup_step), ("bag", bag_step),
             ("vgrad", vgrad_step))
    t = {k: timeit(fn, (ffn, pkm, values), device, repeats, warmup) for k, fn in steps}
    return dict(shape=name, device=device, dtype=dtype, tokens=tokens, **shape,
                **{f"{k}_ms": v for k, v in t.items()}, ratio=t["memory"] / t["ffn"],
                ffn_tok_s=tokens / t["ffn"] * 1e3, memory_tok_s=tokens / t["memory"] * 1e3,
                ffn_params=n_params(ffn), memory_params=n_params(pkm), value_params=n_params(values))


COLUMNS = (  # (header, row key, format)
    ("shape", "shape", "{}"), ("device", "device", "{}"), ("dtype", "dtype", "{}"),
    ("tokens", "tokens", "{}"),
    ("FFN ms", "ffn_ms", "{:.1f}"), ("memory ms", "memory_ms", "{:.1f}"), ("ratio", "ratio", "{:.2f}"),
    ("FFN tok/s", "ffn_tok_s", "{:,.0f}"), ("memory tok/s", "memory_tok_s", "{:,.0f}"),
    ("lookup ms", "lookup_ms", "{:.1f}"), ("bag ms", "bag_ms", "{:.1f}"), ("vgrad ms", "vgrad_ms", "{:.1f}"),
    ("FFN params", "ffn_params", "{:,}"), ("memory params", "memory_params", "{:,}"),
    ("value table params", "value_params", "{:,}"),
)


def table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(f.format(r[k]) for _, k, f in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="debug,134m", help="comma list of debug, 134m or YAML paths")
    p.add_argument("--tokens", type=int, default=None, help="tokens per call (default 2048 debug, 1024 134m)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: cpu, and cuda when available")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16"),
                   help="auto: fp32 on cpu, bf16 autocast on cuda")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args()

    devices = ["cpu", "cuda"] if args.device == "auto" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    rows = []
    for name in args.shapes.split(","):
        for device in devices:
            dtype = args.dtype if args.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
            tokens = args.tokens or DEFAULT_TOKENS.get(name, 1024)
            rows.append(bench(name, device, dtype, tokens, args.repeats, args.warmup))
            r = rows[-1]
            print(f"{name} {device} {dtype}: ffn {r['ffn_ms']:.1f} ms, memory {r['memory_ms']:.1f} ms "
                  f"(lookup {r['lookup_ms']:.1f}, bag {r['bag_ms']:.1f})", file=sys.stderr)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads. Median ms per call of "
          "zero_grad(set_to_none) + fwd + bwd of one layer (the memory layer frees and allocates its "
          "dense value-table gradient every call). lookup: query + product top-k + softmax; bag: value "
          "bag fwd + bwd; vgrad: allocating, zeroing and freeing a dense value-table gradient alone.\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
