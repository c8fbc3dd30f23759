/* kernels/attn_internal.h: the inner loops of kernels/attn.c, portable and AVX2 versions. */
#ifndef DUET_KERNELS_ATTN_INTERNAL_H
#define DUET_KERNELS_ATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* s[j] = scale * dot(q, k + j*n) for j < n_keys; q: [n], k: [n_keys][n]. */
void attn_avx2_scores(float *s, const float *q, const float *k, int n_keys, int n, float scale);
/* y[0..n) += sum_j w[j] * v[j][0..n) for j < n_keys. */
void attn_avx2_accum(float *y, const float *w, const float *v, int n_keys, int n);
/* dst[i] = f16 src[i] as f32, i < cnt. */
void attn_avx2_f16(float *dst, const uint16_t *src, size_t cnt);

#endif
