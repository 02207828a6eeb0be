"""The paper's two claims asked where the facts a model stores, not how fast it learns them,
decide its score: studies on the capacity corpus (data.facts.style=capacity: K whole
biographies a person, one template an attribute, each copy in an order of its own) with a
SentencePiece vocabulary the study trains on each corpus itself.

    curve   claim (a), equal training FLOPs: the dense base and Memory+ over a grid of corpus
            sizes; the base reads each corpus `passes` times, Memory+ spends the base's FLOPs
            (its tokens: those FLOPs over its FLOPs a token). Where the corpus outgrows what the
            base can store, its recall falls: the curve's knee.
    size    claim (b), memory size at a fixed base and fixed TOKENS (the paper's size curve):
            Memory+ at every n_keys of the grid and the dense base, one corpus, each run
            `passes` passes; FLOPs and wall time reported beside recall.
    probe   Memory+'s value_lr x (heads, knn) at one corpus and the base's tokens, so the
            claims do not judge Memory+ at a dense-tuned learning rate.

    <out>/corpus/p<people>/   the corpus (train.jsonl, recall.jsonl, ...), tokenizer.model
                              (trained with one thread: the same vocabulary on every
                              machine) and corpus.json (its tokens a pass)
    <out>/runs/<run>/         each run (run.py: a run already done is read back)
    <out>/report.md, <out>/results.json, <out>/<kind>.png

Seeds change the model's initialisation only: the corpus, its order and the tokenizer are
the same in every seed (the loader reads one source in its file's order).
"""

from __future__ import annotations

import datetime
import json
import platform
import time
from dataclasses import dataclass
from pathlib import Path

from experiments.knowledge.compare import mean_se
from experiments.knowledge.plan import Run, size_keys
from experiments.knowledge.presets import Size
from experiments.knowledge.run import train_run
from experiments.run_record import write_file
from lingua_mem.config import load_config
from lingua_mem.data.facts import ensure_facts
from lingua_mem.stats import config_stats


@dataclass(frozen=True)
class Study:
    name: str
    kind: str  # curve | size | probe
    people: tuple[int, ...]  # corpus sizes: curve's grid; size and probe use the first
    docs_per_person: int  # K biographies a person (exposures of a fact a pass)
    vocab_size: int  # the SentencePiece vocabulary trained on each corpus
    base: Size  # tied embeddings (a small vocabulary's table would dominate otherwise)
    passes: float  # the dense base's passes over its corpus
    batch_size: int
    seq_len: int
    lr: float
    value_lr: float
    seeds: tuple[int, ...]
    memory: tuple[str, ...]  # Memory+'s keys beside n_keys, heads and knn
    heads: int
    knn: int
    n_keys: tuple[int, ...]  # size: the grid (n_keys**2 values each); curve and probe: the first
    evals: int  # evaluations a run, evenly spaced
    warmup: int
    expected_minutes: float
    machine: str
    probe: tuple[tuple[float, int, int], ...] = ()  # probe: (value_lr, heads, knn) a run
    max_questions: int = 300  # a fixed sample of each question set, a run's evaluations
    extra: tuple[str, ...] = ()  # keys for every run (a GPU's compute dtype)


MEMORY = ("memory.layers=[1,3]", "memory.swilu=true", "memory.shared_values=true",
          "optim.value_optimizer=adagrad")

STUDIES = {
    # the test's: a few steps of each kind's runs through the same command
    "curve_tiny": Study(
        name="curve_tiny", kind="curve", people=(10, 20), docs_per_person=2, vocab_size=384,
        base=Size("d16", 16, 2, 2), passes=1, batch_size=4, seq_len=64, lr=3e-3, value_lr=1e-2,
        seeds=(0,), memory=("memory.layers=[1]", "memory.swilu=true"), heads=2, knn=4,
        n_keys=(8,), evals=1, warmup=1, expected_minutes=0.5, machine="any CPU", max_questions=6),
    "size_tiny": Study(
        name="size_tiny", kind="size", people=(10,), docs_per_person=2, vocab_size=384,
        base=Size("d16", 16, 2, 2), passes=1, batch_size=4, seq_len=64, lr=3e-3, value_lr=1e-2,
        seeds=(0,), memory=("memory.layers=[1]", "memory.swilu=true"), heads=2, knn=4,
        n_keys=(4, 8), evals=1, warmup=1, expected_minutes=0.5, machine="any CPU", max_questions=6),
    # 2 CPU cores. The base: d32 x 4, tied embeddings over a 1,024-token vocabulary (86k
    # parameters, ~20k tokens/s); a biography is ~70 tokens, 5 a person (350 tokens a person
    # a pass), 36 bits of facts a person. Memory+: 16k values (n_keys 128) at layers 1 and 3.
    # probe: 250 people read 20 times (100 exposures a fact), 6 runs of 1.75M tokens
    "capacity_probe": Study(
        name="capacity_probe", kind="probe", people=(250,), docs_per_person=5, vocab_size=1024,
        base=Size("d32", 32, 4, 4), passes=20, batch_size=16, seq_len=128, lr=3e-3, value_lr=1e-1,
        seeds=(0,), memory=MEMORY, heads=4, knn=8, n_keys=(128,), evals=4, warmup=50,
        expected_minutes=25, machine="2-core CPU",
        probe=((1e-1, 4, 8), (3e-1, 4, 8), (1.0, 4, 8), (1e-1, 2, 16), (3e-1, 2, 16), (1.0, 2, 16))),
    # claim (b): 250 people (9k bits) read 20 times (1.7M tokens) by every run: the base and
    # Memory+ of 1k, 4k, 16k and 65k values, two seeds
    "capacity_size": Study(
        name="capacity_size", kind="size", people=(250,), docs_per_person=5, vocab_size=1024,
        base=Size("d32", 32, 4, 4), passes=20, batch_size=16, seq_len=128, lr=3e-3, value_lr=3e-1,
        seeds=(0, 1), memory=MEMORY, heads=4, knn=8, n_keys=(32, 64, 128, 256),
        evals=4, warmup=50, expected_minutes=45, machine="2-core CPU"),
    # claim (a): 125, 250 and 500 people (4.5k, 9k and 18k bits), the base reads each 20
    # times (100 exposures a fact); Memory+ 16k spends the base's FLOPs; two seeds
    "capacity_curve": Study(
        name="capacity_curve", kind="curve", people=(125, 250, 500), docs_per_person=5, vocab_size=1024,
        base=Size("d32", 32, 4, 4), passes=20, batch_size=16, seq_len=128, lr=3e-3, value_lr=3e-1,
        seeds=(0, 1), memory=MEMORY, heads=4, knn=8, n_keys=(128,), evals=4, warmup=50,
        expected_minutes=35, machine="2-core CPU"),
    # one GPU (not run here; minutes are estimates at ~1.5M tokens/s for these sizes on an
    # H100, slower for the largest tables). The base: d64 x 4, tied embeddings (279k
    # parameters, ~0.56M bits at 2 bits a parameter); every corpus from 20k people (0.7M bits)
    # up is past it. 20 passes (100 exposures a fact), 64 x 512 tokens a step.
    "capacity_probe_gpu": Study(
        name="capacity_probe_gpu", kind="probe", people=(20_000,), docs_per_person=5, vocab_size=1024,
        base=Size("d64", 64, 4, 4), passes=20, batch_size=64, seq_len=512, lr=2e-3, value_lr=1e-1,
        seeds=(0,), memory=MEMORY, heads=4, knn=32, n_keys=(512,), evals=5, warmup=500,
        expected_minutes=20, machine="1 GPU (H100 class)", max_questions=2000,
        probe=((1e-1, 4, 32), (3e-1, 4, 32), (1.0, 4, 32), (1e-1, 8, 16), (3e-1, 8, 16), (1.0, 8, 16)),
        extra=("distributed.compute_dtype=bf16",)),
    # claim (b): 50k people (1.8M bits), 4k ... 16.8M values, the base's 342M tokens each
    "capacity_size_gpu": Study(
        name="capacity_size_gpu", kind="size", people=(50_000,), docs_per_person=5, vocab_size=1024,
        base=Size("d64", 64, 4, 4), passes=20, batch_size=64, seq_len=512, lr=2e-3, value_lr=3e-1,
        seeds=(0, 1), memory=MEMORY, heads=4, knn=32, n_keys=(64, 128, 256, 512, 1024, 2048, 4096),
        evals=5, warmup=500, expected_minutes=90, machine="1 GPU (H100 class)", max_questions=2000,
        extra=("distributed.compute_dtype=bf16",)),
    # claim (a): 5k ... 80k people (0.18M ... 2.9M bits) around the base's capacity; Memory+
    # of 1M values spends the base's FLOPs
    "capacity_curve_gpu": Study(
        name="capacity_curve_gpu", kind="curve", people=(5_000, 10_000, 20_000, 40_000, 80_000),
        docs_per_person=5, vocab_size=1024, base=Size("d64", 64, 4, 4), passes=20, batch_size=64,
        seq_len=512, lr=2e-3, value_lr=3e-1, seeds=(0, 1), memory=MEMORY, heads=4, knn=32, n_keys=(1024,),
        evals=5, warmup=500, expected_minutes=70, machine="1 GPU (H100 class)", max_questions=2000,
        extra=("distributed.compute_dtype=bf16",)),
}


def _count(corpus: Path) -> int:
    """The corpus's tokens a pass under its tokenizer (BOS and EOS included), as the loader
    packs them."""
    from lingua_mem.data.tokenizer import SentencePieceTokenizer

    tokenizer = SentencePieceTokenizer(str(corpus / "tokenizer.model"))
    with open(corpus / "train.jsonl") as f:
        return sum(len(tokenizer.encode(json.loads(line)["text"])) for line in f)


def prepare_corpus(study: Study, people: int, out: Path) -> dict:
    """<out>/corpus/p<people>: the capacity corpus, its tokenizer (trained once, one thread)
    and corpus.json {people, docs_per_person, vocab_size, tokens_per_pass, bits}."""
    from lingua_mem.data.tokenizer import train_sentencepiece

    corpus = ensure_facts(out / "corpus" / f"p{people}", people, 0, "capacity", study.docs_per_person)
    record = corpus / "corpus.json"
    want = {"people": people, "docs_per_person": study.docs_per_person, "vocab_size": study.vocab_size}
    if record.is_file():
        done = json.loads(record.read_text())
        if {k: done.get(k) for k in want} == want and (corpus / "tokenizer.model").is_file():
            return done
    train_sentencepiece([str(corpus / "train.jsonl")], study.vocab_size, str(corpus / "tokenizer.model"),
                        threads=1)
    meta = json.loads((corpus / "meta.json").read_text())
    done = {**want, "tokens_per_pass": _count(corpus), "bits": meta["bits"]}
    write_file(record, json.dumps(done, indent=2) + "\n")
    return done


def common(study: Study, people: int, corpus: Path) -> list[str]:
    """The keys every run on the corpus of `people` shares (steps and evaluation: per run)."""
    return ["config=configs/debug.yaml", f"data.facts.people={people}", "data.facts.seed=0",
            "data.facts.style=capacity", f"data.facts.docs_per_person={study.docs_per_person}",
            "data.tokenizer.name=sentencepiece", f"data.tokenizer.path={corpus / 'tokenizer.model'}",
            f"model.vocab_size={study.vocab_size}", "model.tie_embeddings=true",
            f"data.batch_size={study.batch_size}", f"data.seq_len={study.seq_len}",
            f"model.max_seq_len={study.seq_len}", f"model.multiple_of={study.base.dim}",
            "memory.k_dim=null", "memory.v_dim=null", f"optim.lr={study.lr}",
            f"optim.value_lr={study.value_lr}", f"optim.warmup={study.warmup}", "optim.scheduler=cosine",
            "checkpoint.keep_last=1", "eval.tasks=val,facts_qa", f"eval.max_questions={study.max_questions}",
            "eval.max_tokens=20000", "logging.console=true", *study.extra]


@dataclass(frozen=True)
class Planned:
    run: Run
    people: int
    base: list[str]  # the corpus's common keys


def _flops(base: list[str], keys: tuple[str, ...]) -> int:
    return config_stats(load_config([*base, *keys]))["flops_per_token"]


def memory_keys(study: Study, n_keys: int, heads: int, knn: int, *more: str) -> tuple[str, ...]:
    return (*size_keys(study.base), *study.memory, f"memory.n_keys={n_keys}", f"memory.heads={heads}",
            f"memory.knn={knn}", *more)


def plan(study: Study, corpora: dict[int, dict], out: Path) -> list[Planned]:
    """Every run, seed-major. A run's group (Run.size) names its corpus and model:
    "p<people> dense", "p<people> mem<values>", "vlr<v> h<heads>k<knn>". `corpora`: the
    study's corpora (prepare_corpus), one a corpus size it trains on."""
    bases = {people: common(study, people, out / "corpus" / f"p{people}") for people in corpora}
    tokens_a_step = study.batch_size * study.seq_len
    dense = (*size_keys(study.base), "memory.layers=[]")
    groups: list[tuple[str, str, int, tuple[str, ...], int, int]] = []  # group, kind, people, keys, steps, k
    for people, base in bases.items():
        steps = max(1, round(study.passes * corpora[people]["tokens_per_pass"] / tokens_a_step))
        groups.append((f"p{people} dense", "dense", people, dense, steps, 0))
        if study.kind == "probe":  # Memory+ at the base's tokens, a group a (value_lr, heads, knn)
            k = study.n_keys[0]
            for vlr, heads, knn in study.probe:
                keys = memory_keys(study, k, heads, knn, f"optim.value_lr={vlr}")
                groups.append((f"vlr{vlr:g} h{heads}k{knn}", "memory", people, keys, steps, k))
            continue
        budget = _flops(base, dense) * steps
        for k in study.n_keys if study.kind == "size" else study.n_keys[:1]:
            keys = memory_keys(study, k, study.heads, study.knn)
            mem_steps = steps if study.kind == "size" else max(1, round(budget / _flops(base, keys)))
            groups.append((f"p{people} mem{k * k}", "memory", people, keys, mem_steps, k))
    planned = []
    for seed in study.seeds:
        for group, kind, people, keys, steps, k in groups:
            every = max(1, steps // study.evals)
            timing = (f"steps={steps}", f"seed={seed}", f"checkpoint.every={steps}", f"eval.every={every}",
                      f"log_every={max(1, steps // 20)}")
            name = group.replace(" ", "_") + f"_seed{seed}"
            run = Run(name, group, kind, 1, (*keys, *timing), k, variant=group)
            planned.append(Planned(run, people, bases[people]))
    return planned


def summarise(study: Study, results: list[dict], corpora: dict[int, dict]) -> list[dict]:
    """One row a group: mean and SE over seeds of recall, bits stored (by exact match and by
    the loss), val loss; what its seeds share (parameters, tokens, FLOPs); mean seconds."""
    rows = []
    for group in dict.fromkeys(r["size"] for r in results):
        rs = [r for r in results if r["size"] == group]
        people = rs[0]["people"]
        row = {"group": group, "kind": rs[0]["kind"], "people": people, "seeds": len(rs),
               "n_keys": rs[0]["n_keys"], "value_params": rs[0]["value_params"],
               "total_params": rs[0]["total_params"],
               "dense_params": rs[0]["dense_params"], "flops_per_token": rs[0]["flops_per_token"],
               "steps": rs[0]["steps"], "tokens": rs[0]["tokens"], "train_flops": rs[0]["train_flops"],
               "corpus_bits": corpora[people]["bits"],
               "exposures": rs[0]["tokens"] / corpora[people]["tokens_per_pass"] * study.docs_per_person,
               "seconds": sum(r["seconds"] for r in rs) / len(rs)}
        for key in ("recall_em", "recall_unseen_em", "recall_bits", "recall_bits_loss", "val_loss"):
            row[key], row[f"{key}_se"] = mean_se([r[key] for r in rs])
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    head = ("| group | seeds | params (total / dense) | tokens | exposures a fact | train FLOPs | "
            "recall EM | bits stored (EM) | bits by loss | corpus bits | recall unseen EM | val loss | "
            "s a run |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pm = {k: f"{r[k]:.3f} ± {r[f'{k}_se']:.3f}" for k in ("recall_em", "recall_unseen_em", "val_loss")}
        bits = {k: f"{r[k]:,.0f} ± {r[f'{k}_se']:,.0f}" for k in ("recall_bits", "recall_bits_loss")}
        lines.append(f"| {r['group']} | {r['seeds']} | {r['total_params']:,} / {r['dense_params']:,} | "
                     f"{r['tokens']:,} | {r['exposures']:.0f} | {r['train_flops']:.3g} | {pm['recall_em']} | "
                     f"{bits['recall_bits']} | {bits['recall_bits_loss']} | {r['corpus_bits']:,.0f} | "
                     f"{pm['recall_unseen_em']} | {pm['val_loss']} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(study: Study, rows: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    seeds = rows[0]["seeds"]
    if study.kind == "curve":
        for i, kind in enumerate(("dense", "memory")):
            rs = [r for r in rows if r["kind"] == kind]
            label = "dense base" if kind == "dense" else f"Memory+ ({rs[0]['n_keys'] ** 2:,} values)"
            axes[0].errorbar([r["people"] for r in rs], [r["recall_em"] for r in rs],
                             yerr=[r["recall_em_se"] for r in rs], marker="o", capsize=4, color=f"C{i}",
                             label=label)
            axes[1].errorbar([r["corpus_bits"] for r in rs], [r["recall_bits"] for r in rs],
                             yerr=[r["recall_bits_se"] for r in rs], marker="o", capsize=4, color=f"C{i}",
                             label=label)
        corpus = sorted({r["corpus_bits"] for r in rows})
        axes[1].plot(corpus, corpus, "k:", label="every fact stored")
        axes[0].set_xlabel("people in the corpus (6 facts each)")
        axes[1].set_xlabel("bits in the corpus")
        for ax in axes:
            ax.set_xscale("log")
        title = f"{study.name}: dense base and Memory+ at equal training FLOPs"
    elif study.kind == "size":
        memory = [r for r in rows if r["kind"] == "memory"]
        dense = next(r for r in rows if r["kind"] == "dense")
        for ax, key in zip(axes, ("recall_em", "recall_bits"), strict=True):
            ax.errorbar([r["n_keys"] ** 2 for r in memory], [r[key] for r in memory],
                        yerr=[r[f"{key}_se"] for r in memory], marker="o", capsize=4, label="Memory+")
            ax.axhline(dense[key], color="C1", linestyle="--", label="dense base")
            low, high = dense[key] - dense[f"{key}_se"], dense[key] + dense[f"{key}_se"]
            ax.axhspan(low, high, color="C1", alpha=0.15)
            ax.set_xscale("log")
            ax.set_xlabel("memory values (n_keys²), the base's tokens")
        axes[1].axhline(dense["corpus_bits"], color="k", linestyle=":", label="bits in the corpus")
        title = f"{study.name}: recall against memory size at fixed base and tokens"
    else:
        names = [r["group"] for r in rows]
        for ax, key in zip(axes, ("recall_em", "recall_bits"), strict=True):
            ax.bar(names, [r[key] for r in rows], yerr=[r[f"{key}_se"] for r in rows], capsize=4)
            ax.tick_params(axis="x", rotation=30)
        title = f"{study.name}: Memory+'s value lr and heads x knn"
    axes[0].set_ylabel(f"recall EM (mean ± SE, {seeds} seeds)")
    axes[1].set_ylabel("facts' bits stored (recall EM)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    path = out / f"{study.kind}.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def run_study(study: Study, out: Path, dry_run: bool = False) -> list[Path]:
    """Prepare the corpora, train every run (progress lines, ETA), write the report."""
    out.mkdir(parents=True, exist_ok=True)
    people = study.people if study.kind == "curve" else study.people[:1]
    corpora = {p: prepare_corpus(study, p, out) for p in people}
    planned = plan(study, corpora, out)
    if dry_run:
        print(f"study {study.name} ({study.kind}): {len(planned)} runs; expected "
              f"{study.expected_minutes:g} min on {study.machine}")
        for p in people:
            c = corpora[p]
            print(f"  corpus p{p}: {c['tokens_per_pass']:,} tokens a pass, {c['bits']:,.0f} bits of facts")
        for pl in planned:
            print(f"  {pl.run.name}: {' '.join(pl.run.overrides)}")
        return []
    results, started = [], time.perf_counter()
    for i, pl in enumerate(planned, 1):
        print(f"[{i}/{len(planned)}] {pl.run.name} ...", flush=True)
        r = {**train_run(pl.run, pl.base, out, study.name), "people": pl.people}
        results.append(r)
        elapsed = time.perf_counter() - started
        print(f"[{i}/{len(planned)}] {pl.run.name}: recall EM {r['recall_em']:.3f}, "
              f"bits {r['recall_bits']:,.0f}, val loss {r['val_loss']:.3f}, {r['seconds']:.0f} s; "
              f"elapsed {elapsed / 60:.1f} min, "
              f"ETA {elapsed / i * (len(planned) - i) / 60:.1f} min", flush=True)
    rows = summarise(study, results, corpora)
    write_file(out / "results.json", json.dumps({"corpora": corpora, "runs": results, "groups": rows},
                                                indent=2) + "\n")
    c = corpora[people[0]]
    a_biography = c["tokens_per_pass"] / c["people"] / study.docs_per_person
    command = f"python -m experiments.knowledge --preset {study.name} --out {out}"
    header = (f"# Knowledge experiment, study {study.name} ({study.kind})\n\n{datetime.date.today()}, "
              f"{platform.node()} ({platform.machine()}), `{command}`, "
              f"{(time.perf_counter() - started) / 60:.1f} min. Capacity corpus, {study.docs_per_person} "
              f"biographies a person, a SentencePiece vocabulary of {study.vocab_size} trained on each "
              f"corpus ({a_biography:.0f} tokens a biography); base {study.base.name} x "
              f"{study.base.n_layers} layers, tied embeddings; {study.batch_size} x {study.seq_len} tokens "
              f"a step; seeds {', '.join(map(str, study.seeds))}.")
    report = out / "report.md"
    write_file(report, f"{header}\n\n{table(rows)}\n")
    picture = plot(study, rows, out)
    print(table(rows))
    return [report, out / "results.json", picture]

