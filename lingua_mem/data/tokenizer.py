"""Tokenizers: raw UTF-8 bytes (the default) or a SentencePiece model.

Every tokenizer maps text <-> list[int] ids in [0, n_words) and has a BOS and
an EOS id; `encode` wraps the ids in them unless told not to.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

from lingua_mem.config import ConfigError, TokenizerConfig


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


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """The tokenizer named by `cfg`; a bad name or model file raises ConfigError."""
    if cfg.name == "bytes":
        return BytesTokenizer()
    if cfg.name != "sentencepiece":
        raise ConfigError(f"data.tokenizer.name: {cfg.name!r} is not one of bytes, sentencepiece")
    if not cfg.path:
        raise ConfigError("data.tokenizer.path: required for sentencepiece")
    path = Path(cfg.path)
    if not path.is_file():
        raise ConfigError(f"data.tokenizer.path: no such file {cfg.path}")
    try:
        return SentencePieceTokenizer(str(path))
    except ConfigError:
        raise
    except Exception as exc:  # OSError, RuntimeError from a corrupt or unreadable model
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"data.tokenizer.path: cannot load sentencepiece model {cfg.path}: {why}") from None
