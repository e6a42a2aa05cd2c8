"""The report's memory table (from config.json alone) equals the bytes real caches hold."""

from __future__ import annotations

import json

import pytest
from conftest import expect_upstream

from mlx_lm_ext.report.measure import filled_cache
from mlx_lm_ext.report.memory import kv_bytes, trace_layout
from mlx_lm_ext.report.quality import cache_nbytes
from mlx_lm_ext.settings import KVSettings

TOKENS = 4096  # a multiple of the caches' 256-token step, so no allocation slack is counted


@pytest.mark.parametrize("bound", [None, 512], ids=["unbounded", "max-kv-size-512"])
@pytest.mark.parametrize("kv_bits", [None, 8, 4])
def test_report_predicts_measured_cache_bytes(entry, model_path, loaded, kv_bits, bound, request):
    mark = expect_upstream(entry, kv_bits, quantizes=kv_bits is not None, bounded=bound is not None)
    if mark:
        request.applymarker(mark)
    # The stand-in's own dtype (float32 for the MoE stand-ins on CPU; real checkpoints: bf16)
    layers = trace_layout(json.loads((model_path / "config.json").read_text()), dtype=entry.offline_dtype)
    predicted = kv_bytes(layers, TOKENS, kv_bits, 64, bound) + sum(lay.state_bytes for lay in layers)
    model, _ = loaded
    settings = KVSettings(kv_bits=kv_bits, quantized_kv_start=0, max_kv_size=bound)
    measured = cache_nbytes(filled_cache(model, TOKENS, settings))
    print(f"\n{entry.id} bits={kv_bits or 16} bound={bound}: predicted {predicted}, measured {measured}")
    assert predicted == measured
