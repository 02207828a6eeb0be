"""The scale plan (lingua_mem.plan): its per-rank figures against real gloo processes, the
shipped 8b config at its documented layout, and the launcher's refusal of a job that cannot fit."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_parallel import free_port
from torch.distributed.tensor import DTensor

from lingua_mem.config import load_config, model_args
from lingua_mem.model.llama import build_model
from lingua_mem.optim import build_optimizer, split_params
from lingua_mem.parallel import init_distributed, parallelize
from lingua_mem.plan.estimate import make_plan
from lingua_mem.plan.fake_step import measure_step
from lingua_mem.plan.hardware import GiB
from lingua_mem.stats import config_stats
from lingua_mem.train.step import train_step

ROOT = Path(__file__).resolve().parents[1]
# three memory layers sharing one table (as every shipped memory config), v_dim divisible by 4
TINY = ["config=configs/debug.yaml", "model.dim=64", "model.n_layers=3", "model.n_heads=4",
        "memory.layers=[0,1,2]", "memory.n_keys=16", "memory.k_dim=32", "memory.heads=2", "memory.knn=4",
        "data.batch_size=2", "data.seq_len=32", "model.max_seq_len=32"]


def _by_dtype(tensors) -> dict:
    out = {}
    for t in tensors:
        t = t.to_local() if isinstance(t, DTensor) else t
        key = str(t.dtype).removeprefix("torch.")
        out[key] = out.get(key, 0) + t.numel() * t.element_size()
    return out


def held_worker(rank, world, port, items, results):
    """A real run's rank: what it holds after one optimizer step (gradients: after the backward)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cfg = load_config(items)
    meshes = init_distributed(cfg.distributed, "cpu")
    model = build_model(model_args(cfg.model, cfg.memory, cfg.moe), "meta", kernel=cfg.memory.kernel)
    parallelize(model, meshes, cfg.distributed, cfg.memory.value_compute_dtype)
    model.to_empty(device="cpu")
    model.init_weights(cfg.seed)
    optimizer = build_optimizer(model, cfg.optim)
    dense, values = split_params(model)
    tokens = torch.randint(0, cfg.model.vocab_size, (cfg.data.batch_size, cfg.data.seq_len + 1))
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
    grads = {}

    def after_backward():
        grads.update(_by_dtype([p.grad for p in model.parameters() if p.grad is not None]))

    train_step(model, optimizer, [batch], cfg.optim, dense, values, after_backward=after_backward)
    table = model.values["shared"].weight
    local = table.to_local() if isinstance(table, DTensor) else table
    results.put((rank, {"params": _by_dtype(model.parameters()), "grads": grads,
                        "optimizer": _by_dtype(v for s in optimizer.state.values() for v in s.values()
                                               if torch.is_tensor(v)),
                        "shard": tuple(local.shape)}))
    dist.barrier()
    dist.destroy_process_group()


def run_real(world: int, items: list[str]) -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(held_worker, args=(world, free_port(), items, results), nprocs=world,
                               join=False, start_method="spawn")
    try:  # read before joining
        held = dict(results.get(timeout=120) for _ in range(world))
    finally:
        while not procs.join():
            pass
    return held


@pytest.mark.parametrize("world,layout", [
    (1, []),
    (2, ["distributed.memory_parallel_size=2"]),
    (4, ["distributed.memory_parallel_size=4"]),
    (4, ["distributed.memory_parallel_size=2", "distributed.dp_replicate=2"]),  # HSDP beside mp
])
def test_planned_states_are_what_real_processes_hold(world, layout):
    items = TINY + layout
    real = run_real(world, items)
    cfg = load_config(items)
    for rank in range(world):
        planned = measure_step(cfg, 1, world, rank)
        assert planned.params == real[rank]["params"], rank
        assert planned.grads == real[rank]["grads"], rank
        assert planned.optimizer == real[rank]["optimizer"], rank
        assert planned.value_shards["shared"][:2] == real[rank]["shard"], rank


def test_plan_accounts_for_checkpointing_and_memory_parallel_traffic():
    cfg = load_config(TINY + ["distributed.memory_parallel_size=2"])
    plans = {ac: make_plan(load_config(TINY + ["distributed.memory_parallel_size=2",
                                               f"distributed.activation_checkpointing={ac}"]), 1, 4)
             for ac in ("none", "selective", "full")}
    acts = {ac: p.step.activations for ac, p in plans.items()}
    assert acts["none"] > acts["selective"] > acts["full"] > 0, acts
    step = plans["none"].step
    assert step.peak >= sum(step.params.values()) + sum(step.optimizer.values())
    # memory parallelism: per memory layer, the group all-gathers indices (int64) and weights
    # (fp32) of its 2 ranks' tokens, and all-to-alls the bag output forward and its gradient back
    tokens, v_dim = cfg.data.batch_size * cfg.data.seq_len, cfg.model.dim
    m = cfg.memory.heads * cfg.memory.knn
    by_op = {(c.op, c.group): c for c in step.collectives}
    assert by_op[("all_gather", "mp")].bytes == 3 * 2 * tokens * m * (8 + 4)
    assert by_op[("all_to_all", "mp")].bytes == 3 * 2 * (2 * tokens * v_dim // 2 * 4)
    assert by_op[("all_gather", "mp")].spans_nodes is False
    # the table is never gathered: each read routes its reads to the rows' 2 owners over
    # mp_replicate (counts, rows, bag lengths, weights) and gets partial bags back, one per
    # token and owner; in backward the bags' gradients go out and the weights' come back
    assert ("all_gather", "mp_replicate") not in by_op
    reads, bags, cols = 2 * tokens * m, 2 * tokens * 2, v_dim // 2
    routed = by_op[("all_to_all", "mp_replicate")]
    assert routed.calls == 3 * 7
    assert routed.bytes == 3 * (2 * 2 * 8 + reads * (8 + 4 + 4) + bags * 8 + 2 * bags * cols * 4)
    planned = plans["none"].value_reads()  # what the plan prints: proportional to the reads, not the table
    assert planned == {"per_step": 3, "reads": reads, "rows": min(reads, cfg.memory.n_keys ** 2 // 2),
                       "bags": bags, "traffic": routed.bytes}
    stats = config_stats(cfg)
    assert step.flops >= 6 * stats["dense_params"] * tokens * 0.5  # matmuls at least (embedding aside)


def test_memory_8b_fits_the_papers_layout():
    """The paper's memory parallelism: memory_8b on 8 nodes x 8 H100, the table's columns over
    groups of 8 GPUs and its rows over the 8 groups (the config's own selective checkpointing).
    Before routed reads with partial bags, 184 GiB a GPU."""
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.plan", "config=configs/memory_8b.yaml",
                           "nodes=8", "gpus_per_node=8", "distributed.memory_parallel_size=8", "format=json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    plan = json.loads(proc.stdout)
    assert plan["fits"] and plan["peak"] < 79.2 * GiB * 0.9
    assert plan["value_shards"]["shared"] == {"rows": 4096**2 // 8, "columns": 4096 // 8, "dtype": "float32"}
    # each read: 8 x 2 x 4096 tokens x 128 reads, bagged by 8 owners of 2M rows each
    tokens = 8 * 2 * 4096
    reads = plan["value_reads"]
    assert (reads["reads"], reads["rows"], reads["bags"]) == (tokens * 128, 4096**2 // 8, tokens * 8)
    total = config_stats(load_config(["config=configs/memory_8b.yaml"]))["total_params"]
    held = plan["params"]["float32"]
    # 1/64 of the dense fp32 weights and 1/64 of the table, and more: FSDP2 shards dim 0, and rank
    # 0 holds one of the 4 head rows of each memory layer's sub-keys (4, 2, 4096, 1024)
    keys = 3 * 4 * 2 * 4096 * 1024
    assert held == pytest.approx((total - keys) * 4 / 64 + keys * 4 / 4, rel=1e-3)
    assert plan["optimizer"]["float32"] >= 2 * held  # AdamW: two moments (+ step counts)
    assert plan["tokens_per_s_per_gpu"] > 0 and plan["step_seconds"] >= plan["bound_seconds"]["compute"]


def test_bad_plan_input_is_one_line():
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.plan", "config=configs/debug.yaml", "gpu=v100"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: gpu: 'v100' is not one of h100, h200, a100"]


def test_launcher_refuses_a_job_that_cannot_fit(tmp_path):
    """81.7 GiB per GPU on an 80 GB H100 (a 3584-sequence micro-batch): refused in one line
    with the nearest layout that fits (checkpointing: 72.1 GiB selective, 64.1 full, at the edge
    of the budget); --force renders it anyway."""
    dump = tmp_path / "big"
    args = [sys.executable, "-m", "lingua_mem.launch", "config=configs/debug.yaml", "nodes=1",
            "gpus_per_node=8", "data.batch_size=3584", "partition=gpu", f"dump_dir={dump}", "--dry-run"]
    env = dict(os.environ, PATH=str(Path(sys.executable).parent))  # no sbatch needed
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: gpu: the plan's peak of "), proc.stderr
    assert "does not fit 71.3 GiB of the H100" in lines[0]
    assert re.search(r"nearest layout that fits: 1 x 8 H100 .*activation checkpointing (selective|full), "
                     r"micro-batch 3584 x 256", lines[0]), lines[0]
    assert proc.stdout == "" and not dump.exists()
    forced = subprocess.run(args + ["--force"], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert forced.returncode == 0 and "#SBATCH --nodes=1" in forced.stdout, forced.stderr
