"""Document-masked attention (model.attention=doc_causal): a packed row of documents scores
each document as it would alone, forward and backward; causal models ignore doc_ids; the
trainer feeds the loader's doc_ids. Under FSDP and memory parallelism: tests/test_parallel.py
(the doc_ids layout)."""

import json

import pytest
import torch

from lingua_mem.config import ConfigError, MemoryConfig, ModelConfig, load_config, model_args
from lingua_mem.data.loader import document_ids
from lingua_mem.model.llama import (
    BlockDiagonalMask,
    build_model,
    choose_attention,
    document_block_mask,
    document_lengths,
    document_mask,
    resolve_attention,
    xformers_problem,
)
from lingua_mem.train.trainer import train

BOS = 256
DOCS = [[BOS, 5, 6, 7, 8], [BOS, 9, 10], [BOS, 11, 12, 13, 14, 15, 16], [BOS, 3]]


def tiny(attention: str, impl: str = "auto"):
    args = model_args(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64, multiple_of=32,
                                  attention=attention),
                      MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=32))
    return build_model(args, seed=1, attention_impl=impl)


def test_a_packed_row_scores_each_document_as_alone_forward_and_backward():
    model = tiny("doc_causal", "sdpa")
    row = torch.tensor([sum(DOCS, [])])  # (1, 17)
    weights = torch.randn(row.shape[1], 258, generator=torch.Generator().manual_seed(0))
    packed = model(row, doc_ids=document_ids(row, BOS))[0]  # (T, V)
    (packed * weights).sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    alone = torch.cat([model(torch.tensor([d]))[0] for d in DOCS])  # each document from position 0
    (alone * weights).sum().backward()
    torch.testing.assert_close(packed, alone, rtol=1e-5, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-4, msg=name)  # of ~100
    plain = model(row)[0]  # causal across documents: later documents see earlier ones
    assert not torch.allclose(plain[5:], alone[5:], atol=1e-3)


def test_compiled_flex_stays_compiled_where_the_evaluator_forces_eager_mode():
    # under distributed.compile the evaluator runs the blocks eagerly (set_stance force_eager);
    # compiled flex (CUDA's) must still run compiled: eager flex builds the whole score matrix
    # and says so in a warning. Compiled here by Inductor's CPU template, forward only.
    import warnings

    from torch._dynamo.utils import counters

    from lingua_mem.model.llama import document_block_mask, flex_attend

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 128, 16, generator=g) for _ in range(3))
    doc_ids = torch.zeros(1, 128, dtype=torch.long)
    doc_ids[:, 50:] = 1
    mask = document_block_mask(doc_ids)
    graphs = counters["stats"]["unique_graphs"]
    eager = torch.compiler.set_stance("force_eager")
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught, eager:
        warnings.simplefilter("always")
        got = flex_attend(q, k, v, mask, False, compiled=True)
    assert counters["stats"]["unique_graphs"] == graphs + 1
    assert not [w for w in caught if "unfused" in str(w.message)]
    with torch.no_grad(), pytest.warns(UserWarning, match="unfused"):  # the eager reference
        expected = flex_attend(q, k, v, mask, False, compiled=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore:.*flex_attention.*:UserWarning")  # eager (unfused) on purpose
def test_flex_attention_with_a_document_block_mask_equals_sdpa():
    # the CUDA path (compiled there); on the CPU flex_attention runs eagerly, forward only
    rows = torch.tensor([sum(DOCS, []) + [BOS, 1, 2], [BOS, *range(40, 59)]])  # (2, 20), other documents
    doc_ids = document_ids(rows, BOS)
    with torch.no_grad():
        sdpa = tiny("doc_causal", "sdpa")(rows, doc_ids=doc_ids)
        flex = tiny("doc_causal", "flex")(rows, doc_ids=doc_ids)
    torch.testing.assert_close(flex, sdpa, rtol=1e-5, atol=1e-5)


def test_document_lengths_run_row_after_row():
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2], [0, 1, 1, 1, 1, 1]])
    assert document_lengths(doc_ids) == [3, 2, 1, 1, 5]


def test_xformers_block_diagonal_attention_equals_sdpa_forward_and_backward():
    # the batch as one sequence of B*T tokens with one causal block per document, through
    # xformers' own BlockDiagonalCausalMask; on the CPU its twin (the bias materialised)
    # stands in for memory_efficient_attention, which has no CPU kernel
    pytest.importorskip("xformers.ops.fmha")
    rows = torch.tensor([sum(DOCS, []) + [BOS, 1, 2], [BOS, *range(40, 59)]])  # (2, 20)
    doc_ids = document_ids(rows, BOS)
    mask = document_mask(doc_ids, "xformers")
    assert isinstance(mask, BlockDiagonalMask)
    dense = mask.bias.materialize((40, 40), dtype=torch.float32) == 0  # (B*T, B*T)
    bool_mask = document_mask(doc_ids, "sdpa")[:, 0]  # (B, T, T)
    assert torch.equal(dense, torch.block_diag(*bool_mask))
    weights = torch.randn(2, 20, 258, generator=torch.Generator().manual_seed(0))
    grads = {}
    for impl in ("sdpa", "xformers"):
        model = tiny("doc_causal", impl)  # n_kv_heads 2 of 4 heads: grouped-query
        logits = model(rows, doc_ids=doc_ids)
        (logits * weights).sum().backward()
        grads[impl] = (logits.detach(), {n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(grads["xformers"][0], grads["sdpa"][0], rtol=1e-5, atol=1e-5)
    for name, grad in grads["sdpa"][1].items():
        torch.testing.assert_close(grads["xformers"][1][name], grad, rtol=1e-4, atol=1e-4, msg=name)


def test_an_unknown_attention_impl_is_one_line_naming_the_key():
    with pytest.raises(ConfigError, match="model.attention_impl"):
        load_config(["model.attention_impl=flash"])


def test_a_causal_model_ignores_doc_ids():
    model = tiny("causal")
    row = torch.tensor([sum(DOCS, [])])
    with torch.no_grad():
        assert torch.equal(model(row, doc_ids=document_ids(row, BOS)), model(row))


def test_the_trainer_attends_within_documents_by_default(tmp_path):
    common = ["config=configs/debug.yaml", "model.dim=64", "model.n_layers=2", "model.n_heads=4",
              "memory.layers=[1]", "memory.n_keys=8", "memory.heads=2", "memory.knn=4", "data.seq_len=256",
              "data.batch_size=2", "data.facts.people=20", "steps=2", "log_every=1", "checkpoint.every=0",
              "logging.console=false"]
    assert load_config(common).model.attention == "doc_causal"
    losses = {}
    for attention in ("doc_causal", "causal"):
        train(load_config([*common, f"dump_dir={tmp_path / attention}", f"model.attention={attention}"]))
        rows = (tmp_path / attention / "metrics.jsonl").read_text().splitlines()
        losses[attention] = [json.loads(r)["loss"] for r in rows]
    # the first step's weights are the same: only the attention mask differs (a facts document
    # is ~200 bytes, so each 256-token row holds a document boundary)
    assert losses["doc_causal"][0] != losses["causal"][0]
    assert losses["doc_causal"] == pytest.approx(losses["causal"], rel=0.05)


def test_an_xformers_that_cannot_run_falls_back_to_flex_with_one_warning_or_is_one_error():
    # the real probe: xformers has no CPU kernels, so the tiny call fails as an xformers built
    # for another torch fails on a GPU
    pytest.importorskip("xformers.ops.fmha")
    problem = xformers_problem("cpu")
    assert problem is not None and problem.startswith("xformers cannot run on cpu: ") and "\n" not in problem
    fallback = "model.attention_impl=auto: xformers cannot run on cpu: .*; using flex_attention"
    with pytest.warns(UserWarning, match=fallback):
        assert choose_attention("auto", "cuda", problem) == "flex"
    with pytest.raises(ConfigError, match="^model.attention_impl: xformers cannot run on cpu: [^\n]*$"):
        choose_attention("xformers", "cuda", problem)
    assert choose_attention("auto", "cuda", None) == "xformers"
    assert choose_attention("auto", "cpu", problem) == "sdpa"  # the CPU never picks xformers itself
    assert resolve_attention("xformers", "cpu") == "xformers"  # its CPU twin needs only the package


@pytest.mark.parametrize("t,block", [(64, 16), (70, 16), (300, 128)])
def test_the_document_block_mask_from_the_blocks_extent_equals_create_block_mask(t, block):
    from torch.nn.attention.flex_attention import create_block_mask

    torch.manual_seed(t)
    starts = torch.rand(3, t) < 0.05
    starts[:, 0] = True
    starts[2, 1:] = False  # one row a single document: full blocks
    doc_ids = starts.cumsum(1) - 1

    def same_document(bi, h, qi, ki):
        return (ki <= qi) & (doc_ids[bi, qi] == doc_ids[bi, ki])

    want = create_block_mask(same_document, 3, None, t, t, device="cpu", BLOCK_SIZE=block)  # every (q, k)
    got = document_block_mask(doc_ids, block)
    assert torch.equal(got.to_dense(), want.to_dense())  # the blocks read
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)  # partly masked
    assert torch.equal(got.full_kv_num_blocks, want.full_kv_num_blocks)  # no mask evaluated
    n = int(got.full_kv_num_blocks.max())
    assert n > 0 and torch.equal(got.full_kv_indices[..., :n], want.full_kv_indices[..., :n])
