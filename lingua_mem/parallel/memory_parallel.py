"""Memory parallelism: a value table sharded by columns over a group of ranks.

Each of the `mp` ranks of a group holds columns [c * v_dim/mp, (c+1) * v_dim/mp)
of every row. Forward, for the group's tokens:
  1. every rank computes its own tokens' indices and weights (N, M) (plain model code)
  2. all-gather indices and weights in the group            -> (mp*N, M)
  3. each rank bags ALL the group's tokens on its columns   -> (mp*N, v_dim/mp)
  4. all-to-all: rank p receives its own tokens' slice c from every rank c
                                                             -> (N, v_dim), columns by rank
Backward mirrors it: all-to-all of the output gradients, the bag's backward
on the local columns, and the weight gradients (partial sums over columns)
reduce-scattered back to their tokens' ranks. The local columns' gradient holds
the contributions of all `mp` ranks' tokens, so it is scaled by 1/mp: after
FSDP averages it over the mp_replicate ranks it equals the data-parallel mean,
like every other parameter's.

The table's weight is a DTensor of the whole table (columns Shard(1) over "mp", rows
Shard(0) over "mp_replicate" once FSDP2 has sharded it): initialisation, clipping and
checkpoints treat it as any other sharded parameter, and `to_local()` happens in the
forward below only.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from lingua_mem.kernels.embedding_bag import embedding_bag
from lingua_mem.memory.layer import Bag, ValueTable

# newer torch releases renamed the flat-tensor collectives; older ones only have the old names
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_flat = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


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


class _ScaleGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class MemoryParallelValueTable(ValueTable):
    """A ValueTable whose weight is a DTensor of the whole (n_values, v_dim) table, its
    columns split (`Shard(1)`) over the 1-D memory-parallel mesh `mp_mesh`. FSDP2 later
    shards its rows over the other ranks (mp_replicate), making it (Shard(0), Shard(1))
    on the memory mesh. Initialisation and checkpoints see it as any sharded parameter;
    only forward looks at the local columns."""

    def __init__(self, table: ValueTable, mp_mesh: DeviceMesh):
        nn.Module.__init__(self)  # not ValueTable.__init__: the weight is built from `table`'s
        self.group, self.mp = mp_mesh.get_group(), mp_mesh.size()
        self.kernel = table.kernel
        n_values, self.v_dim = table.weight.shape
        self.cols = self.v_dim // self.mp
        start = mp_mesh.get_local_rank() * self.cols
        local = table.weight.detach()[:, start:start + self.cols].clone()  # meta stays meta
        self.weight = nn.Parameter(DTensor.from_local(local, mp_mesh, [Shard(1)], run_check=False,
                                                      shape=table.weight.shape, stride=(self.v_dim, 1)))

    def forward(self, bag: Bag) -> torch.Tensor:
        n = bag.indices.shape[0]  # this rank's tokens
        all_indices = _all_gather_rows(bag.indices, self.group)  # (mp*N, M), no gradient
        all_weights = _AllGatherRows.apply(bag.weights, self.group)  # (mp*N, M)
        table = _ScaleGrad.apply(self.weight.to_local(), 1.0 / self.mp)  # (n_values, v_dim/mp)
        part = embedding_bag(all_indices, all_weights, table, self.kernel)  # (mp*N, v_dim/mp)
        mine = _AllToAllRows.apply(part, self.group)  # (mp*N, v_dim/mp): block c = columns of rank c
        return mine.view(self.mp, n, self.cols).transpose(0, 1).reshape(n, self.v_dim)  # (N, v_dim)
