"""Quantized decode attention as CUDA kernels, where MLX runs custom CUDA kernels.

- `scores.cu`, `weighted.cu`, `flash.cu`, `packed.cuh`: the kernel sources (package data)
- `plan.py`: which shapes each kernel takes, chunking, the source compiled and its name
- `launch.py`: the MLX calls (`mx.fast.cuda_kernel`) and the one-time correctness probe
"""

from .launch import (
    FlashDecoder,
    TailRows,
    TailWrites,
    available,
    exact_attention,
    flash_decode,
    flash_decoder,
    scores,
    weighted_sum,
)
from .plan import (
    FLASH_SMEM,
    flash_plan,
    flash_source,
    flash_split,
    flash_tensor_core_values,
    flash_tensor_cores,
    kernel_name,
    supports,
)

__all__ = [
    "FLASH_SMEM",
    "FlashDecoder",
    "TailRows",
    "TailWrites",
    "available",
    "exact_attention",
    "flash_decode",
    "flash_decoder",
    "flash_plan",
    "flash_source",
    "flash_split",
    "flash_tensor_core_values",
    "flash_tensor_cores",
    "kernel_name",
    "scores",
    "supports",
    "weighted_sum",
]
