"""Step time and per-rank value-table bytes for memory_parallel_size 1, 2, 4 at a fixed global batch.

    python benchmarks/memory_parallel.py [--world 4] [--steps 6] [--n-keys 256] [--json rows.json]

Spawns `world` CPU processes (gloo) per setting; each trains the debug model's
shape (configs/debug.yaml, with --n-keys) on its share of a fixed global batch:
dense parameters FSDP2-sharded over all ranks, value tables split by columns
over groups of mp ranks and by rows over the rest. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lingua_mem.config import DistributedConfig, load_config, model_args  # noqa: E402
from lingua_mem.model.llama import build_model  # noqa: E402
from lingua_mem.optim import build_optimizer, split_params  # noqa: E402
from lingua_mem.parallel import init_distributed, parallelize  # noqa: E402
from lingua_mem.train.step import train_step  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, world, port, mp_size, args, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    cfg = load_config([f"config={ROOT / 'configs/debug.yaml'}", f"memory.n_keys={args.n_keys}",
                       f"distributed.memory_parallel_size={mp_size}"])
    dcfg = DistributedConfig(memory_parallel_size=mp_size)
    meshes = init_distributed(dcfg, "cpu")
    torch.manual_seed(0)
    model = parallelize(build_model(model_args(cfg.model, cfg.memory)), meshes, dcfg)
    opt = build_optimizer(model, cfg.optim)
    dense, values = split_params(model)
    per_rank = args.global_batch // world
    gen = torch.Generator().manual_seed(rank)
    times = []
    for _ in range(args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (per_rank, args.seq + 1), generator=gen)
        dist.barrier()
        t0 = time.perf_counter()
        train_step(model, opt, [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}], cfg.optim,
                   dense, values)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    local = sum((t.weight.to_local() if hasattr(t.weight, "to_local") else t.weight).numel()
                * t.weight.element_size() for t in model.values.values())
    if rank == 0:
        full = cfg.memory.n_keys**2 * cfg.model.dim * 4
        out.put({"mp": mp_size, "world": world, "step_ms": statistics.median(times[1:]) * 1e3,
                 "value_bytes_per_rank": local, "value_bytes_full": full, "fraction": local / full,
                 "tokens_per_s": args.global_batch * args.seq / statistics.median(times[1:])})
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--n-keys", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for mp_size in (1, 2, 4):
        if args.world % mp_size:
            continue
        ctx = mp.get_context("spawn")
        out = ctx.Queue()
        mp.start_processes(worker, args=(args.world, free_port(), mp_size, args, out), nprocs=args.world,
                           start_method="spawn", join=True)
        rows.append(out.get(timeout=10))
        print(f"mp={mp_size}: {rows[-1]['step_ms']:.0f} ms/step", file=sys.stderr)
    print(f"world {args.world} (CPU, gloo, 1 thread per rank), global batch {args.global_batch} x "
          f"{args.seq}, debug model with n_keys {args.n_keys}\n")
    print("| mp | step ms | tokens/s | value bytes per rank | fraction of the table |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mp']} | {r['step_ms']:.0f} | {r['tokens_per_s']:,.0f} | "
              f"{r['value_bytes_per_rank']:,} | {r['fraction']:.4f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
