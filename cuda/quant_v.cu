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
// Grid: (key block j, kv head, batch), 256 threads.
#include "common.cuh"

namespace sparge {

constexpr int VQ_THREADS = 256;

// Per-channel max |V| over all tokens: atomic max per (b, kv head, d) (start at 0). Grid (j, h, b).
template <typename T>
__global__ void __launch_bounds__(VQ_THREADS) v_channel_amax(const TensorView v, float* amax,
                                                             const int H, const int L, const int D) {
    __shared__ float part[VQ_THREADS];
    const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int subsets = VQ_THREADS / D, d = tid % D, sub = tid / D;
    const long long row0 = (long long)j * BK;
    const int n = min(BK, L - (int)row0);
    float m = 0.f;
    for (int r = sub; r < n; r += subsets) m = fmaxf(m, fabsf(to_float(row_ptr<T>(v, b, h, row0 + r)[d])));
    part[tid] = m;
    __syncthreads();
    if (tid < D) {
        for (int s = 1; s < subsets; ++s) m = fmaxf(m, part[tid + s * D]);
        atomic_max_nonneg(amax + ((size_t)b * H + h) * D + d, m);
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
// memory so that both the reads (rows of V) and the writes (rows of Vt) are coalesced.
template <typename T, bool FP8>
__global__ void __launch_bounds__(VQ_THREADS) quantize_v(const TensorView v, const float* amax,
                                                         void* vt_out, const int H, const int L,
                                                         const int D) {
    static_assert(!FP8 || SPARGE_HAS_FP8, "FP8 e4m3 needs compute capability 8.9 or newer");
    using VT = typename VElem<FP8>::type;
    constexpr int PAD = 16 / sizeof(VT);                 // one 16-byte step per row: fewer conflicts
    extern __shared__ __align__(16) unsigned char smem_raw[];
    VT* tile = reinterpret_cast<VT*>(smem_raw);          // [D][BK + PAD]
    const int j = blockIdx.x, h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const long long row0 = (long long)j * BK;
    const int n = min(BK, L - (int)row0);
    const float* am = amax + ((size_t)b * H + h) * D;

    for (int e = tid; e < BK * D; e += VQ_THREADS) {
        const int r = e / D, d = e % D;
        const float x = r < n ? to_float(row_ptr<T>(v, b, h, row0 + r)[d]) : 0.f;
        VT y;
        int pos = r;
        if constexpr (FP8) {
            const float dv = am[d] > 0.f ? __fdiv_rn(am[d], FP8_MAX) : 1.f;
            y = to_e4m3(__fdiv_rn(x, dv));
            pos = fp8_key_position(r);
        } else {
            y = __float2half_rn(x);
        }
        tile[d * (BK + PAD) + pos] = y;
    }
    __syncthreads();

    const int nk = (L + BK - 1) / BK;
    VT* out = static_cast<VT*>(vt_out) + ((size_t)b * H + h) * D * (size_t)nk * BK + (size_t)j * BK;
    for (int e = tid; e < BK * D; e += VQ_THREADS) {
        const int d = e / BK, t = e % BK;
        out[(size_t)d * nk * BK + t] = tile[d * (BK + PAD) + t];
    }
}

// dv_d = amax_d / 448 (1 for a zero channel), the factor the attention epilogue multiplies by.
__global__ void v_scales(const float* amax, float* dv, const int n) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < n) dv[e] = amax[e] > 0.f ? __fdiv_rn(amax[e], FP8_MAX) : 1.f;
}

}  // namespace sparge
