"""The model: plain PyTorch (llama.py) built from its own arguments (args.py)."""
