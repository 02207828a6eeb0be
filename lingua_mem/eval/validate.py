"""Validation loss, perplexity and bits per byte of held-out documents.

The documents are tokenized as in training (BOS + ids + EOS) into one stream,
cut into rows of seq_len + 1 tokens that overlap by one, so every token of the
stream but the first is predicted exactly once; the last row is padded (its
padding targets are ignored). Documents are read in order until `max_tokens`
are in the stream (the last one whole), so bits per byte is exact:

    loss = nats / tokens,   ppl = exp(loss),   bits_per_byte = nats / (ln 2 * UTF-8 bytes)
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import NamedTuple

import torch

from lingua_mem.config import EvalSourceConfig, SourceConfig
from lingua_mem.data.loader import document_ids
from lingua_mem.data.sources import (
    READERS,
    SourceError,
    detect_format,
    load_saved_dataset,
    read_dataset,
    resolve_files,
)
from lingua_mem.errors import ConfigError
from lingua_mem.eval.shard import rank_batches
from lingua_mem.model.loss import IGNORE, forward_loss  # IGNORE: a target not scored
from lingua_mem.parallel.runtime import all_reduce


def read_documents(name: str, src: EvalSourceConfig) -> Iterator[str]:
    """The documents of an eval text source in order (records that are not documents are
    skipped); ConfigError names eval.sources.<name>.<key>."""
    as_source = SourceConfig(path=src.path, text_field=src.text_field, format=src.format, split=src.split)
    fmt = detect_format(as_source)
    if fmt == "hf":
        try:
            dataset = load_saved_dataset(src.path, src.split, src.text_field)
        except SourceError as exc:
            raise ConfigError(f"eval.sources.{name}.{exc.field}: {exc}") from None
        reads = [read_dataset(dataset, src.text_field)]
    else:
        files = resolve_files(name, as_source, fmt, section="eval.sources")
        reads = (READERS[fmt](f, src.text_field) for f in files)
    for read in reads:
        for _, text, _ in read:
            if text:
                yield text


class ValText(NamedTuple):
    """A text source ready to score: its (inputs, targets) rows, documents and UTF-8 bytes."""

    rows: list[tuple[list[int], list[int]]]
    documents: int
    bytes: int


def prepare_text(texts: Iterator[str], tokenizer, seq_len: int, max_tokens: int) -> ValText:
    """Whole documents until max_tokens (0: all) are in the stream, cut into rows."""
    stream: list[int] = []
    docs = n_bytes = 0
    for text in texts:
        stream += tokenizer.encode(text, add_bos=True, add_eos=True)
        docs += 1
        n_bytes += len(text.encode("utf-8"))
        if max_tokens and len(stream) >= max_tokens:
            break
    return ValText(rows(stream, seq_len), docs, n_bytes)


def rows(stream: list[int], seq_len: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, targets) rows of seq_len: stream[i*T : i*T + T + 1], the last one padded."""
    out = []
    for start in range(0, len(stream) - 1, seq_len):
        chunk = stream[start : start + seq_len + 1]
        pad = seq_len + 1 - len(chunk)
        out.append((chunk[:-1] + [0] * pad, chunk[1:] + [IGNORE] * pad))
    return out


@torch.no_grad()
def validate(model, text: ValText, batch_size: int, device, reads=None,
             bos_id: int | None = None) -> dict[str, float]:
    """{"loss", "ppl", "bits_per_byte", "tokens", "documents", "bytes"} over every rank's share
    of the rows (each rank scores its batches of batch_size rows; the sums are reduced).
    `reads`: a MemoryReadStats told which tokens of each batch count. With `bos_id`, each
    row's documents are numbered (doc_ids) as in training: a doc_causal model attends
    within them."""
    seq_len = len(text.rows[0][0])
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # nats, scored tokens
    for batch in rank_batches(text.rows, batch_size):
        items = batch[1] if batch is not None else []
        items = items + [([0] * seq_len, [IGNORE] * seq_len)] * (batch_size - len(items))  # one shape
        inputs = torch.tensor([i for i, _ in items], dtype=torch.long, device=device)  # (B, T)
        targets = torch.tensor([t for _, t in items], dtype=torch.long, device=device)
        if reads is not None:
            reads.count = (targets != IGNORE).flatten()
        batch = {"inputs": inputs, "targets": targets}
        if bos_id is not None:
            batch["doc_ids"] = document_ids(inputs, bos_id)
        nats = forward_loss(model, batch, reduction="sum")
        sums += torch.stack([nats.double(), (targets != IGNORE).sum().double()])
    if reads is not None:
        reads.count = None
    all_reduce(sums)
    nats, tokens = sums.tolist()
    loss = nats / tokens
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)),
            "bits_per_byte": nats / (math.log(2) * text.bytes), "tokens": int(tokens),
            "documents": text.documents, "bytes": text.bytes}
