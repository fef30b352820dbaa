// select.cu: Stage 1 selection, from pooled blocks to the bool block map.
//
// Must match reference.predict.predict_block_map (after pool_blocks / block_self_similarity,
// which block_stats.cu computes): compressed map S^_ij = scale * qbar_i . kbar_j (float32), -inf
// for non-self-similar K columns and causally invalid blocks, P^ = softmax_j, then TopCdf
// (select_topcdf), TopK (select_topk) or the mass threshold (select_mass_threshold), fix blocks,
// AND causal validity, attention sink.
//
// Grid: (query block i, query head h, batch b), 256 threads; one program builds one row of the
// map. Dynamic shared memory (see select_smem_bytes in sparge_cupy/_gpu.py):
//   float p[nk] | float csum[nk] | uint64 keys[pow2 >= nk] | uint8 keep[nk]
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

struct SelectParams {
    const float* qbar;       // [B, Hq, nq, D]
    const float* q_sim;      // [B, Hq, nq]
    const float* kbar;       // [B, Hkv, nk, D] (pooled smoothed K)
    const float* k_sim;      // [B, Hkv, nk]
    const float* theta;      // [Hq] self-similarity threshold
    const float* tau;        // [Hq] TopCdf threshold, or nullptr
    const float* topk;       // [Hq] TopK fraction, or nullptr
    const float* mass_threshold;  // [Hq] threshold on nk * P^, or nullptr (exactly one of three)
    unsigned char* block_map;  // [B, Hq, nq, nk]
    int Hq, Hkv, nq, nk, D, Lq, Lk, causal, sink, nk_pow2;
    float scale;
};
static_assert(sizeof(SelectParams) == 120, "mirrored by SELECT_PARAMS in sparge_cupy/_gpu.py");

// Causal block validity: block (i, j) holds a visible (query, key) pair (layout.valid_blocks).
__device__ __forceinline__ bool block_valid(int i, int j, int Lq, int Lk, int causal) {
    if (!causal) return true;
    const long long last_row = min((long long)(i + 1) * BQ, (long long)Lq) - 1;
    return (long long)j * BK <= last_row + (Lk - Lq);
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
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
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
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const unsigned long long y = __shfl_xor_sync(0xffffffffu, x, o);
        x = y < x ? y : x;
    }
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

__global__ void __launch_bounds__(SELECT_THREADS) select_blocks(const SelectParams p) {
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int nk = p.nk;
    unsigned long long* keys = reinterpret_cast<unsigned long long*>(smem_raw);   // [nk_pow2]
    float* prob = reinterpret_cast<float*>(keys + p.nk_pow2);                     // [nk]
    float* csum = prob + nk;                                                      // [nk]
    unsigned char* keep = reinterpret_cast<unsigned char*>(csum + nk);            // [nk]
    __shared__ float qbar[256];
    __shared__ double dpart[SELECT_THREADS / 32];
    __shared__ float fpart[SELECT_THREADS / 32];
    __shared__ int ipart[SELECT_THREADS / 32];
    __shared__ unsigned long long upart[SELECT_THREADS / 32];
    __shared__ int n_keep_s;

    const int i = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int kvh = h / (p.Hq / p.Hkv);
    const float theta = p.theta[h];
    const size_t row = ((size_t)b * p.Hq + h) * p.nq + i;
    for (int d = tid; d < p.D; d += SELECT_THREADS) qbar[d] = p.qbar[row * p.D + d];
    __syncthreads();

    // Compressed map, one warp per key block: S^_j = scale * (qbar . kbar_j), -inf unless finite.
    const float* kbar = p.kbar + ((size_t)b * p.Hkv + kvh) * nk * p.D;
    const float* k_sim = p.k_sim + ((size_t)b * p.Hkv + kvh) * nk;
    for (int j = warp; j < nk; j += SELECT_THREADS / 32) {
        double dot = 0.0;
        for (int d = lane; d < p.D; d += 32) dot += (double)qbar[d] * (double)kbar[(size_t)j * p.D + d];
        dot = warp_sum(dot);
        if (lane == 0) {
            const bool finite = block_valid(i, j, p.Lq, p.Lk, p.causal) && k_sim[j] > theta;
            prob[j] = finite ? __fmul_rn(p.scale, (float)dot) : -CUDART_INF_F;
        }
    }
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
        for (int j = tid; j < nk; j += SELECT_THREADS) {
            const float pj = total > 0.f ? __fdiv_rn(prob[j], total) : 0.f;
            const bool finite = block_valid(i, j, p.Lq, p.Lk, p.causal) && k_sim[j] > theta;
            const bool on = finite && __fmul_rn(nk_f, pj) >= t;
            keep[j] = on;
            n_kept += on;
            if (finite) best = min(best, rank_key(pj, j));
        }
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

    // Fix blocks (non-self-similar Q row, non-self-similar K columns), causal AND, sink.
    const bool q_fix = !(p.q_sim[row] > theta);
    unsigned char* out = p.block_map + row * nk;
    for (int j = tid; j < nk; j += SELECT_THREADS) {
        const bool valid = block_valid(i, j, p.Lq, p.Lk, p.causal);
        bool on = (keep[j] || q_fix || !(k_sim[j] > theta)) && valid;
        if (j == 0 && p.sink) on = on || valid;
        out[j] = on;
    }
}

}  // namespace sparge
