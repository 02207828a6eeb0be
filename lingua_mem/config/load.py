"""Loading: dataclass defaults <- a base (a run's own config.yaml, for commands that default
to it) <- YAML file <- CLI dotlist, merged by OmegaConf, then validated once. Every error is
one ConfigError line naming the key, and where the bad value came from."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lingua_mem.config.schema import TrainConfig
from lingua_mem.config.validate import validate
from lingua_mem.errors import ConfigError

# OmegaConf's words for a value outside a Literal type, said as validate.py says them
_NOT_A_CHOICE = re.compile(r"^Invalid value (?P<value>'.*'), expected one of \[(?P<choices>.*)\]$")


def _one_line(exc: OmegaConfBaseException) -> str:
    key = getattr(exc, "full_key", None)
    msg = str(exc).splitlines()[0].strip()
    choice = _NOT_A_CHOICE.match(msg)
    if choice:  # a list item's key is the list's (checkpoint.preempt_signals[1])
        key = re.sub(r"\[\d+\]$", "", key or "")
        msg = f"{choice['value']} is not one of {choice['choices'].replace(chr(39), '')}"
    return f"{key}: {msg}" if key else msg


def _check_sections(schema_node, layer, where: str, prefix: str = "") -> None:
    """A section (a nested config) given a scalar or a list, in one layer to be merged: one
    ConfigError naming its key (OmegaConf's merge says only "Merge error: int is not a
    subclass of ModelConfig")."""
    if not OmegaConf.is_dict(layer):
        return
    for key, value in layer.items_ex(resolve=False):
        if key not in schema_node:
            continue  # an unknown key: the merge names it
        name = f"{prefix}{key}"
        expected = schema_node._get_node(key)
        if OmegaConf.is_dict(expected) and expected._metadata.object_type not in (None, dict):
            if not OmegaConf.is_dict(value):
                raise ConfigError(f"{name}: expected a section (its keys, e.g. {name}.<key>: ...), got "
                                  f"{value!r} ({where})")
            _check_sections(expected, value, where, f"{name}.")


def _yaml_error(path: str, exc: Exception) -> str:
    """A YAML syntax error as `config: FILE:LINE:COLUMN: problem`."""
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else path
    return f"config: {where}: {problem} (YAML syntax)"


def load_config(args: list[str], schema: type = TrainConfig, check=validate, base: dict | None = None):
    """Build a config from `config=<yaml>` and `key=value` items.

    Merge order: dataclass defaults <- `base` <- YAML <- dotlist. Returns a dataclass
    instance of `schema`, validated by `check`.
    """
    yaml_path = None
    dotlist = []
    for arg in args:
        if "=" not in arg:
            raise ConfigError(f"{arg}: expected key=value (e.g. config=configs/debug.yaml)")
        key, value = arg.split("=", 1)
        if key == "config":
            yaml_path = value
        else:
            dotlist.append(arg)
    merged = OmegaConf.structured(schema)
    if base is not None:
        try:
            layer = OmegaConf.create(base)
            _check_sections(merged, layer, "in the run's config.yaml")
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{_one_line(exc)} (in the run's config.yaml)") from None
    if yaml_path is not None:  # its errors name the file
        path = Path(yaml_path)
        if path.is_dir():
            raise ConfigError(f"config: {yaml_path} is a directory, not a YAML file")
        if not path.is_file():
            raise ConfigError(f"config: no such file {yaml_path}")
        try:
            layer = OmegaConf.load(path)
        except yaml.YAMLError as exc:
            raise ConfigError(_yaml_error(yaml_path, exc)) from None
        except Exception as exc:  # unreadable, not text, ...
            raise ConfigError(f"config: cannot read {yaml_path}: {str(exc).splitlines()[0]}") from None
        if not isinstance(layer, DictConfig) or not layer:  # it would train the defaults unasked
            raise ConfigError(f"config: {yaml_path} holds no settings (an empty file, or not a mapping)")
        _check_sections(merged, layer, f"in {yaml_path}")
        try:
            merged = OmegaConf.merge(merged, layer)
        except OmegaConfBaseException as exc:
            raise ConfigError(f"{_one_line(exc)} (in {yaml_path})") from None
    try:  # the command line's errors say so
        layer = OmegaConf.from_dotlist(dotlist)
    except Exception as exc:
        raise ConfigError(f"command line: {str(exc).splitlines()[0]}") from None
    _check_sections(merged, layer, "on the command line")
    try:
        merged = OmegaConf.merge(merged, layer)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{_one_line(exc)} (on the command line)") from None
    except Exception as exc:
        raise ConfigError(f"command line: {str(exc).splitlines()[0]}") from None
    check(cfg)
    return cfg


def to_dict(cfg) -> dict:
    """A plain dict of a config dataclass (for logging and W&B)."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


def run_data_defaults(args: list[str]) -> dict | None:
    """{"data": the data section of the run whose checkpoint `ckpt=` names} (None: none
    readable), for commands whose data defaults to what the model was trained on."""
    ckpt = next((a.split("=", 1)[1] for a in args if a.startswith("ckpt=")), None)
    path = Path(ckpt) / "config.yaml" if ckpt else None
    if path is None or not path.is_file():
        return None
    try:
        data = OmegaConf.to_container(OmegaConf.load(path)).get("data")
    except Exception:  # an unreadable config.yaml is reported when the checkpoint is read
        return None
    return {"data": data} if isinstance(data, dict) else None
