"""Each rank's share of an evaluation: global batch i goes to rank i % world, and every rank
gets the same number of batches of the same shape (the forward of a sharded model is a
collective: FSDP2 gathers, memory parallelism exchanges rows), fillers marked None."""

from __future__ import annotations

import math

from lingua_mem.parallel.runtime import world


def rank_batches(items: list, batch_size: int) -> list[tuple[int, list] | None]:
    """This rank's batches as (index of the batch's first item, items); None for a filler."""
    rank, size = world()
    starts = list(range(0, len(items), batch_size))
    mine = [(s, items[s : s + batch_size]) for s in starts[rank::size]]
    return mine + [None] * (math.ceil(len(starts) / size) - len(mine))

