"""Quantized KV keeps answers: lossless below quantized_kv_start, close above it."""

from __future__ import annotations

import pytest
from conftest import expect_upstream
from prompts import entry_prompt

from mlx_lm_ext.report.quality import agreement, decode_logprobs
from mlx_lm_ext.settings import KVSettings

BITS = [8, 4]
DECODE = 32
_reference: dict = {}


def _fp16(entry, model, tokens, prefill):
    key = (entry.id, len(tokens), prefill)
    if key not in _reference:
        _reference[key] = decode_logprobs(model, tokens, prefill, KVSettings())
    return _reference[key]


@pytest.mark.parametrize("kv_bits", BITS)
def test_greedy_tokens_identical_below_quantized_kv_start(entry, loaded, kv_bits, request):
    from mlx_lm import stream_generate

    model, tok = loaded
    prompt = entry_prompt(entry, tok, entry.correctness["prompt_tokens"])
    n = entry.correctness["gen_tokens"]
    start = len(prompt) + n + 1  # never reached: the cache must stay untouched

    def run(**kw):
        return [r.token for r in stream_generate(model, tok, prompt, max_tokens=n, **kw)]

    assert run(kv_bits=kv_bits, quantized_kv_start=start) == run()


@pytest.mark.parametrize("kv_bits", BITS)
def test_quantized_decode_stays_close_to_fp16(entry, loaded, kv_bits, request, record_property):
    mark = expect_upstream(entry, kv_bits, quantizes=True)
    if mark:
        request.applymarker(mark)
    model, tok = loaded
    prefill = entry.correctness["prompt_tokens"]
    tokens = entry_prompt(entry, tok, prefill + DECODE)
    ref = _fp16(entry, model, tokens, prefill)
    got = agreement(
        ref, decode_logprobs(model, tokens, prefill, KVSettings(kv_bits=kv_bits, quantized_kv_start=0))
    )
    record_property("kl_mean", got.kl_mean)
    record_property("top1", got.top1)
    print(
        f"\n{entry.id} kv_bits={kv_bits}: KL mean {got.kl_mean:.2e} max {got.kl_max:.2e} top-1 {got.top1:.3f}"
    )
    assert got.kl_mean <= entry.correctness["max_kl"][kv_bits]
    min_top1 = entry.correctness.get("min_top1", {}).get(kv_bits)
    if min_top1 is not None:
        assert got.top1 >= min_top1
