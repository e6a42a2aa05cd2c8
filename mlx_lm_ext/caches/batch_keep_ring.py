"""A batch of `RotatingKVCache(max_size, keep)` rings in one buffer, `keep` honoured.

Upstream's BatchRotatingKVCache has no `keep`: a row's first tokens sit after its left
padding, at columns that differ from row to row, and rotation writes one column for
every row starting at 0. Here every row is laid out as

    [its first `keep` tokens][its padding][the rest, oldest first]

so one write pointer serves every row over [keep, max_size): a padded row overwrites
its padding first (it is still growing, as its own ring would be) and a full row its
oldest token after the kept ones, exactly what `RotatingKVCache(max_size, keep)` evicts.
Which columns hold a row's tokens is a boolean (batch, columns) array set by each
write; the host knows the same from token counts alone (no device sync).

Scope: prompt chunks must fit the ring (offset + chunk <= max_size): the server refuses
longer prompts under --max-kv-size by default, and a ring's chunk trim with `keep`
differs per row. A row whose tokens are fewer than `keep` when the batch forms keeps
only those: its next ones land in the ring (not yet exact; 1-3 token prompts).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, _BaseCache, dynamic_roll

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
        self.keys = self.values = self.valid = None  # (B, H, cap, D) x2, (B, cap)
        self._count = [0] * batch  # tokens each row has seen: its ring's offset
        self._hole = [(keep, keep)] * batch  # a row's padding columns, [lo, hi)
        self._width = 0  # columns written so far (at most max_size)
        self._idx = 0  # the next column the pointer writes once the ring is full
        self._wrapped = False
        self._remaining: list[int] | None = None  # prompt tokens left a row (prepare)
        self._junk = [0] * batch  # right-padding columns a prompt chunk left a row

    # -- what models read ------------------------------------------------------------
    @property
    def offset(self) -> mx.array:
        return mx.array(self._count)

    def size(self) -> int:
        return self._width

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    @property
    def state(self):
        return self.keys, self.values, self.valid

    def is_trimmable(self) -> bool:
        return False

    def make_mask(self, N: int, window_size: int | None = None, return_array: bool = False) -> mx.array:
        """Which columns each query sees after this update: the row's tokens, and in a
        prompt chunk the chunk's own columns up to the query (causal)."""
        if N == 1:
            col, width = self._next_column()
            seen = self._valid_columns(width)
            return (seen | (mx.arange(width) == col))[:, None, None, :]
        width = self._width + N
        seen = self._valid_columns(self._width)[:, None, :]
        chunk = mx.arange(N)[:, None] >= mx.arange(N)[None]
        seen = mx.broadcast_to(seen, (seen.shape[0], N, self._width))
        chunk = mx.broadcast_to(chunk, (seen.shape[0], N, N))
        return mx.concatenate([seen, chunk], axis=-1).reshape(-1, 1, N, width)

    def _valid_columns(self, width: int) -> mx.array:
        batch = len(self._count)
        if self.valid is None:
            return mx.zeros((batch, width), mx.bool_)
        have = min(width, self.valid.shape[1])
        cols = self.valid[:, :have]
        return mx.pad(cols, [(0, 0), (0, width - have)]) if have < width else cols

    # -- writes ----------------------------------------------------------------------
    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[2] == 1:
            return self._update_in_place(keys, values)
        return self._update_concat(keys, values)

    def _next_column(self) -> tuple[int, int]:
        """(column this decode step writes, width after it)."""
        if self._width < self.max_size:
            return self._width, self._width + 1
        idx = self.keep if self._idx >= self.max_size else self._idx
        return idx, self._width

    def _update_in_place(self, keys: mx.array, values: mx.array):
        col, width = self._next_column()
        keys, values = self._incoming(keys, values)
        self._ensure(keys, values, width)
        _put(self.keys, col, keys)
        _put(self.values, col, values)
        self.valid[:, col] = True
        if self._width >= self.max_size:
            self._wrapped = True
            self._hole = [(max(lo, col + 1), hi) if lo <= col < hi else (lo, hi) for lo, hi in self._hole]
        self._width = width
        self._idx = col + 1
        self._count = [c + 1 for c in self._count]
        return self._fetch(width)

    def _update_concat(self, keys: mx.array, values: mx.array):
        n = keys.shape[2]
        if self._width + n > self.max_size or self._wrapped:
            raise NotImplementedError(
                f"a prompt chunk past the ring ({self._width} + {n} > {self.max_size} tokens) "
                "is not batched with keep; serve it alone"
            )
        if self._remaining is None:
            real = [n] * len(self._count)
        else:
            real = [max(0, min(n, r)) for r in self._remaining]
            self._remaining = [r - k for r, k in zip(self._remaining, real, strict=True)]
        keys, values = self._incoming(keys, values)
        self._ensure(keys, values, self._width + n)
        _put(self.keys, self._width, keys)
        _put(self.values, self._width, values)
        self.valid[:, self._width : self._width + n] = mx.arange(n)[None] < mx.array(real)[:, None]
        self._junk = [j + n - k for j, k in zip(self._junk, real, strict=True)]
        self._count = [c + k for c, k in zip(self._count, real, strict=True)]
        self._width += n
        self._idx = self._width
        return self._fetch(self._width)

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

    def _ensure(self, keys: mx.array, values: mx.array, width: int) -> None:
        """Room for `width` columns, grown in steps of `step` up to max_size."""
        cap = 0 if self.keys is None else _length(self.keys)
        if width <= cap:
            return
        new = min(max(width, cap + self.step), max(self.max_size, width)) - cap
        k, v = self._zeros(keys, new), self._zeros(values, new)
        flags = mx.zeros((_each_first(keys).shape[0], new), mx.bool_)
        if self.keys is None:
            self.keys, self.values, self.valid = k, v, flags
            return
        cat = lambda a, b: mx.concatenate([a, b], axis=2)  # noqa: E731
        self.keys, self.values = _each2(cat, self.keys, k), _each2(cat, self.values, v)
        self.valid = mx.concatenate([self.valid, flags], axis=1)

    # -- a prompt batch's right padding -----------------------------------------------
    def prepare(self, *, left_padding=None, lengths=None, right_padding=None) -> None:
        if left_padding is not None and any(left_padding):
            raise ValueError("BatchKeepRotatingKVCache takes right-padded prompts (prepare(lengths=...))")
        if right_padding is not None and max(right_padding) > 0:
            self._remaining = list(lengths)

    def finalize(self) -> None:
        """Move each row's right padding to its padding columns after the keep block."""
        self._remaining = None
        if not any(self._junk) or self.keys is None:
            return
        head = min(self.keep, self._width)
        junk = [min(j, self._width - head) for j in self._junk]  # a short row's keep block holds some
        shifts = mx.array(junk)

        def roll(x):
            region = dynamic_roll(x[..., head : self._width, :], shifts[:, None], axis=2)
            return mx.concatenate([x[..., :head, :], region], axis=2)

        self.keys, self.values = _each(roll, self.keys), _each(roll, self.values)
        flags = dynamic_roll(self.valid[:, head : self._width], shifts, axis=1)
        self.valid = mx.concatenate([self.valid[:, :head], flags], axis=1)
        self._hole = [(lo, hi + j) for (lo, hi), j in zip(self._hole, junk, strict=True)]
        self._junk = [0] * len(self._junk)

    # -- batch membership ------------------------------------------------------------
    def _row_columns(self, r: int) -> list[int]:
        """Row r's token columns, oldest first."""
        head = [c for c in range(min(self.keep, self._width)) if c < self._count[r]]
        lo, hi = self._hole[r]
        if self._wrapped:
            ring = [*range(self._idx, self._width), *range(self.keep, self._idx)]
        else:
            ring = list(range(self.keep, self._width))
        return head + [c for c in ring if not lo <= c < hi]

    def extract(self, idx: int) -> RotatingKVCache:
        """Row idx as the RotatingKVCache(max_size, keep) it would be alone, in
        temporal order (its next write evicts its oldest token after the kept ones)."""
        cache = self._alone()
        cols = self._row_columns(idx)
        if self.keys is not None and cols:
            order = mx.array(cols)

            def take(x):
                return mx.contiguous(x[idx : idx + 1][..., order, :])

            cache.keys, cache.values = _each(take, self.keys), _each(take, self.values)
            cache._idx = len(cols)
        cache.offset = self._count[idx]
        return cache

    def filter(self, batch_indices) -> None:
        rows = [
            int(i) for i in (batch_indices.tolist() if isinstance(batch_indices, mx.array) else batch_indices)
        ]
        if self.keys is not None:
            index = mx.array(rows)
            self.keys = _each(lambda x: x[index], self.keys)
            self.values = _each(lambda x: x[index], self.values)
            self.valid = self.valid[index]
        for name in ("_count", "_hole", "_junk"):
            setattr(self, name, [getattr(self, name)[i] for i in rows])

    def extend(self, other: BatchKeepRotatingKVCache) -> None:
        """Both batches' rows, laid out anew (a join: once per prompt batch)."""
        rows = [self.extract(i) for i in range(len(self._count))]
        rows += [other.extract(i) for i in range(len(other._count))]
        vars(self).update(vars(type(self).merge(rows)))

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchKeepRotatingKVCache:
        """Sequential rings (same max_size and keep) as one batch, each row laid out
        [keep][padding][rest, oldest first]."""
        first = caches[0]
        if any(c.max_size != first.max_size or c.keep != first.keep for c in caches):
            raise ValueError("BatchKeepRotatingKVCache merges rings of one max_size and keep")
        out = cls._empty(caches)
        ordered = [None if c.keys is None else _temporal(c) for c in out._members(caches)]
        lengths = [0 if o is None else _length(o[0]) for o in ordered]
        width = max(lengths)
        out._count = [int(c.offset) for c in caches]
        if width == 0:
            return out
        if width > first.max_size:
            raise NotImplementedError("a ring holding more than max_size tokens is not batched with keep")
        k, v = next(o for o in ordered if o is not None)
        B = len(caches)
        out.keys = _each(lambda x: mx.zeros((B, *x.shape[1:2], width, x.shape[3]), x.dtype), k)
        out.values = _each(lambda x: mx.zeros((B, *x.shape[1:2], width, x.shape[3]), x.dtype), v)
        out.valid = mx.zeros((B, width), mx.bool_)
        for r, (o, n) in enumerate(zip(ordered, lengths, strict=True)):
            if o is None:
                continue
            head = min(first.keep, n)
            pad = width - n
            for dst, src in zip((out.keys, out.values), o, strict=True):
                for d, x in zip(*((dst, src) if isinstance(dst, tuple) else ((dst,), (src,))), strict=True):
                    d[r : r + 1, :, :head] = x[..., :head, :]
                    d[r : r + 1, :, head + pad : width] = x[..., head:, :]
            out.valid[r, :head] = True
            out.valid[r, head + pad : width] = True
            out._hole[r] = (first.keep, first.keep + pad if head == first.keep else max(first.keep, width))
        out._width = out._idx = width
        return out

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
    for name in ("_count", "_hole", "_width", "_idx", "_wrapped", "_remaining", "_junk"):
        value = getattr(self, name)
        setattr(quant, name, list(value) if isinstance(value, list) else value)
    if self.keys is not None:
        quant.keys, quant.values = quant._incoming(self.keys, self.values)
        quant.valid = self.valid
    return quant


def _each_first(v):
    return v[0] if isinstance(v, tuple) else v


def _temporal(cache: RotatingKVCache) -> tuple[mx.array, mx.array]:
    """A ring's keys and values in temporal order: kept tokens, then oldest to newest."""
    return cache._temporal_order(cache.keys), cache._temporal_order(cache.values)
