// Body of `flash`: one-launch flash decoding over a quantized cache (see plan.py).
// Its constants (R, D, BITS (keys), VBITS (values), GS, VPL, WARPS, SMEM, U, SCALE, MMA, MMA_V, HAS_*,
// OutT) are written before it by plan.flash_source; MLX's cuda_kernel wraps it in a __global__ function.
// Both passes run on tensor cores where MMA (keys) and MMA_V (values) are set and the GPU
// has them (sm_80+): one m16n8k16 product a 16-row tile a k-step, in place of R FMAs and
// a dequantize per cache value and a shuffle reduction per row on CUDA cores, where the
// kernel spent its time (8-bit and 4-bit took the same 80 us a layer at 32K on the H200).
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
    // (n + 1 = tn_shape[0]: a length passed as a shape, so no upload op a step). With
    // HAS_NEW the last of them is this step's row, in kn and vn (B, H, 1, D): the tail's
    // block writes it into tk and tv first, so the cache's update adds no op to the step.
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
    if (HAS_NEW && in_tail) {
        // This step's row into the tail first, rounded as stored; the block then reads every
        // row from the buffers (reading it from kn and vn inside the loops slowed every
        // launch, the quantized chunks' blocks too: 72.6 us against 47.9 with no row to
        // write, at 32K tokens on the H200; benchmarks/decode_cost.py's tail rows).
        const auto* kx = kn + at(kn_strides, b, h, 0);
        const auto* vx = vn + at(vn_strides, b, h, 0);
        for (int d = threadIdx.x; d < D; d += blockDim.x) {
            store(tk, at(tk_strides, b, h, rows - 1) + d, kx[d * kn_strides[3]]);
            store(tv, at(tv_strides, b, h, rows - 1) + d, vx[d * vn_strides[3]]);
        }
        __syncthreads();  // the block's writes to global memory are visible to it after this
    }
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
    // plan.flash_tensor_cores's shapes (checked here too: a wrong flag cannot miscompile)
    constexpr bool TC = MMA && R <= 8 && D % 16 == 0 && GS * BITS >= 128 && D * BITS >= 128;
#else
    constexpr bool TC = false;
#endif
    // Pass 2 on tensor cores too (it needs pass 1's vmax): a lane's dims of a value group are
    // 1 to 4 whole words.
    constexpr bool TCV = TC && MMA_V && GS * VBITS >= 256 && GS * VBITS <= 1024 && GS % 16 == 0;
    constexpr int NG = D / GS;  // quantization groups a row
    const int g8 = lane >> 2;  // tensor-core passes: the lane's row of an m16n8 fragment...
    const int t4 = lane & 3;  // ... and its column pair
    const int tiles = (rows + 15) / 16;  // ... and the chunk's 16-row tiles
    __shared__ float qs[TC ? R * NG : 1];  // TC: each query row's sum over each group
    __shared__ float vmax[TCV ? NG : 1];  // TCV: the chunk's largest |value scale| a group
    __shared__ float bsum[TCV ? R * NG : 1];  // TCV: sum over the chunk of p x value bias
    if (TC) {
        for (int k = threadIdx.x; k < (TCV ? R * NG : 0); k += blockDim.x) bsum[k] = 0.f;
        for (int k = threadIdx.x; k < (TCV ? NG : 0); k += blockDim.x) vmax[k] = 0.f;
        for (int k = wib; k < R * NG; k += WARPS) {
            const auto* qr = q + b * q_strides[0] + (h * R + k / NG) * q_strides[1] + (k % NG) * GS;
            float s = 0.f;
            for (int d = lane; d < GS; d += 32) s += static_cast<float>(qr[d]);
            #pragma unroll
            for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffff, s, off);
            if (lane == 0) qs[k] = s;
        }
        __syncthreads();
    }
    {
        // Pass 1: this chunk's scores, row j of query r at sm[r * CH + j].
        float qf[R][VPL];
        float qsum[R];
        if (!TC || (HAS_TAIL && in_tail)) {
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
        } else if (TC) {
            // A warp takes 16-row tiles. Lane (g8, t4) holds rows g8 and g8 + 8 of a tile:
            // NWT words of each, in VW-word loads, load l from word (4 l + t4) VW, so the 4
            // lanes of a row read it contiguously. A k-step takes two f16 pairs of each row's
            // words from every lane (the A operand), and the queries' values at the same dims
            // (B: query row g8, zero past R); the order of dims in a dot product is free, so
            // keys stay as loaded. A load never straddles a quantization group (VW <= WG / 4),
            // so a k-step's dims share one: its products sum into that group's accumulator,
            // scaled by the row's group scale after the tile.
            // (Constants of shapes without TC are clamped to 1: this branch still compiles.)
            constexpr int E = 32 / BITS;
            constexpr int NWT = TC ? D * BITS / 128 : 1;  // words a lane holds of a row
            constexpr int WG = TC ? GS * BITS / 32 : 4;  // words a group
            constexpr int VW = NWT < 4 ? (NWT < WG / 4 ? NWT : WG / 4) : (4 < WG / 4 ? 4 : WG / 4);
            constexpr int NL = NWT / VW;
            constexpr int KS = D / 16;
            constexpr int UT = 2;  // tiles a warp loads before computing on any
            constexpr bool QF32 = sizeof(q[0]) == 4;  // float32 queries: a second product for their residuals
            unsigned int qb[KS][2];
            unsigned int qr_[QF32 ? KS : 1][2];
            {
                const auto* qg = q + b * q_strides[0] + (h * R + min(g8, R - 1)) * q_strides[1];
                #pragma unroll
                for (int s = 0; s < KS; ++s) {
                    #pragma unroll
                    for (int i = 0; i < 2; ++i) {
                        const int p = 2 * s + i;  // the lane's p-th pair: word p / (E / 2) of its NWT
                        const int wi = p / (E / 2);
                        const int word = ((wi / VW) * 4 + t4) * VW + wi % VW;
                        const int2 o = pair_offsets<BITS>(p % (E / 2));
                        const float lo = g8 < R ? static_cast<float>(qg[word * E + o.x]) : 0.f;
                        const float hi = g8 < R ? static_cast<float>(qg[word * E + o.y]) : 0.f;
                        unsigned int res;
                        qb[s][i] = f16_pair(lo, hi, &res);
                        if (QF32) qr_[QF32 ? s : 0][i] = res;
                    }
                }
            }
            const int n0 = min(2 * t4, R - 1);
            const int n1 = min(2 * t4 + 1, R - 1);
            const unsigned int* k_row = kw + at(kw_strides, b, h, t_q);
            const auto* ks_row = ks + at(ks_strides, b, h, t_q);
            const auto* kb_row = kb + at(kb_strides, b, h, t_q);
            const auto* vs_row = vs + at(vs_strides, b, h, t_q);
            float vm[NG];
            #pragma unroll
            for (int G = 0; G < NG; ++G) vm[G] = 0.f;
            for (int tile0 = wib; tile0 < tiles; tile0 += WARPS * UT) {
                unsigned int w[UT][2][NWT];
                float s_[UT][2][NG], b_[UT][2][NG], bias[UT][2];
                #pragma unroll
                for (int u = 0; u < UT; ++u) {
                    #pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int jr = (tile0 + u * WARPS) * 16 + g8 + 8 * e;
                        const long j = min(jr, rows - 1);
                        #pragma unroll
                        for (int l = 0; l < NL; ++l) load_words<VW>(&w[u][e][l * VW], k_row + j * kw_strides[2] + (l * 4 + t4) * VW);
                        #pragma unroll
                        for (int G = 0; G < NG; ++G) {
                            s_[u][e][G] = static_cast<float>(ks_row[j * ks_strides[2] + G]);
                            b_[u][e][G] = static_cast<float>(kb_row[j * kb_strides[2] + G]);
                        }
                        bias[u][e] = HAS_MASK && jr < rows ? mrow[j * mask_strides[1]] : 0.f;
                        #pragma unroll
                        for (int G = 0; G < (TCV ? NG : 0); ++G)
                            vm[G] = fmaxf(vm[G], fabsf(static_cast<float>(vs_row[j * vs_strides[2] + G])));
                    }
                }
                #pragma unroll
                for (int u = 0; u < UT; ++u) {
                    const int tile = tile0 + u * WARPS;
                    if (tile >= tiles) break;
                    float acc[NG][4];
                    #pragma unroll
                    for (int G = 0; G < NG; ++G) acc[G][0] = acc[G][1] = acc[G][2] = acc[G][3] = 0.f;
                    #pragma unroll
                    for (int s = 0; s < KS; ++s) {
                        const int wi = (2 * s) / (E / 2);  // both pairs of a k-step are in this word
                        const int G = (wi / VW) * 4 * VW / WG;
                        const int p = (2 * s) % (E / 2);
                        const unsigned int a[4] = {
                            pair_f16<BITS>(w[u][0][wi], p), pair_f16<BITS>(w[u][1][wi], p),
                            pair_f16<BITS>(w[u][0][wi], p + 1), pair_f16<BITS>(w[u][1][wi], p + 1)};
                        mma_f16(acc[G], a, qb[s][0], qb[s][1]);
                        if (QF32) mma_f16(acc[G], a, qr_[QF32 ? s : 0][0], qr_[QF32 ? s : 0][1]);
                    }
                    // acc[G]: (row g8, queries 2 t4, 2 t4 + 1), then (row g8 + 8, the same).
                    #pragma unroll
                    for (int e = 0; e < 2; ++e) {
                        const int j = tile * 16 + g8 + 8 * e;
                        float sc0 = 0.f, sc1 = 0.f;
                        #pragma unroll
                        for (int G = 0; G < NG; ++G) {
                            sc0 += s_[u][e][G] * acc[G][2 * e] + b_[u][e][G] * qs[n0 * NG + G];
                            sc1 += s_[u][e][G] * acc[G][2 * e + 1] + b_[u][e][G] * qs[n1 * NG + G];
                        }
                        if (j < rows && 2 * t4 < R) sm[(2 * t4) * CH + j] = sc0 * scale + bias[u][e];
                        if (j < rows && 2 * t4 + 1 < R) sm[(2 * t4 + 1) * CH + j] = sc1 * scale + bias[u][e];
                    }
                }
            }
            #pragma unroll
            for (int G = 0; G < (TCV ? NG : 0); ++G) {
                float m = vm[G];
                #pragma unroll
                for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffff, m, off));
                if (lane == 0) atomicMax(reinterpret_cast<int*>(vmax) + G, __float_as_int(m));  // m >= 0
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
    // Pass 2: the probability-weighted rows of V, summed over the warp's row slots, then
    // over the block's warps (their partial sums take sm's place once all are done).
    if (TCV && !in_tail) {
        float tc[D / 16][4];  // an m16n8 tile a 16 dims (dims x query rows)
        float tb[NG];  // this lane's rows' sum of p x value bias, query g8
        #pragma unroll
        for (int k = 0; k < D / 16; ++k) tc[k][0] = tc[k][1] = tc[k][2] = tc[k][3] = 0.f;
        #pragma unroll
        for (int G = 0; G < NG; ++G) tb[G] = 0.f;
        // A warp takes 16-row tiles again. Lane (g8, t4) reads rows 2 t4, 2 t4 + 1, 2 t4 + 8
        // and 2 t4 + 9 of a tile (the k index), and in each group the GS / 8 dims from
        // g8 GS / 8 (one load). The A operand is V transposed: an m16 tile is 16 dims of one
        // group, row g8 its lane's dim 2i and row g8 + 8 dim 2i + 1; B is the queries'
        // numerators times the rows' value scales over the chunk's largest (|.| <= 1: f16
        // keeps them, a second product their residuals), so the integers stay exact as A.
        constexpr int EV = 32 / VBITS;
        constexpr int CW = TCV ? GS * VBITS / 256 : 1;  // words of a lane's dims in a group
        constexpr int MT = GS / 16;  // m16 tiles a group
        const unsigned int* v_row = vw + at(vw_strides, b, h, t_q) + g8 * CW;
        const auto* vs_row = vs + at(vs_strides, b, h, t_q);
        const auto* vb_row = vb + at(vb_strides, b, h, t_q);
        float inv[NG];
        #pragma unroll
        for (int G = 0; G < NG; ++G) inv[G] = vmax[G] > 0.f ? 1.f / vmax[G] : 0.f;
        for (int tile = wib; tile < tiles; tile += WARPS) {
            unsigned int w[4][NG][CW];
            float p[4], sv[4][NG], bv[4][NG];
            #pragma unroll
            for (int k = 0; k < 4; ++k) {
                const int jr = tile * 16 + 2 * t4 + (k & 1) + 8 * (k >> 1);
                const long j = min(jr, rows - 1);
                #pragma unroll
                for (int G = 0; G < NG; ++G) {
                    load_words<CW>(w[k][G], v_row + j * vw_strides[2] + G * GS * VBITS / 32);
                    sv[k][G] = static_cast<float>(vs_row[j * vs_strides[2] + G]);
                    bv[k][G] = static_cast<float>(vb_row[j * vb_strides[2] + G]);
                }
                p[k] = jr < rows && g8 < R ? sm[g8 * CH + jr] : 0.f;
            }
            #pragma unroll
            for (int G = 0; G < NG; ++G) {
                unsigned int r0, r1;
                const unsigned int b0 = f16_pair(p[0] * sv[0][G] * inv[G], p[1] * sv[1][G] * inv[G], &r0);
                const unsigned int b1 = f16_pair(p[2] * sv[2][G] * inv[G], p[3] * sv[3][G] * inv[G], &r1);
                tb[G] += p[0] * bv[0][G] + p[1] * bv[1][G] + p[2] * bv[2][G] + p[3] * bv[3][G];
                #pragma unroll
                for (int i = 0; i < MT; ++i) {
                    const int x = 2 * i / EV;
                    const int e = 2 * i % EV;
                    unsigned int a[4];
                    rows_pair_f16<VBITS>(w[0][G][x], w[1][G][x], e, a[0], a[1]);
                    rows_pair_f16<VBITS>(w[2][G][x], w[3][G][x], e, a[2], a[3]);
                    mma_f16(tc[G * MT + i], a, b0, b1);
                    mma_f16(tc[G * MT + i], a, r0, r1);
                }
            }
        }
        __syncthreads();  // every warp is done with the numerators
        // tc[G MT + i]: (dim 2i, queries 2 t4 and 2 t4 + 1), then (dim 2i + 1, the same), of
        // lane g8's dims in group G; scaled back by the group's vmax. The bias sums go to
        // bsum: summed over the row lanes (t4), then over warps.
        #pragma unroll
        for (int G = 0; G < NG; ++G) {
            #pragma unroll
            for (int i = 0; i < MT; ++i) {
                const int d = G * GS + g8 * (GS / 8) + 2 * i;
                #pragma unroll
                for (int x = 0; x < 2; ++x) {
                    const int r = 2 * t4 + x;
                    if (r < R) {
                        sm[(wib * R + r) * D + d] = tc[G * MT + i][x] * vmax[G];
                        sm[(wib * R + r) * D + d + 1] = tc[G * MT + i][2 + x] * vmax[G];
                    }
                }
            }
            float s = tb[G];
            s += __shfl_xor_sync(0xffffffff, s, 1);
            s += __shfl_xor_sync(0xffffffff, s, 2);
            if (t4 == 0 && g8 < R) atomicAdd(bsum + g8 * NG + G, s);
        }
    } else {
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
        __syncthreads();  // every warp is done with the numerators
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
    }
    __syncthreads();
    for (int k = threadIdx.x; k < R * D; k += blockDim.x) {
        float sum = TCV && !in_tail ? bsum[(k / D) * NG + (k % D) / GS] : 0.f;
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
