/* kernels/cuda_embed.cu: embedding lookup from the table in its GGUF type (cuda_op_embed). */
#include "kernels/cuda_dequant.cuh"

/* Block t: row ids[t] of the table, 32 elements per thread and step. */
__global__ void embed_kernel(float *y, dtype_t t, const uint8_t *table, size_t row_bytes, int64_t n_vocab,
                             int64_t n_embd, const int32_t *ids)
{
    const int32_t id = ids[blockIdx.x];
    float *out = y + (int64_t)blockIdx.x * n_embd;
    const bool ok = id >= 0 && id < n_vocab;
    for (int64_t c = (int64_t)threadIdx.x * 32; c < n_embd; c += (int64_t)blockDim.x * 32) {
        const int cnt = n_embd - c < 32 ? (int)(n_embd - c) : 32;
        float v[32];
        if (ok)
            deq32(t, table + (size_t)id * row_bytes, c, cnt, v, false, NULL);
        else
            for (int j = 0; j < 32; j++) v[j] = 0.0f;
        for (int j = 0; j < cnt; j++) out[c + j] = v[j];
    }
}

extern "C" int cuda_op_embed(float *y, dtype_t t, const void *table, int64_t n_vocab, int64_t n_embd,
                             const int32_t *ids, int n_tok, cuda_stream s, duet_cuda_err *err)
{
    const size_t rb = dtype_row_bytes(t, n_embd);
    ARG_CHECK(err, deq_supported(t) && rb > 0 && n_vocab > 0 && y && table && ids && n_tok >= 0,
              "cuda_op_embed: bad table (%lld x %lld of %s) or arguments", (long long)n_vocab,
              (long long)n_embd, dtype_name(t));
    if (n_tok == 0) return 0;
    embed_kernel<<<n_tok, 64, 0, duet_stream(s)>>>(y, t, (const uint8_t *)table, rb, n_vocab, n_embd, ids);
    LAUNCH_CHECK(err, "embed_kernel");
    return 0;
fail:
    return -1;
}
