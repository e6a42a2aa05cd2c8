"""What the running MLX backend's kernels accept, probed once per device and remembered.

Backends differ in which operand layouts their kernels take, and a backend name says
nothing about the release in hand: MLX 0.32.4's CUDA `quantized_matmul` rejects strided
quantized operands ("No implementation for problem shape"), where Metal and CPU take
them. So the code that depends on it asks the kernel, once, with a tiny problem.
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx

log = logging.getLogger("mlx_lm_ext")


def strided_quantized_matmul() -> bool:
    """Whether `quantized_matmul` on the default device accepts strided (sliced) operands."""
    return _probe_strided(str(mx.default_device()))


@functools.cache
def _probe_strided(device: str) -> bool:
    # A growing quantized cache returns buffer[..., :offset, :]: strided along heads.
    buffer = mx.quantize(mx.ones((1, 2, 64, 128)), group_size=64, bits=8)
    view = [w[..., :33, :] for w in buffer]
    x = mx.ones((1, 2, 1, 128))
    try:
        mx.eval(mx.quantized_matmul(x, *view, transpose=True, group_size=64, bits=8))
    except (RuntimeError, ValueError) as e:
        log.info("quantized_matmul on %s rejects strided operands (%s)", device, e)
        return False
    return True
