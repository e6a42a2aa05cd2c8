"""Quantized decode steps cost as many cache ops as 16-bit ones, where MLX runs CUDA kernels.

Upstream: `QuantizedKVCache.update_and_fetch` quantizes each new token, 8 ops a layer a
step (2 for the 16-bit cache). On MLX's CUDA backend, which charges every op ~7-10 us of
dispatch, that alone kept 8-bit decode on a Llama-3.1-8B shape at 0.56-0.77x the speed
of 16-bit; with the update as cheap as 16-bit's it ran at 1.07x (H100, same run,
benchmarks/kv_speed.py at 32K).

Here a one-token update puts the key and value rows into a 16-bit tail of TAIL_ROWS
rows, and every TAIL_ROWS tokens the tail is
quantized into the cache's buffers by upstream's own update, in one call: the stored data
is exactly what upstream stores (groups run along the head dimension, so quantizing rows
together or one by one gives the same bytes). HF transformers' `QuantizedCache` keeps
such a residual 16-bit window too (128 tokens).

The row itself is written by the flash kernel that attends to it (`Tail.incoming`,
kernels/launch.py): the update adds no op to the step. On the H200 it then took 8.6 us a
layer to build, against 18.3 for the 16-bit cache's (two slice updates) and 19.5 when
the tail wrote its rows the same way (benchmarks/step_segments.py). Whatever else reads
the tail first writes the row with those two slice updates (`settle`), so a model whose
attention never reaches the kernel still finds every row in the buffers.

The tail travels with the quantized rows: `update_and_fetch` returns `Pending` triples
(the quantized rows' views) whose `tail` holds the 16-bit rows, and attention
(`fixes.quantized_attention`) reads both, so Gemma 4's KV-shared layers, which get the
triples without the cache, see every row; the flash decode kernel reads the tail as one
chunk more (kernels/). Every other reader of the cache (`state`, `keys`, `values`,
`nbytes`, `trim`, batching's merge) goes through the `keys`/`values` properties, which
quantize the pending rows first: they see upstream's layout, whole. So does a copy
(`copy.copy`, `copy.deepcopy`: mlx-lm's prompt cache deep-copies its entries), which
starts without a tail, since two caches writing into one tail would overwrite each
other's rows. The cache meets
attention through two methods this fix adds to QuantizedKVCache: `stored_buffers()` (the
quantized buffers as stored, no row flushed) and `decline_tail()` (back to upstream's
per-token update, for shapes the kernel declines).

The batched quantized cache (caches/batch_quantized.py, continuous batching) keeps the
same tail: a batch step writes one row a request and the batch's mask keeps left padding
out, as for 16 bits. So does the quantized ring (sliding-window layers, --max-kv-size),
once it is full: its pending tokens are counted where the ring's own update counts them,
and the ring rows they will replace carry -inf in a mask handed to attention with the
tail (one array per step, shared by every ring layer). Both store their pending rows
with `store_tail_rows`, into exactly the rows per-token updates would have written.

Installed only where the flash kernel runs (`kernels.available`, probed) and this
project's quantized attention reads tails; elsewhere a tail would cost a dequantization
a step. No patch file: the series carries no CUDA kernels (an upstream PR would come
with them).
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any, NamedTuple

import mlx.core as mx

from .. import kernels
from ..caches import kv_format
from ..caches.batch_quantized import BatchQuantizedKVCache
from ..caches.quantized_rotating import QuantizedRotatingKVCache, last_writes
from . import quantized_attention
from .base import Fix, Patcher

TAIL_ROWS = 64  # 16-bit rows a cache holds before quantizing them (8 ops per 64 steps)


class Tail(NamedTuple):
    """The 16-bit rows after a cache's quantized ones: the first `rows` rows of the
    cache's tail buffers (B, H, TAIL_ROWS, D). The flash kernel reads the buffers as they
    are, so a decode step adds no slice op to the graph; `keys` and `values` slice them."""

    key_buffer: mx.array
    value_buffer: mx.array
    rows: int
    owner: Any  # a weak reference to the cache
    mask: Any = None  # a ring's: additive (1, ring + rows), -inf on the rows the tail replaces
    memo: dict | None = None  # what attention made once for these quantized views (a decoder)
    incoming: tuple | None = None  # this step's (keys, values), the last of `rows`, maybe not written yet
    writes: kernels.TailWrites | None = None  # the cache's record of rows in flight

    @property
    def keys(self) -> mx.array:
        return self._rows(self.key_buffer, 0)

    @property
    def values(self) -> mx.array:
        return self._rows(self.value_buffer, 1)

    def _rows(self, buffer: mx.array, which: int) -> mx.array:
        """The tail's rows of one buffer, the incoming row read where it is (written or
        not), the others after the launch that last wrote one."""
        if self.incoming is None:
            return buffer[..., : self.rows, :]
        kernel = None if self.writes is None else self.writes.kernel
        if kernel is not None:
            (buffer,) = mx.depends([buffer], [kernel])
        new = self.incoming[which]
        return mx.concatenate([buffer[..., : self.rows - 1, :], new.astype(buffer.dtype)], axis=-2)

    def decline(self) -> None:
        """Attention cannot read this tail fast (no flash kernel for the shape): the cache
        goes back to quantizing every token, from its next update on."""
        cache = self.owner()
        if cache is not None:
            cache.decline_tail()


class Pending(tuple):
    """A quantized (data, scales, biases) triple of views and the rows after them."""

    tail: Tail
    rotate: str | None

    def __new__(cls, triple, tail: Tail, rotate: str | None = None) -> Pending:
        rows = super().__new__(cls, triple)
        rows.tail, rows.rotate = tail, rotate
        return rows


def tail_of(keys: Any) -> Tail | None:
    """The 16-bit rows that follow a quantized triple, or None."""
    return getattr(keys, "tail", None)


def settle(cache: Any) -> None:
    """Every pending row in the tail's buffers, for a reader other than the flash kernel:
    ordered after the launch that last wrote one, and the incoming row written by two
    slice updates where no launch took it."""
    writes = vars(cache).get("_writes")
    if writes is None:
        return
    if writes.kernel is not None:
        cache._tail = tuple(mx.depends(list(cache._tail), [writes.kernel]))
        writes.kernel = None
    if writes.row is not None:
        n, (keys, values) = cache._pending - 1, writes.row
        writes.row = None
        cache._tail[0][..., n : n + 1, :] = keys
        cache._tail[1][..., n : n + 1, :] = values


def flush(cache: Any) -> None:
    """Quantize the cache's pending rows into its buffers (upstream's update, one call;
    a batch cache's `store_tail_rows`)."""
    vars(cache)["_views"] = None  # the buffers may change now: no view may pin them
    n = vars(cache).get("_pending", 0)
    if not n:
        return
    settle(cache)
    cache._pending = 0
    k, v = cache._tail
    rows = k[..., :n, :], v[..., :n, :]
    if hasattr(cache, "store_tail_rows"):  # the batch cache, the quantized ring
        cache.store_tail_rows(*rows)
        return
    if _store_in_place(cache, *rows):
        return
    cache.offset -= n
    if kv_format.rotation(cache) is not None:  # the tail holds rows rotated already
        cache.store_rows(*rows)
    else:
        _upstream("update_and_fetch")(cache, *rows)


def _store_in_place(cache: Any, keys: mx.array, values: mx.array) -> bool:
    """The pending rows quantized into buffers that have room for them (three flushes
    in four), written as upstream's update writes them; False where the buffers must grow
    first. A flush runs in every layer on the same step: upstream's update also reads
    the buffers through the `keys`/`values` properties a dozen times and makes views
    of all six that the flush discards, which doubled a flush's host time
    (benchmarks/tail_flush.py)."""
    stored_keys, stored_values = vars(cache)["keys"], vars(cache)["values"]
    end = cache.offset
    if end > stored_keys[0].shape[-2]:
        return False
    start = end - keys.shape[2]
    quantized_keys, quantized_values = kv_format.quantize_kv(cache, keys, values, rotated=True)
    pairs = zip((*stored_keys, *stored_values), (*quantized_keys, *quantized_values), strict=True)
    for buffer, rows in pairs:
        buffer[..., start:end, :] = rows
    return True


def update_and_fetch(self, keys: mx.array, values: mx.array):
    """One token: into the 16-bit tail (quantizing it first when full). More tokens (a
    prompt chunk) or an empty cache: upstream's update, after the tail is quantized."""
    if not _takes_row(self, keys):
        flush(self)
        return _upstream("update_and_fetch")(self, keys, values)
    _tail_row(self, keys, values)
    self.offset += 1
    return _fetch(self, self.offset)


def batch_update_and_fetch(self, keys: mx.array, values: mx.array):
    """BatchQuantizedKVCache's update with the same tail: a decode step of the whole batch
    writes one row a request (the batch's mask keeps left padding out, as for 16 bits)."""
    if not _takes_row(self, keys):
        flush(self)
        return FIX.original(BatchQuantizedKVCache, "update_and_fetch")(self, keys, values)
    _tail_row(self, keys, values)
    self.offset = self.offset + 1
    self._idx += 1
    return _fetch(self, self._idx)


def ring_update_and_fetch(self, keys: mx.array, values: mx.array):
    """QuantizedRotatingKVCache's update with the same tail, once the ring is full: a
    step counts its token in `offset` and `_idx` as the ring's own update does, and the
    ring rows its pending tokens will replace are masked out until they do."""
    if not (_takes_row(self, keys) and _ring_steady(self)):
        flush(self)
        return FIX.original(QuantizedRotatingKVCache, "update_and_fetch")(self, keys, values)
    _tail_row(self, keys, values)
    if self._idx == self.max_size:
        self._idx = self.keep
    self._idx += 1
    self.offset += 1
    n, writes = self._pending, self._writes
    mask = _stale_mask(self.max_size, self.keep, self._idx, n)
    tail = Tail(*self._tail, n, weakref.ref(self), mask, None, writes.row, writes)
    rotate = kv_format.rotation(self)
    ring_k, ring_v = tuple(vars(self)["keys"]), tuple(vars(self)["values"])
    return Pending(ring_k, tail, rotate), Pending(ring_v, tail, rotate)


def _ring_steady(cache: Any) -> bool:
    """A full ring of exactly max_size rows, with room for a tail that never laps itself
    (before that, it grows and trims as upstream's does)."""
    keys = vars(cache).get("keys")
    return (
        keys is not None
        and keys[0].shape[2] == cache.max_size
        and cache.offset >= cache.max_size
        and cache.max_size - cache.keep >= 2 * TAIL_ROWS
    )


@functools.lru_cache(maxsize=1024)
def _stale_mask(size: int, keep: int, idx: int, n: int) -> mx.array:
    """Additive float32 (1, size + n): -inf on the ring rows the last n writes (ending
    before `idx`, wrapping to `keep`) will replace, 0 on the rest and on the tail. One
    array for every ring layer of a step, and for each step after a lap."""
    row = [0.0] * (size + n)
    start, first = last_writes(size, keep, idx, n)
    for p in (*range(start, start + first), *range(keep, keep + n - first)):
        row[p] = -float("inf")
    return mx.array([row], mx.float32)


def _takes_row(cache: Any, keys: mx.array) -> bool:
    """One token onto quantized rows, with the tail not handed back."""
    return keys.shape[2] == 1 and vars(cache).get("keys") is not None and not vars(cache).get("_tail_off")


def _tail_row(cache: Any, keys: mx.array, values: mx.array) -> None:
    """The token's key and value rows onto the tail (quantizing it first when full), as
    its incoming row: the flash launch that reads it writes it (`settle` otherwise)."""
    n = vars(cache).get("_pending", 0)
    if n == TAIL_ROWS:
        flush(cache)
        n = 0
    tail = vars(cache).get("_tail")
    if tail is None or tail[0].shape[:2] != keys.shape[:2] or tail[0].dtype != keys.dtype:
        shape = (*keys.shape[:2], TAIL_ROWS)
        cache._tail = (
            mx.zeros((*shape, keys.shape[3]), keys.dtype),
            mx.zeros((*shape, values.shape[3]), values.dtype),
        )
        cache._writes = kernels.TailWrites()
        FIX.state.setdefault("live", weakref.WeakSet()).add(cache)
    if cache._writes.row is not None:  # no launch took the last one
        settle(cache)
    cache._writes.row = kv_format.rotate_in(cache, keys, values)  # as the quantized rows are
    cache._pending = n + 1


def _fetch(cache: Any, rows: int) -> tuple[Pending, Pending]:
    """Views of the quantized rows (all `rows` but the pending ones) and the tail."""
    n, writes = cache._pending, cache._writes
    ks, vs, memo = _quantized_views(cache, rows - n)
    tail = Tail(*cache._tail, n, weakref.ref(cache), None, memo, writes.row, writes)
    rotate = kv_format.rotation(cache)
    return Pending(ks, tail, rotate), Pending(vs, tail, rotate)


def _quantized_views(cache: Any, rows: int) -> tuple[tuple, tuple, dict]:
    """Views of the first `rows` quantized rows, made once per block of the tail: the
    buffers hold still between flushes (a flush, or new contents, drops them first, so
    they never keep a buffer from being updated in place). With them, a dict that lives
    as long as they do, for what attention derives from them once (its kernel launch)."""
    views = vars(cache).get("_views")
    if views is None or views[0] != rows:
        ks, vs = vars(cache)["keys"], vars(cache)["values"]
        if rows != ks[0].shape[2]:
            ks = tuple(x[..., :rows, :] for x in ks)
            vs = tuple(x[..., :rows, :] for x in vs)
        views = cache._views = (rows, ks, vs, {})
    return views[1], views[2], views[3]


def _stored(name: str) -> property:
    """`keys` / `values` as upstream stores them: the pending rows quantized first."""

    def get(self):
        flush(self)
        return vars(self).get(name)

    def set_(self, value):
        vars(self)[name] = value
        vars(self)["_pending"] = 0  # new contents (state loaded, batch extracted): no tail
        vars(self)["_views"] = None
        if vars(self).get("_writes") is not None:
            vars(self)["_writes"] = kernels.TailWrites()  # no pending row left to write

    return property(get, set_, doc=f"The quantized {name}, with no rows pending.")


def trim(self, n: int) -> int:
    flush(self)
    return FIX.original(_patched_class(self), "trim")(self, n)


def _patched_class(cache: Any) -> type:
    from mlx_lm.models.cache import QuantizedKVCache

    for cls in (BatchQuantizedKVCache, QuantizedRotatingKVCache):
        if isinstance(cache, cls):
            return cls
    return QuantizedKVCache


def nbytes(self) -> int:
    """The class's own count (quantized buffers, no row flushed) plus the 16-bit tail's
    buffers."""
    tail = vars(self).get("_tail")
    extra = 0 if tail is None else tail[0].nbytes + tail[1].nbytes
    if isinstance(self, (BatchQuantizedKVCache, QuantizedRotatingKVCache)):
        stored = [x for x in stored_buffers(self) if x is not None]
        return sum(a.nbytes for triple in stored for a in triple) + extra
    return _upstream("nbytes").fget(self) + extra


def stored_buffers(self) -> tuple[Any, Any]:
    """The quantized (keys, values) buffers as stored: whole, with no pending row flushed."""
    return vars(self).get("keys"), vars(self).get("values")


def decline_tail(self) -> None:
    """Quantize every token from the next update on, as upstream does (see Tail.decline)."""
    vars(self)["_tail_off"] = True


TAIL_STATE = ("_tail", "_views", "_pending", "_tail_off", "_writes")  # what a cache holds for its tail


def leave_tail(copied: Any) -> None:
    """A shallow copy of a flushed cache keeps none of the tail's state (its rows, the
    views over shared buffers, the count, a declined tail): it starts without one."""
    for name in TAIL_STATE:
        vars(copied).pop(name, None)


def copy_cache(self) -> Any:
    """copy.copy of a cache: its pending rows quantized first, and no tail in the copy.
    The flash launch writes rows into the tail's buffers in place, and MLX's copies
    share an array's buffer, so two caches must never hold the same tail (mlx-lm's
    prompt cache hands out deep copies of its entries; a copy decodes into a tail of its
    own)."""
    return _copied(self, dict)


def deepcopy_cache(self, memo: dict) -> Any:
    """copy.deepcopy of a cache, as `copy_cache` (the rest deep-copied with `memo`)."""
    return _copied(self, lambda state: copy.deepcopy(state, memo), memo)


def _copied(cache: Any, copy_state: Any, memo: dict | None = None) -> Any:
    flush(cache)
    out = type(cache).__new__(type(cache))
    if memo is not None:
        memo[id(cache)] = out
    vars(out).update(copy_state({k: v for k, v in vars(cache).items() if k not in TAIL_STATE}))
    return out


def flush_all() -> None:
    """Quantize every live cache's pending rows (before the patch is undone)."""
    for cache in list(FIX.state.get("live", ())):
        flush(cache)


def installed() -> bool:
    from mlx_lm.models.cache import QuantizedKVCache

    return isinstance(vars(QuantizedKVCache).get("keys"), property)


def _upstream(name: str) -> Any:
    """QuantizedKVCache's own method (or property) that this fix replaced."""
    from mlx_lm.models.cache import QuantizedKVCache

    return FIX.original(QuantizedKVCache, name)


class QuantizedDecodeTail(Fix):
    name = "quantized-decode-tail"
    summary = "quantized cache: decode tokens kept at 16 bits, quantized 64 at a time (CUDA)"

    def needed(self) -> bool:
        from mlx_lm.models import base

        return (
            not installed()
            and base.scaled_dot_product_attention is quantized_attention.scaled_dot_product_attention
            and kernels.available()
        )

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models.cache import QuantizedKVCache

        classes = (
            (QuantizedKVCache, update_and_fetch),
            (BatchQuantizedKVCache, batch_update_and_fetch),
            (QuantizedRotatingKVCache, ring_update_and_fetch),
        )
        for cls, update in classes:
            patcher.set(cls, "keys", _stored("keys"))
            patcher.set(cls, "values", _stored("values"))
            patcher.set(cls, "update_and_fetch", update)
            patcher.set(cls, "trim", trim)
            patcher.set(cls, "stored_buffers", stored_buffers)
            patcher.set(cls, "decline_tail", decline_tail)
            patcher.set(cls, "__copy__", copy_cache)
            patcher.set(cls, "__deepcopy__", deepcopy_cache)
        if isinstance(vars(QuantizedKVCache).get("nbytes"), property):
            patcher.set(QuantizedKVCache, "nbytes", property(nbytes))
        patcher.set(BatchQuantizedKVCache, "nbytes", property(nbytes))
        patcher.set(QuantizedRotatingKVCache, "nbytes", property(nbytes))
        patcher.defer(flush_all)  # on undo, before the properties go: no tail is lost


FIX = QuantizedDecodeTail()
