"""cuda-prefill: prompt chunks paced layer by layer and batch masks made additive leave
every token as it was; decode steps are left alone; revert restores every binding.

The fix is installed only on CUDA, so these CPU tests install it by hand; the memory it
saves is a GPU figure (the `gpu` test below, and benchmarks/prefill_memory.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator
from mlx_lm.models import base, llama
from mlx_lm.models.cache import BatchKVCache, KVCache, QuantizedKVCache, RotatingKVCache

from mlx_lm_ext.caches.quantized_rotating import QuantizedRotatingKVCache
from mlx_lm_ext.fixes import cuda_prefill
from mlx_lm_ext.report.memory import model_from_config

CONFIG = Path(__file__).parents[1] / "benchmarks" / "configs" / "llama-3.1-8b.json"
LAYERS = 4


def _model(layers: int = LAYERS, hidden: int = 128, mlp: int = 256):
    config = json.loads(CONFIG.read_text())
    config.update(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=mlp,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
    )
    mx.random.seed(0)
    net = model_from_config(config)
    mx.eval(net.parameters())
    return net


@pytest.fixture
def fix():
    cuda_prefill.FIX.apply()
    yield cuda_prefill.FIX
    cuda_prefill.FIX.revert()


def _prompts(lengths) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 290 + 5 for j in range(n)] for i, n in enumerate(lengths)]


def _greedy(model, prompts: list[list[int]], tokens: int = 6, step: int = 128, watch=None, **kw):
    """Greedy tokens a prompt of a BatchGenerator run (`kw` its own); `watch(gen)` after
    every step."""
    gen = BatchGenerator(model, max_tokens=tokens, prefill_step_size=step, stop_tokens=[], **kw)
    uids = gen.insert(prompts)
    out = {u: [] for u in uids}
    try:
        while True:
            _, responses = gen.next()
            if watch is not None:
                watch(gen)
            for r in responses:
                out[r.uid].append(r.token)
            busy = gen._unprocessed_sequences or len(gen._prompt_batch) or len(gen._generation_batch)
            if not (responses or busy):
                break
    finally:
        gen.close()
    return [out[u] for u in uids]


@pytest.mark.parametrize("lengths", [(300, 170, 65), (200, 200)], ids=["ragged", "even"])
def test_batched_greedy_tokens_unchanged(lengths):
    """Prompts of unequal lengths (padding masks) in chunks over the 64-token line, and
    of one length (no row padded: the chunks attend with "causal")."""
    model = _model()
    prompts = _prompts(lengths)
    before = _greedy(model, prompts)
    cuda_prefill.FIX.apply()
    try:
        after = _greedy(model, prompts)
    finally:
        cuda_prefill.FIX.revert()
    assert after == before and all(len(t) == 6 for t in after)


def test_prompt_chunks_paced_once_a_layer_decode_never(fix, monkeypatch):
    started = []
    monkeypatch.setattr(cuda_prefill.mx, "async_eval", lambda *a: started.append(a))
    model = _model()
    cache = [KVCache() for _ in range(LAYERS)]
    mx.eval(model(mx.array([list(range(5, 5 + 200))]), cache=cache))
    assert len(started) == LAYERS
    assert len(cuda_prefill._IN_FLIGHT) == 1  # the last layer's write: started, not awaited
    mx.eval(model(mx.array([[7]]), cache=cache))
    mx.eval(model(mx.array([list(range(5, 45))]), cache=cache))  # under 64 rows, no growth
    assert len(started) == LAYERS
    while cache[0].offset < cache[0].keys.shape[-2]:  # decode to the buffer's end
        mx.eval(model(mx.array([[7]]), cache=cache))
    assert len(started) == LAYERS
    mx.eval(model(mx.array([[7]]), cache=cache))  # this step grows every layer's buffer
    assert len(started) == 2 * LAYERS


def test_buffer_rows_read_from_arrays_and_quantized_triples():
    """A write that replaced a layer's buffer reads its rows (to catch a growth step)."""
    plain, packed = KVCache(), QuantizedKVCache(group_size=64, bits=8)
    assert cuda_prefill._rows(plain) == cuda_prefill._rows(packed) == 0
    x = mx.random.normal((1, 2, 100, 64))
    plain.update_and_fetch(x, x)
    packed.update_and_fetch(x, x)
    assert cuda_prefill._rows(plain) == plain.keys.shape[-2] == 256
    assert cuda_prefill._rows(packed) == vars(packed)["keys"][0].shape[-2] == 256


def test_marker_runs_the_write_and_holds_nothing(fix):
    cache = QuantizedKVCache(group_size=64, bits=8)
    k = mx.random.normal((1, 2, 100, 64))
    out = cache.update_and_fetch(k, k)
    marker = cuda_prefill._IN_FLIGHT[0]
    assert marker.shape == () and marker.dtype == mx.float32
    mx.eval(marker)
    expected = sum(x[(0,) * x.ndim].astype(mx.float32) for x in (*out[0], *out[1]))
    assert mx.allclose(marker, expected).item()


def test_prompt_masks_become_additive_decode_masks_stay(fix, monkeypatch):
    seen = []
    inner = cuda_prefill.FIX.patcher.original(base, "scaled_dot_product_attention")

    def spy(*args, mask, **kwargs):
        seen.append(mask)
        return inner(*args, mask=mask, **kwargs)

    wrapped = cuda_prefill.prefill_attention(spy)
    q = mx.random.normal((2, 4, 3, 64))
    k = mx.random.normal((2, 2, 5, 64))
    mask = mx.array([[[[True] * 5] * 3], [[[False, True, True, True, True]] * 3]])
    ref = inner(q, k, k, None, scale=0.1, mask=mask)
    out = wrapped(q, k, k, None, scale=0.1, mask=mask)
    assert seen[-1].dtype == q.dtype and seen[-1][1, 0, 0, 0].item() == -float("inf")
    assert mx.allclose(out, ref, atol=1e-5).item()
    wrapped(q[:, :, :1], k, k, None, scale=0.1, mask=mask[:, :, :1])
    assert seen[-1].dtype == mx.bool_


def test_unfused_head_dims_keep_the_boolean_mask(fix, monkeypatch):
    """Gemma's 256-wide heads attend unfused (in blocks): the boolean mask goes through
    as it is, with the same output as one call on it."""
    seen = []
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(cuda_prefill, "SCORE_BYTES", 40 * 2 * 4 * 160 * 4)
    monkeypatch.setattr(
        mx.fast,
        "scaled_dot_product_attention",
        lambda *a, mask, **kw: seen.append(mask) or real(*a, mask=mask, **kw),
    )
    q, k, v = _gemma_chunk()
    mask = mx.arange(160)[None, None, None] >= mx.array([0, 30])[:, None, None, None]
    mask = mask & (mx.arange(64, 160)[:, None] >= mx.arange(160)[None])
    wrapped = cuda_prefill.prefill_attention(base.scaled_dot_product_attention)
    out = wrapped(q, k, v, None, scale=0.06, mask=mask)
    assert len(seen) == 3 and all(m.dtype == mx.bool_ for m in seen) and not cuda_prefill._ADDITIVE
    assert mx.allclose(out, real(q, k, v, scale=0.06, mask=mask), atol=1e-4).item()


def test_a_chunk_mask_is_made_additive_once_for_every_layer(fix, monkeypatch):
    """Every layer gets the one additive copy of the chunk's mask; it goes with the mask."""
    seen = []
    monkeypatch.setattr(base, "scaled_dot_product_attention", lambda *a, mask, **kw: seen.append(mask))
    wrapped = cuda_prefill.prefill_attention(base.scaled_dot_product_attention)
    q, k = mx.zeros((2, 4, 3, 64)), mx.zeros((2, 2, 5, 64))
    mask = mx.arange(5)[None, None, None] >= mx.array([0, 2])[:, None, None, None]
    for _ in range(LAYERS):
        wrapped(q, k, k, None, scale=0.1, mask=mask)
    wrapped(q.astype(mx.float16), k, k, None, scale=0.1, mask=mask)
    assert all(m is seen[0] for m in seen[:LAYERS]) and seen[-1] is not seen[0]
    assert seen[-1].dtype == mx.float16 and len(cuda_prefill._ADDITIVE) == 2
    del mask
    assert not cuda_prefill._ADDITIVE


def _gemma_chunk(length: int = 96, context: int = 160, batch: int = 2):
    """A prompt chunk of Gemma 3's head shape (4 query heads, 1 KV head x 256)."""
    keys = [mx.random.key(s) for s in range(3)]
    q = mx.random.normal((batch, 4, length, 256), key=keys[0])
    k = mx.random.normal((batch, 1, context, 256), key=keys[1])
    return q, k, mx.random.normal((batch, 1, context, 256), key=keys[2])


MASKS = {
    "none": lambda L, S: None,
    "causal": lambda L, S: "causal",
    "window": lambda L, S: (
        (mx.arange(S)[None] <= mx.arange(S - L, S)[:, None])
        & (mx.arange(S)[None] > mx.arange(S - L, S)[:, None] - 64)
    ),
    "additive": lambda L, S: mx.where(mx.arange(S)[None] % 3 == 0, -mx.inf, 0.0) * mx.ones((L, 1)),
}


@pytest.mark.parametrize("sinks", [False, True], ids=["", "sinks"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_blocked_attention_is_the_fused_call(monkeypatch, mask, sinks):
    """Queries in blocks of 40 (96 = 40 + 40 + 16), every mask kind a prompt chunk
    gets: the same output as one call."""
    q, k, v = _gemma_chunk()
    m = MASKS[mask](96, 160)
    s = mx.array([0.5, -1.0, 0.0, 2.0]) if sinks else None
    monkeypatch.setattr(cuda_prefill, "SCORE_BYTES", 40 * 2 * 4 * 160 * 4)
    assert cuda_prefill.block_rows(q, k) == 40
    ref = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.06, mask=m, sinks=s)
    out = cuda_prefill.blocked_attention(q, k, v, 0.06, m, s)
    assert mx.allclose(out, ref, atol=1e-5).item()


def test_blocked_attention_only_where_scores_are_materialized(monkeypatch):
    q, k, _ = _gemma_chunk()
    monkeypatch.setattr(cuda_prefill, "SCORE_BYTES", 40 * 2 * 4 * 160 * 4)
    assert cuda_prefill.block_rows(q[..., :1, :], k) is None  # decode
    assert cuda_prefill.block_rows(q[..., :128], k[..., :128]) is None  # head dim 128: fused
    monkeypatch.setattr(cuda_prefill, "SCORE_BYTES", 96 * 2 * 4 * 160 * 4)
    assert cuda_prefill.block_rows(q, k) is None  # fits in one block


def test_blocked_attention_bounds_the_scores(monkeypatch):
    """MLX's CPU attention materializes scores for every head dim: 4 x 512 x 2048
    float32 scores are 16 MiB in one call; in blocks of 2 MiB the peak stays a few
    blocks' worth (on CUDA the same holds for head dims past 128)."""
    q, k, v = _gemma_chunk(512, 2048, batch=1)
    mx.eval(q, k, v)
    scores = 4 * 512 * 2048 * 4
    peaks = {}
    for blocks in (1, 8):
        monkeypatch.setattr(cuda_prefill, "SCORE_BYTES", scores // blocks)
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        mx.eval(cuda_prefill.blocked_attention(q, k, v, 0.06, "causal"))
        peaks[blocks] = mx.get_peak_memory() - before
    assert peaks[1] >= scores and peaks[8] <= peaks[1] / 2, peaks


def test_quantized_prompt_chunks_attend_in_blocks(fix, monkeypatch):
    """The quantized cache's prompt chunks (dequantized, then the fused call) go
    through the same blocks."""
    from mlx_lm_ext.fixes import quantized_attention

    calls = []
    monkeypatch.setattr(cuda_prefill, "SCORE_BYTES", 40 * 2 * 4 * 160 * 4)
    real = mx.fast.scaled_dot_product_attention
    monkeypatch.setattr(
        mx.fast,
        "scaled_dot_product_attention",
        lambda q, *a, **kw: calls.append(q.shape[-2]) or real(q, *a, **kw),
    )
    q, k, v = _gemma_chunk()
    ops = quantized_attention.QuantizedOperands(
        mx.quantize(k, group_size=64, bits=8), mx.quantize(v, group_size=64, bits=8), 64, 8
    )
    out = quantized_attention.dequantized_attention(q, ops, 0.06, "causal")
    assert calls == [40, 40, 16] and out.shape == q.shape


def test_dequantized_chunks_wait_for_the_previous_layer(fix, monkeypatch):
    """Each quantized prompt chunk's attention starts its own and awaits the layer
    before (one layer's dequantized rows in flight); a decode step passes as it was."""
    from mlx_lm_ext.fixes import quantized_attention

    started, awaited = [], []
    monkeypatch.setattr(cuda_prefill.mx, "async_eval", lambda *a: started.append(a))
    monkeypatch.setattr(cuda_prefill.mx, "eval", lambda *a: awaited.append(a))
    q = mx.random.normal((1, 4, 64, 64))
    k = mx.random.normal((1, 2, 200, 64))
    ops = quantized_attention.QuantizedOperands(mx.quantize(k, 64, 8), mx.quantize(k, 64, 8), 64, 8, 150)
    want = cuda_prefill.FIX.original(quantized_attention, "dequantized_attention")(q, ops, 0.1, "causal")
    for layer in range(3):
        out = quantized_attention.dequantized_attention(q, ops, 0.1, "causal")
        assert len(started) == layer + 1 and len(awaited) == layer
    assert mx.array_equal(out, want).item() and len(cuda_prefill._ATTENDING) == 1
    quantized_attention.dequantized_attention(q[:, :, :1], ops, 0.1, None)
    assert len(started) == 3 and len(awaited) == 2


def test_revert_restores_every_binding():
    classes = cuda_prefill.cache_classes()
    before = {cls: vars(cls)["update_and_fetch"] for cls in classes}
    attention = llama.scaled_dot_product_attention
    from mlx_lm_ext.fixes import quantized_attention

    dequantized, make_mask = quantized_attention.dequantized_attention, BatchKVCache.make_mask
    assert {KVCache, RotatingKVCache, BatchKVCache, QuantizedRotatingKVCache} <= set(classes)
    cuda_prefill.FIX.apply()
    assert cuda_prefill.installed() and llama.scaled_dot_product_attention is not attention
    assert not cuda_prefill.FIX.needed()  # applied once, never twice
    cuda_prefill.FIX.revert()
    assert {cls: vars(cls)["update_and_fetch"] for cls in classes} == before
    assert llama.scaled_dot_product_attention is attention and not cuda_prefill.installed()
    assert quantized_attention.dequantized_attention is dequantized and BatchKVCache.make_mask is make_mask
    assert quantized_attention.fused_attention is mx.fast.scaled_dot_product_attention
    assert cuda_prefill.FIX.needed() is cuda_prefill.on_cuda()


@pytest.mark.gpu
def test_prefill_peak_bounded_on_cuda():
    """8 prompts x 1024 tokens through a 16-layer model: without the fix every layer's
    intermediates are alive at the chunk's end; with it about two layers'."""
    if not cuda_prefill.on_cuda():
        pytest.skip("needs MLX's CUDA backend")
    model = _model(layers=16, hidden=1024, mlp=4096)
    prompts = [[(7 * i + j) % 290 + 5 for j in range(1024)] for i in range(8)]

    def peak() -> int:
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        base_bytes = mx.get_active_memory()
        _greedy(model, prompts, tokens=1, step=1024)
        return mx.get_peak_memory() - base_bytes

    peak()  # warm-up
    upstream = peak()
    cuda_prefill.FIX.apply()
    try:
        patched = peak()
    finally:
        cuda_prefill.FIX.revert()
    assert patched < 0.4 * upstream, (patched, upstream)


@pytest.mark.gpu
def test_blocked_attention_peak_on_cuda():
    """Gemma 3's head dim (256) has no fused prefill kernel on CUDA: 8 prompts' 2048-query
    chunk over 32K keys materializes 4 GiB of scores in one call (H200, MLX 0.32.4); in
    blocks, two blocks' scores at most."""
    q, k, v = (x.astype(mx.bfloat16) for x in _gemma_chunk(2048, 32768, batch=8))
    mx.eval(q, k, v)
    peaks = {}
    for name, attend in (("one call", mx.fast.scaled_dot_product_attention), ("blocks", None)):
        mx.synchronize()
        mx.reset_peak_memory()
        before = mx.get_active_memory()
        if attend is None:
            out = cuda_prefill.blocked_attention(q, k, v, 0.06, "causal")
        else:
            out = attend(q, k, v, scale=0.06, mask="causal")
        mx.eval(out)
        mx.synchronize()
        peaks[name] = mx.get_peak_memory() - before
    assert peaks["one call"] >= 2**32 and peaks["blocks"] <= 3 * cuda_prefill.SCORE_BYTES, peaks
