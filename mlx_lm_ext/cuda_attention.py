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
through `flash_decode` instead: one launch per layer that reads each row once, keeps a
running max and sum, and merges its chunks in the block that finishes last. On MLX's
CUDA backend every op a decode step adds costs ~7 us of dispatch per layer (measured:
a custom kernel, an add and a zeros+add all take 6-10 us each), so the flash path also
leaves the casts, reshapes and second pass out of the graph. Figures: README "CUDA
backend".
Whether the device runs CUDA kernels, and runs these correctly, is probed once
(`available`).
"""

from __future__ import annotations

import functools
import logging
import struct

import mlx.core as mx

log = logging.getLogger("mlx_lm_ext")

MAX_ACCUMULATORS = 32  # query rows x dims per lane held in registers (and shared memory)
ROWS_PER_WARP = 4  # scores: tokens per warp, their loads issued together
TOKENS_PER_WARP = 16  # weighted_sum: tokens per warp; 8 warps a block sum in shared memory
WARPS = 8

# Device helpers every kernel here is compiled with.
_PACKED = """
// One cache row's share for a lane: packed words of K and V, their group's scales and
// biases, and the mask's bias for the row (-inf past the valid length).
template <int NW>
struct Row {
    unsigned int k[NW];
    unsigned int v[NW];
    float ks, kb, vs, vb, bias;
};

// NW consecutive 32-bit words in one load (16, 8 or 4 bytes: rows are aligned to them).
template <int NW>
__device__ __forceinline__ void load_words(unsigned int* dst, const unsigned int* src) {
    if (NW == 4) {
        const uint4 w = *reinterpret_cast<const uint4*>(src);
        dst[0] = w.x; dst[NW > 1 ? 1 : 0] = w.y; dst[NW > 2 ? 2 : 0] = w.z; dst[NW > 3 ? 3 : 0] = w.w;
    } else if (NW == 2) {
        const uint2 w = *reinterpret_cast<const uint2*>(src);
        dst[0] = w.x; dst[NW > 1 ? 1 : 0] = w.y;
    } else {
        dst[0] = src[0];
    }
}

// The u-th BITS-bit integer of `word` as a float: mantissa bits under 2^23, minus 2^23.
template <int BITS>
__device__ __forceinline__ float packed(unsigned int word, int u) {
    return __uint_as_float(0x4B000000u | ((word >> (u * BITS)) & ((1u << BITS) - 1u))) - 8388608.f;
}
"""

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
                v[i] = packed<BITS>(w[row * WPR + (e * BITS) / 32], e % (32 / BITS)) * sc + bi;
            }
        }
"""

# Which chunk of which (batch, KV head) this block takes, and this warp's `tpw` tokens in
# it; n[1] is batch x KV heads and n[2] the chunks per head.
_CHUNK = """
    const int C = n[2];
    if ((long)blockIdx.x >= (long)n[1] * C) return;
    const long bh = blockIdx.x / C;
    const int c = blockIdx.x - bh * C;
    const int wib = threadIdx.x >> 5;
    const int t_begin = (c * WARPS + wib) * tpw;
    const int t_end = min(T, t_begin + tpw);
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
    const int tpw = TPW;
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
# (online softmax), the mask and the valid length folded in; the block that finishes a
# (batch, KV head) last merges its chunks and adds the sinks. A warp reads TS whole rows
# at once, LPR lanes a row and VPL dims a lane (one coalesced load of the packed words),
# so each lane keeps only its dims of the queries and of the output. Each of the TS row
# slots runs its own softmax; slots merge once at the end. Dequantization is folded out
# of the inner loops: a lane's dims share one scale s and bias b, so q·(s·w + b) =
# s·(q·w) + b·Σq and the weighted sum takes p·s per row plus Σ p·b. Packed integers
# become floats by the 2^23 trick (an OR and a subtraction), not the slower conversion.

_FLASH = (
    """
    constexpr int LPR = D / VPL;
    constexpr int TS = 32 / LPR;
    constexpr int NW = VPL * BITS / 32;
    constexpr int WPR = D * BITS / 32;
    constexpr int NG = D / GS;
    __shared__ float pm[WARPS][R];
    __shared__ float pl[WARPS][R];
    __shared__ float pacc[WARPS][R * D];
    const int lane = threadIdx.x & 31;
    const int slot = lane / LPR;
    const int part = lane - slot * LPR;
    const int d0 = part * VPL;
    const int g = d0 / GS;
    const int T = n[0];
    const int tpw = n[7];
"""
    + _CHUNK
    + """
    const int TB = n[5];
    const float scale = __int_as_float(n[8]);
    const int has_mask = n[4];
    const int has_sinks = n[9];
    const float* mrow = mask + (bh / n[3]) * (long)n[6];
    float qf[R][VPL];
    float qsum[R];
    float acc[R][VPL];
    float m[R];
    float l[R];
    float bacc[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        qsum[r] = 0.f;
        #pragma unroll
        for (int i = 0; i < VPL; ++i) {
            qf[r][i] = static_cast<float>(q[(bh * R + r) * D + d0 + i]) * scale;
            qsum[r] += qf[r][i];
            acc[r][i] = 0.f;
        }
        m[r] = -INFINITY;
        l[r] = 0.f;
        bacc[r] = 0.f;
    }
    // Each row slot's next row is loaded while the current one is computed on.
    auto fetch = [&](Row<NW>& x, int t0) {
        const int t = t0 + slot;
        const long row = bh * TB + min(t, t_end - 1);
        load_words<NW>(x.k, kw + row * WPR + part * NW);
        load_words<NW>(x.v, vw + row * WPR + part * NW);
        x.ks = static_cast<float>(ks[row * NG + g]);
        x.kb = static_cast<float>(kb[row * NG + g]);
        x.vs = static_cast<float>(vs[row * NG + g]);
        x.vb = static_cast<float>(vb[row * NG + g]);
        x.bias = t < t_end ? (has_mask ? mrow[t] : 0.f) : -INFINITY;
    };
    Row<NW> cur{}, nxt{};
    if (t_begin < t_end) fetch(cur, t_begin);
    for (int t0 = t_begin; t0 < t_end; t0 += TS) {
        if (t0 + TS < t_end) fetch(nxt, t0 + TS);
        const unsigned int* kv = cur.k;
        const unsigned int* vv = cur.v;
        const float k_s = cur.ks, k_b = cur.kb, v_s = cur.vs, v_b = cur.vb, bias = cur.bias;
        float dot[R];
        #pragma unroll
        for (int r = 0; r < R; ++r) dot[r] = 0.f;
        #pragma unroll
        for (int x = 0; x < NW; ++x) {
            #pragma unroll
            for (int u = 0; u < 32 / BITS; ++u) {
                const float kq = packed<BITS>(kv[x], u);
                #pragma unroll
                for (int r = 0; r < R; ++r) dot[r] += qf[r][x * (32 / BITS) + u] * kq;
            }
        }
        float vf[VPL];
        #pragma unroll
        for (int x = 0; x < NW; ++x) {
            #pragma unroll
            for (int u = 0; u < 32 / BITS; ++u)
                vf[x * (32 / BITS) + u] = packed<BITS>(vv[x], u);
        }
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            float sc = k_s * dot[r] + k_b * qsum[r];
            #pragma unroll
            for (int off = LPR / 2; off > 0; off >>= 1) sc += __shfl_xor_sync(0xffffffff, sc, off);
            const float sv = bias == -INFINITY ? -INFINITY : sc + bias;
            if (sv > m[r]) {
                const float shrink = __expf(m[r] - sv);
                l[r] *= shrink;
                bacc[r] *= shrink;
                #pragma unroll
                for (int i = 0; i < VPL; ++i) acc[r][i] *= shrink;
                m[r] = sv;
            }
            const float p = sv == -INFINITY ? 0.f : __expf(sv - m[r]);
            l[r] += p;
            bacc[r] += p * v_b;
            const float ps = p * v_s;
            #pragma unroll
            for (int i = 0; i < VPL; ++i) acc[r][i] += ps * vf[i];
        }
        cur = nxt;
    }
    // Merge the warp's row slots, then the block's warps.
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        float mw = m[r];
        #pragma unroll
        for (int off = 16; off >= LPR; off >>= 1) mw = fmaxf(mw, __shfl_xor_sync(0xffffffff, mw, off));
        const float w8 = m[r] == -INFINITY ? 0.f : __expf(m[r] - mw);
        float lw = l[r] * w8;
        #pragma unroll
        for (int off = 16; off >= LPR; off >>= 1) lw += __shfl_xor_sync(0xffffffff, lw, off);
        #pragma unroll
        for (int i = 0; i < VPL; ++i) {
            float a = (acc[r][i] + bacc[r]) * w8;
            #pragma unroll
            for (int off = 16; off >= LPR; off >>= 1) a += __shfl_xor_sync(0xffffffff, a, off);
            if (slot == 0) pacc[wib][r * D + d0 + i] = a;
        }
        if (lane == 0) {
            pm[wib][r] = mw;
            pl[wib][r] = lw;
        }
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
        part_acc[(bh * C + c) * R * D + k] = sum;
        if (k % D == 0) {
            part_m[(bh * C + c) * R + r] = mx_;
            part_l[(bh * C + c) * R + r] = lsum;
        }
    }
    // The last block of this (batch, KV head) to finish merges the chunks, adds the sinks
    // and writes the output (other blocks' partial sums are read past L1: ld.cg).
    __shared__ bool last;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(const_cast<int*>(count) + bh, 1) == C - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    // Per query row: the chunks' max (warp per row, lanes over chunks), each chunk's
    // weight into shared memory (the warps' partial sums are done with it), and the
    // total; then each output element sums its C partial values, loads unrolled.
    float* weight = &pacc[0][0];  // C * R <= WARPS * R * D (flash_decode bounds C)
    __shared__ float total[R];
    for (int r = wib; r < R; r += WARPS) {
        const long first = bh * C * R + r;
        float mx_ = has_sinks ? sinks[(bh * R + r) % (n[3] * R)] : -INFINITY;
        const float sink = mx_;
        for (int u = lane; u < C; u += 32) mx_ = fmaxf(mx_, __ldcg(part_m + first + u * R));
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) mx_ = fmaxf(mx_, __shfl_xor_sync(0xffffffff, mx_, off));
        float lsum = 0.f;
        for (int u = lane; u < C; u += 32) {
            const float mc = __ldcg(part_m + first + u * R);
            const float w8 = mc == -INFINITY ? 0.f : __expf(mc - mx_);
            weight[u * R + r] = w8;
            lsum += __ldcg(part_l + first + u * R) * w8;
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) lsum += __shfl_xor_sync(0xffffffff, lsum, off);
        if (lane == 0) total[r] = lsum + (has_sinks ? __expf(sink - mx_) : 0.f);
    }
    __syncthreads();
    for (int k = threadIdx.x; k < R * D; k += blockDim.x) {
        const int r = k / D;
        float sum = 0.f;
        #pragma unroll 8
        for (int u = 0; u < C; ++u) sum += __ldcg(part_acc + (bh * C + u) * R * D + k) * weight[u * R + r];
        out[bh * R * D + k] = static_cast<OutT>(total[r] > 0.f ? sum / total[r] : 0.f);
    }
"""
)


@functools.cache
def _kernel(name: str) -> object:
    if name == "flash":
        return mx.fast.cuda_kernel(
            name="mlx_lm_ext_qattn_flash",
            input_names=["q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "sinks", "count", "n"],
            output_names=["out", "part_acc", "part_m", "part_l"],
            source=_FLASH,
            header=_PACKED,
        )
    source, first = {"scores": (_SCORES, "q"), "weighted": (_WEIGHTED, "p")}[name]
    return mx.fast.cuda_kernel(
        name=f"mlx_lm_ext_qattn_{name}",
        input_names=[first, "w", "s", "b", "n"],
        output_names=["out"],
        source=source,
        header=_PACKED,
    )


FLASH_WARPS = 1024  # warps a decode step aims for: one 8-warp block per SM of an H100 (measured)
FLASH_REGISTERS = 64  # query rows x dims per lane, for the queries and again the output
FLASH_BLOCK_WARPS = 8  # warps a block, merged in shared memory


@functools.cache
def flash_split(rows: int, dim: int, bits: int, group_size: int) -> int | None:
    """Dims per lane for `flash_decode` (16, 8 or 4: fewer where more query rows share a
    KV head, to stay in registers), or None where the shape has no split. Remembered:
    each decode step asks it twice a layer (choosing the path, then launching)."""
    for per_lane in (16, 8, 4):
        lanes = dim // per_lane
        if (
            rows * per_lane <= FLASH_REGISTERS
            and dim % per_lane == 0
            and group_size % per_lane == 0
            and per_lane * bits % 32 == 0
            and lanes <= 32
            and 32 % lanes == 0
        ):
            return per_lane
    return None


def flash_decode(
    queries, q_keys, q_values, scale: float, group_size: int, bits: int, length: int, mask=None, sinks=None
):
    """softmax(scale·q·kᵀ + mask, sinks)·v for one query per head, queries (B, H·R, 1, D)
    (any float dtype, the output's; R query heads per KV head), over the first `length`
    rows of whole quantized buffers (B, H, T_buf, .). `mask`: None or additive float32
    (B or 1, length); `sinks`: (H·R,) logits, or None. The shape must have a
    `flash_split`. One kernel launch: no reshapes, casts or second pass as separate ops,
    which on MLX's CUDA backend cost more per layer than the kernel at 4K tokens."""
    B, H = q_keys[0].shape[:2]
    R, D = queries.shape[1] // H, queries.shape[-1]
    per_lane = flash_split(R, D, bits, group_size)
    slots = 32 * per_lane // D
    warps = max(1, min(FLASH_BLOCK_WARPS, 8192 // (R * D)))  # partial sums fit 32 KiB
    tpw = -(-B * H * length // FLASH_WARPS)
    tpw = max(slots, -(-tpw // slots) * slots)
    tpw = max(tpw, -(-length // (warps * warps * D)))  # C <= warps * D: chunk weights fit
    C = -(-length // (warps * tpw))
    stride = length if mask is not None and mask.shape[0] > 1 else 0  # (1, length): all rows
    scale_bits = struct.unpack("i", struct.pack("f", scale))[0]
    params = [length, B * H, C, H, int(mask is not None), q_keys[0].shape[-2], stride, tpw, scale_bits]
    sinks = None if sinks is None else sinks.astype(mx.float32)
    out, *_ = _kernel("flash")(
        inputs=[
            queries,
            *q_keys,
            *q_values,
            _none() if mask is None else mask,
            _none() if sinks is None else sinks,
            mx.zeros((B * H,), mx.int32),
            mx.array(params + [int(sinks is not None)], mx.int32),
        ],
        template=[*_template(R, D, bits, group_size, VPL=per_lane, WARPS=warps), ("OutT", queries.dtype)],
        grid=(B * H * C * warps * 32, 1, 1),
        threadgroup=(warps * 32, 1, 1),
        output_shapes=[queries.shape, (B * H * C * R * D,), (B * H * C * R,), (B * H * C * R,)],
        output_dtypes=[queries.dtype] + [mx.float32] * 3,
    )
    return out


@functools.cache
def _none() -> mx.array:
    """A placeholder for an absent mask or sinks: made once, not an op per call."""
    return mx.zeros((1,), mx.float32)


def supports(rows: int, dim: int, bits: int, group_size: int) -> bool:
    """Shapes `scores` and `weighted_sum` handle: whole bytes per lane, rows x dims per
    lane in registers (`flash_split` says which one-query shapes `flash_decode` takes)."""
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
        flash = flash_decode(q.reshape(1, 8, 1, 128), qk, qv, 1.0, 64, 8, 300).reshape(q.shape)
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
