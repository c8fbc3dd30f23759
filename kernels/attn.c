/* kernels/attn.c: causal attention over paged KV, streaming softmax per block. */
#include "kernels/attn.h"

#include <math.h>
#include <stddef.h>
#include <stdlib.h>

#include "kernels/attn_internal.h"
#include "kernels/cpu.h"
#include "kernels/ops.h"

/* Keys or values converted to f32 at a time, per task (on the stack). */
#define ATTN_TILE_FLOATS 4096
/* Value rows gathered per pass of the weighted sum. */
#define ATTN_MAX_KEYS 128

typedef struct {
    const attn_kv_view *kv;
    const attn_query *rows;
    int avx2;
    int n_q, n_head;
    const float *q;
    float scale;
    float *out;
    int failed; /* set by a task whose scratch allocation failed */
} attn_job;

/* Convert n rows of head_dim elements of one (block, head) from slot s0 to f32. */
static void load_rows(const attn_kv_view *kv, int avx2, const void *base, const float *scales,
                      int block, int head, int s0, int n, float *dst)
{
    const int hd = kv->head_dim;
    const size_t row0 = (((size_t)block * kv->n_kv_head + head) * kv->block_tokens + s0) * hd;
    const size_t cnt = (size_t)n * hd;
    switch (kv->dtype) {
    case DTYPE_F32: {
        const float *src = (const float *)base + row0;
        for (size_t i = 0; i < cnt; i++) dst[i] = src[i];
        break;
    }
    case DTYPE_F16: {
        const uint16_t *src = (const uint16_t *)base + row0;
        if (avx2) {
            attn_avx2_f16(dst, src, cnt);
            break;
        }
        for (size_t i = 0; i < cnt; i++) dst[i] = fp16_to_f32(src[i]);
        break;
    }
    case DTYPE_BF16: {
        const uint16_t *src = (const uint16_t *)base + row0;
        for (size_t i = 0; i < cnt; i++) dst[i] = bf16_to_f32(src[i]);
        break;
    }
    case DTYPE_I8: {
        const int8_t *src = (const int8_t *)base + row0;
        const float *sc = scales + row0 / (size_t)hd; /* one scale per row */
        for (int r = 0; r < n; r++)
            for (int i = 0; i < hd; i++) dst[(size_t)r * hd + i] = (float)src[(size_t)r * hd + i] * sc[r];
        break;
    }
    default:
        break; /* rejected in attn_paged */
    }
}

/* dot(x, y) in llama.cpp's f32 dot-product order: the portable twin of attn_avx2_dot_ll. */
/* The f32 rows [s0, s0 + n) of one (block, head): straight from the cache when it holds
 * f32, else converted into buf. */
static const float *get_rows(const attn_kv_view *kv, int avx2, const void *base, const float *scales,
                             int block, int head, int s0, int n, float *buf)
{
    if (kv->dtype == DTYPE_F32)
        return (const float *)base +
               (((size_t)block * kv->n_kv_head + head) * kv->block_tokens + s0) * kv->head_dim;
    load_rows(kv, avx2, base, scales, block, head, s0, n, buf);
    return buf;
}

static float dot_ll(const float *x, const float *y, int n)
{
    const int np = n & ~63;
    float r = 0.0f;
    if (np) {
        float a[4][16] = {{0}};
        for (int i = 0; i < np; i += 64)
            for (int j = 0; j < 4; j++)
                for (int l = 0; l < 16; l++) a[j][l] = fmaf(x[i + 16 * j + l], y[i + 16 * j + l], a[j][l]);
        float t[16], u[8];
        for (int l = 0; l < 16; l++) t[l] = (a[0][l] + a[2][l]) + (a[1][l] + a[3][l]);
        for (int l = 0; l < 8; l++) u[l] = t[l] + t[l + 8];
        for (int l = 0; l < 4; l++) u[l] += u[l + 4];
        r = (u[0] + u[2]) + (u[1] + u[3]);
    }
    int i = np;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) {
            float p = x[i + l] * y[i + l];
            r += p;
        }
    for (; i < n; i++) r = fmaf(x[i], y[i], r);
    return r;
}

/* One query row t and one KV group g: every query head of the group at once, in
 * llama.cpp's order: all scores, softmax, then the weighted sum of values with key j in
 * lane j % 16 and the 16 lanes summed as a tree. scr: [group][n_keys] + [group][16][hd]. */
static void attn_one(const attn_job *job, int t, int g, float *scr)
{
    const attn_kv_view *kv = job->kv;
    const int hd = kv->head_dim, bt = kv->block_tokens;
    const int group = job->n_head / kv->n_kv_head;
    const attn_query *row = &job->rows[t];
    const int n_keys = row->pos + 1;
    const int n_pad = (n_keys + 15) / 16 * 16;
    const float *q = job->q + ((size_t)t * job->n_head + (size_t)g * group) * hd;
    float *out = job->out + ((size_t)t * job->n_head + (size_t)g * group) * hd;
    float *sc = scr, *acc = scr + (size_t)group * n_pad;

    int tile = ATTN_TILE_FLOATS / hd;
    if (tile > bt) tile = bt;
    float kbuf[ATTN_TILE_FLOATS];

    for (int p0 = 0; p0 < n_keys; p0 += tile) {
        const int b = p0 / bt, s0 = p0 % bt;
        int n = n_keys - p0;
        if (n > tile) n = tile;
        if (n > bt - s0) n = bt - s0;
        const float *kr = get_rows(kv, job->avx2, kv->k, kv->k_scale, row->blocks[b], g, s0, n, kbuf);
        for (int h = 0; h < group; h++) {
            const float *qh = q + (size_t)h * hd;
            float *sh = sc + (size_t)h * n_pad + p0;
            if (job->avx2) {
                attn_avx2_scores_ll(sh, qh, kr, n, hd, job->scale);
                continue;
            }
            for (int j = 0; j < n; j++) sh[j] = dot_ll(kr + (size_t)j * hd, qh, hd) * job->scale;
        }
    }
    for (int h = 0; h < group; h++) {
        float *sh = sc + (size_t)h * n_pad;
        for (int j = n_keys; j < n_pad; j++) sh[j] = -INFINITY; /* llama.cpp's masked tail */
        ops_softmax(sh, n_pad);
    }
    for (size_t i = 0; i < (size_t)group * 16 * hd; i++) acc[i] = 0.0f;
    /* values: up to ATTN_TILE_FLOATS / hd keys (several blocks) at a time, so each of the
     * 16 lane accumulators takes several keys per pass */
    const int vtile = ATTN_TILE_FLOATS / hd < ATTN_MAX_KEYS ? ATTN_TILE_FLOATS / hd : ATTN_MAX_KEYS;
    const float *vrows[ATTN_MAX_KEYS];
    for (int p0 = 0; p0 < n_keys;) {
        int cnt = 0;
        const int t0 = p0;
        while (p0 < n_keys && cnt < vtile) {
            const int b = p0 / bt, s0 = p0 % bt;
            int n = n_keys - p0;
            if (n > bt - s0) n = bt - s0;
            if (n > vtile - cnt) n = vtile - cnt;
            const float *vr = get_rows(kv, job->avx2, kv->v, kv->v_scale, row->blocks[b], g, s0, n,
                                       kbuf + (size_t)cnt * hd);
            for (int j = 0; j < n; j++) vrows[cnt + j] = vr + (size_t)j * hd;
            cnt += n;
            p0 += n;
        }
        for (int h = 0; h < group; h++) {
            const float *w = sc + (size_t)h * n_pad + t0;
            float *ah = acc + (size_t)h * 16 * hd;
            if (job->avx2) {
                attn_avx2_accum16(ah, w, vrows, cnt, t0, hd);
                continue;
            }
            for (int j = 0; j < cnt; j++) {
                float *a = ah + (size_t)((t0 + j) & 15) * hd;
                for (int d = 0; d < hd; d++) a[d] = fmaf(vrows[j][d], w[j], a[d]);
            }
        }
    }
    for (int h = 0; h < group; h++) {
        float *ah = acc + (size_t)h * 16 * hd, *oh = out + (size_t)h * hd;
        if (job->avx2) {
            attn_avx2_reduce16(oh, ah, hd);
            continue;
        }
        for (int d = 0; d < hd; d++) {
            float u[8];
            for (int l = 0; l < 8; l++) u[l] = ah[(size_t)l * hd + d] + ah[(size_t)(l + 8) * hd + d];
            for (int l = 0; l < 4; l++) u[l] += u[l + 4];
            oh[d] = (u[0] + u[2]) + (u[1] + u[3]);
        }
    }
}

static void attn_task(void *ctx, int ith, int nth)
{
    attn_job *job = ctx;
    const int n_tasks = job->n_q * job->kv->n_kv_head;
    const int group = job->n_head / job->kv->n_kv_head;
    int max_keys = 0;
    for (int i = ith; i < n_tasks; i += nth)
        if (job->rows[i / job->kv->n_kv_head].pos + 1 > max_keys) max_keys = job->rows[i / job->kv->n_kv_head].pos + 1;
    if (!max_keys) return;
    const size_t n_pad = ((size_t)max_keys + 15) / 16 * 16;
    float *scr = malloc(sizeof(float) * (size_t)group * (n_pad + 16 * (size_t)job->kv->head_dim));
    if (!scr) {
        job->failed = 1;
        return;
    }
    for (int i = ith; i < n_tasks; i += nth)
        attn_one(job, i / job->kv->n_kv_head, i % job->kv->n_kv_head, scr);
    free(scr);
}

int attn_paged(pool_t *pool, const attn_kv_view *kv, const attn_query *rows, int n_q,
               int n_head, const float *q, float scale, float *out)
{
    if (kv->dtype != DTYPE_F32 && kv->dtype != DTYPE_F16 && kv->dtype != DTYPE_BF16 &&
        kv->dtype != DTYPE_I8)
        return -1;
    if (kv->n_kv_head <= 0 || n_head % kv->n_kv_head != 0 || n_head / kv->n_kv_head > 64 ||
        kv->head_dim <= 0 || kv->head_dim > ATTN_TILE_FLOATS || kv->block_tokens <= 0)
        return -1;
    if (n_q <= 0) return 0;
    attn_job job = {kv, rows, cpu_use_avx2(), n_q, n_head, q, scale, out, 0};
    if (pool)
        pool_run(pool, attn_task, &job);
    else
        attn_task(&job, 0, 1);
    return job.failed ? -1 : 0;
}
