"""benchmarks/tail_flush.py runs anywhere and leaves nothing installed: its figure (a
flush's host time, in place against through upstream's update) is reproducible on the
machine CI has."""

from __future__ import annotations

import json

from benchmark_scripts import BENCHMARKS, load

from mlx_lm_ext.fixes import quantized_decode_tail as decode_tail


def test_both_ways_are_timed_and_the_tail_comes_off(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = load("tail_flush")
    from mlx_lm.models.cache import QuantizedKVCache

    before = dict(vars(QuantizedKVCache))
    out = tmp_path / "flush.json"
    module.main(["--bits", "8", "--layers", "2", "--context", "256", "--rounds", "2", "--json", str(out)])
    (row,) = json.loads(out.read_text())["rows"]
    assert all(len(row[way]["rounds"]) == 2 and row[way]["median_us"] > 0 for way in module.WAYS)
    assert row["x_upstream"] > 0
    assert not decode_tail.installed() and decode_tail._store_in_place.__name__ == "_store_in_place"
    after = dict(vars(QuantizedKVCache))
    assert [k for k in before.keys() | after.keys() if before.get(k) is not after.get(k)] == []
