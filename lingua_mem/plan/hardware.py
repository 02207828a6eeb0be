"""The accelerators the plan knows: memory, bandwidths and peak throughput, one table.

Figures are NVIDIA's published dense (no sparsity) numbers for the SXM parts as built into
DGX/HGX 8-GPU nodes:
  H100 SXM5 80GB  H100 datasheet (nvidia.com/en-us/data-center/h100): HBM3 3.35 TB/s,
                  bf16 989 TFLOPS, TF32 495 TFLOPS, NVLink 4 900 GB/s (both directions)
  H200 SXM 141GB  H200 datasheet (nvidia.com/en-us/data-center/h200): HBM3e 4.8 TB/s,
                  compute and NVLink as H100
  A100 SXM4 80GB  A100 datasheet (nvidia.com/en-us/data-center/a100): HBM2e 2.039 TB/s,
                  bf16 312 TFLOPS, TF32 156 TFLOPS, NVLink 3 600 GB/s (both directions)
Between nodes: one NIC per GPU, as in DGX H100/H200 (ConnectX-7, 400 Gb/s) and DGX A100
(ConnectX-6, 200 Gb/s). Memory is what torch.cuda.get_device_properties reports as
total_memory on these parts (H100 and A100 80GB: 79.2 GiB; H200: 139.8 GiB).
"""

from __future__ import annotations

from dataclasses import dataclass

from lingua_mem.errors import ConfigError

GiB = 2**30


@dataclass(frozen=True)
class Accelerator:
    name: str
    memory_bytes: int  # total device memory
    hbm_bytes_per_s: float
    bf16_flops: float  # dense tensor-core peak
    tf32_flops: float  # the fp32 matmul peak (TF32 tensor cores)
    nvlink_bytes_per_s: float  # per GPU, one direction, inside a node
    network_bytes_per_s: float  # per GPU, one direction, between nodes


ACCELERATORS = {
    "h100": Accelerator("H100 SXM5 80GB", int(79.2 * GiB), 3.35e12, 989e12, 495e12, 450e9, 50e9),
    "h200": Accelerator("H200 SXM 141GB", int(139.8 * GiB), 4.8e12, 989e12, 495e12, 450e9, 50e9),
    "a100": Accelerator("A100 SXM4 80GB", int(79.2 * GiB), 2.039e12, 312e12, 156e12, 300e9, 25e9),
}

# kept free of the plan's peak: the CUDA context, NCCL's buffers and the caching allocator's
# fragmentation (torchtitan and Megatron users budget 5-10%)
HEADROOM = 0.10


def accelerator(name: str) -> Accelerator:
    if name not in ACCELERATORS:
        raise ConfigError(f"gpu: {name!r} is not one of {', '.join(ACCELERATORS)}")
    return ACCELERATORS[name]
