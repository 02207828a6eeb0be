"""The project's error types, below everything else: model/, memory/ and kernels/ raise
them without knowing the config; config/ and the entry points turn them into one line."""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad configuration or input: the message is one line and names the key or path."""
