"""The fixes only a GPU can show, checked on one: a line each, exit 1 when one fails.

    python benchmarks/gpu_checks.py [--device cuda]

1. triton_probe     kernels.triton_problem on the device: the one launch a default run makes
                    before it picks the Triton bag and compiled flex (a C compiler, Python.h)
2. matmul_api       after prepare_cuda, both legacy readings of the matmul precision answer
                    (allow_tf32, get_float32_matmul_precision: what Inductor, transformers and
                    lm-eval read) and TF32 is on
3. key_search_ieee  with TF32 on, the key search's scores (lingua_mem::key_scores) equal an
                    IEEE fp32 einsum bit for bit (and say whether TF32 would have changed them)
4. rng_per_device   the checkpoint's CUDA generator state is this device's alone, restores a
                    draw exactly, and an older state of every device restores on a node with
                    fewer GPUs
5. rows_backward    a routed table's row backward (Triton, a program per segment of one row's
                    reads) equals the torch path at the 134m table's width, hot rows included
6. async_staging    an async checkpoint started right after an update holds the updated
                    weights (the staging waits for the compute stream)
7. flex_checkpointed eager activation checkpointing with compiled flex runs attention once
                    (left out of the checkpoints), the FFN halves again in backward

On the CPU (--device cpu) the checks that need CUDA say so and pass; the rest run, Triton
in its interpreter when TRITON_INTERPRET=1. Part of benchmarks/gpu_smoke.sh.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def triton_probe(device: str) -> str:
    from lingua_mem.kernels import triton_problem

    problem = triton_problem(device)
    if problem is not None:
        raise AssertionError(problem)
    return "Triton compiles and launches its kernels here"


def matmul_api(device: str) -> str:
    from lingua_mem.parallel.runtime import prepare_cuda

    prepare_cuda("cuda", True, {})
    assert torch.get_float32_matmul_precision() == "high" and torch.backends.cuda.matmul.allow_tf32
    return "allow_tf32 and get_float32_matmul_precision() read after prepare_cuda"


def key_search_ieee(device: str) -> str:
    from lingua_mem.memory.product_topk import ieee_fp32, key_scores

    if device != "cuda":
        return "skipped: TF32 exists on CUDA only"
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(4096, 4, 2, 192, device=device, generator=g)
    keys = torch.randn(4, 2, 1024, 192, device=device, generator=g)
    torch.set_float32_matmul_precision("high")
    got = key_scores(q, keys)
    tf32 = torch.einsum("nhpd,hpkd->nhpk", q, keys)
    with ieee_fp32():
        ieee = torch.einsum("nhpd,hpkd->nhpk", q, keys)
    assert torch.equal(got, ieee), "the key scores differ from IEEE fp32"
    return f"equal to IEEE fp32 under TF32 (TF32 would change {(tf32 != ieee).float().mean():.0%} of them)"


def rng_per_device(device: str) -> str:
    from lingua_mem.checkpoint.checkpointer import _rng_state, _set_rng_state

    if device != "cuda":
        return "skipped: no CUDA generator"
    torch.cuda.init()
    state = _rng_state()
    assert "cuda" not in state and state["cuda_device"].numel() > 0
    first = torch.rand(4, device=device)
    _set_rng_state(state)
    assert torch.equal(torch.rand(4, device=device), first)
    older = dict(state, cuda=[state.pop("cuda_device")])  # an older checkpoint, one device saved
    _set_rng_state(older)
    assert torch.equal(torch.rand(4, device=device), first)
    return "one device's state saved and restored"


def rows_backward(device: str) -> str:
    from lingua_mem.kernels.embedding_bag import bag_rows_backward
    from lingua_mem.parallel.memory_parallel import distinct_rows

    if device != "cuda":
        return "skipped: tests/test_kernels.py runs it in Triton's interpreter"
    g = torch.Generator(device=device).manual_seed(0)
    rows, d, tokens, bag = 1 << 16, 768, 4096, 128
    indices = torch.randint(0, rows, (tokens, bag), device=device, generator=g)
    indices[:, 0] = 7  # a hot row: every token reads it
    weights = torch.rand(tokens, bag, device=device, generator=g)
    table = torch.randn(rows, d, device=device, generator=g)
    grad_out = torch.randn(tokens, d, device=device, generator=g)
    slot_of_row = torch.arange(rows, dtype=torch.int32, device=device)
    out = {}
    for kernel in ("torch", "triton"):
        plan = distinct_rows(indices, rows, segmented=kernel == "triton")
        grad_rows = torch.zeros(rows, d, device=device)
        grad_w = bag_rows_backward(grad_out, indices, weights, table, *plan, slot_of_row, grad_rows, 1.0,
                                   kernel)
        out[kernel] = (grad_w, grad_rows)
    for a, b in zip(out["torch"], out["triton"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)
    return "Triton equals the torch path (a hot row of 4,096 reads included)"


def async_staging(device: str) -> str:
    from lingua_mem.checkpoint.checkpointer import wait_for_device

    if device != "cuda":
        return "skipped: no device stream to wait for"
    weight = torch.nn.Linear(4096, 4096, device=device)
    with torch.no_grad():
        for _ in range(50):  # queued work the host does not wait for
            weight.weight.mul_(1.0001)
        expected = weight.weight.clone()
    wait_for_device(weight)
    with tempfile.TemporaryDirectory() as tmp:
        import torch.distributed.checkpoint as dcp

        future = dcp.async_save({"w": weight.weight}, checkpoint_id=tmp, no_dist=True)
        future.result()
        loaded = {"w": torch.empty_like(weight.weight)}
        dcp.load(loaded, checkpoint_id=tmp, no_dist=True)
    assert torch.equal(loaded["w"], expected)
    return "the async save holds the weights the queued update wrote"


def flex_checkpointed(device: str) -> str:
    """Eager full activation checkpointing of a doc_causal model whose attention is compiled
    flex: attention runs once a step (left out of the checkpoints), the FFN halves twice."""
    from lingua_mem.config import DistributedConfig, MemoryConfig, ModelConfig, model_args
    from lingua_mem.data.loader import document_ids
    from lingua_mem.model.llama import build_model
    from lingua_mem.parallel import init_distributed, parallelize
    from lingua_mem.parallel.parallelize import attention_outside_checkpoints

    if device != "cuda":
        return "skipped: flex runs compiled on CUDA only"
    model = build_model(model_args(ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                                               max_seq_len=256, attention_impl="flex"),
                                   MemoryConfig(layers=[1], n_keys=16, heads=2, knn=4, k_dim=32)),
                        device, attention_impl="flex")
    cfg = DistributedConfig(activation_checkpointing="full")
    assert attention_outside_checkpoints(model, cfg, "cuda")
    meshes = init_distributed(cfg, "cuda")
    try:
        parallelize(model, meshes, cfg)
        calls = {"attention": 0, "ffn": 0}
        for block in model.layers:
            for name, module in (("attention", block.attention), ("ffn", block.feed_forward)):
                module.register_forward_pre_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        tokens = torch.randint(2, 64, (2, 256), device=device)
        tokens[:, ::50] = 1  # documents of 50 tokens
        model(tokens, doc_ids=document_ids(tokens, 1)).float().square().mean().backward()
    finally:
        meshes.close()
    assert calls == {"attention": 2, "ffn": 4}, calls
    return "attention ran once in forward and backward, the FFN halves again in backward"


CHECKS = (triton_probe, matmul_api, key_search_ieee, rng_per_device, rows_backward, async_staging,
          flex_checkpointed)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    failed = 0
    for check in CHECKS:
        before = torch.get_float32_matmul_precision()
        try:
            print(f"{check.__name__}: ok: {check(a.device)}", flush=True)
        except Exception as exc:  # noqa: BLE001 - each check's outcome is a line
            failed += 1
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
            print(f"{check.__name__}: FAILED: {type(exc).__name__}: {first}", flush=True)
        finally:
            torch.set_float32_matmul_precision(before)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
