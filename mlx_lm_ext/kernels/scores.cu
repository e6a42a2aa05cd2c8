// Body of `scores`: q·kᵀ over a quantized cache, one warp per (KV head, RPW tokens).
// MLX's cuda_kernel wraps it in a __global__ function; template constants R, D, BITS, GS, RPW.
// -- compiled from here (the lines above are not part of the kernel source) --

    constexpr int DPL = D / 32;
    const int lane = threadIdx.x & 31;
    const int d0 = lane * DPL;
    const int T = n[0];

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
        dequantize_row<D, BITS, GS>(v, w, s, b, bh * T + min(t, T - 1), d0);
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
