"""Reading what a checkpoint holds as data: no file in it can run code when loaded.

DCP writes its `.metadata` with pickle and the optimizer's non-tensor state (its param
groups) as torch.save bytes; the trainer writes `train_state_<rank>.pt` with torch.save.
Plain unpickling runs whatever callable a crafted file names, and the manifest's CRC32 is no
defence (who crafts the file rewrites the manifest). Here:
- `.metadata` goes through MetadataUnpickler, which builds only DCP's own metadata classes,
  torch.Size, dtypes, layouts and the saver's path (METADATA_GLOBALS);
- DCP's byte items and the train state go through torch.load(weights_only=True): containers,
  numbers, strings and tensors (and, for train states written before numpy's generator state
  was kept as lists, numpy arrays of numbers).
A file that names anything else raises UnsafeCheckpoint: one line naming the file and what it
asked for, before any of it is built.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import torch
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from lingua_mem.errors import ConfigError

METADATA = ".metadata"
_DCP_METADATA = "torch.distributed.checkpoint.metadata"
# every global a DCP .metadata pickle names (torch 2.11 to 2.14): its dataclasses (built by
# __new__ and their state, or called with their fields), torch.Size, the dtypes and layouts of
# the tensors, the storage record of the file-system writer and the path it saved to
METADATA_GLOBALS = frozenset({
    *((_DCP_METADATA, name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
})
# numpy's generator state as np.random.get_state() gives it (train states before lists)
_NUMPY_STATE = [np.dtype, np.ndarray, type(np.dtype(np.uint32))]
_RECONSTRUCT = (np._core if hasattr(np, "_core") else np.core).multiarray._reconstruct


class UnsafeCheckpoint(ConfigError):
    """A checkpoint file that would run code, or build objects no checkpoint holds, when loaded."""


class _Refused(pickle.UnpicklingError):
    """A global the metadata may not name (a damaged file raises UnpicklingError itself)."""


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles a DCP `.metadata`: METADATA_GLOBALS and torch dtypes, nothing else."""

    def find_class(self, module: str, name: str):
        if (module, name) in METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise _Refused(f"it names {module}.{name}, which no checkpoint metadata holds")


def read_dcp_metadata(path: str | Path) -> Metadata:
    """The DCP metadata of checkpoint directory `path`, read as data (UnsafeCheckpoint: a file
    that names anything else; OSError and other unpickling errors as they come)."""
    file = Path(path) / METADATA
    with open(file, "rb") as f:
        try:
            metadata = MetadataUnpickler(f).load()
        except _Refused as exc:
            raise UnsafeCheckpoint(f"{file}: refused, not loaded: {exc}") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpoint(f"{file}: refused, not loaded: it holds a {type(metadata).__name__}, "
                               "not DCP metadata")
    return metadata


class SafeReader(FileSystemReader):
    """DCP's file-system reader with its metadata read by read_dcp_metadata (or `metadata`,
    read so already: the file is read once)."""

    def __init__(self, path: str | Path, metadata: Metadata | None = None):
        super().__init__(str(path))
        self.metadata = metadata

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = self.metadata if self.metadata is not None else read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _asks_for_more(exc: pickle.UnpicklingError) -> bool:
    """Whether torch's weights_only error is a refusal (a global or an opcode it does not
    allow), not a damaged file."""
    return "Unsupported" in str(exc)


def _refusal(exc: pickle.UnpicklingError) -> str:
    """The line of torch's weights_only error that says what the file asked for."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [""]
    asked = next((line for line in lines if "Unsupported" in line or "GLOBAL" in line), lines[0])
    return asked.removeprefix("WeightsUnpickler error: ").split(" was not an allowed")[0][:200]


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner with its byte items (the optimizer's param groups) read by
    torch.load(weights_only=True); one that asks for more raises UnsafeCheckpoint."""

    def __init__(self, *args, path: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.path = path

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as exc:
            if not _asks_for_more(exc):
                raise
            raise UnsafeCheckpoint(f"{self.path}: refused, not loaded: its item {read_item.dest_index.fqn} "
                                   f"asks for more than data ({_refusal(exc)})") from None
        plain = io.BytesIO()  # plain data now: DCP's own placement takes it from here
        torch.save(obj, plain)
        plain.seek(0)
        super().load_bytes(read_item, plain)


def dcp_load(state: dict, path: str | Path, distributed: bool, partial: bool) -> None:
    """dcp.load of checkpoint `path` into `state` (in place; `partial`: allow_partial_load),
    its metadata and byte items read as data. UnsafeCheckpoint (on every rank: DCP gathers
    each rank's error) for a file that asks for more; DCP's own exceptions otherwise."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    path = Path(path)
    metadata = read_dcp_metadata(path)  # a crafted .metadata is refused here, before DCP starts
    try:
        dcp.load(state, storage_reader=SafeReader(path, metadata), no_dist=not distributed,
                 planner=SafeLoadPlanner(allow_partial_load=partial, path=path))
    except CheckpointException as exc:  # a BaseException: each rank's error inside
        for failure in exc.failures.values():
            inner = failure[0] if isinstance(failure, tuple) else failure
            if isinstance(inner, UnsafeCheckpoint):
                raise UnsafeCheckpoint(str(inner)) from None
        raise


def load_train_state(file: str | Path) -> dict:
    """A `train_state_<rank>.pt` as data (UnsafeCheckpoint: one that asks for anything else)."""
    try:
        with torch.serialization.safe_globals([*_NUMPY_STATE, _RECONSTRUCT]):
            return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not _asks_for_more(exc):
            raise
        raise UnsafeCheckpoint(f"{file}: refused, not loaded: it asks for more than data "
                               f"({_refusal(exc)})") from None
