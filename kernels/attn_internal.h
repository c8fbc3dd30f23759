/* kernels/attn_internal.h: the inner loops of kernels/attn.c, portable and AVX2 versions. */
#ifndef DUET_KERNELS_ATTN_INTERNAL_H
#define DUET_KERNELS_ATTN_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

/* s[j] = scale * attn_avx2_dot_ll(k + j*n, q, n) for j < n_keys; q: [n], k: [n_keys][n]. */
void attn_avx2_scores_ll(float *s, const float *q, const float *k, int n_keys, int n, float scale);
/* dst[i] = f16 src[i] as f32, i < cnt. */
void attn_avx2_f16(float *dst, const uint16_t *src, size_t cnt);

/* dot(x, y) over [n] in llama.cpp's f32 dot-product order (its AVX-512 build). */
float attn_avx2_dot_ll(const float *x, const float *y, int n);
/* acc[(key0 + j) % 16][0..n) += w[j] * v[j][0..n) for j < n_keys in increasing j (fused);
 * acc: [16][n], v: n_keys row pointers of [n]. */
void attn_avx2_accum16(float *acc, const float *w, const float *const *v, int n_keys, int key0, int n);
/* y[d] = the 16 acc[l][d] summed as a tree (l + l+8, then +4, +2, +1); acc: [16][n]. */
void attn_avx2_reduce16(float *y, float *acc, int n);

#endif
