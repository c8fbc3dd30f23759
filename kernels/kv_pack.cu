/* kernels/kv_pack.cu: KV pack and unpack on the GPU (see kv_pack.cuh). */
#include "kernels/kv_pack.cuh"

/* One thread block per (position, head): it copies one row of head_dim elements as 4-byte
 * words (head_dim * elt_bytes is a multiple of 4 for every supported shape), and for
 * FP8 the row's scale. */
template <bool PACK>
__global__ void kv_span_copy(kv_cuda_span s)
{
    const int h = blockIdx.y, t = blockIdx.x;
    const int pos = s.tok0 + t;
    const int64_t row_words = (int64_t)s.head_dim * s.elt_bytes / 4;
    const int64_t block = s.blocks[pos / s.block_tokens];
    const int64_t pool_row = (block * s.n_kv_heads + s.head0 + h) * s.block_tokens + pos % s.block_tokens;
    const int64_t dense_row = (int64_t)h * s.n_tok + t;
    uint32_t *pool = (uint32_t *)s.pool, *dense = (uint32_t *)s.dense;
    for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
        if (PACK)
            dense[dense_row * row_words + i] = pool[pool_row * row_words + i];
        else
            pool[pool_row * row_words + i] = dense[dense_row * row_words + i];
    }
    if (s.pool_scales && threadIdx.x == 0) {
        if (PACK)
            s.dense_scales[dense_row] = s.pool_scales[pool_row];
        else
            s.pool_scales[pool_row] = s.dense_scales[dense_row];
    }
}

static int check_span(const kv_cuda_span *s, duet_cuda_err *err)
{
    const bool fp8 = s && s->elt_bytes == 1;
    if (!s || !s->pool || !s->blocks || !s->dense || s->n_heads < 1 || s->n_tok < 1 || s->head0 < 0 ||
        s->head0 + s->n_heads > s->n_kv_heads || s->tok0 < 0 || s->block_tokens < 1 ||
        (s->elt_bytes != 1 && s->elt_bytes != 2 && s->elt_bytes != 4) || (s->head_dim * s->elt_bytes) % 4 != 0 ||
        s->n_heads > 65535 || fp8 != (s->pool_scales && s->dense_scales) ||
        (!fp8 && (s->pool_scales || s->dense_scales))) {
        duet_cuda_err_set(err, "kv_cuda_pack/unpack: bad span (heads %d+%d of %d, tokens %d+%d, head_dim %d, "
                          "%d-byte elements, scales %s)", s ? s->head0 : -1, s ? s->n_heads : -1,
                          s ? s->n_kv_heads : -1, s ? s->tok0 : -1, s ? s->n_tok : -1, s ? s->head_dim : -1,
                          s ? s->elt_bytes : -1,
                          s && s->pool_scales && s->dense_scales ? "both" : s && (s->pool_scales || s->dense_scales) ? "one" : "none");
        return -1;
    }
    return 0;
}

template <bool PACK>
static int run(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err)
{
    if (check_span(s, err) != 0) return -1;
    {
        dim3 grid((unsigned)s->n_tok, (unsigned)s->n_heads);
        kv_span_copy<PACK><<<grid, 64, 0, stream>>>(*s);
        LAUNCH_CHECK(err, "kv_span_copy");
    }
    return 0;
fail:
    return -1;
}

extern "C" int kv_cuda_pack(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err)
{
    return run<true>(s, stream, err);
}

extern "C" int kv_cuda_unpack(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err)
{
    return run<false>(s, stream, err);
}

extern "C" int cuda_op_kv_pack(const cuda_kv_span *sp, cuda_stream s, duet_cuda_err *err)
{
    return run<true>(sp, duet_stream(s), err);
}

extern "C" int cuda_op_kv_unpack(const cuda_kv_span *sp, cuda_stream s, duet_cuda_err *err)
{
    return run<false>(sp, duet_stream(s), err);
}
