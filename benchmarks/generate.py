"""Generation speed with and without the KV cache, side by side in one run.

    python benchmarks/generate.py [--config configs/debug.yaml] [--batch 8] [--prompt 32] [--new 128]
        [--device cpu|cuda] [--json rows.json]

The model of the config (random weights: speed does not depend on them; EOS is
never taken, so every sequence generates --new tokens) generates greedily for a
batch of prompts of --prompt tokens, once with the cache (the prompt once, then
one token per call) and once recomputing the whole sequence every step. Prints
new tokens/s of each and their ratio. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lingua_mem.config import load_config, model_args  # noqa: E402
from lingua_mem.eval.generate import generate_ids  # noqa: E402
from lingua_mem.model.llama import build_model  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/debug.yaml")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    a = parser.parse_args()
    cfg = load_config([f"config={ROOT / a.config}"])
    args = model_args(cfg.model, cfg.memory, cfg.moe)
    model = build_model(args, a.device, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, 256, (a.batch, a.prompt), generator=gen).tolist()
    rows = []
    for cache in (True, False):
        generate_ids(model, prompts, 4, eos_id=-1, use_cache=cache)  # warm-up
        best = float("inf")
        for _ in range(a.repeats):
            if a.device == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            out = generate_ids(model, prompts, a.new, eos_id=-1, use_cache=cache)
            if a.device == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - started)
        n = sum(len(o) for o in out)
        rows.append({"cache": cache, "new_tokens": n, "seconds": best, "tokens_per_s": n / best})
        print(f"cache {'on ' if cache else 'off'}: {n} new tokens in {best:.2f}s = {n / best:,.0f} tokens/s",
              flush=True)
    ratio = rows[0]["tokens_per_s"] / rows[1]["tokens_per_s"]
    print(f"{a.config}, batch {a.batch}, prompt {a.prompt}, {a.new} new tokens, {a.device} "
          f"({torch.get_num_threads()} threads): the cache is {ratio:.1f}x faster")
    if a.json:
        Path(a.json).write_text(json.dumps({"config": a.config, "batch": a.batch, "prompt": a.prompt,
                                            "new": a.new, "device": a.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
