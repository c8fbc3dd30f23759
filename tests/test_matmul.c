/* tests/test_matmul.c: mm_* against double-precision references, every weight type,
 * shapes from one token to several token blocks, 1 to 3 threads, both code paths.
 *
 * Two references per case: (tight) the dequantized weights times the activations as the
 * kernels quantize them, which checks the integer kernels to float rounding; (loose) the
 * dequantized weights times the f32 activations, which bounds the activation
 * quantization error. Errors are normalized: ||y - ref||_2 over the output divided by
 * the root of the sum of every product w_oi * x_ti squared (the scale of the inputs,
 * which does not vanish when a dot product cancels).
 * The binary runs itself again with DUET_NO_AVX512=1 (AVX2 without VNNI) and with
 * DUET_NO_AVX2=1 (portable) to cover every path the processor has.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kernels/cpu.h"
#include "kernels/dtype.h"
#include "kernels/matmul.h"
#include "kernels/matmul_internal.h"
#include "kernels/pool.h"
#include "kernels/quant.h"

#define TIGHT_BOUND 2e-5   /* same quantized inputs: float rounding only */

/* Activation quantization bounds (relative RMS error of the output). */
static double loose_bound(dtype_t t)
{
    switch (t) {
    case DTYPE_F32: case DTYPE_F16: case DTYPE_BF16: return 2e-5;
    default: return 0.02;
    }
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) /* uniform in [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

typedef struct {
    dtype_t type;
    int64_t n_in, n_out;
    uint8_t *data;    /* quantized rows */
    float *deq;       /* [n_out][n_in] dequantized */
    mm_weight w;
} test_w;

static void make_weight(test_w *tw, dtype_t t, int64_t n_in, int64_t n_out)
{
    size_t rb = dtype_row_bytes(t, n_in);
    assert_true(rb > 0);
    tw->type = t;
    tw->n_in = n_in;
    tw->n_out = n_out;
    tw->data = malloc(rb * (size_t)n_out + 1);
    tw->deq = malloc(sizeof(float) * (size_t)(n_in * n_out));
    float *row = malloc(sizeof(float) * (size_t)n_in);
    assert_non_null(tw->data);
    for (int64_t o = 0; o < n_out; o++) {
        float scale = 0.5f + (float)(o % 5) * 0.3f;
        for (int64_t i = 0; i < n_in; i++) row[i] = frand() * scale + (i % 11 == 0 ? 0.3f : 0.0f);
        assert_int_equal(dtype_from_f32(t, row, tw->data + (size_t)o * rb, n_in), 0);
        assert_int_equal(dtype_to_f32(t, tw->data + (size_t)o * rb, tw->deq + o * n_in, n_in), 0);
    }
    free(row);
    tw->w = (mm_weight){.type = t, .n_in = n_in, .n_out = n_out, .data = tw->data};
}

static void free_weight(test_w *tw)
{
    free(tw->data);
    free(tw->deq);
}

/* x as the kernels see it for weight type t: quantized and dequantized (portable quantizers,
 * which the AVX2 ones match bit for bit). */
static void act_as_kernel_sees(dtype_t t, const float *x, int64_t n, float *out, float *s_corr)
{
    const mm_impl *p = mm_impl_portable();
    int8_t *q = malloc((size_t)n);
    float *ds = malloc(sizeof(float) * (size_t)(n / 32 + 1) * 2), *s = malloc(sizeof(float) * (size_t)(n / 32 + 1));
    float *d = malloc(sizeof(float) * (size_t)(n / 256 + 1));
    int16_t *bs = malloc(sizeof(int16_t) * (size_t)(n / 16 + 1));
    switch (t) {
    case DTYPE_Q4_0: case DTYPE_Q4_1: case DTYPE_Q8_0:
        p->quant_a32(x, n, q, ds, s);
        for (int64_t i = 0; i < n; i++) out[i] = ds[2 * (i / 32)] * (float)q[i];
        /* Q4_1's offset term uses s (d * sum(q) rounded to f16), not d_f16 * sum(q) */
        for (int64_t b = 0; b < n / 32; b++) {
            int sum = 0;
            for (int j = 0; j < 32; j++) sum += q[32 * b + j];
            s_corr[b] = s[b] - ds[2 * b] * (float)sum;
        }
        break;
    case DTYPE_Q4_K: case DTYPE_Q6_K:
        p->quant_ak(x, n, q, d, bs);
        for (int64_t i = 0; i < n; i++) out[i] = d[i / 256] * (float)q[i];
        for (int64_t g = 0; g < n / 16; g++) {
            int sum = 0;
            for (int j = 0; j < 16; j++) sum += q[16 * g + j];
            assert_int_equal(sum, bs[g]);
        }
        break;
    default:
        memcpy(out, x, sizeof(float) * (size_t)n);
    }
    free(q); free(ds); free(s); free(d); free(bs);
}

/* ref[t][o] = sum_i W[o][i] * x[t][i] in double; *scale (optional) = sqrt of the sum of
 * every product squared, the size against which errors are normalized (unlike ||ref||
 * it does not shrink when a dot product cancels). */
static void reference(const test_w *tw, const float *x, int n_tok, double *ref, double *scale)
{
    double sq = 0;
    for (int t = 0; t < n_tok; t++)
        for (int64_t o = 0; o < tw->n_out; o++) {
            double s = 0;
            for (int64_t i = 0; i < tw->n_in; i++) {
                double p = (double)tw->deq[o * tw->n_in + i] * x[t * tw->n_in + i];
                s += p;
                sq += p * p;
            }
            ref[t * tw->n_out + o] = s;
        }
    if (scale) *scale = sqrt(sq);
}

/* ||y - ref|| / scale */
static double rel_err(const float *y, const double *ref, int64_t n, double scale)
{
    double e = 0;
    for (int64_t i = 0; i < n; i++) e += (y[i] - ref[i]) * (y[i] - ref[i]);
    return sqrt(e) / (scale > 0 ? scale : 1);
}

static void check_case(dtype_t t, int64_t n_in, int64_t n_out, int n_tok, pool_t **pools, int n_pools,
                       mm_scratch *ws)
{
    test_w tw;
    make_weight(&tw, t, n_in, n_out);
    int64_t nx = n_in * n_tok, ny = n_out * n_tok;
    float *x = malloc(sizeof(float) * (size_t)nx), *xq = calloc((size_t)nx, sizeof(float));
    float *y = malloc(sizeof(float) * (size_t)ny);
    double *ref = malloc(sizeof(double) * (size_t)ny), *refq = malloc(sizeof(double) * (size_t)ny);
    for (int64_t i = 0; i < nx; i++) x[i] = frand() * (i % 13 == 0 ? 3.0f : 1.0f);
    float *corr = calloc((size_t)(n_tok * (n_in / 32 + 1)), sizeof(float));
    for (int k = 0; k < n_tok; k++) act_as_kernel_sees(t, x + k * n_in, n_in, xq + k * n_in, corr + k * (n_in / 32 + 1));
    double scale, scaleq;
    reference(&tw, x, n_tok, ref, &scale);
    reference(&tw, xq, n_tok, refq, &scaleq);
    if (t == DTYPE_Q4_1) {
        size_t rb = dtype_row_bytes(t, n_in);
        for (int k = 0; k < n_tok; k++)
            for (int64_t o = 0; o < n_out; o++)
                for (int64_t b = 0; b < n_in / 32; b++) {
                    const blk_q4_1 *blk = (const blk_q4_1 *)(tw.data + (size_t)o * rb) + b;
                    refq[k * n_out + o] += (double)fp16_to_f32(blk->m) * corr[k * (n_in / 32 + 1) + b];
                }
    }
    free(corr);
    for (int p = 0; p < n_pools; p++) {
        for (int64_t i = 0; i < ny; i++) y[i] = NAN;
        assert_int_equal(mm_matmul(pools[p], &tw.w, x, n_tok, y, ws), 0);
        double et = rel_err(y, refq, ny, scaleq), el = rel_err(y, ref, ny, scale);
        if (et > TIGHT_BOUND || el > loose_bound(t) || isnan(et))
            print_error("%s n_in %lld n_out %lld n_tok %d threads %d (%s): tight %.3g loose %.3g\n",
                        dtype_name(t), (long long)n_in, (long long)n_out, n_tok, pool_size(pools[p]),
                        cpu_path_name(), et, el);
        assert_true(et <= TIGHT_BOUND);
        assert_true(el <= loose_bound(t));
    }
    free(x); free(xq); free(y); free(ref); free(refq);
    free_weight(&tw);
}

typedef struct {
    pool_t *pools[4];   /* NULL (no pool), 1, 2 and 3 threads */
    mm_scratch *ws;
} fixture;

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f) return -1;
    for (int i = 1; i <= 3; i++)
        if (pool_new(i, &f->pools[i]) != 0) return -1;
    if (mm_scratch_new(&f->ws) != 0) return -1;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    for (int i = 0; i < 4; i++) pool_destroy(&f->pools[i]);
    mm_scratch_destroy(&f->ws);
    mm_scratch_destroy(&f->ws);
    free(f);
    return 0;
}

typedef struct { int64_t n_in, n_out; int n_tok; } shape;

static void run_shapes(void **state, dtype_t t, const shape *sh, int n)
{
    fixture *f = *state;
    for (int i = 0; i < n; i++) check_case(t, sh[i].n_in, sh[i].n_out, sh[i].n_tok, f->pools, 4, f->ws);
}

static const shape shapes32[] = {
    {32, 1, 1}, {64, 7, 1}, {96, 13, 2}, {576, 37, 3}, {256, 33, 5}, {512, 64, 9},
    {1536, 21, 4}, {576, 8, 1}, {2048, 11, 70}, {32, 5, 130}, {32800, 3, 1},
};
static const shape shapes256[] = {
    {256, 1, 1}, {512, 9, 4}, {768, 33, 7}, {256, 6, 3}, {1024, 11, 66}, {2304, 5, 1},
    {256, 4, 129},
};
static const shape shapes_f[] = {
    {1, 1, 1}, {13, 5, 3}, {40, 9, 4}, {576, 19, 6}, {100, 3, 9}, {64, 8, 1}, {520, 7, 69},
};

static void test_q4_0(void **s) { run_shapes(s, DTYPE_Q4_0, shapes32, sizeof shapes32 / sizeof *shapes32); }
static void test_q4_1(void **s) { run_shapes(s, DTYPE_Q4_1, shapes32, sizeof shapes32 / sizeof *shapes32); }
static void test_q8_0(void **s) { run_shapes(s, DTYPE_Q8_0, shapes32, sizeof shapes32 / sizeof *shapes32); }
static void test_q4_k(void **s) { run_shapes(s, DTYPE_Q4_K, shapes256, sizeof shapes256 / sizeof *shapes256); }
static void test_q6_k(void **s) { run_shapes(s, DTYPE_Q6_K, shapes256, sizeof shapes256 / sizeof *shapes256); }
static void test_f32(void **s) { run_shapes(s, DTYPE_F32, shapes_f, sizeof shapes_f / sizeof *shapes_f); }
static void test_f16(void **s) { run_shapes(s, DTYPE_F16, shapes_f, sizeof shapes_f / sizeof *shapes_f); }
static void test_bf16(void **s) { run_shapes(s, DTYPE_BF16, shapes_f, sizeof shapes_f / sizeof *shapes_f); }

/* Several weights of different types on one RMS-normalized input, with strides and
 * accumulation, through mm_run and through mm_run_th inside a pool_run. */
typedef struct {
    pool_t *pool;
    const mm_input *in;
    const mm_job *jobs;
    int n_jobs;
    mm_scratch *ws;
    int rc[3];
} th_ctx;

static void th_fn(void *p, int ith, int nth)
{
    th_ctx *c = p;
    c->rc[ith] = mm_run_th(c->pool, ith, nth, c->in, c->jobs, c->n_jobs, c->ws);
    pool_barrier(nth > 1 ? c->pool : NULL);
    /* a second, dependent product in the same dispatch: reuse the scratch after a barrier */
    int rc2 = mm_run_th(c->pool, ith, nth, c->in, c->jobs + 1, 1, c->ws);
    if (rc2 != 0) c->rc[ith] = rc2;
}

static void test_multi(void **state)
{
    fixture *f = *state;
    const int64_t n_in = 512;
    dtype_t types[4] = {DTYPE_Q4_1, DTYPE_Q4_K, DTYPE_F16, DTYPE_Q6_K};
    int64_t outs[4] = {37, 20, 9, 16};
    test_w tw[4];
    for (int j = 0; j < 4; j++) make_weight(&tw[j], types[j], n_in, outs[j]);
    for (int n_tok = 1; n_tok <= 70; n_tok += 23) {
        const int64_t ldx = n_in + 3, ldy = 100;
        float *x = malloc(sizeof(float) * (size_t)(ldx * n_tok)), *xn = malloc(sizeof(float) * (size_t)(n_in * n_tok));
        float *rms_w = malloc(sizeof(float) * n_in), bias[64];
        for (int i = 0; i < 64; i++) bias[i] = frand() * 10.0f;
        for (int64_t i = 0; i < ldx * n_tok; i++) x[i] = frand() * 2.0f;
        for (int64_t i = 0; i < n_in; i++) rms_w[i] = 0.5f + frand() * 0.25f;
        for (int t = 0; t < n_tok; t++) {
            double ss = 0;
            for (int64_t i = 0; i < n_in; i++) ss += (double)x[t * ldx + i] * x[t * ldx + i];
            double sc = 1.0 / sqrt(ss / n_in + 1e-5);
            for (int64_t i = 0; i < n_in; i++) xn[t * n_in + i] = (float)(x[t * ldx + i] * sc * rms_w[i]);
        }
        float *ys[4];
        double *refs[4];
        mm_job jobs[4];
        for (int j = 0; j < 4; j++) {
            ys[j] = malloc(sizeof(float) * (size_t)(ldy * n_tok));
            refs[j] = malloc(sizeof(double) * (size_t)(outs[j] * n_tok));
            reference(&tw[j], xn, n_tok, refs[j], NULL);
            jobs[j] = (mm_job){.w = &tw[j].w, .y = ys[j], .ldy = ldy, .add = j == 1, .bias = j == 2 ? bias : NULL};
            if (j == 2)
                for (int t = 0; t < n_tok; t++)
                    for (int64_t o = 0; o < outs[j]; o++) refs[j][t * outs[j] + o] += bias[o];
        }
        mm_input in = {.x = x, .n_tok = n_tok, .ldx = ldx, .rms_w = rms_w, .rms_eps = 1e-5f};
        for (int p = 0; p < 4; p++) {
            for (int j = 0; j < 4; j++)
                for (int64_t i = 0; i < ldy * n_tok; i++) ys[j][i] = j == 1 ? 1.0f : NAN;
            assert_int_equal(mm_run(f->pools[p], &in, jobs, 4, f->ws), 0);
            for (int j = 0; j < 4; j++) {
                double e = 0, r = 0;
                for (int t = 0; t < n_tok; t++)
                    for (int64_t o = 0; o < outs[j]; o++) {
                        double want = refs[j][t * outs[j] + o] + (j == 1 ? 1.0 : 0.0);
                        double d = ys[j][t * ldy + o] - want;
                        e += d * d;
                        r += want * want;
                    }
                assert_true(sqrt(e / r) < loose_bound(types[j]) * 2 + 1e-4);
                /* columns past n_out untouched */
                assert_true(j == 1 ? ys[j][outs[j]] == 1.0f : isnan(ys[j][outs[j]]));
            }
            /* the in-pool variant gives the same numbers (job 1 accumulates twice there) */
            if (p > 0) {
                float *copy = malloc(sizeof(float) * (size_t)(ldy * n_tok));
                memcpy(copy, ys[0], sizeof(float) * (size_t)(ldy * n_tok));
                for (int64_t i = 0; i < ldy * n_tok; i++) ys[1][i] = 0.0f;
                assert_int_equal(mm_scratch_reserve(f->ws, n_in, n_tok, pool_size(f->pools[p])), 0);
                th_ctx c = {.pool = f->pools[p], .in = &in, .jobs = jobs, .n_jobs = 4, .ws = f->ws};
                pool_run(f->pools[p], th_fn, &c);
                for (int i = 0; i < pool_size(f->pools[p]); i++) assert_int_equal(c.rc[i], 0);
                for (int t = 0; t < n_tok; t++)
                    for (int64_t o = 0; o < outs[0]; o++) assert_float_equal(copy[t * ldy + o], ys[0][t * ldy + o], 1e-5);
                double e = 0, r = 0;
                for (int t = 0; t < n_tok; t++)
                    for (int64_t o = 0; o < outs[1]; o++) {
                        double want = 2 * refs[1][t * outs[1] + o], d = ys[1][t * ldy + o] - want;
                        e += d * d;
                        r += want * want;
                    }
                assert_true(sqrt(e / r) < loose_bound(DTYPE_Q4_K) * 2);
                free(copy);
            }
        }
        for (int j = 0; j < 4; j++) { free(ys[j]); free(refs[j]); }
        free(x); free(xn); free(rms_w);
    }
    for (int j = 0; j < 4; j++) free_weight(&tw[j]);
}

/* SwiGLU fused into the input: silu(g) * u times W, against the reference on that vector. */
static void test_swiglu_input(void **state)
{
    fixture *f = *state;
    const int64_t n_in = 512, n_out = 40;
    test_w tw;
    make_weight(&tw, DTYPE_Q4_1, n_in, n_out);
    for (int n_tok = 1; n_tok <= 70; n_tok += 69) {
        float *g = malloc(sizeof(float) * (size_t)(n_in * n_tok)), *u = malloc(sizeof(float) * (size_t)(n_in * n_tok));
        float *h = malloc(sizeof(float) * (size_t)(n_in * n_tok)), *y = malloc(sizeof(float) * (size_t)(n_out * n_tok));
        double *ref = malloc(sizeof(double) * (size_t)(n_out * n_tok)), scale;
        for (int64_t i = 0; i < n_in * n_tok; i++) {
            g[i] = frand() * 4.0f;
            u[i] = frand();
            h[i] = (float)(g[i] / (1.0 + exp(-(double)g[i])) * u[i]);
        }
        reference(&tw, h, n_tok, ref, &scale);
        mm_input in = {.x = g, .up = u, .n_tok = n_tok};
        mm_job job = {.w = &tw.w, .y = y};
        for (int p = 0; p < 4; p++) {
            assert_int_equal(mm_run(f->pools[p], &in, &job, 1, f->ws), 0);
            assert_true(rel_err(y, ref, n_out * n_tok, scale) < loose_bound(DTYPE_Q4_1));
        }
        free(g); free(u); free(h); free(y); free(ref);
    }
    free_weight(&tw);
}

/* A token's outputs are bit-identical whatever the batch around it: every row of a
 * 9-token product (tiles of 4 plus a single) equals that token computed alone, for every
 * type, thread count and code path. */
static void test_batch_invariance(void **state)
{
    fixture *f = *state;
    dtype_t types[] = {DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q8_0, DTYPE_Q4_K, DTYPE_Q6_K, DTYPE_F32, DTYPE_F16, DTYPE_BF16};
    const int n_tok = 9;
    for (size_t k = 0; k < sizeof types / sizeof *types; k++) {
        const int64_t n_in = 768, n_out = 21;
        test_w tw;
        make_weight(&tw, types[k], n_in, n_out);
        float *x = malloc(sizeof(float) * (size_t)(n_in * n_tok));
        float *yb = malloc(sizeof(float) * (size_t)(n_out * n_tok)), *y1 = malloc(sizeof(float) * (size_t)n_out);
        for (int64_t i = 0; i < n_in * n_tok; i++) x[i] = frand() * 2.0f;
        for (int p = 0; p < 4; p++) {
            assert_int_equal(mm_matmul(f->pools[p], &tw.w, x, n_tok, yb, f->ws), 0);
            for (int t = 0; t < n_tok; t++) {
                assert_int_equal(mm_matmul(f->pools[p], &tw.w, x + t * n_in, 1, y1, f->ws), 0);
                if (memcmp(y1, yb + t * n_out, sizeof(float) * (size_t)n_out) != 0)
                    print_error("%s: token %d differs alone vs in a batch (%s, %d threads)\n",
                                dtype_name(types[k]), t, cpu_path_name(), pool_size(f->pools[p]));
                assert_memory_equal(y1, yb + t * n_out, sizeof(float) * (size_t)n_out);
            }
        }
        free(x); free(yb); free(y1);
        free_weight(&tw);
    }
}

static void test_errors(void **state)
{
    fixture *f = *state;
    test_w a, b;
    make_weight(&a, DTYPE_Q4_1, 64, 4);
    make_weight(&b, DTYPE_Q4_K, 256, 4);
    float x[256 * 2] = {0}, y[64];
    mm_weight bad = a.w;
    bad.type = DTYPE_Q8_1;
    assert_int_equal(mm_matmul(f->pools[2], &bad, x, 1, y, f->ws), -1);
    assert_false(mm_supported(DTYPE_Q8_K));
    assert_true(mm_supported(DTYPE_Q6_K));
    bad = a.w;
    bad.n_in = 48; /* not a multiple of 32 */
    assert_int_equal(mm_matmul(f->pools[2], &bad, x, 1, y, f->ws), -1);
    assert_int_equal(mm_matmul(f->pools[2], &a.w, x, 0, y, f->ws), -1);
    mm_job jobs[2] = {{.w = &a.w, .y = y}, {.w = &b.w, .y = y}};
    mm_input in = {.x = x, .n_tok = 1};
    assert_int_equal(mm_run(NULL, &in, jobs, 2, f->ws), -1); /* n_in differs */
    /* a fresh scratch is too small for mm_run_th */
    mm_scratch *small;
    assert_int_equal(mm_scratch_new(&small), 0);
    assert_int_equal(mm_run_th(NULL, 0, 1, &in, jobs, 1, small), -1);
    assert_int_equal(mm_scratch_reserve(small, 64, 1, 1), 0);
    assert_int_equal(mm_run_th(NULL, 0, 1, &in, jobs, 1, small), 0);
    assert_int_equal(mm_run_th(NULL, 0, 2, &in, jobs, 1, small), -1); /* reserved for 1 thread */
    mm_scratch_destroy(&small);
    assert_null(small);
    free_weight(&a);
    free_weight(&b);
}

/* ---- pool --------------------------------------------------------------------------- */

typedef struct {
    pool_t *pool;
    int counts[4];
    int seen[4][64];
    int nested_nth;
} pool_ctx;

static void nested_fn(void *p, int ith, int nth)
{
    pool_ctx *c = p;
    (void)ith;
    c->nested_nth = nth;
}

static void pool_fn_steps(void *p, int ith, int nth)
{
    pool_ctx *c = p;
    c->counts[ith]++;
    /* step s: every thread writes its slot, then after a barrier checks all the others */
    for (int s = 0; s < 64; s++) {
        c->seen[ith][s] = s + 1;
        pool_barrier(nth > 1 ? c->pool : NULL);
        for (int o = 0; o < nth; o++) assert_int_equal(c->seen[o][s], s + 1);
        pool_barrier(nth > 1 ? c->pool : NULL);
    }
    if (ith == 0) pool_run(c->pool, nested_fn, c); /* busy: runs inline with nth 1 */
}

static void test_pool(void **state)
{
    fixture *f = *state;
    for (int p = 0; p < 4; p++) {
        pool_ctx c = {.pool = f->pools[p], .nested_nth = -1};
        int reps = p == 3 ? 20 : 200; /* 3 threads on 2 cores: every barrier may sleep */
        for (int rep = 0; rep < reps; rep++) pool_run(f->pools[p], pool_fn_steps, &c);
        for (int i = 0; i < pool_size(f->pools[p]); i++) assert_int_equal(c.counts[i], reps);
        assert_int_equal(c.nested_nth, 1);
    }
    /* workers that fell asleep wake up */
    pool_set_spin_us(f->pools[3], 0);
    pool_ctx c = {.pool = f->pools[3]};
    for (int rep = 0; rep < 20; rep++) {
        usleep(2000);
        pool_run(f->pools[3], pool_fn_steps, &c);
    }
    for (int i = 0; i < 3; i++) assert_int_equal(c.counts[i], 20);
    pool_set_spin_us(f->pools[3], 200);
    pool_t *p = NULL;
    assert_int_equal(pool_new(0, &p), -1);
    assert_null(p);
    assert_int_equal(pool_new(2, &p), 0);
    pool_destroy(&p);
    assert_null(p);
    pool_destroy(&p);
    assert_int_equal(pool_size(NULL), 1);
}

int main(int argc, char **argv)
{
    (void)argc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_q4_0), cmocka_unit_test(test_q4_1), cmocka_unit_test(test_q8_0),
        cmocka_unit_test(test_q4_k), cmocka_unit_test(test_q6_k), cmocka_unit_test(test_f32),
        cmocka_unit_test(test_f16),  cmocka_unit_test(test_bf16), cmocka_unit_test(test_multi),
        cmocka_unit_test(test_swiglu_input), cmocka_unit_test(test_batch_invariance), cmocka_unit_test(test_errors), cmocka_unit_test(test_pool),
    };
    fprintf(stderr, "test_matmul: %s path\n", cpu_path_name());
    int rc = cmocka_run_group_tests_name(cpu_use_vnni() ? "matmul_avx2_vnni" : cpu_use_avx2() ? "matmul_avx2" : "matmul_portable", tests, setup, teardown);
    /* the other paths, each in a child: AVX2 without VNNI, then portable */
    if (!getenv("DUET_NO_AVX2") && !getenv("DUET_NO_AVX512")) {
        const char *vars[2] = {cpu_use_vnni() ? "DUET_NO_AVX512" : NULL, cpu_use_avx2() ? "DUET_NO_AVX2" : NULL};
        for (int v = 0; v < 2; v++) {
            if (!vars[v]) continue;
            fflush(stdout);
            fflush(stderr);
            pid_t pid = fork();
            if (pid == 0) {
                setenv(vars[v], "1", 1);
                execv("/proc/self/exe", argv);
                _exit(127);
            }
            int st = 0;
            if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) rc = rc ? rc : 1;
        }
    }
    return rc;
}
