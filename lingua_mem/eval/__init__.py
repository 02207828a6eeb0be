"""Evaluation of trained models: validation loss, facts QA, generation, lm-evaluation-harness
and memory analytics (see docs/eval.md). `python eval.py ckpt=...` is the entry point."""
