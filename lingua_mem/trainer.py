"""The training loop (one process: CPU or one GPU).

config -> tokenizer -> data loader -> model (meta -> device -> init_weights)
-> AdamW (dense + value groups) -> loop: micro-batches -> backward -> clip
(dense and values apart, once per optimizer step) -> step -> metrics.
"""

from __future__ import annotations

import contextlib
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from lingua_mem.config import ConfigError, TrainConfig, to_dict
from lingua_mem.data.loader import build_loader
from lingua_mem.data.tokenizer import build_tokenizer
from lingua_mem.metrics import MetricLogger, bf16_peak_flops
from lingua_mem.model import build_model
from lingua_mem.optim import build_optimizer, build_scheduler, clip_grads, split_params
from lingua_mem.stats import model_stats


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("distributed.device: cuda requested but no GPU is available")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, compute_dtype: str):
    if compute_dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # logits (B, T, V), targets (B, T) -> mean loss over tokens, in fp32
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())


def train(cfg: TrainConfig) -> dict:
    """Train for cfg.steps optimizer steps; returns the last logged metrics."""
    device = resolve_device(cfg.distributed.device)
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    if tokenizer.n_words > cfg.model.vocab_size:
        raise ConfigError(f"model.vocab_size: {cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {tokenizer.n_words} tokens")
    loader = build_loader(cfg.data, tokenizer, cfg.dump_dir)  # bad source paths fail here
    batches = iter(loader)
    dump_dir = Path(cfg.dump_dir)
    dump_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.structured(cfg), dump_dir / "config.yaml")
    seed_everything(cfg.seed)

    model = build_model(cfg.model, cfg.memory, device)
    model.train()
    stats = model_stats(model, cfg.data.seq_len)
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.steps, cfg.optim)
    dense_params, value_params = split_params(model)
    peak = bf16_peak_flops(device) if cfg.distributed.compute_dtype == "bf16" else None
    logger = MetricLogger(cfg.dump_dir, cfg.steps, cfg.logging.wandb, to_dict(cfg), cfg.logging.console)
    if cfg.logging.console:
        print(f"model: {stats['total_params']:,} params ({stats['memory_value_params']:,} in value "
              f"tables, memory at layers {stats['memory_layers']}), device {device}", flush=True)

    tokens_per_step = cfg.optim.grad_accum * cfg.data.batch_size * cfg.data.seq_len
    window_start, window_steps = time.perf_counter(), 0
    last: dict = {}
    try:
        for step in range(1, cfg.steps + 1):
            loss_sum = torch.zeros((), device=device)
            for _ in range(cfg.optim.grad_accum):
                batch = next(batches)
                inputs = batch["inputs"].to(device, non_blocking=True)
                targets = batch["targets"].to(device, non_blocking=True)
                with autocast(device, cfg.distributed.compute_dtype):
                    logits = model(inputs)
                loss = cross_entropy(logits, targets)
                (loss / cfg.optim.grad_accum).backward()
                loss_sum += loss.detach()
            grad_norm = clip_grads(dense_params, cfg.optim.clip)
            value_grad_norm = clip_grads(value_params, cfg.optim.value_clip)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            window_steps += 1

            if step == 1 or step % cfg.log_every == 0 or step == cfg.steps:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                elapsed = time.perf_counter() - window_start
                tokens_per_s = window_steps * tokens_per_step / elapsed
                last = {
                    "step": step,
                    "loss": loss_sum.item() / cfg.optim.grad_accum,
                    "lr": lrs["dense"],
                    "value_lr": lrs.get("values", 0.0),
                    "grad_norm": grad_norm.item(),
                    "value_grad_norm": value_grad_norm.item(),
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": tokens_per_s,
                    "flops_per_token": stats["flops_per_token"],
                }
                if peak is not None:
                    last["mfu"] = stats["flops_per_token"] * tokens_per_s / peak
                for name, count in loader.skipped.items():  # bad lines, per source
                    last[f"data/skipped/{name}"] = count
                logger.log(last, seconds_per_step=elapsed / window_steps)
                window_start, window_steps = time.perf_counter(), 0
    finally:
        loader.close()
        logger.close()
    return last
