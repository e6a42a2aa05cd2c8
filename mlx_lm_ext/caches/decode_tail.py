"""A quantized cache's decode steps write 16-bit rows; a block of them is quantized at once.

Upstream's `QuantizedKVCache.update_and_fetch` quantizes every new token: two quantize
ops and six slice updates a layer a step, against two slice updates for the 16-bit cache.
On MLX's CUDA backend each op costs ~7-10 us of dispatch, and on a Llama-3.1-8B shape
the quantized step was ~4 ms slower than the 16-bit one at 4K and 32K tokens alike, with
the attention kernel only ~0.4 ms of that (benchmarks/kv_speed.py, README "CUDA
backend"). Here a one-token update writes the key and value rows into a 16-bit tail of
TAIL_ROWS rows (two slice updates, as for the 16-bit cache), and every TAIL_ROWS tokens
the tail is quantized into the cache's buffers by upstream's own update, in one call:
the stored data is exactly what upstream stores (groups run along the head dimension, so
quantizing rows together or one by one gives the same bytes). HF transformers'
`QuantizedCache` keeps such a residual 16-bit window too (128 tokens).

The tail travels with the quantized rows: `update_and_fetch` returns `Pending` triples
(the quantized rows' views) whose `tail` holds the 16-bit rows, and attention
(`fixes.quantized_attention`) reads both, so Gemma 4's KV-shared layers, which get the
triples without the cache, see every row. Every other reader of the cache (`state`,
`keys`, `values`, `nbytes`, `trim`, batching's merge) goes through the `keys`/`values`
properties, which quantize the pending rows first: they see upstream's layout, whole.
Installed by `fixes.decode_tail` where MLX runs the flash decode kernel, which takes the
tail as one more chunk (cuda_attention.py); elsewhere attention over a tail dequantizes
(correct, slower), so the fix is not installed there.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import mlx.core as mx

TAIL_ROWS = 64  # 16-bit rows a cache holds before quantizing them (8 ops per 64 steps)

_original: dict[str, Any] = {}  # QuantizedKVCache's own methods, set by `install`
_live: weakref.WeakSet = weakref.WeakSet()  # caches that have held a tail


class Tail(NamedTuple):
    """The 16-bit rows after a cache's quantized ones: the first `rows` rows of the
    cache's tail buffers (B, H, TAIL_ROWS, D). The flash kernel reads the buffers as they
    are, so a decode step adds no slice op to the graph; `keys` and `values` slice them."""

    key_buffer: mx.array
    value_buffer: mx.array
    rows: int
    owner: Any  # a weak reference to the cache

    @property
    def keys(self) -> mx.array:
        return self.key_buffer[..., : self.rows, :]

    @property
    def values(self) -> mx.array:
        return self.value_buffer[..., : self.rows, :]

    def decline(self) -> None:
        """Attention cannot read this tail fast (no flash kernel for the shape): the cache
        goes back to quantizing every token, from its next update on."""
        cache = self.owner()
        if cache is not None:
            cache._tail_off = True


class Pending(tuple):
    """A quantized (data, scales, biases) triple of views and the rows after them."""

    tail: Tail

    def __new__(cls, triple, tail: Tail) -> Pending:
        rows = super().__new__(cls, triple)
        rows.tail = tail
        return rows


def tail_of(keys: Any) -> Tail | None:
    """The 16-bit rows that follow a quantized triple, or None."""
    return getattr(keys, "tail", None)


def flush(cache: Any) -> None:
    """Quantize the cache's pending rows into its buffers (upstream's update, one call)."""
    vars(cache)["_views"] = None  # the buffers may change now: no view may pin them
    n = vars(cache).get("_pending", 0)
    if not n:
        return
    cache._pending = 0
    k, v = cache._tail
    cache.offset -= n
    _original["update_and_fetch"](cache, k[..., :n, :], v[..., :n, :])


def update_and_fetch(self, keys: mx.array, values: mx.array):
    """One token: into the 16-bit tail (quantizing it first when full). More tokens (a
    prompt chunk) or an empty cache: upstream's update, after the tail is quantized."""
    if keys.shape[2] != 1 or vars(self).get("keys") is None or vars(self).get("_tail_off"):
        flush(self)
        return _original["update_and_fetch"](self, keys, values)
    n = vars(self).get("_pending", 0)
    if n == TAIL_ROWS:
        flush(self)
        n = 0
    tail = vars(self).get("_tail")
    if tail is None or tail[0].shape[:2] != keys.shape[:2] or tail[0].dtype != keys.dtype:
        shape = (*keys.shape[:2], TAIL_ROWS)
        tail = self._tail = (
            mx.zeros((*shape, keys.shape[3]), keys.dtype),
            mx.zeros((*shape, values.shape[3]), values.dtype),
        )
        _live.add(self)
    tail[0][..., n : n + 1, :] = keys
    tail[1][..., n : n + 1, :] = values
    self._pending = n + 1
    self.offset += 1
    return _fetch(self)


def _fetch(cache: Any) -> tuple[Pending, Pending]:
    n = cache._pending
    ks, vs = _quantized_views(cache, cache.offset - n)
    tail = Tail(*cache._tail, n, weakref.ref(cache))
    return Pending(ks, tail), Pending(vs, tail)


def _quantized_views(cache: Any, rows: int) -> tuple[tuple, tuple]:
    """Views of the first `rows` quantized rows, made once per block of the tail: the
    buffers hold still between flushes (a flush, or new contents, drops them first, so
    they never keep a buffer from being updated in place)."""
    views = vars(cache).get("_views")
    if views is None or views[0] != rows:
        ks, vs = vars(cache)["keys"], vars(cache)["values"]
        if rows != ks[0].shape[2]:
            ks = tuple(x[..., :rows, :] for x in ks)
            vs = tuple(x[..., :rows, :] for x in vs)
        views = cache._views = (rows, ks, vs)
    return views[1], views[2]


def _stored(name: str) -> property:
    """`keys` / `values` as upstream stores them: the pending rows quantized first."""

    def get(self):
        flush(self)
        return vars(self).get(name)

    def set_(self, value):
        vars(self)[name] = value
        vars(self)["_pending"] = 0  # new contents (state loaded, batch extracted): no tail
        vars(self)["_views"] = None

    return property(get, set_, doc=f"The quantized {name}, with no rows pending.")


def trim(self, n: int) -> int:
    flush(self)
    return _original["trim"](self, n)


def nbytes(self) -> int:
    """Upstream's count (quantized buffers) plus the 16-bit tail's buffers."""
    tail = vars(self).get("_tail")
    extra = 0 if tail is None else tail[0].nbytes + tail[1].nbytes
    return _original["nbytes"].fget(self) + extra


def install(patcher: Any) -> None:
    """Patch QuantizedKVCache through a fixes.base.Patcher (undone with it)."""
    from mlx_lm.models.cache import QuantizedKVCache

    _original["update_and_fetch"] = QuantizedKVCache.update_and_fetch
    _original["trim"] = QuantizedKVCache.trim
    patcher.set(QuantizedKVCache, "keys", _stored("keys"))
    patcher.set(QuantizedKVCache, "values", _stored("values"))
    patcher.set(QuantizedKVCache, "update_and_fetch", update_and_fetch)
    patcher.set(QuantizedKVCache, "trim", trim)
    if isinstance(vars(QuantizedKVCache).get("nbytes"), property):
        _original["nbytes"] = vars(QuantizedKVCache)["nbytes"]
        patcher.set(QuantizedKVCache, "nbytes", property(nbytes))
    patcher.defer(flush_all)  # on undo, before the properties go: no tail is lost


def flush_all() -> None:
    """Quantize every live cache's pending rows (before the patch is undone)."""
    for cache in list(_live):
        flush(cache)


def installed() -> bool:
    from mlx_lm.models.cache import QuantizedKVCache

    return isinstance(vars(QuantizedKVCache).get("keys"), property)
