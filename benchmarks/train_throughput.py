"""Training throughput of dense and memory models on one device, side by side in one run.

    python benchmarks/train_throughput.py [--sizes 134m,373m,1.3b] [--compile off,on]
        [--kernels torch,triton] [--steps 30] [--out dumps/throughput] [--json rows.json]
        [--set key=value ...]

Each case is `python train.py config=configs/{dense,memory}_<size>.yaml` in its own
process (bf16, the byte tokenizer on the generated facts corpus, no checkpoints), run for
--steps steps and read from its metrics.jsonl: tokens/s, MFU and peak GPU memory of the
last logging window (the first steps, compilation included, are left out). The table
gives each memory case next to its dense base: the issue's target is the memory model at
>= 0.90 of the dense model's tokens/s; torchtitan publishes 33-39% MFU for Llama 8B on
H100. Dense models have no value bag, so they run once per compile setting.

On the CPU use tiny cases, e.g. `--sizes 134m --steps 4 --set data.seq_len=128
data.batch_size=1 memory.n_keys=128 --kernels torch`: a check of the script only.
Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_case(size: str, model: str, compile_: str, kernel: str, a) -> dict:
    name = f"{model}_{size}_compile-{compile_}" + (f"_{kernel}" if model == "memory" else "")
    dump = Path(a.out) / name
    log_every = max(1, a.steps // 3)
    cmd = [sys.executable, "train.py", f"config=configs/{model}_{size}.yaml", f"dump_dir={dump}",
           f"steps={a.steps}", f"log_every={log_every}", "checkpoint.every=0", "data.tokenizer.name=bytes",
           "distributed.compute_dtype=bf16", f"distributed.compile={'true' if compile_ == 'on' else 'false'}",
           "logging.console=false", *a.set]
    if model == "memory":
        cmd.append(f"memory.kernel={kernel}")
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    row = {"case": name, "size": size, "model": model, "compile": compile_,
           "kernel": kernel if model == "memory" else "-", "returncode": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return row
    last = [json.loads(x) for x in (dump / "metrics.jsonl").read_text().splitlines()][-1]
    row.update(tokens_per_s=last["tokens_per_s"], mfu=last.get("mfu"), peak_gib=last.get("peak_memory_gib"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="134m,373m,1.3b")
    parser.add_argument("--compile", default="off,on")
    parser.add_argument("--kernels", default="torch,triton")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", default="dumps/throughput")
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides for every case")
    parser.add_argument("--json")
    a = parser.parse_args()
    rows = []
    print(f"{'case':<40} {'tok/s':>10} {'mfu':>6} {'peak GiB':>9} {'vs dense':>9}", flush=True)
    for size in a.sizes.split(","):
        for compile_ in a.compile.split(","):
            dense = run_case(size, "dense", compile_, "-", a)
            rows.append(dense)
            cases = [dense] + [run_case(size, "memory", compile_, k, a) for k in a.kernels.split(",")]
            rows += cases[1:]
            for r in cases:
                if r["returncode"] != 0:
                    print(f"{r['case']:<40} FAILED: {r['error']}", flush=True)
                    continue
                base = dense.get("tokens_per_s", float("nan"))
                ratio = r["tokens_per_s"] / base
                r["vs_dense"] = ratio
                mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
                peak = f"{r['peak_gib']:.1f}" if r.get("peak_gib") is not None else "-"
                print(f"{r['case']:<40} {r['tokens_per_s']:>10,.0f} {mfu:>6} {peak:>9} {ratio:>9.2f}",
                      flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
