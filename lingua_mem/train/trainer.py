"""The training run, the same for one process and many (torchrun, srun), composed of its parts:

config -> process group and meshes -> tokenizer -> data loader -> evaluation data -> lock ->
model (meta -> finetune.convert -> parallelize -> device -> init_weights) -> optimizer ->
resume -> loop: train_step (step.py) -> divergence guard (guard.py) -> step report
(report.py) -> evaluation (evaluator.py) -> checkpoint or preemption.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lingua_mem.checkpoint.checkpointer import Checkpointer
from lingua_mem.config import TrainConfig, model_args, to_dict
from lingua_mem.data.loader import build_loader
from lingua_mem.data.tokenizer import build_tokenizer
from lingua_mem.errors import ConfigError
from lingua_mem.finetune.modes import FullFinetune, build_finetune, build_model_as_trained
from lingua_mem.kernels import resolve_kernel
from lingua_mem.metrics import MetricLogger
from lingua_mem.model.llama import OnHost, resolve_attention
from lingua_mem.optim import build_optimizer, build_scheduler, split_params
from lingua_mem.parallel import Meshes, distributed_session, parallelize
from lingua_mem.parallel.runtime import (
    make_deterministic,
    on_rank_0,
    prepare_cuda,
    resolve_device,
    seed_everything,
)
from lingua_mem.preemption import PreemptionFlag, requeue_slurm_job
from lingua_mem.run_dir import check_writable, take_lock
from lingua_mem.stats import model_stats, table_bytes_per_rank
from lingua_mem.train.evaluator import Evaluator
from lingua_mem.train.guard import DivergenceGuard
from lingua_mem.train.report import StepReport, TrainedCounts
from lingua_mem.train.step import train_step


def memory_kernel(cfg: TrainConfig) -> str:
    """memory.kernel as trained: auto is the torch bag under distributed.deterministic."""
    return "torch" if cfg.distributed.deterministic and cfg.memory.kernel == "auto" else cfg.memory.kernel


def train(cfg: TrainConfig) -> dict:
    """Train for cfg.steps optimizer steps; returns the last logged metrics (rank 0)."""
    # a process group at every world size (one process: world 1, started here); a mesh
    # that does not fit the world fails here, before anything is started
    prepare_cuda(resolve_device(cfg.distributed.device).type, cfg.distributed.tf32)  # before CUDA allocates
    if cfg.distributed.deterministic:
        make_deterministic()
    with distributed_session(cfg.distributed) as (meshes, device):
        resolve_kernel(memory_kernel(cfg), device.type)  # triton where it cannot run: one line, now
        resolve_attention(cfg.model.attention_impl, device.type)  # xformers missing: the same
        return _train(cfg, meshes, device, meshes.dims.rank == 0)


def _train(cfg: TrainConfig, meshes: Meshes, device: torch.device, is_main: bool) -> dict:
    dims = meshes.dims
    on_rank_0(lambda: check_writable(cfg.dump_dir), is_main)  # before any work, creating nothing
    check_tables_fit(cfg, dims.world_size, device)  # before the data is made or the model built
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.n_words > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.n_words} tokens")
    if is_main:  # rank 0 first: it may generate the default corpus
        loader = build_loader(cfg.data, tokenizer, cfg.dump_dir, dims.rank, dims.world_size)
    dist.barrier()
    if not is_main:
        loader = build_loader(cfg.data, tokenizer, cfg.dump_dir, dims.rank, dims.world_size)
    evaluator = Evaluator(cfg, tokenizer, device) if cfg.eval.every else None  # a bad eval source fails here
    # once the data is known to be readable: before the model, the checkpoints and the metrics
    lock = on_rank_0(lambda: take_lock(cfg.dump_dir), is_main)
    try:
        return _train_locked(cfg, meshes, device, is_main, loader, evaluator)
    finally:
        if lock is not None:
            lock.release()


@dataclass
class Run:
    """What the loop works with: the run's parts, built once by _train_locked."""

    cfg: TrainConfig
    dims: object
    device: torch.device
    is_main: bool
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    finetune: FullFinetune
    stats: dict
    loader: object
    params: tuple = ()  # (dense, values): clipped apart
    checkpointer: Checkpointer = None
    report: StepReport = None
    counts: TrainedCounts = None  # tokens and FLOPs trained, checkpointed
    guard: DivergenceGuard = None
    evaluator: Evaluator | None = None
    logger: MetricLogger | None = None


def check_tables_fit(cfg: TrainConfig, world: int, device: torch.device) -> None:
    """The value tables' bytes on each rank (stats.table_bytes_per_rank) against this
    machine's memory (a GPU's; on the CPU the RAM, shared by the node's ranks): one line
    naming the keys, before anything is built."""
    need = table_bytes_per_rank(cfg, world)
    if device.type == "cuda":
        have, where = torch.cuda.mem_get_info(device)[1], f"{device} memory"
    else:
        need *= int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # the node's ranks share its RAM
        have, where = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"
    if need > have:
        mem = model_args(cfg.model, cfg.memory, cfg.moe).memory
        optimizer = cfg.optim.value_optimizer
        raise ConfigError(f"memory.n_keys: the value tables ({mem.n_values:,} values x memory.v_dim "
                          f"{mem.v_dim}, with optim.value_optimizer={optimizer}'s state) take "
                          f"{need / 1e9:,.1f} GB here, more than this machine's {have / 1e9:,.1f} GB "
                          f"of {where}; lower memory.n_keys or memory.v_dim, or spread the tables over "
                          "more ranks")


def _build(cfg: TrainConfig, meshes: Meshes, device: torch.device, is_main: bool, loader) -> Run:
    """The model and its optimizer: built on meta and sharded before any weight exists; each
    rank then materialises and initialises its own shards (to the values of the whole model)."""
    seed_everything(cfg.seed)
    finetune = build_finetune(cfg.finetune)
    args = model_args(cfg.model, cfg.memory, cfg.moe)
    model = build_model_as_trained(args, finetune, kernel=memory_kernel(cfg),
                                   attention_impl=cfg.model.attention_impl)
    stats = model_stats(model, cfg.data.seq_len)
    model = parallelize(model, meshes, cfg.distributed, cfg.memory.value_compute_dtype)
    model.to_empty(device=device)
    model.init_weights(cfg.seed)
    finetune.init(model, cfg.seed)
    model.train()
    optimizer = finetune.build_optimizer(model, cfg.optim) or build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.optim)
    finetune.start(model, optimizer)
    return Run(cfg, meshes.dims, device, is_main, model, optimizer, scheduler, finetune, stats, loader,
               split_params(model))


def _train_locked(cfg: TrainConfig, meshes: Meshes, device: torch.device, is_main: bool, loader,
                  evaluator: Evaluator | None) -> dict:
    run = _build(cfg, meshes, device, is_main, loader)
    # resume from the newest complete checkpoint of this dump_dir, or start from init_from's
    # weights; a checkpoint of another model shape stops here, before anything is written
    global_batch = cfg.optim.grad_accum * cfg.data.batch_size * cfg.data.seq_len * run.dims.world_size
    run.counts = TrainedCounts(global_batch, run.stats["flops_per_token"])
    run.checkpointer = Checkpointer(cfg.checkpoint, cfg.dump_dir, run.model, run.optimizer, run.scheduler,
                                    loader, to_dict(cfg), asdict(run.dims), counts=run.counts)
    start = run.checkpointer.resume()
    if start == 0 and cfg.checkpoint.init_from:
        run.checkpointer.init_from(cfg.checkpoint.init_from)
    run.report = StepReport(cfg, run.dims, device, run.stats, loader, run.counts)
    run.guard = DivergenceGuard(run.checkpointer, cfg.optim.skip_nonfinite, device)
    run.evaluator = evaluator
    if is_main:
        run.logger = _open_metrics(run, start)
    if evaluator is not None and evaluator.missed(start, is_main):
        _evaluate(run, start)  # the run stopped (preempted) at a step due before evaluating it
    preemption = PreemptionFlag(cfg.checkpoint.preempt_signals)
    try:
        last = _loop(run, start, preemption)
        run.checkpointer.close()
        if is_main and cfg.logging.console and last and "preempted_at" not in last:
            print(run.report.summary(last, start), flush=True)
    finally:
        preemption.close()
        loader.close()
        run.finetune.close()
        if run.logger is not None:
            run.logger.close()
    return last


def _loop(run: Run, start: int, preemption: PreemptionFlag) -> dict:
    """Steps start+1 .. cfg.steps; the last logged row (with preempted_at if it stopped early)."""
    cfg, report, guard, checkpointer = run.cfg, run.report, run.guard, run.checkpointer
    batches, last = iter(run.loader), {}
    # xformers' document mask takes the documents' lengths on the host: its doc_ids stay there
    xformers = resolve_attention(cfg.model.attention_impl, run.device.type) == "xformers"
    on_host = ("doc_ids",) if xformers else ()
    report.begin()
    for step in range(start + 1, cfg.steps + 1):
        # inputs, targets, doc_ids (B, T) each
        micro_batches = [to_device(next(batches), run.device, on_host) for _ in range(cfg.optim.grad_accum)]
        lrs = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
        result = _step(run, micro_batches)
        guard.observe(step, result)
        run.scheduler.step()
        run.counts.step()
        report.stepped()

        preempted = preemption.requested(run.dims.distributed, run.device)
        last_step = step == cfg.steps and cfg.checkpoint.every > 0
        saving = preempted or last_step or checkpointer.due(step)
        if report.due(step) or saving:
            guard.check()
        if report.due(step):
            last = _log(run, step, result, lrs)
        # before the checkpoint of the step, so a run resumed from it has the row (a
        # preempted step is evaluated on resume)
        if run.evaluator is not None and not preempted and run.evaluator.due(step):
            _evaluate(run, step)
            if preemption.requested(run.dims.distributed, run.device):  # a signal during the evaluation
                preempted = saving = True
        if saving:
            guard.check_state(run.model, run.optimizer, step)  # never a checkpoint of non-finite state
            checkpointer.save(step, block=preempted or last_step)
        else:
            checkpointer.poll()
        if preempted:
            _say_preempted(run, step, preemption)
            return {**last, "preempted_at": step, "preempted_by": preemption.received}
    return last


def to_device(batch: dict, device: torch.device, on_host: tuple[str, ...] = ()) -> dict:
    """A loader batch on the training device, but for the keys `on_host`, kept on the host as
    model.llama.OnHost (so FSDP2's root pre-forward does not move them either). To a GPU
    through pinned host memory: a copy from pageable memory waits for the GPU's queued work
    first (a host-device sync every step); a pinned copy is queued like any kernel."""
    if device.type != "cuda":
        return {k: OnHost(v) if k in on_host else v.to(device) for k, v in batch.items()}
    return {k: OnHost(v) if k in on_host else v.pin_memory().to(device, non_blocking=True)
            for k, v in batch.items()}


def _step(run: Run, micro_batches: list[dict]):
    dense_params, value_params = run.params
    with run.finetune.counting():  # sparse finetuning counts the step's reads, not an evaluation's
        return train_step(run.model, run.optimizer, micro_batches, run.cfg.optim, dense_params, value_params,
                          after_backward=partial(_after_backward, run))


def _after_backward(run: Run) -> None:
    # an async checkpoint's copy of the weights ran beside this step's forward and backward;
    # it must be taken before the update changes them
    run.checkpointer.staged()
    if run.finetune.after_backward is not None:
        run.finetune.after_backward()


def _log(run: Run, step: int, result, lrs: dict) -> dict:
    row, seconds_per_step = run.report.row(step, result, lrs)
    row.update(run.guard.row())
    row.update(run.finetune.stats)  # the same on every rank
    if run.logger is not None:
        run.logger.log(row, seconds_per_step=seconds_per_step)
    return row


def _evaluate(run: Run, step: int) -> None:
    row, samples, seconds = run.evaluator.run(run.model, step, run.counts.tokens)
    if run.logger is not None:
        run.logger.log_eval(row, seconds, samples.get("generate", []))
    run.report.pause(seconds)  # the evaluation's time is not the steps'


def _open_metrics(run: Run, start: int) -> MetricLogger:
    """Rank 0: the run's config.yaml, its metrics (continued on resume) and the start-up lines."""
    cfg = run.cfg
    dump_dir = Path(cfg.dump_dir)
    dump_dir.mkdir(parents=True, exist_ok=True)
    version_line = _record_config(cfg, dump_dir)
    logger = MetricLogger(cfg.dump_dir, cfg.steps, cfg.logging.wandb, to_dict(cfg), cfg.logging.console,
                          resume_step=start)
    if cfg.logging.console:
        for line in run.report.startup(run.finetune.describe(run.model), start):
            print(line, flush=True)
        if version_line:
            print(version_line, flush=True)
    return logger


def _record_config(cfg: TrainConfig, dump_dir: Path) -> str | None:
    """The run's config as <dump_dir>/config.yaml, written by its first start and never
    rewritten: a rerun whose config differs records it as config.<n>.yaml (n = 2, 3, ...;
    the newest is the one in force) and returns a line naming the keys that changed."""
    now = OmegaConf.to_container(OmegaConf.structured(cfg), resolve=False)
    first = dump_dir / "config.yaml"
    if not first.is_file():
        OmegaConf.save(OmegaConf.create(now), first)
        return None
    numbered = sorted((int(p.name.split(".")[1]), p) for p in dump_dir.glob("config.*.yaml")
                      if p.name.split(".")[1].isdigit())
    n, newest = numbered[-1] if numbered else (1, first)
    changed = _changed_keys(OmegaConf.to_container(OmegaConf.load(newest), resolve=False), now)
    if not changed:
        return None
    path = dump_dir / f"config.{n + 1}.yaml"
    OmegaConf.save(OmegaConf.create(now), path)
    shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
    return f"config: this run changes {shown} from {newest.name}; recorded as {path.name}"


def _changed_keys(old, new, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [k for key in sorted(set(old) | set(new))
                for k in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _say_preempted(run: Run, step: int, preemption: PreemptionFlag) -> None:
    if run.is_main:
        where = " to another rank" if preemption.elsewhere else ""
        if preemption.received == "SIGINT":  # Ctrl-C: the user stops the run; not requeued
            print(f"interrupted (SIGINT{where}): checkpoint of step {step} written; the same command resumes",
                  flush=True)
            return
        signal_name = f"{preemption.received}{where}"
        print(f"preempted ({signal_name}): checkpoint of step {step} written", flush=True)
        if run.cfg.checkpoint.requeue:
            requeue_slurm_job(announce=f"preempted at step {step}")
