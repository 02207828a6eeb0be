"""eval.py's run: load the checkpoint (any layout, 1 or N processes), evaluate the tasks,
write <out>/evals/<step>.json (rank 0) and print a table."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from lingua_mem.config import EvalCommandConfig, parse_tasks
from lingua_mem.data.facts import ensure_facts
from lingua_mem.errors import ConfigError
from lingua_mem.eval.load import CheckpointInfo, inspect_checkpoint, load_model
from lingua_mem.eval.suite import default_sources, evaluate, prepare
from lingua_mem.parallel import distributed_session
from lingua_mem.parallel.runtime import on_rank_0
from lingua_mem.run_dir import check_output, check_writable, dump_dir_of, facts_dir, written_atomically


def run(cfg: EvalCommandConfig) -> dict:
    with distributed_session(cfg.distributed) as (meshes, device):
        return _run(cfg, meshes, device)


def trained_tokens(info: CheckpointInfo) -> int | None:
    """Tokens the weights were trained on: step x tokens per step of the run (None: unknown)."""
    run, step = info.run_config, info.step
    try:
        world = json.loads((info.path / "meta.json").read_text())["world_size"]
        data, optim = run["data"], run["optim"]
        return step * optim["grad_accum"] * data["batch_size"] * data["seq_len"] * world
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _facts_dir(info: CheckpointInfo, dump_dir: Path | None, is_main: bool) -> Path | None:
    """The run's facts corpus (made again from its people and seed if it is not there)."""
    data = info.run_config.get("data") or {}
    if dump_dir is None or data.get("sources"):
        return None
    facts = data.get("facts") or {}
    target = facts_dir(dump_dir)
    on_rank_0(lambda: ensure_facts(target, facts.get("people", 1000), facts.get("seed", 0),
                                   facts.get("style", "mixed"), facts.get("docs_per_person", 3),
                                   facts.get("qa_fraction", 0.0)), is_main)
    return target


def _write_json(path: Path, obj: dict) -> None:
    with written_atomically(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def _run(cfg: EvalCommandConfig, meshes, device) -> dict:
    is_main = meshes.dims.rank == 0
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    tasks = parse_tasks(cfg.tasks, "tasks")
    harness_tasks = [t.removeprefix("lm_eval:") for t in tasks if t.startswith("lm_eval:")]
    if harness_tasks and meshes.dims.world_size > 1:
        raise ConfigError("tasks: lm_eval tasks run on one process (run eval.py without torchrun for them)")
    if harness_tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("tasks: lm_eval tasks need lm-evaluation-harness: pip install -e '.[eval]'")
    started = time.perf_counter()
    # everything that can be wrong with the input is found before the weights are read
    info = inspect_checkpoint(cfg.ckpt, cfg.tokenizer)
    dump_dir = dump_dir_of(info.path) if info.kind == "training" else None
    out = Path(cfg.out) if cfg.out else (dump_dir if dump_dir is not None else info.path)
    target = out / "evals" / f"{info.step if info.step is not None else 'export'}.json"

    def writable():
        try:
            check_output(out, [info.path], key="out", replaces=False)  # not inside checkpoints/
            check_writable(out)
        except ValueError as exc:  # ConfigError included
            raise ConfigError(str(exc).replace("dump_dir", "out", 1)) from None

    on_rank_0(writable, is_main)
    own = [t for t in tasks if not t.startswith("lm_eval:")]
    sources = dict(cfg.eval.sources) or default_sources(info.run_config, _facts_dir(info, dump_dir, is_main))
    seq_len = cfg.eval.seq_len or (info.run_config.get("data") or {}).get("seq_len") \
        or min(info.args.max_seq_len, 2048)
    data = prepare(own, cfg.eval, sources, info.tokenizer, seq_len, info.args.max_seq_len)

    loaded = load_model(info, device, meshes=meshes, distributed=cfg.distributed)
    say(f"loaded {info.path} (step {info.step}) on {device}, {meshes.dims.world_size} process(es), "
        f"memory parallel {meshes.dims.mp}")
    metrics, samples = evaluate(loaded.model, loaded.tokenizer, data, device, say)
    if harness_tasks:
        from lingua_mem.eval.harness import run_lm_eval

        for task in harness_tasks:
            lm = cfg.lm_eval
            metrics.update(run_lm_eval(loaded, task, include_path=lm.include_path, limit=lm.limit,
                                       num_fewshot=lm.num_fewshot, batch_size=cfg.eval.batch_size))
    report = {"step": info.step, "tokens": trained_tokens(info), "ckpt": str(info.path), "tasks": tasks,
              "metrics": metrics, "samples": samples, "seconds": time.perf_counter() - started,
              "world_size": meshes.dims.world_size, "memory_parallel_size": meshes.dims.mp}

    def write():
        try:
            _write_json(target, report)
        except OSError as exc:
            raise ConfigError(f"out: cannot write {target} ({exc.strerror or exc})") from None
        print(format_report(report), flush=True)
        print(f"wrote {target}", flush=True)

    on_rank_0(write, is_main)  # a failure is raised on every rank, none left waiting
    return report


def format_report(report: dict) -> str:
    """The short table eval.py prints."""
    lines = [f"{'metric':<40} {'value':>12}"]
    for name, value in report["metrics"].items():
        lines.append(f"{name:<40} {value:>12.4f}" if isinstance(value, float) else f"{name:<40} {value:>12}")
    for task, rows in report["samples"].items():
        for row in rows:
            if "prediction" in row:
                lines.append(f"{task}: {row['question']!r} -> {row['prediction']!r} "
                             f"(answer {row['answer']!r})")
            else:
                lines.append(f"{task}: {row['prompt']!r} -> {row['completion']!r}")
    return "\n".join(lines)
