"""Finetuning methods applied to a built model (plain PyTorch, before parallelize): LoRA."""
