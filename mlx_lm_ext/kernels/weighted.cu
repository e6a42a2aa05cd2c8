// Body of `weighted`: probability-weighted rows of a quantized cache, one warp per TPW tokens.
// MLX's cuda_kernel wraps it in a __global__ function; template constants R, D, BITS, GS, TPW, WARPS.
// -- compiled from here (the lines above are not part of the kernel source) --

    constexpr int DPL = D / 32;
    const int lane = threadIdx.x & 31;
    const int d0 = lane * DPL;
    const int T = n[0];

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
        dequantize_row<D, BITS, GS>(v, w, s, b, bh * T + min(t, T - 1), d0);
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
