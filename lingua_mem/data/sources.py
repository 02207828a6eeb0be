"""Reading documents: formats, readers, and one source's documents for one rank.

Formats (SourceConfig.format, prepare's --format; `auto` picks by name):
  jsonl    *.jsonl / *.jsonl.gz files, one JSON object per line, its text in text_field
  parquet  *.parquet files, read in record batches of the text column only
  text     *.txt / *.txt.gz files, every non-blank line one document (without its line break)
  hf       a local Hugging Face dataset: a `save_to_disk` folder (read by row
           index), or for a training source also local data files / a dataset
           folder through `datasets.load_dataset(..., streaming=True)`; only
           local paths, so nothing touches the network

A reader yields (advance, text, skip) for each record of one file from a
position on: text is None for a record that is not a document, and skip says
why: "bad_utf8", "bad_json", "no_text" (text_field missing or not a string), or
"bad_file: <why>" once for a file that cannot be read to its end. advance is
how far the record moves the position: bytes (blank lines join the next
record's) for jsonl and text, rows otherwise. prepare.py reads each input once
with them; a Source below reads them for training.

A source reads its units (files in sorted order, or the one dataset) in order,
over and over. Its records (non-blank lines, rows) are numbered over the whole
epoch; the rank keeps those whose number % world_size == rank, so each record
is read once per epoch across all ranks, whatever the file count. A kept record
that is not a document is skipped and counted in `skipped`.

Position (state_dict, plain JSON): epoch, file_index, offset (byte offset of
the next line for jsonl and text, row within the file or dataset otherwise),
line (records seen this epoch, all ranks), epoch_docs (documents this rank
returned this epoch) and skipped.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import itertools
import json
import os
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

from lingua_mem.config import SourceConfig
from lingua_mem.errors import ConfigError

SUFFIXES = {"jsonl": (".jsonl", ".jsonl.gz"), "parquet": (".parquet",), "text": (".txt", ".txt.gz")}
FORMATS = ("auto", *SUFFIXES, "hf")
HF_BUILDERS = {"json": (".jsonl", ".json", ".jsonl.gz", ".json.gz"), "csv": (".csv",), "text": (".txt",),
               "parquet": (".parquet",), "arrow": (".arrow",)}  # datasets builder -> file names
PARQUET_MAGIC = b"PAR1"
ROWS_PER_READ = 1024  # rows per parquet record batch / dataset slice: bounds memory

Read = tuple[int, str | None, str | None]  # (advance, text, skip reason)


class SourceError(ValueError):
    """A dataset that cannot be read as asked; `field` is the setting at fault (path, split, text_field)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# ---------------------------------------------------------------- what a path holds

def is_saved_dataset(path: str) -> bool:
    """A `datasets` save_to_disk folder: of a DatasetDict, or of a Dataset."""
    p = Path(path)
    return p.is_dir() and ((p / "dataset_dict.json").is_file()
                           or ((p / "dataset_info.json").is_file() and (p / "state.json").is_file()))


def format_of(path: str, table: dict[str, tuple[str, ...]] = SUFFIXES) -> str | None:
    """The format (a key of `table`) that a file's name says, or None."""
    name = os.path.basename(path)
    return next((fmt for fmt, suffixes in table.items() if name.endswith(suffixes)), None)


def files_in(directory: str, fmt: str | None = None) -> list[str]:
    """A directory's files whose names say `fmt` (any format if None): sorted, not hidden, not recursive."""
    paths = (os.path.join(directory, n) for n in sorted(os.listdir(directory)) if not n.startswith("."))
    return [p for p in paths if os.path.isfile(p) and format_of(p) in ((fmt,) if fmt else SUFFIXES)]


def _matches(path: str) -> list[str]:
    """The file at `path`, or the files a glob matches."""
    return [path] if os.path.isfile(path) else [f for f in glob.glob(path) if os.path.isfile(f)]


def detect_format(src: SourceConfig) -> str:
    """`src.format`, or for `auto`: hf for a save_to_disk folder, else the first of jsonl, parquet
    and text that names a file the path holds or matches, jsonl when none does."""
    if src.format != "auto":
        return src.format
    if is_saved_dataset(src.path):
        return "hf"
    files = files_in(src.path) if os.path.isdir(src.path) else _matches(src.path)
    found = {format_of(f) for f in files}
    return next((fmt for fmt in SUFFIXES if fmt in found), "jsonl")


def _starts_with(path: str, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def resolve_files(name: str, src: SourceConfig, fmt: str | None = None,
                  section: str = "data.sources") -> list[str]:
    """A file source's files: a directory's files of its format, one file, or a glob; sorted.
    Errors name `<section>.<name>.path`."""
    key = f"{section}.{name}.path"
    fmt = fmt or detect_format(src)
    path = src.path
    if os.path.isdir(path):
        files = files_in(path, fmt)
        if not files:
            kinds = " or ".join("*" + s for s in SUFFIXES[fmt])
            raise ConfigError(f"{key}: no {kinds} files in directory {path}")
    else:
        files = _matches(path)
        if not files:
            raise ConfigError(f"{key}: no such file or directory, and no glob match: {path}")
    for f in files:  # a wrong explicit format fails here, not as a stream of skipped records
        if fmt == "parquet" and not _starts_with(f, PARQUET_MAGIC):
            raise ConfigError(f"{key}: {f} is not a parquet file (format: parquet)")
        if fmt != "parquet" and not f.endswith(".gz") and _starts_with(f, PARQUET_MAGIC):
            raise ConfigError(f"{key}: {f} is a parquet file, not {fmt} (set format: parquet)")
    return sorted(files)


# ---------------------------------------------------------------- readers

def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _text(value) -> tuple[str | None, str | None]:
    return (value, None) if isinstance(value, str) else (None, "no_text")


def _json_text(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    try:
        doc = json.loads(raw)
    except UnicodeDecodeError:
        return None, "bad_utf8"
    except (ValueError, RecursionError):
        return None, "bad_json"
    return _text(doc.get(text_field) if isinstance(doc, dict) else None)


def _line_text(raw: bytes) -> tuple[str | None, str | None]:
    try:
        return raw.decode("utf-8").rstrip("\r\n"), None
    except UnicodeDecodeError:
        return None, "bad_utf8"


def _read_lines(path: str, offset: int, parse) -> Iterator[Read]:
    """parse(line) for each non-blank line of a (gzipped) file from byte `offset` (uncompressed) on."""
    blank = 0  # blank lines are not records: their bytes join the next record's advance
    try:
        with gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb") as fh:
            if offset:
                fh.seek(offset)  # gzip seeks by decompressing up to the offset
            for raw in fh:
                if raw.isspace():
                    blank += len(raw)
                    continue
                yield blank + len(raw), *parse(raw)
                blank = 0
    except (OSError, EOFError, zlib.error) as exc:  # e.g. a corrupt or truncated .gz
        yield 0, None, f"bad_file: {_first_line(exc)}"


def read_jsonl(path: str, text_field: str, offset: int = 0) -> Iterator[Read]:
    return _read_lines(path, offset, lambda raw: _json_text(raw, text_field))


def read_text(path: str, text_field: str = "", offset: int = 0) -> Iterator[Read]:
    return _read_lines(path, offset, _line_text)


def read_parquet(path: str, text_field: str, offset: int = 0) -> Iterator[Read]:
    """Rows from row `offset` on, read in record batches of the text column only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with pq.ParquetFile(path) as pf:
            meta = pf.metadata
            if text_field not in pf.schema_arrow.names:  # every row lacks the field: skip the file
                columns = ", ".join(pf.schema_arrow.names)
                yield 0, None, f"bad_file: no column {text_field!r} (its columns: {columns})"
                return
            starts = list(itertools.accumulate(
                (meta.row_group(g).num_rows for g in range(meta.num_row_groups)), initial=0))
            group = bisect.bisect_right(starts, offset) - 1  # the row group holding `offset`
            drop = offset - starts[group]
            batches = pf.iter_batches(batch_size=ROWS_PER_READ, columns=[text_field],
                                      row_groups=range(group, meta.num_row_groups))
            for batch in batches:
                values = batch.column(0).to_pylist()
                if drop:
                    values, drop = values[drop:], max(0, drop - len(values))
                for value in values:
                    yield 1, *_text(value)
    except (OSError, pa.ArrowException) as exc:
        yield 0, None, f"bad_file: {_first_line(exc)}"


READERS = {"jsonl": read_jsonl, "parquet": read_parquet, "text": read_text}  # file formats


def load_saved_dataset(path: str, split: str, text_field: str):
    """A save_to_disk dataset (of a DatasetDict: its `split`), just its text column; else SourceError."""
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except Exception as exc:  # a corrupt folder: datasets raises many kinds
        raise SourceError("path", f"cannot load dataset {path}: {_first_line(exc)}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise SourceError("split", f"{split!r} is not a split of {path} (splits: {', '.join(ds)})")
        ds = ds[split]
    if text_field not in ds.column_names:
        raise SourceError("text_field", f"{text_field!r} is not a column of {path} "
                                        f"(columns: {', '.join(ds.column_names)})")
    return ds.select_columns([text_field])


def read_dataset(dataset, text_field: str, offset: int = 0) -> Iterator[Read]:
    """Rows of a loaded (memory-mapped) dataset from row `offset` on, a slice at a time."""
    n = len(dataset)
    for start in range(offset, n, ROWS_PER_READ):
        for value in dataset[start : min(start + ROWS_PER_READ, n)][text_field]:
            yield 1, *_text(value)


def read_stream(dataset, text_field: str, offset: int = 0) -> Iterator[Read]:
    """Rows of a streaming dataset from row `offset` on (streams cannot seek: re-read up to it)."""
    try:
        for row in itertools.islice(iter(dataset), offset, None):
            yield 1, *_text(row.get(text_field) if isinstance(row, dict) else None)
    except Exception as exc:  # a malformed file mid-stream (datasets raises many kinds)
        yield 0, None, f"bad_file: {_first_line(exc)}"


# ---------------------------------------------------------------- training sources
class Source:
    """Base: the rank share, epochs, skipping and state; reads its files with READERS[format]."""

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
        self._reader: Iterator[Read] | None = None
        self._next_epoch_files: list[str] | None = None  # files added since a resumed state

    def _read(self, path: str, offset: int) -> Iterator[Read]:
        return READERS[self.format](path, self.text_field, offset)

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
            if self._next_epoch_files is not None:  # files added since the resumed state join now
                self.files, self._next_epoch_files = self._next_epoch_files, None

    def next_text(self) -> str:
        """The next document's text of this rank's share."""
        while True:
            if self._reader is None:
                self._reader = self._read(self.files[self.file_index], self.offset)
            item = next(self._reader, None)
            if item is None:
                self._next_file()
                continue
            advance, text, why = item
            self.offset += advance
            index, self.line = self.line, self.line + 1
            if index % self.world_size != self.rank:
                continue
            if text is None:
                self.skipped += 1
                if why.startswith("bad_file"):  # the reader's own reason, e.g. a corrupt parquet footer
                    print(f"warning: data.sources.{self.name}: skipped the rest of "
                          f"{self.files[self.file_index]}: {why.removeprefix('bad_file: ')}",
                          file=sys.stderr, flush=True)
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
        # the epoch in progress goes on over the files it started with; a file added since
        # joins at the next epoch, a file it was reading that is gone stops the run
        now = {os.path.basename(f): f for f in self.files}
        gone = [name for name in state["files"] if name not in now]
        if gone:
            raise ConfigError(f"data.sources.{self.name}.path: {gone[0]} was read by the run being resumed "
                              f"and is not in {os.path.dirname(self.files[0])} any more; put it back to "
                              "resume this epoch exactly, or use another dump_dir")
        added = [f for f in self.files if os.path.basename(f) not in set(state["files"])]
        if added:
            print(f"warning: data.sources.{self.name}: {len(added)} file(s) added since the checkpoint "
                  f"({', '.join(os.path.basename(f) for f in added[:3])}{', ...' if len(added) > 3 else ''}) "
                  "join at the next epoch", file=sys.stderr, flush=True)
        self._next_epoch_files = list(self.files) if added else None
        self.files = [now[name] for name in state["files"]]
        reading = self.files[state["file_index"]] if state["file_index"] < len(self.files) else None
        size = os.path.getsize(reading) if reading is not None else 0
        if reading is not None and self.format in ("jsonl", "text") and not reading.endswith(".gz") \
                and size < state["offset"]:  # cut or rewritten since the checkpoint
            raise ConfigError(f"data.sources.{self.name}.path: {reading} is {size:,} bytes, "
                              f"below the offset {state['offset']:,} the run being resumed had read it to "
                              "(changed since the checkpoint?); restore it to resume exactly, or use "
                              "another dump_dir")
        self.close()
        for key in ("epoch", "file_index", "offset", "line", "epoch_docs", "skipped"):
            setattr(self, key, int(state[key]))


class JsonlSource(Source):
    format = "jsonl"


class ParquetSource(Source):
    format = "parquet"

    def __init__(self, name: str, files: list[str], text_field: str = "text", rank: int = 0,
                 world_size: int = 1):
        super().__init__(name, files, text_field, rank, world_size)
        check_parquet_column(name, self.files, text_field)


def check_parquet_column(name: str, files: list[str], text_field: str) -> None:
    """ConfigError (one line) unless some of the files has column `text_field`; reads footers
    until one has (a file without it is skipped when read, with a warning)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    first = None
    for path in files:
        try:
            columns = pq.read_schema(path).names
        except (OSError, pa.ArrowException):
            continue  # a corrupt file: reading it says so
        if text_field in columns:
            return
        first = first or (path, columns)
    if first is not None:
        others = f", nor of the other {len(files) - 1} file(s)" if len(files) > 1 else ""
        raise ConfigError(f"data.sources.{name}.text_field: {text_field!r} is not a column of {first[0]} "
                          f"(its columns: {', '.join(first[1])}){others}")


class TextSource(Source):
    format = "text"


class HFDiskSource(Source):
    """A `save_to_disk` dataset (memory-mapped arrow), read by row index; offset is the row."""

    format = "hf"

    def __init__(self, name: str, path: str, split: str, text_field: str = "text",
                 rank: int = 0, world_size: int = 1):
        super().__init__(name, [path], text_field, rank, world_size)
        try:
            self.dataset = load_saved_dataset(path, split, text_field)
        except SourceError as exc:
            raise ConfigError(f"data.sources.{name}.{exc.field}: {exc}") from None

    def _read(self, path, offset):
        return read_dataset(self.dataset, self.text_field, offset)


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
            builders = {format_of(f, HF_BUILDERS) for f in files}
            if len(builders) != 1 or None in builders:
                known = ", ".join(s for suffixes in HF_BUILDERS.values() for s in suffixes)
                raise ConfigError(f"{key}: cannot pick one datasets builder for {path} "
                                  f"(known extensions: {known})")
            args = {"path": builders.pop(), "data_files": {split: files}}
        try:
            self.dataset = datasets.load_dataset(**args, split=split, streaming=True)
        except Exception as exc:  # no data files, a bad split, an unknown layout: one line
            raise ConfigError(f"{key}: cannot load a dataset from {path} (split {split!r}): "
                              f"{_first_line(exc)}") from None

    def _read(self, path, offset):
        return read_stream(self.dataset, self.text_field, offset)


FILE_SOURCES = {kind.format: kind for kind in (JsonlSource, ParquetSource, TextSource)}


def open_source(name: str, src: SourceConfig, rank: int = 0, world_size: int = 1) -> Source:
    """The source `src` for one rank; a missing path or a wrong format raises ConfigError."""
    fmt = detect_format(src)
    if fmt == "hf":
        if not os.path.exists(src.path) and not _matches(src.path):
            raise ConfigError(f"data.sources.{name}.path: no such file or directory, "
                              f"and no glob match: {src.path}")
        kind = HFDiskSource if is_saved_dataset(src.path) else HFStreamSource
        return kind(name, src.path, src.split, src.text_field, rank, world_size)
    return FILE_SOURCES[fmt](name, resolve_files(name, src, fmt), src.text_field, rank, world_size)
