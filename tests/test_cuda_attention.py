"""The CUDA decode kernels equal attention on dequantized keys and values (gpu tier).

Runs where MLX executes custom CUDA kernels (the lent GPU: see benchmarks/README.md);
skipped elsewhere, where `kernels.available()` is False and the kernels are unused.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from test_decode_tail import FORMATS

from mlx_lm_ext import kernels
from mlx_lm_ext.fixes import BY_NAME
from mlx_lm_ext.fixes import quantized_decode_tail as decode_tail
from mlx_lm_ext.fixes.quantized_attention import QuantizedOperands as Ops
from mlx_lm_ext.fixes.quantized_attention import quantized_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not kernels.available(), reason="no custom CUDA kernels on this device"),
]


def _reference(q, qk, qv, scale, mask, sinks, group, bits, length, tail=None, value_bits=None):
    """Attention by elementwise products and sums: exact in float32 (CUDA matmuls use TF32).
    `tail`: (keys, values) 16-bit rows after the first `length` quantized ones;
    `value_bits`: the values' width where it is not the keys'."""
    dk = mx.dequantize(*qk, group_size=group, bits=bits)[..., :length, :]
    dv = mx.dequantize(*qv, group_size=group, bits=value_bits or bits)[..., :length, :]
    if tail is not None:
        dk = mx.concatenate([dk, tail[0].astype(dk.dtype)], axis=-2)
        dv = mx.concatenate([dv, tail[1].astype(dv.dtype)], axis=-2)
        length += tail[0].shape[-2]
    repeats = q.shape[1] // dk.shape[1]
    dk, dv = (mx.repeat(x.astype(mx.float32), repeats, axis=1) for x in (dk, dv))
    scores = (q.astype(mx.float32)[..., :, None, :] * dk[..., None, :, :]).sum(-1) * scale
    if mask == "causal":
        L, T = scores.shape[-2:]
        scores = mx.where(mx.arange(T - L, T)[:, None] >= mx.arange(T)[None], scores, -mx.inf)
    elif mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    if sinks is not None:
        sink = mx.broadcast_to(sinks[None, :, None, None], scores.shape[:-1] + (1,))
        scores = mx.concatenate([scores, sink], axis=-1)
    probs = mx.softmax(scores, axis=-1)[..., :length]
    return (probs[..., None] * dv[..., None, :, :]).sum(-2)


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("dim,group", [(64, 64), (128, 64), (128, 32), (256, 128)])
@pytest.mark.parametrize("n_q,n_kv,L", [(8, 8, 1), (32, 8, 1), (64, 4, 1), (8, 2, 2)])
def test_decode_kernels_match_dequantized_attention(bits, dim, group, n_q, n_kv, L):
    mx.random.seed(bits * dim + n_q)
    rows, length = 768, 700  # a buffer of three growth steps, its tail unused
    qk, qv = (tuple(mx.quantize(mx.random.normal((2, n_kv, rows, dim)), group, bits)) for _ in range(2))
    q = mx.random.normal((2, n_q, L, dim))
    sinks = mx.random.normal((n_q,))
    mask = "causal" if L > 1 else None
    flash = L == 1 and kernels.flash_plan(n_q // n_kv, dim, bits, group, 2 * n_kv, length)
    if not (flash or kernels.supports(n_q // n_kv * L, dim, bits, group)):
        pytest.skip("shape outside the kernels: prompt path")
    got = quantized_attention(q, Ops(qk, qv, group, bits, length), dim**-0.5, mask, sinks, kernels_on=True)
    want = _reference(q, qk, qv, dim**-0.5, mask, sinks, group, bits, length)
    assert mx.abs(got - want).max().item() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("length", [5, 700, 5000])
def test_batched_decode_with_padding_masks_and_sinks(bits, length):
    """The flash kernel: three requests left-padded by different amounts (a batch cache's
    bool mask), a buffer longer than the valid rows, and sinks."""
    mx.random.seed(length + bits)
    rows = length + 100
    qk, qv = (tuple(mx.quantize(mx.random.normal((3, 8, rows, 128)), 64, bits)) for _ in range(2))
    q = mx.random.normal((3, 32, 1, 128))
    pads = mx.array([0, length // 3, length - 1])
    mask = (mx.arange(length)[None] >= pads[:, None])[:, None, None, :]
    for sinks in (None, mx.random.normal((32,))):
        got = quantized_attention(q, Ops(qk, qv, 64, bits, length), 0.088, mask, sinks, kernels_on=True)
        want = _reference(q, qk, qv, 0.088, mask, sinks, 64, bits, length)
        assert mx.abs(got - want).max().item() < 1e-4


def test_prompt_chunks_take_the_dequantized_path():
    """2048 queries per KV head are beyond the kernels' registers: fused kernel, same result."""
    mx.random.seed(5)
    qk, qv = (tuple(mx.quantize(mx.random.normal((1, 2, 2304, 128)), 64, 8)) for _ in range(2))
    q = mx.random.normal((1, 8, 512, 128)).astype(mx.bfloat16)
    assert not kernels.supports(4 * 512, 128, 8, 64)
    got = quantized_attention(q, Ops(qk, qv, 64, 8, 2200), 0.088, "causal")
    want = _reference(q.astype(mx.float32), qk, qv, 0.088, "causal", None, 64, 8, 2200)
    assert mx.abs(got.astype(mx.float32) - want).max().item() < 3e-2  # bf16 output


@pytest.mark.parametrize("bits", [8, 4])
def test_flash_reads_strided_views_in_place(bits):
    """Queries every other head of a larger array, cache buffers a batch-and-head slice of
    larger ones: the kernel indexes by the arrays' strides instead of copying them."""
    mx.random.seed(11 + bits)
    big = (tuple(mx.quantize(mx.random.normal((3, 16, 1100, 128)), 64, bits)) for _ in range(2))
    qk, qv = (tuple(x[1:, ::2] for x in t) for t in big)
    q = mx.random.normal((2, 64, 1, 128))[:, ::2]
    got = kernels.flash_decode(q, qk, qv, 0.088, 64, bits, 1000)
    want = _reference(q, qk, qv, 0.088, None, None, 64, bits, 1000)
    assert mx.abs(got - want).max().item() < 1e-4


def test_flash_calls_evaluated_together_keep_their_own_results():
    """Independent launches in one graph (MLX may run them concurrently) and of two batch
    sizes: each one's last-block counter is its own, so every result is exact."""
    mx.random.seed(3)
    cases = []
    for batch, length in ((1, 4000), (2, 300), (1, 9000), (2, 5)):
        qk, qv = (tuple(mx.quantize(mx.random.normal((batch, 8, length + 64, 128)), 64, 8)) for _ in range(2))
        cases.append((mx.random.normal((batch, 32, 1, 128)), qk, qv, length))
    got = [kernels.flash_decode(q, qk, qv, 0.088, 64, 8, n) for q, qk, qv, n in cases]
    mx.eval(got)
    for out, (q, qk, qv, n) in zip(got, cases, strict=True):
        assert mx.abs(out - _reference(q, qk, qv, 0.088, None, None, 64, 8, n)).max().item() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("length,n", [(5, 1), (700, 37), (5000, 64)])
def test_flash_reads_the_16_bit_tail_after_the_quantized_rows(bits, length, n):
    """The tail (fixes/quantized_decode_tail.py) is one chunk more: with padding masks over the
    quantized rows and the tail, and sinks; passed as its rows, or as the first n rows of
    64-row buffers (as the cache passes it) whose other rows must not be read."""
    mx.random.seed(length + n + bits)
    qk, qv = (tuple(mx.quantize(mx.random.normal((3, 8, length + 100, 128)), 64, bits)) for _ in range(2))
    tail = tuple(mx.random.normal((3, 8, n, 128)).astype(mx.bfloat16) for _ in range(2))
    junk = mx.full((3, 8, 64 - n, 128), 1e4, mx.bfloat16)  # would swamp the output if read
    buffers = (*(mx.concatenate([t, junk], axis=2) for t in tail), n)
    q = mx.random.normal((3, 32, 1, 128))
    total = length + n
    pads = mx.array([0, total // 3, total - 1])
    mask = (mx.arange(total)[None] >= pads[:, None])[:, None, None, :]
    for m, sinks in ((None, None), (mask, mx.random.normal((32,)))):
        want = _reference(q, qk, qv, 0.088, m, sinks, 64, bits, length, tail)
        for rows in (kernels.TailRows(*tail, n), kernels.TailRows(*buffers)):
            got = kernels.flash_decode(
                q, qk, qv, 0.088, 64, bits, length, m if m is None else _additive(m), sinks, rows
            )
            assert mx.abs(got - want).max().item() < 1e-4


@pytest.mark.parametrize("bits", [8, 4])
def test_flash_writes_the_incoming_row_into_the_tail(bits):
    """A step's own row comes as `incoming` (float32 views strided as a model's projection
    leaves them): the launch attends to it as the tail's last row, rounded as the
    bfloat16 buffers store it, and writes it into their next row, which a reader ordered
    after the launch (`mx.depends`, as `settle` orders one) finds there."""
    mx.random.seed(bits)
    length, n = 700, 37
    qk, qv = (tuple(mx.quantize(mx.random.normal((3, 8, length + 100, 128)), 64, bits)) for _ in range(2))
    q = mx.random.normal((3, 32, 1, 128))
    junk = mx.full((3, 8, 65 - n, 128), 1e4, mx.bfloat16)  # would swamp the output if read
    old = [mx.random.normal((3, 8, n - 1, 128)).astype(mx.bfloat16) for _ in range(2)]
    new = [mx.random.normal((3, 1, 8, 128)).transpose(0, 2, 1, 3) for _ in range(2)]  # (B, H, 1, D) views
    buffers = [mx.concatenate([o, junk], axis=2) for o in old]
    mx.eval(buffers, new)
    pads = mx.array([0, length // 3, length])
    mask = (mx.arange(length + n)[None] >= pads[:, None])[:, None, None, :]
    tail = tuple(mx.concatenate([o, x.astype(mx.bfloat16)], axis=2) for o, x in zip(old, new, strict=True))
    writes = kernels.TailWrites()
    for m, sinks in ((None, None), (mask, mx.random.normal((32,)))):
        want = _reference(q, qk, qv, 0.088, m, sinks, 64, bits, length, tail)
        writes.row = tuple(new)
        rows = kernels.TailRows(*buffers, n, tuple(new), writes)
        additive = m if m is None else _additive(m)
        got = kernels.flash_decode(q, qk, qv, 0.088, 64, bits, length, additive, sinks, rows)
        assert mx.abs(got - want).max().item() < 1e-4
        assert writes.kernel is got and writes.row is None
        written = mx.depends(buffers, [got])
        for buffer, t in zip(written, tail, strict=True):
            assert mx.array_equal(buffer[..., :n, :], t).item()  # the new row in its place
            assert (buffer[..., n:, :] == 1e4).all().item()  # and nothing past it


def _additive(mask: mx.array) -> mx.array:
    return mx.where(mask, 0.0, -mx.inf).reshape(mask.shape[0], -1).astype(mx.float32)


@pytest.mark.parametrize("bits", [8, 4])
def test_decode_through_the_tail_and_the_flash_kernel(bits):
    """tests/test_decode_tail.py's step-by-step check, attention through the flash kernel."""
    from test_decode_tail import decode_steps_match_reference

    decode_tail.FIX.apply()
    try:
        decode_steps_match_reference(bits)
    finally:
        decode_tail.FIX.revert()


@pytest.mark.parametrize("bits,value_bits,rotate,dim,group", FORMATS)
def test_decode_through_the_tail_and_the_flash_kernel_in_every_format(bits, value_bits, rotate, dim, group):
    """The same in the formats (K8V4, rotated keys or all), Gemma 3's global layer shape
    included: through the flash kernel, which must take every one of these shapes."""
    from test_decode_tail import decode_steps_match_reference

    assert kernels.flash_plan(group, dim, bits, 64, 1, 140, 1, value_bits) is not None
    BY_NAME["kv-format"].apply()
    decode_tail.FIX.apply()
    try:
        decode_steps_match_reference(bits, group, 100, value_bits, rotate, dim, heads=1)
    finally:
        decode_tail.FIX.revert()
        BY_NAME["kv-format"].revert()


@pytest.mark.parametrize("bits,value_bits", [(8, 4), (4, 8), (8, 2)])
@pytest.mark.parametrize("n_q,n_kv", [(8, 8), (32, 8)])
def test_flash_kernel_reads_keys_and_values_at_their_widths(bits, value_bits, n_q, n_kv):
    """--kv-key-bits/--kv-value-bits: one flash launch over keys and values packed at
    different widths equals attention on each dequantized at its own."""
    mx.random.seed(bits * 10 + value_bits + n_q)
    rows, length, dim = 768, 700, 128
    qk = tuple(mx.quantize(mx.random.normal((2, n_kv, rows, dim)), 64, bits))
    qv = tuple(mx.quantize(mx.random.normal((2, n_kv, rows, dim)), 64, value_bits))
    q = mx.random.normal((2, n_q, 1, dim))
    assert kernels.flash_plan(n_q // n_kv, dim, bits, 64, 2 * n_kv, length, 0, value_bits) is not None
    ops = Ops(qk, qv, 64, bits, length, value_bits=value_bits)
    got = quantized_attention(q, ops, dim**-0.5, None, None, kernels_on=True)
    want = _reference(q, qk, qv, dim**-0.5, None, None, 64, bits, length, value_bits=value_bits)
    assert mx.abs(got - want).max().item() < 1e-4


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize(
    "bits,dim,group,n_q,n_kv",
    [(8, 128, 64, 32, 8), (4, 128, 32, 32, 8), (2, 128, 64, 8, 8), (8, 256, 128, 4, 1), (4, 64, 64, 16, 2)],
)
def test_tensor_core_scores_equal_the_cuda_core_pass(dtype, bits, dim, group, n_q, n_kv, monkeypatch):
    """Scores on tensor cores (f16 products of the keys' integers and the queries, float32
    sums; float32 queries in two f16 parts) and on CUDA cores both equal exact attention,
    for queries in each dtype, a buffer longer than the valid rows and a partial last tile."""
    from mlx_lm_ext.kernels import launch, plan

    mx.random.seed(bits + dim + n_q)
    length = 3001
    qk, qv = (
        tuple(mx.quantize(mx.random.normal((2, n_kv, length + 60, dim)), group, bits)) for _ in range(2)
    )
    q = (mx.random.normal((2, n_q, 1, dim)) * 3).astype(dtype)
    assert kernels.flash_tensor_cores(n_q // n_kv, dim, bits, group)
    want = _reference(q.astype(mx.float32), qk, qv, dim**-0.5, None, None, group, bits, length)
    tolerance = 1e-4 if dtype == mx.float32 else 1e-2  # the output's rounding
    got = {}
    for mma in (True, False):
        monkeypatch.setattr(plan, "FLASH_MMA", mma)
        launch.forget_plans()
        got[mma] = kernels.flash_decode(q, qk, qv, dim**-0.5, group, bits, length).astype(mx.float32)
        assert mx.abs(got[mma] - want).max().item() < tolerance, mma
    launch.forget_plans()
    assert mx.abs(got[True] - got[False]).max().item() < tolerance
