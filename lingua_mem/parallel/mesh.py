"""Process groups: the dense parameters' data-parallel mesh and the memory-parallel view.

Every run has a process group, one process included (the trainer starts a world-1
group itself when no launcher did), so one process and N processes run the same
code. All ranks are data-parallel ranks (each reads its own share of the data).
Over the same ranks there are two meshes:
  dense   (dp_replicate, dp_shard): FSDP2 of the dense parameters; HSDP when both > 1
  memory  (mp_replicate, mp): groups of `mp` consecutive ranks share the value
          tables by columns (dim "mp"); the ranks holding the same columns in
          different groups shard those columns' rows with FSDP2 (dim "mp_replicate")

The default group serves both devices on a GPU (`cuda:nccl,cpu:gloo`): tensor
collectives on GPU tensors and barriers (the group is bound to the rank's GPU) run on
NCCL, object collectives (checkpoint votes, DCP's planning) and CPU tensors on gloo.
On CPU it is `cpu:gloo`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lingua_mem.config import DistributedConfig
from lingua_mem.errors import ConfigError
from lingua_mem.parallel.runtime import resolve_device


@dataclass(frozen=True)
class ParallelDims:
    world_size: int
    rank: int
    local_rank: int
    dp_replicate: int
    dp_shard: int
    mp: int

    @property
    def distributed(self) -> bool:
        """More than one process (the process group itself exists at every size)."""
        return self.world_size > 1


@dataclass
class Meshes:
    dims: ParallelDims
    device_type: str  # cpu | cuda
    dense: DeviceMesh  # ("dp_replicate", "dp_shard")
    memory: DeviceMesh  # ("mp_replicate", "mp")
    owns_process_group: bool = False  # started here (not by the caller): destroy it at the end

    @property
    def dense_fsdp(self) -> DeviceMesh:
        """The mesh FSDP2 shards the dense parameters over: 2-D (HSDP) when replicated, else 1-D."""
        return self.dense if self.dims.dp_replicate > 1 else self.dense["dp_shard"]

    def close(self) -> None:
        if self.owns_process_group and dist.is_initialized():
            dist.destroy_process_group()


def backend_for(device_type: str) -> str:
    """The default group's backend string: the training device's backend, and gloo for the
    CPU collectives (object collectives, barriers, CPU tensors) on a GPU."""
    return "cuda:nccl,cpu:gloo" if device_type == "cuda" else "cpu:gloo"


def launch_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun, or from srun (SLURM_PROCID...), or one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ and "MASTER_ADDR" in os.environ:
        return (int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]),
                int(os.environ.get("SLURM_LOCALID", 0)))
    return 0, 1, 0


def resolve_dims(cfg: DistributedConfig, world_size: int, rank: int = 0, local_rank: int = 0) -> ParallelDims:
    """The mesh sizes for `world_size` ranks; ConfigError (one line, names the key) if they do not fit."""
    dp_shard = cfg.dp_shard if cfg.dp_shard != -1 else world_size // cfg.dp_replicate
    if cfg.dp_replicate * dp_shard != world_size:
        raise ConfigError(f"distributed.dp_shard: dp_replicate={cfg.dp_replicate} x dp_shard={dp_shard} "
                          f"does not match the world size {world_size}")
    if world_size % cfg.memory_parallel_size:
        raise ConfigError(f"distributed.memory_parallel_size: {cfg.memory_parallel_size} does not divide "
                          f"the world size {world_size}")
    return ParallelDims(world_size, rank, local_rank, cfg.dp_replicate, dp_shard, cfg.memory_parallel_size)


def init_distributed(cfg: DistributedConfig, device_type: str) -> Meshes:
    """Start the process group (unless the caller did) and build the meshes.

    Launched by torchrun or srun: the env:// rendezvous. One process with no launcher:
    a world-1 group on an in-process store (no port, nothing to clean up but the group)."""
    if dist.is_initialized():  # the caller's group; its local rank from the launcher, if any
        rank, world_size = dist.get_rank(), dist.get_world_size()
        if "LOCAL_RANK" in os.environ or "SLURM_LOCALID" in os.environ:
            local_rank = launch_env()[2]
        else:
            local_rank = rank % torch.cuda.device_count() if device_type == "cuda" else 0
    else:
        rank, world_size, local_rank = launch_env()
    dims = resolve_dims(cfg, world_size, rank, local_rank)  # a mesh that does not fit fails first
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    owns = not dist.is_initialized()
    if owns:
        backend = backend_for(device_type)
        device_id = torch.device("cuda", local_rank) if device_type == "cuda" else None
        if world_size == 1 and "MASTER_ADDR" not in os.environ:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    device_id=device_id)
        else:
            dist.init_process_group(backend, rank=rank, world_size=world_size, device_id=device_id)
        if device_type == "cpu":
            # torch leaves a "cpu:gloo" group without a default backend once any plugin backend
            # is registered (FSDP's import registers "fake"), and then warns on destroy
            dist.group.WORLD._set_default_backend(dist.ProcessGroup.BackendType.GLOO)
    try:
        return build_meshes(dims, device_type, owns_process_group=owns)
    except BaseException:
        if owns:
            dist.destroy_process_group()
        raise


@contextmanager
def distributed_session(cfg: DistributedConfig) -> Iterator[tuple[Meshes, torch.device]]:
    """A command's process group for the `with` block, as (meshes, this process's device):
    started here unless the caller started one (init_distributed), and destroyed when the
    block ends, however it ends. Every command that runs a model starts this way."""
    meshes = init_distributed(cfg, resolve_device(cfg.device).type)
    try:
        yield meshes, resolve_device(cfg.device, meshes.dims.local_rank)
    finally:
        meshes.close()


def build_meshes(dims: ParallelDims, device_type: str, owns_process_group: bool = False) -> Meshes:
    """The dense and memory meshes of `dims` over the started process group (a real one, or
    the plan's fake one: lingua_mem.plan)."""
    dense = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard),
                             mesh_dim_names=("dp_replicate", "dp_shard"))
    memory = init_device_mesh(device_type, (dims.world_size // dims.mp, dims.mp),
                              mesh_dim_names=("mp_replicate", "mp"))
    return Meshes(dims, device_type, dense, memory, owns_process_group=owns_process_group)
