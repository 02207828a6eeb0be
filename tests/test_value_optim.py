"""The value tables' row-sparse path on one process: routed reads give row gradients (the rows
read, summed over the memory layers sharing the table, nothing table-sized), and the value
optimizers (optim.value_optimizer) update exactly the rows read, by their formulas."""


import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lingua_mem.config import (
    DistributedConfig,
    MemoryConfig,
    ModelConfig,
    OptimConfig,
    load_config,
    model_args,
)
from lingua_mem.errors import ConfigError
from lingua_mem.model.llama import build_model
from lingua_mem.optim import build_memory_adamw
from lingua_mem.parallel import init_distributed, parallelize
from lingua_mem.parallel.memory_parallel import TableReader, routed_read
from lingua_mem.plan.fake_step import RunReadsInline
from lingua_mem.plan.memory_step import measure_host_syncs
from lingua_mem.plan.traffic import HostSyncs

MODEL = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=16)
MEMORY = MemoryConfig(layers=[0, 1], n_keys=128, heads=2, knn=4, k_dim=16)  # 16k rows, shared


class LargestOutput(TorchDispatchMode):
    """The most elements any op's output has, inside the mode."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_a_routed_table_gives_the_rows_read_and_nothing_table_sized():
    torch.manual_seed(0)
    reference = build_model(model_args(MODEL, MEMORY), seed=3)  # plain: a dense table gradient
    meshes = init_distributed(DistributedConfig(), "cpu")
    try:
        model = parallelize(build_model(model_args(MODEL, MEMORY), "meta"), meshes, DistributedConfig())
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
        tokens = torch.randint(0, MODEL.vocab_size, (2, 16))
        loss = lambda m: torch.nn.functional.cross_entropy(m(tokens).flatten(0, 1), tokens.flatten())  # noqa: E731
        loss(reference).backward()
        routed = loss(model)
        with LargestOutput() as seen, RunReadsInline():  # the read's ops as Python: their insides seen
            routed.backward()
        table = model.values["shared"]
        assert table.weight.grad is None  # the gradient comes as rows
        rows, grads = table.take_row_grad()
        assert table.take_row_grad() is None  # taken once
        assert seen.largest < table.weight.numel() // 8  # not one table-sized tensor in the whole backward
        dense = reference.values["shared"].weight.grad
        read = dense.abs().sum(dim=1).nonzero().flatten()
        assert torch.equal(rows.sort().values, read)  # distinct, in the order first read: what both read
        assert rows.numel() <= 2 * 2 * 16 * MEMORY.heads * MEMORY.knn
        torch.testing.assert_close(grads, dense[rows], rtol=1e-6, atol=1e-7)
    finally:
        meshes.close()


def test_the_routed_read_is_a_checked_custom_op():
    # (compiled without graph breaks: tests/test_parallel.py's compile layouts, fullgraph)
    torch.manual_seed(0)
    meshes = init_distributed(DistributedConfig(), "cpu")
    try:
        reader = TableReader(meshes.memory, 64, 8, "torch", torch.float32, torch.float32)
        args = (reader, torch.randint(0, 64, (5, 4)), torch.randn(5, 4, requires_grad=True),
                torch.randn(64, 8, requires_grad=True), 8, torch.float32, True)
        # schema, fake kernel (sizes from the data: unbacked), autograd registered for every output
        torch.library.opcheck(routed_read, args, test_utils=("test_schema", "test_faketensor",
                                                            "test_autograd_registration"))
    finally:
        meshes.close()


def reference_update(kind, w, state, rows, g, lr, decay, betas=(0.9, 0.95), eps=1e-8):
    """The formulas of optim.MemoryAdamW, written out for one table and one step."""
    w = w.clone()
    w[rows] *= 1 - lr * decay
    if kind == "lazy_adamw":
        state["step"] += 1
        t = state["step"]
        state["m"][rows] = betas[0] * state["m"][rows] + (1 - betas[0]) * g
        state["v"][rows] = betas[1] * state["v"][rows] + (1 - betas[1]) * g * g
        m_hat = state["m"][rows] / (1 - betas[0] ** t)
        v_hat = state["v"][rows] / (1 - betas[1] ** t)
        w[rows] -= lr * m_hat / (v_hat.sqrt() + eps)
    else:
        state["sum"][rows] += (g * g).mean(dim=1)
        w[rows] -= lr * g / (state["sum"][rows].sqrt() + eps)[:, None]
    return w


@pytest.mark.parametrize("kind", ["lazy_adamw", "adagrad"])
def test_row_sparse_optimizers_change_the_rows_read_and_nothing_else(kind):
    gen = torch.Generator().manual_seed(1)
    table = torch.nn.Parameter(torch.randn(10, 4, generator=gen))
    opt = build_memory_adamw([{"name": "values", "params": [table], "lr": 0.1, "weight_decay": 0.2,
                               "row_update": kind}], OptimConfig(eps=1e-8))
    want = table.detach().clone()
    state = {"step": 0, "m": torch.zeros(10, 4), "v": torch.zeros(10, 4), "sum": torch.zeros(10)}
    for rows in ([1, 3], [3, 7], [0, 3, 9]):
        rows = torch.tensor(rows)
        g = torch.randn(len(rows), 4, generator=gen)
        opt.set_row_grad(table, (rows, g.clone()))
        opt.step()
        want = reference_update(kind, want, state, rows, g, lr=0.1, decay=0.2)
        torch.testing.assert_close(table.detach(), want, rtol=1e-6, atol=1e-7)
    assert torch.equal(table.detach()[[2, 4, 5, 6, 8]], want[[2, 4, 5, 6, 8]])  # never read: as they were
    got = opt.state[table]
    if kind == "lazy_adamw":
        assert set(got) == {"step", "exp_avg", "exp_avg_sq"}  # AdamW's keys: checkpoints alike
        torch.testing.assert_close(got["exp_avg"], state["m"])
        torch.testing.assert_close(got["exp_avg_sq"], state["v"])
    else:
        assert got["sum"].shape == (10,)  # one accumulator per row
        torch.testing.assert_close(got["sum"], state["sum"])
    assert table.grad is None


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_a_row_group_of_two_waits_twice_a_read_and_not_in_backward(kernel):
    # bincount, unique_consecutive and the two split-size .tolist() were four waits of their own
    cfg = load_config(["config=configs/debug.yaml", "memory.layers=[0,1,2]", "model.n_layers=3",
                       "optim.value_optimizer=lazy_adamw"])
    syncs = measure_host_syncs(cfg, world=2, kernel=kernel)
    read = [("tolist", "parallel/memory_parallel.py:route"),
            ("tolist", "parallel/memory_parallel.py:distinct_rows")]
    assert syncs == {"forward": read * 3}  # the routing's sizes, then the distinct rows'; nothing else
    assert measure_host_syncs(cfg, world=1, kernel=kernel) == {"forward": read[1:] * 3}


def test_value_optimizer_is_a_checked_choice():
    cfg = load_config(["config=configs/debug.yaml", "optim.value_optimizer=adagrad"])
    assert cfg.optim.value_optimizer == "adagrad"
    with pytest.raises(ConfigError, match="value_optimizer: 'sgd' is not one of adamw, lazy_adamw, adagrad"):
        load_config(["config=configs/debug.yaml", "optim.value_optimizer=sgd"])


@pytest.mark.parametrize("value_optimizer", ["adamw", "lazy_adamw"])
def test_a_steady_state_step_waits_for_the_device_only_for_the_distinct_rows_read(value_optimizer):
    from lingua_mem.optim import build_optimizer, split_params
    from lingua_mem.train.step import train_step

    torch.manual_seed(0)
    meshes = init_distributed(DistributedConfig(), "cpu")
    try:
        model = parallelize(build_model(model_args(MODEL, MEMORY), "meta"), meshes, DistributedConfig())
        model.to_empty(device="cpu")
        model.init_weights(seed=3)
        optim = OptimConfig(lr=1e-3, value_optimizer=value_optimizer, warmup=0)
        optimizer = build_optimizer(model, optim)
        dense, values = split_params(model)
        tokens = torch.randint(0, MODEL.vocab_size, (2, 17))
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
        train_step(model, optimizer, [batch], optim, dense, values)  # the first step makes the state
        # the optimizers' step counts are host tensors on every device (torch's AdamW's too)
        steps = [s["step"] for s in optimizer.state.values() if "step" in s]
        assert steps and all(s.device.type == "cpu" for s in steps)
        with HostSyncs(steps) as syncs, RunReadsInline():  # the read's ops as Python: their insides seen
            result = train_step(model, optimizer, [batch], optim, dense, values)
        # one read-back of its sizes a read (two memory layers, one table, one process: no split
        # sizes to send); none as the backward sums the rows' gradients; nothing else
        reads = len(MEMORY.layers)
        assert syncs.calls == [("tolist", "parallel/memory_parallel.py:distinct_rows")] * reads
        assert result.finite.item()
    finally:
        meshes.close()
