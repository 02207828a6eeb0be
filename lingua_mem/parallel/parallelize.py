"""parallelize(model, meshes, cfg): FSDP2 / HSDP for the dense parameters, memory
parallelism for the value tables. Applied to a built model; model code is untouched."""

from __future__ import annotations

import os
import shutil
from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

from lingua_mem.config import DistributedConfig
from lingua_mem.errors import ConfigError
from lingua_mem.model.llama import ACTIVATION_SAVED_OPS, Transformer
from lingua_mem.parallel.memory_parallel import ShardedValueTable
from lingua_mem.parallel.mesh import Meshes


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in ACTIVATION_SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Wrap every block: `full` recomputes the whole block in backward, `selective`
    keeps the outputs of the ops the model declares (ACTIVATION_SAVED_OPS: matmuls,
    attention, top-k, the value bag)."""
    if mode == "none":
        return
    for i, block in enumerate(model.layers):
        context = {}
        if mode == "selective":
            context = {"context_fn": partial(create_selective_checkpoint_contexts, _selective_policy)}
        model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, **context)


def apply_compile(model: Transformer, device_type: str) -> None:
    """torch.compile every block in place (after activation checkpointing, before FSDP,
    so FSDP's hooks stay outside the compiled code). Memory-parallel collectives are
    traced like any other op."""
    if device_type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise ConfigError("distributed.compile: torch.compile on CPU needs a C++ compiler "
                          f"({os.environ.get('CXX', 'g++')} is not on PATH)")
    for block in model.layers:
        block.compile()


def parallelize(model: Transformer, meshes: Meshes, cfg: DistributedConfig,
                value_compute_dtype: str = "fp32") -> Transformer:
    """Activation checkpointing, compile, memory parallelism and FSDP2 / HSDP, applied to
    `model` in place at every world size (one process: FSDP2 at degree 1, so one and N
    processes share one precision mechanism); returns it. A model on the meta device is
    sharded without ever being whole: then `to_empty` and `init_weights` (each rank
    initialises its shards to the values the whole model would have); materialised
    weights are kept."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model, meshes.device_type)
    dense_dtype = torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32
    dense_policy = MixedPrecisionPolicy(param_dtype=dense_dtype, reduce_dtype=torch.float32)
    # a query BatchNorm keeps fp32 parameters, like its running statistics (fp32 buffers)
    fp32_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)

    # value tables: columns over the mp group, rows over all the other ranks (mp_replicate,
    # the whole world when mp == 1), so each rank holds 1/world of every table whatever the
    # dense layout (HSDP included); read by routing, not gathered, and not FSDP2's
    # (parallel/memory_parallel.py). Rows travel in memory.value_compute_dtype, their
    # gradients in distributed.value_reduce_dtype; the shards stay fp32.
    compute = torch.bfloat16 if value_compute_dtype == "bf16" else torch.float32
    reduce = torch.bfloat16 if cfg.value_reduce_dtype == "bf16" else torch.float32
    for key, table in list(model.values.items()):
        model.values[key] = ShardedValueTable(table, meshes.memory, compute, reduce)
    tables = {p for table in model.values.values() for p in table.parameters()}

    dense_mesh = meshes.dense_fsdp
    for block in model.layers:
        batchnorm = getattr(block.feed_forward, "query_bn", None)
        if batchnorm is not None:
            fully_shard(batchnorm, mesh=dense_mesh, mp_policy=fp32_policy)
        fully_shard(block, mesh=dense_mesh, mp_policy=dense_policy)
    fully_shard(model, mesh=dense_mesh, mp_policy=dense_policy, ignored_params=tables)
    return model
