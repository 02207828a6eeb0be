"""The loss's memory and time: cross entropy of the whole logits (the model's output layer,
then F.cross_entropy in fp32) against loss.linear_cross_entropy (a chunk of tokens at a
time), forward and backward, each in a fresh process (peak resident memory), side by side.

    python benchmarks/loss_memory.py [--tokens 4096] [--vocab 32000] [--dim 1024] [--dtype fp32|bf16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from lingua_mem.model.loss import cross_entropy, linear_cross_entropy


def one(mode: str, tokens: int, vocab: int, dim: int, dtype: str) -> dict:
    """In this process: the loss and its backward once; peak RSS above the inputs, seconds."""
    torch.manual_seed(0)
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32
    h = torch.randn(1, tokens, dim, dtype=dt, requires_grad=True)
    weight = (torch.randn(vocab, dim, dtype=dt) * dim**-0.5).requires_grad_()
    targets = torch.randint(0, vocab, (1, tokens))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if mode == "whole":
        loss = cross_entropy(F.linear(h, weight), targets)
    else:
        loss = linear_cross_entropy(h, weight, targets)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"mode": mode, "loss": loss.item(), "seconds": seconds,
            "peak_above_inputs_gib": (peak - base) / 2**20}  # ru_maxrss is in KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.tokens, args.vocab, args.dim, args.dtype)))
        return
    logits_gib = args.tokens * args.vocab * 4 / 2**30
    print(f"{args.tokens} tokens x {args.vocab} vocab, dim {args.dim}, {args.dtype}: "
          f"fp32 logits {logits_gib:.2f} GiB")
    print(f"{'loss':>8} {'value':>10} {'seconds':>8} {'peak GiB':>9}")
    for mode in ("whole", "chunked"):
        cmd = [sys.executable, __file__, "--one", mode, "--tokens", str(args.tokens),
               "--vocab", str(args.vocab), "--dim", str(args.dim), "--dtype", args.dtype]
        r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        print(f"{mode:>8} {r['loss']:>10.5f} {r['seconds']:>8.2f} {r['peak_above_inputs_gib']:>9.2f}")


if __name__ == "__main__":
    main()
