"""Batches hand prompts to generation, join and drop requests without holding every
layer's cache twice.

Upstream (0.32.2): `PromptProcessingBatch.split`, which moves the requests whose prompts
are done to the generation batch, starts from `copy.deepcopy` of the whole prompt batch,
arrays included, then filters both halves (a gather of every layer's rows each). Every
layer's keys and values then exist two or three times at once, and the copy is held
into the first decode step. Measured on the H200 (Llama-3.1-8B shape, 4 requests of 32K
tokens at 16 bits, mlx CUDA 0.32.4): active memory 16.0 GiB of caches before the handoff,
23.4 GiB after it, peak 24.4 GiB, where every decode step after peaks at 16.35 GiB; at
8 bits, 8.5 -> 12.6 GiB. That jump set the peak of the capacity benchmark's whole run.

Here the copy shares the cache objects' arrays (a filter rebinds a cache's arrays to its
own rows; none writes into them), and a split of every row, the usual case (prompts
prefilled together finish together), hands the caches over without filtering them.

The join that follows has the same shape: `_extend_cache` concatenates every layer of the
joining batch onto the running one, and until the step evaluates, every layer's old
buffers of both batches are held with the new ones: with 12 requests of 32K at 16 bits
(8 decoding, 4 joining), the join and the first step after it peaked 8.7 and 13.6 GiB
above weights and caches, the handoff copy included (2.4 and 0.7 with this fix). Here
the layers are joined one at a time, each evaluated before the next and the joining
batch's layer dropped once joined (the joining batch is consumed, as every caller of
`extend` leaves it), so a join holds one layer twice at most.

A request that finishes leaves the same way: `GenerationBatch.next` extracts its rows
(lazily, slices of the batch's buffers) and filters the rest out of every layer (a
gather each), all evaluated with the next step, when every layer's old buffers are held
beside the new ones (on the H200, 12 requests of 32K at 16 bits, 8 finishing: the step
after peaked 20.9 GiB above weights and caches). Here a filter goes a layer at a time:
the kept rows and the leaving requests' rows (while anything holds them) evaluated, then
the old layer freed, before the next layer (2.4 GiB above, at the finishing step). Where
upstream's filter slices off the left padding its rows share, the view it leaves holds
that padding until the buffer next grows: the layer is copied then, freeing it.
Patch file: patches/0022-batch-handoff.patch.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx

from .base import Fix, Patcher
from .base import generate_module as _generate


def _arrays(obj: Any, found: dict[int, Any], seen: set[int]) -> None:
    """Every mx.array reachable from obj through lists, tuples, dicts and attributes."""
    if isinstance(obj, mx.array):
        found[id(obj)] = obj
        return
    if id(obj) in seen or isinstance(obj, (str, bytes, int, float, bool, type(None))):
        return
    seen.add(id(obj))
    if isinstance(obj, (list, tuple)):
        items = obj
    elif isinstance(obj, dict):
        items = obj.values()
    else:
        items = vars(obj).values() if hasattr(obj, "__dict__") else ()
    for item in items:
        _arrays(item, found, seen)


def shared_copy(caches: list[Any]) -> list[Any]:
    """The cache objects copied, their arrays shared (deepcopy's memo maps each to itself)."""
    memo: dict[int, Any] = {}
    _arrays(caches, memo, set())
    return copy.deepcopy(caches, memo)


def extend_caches(cache_a: list[Any], cache_b: list[Any]) -> list[Any]:
    """`_extend_cache` a layer at a time: each joined layer evaluated, the joining
    batch's layer dropped, before the next."""
    join = FIX.original(_generate(), "_extend_cache")
    if not cache_a or not cache_b:
        return join(cache_a, cache_b)
    joined = []
    for i in range(len(cache_a)):
        layer = join([cache_a[i]], [cache_b[i]])
        mx.eval([c.state for c in layer])
        cache_b[i] = None  # its rows are in the joined layer now
        joined.extend(layer)
    return joined


def filter_caches(caches: list[Any], keep: list[int], leaving: list[list[Any]]) -> None:
    """Layer by layer: the kept rows filtered, the leaving requests' rows (extracted,
    still alive) and the kept ones evaluated, before the next layer is touched."""
    for i, c in enumerate(caches):
        if keep:
            c.filter(keep)
            _own_buffers(c)
        rows = [x for x in (r[i]() for r in leaving) if x is not None]
        mx.eval(c.state if keep else [], [x.state for x in rows])
        if not keep:
            caches[i] = None  # every row has left: the layer's buffers go now
    if not keep:
        caches.clear()


def _own_buffers(cache: Any) -> None:
    """A 16-bit cache's keys and values as arrays of their own. Upstream's filter drops
    the left padding its rows share by slicing, and the view keeps holding that padding
    until the buffer next grows; copied here, a layer at a time, the padding is freed."""
    subs = cache.caches if isinstance(getattr(cache, "caches", None), tuple) else (cache,)
    for sub in subs:
        own = vars(sub)  # a property (a quantized cache's tail) is not read: it would flush
        if isinstance(own.get("keys"), mx.array) and isinstance(own.get("values"), mx.array):
            sub.keys, sub.values = mx.contiguous(sub.keys), mx.contiguous(sub.values)


def _in_layers(owner: Callable[[], type]) -> tuple[Callable, Callable]:
    """A batch class's `filter` and `extract_cache`: rows extracted stay lazy, as
    upstream's, and are evaluated with the filter that follows, a layer at a time."""

    def extract_cache(self, idx: int) -> list[Any]:
        out = FIX.original(owner(), "extract_cache")(self, idx)
        alive = [r for r in vars(self).get("_leaving", []) if any(w() is not None for w in r)]
        self._leaving = [*alive, [weakref.ref(c) for c in out]]  # no filter may follow
        return out

    def filter(self, keep: list[int]) -> None:
        caches, self.prompt_cache = self.prompt_cache, []
        try:
            FIX.original(owner(), "filter")(self, keep)  # the batch's lists, no cache
        finally:
            self.prompt_cache = caches
        filter_caches(caches, keep, vars(self).pop("_leaving", []))

    return filter, extract_cache


def _generation_owner() -> type:
    from mlx_lm.generate import GenerationBatch

    return GenerationBatch


def _owner() -> type:
    from mlx_lm.generate import PromptProcessingBatch

    return PromptProcessingBatch


def _copy(self):
    caches, self.prompt_cache = self.prompt_cache, []
    try:
        new = FIX.original(_owner(), "_copy")(self)
    finally:
        self.prompt_cache = caches
    new.prompt_cache = shared_copy(caches)
    return new


def split(self, indices: list[int]):
    if sorted(indices) != list(range(len(self.uids))):
        return FIX.original(_owner(), "split")(self, indices)  # its _copy is the one above
    new = self._copy()
    self.filter([])  # every row leaves: the caches go over as they are
    return new


class BatchHandoff(Fix):
    name = "batch-handoff"
    summary = (
        "finished prompts hand their caches to generation uncopied; joins and finished "
        "requests go a layer at a time"
    )

    def needed(self) -> bool:
        owner = getattr(_generate(), "PromptProcessingBatch", None)
        if owner is None or not hasattr(owner, "_copy"):
            return False  # releases before the prompt/generation batch split
        return _split_copies_arrays(owner)

    def install(self, patcher: Patcher) -> None:
        patcher.set(_owner(), "_copy", _copy)
        patcher.set(_owner(), "split", split)
        patcher.set(_generate(), "_extend_cache", extend_caches)
        for owner in (_owner, _generation_owner):
            filter, extract_cache = _in_layers(owner)
            patcher.set(owner(), "filter", filter)
            patcher.set(owner(), "extract_cache", extract_cache)


def _split_copies_arrays(owner: type) -> bool:
    """Split a one-request prompt batch whole: are its keys a new array?"""
    from mlx_lm.models.cache import KVCache

    kv = KVCache()
    kv.update_and_fetch(mx.zeros((1, 1, 2, 8)), mx.zeros((1, 1, 2, 8)))
    batch = owner(None, [0], [[kv]], None, 2048, [None], None, [[]], [[]], [1])
    keys = batch.prompt_cache[0].keys
    return batch.split([0]).prompt_cache[0].keys is not keys


FIX = BatchHandoff()
