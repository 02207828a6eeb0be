"""python -m lingua_mem.checkpoint consolidate|export-hf <checkpoint dir> --out DIR"""

from __future__ import annotations

import argparse
import sys

from lingua_mem.checkpoint.consolidate import consolidate, parse_size
from lingua_mem.checkpoint.hf_export import export_hf
from lingua_mem.checkpoint.safetensors_stream import weight_files
from lingua_mem.cli import fail


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # a one-line ValueError instead of usage + exit
        raise ValueError(message)



def main(argv: list[str]) -> int:
    parser = _Parser(prog="python -m lingua_mem.checkpoint",
                     description="consolidate: a training checkpoint into safetensors + config.json "
                                 "(lingua_mem's names); export-hf: into a directory transformers loads.")
    parser.add_argument("command", choices=["consolidate", "export-hf"])
    parser.add_argument("checkpoint", help="a checkpoints/<step> directory")
    parser.add_argument("--out", required=True, help="output directory (empty or new, or give --force)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--force", action="store_true", help="replace a non-empty --out")
    parser.add_argument("--dtype", default="fp32", help="export-hf: fp32 | bf16 floating tensors")
    parser.add_argument("--no-tokenizer", action="store_true", help="export-hf: write no tokenizer files")
    try:
        args = parser.parse_args(argv)
        shard = parse_size(args.max_shard_size)
        if args.command == "consolidate":
            out = consolidate(args.checkpoint, args.out, shard, args.force)
        else:
            out = export_hf(args.checkpoint, args.out, args.dtype, shard, args.force, not args.no_tokenizer)
    except ValueError as exc:  # ConfigError included
        return fail(exc)
    files = weight_files(out)
    size = sum(f.stat().st_size for f in set(files.values())) / 1e9
    shards = len(set(files.values()))
    print(f"wrote {out}: {len(files)} tensors in {shards} safetensors file{'s' if shards > 1 else ''} "
          f"({size:.3g} GB)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
