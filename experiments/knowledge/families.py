"""The paper's two results in miniature, as presets of the knowledge experiment:

    table1   dense, MoE, PEER, Memory, Memory+ and UltraMem on one dense base at equal
             training FLOPs, `seeds` seeds each: recall and QA exact match, mean and standard
             error ("Memory Layers at Scale", Table 1)
    scaling  Memory+ on the same base at log-spaced memory sizes, `seeds` seeds each, against
             the dense base and dense models of about 2x and 4x its FLOPs per token (the
             paper's memory-size curve, Figure 1)

Equal training FLOPs: every run spends the dense base's budget (its FLOPs per token x its
tokens), so a run whose layer costs less per token trains on more tokens (lingua_mem.stats
counts what a token reads, by family). The reference dense models of scaling train on the
base's tokens, so they spend 2x and 4x its FLOPs. Every run shares the corpus, the batch, the
schedule's shape and the learning rates; seeds change the initialisation and data order.
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.knowledge.plan import Run, size_keys
from experiments.knowledge.presets import Size
from lingua_mem.config import load_config
from lingua_mem.stats import config_stats


@dataclass(frozen=True)
class Family:
    """One column of table1: the keys that turn the dense base into it."""

    name: str
    overrides: tuple[str, ...]
    kind: str = "memory"  # dense | moe | memory (product-key families)


@dataclass(frozen=True)
class Comparison:
    name: str
    kind: str  # table1 | scaling
    people: int
    batch_size: int
    seq_len: int
    base: Size
    multiple_of: int  # the FFN width's rounding (small bases: not Llama's 256)
    dense_steps: int  # the dense base's steps: its FLOPs are every run's budget
    lr: float
    value_lr: float
    seeds: tuple[int, ...]
    evals: int  # evaluations a run, evenly spaced
    warmup: int
    expected_minutes: float
    machine: str
    families: tuple[Family, ...] = ()  # table1
    n_keys: tuple[int, ...] = ()  # scaling: Memory+ of n_keys**2 values each
    memory: tuple[str, ...] = ()  # scaling: the Memory+ keys beside memory.n_keys
    references: tuple[Size, ...] = ()  # scaling: dense models of about 2x and 4x the base's FLOPs
    max_questions: int = 300  # a fixed sample of each question set, a run's evaluations
    extra: tuple[str, ...] = ()  # keys for every run (a GPU's compute dtype)


def families(memory_layers: str, n_keys: int, heads: int, knn: int, peer_keys: int, ultra_keys: int,
             experts: int) -> tuple[Family, ...]:
    """table1's columns at memory (or MoE) `memory_layers` ("1,3"): Memory and Memory+ of
    n_keys**2 values, PEER and UltraMem sized to about Memory+'s parameters, and an MoE of
    `experts` top-1 experts the size of the FFN (about the dense base's FLOPs)."""
    layers = f"[{memory_layers}]"
    pkm = (f"memory.layers={layers}", f"memory.n_keys={n_keys}", f"memory.heads={heads}", f"memory.knn={knn}",
           "memory.shared_values=true")
    return (
        Family("dense", ("memory.layers=[]",), "dense"),
        Family("moe", ("memory.layers=[]", f"moe.layers={layers}", f"moe.experts={experts}", "moe.top_k=1"),
               "moe"),
        # PEER's experts are (u_i, v_i): v a shared table, u one a layer (He 2024: query BatchNorm)
        Family("peer", (f"memory.layers={layers}", "memory.kind=peer", f"memory.n_keys={peer_keys}",
                        f"memory.heads={heads}", f"memory.knn={knn}", "memory.swilu=false",
                        "memory.query_batchnorm=true", "memory.shared_values=true")),
        Family("memory", (*pkm, "memory.swilu=false")),
        Family("memory+", (*pkm, "memory.swilu=true")),
        # 4 virtual values a physical row: n_keys**2 / 4 rows of the table
        Family("ultramem", (f"memory.layers={layers}", "memory.kind=ultramem", f"memory.n_keys={ultra_keys}",
                            f"memory.heads={heads}", f"memory.knn={knn}", "memory.swilu=false",
                            "memory.value_expansion=4", "memory.shared_values=true")),
    )


COMPARISONS = {
    # the test's: two families, one seed, a few steps
    "table1_tiny": Comparison(
        name="table1_tiny", kind="table1", people=20, batch_size=4, seq_len=64, base=Size("d32", 32, 2, 2),
        multiple_of=32, dense_steps=4, lr=3e-3, value_lr=1e-2, seeds=(0,), evals=2, warmup=1,
        expected_minutes=0.5, machine="any CPU", max_questions=0,
        families=tuple(f for f in families("1", n_keys=8, heads=2, knn=4, peer_keys=8, ultra_keys=8,
                                            experts=2) if f.name in ("dense", "memory+"))),
    "scaling_tiny": Comparison(
        name="scaling_tiny", kind="scaling", people=20, batch_size=4, seq_len=64, base=Size("d32", 32, 2, 2),
        multiple_of=32, dense_steps=4, lr=3e-3, value_lr=1e-2, seeds=(0,), evals=2, warmup=1,
        expected_minutes=0.5, machine="any CPU", max_questions=0, n_keys=(4, 8),
        memory=("memory.layers=[1]", "memory.heads=2", "memory.knn=4"), references=(Size("d48", 48, 2, 2),)),
    # 2 CPU cores: 30 people (180 facts, 22k tokens a pass), the dense base 600 steps of
    # 2,048 tokens (about 55 passes: recall mid-range, where families can differ; at 100 people
    # and 17 passes every family recalled 2-5%)
    "table1": Comparison(
        name="table1", kind="table1", people=30, batch_size=16, seq_len=128, base=Size("d64", 64, 4, 4),
        multiple_of=64, dense_steps=600, lr=6e-3, value_lr=1e-1, seeds=(0, 1, 2), evals=3, warmup=50,
        expected_minutes=30, machine="2-core CPU",
        families=families("1,3", n_keys=128, heads=4, knn=8, peer_keys=76, ultra_keys=256, experts=16)),
    "scaling": Comparison(
        name="scaling", kind="scaling", people=30, batch_size=16, seq_len=128, base=Size("d64", 64, 4, 4),
        multiple_of=64, dense_steps=600, lr=6e-3, value_lr=1e-1, seeds=(0, 1, 2), evals=3, warmup=50,
        expected_minutes=35, machine="2-core CPU", n_keys=(64, 128, 256, 512, 1024),  # 4k ... 1M values
        memory=("memory.layers=[1,3]", "memory.heads=4", "memory.knn=8", "memory.swilu=true",
                "memory.shared_values=true", "optim.value_optimizer=adagrad"),
        references=(Size("d96", 96, 4, 4), Size("d128", 128, 5, 4))),  # 1.9x and 4.3x the FLOPs
    # one GPU (not run here; the times are estimates, ~1.5M tokens/s at these sizes on an H100):
    # a corpus at the dense base's capacity (50,000 people: 2.1M bits of facts, 2.3 bits a
    # parameter of the 0.92M-parameter d128 x 4 base), ~40 passes over it (1.5B tokens)
    "table1_gpu": Comparison(
        name="table1_gpu", kind="table1", people=50_000, batch_size=128, seq_len=512,
        base=Size("d128", 128, 4, 4), multiple_of=128, dense_steps=23_000, lr=3e-3, value_lr=3e-2,
        seeds=(0, 1, 2), evals=5, warmup=500, expected_minutes=330, machine="1 GPU (H100 class)",
        max_questions=2000,
        families=families("1,3", n_keys=512, heads=4, knn=32, peer_keys=296, ultra_keys=1024, experts=128),
        extra=("distributed.compute_dtype=bf16",)),
    "scaling_gpu": Comparison(
        name="scaling_gpu", kind="scaling", people=50_000, batch_size=128, seq_len=512,
        base=Size("d128", 128, 4, 4), multiple_of=128, dense_steps=23_000, lr=3e-3, value_lr=3e-2,
        seeds=(0, 1, 2), evals=5, warmup=500, expected_minutes=480, machine="1 GPU (H100 class)",
        max_questions=2000, n_keys=(128, 256, 512, 1024, 2048, 4096),  # 16k ... 16.8M values
        memory=("memory.layers=[1,3]", "memory.heads=4", "memory.knn=32", "memory.swilu=true",
                "memory.shared_values=true", "optim.value_optimizer=adagrad"),
        references=(Size("d192", 192, 4, 4), Size("d256", 256, 5, 4)),  # 1.85x and 4.0x the FLOPs
        extra=("distributed.compute_dtype=bf16",)),
}


def common(c: Comparison) -> list[str]:
    """The keys every run of the comparison shares (steps and evaluation: per run)."""
    return ["config=configs/debug.yaml", f"data.facts.people={c.people}", "data.facts.seed=0",
            f"data.batch_size={c.batch_size}", f"data.seq_len={c.seq_len}", f"model.max_seq_len={c.seq_len}",
            f"model.multiple_of={c.multiple_of}", "memory.k_dim=null", "memory.v_dim=null",
            f"optim.lr={c.lr}", f"optim.value_lr={c.value_lr}",
            f"optim.warmup={c.warmup}", "optim.scheduler=cosine", "checkpoint.keep_last=1",
            "eval.tasks=val,facts_qa", f"eval.max_questions={c.max_questions}", "eval.max_tokens=20000",
            "logging.console=true", *c.extra]


def flops_per_token(c: Comparison, overrides: tuple[str, ...]) -> int:
    return config_stats(load_config([*common(c), *overrides]))["flops_per_token"]


def _run(c: Comparison, name: str, group: str, kind: str, keys: tuple[str, ...], steps: int, seed: int,
         n_keys: int = 0) -> Run:
    every = max(1, steps // c.evals)
    timing = (f"steps={steps}", f"seed={seed}", f"checkpoint.every={steps}", f"eval.every={every}",
              f"log_every={max(1, steps // 20)}")
    return Run(f"{name}_seed{seed}", group, kind, 1, (*keys, *timing), n_keys, variant=group)


def runs(c: Comparison) -> list[Run]:
    """Every run, seed-major (a seed's runs side by side before the next seed's). `size` holds
    the run's group (its family, or its memory size or reference)."""
    base = size_keys(c.base)
    budget = flops_per_token(c, (*base, "memory.layers=[]")) * c.dense_steps  # per token of a step
    groups: list[tuple[str, str, tuple[str, ...], int, int]] = []  # name, kind, keys, steps, n_keys
    if c.kind == "table1":
        for f in c.families:
            keys = (*base, *f.overrides)
            groups.append((f.name, f.kind, keys, round(budget / flops_per_token(c, keys)), 0))
    else:
        groups.append(("dense", "dense", (*base, "memory.layers=[]"), c.dense_steps, 0))
        for k in c.n_keys:
            keys = (*base, *c.memory, f"memory.n_keys={k}")
            groups.append((f"mem{k * k}", "memory", keys, round(budget / flops_per_token(c, keys)), k))
        for ref in c.references:  # the base's tokens: its FLOPs per token times the base's budget
            keys = (*size_keys(ref), "memory.layers=[]")
            groups.append((f"dense_{ref.name}", "dense", keys, c.dense_steps, 0))
    return [_run(c, name, name, kind, keys, steps, seed, k) for seed in c.seeds
            for name, kind, keys, steps, k in groups]
