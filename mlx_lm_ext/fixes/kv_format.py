"""The quantized cache takes key bits and value bits apart, and rotates keys.

Upstream: `QuantizedKVCache` has one `bits` for keys and values and no rotation, so a
cache cannot spend its bytes where the quality is (mlx-lm PRs #1550 and #1555 measured
K8V4 and rotated keys; neither is merged; llama.cpp has `-ctk/-ctv` and rotates since
PR #21038). Here the cache gains `value_bits` (default: `bits`, which stays the keys'
width) and `rotate` (None, "keys" or "all": a Hadamard rotation before quantizing, see
caches/kv_format.py); `KVCache.to_quantized` passes them on. A uniform, unrotated
cache keeps upstream's state exactly, so prompt caches saved by upstream load and
uniform ones saved here load upstream; a split or rotated cache saves two more
scalars, which upstream's loader refuses instead of reading rotated keys as plain.
Attention reads the format from the cache (fixes/quantized_attention.py).
Patch files, one upstream PR each: patches/0015-kv-value-bits.patch (value bits) and
patches/0016-kv-rotate.patch (rotation).
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import mlx.core as mx
from mlx.utils import tree_map

from ..caches import kv_format
from ..caches.quantized_rotating import _SPLIT_META
from .base import Fix, Patcher
from .hybrid_quantize import calling


def __init__(
    self, group_size: int = 64, bits: int = 8, value_bits: int | None = None, rotate: str | None = None
):
    self.keys = None
    self.values = None
    self.offset = 0
    kv_format.set_format(self, group_size, bits, value_bits, rotate)


def update_and_fetch(self, keys: mx.array, values: mx.array):
    """Upstream's update, each of keys and values at its width, rotated as set."""
    return kv_format.tagged(self, store_rows(self, *kv_format.rotate_in(self, keys, values)))


def store_rows(self, keys: mx.array, values: mx.array):
    """Quantize rows already rotated (the decode tail's, fixes/quantized_decode_tail.py)
    into the buffers, grown by whole steps as upstream grows them."""
    B, n_kv_heads, num_steps, _ = keys.shape
    prev = self.offset
    if self.keys is None or (prev + num_steps) > self.keys[0].shape[-2]:
        new_steps = (self.step + num_steps - 1) // self.step * self.step
        new_k = kv_format.zeros(keys[..., :1, :], new_steps, self.group_size, self.bits)
        new_v = kv_format.zeros(values[..., :1, :], new_steps, self.group_size, kv_format.value_bits(self))
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            old_k, old_v = self.keys, self.values
            if prev % self.step != 0:
                old_k, old_v = tree_map(lambda x: x[..., :prev, :], (old_k, old_v))
            self.keys, self.values = _cat(old_k, new_k), _cat(old_v, new_v)
    self.offset += num_steps
    qk, qv = kv_format.quantize_kv(self, keys, values, rotated=True)
    for i in range(len(self.keys)):
        self.keys[i][..., prev : self.offset, :] = qk[i]
        self.values[i][..., prev : self.offset, :] = qv[i]
    return self.keys_and_values()


def _cat(old: tuple, new: tuple) -> tuple:
    return tuple(mx.concatenate([o, n], axis=-2) for o, n in zip(old, new, strict=True))


def _get_state(self):
    if _SPLIT_META:
        return self.keys, self.values
    return (self.keys, self.values, self.offset, self.group_size, self.bits, *kv_format.saved_scalars(self))


def _set_state(self, v):
    if _SPLIT_META:
        self.keys, self.values = v
        return
    self.keys, self.values, self.offset, self.group_size, self.bits, *extra = v
    kv_format.restore_scalars(self, extra)


def _get_meta(self):
    return tuple(map(str, (self.offset, self.group_size, self.bits, *kv_format.saved_scalars(self))))


def _set_meta(self, v):
    self.offset, self.group_size, self.bits, *extra = map(int, v)
    kv_format.restore_scalars(self, extra)


def kv_to_quantized(
    self: Any, group_size: int = 64, bits: int = 4, value_bits: int | None = None, rotate: str | None = None
):
    """KVCache.to_quantized with the value width and rotation passed on."""
    from mlx_lm.models.cache import QuantizedKVCache

    quant = QuantizedKVCache(group_size=group_size, bits=bits, value_bits=value_bits, rotate=rotate)
    quant.offset = self.offset
    if self.keys is not None:
        quant.keys, quant.values = kv_format.quantize_kv(quant, self.keys, self.values)
    return quant


def _taking_format(generate_step):
    """generate_step (or speculative_generate_step) taking the patch series'
    `kv_value_bits` and `kv_rotate`, which its quantization then applies."""

    @functools.wraps(generate_step)
    def wrapper(*args, kv_value_bits: int | None = None, kv_rotate: str | None = None, **kwargs):
        steps = generate_step(*args, **kwargs)
        if kv_value_bits is None and kv_rotate is None:
            return steps
        return calling(steps, kv_value_bits, kv_rotate)

    sig = inspect.signature(generate_step)
    names = ("kv_value_bits", "kv_rotate")
    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None) for n in names]
    wrapper.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    return wrapper


def _lacks_format(fn) -> bool:
    return "kv_value_bits" not in inspect.signature(fn).parameters


def installed() -> bool:
    """Does the installed QuantizedKVCache take value bits and rotation?"""
    from mlx_lm.models.cache import QuantizedKVCache

    params = inspect.signature(QuantizedKVCache.__init__).parameters
    return {"value_bits", "rotate"} <= set(params)


class KVFormat(Fix):
    name = "kv-format"
    patches = ("kv-value-bits", "kv-rotate")
    summary = "QuantizedKVCache: key and value bits apart (K8V4), Hadamard-rotated keys"

    def needed(self) -> bool:
        return not installed()

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models.cache import KVCache, QuantizedKVCache

        patcher.set(QuantizedKVCache, "__init__", __init__)
        patcher.set(QuantizedKVCache, "update_and_fetch", update_and_fetch)
        patcher.set(QuantizedKVCache, "store_rows", store_rows)
        patcher.set(QuantizedKVCache, "value_bits", None)  # caches made before: uniform
        patcher.set(QuantizedKVCache, "rotate", None)
        patcher.set(QuantizedKVCache, "state", property(_get_state, _set_state))
        if _SPLIT_META:
            patcher.set(QuantizedKVCache, "meta_state", property(_get_meta, _set_meta))
        patcher.set(KVCache, "to_quantized", kv_to_quantized)
        generate = importlib.import_module("mlx_lm.generate")
        for name in ("generate_step", "speculative_generate_step"):
            fn = getattr(generate, name, None)
            if fn is not None and _lacks_format(fn):
                patcher.rebind(fn, _taking_format(fn))


FIX = KVFormat()
