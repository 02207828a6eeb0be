"""SLURM launcher: `python -m lingua_mem.launch`, `.sweep`, `.status`; templates in slurm/."""
