/* kernels/attn.c: causal attention over paged KV, streaming softmax per block. */
#include "kernels/attn.h"

#include <math.h>
#include <stddef.h>

#include "kernels/attn_internal.h"
#include "kernels/cpu.h"

/* Keys or values converted to f32 at a time, per task (on the stack). */
#define ATTN_TILE_FLOATS 4096
/* Scores kept per tile: query heads of a group x keys of a tile. */
#define ATTN_SCORE_FLOATS 2048

typedef struct {
    const attn_kv_view *kv;
    const attn_query *rows;
    int avx2;
    int n_q, n_head;
    const float *q;
    float scale;
    float *out;
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
        const float sc = scales[(size_t)block * kv->n_kv_head + head];
        for (size_t i = 0; i < cnt; i++) dst[i] = (float)src[i] * sc;
        break;
    }
    default:
        break; /* rejected in attn_paged */
    }
}

static float dot(const float *a, const float *b, int n)
{
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; i++) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

/* One query row t and one KV group g: every query head of the group at once. */
static void attn_one(const attn_job *job, int t, int g)
{
    const attn_kv_view *kv = job->kv;
    const int hd = kv->head_dim, bt = kv->block_tokens;
    const int group = job->n_head / kv->n_kv_head;
    const attn_query *row = &job->rows[t];
    const int n_keys = row->pos + 1;
    const float *q = job->q + ((size_t)t * job->n_head + (size_t)g * group) * hd;
    float *out = job->out + ((size_t)t * job->n_head + (size_t)g * group) * hd;

    int tile = ATTN_TILE_FLOATS / hd;
    if (tile > ATTN_SCORE_FLOATS / group) tile = ATTN_SCORE_FLOATS / group;
    if (tile > bt) tile = bt;

    float kbuf[ATTN_TILE_FLOATS];
    float s[ATTN_SCORE_FLOATS];
    float m[64], l[64]; /* running max and sum per head of the group (group <= 64) */
    for (int h = 0; h < group; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (int d = 0; d < hd; d++) out[(size_t)h * hd + d] = 0.0f;
    }

    for (int p0 = 0; p0 < n_keys; p0 += tile) {
        const int b = p0 / bt, s0 = p0 % bt;
        int n = n_keys - p0;
        if (n > tile) n = tile;
        if (n > bt - s0) n = bt - s0;
        const int block = row->blocks[b];

        load_rows(kv, job->avx2, kv->k, kv->k_scale, block, g, s0, n, kbuf);
        for (int h = 0; h < group; h++) {
            const float *qh = q + (size_t)h * hd;
            float *sh = s + h * tile;
            float mx = m[h];
            if (job->avx2)
                attn_avx2_scores(sh, qh, kbuf, n, hd, job->scale);
            else
                for (int j = 0; j < n; j++) sh[j] = dot(qh, kbuf + (size_t)j * hd, hd) * job->scale;
            for (int j = 0; j < n; j++)
                if (sh[j] > mx) mx = sh[j];
            /* rescale what was accumulated under the old maximum */
            const float corr = expf(m[h] - mx);
            float *oh = out + (size_t)h * hd;
            if (corr != 1.0f) {
                for (int d = 0; d < hd; d++) oh[d] *= corr;
                l[h] *= corr;
            }
            m[h] = mx;
            for (int j = 0; j < n; j++) {
                float w = expf(s[h * tile + j] - mx);
                s[h * tile + j] = w;
                l[h] += w;
            }
        }
        load_rows(kv, job->avx2, kv->v, kv->v_scale, block, g, s0, n, kbuf);
        for (int h = 0; h < group; h++) {
            float *oh = out + (size_t)h * hd;
            if (job->avx2) {
                attn_avx2_accum(oh, s + h * tile, kbuf, n, hd);
                continue;
            }
            for (int j = 0; j < n; j++) {
                const float w = s[h * tile + j];
                const float *vr = kbuf + (size_t)j * hd;
                for (int d = 0; d < hd; d++) oh[d] += w * vr[d];
            }
        }
    }
    for (int h = 0; h < group; h++) {
        const float inv = 1.0f / l[h];
        float *oh = out + (size_t)h * hd;
        for (int d = 0; d < hd; d++) oh[d] *= inv;
    }
}

static void attn_task(void *ctx, int ith, int nth)
{
    const attn_job *job = ctx;
    const int n_tasks = job->n_q * job->kv->n_kv_head;
    for (int i = ith; i < n_tasks; i += nth)
        attn_one(job, i / job->kv->n_kv_head, i % job->kv->n_kv_head);
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
    attn_job job = {kv, rows, cpu_use_avx2(), n_q, n_head, q, scale, out};
    if (pool)
        pool_run(pool, attn_task, &job);
    else
        attn_task(&job, 0, 1);
    return 0;
}
