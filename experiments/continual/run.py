"""The stages of the continual-learning experiment, each a command of the project in its own
process, each done once (its output is read back when the command is run again):

    <out>/runs/pretrain/           train.py on A (the generated facts corpus, seed 0, in its
                                   data/facts); its last checkpoint is every finetuning's start
    <out>/data/B                   the new facts corpus (seed 1); <out>/data/a_recall.jsonl and
                                   b_recall.jsonl: both recall question sets, minus any person whose
                                   name both corpora hold
    <out>/usage.safetensors        python -m lingua_mem.eval.usage on A's training data
    <out>/runs/pretrain/evals/     eval.py of the pretrained model: the finetunings' step 0
    <out>/runs/<method>_lr<x>/     train.py on B from the pretrained weights (result.json last)

Each train.py run's folder records the preset, keys and code it trains with (run.json,
run_record.py): a folder recorded for anything else is refused, not reused.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments import run_record
from experiments.continual.presets import FULL_VALUE_LR_RATIO, Method, Preset
from experiments.train_process import RunFailed, run_logged
from lingua_mem.config import load_config
from lingua_mem.data.facts import ensure_facts

BASE = ["config=configs/debug.yaml", "log_every=25"]
SOURCES = ("heldout", "a_recall", "b_recall")


def _people(path: Path) -> set[str]:
    return {json.loads(line)["person"] for line in path.read_text().splitlines() if line.strip()}


def pretrain_keys(p: Preset) -> list[str]:
    """The pretraining's keys, but for its paths (those follow from --out)."""
    return [*BASE, *p.model, *p.pretrain, "name=pretrain", f"steps={p.pretrain_steps}",
            f"data.facts.people={p.people_a}", "data.facts.seed=0",
            f"checkpoint.every={p.pretrain_steps}", "checkpoint.keep_last=1",
            # A's learning curve (evaluating does not change the training)
            f"eval.every={max(1, p.pretrain_steps // 4)}", "eval.tasks=val,facts_qa",
            "eval.sources.recall.kind=qa", f"eval.max_questions={p.max_questions}"]


def claim_pretrain(p: Preset, out: Path) -> None:
    """The pretraining's folder is this preset's (before A's corpus is written into it)."""
    run_record.claim(out / "runs" / "pretrain", run_record.identity(f"continual:{p.name}", pretrain_keys(p)))


def corpora(p: Preset, out: Path) -> dict[str, Path]:
    """A and B, and their recall questions without the people both corpora name (a name in
    both would be taught two sets of facts: neither question would measure what it means to)."""
    claim_pretrain(p, out)
    a = ensure_facts(out / "runs" / "pretrain" / "data" / "facts", p.people_a, 0)  # where train.py reads it
    b = ensure_facts(out / "data" / "B", p.people_b, 1)
    shared = _people(a / "recall.jsonl") & _people(b / "recall.jsonl")
    files = {"A": a, "B": b, "heldout": a / "val.jsonl", "shared_people": len(shared)}
    for name, corpus in (("a_recall", a), ("b_recall", b)):
        target = out / "data" / f"{name}.jsonl"
        if not target.is_file():
            lines = [line for line in (corpus / "recall.jsonl").read_text().splitlines()
                     if line.strip() and json.loads(line)["person"] not in shared]
            run_record.write_file(target, "\n".join(lines) + "\n")
        files[name] = target
    return files


def eval_keys(p: Preset, files: dict) -> list[str]:
    """The three measures of every evaluation: held-out A text (loss), A recall, B recall."""
    return [f"eval.sources.heldout.path={files['heldout']}",
            f"eval.sources.a_recall.path={files['a_recall']}", "eval.sources.a_recall.kind=qa",
            f"eval.sources.b_recall.path={files['b_recall']}", "eval.sources.b_recall.kind=qa",
            f"eval.max_questions={p.max_questions}", "eval.max_tokens=16384", "eval.analytics=false"]


def pretrain(p: Preset, out: Path, files: dict) -> Path:
    """The pretrained model's checkpoint (trained on A unless it is there)."""
    dump = out / "runs" / "pretrain"
    ckpt = dump / "checkpoints" / f"{p.pretrain_steps:010d}"
    facts = files["A"]
    argv = [*pretrain_keys(p), f"dump_dir={dump}", f"eval.sources.val.path={facts / 'val.jsonl'}",
            f"eval.sources.recall.path={facts / 'recall.jsonl'}"]
    load_config(argv)  # a bad key fails here, before the run starts
    claim_pretrain(p, out)
    if not (ckpt / "manifest.json").is_file():
        run_logged(["train.py", *argv], dump / "train.log", "pretraining")
    return ckpt


def background(p: Preset, out: Path, ckpt: Path) -> Path:
    """The pretrained model's value-row usage over A's training data (its own data section)."""
    target = out / "usage.safetensors"
    if not target.is_file():
        run_logged(["-m", "lingua_mem.eval.usage", f"ckpt={ckpt}", f"out={target}",
                    f"batches={p.usage_batches}", *p.usage], out / "usage.log", "background usage")
    return target


def start_point(p: Preset, out: Path, ckpt: Path, files: dict) -> dict:
    """The three measures of the pretrained model (every finetuning's step 0)."""
    target = out / "runs" / "pretrain" / "evals" / f"{p.pretrain_steps}.json"
    if not target.is_file():
        run_logged(["eval.py", f"ckpt={ckpt}", "tasks=val,facts_qa", *eval_keys(p, files)],
                   out / "runs" / "pretrain" / "eval.log", "evaluating the pretrained model")
    return point(0, json.loads(target.read_text())["metrics"])


def point(step: int, m: dict) -> dict:
    return {"step": step, "b_recall": m["facts_qa/b_recall/exact_match"],
            "a_recall": m["facts_qa/a_recall/exact_match"], "b_f1": m["facts_qa/b_recall/f1"],
            "a_f1": m["facts_qa/a_recall/f1"], "heldout_loss": m["val/loss"]}


def run_name(method: Method, lr: float) -> str:
    return f"{method.name}_lr{lr:g}"


def finetune(p: Preset, out: Path, method: Method, lr: float, ckpt: Path, usage: Path, files: dict,
             start: dict) -> dict:
    """One finetuning of the pretrained model on B; its evaluation curve from step 0."""
    name = run_name(method, lr)
    dump = out / "runs" / name
    rates = [f"{method.lr_key}={lr:g}"]
    if method.mode == "full":  # the value tables train too, at pretraining's ratio of rates
        rates.append(f"optim.value_lr={lr * FULL_VALUE_LR_RATIO:g}")
    if method.mode == "sparse_memory":
        rates.append(f"finetune.background={usage}")
    keys = [*BASE, *p.model, f"name={name}", f"steps={p.finetune_steps}", f"finetune.mode={method.mode}",
            *method.overrides, *rates, "optim.warmup=0", "optim.scheduler=constant",
            f"eval.every={max(1, p.finetune_steps // p.evals)}", "eval.tasks=val,facts_qa"]
    argv = [*keys, f"dump_dir={dump}", f"checkpoint.init_from={ckpt}",
            f"data.sources.b.path={files['B'] / 'train.jsonl'}", *eval_keys(p, files)]
    cfg = load_config(argv)  # a bad key fails here, before the run starts
    run_record.claim(dump, run_record.identity(f"continual:{p.name}", keys))
    if (done := run_record.read_done(dump)) is not None:
        return done
    if (dump / "metrics.jsonl").exists():  # an interrupted run (no checkpoints): again from its start
        (dump / "metrics.jsonl").unlink()
    seconds = run_logged(["train.py", *argv], dump / "train.log", f"run {name}")
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    curve = [start] + [point(r["step"], r) for r in rows if r.get("eval")]
    if len(curve) < 2:
        raise RunFailed(f"run {name}: no evaluation in {dump / 'metrics.jsonl'}")
    trainable = [r for r in rows if "loss" in r]
    result = {"name": name, "method": method.name, "mode": method.mode, "lr_key": method.lr_key, "lr": lr,
              "overrides": list(method.overrides), "steps": cfg.steps,
              "tokens": cfg.steps * cfg.data.batch_size * cfg.data.seq_len, "seconds": seconds,
              "train_loss": trainable[-1]["loss"], "curve": curve,
              "rows_updated": trainable[-1].get("finetune/rows_updated")}
    run_record.write_done(dump, result)
    return result
