// sparse_attn.cu: quantized block-sparse attention with the Stage 2 online filter.
//
// Must match reference.attention.block_sparse_attention (the blocked NumPy mirror; SPEC.md
// section 2): for one query block i of head h, walk the kept key blocks j (block map AND causal
// validity) in increasing j; s = (Q_i K_j^T) * dq_i * dk_j * scale * log2(e); online softmax in the
// log2 domain; the Stage 2 filter per group of 16 rows; P V in fp16 or FP8 e4m3.
//
// Inputs (prepared by block_stats.cu and quant_v.cu, token axes padded to whole blocks):
//   Q  [B, Hq, nq*128, D]  int8 (qk="int8") or fp16 (qk="fp16"), dq [B, Hq, nq]
//   K  [B, Hkv, nk*64, D]  int8 or fp16 (smoothed, rebalanced),  dk [B, Hkv, nk]
//   Vt [B, Hkv, D, nk*64]  e4m3 (keys permuted within each 32, see quant_v.cu) or fp16; dv [B, Hkv, D]
//   block map [B, Hq, nq, nk] bool (one byte each)
// Output in the user's layout and dtype (strides), the first d_out channels (zero-padded D).
//
// Grid: (nq, Hq, B); program x = (query block nq-1-x: the longest causal rows start first,
// head, batch). 8 warps; warp w owns query rows 16w..16w+15 of the block, which is also its
// Stage 2 group (PV_GROUP_ROWS = 16, one mma row tile). Tensor cores through mma.sync:
//   QK^T int8:  mma.m16n8k32.s32.s8.s8.s32   (int32 accumulation is exact: |sum| <= 127^2 D < 2^24)
//   QK^T fp16:  mma.m16n8k16.f32.f16.f16.f32
//   P V  fp16:  mma.m16n8k16.f32.f16.f16.f32
//   P V  fp8:   mma.m16n8k32.f32.e4m3.e4m3.f32 (sm_89+)
// Shared memory: Q tile, one K tile, one V tile (rows padded by 16 bytes: ldmatrix without bank
// conflicts). K_{j'} streams in (cp.async) while P V_j runs, V_j while Q K_j^T runs.
#include "common.cuh"

namespace sparge {

constexpr int ATTN_WARPS = BQ / 16;
constexpr int ATTN_THREADS = ATTN_WARPS * 32;
static_assert(PV_GROUP_ROWS == 16, "a Stage 2 group is one warp's 16-row mma tile");

struct AttnParams {
    const void* q;                   // [B, Hq, nq*BQ, D] quantized operands
    const void* k;                   // [B, Hkv, nk*BK, D]
    const void* vt;                  // [B, Hkv, D, nk*BK]
    const float* dq;                 // [B, Hq, nq]
    const float* dk;                 // [B, Hkv, nk]
    const float* dv;                 // [B, Hkv, D] (FP8 P V only)
    const unsigned char* block_map;  // [B, Hq, nq, nk]
    const float* pvthreshd;          // [Hq] lambda in log2 units; inf turns the filter off
    const float* q_dot_km;           // [B, Hq, Lq] q_t . km (LSE smoothing correction), or nullptr
    void* out;                       // OutT, user layout
    float* lse;                      // [B, Hq, Lq] natural log, or nullptr
    int* group_counts;               // [B, Hq, nq, 2]: visited, skipped (group, block), or nullptr
    long long out_stride_b, out_stride_h, out_stride_t;
    int Hq, Hkv, Lq, Lk, nq, nk, d_out, causal;
    float scale;
};
static_assert(sizeof(AttnParams) == 160, "mirrored by ATTN_PARAMS in sparge_cupy/_gpu.py");

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return (unsigned)__cvta_generic_to_shared(p);
}
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)), "l"(src));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
}
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* src) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(smem_addr(src)));
}

// D[16x8] += A[16xK] B[Kx8]; 32 bytes of K per step for every operand type.
__device__ __forceinline__ void mma_qk(int (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_f16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma_qk(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    mma_f16(c, a, b0, b1);
}
__device__ __forceinline__ void mma_e4m3(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if SPARGE_HAS_FP8
    asm volatile("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, "
                 "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();
#endif
}

__device__ __forceinline__ unsigned pack_half2(float lo, float hi) {
    const __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<const unsigned*>(&v);
}

// An output value in the output type: rounded to nearest, and for fp16 saturated to its largest
// finite value (the rounded P can put an output a fraction of a per cent past max |V|, which
// for V near 65504 would store inf; reference.to_output does the same).
template <typename OutT> __device__ __forceinline__ OutT to_out(float x) { return from_float<OutT>(x); }
template <> __device__ __forceinline__ __half to_out<__half>(float x) {
    unsigned short h;
    asm("cvt.rn.satfinite.f16.f32 %0, %1;\n" : "=h"(h) : "f"(x));
    return __ushort_as_half(h);
}

// Two adjacent output channels; one 2-element store where the row allows it.
template <typename OutT>
__device__ __forceinline__ void store_pair(OutT* dst, float v0, float v1, bool second, bool paired) {
    if (paired) {
        if constexpr (sizeof(OutT) == 4) {
            *reinterpret_cast<float2*>(dst) = make_float2(v0, v1);
        } else {
            OutT two[2] = {to_out<OutT>(v0), to_out<OutT>(v1)};
            *reinterpret_cast<unsigned*>(dst) = *reinterpret_cast<const unsigned*>(two);
        }
        return;
    }
    dst[0] = to_out<OutT>(v0);
    if (second) dst[1] = to_out<OutT>(v1);
}

// The epilogue's rows (both kernels): l summed over the 4 threads of each row, the rows' output
// pointers, and whether the fast stores apply: every channel written and every row's l a div_rn
// divisor (then o / l by div_rn gives __fdiv_rn's quotients in three instructions), the same
// answer on every lane.
template <int D, typename OutT>
__device__ __forceinline__ bool epilogue_rows(const AttnParams& p, float (&l)[2], const int (&t_row)[2],
                                              int b, int h, OutT* (&out)[2]) {
    bool fast = p.d_out == D;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        out[r] = static_cast<OutT*>(p.out) + b * p.out_stride_b + h * p.out_stride_h +
                 (long long)t_row[r] * p.out_stride_t;
        fast = fast && (l[r] == 0.f || div_rn_ok(l[r]));
    }
    return __all_sync(0xffffffffu, fast) != 0;
}

// The general stores (both kernels): the channels below d_out of the real rows, zeros for an
// empty row; value(n, r, v0, v1) gives channels n * 8 + 2 t4 + {0, 1} of row r (IEEE division).
template <int D, typename OutT, typename F>
__device__ __forceinline__ void store_rows_general(const AttnParams& p, const float (&l)[2],
                                                   const bool (&row_real)[2], OutT* const (&out)[2],
                                                   int t4, F&& value) {
    const bool paired = (p.d_out % 2) == 0;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (!row_real[r]) continue;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            const int d = n * 8 + 2 * t4;
            if (d >= p.d_out) continue;
            float v0 = 0.f, v1 = 0.f;
            if (l[r] != 0.f) value(n, r, v0, v1);
            store_pair<OutT>(out[r] + d, v0, v1, d + 1 < p.d_out, paired);
        }
    }
}

template <bool C, typename A, typename B> struct Select { using type = A; };
template <typename A, typename B> struct Select<false, A, B> { using type = B; };

template <int D, bool QK_INT8, bool PV_FP8, typename OutT>
__global__ void __launch_bounds__(ATTN_THREADS, D <= 128 ? 2 : 1) sparse_attn(const AttnParams p) {
    static_assert(D == 64 || D == 128 || D == 256, "native head dims; the launcher pads others");
    static_assert(!PV_FP8 || SPARGE_HAS_FP8, "FP8 P V needs compute capability 8.9 or newer");
    using AccT = typename Select<QK_INT8, int, float>::type;
    constexpr int QE = QK_INT8 ? 1 : 2;              // bytes per Q / K element
    constexpr int VE = PV_FP8 ? 1 : 2;               // bytes per V element
    constexpr int QK_PITCH = D * QE + 16;            // shared row pitch of Q and K tiles (bytes)
    constexpr int V_PITCH = BK * VE + 16;            // shared row pitch of the V^T tile
    constexpr int QK_STEPS = D * QE / 32;            // 32-byte k steps of Q K^T
    constexpr int PV_STEPS = BK * VE / 32;           // 32-byte k steps of P V (16 or 32 keys)
    constexpr int S_TILES = BK / 8;                  // n tiles of the 16 x 64 score tile
    constexpr int O_TILES = D / 8;                   // n tiles of the 16 x D output tile

    extern __shared__ __align__(128) unsigned char smem[];
    unsigned char* sQ = smem;                        // [BQ][QK_PITCH]
    unsigned char* sK = sQ + BQ * QK_PITCH;          // [BK][QK_PITCH]
    unsigned char* sV = sK + BK * QK_PITCH;          // [D][V_PITCH]

    const int i = p.nq - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, t4 = lane & 3;          // mma fragment coordinates
    const int kvh = h / (p.Hq / p.Hkv);
    const size_t qblk = ((size_t)b * p.Hq + h) * p.nq + i;
    const unsigned char* gQ = static_cast<const unsigned char*>(p.q) + qblk * BQ * D * QE;
    const unsigned char* gK = static_cast<const unsigned char*>(p.k) +
                              ((size_t)b * p.Hkv + kvh) * (size_t)p.nk * BK * D * QE;
    const size_t v_row = (size_t)p.nk * BK * VE;     // bytes between channels of V^T
    const unsigned char* gV = static_cast<const unsigned char*>(p.vt) + ((size_t)b * p.Hkv + kvh) * D * v_row;
    const unsigned char* map_row = p.block_map + qblk * p.nk;

    // Key blocks past j_last hold no visible pair (causal): never visited, whatever the map says.
    const long long last_row = min((long long)(i + 1) * BQ, (long long)p.Lq) - 1;
    int j_last = p.nk - 1;
    if (p.causal) {
        const long long lim = last_row + p.Lk - p.Lq;
        j_last = lim < 0 ? -1 : (int)min((long long)p.nk - 1, lim / BK);
    }
    auto next_block = [&](int j) {                   // the next kept block after j, or j_last + 1
        for (++j; j <= j_last; ++j)
            if (map_row[j]) break;
        return j;
    };
    auto load_rows = [&](unsigned char* dst, const unsigned char* src, int rows) {
        constexpr int CHUNKS = D * QE / 16;
        for (int c = tid; c < rows * CHUNKS; c += ATTN_THREADS)
            cp_async16(dst + (c / CHUNKS) * QK_PITCH + (c % CHUNKS) * 16, src + (size_t)c * 16);
    };
    auto load_v = [&](int j) {
        constexpr int CHUNKS = BK * VE / 16;
        const unsigned char* src = gV + (size_t)j * BK * VE;
        for (int c = tid; c < D * CHUNKS; c += ATTN_THREADS)
            cp_async16(sV + (c / CHUNKS) * V_PITCH + (c % CHUNKS) * 16,
                       src + (size_t)(c / CHUNKS) * v_row + (c % CHUNKS) * 16);
    };

    // Running state of rows g and g + 8 of this warp's tile: max m and (this thread's share of)
    // the row sum l in the log2 domain, accumulator o (columns 8n + 2 t4 + {0, 1}).
    float o[O_TILES][4];
#pragma unroll
    for (int n = 0; n < O_TILES; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
    float m[2] = {-CUDART_INF_F, -CUDART_INF_F}, l[2] = {0.f, 0.f};
    const int row0 = i * BQ + warp * 16;
    const int t_row[2] = {row0 + g, row0 + g + 8};
    const bool row_real[2] = {t_row[0] < p.Lq, t_row[1] < p.Lq};
    const bool group_real = row0 < p.Lq;             // the group holds a real query row
    const float lambda = p.pvthreshd[h];
    const bool filter_on = lambda < CUDART_INF_F;
    int visited = 0, skipped = 0;

    int j = next_block(-1);
    if (j <= j_last) {
        load_rows(sQ, gQ, BQ);
        load_rows(sK, gK + (size_t)j * BK * D * QE, BK);
    }
    cp_async_commit();

    while (j <= j_last) {
        cp_async_wait_all();
        __syncthreads();                             // K_j visible; every warp is done with V_prev
        load_v(j);
        cp_async_commit();

        // S = Q_i K_j^T for this warp's 16 rows.
        AccT acc[S_TILES][4];
#pragma unroll
        for (int n = 0; n < S_TILES; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0;
#pragma unroll
        for (int ks = 0; ks < QK_STEPS; ++ks) {
            unsigned a[4];
            ldmatrix_x4(a, sQ + (warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * QK_PITCH + ks * 32 +
                               (lane >> 4) * 16);
#pragma unroll
            for (int np = 0; np < S_TILES / 2; ++np) {
                unsigned bk[4];
                ldmatrix_x4(bk, sK + (np * 16 + (lane & 7) + (lane >> 4) * 8) * QK_PITCH + ks * 32 +
                                    ((lane >> 3) & 1) * 16);
                mma_qk(acc[2 * np], a, bk[0], bk[1]);
                mma_qk(acc[2 * np + 1], a, bk[2], bk[3]);
            }
        }

        // Logits in the log2 domain (explicit roundings: the reference's float32 products), the
        // token-exact causal mask u <= t + (Lk - Lq) and the key tail mask.
        const float c = __fmul_rn(__fmul_rn(__fmul_rn(p.dq[qblk], p.dk[((size_t)b * p.Hkv + kvh) * p.nk + j]),
                                            p.scale), LOG2E);
        const bool need_mask = (j == p.nk - 1 && p.Lk % BK != 0) ||
                               (p.causal && (long long)j * BK + BK - 1 > (long long)i * BQ + p.Lk - p.Lq);
        float s[S_TILES][4];
        float row_max[2] = {-CUDART_INF_F, -CUDART_INF_F};
#pragma unroll
        for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float v = __fmul_rn((float)acc[n][e], c);
                if (need_mask) {
                    const long long u = (long long)j * BK + n * 8 + 2 * t4 + (e & 1);
                    const int t = t_row[e >> 1];
                    if (u >= p.Lk || (p.causal && u > (long long)t + p.Lk - p.Lq)) v = -CUDART_INF_F;
                }
                s[n][e] = v;
                row_max[e >> 1] = fmaxf(row_max[e >> 1], v);
            }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
            row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
        }

        // Stage 2: delta_g = max over the group's real rows of (rowmax - m_prev); a row that has
        // seen no key yet (m_prev = -inf) never lets its group skip. Skip exp2, l and P V when
        // delta_g <= -lambda: m, l and o stay as they are.
        float delta = -CUDART_INF_F;
#pragma unroll
        for (int r = 0; r < 2; ++r)
            if (row_real[r]) delta = fmaxf(delta, m[r] == -CUDART_INF_F ? CUDART_INF_F : row_max[r] - m[r]);
        delta = warp_max(delta);
        const bool skip = filter_on && group_real && delta <= -lambda;
        visited += group_real;
        skipped += skip;

        // Online softmax: m_new = max(m, rowmax) (0 while still -inf, so that -inf - -inf never
        // happens), alpha = exp2(m - m_new), p = exp2(s - m_new).
        unsigned pa[PV_STEPS][4];                    // P as the A operand of P V
        if (!skip) {
            float m_use[2], alpha[2];
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_new = fmaxf(m[r], row_max[r]);
                m_use[r] = m_new == -CUDART_INF_F ? 0.f : m_new;
                alpha[r] = exp2f(m[r] - m_use[r]);
                m[r] = m_new;
            }
            float row_sum[2] = {0.f, 0.f};
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    s[n][e] = exp2f(s[n][e] - m_use[e >> 1]);
                    row_sum[e >> 1] += s[n][e];
                }
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + row_sum[r];
#pragma unroll
            for (int n = 0; n < O_TILES; ++n) {
                o[n][0] *= alpha[0]; o[n][1] *= alpha[0];
                o[n][2] *= alpha[1]; o[n][3] *= alpha[1];
            }
            if constexpr (PV_FP8) {
                // P * 448 in e4m3 (l keeps the unrounded p). Register e of step ks holds logical keys
                // {2 t4, 2 t4 + 1, 8 + 2 t4, 9 + 2 t4} (+16 for a2, a3) of the step's 32, matching
                // the permuted V layout of quant_v.cu.
#pragma unroll
                for (int ks = 0; ks < PV_STEPS; ++ks) {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int n0 = 4 * ks + 2 * half;
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            const unsigned lo = to_e4m3x2(__fmul_rn(s[n0][2 * r], FP8_MAX),
                                                          __fmul_rn(s[n0][2 * r + 1], FP8_MAX));
                            const unsigned hi = to_e4m3x2(__fmul_rn(s[n0 + 1][2 * r], FP8_MAX),
                                                          __fmul_rn(s[n0 + 1][2 * r + 1], FP8_MAX));
                            pa[ks][2 * half + r] = lo | (hi << 16);
                        }
                    }
                }
            } else {
#pragma unroll
                for (int ks = 0; ks < PV_STEPS; ++ks) {
                    pa[ks][0] = pack_half2(s[2 * ks][0], s[2 * ks][1]);
                    pa[ks][1] = pack_half2(s[2 * ks][2], s[2 * ks][3]);
                    pa[ks][2] = pack_half2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
                    pa[ks][3] = pack_half2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
                }
            }
        }

        const int j_next = next_block(j);
        cp_async_wait_all();
        __syncthreads();                             // V_j visible; every warp is done with K_j
        if (j_next <= j_last) load_rows(sK, gK + (size_t)j_next * BK * D * QE, BK);
        cp_async_commit();

        if (!skip) {                                 // O += P V_j
#pragma unroll
            for (int ks = 0; ks < PV_STEPS; ++ks) {
#pragma unroll
                for (int np = 0; np < O_TILES / 2; ++np) {
                    unsigned bv[4];
                    ldmatrix_x4(bv, sV + (np * 16 + (lane & 7) + (lane >> 4) * 8) * V_PITCH + ks * 32 +
                                        ((lane >> 3) & 1) * 16);
                    if constexpr (PV_FP8) {
                        mma_e4m3(o[2 * np], pa[ks], bv[0], bv[1]);
                        mma_e4m3(o[2 * np + 1], pa[ks], bv[2], bv[3]);
                    } else {
                        mma_f16(o[2 * np], pa[ks], bv[0], bv[1]);
                        mma_f16(o[2 * np + 1], pa[ks], bv[2], bv[3]);
                    }
                }
            }
        }
        j = j_next;
    }
    cp_async_wait_all();

    if (p.group_counts && lane == 0) {
        atomicAdd(p.group_counts + qblk * 2, visited);
        atomicAdd(p.group_counts + qblk * 2 + 1, skipped);
    }

    // Epilogue: O = acc / l (FP8: times dv / 448); a row that saw no key (l = 0: no kept block, or
    // every key masked) writes zeros and LSE -inf. Every channel < d_out of every real row is written.
    // As in sparse_attn_wg: where every channel is written and every l is a div_rn divisor (the
    // common case), div_rn (the same quotients as __fdiv_rn) and dv / 448 once per channel pair.
    const float* dv = PV_FP8 ? p.dv + ((size_t)b * p.Hkv + kvh) * D : nullptr;
    OutT* out[2];
    if (epilogue_rows<D, OutT>(p, l, t_row, b, h, out)) {
        const float r448 = __frcp_rn(FP8_MAX);
        float rl[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) rl[r] = __frcp_rn(l[r]);
#pragma unroll
        for (int n = 0; n < O_TILES; ++n) {
            const int d = n * 8 + 2 * t4;
            float w0 = 1.f, w1 = 1.f;
            if constexpr (PV_FP8) {
                const float2 w = *reinterpret_cast<const float2*>(dv + d);
                w0 = div_rn(w.x, FP8_MAX, r448);
                w1 = div_rn(w.y, FP8_MAX, r448);
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                if (!row_real[r]) continue;
                float v0 = 0.f, v1 = 0.f;
                if (l[r] != 0.f) {
                    v0 = div_rn(o[n][2 * r], l[r], rl[r]);
                    v1 = div_rn(o[n][2 * r + 1], l[r], rl[r]);
                    if constexpr (PV_FP8) {
                        v0 = __fmul_rn(v0, w0);
                        v1 = __fmul_rn(v1, w1);
                    }
                }
                store_pair<OutT>(out[r] + d, v0, v1, true, true);
            }
        }
    } else {
        store_rows_general<D, OutT>(p, l, row_real, out, t4, [&](int n, int r, float& v0, float& v1) {
            v0 = __fdiv_rn(o[n][2 * r], l[r]);
            v1 = __fdiv_rn(o[n][2 * r + 1], l[r]);
            if constexpr (PV_FP8) {
                const int d = n * 8 + 2 * t4;
                v0 = __fmul_rn(v0, __fdiv_rn(dv[d], FP8_MAX));
                v1 = __fmul_rn(v1, __fdiv_rn(dv[d + 1], FP8_MAX));
            }
        });
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (p.lse && t4 == 0 && row_real[r]) {
            const size_t at = ((size_t)b * p.Hq + h) * p.Lq + t_row[r];
            p.lse[at] = l[r] == 0.f ? -CUDART_INF_F
                                    : __fadd_rn(__fmul_rn(m[r] + log2f(l[r]), LN2), __fmul_rn(p.scale, p.q_dot_km[at]));
        }
    }
}

}  // namespace sparge

// =============================================================================================
// sm_90a: the same attention with warpgroup MMAs (wgmma). Same parameters, inputs, semantics and
// rounding as sparse_attn above (the launcher picks this kernel on compute capability 9.0).
//
// Two warpgroups of 4 warps; warpgroup w computes query rows 64w..64w+63 of the block, and warp
// 4w + x of it holds rows 16x..16x+15 of its 64 (the wgmma accumulator layout), which are the
// same rows as warp 4w + x of the mma.sync kernel: its Stage 2 group. Accumulator register 4n + e
// of a thread is element e of n-tile n in mma.sync's C-fragment order, so the score, softmax,
// filter and epilogue code are those of the kernel above.
//   S = Q K^T:  wgmma m64n64k32 s8 (or m64n64k16 f16), Q and K from shared memory
//   O += P V:   wgmma m64nDk32 e4m3 (or m64nDk16 f16), P from registers (the same fragment as
//               mma.sync's A operand, hence the same permuted V layout), V^T from shared memory.
//               FP8: two-level accumulation (Hopper's e4m3 wgmma keeps ~13 mantissa bits in
//               its accumulator): each block's P V_j in a fresh accumulator, 64 output channels
//               at a time, then o = o * alpha + P V_j in float32.
// Scores: the row maximum is taken on the raw accumulator and scaled once (monotone rounding),
// and p448 = exp2(s c - m + log2 448) is one FMA and one exp2 (FP8 folds the x448 into the
// exponent; l then counts p448): p within a few float32 ulps of the reference's rounding order.
// Stage 2 skips per 16-row group exactly as above (a skipped group's P is zero: its o, m and l
// stay as they are, o + 0 = o); the P V product of a warpgroup is issued unless all 4 of its
// groups skip, so compute is saved per 64 rows.
// Shared memory: Q (128 rows) and two stages of K and V^T, each operand tile K-major with
// 16-byte chunks swizzled (the wgmma pattern of its row width, 64 or 128 bytes; wider rows are
// split into 128-byte column panels). Thread 0 has the tensor memory accelerator (TMA) load each
// tile, swizzle included, from the launcher's tensor maps (WgMaps), completing on the stage's
// mbarrier; one CTA barrier per key block frees the other stage, into which the next kept block
// is loaded while this one is computed. No other thread spends an instruction on loads (with
// cp.async by all threads they took ~100 of ~500 per block: the TMA made the kernel 1.04-1.41x
// faster, bench/NOTES.md), and the barrier keeps the two warpgroups in step.
// =============================================================================================

#include "wgmma.cuh"

namespace sparge {

constexpr int WG_THREADS = 256;

// Tile images in shared memory: a K-major tile of ROWS rows of ROW_BYTES bytes is stored as
// column panels of SW = min(ROW_BYTES, 128) bytes, each [ROWS][SW], 16-byte chunks XOR-swizzled
// within 8-row groups: the wgmma SW-byte swizzle, which is what the TMA writes for a tensor map
// with CU_TENSOR_MAP_SWIZZLE_<SW>B and a box of [ROWS, SW] rows x bytes (the launcher's maps).

// Matrix descriptors from their low word: make_smem_desc's fields split into the start address
// (low word, bits 0-13, plus the unused leading byte offset 1 at bit 16) and the compile-time
// high word (stride byte offset 8 * SW, swizzle mode). Moving within a tile adds (bytes >> 4) to
// the low word (shared addresses stay below 256 KB: no carry out of the 14-bit field).
__device__ __forceinline__ unsigned desc_lo(const void* tile) {
    return ((smem_addr(tile) & 0x3FFFFu) >> 4) | (1u << 16);
}
template <int SW>
__device__ __forceinline__ unsigned long long desc_at(unsigned lo, int byte_offset) {
    constexpr unsigned hi = ((8 * SW) >> 4) | ((SW == 128 ? 1u : SW == 64 ? 2u : 3u) << 30);
    return ((unsigned long long)hi << 32) | (lo + (unsigned)(byte_offset >> 4));
}
// Byte offset, in a swizzled tile of ROWS rows, of the 32-byte k step `ks` of rows from row0.
template <int ROWS, int ROW_BYTES>
__device__ __forceinline__ constexpr int tile_offset(int row0, int ks) {
    constexpr int SW = ROW_BYTES < 128 ? ROW_BYTES : 128;
    return (ks * 32 / SW) * ROWS * SW + row0 * SW + (ks * 32) % SW;
}

// Issues S = Q K^T for the warpgroup's 64 rows (one commit group; the caller waits); q_lo, k_lo:
// descriptor low words of its Q rows' and the K tile's start.
template <int D, bool QK_INT8>
__device__ __forceinline__ void wg_qk_issue(typename Select<QK_INT8, int, float>::type (&acc)[32],
                                            unsigned q_lo, unsigned k_lo) {
    constexpr int QRB = D * (QK_INT8 ? 1 : 2), SW = QRB < 128 ? QRB : 128;
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < QRB / 32; ++ks) {
        const unsigned long long da = desc_at<SW>(q_lo, tile_offset<BQ, QRB>(0, ks));
        const unsigned long long db = desc_at<SW>(k_lo, tile_offset<BK, QRB>(0, ks));
        if constexpr (QK_INT8) wgmma_s8_ss_n64(acc, da, db, ks > 0);
        else wgmma_f16_ss_n64(acc, da, db, ks > 0);
    }
    wgmma_commit();
}

// acc[N / 2] (+)= P V^T[row0 .. row0 + N) for the 32-byte k step ks of P V (N output channels).
template <int N, int D, bool PV_FP8>
__device__ __forceinline__ void wg_pv(float (&acc)[N / 2], const unsigned (&a)[4], unsigned v_lo,
                                      int row0, int ks, int scale_d) {
    constexpr int VRB = BK * (PV_FP8 ? 1 : 2);
    const unsigned long long db = desc_at<VRB>(v_lo, tile_offset<D, VRB>(row0, ks));
    if constexpr (PV_FP8) {
        if constexpr (N == 64) wgmma_e4m3_rs_n64(acc, a, db, scale_d);
        else if constexpr (N == 128) wgmma_e4m3_rs_n128(acc, a, db, scale_d);
        else wgmma_e4m3_rs_n256(acc, a, db, scale_d);
    } else {
        if constexpr (N == 64) wgmma_f16_rs_n64(acc, a, db, scale_d);
        else if constexpr (N == 128) wgmma_f16_rs_n128(acc, a, db, scale_d);
        else wgmma_f16_rs_n256(acc, a, db, scale_d);
    }
}

// Output channels per FP8 P V chunk (see the two-level accumulation below); SPARGE_WG_PV_CHUNK
// overrides it (benchmarks).
#ifndef SPARGE_WG_PV_CHUNK
#define SPARGE_WG_PV_CHUNK 64
#endif

// The 128 threads of warpgroup wg (0 or 1) meet at named barrier 1 + wg (0 is __syncthreads).
// Immediate barrier ids: ptxas then reserves 3 barriers per CTA, not all 16.
__device__ __forceinline__ void warpgroup_barrier_sync(int wg) {
    if (wg == 0) asm volatile("bar.sync 1, 128;\n" ::: "memory");
    else asm volatile("bar.sync 2, 128;\n" ::: "memory");
}

// CTAs per SM the register allocation aims at (the launch bound): 2 at D <= 128 (16 warps per SM,
// 128 registers), 1 at D = 256. SPARGE_WG_MIN_BLOCKS overrides the D <= 128 choice (benchmarks;
// 3 at D = 64 was not reliably faster, bench/NOTES.md).
#ifndef SPARGE_WG_MIN_BLOCKS
#define SPARGE_WG_MIN_BLOCKS 2
#endif
template <int D> struct WgOccupancy { static constexpr int value = D <= 128 ? SPARGE_WG_MIN_BLOCKS : 1; };

// Head dims at which sparse_attn_wg overlaps the next block's Q K^T with this block's softmax
// (registers for a second score tile; three stages of K and V, where they fit): bit D / 64 of
// SPARGE_WG_OVERLAP. The package passes it (sparge_cupy._compile.wg_overlap_dims: D = 64 unless
// the environment's SPARGE_WG_OVERLAP says otherwise); the default here is the same.
#ifndef SPARGE_WG_OVERLAP
#define SPARGE_WG_OVERLAP 2
#endif
constexpr int WG_SMEM_MAX = 227 * 1024;  // shared memory per CTA on sm_90 (mirrored in _gpu.py)

// Dynamic shared memory the launcher gives sparse_attn_wg (1 KB for aligning the tiles).
template <int D, bool QK_INT8, bool PV_FP8>
struct WgSmem {
    static constexpr int QRB = D * (QK_INT8 ? 1 : 2), VRB = BK * (PV_FP8 ? 1 : 2);
    static constexpr int Q = BQ * QRB, K = BK * QRB, V = D * VRB;
    static constexpr bool overlap = ((SPARGE_WG_OVERLAP >> (D / 64)) & 1) && 1024 + Q + 3 * (K + V) <= WG_SMEM_MAX;
    static constexpr int stages = overlap ? 3 : 2;
    static constexpr int bytes = 1024 + Q + stages * (K + V);
};

// The operands' TMA tensor maps (cuTensorMapEncodeTiled, sparge_cupy/_gpu.py: wg_tensor_maps):
// each a 2D byte tensor [rows, row bytes] with a box of one swizzled tile panel.
//   q:  [B Hq nq BQ, D qe]   box [BQ, min(D qe, 128)]     k: [B Hkv nk BK, D qe]  box [BK, min(D qe, 128)]
//   vt: [B Hkv D, nk BK ve]  box [D, BK ve]
struct alignas(64) TensorMap { unsigned long long opaque[16]; };
struct WgMaps { TensorMap q, k, vt; };
static_assert(sizeof(WgMaps) == 384, "mirrored by WG_MAPS in sparge_cupy/_gpu.py");

#if SPARGE_HAS_WGMMA
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
// Arrives (count 1) and adds `bytes` to the transactions the current phase waits for.
__device__ __forceinline__ void mbar_expect_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
// Adds `bytes` to the transactions the current phase waits for (no arrival).
__device__ __forceinline__ void mbar_add_tx(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.expect_tx.relaxed.cta.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
                 : "memory");
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    asm volatile(
        "{\n.reg .pred done;\nWAIT_AGAIN:\n"
        "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
        "@!done bra WAIT_AGAIN;\n}\n" ::"r"(smem_addr(bar)), "r"(parity) : "memory");
}
// One box of `map` at (byte column c0, row c1) into shared memory; completes on `bar`.
__device__ __forceinline__ void tma_load(void* dst, const TensorMap* map, int c0, int c1,
                                         unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(smem_addr(dst)), "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1),
          "r"(smem_addr(bar)) : "memory");
}
#endif

// One warp's 16 query rows in the wgmma kernel (rows 16 w .. 16 w + 15 of the query block for
// warp w = 0..7; the same rows as warp w of the mma.sync kernel, hence its Stage 2 group): the
// online-softmax state, the masks, Stage 2, the step that turns a block's scores into P, and the
// epilogue. Accumulator register 4n + e of a thread is element e of n-tile n in
// mma.sync's C-fragment order (rows g and g + 8, columns 8n + 2 t4 + {0, 1}).
template <bool QK_INT8, bool PV_FP8, bool MASK_FROM>
struct WgRows {
    using AccT = typename Select<QK_INT8, int, float>::type;
    static constexpr int PV_STEPS = BK * (PV_FP8 ? 1 : 2) / 32;  // 32-byte k steps of P V
    static constexpr int S_TILES = BK / 8;

    float m[2], l[2];                 // running max and (this thread's share of) the row sum, log2 domain
    int t_row[2], key_lim[2];         // key u is masked for row r iff u > key_lim[r]
    bool row_real[2], group_real, filter_on;
    float lambda, dq_i;
    const float* dk_row;
    int visited, skipped;
    int mask_from;                    // MASK_FROM: key blocks j >= mask_from hold masked keys (causal, tail)
    int lane, warp, wg;               // warp 0..7, its warpgroup (warp-uniform for the compiler)

    __device__ __forceinline__ WgRows(const AttnParams& p, int i_, int h, int b, int kvh, size_t qblk,
                                      int warp_, int lane_)
        : lane(lane_), warp(warp_), wg(__shfl_sync(0xffffffffu, warp_ >> 2, 0)) {
        const int row0 = i_ * BQ + warp * 16, g = lane >> 2;
        t_row[0] = row0 + g;
        t_row[1] = row0 + g + 8;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m[r] = -CUDART_INF_F;
            l[r] = 0.f;
            row_real[r] = t_row[r] < p.Lq;
            // Last visible key: the tail Lk - 1, and t + Lk - Lq when causal, clamped to [-1, Lk - 1].
            long long lim = p.Lk - 1;
            if (p.causal) lim = min(lim, (long long)t_row[r] + p.Lk - p.Lq);
            key_lim[r] = (int)max(lim, -1ll);
        }
        group_real = row0 < p.Lq;
        if constexpr (MASK_FROM) {
            // Block j holds a key past some row's last visible key iff it is the ragged tail block
            // or, causal, j BK + BK - 1 > i BQ + Lk - Lq for the block's first row, i.e. j >=
            // floor((i BQ + Lk - Lq + 1) / BK): one compare per block instead of that arithmetic.
            long long from = p.nk;
            if (p.causal) {
                const long long x = (long long)i_ * BQ + p.Lk - p.Lq + 1;
                from = min(from, max(0ll, x >= 0 ? x / BK : -((-x + BK - 1) / BK)));
            }
            if (p.Lk % BK != 0) from = min(from, (long long)p.nk - 1);
            mask_from = (int)from;
        }
        lambda = p.pvthreshd[h];
        filter_on = lambda < CUDART_INF_F;
        dq_i = p.dq[qblk];
        dk_row = p.dk + ((size_t)b * p.Hkv + kvh) * p.nk;
        visited = skipped = 0;
    }

    // One kept block j's softmax: scores from the accumulator (or from its float32 copy: the
    // overlapped loop converts before reusing the accumulator), Stage 2, online softmax, and P
    // as the A fragments of P V. alpha[r] is o's rescale for row r (1 where the group skips), for
    // the caller to apply with (FP8: to) the block's P V. Returns whether the whole warpgroup
    // skips the block's P V.
    template <typename T>
    __device__ __forceinline__ bool step(const AttnParams& p, int i, const T (&acc)[32], int j,
                                         unsigned (&pa)[PV_STEPS][4], float (&alpha)[2], int* wg_skip) {
        const int t4 = lane & 3;
        const float c = __fmul_rn(__fmul_rn(__fmul_rn(dq_i, dk_row[j]), p.scale), LOG2E);
        const bool need_mask = MASK_FROM ? j >= mask_from
            : (j == p.nk - 1 && p.Lk % BK != 0) ||
              (p.causal && (long long)j * BK + BK - 1 > (long long)i * BQ + p.Lk - p.Lq);
        // Scores: s = acc (exact in float32: |acc| < 2^24) or -inf where masked; the logit is
        // fl(s * c) as in the reference, and since c > 0 rounds monotonically, the row maximum of
        // the logits is fl(max(s) * c) (one multiply per row, not per score). The exponent is
        // fused: p = exp2(s * c - m) in one FMA and one exp2 (the reference rounds s * c and the
        // difference apart: p differs by a few float32 ulps). FP8 also folds the x448 scaling
        // into the exponent, p448 = exp2(s * c - m + log2 448), and the row sum l then counts
        // p448 (the epilogue divides by l448 = 448 l).
        float s[S_TILES][4];
#pragma unroll
        for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) s[n][e] = (float)acc[4 * n + e];
        }
        if (need_mask) {                             // CTA-uniform: diagonal and tail blocks only
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    if (j * BK + n * 8 + 2 * t4 + (e & 1) > key_lim[e >> 1]) s[n][e] = -CUDART_INF_F;
            }
        }
        float row_max[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {                // a tree, not a 16-long dependency chain
            float x[4];
#pragma unroll
            for (int q = 0; q < 4; ++q)
                x[q] = fmaxf(fmaxf(s[2 * q][2 * r], s[2 * q][2 * r + 1]),
                             fmaxf(s[2 * q + 1][2 * r], s[2 * q + 1][2 * r + 1]));
            row_max[r] = fmaxf(fmaxf(x[0], x[1]), fmaxf(x[2], x[3]));
            row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 1));
            row_max[r] = fmaxf(row_max[r], __shfl_xor_sync(0xffffffffu, row_max[r], 2));
            row_max[r] = row_max[r] == -CUDART_INF_F ? -CUDART_INF_F : __fmul_rn(row_max[r], c);
        }

        bool skip = false, wg_all_skip = false;
        visited += group_real;
        if (filter_on) {                             // uniform: lambda is per head
            float delta = -CUDART_INF_F;
#pragma unroll
            for (int r = 0; r < 2; ++r)
                if (row_real[r]) delta = fmaxf(delta, m[r] == -CUDART_INF_F ? CUDART_INF_F : row_max[r] - m[r]);
            delta = warp_max(delta);
            skip = group_real && delta <= -lambda;
            skipped += skip;
            if (lane == 0) wg_skip[warp] = skip;
            warpgroup_barrier_sync(wg);
            wg_all_skip = wg_skip[4 * wg] && wg_skip[4 * wg + 1] && wg_skip[4 * wg + 2] && wg_skip[4 * wg + 3];
        }

        alpha[0] = alpha[1] = 1.f;
        if (!skip) {
            float bias[2];
            const float c_exp = fmaxf(c, 1.17549435e-38f);  // c underflowed to 0: -inf * 0 is NaN
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float m_new = fmaxf(m[r], row_max[r]);
                const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
                alpha[r] = exp2f(m[r] - m_use);
                bias[r] = PV_FP8 ? LOG2_FP8_MAX - m_use : -m_use;
                m[r] = m_new;
            }
#pragma unroll
            for (int n = 0; n < S_TILES; ++n) {
#pragma unroll
                for (int e = 0; e < 4; ++e) s[n][e] = exp2f(fmaf(s[n][e], c_exp, bias[e >> 1]));
            }
#pragma unroll
            for (int r = 0; r < 2; ++r) {            // row sums as a tree too
                float x[4];
#pragma unroll
                for (int q = 0; q < 4; ++q)
                    x[q] = (s[2 * q][2 * r] + s[2 * q][2 * r + 1]) + (s[2 * q + 1][2 * r] + s[2 * q + 1][2 * r + 1]);
                l[r] = l[r] * alpha[r] + ((x[0] + x[1]) + (x[2] + x[3]));
            }
            if constexpr (PV_FP8) {
#pragma unroll
                for (int ks = 0; ks < PV_STEPS; ++ks) {
#pragma unroll
                    for (int half = 0; half < 2; ++half) {
                        const int n0 = 4 * ks + 2 * half;
#pragma unroll
                        for (int r = 0; r < 2; ++r) {
                            const unsigned lo = to_e4m3x2(s[n0][2 * r], s[n0][2 * r + 1]);
                            const unsigned hi = to_e4m3x2(s[n0 + 1][2 * r], s[n0 + 1][2 * r + 1]);
                            pa[ks][2 * half + r] = lo | (hi << 16);
                        }
                    }
                }
            } else {
#pragma unroll
                for (int ks = 0; ks < PV_STEPS; ++ks) {
                    pa[ks][0] = pack_half2(s[2 * ks][0], s[2 * ks][1]);
                    pa[ks][1] = pack_half2(s[2 * ks][2], s[2 * ks][3]);
                    pa[ks][2] = pack_half2(s[2 * ks + 1][0], s[2 * ks + 1][1]);
                    pa[ks][3] = pack_half2(s[2 * ks + 1][2], s[2 * ks + 1][3]);
                }
            }
        } else {
#pragma unroll
            for (int ks = 0; ks < PV_STEPS; ++ks) pa[ks][0] = pa[ks][1] = pa[ks][2] = pa[ks][3] = 0u;
        }
        return wg_all_skip;
    }

    // o *= alpha (rows g, g + 8: registers 4n + {0, 1} and 4n + {2, 3}).
    template <int N>
    __device__ __forceinline__ void rescale(float (&o)[N], const float (&alpha)[2]) const {
#pragma unroll
        for (int x = 0; x < N; ++x) o[x] *= alpha[(x >> 1) & 1];
    }
    // o[first ..] = o * alpha + t: the FP8 two-level accumulation. Hopper's e4m3 wgmma adds into
    // its accumulator with about 13 mantissa bits, not float32, which over a long row loses the
    // small terms; so each block's P V_j, 64 keys, goes to a fresh accumulator t first.
    template <int N, int M>
    __device__ __forceinline__ void add_block(float (&o)[N], const float (&t)[M], int first,
                                              const float (&alpha)[2]) const {
#pragma unroll
        for (int x = 0; x < M; ++x) o[first + x] = fmaf(o[first + x], alpha[(x >> 1) & 1], t[x]);
    }

    // The epilogue: Stage 2 counts, then O = o / l (FP8: times dv) in the user's layout and dtype,
    // zeros for an empty row, and the LSE. Two forms of the stores: every channel written and
    // every row's l a div_rn divisor (the common case, warp-uniform): each pair of channels is
    // two div_rn (three instructions each, the same quotient as __fdiv_rn), its dv loaded once for
    // both rows; otherwise per-channel bounds and IEEE division. (The general form alone cost
    // ~45 instructions per pair, ~1400 per thread at D = 128: three key blocks' softmax.)
    // dv: the head's FP8 V scales (D = 256: staged in shared memory by the kernel's prologue; ncu
    // at a tenth of the blocks found 9% of the kernel waiting here for their global loads).
    template <int D, typename OutT, bool DV_SMEM>
    __device__ __forceinline__ void store(const AttnParams& p, const float (&o)[D / 2], int h, int b,
                                          int kvh, size_t qblk, const float* s_dv) {
        if (p.group_counts && lane == 0) {
            atomicAdd(p.group_counts + qblk * 2, visited);
            atomicAdd(p.group_counts + qblk * 2 + 1, skipped);
        }
        const float* dv = DV_SMEM ? s_dv : PV_FP8 ? p.dv + ((size_t)b * p.Hkv + kvh) * D : nullptr;
        const int t4 = lane & 3;
        OutT* out[2];
        if (epilogue_rows<D, OutT>(p, l, t_row, b, h, out)) {
            float ls[2], rl[2];                      // an empty row divides by 1 and stores zeros
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                ls[r] = l[r] == 0.f ? 1.f : l[r];
                rl[r] = __frcp_rn(ls[r]);
            }
            // The thread's dv pairs, their loads all in flight together; at D = 256 one pair at a
            // time (64 more live registers there slowed the whole kernel by 18%, bench/NOTES.md).
            constexpr bool PRELOAD = PV_FP8 && D <= 128;
            float2 w[PRELOAD ? D / 8 : 1];
            if constexpr (PRELOAD) {
#pragma unroll
                for (int n = 0; n < D / 8; ++n) w[n] = *reinterpret_cast<const float2*>(dv + n * 8 + 2 * t4);
            }
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int d = n * 8 + 2 * t4;
                if constexpr (PV_FP8 && !PRELOAD) w[0] = *reinterpret_cast<const float2*>(dv + d);
                const float2 wn = w[PRELOAD ? n : 0];
#pragma unroll
                for (int r = 0; r < 2; ++r) {        // FP8: o and l both count p448
                    float v0 = div_rn(o[4 * n + 2 * r], ls[r], rl[r]);
                    float v1 = div_rn(o[4 * n + 2 * r + 1], ls[r], rl[r]);
                    if constexpr (PV_FP8) {
                        v0 = __fmul_rn(v0, wn.x);
                        v1 = __fmul_rn(v1, wn.y);
                    }
                    if (l[r] == 0.f) v0 = v1 = 0.f;
                    if (row_real[r]) store_pair<OutT>(out[r] + d, v0, v1, true, true);
                }
            }
        } else {
            store_rows_general<D, OutT>(p, l, row_real, out, t4, [&](int n, int r, float& v0, float& v1) {
                v0 = __fdiv_rn(o[4 * n + 2 * r], l[r]);
                v1 = __fdiv_rn(o[4 * n + 2 * r + 1], l[r]);
                if constexpr (PV_FP8) {
                    const int d = n * 8 + 2 * t4;
                    v0 = __fmul_rn(v0, dv[d]);
                    v1 = __fmul_rn(v1, dv[d + 1]);
                }
            });
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (p.lse && t4 == 0 && row_real[r]) {
                const size_t at = ((size_t)b * p.Hq + h) * p.Lq + t_row[r];
                p.lse[at] = l[r] == 0.f ? -CUDART_INF_F
                                        : __fadd_rn(__fmul_rn(m[r] + (log2f(l[r]) - (PV_FP8 ? LOG2_FP8_MAX : 0.f)), LN2),
                                                    __fmul_rn(p.scale, p.q_dot_km[at]));
            }
        }
    }
};

// The last key block any row of query block i sees (causal: none past the diagonal), -1 if none.
__device__ __forceinline__ int last_key_block(const AttnParams& p, int i) {
    if (!p.causal) return p.nk - 1;
    const long long last_row = min((long long)(i + 1) * BQ, (long long)p.Lq) - 1;
    const long long lim = last_row + p.Lk - p.Lq;
    return lim < 0 ? -1 : (int)min((long long)p.nk - 1, lim / BK);
}

// sparse_attn_wg's fixed cost per query block: SPARGE_WG_EARLY_Q issues the Q tile's load before
// the first read of the block map (on a barrier of its own) instead of after it;
// SPARGE_WG_MAP_PREFETCH has the map scan load the next 32 entries of its row while it walks the
// current ones. Both apply where the loop is not overlapped (D >= 128: 1-2% faster at a tenth of
// the blocks, dense unchanged; with the overlapped loop at D = 64 they cost ~1%: bench/NOTES.md,
// sixth session); 0 turns them off everywhere (benchmarks, SPARGE_ATTN_DEFINES).
#ifndef SPARGE_WG_EARLY_Q
#define SPARGE_WG_EARLY_Q 1
#endif
#ifndef SPARGE_WG_MAP_PREFETCH
#define SPARGE_WG_MAP_PREFETCH 1
#endif

// The kept key blocks of one map row in increasing order, as seen by one warp: it reads 32 map
// entries at once into a bit mask (warp-uniform), so a sparse row costs one load per 32 blocks
// (with SPARGE_WG_MAP_PREFETCH, the next 32 entries are loaded when a window is opened).
template <bool PREFETCH>
struct MapScan {
    const unsigned char* row;
    int last, lane;
    int base = -64;                   // bit x of win: block base + x is kept
    unsigned win = 0;
    bool pre = false;                 // SPARGE_WG_MAP_PREFETCH: this lane's entry of the next window
    __device__ __forceinline__ bool entry(int x) const { return x + lane <= last && row[x + lane]; }
    // The next kept block after j, or last + 1.
    __device__ __forceinline__ int next(int j) {
        int x = j + 1;
        while (x <= last) {
            if (x >= base + 32) {               // with PREFETCH, a window starts where the last ended
                const bool kept = PREFETCH && x == base + 32 ? pre : entry(x);
                if (PREFETCH) pre = entry(x + 32);
                base = x;
                win = __ballot_sync(0xffffffffu, kept);
            }
            const unsigned rest = win >> (x - base);
            if (rest) return x + __ffs(rest) - 1;
            x = base + 32;
        }
        return last + 1;
    }
};

// The kept-block list (sparse_attn_wg's LIST; the launcher's choice, _gpu.wg_map_list): the
// prologue writes the query block's kept key blocks, in order, to shared memory (after the K / V
// stages; int16, p.nk + 1 entries with the end marker j_last + 1; the launcher adds the bytes, and
// takes LIST = false past 32766 key blocks or where the list would cost a CTA per SM),
// and the loop reads the next one with one shared load instead of MapScan's window state (a row
// pointer, the window, its base, the prefetch). With the list, and SPARGE_WG_MASK_FROM (default
// 1), the causal / tail mask test is one compare against the query block's first masked key
// block, kept in a register (without the list that register made the D = 64 loop spill; with it
// neither spills). ptxas 13.5, sm_90a, int8 / fp8, fp16 out: static loop instructions D = 64
// 565 -> 522 (list) -> 507 (both), D = 128 619 -> 559 -> 546, no spills (D = 128 spilled 4 bytes
// before). H100, kernel alone, B4 H32 L16K: D = 64 1.048x, D = 128 1.042x dense; 1.13x at half
// the blocks (bench/NOTES.md, 2026-12-06).
#ifndef SPARGE_WG_MASK_FROM
#define SPARGE_WG_MASK_FROM 1
#endif

// The kept key blocks as the list leaves them: next(j) is the entry after the last one
// read (the caller asks in increasing order and stops at the end marker j_last + 1).
struct ListScan {
    const short* list;
    int at = 0;
    __device__ __forceinline__ int next(int) { return list[at++]; }
};

// Every thread of the CTA: the kept blocks 0..j_last of map row `row` into `list`, in order,
// then the end marker j_last + 1. Rounds of WG_THREADS entries: a ballot per warp, the warps'
// counts through shared memory.
__device__ __forceinline__ void build_map_list(const unsigned char* row, int j_last, short* list,
                                               int* warp_n, int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    int count = 0;
    for (int b0 = 0; b0 <= j_last; b0 += WG_THREADS) {
        const int x = b0 + tid;
        const bool kept = x <= j_last && row[x];
        const unsigned bal = __ballot_sync(0xffffffffu, kept);
        if (lane == 0) warp_n[warp] = __popc(bal);
        __syncthreads();
        int before = count, total = 0;
#pragma unroll
        for (int w = 0; w < WG_THREADS / 32; ++w) {
            const int c = warp_n[w];
            before += w < warp ? c : 0;
            total += c;
        }
        if (kept) list[before + __popc(bal & ((1u << lane) - 1))] = (short)x;
        count += total;
        __syncthreads();                      // warp_n is reused by the next round
    }
    if (tid == 0) list[count] = (short)(j_last + 1);
    __syncthreads();
}

template <int D, bool QK_INT8, bool PV_FP8, typename OutT, bool LIST>
__global__ void __launch_bounds__(WG_THREADS, WgOccupancy<D>::value)
sparse_attn_wg(const __grid_constant__ AttnParams p, const __grid_constant__ WgMaps maps) {
#if SPARGE_HAS_WGMMA
    static_assert(D == 64 || D == 128 || D == 256, "native head dims; the launcher pads others");
    using Rows = WgRows<QK_INT8, PV_FP8, LIST && SPARGE_WG_MASK_FROM>;
    using AccT = typename Rows::AccT;
    using Smem = WgSmem<D, QK_INT8, PV_FP8>;
    constexpr int QRB = Smem::QRB, VRB = Smem::VRB;
    constexpr int PV_STEPS = Rows::PV_STEPS;

    constexpr bool OVERLAP = Smem::overlap;
    constexpr bool EARLY_Q = SPARGE_WG_EARLY_Q && !OVERLAP;
    // The FP8 V scales of the epilogue staged in shared memory at D = 256, where the epilogue
    // loads them a pair at a time (registers); at D <= 128 it loads them all at once itself.
    constexpr bool DV_SMEM = PV_FP8 && D > 128;
    constexpr int NS = Smem::stages;

    extern __shared__ unsigned char smem_raw[];
    __shared__ int wg_skip[ATTN_WARPS];
    unsigned char* base = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);
    // Tiles: Q, then the NS stages of K, then those of V (all 1024-byte aligned).
    unsigned char* sQ = base;
    unsigned char* sK0 = sQ + Smem::Q;
    unsigned char* sV0 = sK0 + NS * Smem::K;

    const int i = p.nq - 1 - blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int wg = __shfl_sync(0xffffffffu, tid >> 7, 0);  // warp-uniform for the compiler: uniform registers
    const int kvh = h / (p.Hq / p.Hkv);
    const size_t qblk = ((size_t)b * p.Hq + h) * p.nq + i;
    const int j_last = last_key_block(p, i);
    short* s_list = reinterpret_cast<short*>(sV0 + NS * Smem::V);   // LIST: after the stages
    __shared__ int s_warp_n[LIST ? WG_THREADS / 32 : 1];
    auto scan = [&] {
        if constexpr (LIST) return ListScan{s_list};
        else return MapScan<SPARGE_WG_MAP_PREFETCH && !Smem::overlap>{p.block_map + qblk * p.nk, j_last, lane};
    }();
    // Thread 0 has the TMA load stage s's tiles (the swizzled images the wgmmas read); full[s]
    // counts their bytes in.
    constexpr int QSW = QRB < 128 ? QRB : 128;
    __shared__ __align__(8) unsigned long long full[NS];
    __shared__ __align__(8) unsigned long long q_full;   // EARLY_Q: the Q tile's own
    __shared__ __align__(16) float s_dv[DV_SMEM ? D : 4];
    if (tid == 0) {
#pragma unroll
        for (int s = 0; s < NS; ++s) mbar_init(&full[s], 1);
        if (EARLY_Q) mbar_init(&q_full, 1);
        mbar_init_fence();
    }
    __syncthreads();
    const int k_row = (b * p.Hkv + kvh) * p.nk * BK, v_row0 = (b * p.Hkv + kvh) * D;
    auto load_kv = [&](int j, int stage) {
        if (tid != 0) return;
        mbar_expect_tx(&full[stage], Smem::K + Smem::V);
#pragma unroll
        for (int c = 0; c < QRB / QSW; ++c)
            tma_load(sK0 + stage * Smem::K + c * BK * QSW, &maps.k, c * QSW, k_row + j * BK, &full[stage]);
        tma_load(sV0 + stage * Smem::V, &maps.vt, j * VRB, v_row0, &full[stage]);
    };
    // Descriptor low words: this warpgroup's Q rows, K and V^T stage 0 (the others follow).
    const unsigned q_lo = desc_lo(sQ) + ((64 * wg * (QRB < 128 ? QRB : 128)) >> 4);
    const unsigned k_lo0 = desc_lo(sK0), v_lo0 = desc_lo(sV0);

    float o[D / 2];
#pragma unroll
    for (int n = 0; n < D / 2; ++n) o[n] = 0.f;
    Rows rows(p, i, h, b, kvh, qblk, warp, lane);

    // O += P V_j for the block in `stage` (warpgroup-uniform: skipped where the whole warpgroup
    // skips it); waits for every wgmma in flight.
    auto pv_block = [&](const unsigned (&pa)[PV_STEPS][4], const float (&alpha)[2], int stage, bool skip) {
        if (skip) {
            if constexpr (OVERLAP) wgmma_wait<0>();
            return;
        }
        const unsigned v_lo = v_lo0 + stage * (Smem::V >> 4);
        if constexpr (PV_FP8) {
            constexpr int NC = SPARGE_WG_PV_CHUNK < D ? SPARGE_WG_PV_CHUNK : D;
#pragma unroll
            for (int c = 0; c < D / NC; ++c) {   // NC output channels at a time (registers)
                float t[NC / 2];
                wgmma_fence();
#pragma unroll
                for (int ks = 0; ks < PV_STEPS; ++ks) wg_pv<NC, D, PV_FP8>(t, pa[ks], v_lo, c * NC, ks, ks > 0);
                wgmma_commit();
                wgmma_wait<0>();
                fence_operands(t);
                rows.add_block(o, t, c * NC / 2, alpha);
            }
        } else {
            wgmma_fence();
#pragma unroll
            for (int ks = 0; ks < PV_STEPS; ++ks) wg_pv<D, D, PV_FP8>(o, pa[ks], v_lo, 0, ks, 1);
            wgmma_commit();
            wgmma_wait<0>();
            fence_operands(o);
        }
    };

    auto load_q = [&](unsigned long long* bar) {
#pragma unroll
        for (int c = 0; c < QRB / QSW; ++c) tma_load(sQ + c * BQ * QSW, &maps.q, c * QSW, (int)qblk * BQ, bar);
    };
    if (EARLY_Q && j_last >= 0 && tid == 0) {   // before the map's first read
        mbar_expect_tx(&q_full, Smem::Q);
        load_q(&q_full);
    }
    if constexpr (LIST) build_map_list(p.block_map + qblk * p.nk, j_last, s_list, s_warp_n, tid);
    int j = scan.next(-1);
    if (!EARLY_Q && j <= j_last && tid == 0) {
        mbar_add_tx(&full[0], Smem::Q);
        load_q(&full[0]);
    }
    if (j <= j_last) load_kv(j, 0);
    if (DV_SMEM && tid < D / 4)                  // the epilogue's V scales, while the tiles load
        reinterpret_cast<float4*>(s_dv)[tid] = reinterpret_cast<const float4*>(p.dv + ((size_t)b * p.Hkv + kvh) * D)[tid];
    if (EARLY_Q && j_last >= 0) mbar_wait(&q_full, 0);   // also before an early exit
    if constexpr (!OVERLAP) {
        // One block per iteration: S = Q K_j^T, softmax, P V_j, each waited before the next; the
        // loads of the next kept block fly meanwhile. Latency is hidden across warpgroups (two
        // CTAs per SM at D <= 128).
        int stage = 0;
        for (int n = 0; j <= j_last; ++n) {
            mbar_wait(&full[stage], (n >> 1) & 1);   // K_j, V_j (and Q) are in
            __syncthreads();                         // every warp is done with stage ^ 1
            const int j_next = scan.next(j);
            if (j_next <= j_last) load_kv(j_next, stage ^ 1);
            AccT acc[32];                            // S = Q K_j^T (the first k step overwrites)
            wg_qk_issue<D, QK_INT8>(acc, q_lo, k_lo0 + stage * (Smem::K >> 4));
            wgmma_wait<0>();
            fence_operands(acc);
            unsigned pa[PV_STEPS][4];
            float alpha[2];
            const bool wg_all_skip = rows.step(p, i, acc, j, pa, alpha, wg_skip);
            if constexpr (!PV_FP8) rows.rescale(o, alpha);
            pv_block(pa, alpha, stage, wg_all_skip);
            stage ^= 1;
            j = j_next;
        }
    } else {
        // Three stages: block n in stage n % 3. Iteration n holds block n's scores, issues the
        // next block's Q K^T into the accumulator just read, and runs block n's softmax while the
        // tensor cores work; then P V_n (both waited together). The loads of block n + 2 fly
        // meanwhile (into block n - 1's stage, free after the iteration's CTA barrier).
        int j1 = j <= j_last ? scan.next(j) : j_last + 1;
        if (j1 <= j_last) load_kv(j1, 1);
        AccT acc[32];
        if (j <= j_last) {
            mbar_wait(&full[0], 0);
            wg_qk_issue<D, QK_INT8>(acc, q_lo, k_lo0);
            wgmma_wait<0>();
            fence_operands(acc);
        }
        int s0 = 0, s1 = 1, ph1 = 0;                 // stages of blocks n and n + 1, the latter's parity
        while (j <= j_last) {
            const int s2 = s1 == NS - 1 ? 0 : s1 + 1;
            __syncthreads();                         // every warp is done with block n - 1 (stage s2)
            const int j2 = j1 <= j_last ? scan.next(j1) : j_last + 1;
            if (j2 <= j_last) load_kv(j2, s2);
            float s[32];                             // block n's scores (exact: |acc| < 2^24)
#pragma unroll
            for (int x = 0; x < 32; ++x) s[x] = (float)acc[x];
            fence_operands(acc);
            if (j1 <= j_last) {                      // CTA-uniform
                mbar_wait(&full[s1], ph1);
                wg_qk_issue<D, QK_INT8>(acc, q_lo, k_lo0 + s1 * (Smem::K >> 4));
            }
            unsigned pa[PV_STEPS][4];
            float alpha[2];
            const bool wg_all_skip = rows.step(p, i, s, j, pa, alpha, wg_skip);
            if constexpr (!PV_FP8) rows.rescale(o, alpha);
            pv_block(pa, alpha, s0, wg_all_skip);    // waits for the Q K^T too
            fence_operands(acc);
            s0 = s1;
            ph1 ^= s2 == 0;
            s1 = s2;
            j = j1;
            j1 = j2;
        }
    }
    if constexpr (DV_SMEM) __syncthreads();      // s_dv written (also where no block was kept)
    rows.template store<D, OutT, DV_SMEM>(p, o, h, b, kvh, qblk, s_dv);
#else
    __trap();
#endif
}

}  // namespace sparge
