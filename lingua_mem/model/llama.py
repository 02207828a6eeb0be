"""Llama decoder whose FFN at chosen layers is a product-key memory.

Plain PyTorch: no process groups. Parameters are created uninitialised (build
on the meta device, then `to_empty`) and get their values from `init_weights`.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention.flex_attention import BlockMask, flex_attention

from lingua_mem.cli import one_line
from lingua_mem.errors import ConfigError
from lingua_mem.kernels.embedding_bag import triton_problem_on
from lingua_mem.memory import ProductKeyMemory, ValueTable
from lingua_mem.memory import layer as memory_layer
from lingua_mem.memory.peer import PEER
from lingua_mem.memory.ultramem import UltraMem
from lingua_mem.model.args import ModelArgs
from lingua_mem.model.kv_cache import KVCache, attention_mask
from lingua_mem.model.loss import linear_cross_entropy
from lingua_mem.model.moe import AuxLosses, MoEFeedForward
from lingua_mem.param_init import ParamInit

# the attention kernels (each also draws random numbers for its dropout, so a recompute of
# one under torch.compile has to save the generator's state)
ATTENTION_OPS = frozenset({
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    # xformers' memory-efficient attention runs these aten kernels (its cutlass path) or its own
    # flash ops, named below: registered when xformers is imported, so matched by name
    torch.ops.aten._efficient_attention_forward.default,
    torch.ops.aten._flash_attention_forward.default,
    torch.ops.higher_order.flex_attention,  # flex_attention's op, as compiled code sees it
})
ATTENTION_OP_NAMES = frozenset({"xformers_flash::flash_fwd", "xformers_flash3::flash_fwd"})


def is_attention_op(op) -> bool:
    """Whether `op` (what checkpointing policies are given) is an attention kernel."""
    return op in ATTENTION_OPS or (hasattr(op, "name") and op.name() in ATTENTION_OP_NAMES)
# ops whose outputs selective activation checkpointing keeps (everything else is
# recomputed): this model's matmuls and attention, and what the memory search and the
# kernels declare for themselves (memory.layer.SAVED_OPS)
ACTIVATION_SAVED_OPS = frozenset({
    torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
}) | ATTENTION_OPS | memory_layer.SAVED_OPS


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin: (max_seq_len, head_dim), the half-split ("rotate half") layout."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)  # (hd/2,)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (T, hd/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hd)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, hd); cos, sin: (T, hd), or (B, 1, T, hd) at explicit positions
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).type_as(x)


@functools.cache
def compiled_flex_attention():
    """flex_attention compiled (fused; on CUDA), made at first use: building the wrapper
    imports the compiler (seconds), which no CPU run should pay. Eager flex_attention is the
    reference (CPU tests)."""
    return torch.compile(flex_attention, dynamic=False)


@functools.cache
def xformers_fmha():
    """xformers.ops.fmha, or None when xformers is not installed (imported at first use)."""
    try:
        from xformers.ops import fmha
    except ImportError:
        return None
    return fmha


def xformers_problem(device: torch.device | str) -> str | None:
    """Why xformers' memory-efficient attention cannot run on `device`, in one line; None when
    it can. Not installed, or installed but a tiny block-diagonal call fails there (an xformers
    built for another torch imports but has no kernels; xformers has none for the CPU)."""
    fmha = xformers_fmha()
    if fmha is None:
        return "xformers is not installed (pip install xformers, or the gpu extra)"
    try:
        q = torch.zeros(1, 4, 1, 8, device=device, dtype=torch.bfloat16 if torch.device(device).type == "cuda"
                        else torch.float32)  # (1, B*T, H, hd): two documents of 2 tokens
        two_documents = fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens([2, 2])
        fmha.memory_efficient_attention(q, q, q, attn_bias=two_documents)
    except Exception as exc:  # noqa: BLE001 - whatever stops the kernel: NotImplementedError, RuntimeError
        return f"xformers cannot run on {torch.device(device).type}: " + one_line(exc)[:200]
    return None


@functools.cache
def _xformers_problem_on(device_type: str) -> str | None:
    # probed once per process: a GPU run's problem is the CUDA call's; elsewhere xformers
    # runs its CPU twin (block_diagonal_attention), which needs only the installed package
    if device_type == "cuda":
        return xformers_problem("cuda")
    return None if xformers_fmha() is not None else xformers_problem("cpu")


def choose_attention(impl: str, device_type: str, problem: str | None) -> str:
    """doc_causal's implementation, given what stops xformers here (`problem`, None if
    nothing): auto is xformers on CUDA when it runs, else flex on CUDA (one warning line when
    xformers is installed but cannot run), else sdpa; an explicit xformers that cannot run
    is one ConfigError line."""
    if impl == "auto":
        if device_type != "cuda":
            return "sdpa"
        if problem is not None and xformers_fmha() is not None:
            # shown once a process (the default warning filter: once per message and line)
            warnings.warn(f"model.attention_impl=auto: {problem}; using flex_attention", stacklevel=2)
        return "xformers" if problem is None else "flex"
    if impl == "xformers" and problem is not None:
        raise ConfigError(f"model.attention_impl: {problem}")
    return impl


def resolve_attention(impl: str, device_type: str) -> str:
    """doc_causal's implementation on this process's device (choose_attention, xformers probed
    once). xformers off CUDA runs its CPU twin (the bias materialised, for tests). flex on CUDA
    runs compiled, which needs Triton: where Triton cannot run (kernels.triton_problem, probed
    once), auto falls back to SDPA with one warning line and an explicit flex is one
    ConfigError line."""
    needs_probe = impl == "xformers" or (impl == "auto" and device_type == "cuda")
    chosen = choose_attention(impl, device_type, _xformers_problem_on(device_type) if needs_probe else None)
    if chosen == "flex" and device_type == "cuda":
        problem = triton_problem_on(device_type)
        if problem is not None and impl == "auto":
            warnings.warn(f"model.attention_impl=auto: {problem}; using scaled_dot_product_attention",
                          stacklevel=2)
            return "sdpa"
        if problem is not None:
            raise ConfigError(f"model.attention_impl: flex runs compiled on cuda, and {problem}")
    return chosen


@dataclass(frozen=True)
class BlockDiagonalMask:
    """xformers' block-diagonal causal bias over a batch's B*T tokens taken as one sequence
    (one block per document, row after row)."""

    bias: object  # xformers.ops.fmha.attn_bias.BlockDiagonalCausalMask


class OnHost:
    """A tensor the model's caller keeps on the host (doc_ids for xformers' document mask,
    whose lengths are read on the host). FSDP2's root pre-forward moves every tensor argument
    to the device, looking into tuples, lists, dicts and dataclasses; a plain object it passes
    as it is (as memory.layer.Bag). Transformer.forward unwraps it."""

    __slots__ = ("tensor",)

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def document_lengths(doc_ids: torch.Tensor) -> list[int]:
    """The length of every document of doc_ids (B, T), row after row (a row's first token
    starts a document)."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    offsets = starts.flatten().nonzero().flatten()  # (docs,) into the B*T tokens
    end = torch.tensor([doc_ids.numel()], device=doc_ids.device)
    # a host sync when doc_ids are on a GPU (the trainer keeps them on the host for xformers)
    return torch.diff(offsets, append=end).tolist()


def document_mask(doc_ids: torch.Tensor, impl: str) -> torch.Tensor | BlockMask | BlockDiagonalMask:
    """doc_causal attention for doc_ids (B, T): key j <= query i of the same document. For
    flex_attention a BlockMask (blocks of other documents skipped), for xformers a
    BlockDiagonalMask, for SDPA a bool mask (B, 1, T, T)."""
    b, t = doc_ids.shape
    if impl == "flex":
        return document_block_mask(doc_ids)
    if impl == "xformers":
        bias_type = xformers_fmha().attn_bias.BlockDiagonalCausalMask
        return BlockDiagonalMask(bias_type.from_seqlens(document_lengths(doc_ids)))
    causal = torch.ones(t, t, dtype=torch.bool, device=doc_ids.device).tril()
    return ((doc_ids[:, :, None] == doc_ids[:, None, :]) & causal).unsqueeze(1)


def document_block_mask(doc_ids: torch.Tensor, block: int = 128) -> BlockMask:
    """flex_attention's BlockMask of doc_causal attention, built from the documents' extent in
    each block of `block` tokens: O((T/block)^2) work a row, where create_block_mask evaluates
    the mask at every (query, key) pair (O(T^2)). doc_ids (B, T) non-decreasing along each row
    (packed documents: the loader's document_ids). A key block is read by a query block when
    it is not after it and its last document reaches the query block's first; it is full
    (no mask evaluated in it) when both blocks lie in one and the same document, the key
    block strictly earlier (and neither is a ragged last block)."""
    b, t = doc_ids.shape
    nb = -(-t // block)
    ids = F.pad(doc_ids, (0, nb * block - t), mode="replicate") if t % block else doc_ids
    ids = ids.reshape(b, nb, block)
    first, last = ids.amin(-1), ids.amax(-1)  # (B, nb): the documents each block holds
    n = torch.arange(nb, device=doc_ids.device)
    not_after = n[None, :] <= n[:, None]  # (nq, nk)
    read = not_after & (last[:, None, :] >= first[:, :, None])  # (B, nq, nk)
    one_doc = first == last
    full = ((n[None, :] < n[:, None]) & one_doc[:, :, None] & one_doc[:, None, :]
            & (first[:, :, None] == first[:, None, :]))
    if t % block:  # the ragged last block holds padding: never full
        full[:, -1, :] = False
        full[:, :, -1] = False
    partial = read & ~full

    def kv_blocks(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # (B, 1, nq) blocks read per query block, (B, 1, nq, nk) their indices first, ascending
        order = torch.argsort(~m, dim=-1, stable=True).to(torch.int32)
        return m.sum(-1, dtype=torch.int32)[:, None], order[:, None]

    def same_document(bi, h, qi, ki):
        return (ki <= qi) & (doc_ids[bi, qi] == doc_ids[bi, ki])

    return BlockMask.from_kv_blocks(*kv_blocks(partial), *kv_blocks(full), BLOCK_SIZE=block,
                                    mask_mod=same_document, seq_lengths=(t, t))


def block_diagonal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             mask: BlockDiagonalMask) -> torch.Tensor:
    """q (B, H, T, hd), k and v (B, KV, T, hd) -> (B, H, T, hd), attending within the blocks
    of `mask`: xformers' memory-efficient attention on CUDA; elsewhere its CPU twin, the
    same bias materialised (B*T x B*T) through SDPA."""
    b, h, t, hd = q.shape
    if k.shape[1] != h:  # grouped-query: query head i reads kv head i // (H / KV)
        k, v = (x.repeat_interleave(h // k.shape[1], dim=1) for x in (k, v))
    q, k, v = (x.transpose(1, 2).reshape(1, b * t, h, hd) for x in (q, k, v))  # (1, B*T, H, hd)
    if q.is_cuda:
        y = xformers_fmha().memory_efficient_attention(q, k, v, attn_bias=mask.bias)
    else:
        dense = mask.bias.materialize((b * t, b * t), dtype=q.dtype, device=q.device)  # 0 / -inf
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (1, H, B*T, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=dense).transpose(1, 2)
    return y.reshape(b, t, h, hd).transpose(1, 2)  # (B, H, T, hd)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, enable_gqa: bool,
                compiled: bool) -> torch.Tensor:
    """flex_attention, `compiled` (fused: on CUDA) or eager (the CPU's reference, forward only).
    Compiled it stays compiled where a caller forced eager mode on compiled code (the
    evaluator under distributed.compile): eager flex builds the whole (B, H, T, T) score
    matrix. Inside a compiled block it is traced into the block's graph."""
    if not compiled:
        return flex_attention(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    flex = compiled_flex_attention()
    if torch.compiler.is_compiling():
        return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)
    with torch.compiler.set_stance("default"):
        return flex(q, k, v, block_mask=block_mask, enable_gqa=enable_gqa)


class Attention(nn.Module):
    """Causal grouped-query attention with RoPE, through scaled_dot_product_attention (or,
    for a document mask, flex_attention or xformers)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, self.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, self.kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, self.kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(self.n_heads * self.head_dim, args.dim, bias=False)

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        for lin, s in ((self.wq, std), (self.wk, std), (self.wv, std), (self.wo, out_std)):
            init.trunc_normal_(lin.weight, std=s)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | BlockMask | BlockDiagonalMask | None = None,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        """mask None: plain causal attention over x's T tokens (training). A BlockMask or a
        BlockDiagonalMask: flex_attention or xformers (doc_causal on CUDA). Else a bool mask
        (B, 1, T, S) over S key slots: x's own (S = T), or with `cache` the cached slots
        followed by x's (this call's keys and values are written into the cache)."""
        b, t, _ = x.shape  # (B, T, dim)
        q = self.wq(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, KV, S, hd)
        gqa = self.kv_heads != self.n_heads
        if isinstance(mask, BlockDiagonalMask):
            y = block_diagonal_attention(q, k, v, mask)
        elif isinstance(mask, BlockMask):
            y = flex_attend(q, k, v, mask, gqa, compiled=q.is_cuda)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                               enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(b, t, -1))  # (B, T, dim)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        for lin, s in ((self.w1, std), (self.w3, std), (self.w2, out_std)):
            init.trunc_normal_(lin.weight, std=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def build_ffn(layer_id: int, args: ModelArgs) -> nn.Module:
    """The FFN slot of block `layer_id`, by family: a product-key layer (memory.kind: pkm, the
    paper's Memory+ or Memory; peer; ultramem) at memory.layers, a mixture of experts at
    moe.layers, else the dense SwiGLU."""
    mem, moe = args.memory, args.moe
    if layer_id in mem.layers and mem.kind == "peer":
        return PEER(args.dim, mem.n_keys, mem.heads, mem.knn, mem.k_dim, qk_norm=mem.qk_norm,
                    query_batchnorm=mem.query_batchnorm, norm_eps=args.norm_eps)
    if layer_id in mem.layers and mem.kind == "ultramem":
        return UltraMem(args.dim, mem.n_keys, mem.heads, mem.knn, mem.k_dim, mem.v_dim, rank=mem.tucker_rank,
                        expansion=mem.value_expansion, qk_norm=mem.qk_norm,
                        query_batchnorm=mem.query_batchnorm, norm_eps=args.norm_eps)
    if layer_id in mem.layers:
        return ProductKeyMemory(args.dim, mem.n_keys, mem.heads, mem.knn, mem.k_dim, mem.v_dim,
                                swilu=mem.swilu, qk_norm=mem.qk_norm, query_batchnorm=mem.query_batchnorm,
                                norm_eps=args.norm_eps)
    if layer_id in moe.layers:
        return MoEFeedForward(args.dim, moe.hidden_dim, moe.experts, moe.top_k, moe.aux_loss_weight)
    return FeedForward(args.dim, args.ffn_hidden_dim)


class Block(nn.Module):
    """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)), the FFN slot's family
    chosen by build_ffn (a memory layer reads the value table it is handed)."""

    def __init__(self, layer_id: int, args: ModelArgs):
        super().__init__()
        self.layer_id = layer_id
        self.attention_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.feed_forward = build_ffn(layer_id, args)
        # set by parallel.parallelize where activation checkpointing must leave attention out:
        # checkpoint(fn, *args) -> fn(*args) recomputed in backward, run on the FFN half alone
        self.checkpoint_ffn = None

    @property
    def is_memory(self) -> bool:
        return isinstance(self.feed_forward, ProductKeyMemory)

    @torch.no_grad()
    def init_weights(self, init: ParamInit, std: float, out_std: float) -> None:
        init.constant_(self.attention_norm.weight, 1.0)
        init.constant_(self.ffn_norm.weight, 1.0)
        self.attention.init_weights(init, std, out_std)
        if self.is_memory:
            self.feed_forward.init_weights(init, out_std)
        else:
            self.feed_forward.init_weights(init, std, out_std)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                values: ValueTable | None = None, mask: torch.Tensor | BlockMask | None = None,
                cache: KVCache | None = None, aux: AuxLosses | None = None) -> torch.Tensor:
        """`aux` (training): where a mixture of experts puts its balancing loss."""
        h = x + self.attention(self.attention_norm(x), rope, mask, cache, self.layer_id)
        if self.checkpoint_ffn is not None:
            return self.checkpoint_ffn(self.ffn_half, h, values, aux)
        return self.ffn_half(h, values, aux)

    def ffn_half(self, h: torch.Tensor, values: ValueTable | None, aux: AuxLosses | None) -> torch.Tensor:
        """h (B, T, dim) -> h + ffn(norm(h))."""
        if self.is_memory:
            return h + self.feed_forward(self.ffn_norm(h), values)
        if isinstance(self.feed_forward, MoEFeedForward):
            return h + self.feed_forward(self.ffn_norm(h), aux)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab).

    Owns the value tables in `values` (key "shared", or "layer<i>" per memory
    layer when not shared) and hands each memory block its table at call time.
    """

    def __init__(self, args: ModelArgs, kernel: str = "auto", attention_impl: str = "auto"):
        super().__init__()
        self.args = args
        self.attention_impl = attention_impl  # doc_causal's: auto | sdpa | flex | xformers
        mem = args.memory
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(i, args) for i in range(args.n_layers))
        self.norm = nn.RMSNorm(args.dim, eps=args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        if mem.layers and mem.shared_values:
            self.value_key = {i: "shared" for i in mem.layers}
        else:
            self.value_key = {i: f"layer{i}" for i in mem.layers}
        self.values = nn.ModuleDict({k: ValueTable(mem.n_values, mem.v_dim, kernel)
                                     for k in sorted(set(self.value_key.values()))})
        self.register_buffer("rope_cos", torch.empty(args.max_seq_len, args.head_dim), persistent=False)
        self.register_buffer("rope_sin", torch.empty(args.max_seq_len, args.head_dim), persistent=False)

    @torch.no_grad()
    def init_weights(self, seed: int = 0) -> None:
        """Give every parameter and buffer a defined value (after to_empty), a function
        of `seed` alone: the same whether the model is whole or sharded (param_init.py)."""
        init = ParamInit(seed)
        self.init_rope()
        std = self.args.init_std
        out_std = std / math.sqrt(2 * self.args.n_layers)  # residual-stream writers
        init.normal_(self.tok_embeddings.weight, std=std)
        for block in self.layers:
            block.init_weights(init, std, out_std)
        init.constant_(self.norm.weight, 1.0)
        if self.output is not None:
            init.trunc_normal_(self.output.weight, std=std)
        for table in self.values.values():
            table.init_weights(init)

    @torch.no_grad()
    def init_rope(self, device: torch.device | str | None = None) -> None:
        """The RoPE tables (non-persistent buffers: in no state dict), on their device, or
        on `device` for a model still on meta (its weights assigned from a state dict)."""
        cos, sin = rope_tables(self.args.head_dim, self.args.max_seq_len, self.args.rope_theta)
        if self.rope_cos.is_meta:
            self.rope_cos, self.rope_sin = cos.to(device), sin.to(device)
        else:
            self.rope_cos.copy_(cos)
            self.rope_sin.copy_(sin)

    def value_tables(self) -> list[ValueTable]:
        return list(self.values.values())

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                valid: torch.Tensor | None = None, cache: KVCache | None = None,
                doc_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                reduction: str = "mean") -> torch.Tensor:
        """tokens (B, T). Training passes tokens (positions 0..T-1) and, for doc_causal
        attention, doc_ids (B, T): each token attends to the earlier tokens of its own
        document (RoPE is relative, so a document scores as it would alone). Evaluation and
        generation may give positions (B, T) for RoPE, valid (B, T) bool (False: padding,
        never attended to) and a KVCache (the tokens follow the cached ones). Returns the
        logits (B, T, vocab), or with targets (B, T) the next-token loss (`reduction` mean or
        sum, fp32), computed without whole logits (loss.linear_cross_entropy); in training mode
        plus the MoE layers' balancing losses (moe.aux_loss_weight each)."""
        b, t = tokens.shape
        if isinstance(doc_ids, OnHost):  # kept on the host by the caller (xformers' lengths)
            doc_ids = doc_ids.tensor
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        mask = None
        if positions is None and valid is None and cache is None:
            rope = (self.rope_cos[:t], self.rope_sin[:t])  # (T, hd)
            if doc_ids is not None and self.args.attention == "doc_causal":
                impl = resolve_attention(self.attention_impl, tokens.device.type)
                mask = document_mask(doc_ids, impl)
        else:
            start = cache.length if cache is not None else 0
            if positions is None:
                positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
            if valid is None:
                valid = torch.ones(b, t, dtype=torch.bool, device=tokens.device)
            rope = (self.rope_cos[positions].unsqueeze(1),  # (B, 1, T, hd)
                    self.rope_sin[positions].unsqueeze(1))
            if cache is not None:
                cache.begin(valid)
                mask = cache.mask  # (B, 1, T, start + T)
            else:
                mask = attention_mask(valid, 0, t)  # (B, 1, T, T)
        aux = AuxLosses() if self.training and targets is not None else None
        for block in self.layers:
            key = self.value_key.get(block.layer_id)
            h = block(h, rope, self.values[key] if key else None, mask, cache, aux)
        if cache is not None:
            cache.end(t)
        h = self.norm(h)
        weight = self.tok_embeddings.weight if self.output is None else self.output.weight  # (vocab, dim)
        if targets is not None:
            loss = linear_cross_entropy(h, weight, targets, reduction)
            balance = aux.total() if aux is not None else None
            return loss if balance is None else loss + balance
        return F.linear(h, weight)  # (B, T, vocab)


def build_model(args: ModelArgs, device: torch.device | str = "cpu", init: bool = True,
                seed: int = 0, kernel: str = "auto", attention_impl: str = "auto") -> Transformer:
    """Build on the meta device, materialise on `device`, then init_weights(seed). `kernel`
    (the value bag's, memory.kernel) and `attention_impl` (doc_causal's, model.attention_impl)
    are implementations, not part of the model's arguments."""
    with torch.device("meta"):
        model = Transformer(args, kernel, attention_impl)
    if str(device) == "meta":
        return model
    model.to_empty(device=device)
    if init:
        model.init_weights(seed)
    return model
