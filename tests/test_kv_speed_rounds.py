"""benchmarks/kv_speed.py's rounds: every block decodes from the context its row names,
and each row carries the settled generate rate, its ratio and the per-block token times."""

from __future__ import annotations

import mlx.core as mx
import pytest
from benchmark_scripts import BENCHMARKS, load
from mlx_lm.models.cache import KVCache, RotatingKVCache

import mlx_lm_ext
from mlx_lm_ext.report.measure import attention_layers, cut_back


@pytest.fixture(scope="module")
def kv_speed():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCHMARKS))
        yield load("kv_speed")
    mlx_lm_ext.revert()


@pytest.fixture(scope="module")
def model(kv_speed):
    return kv_speed.load_model("llama-3.2", None)[1]


@pytest.fixture(scope="module")
def sliding(kv_speed):
    """gpt-oss's stand-in: sliding layers of window 128 between full-attention ones."""
    return kv_speed.load_model("gpt-oss", None)[1]


@pytest.mark.parametrize("bits", [None, 8])
@pytest.mark.parametrize("which", ["model", "sliding"])
def test_a_round_leaves_the_cache_at_its_length(kv_speed, request, which, bits):
    """Generate and step blocks grow the cache by twice their tokens and more; the round
    cuts every growing layer back, so the next round decodes at the same context (uncut,
    11 rounds took a 4K cache past 10K). Beside sliding rings that have wrapped (300
    tokens in a window of 128), the full-attention layers are cut back too."""
    model = request.getfixturevalue(which)
    cache = kv_speed._filled(model, 300, bits, True, 0)["cache"]
    layers = attention_layers(cache)
    full = [c for c in layers if getattr(c, "max_size", None) is None]
    rings = [c for c in layers if c not in full]
    length = full[0].offset  # the fill's 300 and its warm-up tokens
    blocks, cut = kv_speed._rates(model, cache, bits, True, 6)
    assert cut and [len(blocks[way]) for way in ("gen", "step")] == [6, 6]
    assert {c.offset for c in full} == {length}
    assert all(c.offset > length and c.offset >= c.max_size for c in rings)
    assert bool(rings) == (which == "sliding")
    assert not mlx_lm_ext.applied()  # the round's delivery is undone


def _grown(layer, before: int, after: int):
    """`layer` holding `before` tokens, its offset mark taken, then `after`."""
    layer.update_and_fetch(mx.zeros((1, 1, before, 4)), mx.zeros((1, 1, before, 4)))
    mark = layer.offset
    for _ in range(after - before):
        layer.update_and_fetch(mx.zeros((1, 1, 1, 4)), mx.zeros((1, 1, 1, 4)))
    return mark


def test_a_wrapped_ring_stays_and_the_layer_beside_it_is_cut_back():
    """A wrapped ring holds its window at any offset: left alone, it does not stop the
    full layer beside it from being cut back."""
    ring, full = RotatingKVCache(max_size=8, keep=0), KVCache()
    marks = [_grown(ring, 12, 15), _grown(full, 12, 15)]
    assert cut_back([ring, full], marks) is True
    assert (ring.offset, full.offset) == (15, 12)


def test_a_layer_that_grows_and_cannot_trim_says_so():
    """A layer that grew and cannot trim leaves the round uncut, and says so."""

    class Untrimmable(KVCache):
        def is_trimmable(self) -> bool:
            return False

    layer = Untrimmable()
    marks = [_grown(layer, 4, 6)]
    assert cut_back([layer], marks) is False and layer.offset == 6


def test_rows_carry_the_settled_rate_beside_the_block_means(kv_speed, model):
    """Two rounds of 8-bit against 16-bit: each row has, for generate and for steps, the
    block rates, the settled rate and its ratio with an interval, and each block's token
    quantiles; no token times (kept out of the JSON); a table line per row."""
    rows = kv_speed.run(model, [300], [8], steps=4, prefill_tokens=0, rounds=2)
    decode = [r for r in rows if r["kind"] == "decode"]
    assert [(r["bits"], r["patched"]) for r in decode] == [(None, False), (None, True), (8, False), (8, True)]
    for r in decode:
        assert "blocks" not in r and r["cut_back"] and r["gen_tok_s"] > 0 and r["tok_s"] > 0
        for way in ("gen", "step"):
            assert r[f"{way}_settled_tok_s"] > 0 and len(r[f"{way}_rounds"]) == 2
            assert len(r[f"{way}_token_ms"]) == 2
            assert all(p10 <= p50 <= p90 <= top for p10, p50, p90, top in r[f"{way}_token_ms"])
            low, high = r[f"x_{way}_settled_tok_s_ci"]
            assert 0 < low <= high and r[f"x_{way}_settled_tok_s"] > 0
    assert decode[0]["x_gen_settled_tok_s"] == decode[0]["x_step_settled_tok_s"] == 1.0
    table = kv_speed.markdown({**kv_speed.header("llama-3.2"), "rows": rows})
    assert len([line for line in table.splitlines() if line.startswith("| 300 |")]) == 4
