/* kernels/attn_avx2.c: AVX2/FMA/F16C inner loops of the paged attention kernel. Entered only
 * after cpu_use_avx2() said yes. */
#include "kernels/attn_internal.h"

#include <immintrin.h>
#include <math.h>

static inline float hsum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
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

float attn_avx2_dot_ll(const float *x, const float *y, int n)
{
    /* 64 elements a step into four 16-lane sums (each two 8-lane halves), the four summed
     * as (0+2)+(1+3), the 16 lanes as a tree; then 8-element chunks (products rounded,
     * added in order) and a fused multiply-add for each element left */
    const int np = n & ~63;
    float r = 0.0f;
    if (np) {
        __m256 a[8];
        for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
        for (int i = 0; i < np; i += 64)
            for (int j = 0; j < 8; j++)
                a[j] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * j), _mm256_loadu_ps(y + i + 8 * j), a[j]);
        for (int j = 0; j < 4; j++) a[j] = _mm256_add_ps(a[j], a[j + 4]);
        a[0] = _mm256_add_ps(a[0], a[2]);
        a[1] = _mm256_add_ps(a[1], a[3]);
        r = hsum8(_mm256_add_ps(a[0], a[1]));
    }
    int i = np;
    for (; i + 8 <= n; i += 8) {
        float p[8];
        _mm256_storeu_ps(p, _mm256_mul_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
        for (int l = 0; l < 8; l++) r += p[l];
    }
    for (; i < n; i++) r = fmaf(x[i], y[i], r);
    return r;
}

/* One key's 64-step sums folded to 8 lanes (lane l holds 16-lane sums l + l+8). */
static inline __m256 fold_ll(const float *x, const float *y, int n)
{
    __m256 a[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) a[c] = _mm256_mul_ps(_mm256_loadu_ps(x + 8 * c), _mm256_loadu_ps(y + 8 * c));
    for (int i = 64; i < n; i += 64)
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++)
            a[c] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i + 8 * c), _mm256_loadu_ps(y + i + 8 * c), a[c]);
#pragma GCC unroll 4
    for (int c = 0; c < 4; c++) a[c] = _mm256_add_ps(a[c], a[c + 4]);
    return _mm256_add_ps(_mm256_add_ps(a[0], a[2]), _mm256_add_ps(a[1], a[3]));
}

void attn_avx2_scores_ll(float *s, const float *q, const float *k, int n_keys, int n, float scale)
{
    int j = 0;
    if (n >= 64 && (n & 63) == 0) /* eight keys at a time: their lane trees side by side */
        for (; j + 8 <= n_keys; j += 8) {
            __m256 v[8], w[4];
#pragma GCC unroll 8
            for (int r = 0; r < 8; r++) v[r] = fold_ll(k + (size_t)(j + r) * n, q, n);
            /* lanes i + i+4: w[r] = [key r: 4 sums | key r+4: 4 sums] */
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                w[r] = _mm256_add_ps(_mm256_permute2f128_ps(v[r], v[r + 4], 0x20),
                                     _mm256_permute2f128_ps(v[r], v[r + 4], 0x31));
            /* lanes i + i+2, then 0 + 1 */
            const __m256 x = _mm256_add_ps(_mm256_shuffle_ps(w[0], w[1], 0x44), _mm256_shuffle_ps(w[0], w[1], 0xEE));
            const __m256 y = _mm256_add_ps(_mm256_shuffle_ps(w[2], w[3], 0x44), _mm256_shuffle_ps(w[2], w[3], 0xEE));
            const __m256 r8 = _mm256_add_ps(_mm256_shuffle_ps(x, y, 0x88), _mm256_shuffle_ps(x, y, 0xDD));
            _mm256_storeu_ps(s + j, _mm256_mul_ps(r8, _mm256_set1_ps(scale)));
        }
    for (; j < n_keys; j++) s[j] = attn_avx2_dot_ll(k + (size_t)j * n, q, n) * scale;
}

void attn_avx2_accum16(float *acc, const float *w, const float *const *v, int n_keys, int key0, int n)
{
    /* lane by lane, so a lane's accumulator stays in a register over its keys (which
     * are taken in increasing order, as the sum requires) */
    for (int l = 0; l < 16; l++) {
        const int j0 = (l - key0) & 15; /* first j with (key0 + j) % 16 == l */
        if (j0 >= n_keys) continue;
        float *a = acc + (size_t)l * n;
        int d = 0;
        for (; d + 16 <= n; d += 16) {
            __m256 x0 = _mm256_loadu_ps(a + d), x1 = _mm256_loadu_ps(a + d + 8);
            for (int j = j0; j < n_keys; j += 16) {
                const __m256 wj = _mm256_set1_ps(w[j]);
                x0 = _mm256_fmadd_ps(_mm256_loadu_ps(v[j] + d), wj, x0);
                x1 = _mm256_fmadd_ps(_mm256_loadu_ps(v[j] + d + 8), wj, x1);
            }
            _mm256_storeu_ps(a + d, x0);
            _mm256_storeu_ps(a + d + 8, x1);
        }
        for (; d < n; d++)
            for (int j = j0; j < n_keys; j += 16) a[d] = fmaf(v[j][d], w[j], a[d]);
    }
}

void attn_avx2_reduce16(float *y, float *acc, int n)
{
    int d = 0;
    for (; d + 8 <= n; d += 8) {
        __m256 t[8];
        for (int l = 0; l < 8; l++)
            t[l] = _mm256_add_ps(_mm256_loadu_ps(acc + (size_t)l * n + d), _mm256_loadu_ps(acc + (size_t)(l + 8) * n + d));
        for (int l = 0; l < 4; l++) t[l] = _mm256_add_ps(t[l], t[l + 4]);
        _mm256_storeu_ps(y + d, _mm256_add_ps(_mm256_add_ps(t[0], t[2]), _mm256_add_ps(t[1], t[3])));
    }
    for (; d < n; d++) {
        float t[8];
        for (int l = 0; l < 8; l++) t[l] = acc[(size_t)l * n + d] + acc[(size_t)(l + 8) * n + d];
        for (int l = 0; l < 4; l++) t[l] += t[l + 4];
        y[d] = (t[0] + t[2]) + (t[1] + t[3]);
    }
}
