"""A checkpoint written by hand in a test (dcp.save and a config.yaml) sealed as the trainer
seals its own: a manifest.json of every file's size and CRC32, without which no reader
loads it (checkpoint.records.verify)."""

import json
from pathlib import Path

from lingua_mem.checkpoint.records import MANIFEST, file_crc32


def seal(path: Path, step: int = 0) -> Path:
    files = {p.name: {"size": p.stat().st_size, "crc32": file_crc32(p)}
             for p in sorted(Path(path).iterdir()) if p.is_file() and p.name != MANIFEST}
    (Path(path) / MANIFEST).write_text(json.dumps({"step": step, "files": files}, indent=1))
    return Path(path)
