/* kernels/ops_avx2.c: AVX2/FMA versions of the hot element-wise ops. Entered only after
 * cpu_use_avx2() said yes. */
#include "kernels/ops_internal.h"

#include <immintrin.h>
#include <math.h>

static inline float hsum256(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 floats in the arithmetic of llama.cpp's 16-wide AVX-512 vector exp (so its
 * SiLU and softmax bits can be reproduced): n = round(x*log2 e) by the 1.5*2^23 trick,
 * b = x - n*ln2 in two fused steps, j = 1 + b + ... as a degree-5 polynomial in fused
 * steps, then j*2^n with ONE rounding (AVX-512 scalef); |n| > 192 gives 0 or inf. The
 * scaling is done as (j*2^(n>>1))*2^(n-(n>>1)): the first product is exact, the second
 * rounds once, also into the subnormal range. Maximum error about 1.5 ulp. */
static inline __m256 exp256(__m256 x)
{
    const __m256 shift = _mm256_set1_ps(0x1.8p23f);
    const __m256 z = _mm256_fmadd_ps(x, _mm256_set1_ps(0x1.715476p+0f), shift);
    const __m256 n = _mm256_sub_ps(z, shift);
    __m256 b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.62e4p-1f), x);
    b = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.7f7d1cp-20f), b);
    const __m256 u = _mm256_mul_ps(b, b);
    const __m256 hi = _mm256_fmadd_ps(_mm256_fmadd_ps(_mm256_set1_ps(0x1.0e4020p-7f), b,
                                                      _mm256_set1_ps(0x1.573e2ep-5f)),
                                      u,
                                      _mm256_fmadd_ps(_mm256_set1_ps(0x1.555e66p-3f), b,
                                                      _mm256_set1_ps(0x1.fffdb6p-2f)));
    const __m256 j = _mm256_fmadd_ps(hi, u, _mm256_fmadd_ps(_mm256_set1_ps(0x1.ffffecp-1f), b,
                                                           _mm256_set1_ps(1.0f)));
    /* n as an integer: the low bits of z (valid for |n| < 2^22; larger |n| is replaced below) */
    const __m256i ni = _mm256_sub_epi32(_mm256_castps_si256(z), _mm256_castps_si256(shift));
    const __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23));
    const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23));
    const __m256 res = _mm256_mul_ps(_mm256_mul_ps(j, p1), p2);
    const __m256 big = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), n), _mm256_set1_ps(192.0f),
                                     _CMP_GT_OQ);
    if (_mm256_testz_ps(big, big)) return res;
    const __m256 alt = _mm256_andnot_ps(_mm256_cmp_ps(n, _mm256_setzero_ps(), _CMP_LE_OQ),
                                        _mm256_set1_ps(INFINITY));
    return _mm256_blendv_ps(res, alt, big);
}

void ops_avx2_swiglu(float *y, const float *gate, const float *up, int64_t n)
{
    /* llama.cpp takes 16 elements at a time with its vector exp and the rest with expf */
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16)
        for (int h = 0; h < 16; h += 8) {
            __m256 g = _mm256_loadu_ps(gate + i + h);
            __m256 e = exp256(_mm256_sub_ps(_mm256_setzero_ps(), g));
            __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, e));
            _mm256_storeu_ps(y + i + h, _mm256_mul_ps(s, _mm256_loadu_ps(up + i + h)));
        }
    for (; i < n; i++) y[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

void ops_avx2_softmax(float *x, int64_t n)
{
    /* the arithmetic of ops_softmax: max (exact in any order), e^(x - max) 16 at a time
     * with each 16-sum reduced in float as a tree (lane i + lane i+8, then i+4, i+2, i+1)
     * and accumulated in double, expf for the last n % 16, then x * (float)(1 / sum) */
    int64_t i = 0;
    __m256 vm = _mm256_set1_ps(x[0]);
    for (; i + 8 <= n; i += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(x + i));
    float mx;
    {
        float t[8];
        _mm256_storeu_ps(t, vm);
        mx = t[0];
        for (int l = 1; l < 8; l++)
            if (t[l] > mx) mx = t[l];
        for (; i < n; i++)
            if (x[i] > mx) mx = x[i];
    }
    double sum = 0.0;
    const __m256 m = _mm256_set1_ps(mx);
    for (i = 0; i + 16 <= n; i += 16) {
        __m256 lo = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i), m));
        __m256 hi = exp256(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), m));
        _mm256_storeu_ps(x + i, lo);
        _mm256_storeu_ps(x + i + 8, hi);
        sum += (double)hsum256(_mm256_add_ps(lo, hi));
    }
    for (; i < n; i++) {
        x[i] = expf(x[i] - mx);
        sum += (double)x[i];
    }
    const float inv = (float)(1.0 / sum);
    const __m256 vi = _mm256_set1_ps(inv);
    for (i = 0; i + 8 <= n; i += 8) _mm256_storeu_ps(x + i, _mm256_mul_ps(_mm256_loadu_ps(x + i), vi));
    for (; i < n; i++) x[i] *= inv;
}
