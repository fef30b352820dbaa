// block_stats.cu: Stage 1 statistics and the INT8 / fp16 quantization of Q and smoothed K.
//
// Must match (reference/):
//   k_block_sums + k_mean   -> quant.smooth_k            km = mean_t K  (float64 sum, one rounding)
//   block_stats (Q, K - km) -> predict.pool_blocks       qbar, kbar: mean of the valid rows
//                              predict.block_self_similarity   sim = ||mean_r x_r/max(||x_r||,eps)||^2
//                              quant.channel_scales      per-channel max |x| (atomic max per kv head)
//   quantize                -> attention.quantized_operands / quant.quantize_int8_per_block
//
// Passes over memory: K three times (column sums, statistics of K - km, quantization), Q twice
// (statistics, quantization). The quantization needs the channel maxima of the whole head, so it
// cannot share a pass with the statistics.
//
// Shapes: user tensors through TensorView (HND or NHD, fp16 / fp32 / bf16, D in {64, 128, 256}:
// the launcher zero-pads other head dims, which changes none of these statistics). Internal
// outputs are dense float32 [B, H, nb, ...]; quantized operands are [B, H, nb * block, D] with the
// rows past L written as zeros. Grid of every per-block kernel: (block index, head, batch),
// 256 threads; D must divide 256 (one thread per channel, 256 / D row subsets).
#include "common.cuh"

namespace sparge {

constexpr int STATS_THREADS = 256;

struct BlockStatsParams {
    TensorView x;            // Q [B, H, L, D], or K (then km is subtracted from every row)
    const float* km;         // [B, H, D] K mean, or nullptr (Q)
    float* pooled;           // [B, H, nb, D] mean of the valid rows, or nullptr
    float* sim;              // [B, H, nb] self-similarity, or nullptr
    float* block_amax;       // [B, H, nb, D] per-channel max |x| over the block
    float* head_amax;        // [B, H / heads_per_kv, D] atomic max of block_amax (start at 0)
    int H, L, D, block, heads_per_kv;
    double sim_eps;          // CONFIG.sim_eps, as the reference's float64 guard
};
static_assert(sizeof(BlockStatsParams) == 104, "mirrored by BLOCK_STATS_PARAMS in sparge_cupy/_gpu.py");

// One program per (block i, head h, batch b). The row norms (for the similarity) and all sums run
// in float64 and are rounded once to float32, as the reference does, so both sides agree up to
// the float64 summation order.
template <typename T>
__global__ void __launch_bounds__(STATS_THREADS) block_stats(const BlockStatsParams p) {
    __shared__ double row_den[BQ];                       // max(||x_r||, eps)
    __shared__ double part_sum[STATS_THREADS], part_unit[STATS_THREADS];
    __shared__ float part_amax[STATS_THREADS];
    __shared__ double warp_part[STATS_THREADS / 32];

    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int D = p.D, subsets = STATS_THREADS / D;
    const long long row0 = (long long)i * p.block;
    const int n = min(p.block, p.L - (int)row0);         // valid rows of this block (>= 1)
    const int nb = (p.L + p.block - 1) / p.block;
    const float* km = p.km ? p.km + ((size_t)b * p.H + h) * D : nullptr;

    // Phase 1: row norms, one warp per row.
    if (p.sim) {
        for (int r = warp; r < n; r += STATS_THREADS / 32) {
            const T* row = row_ptr<T>(p.x, b, h, row0 + r);
            double ss = 0.0;
            for (int d = lane; d < D; d += 32) {
                const double x = (double)(to_float(row[d]) - (km ? km[d] : 0.f));
                ss += x * x;
            }
            ss = warp_sum(ss);
            if (lane == 0) row_den[r] = fmax(sqrt(ss), p.sim_eps);
        }
        __syncthreads();
    }

    // Phase 2: per-channel sum, unit-row sum and max |x|; thread = (row subset, channel).
    const int d = tid % D, sub = tid / D;
    double sum = 0.0, unit = 0.0;
    float amax = 0.f;
    for (int r = sub; r < n; r += subsets) {
        const float x = to_float(row_ptr<T>(p.x, b, h, row0 + r)[d]) - (km ? km[d] : 0.f);
        sum += (double)x;
        amax = fmaxf(amax, fabsf(x));
        if (p.sim) unit += (double)x / row_den[r];
    }
    part_sum[tid] = sum;
    part_unit[tid] = unit;
    part_amax[tid] = amax;
    __syncthreads();

    const size_t out_blk = ((size_t)b * p.H + h) * nb + i;
    double u2 = 0.0;
    if (tid < D) {
        for (int s = 1; s < subsets; ++s) {              // fixed order: deterministic
            sum += part_sum[tid + s * D];
            unit += part_unit[tid + s * D];
            amax = fmaxf(amax, part_amax[tid + s * D]);
        }
        if (p.pooled) p.pooled[out_blk * D + d] = (float)(sum / n);
        p.block_amax[out_blk * D + d] = amax;
        atomic_max_nonneg(p.head_amax + ((size_t)b * (p.H / p.heads_per_kv) + h / p.heads_per_kv) * D + d,
                          amax);
        const double u = unit / n;
        u2 = u * u;
    }
    if (p.sim) {                                         // sim = sum_d u_d^2, tree in fixed order
        u2 = warp_sum(u2);
        if (lane == 0) warp_part[warp] = u2;
        __syncthreads();
        if (tid == 0) {
            double total = 0.0;
            for (int w = 0; w < STATS_THREADS / 32; ++w) total += warp_part[w];
            p.sim[out_blk] = (float)total;
        }
    }
}

// Column sums of K per key block, in float64: [B, Hkv, nk, D]. Grid (j, kv head, b).
template <typename T>
__global__ void __launch_bounds__(STATS_THREADS) k_block_sums(const TensorView k, double* sums,
                                                              const int H, const int L, const int D) {
    __shared__ double part[STATS_THREADS];
    const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int subsets = STATS_THREADS / D, d = tid % D, sub = tid / D;
    const long long row0 = (long long)j * BK;
    const int n = min(BK, L - (int)row0);
    double s = 0.0;
    for (int r = sub; r < n; r += subsets) s += (double)to_float(row_ptr<T>(k, b, h, row0 + r)[d]);
    part[tid] = s;
    __syncthreads();
    if (tid < D) {
        for (int q = 1; q < subsets; ++q) s += part[tid + q * D];
        const int nk = (L + BK - 1) / BK;
        sums[(((size_t)b * H + h) * nk + j) * D + d] = s;
    }
}

// km = (sum of the block sums) / L, rounded once to float32: [B, Hkv, D]. Grid (kv head, b),
// D threads.
__global__ void k_mean(const double* sums, float* km, const int H, const int L, const int D) {
    const int h = blockIdx.x, b = blockIdx.y, d = threadIdx.x;
    const int nk = (L + BK - 1) / BK;
    const double* s = sums + ((size_t)b * H + h) * nk * D + d;
    double total = 0.0;
    for (int j = 0; j < nk; ++j) total += s[(size_t)j * D];
    km[((size_t)b * H + h) * D + d] = (float)(total / L);
}

struct QuantizeParams {
    TensorView x;            // Q, or K (then smoothed: x - km)
    const float* km;         // [B, Hkv, D]: K mean (needed for K, and for Q's q . km), or nullptr
    const float* amax_q;     // [B, Hkv, D] channel maxima for rebalancing, or nullptr (no rebalance)
    const float* amax_k;     // [B, Hkv, D]
    const float* block_amax; // [B, H, nb, D] per-channel max |x (- km)| of each block
    void* out;               // [B, H, nb * block, D] int8 or fp16
    float* delta;            // [B, H, nb] INT8 scale (1 for fp16 operands)
    float* q_dot_km;         // [B, H, L] q_t . km[kv head] (Q only, for the LSE), or nullptr
    int H, L, D, block, heads_per_kv, is_key;
};
static_assert(sizeof(QuantizeParams) == 112, "mirrored by QUANTIZE_PARAMS in sparge_cupy/_gpu.py");

__device__ __forceinline__ void store_operand(signed char* out, float v, float delta) {
    // IEEE division and round half to even, as np.rint(x / delta); |v| <= amax so the clip only
    // catches the rounding of amax / (amax / 127) to 127.00001.
    const int qv = __float2int_rn(__fdiv_rn(v, delta));
    *out = (signed char)max(-127, min(127, qv));
}
__device__ __forceinline__ void store_operand(__half* out, float v, float) { *out = __float2half_rn(v); }

// One program per (block i, head h, batch b): rebalance (Q * s_c, or (K - km) / s_c), then INT8
// with one scale per block (OutT = signed char) or fp16 rounding (OutT = __half).
template <typename T, typename OutT>
__global__ void __launch_bounds__(STATS_THREADS) quantize(const QuantizeParams p) {
    constexpr bool INT8 = sizeof(OutT) == 1;
    __shared__ float s_c[256];                           // rebalancing scale per channel
    __shared__ float warp_max_part[STATS_THREADS / 32];
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, D = p.D;
    const int kvh = h / p.heads_per_kv, Hkv = p.H / p.heads_per_kv;
    const int nb = (p.L + p.block - 1) / p.block;
    const long long row0 = (long long)i * p.block;
    const int n = min(p.block, p.L - (int)row0);
    const size_t blk = ((size_t)b * p.H + h) * nb + i;
    const float* km = p.km ? p.km + ((size_t)b * Hkv + kvh) * D : nullptr;

    // The block maximum of the rebalanced values, from the per-channel maxima: x -> |x| s_c (or
    // |x| / s_c) is monotone under correct rounding, so max_c round(amax_c s_c) equals the max of
    // the rounded products, which the reference takes.
    float a = 0.f;
    if (tid < D) {
        const size_t c = ((size_t)b * Hkv + kvh) * D + tid;
        const float s = p.amax_q ? rebalance_scale(p.amax_q[c], p.amax_k[c]) : 1.f;
        s_c[tid] = s;
        const float m = p.block_amax[blk * D + tid];
        a = p.is_key ? __fdiv_rn(m, s) : __fmul_rn(m, s);
    }
    a = warp_max(a);
    if (lane == 0) warp_max_part[warp] = a;
    __syncthreads();
    float amax = 0.f;
    for (int w = 0; w < STATS_THREADS / 32; ++w) amax = fmaxf(amax, warp_max_part[w]);
    const float delta = (INT8 && amax > 0.f) ? __fdiv_rn(amax, INT8_MAX_F) : 1.f;
    if (tid == 0) p.delta[blk] = delta;

    OutT* out = static_cast<OutT*>(p.out) + blk * p.block * D;
    for (int e = tid; e < p.block * D; e += STATS_THREADS) {
        const int r = e / D, d = e % D;
        float v = 0.f;                                   // rows past L: zeros
        if (r < n) {
            const float x = to_float(row_ptr<T>(p.x, b, h, row0 + r)[d]);
            v = p.is_key ? __fdiv_rn(x - km[d], s_c[d]) : __fmul_rn(x, s_c[d]);
        }
        store_operand(out + e, v, delta);
    }

    if (p.q_dot_km) {                                    // q_t . km, one warp per row
        for (int r = warp; r < n; r += STATS_THREADS / 32) {
            const T* row = row_ptr<T>(p.x, b, h, row0 + r);
            double acc = 0.0;
            for (int d = lane; d < D; d += 32) acc += (double)to_float(row[d]) * (double)km[d];
            acc = warp_sum(acc);
            if (lane == 0) p.q_dot_km[((size_t)b * p.H + h) * p.L + row0 + r] = (float)acc;
        }
    }
}

}  // namespace sparge
