"""A plan: what one GPU of a layout holds and moves in a training step, whether it fits, and
how fast the step could at best be.

The bytes come from a fake step (fake_step.py). The step-time bound assumes everything
overlaps perfectly: the step takes at least its matmul FLOPs at the GPU's dense peak, its
op-written bytes at the HBM bandwidth, and its collectives' ring traffic at NVLink (groups
inside a node) or the per-GPU network link (groups spanning nodes), whichever is longest.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from lingua_mem.config import AC_MODES, TrainConfig
from lingua_mem.plan.fake_step import Collective, StepMeasure, measure_step
from lingua_mem.plan.hardware import HEADROOM, Accelerator, GiB, accelerator


def wire_bytes(c: Collective) -> float:
    """Bytes each rank sends in a ring over the step: (n-1)/n of the buffer, twice for an
    all-reduce (reduce-scatter then all-gather), the whole buffer for a broadcast."""
    if c.size == 1:
        return 0.0
    if c.op == "broadcast":
        return float(c.bytes)
    factor = 2.0 if c.op == "all_reduce" else 1.0
    return factor * c.bytes * (c.size - 1) / c.size


@dataclass
class Plan:
    name: str
    nodes: int
    gpus_per_node: int
    rank: int
    gpu: Accelerator
    cfg: TrainConfig
    step: StepMeasure

    @property
    def world(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def states(self) -> int:
        s = self.step
        return sum(s.params.values()) + sum(s.grads.values()) + sum(s.optimizer.values())

    @property
    def budget(self) -> int:
        return int(self.gpu.memory_bytes * (1 - HEADROOM))

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.budget

    def _scale(self, c: Collective) -> float:
        """Collectives per optimizer step from the measured micro-batches: all but the
        data-parallel gradient reduction repeat with every micro-batch."""
        once = c.op in ("reduce_scatter", "all_reduce") and c.group != "mp"
        return 1.0 if once else self.cfg.optim.grad_accum / self.step.micro_batches

    def link_seconds(self) -> dict[str, float]:
        out = {"nvlink": 0.0, "network": 0.0}
        for c in self.step.collectives:
            link = "network" if c.spans_nodes else "nvlink"
            bandwidth = self.gpu.network_bytes_per_s if c.spans_nodes else self.gpu.nvlink_bytes_per_s
            out[link] += wire_bytes(c) * self._scale(c) / bandwidth
        return out

    @property
    def peak_flops(self) -> float:
        return self.gpu.bf16_flops if self.cfg.distributed.compute_dtype == "bf16" else self.gpu.tf32_flops

    def bound_seconds(self) -> dict[str, float]:
        per_step = self.cfg.optim.grad_accum / self.step.micro_batches
        out = {"compute": self.step.flops * per_step / self.peak_flops,
               "hbm": self.step.written * per_step / self.gpu.hbm_bytes_per_s}
        out.update(self.link_seconds())
        return out

    @property
    def step_seconds(self) -> float:
        return max(self.bound_seconds().values())

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.step.tokens / self.step_seconds

    def layout(self) -> str:
        d, mp = self.cfg.distributed, self.cfg.distributed.memory_parallel_size
        dp_shard = d.dp_shard if d.dp_shard != -1 else self.world // d.dp_replicate
        return (f"{self.nodes} x {self.gpus_per_node} {self.gpu.name} (world {self.world}: dp_replicate "
                f"{d.dp_replicate} x dp_shard {dp_shard}, mp {mp}), activation checkpointing "
                f"{d.activation_checkpointing}, micro-batch {self.cfg.data.batch_size} x "
                f"{self.cfg.data.seq_len}" + (f", grad_accum {self.cfg.optim.grad_accum}"
                                              if self.cfg.optim.grad_accum > 1 else ""))

    def verdict(self) -> str:
        """One line: the peak against the budget."""
        word = "fits" if self.fits else "does not fit"
        return (f"{self.name}: peak {self.step.peak / GiB:.1f} GiB per GPU {word} in "
                f"{self.budget / GiB:.1f} GiB ({HEADROOM:.0%} headroom) on {self.layout()}")

    def value_reads(self) -> dict:
        """A step's value-table reads: each read (a memory layer's, per micro-batch) pools the mp
        group's tokens' `reads` row reads; the rows' owners (R = world / mp of them) bag at most
        `rows` distinct rows each (every read taken as distinct, at most the shard's rows) and
        return `bags` partial bags (one per token and owner it reads). `traffic`: the bytes
        routed over mp_replicate a step (reads, weights, partial bags and their gradients),
        which grows with the tokens and reads, not with the table."""
        cfg = self.cfg
        mp = cfg.distributed.memory_parallel_size
        owners, m = self.world // mp, cfg.memory.heads * cfg.memory.knn
        tokens = mp * cfg.data.batch_size * cfg.data.seq_len
        routed = [c for c in self.step.collectives
                  if c.op == "all_to_all" and "mp_replicate" in c.group.split("/")]
        return {"per_step": len(cfg.memory.layers) * cfg.optim.grad_accum, "reads": tokens * m,
                "rows": min(tokens * m, -(-cfg.memory.n_keys**2 // owners)), "bags": tokens * min(m, owners),
                "traffic": sum(c.bytes * self._scale(c) for c in routed)}

    def to_dict(self) -> dict:
        s = self.step
        return {
            "config": self.name, "gpu": self.gpu.name, "nodes": self.nodes,
            "gpus_per_node": self.gpus_per_node,
            "rank": self.rank, "layout": self.layout(),
            "params": s.params, "grads": s.grads, "optimizer": s.optimizer,
            "value_shards": {k: {"rows": r, "columns": c, "dtype": t}
                             for k, (r, c, t) in s.value_shards.items()},
            "value_reads": self.value_reads(),
            "activations": s.activations, "peak": s.peak, "peak_by_kind": s.peak_by_kind,
            "budget": self.budget, "fits": self.fits,
            "flops": s.flops, "written": s.written, "tokens": s.tokens,
            "collectives": [{**c.__dict__, "wire_bytes": wire_bytes(c) * self._scale(c)}
                            for c in s.collectives],
            "bound_seconds": self.bound_seconds(), "step_seconds": self.step_seconds,
            "tokens_per_s_per_gpu": self.tokens_per_s_per_gpu,
        }


def make_plan(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: str = "h100", rank: int = 0) -> Plan:
    device = accelerator(gpu)  # a bad name fails before the step is run
    step = measure_step(cfg, nodes, gpus_per_node, rank)
    return Plan(cfg.name, nodes, gpus_per_node, rank, device, cfg, step)


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def format_plan(plan: Plan) -> str:
    s, lines = plan.step, []
    lines.append(f"plan: {plan.name} on {plan.layout()}; rank {plan.rank}")
    lines.append(f"  compute {plan.cfg.distributed.compute_dtype}, value tables read in "
                 f"{plan.cfg.memory.value_compute_dtype}, grad_accum {plan.cfg.optim.grad_accum}")
    lines.append("per GPU                                   GiB")
    states = (("parameters", s.params), ("gradients", s.grads), ("optimizer state", s.optimizer))
    for label, by_dtype in states:
        for dtype, n in sorted(by_dtype.items()):
            lines.append(f"  {label:<18} {dtype:<12} {_gib(n)}")
    for key, (rows, cols, dtype) in s.value_shards.items():
        lines.append(f"  value table {key}: {rows} rows x {cols} columns {dtype} on this GPU "
                     f"({rows * cols * (2 if dtype == 'bfloat16' else 4) / GiB:.2f} GiB of the parameters)")
    if s.value_shards and plan.cfg.memory.layers:
        v = plan.value_reads()
        lines.append(f"  value reads: {v['per_step']} a step, each {v['reads']:,} row reads bagged by their "
                     f"owners on at most {v['rows']:,} distinct rows each (the bound: no row read twice), "
                     f"{v['bags']:,} partial bags; routed over mp_replicate: "
                     f"{v['traffic'] / GiB:.2f} GiB a step")
    lines.append(f"  activations (fake tensors, live at the forward's end)  {_gib(s.activations)}")
    lines.append(f"  peak (FSDPMemTracker over the fake step)  {_gib(s.peak)}   "
                 f"{'FITS' if plan.fits else 'DOES NOT FIT'} in {plan.budget / GiB:.1f} of "
                 f"{plan.gpu.memory_bytes / GiB:.1f} GiB ({HEADROOM:.0%} headroom)")
    by_size = sorted(s.peak_by_kind.items(), key=lambda kv: -kv[1])
    kinds = ", ".join(f"{k.lower()} {v / GiB:.2f}" for k, v in by_size if v >= GiB / 100)
    lines.append(f"    at the peak: {kinds}")
    lines.append("communication per step   group          ranks  buffer GiB  sent GiB  link")
    for c in s.collectives:
        if c.bytes < 2**20:
            continue
        link = "network" if c.spans_nodes else "nvlink"
        lines.append(f"  {c.op:<22} {c.group:<14} {c.size:>5} {_gib(c.bytes * plan._scale(c))}  "
                     f"{_gib(wire_bytes(c) * plan._scale(c))}  {link}")
    b = plan.bound_seconds()
    per_step = plan.cfg.optim.grad_accum / s.micro_batches
    lines.append(f"step time lower bound (all overlapped): {plan.step_seconds:.3f} s = max of")
    lines.append(f"  compute {b['compute']:.3f} s ({s.flops * per_step / 1e12:.0f} TFLOP at "
                 f"{plan.peak_flops / 1e12:.0f} TFLOP/s {plan.cfg.distributed.compute_dtype})")
    lines.append(f"  HBM     {b['hbm']:.3f} s ({s.written * per_step / 1e9:.0f} GB written by ops at "
                 f"{plan.gpu.hbm_bytes_per_s / 1e12:.2f} TB/s)")
    lines.append(f"  NVLink  {b['nvlink']:.3f} s ({plan.gpu.nvlink_bytes_per_s / 1e9:.0f} GB/s), "
                 f"network {b['network']:.3f} s ({plan.gpu.network_bytes_per_s / 1e9:.0f} GB/s per GPU)")
    lines.append(f"  -> at most {plan.tokens_per_s_per_gpu:,.0f} tokens/s per GPU "
                 f"({s.tokens} tokens per GPU per step)")
    return "\n".join(lines)


def _with(cfg: TrainConfig, **distributed) -> TrainConfig:
    return replace(cfg, distributed=replace(cfg.distributed, **distributed))


def candidate_layouts(cfg: TrainConfig, nodes: int, gpus_per_node: int, max_nodes: int | None = None):
    """(nodes, cfg) in the order a user would try them, each change kept for the next: more
    activation checkpointing (selective, then full), more memory parallelism (doubled up to
    the world), halved micro-batches (grad_accum doubled: the same tokens per step), then
    twice the nodes (up to `max_nodes`, default 4x)."""
    n, c = nodes, cfg
    for ac in AC_MODES[AC_MODES.index(c.distributed.activation_checkpointing) + 1:]:
        c = _with(c, activation_checkpointing=ac)
        yield n, c
    v_dim, world = c.memory.v_dim or c.model.dim, n * gpus_per_node
    mp = c.distributed.memory_parallel_size * 2
    while c.memory.layers and mp <= world and world % mp == 0 and v_dim % mp == 0:
        c = _with(c, memory_parallel_size=mp)
        yield n, c
        mp *= 2
    while c.data.batch_size > 1 and c.data.batch_size % 2 == 0:
        c = replace(c, data=replace(c.data, batch_size=c.data.batch_size // 2),
                    optim=replace(c.optim, grad_accum=c.optim.grad_accum * 2))
        yield n, c
    while n * 2 <= (max_nodes or 4 * nodes):
        n *= 2
        yield n, c


def nearest_fit(cfg: TrainConfig, nodes: int, gpus_per_node: int, gpu: str = "h100",
                max_nodes: int | None = None) -> Plan | None:
    """The first candidate layout (candidate_layouts) whose plan fits, or None."""
    for n, candidate in candidate_layouts(cfg, nodes, gpus_per_node, max_nodes):
        plan = make_plan(candidate, n, gpus_per_node, gpu)
        if plan.fits:
            return plan
    return None
