"""The evaluation tasks, run on a model by eval.py and by the trainer (eval.every):

  val        loss, perplexity and bits per byte of each text source (validate.py), with
             the memory layers' read statistics over the same tokens (analytics.py)
  facts_qa   exact match, F1 and bits of knowledge of each question source (facts_qa.py)
  generate   completions of eval.generate.prompts (generate.py)
  lm_eval:T  lm-evaluation-harness task T (harness.py; eval.py on one process only)

Metric names: val/loss (val/<source>/loss with several text sources), facts_qa/...,
memory/layer<i>/..., lm_eval/<task>/<metric>.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lingua_mem.config import EvalConfig, EvalSourceConfig
from lingua_mem.errors import ConfigError
from lingua_mem.eval import facts_qa
from lingua_mem.eval.analytics import MemoryReadStats
from lingua_mem.eval.generate import generate
from lingua_mem.eval.validate import ValText, prepare_text, read_documents, validate
from lingua_mem.model.llama import build_model
from lingua_mem.stats import model_stats

SAMPLES = 5  # facts QA answers kept in the report


def default_sources(run_config: dict, facts_dir: Path | None) -> dict[str, EvalSourceConfig]:
    """A run's held-out data: the facts corpus's val.jsonl, qa.jsonl (facts asked in new
    words: facts_qa/...), recall.jsonl (in words the person's own documents use: is the fact
    stored? facts_qa/recall/...) and recall_unseen.jsonl (in a training template never used
    for the person: facts_qa/recall_unseen/...) when it trains on the corpus (no data.sources); for a source
    at <dir>/train, the <dir>/val beside it."""
    sources = (run_config.get("data") or {}).get("sources") or {}
    if not sources:
        if facts_dir is None:
            return {}
        out = {"facts": EvalSourceConfig(path=str(facts_dir / "val.jsonl")),
               "facts_qa": EvalSourceConfig(path=str(facts_dir / "qa.jsonl"), kind="qa")}
        if (facts_dir / "recall.jsonl").is_file():  # the same facts asked in the training templates' words
            out["recall"] = EvalSourceConfig(path=str(facts_dir / "recall.jsonl"), kind="qa")
        if (facts_dir / "recall_unseen.jsonl").is_file():  # in a template never used for the person
            out["recall_unseen"] = EvalSourceConfig(path=str(facts_dir / "recall_unseen.jsonl"), kind="qa")
        return out
    out = {}
    for name, src in sorted(sources.items()):
        path = Path(src.get("path", ""))
        if path.name == "train" and (path.parent / "val").is_dir():
            out[name] = EvalSourceConfig(path=str(path.parent / "val"),
                                         text_field=src.get("text_field", "text"))
    return out


def check_sources(sources: dict[str, EvalSourceConfig], tasks: list[str]) -> None:
    """ConfigError when a task has no source of its kind."""
    for task, kind in (("val", "text"), ("facts_qa", "qa")):
        if task in tasks and not any(s.kind == kind for s in sources.values()):
            raise ConfigError(f"eval.sources: the {task} task needs a source of kind {kind} "
                              f"(eval.sources.<name>.path=... eval.sources.<name>.kind={kind})")


@dataclass
class EvalData:
    """What the tasks read, read and checked once (at start-up: a bad source fails before
    any work, and each evaluation during training reuses it)."""

    tasks: list[str]
    cfg: EvalConfig
    seq_len: int
    texts: dict[str, ValText] = field(default_factory=dict)
    questions: dict[str, tuple[list[dict], int]] = field(default_factory=dict)  # (sample, file total)


def prepare(tasks: list[str], cfg: EvalConfig, sources: dict[str, EvalSourceConfig], tokenizer,
            seq_len: int, max_seq_len: int) -> EvalData:
    """The tasks' data, tokenized; ConfigError (one line, naming the key) for a source that
    cannot be read or a length the model cannot take."""
    check_sources(sources, tasks)
    if seq_len > max_seq_len:
        raise ConfigError(f"eval.seq_len: {seq_len} exceeds model.max_seq_len={max_seq_len}")
    for task, key, n in (("facts_qa", "eval.max_answer_tokens", cfg.max_answer_tokens),
                         ("generate", "eval.generate.max_new_tokens", cfg.generate.max_new_tokens)):
        if task in tasks and n >= max_seq_len:
            raise ConfigError(f"{key}: {n} must be below model.max_seq_len={max_seq_len}")
    data = EvalData(tasks, cfg, seq_len)
    for name, src in sorted(sources.items()):
        if src.kind == "text" and "val" in tasks:
            data.texts[name] = prepare_text(read_documents(name, src), tokenizer, seq_len, cfg.max_tokens)
            if not data.texts[name].rows:
                raise ConfigError(f"eval.sources.{name}.path: no document to score in {src.path}")
        elif src.kind == "qa" and "facts_qa" in tasks:
            data.questions[name] = facts_qa.load_questions(f"eval.sources.{name}.path", src.path,
                                                           cfg.max_questions)
    return data


def evaluate(model, tokenizer, data: EvalData, device, progress=None) -> tuple[dict[str, float], dict]:
    """(metrics, samples) of data's tasks on `model` (left in eval mode; the caller restores
    its mode). Every rank calls it alike; the metrics are over all ranks' shares."""
    model.eval()
    say = progress or (lambda msg: None)
    cfg, tasks = data.cfg, data.tasks
    metrics: dict[str, float] = {}
    samples: dict = {}
    args = model.args
    if data.texts:
        reads = MemoryReadStats(model) if cfg.analytics and args.memory.layers else None
        rows_per_call = max(1, cfg.batch_tokens // data.seq_len)
        nats = tokens = n_bytes = 0.0
        started = time.perf_counter()
        with reads if reads is not None else contextlib.nullcontext():
            for name, text in data.texts.items():
                r = validate(model, text, rows_per_call, device, reads, tokenizer.bos_id)
                say(f"val {name}: loss {r['loss']:.4f} over {r['tokens']:,} tokens "
                    f"({r['documents']} documents)")
                if len(data.texts) > 1:
                    metrics.update({f"val/{name}/{k}": r[k] for k in ("loss", "ppl", "bits_per_byte")})
                nats += r["loss"] * r["tokens"]
                tokens += r["tokens"]
                n_bytes += r["bytes"]
        seconds = time.perf_counter() - started
        loss = nats / tokens
        metrics.update({"val/loss": loss, "val/ppl": math.exp(min(loss, 700.0)),
                        "val/bits_per_byte": nats / (math.log(2) * n_bytes), "val/tokens": int(tokens),
                        "val/tokens_per_s": tokens / seconds})
        if reads is not None:
            metrics.update(reads.result())
    if data.questions:
        stats = model_stats(build_model(args, "meta"), data.seq_len)
        n_params, n_values = stats["total_params"], stats["memory_value_params"]
        for name, (questions, total) in data.questions.items():
            started = time.perf_counter()
            predictions = facts_qa.answer(model, tokenizer, questions, cfg.batch_size, cfg.max_answer_tokens)
            answer_bits = facts_qa.answer_bits(model, tokenizer, questions, cfg.batch_size)
            scores = facts_qa.score(questions, predictions, total, n_params, n_params - n_values, answer_bits)
            # the default source keeps its plain names (facts_qa/exact_match) beside others
            prefix = "facts_qa" if len(data.questions) == 1 or name == "facts_qa" else f"facts_qa/{name}"
            metrics.update({f"{prefix}/{k}": v for k, v in scores.items()})
            say(f"facts_qa {name}: exact match {scores['exact_match']:.3f} over {len(questions)} questions "
                f"in {time.perf_counter() - started:.1f}s")
            samples[prefix] = [{"question": q["question"], "answer": q["answer"], "prediction": p}
                               for q, p in zip(questions[:SAMPLES], predictions[:SAMPLES], strict=True)]
    if "generate" in tasks:
        generation = cfg.generate
        generator = torch.Generator(device=device).manual_seed(generation.seed)  # its own RNG
        completions = generate(model, tokenizer, list(generation.prompts), generation, generator=generator)
        samples["generate"] = [{"prompt": p, "completion": c}
                               for p, c in zip(generation.prompts, completions, strict=True)]
    return metrics, samples
