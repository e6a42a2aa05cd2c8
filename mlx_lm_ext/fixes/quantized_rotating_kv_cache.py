"""Sliding-window and bounded caches can be quantized.

Upstream: `RotatingKVCache.to_quantized` raises "RotatingKVCache Quantization NYI" in
every release (mlx-lm #1573, PRs #968/#1074 unmerged), which crashes `--kv-bits` on
Gemma 3/4 and gpt-oss and makes `--max-kv-size` + `--kv-bits` impossible.
Patch file: patches/0001-quantized-rotating-kv-cache.patch.
"""

from __future__ import annotations

from ..caches.quantized_rotating import QuantizedRotatingKVCache, rotating_to_quantized
from .base import Fix, Patcher


class QuantizedRotatingKVCacheFix(Fix):
    name = "quantized-rotating-kv-cache"
    summary = "RotatingKVCache.to_quantized returns a QuantizedRotatingKVCache"

    def needed(self) -> bool:
        from mlx_lm.models.cache import RotatingKVCache

        try:
            RotatingKVCache(max_size=4).to_quantized(group_size=64, bits=8)
        except NotImplementedError:
            return True
        return False

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models import cache

        # load_prompt_cache finds classes by name in the cache module's globals.
        patcher.set(cache, "QuantizedRotatingKVCache", QuantizedRotatingKVCache)
        patcher.set(cache.RotatingKVCache, "to_quantized", rotating_to_quantized)


FIX = QuantizedRotatingKVCacheFix()
