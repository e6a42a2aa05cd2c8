"""The decode tail of the batched quantized cache and of the quantized ring: a decode
step writes 16-bit rows, as a 16-bit cache does, and every 64 steps they are quantized
into exactly the rows per-token updates store; attention sees every row once, under the
batch's mask, and a full ring without the rows its pending tokens replace.

As in tests/test_decode_tail.py the tail is installed by hand here (it is installed only
where the flash kernel runs) and attention takes the dequantizing path.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache

from mlx_lm_ext.caches import prompt_store
from mlx_lm_ext.caches.batch_quantized import BatchQuantizedKVCache
from mlx_lm_ext.caches.quantized_rotating import QuantizedRotatingKVCache
from mlx_lm_ext.fixes import quantized_attention
from mlx_lm_ext.fixes import quantized_decode_tail as decode_tail
from mlx_lm_ext.fixes.quantized_attention import scaled_dot_product_attention
from mlx_lm_ext.fixes.quantized_decode_tail import TAIL_ROWS

PADDING = [5, 0, 2]


@pytest.fixture
def tail():
    decode_tail.FIX.apply()
    yield decode_tail.FIX
    decode_tail.FIX.revert()


def _rows(n: int, batch: int = 3, heads: int = 2, dim: int = 64, seed: int = 0):
    k, v = mx.random.normal((2, batch, heads, n, dim), key=mx.random.key(seed))
    return k.astype(mx.bfloat16), v.astype(mx.bfloat16)


def _decoded(k, v, prompt: int, bits: int = 8) -> BatchQuantizedKVCache:
    """A batch cache after a prompt chunk of `prompt` rows, then one row a step."""
    cache = BatchQuantizedKVCache(PADDING, group_size=64, bits=bits)
    cache.update_and_fetch(k[..., :prompt, :], v[..., :prompt, :])
    for t in range(prompt, k.shape[2]):
        cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
    return cache


def _state(cache) -> list:
    keys, values, offset, left_padding, idx = cache.state
    arrays = [*(x[..., :idx, :] for x in keys), *(x[..., :idx, :] for x in values), offset, left_padding]
    mx.eval(arrays)
    return [*arrays, idx]


def _equal(a: list, b: list) -> bool:
    return all(
        x == y if isinstance(x, int) else mx.array_equal(x, y).item() for x, y in zip(a, b, strict=True)
    )


def test_batch_state_holds_exactly_what_per_token_updates_store():
    k, v = _rows(20 + 2 * TAIL_ROWS + 9)
    want = _state(_decoded(k, v, prompt=20))
    decode_tail.FIX.apply()
    try:
        cache = _decoded(k, v, prompt=20)
        assert vars(cache)["_pending"] == 9  # decode went through the tail
        got = _state(cache)
        assert vars(cache)["_pending"] == 0
    finally:
        decode_tail.FIX.revert()
    assert _equal(got, want)


def test_every_batch_operation_sees_the_pending_rows():
    """filter, extend, extract, trim and nbytes on a cache with rows in its tail give what
    they give on one that quantized every token."""
    k, v = _rows(100)
    k2, v2 = _rows(90, seed=1)

    def run():
        a, b = _decoded(k, v, prompt=30), _decoded(k2, v2, prompt=30)
        one = a.extract(1)
        nbytes = a.nbytes
        a.filter([0, 2])
        a.extend(b)
        a.trim(3)
        return [*_state(a), *(x for x in one.keys), one.offset], nbytes

    want, want_bytes = run()
    decode_tail.FIX.apply()
    try:
        cache = _decoded(k, v, prompt=30)
        pending = vars(cache)["_pending"]
        tail_bytes = sum(x.nbytes for x in cache._tail)
        assert 0 < pending and cache.nbytes == want_bytes + tail_bytes and vars(cache)["_pending"] == pending
        got, _ = run()
    finally:
        decode_tail.FIX.revert()
    assert _equal(got, want)


def test_batch_decode_attends_to_every_row_under_the_mask(tail):
    """Each step, through the Pending triples and the mask the batch makes, equals 16-bit
    attention over the dequantized quantized rows and the tail's rows from the inputs."""
    steps, prompt, bits = 80, 24, 8
    k, v = _rows(prompt + steps, seed=3)
    queries = mx.random.normal((3, 4, steps, 64), key=mx.random.key(9)).astype(mx.bfloat16)
    cache = BatchQuantizedKVCache(PADDING, group_size=64, bits=bits)
    cache.update_and_fetch(k[..., :prompt, :], v[..., :prompt, :])
    worst = 0.0
    for s in range(steps):
        t = prompt + s
        mask = cache.make_mask(1, return_array=True)
        keys, values = cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        assert keys.tail.rows == s % TAIL_ROWS + 1
        split = keys[0].shape[2]
        ref_k, ref_v = (
            mx.concatenate(
                [
                    mx.dequantize(*mx.quantize(x[..., :split, :], 64, bits), 64, bits),
                    x[..., split : t + 1, :],
                ],
                2,
            )
            for x in (k, v)
        )
        q = queries[..., s : s + 1, :]
        want = mx.fast.scaled_dot_product_attention(q, ref_k, ref_v, scale=0.125, mask=mask)
        got = scaled_dot_product_attention(q, keys, values, cache, scale=0.125, mask=mask)
        worst = max(worst, mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item())
    assert worst < 3e-2


def test_undo_quantizes_a_batch_caches_pending_rows():
    k, v = _rows(70)
    want = _state(_decoded(k, v, prompt=40))
    decode_tail.FIX.apply()
    cache = _decoded(k, v, prompt=40)
    assert vars(cache)["_pending"] == 30
    decode_tail.FIX.revert()
    assert "keys" not in vars(BatchQuantizedKVCache) and _equal(_state(cache), want)


def test_a_steps_mask_is_converted_once_for_all_layers():
    mask = mx.array([[True, False, True]]).reshape(1, 1, 1, 3)
    first = quantized_attention._decode_mask(mask, 1, 3)
    assert quantized_attention._decode_mask(mask, 1, 3) is first
    assert mx.array_equal(first, mx.array([[0.0, -mx.inf, 0.0]])).item()
    other = quantized_attention._decode_mask(mx.array(mask), 1, 3)
    assert other is not first and mx.array_equal(other, first).item()


# --- the quantized ring (sliding-window layers, --max-kv-size) -------------------------


def _ring(k, v, prompt: int, size: int, keep: int, chunk_at: int | None = None):
    """A quantized ring after a prompt chunk, one row a step, and optionally a second
    chunk of 20 rows at step `chunk_at`."""
    cache = QuantizedRotatingKVCache(size, keep=keep, group_size=64, bits=8)
    cache.update_and_fetch(k[..., :prompt, :], v[..., :prompt, :])
    t = prompt
    while t < k.shape[2]:
        step = 20 if t == chunk_at else 1
        cache.update_and_fetch(k[..., t : t + step, :], v[..., t : t + step, :])
        t += step
    return cache


def _ring_state(cache) -> list:
    keys, values = cache.keys, cache.values
    mx.eval(keys, values)
    return [*keys, *values, cache.offset, cache._idx]


@pytest.mark.parametrize("keep", [0, 4])
@pytest.mark.parametrize("chunk_at", [None, 300 + 2 * TAIL_ROWS + 5])
def test_ring_state_holds_exactly_what_per_token_updates_store(keep, chunk_at):
    """Over more than a lap: a block of pending rows wraps around the ring's end."""
    k, v = _rows(300 + 5 * TAIL_ROWS + 11, batch=1)
    want = _ring_state(_ring(k, v, 300, 256, keep, chunk_at))
    decode_tail.FIX.apply()
    try:
        cache = _ring(k, v, 300, 256, keep, chunk_at)
        assert vars(cache)["_pending"] > 0  # decode went through the tail
        got = _ring_state(cache)
    finally:
        decode_tail.FIX.revert()
    assert _equal(got, want)


@pytest.mark.parametrize("keep", [0, 4])
def test_ring_decode_attends_to_the_newest_window(tail, keep):
    """Each step attends to the ring's rows but those the pending tokens replace, and to
    those tokens at 16 bits: as 16-bit attention over upstream's ring, its rows quantized
    and dequantized but the last n written."""
    size, prompt, steps = 256, 300, 150
    k, v = _rows(prompt + steps, batch=1, seed=5)
    queries = mx.random.normal((1, 4, steps, 64), key=mx.random.key(2)).astype(mx.bfloat16)
    cache = QuantizedRotatingKVCache(size, keep=keep, group_size=64, bits=8)
    plain = RotatingKVCache(size, keep=keep)
    for c in (cache, plain):
        c.update_and_fetch(k[..., :prompt, :], v[..., :prompt, :])
    worst, tails = 0.0, 0
    for s in range(steps):
        t = prompt + s
        keys, values = cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        ring_k, ring_v = plain.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        n = getattr(getattr(keys, "tail", None), "rows", 0)
        tails += n > 0
        newest = [p if p >= keep else p + size - keep for p in (plain._idx - i for i in range(1, n + 1))]
        exact = mx.zeros((size,), mx.bool_)
        if newest:
            exact[mx.array(newest)] = True
        ref_k, ref_v = (
            mx.where(exact[:, None], x, mx.dequantize(*mx.quantize(x, 64, 8), 64, 8))
            for x in (ring_k, ring_v)
        )
        q = queries[..., s : s + 1, :]
        want = mx.fast.scaled_dot_product_attention(q, ref_k, ref_v, scale=0.125, mask=None)
        got = scaled_dot_product_attention(q, keys, values, cache, scale=0.125, mask=None)
        worst = max(worst, mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item())
    assert tails > steps // 2 and worst < 3e-2


def test_a_mask_inside_the_ring_reads_it_as_stored(tail):
    """A model mask over the ring's rows alone (a window smaller than the ring): the tail
    is written into the ring and handed back, and attention reads the ring as stored."""
    k, v = _rows(300 + 10, batch=1, seed=6)
    cache = _ring(k, v, 300, 256, 0)
    keys, values = cache.update_and_fetch(k[..., -1:, :], v[..., -1:, :])
    assert keys.tail.rows == 10  # the first step after the chunk trims the ring (no tail)
    mask = mx.arange(256) % 3 != 0
    q = mx.random.normal((1, 4, 1, 64), key=mx.random.key(4)).astype(mx.bfloat16)
    got = scaled_dot_product_attention(q, keys, values, cache, scale=0.125, mask=mask)
    assert vars(cache)["_pending"] == 0 and vars(cache)["_tail_off"]
    dk, dv = (mx.dequantize(*x, 64, 8) for x in (cache.keys, cache.values))
    want = mx.fast.scaled_dot_product_attention(q, dk, dv, scale=0.125, mask=mask)
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() < 3e-2


def test_a_ring_too_small_for_a_tail_quantizes_every_token(tail):
    k, v = _rows(200, batch=1)
    cache = _ring(k, v, 150, 2 * TAIL_ROWS - 1, 0)
    assert not vars(cache).get("_pending")


def test_a_stored_prompt_cache_entry_leaves_the_rings_tail_behind(tail):
    """The server stores a live ring (pending rows and all) in its prompt cache: the entry
    holds the rows per-token updates store and no tail, and the live ring decodes on."""
    k, v = _rows(300 + 90, batch=1, seed=8)
    cache = _ring(k, v, 300, 256, 4)
    assert vars(cache)["_pending"] > 0
    (entry,) = prompt_store.for_storage([cache], None, 64)
    assert not vars(entry).get("_pending") and "_tail" not in vars(entry)
    decode_tail.FIX.revert()
    try:
        want = _ring_state(_ring(k, v, 300, 256, 4))
    finally:
        decode_tail.FIX.apply()
    assert _equal(_ring_state(entry), want)
    for t in range(5):
        cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
    assert vars(cache)["_pending"] == 5 and _equal(_ring_state(entry), want)


def test_a_stored_entry_starts_without_the_live_rings_tail_state(tail):
    """Not even a declined tail (the mask-inside-the-ring path) follows the entry."""
    k, v = _rows(300 + 90, batch=1, seed=9)
    cache = _ring(k, v, 300, 256, 4)
    cache.decline_tail()
    (entry,) = prompt_store.for_storage([cache], None, 64)
    assert vars(cache)["_tail_off"]
    assert not {"_tail", "_views", "_pending", "_tail_off"} & set(vars(entry))
