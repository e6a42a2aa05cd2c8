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

// A decode step's new row into its 16-bit tail buffer, rounded to the buffer's type: the
// flash kernel writes the row itself (the buffer is one of its inputs: later readers are
// ordered after the launch by its output, see launch.TailWrites).
template <typename T, typename U>
__device__ __forceinline__ void store(const T* buffer, long i, U x) {
    const_cast<T*>(buffer)[i] = static_cast<T>(static_cast<float>(x));
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

// Tensor-core scores (flash.cu's TC path): a key tile of 16 rows times the queries, as
// mma.sync m16n8k16 with f16 operands and float32 sums. Integers 0..255 and bf16 or f16
// queries are exact in f16 (within its range), so the products are exact; only the sums'
// order differs from the scalar path.

// An f16 pair holding 1024 + n in each half (n < 1024 in the mantissa) as the pair of n:
// exact, one instruction.
__device__ __forceinline__ unsigned int sub_1024(unsigned int h) {
    unsigned int r;
    asm("sub.f16x2 %0, %1, %2;" : "=r"(r) : "r"(h), "r"(0x64006400u));
    return r;
}

// Two of a packed word's values as f16 (their integers exactly): pair p holds values
// (2p, 2p + 1) of an 8-bit word, (p, p + 32 / BITS / 2) otherwise. The integers are
// placed in the mantissa of 1024 (0x6400), which is then subtracted: exact.
template <int BITS>
__device__ __forceinline__ unsigned int pair_f16(unsigned int w, int p) {
    unsigned int h;
    if (BITS == 8) {
        h = __byte_perm(w, 0x64646464u, p == 0 ? 0x4140 : 0x4342);
    } else {
        constexpr unsigned int M = ((1u << BITS) - 1u) * 0x00010001u;
        h = ((w >> (p * BITS)) & M) | 0x64006400u;
    }
    return sub_1024(h);
}

// The values pair `p` of a word holds, as offsets into the word's 32 / BITS values.
template <int BITS>
__device__ __forceinline__ int2 pair_offsets(int p) {
    constexpr int E = 32 / BITS;
    return BITS == 8 ? make_int2(2 * p, 2 * p + 1) : make_int2(p, p + E / 2);
}

// Two floats as an f16 pair in one register (the first in the low half), and their
// rounding residuals (for float32 queries, a second product recovers them).
__device__ __forceinline__ unsigned int f16_pair(float a, float b, unsigned int* residual) {
    const __half2 h = __floats2half2_rn(a, b);
    const __half2 r = __floats2half2_rn(a - __low2float(h), b - __high2float(h));
    *residual = *reinterpret_cast<const unsigned int*>(&r);
    return *reinterpret_cast<const unsigned int*>(&h);
}

// c += a·b, one m16n8k16 tile (row-major A, column-major B, f16 in, float32 sums).
__device__ __forceinline__ void mma_f16(float (&c)[4], const unsigned int (&a)[4], unsigned int b0, unsigned int b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // plan.flash_tensor_cores asks for sm_80 or later
#endif
}

// The same value (index e, and e + 1) of two rows' packed words, as two f16 pairs: `lo`
// holds value e of row A then of row B, `hi` value e + 1 of each (e even: both in one byte
// below 8 bits, adjacent bytes at 8). Exact, as in pair_f16.
template <int BITS>
__device__ __forceinline__ void rows_pair_f16(unsigned int A, unsigned int B, int e, unsigned int& lo, unsigned int& hi) {
    unsigned int l, h;
    if (BITS == 8) {
        const unsigned int t = __byte_perm(A, B, e | ((4 + e) << 4) | ((e + 1) << 8) | ((5 + e) << 12));
        l = __byte_perm(t, 0x64646464u, 0x4140);
        h = __byte_perm(t, 0x64646464u, 0x4342);
    } else {
        constexpr unsigned int M = ((1u << BITS) - 1u) * 0x00010001u;
        const int k = e * BITS / 8;
        const int s = e * BITS % 8;
        const unsigned int t = __byte_perm(A, B, k | ((4 + k) << 8));
        l = ((t >> s) & M) | 0x64006400u;
        h = ((t >> (s + BITS)) & M) | 0x64006400u;
    }
    lo = sub_1024(l);
    hi = sub_1024(h);
}
