"""Sparse memory finetuning: background usage counts, the per-step row selection, the frozen
parameters (bit-identical), memory parallelism and activation checkpointing (against one
process), and the three finetune modes from train.py with a resume."""

import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_checkpoint import ROOT, cli_args, model_state, run_cli
from test_parallel import MEMORY, MODEL, OPTIM, PER_RANK_BATCH, SEQ, free_port, full_state

from lingua_mem.config import ConfigError, DistributedConfig, FinetuneConfig, load_config, model_args
from lingua_mem.finetune.sparse_memory import (
    SparseMemoryFinetune,
    build_sparse_optimizer,
    freeze_all_but_values,
    score_rows,
    select_rows,
)
from lingua_mem.memory.usage import RowReads, Usage, count_usage, load_usage
from lingua_mem.model.llama import build_model
from lingua_mem.optim import split_params
from lingua_mem.parallel import init_distributed, parallelize
from lingua_mem.run_dir import usage_file
from lingua_mem.train.step import train_step

TOP_T, STEPS, BACKGROUND = 6, 3, 4


def test_scores_and_selection():
    usage = Usage(reads={"t": torch.tensor([100, 0, 10, 10, 5])},
                  batches={"t": torch.tensor([9, 0, 1, 1, 9])}, n_batches=9, tokens=0, meta={})
    counts = torch.tensor([4, 2, 2, 2, 0])
    tfidf = score_rows(counts, usage, "t", "tfidf")
    p = counts.double() / 10
    assert torch.allclose(tfidf, p * torch.log(torch.tensor(10.0) / (usage.batches["t"].double() + 1)))
    assert tfidf[0] == 0 and tfidf[4] == 0  # read by every background batch / not read now
    # ties (rows 2 and 3) go to the lower row; rows of score 0 are never selected
    assert select_rows(tfidf, 2).tolist() == [1, 2]
    assert select_rows(tfidf, 10).tolist() == [1, 2, 3]
    kl = score_rows(counts, usage, "t", "kl")
    q = (usage.reads["t"].double() + 1) / (125 + 5)
    assert torch.allclose(kl[:4], p[:4] * torch.log(p[:4] / q[:4])) and kl[4] == 0
    assert select_rows(kl, 1).tolist() == [1]  # never read in the background: the most specific


def batches_of(tokens: torch.Tensor) -> list[dict]:
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def sparse_worker(rank, world, port, layout, kind, ranking, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.manual_seed(0)
    # background batches of one process each; rank r of `world` counts r, r + world, ...
    background = torch.randint(1, MODEL.vocab_size, (BACKGROUND, 1, PER_RANK_BATCH, SEQ + 1))
    # the finetuning data: one batch of a narrow vocabulary (it reads rows the background reads
    # little), so its loss must fall
    steps = torch.randint(1, 8, (1, 2 * PER_RANK_BATCH, SEQ + 1)).expand(STEPS, -1, -1)  # the global batch
    model = build_model(model_args(MODEL, MEMORY), "meta")
    freeze_all_but_values(model)
    cfg = DistributedConfig(**layout)
    meshes = init_distributed(cfg, "cpu")
    parallelize(model, meshes, cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=5)
    before = {k: v.detach().clone() for k, v in full_state(model).items()}  # a copy: one rank's is a view

    mine = [b for i, b in enumerate(batches_of(background[:, 0])) if i % world == rank]
    usage = count_usage(model, iter(mine), len(mine), "cpu")
    finetune = FinetuneConfig(mode="sparse_memory", top_t=TOP_T, optimizer=kind, ranking=ranking)
    optimizer = build_sparse_optimizer(model, finetune, OPTIM)
    sparse = SparseMemoryFinetune(model, finetune, usage, optimizer)
    dense, values = split_params(model)
    assert not dense and [p.requires_grad for p in model.parameters()].count(True) == 1
    rows, losses, agree = [], [], True
    per_rank = 2 * PER_RANK_BATCH // world
    share = slice(rank * per_rank, (rank + 1) * per_rank)
    for t in steps:
        with sparse.counting():
            loss = train_step(model, optimizer, batches_of(t[None, share]), OPTIM, dense, values,
                              after_backward=sparse.after_backward).loss
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
        selected = sparse.rows["shared"].tolist()
        everyone = [None] * world
        dist.all_gather_object(everyone, selected)
        agree &= all(e == selected for e in everyone)
        rows.append(selected)
    model(steps[0, share, :-1])  # an evaluation-like forward outside counting(): not counted
    not_counted = all(int(c.sum()) == 0 for c in sparse.reads.counts.values())
    sparse.close()
    after = {k: v.detach().clone() for k, v in full_state(model).items()}
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v)
             for k, v in next(iter(optimizer.state.values()), {}).items()}
    if rank == 0:  # as bytes: a tensor put on a torch queue is shared memory that dies with its process
        out = io.BytesIO()
        torch.save({"rows": rows, "agree": agree, "losses": losses, "before": before, "after": after,
                    "state": state, "usage": (usage.reads, usage.batches, usage.n_batches),
                    "not_counted": not_counted}, out)
        results.put(out.getvalue())
    dist.barrier()
    dist.destroy_process_group()


def run_sparse(world: int, layout: dict, kind: str = "adamw", ranking: str = "tfidf") -> dict:
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = mp.start_processes(sparse_worker, args=(world, free_port(), layout, kind, ranking, results),
                               nprocs=world, join=False, start_method="spawn")
    try:  # read before joining: a worker cannot exit while its result is still in the pipe
        result = torch.load(io.BytesIO(results.get(timeout=120)), weights_only=False)
    finally:
        while not procs.join():
            pass
    return result


def assert_only_selected_rows_changed(r: dict) -> set[int]:
    union = sorted({i for step in r["rows"] for i in step})
    assert 0 < len(union) <= STEPS * TOP_T and all(0 < len(s) <= TOP_T for s in r["rows"])
    for name, value in r["before"].items():
        if name != "values.shared.weight":
            assert torch.equal(r["after"][name], value), name  # frozen: bit-identical
    table0, table1 = r["before"]["values.shared.weight"], r["after"]["values.shared.weight"]
    others = torch.ones(table0.shape[0], dtype=torch.bool)
    others[union] = False
    assert torch.equal(table1[others], table0[others])  # every row not selected: bit-identical
    assert (table1[union] != table0[union]).any(dim=1).all()  # every selected row moved
    for name in ("exp_avg", "exp_avg_sq"):
        if name in r["state"]:  # AdamW's moments: zero (as initialised) outside the selected rows
            assert not r["state"][name][others].any() and r["state"][name][union].any(dim=1).all()
    return set(union)


@pytest.mark.parametrize("kind,ranking", [("adamw", "tfidf"), ("sgd", "kl")])
def test_sparse_memory_updates_only_the_selected_rows(kind, ranking):
    r = run_sparse(1, {}, kind, ranking)
    assert r["agree"] and r["not_counted"]
    assert_only_selected_rows_changed(r)
    assert r["losses"][-1] < r["losses"][0]
    reads, batches, n = r["usage"]
    per_batch = PER_RANK_BATCH * SEQ * MEMORY.heads * MEMORY.knn * len(MEMORY.layers)
    assert n == BACKGROUND and int(reads["shared"].sum()) == BACKGROUND * per_batch
    assert int(batches["shared"].max()) <= BACKGROUND and (batches["shared"] <= reads["shared"]).all()


def test_sparse_memory_with_memory_parallelism_equals_one_process():
    one = run_sparse(1, {})
    # mp=2: the table's columns on two ranks; dp_shard=2 with full activation checkpointing:
    # its rows on two ranks, and the recomputed forward must not count its reads twice
    for layout in ({"memory_parallel_size": 2}, {"dp_shard": 2, "activation_checkpointing": "full"}):
        two = run_sparse(2, layout)
        assert two["agree"], layout  # every rank selected the same rows
        assert two["rows"] == one["rows"], layout
        for a, b in zip(two["usage"][:2], one["usage"][:2], strict=True):  # background: counts summed
            assert torch.equal(a["shared"], b["shared"]), layout
        assert two["usage"][2] == one["usage"][2]
        assert two["losses"] == pytest.approx(one["losses"], rel=1e-5)
        assert assert_only_selected_rows_changed(two) == assert_only_selected_rows_changed(one)
        for name, value in one["after"].items():
            torch.testing.assert_close(two["after"][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_row_reads_count_each_layers_picks_per_table():
    model = build_model(model_args(MODEL, MEMORY.__class__(**{**MEMORY.__dict__, "shared_values": False})))
    tokens = torch.randint(1, MODEL.vocab_size, (2, SEQ))
    with RowReads(model) as reads:
        model(tokens)
        counts = reads.take(reduce=False)
    assert sorted(counts) == ["layer0", "layer2"]
    for c in counts.values():
        assert int(c.sum()) == tokens.numel() * MEMORY.heads * MEMORY.knn


# ---- the command line: usage, the three modes, resume ------------------------------------

def usage_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lingua_mem.eval.usage", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def tensors(ckpt) -> dict[str, torch.Tensor]:
    """The model tensors of a checkpoint as written (LoRA adapters apart, not merged)."""
    return model_state(ckpt, ckpt.parent.parent)["model"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A small memory model trained 6 steps, and its background usage counts."""
    root = tmp_path_factory.mktemp("pretrained")
    proc = run_cli(root / "pre", "steps=6", "checkpoint.every=6")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ckpt = root / "pre" / "checkpoints" / "0000000006"
    proc = usage_cli(f"ckpt={ckpt}", "batches=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "wrote" in proc.stdout
    return ckpt


def test_usage_command_counts_the_runs_own_data(pretrained):
    usage = load_usage(usage_file(pretrained, training=True), {"shared": 16 * 16})
    # beside checkpoints/, where retention does not prune
    assert usage_file(pretrained, True) == pretrained.parents[1] / "memory_usage" / "0000000006.safetensors"
    assert usage.n_batches == 4 and usage.tokens == 4 * 2 * 64 and usage.meta["step"] == "6"
    assert int(usage.reads["shared"].sum()) == usage.tokens * 2 * 4  # heads x knn, one memory layer
    facts = json.loads(usage.meta["data"])["facts"]  # the run's own data
    assert facts == {"people": 50, "seed": 0, "style": "mixed", "docs_per_person": 3, "qa_fraction": 0.0}
    # bad input: one line, exit 2
    inside, beside = pretrained / "usage.safetensors", pretrained.parent / "u.safetensors"
    for args, words in ((["batches=0"], "batches: must be positive"),
                        ([f"ckpt={pretrained.parent}"], "ckpt: "),
                        ([f"out={inside}"], f"out {inside}: lies inside {pretrained}, which this command"),
                        ([f"out={beside}"], "a run's checkpoints, which retention")):
        proc = usage_cli(f"ckpt={pretrained}", *args)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and words in proc.stderr, proc.stderr


def test_the_usage_counts_survive_the_runs_retention(pretrained, tmp_path):
    run = tmp_path / "pre"
    shutil.copytree(pretrained.parent.parent, run)  # the module's run stays as it is
    counts = usage_file(run / "checkpoints" / pretrained.name, training=True)
    written = counts.read_bytes()
    # the run goes on and keeps only its newest checkpoint: step 6's folder is pruned
    proc = run_cli(run, "steps=8", "checkpoint.every=2", "checkpoint.keep_last=1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()] == ["0000000008"]
    assert counts.read_bytes() == written


FINETUNE = ["data.facts.seed=1", "optim.warmup=0", "optim.scheduler=constant", "checkpoint.every=2"]


def test_three_modes_from_train_py_and_a_sparse_resume(pretrained, tmp_path):
    source = tensors(pretrained)
    background = usage_file(pretrained, training=True)
    # AdamW: its moments must resume too
    sparse = ["finetune.mode=sparse_memory", f"finetune.background={background}", "finetune.top_t=8",
              "finetune.optimizer=adamw", "optim.value_lr=1e-2"]
    runs = {"full": ["finetune.mode=full"], "lora": ["finetune.mode=lora", "finetune.lora.rank=4"],
            "sparse_memory": sparse}
    final = {}
    for mode, args in runs.items():
        proc = run_cli(tmp_path / mode, f"checkpoint.init_from={pretrained}", "steps=4", *FINETUNE, *args)
        assert proc.returncode == 0, (mode, proc.stderr[-2000:])
        if mode != "full":
            assert f"finetune.mode={mode}: " in proc.stdout
        final[mode] = tensors(tmp_path / mode / "checkpoints" / "0000000004")
    changed = lambda mode: {k for k, v in source.items() if not torch.equal(final[mode][k], v)}  # noqa: E731
    assert changed("full") == set(source)
    assert changed("sparse_memory") == {"values.shared.weight"}
    moved = (final["sparse_memory"]["values.shared.weight"] != source["values.shared.weight"]).any(dim=1)
    assert 0 < int(moved.sum()) <= 4 * 8
    assert changed("lora") == set()  # the base model's tensors: frozen
    adapters = sorted(set(final["lora"]) - set(source))
    assert adapters and all(k.endswith((".lora_a", ".lora_b")) for k in adapters)
    assert all(final["lora"][k].any() for k in adapters if k.endswith(".lora_b"))  # B left zero: trained

    # a sparse run stopped at step 2 and resumed equals the straight run, bit for bit
    resumed = tmp_path / "resumed"
    for steps in (2, 4):
        proc = run_cli(resumed, f"checkpoint.init_from={pretrained}", f"steps={steps}", *FINETUNE, *sparse)
        assert proc.returncode == 0, proc.stderr[-2000:]
    assert "resumed from" in proc.stdout
    again = tensors(resumed / "checkpoints" / "0000000004")
    for k, v in final["sparse_memory"].items():
        assert torch.equal(again[k], v), k

    # bad input: one line naming the key; a file that is not usage counts is found at start-up
    for args, words in ((["finetune.mode=sparse_memory"], "finetune.background: required"),
                        (["finetune.mode=sparse"], "finetune.mode: 'sparse' is not one of"),
                        (["finetune.mode=lora", "finetune.lora.targets=[wq,query]"],
                         "finetune.lora.targets")):
        with pytest.raises(ConfigError, match=re.escape(words)):
            load_config(cli_args(tmp_path / "bad", *args))
    other = shutil.copytree(pretrained, tmp_path / "other" / "checkpoints" / pretrained.name)
    with pytest.raises(ConfigError, match=re.escape(f"finetune.background: {background} counts the reads of "
                                                    f"{pretrained}, and this run starts from "
                                                    f"checkpoint.init_from={other}")):
        load_config(cli_args(tmp_path / "bad", f"checkpoint.init_from={other}", *sparse))
    proc = run_cli(tmp_path / "bad", f"checkpoint.init_from={pretrained}", "steps=1", *sparse[:1],
                   f"finetune.background={pretrained / 'meta.json'}")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "meta.json: unreadable" in proc.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()

