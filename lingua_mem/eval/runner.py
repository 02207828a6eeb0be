"""eval.py's run: load the checkpoint (any layout, 1 or N processes), evaluate the tasks,
write <out>/evals/<step>.json (rank 0) and print a table."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import torch.distributed as dist

from lingua_mem.config import ConfigError, EvalCommandConfig, parse_tasks
from lingua_mem.data.facts import ensure_facts
from lingua_mem.eval.load import LoadedModel, checkpoint_kind, load_model
from lingua_mem.eval.suite import check_sources, default_sources, evaluate
from lingua_mem.parallel import init_distributed
from lingua_mem.trainer import on_rank_0, resolve_device


def run(cfg: EvalCommandConfig) -> dict:
    device_type = resolve_device(cfg.distributed.device).type
    meshes = init_distributed(cfg.distributed, device_type)
    try:
        return _run(cfg, meshes, resolve_device(cfg.distributed.device, meshes.dims.local_rank))
    finally:
        meshes.close()


def trained_tokens(loaded: LoadedModel) -> int | None:
    """Tokens the weights were trained on: step x tokens per step of the run (None: unknown)."""
    run, step = loaded.run_config, loaded.step
    try:
        world = json.loads((loaded.path / "meta.json").read_text())["world_size"]
        data, optim = run["data"], run["optim"]
        return step * optim["grad_accum"] * data["batch_size"] * data["seq_len"] * world
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _facts_dir(loaded: LoadedModel, dump_dir: Path | None, is_main: bool) -> Path | None:
    """The run's facts corpus (made again from its people and seed if it is not there)."""
    data = loaded.run_config.get("data") or {}
    if dump_dir is None or data.get("sources"):
        return None
    facts = data.get("facts") or {}
    target = dump_dir / "data" / "facts"
    on_rank_0(lambda: ensure_facts(target, facts.get("people", 1000), facts.get("seed", 0)), is_main)
    return target


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _run(cfg: EvalCommandConfig, meshes, device) -> dict:
    is_main = meshes.dims.rank == 0
    say = (lambda msg: print(msg, flush=True)) if is_main else (lambda msg: None)
    tasks = parse_tasks(cfg.tasks, "tasks")
    harness_tasks = [t.removeprefix("lm_eval:") for t in tasks if t.startswith("lm_eval:")]
    if harness_tasks and meshes.dims.world_size > 1:
        raise ConfigError("tasks: lm_eval tasks run on one process (run eval.py without torchrun for them)")
    started = time.perf_counter()
    path = Path(cfg.ckpt)
    kind = checkpoint_kind(path)
    dump_dir = path.parent.parent if kind == "training" else None
    out = Path(cfg.out) if cfg.out else (dump_dir if dump_dir is not None else path)
    loaded = load_model(path, device, cfg.tokenizer, meshes, cfg.distributed)
    say(f"loaded {path} (step {loaded.step}) on {device}, {meshes.dims.world_size} process(es), "
        f"memory parallel {meshes.dims.mp}")

    own = [t for t in tasks if not t.startswith("lm_eval:")]
    sources = dict(cfg.eval.sources) or default_sources(loaded.run_config,
                                                        _facts_dir(loaded, dump_dir, is_main))
    check_sources(sources, own)
    seq_len = cfg.eval.seq_len or (loaded.run_config.get("data") or {}).get("seq_len") \
        or min(loaded.args.max_seq_len, 2048)
    metrics, samples = evaluate(loaded.model, loaded.tokenizer, own, cfg.eval, sources, seq_len, device, say)
    if harness_tasks:
        from lingua_mem.eval.harness import run_lm_eval

        for task in harness_tasks:
            lm = cfg.lm_eval
            metrics.update(run_lm_eval(loaded, task, include_path=lm.include_path, limit=lm.limit,
                                       num_fewshot=lm.num_fewshot, batch_size=cfg.eval.batch_size))
    report = {"step": loaded.step, "tokens": trained_tokens(loaded), "ckpt": str(path), "tasks": tasks,
              "metrics": metrics, "samples": samples, "seconds": time.perf_counter() - started,
              "world_size": meshes.dims.world_size, "memory_parallel_size": meshes.dims.mp}
    if is_main:
        target = out / "evals" / f"{loaded.step if loaded.step is not None else 'export'}.json"
        try:
            _write_json(target, report)
        except OSError as exc:
            raise ConfigError(f"out: cannot write {target} ({exc.strerror or exc})") from None
        print(format_report(report), flush=True)
        print(f"wrote {target}", flush=True)
    if dist.is_initialized():
        dist.barrier()
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
