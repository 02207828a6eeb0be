import dataclasses
import itertools

import pytest
import torch
from test_value_optim import LargestOutput

from lingua_mem.config import MemoryConfig, ModelConfig, model_args
from lingua_mem.kernels import embedding_bag
from lingua_mem.memory import ProductKeyMemory, ValueTable, product_topk
from lingua_mem.model import loss as loss_module
from lingua_mem.model.llama import FeedForward, build_model
from lingua_mem.param_init import ParamInit


def brute_force_topk(s1, s2, k):
    n = s1.shape[-1]
    full = (s1[:, :, None] + s2[:, None, :]).reshape(s1.shape[0], n * n)  # index i1 * n + i2
    return full.topk(k, dim=-1)


@pytest.mark.parametrize("n_keys,k", [(8, 1), (16, 5), (32, 32), (64, 16)])
def test_product_topk_equals_brute_force(n_keys, k):
    gen = torch.Generator().manual_seed(n_keys * 100 + k)
    s1 = torch.randn(50, n_keys, dtype=torch.float64, generator=gen)  # continuous: no ties
    s2 = torch.randn(50, n_keys, dtype=torch.float64, generator=gen)
    scores, idx = product_topk(s1, s2, k)
    ref_scores, ref_idx = brute_force_topk(s1, s2, k)
    assert scores.shape == idx.shape == (50, k)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=0)
    assert torch.equal(idx, ref_idx)
    assert bool((scores[:, 1:] <= scores[:, :-1]).all())  # sorted descending
    # the indices address i1 * n_keys + i2 and their scores match
    torch.testing.assert_close(scores, s1.gather(1, idx // n_keys) + s2.gather(1, idx % n_keys))


def test_product_topk_leading_dims_and_grad():
    s1 = torch.randn(3, 4, 10, requires_grad=True)
    s2 = torch.randn(3, 4, 10, requires_grad=True)
    scores, idx = product_topk(s1, s2, 6)
    assert scores.shape == idx.shape == (3, 4, 6)
    flat_scores, flat_idx = product_topk(s1.reshape(12, 10), s2.reshape(12, 10), 6)
    assert torch.equal(idx.reshape(12, 6), flat_idx)
    scores.sum().backward()
    # each chosen pair adds 1 to its rows' gradients; every gradient entry counts picks
    assert s1.grad.sum().item() == pytest.approx(3 * 4 * 6)
    assert s2.grad.sum().item() == pytest.approx(3 * 4 * 6)


def test_the_key_search_backward_through_the_picked_sub_keys_equals_the_dense_one():
    # product_key_search differentiates through the 2k sub-keys each (token, head) picked; the
    # dense scores' backward (einsum, then the top-k of them) must give the same gradients
    from lingua_mem.memory.product_topk import product_key_search, product_topk_halves

    g = torch.Generator().manual_seed(0)
    q = torch.randn(7, 3, 2, 5, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(3, 2, 11, 5, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    scores, idx = product_key_search(q, keys, 4)
    dense_scores, dense_idx = product_topk_halves(torch.einsum("nhpd,hpkd->nhpk", q, keys), 4)
    assert torch.equal(idx, dense_idx) and torch.equal(scores, dense_scores)
    got = torch.autograd.grad((scores.softmax(-1) * weight).sum(), (q, keys))
    expected = torch.autograd.grad((dense_scores.softmax(-1) * weight).sum(), (q, keys))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_the_key_search_in_chunks_and_groups_equals_the_dense_one():
    # at n_keys 512 the CPU search runs in token chunks of 8 MiB of scores (1,100 tokens: 3
    # of them), its top-k through group maxima, and the sub-keys' gradient as chunks of dense
    # scores (n_keys <= k * half): all equal to the dense scores' search and backward
    from lingua_mem.memory.product_topk import CPU_SCORE_CHUNK_BYTES, product_key_search, product_topk_halves

    g = torch.Generator().manual_seed(1)
    n, heads, n_keys, half, k = 1100, 4, 512, 32, 16
    assert n * heads * 2 * n_keys * 8 > 2 * CPU_SCORE_CHUNK_BYTES  # float64 scores: 3 chunks
    q = torch.randn(n, heads, 2, half, generator=g, dtype=torch.float64, requires_grad=True)
    keys = torch.randn(heads, 2, n_keys, half, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(n, heads, k, generator=g, dtype=torch.float64)
    scores, idx = product_key_search(q, keys, k)
    dense_scores, dense_idx = product_topk_halves(torch.einsum("nhpd,hpkd->nhpk", q, keys), k)
    assert torch.equal(idx, dense_idx) and torch.equal(scores, dense_scores)
    got = torch.autograd.grad((scores.softmax(-1) * weight).sum(), (q, keys))
    expected = torch.autograd.grad((dense_scores.softmax(-1) * weight).sum(), (q, keys))
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [64, 512, 1024])
def test_topk_unsorted_equals_torch_topk(n):
    # 512 and 1024 go through group maxima on the CPU; with many ties (scores rounded to
    # integers) the values still agree, each index pointing at its value
    from lingua_mem.memory.product_topk import topk_unsorted

    g = torch.Generator().manual_seed(n)
    s = torch.randn(3, 50, n, generator=g)
    for scores in (s, (s * 3).round(), torch.full_like(s, 2.0)):
        v, i = topk_unsorted(scores, 16)
        want_v, want_i = scores.topk(16, dim=-1)
        assert torch.equal(v.sort(-1, descending=True).values, want_v)
        assert torch.equal(scores.gather(-1, i), v) and (i.sort(-1).values.diff(dim=-1) > 0).all()
        if scores is s:  # no ties: the same indices
            assert torch.equal(i.sort(-1).values, want_i.sort(-1).values)


def test_product_topk_rejects_bad_k():
    with pytest.raises(ValueError, match="k=9"):
        product_topk(torch.randn(2, 8), torch.randn(2, 8), 9)


def test_embedding_bag_matches_naive_float64():
    gen = torch.Generator().manual_seed(0)
    n, m, rows, d = 37, 12, 50, 9
    indices = torch.randint(0, rows, (n, m), generator=gen)
    indices[0, :4] = 3  # repeated rows inside a bag accumulate
    table = torch.randn(rows, d, dtype=torch.float64, generator=gen, requires_grad=True)
    weights = torch.rand(n, m, dtype=torch.float64, generator=gen, requires_grad=True)
    out = embedding_bag(indices, weights, table)
    grad_out = torch.randn(n, d, dtype=torch.float64, generator=gen)
    g_table, g_weights = torch.autograd.grad(out, (table, weights), grad_out)

    ref = (weights[:, :, None] * table[indices]).sum(1)  # naive gather-and-sum
    r_table, r_weights = torch.autograd.grad(ref, (table, weights), grad_out)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_table, r_table, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_weights, r_weights, rtol=1e-12, atol=1e-12)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[indices.flatten()] = False
    assert bool((g_table[untouched] == 0).all())


def test_embedding_bag_gradcheck():
    indices = torch.tensor([[0, 2, 2], [1, 3, 0]])
    table = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, t: embedding_bag(indices, w, t), (weights, table))


def small_cfg(**mem):
    model = ModelConfig(dim=64, n_layers=5, n_heads=4, n_kv_heads=2, vocab_size=97, max_seq_len=32)
    memory = MemoryConfig(layers=[1, 3], n_keys=8, heads=2, knn=4, **mem)
    return model_args(model, memory)


def test_memory_layers_at_configured_ids_only():
    model = build_model(small_cfg())
    kinds = [type(b.feed_forward) for b in model.layers]
    assert kinds == [FeedForward, ProductKeyMemory, FeedForward, ProductKeyMemory, FeedForward]
    assert list(model.values.keys()) == ["shared"]
    assert model.values["shared"].weight.shape == (64, 64)  # n_keys**2 x dim


def test_per_layer_tables():
    model = build_model(small_cfg(shared_values=False, v_dim=32))
    assert sorted(model.values.keys()) == ["layer1", "layer3"]
    assert model.values["layer1"].weight.shape == (64, 32)


@pytest.mark.parametrize("options", [
    {}, {"swilu": False}, {"qk_norm": True}, {"query_batchnorm": True}, {"shared_values": False},
])
def test_state_dict_round_trip_gives_same_logits(options):
    torch.manual_seed(0)
    model = build_model(small_cfg(**options))
    tokens = torch.randint(0, 97, (2, 16))
    model.train()
    model(tokens).sum().backward()  # BatchNorm running stats move; state must carry them
    model.eval()
    with torch.no_grad():
        expected = model(tokens)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert sum(k.endswith(".weight") and "values." in k for k in state) == len(model.values)

    fresh = build_model(small_cfg(**options), seed=123)  # other weights
    fresh.eval()
    with torch.no_grad():
        assert not torch.allclose(fresh(tokens), expected)
    fresh.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(tokens), expected, rtol=0, atol=0)


def test_shared_table_is_one_parameter_receiving_both_layers_gradients():
    model = build_model(small_cfg())
    table = model.values["shared"].weight
    assert sum(p is table for p in model.parameters()) == 1
    tokens = torch.randint(0, 97, (2, 16))
    grads = []
    for layer_id in (1, 3):
        model.zero_grad()
        x = torch.randn(2, 16, 64)
        model.layers[layer_id].feed_forward(x, model.values["shared"]).sum().backward()
        grads.append(table.grad.clone())
    assert all(g.abs().sum() > 0 for g in grads)
    model.zero_grad()
    model(tokens).sum().backward()
    assert table.grad.abs().sum() > 0


def test_init_weights_defines_every_parameter_and_buffer():
    args = small_cfg(query_batchnorm=True, qk_norm=True)
    for fill in (float("nan"), 7.0):  # whatever memory to_empty hands out
        m = build_model(args, device="meta")
        m.to_empty(device="cpu")
        floats = [t for t in itertools.chain(m.parameters(), m.buffers()) if t.is_floating_point()]
        for t in floats:
            t.data.fill_(fill)
        m.init_weights()
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            assert torch.isfinite(t.float()).all(), name
            if t.is_floating_point() and t.numel() > 1:
                assert not bool((t == fill).all()), name
    biases = {n: p for n, p in m.named_parameters() if n.endswith("bias")}
    assert biases and all(bool((p == 0).all()) for p in biases.values())


def test_memory_layer_output_matches_manual_computation():
    torch.manual_seed(0)
    mem = ProductKeyMemory(dim=16, n_keys=6, heads=2, knn=3, k_dim=8, v_dim=16).double()
    mem.init_weights(ParamInit(0), out_std=0.1)
    values = ValueTable(36, 16).double()
    values.init_weights(ParamInit(1))
    x = torch.randn(1, 5, 16, dtype=torch.float64)
    out = mem(x, values)
    # manual: brute force over all 36 composed keys per head
    xf = x.reshape(5, 16)
    q = mem.query(xf).view(5, 2, 2, 4)
    bag = torch.zeros(5, 16, dtype=torch.float64)
    for h in range(2):
        s1 = q[:, h, 0] @ mem.keys[h, 0].T  # (5, 6)
        s2 = q[:, h, 1] @ mem.keys[h, 1].T
        sc, ix = brute_force_topk(s1, s2, 3)
        bag += (sc.softmax(-1)[:, :, None] * values.weight[ix]).sum(1)
    ref = mem.out(bag * torch.nn.functional.silu(mem.gate(xf)))
    torch.testing.assert_close(out.reshape(5, 16), ref)


PEAK_RSS_SCRIPT = """
import resource, sys, torch
from lingua_mem.kernels import embedding_bag
naive = sys.argv[1] == "naive"
n, m, rows, d = 8192, 128, 65536, 256  # an (n, m, d) fp32 tensor would be 1 GiB
torch.manual_seed(0)
table = torch.randn(rows, d, requires_grad=True)
indices = torch.randint(0, rows, (n, m))
weights = torch.rand(n, m, requires_grad=True)
grad_out = torch.randn(n, d)
table.grad = torch.zeros_like(table)  # the table gradient itself is not the point
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if naive:
    out = (weights[:, :, None] * table[indices]).sum(1)
else:
    out = embedding_bag(indices, weights, table)
out.backward(grad_out)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)  # MiB
"""


def test_embedding_bag_never_builds_the_gathered_tensor():
    import subprocess
    import sys
    from pathlib import Path

    def peak_growth_mib(mode):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, mode], capture_output=True,
                              text=True, timeout=300, cwd=Path(__file__).resolve().parents[1])
        assert proc.returncode == 0, proc.stderr[-2000:]
        return int(proc.stdout.strip())

    assert peak_growth_mib("bag") < 300  # a 1 GiB (n, m, d) tensor would show
    assert peak_growth_mib("naive") > 1000  # the measurement does see such a tensor


def test_rope_attention_depends_only_on_relative_position():
    from lingua_mem.model.llama import apply_rope, rope_tables

    cos, sin = rope_tables(head_dim=8, max_seq_len=64, theta=500.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):  # q at position i, k at position j
        return (apply_rope(q, cos[i:i + 1], sin[i:i + 1]) * apply_rope(k, cos[j:j + 1], sin[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    assert not torch.allclose(score(5, 2), score(5, 3))
    # theta is used: another theta gives other rotations
    cos2, _ = rope_tables(head_dim=8, max_seq_len=64, theta=10000.0)
    assert not torch.allclose(cos, cos2)
    torch.testing.assert_close(cos[:, :4], cos[:, 4:])  # half-split layout
    torch.testing.assert_close(cos[3, 1], torch.tensor(3 * 500.0 ** (-2 / 8)).cos().float())


def test_gqa_equals_attention_with_repeated_kv_heads():
    from lingua_mem.model.llama import Attention, rope_tables

    torch.manual_seed(0)
    gqa_cfg = model_args(ModelConfig(dim=32, n_heads=4, n_kv_heads=2), MemoryConfig())
    mha_cfg = model_args(ModelConfig(dim=32, n_heads=4, n_kv_heads=4), MemoryConfig())
    gqa, mha = Attention(gqa_cfg), Attention(mha_cfg)
    gqa.init_weights(ParamInit(0), 0.1, 0.1)
    with torch.no_grad():
        mha.wq.weight.copy_(gqa.wq.weight)
        mha.wo.weight.copy_(gqa.wo.weight)
        for name in ("wk", "wv"):  # kv head g serves query heads 2g and 2g+1
            w = getattr(gqa, name).weight.view(2, 8, 32)
            getattr(mha, name).weight.copy_(w.repeat_interleave(2, dim=0).reshape(32, 32))
    rope = rope_tables(8, 16, 10000.0)
    x = torch.randn(2, 16, 32)
    torch.testing.assert_close(gqa(x, rope), mha(x, rope))
    # causal: the first position's output does not depend on later tokens
    y = x.clone()
    y[:, 1:] = torch.randn(2, 15, 32)
    torch.testing.assert_close(gqa(x, rope)[:, 0], gqa(y, rope)[:, 0])


def test_tied_embeddings_share_one_matrix():
    from lingua_mem.config import OptimConfig
    from lingua_mem.optim import build_optimizer

    model = build_model(dataclasses.replace(small_cfg(), tie_embeddings=True))
    assert model.output is None
    tokens = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        logits = model(tokens)
        hidden = model.tok_embeddings(tokens)
        for block in model.layers:
            key = model.value_key.get(block.layer_id)
            table = model.values[key] if key else None
            hidden = block(hidden, (model.rope_cos[:8], model.rope_sin[:8]), table)
        torch.testing.assert_close(logits, model.norm(hidden) @ model.tok_embeddings.weight.T)
    names = [n for n, _ in model.named_parameters()]
    assert "tok_embeddings.weight" in names and not any(n.startswith("output") for n in names)
    opt = build_optimizer(model, OptimConfig())
    n_in_groups = sum(len(g["params"]) for g in opt.param_groups)
    assert n_in_groups == len(list(model.parameters()))


@pytest.mark.parametrize("options", [
    {"swilu": False},  # vanilla PKM, v_dim == dim: the bag itself
    {"swilu": False, "v_dim": 8},  # vanilla, projected
    {"qk_norm": True},
    {"v_dim": 24},
])
def test_memory_layer_variants_match_manual_computation(options):
    torch.manual_seed(1)
    v_dim = options.get("v_dim", 16)
    mem = ProductKeyMemory(dim=16, n_keys=6, heads=2, knn=3, k_dim=8, v_dim=v_dim,
                           swilu=options.get("swilu", True), qk_norm=options.get("qk_norm", False)).double()
    mem.init_weights(ParamInit(0), out_std=0.1)
    if mem.q_norm is not None:  # non-trivial norm weights
        torch.nn.init.uniform_(mem.q_norm.weight, 0.5, 1.5)
        torch.nn.init.uniform_(mem.k_norm.weight, 0.5, 1.5)
    values = ValueTable(36, v_dim).double()
    values.init_weights(ParamInit(1))
    xf = torch.randn(5, 16, dtype=torch.float64)
    q = mem.query(xf).view(5, 2, 2, 4)
    keys = mem.keys
    if mem.q_norm is not None:
        rms = lambda t, w: t / t.pow(2).mean(-1, keepdim=True).add(1e-5).sqrt() * w  # noqa: E731
        q = rms(q, mem.q_norm.weight) / 2.0  # scaled by half**-0.5 = 1/2
        keys = rms(keys, mem.k_norm.weight)
    bag = torch.zeros(5, v_dim, dtype=torch.float64)
    for h in range(2):
        sc, ix = brute_force_topk(q[:, h, 0] @ keys[h, 0].T, q[:, h, 1] @ keys[h, 1].T, 3)
        bag += (sc.softmax(-1)[:, :, None] * values.weight[ix]).sum(1)
    if mem.gate is not None:
        bag = bag * torch.nn.functional.silu(mem.gate(xf))
    ref = mem.out(bag) if mem.out is not None else bag
    assert (mem.out is None) == (options.get("swilu", True) is False and v_dim == 16)
    torch.testing.assert_close(mem(xf.view(1, 5, 16), values).view(5, 16), ref)


def test_key_search_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    mem = ProductKeyMemory(dim=16, n_keys=64, heads=2, knn=8, k_dim=8, v_dim=16)
    mem.init_weights(ParamInit(0), out_std=0.1)
    with torch.no_grad():  # an exact bf16 query: identity projection of small integers
        mem.query.weight.copy_(torch.eye(16))
        mem.query.bias.zero_()
    x = torch.randint(-4, 5, (300, 16)).float()
    ref_idx, ref_w = mem.lookup(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, w = mem.lookup(x)
    assert w.dtype == torch.float32
    assert torch.equal(idx, ref_idx)
    torch.testing.assert_close(w, ref_w, rtol=1e-6, atol=1e-7)


def test_the_memory_layer_benchmark_runs_on_the_cpu(tmp_path):
    # benchmarks/gpu_smoke.sh runs it first on a lent GPU: a broken call there costs device time
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "memory_layer.json"
    args = ["--device", "cpu", "--shapes", "debug", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    proc = subprocess.run([sys.executable, "benchmarks/memory_layer.py", *args], text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[1], capture_output=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["n_values"] == row["n_keys"] ** 2 and row["tokens"] > 0
    assert all(row[k] > 0 for k in ("ffn_ms", "memory_ms", "lookup_ms", "bag_ms"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_chunked_loss_equals_the_loss_of_the_whole_logits_without_them(monkeypatch, dtype):
    monkeypatch.setattr(loss_module, "_CHUNK_ELEMENTS", 7 * 61)  # 7 tokens a chunk: 4 ragged chunks
    torch.manual_seed(0)
    h = torch.randn(3, 9, 16, dtype=dtype, requires_grad=True)
    weight = (torch.randn(61, 16, dtype=dtype) * 0.3).requires_grad_()
    targets = torch.randint(0, 61, (3, 9))
    targets[0, :4] = loss_module.IGNORE  # not scored
    for reduction in ("mean", "sum"):
        with LargestOutput() as seen:
            chunked = loss_module.linear_cross_entropy(h, weight, targets, reduction)
            (chunked * 1.7).backward()
        assert seen.largest < 27 * 61  # never the (tokens, vocab) logits
        got = h.grad, weight.grad
        h.grad = weight.grad = None
        whole = loss_module.cross_entropy(torch.nn.functional.linear(h, weight), targets, reduction)
        (whole * 1.7).backward()
        assert chunked.dtype == torch.float32
        torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=0)
        # relative error in norm; fp32: 1e-5 (the softmax's rounding); bf16: the logits' gradient is
        # rounded to bf16 either way, so an element can land one bf16 step apart
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        for mine, theirs in zip(got, (h.grad, weight.grad), strict=True):
            assert ((mine.float() - theirs.float()).norm() / theirs.float().norm()).item() < tol
        h.grad = weight.grad = None
        with torch.no_grad():  # validation: the loss alone, chunked
            torch.testing.assert_close(loss_module.linear_cross_entropy(h, weight, targets, reduction), whole)


@pytest.mark.parametrize("tied", [False, True])
def test_the_models_loss_is_the_cross_entropy_of_its_logits(tied):
    shape = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=61, max_seq_len=16,
                        tie_embeddings=tied)
    model = build_model(model_args(shape, MemoryConfig(layers=[1], n_keys=8, heads=2, knn=4)), seed=2)
    tokens = torch.randint(0, shape.vocab_size, (2, 12))
    loss = model(tokens[:, :-1], targets=tokens[:, 1:])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    reference = loss_module.cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)
