"""QuantizedRotatingKVCache holds exactly what RotatingKVCache holds, quantized."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache, load_prompt_cache, save_prompt_cache

import mlx_lm_ext
from mlx_lm_ext.caches.quantized_rotating import QuantizedRotatingKVCache


def _feed(chunks, max_size, keep, bits, seed=0):
    mx.random.seed(seed)
    ref, quant = (
        RotatingKVCache(max_size=max_size, keep=keep),
        QuantizedRotatingKVCache(max_size, keep, bits=bits),
    )
    for n in chunks:
        k, v = mx.random.normal((1, 2, n, 64)), mx.random.normal((1, 2, n, 64))
        rk, rv = ref.update_and_fetch(k, v)
        qk, qv = quant.update_and_fetch(k, v)
        # the ring stores upstream's bytes for the rows RotatingKVCache holds: exactly
        assert _same(qk, mx.quantize(rk, 64, bits)) and _same(qv, mx.quantize(rv, 64, bits))
        assert (quant.offset, quant._idx) == (ref.offset, ref._idx)
        for n_q in (1, 3):
            assert _same_mask(
                ref.make_mask(n_q, window_size=max_size), quant.make_mask(n_q, window_size=max_size)
            )
    return ref, quant


def _same(triple, want) -> bool:
    """The same quantized rows (data, scales, biases), bit for bit."""
    return all(a.shape == b.shape and mx.array_equal(a, b).item() for a, b in zip(triple, want, strict=True))


def _same_mask(a, b):
    if a is None or isinstance(a, str):
        return a == b
    return mx.array_equal(a, b).item()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "max_size,keep,chunks",
    [
        (64, 0, [10] + [1] * 80),  # decode wraps the ring
        (64, 4, [100, 1, 1, 30, 1, 1]),  # prompt longer than the window, keep tokens
        (300, 4, [1] * 20 + [260] + [1] * 30),  # step growth, then a chunk crossing the window
        (512, 0, [600] + [1] * 5),  # gemma-3's window, a 600-token prompt
    ],
)
def test_ring_equals_rotating_then_quantize(bits, max_size, keep, chunks):
    _feed(chunks, max_size, keep, bits)


def test_to_quantized_keeps_positions_and_continues_identically():
    mlx_lm_ext.apply(only=["quantized-rotating-kv-cache"])
    try:
        ref, _ = _feed([70, 1, 1], 64, 4, 8)
        quant = ref.to_quantized(group_size=64, bits=8)
        assert isinstance(quant, QuantizedRotatingKVCache)
        assert (quant.offset, quant._idx, quant.keep, quant.max_size) == (ref.offset, ref._idx, 4, 64)
        k = mx.random.normal((1, 2, 1, 64))
        rk, _ = ref.update_and_fetch(k, k)
        qk, _ = quant.update_and_fetch(k, k)
        assert _same(qk, mx.quantize(rk, 64, 8))
    finally:
        mlx_lm_ext.revert()


def test_save_load_round_trip(tmp_path):
    mlx_lm_ext.apply(only=["quantized-rotating-kv-cache"])
    try:
        _, quant = _feed([100, 1, 1], 64, 4, 8)
        save_prompt_cache(str(tmp_path / "c.safetensors"), [quant])
        (loaded,) = load_prompt_cache(str(tmp_path / "c.safetensors"))
        assert isinstance(loaded, QuantizedRotatingKVCache)
        assert (loaded.offset, loaded._idx, loaded.keep, loaded.max_size, loaded.bits) == (
            quant.offset,
            quant._idx,
            4,
            64,
            8,
        )
        for a, b in zip(loaded.keys, quant.keys, strict=True):
            assert mx.array_equal(a, b).item()
    finally:
        mlx_lm_ext.revert()


def test_trim_and_bytes():
    _, quant = _feed([20], 64, 0, 8)
    assert quant.is_trimmable() and quant.trim(5) == 5 and quant.offset == 15
    # 20 tokens x 2 heads, keys and values: 64 bytes of 8-bit data + float32 scale and bias
    per_token = 2 * 2 * (64 + 2 * 4 * 64 // 64)
    assert quant.nbytes == 20 * per_token


def test_server_lru_prompt_cache_stores_fetches_and_trims_it():
    """The server's LRUPromptCache (mlx-lm 0.32+) reuses a quantized ring like any cache."""
    cache_mod = pytest.importorskip("mlx_lm.models.cache")
    if not hasattr(cache_mod, "LRUPromptCache"):
        pytest.skip("this mlx-lm release has no LRUPromptCache")
    tokens = list(range(40))
    ref, quant = _feed([30, 1, 1, 8], max_size=64, keep=4, bits=8)
    lru = cache_mod.LRUPromptCache(max_size=4)
    lru.insert_cache("m", tokens, [quant])
    assert lru.nbytes == quant.nbytes > 0

    # a longer prompt with the cached one as prefix: the cache is reused, rest to prefill
    (got,), rest = lru.fetch_nearest_cache("m", tokens + [77, 78])
    assert rest == [77, 78] and got.offset == 40 and got is not quant

    # a prompt that diverges at token 25: the stored ring is copied and trimmed to 25
    (got,), rest = lru.fetch_nearest_cache("m", tokens[:25] + [99, 98])
    assert got.offset == 25 and rest == [99, 98]
    ref.trim(15)
    k_ref = ref.keys[..., : ref.offset, :]
    assert _same(tuple(x[..., : got.offset, :] for x in got.keys), mx.quantize(k_ref, 64, 8))
    assert quant.offset == 40  # the stored entry is untouched
