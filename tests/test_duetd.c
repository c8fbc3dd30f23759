/* tests/test_duetd.c: duetd's coordinator (daemon/coord) in-process, on real sockets.
 *
 * Each test starts the coordinator's loop in a thread on tcp://127.0.0.1 ephemeral ports,
 * with fake workers (threads with DEALER sockets speaking duet.worker/1 through
 * daemon/proto.h: they register and answer `assign` with scripted tokens) and client
 * DEALER sockets in the test's thread. Every reply duetd sends is checked against the
 * protocol's schemas. The tokenizer is the default model's when
 * models/SmolLM2-135M-Instruct.Q4_1.gguf exists, else a tiny mkmodel model's. The
 * --check-config tests run the real $BUILD/bin/duetd.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <zmq.h>

#include "daemon/config.h"
#include "daemon/coord.h"
#include "daemon/proto.h"
#include "daemon/tok.h"
#include "tests/support/gguf_write.h"

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define WAIT_MS 5000
#define MAX_SCRIPT 8192
#define MAX_SEQS 64
#define MAX_REC 256

/* ---- shared test state --------------------------------------------------------------------- */

static char g_model[256];   /* the model file used for the tokenizer */
static char g_tmpdir[128];  /* holds a tiny model when the default one is missing */
static char g_sha[65];      /* its SHA-256, computed by the first coordinator */
static int g_log;           /* DUETD_TEST_LOG=1: show duetd's log */
static int g_n_head_kv = 1; /* the model's KV heads */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void test_log(void *ctx, int prio, const char *line)
{
    (void)ctx;
    if (g_log) fprintf(stderr, "  [duetd <%d>] %s\n", prio, line);
}

/* ---- the coordinator in a thread ------------------------------------------------------------ */

typedef struct {
    coord_t *c;
    pthread_t th;
    int rc;
    int running;
    void *zctx;     /* the test's own context (clients, fake workers) */
    const tok_t *tok;
    int hb_ms;
    char notes[2048]; /* notify() lines */
    pthread_mutex_t mu;
} dd_t;

static void dd_notify(void *ctx, const char *state)
{
    dd_t *d = ctx;
    pthread_mutex_lock(&d->mu);
    size_t n = strlen(d->notes);
    snprintf(d->notes + n, sizeof d->notes - n, "%s|", state);
    pthread_mutex_unlock(&d->mu);
}

static void *dd_thread(void *arg)
{
    dd_t *d = arg;
    d->rc = coord_run(d->c);
    return NULL;
}

/* Start a coordinator on cfg (taken). */
static void dd_start_cfg(dd_t *d, int hb_ms, duet_config *cfg, const coord_opts *oo)
{
    memset(d, 0, sizeof *d);
    pthread_mutex_init(&d->mu, NULL);
    d->hb_ms = hb_ms;
    char err[4096];
    coord_opts o;
    if (oo) o = *oo;
    else coord_opts_default(&o);
    o.client_endpoint = "tcp://127.0.0.1:*";
    o.worker_endpoint = "tcp://127.0.0.1:*";
    o.model_sha256 = g_sha[0] ? g_sha : NULL;
    o.log = test_log;
    o.notify = dd_notify;
    o.notify_ctx = d;
    if (coord_new(&cfg, &o, &d->c, err, sizeof err) != 0) fail_msg("coord_new: %s", err);
    assert_null(cfg);
    if (!g_sha[0]) snprintf(g_sha, sizeof g_sha, "%s", coord_model_sha256(d->c));
    d->tok = coord_tok(d->c);
    d->zctx = zmq_ctx_new();
    assert_int_equal(pthread_create(&d->th, NULL, dd_thread, d), 0);
    d->running = 1;
}

/* Start a coordinator: [daemon] lines in daemon_extra, then the [group] sections. */
static void dd_start_opts(dd_t *d, int hb_ms, const char *daemon_extra, const char *groups, const coord_opts *oo)
{
    char text[4096], err[4096];
    snprintf(text, sizeof text, "[model]\npath = %s\n[daemon]\nheartbeat_ms = %d\nlog_level = debug\n%s\n%s", g_model,
             hb_ms, daemon_extra ? daemon_extra : "", groups);
    duet_config *cfg = NULL;
    if (config_parse(text, "test.conf", &cfg, err, sizeof err) != 0) fail_msg("config: %s\n%s", err, text);
    dd_start_cfg(d, hb_ms, cfg, oo);
}

static void dd_start(dd_t *d, int hb_ms, const char *daemon_extra, const char *groups)
{
    dd_start_opts(d, hb_ms, daemon_extra, groups, NULL);
}

static int dd_join(dd_t *d)
{
    if (d->running) {
        pthread_join(d->th, NULL);
        d->running = 0;
    }
    return d->rc;
}

static void dd_stop(dd_t *d)
{
    if (d->running) coord_signal(d->c, COORD_SIG_STOP);
    dd_join(d);
    coord_destroy(&d->c);
    zmq_ctx_term(d->zctx);
    pthread_mutex_destroy(&d->mu);
}

#define ONE_GROUP "[group a]\nrole = both\nkv_budget = 64MiB\n"
#define TWO_GROUPS "[group a]\nrole = both\nkv_budget = 64MiB\n[group b]\nrole = both\nkv_budget = 64MiB\n"

/* ---- fake workers -------------------------------------------------------------------------------- */

typedef struct {
    int64_t rid;
    int next;        /* completion index of the next token */
    int max_tokens;
    int32_t stop_ids[64];
    int n_stop_ids;
    int ignore_eos;
} fseq;

typedef struct {
    dd_t *d;
    pthread_t th;
    char id[32];
    const char *sha;          /* model hash it reports */
    int group;                /* -1: duetd chooses */
    int block_tokens;         /* [16] */
    int64_t capacity;         /* KV blocks [4096] */
    int32_t script[MAX_SCRIPT]; /* tokens it emits: completion index i gets script[i] */
    int n_script;
    int per_msg;              /* tokens per sequence per `tokens` message [1] */
    int step_ms;              /* between steps [1] */
    int cached_tokens;        /* what finished reports */
    atomic_int hold;          /* 1: emit nothing */
    atomic_int mute;          /* 1: send nothing at all (a hung worker) */
    atomic_int quit;
    atomic_int mute_after;    /* >0: mute itself after emitting this many tokens */
    atomic_int fail_assign;   /* answer this many assigns with failed */
    int fail_retryable;       /* ... retryable or not */
    atomic_int fail_running;  /* fail this many running sequences (retryable) after a token */
    int64_t stale_rid;        /* the rid it failed: its `finished` cancelled goes out (late)
                                 before the next assign is served */
    /* records (mu) */
    pthread_mutex_t mu;
    int reg;                  /* 0 waiting, 1 registered, -1 refused */
    proto_code refused_code;
    char refused_msg[512];
    proto_registered registered;
    int n_assign;
    int64_t assign_rid[MAX_REC];
    int assign_ngen[MAX_REC];
    int32_t *last_tokens;     /* the last assign's prompt */
    int n_last_tokens;
    char last_session[80];
    int n_cancel;
    int64_t cancel_rid[MAX_REC];
    int n_comm_init;
    int n_errors;
    int emitted;
    fseq seqs[MAX_SEQS];
    int n_seqs;
} fw_t;

static void fw_send(fw_t *f, void *s, proto_cmd cmd, proto_type t, const void *m)
{
    if (atomic_load(&f->mute)) return;
    proto_send_body(s, NULL, PROTO_WORKER, cmd, t, m, 0);
}

static void fw_finished(fw_t *f, void *s, int64_t rid, proto_finish reason, int n_generated)
{
    proto_finished m;
    proto_finished_init(&m);
    m.rid = rid;
    m.reason = reason;
    m.n_generated = n_generated;
    m.cached_tokens = f->cached_tokens;
    fw_send(f, s, PROTO_CMD_FINISHED, PROTO_T_FINISHED, &m);
}

static void fw_handle(fw_t *f, void *s, proto_msg *msg)
{
    proto_err err;
    switch (msg->cmd) {
    case PROTO_CMD_REGISTERED:
        pthread_mutex_lock(&f->mu);
        assert_int_equal(proto_registered_parse(msg->body, &f->registered, &err), 0);
        f->reg = 1;
        pthread_mutex_unlock(&f->mu);
        break;
    case PROTO_CMD_REFUSED: {
        proto_refused m;
        assert_int_equal(proto_refused_parse(msg->body, &m, &err), 0);
        pthread_mutex_lock(&f->mu);
        f->reg = -1;
        f->refused_code = m.code;
        snprintf(f->refused_msg, sizeof f->refused_msg, "%s", m.message);
        pthread_mutex_unlock(&f->mu);
        proto_refused_free(&m);
        break;
    }
    case PROTO_CMD_ASSIGN: {
        proto_assign a;
        assert_int_equal(proto_assign_parse(msg->body, &a, &err), 0);
        assert_int_equal(a.role, PROTO_ROLE_BOTH);
        pthread_mutex_lock(&f->mu);
        if (f->n_assign < MAX_REC) {
            f->assign_rid[f->n_assign] = a.rid;
            f->assign_ngen[f->n_assign] = a.n_generated;
        }
        f->n_assign++;
        free(f->last_tokens);
        f->last_tokens = a.tokens;
        f->n_last_tokens = a.n_tokens;
        a.tokens = NULL;
        snprintf(f->last_session, sizeof f->last_session, "%s", a.session ? a.session : "");
        if (atomic_load(&f->fail_assign) > 0) {
            atomic_fetch_sub(&f->fail_assign, 1);
            pthread_mutex_unlock(&f->mu);
            proto_failed m;
            proto_failed_init(&m);
            m.rid = a.rid;
            m.code = PROTO_ERR_KV_FULL;
            m.message = "reserve: 9 blocks needed, 0 free after eviction";
            m.retryable = f->fail_retryable;
            fw_send(f, s, PROTO_CMD_FAILED, PROTO_T_FAILED, &m);
            proto_assign_free(&a);
            break;
        }
        if (f->stale_rid) { /* the old attempt's answer to a cancel, late: duetd drops it */
            int64_t old = f->stale_rid;
            f->stale_rid = 0;
            pthread_mutex_unlock(&f->mu);
            fw_finished(f, s, old, PROTO_FINISH_CANCELLED, 1);
            pthread_mutex_lock(&f->mu);
        }
        if (f->n_seqs < MAX_SEQS) {
            fseq *q = &f->seqs[f->n_seqs++];
            memset(q, 0, sizeof *q);
            q->rid = a.rid;
            q->next = a.n_generated;
            q->max_tokens = a.max_tokens;
            q->ignore_eos = a.ignore_eos;
            for (int i = 0; i < a.n_stop_token_ids && i < 64; i++) q->stop_ids[q->n_stop_ids++] = a.stop_token_ids[i];
        }
        pthread_mutex_unlock(&f->mu);
        proto_assign_free(&a);
        break;
    }
    case PROTO_CMD_CANCEL: {
        proto_wcancel m;
        assert_int_equal(proto_wcancel_parse(msg->body, &m, &err), 0);
        pthread_mutex_lock(&f->mu);
        if (f->n_cancel < MAX_REC) f->cancel_rid[f->n_cancel] = m.rid;
        f->n_cancel++;
        for (int i = 0; i < f->n_seqs; i++)
            if (f->seqs[i].rid == m.rid) {
                int next = f->seqs[i].next;
                f->seqs[i] = f->seqs[--f->n_seqs];
                pthread_mutex_unlock(&f->mu);
                fw_finished(f, s, m.rid, PROTO_FINISH_CANCELLED, next);
                pthread_mutex_lock(&f->mu);
                break;
            }
        pthread_mutex_unlock(&f->mu);
        break;
    }
    case PROTO_CMD_COMM_INIT:
        pthread_mutex_lock(&f->mu);
        f->n_comm_init++;
        pthread_mutex_unlock(&f->mu);
        break;
    case PROTO_CMD_ERROR:
        pthread_mutex_lock(&f->mu);
        f->n_errors++;
        pthread_mutex_unlock(&f->mu);
        break;
    default: break;
    }
}

/* One step: every sequence emits up to per_msg tokens in one `tokens` message. */
static void fw_step(fw_t *f, void *s)
{
    proto_token_event ev[MAX_SEQS];
    int32_t ids[MAX_SEQS][64];
    int n_ev = 0;
    struct {
        int64_t rid;
        proto_finish reason;
        int n;
    } fin[MAX_SEQS];
    int n_fin = 0;
    int64_t fail_rid = 0;
    pthread_mutex_lock(&f->mu);
    for (int i = 0; i < f->n_seqs; i++) {
        fseq *q = &f->seqs[i];
        if (q->next >= 1 && atomic_load(&f->fail_running) > 0 && !fail_rid) {
            atomic_fetch_sub(&f->fail_running, 1);
            fail_rid = f->stale_rid = q->rid;
            f->seqs[i--] = f->seqs[--f->n_seqs];
            continue;
        }
        int k = 0, ended = 0;
        proto_finish reason = PROTO_FINISH_LENGTH;
        ev[n_ev].rid = q->rid;
        ev[n_ev].index = q->next;
        while (k < f->per_msg && k < 64) {
            if (q->next >= f->n_script) {
                ended = 1;
                break;
            }
            int32_t t = f->script[q->next++];
            ids[n_ev][k++] = t;
            f->emitted++;
            if (q->next >= q->max_tokens) {
                ended = 1;
                break;
            }
            if (!q->ignore_eos && tok_is_eog(f->d->tok, t)) {
                ended = 1;
                reason = PROTO_FINISH_EOS;
                break;
            }
            int stop = 0;
            for (int j = 0; j < q->n_stop_ids; j++) stop |= q->stop_ids[j] == t;
            if (stop) {
                ended = 1;
                reason = PROTO_FINISH_STOP;
                break;
            }
        }
        if (k > 0) {
            ev[n_ev].ids = ids[n_ev];
            ev[n_ev].n_ids = k;
            n_ev++;
        }
        if (ended) {
            fin[n_fin].rid = q->rid;
            fin[n_fin].reason = reason;
            fin[n_fin].n = q->next;
            n_fin++;
            f->seqs[i--] = f->seqs[--f->n_seqs];
        }
    }
    int ma = atomic_load(&f->mute_after);
    if (ma > 0 && f->emitted >= ma) atomic_store(&f->mute, 1);
    pthread_mutex_unlock(&f->mu);
    if (n_ev > 0) {
        proto_tokens m = {.events = ev, .n_events = n_ev};
        /* the tokens of the step that mutes it still go out */
        proto_send_body(s, NULL, PROTO_WORKER, PROTO_CMD_TOKENS, PROTO_T_TOKENS, &m, 0);
    }
    for (int i = 0; i < n_fin; i++) fw_finished(f, s, fin[i].rid, fin[i].reason, fin[i].n);
    if (fail_rid) {
        proto_failed m;
        proto_failed_init(&m);
        m.rid = fail_rid;
        m.code = PROTO_ERR_INTERNAL;
        m.message = "a step failed (test)";
        m.retryable = 1;
        fw_send(f, s, PROTO_CMD_FAILED, PROTO_T_FAILED, &m);
    }
}

static void *fw_thread(void *arg)
{
    fw_t *f = arg;
    void *s = zmq_socket(f->d->zctx, ZMQ_DEALER);
    assert_non_null(s);
    proto_socket_options(s, PROTO_SIDE_WORKER, 0);
    assert_int_equal(zmq_connect(s, coord_worker_endpoint(f->d->c)), 0);
    proto_register r;
    proto_register_init(&r);
    r.worker_id = f->id;
    r.software = "duet test";
    r.model.sha256 = (char *)f->sha;
    r.model.n_vocab = tok_n_vocab(f->d->tok);
    r.model.n_ctx = coord_n_ctx(f->d->c);
    r.kv.block_tokens = f->block_tokens;
    r.kv.dtype = DTYPE_F16;
    r.kv.n_layer = 2;
    r.kv.n_head_kv = g_n_head_kv; /* one shard (tp_size 1) holds every KV head */
    r.kv.n_heads = g_n_head_kv;
    r.kv.head0 = 0;
    r.kv.head_dim = 64;
    r.kv.capacity_blocks = f->capacity;
    r.group = f->group;
    r.role = PROTO_ROLE_ANY;
    r.tp_rank = 0;
    r.tp_size = 1;
    r.device.kind = PROTO_DEVICE_CPU;
    r.device.name = "test cpu";
    r.backend = PROTO_BACKEND_TCP;
    r.endpoint = "tcp://127.0.0.1:1";
    r.max_batch = 64;
    assert_int_equal(proto_send_body(s, NULL, PROTO_WORKER, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r, 0), 0);
    double next_hb = now_ms(), next_step = now_ms();
    while (!atomic_load(&f->quit)) {
        proto_msg msg;
        proto_err err;
        proto_rc rc = proto_recv(s, PROTO_SIDE_WORKER, 0, 1, &msg, &err);
        if (rc == PROTO_OK) {
            fw_handle(f, s, &msg);
            proto_msg_clear(&msg);
            continue;
        }
        double t = now_ms();
        if (atomic_load(&f->mute)) continue;
        int hb = f->reg == 1 ? f->registered.heartbeat_ms : f->d->hb_ms;
        if (t >= next_hb) {
            proto_heartbeat h;
            proto_heartbeat_init(&h);
            h.running = f->n_seqs;
            h.waiting = 0;
            fw_send(f, s, PROTO_CMD_HEARTBEAT, PROTO_T_HEARTBEAT, &h);
            next_hb = t + hb / 2.0;
        }
        if (!atomic_load(&f->hold) && t >= next_step) {
            fw_step(f, s);
            next_step = t + f->step_ms;
        }
    }
    zmq_close(s);
    return NULL;
}

static void fw_init(fw_t *f, dd_t *d, const char *id)
{
    memset(f, 0, sizeof *f);
    f->d = d;
    snprintf(f->id, sizeof f->id, "%s", id);
    f->sha = g_sha;
    f->group = -1;
    f->block_tokens = 16;
    f->capacity = 4096;
    f->per_msg = 1;
    f->step_ms = 1;
    pthread_mutex_init(&f->mu, NULL);
}

static int fw_reg(fw_t *f)
{
    pthread_mutex_lock(&f->mu);
    int r = f->reg;
    pthread_mutex_unlock(&f->mu);
    return r;
}

/* Start f and wait for duetd's answer; returns 1 registered, -1 refused. */
static int fw_start(fw_t *f)
{
    assert_int_equal(pthread_create(&f->th, NULL, fw_thread, f), 0);
    double t0 = now_ms();
    while (fw_reg(f) == 0 && now_ms() - t0 < WAIT_MS) sleep_ms(1);
    return fw_reg(f);
}

static void fw_stop(fw_t *f)
{
    atomic_store(&f->quit, 1);
    pthread_join(f->th, NULL);
    free(f->last_tokens);
    pthread_mutex_destroy(&f->mu);
}

static int fw_count(fw_t *f, int *field)
{
    pthread_mutex_lock(&f->mu);
    int n = *field;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* Wait until *field reaches n; returns whether it did. */
static int fw_wait(fw_t *f, int *field, int n, int ms)
{
    double t0 = now_ms();
    while (fw_count(f, field) < n)
        if (now_ms() - t0 > ms) return 0;
        else sleep_ms(1);
    return 1;
}

static int fw_cancelled(fw_t *f, int64_t rid)
{
    pthread_mutex_lock(&f->mu);
    int found = 0;
    for (int i = 0; i < f->n_cancel && i < MAX_REC; i++) found |= f->cancel_rid[i] == rid;
    pthread_mutex_unlock(&f->mu);
    return found;
}

static void fw_script_text(fw_t *f, const tok_t *t, const char *const *pieces, int n)
{
    f->n_script = 0;
    for (int i = 0; i < n; i++) {
        int32_t *ids;
        int k;
        assert_int_equal(tok_encode(t, pieces[i], strlen(pieces[i]), 0, 1, &ids, &k), 0);
        for (int j = 0; j < k; j++) f->script[f->n_script++] = ids[j];
        free(ids);
    }
}

/* ---- clients ----------------------------------------------------------------------------------- */

static void *cl_open(dd_t *d)
{
    void *s = zmq_socket(d->zctx, ZMQ_DEALER);
    assert_non_null(s);
    assert_int_equal(proto_socket_options(s, PROTO_SIDE_CLIENT, 0), 0);
    assert_int_equal(zmq_connect(s, coord_client_endpoint(d->c)), 0);
    return s;
}

static void cl_raw(void *s, int n, ...)
{
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        const char *f = va_arg(ap, const char *);
        assert_true(zmq_send(s, f, strlen(f), i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
    }
    va_end(ap);
}

static void cl_send(void *s, const char *cmd, const char *fmt, ...)
{
    char body[65536];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(body, sizeof body, fmt, ap);
    va_end(ap);
    cl_raw(s, 3, PROTO_CLIENT_TAG, cmd, body);
}

/* One reply; checked against the protocol (frames and the body's schema). 0, or -1 on
 * timeout. *body is the caller's. */
static int cl_recv(void *s, proto_cmd *cmd, json_t **body, int timeout_ms)
{
    proto_msg msg;
    proto_err err;
    proto_rc rc = proto_recv(s, PROTO_SIDE_CLIENT, 0, timeout_ms, &msg, &err);
    if (rc == PROTO_TIMEOUT) return -1;
    if (rc != PROTO_OK) fail_msg("duetd sent an invalid message: %s", err.message);
    proto_type t = proto_msg_type(&msg, PROTO_SIDE_CLIENT);
    assert_int_not_equal(t, PROTO_T_NONE);
    char buf[4096];
    void *m = buf;
    assert_true(proto_type_size(t) <= sizeof buf);
    if (proto_parse(t, msg.body, m, &err) != 0) {
        char *txt = json_dumps(msg.body, JSON_COMPACT);
        fail_msg("duetd's '%s' breaks the schema: %s: %.300s", proto_cmd_name(msg.cmd), err.message, txt);
    }
    proto_free(t, m);
    *cmd = msg.cmd;
    *body = json_incref(msg.body);
    proto_msg_clear(&msg);
    return 0;
}

static const char *jstr(const json_t *o, const char *k) { return json_string_value(json_object_get(o, k)); }
static json_int_t jint(const json_t *o, const char *k) { return json_integer_value(json_object_get(o, k)); }
static double jnum(const json_t *o, const char *k) { return json_number_value(json_object_get(o, k)); }

/* Everything one request got, in order. */
typedef struct {
    int accepted;
    int prompt_tokens, max_tokens;
    int64_t seed;
    int n_deltas;
    char text[65536];
    size_t text_len;
    int32_t tokens[MAX_SCRIPT];
    int n_tokens;
    proto_cmd end;     /* PROTO_CMD_DONE or PROTO_CMD_ERROR; NONE on timeout */
    json_t *last;      /* the done or error body */
    int prefix_ok;     /* the streamed text was always a prefix of the final text */
} result_t;

static void result_free(result_t *r) { json_decref(r->last); }

/* Read replies until id's done or error (others' replies are skipped). */
static void collect(void *s, const char *id, result_t *res, int timeout_ms)
{
    memset(res, 0, sizeof *res);
    double t0 = now_ms();
    for (;;) {
        int left = timeout_ms - (int)(now_ms() - t0);
        proto_cmd cmd;
        json_t *b;
        if (left <= 0 || cl_recv(s, &cmd, &b, left) != 0) return;
        const char *bid = jstr(b, "id");
        if (!bid || strcmp(bid, id) != 0) {
            json_decref(b);
            continue;
        }
        if (cmd == PROTO_CMD_ACCEPTED) {
            assert_false(res->accepted);
            assert_int_equal(res->n_deltas, 0);
            res->accepted = 1;
            res->prompt_tokens = (int)jint(b, "prompt_tokens");
            res->max_tokens = (int)jint(b, "max_tokens");
            res->seed = jint(b, "seed");
        } else if (cmd == PROTO_CMD_DELTA) {
            assert_true(res->accepted);
            assert_int_equal(jint(b, "index"), res->n_tokens); /* contiguous */
            const char *t = jstr(b, "text");
            size_t n = strlen(t);
            assert_true(res->text_len + n < sizeof res->text);
            memcpy(res->text + res->text_len, t, n);
            res->text_len += n;
            res->text[res->text_len] = 0;
            json_t *ids = json_object_get(b, "token_ids");
            for (size_t i = 0; i < json_array_size(ids); i++)
                res->tokens[res->n_tokens++] = (int32_t)json_integer_value(json_array_get(ids, i));
            res->n_deltas++;
        } else if (cmd == PROTO_CMD_DONE || cmd == PROTO_CMD_ERROR) {
            res->end = cmd;
            res->last = b;
            if (cmd == PROTO_CMD_DONE && json_object_get(b, "text")) {
                const char *t = jstr(b, "text");
                snprintf(res->text, sizeof res->text, "%s", t);
                res->text_len = strlen(t);
                json_t *ids = json_object_get(b, "token_ids");
                res->n_tokens = 0;
                for (size_t i = 0; i < json_array_size(ids); i++)
                    res->tokens[res->n_tokens++] = (int32_t)json_integer_value(json_array_get(ids, i));
            }
            return;
        } else {
            fail_msg("unexpected '%s' for request %s", proto_cmd_name(cmd), id);
        }
        json_decref(b);
    }
}

/* The next reply of any kind (status, health, errors). */
static proto_cmd next_reply(void *s, json_t **b)
{
    proto_cmd cmd;
    if (cl_recv(s, &cmd, b, WAIT_MS) != 0) fail_msg("no reply within %d ms", WAIT_MS);
    return cmd;
}

/* Wait for an error reply with this code (skipping other messages). */
static json_t *expect_error(void *s, const char *code)
{
    double t0 = now_ms();
    while (now_ms() - t0 < WAIT_MS) {
        json_t *b;
        proto_cmd cmd = next_reply(s, &b);
        if (cmd == PROTO_CMD_ERROR && strcmp(jstr(b, "code"), code) == 0) return b;
        if (cmd == PROTO_CMD_ERROR) fail_msg("expected error %s, got %s: %s", code, jstr(b, "code"), jstr(b, "message"));
        json_decref(b);
    }
    fail_msg("no error %s", code);
    return NULL;
}

static json_t *status_of(void *s, const char *what)
{
    cl_send(s, what, "{}");
    for (;;) {
        json_t *b;
        proto_cmd cmd = next_reply(s, &b);
        if ((cmd == PROTO_CMD_STATUS && strcmp(what, "status") == 0) ||
            (cmd == PROTO_CMD_HEALTH && strcmp(what, "health") == 0))
            return b;
        json_decref(b);
    }
}

/* The text of tokens as duetd must stream it: each token's piece (end tokens excluded). */
static void decode_ids(const tok_t *t, const int32_t *ids, int n, char *out, size_t cap)
{
    char *txt;
    size_t len;
    int32_t keep[MAX_SCRIPT];
    int k = 0;
    for (int i = 0; i < n; i++)
        if (!tok_is_eog(t, ids[i])) keep[k++] = ids[i];
    assert_int_equal(tok_decode(t, keep, k, 0, &txt, &len), 0);
    assert_true(len < cap);
    memcpy(out, txt, len + 1);
    free(txt);
}

/* ---- tests: registration ------------------------------------------------------------------------- */

static void test_register(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, TWO_GROUPS);
    fw_t a, wrong, layout, dup, full, b;
    fw_init(&a, &d, "w-a");
    assert_int_equal(fw_start(&a), 1);
    assert_int_equal(a.registered.group, 0);
    assert_int_equal(a.registered.rank, 0);
    assert_int_equal(a.registered.role, PROTO_ROLE_BOTH);
    assert_int_equal(a.registered.heartbeat_ms, 1000);
    assert_int_equal(a.registered.dead_after, 4);
    assert_true(fw_wait(&a, &a.n_comm_init, 1, WAIT_MS)); /* tcp: the live ranks' endpoints */

    fw_init(&wrong, &d, "w-wrong");
    char bad[65];
    memcpy(bad, g_sha, 65);
    bad[0] = bad[0] == '0' ? '1' : '0';
    wrong.sha = bad;
    assert_int_equal(fw_start(&wrong), -1);
    assert_int_equal(wrong.refused_code, PROTO_ERR_MODEL_MISMATCH);
    assert_non_null(strstr(wrong.refused_msg, "sha256"));

    fw_init(&layout, &d, "w-layout");
    layout.block_tokens = 32; /* the first worker fixed 16 */
    assert_int_equal(fw_start(&layout), -1);
    assert_int_equal(layout.refused_code, PROTO_ERR_LAYOUT_MISMATCH);

    fw_init(&dup, &d, "w-a");
    assert_int_equal(fw_start(&dup), -1);
    assert_int_equal(dup.refused_code, PROTO_ERR_DUPLICATE_WORKER);

    fw_init(&full, &d, "w-full");
    full.group = 0; /* taken by w-a */
    assert_int_equal(fw_start(&full), -1);
    assert_int_equal(full.refused_code, PROTO_ERR_NO_SLOT);

    fw_init(&b, &d, "w-b");
    assert_int_equal(fw_start(&b), 1);
    assert_int_equal(b.registered.group, 1);
    assert_int_equal(b.registered.rank, 1);

    void *cl = cl_open(&d);
    json_t *h = status_of(cl, "health");
    assert_true(json_is_true(json_object_get(h, "ok")));
    assert_string_equal(jstr(h, "state"), "ready");
    assert_int_equal(jint(h, "groups_ready"), 2);
    assert_int_equal(jint(h, "workers_alive"), 2);
    json_decref(h);
    json_t *st = status_of(cl, "status");
    assert_string_equal(jstr(st, "model_sha256"), g_sha);
    json_t *ws = json_object_get(st, "workers");
    assert_int_equal(json_array_size(ws), 2);
    json_t *gs = json_object_get(st, "groups");
    assert_int_equal(json_array_size(gs), 2);
    assert_string_equal(jstr(json_array_get(gs, 0), "role"), "both");
    assert_int_equal(jint(json_array_get(gs, 0), "workers_alive"), 1);
    assert_int_equal(jint(json_array_get(gs, 0), "kv_blocks_total"), 4096);
    json_decref(st);
    zmq_close(cl);
    fw_stop(&a);
    fw_stop(&wrong);
    fw_stop(&layout);
    fw_stop(&dup);
    fw_stop(&full);
    fw_stop(&b);
    dd_stop(&d);
    assert_non_null(strstr(d.notes, "READY=1"));
}

/* A worker message before registration is refused; a malformed one gets an error. */
static void test_worker_protocol_errors(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    void *s = zmq_socket(d.zctx, ZMQ_DEALER);
    proto_socket_options(s, PROTO_SIDE_WORKER, 0);
    assert_int_equal(zmq_connect(s, coord_worker_endpoint(d.c)), 0);
    cl_raw(s, 3, PROTO_WORKER_TAG, "tokens", "{\"events\":[]}");
    proto_msg msg;
    proto_err err;
    assert_int_equal(proto_recv(s, PROTO_SIDE_WORKER, 0, WAIT_MS, &msg, &err), PROTO_OK);
    assert_int_equal(msg.cmd, PROTO_CMD_ERROR);
    proto_error e;
    assert_int_equal(proto_error_parse(msg.body, &e, &err), 0);
    assert_int_equal(e.code, PROTO_ERR_UNEXPECTED_COMMAND);
    assert_non_null(strstr(e.message, "before registered"));
    proto_error_free(&e);
    proto_msg_clear(&msg);
    cl_raw(s, 3, PROTO_WORKER_TAG, "register", "{\"worker_id\": 5}");
    assert_int_equal(proto_recv(s, PROTO_SIDE_WORKER, 0, WAIT_MS, &msg, &err), PROTO_OK);
    assert_int_equal(msg.cmd, PROTO_CMD_ERROR);
    assert_string_equal(jstr(msg.body, "code"), "bad_request");
    proto_msg_clear(&msg);
    cl_raw(s, 3, PROTO_CLIENT_TAG, "status", "{}");
    assert_int_equal(proto_recv(s, PROTO_SIDE_WORKER, 0, WAIT_MS, &msg, &err), PROTO_OK);
    assert_string_equal(jstr(msg.body, "code"), "unknown_protocol");
    proto_msg_clear(&msg);
    zmq_close(s);
    dd_stop(&d);
}

/* ---- tests: generation ------------------------------------------------------------------------------ */

static void test_generate_stream(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    const char *pieces[] = {" Paris", " is", " the", " capital", " of", " France", ".", " Caf\xc3\xa9", " \xe2\x82\xac", "!"};
    fw_script_text(&w, d.tok, pieces, 10);
    int n_text = w.n_script;
    int32_t eos = tok_eos(d.tok) >= 0 && tok_is_eog(d.tok, tok_eos(d.tok)) ? tok_eos(d.tok) : -1;
    if (eos >= 0) w.script[w.n_script++] = eos;
    w.per_msg = 2;
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"r1\",\"prompt\":\"The capital of France is\",\"max_tokens\":100,\"stream\":true,"
                            "\"sampling\":{\"temperature\":0}}");
    result_t r;
    collect(cl, "r1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_true(r.accepted);
    assert_int_equal(r.max_tokens, 100);
    /* the worker got the tokenized prompt */
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(d.tok, "The capital of France is", 24, 1, 1, &ids, &n), 0);
    assert_int_equal(r.prompt_tokens, n);
    assert_int_equal(w.n_last_tokens, n);
    assert_memory_equal(w.last_tokens, ids, (size_t)n * sizeof *ids);
    free(ids);
    /* every token, in order; the text is the detokenized script */
    assert_int_equal(r.n_tokens, w.n_script);
    assert_memory_equal(r.tokens, w.script, (size_t)w.n_script * sizeof(int32_t));
    char want[4096];
    decode_ids(d.tok, w.script, n_text, want, sizeof want);
    assert_string_equal(r.text, want);
    assert_true(r.n_deltas >= 2);
    json_t *done = r.last;
    assert_string_equal(jstr(done, "finish_reason"), eos >= 0 ? "eos" : "length");
    assert_null(json_object_get(done, "text"));
    json_t *u = json_object_get(done, "usage"), *t = json_object_get(done, "timings");
    assert_int_equal(jint(u, "prompt_tokens"), r.prompt_tokens);
    assert_int_equal(jint(u, "completion_tokens"), w.n_script);
    assert_int_equal(jint(u, "retries"), 0);
    assert_int_equal(jint(u, "cached_prompt_tokens"), 0);
    double q = jnum(t, "queue_ms"), ttft = jnum(t, "ttft_ms"), tpot = jnum(t, "tpot_ms_mean"), tot = jnum(t, "total_ms");
    assert_true(q >= 0 && q <= ttft && ttft <= tot && tpot >= 0 && tot > 0);
    result_free(&r);

    /* not streaming: done carries the text and the ids */
    cl_send(cl, "generate", "{\"id\":\"r2\",\"tokens\":[1,2,3],\"max_tokens\":5,\"ignore_eos\":true}");
    collect(cl, "r2", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_int_equal(r.n_deltas, 0);
    assert_int_equal(r.n_tokens, 5);
    assert_memory_equal(r.tokens, w.script, 5 * sizeof(int32_t));
    decode_ids(d.tok, w.script, 5, want, sizeof want);
    assert_string_equal(r.text, want);
    assert_string_equal(jstr(r.last, "finish_reason"), "length");
    assert_int_equal(r.prompt_tokens, 3);
    result_free(&r);

    /* chat messages go through the model's template */
    cl_send(cl, "generate", "{\"id\":\"r3\",\"messages\":[{\"role\":\"user\",\"content\":\"Hi\"}],\"max_tokens\":3}");
    collect(cl, "r3", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_true(r.prompt_tokens > 3);
    char *dec;
    size_t dl;
    assert_int_equal(tok_decode(d.tok, w.last_tokens, w.n_last_tokens, TOK_DECODE_SPECIAL, &dec, &dl), 0);
    assert_non_null(strstr(dec, "Hi"));
    free(dec);
    result_free(&r);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* One token per character: a stop string then spans several tokens. */
static void script_chars(fw_t *f, const tok_t *t, const char *s)
{
    f->n_script = 0;
    for (const char *p = s; *p; p++) {
        char one[2] = {*p, 0};
        int32_t *ids;
        int k;
        assert_int_equal(tok_encode(t, one, 1, 0, 0, &ids, &k), 0);
        assert_int_equal(k, 1);
        f->script[f->n_script++] = ids[0];
        free(ids);
    }
}

static void test_stop_strings(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    /* "STOQ" starts like "STOP" but is not it: it must come out later, whole */
    script_chars(&w, d.tok, "Hello STOQ world STOP and more text after the stop");
    w.step_ms = 2;
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"s1\",\"prompt\":\"x\",\"max_tokens\":200,\"stream\":true,\"stop\":[\"STOP\",\"zzz\"]}");
    /* read deltas one by one: the streamed text is always a prefix of the final text, so
     * no partial stop string ever went out */
    const char *final = "Hello STOQ world ";
    char streamed[1024] = "";
    int n_tokens = 0, done = 0;
    while (!done) {
        proto_cmd cmd;
        json_t *b;
        assert_int_equal(cl_recv(cl, &cmd, &b, WAIT_MS), 0);
        if (cmd == PROTO_CMD_DELTA) {
            strncat(streamed, jstr(b, "text"), sizeof streamed - strlen(streamed) - 1);
            assert_int_equal(strncmp(streamed, final, strlen(streamed)), 0);
            n_tokens += (int)json_array_size(json_object_get(b, "token_ids"));
        } else if (cmd == PROTO_CMD_DONE) {
            assert_string_equal(jstr(b, "finish_reason"), "stop");
            /* the tokens that formed the stop string are counted */
            assert_int_equal(jint(json_object_get(b, "usage"), "completion_tokens"), (int)strlen("Hello STOQ world STOP"));
            done = 1;
        } else {
            assert_int_equal(cmd, PROTO_CMD_ACCEPTED);
        }
        json_decref(b);
    }
    assert_string_equal(streamed, final);
    assert_int_equal(n_tokens, (int)strlen("Hello STOQ world STOP"));
    assert_true(fw_wait(&w, &w.n_cancel, 1, WAIT_MS)); /* the worker was told to stop */

    /* not streaming, a stop string inside one token's text, and a partial stop at the end
     * that is released when the generation ends */
    script_chars(&w, d.tok, "abc zz");
    cl_send(cl, "generate", "{\"id\":\"s2\",\"prompt\":\"x\",\"max_tokens\":6,\"stop\":[\"zzz\"]}");
    result_t r;
    collect(cl, "s2", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "abc zz");
    assert_string_equal(jstr(r.last, "finish_reason"), "length");
    result_free(&r);

    /* a stop token id ends it with stop; its text is not in the output */
    script_chars(&w, d.tok, "abcdef");
    cl_send(cl, "generate", "{\"id\":\"s3\",\"prompt\":\"x\",\"max_tokens\":50,\"stop_token_ids\":[%d]}", w.script[3]);
    collect(cl, "s3", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "abc");
    assert_int_equal(r.n_tokens, 4);
    assert_string_equal(jstr(r.last, "finish_reason"), "stop");
    result_free(&r);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

static void test_cancel(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abcdefghijklmnopqrstuvwxyz");
    w.step_ms = 5;
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"c1\",\"prompt\":\"x\",\"max_tokens\":26,\"stream\":true}");
    /* wait for a first delta, then cancel */
    for (;;) {
        proto_cmd cmd;
        json_t *b;
        assert_int_equal(cl_recv(cl, &cmd, &b, WAIT_MS), 0);
        json_decref(b);
        if (cmd == PROTO_CMD_DELTA) break;
    }
    atomic_store(&w.hold, 1);
    cl_send(cl, "cancel", "{\"id\":\"c1\"}");
    double t0 = now_ms();
    int got = 0;
    while (!got && now_ms() - t0 < WAIT_MS) {
        proto_cmd cmd;
        json_t *b;
        assert_int_equal(cl_recv(cl, &cmd, &b, WAIT_MS), 0);
        if (cmd == PROTO_CMD_DONE) {
            assert_string_equal(jstr(b, "finish_reason"), "cancelled");
            got = 1;
        }
        json_decref(b);
    }
    assert_true(got);
    assert_true(fw_wait(&w, &w.n_cancel, 1, WAIT_MS));
    assert_true(fw_cancelled(&w, w.assign_rid[0]));
    /* again: not in flight any more */
    cl_send(cl, "cancel", "{\"id\":\"c1\"}");
    json_t *e = expect_error(cl, "not_found");
    assert_string_equal(jstr(e, "id"), "c1");
    assert_string_equal(jstr(e, "command"), "cancel");
    json_decref(e);

    /* duplicate ids and sessions in flight */
    cl_send(cl, "generate", "{\"id\":\"c2\",\"prompt\":\"x\",\"session\":\"s\"}");
    cl_send(cl, "generate", "{\"id\":\"c2\",\"prompt\":\"y\"}");
    e = expect_error(cl, "duplicate_id");
    json_decref(e);
    cl_send(cl, "generate", "{\"id\":\"c3\",\"prompt\":\"y\",\"session\":\"s\"}");
    e = expect_error(cl, "session_busy");
    assert_string_equal(jstr(e, "id"), "c3");
    json_decref(e);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

static void test_client_disappears(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abcdef");
    atomic_store(&w.hold, 1); /* nothing is sent to the client: only the disconnect tells */
    assert_int_equal(fw_start(&w), 1);
    for (int stream = 0; stream < 2; stream++) {
        void *cl = cl_open(&d);
        cl_send(cl, "generate", "{\"id\":\"g\",\"prompt\":\"x\",\"max_tokens\":6,\"stream\":%s}", stream ? "true" : "false");
        assert_true(fw_wait(&w, &w.n_assign, stream + 1, WAIT_MS));
        proto_cmd cmd;
        json_t *b;
        assert_int_equal(cl_recv(cl, &cmd, &b, WAIT_MS), 0);
        assert_int_equal(cmd, PROTO_CMD_ACCEPTED);
        json_decref(b);
        zmq_close(cl);
        assert_true(fw_wait(&w, &w.n_cancel, stream + 1, WAIT_MS));
        assert_true(fw_cancelled(&w, w.assign_rid[stream]));
    }
    void *cl = cl_open(&d);
    json_t *st = status_of(cl, "status");
    json_t *rq = json_object_get(st, "requests");
    assert_int_equal(jint(rq, "cancelled"), 2);
    assert_int_equal(jint(json_object_get(st, "queue"), "running"), 0);
    json_decref(st);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* A worker that stops talking: its request moves to the other worker. */
static void test_worker_dies_retry(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 100, "dead_after = 3", TWO_GROUPS);
    fw_t a, b;
    fw_init(&a, &d, "w-a");
    fw_init(&b, &d, "w-b");
    const char *text = "The quick brown fox jumps over the lazy dog";
    script_chars(&a, d.tok, text);
    script_chars(&b, d.tok, text);
    atomic_store(&a.mute_after, 10); /* a emits 10 tokens, then goes silent */
    atomic_store(&b.hold, 1);
    assert_int_equal(fw_start(&a), 1);
    assert_int_equal(fw_start(&b), 1);
    void *cl = cl_open(&d);
    atomic_store(&a.hold, 1);
    cl_send(cl, "generate", "{\"id\":\"d1\",\"prompt\":\"x\",\"max_tokens\":%d,\"stream\":true}", (int)strlen(text));
    assert_true(fw_wait(&a, &a.n_assign, 1, WAIT_MS)); /* the lower group id wins a tie */
    atomic_store(&b.hold, 0);
    atomic_store(&a.hold, 0);
    result_t r;
    collect(cl, "d1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_int_equal(jint(json_object_get(r.last, "usage"), "retries"), 1);
    assert_int_equal(b.n_assign, 1);
    assert_int_equal(b.assign_ngen[0], 10); /* the tokens already sent travel with the retry */
    assert_string_equal(r.text, text);
    assert_int_equal(r.n_tokens, (int)strlen(text));
    result_free(&r);
    json_t *st = status_of(cl, "status");
    json_t *ws = json_object_get(st, "workers");
    int dead = 0;
    for (size_t i = 0; i < json_array_size(ws); i++) dead += strcmp(jstr(json_array_get(ws, i), "state"), "dead") == 0;
    assert_int_equal(dead, 1);
    assert_int_equal(jint(json_object_get(st, "requests"), "retried"), 1);
    json_decref(st);

    /* now b dies too: nothing is left, the request fails with worker_lost */
    atomic_store(&b.mute_after, b.emitted + 3);
    cl_send(cl, "generate", "{\"id\":\"d2\",\"prompt\":\"x\",\"max_tokens\":%d}", (int)strlen(text));
    collect(cl, "d2", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_ERROR);
    assert_string_equal(jstr(r.last, "code"), "worker_lost");
    assert_string_equal(jstr(r.last, "id"), "d2");
    result_free(&r);
    json_t *h = status_of(cl, "health");
    assert_false(json_is_true(json_object_get(h, "ok")));
    assert_string_equal(jstr(h, "state"), "starting");
    json_decref(h);
    /* and new requests are refused at once */
    cl_send(cl, "generate", "{\"id\":\"d3\",\"prompt\":\"x\"}");
    json_t *e = expect_error(cl, "unavailable");
    assert_true(jint(e, "retry_after_ms") > 0);
    json_decref(e);
    zmq_close(cl);
    fw_stop(&a);
    fw_stop(&b);
    dd_stop(&d);
}

/* A retry that lands on the same worker gets a new rid: the old attempt's late `finished`
 * (cancelled) cannot end the new one. */
static void test_retry_same_worker_new_rid(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t a;
    fw_init(&a, &d, "w-a");
    const char *text = "retry on the same worker";
    script_chars(&a, d.tok, text);
    atomic_store(&a.fail_running, 1);
    assert_int_equal(fw_start(&a), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"s1\",\"prompt\":\"x\",\"max_tokens\":%d,\"stream\":true}", (int)strlen(text));
    result_t r;
    collect(cl, "s1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(jstr(r.last, "finish_reason"), "length");
    assert_int_equal(jint(json_object_get(r.last, "usage"), "retries"), 1);
    assert_string_equal(r.text, text);
    result_free(&r);
    pthread_mutex_lock(&a.mu);
    assert_int_equal(a.n_assign, 2);
    assert_true(a.assign_rid[1] != a.assign_rid[0]);
    assert_int_equal(a.assign_ngen[1], 1);
    pthread_mutex_unlock(&a.mu);
    zmq_close(cl);
    fw_stop(&a);
    dd_stop(&d);
}

/* A worker whose connection closes: duetd sees it at once and moves its request. */
static void test_worker_disconnects(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, TWO_GROUPS);
    fw_t a, b;
    fw_init(&a, &d, "w-a");
    fw_init(&b, &d, "w-b");
    script_chars(&b, d.tok, "ok");
    atomic_store(&a.hold, 1);
    assert_int_equal(fw_start(&a), 1);
    assert_int_equal(fw_start(&b), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"f1\",\"prompt\":\"x\",\"max_tokens\":2}");
    assert_true(fw_wait(&a, &a.n_assign, 1, WAIT_MS));
    /* kill a's connection: duetd sees the disconnect and moves the request */
    atomic_store(&a.quit, 1);
    pthread_join(a.th, NULL);
    result_t r;
    collect(cl, "f1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "ok");
    assert_int_equal(jint(json_object_get(r.last, "usage"), "retries"), 1);
    result_free(&r);
    zmq_close(cl);
    free(a.last_tokens);
    pthread_mutex_destroy(&a.mu);
    fw_stop(&b);
    dd_stop(&d);
}

/* A worker that answers `failed`: retryable goes elsewhere, otherwise a clear error. */
static void test_worker_failed(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, TWO_GROUPS);
    fw_t a, b;
    fw_init(&a, &d, "w-a");
    fw_init(&b, &d, "w-b");
    script_chars(&a, d.tok, "aa");
    script_chars(&b, d.tok, "bb");
    atomic_store(&a.fail_assign, 1);
    a.fail_retryable = 1;
    assert_int_equal(fw_start(&a), 1);
    assert_int_equal(fw_start(&b), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"f1\",\"prompt\":\"x\",\"max_tokens\":2}");
    result_t r;
    collect(cl, "f1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "bb");
    assert_int_equal(jint(json_object_get(r.last, "usage"), "retries"), 1);
    result_free(&r);
    /* not retryable: the client learns why */
    a.fail_retryable = 0; /* published by the atomic store */
    atomic_store(&a.fail_assign, 1);
    cl_send(cl, "generate", "{\"id\":\"f2\",\"prompt\":\"x\",\"max_tokens\":2}");
    collect(cl, "f2", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_ERROR);
    assert_string_equal(jstr(r.last, "code"), "internal");
    assert_non_null(strstr(jstr(r.last, "message"), "kv_full"));
    result_free(&r);
    zmq_close(cl);
    fw_stop(&a);
    fw_stop(&b);
    dd_stop(&d);
}

static void test_queue_busy(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, "when_full = busy", "[group a]\nrole = both\nmax_seqs = 1\n");
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abc");
    atomic_store(&w.hold, 1);
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"q1\",\"prompt\":\"x\",\"max_tokens\":3}");
    assert_true(fw_wait(&w, &w.n_assign, 1, WAIT_MS));
    cl_send(cl, "generate", "{\"id\":\"q2\",\"prompt\":\"x\",\"max_tokens\":3}");
    json_t *e = expect_error(cl, "busy");
    assert_string_equal(jstr(e, "id"), "q2");
    assert_true(jint(e, "retry_after_ms") > 0);
    json_decref(e);
    atomic_store(&w.hold, 0);
    result_t r;
    collect(cl, "q1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    result_free(&r);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

static void test_queue_wait(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, "when_full = wait\nqueue_limit = 1", "[group a]\nrole = both\nmax_seqs = 1\n");
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abc");
    atomic_store(&w.hold, 1);
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"q1\",\"prompt\":\"x\",\"max_tokens\":3}");
    assert_true(fw_wait(&w, &w.n_assign, 1, WAIT_MS));
    cl_send(cl, "generate", "{\"id\":\"q2\",\"prompt\":\"x\",\"max_tokens\":3}");
    cl_send(cl, "generate", "{\"id\":\"q3\",\"prompt\":\"x\",\"max_tokens\":3}");
    json_t *e = expect_error(cl, "busy"); /* q2 waits, q3 finds the queue full */
    assert_string_equal(jstr(e, "id"), "q3");
    json_decref(e);
    json_t *st = status_of(cl, "status");
    json_t *q = json_object_get(st, "queue");
    assert_int_equal(jint(q, "waiting"), 1);
    assert_int_equal(jint(q, "running"), 1);
    assert_int_equal(jint(q, "limit"), 1);
    json_decref(st);
    assert_int_equal(fw_count(&w, &w.n_assign), 1);
    atomic_store(&w.hold, 0);
    result_t r;
    collect(cl, "q1", &r, WAIT_MS); /* its accepted went by in expect_error */
    assert_int_equal(r.end, PROTO_CMD_DONE);
    result_free(&r);
    collect(cl, "q2", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "abc");
    assert_true(jnum(json_object_get(r.last, "timings"), "queue_ms") > 0);
    result_free(&r);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

static void test_limits(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, "max_tokens_limit = 100\nmax_tokens_default = 50", ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abc");
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    int n_ctx = coord_n_ctx(d.c), n_vocab = tok_n_vocab(d.tok);
    /* a prompt of n_ctx tokens */
    size_t cap = (size_t)n_ctx * 4 + 256;
    char *body = malloc(cap);
    size_t k = (size_t)snprintf(body, cap, "{\"id\":\"l1\",\"tokens\":[");
    for (int i = 0; i < n_ctx; i++) k += (size_t)snprintf(body + k, cap - k, "%s5", i ? "," : "");
    snprintf(body + k, cap - k, "]}");
    cl_raw(cl, 3, PROTO_CLIENT_TAG, "generate", body);
    free(body);
    json_t *e = expect_error(cl, "prompt_too_long");
    assert_string_equal(jstr(e, "id"), "l1");
    json_decref(e);
    /* prompt + max_tokens over the context */
    cl_send(cl, "generate", "{\"id\":\"l2\",\"prompt\":\"hello\",\"max_tokens\":%d}", n_ctx);
    e = expect_error(cl, n_ctx > 100 ? "bad_request" : "prompt_too_long"); /* over max_tokens_limit first */
    json_decref(e);
    /* a token outside the vocabulary */
    cl_send(cl, "generate", "{\"id\":\"l3\",\"tokens\":[1,%d]}", n_vocab);
    e = expect_error(cl, "bad_request");
    assert_non_null(strstr(jstr(e, "message"), "tokens[1]"));
    json_decref(e);
    /* the default max_tokens respects the limit */
    cl_send(cl, "generate", "{\"id\":\"l4\",\"prompt\":\"x\"}");
    result_t r;
    collect(cl, "l4", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_int_equal(r.max_tokens, 50);
    result_free(&r);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* A prompt that needs more KV than any group holds. */
static void test_prompt_over_kv(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    w.capacity = 2; /* 32 tokens */
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    char body[1024];
    size_t k = (size_t)snprintf(body, sizeof body, "{\"id\":\"k1\",\"max_tokens\":1,\"tokens\":[");
    for (int i = 0; i < 40; i++) k += (size_t)snprintf(body + k, sizeof body - k, "%s7", i ? "," : "");
    snprintf(body + k, sizeof body - k, "]}");
    cl_raw(cl, 3, PROTO_CLIENT_TAG, "generate", body);
    json_t *e = expect_error(cl, "prompt_too_long");
    assert_non_null(strstr(jstr(e, "message"), "KV"));
    json_decref(e);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

static void test_malformed(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "fine");
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    struct {
        int n;
        const char *f[5];
        const char *code;
    } cases[] = {
        {2, {PROTO_CLIENT_TAG, "status"}, "bad_frames"},
        {5, {PROTO_CLIENT_TAG, "status", "{}", "{}", "{}"}, "bad_frames"},
        {4, {"", PROTO_CLIENT_TAG, "status", "{}"}, "bad_frames"}, /* a REQ socket's delimiter */
        {3, {PROTO_WORKER_TAG, "status", "{}"}, "unknown_protocol"},
        {3, {"hello", "status", "{}"}, "unknown_protocol"},
        {3, {"duet.client/2", "status", "{}"}, "unsupported_version"},
        {3, {PROTO_CLIENT_TAG, "generat", "{}"}, "unknown_command"},
        {3, {PROTO_CLIENT_TAG, "done", "{}"}, "unexpected_command"},
        {3, {PROTO_CLIENT_TAG, "status", "{\"unterminated\": "}, "bad_json"},
        {3, {PROTO_CLIENT_TAG, "status", "[1, 2]"}, "bad_json"},
        {3, {PROTO_CLIENT_TAG, "status", ""}, "bad_json"},
        {3, {PROTO_CLIENT_TAG, "status", "{\"verbose\": true}"}, "bad_request"},
        {3, {PROTO_CLIENT_TAG, "generate", "{\"id\":\"m1\",\"prompt\":\"hi\",\"temperature\":0}"}, "bad_request"},
        {3, {PROTO_CLIENT_TAG, "generate", "{\"id\":\"m2\",\"prompt\":\"hi\",\"messages\":[]}"}, "bad_request"},
        {3, {PROTO_CLIENT_TAG, "generate", "{\"id\":\"m3\",\"prompt\":\"hi\",\"sampling\":{\"top_p\":1.5}}"}, "bad_request"},
        {3, {PROTO_CLIENT_TAG, "generate", "{\"id\":\"m4\",\"prompt\":\"x\",\"stop_token_ids\":[99999999]}"}, "bad_request"},
        {3, {PROTO_CLIENT_TAG, "generate", "{\"id\":\"m5\",\"prompt\":\"\"}"}, "bad_request"},
        {3, {PROTO_CLIENT_TAG, "cancel", "{}"}, "bad_request"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        for (int j = 0; j < cases[i].n; j++)
            assert_true(zmq_send(cl, cases[i].f[j], strlen(cases[i].f[j]), j + 1 < cases[i].n ? ZMQ_SNDMORE : 0) >= 0);
        json_t *b;
        proto_cmd cmd = next_reply(cl, &b);
        if (cmd != PROTO_CMD_ERROR || strcmp(jstr(b, "code"), cases[i].code) != 0)
            fail_msg("case %zu: expected %s, got %s %s", i, cases[i].code, proto_cmd_name(cmd), jstr(b, "code"));
        if (strncmp(cases[i].f[2] ? cases[i].f[2] : "", "{\"id\"", 5) == 0) assert_non_null(jstr(b, "id"));
        json_decref(b);
    }
    /* still serving */
    cl_send(cl, "generate", "{\"id\":\"ok\",\"prompt\":\"x\",\"max_tokens\":4}");
    result_t r;
    collect(cl, "ok", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "fine");
    result_free(&r);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* A client that never reads: its request is cancelled (slow_client), others go on. */
static void test_slow_client(void **state)
{
    (void)state;
    coord_opts o;
    coord_opts_default(&o);
    o.client_sndhwm = 2;
    o.client_sndbuf = 4096;
    dd_t d;
    dd_start_opts(&d, 1000, "client_buffer_bytes = 64KiB", ONE_GROUP, &o);
    fw_t w;
    fw_init(&w, &d, "w");
    /* the longest piece of the vocabulary makes big deltas */
    int32_t best = 0;
    size_t best_len = 0;
    for (int32_t id = 0; id < tok_n_vocab(d.tok); id++) {
        size_t len;
        if (tok_type_of(d.tok, id) != TOK_NORMAL || tok_is_eog(d.tok, id)) continue;
        const char *p = tok_piece(d.tok, id, &len);
        int ascii = 1;
        for (size_t i = 0; i < len; i++) ascii &= p[i] >= 0x20 && p[i] < 0x7f;
        if (ascii && len > best_len) {
            best = id;
            best_len = len;
        }
    }
    int n = coord_n_ctx(d.c) - 16;
    if (n > MAX_SCRIPT) n = MAX_SCRIPT;
    for (int i = 0; i < n; i++) w.script[i] = best;
    w.n_script = n;
    w.per_msg = 64;
    assert_int_equal(fw_start(&w), 1);
    void *slow = zmq_socket(d.zctx, ZMQ_DEALER);
    int one = 1, small = 1024;
    zmq_setsockopt(slow, ZMQ_RCVHWM, &one, sizeof one);
    zmq_setsockopt(slow, ZMQ_RCVBUF, &small, sizeof small);
    proto_socket_options(slow, PROTO_SIDE_CLIENT, 0);
    assert_int_equal(zmq_connect(slow, coord_client_endpoint(d.c)), 0);
    int n_req = 1 + (int)(3 * 65536 / ((size_t)n * (best_len + 6)));
    if (n_req > 16) n_req = 16;
    for (int i = 0; i < n_req; i++)
        cl_send(slow, "generate", "{\"id\":\"slow%d\",\"prompt\":\"x\",\"max_tokens\":%d,\"stream\":true,\"ignore_eos\":true}", i, n);
    /* another client is served meanwhile */
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"fast\",\"prompt\":\"x\",\"max_tokens\":300,\"stream\":true,\"ignore_eos\":true}");
    result_t r;
    collect(cl, "fast", &r, 20000);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_int_equal(r.n_tokens, 300);
    result_free(&r);
    /* the slow requests were cancelled at the worker */
    assert_true(fw_wait(&w, &w.n_cancel, 1, 20000));
    json_t *st = status_of(cl, "status");
    assert_true(jint(json_object_get(st, "requests"), "cancelled") >= 1);
    json_decref(st);
    /* the slow client reads now: its stream ends with slow_client */
    int saw = 0;
    double t0 = now_ms();
    while (!saw && now_ms() - t0 < 20000) {
        proto_cmd cmd;
        json_t *b;
        if (cl_recv(slow, &cmd, &b, 5000) != 0) break;
        if (cmd == PROTO_CMD_ERROR) {
            assert_string_equal(jstr(b, "code"), "slow_client");
            saw = 1;
        }
        json_decref(b);
    }
    assert_true(saw);
    zmq_close(slow);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* Routing: the group that holds the prompt's prefix, then the least loaded; sessions
 * stay on their group. */
static void test_routing(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, TWO_GROUPS);
    fw_t a, b;
    fw_init(&a, &d, "w-a");
    fw_init(&b, &d, "w-b");
    script_chars(&a, d.tok, "aa");
    script_chars(&b, d.tok, "bb");
    b.cached_tokens = 32;
    assert_int_equal(fw_start(&a), 1);
    assert_int_equal(fw_start(&b), 1);
    void *cl = cl_open(&d);
    char prompt[2048] = "";
    for (int i = 0; i < 60; i++) strcat(prompt, "lorem ipsum dolor sit amet ");
    /* a is busy: the first request goes to b (least load) */
    atomic_store(&a.hold, 1);
    cl_send(cl, "generate", "{\"id\":\"busy\",\"prompt\":\"x\",\"max_tokens\":2}");
    assert_true(fw_wait(&a, &a.n_assign, 1, WAIT_MS));
    cl_send(cl, "generate", "{\"id\":\"p1\",\"prompt\":\"%s\",\"max_tokens\":2}", prompt);
    result_t r;
    collect(cl, "p1", &r, WAIT_MS);
    assert_string_equal(r.text, "bb");
    result_free(&r);
    atomic_store(&a.hold, 0);
    collect(cl, "busy", &r, WAIT_MS);
    assert_string_equal(r.text, "aa");
    result_free(&r);
    /* both idle: the same prompt goes where its prefix is (b), not to the lower id */
    cl_send(cl, "generate", "{\"id\":\"p2\",\"prompt\":\"%s\",\"max_tokens\":2}", prompt);
    collect(cl, "p2", &r, WAIT_MS);
    assert_string_equal(r.text, "bb");
    assert_int_equal(jint(json_object_get(r.last, "usage"), "cached_prompt_tokens"), 32);
    result_free(&r);
    /* another prompt: tie on prefix and load, lowest group id (a) */
    cl_send(cl, "generate", "{\"id\":\"p3\",\"prompt\":\"something else entirely\",\"max_tokens\":2}");
    collect(cl, "p3", &r, WAIT_MS);
    assert_string_equal(r.text, "aa");
    result_free(&r);
    /* a session sticks to its group */
    cl_send(cl, "generate", "{\"id\":\"s1\",\"prompt\":\"x\",\"max_tokens\":2,\"session\":\"conv\"}");
    collect(cl, "s1", &r, WAIT_MS);
    char first[8];
    snprintf(first, sizeof first, "%.7s", r.text);
    result_free(&r);
    for (int i = 0; i < 3; i++) {
        cl_send(cl, "generate", "{\"id\":\"s%d\",\"prompt\":\"y%d\",\"max_tokens\":2,\"session\":\"conv\"}", i + 2, i);
        char id[16];
        snprintf(id, sizeof id, "s%d", i + 2);
        collect(cl, id, &r, WAIT_MS);
        assert_string_equal(r.text, first);
        result_free(&r);
    }
    fw_t *sw = first[0] == 'a' ? &a : &b;
    pthread_mutex_lock(&sw->mu);
    assert_string_equal(sw->last_session, "conv");
    pthread_mutex_unlock(&sw->mu);
    /* status: the prefix cache's hit rate from the workers' reports */
    json_t *st = status_of(cl, "status");
    json_t *pc = json_object_get(st, "prefix_cache");
    assert_true(jint(pc, "cached_tokens") >= 32);
    assert_true(jnum(pc, "hit_rate") > 0 && jnum(pc, "hit_rate") <= 1);
    assert_int_equal(jint(json_object_get(st, "requests"), "served"), 8);
    json_decref(st);
    zmq_close(cl);
    fw_stop(&a);
    fw_stop(&b);
    dd_stop(&d);
}

/* Drain: no new requests, running ones finish, then coord_run returns 0. */
static void test_drain(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abcd");
    atomic_store(&w.hold, 1);
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"r\",\"prompt\":\"x\",\"max_tokens\":4}");
    assert_true(fw_wait(&w, &w.n_assign, 1, WAIT_MS));
    coord_signal(d.c, COORD_SIG_DRAIN);
    json_t *h = status_of(cl, "health");
    assert_string_equal(jstr(h, "state"), "draining");
    assert_false(json_is_true(json_object_get(h, "ok")));
    json_decref(h);
    cl_send(cl, "generate", "{\"id\":\"late\",\"prompt\":\"x\"}");
    json_t *e = expect_error(cl, "shutting_down");
    json_decref(e);
    atomic_store(&w.hold, 0);
    result_t r;
    collect(cl, "r", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    assert_string_equal(r.text, "abcd");
    result_free(&r);
    assert_int_equal(dd_join(&d), 0);
    assert_non_null(strstr(d.notes, "STOPPING=1"));
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* A drain that runs out of time cancels what is left. */
static void test_drain_timeout(void **state)
{
    (void)state;
    coord_opts o;
    coord_opts_default(&o);
    o.drain_timeout_ms = 100;
    dd_t d;
    dd_start_opts(&d, 1000, NULL, ONE_GROUP, &o);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "abcd");
    atomic_store(&w.hold, 1);
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"r\",\"prompt\":\"x\",\"max_tokens\":4}");
    assert_true(fw_wait(&w, &w.n_assign, 1, WAIT_MS));
    coord_signal(d.c, COORD_SIG_DRAIN);
    result_t r;
    collect(cl, "r", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_ERROR);
    assert_string_equal(jstr(r.last, "code"), "cancelled");
    result_free(&r);
    assert_int_equal(dd_join(&d), 0);
    assert_true(fw_wait(&w, &w.n_cancel, 1, WAIT_MS));
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* SIGHUP: reloadable keys apply (RELOADING=1 then READY=1); others are refused whole. */
static void test_reload(void **state)
{
    (void)state;
    char dir[] = "/tmp/duetd_reload_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[256], err[4096];
    snprintf(path, sizeof path, "%s/duet.conf", dir);
    const char *fmt = "[model]\npath = %s\n[daemon]\nheartbeat_ms = %d\nqueue_limit = %d\n" ONE_GROUP;
    FILE *f = fopen(path, "w");
    fprintf(f, fmt, g_model, 1000, 7);
    fclose(f);
    duet_config *cfg = NULL;
    assert_int_equal(config_load(path, &cfg, err, sizeof err), 0);
    dd_t d;
    dd_start_cfg(&d, 1000, cfg, NULL);
    void *cl = cl_open(&d);
    json_t *st = status_of(cl, "status");
    assert_int_equal(jint(json_object_get(st, "queue"), "limit"), 7);
    json_decref(st);
    f = fopen(path, "w");
    fprintf(f, fmt, g_model, 1000, 9);
    fclose(f);
    coord_signal(d.c, COORD_SIG_RELOAD);
    st = status_of(cl, "status");
    assert_int_equal(jint(json_object_get(st, "queue"), "limit"), 9);
    json_decref(st);
    pthread_mutex_lock(&d.mu);
    assert_non_null(strstr(d.notes, "RELOADING=1"));
    assert_non_null(strstr(strstr(d.notes, "RELOADING=1"), "READY=1"));
    pthread_mutex_unlock(&d.mu);
    /* heartbeat_ms needs a restart: nothing of this file applies */
    f = fopen(path, "w");
    fprintf(f, fmt, g_model, 900, 11);
    fclose(f);
    coord_signal(d.c, COORD_SIG_RELOAD);
    st = status_of(cl, "status");
    assert_int_equal(jint(json_object_get(st, "queue"), "limit"), 9);
    json_decref(st);
    /* a broken file changes nothing either */
    f = fopen(path, "w");
    fprintf(f, "[model]\npath = %s\n[daemon]\nqueue_limit = many\n" ONE_GROUP, g_model);
    fclose(f);
    coord_signal(d.c, COORD_SIG_RELOAD);
    json_t *h = status_of(cl, "health");
    json_decref(h);
    zmq_close(cl);
    dd_stop(&d);
    unlink(path);
    rmdir(dir);
}

/* Requests in flight per connection are bounded (busy beyond). */
static void test_inflight_limit(void **state)
{
    (void)state;
    coord_opts o;
    coord_opts_default(&o);
    o.max_inflight_per_client = 2;
    dd_t d;
    dd_start_opts(&d, 1000, NULL, ONE_GROUP, &o);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "ab");
    atomic_store(&w.hold, 1);
    assert_int_equal(fw_start(&w), 1);
    void *cl = cl_open(&d), *other = cl_open(&d);
    cl_send(cl, "generate", "{\"id\":\"i1\",\"prompt\":\"x\",\"max_tokens\":2}");
    cl_send(cl, "generate", "{\"id\":\"i2\",\"prompt\":\"x\",\"max_tokens\":2}");
    cl_send(cl, "generate", "{\"id\":\"i3\",\"prompt\":\"x\",\"max_tokens\":2}");
    json_t *e = expect_error(cl, "busy");
    assert_string_equal(jstr(e, "id"), "i3");
    json_decref(e);
    /* another connection has its own budget */
    cl_send(other, "generate", "{\"id\":\"i1\",\"prompt\":\"x\",\"max_tokens\":2}");
    atomic_store(&w.hold, 0);
    result_t r;
    collect(other, "i1", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    result_free(&r);
    collect(cl, "i2", &r, WAIT_MS);
    assert_int_equal(r.end, PROTO_CMD_DONE);
    result_free(&r);
    zmq_close(cl);
    zmq_close(other);
    fw_stop(&w);
    dd_stop(&d);
}

/* Many concurrent streams through one worker: every stream is complete and in order;
 * prints the rate duetd relays tokens at (one token per delta). */
static void test_many_streams(void **state)
{
    (void)state;
    dd_t d;
    dd_start(&d, 1000, NULL, ONE_GROUP);
    fw_t w;
    fw_init(&w, &d, "w");
    script_chars(&w, d.tok, "The quick brown fox jumps over the lazy dog. ");
    int len = w.n_script;
    for (int i = len; i < 256; i++) w.script[i] = w.script[i % len];
    w.n_script = 256;
    w.step_ms = 0;
    atomic_store(&w.hold, 1);
    assert_int_equal(fw_start(&w), 1);
    enum { N = 32 };
    void *cl = cl_open(&d);
    for (int i = 0; i < N; i++)
        cl_send(cl, "generate", "{\"id\":\"m%d\",\"prompt\":\"x\",\"max_tokens\":256,\"stream\":true,\"ignore_eos\":true}", i);
    assert_true(fw_wait(&w, &w.n_assign, N, WAIT_MS));
    double t0 = now_ms();
    atomic_store(&w.hold, 0);
    int done = 0, tokens[N] = {0}, deltas = 0;
    while (done < N) {
        proto_cmd cmd;
        json_t *b;
        assert_int_equal(cl_recv(cl, &cmd, &b, WAIT_MS), 0);
        int i = atoi(jstr(b, "id") + 1);
        if (cmd == PROTO_CMD_DELTA) {
            assert_int_equal(jint(b, "index"), tokens[i]);
            tokens[i] += (int)json_array_size(json_object_get(b, "token_ids"));
            deltas++;
        } else if (cmd == PROTO_CMD_DONE) {
            assert_int_equal(tokens[i], 256);
            assert_int_equal(jint(json_object_get(b, "usage"), "completion_tokens"), 256);
            done++;
        }
        json_decref(b);
    }
    double ms = now_ms() - t0;
    printf("[ duetd    ] %d streams x 256 tokens in %.0f ms: %.0f tokens/s relayed in %d deltas\n", N, ms,
           N * 256 / (ms / 1e3), deltas);
    zmq_close(cl);
    fw_stop(&w);
    dd_stop(&d);
}

/* ---- the program --------------------------------------------------------------------------------------- */

static int run_duetd(const char *args, char *out, size_t cap)
{
    const char *build = getenv("BUILD");
    char bin[512], cmd[2048];
    snprintf(bin, sizeof bin, "%s/bin/duetd", build && *build ? build : "build");
    if (access(bin, X_OK) != 0) return -2;
    snprintf(cmd, sizeof cmd, "%s %s 2>&1", bin, args);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static void test_check_config(void **state)
{
    (void)state;
    char dir[] = "/tmp/duetd_cfg_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char good[256], bad[256], out[8192], args[600];
    snprintf(good, sizeof good, "%s/good.conf", dir);
    snprintf(bad, sizeof bad, "%s/bad.conf", dir);
    FILE *f = fopen(good, "w");
    fprintf(f, "[model]\npath = %s\n[daemon]\nqueue_limit = 8\n[group main]\nrole = both\n", g_model);
    fclose(f);
    f = fopen(bad, "w");
    fprintf(f, "[model]\npath = %s\n[daemon]\nqueue_limt = 8\nheartbeat_ms = 5\n[group main]\nrole = sideways\n", g_model);
    fclose(f);
    snprintf(args, sizeof args, "--check-config %s", good);
    int rc = run_duetd(args, out, sizeof out);
    if (rc == -2) {
        printf("skip: no duetd binary under $BUILD/bin\n");
        unlink(good);
        unlink(bad);
        rmdir(dir);
        skip();
    }
    assert_int_equal(rc, 0);
    assert_string_equal(out, "ok\n");
    snprintf(args, sizeof args, "--check-config %s", bad);
    assert_int_equal(run_duetd(args, out, sizeof out), 1);
    assert_non_null(strstr(out, "bad.conf:4: [daemon] queue_limt"));
    assert_non_null(strstr(out, "bad.conf:5: [daemon] heartbeat_ms"));
    assert_non_null(strstr(out, "bad.conf:7: [group main] role"));
    snprintf(args, sizeof args, "--config %s --dump-config", good);
    assert_int_equal(run_duetd(args, out, sizeof out), 0);
    assert_non_null(strstr(out, "queue_limit = 8"));
    assert_int_equal(run_duetd("--bogus", out, sizeof out), 2);
    unlink(good);
    unlink(bad);
    rmdir(dir);
}

/* ---- setup ---------------------------------------------------------------------------------------------- */

static int group_setup(void **state)
{
    (void)state;
    g_log = getenv("DUETD_TEST_LOG") && atoi(getenv("DUETD_TEST_LOG")) > 0;
    if (access(DEFAULT_MODEL, R_OK) == 0) {
        snprintf(g_model, sizeof g_model, "%s", DEFAULT_MODEL);
    } else {
        snprintf(g_tmpdir, sizeof g_tmpdir, "/tmp/duetd_test_XXXXXX");
        if (!mkdtemp(g_tmpdir)) return -1;
        snprintf(g_model, sizeof g_model, "%s/tiny.gguf", g_tmpdir);
        mkmodel_opts o;
        mkmodel_defaults(&o);
        o.n_layer = 1;
        char err[512];
        if (mkmodel_write(&o, g_model, err, sizeof err) != 0) {
            fprintf(stderr, "mkmodel: %s\n", err);
            return -1;
        }
        printf("note: %s is missing; using a tiny model\n", DEFAULT_MODEL);
    }
    gguf_t *g = NULL;
    char err[512];
    if (gguf_open(g_model, &g, err, sizeof err) != 0) return -1;
    char *arch = gguf_get_str_dup(g, "general.architecture");
    char key[128];
    snprintf(key, sizeof key, "%s.attention.head_count_kv", arch ? arch : "llama");
    int64_t v;
    if (gguf_get_int(g, key, &v) == GGUF_OK) g_n_head_kv = (int)v;
    free(arch);
    gguf_close(&g);
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    if (g_tmpdir[0]) {
        unlink(g_model);
        rmdir(g_tmpdir);
    }
    return 0;
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_register),
        cmocka_unit_test(test_worker_protocol_errors),
        cmocka_unit_test(test_generate_stream),
        cmocka_unit_test(test_stop_strings),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_client_disappears),
        cmocka_unit_test(test_worker_dies_retry),
        cmocka_unit_test(test_worker_disconnects),
        cmocka_unit_test(test_worker_failed),
        cmocka_unit_test(test_retry_same_worker_new_rid),
        cmocka_unit_test(test_queue_busy),
        cmocka_unit_test(test_queue_wait),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_prompt_over_kv),
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_slow_client),
        cmocka_unit_test(test_routing),
        cmocka_unit_test(test_drain),
        cmocka_unit_test(test_drain_timeout),
        cmocka_unit_test(test_many_streams),
        cmocka_unit_test(test_reload),
        cmocka_unit_test(test_inflight_limit),
        cmocka_unit_test(test_check_config),
    };
    const char *filter = getenv("DUETD_TEST_FILTER"); /* e.g. test_cancel, or test_w* */
    if (filter && *filter) cmocka_set_test_filter(filter);
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
