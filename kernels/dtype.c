/* kernels/dtype.c: type table, dequantizers and reference quantizers. */
#include "kernels/dtype.h"

#include <math.h>

#include "kernels/quant.h"

typedef struct {
    const char *name;
    size_t block_elems, block_bytes;
} dtype_info;

static const dtype_info *info_of(dtype_t t)
{
    static const dtype_info f32 = {"f32", 1, 4}, f16 = {"f16", 1, 2}, bf16 = {"bf16", 1, 2},
                            i8 = {"i8", 1, 1}, q4_0 = {"q4_0", QK32, sizeof(blk_q4_0)},
                            q4_1 = {"q4_1", QK32, sizeof(blk_q4_1)},
                            q8_0 = {"q8_0", QK32, sizeof(blk_q8_0)},
                            q8_1 = {"q8_1", QK32, sizeof(blk_q8_1)},
                            q4_k = {"q4_k", QK_K, sizeof(blk_q4_k)},
                            q6_k = {"q6_k", QK_K, sizeof(blk_q6_k)},
                            q8_k = {"q8_k", QK_K, sizeof(blk_q8_k)};
    switch (t) {
    case DTYPE_F32: return &f32;
    case DTYPE_F16: return &f16;
    case DTYPE_BF16: return &bf16;
    case DTYPE_I8: return &i8;
    case DTYPE_Q4_0: return &q4_0;
    case DTYPE_Q4_1: return &q4_1;
    case DTYPE_Q8_0: return &q8_0;
    case DTYPE_Q8_1: return &q8_1;
    case DTYPE_Q4_K: return &q4_k;
    case DTYPE_Q6_K: return &q6_k;
    case DTYPE_Q8_K: return &q8_k;
    }
    return NULL;
}

int dtype_supported(uint32_t id)
{
    return id <= 0xffff && info_of((dtype_t)id) != NULL;
}

const char *dtype_name(dtype_t t)
{
    const dtype_info *i = info_of(t);
    return i ? i->name : "unknown";
}

size_t dtype_block_elems(dtype_t t)
{
    const dtype_info *i = info_of(t);
    return i ? i->block_elems : 0;
}

size_t dtype_block_bytes(dtype_t t)
{
    const dtype_info *i = info_of(t);
    return i ? i->block_bytes : 0;
}

size_t dtype_row_bytes(dtype_t t, int64_t n)
{
    const dtype_info *i = info_of(t);
    if (!i || n < 0 || n % (int64_t)i->block_elems) return 0;
    return (size_t)(n / (int64_t)i->block_elems) * i->block_bytes;
}

/* ---- dequantizers ---------------------------------------------------------- */

static void deq_q4_0(const blk_q4_0 *b, float *y)
{
    float d = fp16_to_f32(b->d);
    for (int j = 0; j < QK32 / 2; j++) {
        y[j] = d * (float)((b->qs[j] & 0xF) - 8);
        y[j + QK32 / 2] = d * (float)((b->qs[j] >> 4) - 8);
    }
}

static void deq_q4_1(const blk_q4_1 *b, float *y)
{
    float d = fp16_to_f32(b->d), m = fp16_to_f32(b->m);
    for (int j = 0; j < QK32 / 2; j++) {
        y[j] = d * (float)(b->qs[j] & 0xF) + m;
        y[j + QK32 / 2] = d * (float)(b->qs[j] >> 4) + m;
    }
}

static void deq_q8_0(const blk_q8_0 *b, float *y)
{
    float d = fp16_to_f32(b->d);
    for (int j = 0; j < QK32; j++) y[j] = d * (float)b->qs[j];
}

static void deq_q8_1(const blk_q8_1 *b, float *y)
{
    float d = fp16_to_f32(b->d);
    for (int j = 0; j < QK32; j++) y[j] = d * (float)b->qs[j];
}

static void deq_q4_k(const blk_q4_k *b, float *y)
{
    float d = fp16_to_f32(b->d), dmin = fp16_to_f32(b->dmin);
    for (int c = 0; c < 4; c++) {
        uint8_t sc0, m0, sc1, m1;
        quant_k4_scale_min(b->scales, 2 * c, &sc0, &m0);
        quant_k4_scale_min(b->scales, 2 * c + 1, &sc1, &m1);
        float d0 = d * sc0, o0 = dmin * m0, d1 = d * sc1, o1 = dmin * m1;
        const uint8_t *q = b->qs + 32 * c;
        for (int l = 0; l < 32; l++) {
            y[64 * c + l] = d0 * (float)(q[l] & 0xF) - o0;
            y[64 * c + 32 + l] = d1 * (float)(q[l] >> 4) - o1;
        }
    }
}

/* The 6-bit value (0..63) of element e (0..255) of a Q6_K block. */
static inline int q6k_get(const blk_q6_k *b, int e)
{
    int h = e / 128, r = e % 128, k = r / 32, l = r % 32;
    uint8_t lo = b->ql[64 * h + 32 * (k & 1) + l];
    lo = (k & 2) ? (uint8_t)(lo >> 4) : (uint8_t)(lo & 0xF);
    int hi = (b->qh[32 * h + l] >> (2 * k)) & 3;
    return lo | (hi << 4);
}

static void deq_q6_k(const blk_q6_k *b, float *y)
{
    float d = fp16_to_f32(b->d);
    for (int e = 0; e < QK_K; e++) y[e] = d * (float)b->scales[e / 16] * (float)(q6k_get(b, e) - 32);
}

static void deq_q8_k(const blk_q8_k *b, float *y)
{
    for (int j = 0; j < QK_K; j++) y[j] = b->d * (float)b->qs[j];
}

int dtype_to_f32(dtype_t t, const void *src, float *dst, int64_t n)
{
    const dtype_info *info = info_of(t);
    if (!info || n < 0 || n % (int64_t)info->block_elems) return -1;
    int64_t nb = n / (int64_t)info->block_elems;
    const uint8_t *s = src;
    switch (t) {
    case DTYPE_F32: memcpy(dst, src, (size_t)n * 4); break;
    case DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = fp16_to_f32(h);
        }
        break;
    case DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h;
            memcpy(&h, s + 2 * i, 2);
            dst[i] = bf16_to_f32(h);
        }
        break;
    case DTYPE_I8:
        for (int64_t i = 0; i < n; i++) dst[i] = (float)(int8_t)s[i];
        break;
    case DTYPE_Q4_0:
        for (int64_t i = 0; i < nb; i++) deq_q4_0((const blk_q4_0 *)s + i, dst + i * QK32);
        break;
    case DTYPE_Q4_1:
        for (int64_t i = 0; i < nb; i++) deq_q4_1((const blk_q4_1 *)s + i, dst + i * QK32);
        break;
    case DTYPE_Q8_0:
        for (int64_t i = 0; i < nb; i++) deq_q8_0((const blk_q8_0 *)s + i, dst + i * QK32);
        break;
    case DTYPE_Q8_1:
        for (int64_t i = 0; i < nb; i++) deq_q8_1((const blk_q8_1 *)s + i, dst + i * QK32);
        break;
    case DTYPE_Q4_K:
        for (int64_t i = 0; i < nb; i++) deq_q4_k((const blk_q4_k *)s + i, dst + i * QK_K);
        break;
    case DTYPE_Q6_K:
        for (int64_t i = 0; i < nb; i++) deq_q6_k((const blk_q6_k *)s + i, dst + i * QK_K);
        break;
    case DTYPE_Q8_K:
        for (int64_t i = 0; i < nb; i++) deq_q8_k((const blk_q8_k *)s + i, dst + i * QK_K);
        break;
    }
    return 0;
}

/* ---- reference quantizers ---------------------------------------------------- */

static inline int clampi(int v, int lo, int hi) { return v < lo ? lo : v > hi ? hi : v; }

/* The element of x[n] with the largest magnitude, with its sign. */
static float signed_absmax(const float *x, int n)
{
    float best = 0.0f, amax = 0.0f;
    for (int i = 0; i < n; i++) {
        float a = fabsf(x[i]);
        if (a > amax) { amax = a; best = x[i]; }
    }
    return best;
}

static void quant_q4_0(const float *x, blk_q4_0 *b)
{
    float mx = signed_absmax(x, QK32);
    uint16_t dh = fp16_from_f32(mx / -8.0f);
    float d = fp16_to_f32(dh), id = d != 0.0f ? 1.0f / d : 0.0f;
    b->d = dh;
    for (int j = 0; j < QK32 / 2; j++) {
        int q0 = clampi((int)lrintf(x[j] * id) + 8, 0, 15);
        int q1 = clampi((int)lrintf(x[j + QK32 / 2] * id) + 8, 0, 15);
        b->qs[j] = (uint8_t)(q0 | (q1 << 4));
    }
}

static void quant_q4_1(const float *x, blk_q4_1 *b)
{
    float mn = x[0], mx = x[0];
    for (int j = 1; j < QK32; j++) {
        if (x[j] < mn) mn = x[j];
        if (x[j] > mx) mx = x[j];
    }
    b->d = fp16_from_f32((mx - mn) / 15.0f);
    b->m = fp16_from_f32(mn);
    float d = fp16_to_f32(b->d), m = fp16_to_f32(b->m), id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < QK32 / 2; j++) {
        int q0 = clampi((int)lrintf((x[j] - m) * id), 0, 15);
        int q1 = clampi((int)lrintf((x[j + QK32 / 2] - m) * id), 0, 15);
        b->qs[j] = (uint8_t)(q0 | (q1 << 4));
    }
}

/* Symmetric int8 quantization of n values: q = round(x / d), d = amax / 127. */
static float quant_i8(const float *x, int n, int8_t *q, int *sum)
{
    float amax = 0.0f;
    for (int j = 0; j < n; j++) amax = fmaxf(amax, fabsf(x[j]));
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    int s = 0;
    for (int j = 0; j < n; j++) {
        q[j] = (int8_t)clampi((int)lrintf(x[j] * id), -127, 127);
        s += q[j];
    }
    if (sum) *sum = s;
    return d;
}

static void quant_q8_0(const float *x, blk_q8_0 *b)
{
    float d = quant_i8(x, QK32, b->qs, NULL);
    b->d = fp16_from_f32(d);
}

static void quant_q8_1(const float *x, blk_q8_1 *b)
{
    int sum;
    float d = quant_i8(x, QK32, b->qs, &sum);
    b->d = fp16_from_f32(d);
    b->s = fp16_from_f32(d * (float)sum);
}

static void quant_q8_k(const float *x, blk_q8_k *b)
{
    b->d = quant_i8(x, QK_K, b->qs, NULL);
    for (int g = 0; g < QK_K / 16; g++) {
        int s = 0;
        for (int j = 0; j < 16; j++) s += b->qs[16 * g + j];
        b->bsums[g] = (int16_t)s;
    }
}

/* Fit x[32] ~ scale * q - off with q in 0..15 and off >= 0: start from the range, then a
 * few rounds of least squares on the assignment. */
static void fit_sub4(const float *x, float *scale_out, float *off_out)
{
    float mn = x[0], mx = x[0];
    for (int j = 1; j < 32; j++) {
        mn = fminf(mn, x[j]);
        mx = fmaxf(mx, x[j]);
    }
    if (mn > 0.0f) mn = 0.0f;
    float scale = (mx - mn) / 15.0f, off = -mn;
    if (scale <= 0.0f) { *scale_out = 0.0f; *off_out = off; return; }
    float best_err = INFINITY, best_s = scale, best_o = off;
    for (int it = 0; it < 4; it++) {
        /* assign */
        double sq = 0, sqq = 0, sx = 0, sqx = 0, err = 0;
        int q[32];
        for (int j = 0; j < 32; j++) {
            q[j] = clampi((int)lrintf((x[j] + off) / scale), 0, 15);
            double e = scale * q[j] - off - x[j];
            err += e * e;
            sq += q[j]; sqq += (double)q[j] * q[j]; sx += x[j]; sqx += q[j] * (double)x[j];
        }
        if (err < best_err) { best_err = (float)err; best_s = scale; best_o = off; }
        /* least squares for x = s*q - o */
        double det = 32 * sqq - sq * sq;
        if (det <= 0) break;
        double s = (32 * sqx - sq * sx) / det;
        double o = (s * sq - sx) / 32;
        if (o < 0) { o = 0; s = sqq > 0 ? sqx / sqq : 0; }
        if (s <= 0) break;
        scale = (float)s; off = (float)o;
    }
    *scale_out = best_s;
    *off_out = best_o;
}

static void quant_q4_k(const float *x, blk_q4_k *b)
{
    float scale[8], off[8], max_scale = 0.0f, max_off = 0.0f;
    for (int j = 0; j < 8; j++) {
        fit_sub4(x + 32 * j, &scale[j], &off[j]);
        max_scale = fmaxf(max_scale, scale[j]);
        max_off = fmaxf(max_off, off[j]);
    }
    b->d = fp16_from_f32(max_scale / 63.0f);
    b->dmin = fp16_from_f32(max_off / 63.0f);
    float d = fp16_to_f32(b->d), dmin = fp16_to_f32(b->dmin);
    uint8_t sc[8], mn[8];
    for (int j = 0; j < 8; j++) {
        sc[j] = (uint8_t)(d > 0.0f ? clampi((int)lrintf(scale[j] / d), 0, 63) : 0);
        mn[j] = (uint8_t)(dmin > 0.0f ? clampi((int)lrintf(off[j] / dmin), 0, 63) : 0);
    }
    for (int j = 0; j < 4; j++) {
        b->scales[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
        b->scales[j + 4] = (uint8_t)(mn[j] | ((mn[j + 4] >> 4) << 6));
        b->scales[j + 8] = (uint8_t)((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
    }
    uint8_t q[QK_K];
    for (int j = 0; j < 8; j++) {
        float ds = d * sc[j], o = dmin * mn[j];
        for (int l = 0; l < 32; l++)
            q[32 * j + l] = (uint8_t)(ds > 0.0f ? clampi((int)lrintf((x[32 * j + l] + o) / ds), 0, 15) : 0);
    }
    for (int c = 0; c < 4; c++)
        for (int l = 0; l < 32; l++)
            b->qs[32 * c + l] = (uint8_t)(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
}

static void quant_q6_k(const float *x, blk_q6_k *b)
{
    float scale[16], max_scale = 0.0f, max_abs = 0.0f;
    for (int j = 0; j < 16; j++) {
        scale[j] = signed_absmax(x + 16 * j, 16) / -32.0f;
        if (fabsf(scale[j]) > max_abs) { max_abs = fabsf(scale[j]); max_scale = scale[j]; }
    }
    b->d = fp16_from_f32(max_scale / -128.0f);
    float d = fp16_to_f32(b->d);
    for (int j = 0; j < 16; j++)
        b->scales[j] = (int8_t)(d != 0.0f ? clampi((int)lrintf(scale[j] / d), -128, 127) : 0);
    memset(b->ql, 0, sizeof b->ql);
    memset(b->qh, 0, sizeof b->qh);
    for (int e = 0; e < QK_K; e++) {
        float ds = d * (float)b->scales[e / 16];
        int q = ds != 0.0f ? clampi((int)lrintf(x[e] / ds), -32, 31) + 32 : 32;
        int h = e / 128, r = e % 128, k = r / 32, l = r % 32;
        b->ql[64 * h + 32 * (k & 1) + l] |= (uint8_t)((q & 0xF) << ((k & 2) ? 4 : 0));
        b->qh[32 * h + l] |= (uint8_t)((q >> 4) << (2 * k));
    }
}

int dtype_from_f32(dtype_t t, const float *src, void *dst, int64_t n)
{
    const dtype_info *info = info_of(t);
    if (!info || n < 0 || n % (int64_t)info->block_elems) return -1;
    int64_t nb = n / (int64_t)info->block_elems;
    uint8_t *d = dst;
    switch (t) {
    case DTYPE_F32: memcpy(dst, src, (size_t)n * 4); break;
    case DTYPE_F16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = fp16_from_f32(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        break;
    case DTYPE_BF16:
        for (int64_t i = 0; i < n; i++) {
            uint16_t h = bf16_from_f32(src[i]);
            memcpy(d + 2 * i, &h, 2);
        }
        break;
    case DTYPE_I8:
        for (int64_t i = 0; i < n; i++) {
            float r = nearbyintf(src[i]);
            d[i] = (uint8_t)(int8_t)(r > 127.0f ? 127 : r < -128.0f ? -128 : (int)r);
        }
        break;
    case DTYPE_Q4_0:
        for (int64_t i = 0; i < nb; i++) quant_q4_0(src + i * QK32, (blk_q4_0 *)d + i);
        break;
    case DTYPE_Q4_1:
        for (int64_t i = 0; i < nb; i++) quant_q4_1(src + i * QK32, (blk_q4_1 *)d + i);
        break;
    case DTYPE_Q8_0:
        for (int64_t i = 0; i < nb; i++) quant_q8_0(src + i * QK32, (blk_q8_0 *)d + i);
        break;
    case DTYPE_Q8_1:
        for (int64_t i = 0; i < nb; i++) quant_q8_1(src + i * QK32, (blk_q8_1 *)d + i);
        break;
    case DTYPE_Q4_K:
        for (int64_t i = 0; i < nb; i++) quant_q4_k(src + i * QK_K, (blk_q4_k *)d + i);
        break;
    case DTYPE_Q6_K:
        for (int64_t i = 0; i < nb; i++) quant_q6_k(src + i * QK_K, (blk_q6_k *)d + i);
        break;
    case DTYPE_Q8_K:
        for (int64_t i = 0; i < nb; i++) quant_q8_k(src + i * QK_K, (blk_q8_k *)d + i);
        break;
    }
    return 0;
}
