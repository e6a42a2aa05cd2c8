"""Quantized decode steps cost as many cache ops as 16-bit ones, where MLX runs CUDA kernels.

Upstream: `QuantizedKVCache.update_and_fetch` quantizes each new token, 8 ops a layer a
step (2 for the 16-bit cache). On MLX's CUDA backend, which charges every op ~7-10 us of
dispatch, that alone kept 8-bit decode on a Llama-3.1-8B shape at 0.56-0.77x the speed
of 16-bit; with the update as cheap as 16-bit's it ran at 1.07x (H100, same run,
benchmarks/kv_speed.py at 32K). `caches/decode_tail.py` keeps the newest tokens at 16
bits, quantizes them in blocks of 64 into exactly the bytes upstream stores, and the
flash decode kernel reads the tail as one chunk more. Installed only where the flash
kernel runs (`cuda_attention.available`, probed) and this project's quantized attention
reads tails; elsewhere a tail would cost a dequantization a step.
No patch file: the series carries no CUDA kernels (an upstream PR would come with them).
"""

from __future__ import annotations

from .. import cuda_attention
from ..caches import decode_tail
from . import quantized_attention
from .base import Fix, Patcher


class DecodeTail(Fix):
    name = "quantized-decode-tail"
    summary = "quantized cache: decode tokens kept at 16 bits, quantized 64 at a time (CUDA)"

    def needed(self) -> bool:
        from mlx_lm.models import base

        return (
            not decode_tail.installed()
            and base.scaled_dot_product_attention is quantized_attention.scaled_dot_product_attention
            and cuda_attention.available()
        )

    def install(self, patcher: Patcher) -> None:
        decode_tail.install(patcher)
