/* tests/test_gpu_ops.c: every CUDA kernel against the CPU backend, on random inputs of
 * several shapes (needs an NVIDIA GPU; without one every test is skipped with the reason,
 * and under `make test-gpu` (DUET_REQUIRE_GPU=1) a missing GPU is a failure).
 *
 * Error measure: ||gpu - cpu|| / ||cpu|| over the whole output (normalized L2), NaN never
 * passes, and every output is poisoned (NaN) before the kernel runs so that an element
 * left unwritten fails. Bounds, stated per check:
 *   dequantization (all 8 weight types, whole rows and column shards): f32 bit-exact with
 *     dtype_to_f32, bf16 bit-exact with its round-to-nearest-even; Q4_1's split minimum
 *     adds back to the CPU value exactly;
 *   embedding (all types): bit-exact with ops_embed;
 *   RMSNorm: 1e-6 (f32 out), 4e-3 (bf16 out); SwiGLU: 1e-6 / 4e-3;
 *   RoPE (NORMAL/NEOX, partial rotation, freq factors, linear scaling, positions to 8k):
 *     angles 2e-6, rotation 1e-6;
 *   fused bias + RoPE + KV store, per KV type: Q 1e-6; K/V 1e-6 (f32), 1e-3 (f16),
 *     8e-3 (bf16), 5e-2 (fp8 e4m3 with row scales);
 *   paged attention, per KV type (f32, f16, bf16, fp8), GQA groups 1..8, head_dim 64/128/
 *     256, block_tokens 16/32, decode rows with contexts up to 4100 and prefill tiles
 *     after a cached prefix, split-K 1, automatic and 7: 1e-5 (f32 out), 4e-3 (bf16 out),
 *     against kernels/attn.c on the same (decoded) K/V; the bf16 tensor-core kernel
 *     (prefill tiles, head_dim 64 and 128): 1e-2;
 *   matrix products per weight type: bf16 mode 1e-5 against the CPU on the same bf16
 *     operands, 3e-2 against the CPU's quantized path; exact mode 1e-5 against the CPU's
 *     quantized path itself (the products then differ by summation order only);
 *   sampling: greedy equal to sampler_sample token for token (ties, NaN, -inf, penalty);
 *     top-k/top-p/min-p/temperature tokens inside the CPU's kept set, the generator
 *     advanced by exactly one draw, and frequencies within 4 sigma of the softmax;
 *   KV pack/unpack (2- and 4-byte and fp8 with scales): exact.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/attn.h"
#include "kernels/cuda.h"
#include "kernels/cuda_plan.h"
#include "kernels/dtype.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"
#include "kernels/sample.h"

/* ---- harness -------------------------------------------------------------------------------- */

static int gpu_ok(void)
{
    duet_cuda_err e = {0};
    int n = 0;
    if (cuda_device_count(&n, &e) == 0 && cuda_device_select(0, NULL, &e) == 0) return 1;
    if (getenv("DUET_REQUIRE_GPU") && atoi(getenv("DUET_REQUIRE_GPU")))
        fail_msg("a GPU is required (DUET_REQUIRE_GPU=1): %s", e.msg);
    print_message("skipped: %s\n", e.msg);
    return 0;
}
#define NEED_GPU()               \
    do {                         \
        if (!gpu_ok()) skip();   \
    } while (0)

/* Run a call that takes ERRP as its duet_cuda_err argument; fail with its message. */
#define CK(call)                                                          \
    do {                                                                  \
        duet_cuda_err e_ = {0};                                           \
        if ((call) != 0) fail_msg("%s: %s", #call, e_.msg);               \
    } while (0)
#define ERRP (&e_)

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static float frand(void) /* [-1, 1) */
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}
static uint32_t urand(uint32_t n) { return (uint32_t)((frand() + 1.0f) * 0.5f * (float)n) % n; }

static void *dalloc(size_t bytes)
{
    void *p = NULL;
    CK(cuda_mem_alloc(&p, bytes, ERRP));
    CK(cuda_mem_set(p, 0xFF, bytes, ERRP)); /* poison: NaN as f32 and bf16 */
    return p;
}
static void *dup_to_dev(const void *h, size_t bytes)
{
    void *p = dalloc(bytes);
    CK(cuda_mem_h2d(p, h, bytes, ERRP));
    return p;
}
static void to_host(void *h, const void *d, size_t bytes)
{
    CK(cuda_sync(ERRP));
    CK(cuda_mem_d2h(h, d, bytes, ERRP));
}

/* ||a - b|| / ||b||; NaN anywhere fails. */
static double nerr(const float *a, const float *b, size_t n)
{
    double num = 0, den = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = (double)a[i] - b[i];
        num += d * d;
        den += (double)b[i] * b[i];
    }
    return den > 0 ? sqrt(num / den) : sqrt(num);
}
static void check_err(const char *what, double err, double bound)
{
    if (!(err <= bound)) fail_msg("%s: normalized error %.3g above %.3g", what, err, bound);
}

static void bf16_to_f32_n(float *dst, const uint16_t *src, size_t n)
{
    for (size_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
}

/* fp8 e4m3 (finite, no infinities; S.1111.111 is NaN) on the host. */
static float e4m3_to_f32(uint8_t b)
{
    const int s = b >> 7, e = (b >> 3) & 15, m = b & 7;
    float v = e == 0 ? ldexpf((float)m / 8.0f, -6) : ldexpf(1.0f + (float)m / 8.0f, e - 7);
    if (e == 15 && m == 7) v = NAN;
    return s ? -v : v;
}
static uint8_t e4m3_from_f32(float x) /* round to nearest, saturating at 448 */
{
    const uint8_t s = x < 0 ? 0x80 : 0;
    const float a = fabsf(x);
    if (a >= 448.0f) return s | 0x7E;
    if (a < 0x1p-6f) { /* subnormal: steps of 2^-9 */
        int m = (int)rintf(a * 512.0f);
        return (uint8_t)(s | (m == 8 ? 0x08 : m));
    }
    int k;
    (void)frexpf(a, &k);
    int e = k - 1, m = (int)rintf((a / ldexpf(1.0f, e) - 1.0f) * 8.0f);
    if (m == 8) {
        m = 0;
        e++;
    }
    if (e + 7 > 15 || (e + 7 == 15 && m == 7)) return s | 0x7E;
    return (uint8_t)(s | ((e + 7) << 3) | m);
}

/* ---- dequantization and embedding ------------------------------------------------------------- */

static const dtype_t wtypes[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q4_0, DTYPE_Q4_1,
                                 DTYPE_Q8_0, DTYPE_Q4_K, DTYPE_Q6_K};
#define N_WTYPES (sizeof wtypes / sizeof *wtypes)

/* A random [rows][n] matrix quantized to t: raw bytes (caller frees). */
static uint8_t *rand_weights(dtype_t t, int64_t rows, int64_t n, float amp)
{
    size_t rb = dtype_row_bytes(t, n);
    uint8_t *raw = malloc(rb * (size_t)rows);
    float *row = malloc((size_t)n * sizeof(float));
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < n; i++) row[i] = frand() * amp;
        assert_int_equal(dtype_from_f32(t, row, raw + (size_t)r * rb, n), 0);
    }
    free(row);
    return raw;
}

static void test_dequant(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t shapes[][2] = {{3, 256}, {17, 512}, {64, 2048}};
    for (size_t ti = 0; ti < N_WTYPES; ti++)
        for (size_t si = 0; si < 3; si++) {
            const dtype_t t = wtypes[ti];
            const int64_t rows = shapes[si][0], n = shapes[si][1], be = (int64_t)dtype_block_elems(t);
            const int64_t blk = be > 32 ? be : 32;
            const int64_t ranges[][2] = {{0, n}, {blk, n - 2 * blk > 0 ? n - 2 * blk : blk}};
            uint8_t *raw = rand_weights(t, rows, n, 2.0f);
            const size_t rb = dtype_row_bytes(t, n);
            float *ref = malloc((size_t)(rows * n) * 4);
            for (int64_t r = 0; r < rows; r++) assert_int_equal(dtype_to_f32(t, raw + r * rb, ref + r * n, n), 0);
            void *d_raw = dup_to_dev(raw, rb * (size_t)rows);
            for (int ri = 0; ri < 2; ri++) {
                const int64_t c0 = ranges[ri][0], nc = ranges[ri][1];
                if (c0 + nc > n) continue;
                float *got = malloc((size_t)(rows * nc) * 4), *mins = malloc((size_t)(rows * nc / 32 + 1) * 4);
                uint16_t *gotb = malloc((size_t)(rows * nc) * 2);
                float *d_out = dalloc((size_t)(rows * nc) * 4);
                uint16_t *d_outb = dalloc((size_t)(rows * nc) * 2);
                CK(cuda_op_dequant(d_out, CUDA_ACT_F32, NULL, t, d_raw, rows, n, c0, nc, NULL, ERRP));
                CK(cuda_op_dequant(d_outb, CUDA_ACT_BF16, NULL, t, d_raw, rows, n, c0, nc, NULL, ERRP));
                to_host(got, d_out, (size_t)(rows * nc) * 4);
                to_host(gotb, d_outb, (size_t)(rows * nc) * 2);
                for (int64_t r = 0; r < rows; r++)
                    for (int64_t c = 0; c < nc; c++) {
                        const float want = ref[r * n + c0 + c];
                        if (memcmp(&got[r * nc + c], &want, 4) != 0)
                            fail_msg("%s [%lld][%lld]: %.9g, want %.9g", dtype_name(t), (long long)r,
                                     (long long)(c0 + c), got[r * nc + c], want);
                        if (gotb[r * nc + c] != bf16_from_f32(want))
                            fail_msg("%s bf16 [%lld][%lld]: %04x, want %04x", dtype_name(t), (long long)r,
                                     (long long)(c0 + c), gotb[r * nc + c], bf16_from_f32(want));
                    }
                if (t == DTYPE_Q4_1) { /* exact mode: value = part + minimum, to the bit */
                    float *d_mins = dalloc((size_t)(rows * nc / 32) * 4);
                    CK(cuda_op_dequant(d_out, CUDA_ACT_F32, d_mins, t, d_raw, rows, n, c0, nc, NULL, ERRP));
                    to_host(got, d_out, (size_t)(rows * nc) * 4);
                    to_host(mins, d_mins, (size_t)(rows * nc / 32) * 4);
                    for (int64_t r = 0; r < rows; r++)
                        for (int64_t c = 0; c < nc; c++) {
                            float v = got[r * nc + c] + mins[r * (nc / 32) + c / 32];
                            assert_memory_equal(&v, &ref[r * n + c0 + c], 4);
                        }
                    cuda_mem_free(d_mins);
                }
                cuda_mem_free(d_out);
                cuda_mem_free(d_outb);
                free(got);
                free(gotb);
                free(mins);
            }
            cuda_mem_free(d_raw);
            free(raw);
            free(ref);
        }
    /* a bad shape is an error, not a launch */
    duet_cuda_err e = {0};
    assert_int_equal(cuda_op_dequant((void *)16, CUDA_ACT_F32, NULL, DTYPE_Q4_K, (void *)16, 1, 256, 32, 64, NULL, &e),
                     -1);
    assert_non_null(strstr(e.msg, "bad shape"));
}

static void test_embed(void **state)
{
    (void)state;
    NEED_GPU();
    for (size_t ti = 0; ti < N_WTYPES; ti++) {
        const dtype_t t = wtypes[ti];
        const int64_t n_vocab = 300, n_embd = dtype_block_elems(t) == 256 ? 512 : 576;
        uint8_t *raw = rand_weights(t, n_vocab, n_embd, 1.0f);
        const int n_tok = 37;
        int32_t ids[37];
        for (int i = 0; i < n_tok; i++) ids[i] = (int32_t)urand((uint32_t)n_vocab);
        ids[0] = 0;
        ids[1] = (int32_t)n_vocab - 1;
        float *ref = malloc((size_t)(n_tok * n_embd) * 4), *got = malloc((size_t)(n_tok * n_embd) * 4);
        assert_int_equal(ops_embed(ref, t, raw, n_vocab, n_embd, ids, n_tok), 0);
        void *d_raw = dup_to_dev(raw, dtype_row_bytes(t, n_embd) * (size_t)n_vocab);
        int32_t *d_ids = dup_to_dev(ids, sizeof ids);
        float *d_y = dalloc((size_t)(n_tok * n_embd) * 4);
        CK(cuda_op_embed(d_y, t, d_raw, n_vocab, n_embd, d_ids, n_tok, NULL, ERRP));
        to_host(got, d_y, (size_t)(n_tok * n_embd) * 4);
        if (memcmp(got, ref, (size_t)(n_tok * n_embd) * 4) != 0) fail_msg("embedding of %s differs", dtype_name(t));
        cuda_mem_free(d_raw);
        cuda_mem_free(d_ids);
        cuda_mem_free(d_y);
        free(raw);
        free(ref);
        free(got);
    }
}

/* ---- element-wise operations --------------------------------------------------------------- */

static void test_rmsnorm_swiglu(void **state)
{
    (void)state;
    NEED_GPU();
    const int64_t ns[] = {64, 576, 2048, 4128};
    const int rowss[] = {1, 5, 33};
    for (size_t a = 0; a < 4; a++)
        for (size_t b = 0; b < 3; b++) {
            const int64_t n = ns[a];
            const int rows = rowss[b];
            const size_t N = (size_t)rows * (size_t)n;
            float *x = malloc(N * 4), *u = malloc(N * 4), *w = malloc((size_t)n * 4), *ref = malloc(N * 4),
                  *got = malloc(N * 4);
            uint16_t *gotb = malloc(N * 2);
            for (size_t i = 0; i < N; i++) {
                x[i] = frand() * 3.0f;
                u[i] = frand() * 2.0f;
            }
            for (int64_t i = 0; i < n; i++) w[i] = frand();
            float *d_x = dup_to_dev(x, N * 4), *d_u = dup_to_dev(u, N * 4), *d_w = dup_to_dev(w, (size_t)n * 4);
            float *d_y = dalloc(N * 4);
            uint16_t *d_yb = dalloc(N * 2);
            /* RMSNorm */
            for (int r = 0; r < rows; r++) ops_rmsnorm(ref + r * n, x + r * n, w, n, 1e-5f);
            CK(cuda_op_rmsnorm(d_y, CUDA_ACT_F32, n, d_x, n, d_w, rows, n, 1e-5f, NULL, ERRP));
            CK(cuda_op_rmsnorm(d_yb, CUDA_ACT_BF16, n, d_x, n, d_w, rows, n, 1e-5f, NULL, ERRP));
            to_host(got, d_y, N * 4);
            to_host(gotb, d_yb, N * 2);
            check_err("rmsnorm f32", nerr(got, ref, N), 1e-6);
            bf16_to_f32_n(got, gotb, N);
            check_err("rmsnorm bf16", nerr(got, ref, N), 4e-3);
            /* SwiGLU */
            for (int r = 0; r < rows; r++) ops_swiglu(ref + r * n, x + r * n, u + r * n, n);
            CK(cuda_op_swiglu(d_y, CUDA_ACT_F32, n, d_x, d_u, n, rows, n, NULL, ERRP));
            CK(cuda_op_swiglu(d_yb, CUDA_ACT_BF16, n, d_x, d_u, n, rows, n, NULL, ERRP));
            to_host(got, d_y, N * 4);
            to_host(gotb, d_yb, N * 2);
            check_err("swiglu f32", nerr(got, ref, N), 1e-6);
            bf16_to_f32_n(got, gotb, N);
            check_err("swiglu bf16", nerr(got, ref, N), 4e-3);
            cuda_mem_free(d_x);
            cuda_mem_free(d_u);
            cuda_mem_free(d_w);
            cuda_mem_free(d_y);
            cuda_mem_free(d_yb);
            free(x);
            free(u);
            free(w);
            free(ref);
            free(got);
            free(gotb);
        }
}

static void test_rope(void **state)
{
    (void)state;
    NEED_GPU();
    const int n_tok = 23, n_head = 4;
    for (int hdi = 0; hdi < 2; hdi++)
        for (int mode = 0; mode < 2; mode++)
            for (int part = 0; part < 2; part++)
                for (int ff = 0; ff < 2; ff++) {
                    const int hd = hdi ? 128 : 64, n_dims = part ? hd / 2 : hd;
                    float factors[64];
                    for (int i = 0; i < n_dims / 2; i++) factors[i] = 1.0f + 3.0f * (frand() + 1.0f);
                    ops_rope_params rp = {.n_dims = n_dims, .freq_base = ff ? 500000.0f : 10000.0f,
                                          .freq_scale = ff ? 0.25f : 1.0f, .freq_factors = ff ? factors : NULL,
                                          .mode = mode ? OPS_ROPE_NEOX : OPS_ROPE_NORMAL};
                    int32_t pos[23];
                    for (int t = 0; t < n_tok; t++) pos[t] = (int32_t)urand(8192);
                    pos[0] = 0;
                    pos[1] = 8191;
                    const size_t N = (size_t)n_tok * n_head * hd;
                    float *x = malloc(N * 4), *ref = malloc(N * 4), *got = malloc(N * 4);
                    float *cs = malloc((size_t)n_tok * n_dims * 4), *gcs = malloc((size_t)n_tok * n_dims * 4);
                    for (size_t i = 0; i < N; i++) x[i] = frand();
                    memcpy(ref, x, N * 4);
                    for (int t = 0; t < n_tok; t++) {
                        ops_rope_cache(cs + (size_t)t * n_dims, pos[t], &rp);
                        ops_rope_apply(ref + (size_t)t * n_head * hd, n_head, hd, cs + (size_t)t * n_dims, n_dims,
                                       rp.mode);
                    }
                    float *d_ff = ff ? dup_to_dev(factors, sizeof factors) : NULL;
                    cuda_rope r = {.n_dims = n_dims, .freq_base = rp.freq_base, .freq_scale = rp.freq_scale,
                                   .freq_factors = d_ff, .neox = mode};
                    int32_t *d_pos = dup_to_dev(pos, sizeof pos);
                    float *d_cs = dalloc((size_t)n_tok * n_dims * 4), *d_x = dup_to_dev(x, N * 4);
                    CK(cuda_op_rope_cache(d_cs, d_pos, n_tok, &r, NULL, ERRP));
                    to_host(gcs, d_cs, (size_t)n_tok * n_dims * 4);
                    for (size_t i = 0; i < (size_t)n_tok * n_dims; i++)
                        if (!(fabsf(gcs[i] - cs[i]) <= 2e-6f)) fail_msg("rope angle %zu: %.9g vs %.9g", i, gcs[i], cs[i]);
                    /* rotation with the CPU's own angles, so only the rotation is compared */
                    CK(cuda_mem_h2d(d_cs, cs, (size_t)n_tok * n_dims * 4, ERRP));
                    CK(cuda_op_rope_apply(d_x, (int64_t)n_head * hd, n_tok, n_head, hd, d_cs, n_dims, mode, NULL, ERRP));
                    to_host(got, d_x, N * 4);
                    check_err("rope", nerr(got, ref, N), 1e-6);
                    cuda_mem_free(d_ff);
                    cuda_mem_free(d_pos);
                    cuda_mem_free(d_cs);
                    cuda_mem_free(d_x);
                    free(x);
                    free(ref);
                    free(got);
                    free(cs);
                    free(gcs);
                }
}

/* ---- KV pools on the host ------------------------------------------------------------------------ */

static const cuda_kv_type kvtypes[] = {CUDA_KV_F32, CUDA_KV_F16, CUDA_KV_BF16, CUDA_KV_FP8};

/* A pool of n_rows rows of hd elements: raw bytes, per-row scales (fp8), decoded f32. */
typedef struct {
    cuda_kv_type t;
    size_t rows, hd, eb;
    uint8_t *raw;
    float *scale, *f;
} hpool;

static void hpool_new(hpool *p, cuda_kv_type t, size_t rows, size_t hd, int random)
{
    p->t = t;
    p->rows = rows;
    p->hd = hd;
    p->eb = cuda_kv_elt_bytes(t);
    p->raw = calloc(rows * hd, p->eb);
    p->scale = malloc(rows * 4);
    p->f = calloc(rows * hd, 4);
    for (size_t r = 0; r < rows; r++) {
        p->scale[r] = t == CUDA_KV_FP8 ? 0.002f + 0.004f * (frand() + 1.0f) : 1.0f;
        for (size_t d = 0; d < hd && random; d++) {
            float v = frand() * 1.5f;
            uint8_t *q = p->raw + (r * hd + d) * p->eb;
            switch (t) {
            case CUDA_KV_F32: memcpy(q, &v, 4); break;
            case CUDA_KV_F16: { uint16_t h = fp16_from_f32(v); memcpy(q, &h, 2); v = fp16_to_f32(h); break; }
            case CUDA_KV_BF16: { uint16_t h = bf16_from_f32(v); memcpy(q, &h, 2); v = bf16_to_f32(h); break; }
            case CUDA_KV_FP8: *q = e4m3_from_f32(v / p->scale[r] * 0.5f); v = e4m3_to_f32(*q) * p->scale[r]; break;
            }
            p->f[r * hd + d] = v;
        }
    }
}

static void hpool_decode(hpool *p) /* raw + scale -> f */
{
    for (size_t i = 0; i < p->rows * p->hd; i++) {
        const uint8_t *q = p->raw + i * p->eb;
        uint16_t h;
        float v = 0;
        switch (p->t) {
        case CUDA_KV_F32: memcpy(&v, q, 4); break;
        case CUDA_KV_F16: memcpy(&h, q, 2); v = fp16_to_f32(h); break;
        case CUDA_KV_BF16: memcpy(&h, q, 2); v = bf16_to_f32(h); break;
        case CUDA_KV_FP8: v = e4m3_to_f32(*q) * p->scale[i / p->hd]; break;
        }
        p->f[i] = v;
    }
}

static void hpool_free(hpool *p)
{
    free(p->raw);
    free(p->scale);
    free(p->f);
}

/* ---- fused bias + RoPE + KV store ------------------------------------------------------------- */

static void test_rope_store(void **state)
{
    (void)state;
    NEED_GPU();
    const int n_head = 8, n_kv = 2, hd = 64, bt = 16, n_blocks = 6, n_tok = 19;
    const int nq = n_head * hd, nkv = n_kv * hd, ld = nq + 2 * nkv;
    for (size_t ki = 0; ki < 4; ki++)
        for (int bias_on = 0; bias_on < 2; bias_on++) {
            const cuda_kv_type t = kvtypes[ki];
            ops_rope_params rp = {.n_dims = hd, .freq_base = 10000.0f, .freq_scale = 1.0f, .mode = OPS_ROPE_NORMAL};
            float *qkv = malloc((size_t)n_tok * ld * 4), *bias = malloc((size_t)ld * 4), *ref = malloc((size_t)n_tok * ld * 4);
            float *cs = malloc((size_t)n_tok * hd * 4);
            int32_t slot[19], pos[19];
            for (int i = 0; i < n_tok * ld; i++) qkv[i] = frand() * 2.0f;
            for (int i = 0; i < ld; i++) bias[i] = bias_on ? frand() : 0.0f;
            for (int tk = 0; tk < n_tok; tk++) {
                pos[tk] = (int32_t)urand(5000);
                slot[tk] = tk * 5 % (n_blocks * bt); /* distinct slots */
                ops_rope_cache(cs + (size_t)tk * hd, pos[tk], &rp);
                float *row = ref + (size_t)tk * ld;
                for (int i = 0; i < ld; i++) row[i] = qkv[(size_t)tk * ld + i] + bias[i];
                ops_rope_apply(row, n_head, hd, cs + (size_t)tk * hd, hd, rp.mode);
                ops_rope_apply(row + nq, n_kv, hd, cs + (size_t)tk * hd, hd, rp.mode);
            }
            hpool pk, pv;
            const size_t rows = (size_t)n_blocks * n_kv * bt;
            hpool_new(&pk, t, rows, hd, 0);
            hpool_new(&pv, t, rows, hd, 0);
            float *d_qkv = dup_to_dev(qkv, (size_t)n_tok * ld * 4), *d_bias = dup_to_dev(bias, (size_t)ld * 4);
            float *d_cs = dup_to_dev(cs, (size_t)n_tok * hd * 4);
            int32_t *d_slot = dup_to_dev(slot, sizeof slot);
            cuda_kv_layer L = {.type = t, .n_kv_head = n_kv, .head_dim = hd, .block_tokens = bt, .n_blocks = n_blocks};
            L.k = dalloc(rows * hd * pk.eb);
            L.v = dalloc(rows * hd * pk.eb);
            if (t == CUDA_KV_FP8) {
                L.k_scale = dalloc(rows * 4);
                L.v_scale = dalloc(rows * 4);
            }
            CK(cuda_op_rope_store(d_qkv, ld, bias_on ? d_bias : NULL, n_tok, n_head, d_cs, hd, 0, d_slot, &L, NULL, ERRP));
            float *got = malloc((size_t)n_tok * ld * 4);
            to_host(got, d_qkv, (size_t)n_tok * ld * 4);
            to_host(pk.raw, L.k, rows * hd * pk.eb);
            to_host(pv.raw, L.v, rows * hd * pv.eb);
            if (t == CUDA_KV_FP8) {
                to_host(pk.scale, L.k_scale, rows * 4);
                to_host(pv.scale, L.v_scale, rows * 4);
            }
            hpool_decode(&pk);
            hpool_decode(&pv);
            /* Q rotated in place */
            float *gq = malloc((size_t)n_tok * nq * 4), *rq = malloc((size_t)n_tok * nq * 4);
            float *gk = malloc((size_t)n_tok * nkv * 4), *rk = malloc((size_t)n_tok * nkv * 4);
            float *gv = malloc((size_t)n_tok * nkv * 4), *rv = malloc((size_t)n_tok * nkv * 4);
            for (int tk = 0; tk < n_tok; tk++) {
                memcpy(gq + (size_t)tk * nq, got + (size_t)tk * ld, (size_t)nq * 4);
                memcpy(rq + (size_t)tk * nq, ref + (size_t)tk * ld, (size_t)nq * 4);
                const int blk = slot[tk] / bt, off = slot[tk] % bt;
                for (int h = 0; h < n_kv; h++) {
                    const size_t r = ((size_t)blk * n_kv + h) * bt + off;
                    memcpy(gk + (size_t)tk * nkv + h * hd, pk.f + r * hd, (size_t)hd * 4);
                    memcpy(gv + (size_t)tk * nkv + h * hd, pv.f + r * hd, (size_t)hd * 4);
                }
                memcpy(rk + (size_t)tk * nkv, ref + (size_t)tk * ld + nq, (size_t)nkv * 4);
                memcpy(rv + (size_t)tk * nkv, ref + (size_t)tk * ld + nq + nkv, (size_t)nkv * 4);
            }
            const double bound = t == CUDA_KV_F32 ? 1e-6 : t == CUDA_KV_F16 ? 1e-3 : t == CUDA_KV_BF16 ? 8e-3 : 5e-2;
            check_err("rope_store q", nerr(gq, rq, (size_t)n_tok * nq), 1e-6);
            check_err("rope_store k", nerr(gk, rk, (size_t)n_tok * nkv), bound);
            check_err("rope_store v", nerr(gv, rv, (size_t)n_tok * nkv), bound);
            free(gq); free(rq); free(gk); free(rk); free(gv); free(rv);
            free(got);
            cuda_mem_free(L.k);
            cuda_mem_free(L.v);
            cuda_mem_free(L.k_scale);
            cuda_mem_free(L.v_scale);
            cuda_mem_free(d_qkv);
            cuda_mem_free(d_bias);
            cuda_mem_free(d_cs);
            cuda_mem_free(d_slot);
            hpool_free(&pk);
            hpool_free(&pv);
            free(qkv);
            free(bias);
            free(ref);
            free(cs);
        }
}

/* ---- attention ------------------------------------------------------------------------------------ */

typedef struct {
    int n_head, n_kv, hd, bt;
} attn_shape;

/* Sequences s with len[s] keys whose last n_new[s] positions are the new rows. */
static void attn_case(cuda_kv_type t, const attn_shape *sh, const int *len, const int *n_new, int n_seqs)
{
    const int hd = sh->hd, bt = sh->bt, n_kv = sh->n_kv, n_head = sh->n_head, group = n_head / n_kv;
    int total_blocks = 4, T = 0, max_blocks = 0;
    for (int s = 0; s < n_seqs; s++) {
        int nb = (len[s] + bt - 1) / bt;
        total_blocks += nb;
        if (nb > max_blocks) max_blocks = nb;
        T += n_new[s];
    }
    /* block tables: a random permutation of the pool's blocks */
    int32_t *perm = malloc((size_t)total_blocks * 4), *tables = malloc((size_t)n_seqs * max_blocks * 4);
    for (int i = 0; i < total_blocks; i++) perm[i] = i;
    for (int i = total_blocks - 1; i > 0; i--) {
        int j = (int)urand((uint32_t)(i + 1)), x = perm[i];
        perm[i] = perm[j];
        perm[j] = x;
    }
    int next = 0;
    int pos0[16], bt_off[16];
    attn_query *rows = malloc((size_t)T * sizeof *rows);
    for (int s = 0, r = 0; s < n_seqs; s++) {
        const int nb = (len[s] + bt - 1) / bt;
        for (int i = 0; i < nb; i++) tables[s * max_blocks + i] = perm[next++];
        pos0[s] = len[s] - n_new[s];
        bt_off[s] = s * max_blocks;
        for (int i = 0; i < n_new[s]; i++, r++) {
            rows[r].blocks = tables + s * max_blocks;
            rows[r].pos = pos0[s] + i;
        }
    }
    const size_t prow = (size_t)total_blocks * n_kv * bt;
    hpool pk, pv;
    hpool_new(&pk, t, prow, hd, 1);
    hpool_new(&pv, t, prow, hd, 1);
    const size_t NQ = (size_t)T * n_head * hd;
    float *q = malloc(NQ * 4), *ref = malloc(NQ * 4), *got = malloc(NQ * 4);
    uint16_t *gotb = malloc(NQ * 2);
    for (size_t i = 0; i < NQ; i++) q[i] = frand();
    const float scale = 1.0f / sqrtf((float)hd);
    attn_kv_view view = {.dtype = DTYPE_F32, .n_kv_head = n_kv, .head_dim = hd, .block_tokens = bt, .k = pk.f, .v = pv.f};
    assert_int_equal(attn_paged(NULL, &view, rows, T, n_head, q, scale, ref), 0);

    cuda_kv_layer L = {.type = t, .n_kv_head = n_kv, .head_dim = hd, .block_tokens = bt, .n_blocks = total_blocks};
    L.k = dup_to_dev(pk.raw, prow * hd * pk.eb);
    L.v = dup_to_dev(pv.raw, prow * hd * pv.eb);
    if (t == CUDA_KV_FP8) {
        L.k_scale = dup_to_dev(pk.scale, prow * 4);
        L.v_scale = dup_to_dev(pv.scale, prow * 4);
    }
    int32_t *d_tables = dup_to_dev(tables, (size_t)n_seqs * max_blocks * 4);
    float *d_q = dup_to_dev(q, NQ * 4);
    for (int variant = 0; variant < 5; variant++) {
        /* 0: rows per tile of the plan, automatic splits; 1: one row per tile, 7 splits;
         * 2: no split; 3: the most splits; 4: the bf16 tensor-core kernel (prefill) */
        const int tc = variant == 4;
        if (tc && !(hd == 64 || hd == 128)) continue;
        const int rpt = variant == 1 ? 1 : cuda_attn_rows_per_tile(group, hd);
        cuda_attn_tile tiles[256];
        const int n_tiles = cuda_attn_tiles(n_new, pos0, bt_off, n_seqs, rpt, tiles, 256);
        assert_true(n_tiles > 0);
        int splits = variant == 0 ? cuda_attn_splits(n_tiles, n_kv, 132, T, 1024)
                     : variant == 1 ? 7 : variant == 2 || tc ? 1 : CUDA_ATTN_MAX_SPLITS;
        cuda_attn_tile *d_tiles = dup_to_dev(tiles, (size_t)n_tiles * sizeof *tiles);
        float *d_part = dalloc((size_t)T * n_head * splits * (hd + 2) * 4);
        float *d_out = dalloc(NQ * 4);
        uint16_t *d_outb = dalloc(NQ * 2);
        cuda_attn_args a = {.kv = &L, .blocks = d_tables, .tiles = d_tiles, .n_tiles = n_tiles, .rows_per_tile = rpt,
                            .n_tok = T, .n_head = n_head, .n_splits = splits, .q = d_q, .ldq = (int64_t)n_head * hd,
                            .out = d_out, .out_type = CUDA_ACT_F32, .ldo = (int64_t)n_head * hd, .scale = scale,
                            .partial = d_part, .tensor_cores = tc};
        CK(cuda_op_attention(&a, NULL, ERRP));
        a.out = d_outb;
        a.out_type = CUDA_ACT_BF16;
        CK(cuda_op_attention(&a, NULL, ERRP));
        to_host(got, d_out, NQ * 4);
        to_host(gotb, d_outb, NQ * 2);
        char what[160];
        snprintf(what, sizeof what, "attention %s heads %d/%d hd %d bt %d variant %d (%d splits)",
                 cuda_kv_type_name(t), n_head, n_kv, hd, bt, variant, splits);
        /* the tensor-core kernel takes tiles of several rows only (prefill): bf16 operands */
        const int took_tc = tc && rpt > 1;
        check_err(what, nerr(got, ref, NQ), took_tc ? 1e-2 : 1e-5);
        float *gf = malloc(NQ * 4);
        bf16_to_f32_n(gf, gotb, NQ);
        check_err(what, nerr(gf, ref, NQ), took_tc ? 1e-2 : 4e-3);
        free(gf);
        cuda_mem_free(d_tiles);
        cuda_mem_free(d_part);
        cuda_mem_free(d_out);
        cuda_mem_free(d_outb);
    }
    cuda_mem_free(L.k);
    cuda_mem_free(L.v);
    cuda_mem_free(L.k_scale);
    cuda_mem_free(L.v_scale);
    cuda_mem_free(d_tables);
    cuda_mem_free(d_q);
    hpool_free(&pk);
    hpool_free(&pv);
    free(q);
    free(ref);
    free(got);
    free(gotb);
    free(rows);
    free(perm);
    free(tables);
}

static void test_attention(void **state)
{
    (void)state;
    NEED_GPU();
    const attn_shape shapes[] = {{9, 3, 64, 16}, {32, 8, 64, 16}, {8, 8, 128, 32}, {16, 2, 128, 16}, {4, 1, 256, 16}};
    /* decode rows of several lengths, and a 40-token prefill chunk after 100 cached tokens */
    const int dlen[] = {1, 17, 300, 4100}, dnew[] = {1, 1, 1, 1};
    const int plen[] = {140, 33}, pnew[] = {40, 1};
    for (size_t ki = 0; ki < 4; ki++)
        for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++) {
            attn_case(kvtypes[ki], &shapes[si], dlen, dnew, 4);
            attn_case(kvtypes[ki], &shapes[si], plen, pnew, 2);
        }
}

/* ---- matrix products ------------------------------------------------------------------------------ */

static void test_gemm(void **state)
{
    (void)state;
    NEED_GPU();
    const int shapes[][3] = {{1, 256, 512}, {7, 512, 1536}, {64, 2048, 256}}; /* tokens, n_in, n_out */
    cuda_blas_t *blas = NULL;
    CK(cuda_blas_new(NULL, NULL, 0, &blas, ERRP));
    mm_scratch *ws = NULL;
    assert_int_equal(mm_scratch_new(&ws), 0);
    for (size_t ti = 0; ti < N_WTYPES; ti++)
        for (size_t si = 0; si < 3; si++)
            for (int add = 0; add < 2; add++) {
                const dtype_t t = wtypes[ti];
                const int T = shapes[si][0], n_in = shapes[si][1], n_out = shapes[si][2];
                uint8_t *raw = rand_weights(t, n_out, n_in, 0.5f);
                const size_t rb = dtype_row_bytes(t, n_in), NX = (size_t)T * n_in, NY = (size_t)T * n_out;
                float *x = malloc(NX * 4), *xb = malloc(NX * 4), *y0 = malloc(NY * 4), *ref = malloc(NY * 4),
                      *ref_b = malloc(NY * 4), *got = malloc(NY * 4), *wf = malloc((size_t)n_out * n_in * 4);
                uint16_t *xh = malloc(NX * 2), *wb = malloc((size_t)n_out * n_in * 2);
                for (size_t i = 0; i < NX; i++) {
                    x[i] = frand();
                    xh[i] = bf16_from_f32(x[i]);
                    xb[i] = bf16_to_f32(xh[i]);
                }
                for (size_t i = 0; i < NY; i++) y0[i] = add ? frand() : 0.0f;
                /* the CPU on the quantized weights */
                mm_weight w = {.type = t, .n_in = n_in, .n_out = n_out, .data = raw};
                assert_int_equal(mm_matmul(NULL, &w, x, T, ref, ws), 0);
                for (size_t i = 0; i < NY; i++) ref[i] += y0[i];
                void *d_raw = dup_to_dev(raw, rb * (size_t)n_out);
                uint16_t *d_wb = dalloc((size_t)n_out * n_in * 2);
                float *d_y = dalloc(NY * 4);
                CK(cuda_op_dequant(d_wb, CUDA_ACT_BF16, NULL, t, d_raw, n_out, n_in, 0, n_in, NULL, ERRP));
                to_host(wb, d_wb, (size_t)n_out * n_in * 2);
                bf16_to_f32_n(wf, wb, (size_t)n_out * n_in);
                /* the CPU on the same bf16 operands (f32 weights) */
                mm_weight wf32 = {.type = DTYPE_F32, .n_in = n_in, .n_out = n_out, .data = wf};
                assert_int_equal(mm_matmul(NULL, &wf32, xb, T, ref_b, ws), 0);
                for (size_t i = 0; i < NY; i++) ref_b[i] += y0[i];
                uint16_t *d_x = dup_to_dev(xh, NX * 2);
                CK(cuda_mem_h2d(d_y, y0, NY * 4, ERRP));
                CK(cuda_gemm(blas, CUDA_ACT_BF16, d_wb, n_out, n_in, d_x, n_in, T, d_y, n_out, add, ERRP));
                to_host(got, d_y, NY * 4);
                char what[128];
                snprintf(what, sizeof what, "gemm bf16 %s %dx%dx%d add %d", dtype_name(t), T, n_in, n_out, add);
                check_err(what, nerr(got, ref_b, NY), 1e-5);
                check_err(what, nerr(got, ref, NY), 3e-2);

                /* exact mode: f32 weights, activations quantized as the CPU's */
                float *d_wf = dalloc((size_t)n_out * n_in * 4), *d_mins = NULL;
                float *d_xf = dup_to_dev(x, NX * 4), *d_xq = dalloc(NX * 4), *d_bsum = dalloc(NX / 32 * 4 + 4);
                if (t == DTYPE_Q4_1) d_mins = dalloc((size_t)n_out * (n_in / 32) * 4);
                CK(cuda_op_dequant(d_wf, CUDA_ACT_F32, d_mins, t, d_raw, n_out, n_in, 0, n_in, NULL, ERRP));
                const float *xin = d_xf;
                if (t == DTYPE_Q4_0 || t == DTYPE_Q4_1 || t == DTYPE_Q8_0) {
                    CK(cuda_op_actq(d_xq, d_bsum, CUDA_ACTQ_A32, d_xf, n_in, T, n_in, NULL, ERRP));
                    xin = d_xq;
                } else if (t == DTYPE_Q4_K || t == DTYPE_Q6_K) {
                    CK(cuda_op_actq(d_xq, NULL, CUDA_ACTQ_AK, d_xf, n_in, T, n_in, NULL, ERRP));
                    xin = d_xq;
                }
                CK(cuda_mem_h2d(d_y, y0, NY * 4, ERRP));
                CK(cuda_gemm(blas, CUDA_ACT_F32, d_wf, n_out, n_in, xin, n_in, T, d_y, n_out, add, ERRP));
                if (d_mins) CK(cuda_gemm(blas, CUDA_ACT_F32, d_mins, n_out, n_in / 32, d_bsum, n_in / 32, T, d_y, n_out, 1, ERRP));
                to_host(got, d_y, NY * 4);
                snprintf(what, sizeof what, "gemm exact %s %dx%dx%d add %d", dtype_name(t), T, n_in, n_out, add);
                check_err(what, nerr(got, ref, NY), 1e-5);
                cuda_mem_free(d_wf);
                cuda_mem_free(d_mins);
                cuda_mem_free(d_xf);
                cuda_mem_free(d_xq);
                cuda_mem_free(d_bsum);
                cuda_mem_free(d_raw);
                cuda_mem_free(d_wb);
                cuda_mem_free(d_y);
                cuda_mem_free(d_x);
                free(raw); free(x); free(xb); free(y0); free(ref); free(ref_b); free(got); free(wf); free(xh); free(wb);
            }
    mm_scratch_destroy(&ws);
    cuda_blas_destroy(&blas);
}

/* ---- sampling ----------------------------------------------------------------------------------- */

typedef struct {
    float l;
    int id;
} cand;
static int cmp_cand(const void *a, const void *b)
{
    const cand *x = a, *y = b;
    if (x->l > y->l) return -1;
    if (x->l < y->l) return 1;
    return x->id - y->id;
}

/* The CPU's kept set for p over logits, as a best-first prefix of *out: its length. */
static int kept_set(const sample_params *p, const float *logits, int n_vocab, cand *out)
{
    for (int i = 0; i < n_vocab; i++) {
        out[i].l = isnan(logits[i]) ? -INFINITY : logits[i];
        out[i].id = i;
    }
    qsort(out, (size_t)n_vocab, sizeof *out, cmp_cand);
    int n = p->top_k > 0 && p->top_k < n_vocab ? p->top_k : n_vocab;
    const float max_l = out[0].l;
    const int top_p_on = p->top_p < 1.0f;
    const float thr = p->min_p > 0.0f ? max_l + logf(p->min_p) : -INFINITY;
    double z = 0;
    if (top_p_on || thr > -INFINITY) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            z += top_p_on ? expf(out[i].l - max_l) : 0.0f;
            if (out[i].l >= thr) m = i + 1;
        }
        n = m > 0 ? m : 1;
    }
    if (top_p_on && n > 1) {
        const double target = p->top_p > 0 ? (double)p->top_p * z : 0.0;
        double cum = 0;
        for (int i = 0; i < n; i++) {
            cum += expf(out[i].l - max_l);
            if (cum >= target) {
                /* a cut this close to the target may fall one later on the GPU (expf) */
                n = i + 1 + (fabs(cum - target) < 1e-6 * target && i + 1 < n);
                break;
            }
        }
    }
    return n;
}

static void run_sample(const float *logits, int n_rows_logits, int n_vocab, cuda_sample_row *rows, int n_rows,
                       const int32_t *pen, int n_pen, int32_t *tokens)
{
    float *d_l = dup_to_dev(logits, (size_t)n_rows_logits * n_vocab * 4);
    cuda_sample_row *d_rows = dup_to_dev(rows, (size_t)n_rows * sizeof *rows);
    int32_t *d_pen = n_pen ? dup_to_dev(pen, (size_t)n_pen * 4) : dalloc(4);
    int32_t *d_tok = dalloc((size_t)n_rows * 4);
    CK(cuda_op_sample(d_l, n_vocab, n_rows, n_vocab, d_rows, d_pen, d_tok, NULL, ERRP));
    to_host(tokens, d_tok, (size_t)n_rows * 4);
    to_host(rows, d_rows, (size_t)n_rows * sizeof *rows);
    cuda_mem_free(d_l);
    cuda_mem_free(d_rows);
    cuda_mem_free(d_pen);
    cuda_mem_free(d_tok);
}

static void test_sample_greedy(void **state)
{
    (void)state;
    NEED_GPU();
    const int vocabs[] = {1000, 49152};
    for (int vi = 0; vi < 2; vi++) {
        const int V = vocabs[vi], R = 6;
        float *lg = malloc((size_t)R * V * 4);
        for (int i = 0; i < R * V; i++) lg[i] = frand() * 8.0f;
        lg[1 * V + 700] = lg[1 * V + 300] = 20.0f;         /* a tie: the lower id */
        for (int i = 0; i < V; i += 7) lg[2 * V + i] = NAN; /* NaN counts as -inf */
        for (int i = 0; i < V; i++) lg[3 * V + i] = -INFINITY; /* nothing: -1 */
        lg[4 * V + 11] = 30.0f;                           /* penalized away */
        lg[5 * V + 12] = -0.5f;
        cuda_sample_row rows[6];
        memset(rows, 0, sizeof rows);
        int32_t pen[4] = {11, 12, 13, 11 + V / 2};
        int32_t hist[4] = {11, 12, 13, 11 + V / 2};
        for (int r = 0; r < R; r++) {
            rows[r].logit_row = r;
            rows[r].temperature = 0.0f;
            rows[r].repeat_penalty = 1.0f;
        }
        rows[4].repeat_penalty = 100.0f;
        rows[4].n_pen = 4;
        int32_t tok[6];
        run_sample(lg, R, V, rows, R, pen, 4, tok);
        for (int r = 0; r < R; r++) {
            sample_params p = sample_params_default();
            p.temperature = 0.0f;
            if (r == 4) {
                p.repeat_penalty = 100.0f;
                p.repeat_last_n = 4;
            }
            sampler_t *s = NULL;
            assert_int_equal(sampler_new(&p, V, &s), 0);
            int want = sampler_sample(s, lg + (size_t)r * V, hist, 4);
            sampler_destroy(&s);
            if (tok[r] != want) fail_msg("greedy row %d (vocab %d): %d, the CPU %d", r, V, tok[r], want);
        }
        assert_int_equal(tok[1], 300);
        assert_int_equal(tok[3], -1);
        free(lg);
    }
}

static void test_sample_filters(void **state)
{
    (void)state;
    NEED_GPU();
    const int V = 49152, R = 64;
    const struct {
        int k;
        float top_p, min_p, temp;
    } cases[] = {{40, 0.95f, 0.05f, 0.8f}, {1, 0.95f, 0.05f, 0.8f}, {1024, 0.5f, 0.0f, 1.0f},
                 {5, 1.0f, 0.0f, 1.5f},    {100, 1.0f, 1.5f, 1.0f}, {300, 0.0f, 0.0f, 0.7f}};
    float *lg = malloc((size_t)V * 4);
    cand *c = malloc((size_t)V * sizeof *c);
    for (int i = 0; i < V; i++) lg[i] = frand() * 6.0f;
    for (size_t ci = 0; ci < sizeof cases / sizeof *cases; ci++) {
        sample_params p = sample_params_default();
        p.top_k = cases[ci].k;
        p.top_p = cases[ci].top_p;
        p.min_p = cases[ci].min_p;
        p.temperature = cases[ci].temp;
        const int n = kept_set(&p, lg, V, c);
        cuda_sample_row rows[64];
        sample_rng want[64];
        memset(rows, 0, sizeof rows);
        for (int r = 0; r < R; r++) {
            sample_rng g;
            sample_rng_seed(&g, 1000 + (uint64_t)r);
            rows[r].logit_row = 0;
            rows[r].temperature = p.temperature;
            rows[r].k = cuda_sample_k(&p, V);
            rows[r].top_p = p.top_p;
            rows[r].min_p = p.min_p;
            rows[r].repeat_penalty = 1.0f;
            memcpy(rows[r].rng, g.s, sizeof g.s);
            want[r] = g;
            (void)sample_rng_next(&want[r]); /* exactly one draw */
        }
        int32_t tok[64];
        run_sample(lg, 1, V, rows, R, NULL, 0, tok);
        for (int r = 0; r < R; r++) {
            int found = 0;
            for (int i = 0; i < n && !found; i++) found = c[i].id == tok[r];
            if (!found) fail_msg("case %zu row %d: token %d outside the CPU's %d kept tokens", ci, r, tok[r], n);
            assert_memory_equal(rows[r].rng, want[r].s, sizeof want[r].s);
        }
    }
    /* frequencies: top-5 at temperature 1 over 8192 draws of one row */
    {
        const int N = 8192, K = 5;
        sample_params p = sample_params_default();
        p.top_k = K;
        p.top_p = 1.0f;
        p.min_p = 0.0f;
        p.temperature = 1.0f;
        kept_set(&p, lg, V, c);
        cuda_sample_row *rows = calloc((size_t)N, sizeof *rows);
        int32_t *tok = malloc((size_t)N * 4);
        for (int r = 0; r < N; r++) {
            sample_rng g;
            sample_rng_seed(&g, 77 + (uint64_t)r * 7919);
            rows[r].temperature = 1.0f;
            rows[r].k = K;
            rows[r].top_p = 1.0f;
            rows[r].repeat_penalty = 1.0f;
            memcpy(rows[r].rng, g.s, sizeof g.s);
        }
        run_sample(lg, 1, V, rows, N, NULL, 0, tok);
        double z = 0, pk[5];
        for (int i = 0; i < K; i++) z += pk[i] = exp((double)c[i].l - c[0].l);
        for (int i = 0; i < K; i++) {
            int cnt = 0;
            for (int r = 0; r < N; r++) cnt += tok[r] == c[i].id;
            const double pr = pk[i] / z, f = (double)cnt / N, sd = sqrt(pr * (1 - pr) / N);
            if (fabs(f - pr) > 4 * sd + 1e-3) fail_msg("token %d: frequency %.4f, probability %.4f", c[i].id, f, pr);
        }
        free(rows);
        free(tok);
    }
    free(lg);
    free(c);
}

/* ---- KV pack / unpack ------------------------------------------------------------------------------ */

static void test_kv_pack(void **state)
{
    (void)state;
    NEED_GPU();
    const int n_kv = 4, hd = 64, bt = 16, n_blocks = 8, head0 = 1, n_heads = 2, tok0 = 5, n_tok = 35;
    const int32_t table_a[] = {6, 2, 7}, table_b[] = {1, 4, 0};
    for (size_t ki = 0; ki < 4; ki++) {
        const cuda_kv_type t = kvtypes[ki];
        const size_t eb = cuda_kv_elt_bytes(t), rows = (size_t)n_blocks * n_kv * bt;
        hpool a;
        hpool_new(&a, t, rows, hd, 1);
        void *d_pool = dup_to_dev(a.raw, rows * hd * eb), *d_pool2 = dalloc(rows * hd * eb);
        float *d_sc = dup_to_dev(a.scale, rows * 4), *d_sc2 = dalloc(rows * 4);
        int32_t *d_ta = dup_to_dev(table_a, sizeof table_a), *d_tb = dup_to_dev(table_b, sizeof table_b);
        void *d_dense = dalloc((size_t)n_heads * n_tok * hd * eb);
        float *d_dsc = dalloc((size_t)n_heads * n_tok * 4);
        cuda_kv_span sp = {.pool = d_pool, .blocks = d_ta, .n_kv_heads = n_kv, .block_tokens = bt, .head_dim = hd,
                           .elt_bytes = (int)eb, .head0 = head0, .n_heads = n_heads, .tok0 = tok0, .n_tok = n_tok,
                           .dense = d_dense};
        if (t == CUDA_KV_FP8) {
            sp.pool_scales = d_sc;
            sp.dense_scales = d_dsc;
        }
        CK(cuda_op_kv_pack(&sp, NULL, ERRP));
        uint8_t *dense = malloc((size_t)n_heads * n_tok * hd * eb);
        float *dsc = malloc((size_t)n_heads * n_tok * 4);
        to_host(dense, d_dense, (size_t)n_heads * n_tok * hd * eb);
        if (t == CUDA_KV_FP8) to_host(dsc, d_dsc, (size_t)n_heads * n_tok * 4);
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < n_tok; i++) {
                const int p = tok0 + i;
                const size_t r = ((size_t)table_a[p / bt] * n_kv + head0 + h) * bt + p % bt;
                assert_memory_equal(dense + ((size_t)h * n_tok + i) * hd * eb, a.raw + r * hd * eb, hd * eb);
                if (t == CUDA_KV_FP8) assert_true(dsc[h * n_tok + i] == a.scale[r]);
            }
        /* unpack into another pool through another table */
        sp.pool = d_pool2;
        sp.blocks = d_tb;
        if (t == CUDA_KV_FP8) sp.pool_scales = d_sc2;
        CK(cuda_op_kv_unpack(&sp, NULL, ERRP));
        uint8_t *pool2 = malloc(rows * hd * eb);
        float *sc2 = malloc(rows * 4);
        to_host(pool2, d_pool2, rows * hd * eb);
        to_host(sc2, d_sc2, rows * 4);
        for (int h = 0; h < n_heads; h++)
            for (int i = 0; i < n_tok; i++) {
                const int p = tok0 + i;
                const size_t ra = ((size_t)table_a[p / bt] * n_kv + head0 + h) * bt + p % bt;
                const size_t rb = ((size_t)table_b[p / bt] * n_kv + head0 + h) * bt + p % bt;
                assert_memory_equal(pool2 + rb * hd * eb, a.raw + ra * hd * eb, hd * eb);
                if (t == CUDA_KV_FP8) assert_true(sc2[rb] == a.scale[ra]);
            }
        /* fp8 without scales is refused */
        if (t == CUDA_KV_FP8) {
            duet_cuda_err e = {0};
            sp.pool_scales = NULL;
            assert_int_equal(cuda_op_kv_pack(&sp, NULL, &e), -1);
            assert_non_null(strstr(e.msg, "bad span"));
        }
        cuda_mem_free(d_pool);
        cuda_mem_free(d_pool2);
        cuda_mem_free(d_sc);
        cuda_mem_free(d_sc2);
        cuda_mem_free(d_ta);
        cuda_mem_free(d_tb);
        cuda_mem_free(d_dense);
        cuda_mem_free(d_dsc);
        free(dense);
        free(dsc);
        free(pool2);
        free(sc2);
        hpool_free(&a);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_dequant),        cmocka_unit_test(test_embed),
        cmocka_unit_test(test_rmsnorm_swiglu), cmocka_unit_test(test_rope),
        cmocka_unit_test(test_rope_store),     cmocka_unit_test(test_attention),
        cmocka_unit_test(test_gemm),           cmocka_unit_test(test_sample_greedy),
        cmocka_unit_test(test_sample_filters), cmocka_unit_test(test_kv_pack),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
