"""benchmarks/batched_kv.py: the three modes take turns for every round, and each ratio
is the median of the rounds' own ratios with its interval and range."""

from __future__ import annotations

from statistics import median

import pytest
from benchmark_scripts import BENCHMARKS, load

import mlx_lm_ext
from mlx_lm_ext.settings import KVSettings, configure


@pytest.fixture
def batched_kv(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    previous = configure(KVSettings())
    yield load("batched_kv")
    mlx_lm_ext.revert()
    configure(previous)


def test_rounds_give_each_ratio_its_spread(batched_kv):
    """2 requests, 3 rounds: every mode generates every token in each round; the batched
    quantized row's ratios are the medians of per-round ratios, inside their ranges."""
    _, model = batched_kv.load_model("llama-3.2", None)
    rows = batched_kv.run(model, 2, 16, 4, 8, batched_kv.vocab_size(model), rounds=3)
    assert [r["mode"] for r in rows] == ["sequential kv", "batched fp16", "batched kv"]
    assert all(r["tokens"] == 8 and len(r["tok_s_rounds"]) == 3 for r in rows)
    seq, fp16, kv = rows
    for key, base in (("x_sequential", seq), ("x_fp16_batched", fp16)):
        ratios = [a / b for a, b in zip(kv["tok_s_rounds"], base["tok_s_rounds"], strict=True)]
        assert kv[key] == median(ratios)
        low, high = kv[f"{key}_range"]
        assert low <= kv[key] <= high and kv[f"{key}_ci"][0] <= kv[f"{key}_ci"][1]
    assert kv["cache_bytes"] < fp16["cache_bytes"]  # 8-bit holds fewer bytes than 16-bit
    table = batched_kv.markdown(
        {**batched_kv.header("llama-3.2"), "requests": 2, "prompt": 16, "tokens": 4, "bits": 8, "rows": rows}
    )
    assert f"| {kv['x_sequential']:.2f} [" in table
