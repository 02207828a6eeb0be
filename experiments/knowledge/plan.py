"""The runs of a preset, in three phases per dense size:

    1. dense       the dense base at every optim.lr of the preset
    2. value_lr    the first memory size at every optim.value_lr, at the dense base's best lr
    3. memory      the other memory sizes, and the ablations of the first, at the best value_lr

Phase 2 needs phase 1's best lr and phase 3 phase 2's best value_lr: "best" is the highest
final recall exact match (facts stored), then the lowest val loss. Every run shares the corpus, steps,
tokens, seed and schedule; a memory run differs from its dense base only in the FFN of the
memory layers (and its value learning rate).
"""

from __future__ import annotations

from dataclasses import dataclass

from experiments.knowledge.presets import Preset, Size

ABLATIONS = {"vanilla": ["memory.swilu=false"], "unshared": ["memory.shared_values=false"],
             "qk_norm": ["memory.qk_norm=true"]}


@dataclass(frozen=True)
class Run:
    name: str
    size: str
    kind: str  # dense | memory
    phase: int
    overrides: tuple[str, ...]
    n_keys: int = 0
    variant: str = "memory+"  # memory+ | vanilla | unshared | qk_norm (memory runs)


def common(p: Preset) -> list[str]:
    """The keys every run of the preset shares."""
    every = max(1, p.steps // p.evals)
    return ["config=configs/debug.yaml", f"steps={p.steps}", "seed=0", f"data.facts.people={p.people}",
            "data.facts.seed=0", f"data.batch_size={p.batch_size}", f"data.seq_len={p.seq_len}",
            f"model.max_seq_len={p.seq_len}", f"optim.warmup={p.warmup}", "optim.scheduler=cosine",
            f"checkpoint.every={p.steps}", "checkpoint.keep_last=1", f"log_every={max(1, p.steps // 40)}",
            f"eval.every={every}", "eval.tasks=val,facts_qa", "eval.max_questions=0",
            "eval.max_tokens=0", "logging.console=true", *p.extra]


def size_keys(s: Size) -> list[str]:
    return [f"model.dim={s.dim}", f"model.n_layers={s.n_layers}", f"model.n_heads={s.n_heads}",
            f"model.n_kv_heads={s.n_heads}"]


def dense_runs(p: Preset, s: Size) -> list[Run]:
    return [Run(f"{s.name}_dense_lr{lr:g}", s.name, "dense", 1,
                (*size_keys(s), "memory.layers=[]", f"optim.lr={lr}")) for lr in p.lrs]


def memory_keys(p: Preset, n_keys: int) -> list[str]:
    layers = ",".join(map(str, p.memory_layers))
    return [f"memory.layers=[{layers}]", f"memory.n_keys={n_keys}", f"memory.heads={p.heads}",
            f"memory.knn={p.knn}", "memory.k_dim=null", "memory.v_dim=null", "memory.shared_values=true",
            "memory.swilu=true", "memory.qk_norm=false"]


def value_lr_runs(p: Preset, s: Size, lr: float) -> list[Run]:
    k = p.n_keys[0]
    return [Run(f"{s.name}_mem{k}_vlr{vlr:g}", s.name, "memory", 2,
                (*size_keys(s), *memory_keys(p, k), f"optim.lr={lr}", f"optim.value_lr={vlr}"), k)
            for vlr in p.value_lrs]


def memory_runs(p: Preset, s: Size, lr: float, vlr: float, ablate: bool) -> list[Run]:
    runs = [Run(f"{s.name}_mem{k}_vlr{vlr:g}", s.name, "memory", 3,
                (*size_keys(s), *memory_keys(p, k), f"optim.lr={lr}", f"optim.value_lr={vlr}"), k)
            for k in p.n_keys[1:]]
    k = p.n_keys[0]
    runs += [Run(f"{s.name}_mem{k}_{a}", s.name, "memory", 3,
                 (*size_keys(s), *memory_keys(p, k), f"optim.lr={lr}", f"optim.value_lr={vlr}",
                  *ABLATIONS[a]), k, a) for a in (p.ablations if ablate else ())]
    return runs


def best(results: list[dict]) -> dict:
    """The run with the highest final recall EM, then the lowest final val loss."""
    return max(results, key=lambda r: (r["recall_em"], -r["val_loss"]))
