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
block that finishes last (32 layers at 32K tokens, 8-bit: 2.88 ms against 2.51 for the
16-bit fused kernel); it also reads a cache's 16-bit decode tail (caches/decode_tail.py)
as one chunk more. On MLX's CUDA backend every op a decode step adds costs ~7 us of
dispatch per layer (measured: a custom kernel, an add and a zeros+add all take 6-10 us
each), so the flash path also leaves casts, reshapes, a second pass, parameter uploads
and counter zeroing out of the graph. Figures: README "CUDA backend".
Whether the device runs CUDA kernels, and runs these correctly, is probed once
(`available`).
"""

from __future__ import annotations

import functools
import hashlib
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

// Element offset of (b, h, t, 0) in an array with strides `st`.
template <typename S>
__device__ __forceinline__ long at(const S& st, long b, long h, long t) {
    return b * st[0] + h * st[1] + t * st[2];
}

// A lane's share of U rows of one packed array: rows j0, j0 + STEP, ... (clamped to the
// chunk's last row; those past it are loaded and not used), their scales and biases.
template <int U, int NW, int STEP, typename T, typename S>
__device__ __forceinline__ void load_rows(
    unsigned int (&w)[U][NW], float (&scale)[U], float (&bias)[U],
    const unsigned int* words, const T* scales, const T* biases,
    const S& words_st, const S& scales_st, const S& biases_st, int j0, int rows) {
    #pragma unroll
    for (int u = 0; u < U; ++u) {
        const long j = min(j0 + u * STEP, rows - 1);
        load_words<NW>(w[u], words + j * words_st[2]);
        scale[u] = static_cast<float>(scales[j * scales_st[2]]);
        bias[u] = static_cast<float>(biases[j * biases_st[2]]);
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
    // This block's chunk of one (batch, KV head), n[1] of them with n[2] chunks each,
    // and this warp's TPW tokens in it.
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


# Flash decoding in one launch. Each block takes one chunk of one (batch, KV head) in two
# passes: scores for the chunk's rows into shared memory, then the probability-weighted
# rows; so only the queries (first pass) or the output (second) sit in registers, never
# both, and with rows independent in each pass every lane issues U loads before using
# any. That keeps registers low enough for several blocks an SM and many loads in flight,
# which is what decode attention needs: it reads the cache once and does little
# arithmetic. A warp reads TS whole rows at once, LPR lanes a row and VPL dims a lane
# (one coalesced load of the packed words). Dequantization is folded out of the inner
# loops: a lane's dims share one scale s and bias b, so q·(s·w + b) = s·(q·w) + b·Σq and
# the weighted sum takes p·s per row plus Σ p·b. Packed integers become floats by the
# 2^23 trick (an OR and a subtraction), not the slower conversion. The block that
# finishes a (batch, KV head) last merges the chunks and adds the sinks.

_FLASH = """
    constexpr int LPR = D / VPL;
    constexpr int TS = 32 / LPR;
    constexpr int NW = VPL * BITS / 32;
    constexpr int STEP = WARPS * TS;
    constexpr int CH = SMEM / R;  // the most rows a chunk has: its scores fill sm
    __shared__ float sm[SMEM];
    __shared__ float pm[R];
    __shared__ float pl[R];
    const int lane = threadIdx.x & 31;
    const int wib = threadIdx.x >> 5;
    const int slot = lane / LPR;
    const int part = lane - slot * LPR;
    const int d0 = part * VPL;
    const int g = d0 / GS;
    // Sizes come from the arrays' shapes and strides (kernel arguments): the keys are
    // passed as the view of their valid rows, so nothing is copied to the device a step.
    // With HAS_TAIL, the last chunk of a (batch, KV head) is the cache's tail: rows
    // T .. T + n that are not quantized yet, 16-bit, the first n rows of tk and tv
    // (n + 1 = tn_shape[0]: a length passed as a shape, so no upload op a step).
    const int T = kw_shape[2];
    const int H = kw_shape[1];
    const int C = gridDim.x / (kw_shape[0] * H);
    const int CQ = C - (HAS_TAIL ? 1 : 0);  // chunks over the quantized rows
    const long bh = blockIdx.x / C;
    const int c = blockIdx.x - bh * C;
    const long b = bh / H;
    const long h = bh - b * H;
    const bool in_tail = HAS_TAIL && c == CQ;
    const int per_block = ((T + CQ - 1) / CQ + STEP - 1) / STEP * STEP;
    const int t_begin = in_tail ? T : c * per_block;
    const int rows = in_tail ? tn_shape[0] - 1 : min(T, t_begin + per_block) - t_begin;
    const float scale = __int_as_float(SCALE);
    // One output holds every chunk's partial sums, then their maxima, then their sums.
    float* part_acc = parts;
    float* part_m = parts + (long)gridDim.x * R * D;
    float* part_l = part_m + (long)gridDim.x * R;
    // This chunk's rows: row j of an array x is at x + at(x_strides, ...) + j * x_strides[2].
    const int t_q = in_tail ? 0 : t_begin;
    const unsigned int* k_w = kw + at(kw_strides, b, h, t_q) + part * NW;
    const unsigned int* v_w = vw + at(vw_strides, b, h, t_q) + part * NW;
    const auto* k_s = ks + at(ks_strides, b, h, t_q) + g;
    const auto* k_b = kb + at(kb_strides, b, h, t_q) + g;
    const auto* v_s = vs + at(vs_strides, b, h, t_q) + g;
    const auto* v_b = vb + at(vb_strides, b, h, t_q) + g;
    const float* mrow = mask + (mask_shape[0] > 1 ? b * mask_strides[0] : 0) + t_begin * mask_strides[1];
    {
        // Pass 1: this chunk's scores, row j of query r at sm[r * CH + j].
        float qf[R][VPL];
        float qsum[R];
        const auto* qh = q + b * q_strides[0] + h * R * q_strides[1] + d0;
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            qsum[r] = 0.f;
            #pragma unroll
            for (int i = 0; i < VPL; ++i) {
                qf[r][i] = static_cast<float>(qh[r * q_strides[1] + i]) * scale;
                qsum[r] += qf[r][i];
            }
        }
        if (HAS_TAIL && in_tail) {
            for (int j = wib * TS + slot; j - slot < rows; j += STEP) {
                const auto* kr = tk + at(tk_strides, b, h, min(j, rows - 1)) + d0;
                float dot[R];
                #pragma unroll
                for (int r = 0; r < R; ++r) dot[r] = 0.f;
                #pragma unroll
                for (int i = 0; i < VPL; ++i) {
                    const float kf = static_cast<float>(kr[i]);
                    #pragma unroll
                    for (int r = 0; r < R; ++r) dot[r] += qf[r][i] * kf;
                }
                const float bias = j < rows && HAS_MASK ? mrow[j * mask_strides[1]] : 0.f;
                #pragma unroll
                for (int r = 0; r < R; ++r) {
                    float sc = dot[r];
                    #pragma unroll
                    for (int off = LPR / 2; off > 0; off >>= 1) sc += __shfl_xor_sync(0xffffffff, sc, off);
                    if (part == 0 && j < rows) sm[r * CH + j] = sc + bias;
                }
            }
        } else for (int j0 = wib * TS + slot; j0 - slot < rows; j0 += STEP * U) {
            unsigned int w[U][NW];
            float s_[U], b_[U];
            load_rows<U, NW, STEP>(w, s_, b_, k_w, k_s, k_b, kw_strides, ks_strides, kb_strides, j0, rows);
            #pragma unroll
            for (int u = 0; u < U; ++u) {
                const int j = j0 + u * STEP;
                float dot[R];
                #pragma unroll
                for (int r = 0; r < R; ++r) dot[r] = 0.f;
                #pragma unroll
                for (int x = 0; x < NW; ++x) {
                    #pragma unroll
                    for (int e = 0; e < 32 / BITS; ++e) {
                        const float kq = packed<BITS>(w[u][x], e);
                        #pragma unroll
                        for (int r = 0; r < R; ++r) dot[r] += qf[r][x * (32 / BITS) + e] * kq;
                    }
                }
                const float bias = j < rows && HAS_MASK ? mrow[j * mask_strides[1]] : 0.f;
                #pragma unroll
                for (int r = 0; r < R; ++r) {
                    float sc = s_[u] * dot[r] + b_[u] * qsum[r];
                    #pragma unroll
                    for (int off = LPR / 2; off > 0; off >>= 1) sc += __shfl_xor_sync(0xffffffff, sc, off);
                    if (part == 0 && j < rows) sm[r * CH + j] = sc + bias;
                }
            }
        }
    }
    __syncthreads();
    // The chunk's softmax numerators in place of its scores, their max and sum (a warp a
    // query row, lanes over rows).
    for (int r = wib; r < R; r += WARPS) {
        float mr = -INFINITY;
        for (int j = lane; j < rows; j += 32) mr = fmaxf(mr, sm[r * CH + j]);
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) mr = fmaxf(mr, __shfl_xor_sync(0xffffffff, mr, off));
        float lr = 0.f;
        for (int j = lane; j < rows; j += 32) {
            const float p = mr == -INFINITY ? 0.f : __expf(sm[r * CH + j] - mr);
            sm[r * CH + j] = p;
            lr += p;
        }
        #pragma unroll
        for (int off = 16; off > 0; off >>= 1) lr += __shfl_xor_sync(0xffffffff, lr, off);
        if (lane == 0) {
            pm[r] = mr;
            pl[r] = lr;
        }
    }
    __syncthreads();
    // Pass 2: the probability-weighted rows of V, summed over the warp's row slots.
    float acc[R][VPL];
    float bacc[R];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        bacc[r] = 0.f;
        #pragma unroll
        for (int i = 0; i < VPL; ++i) acc[r][i] = 0.f;
    }
    if (HAS_TAIL && in_tail) {
        for (int j = wib * TS + slot; j - slot < rows; j += STEP) {
            const auto* vr = tv + at(tv_strides, b, h, min(j, rows - 1)) + d0;
            float vf[VPL];
            #pragma unroll
            for (int i = 0; i < VPL; ++i) vf[i] = static_cast<float>(vr[i]);
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const float p = j < rows ? sm[r * CH + j] : 0.f;
                #pragma unroll
                for (int i = 0; i < VPL; ++i) acc[r][i] += p * vf[i];
            }
        }
    } else for (int j0 = wib * TS + slot; j0 - slot < rows; j0 += STEP * U) {
        unsigned int w[U][NW];
        float s_[U], b_[U];
        load_rows<U, NW, STEP>(w, s_, b_, v_w, v_s, v_b, vw_strides, vs_strides, vb_strides, j0, rows);
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u * STEP;
            float vf[VPL];
            #pragma unroll
            for (int x = 0; x < NW; ++x) {
                #pragma unroll
                for (int e = 0; e < 32 / BITS; ++e) vf[x * (32 / BITS) + e] = packed<BITS>(w[u][x], e);
            }
            #pragma unroll
            for (int r = 0; r < R; ++r) {
                const float p = j < rows ? sm[r * CH + j] : 0.f;
                bacc[r] += p * b_[u];
                const float ps = p * s_[u];
                #pragma unroll
                for (int i = 0; i < VPL; ++i) acc[r][i] += ps * vf[i];
            }
        }
    }
    __syncthreads();  // every warp is done with the numerators: sm now takes partial sums
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int i = 0; i < VPL; ++i) {
            float a = acc[r][i] + bacc[r];
            #pragma unroll
            for (int off = 16; off >= LPR; off >>= 1) a += __shfl_xor_sync(0xffffffff, a, off);
            if (slot == 0) sm[(wib * R + r) * D + d0 + i] = a;
        }
    }
    __syncthreads();
    for (int k = threadIdx.x; k < R * D; k += blockDim.x) {
        float sum = 0.f;
        #pragma unroll
        for (int u = 0; u < WARPS; ++u) sum += sm[u * R * D + k];
        part_acc[(bh * C + c) * R * D + k] = sum;
    }
    for (int r = threadIdx.x; r < R; r += blockDim.x) {
        part_m[(bh * C + c) * R + r] = pm[r];
        part_l[(bh * C + c) * R + r] = pl[r];
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
    if (threadIdx.x == 0) count_out[bh] = 0;  // the next call's counter (flash_decode)
    // Per query row: the chunks' max (warp per row, lanes over chunks), each chunk's
    // weight into shared memory, and the total; then each output element sums its C
    // partial values, loads unrolled.
    float* weight = sm;  // C * R <= SMEM (flash_decode bounds C)
    __shared__ float total[R];
    for (int r = wib; r < R; r += WARPS) {
        const long first = bh * C * R + r;
        float mx_ = HAS_SINKS ? sinks[(h * R + r) * sinks_strides[0]] : -INFINITY;
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
        if (lane == 0) total[r] = lsum + (HAS_SINKS ? __expf(sink - mx_) : 0.f);
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


@functools.cache
def _kernel(name: str) -> object:
    source, first = {"scores": (_SCORES, "q"), "weighted": (_WEIGHTED, "p")}[name]
    return _custom_kernel(name, [first, "w", "s", "b", "n"], ["out"], source)


@functools.cache
def _flash_kernel(R, D, bits, group_size, per_lane, warps, scale, flags, dtype) -> object:
    """The flash kernel with its constants written into its source: a call then passes
    no template (converting and hashing one costs a few us a layer a step)."""
    has_mask, has_sinks, has_tail = flags
    constants = (
        *_template(R, D, bits, group_size, VPL=per_lane, WARPS=warps, SMEM=FLASH_SMEM, U=FLASH_UNROLL),
        ("SCALE", struct.unpack("i", struct.pack("f", scale))[0]),
        ("HAS_MASK", has_mask),
        ("HAS_SINKS", has_sinks),
        ("HAS_TAIL", has_tail),
        ("OutT", dtype),
    )
    source = flash_source(constants)
    inputs = ["q", "kw", "ks", "kb", "vw", "vs", "vb", "mask", "sinks", "count", "tk", "tv", "tn"]
    # ensure_row_contiguous False: strided queries and cache views are read in place
    return _custom_kernel("flash", inputs, ["out", "parts", "count_out"], source, ensure_row_contiguous=False)


def _custom_kernel(name: str, inputs: list, outputs: list, source: str, **options) -> object:
    """A kernel named for its source's digest: MLX caches compiled kernels on disk by name
    alone (MLX_PTX_CACHE_DIR), so a kernel changed by an upgrade must not reuse it."""
    return mx.fast.cuda_kernel(
        name=kernel_name(name, source),
        input_names=inputs,
        output_names=outputs,
        source=source,
        header=_PACKED,
        **options,
    )


def kernel_name(name: str, source: str) -> str:
    """`name` and a digest of the kernel's whole source (shared helpers included)."""
    return f"mlx_lm_ext_qattn_{name}_{hashlib.sha256((_PACKED + source).encode()).hexdigest()[:16]}"


def flash_source(constants: tuple) -> str:
    """The flash kernel's body with its compile-time constants written first."""
    return "".join(_constant(name, value) for name, value in constants) + _FLASH


_CUDA_TYPES = {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}


def _constant(name: str, value) -> str:
    """One compile-time constant as MLX writes a template argument."""
    if isinstance(value, bool):
        return f"    constexpr bool {name} = {'true' if value else 'false'};\n"
    if isinstance(value, int):
        return f"    constexpr int {name} = {value};\n"
    return f"    using {name} = {_CUDA_TYPES[value]};\n"


FLASH_BLOCKS = 264  # blocks a decode step aims for: two an SM of an H100 (measured)
FLASH_REGISTERS = 64  # query rows x dims per lane: the queries, then the output
FLASH_BLOCK_WARPS = 8  # warps a block, merged in shared memory
FLASH_SMEM = 8192  # floats of shared memory a block: a chunk's scores, then partial sums
FLASH_UNROLL = 4  # rows each lane loads before computing on any


@functools.cache
def flash_split(rows: int, dim: int, bits: int, group_size: int) -> int | None:
    """Dims per lane for `flash_decode` (16, 8 or 4: fewer where more query rows share a
    KV head, to stay in registers), or None where the shape has no split. Remembered:
    each decode step asks it for every layer."""
    for per_lane in (16, 8, 4):
        lanes = dim // per_lane
        if (
            rows * per_lane <= FLASH_REGISTERS
            and dim % per_lane == 0
            and group_size % per_lane == 0
            and per_lane * bits % 32 == 0
            and lanes <= 32
            and 32 % lanes == 0
            and rows * dim <= FLASH_SMEM
        ):
            return per_lane
    return None


def _flash_chunks(batch_heads: int, length: int, rows: int, step: int, extra: int = 0) -> int | None:
    """Chunks a (batch, KV head) is cut into, spreading the cache over about FLASH_BLOCKS
    blocks with the `extra` chunks a KV head (the tail's) among them. A chunk's rows (a
    multiple of a block's step; the kernel takes ceil(length / chunks) rounded up to one)
    fit its scores in shared memory, and the chunks' weights must fit there too: None past
    that length (262K tokens at 16 query rows, 4M at 4)."""
    most = FLASH_SMEM // rows // step * step
    per_block = -(-batch_heads * length // max(FLASH_BLOCKS - batch_heads * extra, batch_heads))
    per_block = max(per_block, -(-length // most))
    per_block = min(most, max(step, -(-per_block // step) * step))
    chunks = -(-length // per_block)
    return chunks if (chunks + extra) * rows <= FLASH_SMEM else None


def flash_plan(rows: int, dim: int, bits: int, group_size: int, batch_heads: int, length: int, tail: int = 0):
    """(dims a lane, warps a block, chunks a KV head over the quantized rows) for
    `flash_decode`, or None where the shape has no `flash_split` or the length is past
    what a block's merge holds. `tail`: rows of a 16-bit tail, one chunk more (its scores
    must fit a block's shared memory)."""
    if tail * rows > FLASH_SMEM:
        return None
    return _plan(rows, dim, bits, group_size, batch_heads, length, tail > 0)


@functools.lru_cache(maxsize=256)
def _plan(rows: int, dim: int, bits: int, group_size: int, batch_heads: int, length: int, tail: bool):
    """`flash_plan` for a shape: remembered, as the quantized rows a layer reads change
    once a tail's block (64 steps) and every layer of a model shares them."""
    per_lane = flash_split(rows, dim, bits, group_size)
    if per_lane is None:
        return None
    warps = max(1, min(FLASH_BLOCK_WARPS, FLASH_SMEM // (rows * dim)))  # partial sums fit
    chunks = _flash_chunks(batch_heads, length, rows, warps * 32 * per_lane // dim, int(tail))
    return None if chunks is None else (per_lane, warps, chunks)


def flash_decode(
    queries,
    q_keys,
    q_values,
    scale: float,
    group_size: int,
    bits: int,
    length: int,
    mask=None,
    sinks=None,
    tail=None,
):
    """softmax(scale·q·kᵀ + mask, sinks)·v for one query per head, queries (B, H·R, 1, D)
    (any float dtype, the output's; R query heads per KV head), over the first `length`
    rows of quantized buffers (B, H, T_buf, .) followed by `tail`: None, or (keys,
    values) 16-bit rows (B, H, n, D) not quantized yet (caches/decode_tail.py), or
    (keys, values, n) for the first n rows of longer buffers. `mask`: None or additive
    float32 (B or 1, length + n); `sinks`: (H·R,) logits, or None. The shape must have a
    `flash_plan`. One kernel launch (and a slice where the keys hold more than `length`
    rows): no reshapes, casts, second pass or parameter upload as separate ops, which on
    MLX's CUDA backend cost more per layer than the kernel at 4K tokens (each ~7-10 us of
    dispatch; the kernel reads its sizes from the arrays' shapes and strides instead)."""
    B, H = q_keys[0].shape[:2]
    n = 0 if tail is None else tail[2] if len(tail) > 2 else tail[0].shape[-2]
    flags = (mask is not None, sinks is not None, tail is not None)
    kernel, spec = _flash_call(queries.shape, queries.dtype, B, H, bits, group_size, length, scale, flags)
    out, _, _COUNTERS[B * H] = kernel(
        inputs=[
            queries,
            q_keys[0] if q_keys[0].shape[-2] == length else q_keys[0][..., :length, :],  # shape = length
            *q_keys[1:],
            *q_values,
            _none() if mask is None else mask,
            _none() if sinks is None else sinks.astype(mx.float32),
            _counter(B * H),
            *((_none(), _none()) if tail is None else tail[:2]),
            _sized(n + 1),  # its shape carries the tail's rows
        ],
        **spec,
    )
    return out


@functools.lru_cache(maxsize=256)
def _flash_call(q_shape, dtype, B, H, bits, group_size, length, scale, flags) -> tuple:
    """The kernel for a shape and its call's arguments but the inputs, made once: a decode
    step asks for them every layer, and with a tail they change once a block (64 steps);
    without one the length changes every step, and only the grid is made again."""
    R, D = q_shape[1] // H, q_shape[-1]
    per_lane, warps, C = flash_plan(R, D, bits, group_size, B * H, length, int(flags[2]))
    C += 1 if flags[2] else 0
    return _flash_kernel(R, D, bits, group_size, per_lane, warps, scale, flags, dtype), {
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


def _none() -> mx.array:
    """A placeholder for an absent mask or sinks: made once, not an op per call."""
    return _sized(1)


@functools.cache
def _sized(n: int) -> mx.array:
    """An array of n elements, never read: its shape passes n to a kernel without an
    upload op a step (one array per tail length, made once)."""
    return mx.zeros((n,), mx.float32)


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
