"""Prompt-cache entries stored cut to their tokens and, with --prompt-cache-bits,
quantized; fetched back in the live precision (caches/prompt_store.py)."""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import pytest
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    LRUPromptCache,
    QuantizedKVCache,
    RotatingKVCache,
)

import mlx_lm_ext
from mlx_lm_ext.caches import prompt_store
from mlx_lm_ext.caches.quantized_rotating import QuantizedRotatingKVCache
from mlx_lm_ext.settings import KVSettings


@pytest.fixture(autouse=True)
def fixes():
    """Every fix in force with default settings, and none left behind for the next file."""
    mlx_lm_ext.apply(KVSettings())
    yield
    mlx_lm_ext.revert()


def _kv(n: int, dim: int = 64, seed: int = 0) -> tuple[mx.array, mx.array]:
    k, v = mx.random.normal((2, 1, 2, n, dim), key=mx.random.key(seed))
    return k.astype(mx.bfloat16), v.astype(mx.bfloat16)


def _filled(cache, n: int, seed: int = 0, chunk: int = 100):
    k, v = _kv(n, seed=seed)
    for s in range(0, n, chunk):
        cache.update_and_fetch(k[..., s : s + chunk, :], v[..., s : s + chunk, :])
    return cache, k, v


def _requantized(x: mx.array, bits: int = 8) -> mx.array:
    return mx.dequantize(*mx.quantize(x, group_size=64, bits=bits), group_size=64, bits=bits)


def test_entries_are_cut_to_their_tokens():
    """300 tokens fed 100 at a time, in a buffer grown 256 rows at a time: 456 rows
    stored upstream, 300 here."""
    cache, k, v = _filled(KVCache(), 300)
    assert cache.keys.shape[2] == 456
    (stored,) = prompt_store.for_storage([cache], None, 64)
    assert type(stored) is KVCache and stored.keys.shape[2] == 300 and stored.offset == 300
    assert mx.array_equal(stored.keys, k).item() and mx.array_equal(stored.values, v).item()
    assert stored.nbytes * 456 == cache.nbytes * 300
    assert cache.keys.shape[2] == 456  # the live cache is left as it was


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_for_storage_and_16_bit_again_when_fetched(bits):
    cache, k, v = _filled(KVCache(), 300)
    stored = prompt_store.for_storage([cache], bits, 64)
    assert type(stored[0]) is QuantizedKVCache and stored[0].bits == bits
    (live,) = prompt_store.for_live(stored)
    assert type(live) is KVCache and live.offset == 300
    assert mx.array_equal(live.keys, _requantized(k, bits)).item()
    assert mx.array_equal(live.values, _requantized(v, bits)).item()
    assert live.keys.dtype == mx.bfloat16


@pytest.mark.parametrize("tokens", [100, 300])
def test_rings_keep_their_positions(tokens):
    """A sliding window of 128 (Gemma's layers, or a --max-kv-size bound): unwrapped it is
    cut, wrapped it keeps its ring and index; stored quantized, fetched as a ring again."""
    ring, _, _ = _filled(RotatingKVCache(max_size=128, keep=4), tokens, chunk=1 if tokens > 128 else 100)
    (cut,) = prompt_store.for_storage([ring], None, 64)
    assert cut.keys.shape[2] == min(tokens, 128) and (cut.offset, cut._idx) == (ring.offset, ring._idx)
    (stored,) = prompt_store.for_storage([ring], 8, 64)
    assert type(stored) is QuantizedRotatingKVCache
    (live,) = prompt_store.for_live([stored])
    assert type(live) is RotatingKVCache and (live.offset, live._idx, live.keep, live.max_size) == (
        ring.offset, ring._idx, 4, 128,
    )  # fmt: skip
    rows = min(tokens, 128)
    assert mx.array_equal(live.keys, _requantized(ring.keys[..., :rows, :])).item()


def test_recurrent_state_and_live_quantized_layers_are_kept_in_their_form():
    recurrent = ArraysCache(size=2)
    recurrent[0] = mx.ones((1, 4))
    quant, _, _ = _filled(KVCache(), 300)
    quant = quant.to_quantized(group_size=64, bits=4)
    full, _, _ = _filled(KVCache(), 300)
    entry = prompt_store.for_storage([CacheList(full, recurrent), quant], 8, 64)
    assert type(entry[0].caches[0]) is QuantizedKVCache and entry[0].caches[1] is recurrent
    assert type(entry[1]) is QuantizedKVCache and entry[1].bits == 4  # live decoding's, kept
    assert entry[1].keys[0].shape[2] == 300  # cut all the same
    live = prompt_store.for_live(entry)
    assert type(live[0].caches[0]) is KVCache and type(live[1]) is QuantizedKVCache


def test_the_servers_lru_holds_more_entries_in_the_same_bytes():
    """The LRU's byte bound counts what is stored: 16-bit as generated (padding
    included), cut, and at 8 and 4 bits."""
    held = {}
    for label, settings in [
        ("as generated", None),
        ("16-bit cut", KVSettings()),
        ("8-bit", KVSettings(prompt_cache_bits=8)),
        ("4-bit", KVSettings(prompt_cache_bits=4)),
    ]:
        mlx_lm_ext.revert() if settings is None else mlx_lm_ext.apply(settings)
        lru = LRUPromptCache(max_size=100, max_bytes=40 * 300 * 2 * 64 * 2 * 2)
        for i in range(100):
            cache, _, _ = _filled(KVCache(), 300, seed=i)
            lru.insert_cache("m", [i] * 300, [cache])
        held[label] = len(lru)
    assert held == {"as generated": 26, "16-bit cut": 40, "8-bit": 75, "4-bit": 100}, held


def test_entries_under_the_minimum_stay_16_bit_and_the_lru_takes_the_series_arguments():
    """LRUPromptCache(bits=, group_size=, min_quantize_tokens=) as the patch series has
    it; left out, the process's flags apply (what the server's own LRU reads)."""
    mlx_lm_ext.apply(KVSettings(prompt_cache_bits=4, prompt_cache_min_quantize_tokens=100))
    for lru, tokens, stored in [
        (LRUPromptCache(bits=8, min_quantize_tokens=256), 200, (KVCache, None)),
        (LRUPromptCache(bits=8, min_quantize_tokens=256), 300, (QuantizedKVCache, 8)),
        (LRUPromptCache(), 200, (QuantizedKVCache, 4)),
        (LRUPromptCache(), 99, (KVCache, None)),
    ]:
        lru.insert_cache("m", list(range(tokens)), [_filled(KVCache(), tokens)[0]])
        entry = lru._trie.get("m", list(range(tokens))).prompt_cache[0]
        assert (type(entry), getattr(entry, "bits", None)) == stored, (tokens, stored)


def test_a_partial_hit_trims_the_stored_entry_exactly():
    mlx_lm_ext.apply(KVSettings(prompt_cache_bits=8))
    lru = LRUPromptCache()
    cache, k, v = _filled(KVCache(), 300)
    tokens = list(range(300))
    lru.insert_cache("m", tokens, [cache])
    (live,), rest = lru.fetch_nearest_cache("m", tokens[:200] + [7, 7])
    assert rest == [7, 7] and type(live) is KVCache and live.offset == 200
    assert mx.array_equal(live.keys[..., :200, :], _requantized(k)[..., :200, :]).item()


def test_a_hit_generates_what_the_prefix_quantized_at_that_boundary_generates():
    """Greedy decoding after a hit on an entry stored at 8 bits equals, logits bit for
    bit, decoding after a prefill of the prefix whose cache is quantized and dequantized
    by hand, and differs from decoding on the 16-bit prefix (the entry was quantized)."""
    from mlx_lm import load
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_ext.zoo import get_entry, resolve

    mlx_lm_ext.apply(KVSettings(prompt_cache_bits=8, prompt_cache_min_quantize_tokens=64))
    model, _ = load(str(resolve(get_entry("llama-3.2"))))
    prefix = [int(t) for t in mx.random.randint(1, 200, (100,), key=mx.random.key(1))]
    question = [5, 6, 7, 8]

    def greedy(cache, prompt):
        return [lp for _, lp in generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=8)]

    def same(a, b):
        return all(mx.array_equal(x, y).item() for x, y in zip(a, b, strict=True))

    filled = make_prompt_cache(model)
    model(mx.array(prefix)[None], cache=filled)
    lru = LRUPromptCache()
    lru.insert_cache("m", prefix, filled)
    hit, rest = lru.fetch_nearest_cache("m", prefix + question)
    assert rest == question and all(type(c) is KVCache for c in hit)

    by_hand, exact = make_prompt_cache(model), make_prompt_cache(model)
    model(mx.array(prefix)[None], cache=by_hand)
    model(mx.array(prefix)[None], cache=exact)
    for c in by_hand:
        c.keys, c.values = (_requantized(x[..., : c.offset, :]) for x in (c.keys, c.values))
    got = greedy(hit, rest)
    assert same(got, greedy(by_hand, question)) and not same(got, greedy(exact, question))


def _quantized_caches() -> dict[str, Any]:
    """One of every quantized class a prompt-cache file can hold, with tokens in it."""
    from mlx_lm_ext.caches.batch_keep_ring import BatchKeepQuantizedRotatingKVCache
    from mlx_lm_ext.caches.batch_quantized import BatchQuantizedKVCache, BatchQuantizedRotatingKVCache

    def full(**fmt):
        return _filled(KVCache(), 300)[0].to_quantized(group_size=64, bits=8, **fmt)

    def ring():
        filled = _filled(RotatingKVCache(max_size=128, keep=4), 200, chunk=1)[0]
        return filled.to_quantized(group_size=64, bits=4)

    return {
        "uniform": full(),
        "K8V4": full(value_bits=4),
        "rotated": full(value_bits=4, rotate="all"),
        "ring": ring(),
        "from a batch": BatchQuantizedKVCache.merge([full(), full()]).extract(1),
        "ring from a batch": BatchQuantizedRotatingKVCache.merge([ring(), ring()]).extract(0),
        "keep ring from a batch": BatchKeepQuantizedRotatingKVCache.merge([ring(), ring()]).extract(1),
        "list": CacheList(full(), ring()),
    }


def _described(cache: Any) -> list:
    from mlx_lm_ext import layout
    from mlx_lm_ext.caches import kv_format

    leaves = [c for _, c in layout.leaves([cache])]
    return [(type(c), c.offset, getattr(c, "_idx", None), kv_format.fmt(c)) for c in leaves]


def test_prompt_cache_files_round_trip_every_quantized_class_byte_identically(tmp_path):
    """save_prompt_cache / load_prompt_cache (what mlx_lm.cache_prompt writes): saved
    again after loading, the file is the same bytes, and the class, format and arrays
    come back."""
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    for name, cache in _quantized_caches().items():
        first, second = tmp_path / f"{name}-1.safetensors", tmp_path / f"{name}-2.safetensors"
        save_prompt_cache(str(first), [cache], {"k": "v"})
        (loaded,), meta = load_prompt_cache(str(first), return_metadata=True)
        save_prompt_cache(str(second), [loaded], meta)
        assert first.read_bytes() == second.read_bytes(), name
        assert _described(loaded) == _described(cache), name
        pairs = zip(tree_flatten(loaded.state), tree_flatten(cache.state), strict=True)
        same = (  # arrays, and the scalars older releases keep in state
            mx.array_equal(a, b).item() if isinstance(a, mx.array) else a == b for (_, a), (_, b) in pairs
        )
        assert all(same), name
