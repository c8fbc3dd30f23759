/* kernels/kv_pack.cu: KV pack and unpack on the GPU (see kv_pack.cuh). */
#include "kernels/kv_pack.cuh"

/* One thread block per (head, position): it copies one row of head_dim elements as
 * 4-byte words (head_dim * elt_bytes is a multiple of 4 for every supported shape). */
template <bool PACK>
__global__ void kv_span_copy(kv_cuda_span s)
{
    const int h = blockIdx.y, t = blockIdx.x;
    const int pos = s.tok0 + t;
    const int64_t row_words = (int64_t)s.head_dim * s.elt_bytes / 4;
    const int64_t block = s.blocks[pos / s.block_tokens];
    const int64_t pool_row = ((block * s.n_kv_heads + s.head0 + h) * s.block_tokens +
                              pos % s.block_tokens) * row_words;
    const int64_t dense_row = ((int64_t)h * s.n_tok + t) * row_words;
    uint32_t *pool = (uint32_t *)s.pool, *dense = (uint32_t *)s.dense;
    for (int64_t i = threadIdx.x; i < row_words; i += blockDim.x) {
        if (PACK)
            dense[dense_row + i] = pool[pool_row + i];
        else
            pool[pool_row + i] = dense[dense_row + i];
    }
}

static int check_span(const kv_cuda_span *s, duet_cuda_err *err)
{
    if (!s || !s->pool || !s->blocks || !s->dense || s->n_heads < 1 || s->n_tok < 1 ||
        s->head0 < 0 || s->head0 + s->n_heads > s->n_kv_heads || s->tok0 < 0 ||
        (s->elt_bytes != 2 && s->elt_bytes != 4) || (s->head_dim * s->elt_bytes) % 4 != 0 ||
        s->n_heads > 65535) {
        if (err && !err->set) {
            snprintf(err->msg, sizeof err->msg, "kv_cuda_pack/unpack: bad span (heads %d+%d of %d, "
                     "tokens %d+%d, head_dim %d, %d-byte elements)", s ? s->head0 : -1,
                     s ? s->n_heads : -1, s ? s->n_kv_heads : -1, s ? s->tok0 : -1,
                     s ? s->n_tok : -1, s ? s->head_dim : -1, s ? s->elt_bytes : -1);
            err->set = 1;
        }
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
        CUDA_CHECK(err, cudaGetLastError());
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
