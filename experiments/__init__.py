"""Experiments run with lingua_mem, each one command: `python -m experiments.<name>`."""
