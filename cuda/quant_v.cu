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
// Grid: (key blocks, kv head, batch), 256 threads. quantize_v also counts V's NaN / Inf (it reads
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

template <bool FP8> struct VElem;
template <> struct VElem<true> { using type = unsigned char; };
template <> struct VElem<false> { using type = __half; };

// Programs per SM quantize_v is compiled for (its register cap: 65536 / (256 x this)); 0: no cap.
#ifndef SPARGE_VQ_MIN_BLOCKS
#define SPARGE_VQ_MIN_BLOCKS 0
#endif
#if SPARGE_VQ_MIN_BLOCKS > 0
#define SPARGE_VQ_BOUNDS __launch_bounds__(VQ_THREADS, SPARGE_VQ_MIN_BLOCKS)
#else
#define SPARGE_VQ_BOUNDS __launch_bounds__(VQ_THREADS)
#endif

// Programs (kv head h, batch b) over the key blocks j = blockIdx.x, + gridDim.x, ... (the
// launcher picks how many blocks a program takes): V / dv rounded (dv through its reciprocal,
// div_rn), transposed through shared memory, tile [D][BK] (channel rows, physical key
// positions), so that both the reads (rows of V) and the writes (rows of Vt) are coalesced.
//   Read: thread (quad u = tid % 16, chunk c = tid / 16 (+ 16, ...)) loads 8 channels of each of
//   the 4 keys that land on positions 4u..4u+3 (one 16-byte load for 16-bit inputs): each
//   channel's 4 values go to the tile in one 4-byte (FP8) or 8-byte (fp16) store, 2-way bank
//   conflicts at most (the two chunks of a warp). The next block's loads are issued as soon as
//   this block's values are in the tile, so they are in flight during its barrier and stores.
//   Write: 16-byte chunks of tile rows to Vt rows.
template <typename T, bool FP8, int D>
__global__ void SPARGE_VQ_BOUNDS quantize_v(
        const TensorView v, const float* amax, void* vt_out, float* dv_out,
        unsigned long long* nonfinite, const int H, const int L) {
    static_assert(!FP8 || SPARGE_HAS_FP8, "FP8 e4m3 needs compute capability 8.9 or newer");
    static_assert(D % 64 == 0 && BK == 64, "16 key quads per block, channel chunks of 8");
    using VT = typename VElem<FP8>::type;
    constexpr int CHUNKS = D / 8;                        // 8-channel chunks of a row
    constexpr int PER = (16 * CHUNKS + VQ_THREADS - 1) / VQ_THREADS;   // chunks per thread
    constexpr int WORDS = 8 * sizeof(T) / 4;
    __shared__ __align__(16) VT tile[D * BK];
    __shared__ float dv[D], rdv[D];                      // dv and RN(1 / dv) per channel
    __shared__ int slow;                                 // some dv does not suit div_rn
    const int h = blockIdx.y, b = blockIdx.z, tid = threadIdx.x;
    const int nk = (L + BK - 1) / BK;
    const bool vec = v.align >= chunk_vec_bytes<T, 8>();
    if (tid == 0) slow = 0;
    __syncthreads();
    if (FP8 && tid < D) {
        // dv_d = amax_d / 448 (1 for a zero channel): the factor the attention epilogue
        // multiplies by; the program of key block 0 also stores it.
        const float a = amax[((size_t)b * H + h) * D + tid];
        dv[tid] = a > 0.f ? __fdiv_rn(a, FP8_MAX) : 1.f;
        rdv[tid] = __frcp_rn(dv[tid]);
        if (!div_rn_ok(dv[tid])) slow = 1;
        if (blockIdx.x == 0) dv_out[((size_t)b * H + h) * D + tid] = dv[tid];
    }
    __syncthreads();

    // Thread (u = tid % 16, chunk c = tid / 16, + 16, ...): keys of quad u, channels [8c, 8c + 8).
    // A quad is the 4 keys that land on 4 consecutive physical positions 16 (u / 4) + 4 (u % 4)
    // + e (FP8: logical keys 16 (u / 4) + 8 (e >> 1) + 2 (u % 4) + (e & 1); fp16: the positions
    // themselves), so each channel's 4 values go to the tile in one 4- (8-) byte store.
    const int u = tid % 16, hq = u / 4, qd = u % 4;
    const int pos = 16 * hq + 4 * qd;                   // the quad's first physical position
    int key[4];                                         // the logical key at pos + e
#pragma unroll
    for (int e = 0; e < 4; ++e) key[e] = FP8 ? 16 * hq + 8 * (e >> 1) + 2 * qd + (e & 1) : pos + e;
    unsigned w[PER][4][WORDS];
    auto load = [&](int j) {                            // keys past L: zeros, not read
        const long long row0 = (long long)j * BK;
        const int n = min(BK, L - (int)row0);
#pragma unroll
        for (int p = 0; p < PER; ++p) {
            const int c = tid / 16 + p * (VQ_THREADS / 16);
#pragma unroll
            for (int e = 0; e < 4; ++e)
                load_words<T, 8>(row_ptr<T>(v, b, h, row0 + key[e]) + 8 * c, vec, c < CHUNKS && key[e] < n, w[p][e]);
        }
    };
    unsigned bad = 0;
    auto blocks = [&](auto fast_path) {
        constexpr bool FAST = decltype(fast_path)::value;
        for (int j = blockIdx.x; j < nk; j += gridDim.x) {
#pragma unroll
            for (int p = 0; p < PER; ++p) {
                const int c = tid / 16 + p * (VQ_THREADS / 16);
                if (c >= CHUNKS) continue;               // D = 64: half the threads convert
                // Channel by channel (4 values live, not 32); the NaN / Inf check as in
                // count_nonfinite: x * 0 is NaN exactly for a non-finite x, counted only then.
                float z = 0.f;
#pragma unroll
                for (int k = 0; k < 8; ++k) {
                    const int d = 8 * c + k;
                    float x[4];
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        x[e] = bits_to_float<T>(sizeof(T) == 2 ? w[p][e][k / 2] >> (16 * (k & 1)) : w[p][e][k]);
                        z = __fmaf_rn(x[e], 0.f, z);
                    }
                    if constexpr (FP8) {
                        const float dvd = dv[d], r = rdv[d];
                        const unsigned lo = to_e4m3x2(div_by<FAST>(x[0], dvd, r), div_by<FAST>(x[1], dvd, r));
                        const unsigned hi = to_e4m3x2(div_by<FAST>(x[2], dvd, r), div_by<FAST>(x[3], dvd, r));
                        *reinterpret_cast<unsigned*>(tile + d * BK + pos) = lo | (hi << 16);
                    } else {
                        const __half2 lo = __floats2half2_rn(x[0], x[1]), hi = __floats2half2_rn(x[2], x[3]);
                        *reinterpret_cast<uint2*>(tile + d * BK + pos) =
                            make_uint2(*reinterpret_cast<const unsigned*>(&lo), *reinterpret_cast<const unsigned*>(&hi));
                    }
                }
                if (z != z) {                            // rare: count exactly
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float x[8];
                        words_to_float<T, 8>(w[p][e], x);
                        bad += count_nonfinite(x);
                    }
                }
            }
            if (j + (int)gridDim.x < nk) load(j + gridDim.x);
            __syncthreads();

            constexpr int ROW_CHUNKS = BK * sizeof(VT) / 16;     // 16-byte chunks per tile row
            VT* out = static_cast<VT*>(vt_out) + ((size_t)b * H + h) * D * (size_t)nk * BK + (size_t)j * BK;
            for (int e = tid; e < D * ROW_CHUNKS; e += VQ_THREADS) {
                const int d = e / ROW_CHUNKS, part = e % ROW_CHUNKS;
                *reinterpret_cast<uint4*>(out + (size_t)d * nk * BK + part * (16 / sizeof(VT))) =
                    *reinterpret_cast<const uint4*>(tile + d * BK + part * (16 / sizeof(VT)));
            }
            __syncthreads();                             // the tile is rewritten next block
        }
    };
    if (blockIdx.x < nk) load(blockIdx.x);
    if (slow) blocks(Flag<false>{});
    else blocks(Flag<true>{});
    if (nonfinite) add_nonfinite(nonfinite, bad);
}

}  // namespace sparge
