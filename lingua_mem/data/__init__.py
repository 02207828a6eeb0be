"""Data: tokenizers (tokenizer.py), the synthetic facts corpus (facts.py) and
packed, sharded, resumable batches (loader.py). Import the submodules directly;
this file imports nothing so `python -m lingua_mem.data.facts` stays light."""
