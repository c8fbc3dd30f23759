/* kernels/cuda_sample.cu: choosing tokens on the device (cuda_op_sample).
 *
 * One thread block of 1024 threads per row:
 *   1. repetition penalty, in place on the row's distinct penalized ids;
 *   2. greedy: the largest logit above -inf, lowest id on ties (kernels/sample.c's);
 *   3. otherwise top-k by a 4-pass radix select on the logits' order-preserving 32-bit
 *      keys (8 bits a pass), the ties at the threshold filled with the lowest ids (as the
 *      CPU's heap does), the k <= 1024 candidates sorted best first (bitonic, in shared
 *      memory), then top-p, min-p, temperature and one draw of the row's xoshiro256**
 *      generator with the CPU's arithmetic (double sums, the same special cases).
 * The walk of the draw goes best first (the CPU walks its candidates in heap order), so
 * the same seed gives the same distribution and the same kept set, not always the same
 * token as the CPU.
 */
#include <math.h>

#include "kernels/cuda_common.cuh"

#define ST CUDA_SAMPLE_K_MAX /* threads per row; also the most candidates */

__device__ __forceinline__ float clean(float l) { return isnan(l) ? -INFINITY : l; }

/* Larger float <=> larger key (-inf smallest of the non-NaN values; -0 is +0, as the
 * CPU's comparisons have it). */
__device__ __forceinline__ uint32_t key_of(float l)
{
    const uint32_t u = l == 0.0f ? 0u : __float_as_uint(l);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

__device__ __forceinline__ bool better(float la, int ia, float lb, int ib)
{
    return la > lb || (la == lb && ia < ib);
}

__device__ __forceinline__ uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

/* sample_rng_next and sample_rng_uniform of kernels/sample.c. */
__device__ double rng_uniform(uint64_t *s)
{
    const uint64_t out = rotl64(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return (double)(out >> 11) * (1.0 / 9007199254740992.0);
}

struct sample_smem {
    float cl[ST];      /* candidate logits */
    int ci[ST];        /* candidate ids */
    float ew[ST];      /* weights */
    uint32_t hist[256];
    int wtot[32];      /* per-warp counts (scan) */
    float bl[32];
    int bi[32];
    uint32_t prefix, mask;
    int remaining, n_gt, base, n, token;
};

__global__ void __launch_bounds__(ST) sample_kernel(float *logits, int64_t ld, int n_vocab, cuda_sample_row *rows,
                                                    const int32_t *pen_ids, int32_t *token)
{
    __shared__ sample_smem S;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    cuda_sample_row *R = &rows[blockIdx.x];
    float *lg = logits + (int64_t)R->logit_row * ld;
    const float temp = R->temperature;
    const int k = R->k;

    /* 1. penalty (distinct ids: no two threads touch one logit) */
    for (int i = tid; i < R->n_pen; i += ST) {
        const int id = pen_ids[R->pen_off + i];
        const float l = clean(lg[id]);
        lg[id] = l > 0.0f ? l / R->repeat_penalty : l * R->repeat_penalty;
    }
    __syncthreads();

    /* 2. greedy */
    if (!(temp > 0.0f)) {
        float bl = -INFINITY;
        int bi = -1;
        for (int i = tid; i < n_vocab; i += ST) {
            const float l = lg[i];
            if (l > bl) { /* NaN never passes; ids grow, so ties keep the first */
                bl = l;
                bi = i;
            }
        }
        for (int o = 16; o > 0; o >>= 1) {
            const float ol = __shfl_xor_sync(0xffffffffu, bl, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (oi >= 0 && (bi < 0 || better(ol, oi, bl, bi))) {
                bl = ol;
                bi = oi;
            }
        }
        if (lane == 0) {
            S.bl[warp] = bl;
            S.bi[warp] = bi;
        }
        __syncthreads();
        if (tid == 0) {
            for (int w = 1; w < ST / 32; w++)
                if (S.bi[w] >= 0 && (S.bi[0] < 0 || better(S.bl[w], S.bi[w], S.bl[0], S.bi[0]))) {
                    S.bl[0] = S.bl[w];
                    S.bi[0] = S.bi[w];
                }
            token[blockIdx.x] = S.bi[0];
        }
        return;
    }

    /* 3. top-k: the k-th largest key by radix select (k is checked by the caller; a bad
     * one gives -1 rather than reading past the candidate arrays) */
    if (k < 1 || k > ST || k > n_vocab) {
        if (tid == 0) token[blockIdx.x] = -1;
        return;
    }
    if (tid == 0) {
        S.prefix = 0;
        S.mask = 0;
        S.remaining = k;
        S.n_gt = 0;
        S.base = 0;
    }
    for (int pass = 0; pass < 4; pass++) {
        const int shift = 24 - 8 * pass;
        if (tid < 256) S.hist[tid] = 0;
        __syncthreads();
        const uint32_t prefix = S.prefix, mask = S.mask;
        for (int i = tid; i < n_vocab; i += ST) {
            const uint32_t key = key_of(clean(lg[i]));
            if ((key & mask) == prefix) atomicAdd(&S.hist[(key >> shift) & 255u], 1u);
        }
        __syncthreads();
        if (tid == 0) {
            int cum = 0;
            for (int b = 255; b >= 0; b--) {
                if (cum + (int)S.hist[b] >= S.remaining) {
                    S.remaining -= cum;
                    S.prefix |= (uint32_t)b << shift;
                    S.mask |= 255u << shift;
                    break;
                }
                cum += (int)S.hist[b];
            }
        }
        __syncthreads();
    }
    const uint32_t thr_key = S.prefix;
    const int need_eq = S.remaining, n_gt = k - need_eq;
    for (int i = tid; i < n_vocab; i += ST) {
        const float l = clean(lg[i]);
        if (key_of(l) > thr_key) {
            const int slot = atomicAdd(&S.n_gt, 1);
            S.cl[slot] = l;
            S.ci[slot] = i;
        }
    }
    /* the ties at the threshold: the lowest ids first, chunk by chunk in id order */
    for (int c0 = 0; c0 < n_vocab; c0 += ST) {
        __syncthreads();
        if (S.base >= need_eq) break; /* uniform: read after the barrier */
        const int i = c0 + tid;
        const bool flag = i < n_vocab && key_of(clean(lg[i])) == thr_key;
        const unsigned bal = __ballot_sync(0xffffffffu, flag);
        if (lane == 0) S.wtot[warp] = __popc(bal);
        __syncthreads();
        int before = 0, total = 0;
        for (int w = 0; w < ST / 32; w++) {
            if (w < warp) before += S.wtot[w];
            total += S.wtot[w];
        }
        const int rank = S.base + before + __popc(bal & ((1u << lane) - 1u));
        if (flag && rank < need_eq) {
            S.cl[n_gt + rank] = clean(lg[i]);
            S.ci[n_gt + rank] = i;
        }
        __syncthreads();
        if (tid == 0) S.base += total;
    }
    __syncthreads();

    /* sort the k candidates best first (padding sorts last) */
    int P = 1;
    while (P < k) P <<= 1;
    if (tid >= k && tid < P) {
        S.cl[tid] = -INFINITY;
        S.ci[tid] = 0x7fffffff;
    }
    __syncthreads();
    for (int size = 2; size <= P; size <<= 1)
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            const int i = tid, j = i ^ stride;
            if (i < P && j > i) {
                const bool best_first = (i & size) == 0;
                const bool ib = better(S.cl[i], S.ci[i], S.cl[j], S.ci[j]);
                if (best_first ? !ib : ib) {
                    const float tl = S.cl[i];
                    const int ti = S.ci[i];
                    S.cl[i] = S.cl[j];
                    S.ci[i] = S.ci[j];
                    S.cl[j] = tl;
                    S.ci[j] = ti;
                }
            }
            __syncthreads();
        }

    /* 4. filters on the sorted candidates, as sampler_sample */
    const float max_l = S.cl[0];
    if (max_l == -INFINITY || max_l == INFINITY) { /* no draw in either case */
        if (tid == 0) token[blockIdx.x] = max_l == INFINITY ? S.ci[0] : -1;
        return;
    }
    const int top_p_on = R->top_p < 1.0f;
    const float thr = R->min_p > 0.0f ? max_l + logf(R->min_p) : -INFINITY;
    if (tid < k) S.ew[tid] = top_p_on ? expf(S.cl[tid] - max_l) : 0.0f;
    __syncthreads();
    if (tid == 0) {
        int n = k;
        double z = 0.0;
        if (top_p_on || thr > -INFINITY) {
            int m = 0;
            for (int i = 0; i < n; i++) {
                z += S.ew[i];
                if (S.cl[i] >= thr) m = i + 1; /* sorted: the survivors are a prefix */
            }
            n = m > 0 ? m : 1;
        }
        if (top_p_on && n > 1) {
            const double target = R->top_p > 0.0f ? (double)R->top_p * z : 0.0;
            double cum = 0.0;
            for (int i = 0; i < n; i++) {
                cum += S.ew[i];
                if (cum >= target) {
                    n = i + 1;
                    break;
                }
            }
        }
        S.n = n;
    }
    __syncthreads();
    const int n = S.n;
    const float inv_t = 1.0f / temp;
    if (tid < n) S.ew[tid] = expf((S.cl[tid] - max_l) * inv_t);
    __syncthreads();
    if (tid == 0) {
        uint64_t st[4] = {R->rng[0], R->rng[1], R->rng[2], R->rng[3]};
        const double u01 = rng_uniform(st); /* one draw per call, always */
        R->rng[0] = st[0];
        R->rng[1] = st[1];
        R->rng[2] = st[2];
        R->rng[3] = st[3];
        int tok = S.ci[0];
        if (n > 1) {
            double sum = 0.0;
            for (int i = 0; i < n; i++) sum += S.ew[i];
            const double u = u01 * sum;
            double acc = 0.0;
            int last = 0;
            tok = -1;
            for (int i = 0; i < n && tok < 0; i++) {
                if (S.ew[i] <= 0.0f) continue;
                acc += S.ew[i];
                last = i;
                if (u < acc) tok = S.ci[i];
            }
            if (tok < 0) tok = S.ci[last]; /* rounding left u at the very top */
        }
        token[blockIdx.x] = tok;
    }
}

extern "C" int cuda_op_sample(const float *logits, int64_t ld, int n_rows, int n_vocab, cuda_sample_row *rows,
                              const int32_t *pen_ids, int32_t *token, cuda_stream s, duet_cuda_err *err)
{
    ARG_CHECK(err, logits && rows && token && n_rows >= 0 && n_vocab >= 1 && ld >= n_vocab,
              "cuda_op_sample: bad arguments (%d rows of %d logits, ld %lld)", n_rows, n_vocab, (long long)ld);
    if (n_rows == 0) return 0;
    sample_kernel<<<n_rows, ST, 0, duet_stream(s)>>>((float *)logits, ld, n_vocab, rows, pen_ids, token);
    LAUNCH_CHECK(err, "sample_kernel");
    return 0;
fail:
    return -1;
}
