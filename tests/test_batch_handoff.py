"""batch-handoff: splitting finished prompts off a prompt batch copies no cache arrays,
and both halves go on exactly as after upstream's deep copy, for every batch cache kind."""

from __future__ import annotations

import importlib

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import GenerationBatch, PromptProcessingBatch
from mlx_lm.models.cache import ArraysCache, CacheList, KVCache, RotatingKVCache

import mlx_lm_ext
from mlx_lm_ext.caches.quantized_rotating import QuantizedRotatingKVCache
from mlx_lm_ext.fixes import batch_handoff

H, D = 2, 64
LENGTHS = [5, 9, 20]


def _kv(seed: int, n: int, rows: int = 1) -> tuple[mx.array, mx.array]:
    k = mx.random.normal((rows, H, n, D), key=mx.random.key(seed))
    return k, k * 0.5


KINDS = {
    "full": KVCache,
    "ring": lambda: RotatingKVCache(16),
    "keep-ring": lambda: RotatingKVCache(16, keep=4),
    "8-bit": lambda: KVCache().to_quantized(group_size=64, bits=8),
    "8-bit-ring": lambda: QuantizedRotatingKVCache(16, 0, 64, 8),
    "cache-list": lambda: CacheList(KVCache(), RotatingKVCache(16)),
}


def _fill(cache, seed: int, n: int):
    subs = cache.caches if isinstance(cache, CacheList) else [cache]
    for j, c in enumerate(subs):
        c.update_and_fetch(*_kv(100 * seed + j, n))
    return cache


def _ppb(caches: list[list]) -> PromptProcessingBatch:
    n = len(caches)
    return PromptProcessingBatch(
        model=None,
        uids=list(range(n)),
        caches=caches,
        samplers=[None] * n,
        logits_processors=[[] for _ in range(n)],
        stop_sequences=[[] for _ in range(n)],
        max_tokens=[1] * n,
    )


def _batch(kind: str) -> PromptProcessingBatch:
    return _ppb([[_fill(KINDS[kind](), r, n)] for r, n in enumerate(LENGTHS)])


def _step(batch: PromptProcessingBatch, seed: int) -> list[mx.array]:
    """One decode write into every layer of the batch; everything it holds after."""
    for c in batch.prompt_cache:
        subs = c.caches if isinstance(c, CacheList) else [c]
        for j, s in enumerate(subs):
            s.update_and_fetch(*_kv(seed + j, 1, len(batch.uids)))
    return _arrays_of([c.state for c in batch.prompt_cache])


def _arrays_of(tree) -> list[mx.array]:
    return [x for _, x in tree_flatten(tree) if isinstance(x, mx.array)]


@pytest.fixture
def handoff():
    """The package's batch fixes (merge of every kind), with and without batch-handoff."""
    mlx_lm_ext.apply()
    try:
        yield
    finally:
        mlx_lm_ext.revert()


def _split_both_ways(kind: str, rows: list[int]):
    out = {}
    for on in (False, True):
        if on != batch_handoff.FIX.applied:
            batch_handoff.FIX.revert() if batch_handoff.FIX.applied else batch_handoff.FIX.apply()
        batch = _batch(kind)
        new = batch.split(rows)
        out[on] = (_step(new, 7), _step(batch, 9) if batch.uids else [])
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("rows", [[0, 2], [1]], ids=["two-of-three", "one-of-three"])
def test_a_partial_split_goes_on_as_upstreams(handoff, kind, rows):
    """Both halves, each written after the split, hold what upstream's copy leaves."""
    got = _split_both_ways(kind, rows)
    for mine, theirs in zip(got[True], got[False], strict=True):
        assert len(mine) == len(theirs) > 0
        assert all(mx.array_equal(a, b).item() for a, b in zip(mine, theirs, strict=True))


def test_arrays_caches_split_as_upstreams(handoff):
    def batch():
        caches = []
        for r in range(3):
            c = ArraysCache(2)
            c[0], c[1] = _kv(r, 3)
            caches.append([c])
        return _ppb(caches)

    got = {}
    for on in (True, False):
        if on != batch_handoff.FIX.applied:
            batch_handoff.FIX.revert() if batch_handoff.FIX.applied else batch_handoff.FIX.apply()
        b = batch()
        new = b.split([2, 0])
        got[on] = _arrays_of([new.prompt_cache[0].state, b.prompt_cache[0].state])
    assert all(mx.array_equal(a, b).item() for a, b in zip(got[True], got[False], strict=True))


@pytest.mark.parametrize("on", [True, False], ids=["handoff", "upstream"])
def test_a_whole_split_moves_the_caches(handoff, on):
    """Every row leaving: the same arrays go over (upstream copies each layer's cache)."""
    if not on:
        batch_handoff.FIX.revert()
    caches = [[_fill(KVCache(), r, 2048)] for r in range(2)]
    batch = _ppb(caches)
    keys = batch.prompt_cache[0].keys
    mx.eval([c.state for c in batch.prompt_cache])
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    new = batch.split([1, 0])
    mx.eval([c.state for c in new.prompt_cache])
    grew = mx.get_peak_memory() - before
    assert batch.uids == [] and batch.prompt_cache == [] and new.uids == [0, 1]
    if on:
        assert new.prompt_cache[0].keys is keys and grew < keys.nbytes // 8, grew
    else:  # what the fix removes: a copy of every layer's cache
        assert new.prompt_cache[0].keys is not keys and grew >= keys.nbytes, grew


def test_needed_upstream_and_revert_restores(handoff):
    batch_handoff.FIX.revert()
    upstream = (PromptProcessingBatch.split, PromptProcessingBatch._copy)
    assert batch_handoff.FIX.needed()
    batch_handoff.FIX.apply()
    assert (PromptProcessingBatch.split, PromptProcessingBatch._copy) == (
        batch_handoff.split,
        batch_handoff._copy,
    )
    assert not batch_handoff.FIX.needed()
    batch_handoff.FIX.revert()
    assert (PromptProcessingBatch.split, PromptProcessingBatch._copy) == upstream


def _join_both_ways(kind: str) -> dict[bool, list[mx.array]]:
    out = {}
    for on in (False, True):
        if on != batch_handoff.FIX.applied:
            batch_handoff.FIX.revert() if batch_handoff.FIX.applied else batch_handoff.FIX.apply()
        gen = importlib.import_module("mlx_lm.generate")
        running, joining = _batch(kind), _batch(kind)
        running.prompt_cache = gen._extend_cache(running.prompt_cache, joining.prompt_cache)
        running.uids = list(range(6))
        out[on] = _step(running, 11)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_join_a_layer_at_a_time_holds_what_upstreams_holds(handoff, kind):
    got = _join_both_ways(kind)
    assert len(got[True]) == len(got[False]) > 0
    assert all(mx.array_equal(a, b).item() for a, b in zip(got[True], got[False], strict=True))


@pytest.mark.parametrize("on", [True, False], ids=["handoff", "upstream"])
def test_a_join_holds_one_layer_twice_at_most(handoff, on):
    """8 layers of two 2-row batches of 2048 tokens: joined a layer at a time, the peak
    grows by about one joined layer; upstream's join holds every layer twice."""
    if not on:
        batch_handoff.FIX.revert()
    gen = importlib.import_module("mlx_lm.generate")

    def layers(seed):
        caches = [[KVCache() for _ in range(8)] for _ in range(2)]
        for r, row in enumerate(caches):
            for j, c in enumerate(row):
                c.update_and_fetch(*_kv(seed + 10 * r + j, 2048))
        return _ppb(caches).prompt_cache

    a, b = layers(0), layers(100)
    mx.eval([c.state for c in a + b])
    layer = a[0].keys.nbytes + a[0].values.nbytes  # one layer of one batch
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    joined = gen._extend_cache(a, b)
    mx.eval([c.state for c in joined])
    grew = mx.get_peak_memory() - before
    if on:
        assert grew <= 3 * layer, (grew, layer)
    else:
        assert grew >= 8 * layer, (grew, layer)


def _filter_both_ways(kind: str, keep: list[int]) -> dict[bool, list[mx.array]]:
    out = {}
    for on in (False, True):
        if on != batch_handoff.FIX.applied:
            batch_handoff.FIX.revert() if batch_handoff.FIX.applied else batch_handoff.FIX.apply()
        batch = _batch(kind)
        batch.filter(keep)
        out[on] = _step(batch, 13)
    return out


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("keep", [[0, 2], [2]], ids=["two-of-three", "one-of-three"])
def test_a_filter_a_layer_at_a_time_holds_what_upstreams_holds(handoff, kind, keep):
    got = _filter_both_ways(kind, keep)
    assert len(got[True]) == len(got[False]) > 0
    assert all(mx.array_equal(a, b).item() for a, b in zip(got[True], got[False], strict=True))


def _eight_layers(rows: int = 4, tokens: int = 2048) -> PromptProcessingBatch:
    """A prompt batch of `rows` requests, 8 layers of `tokens` each, evaluated."""
    caches = [[KVCache() for _ in range(8)] for _ in range(rows)]
    for r, row in enumerate(caches):
        for j, c in enumerate(row):
            c.update_and_fetch(*_kv(10 * r + j, tokens))
    batch = _ppb(caches)
    mx.eval([c.state for c in batch.prompt_cache])
    return batch


def _generation(caches: list) -> GenerationBatch:
    """A GenerationBatch holding `caches` (no model: it never steps here)."""
    batch = GenerationBatch(None, [], None, [], [], None, None, None, [], [])
    n = caches[0].keys.shape[0]
    batch.uids, batch.prompt_cache, batch.tokens = list(range(n)), caches, [[1]] * n
    batch.samplers, batch.logits_processors = [None] * n, [[] for _ in range(n)]
    batch.stop_sequences, batch.max_tokens = [[] for _ in range(n)], [8] * n
    batch._next_tokens, batch._next_logprobs = mx.zeros((n,), mx.int32), [None] * n
    batch._token_context, batch._num_tokens, batch._matchers = [None] * n, [0] * n, [None] * n
    return batch


@pytest.mark.parametrize("on", [True, False], ids=["handoff", "upstream"])
def test_a_finished_request_leaves_holding_one_layer_twice_at_most(handoff, on):
    """A 4-row batch of 8 layers, one request finishing as `GenerationBatch.next` ends
    one: its rows extracted, the other three filtered. Upstream's extracted rows are
    lazy slices holding every layer's whole buffer, and its filter gathers every layer
    before freeing any: after the step, old and new are held at once."""
    if not on:
        batch_handoff.FIX.revert()
    batch = _generation(_eight_layers().prompt_cache)
    layer = batch.prompt_cache[0].keys.nbytes + batch.prompt_cache[0].values.nbytes
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    finished = batch.extract_cache(0)
    batch.filter([1, 2, 3])
    mx.eval([c.state for c in batch.prompt_cache])  # the step after
    grew, held = mx.get_peak_memory() - before, mx.get_active_memory() - before
    assert batch.uids == [1, 2, 3] and batch.prompt_cache[0].keys.shape[0] == 3
    if on:
        # the finished rows (a quarter of every layer, 2 layers' bytes) plus one layer
        assert grew <= 3 * layer and abs(held) <= layer // 8, (grew, held, layer)
    else:
        assert grew >= 5 * layer and held >= 5 * layer, (grew, held, layer)
    mx.eval([c.state for c in finished])
    assert finished[0].keys.shape[0] == 1


@pytest.mark.parametrize("on", [True, False], ids=["handoff", "upstream"])
def test_a_prompt_batch_filter_holds_one_layer_twice_at_most(handoff, on):
    """`PromptProcessingBatch.filter` (a request removed mid-prompt) frees each layer's
    old buffers before the next layer's rows are gathered."""
    if not on:
        batch_handoff.FIX.revert()
    batch = _eight_layers()
    layer = batch.prompt_cache[0].keys.nbytes + batch.prompt_cache[0].values.nbytes
    mx.synchronize()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    batch.filter([0, 1])
    mx.eval([c.state for c in batch.prompt_cache])
    grew = mx.get_peak_memory() - before
    if on:
        assert grew <= layer, (grew, layer)
    else:
        assert grew >= 3 * layer, (grew, layer)


@pytest.mark.parametrize("on", [True, False], ids=["handoff", "upstream"])
def test_a_filter_that_drops_shared_padding_frees_it(handoff, on):
    """Rows 1-3 shorter than row 0 by 1024 tokens: once row 0 leaves, upstream's filter
    slices the padding the rest share off each layer, a view that still holds it (until
    the buffer next grows). With the fix each layer is copied to its own buffer, one at
    a time, the padding freed; the next decode write then copies nothing."""
    if not on:
        batch_handoff.FIX.revert()
    caches = [[KVCache() for _ in range(8)] for _ in range(4)]
    for r, row in enumerate(caches):
        for j, c in enumerate(row):
            c.update_and_fetch(*_kv(10 * r + j, 2048 if r == 0 else 1024))
    batch = _ppb(caches)
    del caches
    _step(batch, 3)  # a decode write: the buffers grow past the tokens (2304 columns)
    mx.eval([c.state for c in batch.prompt_cache])
    padding = 8 * 2 * 3 * H * 1024 * D * 4  # 8 layers, keys and values, 3 rows, float32
    mx.synchronize()
    before = mx.get_active_memory()
    mx.reset_peak_memory()
    batch.filter([1, 2, 3])
    mx.eval([c.state for c in batch.prompt_cache])
    assert batch.prompt_cache[0].left_padding.tolist() == [0, 0, 0]
    assert batch.prompt_cache[0].keys.shape[2] == 2304 - 1024
    three_rows = 8 * 2 * 3 * H * 2304 * D * 4
    held = mx.get_active_memory() - before + 4 * three_rows // 3  # what the batch holds now
    layer = 2 * 3 * H * 2304 * D * 4
    if on:
        assert abs(held - (three_rows - padding)) <= layer // 8, (held, three_rows, padding)
        assert mx.get_peak_memory() - before <= 2 * layer, "a layer (gathered, then copied) at a time"
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        _step(batch, 5)
        assert mx.get_peak_memory() - start <= layer // 8, "the write copies nothing"
    else:
        assert abs(held - three_rows) <= layer // 8, (held, three_rows)


def test_extracted_caches_dropped_are_not_kept_track_of(handoff):
    """A server extracts caches with no filter after (a prompt cache snapshot): the
    batch keeps no record of those already dropped, and holds none alive."""
    batch = _generation(_eight_layers().prompt_cache)
    for _ in range(5):
        batch.extract_cache(1)
    assert len(batch._leaving) == 1  # the last one's caches only die with the statement
    kept = batch.extract_cache(2)
    batch.extract_cache(3)
    assert len(batch._leaving) == 2 and batch._leaving[0][0]() is kept[0]
    batch.filter([0, 1])
    assert "_leaving" not in vars(batch) and kept[0].keys.shape[0] == 1
