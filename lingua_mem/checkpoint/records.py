"""What a checkpoint is on disk, read without loading it: the step folders of a dump dir
(checkpoints/<step>/, committed by its manifest), the tensors' shapes from DCP's metadata,
the model arguments of a training checkpoint (its config.yaml) or of a consolidated or
exported one (lingua_mem.json / config.json), and verify(), the check before any read.
Everything else in checkpoint/ builds on this."""

from __future__ import annotations

import contextlib
import json
import warnings
import zlib
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from lingua_mem.checkpoint.safe_load import UnsafeCheckpoint, read_dcp_metadata
from lingua_mem.checkpoint.safetensors_stream import weight_files
from lingua_mem.config import MemoryConfig, ModelConfig, MoEConfig, validate_model
from lingua_mem.errors import ConfigError
from lingua_mem.model.args import ModelArgs, validate_args

MANIFEST = "manifest.json"
# The checkpoint format this version writes, recorded as manifest.json's "format". Every
# format up to it is read; a newer one is refused in one line (it is not corrupt: an older
# lingua_mem cannot know what it holds). A change to what a checkpoint holds or how it is read
# gets the next number, a line here, and a fixture in tests/fixtures/ (tests/test_format.py).
CHECKPOINT_FORMAT = 1
CHECKPOINT_FORMATS = {
    0: "no 'format' in the manifest (before 2026-12-07): read as format 1, but numpy's RNG state "
       "is an array in the train state (read through numpy's allowed globals)",
    1: "DCP of {'model', 'optim'}; train_state_<rank>.pt of plain data (numpy's RNG state as lists); "
       "config.yaml, meta.json; manifest.json with 'format', 'step', size and CRC32 of every file",
}



class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded (truncated, corrupt, missing files); names the file."""



class NewerFormat(ConfigError):
    """A checkpoint written in a format newer than this version reads: not corrupt, refused."""



def checkpoint_dir(dump_dir: str | Path, step: int) -> Path:
    return Path(dump_dir) / "checkpoints" / f"{step:010d}"



def complete_checkpoints(dump_dir: str | Path) -> list[Path]:
    """Committed checkpoints, oldest first."""
    root = Path(dump_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())



def file_crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):  # 1 MiB: a tool streaming a checkpoint keeps a bounded peak
            crc = zlib.crc32(chunk, crc)
    return crc


def verify(path: Path, rank: int = 0, world: int = 1) -> None:
    """The check every reader of a training checkpoint makes before reading it (training's
    resume and init_from, eval, consolidate, export-hf, the usage count): not a folder
    training set aside (*.corrupt), a manifest, and this rank's share of the files against
    it (all sizes; CRC32 of files rank, rank + world, ...). CheckpointError names the first
    fault in one line; NewerFormat (a ConfigError: not corrupt) a format this version cannot read."""
    if not path.is_dir():
        raise CheckpointError(missing_checkpoint(path))
    if ".corrupt" in path.name:
        raise CheckpointError(f"{path}: set aside by training as corrupt (it failed to load); not read")
    if not (path / MANIFEST).is_file():
        raise CheckpointError(f"{path}: no {MANIFEST} (a save that never finished, or not a training "
                              "checkpoint); not read")
    try:
        written = json.loads((path / MANIFEST).read_text())
        manifest = written["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path / MANIFEST}: unreadable manifest ({exc})") from None
    check_format(path, written.get("format", 0))
    for i, (name, entry) in enumerate(sorted(manifest.items())):
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"{f}: missing")
        if f.stat().st_size != entry["size"]:
            raise CheckpointError(f"{f}: {f.stat().st_size} bytes, the manifest says {entry['size']} "
                                  "(truncated?)")
        if i % world == rank and file_crc32(f) != entry["crc32"]:
            raise CheckpointError(f"{f}: CRC32 mismatch (corrupt)")


def check_format(path: Path, written: object) -> None:
    """NewerFormat unless this version reads checkpoint format `written` (of `path`)."""
    if isinstance(written, int) and not isinstance(written, bool) and 0 <= written <= CHECKPOINT_FORMAT:
        return
    raise NewerFormat(f"{path}: checkpoint format {written!r}, newer than this lingua_mem reads (formats 0 "
                      f"to {CHECKPOINT_FORMAT}): load it with the version that wrote it, or a later one")


def missing_checkpoint(path: Path) -> str:
    """"no such checkpoint <path>", naming the steps its folder does hold (one line)."""
    root = path.parent
    there = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.isdigit()) if root.is_dir() else []
    return f"no such checkpoint {path}" + (f"; {root} has {', '.join(there)}" if there else "")



def saved_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The global shape of every model tensor in checkpoint `path`, by FQN (from its
    metadata, no weights read); CheckpointError if the metadata is unreadable."""
    try:
        saved = read_dcp_metadata(path).state_dict_metadata
    except UnsafeCheckpoint:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path / '.metadata'}: unreadable ({type(exc).__name__}: {exc})") from None
    # DCP flattens {"model": {fqn: ...}} to "model.<fqn>"
    return {key.removeprefix("model."): tuple(meta.size) for key, meta in saved.items()
            if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}



def check_model_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """ConfigError naming the first model tensor whose global shape differs from the
    checkpoint's, or that only one side has; CheckpointError if the metadata is unreadable."""
    saved = saved_shapes(path)
    for name, shape in shapes.items():
        if name not in saved:
            raise ConfigError(f"checkpoint {path}: parameter {name} of this model is not in the checkpoint "
                              "(a different model config?)")
        if saved[name] != tuple(shape):
            raise ConfigError(f"checkpoint {path}: parameter {name} has shape {saved[name]} in the "
                              f"checkpoint and {tuple(shape)} in this model")
    extra = sorted(set(saved) - set(shapes))
    if extra:
        raise ConfigError(f"checkpoint {path}: parameter {extra[0]} is in the checkpoint but not in this "
                          "model (a different model config?)")



def match_by_name(path: Path, saved: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]]):
    """(loaded, skipped, new) of init_from a checkpoint: the names in both (of equal shape),
    only in the checkpoint, only in the model; ConfigError naming the first tensor (in model
    order) that both have with different shapes."""
    for name, shape in shapes.items():
        if name in saved and saved[name] != tuple(shape):
            raise ConfigError(f"checkpoint.init_from: {path}: parameter {name} has shape {saved[name]} in "
                              f"the checkpoint and {tuple(shape)} in this model")
    return (sorted(set(saved) & set(shapes)), sorted(set(saved) - set(shapes)),
            sorted(set(shapes) - set(saved)))



@contextlib.contextmanager
def quiet_single_process():
    """DCP warns at every single-process call that it is "assuming" one process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


FORMAT = "lingua_mem"



def _first_line(exc: Exception) -> str:
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0][:300]}" if msg else type(exc).__name__



def _training_model_args(raw, where: Path) -> ModelArgs:
    """The model's arguments from the "model", "memory" and "moe" sections of a training run's
    config.yaml (a run before moe existed has none: its defaults), type-checked by OmegaConf and
    validated; the rest is ignored."""
    parts = []
    for section, schema in (("model", ModelConfig), ("memory", MemoryConfig), ("moe", MoEConfig)):
        try:
            parts.append(OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema),
                                                             raw.get(section) or {})))
        except OmegaConfBaseException as exc:
            key = f"{section}.{exc.full_key}" if getattr(exc, "full_key", None) else section
            raise ConfigError(f"{where}: {key}: {str(exc).strip().splitlines()[0]}") from None
    try:
        return validate_model(*parts)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None



def checkpoint_model_args(checkpoint_dir: str | Path, verified: bool = False) -> tuple[ModelArgs, dict]:
    """(model args, the run's config.yaml as a dict) of a training checkpoint, verified first
    (verify(); `verified`: the caller did); ValueError (one line, naming the path or key) for
    a missing, set-aside, unverifiable or corrupt checkpoint, or a missing config."""
    path = Path(checkpoint_dir)
    if not verified:
        verify(path)
    if not path.is_dir():
        raise ValueError(missing_checkpoint(path))
    config_file = path / "config.yaml"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing (not a checkpoint directory?)")
    try:
        raw = OmegaConf.load(config_file)
    except Exception as exc:  # YAML syntax and the like
        raise ValueError(f"{config_file}: unreadable ({_first_line(exc)})") from None
    return _training_model_args(raw, config_file), OmegaConf.to_container(raw, resolve=False)



def consolidated_model_args(directory: str | Path) -> tuple[ModelArgs, dict]:
    """(model args, its lingua_mem config) of a consolidate() or export-hf output directory
    (config.json, or lingua_mem.json beside an HF config.json), its weights unread."""
    directory = Path(directory)
    config_file = directory / "lingua_mem.json"
    if not config_file.is_file():
        config_file = directory / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing (not a consolidated checkpoint?)")
    weight_files(directory)  # the weights are there (names the missing file)
    try:
        raw = json.loads(config_file.read_text())
    except ValueError as exc:
        raise ValueError(f"{config_file}: unreadable ({_first_line(exc)})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"{config_file}: not a {FORMAT} config (no \"format\": \"{FORMAT}\")")
    if "memory" in raw:  # the model and memory config sections, before 2026-12-01
        raise ValueError(f"{config_file}: an export of an older lingua_mem; consolidate its checkpoint again")
    try:
        args = ModelArgs.from_dict(raw.get("model"))
        validate_args(args)
    except ValueError as exc:  # names the key
        raise ValueError(f"{config_file}: {exc}") from None
    except TypeError as exc:  # a value of the wrong type
        raise ValueError(f"{config_file}: model: {_first_line(exc)}") from None
    return args, raw
