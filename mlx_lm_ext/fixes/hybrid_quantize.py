"""Quantization walks every cache layout mlx-lm builds.

Upstream: `maybe_quantize_kv_cache` converts each top-level cache that has
`to_quantized`: it skips caches nested in a CacheList, silently skips classes it does not
know, and calls `RotatingKVCache.to_quantized`, which raises NYI (mlx-lm #1573, #1353).
Here every layer is classified: full attention is quantized, sliding-window layers are
quantized too (or kept at full precision with `quantize_sliding=False`), recurrent
(gated-delta / SSM) state is never quantized, CacheLists are walked, and an unknown class
is an error naming the model and the class. The decision is logged once per layout.
Patch file: patches/0002-hybrid-quantize.patch.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from .. import layout
from ..settings import current
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")

# Kinds that are never converted, with the reason that goes into the log line.
KEPT = {
    layout.RECURRENT: "recurrent state, constant size",
    layout.QUANTIZED: "already quantized",
    layout.QUANTIZED_SLIDING: "already quantized",
    layout.CHUNKED: "chunked attention, bounded by its chunk",
    layout.CONCAT: "ConcatenateKVCache has no quantized form",
    layout.BATCH: "batch caches are quantized by the batch path",
}
_logged: set[tuple] = set()


def _convert(cache: Any, start: int, group_size: int, bits: int) -> Any:
    if cache.offset < start:
        return cache
    return cache.to_quantized(group_size=group_size, bits=bits)


def quantize_layer(cache: Any, start: int, group_size: int, bits: int, sliding: bool):
    """One layer's cache after quantization, and the reason when it is kept."""
    kind = layout.classify(cache)
    if kind == layout.FULL:
        return _convert(cache, start, group_size, bits), None
    if kind == layout.SLIDING:
        if not sliding and not layout.is_bounded(cache):
            return cache, f"sliding window ({cache.max_size} tokens) kept at full precision"
        return _convert(cache, start, group_size, bits), None
    if kind == layout.LIST:
        inner = [quantize_layer(c, start, group_size, bits, sliding) for c in cache.caches]
        cache.caches = type(cache.caches)(c for c, _ in inner)
        reasons = [r for _, r in inner if r]
        return cache, "; ".join(reasons) or None
    return cache, KEPT[kind]


def maybe_quantize_kv_cache(prompt_cache, quantized_kv_start, kv_group_size, kv_bits):
    """Drop-in for mlx_lm.generate.maybe_quantize_kv_cache that knows every layout."""
    if kv_bits is None:
        return
    sliding = current().quantize_sliding
    kept = {}
    for i, c in enumerate(prompt_cache):
        prompt_cache[i], reason = quantize_layer(c, quantized_kv_start, kv_group_size, kv_bits, sliding)
        if reason:
            kept[i] = reason
    _log_once(prompt_cache, kept, kv_bits)


def _log_once(prompt_cache: list, kept: dict[int, str], bits: int) -> None:
    key = (layout.origin(prompt_cache[0]) if prompt_cache else "", len(prompt_cache), bits)
    if key in _logged or not prompt_cache:
        return
    _logged.add(key)
    quantized = [i for i in range(len(prompt_cache)) if i not in kept]
    reasons = sorted(set(kept.values()))
    log.info(
        "%s: kv_bits=%d quantizes layers %s; keeps %s",
        key[0],
        bits,
        _ranges(quantized) or "none",
        "; ".join(f"{_ranges([i for i in kept if kept[i] == r])} ({r})" for r in reasons) or "none",
    )


def _ranges(indices: list[int]) -> str:
    return ",".join(map(str, indices))


class HybridQuantize(Fix):
    name = "hybrid-quantize"
    summary = "kv_bits quantizes every layout: sliding, CacheList, hybrid; never recurrent state"

    def needed(self) -> bool:
        generate = importlib.import_module("mlx_lm.generate")
        from mlx_lm.models.cache import CacheList, KVCache

        return generate.maybe_quantize_kv_cache is not maybe_quantize_kv_cache and not _quantizes_nested(
            generate.maybe_quantize_kv_cache, CacheList, KVCache
        )

    def install(self, patcher: Patcher) -> None:
        generate = importlib.import_module("mlx_lm.generate")

        patcher.rebind(generate.maybe_quantize_kv_cache, maybe_quantize_kv_cache)


def _quantizes_nested(fn, cache_list_cls, kv_cls) -> bool:
    """Probe: does the installed function reach a KVCache inside a CacheList?"""
    import mlx.core as mx

    inner = kv_cls()
    inner.update_and_fetch(mx.zeros((1, 1, 2, 64)), mx.zeros((1, 1, 2, 64)))
    probe = [cache_list_cls(inner)]
    try:
        fn(probe, quantized_kv_start=0, kv_group_size=64, kv_bits=8)
    except Exception:
        return False
    return layout.classify(probe[0].caches[0]) == layout.QUANTIZED
