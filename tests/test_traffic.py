"""The traffic model of a memory step (plan/traffic.py, plan/memory_step.py, memory_traffic.py):
its per-op counts on cases counted by hand, the table path within 2x of the minimum at the
134m and 1.3b shapes, and the first GPU run's predicted failures as far as a CPU shows them
(the Triton probe and its fallbacks, the matmul precision API, the key search's own op,
per-device RNG state, the row gradient's layouts, the readable bf16 copy)."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lingua_mem.checkpoint.checkpointer import device_rng_state
from lingua_mem.config import ConfigError, load_config
from lingua_mem.kernels.embedding_bag import choose_kernel, resolve_kernel
from lingua_mem.memory.product_topk import ieee_fp32, key_scores
from lingua_mem.model.llama import resolve_attention
from lingua_mem.parallel.memory_parallel import RowGrads
from lingua_mem.plan.traffic import OpTraffic, declared_traffic

ROOT = Path(__file__).resolve().parents[1]


def counted(fn) -> tuple[int, int]:
    counter = OpTraffic(declared_traffic())
    with counter:
        fn()
    phase = counter.phases["forward"]
    return phase.read, phase.written


def test_ops_count_the_rows_they_touch_not_the_tables_they_index():
    rows, d, k = 100_000, 64, 1000  # a 25.6 MB table: more than the L2 allowance
    table = torch.randn(rows, d)
    idx = torch.randint(0, rows, (k,))
    assert counted(lambda: table.index_select(0, idx)) == (k * d * 4 + k * 8, k * d * 4)
    # a bag of 8 reads each: every read's row, the indices, offsets and weights; the bags written
    bags = idx.view(-1, 8)
    read, written = counted(lambda: F.embedding_bag(bags, table, per_sample_weights=torch.ones(bags.shape),
                                                     mode="sum"))
    assert read >= k * d * 4 and read < k * d * 4 + k * 20 + 2048
    assert written >= (k // 8) * d * 4
    # in place: the destination read and written whole; copy_ writes without reading it
    a, b = torch.zeros(1000), torch.ones(1000)
    assert counted(lambda: a.add_(b)) == (8000, 4000)
    assert counted(lambda: a.copy_(b)) == (4000, 4000)
    # a radix sort: a pass a key byte, keys and their int64 positions read and written each pass
    keys32 = idx.to(torch.int32)
    assert counted(lambda: torch.sort(keys32))[0] == 4 * k * (4 + 8)
    assert counted(lambda: torch.sort(idx))[0] == 8 * k * (8 + 8)
    # a table that fits in L2 is read once however often its rows are gathered
    small = torch.randn(64, 16)
    zeros = torch.zeros(10_000, dtype=torch.int64)
    assert counted(lambda: small.index_select(0, zeros))[0] == 64 * 16 * 4 + 80_000


def test_the_triton_ops_declare_their_bytes_from_their_arguments():
    pytest.importorskip("triton")
    from lingua_mem.kernels.embedding_bag import bag_rows_backward, embedding_bag
    from lingua_mem.parallel.memory_parallel import distinct_rows

    rows, d, n, m = 50, 64, 6, 4
    table, idx, w = torch.randn(rows, d), torch.randint(0, rows, (n, m)), torch.rand(n, m)
    read, written = counted(lambda: embedding_bag(idx, w, table, "triton", dtype=torch.bfloat16))
    assert (read, written) == (n * m * d * 4 + n * m * (8 + 4), n * d * 2)  # every read's row; bf16 bags
    plan = distinct_rows(idx, rows, segmented=True)
    segments = plan[3].numel() - 1
    grad_rows, grad_out = torch.zeros(rows, d), torch.randn(n, d)
    slot_of_row = torch.arange(rows, dtype=torch.int32)
    read, written = counted(lambda: bag_rows_backward(grad_out, idx, w, table, *plan, slot_of_row, grad_rows,
                                                      1.0, "triton"))
    # each read's bag gradient; each segment's row once and its gradient added once (atomics);
    # beside the kernel, each read's bag index made (a few int64 passes over the reads)
    kernel_written = segments * d * 4 + n * m * 4
    assert read >= n * m * d * 4 + segments * d * 8
    assert kernel_written <= written <= kernel_written + 4 * n * m * 8


@pytest.mark.parametrize("config", ["configs/memory_134m.yaml", "configs/memory_1.3b.yaml"])
def test_a_memory_step_moves_within_2x_of_its_minimum(config, tmp_path):
    out = tmp_path / "traffic.json"
    proc = subprocess.run([sys.executable, "benchmarks/memory_traffic.py", "--configs", config, "--no-syncs",
                           "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["config"] == config and row["minimum_bytes"] > 0
    assert row["ratio"] == pytest.approx(row["traffic_bytes"] / row["minimum_bytes"], abs=1e-3)
    assert 1.0 < row["ratio"] <= 2.0  # at b46dd42 the same count gave 4.72 (134m) and 5.26 (1.3b)
    for phase in row["phases"].values():
        assert phase["traffic_bytes"] >= phase["minimum_bytes"] > 0
    assert row["traffic_ms"] == pytest.approx(row["traffic_bytes"] / 3.35e9, rel=1e-3)
    assert "table" in proc.stdout or "step" in proc.stdout


def test_a_dense_optimizer_gets_the_shard_shaped_gradient_it_needs_and_the_same_values():
    grads = RowGrads(shard_rows=10, cols=3)
    rows = torch.tensor([7, 2])
    grads.give_slots(rows, new=2)
    grads.buffer(rows.device)[:2] = torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    sparse_rows, sparse = grads.take()  # the rows in the order first read
    assert sparse_rows.tolist() == [7, 2] and sparse.tolist() == [[1, 1, 1], [2, 2, 2]]
    grads.give_slots(rows, new=2)
    grads.buffer(rows.device)[:2] = torch.tensor([[1.0, 1, 1], [2, 2, 2]])
    none, dense = grads.take(dense=True)  # this step scattered once; the next ones dense
    assert none is None and dense.shape == (10, 3) and dense[7].tolist() == [1, 1, 1] and dense[0].sum() == 0
    assert grads.dense
    grads.give_slots(rows, new=0)
    grads.buffer(rows.device)[7] += 5.0  # a backward adds at the row itself
    _, again = grads.take(dense=True)
    assert again[7].tolist() == [5, 5, 5] and again.sum() == 15  # zeroed between steps
    grads.give_slots(rows, new=0)  # a read whose backward never ran: a zero gradient, not stale
    _, unread = grads.take(dense=True)
    assert unread.shape == (10, 3) and unread.sum() == 0


def test_training_with_the_dense_layout_equals_the_scattered_gradient(tmp_path):
    # AdamW over every row (the default value optimizer): step 1 scatters, steps 2.. take the
    # shard-shaped gradient; lazy AdamW at zero weight decay and betas of AdamW... differs, so the
    # reference is the plain (unrouted) model, whose table has autograd's dense gradient
    from test_value_optim import MEMORY, MODEL

    from lingua_mem.config import DistributedConfig, OptimConfig, model_args
    from lingua_mem.model.llama import build_model
    from lingua_mem.optim import build_optimizer, split_params
    from lingua_mem.parallel import init_distributed, parallelize
    from lingua_mem.train.step import train_step

    torch.manual_seed(0)
    optim = OptimConfig(lr=1e-3, value_lr=1e-2, warmup=0)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 17))
    batch = [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}]
    reference = build_model(model_args(MODEL, MEMORY), seed=3)
    ref_opt = build_optimizer(reference, optim)
    params = split_params(reference)
    ref = [train_step(reference, ref_opt, batch, optim, *params).loss.item() for _ in range(4)]
    meshes = init_distributed(DistributedConfig(), "cpu")
    try:
        model = parallelize(build_model(model_args(MODEL, MEMORY), "meta"), meshes, DistributedConfig())
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
        opt = build_optimizer(model, optim)
        got = [train_step(model, opt, batch, optim, *split_params(model)).loss.item() for _ in range(4)]
        assert model.values["shared"].reader.grads.dense  # settled into the optimizer's layout
    finally:
        meshes.close()
    assert got == pytest.approx(ref, rel=1e-5)


def test_the_readable_bf16_copy_follows_every_update():
    from test_kernels import TINY

    from lingua_mem.config import model_args
    from lingua_mem.model.llama import build_model
    from lingua_mem.optim import build_optimizer, split_params
    from lingua_mem.parallel import init_distributed, parallelize
    from lingua_mem.train.step import train_step

    cfg = load_config([*TINY, "distributed.compute_dtype=bf16"])  # value_compute_dtype auto: bf16
    meshes = init_distributed(cfg.distributed, "cpu")
    try:
        model = parallelize(build_model(model_args(cfg.model, cfg.memory), "meta"), meshes, cfg.distributed,
                            cfg.memory.value_compute_dtype)
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
        table = model.values["shared"]
        assert table.compute_dtype == torch.bfloat16
        opt = build_optimizer(model, cfg.optim)
        tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
        batch = [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}]
        for _ in range(3):
            train_step(model, opt, batch, cfg.optim, *split_params(model))
            with torch.no_grad():
                model(tokens[:, :-1])  # a read after the update: the copy made again
            copy = table.reader.copy
            assert copy.dtype == torch.bfloat16
            assert torch.equal(copy, table.weight.to_local().to(torch.bfloat16))
    finally:
        meshes.close()


def test_where_triton_cannot_run_auto_falls_back_in_one_line_and_an_explicit_choice_says_why():
    # this machine has no CUDA driver: the probes fail for real, as an image without a C
    # compiler would at its first launch
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert resolve_kernel("auto", "cuda") == ("torch")
        assert resolve_attention("auto", "cuda") == "sdpa"  # no xformers, and compiled flex needs Triton
    lines = [str(w.message) for w in seen]
    assert any(line.startswith("memory.kernel=auto: triton cannot run on cuda") for line in lines)
    assert any(line.startswith("model.attention_impl=auto: triton cannot run on cuda") for line in lines)
    assert all("\n" not in line for line in lines)
    with pytest.raises(ConfigError, match=r"^memory.kernel: triton cannot run on cuda"):
        resolve_kernel("triton", "cuda")
    with pytest.raises(ConfigError, match=r"^model.attention_impl: flex runs compiled on cuda, and triton"):
        resolve_attention("flex", "cuda")
    assert choose_kernel("auto", "cuda", None) == "triton"  # a probe that passes


def test_the_triton_probe_names_a_missing_compiler():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CC")}
    env["PATH"] = "/nonexistent"
    code = "from lingua_mem.kernels import triton_problem; print(triton_problem('cpu'))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = proc.stdout.strip().splitlines()[-1]
    assert line.startswith("triton cannot run on cpu (a C compiler")  # (and Python.h, where that lacks)


def test_the_matmul_precision_survives_every_library_that_reads_it():
    from lingua_mem.parallel.runtime import prepare_cuda

    before = torch.get_float32_matmul_precision()
    try:
        prepare_cuda("cuda", True, {})
        # what Inductor's autotuning, transformers and lm-eval read: with the newer
        # fp32_precision setter each of these raised "mix of the legacy and new APIs"
        assert torch.backends.cuda.matmul.allow_tf32 and torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_key_search_scores_in_full_fp32_in_an_op_of_its_own():
    torch.set_float32_matmul_precision("high")
    try:
        with ieee_fp32():
            assert torch.get_float32_matmul_precision() == "highest"
        assert torch.get_float32_matmul_precision() == "high"  # restored
        q, keys = torch.randn(5, 2, 2, 8), torch.randn(2, 2, 7, 8)
        torch.testing.assert_close(key_scores(q, keys), torch.einsum("nhpd,hpkd->nhpk", q, keys))
        assert torch.get_float32_matmul_precision() == "high"
        torch.library.opcheck(key_scores, (q, keys), test_utils=("test_schema", "test_faketensor"))
    finally:
        torch.set_float32_matmul_precision("highest")


def test_a_checkpoint_keeps_the_generator_of_its_rank_s_device_and_reads_older_ones():
    mine = torch.arange(8, dtype=torch.uint8)
    assert torch.equal(device_rng_state({"cuda_device": mine}, 3), mine)
    every = [torch.full((8,), i, dtype=torch.uint8) for i in range(2)]  # saved on a node of 2 GPUs
    assert torch.equal(device_rng_state({"cuda": every}, 1), every[1])
    assert device_rng_state({"cuda": every}, 5) is None  # resumed on device 5 of a larger node
    assert device_rng_state({}, 0) is None


def test_compile_on_cuda_picks_flex_for_doc_causal_attention():
    from test_value_optim import MEMORY, MODEL

    from lingua_mem.config import model_args
    from lingua_mem.model.llama import build_model
    from lingua_mem.parallel.parallelize import apply_compile

    model = build_model(model_args(MODEL, MEMORY), "meta")
    assert model.attention_impl == "auto"
    apply_compile(model, "cuda")  # wraps the blocks (nothing compiles until they run)
    assert model.attention_impl == "flex"  # xformers' mask would recompile every batch
    cpu = build_model(model_args(MODEL, MEMORY), "meta")
    apply_compile(cpu, "cpu")
    assert cpu.attention_impl == "auto"


def test_deterministic_runs_train_alike_and_refuse_the_atomic_kernel(tmp_path):
    base = ["config=configs/debug.yaml", "steps=3", "log_every=1", "checkpoint.every=0", "eval.every=0",
            "data.batch_size=2", "data.seq_len=64", "distributed.deterministic=true", "logging.console=false"]
    losses = []
    for run in ("a", "b"):  # a process each: torch.use_deterministic_algorithms is process-wide
        proc = subprocess.run([sys.executable, "train.py", *base, f"dump_dir={tmp_path / run}"], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        rows = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        losses.append([json.loads(x)["loss"] for x in rows])
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    with pytest.raises(ConfigError, match=r"^distributed.deterministic: memory.kernel=triton adds"):
        load_config(["config=configs/debug.yaml", "distributed.deterministic=true", "memory.kernel=triton"])


def test_doc_ids_kept_on_the_host_reach_the_model_past_fsdp2_and_train():
    # xformers' mask reads the documents' lengths on the host: FSDP2's root pre-forward moves
    # every tensor argument to the device (on a GPU a .tolist() of them would then wait every
    # micro-batch); an OnHost it passes as it is
    pytest.importorskip("xformers.ops.fmha")
    from test_value_optim import MEMORY, MODEL

    from lingua_mem.config import DistributedConfig, model_args
    from lingua_mem.data.loader import document_ids
    from lingua_mem.model.llama import OnHost, build_model
    from lingua_mem.parallel import init_distributed, parallelize
    from lingua_mem.plan.traffic import HostSyncs
    from lingua_mem.train.trainer import to_device

    meshes = init_distributed(DistributedConfig(), "cpu")
    try:
        model = parallelize(build_model(model_args(MODEL, MEMORY), "meta", attention_impl="xformers"), meshes,
                            DistributedConfig())
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
        tokens = torch.randint(2, MODEL.vocab_size, (2, 16))
        tokens[:, 5] = 1  # a second document in each row (1: the BOS of this test)
        batch = to_device({"inputs": tokens, "doc_ids": document_ids(tokens, 1)}, torch.device("cpu"),
                          on_host=("doc_ids",))
        assert isinstance(batch["doc_ids"], OnHost)
        seen = []
        model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs["doc_ids"]),
                                        with_kwargs=True)
        with HostSyncs([batch["doc_ids"].tensor]) as syncs:
            with torch.no_grad():
                model(batch["inputs"], doc_ids=batch["doc_ids"])
        assert isinstance(seen[0], OnHost) and seen[0].tensor is batch["doc_ids"].tensor
        # the reads' own one a read; the document lengths none (read on the host)
        assert all(where != "model/llama.py:document_lengths" for _, where in syncs.calls)
    finally:
        meshes.close()
