"""Continuous batching with a quantized KV cache answers as each request would alone.

BatchGenerator with `kv_bits` (mlx-lm-ext's monkeypatch or patches/0007-0009) against the
same requests run one at a time through generate_step with the same settings and the
same prefill chunks: greedy tokens must be identical. With quantized_kv_start=0 both
paths convert after the first prompt chunk, and quantization works per token row, so
batching (left padding, joins, filters) does not change what any request attends to.
"""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from conftest import DELIVERY
from prompts import entry_prompts

from mlx_lm_ext import layout

pytestmark = pytest.mark.skipif(DELIVERY == "upstream", reason="unpatched BatchGenerator takes no kv_bits")

LENGTHS = [40, 13, 77, 5, 120]  # mixed; 77 and 120 span several prefill chunks
CHUNK = 32
TOKENS = 10
JOIN = 6  # steps between joins: the first group's prompts are all prefilled by then
# The joiners' first-token KL to their lone runs, as a share of 8-bit's own KL (CPU,
# 0.32.2, every stand-in): exactly 0 when they wait for the quantized prompt batch;
# 0.20-0.85, or a different token, on 6 of 8 entries when they join it. Bound 0.05:
# room for a backend whose batched matmul rounds differently.
JOIN_NOISE = 0.05
# A wrapped batch ring's first-token KL to the lone ring (CPU, 0.32.2, the stand-ins):
# 0 on 35 of 40 requests, at most 4.8e-7 (against 8-bit's own 1e-7 to 0.1); bound 5% of
# 8-bit's KL plus 2e-6. Where tokens parted (1 of 40), the lone run's top two were
# 0.031 nats apart; TIE 0.05.
RING_NOISE = 0.05
TIE = 0.05
RING = 48  # shorter than the longer prompts: the batch ring wraps in prefill and decode


def _prompts(entry, loaded, lengths=LENGTHS):
    return entry_prompts(entry, loaded[1], lengths)


def _caches(model, ring: bool):
    from mlx_lm.models.cache import make_prompt_cache

    caches = make_prompt_cache(model, max_kv_size=RING if ring else None)
    if ring:  # batch rings hold no `keep` tokens: give the lone requests none either
        for c in _walk(caches):
            if layout.classify(c) == layout.SLIDING:
                c.keep = 0
    return caches


def _walk(caches):
    return [c for _, c in layout.leaves(caches)]


def _alone(model, prompt, cache, kv_bits=8, start=0):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(
        mx.array(prompt),
        model,
        prompt_cache=cache,
        kv_bits=kv_bits,
        kv_group_size=64,
        quantized_kv_start=start,
        prefill_step_size=CHUNK,
    )
    return [(int(t), lp) for (t, lp), _ in zip(steps, range(TOKENS), strict=False)]


def _batched(model, groups, caches, kv_bits=8, start=0, cancel_at=None, join_every=JOIN):
    """Run `groups` of prompts through one BatchGenerator, group k joining at step k * join_every;
    `cancel_at=(step, index)` removes that request mid-stream. Returns tokens per prompt
    and the generator (to inspect its caches)."""
    from mlx_lm.generate import BatchGenerator

    gen = BatchGenerator(
        model,
        max_tokens=TOKENS,
        prefill_step_size=CHUNK,
        kv_bits=kv_bits,
        kv_group_size=64,
        quantized_kv_start=start,
    )
    order, out, step, pending = [], {}, 0, list(groups)
    gen.finished = {}  # uid -> the cache a finished request leaves (what the server stores)
    while pending or gen._unprocessed_sequences or len(gen._prompt_batch) or len(gen._generation_batch):
        if pending and step % join_every == 0:
            prompts = pending.pop(0)
            uids = gen.insert(prompts, caches=[caches.pop(0) for _ in prompts])
            order += uids
            out.update({u: [] for u in uids})
        if cancel_at and step == cancel_at[0]:
            gen.remove([order[cancel_at[1]]])
        _, responses = gen.next()
        for r in responses:
            out[r.uid].append((r.token, r.logprobs))
            if r.finish_reason is not None:
                gen.finished[r.uid] = r.prompt_cache
        step += 1
    return [out[u] for u in order], gen


def _tokens(runs):
    return [[t for t, _ in run] for run in runs]


def _kl(p, q) -> float:
    import mlx.core as mx

    p, q = p.astype(mx.float32), q.astype(mx.float32)
    return (mx.exp(p) * (p - q)).sum().item()


@pytest.mark.parametrize(
    "ring,kv_bits", [(False, 8), (True, 8), (False, 4)], ids=["kv8", "kv8-ring48", "kv4"]
)
def test_batched_greedy_equals_each_request_alone(entry, loaded, ring, kv_bits):
    model, _ = loaded
    prompts = _prompts(entry, loaded)
    expected = [_alone(model, p, _caches(model, ring), kv_bits=kv_bits) for p in prompts]
    caches = [_caches(model, ring) for _ in prompts]
    # the last two join mid-batch
    got, gen = _batched(model, [prompts[:3], prompts[3:]], caches, kv_bits=kv_bits)
    if not ring:
        assert _tokens(got) == _tokens(expected)
        return
    # A wrapped batch ring holds the lone ring's rows rolled by each request's padding, so
    # attention sums them in another order: logprobs differ by float rounding, which can
    # flip a near-tie. So: the first token's distribution moves by float noise only (far
    # less than 8 bits itself moves it), and where the tokens part, the lone run was at
    # a near-tie (its top two within TIE nats).
    fp16 = [_alone(model, p, _caches(model, ring), kv_bits=None) for p in prompts]
    _assert_as_alone_up_to_sum_order(got, expected, fp16)


def _assert_as_alone_up_to_sum_order(got, expected, fp16):
    """Each request's first token moves by float noise only (far less than 8 bits moves
    it), and where tokens part the lone run was at a near-tie (top two within TIE)."""
    for i, (g, e, f) in enumerate(zip(got, expected, fp16, strict=True)):
        quantization = abs(_kl(f[0][1], e[0][1]))
        assert abs(_kl(e[0][1], g[0][1])) <= RING_NOISE * quantization + 2e-6, i
        n = _prefix(_tokens([g])[0], _tokens([e])[0])
        if n < len(e):
            top = mx.sort(e[n][1].astype(mx.float32))[-2:]
            assert (top[1] - top[0]).item() <= TIE, (i, n, _tokens([g, e]))


def _prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two runs share."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def test_request_joining_a_quantized_prompt_batch_answers_as_alone(entry, loaded):
    """Requests that arrive while another prompt is still prefilling (its cache already
    quantized) wait for that prompt batch and start their own: their first chunk attends
    at 16 bits, as alone. Joined into the quantized batch instead, it attended quantized,
    which moved real Gemma 3 270M's first token 7x what 8-bit quantization does (join KL
    0.066 against 8-bit's 0.0095). The first tokens' distributions must equal the lone
    runs' up to float noise (JOIN_NOISE), far below what 8-bit quantization moves them."""
    model, _ = loaded
    prompts = _prompts(entry, loaded)
    alone8 = [_alone(model, p, _caches(model, False)) for p in prompts]
    alone16 = [_alone(model, p, _caches(model, False), kv_bits=None) for p in prompts]
    got, _ = _batched(
        model, [prompts[:3], prompts[3:]], [_caches(model, False) for _ in prompts], join_every=1
    )
    assert _tokens(got) == _tokens(alone8)
    for i in (3, 4):
        quantization = abs(_kl(alone16[i][0][1], alone8[i][0][1]))
        assert abs(_kl(alone8[i][0][1], got[i][0][1])) <= JOIN_NOISE * quantization + 1e-6, i


def test_cancelled_request_leaves_the_others_unchanged(entry, loaded):
    model, _ = loaded
    prompts = _prompts(entry, loaded)[:4]
    expected = [_alone(model, p, _caches(model, False)) for p in prompts]
    got, _ = _batched(model, [prompts], [_caches(model, False) for _ in prompts], cancel_at=(4, 1))
    assert 0 < len(got[1]) < TOKENS
    assert _tokens([got[i] for i in (0, 2, 3)]) == _tokens([expected[i] for i in (0, 2, 3)])


def test_batch_stays_16_bit_below_quantized_kv_start(entry, loaded):
    model, _ = loaded
    prompts = _prompts(entry, loaded)[:3]
    start = max(LENGTHS[:3]) + TOKENS + 1
    expected = [_alone(model, p, _caches(model, False), kv_bits=None) for p in prompts]
    got, gen = _batched(model, [prompts], [_caches(model, False) for _ in prompts], start=start)
    assert _tokens(got) == _tokens(expected)
    assert all(
        layout.classify(c) != layout.BATCH_QUANTIZED for c in _walk(gen._generation_batch.prompt_cache)
    )


def test_batch_converts_when_its_longest_request_crosses_the_start(entry, loaded):
    from mlx_lm.generate import BatchGenerator

    model, _ = loaded
    gen = BatchGenerator(model, max_tokens=50, prefill_step_size=CHUNK, kv_bits=8, quantized_kv_start=60)
    gen.insert(_prompts(entry, loaded, [20, 50]))
    kinds = set()
    for _ in range(40):
        gen.next()
        kinds |= {layout.classify(c) for c in _walk(gen._generation_batch.prompt_cache)}
    assert layout.BATCH_QUANTIZED in kinds and kinds & {layout.BATCH, layout.BATCH_SLIDING}


def test_finished_request_cache_continues_in_a_new_batch(entry, loaded):
    """A quantized cache extracted from a batch (what the server's prompt cache stores)
    continues in a new batch as it would alone, and a fresh request inserted with it
    answers as alone too (it does not join the quantized prompt batch)."""
    from mlx_lm.generate import BatchGenerator

    model, _ = loaded
    first, follow, other = _prompts(entry, loaded, [30, 12, 25])
    gen = BatchGenerator(model, max_tokens=TOKENS, prefill_step_size=CHUNK, kv_bits=8, quantized_kv_start=0)
    (uid,) = gen.insert([first])
    stored = None
    while stored is None:
        for r in gen.next()[1]:
            if r.uid == uid and r.finish_reason is not None:
                stored = r.prompt_cache
    kinds = {layout.classify(c) for c in _walk(stored)} - {layout.RECURRENT}
    assert kinds <= {layout.QUANTIZED, layout.QUANTIZED_SLIDING}
    expected = [_alone(model, follow, copy.deepcopy(stored)), _alone(model, other, _caches(model, False))]
    got, _ = _batched(model, [[follow, other]], [copy.deepcopy(stored), _caches(model, False)])
    assert _tokens(got) == _tokens(expected)  # `other` (16-bit) waits for a prompt batch of its own


@pytest.mark.parametrize(
    "ring,kv_bits", [(False, None), (False, 8), (True, 8)], ids=["kv16", "kv8", "kv8-ring48"]
)
def test_cuda_prefill_leaves_batched_answers_unchanged(entry, loaded, ring, kv_bits, monkeypatch):
    """`cuda-prefill` and `prefill-reserve` (installed on CUDA only; by hand here) hand
    attention additive masks instead of boolean ones ("causal" where no row is padded),
    pace prompt chunks a layer at a time and allocate a prompt batch's rows at once:
    batched requests, joins and wrapped rings included, must answer exactly as without."""
    from mlx_lm_ext.fixes import cuda_prefill, prefill_reserve

    model, _ = loaded
    prompts = _prompts(entry, loaded)
    groups = [prompts[:3], prompts[3:]]
    before, _ = _batched(model, groups, [_caches(model, ring) for _ in prompts], kv_bits=kv_bits)
    monkeypatch.setattr(cuda_prefill, "MIN_TOKENS", CHUNK // 2)  # pace these small chunks too
    fixes = [f for f in (cuda_prefill.FIX, prefill_reserve.FIX) if not f.applied]
    for fix in fixes:
        fix.apply()
    try:
        after, _ = _batched(model, groups, [_caches(model, ring) for _ in prompts], kv_bits=kv_bits)
    finally:
        for fix in reversed(fixes):
            fix.revert()
    assert _tokens(after) == _tokens(before)
    for a, b in zip(after, before, strict=True):
        assert all(mx.array_equal(x[1], y[1]).item() for x, y in zip(a, b, strict=True))


def _bounded(model):
    """--max-kv-size RING: full-attention layers in rings that keep their first 4 tokens."""
    from mlx_lm.models.cache import make_prompt_cache

    return make_prompt_cache(model, max_kv_size=RING)


@pytest.mark.parametrize("kv_bits", [None, 8], ids=["kv16", "kv8"])
def test_bounded_batch_answers_as_each_bounded_request_alone(entry, loaded, kv_bits):
    """--max-kv-size with batching (batch-keep-ring): the batch rings keep each request's
    first tokens as its own ring does, through a join, prompts longer than the ring
    (77 and 120 tokens in a ring of 48, trimmed chunk by chunk) and decoding past its end."""
    model, _ = loaded
    caches = _bounded(model)
    if not any(getattr(c, "keep", 0) for _, c in layout.leaves(caches)):
        pytest.skip("no layer is bounded with keep (every layer recurrent or windowed)")
    prompts = _prompts(entry, loaded)
    alone_caches = [_bounded(model) for _ in prompts]
    expected = [_alone(model, p, c, kv_bits=kv_bits) for p, c in zip(prompts, alone_caches, strict=True)]
    got, gen = _batched(
        model, [prompts[:3], prompts[3:]], [_bounded(model) for _ in prompts], kv_bits=kv_bits
    )
    fp16 = expected if kv_bits is None else [_alone(model, p, _bounded(model), kv_bits=None) for p in prompts]
    _assert_as_alone_up_to_sum_order(got, expected, fp16)
    # What the rings hold once the requests finish (what the server stores): the kept
    # tokens, which the later steps' logprobs show only faintly (random weights).
    stored = [gen.finished[u] for u in sorted(gen.finished)]
    for i, (g, e) in enumerate(zip(got, expected, strict=True)):
        if _tokens([g]) == _tokens([e]):
            _assert_same_kept_rows(stored[i], alone_caches[i], i)


def _kept_rows(cache):
    """The first `keep` rows of each bounded ring, dequantized: (layer, rows)."""
    rows = []
    for n, (_, c) in enumerate(layout.leaves(cache)):
        if getattr(c, "keep", 0) and c.keys is not None:
            k = c._temporal_order(c.keys)
            k = mx.dequantize(*k, c.group_size, c.bits) if isinstance(k, tuple) else k
            rows.append((n, k[..., : c.keep, :].astype(mx.float32)))
    return rows


def _assert_same_kept_rows(batched, alone, i):
    got, want = _kept_rows(batched), _kept_rows(alone)
    assert [n for n, _ in got] == [n for n, _ in want] and got, i
    for (n, a), (_, b) in zip(got, want, strict=True):
        assert mx.allclose(a, b, atol=0.05).item(), (i, n, mx.abs(a - b).max().item())
