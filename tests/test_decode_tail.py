"""A quantized cache with a 16-bit decode tail stores what upstream stores and attends to
every row once: quantized rows as upstream quantizes them, the newest at 16 bits.

The tail is installed only where the flash kernel runs (CUDA); here it is installed by
hand, and attention over it takes the dequantizing path (`decode_steps_match_reference`
runs on the GPU too, from tests/test_kernels.py, through the flash kernel).
"""

from __future__ import annotations

import copy
import io

import mlx.core as mx
import pytest
from mlx_lm.models.cache import KVCache, QuantizedKVCache

import mlx_lm_ext
from mlx_lm_ext import kernels
from mlx_lm_ext.caches import kv_format
from mlx_lm_ext.fixes import BY_NAME, quantized_attention
from mlx_lm_ext.fixes import quantized_decode_tail as decode_tail
from mlx_lm_ext.fixes.quantized_attention import scaled_dot_product_attention
from mlx_lm_ext.fixes.quantized_decode_tail import TAIL_ROWS


@pytest.fixture
def tail():
    decode_tail.FIX.apply()
    yield decode_tail.FIX
    decode_tail.FIX.revert()


def _rows(n: int, heads: int = 2, dim: int = 64, seed: int = 0) -> tuple[mx.array, mx.array]:
    k, v = mx.random.normal((2, 1, heads, n, dim), key=mx.random.key(seed))
    return k.astype(mx.bfloat16), v.astype(mx.bfloat16)


def _fill(cache, k, v, prompt: int, end: int | None = None) -> None:
    """A prompt chunk, then one token a step up to row `end` (all rows: None)."""
    cache.update_and_fetch(k[..., :prompt, :], v[..., :prompt, :])
    for t in range(prompt, end or k.shape[2]):
        cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])


def _same(a, b, rows: int) -> bool:
    return all(mx.array_equal(x[..., :rows, :], y[..., :rows, :]).item() for x, y in zip(a, b, strict=True))


def test_state_holds_exactly_what_upstream_stores(tail):
    k, v = _rows(300)
    cache = QuantizedKVCache(group_size=32, bits=4)
    _fill(cache, k, v, prompt=21)
    assert 0 < vars(cache)["_pending"] < TAIL_ROWS  # decode went through the tail
    keys, values, offset, *_ = cache.state
    assert offset == 300 and vars(cache)["_pending"] == 0
    assert _same(keys, mx.quantize(k, 32, 4), 300) and _same(values, mx.quantize(v, 32, 4), 300)


def test_the_tail_is_quantized_every_tail_rows_tokens(tail):
    k, v = _rows(10 + 3 * TAIL_ROWS)
    cache = QuantizedKVCache()
    cache.update_and_fetch(k[..., :10, :], v[..., :10, :])
    pending = []
    for t in range(10, k.shape[2]):
        keys, values = cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        pending.append(keys.tail.keys.shape[2])
        assert keys[0].shape[2] + pending[-1] == cache.offset == t + 1
        assert mx.array_equal(keys.tail.keys[..., -1:, :], k[..., t : t + 1, :]).item()
    assert pending == list(range(1, TAIL_ROWS + 1)) * 3


def test_a_flush_with_room_writes_the_buffers_in_place(tail, monkeypatch):
    """Every layer flushes on the same step, so a flush's host time is paid 32 times at
    once: where the buffers have room it writes the quantized rows itself (no detour
    through upstream's update, its property reads and its discarded views); only a
    flush that must grow the buffers takes upstream's update. The bytes stay upstream's
    (test_state_holds_exactly_what_upstream_stores)."""
    upstream = decode_tail._upstream
    calls = []

    def counted(name):
        calls.append(name)
        return upstream(name)

    monkeypatch.setattr(decode_tail, "_upstream", counted)
    k, v = _rows(10 + 4 * TAIL_ROWS)
    cache = QuantizedKVCache(bits=8)
    _fill(cache, k, v, prompt=10, end=11 + 3 * TAIL_ROWS)  # three flushes inside 256 rows
    assert calls.count("update_and_fetch") == 1  # the prompt chunk's, before any tail
    for t in range(11 + 3 * TAIL_ROWS, k.shape[2]):
        cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
    assert calls.count("update_and_fetch") == 1
    keys = cache.keys  # the fourth flush passes row 256: the buffers grow, upstream's way
    assert calls.count("update_and_fetch") == 2 and keys[0].shape[2] > 256 and cache.offset == k.shape[2]
    assert _same(cache.keys, mx.quantize(k, 64, 8), k.shape[2])


def decode_steps_match_reference(
    bits: int, n_q: int = 8, steps: int = 150, value_bits: int | None = None, rotate: str | None = None,
    dim: int = 128, heads: int = 2,
) -> None:  # fmt: skip
    """Each step attends through the cache's `Pending` triples, with the cache and without
    (Gemma 4's KV-shared layers), as attention over the dequantized rows followed by the
    tail's 16-bit rows computed from the inputs: no row missing, none counted twice. With
    a format (caches/kv_format.py), each half at its width, in the rotated basis."""
    vbits = value_bits or bits
    k, v = _rows(40 + steps, heads=heads, dim=dim, seed=bits)
    queries = mx.random.normal((1, n_q, steps, dim), key=mx.random.key(7)).astype(mx.bfloat16)
    cache = QuantizedKVCache(group_size=64, bits=bits, **kv_format.format_args(bits, vbits, rotate))
    cache.update_and_fetch(k[..., :40, :], v[..., :40, :])
    hk = kv_format.hadamard(k) if rotate else k
    hv = kv_format.hadamard(v) if rotate == "all" else v
    worst = 0.0
    for s in range(steps):
        t = 40 + s
        keys, values = cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        q = queries[..., s : s + 1, :]
        split = keys[0].shape[2]  # rows quantized so far; the rest are the tail
        ref_k, ref_v = (
            mx.concatenate(
                [mx.dequantize(*mx.quantize(x[..., :split, :], 64, w), 64, w), x[..., split : t + 1, :]], 2
            )
            for x, w in ((hk, bits), (hv, vbits))
        )
        hq = kv_format.hadamard(q) if rotate else q
        want = mx.fast.scaled_dot_product_attention(hq, ref_k, ref_v, scale=0.088, mask=None)
        want = kv_format.hadamard(want) if rotate == "all" else want
        for owner in (cache, None):
            got = scaled_dot_product_attention(q, keys, values, owner, scale=0.088, mask=None)
            worst = max(worst, mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item())
    # bf16 outputs of unit-scale values: a bf16 step is 1/64 from 2 up, and the reference
    # rounds the rotated queries where the kernel does not (H200: 0.023 at K8V4 keys-rotated, 256 dims)
    assert worst < 3e-2
    assert vars(cache)["_pending"] == steps % TAIL_ROWS or steps % TAIL_ROWS == 0


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("strided", [True, False])
def test_decode_steps_match_reference(tail, bits, strided, monkeypatch):
    """Also where quantized_matmul rejects strided views (as on CUDA): attention then
    reads the cache's whole buffers, as stored, and must not quantize the tail."""
    monkeypatch.setattr(quantized_attention, "strided_quantized_matmul", lambda: strided)
    decode_steps_match_reference(bits)


# (key bits, value bits, rotate, head dim, query heads per KV head): Gemma 3's global
# layers are the last (1 KV head of 256 dims, 4 query heads).
FORMATS = [(8, 4, None, 128, 4), (8, 4, "keys", 128, 4), (8, 4, "all", 128, 4), (8, 8, "keys", 256, 4),
           (8, 4, "keys", 256, 4), (8, 4, "all", 256, 4), (4, 4, "keys", 64, 1)]  # fmt: skip


@pytest.fixture
def formats_and_tail():
    """The kv-format fix, then the tail over it (the registry's order)."""
    BY_NAME["kv-format"].apply()
    decode_tail.FIX.apply()
    yield
    decode_tail.FIX.revert()
    BY_NAME["kv-format"].revert()


@pytest.mark.parametrize("bits,value_bits,rotate,dim,group", FORMATS)
def test_decode_steps_match_reference_in_every_format(formats_and_tail, bits, value_bits, rotate, dim, group):
    decode_steps_match_reference(bits, group, 100, value_bits, rotate, dim, heads=1)


def test_every_reader_sees_every_row(tail):
    k, v = _rows(120)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=100)
    want = mx.quantize(k, 64, 8)
    clone = copy.deepcopy(cache)
    assert _same(clone.keys, want, 120) and clone.offset == 120
    tail_bytes = 2 * k[..., :TAIL_ROWS, :].nbytes
    buffers = sum(x.nbytes for x in (*vars(cache)["keys"], *vars(cache)["values"]))
    assert cache.nbytes == buffers + tail_bytes  # the 16-bit tail is memory too
    assert cache.trim(5) == 5 and cache.offset == 115
    cache.update_and_fetch(k[..., 119:, :], v[..., 119:, :])  # row 115 is now token 119
    assert _same(cache.keys, mx.quantize(mx.concatenate([k[..., :115, :], k[..., 119:, :]], 2), 64, 8), 116)


def test_a_prompt_chunk_after_decode_lands_after_the_tail(tail):
    k, v = _rows(200)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=100)  # 100 decode steps: some rows in the tail
    keys, _ = cache.update_and_fetch(k[..., :30, :], v[..., :30, :])  # a chunk of 30
    assert getattr(keys, "tail", None) is None and cache.offset == 230
    assert _same(keys, mx.quantize(mx.concatenate([k, k[..., :30, :]], 2), 64, 8), 230)


def test_loaded_state_replaces_the_tail(tail):
    k, v = _rows(90)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=80)
    other = KVCache()
    other.update_and_fetch(k[..., :50, :], v[..., :50, :])
    cache.state = other.to_quantized(group_size=64, bits=8).state
    assert cache.offset == 50 and vars(cache)["_pending"] == 0
    assert _same(cache.keys, mx.quantize(k, 64, 8), 50)


def test_declined_tail_goes_back_to_upstream_updates(tail):
    k, v = _rows(80)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=60, end=70)
    keys, _ = cache.update_and_fetch(k[..., 70:71, :], v[..., 70:71, :])
    keys.tail.decline()
    keys, _ = cache.update_and_fetch(k[..., 71:72, :], v[..., 71:72, :])
    assert getattr(keys, "tail", None) is None and keys[0].shape[2] == cache.offset == 72
    assert _same(keys, mx.quantize(k, 64, 8), 72)


def test_undo_quantizes_pending_rows_and_restores_the_class():
    original = QuantizedKVCache.update_and_fetch
    decode_tail.FIX.apply()
    k, v = _rows(75)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=70)
    decode_tail.FIX.revert()
    assert not decode_tail.installed() and "keys" not in vars(QuantizedKVCache)
    assert QuantizedKVCache.update_and_fetch is original
    assert cache.offset == 75 and _same(cache.keys, mx.quantize(k, 64, 8), 75)


@pytest.mark.parametrize("kernels_run", [True, False])
def test_installed_only_where_the_flash_kernel_reads_tails(kernels_run, monkeypatch):
    """Never without our quantized attention (upstream's would attend to the quantized
    rows and drop the tail); with it, exactly where the flash kernels run."""
    monkeypatch.setattr(kernels, "available", lambda: kernels_run)
    mlx_lm_ext.revert()
    try:
        assert mlx_lm_ext.apply(only=["quantized-decode-tail"]) == []
        assert not decode_tail.installed()
        applied = mlx_lm_ext.apply(only=["quantized-attention", "quantized-decode-tail"])
        assert ("quantized-decode-tail" in applied) is decode_tail.installed() is kernels_run
        assert not BY_NAME["quantized-decode-tail"].needed()  # applied once, never twice
    finally:
        mlx_lm_ext.revert()
    assert not decode_tail.installed()


def test_flash_plan_leaves_room_for_the_tail_chunk():
    rows = 16
    assert kernels.flash_plan(rows, 128, 8, 64, 8, 4096, TAIL_ROWS) is not None
    assert kernels.flash_plan(rows, 128, 8, 64, 8, 4096, kernels.FLASH_SMEM // rows + 1) is None
    for length in (1, 5000, 200_000, 262_000):
        plan = kernels.flash_plan(rows, 128, 8, 64, 8, length, TAIL_ROWS)
        assert plan is None or (plan[2] + 1) * rows <= kernels.FLASH_SMEM


class _Decoder:
    """A stand-in for kernels.FlashDecoder: records what it was made with and each call."""

    def __init__(self, made: list, queries, packed, length, scale, flags):
        self.q_keys, self.length, self.flags, self.stale, self.calls = packed.keys, length, flags, False, []
        made.append(self)

    def __call__(self, queries, mask=None, sinks=None, tail=None):
        self.calls.append((mask, sinks, tail))
        return queries


def _decoders(monkeypatch) -> list:
    made: list = []
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "flash_decoder", lambda *a: _Decoder(made, *a))
    monkeypatch.setattr(kernels, "flash_decode", lambda *a: pytest.fail("a block step went the long way"))
    return made


def test_decode_hands_the_flash_kernel_the_caches_own_arrays(tail, monkeypatch):
    """Where the flash kernel runs, a decode step over a tail goes straight to it with the
    views of the quantized rows the cache made for this block and the tail's whole
    buffers with its row count, and the step's own row to write there: no slice, copy,
    slice update or upload op a layer a step. The launch is made once a block, on its
    first step, and the block's other steps reuse it."""
    made = _decoders(monkeypatch)
    k, v = _rows(300, heads=2, dim=128)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=200, end=234)  # 34 decode steps: 34 rows in the tail
    q = mx.zeros((2, 1, 8, 1, 128), mx.bfloat16)[0]
    steps = []
    for t in (234, 235):
        steps.append((k[..., t : t + 1, :], v[..., t : t + 1, :]))
        keys, values = cache.update_and_fetch(*steps[-1])
        scaled_dot_product_attention(q, keys, values, cache, scale=0.1, mask=None)
    (decoder,) = made
    assert all(a is b for a, b in zip(decoder.q_keys, vars(cache)["_views"][1], strict=True))
    assert decoder.length == 200 and decoder.q_keys[0].shape[2] == 200  # views: the buffer holds 256
    assert decoder.flags == (False, False, True, True)  # a tail, and the row the launch writes
    (_, _, rows1), (_, _, rows2) = decoder.calls
    assert rows1.key_buffer is vars(cache)["_tail"][0] and rows1.value_buffer is vars(cache)["_tail"][1]
    assert (rows1.rows, rows2.rows) == (35, 36) and rows1.key_buffer.shape[2] == TAIL_ROWS
    assert all(a is b for a, b in zip(rows2.incoming, steps[1], strict=True))
    assert rows2.writes is vars(cache)["_writes"] and rows2.writes.row is rows2.incoming


def test_a_new_block_a_mask_or_forgotten_plans_make_the_launch_again(tail, monkeypatch):
    """The reused launch holds the block's views: a flush (new views) makes a new one; a
    step with a mask takes the general path; so does one after `forget_plans` (a
    benchmark's other launch constants), whose next block step makes a fresh launch."""
    made = _decoders(monkeypatch)
    masked = []
    monkeypatch.setattr(kernels, "flash_decode", lambda q, *a: masked.append(a) or q)
    k, v = _rows(400, heads=2, dim=128)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=200, end=200 + TAIL_ROWS - 1)
    q = mx.zeros((1, 8, 1, 128), mx.bfloat16)

    def step(t: int, mask=None) -> None:
        keys, values = cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        scaled_dot_product_attention(q, keys, values, cache, scale=0.1, mask=mask)

    step(263)  # the block's last step
    step(264)  # a flush, then the next block's first
    assert [d.length for d in made] == [200, 264]
    step(265, mask=mx.zeros((1, 1, 1, 266)))
    assert len(masked) == 1 and len(made) == 2
    made[-1].stale = True
    step(266)
    step(267)
    assert [d.length for d in made] == [200, 264, 264] and len(made[-1].calls) == 2


def test_tail_keys_are_its_first_rows(tail):
    k, v = _rows(100)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=50, end=60)
    keys, values = cache.update_and_fetch(k[..., 60:61, :], v[..., 60:61, :])
    rows = keys.tail
    assert rows.rows == 11 and rows.key_buffer.shape[2] == TAIL_ROWS
    assert mx.array_equal(rows.keys, k[..., 50:61, :]).item()
    assert mx.array_equal(rows.values, v[..., 50:61, :]).item()


def test_a_steps_row_waits_for_its_launch_or_the_next_reader(tail):
    """The update adds no op to a step: the step's row waits as the tail's `incoming`
    for the flash launch that attends to it (here none runs). The next update writes a
    row no launch took with two slice updates before taking its own, and so does any
    reader of the buffers (`settle`)."""
    k, v = _rows(100)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=50, end=60)
    writes, (key_buffer, value_buffer) = vars(cache)["_writes"], vars(cache)["_tail"]
    assert mx.array_equal(writes.row[0], k[..., 59:60, :]).item() and vars(cache)["_pending"] == 10
    assert _same((key_buffer, value_buffer), (k[..., 50:, :], v[..., 50:, :]), 9)  # by the next updates
    assert not mx.array_equal(key_buffer[..., 9:10, :], k[..., 59:60, :]).item()  # not yet
    decode_tail.settle(cache)
    assert writes.row is None and _same(vars(cache)["_tail"], (k[..., 50:, :], v[..., 50:, :]), 10)


def test_a_reader_after_a_launch_is_ordered_after_it(tail):
    """A launch's write into its input is no op MLX sees: the launch records itself
    (TailWrites.kernel) and a reader of the buffers after it (a flush, `state`) first
    makes them depend on it, so it quantizes the row the launch wrote."""
    k, v = _rows(100)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=50, end=60)
    writes, before = vars(cache)["_writes"], vars(cache)["_tail"]
    launch = mx.ones((1,)) * 2  # stands in for the launch's output
    writes.row, writes.kernel = None, launch  # as FlashDecoder leaves them
    decode_tail.settle(cache)
    after = vars(cache)["_tail"]
    assert writes.kernel is None and all(a is not b for a, b in zip(after, before, strict=True))
    graph = io.StringIO()
    mx.export_to_dot(graph, after[0])
    assert "Depends" in graph.getvalue()


def test_a_copy_never_shares_a_tail(tail):
    """The flash launch writes rows into the tail's buffers in place, and MLX's copies
    share an array's buffer: a copy (mlx-lm's prompt cache deep-copies its entries) gets
    the pending rows quantized first and no tail, and the two then decode apart."""
    k, v = _rows(200)
    k2, v2 = _rows(200, seed=1)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=100, end=110)
    for copied in (copy.copy(cache), copy.deepcopy(cache)):
        assert vars(cache)["_pending"] == 0 and not set(decode_tail.TAIL_STATE) & set(vars(copied))
        assert copied.offset == 110 and _same(copied.state[0], mx.quantize(k, 64, 8), 110)
    other = copy.deepcopy(cache)
    for t in range(110, 180):  # past a flush: each writes its own tail's first rows again
        cache.update_and_fetch(k[..., t : t + 1, :], v[..., t : t + 1, :])
        other.update_and_fetch(k2[..., t : t + 1, :], v2[..., t : t + 1, :])
    mixed = mx.concatenate([k[..., :110, :], k2[..., 110:, :]], axis=2)
    assert _same(cache.state[0], mx.quantize(k, 64, 8), 180)
    assert _same(other.state[0], mx.quantize(mixed, 64, 8), 180)


def test_a_shape_the_flash_kernel_declines_hands_the_tail_back(tail, monkeypatch):
    """No flash plan for the shape: this step dequantizes (attention over the quantized
    rows as upstream stores them and the tail's 16-bit rows) and the cache quantizes
    every token from its next update on."""
    k, v = _rows(120, heads=2, dim=128)
    cache = QuantizedKVCache()
    _fill(cache, k, v, prompt=100, end=119)
    keys, values = cache.update_and_fetch(k[..., 119:, :], v[..., 119:, :])
    split = keys[0].shape[2]
    assert (split, keys.tail.rows) == (100, 20)
    q = mx.random.normal((1, 4, 1, 128), key=mx.random.key(1)).astype(mx.bfloat16)
    ref_k, ref_v = (
        mx.concatenate([mx.dequantize(*mx.quantize(x[..., :split, :], 64, 8), 64, 8), x[..., split:, :]], 2)
        for x in (k, v)
    )
    want = mx.fast.scaled_dot_product_attention(q, ref_k, ref_v, scale=0.1, mask=None)
    monkeypatch.setattr(kernels, "available", lambda: True)
    monkeypatch.setattr(kernels, "flash_plan", lambda *a: None)
    got = scaled_dot_product_attention(q, keys, values, cache, scale=0.1, mask=None)
    # measured max |error| 0 to bf16 rounding of unit-scale outputs; bound a few bf16 ulps
    assert mx.abs(got.astype(mx.float32) - want.astype(mx.float32)).max().item() < 2e-2
    assert vars(cache).get("_tail_off")
    keys, _ = cache.update_and_fetch(k[..., :1, :], v[..., :1, :])
    assert getattr(keys, "tail", None) is None and vars(cache)["_pending"] == 0
    assert _same(keys, mx.quantize(mx.concatenate([k, k[..., :1, :]], 2), 64, 8), 121)
