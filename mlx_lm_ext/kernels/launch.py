"""Decode attention over a quantized cache as custom kernels, where MLX runs CUDA kernels.

Measured on an H100 (mlx 0.32.4, benchmarks/attention_paths.py, 32 query heads on 8 KV
heads x 128, 32K tokens, 8-bit): the 16-bit fused kernel takes 0.15 ms per layer, while
`quantized_matmul` takes 1.17 ms on whole buffers (it has no kernel for the strided views
a growing cache returns) and dequantize-then-fused 0.69 ms. Decode reads the cache once
per step and does almost no arithmetic, so both lose to a kernel that dequantizes while
it reads: `scores` gives every (KV head, token) one warp whose lanes each take D/32 dims
of the packed row (one coalesced read), and `weighted_sum` gives every (KV head, chunk of
tokens) one warp that accumulates the probability-weighted rows. Scores, the softmax and
the sum stay in float32, as in `fixes.quantized_attention`. One-query decode steps go
through `flash_decode` instead: one launch per layer that reads each row once, scores
a chunk into shared memory, then sums its weighted rows, and merges the chunks in the
block that finishes last; it also reads a cache's 16-bit decode tail
(fixes/quantized_decode_tail.py) as one chunk more; a tail's block of steps reuses the
launch its first step made (`FlashDecoder`). Its scores and sums run on tensor
cores where the GPU and shape allow (plan.flash_tensor_cores): on the H200, 8 requests
at 32K tokens, 8-bit, 229 us a layer against 313 on CUDA cores and 283 for the 16-bit
fused kernel. On MLX's CUDA backend every op a decode step adds costs ~7 us of
dispatch per layer (measured: a custom kernel, an add and a zeros+add all take 6-10 us
each), so the flash path also leaves casts, reshapes, a second pass, parameter uploads
and counter zeroing out of the graph. Figures: benchmarks/README.md. Sources: the .cu and
.cuh files here; launch planning: plan.py.
Whether the device runs CUDA kernels, and runs these correctly, is probed once
(`available`).
"""

from __future__ import annotations

import functools
import logging
import struct
from typing import Any, NamedTuple

import mlx.core as mx

from . import plan


class TailWrites:
    """A tail's rows on their way into its buffers. `row`: the newest (keys, values) that
    nothing has written yet; `kernel`: the output of the last flash launch that wrote one.
    MLX orders ops by the arrays they read, and a launch's writes into its inputs are not
    among them: a later reader of the buffers (the next launch, a flush) takes `kernel`
    as an input too, or waits on it (`mx.depends`)."""

    __slots__ = ("row", "kernel")

    def __init__(self) -> None:
        self.row: tuple | None = None
        self.kernel: mx.array | None = None


class TailRows(NamedTuple):
    """16-bit rows after the quantized ones: the first `rows` rows of each buffer, or with
    `incoming` (this step's (keys, values), each (B, H, 1, D)) the first `rows` - 1 and
    then it: the launch writes it into the buffers' next row and records itself in
    `writes` (a TailWrites)."""

    key_buffer: mx.array
    value_buffer: mx.array
    rows: int
    incoming: tuple | None = None
    writes: TailWrites | None = None


log = logging.getLogger("mlx_lm_ext")


@functools.cache
def _kernel(name: str) -> object:
    first = {"scores": "q", "weighted": "p"}[name]
    source = plan.source(f"{name}.cu")
    return _custom_kernel(name, [first, "w", "s", "b", "n"], ["out"], source)


@functools.cache
def _flash_kernel(R, D, bits, value_bits, group_size, per_lane, warps, scale, flags, dtype) -> object:
    """The flash kernel with its constants written into its source: a call then passes
    no template (converting and hashing one costs a few us a layer a step)."""
    has_mask, has_sinks, has_tail, has_new = flags
    constants = (
        *plan.template(
            R, D, bits, group_size, VPL=per_lane, WARPS=warps, SMEM=plan.FLASH_SMEM, U=plan.FLASH_UNROLL
        ),
        ("VBITS", value_bits),
        ("MMA", plan.flash_tensor_cores(R, D, bits, group_size)),
        ("MMA_V", plan.flash_tensor_core_values(D, value_bits, group_size)),
        ("SCALE", struct.unpack("i", struct.pack("f", scale))[0]),
        ("HAS_MASK", has_mask),
        ("HAS_SINKS", has_sinks),
        ("HAS_TAIL", has_tail),
        ("HAS_NEW", has_new),
        ("OutT", dtype),
    )
    absent = tuple(name for name, on in zip(("mask", "sinks", "tail", "new"), flags, strict=True) if not on)
    source = plan.flash_source(constants, absent)
    inputs = ["q", "kw", "ks", "kb", "vw", "vs", "vb", *flash_inputs(flags)]
    # ensure_row_contiguous False: strided queries and cache views are read in place
    return _custom_kernel("flash", inputs, ["out", "parts", "count_out"], source, ensure_row_contiguous=False)


def flash_inputs(flags: tuple[bool, bool, bool, bool]) -> list[str]:
    """The flash kernel's inputs after the queries and quantized arrays, for whether a
    launch passes a mask, sinks, a tail (tk, tv and tn: its rows as a shape) and the
    tail's incoming row (kn, vn and prev: the last launch that wrote a row, never read)."""
    has_mask, has_sinks, has_tail, has_new = flags
    return [
        *(["mask"] if has_mask else []),
        *(["sinks"] if has_sinks else []),
        "count",
        *(["tk", "tv", "tn"] if has_tail else []),
        *(["kn", "vn", "prev"] if has_new else []),
    ]


def _custom_kernel(name: str, inputs: list, outputs: list, source: str, **options) -> object:
    """A kernel named for its source's digest: MLX caches compiled kernels on disk by name
    alone (MLX_PTX_CACHE_DIR), so a kernel changed by an upgrade must not reuse it."""
    return mx.fast.cuda_kernel(
        name=plan.kernel_name(name, source),
        input_names=inputs,
        output_names=outputs,
        source=source,
        header=plan.header(),
        **options,
    )


def flash_decode(
    queries: mx.array,
    q_keys: tuple,
    q_values: tuple,
    scale: float,
    group_size: int,
    bits: int,
    length: int,
    mask: mx.array | None = None,
    sinks: mx.array | None = None,
    tail: TailRows | None = None,
    value_bits: int | None = None,
) -> mx.array:
    """softmax(scale·q·kᵀ + mask, sinks)·v for one query per head, queries (B, H·R, 1, D)
    (any float dtype, the output's; R query heads per KV head), over the first `length`
    rows of quantized buffers (B, H, T_buf, .) followed by `tail`: None, or the first
    `rows` rows of 16-bit buffers (B, H, T_tail, D) not quantized yet (the decode tail,
    fixes/quantized_decode_tail.py; any object with these three fields, or TailRows'
    five: the last row then comes as `incoming` and the launch writes it). `mask`: None or additive
    float32 (B or 1, length + n); `sinks`: (H·R,) logits, or None. The shape must have a
    `flash_plan`. `bits`: the keys' width; `value_bits`: the values' (default: the
    same). One kernel launch (and a slice where the keys hold more than `length`
    rows): no reshapes, casts, second pass or parameter upload as separate ops, which on
    MLX's CUDA backend cost more per layer than the kernel at 4K tokens (each ~7-10 us of
    dispatch; the kernel reads its sizes from the arrays' shapes and strides instead)."""
    flags = (mask is not None, sinks is not None, tail is not None, _incoming(tail) is not None)
    packed = Packed(q_keys, q_values, group_size, bits, value_bits)
    return flash_decoder(queries, packed, length, scale, flags)(queries, mask, sinks, tail)


class Packed(NamedTuple):
    """Quantized keys and values as the flash kernel reads them: (data, scales, biases)
    triples and how they were packed (`value_bits`: None, the keys' `bits`)."""

    keys: tuple
    values: tuple
    group_size: int
    bits: int
    value_bits: int | None = None


class FlashDecoder(NamedTuple):
    """`flash_decode` made for one layer's quantized rows: the kernel, its launch and the
    inputs that hold still (the quantized arrays), so that a step calls the kernel with
    only the queries, the mask, the sinks and the tail. A decode tail's block (64 steps)
    reads the same views: made on its first step, it spares the other 63 the lookups and
    checks (on the H200 the dispatch and glue took ~6 us a layer a step, the kernel
    call ~5.6)."""

    kernel: Any
    spec: dict
    quantized: list  # keys' (data, scales, biases), then the values'
    batch_heads: int
    generation: int  # forget_plans' count when made: a decoder made before is stale

    def __call__(self, queries: mx.array, mask=None, sinks=None, tail=None) -> mx.array:
        """A call passes what the decoder was made for (`flash_decoder`'s flags): MLX
        rejects a call with more or fewer inputs than the kernel's."""
        inputs = [queries, *self.quantized]
        if mask is not None:
            inputs.append(mask)
        if sinks is not None:
            inputs.append(sinks.astype(mx.float32))
        inputs.append(_counter(self.batch_heads))
        if tail is not None:  # tn's shape carries the tail's rows
            inputs += (tail.key_buffer, tail.value_buffer, _sized(tail.rows + 1))
            incoming, writes = _incoming(tail), getattr(tail, "writes", None)
            if incoming is not None:  # prev: the last launch that wrote a row, or any array
                last = None if writes is None else writes.kernel
                inputs += (*incoming, tail.key_buffer if last is None else last)
        out, _, _COUNTERS[self.batch_heads] = self.kernel(inputs=inputs, **self.spec)
        if tail is not None and incoming is not None and writes is not None:
            writes.row, writes.kernel = None, out
        return out

    @property
    def stale(self) -> bool:
        """Launch plans were forgotten since this was made (`forget_plans`)."""
        return self.generation != _GENERATION[0]


def flash_decoder(
    queries: mx.array, packed: Packed, length: int, scale: float, flags: tuple[bool, bool, bool, bool]
) -> FlashDecoder:
    """The `FlashDecoder` for `flash_decode`'s arguments (`packed`: anything with Packed's
    fields); `flags`: whether its calls pass a mask, sinks, a tail and the tail's
    incoming row (each the same)."""
    q_keys = packed.keys
    B, H = q_keys[0].shape[:2]
    widths = (packed.bits, packed.value_bits or packed.bits)
    shape = (B, H, widths, packed.group_size, length, scale, flags)
    kernel, spec = _flash_call(queries.shape, queries.dtype, *shape)
    keys = q_keys[0] if q_keys[0].shape[-2] == length else q_keys[0][..., :length, :]  # shape = length
    return FlashDecoder(kernel, spec, [keys, *q_keys[1:], *packed.values], B * H, _GENERATION[0])


_GENERATION = [0]  # forget_plans calls so far


def forget_plans() -> None:
    """Drop every remembered launch plan and flash kernel: after plan's constants change
    (a benchmark's or a test's comparison), the next call makes them from the new ones."""
    plan._plan.cache_clear()
    _flash_call.cache_clear()
    _flash_kernel.cache_clear()
    _GENERATION[0] += 1


@functools.lru_cache(maxsize=256)
def _flash_call(q_shape, dtype, B, H, widths, group_size, length, scale, flags) -> tuple:
    """The kernel for a shape and its call's arguments but the inputs, made once: a decode
    step asks for them every layer, and with a tail they change once a block (64 steps);
    without one the length changes every step, and only the grid is made again."""
    R, D = q_shape[1] // H, q_shape[-1]
    bits, value_bits = widths
    per_lane, warps, C = plan.flash_plan(R, D, bits, group_size, B * H, length, int(flags[2]), value_bits)
    C += 1 if flags[2] else 0
    return _flash_kernel(R, D, bits, value_bits, group_size, per_lane, warps, scale, flags, dtype), {
        "grid": (B * H * C * warps * 32, 1, 1),
        "threadgroup": (warps * 32, 1, 1),
        "output_shapes": [q_shape, (B * H * C * R * (D + 2),), (B * H,)],
        "output_dtypes": [dtype, mx.float32, mx.int32],
    }


# The block that finishes a (batch, KV head) last is found by an atomic counter that
# must start at zero. Each call counts on the counter the previous call returned (its
# last blocks write zeros there) and returns the next one: no zeros op a step, and a
# data dependency that keeps two launches from sharing a counter at once (MLX's CUDA
# graphs order nodes only by the buffers they read and write).
_COUNTERS: dict[int, mx.array] = {}


def _counter(batch_heads: int) -> mx.array:
    if batch_heads not in _COUNTERS:
        _COUNTERS[batch_heads] = mx.zeros((batch_heads,), mx.int32)
    return _COUNTERS[batch_heads]


def _incoming(tail: Any) -> tuple | None:
    """A tail's row that the launch writes (TailRows.incoming), or None."""
    return getattr(tail, "incoming", None)


@functools.cache
def _sized(n: int) -> mx.array:
    """An array of n elements, never read: its shape passes n to a kernel without an
    upload op a step (one array per tail length, made once)."""
    return mx.zeros((n,), mx.float32)


def scores(queries: mx.array, q_keys, group_size: int, bits: int) -> mx.array:
    """queries (B, H, R, D) float32 times dequantized keys (B, H, T, ...)ᵀ: (B, H, R, T)."""
    B, H, R, D = queries.shape
    T = q_keys[0].shape[-2]
    warps = B * H * ((T + plan.ROWS_PER_WARP - 1) // plan.ROWS_PER_WARP)
    (out,) = _kernel("scores")(
        inputs=[queries, *q_keys, mx.array([T, B * H], mx.int32)],
        template=plan.template(R, D, bits, group_size, RPW=plan.ROWS_PER_WARP),
        grid=(warps * 32, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, H, R, T)],
        output_dtypes=[mx.float32],
    )
    return out


def weighted_sum(probs: mx.array, q_values, group_size: int, bits: int) -> mx.array:
    """probs (B, H, R, T) float32 times dequantized values (B, H, T, D): (B, H, R, D)."""
    B, H, R, T = probs.shape
    D = q_values[0].shape[-1] * 32 // bits
    per_block = plan.WARPS * plan.TOKENS_PER_WARP
    C = (T + per_block - 1) // per_block
    (out,) = _kernel("weighted")(
        inputs=[probs, *q_values, mx.array([T, B * H, C], mx.int32)],
        template=plan.template(R, D, bits, group_size, TPW=plan.TOKENS_PER_WARP, WARPS=plan.WARPS),
        grid=(B * H * C * plan.WARPS * 32, 1, 1),
        threadgroup=(plan.WARPS * 32, 1, 1),
        output_shapes=[(B, H, C, R, D)],
        output_dtypes=[mx.float32],
    )
    return out.sum(axis=2)


def available() -> bool:
    """Whether the default device runs these kernels, and gets a small problem right."""
    return _probe(str(mx.default_device()))


@functools.cache
def _probe(device: str) -> bool:
    if not hasattr(mx.fast, "cuda_kernel"):
        return False
    key = mx.random.key(0)  # the caller's random state stays as it was
    q = mx.random.normal((1, 2, 4, 128), key=key)
    k, v = mx.random.normal((2, 1, 2, 300, 128), key=mx.random.split(key)[1])
    qk, qv = mx.quantize(k, 64, 8), mx.quantize(v, 64, 8)
    try:
        want = exact_attention(q, qk, qv, 64, 8)
        got = weighted_sum(mx.softmax(scores(q, qk, 64, 8), axis=-1), qv, 64, 8)
        flash = flash_decode(q.reshape(1, 8, 1, 128), qk, qv, 1.0, 64, 8, 300).reshape(q.shape)
        error = max(mx.abs(got - want).max().item(), mx.abs(flash - want).max().item())
    except (RuntimeError, ValueError) as e:  # no CUDA here, or no compiler
        log.debug("no custom CUDA kernels on %s: %s", device, str(e).splitlines()[0])
        return False
    if error > 1e-3:
        log.warning("CUDA quantized attention kernels disagree (%.2g) on %s; unused", error, device)
        return False
    log.info("quantized decode attention uses custom CUDA kernels on %s", device)
    return True


def exact_attention(
    q: mx.array, qk, qv, group_size: int, bits: int, value_bits: int | None = None
) -> mx.array:
    """softmax(q·kᵀ)·v by elementwise products and sums: no TF32 matmul rounds it (~1e-2)."""
    dk = mx.dequantize(*qk, group_size=group_size, bits=bits).astype(mx.float32)
    dv = mx.dequantize(*qv, group_size=group_size, bits=value_bits or bits).astype(mx.float32)
    s = (q[..., :, None, :] * dk[..., None, :, :]).sum(-1)
    return (mx.softmax(s, axis=-1)[..., None] * dv[..., None, :, :]).sum(-2)
