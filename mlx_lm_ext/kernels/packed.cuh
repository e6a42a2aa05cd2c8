// Device helpers every quantized-attention kernel is compiled with (MLX's `header=`).
// -- compiled from here (the lines above are not part of the kernel source) --

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

// The lane's DPL = D / 32 dims from d0 of one row of a packed array (its words, scales
// and biases), dequantized into v: what `scores` and `weighted` read of a cache row.
template <int D, int BITS, int GS, typename T>
__device__ __forceinline__ void dequantize_row(
    float* v, const unsigned int* w, const T* s, const T* b, long row, int d0) {
    constexpr int DPL = D / 32;
    constexpr int WPR = D * BITS / 32;
    constexpr int NG = D / GS;
    const float sc = static_cast<float>(s[row * NG + d0 / GS]);
    const float bi = static_cast<float>(b[row * NG + d0 / GS]);
    #pragma unroll
    for (int i = 0; i < DPL; ++i) {
        const int e = d0 + i;
        v[i] = packed<BITS>(w[row * WPR + (e * BITS) / 32], e % (32 / BITS)) * sc + bi;
    }
}
