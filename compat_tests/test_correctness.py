"""Quantized KV keeps answers: lossless below quantized_kv_start, close above it."""

from __future__ import annotations

import pytest
from conftest import DELIVERY, expect_upstream
from prompts import entry_prompt

from mlx_lm_ext.report.quality import agreement, decode_logprobs
from mlx_lm_ext.settings import KVSettings

BITS = [8, 4]
DECODE = 32
_reference: dict = {}


def _fp16(entry, model, tokens, prefill):
    key = (entry.id, tuple(tokens), prefill)
    if key not in _reference:
        _reference[key] = decode_logprobs(model, tokens, prefill, KVSettings())
    return _reference[key]


@pytest.mark.parametrize("kv_bits", BITS)
def test_greedy_tokens_identical_below_quantized_kv_start(entry, tier, loaded, kv_bits, request):
    from mlx_lm import stream_generate

    model, tok = loaded
    prompt = entry_prompt(entry, tok, entry.correctness["prompt_tokens"], real=tier == "hub")
    n = entry.correctness["gen_tokens"]
    start = len(prompt) + n + 1  # never reached: the cache must stay untouched

    def run(**kw):
        return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, **kw)]

    assert run(kv_bits=kv_bits, quantized_kv_start=start) == run()


def _quantized(entry, model, tok, kv_bits, tier: str = "offline"):
    """Agreement of the decode positions at kv_bits with 16-bit, quantized from token 0
    (on prose for real models: the hub tier's, or those converted offline)."""
    prefill = entry.correctness["prompt_tokens"]
    tokens = entry_prompt(entry, tok, prefill + DECODE, real=tier == "hub")
    ref = _fp16(entry, model, tokens, prefill)
    settings = KVSettings(kv_bits=kv_bits, quantized_kv_start=0)
    return agreement(ref, decode_logprobs(model, tokens, prefill, settings))


@pytest.mark.parametrize("kv_bits", BITS)
def test_quantized_decode_stays_close_to_fp16(entry, tier, loaded, kv_bits, request, record_property):
    """Bounds from models.yaml: the random-weight stand-ins' own, or the hub tier's."""
    mark = expect_upstream(entry, kv_bits, quantizes=True)
    if mark:
        request.applymarker(mark)
    model, tok = loaded
    got = _quantized(entry, model, tok, kv_bits, tier)
    bounds = entry.correctness["hub"] if tier == "hub" else entry.correctness
    record_property("kl_mean", got.kl_mean)
    record_property("top1", got.top1)
    print(
        f"\n{entry.id} kv_bits={kv_bits}: KL mean {got.kl_mean:.2e} max {got.kl_max:.2e} top-1 {got.top1:.3f}"
    )
    assert got.kl_mean <= bounds["max_kl"][kv_bits]
    min_top1 = bounds.get("min_top1", {}).get(kv_bits)
    if min_top1 is not None:
        assert got.top1 >= min_top1


ALL_BITS = [2, 3, 4, 5, 6, 8]


def test_every_accepted_bit_width_keeps_more_with_more_bits(entry, tier, loaded, request):
    """Every width the server accepts runs end to end through the model's caches (sliding,
    recurrent, MoE layouts included), and each added bit from 4 up keeps more: KL(4) >
    KL(5) > KL(6) > KL(8), with 2 and 3 bits worse than 4. A width mixed up anywhere
    (bits read from the wrong place, a cache quantized at another width) breaks the order.
    Measured (0.32.2, CPU) e.g. llama 2.1e-3, 5.0e-4, 1.1e-4, 4.4e-5, 2.2e-5, 1.4e-5 for
    2..8 bits; on qwen3.5-moe 2 bits measured below 3 (1.0e-4 vs 1.8e-4), so 2 and 3 are
    only compared with 4."""
    mark = expect_upstream(entry, 8, quantizes=True)
    if mark:
        request.applymarker(mark)
    model, tok = loaded
    kl = {bits: _quantized(entry, model, tok, bits, tier).kl_mean for bits in ALL_BITS}
    print(f"\n{entry.id}: KL by bits " + ", ".join(f"{b}: {v:.3g}" for b, v in kl.items()))
    assert kl[2] > kl[4] and kl[3] > kl[4] > kl[5] > kl[6] > kl[8], kl


def _quantized_layers(caches) -> list:
    """Every quantized attention cache, CacheLists walked (recurrent state has no bits)."""
    out = []
    for c in caches:
        if hasattr(c, "caches"):
            out += _quantized_layers(c.caches)
        elif getattr(c, "bits", None) is not None:
            out.append(c)
    return out


@pytest.mark.xfail(DELIVERY == "upstream", reason="upstream has no kv_value_bits/kv_rotate", strict=True)
def test_generate_step_takes_value_bits_and_rotation(entry, loaded):
    """The Python API: generate_step's `kv_value_bits` and `kv_rotate` (through
    stream_generate) reach every quantized layer on every layout, in both deliveries,
    with no process settings saying so."""
    from mlx_lm import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model, tok = loaded
    cache = make_prompt_cache(model)
    out = stream_generate(
        model, tok, "The cache keeps", max_tokens=4, prompt_cache=cache,
        kv_bits=8, quantized_kv_start=0, kv_value_bits=4, kv_rotate="all",
    )  # fmt: skip
    assert len(list(out)) == 4
    layers = _quantized_layers(cache)
    assert layers and {(c.bits, c.value_bits, c.rotate) for c in layers} == {(8, 4, "all")}
