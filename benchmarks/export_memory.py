"""Peak host memory of consolidate / export-hf against the size of the value table.

Saves a training checkpoint (DCP, one process) of a small dense model with one memory layer
whose table is --table-mib large, then runs, each in a fresh process, and reports the peak
RSS above an idle interpreter's (the same modules imported, nothing read):

  full-load   the whole model read by DCP (read_checkpoint: what consolidation used to do)
  consolidate python -m lingua_mem.checkpoint consolidate --max-shard-size S
  export-hf   python -m lingua_mem.checkpoint export-hf --max-shard-size S

    python benchmarks/export_memory.py --table-mib 1024 --shard 256MB
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lingua_mem.config import MemoryConfig, ModelConfig, TrainConfig, model_args  # noqa: E402
from lingua_mem.model.llama import build_model  # noqa: E402

PROBE = """
import sys, warnings
warnings.filterwarnings("ignore")
what = sys.argv[1]
if what == "full-load":
    from lingua_mem.checkpoint.consolidate import read_checkpoint
    read_checkpoint(sys.argv[2])
elif what == "idle":  # the modules imported, nothing read
    import lingua_mem.checkpoint.consolidate, lingua_mem.checkpoint.hf_export, transformers  # noqa: F401
else:
    from lingua_mem.checkpoint.__main__ import main
    assert main(sys.argv[2:]) == 0
# VmHWM: this process's own peak (ru_maxrss would carry over the forking parent's)
print(next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmHWM")))  # KiB
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--table-mib", type=int, default=512, help="value table size (fp32)")
    ap.add_argument("--shard", default="64MB", help="--max-shard-size of the runs")
    a = ap.parse_args()
    v_dim = 512
    n_keys = max(4, int(math.sqrt(a.table_mib * 2**20 / (4 * v_dim))))
    memory = MemoryConfig(layers=[1], n_keys=n_keys, heads=2, knn=4, k_dim=32, v_dim=v_dim)
    model_cfg = ModelConfig(dim=64, n_layers=2, n_heads=4, vocab_size=258, max_seq_len=64, multiple_of=64)
    table_bytes = n_keys**2 * v_dim * 4
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "checkpoints" / "0000000001"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save({"model": build_model(model_args(model_cfg, memory), seed=0).state_dict()},
                     checkpoint_id=str(ckpt))
        config = OmegaConf.structured(TrainConfig(model=model_cfg, memory=memory))
        OmegaConf.save(config, ckpt / "config.yaml")
        shard = ["--max-shard-size", a.shard]
        runs = {"idle": ["idle"], "full-load": ["full-load", str(ckpt)],
                "consolidate": ["consolidate", "consolidate", str(ckpt), "--out", f"{tmp}/c", *shard],
                "export-hf": ["export-hf", "export-hf", str(ckpt), "--out", f"{tmp}/h", *shard]}
        peak, secs = {}, {}
        for name, argv in runs.items():
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-c", PROBE, *argv], cwd=ROOT, capture_output=True,
                                  text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), check=True)
            secs[name] = time.perf_counter() - t0
            peak[name] = int(proc.stdout.strip().splitlines()[-1]) * 1024
    print(f"value table {n_keys}^2 x {v_dim} fp32 = {table_bytes / 2**20:,.0f} MiB; "
          f"--max-shard-size {a.shard}")
    print("| run | peak RSS MiB | above idle MiB | / table | seconds |")
    print("|---|---|---|---|---|")
    for name in runs:
        above = peak[name] - peak["idle"]
        print(f"| {name} | {peak[name] / 2**20:,.0f} | {above / 2**20:,.0f} | {above / table_bytes:.2f} | "
              f"{secs[name]:.1f} |")


if __name__ == "__main__":
    main()
