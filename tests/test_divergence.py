"""Divergence: a non-finite loss or gradient norm stops the run with one line naming the step,
no checkpoint of non-finite state is ever written, and the finite ones are kept; with
optim.skip_nonfinite such a step makes no update and is counted instead."""

import math
import subprocess
import sys
from pathlib import Path

import torch

from lingua_mem.checkpoint.checkpointer import complete_checkpoints
from lingua_mem.checkpoint.consolidate import consolidate, load_consolidated
from lingua_mem.config import MemoryConfig, ModelConfig, OptimConfig, model_args
from lingua_mem.model.llama import build_model
from lingua_mem.optim import build_optimizer, split_params
from lingua_mem.train.step import state_is_finite, train_step

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=32", "memory.layers=[1]",
        "memory.n_keys=8", "memory.heads=2", "memory.knn=4", "data.seq_len=16", "data.batch_size=2",
        "data.facts.people=20", "optim.warmup=0", "optim.clip=0", "optim.value_clip=0"]
ARGS = model_args(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=61, max_seq_len=16),
                  MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4, k_dim=16))


def test_a_diverging_run_stops_naming_the_step_and_keeps_its_finite_checkpoints(tmp_path):
    # lr 1e20: step 1 is finite (and checkpointed); its update makes step 2's loss non-finite
    proc = subprocess.run([sys.executable, "train.py", "config=configs/debug.yaml", f"dump_dir={tmp_path}",
                           *TINY, "steps=6", "log_every=100", "checkpoint.every=1", "checkpoint.keep_last=1",
                           "optim.lr=1e20", "optim.value_lr=1e20"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    first = tmp_path / "checkpoints" / "0000000001"
    assert lines[0] == (f"error: training diverged: non-finite loss or gradient norm at step 2; the newest "
                        f"checkpoint, {first}, is from before it; lower optim.lr, or set "
                        "optim.skip_nonfinite=true to skip such steps")
    # nothing written after the divergence, and retention (keep_last=1) kept the finite one
    assert complete_checkpoints(tmp_path) == [first]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["0000000001"]
    consolidate(first, tmp_path / "export")
    model = load_consolidated(tmp_path / "export")
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_non_finite_weights_or_optimizer_state_are_found():
    model = build_model(ARGS, seed=0)
    optimizer = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, ARGS.vocab_size, (2, 9))
    dense, values = split_params(model)
    train_step(model, optimizer, [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}], OptimConfig(),
               dense, values)
    assert state_is_finite(model, optimizer)
    moment = optimizer.state[model.values.shared.weight]["exp_avg_sq"]
    moment[3, 1] = math.inf
    assert not state_is_finite(model, optimizer)
    moment[3, 1] = 0.0
    with torch.no_grad():
        model.layers[0].attention.wq.weight[0, 0] = math.nan
    assert not state_is_finite(model, optimizer)


def test_skip_nonfinite_makes_no_update_and_the_next_step_trains():
    model = build_model(ARGS, seed=0)
    optim = OptimConfig(lr=1e-2, warmup=0, skip_nonfinite=True)
    optimizer = build_optimizer(model, optim)
    dense, values = split_params(model)
    with torch.no_grad():
        model.tok_embeddings.weight[7] = math.nan  # any batch holding token 7 has a NaN loss
    poisoned = torch.full((2, 9), 7)
    clean = torch.randint(8, ARGS.vocab_size, (2, 9))

    def step(tokens):
        return train_step(model, optimizer, [{"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}], optim,
                          dense, values)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = step(poisoned)
    assert result.skipped and not result.finite.item()
    for name, t in model.state_dict().items():  # not one value moved (NaN where it was NaN)
        torch.testing.assert_close(t, before[name], rtol=0, atol=0, equal_nan=True, msg=name)
    assert optimizer.state == {}  # AdamW never stepped
    result = step(clean)
    assert not result.skipped and result.finite.item()
    assert not torch.equal(before["layers.0.attention.wq.weight"], model.layers[0].attention.wq.weight)

    optim.skip_nonfinite = False  # without it the NaN reaches the weights
    step(poisoned)
    assert torch.isnan(model.layers[0].attention.wq.weight).any()
