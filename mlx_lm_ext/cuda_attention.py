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
through `flash_decode` instead: one pass per chunk of tokens with a running max and sum
(lane per token for the scores, so no cross-lane reduction per token), which took 32K
8-bit decode from 0.49x to 0.58x of 16-bit and 4-bit from 0.59x to 0.73x (kv_speed.py).
Whether the device runs CUDA kernels, and runs these correctly, is probed once
(`available`).
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
    constexpr unsigned int QM = (1u << BITS) - 1u;
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

# Which chunk of which (batch, KV head) this block takes, and this warp's tokens in it.
_CHUNK = """
    const int C = n[2];
    if ((long)blockIdx.x >= (long)n[1] * C) return;
    const long bh = blockIdx.x / C;
    const int c = blockIdx.x - bh * C;
    const int wib = threadIdx.x >> 5;
    const int t_begin = (c * WARPS + wib) * TPW;
    const int t_end = min(T, t_begin + TPW);
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
"""
    + _CHUNK
    + """
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


# Flash decoding: one pass over K and V per chunk of tokens with a running max and sum
# (online softmax), the mask and the valid length folded in; `_COMBINE` merges the
# chunks and adds the sinks. Two launches where scores/softmax/weighted_sum take ~12 ops.
_FLASH = (
    _HEAD
    + """
    __shared__ float qs[R * D];
    __shared__ float pm[WARPS][R];
    __shared__ float pl[WARPS][R];
    __shared__ float pacc[WARPS][R * D];
"""
    + _CHUNK
    + """
    const int heads = n[3];
    const int has_mask = n[4];
    const int TB = n[5];
    const float* mrow = mask + (bh / heads) * (long)n[6];
    for (int k = threadIdx.x; k < R * D; k += blockDim.x) qs[k] = q[bh * R * D + k];
    __syncthreads();
    float acc[R][DPL];
    float m[R];
    float l[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = -INFINITY;
        l[r] = 0.f;
        #pragma unroll
        for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
    }
    for (int t0 = t_begin; t0 < t_end; t0 += 32) {
        // Scores: each lane takes one token whole (no reduction across lanes).
        const int t = min(t0 + lane, t_end - 1);
        const float bias = (t0 + lane >= t_end) ? -INFINITY : (has_mask ? mrow[t] : 0.f);
        float sc[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) sc[r] = 0.f;
        const long row = bh * TB + t;
        #pragma unroll 2
        for (int g = 0; g < NG; ++g) {
            const float gs = static_cast<float>(ks[row * NG + g]);
            const float gb = static_cast<float>(kb[row * NG + g]);
            constexpr int WPG = GS * BITS / 32;  // words per group
            constexpr int VEC = (WPG % 4 == 0) ? 4 : 1;  // 16-byte loads where a group allows
            #pragma unroll
            for (int wv = 0; wv < WPG / VEC; ++wv) {
                unsigned int words[VEC];
                if (VEC == 4) {
                    const uint4 w4 = reinterpret_cast<const uint4*>(kw + row * WPR + g * WPG)[wv];
                    words[0] = w4.x;
                    words[VEC > 1 ? 1 : 0] = w4.y;
                    words[VEC > 2 ? 2 : 0] = w4.z;
                    words[VEC > 3 ? 3 : 0] = w4.w;
                } else {
                    words[0] = kw[row * WPR + g * WPG + wv];
                }
                #pragma unroll
                for (int x = 0; x < VEC; ++x) {
                    #pragma unroll
                    for (int u = 0; u < 32 / BITS; ++u) {
                        const int e = g * GS + (wv * VEC + x) * (32 / BITS) + u;
                        const float kval = static_cast<float>((words[x] >> (u * BITS)) & QM) * gs + gb;
                        #pragma unroll
                        for (int r = 0; r < R; ++r) sc[r] += qs[r * D + e] * kval;
                    }
                }
            }
        }
        float p[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            const float s_ = bias == -INFINITY ? -INFINITY : sc[r] + bias;
            float gmax = s_;
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) gmax = fmaxf(gmax, __shfl_xor_sync(0xffffffff, gmax, off));
            const float m_new = fmaxf(m[r], gmax);
            const float shrink = (m_new == -INFINITY) ? 1.f : __expf(m[r] - m_new);
            p[r] = (s_ == -INFINITY) ? 0.f : __expf(s_ - m_new);
            float psum = p[r];
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) psum += __shfl_xor_sync(0xffffffff, psum, off);
            l[r] = l[r] * shrink + psum;
            m[r] = m_new;
            #pragma unroll
            for (int i = 0; i < DPL; ++i) acc[r][i] *= shrink;
        }
        // Values: lanes take dims again; each token's weights come from its lane.
        const int count = min(32, t_end - t0);
        #pragma unroll 4
        for (int j = 0; j < count; ++j) {
            const long vrow = bh * TB + t0 + j;
            const float vs_ = static_cast<float>(vs[vrow * NG + d0 / GS]);
            const float vb_ = static_cast<float>(vb[vrow * NG + d0 / GS]);
            float v[DPL];
            #pragma unroll
            for (int i = 0; i < DPL; ++i) {
                const int e = d0 + i;
                const unsigned int word = vw[vrow * WPR + (e * BITS) / 32];
                v[i] = static_cast<float>((word >> ((e * BITS) % 32)) & ((1u << BITS) - 1u)) * vs_ + vb_;
            }
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const float pj = __shfl_sync(0xffffffff, p[r], j);
                #pragma unroll
                for (int i = 0; i < DPL; ++i) acc[r][i] += pj * v[i];
            }
        }
    }
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        if (lane == 0) {
            pm[wib][r] = m[r];
            pl[wib][r] = l[r];
        }
        #pragma unroll
        for (int i = 0; i < DPL; ++i) pacc[wib][r * D + d0 + i] = acc[r][i];
    }
    __syncthreads();
    for (int k = threadIdx.x; k < R * D; k += blockDim.x) {
        const int r = k / D;
        float mx_ = -INFINITY;
        #pragma unroll
        for (int u = 0; u < WARPS; ++u) mx_ = fmaxf(mx_, pm[u][r]);
        float sum = 0.f, lsum = 0.f;
        #pragma unroll
        for (int u = 0; u < WARPS; ++u) {
            const float w8 = pm[u][r] == -INFINITY ? 0.f : __expf(pm[u][r] - mx_);
            sum += pacc[u][k] * w8;
            lsum += pl[u][r] * w8;
        }
        out_acc[(bh * C + c) * R * D + k] = sum;
        if (k % D == 0) {
            out_m[(bh * C + c) * R + r] = mx_;
            out_l[(bh * C + c) * R + r] = lsum;
        }
    }
"""
)

_COMBINE = """
    const long k = (long)blockIdx.x * blockDim.x + threadIdx.x;
    const int C = n[0];
    const int RD = n[1];
    const int D = n[2];
    const int heads_q = n[3];
    const int R = RD / D;
    if (k >= (long)n[4] * RD) return;
    const long bh = k / RD;
    const int r = (k - bh * RD) / D;
    float mx_ = -INFINITY;
    for (int c = 0; c < C; ++c) mx_ = fmaxf(mx_, m[(bh * C + c) * R + r]);
    const float sink = n[5] ? sinks[(bh * R + r) % heads_q] : -INFINITY;
    mx_ = fmaxf(mx_, sink);
    float sum = 0.f, lsum = n[5] ? __expf(sink - mx_) : 0.f;
    for (int c = 0; c < C; ++c) {
        const float mc = m[(bh * C + c) * R + r];
        const float w8 = mc == -INFINITY ? 0.f : __expf(mc - mx_);
        sum += acc[(bh * C + c) * RD + (k - bh * RD)] * w8;
        lsum += l[(bh * C + c) * R + r] * w8;
    }
    out[k] = lsum > 0.f ? sum / lsum : 0.f;
"""


@functools.cache
def _kernel(name: str) -> object:
    if name == "flash":
        return mx.fast.cuda_kernel(
            name="mlx_lm_ext_qattn_flash",
            input_names=["q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "n"],
            output_names=["out_acc", "out_m", "out_l"],
            source=_FLASH,
        )
    if name == "combine":
        return mx.fast.cuda_kernel(
            name="mlx_lm_ext_qattn_combine",
            input_names=["acc", "m", "l", "sinks", "n"],
            output_names=["out"],
            source=_COMBINE,
        )
    source, first = {"scores": (_SCORES, "q"), "weighted": (_WEIGHTED, "p")}[name]
    return mx.fast.cuda_kernel(
        name=f"mlx_lm_ext_qattn_{name}",
        input_names=[first, "w", "s", "b", "n"],
        output_names=["out"],
        source=source,
    )


FLASH_TOKENS_PER_WARP = 64  # two rounds of one token per lane


def flash_decode(queries, q_keys, q_values, group_size: int, bits: int, length: int, mask=None, sinks=None):
    """softmax(q·kᵀ + mask, sinks)·v for queries (B, H, R, D) float32, already scaled, over
    the first `length` rows of whole quantized buffers (B, H, T_buf, .). `mask`: None or
    additive float32 (B or 1, length); `sinks`: (H * R,) logits, or None."""
    B, H, R, D = queries.shape
    tb = q_keys[0].shape[-2]
    per_block = WARPS * FLASH_TOKENS_PER_WARP
    C = max(1, (length + per_block - 1) // per_block)
    mask_arr = mx.zeros((1,), mx.float32) if mask is None else mask
    stride = length if mask is not None and mask.shape[0] > 1 else 0  # (1, length): all rows
    params = [length, B * H, C, H, int(mask is not None), tb, stride]
    acc, run_max, run_sum = _kernel("flash")(
        inputs=[queries, *q_keys, *q_values, mask_arr, mx.array(params, mx.int32)],
        template=_template(R, D, bits, group_size, TPW=FLASH_TOKENS_PER_WARP, WARPS=WARPS),
        grid=(B * H * C * WARPS * 32, 1, 1),
        threadgroup=(WARPS * 32, 1, 1),
        output_shapes=[(B * H * C * R * D,), (B * H * C * R,), (B * H * C * R,)],
        output_dtypes=[mx.float32] * 3,
    )
    total = B * H * R * D
    sink_arr = mx.zeros((1,), mx.float32) if sinks is None else sinks.astype(mx.float32)
    params = [C, R * D, D, H * R, B * H, int(sinks is not None)]
    (out,) = _kernel("combine")(
        inputs=[acc, run_max, run_sum, sink_arr, mx.array(params, mx.int32)],
        grid=(total, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(B, H, R, D)],
        output_dtypes=[mx.float32],
    )
    return out


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
        want = exact_attention(q, qk, qv, 64, 8)
        got = weighted_sum(mx.softmax(scores(q, qk, 64, 8), axis=-1), qv, 64, 8)
        flash = flash_decode(q, qk, qv, 64, 8, 300)
        error = max(mx.abs(got - want).max().item(), mx.abs(flash - want).max().item())
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
