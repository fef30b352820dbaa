// quant_v.cu: V as the B operand of the P V tensor-core product, FP8 e4m3 per channel or fp16.
//
// Must match reference.quant.quantize_v_fp8 (pv="fp8": dv_d = amax_t |V[:, d]| / 448, 1 for a zero
// channel; V / dv rounded to e4m3, nearest even, saturating) and reference.quant.round_fp16
// (pv="fp16").
//
// Output layout, [B, Hkv, D, nk * 64] (transposed: channel rows, tokens contiguous), the keys past
// Lk written as zeros. The mma B fragment ("col" layout) wants, per channel, consecutive keys.
// FP8 (mma m16n8k32): within every 32 keys the order is permuted so that the P fragment can be
// built from the QK^T accumulator without shuffles. Thread (g, q) of a warp holds scores of keys
// {2q, 2q+1, 8+2q, 9+2q} (+16) of each 32, in C-fragment order; an A fragment register holds four
// consecutive k positions 4q..4q+3 (+16). So physical position 16h + 4q + e holds logical key
// 16h + 8 (e >> 1) + 2q + (e & 1); fp16 (m16n8k16) needs no permutation.
//
// Grid: (key block j, kv head, batch), 256 threads. quantize_v also counts V's NaN / Inf (it reads
// every element for both pv modes; v_channel_amax runs for pv="fp8" only).
#include "common.cuh"

namespace sparge {

constexpr int VQ_THREADS = 256;
constexpr int VQ_WARPS = VQ_THREADS / 32;

// Per-channel max |V| over all tokens: atomic max per (b, kv head, d) (start at 0). Grid (j, h, b).
// A warp reads whole rows, lane l holding channels [l * D/32, (l + 1) * D/32) (as block_stats.cu).
template <typename T, int D>
__global__ void __launch_bounds__(VQ_THREADS) v_channel_amax(const TensorView v, float* amax,
                                                             const int H, const int L) {
    constexpr int CPL = channels_per_lane<D>();
    __shared__ float part[VQ_WARPS][D];
    const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const long long row0 = (long long)j * BK;
    const int n = min(BK, L - (int)row0);
    const bool vec = v.align >= chunk_vec_bytes<T, CPL>();
    float m[CPL] = {};
#pragma unroll 4
    for (int r = warp; r < n; r += VQ_WARPS) {
        float x[CPL];
        load_chunk<T, CPL>(row_ptr<T>(v, b, h, row0 + r) + lane * CPL, vec, x);
#pragma unroll
        for (int c = 0; c < CPL; ++c) m[c] = fmaxf(m[c], fabsf(x[c]));
    }
#pragma unroll
    for (int c = 0; c < CPL; ++c) part[warp][lane * CPL + c] = m[c];
    __syncthreads();
    if (tid < D) {
        float mx = part[0][tid];
        for (int w = 1; w < VQ_WARPS; ++w) mx = fmaxf(mx, part[w][tid]);
        atomic_max_nonneg(amax + ((size_t)b * H + h) * D + tid, mx);
    }
}

// Logical key (0..63) -> physical position in the FP8 layout (see the header).
__device__ __forceinline__ int fp8_key_position(int key) {
    const int h = key >> 4, r = key & 15;
    const int e = ((r >> 3) << 1) | (r & 1), q = (r & 7) >> 1;
    return (key & ~31) | ((h & 1) << 4) | (q << 2) | e;
}


template <bool FP8> struct VElem;
template <> struct VElem<true> { using type = unsigned char; };
template <> struct VElem<false> { using type = __half; };

// One program per (key block j, kv head h, batch b): V / dv rounded, transposed through shared
// memory, tile [D][BK] (channel rows, physical key positions), so that both the reads (rows of V)
// and the writes (rows of Vt) are coalesced.
//   Read: thread (key t = tid % 64, channel quarter tid / 64) loads D/4 channels of row t in
//   16-byte chunks; a warp's 32 lanes are 32 consecutive keys, so each shared store of the warp
//   hits 32 consecutive positions of one tile row (a permutation of them for FP8): no conflicts.
//   Write: 16-byte chunks of tile rows to Vt rows.
template <typename T, bool FP8, int D>
__global__ void __launch_bounds__(VQ_THREADS) quantize_v(const TensorView v, const float* amax,
                                                         void* vt_out, unsigned long long* nonfinite,
                                                         const int H, const int L) {
    static_assert(!FP8 || SPARGE_HAS_FP8, "FP8 e4m3 needs compute capability 8.9 or newer");
    static_assert(D % 64 == 0 && VQ_THREADS == 4 * BK, "a thread per (key, quarter of the channels)");
    using VT = typename VElem<FP8>::type;
    constexpr int CHUNK = 16 / sizeof(T);                // channels per 16-byte load
    constexpr int QUARTER = D / 4;                       // channels per thread
    static_assert(QUARTER % CHUNK == 0, "whole chunks per thread");
    __shared__ __align__(16) VT tile[D * BK];
    __shared__ float dv[D];
    const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const long long row0 = (long long)j * BK;
    const int n = min(BK, L - (int)row0);
    const bool vec = v.align >= 16;
    if (FP8 && tid < D) {
        const float a = amax[((size_t)b * H + h) * D + tid];
        dv[tid] = a > 0.f ? __fdiv_rn(a, FP8_MAX) : 1.f;
    }
    __syncthreads();

    const int t = tid % BK, d0 = (tid / BK) * QUARTER;
    const int pos = FP8 ? fp8_key_position(t) : t;
    unsigned bad = 0;
    const T* row = row_ptr<T>(v, b, h, row0 + min(t, n - 1)) + d0;   // keys past L: zeros below
#pragma unroll
    for (int c0 = 0; c0 < QUARTER; c0 += CHUNK) {
        float x[CHUNK];
        load_chunk<T, CHUNK>(row + c0, vec, x);
#pragma unroll
        for (int e = 0; e < CHUNK; ++e) {
            const float xv = t < n ? x[e] : 0.f;
            bad += is_nonfinite(xv);
            if constexpr (FP8) {
                tile[(d0 + c0 + e) * BK + pos] = to_e4m3(__fdiv_rn(xv, dv[d0 + c0 + e]));
            } else {
                tile[(d0 + c0 + e) * BK + pos] = __float2half_rn(xv);
            }
        }
    }
    if (nonfinite) add_nonfinite(nonfinite, bad);
    __syncthreads();

    constexpr int ROW_CHUNKS = BK * sizeof(VT) / 16;     // 16-byte chunks per tile row
    const int nk = (L + BK - 1) / BK;
    VT* out = static_cast<VT*>(vt_out) + ((size_t)b * H + h) * D * (size_t)nk * BK + (size_t)j * BK;
    for (int e = tid; e < D * ROW_CHUNKS; e += VQ_THREADS) {
        const int d = e / ROW_CHUNKS, part = e % ROW_CHUNKS;
        *reinterpret_cast<uint4*>(out + (size_t)d * nk * BK + part * (16 / sizeof(VT))) =
            *reinterpret_cast<const uint4*>(tile + d * BK + part * (16 / sizeof(VT)));
    }
}

// dv_d = amax_d / 448 (1 for a zero channel), the factor the attention epilogue multiplies by.
__global__ void v_scales(const float* amax, float* dv, const int n) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) dv[e] = amax[e] > 0.f ? __fdiv_rn(amax[e], FP8_MAX) : 1.f;
}

}  // namespace sparge
