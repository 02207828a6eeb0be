"""Layout-independent weight initialisation.

A model is built on the meta device, sharded (FSDP2, memory parallelism), then
materialised and initialised shard by shard, so no rank ever holds the full
model. For the result not to depend on the layout, every tensor is defined as
a whole: the i-th tensor initialised draws rows [k*R, (k+1)*R) of its full
(global) shape from a generator seeded by (seed, i, k), and each rank draws
only the row chunks its shard overlaps, then keeps its block (its rows, and
its columns when the tensor is split by columns too, as memory-parallel value
tables are).
One process, FSDP on 4 ranks and memory parallelism all get the same values
(on the same device type).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

_CHUNK_ELEMENTS = 1 << 24  # at most 64 MiB of fp32 drawn at once


def _shard_view(t: torch.Tensor) -> tuple[torch.Tensor, list[int], list[int]]:
    """(local tensor, full shape, global offset of the local block) of a possibly sharded
    tensor: a DTensor (FSDP2 rows, memory-parallel columns, both) or a plain one."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        return t.to_local(), list(t.shape), list(offset)
    return t, list(t.shape), [0] * t.dim()


class ParamInit:
    """Draws tensors in a fixed order; each draw is a function of (seed, order) only."""

    def __init__(self, seed: int):
        self.seed = seed
        self.count = 0

    @torch.no_grad()
    def _fill(self, t: torch.Tensor, sample) -> None:
        index, self.count = self.count, self.count + 1
        local, shape, offset = _shard_view(t)
        if local.numel() == 0:
            return
        if not shape:  # a scalar
            shape, local, offset = [1], local.view(1), [0]
        row0 = offset[0]
        # this shard's block in the trailing dims (all of them, unless sharded there too)
        trailing = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:], strict=True))
        row_elems = math.prod(shape[1:])
        rows_per_chunk = max(1, _CHUNK_ELEMENTS // max(row_elems, 1))
        n_local = local.shape[0]
        first, last = row0 // rows_per_chunk, (row0 + n_local - 1) // rows_per_chunk
        for k in range(first, last + 1):
            start = k * rows_per_chunk
            stop = min(start + rows_per_chunk, shape[0])
            gen = torch.Generator(device=local.device)
            gen.manual_seed((self.seed * 1_000_003 + index) * 1_000_003 + k)
            chunk = torch.empty([stop - start, *shape[1:]], device=local.device, dtype=torch.float32)
            sample(chunk, gen)
            lo, hi = max(start, row0), min(stop, row0 + n_local)  # rows of this shard in the chunk
            local[lo - row0:hi - row0].copy_(chunk[(slice(lo - start, hi - start), *trailing)])

    def normal_(self, t: torch.Tensor, std: float) -> None:
        self._fill(t, lambda x, g: nn.init.normal_(x, std=std, generator=g))

    def trunc_normal_(self, t: torch.Tensor, std: float) -> None:
        """Normal(0, std) truncated at +-3 std."""
        self._fill(t, lambda x, g: nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=g))

    def uniform_(self, t: torch.Tensor, low: float, high: float) -> None:
        self._fill(t, lambda x, g: nn.init.uniform_(x, low, high, generator=g))

    @staticmethod
    @torch.no_grad()
    def constant_(t: torch.Tensor, value: float) -> None:
        (t.to_local() if isinstance(t, DTensor) else t).fill_(value)
