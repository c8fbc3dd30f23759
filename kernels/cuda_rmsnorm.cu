/* kernels/cuda_rmsnorm.cu: RMS normalization (cuda_op_rmsnorm), in ops_rmsnorm's arithmetic:
 * squares rounded to float and summed in double, the mean rounded to float, then
 * x * scale * w with float roundings. */
#include "kernels/cuda_common.cuh"

template <typename T>
__global__ void rmsnorm_kernel(T *y, int64_t ldy, const float *x, int64_t ldx, const float *w, int64_t n,
                               float eps)
{
    __shared__ double scratch[32];
    const float *xr = x + (int64_t)blockIdx.x * ldx;
    T *yr = y + (int64_t)blockIdx.x * ldy;
    double ss = 0.0;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) ss += (double)__fmul_rn(xr[i], xr[i]);
    ss = block_sum_d(ss, scratch);
    const float mean = (float)(ss / (double)n);
    const float scale = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(mean, eps)));
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float t = __fmul_rn(xr[i], scale);
        yr[i] = act_from_f32<T>(w ? __fmul_rn(t, w[i]) : t);
    }
}

extern "C" int cuda_op_rmsnorm(void *y, cuda_act out, int64_t ldy, const float *x, int64_t ldx,
                               const float *w, int n_rows, int64_t n, float eps, cuda_stream s,
                               duet_cuda_err *err)
{
    ARG_CHECK(err, y && x && n > 0 && n_rows >= 0 && ldx >= n && ldy >= n,
              "cuda_op_rmsnorm: bad shape (%d rows of %lld, ldx %lld, ldy %lld)", n_rows, (long long)n,
              (long long)ldx, (long long)ldy);
    if (n_rows == 0) return 0;
    if (out == CUDA_ACT_BF16)
        rmsnorm_kernel<__nv_bfloat16><<<n_rows, 256, 0, duet_stream(s)>>>((__nv_bfloat16 *)y, ldy, x, ldx, w,
                                                                          n, eps);
    else
        rmsnorm_kernel<float><<<n_rows, 256, 0, duet_stream(s)>>>((float *)y, ldy, x, ldx, w, n, eps);
    LAUNCH_CHECK(err, "rmsnorm_kernel");
    return 0;
fail:
    return -1;
}
