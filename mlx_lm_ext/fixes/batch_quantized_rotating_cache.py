"""Batch rings quantize: BatchRotatingKVCache.to_quantized no longer raises NYI.

Upstream: `BatchRotatingKVCache.to_quantized` raises "BatchRotatingKVCache Quantization
NYI" and `RotatingKVCache.merge` takes 16-bit rings only, so sliding-window models
(Gemma 3/4, gpt-oss) and bounded caches cannot batch quantized. Here the ring converts
into caches/batch_quantized.py's BatchQuantizedRotatingKVCache and merges of quantized
requests give one. The mark that tells a --max-kv-size bound from a sliding window
(--keep-sliding-kv) follows the cache through merge, extract and conversion.
Patch file: patches/0008-batch-quantized-rotating-cache.patch.
"""

from __future__ import annotations

from .. import layout
from ..caches import batch_quantized as bq
from .base import Fix, Patcher


def _cache():
    from mlx_lm.models import cache

    return cache


def _merge_rotating(cls, caches):
    if any(map(bq.is_quantized, caches)):
        merged = bq.BatchQuantizedRotatingKVCache.merge(caches)
    else:
        merged = FIX.original(_cache().BatchRotatingKVCache, "merge")(caches)
    return layout.mark_bounded(merged) if all(map(layout.is_bounded, caches)) else merged


def _extract_rotating(self, idx):
    owner = (
        bq.BatchQuantizedRotatingKVCache
        if isinstance(self, bq.BatchQuantizedRotatingKVCache)
        else _cache().BatchRotatingKVCache
    )
    cache = FIX.original(owner, "extract")(self, idx)
    return layout.mark_bounded(cache) if layout.is_bounded(self) else cache


def _rotating_to_quantized(self, group_size: int = 64, bits: int = 4, **fmt):
    """`fmt`: value_bits and rotate, as batch_rotating_to_quantized takes them."""
    quant = bq.batch_rotating_to_quantized(self, group_size=group_size, bits=bits, **fmt)
    return layout.mark_bounded(quant) if layout.is_bounded(self) else quant


def _merge_quantized_rotating(cls, caches):
    return _merge_rotating(None, caches)


class BatchQuantizedRotatingCache(Fix):
    name = "batch-quantized-rotating-cache"
    summary = "BatchRotatingKVCache.to_quantized (BatchQuantizedRotatingKVCache), no NYI"

    def needed(self) -> bool:
        from mlx_lm.models.cache import BatchRotatingKVCache

        try:
            BatchRotatingKVCache(8, [0]).to_quantized(group_size=64, bits=8)
        except NotImplementedError:
            return True
        return False

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models import cache

        patcher.set(cache.BatchRotatingKVCache, "to_quantized", _rotating_to_quantized)
        patcher.set(cache.BatchRotatingKVCache, "merge", classmethod(_merge_rotating))
        patcher.set(cache.BatchRotatingKVCache, "extract", _extract_rotating)
        patcher.set(bq.BatchQuantizedRotatingKVCache, "extract", _extract_rotating)
        patcher.set(bq.QuantizedRotatingKVCache, "merge", classmethod(_merge_quantized_rotating))


FIX = BatchQuantizedRotatingCache()
