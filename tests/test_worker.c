/* tests/test_worker.c: duet-worker (worker/wrk.h) against a fake duetd.
 *
 * The worker runs in-process (wrk_run on a thread) and talks over real TCP to a fake
 * duetd in the test: a ZeroMQ ROUTER on tcp://127.0.0.1 (ephemeral port) speaking
 * duet.worker/1 through daemon/proto.h. Every message the worker sends is checked
 * against its schema (proto_parse). The model is a tiny random f32 model, so batched
 * logits equal single-sequence ones bit for bit and token equality is exact.
 *
 * - register carries the protocol's fields: the file's SHA-256, the KV layout and
 *   capacity, the place, the device; the worker is not ready before `registered`;
 * - 20 concurrent greedy assigns (one continuing after 3 generated tokens) give exactly
 *   the tokens of a single-sequence reference loop, batched in `tokens` messages, with
 *   `finished` counts and reasons, and leave no KV block in use;
 * - 300 short requests at once all end with their token counts;
 * - cancel ends a request with `finished` cancelled; an unknown rid gets nothing;
 * - bad assigns get `failed` with bad_request or kv_full (and the right retryable flag);
 *   malformed frames are ignored;
 * - heartbeats flow both ways and carry the worker's load;
 * - a silent duetd makes the worker drop its work (KV freed) and register again with a
 *   new ROUTER on the same endpoint; so does duetd's `error` unexpected_command;
 * - refused: model_mismatch ends wrk_run with WRK_ERR_REFUSED; duplicate_worker retries;
 * - stop drains: held requests finish, new assigns get `failed` (retryable); a second
 *   stop hands running requests back (`failed`, retryable); wrk_run returns WRK_OK;
 * - the real build/bin/duet-worker registers, serves an assign, and exits 0 on SIGTERM
 *   (and 1 when refused);
 * - configuration: duet.conf groups, tp_size > 1 and other roles are refused clearly.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/testutil.h"
#include <jansson.h>
#include <zmq.h>

#include "daemon/config.h"
#include "daemon/proto.h"
#include "kernels/sample.h"
#include "kv/kv.h"
#include "tests/support/gguf_write.h"
#include "worker/model.h"
#include "worker/wrk.h"

#define WAIT_MS 10000 /* longest wait for anything (generous for ASan) */
#define MAX_OUT 64

static char tmpdir[256];
static char model_file[512];

/* ---- helpers: time, logging --------------------------------------------------------- */

static int64_t mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

typedef struct {
    atomic_int lines, warnings, errors;
    int echo; /* WRK_TEST_LOG set: print the worker's log */
} logcap;

static logcap g_log; /* test-only sink shared by the worker threads */

static void capture_log(void *user, int prio, const char *line)
{
    logcap *lc = user;
    atomic_fetch_add(&lc->lines, 1);
    if (prio == 4) atomic_fetch_add(&lc->warnings, 1);
    if (prio <= 3) atomic_fetch_add(&lc->errors, 1);
    if (lc->echo) fprintf(stderr, "<%d>%s\n", prio, line);
}

/* ---- the fake duetd ---------------------------------------------------------------------- */

typedef struct {
    void *zctx;
    void *router;
    char endpoint[256];
    proto_route route; /* the worker's, from its register */
    int have_route;
    int heartbeats;    /* heartbeats received from the worker */
    proto_heartbeat last_hb;
} fake_t;

static void fake_bind(fake_t *f, const char *where)
{
    f->router = zmq_socket(f->zctx, ZMQ_ROUTER);
    assert_non_null(f->router);
    assert_int_equal(proto_socket_options(f->router, PROTO_SIDE_DUETD_WORKERS, 0), 0);
    int rc = -1;
    for (int i = 0; i < 50 && rc != 0; i++) { /* the old port may take a moment to free */
        rc = zmq_bind(f->router, where);
        if (rc != 0) sleep_ms(20);
    }
    assert_int_equal(rc, 0);
    size_t len = sizeof f->endpoint;
    assert_int_equal(zmq_getsockopt(f->router, ZMQ_LAST_ENDPOINT, f->endpoint, &len), 0);
    f->have_route = 0;
}

static void fake_open(fake_t *f)
{
    memset(f, 0, sizeof *f);
    f->zctx = zmq_ctx_new();
    assert_non_null(f->zctx);
    fake_bind(f, "tcp://127.0.0.1:*");
}

static void fake_close_router(fake_t *f)
{
    if (f->router) zmq_close(f->router);
    f->router = NULL;
}

static void fake_close(fake_t *f)
{
    fake_close_router(f);
    zmq_ctx_term(f->zctx);
}

/* The next message within ms (PROTO_CMD_NONE on timeout); heartbeats are counted and
 * skipped when skip_hb. The body is checked against the command's schema and returned
 * in *body (the caller's; may be NULL). */
static proto_cmd fake_next(fake_t *f, int ms, int skip_hb, json_t **body)
{
    if (body) *body = NULL;
    const int64_t until = mono_ms() + ms;
    for (;;) {
        int64_t left = until - mono_ms();
        if (left < 0) return PROTO_CMD_NONE;
        proto_msg m = {0};
        proto_err e;
        proto_rc rc = proto_recv(f->router, PROTO_SIDE_DUETD_WORKERS, 1, (int)left, &m, &e);
        if (rc == PROTO_TIMEOUT) return PROTO_CMD_NONE;
        if (rc != PROTO_OK) fail_msg("the worker sent a bad message: %s: %s", proto_code_name(e.code),
                                     e.message);
        f->route = m.route;
        f->have_route = 1;
        proto_type t = proto_msg_type(&m, PROTO_SIDE_DUETD_WORKERS);
        assert_int_not_equal(t, PROTO_T_NONE);
        void *st = calloc(1, proto_type_size(t));
        if (proto_parse(t, m.body, st, &e) != 0)
            fail_msg("the worker's %s breaks the schema: %s", proto_cmd_name(m.cmd), e.message);
        if (m.cmd == PROTO_CMD_HEARTBEAT) {
            f->heartbeats++;
            f->last_hb = *(proto_heartbeat *)st;
        }
        proto_free(t, st);
        free(st);
        if (m.cmd == PROTO_CMD_HEARTBEAT && skip_hb) {
            proto_msg_clear(&m);
            continue;
        }
        proto_cmd cmd = m.cmd;
        if (body) {
            *body = m.body;
            m.body = NULL;
        }
        proto_msg_clear(&m);
        return cmd;
    }
}

/* Wait for a command (others are failures), parse it into out (type t). */
static void fake_expect(fake_t *f, proto_cmd want, proto_type t, void *out)
{
    json_t *body = NULL;
    proto_cmd got = fake_next(f, WAIT_MS, 1, &body);
    if (got != want)
        fail_msg("expected '%s' from the worker, got '%s'", proto_cmd_name(want),
                 got == PROTO_CMD_NONE ? "(nothing)" : proto_cmd_name(got));
    proto_err e;
    assert_int_equal(proto_parse(t, body, out, &e), 0);
    json_decref(body);
}

static void fake_send(fake_t *f, proto_cmd cmd, proto_type t, const void *m)
{
    assert_true(f->have_route);
    assert_int_equal(proto_send_body(f->router, &f->route, PROTO_WORKER, cmd, t, m, 0), 0);
}

static void fake_send_raw(fake_t *f, const char *tag, const char *cmd, const char *body)
{
    assert_true(f->have_route);
    assert_true(zmq_send(f->router, f->route.id[0], f->route.len[0], ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(f->router, tag, strlen(tag), ZMQ_SNDMORE) >= 0);
    assert_true(zmq_send(f->router, cmd, strlen(cmd), body ? ZMQ_SNDMORE : 0) >= 0);
    if (body) assert_true(zmq_send(f->router, body, strlen(body), 0) >= 0);
}

static void fake_registered(fake_t *f, int hb_ms, int dead_after)
{
    proto_registered r;
    proto_registered_init(&r);
    r.rank = 0;
    r.group = 0;
    r.role = PROTO_ROLE_BOTH;
    r.tp_rank = 0;
    r.tp_size = 1;
    r.heartbeat_ms = hb_ms;
    r.dead_after = dead_after;
    fake_send(f, PROTO_CMD_REGISTERED, PROTO_T_REGISTERED, &r);
}

static void fake_heartbeat(fake_t *f)
{
    proto_heartbeat h;
    proto_heartbeat_init(&h);
    fake_send(f, PROTO_CMD_HEARTBEAT, PROTO_T_HEARTBEAT, &h);
}

/* A greedy both-assign. */
static void fake_assign(fake_t *f, int64_t rid, const int32_t *toks, int n, const int32_t *gen,
                        int n_gen, int max_tokens, const int32_t *stop, int n_stop, int ignore_eos)
{
    proto_assign a;
    proto_assign_init(&a);
    a.rid = rid;
    a.role = PROTO_ROLE_BOTH;
    a.tokens = (int32_t *)toks;
    a.n_tokens = n;
    a.generated = (int32_t *)gen;
    a.n_generated = n_gen;
    a.sampling.temperature = 0;
    a.sampling.repeat_penalty = 1.0;
    a.sampling.seed = 7;
    a.max_tokens = max_tokens;
    a.stop_token_ids = (int32_t *)stop;
    a.n_stop_token_ids = n_stop;
    a.ignore_eos = ignore_eos;
    fake_send(f, PROTO_CMD_ASSIGN, PROTO_T_ASSIGN, &a);
}

static void fake_cancel(fake_t *f, int64_t rid)
{
    proto_wcancel c = {.rid = rid};
    fake_send(f, PROTO_CMD_CANCEL, PROTO_T_WCANCEL, &c);
}

/* ---- the worker on a thread ------------------------------------------------------------ */

typedef struct {
    wrk_t *w;
    pthread_t th;
    wrk_status rc;
    char err[512];
    int running;
} wthread;

static void test_config(wrk_config *c, const char *endpoint)
{
    wrk_config_default(c);
    c->model_path = model_file;
    c->endpoint = endpoint;
    c->worker_id = "test-worker-0";
    c->n_threads = 2;
    c->kv_budget = 4 << 20;
    c->kv_type = DTYPE_F16;
    c->max_batch_tokens = 128;
    c->max_seqs = 16;
    c->heartbeat_ms = 100;
    c->dead_after = 4;
    c->backoff_min_ms = 20;
    c->backoff_max_ms = 200;
    c->linger_ms = 2000;
    c->log_level = CONFIG_LOG_DEBUG;
    c->log = capture_log;
    c->log_user = &g_log;
    c->seed = 42;
}

static void *run_thread(void *arg)
{
    wthread *t = arg;
    t->rc = wrk_run(t->w, t->err, sizeof t->err);
    return NULL;
}

static void wt_start(wthread *t, const wrk_config *c)
{
    memset(t, 0, sizeof *t);
    char err[512];
    if (wrk_new(c, &t->w, err, sizeof err) != WRK_OK) fail_msg("wrk_new: %s", err);
    assert_int_equal(pthread_create(&t->th, NULL, run_thread, t), 0);
    t->running = 1;
}

/* Join the loop (after wrk_stop or a fatal end); returns its status. */
static wrk_status wt_join(wthread *t)
{
    if (t->running) pthread_join(t->th, NULL);
    t->running = 0;
    return t->rc;
}

static void wt_stop(wthread *t)
{
    wrk_stop(t->w);
    wrk_status rc = wt_join(t);
    if (rc != WRK_OK) fail_msg("wrk_run: %s (%s)", wrk_strerror(rc), t->err);
    wrk_destroy(&t->w);
    assert_null(t->w);
    wrk_destroy(&t->w); /* safe twice */
}

/* Wait until pred(stats) holds. */
static void wait_stats(wthread *t, int (*pred)(const wrk_stats *), const char *what)
{
    const int64_t until = mono_ms() + WAIT_MS;
    wrk_stats s;
    for (;;) {
        wrk_get_stats(t->w, &s);
        if (pred(&s)) return;
        if (mono_ms() > until) fail_msg("worker never reached: %s", what);
        sleep_ms(5);
    }
}

static int is_ready(const wrk_stats *s) { return s->state == WRK_STATE_READY; }

/* Start a worker, answer its register with registered(hb, dead_after). */
static void start_registered(wthread *t, fake_t *f, const wrk_config *c, int hb, int dead_after)
{
    wt_start(t, c);
    proto_register r;
    fake_expect(f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    proto_register_free(&r);
    fake_registered(f, hb, dead_after);
    wait_stats(t, is_ready, "ready");
}

/* ---- the reference: one request alone, as client/generate.c runs it ---------------------- */

typedef struct {
    int32_t tok[MAX_OUT];
    int n;
    int finished, failed;
    proto_finish reason;
    int n_generated, cached;
    proto_code code;
} outcome;

static void reference(const model_t *m, model_ctx_t *ctx, kv_cache_t *kv, const int32_t *prompt,
                      int n_prompt, int max_tokens, const int32_t *stop, int n_stop,
                      const int32_t *eog, int n_eog, outcome *o)
{
    const int V = model_hparams_of(m)->n_vocab;
    memset(o, 0, sizeof *o);
    int32_t *ids = malloc((size_t)(n_prompt + max_tokens) * sizeof *ids);
    float *logits = malloc((size_t)V * sizeof(float));
    sample_params sp = sample_params_default();
    sp.temperature = 0;
    sp.repeat_penalty = 1.0f;
    sp.seed = 7;
    sampler_t *smp = NULL;
    assert_int_equal(sampler_new(&sp, V, &smp), 0);
    memcpy(ids, prompt, (size_t)n_prompt * sizeof *ids);
    int seq;
    char err[256];
    assert_int_equal(kv_seq_new(kv, &seq), KV_OK);
    assert_int_equal(kv_seq_append(kv, seq, ids, n_prompt), KV_OK);
    model_seq_batch b = {.seq = seq, .pos0 = 0, .n_tokens = n_prompt, .tokens = ids, .logits = 1};
    if (model_forward(ctx, m, kv, &b, 1, logits, err, sizeof err) != 0) fail_msg("%s", err);
    kv_seq_commit(kv, seq, n_prompt);
    int n = n_prompt;
    o->reason = PROTO_FINISH_LENGTH;
    while (o->n < max_tokens) {
        int32_t id = sampler_sample(smp, logits, ids, n);
        assert_true(id >= 0);
        ids[n++] = id;
        o->tok[o->n++] = id;
        int is_eog = 0, is_stop = 0;
        for (int i = 0; i < n_eog; i++) is_eog |= eog[i] == id;
        for (int i = 0; i < n_stop; i++) is_stop |= stop[i] == id;
        if (is_eog) {
            o->reason = PROTO_FINISH_EOS;
            break;
        }
        if (is_stop) {
            o->reason = PROTO_FINISH_STOP;
            break;
        }
        if (o->n == max_tokens) break;
        assert_int_equal(kv_seq_append(kv, seq, &id, 1), KV_OK);
        b = (model_seq_batch){.seq = seq, .pos0 = n - 1, .n_tokens = 1, .tokens = &ids[n - 1],
                              .logits = 1};
        if (model_forward(ctx, m, kv, &b, 1, logits, err, sizeof err) != 0) fail_msg("%s", err);
        kv_seq_commit(kv, seq, n);
    }
    o->finished = 1;
    o->n_generated = o->n;
    assert_int_equal(kv_seq_free(kv, seq), KV_OK);
    sampler_destroy(&smp);
    free(logits);
    free(ids);
}

static unsigned lcg(unsigned *state)
{
    *state = *state * 1103515245u + 12345u;
    return *state >> 8;
}

static void fill_prompt(int32_t *ids, int n, int n_vocab, unsigned seed)
{
    for (int i = 0; i < n; i++) ids[i] = (int32_t)(lcg(&seed) % (unsigned)n_vocab);
}

/* Read tokens/finished/failed into out[rid - base] until every one of n has ended.
 * Returns the number of `tokens` messages that carried events of several requests. */
static int collect(fake_t *f, int64_t base, outcome *out, int n)
{
    int ended = 0, multi = 0;
    while (ended < n) {
        json_t *body = NULL;
        proto_cmd cmd = fake_next(f, WAIT_MS, 1, &body);
        proto_err e;
        if (cmd == PROTO_CMD_NONE) fail_msg("only %d of %d requests ended", ended, n);
        if (cmd == PROTO_CMD_TOKENS) {
            proto_tokens t;
            assert_int_equal(proto_tokens_parse(body, &t, &e), 0);
            multi += t.n_events > 1;
            for (int i = 0; i < t.n_events; i++) {
                const proto_token_event *ev = &t.events[i];
                assert_true(ev->rid >= base && ev->rid < base + n);
                outcome *o = &out[ev->rid - base];
                assert_false(o->finished || o->failed);
                assert_int_equal(ev->index, o->n); /* contiguous, in order */
                for (int k = 0; k < ev->n_ids; k++) {
                    assert_true(o->n < MAX_OUT);
                    o->tok[o->n++] = ev->ids[k];
                }
            }
            proto_tokens_free(&t);
        } else if (cmd == PROTO_CMD_FINISHED) {
            proto_finished fi;
            assert_int_equal(proto_finished_parse(body, &fi, &e), 0);
            assert_true(fi.rid >= base && fi.rid < base + n);
            outcome *o = &out[fi.rid - base];
            assert_false(o->finished || o->failed);
            o->finished = 1;
            o->reason = fi.reason;
            o->n_generated = fi.n_generated;
            o->cached = fi.cached_tokens;
            ended++;
        } else if (cmd == PROTO_CMD_FAILED) {
            proto_failed fa;
            assert_int_equal(proto_failed_parse(body, &fa, &e), 0);
            fail_msg("rid %" PRId64 " failed: %s: %s", fa.rid, proto_code_name(fa.code), fa.message);
        } else {
            fail_msg("unexpected '%s' from the worker", proto_cmd_name(cmd));
        }
        json_decref(body);
    }
    return multi;
}

/* ---- tests ------------------------------------------------------------------------------ */

static int kv_clean(const wrk_stats *s) { return s->kv_blocks_used == 0 && s->live == 0; }

static void test_sha256_file(void **state)
{
    (void)state;
    char path[600], hex[65], err[256];
    snprintf(path, sizeof path, "%s/abc.txt", tmpdir);
    FILE *f = fopen(path, "wb");
    assert_non_null(f);
    fputs("abc", f);
    fclose(f);
    assert_int_equal(wrk_sha256_file(path, hex, err, sizeof err), 0);
    assert_string_equal(hex, "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    assert_int_equal(wrk_sha256_file("/nonexistent/x.gguf", hex, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/x.gguf"));
}

static void test_register_contents(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    wthread t;
    wt_start(&t, &c);
    proto_register r;
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);

    char hex[65], err[256];
    assert_int_equal(wrk_sha256_file(model_file, hex, err, sizeof err), 0);
    assert_string_equal(r.model.sha256, hex);
    assert_string_equal(wrk_model_sha256(t.w), hex);
    assert_string_equal(r.worker_id, "test-worker-0");
    assert_non_null(r.software);
    assert_int_equal(r.model.n_vocab, mkmodel_builtin_vocab_size());
    assert_int_equal(r.model.n_ctx, 1024); /* the model's trained context */
    /* KV layout of the tiny model: 2 layers, 2 KV heads of 16 */
    model_t *m = NULL;
    assert_int_equal(model_load(model_file, 0, 1, &m, err, sizeof err), 0);
    kv_config kc = model_kv_config(m, DTYPE_F16, (size_t)c.kv_budget);
    model_destroy(&m);
    assert_int_equal(r.kv.block_tokens, 16);
    assert_int_equal(r.kv.dtype, DTYPE_F16);
    assert_int_equal(r.kv.n_layer, 2);
    assert_int_equal(r.kv.n_head_kv, 2);
    assert_int_equal(r.kv.head0, 0);
    assert_int_equal(r.kv.n_heads, 2);
    assert_int_equal(r.kv.head_dim, 16);
    assert_int_equal(r.kv.capacity_blocks, (int64_t)(c.kv_budget / (int64_t)kv_block_bytes(&kc)));
    assert_int_equal(r.rank, -1);
    assert_int_equal(r.group, -1);
    assert_int_equal(r.role, PROTO_ROLE_BOTH);
    assert_int_equal(r.tp_rank, 0);
    assert_int_equal(r.tp_size, 1);
    assert_int_equal(r.device.kind, PROTO_DEVICE_CPU);
    assert_non_null(r.device.name);
    assert_true(r.device.memory_bytes > 0);
    assert_int_equal(r.backend, PROTO_BACKEND_TCP);
    assert_non_null(r.endpoint);
    assert_int_equal(r.max_batch, 16);
    const int capacity = (int)r.kv.capacity_blocks;
    proto_register_free(&r);

    /* not ready before registered: no message but register, state registering */
    sleep_ms(50);
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.registrations, 0);
    assert_int_equal(s.state, WRK_STATE_REGISTERING);
    assert_int_equal(s.kv_blocks_total, capacity);
    fake_registered(&f, 1000, 4);
    wait_stats(&t, is_ready, "ready");
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.registrations, 1);
    assert_int_equal(s.rank, 0);
    assert_int_equal(s.group, 0);
    assert_int_equal(s.heartbeat_ms, 1000);
    /* right after registered the worker reports its load */
    proto_cmd cmd = fake_next(&f, WAIT_MS, 0, NULL);
    assert_int_equal(cmd, PROTO_CMD_HEARTBEAT);
    assert_int_equal(f.last_hb.running, 0);
    assert_int_equal(f.last_hb.waiting, 0);
    assert_int_equal(f.last_hb.kv_free_blocks, s.kv_blocks_total);
    assert_int_equal(f.last_hb.kv_cached_blocks, 0);
    wt_stop(&t);
    fake_close(&f);
}

#define NREQ 20

static void test_assign_many_equal_reference(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.kv_budget = 8 << 20;
    wthread t;
    start_registered(&t, &f, &c, 1000, 4);
    int n_eog = 0;
    const int32_t *eog = wrk_eog_ids(t.w, &n_eog);
    assert_true(n_eog >= 1);

    model_t *m = NULL;
    char err[256];
    assert_int_equal(model_load(model_file, 0, 1, &m, err, sizeof err), 0);
    const int V = model_hparams_of(m)->n_vocab;
    model_ctx_t *ctx = NULL;
    assert_int_equal(model_ctx_new(m, 512, 2, &ctx), 0);
    kv_config kc = model_kv_config(m, DTYPE_F16, 0);
    kc.budget_bytes = kv_block_bytes(&kc) * 64;
    kv_cache_t *kv = NULL;
    assert_int_equal(kv_new(&kc, &kv), KV_OK);

    static int32_t prompts[NREQ][160];
    int len[NREQ], maxt[NREQ], stop[NREQ], n_stop[NREQ];
    outcome want[NREQ], got[NREQ];
    unsigned rng = 4242;
    int32_t common[48];
    assert_true(NREQ > 3);
    fill_prompt(common, 48, V, 99);
    for (int i = 0; i < NREQ; i++) {
        len[i] = i == 0 ? 1 : 1 + (int)(lcg(&rng) % 160);
        fill_prompt(prompts[i], len[i], V, 1000 + i);
        if (i % 4 == 1 && len[i] > 60) memcpy(prompts[i], common, sizeof common);
        maxt[i] = 1 + (int)(lcg(&rng) % 40);
        n_stop[i] = 0;
    }
    maxt[3] = 30;
    for (int i = 0; i < NREQ; i++) {
        reference(m, ctx, kv, prompts[i], len[i], maxt[i], NULL, 0, eog, n_eog, &want[i]);
        if (i % 5 == 2 && want[i].n >= 4) { /* a stop id: its own middle token */
            stop[i] = want[i].tok[want[i].n / 2];
            n_stop[i] = 1;
            reference(m, ctx, kv, prompts[i], len[i], maxt[i], &stop[i], 1, eog, n_eog, &want[i]);
        }
    }
    assert_true(want[3].n > 3 && want[3].reason == PROTO_FINISH_LENGTH);
    int n_stopped = 0;
    for (int i = 0; i < NREQ; i++) n_stopped += want[i].reason == PROTO_FINISH_STOP;
    assert_true(n_stopped >= 1);

    /* request 3 continues a retried request: 3 tokens were generated elsewhere */
    memset(got, 0, sizeof got);
    for (int i = 0; i < NREQ; i++) {
        if (i == 3) {
            fake_assign(&f, 100 + i, prompts[i], len[i], want[i].tok, 3, maxt[i], NULL, 0, 0);
            memcpy(got[i].tok, want[i].tok, 3 * sizeof(int32_t));
            got[i].n = 3;
        } else {
            fake_assign(&f, 100 + i, prompts[i], len[i], NULL, 0, maxt[i], n_stop[i] ? &stop[i] : NULL,
                        n_stop[i], 0);
        }
    }
    int multi = collect(&f, 100, got, NREQ);
    assert_true(multi >= 1); /* one tokens message per step, for the whole batch */
    for (int i = 0; i < NREQ; i++) {
        if (got[i].n != want[i].n || memcmp(got[i].tok, want[i].tok, (size_t)want[i].n * 4) != 0)
            fail_msg("rid %d: %d tokens, reference %d (or they differ)", 100 + i, got[i].n,
                     want[i].n);
        assert_int_equal(got[i].reason, want[i].reason);
        assert_int_equal(got[i].n_generated, want[i].n);
        assert_true(got[i].cached >= 0 && got[i].cached < len[i] + (i == 3 ? 3 : 0));
    }
    wait_stats(&t, kv_clean, "no KV block in use");
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.assigns, NREQ);
    assert_int_equal(s.finished, NREQ);
    assert_true(s.steps > 0);
    assert_int_equal(s.rejected, 0);

    /* the same prompt again: its full blocks come from the prefix cache */
    fake_assign(&f, 200, prompts[1], len[1], NULL, 0, maxt[1], NULL, 0, 0);
    outcome again[1];
    memset(again, 0, sizeof again);
    collect(&f, 200, again, 1);
    assert_int_equal(again[0].n, want[1].n);
    assert_memory_equal(again[0].tok, want[1].tok, (size_t)want[1].n * 4);
    assert_int_equal(again[0].cached, (len[1] - 1) / 16 * 16);

    wt_stop(&t);
    fake_close(&f);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    model_destroy(&m);
}

/* 300 short requests at once: the worker's request table grows and shrinks. */
static void test_many_short_requests(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    wthread t;
    start_registered(&t, &f, &c, 1000, 4);
    enum { N = 300 };
    static outcome got[N];
    memset(got, 0, sizeof got);
    for (int i = 0; i < N; i++) {
        int32_t q[2] = {(int32_t)(i % 50), (int32_t)(i / 50)};
        fake_assign(&f, 1000 + i, q, 2, NULL, 0, 1 + i % 3, NULL, 0, 1);
    }
    collect(&f, 1000, got, N);
    for (int i = 0; i < N; i++) {
        assert_int_equal(got[i].n, 1 + i % 3);
        assert_int_equal(got[i].n_generated, 1 + i % 3);
        assert_int_equal(got[i].reason, PROTO_FINISH_LENGTH);
    }
    wait_stats(&t, kv_clean, "no KV block in use");
    wt_stop(&t);
    fake_close(&f);
}

static void test_cancel(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.max_batch_tokens = 16; /* a slow prefill: the request is still running when cancelled */
    wthread t;
    start_registered(&t, &f, &c, 1000, 4);
    int32_t p[200];
    fill_prompt(p, 200, mkmodel_builtin_vocab_size(), 5);
    fake_assign(&f, 7, p, 200, NULL, 0, 800, NULL, 0, 1);
    fake_cancel(&f, 7);
    fake_cancel(&f, 7);  /* idempotent */
    fake_cancel(&f, 99); /* unknown: nothing */
    int n_tok = 0;
    proto_finished fi = {0};
    for (;;) {
        json_t *body = NULL;
        proto_cmd cmd = fake_next(&f, WAIT_MS, 1, &body);
        proto_err e;
        if (cmd == PROTO_CMD_TOKENS) {
            proto_tokens tk;
            assert_int_equal(proto_tokens_parse(body, &tk, &e), 0);
            for (int i = 0; i < tk.n_events; i++) n_tok += tk.events[i].n_ids;
            proto_tokens_free(&tk);
        } else if (cmd == PROTO_CMD_FINISHED) {
            assert_int_equal(proto_finished_parse(body, &fi, &e), 0);
            json_decref(body);
            break;
        } else {
            fail_msg("expected tokens or finished, got '%s'", proto_cmd_name(cmd));
        }
        json_decref(body);
    }
    assert_int_equal(fi.rid, 7);
    assert_int_equal(fi.reason, PROTO_FINISH_CANCELLED);
    assert_int_equal(fi.n_generated, n_tok);
    assert_true(n_tok < 800);
    /* nothing else follows for 7 or 99 */
    assert_int_equal(fake_next(&f, 150, 1, NULL), PROTO_CMD_NONE);
    wait_stats(&t, kv_clean, "no KV block in use");
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.cancels, 3);
    wt_stop(&t);
    fake_close(&f);
}

/* Expect failed for rid with code and retryable; its message must contain needle. */
static void expect_failed(fake_t *f, int64_t rid, proto_code code, int retryable, const char *needle)
{
    proto_failed fa;
    fake_expect(f, PROTO_CMD_FAILED, PROTO_T_FAILED, &fa);
    assert_int_equal(fa.rid, rid);
    if (fa.code != code)
        fail_msg("rid %" PRId64 ": code %s, expected %s (%s)", rid, proto_code_name(fa.code),
                 proto_code_name(code), fa.message);
    assert_int_equal(fa.retryable, retryable);
    if (needle && !strstr(fa.message, needle))
        fail_msg("rid %" PRId64 ": message '%s' does not name '%s'", rid, fa.message, needle);
    proto_failed_free(&fa);
}

static void test_bad_assigns(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.kv_budget = 0; /* set below: 8 blocks of 16 tokens */
    model_t *m = NULL;
    char err[256];
    assert_int_equal(model_load(model_file, 0, 1, &m, err, sizeof err), 0);
    kv_config kc = model_kv_config(m, DTYPE_F16, 0);
    model_destroy(&m);
    c.kv_budget = (int64_t)kv_block_bytes(&kc) * 8;
    wthread t;
    start_registered(&t, &f, &c, 1000, 4);
    const int V = mkmodel_builtin_vocab_size();

    /* schema: no sampling.seed */
    fake_send_raw(&f, PROTO_WORKER_TAG, "assign",
                  "{\"rid\": 41, \"role\": \"both\", \"tokens\": [1, 2], \"sampling\": {}, "
                  "\"max_tokens\": 4}");
    expect_failed(&f, 41, PROTO_ERR_BAD_REQUEST, 0, "sampling.seed");
    /* schema: unknown field */
    fake_send_raw(&f, PROTO_WORKER_TAG, "assign",
                  "{\"rid\": 42, \"role\": \"both\", \"tokens\": [1], \"sampling\": {\"seed\": 1}, "
                  "\"max_tokens\": 4, \"temperature\": 0}");
    expect_failed(&f, 42, PROTO_ERR_BAD_REQUEST, 0, "temperature");
    /* a token outside the vocabulary */
    int32_t bad[2] = {1, (int32_t)V};
    fake_assign(&f, 43, bad, 2, NULL, 0, 4, NULL, 0, 0);
    expect_failed(&f, 43, PROTO_ERR_BAD_REQUEST, 0, "vocabulary");
    /* prompt + max_tokens beyond the context (1024) */
    int32_t p[200];
    fill_prompt(p, 200, V, 3);
    fake_assign(&f, 44, p, 200, NULL, 0, 900, NULL, 0, 0);
    expect_failed(&f, 44, PROTO_ERR_BAD_REQUEST, 0, "context");
    /* fits the context, not the KV pool (8 blocks = 128 tokens): kv_full, retryable */
    fake_assign(&f, 45, p, 200, NULL, 0, 4, NULL, 0, 0);
    expect_failed(&f, 45, PROTO_ERR_KV_FULL, 1, "KV");
    /* role prefill on a worker of role both: it has no data plane */
    fake_send_raw(&f, PROTO_WORKER_TAG, "assign",
                  "{\"rid\": 46, \"role\": \"prefill\", \"tokens\": [1, 2], \"sampling\": "
                  "{\"seed\": 1}, \"max_tokens\": 8, \"transfer\": {\"xfer\": 9, \"seq\": 0, "
                  "\"peer_group\": 1, \"first_block\": 0, \"peers\": [{\"rank\": 1, \"head0\": 0, "
                  "\"n_heads\": 2}], \"lease_ms\": 1000}}");
    {
        proto_failed fa;
        fake_expect(&f, PROTO_CMD_FAILED, PROTO_T_FAILED, &fa);
        assert_int_equal(fa.rid, 46);
        assert_int_equal(fa.xfer, 9);
        assert_int_equal(fa.code, PROTO_ERR_BAD_REQUEST);
        assert_non_null(strstr(fa.message, "without a KV data plane"));
        proto_failed_free(&fa);
    }
    /* reserve: a worker of role both receives no KV */
    fake_send_raw(&f, PROTO_WORKER_TAG, "reserve",
                  "{\"xfer\": 10, \"rid\": 47, \"seq\": 0, \"src_group\": 0, \"src\": [{\"rank\": 0, "
                  "\"head0\": 0, \"n_heads\": 2}], \"tokens\": [1, 2, 3], \"lease_ms\": 1000}");
    expect_failed(&f, 47, PROTO_ERR_BAD_REQUEST, 0, "role is not decode");
    /* malformed frames and an assign without a rid: ignored (logged), the worker goes on */
    fake_send_raw(&f, PROTO_WORKER_TAG, "assign", NULL);
    fake_send_raw(&f, "duet.worker/9", "assign", "{}");
    fake_send_raw(&f, PROTO_WORKER_TAG, "bogus", "{}");
    fake_send_raw(&f, PROTO_WORKER_TAG, "tokens", "{\"events\": []}");
    fake_send_raw(&f, PROTO_WORKER_TAG, "assign", "{\"role\": \"both\"}");
    fake_send_raw(&f, PROTO_WORKER_TAG, "assign", "[1, 2]");
    /* a duplicate rid while the first runs: the second is refused, the first finishes */
    int32_t q[3] = {5, 6, 7};
    fake_assign(&f, 48, q, 3, NULL, 0, 20, NULL, 0, 1);
    fake_assign(&f, 48, q, 3, NULL, 0, 20, NULL, 0, 1);
    outcome got[1];
    memset(got, 0, sizeof got);
    int saw_dup = 0, done = 0;
    while (!done) {
        json_t *body = NULL;
        proto_cmd cmd = fake_next(&f, WAIT_MS, 1, &body);
        proto_err e;
        if (cmd == PROTO_CMD_FAILED) {
            proto_failed fa;
            assert_int_equal(proto_failed_parse(body, &fa, &e), 0);
            assert_int_equal(fa.rid, 48);
            assert_int_equal(fa.code, PROTO_ERR_BAD_REQUEST);
            assert_non_null(strstr(fa.message, "already"));
            proto_failed_free(&fa);
            saw_dup++;
        } else if (cmd == PROTO_CMD_TOKENS) {
            proto_tokens tk;
            assert_int_equal(proto_tokens_parse(body, &tk, &e), 0);
            for (int i = 0; i < tk.n_events; i++) got[0].n += tk.events[i].n_ids;
            proto_tokens_free(&tk);
        } else if (cmd == PROTO_CMD_FINISHED) {
            proto_finished fi;
            assert_int_equal(proto_finished_parse(body, &fi, &e), 0);
            assert_int_equal(fi.rid, 48);
            assert_int_equal(fi.reason, PROTO_FINISH_LENGTH);
            assert_int_equal(fi.n_generated, 20);
            done = 1;
        } else {
            fail_msg("unexpected '%s'", cmd == PROTO_CMD_NONE ? "(nothing)" : proto_cmd_name(cmd));
        }
        json_decref(body);
    }
    assert_int_equal(saw_dup, 1);
    assert_int_equal(got[0].n, 20);
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.rejected, 7); /* 41..46 and the duplicate 48 (47 was a reserve) */
    assert_true(s.bad_msgs_in >= 5);
    assert_int_equal(s.state, WRK_STATE_READY);
    wait_stats(&t, kv_clean, "no KV block in use");
    wt_stop(&t);
    fake_close(&f);
}

static int hb_in_3(const wrk_stats *s) { return s->heartbeats_in >= 3; }

static void test_heartbeats_both_ways(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.max_seqs = 1;
    wthread t;
    start_registered(&t, &f, &c, 40, 10);
    /* the worker beats every 40 ms while idle (the first right after registered) */
    const int64_t t0 = mono_ms();
    for (int i = 0; i < 5; i++) {
        assert_int_equal(fake_next(&f, WAIT_MS, 0, NULL), PROTO_CMD_HEARTBEAT);
        fake_heartbeat(&f); /* and duetd beats back */
    }
    const int64_t dt = mono_ms() - t0;
    assert_true(dt >= 4 * 40 - 10); /* not faster than the interval */
    wait_stats(&t, hb_in_3, "3 heartbeats received");
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(f.last_hb.running, 0);
    assert_int_equal(f.last_hb.kv_free_blocks, s.kv_blocks_total);
    /* with work the load shows: 8 long requests, one running at a time */
    int32_t p[24];
    for (int i = 0; i < 8; i++) {
        fill_prompt(p, 24, mkmodel_builtin_vocab_size(), 8 + i);
        fake_assign(&f, 1 + i, p, 24, NULL, 0, 990, NULL, 0, 1);
    }
    int saw_load = 0;
    while (!saw_load) {
        proto_cmd cmd = fake_next(&f, WAIT_MS, 0, NULL);
        assert_int_not_equal(cmd, PROTO_CMD_NONE);
        if (cmd == PROTO_CMD_HEARTBEAT && f.last_hb.running == 1 && f.last_hb.waiting >= 1)
            saw_load = f.last_hb.kv_free_blocks < s.kv_blocks_total;
        if (cmd == PROTO_CMD_FINISHED && f.last_hb.running == 0)
            fail_msg("a request finished before any heartbeat showed the load");
    }
    wt_stop(&t);
    fake_close(&f);
}

static int dropped_and_lost(const wrk_stats *s)
{
    return s->reconnects >= 1 && s->dropped >= 1 && s->live == 0 && s->kv_blocks_used == 0;
}

static void test_silent_duetd_reregister(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.max_seqs = 1;
    wthread t;
    start_registered(&t, &f, &c, 50, 3);
    /* long requests that cannot end before duetd's silence is noticed */
    int32_t p[24];
    for (int i = 0; i < 8; i++) {
        fill_prompt(p, 24, mkmodel_builtin_vocab_size(), 30 + i);
        fake_assign(&f, 10 + i, p, 24, NULL, 0, 990, NULL, 0, 1);
    }
    /* wait for the first tokens, then go silent (read nothing, send nothing) */
    assert_int_equal(fake_next(&f, WAIT_MS, 1, NULL), PROTO_CMD_TOKENS);
    const int64_t t0 = mono_ms();
    wait_stats(&t, dropped_and_lost, "work dropped after duetd's silence");
    assert_true(mono_ms() - t0 >= 3 * 50 - 60); /* not before dead_after intervals (some slack) */
    /* duetd restarts: a new ROUTER on the same endpoint gets a new register */
    char ep[256];
    snprintf(ep, sizeof ep, "%s", f.endpoint);
    fake_close_router(&f);
    fake_bind(&f, ep);
    proto_register r;
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    assert_string_equal(r.worker_id, "test-worker-0");
    proto_register_free(&r);
    fake_registered(&f, 1000, 4);
    wait_stats(&t, is_ready, "ready again");
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.registrations, 2);
    assert_true(s.dropped >= 2);
    assert_int_equal(s.kv_blocks_used, 0);
    /* duetd forgot this worker (declared it dead): its error makes it register again */
    fake_send_raw(&f, PROTO_WORKER_TAG, "error",
                  "{\"code\": \"unexpected_command\", \"message\": \"heartbeat from a worker "
                  "declared dead: register again\", \"command\": \"heartbeat\"}");
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    proto_register_free(&r);
    fake_registered(&f, 1000, 4);
    wait_stats(&t, is_ready, "ready after duetd's error");
    /* other errors are only logged */
    fake_send_raw(&f, PROTO_WORKER_TAG, "error", "{\"code\": \"internal\", \"message\": \"oops\"}");
    /* and it serves again */
    int32_t q[4] = {9, 8, 7, 6};
    fake_assign(&f, 77, q, 4, NULL, 0, 5, NULL, 0, 1);
    outcome o[1];
    memset(o, 0, sizeof o);
    collect(&f, 77, o, 1);
    assert_int_equal(o[0].n, 5);
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.registrations, 3);
    wt_stop(&t);
    fake_close(&f);
}

static void test_refused(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    wthread t;
    wt_start(&t, &c);
    proto_register r;
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    proto_register_free(&r);
    /* duplicate_worker: retried later */
    proto_refused rf = {.code = PROTO_ERR_DUPLICATE_WORKER, .message = "a live worker is test-worker-0"};
    fake_send(&f, PROTO_CMD_REFUSED, PROTO_T_REFUSED, &rf);
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    proto_register_free(&r);
    /* model_mismatch: the end */
    rf = (proto_refused){.code = PROTO_ERR_MODEL_MISMATCH, .message = "register: model sha256 differs"};
    fake_send(&f, PROTO_CMD_REFUSED, PROTO_T_REFUSED, &rf);
    wrk_status rc = wt_join(&t);
    assert_int_equal(rc, WRK_ERR_REFUSED);
    assert_non_null(strstr(t.err, "model_mismatch"));
    assert_non_null(strstr(t.err, "model sha256 differs"));
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.refusals, 2);
    assert_int_equal(s.registrations, 0);
    assert_int_equal(s.state, WRK_STATE_IDLE);
    wrk_destroy(&t.w);
    fake_close(&f);
}

static int live_2(const wrk_stats *s) { return s->live == 2 && s->running == 2; }

static void test_stop_hands_back(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.max_batch_tokens = 16;
    wthread t;
    start_registered(&t, &f, &c, 1000, 4);
    int32_t p[24];
    fill_prompt(p, 24, mkmodel_builtin_vocab_size(), 12);
    fake_assign(&f, 5, p, 24, NULL, 0, 990, NULL, 0, 1);
    fake_assign(&f, 6, p + 1, 23, NULL, 0, 990, NULL, 0, 1);
    wait_stats(&t, live_2, "2 requests running");
    wrk_stop(t.w); /* a drain ... */
    wrk_stop(t.w); /* ... cut short */
    int failed[2] = {0, 0};
    while (!(failed[0] && failed[1])) {
        json_t *body = NULL;
        proto_cmd cmd = fake_next(&f, WAIT_MS, 1, &body);
        if (cmd == PROTO_CMD_NONE) fail_msg("no failed for the running requests");
        if (cmd == PROTO_CMD_FAILED) {
            proto_failed fa;
            proto_err e;
            assert_int_equal(proto_failed_parse(body, &fa, &e), 0);
            assert_true(fa.rid == 5 || fa.rid == 6);
            assert_int_equal(fa.code, PROTO_ERR_INTERNAL);
            assert_true(fa.retryable);
            assert_non_null(strstr(fa.message, "stopping"));
            failed[fa.rid - 5]++;
            proto_failed_free(&fa);
        } else {
            assert_int_equal(cmd, PROTO_CMD_TOKENS);
        }
        json_decref(body);
    }
    assert_int_equal(failed[0], 1);
    assert_int_equal(failed[1], 1);
    assert_int_equal(wt_join(&t), WRK_OK);
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.live, 0);
    assert_int_equal(s.kv_blocks_used, 0);
    assert_int_equal(s.state, WRK_STATE_IDLE);
    /* wrk_run may run again: it registers anew */
    assert_int_equal(pthread_create(&t.th, NULL, run_thread, &t), 0);
    t.running = 1;
    proto_register r;
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    proto_register_free(&r);
    wt_stop(&t);
    fake_close(&f);
}

/* The first stop drains: held requests finish, new ones are refused (retryable). */
static void test_stop_drains(void **state)
{
    (void)state;
    fake_t f;
    fake_open(&f);
    wrk_config c;
    test_config(&c, f.endpoint);
    c.drain_ms = WAIT_MS;
    wthread t;
    start_registered(&t, &f, &c, 1000, 4);
    int32_t p[24];
    fill_prompt(p, 24, mkmodel_builtin_vocab_size(), 13);
    fake_assign(&f, 5, p, 24, NULL, 0, 300, NULL, 0, 1);
    fake_assign(&f, 6, p + 1, 23, NULL, 0, 300, NULL, 0, 1);
    wait_stats(&t, live_2, "2 requests running");
    wrk_stop(t.w);
    fake_assign(&f, 7, p, 4, NULL, 0, 10, NULL, 0, 1);
    int finished[2] = {0, 0}, refused = 0;
    while (!(finished[0] && finished[1] && refused)) {
        json_t *body = NULL;
        proto_cmd cmd = fake_next(&f, WAIT_MS, 1, &body);
        proto_err e;
        if (cmd == PROTO_CMD_FINISHED) {
            proto_finished fi;
            assert_int_equal(proto_finished_parse(body, &fi, &e), 0);
            assert_true(fi.rid == 5 || fi.rid == 6);
            assert_int_equal(fi.reason, PROTO_FINISH_LENGTH);
            assert_int_equal(fi.n_generated, 300);
            finished[fi.rid - 5]++;
        } else if (cmd == PROTO_CMD_FAILED) {
            proto_failed fa;
            assert_int_equal(proto_failed_parse(body, &fa, &e), 0);
            assert_int_equal(fa.rid, 7);
            assert_int_equal(fa.code, PROTO_ERR_INTERNAL);
            assert_true(fa.retryable);
            assert_non_null(strstr(fa.message, "stopping"));
            proto_failed_free(&fa);
            refused++;
        } else if (cmd != PROTO_CMD_TOKENS) {
            fail_msg("unexpected '%s' while draining", cmd == PROTO_CMD_NONE ? "(nothing)" : proto_cmd_name(cmd));
        }
        json_decref(body);
    }
    assert_int_equal(wt_join(&t), WRK_OK);
    wrk_stats s;
    wrk_get_stats(t.w, &s);
    assert_int_equal(s.finished, 2);
    assert_int_equal(s.live, 0);
    assert_int_equal(s.kv_blocks_used, 0);
    wrk_destroy(&t.w);
    fake_close(&f);
}

/* ---- the real binary ------------------------------------------------------------------------ */

static pid_t spawn_worker(const char *bin, const char *endpoint)
{
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        execl(bin, bin, "-m", model_file, "--endpoint", endpoint, "--threads", "1", "--kv-budget",
              "4M", "--heartbeat-ms", "100", "--worker-id", "bin-worker", "--log-level",
              getenv("WRK_TEST_LOG") ? "debug" : "error", (char *)NULL);
        _exit(127);
    }
    return pid;
}

/* Wait for pid's exit within ms; returns its exit status, or -1 (and kills it). */
static int wait_exit(pid_t pid, int ms)
{
    const int64_t until = mono_ms() + ms;
    int st;
    while (mono_ms() < until) {
        pid_t r = waitpid(pid, &st, WNOHANG);
        if (r == pid) return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        sleep_ms(10);
    }
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    return -1;
}

static void test_binary(void **state)
{
    (void)state;
    const char *build = getenv("BUILD") ? getenv("BUILD") : "build";
    char bin[512];
    snprintf(bin, sizeof bin, "%s/bin/duet-worker", build);
    if (access(bin, X_OK) != 0) {
        fprintf(stderr, "test_binary: %s not built: skipped\n", bin);
        skip();
    }
    fake_t f;
    fake_open(&f);
    pid_t pid = spawn_worker(bin, f.endpoint);
    proto_register r;
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    char hex[65], err[256];
    assert_int_equal(wrk_sha256_file(model_file, hex, err, sizeof err), 0);
    assert_string_equal(r.model.sha256, hex);
    assert_string_equal(r.worker_id, "bin-worker");
    assert_int_equal(r.kv.block_tokens, 16);
    assert_int_equal(r.role, PROTO_ROLE_BOTH);
    proto_register_free(&r);
    fake_registered(&f, 200, 4);
    assert_int_equal(fake_next(&f, WAIT_MS, 0, NULL), PROTO_CMD_HEARTBEAT);
    int32_t q[4] = {3, 4, 5, 6};
    fake_assign(&f, 1, q, 4, NULL, 0, 6, NULL, 0, 1);
    outcome o[1];
    memset(o, 0, sizeof o);
    collect(&f, 1, o, 1);
    assert_int_equal(o[0].n, 6);
    assert_int_equal(kill(pid, SIGTERM), 0);
    assert_int_equal(wait_exit(pid, WAIT_MS), 0);

    /* refused: exit status 1 */
    pid = spawn_worker(bin, f.endpoint);
    fake_expect(&f, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r);
    proto_register_free(&r);
    proto_refused rf = {.code = PROTO_ERR_LAYOUT_MISMATCH, .message = "register: kv.dtype differs"};
    fake_send(&f, PROTO_CMD_REFUSED, PROTO_T_REFUSED, &rf);
    assert_int_equal(wait_exit(pid, WAIT_MS), 1);
    fake_close(&f);
}

/* ---- configuration ---------------------------------------------------------------------------- */

static void test_config_from_file(void **state)
{
    (void)state;
    char text[2048];
    snprintf(text, sizeof text,
             "[model]\npath = %s\nkv_type = bf16\nmax_context = 512\n"
             "[daemon]\nworker_endpoint = tcp://127.0.0.1:7999\nheartbeat_ms = 250\n"
             "dead_after = 3\nlog_level = debug\n"
             "[group a]\nrole = both\nthreads = 1\nkv_budget = 2MiB\nmax_batch_tokens = 64\n"
             "max_seqs = 8\n"
             "[group b]\nrole = both\ntp_size = 2\ndevices = cpu,cpu\n"
             "[group c]\nrole = prefill\n",
             model_file);
    duet_config *dc = NULL;
    char err[1024];
    if (config_parse(text, "test.conf", &dc, err, sizeof err) != 0) fail_msg("config: %s", err);
    wrk_config c;
    wrk_config_default(&c);
    assert_int_equal(wrk_config_from_file(dc, "a", 0, &c, err, sizeof err), WRK_OK);
    assert_string_equal(c.model_path, model_file);
    assert_int_equal(c.kv_type, DTYPE_BF16);
    assert_int_equal(c.n_ctx, 512);
    assert_string_equal(c.endpoint, "tcp://127.0.0.1:7999");
    assert_int_equal(c.heartbeat_ms, 250);
    assert_int_equal(c.dead_after, 3);
    assert_int_equal(c.log_level, CONFIG_LOG_DEBUG);
    assert_int_equal(c.group, 0);
    assert_string_equal(c.group_name, "a");
    assert_int_equal(c.role, PROTO_ROLE_BOTH);
    assert_int_equal(c.n_threads, 1);
    assert_int_equal(c.kv_budget, 2 << 20);
    assert_int_equal(c.max_batch_tokens, 64);
    assert_int_equal(c.max_seqs, 8);
    assert_int_equal(wrk_config_from_file(dc, "zz", 0, &c, err, sizeof err), WRK_ERR_CONFIG);
    assert_non_null(strstr(err, "no [group zz]"));
    assert_int_equal(wrk_config_from_file(dc, "b", 1, &c, err, sizeof err), WRK_ERR_CONFIG);
    assert_non_null(strstr(err, "tp_size 2"));
    assert_int_equal(wrk_config_from_file(dc, "c", 0, &c, err, sizeof err), WRK_OK);
    assert_int_equal(c.role, PROTO_ROLE_PREFILL);
    assert_int_equal(wrk_config_from_file(dc, "a", 1, &c, err, sizeof err), WRK_ERR_CONFIG);
    assert_non_null(strstr(err, "rank 1"));
    config_free(&dc);

    /* a worker made from group a: its register shows the config */
    wrk_config_default(&c);
    assert_int_equal(config_parse(text, "test.conf", &dc, err, sizeof err), 0);
    assert_int_equal(wrk_config_from_file(dc, "a", 0, &c, err, sizeof err), WRK_OK);
    c.log = capture_log;
    c.log_user = &g_log;
    wrk_t *w = NULL;
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_OK);
    const char *id = wrk_worker_id(w);
    assert_true(strlen(id) >= 3 && strlen(id) <= PROTO_MAX_ID);
    assert_non_null(strstr(id, "-a-0"));
    wrk_destroy(&w);
    config_free(&dc);

    /* wrk_new refuses what needs comm/, and bad values, with clear messages */
    wrk_config_default(&c);
    c.model_path = model_file;
    c.tp_size = 2;
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_ERR_CONFIG);
    assert_null(w);
    assert_non_null(strstr(err, "tp_size 2"));
    assert_non_null(strstr(err, "not wired"));
    c.tp_size = 1;
    c.role = PROTO_ROLE_DECODE; /* a decode worker opens its data plane (tcp, a free port) */
    c.kv_budget = 1 << 20;
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_OK);
    wrk_destroy(&w);
    c.backend = PROTO_BACKEND_MPI; /* mpi only under mpirun */
    if (!getenv("OMPI_COMM_WORLD_RANK") && !getenv("PMIX_RANK")) {
        assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_ERR_CONFIG);
        assert_non_null(strstr(err, "mpirun"));
    }
    c.backend = PROTO_BACKEND_TCP;
    c.kv_budget = (int64_t)256 << 20;
    c.role = PROTO_ROLE_BOTH;
    c.worker_id = "has space";
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_ERR_CONFIG);
    assert_non_null(strstr(err, "has space"));
    c.worker_id = NULL;
    c.model_path = "/nonexistent/model.gguf";
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_ERR_MODEL);
    assert_non_null(strstr(err, "/nonexistent/model.gguf"));
    c.model_path = model_file;
    c.kv_budget = 100; /* below one block */
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_ERR_CONFIG);
    assert_non_null(strstr(err, "KV cache"));
    assert_null(w);
    wrk_destroy(&w);
    /* a stop before wrk_run makes it return at once */
    wrk_config_default(&c);
    c.model_path = model_file;
    c.kv_budget = 1 << 20;
    c.endpoint = "tcp://127.0.0.1:1";
    c.log = capture_log;
    c.log_user = &g_log;
    assert_int_equal(wrk_new(&c, &w, err, sizeof err), WRK_OK);
    wrk_stop(w);
    assert_int_equal(wrk_run(w, err, sizeof err), WRK_OK);
    wrk_destroy(&w);
}

/* ---- main ------------------------------------------------------------------------------------- */

static int setup(void **state)
{
    (void)state;
    g_log.echo = getenv("WRK_TEST_LOG") != NULL;
    return tu_tiny_model("test-worker", tmpdir, sizeof tmpdir, model_file, sizeof model_file);
}

static int teardown(void **state)
{
    (void)state;
    return tu_rmtree(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_sha256_file),
        cmocka_unit_test(test_config_from_file),
        cmocka_unit_test(test_register_contents),
        cmocka_unit_test(test_assign_many_equal_reference),
        cmocka_unit_test(test_many_short_requests),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_bad_assigns),
        cmocka_unit_test(test_heartbeats_both_ways),
        cmocka_unit_test(test_silent_duetd_reregister),
        cmocka_unit_test(test_refused),
        cmocka_unit_test(test_stop_hands_back),
        cmocka_unit_test(test_stop_drains),
        cmocka_unit_test(test_binary),
    };
    return cmocka_run_group_tests_name("worker", tests, setup, teardown);
}
