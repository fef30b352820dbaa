// block_stats.cu: Stage 1 statistics and the INT8 / fp16 quantization of Q and smoothed K.
//
// Must match (reference/):
//   k_sums + head_scales    -> quant.smooth_k          km = mean_t K (float64 sum, one rounding)
//                              quant.channel_scales    s_c = sqrt(max_t |K - km|_c / max |Q|_c)
//   q_stats (Q), k_pass (K - km)
//                           -> predict.pool_blocks     qbar, kbar: mean of the valid rows
//                              predict.block_self_similarity   sim = ||mean_r x_r/max(||x_r||,eps)||^2
//   quantize_q (Q), k_pass  -> attention.quantized_operands / quant.quantize_int8_per_block
//
// Passes over memory, in launch order (sparge_cupy/_gpu.py):
//   A  q_stats      Q   qbar, q_sim (prediction only), channel max |Q| per block and per kv head
//      q_groups     Q   the means of groups of CONFIG.query_group rows (predictor="qgroup_keys" only)
//      k_sums       K   per key block: column sums (float64), channel max and min of K
//      head_scales      per (b, kv head, channel): km, max |K - km|, the rebalancing scale s_c
//   B  k_pass       K   K - km: kbar, k_sim (prediction only), the operand and its block scale
//      quantize_q   Q   the operand and its block scale, q . km (for the LSE)
// Q and K are each read twice: s_c needs maxima over the whole head, so no pass can both measure
// and quantize. Pass A counts the NaN / Inf of Q and K into a device counter that the launcher
// reads once. The block maximum of the rebalanced smoothed K needs no pass of its own:
// t -> fl(K_t - km) is monotone, so max_t |fl(K_t - km)| = max(fl(max K - km), fl(km - min K)),
// and x -> fl(x / s_c), x -> fl(x s_c) are monotone and odd, so the maxima commute with them.
//
// Shapes: user tensors through TensorView (HND or NHD, fp16 / fp32 / bf16, D in {64, 128, 256}:
// the launcher zero-pads other head dims, which changes none of these statistics). Internal
// outputs are dense float32 [B, H, nb, ...]; quantized operands are [B, H, nb * block, D] with the
// rows past L written as zeros. One warp per block: grid (ceil(nb / 4), head, batch), 128 threads,
// warp w of program x handles block 4x + w, so no block needs shared memory or a barrier. Rows
// stream through RowLanes (common.cuh): lane l holds 8 channels of a row, one warp step covers
// 32 / LANES consecutive rows, and the warp loads a stage of steps (up to 32 registers) before
// using any, so that a stage's loads are all in flight together. Partial sums meet across the
// rows of a step by shuffles, always in the same order: every result is deterministic.
#include "common.cuh"

namespace sparge {

constexpr int STATS_THREADS = 128;                    // the per-block kernels: a warp per block
constexpr int STATS_WARPS = STATS_THREADS / 32;
// Programs per SM the per-block kernels are compiled for (their register cap: 65536 / (128 x
// this)); bench/NOTES.md has the measured choice.
#ifndef SPARGE_STATS_MIN_BLOCKS
#define SPARGE_STATS_MIN_BLOCKS 4
#endif

// The block (index, valid rows, first row) of this warp, or false past the last block. The warp
// index goes through a shuffle so that the compiler knows it is warp-uniform: every branch on
// the block is then uniform, and the shuffles inside need no divergence handling.
__device__ __forceinline__ bool warp_block(int L, int block, int& i, int& n, long long& row0) {
    i = blockIdx.x * STATS_WARPS + __shfl_sync(0xffffffffu, (int)(threadIdx.x >> 5), 0);
    row0 = (long long)i * block;
    n = min(block, L - (int)row0);
    return row0 < L;
}

// Calls f(r, valid, x) for the rows r of this warp's block of BLOCK rows (x: this lane's
// 8 channels, zeros past the n valid rows), in stages whose loads are all issued before the
// first use (a stage: at most STAGE_REGS registers of loaded words). Stages wholly past n are
// skipped unless ALL (the quantizers write every row). Every lane of the warp calls f together.
template <typename T, int D, int BLOCK, bool ALL = false, int STAGE_REGS = 32, typename F>
__device__ __forceinline__ void for_block_rows(const TensorView& x, int b, int h, long long row0,
                                               int n, F&& f) {
    using M = RowLanes<D>;
    constexpr int WORDS = M::CPL * (int)sizeof(T) / 4;       // 4 (16-bit types) or 8 (fp32)
    constexpr int STEPS = BLOCK / M::ROWS;                   // row steps of the block
    constexpr int STAGE = STEPS * WORDS <= STAGE_REGS ? STEPS : STAGE_REGS / WORDS;
    static_assert(STEPS >= 1 && STEPS % STAGE == 0, "whole stages per block");
    const int lane = threadIdx.x & 31;
    const int sub = lane / M::LANES, c0 = (lane % M::LANES) * M::CPL;
    const bool vec = x.align >= chunk_vec_bytes<T, M::CPL>();
    const T* src = row_ptr<T>(x, b, h, row0 + sub) + c0;   // advanced a row step at a time
    const long long step = M::ROWS * x.stride_t;
#pragma unroll 1
    for (int s0 = 0; s0 < STEPS && (ALL || s0 * M::ROWS < n); s0 += STAGE) {
        unsigned w[STAGE][WORDS];
#pragma unroll
        for (int s = 0; s < STAGE; ++s, src += step) {
            const int r = (s0 + s) * M::ROWS + sub;          // r >= n: not read
            load_words<T, M::CPL>(src, vec, r < n, w[s]);
        }
#pragma unroll
        for (int s = 0; s < STAGE; ++s) {
            const int r = (s0 + s) * M::ROWS + sub;
            float v[M::CPL];
            words_to_float<T, M::CPL>(w[s], v);
            f(r, r < n, v);
        }
    }
}

// The pooled mean and the self-similarity of a block, accumulated per lane over its rows.
// Float64 throughout, rounded once to float32, as the reference; the unit row is x * rsqrt(||x||^2)
// (within two float64 ulps of x / ||x||), and rows of norm below eps are divided by eps.
template <int D>
struct Pooling {
    static constexpr int CPL = RowLanes<D>::CPL, LANES = RowLanes<D>::LANES;
    double sum[CPL] = {}, unit[CPL] = {};

    // Every lane of the warp calls this together (the row norm is a shuffle reduction); rows
    // past the block's end come as zeros and add nothing. KEEP: the row's float64 values stay in
    // registers across the row norm, else they are converted again for the unit row. Which one
    // spills nothing is the register allocator's call: ptxas (13.5, sm_90a, 128 registers) has
    // q_stats spill 12-24 bytes without KEEP and k_pass 24-92 with it, neither the other way.
    template <bool KEEP>
    __device__ __forceinline__ void add(const float (&x)[CPL], double eps, double inv_eps) {
        double xd[CPL], ss0 = 0.0, ss1 = 0.0;             // two chains: half the latency
#pragma unroll
        for (int c = 0; c < CPL; ++c) xd[c] = to_f64(x[c]);
#pragma unroll
        for (int c = 0; c < CPL; c += 2) {
            sum[c] += xd[c];
            sum[c + 1] += xd[c + 1];
            ss0 = fma(xd[c], xd[c], ss0);                   // x^2 is exact in float64
            ss1 = fma(xd[c + 1], xd[c + 1], ss1);
        }
        const double ss = row_sum<LANES>(ss0 + ss1);
        const double inv = ss >= eps * eps ? rsqrt(ss) : inv_eps;
#pragma unroll
        for (int c = 0; c < CPL; ++c) unit[c] = fma(KEEP ? xd[c] : to_f64(x[c]), inv, unit[c]);
    }

    // Block totals of the warp: pooled[d] = sum / n and sim = sum_d (unit_d / n)^2.
    __device__ __forceinline__ void finish(int n, float* pooled, float* sim) {
        const int lane = threadIdx.x & 31, c0 = (lane % LANES) * CPL;
        double u2 = 0.0;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            const double um = across_rows_sum<LANES>(unit[c]) / n;
            u2 = fma(um, um, u2);
            sum[c] = across_rows_sum<LANES>(sum[c]);
        }
        u2 = row_sum<LANES>(u2);                          // over all D channels
        if (lane < LANES) {
#pragma unroll
            for (int c = 0; c < CPL; ++c) pooled[c0 + c] = (float)(sum[c] / n);
        }
        if (lane == 0) *sim = (float)u2;
    }
};

// ---------------------------------------------------------------------------------------------
// Pass A.

struct QStatsParams {
    TensorView x;            // Q [B, H, L, D]
    float* pooled;           // [B, H, nq, D] qbar, or nullptr (no prediction: then sim too)
    float* sim;              // [B, H, nq]
    float* block_amax;       // [B, H, nq, D] per-channel max |Q| over the block
    float* head_amax;        // [B, H / heads_per_kv, D] atomic max of block_amax (start at 0)
    unsigned long long* nonfinite;  // NaN / Inf count of Q (add_nonfinite), or nullptr
    int H, L, heads_per_kv;
    double sim_eps;          // CONFIG.sim_eps, as the reference's float64 guard
};
static_assert(sizeof(QStatsParams) == 104, "mirrored by Q_STATS_PARAMS in sparge_cupy/_gpu.py");

// A warp per (query block i, head h, batch b).
template <typename T, int D>
__global__ void __launch_bounds__(STATS_THREADS, SPARGE_STATS_MIN_BLOCKS) q_stats(const QStatsParams p) {
    using M = RowLanes<D>;
    constexpr int CPL = M::CPL;
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    int i, n;
    long long row0;
    if (!warp_block(p.L, BQ, i, n, row0)) return;
    const int nb = (p.L + BQ - 1) / BQ;
    const bool pooled = p.pooled != nullptr;

    Pooling<D> pool;
    const double inv_eps = 1.0 / p.sim_eps;
    float amax[CPL] = {};
    unsigned bad = 0;
    auto rows = [&](auto pooled_flag) {
        for_block_rows<T, D, BQ>(p.x, b, h, row0, n, [&](int, bool, const float (&x)[CPL]) {
            bad += count_nonfinite(x);
#pragma unroll
            for (int c = 0; c < CPL; ++c) amax[c] = fmaxf(amax[c], fabsf(x[c]));
            if constexpr (decltype(pooled_flag)::value) pool.template add<true>(x, p.sim_eps, inv_eps);
        });
    };
    if (pooled) rows(Flag<true>{});
    else rows(Flag<false>{});
    if (p.nonfinite) add_nonfinite(p.nonfinite, bad);

    const size_t blk = ((size_t)b * p.H + h) * nb + i;
    if (pooled) pool.finish(n, p.pooled + blk * D, p.sim + blk);
    const int c0 = (lane % M::LANES) * CPL;
    const int Hkv = p.H / p.heads_per_kv;
    float* head = p.head_amax + ((size_t)b * Hkv + h / p.heads_per_kv) * D + c0;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const float m = across_rows_max<M::LANES>(amax[c]);
        if (lane < M::LANES) {
            p.block_amax[blk * D + c0 + c] = m;
            atomic_max_nonneg(head + c, m);
        }
    }
}

// A warp per (group of G query rows, head h, batch b): the mean of the group's valid rows, summed
// in float64 and rounded once (reference.pool_blocks(q, G)), [B, H, ceil(L / G), D]: the pooled
// rows of predictor="qgroup_keys" (select.cu qbar_keys_mma with group = G).
template <typename T, int D, int G>
__global__ void __launch_bounds__(STATS_THREADS, SPARGE_STATS_MIN_BLOCKS) q_groups(const TensorView x, float* pooled,
                                                                                   int H, int L) {
    using M = RowLanes<D>;
    constexpr int CPL = M::CPL;
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    int g, n;
    long long row0;
    if (!warp_block(L, G, g, n, row0)) return;
    double sum[CPL] = {};
    for_block_rows<T, D, G>(x, b, h, row0, n, [&](int, bool, const float (&v)[CPL]) {
#pragma unroll
        for (int c = 0; c < CPL; ++c) sum[c] += to_f64(v[c]);
    });
    const int ng = (L + G - 1) / G;
    float* out = pooled + (((size_t)b * H + h) * ng + g) * D + (lane % M::LANES) * CPL;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const double s = across_rows_sum<M::LANES>(sum[c]);
        if (lane < M::LANES) out[c] = (float)(s / n);
    }
}

// A warp per (key block j, kv head h, batch b): the block's column sums of K in float64
// (for km) and its channel max and min (for max |K - km|, and later the block's INT8 scale),
// [B, H, nk, D] each; counts K's NaN / Inf into *nonfinite unless it is nullptr.
template <typename T, int D>
__global__ void __launch_bounds__(STATS_THREADS, SPARGE_STATS_MIN_BLOCKS) k_sums(const TensorView k, double* sums,
                                                        float* kmax, float* kmin,
                                                        unsigned long long* nonfinite,
                                                        const int H, const int L) {
    using M = RowLanes<D>;
    constexpr int CPL = M::CPL;
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    int j, n;
    long long row0;
    if (!warp_block(L, BK, j, n, row0)) return;
    double s[CPL] = {};
    float mx[CPL], mn[CPL];
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        mx[c] = -CUDART_INF_F;
        mn[c] = CUDART_INF_F;
    }
    unsigned bad = 0;
    for_block_rows<T, D, BK>(k, b, h, row0, n, [&](int, bool valid, const float (&x)[CPL]) {
        bad += count_nonfinite(x);
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            s[c] += to_f64(x[c]);                            // zeros past n add nothing
            mx[c] = fmaxf(mx[c], valid ? x[c] : -CUDART_INF_F);
            mn[c] = fminf(mn[c], valid ? x[c] : CUDART_INF_F);
        }
    });
    if (nonfinite) add_nonfinite(nonfinite, bad);
    const int nk = (L + BK - 1) / BK, c0 = (lane % M::LANES) * CPL;
    const size_t o = (((size_t)b * H + h) * nk + j) * D + c0;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const double total = across_rows_sum<M::LANES>(s[c]);
        const float hi = across_rows_max<M::LANES>(mx[c]), lo = across_rows_min<M::LANES>(mn[c]);
        if (lane < M::LANES) {
            sums[o + c] = total;
            kmax[o + c] = hi;
            kmin[o + c] = lo;
        }
    }
}

struct HeadScalesParams {
    const double* sums;      // [B, Hkv, nk, D] k_sums' column sums
    const float* kmax;       // [B, Hkv, nk, D]
    const float* kmin;
    const float* q_amax;     // [B, Hkv, D] channel max |Q|, or nullptr (no rebalancing)
    const float* km_given;   // [B, Hkv, D] or nullptr: the K mean to use instead of K's own
    const float* k_amax_given;  // [B, Hkv, D] or nullptr: max |K - km| to use instead
    float* km;               // [B, Hkv, D] out
    float* k_amax;           // [B, Hkv, D] out
    float* s_c;              // [B, Hkv, D] out: rebalancing scales (1 without q_amax)
    int H, L;
};
static_assert(sizeof(HeadScalesParams) == 80, "mirrored by HEAD_SCALES_PARAMS in sparge_cupy/_gpu.py");

constexpr int SCALES_WARPS = 8;

// Grid (D / 32, kv head, batch), 256 threads: lane = channel of the program's 32, warp w adds
// the key blocks w, w + 8, ... ; the 8 partial sums meet in warp order. km = sum / L rounded
// once to float32; max |K - km| from the block max and min (see the header).
__global__ void __launch_bounds__(SCALES_WARPS * 32) head_scales(const HeadScalesParams p) {
    __shared__ double part_sum[SCALES_WARPS][32];
    __shared__ float part_max[SCALES_WARPS][32], part_min[SCALES_WARPS][32];
    const int h = blockIdx.y, b = blockIdx.z;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int D = gridDim.x * 32, d = blockIdx.x * 32 + lane;
    const int nk = (p.L + BK - 1) / BK;
    const size_t head = (size_t)b * p.H + h;
    double s = 0.0;
    float hi = -CUDART_INF_F, lo = CUDART_INF_F;
#pragma unroll 4
    for (int j = warp; j < nk; j += SCALES_WARPS) {
        const size_t o = (head * nk + j) * D + d;
        s += p.sums[o];
        hi = fmaxf(hi, p.kmax[o]);
        lo = fminf(lo, p.kmin[o]);
    }
    part_sum[warp][lane] = s;
    part_max[warp][lane] = hi;
    part_min[warp][lane] = lo;
    __syncthreads();
    if (warp == 0) {
        s = part_sum[0][lane];
        for (int w = 1; w < SCALES_WARPS; ++w) {
            s += part_sum[w][lane];
            hi = fmaxf(hi, part_max[w][lane]);
            lo = fminf(lo, part_min[w][lane]);
        }
        const size_t o = head * D + d;
        const float km = p.km_given ? p.km_given[o] : (float)(s / p.L);
        const float ka = p.k_amax_given ? p.k_amax_given[o]
                                        : fmaxf(__fsub_rn(hi, km), __fsub_rn(km, lo));
        p.km[o] = km;
        p.k_amax[o] = ka;
        p.s_c[o] = p.q_amax ? rebalance_scale(p.q_amax[o], ka) : 1.f;
    }
}

// ---------------------------------------------------------------------------------------------
// Pass B: the operands.

// N rebalanced values of a row to the operand type, stored with one vector store: INT8
// round(v / delta) (delta through its reciprocal rd, div_by) or fp16 rounding (delta unused).
template <bool FAST, int N>
__device__ __forceinline__ void store_operands(signed char* out, const float (&v)[N], float delta,
                                               float rd) {
    static_assert(N % 4 == 0, "whole words");
    // Round half to even of the correctly rounded quotient, as np.rint(x / delta). No clip is
    // needed: |v| <= amax and delta = fl(amax / 127), so |v / delta| < 127.0001 rounds into
    // [-127, 127] (the reference's clip changes nothing for finite inputs).
    int qv[N];
#pragma unroll
    for (int e = 0; e < N; ++e) qv[e] = __float2int_rn(div_by<FAST>(v[e], delta, rd));
    unsigned w[N / 4];
#pragma unroll
    for (int e = 0; e < N; e += 4)                        // low bytes of four ints, in order
        w[e / 4] = __byte_perm(__byte_perm(qv[e], qv[e + 1], 0x40), __byte_perm(qv[e + 2], qv[e + 3], 0x40),
                               0x5410);
    store_bytes<N>(out, w);
}
template <bool FAST, int N>
__device__ __forceinline__ void store_operands(__half* out, const float (&v)[N], float, float) {
    unsigned w[(N + 1) / 2] = {};
#pragma unroll
    for (int e = 0; e < N; ++e)
        w[e / 2] |= (unsigned)__half_as_ushort(__float2half_rn(v[e])) << (16 * (e % 2));
    store_bytes<2 * N>(out, w);
}

// The block's scale: delta = fl(amax / 127) of the rebalanced block maximum (every lane gets it),
// 1 for an all-zero block or an fp16 operand.
template <bool INT8>
__device__ __forceinline__ float block_delta(float lane_amax) {
    const float amax = warp_max(lane_amax);
    return (INT8 && amax > 0.f) ? __fdiv_rn(amax, INT8_MAX_F) : 1.f;
}

// What the quantizers' row loop needs of the block's scale: delta (block_delta), its reciprocal,
// and whether div_rn serves every division of the warp: `lane_fast` says the lane's other divisors
// (its channels' s_c) passed div_rn_ok; the result is the same on every lane, as the Flag
// dispatch of a row loop with warp shuffles needs. Lane 0 stores delta at `out` (if given).
struct BlockScale {
    float delta, rd;
    bool fast;
};
template <bool INT8>
__device__ __forceinline__ BlockScale block_scale(float lane_amax, bool lane_fast, float* out) {
    const float delta = block_delta<INT8>(lane_amax);
    if (out && (threadIdx.x & 31) == 0) *out = delta;
    return {delta, __frcp_rn(delta), __all_sync(0xffffffffu, lane_fast && div_rn_ok(delta)) != 0};
}

struct KPassParams {
    TensorView x;            // K [B, H, L, D]
    const float* km;         // [B, H, D] K mean
    const float* s_c;        // [B, H, D] rebalancing scales, or nullptr (no rebalancing: all 1)
    const float* kmax;       // [B, H, nk, D] k_sums' block channel max and min of K
    const float* kmin;
    float* pooled;           // [B, H, nk, D] kbar, or nullptr (no prediction: then sim too)
    float* sim;              // [B, H, nk]
    void* out;               // [B, H, nk * BK, D] int8 or fp16 operand, or nullptr (no operand)
    float* delta;            // [B, H, nk] INT8 scale (1 for fp16 operands)
    int H, L;
    double sim_eps;
};
static_assert(sizeof(KPassParams) == 120, "mirrored by K_PASS_PARAMS in sparge_cupy/_gpu.py");

// A warp per (key block j, kv head h, batch b): x = fl(K - km) as the reference, pooled
// and similarity of x (with pooled), the operand fl(x / s_c) quantized with the block's scale
// (with out).
template <typename T, typename OutT, int D>
__global__ void __launch_bounds__(STATS_THREADS, SPARGE_STATS_MIN_BLOCKS) k_pass(const KPassParams p) {
    using M = RowLanes<D>;
    constexpr int CPL = M::CPL;
    constexpr bool INT8 = sizeof(OutT) == 1;
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    int j, n;
    long long row0;
    if (!warp_block(p.L, BK, j, n, row0)) return;
    const int nk = (p.L + BK - 1) / BK;
    const size_t blk = ((size_t)b * p.H + h) * nk + j;
    const int c0 = (lane % M::LANES) * CPL;

    // The lane's channels: K mean, s_c and its reciprocal; the block maximum of fl(x / s_c).
    float km[CPL], s[CPL], rs[CPL];
    float a = 0.f;
    bool fast = true;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const size_t ch = ((size_t)b * p.H + h) * D + c0 + c;
        km[c] = p.km[ch];
        s[c] = p.s_c ? p.s_c[ch] : 1.f;
        rs[c] = __frcp_rn(s[c]);
        fast = fast && div_rn_ok(s[c]);
        const float m = fmaxf(__fsub_rn(p.kmax[blk * D + c0 + c], km[c]),
                              __fsub_rn(km[c], p.kmin[blk * D + c0 + c]));
        a = fmaxf(a, __fdiv_rn(m, s[c]));
    }
    const BlockScale sc = block_scale<INT8>(a, fast, p.out ? p.delta + blk : nullptr);
    const float delta = sc.delta, rd = sc.rd;

    const bool pooled = p.pooled != nullptr;
    OutT* out = p.out ? static_cast<OutT*>(p.out) + blk * BK * D + c0 : nullptr;
    Pooling<D> pool;
    const double inv_eps = 1.0 / p.sim_eps;
    // The row loop in the three forms the launcher uses (uniform flags become compile-time):
    // pooled + operand (sparge_attn), operand only, pooled only (prediction alone).
    auto rows = [&](auto pooled_flag, auto quant_flag, auto fast_flag) {
        constexpr bool POOLED = decltype(pooled_flag)::value, QUANT = decltype(quant_flag)::value;
        constexpr bool FAST = decltype(fast_flag)::value;
        // 16 registers of loads per stage: the pooled sums and the quantizer's scales need the rest
        for_block_rows<T, D, BK, QUANT, 16>(p.x, b, h, row0, n, [&](int r, bool valid, const float (&xk)[CPL]) {
            float x[CPL];
#pragma unroll
            for (int c = 0; c < CPL; ++c) x[c] = valid ? __fsub_rn(xk[c], km[c]) : 0.f;
            if constexpr (POOLED) pool.template add<false>(x, p.sim_eps, inv_eps);
            if constexpr (QUANT) {                       // rows past L: zeros
                float v[CPL];
#pragma unroll
                for (int c = 0; c < CPL; ++c) v[c] = div_by<FAST>(x[c], s[c], rs[c]);
                store_operands<FAST, CPL>(out + (size_t)r * D, v, delta, rd);
            }
        });
    };
    if (!out) rows(Flag<true>{}, Flag<false>{}, Flag<true>{});
    else if (!sc.fast) rows(Flag<true>{}, Flag<true>{}, Flag<false>{});   // rare: pooled or not
    else if (pooled) rows(Flag<true>{}, Flag<true>{}, Flag<true>{});
    else rows(Flag<false>{}, Flag<true>{}, Flag<true>{});
    if (pooled) pool.finish(n, p.pooled + blk * D, p.sim + blk);
}

struct QuantizeQParams {
    TensorView x;            // Q [B, H, L, D]
    const float* s_c;        // [B, Hkv, D] rebalancing scales, or nullptr (no rebalancing: all 1)
    const float* km;         // [B, Hkv, D] K mean, for q . km, or nullptr (no LSE)
    const float* block_amax; // [B, H, nq, D] q_stats' per-channel max |Q| of each block
    void* out;               // [B, H, nq * BQ, D] int8 or fp16
    float* delta;            // [B, H, nq] INT8 scale (1 for fp16 operands)
    float* q_dot_km;         // [B, H, L] q_t . km[kv head], or nullptr
    int H, L, heads_per_kv;
};
static_assert(sizeof(QuantizeQParams) == 104, "mirrored by QUANTIZE_Q_PARAMS in sparge_cupy/_gpu.py");

// A warp per (query block i, head h, batch b): rebalanced Q (x s_c), then INT8 with one
// scale per block (OutT = signed char) or fp16 rounding (OutT = __half); q . km in float64.
template <typename T, typename OutT, int D>
__global__ void __launch_bounds__(STATS_THREADS, SPARGE_STATS_MIN_BLOCKS) quantize_q(const QuantizeQParams p) {
    using M = RowLanes<D>;
    constexpr int CPL = M::CPL;
    constexpr bool INT8 = sizeof(OutT) == 1;
    const int h = blockIdx.y, b = blockIdx.z, lane = threadIdx.x & 31;
    int i, n;
    long long row0;
    if (!warp_block(p.L, BQ, i, n, row0)) return;
    const int kvh = h / p.heads_per_kv, Hkv = p.H / p.heads_per_kv;
    const int nb = (p.L + BQ - 1) / BQ;
    const size_t blk = ((size_t)b * p.H + h) * nb + i;
    const int c0 = (lane % M::LANES) * CPL;

    // max_c fl(amax_c s_c) is the max of the rounded products (x -> fl(|x| s_c) is monotone),
    // which the reference takes.
    float s[CPL], km[CPL];
    float a = 0.f;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const size_t ch = ((size_t)b * Hkv + kvh) * D + c0 + c;
        s[c] = p.s_c ? p.s_c[ch] : 1.f;
        km[c] = p.km ? p.km[ch] : 0.f;
        a = fmaxf(a, __fmul_rn(p.block_amax[blk * D + c0 + c], s[c]));
    }
    const BlockScale sc = block_scale<INT8>(a, true, p.delta + blk);
    const float delta = sc.delta, rd = sc.rd;

    OutT* out = static_cast<OutT*>(p.out) + blk * BQ * D + c0;
    float* qkm = p.q_dot_km ? p.q_dot_km + ((size_t)b * p.H + h) * p.L + row0 : nullptr;
    auto rows = [&](auto fast_path) {
        constexpr bool FAST = decltype(fast_path)::value;
        for_block_rows<T, D, BQ, true>(p.x, b, h, row0, n, [&](int r, bool valid, const float (&x)[CPL]) {
            float v[CPL];
#pragma unroll
            for (int c = 0; c < CPL; ++c) v[c] = __fmul_rn(x[c], s[c]);     // rows past L: zeros
            store_operands<FAST, CPL>(out + (size_t)r * D, v, delta, rd);
            if (qkm) {                                    // q_t . km, float64, one row reduction
                double acc = 0.0;
#pragma unroll
                for (int c = 0; c < CPL; ++c) acc = fma(to_f64(x[c]), to_f64(km[c]), acc);
                acc = row_sum<M::LANES>(acc);
                if (valid && lane % M::LANES == 0) qkm[r] = (float)acc;
            }
        });
    };
    if (sc.fast) rows(Flag<true>{});
    else rows(Flag<false>{});
}

}  // namespace sparge
