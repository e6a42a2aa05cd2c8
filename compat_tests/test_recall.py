"""Long-context recall: facts up front, questions after long filler, past quantized_kv_start.

One test code, two tiers. Offline, the model is the entry's constructed recall model
(mlx_lm_ext/zoo/recall.py: exact associative recall written into the real architecture);
on the hub tier it is the real model, asked in words. Answers go through mlx-lm's own
stream_generate on a cache prefilled and quantized as generate_step does it.
"""

from __future__ import annotations

import pytest
from conftest import SERVES_KV_FLAGS, expect_upstream, load_once, skip_unless_supported
from test_server import Server, _request

from mlx_lm_ext.settings import KVSettings
from mlx_lm_ext.zoo import RecallSpec, RecallUnsupported, resolve_recall
from mlx_lm_ext.zoo.recall import SUPPORTED, constructed_task, recall, worded_task

BITS = [None, 8, 4]
CONTEXTS = [1024, 4096, *(pytest.param(n, marks=pytest.mark.slow) for n in (16384, 32768))]


def _spec(entry) -> RecallSpec:
    return RecallSpec(margin=float(entry.recall["margin"]))


def _in_words(entry, tier) -> bool:
    """Real models (hub tier, or converted offline) are asked in words."""
    return tier == "hub" or entry.real


@pytest.fixture(scope="session")
def recall_path(entry, tier, request):
    if _in_words(entry, tier):  # the real model answers in words
        return request.getfixturevalue("model_path")
    skip_unless_supported(entry)
    return resolve_recall(entry, _spec(entry))  # raises RecallUnsupported: see below


@pytest.fixture(scope="session")
def recall_model(recall_path):
    return load_once(recall_path)


def _recall_model(request, entry, tier, fixture: str = "recall_model"):
    """The recall model; where the architecture has no recall construction yet, the test
    is a strict xfail that says so (it flips to a failure once one exists)."""
    if not _in_words(entry, tier) and entry.model_type not in SUPPORTED:
        reason = f"{entry.id}: no recall construction for {entry.model_type} yet (zoo/recall.py)"
        request.applymarker(pytest.mark.xfail(strict=True, raises=RecallUnsupported, reason=reason))
    return request.getfixturevalue(fixture)


def _task(entry, tier, tokenizer, context):
    if _in_words(entry, tier):
        return worded_task(tokenizer, context)
    return constructed_task(_spec(entry), tokenizer, context)


@pytest.mark.parametrize("context", CONTEXTS)
@pytest.mark.parametrize("kv_bits", BITS, ids=["fp16", "8bit", "4bit"])
def test_facts_are_recalled_after_long_filler(entry, tier, context, kv_bits, request, record_property):
    contexts = entry.recall["contexts"] + entry.recall["slow_contexts"]
    if tier == "hub":
        contexts = entry.recall["hub_contexts"]
    if context not in contexts:
        pytest.skip(f"{entry.id}: context {context} not in models.yaml recall contexts {contexts}")
    model, tokenizer = _recall_model(request, entry, tier)
    mark = expect_upstream(entry, kv_bits, quantizes=True)
    if mark:
        request.applymarker(mark)
    prefix, questions = _task(entry, tier, tokenizer, context)
    start = min(512, context // 2)  # the facts (first tokens) are quantized with the rest
    settings = KVSettings(kv_bits=kv_bits, quantized_kv_start=start)
    result = recall(
        model, tokenizer, prefix, questions, settings, max_tokens=20 if _in_words(entry, tier) else 1
    )
    bits = kv_bits or 16
    for key, value in (("recall_model", entry.id), ("recall_tier", tier), ("recall_context", context)):
        record_property(key, value)
    record_property("recall_bits", bits)
    record_property("recall_rate", result.rate)
    print(f"\n{entry.id} {tier} {context} tokens kv_bits={bits}: recall {result.correct}/{result.total}")
    assert result.rate >= entry.recall["min_rate"][bits], f"missed: {result.wrong}"


@pytest.mark.skipif(not SERVES_KV_FLAGS, reason="runs the patched server")
def test_patched_server_recalls_with_8bit_kv(entry, tier, tmp_path, request):
    """The recall model served with `--kv-bits 8` (the delivery's server) answers over HTTP."""
    context = 16384 if tier == "hub" else 1024
    if entry.real and context not in entry.recall["contexts"]:
        pytest.skip(f"{entry.id}: no recall context by default (models.yaml: {entry.recall['contexts']})")
    _, tokenizer = _recall_model(request, entry, tier)
    recall_path = request.getfixturevalue("recall_path")
    prefix, questions = _task(entry, tier, tokenizer, context)
    server = Server(recall_path, ["--kv-bits", "8", "--quantized-kv-start", "256"], tmp_path / "server.log")
    try:
        answered = []
        for ids, answer in questions[:4]:
            ids = prefix + ids
            if ids[0] == tokenizer.bos_token_id:  # the server's tokenizer adds its own BOS
                ids = ids[1:]
            body = {"prompt": tokenizer.decode(ids), "max_tokens": 20, "temperature": 0.0}
            status, raw = _request(server.port, "/v1/completions", body)
            assert status == 200, raw
            answered.append(answer in raw)
        rate = sum(answered) / len(answered)
        assert rate >= entry.recall["min_rate"][8], f"{sum(answered)} of {len(answered)} codes in the replies"
        assert "kv_bits=8 quantizes layers" in server.output()
    finally:
        server.stop()
