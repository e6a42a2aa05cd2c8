"""BatchKeepRotatingKVCache: every row attends to exactly what RotatingKVCache(max_size,
keep) holds alone, through right-padded prompt chunks, decode past several laps, a
finished row filtered out and a batch with history joining; extract gives the lone
ring's tokens in order."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import RotatingKVCache

from mlx_lm_ext.caches.batch_keep_ring import (
    BatchKeepQuantizedRotatingKVCache,
    BatchKeepRotatingKVCache,
    batch_keep_to_quantized,
)
from mlx_lm_ext.caches.quantized_rotating import QuantizedRotatingKVCache
from mlx_lm_ext.fixes.quantized_attention import scaled_dot_product_attention

MAX, KEEP, H, D = 24, 4, 2, 64
CHUNK = 8
BITS = (None, 8)


def _ring(bits: int | None):
    return RotatingKVCache(MAX, KEEP) if bits is None else QuantizedRotatingKVCache(MAX, KEEP, 64, bits)


def _batch(bits: int | None):
    return BatchKeepRotatingKVCache if bits is None else BatchKeepQuantizedRotatingKVCache


def _kv(row: int, pos: int) -> tuple[mx.array, mx.array]:
    k, v = mx.random.normal((2, 1, H, 1, D), key=mx.random.key(1000 * row + pos))
    return k, v


def _rows(rows: list[int], starts: list[int], n: int, lengths: list[int]):
    """Keys and values of n positions from each row's start; zeros past its length."""
    ks, vs = [], []
    for r, s, length in zip(rows, starts, lengths, strict=True):
        kv = [_kv(r, p) if p < length else (mx.zeros((1, H, 1, D)),) * 2 for p in range(s, s + n)]
        ks.append(mx.concatenate([k for k, _ in kv], axis=2))
        vs.append(mx.concatenate([v for _, v in kv], axis=2))
    return mx.concatenate(ks), mx.concatenate(vs)


def _attend(q, k, v, mask, cache=None):
    if isinstance(k, tuple):  # quantized: the package's attention over the triples
        return scaled_dot_product_attention(q, k, v, cache, scale=D**-0.5, mask=mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=mask)


def _close(a, b) -> bool:
    return mx.allclose(a.astype(mx.float32), b.astype(mx.float32), atol=1e-4).item()


class Lone:
    """The rows as upstream's sequential rings, fed the same chunks."""

    def __init__(self, rows: list[int], bits: int | None, history: dict[int, int] | None = None):
        self.rows, self.caches = list(rows), {r: _ring(bits) for r in rows}
        for r, n in (history or {}).items():  # a prompt chunk, then decoded tokens
            self.write(r, 0, min(CHUNK, n))
            for p in range(CHUNK, n):
                self.write(r, p, 1)

    def write(self, r: int, start: int, n: int, q: mx.array | None = None):
        cache = self.caches[r]
        mask = cache.make_mask(n) if n > 1 else None
        k, v = _rows([r], [start], n, [start + n])
        keys, values = cache.update_and_fetch(k, v)
        return None if q is None else _attend(q, keys, values, mask, cache)


def _prefill(batch, lone, rows, lengths, q_seed, chunk=CHUNK):
    start = [lone.caches[r].offset for r in rows]
    padded = max(lengths)
    batch.prepare(lengths=lengths, right_padding=[padded - n for n in lengths])
    for s in range(0, padded, chunk):
        n = min(chunk, padded - s)
        q = mx.random.normal((len(rows), 2 * H, n, D), key=mx.random.key(q_seed + s))
        mask = batch.make_mask(n)
        k, v = _rows(rows, [a + s for a in start], n, [a + m for a, m in zip(start, lengths, strict=True)])
        got = _attend(q, *batch.update_and_fetch(k, v), mask, batch)
        for i, (r, m) in enumerate(zip(rows, lengths, strict=True)):
            real = max(0, min(n, m - s))
            if real:
                want = lone.write(r, start[i] + s, real, q[i : i + 1, :, :real])
                assert _close(got[i : i + 1, :, :real], want), (r, s)
    batch.finalize()


def _decode(batch, lone, rows, steps, q_seed):
    for t in range(steps):
        q = mx.random.normal((len(rows), 2 * H, 1, D), key=mx.random.key(q_seed + t))
        mask = batch.make_mask(1)
        k, v = _rows(rows, [lone.caches[r].offset for r in rows], 1, [10**6] * len(rows))
        got = _attend(q, *batch.update_and_fetch(k, v), mask, batch)
        for i, r in enumerate(rows):
            want = lone.write(r, lone.caches[r].offset, 1, q[i : i + 1])
            assert _close(got[i : i + 1], want), (r, t)


def _same_tokens(batch, lone, rows):
    for i, r in enumerate(rows):
        alone, got = lone.caches[r], batch.extract(i)
        assert got.offset == alone.offset and type(got) is type(alone) and got.keep == KEEP
        want = alone._temporal_order(alone.keys)
        pairs = zip(got.keys, want, strict=True) if isinstance(want, tuple) else [(got.keys, want)]
        assert all(mx.array_equal(a, b).item() for a, b in pairs), r


def _prefilled(bits, rows, lengths, chunk=CHUNK):
    """Lone rings and their batch, both through the same right-padded prompt chunks."""
    lone = Lone(rows, bits)
    batch = _batch(bits).merge([_ring(bits) for _ in rows])
    _prefill(batch, lone, rows, lengths, 10, chunk)
    return lone, batch


@pytest.mark.parametrize("bits", BITS, ids=["16-bit", "8-bit"])
@pytest.mark.parametrize(
    "lengths,chunk",
    [([13, 7, 20], CHUNK), ([60, 7, 30], CHUNK), ([60, 7, 30], 32)],
    ids=["within-the-ring", "past-the-ring", "past-the-ring-chunks-of-32"],
)
def test_rows_attend_as_alone_through_prefill_and_laps(bits, lengths, chunk):
    """Prompts within the ring of 24, and of 60 and 30 tokens past it: before each chunk a
    full row keeps its first 4 and newest 19 tokens, a chunk's queries see the 24 tokens
    up to them (a chunk of 32 is wider than the ring), and the first decode step trims
    to 24, each as the row's ring alone does; then three laps past the ring's end."""
    rows = [0, 1, 2]
    lone, batch = _prefilled(bits, rows, lengths, chunk)
    _same_tokens(batch, lone, rows)
    _decode(batch, lone, rows, 3 * MAX, 100)
    _same_tokens(batch, lone, rows)


@pytest.mark.parametrize("bits", BITS, ids=["16-bit", "8-bit"])
def test_filter_and_a_joining_batch_with_history(bits):
    rows = [0, 1, 2]
    lone, batch = _prefilled(bits, rows, [13, 7, 20])
    _decode(batch, lone, rows, MAX, 200)
    batch.filter([0, 2])  # row 1 finished
    rows = [0, 2]
    # two requests with history (prompt-cache hits: prompt and all fit the ring) join
    joiners = Lone([5, 6], bits, history={5: 12, 6: 9})
    joining = _batch(bits).merge([joiners.caches[5], joiners.caches[6]])
    _prefill(joining, joiners, [5, 6], [6, 11], 300)
    batch.extend(joining)
    lone.caches.update(joiners.caches)
    rows += [5, 6]
    _same_tokens(batch, lone, rows)
    _decode(batch, lone, rows, 2 * MAX, 400)
    _same_tokens(batch, lone, rows)


def test_a_16_bit_batch_crossing_the_start_quantizes_as_its_rows_would():
    """--quantized-kv-start: the 16-bit batch converts and decodes on as each 8-bit
    ring converted at the same point would (the lone rings convert through the
    quantized-rotating-kv-cache fix)."""
    import mlx_lm_ext

    mlx_lm_ext.apply(only=["quantized-rotating-kv-cache"])
    try:
        _convert_and_decode()
    finally:
        mlx_lm_ext.revert()


def _convert_and_decode():
    rows = [0, 1, 2]
    lone16, batch = _prefilled(None, rows, [13, 7, 20])
    _decode(batch, lone16, rows, MAX, 500)
    batch = batch_keep_to_quantized(batch, 64, 8)
    lone = Lone(rows, 8)
    lone.caches = {r: c.to_quantized(group_size=64, bits=8) for r, c in lone16.caches.items()}
    _same_tokens(batch, lone, rows)
    _decode(batch, lone, rows, MAX, 600)
    _same_tokens(batch, lone, rows)


@pytest.mark.parametrize("bits", BITS, ids=["16-bit", "8-bit"])
@pytest.mark.parametrize("then", ["decode", "prefill"])
def test_a_ring_holding_a_chunk_past_its_size_merges_as_its_next_step_trims(bits, then):
    """A ring right after a 30-token chunk holds 30 tokens (a saved prompt cache); the
    batch keeps what the ring's next step keeps, decoding or taking another chunk."""
    lone = Lone([3, 4], bits, history={4: 6})
    lone.write(3, 0, 30)
    batch = _batch(bits).merge([lone.caches[3], lone.caches[4]])
    if then == "prefill":
        _prefill(batch, lone, [3, 4], [12, 9], 900)
    _decode(batch, lone, [3, 4], 2 * MAX, 950)
    _same_tokens(batch, lone, [3, 4])


@pytest.mark.parametrize("bits", BITS, ids=["16-bit", "8-bit"])
@pytest.mark.parametrize(
    "history,lengths",
    [(18, [6, 20]), (14, [9, 9]), (40, [20, 30])],
    ids=["chunks-past-the-ring", "no-padding", "a-wrapped-ring-and-prompts-past-it"],
)
def test_a_prompt_batch_mixing_a_cached_prefix_and_a_fresh_row(bits, history, lengths):
    """A prompt-cache hit batched with a fresh request: the chunks' columns may run past
    max_size (each row still fits its ring), and without padding there is no finalize;
    the first decode step lays both rows out as alone."""
    lone = Lone([7, 8], bits, history={7: history})
    batch = _batch(bits).merge([lone.caches[7], lone.caches[8]])
    _prefill(batch, lone, [7, 8], lengths, 700)
    _same_tokens(batch, lone, [7, 8])
    _decode(batch, lone, [7, 8], 2 * MAX, 800)
    _same_tokens(batch, lone, [7, 8])
