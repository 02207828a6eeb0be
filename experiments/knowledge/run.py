"""Train one run of the plan (train.py in its own process) and read its results back.

    <out>/runs/<name>/          the run's dump dir (metrics.jsonl, checkpoints, train.log)
    <out>/runs/<name>/run.json      the preset, keys and code it trains with (run_record.py):
                                    a folder recorded for anything else is refused, not reused
    <out>/runs/<name>/result.json   written last, atomically: the run is done, not run again

A failed run stops the experiment with one line naming its log; rerunning the same command
continues (train.py resumes a run from its checkpoint, and finished runs are skipped).
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments import run_record
from experiments.knowledge.plan import Run
from experiments.train_process import RunFailed, run_logged
from lingua_mem.config import load_config
from lingua_mem.stats import config_stats

__all__ = ["RunFailed", "read_result", "train_run"]


def train_run(run: Run, base: list[str], out: Path, experiment: str) -> dict:
    """The run's result (reads result.json when it is already done). `experiment`: the preset
    it belongs to; with the keys, part of what a reused folder must have recorded."""
    dump = out / "runs" / run.name
    facts = dump / "data" / "facts"  # where the run writes its corpus (the same one in every run)
    argv = [*base, *run.overrides, f"dump_dir={dump}", f"name={run.name}",
            f"eval.sources.val.path={facts / 'val.jsonl'}",
            f"eval.sources.qa.path={facts / 'qa.jsonl'}", "eval.sources.qa.kind=qa",
            f"eval.sources.recall.path={facts / 'recall.jsonl'}", "eval.sources.recall.kind=qa",
            f"eval.sources.recall_unseen.path={facts / 'recall_unseen.jsonl'}",
            "eval.sources.recall_unseen.kind=qa"]
    cfg = load_config(argv)  # a bad key fails here, before any run starts
    run_record.claim(dump, run_record.identity(experiment, [*base, *run.overrides]))
    if (result := run_record.read_done(dump)) is not None:
        return result
    seconds = run_logged(["train.py", *argv], dump / "train.log", f"run {run.name}")
    result = read_result(run, cfg, dump, seconds)
    run_record.write_done(dump, result)
    return result


def read_result(run: Run, cfg, dump: Path, seconds: float) -> dict:
    """Parameters, FLOPs, the eval curve and the final scores of a finished run. Three question
    sets: recall (a fact in its person's own training words: is it stored?), recall_unseen (in
    a training template not used for the person) and qa (in new words: can the model answer
    it when asked differently?); exact match, F1, bits and bits by the loss of each."""
    rows = [json.loads(line) for line in (dump / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if "facts_qa/recall/exact_match" in r]
    if not evals:
        raise RunFailed(f"run {run.name}: no evaluation row in {dump / 'metrics.jsonl'}")
    stats = config_stats(cfg)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.grad_accum
    curve = [{"step": r["step"], "tokens": r["step"] * tokens_per_step,
              "flops": r["step"] * tokens_per_step * stats["flops_per_token"],
              "recall_em": r["facts_qa/recall/exact_match"], "qa_em": r["facts_qa/qa/exact_match"],
              "recall_unseen_em": r.get("facts_qa/recall_unseen/exact_match", 0.0),
              "val_loss": r["val/loss"], "bits": r.get("facts_qa/recall/bits", 0.0)} for r in evals]
    last = evals[-1]
    memory = {k: v for k, v in last.items() if k.startswith("memory/")}
    tail = [r["loss"] for r in train_rows[-3:]]
    scores = {f"{q}_{k}": last.get(f"facts_qa/{q}/{m}", 0.0) for q in ("recall", "recall_unseen", "qa")
              for k, m in (("em", "exact_match"), ("f1", "f1"), ("bits", "bits"), ("bits_loss", "bits_loss"))}
    return {"name": run.name, "size": run.size, "kind": run.kind, "variant": run.variant,
            "n_keys": run.n_keys, "phase": run.phase, "overrides": list(run.overrides), "lr": cfg.optim.lr,
            "value_lr": cfg.optim.value_lr, "total_params": stats["total_params"],
            "dense_params": stats["dense_params"], "value_params": stats["memory_value_params"],
            "flops_per_token": stats["flops_per_token"], "steps": cfg.steps,
            "tokens": cfg.steps * tokens_per_step, "train_flops": curve[-1]["flops"],
            "train_loss": sum(tail) / len(tail), "val_loss": last["val/loss"], **scores,
            "bits_per_param": scores["recall_bits"] / stats["total_params"],
            "bits_per_dense_param": scores["recall_bits"] / stats["dense_params"],
            "seconds": seconds, "curve": curve, "memory": memory}
