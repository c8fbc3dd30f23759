/* kernels/cuda_device.cu: devices, arenas and plain device memory (kernels/cuda.h). */
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda_common.cuh"
#include "kernels/cuda_plan.h"

#define MIB(x) ((double)(x) / 1048576.0)

extern "C" int cuda_device_count(int *n, duet_cuda_err *err)
{
    int count = 0;
    cudaError_t st = cudaGetDeviceCount(&count);
    if (n) *n = 0;
    if (st != cudaSuccess) {
        (void)cudaGetLastError(); /* not sticky: leave the runtime clean */
        duet_cuda_err_set(err, "no CUDA device: cudaGetDeviceCount: %s (%s)", cudaGetErrorString(st),
                          cudaGetErrorName(st));
        return -1;
    }
    if (count < 1) {
        duet_cuda_err_set(err, "no CUDA device: cudaGetDeviceCount found none");
        return -1;
    }
    if (n) *n = count;
    return 0;
}

extern "C" int cuda_device_select(int index, cuda_device_info *info, duet_cuda_err *err)
{
    int count = 0, v = 0;
    cudaDeviceProp prop;
    size_t fr = 0, tot = 0;
    if (info) memset(info, 0, sizeof *info);
    if (cuda_device_count(&count, err) != 0) return -1;
    ARG_CHECK(err, index >= 0 && index < count, "cuda:%d does not exist: %d CUDA device%s (cuda:0%s)",
              index, count, count == 1 ? "" : "s", count == 1 ? "" : " and up");
    CUDA_CHECK(err, cudaSetDevice(index));
    if (!info) return 0;
    CUDA_CHECK(err, cudaGetDeviceProperties(&prop, index));
    info->index = index;
    snprintf(info->name, sizeof info->name, "%s", prop.name);
    info->cc_major = prop.major;
    info->cc_minor = prop.minor;
    info->n_sm = prop.multiProcessorCount;
    info->bus_width_bits = prop.memoryBusWidth;
    info->smem_optin = prop.sharedMemPerBlockOptin;
    info->mem_total = prop.totalGlobalMem;
    CUDA_CHECK(err, cudaDeviceGetAttribute(&v, cudaDevAttrClockRate, index));
    info->clock_khz = v;
    CUDA_CHECK(err, cudaDeviceGetAttribute(&v, cudaDevAttrMemoryClockRate, index));
    info->mem_clock_khz = v;
    CUDA_CHECK(err, cudaMemGetInfo(&fr, &tot));
    info->mem_free = fr;
    info->peak_bw_gbs = cuda_peak_bw_gbs(info->mem_clock_khz, info->bus_width_bits);
    info->peak_bf16_tflops =
        cuda_peak_bf16_tflops(info->cc_major, info->cc_minor, info->n_sm, info->clock_khz);
    return 0;
fail:
    return -1;
}

/* ---- arenas -------------------------------------------------------------------------------- */

struct cuda_arena {
    void *base;
    size_t bytes;
};

extern "C" int cuda_arena_new(const char *what, size_t bytes, cuda_arena_t **out, duet_cuda_err *err)
{
    *out = NULL;
    cuda_arena_t *a = (cuda_arena_t *)calloc(1, sizeof *a);
    if (!a) {
        duet_cuda_err_set(err, "out of host memory for the %s arena", what);
        return -1;
    }
    cudaError_t st = cudaMalloc(&a->base, bytes ? bytes : 1);
    if (st != cudaSuccess) {
        size_t fr = 0, tot = 0;
        int dev = -1;
        (void)cudaGetLastError(); /* an allocation failure is not sticky */
        if (cudaMemGetInfo(&fr, &tot) != cudaSuccess) fr = tot = 0;
        if (cudaGetDevice(&dev) != cudaSuccess) dev = -1;
        cudaDeviceProp prop;
        const char *name = dev >= 0 && cudaGetDeviceProperties(&prop, dev) == cudaSuccess ? prop.name : "?";
        duet_cuda_err_set(err, "out of GPU memory for the %s (%.0f MiB): %.0f MiB free of %.0f MiB "
                          "on cuda:%d (%s): %s", what, MIB(bytes), MIB(fr), MIB(tot), dev, name,
                          cudaGetErrorString(st));
        free(a);
        return -1;
    }
    a->bytes = bytes;
    *out = a;
    return 0;
}

extern "C" void cuda_arena_destroy(cuda_arena_t **self_p)
{
    if (!self_p || !*self_p) return;
    cuda_arena_t *a = *self_p;
    if (a->base) (void)cudaFree(a->base);
    free(a);
    *self_p = NULL;
}

extern "C" void *cuda_arena_base(const cuda_arena_t *a) { return a ? a->base : NULL; }
extern "C" size_t cuda_arena_size(const cuda_arena_t *a) { return a ? a->bytes : 0; }

/* ---- plain buffers ------------------------------------------------------------------------------ */

extern "C" int cuda_mem_alloc(void **dptr, size_t bytes, duet_cuda_err *err)
{
    *dptr = NULL;
    CUDA_CHECK(err, cudaMalloc(dptr, bytes ? bytes : 1));
    return 0;
fail:
    (void)cudaGetLastError();
    *dptr = NULL;
    return -1;
}

extern "C" void cuda_mem_free(void *dptr)
{
    if (dptr) (void)cudaFree(dptr);
}

extern "C" int cuda_mem_h2d(void *dst, const void *src, size_t bytes, duet_cuda_err *err)
{
    CUDA_CHECK(err, cudaMemcpy(dst, src, bytes, cudaMemcpyHostToDevice));
    return 0;
fail:
    return -1;
}

extern "C" int cuda_mem_d2h(void *dst, const void *src, size_t bytes, duet_cuda_err *err)
{
    CUDA_CHECK(err, cudaMemcpy(dst, src, bytes, cudaMemcpyDeviceToHost));
    return 0;
fail:
    return -1;
}

extern "C" int cuda_mem_set(void *dst, int byte, size_t bytes, duet_cuda_err *err)
{
    CUDA_CHECK(err, cudaMemset(dst, byte, bytes));
    return 0;
fail:
    return -1;
}

extern "C" int cuda_sync(duet_cuda_err *err)
{
    CUDA_CHECK(err, cudaDeviceSynchronize());
    CUDA_CHECK(err, cudaGetLastError());
    return 0;
fail:
    return -1;
}
