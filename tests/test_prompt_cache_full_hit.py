"""A prompt the prompt cache holds whole leaves its last token to process."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import ArraysCache, KVCache, LRUPromptCache

from mlx_lm_ext.fixes.prompt_cache_full_hit import FIX, leave_one_token


def _kv(tokens: int) -> KVCache:
    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 1, tokens, 8)), mx.zeros((1, 1, tokens, 8)))
    return kv


@pytest.fixture
def applied():
    FIX.apply()
    yield
    FIX.revert()


def test_upstream_hands_back_no_tokens_on_an_exact_hit():
    """What the fix is for: the server passes this on as an empty prompt."""
    lru = LRUPromptCache()
    lru.insert_cache("m", [1, 2, 3], [_kv(3)])
    assert lru.fetch_nearest_cache("m", [1, 2, 3])[1] == []
    assert FIX.needed()


def test_an_exact_hit_is_trimmed_by_the_token_left_to_process(applied):
    lru = LRUPromptCache()
    lru.insert_cache("m", [1, 2, 3], [_kv(3)])
    cache, rest = lru.fetch_nearest_cache("m", [1, 2, 3])
    assert rest == [3] and cache[0].offset == 2
    cache, rest = lru.fetch_nearest_cache("m", [1, 2, 3])  # the stored entry is untouched
    assert rest == [3] and cache[0].offset == 2
    assert lru.fetch_nearest_cache("m", [1, 2, 3, 4])[1] == [4]  # a longer prompt as before
    assert not FIX.needed()


def test_a_cache_that_cannot_trim_is_not_used_for_an_exact_hit():
    state = ArraysCache(size=1)
    state[0] = mx.zeros((1, 4))
    assert leave_one_token([state], [1, 2, 3], []) == (None, [1, 2, 3])
    assert leave_one_token(None, [1, 2, 3], [1, 2, 3]) == (None, [1, 2, 3])
