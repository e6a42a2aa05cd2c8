"""A prompt the prompt cache holds whole still leaves a token to process.

Upstream (0.32.2, 0.31.3): `LRUPromptCache.fetch_nearest_cache` answers an exact hit
with the whole cache and no tokens left, and the server hands that on: the batch
generator raises "Sequence N has an empty prompt" (0.31: an IndexError) outside any
per-request handling, so the generation thread dies and every later request gets 503.
An exact hit is what a client continuing a completion sends (the prompt plus the text
it got back; measured on SmolLM2-135M, batched, with and without --kv-bits), and on
0.31, which stores whole prompts, any repeated prompt. Here an exact hit gives back the
cache trimmed by one token and that token to process (generation needs its logits), or,
where the cache cannot be trimmed (recurrent layers), no cache: a full prefill.
The series does this in the server (`ResponseGenerator._fetch_cache`), leaving the
cache's own answer as upstream's tests expect; the monkeypatch cannot reach the server's
call sites, so it wraps `fetch_nearest_cache` itself. Patch file:
patches/0014-prompt-cache-full-hit.patch.
"""

from __future__ import annotations

from typing import Any

from .base import Fix, Patcher


def leave_one_token(cache: Any, tokens: list[int], rest: list[int]) -> tuple[Any, list[int]]:
    """(cache, rest) with at least one token in rest."""
    from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache

    if cache is None or rest or not tokens:
        return cache, rest
    if can_trim_prompt_cache(cache):
        trim_prompt_cache(cache, 1)
        return cache, list(tokens[-1:])
    return None, list(tokens)


def fetch_nearest_cache(self, model: Any, tokens: list[int]):
    from mlx_lm.models import cache as cache_module

    original = FIX.original(cache_module.LRUPromptCache, "fetch_nearest_cache")
    cache, rest = original(self, model, tokens)
    return leave_one_token(cache, tokens, rest)


class PromptCacheFullHit(Fix):
    name = "prompt-cache-full-hit"
    summary = "a prompt the prompt cache holds whole leaves its last token to process (no empty prompt)"

    def needed(self) -> bool:
        from mlx_lm import server
        from mlx_lm.models import cache as cache_module

        generator = getattr(server, "ResponseGenerator", None)
        if not hasattr(cache_module, "LRUPromptCache") or hasattr(generator, "_fetch_cache"):
            return False  # no prompt cache yet, or the series' server-side fix
        return _exact_hit_leaves_nothing(cache_module)

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models import cache as cache_module

        patcher.set(cache_module.LRUPromptCache, "fetch_nearest_cache", fetch_nearest_cache)


def _exact_hit_leaves_nothing(cache_module: Any) -> bool:
    """Store a 3-token cache and ask for the same 3 tokens."""
    import mlx.core as mx

    kv = cache_module.KVCache()
    kv.update_and_fetch(mx.zeros((1, 1, 3, 8)), mx.zeros((1, 1, 3, 8)))
    lru = cache_module.LRUPromptCache()
    lru.insert_cache("probe", [1, 2, 3], [kv])
    return lru.fetch_nearest_cache("probe", [1, 2, 3])[1] == []


FIX = PromptCacheFullHit()
