/* kernels/cuda_common.cuh: what every CUDA operation of duet shares.
 *
 * One family of check macros (STYLE.md, "Errors"): CUDA_CHECK, CUBLAS_CHECK and
 * LAUNCH_CHECK record the failing call's text, file, line and device in a duet_cuda_err
 * (kernels/cuda.h) and jump to the calling function's `fail` label, so the function
 * returns -1 and its caller reads the message; ARG_CHECK does the same for a bad
 * argument with a formatted message. The first error is kept. Nothing here exits or aborts.
 *
 * Also: the stream cast, grid-size helpers, warp and block reductions, and the element
 * conversions that several operations share.
 */
#ifndef DUET_KERNELS_CUDA_COMMON_CUH
#define DUET_KERNELS_CUDA_COMMON_CUH

#include <stdint.h>
#include <stdio.h>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include "kernels/cuda.h"
#include "kernels/cuda_plan.h" /* and with it the C headers, with C linkage */

/* Record `call` failing with `what` at file:line on the current device (first error only). */
static inline void duet_cuda_record(duet_cuda_err *e, const char *call, const char *what,
                                    const char *file, int line)
{
    if (!e || e->set) return;
    int dev = -1;
    if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
    duet_cuda_err_set(e, "%s failed: %s (%s:%d, device %d)", call, what, file, line, dev);
}

#define CUDA_CHECK(err, call)                                                                \
    do {                                                                                     \
        cudaError_t st_ = (call);                                                            \
        if (st_ != cudaSuccess) {                                                            \
            duet_cuda_record((err), #call, cudaGetErrorString(st_), __FILE__, __LINE__);     \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

#define CUBLAS_CHECK(err, call)                                                              \
    do {                                                                                     \
        cublasStatus_t st_ = (call);                                                         \
        if (st_ != CUBLAS_STATUS_SUCCESS) {                                                  \
            duet_cuda_record((err), #call, cublasGetStatusString(st_), __FILE__, __LINE__);  \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

/* After a kernel launch: a bad configuration (grid, shared memory) shows here. */
#define LAUNCH_CHECK(err, kernel_name)                                                       \
    do {                                                                                     \
        cudaError_t st_ = cudaGetLastError();                                                \
        if (st_ != cudaSuccess) {                                                            \
            duet_cuda_record((err), "launch of " kernel_name, cudaGetErrorString(st_),       \
                             __FILE__, __LINE__);                                            \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

/* A precondition of the caller's arguments; the message is formatted. */
#define ARG_CHECK(err, cond, ...)                                                            \
    do {                                                                                     \
        if (!(cond)) {                                                                       \
            duet_cuda_err_set((err), __VA_ARGS__);                                           \
            goto fail;                                                                       \
        }                                                                                    \
    } while (0)

static inline cudaStream_t duet_stream(cuda_stream s) { return (cudaStream_t)s; }

/* Blocks for n items of `per_block` each, at most `cap` (grid-stride loops cover the rest). */
static inline unsigned duet_grid(int64_t n, int per_block, unsigned cap = 1u << 20)
{
    int64_t g = (n + per_block - 1) / per_block;
    if (g < 1) g = 1;
    return g > (int64_t)cap ? cap : (unsigned)g;
}

/* ---- reductions ------------------------------------------------------------------------- */

__device__ __forceinline__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ double warp_sum_d(double v)
{
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Sum over the whole block (blockDim.x a multiple of 32, at most 1024); every thread gets
 * the result. scratch: __shared__ double[32]. */
__device__ __forceinline__ double block_sum_d(double v, double *scratch)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads(); /* scratch may still be read by a previous call */
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0;
    return warp_sum_d(v);
}

/* ---- element conversions ------------------------------------------------------------------ */

__device__ __forceinline__ float h2f_bits(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float bf2f_bits(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

/* Store v as activation type T (f32, or bf16 rounded to nearest even). */
template <typename T> __device__ __forceinline__ T act_from_f32(float v);
template <> __device__ __forceinline__ float act_from_f32<float>(float v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 act_from_f32<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}

#endif
