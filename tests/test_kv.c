/* tests/test_kv.c: every operation of kv/ and every error it reports. After each error the
 * cache must be unchanged and consistent (kv_check). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kv/kv.h"

/* Small pools: 2 layers, 3 heads (global 4..6), head_dim 8, 4 tokens per block. */
static kv_config small_cfg(dtype_t t, int n_blocks)
{
    kv_config c = {.n_layers = 2, .n_kv_heads = 3, .head_dim = 8, .kv_head0 = 4,
                   .block_tokens = 4, .dtype = t, .max_seqs = 8};
    c.budget_bytes = kv_block_bytes(&c) * (size_t)n_blocks;
    return c;
}

static kv_cache_t *make(dtype_t t, int n_blocks)
{
    kv_config c = small_cfg(t, n_blocks);
    kv_cache_t *kv = NULL;
    assert_int_equal(kv_new(&c, &kv), KV_OK);
    assert_non_null(kv);
    assert_int_equal(kv_n_blocks(kv), n_blocks);
    return kv;
}

static void consistent(const kv_cache_t *kv)
{
    char msg[256];
    kv_status s = kv_check(kv, msg, sizeof msg);
    if (s != KV_OK) fail_msg("kv_check: %s", msg);
}

static void done(kv_cache_t **kv)
{
    consistent(*kv);
    kv_destroy(kv);
    assert_null(*kv);
    kv_destroy(kv); /* safe twice */
}

/* A value as a function of (tag, layer, k/v, head, dim, pos): small multiples of 1/4,
 * exact in f16 and bf16. */
static float val(int tag, int layer, int w, int h, int d, int pos)
{
    unsigned x = (unsigned)(tag * 7919 + layer * 131 + w * 71 + h * 31 + d * 7 + pos * 13);
    return (float)((int)(x % 61) - 30) * 0.25f;
}

static void fill_row(const kv_cache_t *kv, int tag, int layer, int pos, float *k, float *v)
{
    const kv_config *c = kv_config_of(kv);
    for (int h = 0; h < c->n_kv_heads; h++)
        for (int d = 0; d < c->head_dim; d++) {
            k[h * c->head_dim + d] = val(tag, layer, 0, h + c->kv_head0, d, pos);
            v[h * c->head_dim + d] = val(tag, layer, 1, h + c->kv_head0, d, pos);
        }
}

static void store_all(kv_cache_t *kv, int seq, int tag, int from, int to)
{
    float k[64], v[64];
    for (int l = 0; l < kv_config_of(kv)->n_layers; l++)
        for (int p = from; p < to; p++) {
            fill_row(kv, tag, l, p, k, v);
            assert_int_equal(kv_store(kv, seq, l, p, k, v), KV_OK);
        }
}

/* Check positions [from, to) of seq hold tag's values (within tol). */
static void check_all(const kv_cache_t *kv, int seq, int tag, int from, int to, float tol)
{
    const kv_config *c = kv_config_of(kv);
    const int n = c->n_kv_heads * c->head_dim;
    float k[64], v[64], ek[64], ev[64];
    for (int l = 0; l < c->n_layers; l++)
        for (int p = from; p < to; p++) {
            assert_int_equal(kv_load(kv, seq, l, p, k, v), KV_OK);
            fill_row(kv, tag, l, p, ek, ev);
            for (int i = 0; i < n; i++)
                if (fabsf(k[i] - ek[i]) > tol || fabsf(v[i] - ev[i]) > tol)
                    fail_msg("seq %d layer %d pos %d elem %d: k %g (want %g) v %g (want %g)", seq,
                             l, p, i, k[i], ek[i], v[i], ev[i]);
        }
}

static void toks(int32_t *t, int n, int base)
{
    for (int i = 0; i < n; i++) t[i] = base + i;
}

static int new_seq(kv_cache_t *kv)
{
    int s = -1;
    assert_int_equal(kv_seq_new(kv, &s), KV_OK);
    assert_true(s >= 0);
    return s;
}

/* ---- configuration ---------------------------------------------------------------------- */

static void test_config(void **state)
{
    (void)state;
    kv_config c = {.n_layers = 30, .n_kv_heads = 3, .head_dim = 64, .dtype = DTYPE_F16};
    assert_int_equal(kv_block_bytes(&c), (size_t)30 * 2 * 3 * 16 * 64 * 2);
    c.budget_bytes = kv_block_bytes(&c) * 10 + 5;
    kv_cache_t *kv = NULL;
    assert_int_equal(kv_new(&c, &kv), KV_OK);
    assert_int_equal(kv_n_blocks(kv), 10);
    assert_int_equal(kv_config_of(kv)->block_tokens, 16);
    assert_int_equal(kv_config_of(kv)->max_seqs, 1024);
    assert_int_equal(kv_free_blocks(kv), 10);
    done(&kv);

    kv_config f = c;
    f.dtype = DTYPE_F32;
    assert_int_equal(kv_block_bytes(&f), (size_t)30 * 2 * 3 * 16 * 64 * 4);
    f.dtype = DTYPE_BF16;
    assert_int_equal(kv_block_bytes(&f), (size_t)30 * 2 * 3 * 16 * 64 * 2);
    f.dtype = DTYPE_I8;
    assert_int_equal(kv_block_bytes(&f), (size_t)30 * 2 * 3 * 16 * (64 + 4)); /* a scale per row */

    /* invalid configurations: KV_ERR_INVAL and *out NULL */
    kv_config bad[8];
    for (int i = 0; i < 8; i++) bad[i] = c;
    bad[0].dtype = DTYPE_Q4_0;
    bad[1].n_layers = 0;
    bad[2].n_kv_heads = -1;
    bad[3].head_dim = 0;
    bad[4].budget_bytes = kv_block_bytes(&c) - 1;
    bad[5].block_tokens = -4;
    bad[6].max_seqs = -1;
    bad[7].kv_head0 = -1;
    for (int i = 0; i < 8; i++) {
        kv = (kv_cache_t *)&c; /* garbage that kv_new must overwrite */
        assert_int_equal(kv_new(&bad[i], &kv), KV_ERR_INVAL);
        assert_null(kv);
    }
    assert_int_equal(kv_new(NULL, &kv), KV_ERR_INVAL);
    assert_int_equal(kv_new(&c, NULL), KV_ERR_INVAL);
    assert_int_equal(kv_block_bytes(NULL), 0);
    kv_destroy(NULL);
    kv = NULL;
    kv_destroy(&kv);
}

static void test_strerror(void **state)
{
    (void)state;
    const char *seen[8];
    for (int s = KV_OK; s <= KV_ERR_ALLOC; s++) {
        seen[s] = kv_strerror((kv_status)s);
        assert_non_null(seen[s]);
        assert_true(strlen(seen[s]) > 0);
        for (int j = 0; j < s; j++) assert_string_not_equal(seen[j], seen[s]);
    }
    assert_non_null(kv_strerror((kv_status)99));
}

/* ---- layout ------------------------------------------------------------------------------ */

static void test_layout(void **state)
{
    (void)state;
    const dtype_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8};
    const size_t es[] = {4, 2, 2, 1};
    for (int t = 0; t < 4; t++) {
        kv_cache_t *kv = make(types[t], 5);
        const size_t tile = 4 * 8 * es[t], layer = 5 * 3 * tile;
        unsigned char *k0 = kv_k_layer(kv, 0), *v0 = kv_v_layer(kv, 0);
        assert_non_null(k0);
        assert_ptr_equal(k0, kv_k_block(kv, 0, 0, 0));
        assert_ptr_equal(v0, k0 + layer);            /* layer 0: K then V */
        assert_ptr_equal(kv_k_layer(kv, 1), k0 + 2 * layer);
        assert_ptr_equal(kv_k_block(kv, 1, 3, 2), k0 + 2 * layer + (3 * 3 + 2) * tile);
        assert_ptr_equal(kv_v_block(kv, 1, 4, 1), k0 + 3 * layer + (4 * 3 + 1) * tile);
        assert_null(kv_k_block(kv, 2, 0, 0));
        assert_null(kv_k_block(kv, 0, 5, 0));
        assert_null(kv_v_block(kv, 0, 0, 3));
        assert_null(kv_v_block(kv, -1, 0, 0));
        assert_null(kv_k_layer(kv, 2));
        if (types[t] == DTYPE_I8) {
            float *s0 = kv_k_scales(kv, 0, 0);
            assert_non_null(s0);
            const int bt = kv_config_of(kv)->block_tokens; /* [n_blocks][n_heads][bt] */
            assert_ptr_equal(kv_k_scales(kv, 0, 2), s0 + 2 * 3 * bt);
            assert_ptr_equal(kv_v_scales(kv, 0, 0), s0 + 5 * 3 * bt);
            assert_ptr_equal(kv_k_scales(kv, 1, 1), s0 + (2 * 5 * 3 + 3) * bt);
            assert_null(kv_k_scales(kv, 0, 5));
        } else {
            assert_null(kv_k_scales(kv, 0, 0));
            assert_null(kv_v_scales(kv, 0, 0));
        }
        /* kv_store writes where the layout says: row p % bt of block table[p / bt] */
        int s = new_seq(kv);
        int32_t tk[6];
        toks(tk, 6, 0);
        assert_int_equal(kv_seq_append(kv, s, tk, 6), KV_OK);
        float k[24], v[24];
        for (int i = 0; i < 24; i++) k[i] = (float)(i + 1), v[i] = -(float)(i + 1);
        assert_int_equal(kv_store(kv, s, 1, 5, k, v), KV_OK);
        int nb;
        const int32_t *bl = kv_seq_blocks(kv, s, &nb);
        assert_int_equal(nb, 2);
        const unsigned char *kt = kv_k_block(kv, 1, bl[1], 2), *vt = kv_v_block(kv, 1, bl[1], 2);
        float got_k, got_v;
        if (types[t] == DTYPE_F32) {
            memcpy(&got_k, kt + (1 * 8 + 3) * 4, 4);
            memcpy(&got_v, vt + (1 * 8 + 3) * 4, 4);
        } else if (types[t] == DTYPE_F16) {
            got_k = fp16_to_f32(((const uint16_t *)kt)[1 * 8 + 3]);
            got_v = fp16_to_f32(((const uint16_t *)vt)[1 * 8 + 3]);
        } else if (types[t] == DTYPE_BF16) {
            got_k = bf16_to_f32(((const uint16_t *)kt)[1 * 8 + 3]);
            got_v = bf16_to_f32(((const uint16_t *)vt)[1 * 8 + 3]);
        } else {
            const int bt = kv_config_of(kv)->block_tokens; /* head 2, row 1 */
            got_k = ((const int8_t *)kt)[1 * 8 + 3] * kv_k_scales(kv, 1, bl[1])[2 * bt + 1];
            got_v = ((const int8_t *)vt)[1 * 8 + 3] * kv_v_scales(kv, 1, bl[1])[2 * bt + 1];
        }
        assert_float_equal(got_k, 20.0f, 0.1f); /* head 2, dim 3: k[2*8+3] = 20 */
        assert_float_equal(got_v, -20.0f, 0.1f);
        done(&kv);
    }
}

/* ---- sequences ---------------------------------------------------------------------------- */

static void test_seq_new_free(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 8);
    int ids[8];
    for (int i = 0; i < 8; i++) ids[i] = new_seq(kv);
    int extra = 77;
    assert_int_equal(kv_seq_new(kv, &extra), KV_ERR_NOSEQ); /* out of slots */
    assert_int_equal(kv_can_append(kv, -1, 1), 0);
    assert_int_equal(kv_seq_new(kv, NULL), KV_ERR_INVAL);
    int32_t t[5];
    toks(t, 5, 100);
    assert_int_equal(kv_seq_append(kv, ids[3], t, 5), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 6);
    assert_int_equal(kv_seq_free(kv, ids[3]), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 8);
    /* double free, unknown ids */
    assert_int_equal(kv_seq_free(kv, ids[3]), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_free(kv, -1), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_free(kv, 8), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_free(NULL, 0), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_len(kv, ids[3]), -1);
    assert_null(kv_seq_tokens(kv, ids[3]));
    int nb = 5;
    assert_null(kv_seq_blocks(kv, ids[3], &nb));
    assert_int_equal(nb, 0);
    consistent(kv);
    /* the freed id comes back */
    int again = new_seq(kv);
    assert_int_equal(again, ids[3]);
    assert_int_equal(kv_seq_len(kv, again), 0);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.seqs, 8);
    for (int i = 0; i < 8; i++) assert_int_equal(kv_seq_free(kv, ids[i]), KV_OK);
    kv_get_stats(kv, &st);
    assert_int_equal(st.seqs, 0);
    done(&kv);
}

static void test_append(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 4);
    int s = new_seq(kv);
    int32_t t[20];
    toks(t, 20, 1);
    assert_int_equal(kv_seq_append(kv, s, t, 0), KV_OK);
    assert_int_equal(kv_seq_len(kv, s), 0);
    assert_int_equal(kv_seq_append(kv, s, t, 3), KV_OK);
    assert_int_equal(kv_seq_len(kv, s), 3);
    assert_int_equal(kv_free_blocks(kv), 3);
    assert_int_equal(kv_seq_append(kv, s, t + 3, 2), KV_OK); /* fills block 0, opens block 1 */
    int nb;
    const int32_t *bl = kv_seq_blocks(kv, s, &nb);
    assert_int_equal(nb, 2);
    assert_int_not_equal(bl[0], bl[1]);
    assert_memory_equal(kv_seq_tokens(kv, s), t, 5 * sizeof(int32_t));
    assert_int_equal(kv_block_ref(kv, bl[0]), 1);
    /* out of blocks: 5 + 12 = 17 tokens need 5 blocks, the pool has 4; nothing changes */
    assert_int_equal(kv_blocks_needed(kv, s, 12), 3);
    assert_int_equal(kv_can_append(kv, s, 12), 0);
    assert_int_equal(kv_seq_append(kv, s, t + 5, 12), KV_ERR_NOMEM);
    assert_int_equal(kv_seq_len(kv, s), 5);
    assert_int_equal(kv_free_blocks(kv), 2);
    assert_memory_equal(kv_seq_tokens(kv, s), t, 5 * sizeof(int32_t));
    consistent(kv);
    /* exactly fits */
    assert_int_equal(kv_can_append(kv, s, 11), 1);
    assert_int_equal(kv_seq_append(kv, s, t + 5, 11), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 0);
    assert_int_equal(kv_seq_append(kv, s, t, 1), KV_ERR_NOMEM);
    /* bad arguments */
    assert_int_equal(kv_seq_append(kv, s, t, -1), KV_ERR_INVAL);
    assert_int_equal(kv_seq_append(kv, s, NULL, 1), KV_ERR_INVAL);
    assert_int_equal(kv_seq_append(kv, 5, t, 1), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_len(kv, s), 16);
    assert_int_equal(kv_blocks_needed(kv, 5, 1), -1);
    assert_int_equal(kv_blocks_needed(kv, s, -1), -1);
    assert_int_equal(kv_blocks_needed(kv, -1, 9), 3);
    done(&kv);
}

static void test_store_load(void **state)
{
    (void)state;
    const dtype_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8};
    for (int t = 0; t < 4; t++) {
        kv_cache_t *kv = make(types[t], 6);
        int s = new_seq(kv);
        int32_t tk[10];
        toks(tk, 10, 0);
        assert_int_equal(kv_seq_append(kv, s, tk, 10), KV_OK);
        store_all(kv, s, 1, 0, 10);
        /* values are multiples of 1/4 in [-7.5, 7.5]: exact except int8, which rounds each
         * row to its own step (amax/127 <= 7.5/127): half a step at most */
        const float tol = types[t] == DTYPE_I8 ? 7.5f / 127 * 0.5f * 1.001f : 0.0f;
        check_all(kv, s, 1, 0, 10, tol);
        float k[24] = {0}, v[24] = {0};
        assert_int_equal(kv_store(kv, s, 0, 10, k, v), KV_ERR_INVAL);
        assert_int_equal(kv_store(kv, s, 0, -1, k, v), KV_ERR_INVAL);
        assert_int_equal(kv_store(kv, s, 2, 0, k, v), KV_ERR_INVAL);
        assert_int_equal(kv_store(kv, s, 0, 0, NULL, v), KV_ERR_INVAL);
        assert_int_equal(kv_store(kv, 3, 0, 0, k, v), KV_ERR_NOSEQ);
        assert_int_equal(kv_load(kv, s, 0, 10, k, v), KV_ERR_INVAL);
        assert_int_equal(kv_load(kv, s, 0, 0, NULL, NULL), KV_ERR_INVAL);
        assert_int_equal(kv_load(kv, 3, 0, 0, k, v), KV_ERR_NOSEQ);
        assert_int_equal(kv_load(kv, s, 1, 3, k, NULL), KV_OK); /* K only */
        check_all(kv, s, 1, 0, 10, tol);
        done(&kv);
    }
}

/* f16/bf16 round to nearest; int8 keeps amax/127 per row (token and head). */
static void test_store_rounding_int8(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 2);
    int s = new_seq(kv);
    int32_t tk[1] = {0};
    assert_int_equal(kv_seq_append(kv, s, tk, 1), KV_OK);
    float k[24], v[24], lk[24], lv[24];
    for (int i = 0; i < 24; i++) k[i] = 1.0f + (float)i / 3000.0f, v[i] = 70000.0f;
    assert_int_equal(kv_store(kv, s, 0, 0, k, v), KV_OK);
    assert_int_equal(kv_load(kv, s, 0, 0, lk, lv), KV_OK);
    for (int i = 0; i < 24; i++) {
        assert_float_equal(lk[i], fp16_to_f32(fp16_from_f32(k[i])), 0);
        assert_true(isinf(lv[i])); /* beyond f16's range */
    }
    done(&kv);

    kv = make(DTYPE_I8, 2);
    s = new_seq(kv);
    const int bt = kv_config_of(kv)->block_tokens;
    int32_t t4[4] = {0, 1, 2, 3};
    assert_int_equal(kv_seq_append(kv, s, t4, 4), KV_OK);
    /* row 0: small values (|x| <= 1); row 1: head 1 up to 92. Each row and head has its own
     * scale, amax/127, and a later row never changes an earlier one. */
    float r0[24], r1[24];
    for (int i = 0; i < 24; i++) r0[i] = (float)((i * 37) % 17 - 8) / 8.0f;
    for (int i = 0; i < 24; i++) r1[i] = i >= 8 && i < 16 ? 100.0f - i : 0.5f;
    assert_int_equal(kv_store(kv, s, 0, 0, r0, r0), KV_OK);
    const int32_t *bl = kv_seq_blocks(kv, s, NULL);
    float *ks = kv_k_scales(kv, 0, bl[0]);
    float amax0[3] = {0, 0, 0};
    for (int i = 0; i < 24; i++) amax0[i / 8] = fmaxf(amax0[i / 8], fabsf(r0[i]));
    for (int h = 0; h < 3; h++) assert_float_equal(ks[h * bt], amax0[h] / 127, 1e-7);
    assert_float_equal(ks[0], 1.0f / 127, 1e-7);
    unsigned char before[24];
    memcpy(before, kv_k_block(kv, 0, bl[0], 0), 8);
    memcpy(before + 8, kv_k_block(kv, 0, bl[0], 1), 8);
    memcpy(before + 16, kv_k_block(kv, 0, bl[0], 2), 8);
    assert_int_equal(kv_store(kv, s, 0, 1, r1, r1), KV_OK);
    for (int h = 0; h < 3; h++) assert_float_equal(ks[h * bt], amax0[h] / 127, 1e-7); /* row 0 kept */
    assert_float_equal(ks[0 * bt + 1], 0.5f / 127, 1e-7);
    assert_float_equal(ks[1 * bt + 1], 92.0f / 127, 1e-5);
    assert_float_equal(ks[2 * bt + 1], 0.5f / 127, 1e-7);
    for (int h = 0; h < 3; h++) /* row 0's bytes did not move */
        assert_memory_equal(kv_k_block(kv, 0, bl[0], h), before + 8 * h, 8);
    assert_int_equal(kv_load(kv, s, 0, 0, lk, lv), KV_OK);
    for (int i = 0; i < 24; i++)
        if (fabsf(lk[i] - r0[i]) > 0.5f * ks[(i / 8) * bt] * 1.001f)
            fail_msg("row 0 elem %d: %g vs %g", i, lk[i], r0[i]);
    assert_int_equal(kv_load(kv, s, 0, 1, lk, lv), KV_OK);
    for (int i = 0; i < 24; i++) assert_float_equal(lk[i], r1[i], 0.5f * ks[(i / 8) * bt + 1] * 1.001f);
    /* a fresh block starts from scale 0 even when reused */
    assert_int_equal(kv_seq_free(kv, s), KV_OK);
    s = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, s, t4, 1), KV_OK);
    bl = kv_seq_blocks(kv, s, NULL);
    ks = kv_k_scales(kv, 0, bl[0]);
    for (int h = 0; h < 3 * bt; h++) assert_float_equal(ks[h], 0.0f, 0);
    float z[24] = {0};
    assert_int_equal(kv_store(kv, s, 0, 0, z, z), KV_OK); /* all zero: scale stays 0, no NaN */
    assert_int_equal(kv_load(kv, s, 0, 0, lk, lv), KV_OK);
    for (int i = 0; i < 24; i++) assert_float_equal(lk[i], 0.0f, 0);
    /* non-finite input: an error of the caller's model, but no undefined behaviour here */
    assert_int_equal(kv_seq_append(kv, s, t4, 1), KV_OK);
    z[3] = INFINITY;
    z[9] = NAN;
    assert_int_equal(kv_store(kv, s, 1, 1, z, z), KV_OK);
    done(&kv);
}

static void test_fork_cow(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F32, 8);
    int a = new_seq(kv);
    int32_t t[16];
    toks(t, 16, 50);
    assert_int_equal(kv_seq_append(kv, a, t, 6), KV_OK); /* blocks: full, partial (2 of 4) */
    store_all(kv, a, 1, 0, 6);
    int b = -1;
    assert_int_equal(kv_seq_fork(kv, a, &b), KV_OK);
    assert_int_not_equal(a, b);
    int na, nb;
    const int32_t *ba = kv_seq_blocks(kv, a, &na), *bb = kv_seq_blocks(kv, b, &nb);
    assert_int_equal(na, 2);
    assert_int_equal(nb, 2);
    assert_memory_equal(ba, bb, 2 * sizeof(int32_t));
    assert_int_equal(kv_block_ref(kv, ba[0]), 2);
    assert_int_equal(kv_block_ref(kv, ba[1]), 2);
    assert_int_equal(kv_free_blocks(kv), 6);
    assert_memory_equal(kv_seq_tokens(kv, b), t, 6 * sizeof(int32_t));
    /* shared blocks are read-only */
    float k[24] = {0}, v[24] = {0};
    assert_int_equal(kv_store(kv, b, 0, 5, k, v), KV_ERR_INVAL);
    check_all(kv, a, 1, 0, 6, 0);
    /* b appends: copy-on-write of the shared partial block, one more for the new one */
    assert_int_equal(kv_blocks_needed(kv, b, 3), 2);
    int32_t bt3[3] = {900, 901, 902};
    assert_int_equal(kv_seq_append(kv, b, bt3, 3), KV_OK);
    bb = kv_seq_blocks(kv, b, &nb);
    ba = kv_seq_blocks(kv, a, &na);
    assert_int_equal(nb, 3);
    assert_int_equal(bb[0], ba[0]);
    assert_int_not_equal(bb[1], ba[1]);
    assert_int_equal(kv_block_ref(kv, ba[0]), 2);
    assert_int_equal(kv_block_ref(kv, ba[1]), 1);
    assert_int_equal(kv_block_ref(kv, bb[1]), 1);
    check_all(kv, b, 1, 0, 6, 0); /* the copy holds a's rows */
    store_all(kv, b, 2, 6, 9);
    check_all(kv, b, 2, 6, 9, 0);
    /* a still owns its partial block alone: appends in place, no copy */
    assert_int_equal(kv_blocks_needed(kv, a, 2), 0);
    int32_t at2[2] = {700, 701};
    assert_int_equal(kv_seq_append(kv, a, at2, 2), KV_OK);
    store_all(kv, a, 3, 6, 8);
    check_all(kv, a, 1, 0, 6, 0);
    check_all(kv, a, 3, 6, 8, 0);
    check_all(kv, b, 1, 0, 6, 0);
    check_all(kv, b, 2, 6, 9, 0);
    consistent(kv);
    /* fork of a freed or unknown sequence */
    assert_int_equal(kv_seq_free(kv, a), KV_OK);
    int c = 42;
    assert_int_equal(kv_seq_fork(kv, a, &c), KV_ERR_NOSEQ);
    assert_int_equal(c, 42);
    assert_int_equal(kv_seq_fork(kv, -3, &c), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_fork(kv, b, NULL), KV_ERR_INVAL);
    assert_int_equal(kv_block_ref(kv, bb[0]), 1);
    /* fork with no free slot */
    int more[7];
    for (int i = 0; i < 7; i++) more[i] = new_seq(kv);
    assert_int_equal(kv_seq_fork(kv, b, &c), KV_ERR_NOSEQ);
    assert_int_equal(kv_block_ref(kv, bb[0]), 1);
    consistent(kv);
    for (int i = 0; i < 7; i++) assert_int_equal(kv_seq_free(kv, more[i]), KV_OK);
    /* fork of an empty sequence */
    int e = new_seq(kv), f;
    assert_int_equal(kv_seq_fork(kv, e, &f), KV_OK);
    assert_int_equal(kv_seq_len(kv, f), 0);
    assert_int_equal(kv_seq_free(kv, e), KV_OK);
    assert_int_equal(kv_seq_free(kv, f), KV_OK);
    assert_int_equal(kv_seq_free(kv, b), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 8);
    done(&kv);
}

static void test_truncate(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 6);
    int s = new_seq(kv);
    int32_t t[16];
    toks(t, 16, 10);
    assert_int_equal(kv_seq_append(kv, s, t, 14), KV_OK);
    store_all(kv, s, 1, 0, 14);
    assert_int_equal(kv_free_blocks(kv), 2);
    assert_int_equal(kv_seq_truncate(kv, s, 15), KV_ERR_INVAL);
    assert_int_equal(kv_seq_truncate(kv, s, -1), KV_ERR_INVAL);
    assert_int_equal(kv_seq_truncate(kv, 3, 0), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_truncate(kv, s, 14), KV_OK);
    assert_int_equal(kv_seq_truncate(kv, s, 6), KV_OK); /* rolls back 8 tokens, 2 blocks */
    assert_int_equal(kv_seq_len(kv, s), 6);
    assert_int_equal(kv_free_blocks(kv), 4);
    int nb;
    kv_seq_blocks(kv, s, &nb);
    assert_int_equal(nb, 2);
    check_all(kv, s, 1, 0, 6, 0);
    /* re-append different tokens: lands in the same (private) partial block */
    int32_t u[3] = {500, 501, 502};
    assert_int_equal(kv_blocks_needed(kv, s, 3), 1);
    assert_int_equal(kv_seq_append(kv, s, u, 3), KV_OK);
    assert_memory_equal(kv_seq_tokens(kv, s) + 6, u, sizeof u);
    store_all(kv, s, 2, 6, 9);
    check_all(kv, s, 1, 0, 6, 0);
    check_all(kv, s, 2, 6, 9, 0);
    assert_int_equal(kv_seq_truncate(kv, s, 0), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 6);
    kv_seq_blocks(kv, s, &nb);
    assert_int_equal(nb, 0);
    assert_int_equal(kv_seq_free(kv, s), KV_OK);
    done(&kv);
}

/* ---- prefix cache ------------------------------------------------------------------------ */

static void test_prefix_commit_lookup_attach(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 12);
    int32_t p[14];
    toks(p, 14, 1000);
    int a = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, a, p, 14), KV_OK);
    store_all(kv, a, 1, 0, 14);
    assert_int_equal(kv_prefix_lookup(kv, p, 14), 0); /* nothing committed yet */
    assert_int_equal(kv_seq_commit(kv, a, 15), KV_ERR_INVAL);
    assert_int_equal(kv_seq_commit(kv, a, -1), KV_ERR_INVAL);
    assert_int_equal(kv_seq_commit(kv, 7, 1), KV_ERR_NOSEQ);
    assert_int_equal(kv_seq_commit(kv, a, 6), KV_OK); /* block 0 only */
    assert_int_equal(kv_prefix_lookup(kv, p, 14), 4);
    assert_int_equal(kv_seq_commit(kv, a, 14), KV_OK); /* blocks 1, 2; block 3 is partial */
    assert_int_equal(kv_seq_commit(kv, a, 14), KV_OK); /* again: nothing new */
    const int32_t *ba = kv_seq_blocks(kv, a, NULL);
    assert_int_equal(kv_block_cached(kv, ba[2]), 1);
    assert_int_equal(kv_block_cached(kv, ba[3]), 0);
    assert_int_equal(kv_block_cached(kv, 99), -1);
    assert_int_equal(kv_prefix_lookup(kv, p, 14), 12);
    assert_int_equal(kv_prefix_lookup(kv, p, 11), 8);  /* only whole blocks of the query */
    assert_int_equal(kv_prefix_lookup(kv, p, 3), 0);
    assert_int_equal(kv_prefix_lookup(kv, NULL, 8), 0);
    int32_t q[14];
    memcpy(q, p, sizeof q);
    q[5] = -7; /* differs in block 1 */
    assert_int_equal(kv_prefix_lookup(kv, q, 14), 4);
    q[5] = p[5];
    q[0] = -7; /* differs in block 0: nothing, even though blocks 1, 2 match */
    assert_int_equal(kv_prefix_lookup(kv, q, 14), 0);
    /* committed blocks are read-only */
    float k[24] = {0}, v[24] = {0};
    assert_int_equal(kv_store(kv, a, 0, 2, k, v), KV_ERR_INVAL);
    assert_int_equal(kv_store(kv, a, 0, 13, k, v), KV_OK); /* partial block: writable */
    store_all(kv, a, 1, 12, 14);

    /* attach to a new sequence: 3 blocks shared */
    int b = new_seq(kv), n_cached = -1;
    assert_int_equal(kv_prefix_attach(kv, b, p, 13, &n_cached), KV_OK);
    assert_int_equal(n_cached, 12);
    assert_int_equal(kv_seq_len(kv, b), 12);
    assert_memory_equal(kv_seq_tokens(kv, b), p, 12 * sizeof(int32_t));
    int nb;
    const int32_t *bb = kv_seq_blocks(kv, b, &nb);
    assert_int_equal(nb, 3);
    assert_memory_equal(bb, ba, 3 * sizeof(int32_t));
    for (int i = 0; i < 3; i++) assert_int_equal(kv_block_ref(kv, bb[i]), 2);
    check_all(kv, b, 1, 0, 12, 0);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.prefix_hit_tokens, 12);
    assert_int_equal(st.prefix_miss_tokens, 1);
    assert_int_equal(st.blocks_cached, 3);
    assert_int_equal(st.blocks_used, 4);
    /* attach needs an empty sequence */
    assert_int_equal(kv_prefix_attach(kv, b, p, 13, &n_cached), KV_ERR_INVAL);
    assert_int_equal(kv_prefix_attach(kv, 6, p, 13, &n_cached), KV_ERR_NOSEQ);
    int c = new_seq(kv);
    assert_int_equal(kv_prefix_attach(kv, c, p, -1, &n_cached), KV_ERR_INVAL);
    assert_int_equal(kv_prefix_attach(kv, c, NULL, 4, &n_cached), KV_ERR_INVAL);
    assert_int_equal(kv_prefix_attach(kv, c, q, 14, &n_cached), KV_OK); /* a miss */
    assert_int_equal(n_cached, 0);
    assert_int_equal(kv_seq_len(kv, c), 0);
    kv_get_stats(kv, &st);
    assert_int_equal(st.prefix_miss_tokens, 15);
    /* b continues past the shared prefix: new block, no copy (12 is a block boundary) */
    assert_int_equal(kv_blocks_needed(kv, b, 2), 1);
    assert_int_equal(kv_seq_append(kv, b, p + 12, 2), KV_OK);
    store_all(kv, b, 1, 12, 14);
    check_all(kv, b, 1, 0, 14, 0);
    /* b truncates into the shared, cached block 2 and appends other tokens: copy-on-write,
     * the cached block keeps its K/V */
    assert_int_equal(kv_seq_truncate(kv, b, 10), KV_OK);
    assert_int_equal(kv_blocks_needed(kv, b, 1), 1);
    int32_t x = 4242;
    assert_int_equal(kv_seq_append(kv, b, &x, 1), KV_OK);
    bb = kv_seq_blocks(kv, b, &nb);
    assert_int_equal(nb, 3);
    assert_int_not_equal(bb[2], ba[2]);
    assert_int_equal(kv_block_ref(kv, ba[2]), 1);
    store_all(kv, b, 9, 10, 11);
    check_all(kv, b, 1, 0, 10, 0);
    check_all(kv, a, 1, 0, 14, 0);
    assert_int_equal(kv_prefix_lookup(kv, p, 14), 12);
    /* commit of b's blocks: 0, 1 already named (shared); block 2 differs from a's */
    int32_t bq[12];
    memcpy(bq, p, sizeof bq);
    bq[10] = 4242;
    assert_int_equal(kv_seq_append(kv, b, bq + 11, 1), KV_OK);
    assert_int_equal(kv_seq_commit(kv, b, 12), KV_OK);
    assert_int_equal(kv_prefix_lookup(kv, bq, 12), 12);
    assert_int_equal(kv_prefix_lookup(kv, p, 12), 12);
    consistent(kv);
    assert_int_equal(kv_seq_free(kv, a), KV_OK);
    assert_int_equal(kv_seq_free(kv, b), KV_OK);
    assert_int_equal(kv_seq_free(kv, c), KV_OK);
    kv_get_stats(kv, &st);
    assert_int_equal(st.blocks_used, 0);
    assert_int_equal(st.blocks_cached, 4);
    assert_int_equal(st.blocks_evictable, 4);
    assert_int_equal(kv_evictable_blocks(kv), 4);
    assert_int_equal(kv_free_blocks(kv), 8);
    assert_int_equal(kv_prefix_lookup(kv, p, 14), 12); /* still cached after free */
    done(&kv);
}

/* Equal token blocks at different depths, or under different parents, never match. */
static void test_prefix_depth(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F32, 8);
    int32_t r[8] = {1, 2, 3, 4, 1, 2, 3, 4}; /* block 1 repeats block 0 */
    int a = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, a, r, 4), KV_OK);
    assert_int_equal(kv_seq_commit(kv, a, 4), KV_OK);
    assert_int_equal(kv_prefix_lookup(kv, r, 8), 4); /* [1 2 3 4] at depth 1 is not cached */
    int32_t s2[8] = {9, 9, 9, 9, 1, 2, 3, 4};
    assert_int_equal(kv_prefix_lookup(kv, s2, 8), 0);
    int b = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, b, s2, 8), KV_OK);
    assert_int_equal(kv_seq_commit(kv, b, 8), KV_OK);
    assert_int_equal(kv_prefix_lookup(kv, s2, 8), 8);
    assert_int_equal(kv_prefix_lookup(kv, r, 8), 4);
    assert_int_equal(kv_seq_free(kv, a), KV_OK);
    assert_int_equal(kv_seq_free(kv, b), KV_OK);
    done(&kv);
}

/* With every hash forced equal, lookups still compare parents and tokens. */
static void test_prefix_collisions(void **state)
{
    (void)state;
    for (int mask = 0; mask < 2; mask++) {
        kv_cache_t *kv = make(DTYPE_F32, 16);
        kv_debug_hash_mask(kv, (uint64_t)mask);
        int32_t x[12], y[12];
        toks(x, 12, 0);
        toks(y, 12, 0);
        y[9] = -1;
        int a = new_seq(kv), b = new_seq(kv);
        assert_int_equal(kv_seq_append(kv, a, x, 12), KV_OK);
        store_all(kv, a, 1, 0, 12);
        assert_int_equal(kv_seq_commit(kv, a, 12), KV_OK);
        assert_int_equal(kv_prefix_lookup(kv, y, 12), 8);
        assert_int_equal(kv_seq_append(kv, b, y, 12), KV_OK);
        store_all(kv, b, 2, 0, 12);
        assert_int_equal(kv_seq_commit(kv, b, 12), KV_OK); /* 0, 1 equal to a's: stay private */
        kv_stats st;
        kv_get_stats(kv, &st);
        assert_int_equal(st.blocks_cached, 4);
        for (int w = 0; w < 2; w++) {
            int c = new_seq(kv), n = 0;
            assert_int_equal(kv_prefix_attach(kv, c, w ? y : x, 12, &n), KV_OK);
            assert_int_equal(n, 12);
            /* blocks 0, 1 are a's (first named); block 2 is each one's own */
            check_all(kv, c, 1, 0, 8, 0);
            check_all(kv, c, w ? 2 : 1, 8, 12, 0);
            const int32_t *cb = kv_seq_blocks(kv, c, NULL);
            assert_int_equal(cb[2], kv_seq_blocks(kv, w ? b : a, NULL)[2]);
            assert_int_equal(kv_seq_free(kv, c), KV_OK);
        }
        int32_t z[8] = {5, 5, 5, 5, 0, 1, 2, 3};
        assert_int_equal(kv_prefix_lookup(kv, z, 8), 0);
        int32_t w2[8] = {0, 1, 2, 3, 0, 1, 2, 3};
        assert_int_equal(kv_prefix_lookup(kv, w2, 8), 4);
        consistent(kv);
        assert_int_equal(kv_seq_free(kv, a), KV_OK);
        assert_int_equal(kv_seq_free(kv, b), KV_OK);
        done(&kv);
    }
}

static void test_eviction_lru(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 6);
    int32_t p[3][8];
    for (int i = 0; i < 3; i++) toks(p[i], 8, 100 * (i + 1));
    int s[3];
    for (int i = 0; i < 3; i++) { /* three 2-block prompts, committed and freed in order */
        s[i] = new_seq(kv);
        assert_int_equal(kv_seq_append(kv, s[i], p[i], 8), KV_OK);
        store_all(kv, s[i], 10 + i, 0, 8);
        assert_int_equal(kv_seq_commit(kv, s[i], 8), KV_OK);
    }
    assert_int_equal(kv_free_blocks(kv), 0);
    assert_int_equal(kv_evictable_blocks(kv), 0);
    int extra = new_seq(kv);
    int32_t t[8];
    toks(t, 8, 7000);
    assert_int_equal(kv_can_append(kv, extra, 1), 0);
    assert_int_equal(kv_seq_append(kv, extra, t, 1), KV_ERR_NOMEM);
    for (int i = 0; i < 3; i++) assert_int_equal(kv_seq_free(kv, s[i]), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 0);
    assert_int_equal(kv_evictable_blocks(kv), 6);
    assert_int_equal(kv_can_append(kv, extra, 24), 1);
    assert_int_equal(kv_can_append(kv, extra, 25), 0);
    /* 1 block: evicts prompt 0's last block (released first), its first still matches */
    assert_int_equal(kv_seq_append(kv, extra, t, 1), KV_OK);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.evictions, 1);
    assert_int_equal(kv_prefix_lookup(kv, p[0], 8), 4);
    assert_int_equal(kv_prefix_lookup(kv, p[1], 8), 8);
    /* re-attaching prompt 1 makes it recently used: the next victims are prompt 0, then 2 */
    int r = new_seq(kv), n;
    assert_int_equal(kv_prefix_attach(kv, r, p[1], 8, &n), KV_OK);
    assert_int_equal(n, 8);
    assert_int_equal(kv_seq_free(kv, r), KV_OK);
    assert_int_equal(kv_seq_append(kv, extra, t + 1, 4), KV_OK); /* 1 more block */
    assert_int_equal(kv_prefix_lookup(kv, p[0], 8), 0);
    assert_int_equal(kv_prefix_lookup(kv, p[2], 8), 8);
    assert_int_equal(kv_seq_append(kv, extra, t + 5, 3), KV_OK); /* fills block 1: none */
    assert_int_equal(kv_prefix_lookup(kv, p[2], 8), 8);
    assert_int_equal(kv_seq_append(kv, extra, t, 1), KV_OK); /* 1 more: p[2]'s last */
    assert_int_equal(kv_prefix_lookup(kv, p[2], 8), 4);
    assert_int_equal(kv_prefix_lookup(kv, p[1], 8), 8);
    /* what survives still answers with its own K/V */
    r = new_seq(kv);
    assert_int_equal(kv_prefix_attach(kv, r, p[1], 8, &n), KV_OK);
    check_all(kv, r, 11, 0, 8, 0);
    assert_int_equal(kv_seq_free(kv, r), KV_OK);
    kv_get_stats(kv, &st);
    assert_int_equal(st.evictions, 3);
    assert_int_equal(st.blocks_cached, 3);
    assert_int_equal(st.blocks_used, 3);
    assert_int_equal(st.blocks_free, 0);
    consistent(kv);
    /* an evicted parent orphans its cached child: never matched again, even when the
     * parent's tokens are committed anew */
    int32_t q[8];
    toks(q, 8, 9000);
    assert_int_equal(kv_seq_free(kv, extra), KV_OK); /* 3 blocks to the free list */
    int u = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, u, q, 8), KV_OK);
    assert_int_equal(kv_seq_commit(kv, u, 8), KV_OK);
    assert_int_equal(kv_seq_free(kv, u), KV_OK); /* LRU: p[2]0, p[1]1, p[1]0, q1, q0 */
    done(&kv);
}

/* A sequence's block held privately (an equal block was named first) lets its committed
 * child hang under the other block. When that one is evicted, the child becomes
 * unreachable, and is not confused with a new block of equal tokens under a re-committed
 * parent. */
static void test_eviction_orphans(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F32, 3);
    int32_t p[8];
    toks(p, 8, 1);
    int w = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, w, p, 4), KV_OK);
    assert_int_equal(kv_seq_commit(kv, w, 4), KV_OK); /* X0 named */
    assert_int_equal(kv_seq_free(kv, w), KV_OK);     /* X0 evictable */
    int a = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, a, p, 8), KV_OK); /* computes its own copy of X0 */
    store_all(kv, a, 1, 0, 8);
    assert_int_equal(kv_seq_commit(kv, a, 8), KV_OK);
    const int32_t *ab = kv_seq_blocks(kv, a, NULL);
    assert_int_equal(kv_block_cached(kv, ab[0]), 0); /* X0 keeps the name */
    assert_int_equal(kv_block_cached(kv, ab[1]), 1); /* named under X0 */
    assert_int_equal(kv_prefix_lookup(kv, p, 8), 8);
    assert_int_equal(kv_free_blocks(kv), 0);
    int e = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, e, p, 1), KV_OK); /* evicts X0 */
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.evictions, 1);
    assert_int_equal(kv_prefix_lookup(kv, p, 8), 0);
    assert_int_equal(kv_seq_free(kv, e), KV_OK);
    int b = new_seq(kv);
    assert_int_equal(kv_seq_append(kv, b, p, 4), KV_OK);
    store_all(kv, b, 2, 0, 4);
    assert_int_equal(kv_seq_commit(kv, b, 4), KV_OK); /* a new block named for p[0..4) */
    assert_int_equal(kv_prefix_lookup(kv, p, 8), 4); /* a's child is not under it */
    int c = new_seq(kv), n;
    assert_int_equal(kv_prefix_attach(kv, c, p, 8, &n), KV_OK);
    assert_int_equal(n, 4);
    check_all(kv, c, 2, 0, 4, 0);
    consistent(kv);
    assert_int_equal(kv_seq_free(kv, a), KV_OK);
    assert_int_equal(kv_seq_free(kv, b), KV_OK);
    assert_int_equal(kv_seq_free(kv, c), KV_OK);
    done(&kv);
}

/* ---- admission ---------------------------------------------------------------------------- */

static void test_admission(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 5);
    assert_int_equal(kv_can_append(kv, -1, 20), 1);
    assert_int_equal(kv_can_append(kv, -1, 21), 0);
    assert_int_equal(kv_can_append(kv, -1, 0), 1);
    assert_int_equal(kv_can_append(kv, -1, -1), 0);
    assert_int_equal(kv_can_append(kv, 3, 1), 0); /* unknown sequence */
    assert_int_equal(kv_blocks_needed(kv, -1, 0), 0);
    assert_int_equal(kv_blocks_needed(kv, -1, 4), 1);
    assert_int_equal(kv_blocks_needed(kv, -1, 5), 2);
    int a = new_seq(kv), b;
    int32_t t[16];
    toks(t, 16, 0);
    assert_int_equal(kv_seq_append(kv, a, t, 6), KV_OK);
    assert_int_equal(kv_blocks_needed(kv, a, 2), 0);
    assert_int_equal(kv_blocks_needed(kv, a, 3), 1);
    assert_int_equal(kv_seq_fork(kv, a, &b), KV_OK);
    assert_int_equal(kv_blocks_needed(kv, a, 1), 1); /* copy-on-write of the shared partial */
    assert_int_equal(kv_blocks_needed(kv, a, 3), 2);
    assert_int_equal(kv_blocks_needed(kv, a, 0), 0);
    assert_int_equal(kv_free_blocks(kv), 3);
    assert_int_equal(kv_can_append(kv, a, 10), 1); /* 1 copy + 2 new = 3 */
    assert_int_equal(kv_can_append(kv, a, 11), 0);
    assert_int_equal(kv_seq_append(kv, a, t, 11), KV_ERR_NOMEM);
    assert_int_equal(kv_block_ref(kv, kv_seq_blocks(kv, a, NULL)[1]), 2); /* no copy made */
    assert_int_equal(kv_seq_append(kv, a, t, 10), KV_OK);
    assert_int_equal(kv_free_blocks(kv), 0);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.blocks_total, 5);
    assert_int_equal(st.blocks_used, 5);
    assert_int_equal(st.blocks_free, 0);
    assert_int_equal(kv_seq_free(kv, a), KV_OK);
    assert_int_equal(kv_seq_free(kv, b), KV_OK);
    done(&kv);
}

/* ---- pack / unpack ------------------------------------------------------------------------ */

static kv_cache_t *make_shard(dtype_t t, int n_blocks, int head0, int n_heads, int bt)
{
    kv_config c = {.n_layers = 2, .n_kv_heads = n_heads, .head_dim = 8, .kv_head0 = head0,
                   .block_tokens = bt, .dtype = t, .max_seqs = 8};
    c.budget_bytes = kv_block_bytes(&c) * (size_t)n_blocks;
    kv_cache_t *kv = NULL;
    assert_int_equal(kv_new(&c, &kv), KV_OK);
    return kv;
}

/* Check that dst's heads [head0, head0+n) over layers [l0, l0+nl) equal src's (tol). */
static void check_heads_equal(const kv_cache_t *src, int ss, const kv_cache_t *dst, int ds,
                              int l0, int nl, int head0, int n, float tol)
{
    const kv_config *a = kv_config_of(src), *b = kv_config_of(dst);
    float k1[64], v1[64], k2[64], v2[64];
    for (int l = l0; l < l0 + nl; l++)
        for (int p = 0; p < kv_seq_len(src, ss); p++) {
            assert_int_equal(kv_load(src, ss, l, p, k1, v1), KV_OK);
            assert_int_equal(kv_load(dst, ds, l, p, k2, v2), KV_OK);
            for (int h = head0; h < head0 + n; h++)
                for (int d = 0; d < a->head_dim; d++) {
                    int i1 = (h - a->kv_head0) * a->head_dim + d, i2 = (h - b->kv_head0) * b->head_dim + d;
                    if (fabsf(k1[i1] - k2[i2]) > tol || fabsf(v1[i1] - v2[i2]) > tol)
                        fail_msg("layer %d pos %d head %d dim %d differs", l, p, h, d);
                }
        }
}

static void test_pack_layout(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F32, 6); /* heads 4..6 */
    int s = new_seq(kv);
    int32_t t[10];
    toks(t, 10, 0);
    assert_int_equal(kv_seq_append(kv, s, t, 10), KV_OK);
    store_all(kv, s, 3, 0, 10);
    /* layer 1, heads 5..6, all 10 tokens */
    size_t need = kv_pack_size(kv, s, 1, 1, 5, 2);
    assert_int_equal(need, sizeof(kv_pack_header) + 2 * 2 * 10 * 8 * 4);
    unsigned char *buf = malloc(need);
    size_t wr = 0;
    assert_int_equal(kv_pack(kv, s, 1, 1, 5, 2, buf, need, &wr), KV_OK);
    assert_int_equal(wr, need);
    kv_pack_header h;
    memcpy(&h, buf, sizeof h);
    assert_int_equal(h.magic, KV_PACK_MAGIC);
    assert_int_equal(h.dtype, DTYPE_F32);
    assert_int_equal(h.head_dim, 8);
    assert_int_equal(h.block_tokens, 4);
    assert_int_equal(h.layer0, 1);
    assert_int_equal(h.n_layers, 1);
    assert_int_equal(h.head0, 5);
    assert_int_equal(h.n_heads, 2);
    assert_int_equal(h.tok0, 0);
    assert_int_equal(h.n_tok, 10);
    const float *body = (const float *)(buf + sizeof h);
    for (int w = 0; w < 2; w++)
        for (int hh = 0; hh < 2; hh++)
            for (int p = 0; p < 10; p++)
                for (int d = 0; d < 8; d++)
                    assert_float_equal(body[((w * 2 + hh) * 10 + p) * 8 + d], val(3, 1, w, 5 + hh, d, p), 0);
    /* a two-layer pack is the layers' parts one after the other */
    size_t need2 = kv_pack_size(kv, s, 0, 2, 5, 2);
    assert_int_equal(need2 - sizeof h, 2 * (need - sizeof h));
    unsigned char *buf2 = malloc(need2);
    assert_int_equal(kv_pack(kv, s, 0, 2, 5, 2, buf2, need2, NULL), KV_OK);
    assert_memory_equal(buf2 + sizeof h + (need - sizeof h), buf + sizeof h, need - sizeof h);
    /* buffer too small: nothing written */
    memset(buf, 0xab, need);
    wr = 77;
    assert_int_equal(kv_pack(kv, s, 1, 1, 5, 2, buf, need - 1, &wr), KV_ERR_BUFSIZE);
    assert_int_equal(wr, 0);
    for (size_t i = 0; i < need; i++) assert_int_equal(buf[i], 0xab);
    assert_int_equal(kv_pack(kv, s, 1, 1, 5, 2, NULL, need, &wr), KV_ERR_BUFSIZE);
    /* bad ranges and sequences */
    assert_int_equal(kv_pack(kv, s, 1, 1, 3, 2, buf, need, &wr), KV_ERR_INVAL); /* head 3 not here */
    assert_int_equal(kv_pack(kv, s, 1, 1, 6, 2, buf, need, &wr), KV_ERR_INVAL); /* head 7 not here */
    assert_int_equal(kv_pack(kv, s, 1, 2, 5, 2, buf, need, &wr), KV_ERR_INVAL);
    assert_int_equal(kv_pack(kv, s, 0, 0, 5, 2, buf, need, &wr), KV_ERR_INVAL);
    assert_int_equal(kv_pack(kv, s, -1, 1, 5, 2, buf, need, &wr), KV_ERR_INVAL);
    assert_int_equal(kv_pack(kv, s, 0, 1, 5, 0, buf, need, &wr), KV_ERR_INVAL);
    assert_int_equal(kv_pack(kv, 5, 0, 1, 5, 1, buf, need, &wr), KV_ERR_NOSEQ);
    assert_int_equal(kv_pack_size(kv, 5, 0, 1, 5, 1), 0);
    assert_int_equal(kv_pack_size(kv, s, 0, 1, 7, 1), 0);
    assert_int_equal(kv_pack_range(kv, s, 0, 1, 5, 1, 8, 3, buf, need, &wr), KV_ERR_INVAL);
    assert_int_equal(kv_pack_range(kv, s, 0, 1, 5, 1, -1, 3, buf, need, &wr), KV_ERR_INVAL);
    free(buf);
    free(buf2);
    done(&kv);
}

/* TP re-sharding: a 4-head pool packs heads for two 2-head pools and back again, with
 * different block sizes on each side. */
static void test_pack_reshard(void **state)
{
    (void)state;
    const dtype_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16};
    for (int ti = 0; ti < 3; ti++) {
        kv_cache_t *src = make_shard(types[ti], 8, 0, 4, 4);
        kv_cache_t *r0 = make_shard(types[ti], 4, 0, 2, 8), *r1 = make_shard(types[ti], 8, 2, 2, 3);
        int s = new_seq(src);
        int32_t t[23];
        toks(t, 23, 0);
        assert_int_equal(kv_seq_append(src, s, t, 23), KV_OK);
        store_all(src, s, 5, 0, 23);
        int d0 = new_seq(r0), d1 = new_seq(r1);
        assert_int_equal(kv_seq_append(r0, d0, t, 23), KV_OK);
        assert_int_equal(kv_seq_append(r1, d1, t, 23), KV_OK);
        for (int r = 0; r < 2; r++) {
            kv_cache_t *dst = r ? r1 : r0;
            int ds = r ? d1 : d0;
            for (int l = 0; l < 2; l++) { /* layer by layer, as a transfer streams */
                size_t n = kv_pack_size(src, s, l, 1, 2 * r, 2);
                assert_int_equal(n, kv_pack_size(dst, ds, l, 1, 2 * r, 2));
                void *buf = malloc(n);
                size_t wr;
                assert_int_equal(kv_pack(src, s, l, 1, 2 * r, 2, buf, n, &wr), KV_OK);
                assert_int_equal(kv_unpack(dst, ds, l, 1, 2 * r, 2, buf, wr), KV_OK);
                free(buf);
            }
            check_heads_equal(src, s, dst, ds, 0, 2, 2 * r, 2, 0);
        }
        /* and back: a fresh 4-head pool gathers both halves */
        kv_cache_t *back = make_shard(types[ti], 8, 0, 4, 16);
        int bs = new_seq(back);
        assert_int_equal(kv_seq_append(back, bs, t, 23), KV_OK);
        for (int r = 0; r < 2; r++) {
            kv_cache_t *from = r ? r1 : r0;
            int fs = r ? d1 : d0;
            size_t n = kv_pack_size(from, fs, 0, 2, 2 * r, 2);
            void *buf = malloc(n);
            assert_int_equal(kv_pack(from, fs, 0, 2, 2 * r, 2, buf, n, NULL), KV_OK);
            assert_int_equal(kv_unpack(back, bs, 0, 2, 2 * r, 2, buf, n), KV_OK);
            free(buf);
        }
        check_heads_equal(src, s, back, bs, 0, 2, 0, 4, 0);
        consistent(src);
        consistent(r0);
        consistent(r1);
        kv_destroy(&back);
        kv_destroy(&src);
        kv_destroy(&r0);
        kv_destroy(&r1);
    }
}

static void test_unpack_errors(void **state)
{
    (void)state;
    kv_cache_t *src = make_shard(DTYPE_F16, 8, 0, 4, 4);
    int s = new_seq(src);
    int32_t t[10];
    toks(t, 10, 0);
    assert_int_equal(kv_seq_append(src, s, t, 10), KV_OK);
    store_all(src, s, 7, 0, 10);
    size_t n = kv_pack_size(src, s, 0, 2, 1, 2);
    unsigned char *buf = malloc(n), *bad = malloc(n + 8);
    assert_int_equal(kv_pack(src, s, 0, 2, 1, 2, buf, n, NULL), KV_OK);

    kv_cache_t *dst = make_shard(DTYPE_F16, 8, 0, 4, 4);
    int d = new_seq(dst);
    assert_int_equal(kv_seq_append(dst, d, t, 10), KV_OK);
    store_all(dst, d, 8, 0, 10);
    /* each of these leaves dst's K/V untouched */
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, buf, n - 1), KV_ERR_SHAPE);   /* short */
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, buf, 10), KV_ERR_SHAPE);      /* no header */
    memcpy(bad, buf, n);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, bad, n + 8), KV_ERR_SHAPE);   /* long */
    assert_int_equal(kv_unpack(dst, d, 0, 1, 1, 2, buf, n), KV_ERR_SHAPE);       /* other layers */
    assert_int_equal(kv_unpack(dst, d, 0, 2, 0, 2, buf, n), KV_ERR_SHAPE);       /* other heads */
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 3, buf, n), KV_ERR_SHAPE);
    ((kv_pack_header *)bad)->magic ^= 1;
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, bad, n), KV_ERR_SHAPE);
    memcpy(bad, buf, n);
    ((kv_pack_header *)bad)->dtype = DTYPE_BF16;
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, bad, n), KV_ERR_SHAPE);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, NULL, n), KV_ERR_INVAL);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 3, 2, buf, n), KV_ERR_INVAL);       /* head 4 */
    assert_int_equal(kv_unpack(dst, 6, 0, 2, 1, 2, buf, n), KV_ERR_NOSEQ);
    /* the sequence's length must match */
    int e = new_seq(dst);
    assert_int_equal(kv_seq_append(dst, e, t, 9), KV_OK);
    assert_int_equal(kv_unpack(dst, e, 0, 2, 1, 2, buf, n), KV_ERR_SHAPE);
    /* another dtype or head_dim */
    kv_cache_t *f32 = make_shard(DTYPE_F32, 8, 0, 4, 4);
    int g = new_seq(f32);
    assert_int_equal(kv_seq_append(f32, g, t, 10), KV_OK);
    assert_int_equal(kv_unpack(f32, g, 0, 2, 1, 2, buf, n), KV_ERR_SHAPE);
    kv_config hc = *kv_config_of(dst);
    hc.head_dim = 4;
    hc.budget_bytes = kv_block_bytes(&hc) * 8;
    kv_cache_t *hd4 = NULL;
    assert_int_equal(kv_new(&hc, &hd4), KV_OK);
    int h4 = new_seq(hd4);
    assert_int_equal(kv_seq_append(hd4, h4, t, 10), KV_OK);
    assert_int_equal(kv_unpack(hd4, h4, 0, 2, 1, 2, buf, n), KV_ERR_SHAPE);
    check_all(dst, d, 8, 0, 10, 0);
    /* read-only destination blocks: shared by a fork */
    int fk;
    assert_int_equal(kv_seq_fork(dst, d, &fk), KV_OK);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, buf, n), KV_ERR_INVAL);
    check_all(dst, d, 8, 0, 10, 0);
    assert_int_equal(kv_seq_free(dst, fk), KV_OK);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 1, 2, buf, n), KV_OK);
    consistent(dst);
    free(buf);
    free(bad);
    kv_destroy(&hd4);
    kv_destroy(&f32);
    kv_destroy(&dst);
    kv_destroy(&src);
}

/* int8: the scales travel with the data, one per row, so any range and any block size
 * works. */
static void test_pack_int8(void **state)
{
    (void)state;
    kv_cache_t *src = make_shard(DTYPE_I8, 8, 0, 4, 4), *dst = make_shard(DTYPE_I8, 8, 2, 2, 4);
    int s = new_seq(src), d = new_seq(dst);
    int32_t t[10];
    toks(t, 10, 0);
    assert_int_equal(kv_seq_append(src, s, t, 10), KV_OK);
    store_all(src, s, 4, 0, 10);
    assert_int_equal(kv_seq_append(dst, d, t, 10), KV_OK);
    size_t n = kv_pack_size(src, s, 0, 2, 2, 2);
    assert_int_equal(n, sizeof(kv_pack_header) + 2 * (2 * 2 * 10 * 8 + 2 * 2 * 10 * 4));
    void *buf = malloc(n);
    assert_int_equal(kv_pack(src, s, 0, 2, 2, 2, buf, n, NULL), KV_OK);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 2, 2, buf, n), KV_OK);
    check_heads_equal(src, s, dst, d, 0, 2, 2, 2, 0); /* bit-exact: same q and scales */
    /* layer 0's K scales follow its K and V data: head 2's [10] first, token 5 = block 1 row 1 */
    float sc;
    memcpy(&sc, (unsigned char *)buf + sizeof(kv_pack_header) + 2 * 2 * 10 * 8 + 5 * 4, sizeof sc);
    assert_true(sc > 0);
    assert_float_equal(sc, kv_k_scales(src, 0, kv_seq_blocks(src, s, NULL)[1])[2 * 4 + 1], 0);
    /* ranges that start or end inside a block */
    int d2 = new_seq(dst);
    assert_int_equal(kv_seq_append(dst, d2, t, 10), KV_OK);
    size_t w, w2;
    assert_int_equal(kv_pack_range(src, s, 0, 2, 2, 2, 0, 3, buf, n, &w), KV_OK);
    assert_int_equal(kv_unpack_range(dst, d2, 0, 2, 2, 2, 0, 3, buf, w), KV_OK);
    void *buf2 = malloc(n);
    assert_int_equal(kv_pack_range(src, s, 0, 2, 2, 2, 3, 7, buf2, n, &w2), KV_OK);
    assert_int_equal(kv_unpack_range(dst, d2, 0, 2, 2, 2, 3, 7, buf2, w2), KV_OK);
    check_heads_equal(src, s, dst, d2, 0, 2, 2, 2, 0);
    free(buf2);
    /* another block size */
    kv_cache_t *bt8 = make_shard(DTYPE_I8, 8, 2, 2, 8);
    int e = new_seq(bt8);
    assert_int_equal(kv_seq_append(bt8, e, t, 10), KV_OK);
    assert_int_equal(kv_pack(src, s, 0, 2, 2, 2, buf, n, NULL), KV_OK);
    assert_int_equal(kv_unpack(bt8, e, 0, 2, 2, 2, buf, n), KV_OK);
    check_heads_equal(src, s, bt8, e, 0, 2, 2, 2, 0);
    free(buf);
    kv_destroy(&bt8);
    kv_destroy(&src);
    kv_destroy(&dst);
}

/* Ranges: only the uncached suffix moves after a prefix attach on the receiving side. */
static void test_pack_range_suffix(void **state)
{
    (void)state;
    kv_cache_t *src = make_shard(DTYPE_F16, 8, 0, 4, 4), *dst = make_shard(DTYPE_F16, 8, 0, 4, 4);
    int32_t t[14];
    toks(t, 14, 300);
    int s = new_seq(src);
    assert_int_equal(kv_seq_append(src, s, t, 14), KV_OK);
    store_all(src, s, 6, 0, 14);
    /* dst has the first 8 tokens cached already */
    int w = new_seq(dst);
    assert_int_equal(kv_seq_append(dst, w, t, 8), KV_OK);
    store_all(dst, w, 6, 0, 8);
    assert_int_equal(kv_seq_commit(dst, w, 8), KV_OK);
    assert_int_equal(kv_seq_free(dst, w), KV_OK);
    int d = new_seq(dst), n;
    assert_int_equal(kv_prefix_attach(dst, d, t, 13, &n), KV_OK);
    assert_int_equal(n, 8);
    assert_int_equal(kv_seq_append(dst, d, t + 8, 6), KV_OK);
    /* all 14: refused, the first 8 are read-only */
    size_t all = kv_pack_size(src, s, 0, 2, 0, 4);
    void *buf = malloc(all);
    assert_int_equal(kv_pack(src, s, 0, 2, 0, 4, buf, all, NULL), KV_OK);
    assert_int_equal(kv_unpack(dst, d, 0, 2, 0, 4, buf, all), KV_ERR_INVAL);
    size_t need = kv_pack_range_size(src, 0, 2, 0, 4, 6), wr;
    assert_true(need < all);
    assert_int_equal(kv_pack_range(src, s, 0, 2, 0, 4, 8, 6, buf, all, &wr), KV_OK);
    assert_int_equal(wr, need);
    assert_int_equal(kv_unpack_range(dst, d, 0, 2, 0, 4, 6, 6, buf, wr), KV_ERR_SHAPE);
    assert_int_equal(kv_unpack_range(dst, d, 0, 2, 0, 4, 9, 6, buf, wr), KV_ERR_INVAL);
    size_t w7;
    void *b7 = malloc(all);
    assert_int_equal(kv_pack_range(src, s, 0, 2, 0, 4, 7, 6, b7, all, &w7), KV_OK);
    assert_int_equal(kv_unpack_range(dst, d, 0, 2, 0, 4, 7, 6, b7, w7), KV_ERR_INVAL); /* cached */
    free(b7);
    assert_int_equal(kv_unpack_range(dst, d, 0, 2, 0, 4, 8, 6, buf, wr), KV_OK);
    check_heads_equal(src, s, dst, d, 0, 2, 0, 4, 0);
    free(buf);
    consistent(dst);
    kv_destroy(&src);
    kv_destroy(&dst);
}

/* kv_check notices corrupted state (it is what the randomized test relies on). */
static void test_stats_and_check(void **state)
{
    (void)state;
    kv_cache_t *kv = make(DTYPE_F16, 4);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.blocks_total, 4);
    assert_int_equal(st.blocks_free, 4);
    assert_int_equal(st.blocks_used + st.blocks_cached + st.blocks_evictable, 0);
    assert_int_equal(st.evictions + st.prefix_hit_tokens + st.prefix_miss_tokens, 0);
    kv_get_stats(NULL, &st);
    assert_int_equal(st.blocks_total, 0);
    kv_get_stats(kv, NULL);
    char msg[128];
    assert_int_equal(kv_check(NULL, msg, sizeof msg), KV_ERR_INVAL);
    assert_true(strlen(msg) > 0);
    assert_int_equal(kv_check(kv, NULL, 0), KV_OK);
    assert_int_equal(kv_block_ref(kv, -1), -1);
    assert_int_equal(kv_block_ref(kv, 4), -1);
    assert_int_equal(kv_block_ref(NULL, 0), -1);
    assert_int_equal(kv_free_blocks(NULL), 0);
    assert_int_equal(kv_n_blocks(NULL), 0);
    assert_null(kv_config_of(NULL));
    done(&kv);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_config),
        cmocka_unit_test(test_strerror),
        cmocka_unit_test(test_layout),
        cmocka_unit_test(test_seq_new_free),
        cmocka_unit_test(test_append),
        cmocka_unit_test(test_store_load),
        cmocka_unit_test(test_store_rounding_int8),
        cmocka_unit_test(test_fork_cow),
        cmocka_unit_test(test_truncate),
        cmocka_unit_test(test_prefix_commit_lookup_attach),
        cmocka_unit_test(test_prefix_depth),
        cmocka_unit_test(test_prefix_collisions),
        cmocka_unit_test(test_eviction_lru),
        cmocka_unit_test(test_eviction_orphans),
        cmocka_unit_test(test_admission),
        cmocka_unit_test(test_pack_layout),
        cmocka_unit_test(test_pack_reshard),
        cmocka_unit_test(test_unpack_errors),
        cmocka_unit_test(test_pack_int8),
        cmocka_unit_test(test_pack_range_suffix),
        cmocka_unit_test(test_stats_and_check),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
