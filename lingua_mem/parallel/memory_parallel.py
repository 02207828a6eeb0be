"""Value tables sharded by rows and columns and read by routing: no rank ever holds more of a
table than its own shard plus the rows its batch reads.

Layout. A table's weight is a DTensor of the whole (n_values, v_dim) table on the memory
mesh (mp_replicate, mp), placements (Shard(0), Shard(1)): groups of `mp` consecutive ranks
split the columns (rank c of a group holds columns [c * v_dim/mp, (c+1) * v_dim/mp)), and
the ranks holding the same columns in different groups (the "row group", mp_replicate,
the whole world when mp == 1) split the rows in chunks (DTensor's Shard(0): ceil(n/R) rows
each). Initialisation and checkpoints see it as any sharded parameter; FSDP2 does not
manage it.

Forward of one read, for this rank's tokens (indices, weights: (N, M) each):
  1. mp > 1: all-gather indices and weights in the mp group       -> (mp*N, M)
  2. the distinct rows read, sorted, and each read's slot among them: rows (U,), slots (mp*N, M)
  3. route (row group): all-to-all of the row counts per owner, then of the rows; each
     owner answers with its columns of the rows it was asked     -> slab (U, v_dim/mp)
  4. the bag on the slab: embedding_bag(slots, weights, slab)     -> (mp*N, v_dim/mp)
  5. mp > 1: all-to-all in the mp group: rank p gets its own tokens' columns from every rank
                                                                  -> (N, v_dim)
Backward mirrors it: the mp all-to-all of the output gradients, the bag's backward (the
slab's gradient (U, cols): the rows read, nothing table-sized), and the routing reversed:
each owner receives the gradients of its rows from every rank of its row group, scaled by
1/world (the data-parallel mean, as every other parameter's gradient), and adds them per
distinct row to what it holds for this step: one row gradient per table, summed over every
read of every memory layer sharing it, taken once a step by `take_row_grad()`. The
weights' gradients (partial sums over columns) are reduce-scattered back to their tokens'
ranks.
The table's own `.grad` stays None: the optimizer gets the rows (optim.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lingua_mem.kernels.embedding_bag import embedding_bag
from lingua_mem.memory.layer import Bag, ValueTable

# newer torch releases renamed the flat-tensor collectives; older ones only have the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


_CAST_ROWS = 1 << 16  # rows cast at a time when a shard answers in another dtype


def _all_gather_rows(x: torch.Tensor, group) -> torch.Tensor:
    out = x.new_empty((dist.get_world_size(group) * x.shape[0], *x.shape[1:]))
    _all_gather_flat(out, x.contiguous(), group=group)
    return out


class _AllGatherRows(torch.autograd.Function):
    """(N, ...) per rank -> (mp*N, ...) in rank order; backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_gather_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((grad.shape[0] // dist.get_world_size(ctx.group), *grad.shape[1:]))
        _reduce_scatter_flat(out, grad.contiguous(), group=ctx.group)
        return out, None


class _AllToAllRows(torch.autograd.Function):
    """Row chunk p of (mp*N, D) goes to rank p; chunk q received comes from rank q. Self-inverse."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


@dataclass
class Route:
    """Who asks whom for which rows, in one read (row-group ranks in rank order).

    asks[q]     how many of the rows this rank reads rank q owns (they are contiguous in
                the sorted rows: owners are row chunks in order)
    asked[q]    how many rows rank q asks of this rank
    local_rows  the rows this rank was asked, as indices into its shard, in the order asked
    """

    asks: list[int]
    asked: list[int]
    local_rows: torch.Tensor


def _exchange(x: torch.Tensor, send: list[int], recv: list[int], group) -> torch.Tensor:
    """all_to_all of variable row counts: send[q] rows to rank q, recv[q] rows from it."""
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), output_split_sizes=recv, input_split_sizes=send, group=group)
    return out


class _ReadRows(torch.autograd.Function):
    """(local shard, rows (U,) sorted distinct) -> their values (U, cols), fetched from the
    rows' owners. Backward sends the values' gradient to the owners, where the table keeps
    it (rows and gradients): nothing flows to the shard through autograd, whose input is
    there so that the backward runs even when nothing else before the read needs one."""

    @staticmethod
    def forward(ctx, shard, rows, table):
        route = table.route(rows)
        ctx.table, ctx.route = table, route
        return table.fetch(shard.detach(), route)

    @staticmethod
    def backward(ctx, grad):
        ctx.table.keep_row_grad(ctx.route, grad)
        return None, None, None


class ShardedValueTable(ValueTable):
    """A ValueTable whose weight is a DTensor of the whole (n_values, v_dim) table, rows
    over the memory mesh's "mp_replicate" dim and columns over its "mp" dim, read by
    routing (see the module's docstring). `compute_dtype` is what the rows are sent and
    bagged in; `reduce_dtype` what their gradients are sent back in (fp32 when the row group
    is one rank: nothing is sent)."""

    def __init__(self, table: ValueTable, memory_mesh: DeviceMesh, compute_dtype: torch.dtype = torch.float32,
                 reduce_dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # not ValueTable.__init__: the weight is built from `table`'s
        self.kernel = table.kernel
        cols_mesh, rows_mesh = memory_mesh["mp"], memory_mesh["mp_replicate"]
        self.mp_group, self.mp = cols_mesh.get_group(), cols_mesh.size()
        self.row_group, self.row_ranks = rows_mesh.get_group(), rows_mesh.size()
        self.world = self.mp * self.row_ranks
        self.n_values, self.v_dim = table.weight.shape
        self.cols = self.v_dim // self.mp
        self.rows_per_rank = -(-self.n_values // self.row_ranks)  # Shard(0): chunks of ceil(n/R) rows
        self.compute_dtype = compute_dtype
        self.reduce_dtype = reduce_dtype if self.row_ranks > 1 else torch.float32
        row0 = rows_mesh.get_local_rank() * self.rows_per_rank
        col0 = cols_mesh.get_local_rank() * self.cols
        local = table.weight.detach()[row0:row0 + self.rows_per_rank, col0:col0 + self.cols].clone()
        self.weight = nn.Parameter(DTensor.from_local(  # a meta table gives a meta shard
            local, memory_mesh, [Shard(0), Shard(1)], run_check=False, shape=table.weight.shape,
            stride=(self.v_dim, 1)), requires_grad=table.weight.requires_grad)  # frozen stays frozen
        self._row_grad: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's (local rows, grads)

    # -- the read ------------------------------------------------------------------------

    def forward(self, bag: Bag) -> torch.Tensor:
        n = bag.indices.shape[0]  # this rank's tokens
        indices, weights = bag.indices, bag.weights
        if self.mp > 1:
            indices = _all_gather_rows(indices, self.mp_group)  # (mp*N, M), no gradient
            weights = _AllGatherRows.apply(weights, self.mp_group)  # (mp*N, M)
        rows, slots = self.distinct(indices)  # (U,), (mp*N, M)
        slab = _ReadRows.apply(self.weight.to_local(), rows, self)  # (U, cols)
        part = embedding_bag(slots, weights, slab, self.kernel)  # (mp*N, cols)
        if self.mp == 1:
            return part
        mine = _AllToAllRows.apply(part, self.mp_group)  # (mp*N, cols): block c = columns of rank c
        return mine.view(self.mp, n, self.cols).transpose(0, 1).reshape(n, self.v_dim)  # (N, v_dim)

    def distinct(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The distinct rows read, sorted (U,), and each read's slot among them (indices' shape).
        Fake tensors (the scale plan, lingua_mem.plan) have no values: there, every read is
        taken to be distinct (U = min(reads, rows), the most a read can move or hold)."""
        if is_fake(indices):
            return indices.new_empty(min(indices.numel(), self.n_values)), indices
        return torch.unique(indices, sorted=True, return_inverse=True)

    def route(self, rows: torch.Tensor) -> Route:
        """The read's routing: rows (U,) sorted distinct global rows."""
        if self.row_ranks == 1:
            return Route([rows.numel()], [rows.numel()], rows)
        fake = is_fake(rows)  # the plan: the rows spread evenly over their owners, and asked alike
        if fake:
            asks = rows.new_empty(self.row_ranks)
        else:
            asks = torch.bincount(torch.div(rows, self.rows_per_rank, rounding_mode="floor"),
                                  minlength=self.row_ranks)  # (R,): rows this rank asks of each owner
        asked = torch.empty_like(asks)
        dist.all_to_all_single(asked, asks, group=self.row_group)
        if fake:
            asks = [rows.numel() // self.row_ranks] * self.row_ranks
            asks[0] += rows.numel() - sum(asks)
            asked = asks
        else:
            asks, asked = asks.tolist(), asked.tolist()  # the split sizes (a host sync)
        me = dist.get_rank(self.row_group)
        local_rows = _exchange(rows, asks, asked, self.row_group) - me * self.rows_per_rank
        return Route(asks, asked, local_rows)

    def fetch(self, shard: torch.Tensor, route: Route) -> torch.Tensor:
        """The values of the rows this rank reads, (U, cols) in compute dtype."""
        rows = route.local_rows
        if shard.dtype == self.compute_dtype:
            answer = shard.index_select(0, rows)  # (sum asked, cols)
        else:  # cast while copying, a block of rows at a time: no fp32 copy of all the rows asked
            answer = shard.new_empty((rows.numel(), self.cols), dtype=self.compute_dtype)
            for start in range(0, rows.numel(), _CAST_ROWS):
                answer[start:start + _CAST_ROWS] = shard.index_select(0, rows[start:start + _CAST_ROWS])
        if self.row_ranks == 1:
            return answer
        return _exchange(answer, route.asked, route.asks, self.row_group)

    def keep_row_grad(self, route: Route, grad: torch.Tensor) -> None:
        """Backward of a read: the gradient of the rows read (U, cols), sent to their owners and
        added to what this rank holds for its shard this step (distinct rows: never more than
        the shard's, however many reads and memory layers)."""
        if self.world > 1:  # one copy: cast, then scaled in place
            grad = grad.to(self.reduce_dtype, copy=True).mul_(1.0 / self.world)
        if self.row_ranks > 1:
            grad = _exchange(grad, route.asks, route.asked, self.row_group)  # (sum asked, cols)
        pairs = [(route.local_rows, grad)]
        if self._row_grad is not None:
            pairs.insert(0, self._row_grad)
        if len(pairs) == 1 and self.row_ranks == 1:  # one read's own rows: distinct already
            self._row_grad = (route.local_rows, grad.float())
        else:  # several reads, or the same row asked by several ranks
            self._row_grad = self._coalesce(pairs)

    def _coalesce(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, gradients) pairs -> (distinct rows sorted, their summed gradients in fp32)."""
        rows = torch.cat([r for r, _ in pairs])
        if is_fake(rows):  # the plan: as many rows as the reads brought, at most the shard's
            distinct, slot = rows.new_empty(min(rows.numel(), self.weight.to_local().shape[0])), rows
        else:
            distinct, slot = torch.unique(rows, sorted=True, return_inverse=True)
        summed = torch.zeros((distinct.numel(), self.cols), dtype=torch.float32, device=rows.device)
        for (_, g), part in zip(pairs, torch.split(slot, [r.numel() for r, _ in pairs]), strict=True):
            summed.index_add_(0, part, g.float())
        return distinct, summed

    # -- the step ------------------------------------------------------------------------

    def take_row_grad(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This step's gradient of this rank's shard, row-sparse: (local rows (K,), distinct,
        their gradients (K, cols) fp32), summed over every read since the last call; None when
        nothing was read. Never table-sized."""
        row_grad, self._row_grad = self._row_grad, None
        return row_grad
