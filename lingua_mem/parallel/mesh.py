"""Process groups: the dense parameters' data-parallel mesh and the memory-parallel view.

All ranks are data-parallel ranks (each reads its own share of the data). Over
the same ranks there are two meshes:
  dense   (dp_replicate, dp_shard): FSDP2 of the dense parameters; HSDP when both > 1
  memory  (mp_replicate, mp): groups of `mp` consecutive ranks share the value
          tables by columns (dim "mp"); the ranks holding the same columns in
          different groups shard those columns' rows with FSDP2 (dim "mp_replicate")
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from lingua_mem.config import ConfigError, DistributedConfig


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
        return self.world_size > 1


@dataclass
class Meshes:
    dims: ParallelDims
    device_type: str = "cpu"  # cpu | cuda
    dense: DeviceMesh | None = None  # ("dp_replicate", "dp_shard")
    memory: DeviceMesh | None = None  # ("mp_replicate", "mp")


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
    """Start the process group (nccl on GPU, gloo on CPU) and build the meshes; one process: none."""
    rank, world_size, local_rank = launch_env()
    dims = resolve_dims(cfg, world_size, rank, local_rank)
    if not dims.distributed:
        return Meshes(dims, device_type)
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=world_size)
    dense = init_device_mesh(device_type, (dims.dp_replicate, dims.dp_shard),
                             mesh_dim_names=("dp_replicate", "dp_shard"))
    memory = init_device_mesh(device_type, (world_size // dims.mp, dims.mp),
                              mesh_dim_names=("mp_replicate", "mp"))
    return Meshes(dims, device_type, dense, memory)
