/* kernels/cuda_dequant.cuh: GGUF weight types on the device, 32 elements at a time.
 *
 * deq32(t, row, col, y, m) writes elements [col, col + 32) of one row (col a multiple of
 * 32; for F32/F16/BF16 rows whose length is not, the caller clamps to n) as f32, with
 * exactly kernels/dtype.c's arithmetic: every product and sum rounded separately (the
 * __f*_rn intrinsics keep nvcc from fusing them into FMAs), so the values equal
 * dtype_to_f32's bit for bit. With split_min (Q4_1 only) the block minimum is left out
 * and returned in *m instead (the exact mode multiplies it separately).
 */
#ifndef DUET_KERNELS_CUDA_DEQUANT_CUH
#define DUET_KERNELS_CUDA_DEQUANT_CUH

#include "kernels/cuda_common.cuh"
#include "kernels/dtype.h"

/* kernels/quant.h is C11 (_Static_assert); in C++ the same check is static_assert. */
#define _Static_assert static_assert
#include "kernels/quant.h"
#undef _Static_assert

__device__ __forceinline__ uint16_t ld_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }

/* Q4_K sub-block j's 6-bit scale and minimum (quant_k4_scale_min on the device). */
__device__ __forceinline__ void k4_scale_min(const uint8_t *sc, int j, int *s, int *m)
{
    if (j < 4) {
        *s = sc[j] & 63;
        *m = sc[j + 4] & 63;
    } else {
        *s = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4);
        *m = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
    }
}

/* Elements [col, col + cnt) (cnt <= 32; 32 for block types) of a row of type t. */
__device__ __forceinline__ void deq32(dtype_t t, const uint8_t *row, int64_t col, int cnt,
                                      float *y, bool split_min, float *m)
{
    switch (t) {
    case DTYPE_F32: {
        const float *r = (const float *)row + col;
        for (int j = 0; j < cnt; j++) y[j] = r[j];
        break;
    }
    case DTYPE_F16: {
        const uint16_t *r = (const uint16_t *)row + col;
        for (int j = 0; j < cnt; j++) y[j] = h2f_bits(r[j]);
        break;
    }
    case DTYPE_BF16: {
        const uint16_t *r = (const uint16_t *)row + col;
        for (int j = 0; j < cnt; j++) y[j] = bf2f_bits(r[j]);
        break;
    }
    case DTYPE_Q4_0: {
        const uint8_t *b = row + (col / QK32) * sizeof(blk_q4_0);
        const float d = h2f_bits(ld_u16(b));
        const uint8_t *qs = b + 2;
        for (int j = 0; j < 16; j++) {
            y[j] = __fmul_rn(d, (float)((qs[j] & 0xF) - 8));
            y[j + 16] = __fmul_rn(d, (float)((qs[j] >> 4) - 8));
        }
        break;
    }
    case DTYPE_Q4_1: {
        const uint8_t *b = row + (col / QK32) * sizeof(blk_q4_1);
        const float d = h2f_bits(ld_u16(b)), mn = h2f_bits(ld_u16(b + 2));
        const uint8_t *qs = b + 4;
        if (split_min) {
            *m = mn;
            for (int j = 0; j < 16; j++) {
                y[j] = __fmul_rn(d, (float)(qs[j] & 0xF));
                y[j + 16] = __fmul_rn(d, (float)(qs[j] >> 4));
            }
        } else {
            for (int j = 0; j < 16; j++) {
                y[j] = __fadd_rn(__fmul_rn(d, (float)(qs[j] & 0xF)), mn);
                y[j + 16] = __fadd_rn(__fmul_rn(d, (float)(qs[j] >> 4)), mn);
            }
        }
        break;
    }
    case DTYPE_Q8_0: {
        const uint8_t *b = row + (col / QK32) * sizeof(blk_q8_0);
        const float d = h2f_bits(ld_u16(b));
        const int8_t *qs = (const int8_t *)(b + 2);
        for (int j = 0; j < 32; j++) y[j] = __fmul_rn(d, (float)qs[j]);
        break;
    }
    case DTYPE_Q4_K: {
        const uint8_t *b = row + (col / QK_K) * sizeof(blk_q4_k);
        const int sub = (int)((col % QK_K) / 32), c = sub / 2;
        const float d = h2f_bits(ld_u16(b)), dmin = h2f_bits(ld_u16(b + 2));
        int sc, mn;
        k4_scale_min(b + 4, sub, &sc, &mn);
        const float dd = __fmul_rn(d, (float)sc), oo = __fmul_rn(dmin, (float)mn);
        const uint8_t *q = b + 16 + 32 * c;
        if (sub % 2 == 0)
            for (int l = 0; l < 32; l++) y[l] = __fsub_rn(__fmul_rn(dd, (float)(q[l] & 0xF)), oo);
        else
            for (int l = 0; l < 32; l++) y[l] = __fsub_rn(__fmul_rn(dd, (float)(q[l] >> 4)), oo);
        break;
    }
    case DTYPE_Q6_K: {
        const uint8_t *b = row + (col / QK_K) * sizeof(blk_q6_k);
        const uint8_t *ql = b, *qh = b + QK_K / 2;
        const int8_t *scales = (const int8_t *)(b + QK_K / 2 + QK_K / 4);
        const float d = h2f_bits(ld_u16(b + QK_K / 2 + QK_K / 4 + QK_K / 16));
        const int e0 = (int)(col % QK_K);
        for (int j = 0; j < 32; j++) {
            const int e = e0 + j, h = e / 128, r = e % 128, k = r / 32, l = r % 32;
            int lo = ql[64 * h + 32 * (k & 1) + l];
            lo = (k & 2) ? (lo >> 4) : (lo & 0xF);
            const int hi = (qh[32 * h + l] >> (2 * k)) & 3;
            const int q = (lo | (hi << 4)) - 32;
            y[j] = __fmul_rn(__fmul_rn(d, (float)scales[e / 16]), (float)q);
        }
        break;
    }
    default:
        for (int j = 0; j < cnt; j++) y[j] = 0.0f;
        break;
    }
}

/* 1 for the weight types deq32 reads. */
static inline bool deq_supported(dtype_t t)
{
    switch (t) {
    case DTYPE_F32: case DTYPE_F16: case DTYPE_BF16: case DTYPE_Q4_0: case DTYPE_Q4_1:
    case DTYPE_Q8_0: case DTYPE_Q4_K: case DTYPE_Q6_K:
        return true;
    default:
        return false;
    }
}

#endif
