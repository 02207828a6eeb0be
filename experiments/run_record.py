"""Which run a run folder of an experiment holds, and whether it may be reused.

    <dump>/run.json     written before the run's first process starts: the experiment (preset),
                        the command's keys (overrides, seed, steps ...; not the folder's own
                        paths) and the code version
    <dump>/result.json  written last, atomically: the run is done

A folder is reused (its result read back, or its train.py resumed) only when its run.json
says the same experiment, keys and code: a `table1` run never reads back `table1_tiny`'s
result of the same name, and a run is never continued by other code. Anything else is
refused in one line naming the folder and the first differences; nothing is removed.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

from lingua_mem.config import ConfigError
from lingua_mem.run_dir import written_atomically

ROOT = Path(__file__).resolve().parents[1]
# what decides a run's numbers: a change here (committed or not) is other code
CODE_PATHS = ("lingua_mem", "experiments", "train.py", "eval.py", "configs", "pyproject.toml")


class RunMismatch(ConfigError):
    """A run folder that holds another run than the one asked for."""


@functools.cache
def code_version() -> str:
    """The commit of the checkout, with a digest of its uncommitted changes to CODE_PATHS
    ("<sha>+<digest>"); the package's version where there is no git checkout."""
    def git(*args: str) -> bytes:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, check=True, timeout=60).stdout

    try:
        head = git("rev-parse", "HEAD").decode().strip()
        diff = git("diff", "HEAD", "--", *CODE_PATHS)
    except (OSError, subprocess.SubprocessError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return f"lingua_mem {version('lingua_mem')}"
        except PackageNotFoundError:
            return "unknown"
    return f"{head}+{hashlib.sha256(diff).hexdigest()[:12]}" if diff else head


def identity(experiment: str, keys: list[str]) -> dict:
    """What makes a run this run: the experiment, its keys in order, the code."""
    return {"experiment": experiment, "keys": list(keys), "code": code_version()}


def _differences(recorded: dict, wanted: dict, limit: int = 3) -> str:
    """The first `limit` things that differ: experiment, code, then keys (as key=value)."""
    diffs = [f"{what} {recorded.get(what)!r} there, {wanted[what]!r} here" for what in ("experiment", "code")
             if recorded.get(what) != wanted[what]]
    there = dict(k.split("=", 1) if "=" in k else (k, "") for k in recorded.get("keys", []))
    here = dict(k.split("=", 1) if "=" in k else (k, "") for k in wanted["keys"])
    diffs += [f"{k}={there.get(k, '(unset)')} there, {here.get(k, '(unset)')} here"
              for k in dict.fromkeys([*there, *here]) if there.get(k) != here.get(k)]
    if not diffs:  # the same settings in another order
        return "its keys in another order"
    more = f" (and {len(diffs) - limit} more)" if len(diffs) > limit else ""
    return "; ".join(diffs[:limit]) + more


def claim(dump: Path, wanted: dict) -> None:
    """Make `dump` this run's folder: record `wanted` in a new folder, accept a folder that
    recorded the same, refuse (RunMismatch) one that holds anything else."""
    record = dump / "run.json"
    advice = "give the experiment another --out, or remove that folder to train this run again"
    if record.is_file():
        try:
            recorded = json.loads(record.read_text())
        except (ValueError, UnicodeDecodeError) as exc:
            raise RunMismatch(f"{record} is not a run record ({exc}); {advice}") from None
        if recorded != wanted:
            raise RunMismatch(f"{dump} holds another run ({_differences(recorded, wanted)}); {advice}")
        return
    if dump.is_dir() and any(dump.iterdir()):
        raise RunMismatch(f"{dump} holds a run with no record of what it trained (no run.json: "
                          f"an older version's, or not an experiment's); {advice}")
    write_file(record, json.dumps(wanted, indent=2) + "\n")


def read_done(dump: Path) -> dict | None:
    """The finished run's result, or None if it is not finished. A result.json that is not
    JSON (a crash while an older version wrote it) counts as not finished, said in one line:
    the run's process is started again, finds its training complete, and the result is read
    again from its files."""
    done = dump / "result.json"
    if not done.is_file():
        return None
    try:
        return json.loads(done.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        print(f"warning: {done} is not a whole result ({exc}); reading the run again", flush=True)
        return None


def write_done(dump: Path, result: dict) -> None:
    write_file(dump / "result.json", json.dumps(result, indent=2) + "\n")


def write_file(path: Path, text: str) -> None:
    """`path` holds `text` whole, or what it held before (never half of it)."""
    with written_atomically(path) as tmp:
        tmp.write_text(text)
