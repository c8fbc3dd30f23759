/* bench/bench_kernels.c: CPU kernel speed, as Markdown tables.
 *
 *   - memory read and memcpy bandwidth (the roofline for decode);
 *   - pool dispatch + join cost;
 *   - matrix-vector GB/s of weight streaming: "hot" repeats one matrix (it may sit in
 *     cache), "cold" walks enough copies to exceed the last-level cache;
 *   - GFLOP/s of n_tok = 128 products (prefill);
 *   - the matmul part of a SmolLM2-135M Q4_1 decode step (30 layers + output), one
 *     dispatch per product versus one fused dispatch per step.
 * Usage: bench_kernels [seconds per measurement, default 0.3]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "kernels/cpu.h"
#include "kernels/dtype.h"
#include "kernels/matmul.h"
#include "kernels/pool.h"

static double g_secs = 0.3;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* ---- memory bandwidth -------------------------------------------------------------- */

typedef struct {
    const uint64_t *buf;
    size_t n;
    uint64_t sink[16];
} read_ctx;

static void read_fn(void *p, int ith, int nth)
{
    read_ctx *c = p;
    size_t lo = c->n * (size_t)ith / (size_t)nth, hi = c->n * (size_t)(ith + 1) / (size_t)nth;
    uint64_t a = 0, b = 0, d = 0, e = 0;
    for (size_t i = lo; i + 4 <= hi; i += 4) {
        a += c->buf[i];
        b ^= c->buf[i + 1];
        d += c->buf[i + 2];
        e ^= c->buf[i + 3];
    }
    c->sink[ith] = a + b + d + e;
}

static double bench_read(pool_t *pool, size_t bytes)
{
    uint64_t *buf = malloc(bytes);
    memset(buf, 1, bytes);
    read_ctx c = {.buf = buf, .n = bytes / 8};
    pool_run(pool, read_fn, &c);
    int reps = 0;
    double t0 = now_s(), t;
    do {
        pool_run(pool, read_fn, &c);
        reps++;
    } while ((t = now_s() - t0) < g_secs);
    free(buf);
    return (double)bytes * reps / t / 1e9;
}

static double bench_memcpy(size_t bytes)
{
    char *a = malloc(bytes), *b = malloc(bytes);
    memset(a, 1, bytes);
    memset(b, 2, bytes);
    int reps = 0;
    double t0 = now_s(), t;
    do {
        memcpy(b, a, bytes);
        reps++;
    } while ((t = now_s() - t0) < g_secs);
    free(a);
    free(b);
    return (double)bytes * reps / t / 1e9; /* bytes copied (read once, written once) */
}

static void noop_fn(void *p, int ith, int nth) { (void)p; (void)ith; (void)nth; }

typedef struct { pool_t *pool; int n; } bar_ctx;
static void barrier_fn(void *p, int ith, int nth)
{
    (void)ith; (void)nth;
    bar_ctx *c = p;
    for (int i = 0; i < c->n; i++) pool_barrier(c->pool);
}

/* ---- weights ----------------------------------------------------------------------- */

static uint8_t *random_weight(dtype_t t, int64_t n_in, int64_t n_out)
{
    size_t rb = dtype_row_bytes(t, n_in);
    uint8_t *w = aligned_alloc(64, (rb * (size_t)n_out + 63) / 64 * 64);
    float *row = malloc(sizeof(float) * (size_t)n_in);
    uint32_t s = 12345;
    /* quantize a few distinct rows and repeat them (quantizing 28M elements is slow) */
    for (int64_t o = 0; o < n_out; o++) {
        if (o < 64) {
            for (int64_t i = 0; i < n_in; i++) {
                s = s * 1664525u + 1013904223u;
                row[i] = (float)((int32_t)s >> 8) / 8388608.0f;
            }
            dtype_from_f32(t, row, w + (size_t)o * rb, n_in);
        } else {
            memcpy(w + (size_t)o * rb, w + (size_t)(o % 64) * rb, rb);
        }
    }
    free(row);
    return w;
}

static float *random_x(int64_t n)
{
    float *x = malloc(sizeof(float) * (size_t)n);
    for (int64_t i = 0; i < n; i++) x[i] = (float)((i * 7919) % 1000) / 500.0f - 1.0f;
    return x;
}

/* Matvec GB/s over n_copies copies of the matrix, used in turn. */
static double bench_matvec(pool_t *pool, mm_scratch *ws, dtype_t t, int64_t n_in, int64_t n_out,
                           int n_copies)
{
    size_t bytes = dtype_row_bytes(t, n_in) * (size_t)n_out;
    uint8_t *w0 = random_weight(t, n_in, n_out);
    uint8_t **copies = malloc(sizeof(uint8_t *) * (size_t)n_copies);
    for (int i = 0; i < n_copies; i++) {
        copies[i] = i == 0 ? w0 : aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (i) memcpy(copies[i], w0, bytes);
    }
    float *x = random_x(n_in), *y = malloc(sizeof(float) * (size_t)n_out);
    mm_weight w = {.type = t, .n_in = n_in, .n_out = n_out, .data = w0};
    mm_matmul(pool, &w, x, 1, y, ws);
    long reps = 0;
    double t0 = now_s(), el;
    do {
        w.data = copies[reps % n_copies];
        mm_matmul(pool, &w, x, 1, y, ws);
        reps++;
    } while ((el = now_s() - t0) < g_secs);
    for (int i = 0; i < n_copies; i++) free(copies[i]);
    free(copies);
    free(x);
    free(y);
    return (double)bytes * reps / el / 1e9;
}

static double bench_gemm(pool_t *pool, mm_scratch *ws, dtype_t t, int64_t n_in, int64_t n_out, int n_tok)
{
    uint8_t *w0 = random_weight(t, n_in, n_out);
    float *x = random_x(n_in * n_tok), *y = malloc(sizeof(float) * (size_t)(n_out * n_tok));
    mm_weight w = {.type = t, .n_in = n_in, .n_out = n_out, .data = w0};
    mm_matmul(pool, &w, x, n_tok, y, ws);
    long reps = 0;
    double t0 = now_s(), el;
    do {
        mm_matmul(pool, &w, x, n_tok, y, ws);
        reps++;
    } while ((el = now_s() - t0) < g_secs);
    free(w0);
    free(x);
    free(y);
    return 2.0 * (double)n_in * (double)n_out * n_tok * reps / el / 1e9;
}

/* ---- SmolLM2-135M decode step (matmuls only) ----------------------------------------- */

enum { L_EMBD = 576, L_FF = 1536, L_KV = 192, L_LAYERS = 30, L_VOCAB = 49152 };

typedef struct {
    mm_weight wq, wk, wv, wo, wg, wu, wd;
} layer_w;

typedef struct {
    pool_t *pool;
    mm_scratch *ws;
    layer_w *layers;
    mm_weight *out;
    float *x, *q, *k, *v, *g, *u, *logits;
    const float *norm;
} step_ctx;

/* One layer's products; `th` = 1: inside pool_run with barriers (ith/nth valid). */
static void layer_products(step_ctx *c, const layer_w *l, int th, int ith, int nth)
{
    mm_input in = {.x = c->x, .n_tok = 1, .rms_w = c->norm, .rms_eps = 1e-5f};
    mm_job qkv[3] = {{.w = &l->wq, .y = c->q}, {.w = &l->wk, .y = c->k}, {.w = &l->wv, .y = c->v}};
    mm_input in_o = {.x = c->q, .n_tok = 1};
    mm_job o = {.w = &l->wo, .y = c->x, .add = 1};
    mm_job gu[2] = {{.w = &l->wg, .y = c->g}, {.w = &l->wu, .y = c->u}};
    mm_input in_d = {.x = c->g, .n_tok = 1};
    mm_job d = {.w = &l->wd, .y = c->x, .add = 1};
    if (!th) {
        mm_run(c->pool, &in, qkv, 3, c->ws);
        mm_run(c->pool, &in_o, &o, 1, c->ws);
        mm_run(c->pool, &in, gu, 2, c->ws);
        mm_run(c->pool, &in_d, &d, 1, c->ws);
        return;
    }
    mm_run_th(c->pool, ith, nth, &in, qkv, 3, c->ws);
    pool_barrier(c->pool);
    mm_run_th(c->pool, ith, nth, &in_o, &o, 1, c->ws);
    pool_barrier(c->pool);
    mm_run_th(c->pool, ith, nth, &in, gu, 2, c->ws);
    pool_barrier(c->pool);
    mm_run_th(c->pool, ith, nth, &in_d, &d, 1, c->ws);
    pool_barrier(c->pool);
}

static void step_fn(void *p, int ith, int nth)
{
    step_ctx *c = p;
    for (int i = 0; i < L_LAYERS; i++) layer_products(c, &c->layers[i], 1, ith, nth);
    mm_input in = {.x = c->x, .n_tok = 1, .rms_w = c->norm, .rms_eps = 1e-5f};
    mm_job j = {.w = c->out, .y = c->logits};
    mm_run_th(c->pool, ith, nth, &in, &j, 1, c->ws);
}

static void bench_smollm(pool_t *pool, mm_scratch *ws, double *per_op_ms, double *fused_ms)
{
    dtype_t t = DTYPE_Q4_1;
    layer_w *layers = calloc(L_LAYERS, sizeof *layers);
    uint8_t *proto[7];
    int64_t dims[7][2] = {{L_EMBD, L_EMBD}, {L_EMBD, L_KV}, {L_EMBD, L_KV}, {L_EMBD, L_EMBD},
                          {L_EMBD, L_FF}, {L_EMBD, L_FF}, {L_FF, L_EMBD}};
    for (int k = 0; k < 7; k++) proto[k] = random_weight(t, dims[k][0], dims[k][1]);
    for (int i = 0; i < L_LAYERS; i++) {
        mm_weight *ws7[7] = {&layers[i].wq, &layers[i].wk, &layers[i].wv, &layers[i].wo,
                             &layers[i].wg, &layers[i].wu, &layers[i].wd};
        for (int k = 0; k < 7; k++) {
            size_t bytes = dtype_row_bytes(t, dims[k][0]) * (size_t)dims[k][1];
            void *d = aligned_alloc(64, (bytes + 63) / 64 * 64);
            memcpy(d, proto[k], bytes);
            *ws7[k] = (mm_weight){.type = t, .n_in = dims[k][0], .n_out = dims[k][1], .data = d};
        }
    }
    mm_weight out = {.type = t, .n_in = L_EMBD, .n_out = L_VOCAB, .data = random_weight(t, L_EMBD, L_VOCAB)};
    float *norm = random_x(L_EMBD);
    for (int i = 0; i < L_EMBD; i++) norm[i] = 1.0f + 0.1f * norm[i];
    step_ctx c = {.pool = pool, .ws = ws, .layers = layers, .out = &out, .norm = norm,
                  .x = random_x(L_EMBD), .q = calloc(L_EMBD, 4), .k = calloc(L_KV, 4), .v = calloc(L_KV, 4),
                  .g = calloc(L_FF, 4), .u = calloc(L_FF, 4), .logits = calloc(L_VOCAB, 4)};
    float *x0 = random_x(L_EMBD);
    mm_scratch_reserve(ws, L_FF, 1, pool_size(pool));
    for (int mode = 0; mode < 2; mode++) {
        long reps = 0;
        double t0 = now_s(), el, best = 1e9;
        do {
            double ts = now_s();
            memcpy(c.x, x0, sizeof(float) * L_EMBD); /* keep the values bounded */
            if (mode == 0) {
                for (int i = 0; i < L_LAYERS; i++) layer_products(&c, &layers[i], 0, 0, 1);
                mm_input in = {.x = c.x, .n_tok = 1, .rms_w = norm, .rms_eps = 1e-5f};
                mm_job j = {.w = &out, .y = c.logits};
                mm_run(pool, &in, &j, 1, ws);
            } else {
                pool_run(pool, step_fn, &c);
            }
            reps++;
            if (now_s() - ts < best) best = now_s() - ts;
        } while ((el = now_s() - t0) < 3 * g_secs);
        (void)reps;
        *(mode == 0 ? per_op_ms : fused_ms) = best * 1e3; /* best step: robust to other load */
    }
    for (int i = 0; i < L_LAYERS; i++) {
        free((void *)layers[i].wq.data); free((void *)layers[i].wk.data); free((void *)layers[i].wv.data);
        free((void *)layers[i].wo.data); free((void *)layers[i].wg.data); free((void *)layers[i].wu.data);
        free((void *)layers[i].wd.data);
    }
    for (int k = 0; k < 7; k++) free(proto[k]);
    free(layers); free((void *)out.data); free(norm); free(x0);
    free(c.x); free(c.q); free(c.k); free(c.v); free(c.g); free(c.u); free(c.logits);
}

int main(int argc, char **argv)
{
    if (argc > 1) g_secs = atof(argv[1]);
    if (g_secs <= 0) g_secs = 0.3;
    pool_t *pools[3] = {NULL, NULL, NULL};
    pool_new(1, &pools[1]);
    pool_new(2, &pools[2]);
    mm_scratch *ws;
    mm_scratch_new(&ws);

    printf("## duet CPU kernels (%s path)\n\n", cpu_path_name());
    printf("| memory | 1 thread | 2 threads |\n|---|---|---|\n");
    size_t big = (size_t)256 << 20;
    printf("| read 256 MiB (GB/s) | %.1f | %.1f |\n", bench_read(pools[1], big), bench_read(pools[2], big));
    printf("| memcpy 256 MiB (GB/s copied) | %.1f | - |\n", bench_memcpy(big));
    printf("| read 1 MiB, cache (GB/s) | %.1f | %.1f |\n\n", bench_read(pools[1], 1 << 20), bench_read(pools[2], 1 << 20));

    {
        long reps = 0;
        double t0 = now_s(), el;
        do { pool_run(pools[2], noop_fn, NULL); reps++; } while ((el = now_s() - t0) < g_secs);
        bar_ctx bc = {pools[2], 1000};
        double t1 = now_s();
        for (int i = 0; i < 20; i++) pool_run(pools[2], barrier_fn, &bc);
        double bel = now_s() - t1;
        printf("| pool, 2 threads | µs |\n|---|---|\n| empty pool_run (dispatch + join) | %.2f |\n"
               "| pool_barrier | %.2f |\n\n", el / reps * 1e6, bel / (20.0 * bc.n) * 1e6);
    }

    struct { dtype_t t; int64_t n_in, n_out; const char *what; } mv[] = {
        {DTYPE_Q4_1, 576, 1536, "ffn gate/up"},
        {DTYPE_Q4_1, 1536, 576, "ffn down"},
        {DTYPE_Q4_1, 576, 49152, "output"},
        {DTYPE_Q4_K, 4096, 4096, "8B attn"},
        {DTYPE_Q6_K, 4096, 4096, "8B (Q6_K)"},
        {DTYPE_Q8_0, 4096, 4096, "8B (Q8_0)"},
        {DTYPE_F16, 2048, 2048, "f16"},
    };
    printf("| matvec GB/s of weights (n_in x n_out) | type | MB | hot 1T | hot 2T | cold 1T | cold 2T |\n"
           "|---|---|---|---|---|---|---|\n");
    for (size_t i = 0; i < sizeof mv / sizeof *mv; i++) {
        double mb = (double)dtype_row_bytes(mv[i].t, mv[i].n_in) * mv[i].n_out / 1e6;
        int copies = (int)(160.0 / mb) + 1; /* about 160 MB: past the last-level cache */
        if (copies > 400) copies = 400;
        printf("| %lldx%lld %s | %s | %.2f | %.1f | %.1f | %.1f | %.1f |\n", (long long)mv[i].n_in,
               (long long)mv[i].n_out, mv[i].what, dtype_name(mv[i].t), mb,
               bench_matvec(pools[1], ws, mv[i].t, mv[i].n_in, mv[i].n_out, 1),
               bench_matvec(pools[2], ws, mv[i].t, mv[i].n_in, mv[i].n_out, 1),
               bench_matvec(pools[1], ws, mv[i].t, mv[i].n_in, mv[i].n_out, copies),
               bench_matvec(pools[2], ws, mv[i].t, mv[i].n_in, mv[i].n_out, copies));
    }

    struct { dtype_t t; int64_t n_in, n_out; } gm[] = {
        {DTYPE_Q4_1, 576, 1536}, {DTYPE_Q4_0, 2048, 2048}, {DTYPE_Q8_0, 2048, 2048},
        {DTYPE_Q4_K, 4096, 4096}, {DTYPE_Q6_K, 4096, 4096}, {DTYPE_F16, 2048, 2048},
        {DTYPE_BF16, 2048, 2048}, {DTYPE_F32, 2048, 2048},
    };
    printf("\n| matmul n_tok=128 GFLOP/s (n_in x n_out) | type | 1 thread | 2 threads |\n|---|---|---|---|\n");
    for (size_t i = 0; i < sizeof gm / sizeof *gm; i++)
        printf("| %lldx%lld | %s | %.1f | %.1f |\n", (long long)gm[i].n_in, (long long)gm[i].n_out,
               dtype_name(gm[i].t), bench_gemm(pools[1], ws, gm[i].t, gm[i].n_in, gm[i].n_out, 128),
               bench_gemm(pools[2], ws, gm[i].t, gm[i].n_in, gm[i].n_out, 128));

    double per_op[3], fused[3];
    for (int n = 1; n <= 2; n++) bench_smollm(pools[n], ws, &per_op[n], &fused[n]);
    printf("\n| SmolLM2-135M Q4_1 decode step, matmuls only (%.1f MB of weights) | 1 thread | 2 threads |\n"
           "|---|---|---|\n", (double)dtype_row_bytes(DTYPE_Q4_1, L_EMBD) *
                                  (L_LAYERS * (2.0 * L_EMBD + 2 * L_KV + 3 * L_FF) + L_VOCAB) / 1e6);
    printf("| one pool_run per product (best ms/token) | %.3f | %.3f |\n", per_op[1], per_op[2]);
    printf("| one fused pool_run per step (best ms/token) | %.3f | %.3f |\n", fused[1], fused[2]);
    printf("| fused: tokens/s bound | %.0f | %.0f |\n", 1e3 / fused[1], 1e3 / fused[2]);

    mm_scratch_destroy(&ws);
    pool_destroy(&pools[1]);
    pool_destroy(&pools[2]);
    return 0;
}
