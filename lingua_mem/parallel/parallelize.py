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

from lingua_mem.config import ConfigError, DistributedConfig
from lingua_mem.model import Transformer
from lingua_mem.parallel.memory_parallel import MemoryParallelValueTable
from lingua_mem.parallel.mesh import Meshes

# ops whose outputs selective checkpointing keeps; everything else is recomputed
_SAVED_OPS = {
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
    torch.ops.aten.topk.default, torch.ops.aten._embedding_bag.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
}


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: Transformer, mode: str) -> None:
    """Wrap every block: `full` recomputes the whole block in backward, `selective`
    keeps the outputs of matmuls, attention, top-k and the value bag."""
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


def parallelize(model: Transformer, meshes: Meshes, cfg: DistributedConfig) -> Transformer:
    """Activation checkpointing, then (several processes) memory parallelism and FSDP2 /
    HSDP, applied to `model` in place; returns it. A model on the meta device is
    sharded without ever being whole: then `to_empty` and `init_weights` (each rank
    initialises its shards to the values the whole model would have); materialised
    weights are kept."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model, meshes.device_type)
    if not meshes.dims.distributed:
        return model
    dense_dtype = torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32
    dense_policy = MixedPrecisionPolicy(param_dtype=dense_dtype, reduce_dtype=torch.float32)
    table_reduce = torch.bfloat16 if cfg.value_reduce_dtype == "bf16" else torch.float32
    table_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=table_reduce)

    # value tables: columns over the mp group (when mp > 1), rows over all the other
    # ranks (FSDP on mp_replicate, which spans the whole world when mp == 1), so each
    # rank holds 1/world of every table whatever the dense layout (HSDP included)
    if meshes.dims.mp > 1:
        for key, table in list(model.values.items()):
            n_values, v_dim = table.weight.shape
            model.values[key] = MemoryParallelValueTable(n_values, v_dim, meshes.memory, table.weight)
    rows_mesh = meshes.memory["mp_replicate"]
    unsharded_tables = set()  # columns no other rank shares rows of (world == mp)
    for table in model.values.values():
        if rows_mesh.size() > 1:
            fully_shard(table, mesh=rows_mesh, mp_policy=table_policy)
        else:
            unsharded_tables.add(table.weight)

    for block in model.layers:
        fully_shard(block, mesh=meshes.dense, mp_policy=dense_policy)
    fully_shard(model, mesh=meshes.dense, mp_policy=dense_policy, ignored_params=unsharded_tables or None)
    return model
