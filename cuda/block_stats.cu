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
// cannot share a pass with the statistics. The first pass over each tensor (k_block_sums for K,
// block_stats for Q) also counts its NaN / Inf into a device counter that the launcher checks once.
//
// Shapes: user tensors through TensorView (HND or NHD, fp16 / fp32 / bf16, D in {64, 128, 256}:
// the launcher zero-pads other head dims, which changes none of these statistics). Internal
// outputs are dense float32 [B, H, nb, ...]; quantized operands are [B, H, nb * block, D] with the
// rows past L written as zeros. Grid of every per-block kernel: (block index, head, batch),
// 256 threads = 8 warps. Inside a block a warp reads whole rows (rows warp, warp + 8, ...), lane l
// holding channels [l * D/32, (l + 1) * D/32) through one vector load where the TensorView's
// alignment allows it (channels_per_lane, load_chunk in common.cuh); per-warp partial results meet
// in shared memory and are combined in warp order, so the result is deterministic.
#include "common.cuh"

namespace sparge {

constexpr int STATS_THREADS = 256;
constexpr int STATS_WARPS = STATS_THREADS / 32;

struct BlockStatsParams {
    TensorView x;            // Q [B, H, L, D], or K (then km is subtracted from every row)
    const float* km;         // [B, H, D] K mean, or nullptr (Q)
    float* pooled;           // [B, H, nb, D] mean of the valid rows, or nullptr
    float* sim;              // [B, H, nb] self-similarity, or nullptr
    float* block_amax;       // [B, H, nb, D] per-channel max |x| over the block
    float* head_amax;        // [B, H / heads_per_kv, D] atomic max of block_amax (start at 0)
    unsigned long long* nonfinite;  // NaN / Inf count of x (add_nonfinite), or nullptr
    int H, L, block, heads_per_kv;
    double sim_eps;          // CONFIG.sim_eps, as the reference's float64 guard
};
static_assert(sizeof(BlockStatsParams) == 112, "mirrored by BLOCK_STATS_PARAMS in sparge_cupy/_gpu.py");

// One program per (block i, head h, batch b). The row norms (for the similarity) and all sums run
// in float64 and are rounded once to float32, as the reference does, so both sides agree up to
// the float64 summation order (and x / ||x|| taken as x * (1 / ||x||), within a float64 ulp).
template <typename T, int D>
__global__ void __launch_bounds__(STATS_THREADS) block_stats(const BlockStatsParams p) {
    constexpr int CPL = channels_per_lane<D>();
    __shared__ double part_sum[STATS_WARPS][D], part_unit[STATS_WARPS][D];
    __shared__ float part_amax[STATS_WARPS][D];
    __shared__ double warp_part[STATS_WARPS];

    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row0 = (long long)i * p.block;
    const int n = min(p.block, p.L - (int)row0);         // valid rows of this block (>= 1)
    const int nb = (p.L + p.block - 1) / p.block;
    const bool vec = p.x.align >= chunk_vec_bytes<T, CPL>();
    const bool with_sim = p.sim != nullptr;
    float km[CPL];
#pragma unroll
    for (int c = 0; c < CPL; ++c) km[c] = p.km ? p.km[((size_t)b * p.H + h) * D + lane * CPL + c] : 0.f;

    // Per row: x (- km) in float32 as the reference, its norm (one warp reduction), then the
    // lane's channels: sum, max |x|, and the unit row x / max(||x||, eps) summed.
    double sum[CPL] = {}, unit[CPL] = {};
    float amax[CPL] = {};
    unsigned bad = 0;
#pragma unroll 2
    for (int r = warp; r < n; r += STATS_WARPS) {
        float x[CPL];
        load_chunk<T, CPL>(row_ptr<T>(p.x, b, h, row0 + r) + lane * CPL, vec, x);
        double ss = 0.0;
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            bad += is_nonfinite(x[c]);
            x[c] -= km[c];
            sum[c] += (double)x[c];
            amax[c] = fmaxf(amax[c], fabsf(x[c]));
            ss += (double)x[c] * (double)x[c];
        }
        if (with_sim) {
            const double inv = 1.0 / fmax(sqrt(warp_sum(ss)), p.sim_eps);
#pragma unroll
            for (int c = 0; c < CPL; ++c) unit[c] += (double)x[c] * inv;
        }
    }
    if (p.nonfinite) add_nonfinite(p.nonfinite, bad);
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        part_sum[warp][lane * CPL + c] = sum[c];
        part_unit[warp][lane * CPL + c] = unit[c];
        part_amax[warp][lane * CPL + c] = amax[c];
    }
    __syncthreads();

    const size_t out_blk = ((size_t)b * p.H + h) * nb + i;
    double u2 = 0.0;
    if (tid < D) {                                       // thread = channel, warps in fixed order
        double s = part_sum[0][tid], u = part_unit[0][tid];
        float m = part_amax[0][tid];
        for (int w = 1; w < STATS_WARPS; ++w) {
            s += part_sum[w][tid];
            u += part_unit[w][tid];
            m = fmaxf(m, part_amax[w][tid]);
        }
        if (p.pooled) p.pooled[out_blk * D + tid] = (float)(s / n);
        p.block_amax[out_blk * D + tid] = m;
        atomic_max_nonneg(p.head_amax + ((size_t)b * (p.H / p.heads_per_kv) + h / p.heads_per_kv) * D + tid,
                          m);
        const double um = u / n;
        u2 = um * um;
    }
    if (with_sim) {                                      // sim = sum_d u_d^2, tree in fixed order
        u2 = warp_sum(u2);
        if (lane == 0) warp_part[warp] = u2;
        __syncthreads();
        if (tid == 0) {
            double total = 0.0;
            for (int w = 0; w < STATS_WARPS; ++w) total += warp_part[w];
            p.sim[out_blk] = (float)total;
        }
    }
}

// Column sums of K per key block, in float64: [B, Hkv, nk, D]; also counts K's NaN / Inf into
// *nonfinite (or not, if nullptr). Grid (j, kv head, b).
template <typename T, int D>
__global__ void __launch_bounds__(STATS_THREADS) k_block_sums(const TensorView k, double* sums,
                                                              unsigned long long* nonfinite,
                                                              const int H, const int L) {
    constexpr int CPL = channels_per_lane<D>();
    __shared__ double part[STATS_WARPS][D];
    const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row0 = (long long)j * BK;
    const int n = min(BK, L - (int)row0);
    const bool vec = k.align >= chunk_vec_bytes<T, CPL>();
    double s[CPL] = {};
    unsigned bad = 0;
#pragma unroll 4
    for (int r = warp; r < n; r += STATS_WARPS) {
        float x[CPL];
        load_chunk<T, CPL>(row_ptr<T>(k, b, h, row0 + r) + lane * CPL, vec, x);
#pragma unroll
        for (int c = 0; c < CPL; ++c) {
            bad += is_nonfinite(x[c]);
            s[c] += (double)x[c];
        }
    }
    if (nonfinite) add_nonfinite(nonfinite, bad);
#pragma unroll
    for (int c = 0; c < CPL; ++c) part[warp][lane * CPL + c] = s[c];
    __syncthreads();
    if (tid < D) {
        double total = part[0][tid];
        for (int w = 1; w < STATS_WARPS; ++w) total += part[w][tid];
        const int nk = (L + BK - 1) / BK;
        sums[(((size_t)b * H + h) * nk + j) * D + tid] = total;
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
    int H, L, block, heads_per_kv, is_key;
};
static_assert(sizeof(QuantizeParams) == 120, "mirrored by QUANTIZE_PARAMS in sparge_cupy/_gpu.py");

// N rebalanced values of a row to the operand type, stored with one vector store.
template <int N>
__device__ __forceinline__ void store_operands(signed char* out, const float (&v)[N], float delta) {
    unsigned w[(N + 3) / 4] = {};
#pragma unroll
    for (int e = 0; e < N; ++e) {
        // IEEE division and round half to even, as np.rint(x / delta); |v| <= amax so the clip
        // only catches the rounding of amax / (amax / 127) to 127.00001.
        const int qv = max(-127, min(127, __float2int_rn(__fdiv_rn(v[e], delta))));
        w[e / 4] |= (unsigned)(qv & 0xff) << (8 * (e % 4));
    }
    store_bytes<N>(out, w);
}
template <int N>
__device__ __forceinline__ void store_operands(__half* out, const float (&v)[N], float) {
    unsigned w[(N + 1) / 2] = {};
#pragma unroll
    for (int e = 0; e < N; ++e)
        w[e / 2] |= (unsigned)__half_as_ushort(__float2half_rn(v[e])) << (16 * (e % 2));
    store_bytes<2 * N>(out, w);
}

// One program per (block i, head h, batch b): rebalance (Q * s_c, or (K - km) / s_c), then INT8
// with one scale per block (OutT = signed char) or fp16 rounding (OutT = __half). Warp per row as
// in block_stats; every warp derives the block's scale itself (no barrier).
template <typename T, typename OutT, int D>
__global__ void __launch_bounds__(STATS_THREADS) quantize(const QuantizeParams p) {
    constexpr bool INT8 = sizeof(OutT) == 1;
    constexpr int CPL = channels_per_lane<D>();
    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kvh = h / p.heads_per_kv, Hkv = p.H / p.heads_per_kv;
    const int nb = (p.L + p.block - 1) / p.block;
    const long long row0 = (long long)i * p.block;
    const int n = min(p.block, p.L - (int)row0);
    const size_t blk = ((size_t)b * p.H + h) * nb + i;
    const bool vec = p.x.align >= chunk_vec_bytes<T, CPL>();

    // The lane's channels: rebalancing scale s_c, K mean. The block maximum of the rebalanced
    // values comes from the per-channel maxima: x -> |x| s_c (or |x| / s_c) is monotone under
    // correct rounding, so max_c round(amax_c s_c) equals the max of the rounded products, which
    // the reference takes.
    float s_c[CPL], km[CPL];
    float a = 0.f;
#pragma unroll
    for (int c = 0; c < CPL; ++c) {
        const int d = lane * CPL + c;
        const size_t ch = ((size_t)b * Hkv + kvh) * D + d;
        s_c[c] = p.amax_q ? rebalance_scale(p.amax_q[ch], p.amax_k[ch]) : 1.f;
        km[c] = p.km ? p.km[ch] : 0.f;
        const float m = p.block_amax[blk * D + d];
        a = fmaxf(a, p.is_key ? __fdiv_rn(m, s_c[c]) : __fmul_rn(m, s_c[c]));
    }
    const float amax = warp_max(a);
    const float delta = (INT8 && amax > 0.f) ? __fdiv_rn(amax, INT8_MAX_F) : 1.f;
    if (tid == 0) p.delta[blk] = delta;

    OutT* out = static_cast<OutT*>(p.out) + blk * p.block * D + lane * CPL;
#pragma unroll 2
    for (int r = warp; r < p.block; r += STATS_WARPS) {
        float v[CPL] = {};                               // rows past L: zeros
        if (r < n) {
            float x[CPL];
            load_chunk<T, CPL>(row_ptr<T>(p.x, b, h, row0 + r) + lane * CPL, vec, x);
#pragma unroll
            for (int c = 0; c < CPL; ++c)
                v[c] = p.is_key ? __fdiv_rn(x[c] - km[c], s_c[c]) : __fmul_rn(x[c], s_c[c]);
            if (p.q_dot_km) {                            // q_t . km, float64, one warp reduction
                double acc = 0.0;
#pragma unroll
                for (int c = 0; c < CPL; ++c) acc += (double)x[c] * (double)km[c];
                acc = warp_sum(acc);
                if (lane == 0) p.q_dot_km[((size_t)b * p.H + h) * p.L + row0 + r] = (float)acc;
            }
        }
        store_operands<CPL>(out + (size_t)r * D, v, delta);
    }
}

}  // namespace sparge
