"""A quantized cache holds the bytes the affine format promises, on every layout."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from conftest import expect_upstream
from prompts import token_prompt

from mlx_lm_ext import layout
from mlx_lm_ext.report.measure import attention_layers, filled_cache, prefill
from mlx_lm_ext.report.quality import cache_nbytes, layer_nbytes
from mlx_lm_ext.settings import KVSettings

TOKENS = 1024  # a multiple of the caches' 256-token step, past every offline window but 1024


def affine_ratio(bits: int, group: int, dtype_bits: int) -> float:
    """Bytes per element of a quantized cache over those of the 16/32-bit cache."""
    return (bits + 2 * dtype_bits / group) / dtype_bits


def _cache_after_prefill(model, kv_bits):
    from mlx_lm.models.cache import make_prompt_cache

    generate = importlib.import_module("mlx_lm.generate")
    cache = make_prompt_cache(model)
    model(mx.array(token_prompt(TOKENS))[None], cache=cache)
    generate.maybe_quantize_kv_cache(cache, 0, 64, kv_bits)
    mx.eval([c.state for c in cache])
    return cache


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_cache_bytes_match_affine_ratio(entry, loaded, kv_bits, request, record_property):
    mark = expect_upstream(entry, kv_bits, quantizes=True)
    if mark:
        request.applymarker(mark)
    model, _ = loaded
    full = _cache_after_prefill(model, None)
    quant = _cache_after_prefill(model, kv_bits)
    attention = [i for i, k in enumerate(layout.describe(full)) if k in (layout.FULL, layout.SLIDING)]
    dtype_bits = full[attention[0]].keys.dtype.size * 8
    fp = sum(layer_nbytes(full[i]) for i in attention)
    q = sum(layer_nbytes(quant[i]) for i in attention)
    other = cache_nbytes(full) - fp
    ratio = q / fp
    record_property("kv_ratio", ratio)
    print(
        f"\n{entry.id} kv_bits={kv_bits}: attention KV {fp} -> {q} bytes ({ratio:.4f}); other state {other}"
    )
    assert ratio == pytest.approx(affine_ratio(kv_bits, 64, dtype_bits), rel=1e-6)
    # recurrent state is never quantized: it keeps every byte
    assert cache_nbytes(quant) - q == other


BOUND = 128


def _bounded_bytes_promised(model, kv_bits: int) -> float:
    """What every attention layer's ring must hold under max_kv_size=BOUND, from the
    16-bit cache's geometry alone (heads, head dims, dtype of a short 16-bit prefill):
    BOUND rows of keys and of values, each at the affine ratio of its dtype."""
    cache = prefill(model, token_prompt(8), KVSettings(max_kv_size=BOUND), step=8)
    total = 0.0
    for layer in attention_layers(cache):
        for x in (layer.keys, layer.values):
            b, heads, _, dim = x.shape
            bits = x.dtype.size * 8
            total += b * heads * BOUND * dim * x.dtype.size * affine_ratio(kv_bits, 64, bits)
    return total


@pytest.mark.parametrize("n_tokens", [8192, pytest.param(32768, marks=pytest.mark.slow)], ids=["8K", "32K"])
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_bounded_quantized_cache_bytes_are_bound_times_affine_ratio(
    entry, loaded, kv_bits, n_tokens, request, record_property
):
    mark = expect_upstream(entry, kv_bits, quantizes=True, bounded=True)
    if mark:
        request.applymarker(mark)
    model, _ = loaded
    # a real 512-token prefill, then random keys/values of the same shapes (measure.py)
    cache = filled_cache(
        model, n_tokens, KVSettings(kv_bits=kv_bits, quantized_kv_start=0, max_kv_size=BOUND)
    )
    kinds = layout.describe(cache)
    attention = [cache[i] for i, k in enumerate(kinds) if k in (layout.QUANTIZED, layout.QUANTIZED_SLIDING)]
    assert attention and len(attention) == sum(k in (layout.FULL, layout.SLIDING) for k in entry.layout)
    measured = sum(layer_nbytes(c) for c in attention)
    promised = _bounded_bytes_promised(model, kv_bits)
    record_property("bounded_kv_bytes", measured)
    print(
        f"\n{entry.id} {n_tokens} tokens, bound {BOUND}, kv_bits={kv_bits}: "
        f"{measured} bytes, promised {promised:.0f}"
    )
    # exact: no step slack, no unquantized remainder, no layer over or under the bound
    assert measured == pytest.approx(promised, rel=1e-9)
