"""One training step of a config at a layout, run on no hardware.

A fake process group of the layout's world size (torch's "fake" backend: every collective
returns at once, nothing is sent) stands in for the ranks, and FakeTensorMode for the
memory: the model is built on the meta device, parallelized by the real `parallelize()`,
materialised as fake tensors and trained one step by the real `train_step` (AdamW, clipping,
FSDP2's all-gathers and reduce-scatters, memory parallelism's all-gather and all-to-alls, the
value tables' routed reads). Fake tensors have no values, so a routed read takes every read
to be a distinct row (parallel/memory_parallel.py): its traffic and buffers are the most a
step can need.
Nothing is computed or allocated; what the step would hold and move is recorded:

  states       this rank's parameter, gradient and optimizer-state bytes, by dtype
  peak         the live bytes at the step's high point (torch's FSDPMemTracker), by kind
  activations  the bytes live at the end of the model's forward, kept for backward
  flops        of every matmul and attention (FlopCounterMode), this rank's share
  written      the bytes every op writes: a floor on HBM traffic (eager, unfused)
  collectives  each collective's process group and buffer bytes

The step is run twice and the second one measured: the first fills DTensor's sharding
cache, whose own fake tensors (of whole, unsharded shapes) are not the step's memory.
Attention runs as plain causal scaled_dot_product_attention (the fake CPU picks the flash
kernel: q, k, v, output and log-sum-exp saved, as flash, flex and xformers on a GPU); a
document mask's own few bytes are not counted. The value bag runs the torch kernel.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from lingua_mem.config import TrainConfig, model_args
from lingua_mem.errors import ConfigError
from lingua_mem.finetune.modes import MODES, build_finetune, build_model_as_trained
from lingua_mem.optim import build_optimizer, split_params
from lingua_mem.parallel import parallelize, resolve_dims
from lingua_mem.parallel.memory_parallel import ROUTED_READ_IMPLS
from lingua_mem.parallel.mesh import Meshes, build_meshes
from lingua_mem.train.step import train_step

aten = torch.ops.aten

# collectives by op name: the factor of the buffer each rank sends over its links in a
# ring (n ranks): all-gather, reduce-scatter and all-to-all (n-1)/n, all-reduce 2(n-1)/n
_COLLECTIVES = {
    "_allgather_base_": "all_gather", "allgather_": "all_gather", "all_gather_into_tensor": "all_gather",
    "allgather_into_tensor_coalesced_": "all_gather",
    "_reduce_scatter_base_": "reduce_scatter", "reduce_scatter_": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter", "reduce_scatter_tensor_coalesced_": "reduce_scatter",
    "allreduce_": "all_reduce", "all_reduce": "all_reduce", "allreduce_coalesced_": "all_reduce",
    "alltoall_base_": "all_to_all", "all_to_all_single": "all_to_all",
    "broadcast_": "broadcast", "broadcast": "broadcast",
}
# ops that allocate or alias without writing a byte
_NO_WRITE = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "resize_",
             "set_", "lift_fresh", "alias"}


@dataclass
class Collective:
    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | broadcast
    group: str  # the mesh dimension it runs over: dp_shard, dp_replicate, mp, mp_replicate, world
    size: int  # ranks in the group
    spans_nodes: bool
    bytes: int = 0  # buffer bytes over the step (the gathered / unscattered size)
    calls: int = 0


@dataclass
class StepMeasure:
    params: dict[str, int]  # dtype -> bytes of this rank's parameter shards
    grads: dict[str, int]  # dtype -> bytes of its sharded gradients (trainable parameters)
    optimizer: dict[str, int]  # dtype -> bytes of its optimizer state
    value_shards: dict[str, tuple[int, int, str]]  # table -> (rows, columns, dtype) on this rank
    activations: int
    peak: int
    peak_by_kind: dict[str, int]
    flops: float
    written: int
    tokens: int  # this rank's tokens per optimizer step
    micro_batches: int  # measured (the step's, up to 2: the others repeat the second)
    collectives: list[Collective] = field(default_factory=list)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _bytes_by_dtype(tensors) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for t in tensors:
        t = _local(t)
        out[str(t.dtype).removeprefix("torch.")] += t.numel() * t.element_size()
    return dict(out)


def held_states(model, optimizer) -> tuple[dict, dict, dict]:
    """(params, grads, optimizer state) bytes by dtype that this rank holds between steps
    (gradients: one per trainable parameter shard, as after the backward, but for the value
    tables': theirs are the rows read, held from their backward to the step: in the peak)."""
    params = list(model.parameters())
    tables = {id(p) for table in model.value_tables() for p in table.parameters()}
    state = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    grads = [p for p in params if p.requires_grad and id(p) not in tables]
    return _bytes_by_dtype(params), _bytes_by_dtype(grads), _bytes_by_dtype(state)


def _group_names(meshes: Meshes) -> dict[str, str]:
    """Process group name -> the mesh dimensions it serves ("dp_shard", "dp_shard/mp" when
    one group serves two dimensions of the same ranks)."""
    names: dict[str, list[str]] = defaultdict(list)
    for mesh in (meshes.dense, meshes.memory):
        for dim in mesh.mesh_dim_names:
            names[mesh[dim].get_group().group_name].append(dim)
    names.setdefault(dist.group.WORLD.group_name, ["world"])
    return {group: "/".join(dims) for group, dims in names.items()}


class StepCounter(TorchDispatchMode):
    """Tallies the bytes ops write and the collectives they issue (local tensors: a DTensor
    op is let through to come back as its local ops)."""

    def __init__(self, meshes: Meshes, gpus_per_node: int):
        super().__init__()
        self.names, self.gpus_per_node = _group_names(meshes), gpus_per_node
        self.written = 0
        self.collectives: dict[tuple[str, str], Collective] = {}

    def _group(self, args) -> dist.ProcessGroup | None:
        for a in args:
            if isinstance(a, dist.ProcessGroup):
                return a
            if isinstance(a, torch.ScriptObject):  # a c10d op's group, boxed
                return dist.ProcessGroup.unbox(a)
            if isinstance(a, str):
                try:
                    return dist.distributed_c10d._resolve_process_group(a)
                except Exception:  # noqa: BLE001 - not a group name
                    continue
        return None

    def _record(self, kind: str, args, out) -> None:
        group = self._group(args)
        if group is None:
            return
        tensors = [t for t in tree_flatten((args, out))[0] if isinstance(t, torch.Tensor)]
        if kind == "all_reduce":  # its buffers are its inputs (updated in place)
            size = sum(t.numel() * t.element_size() for t in tree_flatten(args[0])[0])
        else:  # the gathered output, or the input to scatter: the largest buffer of the call
            size = max((t.numel() * t.element_size() for t in tensors), default=0)
        name = self.names.get(group.group_name, group.group_name)
        ranks = dist.get_process_group_ranks(group)
        entry = self.collectives.setdefault((kind, name), Collective(
            kind, name, len(ranks), len({r // self.gpus_per_node for r in ranks}) > 1))
        entry.bytes += size
        entry.calls += 1

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if func.namespace in ("c10d", "_c10d_functional"):
            if name in _COLLECTIVES:
                self._record(_COLLECTIVES[name], args, out)
        elif not func.is_view and name not in _NO_WRITE:
            self.written += sum(t.numel() * t.element_size() for t in tree_flatten(out)[0]
                                if isinstance(t, torch.Tensor))
        return out


class RunReadsInline(TorchDispatchMode):
    """Runs a value table's routed read and its backward (custom ops: under fake tensors their
    fake kernels would say only the output's shape) as their Python, so that the modes below
    this one see every buffer and collective of the routing. Entered last (innermost)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        impl = ROUTED_READ_IMPLS.get(func, func)
        return impl(*args, **(kwargs or {}))


def _attention_flops(query, key, backward=False):
    # flash attention on the fake CPU (not in FlopCounterMode's table): QK^T and PV, 2 FLOPs a
    # multiply-add, in full (no causal saving: the MFU convention); backward twice forward
    b, h, s_q, d = query if isinstance(query, torch.Size) else query.shape
    s_k = (key if isinstance(key, torch.Size) else key.shape)[2]
    forward = 4 * b * h * s_q * s_k * d
    return 2 * forward if backward else forward


def _flop_counter() -> FlopCounterMode:
    def fwd(query, key, value, *args, **kwargs):
        return _attention_flops(query, key)

    def bwd(grad_out, query, key, value, *args, **kwargs):
        return _attention_flops(query, key, backward=True)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: fwd,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: bwd})


def _kind_name(kind) -> str:
    return getattr(kind, "value", str(kind))


def measure_step(cfg: TrainConfig, nodes: int, gpus_per_node: int, rank: int = 0) -> StepMeasure:
    """Run one step of `cfg` as rank `rank` of nodes x gpus_per_node ranks on a fake process
    group (started and destroyed here: this process must have none of its own)."""
    world = nodes * gpus_per_node
    if not 0 <= rank < world:
        raise ConfigError(f"rank: {rank} is not a rank of {world}")
    finetune = build_finetune(cfg.finetune)  # lora: the adapters' parameters
    if not finetune.planned:
        covered = ", ".join(name for name, mode in MODES.items() if mode.planned)
        raise ConfigError(f"finetune.mode: the plan covers {covered}, not {cfg.finetune.mode}")
    if cfg.moe.layers:  # fake tensors have no values to count tokens by
        raise ConfigError("moe.layers: the plan does not cover mixtures of experts (each expert's tokens "
                          "are counted from the routing, a value fake tensors do not have)")
    if dist.is_initialized():
        raise RuntimeError("measure_step starts its own (fake) process group; this process has one")
    dims = resolve_dims(cfg.distributed, world, rank, rank % gpus_per_node)
    # plain causal attention (see above); compile does not change what a step holds
    cfg = replace(cfg, model=replace(cfg.model, attention="causal", attention_impl="sdpa"),
                  distributed=replace(cfg.distributed, compile=False))
    dist.init_process_group("fake", store=dist.HashStore(), rank=rank, world_size=world)
    try:
        meshes = build_meshes(dims, "cpu")
        model = build_model_as_trained(model_args(cfg.model, cfg.memory), finetune, kernel="torch",
                                       attention_impl="sdpa")
        model = parallelize(model, meshes, cfg.distributed, cfg.memory.value_compute_dtype)
        with FakeTensorMode(allow_non_fake_inputs=True):
            return _measure(cfg, model, finetune, meshes, gpus_per_node)
    finally:
        dist.destroy_process_group()


def _measure(cfg: TrainConfig, model, finetune, meshes: Meshes, gpus_per_node: int) -> StepMeasure:
    model.to_empty(device="cpu")  # fake tensors: shapes and dtypes, no data (none is read)
    optimizer = finetune.build_optimizer(model, cfg.optim) or build_optimizer(model, cfg.optim)
    dense, values = split_params(model)
    b, t = cfg.data.batch_size, cfg.data.seq_len
    micro = min(cfg.optim.grad_accum, 2)
    batches = [{"inputs": torch.zeros(b, t, dtype=torch.long), "targets": torch.zeros(b, t, dtype=torch.long)}
                for _ in range(micro)]
    with RunReadsInline():
        train_step(model, optimizer, batches, cfg.optim, dense, values)  # warm-up (sharding cache)

    tracker = FSDPMemTracker(mod=model, optm=optimizer)
    tracker.track_inputs(tuple(x["inputs"] for x in batches))
    at_forward_end = []
    counter, flops = StepCounter(meshes, gpus_per_node), _flop_counter()
    with tracker, flops, counter, RunReadsInline():
        # registered once the tracker is on (it re-registers FSDP's forward hooks first in line):
        # each micro-batch is a new forward of every module to the tracker, which refuses a
        # second one otherwise; the peak is kept over the whole step
        hooks = [model.register_forward_pre_hook(lambda *_: tracker.reset_mod_stats(), prepend=True),
                 model.register_forward_hook(
                     lambda *_: at_forward_end.append(tracker.get_tracker_snapshot()))]
        try:
            train_step(model, optimizer, batches, cfg.optim, dense, values)
        finally:
            for hook in hooks:
                hook.remove()
    device = torch.device("cpu")
    peak = tracker.get_tracker_snapshot("peak")[device]
    first_forward = at_forward_end[0][device]
    activations = sum(v for k, v in first_forward.items() if _kind_name(k) in ("Activation", "Temp"))
    params, grads, state = held_states(model, optimizer)
    shards = {key: (*_local(table.weight).shape, str(_local(table.weight).dtype).removeprefix("torch."))
              for key, table in model.values.items()}
    return StepMeasure(
        params=params, grads=grads, optimizer=state, value_shards=shards, activations=activations,
        peak=peak["Total"], peak_by_kind={_kind_name(k): v for k, v in peak.items() if k != "Total"},
        flops=float(flops.get_total_flops()), written=counter.written,
        tokens=b * t * cfg.optim.grad_accum, micro_batches=micro,
        collectives=sorted(counter.collectives.values(), key=lambda c: (c.group, c.op)))
