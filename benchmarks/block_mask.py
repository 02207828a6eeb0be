"""doc_causal's flex_attention BlockMask, built from the documents' extent per block
(model.llama.document_block_mask) against create_block_mask over every (query, key) pair,
side by side on the same doc_ids.

    python benchmarks/block_mask.py [--shapes 4x2048,8x4096] [--doc-len 512] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.nn.attention.flex_attention import create_block_mask

from lingua_mem.model.llama import document_block_mask


def _best_of(fn, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def compare(b: int, t: int, doc_len: int, device: str) -> tuple[float, float, bool]:
    """(create_block_mask seconds, from-extents seconds, same blocks) for B x T tokens."""
    gen = torch.Generator().manual_seed(0)
    starts = torch.rand(b, t, generator=gen) < 1 / doc_len
    starts[:, 0] = True
    doc_ids = (starts.cumsum(1) - 1).to(device)

    def same_document(bi, h, qi, ki):
        return (ki <= qi) & (doc_ids[bi, qi] == doc_ids[bi, ki])

    def every_pair():
        return create_block_mask(same_document, b, None, t, t, device=device)

    def extents():
        return document_block_mask(doc_ids)

    same = torch.equal(every_pair().to_dense(), extents().to_dense())
    return _best_of(every_pair), _best_of(extents), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x2048,8x4096", help="comma-separated BxT")
    parser.add_argument("--doc-len", type=int, default=512, help="mean document length (tokens)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    print(f"{'B x T':>10} {'create_block_mask s':>20} {'from extents s':>15} {'speed-up':>9}  same")
    for shape in args.shapes.split(","):
        b, t = (int(x) for x in shape.split("x"))
        every_pair, extents, same = compare(b, t, args.doc_len, args.device)
        print(f"{shape:>10} {every_pair:>20.4f} {extents:>15.4f} {every_pair / extents:>8.0f}x  {same}")


if __name__ == "__main__":
    main()
