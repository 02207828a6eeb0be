"""Checkpoints: checkpointer.py saves and loads a training run's (DCP, atomic commit,
retention, resume); consolidate.py and hf_export.py stream one into sharded safetensors
(lingua_mem's layout, or a directory transformers loads); hf_import.py starts a run from a
transformers Llama or an export. Export and import use checkpointer.py, never the reverse.

    python -m lingua_mem.checkpoint consolidate <checkpoint dir> --out DIR
    python -m lingua_mem.checkpoint export-hf <checkpoint dir> --out DIR
"""
