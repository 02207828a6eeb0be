"""Checkpoints: checkpointer.py saves and loads a training run's (DCP, atomic commit,
retention, resume); consolidate.py turns one into model.safetensors + config.json and
loads that back without torch.distributed (it uses checkpointer.py, never the reverse).

    python -m lingua_mem.checkpoint consolidate <checkpoint dir> --out DIR
"""
