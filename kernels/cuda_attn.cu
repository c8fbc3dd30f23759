/* kernels/cuda_attn.cu: causal attention over the paged KV cache (cuda_op_attention).
 *
 * One thread block takes one tile (consecutive new tokens of one sequence), one KV head
 * and its whole GQA group: its rows are (token, query head of the group), up to 64, so
 * each key and value is read from device memory once per group, not once per query
 * head. Keys are walked 32 at a time (a tile of positions, gathered through the block
 * table, converted to f32 in shared memory): scores, an online softmax (running max and
 * sum per row, warp-parallel over the 32 keys), and the weighted values accumulated in
 * shared memory. The same kernel serves decode (one token per tile) and prefill (up to
 * 64 / group tokens per tile, causal mask inside), and prefix-cache hits are simply keys
 * already in the pool: a tile at pos0 reads keys [0, pos0 + n_rows).
 *
 * Split-K: grid.z = n_splits divides each tile's key tiles into ranges; each writes its
 * unnormalized output with its max and sum, and a second kernel merges them. The range
 * of a split is computed in the kernel from the tile's length, so the launch shape
 * depends on the batch size only (decode steps stay capturable as a CUDA graph).
 *
 * Arithmetic: f32 throughout, scores = (q . k) * scale, expf. The CPU (kernels/attn.c)
 * does an exact two-pass softmax in llama.cpp's order; the two agree to float rounding.
 *
 * Tensor cores (args.tensor_cores, head_dim 64 or 128, no split): a second kernel for
 * the BF16 mode's prefill. 64 rows per block (4 warps of 16), Q, K, V and the weights in
 * bf16 in shared memory, products on the tensor cores (WMMA 16x16x16, f32 accumulation).
 * Two passes over the keys, so the output never needs rescaling and stays in the
 * warps' accumulator fragments: the first finds each row's max and sum, the second adds
 * the normalized weights times the values. K is read twice; the FLOPs of Q.K^T too.
 */
#include <math.h>
#include <mma.h>

#include "kernels/cuda_kv.cuh"
#include "kernels/cuda_plan.h"

#define KT 32            /* keys per step: one per lane of a warp in the softmax */
#define ATTN_THREADS 128

struct attn_p {
    const void *k, *v;
    const float *k_scale, *v_scale;
    int n_kv, hd, bt;
    const int32_t *blocks;
    const cuda_attn_tile *tiles;
    int group, n_head, n_splits, max_rows;
    const float *q;
    int64_t ldq;
    void *out;
    int out_bf16;
    int64_t ldo;
    float scale;
    float *partial;
};

static size_t attn_smem_bytes(int max_rows, int hd)
{
    return sizeof(float) * ((size_t)max_rows * hd * 2 + (size_t)KT * (hd + 1) + (size_t)KT * hd +
                            (size_t)max_rows * KT + 3 * (size_t)max_rows);
}

template <typename E>
__global__ void __launch_bounds__(ATTN_THREADS) attn_kernel(attn_p p)
{
    extern __shared__ float sm[];
    const int hd = p.hd, M = p.max_rows;
    float *sQ = sm;                  /* [M][hd] queries */
    float *sO = sQ + M * hd;         /* [M][hd] unnormalized outputs */
    float *sK = sO + M * hd;         /* [KT][hd + 1] keys (padded: conflict-free columns) */
    float *sV = sK + KT * (hd + 1);  /* [KT][hd] values */
    float *sS = sV + KT * hd;        /* [M][KT] scores, then weights */
    float *sM = sS + M * KT;         /* [M] running max */
    float *sL = sM + M;              /* [M] running sum */
    float *sC = sL + M;              /* [M] correction of the previous sum this step */

    const cuda_attn_tile tile = p.tiles[blockIdx.x];
    const int h = blockIdx.y, split = blockIdx.z, G = p.group, tid = threadIdx.x;
    const int rows = tile.n_rows * G;
    const int kend = tile.pos0 + tile.n_rows; /* keys [0, kend) */
    const int n_kt = (kend + KT - 1) / KT;
    const int per = (n_kt + p.n_splits - 1) / p.n_splits;
    const int kt0 = split * per, kt1 = min(n_kt, kt0 + per);
    const int32_t *table = p.blocks + tile.bt_off;
    const E *K = (const E *)p.k, *V = (const E *)p.v;

    for (int e = tid; e < rows * hd; e += ATTN_THREADS) {
        const int r = e / hd, d = e % hd, i = r / G, g = r % G;
        sQ[e] = p.q[(int64_t)(tile.row0 + i) * p.ldq + (int64_t)(h * G + g) * hd + d];
        sO[e] = 0.0f;
    }
    for (int r = tid; r < rows; r += ATTN_THREADS) {
        sM[r] = -INFINITY;
        sL[r] = 0.0f;
    }
    __syncthreads();

    const int u8 = hd / 8, lane = tid & 31, warp = tid >> 5;
    for (int kt = kt0; kt < kt1; kt++) {
        const int j0 = kt * KT, nk = min(KT, kend - j0);
        for (int u = tid; u < KT * u8; u += ATTN_THREADS) {
            const int j = u / u8, d0 = (u % u8) * 8;
            float kv[8], vv[8];
            if (j < nk) {
                const int pos = j0 + j;
                const int64_t blk = table[pos / p.bt];
                const int64_t r = (blk * p.n_kv + h) * p.bt + pos % p.bt;
                load8<E>(K + r * hd + d0, kv);
                load8<E>(V + r * hd + d0, vv);
                if (p.k_scale) {
                    const float ks = p.k_scale[r], vs = p.v_scale[r];
                    for (int c = 0; c < 8; c++) {
                        kv[c] *= ks;
                        vv[c] *= vs;
                    }
                }
            } else {
                for (int c = 0; c < 8; c++) kv[c] = vv[c] = 0.0f;
            }
            for (int c = 0; c < 8; c++) {
                sK[j * (hd + 1) + d0 + c] = kv[c];
                sV[j * hd + d0 + c] = vv[c];
            }
        }
        __syncthreads();
        for (int e = tid; e < rows * KT; e += ATTN_THREADS) {
            const int r = e / KT, j = e % KT;
            const int qpos = tile.pos0 + r / G;
            float sc = -INFINITY;
            if (j < nk && j0 + j <= qpos) {
                const float *qr = sQ + r * hd, *kr = sK + j * (hd + 1);
                float acc = 0.0f;
                for (int d = 0; d < hd; d++) acc = fmaf(qr[d], kr[d], acc);
                sc = acc * p.scale;
            }
            sS[e] = sc;
        }
        __syncthreads();
        for (int r = warp; r < rows; r += ATTN_THREADS / 32) {
            const float s = sS[r * KT + lane];
            const float m_old = sM[r], m_new = fmaxf(m_old, warp_max(s));
            float w = 0.0f, corr = 1.0f;
            if (m_new > -INFINITY) {
                w = expf(s - m_new);        /* masked: e^-inf = 0 */
                corr = expf(m_old - m_new); /* first keys of the row: 0 */
            }
            sS[r * KT + lane] = w;
            const float sum = warp_sum(w);
            if (lane == 0) {
                sL[r] = fmaf(sL[r], corr, sum);
                sM[r] = m_new;
                sC[r] = corr;
            }
        }
        __syncthreads();
        for (int e = tid; e < rows * hd; e += ATTN_THREADS) {
            const int r = e / hd, d = e % hd;
            const float *wr = sS + r * KT;
            float o = sO[e] * sC[r];
            for (int j = 0; j < nk; j++) o = fmaf(wr[j], sV[j * hd + d], o);
            sO[e] = o;
        }
        __syncthreads();
    }

    for (int e = tid; e < rows * hd; e += ATTN_THREADS) {
        const int r = e / hd, d = e % hd, i = r / G, g = r % G;
        const int64_t row = tile.row0 + i;
        const int head = h * G + g;
        if (p.n_splits == 1) {
            const float l = sL[r], v = l > 0.0f ? sO[e] / l : 0.0f;
            const int64_t o = row * p.ldo + (int64_t)head * hd + d;
            if (p.out_bf16)
                ((__nv_bfloat16 *)p.out)[o] = __float2bfloat16_rn(v);
            else
                ((float *)p.out)[o] = v;
        } else {
            float *pp = p.partial + ((row * p.n_head + head) * p.n_splits + split) * (int64_t)(hd + 2);
            pp[d] = sO[e];
            if (d == 0) {
                pp[hd] = sM[r];
                pp[hd + 1] = sL[r];
            }
        }
    }
}

/* Merge the splits of one (token row, query head): block (row, head). */
__global__ void attn_combine_kernel(const float *partial, int n_head, int n_splits, int hd, void *out,
                                    int out_bf16, int64_t ldo)
{
    __shared__ float w[CUDA_ATTN_MAX_SPLITS];
    __shared__ float inv_l;
    const int64_t row = blockIdx.x;
    const int head = blockIdx.y;
    const float *pp = partial + (row * n_head + head) * n_splits * (int64_t)(hd + 2);
    if (threadIdx.x == 0) {
        float m = -INFINITY;
        for (int s = 0; s < n_splits; s++)
            if (pp[s * (hd + 2) + hd + 1] > 0.0f) m = fmaxf(m, pp[s * (hd + 2) + hd]);
        float l = 0.0f;
        for (int s = 0; s < n_splits; s++) {
            const float ls = pp[s * (hd + 2) + hd + 1];
            w[s] = ls > 0.0f ? expf(pp[s * (hd + 2) + hd] - m) : 0.0f;
            l = fmaf(ls, w[s], l);
        }
        inv_l = l > 0.0f ? 1.0f / l : 0.0f;
    }
    __syncthreads();
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < n_splits; s++)
            if (w[s] > 0.0f) o = fmaf(pp[s * (hd + 2) + d], w[s], o);
        const float v = o * inv_l;
        const int64_t oi = row * ldo + (int64_t)head * hd + d;
        if (out_bf16)
            ((__nv_bfloat16 *)out)[oi] = __float2bfloat16_rn(v);
        else
            ((float *)out)[oi] = v;
    }
}


/* ---- tensor-core kernel (bf16 operands, f32 accumulation) ---------------------------------- */

#define TC_ROWS 64 /* rows per block: 4 warps x 16 */

template <int HD>
struct tc_layout {
    static constexpr int LQ = HD + 8;   /* bf16 row stride of Q, K, V (a multiple of 8) */
    static constexpr int LS = KT + 4;   /* f32 row stride of the scores */
    static constexpr int LP = KT + 8;   /* bf16 row stride of the weights */
    static constexpr int LO = HD + 4;   /* f32 row stride of the output (over Q..P at the end) */
    static constexpr size_t rowstats = 2 * TC_ROWS * sizeof(float);
    static constexpr size_t loop = (size_t)(TC_ROWS + 2 * KT) * LQ * 2 + (size_t)TC_ROWS * LS * 4 +
                                   (size_t)TC_ROWS * LP * 2;
    static constexpr size_t out = (size_t)TC_ROWS * LO * 4;
    static constexpr size_t bytes = rowstats + (loop > out ? loop : out);
};

/* Keys [j0, j0 + KT) of KV head h of one sequence into shared memory as bf16 (zeros past nk). */
template <typename E, int HD>
__device__ __forceinline__ void tc_load(const attn_p &p, const int32_t *table, int h, int j0, int nk,
                                        __nv_bfloat16 *dst, const E *src, const float *scales)
{
    constexpr int LQ = tc_layout<HD>::LQ, U = HD / 8;
    for (int u = threadIdx.x; u < KT * U; u += ATTN_THREADS) {
        const int j = u / U, d0 = (u % U) * 8;
        float v[8];
        if (j < nk) {
            const int pos = j0 + j;
            const int64_t blk = table[pos / p.bt];
            const int64_t r = (blk * p.n_kv + h) * p.bt + pos % p.bt;
            load8<E>(src + r * HD + d0, v);
            if (scales) {
                const float sc = scales[r];
                for (int c = 0; c < 8; c++) v[c] *= sc;
            }
        } else {
            for (int c = 0; c < 8; c++) v[c] = 0.0f;
        }
        for (int c = 0; c < 8; c++) dst[j * LQ + d0 + c] = __float2bfloat16_rn(v[c]);
    }
}

/* This warp's 16 rows of scores S = Q K^T for the current keys into sS (unscaled). */
template <int HD>
__device__ __forceinline__ void tc_scores(const __nv_bfloat16 *sQ, const __nv_bfloat16 *sK, float *sS, int r0)
{
    using namespace nvcuda;
    constexpr int LQ = tc_layout<HD>::LQ, LS = tc_layout<HD>::LS;
#pragma unroll
    for (int n0 = 0; n0 < KT; n0 += 16) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.0f);
#pragma unroll
        for (int k0 = 0; k0 < HD; k0 += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b;
            wmma::load_matrix_sync(a, sQ + r0 * LQ + k0, LQ);
            wmma::load_matrix_sync(b, sK + n0 * LQ + k0, LQ); /* K^T: column n is key n */
            wmma::mma_sync(acc, a, b, acc);
        }
        wmma::store_matrix_sync(sS + r0 * LS + n0, acc, LS, wmma::mem_row_major);
    }
}

template <typename E, int HD>
__global__ void __launch_bounds__(ATTN_THREADS) attn_tc_kernel(attn_p p)
{
    using namespace nvcuda;
    typedef tc_layout<HD> L;
    extern __shared__ __align__(128) unsigned char smraw[];
    float *sMax = (float *)smraw;                          /* [64] row max of the scaled scores */
    float *sSum = sMax + TC_ROWS;                          /* [64] row sum of e^(s - max) */
    __nv_bfloat16 *sQ = (__nv_bfloat16 *)(sSum + TC_ROWS); /* [64][LQ] */
    __nv_bfloat16 *sK = sQ + TC_ROWS * L::LQ;              /* [KT][LQ] */
    __nv_bfloat16 *sV = sK + KT * L::LQ;                   /* [KT][LQ] */
    float *sS = (float *)(sV + KT * L::LQ);                /* [64][LS] */
    __nv_bfloat16 *sP = (__nv_bfloat16 *)(sS + TC_ROWS * L::LS); /* [64][LP] */
    float *sO = (float *)(sSum + TC_ROWS);                 /* [64][LO], after the loops */

    const cuda_attn_tile tile = p.tiles[blockIdx.x];
    const int h = blockIdx.y, G = p.group, tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, r0 = warp * 16;
    const int rows = tile.n_rows * G, kend = tile.pos0 + tile.n_rows, n_kt = (kend + KT - 1) / KT;
    const int32_t *table = p.blocks + tile.bt_off;
    const E *K = (const E *)p.k, *V = (const E *)p.v;

    for (int e = tid; e < TC_ROWS * HD; e += ATTN_THREADS) {
        const int r = e / HD, d = e % HD, i = r / G, g = r % G;
        const float v = r < rows ? p.q[(int64_t)(tile.row0 + i) * p.ldq + (int64_t)(h * G + g) * HD + d] : 0.0f;
        sQ[r * L::LQ + d] = __float2bfloat16_rn(v);
    }
    for (int r = tid; r < TC_ROWS; r += ATTN_THREADS) {
        sMax[r] = -INFINITY;
        sSum[r] = 0.0f;
    }
    __syncthreads();

    /* pass 1: each row's max and sum (this warp owns rows r0 .. r0 + 15) */
    for (int kt = 0; kt < n_kt; kt++) {
        const int j0 = kt * KT, nk = min(KT, kend - j0);
        tc_load<E, HD>(p, table, h, j0, nk, sK, K, p.k_scale);
        __syncthreads();
        tc_scores<HD>(sQ, sK, sS, r0);
        __syncwarp();
        for (int rr = 0; rr < 16; rr++) {
            const int r = r0 + rr, qpos = tile.pos0 + r / G;
            const bool live = r < rows && lane < nk && j0 + lane <= qpos;
            const float s = live ? sS[r * L::LS + lane] * p.scale : -INFINITY;
            const float m_old = sMax[r], m_new = fmaxf(m_old, warp_max(s));
            if (m_new > -INFINITY) {
                const float sum = warp_sum(live ? expf(s - m_new) : 0.0f);
                if (lane == 0) {
                    sSum[r] = fmaf(sSum[r], expf(m_old - m_new), sum);
                    sMax[r] = m_new;
                }
            }
            __syncwarp();
        }
        __syncthreads();
    }

    /* pass 2: O = sum over keys of (e^(s - max) / sum) * V, in the warps' fragments */
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[HD / 16];
#pragma unroll
    for (int f = 0; f < HD / 16; f++) wmma::fill_fragment(acc[f], 0.0f);
    for (int kt = 0; kt < n_kt; kt++) {
        const int j0 = kt * KT, nk = min(KT, kend - j0);
        tc_load<E, HD>(p, table, h, j0, nk, sK, K, p.k_scale);
        tc_load<E, HD>(p, table, h, j0, nk, sV, V, p.v_scale);
        __syncthreads();
        tc_scores<HD>(sQ, sK, sS, r0);
        __syncwarp();
        for (int rr = 0; rr < 16; rr++) {
            const int r = r0 + rr, qpos = tile.pos0 + r / G;
            const bool live = r < rows && lane < nk && j0 + lane <= qpos && sSum[r] > 0.0f;
            const float w = live ? expf(sS[r * L::LS + lane] * p.scale - sMax[r]) / sSum[r] : 0.0f;
            sP[r * L::LP + lane] = __float2bfloat16_rn(w);
        }
        __syncwarp();
#pragma unroll
        for (int k0 = 0; k0 < KT; k0 += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
            wmma::load_matrix_sync(a, sP + r0 * L::LP + k0, L::LP);
#pragma unroll
            for (int f = 0; f < HD / 16; f++) {
                wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
                wmma::load_matrix_sync(b, sV + k0 * L::LQ + f * 16, L::LQ);
                wmma::mma_sync(acc[f], a, b, acc[f]);
            }
        }
        __syncthreads();
    }

    /* out: through shared memory (over Q .. P, all dead now) to the rows' heads */
#pragma unroll
    for (int f = 0; f < HD / 16; f++) wmma::store_matrix_sync(sO + r0 * L::LO + f * 16, acc[f], L::LO, wmma::mem_row_major);
    __syncthreads();
    for (int e = tid; e < rows * HD; e += ATTN_THREADS) {
        const int r = e / HD, d = e % HD, i = r / G, g = r % G;
        const int64_t o = (int64_t)(tile.row0 + i) * p.ldo + (int64_t)(h * G + g) * HD + d;
        const float v = sO[r * L::LO + d];
        if (p.out_bf16)
            ((__nv_bfloat16 *)p.out)[o] = __float2bfloat16_rn(v);
        else
            ((float *)p.out)[o] = v;
    }
}

template <typename E, int HD>
static int launch_tc(const attn_p &p, int n_tiles, cudaStream_t st, duet_cuda_err *err)
{
    const size_t smem = tc_layout<HD>::bytes;
    if (smem > 48 * 1024)
        CUDA_CHECK(err, cudaFuncSetAttribute(attn_tc_kernel<E, HD>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem));
    attn_tc_kernel<E, HD><<<dim3((unsigned)n_tiles, (unsigned)p.n_kv), ATTN_THREADS, smem, st>>>(p);
    LAUNCH_CHECK(err, "attn_tc_kernel");
    return 0;
fail:
    return -1;
}

template <typename E>
static int launch_tc_hd(const attn_p &p, int n_tiles, cudaStream_t st, duet_cuda_err *err)
{
    return p.hd == 64 ? launch_tc<E, 64>(p, n_tiles, st, err) : launch_tc<E, 128>(p, n_tiles, st, err);
}

template <typename E>
static int launch(const attn_p &p, int n_tiles, size_t smem, cudaStream_t st, duet_cuda_err *err)
{
    if (smem > 48 * 1024)
        CUDA_CHECK(err, cudaFuncSetAttribute(attn_kernel<E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             (int)smem));
    attn_kernel<E><<<dim3((unsigned)n_tiles, (unsigned)p.n_kv, (unsigned)p.n_splits), ATTN_THREADS, smem,
                     st>>>(p);
    LAUNCH_CHECK(err, "attn_kernel");
    return 0;
fail:
    return -1;
}

extern "C" int cuda_op_attention(const cuda_attn_args *a, cuda_stream s, duet_cuda_err *err)
{
    attn_p p;
    int group = 0, rc = -1;
    size_t smem = 0;
    const cuda_kv_layer *kv = a ? a->kv : NULL;
    ARG_CHECK(err, a && kv && kv->k && kv->v && a->blocks && a->tiles && a->q && a->out && kv->n_kv_head >= 1 &&
              a->n_head >= 1 && a->n_head % kv->n_kv_head == 0 && a->n_tiles >= 0 && a->n_tok >= 0 &&
              kv->block_tokens >= 1 && a->ldq >= (int64_t)a->n_head * kv->head_dim &&
              a->ldo >= (int64_t)a->n_head * kv->head_dim,
              "cuda_op_attention: bad arguments (%d heads, %d KV heads, head_dim %d)", a ? a->n_head : -1,
              kv ? kv->n_kv_head : -1, kv ? kv->head_dim : -1);
    group = a->n_head / kv->n_kv_head;
    ARG_CHECK(err, cuda_attn_supported(kv->head_dim, group) && a->rows_per_tile >= 1 &&
              a->rows_per_tile * group <= (kv->head_dim <= 128 ? 64 : 32),
              "cuda_op_attention: head_dim %d with %d query heads per KV head and %d rows per tile is beyond "
              "the kernel's limits", kv->head_dim, group, a->rows_per_tile);
    ARG_CHECK(err, a->n_splits >= 1 && a->n_splits <= CUDA_ATTN_MAX_SPLITS && (a->n_splits == 1 || a->partial),
              "cuda_op_attention: %d splits (1..%d, partials needed above 1)", a->n_splits, CUDA_ATTN_MAX_SPLITS);
    ARG_CHECK(err, (kv->type == CUDA_KV_FP8) == (kv->k_scale && kv->v_scale),
              "cuda_op_attention: FP8 needs K and V scales, other types none");
    ARG_CHECK(err, kv->n_kv_head <= 65535, "cuda_op_attention: %d KV heads (65535 at most)", kv->n_kv_head);
    if (a->n_tiles == 0) return 0;
    p.k = kv->k;
    p.v = kv->v;
    p.k_scale = kv->k_scale;
    p.v_scale = kv->v_scale;
    p.n_kv = kv->n_kv_head;
    p.hd = kv->head_dim;
    p.bt = kv->block_tokens;
    p.blocks = a->blocks;
    p.tiles = a->tiles;
    p.group = group;
    p.n_head = a->n_head;
    p.n_splits = a->n_splits;
    p.max_rows = a->rows_per_tile * group;
    p.q = a->q;
    p.ldq = a->ldq;
    p.out = a->out;
    p.out_bf16 = a->out_type == CUDA_ACT_BF16;
    p.ldo = a->ldo;
    p.scale = a->scale;
    p.partial = a->partial;
    smem = attn_smem_bytes(p.max_rows, p.hd);
    /* tensor cores for prefill (tiles of several tokens); decode stays on the one-pass
     * kernel, which reads K once */
    if (a->tensor_cores && a->rows_per_tile > 1 && p.n_splits == 1 && (p.hd == 64 || p.hd == 128) &&
        p.max_rows <= TC_ROWS) {
        switch (kv->type) {
        case CUDA_KV_F32: rc = launch_tc_hd<float>(p, a->n_tiles, duet_stream(s), err); break;
        case CUDA_KV_F16: rc = launch_tc_hd<__half>(p, a->n_tiles, duet_stream(s), err); break;
        case CUDA_KV_BF16: rc = launch_tc_hd<__nv_bfloat16>(p, a->n_tiles, duet_stream(s), err); break;
        case CUDA_KV_FP8: rc = launch_tc_hd<__nv_fp8_e4m3>(p, a->n_tiles, duet_stream(s), err); break;
        default: ARG_CHECK(err, 0, "cuda_op_attention: unknown KV type %d", (int)kv->type);
        }
        return rc;
    }
    switch (kv->type) {
    case CUDA_KV_F32: rc = launch<float>(p, a->n_tiles, smem, duet_stream(s), err); break;
    case CUDA_KV_F16: rc = launch<__half>(p, a->n_tiles, smem, duet_stream(s), err); break;
    case CUDA_KV_BF16: rc = launch<__nv_bfloat16>(p, a->n_tiles, smem, duet_stream(s), err); break;
    case CUDA_KV_FP8: rc = launch<__nv_fp8_e4m3>(p, a->n_tiles, smem, duet_stream(s), err); break;
    default: ARG_CHECK(err, 0, "cuda_op_attention: unknown KV type %d", (int)kv->type);
    }
    if (rc != 0) return -1;
    if (p.n_splits > 1) {
        ARG_CHECK(err, a->n_tok >= 1 && p.n_head <= 65535, "cuda_op_attention: %d token rows with splits",
                  a->n_tok);
        attn_combine_kernel<<<dim3((unsigned)a->n_tok, (unsigned)p.n_head), 64, 0, duet_stream(s)>>>(
            p.partial, p.n_head, p.n_splits, p.hd, p.out, p.out_bf16, p.ldo);
        LAUNCH_CHECK(err, "attn_combine_kernel");
    }
    return 0;
fail:
    return -1;
}
