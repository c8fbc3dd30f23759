/* kernels/cuda_rope.cu: rotary position embedding (cuda_op_rope_cache, cuda_op_rope_apply)
 * and the fused bias + RoPE + KV store after the Q/K/V projection (cuda_op_rope_store).
 *
 * Angles follow ops_rope_cache (kernels/ops.c) step for step: theta starts at the
 * position and is multiplied by ts = freq_base^(-2/n_dims) per pair, a float recurrence;
 * ts itself is computed on the host with the C library's powf, exactly as the CPU does,
 * so the angles are the CPU's bit for bit (cosf/sinf then differ by an ulp or two).
 * Rotation: fmaf(a, c, -(b * s)) and fmaf(a, s, b * c), as ops_rope_apply.
 */
#include <math.h>

#include "kernels/cuda_kv.cuh"

__global__ void rope_cache_kernel(float *cs, const int32_t *pos, int n_tok, int n_dims, float ts,
                                  float freq_scale, const float *freq_factors)
{
    const int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n_tok) return;
    float *c = cs + (int64_t)t * n_dims;
    float th = (float)pos[t];
    for (int i = 0; i < n_dims / 2; i++) {
        float a = th;
        if (freq_factors) a = __fdiv_rn(a, freq_factors[i]);
        a = __fmul_rn(a, freq_scale);
        c[2 * i] = cosf(a);
        c[2 * i + 1] = sinf(a);
        th = __fmul_rn(th, ts);
    }
}

extern "C" int cuda_op_rope_cache(float *cs, const int32_t *pos, int n_tok, const cuda_rope *r, cuda_stream s,
                                  duet_cuda_err *err)
{
    ARG_CHECK(err, cs && pos && r && n_tok >= 0 && r->n_dims >= 2 && r->n_dims % 2 == 0,
              "cuda_op_rope_cache: bad arguments (%d tokens, n_dims %d)", n_tok, r ? r->n_dims : -1);
    if (n_tok == 0) return 0;
    {
        const float ts = powf(r->freq_base, -2.0f / (float)r->n_dims); /* the CPU's powf */
        rope_cache_kernel<<<duet_grid(n_tok, 128), 128, 0, duet_stream(s)>>>(cs, pos, n_tok, r->n_dims, ts,
                                                                            r->freq_scale, r->freq_factors);
        LAUNCH_CHECK(err, "rope_cache_kernel");
    }
    return 0;
fail:
    return -1;
}

/* The indices of rotated pair i of a head: NORMAL (2i, 2i+1), NEOX (i, i + n_dims/2). */
__device__ __forceinline__ void pair_of(int i, int n_dims, int neox, int *a, int *b)
{
    if (neox) {
        *a = i;
        *b = i + n_dims / 2;
    } else {
        *a = 2 * i;
        *b = 2 * i + 1;
    }
}

__device__ __forceinline__ void rotate(float a, float b, float c, float s, float *ra, float *rb)
{
    *ra = fmaf(a, c, -__fmul_rn(b, s));
    *rb = fmaf(a, s, __fmul_rn(b, c));
}

/* Element d of a head after bias and rotation, from the unrotated row x (+ bias). */
__device__ __forceinline__ float rot_elem(const float *x, const float *bias, int d, const float *cs,
                                          int n_dims, int neox)
{
    if (d >= n_dims) return bias ? __fadd_rn(x[d], bias[d]) : x[d];
    const int half = n_dims / 2;
    const int i = neox ? (d < half ? d : d - half) : d / 2;
    int ia, ib;
    pair_of(i, n_dims, neox, &ia, &ib);
    float a = x[ia], b = x[ib];
    if (bias) {
        a = __fadd_rn(a, bias[ia]);
        b = __fadd_rn(b, bias[ib]);
    }
    float ra, rb;
    rotate(a, b, cs[2 * i], cs[2 * i + 1], &ra, &rb);
    return d == ia ? ra : rb;
}

/* Pairs of all heads of one token, in place; pair slot k < n_dims/2 rotates, slots past
 * it are the unrotated dimensions (bias only). */
__device__ __forceinline__ void rope_heads_inplace(float *x, const float *bias, int n_head, int head_dim,
                                                   const float *cs, int n_dims, int neox, int tid, int nth)
{
    const int half = n_dims / 2, per_head = half + (head_dim - n_dims);
    for (int k = tid; k < n_head * per_head; k += nth) {
        const int h = k / per_head, j = k % per_head;
        float *v = x + (int64_t)h * head_dim;
        const float *bv = bias ? bias + (int64_t)h * head_dim : NULL;
        if (j < half) {
            int ia, ib;
            pair_of(j, n_dims, neox, &ia, &ib);
            float a = v[ia], b = v[ib];
            if (bv) {
                a = __fadd_rn(a, bv[ia]);
                b = __fadd_rn(b, bv[ib]);
            }
            rotate(a, b, cs[2 * j], cs[2 * j + 1], &v[ia], &v[ib]);
        } else if (bv) {
            const int d = n_dims + (j - half);
            v[d] = __fadd_rn(v[d], bv[d]);
        }
    }
}

__global__ void rope_apply_kernel(float *x, int64_t ldx, int n_head, int head_dim, const float *cs, int n_dims,
                                  int neox)
{
    const int t = blockIdx.x;
    rope_heads_inplace(x + (int64_t)t * ldx, NULL, n_head, head_dim, cs + (int64_t)t * n_dims, n_dims, neox,
                       threadIdx.x, blockDim.x);
}

extern "C" int cuda_op_rope_apply(float *x, int64_t ldx, int n_tok, int n_head, int head_dim, const float *cs,
                                  int n_dims, int neox, cuda_stream s, duet_cuda_err *err)
{
    ARG_CHECK(err, x && cs && n_tok >= 0 && n_head >= 1 && n_dims >= 2 && n_dims % 2 == 0 &&
              n_dims <= head_dim && ldx >= (int64_t)n_head * head_dim,
              "cuda_op_rope_apply: bad shape (%d tokens, %d heads of %d, n_dims %d, ldx %lld)", n_tok, n_head,
              head_dim, n_dims, (long long)ldx);
    if (n_tok == 0) return 0;
    rope_apply_kernel<<<n_tok, 128, 0, duet_stream(s)>>>(x, ldx, n_head, head_dim, cs, n_dims, neox);
    LAUNCH_CHECK(err, "rope_apply_kernel");
    return 0;
fail:
    return -1;
}

/* ---- fused: bias, RoPE of Q (in place) and K, K and V into the paged pool ---------------- */

struct store_args {
    float *qkv;
    int64_t ldqkv;
    const float *bias;
    int n_head, n_kv, head_dim, n_dims, neox, block_tokens;
    const float *cs;
    const int32_t *slot;
    void *k, *v;
    float *k_scale, *v_scale;
};

/* One row of head_dim for KV head h (K rotated when rot), stored as E (FP8: with the
 * row's scale amax / 448, found first). One warp per row. */
template <typename E>
__device__ void store_row(const store_args &a, const float *src, const float *bias, const float *cs, bool rot,
                          E *dst, float *scale_dst, int lane)
{
    float scale = 1.0f;
    if (scale_dst) {
        float amax = 0.0f;
        for (int d = lane; d < a.head_dim; d += 32) {
            const float v = rot ? rot_elem(src, bias, d, cs, a.n_dims, a.neox)
                                : (bias ? __fadd_rn(src[d], bias[d]) : src[d]);
            amax = fmaxf(amax, fabsf(v));
        }
        amax = warp_max(amax);
        scale = amax > 0.0f ? amax / FP8_MAX : 1.0f;
        if (lane == 0) *scale_dst = scale;
    }
    for (int d = lane; d < a.head_dim; d += 32) {
        float v = rot ? rot_elem(src, bias, d, cs, a.n_dims, a.neox) : (bias ? __fadd_rn(src[d], bias[d]) : src[d]);
        if (scale_dst) v = v / scale;
        dst[d] = kv_store<E>(v);
    }
}

template <typename E>
__global__ void rope_store_kernel(store_args a)
{
    const int t = blockIdx.x, hd = a.head_dim;
    float *row = a.qkv + (int64_t)t * a.ldqkv;
    const float *cs = a.cs + (int64_t)t * a.n_dims;
    const int64_t nq = (int64_t)a.n_head * hd, nkv = (int64_t)a.n_kv * hd;
    /* K and V read the unrotated row: they go to the pool, Q is rotated in place */
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    const int32_t slot = a.slot[t];
    const int64_t blk = slot / a.block_tokens, off = slot % a.block_tokens;
    for (int h = warp; h < 2 * a.n_kv; h += nw) {
        const bool is_k = h < a.n_kv;
        const int kh = is_k ? h : h - a.n_kv;
        const int64_t col = (is_k ? nq : nq + nkv) + (int64_t)kh * hd;
        const int64_t r = (blk * a.n_kv + kh) * a.block_tokens + off;
        E *dst = (E *)(is_k ? a.k : a.v) + r * hd;
        float *sc = is_k ? a.k_scale : a.v_scale;
        store_row<E>(a, row + col, a.bias ? a.bias + col : NULL, cs, is_k, dst, sc ? sc + r : NULL, lane);
    }
    __syncthreads(); /* every K row was read unrotated before Q's rotation (other memory) */
    rope_heads_inplace(row, a.bias, a.n_head, hd, cs, a.n_dims, a.neox, threadIdx.x, blockDim.x);
}

extern "C" int cuda_op_rope_store(float *qkv, int64_t ldqkv, const float *bias, int n_tok, int n_head,
                                  const float *cs, int n_dims, int neox, const int32_t *slot,
                                  const cuda_kv_layer *kv, cuda_stream s, duet_cuda_err *err)
{
    store_args a;
    ARG_CHECK(err, qkv && cs && slot && kv && kv->k && kv->v && n_tok >= 0 && n_head >= 1 && kv->n_kv_head >= 1 &&
              n_dims >= 2 && n_dims % 2 == 0 && n_dims <= kv->head_dim && kv->block_tokens >= 1 &&
              ldqkv >= (int64_t)(n_head + 2 * kv->n_kv_head) * kv->head_dim,
              "cuda_op_rope_store: bad shape (%d tokens, %d heads, %d KV heads of %d, n_dims %d, ldqkv %lld)",
              n_tok, n_head, kv ? kv->n_kv_head : -1, kv ? kv->head_dim : -1, n_dims, (long long)ldqkv);
    ARG_CHECK(err, (kv->type == CUDA_KV_FP8) == (kv->k_scale && kv->v_scale),
              "cuda_op_rope_store: FP8 needs K and V scales, other types none");
    if (n_tok == 0) return 0;
    a.qkv = qkv;
    a.ldqkv = ldqkv;
    a.bias = bias;
    a.n_head = n_head;
    a.n_kv = kv->n_kv_head;
    a.head_dim = kv->head_dim;
    a.n_dims = n_dims;
    a.neox = neox;
    a.block_tokens = kv->block_tokens;
    a.cs = cs;
    a.slot = slot;
    a.k = kv->k;
    a.v = kv->v;
    a.k_scale = kv->k_scale;
    a.v_scale = kv->v_scale;
    switch (kv->type) {
    case CUDA_KV_F32: rope_store_kernel<float><<<n_tok, 256, 0, duet_stream(s)>>>(a); break;
    case CUDA_KV_F16: rope_store_kernel<__half><<<n_tok, 256, 0, duet_stream(s)>>>(a); break;
    case CUDA_KV_BF16: rope_store_kernel<__nv_bfloat16><<<n_tok, 256, 0, duet_stream(s)>>>(a); break;
    case CUDA_KV_FP8: rope_store_kernel<__nv_fp8_e4m3><<<n_tok, 256, 0, duet_stream(s)>>>(a); break;
    default: ARG_CHECK(err, 0, "cuda_op_rope_store: unknown KV type %d", (int)kv->type);
    }
    LAUNCH_CHECK(err, "rope_store_kernel");
    return 0;
fail:
    return -1;
}
