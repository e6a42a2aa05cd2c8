// Body of `flash`: one-launch flash decoding over a quantized cache (see plan.py).
// Its constants (R, D, BITS (keys), VBITS (values), GS, VPL, WARPS, SMEM, U, SCALE, HAS_*, OutT) are written
// before it by plan.flash_source; MLX's cuda_kernel wraps it in a __global__ function.
// -- compiled from here (the lines above are not part of the kernel source) --
    constexpr int LPR = D / VPL;
    constexpr int TS = 32 / LPR;
    constexpr int NW = VPL * BITS / 32;  // packed words a lane reads of a key row
    constexpr int NWV = VPL * VBITS / 32;  // ... of a value row
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
    const unsigned int* v_w = vw + at(vw_strides, b, h, t_q) + part * NWV;
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
        unsigned int w[U][NWV];
        float s_[U], b_[U];
        load_rows<U, NWV, STEP>(w, s_, b_, v_w, v_s, v_b, vw_strides, vs_strides, vb_strides, j0, rows);
        #pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u * STEP;
            float vf[VPL];
            #pragma unroll
            for (int x = 0; x < NWV; ++x) {
                #pragma unroll
                for (int e = 0; e < 32 / VBITS; ++e) vf[x * (32 / VBITS) + e] = packed<VBITS>(w[u][x], e);
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
