"""The training loop, the same for one process and many (torchrun, srun).

config -> process group and meshes -> tokenizer -> data loader -> model (meta ->
parallelize -> device -> init_weights) -> AdamW (dense + value groups) -> resume ->
loop: train_step (micro-batches -> backward -> clip -> step) -> metrics -> checkpoint.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from lingua_mem.checkpoint.checkpointer import Checkpointer
from lingua_mem.checkpoint.records import checkpoint_dir, complete_checkpoints
from lingua_mem.config import TrainConfig, model_args, parse_tasks, to_dict
from lingua_mem.data.loader import build_loader
from lingua_mem.data.tokenizer import build_tokenizer
from lingua_mem.errors import ConfigError
from lingua_mem.kernels import resolve_kernel
from lingua_mem.metrics import MetricLogger, bf16_peak_flops, format_duration, read_rows
from lingua_mem.model.llama import build_model, resolve_attention
from lingua_mem.parallel import Meshes, init_distributed, parallelize
from lingua_mem.parallel.runtime import agree, on_rank_0, resolve_device, seed_everything
from lingua_mem.preemption import PreemptionFlag, requeue_slurm_job
from lingua_mem.run_dir import check_writable, take_lock
from lingua_mem.stats import model_stats
from lingua_mem.train.optim import build_optimizer, build_scheduler, split_params
from lingua_mem.train.step import TrainingDiverged, state_is_finite, train_step


def train(cfg: TrainConfig) -> dict:
    """Train for cfg.steps optimizer steps; returns the last logged metrics (rank 0)."""
    device_type = resolve_device(cfg.distributed.device).type
    # a process group at every world size (one process: world 1, started here); a mesh
    # that does not fit the world fails here, before anything is started
    meshes = init_distributed(cfg.distributed, device_type)
    device = resolve_device(cfg.distributed.device, meshes.dims.local_rank)
    try:
        resolve_kernel(cfg.memory.kernel, device.type)  # triton where it cannot run: one line, now
        resolve_attention(cfg.model.attention_impl, device.type)  # xformers missing: the same
        return _train(cfg, meshes, device, meshes.dims.rank == 0)
    finally:
        meshes.close()






def _train(cfg: TrainConfig, meshes: Meshes, device: torch.device, is_main: bool) -> dict:
    dims = meshes.dims
    on_rank_0(lambda: check_writable(cfg.dump_dir), is_main)  # before any work, creating nothing
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.n_words > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.n_words} tokens")
    if is_main:  # rank 0 first: it may generate the default corpus
        loader = build_loader(cfg.data, tokenizer, cfg.dump_dir, dims.rank, dims.world_size)
    dist.barrier()
    if not is_main:
        loader = build_loader(cfg.data, tokenizer, cfg.dump_dir, dims.rank, dims.world_size)
    eval_data = _eval_data(cfg, tokenizer) if cfg.eval.every else None  # a bad eval source fails here
    # once the data is known to be readable: before the model, the checkpoints and the metrics
    lock = on_rank_0(lambda: take_lock(cfg.dump_dir), is_main)
    try:
        return _train_locked(cfg, meshes, device, is_main, loader, tokenizer, eval_data)
    finally:
        if lock is not None:
            lock.release()


def _train_locked(cfg: TrainConfig, meshes: Meshes, device: torch.device, is_main: bool, loader,
                  tokenizer, eval_data) -> dict:
    dims = meshes.dims
    started = time.perf_counter()
    seed_everything(cfg.seed)

    # built on meta and sharded before any weight exists; each rank then materialises
    # and initialises its own shards (to the values of the whole model, param_init.py)
    model = build_model(model_args(cfg.model, cfg.memory), "meta", kernel=cfg.memory.kernel,
                        attention_impl=cfg.model.attention_impl)
    prepare_finetune(model, cfg.finetune)  # LoRA adapters, frozen parameters: before sharding
    stats = model_stats(model, cfg.data.seq_len)
    model = parallelize(model, meshes, cfg.distributed, cfg.memory.value_compute_dtype)
    model.to_empty(device=device)
    model.init_weights(cfg.seed)
    if cfg.finetune.mode == "lora":
        from lingua_mem.finetune.lora import init_lora

        init_lora(model, cfg.seed)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, cfg.finetune)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.optim)
    dense_params, value_params = split_params(model)
    sparse = _sparse_finetune(cfg, model, optimizer)
    peak = bf16_peak_flops(device) if cfg.distributed.compute_dtype == "bf16" else None

    # resume from the newest complete checkpoint of this dump_dir, or start from init_from's
    # weights; a checkpoint of another model shape stops here, before anything is written
    checkpointer = Checkpointer(cfg.checkpoint, cfg.dump_dir, model, optimizer, scheduler, loader,
                                to_dict(cfg), asdict(dims))
    start = checkpointer.resume()
    if start == 0 and cfg.checkpoint.init_from:
        checkpointer.init_from(cfg.checkpoint.init_from)

    logger = None
    if is_main:
        dump_dir = Path(cfg.dump_dir)
        dump_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.structured(cfg), dump_dir / "config.yaml")
        logger = MetricLogger(cfg.dump_dir, cfg.steps, cfg.logging.wandb, to_dict(cfg), cfg.logging.console,
                              resume_step=start)
        if cfg.logging.console:
            print(f"model: {stats['total_params']:,} params ({stats['memory_value_params']:,} in value "
                  f"tables, memory at layers {stats['memory_layers']}), device {device}, "
                  f"{dims.world_size} process(es) ({dist.get_backend_config()}): dp_replicate "
                  f"{dims.dp_replicate} x dp_shard "
                  f"{dims.dp_shard}, memory parallel {dims.mp}", flush=True)
            if cfg.finetune.mode != "full":
                trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
                what = sparse.describe() if sparse else (
                    f"LoRA rank {cfg.finetune.lora.rank} on {', '.join(cfg.finetune.lora.targets)}")
                print(f"finetune.mode={cfg.finetune.mode}: {what}; {trainable:,} trainable parameters",
                      flush=True)
            if start:
                print(f"resumed from {checkpoint_dir(cfg.dump_dir, start)}", flush=True)
                if start >= cfg.steps:
                    print(f"nothing to train: the run is complete ({cfg.steps} steps); raise `steps` or use "
                          "another dump_dir", flush=True)
            elif cfg.checkpoint.init_from:
                print(f"started from the weights of {cfg.checkpoint.init_from}", flush=True)

    run_eval = _evaluator(cfg, eval_data, model, tokenizer, device) if eval_data is not None else None
    eval_due = lambda step: step % cfg.eval.every == 0 or step == cfg.steps  # noqa: E731
    if run_eval is not None and start and eval_due(start) and _eval_missing(cfg.dump_dir, start, is_main):
        # the run stopped (preempted) at a step due for evaluation before evaluating it
        row, samples, seconds = run_eval(start, start * cfg.optim.grad_accum * cfg.data.batch_size
                                         * cfg.data.seq_len * dims.world_size)
        if logger is not None:
            logger.log_eval(row, seconds, samples.get("generate", []))
    batches = iter(loader)
    preemption = PreemptionFlag(cfg.checkpoint.preempt_signals)
    tokens_per_step = cfg.optim.grad_accum * cfg.data.batch_size * cfg.data.seq_len  # per rank
    window_start, window_steps = time.perf_counter(), 0
    last: dict = {}
    # the first step whose loss or gradient norm was not finite (0: none); kept on the device
    # and read only when logging or checkpointing, so a healthy step never waits for it
    first_nonfinite = torch.zeros((), dtype=torch.int64, device=device)
    skipped_steps = 0
    try:
        for step in range(start + 1, cfg.steps + 1):
            # inputs, targets, doc_ids (B, T) each
            micro_batches = [{k: v.to(device, non_blocking=True) for k, v in batch.items()}
                             for batch in (next(batches) for _ in range(cfg.optim.grad_accum))]
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            with sparse.counting() if sparse else nullcontext():  # the step's reads, not an evaluation's
                result = train_step(model, optimizer, micro_batches, cfg.optim, dense_params, value_params,
                                    after_backward=sparse.after_backward if sparse else None)
            loss, grad_norm, value_grad_norm = result.loss, result.grad_norm, result.value_grad_norm
            skipped_steps += result.skipped
            if not result.skipped:
                first_nonfinite = torch.where((first_nonfinite == 0) & ~result.finite, step, first_nonfinite)
            scheduler.step()
            window_steps += 1

            preempted = preemption.requested(dims.distributed, device)
            last_step = step == cfg.steps and cfg.checkpoint.every > 0
            saving = preempted or last_step or checkpointer.due(step)
            logging = step == 1 or step % cfg.log_every == 0 or step == cfg.steps
            if logging or saving:
                _stop_if_diverged(first_nonfinite, checkpointer)
            if logging:
                tokens_per_s = window_steps * tokens_per_step / (time.perf_counter() - window_start)
                last = _log_metrics(step, loss, grad_norm, value_grad_norm, lrs, loader, dims, device, stats,
                                    peak, tokens_per_s, tokens_per_step)
                if cfg.optim.skip_nonfinite:
                    last["skipped_steps"] = skipped_steps
                if sparse:
                    last.update(sparse.stats)  # the same on every rank
                if logger is not None:
                    logger.log(last, seconds_per_step=(time.perf_counter() - window_start) / window_steps)
                window_start, window_steps = time.perf_counter(), 0

            # at the same steps whatever the layout or a resume; before the checkpoint of the
            # step, so a run resumed from it has the row (a preempted step is evaluated on resume)
            if run_eval is not None and not preempted and eval_due(step):
                row, samples, seconds = run_eval(step, step * tokens_per_step * dims.world_size)
                if logger is not None:
                    logger.log_eval(row, seconds, samples.get("generate", []))
                window_start += seconds  # the evaluation's time is not the steps'
                if preemption.requested(dims.distributed, device):  # a signal during the evaluation
                    preempted = saving = True

            if saving:
                if not state_is_finite(model, optimizer):  # never a checkpoint of non-finite state
                    raise TrainingDiverged(f"training diverged: non-finite weights or optimizer state after "
                                           f"step {step}; {_newest_checkpoint(checkpointer)}")
                checkpointer.save(step, block=preempted or last_step)
            else:
                checkpointer.poll()
            if preempted:
                if is_main:
                    signal_name = preemption.received or "a signal to another rank"
                    print(f"preempted ({signal_name}): checkpoint of step {step} written", flush=True)
                    if cfg.checkpoint.requeue and requeue_slurm_job():
                        print("SLURM job requeued", flush=True)
                last = {**last, "preempted_at": step}
                break
        checkpointer.wait()
        if is_main and cfg.logging.console and last and "preempted_at" not in last:
            print(_summary(cfg, last, start, time.perf_counter() - started), flush=True)
    finally:
        preemption.close()
        loader.close()
        if sparse:
            sparse.close()
        if logger is not None:
            logger.close()
    return last


def prepare_finetune(model, cfg) -> None:
    """What finetune.mode trains, set on the built (meta) model: LoRA adapters (the rest
    frozen), or the value tables alone (sparse_memory); full trains everything."""
    if cfg.mode == "lora":
        from lingua_mem.finetune.lora import apply_lora

        apply_lora(model, cfg.lora)
    elif cfg.mode == "sparse_memory":
        from lingua_mem.finetune.sparse_memory import freeze_all_but_values

        freeze_all_but_values(model)


def _sparse_finetune(cfg: TrainConfig, model, optimizer):
    """The per-step row selection of finetune.mode=sparse_memory (None for the other modes);
    the background counts are read and checked against the model's tables here."""
    if cfg.finetune.mode != "sparse_memory":
        return None
    from lingua_mem.finetune.sparse_memory import SparseMemoryFinetune
    from lingua_mem.memory.usage import load_usage

    n_values = {key: table.weight.shape[0] for key, table in model.values.items()}
    return SparseMemoryFinetune(model, cfg.finetune, load_usage(cfg.finetune.background, n_values), optimizer)


def _eval_data(cfg: TrainConfig, tokenizer):
    """The evaluation's data (eval.every), read and checked at start-up on every rank."""
    from lingua_mem.eval.suite import default_sources, prepare

    tasks = parse_tasks(cfg.eval.tasks, "eval.tasks", lm_eval=False)
    facts = Path(cfg.dump_dir) / "data" / "facts"  # the loader made it, if the run trains on it
    sources = dict(cfg.eval.sources) or default_sources(to_dict(cfg), facts)
    return prepare(tasks, cfg.eval, sources, tokenizer, cfg.eval.seq_len or cfg.data.seq_len,
                   cfg.model.max_seq_len)


def _eval_missing(dump_dir: str, step: int, is_main: bool) -> bool:
    """No evaluation row of `step` in metrics.jsonl (read by rank 0, agreed by all)."""
    rows = read_rows(Path(dump_dir) / "metrics.jsonl") if is_main else []
    return bool(agree(not any(r.get("eval") and r["step"] == step for r in rows), is_main))


def _evaluator(cfg: TrainConfig, data, model, tokenizer, device):
    """eval(step, tokens) -> (the metrics row, samples, seconds) of an evaluation of `model`
    on `data` (every rank calls it; the model is back in train mode after)."""
    from lingua_mem.eval.suite import evaluate

    def run(step: int, tokens: int) -> tuple[dict, dict, float]:
        started = time.perf_counter()
        # compiled blocks run eagerly here: other shapes and the generation's inputs would
        # recompile them, and the analytics hooks run in eager code
        stance = torch.compiler.set_stance("force_eager") if cfg.distributed.compile else nullcontext()
        try:
            with stance:
                metrics, samples = evaluate(model, tokenizer, data, device)
        finally:
            model.train()
        row = {"step": step, "tokens": tokens, "eval": True, **metrics}
        return row, samples, time.perf_counter() - started

    return run


def _summary(cfg: TrainConfig, last: dict, start: int, seconds: float) -> str:
    """The closing line: what was trained, how long it took, where its outputs are."""
    done = complete_checkpoints(cfg.dump_dir)
    saved = f"checkpoint {done[-1]}" if done else "no checkpoint (checkpoint.every=0)"
    resumed = f" (resumed at step {start})" if start else ""
    metrics = Path(cfg.dump_dir) / "metrics.jsonl"
    return (f"done: {last['step'] - start} steps{resumed} in {format_duration(seconds)}, final loss "
            f"{last['loss']:.4f}, {last['tokens']:,} tokens; {saved}; metrics {metrics}")


def _newest_checkpoint(checkpointer: Checkpointer) -> str:
    checkpointer.wait()  # an async save of finite weights still counts
    done = complete_checkpoints(checkpointer.dump_dir)
    kept = f"the newest checkpoint, {done[-1]}, is from before it" if done else "no checkpoint was written"
    return (f"{kept}; lower optim.lr, or set optim.skip_nonfinite=true to skip such steps")


def _stop_if_diverged(first_nonfinite: torch.Tensor, checkpointer: Checkpointer) -> None:
    """TrainingDiverged naming the first step (over all ranks) whose loss or gradient norm
    was not finite, if any: one host sync, made only when logging or checkpointing."""
    never = torch.iinfo(torch.int64).max
    first = torch.where(first_nonfinite == 0, never, first_nonfinite)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    if first.item() != never:
        raise TrainingDiverged(f"training diverged: non-finite loss or gradient norm at step {first.item()}; "
                               f"{_newest_checkpoint(checkpointer)}")


def _log_metrics(step, loss, grad_norm, value_grad_norm, lrs, loader, dims, device, stats, peak,
                 tokens_per_s, tokens_per_step) -> dict:
    """The logged row: losses and bad-line counts reduced over ranks, speed per rank and in all."""
    skipped = loader.skipped  # bad lines, per source
    # the mean loss and the totals (skipped, truncated) over all ranks, reduced on the device
    counts = torch.cat([loss.detach().double().view(1),
                        torch.tensor([*skipped.values(), loader.truncated], dtype=torch.float64,
                                     device=device)])
    dist.all_reduce(counts)
    counts = counts.tolist()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    row = {
        "step": step,
        "loss": counts[0] / dims.world_size,
        "lr": lrs.get("dense", 0.0),  # none: sparse memory finetuning trains the values only
        "value_lr": lrs.get("values", 0.0),
        "grad_norm": grad_norm.item(),
        "value_grad_norm": value_grad_norm.item(),
        "tokens": step * tokens_per_step * dims.world_size,
        "tokens_per_s": tokens_per_s * dims.world_size,
        "tokens_per_s_per_rank": tokens_per_s,
        "flops_per_token": stats["flops_per_token"],
    }
    if peak is not None:
        row["mfu"] = stats["flops_per_token"] * tokens_per_s / peak
    if device.type == "cuda":
        row["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    for name, count in zip(skipped, counts[1:-1], strict=True):
        row[f"data/skipped/{name}"] = int(count)
    row["data/truncated"] = int(counts[-1])
    return row
