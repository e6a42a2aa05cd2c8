"""A batch of `RotatingKVCache(max_size, keep)` rings in one buffer, `keep` honoured.

Upstream's BatchRotatingKVCache has no `keep`: a row's first tokens sit after its left
padding, at columns that differ from row to row, and rotation writes one column for
every row starting at 0. Here every row is laid out as

    [its first `keep` tokens][its padding][the rest, oldest first]

so one write pointer serves every row over [keep, max_size): a padded row overwrites
its padding first (it is still growing, as its own ring would be) and a full row its
oldest token after the kept ones, exactly what `RotatingKVCache(max_size, keep)` evicts.
Which columns hold a row's tokens follows from token counts kept on the host (no device
sync), and the masks from those.

Prompt chunks are appended after the laid-out part and laid out at the first decode
step. A prompt longer than the ring is trimmed as the ring alone trims it: before a
chunk, a row that holds max_size tokens or more keeps its first `keep` and its newest
`max_size - 1 - keep` (every new token then sees max_size tokens), and at the first
decode step its first `keep` and newest `max_size - keep`. The rows are regathered
then (once a chunk, only where some row is past the ring).

One deviation: a row with fewer than `keep` tokens when the batch forms keeps only
those; its next ones land in the ring (1-3 token prompts, where its own ring would
keep them).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, _BaseCache

from .. import layout
from . import kv_format
from .quantized_rotating import QuantizedRotatingKVCache


def _each(fn, v):
    """fn on an array, or on each array of a quantized (data, scales, biases) triple."""
    return tuple(fn(x) for x in v) if isinstance(v, tuple) else fn(v)


def _each2(fn, a, b):
    return tuple(fn(x, y) for x, y in zip(a, b, strict=True)) if isinstance(a, tuple) else fn(a, b)


def _put(dst, start: int, src) -> None:
    """Write src's rows into dst from column `start`, in place."""
    for d, s in zip(*((dst, src) if isinstance(dst, tuple) else ((dst,), (src,))), strict=True):
        d[..., start : start + s.shape[2], :] = s


def _length(v) -> int:
    return (v[0] if isinstance(v, tuple) else v).shape[2]


class BatchKeepRotatingKVCache(_BaseCache):
    step = 256

    def __init__(self, max_size: int, keep: int, batch: int):
        self.max_size, self.keep = max_size, keep
        self.keys = self.values = None  # (B, H, capacity, D), or quantized triples
        self._count = [0] * batch  # tokens each row has seen: its ring's offset
        # The laid-out part: columns [0, head) and [keep, width) outside the hole [lo, hi).
        self._head = [0] * batch
        self._hole = [(keep, keep)] * batch
        self._width = 0
        self._idx = 0  # the next column the pointer writes once the ring is full
        self._wrapped = False
        # Prompt chunks since the last layout: row r's tokens at [first[r], first[r] + prompt[r]).
        self._chunks: tuple[int, int] | None = None  # (start column, columns written)
        self._first = [0] * batch
        self._prompt = [0] * batch
        self._remaining: list[int] | None = None  # prompt tokens left a row (prepare)

    # -- what models read ------------------------------------------------------------
    @property
    def offset(self) -> mx.array:
        return mx.array(self._count)

    def size(self) -> int:
        return max(self._count, default=0)

    @property
    def _offset(self) -> int:
        """The longest row's tokens: what a batch ring's --quantized-kv-start compares."""
        return self.size()

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values

    def is_trimmable(self) -> bool:
        return False

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mx.array:
        """The columns each query sees: the row's tokens, and in a prompt chunk the
        chunk's own columns up to the query. Lays out or trims first, as the update will
        (models make the mask before the first layer's update)."""
        if N == 1:
            self._layout()
            col, width = self._next_column()
            return (self._valid(width) | (mx.arange(width) == col))[:, None, None, :]
        self._trim_for(self._real(N))
        start, written = self._chunks or (self._width, 0)
        width = start + written
        seen = mx.broadcast_to(self._valid(width)[:, None, :], (len(self._count), N, width))
        causal = mx.broadcast_to(mx.arange(N)[:, None] >= mx.arange(N)[None], (len(self._count), N, N))
        mask = mx.concatenate([seen, causal], axis=-1)
        if self._width == 0 and width + N > self.max_size:
            # Rows are contiguous from their first column: a query sees the max_size
            # tokens up to it, as a ring's chunk mask (window_size=max_size) allows.
            mask = mask & (width + mx.arange(N)[:, None] - mx.arange(width + N)[None] < self.max_size)
        return mask[:, None]

    def _valid(self, width: int) -> mx.array:
        """(batch, width) bool: which columns hold each row's tokens."""
        cols = mx.arange(width)[None]
        lo, hi = [h[0] for h in self._hole], [h[1] for h in self._hole]
        head, lo, hi = (mx.array(x)[:, None] for x in (self._head, lo, hi))
        laid = (cols < head) | ((cols >= self.keep) & (cols < self._width) & ~((cols >= lo) & (cols < hi)))
        if self._chunks is None:
            return laid
        first = mx.array(self._first)[:, None]
        return (laid & (cols < self._chunks[0])) | (
            (cols >= first) & (cols < first + mx.array(self._prompt)[:, None])
        )

    # -- writes ----------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[2] == 1:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def _next_column(self) -> tuple[int, int]:
        """(column this decode step writes, width after it)."""
        if self._width < self.max_size:
            return self._width, self._width + 1
        return (self.keep if self._idx >= self.max_size else self._idx), self._width

    def _update_in_place(self, keys: mx.array, values: mx.array):
        self._layout()
        col, width = self._next_column()
        keys, values = self._incoming(keys, values)
        self._ensure(keys, values, width)
        _put(self.keys, col, keys)
        _put(self.values, col, values)
        if self._width >= self.max_size:
            self._wrapped = True
            self._hole = [self._past(col, lo, hi) for lo, hi in self._hole]
        self._width, self._idx = width, col + 1
        self._count = [c + 1 for c in self._count]
        return self._fetch(width)

    def _past(self, col: int, lo: int, hi: int) -> tuple[int, int]:
        """A row's padding once the pointer has written `col` (consumed: none)."""
        if not lo <= col < hi:
            return lo, hi
        return (col + 1, hi) if col + 1 < hi else (self.keep, self.keep)

    def _real(self, n: int) -> list[int]:
        """Each row's tokens in a prompt chunk of n columns (the rest is right padding)."""
        if self._remaining is None:
            return [n] * len(self._count)
        return [max(0, min(n, r)) for r in self._remaining]

    def _update_concat(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        real = self._real(n)
        self._trim_for(real)
        if self._remaining is not None:
            self._remaining = [r - k for r, k in zip(self._remaining, real, strict=True)]
        if self._chunks is None:
            self._chunks, self._first = (self._width, 0), [self._width] * len(self._count)
        start, written = self._chunks
        keys, values = self._incoming(keys, values)
        self._ensure(keys, values, start + written + n)
        _put(self.keys, start + written, keys)
        _put(self.values, start + written, values)
        self._chunks = (start, written + n)
        self._prompt = [p + k for p, k in zip(self._prompt, real, strict=True)]
        self._count = [c + k for c, k in zip(self._count, real, strict=True)]
        return self._fetch(start + written + n)

    # -- layout: [first keep tokens][padding][the rest, oldest first] -------------------
    def _spans(self, r: int) -> list[tuple[int, int]]:
        """Row r's token columns, oldest first, as [start, end) spans."""
        lo, hi = self._hole[r]
        idx = self._idx if self._wrapped else self.keep
        parts = [(0, self._head[r]), (max(idx, hi), self._width), (self.keep, idx)]
        if self._chunks is not None:
            parts.append((self._first[r], self._first[r] + self._prompt[r]))
        return [(a, b) for a, b in parts if b > a]

    def _columns(self, r: int) -> mx.array:
        """Row r's token columns, oldest first."""
        return mx.concatenate([mx.arange(a, b) for a, b in self._spans(r)] or [mx.array([], mx.int32)])

    def _trimmed(self, r: int, limit: int | None) -> mx.array:
        """Row r's token columns, oldest first, trimmed to `limit` as its ring trims:
        the first `keep` and the newest `limit - keep`."""
        cols = self._columns(r)
        n = cols.size
        if limit is None or n <= limit:
            return cols
        return mx.concatenate([cols[: self.keep], cols[n - (limit - self.keep) :]])

    def _regather(self, rows: list[mx.array]) -> int:
        """Each row's listed columns, oldest first, right-aligned to the width gathered
        (returned), so that the next chunk continues every row contiguously."""
        width = max(c.size for c in rows)
        order = mx.stack([mx.concatenate([mx.zeros((width - c.size,), mx.int32), c]) for c in rows])

        def take(x):
            return mx.take_along_axis(x, order[:, None, :, None], axis=2)

        self.keys, self.values = _each(take, self.keys), _each(take, self.values)
        return width

    def _trim_for(self, real: list[int]) -> None:
        """Before a chunk that takes some row past the ring: rows receiving tokens that
        hold max_size or more keep their first `keep` and newest `max_size - 1 - keep`,
        as a ring alone does, and every row's tokens are regathered into one region
        (where the mask's window over columns is each row's window over its tokens)."""
        held = [sum(b - a for a, b in self._spans(r)) for r in range(len(self._count))]  # no arrays
        top = self.max_size
        past = [k and (h >= top or (self._width and h + k > top)) for h, k in zip(held, real, strict=True)]
        if self.keys is None or not any(past):
            return
        rows = [self._trimmed(r, self.max_size - 1 if k else None) for r, k in enumerate(real)]
        width = self._regather(rows)
        B = len(self._count)
        self._head, self._hole, self._width, self._idx = [0] * B, [(self.keep,) * 2] * B, 0, 0
        self._wrapped, self._chunks = False, (0, width)
        self._first, self._prompt = [width - c.size for c in rows], [c.size for c in rows]

    def _layout(self) -> None:
        """Lay prompt chunks' rows out for decoding (once, at the first step after them),
        each trimmed to max_size as its ring's first decode step trims it."""
        if self._chunks is None:
            return
        rows = [self._trimmed(r, self.max_size) for r in range(len(self._count))]
        width = max(c.size for c in rows)
        index, head, hole = [], [], []
        for cols in rows:
            n = cols.size
            h = min(self.keep, n)
            fill = mx.zeros((width - n,), mx.int32)
            index.append(
                mx.concatenate([cols[:h], fill, cols[h:]]) if h == self.keep else mx.concatenate([cols, fill])
            )
            head.append(h)
            hole.append(
                (self.keep, self.keep + width - n) if h == self.keep else (self.keep, max(self.keep, width))
            )
        self._regather(index)
        self._head, self._hole, self._width, self._idx, self._wrapped = head, hole, width, width, False
        self._chunks, self._prompt = None, [0] * len(self._count)

    def _ensure(self, keys, values, width: int) -> None:
        """Room for `width` columns, grown in steps of `step`."""
        cap = 0 if self.keys is None else _length(self.keys)
        if width <= cap:
            return
        new = min(max(width, cap + self.step), max(self.max_size, width)) - cap
        k, v = self._zeros(keys, new), self._zeros(values, new)
        if self.keys is None:
            self.keys, self.values = k, v
            return
        cat = lambda a, b: mx.concatenate([a, b], axis=2)  # noqa: E731
        self.keys, self.values = _each2(cat, self.keys, k), _each2(cat, self.values, v)

    # -- what the storage is: 16-bit rows here, quantized triples in the subclass ----
    def _incoming(self, keys: mx.array, values: mx.array):
        return keys, values

    def _zeros(self, like, n: int):
        B, H, _, D = like.shape
        return mx.zeros((B, H, n, D), like.dtype)

    def _fetch(self, width: int):
        return _each(lambda x: x[..., :width, :], self.keys), _each(lambda x: x[..., :width, :], self.values)

    def _alone(self) -> RotatingKVCache:
        return RotatingKVCache(self.max_size, self.keep)

    # -- a prompt batch's right padding -----------------------------------------------
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None and any(left_padding):
            raise ValueError("BatchKeepRotatingKVCache takes right-padded prompts (prepare(lengths=...))")
        if right_padding is not None and max(right_padding) > 0:
            self._remaining = list(lengths)

    def finalize(self) -> None:
        """Right padding needs no move: the next decode step lays each row out anew."""
        self._remaining = None

    # -- batch membership ------------------------------------------------------------
    def extract(self, idx: int) -> RotatingKVCache:
        """Row idx as the RotatingKVCache(max_size, keep) it would be alone, in
        temporal order (its next write evicts its oldest token after the kept ones)."""
        cache = self._alone()
        cols = self._columns(idx)
        if self.keys is not None and cols.size:

            def take(x):
                return mx.contiguous(x[idx : idx + 1][..., cols, :])

            cache.keys, cache.values = _each(take, self.keys), _each(take, self.values)
            cache._idx = cols.size
        cache.offset = self._count[idx]
        return layout.mark_bounded(cache) if layout.is_bounded(self) else cache

    def filter(self, batch_indices) -> None:
        if isinstance(batch_indices, mx.array):
            batch_indices = batch_indices.tolist()
        rows = [int(i) for i in batch_indices]
        if self.keys is not None:
            index = mx.array(rows)
            self.keys = _each(lambda x: x[index], self.keys)
            self.values = _each(lambda x: x[index], self.values)
        for name in ("_count", "_head", "_hole", "_first", "_prompt"):
            setattr(self, name, [getattr(self, name)[i] for i in rows])
        if self._remaining is not None:
            self._remaining = [self._remaining[i] for i in rows]

    def extend(self, other: BatchKeepRotatingKVCache) -> None:
        """Both batches' rows, laid out anew (a join: once per prompt batch)."""
        rows = [self.extract(i) for i in range(len(self._count))]
        rows += [other.extract(i) for i in range(len(other._count))]
        merged = type(self).merge(rows)
        vars(self).update(vars(merged))

    def to_quantized(self, group_size: int = 64, bits: int = 4, **fmt) -> BatchKeepQuantizedRotatingKVCache:
        return batch_keep_to_quantized(self, group_size, bits, **fmt)

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKeepRotatingKVCache:
        """Sequential rings (one max_size and keep) as one batch, each row laid out
        [keep][padding][rest, oldest first]."""
        first = caches[0]
        if any(c.max_size != first.max_size or c.keep != first.keep for c in caches):
            raise ValueError("BatchKeepRotatingKVCache merges rings of one max_size and keep")
        out = cls._empty(caches)
        members = out._members(caches)
        ordered = [None if c.keys is None else _temporal(c) for c in members]
        lengths = [0 if o is None else _length(o[0]) for o in ordered]
        out._count = [int(c.offset) for c in members]
        width = max(lengths)
        if width:
            k, v = next(o for o in ordered if o is not None)
            B = len(caches)
            out.keys = _each(lambda x: mx.zeros((B, x.shape[1], width, x.shape[3]), x.dtype), k)
            out.values = _each(lambda x: mx.zeros((B, x.shape[1], width, x.shape[3]), x.dtype), v)
        for r, (o, n) in enumerate(zip(ordered, lengths, strict=True)):
            head = min(first.keep, n)
            out._head[r] = head
            out._hole[r] = (
                first.keep,
                first.keep + width - n if head == first.keep else max(first.keep, width),
            )
            if o is None:
                continue
            for dst, src in zip((out.keys, out.values), o, strict=True):
                for d, x in zip(*((dst, src) if isinstance(dst, tuple) else ((dst,), (src,))), strict=True):
                    d[r : r + 1, :, :head] = x[..., :head, :]
                    d[r : r + 1, :, width - (n - head) : width] = x[..., head:, :]
        out._width = out._idx = width
        return layout.mark_bounded(out) if all(map(layout.is_bounded, caches)) else out

    @classmethod
    def _empty(cls, caches: list[Any]) -> BatchKeepRotatingKVCache:
        return cls(caches[0].max_size, caches[0].keep, len(caches))

    def _members(self, caches: list[Any]) -> list[Any]:
        """The rings to lay out: as given (16-bit)."""
        return caches


class BatchKeepQuantizedRotatingKVCache(BatchKeepRotatingKVCache):
    """The same batch of rings holding affine-quantized `(data, scales, biases)` rows in
    caches/kv_format.py's format: each row as `QuantizedRotatingKVCache(max_size, keep)`."""

    def __init__(
        self,
        max_size: int,
        keep: int,
        batch: int,
        group_size: int = 64,
        bits: int = 8,
        value_bits: int | None = None,
        rotate: str | None = None,
    ):
        super().__init__(max_size, keep, batch)
        kv_format.set_format(self, group_size, bits, value_bits, rotate)

    def _incoming(self, keys: mx.array, values: mx.array):
        return kv_format.quantize_kv(self, keys, values)

    def _zeros(self, like, n: int):
        data, scales, _ = like
        B, H = data.shape[:2]
        return (
            mx.zeros((B, H, n, data.shape[3]), data.dtype),
            mx.zeros((B, H, n, scales.shape[3]), scales.dtype),
            mx.zeros((B, H, n, scales.shape[3]), scales.dtype),
        )

    def _fetch(self, width: int):
        return kv_format.tagged(self, super()._fetch(width))

    def _alone(self) -> QuantizedRotatingKVCache:
        return QuantizedRotatingKVCache(self.max_size, self.keep, *kv_format.fmt(self))

    @classmethod
    def _empty(cls, caches: list[Any]) -> BatchKeepQuantizedRotatingKVCache:
        from .batch_quantized import _as_quantized

        _, fmt = _as_quantized(caches)
        return cls(caches[0].max_size, caches[0].keep, len(caches), *fmt)

    def _members(self, caches: list[Any]) -> list[Any]:
        """The rings to lay out, those still at 16 bits quantized in this format."""
        from .batch_quantized import _as_quantized

        return _as_quantized(caches)[0]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(x.nbytes for x in (*self.keys, *self.values))


def batch_keep_to_quantized(
    self: BatchKeepRotatingKVCache,
    group_size: int = 64,
    bits: int = 4,
    value_bits: int | None = None,
    rotate: str | None = None,
) -> BatchKeepQuantizedRotatingKVCache:
    """The same rows and bookkeeping, quantized (a batch crossing --quantized-kv-start)."""
    quant = BatchKeepQuantizedRotatingKVCache(
        self.max_size, self.keep, len(self._count), group_size, bits, value_bits, rotate
    )
    for name in (
        "_count",
        "_head",
        "_hole",
        "_width",
        "_idx",
        "_wrapped",
        "_chunks",
        "_first",
        "_prompt",
        "_remaining",
    ):
        value = getattr(self, name)
        setattr(quant, name, list(value) if isinstance(value, list) else value)
    if self.keys is not None:
        quant.keys, quant.values = quant._incoming(self.keys, self.values)
    return layout.mark_bounded(quant) if layout.is_bounded(self) else quant


def _temporal(cache: RotatingKVCache) -> tuple[Any, Any]:
    """A ring's keys and values in temporal order: kept tokens, then oldest to newest;
    at most max_size of them (after a prompt chunk a ring holds up to max_size - 1 + the
    chunk, of which its next step keeps the first `keep` and the newest)."""

    def ordered(v):
        v = cache._temporal_order(v)
        n, top = _length(v), cache.max_size
        if n <= top:
            return v
        return _each(
            lambda x: mx.concatenate([x[..., : cache.keep, :], x[..., n - (top - cache.keep) :, :]], 2), v
        )

    return ordered(cache.keys), ordered(cache.values)
