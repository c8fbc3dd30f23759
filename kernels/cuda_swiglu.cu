/* kernels/cuda_swiglu.cu: y = silu(gate) * up (cuda_op_swiglu), in ops_swiglu's arithmetic:
 * e^-g through the same polynomial as llama.cpp's vector exp (the CPU's twin) for the
 * first n/16*16 elements of a row and expf for the rest, then g / (1 + e) * up. */
#include <math.h>

#include "kernels/cuda_common.cuh"

/* kernels/ops.c's exp_vec_twin, step for step. */
__device__ __forceinline__ float exp_twin(float x)
{
    const float shift = 0x1.8p23f;
    const float z = fmaf(x, 0x1.715476p+0f, shift);
    const float n = __fsub_rn(z, shift);
    if (fabsf(n) > 192.0f) return n <= 0.0f ? 0.0f : INFINITY;
    float b = fmaf(-n, 0x1.62e4p-1f, x);
    b = fmaf(-n, 0x1.7f7d1cp-20f, b);
    const float u = __fmul_rn(b, b);
    const float hi = fmaf(fmaf(0x1.0e4020p-7f, b, 0x1.573e2ep-5f), u, fmaf(0x1.555e66p-3f, b, 0x1.fffdb6p-2f));
    const float j = fmaf(hi, u, fmaf(0x1.ffffecp-1f, b, 1.0f));
    return ldexpf(j, (int)n);
}

template <typename T>
__global__ void swiglu_kernel(T *y, int64_t ldy, const float *gate, const float *up, int64_t ld_in,
                              int64_t n)
{
    const float *g = gate + (int64_t)blockIdx.y * ld_in, *u = up + (int64_t)blockIdx.y * ld_in;
    T *o = y + (int64_t)blockIdx.y * ldy;
    const int64_t nv = n / 16 * 16;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float e = i < nv ? exp_twin(-gi) : expf(-gi);
        o[i] = act_from_f32<T>(__fmul_rn(__fdiv_rn(gi, __fadd_rn(1.0f, e)), u[i]));
    }
}

extern "C" int cuda_op_swiglu(void *y, cuda_act out, int64_t ldy, const float *gate, const float *up,
                              int64_t ld_in, int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err)
{
    ARG_CHECK(err, y && gate && up && n > 0 && n_rows >= 0 && ldy >= n && ld_in >= n,
              "cuda_op_swiglu: bad shape (%d rows of %lld, ld_in %lld, ldy %lld)", n_rows, (long long)n,
              (long long)ld_in, (long long)ldy);
    for (int r0 = 0; r0 < n_rows; r0 += 65535) { /* grid.y is at most 65535 */
        const int nr = n_rows - r0 < 65535 ? n_rows - r0 : 65535;
        const dim3 grid(duet_grid(n, 256, 64), (unsigned)nr);
        const float *g = gate + (int64_t)r0 * ld_in, *u = up + (int64_t)r0 * ld_in;
        if (out == CUDA_ACT_BF16)
            swiglu_kernel<__nv_bfloat16><<<grid, 256, 0, duet_stream(s)>>>(
                (__nv_bfloat16 *)y + (int64_t)r0 * ldy, ldy, g, u, ld_in, n);
        else
            swiglu_kernel<float><<<grid, 256, 0, duet_stream(s)>>>((float *)y + (int64_t)r0 * ldy, ldy, g, u,
                                                                   ld_in, n);
        LAUNCH_CHECK(err, "swiglu_kernel");
    }
    return 0;
fail:
    return -1;
}
