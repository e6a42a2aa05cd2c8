"""Prompt-cache entries as stored: cut to their tokens, and quantized when asked.

The server keeps finished requests' caches (`LRUPromptCache`) so a later request that
shares the prefix skips its prefill; `--prompt-cache-bytes` bounds them. Stored as
generation left them, an entry carries the step-allocated padding after its tokens (up
to 255 rows a layer) and, with live decoding at 16 bits, 16-bit rows. Here an entry is
stored with its buffers cut to its tokens and, with `--prompt-cache-bits`, its 16-bit
attention layers quantized (full and sliding; recurrent state and layers live decoding
already quantized are kept as they are). A layer quantized for storage is marked, and
`for_live` turns it back into its 16-bit class when fetched, so generation continues in
the live precision: a hit gives what a prefill of the prefix quantized at that boundary
gives. Trimming (the LRU's partial hits) works on the stored form: quantization runs
along the head dim, so a trimmed quantized entry equals the trimmed entry quantized.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .. import layout

STORED = "_mlx_lm_ext_stored_bits"  # on a layer quantized for storage only


def for_storage(caches: list[Any], bits: int | None, group_size: int) -> list[Any]:
    """The entry to store for `caches` (new layer objects; `caches` is left as it is),
    its 16-bit attention layers quantized at `bits` (None: cut only)."""
    return [_stored(c, bits, group_size) for c in caches]


def for_live(caches: list[Any] | None) -> list[Any] | None:
    """A fetched entry (the LRU's own copy) with the layers quantized for storage back
    in their 16-bit classes."""
    if caches is None:
        return None
    return [_live(c) for c in caches]


def _stored(cache: Any, bits: int | None, group_size: int) -> Any:
    kind = layout.classify(cache)
    if kind == layout.LIST:
        return type(cache)(*(_stored(c, bits, group_size) for c in cache.caches))
    if kind == layout.FULL:
        cache = _cut_full(cache)
    elif kind in (layout.SLIDING, layout.QUANTIZED_SLIDING):
        cache = _cut_ring(cache)
    elif kind == layout.QUANTIZED:
        return _cut_quantized(cache)
    else:
        return cache  # recurrent, chunked, batch: as generation left them
    if kind == layout.QUANTIZED_SLIDING:
        return cache  # live decoding quantized it: kept in its format
    if bits is None or cache.keys is None:
        return cache
    quant = cache.to_quantized(group_size=group_size, bits=bits)
    setattr(quant, STORED, bits)
    return _marked_like(cache, quant)


def _live(cache: Any) -> Any:
    kind = layout.classify(cache)
    if kind == layout.LIST:
        cache.caches = type(cache.caches)(_live(c) for c in cache.caches)
        return cache
    if not getattr(cache, STORED, None):
        return cache
    if kind == layout.QUANTIZED:
        return _dequantized_full(cache)
    return _dequantized_ring(cache)


def _rows(x: Any, n: int) -> Any:
    """The first n rows along the sequence (of an array, or of each array of a quantized
    triple), in buffers of their own: a slice would keep the padded buffer alive."""
    if isinstance(x, (tuple, list)):
        return tuple(_rows(a, n) for a in x)
    return mx.contiguous(x[..., :n, :]) if x.shape[2] > n else x


def _length(x: Any) -> int:
    return (x[0] if isinstance(x, (tuple, list)) else x).shape[2]


def _cut_full(cache: Any) -> Any:
    from mlx_lm.models.cache import KVCache

    out = KVCache()
    out.offset = cache.offset
    if cache.keys is not None:
        _cut(out, cache.keys, cache.values, cache.offset)
    return out


def _cut_ring(cache: Any) -> Any:
    """A ring that has not wrapped holds its tokens at the front: cut the rest. A full
    ring has no padding. A quantized ring's decode tail is left behind (`_untailed`)."""
    out, keys, values = _untailed(cache)
    if keys is not None and cache.offset < _length(keys) and cache._idx == cache.offset:
        _cut(out, keys, values, cache.offset)
    return out


def _cut_quantized(cache: Any) -> Any:
    """A cache live decoding quantized, in its format, cut to its tokens."""
    out, keys, values = _untailed(cache)
    if keys is not None:
        _cut(out, keys, values, cache.offset)
    return out


def _untailed(cache: Any) -> tuple[Any, Any, Any]:
    """A shallow copy of the cache without a decode tail (fixes/quantized_decode_tail.py),
    and its keys and values: reading them quantizes the pending rows into the live
    cache's buffers first, so the copy never writes into buffers the two share."""
    import copy

    from ..fixes.quantized_decode_tail import leave_tail

    keys, values = cache.keys, cache.values
    out = copy.copy(cache)
    leave_tail(out)
    return out, keys, values


def _cut(out: Any, keys: Any, values: Any, n: int) -> None:
    """`out` holds the first n rows of keys and values, evaluated: no step padding."""
    out.keys, out.values = _rows(keys, n), _rows(values, n)
    mx.eval(out.keys, out.values)


def _marked_like(source: Any, target: Any) -> Any:
    """Carry the bound mark (a ring that bounds a full-attention layer)."""
    return layout.mark_bounded(target) if layout.is_bounded(source) else target


def _dequantized(triple: tuple, group_size: int, bits: int) -> mx.array:
    return mx.dequantize(*triple, group_size=group_size, bits=bits)


def _dequantized_full(quant: Any) -> Any:
    from mlx_lm.models.cache import KVCache

    out = KVCache()
    out.offset = quant.offset
    if quant.keys is not None:
        keys, values = (tuple(x[..., : quant.offset, :] for x in t) for t in (quant.keys, quant.values))
        out.keys = _dequantized(keys, quant.group_size, quant.bits)
        out.values = _dequantized(values, quant.group_size, quant.bits)
    return out


def _dequantized_ring(quant: Any) -> Any:
    from mlx_lm.models.cache import RotatingKVCache

    out = RotatingKVCache(max_size=quant.max_size, keep=quant.keep)
    out.offset, out._idx = quant.offset, quant._idx
    if quant.keys is not None:
        out.keys = _dequantized(quant.keys, quant.group_size, quant.bits)
        out.values = _dequantized(quant.values, quant.group_size, quant.bits)
    return _marked_like(quant, out)
