"""Sharded safetensors written block by block, in bounded memory, and read back.

The layout is transformers': one `model.safetensors`, or `model-0000i-of-0000n.safetensors`
shards of at most `max_shard_bytes` each plus `model.safetensors.index.json` (`weight_map`:
tensor name -> shard file). A tensor larger than a shard gets a shard of its own. Each file
is written as the format defines it (8-byte header length, JSON header, raw little-endian
bytes) from `TensorSource.read(r0, r1)` row blocks, so peak memory is one block whatever
the model's size.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
           torch.uint8: "U8", torch.bool: "BOOL"}


@dataclass(frozen=True)
class TensorSource:
    """A tensor to write: its name in the file, shape, dtype, and read(r0, r1) giving rows
    r0:r1 (dim 0; the whole tensor for a 0-dim one) in any dtype (cast on write)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    read: Callable[[int, int], torch.Tensor]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(sources: list[TensorSource], max_shard_bytes: int) -> list[list[TensorSource]]:
    """Tensors in order, packed greedily into shards of at most max_shard_bytes (a larger
    tensor alone in its own)."""
    shards: list[list[TensorSource]] = [[]]
    size = 0
    for src in sources:
        if shards[-1] and size + src.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(src)
        size += src.nbytes
    return [s for s in shards if s]


def _header(shard: list[TensorSource], metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for src in shard:
        entries[src.name] = {"dtype": _DTYPES[src.dtype], "shape": list(src.shape),
                             "data_offsets": [offset, offset + src.nbytes]}
        offset += src.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    return raw + b" " * (-len(raw) % 8)  # the data starts 8-byte aligned


def _write_tensor(f, src: TensorSource, block_bytes: int) -> None:
    if not src.shape:
        blocks = [(0, 0)]
    else:
        row_bytes = max(1, src.nbytes // max(1, src.shape[0]))
        step = max(1, block_bytes // row_bytes)
        blocks = [(r, min(r + step, src.shape[0])) for r in range(0, src.shape[0], step)]
    for r0, r1 in blocks:
        block = src.read(r0, r1).to(src.dtype).contiguous()  # no copy when already so
        expected = src.shape if not src.shape else (r1 - r0, *src.shape[1:])
        if tuple(block.shape) != tuple(expected):
            raise ValueError(f"{src.name}: read {tuple(block.shape)} for rows {r0}:{r1}, expected {expected}")
        f.write(block.reshape(-1).view(torch.uint8).numpy().data)  # no copy


def write_sharded(out_dir: Path, sources: list[TensorSource], max_shard_bytes: int,
                  metadata: dict[str, str] | None = None, block_bytes: int = 64 << 20) -> list[Path]:
    """Write the sources into out_dir (which must exist) as one file or shards + index;
    returns the files written. Memory: one block of at most min(block_bytes, max_shard_bytes)."""
    block_bytes = max(1, min(block_bytes, max_shard_bytes))
    shards = plan_shards(sources, max_shard_bytes)
    names = [SINGLE] if len(shards) == 1 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                                                for i in range(len(shards))]
    meta = {"format": "pt", **(metadata or {})}
    for name, shard in zip(names, shards, strict=True):
        header = _header(shard, meta)
        with open(out_dir / name, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for src in shard:
                _write_tensor(f, src, block_bytes)
    written = [out_dir / n for n in names]
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in sources)},
                 "weight_map": {src.name: name for name, shard in zip(names, shards, strict=True)
                                for src in shard}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        written.append(out_dir / INDEX)
    return written


def weight_files(directory: Path) -> dict[str, Path]:
    """{tensor name: its file} of a directory holding model.safetensors or an index and its
    shards; ValueError (one line, naming the file) when neither is there or the index is bad."""
    if (directory / INDEX).is_file():
        try:
            weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
            files = {name: directory / file for name, file in weight_map.items()}
        except (ValueError, KeyError, TypeError, AttributeError):
            raise ValueError(f"{directory / INDEX}: unreadable (no weight_map)") from None
        for f in set(files.values()):
            if not f.is_file():
                raise ValueError(f"{f}: missing (listed in {INDEX})")
        return files
    single = directory / SINGLE
    if not single.is_file():
        raise ValueError(f"{single}: missing (and no {INDEX})")
    try:
        with safe_open(str(single), framework="pt") as f:
            return {name: single for name in f.keys()}
    except Exception as exc:
        raise ValueError(f"{single}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None


def read_tensors(directory: Path,
                 rename: Callable[[str], str | None] = lambda n: n) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's safetensors, named by rename(name) (None: skipped)."""
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name, f in weight_files(directory).items():
        by_file.setdefault(f, []).append(name)
    for path, names in by_file.items():
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in names:
                    new = rename(name)
                    if new is not None:
                        out[new] = f.get_tensor(name)
        except ValueError:
            raise
        except Exception as exc:  # a truncated or corrupt file
            raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    return out


def replace_dir(staging: Path, out: Path) -> None:
    """Put a fully written staging directory at `out` (removing what `out` held): a reader
    sees the old directory or the new one, never half of either, except across the two
    renames."""
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
