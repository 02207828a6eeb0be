#!/usr/bin/env bash
# GPU smoke test: the trainer's GPU paths on one CUDA GPU, within a time budget (10 minutes).
#
#   bash benchmarks/gpu_smoke.sh            # on a machine with a CUDA GPU
#
# 1. configs/debug.yaml on CUDA, one process, bf16 (FSDP2 at degree 1), 20 steps, checkpoints at
#    steps 10 and 20 (DCP from GPU tensors): the loss falls
# 2. the same under `torchrun --nproc-per-node 1`: an NCCL world of 1 (cuda:nccl,cpu:gloo)
# 3. configs/memory_134m.yaml for 10 steps (byte tokenizer, generated facts corpus): tokens/s,
#    MFU and peak GPU memory
# 4. benchmarks/memory_layer.py on CUDA (memory layer vs SwiGLU FFN at debug and 134m shapes)
# 5. eval.py on the debug run's step-20 checkpoint on CUDA (val, facts QA, generation)
# 6. benchmarks/generate.py on CUDA: generation tokens/s with and without the KV cache
# 7. benchmarks/embedding_bag.py on CUDA: the torch path against the Triton kernels (GB/s)
# 8. benchmarks/plan_vs_measured.py: the scale plan's peak memory against max_memory_allocated
# 9. benchmarks/memory_scaling.py: the debug base at 65k, 1M and the largest table the card holds
#    with dense AdamW (4M on an 80 GB H100, 16M from 130 GB), dense AdamW and row-wise Adagrad on
#    the tables: tokens/s and peak memory against the smallest
# 0. first of all, benchmarks/gpu_checks.py: the fixes only a GPU shows (the Triton probe, the
#    matmul precision API, the key search in IEEE fp32 under TF32, per-device RNG state, the
#    routed row backward against the torch path, an async save after an update, eager
#    activation checkpointing with compiled flex running attention once)
# Before the parts: whether a C compiler and Python.h are here (Triton builds its launchers
# with them). Triton's and Inductor's caches, autotuning included, live in $SMOKE_CACHE (kept
# between runs), so only the first process compiles and tunes; each part's limit allows a cold
# one.
# then one summary table, also written to $SMOKE_OUT/figures.txt. Exit 0 when every part ran
# (and the debug losses fell), 1 otherwise. Without CUDA it says so and exits 0. Each part has
# its own time limit, and the limits together fit SMOKE_BUDGET: a part that would start past it
# is skipped (and counts as not run), so the whole script ends within the budget.
#
# Environment:
#   PYTHON          the interpreter (default python3)
#   SMOKE_OUT       output folder (default dumps/gpu_smoke), emptied first
#   SMOKE_DEVICE    cuda (default) | cpu: a rehearsal of the same commands on CPU with tiny
#                   shapes, to check the script itself on a machine without a GPU
#   SMOKE_BUDGET    seconds for the whole script (default 600)
#   SMOKE_CACHE     Triton's and Inductor's cache folder (default dumps/gpu_smoke_cache, kept)
#   SMOKE_WHEELS    a folder of wheels installed (--no-index --no-deps) when a package the
#                   trainer needs is missing, e.g. on a GPU machine without a registry. A GPU
#                   image with torch, numpy, PyYAML, safetensors and sentencepiece lacks only
#                   omegaconf (2.4: pure Python, needs only PyYAML); on a machine with a registry:
#                   pip download --no-deps --only-binary=:all: -d .gpu_wheels 'omegaconf>=2.4'
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${SMOKE_OUT:-dumps/gpu_smoke}
DEVICE=${SMOKE_DEVICE:-cuda}
BUDGET=${SMOKE_BUDGET:-600}
DEADLINE=$((SECONDS + BUDGET - 15))  # the summary's seconds kept back
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CACHE=${SMOKE_CACHE:-dumps/gpu_smoke_cache}
mkdir -p "$CACHE"
export TRITON_CACHE_DIR="$PWD/$CACHE/triton" TORCHINDUCTOR_CACHE_DIR="$PWD/$CACHE/inductor"
export TRITON_CACHE_AUTOTUNING=1  # the kernels' autotuning done once, not in every process

if ! "$PY" -c "import torch" 2>/dev/null; then
  echo "gpu_smoke: $PY cannot import torch; set PYTHON to the interpreter that has it" >&2
  exit 1
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_smoke: no CUDA device here (torch.cuda.is_available() is false); nothing to do"
  exit 0
fi
if ! "$PY" -c "import omegaconf" 2>/dev/null; then
  if [ -n "${SMOKE_WHEELS:-}" ] && ls "$SMOKE_WHEELS"/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps "$SMOKE_WHEELS"/*.whl || exit 1
  else
    echo "gpu_smoke: omegaconf is not installed; pip install -e . or set SMOKE_WHEELS" >&2
    exit 1
  fi
fi

rm -rf "$OUT" && mkdir -p "$OUT"
FIGURES="$OUT/figures.txt"  # the header, each part's outcome and time, the summary table
echo "gpu_smoke: $(date -u +%Y-%m-%dT%H:%MZ), output in $OUT, budget $BUDGET s" | tee "$FIGURES"
"$PY" - <<'PY' | tee -a "$FIGURES"
import os, shutil, sysconfig
from pathlib import Path
import torch
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}")
cc = os.environ.get("CC") or next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
header = Path(sysconfig.get_paths()["include"]) / "Python.h"
print(f"C compiler: {cc or 'none (Triton cannot build its launchers)'}; Python.h: "
      f"{'yes' if header.exists() else 'no, ' + str(header) + ' is missing (Triton cannot build its launchers)'}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"GPU {p.name}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs")
PY

if [ "$DEVICE" = cuda ]; then
  DEBUG=(steps=20 log_every=5 checkpoint.every=10)
  M134=(steps=10 log_every=5 checkpoint.every=0)
  BENCH=(--device cuda)
  EVAL=(eval.max_questions=300)
  GEN=(--device cuda --batch 16 --new 128)
  BAG=(--device cuda --shapes 134m,373m,1.3b)
  PLAN=(--device cuda)
  # the largest table whose dense AdamW (weights, gradient, two moments: 16 bytes a value at
  # v_dim 256) fits the card with room: 16M rows from 130 GB (an H200), 4M below
  LARGEST=$("$PY" -c "import torch; print('16m' if torch.cuda.get_device_properties(0).total_memory > 130 * 2**30 else '4m')")
  SCALING=(--rows "65k,1m,$LARGEST" --value-optimizers adamw,adagrad --steps 10 --set distributed.device=cuda
           distributed.compute_dtype=bf16)
else  # rehearsal: the same commands, shapes small enough for a CPU
  DEBUG=(steps=20 log_every=5 checkpoint.every=10 data.batch_size=4 data.seq_len=64)
  M134=(steps=2 log_every=1 checkpoint.every=0 data.batch_size=1 data.seq_len=128 memory.n_keys=128)
  BENCH=(--device cpu --shapes debug --repeats 2 --warmup 1)
  EVAL=(eval.max_questions=16 eval.max_tokens=2048 eval.generate.max_new_tokens=16)
  GEN=(--device cpu --batch 2 --new 16 --repeats 1)
  BAG=(--device cpu --shapes 134m --rows 4096 --tokens 4 --bag 8 --repeats 1)
  PLAN=(--device cpu --steps 2)
  SCALING=(--rows 4k,65k --value-optimizers adagrad --steps 8 --set data.batch_size=2 data.seq_len=64)
  export TRITON_INTERPRET=1
fi
COMMON=(distributed.device="$DEVICE" distributed.compute_dtype=bf16)
failed=()

run() {  # name, timeout in seconds, command...
  local name=$1 limit=$2
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "== $name: not run (SMOKE_BUDGET=$BUDGET s spent)" | tee -a "$FIGURES"
    failed+=("$name")
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (at most $limit s): $*"
  local start=$SECONDS
  if timeout "$limit" "$@" >"$OUT/$name.log" 2>&1; then
    echo "   ok in $((SECONDS - start)) s"
    echo "$name: ok in $((SECONDS - start)) s" >>"$FIGURES"
  else
    local rc=$?
    echo "$name: FAILED (exit $rc) after $((SECONDS - start)) s" >>"$FIGURES"
    echo "   FAILED (exit $rc) after $((SECONDS - start)) s; the last lines of $OUT/$name.log:"
    tail -n 15 "$OUT/$name.log" | sed 's/^/   | /'
    failed+=("$name")
  fi
}

run gpu_checks 90 "$PY" benchmarks/gpu_checks.py --device "$DEVICE"
run debug 120 "$PY" train.py config=configs/debug.yaml "${COMMON[@]}" "${DEBUG[@]}" dump_dir="$OUT/debug"
# --local-addr: --standalone's rendezvous otherwise binds the hostname, which may not resolve
run debug_torchrun 75 "$PY" -m torch.distributed.run --standalone --local-addr 127.0.0.1 --nproc-per-node 1 \
  train.py config=configs/debug.yaml "${COMMON[@]}" "${DEBUG[@]}" dump_dir="$OUT/debug_torchrun"
run memory_134m 120 "$PY" train.py config=configs/memory_134m.yaml "${COMMON[@]}" "${M134[@]}" \
  data.tokenizer.name=bytes dump_dir="$OUT/memory_134m"
run memory_layer 90 "$PY" benchmarks/memory_layer.py "${BENCH[@]}" --json "$OUT/memory_layer.json"
run eval 60 "$PY" eval.py ckpt="$OUT/debug/checkpoints/0000000020" distributed.device="$DEVICE" "${EVAL[@]}"
run generate 45 "$PY" benchmarks/generate.py "${GEN[@]}" --json "$OUT/generate.json"
if "$PY" -c "import triton" 2>/dev/null; then
  run embedding_bag 90 "$PY" benchmarks/embedding_bag.py "${BAG[@]}" --json "$OUT/embedding_bag.json"
else
  echo "== embedding_bag: skipped (triton is not installed)"
fi
run plan_vs_measured 60 "$PY" benchmarks/plan_vs_measured.py "${PLAN[@]}" --out "$OUT/plan_vs_measured.json"
run memory_scaling 120 "$PY" benchmarks/memory_scaling.py "${SCALING[@]}" --out "$OUT/memory_scaling" \
  --json "$OUT/memory_scaling.json"

"$PY" - "$OUT" <<'PY' | tee -a "$FIGURES" || failed+=(summary)
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
bad = False
checks = out / "gpu_checks.log"
if checks.exists():
    print(checks.read_text().strip())
print(f"\n{'run':<16} {'steps':>5} {'loss first -> last':>20} {'tok/s':>10} {'mfu':>6} {'peak GiB':>9}")
for name in ("debug", "debug_torchrun", "memory_134m"):
    path = out / name / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    if not rows:
        print(f"{name:<16} no metrics")
        bad = True
        continue
    first, last = rows[0], rows[-1]
    mfu = f"{last['mfu']:.1%}" if "mfu" in last else "-"
    peak = f"{last['peak_memory_gib']:.1f}" if "peak_memory_gib" in last else "-"
    print(f"{name:<16} {last['step']:>5} {first['loss']:>9.3f} -> {last['loss']:<8.3f} "
          f"{last['tokens_per_s']:>10,.0f} {mfu:>6} {peak:>9}")
    if name.startswith("debug") and not last["loss"] < first["loss"]:
        print(f"   {name}: the loss did not fall")
        bad = True
bench = out / "memory_layer.json"
if bench.exists():
    for r in json.loads(bench.read_text()):
        print(f"memory_layer {r['shape']} {r['device']} {r['dtype']}: ffn {r['ffn_ms']:.2f} ms, "
              f"memory {r['memory_ms']:.2f} ms (lookup {r['lookup_ms']:.2f}, bag {r['bag_ms']:.2f})")
report = out / "debug" / "evals" / "20.json"
if report.exists():
    m = json.loads(report.read_text())["metrics"]
    print(f"eval debug step 20: val loss {m['val/loss']:.3f}, {m['val/tokens_per_s']:,.0f} val tok/s, "
          f"facts EM {m['facts_qa/exact_match']:.3f}, memory usage layer1 {m['memory/layer1/usage']:.2f}")
gen = out / "generate.json"
if gen.exists():
    rows = json.loads(gen.read_text())["rows"]
    print("generate: " + ", ".join(f"cache {'on' if r['cache'] else 'off'} {r['tokens_per_s']:,.0f} tok/s"
                                   for r in rows))
bag = out / "embedding_bag.json"
if bag.exists():
    for r in json.loads(bag.read_text()):
        print(f"embedding_bag {r['shape']}: fwd torch {r['fwd_gbs']['torch']:,.0f} GB/s, triton "
              f"{r['fwd_gbs']['triton']:,.0f} GB/s ({r['fwd_of_copy']:.2f} of copy {r['copy_gbs']:,.0f}); "
              f"bwd rows {r['bwd_gbs']['rows']:,.0f} GB/s; fwd+bwd {r['fwd_bwd_speedup']:.1f}x torch")
plan = out / "plan_vs_measured.json"
if plan.exists():
    for r in json.loads(plan.read_text()):
        measured = f"{r['measured_gib']:.2f}" if r["measured_gib"] is not None else "n/a"
        ratio = f"{r['predicted_over_measured']:.2f}" if r["predicted_over_measured"] is not None else "n/a"
        print(f"plan {r['case']}: predicted {r['predicted_gib']:.2f} GiB, measured {measured}, ratio {ratio}")
scaling = out / "memory_scaling.json"
if scaling.exists():
    rows = json.loads(scaling.read_text())
    for r in rows:
        base = next(b for b in rows if b["optimizer"] == r["optimizer"])
        if "error" in r or "error" in base:
            print(f"memory_scaling {r['optimizer']} {r['rows']}: failed")
            continue
        print(f"memory_scaling {r['optimizer']} {r['rows']}: {r['tokens_per_s']:,.0f} tok/s "
              f"({r['tokens_per_s'] / base['tokens_per_s']:.2f}x {base['rows']}), peak "
              f"{r['peak_memory_gib']:.2f} GiB")
sys.exit(1 if bad else 0)
PY

if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_smoke: FAILED: ${failed[*]} (in $((SECONDS)) s)" | tee -a "$FIGURES"
  exit 1
fi
echo "gpu_smoke: all parts ran in $SECONDS s" | tee -a "$FIGURES"
