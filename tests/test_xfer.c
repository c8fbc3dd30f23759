/* tests/test_xfer.c: KV transfers (worker/xfer) over the real tcp data plane, in one
 * process: a prefill side (the whole model, tp 1) ships a prompt's KV layer by layer from
 * model_forward's layer hook to a decode group of two TP ranks (one KV head each), which
 * receive straight into their own reserved blocks. Checks:
 *   - the KV that arrives is the KV that left, byte for byte (kv_pack of both sides);
 *   - a second transfer of a longer context sends only what the receiver has not cached;
 *   - a reservation whose KV never comes expires and frees its blocks;
 *   - a message of the wrong size, or with a bad checksum, fails the transfer;
 *   - release drops a reservation and its late messages;
 *   - no block is leaked (kv_check, free counts back to where they started).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "comm/comm.h"
#include "kv/kv.h"
#include "tests/support/testutil.h"
#include "worker/model.h"
#include "worker/xfer.h"

#define NR 3 /* rank 0: prefill; ranks 1, 2: the decode group's TP ranks */

typedef struct {
    char dir[256], path[512];
    model_t *m[NR];
    kv_cache_t *kv[NR];
    comm_t *comm[NR];
    xfer_t *x[NR];
    model_ctx_t *ctx; /* rank 0's */
    int n_heads_kv;
} fix;

static int64_t now_ms(void) { return (int64_t)tu_now_ms(); }

static int setup(void **state)
{
    fix *f = calloc(1, sizeof *f);
    if (!f || tu_tiny_model("xfer", f->dir, sizeof f->dir, f->path, sizeof f->path) != 0) return -1;
    char err[256];
    for (int r = 0; r < NR; r++) {
        int tp_rank = r == 0 ? 0 : r - 1, tp_size = r == 0 ? 1 : 2;
        if (model_load(f->path, tp_rank, tp_size, &f->m[r], err, sizeof err) != 0) {
            fprintf(stderr, "%s\n", err);
            return -1;
        }
        kv_config kc = model_kv_config(f->m[r], DTYPE_F16, (size_t)4 << 20);
        if (kv_new(&kc, &f->kv[r]) != KV_OK) return -1;
        if (comm_tcp_new("tcp://127.0.0.1:0", NULL, &f->comm[r], err, sizeof err) != COMM_OK) {
            fprintf(stderr, "comm_tcp_new: %s\n", err);
            return -1;
        }
        if (xfer_new(f->kv[r], &f->x[r]) != XFER_OK) return -1;
        xfer_set_comm(f->x[r], f->comm[r]);
    }
    const char *eps[NR];
    for (int r = 0; r < NR; r++) eps[r] = comm_tcp_endpoint(f->comm[r]);
    for (int r = 0; r < NR; r++)
        if (comm_tcp_set_world(f->comm[r], r, NR, eps) != COMM_OK) return -1;
    if (model_ctx_new(f->m[0], 256, 1, &f->ctx) != 0) return -1;
    f->n_heads_kv = model_hparams_of(f->m[0])->n_head_kv;
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fix *f = *state;
    model_ctx_destroy(&f->ctx);
    for (int r = 0; r < NR; r++) {
        xfer_set_comm(f->x[r], NULL);
        comm_destroy(&f->comm[r]);
        xfer_destroy(&f->x[r]);
        kv_destroy(&f->kv[r]);
        model_destroy(&f->m[r]);
    }
    int rc = tu_rmtree(f->dir);
    free(f);
    return rc;
}

/* The prefill side's layer hook: ship each layer of the one sequence. */
typedef struct {
    xfer_t *x;
    int64_t xfer;
    int seq, n;
} ship_ctx;

static void on_layer(void *user, int layer)
{
    ship_ctx *s = user;
    xfer_ship(s->x, s->xfer, s->seq, layer, s->n);
}

static void tokens_of(int32_t *t, int n, int salt)
{
    for (int i = 0; i < n; i++) t[i] = (i * 7 + salt * 13 + 1) % 200;
}

/* Poll every engine until want events of the given types arrived (or 10 s). */
static int pump(fix *f, xfer_event *out, int want)
{
    int got = 0;
    for (double t0 = tu_now_ms(); got < want && tu_now_ms() - t0 < 10000;) {
        for (int r = 0; r < NR; r++) {
            xfer_poll(f->x[r], now_ms());
            while (got < want && xfer_next_event(f->x[r], &out[got])) got++;
        }
        if (got < want) usleep(200);
    }
    return got;
}

/* Prefill ctx[n] on rank 0 (a fresh sequence) shipping to ranks 1 and 2 as transfer id. */
static int prefill_and_ship(fix *f, int64_t id, const int32_t *ctx, int n, int first_block)
{
    xfer_peer dst[2];
    for (int r = 1; r < NR; r++) {
        const kv_config *kc = kv_config_of(f->kv[r]);
        dst[r - 1] = (xfer_peer){.rank = r, .head0 = kc->kv_head0, .n_heads = kc->n_kv_heads};
    }
    char err[160];
    assert_int_equal(xfer_send_begin(f->x[0], id, (uint64_t)id, dst, 2, first_block, 10000, err, sizeof err), XFER_OK);
    int seq;
    assert_int_equal(kv_seq_new(f->kv[0], &seq), KV_OK);
    assert_int_equal(kv_seq_append(f->kv[0], seq, ctx, n), KV_OK);
    ship_ctx sc = {.x = f->x[0], .xfer = id, .seq = seq, .n = n};
    model_ctx_set_progress(f->ctx, on_layer, &sc);
    model_seq_batch b = {.seq = seq, .pos0 = 0, .n_tokens = n, .tokens = ctx, .logits = 1};
    float *logits = malloc((size_t)model_hparams_of(f->m[0])->n_vocab * sizeof *logits);
    assert_non_null(logits);
    assert_int_equal(model_forward(f->ctx, f->m[0], f->kv[0], &b, 1, logits, err, sizeof err), 0);
    model_ctx_set_progress(f->ctx, NULL, NULL);
    free(logits);
    kv_seq_commit(f->kv[0], seq, n);
    return seq;
}

/* Compare the KV of rank r's seq_r with rank 0's seq_0 for r's heads, all layers. */
static void same_kv(fix *f, int r, int seq_r, int seq_0)
{
    const kv_config *kc = kv_config_of(f->kv[r]);
    const int L = kc->n_layers, h0 = kc->kv_head0, nh = kc->n_kv_heads;
    size_t a = kv_pack_size(f->kv[0], seq_0, 0, L, h0, nh), b = kv_pack_size(f->kv[r], seq_r, 0, L, h0, nh);
    assert_true(a > 0);
    assert_int_equal(a, b);
    uint8_t *pa = malloc(a), *pb = malloc(b);
    assert_int_equal(kv_pack(f->kv[0], seq_0, 0, L, h0, nh, pa, a, NULL), KV_OK);
    assert_int_equal(kv_pack(f->kv[r], seq_r, 0, L, h0, nh, pb, b, NULL), KV_OK);
    assert_memory_equal(pa, pb, a);
    free(pa);
    free(pb);
}

static void check_all(fix *f)
{
    char msg[256];
    for (int r = 0; r < NR; r++)
        if (kv_check(f->kv[r], msg, sizeof msg) != KV_OK) fail_msg("rank %d: kv_check: %s", r, msg);
}

static void test_kv_arrives_as_it_left(void **state)
{
    fix *f = *state;
    assert_int_equal(f->n_heads_kv, 2);
    int free0[NR];
    for (int r = 1; r < NR; r++) free0[r] = kv_free_blocks(f->kv[r]) + kv_evictable_blocks(f->kv[r]);
    enum { N = 45 };
    int32_t ctx[N + 40];
    tokens_of(ctx, N + 40, 1);
    char err[160];
    int cached[NR];
    xfer_peer src = {.rank = 0, .head0 = 0, .n_heads = 2};
    for (int r = 1; r < NR; r++) {
        assert_int_equal(xfer_reserve(f->x[r], 1, 1, ctx, N, &src, 1, 10000, &cached[r], err, sizeof err), XFER_OK);
        assert_int_equal(cached[r], 0);
    }
    int seq0 = prefill_and_ship(f, 1, ctx, N, 0);
    xfer_event ev[3];
    assert_int_equal(pump(f, ev, 3), 3);
    int sent = 0, recv = 0;
    for (int i = 0; i < 3; i++) {
        if (ev[i].type == XFER_EV_SENT) sent++;
        if (ev[i].type == XFER_EV_RECEIVED) recv++;
        assert_int_equal(ev[i].xfer, 1);
        assert_int_equal(ev[i].n_tokens, N);
    }
    assert_int_equal(sent, 1);
    assert_int_equal(recv, 2);
    int seq[NR], n_tok;
    for (int r = 1; r < NR; r++) {
        assert_true(xfer_received(f->x[r], 1));
        assert_int_equal(xfer_take(f->x[r], 1, &seq[r], &n_tok), XFER_OK);
        assert_int_equal(n_tok, N);
        same_kv(f, r, seq[r], seq0);
    }
    printf("[ xfer     ] %d tokens x %d layers: both TP ranks hold exactly the prefill's KV of their head\n",
           N, kv_config_of(f->kv[0])->n_layers);

    /* a longer context: the receivers have the first full blocks cached */
    const int N2 = N + 40;
    for (int r = 1; r < NR; r++) {
        assert_int_equal(xfer_reserve(f->x[r], 2, 2, ctx, N2, &src, 1, 10000, &cached[r], err, sizeof err), XFER_OK);
        assert_int_equal(cached[r], (N / 16) * 16);
    }
    int seq0b = prefill_and_ship(f, 2, ctx, N2, cached[1] / 16);
    assert_int_equal(pump(f, ev, 3), 3);
    size_t bytes_recv = 0;
    for (int i = 0; i < 3; i++)
        if (ev[i].type == XFER_EV_RECEIVED) bytes_recv += ev[i].bytes, assert_int_equal(ev[i].tok0, cached[1]);
    int seqb[NR];
    for (int r = 1; r < NR; r++) {
        assert_int_equal(xfer_take(f->x[r], 2, &seqb[r], &n_tok), XFER_OK);
        same_kv(f, r, seqb[r], seq0b);
    }
    printf("[ xfer     ] %d-token context, %d cached at the receivers: %zu bytes moved, KV equal\n", N2,
           cached[1], bytes_recv);
    for (int r = 1; r < NR; r++) {
        kv_seq_free(f->kv[r], seq[r]);
        kv_seq_free(f->kv[r], seqb[r]);
        assert_int_equal(kv_free_blocks(f->kv[r]) + kv_evictable_blocks(f->kv[r]), free0[r]);
    }
    kv_seq_free(f->kv[0], seq0);
    kv_seq_free(f->kv[0], seq0b);
    check_all(f);
}

static void test_lease_release_and_bad_messages(void **state)
{
    fix *f = *state;
    const int before = kv_free_blocks(f->kv[1]) + kv_evictable_blocks(f->kv[1]);
    int32_t ctx[70];
    tokens_of(ctx, 70, 5);
    char err[160];
    int cached;
    xfer_peer src = {.rank = 0, .head0 = 0, .n_heads = 2};
    xfer_event ev;

    /* a reservation waits for its prefill (queued behind others) past its lease ... */
    assert_int_equal(xfer_reserve(f->x[1], 10, 10, ctx, 70, &src, 1, 50, &cached, err, sizeof err), XFER_OK);
    assert_true(kv_free_blocks(f->kv[1]) + kv_evictable_blocks(f->kv[1]) < before);
    usleep(120000);
    xfer_poll(f->x[1], now_ms());
    assert_false(xfer_next_event(f->x[1], &ev));
    assert_true(xfer_holds(f->x[1], 10));
    /* ... but once the source says it sent everything, the KV must come within the lease:
     * it never does, the lease expires and the blocks come back */
    xfer_expect(f->x[1], 10);
    usleep(80000);
    assert_int_equal(pump(f, &ev, 1), 1);
    assert_int_equal(ev.type, XFER_EV_EXPIRED);
    assert_int_equal(ev.xfer, 10);
    assert_false(xfer_holds(f->x[1], 10));
    assert_int_equal(kv_free_blocks(f->kv[1]) + kv_evictable_blocks(f->kv[1]), before);

    /* a message of the wrong size fails the transfer */
    assert_int_equal(xfer_reserve(f->x[1], 11, 11, ctx, 70, &src, 1, 10000, &cached, err, sizeof err), XFER_OK);
    char junk[100] = {0};
    comm_op_t *op = NULL;
    assert_int_equal(comm_isend(f->comm[0], 1, 11, junk, sizeof junk, &op), COMM_OK);
    assert_int_equal(pump(f, &ev, 1), 1);
    assert_int_equal(ev.type, XFER_EV_FAILED);
    assert_non_null(strstr(ev.msg, "expected"));
    comm_wait(f->comm[0], op, 1000, NULL);
    comm_op_free(f->comm[0], &op);
    assert_int_equal(kv_free_blocks(f->kv[1]) + kv_evictable_blocks(f->kv[1]), before);

#ifndef NDEBUG
    /* the right size with a bad checksum: "the KV that arrived is not the KV that left" */
    assert_int_equal(xfer_reserve(f->x[1], 12, 12, ctx, 70, &src, 1, 10000, &cached, err, sizeof err), XFER_OK);
    size_t body = kv_pack_range_size(f->kv[1], 0, 1, 0, 1, 70);
    uint8_t *msg = calloc(1, body + 8);
    uint64_t bad = 12345;
    memcpy(msg + body, &bad, 8);
    assert_int_equal(comm_isend(f->comm[0], 1, 12, msg, body + 8, &op), COMM_OK);
    assert_int_equal(pump(f, &ev, 1), 1);
    assert_int_equal(ev.type, XFER_EV_FAILED);
    assert_non_null(strstr(ev.msg, "checksum"));
    comm_wait(f->comm[0], op, 1000, NULL);
    comm_op_free(f->comm[0], &op);
    free(msg);
#endif

    /* release drops a reservation; its late message is discarded */
    assert_int_equal(xfer_reserve(f->x[1], 13, 13, ctx, 70, &src, 1, 10000, &cached, err, sizeof err), XFER_OK);
    xfer_release(f->x[1], 13);
    assert_false(xfer_holds(f->x[1], 13));
    assert_int_equal(comm_isend(f->comm[0], 1, 13, junk, sizeof junk, &op), COMM_OK);
    assert_int_equal(pump(f, &ev, 1), 0); /* nothing: the message was dropped */
    comm_wait(f->comm[0], op, 1000, NULL);
    comm_op_free(f->comm[0], &op);
    assert_int_equal(kv_free_blocks(f->kv[1]) + kv_evictable_blocks(f->kv[1]), before);

    /* a reservation larger than the pool is refused and keeps nothing */
    const int n_big = (kv_n_blocks(f->kv[1]) + 2) * kv_config_of(f->kv[1])->block_tokens;
    int32_t *big = malloc((size_t)n_big * sizeof *big);
    assert_non_null(big);
    tokens_of(big, n_big, 9);
    assert_int_equal(xfer_reserve(f->x[1], 14, 14, big, n_big, &src, 1, 10000, &cached, err, sizeof err), XFER_ERR_FULL);
    free(big);
    assert_non_null(strstr(err, "blocks needed"));
    assert_int_equal(kv_free_blocks(f->kv[1]) + kv_evictable_blocks(f->kv[1]), before);
    xfer_stats st;
    xfer_get_stats(f->x[1], &st);
    assert_int_equal(st.in_flight, 0);
    assert_int_equal(st.blocks_reserved, 0);
    check_all(f);
}

static void test_checksum(void **state)
{
    (void)state;
    uint8_t a[1000];
    for (int i = 0; i < 1000; i++) a[i] = (uint8_t)(i * 31);
    uint64_t h = xfer_checksum(a, sizeof a);
    assert_int_not_equal(h, 0);
    for (int i = 0; i < 1000; i += 97) {
        a[i] ^= 1;
        assert_int_not_equal(xfer_checksum(a, sizeof a), h);
        a[i] ^= 1;
    }
    assert_int_not_equal(xfer_checksum(a, 999), h);
    assert_int_equal(xfer_checksum(a, sizeof a), h);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_checksum),
        cmocka_unit_test(test_kv_arrives_as_it_left),
        cmocka_unit_test(test_lease_release_and_bad_messages),
    };
    return cmocka_run_group_tests_name("xfer", tests, setup, teardown);
}
