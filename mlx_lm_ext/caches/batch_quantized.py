"""Batched quantized KV caches: BatchKVCache and BatchRotatingKVCache on quantized triples.

Upstream's continuous batching (BatchGenerator) keeps every cache at 16 bits, and the
server turns batching off when `--kv-bits` is set. These classes are the quantized
counterparts of the two batch caches, with the same bookkeeping (left padding, the
right-padding roll of `prepare`/`finalize`, the ring of the rotating cache) inherited
from upstream's classes; only what touches the arrays is rewritten, applied to each of
the `(data, scales, biases)` arrays. Quantization groups run along the head dim, so every
operation on token rows (slice, roll, pad, index) commutes with quantization: a batched
quantized cache holds exactly the rows its 16-bit counterpart would, quantized.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_reduce
from mlx_lm.models.cache import (
    BatchKVCache,
    BatchRotatingKVCache,
    QuantizedKVCache,
    dynamic_roll,
)

from . import kv_format
from .quantized_rotating import QuantizedRotatingKVCache

Triple = tuple[mx.array, mx.array, mx.array]


def _map(fn, v: Triple) -> Triple:
    return tuple(fn(x) for x in v)


def _cat(a: Triple, b: Triple, axis: int = 2) -> Triple:
    return tuple(mx.concatenate([x, y], axis=axis) for x, y in zip(a, b, strict=True))


def _rows(v: Triple, start: int | None = None, stop: int | None = None) -> Triple:
    return _map(lambda x: x[..., start:stop, :], v)


def _roll(v: Triple, shifts: mx.array) -> Triple:
    """Roll each batch row by its own shift (upstream's dynamic_roll)."""
    return _map(lambda x: dynamic_roll(x, shifts[:, None], axis=2), v)


def _pad_rows(v: Triple, left: int, right: int) -> Triple:
    if left == 0 and right == 0:
        return v
    return _map(lambda x: mx.pad(x, [(0, 0), (0, 0), (left, right), (0, 0)]), v)


def _empty_like(v: Triple, batch: int) -> Triple:
    return _map(lambda x: mx.zeros((batch, x.shape[1], 0, x.shape[3]), x.dtype), v)


def _with_dependencies(v: Triple, *deps: mx.array) -> Triple:
    """As upstream: evaluating the keys also evaluates offset and left_padding."""
    if not hasattr(mx, "depends"):
        return v
    return (mx.depends(v[0], deps), *v[1:])


def _nbytes(*trees: Any) -> int:
    return tree_reduce(lambda a, x: a + x.nbytes, [t for t in trees if t is not None], 0)


def is_quantized(cache: Any) -> bool:
    return getattr(cache, "bits", None) is not None


def _as_quantized(caches: list[Any]) -> tuple[list[Any], tuple]:
    """A merge's members all quantized with the one format of its quantized members:
    (caches, (group_size, bits, value_bits, rotate))."""
    params = {kv_format.fmt(c) for c in caches if is_quantized(c)}
    if len(params) != 1:
        raise ValueError(f"cannot batch caches quantized with different settings: {sorted(params, key=str)}")
    template = next(c for c in caches if is_quantized(c))
    converted = [c if is_quantized(c) else _quantized_like(c, template) for c in caches]
    return converted, params.pop()


def _quantized_like(cache: Any, template: Any) -> Any:
    """`cache` quantized in `template`'s format."""
    return cache.to_quantized(group_size=template.group_size, bits=template.bits, **kv_format.extra(template))


def _merged_rows(caches: list[Any], lengths: list[int], ordered) -> tuple[Triple, Triple]:
    """Keys and values of per-request caches stacked right-justified in (B, H, max, .)
    buffers of zeros; `ordered(cache, triple)` gives a cache's rows in temporal order."""
    length = max(lengths)
    merged = []
    for name in ("keys", "values"):
        rows = [(ordered(c, getattr(c, name)), n) for c, n in zip(caches, lengths, strict=True) if n]
        template = rows[0][0]
        out = tuple(mx.zeros((len(caches), x.shape[1], length, x.shape[3]), x.dtype) for x in template)
        filled = (i for i, n in enumerate(lengths) if n)
        for i, (r, n) in zip(filled, rows, strict=True):
            for dst, src in zip(out, r, strict=True):
                dst[i : i + 1, :, length - n :] = src[..., -n:, :]
        merged.append(out)
    return merged[0], merged[1]


def _join(a: Any, b: Any) -> None:
    """a.extend(b) for both batch caches: b's requests appended to a's, the rows of both
    right-justified to one index and padded to one buffer length (as upstream's extend)."""
    if a.keys is None and b.keys is None:
        a.left_padding = mx.concatenate([a.left_padding, b.left_padding])
        a.offset = mx.concatenate([a.offset, b.offset])
        return
    max_idx = max(a._idx, b._idx)
    max_size = max(c.keys[0].shape[2] for c in (a, b) if c.keys is not None)
    template = a if a.keys is not None else b

    def pad(c):
        k, v = c.keys, c.values
        if k is None:
            k = _empty_like(template.keys, c.offset.shape[0])
            v = _empty_like(template.values, c.offset.shape[0])
        left = max_idx - c._idx
        right = max_size - k[0].shape[2] - left
        if right < 0:
            k, v = _rows(k, None, right), _rows(v, None, right)
            right = 0
        return _pad_rows(k, left, right), _pad_rows(v, left, right), c.left_padding + left

    (k1, v1, l1), (k2, v2, l2) = pad(a), pad(b)
    a.keys, a.values = _cat(k1, k2, axis=0), _cat(v1, v2, axis=0)
    a.offset = mx.concatenate([a.offset, b.offset])
    a.left_padding = mx.concatenate([l1, l2])
    a._idx = max_idx


class _QuantizedRows:
    """Quantization shared by both batch caches (caches/kv_format.py: the format)."""

    group_size: int
    bits: int
    value_bits: int
    rotate: str | None

    def _quantize(self, keys: mx.array, values: mx.array) -> tuple[Triple, Triple]:
        return kv_format.quantize_kv(self, keys, values)

    def _new_rows(self, keys: mx.array, values: mx.array, n: int) -> tuple[Triple, Triple]:
        """Empty key and value buffers of n rows, each at its width."""
        return (
            kv_format.zeros(keys, n, self.group_size, self.bits),
            kv_format.zeros(values, n, self.group_size, self.value_bits),
        )

    _STATE: tuple[str, ...] = ()

    def _take(self, batch_indices) -> None:
        """Keep the given requests (rows of every array and of the bookkeeping)."""
        if self.keys is not None:
            self.keys = _map(lambda x: x[batch_indices], self.keys)
            self.values = _map(lambda x: x[batch_indices], self.values)
        self.offset = self.offset[batch_indices]
        self.left_padding = self.left_padding[batch_indices]

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys, self.values)

    # The state layout of 0.32's 16-bit batch caches, on every release.
    @property
    def state(self):
        return tuple(getattr(self, name) for name in self._STATE)

    @state.setter
    def state(self, v):
        for name, x in zip(self._STATE, v, strict=True):
            setattr(self, name, x)


class BatchQuantizedKVCache(_QuantizedRows, BatchKVCache):
    """BatchKVCache whose keys and values are affine-quantized `(data, scales, biases)`."""

    def __init__(
        self,
        left_padding: list[int],
        group_size: int = 64,
        bits: int = 8,
        value_bits: int | None = None,
        rotate: str | None = None,
    ):
        super().__init__(left_padding)
        kv_format.set_format(self, group_size, bits, value_bits, rotate)

    def update_and_fetch(self, keys, values):
        prev, S = self._idx, keys.shape[2]
        self._grow(keys, values)
        self.offset = self.offset + S
        self._idx += S
        self._write(prev, self._quantize(keys, values))
        return kv_format.tagged(self, self.keys_and_values())

    def store_tail_rows(self, keys: mx.array, values: mx.array) -> None:
        """The last rows, already counted in `offset` and `_idx` and already rotated (a
        16-bit decode tail's, fixes/quantized_decode_tail.py), quantized into the buffers."""
        n = keys.shape[2]
        self._idx -= n
        self._grow(keys, values)
        self._idx += n
        self._write(self._idx - n, kv_format.quantize_kv(self, keys, values, rotated=True))

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        """Room after the first `_idx` rows for these 16-bit rows, in steps of `step`."""
        prev, S = self._idx, keys.shape[2]
        if self.keys is None or prev + S > self.keys[0].shape[2]:
            n = (self.step + S - 1) // self.step * self.step
            new_k, new_v = self._new_rows(keys, values, n)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = _cat(_rows(self.keys, None, prev), new_k)
                self.values = _cat(_rows(self.values, None, prev), new_v)

    def _write(self, start: int, quantized: tuple[Triple, Triple]) -> None:
        """Quantized key and value rows into rows start .. `_idx` of the buffers."""
        for dst, src in zip((self.keys, self.values), quantized, strict=True):
            for d, s in zip(dst, src, strict=True):
                d[..., start : self._idx, :] = s

    def keys_and_values(self):
        return _rows(self.keys, None, self._idx), _rows(self.values, None, self._idx)

    def finalize(self):
        if self._right_padding is not None:
            padding = self._right_padding
            self.keys, self.values = _roll(self.keys, padding), _roll(self.values, padding)
            self.offset = self.offset - padding
            self.left_padding = self.left_padding + padding
            self._right_padding = None

    _STATE = ("keys", "values", "offset", "left_padding", "_idx")

    def filter(self, batch_indices):
        self._take(batch_indices)
        # Shift left to drop the padding every remaining request shares.
        min_left_pad = min(self.left_padding.tolist())
        if min_left_pad > 0:
            if self.keys is not None:
                self.keys = _rows(self.keys, min_left_pad)
                self.values = _rows(self.values, min_left_pad)
            self._idx -= min_left_pad
            self.left_padding = self.left_padding - min_left_pad

    def extend(self, other):
        _join(self, other)

    def extract(self, idx: int) -> QuantizedKVCache:
        cache = QuantizedKVCache(group_size=self.group_size, bits=self.bits, **kv_format.extra(self))
        mx.eval(self.left_padding)
        padding = self.left_padding.tolist()[idx]
        cache.keys = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]), self.keys)
        cache.values = _map(lambda x: mx.contiguous(x[idx : idx + 1, :, padding : self._idx]), self.values)
        cache.offset = cache.keys[0].shape[2]
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedKVCache:
        """Batch per-request caches, quantizing those still at 16 bits."""
        caches, fmt = _as_quantized(caches)
        lengths = [c.offset if c.keys is not None else 0 for c in caches]
        max_length = max(lengths)
        if max_length == 0:
            return cls([0] * len(caches), *fmt)
        cache = cls([max_length - n for n in lengths], *fmt)
        cache.keys, cache.values = _merged_rows(caches, lengths, lambda c, v: _rows(v, None, c.offset))
        cache.offset = cache.offset + max_length
        cache._idx = max_length
        return cache


class BatchQuantizedRotatingKVCache(_QuantizedRows, BatchRotatingKVCache):
    """BatchRotatingKVCache whose ring holds affine-quantized `(data, scales, biases)`."""

    def __init__(
        self,
        max_size: int,
        left_padding: list[int],
        group_size: int = 64,
        bits: int = 8,
        value_bits: int | None = None,
        rotate: str | None = None,
    ):
        super().__init__(max_size, left_padding)
        kv_format.set_format(self, group_size, bits, value_bits, rotate)

    def _trim(self, trim_size, v, append=None):
        if trim_size > 0:
            v = _rows(v, trim_size)
        return _cat(v, append) if append is not None else v

    def _temporal_order(self):
        if self.rotated:
            self.keys = _map(lambda x: mx.roll(x, -self._idx, axis=2), self.keys)
            self.values = _map(lambda x: mx.roll(x, -self._idx, axis=2), self.values)
            self._idx = self.keys[0].shape[2]
            self.rotated = False

    def _update_concat(self, keys, values):
        S = keys.shape[2]
        keys, values = self._quantize(keys, values)
        if self.keys is None:
            self.keys, self.values = keys, values
        else:
            self._temporal_order()
            if self.keys[0].shape[2] > self._idx:
                self.keys, self.values = (
                    _rows(self.keys, None, self._idx),
                    _rows(self.values, None, self._idx),
                )
            # Roll right-padded rows so that padding never evicts a valid token.
            if self._lengths is not None:
                roll = mx.maximum(0, self.offset - self._lengths)
                self.keys, self.values = _roll(self.keys, roll), _roll(self.values, roll)
                self.left_padding = self.left_padding + roll
                self.offset = self.offset - roll
            # At most max_size + S - 1 rows, so every new token sees max_size of context.
            trim_size = self._idx - self.max_size + 1
            if trim_size > 0:
                self.left_padding = self.left_padding - trim_size
            self.keys = self._trim(trim_size, self.keys, keys)
            self.values = self._trim(trim_size, self.values, values)
        self.offset = self.offset + S
        self._offset += S
        self._idx = self.keys[0].shape[2]
        self.keys = _with_dependencies(self.keys, self.left_padding, self.offset)
        return kv_format.tagged(self, (self.keys, self.values))

    def _update_in_place(self, keys, values):
        if self._lengths is not None:
            raise RuntimeError(
                "finalize() should be called before decoding with BatchQuantizedRotatingKVCache"
            )
        S = keys.shape[2]
        prev = self._offset
        if self.keys is None or (prev >= self.keys[0].shape[2] and self.keys[0].shape[2] < self.max_size):
            new_size = min(self.step, self.max_size - prev)
            new_k, new_v = self._new_rows(keys, values, new_size)
            if self.keys is not None:
                self.keys, self.values = _cat(self.keys, new_k), _cat(self.values, new_v)
            else:
                self.keys, self.values = new_k, new_v
            self._idx = prev
        trim_size = self.keys[0].shape[2] - self.max_size
        if trim_size > 0:
            self.keys, self.values = self._trim(trim_size, self.keys), self._trim(trim_size, self.values)
            self._idx = self.max_size
            self.left_padding = self.left_padding - trim_size
        if self._idx == self.max_size:
            self.rotated = True
            self._idx = 0
        if self.rotated:
            self.left_padding = self.left_padding - S
        for dst, src in zip((self.keys, self.values), self._quantize(keys, values), strict=True):
            for d, s in zip(dst, src, strict=True):
                d[..., self._idx : self._idx + S, :] = s
        self._offset += S
        self.offset = self.offset + S
        self._idx += S
        self.keys = _with_dependencies(self.keys, self.left_padding, self.offset)
        return kv_format.tagged(self, self.keys_and_values())

    def keys_and_values(self):
        if self._offset < self.keys[0].shape[2]:
            return _rows(self.keys, None, self._offset), _rows(self.values, None, self._offset)
        return self.keys, self.values

    def finalize(self):
        if self._lengths is not None:
            roll = mx.maximum(0, self.offset - self._lengths)
            self.keys, self.values = _roll(self.keys, roll), _roll(self.values, roll)
            self.left_padding = self.left_padding + roll
            self.offset = self.offset - roll
            self._lengths = None

    _STATE = ("keys", "values", "offset", "left_padding", "max_size", "_offset", "_idx", "rotated")

    def filter(self, batch_indices):
        self._take(batch_indices)

    def extend(self, other):
        if self.keys is not None or other.keys is not None:
            if self.rotated != other.rotated or self._idx != other._idx:
                self._temporal_order()
                other._temporal_order()
            self._offset = max(self._offset, other._offset)
        _join(self, other)

    def extract(self, idx: int) -> QuantizedRotatingKVCache:
        mx.eval(self.left_padding, self.offset)
        cache = QuantizedRotatingKVCache(self.max_size, 0, *kv_format.fmt(self))
        padding = max(0, self.left_padding.tolist()[idx])
        keys = _map(lambda x: x[idx : idx + 1], self.keys)
        values = _map(lambda x: x[idx : idx + 1], self.values)
        end = self._idx
        if self.rotated:
            keys = _map(lambda x: mx.roll(x, -self._idx, axis=2), keys)
            values = _map(lambda x: mx.roll(x, -self._idx, axis=2), values)
            end = self.max_size
        cache.keys = _map(lambda x: mx.contiguous(x[:, :, padding:end]), keys)
        cache.values = _map(lambda x: mx.contiguous(x[:, :, padding:end]), values)
        cache.offset = self.offset.tolist()[idx]
        cache._idx = cache.keys[0].shape[2]
        return cache

    @classmethod
    def merge(cls, caches: list[Any]) -> BatchQuantizedRotatingKVCache:
        """Batch per-request ring caches, quantizing those still at 16 bits."""
        max_size = caches[0].max_size
        if any(c.max_size != max_size for c in caches):
            raise ValueError("BatchQuantizedRotatingKVCache can only merge caches with the same maximum size")
        caches, fmt = _as_quantized(caches)
        lengths = [c.size() for c in caches]
        max_length = max(lengths)
        if max_length == 0:
            return cls(max_size, [0] * len(caches), *fmt)
        cache = cls(max_size, [max_length - n for n in lengths], *fmt)
        cache.keys, cache.values = _merged_rows(caches, lengths, lambda c, v: c._temporal_order(v))
        cache.offset = mx.array([c.offset for c in caches])
        cache._idx = cache._offset = max_length
        return cache


def _copy(x: mx.array | None) -> mx.array | None:
    return None if x is None else mx.array(x)


def batch_to_quantized(
    self: BatchKVCache,
    group_size: int = 64,
    bits: int = 4,
    value_bits: int | None = None,
    rotate: str | None = None,
) -> BatchQuantizedKVCache:
    """BatchKVCache.to_quantized: the same rows, padding and offsets, quantized."""
    quant = BatchQuantizedKVCache([], group_size, bits, value_bits, rotate)
    # Copies: the batch caches update offset and left_padding in place (`-=`).
    quant.left_padding, quant.offset = _copy(self.left_padding), _copy(self.offset)
    quant._idx, quant._right_padding = self._idx, _copy(self._right_padding)
    if self.keys is not None and self._idx > 0:
        rows = self.keys[..., : self._idx, :], self.values[..., : self._idx, :]
        quant.keys, quant.values = quant._quantize(*rows)
    return quant


def batch_rotating_to_quantized(
    self: BatchRotatingKVCache,
    group_size: int = 64,
    bits: int = 4,
    value_bits: int | None = None,
    rotate: str | None = None,
) -> BatchQuantizedRotatingKVCache:
    """BatchRotatingKVCache.to_quantized: the same ring and bookkeeping, quantized."""
    quant = BatchQuantizedRotatingKVCache(self.max_size, [], group_size, bits, value_bits, rotate)
    for name in ("left_padding", "offset", "_lengths"):
        setattr(quant, name, _copy(getattr(self, name)))
    quant._idx, quant._offset, quant.rotated = self._idx, self._offset, self.rotated
    if self.keys is not None:
        quant.keys, quant.values = quant._quantize(self.keys, self.values)
    return quant


def align_precision(a: Any, b: Any) -> tuple[Any, Any]:
    """Two caches of one layer made joinable: where one is quantized and the other is
    not, the other is quantized with the same settings (CacheLists pairwise)."""
    if hasattr(a, "caches") and hasattr(b, "caches"):
        pairs = [align_precision(x, y) for x, y in zip(a.caches, b.caches, strict=True)]
        a.caches = type(a.caches)(x for x, _ in pairs)
        b.caches = type(b.caches)(y for _, y in pairs)
        return a, b
    if is_quantized(a) and not is_quantized(b):
        return a, _quantized_like(b, a)
    if is_quantized(b) and not is_quantized(a):
        return _quantized_like(a, b), b
    return a, b
