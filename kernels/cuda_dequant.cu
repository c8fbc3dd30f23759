/* kernels/cuda_dequant.cu: GGUF weights to bf16 or f32 at load (cuda_op_dequant). */
#include "kernels/cuda_dequant.cuh"

/* One thread per 32 output elements of one row: unit u is row u / units_per_row, columns
 * c0 + 32 * (u % units_per_row) ... of the source. */
template <typename T>
__global__ void dequant_kernel(T *dst, float *mins, dtype_t t, const uint8_t *src, size_t row_bytes,
                               int64_t n_rows, int64_t c0, int64_t n_cols)
{
    const int64_t per_row = (n_cols + 31) / 32, n_units = n_rows * per_row;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < n_units;
         u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = u / per_row, c = (u % per_row) * 32;
        const int cnt = n_cols - c < 32 ? (int)(n_cols - c) : 32;
        float y[32], m = 0.0f;
        deq32(t, src + (size_t)r * row_bytes, c0 + c, cnt, y, mins != NULL, &m);
        T *o = dst + r * n_cols + c;
        for (int j = 0; j < cnt; j++) o[j] = act_from_f32<T>(y[j]);
        if (mins) mins[r * (n_cols / 32) + c / 32] = m;
    }
}

extern "C" int cuda_op_dequant(void *dst, cuda_act out, float *mins, dtype_t t, const void *src,
                               int64_t n_rows, int64_t n_in, int64_t c0, int64_t n_cols, cuda_stream s,
                               duet_cuda_err *err)
{
    const int64_t be = (int64_t)dtype_block_elems(t);
    const size_t rb = dtype_row_bytes(t, n_in);
    const unsigned grid = duet_grid(n_rows * ((n_cols + 31) / 32), 256);
    ARG_CHECK(err, deq_supported(t), "cuda_op_dequant: type %s is not one the GPU dequantizes",
              dtype_name(t));
    ARG_CHECK(err, dst && src && n_rows >= 1 && rb > 0 && c0 >= 0 && n_cols >= 1 && c0 + n_cols <= n_in &&
              c0 % be == 0 && n_cols % be == 0,
              "cuda_op_dequant: bad shape (%lld rows of %lld %s elements, columns [%lld, %lld))",
              (long long)n_rows, (long long)n_in, dtype_name(t), (long long)c0, (long long)(c0 + n_cols));
    ARG_CHECK(err, !mins || t == DTYPE_Q4_1, "cuda_op_dequant: split minimums are for q4_1 only, not %s",
              dtype_name(t));
    if (out == CUDA_ACT_BF16)
        dequant_kernel<__nv_bfloat16><<<grid, 256, 0, duet_stream(s)>>>(
            (__nv_bfloat16 *)dst, mins, t, (const uint8_t *)src, rb, n_rows, c0, n_cols);
    else
        dequant_kernel<float><<<grid, 256, 0, duet_stream(s)>>>((float *)dst, mins, t, (const uint8_t *)src,
                                                                rb, n_rows, c0, n_cols);
    LAUNCH_CHECK(err, "dequant_kernel");
    return 0;
fail:
    return -1;
}
