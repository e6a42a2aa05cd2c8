"""Decode attention over a quantized cache as two custom kernels, where MLX runs CUDA kernels.

Measured on an H100 (mlx 0.32.4, benchmarks/attention_paths.py, 32 query heads on 8 KV
heads x 128, 32K tokens, 8-bit): the 16-bit fused kernel takes 0.15 ms per layer, while
`quantized_matmul` takes 1.17 ms on whole buffers (it has no kernel for the strided views
a growing cache returns) and dequantize-then-fused 0.69 ms. Decode reads the cache once
per step and does almost no arithmetic, so both lose to a kernel that dequantizes while
it reads: `scores` gives every (KV head, token) one warp whose lanes each take D/32 dims
of the packed row (one coalesced read), and `weighted_sum` gives every (KV head, chunk of
tokens) one warp that accumulates the probability-weighted rows. Scores, the softmax and
the sum stay in float32, as in `fixes.quantized_attention`. Whether the device runs
CUDA kernels, and runs these correctly, is probed once (`available`).
"""

from __future__ import annotations

import functools
import logging

import mlx.core as mx

log = logging.getLogger("mlx_lm_ext")

MAX_ACCUMULATORS = 32  # query rows x dims per lane held in registers (and shared memory)
ROWS_PER_WARP = 4  # scores: tokens per warp, their loads issued together
TOKENS_PER_WARP = 16  # weighted_sum: tokens per warp; 8 warps a block sum in shared memory
WARPS = 8

_HEAD = """
    constexpr int DPL = D / 32;
    constexpr int WPR = D * BITS / 32;
    constexpr int NG = D / GS;
    const int lane = threadIdx.x & 31;
    const int d0 = lane * DPL;
    const int T = n[0];
"""

# Dequantize dims d0 .. d0+DPL of token `t` (clamped into range) of head `bh` into v.
_LOAD = """
        {
            const long row = bh * T + min(t, T - 1);
            const float sc = static_cast<float>(s[row * NG + d0 / GS]);
            const float bi = static_cast<float>(b[row * NG + d0 / GS]);
            #pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int e = d0 + i;
                const unsigned int word = w[row * WPR + (e * BITS) / 32];
                v[i] = static_cast<float>((word >> ((e * BITS) % 32)) & ((1u << BITS) - 1u)) * sc + bi;
            }
        }
"""

_SCORES = (
    _HEAD
    + """
    const long warp = ((long)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    const long tiles = (T + RPW - 1) / RPW;
    if (warp >= (long)n[1] * tiles) return;
    const long bh = warp / tiles;
    const int t0 = (int)(warp - bh * tiles) * RPW;
    float qr[R][DPL];
    #pragma unroll
    for (int r = 0; r < R; ++r)
        #pragma unroll
        for (int i = 0; i < DPL; ++i) qr[r][i] = q[(bh * R + r) * D + d0 + i];
    float rows[RPW][DPL];
    #pragma unroll
    for (int j = 0; j < RPW; ++j) {
        const int t = t0 + j;
        float* v = rows[j];
"""
    + _LOAD
    + """
    }
    #pragma unroll
    for (int j = 0; j < RPW; ++j) {
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            float acc = 0.f;
            #pragma unroll
            for (int i = 0; i < DPL; ++i) acc += qr[r][i] * rows[j][i];
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, off);
            if (lane == 0 && t0 + j < T) out[(bh * R + r) * T + t0 + j] = acc;
        }
    }
"""
)

_WEIGHTED = (
    _HEAD
    + """
    __shared__ float partial[WARPS][R * D];
    const int C = n[2];
    if ((long)blockIdx.x >= (long)n[1] * C) return;
    const long bh = blockIdx.x / C;
    const int c = blockIdx.x - bh * C;
    const int wib = threadIdx.x >> 5;
    const int t_begin = (c * WARPS + wib) * TPW;
    const int t_end = min(T, t_begin + TPW);
    float acc[R][DPL];
    #pragma unroll
    for (int r = 0; r < R; ++r)
        #pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
    #pragma unroll 4
    for (int t = t_begin; t < t_end; ++t) {
        float v[DPL];
"""
    + _LOAD
    + """
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const float pr = p[(bh * R + r) * T + t];
            #pragma unroll
            for (int i = 0; i < DPL; ++i) acc[r][i] += pr * v[i];
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r)
        #pragma unroll
        for (int i = 0; i < DPL; ++i) partial[wib][r * D + d0 + i] = acc[r][i];
    __syncthreads();
    for (int k = threadIdx.x; k < R * D; k += blockDim.x) {
        float sum = 0.f;
        #pragma unroll
        for (int u = 0; u < WARPS; ++u) sum += partial[u][k];
        out[(bh * C + c) * R * D + k] = sum;
    }
"""
)


@functools.cache
def _kernel(name: str) -> object:
    source, first = {"scores": (_SCORES, "q"), "weighted": (_WEIGHTED, "p")}[name]
    return mx.fast.cuda_kernel(
        name=f"mlx_lm_ext_qattn_{name}",
        input_names=[first, "w", "s", "b", "n"],
        output_names=["out"],
        source=source,
    )


def supports(rows: int, dim: int, bits: int, group_size: int) -> bool:
    """Shapes the kernels handle: whole bytes per lane, rows x dims per lane in registers."""
    return (
        bits in (2, 4, 8)
        and dim % 32 == 0
        and group_size % max(dim // 32, 1) == 0
        and rows * (dim // 32) <= MAX_ACCUMULATORS
    )


def _template(rows: int, dim: int, bits: int, group_size: int, **extra: int) -> list:
    return [("R", rows), ("D", dim), ("BITS", bits), ("GS", group_size), *extra.items()]


def scores(queries: mx.array, q_keys, group_size: int, bits: int) -> mx.array:
    """queries (B, H, R, D) float32 times dequantized keys (B, H, T, ...)ᵀ: (B, H, R, T)."""
    B, H, R, D = queries.shape
    T = q_keys[0].shape[-2]
    warps = B * H * ((T + ROWS_PER_WARP - 1) // ROWS_PER_WARP)
    (out,) = _kernel("scores")(
        inputs=[queries, *q_keys, mx.array([T, B * H], mx.int32)],
        template=_template(R, D, bits, group_size, RPW=ROWS_PER_WARP),
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
    per_block = WARPS * TOKENS_PER_WARP
    C = (T + per_block - 1) // per_block
    (out,) = _kernel("weighted")(
        inputs=[probs, *q_values, mx.array([T, B * H, C], mx.int32)],
        template=_template(R, D, bits, group_size, TPW=TOKENS_PER_WARP, WARPS=WARPS),
        grid=(B * H * C * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
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
        got = weighted_sum(mx.softmax(scores(q, qk, 64, 8), axis=-1), qv, 64, 8)
        error = mx.abs(got - exact_attention(q, qk, qv, 64, 8)).max().item()
    except (RuntimeError, ValueError) as e:  # no CUDA here, or no compiler
        log.debug("mlx_lm_ext: no custom CUDA kernels on %s: %s", device, str(e).splitlines()[0])
        return False
    if error > 1e-3:
        log.warning(
            "mlx_lm_ext: CUDA quantized attention kernels disagree (%.2g) on %s; unused", error, device
        )
        return False
    log.info("mlx_lm_ext: quantized decode attention uses custom CUDA kernels on %s", device)
    return True


def exact_attention(q: mx.array, qk, qv, group_size: int, bits: int) -> mx.array:
    """softmax(q·kᵀ)·v by elementwise products and sums: no TF32 matmul rounds it (~1e-2)."""
    dk, dv = (mx.dequantize(*t, group_size=group_size, bits=bits).astype(mx.float32) for t in (qk, qv))
    s = (q[..., :, None, :] * dk[..., None, :, :]).sum(-1)
    return (mx.softmax(s, axis=-1)[..., None] * dv[..., None, :, :]).sum(-2)
