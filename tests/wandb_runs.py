"""Read an offline W&B run file (.wandb) back: its run record and history rows.

The file is W&B's header (7 bytes) then a LevelDB-style log: 32 KiB blocks of
records, each a 7-byte header (crc32 u32, length u16, type u8: 1 full,
2 first, 3 middle, 4 last) and a fragment of a protobuf `Record`.
"""

import json
import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, fragment, out = 7, b"", []
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            continue
        fragment += data[pos:pos + length]
        pos += length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(fragment)
            out.append(rec)
            fragment = b""
    return out


def finished_records(run_dir: Path, timeout: float = 30.0) -> list:
    """The records of a run folder once its 'exit' record is on disk (W&B's service
    process may still be writing the file when wandb.finish() has returned)."""
    deadline = time.monotonic() + timeout
    while True:
        paths = list(Path(run_dir).glob("run-*.wandb"))
        if len(paths) == 1:
            try:
                recs = records(paths[0])
            except Exception:  # a header or record still being written
                recs = []
            if any(r.WhichOneof("record_type") == "exit" for r in recs):
                return recs
        if time.monotonic() > deadline:
            raise AssertionError(f"no finished W&B run file in {run_dir}")
        time.sleep(0.2)


def read_run(run_dir: Path) -> dict:
    """{'run_id', 'project', 'config': {...}, 'history': [{key: value}, ...]} of one run folder."""
    run: dict = {"config": {}, "history": []}
    for rec in finished_records(run_dir):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            run["run_id"], run["project"] = rec.run.run_id, rec.run.project
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            run["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in rec.history.item})
    return run
