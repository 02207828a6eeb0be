"""Embedding-bag bandwidth: the PyTorch path against the Triton kernels, side by side in one run,
as a fraction of the device-to-device copy bandwidth measured in the same run.

    python benchmarks/embedding_bag.py [--shapes 134m,373m,1.3b,16m] [--tokens 32768] [--bag 128]
        [--device cuda] [--dtype fp32|bf16] [--json rows.json]

Shapes (rows x D of the value table): 134m 1M x 768, 373m 1M x 1024, 1.3b 1M x 2048 (the
configs' tables), 16m 16M x 1024 (64 GB in fp32, as much again for its gradient: an
H200, or --dtype bf16). Each bag reads --bag rows (heads x knn = 128 in the
configs) drawn uniformly; --tokens bags (8 x 4096 by default). Timed: forward, backward of a
plain table (the table gradient by atomics, and the weight gradient), backward of a routed
table's rows (a program per segment of one row's reads, fused with the weight gradient, into
an fp32 row gradient; its reads sorted and cut by memory_parallel.distinct_rows, timed too),
forward + backward. GB/s counts the bytes the operation must move at least: forward reads
tokens x bag rows of D and writes tokens x D; backward reads the output gradient and the rows
again (weight gradient) and writes the table gradient's touched rows. Targets on an H100 (issue 14):
forward >= 0.90 of copy bandwidth; forward + backward >= 8x the PyTorch path.

On the CPU the Triton kernels run only in Triton's interpreter (TRITON_INTERPRET=1): use
tiny --tokens there, as a smoke check; the figures mean nothing. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lingua_mem.kernels import embedding_bag_torch  # noqa: E402

SHAPES = {"134m": (1 << 20, 768), "373m": (1 << 20, 1024), "1.3b": (1 << 20, 2048), "16m": (1 << 24, 1024)}


def timed(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def copy_bandwidth(device: str, nbytes: int, repeats: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timed(lambda: dst.copy_(src), device, repeats) / 1e9


def measure(name: str, rows: int, d: int, a, dtype, copy_gbs: float) -> dict:
    """One shape's timings and bandwidths."""
    from lingua_mem.kernels.embedding_bag import bag_rows_backward
    from lingua_mem.kernels.triton_bag import embedding_bag_triton, embedding_bag_triton_backward
    from lingua_mem.parallel.memory_parallel import distinct_rows

    elem = torch.finfo(dtype).bits // 8
    g = torch.Generator(device=a.device).manual_seed(0)
    table = torch.randn(rows, d, device=a.device, generator=g).to(dtype)
    indices = torch.randint(0, rows, (a.tokens, a.bag), device=a.device, generator=g)
    weights = torch.rand(a.tokens, a.bag, device=a.device, generator=g)
    grad_out = torch.randn(a.tokens, d, device=a.device, generator=g).to(dtype)
    touched = indices.unique().numel()
    fwd_bytes = a.tokens * a.bag * d * elem + a.tokens * d * elem + indices.numel() * 12
    bwd_bytes = fwd_bytes + touched * d * 4  # the rows again (weight gradient), the fp32 gradient rows

    w, t = weights.detach().requires_grad_(), table.detach().requires_grad_()  # no copy of the table

    def torch_fwd_bwd():
        w.grad = t.grad = None
        embedding_bag_torch(indices, w, t).backward(grad_out)

    ms = {
        "torch fwd": timed(lambda: embedding_bag_torch(indices, weights, table), a.device, a.repeats),
        "torch fwd+bwd": timed(torch_fwd_bwd, a.device, a.repeats),
        "triton fwd": timed(lambda: embedding_bag_triton(indices, weights, table), a.device, a.repeats),
    }
    ms["triton bwd atomic"] = timed(lambda: embedding_bag_triton_backward(grad_out, indices, weights, table),
                                    a.device, a.repeats)
    plan = distinct_rows(indices, rows, segmented=True)
    slot_of_row = torch.arange(rows, dtype=torch.int32, device=a.device)
    grad_rows = torch.zeros(rows, d, device=a.device)
    ms["triton rows plan"] = timed(lambda: distinct_rows(indices, rows, segmented=True), a.device, a.repeats)
    rows_bwd = lambda: bag_rows_backward(grad_out, indices, weights, table, *plan, slot_of_row,  # noqa: E731
                                         grad_rows, 1.0, "triton")
    ms["triton bwd rows"] = timed(rows_bwd, a.device, a.repeats)
    ms["triton fwd+bwd"] = ms["triton fwd"] + min(ms["triton bwd atomic"],
                                                  ms["triton bwd rows"] + ms["triton rows plan"])
    return {"shape": name, "rows": rows, "d": d, "device": a.device, "dtype": a.dtype, "tokens": a.tokens,
            "bag": a.bag, "copy_gbs": copy_gbs, "ms": {k: v * 1e3 for k, v in ms.items()},
            "fwd_gbs": {k: fwd_bytes / ms[f"{k} fwd"] / 1e9 for k in ("torch", "triton")},
            "fwd_of_copy": fwd_bytes / ms["triton fwd"] / 1e9 / copy_gbs,
            "fwd_bwd_speedup": ms["torch fwd+bwd"] / ms["triton fwd+bwd"],
            "bwd_gbs": {v: bwd_bytes / ms[f"triton bwd {v}"] / 1e9 for v in ("atomic", "rows")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="134m,373m,1.3b,16m")
    parser.add_argument("--tokens", type=int, default=8 * 4096)
    parser.add_argument("--bag", type=int, default=128)
    parser.add_argument("--rows", type=int, default=0, help="override the table rows (0: the shape's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json")
    a = parser.parse_args()
    dtype = torch.float32 if a.dtype == "fp32" else torch.bfloat16
    copy_gbs = copy_bandwidth(a.device, 1 << 28 if a.device == "cuda" else 1 << 24, a.repeats)
    gpu = torch.cuda.get_device_name() if a.device == "cuda" else ""
    print(f"{a.device} {gpu} copy {copy_gbs:,.0f} GB/s; {a.tokens} bags of {a.bag} rows, {a.dtype} table",
          flush=True)
    rows_out = []
    for name in a.shapes.split(","):
        rows, d = SHAPES[name]
        row = measure(name, a.rows or rows, d, a, dtype, copy_gbs)
        rows_out.append(row)
        print(f"{name:>5} {row['rows']:>9,} x {d:<5} fwd torch {row['fwd_gbs']['torch']:8.1f} GB/s, triton "
              f"{row['fwd_gbs']['triton']:8.1f} GB/s ({row['fwd_of_copy']:.2f} of copy); bwd atomic "
              f"{row['ms']['triton bwd atomic']:.2f} ms, rows {row['ms']['triton bwd rows']:.2f} ms "
              f"(+ plan {row['ms']['triton rows plan']:.2f} ms); "
              f"fwd+bwd {row['fwd_bwd_speedup']:.1f}x torch", flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows_out, indent=2))


if __name__ == "__main__":
    main()
