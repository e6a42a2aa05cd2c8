"""The decode-rate helpers the benchmarks share, on a stand-in loaded through mlx_lm.load."""

from __future__ import annotations

from statistics import median

import pytest
from mlx_lm import load

from mlx_lm_ext.report.measure import (
    attention_layers,
    bootstrap_interval,
    decode_rate,
    filled_cache,
    generation_rate,
    interleaved,
    settled_rate,
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
    """A-B-C, C-B-A, A-B-C: each setting sees the same stretch of the run, not its own,
    and over two rounds the same mean place in them."""
    calls = []
    measures = {key: (lambda key=key: calls.append(key) or len(calls)) for key in "abc"}
    results = interleaved(measures, rounds=3)
    assert calls == list("abccbaabc")
    assert results == {"a": [1, 6, 7], "b": [2, 5, 8], "c": [3, 4, 9]}


def test_settled_rate_drops_the_hosts_stalls_and_keeps_the_settings_own():
    """Blocks of 8 tokens, every 4th slow by the setting's own work (a flush): the settled
    rate is the block's true rate, also when a stall of the host hits a different stretch
    of each of 2 rounds in 7 (a block mean there reads under half); a setting 10% faster
    reads 10% faster under the same stalls."""
    own = [0.01, 0.01, 0.01, 0.04] * 2
    true_rate = len(own) / sum(own)
    rounds = [list(own) for _ in range(7)]
    for r, stretch in ((1, range(0, 5)), (4, range(3, 8))):
        for k in stretch:
            rounds[r][k] *= 3
    assert settled_rate([own] * 5) == pytest.approx(true_rate)
    assert settled_rate(rounds) == pytest.approx(true_rate)
    assert len(rounds[1]) / sum(rounds[1]) < 0.5 * true_rate
    faster = [[t / 1.1 for t in block] for block in rounds]
    assert settled_rate(faster) / settled_rate(rounds) == pytest.approx(1.1)
    with pytest.raises(ValueError):
        settled_rate([own, own[:-1]])  # blocks of unequal length are not one position each


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
