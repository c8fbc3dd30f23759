/* kernels/cuda_util.cu: small element-wise helpers: add, row gather, fills. */
#include "kernels/cuda_kv.cuh"

__global__ void add_kernel(float *y, const float *x, size_t n)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        y[i] += x[i];
}

extern "C" int cuda_op_add(float *y, const float *x, size_t n, cuda_stream s, duet_cuda_err *err)
{
    ARG_CHECK(err, y && x, "cuda_op_add: NULL buffer");
    if (n == 0) return 0;
    add_kernel<<<duet_grid((int64_t)n, 256, 4096), 256, 0, duet_stream(s)>>>(y, x, n);
    LAUNCH_CHECK(err, "add_kernel");
    return 0;
fail:
    return -1;
}

__global__ void gather_kernel(float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *idx, int64_t n)
{
    const float *s = src + (int64_t)idx[blockIdx.x] * lds;
    float *d = dst + (int64_t)blockIdx.x * ldd;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) d[i] = s[i];
}

extern "C" int cuda_op_gather_rows(float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *idx,
                                   int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err)
{
    ARG_CHECK(err, dst && src && idx && n_rows >= 0 && n > 0 && ldd >= n && lds >= n,
              "cuda_op_gather_rows: bad arguments (%d rows of %lld)", n_rows, (long long)n);
    if (n_rows == 0) return 0;
    gather_kernel<<<n_rows, 256, 0, duet_stream(s)>>>(dst, ldd, src, lds, idx, n);
    LAUNCH_CHECK(err, "gather_kernel");
    return 0;
fail:
    return -1;
}

/* splitmix64 of (seed, index): independent of the launch shape. */
__device__ __forceinline__ float hash_uniform(uint64_t seed, uint64_t i)
{
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f); /* [0, 1) */
}

template <typename E>
__global__ void fill_random_kernel(E *dst, size_t n, float amp, uint64_t seed)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = kv_store<E>((2.0f * hash_uniform(seed, i) - 1.0f) * amp);
}

extern "C" int cuda_op_fill_random(void *dst, cuda_kv_type t, size_t n, float amp, uint64_t seed,
                                   cuda_stream s, duet_cuda_err *err)
{
    const unsigned grid = duet_grid((int64_t)n, 256, 8192);
    ARG_CHECK(err, dst != NULL, "cuda_op_fill_random: NULL buffer");
    if (n == 0) return 0;
    switch (t) {
    case CUDA_KV_F32: fill_random_kernel<float><<<grid, 256, 0, duet_stream(s)>>>((float *)dst, n, amp, seed); break;
    case CUDA_KV_F16: fill_random_kernel<__half><<<grid, 256, 0, duet_stream(s)>>>((__half *)dst, n, amp, seed); break;
    case CUDA_KV_BF16:
        fill_random_kernel<__nv_bfloat16><<<grid, 256, 0, duet_stream(s)>>>((__nv_bfloat16 *)dst, n, amp, seed);
        break;
    case CUDA_KV_FP8:
        fill_random_kernel<__nv_fp8_e4m3><<<grid, 256, 0, duet_stream(s)>>>((__nv_fp8_e4m3 *)dst, n, amp, seed);
        break;
    default: ARG_CHECK(err, 0, "cuda_op_fill_random: unknown element type %d", (int)t);
    }
    LAUNCH_CHECK(err, "fill_random_kernel");
    return 0;
fail:
    return -1;
}

__global__ void fill_f32_kernel(float *dst, size_t n, float v)
{
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x)
        dst[i] = v;
}

extern "C" int cuda_op_fill_f32(float *dst, size_t n, float v, cuda_stream s, duet_cuda_err *err)
{
    ARG_CHECK(err, dst != NULL, "cuda_op_fill_f32: NULL buffer");
    if (n == 0) return 0;
    fill_f32_kernel<<<duet_grid((int64_t)n, 256, 8192), 256, 0, duet_stream(s)>>>(dst, n, v);
    LAUNCH_CHECK(err, "fill_f32_kernel");
    return 0;
fail:
    return -1;
}
