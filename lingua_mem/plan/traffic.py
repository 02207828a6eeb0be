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
costs twice. This is a model of HBM traffic, not a measurement; plan/memory_step.py runs a
config's memory layers under it, and `benchmarks/memory_traffic.py` prints the result beside
the minimum a step must move (docs/performance.md).

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
    idx = [i for i in args[1] if i is not None]
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


def declared_traffic() -> dict:
    """The traffic every custom op of the project declares (op -> fn)."""
    from lingua_mem.kernels import triton_available

    if not triton_available():
        return {}
    from lingua_mem.kernels.triton_bag import TRAFFIC

    return TRAFFIC


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
        if rule is default_traffic:
            read, written = rule(func, args, kwargs, out)
        else:
            read, written = rule(args, kwargs, out)
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
