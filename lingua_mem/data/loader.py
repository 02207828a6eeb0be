"""Packed, sharded, resumable batches from weighted document sources.

Pipeline, per rank:
  Source        (sources.py) one source's documents for this rank, forever:
                jsonl(.gz), parquet, text or a local Hugging Face dataset; the rank
                keeps the records with index % world_size == rank
  PackedLoader  draws a source per document (seeded RNG, by weight), tokenizes
                it as BOS + ids + EOS, appends it to one token stream, and cuts
                the stream into windows of seq_len + 1 tokens; a document's
                leftover tokens start the next window
  PrefetchLoader (prefetch.py) the same batches, made ahead by a thread or a
                process (data.prefetch), with the same exact state

Batch: {"inputs", "targets", "doc_ids"}, each int64 (B, T). targets[:, i] =
inputs[:, i + 1] within a row (each row is one window of T + 1 stream tokens).
doc_ids[b, i] numbers the documents of row b: 0 at position 0, +1 at every
BOS after it, so attention can be masked per document.

state_dict() is plain JSON (ints, strings, lists): per source its position
(sources.py), the leftover tokens and the mixing RNG state. A fresh loader
given it yields the same batches bit for bit.
"""

from __future__ import annotations

import bisect
import random
from dataclasses import dataclass

import torch

from lingua_mem.config import DataConfig
from lingua_mem.data.facts import ensure_facts
from lingua_mem.data.prefetch import PrefetchLoader
from lingua_mem.data.sources import JsonlSource, Source, open_source
from lingua_mem.data.tokenizer import build_tokenizer
from lingua_mem.errors import ConfigError
from lingua_mem.run_dir import facts_dir

__all__ = ["PackedLoader", "LoaderSpec", "build_loader", "build_packed_loader", "document_ids"]

STATE_VERSION = 1


def document_ids(inputs: torch.Tensor, bos_id: int) -> torch.Tensor:
    """Per-row running document number: 0 at position 0, +1 at every later BOS."""
    is_bos = inputs == bos_id
    return is_bos.cumsum(dim=1) - is_bos[:, :1].long()


class PackedLoader:
    """Infinite iterator of packed token batches from weighted sources."""

    def __init__(self, sources: list[Source], weights: list[float], tokenizer,
                 batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 max_doc_tokens: int = 0):
        assert sources and len(sources) == len(weights) and all(w > 0 for w in weights)
        self.sources, self.tokenizer = sources, tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        total = float(sum(weights))
        self._cum = [sum(weights[: i + 1]) / total for i in range(len(weights))]  # cumulative probs
        self._rng = random.Random(f"lingua_mem.data:{seed}:{rank}")  # str seeds are stable across runs
        self._buf: list[int] = []  # token stream; tokens before _start are consumed
        self._start = 0
        self.max_doc_tokens = max_doc_tokens  # 0: no cap
        self.truncated = 0  # documents cut to max_doc_tokens so far

    @property
    def skipped(self) -> dict[str, int]:
        """Bad records skipped so far in this rank's share, per source name."""
        return {s.name: s.skipped for s in self.sources}

    def _next_document(self) -> list[int]:
        i = bisect.bisect_right(self._cum, self._rng.random()) if len(self.sources) > 1 else 0
        i = min(i, len(self.sources) - 1)  # guards float rounding at the top of _cum
        text, cap = self.sources[i].next_text(), self.max_doc_tokens
        if not cap:
            return self.tokenizer.encode(text, add_bos=True, add_eos=True)
        # a token spans at most a few characters: cut the text first, so a 50 MB line costs
        # no more to tokenize than a capped one
        cut = text[: 16 * cap]
        ids = self.tokenizer.encode(cut, add_bos=True, add_eos=len(cut) == len(text))
        if len(ids) > cap or len(cut) < len(text):
            self.truncated += 1
            ids = ids[:cap]  # BOS and the document's first tokens; no EOS: it does not end here
        return ids

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
        inputs = w[:, :-1].contiguous()
        return {"inputs": inputs, "targets": w[:, 1:].contiguous(),
                "doc_ids": document_ids(inputs, self.tokenizer.bos_id)}

    def batch_layout(self) -> dict[str, tuple[int, ...]]:
        """Each batch's int64 tensors and their shapes."""
        shape = (self.batch_size, self.seq_len)
        return {"inputs": shape, "targets": shape, "doc_ids": shape}

    def state_dict(self) -> dict:
        version, internal, gauss = self._rng.getstate()
        return {"version": STATE_VERSION, "rank": self.rank, "world_size": self.world_size,
                "sources": {s.name: s.state_dict() for s in self.sources},
                "rng": [version, list(internal), gauss],
                "buffer": self._buf[self._start :], "truncated": self.truncated}

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
        self.truncated = int(state.get("truncated", 0))

    def close(self) -> None:
        for s in self.sources:
            s.close()


def build_packed_loader(cfg: DataConfig, tokenizer, dump_dir: str, rank: int = 0,
                        world_size: int = 1) -> PackedLoader:
    """The loader for `cfg`, without prefetch; with no sources, the facts corpus under dump_dir/data/facts."""
    if cfg.sources:
        names = sorted(cfg.sources)  # a stable order, whatever the YAML order
        sources = [open_source(n, cfg.sources[n], rank, world_size) for n in names]
        weights = [cfg.sources[n].weight for n in names]
    else:
        facts = ensure_facts(facts_dir(dump_dir), cfg.facts.people, cfg.facts.seed, cfg.facts.style,
                             cfg.facts.docs_per_person, cfg.facts.qa_fraction)
        sources = [JsonlSource("facts", [str(facts / "train.jsonl")], "text", rank, world_size)]
        weights = [1.0]
    return PackedLoader(sources, weights, tokenizer, cfg.batch_size, cfg.seq_len,
                        seed=cfg.seed, rank=rank, world_size=world_size, max_doc_tokens=cfg.max_doc_tokens)


@dataclass(frozen=True)
class LoaderSpec:
    """What a prefetch process needs to build the same loader (picklable)."""

    cfg: DataConfig
    dump_dir: str
    rank: int
    world_size: int
    token_ids: tuple[int, int, int]  # (n_words, bos_id, eos_id) of the caller's tokenizer

    def build(self) -> PackedLoader:
        tokenizer = build_tokenizer(self.cfg.tokenizer)
        ids = (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id)
        if ids != self.token_ids:
            raise ConfigError(f"data.tokenizer: the prefetch process built a tokenizer with (n_words, bos, "
                              f"eos) {ids}, the trainer's has {self.token_ids}")
        return build_packed_loader(self.cfg, tokenizer, self.dump_dir, self.rank, self.world_size)


def build_loader(cfg: DataConfig, tokenizer, dump_dir: str, rank: int = 0,
                 world_size: int = 1) -> PackedLoader | PrefetchLoader:
    """The loader for `cfg` (a bad source fails here); prefetching unless cfg.prefetch is none.

    Both kinds have the same interface: iter/next, state_dict, load_state_dict,
    skipped, close. A process prefetcher rebuilds the tokenizer from cfg.tokenizer.
    """
    loader = build_packed_loader(cfg, tokenizer, dump_dir, rank, world_size)
    if cfg.prefetch == "none":
        return loader
    spec = None
    if cfg.prefetch == "process":
        spec = LoaderSpec(cfg, str(dump_dir), rank, world_size,
                          tuple(int(i) for i in (tokenizer.n_words, tokenizer.bos_id, tokenizer.eos_id)))
    return PrefetchLoader(loader, cfg.prefetch, cfg.prefetch_depth, spec)
