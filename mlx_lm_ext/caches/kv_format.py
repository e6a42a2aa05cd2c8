"""How a quantized cache stores its rows: key bits, value bits, group size, rotation.

Keys and values need not share one width: keys set the softmax's scores, where an error
is exponentiated, values only enter a weighted mean (mlx-lm PR #1550 measured K8V4 close
to K8V8 at 0.76x its bytes). And a Hadamard rotation spreads a key's outlier dims over
every dim before quantizing, so its groups lose less to one large value (llama.cpp
rotates by default since PR #21038). The rotation is orthonormal: queries rotated with
the keys give the same scores, and rotated values give a rotated output, rotated back
(Sylvester's H is its own inverse).

Every quantized cache carries `bits` (the keys', and the values' unless `value_bits` is
set), `value_bits` and `rotate` (None, "keys" or "all"); attention reads them from the
cache. Caches made by an mlx-lm without these attributes read as uniform and unrotated.
"""

from __future__ import annotations

import math
from typing import Any

import mlx.core as mx

ROTATIONS = (None, "keys", "all")


def set_format(cache: Any, group_size: int, bits: int, value_bits: int | None, rotate: str | None) -> None:
    """A new cache's format: the value width defaults to the keys'."""
    if rotate not in ROTATIONS:
        raise ValueError(f"rotate must be one of {ROTATIONS}, got {rotate!r}")
    cache.group_size, cache.bits, cache.value_bits, cache.rotate = (
        group_size,
        bits,
        value_bits or bits,
        rotate,
    )


def value_bits(cache: Any) -> int:
    """The values' width: `value_bits` where set, else the keys' `bits`."""
    return getattr(cache, "value_bits", None) or cache.bits


def rotation(cache: Any) -> str | None:
    """None, "keys" (keys and queries rotated) or "all" (values and outputs too)."""
    return getattr(cache, "rotate", None)


def hadamard(x: mx.array) -> mx.array:
    """x times the orthonormal Sylvester-Hadamard matrix along its last dim (a power of
    two): its own inverse, so the same call rotates and rotates back."""
    return mx.hadamard_transform(x, scale=1.0 / math.sqrt(x.shape[-1]))


def quantize(x: mx.array, group_size: int, bits: int) -> tuple[mx.array, ...]:
    """(data, scales, biases) of x's rows."""
    return tuple(mx.quantize(x, group_size=group_size, bits=bits))


def rotate_in(cache: Any, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """16-bit rows as `cache` stores them before quantizing: rotated as it says."""
    rotate = rotation(cache)
    return (hadamard(keys) if rotate else keys), (hadamard(values) if rotate == "all" else values)


def quantize_kv(cache: Any, keys: mx.array, values: mx.array, rotated: bool = False) -> tuple[tuple, tuple]:
    """Keys and values as `cache` stores them: rotated as it says (unless `rotated`:
    they already are), each quantized at its width."""
    if not rotated:
        keys, values = rotate_in(cache, keys, values)
    return quantize(keys, cache.group_size, cache.bits), quantize(values, cache.group_size, value_bits(cache))


class Rows(tuple):
    """A quantized (data, scales, biases) triple that says how its rows were rotated:
    attention without the cache (Gemma 4's KV-shared layers) reads it here."""

    rotate: str | None = None

    def __new__(cls, triple, rotate: str | None = None) -> Rows:
        rows = super().__new__(cls, triple)
        rows.rotate = rotate
        return rows


def tagged(cache: Any, keys_values: tuple) -> tuple:
    """(keys, values) as a cache's update returns them: tagged with its rotation, if any."""
    rotate = rotation(cache)
    if rotate is None:
        return keys_values
    keys, values = keys_values
    return Rows(keys, rotate), Rows(values, rotate)


def zeros(like: mx.array, n: int, group_size: int, bits: int) -> tuple[mx.array, ...]:
    """An empty (data, scales, biases) buffer of n rows for rows shaped like `like`."""
    B, H, _, D = like.shape
    return (
        mx.zeros((B, H, n, D * bits // 32), mx.uint32),
        mx.zeros((B, H, n, D // group_size), like.dtype),
        mx.zeros((B, H, n, D // group_size), like.dtype),
    )


def fmt(cache: Any) -> tuple[int, int, int, str | None]:
    """(group_size, key bits, value bits, rotation): caches that share it can be batched."""
    return cache.group_size, cache.bits, value_bits(cache), rotation(cache)


def format_args(bits: int, value: int | None, rotate: str | None) -> dict[str, Any]:
    """The format arguments beyond upstream's (group_size, bits) that `to_quantized`
    takes, only where they differ from uniform and unrotated: a cache class that
    predates them is still called as upstream calls it."""
    out: dict[str, Any] = {}
    if value not in (None, bits):
        out["value_bits"] = value
    if rotate is not None:
        out["rotate"] = rotate
    return out


def extra(cache: Any) -> dict[str, Any]:
    """`format_args` of a quantized cache."""
    return format_args(cache.bits, value_bits(cache), rotation(cache))


def saved_scalars(cache: Any) -> tuple[int, ...]:
    """What a split or rotated cache saves beyond upstream's scalars (value bits, the
    rotation's index); nothing for a uniform unrotated one, which saves as upstream's."""
    if is_uniform(cache):
        return ()
    return (value_bits(cache), ROTATIONS.index(rotation(cache)))


def restore_scalars(cache: Any, extra) -> None:
    """`saved_scalars` read back; none saved: uniform and unrotated."""
    values, rotate = (int(x) for x in extra) if extra else (cache.bits, 0)
    cache.value_bits, cache.rotate = values, ROTATIONS[rotate]


def is_uniform(cache: Any) -> bool:
    """Stored as upstream stores it: one width, no rotation (its state is upstream's)."""
    return not extra(cache)
