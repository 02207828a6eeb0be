"""Layout-independent weight initialisation.

A model is built on the meta device, sharded (FSDP2, memory parallelism), then
materialised and initialised shard by shard, so no rank ever holds the full
model. For the result not to depend on the layout, every tensor is defined as
a whole: the i-th tensor initialised draws rows [k*R, (k+1)*R) of its full
(global) shape from a generator seeded by (seed, i, k), and each rank draws
only the row chunks its shard overlaps, then keeps its rows and columns.
One process, FSDP on 4 ranks and memory parallelism all get the same values
(on the same device type).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

_CHUNK_ELEMENTS = 1 << 24  # at most 64 MiB of fp32 drawn at once


def _shard_view(t: torch.Tensor, columns: tuple[int, int] | None):
    """(local tensor, full shape, row offset, column offset) of a possibly sharded tensor.

    `columns=(offset, total)` says the tensor is itself a column slice of a wider
    tensor (a memory-parallel value table)."""
    if isinstance(t, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = t.to_local()
        _, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
        shape = list(t.shape)
        if any(offset[1:]):
            raise ValueError("only row (dim 0) sharding is supported by the initialiser")
        row0 = offset[0] if offset else 0
    else:
        local, shape, row0 = t, list(t.shape), 0
    col0 = 0
    if columns is not None:
        col0, shape[1] = columns
    return local, shape, row0, col0


class ParamInit:
    """Draws tensors in a fixed order; each draw is a function of (seed, order) only."""

    def __init__(self, seed: int):
        self.seed = seed
        self.count = 0

    @torch.no_grad()
    def _fill(self, t: torch.Tensor, sample, columns: tuple[int, int] | None) -> None:
        index, self.count = self.count, self.count + 1
        local, shape, row0, col0 = _shard_view(t, columns)
        if local.numel() == 0:
            return
        if not shape:  # a scalar
            shape, local = [1], local.view(1)
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
            part = chunk[lo - start:hi - start]
            if columns is not None:
                part = part[:, col0:col0 + local.shape[1]]
            local[lo - row0:hi - row0].copy_(part)

    def normal_(self, t: torch.Tensor, std: float, columns: tuple[int, int] | None = None) -> None:
        self._fill(t, lambda x, g: nn.init.normal_(x, std=std, generator=g), columns)

    def trunc_normal_(self, t: torch.Tensor, std: float) -> None:
        """Normal(0, std) truncated at +-3 std."""
        self._fill(t, lambda x, g: nn.init.trunc_normal_(x, std=std, a=-3 * std, b=3 * std, generator=g),
                   None)

    def uniform_(self, t: torch.Tensor, low: float, high: float) -> None:
        self._fill(t, lambda x, g: nn.init.uniform_(x, low, high, generator=g), None)

    @staticmethod
    @torch.no_grad()
    def constant_(t: torch.Tensor, value: float) -> None:
        (t.to_local() if isinstance(t, DTensor) else t).fill_(value)
