"""A quantized cache holds the bytes the affine format promises, on every layout."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from conftest import expect_upstream
from prompts import token_prompt

from mlx_lm_ext import layout
from mlx_lm_ext.quality import cache_nbytes, layer_nbytes

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
