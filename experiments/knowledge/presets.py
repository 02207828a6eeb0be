"""The knowledge experiment's presets: the corpus, the dense sizes, the memory sizes and the
learning-rate grids. Every run of a preset trains on the same facts corpus, for the same
steps and tokens, with the same seed and schedule; runs differ only where the plan says.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Size:
    """A dense base: the model section of its runs."""

    name: str
    dim: int
    n_layers: int
    n_heads: int


@dataclass(frozen=True)
class Preset:
    name: str
    people: int  # facts corpus size: 6 facts a person
    steps: int
    batch_size: int
    seq_len: int
    sizes: tuple[Size, ...]
    memory_layers: tuple[int, ...]  # FFN replaced by memory there (shared values unless ablated)
    n_keys: tuple[int, ...]  # memory sizes (n_keys**2 values); the first is the swept and ablated one
    heads: int
    knn: int
    lrs: tuple[float, ...]  # the dense sweep (optim.lr)
    value_lrs: tuple[float, ...]  # the memory sweep (optim.value_lr), at the dense base's best lr
    ablations: tuple[str, ...]  # of the first memory size: vanilla (no swilu), unshared, qk_norm
    ablation_sizes: int  # the first this many dense sizes get the ablations
    evals: int  # evaluations per run (facts QA and val loss), evenly spaced
    warmup: int
    expected_minutes: float  # the whole preset on its machine (docs/science.md)
    machine: str
    extra: tuple[str, ...] = ()  # config keys for every run (e.g. the GPU's compute dtype)


PRESETS = {
    # the test's: two runs of a few steps through the same command
    "tiny": Preset(name="tiny", people=20, steps=4, batch_size=4, seq_len=64,
                   sizes=(Size("d32", 32, 2, 2),), memory_layers=(1,), n_keys=(8,), heads=2, knn=4,
                   lrs=(3e-3,), value_lrs=(1e-2,), ablations=(), ablation_sizes=0, evals=2, warmup=1,
                   expected_minutes=0.5, machine="any CPU"),
    # a 2-core CPU machine in about an hour
    "small": Preset(name="small", people=100, steps=1000, batch_size=16, seq_len=128,
                    sizes=(Size("d64", 64, 4, 4), Size("d96", 96, 4, 4)), memory_layers=(1, 3),
                    n_keys=(32, 64), heads=4, knn=8, lrs=(3e-3, 6e-3, 1.2e-2), value_lrs=(1e-2, 3e-2, 1e-1),
                    ablations=("vanilla", "unshared", "qk_norm"), ablation_sizes=1, evals=4, warmup=50,
                    expected_minutes=41, machine="2-core CPU"),
    # one GPU: a corpus larger than either dense base holds at ~2 bits a parameter (200,000
    # people: 8.3M bits; d128x4 and d256x4 have 1.1M and 3.5M parameters), ~33 exposures a
    # fact; not run here: the time is an estimate (about 1M tokens/s on an H100 at these sizes)
    "gpu": Preset(name="gpu", people=200_000, steps=30_000, batch_size=128, seq_len=512,
                  sizes=(Size("d128", 128, 4, 4), Size("d256", 256, 4, 4)), memory_layers=(1, 3),
                  n_keys=(256, 512), heads=4, knn=32, lrs=(2e-3, 4e-3, 8e-3), value_lrs=(1e-2, 3e-2, 1e-1),
                  ablations=("vanilla", "unshared", "qk_norm"), ablation_sizes=2, evals=6, warmup=1000,
                  expected_minutes=600, machine="1 GPU (H100 class)",
                  extra=("distributed.compute_dtype=bf16",)),
}
