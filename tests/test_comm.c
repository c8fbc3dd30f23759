/* tests/test_comm.c: the data plane (comm/comm.h): the tcp backend with several ranks in one
 * process (one comm_t per rank, driven in turns from one thread, or one thread per rank for
 * the blocking collectives), over tcp://127.0.0.1 and ipc://, and the dispatch of comm_wrap
 * through a fake backend.
 *
 * - messages of one (source, tag) arrive in send order, whichever of send and receive
 *   comes first; many tags interleaved between three ranks; zero-length and self sends;
 * - a 64 MiB message, posted before and after it arrives;
 * - a message larger than the receive buffer: COMM_ERR_TRUNC, and the next one is fine;
 * - comm_discard drops queued and later messages of the pair (other pairs unaffected), and
 *   a receive posted for it is refused; a cancelled receive's message is dropped and the
 *   next receive of the pair gets the one after it; cancelled sends to a dead peer;
 * - comm_tcp_set_world withdrawing a peer ends its receives and sends (also one ZeroMQ
 *   holds for a peer that never answered) with COMM_ERR_PEER, at once; a peer that changed
 *   endpoint: messages of its old incarnation are dropped, the new one's arrive;
 * - comm_wait times out (COMM_ERR_TIMEOUT) on time;
 * - all-reduce, broadcast and all-gather over 2, 3 and 4 ranks (threads): the all-reduce
 *   equals, bit for bit, the sum in list order on every member (checked to differ from
 *   another order); a collective that times out on one member leaves the group usable;
 * - errors: arguments, no world yet, reserved tag bit, bad endpoints, with messages that
 *   name the call, the peer and the tag;
 * - a fake backend behind comm_wrap: calls reach its table; NULL entries answer
 *   COMM_ERR_UNSUPPORTED (or their documented default); destroy runs once, also when
 *   comm_wrap fails.
 */
#include <errno.h>
#include <math.h>
#include <pthread.h>
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
#include <zmq.h>

#include "comm/comm.h"

#define WAIT_MS 20000 /* the longest wait for anything that must happen (ASan, loaded CPU) */
#define MAXR 4

enum { T_TCP, T_IPC };
static int tcp_t = T_TCP, ipc_t = T_IPC;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

/* ---- a world of n tcp comms in this process --------------------------------------------------- */

typedef struct {
    int n;
    comm_t *c[MAXR];
    char ep[MAXR][256];
    char dir[64]; /* ipc: the folder of the socket files */
    int binds;    /* ipc: sockets made so far (unique file names) */
} world;

static void bind_one(world *w, int r, int transport)
{
    char bind[128], err[256];
    if (transport == T_IPC)
        snprintf(bind, sizeof bind, "ipc://%s/r%d-%d", w->dir, r, w->binds++);
    else
        snprintf(bind, sizeof bind, "tcp://127.0.0.1:0");
    comm_status st = comm_tcp_new(bind, NULL, &w->c[r], err, sizeof err);
    if (st != COMM_OK) fail_msg("comm_tcp_new(%s): %s", bind, err);
    snprintf(w->ep[r], sizeof w->ep[r], "%s", comm_tcp_endpoint(w->c[r]));
}

static void set_worlds(world *w)
{
    const char *eps[MAXR];
    for (int r = 0; r < w->n; r++) eps[r] = w->ep[r];
    for (int r = 0; r < w->n; r++)
        if (w->c[r]) assert_int_equal(comm_tcp_set_world(w->c[r], r, w->n, eps), COMM_OK);
}

static void world_up(world *w, int n, int transport)
{
    memset(w, 0, sizeof *w);
    w->n = n;
    if (transport == T_IPC) {
        snprintf(w->dir, sizeof w->dir, "/tmp/duet-comm-XXXXXX");
        assert_non_null(mkdtemp(w->dir));
    }
    for (int r = 0; r < n; r++) bind_one(w, r, transport);
    set_worlds(w);
    for (int r = 0; r < n; r++) {
        assert_int_equal(comm_rank(w->c[r]), r);
        assert_int_equal(comm_size(w->c[r]), n);
        assert_int_equal(comm_backend_of(w->c[r]), COMM_BACKEND_TCP);
    }
}

static void world_down(world *w)
{
    for (int r = 0; r < w->n; r++) {
        comm_destroy(&w->c[r]);
        assert_null(w->c[r]);
        comm_destroy(&w->c[r]); /* safe twice */
    }
    if (w->dir[0]) {
        char cmd[128];
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", w->dir);
        assert_int_equal(system(cmd), 0);
    }
}

static void wait_ok(comm_t *c, comm_op_t **op, size_t want_len)
{
    size_t len = 0;
    comm_status st = comm_wait(c, *op, WAIT_MS, &len);
    if (st != COMM_OK) fail_msg("comm_wait: %s: %s", comm_strerror(st), comm_last_error(c));
    assert_int_equal(len, want_len);
    comm_op_free(c, op);
    assert_null(*op);
}

static unsigned char pat(int a, int b, size_t i) { return (unsigned char)(a * 31 + b * 7 + i * 13 + (i >> 9)); }

static void fill_pat(unsigned char *p, size_t n, int a, int b)
{
    for (size_t i = 0; i < n; i++) p[i] = pat(a, b, i);
}

static void check_pat(const unsigned char *p, size_t n, int a, int b)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != pat(a, b, i)) fail_msg("byte %zu of message (%d, %d) is wrong", i, a, b);
}

/* ---- point to point ------------------------------------------------------------------------------ */

#define N_ORDER 300

static size_t order_len(int i) { return (size_t)(i * 37 % 5000); }

static void test_order(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    static unsigned char sbuf[N_ORDER][5000], rbuf[N_ORDER][5000];
    comm_op_t *s[N_ORDER] = {0}, *r[N_ORDER] = {0};
    for (int i = 0; i < 100; i++) /* a third of the receives first */
        assert_int_equal(comm_irecv(w.c[1], 0, 7, rbuf[i], sizeof rbuf[i], &r[i]), COMM_OK);
    for (int i = 0; i < N_ORDER; i++) {
        fill_pat(sbuf[i], order_len(i), i, 7);
        assert_int_equal(comm_isend(w.c[0], 0 + 1, 7, sbuf[i], order_len(i), &s[i]), COMM_OK);
    }
    for (int i = 100; i < N_ORDER; i++)
        assert_int_equal(comm_irecv(w.c[1], 0, 7, rbuf[i], sizeof rbuf[i], &r[i]), COMM_OK);
    for (int i = N_ORDER - 1; i >= 0; i--) wait_ok(w.c[1], &r[i], order_len(i));
    for (int i = 0; i < N_ORDER; i++) {
        check_pat(rbuf[i], order_len(i), i, 7);
        wait_ok(w.c[0], &s[i], order_len(i));
    }
    /* zero bytes, and a send to oneself */
    comm_op_t *a = NULL, *b = NULL;
    assert_int_equal(comm_isend(w.c[0], 1, 8, NULL, 0, &a), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 8, rbuf[0], 10, &b), COMM_OK);
    wait_ok(w.c[1], &b, 0);
    wait_ok(w.c[0], &a, 0);
    assert_int_equal(comm_isend(w.c[0], 0, 9, "self", 5, &a), COMM_OK);
    assert_int_equal(comm_irecv(w.c[0], 0, 9, rbuf[0], 10, &b), COMM_OK);
    wait_ok(w.c[0], &b, 5);
    assert_string_equal((char *)rbuf[0], "self");
    wait_ok(w.c[0], &a, 5);
    world_down(&w);
}

/* Messages sent before their receives wait; the receive is done at once. */
static void test_unexpected(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    assert_non_null(comm_zsock(w.c[1]));
    char msg[3][24], got[24];
    comm_op_t *s[4] = {0}, *r = NULL;
    for (int i = 0; i < 3; i++) {
        snprintf(msg[i], sizeof msg[i], "early %d", i);
        assert_int_equal(comm_isend(w.c[0], 1, 100 + (uint64_t)i, msg[i], strlen(msg[i]) + 1, &s[i]),
                         COMM_OK);
    }
    assert_int_equal(comm_isend(w.c[0], 1, 999, "end", 4, &s[3]), COMM_OK);
    /* wake on the data socket as an event loop would */
    zmq_pollitem_t it = {.socket = comm_zsock(w.c[1]), .events = ZMQ_POLLIN};
    assert_true(zmq_poll(&it, 1, WAIT_MS) >= 1);
    assert_int_equal(comm_progress(w.c[1]), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 999, got, sizeof got, &r), COMM_OK);
    wait_ok(w.c[1], &r, 4); /* one connection keeps order: the early ones are here now */
    for (int i = 2; i >= 0; i--) {
        assert_int_equal(comm_irecv(w.c[1], 0, 100 + (uint64_t)i, got, sizeof got, &r), COMM_OK);
        int done = 0;
        size_t len = 0;
        assert_int_equal(comm_test(w.c[1], r, &done, &len), COMM_OK);
        assert_int_equal(done, 1);
        assert_int_equal(len, strlen(msg[i]) + 1);
        assert_string_equal(got, msg[i]);
        comm_op_free(w.c[1], &r);
    }
    for (int i = 0; i < 4; i++) wait_ok(w.c[0], &s[i], i < 3 ? strlen(msg[i]) + 1 : 4);
    world_down(&w);
}

#define MT_TAGS 40
#define MT_K 3

static void test_many_tags(void **state)
{
    world w;
    world_up(&w, 3, *(int *)*state);
    enum { L = 64 };
    static unsigned char sb[3][3][MT_TAGS][MT_K][L], rb[3][3][MT_TAGS][MT_K][L];
    static comm_op_t *so[3][3][MT_TAGS][MT_K], *ro[3][3][MT_TAGS][MT_K];
    /* every rank sends to both others: tags round robin, MT_K messages per tag */
    for (int k = 0; k < MT_K; k++)
        for (int t = 0; t < MT_TAGS; t++)
            for (int a = 0; a < 3; a++)
                for (int b = 0; b < 3; b++) {
                    if (a == b) continue;
                    fill_pat(sb[a][b][t][k], L, a * 100 + b * 10 + k, t);
                    assert_int_equal(comm_isend(w.c[a], b, 5000 + (uint64_t)t, sb[a][b][t][k], L,
                                                &so[a][b][t][k]),
                                     COMM_OK);
                }
    /* receivers post in reverse tag order */
    for (int b = 0; b < 3; b++)
        for (int t = MT_TAGS - 1; t >= 0; t--)
            for (int a = 0; a < 3; a++)
                for (int k = 0; k < MT_K && a != b; k++)
                    assert_int_equal(comm_irecv(w.c[b], a, 5000 + (uint64_t)t, rb[a][b][t][k], L,
                                                &ro[a][b][t][k]),
                                     COMM_OK);
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int t = 0; t < MT_TAGS && a != b; t++)
                for (int k = 0; k < MT_K; k++) {
                    wait_ok(w.c[b], &ro[a][b][t][k], L);
                    check_pat(rb[a][b][t][k], L, a * 100 + b * 10 + k, t);
                    wait_ok(w.c[a], &so[a][b][t][k], L);
                }
    world_down(&w);
}

static void test_large(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    const size_t big = (size_t)64 << 20, mid = (size_t)16 << 20;
    unsigned char *s = malloc(big), *r = malloc(big);
    assert_non_null(s);
    assert_non_null(r);
    fill_pat(s, big, 1, 2);
    comm_op_t *so = NULL, *ro = NULL, *x = NULL;
    assert_int_equal(comm_irecv(w.c[1], 0, 1, r, big, &ro), COMM_OK);
    assert_int_equal(comm_isend(w.c[0], 1, 1, s, big, &so), COMM_OK);
    wait_ok(w.c[0], &so, big); /* complete: ZeroMQ has let go of s */
    wait_ok(w.c[1], &ro, big);
    assert_memory_equal(r, s, big);
    /* arriving before its receive: kept whole until posted */
    memset(r, 0, big);
    assert_int_equal(comm_isend(w.c[0], 1, 2, s + 3, mid, &so), COMM_OK);
    assert_int_equal(comm_isend(w.c[0], 1, 3, "x", 1, &x), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 3, r, 1, &ro), COMM_OK);
    wait_ok(w.c[1], &ro, 1);
    assert_int_equal(comm_irecv(w.c[1], 0, 2, r, big, &ro), COMM_OK);
    int done = 0;
    assert_int_equal(comm_test(w.c[1], ro, &done, NULL), COMM_OK);
    assert_int_equal(done, 1);
    comm_op_free(w.c[1], &ro);
    assert_memory_equal(r, s + 3, mid);
    wait_ok(w.c[0], &so, mid);
    wait_ok(w.c[0], &x, 1);
    free(s);
    free(r);
    world_down(&w);
}

static void test_trunc(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    char big[100], small[50];
    memset(big, 'b', sizeof big);
    comm_op_t *s = NULL, *r = NULL;
    assert_int_equal(comm_isend(w.c[0], 1, 5, big, sizeof big, &s), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 5, small, sizeof small, &r), COMM_OK);
    size_t len = 7;
    assert_int_equal(comm_wait(w.c[1], r, WAIT_MS, &len), COMM_ERR_TRUNC);
    assert_int_equal(len, 0);
    assert_non_null(strstr(comm_last_error(w.c[1]), "100-byte"));
    assert_non_null(strstr(comm_last_error(w.c[1]), "peer 0 tag 5"));
    int done = 0; /* a finished op keeps its status */
    assert_int_equal(comm_test(w.c[1], r, &done, NULL), COMM_ERR_TRUNC);
    assert_int_equal(done, 1);
    comm_op_free(w.c[1], &r);
    wait_ok(w.c[0], &s, sizeof big);
    assert_int_equal(comm_isend(w.c[0], 1, 5, "ok", 3, &s), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 5, small, sizeof small, &r), COMM_OK);
    wait_ok(w.c[1], &r, 3);
    assert_string_equal(small, "ok");
    wait_ok(w.c[0], &s, 3);
    world_down(&w);
}

/* Send tag..., then a marker on mark, and wait for the marker at the receiver. */
static void sync_marker(world *w, int from, int to, uint64_t mark)
{
    comm_op_t *s = NULL, *r = NULL;
    char got[8];
    assert_int_equal(comm_isend(w->c[from], to, mark, "mark", 5, &s), COMM_OK);
    assert_int_equal(comm_irecv(w->c[to], from, mark, got, sizeof got, &r), COMM_OK);
    wait_ok(w->c[to], &r, 5);
    wait_ok(w->c[from], &s, 5);
}

static void test_discard(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    static unsigned char blob[5][1 << 16];
    comm_op_t *s[5] = {0}, *r = NULL;
    for (int i = 0; i < 3; i++)
        assert_int_equal(comm_isend(w.c[0], 1, 9, blob[i], sizeof blob[i], &s[i]), COMM_OK);
    sync_marker(&w, 0, 1, 10); /* the three are queued at rank 1 now */
    comm_discard(w.c[1], 0, 9);
    comm_discard(w.c[1], 0, 77); /* nothing there yet: later ones go */
    for (int i = 3; i < 5; i++)
        assert_int_equal(comm_isend(w.c[0], 1, i == 3 ? 9 : 77, blob[i], sizeof blob[i], &s[i]),
                         COMM_OK);
    sync_marker(&w, 0, 1, 11);
    for (int i = 0; i < 5; i++) wait_ok(w.c[0], &s[i], sizeof blob[i]);
    assert_int_equal(comm_irecv(w.c[1], 0, 9, blob[0], sizeof blob[0], &r), COMM_ERR_INVAL);
    assert_null(r);
    assert_non_null(strstr(comm_last_error(w.c[1]), "discarded"));
    assert_int_equal(comm_irecv(w.c[1], 0, 77, blob[0], sizeof blob[0], &r), COMM_ERR_INVAL);
    /* the other direction and other tags are untouched */
    sync_marker(&w, 1, 0, 9);
    sync_marker(&w, 0, 1, 12);
    world_down(&w); /* nothing leaks (ASan) */
}

static void test_cancel(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    char got[8] = "";
    comm_op_t *s1 = NULL, *s2 = NULL, *r1 = NULL, *r2 = NULL;
    assert_int_equal(comm_irecv(w.c[1], 0, 20, got, sizeof got, &r1), COMM_OK);
    comm_cancel(w.c[1], &r1);
    assert_null(r1);
    comm_cancel(w.c[1], &r1); /* NULL: no-op */
    assert_int_equal(comm_irecv(w.c[1], 0, 20, got, sizeof got, &r2), COMM_OK);
    assert_int_equal(comm_isend(w.c[0], 1, 20, "A", 2, &s1), COMM_OK);
    assert_int_equal(comm_isend(w.c[0], 1, 20, "B", 2, &s2), COMM_OK);
    wait_ok(w.c[1], &r2, 2);
    assert_string_equal(got, "B"); /* A was the cancelled receive's */
    wait_ok(w.c[0], &s1, 2);
    wait_ok(w.c[0], &s2, 2);
    /* cancelling a finished receive drops nothing later */
    assert_int_equal(comm_isend(w.c[0], 1, 21, "C", 2, &s1), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 21, got, sizeof got, &r1), COMM_OK);
    assert_int_equal(comm_wait(w.c[1], r1, WAIT_MS, NULL), COMM_OK);
    comm_cancel(w.c[1], &r1);
    assert_int_equal(comm_isend(w.c[0], 1, 21, "D", 2, &s2), COMM_OK);
    assert_int_equal(comm_irecv(w.c[1], 0, 21, got, sizeof got, &r1), COMM_OK);
    wait_ok(w.c[1], &r1, 2);
    assert_string_equal(got, "D");
    wait_ok(w.c[0], &s1, 2);
    wait_ok(w.c[0], &s2, 2);
    /* many cancels: the remembered pairs stay bounded, nothing leaks */
    for (int i = 0; i < 5000; i++) {
        assert_int_equal(comm_irecv(w.c[1], 0, 100000 + (uint64_t)i, got, sizeof got, &r1), COMM_OK);
        comm_cancel(w.c[1], &r1);
    }
    world_down(&w);
}

/* More messages than ZeroMQ queues (high-water marks): the rest wait in the sender's queue
 * and go out, in order, as the sender makes progress; the same world set again changes
 * nothing. */
#define N_HWM 20000

static void test_hwm(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    comm_op_t **s = calloc(N_HWM, sizeof *s), **r = calloc(N_HWM, sizeof *r);
    uint32_t *in = calloc(N_HWM, sizeof *in), *out = calloc(N_HWM, sizeof *out);
    assert_non_null(s);
    assert_non_null(r);
    for (int i = 0; i < N_HWM; i++) {
        out[i] = (uint32_t)i * 2654435761u;
        assert_int_equal(comm_isend(w.c[0], 1, 3, &out[i], sizeof out[i], &s[i]), COMM_OK);
    }
    set_worlds(&w); /* the same endpoints: nothing is dropped */
    for (int i = 0; i < N_HWM; i++)
        assert_int_equal(comm_irecv(w.c[1], 0, 3, &in[i], sizeof in[i], &r[i]), COMM_OK);
    int left = 2 * N_HWM;
    const double t0 = now_ms();
    while (left > 0 && now_ms() - t0 < WAIT_MS) {
        assert_int_equal(comm_progress(w.c[0]), COMM_OK);
        for (int i = 0; i < N_HWM; i++) {
            int done = 0;
            if (!r[i] && !s[i]) continue;
            if (r[i]) {
                assert_int_equal(comm_test(w.c[1], r[i], &done, NULL), COMM_OK);
                if (done) {
                    comm_op_free(w.c[1], &r[i]);
                    left--;
                }
            } else if (s[i]) {
                assert_int_equal(comm_test(w.c[0], s[i], &done, NULL), COMM_OK);
                if (done) {
                    comm_op_free(w.c[0], &s[i]);
                    left--;
                }
            }
            if (!done && i > 64) break; /* later ones cannot be done yet either */
        }
    }
    assert_int_equal(left, 0);
    assert_memory_equal(in, out, N_HWM * sizeof *in);
    free(s);
    free(r);
    free(in);
    free(out);
    world_down(&w);
}

/* A world where rank 2 has an endpoint nobody listens on. */
static void dead_world(world *w, int transport, char *dead, size_t cap)
{
    world_up(w, 2, transport);
    if (transport == T_IPC)
        snprintf(dead, cap, "ipc://%s/nobody", w->dir);
    else {
        /* a port that was free a moment ago */
        void *ctx = zmq_ctx_new(), *s = zmq_socket(ctx, ZMQ_PULL);
        assert_int_equal(zmq_bind(s, "tcp://127.0.0.1:*"), 0);
        size_t n = cap;
        assert_int_equal(zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, dead, &n), 0);
        zmq_close(s);
        zmq_ctx_term(ctx);
    }
    const char *eps[3] = {w->ep[0], w->ep[1], dead};
    assert_int_equal(comm_tcp_set_world(w->c[0], 0, 3, eps), COMM_OK);
    assert_int_equal(comm_tcp_set_world(w->c[1], 1, 3, eps), COMM_OK);
}

static void test_withdraw(void **state)
{
    const int transport = *(int *)*state;
    world w;
    char dead[256];
    dead_world(&w, transport, dead, sizeof dead);
    const size_t n = 1 << 20;
    unsigned char *buf = calloc(1, n), got[16];
    comm_op_t *s = NULL, *r = NULL, *q = NULL;
    assert_int_equal(comm_irecv(w.c[0], 2, 1, got, sizeof got, &r), COMM_OK);
    assert_int_equal(comm_isend(w.c[0], 2, 1, buf, n, &s), COMM_OK);
    assert_int_equal(comm_wait(w.c[0], s, 100, NULL), COMM_ERR_TIMEOUT); /* ZeroMQ holds it */
    assert_int_equal(comm_wait(w.c[0], r, 10, NULL), COMM_ERR_TIMEOUT);
    const char *eps[3] = {w.ep[0], w.ep[1], ""};
    double t0 = now_ms();
    assert_int_equal(comm_tcp_set_world(w.c[0], 0, 3, eps), COMM_OK);
    assert_int_equal(comm_wait(w.c[0], r, WAIT_MS, NULL), COMM_ERR_PEER);
    assert_non_null(strstr(comm_last_error(w.c[0]), "peer 2 tag 1"));
    assert_non_null(strstr(comm_last_error(w.c[0]), "withdrawn"));
    assert_int_equal(comm_wait(w.c[0], s, WAIT_MS, NULL), COMM_ERR_PEER);
    assert_true(now_ms() - t0 < 5000);
    comm_op_free(w.c[0], &r);
    comm_op_free(w.c[0], &s);
    free(buf); /* safe: the failed send is complete, ZeroMQ let go of it */
    assert_int_equal(comm_isend(w.c[0], 2, 1, got, 1, &s), COMM_ERR_PEER);
    assert_non_null(strstr(comm_last_error(w.c[0]), "not live"));
    /* a cancelled send that ZeroMQ holds for a dead peer: freed with the comm */
    unsigned char *b2 = calloc(1, n);
    eps[2] = dead;
    assert_int_equal(comm_tcp_set_world(w.c[0], 0, 3, eps), COMM_OK);
    assert_int_equal(comm_isend(w.c[0], 2, 2, b2, n, &q), COMM_OK);
    comm_cancel(w.c[0], &q);
    assert_null(q);
    /* the world shrinks: rank 2 is gone */
    assert_int_equal(comm_tcp_set_world(w.c[0], 0, 2, eps), COMM_OK);
    assert_int_equal(comm_size(w.c[0]), 2);
    assert_int_equal(comm_isend(w.c[0], 2, 1, got, 1, &s), COMM_ERR_INVAL);
    sync_marker(&w, 0, 1, 5); /* the live peers still talk */
    sync_marker(&w, 1, 0, 5);
    world_down(&w);
    free(b2); /* after comm_destroy: ZeroMQ let go of it */
}

/* Rank 1 restarts at a new endpoint: rank 0 drops what the old one sent, takes the new one's. */
static void test_peer_changed(void **state)
{
    const int transport = *(int *)*state;
    world w;
    world_up(&w, 2, transport);
    char got[16] = "";
    comm_op_t *s = NULL, *r = NULL, *pend = NULL;
    assert_int_equal(comm_isend(w.c[1], 0, 3, "old", 4, &s), COMM_OK);
    wait_ok(w.c[1], &s, 4);
    sync_marker(&w, 1, 0, 4); /* "old" is queued at rank 0 */
    assert_int_equal(comm_irecv(w.c[0], 1, 6, got, sizeof got, &pend), COMM_OK);
    comm_t *old = w.c[1];
    w.c[1] = NULL;
    bind_one(&w, 1, transport); /* the new incarnation */
    assert_string_not_equal(w.ep[1], comm_tcp_endpoint(old));
    set_worlds(&w);
    assert_int_equal(comm_wait(w.c[0], pend, WAIT_MS, NULL), COMM_ERR_PEER);
    comm_op_free(w.c[0], &pend);
    /* the old incarnation still sends (its world is the old one): dropped */
    assert_int_equal(comm_isend(old, 0, 3, "stale", 6, &s), COMM_OK);
    wait_ok(old, &s, 6);
    comm_destroy(&old);
    assert_int_equal(comm_isend(w.c[1], 0, 3, "new", 4, &s), COMM_OK);
    assert_int_equal(comm_irecv(w.c[0], 1, 3, got, sizeof got, &r), COMM_OK);
    wait_ok(w.c[0], &r, 4);
    assert_string_equal(got, "new");
    wait_ok(w.c[1], &s, 4);
    world_down(&w);
}

static void test_wait_timeout(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    char got[8];
    comm_op_t *r = NULL;
    assert_int_equal(comm_irecv(w.c[1], 0, 50, got, sizeof got, &r), COMM_OK);
    double t0 = now_ms();
    assert_int_equal(comm_wait(w.c[1], r, 50, NULL), COMM_ERR_TIMEOUT);
    double dt = now_ms() - t0;
    assert_true(dt >= 49.0);
    assert_true(dt < 2000.0);
    assert_non_null(strstr(comm_last_error(w.c[1]), "receive from peer 0 tag 50"));
    assert_int_equal(comm_wait(w.c[1], r, 0, NULL), COMM_ERR_TIMEOUT);
    comm_cancel(w.c[1], &r);
    world_down(&w);
}

/* ---- collectives ---------------------------------------------------------------------------------- */

#define COLL_COUNT 4099
#define COLL_ROUNDS 4

typedef struct {
    comm_t *c;
    int n;             /* world size */
    int rank;
    int failed;
    char why[512];
} coll_arg;

/* Values with a wide range of magnitudes, so the order of summation shows in the bits. */
static float coll_val(int rank, int round, size_t j)
{
    uint32_t x = (uint32_t)(rank * 7919 + round * 104729 + (int)j * 31337) * 2654435761u;
    float mant = (float)(x >> 8) / (float)(1 << 24) - 0.5f;
    int e = (int)((x >> 3) % 24) - 12;
    return ldexpf(mant, e);
}

#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            snprintf(a->why, sizeof a->why, __VA_ARGS__);                                  \
            a->failed = 1;                                                                 \
            goto out;                                                                      \
        }                                                                                  \
    } while (0)

static void *coll_thread(void *p)
{
    coll_arg *a = p;
    const int n = a->n;
    comm_group_t *g = NULL, *sub = NULL;
    float *buf = malloc(COLL_COUNT * sizeof *buf), *ref = malloc(COLL_COUNT * sizeof *ref);
    unsigned char *gath = malloc((size_t)n * 333), bc[10000];
    /* the list reversed: index 0 is the highest rank */
    int list[MAXR];
    for (int i = 0; i < n; i++) list[i] = n - 1 - i;
    comm_status st = comm_group_new(a->c, list, n, &g);
    CHECK(st == COMM_OK, "group_new: %s", comm_last_error(a->c));
    const int idx = comm_group_index(g);
    CHECK(idx == n - 1 - a->rank && comm_group_size(g) == n, "group index %d", idx);
    for (int round = 0; round < COLL_ROUNDS; round++) {
        for (size_t j = 0; j < COLL_COUNT; j++) {
            buf[j] = coll_val(a->rank, round, j);
            float s = coll_val(list[0], round, j);
            for (int i = 1; i < n; i++) s += coll_val(list[i], round, j);
            ref[j] = s;
        }
        st = comm_allreduce_sum_f32(g, buf, COLL_COUNT, WAIT_MS);
        CHECK(st == COMM_OK, "allreduce: %s", comm_last_error(a->c));
        CHECK(memcmp(buf, ref, COLL_COUNT * sizeof *buf) == 0,
              "round %d: allreduce differs from the sum in list order", round);
        const int root = round % n;
        for (size_t j = 0; j < sizeof bc; j++)
            bc[j] = idx == root ? pat(round, 1, j) : 0;
        st = comm_broadcast(g, root, bc, sizeof bc - (size_t)round, WAIT_MS);
        CHECK(st == COMM_OK, "broadcast: %s", comm_last_error(a->c));
        for (size_t j = 0; j < sizeof bc - (size_t)round; j++)
            CHECK(bc[j] == pat(round, 1, j), "broadcast byte %zu", j);
        unsigned char mine[333];
        fill_pat(mine, sizeof mine, idx, round);
        st = comm_allgather(g, mine, sizeof mine, gath, WAIT_MS);
        CHECK(st == COMM_OK, "allgather: %s", comm_last_error(a->c));
        for (int i = 0; i < n; i++)
            for (size_t j = 0; j < sizeof mine; j++)
                CHECK(gath[(size_t)i * 333 + j] == pat(i, round, j), "allgather piece %d", i);
    }
    /* two disjoint pairs at once (4 ranks) */
    if (n == 4) {
        int pair[2] = {a->rank % 2, a->rank % 2 + 2};
        st = comm_group_new(a->c, pair, 2, &sub);
        CHECK(st == COMM_OK, "pair group: %s", comm_last_error(a->c));
        float v[3] = {(float)a->rank, 1.5f, -2.0f};
        st = comm_allreduce_sum_f32(sub, v, 3, WAIT_MS);
        CHECK(st == COMM_OK, "pair allreduce: %s", comm_last_error(a->c));
        CHECK(v[0] == (float)(pair[0] + pair[1]) && v[1] == 3.0f && v[2] == -4.0f,
              "pair allreduce value %g", v[0]);
    }
out:
    comm_group_destroy(&sub);
    comm_group_destroy(&g);
    comm_group_destroy(&g); /* safe twice */
    free(buf);
    free(ref);
    free(gath);
    return NULL;
}

static void run_threads(world *w, void *(*fn)(void *), coll_arg *args)
{
    pthread_t th[MAXR];
    for (int r = 0; r < w->n; r++) {
        args[r].c = w->c[r];
        args[r].n = w->n;
        args[r].rank = r;
        assert_int_equal(pthread_create(&th[r], NULL, fn, &args[r]), 0);
    }
    for (int r = 0; r < w->n; r++) pthread_join(th[r], NULL);
    for (int r = 0; r < w->n; r++)
        if (args[r].failed) fail_msg("rank %d: %s", r, args[r].why);
}

static void test_collectives(void **state)
{
    (void)state;
    /* the reference order matters: summing in another order changes some bits */
    int differs = 0;
    for (size_t j = 0; j < COLL_COUNT && !differs; j++) {
        float f = coll_val(3, 0, j) + coll_val(2, 0, j) + coll_val(1, 0, j) + coll_val(0, 0, j);
        float b = coll_val(0, 0, j) + coll_val(1, 0, j) + coll_val(2, 0, j) + coll_val(3, 0, j);
        differs = memcmp(&f, &b, sizeof f) != 0;
    }
    assert_true(differs);
    for (int n = 2; n <= 4; n++) {
        world w;
        world_up(&w, n, n == 3 ? T_IPC : T_TCP);
        coll_arg args[MAXR];
        memset(args, 0, sizeof args);
        run_threads(&w, coll_thread, args);
        world_down(&w);
    }
}

/* Rank 0 gives up on an all-reduce that rank 1 joins too late; both then run another one. */
static void *late_thread(void *p)
{
    coll_arg *a = p;
    comm_group_t *g = NULL;
    const int list[2] = {0, 1};
    float v[4] = {1, 2, 3, (float)a->rank};
    comm_status st = comm_group_new(a->c, list, 2, &g);
    CHECK(st == COMM_OK, "group_new: %s", comm_last_error(a->c));
    if (a->rank == 1) usleep(600 * 1000); /* long past rank 0's 100 ms */
    double t0 = now_ms();
    st = comm_allreduce_sum_f32(g, v, 4, a->rank == 0 ? 100 : 200);
    CHECK(st == COMM_ERR_TIMEOUT, "late allreduce: %s (%s)", comm_strerror(st),
          comm_last_error(a->c));
    CHECK(now_ms() - t0 < 5000, "the timeout took %.0f ms", now_ms() - t0);
    CHECK(strstr(comm_last_error(a->c), "comm_allreduce_sum_f32") != NULL, "message: %s",
          comm_last_error(a->c));
    /* the next call has its own tags: rank 0 may start it while rank 1 still waits */
    float w[4] = {1, 2, 3, (float)a->rank};
    st = comm_allreduce_sum_f32(g, w, 4, WAIT_MS);
    CHECK(st == COMM_OK, "allreduce after a timeout: %s", comm_last_error(a->c));
    CHECK(w[0] == 2 && w[1] == 4 && w[2] == 6 && w[3] == 1, "values %g %g %g %g", w[0], w[1],
          w[2], w[3]);
out:
    comm_group_destroy(&g);
    return NULL;
}

static void test_collective_timeout(void **state)
{
    world w;
    world_up(&w, 2, *(int *)*state);
    coll_arg args[MAXR];
    memset(args, 0, sizeof args);
    run_threads(&w, late_thread, args);
    world_down(&w);
}

/* ---- errors ------------------------------------------------------------------------------------ */

static void test_errors(void **state)
{
    (void)state;
    char err[256];
    comm_t *c = NULL;
    assert_int_equal(comm_tcp_new("bogus://x", NULL, &c, err, sizeof err), COMM_ERR_SYS);
    assert_null(c);
    assert_non_null(strstr(err, "bogus://x"));
    assert_int_equal(comm_tcp_new(NULL, NULL, &c, err, sizeof err), COMM_ERR_INVAL);
    assert_int_equal(comm_tcp_new("tcp://127.0.0.1:0", NULL, &c, err, sizeof err), COMM_OK);
    /* the wildcard host becomes connectable */
    comm_t *d = NULL;
    assert_int_equal(comm_tcp_new("tcp://*:*", NULL, &d, err, sizeof err), COMM_OK);
    assert_true(strncmp(comm_tcp_endpoint(d), "tcp://127.0.0.1:", 16) == 0);
    comm_destroy(&d);
    assert_int_equal(comm_rank(c), -1);
    assert_int_equal(comm_size(c), 0);
    char b[4];
    comm_op_t *op = NULL;
    assert_int_equal(comm_isend(c, 0, 1, b, 4, &op), COMM_ERR_PEER);
    assert_non_null(strstr(comm_last_error(c), "no world yet"));
    assert_null(op);
    const char *eps[2] = {comm_tcp_endpoint(c), NULL};
    assert_int_equal(comm_tcp_set_world(c, 2, 2, eps), COMM_ERR_INVAL);
    assert_int_equal(comm_tcp_set_world(c, 0, 0, eps), COMM_ERR_INVAL);
    assert_int_equal(comm_tcp_set_world(c, 0, 2, NULL), COMM_ERR_INVAL);
    assert_int_equal(comm_tcp_set_world(c, 0, 2, eps), COMM_OK);
    assert_int_equal(comm_isend(c, 5, 1, b, 4, &op), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(c), "comm_isend(peer 5, tag 1)"));
    assert_int_equal(comm_irecv(c, 1, 2, b, 4, &op), COMM_ERR_PEER);
    assert_non_null(strstr(comm_last_error(c), "comm_irecv(peer 1, tag 2)"));
    assert_int_equal(comm_isend(c, 0, 1ull << 63, b, 4, &op), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(c), "63-bit"));
    assert_int_equal(comm_isend(c, 0, 1, NULL, 4, &op), COMM_ERR_INVAL);
    assert_int_equal(comm_isend(c, 0, 1, b, 4, NULL), COMM_ERR_INVAL);
    assert_int_equal(comm_test(c, NULL, NULL, NULL), COMM_ERR_INVAL);
    assert_int_equal(comm_wait(c, NULL, 0, NULL), COMM_ERR_INVAL);
    comm_group_t *g = NULL;
    const int bad[2] = {0, 0}, other[1] = {1}, out[1] = {7};
    assert_int_equal(comm_group_new(c, bad, 2, &g), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(c), "twice"));
    assert_int_equal(comm_group_new(c, other, 1, &g), COMM_ERR_INVAL);
    assert_int_equal(comm_group_new(c, out, 1, &g), COMM_ERR_INVAL);
    assert_int_equal(comm_group_new(c, bad, 1, &g), COMM_OK);
    float v = 2.5f;
    assert_int_equal(comm_allreduce_sum_f32(g, &v, 1, 0), COMM_OK); /* one member */
    assert_true(v == 2.5f);
    assert_int_equal(comm_broadcast(g, 1, &v, 4, 0), COMM_ERR_INVAL);
    char gat[4];
    assert_int_equal(comm_allgather(g, "abc", 4, gat, 0), COMM_OK);
    assert_string_equal(gat, "abc");
    comm_group_destroy(&g);
    for (int s = COMM_OK; s <= COMM_ERR_UNSUPPORTED; s++)
        assert_true(strlen(comm_strerror((comm_status)s)) > 1);
    assert_string_equal(comm_backend_name(COMM_BACKEND_MPI), "mpi");
    assert_string_equal(comm_last_error(NULL), "no comm");
    comm_destroy(&c);
}

/* ---- a fake backend through comm_wrap ---------------------------------------------------------- */

typedef struct {
    int calls_isend, calls_irecv, calls_test, calls_free, calls_cancel, calls_allreduce;
    int calls_discard;
    int *destroyed; /* outlives the impl */
} fake;

typedef struct {
    size_t len;
    int polls; /* done on the second test */
} fake_op;

static int fake_rank(void *impl) { (void)impl; return 0; }
static int fake_size(void *impl) { (void)impl; return 2; }

static comm_status fake_isend(comm_t *c, void *impl, int peer, uint64_t tag, const void *buf,
                              size_t len, void **op)
{
    (void)buf;
    fake *f = impl;
    f->calls_isend++;
    if (peer == 1 && tag == 666) {
        comm_set_error(c, "fake: peer %d refuses tag %llu", peer, (unsigned long long)tag);
        return COMM_ERR_PEER;
    }
    fake_op *o = calloc(1, sizeof *o);
    o->len = len;
    *op = o;
    return COMM_OK;
}

static comm_status fake_test(comm_t *c, void *impl, void *op, int *done, size_t *len)
{
    (void)c;
    fake *f = impl;
    fake_op *o = op;
    f->calls_test++;
    *done = ++o->polls >= 2;
    *len = o->len;
    return COMM_OK;
}

static void fake_free(comm_t *c, void *impl, void *op)
{
    (void)c;
    ((fake *)impl)->calls_free++;
    free(op);
}

static void fake_cancel(comm_t *c, void *impl, void *op)
{
    (void)c;
    ((fake *)impl)->calls_cancel++;
    free(op);
}

static void fake_discard(comm_t *c, void *impl, int peer, uint64_t tag)
{
    (void)c;
    (void)peer;
    (void)tag;
    ((fake *)impl)->calls_discard++;
}

static comm_status fake_allreduce(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                                  float *buf, size_t count, int timeout_ms)
{
    (void)c;
    (void)gimpl;
    (void)ranks;
    (void)timeout_ms;
    ((fake *)impl)->calls_allreduce++;
    for (size_t j = 0; j < count; j++) buf[j] *= (float)n;
    return COMM_OK;
}

static void fake_destroy(void *impl)
{
    fake *f = impl;
    (*f->destroyed)++;
    free(f);
}

static const comm_ops fake_ops = {
    .backend = COMM_BACKEND_NCCL, /* any */
    .rank = fake_rank,
    .size = fake_size,
    .isend = fake_isend,
    .test = fake_test,
    .cancel = fake_cancel,
    .op_free = fake_free,
    .discard = fake_discard,
    .allreduce_sum_f32 = fake_allreduce,
    .destroy = fake_destroy,
};

/* Only the bare minimum: everything else NULL. */
static const comm_ops bare_ops = {
    .backend = COMM_BACKEND_MPI,
    .rank = fake_rank,
    .size = fake_size,
    .destroy = fake_destroy,
};

static fake *fake_new(int *destroyed)
{
    fake *f = calloc(1, sizeof *f);
    assert_non_null(f);
    f->destroyed = destroyed;
    return f;
}

static void test_fake_backend(void **state)
{
    (void)state;
    int destroyed = 0;
    fake *f = fake_new(&destroyed);
    comm_t *c = NULL;
    assert_int_equal(comm_wrap(&fake_ops, f, &c), COMM_OK);
    assert_int_equal(comm_backend_of(c), COMM_BACKEND_NCCL);
    assert_int_equal(comm_rank(c), 0);
    assert_int_equal(comm_size(c), 2);
    assert_null(comm_tcp_endpoint(c)); /* not a tcp comm */
    assert_int_equal(comm_tcp_set_world(c, 0, 1, NULL), COMM_ERR_INVAL);
    comm_op_t *op = NULL, *op2 = NULL, *op3 = NULL;
    char b[8];
    assert_int_equal(comm_isend(c, 1, 5, b, 8, &op), COMM_OK);
    assert_int_equal(f->calls_isend, 1);
    int done = 0;
    size_t len = 0;
    assert_int_equal(comm_test(c, op, &done, &len), COMM_OK);
    assert_int_equal(done, 0);
    assert_int_equal(comm_wait(c, op, 1000, &len), COMM_OK);
    assert_int_equal(len, 8);
    assert_int_equal(f->calls_test, 2);
    assert_int_equal(comm_test(c, op, &done, &len), COMM_OK); /* cached: the table is not asked */
    assert_int_equal(f->calls_test, 2);
    comm_op_free(c, &op);
    assert_int_equal(f->calls_free, 1);
    /* a backend error comes back with its message */
    assert_int_equal(comm_isend(c, 1, 666, b, 8, &op), COMM_ERR_PEER);
    assert_string_equal(comm_last_error(c), "fake: peer 1 refuses tag 666");
    /* NULL entries */
    assert_int_equal(comm_irecv(c, 1, 5, b, 8, &op), COMM_ERR_UNSUPPORTED);
    assert_non_null(strstr(comm_last_error(c), "no irecv"));
    assert_int_equal(comm_progress(c), COMM_OK);
    assert_null(comm_zsock(c));
    comm_discard(c, 1, 5);
    assert_int_equal(f->calls_discard, 1);
    /* collectives: the table's all-reduce; the others built on p2p need irecv */
    comm_group_t *g = NULL;
    const int list[2] = {0, 1};
    assert_int_equal(comm_group_new(c, list, 2, &g), COMM_OK);
    float v[2] = {1.5f, -2.0f};
    assert_int_equal(comm_allreduce_sum_f32(g, v, 2, 100), COMM_OK);
    assert_int_equal(f->calls_allreduce, 1);
    assert_true(v[0] == 3.0f && v[1] == -4.0f);
    assert_int_equal(comm_broadcast(g, 0, b, 8, 100), COMM_ERR_UNSUPPORTED);
    assert_int_equal(comm_allgather(g, b, 4, b, 100), COMM_ERR_UNSUPPORTED);
    comm_group_destroy(&g);
    /* live operations are cancelled by comm_destroy: one unfinished, one finished */
    assert_int_equal(comm_isend(c, 1, 6, b, 8, &op2), COMM_OK);
    assert_int_equal(comm_isend(c, 1, 7, b, 8, &op3), COMM_OK);
    assert_int_equal(comm_wait(c, op3, 1000, NULL), COMM_OK);
    comm_destroy(&c);
    assert_null(c);
    assert_int_equal(destroyed, 1);
    comm_destroy(&c);
    assert_int_equal(destroyed, 1);

    /* a table with nothing but rank, size, destroy */
    f = fake_new(&destroyed);
    assert_int_equal(comm_wrap(&bare_ops, f, &c), COMM_OK);
    assert_int_equal(comm_isend(c, 1, 5, b, 8, &op), COMM_ERR_UNSUPPORTED);
    assert_non_null(strstr(comm_last_error(c), "the mpi backend has no isend"));
    assert_int_equal(comm_group_new(c, list, 2, &g), COMM_OK);
    assert_int_equal(comm_allreduce_sum_f32(g, v, 2, 100), COMM_ERR_UNSUPPORTED);
    comm_group_destroy(&g);
    comm_destroy(&c);
    assert_int_equal(destroyed, 2);

    /* comm_wrap failing still frees the state */
    f = fake_new(&destroyed);
    assert_int_equal(comm_wrap(&fake_ops, f, NULL), COMM_ERR_INVAL);
    assert_int_equal(destroyed, 3);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_prestate(test_order, &tcp_t),
        cmocka_unit_test_prestate(test_order, &ipc_t),
        cmocka_unit_test_prestate(test_unexpected, &tcp_t),
        cmocka_unit_test_prestate(test_unexpected, &ipc_t),
        cmocka_unit_test_prestate(test_many_tags, &tcp_t),
        cmocka_unit_test_prestate(test_many_tags, &ipc_t),
        cmocka_unit_test_prestate(test_large, &tcp_t),
        cmocka_unit_test_prestate(test_large, &ipc_t),
        cmocka_unit_test_prestate(test_trunc, &tcp_t),
        cmocka_unit_test_prestate(test_discard, &tcp_t),
        cmocka_unit_test_prestate(test_discard, &ipc_t),
        cmocka_unit_test_prestate(test_cancel, &tcp_t),
        cmocka_unit_test_prestate(test_hwm, &ipc_t),
        cmocka_unit_test_prestate(test_withdraw, &tcp_t),
        cmocka_unit_test_prestate(test_withdraw, &ipc_t),
        cmocka_unit_test_prestate(test_peer_changed, &tcp_t),
        cmocka_unit_test_prestate(test_peer_changed, &ipc_t),
        cmocka_unit_test_prestate(test_wait_timeout, &tcp_t),
        cmocka_unit_test(test_collectives),
        cmocka_unit_test_prestate(test_collective_timeout, &tcp_t),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_fake_backend),
    };
    return cmocka_run_group_tests_name("comm", tests, NULL, NULL);
}
