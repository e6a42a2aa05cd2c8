"""Batch caches quantize: BatchKVCache.to_quantized and merges of quantized requests.

Upstream: BatchKVCache has no `to_quantized`, and `KVCache.merge` (BatchKVCache.merge)
takes 16-bit caches only, so a batch can never hold a quantized cache (mlx-lm #1353:
the server turns batching off under --kv-bits). Here a BatchKVCache converts into
caches/batch_quantized.py's BatchQuantizedKVCache, and merging per-request caches of
which any is quantized (from the prompt cache) gives one, quantizing the 16-bit members.
Patch file: patches/0007-batch-quantized-cache.patch.
"""

from __future__ import annotations

from ..caches import batch_quantized as bq
from .base import Fix, Patcher


def _merge_full(cls, caches):
    if any(map(bq.is_quantized, caches)):
        return bq.BatchQuantizedKVCache.merge(caches)
    from mlx_lm.models.cache import BatchKVCache

    return FIX.original(BatchKVCache, "merge")(caches)


def _merge_quantized(cls, caches):
    return bq.BatchQuantizedKVCache.merge(caches)


class BatchQuantizedCache(Fix):
    name = "batch-quantized-cache"
    summary = "BatchKVCache.to_quantized; merges take quantized requests (BatchQuantizedKVCache)"

    def needed(self) -> bool:
        from mlx_lm.models.cache import BatchKVCache

        return not hasattr(BatchKVCache, "to_quantized")

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models import cache

        patcher.set(cache.BatchKVCache, "to_quantized", bq.batch_to_quantized)
        patcher.set(cache.BatchKVCache, "merge", classmethod(_merge_full))
        patcher.set(cache.QuantizedKVCache, "merge", classmethod(_merge_quantized))


FIX = BatchQuantizedCache()
