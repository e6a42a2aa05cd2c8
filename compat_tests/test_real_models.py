"""Real trained models (models.yaml entries with `gguf:`), converted offline from PyPI packages.

They prove the conversion gives the real model (factual continuations, 16-bit perplexity
on English prose under a measured bound), and what quantizing the KV cache costs on real
trained attention: teacher-forced KL and top-1 against 16-bit on prose, and the patched
server answering exactly as in-process generation with the same settings. This file runs
in the default suite (CI: download and conversion included); `--models ID` then runs
the rest of the suite on a real model too. Bounds and their measurements: models.yaml.
"""

from __future__ import annotations

import json

import pytest
from conftest import DELIVERY, SERVES_KV_FLAGS, load_once, skip_unless_supported, unpatched, upstream_failure
from prompts import entry_prompt
from test_server import Server, _request

from mlx_lm_ext.report.quality import agreement, decode_logprobs, perplexity, prose
from mlx_lm_ext.settings import KVSettings
from mlx_lm_ext.zoo import resolve


@pytest.fixture(scope="session")
def real_path(real_entry):
    skip_unless_supported(real_entry)
    return resolve(real_entry, "offline")


@pytest.fixture(scope="session")
def real_model(real_path):
    return load_once(real_path)


def test_factual_prompts_continue_as_the_real_model(real_entry, real_model):
    from mlx_lm import generate

    model, tokenizer = real_model
    for prompt, word in real_entry.checks["facts"]:
        text = generate(model, tokenizer, prompt, max_tokens=8)
        assert word in text, f"{prompt!r} -> {text!r}, expected {word!r}"


def test_perplexity_on_prose_is_the_trained_models(real_entry, real_model, record_property):
    model, tokenizer = real_model
    bounds = real_entry.checks["prose"]
    ppl = perplexity(model, entry_prompt(real_entry, tokenizer, bounds["perplexity_tokens"]))
    record_property("perplexity", ppl)
    print(f"\n{real_entry.id}: perplexity {ppl:.2f} on {bounds['perplexity_tokens']} prose tokens")
    assert ppl <= bounds["max_perplexity"]


_fp16: dict = {}


def _on_prose(real_entry, real_model, kv_bits: int):
    """Agreement with 16-bit of the prose decode positions at kv_bits, quantized from token 0."""
    model, tokenizer = real_model
    bounds = real_entry.checks["prose"]
    prefill, decode = bounds["prefill"], bounds["decode"]
    tokens = entry_prompt(real_entry, tokenizer, prefill + decode)
    if real_entry.id not in _fp16:
        _fp16[real_entry.id] = decode_logprobs(model, tokens, prefill, KVSettings())
    settings = KVSettings(kv_bits=kv_bits, quantized_kv_start=0)
    return agreement(_fp16[real_entry.id], decode_logprobs(model, tokens, prefill, settings))


_ours: dict = {}


@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_kv_stays_close_to_16_bit_on_prose(real_entry, real_model, kv_bits, record_property):
    bounds = real_entry.checks["prose"]
    got = _ours[real_entry.id, kv_bits] = _on_prose(real_entry, real_model, kv_bits)
    record_property("kl_mean", got.kl_mean)
    record_property("top1", got.top1)
    kl = f"KL mean {got.kl_mean:.2e} max {got.kl_max:.2e}"
    print(f"\n{real_entry.id} kv_bits={kv_bits}: {kl} top-1 {got.top1:.3f}")
    assert got.kl_mean <= bounds["max_kl"][kv_bits]
    assert got.top1 >= bounds["min_top1"][kv_bits]


@pytest.mark.skipif(DELIVERY != "monkeypatch", reason="compares the monkeypatches with themselves reverted")
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_quantized_kv_on_prose_is_as_close_to_16_bit_as_upstreams(real_entry, real_model, kv_bits):
    """The same prose positions at the same bits, with the fixes and with them reverted,
    where upstream quantizes the model at all (SmolLM2; Gemma's sliding layers raise
    NYI upstream). Measured KL ours / upstream's, SmolLM2, CPU 0.32.2, on this test's
    window: 8-bit 2.36e-3 / 4.63e-3, 4-bit 0.133 / 0.129 (1.03x); over 3 windows of 288
    prose tokens: 8-bit 2.33e-3 / 4.71e-3, 4-bit 0.093 / 0.097. Bound: ours <= 1.1x
    upstream's. A 1% error in our attention's scale passes every stand-in test (their
    attention is near-uniform); this is where such a regression shows."""
    reason = upstream_failure(real_entry, kv_bits, quantizes=True)
    if reason:
        pytest.skip(f"upstream mlx-lm cannot quantize {real_entry.id}'s cache: {reason}")
    ours = _ours.get((real_entry.id, kv_bits)) or _on_prose(real_entry, real_model, kv_bits)
    with unpatched():
        theirs = _on_prose(real_entry, real_model, kv_bits)
    print(f"\n{real_entry.id} kv_bits={kv_bits}: KL ours {ours.kl_mean:.3g}, upstream {theirs.kl_mean:.3g}")
    assert ours.kl_mean <= 1.1 * theirs.kl_mean, (ours, theirs)


@pytest.mark.skipif(not SERVES_KV_FLAGS, reason="unpatched mlx-lm's server has no kv flags before 0.32")
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_served_answer_equals_in_process_generation(real_entry, real_path, real_model, kv_bits, tmp_path):
    """The delivery's server with `--kv-bits N --quantized-kv-start 0` gives the greedy
    text mlx-lm's own stream_generate gives with the same settings."""
    from mlx_lm import stream_generate

    model, tokenizer = real_model
    prompt = prose()[:400]  # text, so that both sides add the tokenizer's BOS the same way
    flags = ["--kv-bits", str(kv_bits), "--quantized-kv-start", "0"]
    server = Server(real_path, flags, tmp_path / "server.log")
    try:
        body = {"prompt": prompt, "max_tokens": 8, "temperature": 0.0}
        status, raw = _request(server.port, "/v1/completions", body)
        assert status == 200, raw
        served = json.loads(raw)["choices"][0]["text"]
        if DELIVERY != "patches":
            assert f"kv_bits={kv_bits} quantizes layers" in server.output()
    finally:
        server.stop()
    expected = "".join(
        r.text
        for r in stream_generate(
            model, tokenizer, prompt, max_tokens=8, kv_bits=kv_bits, quantized_kv_start=0
        )
    )
    assert served == expected and served.strip()


def test_hub_tier_downloads_and_loads_through_huggingface_hub(real_entry, real_path, tmp_path):
    """The hub tier's own code (snapshot_download, then mlx_lm.load) on the real model,
    served under its hub repo id by a local endpoint (HF_ENDPOINT): what users run online."""
    import os
    import subprocess
    import sys

    from mlx_lm_ext.zoo.local_hub import LocalHub

    prompt, word = real_entry.checks["facts"][0]
    script = (
        "import sys; from mlx_lm import load, generate; from mlx_lm_ext.zoo import get_entry, resolve\n"
        "path = resolve(get_entry(sys.argv[1]), 'hub'); print(path)\n"
        "model, tok = load(str(path)); print(generate(model, tok, sys.argv[2], max_tokens=6))\n"
    )
    with LocalHub({real_entry.hub: real_path}) as hub:
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_OFFLINE": "0",
        }
        env.pop("HF_HUB_CACHE", None)
        done = subprocess.run(
            [sys.executable, "-c", script, real_entry.id, prompt],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    folder, answer = done.stdout.strip().splitlines()[:2]
    assert str(tmp_path / "hf") in folder and word in answer, done.stdout
    assert any(r.startswith("GET /api/models/") for r in hub.requests)
    assert any("/resolve/" in r and r.endswith("model.safetensors") for r in hub.requests)


_activations: dict = {}


def _captured_attention(model, tokens: list[int]) -> list[tuple]:
    """(queries, keys, values, scale) of every attention call in a 16-bit prefill."""
    import mlx.core as mx
    from mlx_lm.models import base
    from mlx_lm.models.cache import make_prompt_cache

    from mlx_lm_ext.fixes.base import Patcher

    current, calls = base.scaled_dot_product_attention, []

    def capture(queries, keys, values, cache, scale, mask, sinks=None):
        calls.append((queries, keys, values, scale))
        return current(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    patcher = Patcher("capture")
    patcher.rebind(current, capture)
    try:
        model(mx.array([tokens]), cache=make_prompt_cache(model))
    finally:
        patcher.undo()
    mx.eval(calls)
    return calls


@pytest.mark.skipif(DELIVERY == "patches", reason="upstream's quantized SDPA is ours on a patched tree")
@pytest.mark.parametrize("kv_bits", [8, 6, 5, 4, 3, 2])
def test_quantized_attention_on_real_activations_is_closer_to_exact_than_upstreams(
    real_entry, real_model, kv_bits
):
    """On every layer's real queries, keys and values (a 160-token prose prefill, as a
    causal chunk and as one decode query), our quantized attention is closer to exact
    float32 attention over the same dequantized cache than upstream's quantized SDPA, at
    every accepted bit width. Measured mean |error| ratio ours / upstream, CPU 0.32.2,
    bits 8 to 2: Gemma 3 270M 0.031-0.051, SmolLM2 0.057-0.095, alone or in the whole
    suite. Bound 0.19 (2x the worst). (Upstream's function scales its queries argument in
    place, `queries *= scale`, so it gets a copy: handed the captured queries themselves,
    every later case ran on queries scaled again, which read as 0.14-0.21 "in the whole
    suite".) With scores and sums in bf16 (upstream's arithmetic) the ratio is 1.000 and
    this fails."""
    import mlx.core as mx
    from mlx_lm.models.base import quantized_scaled_dot_product_attention as upstream

    from mlx_lm_ext.fixes.quantized_attention import QuantizedOperands, quantized_attention

    model, tokenizer = real_model
    if real_entry.id not in _activations:
        _activations[real_entry.id] = _captured_attention(model, entry_prompt(real_entry, tokenizer, 160))
    calls = _activations[real_entry.id]
    errors = {"ours": 0.0, "upstream": 0.0}
    for queries, keys, values, scale in calls:
        qk, qv = (tuple(mx.quantize(x, 64, kv_bits)) for x in (keys, values))
        for q, mask in ((queries, "causal"), (queries[..., -1:, :], None)):
            want = _exact_attention(q, qk, qv, kv_bits, scale, mask)
            ops = QuantizedOperands(qk, qv, 64, kv_bits)
            got = {
                "ours": quantized_attention(q, ops, scale, mask, kernels_on=False),
                # upstream scales its queries argument in place (`queries *= scale`): a copy
                "upstream": upstream(
                    mx.array(q), qk, qv, scale=scale, mask=mask, group_size=64, bits=kv_bits
                ),
            }
            for name, out in got.items():
                errors[name] += mx.abs(out.astype(mx.float32) - want).mean().item()
    ratio = errors["ours"] / errors["upstream"]
    print(f"\n{real_entry.id} kv_bits={kv_bits}: error ours/upstream {ratio:.3f} over {len(calls)} layers")
    assert ratio <= 0.19, errors


def _exact_attention(q, qk, qv, bits: int, scale: float, mask):
    """float32 attention over the dequantized cache (float32 scales: no bf16 rounding)."""
    import mlx.core as mx

    k, v = (
        mx.dequantize(t[0], t[1].astype(mx.float32), t[2].astype(mx.float32), group_size=64, bits=bits)
        for t in (qk, qv)
    )
    return mx.fast.scaled_dot_product_attention(q.astype(mx.float32), k, v, scale=scale, mask=mask)
