"""The convention of every command-line entry point: input the program cannot use is
reported as one line on stderr, `error: <what is wrong, naming the key or path>`, and
the exit code 2; nothing is lost (the check comes before the work it would spoil).

    @reports(ConfigError)
    def main(argv: list[str]) -> int: ...
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

BAD_INPUT = 2  # the exit code of an input error
STOPPED = 1  # the exit code of a run that stopped for a reason it names (Stopped)


class Stopped(RuntimeError):
    """A run that cannot go on for a reason it names in one line (a diverged loss, a checkpoint
    that cannot be written); nothing committed before it is lost. Exit code 1."""


def one_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else repr(exc)


def fail(what: BaseException | str, code: int = BAD_INPUT) -> int:
    """Print `error: <what>` (its first line) on stderr; returns the exit code."""
    print(f"error: {one_line(what)}", file=sys.stderr, flush=True)
    return code


def reports(*errors: type[BaseException]) -> Callable:
    """Decorate a `main(...) -> int`: the `errors` it raises become one line and exit 2."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(*args, **kwargs) -> int:
            try:
                return main(*args, **kwargs)
            except errors as exc:
                return fail(exc)
        return wrapped
    return decorate
