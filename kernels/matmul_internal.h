/* kernels/matmul_internal.h: what matmul.c shares with its SIMD files (not public). */
#ifndef DUET_KERNELS_MATMUL_INTERNAL_H
#define DUET_KERNELS_MATMUL_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/dtype.h"

/* One token's activations in every form a kernel may want (fields unused by the call's
 * weight types are NULL). A32: blocks of 32 int8 with d and s = d * sum(q), both rounded
 * to f16 as GGUF's Q8_1 stores them (for Q4_0, Q4_1, Q8_0); AK: super-blocks of 256 int8
 * with d and sums of 16 (Q4_K, Q6_K). The arithmetic follows llama.cpp's Q8_1 and Q8_K
 * activation quantizers (scale 127/amax, round half to even, f16 d and s), so the
 * products should agree with its own up to float summation order. */
typedef struct {
    const float *f;         /* [n_in] f32 (F32/F16/BF16 weights) */
    const int8_t *q32;      /* A32 quants [n_in] */
    const float *ds;        /* A32 [n_in/32][2]: d, s */
    const float *s;         /* A32 [n_in/32]: s again, contiguous */
    const int8_t *qk;       /* AK quants [n_in] */
    const float *dk;        /* AK [n_in/256] */
    const int16_t *bsums;   /* AK [n_in/16] */
} mm_act;

/* Rows [0, nr) of w (row_bytes apart) times tokens [0, nt) of a:
 * y[t * ldy + r] = (add ? y[t * ldy + r] : 0) + dot(row r, token t). */
typedef void (*mm_kern_fn)(const uint8_t *w, size_t row_bytes, int nr, const mm_act *a,
                           int nt, int64_t n_in, float *y, int64_t ldy, int add);

/* Quantize x[n] to A32 (n % 32 == 0) / AK (n % 256 == 0). */
typedef void (*mm_quant_a32_fn)(const float *x, int64_t n, int8_t *q, float *ds, float *s);
typedef void (*mm_quant_ak_fn)(const float *x, int64_t n, int8_t *q, float *d, int16_t *bsums);

typedef struct {
    mm_kern_fn kern[32];         /* by dtype_t (NULL: unsupported) */
    mm_quant_a32_fn quant_a32;
    mm_quant_ak_fn quant_ak;
} mm_impl;

/* The portable and AVX2 implementations; the AVX2 table is NULL when not compiled in. */
const mm_impl *mm_impl_portable(void);
const mm_impl *mm_impl_avx2(void);
const mm_impl *mm_impl_vnni(void);

#endif
