"""The FFN slot's families beside Memory+: moe (token-choice top-k experts) and peer (product
keys over single-neuron experts). Each against a plain per-token computation, on 1 process
and on 2 (FSDP, memory parallelism), in the FLOPs accounting, through a checkpoint, and in
the refusals."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_checkpoint import ROOT, one_error_line, rows, run_cli, run_inproc
from test_parallel import free_port, full_state, step

from lingua_mem.config import (
    ConfigError,
    DistributedConfig,
    MemoryConfig,
    ModelConfig,
    MoEConfig,
    OptimConfig,
    load_config,
    model_args,
)
from lingua_mem.memory.layer import ValueTable
from lingua_mem.memory.peer import PEER
from lingua_mem.memory.ultramem import UltraMem
from lingua_mem.model.args import ModelArgs, MoEArgs
from lingua_mem.model.llama import build_model
from lingua_mem.model.moe import AuxLosses, MoEFeedForward
from lingua_mem.optim import build_optimizer
from lingua_mem.parallel import init_distributed, parallelize
from lingua_mem.parallel.parallelize import COMPILES_CHECKPOINTED_READS
from lingua_mem.param_init import ParamInit
from lingua_mem.stats import config_stats

MODEL = ModelConfig(dim=32, n_layers=3, n_heads=4, vocab_size=61, max_seq_len=16)
FAMILIES = {
    "moe": (MemoryConfig(), MoEConfig(layers=[0, 2], experts=4, top_k=2, hidden_dim=48)),
    "moe_top1": (MemoryConfig(), MoEConfig(layers=[1], experts=3, top_k=1)),
    "peer": (MemoryConfig(layers=[0, 2], kind="peer", n_keys=8, heads=2, knn=4, k_dim=16, swilu=False),
             MoEConfig()),
    "ultramem": (MemoryConfig(layers=[0, 2], kind="ultramem", n_keys=8, heads=2, knn=3, k_dim=16, swilu=False,
                              value_expansion=2), MoEConfig()),
}


# --- against a plain computation ------------------------------------------------------------


def assert_same_forward_and_backward(layer, reference, params) -> None:
    """layer() and reference() give the same output, and the same gradients of `params` from
    the loss sum(out**2)."""
    got = layer()
    got.square().sum().backward()
    got_grads = [t.grad.clone() for t in params]
    for t in params:
        t.grad = None
    want = reference()
    want.square().sum().backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for g, t in zip(got_grads, params, strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6)


def moe_reference(layer: MoEFeedForward, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token: softmax router, top-k, gates, each chosen expert's SwiGLU; and the
    balancing loss E * sum_e f_e P_e, counted by hand."""
    outs, counts, e = [], [0] * layer.n_experts, layer.n_experts
    probs = torch.softmax(x @ layer.router.weight.T, dim=-1)  # (N, E)
    for n in range(x.shape[0]):
        top = sorted(range(e), key=lambda i: -probs[n, i].item())[:layer.top_k]
        norm = sum(probs[n, i] for i in top) if layer.top_k > 1 else 1.0
        y = 0
        for i in top:
            counts[i] += 1
            hidden = F.silu(layer.w1[i] @ x[n]) * (layer.w3[i] @ x[n])
            y = y + probs[n, i] / norm * (layer.w2[i] @ hidden)
        outs.append(y)
    share = torch.tensor(counts, dtype=torch.float32) / (x.shape[0] * layer.top_k)
    return torch.stack(outs), e * (share * probs.mean(0)).sum()


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_forward_and_backward_equal_a_per_token_computation(top_k):
    torch.manual_seed(0)
    layer = MoEFeedForward(dim=16, hidden_dim=24, experts=4, top_k=top_k, aux_loss_weight=0.5)
    layer.init_weights(ParamInit(3), std=0.3, out_std=0.2)
    x = torch.randn(2, 5, 16, requires_grad=True)
    aux = AuxLosses()
    got = layer(x, aux)
    (got.square().sum() + aux.total()).backward()
    got_grads = [t.grad.clone() for t in (x, *layer.parameters())]
    for t in (x, *layer.parameters()):
        t.grad = None
    want, balance = moe_reference(layer, x.reshape(-1, 16))
    (want.square().sum() + 0.5 * balance).backward()
    torch.testing.assert_close(got.reshape(-1, 16), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux.total(), 0.5 * balance)
    for g, t in zip(got_grads, (x, *layer.parameters()), strict=True):
        torch.testing.assert_close(g, t.grad, rtol=1e-4, atol=1e-6)
    assert layer.router.weight.grad.abs().sum() > 0  # the router learns (top-1: through its gate)


def peer_reference(layer: PEER, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each head scores all n_keys**2 experts (the two halves' sums), keeps its top knn,
    softmaxes them, and sums g * gelu(u_i . x) * v_i."""
    n, n_keys = x.shape[0], layer.n_keys
    q = layer.query(x).view(n, layer.heads, 2, layer.half)
    out = torch.zeros(n, layer.dim)
    for h in range(layer.heads):
        s1 = q[:, h, 0] @ layer.keys[h, 0].T  # (N, n_keys)
        s2 = q[:, h, 1] @ layer.keys[h, 1].T
        full = (s1[:, :, None] + s2[:, None, :]).reshape(n, n_keys**2)  # every composed key
        scores, idx = full.topk(layer.knn, dim=-1)
        g = scores.softmax(-1)  # (N, knn)
        act = F.gelu((layer.down[idx] * x[:, None, :]).sum(-1))  # (N, knn)
        out = out + ((g * act)[:, :, None] * table[idx]).sum(1)
    return out


def test_peer_forward_and_backward_equal_a_search_over_every_expert():
    torch.manual_seed(0)
    layer = PEER(dim=16, n_keys=6, heads=2, knn=3, k_dim=8, query_batchnorm=False)
    table = ValueTable(36, 16, kernel="torch")
    init = ParamInit(1)
    layer.init_weights(init, out_std=0.1)
    table.init_weights(init)
    x = torch.randn(7, 16, requires_grad=True)
    params = (x, table.weight, layer.down, layer.keys, layer.query.weight, layer.query.bias)
    assert_same_forward_and_backward(lambda: layer(x, table), lambda: peer_reference(layer, table.weight, x),
                                     params)
    assert layer.down.grad.count_nonzero() > 0 and layer.gate is None and layer.out is None


def ultramem_reference(layer: UltraMem, table: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each head scores all n_keys**2 slots by the Tucker form S_row[:, i]^T C S_col[:, j],
    keeps its top knn, softmaxes them, and sums each slot's physical row (slot mod P) through
    its projector (slot div P)."""
    n, n_keys, rows = x.shape[0], layer.n_keys, layer.rows
    q = layer.query(x).view(n, layer.heads, 2, layer.rank, layer.half)
    out = torch.zeros(n, layer.dim)
    for h in range(layer.heads):
        s_row = q[:, h, 0] @ layer.keys[h, 0].T  # (N, rank, n_keys)
        s_col = q[:, h, 1] @ layer.keys[h, 1].T
        full = torch.einsum("nai,ab,nbj->nij", s_row, layer.core[h], s_col).reshape(n, n_keys**2)
        scores, slot = full.topk(layer.knn, dim=-1)
        g = scores.softmax(-1)  # (N, knn)
        for j in range(layer.knn):
            row, projector = table[slot[:, j] % rows], layer.projectors[slot[:, j] // rows]
            projected = torch.einsum("nv,nvd->nd", row, projector)
            out = out + g[:, j, None] * projected
    return out


@pytest.mark.parametrize("rank,expansion", [(1, 1), (1, 3)])
def test_ultramem_forward_and_backward_equal_a_search_over_every_slot(rank, expansion):
    """At Tucker rank 1 the candidates of the rank-1 approximation hold the exact top knn."""
    torch.manual_seed(0)
    layer = UltraMem(dim=16, n_keys=6, heads=2, knn=3, k_dim=8, v_dim=12, rank=rank, expansion=expansion)
    table = ValueTable(36 // expansion, 12, kernel="torch")
    init = ParamInit(1)
    layer.init_weights(init, out_std=0.1)
    table.init_weights(init)
    x = torch.randn(7, 16, requires_grad=True)
    params = (x, table.weight, layer.core, layer.projectors, layer.keys, layer.query.weight)
    reference = lambda: ultramem_reference(layer, table.weight, x)  # noqa: E731
    assert_same_forward_and_backward(lambda: layer(x, table), reference, params)


def test_ultramem_at_rank_2_reads_slots_by_their_exact_tucker_scores():
    torch.manual_seed(0)
    layer = UltraMem(dim=16, n_keys=16, heads=2, knn=4, k_dim=8, v_dim=16, rank=2)
    layer.init_weights(ParamInit(2), out_std=0.1)
    x = torch.randn(50, 16)
    slots, weights = layer.lookup(x)  # (N, heads * knn)
    q = layer.query(x).view(50, 2, 2, 2, 4)
    found = 0
    for h in range(2):
        s_row, s_col = q[:, h, 0] @ layer.keys[h, 0].T, q[:, h, 1] @ layer.keys[h, 1].T
        full = torch.einsum("nai,ab,nbj->nij", s_row, layer.core[h], s_col).reshape(50, -1)
        mine = slots[:, h * 4:(h + 1) * 4]
        # its weights are the softmax of the exact scores of the slots it picked
        torch.testing.assert_close(weights[:, h * 4:(h + 1) * 4], full.gather(1, mine).softmax(-1))
        best = full.topk(4).indices
        found += sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(mine, best, strict=True))
    assert found / (50 * 2 * 4) > 0.5  # an approximate search: most of the true top knn


def test_the_balancing_loss_is_in_the_training_loss_only():
    args = model_args(MODEL, *FAMILIES["moe"])
    model = build_model(args, seed=1)
    tokens = torch.randint(0, MODEL.vocab_size, (2, 17))
    train = model(tokens[:, :-1], targets=tokens[:, 1:])
    model.eval()
    evaluated = model(tokens[:, :-1], targets=tokens[:, 1:])
    # two MoE layers, weight 0.01 each, a balancing loss of at least 1 (its minimum, at balance)
    assert 0.02 <= (train - evaluated).item() < 0.02 * 4


# --- 1 process against 2 --------------------------------------------------------------------


def family_worker(rank, world, port, family, layout, results):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.manual_seed(0)
    batch = torch.randint(1, MODEL.vocab_size, (world * 2, 17))
    args = model_args(MODEL, *FAMILIES[family])
    optim = OptimConfig(lr=1e-2, value_lr=3e-2, eps=1e-6, clip=0.5, value_clip=0.05, warmup=0)
    reference = build_model(args, seed=5)
    # the reference takes each rank's rows as one micro-batch: the balancing loss (and a query
    # BatchNorm) are per micro-batch statistics, as they are per rank
    ref_opt = build_optimizer(reference, optim)
    ref_losses = [step(reference, ref_opt, batch, micro=world, optim=optim).item() for _ in range(3)]
    cfg = DistributedConfig(**layout)
    model = parallelize(build_model(args, "meta"), init_distributed(cfg, "cpu"), cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=5)
    opt = build_optimizer(model, optim)
    losses = []
    for _ in range(3):
        loss = step(model, opt, batch[rank * 2:(rank + 1) * 2], optim=optim)
        dist.all_reduce(loss)
        losses.append(loss.item() / world)
    got, want = full_state(model), dict(reference.named_parameters())
    err = max(((got[k] - want[k].detach()).norm() / want[k].detach().norm()).item() for k in want)
    if rank == 0:
        results.put((ref_losses, losses, err, sorted(got) == sorted(want)))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("family,layout", [
    ("moe", {"dp_shard": 2}),
    ("peer", {"dp_shard": 2, "memory_parallel_size": 2}),
    ("peer", {"dp_replicate": 2, "dp_shard": 1}),
    ("ultramem", {"dp_shard": 2, "memory_parallel_size": 2}),
    ("moe", {"dp_shard": 2, "activation_checkpointing": "full"}),
    ("ultramem", {"memory_parallel_size": 2, "compile": True}),
], ids=["moe-fsdp2", "peer-fsdp2-mp2", "peer-replicated", "ultramem-fsdp2-mp2", "moe-full-checkpointing",
        "ultramem-mp2-compiled"])
def test_two_processes_train_as_one(family, layout):
    if layout.get("compile") and layout.get("activation_checkpointing") and not COMPILES_CHECKPOINTED_READS:
        pytest.skip(f"torch {torch.__version__} cannot compile checkpointed blocks")
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    mp.start_processes(family_worker, args=(2, free_port(), family, layout, results), nprocs=2,
                       start_method="spawn", join=True)
    ref_losses, losses, err, same_names = results.get(timeout=5)
    assert same_names and ref_losses[-1] < ref_losses[0]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    # compiled kernels round differently; the value clip's norm (active: value_clip 0.05) sums the
    # rows' squares in the order they were first read, the reference's in row order
    assert err < (5e-5 if layout.get("compile") or layout.get("dp_replicate") else 1e-5)


# --- accounting -------------------------------------------------------------------------------


def test_flops_and_parameters_by_hand():
    d, layers, vocab, hidden, seq = 32, 3, 61, 256, 16  # hidden: Llama's rule at dim 32 (multiple of 256)
    attn, ffn = 4 * d * d, 3 * d * hidden
    base = ["config=configs/debug.yaml", f"model.dim={d}", f"model.n_layers={layers}", "model.n_heads=4",
            "model.n_kv_heads=4",
            f"model.vocab_size={vocab}", f"data.seq_len={seq}", f"model.max_seq_len={seq}"]
    attention = 12 * layers * d * seq
    dense = config_stats(load_config([*base, "memory.layers=[]"]))
    assert dense["flops_per_token"] == 6 * (layers * (attn + ffn) + vocab * d) + attention

    moe = config_stats(load_config([*base, "memory.layers=[]", "moe.layers=[1]", "moe.experts=4",
                                    "moe.top_k=2", "moe.hidden_dim=40"]))
    experts = 4 * 3 * d * 40
    assert moe["sparse_params"] == experts and moe["memory_value_params"] == 0
    assert moe["total_params"] == dense["total_params"] - ffn + d * 4 + experts  # the router: d x E
    assert moe["active_params_per_token"] == moe["dense_params"] + 2 * 3 * d * 40
    routed = d * 4 + 2 * 3 * d * 40  # the router, and the top 2 experts' SwiGLU
    assert moe["flops_per_token"] == 6 * (layers * attn + 2 * ffn + routed + vocab * d) + attention

    peer = config_stats(load_config([*base, "memory.layers=[1]", "memory.kind=peer", "memory.swilu=false",
                                     "memory.n_keys=8", "memory.heads=2", "memory.knn=4", "memory.k_dim=16"]))
    query, keys = d * 2 * 16, 2 * 2 * 8 * 8  # heads * k_dim projection; (heads, 2, n_keys, k_dim / 2)
    assert peer["memory_value_params"] == 64 * d and peer["sparse_params"] == 2 * 64 * d  # v and u
    assert peer["active_params_per_token"] == peer["dense_params"] + 2 * 4 * 2 * d
    assert peer["flops_per_token"] == 6 * (layers * attn + 2 * ffn + query + keys + 2 * 4 * 2 * d
                                           + vocab * d) + attention

    ultra = config_stats(load_config([*base, "memory.layers=[1]", "memory.kind=ultramem",
                                      "memory.swilu=false", "memory.n_keys=8", "memory.heads=2",
                                      "memory.knn=4", "memory.k_dim=16", "memory.v_dim=24",
                                      "memory.tucker_rank=3", "memory.value_expansion=4"]))
    query = d * 2 * 2 * 3 * 8  # heads x (row, column) x rank queries of k_dim / 2
    keys, core, projectors = 3 * (2 * 2 * 8 * 8), 2 * 3 * 3, 4 * 24 * d  # keys scored by rank queries
    assert ultra["memory_value_params"] == 64 // 4 * 24 and ultra["n_values"] == 16
    owned = query + query // d + keys // 3 + core + projectors  # the query's bias: one a row
    assert ultra["total_params"] == dense["total_params"] - ffn + owned + 16 * 24
    assert ultra["flops_per_token"] == 6 * (layers * attn + 2 * ffn + query + keys + projectors
                                            + 2 * 4 * 24 * 4 + vocab * d) + attention


# --- checkpoints and refusals -----------------------------------------------------------------

TINY = {"moe": ["memory.layers=[]", "moe.layers=[1]", "moe.experts=3", "moe.top_k=2"],
        "peer": ["memory.kind=peer", "memory.swilu=false", "memory.query_batchnorm=true"],
        "ultramem": ["memory.kind=ultramem", "memory.swilu=false", "memory.value_expansion=4"]}


@pytest.mark.parametrize("family", TINY)
def test_resume_from_a_checkpoint_is_bit_exact(tmp_path, family):
    run = ("steps=6", "checkpoint.every=3", "checkpoint.keep_last=0", *TINY[family])
    run_inproc(tmp_path, *run)
    want = rows(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "0000000006")  # as if stopped after step 3's checkpoint
    run_inproc(tmp_path, *run)  # resumes at step 3: the weights, optimizer and data order restored
    got = rows(tmp_path)
    assert [r["step"] for r in got] == list(range(1, 7))
    for g, w in zip(got, want, strict=True):
        assert (g["loss"], g["grad_norm"], g["value_grad_norm"]) == (w["loss"], w["grad_norm"],
                                                                      w["value_grad_norm"])
    assert math.isfinite(got[-1]["loss"]) and got[-1]["loss"] < got[0]["loss"]


def test_export_hf_refuses_the_families_it_has_no_model_for(tmp_path):
    pytest.importorskip("transformers")
    from lingua_mem.checkpoint.hf_export import export_hf

    run_inproc(tmp_path / "run", "steps=1", "checkpoint.every=1", *TINY["moe"])
    out = tmp_path / "export"
    with pytest.raises(ValueError, match="export-hf has no transformers model for moe layers"):
        export_hf(tmp_path / "run" / "checkpoints" / "0000000001", out)
    assert not out.exists()


@pytest.mark.parametrize("overrides,key", [
    (["moe.layers=[1]"], "moe.layers"),  # SMALL's memory layer is 1
    (["memory.layers=[]", "moe.layers=[0]", "moe.top_k=9"], "moe.top_k"),
    (["memory.layers=[]", "moe.layers=[0]", "distributed.compile=true"], "distributed.compile"),
    (["memory.kind=peer"], "memory.swilu"),
    (["memory.kind=peer", "memory.swilu=false", "memory.v_dim=32"], "memory.v_dim"),
    (["memory.kind=ffn"], "memory.kind"),
    (["memory.kind=ultramem", "memory.swilu=false", "memory.knn=9"], "memory.knn"),  # 2 * knn > n_keys=16
    (["memory.kind=ultramem", "memory.swilu=false", "memory.value_expansion=3"], "memory.value_expansion"),
    (["memory.value_expansion=2"], "memory.value_expansion"),  # pkm
])
def test_refusals_are_one_line_naming_the_key(tmp_path, overrides, key):
    line = one_error_line(run_cli(tmp_path, *overrides))
    assert line.startswith(f"error: config: {key}") or f" {key}" in line, line
    assert not (tmp_path / "metrics.jsonl").exists()


def test_model_args_round_trip_and_older_records_without_moe():
    args = model_args(MODEL, *FAMILIES["moe"])
    assert ModelArgs.from_dict(args.to_dict()) == args
    older = args.to_dict()
    del older["moe"]  # a checkpoint written before the moe section existed
    assert ModelArgs.from_dict(older).moe == MoEArgs()
    with pytest.raises(ValueError, match="moe.capacity: not a model argument"):
        ModelArgs.from_dict({**args.to_dict(), "moe": {"capacity": 2}})
    with pytest.raises(ConfigError, match="moe.experts"):
        load_config(["config=configs/debug.yaml", "memory.layers=[]", "moe.layers=[0]", "moe.experts=0"])


def test_the_plan_refuses_moe_in_one_line():
    argv = ["config=configs/debug.yaml", "memory.layers=[]", "moe.layers=[1]"]
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.plan", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: moe.layers: the plan does not cover")
    assert len(proc.stderr.splitlines()) == 1
