"""The constructed recall model recalls through mlx_lm.load, and only with enough margin."""

from __future__ import annotations

import pytest
from mlx_lm import load

from mlx_lm_ext.settings import KVSettings
from mlx_lm_ext.zoo import RecallSpec, RecallUnsupported, get_entry, resolve_recall
from mlx_lm_ext.zoo.recall import constructed_task, needle_prompt, recall, vocabulary


def _rate(margin: float, context: int, bits=None) -> float:
    spec = RecallSpec(margin=margin)
    model, tok = load(str(resolve_recall(get_entry("llama-3.2"), spec)))
    prefix, questions = constructed_task(spec, tok, context)
    return recall(model, tok, prefix, questions, KVSettings(kv_bits=bits, quantized_kv_start=0)).rate


def test_needle_prompt_puts_facts_first_and_questions_last():
    spec = RecallSpec()
    words, questions = needle_prompt(spec, 300, seed=3)
    assert len(words) + len(questions) == 300
    assert all(":" in w for w in words[: spec.n_keys]) and not any(":" in w for w in words[spec.n_keys :])
    facts = dict(w.split(":") for w in words[: spec.n_keys])
    assert all(facts[q[:-1]] == a for q, a in questions)
    assert set(vocabulary(spec).tokens) >= set(words)


def test_tokenizer_maps_each_word_to_its_own_token(tmp_path):
    spec = RecallSpec()
    _, tok = load(str(resolve_recall(get_entry("llama-3.2"), spec)))
    words, _ = needle_prompt(spec, 64, seed=0)
    vocab = vocabulary(spec)
    assert tok.encode(" ".join(words), add_special_tokens=False) == [vocab.id(w) for w in words]


def test_recall_is_exact_with_margin_and_fails_without():
    # margin 24: the fact's weight e^24 dwarfs the filler's ~sqrt(4096)
    assert _rate(24.0, 4096) == 1.0
    assert _rate(24.0, 4096, bits=4) == 1.0
    # margin 4 ~ ln(4096)/2: the filler's random values drown the fact (measured 1/16 right;
    # margin 5 recalls all at 1K but 3/16 at 4K, margin 8 all at 4K)
    assert _rate(4.0, 4096) < 0.5


def test_architectures_without_a_construction_are_refused_by_name():
    with pytest.raises(RecallUnsupported, match="gemma-4-e2b: no recall construction for gemma4_text"):
        resolve_recall(get_entry("gemma-4-e2b"))
