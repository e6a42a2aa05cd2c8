"""The server's prompt cache stores entries cut to their tokens, quantized when asked.

Upstream (0.32.2): `LRUPromptCache.insert_cache` keeps the cache generation left, its
step-allocated padding included (up to 255 rows a layer), and quantized only where live
decoding was (the sequential path, past `--quantized-kv-start`), so `--prompt-cache-bytes`
holds few long prefixes (vllm-mlx quantizes its prefix cache on store for this, PR #62).
Here each entry is cut to its tokens, and with `--prompt-cache-bits N` its 16-bit
attention layers are stored at N bits once it holds `--prompt-cache-min-quantize-tokens`
(default 256); a fetched entry continues in the live precision (caches/prompt_store.py).
`LRUPromptCache(bits=, group_size=, min_quantize_tokens=)` takes them in Python too.
Patch file: patches/0017-prompt-cache-bits.patch.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from ..caches import prompt_store
from ..settings import current
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")


def __init__(
    self,
    max_size: int = 10,
    max_bytes: int = 1 << 63,
    bits: int | None = None,
    group_size: int | None = None,
    min_quantize_tokens: int | None = None,
):
    """LRUPromptCache taking the patch series' storage arguments; those left out
    follow the process's flags (--prompt-cache-bits, --kv-group-size,
    --prompt-cache-min-quantize-tokens), which the server's own LRU reads."""
    _original("__init__")(self, max_size, max_bytes)
    self.bits, self.group_size, self.min_quantize_tokens = bits, group_size, min_quantize_tokens


def storage(lru: Any, tokens: int) -> tuple[int | None, int]:
    """(bits, group size) an entry of `tokens` tokens is stored at."""
    settings, own = current(), vars(lru)  # an LRU made before the fix has no arguments
    bits = own.get("bits") if own.get("bits") is not None else settings.prompt_cache_bits
    group = own.get("group_size") or settings.kv_group_size
    least = own.get("min_quantize_tokens")
    least = settings.prompt_cache_min_quantize_tokens if least is None else least
    return (bits if tokens >= least else None), group


def insert_cache(self, model: Any, tokens: list[int], prompt_cache: list[Any], **kwargs: Any):
    """LRUPromptCache.insert_cache storing `prompt_store.for_storage(prompt_cache)`."""
    bits, group = storage(self, len(tokens))
    entry = prompt_store.for_storage(prompt_cache, bits, group)
    if bits is not None and log.isEnabledFor(logging.DEBUG):
        before, after = (sum(c.nbytes for c in x) for x in (prompt_cache, entry))
        log.debug("prompt cache: stored %d tokens in %d bytes (as generated: %d)", len(tokens), after, before)
    return _original("insert_cache")(self, model, tokens, entry, **kwargs)


def fetch_nearest_cache(self, model: Any, tokens: list[int]):
    """LRUPromptCache.fetch_nearest_cache giving the layers stored quantized back at 16 bits."""
    cache, rest = _original("fetch_nearest_cache")(self, model, tokens)
    return prompt_store.for_live(cache), rest


def _original(name: str) -> Any:
    from mlx_lm.models.cache import LRUPromptCache

    return FIX.original(LRUPromptCache, name)


class PromptCacheBits(Fix):
    name = "prompt-cache-bits"
    summary = "prompt-cache entries cut to their tokens; --prompt-cache-bits stores them quantized"

    def needed(self) -> bool:
        from mlx_lm.models import cache as cache_module

        lru = getattr(cache_module, "LRUPromptCache", None)
        return lru is not None and "bits" not in inspect.signature(lru.__init__).parameters

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models.cache import LRUPromptCache

        patcher.set(LRUPromptCache, "__init__", __init__)
        patcher.set(LRUPromptCache, "insert_cache", insert_cache)
        patcher.set(LRUPromptCache, "fetch_nearest_cache", fetch_nearest_cache)


FIX = PromptCacheBits()
