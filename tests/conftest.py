import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # test helpers (wandb_runs)
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_MODE", "offline")
# Triton kernels run in Triton's interpreter on the CPU (read when triton is imported)
os.environ.setdefault("TRITON_INTERPRET", "1")
