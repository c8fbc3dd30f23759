/* kernels/matmul.c: the matmul driver (scratch, activation quantization, work split)
 * and the portable kernels. */
#include "kernels/matmul.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cpu.h"
#include "kernels/matmul_internal.h"
#include "kernels/ops.h"
#include "kernels/quant.h"

/* Inputs of at most this many elements (or one token) are quantized by every thread
 * into its own slot, so no barrier is needed between quantizing and multiplying. */
#define PRIV_LIMIT 32768
/* Tokens whose activations are kept hot (L2) while a thread walks its rows. */
#define TOK_BLOCK 64
/* Rows per kernel call and the alignment of the threads' row ranges. */
#define ROW_TILE 16
#define ROW_ALIGN 4
#define ALIGN 64

static size_t align_up(size_t v) { return (v + ALIGN - 1) / ALIGN * ALIGN; }

/* ---- scratch ------------------------------------------------------------------ */

struct mm_scratch {
    uint8_t *buf;
    size_t cap;
};

int mm_scratch_new(mm_scratch **out)
{
    *out = calloc(1, sizeof **out);
    return *out ? 0 : -1;
}

void mm_scratch_destroy(mm_scratch **self_p)
{
    if (!self_p || !*self_p) return;
    free((*self_p)->buf);
    free(*self_p);
    *self_p = NULL;
}

/* Per-token byte sizes of the three activation forms for n_in columns. */
typedef struct {
    size_t f, a32, ak, tok;   /* tok = f + a32 + ak */
} act_sizes;

static act_sizes sizes_of(int64_t n_in)
{
    act_sizes s;
    s.f = align_up((size_t)n_in * sizeof(float));
    s.a32 = n_in % QK32 ? 0
                        : align_up((size_t)n_in) + align_up((size_t)(n_in / QK32) * 3 * sizeof(float));
    s.ak = n_in % QK_K ? 0
                       : align_up((size_t)n_in) + align_up((size_t)(n_in / QK_K) * sizeof(float)) +
                             align_up((size_t)(n_in / 16) * sizeof(int16_t));
    s.tok = s.f + s.a32 + s.ak;
    return s;
}

static int private_mode(int64_t n_in, int n_tok) { return n_tok == 1 || (int64_t)n_tok * n_in <= PRIV_LIMIT; }

/* Bytes a call with these sizes needs. */
static size_t need_bytes(int64_t n_in, int n_tok, int nth)
{
    size_t slot = sizes_of(n_in).tok * (size_t)n_tok;
    return private_mode(n_in, n_tok) ? slot * (size_t)nth : slot;
}

int mm_scratch_reserve(mm_scratch *ws, int64_t n_in, int n_tok, int nth)
{
    if (!ws || n_in <= 0 || n_tok <= 0 || nth <= 0) return -1;
    size_t need = need_bytes(n_in, n_tok, nth);
    /* smaller calls in private mode may need more than a large shared one */
    int64_t pt = PRIV_LIMIT / n_in;
    if (pt > n_tok) pt = n_tok;
    if (pt < 1) pt = 1;
    size_t priv = need_bytes(n_in, (int)pt, nth);
    if (priv > need) need = priv;
    if (need <= ws->cap) return 0;
    uint8_t *nb = aligned_alloc(ALIGN, align_up(need));
    if (!nb) return -1;
    free(ws->buf);
    ws->buf = nb;
    ws->cap = need;
    return 0;
}

/* ---- portable quantizers ------------------------------------------------------------ */

static void quant_a32_ref(const float *x, int64_t n, int8_t *q, float *ds, float *s)
{
    for (int64_t b = 0; b < n / QK32; b++) {
        const float *xb = x + b * QK32;
        float amax = 0.0f;
        for (int j = 0; j < QK32; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float d = amax / 127.0f, id = amax != 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int j = 0; j < QK32; j++) {
            int v = (int)lrintf(xb[j] * id);
            q[b * QK32 + j] = (int8_t)v;
            sum += v;
        }
        /* d and s rounded to f16 as GGUF's Q8_1 stores them (matches llama.cpp bit for bit) */
        ds[2 * b] = fp16_to_f32(fp16_from_f32(d));
        ds[2 * b + 1] = s[b] = fp16_to_f32(fp16_from_f32(d * (float)sum));
    }
}

static void quant_ak_ref(const float *x, int64_t n, int8_t *q, float *d, int16_t *bsums)
{
    for (int64_t b = 0; b < n / QK_K; b++) {
        const float *xb = x + b * QK_K;
        float amax = 0.0f;
        for (int j = 0; j < QK_K; j++) amax = fmaxf(amax, fabsf(xb[j]));
        float id = amax != 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax != 0.0f ? 1.0f / id : 0.0f;
        for (int g = 0; g < QK_K / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) {
                int v = (int)lrintf(xb[16 * g + j] * id);
                q[b * QK_K + 16 * g + j] = (int8_t)v;
                sum += v;
            }
            bsums[b * (QK_K / 16) + g] = (int16_t)sum;
        }
    }
}

/* ---- portable kernels ---------------------------------------------------------------- */

static inline void store(float *y, int add, float v) { *y = add ? *y + v : v; }

static float dot_q4_0(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const blk_q4_0 *b = (const blk_q4_0 *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in / QK32; i++) {
        const int8_t *x = a->q32 + i * QK32;
        int s = 0;
        for (int j = 0; j < QK32 / 2; j++)
            s += ((b[i].qs[j] & 0xF) - 8) * x[j] + ((b[i].qs[j] >> 4) - 8) * x[j + QK32 / 2];
        sum += fp16_to_f32(b[i].d) * a->ds[2 * i] * (float)s;
    }
    return sum;
}

static float dot_q4_1(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const blk_q4_1 *b = (const blk_q4_1 *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in / QK32; i++) {
        const int8_t *x = a->q32 + i * QK32;
        int s = 0;
        for (int j = 0; j < QK32 / 2; j++)
            s += (b[i].qs[j] & 0xF) * x[j] + (b[i].qs[j] >> 4) * x[j + QK32 / 2];
        sum += fp16_to_f32(b[i].d) * a->ds[2 * i] * (float)s + fp16_to_f32(b[i].m) * a->ds[2 * i + 1];
    }
    return sum;
}

static float dot_q8_0(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const blk_q8_0 *b = (const blk_q8_0 *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in / QK32; i++) {
        const int8_t *x = a->q32 + i * QK32;
        int s = 0;
        for (int j = 0; j < QK32; j++) s += b[i].qs[j] * x[j];
        sum += fp16_to_f32(b[i].d) * a->ds[2 * i] * (float)s;
    }
    return sum;
}

static float dot_q4_k(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const blk_q4_k *b = (const blk_q4_k *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in / QK_K; i++) {
        const int8_t *x = a->qk + i * QK_K;
        const int16_t *bs = a->bsums + i * (QK_K / 16);
        int acc = 0, macc = 0;
        for (int c = 0; c < 4; c++) {
            uint8_t sc0, m0, sc1, m1;
            quant_k4_scale_min(b[i].scales, 2 * c, &sc0, &m0);
            quant_k4_scale_min(b[i].scales, 2 * c + 1, &sc1, &m1);
            const uint8_t *q = b[i].qs + 32 * c;
            int s0 = 0, s1 = 0;
            for (int l = 0; l < 32; l++) {
                s0 += (q[l] & 0xF) * x[64 * c + l];
                s1 += (q[l] >> 4) * x[64 * c + 32 + l];
            }
            acc += sc0 * s0 + sc1 * s1;
            macc += m0 * (bs[4 * c] + bs[4 * c + 1]) + m1 * (bs[4 * c + 2] + bs[4 * c + 3]);
        }
        float dx = a->dk[i];
        sum += fp16_to_f32(b[i].d) * dx * (float)acc - fp16_to_f32(b[i].dmin) * dx * (float)macc;
    }
    return sum;
}

static float dot_q6_k(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const blk_q6_k *b = (const blk_q6_k *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in / QK_K; i++) {
        const int8_t *x = a->qk + i * QK_K;
        int sub[16] = {0};
        for (int h = 0; h < 2; h++) {
            const uint8_t *ql = b[i].ql + 64 * h, *qh = b[i].qh + 32 * h;
            const int8_t *xh = x + 128 * h;
            for (int l = 0; l < 32; l++) {
                int q0 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                int q1 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                int q2 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                int q3 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                int g = 8 * h + l / 16;
                sub[g] += q0 * xh[l];
                sub[g + 2] += q1 * xh[l + 32];
                sub[g + 4] += q2 * xh[l + 64];
                sub[g + 6] += q3 * xh[l + 96];
            }
        }
        int acc = 0;
        for (int g = 0; g < 16; g++) acc += b[i].scales[g] * sub[g];
        sum += fp16_to_f32(b[i].d) * a->dk[i] * (float)acc;
    }
    return sum;
}

static float dot_f32(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const float *r = (const float *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in; i++) sum += r[i] * a->f[i];
    return sum;
}

static float dot_f16(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const uint16_t *r = (const uint16_t *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in; i++) sum += fp16_to_f32(r[i]) * a->f[i];
    return sum;
}

static float dot_bf16(const uint8_t *w, const mm_act *a, int64_t n_in)
{
    const uint16_t *r = (const uint16_t *)w;
    float sum = 0.0f;
    for (int64_t i = 0; i < n_in; i++) sum += bf16_to_f32(r[i]) * a->f[i];
    return sum;
}

#define PORTABLE_KERNEL(name, dot)                                                            \
    static void name(const uint8_t *w, size_t rb, int nr, const mm_act *a, int nt,            \
                     int64_t n_in, float *y, int64_t ldy, int add)                            \
    {                                                                                         \
        for (int r = 0; r < nr; r++)                                                          \
            for (int t = 0; t < nt; t++) store(&y[t * ldy + r], add, dot(w + r * rb, &a[t], n_in)); \
    }

PORTABLE_KERNEL(kern_q4_0, dot_q4_0)
PORTABLE_KERNEL(kern_q4_1, dot_q4_1)
PORTABLE_KERNEL(kern_q8_0, dot_q8_0)
PORTABLE_KERNEL(kern_q4_k, dot_q4_k)
PORTABLE_KERNEL(kern_q6_k, dot_q6_k)
PORTABLE_KERNEL(kern_f32, dot_f32)
PORTABLE_KERNEL(kern_f16, dot_f16)
PORTABLE_KERNEL(kern_bf16, dot_bf16)

const mm_impl *mm_impl_portable(void)
{
    static const mm_impl impl = {
        .kern = {[DTYPE_F32] = kern_f32, [DTYPE_F16] = kern_f16, [DTYPE_BF16] = kern_bf16,
                 [DTYPE_Q4_0] = kern_q4_0, [DTYPE_Q4_1] = kern_q4_1, [DTYPE_Q8_0] = kern_q8_0,
                 [DTYPE_Q4_K] = kern_q4_k, [DTYPE_Q6_K] = kern_q6_k},
        .quant_a32 = quant_a32_ref,
        .quant_ak = quant_ak_ref,
    };
    return &impl;
}

static const mm_impl *impl_now(void)
{
    const mm_impl *avx2 = cpu_use_vnni() ? mm_impl_vnni() : NULL;
    if (!avx2) avx2 = cpu_use_avx2() ? mm_impl_avx2() : NULL;
    return avx2 ? avx2 : mm_impl_portable();
}

/* ---- driver ------------------------------------------------------------------------ */

enum { NEED_F = 1, NEED_A32 = 2, NEED_AK = 4 };

static int needs_of(dtype_t t)
{
    switch (t) {
    case DTYPE_F32: case DTYPE_F16: case DTYPE_BF16: return NEED_F;
    case DTYPE_Q4_0: case DTYPE_Q4_1: case DTYPE_Q8_0: return NEED_A32;
    case DTYPE_Q4_K: case DTYPE_Q6_K: return NEED_AK;
    default: return 0;
    }
}

int mm_supported(dtype_t t) { return needs_of(t) != 0; }

/* Checks every job; returns the union of needed activation forms, or -1. */
static int check_jobs(const mm_input *in, const mm_job *jobs, int n_jobs, int64_t *n_in_out)
{
    if (!in || !in->x || in->n_tok < 1 || !jobs || n_jobs < 1) return -1;
    int64_t n_in = jobs[0].w ? jobs[0].w->n_in : 0;
    if (n_in <= 0 || (in->ldx && in->ldx < n_in)) return -1;
    int need = 0;
    for (int j = 0; j < n_jobs; j++) {
        const mm_weight *w = jobs[j].w;
        if (!w || !w->data || !jobs[j].y || w->n_in != n_in || w->n_out < 1) return -1;
        if (jobs[j].ldy && jobs[j].ldy < w->n_out) return -1;
        int nd = needs_of(w->type);
        if (!nd || dtype_row_bytes(w->type, n_in) == 0) return -1;
        need |= nd;
    }
    *n_in_out = n_in;
    return need;
}

/* Pointers to token t's activations in a slot of n_tok tokens. */
static mm_act act_of(uint8_t *slot, const act_sizes *sz, int64_t n_in, int n_tok, int t)
{
    mm_act a = {0};
    uint8_t *f = slot + (size_t)t * sz->f;
    a.f = (const float *)f;
    if (sz->a32) {
        uint8_t *p = slot + (size_t)n_tok * sz->f + (size_t)t * sz->a32;
        a.q32 = (const int8_t *)p;
        a.ds = (const float *)(p + align_up((size_t)n_in));
        a.s = a.ds + 2 * (n_in / QK32);
    }
    if (sz->ak) {
        uint8_t *p = slot + (size_t)n_tok * (sz->f + sz->a32) + (size_t)t * sz->ak;
        a.qk = (const int8_t *)p;
        a.dk = (const float *)(p + align_up((size_t)n_in));
        a.bsums = (const int16_t *)(p + align_up((size_t)n_in) + align_up((size_t)(n_in / QK_K) * sizeof(float)));
    }
    return a;
}

/* Quantize tokens [t0, t1) of the input into slot. */
static void quantize_tokens(const mm_impl *impl, const mm_input *in, int64_t n_in, int need,
                            uint8_t *slot, const act_sizes *sz, int t0, int t1)
{
    int64_t ldx = in->ldx ? in->ldx : n_in;
    for (int t = t0; t < t1; t++) {
        mm_act a = act_of(slot, sz, n_in, in->n_tok, t);
        const float *x = in->x + (int64_t)t * ldx;
        if (in->up) {
            ops_swiglu((float *)a.f, x, in->up + (int64_t)t * ldx, n_in);
            x = a.f;
        }
        if (in->rms_w) {
            ops_rmsnorm((float *)a.f, x, in->rms_w, n_in, in->rms_eps);
            x = a.f;
        }
        if (need & NEED_A32) impl->quant_a32(x, n_in, (int8_t *)a.q32, (float *)a.ds, (float *)a.s);
        if (need & NEED_AK) impl->quant_ak(x, n_in, (int8_t *)a.qk, (float *)a.dk, (int16_t *)a.bsums);
    }
}

/* The row of job j where the thread boundary at cost B falls (rounded up to ROW_ALIGN). */
static int64_t split_row(double B, double start, double row_cost, int64_t n_out)
{
    double r = ceil((B - start) / row_cost - 1e-9);
    if (r <= 0) return 0;
    int64_t ri = ((int64_t)r + ROW_ALIGN - 1) / ROW_ALIGN * ROW_ALIGN;
    return ri > n_out ? n_out : ri;
}

int mm_run_th(pool_t *pool, int ith, int nth, const mm_input *in, const mm_job *jobs,
              int n_jobs, mm_scratch *ws)
{
    int64_t n_in = 0;
    int need = check_jobs(in, jobs, n_jobs, &n_in);
    if (need < 0 || !ws || nth < 1 || ith < 0 || ith >= nth) return -1;
    int n_tok = in->n_tok;
    if (need_bytes(n_in, n_tok, nth) > ws->cap) return -1;
    const mm_impl *impl = impl_now();
    act_sizes sz = sizes_of(n_in);
    int64_t ldx = in->ldx ? in->ldx : n_in;

    /* 1. activations */
    uint8_t *slot;
    if (private_mode(n_in, n_tok)) {
        slot = ws->buf + (size_t)ith * sz.tok * (size_t)n_tok;
        quantize_tokens(impl, in, n_in, need, slot, &sz, 0, n_tok);
    } else {
        slot = ws->buf;
        int t0 = (int)((int64_t)n_tok * ith / nth), t1 = (int)((int64_t)n_tok * (ith + 1) / nth);
        quantize_tokens(impl, in, n_in, need, slot, &sz, t0, t1);
        if (nth > 1) pool_barrier(pool);
    }

    /* 2. this thread's share of the rows, by bytes of weights */
    double total = 0;
    for (int j = 0; j < n_jobs; j++)
        total += (double)jobs[j].w->n_out * (double)dtype_row_bytes(jobs[j].w->type, n_in);
    double lo = total * ith / nth, hi = total * (ith + 1) / nth, start = 0;
    mm_act acts[TOK_BLOCK];
    for (int j = 0; j < n_jobs; j++) {
        const mm_weight *w = jobs[j].w;
        size_t rb = dtype_row_bytes(w->type, n_in);
        double rc = (double)rb;
        int64_t r0 = ith == 0 ? 0 : split_row(lo, start, rc, w->n_out);
        int64_t r1 = ith == nth - 1 ? w->n_out : split_row(hi, start, rc, w->n_out);
        start += rc * (double)w->n_out;
        if (r0 >= r1) continue;
        mm_kern_fn kern = impl->kern[w->type];
        int64_t ldy = jobs[j].ldy ? jobs[j].ldy : w->n_out;
        for (int t0 = 0; t0 < n_tok; t0 += TOK_BLOCK) {
            int nt = n_tok - t0 < TOK_BLOCK ? n_tok - t0 : TOK_BLOCK;
            for (int t = 0; t < nt; t++) {
                acts[t] = act_of(slot, &sz, n_in, n_tok, t0 + t);
                if (!in->rms_w && !in->up) acts[t].f = in->x + (int64_t)(t0 + t) * ldx;
            }
            for (int64_t r = r0; r < r1; r += ROW_TILE) {
                int nr = (int)(r1 - r < ROW_TILE ? r1 - r : ROW_TILE);
                float *y = jobs[j].y + (int64_t)t0 * ldy + r;
                kern((const uint8_t *)w->data + (size_t)r * rb, rb, nr, acts, nt, n_in, y, ldy, jobs[j].add);
                if (jobs[j].bias)
                    for (int t = 0; t < nt; t++)
                        for (int k = 0; k < nr; k++) y[t * ldy + k] += jobs[j].bias[r + k];
            }
        }
    }
    return 0;
}

typedef struct {
    const mm_input *in;
    const mm_job *jobs;
    int n_jobs;
    mm_scratch *ws;
    pool_t *pool;
    int rc;
} run_ctx;

static void run_fn(void *p, int ith, int nth)
{
    run_ctx *c = p;
    int rc = mm_run_th(c->pool, ith, nth, c->in, c->jobs, c->n_jobs, c->ws);
    if (ith == 0) c->rc = rc;
}

int mm_run(pool_t *pool, const mm_input *in, const mm_job *jobs, int n_jobs, mm_scratch *ws)
{
    int64_t n_in = 0;
    if (!ws || check_jobs(in, jobs, n_jobs, &n_in) < 0) return -1;
    if (mm_scratch_reserve(ws, n_in, in->n_tok, pool_size(pool)) < 0) return -1;
    run_ctx c = {in, jobs, n_jobs, ws, pool, 0};
    pool_run(pool, run_fn, &c);
    return c.rc;
}

int mm_matmul(pool_t *pool, const mm_weight *w, const float *x, int n_tok, float *y,
              mm_scratch *ws)
{
    mm_input in = {.x = x, .n_tok = n_tok};
    mm_job job = {.w = w, .y = y};
    return mm_run(pool, &in, &job, 1, ws);
}
