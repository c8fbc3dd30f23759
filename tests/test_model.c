/* tests/test_model.c: the forward pass over paged KV on tiny random models.
 *
 * - decoding token by token over the paged cache gives the logits of one full recompute;
 * - a prefix-cache hit gives the logits of a miss;
 * - a batch of sequences gives each the logits it gets alone;
 * - every weight type and every KV element type runs, and agrees with f32;
 * - tensor parallelism (tp_size 2 and 4, in-process collectives) gives tp_size 1's logits;
 * - bad tp_size and bad batches are clear errors.
 */
#include <math.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/testutil.h"

#include "kv/kv.h"
#include "tests/support/gguf_write.h"
#include "worker/model.h"

static char tmpdir[256];

static const char *model_path(const char *arch, dtype_t type, int tied, int n_head,
                              int n_head_kv)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s-%s-%d-%d-%d.gguf", tmpdir, arch, dtype_name(type), tied,
             n_head, n_head_kv);
    if (access(path, R_OK) == 0) return path;
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.arch = arch;
    o.type = type;
    o.tied = tied;
    o.seed = 7;
    o.n_head = n_head;
    o.n_head_kv = n_head_kv;
    int kq = type == DTYPE_Q4_K || type == DTYPE_Q6_K;
    o.n_embd = kq ? 256 : 64 * n_head / 4;
    o.n_ff = kq ? 512 : 192;
    char err[256];
    if (mkmodel_write(&o, path, err, sizeof err) != 0) fail_msg("mkmodel: %s", err);
    return path;
}

static model_t *load(const char *path, int rank, int size)
{
    model_t *m = NULL;
    char err[256];
    if (model_load(path, rank, size, &m, err, sizeof err) != 0) fail_msg("model_load: %s", err);
    return m;
}

static kv_cache_t *new_kv(const model_t *m, dtype_t t)
{
    kv_config c = model_kv_config(m, t, 4u << 20);
    kv_cache_t *kv = NULL;
    assert_int_equal(kv_new(&c, &kv), KV_OK);
    return kv;
}

static void prompt(int32_t *ids, int n, int n_vocab, unsigned seed)
{
    for (int i = 0; i < n; i++) {
        seed = seed * 1103515245u + 12345u;
        ids[i] = (int32_t)((seed >> 8) % (unsigned)n_vocab);
    }
}

/* Max |a-b| over n, relative to max |b|. */
static double rel_err(const float *a, const float *b, size_t n)
{
    double md = 0, mb = 1e-9;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - b[i]);
        if (d > md) md = d;
        if (fabs(b[i]) > mb) mb = fabs(b[i]);
    }
    return md / mb;
}

/* Run tokens[0..n) of a new sequence in chunks of `chunk` and return logits of every position. */
static void run_seq(model_ctx_t *ctx, const model_t *m, kv_cache_t *kv, const int32_t *tok, int n,
                    int chunk, float *logits, int *seq_out)
{
    const int V = model_hparams_of(m)->n_vocab;
    int seq;
    char err[256];
    assert_int_equal(kv_seq_new(kv, &seq), KV_OK);
    for (int p = 0; p < n; p += chunk) {
        int k = n - p < chunk ? n - p : chunk;
        assert_int_equal(kv_seq_append(kv, seq, tok + p, k), KV_OK);
        model_seq_batch b = {.seq = seq, .pos0 = p, .n_tokens = k, .tokens = tok + p, .logits = 2};
        if (model_forward(ctx, m, kv, &b, 1, logits + (size_t)p * V, err, sizeof err) != 0)
            fail_msg("forward: %s", err);
        assert_int_equal(kv_seq_commit(kv, seq, p + k), KV_OK);
    }
    if (seq_out)
        *seq_out = seq;
    else
        assert_int_equal(kv_seq_free(kv, seq), KV_OK);
}


/* ---- an independent dense reference: f32 weights, contiguous K/V, plain loops ------- */

static float *deq(const gguf_t *g, const char *name, int64_t *rows, int64_t *cols)
{
    const gguf_tensor_t *t = gguf_find_tensor(g, name);
    if (!t) return NULL;
    *cols = t->ne[0];
    *rows = t->n_elems / t->ne[0];
    float *out = malloc((size_t)t->n_elems * sizeof(float));
    size_t rb = dtype_row_bytes(t->type, t->ne[0]);
    for (int64_t r = 0; r < *rows; r++)
        assert_int_equal(dtype_to_f32(t->type, (const uint8_t *)t->data + r * rb, out + r * *cols, *cols), 0);
    return out;
}

static void ref_matvec(const float *W, int64_t rows, int64_t cols, const float *x, float *y)
{
    for (int64_t r = 0; r < rows; r++) {
        double s = 0;
        for (int64_t c = 0; c < cols; c++) s += (double)W[r * cols + c] * x[c];
        y[r] = (float)s;
    }
}

static void ref_rmsnorm(float *y, const float *x, const float *w, int n, float eps)
{
    double ss = 0;
    for (int i = 0; i < n; i++) ss += (double)x[i] * x[i];
    float k = (float)(1.0 / sqrt(ss / n + eps));
    for (int i = 0; i < n; i++) y[i] = x[i] * k * w[i];
}

static void ref_rope(float *x, int n_head, int hd, int pos, float base, int neox)
{
    for (int h = 0; h < n_head; h++)
        for (int i = 0; i < hd / 2; i++) {
            double th = pos * pow(base, -2.0 * i / hd);
            int a = neox ? i : 2 * i, b = neox ? i + hd / 2 : 2 * i + 1;
            float x0 = x[h * hd + a], x1 = x[h * hd + b];
            x[h * hd + a] = (float)(x0 * cos(th) - x1 * sin(th));
            x[h * hd + b] = (float)(x0 * sin(th) + x1 * cos(th));
        }
}

/* Logits at every position of tok[0..n), computed densely from the file alone. */
static void ref_forward(const char *path, const int32_t *tok, int n, float *logits)
{
    gguf_t *g = NULL;
    char err[256], name[64];
    if (gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
    const char *arch;
    size_t alen;
    assert_int_equal(gguf_get_str(g, "general.architecture", &arch, &alen), GGUF_OK);
    int neox = alen == 5 && memcmp(arch, "qwen2", 5) == 0;
    char key[96];
    int64_t E, L, H, HK, F;
    double eps, base;
#define K(sfx) (snprintf(key, sizeof key, "%.*s." sfx, (int)alen, arch), key)
    assert_int_equal(gguf_get_int(g, K("embedding_length"), &E), GGUF_OK);
    assert_int_equal(gguf_get_int(g, K("block_count"), &L), GGUF_OK);
    assert_int_equal(gguf_get_int(g, K("attention.head_count"), &H), GGUF_OK);
    assert_int_equal(gguf_get_int(g, K("attention.head_count_kv"), &HK), GGUF_OK);
    assert_int_equal(gguf_get_int(g, K("feed_forward_length"), &F), GGUF_OK);
    assert_int_equal(gguf_get_float(g, K("attention.layer_norm_rms_epsilon"), &eps), GGUF_OK);
    assert_int_equal(gguf_get_float(g, K("rope.freq_base"), &base), GGUF_OK);
#undef K
    const int hd = (int)(E / H), grp = (int)(H / HK);
    int64_t r, c, V;
    float *emb = deq(g, "token_embd.weight", &V, &c);
    float *x = calloc((size_t)n * E, sizeof(float)), *xn = malloc(E * sizeof(float));
    float *q = malloc(E * sizeof(float)), *att = malloc(E * sizeof(float)), *o = malloc(E * sizeof(float));
    float *K = malloc((size_t)n * HK * hd * sizeof(float)), *Vv = malloc((size_t)n * HK * hd * sizeof(float));
    float *gt = malloc(F * sizeof(float)), *up = malloc(F * sizeof(float)), *sc = malloc(n * sizeof(float));
    for (int t = 0; t < n; t++) memcpy(x + t * E, emb + (size_t)tok[t] * E, E * sizeof(float));
    for (int l = 0; l < L; l++) {
#define W(s) (snprintf(name, sizeof name, "blk.%d." s, l), deq(g, name, &r, &c))
        float *an = W("attn_norm.weight"), *fn = W("ffn_norm.weight");
        float *wq = W("attn_q.weight"), *wk = W("attn_k.weight"), *wv = W("attn_v.weight");
        float *wo = W("attn_output.weight"), *wg = W("ffn_gate.weight"), *wu = W("ffn_up.weight");
        float *wd = W("ffn_down.weight");
        float *bq = W("attn_q.bias"), *bk = W("attn_k.bias"), *bv = W("attn_v.bias");
#undef W
        for (int t = 0; t < n; t++) { /* causal: row t only needs rows <= t, done in order */
            float *xt = x + (size_t)t * E;
            ref_rmsnorm(xn, xt, an, (int)E, (float)eps);
            ref_matvec(wq, E, E, xn, q);
            ref_matvec(wk, HK * hd, E, xn, K + (size_t)t * HK * hd);
            ref_matvec(wv, HK * hd, E, xn, Vv + (size_t)t * HK * hd);
            if (bq)
                for (int i = 0; i < E; i++) q[i] += bq[i];
            if (bk)
                for (int i = 0; i < HK * hd; i++) {
                    K[(size_t)t * HK * hd + i] += bk[i];
                    Vv[(size_t)t * HK * hd + i] += bv[i];
                }
            ref_rope(q, (int)H, hd, t, (float)base, neox);
            ref_rope(K + (size_t)t * HK * hd, (int)HK, hd, t, (float)base, neox);
            for (int h = 0; h < H; h++) {
                int kh = h / grp;
                double mx = -1e30, sum = 0;
                for (int j = 0; j <= t; j++) {
                    double d = 0;
                    for (int i = 0; i < hd; i++) d += (double)q[h * hd + i] * K[((size_t)j * HK + kh) * hd + i];
                    sc[j] = (float)(d / sqrt(hd));
                    if (sc[j] > mx) mx = sc[j];
                }
                for (int j = 0; j <= t; j++) sum += exp(sc[j] - mx);
                for (int i = 0; i < hd; i++) {
                    double a = 0;
                    for (int j = 0; j <= t; j++) a += exp(sc[j] - mx) / sum * Vv[((size_t)j * HK + kh) * hd + i];
                    att[h * hd + i] = (float)a;
                }
            }
            ref_matvec(wo, E, E, att, o);
            for (int i = 0; i < E; i++) xt[i] += o[i];
            ref_rmsnorm(xn, xt, fn, (int)E, (float)eps);
            ref_matvec(wg, F, E, xn, gt);
            ref_matvec(wu, F, E, xn, up);
            for (int i = 0; i < F; i++) gt[i] = gt[i] / (1.0f + expf(-gt[i])) * up[i];
            ref_matvec(wd, E, F, gt, o);
            for (int i = 0; i < E; i++) xt[i] += o[i];
        }
        free(an); free(fn); free(wq); free(wk); free(wv); free(wo); free(wg); free(wu); free(wd);
        free(bq); free(bk); free(bv);
    }
    float *on = deq(g, "output_norm.weight", &r, &c);
    float *wout = deq(g, "output.weight", &r, &c);
    for (int t = 0; t < n; t++) {
        ref_rmsnorm(xn, x + (size_t)t * E, on, (int)E, (float)eps);
        ref_matvec(wout ? wout : emb, V, E, xn, logits + (size_t)t * V);
    }
    free(on); free(wout); free(emb); free(x); free(xn); free(q); free(att); free(o); free(K); free(Vv);
    free(gt); free(up); free(sc);
    gguf_close(&g);
}

/* The paged, batched, threaded engine against the dense reference. F32 and F16 weights
 * multiply f32 activations, so only summation order differs; quantized weights multiply
 * 8-bit quantized activations (as llama.cpp does), which moves logits by about 1%. */
static void test_matches_dense_reference(void **state)
{
    (void)state;
    const struct { const char *arch; dtype_t t; int tied; double tol; } cases[] = {
        {"llama", DTYPE_F32, 0, 1e-4}, {"llama", DTYPE_F16, 1, 1e-4}, {"qwen2", DTYPE_F32, 0, 1e-4},
        {"llama", DTYPE_Q8_0, 0, 2e-2}, {"llama", DTYPE_Q4_K, 0, 3e-2},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *path = model_path(cases[i].arch, cases[i].t, cases[i].tied, 4, 2);
        model_t *m = load(path, 0, 1);
        const int V = model_hparams_of(m)->n_vocab, N = 35;
        int32_t tok[64];
        prompt(tok, N, V, 21);
        float *ref = malloc((size_t)N * V * sizeof(float)), *got = malloc((size_t)N * V * sizeof(float));
        ref_forward(path, tok, N, ref);
        model_ctx_t *ctx = NULL;
        assert_int_equal(model_ctx_new(m, 64, 2, &ctx), 0);
        kv_cache_t *kv = new_kv(m, DTYPE_F32);
        run_seq(ctx, m, kv, tok, N, 7, got, NULL);
        double e = rel_err(got, ref, (size_t)N * V);
        if (e > cases[i].tol)
            fail_msg("%s %s: engine vs dense reference rel err %g > %g", cases[i].arch,
                     dtype_name(cases[i].t), e, cases[i].tol);
        kv_destroy(&kv);
        model_ctx_destroy(&ctx);
        model_destroy(&m);
        free(ref);
        free(got);
    }
}

static void check_decode_equals_recompute(dtype_t wt, dtype_t kvt, const char *arch)
{
    const char *path = model_path(arch, wt, 0, 4, 2);
    model_t *m = load(path, 0, 1);
    const int V = model_hparams_of(m)->n_vocab, N = 37;
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 64, 2, &ctx), 0);
    kv_cache_t *kv = new_kv(m, kvt);
    int32_t tok[64];
    prompt(tok, N, V, 11);
    float *full = malloc((size_t)N * V * sizeof(float));
    float *step = malloc((size_t)N * V * sizeof(float));
    run_seq(ctx, m, kv, tok, N, N, full, NULL);  /* one prefill of everything */
    run_seq(ctx, m, kv, tok, N, 1, step, NULL);  /* token by token */
    double e = rel_err(step, full, (size_t)N * V);
    /* Same integer dot products, only float summation order differs. */
    if (e > 1e-4) fail_msg("%s %s kv %s: decode vs recompute rel err %g", arch, dtype_name(wt),
                           dtype_name(kvt), e);
    run_seq(ctx, m, kv, tok, N, 5, step, NULL);  /* odd chunks */
    e = rel_err(step, full, (size_t)N * V);
    if (e > 1e-4) fail_msg("chunked prefill rel err %g", e);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.blocks_used, 0);
    free(full);
    free(step);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

static void test_decode_equals_recompute_all_types(void **state)
{
    (void)state;
    const dtype_t wts[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q8_0,
                           DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q4_K, DTYPE_Q6_K};
    for (size_t i = 0; i < sizeof wts / sizeof wts[0]; i++)
        check_decode_equals_recompute(wts[i], DTYPE_F32, "llama");
    check_decode_equals_recompute(DTYPE_Q8_0, DTYPE_F32, "qwen2");
}

static void test_kv_types_agree(void **state)
{
    (void)state;
    const char *path = model_path("llama", DTYPE_F32, 0, 4, 2);
    model_t *m = load(path, 0, 1);
    const int V = model_hparams_of(m)->n_vocab, N = 40;
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 64, 2, &ctx), 0);
    int32_t tok[64];
    prompt(tok, N, V, 5);
    float *ref = malloc((size_t)N * V * sizeof(float)), *got = malloc((size_t)N * V * sizeof(float));
    const dtype_t kts[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8};
    const double tol[] = {0, 2e-3, 2e-2, 5e-2}; /* element precision: exact, 11, 8, ~7 bits */
    for (int i = 0; i < 4; i++) {
        kv_cache_t *kv = new_kv(m, kts[i]);
        run_seq(ctx, m, kv, tok, N, 1, i == 0 ? ref : got, NULL);
        if (i > 0) {
            double e = rel_err(got, ref, (size_t)N * V);
            if (e > tol[i]) fail_msg("kv %s vs f32: rel err %g > %g", dtype_name(kts[i]), e, tol[i]);
        }
        kv_destroy(&kv);
    }
    free(ref);
    free(got);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

/* The KV a sequence leaves in the cache, and its logits, do not depend on how its tokens
 * were split into forward passes (one prefill, token by token, odd chunks): the same bytes
 * for every KV type. This is what lets a request's KV be rebuilt on another worker (a
 * retry after a decode worker died re-prefills the prompt and the tokens generated so
 * far) or prefilled in whatever chunks the batch leaves room for, and still decode the
 * tokens single-process generation gives. */
static void test_kv_independent_of_chunking(void **state)
{
    (void)state;
    const char *path = model_path("llama", DTYPE_Q4_1, 0, 4, 2);
    model_t *m = load(path, 0, 1);
    const int V = model_hparams_of(m)->n_vocab, N = 37, L = model_hparams_of(m)->n_layer;
    const int H = model_hparams_of(m)->n_head_kv;
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 64, 2, &ctx), 0);
    int32_t tok[64];
    prompt(tok, N, V, 23);
    const int chunks[] = {N, 1, 5, 16};
    const dtype_t kts[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8};
    for (int t = 0; t < 4; t++) {
        kv_cache_t *kv = new_kv(m, kts[t]);
        float *lg[4];
        void *pk[4];
        size_t n_pk = 0;
        for (int c = 0; c < 4; c++) {
            lg[c] = malloc((size_t)N * V * sizeof(float));
            assert_non_null(lg[c]);
            int seq;
            run_seq(ctx, m, kv, tok, N, chunks[c], lg[c], &seq);
            n_pk = kv_pack_size(kv, seq, 0, L, 0, H);
            pk[c] = malloc(n_pk);
            assert_int_equal(kv_pack(kv, seq, 0, L, 0, H, pk[c], n_pk, NULL), KV_OK);
            assert_int_equal(kv_seq_free(kv, seq), KV_OK);
            if (c == 0) continue;
            if (memcmp(pk[c], pk[0], n_pk) != 0)
                fail_msg("kv %s: the KV of chunks of %d differs from one prefill's", dtype_name(kts[t]), chunks[c]);
            if (memcmp(lg[c], lg[0], (size_t)N * V * sizeof(float)) != 0)
                fail_msg("kv %s: logits with chunks of %d differ from one prefill's", dtype_name(kts[t]), chunks[c]);
        }
        for (int c = 0; c < 4; c++) {
            free(lg[c]);
            free(pk[c]);
        }
        kv_destroy(&kv);
    }
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

static void test_prefix_hit_equals_miss(void **state)
{
    (void)state;
    const char *path = model_path("llama", DTYPE_Q8_0, 0, 4, 2);
    model_t *m = load(path, 0, 1);
    const int V = model_hparams_of(m)->n_vocab;
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 64, 2, &ctx), 0);
    kv_cache_t *kv = new_kv(m, DTYPE_F16);
    int32_t a[60], b[60];
    prompt(a, 60, V, 3);
    memcpy(b, a, 40 * sizeof(int32_t)); /* b shares 40 tokens (2 full blocks + 8) with a */
    prompt(b + 40, 20, V, 4);
    float *la = malloc((size_t)60 * V * sizeof(float)), *miss = malloc((size_t)60 * V * sizeof(float));
    float *hit = malloc((size_t)60 * V * sizeof(float));
    char err[256];
    /* the miss: b alone in a fresh cache */
    kv_cache_t *fresh = new_kv(m, DTYPE_F16);
    run_seq(ctx, m, fresh, b, 60, 60, miss, NULL);
    kv_destroy(&fresh);
    /* a, committed and freed: its full blocks stay cached */
    run_seq(ctx, m, kv, a, 60, 60, la, NULL);
    int seq, cached = 0;
    assert_int_equal(kv_seq_new(kv, &seq), KV_OK);
    assert_int_equal(kv_prefix_attach(kv, seq, b, 59, &cached), KV_OK);
    assert_int_equal(cached, 32);
    assert_int_equal(kv_seq_append(kv, seq, b + cached, 60 - cached), KV_OK);
    model_seq_batch sb = {.seq = seq, .pos0 = cached, .n_tokens = 60 - cached, .tokens = b + cached,
                          .logits = 2};
    if (model_forward(ctx, m, kv, &sb, 1, hit, err, sizeof err) != 0) fail_msg("%s", err);
    double e = rel_err(hit, miss + (size_t)cached * V, (size_t)(60 - cached) * V);
    if (e > 1e-4) fail_msg("prefix hit vs miss rel err %g", e);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_true(st.prefix_hit_tokens >= 32);
    assert_int_equal(kv_seq_free(kv, seq), KV_OK);
    free(la);
    free(miss);
    free(hit);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

static void test_batch_equals_alone(void **state)
{
    (void)state;
    const char *path = model_path("llama", DTYPE_Q4_1, 0, 4, 2);
    model_t *m = load(path, 0, 1);
    const int V = model_hparams_of(m)->n_vocab;
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 128, 2, &ctx), 0);
    kv_cache_t *kv = new_kv(m, DTYPE_F16);
    enum { NS = 3 };
    const int len[NS] = {23, 5, 41};
    int32_t tok[NS][64];
    float *alone[NS];
    for (int s = 0; s < NS; s++) {
        prompt(tok[s], len[s], V, 100 + s);
        alone[s] = malloc((size_t)(len[s] + 1) * V * sizeof(float));
        run_seq(ctx, m, kv, tok[s], len[s], len[s], alone[s], NULL);
    }
    /* one batch: prefill of all three (last-token logits), then a decode step of all three */
    int seq[NS];
    model_seq_batch b[NS];
    for (int s = 0; s < NS; s++) {
        kv_cache_t *k = kv;
        assert_int_equal(kv_seq_new(k, &seq[s]), KV_OK);
        assert_int_equal(kv_seq_append(k, seq[s], tok[s], len[s] - 1), KV_OK);
        b[s] = (model_seq_batch){.seq = seq[s], .pos0 = 0, .n_tokens = len[s] - 1, .tokens = tok[s],
                                 .logits = 1};
    }
    /* a fresh cache would hit the prefix cache; that is fine: positions are what matter */
    float *out = malloc((size_t)NS * V * sizeof(float));
    char err[256];
    if (model_forward(ctx, m, kv, b, NS, out, err, sizeof err) != 0) fail_msg("%s", err);
    for (int s = 0; s < NS; s++) {
        double e = rel_err(out + (size_t)s * V, alone[s] + (size_t)(len[s] - 2) * V, V);
        if (e > 1e-4) fail_msg("batched prefill seq %d rel err %g", s, e);
    }
    for (int s = 0; s < NS; s++) {
        assert_int_equal(kv_seq_append(kv, seq[s], &tok[s][len[s] - 1], 1), KV_OK);
        b[s] = (model_seq_batch){.seq = seq[s], .pos0 = len[s] - 1, .n_tokens = 1,
                                 .tokens = &tok[s][len[s] - 1], .logits = 1};
    }
    if (model_forward(ctx, m, kv, b, NS, out, err, sizeof err) != 0) fail_msg("%s", err);
    for (int s = 0; s < NS; s++) {
        double e = rel_err(out + (size_t)s * V, alone[s] + (size_t)(len[s] - 1) * V, V);
        if (e > 1e-4) fail_msg("batched decode seq %d rel err %g", s, e);
        assert_int_equal(kv_seq_free(kv, seq[s]), KV_OK);
        free(alone[s]);
    }
    free(out);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

/* ---- tensor parallelism with in-process collectives ------------------------------ */

enum { MAX_TP = 4 };
typedef struct {
    int size;
    pthread_barrier_t bar;
    float *bufs[MAX_TP];
    const float *parts[MAX_TP];
    int vocab0[MAX_TP], nvocab[MAX_TP], n_vocab;
} tp_group;
typedef struct {
    tp_group *g;
    int rank;
} tp_member;

static int tp_allreduce(void *user, float *buf, size_t n)
{
    tp_member *me = user;
    tp_group *g = me->g;
    g->bufs[me->rank] = buf;
    pthread_barrier_wait(&g->bar);
    float *sum = malloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) {
        double s = 0;
        for (int r = 0; r < g->size; r++) s += g->bufs[r][i]; /* same order on every rank */
        sum[i] = (float)s;
    }
    pthread_barrier_wait(&g->bar);
    memcpy(buf, sum, n * sizeof(float));
    free(sum);
    pthread_barrier_wait(&g->bar);
    return 0;
}

static int tp_gather(void *user, const float *part, int n_rows, float *full)
{
    tp_member *me = user;
    tp_group *g = me->g;
    g->parts[me->rank] = part;
    pthread_barrier_wait(&g->bar);
    for (int row = 0; row < n_rows; row++)
        for (int r = 0; r < g->size; r++)
            memcpy(full + (size_t)row * g->n_vocab + g->vocab0[r],
                   g->parts[r] + (size_t)row * g->nvocab[r], (size_t)g->nvocab[r] * sizeof(float));
    pthread_barrier_wait(&g->bar);
    return 0;
}

typedef struct {
    tp_member me;
    model_t *m;
    const int32_t *tok;
    int n;
    float *logits;
    int rc;
} tp_job;

static void *tp_thread(void *p)
{
    tp_job *j = p;
    model_ctx_t *ctx = NULL;
    kv_cache_t *kv = NULL;
    j->rc = -1;
    if (model_ctx_new(j->m, 64, 1, &ctx) != 0) return NULL;
    model_collectives c = {.user = &j->me, .allreduce_sum = tp_allreduce, .gather_vocab = tp_gather};
    model_ctx_set_collectives(ctx, &c);
    kv_config kc = model_kv_config(j->m, DTYPE_F32, 1u << 20);
    int seq;
    char err[256];
    if (kv_new(&kc, &kv) != KV_OK || kv_seq_new(kv, &seq) != KV_OK) goto out;
    const int V = model_hparams_of(j->m)->n_vocab;
    /* prefill 20 tokens, then decode the rest one by one */
    for (int p = 0; p < j->n;) {
        int k = p == 0 ? 20 : 1;
        if (kv_seq_append(kv, seq, j->tok + p, k) != KV_OK) goto out;
        model_seq_batch b = {.seq = seq, .pos0 = p, .n_tokens = k, .tokens = j->tok + p, .logits = 2};
        if (model_forward(ctx, j->m, kv, &b, 1, j->logits + (size_t)p * V, err, sizeof err) != 0) {
            fprintf(stderr, "rank %d: %s\n", j->me.rank, err);
            goto out;
        }
        p += k;
    }
    j->rc = 0;
out:
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    return NULL;
}

static void check_tp(int size, int n_head, int n_head_kv)
{
    const char *path = model_path("llama", DTYPE_F16, 0, n_head, n_head_kv);
    model_t *m1 = load(path, 0, 1);
    const int V = model_hparams_of(m1)->n_vocab, N = 30;
    int32_t tok[64];
    prompt(tok, N, V, 9);
    float *ref = malloc((size_t)N * V * sizeof(float));
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m1, 64, 1, &ctx), 0);
    kv_cache_t *kv = new_kv(m1, DTYPE_F32);
    run_seq(ctx, m1, kv, tok, N, 20, ref, NULL);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    model_destroy(&m1);

    tp_group g = {.size = size, .n_vocab = V};
    pthread_barrier_init(&g.bar, NULL, (unsigned)size);
    tp_job jobs[MAX_TP];
    pthread_t th[MAX_TP];
    for (int r = 0; r < size; r++) {
        jobs[r] = (tp_job){.me = {&g, r}, .m = load(path, r, size), .tok = tok, .n = N,
                           .logits = malloc((size_t)N * V * sizeof(float))};
        const model_shard *sh = model_shard_of(jobs[r].m);
        g.vocab0[r] = sh->vocab0;
        g.nvocab[r] = sh->n_vocab;
        assert_int_equal(sh->n_head, n_head / size);
    }
    for (int r = 0; r < size; r++) pthread_create(&th[r], NULL, tp_thread, &jobs[r]);
    for (int r = 0; r < size; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < size; r++) {
        assert_int_equal(jobs[r].rc, 0);
        double e = rel_err(jobs[r].logits, ref, (size_t)N * V);
        /* Only the reduction order of the row-split products differs. */
        if (e > 1e-4) fail_msg("tp %d rank %d vs tp 1: rel err %g", size, r, e);
        free(jobs[r].logits);
        model_destroy(&jobs[r].m);
    }
    pthread_barrier_destroy(&g.bar);
    free(ref);
}

static void test_tensor_parallel(void **state)
{
    (void)state;
    check_tp(2, 4, 2); /* KV heads split */
    check_tp(4, 4, 2); /* KV heads replicated: 4 ranks over 2 KV heads */
}

static void test_bad_tp_and_batches(void **state)
{
    (void)state;
    const char *path = model_path("llama", DTYPE_F32, 0, 4, 2);
    model_t *m = NULL;
    char err[256];
    assert_int_equal(model_load(path, 0, 3, &m, err, sizeof err), -1);
    assert_null(m);
    assert_non_null(strstr(err, "tp_size 3"));
    assert_int_equal(model_load(path, 2, 2, &m, err, sizeof err), -1);
    assert_int_equal(model_load("/nonexistent/x.gguf", 0, 1, &m, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/x.gguf"));

    m = load(path, 0, 1);
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 8, 1, &ctx), 0);
    kv_cache_t *kv = new_kv(m, DTYPE_F32);
    int seq;
    int32_t tok[16] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16};
    float *lg = malloc((size_t)16 * model_hparams_of(m)->n_vocab * sizeof(float));
    assert_int_equal(kv_seq_new(kv, &seq), KV_OK);
    model_seq_batch b = {.seq = seq, .pos0 = 0, .n_tokens = 4, .tokens = tok, .logits = 1};
    assert_int_equal(model_forward(ctx, m, kv, &b, 1, lg, err, sizeof err), -1); /* not reserved */
    assert_non_null(strstr(err, "not reserved"));
    assert_int_equal(kv_seq_append(kv, seq, tok, 16), KV_OK);
    b.n_tokens = 16;
    assert_int_equal(model_forward(ctx, m, kv, &b, 1, lg, err, sizeof err), -1); /* > max_tokens */
    b.n_tokens = 4;
    b.seq = 999;
    assert_int_equal(model_forward(ctx, m, kv, &b, 1, lg, err, sizeof err), -1);
    assert_non_null(strstr(err, "unknown KV sequence"));
    b.seq = seq;
    tok[0] = 1 << 30;
    assert_int_equal(model_forward(ctx, m, kv, &b, 1, lg, err, sizeof err), -1);
    assert_non_null(strstr(err, "outside the vocabulary"));
    free(lg);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

static int setup(void **state)
{
    (void)state;
    return tu_mkdtemp(tmpdir, sizeof tmpdir, "test-model");
}

static int teardown(void **state)
{
    (void)state;
    return tu_rmtree(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_matches_dense_reference),
        cmocka_unit_test(test_decode_equals_recompute_all_types),
        cmocka_unit_test(test_kv_types_agree),
        cmocka_unit_test(test_kv_independent_of_chunking),
        cmocka_unit_test(test_prefix_hit_equals_miss),
        cmocka_unit_test(test_batch_equals_alone),
        cmocka_unit_test(test_tensor_parallel),
        cmocka_unit_test(test_bad_tp_and_batches),
    };
    return cmocka_run_group_tests_name("model", tests, setup, teardown);
}
