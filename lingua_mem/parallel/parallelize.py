"""parallelize(model, meshes, cfg): FSDP2 / HSDP for the dense parameters, memory
parallelism for the value tables. Applied to a built model; model code is untouched."""

from __future__ import annotations

import os
import shutil
from functools import partial

import torch
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lingua_mem.config import DistributedConfig
from lingua_mem.errors import ConfigError
from lingua_mem.model.llama import ACTIVATION_SAVED_OPS, Transformer, is_attention_op, resolve_attention
from lingua_mem.parallel.memory_parallel import ShardedValueTable, routed_read
from lingua_mem.parallel.mesh import Meshes

# torch 2.11's inductor stops on the backward of a checkpointed, compiled block (a sympy
# relational reaches it as a graph input: "Unsupported inductor graph input type"); 2.13 compiles it
COMPILES_CHECKPOINTED_READS = torch.torch_version.TorchVersion(torch.__version__) >= (2, 13)
# kept by selective checkpointing: the model's (matmuls, attention, top-k, the value bag) and
# the routed read's output and route
SAVED_OPS = ACTIVATION_SAVED_OPS | {routed_read._opoverload}
# kept by full checkpointing: the routed read (recomputed, it would route the reads again),
# and, as by selective, attention (is_attention_op: its recompute under torch.compile saves
# the random generator's state, which torch 2.13's compiled autograd cannot save beside a
# table's reader: "expected all tensors_saved_with_vc_check to be Tensors"); (B, S, dim) a
# block, against the block's input
FULL_SAVED_OPS = frozenset({routed_read._opoverload})


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    keep = op in SAVED_OPS or is_attention_op(op)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def _full_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    keep = op in FULL_SAVED_OPS or is_attention_op(op)
    return CheckpointPolicy.MUST_SAVE if keep else CheckpointPolicy.PREFER_RECOMPUTE


def attention_outside_checkpoints(model: Transformer, cfg: DistributedConfig, device_type: str) -> bool:
    """Whether activation checkpointing must leave attention out of its regions: doc_causal
    attention through compiled flex (CUDA) in eager blocks (distributed.compile=false). The
    compiled kernel dispatches no op a checkpointing policy sees (the policies keep attention
    by its op), so a checkpointed block would run it again in backward."""
    if cfg.activation_checkpointing == "none" or cfg.compile or model.args.attention != "doc_causal":
        return False
    return device_type == "cuda" and resolve_attention(model.attention_impl, device_type) == "flex"


def apply_activation_checkpointing(model: Transformer, mode: str, attention_outside: bool = False) -> None:
    """Wrap every block: `full` recomputes the whole block in backward but for attention and
    FULL_SAVED_OPS (the routed read), `selective` keeps the outputs of SAVED_OPS (matmuls,
    attention, top-k, the value bag, the routed read). `attention_outside`: the same policy
    on each block's FFN half alone (Block.checkpoint_ffn); attention and its projections
    keep their activations (attention_outside_checkpoints says when)."""
    if mode == "none":
        return
    policy = _selective_policy if mode == "selective" else _full_policy
    context_fn = partial(create_selective_checkpoint_contexts, policy)
    for i, block in enumerate(model.layers):
        if attention_outside:
            block.checkpoint_ffn = partial(checkpoint, use_reentrant=False, preserve_rng_state=False,
                                           context_fn=context_fn)
        else:
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False, context_fn=context_fn)


def apply_compile(model: Transformer, device_type: str, activation_checkpointing: str = "none") -> None:
    """torch.compile every block in place, each as one graph (fullgraph: a graph break is an
    error), after activation checkpointing and before FSDP, so FSDP's hooks stay outside the
    compiled code. A value table's read is one opaque op in the graph (routed_read: its
    routing's data-dependent collectives run inside it, eagerly). On CUDA, attention_impl auto
    becomes flex (resolve_attention still falls back to SDPA where Triton cannot run)."""
    if activation_checkpointing != "none" and not COMPILES_CHECKPOINTED_READS:
        raise ConfigError(
            f"distributed.compile with activation_checkpointing={activation_checkpointing} needs torch>=2.13 "
            f"(this is {torch.__version__}: its inductor cannot compile the backward of a checkpointed "
            "block's routed read); turn one of them off")
    if device_type == "cpu" and shutil.which(os.environ.get("CXX", "g++")) is None:
        raise ConfigError("distributed.compile: torch.compile on CPU needs a C++ compiler "
                          f"({os.environ.get('CXX', 'g++')} is not on PATH)")
    if device_type == "cuda" and model.attention_impl == "auto":
        # doc_causal under compile: flex_attention, compiled into each block; xformers' mask
        # holds Python lists of the documents' lengths, a recompile for every new batch
        model.attention_impl = "flex"
    for block in model.layers:
        block.compile(fullgraph=True)


def value_dtype(value_compute_dtype: str, cfg: DistributedConfig) -> str:
    """memory.value_compute_dtype as the tables compute: auto is the dense compute dtype's."""
    return cfg.compute_dtype if value_compute_dtype == "auto" else value_compute_dtype


def parallelize(model: Transformer, meshes: Meshes, cfg: DistributedConfig,
                value_compute_dtype: str = "auto") -> Transformer:
    """Activation checkpointing, compile, memory parallelism and FSDP2 / HSDP, applied to
    `model` in place at every world size (one process: FSDP2 at degree 1, so one and N
    processes share one precision mechanism); returns it. A model on the meta device is
    sharded without ever being whole: then `to_empty` and `init_weights` (each rank
    initialises its shards to the values the whole model would have); materialised
    weights are kept."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing,
                                   attention_outside_checkpoints(model, cfg, meshes.device_type))
    if cfg.compile:
        apply_compile(model, meshes.device_type, cfg.activation_checkpointing)
    dense_dtype = torch.bfloat16 if cfg.compute_dtype == "bf16" else torch.float32
    dense_policy = MixedPrecisionPolicy(param_dtype=dense_dtype, reduce_dtype=torch.float32)
    # a query BatchNorm keeps fp32 parameters, like its running statistics (fp32 buffers)
    fp32_policy = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)

    # value tables: columns over the mp group, rows over all the other ranks (mp_replicate,
    # the whole world when mp == 1), so each rank holds 1/world of every table whatever the
    # dense layout (HSDP included); read by routing, not gathered, and not FSDP2's
    # (parallel/memory_parallel.py). Rows travel in memory.value_compute_dtype, their
    # gradients in distributed.value_reduce_dtype; the shards stay fp32.
    compute = torch.bfloat16 if value_dtype(value_compute_dtype, cfg) == "bf16" else torch.float32
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
