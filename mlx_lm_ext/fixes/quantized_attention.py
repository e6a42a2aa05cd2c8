"""Quantized attention supports attention sinks and KV shared from a quantized layer.

Upstream: `scaled_dot_product_attention` raises "Quantized SDPA does not support
attention sinks." for a quantized cache, so `--kv-bits` fails on gpt-oss's full-attention
layers (every release with gpt_oss). A sink is one extra logit per head that takes part
in the softmax and carries no value; quantized attention adds it as a last score column
and drops that column after the softmax. And Gemma 4's KV-shared layers (E2B/E4B) attend
over the (keys, values) of an earlier layer with `cache=None`: once that layer's cache is
quantized they receive quantized triples and upstream hands them to the fp16 kernel
(TypeError). Here triples are recognised by type and attended to quantized, with the
group size and bits read off the packed shapes. Scores and the softmax-weighted sum run
in float32: upstream's bf16 accumulation is ~5x less accurate than the fused fp kernel on
the same dequantized data (max error 0.077 vs 0.015, gemma-3 shapes, 8-bit), which
raised 8-bit KL on gemma-3 from 7e-4 to 0.11. Where the backend's quantized_matmul
rejects strided operands (MLX's CUDA backend), attention reads whole cache buffers
instead of the growing cache's strided views (see `operands`).
Patch file: patches/0003-quantized-attention.patch.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, NamedTuple

import mlx.core as mx
from mlx_lm.models import base

from .. import kernels
from ..caches import kv_format
from ..capability import strided_quantized_matmul
from .base import Fix, Patcher

# The fused 16-bit attention prompt chunks run on dequantized rows; cuda-prefill binds
# its blocked form where the fused kernel would materialize the scores.
fused_attention = mx.fast.scaled_dot_product_attention


class QuantizedOperands(NamedTuple):
    """What attention reads from a quantized cache: the (data, scales, biases) triples of
    keys and values, how they were quantized (`bits`: the keys' width, `value_bits`: the
    values' where it differs), the rows to attend to where the buffers
    hold more (`length`, None: all), and the 16-bit rows after them (`tail`, see
    fixes/quantized_decode_tail.py; anything with key_buffer, value_buffer, rows, keys,
    values and decline())."""

    keys: tuple
    values: tuple
    group_size: int
    bits: int
    length: int | None = None
    tail: Any = None
    value_bits: int | None = None

    @property
    def vbits(self) -> int:
        return self.value_bits or self.bits


def quantized_attention(
    queries: mx.array, ops: QuantizedOperands, scale: float, mask, sinks=None, kernels_on: bool | None = None
) -> mx.array:
    """Attention over quantized keys/values, GQA-aware, with optional sinks.

    The query heads that share a KV head are folded into the query length, so each
    quantized matmul reads the cache once; broadcasting the cache over them instead (as
    upstream does) makes MLX copy the packed keys and values once per query head (a 32K
    gemma-3 decode step peaked at 115 MiB against 72 for fp16). With `ops.length`, only
    the first `length` rows of the keys and values are attended to (the rest is the
    unused tail of a cache buffer): their scores are dropped and their weights are zero.
    Where the device runs custom CUDA kernels (`kernels_on` None: probed), decode reads
    the cache through them and prompt chunks through `dequantized_attention`.
    """
    dtype = queries.dtype
    B, n_q_heads, L, D = queries.shape
    group_size, bits, length = ops.group_size, ops.bits, ops.length
    n_kv_heads = ops.keys[0].shape[-3]
    n_repeats = n_q_heads // n_kv_heads
    kernels_on = kernels.available() if kernels_on is None else kernels_on
    if kernels_on and L == 1:
        out = _flash(queries, ops, scale, mask, sinks)
        if out is not None:
            return out
    if kernels_on and not kernels.supports(n_repeats * L, D, bits, group_size, ops.vbits):
        return dequantized_attention(queries, ops, scale, mask, sinks)
    queries = mx.reshape(_float32(queries) * scale, (B, n_kv_heads, n_repeats * L, D))
    if kernels_on:
        scores = kernels.scores(queries, ops.keys, group_size, bits)
    else:
        scores = mx.quantized_matmul(
            queries, *_float32_triple(ops.keys), transpose=True, group_size=group_size, bits=bits
        )
    scores = mx.reshape(scores, (B, n_kv_heads, n_repeats, L, -1))
    rows = scores.shape[-1]
    if length is not None:
        scores = scores[..., :length]
    scores = _apply_mask(scores, mask)
    if sinks is not None:
        sink = sinks.astype(scores.dtype).reshape((n_kv_heads, n_repeats, 1, 1))
        sink = mx.broadcast_to(sink, scores.shape[:-1] + (1,))
        scores = mx.concatenate([scores, sink], axis=-1)
    probs = mx.softmax(scores, axis=-1, precise=True)
    if sinks is not None:
        probs = probs[..., :-1]
    if length is not None:
        probs = mx.pad(probs, [(0, 0)] * 4 + [(0, rows - length)])
    probs = mx.reshape(probs, (B, n_kv_heads, n_repeats * L, -1))
    if kernels_on:
        out = kernels.weighted_sum(probs, ops.values, group_size, ops.vbits)
    else:
        out = mx.quantized_matmul(
            probs, *_float32_triple(ops.values), transpose=False, group_size=group_size, bits=ops.vbits
        )
    return mx.reshape(out, (B, n_q_heads, L, -1)).astype(dtype)


def _flash(queries, ops: QuantizedOperands, scale, mask, sinks):
    """One-query attention through `kernels.flash_decode`, or None where the shape,
    length or mask is one it does not take."""
    B, n_q_heads, _, D = queries.shape
    H = ops.keys[0].shape[-3]
    T = ops.length or ops.keys[0].shape[-2]
    n = 0 if ops.tail is None else ops.tail.rows
    plan = kernels.flash_plan(n_q_heads // H, D, ops.bits, ops.group_size, B * H, T, n, ops.vbits)
    if plan is None:
        return None
    decode_mask = _decode_mask(mask, B, T + n)
    if decode_mask is False:
        return None
    memo = getattr(ops.tail, "memo", None)
    if memo is not None and decode_mask is None and sinks is None:  # for the block's next steps
        flags = (False, False, True, getattr(ops.tail, "incoming", None) is not None)  # a tail only
        decoder = kernels.flash_decoder(queries, ops, T, scale, flags)
        memo[_decoder_key(queries, scale)] = decoder
        return decoder(queries, tail=ops.tail)
    return kernels.flash_decode(
        queries,
        ops.keys,
        ops.values,
        scale,
        ops.group_size,
        ops.bits,
        T,
        decode_mask,
        sinks,
        ops.tail,
        ops.vbits,
    )


def dequantized_attention(
    queries: mx.array, ops: QuantizedOperands, scale: float, mask, sinks=None
) -> mx.array:
    """The fused 16-bit kernel on dequantized keys and values (and the 16-bit tail rows
    after them): for prompt chunks on CUDA, and decode steps the flash kernel cannot take.

    Only the first `length` rows are dequantized (a prompt batch's buffer is reserved for
    the whole prompt, fixes/prefill_reserve.py), into contiguous arrays the fused kernel
    reads as they are. A chunk of L queries pays the dequantization once for L rows of
    output; on an H100 quantized_matmul prefilled a 4K prompt of a Llama-3.1-8B shape at
    95 tok/s against 39K for 16 bits (benchmarks/kv_speed.py).
    """
    keys, values = ops.keys, ops.values
    if ops.length is not None:  # only the rows written: a reserved buffer may be mostly empty
        keys, values = (tuple(x[..., : ops.length, :] for x in t) for t in (keys, values))
    k = mx.dequantize(*keys, group_size=ops.group_size, bits=ops.bits).astype(queries.dtype)
    v = mx.dequantize(*values, group_size=ops.group_size, bits=ops.vbits).astype(queries.dtype)
    if ops.tail is not None:
        k = mx.concatenate([k, ops.tail.keys.astype(k.dtype)], axis=-2)
        v = mx.concatenate([v, ops.tail.values.astype(v.dtype)], axis=-2)
    return fused_attention(queries, k, v, scale=scale, mask=mask, sinks=sinks)


def _decode_mask(mask, batch: int, length: int):
    """A one-query mask as the flash kernel reads it: None (no mask), additive float32
    (batch or 1, length), or False where it has another shape (per-head masks).

    A model passes one mask to every layer of a step (a batch's left padding): it is
    converted once, not once a layer (three ops, ~20 us of dispatch each time on CUDA)."""
    if mask is None or isinstance(mask, str):  # "causal" over one query masks nothing
        return None
    if mask.shape[-1] != length or mask.size != mask.shape[0] * length or mask.shape[0] not in (1, batch):
        return False
    if _LAST_MASK[0] is mask:
        return _LAST_MASK[1]
    rows = mx.reshape(mask, (mask.shape[0] if mask.ndim > 2 else 1, length))
    if rows.dtype == mx.bool_:
        rows = mx.where(rows, 0.0, -mx.inf)
    _LAST_MASK[:] = [mask, rows.astype(mx.float32)]  # holding the mask: no other takes its id
    return _LAST_MASK[1]


_LAST_MASK: list = [None, None]  # the last mask _decode_mask converted, and its conversion


def _float32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def _float32_triple(t):
    """Scores and sums in float32: in bf16 they lose ~5x the accuracy of the fp kernel."""
    return (t[0], *(_float32(x) for x in t[1:]))


def _apply_mask(scores, mask):
    """scores: (B, kv_heads, repeats, L, T); mask: "causal", (L, T) or (B, heads, L, T)."""
    if mask is None:
        return scores
    if isinstance(mask, str):
        q_len, k_len = scores.shape[-2:]
        mask = mx.arange(k_len - q_len, k_len)[:, None] >= mx.arange(k_len)[None]
    if mask.ndim > 3:
        mask = mx.expand_dims(mask, -3)
    if mask.dtype == mx.bool_:
        return mx.where(mask, scores, mx.finfo(scores.dtype).min)
    return scores + mask


def packed_params(queries: mx.array, q_keys, q_values=None) -> tuple[int, int, int]:
    """(group_size, key bits, value bits) of quantized (data, scales, biases) triples."""
    dim = queries.shape[-1]
    group_size = dim // q_keys[1].shape[-1]
    bits = q_keys[0].shape[-1] * 32 // dim
    if q_values is None:
        return group_size, bits, bits
    return group_size, bits, q_values[0].shape[-1] * 32 // (q_values[1].shape[-1] * group_size)


def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
    """mlx_lm.models.base.scaled_dot_product_attention for every quantized case.

    A rotated cache (caches/kv_format.py) holds H·k: the queries are rotated with it, so
    the scores are q·k; with rotated values the output is H·o, rotated back (H = H⁻¹).
    """
    decoder = _block_decoder(queries, keys, scale, mask, sinks)
    if decoder is not None:
        rotate = keys.rotate
        out = decoder(kv_format.hadamard(queries) if rotate else queries, tail=keys.tail)
        return kv_format.hadamard(out) if rotate == "all" else out
    if hasattr(cache, "bits"):
        group_size, bits, vbits = cache.group_size, cache.bits, kv_format.value_bits(cache)
        rotate = kv_format.rotation(cache)
    elif isinstance(keys, (tuple, list)):  # shared from a quantized layer, no cache here
        group_size, bits, vbits = packed_params(queries, keys, values)
        rotate = getattr(keys, "rotate", None)
    else:
        original = FIX.original(base, "scaled_dot_product_attention")
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    if rotate is not None:
        queries = kv_format.hadamard(queries)
    tail = getattr(keys, "tail", None)  # 16-bit rows after the quantized ones (decode tail)
    if tail is not None:
        views = QuantizedOperands(keys, values, group_size, bits, tail=tail, value_bits=vbits)
        out = _tail_attention(queries, views, cache, scale, mask, sinks)
    else:
        ops = operands(keys, values, cache, group_size, bits)._replace(value_bits=vbits)
        out = quantized_attention(queries, ops, scale, mask, sinks)
    return kv_format.hadamard(out) if rotate == "all" else out


def _block_decoder(queries, keys, scale, mask, sinks):
    """The flash launch an earlier step made for these quantized views (`_flash`), where
    this step is one query with no mask or sinks: a decode tail's block of steps reads
    the same views, and the checks that chose the kernel hold for all of them."""
    tail = getattr(keys, "tail", None)
    memo = None if tail is None else tail.memo
    if not memo or mask is not None or sinks is not None:
        return None
    decoder = memo.get(_decoder_key(queries, scale))
    return None if decoder is None or decoder.stale else decoder


def _decoder_key(queries: mx.array, scale: float) -> tuple:
    return queries.shape, queries.dtype, scale


def _tail_attention(queries, views: QuantizedOperands, cache, scale, mask, sinks):
    """Attention over quantized rows and the 16-bit tail after them.

    The flash kernel reads the triples' views (made once a block by the cache) and the
    tail's buffers in place, so a decode step adds no slice, copy or probe to the graph.
    Where it does not take the shape, the tail is handed back (the cache quantizes every
    token from then on) and this step dequantizes.
    """
    stale = getattr(views.tail, "mask", None)  # a ring's rows the tail replaces
    if stale is not None:
        if mask is not None:  # a window inside the ring (rare): read the ring as stored
            return _flushed_attention(queries, views, scale, mask, sinks)
        mask = stale
    kernels_on = kernels.available()
    if kernels_on and queries.shape[2] == 1:
        out = _flash(queries, views, scale, mask, sinks)
        if out is not None:
            return out
    if kernels_on:
        views.tail.decline()
    if stale is not None:
        mask = stale.astype(queries.dtype)  # the fused kernel takes the queries' type
    ops = operands(views.keys, views.values, cache, views.group_size, views.bits)
    ops = ops._replace(tail=views.tail, value_bits=views.value_bits)
    return dequantized_attention(queries, ops, scale, mask, sinks)


def _flushed_attention(queries, views: QuantizedOperands, scale, mask, sinks):
    """Attention over a ring whose tail is quantized into it first (and handed back):
    for a model mask over the ring's rows alone, which the tail's rows are not in."""
    cache = views.tail.owner()
    cache.decline_tail()
    keys, values = cache.keys, cache.values  # the pending rows written into the ring
    ops = operands(keys, values, cache, views.group_size, views.bits)._replace(value_bits=views.value_bits)
    return quantized_attention(queries, ops, scale, mask, sinks)


def operands(keys, values, cache, group_size: int, bits: int) -> QuantizedOperands:
    """The operands in a layout the backend's quantized_matmul accepts.

    A growing quantized cache returns `buffer[..., :offset, :]`, a view strided along
    the heads. Where quantized_matmul rejects strided operands (probed once) or the
    CUDA kernels read the cache (they take contiguous rows), attention reads the whole
    buffer and keeps the first `length` rows: at most one growth step (255 rows) of
    extra work, where copying the views would rewrite the whole cache each step. KV
    shared from another layer comes with no buffer here and is copied.
    """
    strided = strided_quantized_matmul()
    full, full_values = stored_buffers(cache)
    whole = isinstance(full, (tuple, list)) and full[0].shape[-2] >= keys[0].shape[-2]
    if whole and (not strided or kernels.available()):
        rows = keys[0].shape[-2]
        length = rows if rows < full[0].shape[-2] else None
        return QuantizedOperands(tuple(full), tuple(full_values), group_size, bits, length)
    if strided:
        return QuantizedOperands(keys, values, group_size, bits)
    keys, values = tuple(map(mx.contiguous, keys)), tuple(map(mx.contiguous, values))
    return QuantizedOperands(keys, values, group_size, bits)


def stored_buffers(cache) -> tuple[Any, Any]:
    """A cache's quantized (keys, values) buffers as stored, without flushing anything:
    the decode tail's `stored_buffers()` where installed, else its attributes."""
    if cache is None:
        return None, None
    stored = getattr(cache, "stored_buffers", None)
    if stored is not None:
        return stored()
    return getattr(cache, "keys", None), getattr(cache, "values", None)


def _model_modules() -> list[str]:
    """Model modules with sinks or shared KV: they hold their own binding of the function."""
    from mlx_lm import models

    folder = Path(models.__file__).parent
    return [
        f"mlx_lm.models.{p.stem}"
        for p in sorted(folder.glob("*.py"))
        if p.stem != "base" and any(s in p.read_text() for s in ("sinks=", "shared_kv"))
    ]


class QuantizedAttention(Fix):
    name = "quantized-attention"
    summary = "quantized attention: sinks (gpt-oss), shared quantized KV (gemma-4), fp32 scores"

    def needed(self) -> bool:
        from mlx_lm.models.cache import KVCache

        if base.scaled_dot_product_attention is scaled_dot_product_attention:
            return False
        cache = KVCache()
        x = mx.zeros((1, 1, 1, 64))
        cache.update_and_fetch(x, x)
        q = cache.to_quantized(group_size=64, bits=8)
        k, v = q.keys, q.values
        try:
            base.scaled_dot_product_attention(x, k, v, q, scale=1.0, mask=None, sinks=mx.zeros((1,)))
            base.scaled_dot_product_attention(x, k, v, None, scale=1.0, mask=None)
        except (ValueError, TypeError):
            return True
        return False

    def install(self, patcher: Patcher) -> None:
        for name in _model_modules():
            importlib.import_module(name)
        patcher.rebind(base.scaled_dot_product_attention, scaled_dot_product_attention)


FIX = QuantizedAttention()
