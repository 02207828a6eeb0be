"""Read a DCP checkpoint's tensors block by block, in bounded memory, in one plain process.

DCP's own load reads each stored chunk whole (one rank's shard: the whole value table of a
1-process run). This reader reads only the rows asked for: a FileSystemWriter stores each
chunk as a torch.save archive (a zip whose storage record is kept uncompressed) at a byte
range of a .distcp file, so rows [r0, r1) of a chunk are one contiguous byte range of it.

    reader = DCPStreamReader(checkpoint_dir)
    reader.tensors("model.")            -> {name: (shape, dtype)} under a prefix
    reader.read("model.values.shared.weight", r0, r1)   -> rows r0:r1, (r1 - r0, ...)

A chunk written with a storage transform (compression, an extension) is read through
torch.load instead (whole, as DCP would).
"""

from __future__ import annotations

import io
import math
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lingua_mem.checkpoint.safe_load import read_dcp_metadata


@dataclass(frozen=True)
class _Chunk:
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    path: Path  # the .distcp file
    start: int  # the torch.save archive's byte range in it
    length: int
    transformed: bool


class _FileSlice(io.RawIOBase):
    """A read-only, seekable view of bytes [start, start + length) of an open file."""

    def __init__(self, f, start: int, length: int):
        self.f, self.start, self.length, self.pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.length}[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def tell(self) -> int:
        return self.pos

    def readinto(self, buffer) -> int:
        n = max(0, min(len(buffer), self.length - self.pos))
        self.f.seek(self.start + self.pos)
        data = self.f.read(n)
        buffer[:len(data)] = data
        self.pos += len(data)
        return len(data)


class _TensorRecord(pickle.Unpickler):
    """Reads a torch.save archive's data.pkl without loading storages: the one tensor's
    (storage record key, storage offset, size, stride)."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return lambda storage, offset, size, stride, *rest: (storage, offset, tuple(size), tuple(stride))
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch":
            return name  # a storage type or dtype name: not needed
        raise pickle.UnpicklingError(f"unexpected {module}.{name}")

    def persistent_load(self, pid):
        return pid[2]  # ("storage", type, key, location, numel)


def _contiguous_stride(size: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for s in reversed(size):
        stride.append(acc)
        acc *= s
    return tuple(reversed(stride))


class DCPStreamReader:
    """Tensors of a DCP checkpoint directory, read by row blocks (dim 0)."""

    def __init__(self, checkpoint_dir: str | Path):
        self.path = Path(checkpoint_dir)
        self.metadata = read_dcp_metadata(self.path)
        self.chunks: dict[str, list[_Chunk]] = {}
        for index, info in self.metadata.storage_data.items():
            md = self.metadata.state_dict_metadata.get(index.fqn)
            if not isinstance(md, TensorStorageMetadata):
                continue
            chunk = next(c for c in md.chunks if tuple(c.offsets) == tuple(index.offset))
            self.chunks.setdefault(index.fqn, []).append(_Chunk(
                tuple(chunk.offsets), tuple(chunk.sizes), self.path / info.relative_path, info.offset,
                info.length, bool(getattr(info, "transform_descriptors", None))))
        self._layout: dict[_Chunk, tuple[int, str]] = {}  # chunk -> (data byte offset, how)

    def tensors(self, prefix: str = "") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """{name without the prefix: (shape, dtype)} of the tensors under `prefix`."""
        return {fqn[len(prefix):]: (tuple(md.size), md.properties.dtype)
                for fqn, md in self.metadata.state_dict_metadata.items()
                if fqn.startswith(prefix) and isinstance(md, TensorStorageMetadata)}

    def read(self, fqn: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 (dim 0; a 0-dim tensor whole) of tensor `fqn`, assembled from the
        chunks that hold them; only those rows' bytes are read."""
        md = self.metadata.state_dict_metadata[fqn]
        size, dtype = tuple(md.size), md.properties.dtype
        if not size:
            return self._read_whole(self.chunks[fqn][0], dtype).reshape(())
        r1 = size[0] if r1 is None else r1
        out = torch.empty((r1 - r0, *size[1:]), dtype=dtype)
        for chunk in self.chunks[fqn]:
            c0, c1 = chunk.offsets[0], chunk.offsets[0] + chunk.sizes[0]
            lo, hi = max(r0, c0), min(r1, c1)
            if lo >= hi:
                continue
            dest = out[lo - r0:hi - r0]
            for d in range(1, len(size)):
                dest = dest.narrow(d, chunk.offsets[d], chunk.sizes[d])
            self._read_rows(chunk, dtype, lo - c0, hi - c0, dest)  # (hi - lo, *chunk.sizes[1:])
        return out

    def _read_rows(self, chunk: _Chunk, dtype: torch.dtype, a: int, b: int, dest: torch.Tensor) -> None:
        """Rows a:b of a chunk into dest: read straight into it when it is contiguous."""
        data_offset, how = self._locate(chunk, dtype)
        if how == "whole":
            dest.copy_(self._read_whole(chunk, dtype)[a:b])
            return
        row_bytes = math.prod(chunk.sizes[1:]) * dtype.itemsize
        out = dest if dest.is_contiguous() else torch.empty((b - a, *chunk.sizes[1:]), dtype=dtype)
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start + data_offset + a * row_bytes)
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            if f.readinto(view) != len(view):
                raise ValueError(f"{chunk.path}: truncated (a tensor's bytes end early)")
        if out is not dest:
            dest.copy_(out)

    def _read_whole(self, chunk: _Chunk, dtype: torch.dtype) -> torch.Tensor:
        with open(chunk.path, "rb") as f:
            f.seek(chunk.start)
            raw = f.read(chunk.length)
        if chunk.transformed:  # the checkpoint's extensions undo themselves in DCP's own reader
            raise ValueError(f"{chunk.path}: a transformed (e.g. compressed) chunk; not supported by the "
                             "streaming reader")
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True).to(dtype)

    def _locate(self, chunk: _Chunk, dtype: torch.dtype) -> tuple[int, str]:
        """(byte offset of the chunk's first element inside its archive, "rows"), or
        (0, "whole") when the archive is not a plain contiguous tensor record."""
        if chunk in self._layout:
            return self._layout[chunk]
        layout = (0, "whole")
        if not chunk.transformed:
            with open(chunk.path, "rb") as f:
                view = io.BufferedReader(_FileSlice(f, chunk.start, chunk.length))
                with zipfile.ZipFile(view) as archive:
                    pkl = next(n for n in archive.namelist() if n.endswith("data.pkl"))
                    key, offset, size, stride = _TensorRecord(io.BytesIO(archive.read(pkl))).load()
                    prefix = pkl[:-len("data.pkl")]
                    info = archive.getinfo(f"{prefix}data/{key}")
                    if (info.compress_type == zipfile.ZIP_STORED and size == chunk.sizes
                            and stride == _contiguous_stride(size)):
                        view.seek(info.header_offset)
                        header = view.read(30)  # the local file header: its name and extra lengths
                        name_len = int.from_bytes(header[26:28], "little")
                        extra_len = int.from_bytes(header[28:30], "little")
                        start = info.header_offset + 30 + name_len + extra_len
                        layout = (start + offset * dtype.itemsize, "rows")
        self._layout[chunk] = layout
        return layout
