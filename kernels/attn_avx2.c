/* kernels/attn_avx2.c: AVX2/FMA/F16C inner loops of the paged attention kernel. Entered only
 * after cpu_use_avx2() said yes. */
#include "kernels/attn_internal.h"

#include <immintrin.h>

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

void attn_avx2_scores(float *s, const float *q, const float *k, int n_keys, int n, float scale)
{
    int j = 0;
    /* four keys at a time share the loads of q */
    for (; j + 4 <= n_keys; j += 4) {
        const float *k0 = k + (size_t)j * n;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        int i = 0;
        for (; i + 8 <= n; i += 8) {
            __m256 qv = _mm256_loadu_ps(q + i);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + i), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + n + i), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 2 * n + i), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + 3 * n + i), a3);
        }
        float r0 = hsum8(a0), r1 = hsum8(a1), r2 = hsum8(a2), r3 = hsum8(a3);
        for (; i < n; i++) {
            r0 += q[i] * k0[i];
            r1 += q[i] * k0[n + i];
            r2 += q[i] * k0[2 * n + i];
            r3 += q[i] * k0[3 * n + i];
        }
        s[j] = r0 * scale;
        s[j + 1] = r1 * scale;
        s[j + 2] = r2 * scale;
        s[j + 3] = r3 * scale;
    }
    for (; j < n_keys; j++) {
        const float *kj = k + (size_t)j * n;
        __m256 a = _mm256_setzero_ps();
        int i = 0;
        for (; i + 8 <= n; i += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(kj + i), a);
        float r = hsum8(a);
        for (; i < n; i++) r += q[i] * kj[i];
        s[j] = r * scale;
    }
}

void attn_avx2_accum(float *y, const float *w, const float *v, int n_keys, int n)
{
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 acc = _mm256_loadu_ps(y + i);
        for (int j = 0; j < n_keys; j++)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(w[j]), _mm256_loadu_ps(v + (size_t)j * n + i), acc);
        _mm256_storeu_ps(y + i, acc);
    }
    for (; i < n; i++) {
        float acc = y[i];
        for (int j = 0; j < n_keys; j++) acc += w[j] * v[(size_t)j * n + i];
        y[i] = acc;
    }
}

void attn_avx2_f16(float *dst, const uint16_t *src, size_t cnt)
{
    size_t i = 0;
    for (; i + 8 <= cnt; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
    for (; i < cnt; i++) {
        __m128 f = _mm_cvtph_ps(_mm_cvtsi32_si128(src[i]));
        dst[i] = _mm_cvtss_f32(f);
    }
}
