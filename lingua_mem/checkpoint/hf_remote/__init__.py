"""The transformers classes of an exported memory model (`export-hf`), copied into the export
directory as its remote code: they depend on torch and transformers only, never on lingua_mem."""
