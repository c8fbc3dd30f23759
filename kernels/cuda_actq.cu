/* kernels/cuda_actq.cu: the exact mode's activation quantization (cuda_op_actq), in
 * kernels/matmul.c's reference quantizers' arithmetic: per block, amax; id = 127 / amax;
 * q = round-to-nearest-even(x * id); A32 (blocks of 32, for Q4_0/Q4_1/Q8_0 weights):
 * d = amax / 127 rounded to f16, and the block sum f16(d * sum(q)) for Q4_1's minimum;
 * AK (blocks of 256, for Q4_K/Q6_K): d = 1 / id. The output is q * d in f32, which a
 * plain f32 product with the dequantized weights turns into the CPU's integer dot
 * products up to float rounding. */
#include <math.h>

#include "kernels/cuda_common.cuh"

__global__ void actq_kernel(float *xq, float *bsum, int blk, const float *x, int64_t ldx, int n_rows, int64_t n)
{
    const int64_t per_row = n / blk, units = (int64_t)n_rows * per_row;
    for (int64_t u = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; u < units; u += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = u / per_row, b = u % per_row;
        const float *xb = x + r * ldx + b * blk;
        float *ob = xq + r * n + b * blk;
        float amax = 0.0f;
        for (int j = 0; j < blk; j++) amax = fmaxf(amax, fabsf(xb[j]));
        const float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        float d;
        if (blk == 32)
            d = __half2float(__float2half_rn(amax / 127.0f));
        else
            d = amax != 0.0f ? 1.0f / id : 0.0f;
        int sum = 0;
        for (int j = 0; j < blk; j++) {
            const int q = __float2int_rn(__fmul_rn(xb[j], id));
            sum += q;
            ob[j] = __fmul_rn((float)q, d);
        }
        if (bsum && blk == 32)
            bsum[r * per_row + b] = __half2float(__float2half_rn(__fmul_rn(amax / 127.0f, (float)sum)));
    }
}

extern "C" int cuda_op_actq(float *xq, float *bsum, cuda_actq_form form, const float *x, int64_t ldx,
                            int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err)
{
    const int blk = form == CUDA_ACTQ_A32 ? 32 : 256;
    ARG_CHECK(err, (form == CUDA_ACTQ_A32 || form == CUDA_ACTQ_AK) && xq && x && n > 0 && n % blk == 0 &&
              ldx >= n && n_rows >= 0 && (!bsum || form == CUDA_ACTQ_A32),
              "cuda_op_actq: bad arguments (form %d, %d rows of %lld, ldx %lld)", (int)form, n_rows,
              (long long)n, (long long)ldx);
    if (n_rows == 0) return 0;
    actq_kernel<<<duet_grid((int64_t)n_rows * (n / blk), 128), 128, 0, duet_stream(s)>>>(xq, bsum, blk, x, ldx,
                                                                                     n_rows, n);
    LAUNCH_CHECK(err, "actq_kernel");
    return 0;
fail:
    return -1;
}
