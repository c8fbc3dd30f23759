/* client/libduet.c: the C client of duetd (see libduet.h). Framing, schemas and the
 * canonical JSON come from daemon/proto; this file keeps the request table, sorts
 * replies by id, checks their order and accumulates results. */
#include "client/libduet.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#include "daemon/proto.h"

/* The protocol's codes keep their numbers in the public header. */
#define SAME(D, P) _Static_assert((int)DUET_E_##D == (int)PROTO_ERR_##P, #D)
SAME(BAD_FRAMES, BAD_FRAMES);
SAME(UNKNOWN_PROTOCOL, UNKNOWN_PROTOCOL);
SAME(UNSUPPORTED_VERSION, UNSUPPORTED_VERSION);
SAME(UNKNOWN_COMMAND, UNKNOWN_COMMAND);
SAME(UNEXPECTED_COMMAND, UNEXPECTED_COMMAND);
SAME(BAD_JSON, BAD_JSON);
SAME(TOO_LARGE, TOO_LARGE);
SAME(BAD_REQUEST, BAD_REQUEST);
SAME(DUPLICATE_ID, DUPLICATE_ID);
SAME(PROMPT_TOO_LONG, PROMPT_TOO_LONG);
SAME(BUSY, BUSY);
SAME(SESSION_BUSY, SESSION_BUSY);
SAME(UNAVAILABLE, UNAVAILABLE);
SAME(NOT_FOUND, NOT_FOUND);
SAME(CANCELLED, CANCELLED);
SAME(SHUTTING_DOWN, SHUTTING_DOWN);
SAME(WORKER_LOST, WORKER_LOST);
SAME(SLOW_CLIENT, SLOW_CLIENT);
SAME(INTERNAL, INTERNAL);
#undef SAME
_Static_assert((int)DUET_FINISH_STOP == (int)PROTO_FINISH_STOP &&
                   (int)DUET_FINISH_LENGTH == (int)PROTO_FINISH_LENGTH &&
                   (int)DUET_FINISH_EOS == (int)PROTO_FINISH_EOS &&
                   (int)DUET_FINISH_CANCELLED == (int)PROTO_FINISH_CANCELLED,
               "finish reasons");

#define POLL_SLICE_MS 1000 /* longest single wait when waiting without limit */

enum { RS_SENT = 0, RS_ACCEPTED, RS_DONE, RS_FAILED };
enum { Q_STATUS = 0, Q_HEALTH = 1 };

/* One queued event (queued mode). DONE and ERROR point at the request's result/error. */
typedef struct ev_node {
    struct ev_node *next;
    duet_event_kind kind;
    int prompt_tokens, max_tokens;
    int64_t seed;
    int index;
    char *text; /* owned */
    size_t text_len;
    int32_t *ids; /* owned [n_ids] */
    int n_ids;
} ev_node;

struct duet_request {
    duet_client *c; /* NULL once the client is destroyed */
    char id[PROTO_MAX_ID + 1];
    int stream;
    int state;        /* RS_* */
    int cancel_sent;  /* a cancel went out */
    int end_returned; /* duet_next/duet_wait returned the last event */
    duet_event_fn cb;
    void *user;
    char *text; /* accumulated completion, NUL-terminated [text_len + 1] */
    size_t text_len, text_cap;
    int32_t *ids; /* accumulated token ids [n_ids] */
    int n_ids;
    size_t ids_cap;
    duet_result result;
    duet_error error;
    ev_node *head, *tail; /* queued events */
    ev_node *cur;         /* the event duet_next returned last (freed at the next call) */
};

struct duet_client {
    void *zctx, *sock;
    char *endpoint;
    duet_request **reqs; /* every handle not yet freed [n_reqs] */
    int n_reqs;
    size_t cap_reqs;
    unsigned long long next_id;
    int waiting[2];      /* a status/health call waits for its reply */
    json_t *reply[2];    /* that reply, once arrived */
    int reply_failed[2]; /* ... or its error */
    duet_error reply_err[2];
    long n_bad;          /* malformed replies that named no request */
    char last_bad[256];  /* the last one */
};

/* ---- errors ------------------------------------------------------------------------------ */

const char *duet_code_name(duet_code code)
{
    switch (code) {
    case DUET_OK: return "ok";
    case DUET_E_TIMEOUT: return "timeout";
    case DUET_E_UNREACHABLE: return "unreachable";
    case DUET_E_BAD_REPLY: return "bad_reply";
    case DUET_E_SYSTEM: return "system";
    case DUET_E_USAGE: return "usage";
    case DUET_E_INTERRUPTED: return "interrupted";
    default: break;
    }
    if ((int)code > 0 && (int)code <= (int)PROTO_ERR_INTERNAL) return proto_code_name((proto_code)code);
    return "";
}

const char *duet_finish_name(duet_finish f)
{
    return proto_finish_name((proto_finish)f);
}

__attribute__((format(printf, 3, 4))) static duet_code seterr(duet_error *err, duet_code code,
                                                              const char *fmt, ...)
{
    if (!err) return code;
    memset(err, 0, sizeof *err);
    err->code = code;
    snprintf(err->code_name, sizeof err->code_name, "%s", duet_code_name(code));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return code;
}

static void copy_err(duet_error *dst, const duet_error *src)
{
    if (dst && dst != src) *dst = *src;
}

/* A ZeroMQ failure with errno e while doing what. */
static duet_code zmq_fail(duet_client *c, duet_error *err, int e, const char *what)
{
    if (e == EINTR) return seterr(err, DUET_E_INTERRUPTED, "%s: interrupted by a signal", what);
    if (e == EAGAIN)
        return seterr(err, DUET_E_UNREACHABLE,
                      "%s: no connection to duetd at %s (send timed out)", what, c->endpoint);
    return seterr(err, DUET_E_SYSTEM, "%s: %s", what, zmq_strerror(e));
}

/* ---- small helpers ------------------------------------------------------------------------ */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* 1 when s[n] is well-formed UTF-8 without NULs (what JSON strings of the protocol need). */
static int utf8_ok(const char *s)
{
    const unsigned char *p = (const unsigned char *)s;
    while (*p) {
        unsigned c = *p;
        int n = c < 0x80 ? 0 : (c & 0xe0) == 0xc0 ? 1 : (c & 0xf0) == 0xe0 ? 2 : (c & 0xf8) == 0xf0 ? 3 : -1;
        if (n < 0 || (n == 1 && c < 0xc2) || (n == 3 && c > 0xf4)) return 0;
        unsigned cp = n == 0 ? c : c & (0x3f >> n);
        for (int i = 1; i <= n; i++) {
            if ((p[i] & 0xc0) != 0x80) return 0;
            cp = (cp << 6) | (p[i] & 0x3f);
        }
        if ((n == 2 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) || (n == 3 && (cp < 0x10000 || cp > 0x10ffff)))
            return 0;
        p += n + 1;
    }
    return 1;
}

static int grow(void **buf, size_t *cap, size_t need, size_t elt)
{
    if (need <= *cap) return 0;
    size_t n = *cap ? *cap : 16;
    while (n < need) n *= 2;
    void *b = realloc(*buf, n * elt);
    if (!b) return -1;
    *buf = b;
    *cap = n;
    return 0;
}

/* ---- connection ---------------------------------------------------------------------------- */

void duet_options_init(duet_options *o)
{
    if (!o) return;
    o->send_timeout_ms = PROTO_SEND_TIMEOUT_MS;
    o->heartbeat_ms = 0;
}

duet_code duet_connect(const char *endpoint, const duet_options *opts, duet_client **out,
                       duet_error *err)
{
    if (!out) return seterr(err, DUET_E_USAGE, "duet_connect: out is NULL");
    *out = NULL;
    if (!endpoint) endpoint = DUET_DEFAULT_ENDPOINT;
    duet_options o;
    duet_options_init(&o);
    if (opts) o = *opts;
    if (o.send_timeout_ms < 0 || o.heartbeat_ms < 0)
        return seterr(err, DUET_E_USAGE, "duet_connect: negative send_timeout_ms or heartbeat_ms");
    if (strlen(endpoint) > PROTO_MAX_ENDPOINT)
        return seterr(err, DUET_E_USAGE, "duet_connect: endpoint of %zu bytes (at most %d)",
                      strlen(endpoint), PROTO_MAX_ENDPOINT);
    duet_client *c = calloc(1, sizeof *c);
    if (!c || !(c->endpoint = strdup(endpoint))) {
        free(c);
        return seterr(err, DUET_E_SYSTEM, "duet_connect: out of memory");
    }
    duet_code rc = DUET_OK;
    if (!(c->zctx = zmq_ctx_new())) {
        rc = seterr(err, DUET_E_SYSTEM, "duet_connect: zmq_ctx_new: %s", zmq_strerror(errno));
        goto fail;
    }
    if (!(c->sock = zmq_socket(c->zctx, ZMQ_DEALER)) ||
        proto_socket_options(c->sock, PROTO_SIDE_CLIENT, o.heartbeat_ms) != 0 ||
        zmq_setsockopt(c->sock, ZMQ_SNDTIMEO, &o.send_timeout_ms, sizeof o.send_timeout_ms) != 0) {
        rc = seterr(err, DUET_E_SYSTEM, "duet_connect: socket: %s", zmq_strerror(errno));
        goto fail;
    }
    if (zmq_connect(c->sock, endpoint) != 0) {
        rc = seterr(err, DUET_E_USAGE, "duet_connect: cannot connect to '%s': %s", endpoint,
                    zmq_strerror(errno));
        goto fail;
    }
    *out = c;
    return DUET_OK;
fail:
    duet_destroy(&c);
    return rc;
}

const char *duet_endpoint(const duet_client *c)
{
    return c ? c->endpoint : "";
}

/* ---- requests: table, queue, ending -------------------------------------------------------- */

static duet_request *find_active(duet_client *c, const char *id)
{
    for (int i = 0; i < c->n_reqs; i++) {
        duet_request *r = c->reqs[i];
        if (r->state < RS_DONE && strcmp(r->id, id) == 0) return r;
    }
    return NULL;
}

static void node_free(ev_node *n)
{
    if (!n) return;
    free(n->text);
    free(n->ids);
    free(n);
}

static void fill_event(const duet_request *r, const ev_node *n, duet_event *ev)
{
    memset(ev, 0, sizeof *ev);
    ev->kind = n->kind;
    ev->id = r->id;
    ev->prompt_tokens = n->prompt_tokens;
    ev->max_tokens = n->max_tokens;
    ev->seed = n->seed;
    ev->index = n->index;
    ev->text = n->text ? n->text : "";
    ev->text_len = n->text_len;
    ev->token_ids = n->ids;
    ev->n_token_ids = n->n_ids;
    if (n->kind == DUET_EVENT_DONE) ev->result = &r->result;
    if (n->kind == DUET_EVENT_ERROR) ev->error = &r->error;
}

/* Hand n (taken) to the request: its callback (then n is freed) or its queue. */
static void deliver(duet_request *r, ev_node *n)
{
    if (r->cb) {
        duet_event ev;
        fill_event(r, n, &ev);
        node_free(n);
        r->cb(r, &ev, r->user);
        return;
    }
    if (r->tail)
        r->tail->next = n;
    else
        r->head = n;
    r->tail = n;
}

/* A node for an event without text (accepted, done, error), or NULL when out of memory:
 * the event is then lost to duet_next, but the request's state still ends it (duet_wait,
 * duet_request_finished). */
static ev_node *node_new(duet_event_kind kind)
{
    ev_node *n = calloc(1, sizeof *n);
    if (n) n->kind = kind;
    return n;
}

static void send_cancel(duet_request *r, int flags)
{
    if (!r->c || r->cancel_sent) return;
    proto_cancel m = {.id = r->id};
    if (proto_send_body(r->c->sock, NULL, PROTO_CLIENT, PROTO_CMD_CANCEL, PROTO_T_CANCEL, &m, flags) == 0)
        r->cancel_sent = 1;
}

/* End r with an error (from duetd, or found here). */
static void end_error(duet_request *r, const duet_error *e)
{
    r->error = *e;
    snprintf(r->error.id, sizeof r->error.id, "%s", r->id);
    r->state = RS_FAILED;
    ev_node *n = node_new(DUET_EVENT_ERROR);
    if (n) deliver(r, n);
}

__attribute__((format(printf, 3, 4))) static void end_local(duet_request *r, duet_code code,
                                                            const char *fmt, ...)
{
    duet_error e;
    memset(&e, 0, sizeof e);
    e.code = code;
    snprintf(e.code_name, sizeof e.code_name, "%s", duet_code_name(code));
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    if (code == DUET_E_BAD_REPLY) send_cancel(r, ZMQ_DONTWAIT); /* duetd may still be generating */
    end_error(r, &e);
}

/* ---- receiving ------------------------------------------------------------------------------- */

__attribute__((format(printf, 2, 3))) static void note_bad(duet_client *c, const char *fmt, ...)
{
    c->n_bad++;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->last_bad, sizeof c->last_bad, fmt, ap);
    va_end(ap);
}

static void on_accepted(duet_client *c, const proto_accepted *a)
{
    duet_request *r = find_active(c, a->id);
    if (!r) return;
    if (r->state != RS_SENT) {
        end_local(r, DUET_E_BAD_REPLY, "duetd sent a second 'accepted' for request '%s'", r->id);
        return;
    }
    r->state = RS_ACCEPTED;
    r->result.prompt_tokens = a->prompt_tokens;
    r->result.max_tokens = a->max_tokens;
    r->result.seed = a->seed;
    ev_node *n = node_new(DUET_EVENT_ACCEPTED);
    if (!n) return;
    n->prompt_tokens = a->prompt_tokens;
    n->max_tokens = a->max_tokens;
    n->seed = a->seed;
    deliver(r, n);
}

static int append(duet_request *r, const char *text, size_t len, const int32_t *ids, int n_ids)
{
    if (grow((void **)&r->text, &r->text_cap, r->text_len + len + 1, 1) ||
        grow((void **)&r->ids, &r->ids_cap, (size_t)r->n_ids + (size_t)n_ids, sizeof *r->ids))
        return -1;
    memcpy(r->text + r->text_len, text, len);
    r->text_len += len;
    r->text[r->text_len] = '\0';
    if (n_ids) memcpy(r->ids + r->n_ids, ids, (size_t)n_ids * sizeof *ids);
    r->n_ids += n_ids;
    return 0;
}

static void on_delta(duet_client *c, const proto_delta *d)
{
    duet_request *r = find_active(c, d->id);
    if (!r) return;
    if (!r->stream) {
        end_local(r, DUET_E_BAD_REPLY, "duetd sent a 'delta' for request '%s', which is not streamed", r->id);
        return;
    }
    if (r->state != RS_ACCEPTED) {
        end_local(r, DUET_E_BAD_REPLY, "duetd sent a 'delta' for request '%s' before 'accepted'", r->id);
        return;
    }
    if (d->index != r->n_ids) {
        end_local(r, DUET_E_BAD_REPLY,
                  "duetd sent a 'delta' for request '%s' at index %d; expected %d (deltas are contiguous)",
                  r->id, d->index, r->n_ids);
        return;
    }
    size_t len = strlen(d->text);
    ev_node *n = r->cb ? NULL : calloc(1, sizeof *n);
    if (append(r, d->text, len, d->token_ids, d->n_token_ids) != 0 ||
        (!r->cb && (!n || !(n->text = malloc(len + 1)) ||
                    (d->n_token_ids && !(n->ids = malloc((size_t)d->n_token_ids * sizeof *n->ids)))))) {
        node_free(n);
        end_local(r, DUET_E_SYSTEM, "request '%s': out of memory storing a delta", r->id);
        return;
    }
    if (r->cb) {
        duet_event ev = {.kind = DUET_EVENT_DELTA, .id = r->id, .index = d->index, .text = d->text,
                         .text_len = len, .token_ids = d->token_ids, .n_token_ids = d->n_token_ids};
        r->cb(r, &ev, r->user);
        return;
    }
    n->kind = DUET_EVENT_DELTA;
    n->index = d->index;
    memcpy(n->text, d->text, len + 1);
    n->text_len = len;
    if (d->n_token_ids) memcpy(n->ids, d->token_ids, (size_t)d->n_token_ids * sizeof *n->ids);
    n->n_ids = d->n_token_ids;
    deliver(r, n);
}

static void on_done(duet_client *c, const proto_done *d)
{
    duet_request *r = find_active(c, d->id);
    if (!r) return;
    if (r->state != RS_ACCEPTED) {
        end_local(r, DUET_E_BAD_REPLY, "duetd sent 'done' for request '%s' before 'accepted'", r->id);
        return;
    }
    if (!r->stream && append(r, d->text ? d->text : "", d->text ? strlen(d->text) : 0, d->token_ids,
                             d->n_token_ids) != 0) {
        end_local(r, DUET_E_SYSTEM, "request '%s': out of memory storing the result", r->id);
        return;
    }
    if (!r->text && append(r, "", 0, NULL, 0) != 0) {
        end_local(r, DUET_E_SYSTEM, "request '%s': out of memory storing the result", r->id);
        return;
    }
    r->state = RS_DONE;
    duet_result *res = &r->result;
    res->id = r->id;
    res->finish_reason = (duet_finish)d->finish_reason;
    res->text = r->text;
    res->text_len = r->text_len;
    res->token_ids = r->ids;
    res->n_token_ids = r->n_ids;
    res->usage = (duet_usage){d->usage.prompt_tokens, d->usage.cached_prompt_tokens,
                              d->usage.completion_tokens, d->usage.retries};
    res->timings = (duet_timings){d->timings.queue_ms, d->timings.ttft_ms, d->timings.tpot_ms_mean,
                                  d->timings.total_ms};
    ev_node *n = node_new(DUET_EVENT_DONE);
    if (n) deliver(r, n);
}

/* duetd's error body as a duet_error; raw_code: the code's name on the wire. */
static void from_proto_error(const proto_error *pe, const char *raw_code, duet_error *e)
{
    memset(e, 0, sizeof *e);
    int known = pe->code > PROTO_ERR_NONE && pe->code <= PROTO_ERR_INTERNAL;
    e->code = known ? (duet_code)pe->code : DUET_E_INTERNAL;
    snprintf(e->code_name, sizeof e->code_name, "%s", raw_code ? raw_code : duet_code_name(e->code));
    snprintf(e->message, sizeof e->message, "%s", pe->message ? pe->message : "");
    snprintf(e->id, sizeof e->id, "%s", pe->id ? pe->id : "");
    e->retry_after_ms = pe->retry_after_ms;
}

static void on_error(duet_client *c, const proto_error *pe, const json_t *body)
{
    duet_error e;
    from_proto_error(pe, json_string_value(json_object_get(body, "code")), &e);
    const char *cmd = pe->command ? pe->command : "";
    if (!pe->id) {
        int q = strcmp(cmd, "status") == 0 ? Q_STATUS : strcmp(cmd, "health") == 0 ? Q_HEALTH : -1;
        if (q >= 0 && c->waiting[q] && !c->reply[q] && !c->reply_failed[q]) {
            c->reply_failed[q] = 1;
            c->reply_err[q] = e;
            return;
        }
        note_bad(c, "duetd sent error '%s' naming no request: %s", e.code_name, e.message);
        return;
    }
    duet_request *r = find_active(c, pe->id);
    if (!r) return; /* e.g. not_found for a cancel that crossed the request's done */
    /* An answer to a cancel concerns this request only if it sent one: else it is the
     * late not_found of an earlier request that had the same id. */
    if (strcmp(cmd, "cancel") == 0 && !r->cancel_sent) return;
    end_error(r, &e);
}

/* A status/health reply. */
static void on_state(duet_client *c, int q, proto_type t, json_t *body)
{
    if (!c->waiting[q] || c->reply[q] || c->reply_failed[q]) return; /* nobody asked: drop */
    union {
        proto_status s;
        proto_health h;
    } u;
    proto_err pe;
    memset(&pe, 0, sizeof pe);
    if (proto_parse(t, body, &u, &pe) != 0) {
        c->reply_failed[q] = 1;
        seterr(&c->reply_err[q], DUET_E_BAD_REPLY, "duetd's '%s' reply breaks the protocol: %s",
               proto_type_name(t), pe.message);
        return;
    }
    proto_free(t, &u);
    c->reply[q] = json_incref(body);
}

/* Handle one valid message. */
static void handle(duet_client *c, proto_msg *m)
{
    proto_type t = proto_msg_type(m, PROTO_SIDE_CLIENT);
    if (t == PROTO_T_STATUS || t == PROTO_T_HEALTH) {
        on_state(c, t == PROTO_T_STATUS ? Q_STATUS : Q_HEALTH, t, m->body);
        return;
    }
    union {
        proto_accepted a;
        proto_delta d;
        proto_done dn;
        proto_error e;
    } u;
    proto_err pe;
    memset(&pe, 0, sizeof pe);
    if (t != PROTO_T_ACCEPTED && t != PROTO_T_DELTA && t != PROTO_T_DONE && t != PROTO_T_ERROR) {
        note_bad(c, "duetd sent '%s', which a client does not expect",
                 proto_cmd_name(m->cmd));
        return;
    }
    if (proto_parse(t, m->body, &u, &pe) != 0) {
        duet_request *r = pe.id[0] ? find_active(c, pe.id) : NULL;
        if (r)
            end_local(r, DUET_E_BAD_REPLY, "duetd's '%s' for request '%s' breaks the protocol: %s",
                      proto_type_name(t), r->id, pe.message);
        else {
            note_bad(c, "duetd's '%s' breaks the protocol: %s", proto_type_name(t),
                     pe.message);
        }
        return;
    }
    switch (t) {
    case PROTO_T_ACCEPTED: on_accepted(c, &u.a); break;
    case PROTO_T_DELTA: on_delta(c, &u.d); break;
    case PROTO_T_DONE: on_done(c, &u.dn); break;
    default: on_error(c, &u.e, m->body); break;
    }
    proto_free(t, &u);
}

/* Wait at most timeout_ms (negative: a slice) for one message and handle it. DUET_OK when
 * one was handled (valid or not), DUET_E_TIMEOUT, or a system error. */
static duet_code pump(duet_client *c, int timeout_ms, duet_error *err)
{
    proto_msg m;
    proto_err pe;
    memset(&m, 0, sizeof m);
    memset(&pe, 0, sizeof pe);
    proto_rc rc = proto_recv(c->sock, PROTO_SIDE_CLIENT, 0, timeout_ms < 0 ? POLL_SLICE_MS : timeout_ms,
                             &m, &pe);
    switch (rc) {
    case PROTO_TIMEOUT: return DUET_E_TIMEOUT;
    case PROTO_SYSERR: return zmq_fail(c, err, errno, "receiving from duetd");
    case PROTO_INVALID: {
        int q = m.cmd == PROTO_CMD_STATUS ? Q_STATUS : m.cmd == PROTO_CMD_HEALTH ? Q_HEALTH : -1;
        if (q >= 0 && c->waiting[q] && !c->reply[q] && !c->reply_failed[q]) {
            c->reply_failed[q] = 1;
            seterr(&c->reply_err[q], DUET_E_BAD_REPLY, "duetd's reply breaks the protocol (%s): %s",
                   proto_code_name(pe.code), pe.message);
        } else {
            note_bad(c, "duetd sent a malformed message (%s): %s",
                     proto_code_name(pe.code), pe.message);
        }
        proto_msg_clear(&m);
        return DUET_OK;
    }
    case PROTO_OK: break;
    }
    handle(c, &m);
    proto_msg_clear(&m);
    return DUET_OK;
}

typedef int (*cond_fn)(duet_client *c, void *arg);

/* Pump until cond holds or timeout_ms passes (negative: no limit). what names the wait
 * in a timeout message. */
static duet_code wait_for(duet_client *c, cond_fn cond, void *arg, int timeout_ms, const char *what,
                          duet_error *err)
{
    double deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    long bad0 = c->n_bad;
    for (;;) {
        if (cond(c, arg)) return DUET_OK;
        int left = -1;
        if (timeout_ms >= 0) {
            double l = deadline - now_ms();
            left = l > 0 ? (int)(l + 0.999) : 0;
        }
        duet_code rc = pump(c, left, err);
        if (rc == DUET_OK) continue;
        if (rc != DUET_E_TIMEOUT) return rc;
        if (timeout_ms < 0) continue;
        if (cond(c, arg)) return DUET_OK;
        if (c->n_bad > bad0)
            return seterr(err, DUET_E_TIMEOUT,
                          "%s: no reply from duetd at %s within %d ms (%ld malformed messages "
                          "discarded meanwhile; the last: %s)",
                          what, c->endpoint, timeout_ms, c->n_bad - bad0, c->last_bad);
        return seterr(err, DUET_E_TIMEOUT, "%s: no reply from duetd at %s within %d ms", what,
                      c->endpoint, timeout_ms);
    }
}

/* ---- requests: public functions -------------------------------------------------------------- */

void duet_params_init(duet_params *p)
{
    if (!p) return;
    memset(p, 0, sizeof *p);
    proto_sampling s;
    proto_generate g;
    proto_generate_init(&g);
    s = g.sampling;
    p->sampling = (duet_sampling){s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty,
                                  s.repeat_last_n, s.seed};
}

/* The caller's arrays and strings: present where counted, and UTF-8 (JSON needs it). */
static int check_params(const duet_params *p, const char *id, duet_error *err)
{
    if (p->n_messages < 0 || p->n_tokens < 0 || p->n_stop < 0 || p->n_stop_token_ids < 0 ||
        (p->n_messages && !p->messages) || (p->n_tokens && !p->tokens) || (p->n_stop && !p->stop) ||
        (p->n_stop_token_ids && !p->stop_token_ids)) {
        seterr(err, DUET_E_USAGE, "duet_generate: an array count is negative or its array NULL");
        return -1;
    }
    const char *bad = NULL;
    char name[48];
    if (!utf8_ok(id)) bad = "id";
    else if (p->prompt && !utf8_ok(p->prompt)) bad = "prompt";
    else if (p->session && !utf8_ok(p->session)) bad = "session";
    for (int i = 0; !bad && i < p->n_messages; i++) {
        const duet_message *mm = &p->messages[i];
        int role_bad = !mm->role || !utf8_ok(mm->role);
        if (role_bad || !mm->content || !utf8_ok(mm->content)) {
            snprintf(name, sizeof name, "messages[%d].%s", i, role_bad ? "role" : "content");
            bad = name;
        }
    }
    for (int i = 0; !bad && i < p->n_stop; i++)
        if (!p->stop[i] || !utf8_ok(p->stop[i])) {
            snprintf(name, sizeof name, "stop[%d]", i);
            bad = name;
        }
    if (bad) {
        seterr(err, DUET_E_BAD_REQUEST, "generate: field '%s' is NULL or not valid UTF-8", bad);
        return -1;
    }
    return 0;
}

/* The generate body of p with id, checked against the schema; NULL with *err set. */
static json_t *generate_body(const duet_params *p, const char *id, duet_error *err)
{
    if (check_params(p, id, err) != 0) return NULL;
    proto_chat_msg *msgs = NULL;
    if (p->messages && !(msgs = calloc((size_t)(p->n_messages ? p->n_messages : 1), sizeof *msgs))) {
        seterr(err, DUET_E_SYSTEM, "duet_generate: out of memory");
        return NULL;
    }
    for (int i = 0; i < p->n_messages; i++)
        msgs[i] = (proto_chat_msg){(char *)p->messages[i].role, (char *)p->messages[i].content};
    /* The struct borrows the caller's strings; it is never proto_generate_free'd. */
    proto_generate g;
    proto_generate_init(&g);
    g.id = (char *)id;
    g.prompt = (char *)p->prompt;
    g.messages = msgs;
    g.n_messages = p->n_messages;
    g.tokens = (int32_t *)p->tokens;
    g.n_tokens = p->n_tokens;
    const duet_sampling *s = &p->sampling;
    g.sampling = (proto_sampling){s->temperature, s->top_k, s->top_p, s->min_p, s->repeat_penalty,
                                  s->repeat_last_n, s->seed};
    g.max_tokens = p->max_tokens;
    g.stop = (char **)p->stop;
    g.n_stop = p->n_stop;
    g.stop_token_ids = (int32_t *)p->stop_token_ids;
    g.n_stop_token_ids = p->n_stop_token_ids;
    g.ignore_eos = p->ignore_eos != 0;
    g.stream = p->stream != 0;
    g.session = (char *)p->session;
    json_t *body = proto_generate_build(&g);
    free(msgs);
    if (!body) {
        seterr(err, DUET_E_BAD_REQUEST,
               "generate: the request cannot be written as JSON (a number is not finite, or out of memory)");
        return NULL;
    }
    /* The schema duetd applies, applied here: refuse before sending. */
    proto_generate chk;
    proto_err pe;
    memset(&pe, 0, sizeof pe);
    if (proto_generate_parse(body, &chk, &pe) != 0) {
        json_decref(body);
        seterr(err, DUET_E_BAD_REQUEST, "%s", pe.message);
        return NULL;
    }
    proto_generate_free(&chk);
    return body;
}

duet_code duet_generate(duet_client *c, const duet_params *p, duet_request **out, duet_error *err)
{
    if (!out) return seterr(err, DUET_E_USAGE, "duet_generate: out is NULL");
    *out = NULL;
    if (!c || !p) return seterr(err, DUET_E_USAGE, "duet_generate: client or params is NULL");
    char idbuf[32];
    const char *id = p->id;
    if (!id) {
        do snprintf(idbuf, sizeof idbuf, "r%llu", ++c->next_id);
        while (find_active(c, idbuf));
        id = idbuf;
    } else if (find_active(c, id)) {
        seterr(err, DUET_E_DUPLICATE_ID, "generate: request '%s' is already in flight on this connection", id);
        if (err) snprintf(err->id, sizeof err->id, "%s", id);
        return DUET_E_DUPLICATE_ID;
    }
    json_t *body = generate_body(p, id, err);
    if (!body) return err ? err->code : DUET_E_BAD_REQUEST;

    duet_request *r = calloc(1, sizeof *r);
    if (!r || grow((void **)&c->reqs, &c->cap_reqs, (size_t)c->n_reqs + 1, sizeof *c->reqs)) {
        free(r);
        json_decref(body);
        return seterr(err, DUET_E_SYSTEM, "duet_generate: out of memory");
    }
    r->c = c;
    snprintf(r->id, sizeof r->id, "%s", id);
    r->stream = p->stream != 0;
    r->cb = p->on_event;
    r->user = p->user;
    r->result.id = r->id;
    r->result.seed = -1;
    if (proto_send(c->sock, NULL, PROTO_CLIENT, PROTO_CMD_GENERATE, &body, 0) != 0) {
        duet_code rc = zmq_fail(c, err, errno, "sending generate");
        free(r);
        return rc;
    }
    c->reqs[c->n_reqs++] = r;
    *out = r;
    return DUET_OK;
}

static int has_event(duet_client *c, void *arg)
{
    (void)c;
    duet_request *r = arg;
    return r->head != NULL;
}

static int is_finished(duet_client *c, void *arg)
{
    (void)c;
    duet_request *r = arg;
    return r->state >= RS_DONE;
}

duet_code duet_next(duet_request *req, int timeout_ms, duet_event *ev, duet_error *err)
{
    if (!req || !ev) return seterr(err, DUET_E_USAGE, "duet_next: request or event is NULL");
    node_free(req->cur);
    req->cur = NULL;
    if (req->cb)
        return seterr(err, DUET_E_USAGE, "duet_next: request '%s' delivers its events to on_event", req->id);
    if (!req->head) {
        if (req->end_returned || (req->state >= RS_DONE && !req->head))
            return seterr(err, DUET_E_USAGE, "duet_next: request '%s' has no more events", req->id);
        if (!req->c) return seterr(err, DUET_E_USAGE, "duet_next: the client is closed");
        char what[96];
        snprintf(what, sizeof what, "request '%s'", req->id);
        duet_code rc = wait_for(req->c, has_event, req, timeout_ms, what, err);
        if (rc != DUET_OK) return rc;
    }
    ev_node *n = req->head;
    req->head = n->next;
    if (!req->head) req->tail = NULL;
    n->next = NULL;
    req->cur = n;
    fill_event(req, n, ev);
    if (n->kind == DUET_EVENT_DONE || n->kind == DUET_EVENT_ERROR) req->end_returned = 1;
    return DUET_OK;
}

static void drop_queue(duet_request *r)
{
    node_free(r->cur);
    r->cur = NULL;
    while (r->head) {
        ev_node *n = r->head;
        r->head = n->next;
        node_free(n);
    }
    r->tail = NULL;
}

duet_code duet_wait(duet_request *req, int timeout_ms, const duet_result **result, duet_error *err)
{
    if (result) *result = NULL;
    if (!req) return seterr(err, DUET_E_USAGE, "duet_wait: request is NULL");
    if (req->state < RS_DONE) {
        if (!req->c) return seterr(err, DUET_E_USAGE, "duet_wait: the client is closed");
        char what[96];
        snprintf(what, sizeof what, "request '%s'", req->id);
        duet_code rc = wait_for(req->c, is_finished, req, timeout_ms, what, err);
        if (rc != DUET_OK) return rc;
    }
    drop_queue(req);
    req->end_returned = 1;
    if (req->state == RS_FAILED) {
        copy_err(err, &req->error);
        return req->error.code;
    }
    if (result) *result = &req->result;
    return DUET_OK;
}

duet_code duet_poll(duet_client *c, int timeout_ms, duet_error *err)
{
    if (!c) return seterr(err, DUET_E_USAGE, "duet_poll: client is NULL");
    double deadline = now_ms() + (timeout_ms > 0 ? timeout_ms : 0);
    duet_code rc;
    for (;;) {
        int left = -1;
        if (timeout_ms >= 0) {
            double l = deadline - now_ms();
            left = l > 0 ? (int)(l + 0.999) : 0;
        }
        rc = pump(c, left, err);
        if (rc != DUET_E_TIMEOUT || timeout_ms >= 0) break;
    }
    if (rc == DUET_E_TIMEOUT) return seterr(err, DUET_E_TIMEOUT, "duet_poll: nothing from duetd within %d ms", timeout_ms);
    if (rc != DUET_OK) return rc;
    while ((rc = pump(c, 0, err)) == DUET_OK) {
    }
    return rc == DUET_E_TIMEOUT ? DUET_OK : rc;
}

duet_code duet_cancel(duet_request *req, duet_error *err)
{
    if (!req) return seterr(err, DUET_E_USAGE, "duet_cancel: request is NULL");
    if (req->state >= RS_DONE || req->cancel_sent) return DUET_OK;
    if (!req->c) return seterr(err, DUET_E_USAGE, "duet_cancel: the client is closed");
    proto_cancel m = {.id = req->id};
    if (proto_send_body(req->c->sock, NULL, PROTO_CLIENT, PROTO_CMD_CANCEL, PROTO_T_CANCEL, &m, 0) != 0)
        return zmq_fail(req->c, err, errno, "sending cancel");
    req->cancel_sent = 1;
    return DUET_OK;
}

int duet_request_finished(const duet_request *req)
{
    return req && req->state >= RS_DONE;
}

const char *duet_request_id(const duet_request *req)
{
    return req ? req->id : "";
}

const duet_result *duet_request_result(const duet_request *req)
{
    return req && req->state == RS_DONE ? &req->result : NULL;
}

const duet_error *duet_request_error(const duet_request *req)
{
    return req && req->state == RS_FAILED ? &req->error : NULL;
}

void duet_request_free(duet_request **req_p)
{
    if (!req_p || !*req_p) return;
    duet_request *r = *req_p;
    *req_p = NULL;
    duet_client *c = r->c;
    if (c) {
        if (r->state < RS_DONE) send_cancel(r, ZMQ_DONTWAIT);
        for (int i = 0; i < c->n_reqs; i++)
            if (c->reqs[i] == r) {
                c->reqs[i] = c->reqs[--c->n_reqs];
                break;
            }
    }
    drop_queue(r);
    free(r->text);
    free(r->ids);
    free(r);
}

void duet_destroy(duet_client **self_p)
{
    if (!self_p || !*self_p) return;
    duet_client *c = *self_p;
    *self_p = NULL;
    for (int i = 0; i < c->n_reqs; i++) {
        duet_request *r = c->reqs[i];
        r->cb = NULL; /* no callbacks from here */
        if (r->state < RS_DONE) end_local(r, DUET_E_USAGE, "request '%s': the connection was closed", r->id);
        r->c = NULL;
    }
    free(c->reqs);
    for (int q = 0; q < 2; q++) json_decref(c->reply[q]);
    if (c->sock) zmq_close(c->sock);
    if (c->zctx) zmq_ctx_term(c->zctx);
    free(c->endpoint);
    free(c);
}

/* ---- status and health ------------------------------------------------------------------------- */

static int has_reply(duet_client *c, void *arg)
{
    int q = *(int *)arg;
    return c->reply[q] != NULL || c->reply_failed[q];
}

/* Send status/health and wait for its reply; *out gets the reply object. */
static duet_code ask(duet_client *c, int q, int timeout_ms, json_t **out, duet_error *err)
{
    const char *name = q == Q_STATUS ? "status" : "health";
    if (!c) return seterr(err, DUET_E_USAGE, "duet_%s: client is NULL", name);
    if (c->waiting[q]) return seterr(err, DUET_E_USAGE, "duet_%s: already waiting (called from a callback?)", name);
    json_decref(c->reply[q]);
    c->reply[q] = NULL;
    c->reply_failed[q] = 0;
    if (proto_send(c->sock, NULL, PROTO_CLIENT, q == Q_STATUS ? PROTO_CMD_STATUS : PROTO_CMD_HEALTH, NULL, 0) != 0)
        return zmq_fail(c, err, errno, q == Q_STATUS ? "sending status" : "sending health");
    c->waiting[q] = 1;
    duet_code rc = wait_for(c, has_reply, &q, timeout_ms, name, err);
    c->waiting[q] = 0;
    if (rc != DUET_OK) return rc;
    if (c->reply_failed[q]) {
        c->reply_failed[q] = 0;
        copy_err(err, &c->reply_err[q]);
        return c->reply_err[q].code;
    }
    *out = c->reply[q];
    c->reply[q] = NULL;
    return DUET_OK;
}

duet_code duet_status(duet_client *c, int timeout_ms, json_t **out, duet_error *err)
{
    if (!out) return seterr(err, DUET_E_USAGE, "duet_status: out is NULL");
    *out = NULL;
    return ask(c, Q_STATUS, timeout_ms, out, err);
}

duet_code duet_health(duet_client *c, int timeout_ms, duet_health_info *info, json_t **json_out,
                      duet_error *err)
{
    if (json_out) *json_out = NULL;
    json_t *j = NULL;
    duet_code rc = ask(c, Q_HEALTH, timeout_ms, &j, err);
    if (rc != DUET_OK) return rc;
    if (info) {
        proto_health h;
        proto_err pe;
        memset(&pe, 0, sizeof pe);
        proto_health_parse(j, &h, &pe); /* checked when it arrived */
        memset(info, 0, sizeof *info);
        info->ok = h.ok;
        snprintf(info->state, sizeof info->state, "%s", json_string_value(json_object_get(j, "state")));
        info->groups_ready = h.groups_ready;
        info->workers_alive = h.workers_alive;
        info->uptime_s = h.uptime_s;
        proto_health_free(&h);
    }
    if (json_out)
        *json_out = j;
    else
        json_decref(j);
    return DUET_OK;
}
