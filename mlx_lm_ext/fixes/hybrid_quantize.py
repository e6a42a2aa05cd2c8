"""Quantization walks every cache layout mlx-lm builds.

Upstream: `maybe_quantize_kv_cache` converts each top-level cache that has
`to_quantized`: it skips caches nested in a CacheList, silently skips classes it does not
know, and calls `RotatingKVCache.to_quantized`, which raises NYI (mlx-lm #1573, #1353).
Here every layer is classified: full attention is quantized, sliding-window layers are
quantized too (or kept at full precision with `quantize_sliding=False`), recurrent
(gated-delta / SSM) state is never quantized, CacheLists are walked, and an unknown class
is an error naming the model and the class. Each conversion is logged in one line.
Patch file: patches/0002-hybrid-quantize.patch.
"""

from __future__ import annotations

import importlib
import logging
import threading
from dataclasses import replace
from typing import Any

from .. import layout
from ..caches import kv_format
from ..settings import current
from .base import Fix, Patcher

log = logging.getLogger("mlx_lm_ext")

# Kinds that are never converted, with the reason that goes into the log line (the same
# words as patches/0002-hybrid-quantize.patch).
KEPT = {
    layout.RECURRENT: "recurrent state, constant size",
    layout.QUANTIZED: "already quantized",
    layout.QUANTIZED_SLIDING: "already quantized",
    layout.BATCH_QUANTIZED: "already quantized",
    layout.CHUNKED: "chunked attention, bounded by its chunk",
    layout.CONCAT: "ConcatenateKVCache has no quantized form",
}
SLIDING_KINDS = (layout.SLIDING, layout.BATCH_SLIDING)


def quantize_layer(
    cache: Any, start: int, group_size: int, bits: int, sliding: bool, fmt: dict | None = None
):
    """One layer's cache after quantization, whether it was converted now, and the
    reason when it is kept unquantized. `fmt`: value_bits and rotate where they are not
    uniform and unrotated (caches/kv_format.py), passed to `to_quantized`."""
    kind = layout.classify(cache)
    if kind in SLIDING_KINDS and not sliding and not layout.is_bounded(cache):
        return cache, False, f"sliding window ({cache.max_size} tokens) kept at full precision"
    if kind in (layout.FULL, layout.SLIDING, layout.BATCH, layout.BATCH_SLIDING):
        if tokens_seen(cache, kind) < start:
            return cache, False, None
        return cache.to_quantized(group_size=group_size, bits=bits, **(fmt or {})), True, None
    if kind == layout.LIST:
        inner = [quantize_layer(c, start, group_size, bits, sliding, fmt) for c in cache.caches]
        cache.caches = type(cache.caches)(c for c, _, _ in inner)
        reasons = [r for _, _, r in inner if r]
        return cache, any(now for _, now, _ in inner), "; ".join(reasons) or None
    return cache, False, KEPT[kind]


def tokens_seen(cache: Any, kind: str) -> int:
    """The length quantized_kv_start is compared with. A batch converts as one: when its
    longest request crosses the threshold (its buffer length, which is what the batch's
    memory grows with); shorter requests batched with it are quantized from then on."""
    if kind == layout.BATCH:
        return cache._idx
    if kind == layout.BATCH_SLIDING:
        return cache._offset
    return cache.offset


def maybe_quantize_kv_cache(
    prompt_cache, quantized_kv_start, kv_group_size, kv_bits, kv_value_bits=None, kv_rotate=None
):
    """Drop-in for mlx_lm.generate.maybe_quantize_kv_cache that knows every layout.

    `kv_value_bits` and `kv_rotate` are the patch series' arguments; where a call leaves
    them out, those of the generation around it (`calling`) or the process's apply
    them. Logs one line when a call converts layers (once per request, when its cache
    crosses quantized_kv_start), in the words of the patch series.
    """
    if kv_bits is None:
        return
    settings = current()
    bits, fmt = layer_format(settings, kv_bits, kv_value_bits, kv_rotate)
    # Read before converting: the quantized caches are new objects make_prompt_cache never saw.
    model = layout.origin(prompt_cache[0]) if prompt_cache else "unknown model"
    converted, kept = False, {}
    for i, c in enumerate(prompt_cache):
        prompt_cache[i], now, reason = quantize_layer(
            c, quantized_kv_start, kv_group_size, bits, settings.quantize_sliding, fmt
        )
        converted = converted or now
        if reason:
            kept[i] = reason
    if converted:
        label = replace(settings, kv_bits=kv_bits).describe() if fmt else bits
        log.info("%s: %s", model, describe_quantization(len(prompt_cache), kept, label))


def layer_format(
    settings, kv_bits: int, value_bits: int | None = None, rotate: str | None = None
) -> tuple[int, dict]:
    """The keys' width and the format beyond it. Value bits and rotation: the call's,
    else the generation's (`calling`), else the process's --kv-value-bits and
    --kv-rotate; key bits: the process's --kv-key-bits, else the call's kv_bits."""
    outer = getattr(_CALLING, "format", {})
    value_bits = value_bits or outer.get("value_bits") or settings.kv_value_bits
    rotate = rotate or outer.get("rotate") or settings.kv_rotate
    bits = settings.kv_key_bits or kv_bits
    return bits, kv_format.format_args(bits, value_bits or kv_bits, rotate)


_CALLING = threading.local()


def calling(steps, value_bits: int | None, rotate: str | None):
    """`steps` (a generate_step generator) with its quantization taking `value_bits`
    and `rotate`: set on this thread for each step only, as a generator's steps may
    interleave with other generations'."""
    fmt = {"value_bits": value_bits, "rotate": rotate}
    try:
        while True:
            outer, _CALLING.format = getattr(_CALLING, "format", {}), fmt
            try:
                item = next(steps)
            except StopIteration:
                return
            finally:
                _CALLING.format = outer
            yield item
    finally:
        steps.close()


def describe_quantization(n_layers: int, kept: dict[int, str], bits: int | str) -> str:
    """`kv_bits=8 quantizes layers 0,1,4; keeps 2,3 (recurrent state, constant size)`."""
    quantized = ",".join(str(i) for i in range(n_layers) if i not in kept)
    by_reason: dict[str, list[str]] = {}
    for i, reason in kept.items():
        by_reason.setdefault(reason, []).append(str(i))
    keeps = "; ".join(f"{','.join(layers)} ({reason})" for reason, layers in by_reason.items())
    return f"kv_bits={bits} quantizes layers {quantized or 'none'}; keeps {keeps or 'none'}"


class HybridQuantize(Fix):
    name = "hybrid-quantize"
    summary = "kv_bits quantizes every layout: sliding, CacheList, hybrid; never recurrent state"

    def needed(self) -> bool:
        generate = importlib.import_module("mlx_lm.generate")
        from mlx_lm.models.cache import CacheList, KVCache

        return generate.maybe_quantize_kv_cache is not maybe_quantize_kv_cache and not _quantizes_nested(
            generate.maybe_quantize_kv_cache, CacheList, KVCache
        )

    def install(self, patcher: Patcher) -> None:
        generate = importlib.import_module("mlx_lm.generate")

        patcher.rebind(generate.maybe_quantize_kv_cache, maybe_quantize_kv_cache)


def _quantizes_nested(fn, cache_list_cls, kv_cls) -> bool:
    """Probe: does the installed function reach a KVCache inside a CacheList?"""
    import mlx.core as mx

    inner = kv_cls()
    inner.update_and_fetch(mx.zeros((1, 1, 2, 64)), mx.zeros((1, 1, 2, 64)))
    probe = [cache_list_cls(inner)]
    try:
        fn(probe, quantized_kv_start=0, kv_group_size=64, kv_bits=8)
    except Exception:
        return False
    return layout.classify(probe[0].caches[0]) == layout.QUANTIZED


FIX = HybridQuantize()
