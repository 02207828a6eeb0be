"""One training step of a config's memory layers on no hardware: what it moves through device
memory against the least it must, and the host syncs it makes (the instruments are in
plan/traffic.py; benchmarks/memory_traffic.py prints both, docs/performance.md holds them).

MemoryStep builds the memory layers, their value tables and the value optimizer as training
does (the tables sharded and read by routing); measure_memory_traffic runs it at the config's
real shapes on fake tensors under OpTraffic, measure_host_syncs at a tiny shape on real gloo
processes under HostSyncs. minimum_bytes states the minimum.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lingua_mem.parallel.parallelize import value_dtype
from lingua_mem.plan.traffic import L2_BYTES, HostSyncs, OpTraffic, PhaseTraffic, declared_traffic

PHASES = ("forward", "backward", "optimizer")


@dataclass
class Shape:
    """One rank's memory step at a config's real sizes (`gpus` ranks, the config's mp)."""

    layers: int  # memory layers
    tables: int  # value tables (1 when shared)
    tokens: int  # N: this rank's tokens in a micro-batch
    bagged: int  # T: tokens this rank bags (mp * N: the mp group's tokens, its columns)
    reads: int  # M: rows a token reads (heads * knn)
    heads: int
    knn: int
    n_keys: int
    k_dim: int
    dim: int
    v_dim: int
    cols: int  # D: the columns of a table this rank holds
    shard_rows: int  # rows of a table this rank holds
    dense_bytes: int  # the memory layers' compute dtype (FSDP2's parameters)
    value_bytes: int  # memory.value_compute_dtype
    value_optimizer: str

    @property
    def distinct(self) -> int:
        """U of one read: min(reads, shard rows), the most a read can hold (fake tensors have no
        values; at the shipped shapes a real batch comes close: see docs/performance.md)."""
        return min(self.bagged * self.reads, self.shard_rows)

    @property
    def distinct_step(self) -> int:
        """U of one table over a step: min(every read of it, shard rows)."""
        return min(self.bagged * self.reads * self.layers // self.tables, self.shard_rows)


def shape_of(cfg, gpus: int) -> Shape:
    from lingua_mem.config import model_args

    args = model_args(cfg.model, cfg.memory, cfg.moe)
    mem, mp = args.memory, cfg.distributed.memory_parallel_size
    n = cfg.data.batch_size * cfg.data.seq_len
    return Shape(
        layers=len(mem.layers), tables=1 if mem.shared_values else len(mem.layers), tokens=n, bagged=mp * n,
        reads=mem.heads * mem.knn, heads=mem.heads, knn=mem.knn, n_keys=mem.n_keys, k_dim=mem.k_dim,
        dim=args.dim, v_dim=mem.v_dim, cols=mem.v_dim // mp, shard_rows=-(-mem.n_values // (gpus // mp)),
        dense_bytes=2 if cfg.distributed.compute_dtype == "bf16" else 4,
        value_bytes=2 if value_dtype(cfg.memory.value_compute_dtype, cfg.distributed) == "bf16" else 4,
        value_optimizer=cfg.optim.value_optimizer)


def minimum_bytes(s: Shape) -> dict[str, int]:
    """The least a step of the memory layers must move, by phase (docs/performance.md): the
    table's rows once (U of them, at their stored fp32) each way, the bags and their gradients
    once, U fp32 row gradients written once, the optimizer's U rows and their state read and
    written once, and every other tensor of the layers (the key search's scores and top-k,
    the projections' inputs, weights and outputs) written once and read once."""
    n, t, m, h, k = s.tokens, s.bagged, s.reads, s.heads, s.knn
    c, v, stored = s.dense_bytes, s.value_bytes, 4
    u, reads = s.distinct, t * m
    half = s.k_dim // 2
    weights = (s.dim * h * s.k_dim + s.dim * s.v_dim + s.v_dim * s.dim) * c  # query, gate, out
    search = (2 * n * h * 2 * s.n_keys * 4  # the sub-key scores (fp32), written and read by top-k
              + 2 * n * h * 2 * k * 12  # each half's top-k (scores, indices)
              + 2 * n * h * k * k * 4  # the k*k candidate sums
              + n * h * k * 12 + n * m * 4  # the final top-k and the softmax weights
              + h * 2 * s.n_keys * half * 4)  # the sub-keys
    dense = (n * s.dim * c  # x
             + 2 * n * h * s.k_dim * c  # q written, read
             + 2 * n * s.v_dim * c * 2  # the gate and the gated bag, each written and read
             + n * s.dim * c + weights)  # the output, the weights
    table_fwd = reads * 12 + u * s.cols * stored + t * s.cols * v
    forward = search + dense + table_fwd
    table_bwd = t * s.cols * v + u * s.cols * stored + reads * 4 + u * s.cols * 4
    subkeys = h * 2 * s.n_keys * half * 4
    picked = n * h * 2 * k * half * 4  # the picked sub-keys, gathered (once when they fit in L2)
    search_bwd = (3 * n * m * 4 + n * h * 2 * k * 12  # the softmax's and the picked scores' gradients
                  + 2 * n * h * 2 * s.n_keys * 4  # the sub-key scores' gradient, written and read
                  + (min(picked, subkeys) if subkeys <= L2_BYTES else picked)  # q's: the picked sub-keys
                  + n * h * s.k_dim * (4 + 4 + c))  # q read, its gradient written (fp32, then cast)
    dense_bwd = 2 * dense + weights  # each tensor's gradient written and read; weight gradients
    backward = table_bwd + search_bwd + dense_bwd
    step_u = s.distinct_step
    state = {"adagrad": 4 / s.cols, "sgd": 0}.get(s.value_optimizer, 8)  # state bytes a column
    optimizer = s.tables * int(step_u * s.cols * (4 + 2 * stored + 2 * state))
    return {"forward": s.layers * forward, "backward": s.layers * backward, "optimizer": optimizer}


@dataclass
class StepTraffic:
    config: str
    gpus: int
    kernel: str
    shape: Shape
    phases: dict[str, PhaseTraffic]
    minimum: dict[str, int]

    @property
    def traffic_bytes(self) -> int:
        return sum(p.bytes for p in self.phases.values())

    @property
    def minimum_bytes(self) -> int:
        return sum(self.minimum.values())

    @property
    def ratio(self) -> float:
        return self.traffic_bytes / self.minimum_bytes


class MemoryStep:
    """A config's memory layers and value tables, parallelized as training does (the tables
    sharded and read by routing over `meshes`), the layers' parameters in the compute dtype
    (FSDP2's), and the value tables' optimizer; `run(phase)` trains them one step on
    inputs of the config's shape, calling `phase(name)` as it enters forward, backward and
    optimizer. Built on the meta device; `materialise(device)` gives it storage (under
    FakeTensorMode: none)."""

    def __init__(self, cfg, meshes, kernel: str):
        from lingua_mem.config import model_args
        from lingua_mem.model.llama import build_model
        from lingua_mem.parallel.memory_parallel import ShardedValueTable

        self.cfg = cfg
        model = build_model(model_args(cfg.model, cfg.memory, cfg.moe), "meta", kernel=kernel)
        dtype = lambda name: torch.bfloat16 if name == "bf16" else torch.float32  # noqa: E731
        self.dtype = dtype(cfg.distributed.compute_dtype)
        values = dtype(value_dtype(cfg.memory.value_compute_dtype, cfg.distributed))
        self.tables = {key: ShardedValueTable(table, meshes.memory, values,
                                              dtype(cfg.distributed.value_reduce_dtype))
                       for key, table in model.values.items()}
        self.layers = [(model.layers[i].feed_forward, self.tables[model.value_key[i]])
                       for i in cfg.memory.layers]
        for layer, _ in self.layers:  # FSDP2's parameters in compute dtype (a query BatchNorm's fp32)
            layer.to(self.dtype)
            if layer.query_bn is not None:
                layer.query_bn.float()

    def materialise(self, device: str = "cpu", seed: int = 0, fused: bool | None = None) -> None:
        from lingua_mem.optim import build_memory_adamw
        from lingua_mem.param_init import ParamInit

        cfg = self.cfg
        init = ParamInit(seed)
        for layer, _ in self.layers:
            layer.to_empty(device=device)
        for table in self.tables.values():
            table.to_empty(device=device)
        if device != "meta" and not _fake():
            for layer, _ in self.layers:
                layer.init_weights(init, 0.02)
            for table in self.tables.values():
                table.init_weights(init)
        row_update = None if cfg.optim.value_optimizer == "adamw" else cfg.optim.value_optimizer
        self.values = [t.weight for t in self.tables.values()]
        group = {"name": "values", "params": self.values, "lr": cfg.optim.value_lr,
                 "weight_decay": cfg.optim.value_weight_decay, "row_update": row_update}
        self.optimizer = build_memory_adamw([group], cfg.optim, fused=fused)
        tokens = cfg.data.batch_size * cfg.data.seq_len
        generator = torch.Generator().manual_seed(seed + 1)
        self.x = [torch.randn(tokens, self.cfg.model.dim, generator=None if _fake() else generator).to(
            device=device, dtype=self.dtype).requires_grad_() for _ in self.layers]

    def run(self, phase=lambda name: None) -> None:
        from lingua_mem.optim import clip_grads

        phase("forward")
        outs = [layer(xi, table) for (layer, table), xi in zip(self.layers, self.x, strict=True)]
        phase("backward")
        torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])
        phase("optimizer")
        for table in self.tables.values():
            dense = not self.optimizer.updates_rows(table.weight)
            self.optimizer.set_row_grad(table.weight, table.take_row_grad(dense=dense))
        clip_grads(self.values, self.cfg.optim.value_clip, self.optimizer)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        for xi in self.x:
            xi.grad = None
        for layer, _ in self.layers:
            layer.zero_grad(set_to_none=True)


def _fake() -> bool:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

    return any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack())


def measure_memory_traffic(cfg, gpus: int = 1, kernel: str = "triton", name: str = "") -> StepTraffic:
    """One training step of `cfg`'s memory layers (forward, backward, the value tables'
    clipping and optimizer step) as rank 0 of `gpus` ranks, at its real shapes, on fake
    tensors and a fake process group (started and destroyed here), op by op. The CUDA path:
    the `kernel` (triton: its ops' declared traffic) and torch's fused AdamW."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lingua_mem.parallel import resolve_dims
    from lingua_mem.parallel.mesh import build_meshes
    from lingua_mem.plan.fake_step import RunReadsInline

    shape = shape_of(cfg, gpus)
    dist.init_process_group("fake", store=dist.HashStore(), rank=0, world_size=gpus)
    try:
        step = MemoryStep(cfg, build_meshes(resolve_dims(cfg.distributed, gpus), "cpu"), kernel)
        with FakeTensorMode(allow_non_fake_inputs=True):
            step.materialise("cpu", fused=True)
            with RunReadsInline():
                step.run()  # the first makes the optimizer's state and fills DTensor's caches
            counter = OpTraffic(declared_traffic())
            with counter, RunReadsInline():
                step.run(lambda name: setattr(counter, "phase", name))
    finally:
        dist.destroy_process_group()
    phases = {p: counter.phases[p] for p in PHASES}
    return StepTraffic(name, gpus, kernel, shape, phases, minimum_bytes(shape))


def tiny(cfg, world: int, kernel: str = "torch"):
    """`cfg`'s memory layers at a tiny shape for `world` ranks, for counting host syncs (their
    number does not depend on the sizes): its layers, tables, value optimizer and value dtypes
    kept, mp where it divides the world (else 1), the bag's `kernel`."""
    from dataclasses import replace

    layers = len(cfg.memory.layers)
    model = replace(cfg.model, dim=32, n_heads=4, n_kv_heads=2, n_layers=layers, vocab_size=64,
                    max_seq_len=16)
    memory = replace(cfg.memory, layers=list(range(layers)), n_keys=16, k_dim=16, v_dim=None, heads=2, knn=4,
                     kernel=kernel)
    mp = cfg.distributed.memory_parallel_size
    dist_cfg = replace(cfg.distributed, memory_parallel_size=mp if world % mp == 0 else 1, dp_shard=-1,
                       dp_replicate=1, device="cpu", compute_dtype="fp32")
    return replace(cfg, model=model, memory=memory, distributed=dist_cfg,
                   data=replace(cfg.data, batch_size=2, seq_len=8))


def _syncs_worker(rank: int, world: int, port: int, cfg, queue) -> None:
    import os

    import torch.distributed as dist

    from lingua_mem.parallel import resolve_dims
    from lingua_mem.parallel.mesh import build_meshes
    from lingua_mem.plan.fake_step import RunReadsInline

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        step = MemoryStep(cfg, build_meshes(resolve_dims(cfg.distributed, world, rank, rank), "cpu"),
                          cfg.memory.kernel)
        step.materialise("cpu")
        step.run()  # the first makes the optimizer's state
        host = [s["step"] for s in step.optimizer.state.values() if "step" in s]
        syncs = HostSyncs(host)
        with syncs, RunReadsInline():
            step.run(lambda name: setattr(syncs, "phase", name))
        if rank == 0:
            queue.put(syncs.by_phase())
    finally:
        dist.destroy_process_group()


def measure_host_syncs(cfg, world: int = 1, kernel: str = "torch") -> dict[str, list[tuple[str, str]]]:
    """The host syncs of one training step of `cfg`'s memory layers (TINY sizes) on rank 0 of
    `world` real gloo processes, by phase: {phase: [(op, where), ...]}. `kernel` triton runs
    in Triton's interpreter (TRITON_INTERPRET=1 in the environment)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    small = tiny(cfg, world, kernel)
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_syncs_worker, args=(world, port, small, queue), nprocs=world, join=True,
                       start_method="spawn")
    return queue.get()
