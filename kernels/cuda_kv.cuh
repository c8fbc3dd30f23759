/* kernels/cuda_kv.cuh: KV cache element types on the device (f32, f16, bf16, fp8 e4m3).
 *
 * kv_store<E>(v) rounds an f32 to the element type (nearest even; fp8 saturates to
 * +-448), kv_load<E>(e) widens it back; load8<E> reads 8 consecutive elements (16-byte
 * aligned for 2-byte types) into f32. FP8 rows carry one f32 scale each (value = e *
 * scale); the callers apply it.
 */
#ifndef DUET_KERNELS_CUDA_KV_CUH
#define DUET_KERNELS_CUDA_KV_CUH

#include "kernels/cuda_common.cuh"

template <typename E> __device__ __forceinline__ E kv_store(float v);
template <> __device__ __forceinline__ float kv_store<float>(float v) { return v; }
template <> __device__ __forceinline__ __half kv_store<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 kv_store<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __nv_fp8_e4m3 kv_store<__nv_fp8_e4m3>(float v)
{
    return __nv_fp8_e4m3(v); /* round to nearest even, saturating to the finite range */
}

template <typename E> __device__ __forceinline__ float kv_load(E e) { return (float)e; }
template <> __device__ __forceinline__ float kv_load<__half>(__half e) { return __half2float(e); }
template <> __device__ __forceinline__ float kv_load<__nv_bfloat16>(__nv_bfloat16 e)
{
    return __bfloat162float(e);
}

/* 8 consecutive elements from p (aligned to 8 elements) as f32. */
template <typename E> __device__ __forceinline__ void load8(const E *p, float *o);
template <> __device__ __forceinline__ void load8<float>(const float *p, float *o)
{
    const float4 a = *(const float4 *)p, b = *(const float4 *)(p + 4);
    o[0] = a.x; o[1] = a.y; o[2] = a.z; o[3] = a.w;
    o[4] = b.x; o[5] = b.y; o[6] = b.z; o[7] = b.w;
}
template <> __device__ __forceinline__ void load8<__half>(const __half *p, float *o)
{
    const uint4 u = *(const uint4 *)p;
    const __half2 *h = (const __half2 *)&u;
    for (int i = 0; i < 4; i++) {
        const float2 f = __half22float2(h[i]);
        o[2 * i] = f.x;
        o[2 * i + 1] = f.y;
    }
}
template <> __device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16 *p, float *o)
{
    const uint4 u = *(const uint4 *)p;
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
    for (int i = 0; i < 4; i++) {
        o[2 * i] = __uint_as_float(w[i] << 16);
        o[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void load8<__nv_fp8_e4m3>(const __nv_fp8_e4m3 *p, float *o)
{
    const uint2 u = *(const uint2 *)p;
    const uint32_t w[2] = {u.x, u.y};
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < 2; j++) {
            const __half2_raw hr = __nv_cvt_fp8x2_to_halfraw2(
                (__nv_fp8x2_storage_t)((w[i] >> (16 * j)) & 0xffffu), __NV_E4M3);
            const float2 f = __half22float2(__half2(hr));
            o[4 * i + 2 * j] = f.x;
            o[4 * i + 2 * j + 1] = f.y;
        }
}

/* The largest finite e4m3 value: an FP8 row's scale is amax / FP8_MAX. */
#define FP8_MAX 448.0f

#endif
