"""Tokenizers: raw UTF-8 bytes (the default), a SentencePiece model, or a
tiktoken BPE ranks file laid out like Llama 3's.

Every tokenizer maps text <-> list[int] ids in [0, n_words) and has a BOS and
an EOS id; `encode` wraps the ids in them unless told not to.

Train a SentencePiece BPE tokenizer (byte fallback) on local text or jsonl:

    python -m lingua_mem.data.tokenizer train --input DIR_OR_FILE [...] \
        --vocab-size 32000 --out tokenizer.model [--text-field text] [--max-docs 200000]
"""

from __future__ import annotations

import argparse
import base64
import binascii
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol, runtime_checkable

from lingua_mem.config import TokenizerConfig
from lingua_mem.errors import ConfigError


@runtime_checkable
class Tokenizer(Protocol):
    n_words: int  # vocabulary size: every id is < n_words
    bos_id: int
    eos_id: int

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...


class BytesTokenizer:
    """UTF-8 bytes 0..255, then BOS=256 and EOS=257 (n_words=258)."""

    n_words = 258
    bos_id = 256
    eos_id = 257

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        ids += text.encode("utf-8")  # list += bytes extends with the byte values, in C
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # ids >= 256 (BOS, EOS) are not bytes: drop them. A torch/numpy id works too.
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer:
    """A trained SentencePiece model; BOS/EOS ids come from the model itself."""

    def __init__(self, path: str):
        import sentencepiece as spm  # imported here: the bytes tokenizer does not need it

        self.path = str(path)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        self.n_words = int(self.sp.vocab_size())
        self.bos_id = int(self.sp.bos_id())
        self.eos_id = int(self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ConfigError(
                f"data.tokenizer.path: sentencepiece model {self.path} has no BOS/EOS id "
                f"(bos_id={self.bos_id}, eos_id={self.eos_id}); train it with bos_id and eos_id >= 0"
            )

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        ids += self.sp.encode(text)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        specials = (self.bos_id, self.eos_id)
        return self.sp.decode([int(i) for i in ids if int(i) not in specials])


# The pre-tokenization regex of Llama 3 (the cl100k_base pattern with the
# contractions case-insensitive): letters, 1-3 digit numbers, punctuation runs,
# newlines and spaces become separate pieces before BPE merges inside each.
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)
N_SPECIAL_TOKENS = 256


def llama3_special_tokens() -> list[str]:
    """Llama 3's 256 special tokens, in id order after the BPE ranks."""
    named = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
             "<|reserved_special_token_1|>", "<|reserved_special_token_2|>",
             "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
             "<|reserved_special_token_4|>", "<|eot_id|>"]
    reserved = [f"<|reserved_special_token_{i}|>" for i in range(5, N_SPECIAL_TOKENS - 5)]
    return named + reserved


def read_bpe_ranks(path: str) -> dict[bytes, int]:
    """A tiktoken ranks file: one "<base64 token> <rank>" per line, ranks 0..n-1.

    Read here rather than with tiktoken.load.load_tiktoken_bpe, which caches
    files by path in a temp dir and would return a stale copy of a rewritten
    file. Raises ValueError (one line) on a malformed file.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2:
            raise ValueError(f"line {lineno}: expected '<base64 token> <rank>'")
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (binascii.Error, ValueError):
            raise ValueError(f"line {lineno}: bad base64 token or rank") from None
        if token in ranks:
            raise ValueError(f"line {lineno}: token repeated")
        ranks[token] = rank
    if not ranks:
        raise ValueError("no '<base64 token> <rank>' line")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"the ranks of its {len(ranks)} tokens are not 0..{len(ranks) - 1}")
    missing = sum(bytes([b]) not in ranks for b in range(256))
    if missing:
        raise ValueError(f"{missing} of the 256 single-byte tokens are missing")
    return ranks


class TiktokenTokenizer:
    """A BPE ranks file (e.g. Llama 3's tokenizer.model) in the Llama 3 layout.

    Ids 0..n_ranks-1 are the BPE tokens, then 256 special tokens:
    BOS = n_ranks (<|begin_of_text|>), EOS = n_ranks + 1 (<|end_of_text|>).
    Special-token text inside a document is encoded as plain text.
    """

    def __init__(self, path: str):
        import tiktoken  # imported here: the other tokenizers do not need it

        self.path = str(path)
        ranks = read_bpe_ranks(self.path)
        n_ranks = len(ranks)
        specials = {tok: n_ranks + i for i, tok in enumerate(llama3_special_tokens())}
        self.enc = tiktoken.Encoding(name=Path(self.path).name, pat_str=LLAMA3_SPLIT_PATTERN,
                                     mergeable_ranks=ranks, special_tokens=specials)
        self.n_words = n_ranks + N_SPECIAL_TOKENS
        self.bos_id = n_ranks
        self.eos_id = n_ranks + 1

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        ids = [self.bos_id] if add_bos else []
        ids += self.enc.encode_ordinary(text)  # no special tokens: "<|eot_id|>" is plain text
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # BOS/EOS and out-of-range ids are dropped; a cut multi-byte char becomes U+FFFD.
        specials = (self.bos_id, self.eos_id)
        keep = [int(i) for i in ids if 0 <= int(i) < self.n_words and int(i) not in specials]
        return self.enc.decode(keep)


TOKENIZER_FILES = {"sentencepiece": ("sentencepiece model", SentencePieceTokenizer),
                   "tiktoken": ("tiktoken BPE ranks file", TiktokenTokenizer)}


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer named by `cfg`; a bad name or model file raises ConfigError."""
    if cfg.name == "bytes":
        return BytesTokenizer()
    if cfg.name not in TOKENIZER_FILES:
        raise ConfigError(f"data.tokenizer.name: {cfg.name!r} is not one of bytes, sentencepiece, tiktoken")
    if not cfg.path:
        raise ConfigError(f"data.tokenizer.path: required for {cfg.name}")
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer.path: no such file {cfg.path}")
    what, cls = TOKENIZER_FILES[cfg.name]
    try:
        return cls(str(path))
    except ConfigError:
        raise
    except Exception as exc:  # OSError, ValueError, RuntimeError from a corrupt or unreadable file
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"data.tokenizer.path: cannot load {what} {cfg.path}: {why}") from None


# ---------------------------------------------------------------- training a SentencePiece model

MAX_SENTENCE_CHARS = 4096  # longer lines are fed in pieces (sentencepiece drops over-long ones)


def training_sentences(docs: Iterable[str], max_docs: int, counts: dict) -> Iterator[str]:
    """The non-blank lines of the first `max_docs` documents, cut to MAX_SENTENCE_CHARS.

    Counts documents and sentences in `counts` as it goes.
    """
    for text in docs:
        if counts["docs"] >= max_docs:
            return
        counts["docs"] += 1
        for line in text.splitlines():
            for start in range(0, len(line), MAX_SENTENCE_CHARS):
                piece = line[start : start + MAX_SENTENCE_CHARS]
                if piece.strip():
                    counts["sentences"] += 1
                    yield piece


def train_sentencepiece(inputs: list[str], vocab_size: int, out: str, text_field: str = "text",
                        max_docs: int = 200_000, threads: int | None = None) -> dict:
    """Train a BPE SentencePiece model (byte fallback; unk 0, bos 1, eos 2, no pad) into `out`.

    Inputs are files or directories of .txt (a document per line), .jsonl(.gz),
    parquet or a HF save_to_disk folder, read as lingua_mem.data.prepare reads
    them. Only the first `max_docs` documents are used: give it prepared
    (shuffled) chunks for a fair sample. Normalization is the identity and
    whitespace is kept, so decoding is lossless. The model is written
    atomically. Returns a summary dict; raises InputError for a bad input.

    `threads` (default: every CPU) changes the vocabulary: BPE merges counted on another
    number of threads break ties otherwise. Give a fixed number where the same input must
    give the same vocabulary on every machine (the knowledge experiment's corpora use 1).
    """
    import sentencepiece as spm

    from lingua_mem.data.prepare import InputError, ReadStats, find_inputs, iter_documents

    files = find_inputs(inputs, "auto")  # InputError (one line, names the path) before any work
    stats = ReadStats()
    counts = {"docs": 0, "sentences": 0}
    sentences = training_sentences(iter_documents(files, text_field, stats), max_docs, counts)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=out_path.parent, prefix=f".{out_path.name}.tmp-") as tmp:
        prefix = os.path.join(tmp, "spm")
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_prefix=prefix, model_type="bpe",
                vocab_size=vocab_size, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                allow_whitespace_only_pieces=True, max_sentence_length=4 * MAX_SENTENCE_CHARS,
                num_threads=threads or os.cpu_count() or 1, minloglevel=2)
        except RuntimeError:
            if counts["sentences"] == 0:
                raise InputError(f"no text to train on in {' '.join(inputs)} "
                                 f"(skipped: {json.dumps(stats.skipped)})") from None
            raise
        os.replace(prefix + ".model", out_path)
    return {"out": str(out_path), "vocab_size": vocab_size, "docs": counts["docs"],
            "sentences": counts["sentences"], "skipped": stats.skipped,
            "seconds": round(time.perf_counter() - start, 2)}


def main(argv: list[str] | None = None) -> int:
    from lingua_mem.cli import fail
    from lingua_mem.data.prepare import InputError

    parser = argparse.ArgumentParser(prog="python -m lingua_mem.data.tokenizer",
                                     description="Tokenizer tools.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train a SentencePiece BPE model (byte fallback)")
    train.add_argument("--input", nargs="+", required=True,
                       help=".txt (a document per line), .jsonl(.gz), parquet files or directories of them")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, help="the .model file to write")
    train.add_argument("--text-field", default="text", help="the text field of jsonl/parquet/HF inputs")
    train.add_argument("--max-docs", type=int, default=200_000,
                       help="train on the first this many documents (bounds memory)")
    train.add_argument("--threads", type=int, default=None,
                       help="training threads (default: every CPU); the vocabulary depends on it")
    args = parser.parse_args(argv)
    if args.vocab_size <= 0 or args.max_docs <= 0 or (args.threads is not None and args.threads <= 0):
        return fail("--vocab-size, --max-docs and --threads must be positive")
    try:
        summary = train_sentencepiece(args.input, args.vocab_size, args.out, args.text_field,
                                      args.max_docs, args.threads)
    except InputError as exc:
        return fail(exc)
    except RuntimeError as exc:  # sentencepiece: e.g. a vocab size the corpus cannot fill
        why = (str(exc).strip().splitlines() or ["RuntimeError"])[-1]
        return fail(f"sentencepiece training failed: {why}", code=1)
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
