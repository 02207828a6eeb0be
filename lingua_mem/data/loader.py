"""Packed, sharded, resumable batches from weighted jsonl sources.

Pipeline, per rank:
  JsonlSource   reads one source's files (sorted) line by line, forever; the
                rank keeps the documents with index % world_size == rank, where
                the index counts non-blank lines over all of the source's files
  PackedLoader  draws a source per document (seeded RNG, by weight), tokenizes
                it as BOS + ids + EOS, appends it to one token stream, and cuts
                the stream into windows of seq_len + 1 tokens; a document's
                leftover tokens start the next window

Batch: {"inputs": int64 (B, T), "targets": int64 (B, T)}, targets[:, i] =
inputs[:, i + 1] within a row (each row is one window of T + 1 stream tokens).

state_dict() is plain JSON (ints, strings, lists): per source the epoch,
file index and byte offset of the next line, the leftover tokens and the
mixing RNG state. A fresh loader given it yields the same batches bit for bit.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import json
import os
import random
from pathlib import Path

import torch

from lingua_mem.config import ConfigError, DataConfig, SourceConfig
from lingua_mem.data.facts import ensure_facts

STATE_VERSION = 1


def resolve_files(name: str, src: SourceConfig) -> list[str]:
    """A source's files: a directory's *.jsonl / *.jsonl.gz, one file, or a glob; sorted."""
    key = f"data.sources.{name}.path"
    path = src.path
    if os.path.isdir(path):
        files = [f for pattern in ("*.jsonl", "*.jsonl.gz") for f in glob.glob(os.path.join(path, pattern))]
        if not files:
            raise ConfigError(f"{key}: no *.jsonl or *.jsonl.gz files in directory {path}")
    elif os.path.isfile(path):
        files = [path]
    else:
        files = [f for f in glob.glob(path) if os.path.isfile(f)]
        if not files:
            raise ConfigError(f"{key}: no such file or directory, and no glob match: {path}")
    return sorted(files)


class JsonlSource:
    """One source's documents for one rank, cycling over its files forever."""

    def __init__(self, name: str, files: list[str], text_field: str = "text",
                 rank: int = 0, world_size: int = 1):
        assert files and 0 <= rank < world_size
        self.name, self.files, self.text_field = name, list(files), text_field
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # completed passes over all files
        self.file_index = 0  # file being read
        self.offset = 0  # byte offset of the next line in that file (uncompressed for .gz)
        self.line = 0  # documents (non-blank lines) seen this epoch, over all ranks
        self.epoch_docs = 0  # documents this rank returned this epoch
        self.skipped = 0  # this rank's lines that were bad JSON / lacked a string field
        self._fh = None

    def _open(self):
        path = self.files[self.file_index]
        fh = gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
        if self.offset:
            fh.seek(self.offset)  # gzip seeks by decompressing up to the offset
        return fh

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _next_file(self) -> None:
        self.close()
        self.file_index += 1
        self.offset = 0
        if self.file_index == len(self.files):
            if self.epoch_docs == 0:
                raise ConfigError(f"data.sources.{self.name}.path: no usable document for rank "
                                  f"{self.rank} of {self.world_size} in {len(self.files)} file(s)")
            self.epoch += 1
            self.file_index = self.line = self.epoch_docs = 0

    def next_text(self) -> str:
        """The next document's text of this rank's share."""
        while True:
            if self._fh is None:
                self._fh = self._open()
            raw = self._fh.readline()  # bytes, with its b"\n"
            if not raw:
                self._next_file()
                continue
            self.offset += len(raw)
            if raw.isspace():  # blank lines are not documents
                continue
            index, self.line = self.line, self.line + 1
            if index % self.world_size != self.rank:
                continue
            try:
                doc = json.loads(raw)  # bad JSON and bad UTF-8 both raise ValueError
            except (ValueError, RecursionError):
                doc = None
            text = doc.get(self.text_field) if isinstance(doc, dict) else None
            if not isinstance(text, str):
                self.skipped += 1
                continue
            self.epoch_docs += 1
            return text

    def state_dict(self) -> dict:
        return {"files": [os.path.basename(f) for f in self.files], "epoch": self.epoch,
                "file_index": self.file_index, "offset": self.offset, "line": self.line,
                "epoch_docs": self.epoch_docs, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        files = [os.path.basename(f) for f in self.files]
        if state["files"] != files:
            raise ValueError(f"data source {self.name}: its files changed since the state was saved "
                             f"({len(state['files'])} saved, {len(files)} now)")
        self.close()
        for key in ("epoch", "file_index", "offset", "line", "epoch_docs", "skipped"):
            setattr(self, key, int(state[key]))


class PackedLoader:
    """Infinite iterator of packed token batches from weighted sources."""

    def __init__(self, sources: list[JsonlSource], weights: list[float], tokenizer,
                 batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        assert sources and len(sources) == len(weights) and all(w > 0 for w in weights)
        self.sources, self.tokenizer = sources, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        total = float(sum(weights))
        self._cum = [sum(weights[: i + 1]) / total for i in range(len(weights))]  # cumulative probs
        self._rng = random.Random(f"lingua_mem.data:{seed}:{rank}")  # str seeds are stable across runs
        self._buf: list[int] = []  # token stream; tokens before _start are consumed
        self._start = 0

    @property
    def skipped(self) -> dict[str, int]:
        """Bad lines skipped so far in this rank's share, per source name."""
        return {s.name: s.skipped for s in self.sources}

    def _next_document(self) -> list[int]:
        i = bisect.bisect_right(self._cum, self._rng.random()) if len(self.sources) > 1 else 0
        i = min(i, len(self.sources) - 1)  # guards float rounding at the top of _cum
        return self.tokenizer.encode(self.sources[i].next_text(), add_bos=True, add_eos=True)

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        need = self.batch_size * (self.seq_len + 1)
        if len(self._buf) - self._start < need:
            del self._buf[: self._start]
            self._start = 0
            while len(self._buf) < need:
                self._buf += self._next_document()
        window = self._buf[self._start : self._start + need]
        self._start += need
        w = torch.tensor(window, dtype=torch.long).view(self.batch_size, self.seq_len + 1)
        return {"inputs": w[:, :-1].contiguous(), "targets": w[:, 1:].contiguous()}

    def state_dict(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "sources": {s.name: s.state_dict() for s in self.sources},
                "rng": [version, list(internal), gauss],
                "buffer": self._buf[self._start :]}

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"data loader state version {state.get('version')} != {STATE_VERSION}")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(f"data loader state is for rank {state['rank']} of {state['world_size']}, "
                             f"this loader is rank {self.rank} of {self.world_size}")
        names = sorted(s.name for s in self.sources)
        if sorted(state["sources"]) != names:
            raise ValueError(f"data loader state has sources {sorted(state['sources'])}, config has {names}")
        for s in self.sources:
            s.load_state_dict(state["sources"][s.name])
        version, internal, gauss = state["rng"]
        self._rng.setstate((version, tuple(internal), gauss))
        self._buf = [int(t) for t in state["buffer"]]
        self._start = 0

    def close(self) -> None:
        for s in self.sources:
            s.close()


def build_loader(cfg: DataConfig, tokenizer, dump_dir: str, rank: int = 0,
                 world_size: int = 1) -> PackedLoader:
    """The loader for `cfg`; with no sources, the facts corpus under dump_dir/data/facts."""
    if cfg.sources:
        names = sorted(cfg.sources)  # a stable order, whatever the YAML order
        specs = [(n, resolve_files(n, cfg.sources[n]), cfg.sources[n].text_field,
                  cfg.sources[n].weight) for n in names]
    else:
        facts = ensure_facts(Path(dump_dir) / "data" / "facts", cfg.facts.people, cfg.facts.seed)
        specs = [("facts", [str(facts / "train.jsonl")], "text", 1.0)]
    sources = [JsonlSource(n, files, field, rank, world_size) for n, files, field, _ in specs]
    return PackedLoader(sources, [w for *_, w in specs], tokenizer, cfg.batch_size, cfg.seq_len,
                        seed=cfg.seed, rank=rank, world_size=world_size)
