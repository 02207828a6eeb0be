"""Prepare a real corpus: shuffled jsonl training chunks and a held-out validation file.

    python -m lingua_mem.data.prepare --input PATH [PATH ...] --out DIR --chunks K \\
        --val-docs V --seed S [--text-field text] [--format auto|jsonl|parquet|text|hf] \\
        [--split train] [--bucket-mb 256] [--overwrite]

Inputs: files or directories (a directory's files sorted, not recursive; hidden
files ignored), read in the order given, by the readers of sources.py (the
training loader's): jsonl(.gz), parquet, text (.txt(.gz), a document per
non-blank line) or a `datasets` save_to_disk folder (of a DatasetDict: its
--split). --format auto picks by file extension, and takes a directory holding
dataset_dict.json, or dataset_info.json and state.json, for a HF folder.

Output, built in a hidden sibling directory and renamed to DIR when complete
(a half-finished run never looks complete):
  DIR/train/chunk.00000.jsonl ... chunk.<K-1>  {"text": ...} per line, near-equal sizes
  DIR/val/val.jsonl                            the V held-out documents
  DIR/prepare.json                             counts per chunk, skipped lines, seed, buckets
Train on it with data.sources.<name>.path=DIR/train (DIR/val can be read the
same way). DIR itself holds no *.jsonl, so a source pointed at DIR fails at
start-up instead of silently training on the validation file.

Bad lines (invalid UTF-8, invalid JSON, text field missing or not a string,
every row of a parquet file without that column) and empty texts are skipped
and counted by reason, never fatal; a file that cannot be read to its end (e.g.
a truncated .gz) is counted as "bad_file", with a warning naming it.

Method, an external shuffle in two passes, deterministic by seed:
  pass 1  stream every document and append it, with its index, to one of
          FAN_OUT temporary bucket files chosen by a seeded RNG
  then    choose the V validation indices: a seeded sample of range(N)
  pass 2  for each bucket in turn: load it, shuffle it with a seeded RNG, and
          write its documents to val or to the current training chunk. A
          bucket over --bucket-mb is first split into sub-buckets the same way.
Iid random bucket labels followed by a uniform shuffle inside each bucket give
a uniform random permutation of the corpus; the chunks are consecutive slices
of it. The output depends on the seed, the inputs and --bucket-mb.

Memory bound: one bucket (at most --bucket-mb of JSON lines, unless a single
document is larger), the set of V validation indices, and FAN_OUT file
buffers; never the corpus. prepare.json reports max_bucket_docs and
max_bucket_bytes, the most held at once. Disk: the buckets take about the
corpus size (as JSON lines) next to DIR, on top of the output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from lingua_mem.cli import fail
from lingua_mem.data.sources import (
    FORMATS,
    READERS,
    SourceError,
    files_in,
    format_of,
    is_saved_dataset,
    load_saved_dataset,
    read_dataset,
)
from lingua_mem.run_dir import check_output, staging_dir

VERSION = 1
FAN_OUT = 128  # bucket files open at once in pass 1 (and when splitting a bucket)
PROGRESS_EVERY = 1_000_000  # documents between progress lines on stderr


class InputError(ValueError):
    """A bad input or output path; the message is one line and names it (exit 2)."""


@dataclass
class ReadStats:
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> lines/documents skipped
    bad_files: list[str] = field(default_factory=list)  # "path: why" of files not read to the end

    def skip(self, reason: str, path: str = "") -> None:
        """Count a skip reason from sources.py; "bad_file: <why>" also names the file and warns."""
        reason, _, why = reason.partition(": ")
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        if why:
            self.bad_files.append(f"{path}: {why}")
            print(f"warning: skipped the rest of {path}: {why}", file=sys.stderr)


# ---------------------------------------------------------------- reading documents

def find_inputs(paths: list[str], fmt: str = "auto") -> list[tuple[str, str]]:
    """(path, format) of every input file or HF folder, in order.

    Raises InputError for a path that does not exist or holds nothing readable.
    """
    if fmt not in FORMATS:
        raise InputError(f"--format: {fmt!r} is not one of {', '.join(FORMATS)}")
    found = []
    for p in paths:
        if not os.path.exists(p):
            raise InputError(f"no such file or directory: {p}")
        if fmt == "hf" or (fmt == "auto" and is_saved_dataset(p)):
            if not is_saved_dataset(p):
                raise InputError(f"not a datasets save_to_disk folder: {p}")
            found.append((p, "hf"))
        elif os.path.isdir(p):
            files = files_in(p, None if fmt == "auto" else fmt)
            if not files:
                kinds = "jsonl(.gz), parquet or txt(.gz)" if fmt == "auto" else fmt
                raise InputError(f"no {kinds} files in directory {p}")
            found += [(f, format_of(f)) for f in files]
        else:
            file_fmt = format_of(p) if fmt == "auto" else fmt
            if file_fmt is None:
                raise InputError(f"cannot tell the format of {p} by its name; give --format")
            found.append((p, file_fmt))
    return found


def iter_documents(files: list[tuple[str, str]], text_field: str, stats: ReadStats,
                   split: str = "train") -> Iterator[str]:
    """The non-empty texts of `files` (from find_inputs) in order; what is skipped goes to `stats`."""
    for path, fmt in files:
        if fmt == "hf":
            try:
                reads = read_dataset(load_saved_dataset(path, split, text_field), text_field)
            except SourceError as exc:
                raise InputError(str(exc)) from None
        else:
            reads = READERS[fmt](path, text_field)
        for _, text, skip in reads:
            if skip is None and text.strip():
                yield text
            else:
                stats.skip(skip or "empty", path)


# ---------------------------------------------------------------- the external shuffle

@dataclass
class Bucket:
    name: str  # "b017", or "b017.3" for a sub-bucket; seeds the bucket's shuffle
    path: Path
    docs: int = 0
    nbytes: int = 0


def scatter(lines: Iterable[bytes], directory: Path, prefix: str, n: int, rng: random.Random) -> list[Bucket]:
    """Append each line to one of n new bucket files, chosen by rng."""
    width = len(str(n - 1))
    buckets = [Bucket(f"{prefix}{i:0{width}d}", directory / f"{prefix}{i:0{width}d}") for i in range(n)]
    with ExitStack() as stack:
        files = [stack.enter_context(open(b.path, "wb")) for b in buckets]
        for line in lines:
            i = rng.randrange(n)
            files[i].write(line)
            buckets[i].docs += 1
            buckets[i].nbytes += len(line)
    return buckets


def numbered_lines(docs: Iterable[str], stats: ReadStats) -> Iterator[bytes]:
    """b'<index>\\t{"text": ...}\\n' per document; texts UTF-8 cannot encode (lone surrogates) skipped."""
    index = 0
    for text in docs:
        try:
            body = json.dumps({"text": text}, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            stats.skip("bad_utf8")
            continue
        yield b"%d\t%s\n" % (index, body)
        index += 1
        if index % PROGRESS_EVERY == 0:
            print(f"prepare: {index} documents read", file=sys.stderr)


class ChunkWriter:
    """Writes n_docs lines into n_chunks files of near-equal size, in order."""

    def __init__(self, directory: Path, n_chunks: int, n_docs: int):
        self.directory = directory
        self.ends = [(k + 1) * n_docs // n_chunks for k in range(n_chunks)]  # chunk k ends before ends[k]
        self.counts = [0] * n_chunks
        self.k = 0
        self.written = 0
        self.fh = open(self.path(0), "wb")

    def path(self, k: int) -> Path:
        return self.directory / f"chunk.{k:05d}.jsonl"

    def write(self, line: bytes) -> None:
        while self.written >= self.ends[self.k]:
            self.fh.close()
            self.k += 1
            self.fh = open(self.path(self.k), "wb")
        self.fh.write(line)
        self.counts[self.k] += 1
        self.written += 1

    def close(self) -> None:
        self.fh.close()
        for k in range(self.k + 1, len(self.ends)):  # every chunk file exists, even an empty one
            self.path(k).touch()


@dataclass
class Drain:
    """Where pass 2 sends documents, and the most it held in memory."""

    train: ChunkWriter
    val: BinaryIO
    val_index: set[int]
    seed: int
    limit: int  # bytes: a larger bucket is split first
    buckets: int = 0  # buckets loaded
    max_bucket_docs: int = 0
    max_bucket_bytes: int = 0

    def bucket(self, b: Bucket) -> None:
        if b.nbytes > self.limit and b.docs > 1:
            n = min(FAN_OUT, max(2, math.ceil(2 * b.nbytes / self.limit)))
            rng = random.Random(f"lingua_mem.prepare:{self.seed}:split:{b.name}")
            with open(b.path, "rb") as fh:
                parts = scatter(fh, b.path.parent, b.name + ".", n, rng)
            b.path.unlink()
            for part in parts:
                self.bucket(part)
            return
        with open(b.path, "rb") as fh:
            lines = fh.readlines()
        self.buckets += 1
        self.max_bucket_docs = max(self.max_bucket_docs, len(lines))
        self.max_bucket_bytes = max(self.max_bucket_bytes, b.nbytes)
        random.Random(f"lingua_mem.prepare:{self.seed}:shuffle:{b.name}").shuffle(lines)
        for line in lines:
            index, body = line.split(b"\t", 1)
            if int(index) in self.val_index:
                self.val.write(body)
            else:
                self.train.write(body)
        b.path.unlink()


def prepare_into(work: Path, inputs: list[str], files: list[tuple[str, str]], chunks: int, val_docs: int,
                 seed: int, text_field: str, split: str, bucket_mb: float) -> dict:
    """Both passes, writing train/, val/ and prepare.json under `work`; returns the summary."""
    stats = ReadStats()
    bucket_dir = work / "buckets"
    bucket_dir.mkdir()
    rng = random.Random(f"lingua_mem.prepare:{seed}:scatter")
    lines = numbered_lines(iter_documents(files, text_field, stats, split), stats)
    buckets = scatter(lines, bucket_dir, "b", FAN_OUT, rng)
    n_docs = sum(b.docs for b in buckets)
    n_val = min(val_docs, n_docs)
    val_index = set(random.Random(f"lingua_mem.prepare:{seed}:val").sample(range(n_docs), n_val))

    (work / "train").mkdir()
    (work / "val").mkdir()
    train = ChunkWriter(work / "train", chunks, n_docs - n_val)
    with open(work / "val" / "val.jsonl", "wb") as val:
        drain = Drain(train, val, val_index, seed, limit=max(1, int(bucket_mb * 2**20)))
        for b in buckets:
            drain.bucket(b)
    train.close()
    bucket_dir.rmdir()
    summary = {
        "version": VERSION, "seed": seed, "inputs": list(inputs), "files": len(files),
        "text_field": text_field,
        "documents": n_docs, "train_docs": n_docs - n_val, "val_docs": n_val,
        "chunks": chunks, "chunk_docs": train.counts,
        "skipped": dict(sorted(stats.skipped.items())), "bad_files": stats.bad_files,
        "bucket_mb": bucket_mb, "buckets": drain.buckets,
        "max_bucket_docs": drain.max_bucket_docs, "max_bucket_bytes": drain.max_bucket_bytes,
        "train": "train/chunk.*.jsonl", "val": "val/val.jsonl",
    }
    (work / "prepare.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def publish(work: Path, out: Path, overwrite: bool) -> None:
    """Rename the finished `work` dir to `out`; an existing non-empty `out` only with overwrite."""
    if out.is_dir() and not any(out.iterdir()):
        out.rmdir()
    if not out.exists():
        os.replace(work, out)
        return
    if not overwrite:
        raise InputError(f"output exists and is not empty: {out} (give --overwrite)")
    old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
    os.replace(out, old / out.name)
    os.replace(work, out)
    shutil.rmtree(old)


def prepare(inputs: list[str], out: str, chunks: int, val_docs: int, seed: int, text_field: str = "text",
            fmt: str = "auto", split: str = "train", bucket_mb: float = 256.0,
            overwrite: bool = False) -> dict:
    """Prepare `inputs` into `out` (see the module docstring); returns the prepare.json summary."""
    if chunks <= 0 or val_docs < 0 or bucket_mb <= 0:
        raise InputError("--chunks and --bucket-mb must be positive, --val-docs not negative")
    files = find_inputs(inputs, fmt)
    out_path = Path(out)
    if out_path.exists() and not out_path.is_dir():
        raise InputError(f"output is a file, not a directory: {out}")
    if out_path.is_dir() and any(out_path.iterdir()) and not overwrite:
        raise InputError(f"output exists and is not empty: {out} (give --overwrite)")
    try:  # --overwrite must never delete an input, nor a run's files
        check_output(out_path, [Path(p) for p in inputs])
    except ValueError as exc:
        raise InputError(str(exc)) from None
    out_path.parent.mkdir(parents=True, exist_ok=True)
    work = staging_dir(out_path)  # a killed run's left behind are removed
    work.mkdir()  # (not mkdtemp: its mode 0700 would stay on the published directory)
    try:
        summary = prepare_into(work, inputs, files, chunks, val_docs, seed, text_field, split,
                               bucket_mb)
        publish(work, out_path, overwrite)
    finally:
        if work.exists():
            shutil.rmtree(work)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lingua_mem.data.prepare", description=(
        "Shuffle a corpus into jsonl training chunks and a validation file."))
    parser.add_argument("--input", nargs="+", required=True, help="files or directories")
    parser.add_argument("--out", required=True, help="the directory to create")
    parser.add_argument("--chunks", type=int, required=True, help="training chunk files")
    parser.add_argument("--val-docs", type=int, required=True, help="held-out documents")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--format", default="auto", choices=FORMATS)
    parser.add_argument("--split", default="train", help="the split of a HF DatasetDict")
    parser.add_argument("--bucket-mb", type=float, default=256.0,
                        help="the most document text held in memory at once (MiB)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        summary = prepare(args.input, args.out, args.chunks, args.val_docs, args.seed, args.text_field,
                          args.format, args.split, args.bucket_mb, args.overwrite)
    except InputError as exc:
        return fail(exc)
    print(json.dumps({"out": args.out, **summary, "seconds": round(time.perf_counter() - start, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
