"""Quantized attention with sinks equals fp attention with sinks on dequantized data."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlx_lm_ext.fixes.quantized_attention import packed_params, quantized_attention


@pytest.mark.parametrize("n_q,n_kv,L", [(4, 4, 1), (8, 2, 1), (8, 2, 5)])
def test_sinks_match_reference(n_q, n_kv, L):
    mx.random.seed(0)
    q = mx.random.normal((1, n_q, L, 64))
    k, v = mx.random.normal((1, n_kv, 40, 64)), mx.random.normal((1, n_kv, 40, 64))
    sinks = mx.random.normal((n_q,))
    qk, qv = mx.quantize(k, 64, 8), mx.quantize(v, 64, 8)
    dk, dv = (mx.dequantize(*t, group_size=64, bits=8) for t in (qk, qv))
    mask = "causal" if L > 1 else None
    ref = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask, sinks=sinks)
    got = quantized_attention(q, qk, qv, 0.125, mask, 64, 8, sinks=sinks)
    assert mx.abs(got - ref).max().item() < 1e-4


def test_packed_params_read_group_and_bits():
    q = mx.zeros((1, 1, 1, 256))
    for group, bits in ((64, 8), (32, 4), (128, 6)):
        assert packed_params(q, mx.quantize(mx.zeros((1, 1, 2, 256)), group, bits)) == (group, bits)
