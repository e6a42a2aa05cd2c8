"""QuantizedRotatingKVCache: RotatingKVCache's ring, stored as affine-quantized groups.

Upstream `RotatingKVCache.to_quantized` raises "RotatingKVCache Quantization NYI", so
sliding-window layers (Gemma 3/4, gpt-oss) cannot be quantized and a bounded cache
(`max_kv_size`) cannot be combined with `kv_bits`. This class keeps RotatingKVCache's
semantics exactly (`keep` tokens, `step` growth, the concat path for prompt chunks, the
in-place ring for decode, masks) on `(data, scales, biases)` triples. Quantization works
per token row (groups run along the head dim), so quantize-then-rotate equals
rotate-then-quantize: the cache holds exactly the tokens RotatingKVCache would hold.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
from mlx.utils import tree_reduce
from mlx_lm.models.cache import RotatingKVCache, _BaseCache

from . import kv_format

# Releases up to 0.31 serialize scalars through `meta_state`; 0.32 folds them into
# `state`. Speak whichever protocol the installed base class uses.
_SPLIT_META = hasattr(_BaseCache, "meta_state")


def _cat(parts: list[tuple[mx.array, ...]]) -> tuple[mx.array, ...]:
    return tuple(mx.concatenate(group, axis=2) for group in zip(*parts, strict=True))


def _seq(v: tuple[mx.array, ...], start: int | None = None, stop: int | None = None):
    return tuple(x[..., start:stop, :] for x in v)


def last_writes(size: int, keep: int, idx: int, n: int) -> tuple[int, int]:
    """Where a ring of `size` rows that wraps to `keep` holds its last n writes, the
    newest just before `idx`: rows start .. start + first, then keep .. keep + n - first.
    One rule for the decode tail's flush and for its mask over the rows it replaces."""
    start = idx - n
    if start < keep:
        start += size - keep
    return start, min(n, size - start)


class QuantizedRotatingKVCache(_BaseCache):
    """A fixed-size ring of quantized keys and values (see the module docstring)."""

    step = 256

    def __init__(
        self,
        max_size: int,
        keep: int = 0,
        group_size: int = 64,
        bits: int = 8,
        value_bits: int | None = None,
        rotate: str | None = None,
    ):
        self.keep = keep
        self.keys = None
        self.values = None
        self.offset = 0
        self.max_size = max_size
        self._idx = 0
        kv_format.set_format(self, group_size, bits, value_bits, rotate)

    # RotatingKVCache's bookkeeping reads only offset, _idx, keep and max_size, so the
    # installed release's own methods serve both classes and stay in step with upstream.
    make_mask = RotatingKVCache.make_mask
    trim = RotatingKVCache.trim
    is_trimmable = RotatingKVCache.is_trimmable

    def size(self) -> int:
        return min(self.offset, self.max_size)

    def _zeros(self, like: mx.array, n: int, bits: int) -> tuple[mx.array, ...]:
        return kv_format.zeros(like, n, self.group_size, bits)

    def _trim(self, trim_size: int, v, append=None):
        parts = [_seq(v, None, self.keep), _seq(v, trim_size + self.keep)] if trim_size > 0 else [v]
        if append is not None:
            parts.append(append)
        return _cat(parts)

    def _temporal_order(self, v):
        """The ring in temporal order, the unused tail sliced off."""
        length = v[0].shape[2]
        if self._idx == length:
            return v
        if self._idx < self.offset:
            return _cat([_seq(v, None, self.keep), _seq(v, self._idx), _seq(v, self.keep, self._idx)])
        return _seq(v, None, self._idx)

    def _update_concat(self, keys: mx.array, values: mx.array):
        qk, qv = kv_format.quantize_kv(self, keys, values)
        if self.keys is None:
            self.keys, self.values = qk, qv
        else:
            self.keys = self._temporal_order(self.keys)
            self.values = self._temporal_order(self.values)
            self._idx = self.keys[0].shape[2]
            # Keep max_size - 1 old tokens so every new token sees max_size of context.
            trim_size = self._idx - self.max_size + 1
            self.keys = self._trim(trim_size, self.keys, qk)
            self.values = self._trim(trim_size, self.values, qv)
        self.offset += keys.shape[2]
        self._idx = self.keys[0].shape[2]
        return self.keys, self.values

    def _grow(self, keys: mx.array, values: mx.array) -> None:
        prev = self.offset
        new_size = min(self.step, self.max_size - prev)
        new_k = self._zeros(keys, new_size, self.bits)
        new_v = self._zeros(values, new_size, self.value_bits)
        if self.keys is not None:
            self.keys, self.values = _cat([self.keys, new_k]), _cat([self.values, new_v])
        else:
            self.keys, self.values = new_k, new_v
        self._idx = prev

    def _update_in_place(self, keys: mx.array, values: mx.array):
        S = keys.shape[2]
        if self.keys is None or (
            self.offset >= self.keys[0].shape[2] and self.keys[0].shape[2] < self.max_size
        ):
            self._grow(keys, values)
        trim_size = self.keys[0].shape[2] - self.max_size
        if trim_size > 0:
            self.keys = self._trim(trim_size, self.keys)
            self.values = self._trim(trim_size, self.values)
            self._idx = self.max_size
        if self._idx == self.max_size:
            self._idx = self.keep
        for dst, src in zip((self.keys, self.values), kv_format.quantize_kv(self, keys, values), strict=True):
            for d, s in zip(dst, src, strict=True):
                d[..., self._idx : self._idx + S, :] = s
        self.offset += S
        self._idx += S
        return self.keys_and_values()

    def store_tail_rows(self, keys: mx.array, values: mx.array) -> None:
        """The ring's last n writes, already counted in `offset` and `_idx` and already
        rotated (a 16-bit decode tail's, fixes/quantized_decode_tail.py), quantized into
        the rows they replace: n rows ending before `_idx`, wrapping to `keep`."""
        n = keys.shape[2]
        start, first = last_writes(self.max_size, self.keep, self._idx, n)
        quantized = kv_format.quantize_kv(self, keys, values, rotated=True)
        for dst, src in zip((self.keys, self.values), quantized, strict=True):
            for d, s in zip(dst, src, strict=True):
                d[..., start : start + first, :] = s[..., :first, :]
                if first < n:
                    d[..., self.keep : self.keep + n - first, :] = s[..., first:, :]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        if keys.shape[2] == 1:
            return kv_format.tagged(self, self._update_in_place(keys, values))
        return kv_format.tagged(self, self._update_concat(keys, values))

    def keys_and_values(self):
        if self.offset < self.keys[0].shape[2]:
            return _seq(self.keys, None, self.offset), _seq(self.values, None, self.offset)
        return self.keys, self.values

    def _meta(self) -> tuple[int, ...]:
        """The scalars saved with the ring; value bits and rotation only where they are
        not uniform and unrotated, so such caches save as before."""
        meta = (self.offset, self.keep, self.max_size, self._idx, self.group_size, self.bits)
        return (*meta, *kv_format.saved_scalars(self))

    def _set_meta(self, meta) -> None:
        meta = list(map(int, meta))
        self.offset, self.keep, self.max_size, self._idx, self.group_size, self.bits = meta[:6]
        kv_format.restore_scalars(self, meta[6:])

    @property
    def state(self):
        if _SPLIT_META:
            return self.keys, self.values
        return (self.keys, self.values, *self._meta())

    @state.setter
    def state(self, v):
        if _SPLIT_META:
            self.keys, self.values = v
        else:
            self.keys, self.values, *meta = v
            self._set_meta(meta)
        if self.keys is not None:
            self.keys, self.values = tuple(self.keys), tuple(self.values)

    @property
    def meta_state(self):
        return tuple(map(str, self._meta()))

    @meta_state.setter
    def meta_state(self, v):
        self._set_meta(v)

    def empty(self) -> bool:
        return self.keys is None

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return tree_reduce(lambda a, x: a + x.nbytes, (self.keys, self.values), 0)


def rotating_to_quantized(
    self: Any, group_size: int = 64, bits: int = 4, value_bits: int | None = None, rotate: str | None = None
) -> QuantizedRotatingKVCache:
    """RotatingKVCache.to_quantized: the same ring, positions and offset, quantized."""
    quant = QuantizedRotatingKVCache(self.max_size, self.keep, group_size, bits, value_bits, rotate)
    quant.offset, quant._idx = self.offset, self._idx
    if self.keys is not None:
        quant.keys, quant.values = kv_format.quantize_kv(quant, self.keys, self.values)
    return quant
