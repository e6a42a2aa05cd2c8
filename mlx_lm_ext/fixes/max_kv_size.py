"""max_kv_size bounds every model's cache, not only models without `make_cache`.

Upstream: `make_prompt_cache(model, max_kv_size)` returns `model.make_cache()` unchanged
when the model defines one (Gemma 3/4, gpt-oss, Qwen3-Next/3.5, ...), so the bound is
silently ignored exactly on the long-context models (mlx-lm #615). Here full-attention
layers become RotatingKVCache(max_kv_size, keep=4) as for plain models, sliding layers
keep the smaller of their window and the bound, recurrent state is already constant-size.
Without an explicit bound the process default (`--max-kv-size` of the server) applies.
Patch file: patches/0004-max-kv-size.patch.
"""

from __future__ import annotations

import logging
from typing import Any

from .. import layout
from ..settings import current
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")
KEEP = 4  # upstream keeps the first 4 tokens (attention sinks) when it bounds a cache


def bound_layer(cache: Any, bound: int, model: str) -> Any:
    from mlx_lm.models.cache import RotatingKVCache

    kind = layout.classify(cache, model)
    if kind == layout.FULL:
        return layout.mark_bounded(RotatingKVCache(max_size=bound, keep=KEEP))
    if kind == layout.SLIDING:
        if cache.max_size <= bound:
            return cache
        return RotatingKVCache(max_size=bound, keep=cache.keep)
    if kind == layout.LIST:
        cache.caches = type(cache.caches)(bound_layer(c, bound, model) for c in cache.caches)
        return cache
    if kind in (layout.RECURRENT, layout.CHUNKED):
        return cache
    raise layout.UnknownCacheLayout(f"{model}: cannot bound a {type(cache).__name__} to max_kv_size={bound}")


def make_prompt_cache(model: Any, max_kv_size: int | None = None) -> list[Any]:
    """mlx_lm's make_prompt_cache with the bound honoured for every layout."""
    bound = max_kv_size if max_kv_size is not None else current().max_kv_size
    from mlx_lm.models import cache

    caches = FIX.original(cache, "make_prompt_cache")(model, max_kv_size=bound)
    if bound is not None and hasattr(model, "make_cache"):
        name = layout.model_name(model)
        caches = [bound_layer(c, bound, name) for c in caches]
    elif bound is not None:  # upstream bounded every layer itself: all are full attention
        caches = [layout.mark_bounded(c) for c in caches]
    layout.remember_origin(model, caches)
    return caches


class MaxKvSize(Fix):
    name = "max-kv-size"
    summary = "make_prompt_cache(model, max_kv_size) bounds models that define make_cache"

    def needed(self) -> bool:
        from mlx_lm.models import cache

        if cache.make_prompt_cache is make_prompt_cache:
            return False

        class _Probe:
            layers = [None]

            def make_cache(self):
                return [cache.KVCache()]

        probe = cache.make_prompt_cache(_Probe(), max_kv_size=8)
        return layout.classify(probe[0]) == layout.FULL

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models import cache

        patcher.rebind(cache.make_prompt_cache, make_prompt_cache)


FIX = MaxKvSize()
