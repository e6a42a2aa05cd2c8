"""The decode-rate helpers the benchmarks share, on a stand-in loaded through mlx_lm.load."""

from __future__ import annotations

from statistics import median

from mlx_lm import load

from mlx_lm_ext.report.measure import (
    attention_layers,
    bootstrap_interval,
    decode_rate,
    filled_cache,
    generation_rate,
    interleaved,
)
from mlx_lm_ext.settings import KVSettings
from mlx_lm_ext.zoo import get_entry, resolve


def test_generation_rate_runs_mlx_lms_own_loop_on_the_given_cache():
    """generate_step decodes on the filled 8-bit cache it is handed (the cache grows by
    every step), and both rates are real timings (positive and finite)."""
    model, _ = load(str(resolve(get_entry("llama-3.2"))))
    cache = filled_cache(model, 300, KVSettings(kv_bits=8, quantized_kv_start=0))
    before = attention_layers(cache)[0].offset
    rate = generation_rate(model, cache, steps=6, warmup=2)
    grown = attention_layers(cache)[0].offset - before
    assert 8 <= grown <= 9  # the one-token prompt and the generated tokens (the last may be in flight)
    assert hasattr(attention_layers(cache)[0], "bits")
    assert 0 < rate < float("inf") and 0 < decode_rate(model, cache, steps=3, warmup=1) < float("inf")


def test_interleaved_takes_turns_round_by_round():
    """A-B-C, A-B-C, ...: each setting sees the same stretch of the run, not its own."""
    calls = []
    measures = {key: (lambda key=key: calls.append(key) or len(calls)) for key in "abc"}
    results = interleaved(measures, rounds=3)
    assert calls == list("abcabcabc")
    assert results == {"a": [1, 4, 7], "b": [2, 5, 8], "c": [3, 6, 9]}


def test_bootstrap_interval_holds_the_statistic_and_narrows_with_rounds():
    """Seeded (the same rounds give the same interval), within the data's range, and
    narrower for 60 rounds than for 6 drawn from the same spread."""
    few = [0.8, 1.2, 0.9, 1.1, 1.0, 1.05]
    low, high = bootstrap_interval(few, median)
    assert (low, high) == bootstrap_interval(few, median)
    assert min(few) <= low <= median(few) <= high <= max(few) and low < high
    many = few * 10
    low_many, high_many = bootstrap_interval(many, median)
    assert high_many - low_many < high - low
    assert bootstrap_interval([1.0] * 5, median) == (1.0, 1.0)
