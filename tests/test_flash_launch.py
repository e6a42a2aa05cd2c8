"""What `flash_decode` hands MLX's kernel call, on any backend (the kernel itself runs on
the GPU: tests/test_cuda_attention.py): the queries, the quantized arrays as they are
(the keys cut to `length` only where they hold more), the mask and sinks only where
given, the counter the previous call returned, the tail's buffers and rows (as a
shape) only where there is a tail, and its incoming row with the last launch that wrote
one only where it has one: the kernel declares what a launch does not pass."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_lm_ext.kernels import TailRows, launch


class _Kernel:
    """Stands in for the compiled kernel: records its inputs, returns a fresh counter."""

    def __init__(self):
        self.inputs: list = []

    def __call__(self, inputs, **spec):
        self.inputs.append(inputs)
        return inputs[0], None, mx.zeros((spec["batch_heads"],), mx.int32)


@pytest.fixture
def kernel(monkeypatch):
    kernel = _Kernel()
    calls = []

    def flash_call(q_shape, dtype, B, H, widths, group_size, length, scale, flags):
        calls.append((widths, group_size, length, flags))
        return kernel, {"batch_heads": B * H}

    flash_call.cache_clear = lambda: None  # forget_plans clears it
    monkeypatch.setattr(launch, "_flash_call", flash_call)
    kernel.calls = calls
    return kernel


def _packed(rows: int, bits: int = 8) -> tuple[tuple, tuple]:
    x = mx.random.normal((1, 2, rows, 64), key=mx.random.key(0))
    return tuple(mx.quantize(x, 64, bits)), tuple(mx.quantize(x, 64, 4))


def test_the_inputs_without_mask_sinks_or_tail(kernel):
    qk, qv = _packed(256)
    q = mx.zeros((1, 8, 1, 64))
    launch.flash_decode(q, qk, qv, 0.1, 64, 8, 200, value_bits=4)
    (inputs,) = kernel.inputs
    assert inputs[0] is q and inputs[1].shape[2] == 200  # the keys cut to the length
    assert all(a is b for a, b in zip(inputs[2:7], (*qk[1:], *qv), strict=True))
    assert len(inputs) == 8 and (inputs[7].shape, inputs[7].dtype) == ((2,), mx.int32)  # the counter
    assert kernel.calls == [((8, 4), 64, 200, (False, False, False, False))]
    assert launch.flash_inputs((False, False, False, False)) == ["count"]


def test_each_call_counts_on_the_counter_the_last_returned(kernel):
    qk, qv = _packed(128)
    q = mx.zeros((1, 8, 1, 64))
    launch.flash_decode(q, qk, qv, 0.1, 64, 8, 128)
    returned = launch._COUNTERS[2]
    launch.flash_decode(q, qk, qv, 0.1, 64, 8, 128)
    assert kernel.inputs[1][7] is returned and kernel.inputs[0][1] is qk[0]  # whole: no cut


def test_a_decoder_passes_the_mask_sinks_and_tail_of_each_call(kernel):
    qk, qv = _packed(128)
    q = mx.zeros((1, 8, 1, 64))
    tail = TailRows(mx.zeros((1, 2, 64, 64)), mx.zeros((1, 2, 64, 64)), 5)
    decoder = launch.flash_decoder(q, launch.Packed(qk, qv, 64, 8), 128, 0.1, (True, True, True, False))
    mask, sinks = mx.zeros((1, 133)), mx.zeros((8,), mx.bfloat16)
    for n in (5, 6):
        decoder(q, mask, sinks, tail._replace(rows=n))
    first, second = kernel.inputs
    assert launch.flash_inputs((True, True, True, False)) == ["mask", "sinks", "count", "tk", "tv", "tn"]
    assert first[7] is mask and first[8].dtype == mx.float32
    assert first[10] is tail.key_buffer and first[11] is tail.value_buffer
    assert (first[12].shape, second[12].shape) == ((6,), (7,)) and len(kernel.calls) == 1
    assert not decoder.stale
    launch.forget_plans()
    assert decoder.stale


def test_a_tail_only_launch_passes_eleven_inputs(kernel):
    """A decode tail's step (no mask or sinks): the mask and sinks are not passed at all."""
    qk, qv = _packed(128)
    q = mx.zeros((1, 8, 1, 64))
    tail = TailRows(mx.zeros((1, 2, 64, 64)), mx.zeros((1, 2, 64, 64)), 3)
    launch.flash_decoder(q, launch.Packed(qk, qv, 64, 8), 128, 0.1, (False, False, True, False))(q, tail=tail)
    (inputs,) = kernel.inputs
    assert len(inputs) == 11 and inputs[8] is tail.key_buffer and inputs[10].shape == (4,)


def test_a_tails_incoming_row_goes_to_the_launch_that_writes_it(kernel):
    """The step's own row travels as kn and vn, and the launch records itself as the row's
    writer: the next launch takes it as `prev` (MLX orders launches by what they read,
    and a write into an input is not one), as does any other reader (`settle`)."""
    qk, qv = _packed(128)
    q = mx.zeros((1, 8, 1, 64))
    writes = launch.TailWrites()
    buffers = mx.zeros((1, 2, 64, 64)), mx.zeros((1, 2, 64, 64))
    decoder = launch.flash_decoder(q, launch.Packed(qk, qv, 64, 8), 128, 0.1, (False, False, True, True))
    rows = []
    for n in (3, 4):
        writes.row = row = (mx.ones((1, 2, 1, 64)) * n, mx.ones((1, 2, 1, 64)) * -n)
        rows.append(row)
        decoder(q, tail=TailRows(*buffers, n, row, writes))
        assert writes.row is None and writes.kernel is kernel.inputs[-1][0]  # the output: the queries here
    first, second = kernel.inputs
    assert launch.flash_inputs((False, False, True, True)) == ["count", "tk", "tv", "tn", "kn", "vn", "prev"]
    assert len(first) == 14 and first[11] is rows[0][0] and first[12] is rows[0][1]
    assert first[13] is buffers[0] and second[13] is first[0]  # no writer yet, then the first launch
    assert (first[10].shape, second[10].shape) == ((4,), (5,))
