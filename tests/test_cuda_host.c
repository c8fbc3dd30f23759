/* tests/test_cuda_host.c: the CUDA backend's host side, on any machine (CI has no GPU).
 *
 * - type tables and names (KV element types, weights the GPU dequantizes, device names);
 * - peak figures of a device from its clocks (H100 SXM: ~3.35 TB/s, ~1 PFLOP/s bf16);
 * - the weight plan of tiny random models of every type: every tensor placed, aligned,
 *   Q/K/V and gate/up adjacent (fused products), Q4_1 minimums in the exact mode only,
 *   tensor-parallel shards by rows and columns, misaligned column shards refused;
 * - the KV pool plan (block bytes per type, layer offsets, FP8 scales) and its errors;
 * - the whole plan from a memory budget, and every way a budget can be too small, each
 *   a clear message naming the figures; the host kv/ configuration gets the same blocks;
 * - attention work (rows per tile, split-K counts, tiles of a mixed batch) and the
 *   sampler's device/host choice and penalty ids;
 * - without a GPU: asking for a device gives "no CUDA device: cudaGetDeviceCount: ..."
 *   (or, built with CUDA=0, "built without CUDA"), and so does loading a GPU model.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "kernels/cuda.h"
#include "kernels/cuda_model.h"
#include "kernels/cuda_plan.h"
#include "kv/kv.h"
#include "tests/support/gguf_write.h"
#include "tests/support/testutil.h"
#include "worker/model.h"

static char tmpdir[256];

static const char *model_path(const char *arch, dtype_t type, int tied)
{
    static char path[512];
    snprintf(path, sizeof path, "%s/%s-%s-%d.gguf", tmpdir, arch, dtype_name(type), tied);
    if (access(path, R_OK) == 0) return path;
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.arch = arch;
    o.type = type;
    o.tied = tied;
    o.seed = 5;
    const int kq = type == DTYPE_Q4_K || type == DTYPE_Q6_K;
    o.n_embd = kq ? 256 : 128;
    o.n_ff = kq ? 512 : 256;
    o.n_head = 8;
    o.n_head_kv = 4;
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

static void assert_contains(const char *s, const char *sub)
{
    if (!strstr(s, sub)) fail_msg("message '%s' lacks '%s'", s, sub);
}

/* ---- names and tables ----------------------------------------------------------------------- */

static void test_names(void **state)
{
    (void)state;
    const cuda_kv_type all[] = {CUDA_KV_F16, CUDA_KV_BF16, CUDA_KV_FP8, CUDA_KV_F32};
    const size_t bytes[] = {2, 2, 1, 4};
    for (int i = 0; i < 4; i++) {
        cuda_kv_type t;
        assert_int_equal(cuda_kv_type_parse(cuda_kv_type_name(all[i]), &t), 0);
        assert_int_equal(t, all[i]);
        assert_int_equal(cuda_kv_elt_bytes(all[i]), bytes[i]);
    }
    cuda_kv_type t;
    assert_int_equal(cuda_kv_type_parse("e4m3", &t), 0);
    assert_int_equal(t, CUDA_KV_FP8);
    assert_int_equal(cuda_kv_type_parse("int8", &t), -1);
    assert_int_equal(cuda_kv_type_parse(NULL, &t), -1);
    assert_string_equal(cuda_kv_type_name((cuda_kv_type)99), "unknown");
    assert_int_equal(cuda_kv_elt_bytes((cuda_kv_type)99), 0);

    const dtype_t yes[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q8_0,
                           DTYPE_Q4_K, DTYPE_Q6_K};
    for (size_t i = 0; i < sizeof yes / sizeof *yes; i++) assert_true(cuda_weight_type_supported(yes[i]));
    assert_false(cuda_weight_type_supported(DTYPE_Q8_1));
    assert_false(cuda_weight_type_supported(DTYPE_Q8_K));
    assert_false(cuda_weight_type_supported(DTYPE_I8));

    int idx = -1;
    char err[128];
    assert_int_equal(cuda_device_parse("cuda:0", &idx, err, sizeof err), 0);
    assert_int_equal(idx, 0);
    assert_int_equal(cuda_device_parse("cuda:7", &idx, err, sizeof err), 0);
    assert_int_equal(idx, 7);
    assert_int_equal(cuda_device_parse("3", &idx, err, sizeof err), 0);
    assert_int_equal(idx, 3);
    const char *bad[] = {"cuda:", "cuda:x", "-1", "cuda:-1", "gpu0", "", "cuda:1x"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        err[0] = '\0';
        assert_int_equal(cuda_device_parse(bad[i], &idx, err, sizeof err), -1);
        assert_contains(err, "bad CUDA device");
    }

    duet_cuda_err e = {0};
    duet_cuda_err_set(&e, "first %d", 1);
    duet_cuda_err_set(&e, "second");
    assert_true(e.set);
    assert_string_equal(e.msg, "first 1");
    duet_cuda_err_set(NULL, "nothing"); /* no crash */
}

static void test_peaks(void **state)
{
    (void)state;
    /* H100 SXM5: 132 SMs at 1980 MHz, HBM3 2619 MHz on a 5120-bit bus */
    double bw = cuda_peak_bw_gbs(2619000, 5120);
    assert_true(bw > 3340 && bw < 3360);
    double tf = cuda_peak_bf16_tflops(9, 0, 132, 1980000);
    assert_true(tf > 1060 && tf < 1080);
    assert_int_equal(cuda_bf16_flops_per_clock_sm(8, 0), 2048);
    assert_int_equal(cuda_bf16_flops_per_clock_sm(7, 5), 0);
    assert_true(cuda_peak_bf16_tflops(7, 5, 40, 1500000) == 0.0);
    assert_true(cuda_peak_bw_gbs(0, 5120) == 0.0);
}

/* ---- weights ---------------------------------------------------------------------------------- */

static size_t wbytes(const cuda_wdesc *d, size_t sb) { return (size_t)d->n_out * (size_t)d->n_in * sb; }

/* Every copy inside the arena and aligned; matrices adjacent where products are fused. */
static void check_wplan(const cuda_wplan *w, const model_hparams *hp, const model_shard *sh, int exact)
{
    const size_t sb = exact ? 4 : 2;
    assert_int_equal(w->store, exact ? CUDA_ACT_F32 : CUDA_ACT_BF16);
    assert_int_equal(w->n_layer, hp->n_layer);
    for (int i = 0; i < w->n_copies; i++) {
        const cuda_wcopy *c = &w->copies[i];
        size_t bytes = c->kind == CUDA_COPY_RAW ? dtype_row_bytes(c->type, c->n_in) * (size_t)c->n_rows
                       : c->kind == CUDA_COPY_VECTOR ? (size_t)c->n_cols * 4
                                                     : (size_t)c->n_rows * (size_t)c->n_cols * sb;
        assert_true(c->dst + bytes <= w->bytes);
        assert_true(c->dst % 4 == 0);
        assert_non_null(c->src);
        assert_true(c->r0 >= 0 && c->c0 >= 0 && c->c0 + c->n_cols <= c->n_in);
        if (c->mins != CUDA_NO_OFF) {
            assert_true(exact && c->type == DTYPE_Q4_1);
            assert_int_equal(c->mins % CUDA_ALIGN, 0);
            assert_true(c->mins + (size_t)c->n_rows * (size_t)(c->n_cols / 32) * 4 <= w->bytes);
        } else if (c->kind == CUDA_COPY_MATRIX) {
            assert_false(exact && c->type == DTYPE_Q4_1);
        }
    }
    const int hd = hp->head_dim;
    for (int il = 0; il < hp->n_layer; il++) {
        const cuda_layer_w *L = &w->layers[il];
        assert_int_equal(L->q.off % CUDA_ALIGN, 0);
        assert_int_equal(L->q.n_out, sh->n_head * hd);
        assert_int_equal(L->k.n_out, sh->n_head_kv * hd);
        assert_int_equal(L->k.off, L->q.off + wbytes(&L->q, sb));
        assert_int_equal(L->v.off, L->k.off + wbytes(&L->k, sb));
        assert_int_equal(L->up.off, L->gate.off + wbytes(&L->gate, sb));
        assert_int_equal(L->gate.n_out, sh->n_ff);
        assert_int_equal(L->o.n_in, sh->n_head * hd);
        assert_int_equal(L->o.n_out, hp->n_embd);
        assert_int_equal(L->down.n_in, sh->n_ff);
        assert_int_equal(L->attn_norm % CUDA_ALIGN, 0);
        if (hp->qkv_bias)
            assert_true(L->bqkv != CUDA_NO_OFF && L->bqkv % CUDA_ALIGN == 0);
        else
            assert_true(L->bqkv == CUDA_NO_OFF);
    }
    assert_int_equal(w->out.n_out, sh->n_vocab);
    assert_int_equal(w->out.n_in, hp->n_embd);
    assert_true(w->max_row_bytes > 0);
}

static void test_wplan_types(void **state)
{
    (void)state;
    const dtype_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q8_0, DTYPE_Q4_0, DTYPE_Q4_1,
                             DTYPE_Q4_K, DTYPE_Q6_K};
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        for (int exact = 0; exact < 2; exact++)
            for (int tied = 0; tied < 2; tied++) {
                model_t *m = load(model_path("llama", types[i], tied), 0, 1);
                cuda_wplan w;
                char err[256];
                assert_int_equal(cuda_wplan_make(model_gguf(m), model_hparams_of(m), model_shard_of(m),
                                                 exact ? CUDA_PREC_EXACT : CUDA_PREC_BF16, &w, err,
                                                 sizeof err), 0);
                check_wplan(&w, model_hparams_of(m), model_shard_of(m), exact);
                /* embedding raw, output norm, output, and 2 norms + 7 matrices per layer */
                assert_int_equal(w.n_copies, 3 + model_hparams_of(m)->n_layer * 9);
                assert_int_equal(w.embd_type, gguf_find_tensor(model_gguf(m), "token_embd.weight")->type);
                assert_true(w.out.mins == CUDA_NO_OFF || (exact && w.out.src_type == DTYPE_Q4_1));
                if (exact && types[i] == DTYPE_Q4_1) assert_true(w.layers[0].q.mins != CUDA_NO_OFF);
                cuda_wplan_free(&w);
                cuda_wplan_free(&w); /* twice is fine */
                model_destroy(&m);
            }
}

static void test_wplan_qwen2_tp(void **state)
{
    (void)state;
    model_t *m = load(model_path("qwen2", DTYPE_F16, 0), 0, 1);
    cuda_wplan w;
    char err[256];
    assert_int_equal(cuda_wplan_make(model_gguf(m), model_hparams_of(m), model_shard_of(m), CUDA_PREC_BF16, &w,
                                     err, sizeof err), 0);
    check_wplan(&w, model_hparams_of(m), model_shard_of(m), 0);
    assert_int_equal(w.n_copies, 3 + model_hparams_of(m)->n_layer * 12); /* + 3 biases */
    cuda_wplan_free(&w);
    model_destroy(&m);

    /* TP shards: rank 1 of 2 takes the second half of the heads and of the ffn columns */
    m = load(model_path("llama", DTYPE_Q8_0, 0), 1, 2);
    const model_shard *sh = model_shard_of(m);
    const model_hparams *hp = model_hparams_of(m);
    assert_int_equal(cuda_wplan_make(model_gguf(m), hp, sh, CUDA_PREC_BF16, &w, err, sizeof err), 0);
    check_wplan(&w, hp, sh, 0);
    int seen_o = 0, seen_down = 0;
    for (int i = 0; i < w.n_copies; i++) {
        const cuda_wcopy *c = &w.copies[i];
        if (strcmp(c->name, "blk.0.attn_q.weight") == 0) {
            assert_int_equal(c->r0, (int64_t)sh->head0 * hp->head_dim);
            assert_int_equal(c->n_rows, (int64_t)sh->n_head * hp->head_dim);
        }
        if (strcmp(c->name, "blk.0.attn_output.weight") == 0) {
            assert_int_equal(c->c0, (int64_t)sh->head0 * hp->head_dim);
            assert_int_equal(c->n_cols, (int64_t)sh->n_head * hp->head_dim);
            assert_int_equal(c->n_rows, hp->n_embd);
            seen_o = 1;
        }
        if (strcmp(c->name, "blk.0.ffn_down.weight") == 0) {
            assert_int_equal(c->c0, sh->ff0);
            assert_int_equal(c->n_cols, sh->n_ff);
            seen_down = 1;
        }
    }
    assert_true(seen_o && seen_down);
    assert_int_equal(w.out.n_out, sh->n_vocab);
    cuda_wplan_free(&w);
    model_destroy(&m);

    /* a K-quant split by columns inside a 256-element block is refused, naming the tensor */
    m = load(model_path("llama", DTYPE_Q4_K, 0), 0, 1);
    model_shard bad = *model_shard_of(m);
    bad.ff0 = 128;
    bad.n_ff = 128;
    assert_int_equal(cuda_wplan_make(model_gguf(m), model_hparams_of(m), &bad, CUDA_PREC_BF16, &w, err, sizeof err),
                     -1);
    assert_contains(err, "block boundaries");
    assert_contains(err, "blk.0.ffn_down.weight");
    assert_null(w.copies);
    model_destroy(&m);
}

/* ---- KV ----------------------------------------------------------------------------------------- */

static void test_kv_plan(void **state)
{
    (void)state;
    /* 2 layers, 4 KV heads, head_dim 64, 16-token blocks */
    assert_int_equal(cuda_kv_block_bytes(2, 4, 64, 16, CUDA_KV_F16), (size_t)2 * 2 * 4 * 16 * 64 * 2);
    assert_int_equal(cuda_kv_block_bytes(2, 4, 64, 16, CUDA_KV_F32), (size_t)2 * 2 * 4 * 16 * 64 * 4);
    assert_int_equal(cuda_kv_block_bytes(2, 4, 64, 16, CUDA_KV_FP8), (size_t)2 * 2 * 4 * 16 * (64 + 4));
    assert_int_equal(cuda_kv_block_bytes(0, 4, 64, 16, CUDA_KV_F16), 0);
    const cuda_kv_type all[] = {CUDA_KV_F16, CUDA_KV_BF16, CUDA_KV_FP8, CUDA_KV_F32};
    for (int i = 0; i < 4; i++) {
        cuda_kv_plan p;
        char err[256];
        const size_t bytes = (size_t)10 << 20;
        assert_int_equal(cuda_kv_plan_make(3, 4, 64, 16, all[i], bytes, &p, err, sizeof err), 0);
        assert_true(p.bytes <= bytes);
        assert_true(p.n_blocks >= (int)(bytes / p.block_bytes) - 2);
        assert_int_equal(p.data_bytes, (size_t)p.n_blocks * 4 * 16 * 64 * p.elt_bytes);
        size_t end = 0;
        for (int l = 0; l < 3; l++) {
            size_t k, v, ks, vs;
            cuda_kv_layer_offsets(&p, l, &k, &v, &ks, &vs);
            assert_true(k >= end && k % CUDA_ALIGN == 0 && v % CUDA_ALIGN == 0);
            assert_true(v >= k + p.data_bytes);
            if (all[i] == CUDA_KV_FP8) {
                assert_true(ks >= v + p.data_bytes && vs >= ks + p.scale_bytes);
                assert_int_equal(p.scale_bytes, (size_t)p.n_blocks * 4 * 16 * 4);
                end = vs + p.scale_bytes;
            } else {
                assert_true(ks == CUDA_NO_OFF && vs == CUDA_NO_OFF);
                end = v + p.data_bytes;
            }
        }
        assert_true(end <= p.bytes);
    }
    cuda_kv_plan p;
    char err[256];
    assert_int_equal(cuda_kv_plan_make(3, 4, 64, 16, CUDA_KV_F16, 1000, &p, err, sizeof err), -1);
    assert_contains(err, "hold no KV block");
    assert_int_equal(cuda_kv_plan_make(3, 4, 64, 0, CUDA_KV_F16, 1 << 20, &p, err, sizeof err), -1);
    assert_contains(err, "bad KV pool shape");
}

/* ---- the whole plan ------------------------------------------------------------------------------ */

static void test_plan_budget(void **state)
{
    (void)state;
    model_t *m = load(model_path("llama", DTYPE_Q4_1, 0), 0, 1);
    cuda_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.max_ctx = 512;
    cuda_plan p;
    char err[512];
    const size_t GiB = (size_t)1 << 30;
    assert_int_equal(cuda_plan_make(m, &cfg, 2 * GiB, &p, err, sizeof err), 0);
    assert_true(p.budget == 2 * GiB / 10 * 9);
    assert_true(p.w.bytes + p.ws.bytes + p.kv.bytes <= p.budget);
    assert_true(p.ws.bytes >= CUDA_STAGING_MIN);
    assert_int_equal(p.cfg.block_tokens, 16);
    assert_int_equal(p.cfg.max_tokens, 512);
    assert_int_equal(p.cfg.max_logit_rows, p.cfg.max_seqs);
    assert_int_equal(p.ws.max_blocks, 512 / 16);
    assert_true(p.kv.n_blocks >= 32);
    assert_int_equal(p.ws.xq, CUDA_NO_OFF); /* bf16 mode: no quantized activations */
    assert_int_equal(p.ws.tmp, CUDA_NO_OFF);
    /* the host kv/ cache that keeps the books has exactly the device's blocks */
    kv_config kc = cuda_plan_kv_config(&p);
    kv_cache_t *kv = NULL;
    kc.budget_bytes = kv_block_bytes(&kc) * 8; /* the real one is large; same formula, fewer blocks */
    assert_int_equal(kv_new(&kc, &kv), KV_OK);
    assert_int_equal(kv_n_blocks(kv), 8);
    kv_destroy(&kv);
    kc = cuda_plan_kv_config(&p);
    assert_int_equal(kc.budget_bytes / kv_block_bytes(&kc), (size_t)p.kv.n_blocks);
    assert_int_equal(kc.block_tokens, 16);
    assert_int_equal(kc.n_kv_heads, model_shard_of(m)->n_head_kv);
    cuda_plan_free(&p);

    /* EXACT: f32 weights (bigger) and quantized-activation buffers */
    cuda_model_config ex = cfg;
    ex.precision = CUDA_PREC_EXACT;
    cuda_plan pe;
    assert_int_equal(cuda_plan_make(m, &ex, 2 * GiB, &pe, err, sizeof err), 0);
    assert_true(pe.ws.xq != CUDA_NO_OFF && pe.ws.xk != CUDA_NO_OFF && pe.ws.bsum != CUDA_NO_OFF);
    assert_int_equal(pe.w.store, CUDA_ACT_F32);
    cuda_plan_free(&pe);

    /* a budget too small for the weights and workspace */
    cuda_model_config small = cfg;
    small.mem_budget = 16 << 20;
    assert_int_equal(cuda_plan_make(m, &small, 2 * GiB, &p, err, sizeof err), -1);
    assert_contains(err, "cannot hold the weights");
    assert_contains(err, "MiB");
    /* a budget above what is free */
    small.mem_budget = 4 * GiB;
    assert_int_equal(cuda_plan_make(m, &small, 2 * GiB, &p, err, sizeof err), -1);
    assert_contains(err, "exceeds");
    /* a KV request beyond what the budget leaves */
    cuda_model_config kvbig = cfg;
    kvbig.mem_budget = GiB;
    kvbig.kv_bytes = GiB;
    assert_int_equal(cuda_plan_make(m, &kvbig, 2 * GiB, &p, err, sizeof err), -1);
    assert_contains(err, "does not fit");
    /* room for less than one sequence of max_ctx */
    cuda_model_config ctx = cfg;
    ctx.max_ctx = 1 << 22;
    ctx.mem_budget = 160 << 20;
    assert_int_equal(cuda_plan_make(m, &ctx, 2 * GiB, &p, err, sizeof err), -1);
    assert_contains(err, "less than one sequence");
    /* bad configuration values */
    cuda_model_config neg = cfg;
    neg.max_tokens = -1;
    assert_int_equal(cuda_plan_make(m, &neg, 2 * GiB, &p, err, sizeof err), -1);
    assert_contains(err, "negative");
    neg = cfg;
    neg.kv_type = (cuda_kv_type)42;
    assert_int_equal(cuda_plan_make(m, &neg, 2 * GiB, &p, err, sizeof err), -1);
    assert_contains(err, "KV type");
    model_destroy(&m);

    /* TP: the workspace gets the partial-sum and vocabulary-part buffers */
    m = load(model_path("llama", DTYPE_F32, 0), 0, 2);
    assert_int_equal(cuda_plan_make(m, &cfg, 2 * GiB, &p, err, sizeof err), 0);
    assert_true(p.ws.tmp != CUDA_NO_OFF && p.ws.lpart != CUDA_NO_OFF);
    assert_int_equal(p.n_q, model_shard_of(m)->n_head * model_hparams_of(m)->head_dim);
    cuda_plan_free(&p);
    model_destroy(&m);
}

static void test_config_resolve(void **state)
{
    (void)state;
    model_hparams hp;
    memset(&hp, 0, sizeof hp);
    hp.n_ctx_train = 32768;
    cuda_model_config c;
    memset(&c, 0, sizeof c);
    char err[256];
    assert_int_equal(cuda_model_config_resolve(&c, &hp, err, sizeof err), 0);
    assert_int_equal(c.max_ctx, 8192);
    assert_int_equal(c.max_seqs, 64);
    assert_int_equal(c.max_graphs, 16);
    assert_int_equal(c.kv_type, CUDA_KV_F16);
    memset(&c, 0, sizeof c);
    c.max_tokens = 8;
    c.max_logit_rows = 100;
    hp.n_ctx_train = 1024;
    assert_int_equal(cuda_model_config_resolve(&c, &hp, err, sizeof err), 0);
    assert_int_equal(c.max_seqs, 8);
    assert_int_equal(c.max_logit_rows, 8);
    assert_int_equal(c.max_ctx, 1024);
    c.precision = (cuda_precision)7;
    assert_int_equal(cuda_model_config_resolve(&c, &hp, err, sizeof err), -1);
    assert_contains(err, "precision");
    memset(&c, 0, sizeof c);
    c.device = -2;
    assert_int_equal(cuda_model_config_resolve(&c, &hp, err, sizeof err), -1);
    assert_contains(err, "negative");
}

/* ---- attention work and sampling ------------------------------------------------------------------- */

static void test_attn_work(void **state)
{
    (void)state;
    assert_int_equal(cuda_attn_rows_per_tile(4, 128), 16);
    assert_int_equal(cuda_attn_rows_per_tile(3, 64), 21);
    assert_int_equal(cuda_attn_rows_per_tile(8, 256), 4);
    assert_int_equal(cuda_attn_rows_per_tile(64, 128), 1);
    assert_true(cuda_attn_supported(64, 3));
    assert_true(cuda_attn_supported(128, 64));
    assert_false(cuda_attn_supported(256, 64));
    assert_false(cuda_attn_supported(100, 1));
    assert_false(cuda_attn_supported(512, 1));

    /* decode batch 1 on 132 SMs with 8 KV heads: ~2 blocks per SM, capped */
    assert_int_equal(cuda_attn_splits(1, 8, 132, 1, 1024), CUDA_ATTN_MAX_SPLITS);
    assert_int_equal(cuda_attn_splits(8, 8, 132, 8, 1024), 5);
    assert_int_equal(cuda_attn_splits(64, 8, 132, 64, 1024), 1);
    assert_int_equal(cuda_attn_splits(2, 8, 132, 2, 40), 17); /* 2 * 17 <= 40 */
    assert_int_equal(cuda_attn_splits(1, 1, 132, 512, 1024), 2);
    assert_int_equal(cuda_attn_splits(0, 8, 132, 1, 1024), 1);

    /* a decode token, a 40-token prefill chunk after a 100-token cached prefix, a decode */
    const int n_new[] = {1, 40, 1}, pos0[] = {300, 100, 7}, bt_off[] = {0, 64, 128};
    cuda_attn_tile t[16];
    int n = cuda_attn_tiles(n_new, pos0, bt_off, 3, 16, t, 16);
    assert_int_equal(n, 5);
    assert_int_equal(t[0].row0, 0);
    assert_int_equal(t[0].n_rows, 1);
    assert_int_equal(t[0].pos0, 300);
    assert_int_equal(t[1].row0, 1);
    assert_int_equal(t[1].n_rows, 16);
    assert_int_equal(t[1].pos0, 100);
    assert_int_equal(t[1].bt_off, 64);
    assert_int_equal(t[3].row0, 33);
    assert_int_equal(t[3].n_rows, 8);
    assert_int_equal(t[3].pos0, 132);
    assert_int_equal(t[4].row0, 41);
    assert_int_equal(t[4].pos0, 7);
    assert_int_equal(t[4].bt_off, 128);
    assert_int_equal(cuda_attn_tiles(n_new, pos0, bt_off, 3, 16, t, 4), -1);
    assert_int_equal(cuda_attn_tiles(n_new, pos0, bt_off, 3, 0, t, 16), -1);
}

static void test_sample_helpers(void **state)
{
    (void)state;
    sample_params p = sample_params_default();
    assert_int_equal(cuda_sample_k(&p, 49152), 40);
    p.temperature = 0.0f;
    assert_int_equal(cuda_sample_k(&p, 49152), 0);
    p.temperature = 0.7f;
    p.top_k = 0;
    assert_int_equal(cuda_sample_k(&p, 49152), -1); /* the whole vocabulary: host */
    assert_int_equal(cuda_sample_k(&p, 500), 500);
    p.top_k = 2000;
    assert_int_equal(cuda_sample_k(&p, 49152), -1);
    p.top_k = CUDA_SAMPLE_K_MAX;
    assert_int_equal(cuda_sample_k(&p, 49152), CUDA_SAMPLE_K_MAX);
    assert_int_equal(cuda_sample_k(NULL, 10), -1);

    int32_t ids[8];
    const int32_t hist[] = {5, 9, 5, -1, 70000, 9, 3, 11};
    p = sample_params_default();
    assert_int_equal(cuda_sample_penalty_ids(&p, hist, 8, 1000, ids, 8), 0); /* penalty 1: off */
    p.repeat_penalty = 1.3f;
    p.repeat_last_n = 4; /* 70000 (out of range), 9, 3, 11 */
    assert_int_equal(cuda_sample_penalty_ids(&p, hist, 8, 1000, ids, 8), 3);
    assert_int_equal(ids[0], 9);
    assert_int_equal(ids[1], 3);
    assert_int_equal(ids[2], 11);
    p.repeat_last_n = -1; /* all: 5, 9, 3, 11 distinct */
    assert_int_equal(cuda_sample_penalty_ids(&p, hist, 8, 1000, ids, 8), 4);
    assert_int_equal(cuda_sample_penalty_ids(&p, hist, 8, 1000, ids, 3), -1);
    p.repeat_last_n = 0;
    assert_int_equal(cuda_sample_penalty_ids(&p, hist, 8, 1000, ids, 8), 0);
}

/* ---- without a GPU -------------------------------------------------------------------------------- */

static int gpu_present(void) { return access("/dev/nvidiactl", F_OK) == 0 || access("/dev/nvidia0", F_OK) == 0; }

static void test_no_device(void **state)
{
    (void)state;
    duet_cuda_err e = {0};
    int n = -1;
    int rc = cuda_device_count(&n, &e);
    if (!cuda_built()) {
        assert_int_equal(rc, -1);
        assert_int_equal(n, 0);
        assert_contains(e.msg, "built without CUDA");
    } else if (!gpu_present()) {
        assert_int_equal(rc, -1);
        assert_int_equal(n, 0);
        if (strncmp(e.msg, "no CUDA device: cudaGetDeviceCount", 34) != 0) fail_msg("message: %s", e.msg);
    } else if (rc == 0) {
        assert_true(n >= 1);
    }
    print_message("cuda_device_count: %s\n", rc == 0 ? "a GPU is present" : e.msg);

    duet_cuda_err e2 = {0};
    cuda_device_info info;
    rc = cuda_device_select(4096, &info, &e2);
    assert_int_equal(rc, -1);
    assert_true(strstr(e2.msg, "does not exist") || strstr(e2.msg, "no CUDA device"));

    /* a GPU model on a machine without one: the same clear error, at start-up */
    model_t *m = load(model_path("llama", DTYPE_F32, 0), 0, 1);
    cuda_model_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cuda_model_t *cm = (cuda_model_t *)&cfg; /* must come back NULL */
    char err[512] = "";
    rc = cuda_model_new(m, &cfg, &cm, err, sizeof err);
    if (!gpu_present() || !cuda_built()) {
        assert_int_equal(rc, -1);
        assert_null(cm);
        assert_contains(err, "no CUDA device");
    }
    cuda_model_destroy(&cm);
    cuda_model_destroy(&cm);
    model_destroy(&m);
}

static void test_stub(void **state)
{
    (void)state;
    if (cuda_built()) {
        print_message("built with CUDA: the stubs are not in this binary\n");
        return;
    }
    duet_cuda_err e = {0};
    void *p = (void *)1;
    assert_int_equal(cuda_mem_alloc(&p, 16, &e), -1);
    assert_null(p);
    assert_contains(e.msg, "built without CUDA");
    duet_cuda_err e2 = {0};
    assert_int_equal(cuda_op_rmsnorm(NULL, CUDA_ACT_F32, 1, NULL, 1, NULL, 1, 1, 1e-5f, NULL, &e2), -1);
    assert_contains(e2.msg, "cuda_op_rmsnorm: built without CUDA");
    char err[256];
    assert_int_equal(cuda_model_forward(NULL, NULL, NULL, 0, NULL, err, sizeof err), -1);
    assert_contains(err, "built without CUDA");
}

static int setup(void **state)
{
    (void)state;
    return tu_mkdtemp(tmpdir, sizeof tmpdir, "test-cuda-host");
}

static int teardown(void **state)
{
    (void)state;
    return tu_rmtree(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),          cmocka_unit_test(test_peaks),
        cmocka_unit_test(test_wplan_types),    cmocka_unit_test(test_wplan_qwen2_tp),
        cmocka_unit_test(test_kv_plan),        cmocka_unit_test(test_plan_budget),
        cmocka_unit_test(test_config_resolve), cmocka_unit_test(test_attn_work),
        cmocka_unit_test(test_sample_helpers), cmocka_unit_test(test_no_device),
        cmocka_unit_test(test_stub),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
