import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lingua_mem.config import load_config
from lingua_mem.stats import config_stats

ROOT = Path(__file__).resolve().parents[1]
NOMINAL = {"134m": 134e6, "373m": 373e6, "720m": 720e6, "1.3b": 1.3e9, "8b": 8e9}


def stats(name, *overrides):
    return config_stats(load_config([f"config={ROOT / 'configs' / name}.yaml", *overrides]))


@pytest.mark.parametrize("size", NOMINAL)
def test_dense_configs_within_5_percent_of_their_name(size):
    s = stats(f"dense_{size}")
    assert abs(s["total_params"] / NOMINAL[size] - 1) < 0.05
    assert s["memory_value_params"] == 0 and s["memory_layers"] == []


@pytest.mark.parametrize("size", NOMINAL)
def test_memory_configs_add_one_shared_table_at_three_layers(size):
    dense, mem = stats(f"dense_{size}"), stats(f"memory_{size}")
    n_keys = 4096 if size == "8b" else 1024
    dim = load_config([f"config={ROOT / 'configs' / f'memory_{size}'}.yaml"]).model.dim
    assert mem["memory_value_params"] == n_keys**2 * dim
    assert len(mem["memory_layers"]) == 3
    # the memory layers replace 3 FFNs: dense parameters stay within 5% of the base
    assert abs(mem["dense_params"] / dense["total_params"] - 1) < 0.05
    # a lookup reads heads * knn rows per layer, not the table
    assert mem["active_params_per_token"] == mem["dense_params"] + 3 * 4 * 32 * dim


def test_memory_373m_placement_and_values():
    s = stats("memory_373m")
    assert s["memory_value_params"] == 1073741824
    assert s["memory_layers"] == [4, 12, 20]
    assert s["n_values"] == 1024**2


def test_flops_count_the_lookup_not_the_table():
    dense, mem = stats("dense_373m"), stats("memory_373m")
    # FLOPs grow by far less than 6x the value table (6.4e9) would add
    assert mem["flops_per_token"] < dense["flops_per_token"]
    cfg = load_config([f"config={ROOT / 'configs' / 'memory_373m.yaml'}"])
    assert cfg.data.seq_len == 4096
    # hand count of the dense model: 6 * matmul weights + 12 * L * d * T
    d, n_layers, vocab, hidden = 1024, 24, 32000, 2816
    matmul = n_layers * (4 * d * d + 3 * d * hidden) + vocab * d
    assert dense["flops_per_token"] == 6 * matmul + 12 * n_layers * d * 4096


def test_stats_cli_on_8b_is_fast_and_prints_one_json_line():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.stats", "config=configs/memory_8b.yaml"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert time.perf_counter() - start < 60
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    s = json.loads(lines[0])
    assert s["memory_value_params"] == 4096**2 * 4096
    assert s["memory_layers"] == [8, 16, 24]


def test_stats_cli_bad_override_exits_2():
    proc = subprocess.run([sys.executable, "-m", "lingua_mem.stats", "config=configs/debug.yaml",
                           "memory.heads=0"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "memory.heads" in proc.stderr


def test_per_layer_tables_count_each_table():
    shared, per_layer = stats("memory_134m"), stats("memory_134m", "memory.shared_values=false")
    assert per_layer["memory_value_params"] == 3 * shared["memory_value_params"]
    assert per_layer["n_values"] == shared["n_values"] == 1024**2
    assert per_layer["dense_params"] == shared["dense_params"]


def test_debug_stats_by_hand():
    s = stats("debug")
    dim, hidden, vocab, seq, kv_dim = 256, 768, 258, 256, 128  # 4 heads, 2 kv heads of 64
    attn = 2 * dim * dim + 2 * dim * kv_dim  # wq, wo; wk, wv
    ffn = 3 * dim * hidden
    query, keys, gate, out = dim * 4 * 128, 4 * 2 * 64 * 64, dim * dim, dim * dim  # heads 4, k_dim 128
    matmul = 4 * attn + 2 * ffn + 2 * (query + keys + gate + out) + vocab * dim
    lookup = 2 * 4 * 16 * dim  # 2 memory layers x heads 4 x knn 16 x v_dim
    assert s["flops_per_token"] == 6 * matmul + 12 * 4 * dim * seq + 6 * lookup
    norms = 2 * 4 * dim + dim  # two RMSNorms per block and the final one
    biases = 2 * (4 * 128 + dim + dim)  # query, gate, out biases of the 2 memory layers
    dense = matmul + vocab * dim + norms + biases  # plus the input embedding
    assert s["dense_params"] == dense
    assert s["memory_value_params"] == 64**2 * dim
    assert s["active_params_per_token"] == dense + lookup
