"""Document sources: one source's documents for one rank, cycling forever.

Formats (SourceConfig.format; `auto` picks by what the path is):
  jsonl    *.jsonl / *.jsonl.gz files, one JSON object per line
  parquet  *.parquet files, read in record batches of the text column only
  hf       a local Hugging Face dataset: a `save_to_disk` folder (read by row
           index), or local data files / a dataset folder through
           `datasets.load_dataset(..., streaming=True)`; only local paths, so
           nothing touches the network

A source reads its units (files in sorted order, or the one dataset) in order,
over and over. Its records (non-blank lines, rows) are numbered over the whole
epoch; the rank keeps those whose number % world_size == rank, so each record
is read once per epoch across all ranks, whatever the file count. A kept record
that is not a document (bad JSON or UTF-8, no string in text_field, an
unreadable file) is skipped and counted in `skipped`.

Position (state_dict, plain JSON): epoch, file_index, offset (byte offset of
the next line for jsonl, row within the file or dataset otherwise), line
(records seen this epoch, all ranks), epoch_docs (documents this rank returned
this epoch) and skipped.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import itertools
import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path

from lingua_mem.config import ConfigError, SourceConfig

PATTERNS = {"jsonl": ("*.jsonl", "*.jsonl.gz"), "parquet": ("*.parquet",)}
PARQUET_MAGIC = b"PAR1"
ROWS_PER_READ = 1024  # rows per parquet record batch / dataset slice: bounds memory
HF_BUILDERS = {".jsonl": "json", ".json": "json", ".jsonl.gz": "json", ".json.gz": "json",
               ".csv": "csv", ".txt": "text", ".parquet": "parquet", ".arrow": "arrow"}


def is_saved_dataset(path: str) -> bool:
    """A `datasets` save_to_disk folder: a Dataset or a DatasetDict."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file()
                           or ((p / "dataset_info.json").is_file() and (p / "state.json").is_file()))


def _matches(path: str) -> list[str]:
    """The file at `path`, or the files a glob matches."""
    return [path] if os.path.isfile(path) else [f for f in glob.glob(path) if os.path.isfile(f)]


def detect_format(src: SourceConfig) -> str:
    """`src.format`, or for `auto`: hf for a save_to_disk folder, parquet for parquet files, else jsonl."""
    if src.format != "auto":
        return src.format
    path = src.path
    if is_saved_dataset(path):
        return "hf"
    if os.path.isdir(path):
        has = lambda fmt: any(glob.glob(os.path.join(path, p)) for p in PATTERNS[fmt])
        return "parquet" if has("parquet") and not has("jsonl") else "jsonl"
    files = _matches(path)
    return "parquet" if files and all(f.endswith(".parquet") for f in files) else "jsonl"


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def resolve_files(name: str, src: SourceConfig, fmt: str | None = None) -> list[str]:
    """A jsonl or parquet source's files: a directory's files of that format, one file, or a glob; sorted."""
    key = f"data.sources.{name}.path"
    fmt = fmt or detect_format(src)
    path = src.path
    if os.path.isdir(path):
        patterns = PATTERNS[fmt]
        files = [f for pattern in patterns for f in glob.glob(os.path.join(path, pattern))]
        if not files:
            raise ConfigError(f"{key}: no {' or '.join(patterns)} files in directory {path}")
    else:
        files = _matches(path)
        if not files:
            raise ConfigError(f"{key}: no such file or directory, and no glob match: {path}")
    for f in files:  # a wrong explicit format fails here, not as a stream of skipped records
        if fmt == "parquet" and not _starts_with(f, PARQUET_MAGIC):
            raise ConfigError(f"{key}: {f} is not a parquet file (format: parquet)")
        if fmt == "jsonl" and not f.endswith(".gz") and _starts_with(f, PARQUET_MAGIC):
            raise ConfigError(f"{key}: {f} is a parquet file, not jsonl (set format: parquet)")
    return sorted(files)


class Source:
    """Base: the rank share, epochs, skipping and state; subclasses read records."""

    format = ""

    def __init__(self, name: str, files: list[str], text_field: str = "text",
                 rank: int = 0, world_size: int = 1):
        assert files and 0 <= rank < world_size
        self.name, self.files, self.text_field = name, list(files), text_field
        self.rank, self.world_size = rank, world_size
        self.epoch = 0  # completed passes over all files
        self.file_index = 0  # file being read
        self.offset = 0  # position of the next record in that file
        self.line = 0  # records seen this epoch, over all ranks
        self.epoch_docs = 0  # documents this rank returned this epoch
        self.skipped = 0  # this rank's records that were not documents
        self._reader: Iterator | None = None

    def _read(self, path: str, offset: int) -> Iterator[tuple[int, object]]:
        """(offset advance, record) for each record of `path` from `offset` on."""
        raise NotImplementedError

    def _text(self, record) -> str | None:
        """The record's document text, or None for a bad record."""
        return record if isinstance(record, str) else None

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()  # a generator: closes its file
            self._reader = None

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
            if self._reader is None:
                self._reader = self._read(self.files[self.file_index], self.offset)
            item = next(self._reader, None)
            if item is None:
                self._next_file()
                continue
            advance, record = item
            self.offset += advance
            index, self.line = self.line, self.line + 1
            if index % self.world_size != self.rank:
                continue
            text = self._text(record)
            if text is None:
                self.skipped += 1
                continue
            self.epoch_docs += 1
            return text

    def state_dict(self) -> dict:
        return {"format": self.format, "files": [os.path.basename(f) for f in self.files],
                "epoch": self.epoch, "file_index": self.file_index, "offset": self.offset,
                "line": self.line, "epoch_docs": self.epoch_docs, "skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        fmt = state.get("format", "jsonl")  # states saved before the format key were jsonl
        if fmt != self.format:
            raise ValueError(f"data source {self.name}: saved as {fmt}, now {self.format}")
        files = [os.path.basename(f) for f in self.files]
        if state["files"] != files:
            raise ValueError(f"data source {self.name}: its files changed since the state was saved "
                             f"({len(state['files'])} saved, {len(files)} now)")
        self.close()
        for key in ("epoch", "file_index", "offset", "line", "epoch_docs", "skipped"):
            setattr(self, key, int(state[key]))


class JsonlSource(Source):
    """jsonl(.gz) lines; offset is the byte offset (uncompressed for .gz) of the next line."""

    format = "jsonl"

    def _read(self, path, offset):
        blank = 0  # blank lines are not records: their bytes join the next record's advance
        try:
            with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as fh:
                if offset:
                    fh.seek(offset)  # gzip seeks by decompressing up to the offset
                for raw in fh:
                    if raw.isspace():
                        blank += len(raw)
                        continue
                    yield blank + len(raw), raw
                    blank = 0
        except (OSError, EOFError, zlib.error):  # a corrupt or truncated .gz: one bad record
            yield 0, None

    def _text(self, record):
        if record is None:
            return None
        try:
            doc = json.loads(record)  # bad JSON and bad UTF-8 both raise ValueError
        except (ValueError, RecursionError):
            return None
        text = doc.get(self.text_field) if isinstance(doc, dict) else None
        return text if isinstance(text, str) else None


class ParquetSource(Source):
    """Rows of parquet files, read in record batches of the text column; offset is the row in the file."""

    format = "parquet"

    def _read(self, path, offset):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            with pq.ParquetFile(path) as pf:
                meta = pf.metadata
                if self.text_field not in pf.schema_arrow.names:  # every row lacks the field
                    yield from ((1, None) for _ in range(offset, meta.num_rows))
                    return
                starts = list(itertools.accumulate(
                    (meta.row_group(g).num_rows for g in range(meta.num_row_groups)), initial=0))
                group = bisect.bisect_right(starts, offset) - 1  # the row group holding `offset`
                drop = offset - starts[group]
                batches = pf.iter_batches(batch_size=ROWS_PER_READ, columns=[self.text_field],
                                          row_groups=range(group, meta.num_row_groups))
                for batch in batches:
                    values = batch.column(0).to_pylist()
                    if drop:
                        values, drop = values[drop:], max(0, drop - len(values))
                    for value in values:
                        yield 1, value
        except (OSError, pa.ArrowException):  # an unreadable file: one bad record
            yield 0, None


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


class HFDiskSource(Source):
    """A `save_to_disk` dataset (memory-mapped arrow), read by row index; offset is the row."""

    format = "hf"

    def __init__(self, name: str, path: str, split: str, text_field: str = "text",
                 rank: int = 0, world_size: int = 1):
        import datasets

        super().__init__(name, [path], text_field, rank, world_size)
        try:
            ds = datasets.load_from_disk(path)
        except Exception as exc:  # a corrupt folder: datasets raises many kinds
            raise ConfigError(f"data.sources.{name}.path: cannot load dataset {path}: {_first_line(exc)}") \
                from None
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ConfigError(f"data.sources.{name}.split: {split!r} is not a split of {path} "
                                  f"(splits: {', '.join(ds)})")
            ds = ds[split]
        if text_field not in ds.column_names:
            raise ConfigError(f"data.sources.{name}.text_field: {text_field!r} is not a column of {path} "
                              f"(columns: {', '.join(ds.column_names)})")
        self.dataset = ds.select_columns([text_field])

    def _read(self, path, offset):
        n = len(self.dataset)
        for start in range(offset, n, ROWS_PER_READ):
            for value in self.dataset[start : min(start + ROWS_PER_READ, n)][self.text_field]:
                yield 1, value


class HFStreamSource(Source):
    """Local data files or a dataset folder through load_dataset(streaming=True); offset is the row.

    Resuming re-reads the stream up to the saved row (streams cannot seek).
    """

    format = "hf"

    def __init__(self, name: str, path: str, split: str, text_field: str = "text",
                 rank: int = 0, world_size: int = 1):
        import datasets

        super().__init__(name, [path], text_field, rank, world_size)
        key = f"data.sources.{name}.path"
        if os.path.isdir(path):
            args = {"path": path}
        else:
            files = sorted(_matches(path))
            if not files:
                raise ConfigError(f"{key}: no such file or directory, and no glob match: {path}")
            builders = {HF_BUILDERS.get("".join(Path(f).suffixes[-2:]),
                                        HF_BUILDERS.get(Path(f).suffix)) for f in files}
            if len(builders) != 1 or None in builders:
                raise ConfigError(f"{key}: cannot pick one datasets builder for {path} "
                                  f"(known extensions: {', '.join(HF_BUILDERS)})")
            args = {"path": builders.pop(), "data_files": {split: files}}
        try:
            self.dataset = datasets.load_dataset(**args, split=split, streaming=True)
        except Exception as exc:  # no data files, a bad split, an unknown layout: one line
            raise ConfigError(f"{key}: cannot load a dataset from {path} (split {split!r}): "
                              f"{_first_line(exc)}") from None

    def _read(self, path, offset):
        rows = itertools.islice(iter(self.dataset), offset, None)
        try:
            for row in rows:
                yield 1, row.get(self.text_field) if isinstance(row, dict) else None
        except Exception:  # a malformed file mid-stream (datasets raises many kinds): one bad record
            yield 0, None


def open_source(name: str, src: SourceConfig, rank: int = 0, world_size: int = 1) -> Source:
    """The source `src` for one rank; a missing path or a wrong format raises ConfigError."""
    fmt = detect_format(src)
    if fmt == "hf":
        if not os.path.exists(src.path) and not _matches(src.path):
            raise ConfigError(f"data.sources.{name}.path: no such file or directory, "
                              f"and no glob match: {src.path}")
        kind = HFDiskSource if is_saved_dataset(src.path) else HFStreamSource
        return kind(name, src.path, src.split, src.text_field, rank, world_size)
    kind = ParquetSource if fmt == "parquet" else JsonlSource
    return kind(name, resolve_files(name, src, fmt), src.text_field, rank, world_size)
