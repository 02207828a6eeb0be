"""Value tables sharded by rows and columns and read by routing: no rank ever holds more of a
table than its own shard plus the rows read of it, and the rows' owners bag them.

Layout. A table's weight is a DTensor of the whole (n_values, v_dim) table on the memory
mesh (mp_replicate, mp), placements (Shard(0), Shard(1)): groups of `mp` consecutive ranks
split the columns (rank c of a group holds columns [c * v_dim/mp, (c+1) * v_dim/mp)), and
the ranks holding the same columns in different groups (the "row group", mp_replicate,
the whole world when mp == 1) split the rows in chunks (DTensor's Shard(0): ceil(n/R) rows
each). Initialisation and checkpoints see it as any sharded parameter; FSDP2 does not
manage it.

Forward of one read, for this rank's tokens (indices, weights: (N, M) each):
  1. mp > 1: all-gather indices and weights in the mp group         -> T = mp*N tokens, (T, M)
  2. route (row group R > 1): the reads sorted by owner; a "bag" is one token's reads of one
     owner. The counts (reads, bags) per owner made on the device, all-to-all, read back at
     once with the peers' (a host sync); all-to-all of the reads (local row, weight) and the
     bags' lengths                                                   -> at each owner: K reads in S bags
  3. each owner: its reads sorted by row (distinct_rows: U <= min(K, shard rows) distinct
     rows, their sizes read back at once: a host sync), slots given to the rows new to this
     step's row gradient; the partial bags read straight from its shard (or its readable
     copy in compute dtype): embedding_bag with offsets             -> (S, cols)
  4. the partial bags back to their tokens' ranks (all-to-all), summed per token -> (T, cols)
  5. mp > 1: all-to-all in the mp group: rank p gets its own tokens' columns   -> (N, v_dim)
With one rank in the row group, 2-4 are one bag of (T, M) reads.
What crosses the row group is a token's partial sum per owner, not each row read: at the
paper's 128 reads a token over 8 owners, 16x less than the rows.

Backward mirrors it: the mp all-to-all of the output gradients; each bag's gradient sent to
its owner (in reduce dtype); there the bag's backward runs on the shard, nothing gathered
again (kernels.bag_rows_backward: Triton, a program per segment of one distinct row's
reads): each read's weight gradient, and the rows' gradients, scaled by 1/world (the
data-parallel mean, as every other parameter's gradient), added in fp32 into the table's
row gradient for this step (RowGrads: one buffer, summed over every read of every memory
layer sharing the table in place), taken once a step by `take_row_grad()`; the weights'
gradients (K,) go back to their tokens' ranks, and over mp they are reduce-scattered (a sum
over the column blocks). The table's own `.grad` stays None: the optimizer gets the rows
(optim.py), or for AdamW over every row the shard-shaped gradient.

Compiled. Forward and backward are two custom ops (routed_read, routed_read_backward) on
the table's TableReader, a torch.compile opaque reference: a compiled block holds each read
as one call and has no graph break, whatever the routing does inside (host syncs, variable
splits, the rows' gradients kept on the reader). The forward returns the route as tensors
(sizes the compiler cannot know: unbacked) for its backward; nothing else outlives a read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._library.opaque_object import register_opaque_type
from torch._opaque_base import OpaqueBase
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lingua_mem.kernels.embedding_bag import bag_rows_backward, embedding_bag, resolve_kernel
from lingua_mem.memory.layer import Bag, ValueTable

# newer torch releases renamed the flat-tensor collectives; older ones only have the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor



def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    """(N, ...) per rank -> (ranks*N, ...) in rank order."""
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_flat(out, x.contiguous(), group=group)
    return out


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all of variable row counts: send[q] rows to rank q, recv[q] rows from it."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


def _planned_splits(reads: int, tokens: int, ranks: int) -> tuple[list[int], list[int]]:
    """The plan's routing (fake tensors have no values): reads spread evenly over the owners,
    every token reading each -> (reads, bags) per owner, the same sent and received."""
    sent = [reads // ranks] * ranks
    sent[0] += reads - sum(sent)
    return sent, [min(tokens, k) for k in sent]


@dataclass
class Route:
    """One read's routing (row-group ranks in rank order).

    The asking side, this rank's T tokens of M reads:
      by_owner   (T*M,) the flat reads sorted by owner, by token within an owner; None when
                 the row group is one rank (every read is this rank's own)
      sent[q]    reads sent to owner q;  bags_sent[q]: bags sent to q (its tokens with a read there)
      bag_token  (sum bags_sent,) each bag's token, in the order sent
    The owning side, the reads received:
      got[q]     reads received from rank q;  bags_got[q]: bags received from q
      reads      the shard rows asked of this rank, in their bags' order: (K,), or (T, M) when
                 the row group is one rank
      offsets    (S + 1,) the bags' reads in `reads`; None for (T, M) bags
      rows       (U,) the distinct rows of `reads`, sorted; slots (reads' shape) each read's
                 place among them
      by_row     (K,) the reads sorted by row; segments (G + 1,) by_row cut into runs of at
                 most SEGMENT_READS reads of one row (the Triton backward's programs; None for
                 the torch kernel)
    """

    reads: torch.Tensor
    rows: torch.Tensor
    slots: torch.Tensor
    by_row: torch.Tensor
    segments: torch.Tensor | None = None
    offsets: torch.Tensor | None = None
    by_owner: torch.Tensor | None = None
    bag_token: torch.Tensor | None = None
    sent: list[int] | None = None
    got: list[int] | None = None
    bags_sent: list[int] | None = None
    bags_got: list[int] | None = None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """As tensors, for the read's op to hand its backward: (reads, rows, slots, by_row,
        segments, offsets, by_owner, bag_token, splits (4, R) int64 on the host: sent, got,
        bags_sent, bags_got); empty where absent."""
        maybe = lambda t: self.rows.new_empty(0) if t is None else t  # noqa: E731 (outputs never alias)
        splits = (torch.empty((4, 0), dtype=torch.int64) if self.by_owner is None else
                  torch.tensor([self.sent, self.got, self.bags_sent, self.bags_got], dtype=torch.int64))
        return (self.reads.flatten(), self.rows, self.slots.flatten(), self.by_row, maybe(self.segments),
                maybe(self.offsets), maybe(self.by_owner), maybe(self.bag_token), splits)


class RowGrads:
    """One table shard's gradient over a step: the rows' fp32 gradients summed over every read
    of every memory layer as their backwards run (one accumulation a table a step: a read's
    backward adds its rows' gradients at their slots; nothing is concatenated, deduplicated or
    re-added later). Two layouts:

      sparse  a slot for each distinct row the step's reads asked of this rank, given as the
              reads are made, in the order first read: the slots' gradients (the step's
              distinct rows x columns) and an int32 a shard row; for a row-sparse optimizer
      dense   the slot of a row is the row: a shard-shaped gradient, zeroed once a step, that
              the optimizer takes as the parameter's gradient (no scatter into one); for
              AdamW over every row, which needs one that size anyway

    The layout follows what the last step's taker asked for (`take(dense)`), so a run settles
    into its optimizer's from its second step. Buffers are kept from step to step."""

    def __init__(self, shard_rows: int, cols: int):
        self.shard_rows, self.cols = shard_rows, cols
        self.dense = False
        self.slot_of_row: torch.Tensor | None = None  # (shard_rows,) int32; -1: not read this step
        self.row_of_slot: torch.Tensor | None = None  # (capacity,) int64
        self.grad: torch.Tensor | None = None  # (capacity, cols) fp32
        self.count = 0  # slots given this step (known on the host: no wait)
        self.zeroed = 0  # slots of `grad` zeroed this step
        self.device: torch.device | None = None  # the shard's, from the first read

    def slots_of(self, device: torch.device) -> torch.Tensor:
        if self.slot_of_row is None:
            if self.dense:  # a row's slot is the row
                self.slot_of_row = torch.arange(self.shard_rows, dtype=torch.int32, device=device)
            else:
                self.slot_of_row = torch.full((self.shard_rows,), -1, dtype=torch.int32, device=device)
        return self.slot_of_row

    def new_among(self, sorted_reads: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
        """How many distinct rows of a read (sorted, `first` marking each row's first read)
        have no slot yet, as a device scalar (read back with the read's sizes)."""
        if self.dense:
            return first.new_zeros((), dtype=torch.int64)
        return (first & (self.slots_of(sorted_reads.device)[sorted_reads.long()] < 0)).sum()

    def give_slots(self, rows: torch.Tensor, new: int) -> None:
        """Slots for a read's distinct rows (U,), `new` of which have none yet (host int)."""
        self.device = rows.device
        if self.dense:
            self.count = self.shard_rows
            return
        slot_of_row = self.slots_of(rows.device)
        slots = slot_of_row[rows].long()
        fresh = slots < 0
        slots = torch.where(fresh, self.count + fresh.cumsum(0) - 1, slots)
        slot_of_row[rows] = slots.to(torch.int32)
        self.count += new
        self.row_of_slot = _grown(self.row_of_slot, self.count, (), torch.int64, rows.device)
        self.row_of_slot.scatter_(0, slots, rows)  # a row that had a slot writes itself again

    def buffer(self, device: torch.device) -> torch.Tensor:
        """The step's gradient at its slots, (capacity >= count, cols) fp32, zero where no read
        has added yet: what a read's backward adds into."""
        self.grad = _grown(self.grad, self.count, (self.cols,), torch.float32, device, keep=self.zeroed)
        if self.zeroed < self.count:
            self.grad[self.zeroed:self.count].zero_()
            self.zeroed = self.count
        return self.grad

    def take(self, dense: bool = False) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """The step's gradient, then cleared; None when the step read nothing. Sparse: (the
        distinct rows (C,), their gradients (C, cols) fp32); `dense`: (None, the shard's
        gradient (shard rows, cols) fp32). Views of the buffers, valid until the next step's
        first read. The next steps accumulate in the layout asked for."""
        if self.count == 0:
            if dense != self.dense:
                self.dense, self.slot_of_row, self.row_of_slot, self.grad = dense, None, None, None
            return None
        grads = self.buffer(self.device)[:self.count]  # zero where no backward added
        n, self.count, self.zeroed = self.count, 0, 0
        if self.dense:
            taken = (None, grads)
        else:
            rows = self.row_of_slot[:n]
            taken = (rows, grads)
            self.slot_of_row[rows] = -1
        if dense != self.dense:  # the other layout from the next step on
            self.dense, self.slot_of_row, self.row_of_slot, self.grad = dense, None, None, None
            if dense:  # this step's rows into a shard-shaped gradient, once
                rows, grads = taken
                full = torch.zeros((self.shard_rows, self.cols), dtype=torch.float32, device=grads.device)
                taken = (None, full.index_copy_(0, rows, grads))
            else:
                full = taken[1]
                rows = full.abs().sum(dim=1).nonzero().flatten()
                taken = (rows, full[rows])
        return taken


def _grown(buffer: torch.Tensor | None, size: int, tail: tuple, dtype, device, keep: int | None = None):
    """`buffer`, or a larger one holding its first `keep` entries (all: None) when it has fewer
    than `size` (at least 1.5x its size: a step that reads a few more rows grows it once)."""
    if buffer is not None and buffer.shape[0] >= size:
        return buffer
    old = 0 if buffer is None else buffer.shape[0]
    grown = torch.empty((max(size, old + old // 2), *tail), dtype=dtype, device=device)
    kept = old if keep is None else min(keep, old)
    if kept:
        grown[:kept] = buffer[:kept]
    return grown


def distinct_rows(reads: torch.Tensor, shard_rows: int, segmented: bool,
                  grads: RowGrads | None = None) -> tuple[torch.Tensor, ...]:
    """A read's distinct rows: (rows (U,) sorted, slots (reads' shape) each read's place among
    them, by_row (K,) the reads sorted by row, segments (G + 1,): by_row cut into runs of at
    most SEGMENT_READS reads of one row, or None when not `segmented`). One host sync: a
    single read-back of the sizes (U, G, and with `grads` the rows not yet given a slot this
    step, which are given theirs). Keys are int32 where the shard's rows allow. Fake tensors
    (the scale plan) have no values: there every read is taken to be distinct (U = min(reads,
    shard rows), the most a read can hold)."""
    flat, k = reads.flatten(), reads.numel()
    if is_fake(reads):
        u = min(k, shard_rows)
        if grads is not None:
            grads.device = reads.device
        if grads is not None and grads.dense:
            grads.count = shard_rows
        elif grads is not None:
            grads.count += min(u, shard_rows - grads.count)
            grads.row_of_slot = _grown(grads.row_of_slot, grads.count, (), torch.int64, reads.device)
            grads.slots_of(reads.device)
        return flat.new_empty(u), reads, flat.new_empty(k), flat.new_empty(u + 1) if segmented else None
    if k == 0:
        return flat.new_empty(0), reads, flat.new_empty(0), flat.new_zeros(1) if segmented else None
    keys = flat.to(torch.int32) if shard_rows < 2**31 else flat
    sorted_keys, by_row = torch.sort(keys, stable=True)
    first = torch.ones(k, dtype=torch.bool, device=flat.device)  # a row's first read
    first[1:] = sorted_keys[1:] != sorted_keys[:-1]
    run = first.cumsum(0) - 1  # (K,) each sorted read's distinct row
    sizes = [run[-1] + 1]
    if segmented:  # a segment starts at a row's first read and every SEGMENT_READS reads after
        from lingua_mem.kernels.triton_bag import SEGMENT_READS  # segments are the Triton kernel's

        at = torch.arange(k, device=flat.device)
        row_start = torch.cummax(torch.where(first, at, 0), 0).values
        cut = first | ((at - row_start) % SEGMENT_READS == 0)
        sizes.append(cut.sum())
    if grads is not None:
        sizes.append(grads.new_among(sorted_keys, first))
    counts = torch.stack(sizes).tolist()  # the one wait of a read for its sizes
    rows = flat.new_empty(counts[0]).scatter_(0, run, sorted_keys.long())  # the same value per run
    slots = torch.empty_like(run).scatter_(0, by_row, run).view(reads.shape)
    segments = None
    if segmented:
        segments = torch.cat([torch.nonzero_static(cut, size=counts[1]).flatten(), run.new_full((1,), k)])
    if grads is not None:
        grads.give_slots(rows, counts[-1])
    return rows, slots, by_row, segments


class TableReader(OpaqueBase):
    """What one sharded table's read needs when it runs: the process groups and sizes, the
    dtypes rows and gradients travel in, the bag's kernel, and this step's row gradient.

    The read is two custom ops (lingua_mem::routed_read and its backward) that take this
    object; torch.compile sees it as an opaque reference (passed along, never traced into),
    so the routing's data-dependent parts (split sizes from the host, the distinct rows, the
    rows' gradients kept here) run eagerly inside the ops and a block compiles as one graph.
    Owned by its ShardedValueTable."""

    def __init__(self, memory_mesh: DeviceMesh, n_values: int, v_dim: int, kernel: str,
                 compute_dtype: torch.dtype, reduce_dtype: torch.dtype):
        cols_mesh, rows_mesh = memory_mesh["mp"], memory_mesh["mp_replicate"]
        self.mp_group, self.mp = cols_mesh.get_group(), cols_mesh.size()
        self.row_group, self.row_ranks = rows_mesh.get_group(), rows_mesh.size()
        self.world = self.mp * self.row_ranks
        self.kernel = kernel
        self.cols = v_dim // self.mp
        self.rows_per_rank = -(-n_values // self.row_ranks)  # Shard(0): chunks of ceil(n/R) rows
        self.compute_dtype = compute_dtype
        self.reduce_dtype = reduce_dtype if self.row_ranks > 1 else torch.float32
        self.grads = RowGrads(self.rows_per_rank, self.cols)  # this step's row gradient
        self.frozen: tuple[torch.Tensor, torch.Tensor] | None = None  # a frozen table's scratch
        self.copy: torch.Tensor | None = None  # the shard in compute dtype (readable)
        self.copy_of: tuple | None = None  # (storage, version) of the shard it was made from

    # -- routing --------------------------------------------------------------------------

    def _segmented(self, device_type: str) -> bool:
        """Whether the backward's kernel takes the reads cut into segments (Triton's does)."""
        auto = self.kernel == "auto" and resolve_kernel("auto", device_type) == "triton"
        return self.kernel == "triton" or auto

    def distinct(self, reads: torch.Tensor, track: bool) -> tuple[torch.Tensor, ...]:
        """distinct_rows of a read of this shard; with `track` its rows get slots in this step's
        row gradient (RowGrads), their count read back with the read's sizes."""
        return distinct_rows(reads, self.rows_per_rank, self._segmented(reads.device.type),
                             self.grads if track else None)

    def route(self, indices: torch.Tensor, track: bool) -> Route:
        """The read's routing: indices (T, M) global rows. `track`: the read will be
        differentiated (its rows get slots in this step's row gradient)."""
        if self.row_ranks == 1:
            reads = indices if self.mp > 1 else indices.clone()  # an op's outputs never alias its inputs
            return Route(reads, *self.distinct(reads, track))
        t, m = indices.shape
        flat = indices.flatten()  # (T*M,) token-major
        owner = torch.div(flat, self.rows_per_rank, rounding_mode="floor")
        token = torch.arange(t * m, device=flat.device) // m
        key = owner * t + token
        if self.row_ranks * t < 2**31:
            key = key.to(torch.int32)
        key, by_owner = torch.sort(key, stable=True)  # (owner, token) order: bags contiguous
        local = (flat - owner * self.rows_per_rank)[by_owner]  # (T*M,) shard rows at their owners
        fake = is_fake(indices)  # the plan: reads spread evenly over the owners, every token reading each
        if fake:
            counts = owner.new_empty((self.row_ranks, 2))
        else:
            first = torch.ones_like(key, dtype=torch.bool)  # a bag's first read
            first[1:] = key[1:] != key[:-1]
            key_owner = torch.div(key, t, rounding_mode="floor").long()
            counts = torch.zeros((2, self.row_ranks), dtype=torch.int64, device=flat.device)
            counts[0].index_add_(0, key_owner, torch.ones_like(key_owner))
            counts[1].index_add_(0, key_owner, first.long())
            counts = counts.T.contiguous()  # (R, 2): reads and bags for each owner
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.row_group)
        if fake:
            sent, bags_sent = got, bags_got = _planned_splits(t * m, t, self.row_ranks)
            bag_token, lengths = flat.new_empty(sum(bags_sent)), flat.new_empty(sum(bags_sent))
        else:  # the split sizes, both ways, in one read-back (a host sync)
            sent, bags_sent, got, bags_got = torch.cat([counts, received], dim=1).T.tolist()
            starts = torch.nonzero_static(first, size=sum(bags_sent)).flatten()  # each bag's first read
            bag_token = (key[starts] % t).long()
            lengths = torch.diff(starts, append=starts.new_full((1,), t * m))
        reads = _exchange(local, sent, got, self.row_group)  # (K,) shard rows asked of this rank
        lengths = _exchange(lengths, bags_sent, bags_got, self.row_group)  # (S,) reads per bag
        offsets = torch.cat([lengths.new_zeros(1), lengths.cumsum(0)])
        return Route(reads, *self.distinct(reads, track), offsets, by_owner, bag_token, sent, got, bags_sent,
                     bags_got)

    def unpack(self, tokens: int, m: int, reads, rows, slots, by_row, segments, offsets, by_owner, bag_token,
               splits) -> Route:
        """The Route of `Route.tensors()` again, for `tokens` tokens of `m` reads."""
        segments = segments if segments.numel() else None
        if self.row_ranks == 1:
            return Route(reads.view(tokens, m), rows, slots.view(tokens, m), by_row, segments)
        if is_fake(splits):  # the plan's routing has no values to read back
            sent, bags_sent = got, bags_got = _planned_splits(tokens * m, tokens, self.row_ranks)
        else:
            sent, got, bags_sent, bags_got = splits.tolist()
        return Route(reads, rows, slots, by_row, segments, offsets, by_owner, bag_token, sent, got, bags_sent,
                     bags_got)

    # -- the bags -------------------------------------------------------------------------

    def send_weights(self, weights: torch.Tensor, route: Route) -> torch.Tensor:
        """The reads' weights, at the rows' owners: (T, M) -> (K,) ((T, M) on one row rank)."""
        if route.by_owner is None:
            return weights
        return _exchange(weights.flatten()[route.by_owner], route.sent, route.got, self.row_group)

    def readable(self, shard: torch.Tensor) -> torch.Tensor:
        """The shard as the bags read it: itself, or, when the compute dtype is narrower than
        the shard's (bf16 of fp32), a copy in the compute dtype kept beside it, made again
        whenever the shard has changed since (its version counter moves with every in-place
        write: an optimizer step, a checkpoint load). Once a step the shard is read whole and
        the copy written (6 bytes a value at bf16); every read of a row then moves 2 bytes
        instead of 4 (the paper's bf16 values, with fp32 master weights and optimizer)."""
        if shard.element_size() <= self.compute_dtype.itemsize:
            return shard
        key = (None if is_fake(shard) else shard.data_ptr(), shard._version)
        if self.copy is None or self.copy.shape != shard.shape or self.copy_of != key:
            if self.copy is None or self.copy.shape != shard.shape:
                self.copy = torch.empty(shard.shape, dtype=self.compute_dtype, device=shard.device)
            self.copy.copy_(shard)
            self.copy_of = key
        return self.copy

    def bag_rows(self, shard: torch.Tensor, route: Route, w: torch.Tensor) -> torch.Tensor:
        """The bags this rank owns, read straight from its shard (or its readable copy: no copy
        of the rows asked): (S, cols) in compute dtype."""
        return embedding_bag(route.reads, w, self.readable(shard), self.kernel, route.offsets,
                             self.compute_dtype)

    def sum_bags(self, bags: torch.Tensor, route: Route, tokens: int) -> torch.Tensor:
        """The partial bags back at their tokens' rank, summed per token: (T, cols)."""
        if route.by_owner is None:
            return bags
        bags = _exchange(bags, route.bags_got, route.bags_sent, self.row_group)  # (S_sent, cols)
        out = torch.zeros((tokens, self.cols), dtype=torch.float32, device=bags.device)
        return out.index_add_(0, route.bag_token, bags.float()).to(bags.dtype)

    def bags_backward(self, shard: torch.Tensor, route: Route, w: torch.Tensor, grad: torch.Tensor,
                      shape: tuple[int, int], keep: bool) -> torch.Tensor:
        """Backward of the bags: grad (T, cols) -> the weights' gradient (T, M); the rows'
        gradients, scaled by 1/world (the data-parallel mean), added to this step's
        (`keep`: the table trains; a frozen one keeps nothing)."""
        if route.by_owner is not None:  # each bag's gradient, at its owner
            grad = _exchange(grad[route.bag_token].to(self.reduce_dtype), route.bags_sent, route.bags_got,
                             self.row_group)  # (S, cols)
        if keep:
            slot_of_row, grad_rows = self.grads.slots_of(shard.device), self.grads.buffer(shard.device)
        else:  # the weights' gradient only: the rows' is added into a scratch row (made once)
            if self.frozen is None:
                self.frozen = (torch.zeros(shard.shape[0], dtype=torch.int32, device=shard.device),
                               torch.zeros((1, self.cols), dtype=torch.float32, device=shard.device))
            slot_of_row, grad_rows = self.frozen
        # Triton reads the rows from the readable copy (converting in the kernel, the gradients
        # fp32); the torch path computes in its table's dtype: the fp32 shard
        table = self.readable(shard) if route.segments is not None else shard
        grad_w = bag_rows_backward(grad, route.reads, w, table, route.rows, route.slots, route.by_row,
                                   route.segments, slot_of_row, grad_rows, 1.0 / self.world, self.kernel,
                                   route.offsets)
        if route.by_owner is None:
            return grad_w.to(w.dtype)
        back = _exchange(grad_w.to(w.dtype), route.got, route.sent, self.row_group)  # (T*M,), order sent
        return torch.empty_like(back).index_copy_(0, route.by_owner, back).view(shape)


register_opaque_type(TableReader, typ="reference")


# -- the read as two custom ops -------------------------------------------------------------

_Tensors11 = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                   torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _routed_read(reader: TableReader, indices: torch.Tensor, weights: torch.Tensor, shard: torch.Tensor,
                 v_dim: int, dtype: torch.dtype, track: bool) -> _Tensors11:
    """This rank's N tokens' bags, (N, v_dim) in `dtype` (the compute dtype), and what the
    backward needs: the weights at the owners (flat) and the route's tensors (Route.tensors).
    `track`: the read will be differentiated (its rows get slots in the step's row gradient)."""
    n, given = indices.shape[0], weights
    if reader.mp > 1:
        indices = _all_gather_rows(indices, reader.mp_group)  # (T, M) = (mp*N, M)
        weights = _all_gather_rows(weights, reader.mp_group)  # (T, M)
    route = reader.route(indices, track)
    w = reader.send_weights(weights, route)  # (K,) or (T, M)
    part = reader.sum_bags(reader.bag_rows(shard, route, w), route, indices.shape[0])  # (T, cols)
    if reader.mp > 1:  # rank p gets its own tokens' columns: block c of `mine` = columns of rank c
        mine = torch.empty_like(part)
        dist.all_to_all_single(mine, part, group=reader.mp_group)  # (mp*N, cols)
        part = mine.view(reader.mp, n, reader.cols).transpose(0, 1).reshape(n, v_dim)
    w = w.flatten() if w is not given else w.flatten().clone()  # an op's outputs never alias its inputs
    return part, w, *route.tensors()


def _routed_read_backward(reader: TableReader, grad: torch.Tensor, w: torch.Tensor, reads: torch.Tensor,
                          rows: torch.Tensor, slots: torch.Tensor, by_row: torch.Tensor,
                          segments: torch.Tensor,
                          offsets: torch.Tensor, by_owner: torch.Tensor, bag_token: torch.Tensor,
                          splits: torch.Tensor, shard: torch.Tensor, m: int, keep: bool) -> torch.Tensor:
    """grad (N, v_dim) -> the weights' gradient (N, M); the rows' gradients kept (`keep`)."""
    n, tokens = grad.shape[0], grad.shape[0] * reader.mp
    if reader.mp > 1:  # the mirror of the forward's all-to-all: block q of the columns to rank q
        blocks = grad.view(n, reader.mp, reader.cols).transpose(0, 1).reshape(tokens, reader.cols)
        grad = torch.empty_like(blocks)
        dist.all_to_all_single(grad, blocks, group=reader.mp_group)  # (T, cols): every token, my columns
    route = reader.unpack(tokens, m, reads, rows, slots, by_row, segments, offsets, by_owner, bag_token,
                          splits)
    if route.by_owner is None:
        w = w.view(tokens, m)
    grad_w = reader.bags_backward(shard, route, w, grad, (tokens, m), keep)  # (T, M)
    if reader.mp == 1:
        return grad_w
    mine = grad_w.new_empty((n, m))  # summed over the column blocks
    _reduce_scatter_flat(mine, grad_w.contiguous(), group=reader.mp_group)
    return mine


routed_read = torch.library.custom_op("lingua_mem::routed_read", _routed_read, mutates_args=())
routed_read_backward = torch.library.custom_op("lingua_mem::routed_read_backward", _routed_read_backward,
                                               mutates_args=())
# what each op runs: the scale plan runs them as Python under its counting modes (plan/fake_step.py)
ROUTED_READ_IMPLS = {routed_read._opoverload: _routed_read,
                     routed_read_backward._opoverload: _routed_read_backward}


@routed_read.register_fake
def _(reader, indices, weights, shard, v_dim, dtype, track):
    ctx = torch.library.get_ctx()
    sized = [indices.new_empty(ctx.new_dynamic_size()) for _ in range(8)]  # reads .. bag_token
    out = weights.new_empty((indices.shape[0], v_dim), dtype=dtype)
    return out, weights.new_empty(ctx.new_dynamic_size()), *sized, torch.empty((4, ctx.new_dynamic_size()),
                                                                               dtype=torch.int64)


@routed_read_backward.register_fake
def _(reader, grad, w, reads, rows, slots, by_row, segments, offsets, by_owner, bag_token, splits, shard, m,
      keep):
    return w.new_empty((grad.shape[0], m))


def _setup_context(ctx, inputs, output):
    reader, indices, weights, shard, _, _, _ = inputs
    ctx.reader, ctx.m = reader, indices.shape[1]
    ctx.save_for_backward(*output[1:], shard)


def _backward(ctx, grad, *_):
    saved = ctx.saved_tensors
    keep = ctx.needs_input_grad[3]  # the shard: a frozen table keeps no row gradient
    grad_w = routed_read_backward(ctx.reader, grad.contiguous(), *saved, ctx.m, keep)
    return None, None, grad_w, None, None, None, None


routed_read.register_autograd(_backward, setup_context=_setup_context)


class _LocalShard(torch.autograd.Function):
    """weight.to_local() for the read, whose backward passes no gradient on when given none
    (the read's gradient comes as rows). DTensor's own to_local on torch 2.11 hands its
    backward a shard of zeros there, so the weight got a shard-sized .grad each step."""

    @staticmethod
    def forward(ctx, weight):
        ctx.set_materialize_grads(False)
        ctx.mesh, ctx.placements = weight.device_mesh, weight.placements
        local = weight.to_local()
        return local.view(local.shape)  # a view: not the DTensor's own tensor

    @staticmethod
    def backward(ctx, grad):
        if grad is None:
            return None
        return DTensor.from_local(grad, ctx.mesh, ctx.placements, run_check=False)


class ShardedValueTable(ValueTable):
    """A ValueTable whose weight is a DTensor of the whole (n_values, v_dim) table, rows
    over the memory mesh's "mp_replicate" dim and columns over its "mp" dim, read by
    routing (see the module's docstring). `compute_dtype` is what the rows are bagged and
    the partial bags sent in; `reduce_dtype` what the bags' gradients are sent to the rows'
    owners in (fp32 when the row group is one rank: nothing is sent)."""

    def __init__(self, table: ValueTable, memory_mesh: DeviceMesh, compute_dtype: torch.dtype = torch.float32,
                 reduce_dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not ValueTable.__init__: the weight is built from `table`'s
        self.kernel = table.kernel
        n_values, v_dim = table.weight.shape
        self.reader = TableReader(memory_mesh, n_values, v_dim, table.kernel, compute_dtype, reduce_dtype)
        self.v_dim, self.compute_dtype = v_dim, compute_dtype  # the read's output (compiled code reads
        # these here: it does not look inside the reader)
        cols_mesh, rows_mesh = memory_mesh["mp"], memory_mesh["mp_replicate"]
        rows, cols = self.reader.rows_per_rank, self.reader.cols
        row0, col0 = rows_mesh.get_local_rank() * rows, cols_mesh.get_local_rank() * cols
        local = table.weight.detach()[row0:row0 + rows, col0:col0 + cols].clone()
        self.weight = nn.Parameter(DTensor.from_local(  # a meta table gives a meta shard
            local, memory_mesh, [Shard(0), Shard(1)], run_check=False, shape=table.weight.shape,
            stride=(v_dim, 1)), requires_grad=table.weight.requires_grad)  # frozen stays frozen

    def forward(self, bag: Bag) -> torch.Tensor:
        """bag (N, M) of this rank's tokens -> (N, v_dim) in compute dtype."""
        track = torch.is_grad_enabled() and self.weight.requires_grad  # its rows will get gradients
        return routed_read(self.reader, bag.indices, bag.weights, _LocalShard.apply(self.weight), self.v_dim,
                           self.compute_dtype, track)[0]

    def take_row_grad(self, dense: bool = False) -> tuple[torch.Tensor | None, torch.Tensor] | None:
        """This step's gradient of this rank's shard, summed over every read since the last
        call; None when nothing was read. Row-sparse: (local rows (C,), distinct, in the order
        first read, their gradients (C, cols) fp32), never table-sized but for a step that reads
        every row; `dense` (an optimizer that updates every row): (None, the shard's gradient,
        fp32). Views of the reader's buffers (RowGrads), valid until the next step's first read."""
        self.reader.copy_of = None  # the step's update comes next: the readable copy is made again
        return self.reader.grads.take(dense)
