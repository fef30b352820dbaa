// common.cuh: helpers shared by the SpargeAttn kernels (block_stats.cu, select.cu, quant_v.cu,
// sparse_attn.cu). The launcher (sparge_cupy/_compile.py) pastes this file in place of the
// `#include "common.cuh"` line, so that CuPy's on-disk cache key (the source text) covers it.
//
// Conventions of every kernel:
//   * element types of user tensors: __half (fp16), float (fp32), __nv_bfloat16 (bf16, which CuPy
//     sees as uint16 storage); all arithmetic in float32 (exact conversions from all three).
//   * a user tensor is addressed as base + b * stride_b + h * stride_h + t * stride_t + d, with
//     the channel axis contiguous: that covers HND [B, H, L, D] and NHD [B, L, H, D] without copies.
//   * internal buffers (int8 / fp16 Q and K, transposed V, block statistics) are dense, with the
//     token axis padded to whole blocks, so the attention kernel never bounds-checks its loads.
//   * IEEE float32 division and square root (no fast math): the quantizers must reproduce the NumPy
//     reference bit for bit. CuPy compiles with -ftz=true, which only matters for subnormal inputs.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math_constants.h>  // CUDART_INF_F

// e4m3 conversion and the e4m3 mma exist from sm_89 (Ada, Hopper) on; sm_80 builds leave FP8 out.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
#define SPARGE_HAS_FP8 1
#else
#define SPARGE_HAS_FP8 0
#endif

namespace sparge {

inline constexpr float LOG2E = 1.4426950408889634f;   // log2(e): scores live in the log2 domain
inline constexpr float LN2 = 0.6931471805599453f;     // ln(2): back to natural log for the LSE
inline constexpr float FP8_MAX = 448.0f;              // largest finite e4m3 value
inline constexpr float LOG2_FP8_MAX = 8.807354922057604f;  // log2(448)
inline constexpr float INT8_MAX_F = 127.0f;           // symmetric INT8 range [-127, 127]
inline constexpr int BQ = 128;                        // query rows per block (CONFIG.block_q)
inline constexpr int BK = 64;                         // key rows per block (CONFIG.block_k)
inline constexpr int PV_GROUP_ROWS = 16;              // Stage 2 granularity: one warp's mma row tile

// A user tensor: pointer plus element strides of batch, head and token (channels contiguous), and
// the alignment in bytes (a power of two, at most 16) of every row start: the largest that divides
// the pointer and the three strides in bytes. Kernels use vector loads only where it allows them.
struct TensorView {
    const void* ptr;
    long long stride_b, stride_h, stride_t;
    long long align;
};
static_assert(sizeof(TensorView) == 40, "mirrored by TENSOR_VIEW in sparge_cupy/_gpu.py");

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
    return __float2bfloat16_rn(x);
}

// Row t of head h of batch b of a user tensor.
template <typename T>
__device__ __forceinline__ const T* row_ptr(const TensorView& v, int b, int h, long long t) {
    return static_cast<const T*>(v.ptr) + b * v.stride_b + h * v.stride_h + t * v.stride_t;
}

// Raw bits (the low 16 of `w` for 16-bit types) to float: the same value as to_float.
template <typename T> __device__ __forceinline__ float bits_to_float(unsigned w);
template <> __device__ __forceinline__ float bits_to_float<__half>(unsigned w) {
    return __half2float(__ushort_as_half((unsigned short)(w & 0xffffu)));
}
template <> __device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned w) {
    return __uint_as_float(w << 16);                     // bf16 is the high half of a float
}
template <> __device__ __forceinline__ float bits_to_float<float>(unsigned w) { return __uint_as_float(w); }

// The vector width of a load of N elements of T: min(16, N * sizeof(T)) bytes.
template <typename T, int N>
__device__ __forceinline__ constexpr int chunk_vec_bytes() {
    return N * (int)sizeof(T) < 16 ? N * (int)sizeof(T) : 16;
}

// N consecutive channels of a row as raw 32-bit words (16-bit types: two per word, element e in
// half e & 1 of word e / 2); zeros where `valid` is false (nothing read). With `vec` (then p must
// be aligned to chunk_vec_bytes) through vector loads of that width, else N scalar loads (any
// element-aligned p): both read the same elements. Loading a stage of rows as words first and
// converting after keeps every load of the stage in flight.
template <typename T, int N>
__device__ __forceinline__ void load_words(const T* p, bool vec, bool valid,
                                           unsigned (&w)[N * sizeof(T) / 4]) {
    constexpr int WORDS = N * (int)sizeof(T) / 4, VEC = chunk_vec_bytes<T, N>();
    static_assert(N * sizeof(T) % 4 == 0 && (VEC == 4 || VEC == 8 || VEC == 16),
                  "4, 8 or 16-byte chunks");
#pragma unroll
    for (int i = 0; i < WORDS; ++i) w[i] = 0u;
    if (!valid) return;
    if (vec) {
#pragma unroll
        for (int i = 0; i < WORDS; i += VEC / 4) {
            const void* src = reinterpret_cast<const unsigned char*>(p) + 4 * i;
            if constexpr (VEC == 16) {
                const uint4 u = *static_cast<const uint4*>(src);
                w[i] = u.x; w[i + 1] = u.y; w[i + 2] = u.z; w[i + 3] = u.w;
            } else if constexpr (VEC == 8) {
                const uint2 u = *static_cast<const uint2*>(src);
                w[i] = u.x; w[i + 1] = u.y;
            } else {
                w[i] = *static_cast<const unsigned*>(src);
            }
        }
    } else {
        const unsigned short* h = reinterpret_cast<const unsigned short*>(p);
#pragma unroll
        for (int e = 0; e < N; ++e) {
            if constexpr (sizeof(T) == 2) {
                w[e / 2] |= (unsigned)h[e] << (16 * (e & 1));
            } else {
                w[e] = reinterpret_cast<const unsigned*>(p)[e];
            }
        }
    }
}

template <typename T, int N>
__device__ __forceinline__ void words_to_float(const unsigned (&w)[N * sizeof(T) / 4], float (&x)[N]) {
#pragma unroll
    for (int e = 0; e < N; ++e) {
        if constexpr (sizeof(T) == 2) {
            x[e] = bits_to_float<T>(w[e / 2] >> (16 * (e & 1)));
        } else {
            x[e] = bits_to_float<T>(w[e]);
        }
    }
}

// N consecutive channels of a row as floats (load_words, then words_to_float).
template <typename T, int N>
__device__ __forceinline__ void load_chunk(const T* p, bool vec, float (&x)[N]) {
    unsigned w[N * sizeof(T) / 4];
    load_words<T, N>(p, vec, true, w);
    words_to_float<T, N>(w, x);
}

// The streaming kernels' row mapping (block_stats.cu): a warp covers ROWS rows at a time, lane l
// holding the CPL = 8 consecutive channels [(l % LANES) * 8, + 8) of row l / LANES: one 16-byte
// load for fp16 / bf16 (two for fp32), and a row's reductions over LANES lanes only.
// D = 64: 8 lanes per row, 4 rows per warp step; D = 128: 16 and 2; D = 256: 32 and 1.
template <int D>
struct RowLanes {
    static_assert(D == 64 || D == 128 || D == 256, "native head dims: 64, 128, 256");
    static constexpr int CPL = 8;
    static constexpr int LANES = D / CPL;
    static constexpr int ROWS = 32 / LANES;
};

// Sum over the LANES lanes of one row (the warp holds 32 / LANES rows; each gets its own sum).
template <int LANES>
__device__ __forceinline__ double row_sum(double x) {
#pragma unroll
    for (int o = LANES / 2; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// Sum (max) over the rows of a warp step, per channel: lanes l, l + LANES, ... hold the same
// channels of different rows. Fixed tree order: deterministic.
template <int LANES>
__device__ __forceinline__ double across_rows_sum(double x) {
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}
template <int LANES>
__device__ __forceinline__ float across_rows_max(float x) {
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}
template <int LANES>
__device__ __forceinline__ float across_rows_min(float x) {
#pragma unroll
    for (int o = LANES; o < 32; o <<= 1) x = fminf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Correctly rounded x / d for a divisor shared by many x (a channel's s_c, a block's INT8 scale,
// a channel's FP8 scale), from r = RN(1/d) (__frcp_rn, once per divisor): q = RN(x r), the
// residual x - q d is exact through an FMA, and one correction RN(q + (x - q d) r) is RN(x / d)
// (Markstein's theorem for binary floating point; it needs r, q and the result in the normal
// range, which div_rn_ok(d) and the quantizers' bounded quotients ensure). The residual is
// negated twice, -(q d - x), so that x = -0 keeps its sign as IEEE division does. Three
// instructions instead of __fdiv_rn's eight-plus; the GPU tests compare it with __fdiv_rn.
__device__ __forceinline__ float div_rn(float x, float d, float r) {
    const float q = __fmul_rn(x, r);
    const float e = -__fmaf_rn(q, d, -x);
    return __fmaf_rn(e, r, q);
}
// Divisors for which div_rn's reciprocal and residual stay normal (else take __fdiv_rn).
__device__ __forceinline__ bool div_rn_ok(float d) {
    return d >= 0x1p-100f && d <= 0x1p100f;
}
// The division of a kernel's inner loop: div_rn when every divisor of the program passed
// div_rn_ok (FAST, decided once per program, outside the loop), else IEEE division.
template <bool FAST>
__device__ __forceinline__ float div_by(float x, float d, float r) {
    if constexpr (FAST) {
        return div_rn(x, d, r);
    } else {
        return __fdiv_rn(x, d);
    }
}

// A compile-time bool as a value, so that a runtime flag can pick one of two instantiations of
// a loop body once: `flag ? body(Flag<true>{}) : body(Flag<false>{})`.
template <bool B>
struct Flag {
    static constexpr bool value = B;
};

// Stores the first BYTES bytes of the 32-bit words `w` (little-endian) at `dst`, aligned to BYTES
// (to 16 for more), with the widest vector stores.
template <int BYTES>
__device__ __forceinline__ void store_bytes(void* dst, const unsigned* w) {
    if constexpr (BYTES == 2) {
        *static_cast<unsigned short*>(dst) = (unsigned short)w[0];
    } else if constexpr (BYTES == 4) {
        *static_cast<unsigned*>(dst) = w[0];
    } else if constexpr (BYTES == 8) {
        *static_cast<uint2*>(dst) = make_uint2(w[0], w[1]);
    } else {
        static_assert(BYTES % 16 == 0, "2, 4, 8 or a multiple of 16 bytes");
#pragma unroll
        for (int i = 0; i < BYTES / 16; ++i)
            static_cast<uint4*>(dst)[i] = make_uint4(w[4 * i], w[4 * i + 1], w[4 * i + 2], w[4 * i + 3]);
    }
}

// Channels per lane when one warp covers a row of D channels: lane l holds [l * CPL, l * CPL + CPL).
template <int D>
__device__ __forceinline__ constexpr int channels_per_lane() {
    static_assert(D == 64 || D == 128 || D == 256, "native head dims: 64, 128, 256");
    return D / 32;
}

// Non-finite input detection, fused into kernels that read every element anyway: each lane counts
// its NaN / Inf, and a warp that saw any adds them to *counter (one atomic per such warp, none on
// finite inputs). Call with the whole warp converged. The host checks the counter once per call.
__device__ __forceinline__ unsigned is_nonfinite(float x) { return isfinite(x) ? 0u : 1u; }
// float -> double, exact, without the flush of float32 denormals that -ftz=true puts before a
// plain (double) conversion (an FMUL by 1 per value): the statistics' float64 sums see every
// input value as the reference does, in one instruction fewer.
__device__ __forceinline__ double to_f64(float x) {
    double d;
    asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(x));
    return d;
}

// NaN / Inf among N values: one FMA per value (x * 0 is NaN exactly for Inf and NaN), counted
// one by one only where some value is not finite.
template <int N>
__device__ __forceinline__ unsigned count_nonfinite(const float (&x)[N]) {
    float z = 0.f;
#pragma unroll
    for (int e = 0; e < N; ++e) z = __fmaf_rn(x[e], 0.f, z);
    unsigned bad = 0;
    if (z != z) {
#pragma unroll
        for (int e = 0; e < N; ++e) bad += is_nonfinite(x[e]);
    }
    return bad;
}
__device__ __forceinline__ void add_nonfinite(unsigned long long* counter, unsigned n) {
    n = __reduce_add_sync(0xffffffffu, n);
    if (n && (threadIdx.x & 31) == 0) atomicAdd(counter, (unsigned long long)n);
}

// Non-negative floats order like their bit patterns, so atomicMax on the bits is a max of the
// values: order-independent, hence deterministic. The target must start at +0.0 (all zero bits).
__device__ __forceinline__ void atomic_max_nonneg(float* addr, float value) {
    atomicMax(reinterpret_cast<unsigned int*>(addr), __float_as_uint(value));
}

// Channel rebalancing scale s_c = sqrt(amaxK_c / amaxQ_c), 1 where either maximum is zero
// (reference.quant.channel_scales). Correctly rounded division and square root.
__device__ __forceinline__ float rebalance_scale(float amax_q, float amax_k) {
    return (amax_q > 0.f && amax_k > 0.f) ? __fsqrt_rn(__fdiv_rn(amax_k, amax_q)) : 1.f;
}

// float -> e4m3, round to nearest even, saturating to +-448 (inputs are finite: no NaN).
__device__ __forceinline__ unsigned char to_e4m3(float x) {
#if SPARGE_HAS_FP8
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.f), "f"(x));
    return (unsigned char)(r & 0xff);                    // the second source lands in the low byte
#else
    __trap();
    return 0;
#endif
}

// Two floats -> two e4m3 in one 16-bit word, lo in the low byte.
__device__ __forceinline__ unsigned short to_e4m3x2(float lo, float hi) {
#if SPARGE_HAS_FP8
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
    return r;
#else
    __trap();
    return 0;
#endif
}

__device__ __forceinline__ float warp_max(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

__device__ __forceinline__ double warp_sum(double x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

}  // namespace sparge
