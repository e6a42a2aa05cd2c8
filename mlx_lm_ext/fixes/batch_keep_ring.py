"""--max-kv-size with continuous batching: batch rings keep a bounded cache's `keep`
tokens, and the server batches bounded caches.

Upstream: BatchRotatingKVCache has no `keep` (caches/batch_keep_ring.py says why), so a
batch of `RotatingKVCache(max_size, keep=4)` requests (what --max-kv-size makes) drops
each request's first tokens once the ring wraps, and this package's server served
bounded caches one request at a time. Here a merge of rings with keep > 0 gives a
BatchKeepRotatingKVCache (BatchKeepQuantizedRotatingKVCache where a member is
quantized), whose rows attend as each ring alone, and the server batches them wherever
a prompt fits the ring: with --max-prompt-tokens at its default (or at most
--max-kv-size). A larger limit keeps the one-at-a-time path, where a ring trims long
prompts as upstream does.
No patch file yet: the series' counterpart is still to be written.
"""

from __future__ import annotations

import logging
from typing import Any

from ..caches import batch_keep_ring as bk
from ..caches import batch_quantized as bq
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")


def _merge(owner: type):
    def merge(cls, caches: list[Any]):
        if caches and caches[0].keep > 0:
            quantized = any(map(bq.is_quantized, caches))
            batch = bk.BatchKeepQuantizedRotatingKVCache if quantized else bk.BatchKeepRotatingKVCache
            return batch.merge(caches)
        return FIX.original(owner, "merge")(caches)

    return classmethod(merge)


def prompts_fit_the_ring(cli_args: Any) -> bool:
    """Every prompt the server accepts fits --max-kv-size (its default prompt limit)."""
    bound = getattr(cli_args, "max_kv_size", None)
    limit = getattr(cli_args, "max_prompt_tokens", None)
    return bound is None or limit is None or 0 < limit <= bound


def _is_batchable(self, args) -> bool:
    if not prompts_fit_the_ring(getattr(self.model_provider, "cli_args", None)):
        reason = "--max-prompt-tokens past --max-kv-size: long prompts go one at a time"
        if reason not in FIX.state.setdefault("logged", set()):
            FIX.state["logged"].add(reason)
            log.info("%s", reason)
        return False
    from mlx_lm import server

    return FIX.original(server.ResponseGenerator, "_is_batchable")(self, args)


class BatchKeepRing(Fix):
    name = "batch-keep-ring"
    summary = "--max-kv-size batches: batch rings keep the bounded cache's keep tokens"

    def needed(self) -> bool:
        from mlx_lm.models.cache import RotatingKVCache

        merged = RotatingKVCache.merge([RotatingKVCache(8, keep=4)])
        return not hasattr(merged, "keep")

    def install(self, patcher: Patcher) -> None:
        from mlx_lm import server
        from mlx_lm.models.cache import RotatingKVCache

        from ..caches.quantized_rotating import QuantizedRotatingKVCache

        patcher.set(RotatingKVCache, "merge", _merge(RotatingKVCache))
        patcher.set(QuantizedRotatingKVCache, "merge", _merge(QuantizedRotatingKVCache))
        patcher.set(server.ResponseGenerator, "_is_batchable", _is_batchable)


FIX = BatchKeepRing()


def keeps_batched() -> bool:
    """Batch rings honour `keep`: bounded caches need not go one at a time."""
    return FIX.applied
