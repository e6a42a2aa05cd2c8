"""Prefill on MLX's CUDA backend without the memory peak: prompt chunks paced layer by
layer, and batch masks handed to attention in the form its fused kernel takes.

Two things made prefilling set the peak on CUDA (an H200, MLX 0.32.4, a Llama-3.1-8B
shape, `benchmarks/prefill_memory.py`): 8 prompts x 1024 tokens peaked 15.1 GiB above
the weights for a 1 GiB cache, 4 prompts x 8192 tokens 44.4 GiB for 4 GiB; with this
fix 2.9 and 4.6 GiB, prefilling 1.4x and 2.7x as fast.

- The backend keeps every kernel's inputs alive until the GPU has run them, and the
  host encodes a chunk's whole forward pass long before the GPU catches up, so every
  layer's intermediates are alive at once. Here each cache, handed a prompt chunk
  (`MIN_TOKENS` or more a row), starts its write on the GPU and waits for the previous
  layer's: about two layers' intermediates are alive at a time, and the GPU is kept
  busy while the host builds the next layer. The same goes for a decode step that
  grows the caches' buffers (every 256 tokens), which would otherwise keep every
  layer's old buffer alive; other decode steps are left alone.
- The fused attention kernel takes additive masks but not boolean ones: with the
  boolean mask of a batch (left padding) attention materializes float32 scores,
  B x heads x chunk x context (8 GiB a layer for 4 x 2048 queries over 8K keys).
  Boolean masks of prompt chunks become additive, -inf where masked, as MLX itself
  converts them where its fused kernel takes the mask: once a chunk, not once a layer
  (`additive_mask`), since the layers in flight would each hold a copy. Where no fused
  kernel takes the chunk (below), the boolean mask stays: an additive copy would only
  add its bytes. A batch none of whose rows is left-padded needs no array at all: its
  mask says what "causal" says, which the fused kernel takes without one
  (`unpadded_causal`; at 8 x 2048 queries over 32K keys the boolean and its additive
  copy are 1.5 GiB). That is most prompt chunks: BatchGenerator right-pads a chunk's
  shorter prompts, and each leaves the batch when its prompt is done (the array stays
  for a prompt that joins a batch mid-prefill, left-padded, and for the chunks after).
- A quantized cache's chunk attends over its rows dequantized to 16 bits, and the
  host, paced on the writes, ran about three layers of them ahead of the GPU: each such
  attention now waits for the previous layer's (`paced_dequantized`). 8 prompts of 32K
  at 8 bits peaked 6.88 GiB over what was active at the last chunk, now 5.10; 16 bits
  peaks 3.62 there.
- Nor does the fused kernel take head dims past 128 (Gemma 3's 256): one call of 8 x
  2048 queries (4 heads) over 32K keys held 4.06 GiB of scores at 256 and 0.02 at 128,
  and Gemma 3 270M's 8-prompt prefill peaked 7.3 GiB above a 1.6 GiB cache. Such a
  chunk's attention runs in blocks of queries whose scores fit `SCORE_BYTES`, each
  block started before the previous one is awaited (`blocked_attention`), the 16-bit
  cache's and the dequantized quantized cache's alike. Gemma's 16 x 32K prefill then
  peaked 2.45 GiB above what was active with 128-MiB blocks, 3.70 with 1-GiB ones
  (which prefilled in 3.1 s instead of 5.1).

Installed where MLX runs on CUDA. Metal keeps command buffers' inputs the same way but
is not measured here; the CPU backend frees intermediates as it goes (a prefill's peak
does not grow with the layer count). No patch file: the lasting fix belongs in MLX
(bounding how far the host runs ahead, masked fused attention), not in mlx-lm.
"""

from __future__ import annotations

import functools
import inspect
import weakref
from collections.abc import Callable
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from . import quantized_attention
from .base import Fix, Patcher

MIN_TOKENS = 64  # rows a cache write needs to count as a prompt chunk
FUSED_HEAD_DIM = 128  # the largest head dim MLX 0.32.4's CUDA prefill attention fuses
SCORE_BYTES = 1 << 27  # float32 scores one block of queries may materialize
_MARK = "_cuda_prefill"
_IN_FLIGHT: list[mx.array] = []  # the last prompt-chunk write's marker, started, not awaited
_ATTENDING: list[mx.array] = []  # the last dequantized chunk attention's marker, likewise
_ADDITIVE: dict[tuple[int, str], tuple[weakref.ref, mx.array]] = {}  # boolean mask -> additive


def cache_classes() -> list[type]:
    """Every KV cache class that writes rows itself: upstream's and this package's."""
    from mlx_lm.models import cache

    from ..caches.batch_quantized import BatchQuantizedKVCache
    from ..caches.quantized_rotating import QuantizedRotatingKVCache

    found = [
        cls
        for cls in vars(cache).values()
        if inspect.isclass(cls) and issubclass(cls, cache._BaseCache) and "update_and_fetch" in vars(cls)
    ]
    return found + [BatchQuantizedKVCache, QuantizedRotatingKVCache]


def _marker(out: Any) -> mx.array | None:
    """A scalar computed from one element of each array a write returns: evaluating it
    runs the whole write, and once evaluated it holds no cache buffer alive."""
    arrays = [x for _, x in tree_flatten(out) if isinstance(x, mx.array) and x.size]
    if not arrays:
        return None
    return sum(x[(0,) * x.ndim].astype(mx.float32) for x in arrays)


def pace(out: Any) -> None:
    """Start this write on the GPU, then wait for the previous one."""
    marker = _marker(out)
    if marker is not None:
        mx.async_eval(marker)
    if _IN_FLIGHT:
        mx.eval(_IN_FLIGHT.pop())
    if marker is not None:
        _IN_FLIGHT.append(marker)


def _rows(cache: Any) -> int:
    """Rows the cache's key buffer has room for (read past any property: no flush)."""
    return _buffer_rows(vars(cache).get("keys"))


def _buffer_rows(stored: Any) -> int:
    """Rows of a key buffer: an array or a triple's first, no tree walk."""
    while isinstance(stored, (tuple, list)):
        stored = stored[0] if stored else None
    return stored.shape[-2] if isinstance(stored, mx.array) and stored.ndim >= 2 else 0


def paced(update: Callable[..., Any]) -> Callable[..., Any]:
    """`update` that paces what it returns when handed a prompt chunk, or when the
    write grew the buffer (a decode step every `step` tokens: each layer's old buffer
    would otherwise stay alive until the whole step has run). A decode step reads no
    rows where the buffer is the same object (a row written in place): every layer of
    every step pays this check."""

    @functools.wraps(update)
    def update_and_fetch(self, keys: mx.array, values: mx.array, *args: Any, **kwargs: Any) -> Any:
        stored = vars(self).get("keys")
        out = update(self, keys, values, *args, **kwargs)
        now = vars(self).get("keys")  # a buffer that grew is a new object: rows read then only
        if keys.shape[-2] >= MIN_TOKENS or (
            now is not stored and _buffer_rows(now) - _buffer_rows(stored) >= MIN_TOKENS
        ):
            pace(out)
        return out

    setattr(update_and_fetch, _MARK, True)
    return update_and_fetch


def paced_dequantized(attend: Callable[..., Any]) -> Callable[..., Any]:
    """quantized_attention.dequantized_attention that, for a prompt chunk, waits for the
    previous layer's before dequantizing this layer's rows, and starts its own.

    A quantized cache's chunk attends over its rows dequantized to 16 bits (at the last
    of 8 x 32K-token prompts, 1 GiB a Llama-3.1-8B layer), and the host, paced on the
    cache writes, encodes them about three layers ahead of the GPU: on the H200 the 8-bit
    prefill peaked 3.3 GiB above the 16-bit one's. Waiting for the previous layer's
    attention leaves one layer's rows in flight; the GPU still has that layer's MLP and
    the next write to run while the host encodes."""

    @functools.wraps(attend)
    def dequantized_attention(queries: mx.array, *args: Any, **kwargs: Any) -> mx.array:
        if queries.shape[-2] < MIN_TOKENS:
            return attend(queries, *args, **kwargs)
        if _ATTENDING:
            mx.eval(_ATTENDING.pop())
        out = attend(queries, *args, **kwargs)
        marker = _marker(out)
        mx.async_eval(marker)
        _ATTENDING.append(marker)
        return out

    setattr(dequantized_attention, _MARK, True)
    return dequantized_attention


def block_rows(queries: mx.array, keys: mx.array) -> int | None:
    """Queries a block, where attention would materialize more than SCORE_BYTES of
    scores (a head dim the fused kernel does not take); None: one call."""
    batch, heads, length, dim = queries.shape
    if length <= 1 or dim <= FUSED_HEAD_DIM:
        return None
    rows = max(1, SCORE_BYTES // (batch * heads * keys.shape[-2] * 4))
    return rows if rows < length else None


def _block_mask(mask: Any, start: int, end: int, length: int) -> Any:
    """The mask of queries start..end of `length` ("causal" stays: its keys are cut)."""
    if isinstance(mask, mx.array) and mask.ndim >= 2 and mask.shape[-2] == length:
        return mask[..., start:end, :]
    return mask


def blocked_attention(queries, keys, values, scale: float, mask: Any, sinks=None) -> mx.array:
    """mx.fast.scaled_dot_product_attention over blocks of `block_rows` queries, each
    started before the previous is awaited, so two blocks' scores are alive at most; a
    causal block sees the keys up to its last query, as the causal mask aligns them."""
    rows, attend = block_rows(queries, keys), mx.fast.scaled_dot_product_attention
    if rows is None:
        return attend(queries, keys, values, scale=scale, mask=mask, sinks=sinks)
    length, context = queries.shape[-2], keys.shape[-2]
    outs: list[mx.array] = []
    for start in range(0, length, rows):
        end = min(length, start + rows)
        seen = context - length + end if isinstance(mask, str) else context
        out = attend(
            queries[..., start:end, :],
            keys[..., :seen, :],
            values[..., :seen, :],
            scale=scale,
            mask=_block_mask(mask, start, end, length),
            sinks=sinks,
        )
        mx.async_eval(out)
        if outs:
            mx.eval(outs[-1])
        outs.append(out)
    return mx.concatenate(outs, axis=-2)


def additive_mask(mask: mx.array, dtype: mx.Dtype) -> mx.array:
    """`mask` as 0 / -inf in `dtype`, made once for every layer it is handed to.

    A model builds a chunk's mask once and hands the same array to every layer; made
    per layer, each layer the GPU has not yet run held its own copy (B x chunk x
    context: 1 GiB a layer at 8 x 2048 queries over 32K keys). The copy is dropped with
    the boolean mask it came from."""
    key = (id(mask), str(dtype))
    held = _ADDITIVE.get(key)
    if held is not None and held[0]() is mask:
        return held[1]
    out = mx.where(mask, mx.array(0, dtype), mx.array(-mx.inf, dtype))
    _ADDITIVE[key] = (weakref.ref(mask), out)
    weakref.finalize(mask, _ADDITIVE.pop, key, None)
    return out


def prefill_attention(attention: Callable[..., Any]) -> Callable[..., Any]:
    """mlx_lm.models.base.scaled_dot_product_attention with a prompt chunk's boolean
    mask made additive in the queries' dtype where the fused kernel takes the chunk, and
    a 16-bit chunk whose head dim it does not take attended in blocks."""

    @functools.wraps(attention)
    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if queries.shape[-2] > 1:  # a prompt chunk (a decode step passes straight through)
            if queries.shape[-1] <= FUSED_HEAD_DIM:
                if isinstance(mask, mx.array) and mask.dtype == mx.bool_:
                    mask = additive_mask(mask, queries.dtype)
            elif isinstance(keys, mx.array) and not hasattr(cache, "bits") and block_rows(queries, keys):
                return blocked_attention(queries, keys, values, scale, mask, sinks)
        return attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)

    setattr(scaled_dot_product_attention, _MARK, True)
    return scaled_dot_product_attention


def _padded(cache: Any) -> bool:
    """Does any row of this batch cache start with padding (a host read of B ints)?"""
    padding = getattr(cache, "left_padding", None)
    return isinstance(padding, mx.array) and padding.size > 0 and bool(mx.any(padding != 0).item())


def unpadded_causal(make_mask: Callable[..., Any]) -> Callable[..., Any]:
    """BatchKVCache.make_mask giving "causal" for a prompt chunk of a batch none of whose
    rows is padded, where the array it builds would mask exactly the later keys; a
    caller that asks for an array, or a window, gets upstream's mask."""

    @functools.wraps(make_mask)
    def mask(self, N: int, *args: Any, return_array: bool = False, **kwargs: Any) -> Any:
        plain = not args and kwargs.get("window_size") is None and not return_array
        if N > 1 and plain and not _padded(self):
            return "causal"
        return make_mask(self, N, *args, return_array=return_array, **kwargs)

    setattr(mask, _MARK, True)
    return mask


def installed() -> bool:
    from mlx_lm.models.cache import KVCache

    return getattr(KVCache.update_and_fetch, _MARK, False)


def on_cuda() -> bool:
    """MLX's default device is a CUDA GPU."""
    cuda = getattr(mx, "cuda", None)
    return cuda is not None and cuda.is_available() and mx.default_device().type == mx.DeviceType.gpu


class CudaPrefill(Fix):
    name = "cuda-prefill"
    summary = "CUDA prefill: chunks paced layer by layer, batch masks additive (fused attention)"

    def needed(self) -> bool:
        return not installed() and on_cuda()

    def install(self, patcher: Patcher) -> None:
        from mlx_lm.models import base

        for cls in cache_classes():
            patcher.set(cls, "update_and_fetch", paced(vars(cls)["update_and_fetch"]))
        from mlx_lm.models.cache import BatchKVCache

        patcher.set(BatchKVCache, "make_mask", unpadded_causal(BatchKVCache.make_mask))
        attention = base.scaled_dot_product_attention
        patcher.rebind(attention, prefill_attention(attention))
        patcher.set(quantized_attention, "fused_attention", blocked_attention)
        dequantized = quantized_attention.dequantized_attention
        patcher.set(quantized_attention, "dequantized_attention", paced_dequantized(dequantized))
        patcher.defer(_ATTENDING.clear)
        patcher.defer(_IN_FLIGHT.clear)
        patcher.defer(_ADDITIVE.clear)


FIX = CudaPrefill()
