import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (wandb_runs)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Triton kernels run in Triton's interpreter on the CPU (read when triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")
# one thread a process: the suite runs 2 workers on CI's 2 cores, and each starts processes of
# its own (train.py, torchrun's ranks); torch's default of a thread a core in every one of
# them oversubscribes the cores, and OpenMP's spinning threads then slow the end-to-end
# tests several times over (the knowledge experiment's: 31 s alone, 238 s in the suite)
os.environ.setdefault("OMP_NUM_THREADS", "1")
