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
from conftest import DELIVERY, SERVES_KV_FLAGS
from prompts import entry_prompt
from test_server import Server, _request

from mlx_lm_ext.report.quality import agreement, decode_logprobs, perplexity, prose
from mlx_lm_ext.settings import KVSettings


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


def _continue(server, text: str) -> dict:
    """Continue a completion (the prompt plus the text it gave): the prompt cache holds
    that whole prompt, which upstream hands the generator as an empty one, killing the
    generation thread (503 from then on). Served, it reuses all but the last token."""
    status, raw = _request(
        server.port, "/v1/completions", {"prompt": text, "max_tokens": 4, "temperature": 0.0}
    )
    assert status == 200, raw
    assert _request(server.port, "/health")[0] == 200
    return json.loads(raw)


@pytest.mark.skipif(not SERVES_KV_FLAGS, reason="unpatched mlx-lm's server has no kv flags before 0.32")
@pytest.mark.parametrize("kv_bits", [8, 4])
def test_served_answer_equals_in_process_generation(real_entry, real_path, real_model, kv_bits, tmp_path):
    """The delivery's server with `--kv-bits N --quantized-kv-start 0` gives the greedy
    text mlx-lm's own stream_generate gives with the same settings, and serves the
    completion's continuation from the prompt cache."""
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
        continued = _continue(server, prompt + served)
    finally:
        server.stop()
    assert (
        continued["usage"]["prompt_tokens_details"]["cached_tokens"]
        == continued["usage"]["prompt_tokens"] - 1
    )
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
