"""--max-kv-size with continuous batching: batch rings keep a bounded cache's `keep`
tokens, and the server batches bounded caches.

Upstream: BatchRotatingKVCache has no `keep` (caches/batch_keep_ring.py says why), so a
batch of `RotatingKVCache(max_size, keep=4)` requests (what --max-kv-size makes) drops
each request's first tokens once the ring wraps, and this package's server served
bounded caches one request at a time. Here a merge of rings with keep > 0 gives a
BatchKeepRotatingKVCache (BatchKeepQuantizedRotatingKVCache where a member is
quantized), whose rows attend as each ring alone, prompts longer than the ring
included (trimmed as each ring trims them), so the server batches bounded caches.
Patches: patches/0018-batch-keep-ring.patch (the class),
patches/0019-batch-keep-ring-long-prompts.patch (prompts past the ring),
patches/0020-batch-keep-ring-membership.patch (merge, filter, extend) and
patches/0021-batch-keep-ring-quantized.patch (the quantized twin; the server batches).
"""

from __future__ import annotations

from typing import Any

from ..caches import batch_keep_ring as bk
from ..caches import batch_quantized as bq
from .base import Fix, Patcher


def _merge(owner: type):
    def merge(cls, caches: list[Any]):
        if caches and caches[0].keep > 0:
            quantized = any(map(bq.is_quantized, caches))
            batch = bk.BatchKeepQuantizedRotatingKVCache if quantized else bk.BatchKeepRotatingKVCache
            return batch.merge(caches)
        return FIX.original(owner, "merge")(caches)

    return classmethod(merge)


class BatchKeepRing(Fix):
    name = "batch-keep-ring"
    patches = (
        "batch-keep-ring",
        "batch-keep-ring-long-prompts",
        "batch-keep-ring-membership",
        "batch-keep-ring-quantized",
    )
    summary = "--max-kv-size batches: batch rings keep the bounded cache's keep tokens"

    def needed(self) -> bool:
        from mlx_lm.models.cache import RotatingKVCache

        merged = RotatingKVCache.merge([RotatingKVCache(8, keep=4)])
        return not hasattr(merged, "keep")

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models.cache import RotatingKVCache

        from ..caches.quantized_rotating import QuantizedRotatingKVCache

        patcher.set(RotatingKVCache, "merge", _merge(RotatingKVCache))
        patcher.set(QuantizedRotatingKVCache, "merge", _merge(QuantizedRotatingKVCache))


FIX = BatchKeepRing()


def keeps_batched() -> bool:
    """Batch rings honour `keep`: bounded caches need not go one at a time."""
    return FIX.applied
