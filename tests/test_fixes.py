"""Fixes are feature-detected, idempotent and reversible, with one log line each."""

from __future__ import annotations

import argparse
import importlib
import logging
import subprocess
import sys

import pytest
from mlx_lm import server
from mlx_lm.models import base, cache

import mlx_lm_ext
from mlx_lm_ext import KVSettings, layout
from mlx_lm_ext.fixes import FIXES

generate = importlib.import_module("mlx_lm.generate")


def _targets():
    return (
        cache.make_prompt_cache,
        generate.maybe_quantize_kv_cache,
        base.scaled_dot_product_attention,
        cache.RotatingKVCache.to_quantized,
        server.argparse,
        server.APIHandler.handle_completion,
    )


@pytest.fixture(autouse=True)
def clean():
    mlx_lm_ext.revert()
    yield
    mlx_lm_ext.revert()


def test_apply_logs_once_per_fix_is_idempotent_and_revert_restores(caplog):
    before = _targets()
    with caplog.at_level(logging.INFO, logger="mlx_lm_ext"):
        first = mlx_lm_ext.apply()
        second = mlx_lm_ext.apply()
    assert first and second == []
    assert mlx_lm_ext.applied() == first
    lines = [r.getMessage() for r in caplog.records if "applied" in r.getMessage()]
    assert len(lines) == len(first)
    assert all(a is not b for a, b in zip(before, _targets(), strict=True))
    assert set(mlx_lm_ext.revert()) == set(first)
    assert all(a is b for a, b in zip(before, _targets(), strict=True))
    assert mlx_lm_ext.applied() == []


_LATE_IMPORT = """
import sys
import mlx_lm_ext
from mlx_lm.models import base
from mlx_lm.models.cache import make_prompt_cache
assert "mlx_lm.models.llama" not in sys.modules
original = base.scaled_dot_product_attention, make_prompt_cache
mlx_lm_ext.apply()
from mlx_lm.models import llama  # imported while applied, as mlx_lm.load does on first use
assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention is not original[0]
mlx_lm_ext.revert()
assert llama.scaled_dot_product_attention is base.scaled_dot_product_attention is original[0]
from mlx_lm.models import cache
assert cache.make_prompt_cache is original[1]
print("restored")
"""


def test_revert_restores_modules_imported_while_applied():
    """mlx_lm.load imports a model's module on first use, after apply(): it copies our
    attention by name. revert() must hand those copies upstream's back, or the model
    keeps running a fix that is no longer applied (and that fails once reverted)."""
    done = subprocess.run([sys.executable, "-c", _LATE_IMPORT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "restored" in done.stdout, done.stderr[-2000:]


def test_applied_fixes_are_no_longer_needed():
    mlx_lm_ext.apply()
    for fix in FIXES:
        if fix.name in mlx_lm_ext.applied():
            assert not fix.needed(), fix.name


def test_only_applies_named_fixes_and_rejects_unknown():
    assert mlx_lm_ext.apply(only=["max-kv-size"]) == ["max-kv-size"]
    with pytest.raises(ValueError, match="unknown fixes"):
        mlx_lm_ext.apply(only=["no-such-fix"])


def test_unknown_cache_class_names_model_and_class():
    class MysteryCache:
        offset = 0

    with pytest.raises(layout.UnknownCacheLayout, match="my_model: cache class .*MysteryCache"):
        layout.classify(MysteryCache(), "my_model")
    mlx_lm_ext.apply()
    with pytest.raises(layout.UnknownCacheLayout, match="MysteryCache"):
        generate.maybe_quantize_kv_cache([MysteryCache()], 0, 64, 8)


def test_max_kv_size_bounds_every_layout():
    mlx_lm_ext.apply()

    class Model:
        model_type = "probe"
        layers = [None] * 4

        def make_cache(self):
            return [
                cache.KVCache(),
                cache.RotatingKVCache(max_size=512),
                cache.RotatingKVCache(max_size=64),
                cache.ArraysCache(size=2),
            ]

    bounded = cache.make_prompt_cache(Model(), max_kv_size=128)
    assert layout.describe(bounded) == ["sliding", "sliding", "sliding", "recurrent"]
    assert [c.max_size for c in bounded[:3]] == [128, 128, 64]
    assert layout.describe(cache.make_prompt_cache(Model())) == ["kv", "sliding", "sliding", "recurrent"]


def test_keep_sliding_kv_keeps_windows_but_quantizes_the_max_kv_size_bound():
    import copy

    import mlx.core as mx

    class Model:
        model_type = "probe"
        layers = [None] * 2

        def make_cache(self):
            return [cache.KVCache(), cache.RotatingKVCache(max_size=64)]

    mlx_lm_ext.apply(KVSettings(quantize_sliding=False))
    caches = copy.deepcopy(cache.make_prompt_cache(Model(), max_kv_size=128))  # the server copies
    for c in caches:
        c.update_and_fetch(mx.zeros((1, 1, 8, 64)), mx.zeros((1, 1, 8, 64)))
    generate.maybe_quantize_kv_cache(caches, 0, 64, 8)
    assert layout.describe(caches) == ["quantized-sliding", "sliding"]


def test_cache_list_is_walked_and_recurrent_state_kept():
    import mlx.core as mx

    mlx_lm_ext.apply()
    kv, state = cache.KVCache(), cache.ArraysCache(size=2)
    kv.update_and_fetch(mx.zeros((1, 1, 4, 64)), mx.zeros((1, 1, 4, 64)))
    caches = [cache.CacheList(kv, state)]
    generate.maybe_quantize_kv_cache(caches, 0, 64, 8)
    assert layout.describe(caches) == ["list(quantized,recurrent)"]


def test_quantization_log_line_speaks_the_patch_series_words(caplog):
    """The same layout and assertions as 0002-hybrid-quantize's upstream test."""
    import mlx.core as mx

    def filled(c, n=4):
        x = mx.zeros((1, 1, n, 64))
        c.update_and_fetch(x, x)
        return c

    mlx_lm_ext.apply()
    recurrent = cache.ArraysCache(2)
    caches = [
        filled(cache.KVCache()),
        filled(cache.RotatingKVCache(max_size=8)),
        cache.CacheList(filled(cache.KVCache()), recurrent),
        recurrent,
        filled(cache.KVCache(), n=2),
    ]
    with caplog.at_level(logging.INFO, logger="mlx_lm_ext"):
        generate.maybe_quantize_kv_cache(caches, quantized_kv_start=3, kv_group_size=64, kv_bits=8)
        generate.maybe_quantize_kv_cache(caches, quantized_kv_start=3, kv_group_size=64, kv_bits=8)
    lines = [r.getMessage() for r in caplog.records if "quantizes layers" in r.getMessage()]
    assert len(lines) == 1, lines  # only the call that converts logs
    assert "kv_bits=8 quantizes layers 0,1,4" in lines[0]
    assert "keeps 2,3 (recurrent state" in lines[0]
    assert layout.describe(caches) == [
        "quantized",
        "quantized-sliding",
        "list(quantized,recurrent)",
        "recurrent",
        "kv",
    ]


def test_each_fix_lives_in_the_module_named_for_its_slug():
    for fix in FIXES:
        assert type(fix).__module__ == f"mlx_lm_ext.fixes.{fix.name.replace('-', '_')}", fix.name


def test_patcher_hands_back_what_it_replaced_and_forgets_it_on_undo():
    from mlx_lm_ext.fixes import Patcher

    class Owner:
        def method(self):
            return "upstream"

    upstream = Owner.method
    patcher = Patcher("test")
    assert patcher.set(Owner, "method", lambda self: "ours") is upstream
    patcher.set(Owner, "method", lambda self: "again")  # a second replacement keeps the first original
    assert patcher.original(Owner, "method") is upstream
    patcher.undo()
    assert Owner.method is upstream and "method" in vars(Owner)
    with pytest.raises(LookupError, match="did not replace"):
        patcher.original(Owner, "method")


def test_revert_clears_what_a_fix_remembered():
    from mlx_lm_ext.fixes import BY_NAME

    mlx_lm_ext.apply()
    fix = BY_NAME["batched-quantized-kv"]
    fix.state["coverage"] = {("a model",): None}
    assert fix.original(server.ResponseGenerator, "_is_batchable") is not None
    mlx_lm_ext.revert()
    assert fix.state == {} and not fix.applied
    with pytest.raises(RuntimeError, match="not applied"):
        fix.original(server.ResponseGenerator, "_is_batchable")


def test_generate_hands_upstream_its_parser_back(monkeypatch):
    from mlx_lm_ext import generate as ext_generate

    upstream = generate.setup_arg_parser
    seen = []
    monkeypatch.setattr(generate, "main", lambda: seen.append(generate.setup_arg_parser().parse_args()))
    ext_generate.main(["--model", "m", "--prompt", "hi", "--kv-bits", "8"])
    assert seen[0].kv_bits == 8 and generate.setup_arg_parser is upstream


def test_server_flags_are_found_by_running_upstream_parser():
    from mlx_lm_ext.fixes.server_kv_flags import upstream_server_flags

    flags = upstream_server_flags()
    assert {"--model", "--port"} <= flags and server.argparse is argparse
