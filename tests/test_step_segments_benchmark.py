"""benchmarks/step_segments.py runs anywhere, against an earlier revision too, and leaves
nothing installed: its figures (a decode step's host time by segment) are reproducible on
the machine CI has."""

from __future__ import annotations

import json
import sys

from benchmark_scripts import BENCHMARKS, load
from mlx_lm.models import llama

import mlx_lm_ext


def test_every_setting_is_timed_by_segment_and_the_hooks_come_off(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = load("step_segments")
    config = json.loads((BENCHMARKS / "configs" / "llama-3.1-8b.json").read_text())
    config.update(hidden_size=128, num_hidden_layers=2, intermediate_size=256, vocab_size=300)
    config.update(num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "tiny.json").write_text(json.dumps(config))
    before = (llama.Attention.__call__, llama.MLP.__call__, llama.scaled_dot_product_attention)
    out = tmp_path / "segments.json"
    argv = ["--config", str(tmp_path / "tiny.json"), "--contexts", "96", "--bits", "8", "--against", "HEAD"]
    module.main([*argv, "--steps", "3", "--rounds", "2", "--warmup", "2", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    labels = ["16-bit, unpatched", "16-bit, patched", "8-bit", "8-bit at HEAD"]
    assert [r["setting"] for r in rows] == labels
    assert all(r[f"{s}_us"] > 0 for r in rows for s in module.SEGMENTS)
    assert all(r["build_ms"] > 0 and r["eval_ms"] > 0 for r in rows)
    assert (llama.Attention.__call__, llama.MLP.__call__, llama.scaled_dot_product_attention) == before
    assert not mlx_lm_ext.applied() and not sys.modules["mlx_lm_ext_at_HEAD"].applied()  # both reverted
