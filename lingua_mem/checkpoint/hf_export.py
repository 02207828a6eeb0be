"""export-hf: a training checkpoint -> a directory transformers loads.

    python -m lingua_mem.checkpoint export-hf <checkpoint dir> --out DIR [--dtype fp32|bf16]
        [--max-shard-size 5GB] [--force] [--no-tokenizer]

    DIR/config.json                 LlamaConfig (a dense model: plain LlamaForCausalLM) or
                                    LinguaMemConfig with auto_map (a memory model: remote code)
    DIR/configuration_lingua_mem.py, modeling_lingua_mem.py     (memory models only)
    DIR/model*.safetensors (+ model.safetensors.index.json)    transformers' tensor names
    DIR/generation_config.json, tokenizer.json, tokenizer_config.json, ...
    DIR/lingua_mem.json             the model's own arguments, step and tokenizer: lingua_mem
                                    (eval.py, checkpoint.init_from) reads the directory back

The weights stream from the DCP checkpoint into shards (consolidate.checkpoint_sources), so
the export of any size runs in about one block of memory.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from lingua_mem.checkpoint.consolidate import checkpoint_sources, run_tokenizer, staged_output
from lingua_mem.checkpoint.hf_names import hf_name
from lingua_mem.checkpoint.records import FORMAT, checkpoint_model_args
from lingua_mem.checkpoint.safetensors_stream import write_sharded
from lingua_mem.config import TokenizerConfig
from lingua_mem.data.tokenizer import build_tokenizer
from lingua_mem.model.args import ModelArgs
from lingua_mem.run_dir import check_output

REMOTE = Path(__file__).parent / "hf_remote"
REMOTE_FILES = ("configuration_lingua_mem.py", "modeling_lingua_mem.py")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PROVENANCE = "lingua_mem.json"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ValueError("export-hf needs transformers: pip install 'lingua_mem[hf]'") from None
    return transformers


def hf_config(args: ModelArgs, bos_id: int, eos_id: int, dtype: str):
    """The transformers config of a model: LlamaConfig when it has no memory layer, else
    LinguaMemConfig (auto_map to the remote code copied beside it)."""
    transformers = _transformers()
    common = dict(vocab_size=args.vocab_size, hidden_size=args.dim, intermediate_size=args.ffn_hidden_dim,
                  num_hidden_layers=args.n_layers, num_attention_heads=args.n_heads,
                  num_key_value_heads=args.n_kv_heads, rms_norm_eps=args.norm_eps,
                  max_position_embeddings=args.max_seq_len, tie_word_embeddings=args.tie_embeddings,
                  bos_token_id=bos_id, eos_token_id=eos_id)
    if not args.memory.layers:
        rope = {"rope_type": "default", "rope_theta": args.rope_theta}
        config = transformers.LlamaConfig(**common, head_dim=args.head_dim, attention_bias=False,
                                          mlp_bias=False, rope_parameters=rope)
        config.architectures = ["LlamaForCausalLM"]
    else:
        from lingua_mem.checkpoint.hf_remote.configuration_lingua_mem import LinguaMemConfig

        mem = args.memory
        config = LinguaMemConfig(**common, rope_theta=args.rope_theta, memory_layers=list(mem.layers),
                                 memory_n_keys=mem.n_keys, memory_heads=mem.heads, memory_knn=mem.knn,
                                 memory_k_dim=mem.k_dim, memory_v_dim=mem.v_dim,
                                 memory_shared_values=mem.shared_values, memory_swilu=mem.swilu,
                                 memory_qk_norm=mem.qk_norm, memory_query_batchnorm=mem.query_batchnorm)
        config.architectures = ["LinguaMemForCausalLM"]
        config.auto_map = {"AutoConfig": "configuration_lingua_mem.LinguaMemConfig",
                           "AutoModelForCausalLM": "modeling_lingua_mem.LinguaMemForCausalLM"}
    config.dtype = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    return config


def export_hf(checkpoint_dir: str | Path, out_dir: str | Path, dtype: str = "fp32",
              max_shard_bytes: int = 5 * 10**9, force: bool = False, tokenizer: bool = True) -> Path:
    """Write the transformers directory of a training checkpoint (module docstring); returns
    out_dir. ValueError (one line, naming the path or key) for a missing or corrupt
    checkpoint, an unusable tokenizer, or an out_dir that is not empty (without `force`)."""
    from lingua_mem.checkpoint.hf_tokenizer import save_hf_tokenizer

    transformers = _transformers()
    path, out = Path(checkpoint_dir), Path(out_dir)
    check_output(out, [path])  # with --force too: before anything is read or written
    if dtype not in DTYPES:
        raise ValueError(f"--dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    args, run_config = checkpoint_model_args(path)
    families = (["moe"] if args.moe.layers else []) + \
        ([args.memory.kind] if args.memory.layers and args.memory.kind != "pkm" else [])
    if families:
        family = " and ".join(families)
        raise ValueError(f"{path}: export-hf has no transformers model for {family} layers (only dense and "
                         "product-key memory); `python -m lingua_mem.checkpoint consolidate` exports it")
    tok_cfg = run_tokenizer(run_config)
    tok = build_tokenizer(TokenizerConfig(name=tok_cfg["name"], path=tok_cfg.get("path")))
    if tok.n_words > args.vocab_size:
        raise ValueError(f"{path}: the run's tokenizer ({tok_cfg['name']}) has {tok.n_words} tokens, the "
                         f"model embeds only {args.vocab_size} (model.vocab_size)")
    sources = checkpoint_sources(path, args, rename=hf_name, dtype=DTYPES[dtype])
    step = int(path.name) if path.name.isdigit() else None
    config = hf_config(args, tok.bos_id, tok.eos_id, dtype)
    generation = transformers.GenerationConfig(bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
                                               pad_token_id=tok.eos_id)
    provenance = {"format": FORMAT, "names": "hf", "step": step, "model": args.to_dict(),
                  "tokenizer": tok_cfg, "dtype": dtype}
    with staged_output(out, force) as staging:
        if tokenizer:
            save_hf_tokenizer(tok, tok_cfg, staging)  # first: a tokenizer it cannot convert fails early
        write_sharded(staging, sources, max_shard_bytes)
        config.save_pretrained(staging)
        generation.save_pretrained(staging)
        if args.memory.layers:
            for name in REMOTE_FILES:
                shutil.copyfile(REMOTE / name, staging / name)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=2) + "\n")
    return out
