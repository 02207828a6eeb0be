"""Evaluation during training (eval.every): its data read and checked at start-up, the steps
it is due at, and one evaluation of the training model, whose row goes to the metrics."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path

import torch

from lingua_mem.config import TrainConfig, parse_tasks, to_dict
from lingua_mem.metrics import read_rows
from lingua_mem.parallel.runtime import agree
from lingua_mem.run_dir import facts_dir


class Evaluator:
    def __init__(self, cfg: TrainConfig, tokenizer, device: torch.device):
        """Reads the evaluation's data on every rank: a bad eval source fails here, at start-up."""
        from lingua_mem.eval.suite import default_sources, prepare

        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        tasks = parse_tasks(cfg.eval.tasks, "eval.tasks", lm_eval=False)
        facts = facts_dir(cfg.dump_dir)  # the loader made it, if the run trains on it
        sources = dict(cfg.eval.sources) or default_sources(to_dict(cfg), facts)
        self.data = prepare(tasks, cfg.eval, sources, tokenizer, cfg.eval.seq_len or cfg.data.seq_len,
                            cfg.model.max_seq_len)

    def due(self, step: int) -> bool:
        """At the same steps whatever the layout or a resume."""
        return step % self.cfg.eval.every == 0 or step == self.cfg.steps

    def missed(self, step: int, is_main: bool) -> bool:
        """A run resumed at `step`, due for evaluation, stopped (preempted) before evaluating it:
        metrics.jsonl has no evaluation row of it (read by rank 0, agreed by all)."""
        if not step or not self.due(step):
            return False
        rows = read_rows(Path(self.cfg.dump_dir) / "metrics.jsonl") if is_main else []
        return bool(agree(not any(r.get("eval") and r["step"] == step for r in rows), is_main))

    def run(self, model, step: int, tokens: int) -> tuple[dict, dict, float]:
        """(the metrics row, samples, seconds) of an evaluation of `model` (every rank calls it;
        the model is back in train mode after)."""
        from lingua_mem.eval.suite import evaluate

        started = time.perf_counter()
        # compiled blocks run eagerly here: other shapes and the generation's inputs would
        # recompile them, and the analytics hooks run in eager code
        stance = torch.compiler.set_stance("force_eager") if self.cfg.distributed.compile else nullcontext()
        try:
            with stance:
                metrics, samples = evaluate(model, self.tokenizer, self.data, self.device)
        finally:
            model.train()
        row = {"step": step, "tokens": tokens, "eval": True, **metrics}
        return row, samples, time.perf_counter() - started
