/* kernels/matmul_avx2.c: AVX2/FMA/F16C matmul kernels and activation quantizers.
 *
 * Entered only after cpu_use_avx2() said yes. The integer products use maddubs (unsigned
 * weight nibbles times signed int8 activations, pairs summed in int16, no overflow for
 * these ranges) and madd (to int32, optionally times the K-quant sub-block scales).
 * Two shapes per type: up to 4 rows times 1 token (decode: every weight byte is used
 * once) and tiles of rows times 4 tokens (prefill: unpacked weights are reused 4 times).
 * Both shapes do the same float operations in the same order for every (row, token), so
 * a token's outputs are bit-identical whatever the batch around it (the scheduler's
 * fidelity relies on it; tests/test_matmul.c checks it).
 */
#include "kernels/matmul_internal.h"

#ifndef MM_IMPL_NAME
#define MM_IMPL_NAME mm_impl_avx2
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)

#include <immintrin.h>
#include <string.h>

#include "kernels/quant.h"

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum_ps(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

INLINE int hsum_epi32(__m256i v)
{
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

INLINE float f16(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

INLINE __m256 f16_bcast(const uint8_t *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return _mm256_cvtph_ps(_mm_set1_epi16((short)h));
}

/* 16 bytes of nibbles -> 32 bytes: low nibbles in the low half, high nibbles in the high. */
INLINE __m256i nib32(const uint8_t *qs)
{
    __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)qs));
    v = _mm256_srlv_epi32(v, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* Sum of u8 x s8 products, in 8 int32 lanes. */
INLINE __m256i dot_us(__m256i u, __m256i s)
{
#ifdef MM_VNNI
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

INLINE __m256i loadu(const void *p) { return _mm256_loadu_si256((const __m256i *)p); }

INLINE void put(float *y, int add, float v) { *y = add ? *y + v : v; }

/* Decode streams weights from memory once; the hardware prefetcher alone does not run
 * far enough ahead, so the one-token kernels prefetch (into L2) this far ahead of the
 * byte they read. Measured on the 2-core EPYC, SmolLM2 step on one thread: no prefetch
 * 8.9 ms, 4 KiB to L1 6.2 ms, 8 KiB to L2 5.0-5.5 ms. */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 8192
#endif
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif

INLINE void prefetch(const void *p) { _mm_prefetch((const char *)p + PREFETCH_BYTES, PREFETCH_HINT); }

/* ---- A32 types (Q4_0, Q4_1, Q8_0) ------------------------------------------------------- */

enum { T_Q4_0, T_Q4_1, T_Q8_0 };

#define BS_OF(T) ((T) == T_Q4_0 ? sizeof(blk_q4_0) : (T) == T_Q4_1 ? sizeof(blk_q4_1) : sizeof(blk_q8_0))

/* Integer block product of block blk (type T) with activation quants xq. Q4_0 is
 * recentred to -8..7 and multiplied signed, as Q8_0 is, so no offset term is needed. */
INLINE __m256i a32_dot(const uint8_t *blk, __m256i xq, const int T)
{
    if (T == T_Q4_1) return dot_us(nib32(blk + 4), xq);
    __m256i w = T == T_Q4_0 ? _mm256_sub_epi8(nib32(blk + 2), _mm256_set1_epi8(8)) : loadu(blk + 2);
    return dot_us(_mm256_sign_epi8(w, w), _mm256_sign_epi8(xq, w));
}

/* R rows times one token. The block header converts to [d, m] (Q4_1) or [d, d] (Q4_0,
 * Q8_0); times [dx, sx] it gives both the scale of the integer sum and the offset term. */
INLINE void a32_rows_1(const uint8_t *w, size_t rb, const int R, const mm_act *a,
                       int64_t nb, float *y, int add, const int T)
{
    const size_t bs = BS_OF(T);
    __m256 acc[4];
    __m128 macc[4];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        acc[r] = _mm256_setzero_ps();
        macc[r] = _mm_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256i xq = loadu(a->q32 + 32 * b);
        __m128 dsx = _mm_castpd_ps(_mm_load_sd((const double *)(a->ds + 2 * b)));
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + (size_t)r * rb + (size_t)b * bs;
            prefetch(blk);
            __m128 dm;
            if (T == T_Q4_1) {
                uint32_t h;
                memcpy(&h, blk, 4);
                dm = _mm_cvtph_ps(_mm_cvtsi32_si128((int)h));
            } else {
                uint16_t h;
                memcpy(&h, blk, 2);
                dm = _mm_cvtph_ps(_mm_set1_epi16((short)h));
            }
            __m128 prod = _mm_mul_ps(dm, dsx);
            if (T == T_Q4_1) macc[r] = _mm_add_ps(macc[r], prod);
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a32_dot(blk, xq, T)),
                                     _mm256_broadcastss_ps(prod), acc[r]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        float v = hsum_ps(acc[r]);
        float m = _mm_cvtss_f32(_mm_movehdup_ps(macc[r]));
        if (T == T_Q4_1) v += m;
        put(&y[r], add, v);
    }
}

/* R rows times 4 tokens. dsx4[b][8] holds (dx, sx) of the 4 tokens for block b; Q4_1's
 * offset terms m * sx are accumulated lane-wise from it. Every (row, token) result is
 * computed with exactly the float operations, in the same order, of a32_rows_1, so a
 * token's output does not depend on the batch around it. */
INLINE void a32_tile_4(const uint8_t *w, size_t rb, const int R, const mm_act *a, const float *dsx4,
                       int64_t nb, float *y, int64_t ldy, int add, const int T)
{
    const size_t bs = BS_OF(T);
    __m256 acc[2][4], macc[2];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        macc[r] = _mm256_setzero_ps();
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++) acc[r][t] = _mm256_setzero_ps();
    }
    for (int64_t b = 0; b < nb; b++) {
        __m256i wv[2];
        __m256 dv[2];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            const uint8_t *blk = w + (size_t)r * rb + (size_t)b * bs;
            dv[r] = f16_bcast(blk);
            if (T == T_Q8_0) wv[r] = loadu(blk + 2);
            else if (T == T_Q4_0) wv[r] = _mm256_sub_epi8(nib32(blk + 2), _mm256_set1_epi8(8));
            else {
                uint32_t h;
                memcpy(&h, blk, 4);
                __m256 dm = _mm256_cvtph_ps(_mm_set1_epi32((int)h)); /* d, m, d, m, ... */
                macc[r] = _mm256_add_ps(macc[r], _mm256_mul_ps(dm, _mm256_loadu_ps(dsx4 + 8 * b)));
                wv[r] = nib32(blk + 4);
            }
        }
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++) {
            __m256i xq = loadu(a[t].q32 + 32 * b);
            __m256 dx = _mm256_broadcast_ss(a[t].ds + 2 * b);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) {
                __m256i p = T != T_Q4_1 ? dot_us(_mm256_sign_epi8(wv[r], wv[r]), _mm256_sign_epi8(xq, wv[r]))
                                        : dot_us(wv[r], xq);
                acc[r][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_mul_ps(dv[r], dx), acc[r][t]);
            }
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        float m[8];
        _mm256_storeu_ps(m, macc[r]);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++) {
            float v = hsum_ps(acc[r][t]);
            if (T == T_Q4_1) v += m[2 * t + 1];
            put(&y[t * ldy + r], add, v);
        }
    }
}

/* Largest nb for which a 4-token (dx, sx) table lives on the stack. */
#define DSX_MAX_NB 1024

INLINE void a32_kern(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                     float *y, int64_t ldy, int add, const int T)
{
    int64_t nb = n_in / QK32;
    int t = 0;
    if (nt >= 4 && nb <= DSX_MAX_NB) {
        float dsx4[8 * DSX_MAX_NB];
        for (; t + 4 <= nt; t += 4) {
            if (T == T_Q4_1)
                for (int64_t b = 0; b < nb; b++)
                    for (int k = 0; k < 4; k++) {
                        dsx4[8 * b + 2 * k] = a[t + k].ds[2 * b];
                        dsx4[8 * b + 2 * k + 1] = a[t + k].ds[2 * b + 1];
                    }
            int r = 0;
            for (; r + 2 <= nr; r += 2)
                a32_tile_4(w + (size_t)r * rb, rb, 2, a + t, dsx4, nb, y + t * ldy + r, ldy, add, T);
            if (r < nr) a32_tile_4(w + (size_t)r * rb, rb, 1, a + t, dsx4, nb, y + t * ldy + r, ldy, add, T);
        }
    }
    for (; t < nt; t++) {
        int r = 0;
        for (; r + 4 <= nr; r += 4) a32_rows_1(w + (size_t)r * rb, rb, 4, &a[t], nb, y + t * ldy + r, add, T);
        for (; r < nr; r++) a32_rows_1(w + (size_t)r * rb, rb, 1, &a[t], nb, y + t * ldy + r, add, T);
    }
}

static void kern_q4_0(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                      float *y, int64_t ldy, int add)
{
    a32_kern(w, rb, nr, a, nt, n_in, y, ldy, add, T_Q4_0);
}

static void kern_q4_1(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                      float *y, int64_t ldy, int add)
{
    a32_kern(w, rb, nr, a, nt, n_in, y, ldy, add, T_Q4_1);
}

static void kern_q8_0(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                      float *y, int64_t ldy, int add)
{
    a32_kern(w, rb, nr, a, nt, n_in, y, ldy, add, T_Q8_0);
}

/* ---- K-quants (Q4_K, Q6_K) ------------------------------------------------------------- */

/* Word j of each 128-bit lane, broadcast across the lane. */
INLINE __m256i word_bcast(__m256i v, int j)
{
    return _mm256_shuffle_epi8(v, _mm256_set1_epi16((short)(((2 * j + 1) << 8) | (2 * j))));
}

/* Q4_K super-block: 8 scales as int16 in both lanes, and sum_j mn_j * (bsum pairs) */
INLINE __m256i q4k_scales(const blk_q4_k *b, __m128i *mins16)
{
    uint32_t u[3];
    memcpy(u, b->scales, 12);
    uint32_t sc_lo = u[0] & 0x3f3f3f3fu, mn_lo = u[1] & 0x3f3f3f3fu;
    uint32_t sc_hi = (u[2] & 0x0f0f0f0fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    uint32_t mn_hi = ((u[2] >> 4) & 0x0f0f0f0fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    *mins16 = _mm_cvtepu8_epi16(_mm_setr_epi32((int)mn_lo, (int)mn_hi, 0, 0));
    return _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(_mm_setr_epi32((int)sc_lo, (int)sc_hi, 0, 0)));
}

/* sum_j mn_j * (bs[2j] + bs[2j+1]) as 4 int32 lanes. */
INLINE __m128i q4k_min_term(__m128i mins16, const int16_t *bs)
{
    __m128i b0 = _mm_loadu_si128((const __m128i *)bs), b1 = _mm_loadu_si128((const __m128i *)(bs + 8));
    return _mm_madd_epi16(_mm_hadd_epi16(b0, b1), mins16);
}

INLINE void q4k_rows_1(const uint8_t *w, size_t rb, const int R, const mm_act *a, int64_t nsb,
                       float *y, int add)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        const blk_q4_k *blk = (const blk_q4_k *)(w + (size_t)r * rb);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < nsb; i++) {
            const blk_q4_k *b = blk + i;
            const int8_t *x = a->qk + i * QK_K;
            for (int l = 0; l < 3; l++) prefetch((const uint8_t *)b + 64 * l);
            __m128i mins16;
            __m256i sc = q4k_scales(b, &mins16);
            __m256i sumi = _mm256_setzero_si256();
            _Pragma("GCC unroll 8")
            for (int c = 0; c < 4; c++) {
                __m256i q = loadu(b->qs + 32 * c);
                __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, loadu(x + 64 * c)), word_bcast(sc, 2 * c));
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, loadu(x + 64 * c + 32)), word_bcast(sc, 2 * c + 1));
                sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p0, p1));
            }
            /* the same operations as q4k_tile_4 (batch invariance) */
            float dx = a->dk[i], d = f16((const uint8_t *)&b->d), dmin = f16((const uint8_t *)&b->dmin);
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(d * dx), acc);
            __m128i mt = q4k_min_term(mins16, a->bsums + i * 16);
            acc = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_zextsi128_si256(mt)), _mm256_set1_ps(dmin * dx), acc);
        }
        put(&y[r], add, hsum_ps(acc));
    }
}

/* One row times 4 tokens. */
INLINE void q4k_tile_4(const uint8_t *w, const mm_act *a, int64_t nsb, float *y, int64_t ldy, int add)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const blk_q4_k *blk = (const blk_q4_k *)w;
    __m256 acc[4];
    _Pragma("GCC unroll 8")
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nsb; i++) {
        const blk_q4_k *b = blk + i;
        __m128i mins16;
        __m256i sc = q4k_scales(b, &mins16);
        __m256i sumi[4];
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++) sumi[t] = _mm256_setzero_si256();
        _Pragma("GCC unroll 8")
        for (int c = 0; c < 4; c++) {
            __m256i q = loadu(b->qs + 32 * c);
            __m256i lo = _mm256_and_si256(q, m4), hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            __m256i s0 = word_bcast(sc, 2 * c), s1 = word_bcast(sc, 2 * c + 1);
            _Pragma("GCC unroll 8")
            for (int t = 0; t < 4; t++) {
                const int8_t *x = a[t].qk + i * QK_K + 64 * c;
                __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(lo, loadu(x)), s0);
                __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(hi, loadu(x + 32)), s1);
                sumi[t] = _mm256_add_epi32(sumi[t], _mm256_add_epi32(p0, p1));
            }
        }
        float d = f16((const uint8_t *)&b->d), dmin = f16((const uint8_t *)&b->dmin);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++) {
            float dx = a[t].dk[i];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(d * dx), acc[t]);
            __m128i mt = q4k_min_term(mins16, a[t].bsums + i * 16);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(_mm256_zextsi128_si256(mt)),
                                      _mm256_set1_ps(dmin * dx), acc[t]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int t = 0; t < 4; t++) put(&y[t * ldy], add, hsum_ps(acc[t]));
}

static void kern_q4_k(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                      float *y, int64_t ldy, int add)
{
    int64_t nsb = n_in / QK_K;
    int t = 0;
    for (; t + 4 <= nt; t += 4)
        for (int r = 0; r < nr; r++) q4k_tile_4(w + (size_t)r * rb, a + t, nsb, y + t * ldy + r, ldy, add);
    for (; t < nt; t++) {
        int r = 0;
        for (; r + 4 <= nr; r += 4) q4k_rows_1(w + (size_t)r * rb, rb, 4, &a[t], nsb, y + t * ldy + r, add);
        for (; r < nr; r++) q4k_rows_1(w + (size_t)r * rb, rb, 1, &a[t], nsb, y + t * ldy + r, add);
    }
}

/* Q6_K: the k-th 32-byte vector (k = 0..3) of half h of 6-bit values (0..63). */
INLINE __m256i q6k_vec(__m256i ql0, __m256i ql1, __m256i qh, int k)
{
    const __m256i m4 = _mm256_set1_epi8(0x0F), m30 = _mm256_set1_epi8(0x30);
    switch (k) {
    case 0: return _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 4), m30));
    case 1: return _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
    case 2: return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
    default: return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                                     _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
    }
}

/* Scales with the even ones in the low lane and the odd ones in the high lane (int16). */
INLINE __m256i q6k_scales(const blk_q6_k *b, __m256i *natural)
{
    __m128i s = _mm_loadu_si128((const __m128i *)b->scales);
    *natural = _mm256_cvtepi8_epi16(s);
    __m128i eo = _mm_shuffle_epi8(s, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
    return _mm256_cvtepi8_epi16(eo);
}

INLINE void q6k_rows_1(const uint8_t *w, size_t rb, const int R, const mm_act *a, int64_t nsb,
                       float *y, int add)
{
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++) {
        const blk_q6_k *blk = (const blk_q6_k *)(w + (size_t)r * rb);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < nsb; i++) {
            const blk_q6_k *b = blk + i;
            const int8_t *x = a->qk + i * QK_K;
            for (int l = 0; l < 4; l++) prefetch((const uint8_t *)b + 64 * l);
            __m256i nat, sc = q6k_scales(b, &nat);
            __m256i sumi = _mm256_slli_epi32(_mm256_madd_epi16(nat, loadu(a->bsums + i * 16)), 5);
            sumi = _mm256_sub_epi32(_mm256_setzero_si256(), sumi);
            _Pragma("GCC unroll 8")
            for (int h = 0; h < 2; h++) {
                __m256i ql0 = loadu(b->ql + 64 * h), ql1 = loadu(b->ql + 64 * h + 32), qh = loadu(b->qh + 32 * h);
                _Pragma("GCC unroll 8")
                for (int k = 0; k < 4; k++) {
                    __m256i q = q6k_vec(ql0, ql1, qh, k);
                    __m256i p = _mm256_maddubs_epi16(q, loadu(x + 128 * h + 32 * k));
                    sumi = _mm256_add_epi32(sumi, _mm256_madd_epi16(p, word_bcast(sc, 4 * h + k)));
                }
            }
            acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi), _mm256_set1_ps(f16((const uint8_t *)&b->d) * a->dk[i]), acc);
        }
        put(&y[r], add, hsum_ps(acc));
    }
}

INLINE void q6k_tile_4(const uint8_t *w, const mm_act *a, int64_t nsb, float *y, int64_t ldy, int add)
{
    const blk_q6_k *blk = (const blk_q6_k *)w;
    __m256 acc[4];
    _Pragma("GCC unroll 8")
    for (int t = 0; t < 4; t++) acc[t] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nsb; i++) {
        const blk_q6_k *b = blk + i;
        __m256i nat, sc = q6k_scales(b, &nat);
        __m256i sumi[4];
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++)
            sumi[t] = _mm256_sub_epi32(_mm256_setzero_si256(),
                                       _mm256_slli_epi32(_mm256_madd_epi16(nat, loadu(a[t].bsums + i * 16)), 5));
        _Pragma("GCC unroll 8")
        for (int h = 0; h < 2; h++) {
            __m256i ql0 = loadu(b->ql + 64 * h), ql1 = loadu(b->ql + 64 * h + 32), qh = loadu(b->qh + 32 * h);
            _Pragma("GCC unroll 8")
            for (int k = 0; k < 4; k++) {
                __m256i q = q6k_vec(ql0, ql1, qh, k), s = word_bcast(sc, 4 * h + k);
                _Pragma("GCC unroll 8")
                for (int t = 0; t < 4; t++) {
                    __m256i p = _mm256_maddubs_epi16(q, loadu(a[t].qk + i * QK_K + 128 * h + 32 * k));
                    sumi[t] = _mm256_add_epi32(sumi[t], _mm256_madd_epi16(p, s));
                }
            }
        }
        float d = f16((const uint8_t *)&b->d);
        _Pragma("GCC unroll 8")
        for (int t = 0; t < 4; t++)
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[t]), _mm256_set1_ps(d * a[t].dk[i]), acc[t]);
    }
    _Pragma("GCC unroll 8")
    for (int t = 0; t < 4; t++) put(&y[t * ldy], add, hsum_ps(acc[t]));
}

static void kern_q6_k(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                      float *y, int64_t ldy, int add)
{
    int64_t nsb = n_in / QK_K;
    int t = 0;
    for (; t + 4 <= nt; t += 4)
        for (int r = 0; r < nr; r++) q6k_tile_4(w + (size_t)r * rb, a + t, nsb, y + t * ldy + r, ldy, add);
    for (; t < nt; t++) {
        int r = 0;
        for (; r + 4 <= nr; r += 4) q6k_rows_1(w + (size_t)r * rb, rb, 4, &a[t], nsb, y + t * ldy + r, add);
        for (; r < nr; r++) q6k_rows_1(w + (size_t)r * rb, rb, 1, &a[t], nsb, y + t * ldy + r, add);
    }
}

/* ---- float types (F32, F16, BF16) with f32 activations ------------------------------------ */

enum { T_F32, T_F16, T_BF16 };

INLINE __m256 fload8(const uint8_t *row, int64_t i, const int T)
{
    if (T == T_F32) return _mm256_loadu_ps((const float *)row + i);
    __m128i h = _mm_loadu_si128((const __m128i *)(row + 2 * i));
    if (T == T_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

INLINE float fscalar(const uint8_t *row, int64_t i, const int T)
{
    if (T == T_F32) return ((const float *)row)[i];
    uint16_t h;
    memcpy(&h, row + 2 * i, 2);
    return T == T_F16 ? _cvtsh_ss(h) : bf16_to_f32(h);
}

/* R rows times TT tokens. */
INLINE void f_tile(const uint8_t *w, size_t rb, const int R, const mm_act *a, const int TT,
                   int64_t n_in, float *y, int64_t ldy, int add, const int T)
{
    __m256 acc[4][4];
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < TT; t++) acc[r][t] = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n_in; i += 8) {
        __m256 wv[4];
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; r++) {
            if (TT == 1 && i % 32 == 0) prefetch(w + (size_t)r * rb + (T == T_F32 ? 4 : 2) * i);
            if (TT == 1 && T == T_F32 && i % 32 == 16) prefetch(w + (size_t)r * rb + 4 * i);
            wv[r] = fload8(w + (size_t)r * rb, i, T);
        }
        _Pragma("GCC unroll 8")
        for (int t = 0; t < TT; t++) {
            __m256 xv = _mm256_loadu_ps(a[t].f + i);
            _Pragma("GCC unroll 8")
            for (int r = 0; r < R; r++) acc[r][t] = _mm256_fmadd_ps(wv[r], xv, acc[r][t]);
        }
    }
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; r++)
        _Pragma("GCC unroll 8")
        for (int t = 0; t < TT; t++) {
            float v = hsum_ps(acc[r][t]);
            for (int64_t j = i; j < n_in; j++) v += fscalar(w + (size_t)r * rb, j, T) * a[t].f[j];
            put(&y[t * ldy + r], add, v);
        }
}

INLINE void f_kern(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                   float *y, int64_t ldy, int add, const int T)
{
    int t = 0;
    for (; t + 4 <= nt; t += 4) {
        int r = 0;
        for (; r + 2 <= nr; r += 2) f_tile(w + (size_t)r * rb, rb, 2, a + t, 4, n_in, y + t * ldy + r, ldy, add, T);
        for (; r < nr; r++) f_tile(w + (size_t)r * rb, rb, 1, a + t, 4, n_in, y + t * ldy + r, ldy, add, T);
    }
    for (; t < nt; t++) {
        int r = 0;
        for (; r + 4 <= nr; r += 4) f_tile(w + (size_t)r * rb, rb, 4, a + t, 1, n_in, y + t * ldy + r, ldy, add, T);
        for (; r < nr; r++) f_tile(w + (size_t)r * rb, rb, 1, a + t, 1, n_in, y + t * ldy + r, ldy, add, T);
    }
}

static void kern_f32(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                     float *y, int64_t ldy, int add)
{
    f_kern(w, rb, nr, a, nt, n_in, y, ldy, add, T_F32);
}

static void kern_f16(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                     float *y, int64_t ldy, int add)
{
    f_kern(w, rb, nr, a, nt, n_in, y, ldy, add, T_F16);
}

static void kern_bf16(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt, int64_t n_in,
                      float *y, int64_t ldy, int add)
{
    f_kern(w, rb, nr, a, nt, n_in, y, ldy, add, T_BF16);
}

/* ---- activation quantizers ------------------------------------------------------------- */

/* Quantize 32 floats with scale 1/d = id; returns the int32 values' vector sum. */
INLINE __m256i quant32(const float *x, __m256 id, int8_t *q)
{
    __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x), id));
    __m256i i1 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8), id));
    __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 16), id));
    __m256i i3 = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 24), id));
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256((__m256i *)q, p);
    return _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
}

INLINE float absmax(const float *x, int n)
{
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + j)));
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void quant_a32(const float *x, int64_t n, int8_t *q, float *ds, float *s)
{
    for (int64_t b = 0; b < n / QK32; b++) {
        float amax = absmax(x + 32 * b, 32);
        float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = hsum_epi32(quant32(x + 32 * b, _mm256_set1_ps(id), q + 32 * b));
        ds[2 * b] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
        ds[2 * b + 1] = s[b] = _cvtsh_ss(_cvtss_sh(d * (float)sum, _MM_FROUND_TO_NEAREST_INT));
    }
}

static void quant_ak(const float *x, int64_t n, int8_t *q, float *d, int16_t *bsums)
{
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float *xb = x + QK_K * b;
        float amax = absmax(xb, QK_K);
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax != 0.0f ? 1.0f / id : 0.0f;
        __m256 idv = _mm256_set1_ps(id);
        for (int g = 0; g < QK_K / 32; g++) {
            quant32(xb + 32 * g, idv, q + QK_K * b + 32 * g);
            /* sums of each 16 from the stored int8 */
            __m256i qv = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + QK_K * b + 32 * g)));
            __m256i qv2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(q + QK_K * b + 32 * g + 16)));
            __m256i s1 = _mm256_madd_epi16(qv, _mm256_set1_epi16(1));
            __m256i s2 = _mm256_madd_epi16(qv2, _mm256_set1_epi16(1));
            bsums[b * 16 + 2 * g] = (int16_t)hsum_epi32(s1);
            bsums[b * 16 + 2 * g + 1] = (int16_t)hsum_epi32(s2);
        }
    }
}

const mm_impl *MM_IMPL_NAME(void)
{
    static const mm_impl impl = {
        .kern = {[DTYPE_F32] = kern_f32, [DTYPE_F16] = kern_f16, [DTYPE_BF16] = kern_bf16,
                 [DTYPE_Q4_0] = kern_q4_0, [DTYPE_Q4_1] = kern_q4_1, [DTYPE_Q8_0] = kern_q8_0,
                 [DTYPE_Q4_K] = kern_q4_k, [DTYPE_Q6_K] = kern_q6_k},
        .quant_a32 = quant_a32,
        .quant_ak = quant_ak,
    };
    return &impl;
}

#else

const mm_impl *MM_IMPL_NAME(void) { return NULL; }

#endif
