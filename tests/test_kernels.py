"""The Triton embedding-bag kernels (run on the CPU by Triton's interpreter, TRITON_INTERPRET=1
from conftest) against the PyTorch path: forward (in the table's dtype or another), a plain
table's gradients, a routed table's row backward (a program per segment of one row's reads,
hot rows cut into several), the weight gradient, duplicate indices, bf16 tables, ragged tails;
as custom ops (opcheck, torch.compile
without graph breaks); and training the debug model to the torch path's losses, on one
process and with memory parallelism."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_parallel import free_port

from lingua_mem.config import ConfigError, load_config
from lingua_mem.kernels import embedding_bag, resolve_kernel
from lingua_mem.kernels.embedding_bag import bag_rows_backward, embedding_bag_backward
from lingua_mem.kernels.triton_bag import (
    BLOCK_D,
    BLOCK_M,
    SEGMENT_READS,
    embedding_bag_triton,
    embedding_bag_triton_backward,
)
from lingua_mem.memory import ProductKeyMemory, ValueTable
from lingua_mem.parallel.memory_parallel import distinct_rows
from lingua_mem.train.trainer import train

ROOT = Path(__file__).resolve().parents[1]
# (N, M, R, D): tails on every axis (blocks of BLOCK_M indices, BLOCK_D columns), rows read
# many times (more than a segment's reads)
SHAPES = [(3, 5, 7, 9), (9, BLOCK_M + 3, 40, BLOCK_D + 5), (4, 2 * BLOCK_M, 6, 200), (1, 1, 1, 1)]


def case(n, m, r, d, dtype=torch.float32, index_dtype=torch.int64, seed=0):
    g = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, r, (n, m), generator=g).to(index_dtype)
    indices[0, : min(m, 3)] = 0  # duplicates within a bag (and across bags: r is small)
    weights = torch.rand(n, m, generator=g)
    table = torch.randn(r, d, generator=g).to(dtype)
    return indices, weights, table


def reference(indices, weights, table, grad_out):
    """float64 bag and gradients of the plain PyTorch path."""
    w = weights.double().requires_grad_()
    t = table.double().requires_grad_()
    out = F.embedding_bag(indices.long(), t, per_sample_weights=w, mode="sum")
    gw, gt = torch.autograd.grad(out, (w, t), grad_out.double())
    return out, gw, gt


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_forward_and_backward_equal_pytorch(shape, index_dtype):
    indices, weights, table = case(*shape, index_dtype=index_dtype)
    grad_out = torch.randn(shape[0], shape[3], generator=torch.Generator().manual_seed(1))
    out, gw, gt = reference(indices, weights, table, grad_out)
    got = embedding_bag_triton(indices, weights, table)
    torch.testing.assert_close(got.double(), out, rtol=1e-5, atol=1e-5)
    grad_w, grad_table = embedding_bag_triton_backward(grad_out, indices, weights, table)
    assert grad_w.dtype == weights.dtype and grad_table.dtype == table.dtype
    torch.testing.assert_close(grad_w.double(), gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_table.double(), gt, rtol=1e-5, atol=1e-5)
    for kernel in ("torch", "triton"):  # a routed table's owner: rows added at their slots, scaled
        got_w, got_rows = rows_backward(grad_out, indices, weights, table, kernel, scale=0.5)
        torch.testing.assert_close(got_w.double(), gw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_rows.double(), 0.5 * gt, rtol=1e-5, atol=1e-5)


def rows_backward(grad_out, reads, weights, table, kernel, scale=1.0, offsets=None):
    """kernels.bag_rows_backward as a routed table's owner calls it, the rows' slots in reverse
    row order, a gradient buffer holding 1.0 already: -> (grad_w, the table's gradient by row)."""
    rows, slots, by_row, segments = distinct_rows(reads.long(), table.shape[0], segmented=kernel == "triton")
    slot_of_row = (table.shape[0] - 1 - torch.arange(table.shape[0])).to(torch.int32)
    grad_rows = torch.ones(table.shape)
    grad_w = bag_rows_backward(grad_out, reads.long(), weights, table, rows, slots, by_row, segments,
                               slot_of_row, grad_rows, scale, kernel, offsets)
    assert grad_w.shape == weights.shape and grad_w.dtype == torch.float32
    return grad_w, (grad_rows - 1)[slot_of_row.long()]


def test_a_hot_row_is_cut_into_segments_that_add_up():
    # one row read by every bag, 3 segments' worth, and a row read once
    n, m, d = 5, 2 * SEGMENT_READS // 3, 70
    indices = torch.zeros(n, m, dtype=torch.int64)
    indices[0, 0] = 1
    g = torch.Generator().manual_seed(3)
    weights, table = torch.rand(n, m, generator=g), torch.randn(2, d, generator=g)
    grad_out = torch.randn(n, d)
    rows, _, _, segments = distinct_rows(indices, 2, segmented=True)
    assert rows.tolist() == [0, 1] and segments.numel() - 1 == 1 + -(-(n * m - 1) // SEGMENT_READS)
    _, gw, gt = reference(indices, weights, table, grad_out)
    got_w, got_rows = rows_backward(grad_out, indices, weights, table, "triton")
    torch.testing.assert_close(got_w.double(), gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_rows.double(), gt, rtol=1e-5, atol=1e-5)


def test_ragged_bags_with_offsets_equal_pytorch():
    # bags of 0, 1, BLOCK_M + 2 and 3 reads (what a table's owner bags for partial sums)
    g = torch.Generator().manual_seed(4)
    lengths = torch.tensor([0, 1, BLOCK_M + 2, 3])
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    k, r, d = int(lengths.sum()), 9, BLOCK_D + 3
    indices, weights = torch.randint(0, r, (k,), generator=g), torch.rand(k, generator=g)
    table = torch.randn(r, d, generator=g)
    grad_out = torch.randn(lengths.numel(), d, generator=g)
    w, t = weights.double().requires_grad_(), table.double().requires_grad_()
    out = F.embedding_bag(indices, t, offsets, per_sample_weights=w, mode="sum", include_last_offset=True)
    gw, gt = torch.autograd.grad(out, (w, t), grad_out.double())
    torch.testing.assert_close(embedding_bag(indices, weights, table, "torch", offsets).double(), out,
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embedding_bag_triton(indices, weights, table, offsets).double(), out,
                               rtol=1e-5, atol=1e-5)
    grad_w, grad_table = embedding_bag_triton_backward(grad_out, indices, weights, table, offsets)
    torch.testing.assert_close(grad_w.double(), gw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_table.double(), gt, rtol=1e-5, atol=1e-5)
    for kernel in ("torch", "triton"):
        got_w, got_rows = rows_backward(grad_out, indices, weights, table, kernel, offsets=offsets)
        torch.testing.assert_close(got_w.double(), gw, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_rows.double(), gt, rtol=1e-5, atol=1e-5)
    for kernel in ("torch", "triton"):  # the backward without autograd (a routed table's owner)
        for offs, shape in ((offsets, (k,)), (None, (4, 5))):
            idx, w = (indices, weights) if offs is not None else (indices[:20].view(4, 5),
                                                                   weights[:20].view(4, 5))
            g_out = grad_out if offs is not None else torch.randn(4, d, generator=g)
            t, w_ = table.clone().requires_grad_(), w.clone().requires_grad_()
            expected = torch.autograd.grad(embedding_bag(idx, w_, t, "torch", offs), (w_, t), g_out)
            got = embedding_bag_backward(g_out, idx, w, table, kernel, offs)
            assert got[0].shape == shape
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_bf16_tables_accumulate_in_fp32():
    indices, weights, table = case(6, 40, 8, 70, dtype=torch.bfloat16)
    grad_out = torch.randn(6, 70, generator=torch.Generator().manual_seed(2))
    out, gw, gt = reference(indices, weights, table, grad_out)
    got = embedding_bag_triton(indices, weights, table)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), out, rtol=1e-2, atol=1e-2)  # one bf16 rounding of the sum
    grad_w, grad_table = embedding_bag_triton_backward(grad_out, indices, weights, table)
    torch.testing.assert_close(grad_w.double(), gw, rtol=1e-5, atol=1e-4)  # fp32 from bf16 rows
    torch.testing.assert_close(grad_table.double(), gt, rtol=1e-2, atol=1e-2)


def test_an_fp32_table_is_read_into_bf16_in_the_kernel():
    indices, weights, table = case(6, 40, 8, 70)
    out = embedding_bag_triton(indices, weights, table, None, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    exact = embedding_bag_triton(indices, weights, table)  # fp32 accumulation either way
    # one rounding, at the end (Triton's interpreter rounds toward zero, a GPU to nearest)
    torch.testing.assert_close(out, exact.to(torch.bfloat16), rtol=2**-7, atol=0)
    assert torch.equal(embedding_bag(indices, weights, table, "torch", dtype=torch.bfloat16),
                       embedding_bag(indices, weights, table, "torch").to(torch.bfloat16))


def test_autograd_through_the_custom_op_equals_the_torch_path():
    indices, weights, table = case(7, 12, 10, 33)
    w1, t1 = weights.clone().requires_grad_(), table.clone().requires_grad_()
    w2, t2 = weights.clone().requires_grad_(), table.clone().requires_grad_()
    a = embedding_bag(indices, w1, t1, kernel="triton")
    b = embedding_bag(indices, w2, t2, kernel="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    (a * torch.arange(33.0)).sum().backward()
    (b * torch.arange(33.0)).sum().backward()
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-5, atol=1e-5)
    torch.library.opcheck(embedding_bag_triton, case(3, 5, 4, 6),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_a_memory_layer_compiles_without_graph_breaks(kernel):
    torch.manual_seed(0)
    layer = ProductKeyMemory(32, n_keys=8, heads=2, knn=4, k_dim=16, v_dim=32)
    values = ValueTable(64, 32, kernel=kernel)
    for p in (*layer.parameters(), *values.parameters()):
        torch.nn.init.normal_(p, std=0.1)
    x = torch.randn(2, 5, 32)
    explained = torch._dynamo.explain(lambda x: layer(x, values))(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    compiled = torch.compile(lambda x: layer(x, values), backend="eager")
    torch.testing.assert_close(compiled(x), layer(x, values))


def test_triton_where_it_cannot_run_is_one_line(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ConfigError, match="memory.kernel: triton on cpu runs only in Triton's interpreter"):
        resolve_kernel("triton", "cpu")
    assert resolve_kernel("auto", "cpu") == "torch" and resolve_kernel("torch", "cuda") == "torch"
    with pytest.raises(ConfigError, match="memory.kernel: 'cuda' is not one of auto, torch, triton"):
        load_config(["config=configs/debug.yaml", "memory.kernel=cuda"])


TINY = ["config=configs/debug.yaml", "model.dim=64", "model.n_layers=3", "model.n_heads=4",
        "model.max_seq_len=32", "memory.layers=[0,2]", "memory.n_keys=8", "memory.heads=2", "memory.knn=4",
        "memory.k_dim=32", "data.seq_len=16", "data.batch_size=4", "data.facts.people=20", "optim.warmup=1",
        "steps=3", "log_every=1", "checkpoint.every=0", "logging.console=false"]


def losses(dump_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (Path(dump_dir) / "metrics.jsonl").read_text().splitlines()]


def start_mp2(dump_dir: Path, kernel: str) -> list[subprocess.Popen]:
    """train.py on 2 processes with memory parallelism (the environment torchrun gives them)."""
    port = str(free_port())
    return [subprocess.Popen(
        [sys.executable, "train.py", *TINY, f"dump_dir={dump_dir}", f"memory.kernel={kernel}",
         "data.batch_size=2", "distributed.memory_parallel_size=2"], cwd=ROOT, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                 MASTER_PORT=port, OMP_NUM_THREADS="1")) for r in range(2)]


def test_training_with_the_triton_kernel_matches_the_torch_path_on_1_and_2_processes(tmp_path):
    # two ranks of 2 sequences read other documents than one process of 4: each layout is
    # compared with the torch path on the same layout
    procs = start_mp2(tmp_path / "mp2_triton", "triton") + start_mp2(tmp_path / "mp2_torch", "torch")
    train(load_config([*TINY, f"dump_dir={tmp_path / 'torch'}", "memory.kernel=torch"]))
    train(load_config([*TINY, f"dump_dir={tmp_path / 'triton'}", "memory.kernel=triton"]))
    assert losses(tmp_path / "triton") == pytest.approx(losses(tmp_path / "torch"), rel=1e-5)
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    assert losses(tmp_path / "mp2_triton") == pytest.approx(losses(tmp_path / "mp2_torch"), rel=1e-5)
    assert len(losses(tmp_path / "mp2_triton")) == 3


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_the_bag_reads_a_bf16_table_and_the_master_weights_stay_fp32(tmp_path, kernel):
    from lingua_mem.config import model_args
    from lingua_mem.model.llama import build_model
    from lingua_mem.optim import build_optimizer, split_params
    from lingua_mem.parallel import init_distributed, parallelize
    from lingua_mem.train.step import train_step

    cfg = load_config([*TINY, f"memory.kernel={kernel}", "memory.value_compute_dtype=bf16"])
    results = {}
    meshes = init_distributed(cfg.distributed, "cpu")
    try:
        for dtype in ("fp32", "bf16"):
            model = parallelize(build_model(model_args(cfg.model, cfg.memory), "meta", kernel=kernel), meshes,
                                cfg.distributed, dtype)
            model.to_empty(device="cpu")
            model.init_weights(seed=3)
            seen = []
            table = model.values["shared"]
            # the dtype the bag reads in: its output's
            hook = table.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out.dtype))
            opt = build_optimizer(model, cfg.optim)
            tokens = torch.randint(0, 256, (4, 17), generator=torch.Generator().manual_seed(0))
            batch = [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}]
            results[dtype] = [train_step(model, opt, batch, cfg.optim, *split_params(model)).loss.item()
                              for _ in range(2)]
            hook.remove()
            master = model.values["shared"].weight
            assert master.to_local().dtype == torch.float32  # the sharded master weights
            assert all(v.dtype == torch.float32 for v in opt.state[master].values() if v.is_floating_point())
            assert seen == [torch.bfloat16 if dtype == "bf16" else torch.float32] * 4  # 2 layers, 2 steps
    finally:
        meshes.close()
    assert results["bf16"] == pytest.approx(results["fp32"], rel=1e-2)
    assert results["bf16"] != results["fp32"]


def test_the_kernels_autotune_on_a_gpu_over_blocks_that_fit_d():
    import triton

    from lingua_mem.kernels import triton_bag

    configs = [triton.Config({"BLOCK_D": d, "BLOCK_M": m}, num_warps=w)
               for d, m, w in triton_bag.AUTOTUNE_CONFIGS]

    def widths(d):
        return sorted({c.kwargs["BLOCK_D"] for c in triton_bag.fitting_configs(configs, {"D": d})})

    assert widths(32) == [64]  # at least 64 wide
    assert widths(64) == [64]
    assert widths(100) == [64, 128]
    assert widths(1024) == [64, 128, 256]
    # interpreted (these tests), the default config alone: a trial there would time nothing
    for kernel in (triton_bag._bag_forward, triton_bag._bag_weight_grad, triton_bag._bag_table_grad_atomic,
                   triton_bag._bag_rows_backward):
        assert kernel.keys == ["D"]
        assert [(c.kwargs["BLOCK_D"], c.kwargs["BLOCK_M"]) for c in kernel.configs] == [(128, 16)]
    # trials add into the atomic gradient: it starts from zero at each; the rows' backward adds
    # into the step's gradient, which every trial gets back as it was
    assert triton_bag._bag_table_grad_atomic.reset_to_zero == ["grad_table_ptr"]
    assert triton_bag._bag_rows_backward.restore_value == ["grad_rows_ptr"]
