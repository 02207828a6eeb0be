"""What a memory layer's step moves through device memory, counted without a device, and the
host syncs it makes.

OpTraffic is a dispatch mode that tallies, op by op, the bytes each op reads and writes at its
real shapes (fake tensors have shapes and no values, so a config's real sizes cost nothing):

  default       every tensor argument read whole, every output written whole; an argument the
                op mutates (its schema's `a!`) written whole, and read too unless the op only
                writes it (copy_, fill_, zero_, an out= argument)
  indexing      index_select, embedding, embedding_bag and their backwards, index_add_,
                index_copy_, index_put_, gather, scatter: the rows they index, not the table
  sort, unique  a radix sort's passes: key bits / 8 passes, each reading and writing the keys
                and their positions (so an int64 key costs twice an int32 one)
  declared      ops whose insides the mode cannot see (custom ops, Triton kernels) declare
                their traffic from their arguments: a dict op -> fn(args, kwargs, out) ->
                (read, written), such as kernels.triton_bag.TRAFFIC

Everything is eager and unfused, and nothing is assumed to stay in a cache: a row read twice
costs twice. This is a model of HBM traffic, not a measurement; `benchmarks/memory_traffic.py`
prints it beside the minimum a step must move (docs/performance.md).

HostSyncs counts, by construction, the calls that make the host wait for the device when their
input is on one: a scalar read (`.item()`, `bool()`), `.tolist()`, a copy to the host, and every
op whose output is sized by the data (unique, nonzero, bincount, masked_select, ...). On the CPU
nothing waits; the count is what a GPU run would wait for. Tensors made on the host from Python
data (torch.tensor), those named as host tensors and whatever is computed from them alone stay
on the host: reading them is no wait.
"""

from __future__ import annotations

import traceback
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

aten = torch.ops.aten


def nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _tensors(x) -> list[torch.Tensor]:
    return [t for t in tree_flatten(x)[0] if isinstance(t, torch.Tensor)]


# a gathered source this small stays in the GPU's L2 cache (50 MB on an H100): read once
L2_BYTES = 25 * 2**20


def _gathered(n: int, src: torch.Tensor, dim: int = 0) -> int:
    """Bytes of n rows gathered from src (its size at most once when it fits in L2)."""
    rows = n * _row_bytes(src, dim)
    return min(rows, nbytes(src)) if nbytes(src) <= L2_BYTES else rows


def _row_bytes(t: torch.Tensor, dim: int = 0) -> int:
    """Bytes of one index along `dim` of t (a row of a table)."""
    return nbytes(t) // max(1, t.shape[dim]) if t.dim() else t.element_size()


def _sort_passes(keys: torch.Tensor) -> int:
    """A radix sort's passes over keys of this dtype (8 bits a pass, floats as their bits)."""
    return max(1, keys.element_size())


def _sort(args, kwargs, out):
    keys = args[0]
    positions = keys.numel() * 8  # int64 positions travel with the keys
    per_pass = nbytes(keys) + positions
    passes = _sort_passes(keys)
    return passes * per_pass, passes * per_pass


def _unique(args, kwargs, out):
    # a sort (with positions when an inverse is asked), then a pass marking each run's start, a
    # scan, and the outputs written
    read, written = _sort(args, kwargs, out)
    keys = args[0]
    return read + 2 * nbytes(keys), written + nbytes(keys) + sum(nbytes(t) for t in _tensors(out))


def _index_select(args, kwargs, out):
    src, dim, index = args[0], args[1], args[2]
    return _gathered(index.numel(), src, dim) + nbytes(index), nbytes(out)


def _embedding(args, kwargs, out):
    weight, indices = args[0], args[1]
    return _gathered(indices.numel(), weight) + nbytes(indices), nbytes(out)


def _embedding_bag(args, kwargs, out):
    weight, indices, offsets = args[0], args[1], args[2]
    psw = args[7] if len(args) > 7 else kwargs.get("per_sample_weights")
    read = _gathered(indices.numel(), weight) + nbytes(indices) + nbytes(offsets) + nbytes(psw)
    return read, sum(nbytes(t) for t in _tensors(out))


def _embedding_bag_dense_backward(args, kwargs, out):
    # grad (S, D), indices (K,), offset2bag (K,), ...: each read's bag gradient read, its row of
    # the (num_weights, D) output added to (the output zeroed whole first)
    grad, indices, offset2bag = args[0], args[1], args[2]
    row = _row_bytes(out)
    touched = min(indices.numel(), out.shape[0])
    read = indices.numel() * _row_bytes(grad) + nbytes(indices) + nbytes(offset2bag)
    if nbytes(out) <= L2_BYTES:  # a small gradient is summed in L2
        return read, nbytes(out)
    return read + touched * row, nbytes(out) + touched * row


def _per_sample_weights_backward(args, kwargs, out):
    grad, weight, indices = args[0], args[1], args[2]
    k = indices.numel()
    return k * _row_bytes(grad) + _gathered(k, weight) + 3 * nbytes(indices), nbytes(out)


def _index_add(args, kwargs, out):
    self, dim, index, source = args[0], args[1], args[2], args[3]
    rows = index.numel() * _row_bytes(self, dim)
    return nbytes(source) + nbytes(index) + rows, rows


def _index_copy(args, kwargs, out):
    self, dim, index, source = args[0], args[1], args[2], args[3]
    return nbytes(source) + nbytes(index), index.numel() * _row_bytes(self, dim)


def _index_put(args, kwargs, out):
    self, indices, values = args[0], args[1], args[2]
    idx = [i for i in indices if i is not None]
    n = idx[0].numel() if idx else 1
    accumulate = (args[3] if len(args) > 3 else kwargs.get("accumulate", False))
    rows = n * _row_bytes(self)
    return nbytes(values) + sum(nbytes(i) for i in idx) + (rows if accumulate else 0), rows


def _index_tensor(args, kwargs, out):
    self, indices = args[0], args[1]
    idx = [i for i in indices if i is not None]
    return nbytes(out) + sum(nbytes(i) for i in idx), nbytes(out)


def _gather(args, kwargs, out):
    index = args[2]
    return nbytes(out) + nbytes(index), nbytes(out)


def _scatter(args, kwargs, out):
    self, index, src = args[0], args[2], args[3]
    n = index.numel() * self.element_size()
    src_bytes = nbytes(src) if isinstance(src, torch.Tensor) else 0
    return src_bytes + nbytes(index) + n, n


def _fused_adamw(args, kwargs, out):
    # params, grads, exp_avgs, exp_avg_sqs read; params and both moments written (the grads,
    # marked mutable for a grad scale, are not written)
    params, grads, avgs, sqs = (args[i] for i in range(4))
    size = sum(nbytes(t) for t in params)
    grad = sum(nbytes(t) for t in grads)
    moments = sum(nbytes(t) for t in avgs) + sum(nbytes(t) for t in sqs)
    return size + grad + moments, size + moments


INDEXING = {
    aten._fused_adamw_.default: _fused_adamw,
    aten.index_select.default: _index_select,
    aten.embedding.default: _embedding,
    aten._embedding_bag.default: _embedding_bag,
    aten._embedding_bag_forward_only.default: _embedding_bag,
    aten._embedding_bag_dense_backward.default: _embedding_bag_dense_backward,
    aten._embedding_bag_per_sample_weights_backward.default: _per_sample_weights_backward,
    aten.index_add_.default: _index_add,
    aten.index_add.default: _index_add,
    aten.index_copy_.default: _index_copy,
    aten.index_copy.default: _index_copy,
    aten.index_put_.default: _index_put,
    aten._index_put_impl_.default: _index_put,
    aten.index.Tensor: _index_tensor,
    aten.gather.default: _gather,
    aten.scatter_add_.default: _scatter,
    aten.scatter_.src: _scatter,
    aten.scatter_.value: _scatter,
    aten.scatter.src: _scatter,
    aten.scatter_add.default: _scatter,
    aten.sort.default: _sort,
    aten.sort.stable: _sort,
    aten._unique2.default: _unique,
    aten.unique_consecutive.default: _unique,
}
# ops that only write what they mutate (their destination's old values are not read)
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "index_fill_"}
# ops that write their output without reading their tensor arguments (only their shape)
_SHAPE_ONLY = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full",
               "rand_like", "randn_like"}
# ops that allocate, alias or move nothing
_FREE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_", "set_",
         "lift_fresh", "alias", "detach", "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel"}


def default_traffic(func, args, kwargs, out) -> tuple[int, int]:
    """Every tensor argument read, every output written; what the op mutates written whole."""
    name = func.overloadpacket.__name__
    if func.is_view or name in _FREE:
        return 0, 0
    if name in _SHAPE_ONLY:
        return 0, sum(nbytes(t) for t in _tensors(out))
    mutated, read = [], 0
    schema = func._schema
    values = list(args) + [kwargs.get(a.name) for a in schema.arguments[len(args):]]
    for arg, value in zip(schema.arguments, values, strict=False):
        tensors = _tensors(value)
        writes = arg.alias_info is not None and arg.alias_info.is_write
        if writes:
            mutated += tensors
        if not writes or (name not in _WRITE_ONLY and not arg.kwarg_only):
            read += sum(nbytes(t) for t in tensors)
    mutated_ids = {id(t) for t in mutated}
    fresh = [t for t in _tensors(out) if id(t) not in mutated_ids]
    return read, sum(nbytes(t) for t in mutated) + sum(nbytes(t) for t in fresh)


@dataclass
class Tally:
    calls: int = 0
    read: int = 0
    written: int = 0

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class PhaseTraffic:
    ops: dict[str, Tally] = field(default_factory=lambda: defaultdict(Tally))

    @property
    def read(self) -> int:
        return sum(t.read for t in self.ops.values())

    @property
    def written(self) -> int:
        return sum(t.written for t in self.ops.values())

    @property
    def bytes(self) -> int:
        return self.read + self.written

    def top(self, n: int = 8) -> list[tuple[str, Tally]]:
        return sorted(self.ops.items(), key=lambda kv: -kv[1].bytes)[:n]


class OpTraffic(TorchDispatchMode):
    """Bytes read and written by every op inside the mode, by phase (set `phase`) and op name.
    `declared`: op -> fn(args, kwargs, out) -> (read, written), for ops whose insides this
    mode does not see (custom ops run by their own kernels)."""

    def __init__(self, declared: dict | None = None):
        super().__init__()
        self.declared = dict(declared or {})
        self.phase = "forward"
        self.phases: dict[str, PhaseTraffic] = defaultdict(PhaseTraffic)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional", "prims", "prim"):
            return out  # collectives move network bytes (the plan counts them), not HBM traffic
        rule = self.declared.get(func) or INDEXING.get(func) or default_traffic
        read, written = rule(args, kwargs, out) if rule is not default_traffic else rule(func, args, kwargs, out)
        tally = self.phases[self.phase].ops[func.overloadpacket.__name__]
        tally.calls += 1
        tally.read += read
        tally.written += written
        return out


# -- host syncs -----------------------------------------------------------------------------

# ops that wait on the device when their input is on one: a scalar read, an output sized by
# the data (bincount: its length is the largest value's)
SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten._unique2.default,
            aten.unique_dim.default, aten.unique_consecutive.default, aten.masked_select.default,
            aten.repeat_interleave.Tensor, aten.equal.default, aten.bincount.default,
            aten.is_nonzero.default}
# tensor methods that copy to the host (on a GPU tensor: a wait)
_HOST_METHODS = ("tolist", "numpy", "cpu")


def _where(frames) -> str:
    ours = [f for f in frames if "/lingua_mem/" in f.filename and not f.filename.endswith("plan/traffic.py")]
    if not ours:
        return "torch"
    return f"{ours[-1].filename.split('/lingua_mem/')[-1]}:{ours[-1].name}"


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, owner: HostSyncs):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        owner = self.owner
        inputs = _tensors((args, kwargs))
        # computed from host tensors alone: on the host too (torch.tensor(python data) is)
        host = bool(inputs) and all(t.data_ptr() in owner.on_host for t in inputs)
        if host or func is aten.lift_fresh.default or func is aten.lift_fresh_copy.default:
            owner.on_host.update(t.data_ptr() for t in _tensors(out))
        elif func in SYNC_OPS and not owner.inside_method:
            sized = func is aten.repeat_interleave.Tensor and kwargs.get("output_size") is not None
            if not sized:
                owner.record(func.__name__)
        return out


class HostSyncs:
    """The calls inside it that would make the host wait for a GPU (see the module's
    docstring), each with the innermost lingua_mem frame that made it: `calls`, a list of
    (op, "file:function"). `host_tensors`: tensors kept on the host on every device (an
    optimizer's step count): reading them is no wait. The copies to the host are seen by
    wrapping Tensor.tolist, .numpy and .cpu while it is entered (torch function modes are off
    inside a dispatch mode's handler, where a custom op's Python runs under RunReadsInline)."""

    def __init__(self, host_tensors=()):
        self.calls: list[tuple[str, str]] = []
        self.phases: list[str] = []  # each call's phase
        self.phase = ""  # set by the caller: what the calls made now belong to
        self.on_host = {t.data_ptr() for t in host_tensors}
        self.inside_method = False
        self._dispatch = _SyncDispatch(self)
        self._saved: dict[str, object] = {}

    def _wrap(self, name: str):
        method = getattr(torch.Tensor, name)

        def wrapped(t, *args, **kwargs):
            if t.data_ptr() not in self.on_host and not self.inside_method:
                self.record(name)
            self.inside_method, before = True, self.inside_method
            try:
                return method(t, *args, **kwargs)
            finally:
                self.inside_method = before

        return method, wrapped

    def __enter__(self):
        for name in _HOST_METHODS:
            self._saved[name], wrapped = self._wrap(name)
            setattr(torch.Tensor, name, wrapped)
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        try:
            return self._dispatch.__exit__(*exc)
        finally:
            for name, method in self._saved.items():
                setattr(torch.Tensor, name, method)
            self._saved.clear()

    def record(self, op: str) -> None:
        self.calls.append((op, _where(traceback.extract_stack())))
        self.phases.append(self.phase)

    def by_phase(self) -> dict[str, list[tuple[str, str]]]:
        out: dict[str, list] = {}
        for phase, call in zip(self.phases, self.calls, strict=True):
            out.setdefault(phase, []).append(call)
        return out

    def by_place(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for op, where in self.calls:
            out[f"{op} {where}"] += 1
        return dict(out)


# -- a config's memory layers, one step, on no hardware ---------------------------------------

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


def value_dtype(cfg) -> str:
    """memory.value_compute_dtype, auto resolved as parallelize() does."""
    chosen = cfg.memory.value_compute_dtype
    return cfg.distributed.compute_dtype if chosen == "auto" else chosen


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
        value_bytes=2 if value_dtype(cfg) == "bf16" else 4,
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


def declared_traffic() -> dict:
    """The traffic every custom op of the project declares (op -> fn)."""
    from lingua_mem.kernels import triton_available

    if not triton_available():
        return {}
    from lingua_mem.kernels.triton_bag import TRAFFIC

    return TRAFFIC


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
        self.tables = {key: ShardedValueTable(table, meshes.memory, dtype(value_dtype(cfg)),
                                              dtype(cfg.distributed.value_reduce_dtype))
                       for key, table in model.values.items()}
        self.layers = [(model.layers[i].feed_forward, self.tables[model.value_key[i]]) for i in cfg.memory.layers]
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
        self.optimizer = build_memory_adamw([{"name": "values", "params": self.values, "lr": cfg.optim.value_lr,
                                              "weight_decay": cfg.optim.value_weight_decay,
                                              "row_update": row_update}], cfg.optim, fused=fused)
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
    return StepTraffic(name, gpus, kernel, shape, {p: counter.phases[p] for p in PHASES}, minimum_bytes(shape))


def tiny(cfg, world: int, kernel: str = "torch"):
    """`cfg`'s memory layers at a tiny shape for `world` ranks, for counting host syncs (their
    number does not depend on the sizes): its layers, tables, value optimizer and value dtypes
    kept, mp where it divides the world (else 1), the bag's `kernel`."""
    from dataclasses import replace

    layers = len(cfg.memory.layers)
    model = replace(cfg.model, dim=32, n_heads=4, n_kv_heads=2, n_layers=layers, vocab_size=64, max_seq_len=16)
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
