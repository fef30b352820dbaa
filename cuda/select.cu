// select.cu: Stage 1 selection, from pooled blocks to the bool block map.
//
// Must match reference.predict.predict_block_map (after pool_blocks / block_self_similarity,
// which block_stats.cu computes): compressed map S^_ij = scale * qbar_i . kbar_j (float32), -inf
// for non-self-similar K columns and causally invalid blocks, P^ = softmax_j, then TopCdf
// (select_topcdf), TopK (select_topk) or the mass threshold (select_mass_threshold), fix blocks,
// AND causal validity, attention sink.
//
// Two launches:
//   compressed_map   S^ [B, Hq, nq, nk] float32, tiled: grid (nk / 64, nq / 64, B * Hq), 256
//                    threads, each a 4 x 4 micro-tile of (query block, key block) pairs; the
//                    pooled rows pass through shared memory as float64 in chunks of 16 channels,
//                    so each is read once per tile (not once per pair).
//   select_rows<E>   rows of at most 32 E <= 512 key blocks: a warp per row of the map, from its
//                    row of S^, in registers (E keys per lane, a bitonic network of shuffles);
//   select_blocks    longer rows: one program per (query block i, query head h, batch b), 256
//                    threads, the row in dynamic shared memory (select_smem_bytes in
//                    sparge_cupy/_gpu.py): float p[nk] | float csum[nk] | uint64 keys[pow2 >= nk]
//                    | uint8 keep[nk]. Both do the same arithmetic in the same order.
//
// Numerics. The dot product and the softmax denominator are summed in float64 and rounded once,
// the exponential is float64 rounded to float32: each is the correctly rounded value (to float64
// summation order), which the reference's float32 BLAS / np.exp / pairwise sum reach up to an
// ulp. The sort and the cumulative sum are exact mirrors: P^ sorted by (value desc, index asc)
// with one bitonic sort of 64-bit keys, and a sequential float32 cumsum like np.cumsum (one
// thread, over values gathered in sorted order beforehand). The mass
// threshold needs neither: one correctly rounded float32 product nk * P^_j (__fmul_rn, as NumPy's
// float32 multiply) compared with the threshold, and the row's smallest key (its largest P^,
// lowest j on ties) where no block passes.
#include "common.cuh"

namespace sparge {

constexpr int SELECT_THREADS = 256;

// Causal block validity: block (i, j) holds a visible (query, key) pair (layout.valid_blocks).
__device__ __forceinline__ bool block_valid(int i, int j, int Lq, int Lk, int causal) {
    if (!causal) return true;
    const long long last_row = min((long long)(i + 1) * BQ, (long long)Lq) - 1;
    return (long long)j * BK <= last_row + (Lk - Lq);
}

// Key block j holds a key aligned with a row of query block i (query t <-> key t + Lk - Lq, as the
// causal mask aligns them): the local window, reference.local_blocks.
__device__ __forceinline__ bool block_local(int i, int j, int Lq, int Lk) {
    const long long off = (long long)Lk - Lq;
    const long long first = (long long)i * BQ + off;
    const long long last = min((long long)(i + 1) * BQ, (long long)Lq) - 1 + off;
    if (last < 0 || first > Lk - 1) return false;
    return j >= max(first, 0ll) / BK && j <= min(last, (long long)Lk - 1) / BK;
}

struct MapParams {
    const float* qbar;       // [B, Hq, nq, D]
    const float* kbar;       // [B, Hkv, nk, D] (pooled smoothed K)
    const float* k_sim;      // [B, Hkv, nk]
    const float* theta;      // [Hq] self-similarity threshold
    float* s_hat;            // [B, Hq, nq, nk] out: S^, -inf where not selectable
    int Hq, Hkv, nq, nk, D, Lq, Lk, causal;
    float scale;
};
static_assert(sizeof(MapParams) == 80, "mirrored by MAP_PARAMS in sparge_cupy/_gpu.py");

constexpr int MAP_TILE = 64;          // query blocks and key blocks per program
constexpr int MAP_CHUNK = 16;         // channels per shared-memory stage

// Thread (ty, tx) = (tid / 16, tid % 16) owns the pairs (ty + 16u, tx + 16v), u, v < 4: a warp
// reads 16 consecutive kbar values (conflict-free) and 2 qbar values (broadcast) per channel.
__global__ void __launch_bounds__(SELECT_THREADS) compressed_map(const MapParams p) {
    __shared__ double qs[MAP_CHUNK][MAP_TILE + 1], ks[MAP_CHUNK][MAP_TILE + 1];   // +1: fewer
                                                                                  // store conflicts
    const int j0 = blockIdx.x * MAP_TILE, i0 = blockIdx.y * MAP_TILE;
    const int h = blockIdx.z % p.Hq, b = blockIdx.z / p.Hq;
    const int kvh = h / (p.Hq / p.Hkv);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const float* qbar = p.qbar + ((size_t)b * p.Hq + h) * p.nq * p.D;
    const float* kbar = p.kbar + ((size_t)b * p.Hkv + kvh) * p.nk * p.D;
    double acc[4][4] = {};
    for (int d0 = 0; d0 < p.D; d0 += MAP_CHUNK) {
        // Stage 64 rows x 16 channels of each, transposed, zeros past nq / nk.
        for (int e = tid; e < MAP_TILE * MAP_CHUNK; e += SELECT_THREADS) {
            const int r = e / MAP_CHUNK, c = e % MAP_CHUNK;
            qs[c][r] = i0 + r < p.nq ? (double)qbar[(size_t)(i0 + r) * p.D + d0 + c] : 0.0;
            ks[c][r] = j0 + r < p.nk ? (double)kbar[(size_t)(j0 + r) * p.D + d0 + c] : 0.0;
        }
        __syncthreads();
#pragma unroll 4
        for (int c = 0; c < MAP_CHUNK; ++c) {
            double qv[4], kv[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                qv[u] = qs[c][ty + 16 * u];
                kv[u] = ks[c][tx + 16 * u];
            }
#pragma unroll
            for (int u = 0; u < 4; ++u)
#pragma unroll
                for (int v = 0; v < 4; ++v) acc[u][v] = fma(qv[u], kv[v], acc[u][v]);
        }
        __syncthreads();
    }
    const float* k_sim = p.k_sim + ((size_t)b * p.Hkv + kvh) * p.nk;
    const float theta = p.theta[h];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
        const int i = i0 + ty + 16 * u;
        if (i >= p.nq) continue;
        float* out = p.s_hat + (((size_t)b * p.Hq + h) * p.nq + i) * p.nk;
#pragma unroll
        for (int v = 0; v < 4; ++v) {
            const int j = j0 + tx + 16 * v;
            if (j >= p.nk) continue;
            const bool finite = block_valid(i, j, p.Lq, p.Lk, p.causal) && k_sim[j] > theta;
            out[j] = finite ? __fmul_rn(p.scale, (float)acc[u][v]) : -CUDART_INF_F;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The qbar-keys estimate (predictor="qbar_keys"; reference.predict.qbar_keys_logits): the pooled
// query of each query block against every smoothed key instead of every pooled key block,
//
//     S^_ij = LSE_{u in key block j} (scale * qbar_i . (k_u - km) + log n_iu),
//
// n_iu the share of block i's rows that see key u (1, or causal: a fraction on the diagonal; -inf
// where none does), so that softmax_j S^_ij = sum_{u in j} of the softmax over every key: the
// selection kernels below then run unchanged on this S^. On tensor cores: mma.sync m16n8k8 with
// TF32 operands and float32 accumulation. The pooled rows and the smoothed keys are rounded to
// TF32 on the way into shared memory (cvt.rna: 10 mantissa bits, ties away;
// reference.predict.round_tf32), their products are exact in float32, and only the accumulation
// order differs from the reference's float64 dot products of the same rounded operands (the GPU
// tests bound that); the LSE in log2 units through exp2f / log2f. It replaced a float32-FMA kernel
// (1.3-1.7x slower: bench/results/qbar_keys_kernels_2026-12-04_h200.md).
//
// With ``group`` < BQ (predictor="qgroup_keys"; reference.predict.query_keys_lse) the rows are
// the means of groups of ``group`` query rows, n_iu counts the rows of the group, and the output
// is the raw LSE of every group, [B, Hq, ng, nk], -inf only where no row of the group sees a key
// of the block (the self-similarity and validity masks come after group_mass_map averages the
// groups' softmaxes). "Query block" below reads "row group" then.
//
// Tiles of 64 pooled rows x 256 keys (four key blocks): grid (ceil(nq / 64), ceil(Lk / 256),
// B * Hq), 256 threads; warp w takes rows 16 (w % 4) .. + 15 of the tile and keys 128 (w / 4) ..
// + 127 (16 n-tiles of 8: 64 accumulators; the 4 lanes of a row reduce each key block's LSE by
// shuffles). Channels pass through shared memory 32 at a time (K converted, smoothed and rounded
// on the way in; rows padded to 36 words, so the fragment loads and the 16-byte stores are
// bank-conflict free), the next stage's loads in flight during the products. A warp none of
// whose rows sees its keys (causal) skips the products. Where the time goes (it is far from the
// tensor cores' peak): bench/NOTES.md.

struct QbarKeysParams {
    TensorView k;            // user K [B, Hkv, Lk, Dp], element type T
    const float* qbar;       // [B, Hq, nq, Dp] pooled Q (q_stats; q_groups with group < BQ)
    const float* km;         // [B, Hkv, Dp] K mean (head_scales)
    const float* k_sim;      // [B, Hkv, nk]
    const float* theta;      // [Hq]
    float* s_hat;            // [B, Hq, nq, nk] out: S^, -inf where not selectable (group < BQ:
                             // the groups' LSE, -inf where the group sees no key of the block)
    int Hq, Hkv, nq, nk, Lq, Lk, causal;   // nq: pooled rows (query blocks, or row groups)
    float scale;
    int group;               // query rows per pooled row: BQ, or a divisor of it
};
static_assert(sizeof(QbarKeysParams) == 120, "mirrored by QBAR_KEYS_PARAMS in sparge_cupy/_gpu.py");

constexpr int QK_THREADS = 256;        // 8 warps
constexpr int QK_ROWS = 64;            // pooled rows per program
constexpr int QK_KEYS = 256;           // keys per program (one staged key per thread)
constexpr int QK_MIN_BLOCKS = 2;       // programs per SM: 16 warps (<= 128 registers)

// Rows of query group i (of ``rows`` rows) that see key u: all of them, or (causal, bottom-right
// aligned) those t >= u - (Lk - Lq); 0 past the sequence ends.
__device__ __forceinline__ int seeing_rows(int i, int u, int Lq, int Lk, int causal, int rows) {
    const int t0 = i * rows, t1 = min(t0 + rows, Lq);
    if (u >= Lk || t0 >= t1) return 0;
    if (!causal) return t1 - t0;
    return max(0, t1 - max(t0, u - (Lk - Lq)));
}

constexpr int QM_CH = 32;                  // channels per shared-memory stage
constexpr int QM_PITCH = QM_CH + 4;        // words per staged row

__device__ __forceinline__ unsigned to_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
    return r;
}

__device__ __forceinline__ void mma_tf32(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <typename T, int D>
__global__ void __launch_bounds__(QK_THREADS, QK_MIN_BLOCKS) qbar_keys_mma(const QbarKeysParams p) {
    __shared__ __align__(16) unsigned sq[QK_ROWS][QM_PITCH];
    __shared__ __align__(16) unsigned sk[QK_KEYS][QM_PITCH];
    __shared__ float kms[D];
    constexpr int W = QM_CH * sizeof(T) / 4;                        // words of one key's stage
    const int tid = threadIdx.x, lane = tid & 31;
    const int warp = __shfl_sync(0xffffffffu, tid >> 5, 0);        // warp-uniform
    const int g = lane >> 2, t = lane & 3;                          // mma fragment coordinates
    const int i0 = blockIdx.x * QK_ROWS, u0 = blockIdx.y * QK_KEYS;
    const int h = blockIdx.z % p.Hq, b = blockIdx.z / p.Hq;
    const int kvh = h / (p.Hq / p.Hkv);
    const int wr = 16 * (warp & 3), wk = 128 * (warp >> 2);
    const int wi = i0 + wr, wu = u0 + wk;                           // the warp's first row, key
    const bool warp_sees = wi < p.nq && wu < p.Lk &&
                           seeing_rows(min(wi + 15, p.nq - 1), wu, p.Lq, p.Lk, p.causal, p.group) > 0;
    const bool any_sees = __syncthreads_or(warp_sees);

    float acc[16][4] = {};
    if (any_sees) {
        for (int c = tid; c < D; c += QK_THREADS) kms[c] = p.km[((size_t)b * p.Hkv + kvh) * D + c];
        // Staging: key u0 + tid (QM_CH channels, as words) and pooled row i0 + tid / 4, channels
        // 8 (tid % 4) .. + 7 of the stage; the next stage's loads are in flight during the MMAs.
        const bool vec = p.k.align >= 16;
        const bool key_ok = u0 + tid < p.Lk;
        const T* krow = row_ptr<T>(p.k, b, kvh, key_ok ? u0 + tid : 0);
        const int qr = tid >> 2, qc = 8 * (tid & 3);
        const bool q_ok = i0 + qr < p.nq;
        const float* qrow = p.qbar + (((size_t)b * p.Hq + h) * p.nq + (q_ok ? i0 + qr : 0)) * D + qc;
        unsigned w[W];
        float4 qa, qb;
        auto load_stage = [&](int d0) {
            load_words<T, QM_CH>(krow + d0, vec, key_ok, w);
            const float4 z = make_float4(0.f, 0.f, 0.f, 0.f);
            qa = q_ok ? *reinterpret_cast<const float4*>(qrow + d0) : z;
            qb = q_ok ? *reinterpret_cast<const float4*>(qrow + d0 + 4) : z;
        };
        load_stage(0);
        __syncthreads();                                            // kms
        for (int d0 = 0; d0 < D; d0 += QM_CH) {
            {
                float x[QM_CH];
                words_to_float<T, QM_CH>(w, x);
#pragma unroll
                for (int c = 0; c < QM_CH; c += 4) {
                    uint4 v;
                    v.x = key_ok ? to_tf32(__fsub_rn(x[c], kms[d0 + c])) : 0u;
                    v.y = key_ok ? to_tf32(__fsub_rn(x[c + 1], kms[d0 + c + 1])) : 0u;
                    v.z = key_ok ? to_tf32(__fsub_rn(x[c + 2], kms[d0 + c + 2])) : 0u;
                    v.w = key_ok ? to_tf32(__fsub_rn(x[c + 3], kms[d0 + c + 3])) : 0u;
                    *reinterpret_cast<uint4*>(&sk[tid][c]) = v;
                }
                *reinterpret_cast<uint4*>(&sq[qr][qc]) =
                    make_uint4(to_tf32(qa.x), to_tf32(qa.y), to_tf32(qa.z), to_tf32(qa.w));
                *reinterpret_cast<uint4*>(&sq[qr][qc + 4]) =
                    make_uint4(to_tf32(qb.x), to_tf32(qb.y), to_tf32(qb.z), to_tf32(qb.w));
            }
            __syncthreads();
            if (d0 + QM_CH < D) load_stage(d0 + QM_CH);
            if (warp_sees) {
#pragma unroll
                for (int ks = 0; ks < QM_CH; ks += 8) {
                    const unsigned a[4] = {sq[wr + g][ks + t], sq[wr + g + 8][ks + t],
                                           sq[wr + g][ks + t + 4], sq[wr + g + 8][ks + t + 4]};
#pragma unroll
                    for (int n = 0; n < 16; ++n)
                        mma_tf32(acc[n], a, sk[wk + 8 * n + g][ks + t], sk[wk + 8 * n + g][ks + t + 4]);
                }
            }
            __syncthreads();
        }
    }

    // Per row (g and g + 8 of the warp's 16) and key block (n-tiles 8 kb .. 8 kb + 7): the LSE of
    // its 64 logits, 16 per thread, over the 4 lanes t of the row by shuffles, in log2 units.
    const float c2 = __fmul_rn(p.scale, LOG2E);
    const int u_last = wu + 127;
    const bool full = u_last < p.Lk && (!p.causal || u_last - (p.Lk - p.Lq) <= wi * p.group);
    const bool raw = p.group != BQ;
    const float* k_sim = p.k_sim + ((size_t)b * p.Hkv + kvh) * p.nk;
    const float theta = p.theta[h];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
        const int i = wi + g + 8 * half;
        const bool row_ok = i < p.nq;
        const float log2_rows = row_ok ? log2f((float)min(p.group, p.Lq - i * p.group)) : 0.f;
#pragma unroll
        for (int kb = 0; kb < 2; ++kb) {
            float a[16], m = -CUDART_INF_F;
#pragma unroll
            for (int n = 0; n < 8; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const float s = acc[8 * kb + n][2 * half + e];
                    if (full) {
                        a[2 * n + e] = __fmul_rn(c2, s);
                    } else {
                        const int u = wu + 64 * kb + 8 * n + 2 * t + e;
                        const int cnt = row_ok ? seeing_rows(i, u, p.Lq, p.Lk, p.causal, p.group) : 0;
                        a[2 * n + e] = cnt > 0 ? __fmul_rn(c2, s) + (log2f((float)cnt) - log2_rows) : -CUDART_INF_F;
                    }
                    m = fmaxf(m, a[2 * n + e]);
                }
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 1));
            m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, 2));
            const float ms = m == -CUDART_INF_F ? 0.f : m;
            float s = 0.f;
#pragma unroll
            for (int v = 0; v < 16; ++v) s += exp2f(a[v] - ms);
            s += __shfl_xor_sync(0xffffffffu, s, 1);
            s += __shfl_xor_sync(0xffffffffu, s, 2);
            const int j = (wu + 64 * kb) / BK;
            if (t == 0 && row_ok && j < p.nk) {
                const bool finite = raw || (block_valid(i, j, p.Lq, p.Lk, p.causal) && k_sim[j] > theta);
                p.s_hat[(((size_t)b * p.Hq + h) * p.nq + i) * p.nk + j] =
                    finite && m != -CUDART_INF_F ? __fmul_rn(m + log2f(s), LN2) : -CUDART_INF_F;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The query-group estimate (predictor="qgroup_keys"; reference.predict.mean_group_logits): from
// the groups' LSE (qbar_keys_mma with group < BQ), the logits whose softmax is the mean of the
// groups' softmaxes over the query block's groups, weighted by their valid rows w_g:
//
//     S^_ij = log( sum_{g in i} w_g softmax_j(lse_g)_j / sum_{g in i} w_g ),
//
// in the log domain (log2 units, as the LSE above): per group c_g = log2 w_g - LSE2_j lse_gj (an
// online max and sum per lane, merged by shuffles), then per key block the LSE over the groups
// of lse_gj + c_g. -inf where the block is causally invalid or its K block not self-similar, as
// every S^ the selection takes. A warp per (query block, head, batch): grid
// (ceil(nq / GM_WARPS), Hq, B); lane l takes key blocks l, l + 32, ...

struct GroupMassParams {
    const float* lse;        // [B, Hq, ng, nk] the groups' LSE (natural log)
    const float* k_sim;      // [B, Hkv, nk]
    const float* theta;      // [Hq]
    float* s_hat;            // [B, Hq, nq, nk] out
    int Hq, Hkv, nq, ng, nk, Lq, Lk, causal, group;
};
static_assert(sizeof(GroupMassParams) == 72, "mirrored by GROUP_MASS_PARAMS in sparge_cupy/_gpu.py");

constexpr int GM_WARPS = 8;
constexpr int GM_MAX_GROUPS = 32;         // groups per query block: group >= BQ / 32 = 4 rows

// (m, s) <- the pair whose m + log2 s is log2(2^m1 s1 + 2^m2 s2); -inf m: an empty sum.
__device__ __forceinline__ void merge_lse2(float& m, float& s, float m2, float s2) {
    const float M = fmaxf(m, m2);
    if (M == -CUDART_INF_F) return;
    s = (m == -CUDART_INF_F ? 0.f : s * exp2f(m - M)) + (m2 == -CUDART_INF_F ? 0.f : s2 * exp2f(m2 - M));
    m = M;
}

__global__ void __launch_bounds__(GM_WARPS * 32) group_mass_map(const GroupMassParams p) {
    __shared__ float cg[GM_WARPS][GM_MAX_GROUPS];
    const int lane = threadIdx.x & 31;
    const int warp = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 5), 0);
    const int i = blockIdx.x * GM_WARPS + warp, h = blockIdx.y, b = blockIdx.z;
    if (i >= p.nq) return;                                          // warp-uniform
    const int kvh = h / (p.Hq / p.Hkv);
    const int per = BQ / p.group;
    const int g0 = i * per, g1 = min(g0 + per, p.ng);
    const float* lse = p.lse + (((size_t)b * p.Hq + h) * p.ng + g0) * p.nk;
    for (int g = 0; g < g1 - g0; ++g) {
        float m = -CUDART_INF_F, s = 0.f;
        for (int j = lane; j < p.nk; j += 32) merge_lse2(m, s, __fmul_rn(lse[(size_t)g * p.nk + j], LOG2E), 1.f);
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            merge_lse2(m, s, m2, s2);
        }
        const int w = min(p.group, p.Lq - (g0 + g) * p.group);
        if (lane == 0) cg[warp][g] = m == -CUDART_INF_F ? -CUDART_INF_F : log2f((float)w) - (m + log2f(s));
    }
    __syncwarp();
    const float log2_w = log2f((float)min(BQ, p.Lq - i * BQ));
    const float* k_sim = p.k_sim + ((size_t)b * p.Hkv + kvh) * p.nk;
    const float theta = p.theta[h];
    float* out = p.s_hat + (((size_t)b * p.Hq + h) * p.nq + i) * p.nk;
    for (int j = lane; j < p.nk; j += 32) {
        float m = -CUDART_INF_F, s = 0.f;
        for (int g = 0; g < g1 - g0; ++g) {
            const float c = cg[warp][g];
            if (c != -CUDART_INF_F) merge_lse2(m, s, __fmul_rn(lse[(size_t)g * p.nk + j], LOG2E) + c, 1.f);
        }
        const bool finite = block_valid(i, j, p.Lq, p.Lk, p.causal) && k_sim[j] > theta;
        out[j] = finite && m != -CUDART_INF_F ? __fmul_rn(m + log2f(s) - log2_w, LN2) : -CUDART_INF_F;
    }
}

struct SelectParams {
    const float* s_hat;      // [B, Hq, nq, nk] compressed_map's S^
    const float* q_sim;      // [B, Hq, nq]
    const float* k_sim;      // [B, Hkv, nk]
    const float* theta;      // [Hq] self-similarity threshold
    const float* tau;        // [Hq] TopCdf threshold, or nullptr
    const float* topk;       // [Hq] TopK fraction, or nullptr
    const float* mass_threshold;  // [Hq] threshold on nk * P^, or nullptr (exactly one of three)
    unsigned char* block_map;  // [B, Hq, nq, nk]
    int Hq, Hkv, nq, nk, Lq, Lk, causal, sink, local, nk_pow2;   // local: keep the local window
};
static_assert(sizeof(SelectParams) == 104, "mirrored by SELECT_PARAMS in sparge_cupy/_gpu.py");

__device__ __forceinline__ unsigned long long warp_min_u64(unsigned long long x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, o);
        x = y < x ? y : x;
    }
    return x;
}

__device__ __forceinline__ int warp_count(int x) {
    return __reduce_add_sync(0xffffffffu, x);
}

__device__ __forceinline__ double block_sum(double x, double* part) {
    x = warp_sum(x);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
    __syncthreads();
    double total = 0.0;
    for (int w = 0; w < SELECT_THREADS / 32; ++w) total += part[w];
    __syncthreads();
    return total;
}

__device__ __forceinline__ int block_count(int x, int* part) {
    x = warp_count(x);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
    __syncthreads();
    int total = 0;
    for (int w = 0; w < SELECT_THREADS / 32; ++w) total += part[w];
    __syncthreads();
    return total;
}

__device__ __forceinline__ float block_max(float x, float* part) {
    x = warp_max(x);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
    __syncthreads();
    float m = -CUDART_INF_F;
    for (int w = 0; w < SELECT_THREADS / 32; ++w) m = fmaxf(m, part[w]);
    __syncthreads();
    return m;
}

__device__ __forceinline__ unsigned long long block_min(unsigned long long x, unsigned long long* part) {
    x = warp_min_u64(x);
    if ((threadIdx.x & 31) == 0) part[threadIdx.x >> 5] = x;
    __syncthreads();
    unsigned long long m = ~0ull;
    for (int w = 0; w < SELECT_THREADS / 32; ++w) m = part[w] < m ? part[w] : m;
    __syncthreads();
    return m;
}

// P^ >= 0, so its bits order like its value: keys ascending = value descending, then index ascending.
__device__ __forceinline__ unsigned long long rank_key(float pj, int j) {
    return ((unsigned long long)(0xffffffffu - __float_as_uint(pj)) << 32) | (unsigned)j;
}

// The mass threshold rule on column j of row i (e: its exponential, total: the row's sum): sets
// keep[j], returns it, and lowers `best` to the column's rank key where the column is finite.
__device__ __forceinline__ bool mass_column(const SelectParams& p, int i, int j, float e,
                                            float total, const float* k_sim, float theta, float t,
                                            float nk_f, unsigned char* keep,
                                            unsigned long long& best) {
    const float pj = total > 0.f ? __fdiv_rn(e, total) : 0.f;
    const bool finite = block_valid(i, j, p.Lq, p.Lk, p.causal) && k_sim[j] > theta;
    const bool on = finite && __fmul_rn(nk_f, pj) >= t;
    keep[j] = on;
    if (finite) best = min(best, rank_key(pj, j));
    return on;
}

// Map row i (flat index row) from the selection keep[nk]: OR the fix blocks (non-self-similar
// Q row, non-self-similar K columns), AND causal validity, OR the sink and the local window.
// Columns first, first +
// step, ... are this thread's.
__device__ __forceinline__ void write_row(const SelectParams& p, int i, size_t row,
                                          const unsigned char* keep, const float* k_sim,
                                          float theta, int first, int step) {
    const bool q_fix = !(p.q_sim[row] > theta);
    unsigned char* out = p.block_map + row * p.nk;
    for (int j = first; j < p.nk; j += step) {
        const bool valid = block_valid(i, j, p.Lq, p.Lk, p.causal);
        bool on = (keep[j] || q_fix || !(k_sim[j] > theta)) && valid;
        if (j == 0 && p.sink) on = on || valid;
        if (p.local && block_local(i, j, p.Lq, p.Lk)) on = on || valid;
        out[j] = on;
    }
}

__global__ void __launch_bounds__(SELECT_THREADS) select_blocks(const SelectParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int nk = p.nk;
    unsigned long long* keys = reinterpret_cast<unsigned long long*>(smem_raw);   // [nk_pow2]
    float* prob = reinterpret_cast<float*>(keys + p.nk_pow2);                     // [nk]
    float* csum = prob + nk;                                                      // [nk]
    unsigned char* keep = reinterpret_cast<unsigned char*>(csum + nk);            // [nk]
    __shared__ double dpart[SELECT_THREADS / 32];
    __shared__ float fpart[SELECT_THREADS / 32];
    __shared__ int ipart[SELECT_THREADS / 32];
    __shared__ unsigned long long upart[SELECT_THREADS / 32];
    __shared__ int n_keep_s;

    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x;
    const int kvh = h / (p.Hq / p.Hkv);
    const float theta = p.theta[h];
    const size_t row = ((size_t)b * p.Hq + h) * p.nq + i;
    const float* k_sim = p.k_sim + ((size_t)b * p.Hkv + kvh) * nk;
    for (int j = tid; j < nk; j += SELECT_THREADS) prob[j] = p.s_hat[row * nk + j];
    __syncthreads();

    // Softmax over the finite columns (a row without any has P^ = 0 everywhere).
    float m = -CUDART_INF_F;
    int n_finite = 0, n_valid = 0;
    for (int j = tid; j < nk; j += SELECT_THREADS) {
        m = fmaxf(m, prob[j]);
        n_finite += prob[j] != -CUDART_INF_F;
        n_valid += block_valid(i, j, p.Lq, p.Lk, p.causal);
    }
    m = block_max(m, fpart);
    n_finite = block_count(n_finite, ipart);
    n_valid = block_count(n_valid, ipart);
    if (m == -CUDART_INF_F) m = 0.f;
    double z = 0.0;
    for (int j = tid; j < nk; j += SELECT_THREADS) {
        const float e = (float)exp((double)(prob[j] - m));          // exp(-inf) = 0
        prob[j] = e;
        z += (double)e;
    }
    const float total = (float)block_sum(z, dpart);

    if (p.mass_threshold) {
        // Mass threshold: keep finite j with fl32(nk * P^_j) >= t (nk = all key blocks of the
        // sequence, also in causal rows: mass relative to uniform attention over every key);
        // where none passes, the row's largest P^ (lowest j on ties). No sort.
        const float t = p.mass_threshold[h];
        const float nk_f = (float)nk;                                 // exact: nk < 2^24
        int n_kept = 0;
        unsigned long long best = ~0ull;                               // ~0: no finite column
        for (int j = tid; j < nk; j += SELECT_THREADS)
            n_kept += mass_column(p, i, j, prob[j], total, k_sim, theta, t, nk_f, keep, best);
        n_kept = block_count(n_kept, ipart);                          // syncs: keep[] is written
        best = block_min(best, upart);
        if (tid == 0 && n_kept == 0 && best != ~0ull) keep[best & 0xffffffffu] = 1;
        __syncthreads();
    } else {
        for (int j = tid; j < p.nk_pow2; j += SELECT_THREADS) {
            unsigned long long key = ~0ull;                              // padding sorts last
            if (j < nk) {
                const float pj = total > 0.f ? __fdiv_rn(prob[j], total) : 0.f;
                prob[j] = pj;
                key = rank_key(pj, j);
            }
            keys[j] = key;
        }
        __syncthreads();

        // Bitonic sort of the keys, ascending.
        for (int size = 2; size <= p.nk_pow2; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int a = tid; a < p.nk_pow2; a += SELECT_THREADS) {
                    const int c = a ^ stride;
                    if (c > a) {
                        const unsigned long long ka = keys[a], kc = keys[c];
                        if ((ka > kc) == ((a & size) == 0)) { keys[a] = kc; keys[c] = ka; }
                    }
                }
                __syncthreads();
            }
        }

        // How many sorted blocks to keep.
        if (p.tau) {
            // Gather P^ in sorted order (all threads), then one thread adds it up sequentially in
            // float32 like np.cumsum: the same additions in the same order, so the same bits; only
            // the dependent chain is left to the single thread (no key / index loads inside it).
            for (int r = tid; r < nk; r += SELECT_THREADS) csum[r] = prob[keys[r] & 0xffffffffu];
            __syncthreads();
            if (tid == 0) {
                float c = 0.f;
#pragma unroll 8
                for (int r = 0; r < nk; ++r) {
                    c = __fadd_rn(c, csum[r]);
                    csum[r] = c;
                }
            }
            __syncthreads();
            const float bound = __fmul_rn(p.tau[h], csum[nk - 1]);
            int below = 0;
            for (int r = tid; r < nk; r += SELECT_THREADS) below += csum[r] <= bound;
            below = block_count(below, ipart);
            if (tid == 0) n_keep_s = min(max(below, 1), n_finite);
        } else if (tid == 0) {
            const int k = (int)floorf(__fmul_rn(p.topk[h], (float)n_valid));
            n_keep_s = min(n_valid > 0 ? max(k, 1) : 0, n_finite);
        }
        __syncthreads();
        const int n_keep = n_keep_s;
        for (int r = tid; r < nk; r += SELECT_THREADS) keep[keys[r] & 0xffffffffu] = r < n_keep;
        __syncthreads();
    }

    write_row(p, i, row, keep, k_sim, theta, tid, SELECT_THREADS);
}

// ---------------------------------------------------------------------------------------------
// The same row, one warp per row, for rows of at most 32 E key blocks (E <= 16: nk <= 512): the
// row lives in registers, E keys per lane, and the sort is a bitonic network over the blocked
// layout (sorted position P = lane * E + e): strides below E swap within a lane, larger ones
// through shuffles. No barrier anywhere; the arithmetic is select_blocks', operation for
// operation, so both kernels give the same map bit for bit.
// Grid (ceil(nq / 8), Hq, B), 256 threads: warp w of program x builds row 8 x + w.

constexpr int ROW_WARPS = SELECT_THREADS / 32;

template <int E>
__global__ void __launch_bounds__(SELECT_THREADS) select_rows(const SelectParams p) {
    static_assert(E >= 1 && E <= 16 && (E & (E - 1)) == 0, "keys per lane: a power of two <= 16");
    constexpr int N = 32 * E;
    __shared__ unsigned char keep_all[ROW_WARPS][N];
    const int lane = threadIdx.x & 31;
    const int warp = __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 5), 0);   // warp-uniform
    const int i = blockIdx.x * ROW_WARPS + warp, h = blockIdx.y, b = blockIdx.z;
    if (i >= p.nq) return;
    const int nk = p.nk;
    unsigned char* keep = keep_all[warp];
    const int kvh = h / (p.Hq / p.Hkv);
    const float theta = p.theta[h];
    const size_t row = ((size_t)b * p.Hq + h) * p.nq + i;
    const float* k_sim = p.k_sim + ((size_t)b * p.Hkv + kvh) * nk;

    // Column j = e * 32 + lane in slot e (coalesced; the sort does not care where a key starts).
    float prob[E];
    float m = -CUDART_INF_F;
    int n_finite = 0, n_valid = 0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        const int j = e * 32 + lane;
        prob[e] = j < nk ? p.s_hat[row * nk + j] : -CUDART_INF_F;
        m = fmaxf(m, prob[e]);
        n_finite += prob[e] != -CUDART_INF_F;
        n_valid += j < nk && block_valid(i, j, p.Lq, p.Lk, p.causal);
        keep[j] = 0;
    }
    m = warp_max(m);
    n_finite = warp_count(n_finite);
    n_valid = warp_count(n_valid);
    if (m == -CUDART_INF_F) m = 0.f;
    double z = 0.0;
#pragma unroll
    for (int e = 0; e < E; ++e) {
        prob[e] = (float)exp((double)(prob[e] - m));                 // exp(-inf) = 0
        z += (double)prob[e];
    }
    const float total = (float)warp_sum(z);
    __syncwarp();

    if (p.mass_threshold) {
        const float t = p.mass_threshold[h];
        const float nk_f = (float)nk;                                 // exact: nk < 2^24
        int n_kept = 0;
        unsigned long long best = ~0ull;
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int j = e * 32 + lane;
            if (j < nk) n_kept += mass_column(p, i, j, prob[e], total, k_sim, theta, t, nk_f, keep, best);
        }
        n_kept = warp_count(n_kept);
        best = warp_min_u64(best);
        if (lane == 0 && n_kept == 0 && best != ~0ull) keep[best & 0xffffffffu] = 1;
    } else {
        unsigned long long key[E];
#pragma unroll
        for (int e = 0; e < E; ++e) {
            const int j = e * 32 + lane;
            key[e] = j < nk ? rank_key(total > 0.f ? __fdiv_rn(prob[e], total) : 0.f, j) : ~0ull;
        }
        // Bitonic sort, ascending, over positions P = lane * E + e.
#pragma unroll
        for (int size = 2; size <= N; size <<= 1) {
#pragma unroll
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                if (stride >= E) {                               // partner: lane ^ (stride / E)
                    const int lj = stride / E;
                    const bool lower = (lane & lj) == 0;
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        const unsigned long long other = __shfl_xor_sync(0xffffffffu, key[e], lj);
                        const bool up = ((lane * E + e) & size) == 0;
                        const bool take_min = lower == up;
                        key[e] = take_min ? (other < key[e] ? other : key[e])
                                          : (other > key[e] ? other : key[e]);
                    }
                } else {                                         // partner: slot e ^ stride
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        if (e & stride) continue;
                        const int f = e | stride;
                        const bool up = ((lane * E + e) & size) == 0;
                        const unsigned long long a = key[e], c = key[f];
                        if ((a > c) == up) { key[e] = c; key[f] = a; }
                    }
                }
            }
        }
        int n_keep;
        if (p.tau) {
            // The float32 cumsum in sorted order, sequential as np.cumsum: lane by lane, each
            // lane adding its E values to the running sum it gets from the lane before.
            float csum[E] = {};
            float carry = 0.f;
            const int lanes_used = (nk + E - 1) / E;
            for (int l = 0; l < lanes_used; ++l) {
                if (lane == l) {
                    float c = carry;
#pragma unroll
                    for (int e = 0; e < E; ++e) {
                        c = __fadd_rn(c, __uint_as_float(0xffffffffu - (unsigned)(key[e] >> 32)));
                        csum[e] = c;
                    }
                    carry = c;
                }
                carry = __shfl_sync(0xffffffffu, carry, l);
            }
            // csum of the last real position nk - 1 (padding keys add +0 and sort last, so
            // the last lane's running sum is that total unless the padding starts mid-lane).
            const int last = nk - 1;
            float row_total = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e)
                if (lane * E + e == last) row_total = csum[e];
            row_total = __shfl_sync(0xffffffffu, row_total, last / E);
            const float bound = __fmul_rn(p.tau[h], row_total);
            int below = 0;
#pragma unroll
            for (int e = 0; e < E; ++e) below += lane * E + e < nk && lane < lanes_used && csum[e] <= bound;
            below = warp_count(below);
            n_keep = min(max(below, 1), n_finite);
        } else {
            const int k = (int)floorf(__fmul_rn(p.topk[h], (float)n_valid));
            n_keep = min(n_valid > 0 ? max(k, 1) : 0, n_finite);
        }
#pragma unroll
        for (int e = 0; e < E; ++e)
            if (lane * E + e < n_keep) keep[key[e] & 0xffffffffu] = 1;
    }
    __syncwarp();

    write_row(p, i, row, keep, k_sim, theta, lane, 32);
}

}  // namespace sparge
