"""Each rank's share of an evaluation: global batch i goes to rank i % world, and every rank
gets the same number of batches of the same shape (the forward of a sharded model is a
collective: FSDP2 gathers, memory parallelism exchanges rows), fillers marked None."""

from __future__ import annotations

import math

import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size) of the default group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def rank_batches(items: list, batch_size: int) -> list[tuple[int, list] | None]:
    """This rank's batches as (index of the batch's first item, items); None for a filler."""
    rank, size = world()
    starts = list(range(0, len(items), batch_size))
    mine = [(s, items[s : s + batch_size]) for s in starts[rank::size]]
    return mine + [None] * (math.ceil(len(starts) / size) - len(mine))


def gather(obj) -> list:
    """obj of every rank, in rank order (a one-element list on one process)."""
    rank, size = world()
    if size == 1:
        return [obj]
    out = [None] * size
    dist.all_gather_object(out, obj)
    return out
