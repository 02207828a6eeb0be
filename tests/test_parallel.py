"""Multi-process training on CPU (gloo) equals the single-process run on the same global batch.

The distributed model is built on meta, sharded, then initialised shard by shard
(as the trainer does), so these tests also check that sharded initialisation
gives the single-process weights; one layout parallelizes a materialised model."""

import copy
import importlib
import os
import socket
from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

from lingua_mem import param_init
from lingua_mem.config import (
    ConfigError,
    DistributedConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    model_args,
)
from lingua_mem.data.loader import document_ids
from lingua_mem.model.llama import build_model
from lingua_mem.optim import build_optimizer, split_params
from lingua_mem.parallel import init_distributed, parallelize, resolve_dims
from lingua_mem.parallel.parallelize import COMPILES_CHECKPOINTED_READS, apply_compile
from lingua_mem.train.step import train_step

MODEL = ModelConfig(dim=32, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=16)
MEMORY = MemoryConfig(layers=[0, 2], n_keys=8, heads=2, knn=4, k_dim=16)
OPTIM = OptimConfig(lr=1e-2, value_lr=3e-2, eps=1e-6, clip=0.5, value_clip=0.05, warmup=0)
STEPS, PER_RANK_BATCH, SEQ = 3, 2, 16


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def step(model, optimizer, tokens, micro=1, docs=False, optim=OPTIM) -> torch.Tensor:
    """The trainer's optimizer step on `tokens` (B, SEQ + 1), split into `micro` micro-batches;
    with `docs`, token 0 starts a document and attention stays within documents (doc_ids)."""
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens.chunk(micro)]
    if docs:
        for b in batches:
            b["doc_ids"] = document_ids(b["inputs"], 0)
    dense, values = split_params(model)
    return train_step(model, optimizer, batches, optim, dense, values).loss


def full_state(model) -> dict[str, torch.Tensor]:
    """Every parameter in full (DTensors gathered, memory-parallel columns included)."""
    out = {}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")  # activation checkpointing wrapper
        out[name] = p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
    return out


def worker(rank, world, port, layout, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    param_init._CHUNK_ELEMENTS = 96  # tensors drawn in many chunks, not aligned with the shards
    torch.manual_seed(0)
    batch = torch.randint(1, MODEL.vocab_size, (world * PER_RANK_BATCH, SEQ + 1))
    layout = dict(layout)
    docs = layout.pop("doc_ids", False)
    if docs:
        batch[:, 3::5] = 0  # documents of 5 tokens (doc_causal attention)
    tokens = [batch] * STEPS  # one batch, so the loss must fall
    reference = build_model(model_args(MODEL, MEMORY), seed=5)
    materialised = layout.pop("materialised", False)
    model = copy.deepcopy(reference) if materialised else build_model(model_args(MODEL, MEMORY), "meta")

    optim = replace(OPTIM, value_optimizer=layout.pop("value_optimizer", "adamw"))
    ref_opt = build_optimizer(reference, optim)
    ref_losses = [step(reference, ref_opt, t, docs=docs, optim=optim).item() for t in tokens]

    micro = layout.pop("grad_accum", 1)
    cfg = DistributedConfig(**layout)
    meshes = init_distributed(cfg, "cpu")
    parallelize(model, meshes, cfg)
    if not materialised:  # sharded on meta; each rank initialises its shards (as the trainer does)
        model.to_empty(device="cpu")
        model.init_weights(seed=5)
    opt = build_optimizer(model, optim)
    rows = slice(rank * PER_RANK_BATCH, (rank + 1) * PER_RANK_BATCH)
    losses = []
    for t in tokens:
        loss = step(model, opt, t[rows], micro, docs, optim)
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    if cfg.compile:  # every block one graph, memory blocks included (fullgraph would have raised)
        assert not torch._dynamo.utils.counters["graph_break"]
    got = full_state(model)
    want = dict(reference.named_parameters())
    # relative error of each parameter tensor, in norm
    param_err = max(((got[k] - want[k].detach()).norm() / want[k].detach().norm()).item() for k in want)
    local_values = sum(t.weight.to_local().numel() if hasattr(t.weight, "to_local") else t.weight.numel()
                       for t in model.values.values())
    if rank == 0:
        results.put((ref_losses, losses, param_err, local_values, sorted(got) == sorted(want)))
    dist.barrier()
    dist.destroy_process_group()


LAYOUTS = [
    (1, {}),  # one process: a world-1 group and FSDP2 at degree 1, as the trainer runs it
    (2, {"dp_replicate": 2, "dp_shard": 1}),
    (2, {"dp_shard": 2}),
    (2, {"memory_parallel_size": 2}),
    (4, {"dp_replicate": 2, "dp_shard": 2}),
    (4, {"dp_replicate": 2, "dp_shard": 2, "memory_parallel_size": 2}),
    (4, {"dp_shard": 4, "memory_parallel_size": 2}),
    (4, {"dp_replicate": 2, "dp_shard": 2, "memory_parallel_size": 2, "materialised": True}),
    (2, {"memory_parallel_size": 2, "activation_checkpointing": "full"}),
    (2, {"dp_shard": 2, "activation_checkpointing": "selective"}),
    (2, {"memory_parallel_size": 2, "compile": True}),
    (4, {"dp_shard": 4, "memory_parallel_size": 2, "value_reduce_dtype": "bf16"}),
    (2, {"dp_shard": 2, "activation_checkpointing": "full", "compile": True}),
    (2, {"dp_shard": 2, "activation_checkpointing": "selective", "compile": True}),
    (4, {"dp_replicate": 2, "dp_shard": 2, "memory_parallel_size": 2, "grad_accum": 2}),
    (4, {"dp_replicate": 2, "dp_shard": 2, "memory_parallel_size": 2, "doc_ids": True}),  # doc_causal
    # the row-sparse value optimizers (optim.value_optimizer), rows routed to their owners
    (2, {"memory_parallel_size": 2, "value_optimizer": "lazy_adamw"}),
    (4, {"dp_shard": 4, "memory_parallel_size": 2, "value_optimizer": "adagrad"}),
]


@pytest.mark.parametrize("world,layout", LAYOUTS, ids=[str(lay) for _, lay in LAYOUTS])
def test_parallel_training_equals_single_process(world, layout):
    if layout.get("compile") and layout.get("activation_checkpointing") and not COMPILES_CHECKPOINTED_READS:
        pytest.skip(f"torch {torch.__version__} cannot compile checkpointed blocks (refused: "
                    "test_compile_with_checkpointing_is_refused_where_torch_cannot)")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(worker, args=(world, free_port(), layout, results), nprocs=world,
                       start_method="spawn", join=True)
    ref_losses, losses, param_err, local_values, same_names = results.get(timeout=5)
    assert same_names
    assert ref_losses[-1] < ref_losses[0]  # it trained
    if layout.get("value_reduce_dtype") == "bf16":  # value gradients averaged in bf16: close, not equal
        assert losses == pytest.approx(ref_losses, rel=1e-3)
        # each rank's row gradients travel to their owners in bf16 (2^-9 relative), which this
        # tiny model, trained on one batch, carries into every weight; Adam turns the rounding
        # of a gradient near zero into a step of the whole lr (measured 0.03-0.07 over torch
        # 2.11 and 2.13)
        assert 1e-7 < param_err < 0.15
    else:
        assert losses == pytest.approx(ref_losses, rel=1e-5)
        # compiled kernels, and masked attention at another batch size, round differently from
        # the reference (~1e-7 per gradient), which Adam's normalised update magnifies
        assert param_err < (5e-5 if layout.get("compile") or layout.get("doc_ids") else 1e-5)
    n_values = MEMORY.n_keys**2 * MODEL.dim  # one shared table
    assert local_values == n_values // world  # 1/world of the table on each rank


def test_compile_with_checkpointing_is_refused_where_torch_cannot(monkeypatch):
    # the module, not the function the package exports under its name
    module = importlib.import_module("lingua_mem.parallel.parallelize")
    monkeypatch.setattr(module, "COMPILES_CHECKPOINTED_READS", False)  # as on torch 2.11
    model = build_model(model_args(MODEL, MEMORY), "meta")
    refusal = r"^distributed.compile with activation_checkpointing=selective needs torch>=2.13 \(this is "
    with pytest.raises(ConfigError, match=refusal + r".*; turn one of them off$"):
        apply_compile(model, "cpu", "selective")
    apply_compile(model, "cpu", "none")  # compile alone is fine on every supported torch


def bf16_worker(rank, world, port, results):
    """Three bf16 steps of the parallelized model (FSDP2's bf16 params, fp32 reduce) on one
    global batch of 4 sequences split over `world` ranks; rank 0 puts the mean losses."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.manual_seed(0)
    batch = torch.randint(0, MODEL.vocab_size, (4, SEQ + 1))
    cfg = DistributedConfig(compute_dtype="bf16", dp_shard=world)
    meshes = init_distributed(cfg, "cpu")
    model = parallelize(build_model(model_args(MODEL, MEMORY), "meta"), meshes, cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=5)
    opt = build_optimizer(model, OPTIM)
    rows = slice(rank * 4 // world, (rank + 1) * 4 // world)
    losses = []
    for _ in range(STEPS):
        loss = step(model, opt, batch[rows])
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    if rank == 0:
        results.put(losses)
    meshes.close()


def test_bf16_on_one_process_equals_two_processes():
    """One precision mechanism for every world size: the same bf16 losses on 1 and 2 ranks."""
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    losses = {}
    for world in (1, 2):
        mp.start_processes(bf16_worker, args=(world, free_port(), results), nprocs=world,
                           start_method="spawn", join=True)
        losses[world] = results.get(timeout=5)
    assert losses[2] == pytest.approx(losses[1], rel=5e-3)  # bf16 tolerance
    assert losses[1][-1] < losses[1][0]  # it trained

    torch.manual_seed(0)
    batch = torch.randint(0, MODEL.vocab_size, (4, SEQ + 1))
    fp32 = build_model(model_args(MODEL, MEMORY), seed=5)
    with torch.no_grad():
        first = torch.nn.functional.cross_entropy(fp32(batch[:, :-1]).flatten(0, 1), batch[:, 1:].flatten())
    assert losses[1][0] == pytest.approx(first.item(), rel=2e-2)
    assert losses[1][0] != pytest.approx(first.item(), rel=1e-6)  # really computed in bf16


def test_the_default_group_serves_both_devices_on_a_gpu():
    from lingua_mem.parallel.mesh import backend_for

    # on a GPU the CPU collectives (object collectives, barriers, CPU tensors) go to gloo
    assert backend_for("cuda") == "cuda:nccl,cpu:gloo"
    assert backend_for("cpu") == "cpu:gloo"


def test_a_cuda_training_process_gets_expandable_segments_and_tf32_unless_told_otherwise():
    from lingua_mem.parallel.runtime import prepare_cuda

    before = torch.get_float32_matmul_precision()
    try:
        env = {}
        prepare_cuda("cpu", True, env)  # nothing off CUDA
        assert env == {} and torch.get_float32_matmul_precision() == before
        prepare_cuda("cuda", True, env)
        assert env == {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
        # set through the API libraries read: both of its readings answer (with the newer
        # fp32_precision setter each of these raised "mix of the legacy and new APIs")
        assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
        users = ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"},
                 {"PYTORCH_ALLOC_CONF": "backend:native"})
        for mine in users:
            env = dict(mine)
            prepare_cuda("cuda", False, env)  # the user's allocator settings are theirs
            assert env == mine and torch.get_float32_matmul_precision() == "highest"
            assert not torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.set_float32_matmul_precision(before)


def test_mesh_that_does_not_fit_names_the_key():
    with pytest.raises(ConfigError, match="distributed.dp_shard"):
        resolve_dims(DistributedConfig(dp_replicate=2, dp_shard=2), world_size=2)
    with pytest.raises(ConfigError, match="distributed.memory_parallel_size"):
        resolve_dims(DistributedConfig(memory_parallel_size=3), world_size=4)
    dims = resolve_dims(DistributedConfig(dp_replicate=2), world_size=8)
    assert (dims.dp_replicate, dims.dp_shard, dims.mp) == (2, 4, 1)


ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_torchrun_trains_the_debug_model_with_memory_parallelism(tmp_path):
    import json
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-port", str(free_port()), "train.py", "config=configs/debug.yaml",
           f"dump_dir={tmp_path}", "steps=4", "log_every=2", "distributed.memory_parallel_size=2",
           "data.batch_size=4", "data.seq_len=64"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert rows[-1]["tokens"] == 4 * 2 * 4 * 64  # steps x ranks x batch x seq
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert "memory parallel 2" in proc.stdout
    assert "2 process(es) (cpu:gloo)" in proc.stdout  # the backend string names the device


def test_train_py_rejects_a_mesh_that_does_not_fit(tmp_path):
    import subprocess
    import sys

    env = dict(os.environ, RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()))
    for override, key in (("distributed.dp_shard=3", "distributed.dp_shard"),
                          ("distributed.memory_parallel_size=3", "distributed.memory_parallel_size")):
        proc = subprocess.run([sys.executable, "train.py", "config=configs/debug.yaml",
                               f"dump_dir={tmp_path / 'x'}", override], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and key in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("attention_outside", [False, True])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(mode, attention_outside):
    """On one process, as the trainer runs it: a world-1 group, FSDP2 at degree 1, and the
    value table read by routing from inside the checkpointed memory blocks. attention_outside
    (compiled flex in eager blocks, whose kernel no policy sees): the FFN halves alone are
    checkpointed, and attention runs once a step, not again in backward."""
    from lingua_mem.parallel.parallelize import apply_activation_checkpointing

    torch.manual_seed(0)
    model = build_model(model_args(MODEL, MemoryConfig(layers=[0, 1, 2], n_keys=8, heads=2, knn=4, k_dim=16,
                                                qk_norm=True)))
    checkpointed = copy.deepcopy(model)
    cfg = DistributedConfig(activation_checkpointing="none" if attention_outside else mode)
    meshes = init_distributed(cfg, "cpu")
    calls = {"attention": 0, "ffn": 0}
    try:
        if attention_outside:
            apply_activation_checkpointing(checkpointed, mode, attention_outside=True)
        parallelize(checkpointed, meshes, cfg)
        assert isinstance(checkpointed.layers[0], CheckpointWrapper) != attention_outside
        assert list(checkpointed.state_dict()) == list(model.state_dict())  # checkpoints stay loadable
        for block in checkpointed.layers:
            for name, module in (("attention", block.attention), ("ffn", block.feed_forward)):
                # on entry: a recompute stops where it has what backward needs (early stop)
                module.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        tokens = torch.randint(0, MODEL.vocab_size, (2, SEQ))
        for _ in range(2):  # the second step runs FSDP2's hooks from their steady state
            for m in (model, checkpointed):
                m.zero_grad()
                torch.nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten()).backward()
            table = checkpointed.values["shared"]
            rows, grads = table.take_row_grad()  # the table's gradient comes as rows, not .grad
            table_grad = torch.zeros_like(table.weight.to_local()).index_copy_(0, rows, grads)
            for (name, a), b in zip(model.named_parameters(), checkpointed.parameters(), strict=True):
                if b is table.weight:  # summed per distinct row, then over the layers: another order
                    torch.testing.assert_close(table_grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
                else:
                    torch.testing.assert_close(b.grad.full_tensor(), a.grad, rtol=0, atol=0, msg=name)
        # 2 steps of 3 blocks; a checkpointed module runs again in backward
        assert calls == {"attention": 6 if attention_outside else 12, "ffn": 12}
    finally:
        meshes.close()


def test_attention_is_left_out_of_checkpoints_only_for_compiled_flex_in_eager_blocks(monkeypatch):
    module = importlib.import_module("lingua_mem.parallel.parallelize")
    monkeypatch.setattr(module, "resolve_attention", lambda impl, _: "flex" if impl == "flex" else "xformers")
    doc_causal = build_model(model_args(replace(MODEL, attention="doc_causal"), MEMORY), "meta")
    doc_causal.attention_impl = "flex"
    full = DistributedConfig(activation_checkpointing="full")
    assert module.attention_outside_checkpoints(doc_causal, full, "cuda")
    compiled = replace(full, compile=True)
    assert not module.attention_outside_checkpoints(doc_causal, compiled, "cuda")  # traced into the block
    assert not module.attention_outside_checkpoints(doc_causal, DistributedConfig(), "cuda")  # no checkpoints
    assert not module.attention_outside_checkpoints(doc_causal, full, "cpu")  # eager flex: its op is seen
    doc_causal.attention_impl = "xformers"
    assert not module.attention_outside_checkpoints(doc_causal, full, "cuda")
    causal = build_model(model_args(replace(MODEL, attention="causal"), MEMORY), "meta")  # SDPA, always
    causal.attention_impl = "flex"
    assert not module.attention_outside_checkpoints(causal, full, "cuda")


def test_activation_checkpointing_refuses_query_batchnorm():
    from lingua_mem.config import load_config

    with pytest.raises(ConfigError, match="distributed.activation_checkpointing.*query_batchnorm"):
        load_config(["config=configs/debug.yaml", "memory.query_batchnorm=true",
                     "distributed.activation_checkpointing=full"])


def test_compile_without_a_cpu_compiler_is_refused(monkeypatch):
    from lingua_mem.parallel.parallelize import apply_compile

    monkeypatch.setenv("CXX", "no-such-compiler")
    with pytest.raises(ConfigError, match="distributed.compile: .*C\\+\\+ compiler"):
        apply_compile(build_model(model_args(MODEL, MEMORY), "meta"), "cpu")


def test_both_checkpointing_policies_keep_every_attention_kernel_and_the_routed_read():
    from torch.utils.checkpoint import CheckpointPolicy

    from lingua_mem.parallel.memory_parallel import routed_read
    from lingua_mem.parallel.parallelize import _full_policy, _selective_policy

    class XformersFlash:  # what a policy is given for xformers' flash op (registered by xformers)
        def name(self):
            return "xformers_flash::flash_fwd"

    kept = [torch.ops.aten._scaled_dot_product_flash_attention.default,
            torch.ops.aten._efficient_attention_forward.default,  # xformers' cutlass path
            torch.ops.higher_order.flex_attention, XformersFlash(), routed_read._opoverload]
    for policy in (_selective_policy, _full_policy):
        for op in kept:
            assert policy(None, op) == CheckpointPolicy.MUST_SAVE, (policy.__name__, op)
        assert policy(None, torch.ops.aten.silu.default) == CheckpointPolicy.PREFER_RECOMPUTE
    assert _selective_policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.MUST_SAVE
    assert _full_policy(None, torch.ops.aten.mm.default) == CheckpointPolicy.PREFER_RECOMPUTE
