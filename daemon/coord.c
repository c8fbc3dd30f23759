/* daemon/coord.c: duetd's coordinator: life cycle, the event loop, the client protocol,
 * the request table and the output path (deltas, stop strings, buffering). Workers,
 * groups and routing are in coord_worker.c. */
#include "daemon/coord.h"

#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/random.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <zmq.h>

#include "daemon/coord_int.h"
#include "worker/gguf.h"

#define RECV_BATCH 512      /* messages taken from one socket before looking at the others */
#define MAX_FRAMES 16       /* frames kept of one received message */
#define TICK_MIN_MS 5       /* shortest timer period */
#define TICK_MAX_MS 100     /* longest */
#define BLOCKED_RETRY_MS 2  /* poll timeout while a client's output waits ... */
#define BLOCKED_RETRY_MAX 64 /* ... doubling up to this while no waiting output moves */
#define DRAIN_FLUSH_MS 1000 /* how long a finished drain still tries to deliver output */
#define SESSIONS_MAX 65536  /* sessions remembered (least recently used forgotten) */
#define DELTA_OVERHEAD 64   /* bytes of a delta besides its text and ids (estimate) */
#define ID_BYTES 12         /* bytes per token id in JSON (estimate) */

const char *coord_state_name(coord_state s)
{
    static const char *const names[] = {"queued",   "prefilling", "decoding",
                                        "finished", "failed",     "cancelled"};
    return (unsigned)s < sizeof names / sizeof *names ? names[s] : "?";
}

void coord_opts_default(coord_opts *o)
{
    memset(o, 0, sizeof *o);
    o->signal_fd = -1;
    o->max_retries = 2;
    o->max_inflight_per_client = 256;
    o->drain_timeout_ms = 30000;
}

/* ---- logging and notification ---------------------------------------------------------- */

void coord_log(coord_t *c, int level, const char *fmt, ...)
{
    static const int prio[] = {3, 4, 6, 7};
    char line[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    int p = level >= 0 && level <= 3 ? prio[level] : 6;
    if (c->opts.log)
        c->opts.log(c->opts.log_ctx, p, line);
    else
        fprintf(stderr, "<%d>duetd: %s\n", p, line);
}

void coord_notify(coord_t *c, const char *state)
{
    if (c->opts.notify) c->opts.notify(c->opts.notify_ctx, state);
}

void coord_notify_status(coord_t *c)
{
    char line[256];
    int ready = coord_groups_ready(c), alive = 0;
    for (cworker *w = c->workers; w; w = w->next) alive += w->alive;
    snprintf(line, sizeof line, "STATUS=%s: %d of %d groups ready, %d workers, %d running, %d queued",
             c->phase == COORD_DRAINING ? "draining" : ready ? "serving" : "waiting for workers",
             ready, c->n_groups, alive, c->n_running, c->n_queued);
    if (strcmp(line, c->status_line) == 0) return;
    snprintf(c->status_line, sizeof c->status_line, "%s", line);
    coord_notify(c, line);
}

/* ---- routes and clients ------------------------------------------------------------------ */

static uint64_t route_hash(const proto_route *r)
{
    uint64_t h = 0;
    for (int i = 0; i < r->n; i++) h = coord_mix64(h ^ coord_hash_bytes(r->id[i], r->len[i]));
    return h;
}

static int route_eq(const proto_route *a, const proto_route *b)
{
    if (a->n != b->n) return 0;
    for (int i = 0; i < a->n; i++)
        if (a->len[i] != b->len[i] || memcmp(a->id[i], b->id[i], a->len[i]) != 0) return 0;
    return 1;
}

static int client_match(const void *val, const void *arg)
{
    return route_eq(&((const cclient *)val)->route, arg);
}

static cclient *client_get(coord_t *c, const proto_route *route, int create)
{
    uint64_t h = route_hash(route);
    cclient *cl = cmap_find(&c->clients, h, client_match, route);
    if (cl || !create) return cl;
    cl = calloc(1, sizeof *cl);
    if (!cl) return NULL;
    cl->route = *route;
    cl->hash = h;
    cl->fd = -1;
    if (cmap_put(&c->clients, h, cl) != 0) {
        free(cl);
        return NULL;
    }
    return cl;
}

void coord_client_dirty(coord_t *c, cclient *cl)
{
    if (cl->in_flush) return;
    if (c->n_flush == c->cap_flush) {
        int ncap = c->cap_flush ? 2 * c->cap_flush : 64;
        cclient **nf = realloc(c->flush, (size_t)ncap * sizeof *nf);
        if (!nf) {
            CERR(c, "out of memory growing the output list; a client's output waits");
            return;
        }
        c->flush = nf;
        c->cap_flush = ncap;
    }
    c->flush[c->n_flush++] = cl;
    cl->in_flush = 1;
}

static void outmsg_free(coutmsg *m)
{
    json_decref(m->body);
    free(m);
}

/* Free a client with no request left (not listed in coord.flush). */
static void client_free(coord_t *c, cclient *cl)
{
    while (cl->oq_head) {
        coutmsg *m = cl->oq_head;
        cl->oq_head = m->next;
        outmsg_free(m);
    }
    cmap_del(&c->clients, cl->hash, cl);
    free(cl);
}

static size_t json_bytes(const json_t *j) { return j ? json_dumpb(j, NULL, 0, JSON_COMPACT) : 0; }

/* Send body as cmd to cl now (the body stays the caller's). 0 sent, 1 would block (the
 * client's pipe is full), -1 the client is gone. */
static int client_send(coord_t *c, cclient *cl, proto_cmd cmd, json_t *body)
{
    if (cl->gone) return -1;
    json_t *b = json_incref(body);
    if (proto_send(c->csock, &cl->route, PROTO_CLIENT, cmd, &b, ZMQ_DONTWAIT) == 0) return 0;
    int e = errno;
    if (e == EAGAIN) {
        cl->blocked = 1;
        return 1;
    }
    if (e == EHOSTUNREACH) {
        CDEBUG(c, "client fd %d is gone (send: EHOSTUNREACH)", cl->fd);
        cl->gone = 1;
        coord_client_dirty(c, cl);
        return -1;
    }
    CERR(c, "sending '%s' to a client failed: %s; the message is dropped", proto_cmd_name(cmd),
         zmq_strerror(e));
    return 0;
}

/* A reply that belongs to no request in flight: sent now, or queued behind the client's
 * other output. Takes body. */
static void client_reply(coord_t *c, cclient *cl, proto_cmd cmd, json_t *body)
{
    if (!body) {
        CERR(c, "out of memory building a '%s' reply", proto_cmd_name(cmd));
        return;
    }
    if (!cl->oq_head && !cl->blocked && !cl->in_flush) {
        int rc = client_send(c, cl, cmd, body);
        if (rc != 1) {
            json_decref(body);
            return;
        }
    }
    size_t bytes = json_bytes(body);
    if (cl->oq_bytes + bytes > (size_t)c->cfg->daemon.client_buffer_bytes) {
        CWARN(c, "a client's buffered replies are over client_buffer_bytes: '%s' dropped",
              proto_cmd_name(cmd));
        json_decref(body);
        return;
    }
    coutmsg *m = calloc(1, sizeof *m);
    if (!m) {
        json_decref(body);
        return;
    }
    m->cmd = cmd;
    m->body = body;
    m->bytes = bytes;
    if (cl->oq_tail)
        cl->oq_tail->next = m;
    else
        cl->oq_head = m;
    cl->oq_tail = m;
    cl->oq_bytes += bytes;
    coord_client_dirty(c, cl);
}

/* An `error` to cl, for a message that is not (or no longer) a request in flight. */
static void client_error(coord_t *c, cclient *cl, const char *id, proto_cmd answered,
                         proto_code code, int retry_after_ms, const char *fmt, ...)
    __attribute__((format(printf, 7, 8)));
static void client_error(coord_t *c, cclient *cl, const char *id, proto_cmd answered,
                         proto_code code, int retry_after_ms, const char *fmt, ...)
{
    char msg[PROTO_MAX_TEXT];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    proto_error e;
    proto_error_init(&e);
    e.id = id && *id ? (char *)id : NULL;
    e.code = code;
    e.message = msg;
    e.command = answered != PROTO_CMD_NONE ? (char *)proto_cmd_name(answered) : NULL;
    e.retry_after_ms = retry_after_ms;
    CDEBUG(c, "client error %s%s%s: %s", proto_code_name(code), id ? " for " : "", id ? id : "", msg);
    client_reply(c, cl, PROTO_CMD_ERROR, proto_error_build(&e));
}

/* ---- requests ------------------------------------------------------------------------------- */

static int blocks_of(const coord_t *c, int tokens)
{
    int bt = c->block_tokens > 0 ? c->block_tokens : 16;
    return (tokens + bt - 1) / bt;
}

void coord_queue_push(coord_t *c, creq *r, int at_head)
{
    r->lprev = r->lnext = NULL;
    if (at_head) {
        r->lnext = c->q_head;
        if (c->q_head) c->q_head->lprev = r;
        else c->q_tail = r;
        c->q_head = r;
    } else {
        r->lprev = c->q_tail;
        if (c->q_tail) c->q_tail->lnext = r;
        else c->q_head = r;
        c->q_tail = r;
    }
    r->listed = 1;
    r->state = COORD_QUEUED;
    c->n_queued++;
}

void coord_queue_remove(coord_t *c, creq *r)
{
    if (r->listed != 1) return;
    if (r->lprev) r->lprev->lnext = r->lnext;
    else c->q_head = r->lnext;
    if (r->lnext) r->lnext->lprev = r->lprev;
    else c->q_tail = r->lprev;
    r->lprev = r->lnext = NULL;
    r->listed = 0;
    c->n_queued--;
}

void coord_req_free(coord_t *c, creq *r)
{
    if (!r) return;
    coord_queue_remove(c, r);
    if (r->listed == 2) coord_req_detach(c, r, 0);
    cmap_del(&c->reqs, (uint64_t)r->rid, r);
    if (r->session) {
        csession *s = coord_session_get(c, r->session, 0);
        if (s && s->busy == r) s->busy = NULL;
    }
    cclient *cl = r->client;
    if (cl) {
        if (r->cprev) r->cprev->cnext = r->cnext;
        else cl->head = r->cnext;
        if (r->cnext) r->cnext->cprev = r->cprev;
        else cl->tail = r->cprev;
        cl->n_reqs--;
        if (r->state <= COORD_DECODING) cl->n_active--;
    }
    free(r->session);
    free(r->prompt);
    free(r->gen);
    for (int i = 0; i < r->n_stops; i++) free(r->stops[i]);
    free(r->stops);
    free(r->stop_ids);
    tok_stream_destroy(&r->ts);
    free(r->text);
    json_decref(r->final);
    free(r->phash);
    free(r);
}

static int text_append(creq *r, const char *s, size_t n)
{
    if (n == 0) return 0;
    if (r->text_len + n + 1 > r->text_cap) {
        size_t ncap = r->text_cap ? r->text_cap : 256;
        while (ncap < r->text_len + n + 1) ncap *= 2;
        char *nt = realloc(r->text, ncap);
        if (!nt) return -1;
        r->text = nt;
        r->text_cap = ncap;
    }
    memcpy(r->text + r->text_len, s, n);
    r->text_len += n;
    r->text[r->text_len] = 0;
    return 0;
}

/* After text grew from prev bytes: look for the stop strings and move `shown` (what may
 * go out). final: the generation ended, nothing more can complete a stop string.
 * Returns 1 when a stop string was found (the text is cut before it). */
static int text_check(creq *r, size_t prev, int final)
{
    if (r->n_stops > 0) {
        stop_result sr;
        if (stop_match(r->text, r->text_len, (const char *const *)r->stops, r->n_stops, prev,
                       &sr) == 1) {
            size_t cut = sr.stop_at < r->shown ? r->shown : sr.stop_at;
            r->text_len = cut;
            if (r->text) r->text[cut] = 0;
            r->shown = cut;
            return 1;
        }
        if (!final) {
            if (sr.safe_len > r->shown) r->shown = sr.safe_len;
            return 0;
        }
    }
    r->shown = r->text_len;
    return 0;
}

static double ms_since(double t0, double t1) { return t0 > 0 && t1 > t0 ? t1 - t0 : 0; }

/* The request's end: unlink it from the queue, its group, the rid map and its session,
 * count it, and queue its last message (body, cmd). */
static void req_end(coord_t *c, creq *r, coord_state st, proto_cmd cmd, json_t *body)
{
    if (r->state > COORD_DECODING) {
        json_decref(body);
        return;
    }
    coord_queue_remove(c, r);
    if (r->listed == 2) coord_req_detach(c, r, 0);
    cmap_del(&c->reqs, (uint64_t)r->rid, r);
    if (r->session) {
        csession *s = coord_session_get(c, r->session, 0);
        if (s && s->busy == r) s->busy = NULL;
    }
    r->state = st;
    r->final_cmd = cmd;
    r->final = body;
    r->final_bytes = json_bytes(body);
    if (!body && cmd != PROTO_CMD_NONE) CERR(c, "out of memory building the last message of request %s", r->id);
    if (r->client) {
        r->client->n_active--;
        coord_client_dirty(c, r->client);
    }
    if (st == COORD_FINISHED) c->st_served++;
    else if (st == COORD_FAILED) c->st_failed++;
    else c->st_cancelled++;
}

/* End r with `done` (reason); cached: the worker's count, or -1. */
static void req_done(coord_t *c, creq *r, proto_finish reason)
{
    double now = coord_now_ms();
    proto_done d;
    proto_done_init(&d);
    d.id = r->id;
    d.finish_reason = reason;
    if (!r->stream) {
        d.text = r->text ? r->text : "";
        if (r->text) r->text[r->shown] = 0;
        d.token_ids = r->gen;
        d.n_token_ids = r->n_gen;
    }
    int cached = r->cached_tokens >= 0 ? r->cached_tokens : r->predicted_cached;
    if (r->got_kv_ready) cached = r->p_cached; /* the prefill group's prefix cache */
    if (reason != PROTO_FINISH_CANCELLED) coord_xfer_account(c, r);
    if (cached > r->n_prompt) cached = r->n_prompt;
    if (cached < 0) cached = 0;
    d.usage.prompt_tokens = r->n_prompt;
    d.usage.cached_prompt_tokens = r->t_assign > 0 ? cached : 0;
    d.usage.completion_tokens = r->n_gen;
    d.usage.retries = r->retries;
    d.timings.queue_ms = ms_since(r->t_recv, r->t_assign > 0 ? r->t_assign : now);
    d.timings.ttft_ms = ms_since(r->t_recv, r->t_first > 0 ? r->t_first : now);
    d.timings.tpot_ms_mean = r->n_gen > 1 ? ms_since(r->t_first, r->t_last) / (r->n_gen - 1) : 0;
    d.timings.total_ms = ms_since(r->t_recv, now);
    if (r->t_first > 0) {
        c->st_prompt_tokens += r->n_prompt;
        c->st_cached_tokens += d.usage.cached_prompt_tokens;
    }
    json_t *body = proto_done_build(&d); /* borrows r's arrays; d is not freed */
    if (reason != PROTO_FINISH_CANCELLED && r->group >= 0) coord_session_note(c, r);
    CDEBUG(c, "request %s (rid %lld) done: %s, %d+%d tokens, %d retries", r->id,
           (long long)r->rid, proto_finish_name(reason), r->n_prompt, r->n_gen, r->retries);
    req_end(c, r, reason == PROTO_FINISH_CANCELLED ? COORD_CANCELLED : COORD_FINISHED,
            PROTO_CMD_DONE, body);
}

/* End r with an error; st COORD_FAILED or COORD_CANCELLED; drop: discard output that
 * was not sent yet. */
static void req_error(coord_t *c, creq *r, coord_state st, int drop, proto_code code,
                      const char *msg)
{
    if (r->state > COORD_DECODING) return;
    if (r->listed == 2) coord_req_detach(c, r, 1);
    if (drop) {
        r->sent_tokens = r->n_gen;
        r->sent_text = r->shown;
    }
    proto_error e;
    proto_error_init(&e);
    e.id = r->id;
    e.code = code;
    e.message = (char *)msg;
    e.command = "generate";
    CINFO(c, "request %s (rid %lld) failed: %s: %s", r->id, (long long)r->rid,
          proto_code_name(code), msg);
    req_end(c, r, st, PROTO_CMD_ERROR, proto_error_build(&e));
}

void coord_req_fail(coord_t *c, creq *r, proto_code code, const char *fmt, ...)
{
    char msg[PROTO_MAX_TEXT];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    req_error(c, r, COORD_FAILED, 0, code, msg);
}

static int is_stop_id(const creq *r, int32_t id)
{
    for (int i = 0; i < r->n_stop_ids; i++)
        if (r->stop_ids[i] == id) return 1;
    return 0;
}

void coord_req_tokens(coord_t *c, creq *r, int index, const int32_t *ids, int n)
{
    if (r->state != COORD_PREFILLING && r->state != COORD_DECODING) return;
    if (r->ended_by_token) return; /* nothing counts after an end token */
    if (index > r->n_gen) {
        coord_req_fail(c, r, PROTO_ERR_INTERNAL,
                       "worker sent token index %d of rid %lld, expected %d (tokens lost)", index,
                       (long long)r->rid, r->n_gen);
        return;
    }
    double now = coord_now_ms();
    for (int i = r->n_gen - index; i < n; i++) {
        int32_t id = ids[i];
        if (r->n_gen >= r->max_tokens) break;
        if (id < 0 || id >= c->n_vocab) {
            coord_req_fail(c, r, PROTO_ERR_INTERNAL, "worker sent token id %d, outside the vocabulary (%d)",
                           id, c->n_vocab);
            return;
        }
        if (r->n_gen == r->cap_gen) {
            int ncap = r->cap_gen ? 2 * r->cap_gen : 64;
            int32_t *ng = realloc(r->gen, (size_t)ncap * sizeof *ng);
            if (!ng) {
                coord_req_fail(c, r, PROTO_ERR_INTERNAL, "out of memory holding the completion");
                return;
            }
            r->gen = ng;
            r->cap_gen = ncap;
        }
        r->gen[r->n_gen++] = id;
        if (r->t_first <= 0) r->t_first = now;
        r->t_last = now;
        r->state = COORD_DECODING;
        if (!r->ignore_eos && tok_is_eog(c->tok, id)) {
            r->ended_by_token = 1;
            break;
        }
        if (is_stop_id(r, id)) {
            r->ended_by_token = 2;
            break;
        }
        const char *piece;
        size_t plen;
        size_t prev = r->text_len;
        if (tok_stream_push(r->ts, id, &piece, &plen) != 0 || text_append(r, piece, plen) != 0) {
            coord_req_fail(c, r, PROTO_ERR_INTERNAL, "out of memory decoding the completion");
            return;
        }
        if (plen && text_check(r, prev, 0)) {
            /* a stop string: the worker stops, the client is done now */
            coord_req_detach(c, r, 1);
            req_done(c, r, PROTO_FINISH_STOP);
            return;
        }
    }
    if (r->stream && r->client) coord_client_dirty(c, r->client);
}

void coord_req_finished(coord_t *c, creq *r, proto_finish reason, int cached_tokens)
{
    if (r->state > COORD_DECODING) return;
    if (cached_tokens >= 0) r->cached_tokens = cached_tokens;
    if (r->ts && !r->ended_by_token && reason != PROTO_FINISH_CANCELLED) {
        const char *piece;
        size_t plen;
        size_t prev = r->text_len;
        if (tok_stream_flush(r->ts, &piece, &plen) == 0 && text_append(r, piece, plen) == 0 &&
            text_check(r, prev, 1))
            reason = PROTO_FINISH_STOP;
    } else if (reason != PROTO_FINISH_CANCELLED) {
        r->shown = r->text_len; /* an end token: held-back text can no longer become a stop */
    }
    req_done(c, r, reason);
}

/* ---- the output path ------------------------------------------------------------------------ */

static int req_has_delta(const creq *r)
{
    return r->stream && (r->sent_tokens < r->n_gen || r->sent_text < r->shown);
}

/* Bytes waiting in duetd for cl. */
static size_t client_buffered(const cclient *cl)
{
    size_t b = cl->oq_bytes;
    for (const creq *r = cl->head; r; r = r->cnext) {
        if (!r->accepted_sent) b += DELTA_OVERHEAD;
        if (req_has_delta(r))
            b += (r->shown - r->sent_text) + (size_t)(r->n_gen - r->sent_tokens) * ID_BYTES + DELTA_OVERHEAD;
        b += r->final_bytes;
    }
    return b;
}

/* Send what cl has waiting, in order; stops at a full pipe. Returns the number of
 * messages sent. */
static int client_flush(coord_t *c, cclient *cl)
{
    int sent = 0;
    cl->blocked = 0;
    while (cl->oq_head) {
        coutmsg *m = cl->oq_head;
        if (client_send(c, cl, m->cmd, m->body) != 0) return sent;
        sent++;
        cl->oq_head = m->next;
        if (!cl->oq_head) cl->oq_tail = NULL;
        cl->oq_bytes -= m->bytes;
        outmsg_free(m);
    }
    creq *next;
    for (creq *r = cl->head; r; r = next) {
        next = r->cnext;
        if (!r->accepted_sent) {
            proto_accepted a;
            proto_accepted_init(&a);
            a.id = r->id;
            a.prompt_tokens = r->n_prompt;
            a.max_tokens = r->max_tokens;
            a.seed = r->sampling.seed;
            json_t *body = proto_accepted_build(&a);
            int rc = body ? client_send(c, cl, PROTO_CMD_ACCEPTED, body) : 0;
            json_decref(body);
            if (rc != 0) return sent;
            sent++;
            r->accepted_sent = 1;
        }
        if (req_has_delta(r)) {
            proto_delta d;
            proto_delta_init(&d);
            d.id = r->id;
            d.index = r->sent_tokens;
            size_t end = r->shown;
            char *text = malloc(end - r->sent_text + 1);
            if (!text) return sent;
            memcpy(text, r->text ? r->text + r->sent_text : "", end - r->sent_text);
            text[end - r->sent_text] = 0;
            d.text = text;
            d.token_ids = r->gen + r->sent_tokens;
            d.n_token_ids = r->n_gen - r->sent_tokens;
            json_t *body = proto_delta_build(&d);
            free(text);
            int rc = body ? client_send(c, cl, PROTO_CMD_DELTA, body) : 0;
            json_decref(body);
            if (rc != 0) return sent;
            sent++;
            r->sent_tokens = r->n_gen;
            r->sent_text = end;
        }
        if (r->state > COORD_DECODING) {
            if (r->final && client_send(c, cl, r->final_cmd, r->final) != 0) return sent;
            sent++;
            coord_req_free(c, r);
        }
    }
    return sent;
}

/* A client whose output is over client_buffer_bytes: its running requests end with
 * slow_client (their unsent output dropped). */
static void client_slow(coord_t *c, cclient *cl)
{
    size_t b = client_buffered(cl);
    if (b <= (size_t)c->cfg->daemon.client_buffer_bytes || cl->n_active == 0) return;
    CWARN(c, "client fd %d does not read its replies: %zu bytes buffered, over client_buffer_bytes %lld; "
          "its %d running requests are cancelled", cl->fd, b,
          (long long)c->cfg->daemon.client_buffer_bytes, cl->n_active);
    char msg[PROTO_MAX_TEXT];
    snprintf(msg, sizeof msg,
             "the client did not read its replies: %zu bytes waited, over client_buffer_bytes (%lld)", b,
             (long long)c->cfg->daemon.client_buffer_bytes);
    creq *next;
    for (creq *r = cl->head; r; r = next) {
        next = r->cnext;
        if (r->state <= COORD_DECODING) req_error(c, r, COORD_CANCELLED, 1, PROTO_ERR_SLOW_CLIENT, msg);
    }
}

/* The client's connection is gone: its requests are cancelled at their workers and
 * forgotten. */
static void client_drop(coord_t *c, cclient *cl)
{
    if (cl->n_active > 0)
        CINFO(c, "client fd %d is gone: cancelling its %d requests", cl->fd, cl->n_active);
    while (cl->head) {
        creq *r = cl->head;
        if (r->state <= COORD_DECODING) {
            if (r->listed == 2) coord_req_detach(c, r, 1);
            req_end(c, r, COORD_CANCELLED, PROTO_CMD_NONE, NULL);
        }
        coord_req_free(c, r);
    }
    client_free(c, cl);
}

/* Deliver waiting output; drop gone clients; free idle ones. Returns the messages sent. */
static int flush_all(coord_t *c)
{
    int keep = 0, sent = 0;
    for (int i = 0; i < c->n_flush; i++) {
        cclient *cl = c->flush[i];
        if (!cl->gone) sent += client_flush(c, cl);
        if (!cl->gone && cl->blocked) client_slow(c, cl);
        if (cl->gone) {
            client_drop(c, cl);
            continue;
        }
        if (cl->blocked) {
            c->flush[keep++] = cl;
            continue;
        }
        cl->in_flush = 0;
        if (cl->n_reqs == 0 && !cl->oq_head) client_free(c, cl);
    }
    c->n_flush = keep;
    return sent;
}

/* ---- the client protocol -------------------------------------------------------------------- */

static creq *client_find(cclient *cl, const char *id)
{
    for (creq *r = cl->head; r; r = r->cnext)
        if (strcmp(r->id, id) == 0) return r;
    return NULL;
}

static int retry_hint_ms(const coord_t *c) { return c->cfg->daemon.heartbeat_ms; }

/* The prompt's token ids; -1 with *code and msg set when refused. */
static int make_prompt(coord_t *c, const proto_generate *g, int32_t **ids, int *n, proto_code *code,
                       char *msg, size_t msglen)
{
    *ids = NULL;
    *n = 0;
    *code = PROTO_ERR_BAD_REQUEST;
    if (g->form == PROTO_PROMPT_TOKENS) {
        for (int i = 0; i < g->n_tokens; i++)
            if (g->tokens[i] >= c->n_vocab) {
                snprintf(msg, msglen, "generate: field 'tokens[%d]': token id %d is not below n_vocab %d",
                         i, g->tokens[i], c->n_vocab);
                return -1;
            }
        *ids = malloc((size_t)g->n_tokens * sizeof **ids);
        if (!*ids) goto oom;
        memcpy(*ids, g->tokens, (size_t)g->n_tokens * sizeof **ids);
        *n = g->n_tokens;
        return 0;
    }
    char *rendered = NULL;
    const char *text = g->prompt;
    if (g->form == PROTO_PROMPT_CHAT) {
        if (!c->chat_ok) {
            snprintf(msg, msglen, "generate: field 'messages': the model has no usable chat template (%.160s)",
                     c->chat_err);
            return -1;
        }
        chat_msg *msgs = malloc((size_t)g->n_messages * sizeof *msgs);
        if (!msgs) goto oom;
        for (int i = 0; i < g->n_messages; i++)
            msgs[i] = (chat_msg){.role = g->messages[i].role, .content = g->messages[i].content};
        char why[PROTO_MAX_TEXT];
        int rc = chat_template_render(&c->chat, msgs, g->n_messages, 1, &rendered, why, sizeof why);
        free(msgs);
        if (rc != 0) {
            snprintf(msg, msglen, "generate: field 'messages': %.200s", why);
            return -1;
        }
        text = rendered;
    }
    int rc = tok_encode(c->tok, text, strlen(text), 1, 1, ids, n);
    free(rendered);
    if (rc != 0) goto oom;
    /* a template that writes BOS itself and a tokenizer that adds one: keep one */
    int32_t bos = tok_bos(c->tok);
    if (*n >= 2 && bos >= 0 && (*ids)[0] == bos && (*ids)[1] == bos) {
        memmove(*ids, *ids + 1, (size_t)(*n - 1) * sizeof **ids);
        (*n)--;
    }
    if (*n == 0) {
        snprintf(msg, msglen, "generate: field '%s' gives no tokens",
                 g->form == PROTO_PROMPT_CHAT ? "messages" : "prompt");
        free(*ids);
        *ids = NULL;
        return -1;
    }
    return 0;
oom:
    *code = PROTO_ERR_INTERNAL;
    snprintf(msg, msglen, "generate: out of memory tokenizing the prompt");
    return -1;
}

static void on_generate(coord_t *c, cclient *cl, const json_t *body)
{
    proto_generate g;
    proto_err err;
    memset(&err, 0, sizeof err);
    if (proto_generate_parse(body, &g, &err) != 0) {
        client_error(c, cl, err.id, PROTO_CMD_GENERATE, err.code, 0, "%s", err.message);
        return;
    }
    const config_daemon *d = &c->cfg->daemon;
    char msg[PROTO_MAX_TEXT];
    proto_code code;
    int32_t *prompt = NULL;
    int n_prompt = 0;
    creq *r = NULL;
    if (c->phase != COORD_RUNNING) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_SHUTTING_DOWN, 0,
                     "generate: duetd is shutting down and takes no new requests");
        goto out;
    }
    if (client_find(cl, g.id)) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_DUPLICATE_ID, 0,
                     "generate: request '%s' is already in flight on this connection", g.id);
        goto out;
    }
    if (cl->n_active >= c->opts.max_inflight_per_client) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_BUSY, retry_hint_ms(c),
                     "generate: %d requests in flight on this connection (the limit)", cl->n_active);
        goto out;
    }
    csession *sess = NULL;
    if (g.session) {
        sess = coord_session_get(c, g.session, 1);
        if (!sess) {
            client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_INTERNAL, 0,
                         "generate: out of memory recording session '%s'", g.session);
            goto out;
        }
        if (sess->busy) {
            client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_SESSION_BUSY, 0,
                         "generate: session '%s' has request '%s' in flight", g.session, sess->busy->id);
            goto out;
        }
    }
    for (int i = 0; i < g.n_stop_token_ids; i++)
        if (g.stop_token_ids[i] >= c->n_vocab) {
            client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_BAD_REQUEST, 0,
                         "generate: field 'stop_token_ids[%d]': token id %d is not below n_vocab %d", i,
                         g.stop_token_ids[i], c->n_vocab);
            goto out;
        }
    if (make_prompt(c, &g, &prompt, &n_prompt, &code, msg, sizeof msg) != 0) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, code, 0, "%s", msg);
        goto out;
    }
    /* limits */
    int max_prompt = d->max_prompt_tokens > 0 && d->max_prompt_tokens < c->n_ctx ? d->max_prompt_tokens
                                                                                    : c->n_ctx - 1;
    if (n_prompt > max_prompt) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_PROMPT_TOO_LONG, 0,
                     "generate: the prompt has %d tokens, over the limit of %d (%s)", n_prompt,
                     max_prompt, d->max_prompt_tokens > 0 ? "max_prompt_tokens" : "the context length - 1");
        goto out;
    }
    int max_tokens = g.max_tokens;
    if (max_tokens > 0) {
        if (d->max_tokens_limit > 0 && max_tokens > d->max_tokens_limit) {
            client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_BAD_REQUEST, 0,
                         "generate: field 'max_tokens' must be at most %d (max_tokens_limit; got %d)",
                         d->max_tokens_limit, max_tokens);
            goto out;
        }
        if (n_prompt + max_tokens > c->n_ctx) {
            client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_PROMPT_TOO_LONG, 0,
                         "generate: %d prompt tokens + max_tokens %d exceed the context of %d tokens",
                         n_prompt, max_tokens, c->n_ctx);
            goto out;
        }
    } else {
        max_tokens = d->max_tokens_default;
        if (d->max_tokens_limit > 0 && max_tokens > d->max_tokens_limit) max_tokens = d->max_tokens_limit;
        if (max_tokens > c->n_ctx - n_prompt) max_tokens = c->n_ctx - n_prompt;
    }
    if (coord_groups_ready(c) == 0) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_UNAVAILABLE, retry_hint_ms(c),
                     "generate: no worker group can serve requests now (%d configured, none ready)",
                     c->n_groups);
        goto out;
    }
    int64_t cap = coord_max_capacity(c);
    if (blocks_of(c, n_prompt + 1) > cap) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_PROMPT_TOO_LONG, 0,
                     "generate: the prompt needs %d KV blocks; the largest group holds %lld",
                     blocks_of(c, n_prompt + 1), (long long)cap);
        goto out;
    }

    /* the request */
    r = calloc(1, sizeof *r);
    if (!r) goto oom;
    r->rid = c->next_rid++;
    r->client = cl;
    snprintf(r->id, sizeof r->id, "%s", g.id);
    r->prompt = prompt;
    prompt = NULL;
    r->n_prompt = n_prompt;
    r->sampling = g.sampling;
    if (r->sampling.seed < 0) r->sampling.seed = (int64_t)(sample_rng_next(&c->rng) & PROTO_MAX_INT);
    r->max_tokens = max_tokens;
    r->ignore_eos = g.ignore_eos;
    r->stream = g.stream;
    r->group = -1;
    r->pgroup = -1;
    r->avoid_group = -1;
    r->cached_tokens = -1;
    r->t_recv = coord_now_ms();
    if (g.session && !(r->session = strdup(g.session))) goto oom;
    if (g.n_stop > 0) {
        if (!(r->stops = calloc((size_t)g.n_stop, sizeof *r->stops))) goto oom;
        for (int i = 0; i < g.n_stop; i++, r->n_stops++)
            if (!(r->stops[i] = strdup(g.stop[i]))) goto oom;
    }
    if (g.n_stop_token_ids > 0) {
        if (!(r->stop_ids = malloc((size_t)g.n_stop_token_ids * sizeof *r->stop_ids))) goto oom;
        memcpy(r->stop_ids, g.stop_token_ids, (size_t)g.n_stop_token_ids * sizeof *r->stop_ids);
        r->n_stop_ids = g.n_stop_token_ids;
    }
    if (tok_stream_new(c->tok, 0, &r->ts) != 0) goto oom;

    /* admission */
    int any = 0;
    int runs_now = !c->q_head && coord_pick_group(c, r, &any) != NULL;
    if (!runs_now && (d->when_full == CONFIG_FULL_BUSY || c->n_queued >= d->queue_limit)) {
        client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_BUSY, retry_hint_ms(c),
                     d->when_full == CONFIG_FULL_BUSY
                         ? "generate: every group is at its limit (when_full = busy)"
                         : "generate: every group is at its limit and %d requests wait (queue_limit)",
                     c->n_queued);
        goto out;
    }
    if (cmap_put(&c->reqs, (uint64_t)r->rid, r) != 0) goto oom;
    r->cprev = cl->tail;
    if (cl->tail) cl->tail->cnext = r;
    else cl->head = r;
    cl->tail = r;
    cl->n_reqs++;
    cl->n_active++;
    if (sess) {
        sess->busy = r;
        sess->last_used = r->t_recv;
    }
    CDEBUG(c, "request %s (rid %lld): %d prompt tokens, max_tokens %d%s", r->id, (long long)r->rid,
           r->n_prompt, r->max_tokens, runs_now ? "" : ", queued");
    coord_queue_push(c, r, 0);
    coord_client_dirty(c, cl); /* accepted */
    coord_schedule(c);
    proto_generate_free(&g);
    return;
oom:
    client_error(c, cl, g.id, PROTO_CMD_GENERATE, PROTO_ERR_INTERNAL, 0, "generate: out of memory");
out:
    if (r) {
        r->client = NULL;
        cmap_del(&c->reqs, (uint64_t)r->rid, r);
        coord_req_free(c, r);
    }
    free(prompt);
    proto_generate_free(&g);
}

static void on_cancel(coord_t *c, cclient *cl, const json_t *body)
{
    proto_cancel m;
    proto_err err;
    memset(&err, 0, sizeof err);
    if (proto_cancel_parse(body, &m, &err) != 0) {
        client_error(c, cl, err.id, PROTO_CMD_CANCEL, err.code, 0, "%s", err.message);
        return;
    }
    creq *r = client_find(cl, m.id);
    if (!r || r->state > COORD_DECODING) {
        client_error(c, cl, m.id, PROTO_CMD_CANCEL, PROTO_ERR_NOT_FOUND, 0,
                     "cancel: no request '%s' in flight on this connection", m.id);
    } else {
        CDEBUG(c, "request %s (rid %lld) cancelled by its client", r->id, (long long)r->rid);
        if (r->listed == 2) coord_req_detach(c, r, 1);
        req_done(c, r, PROTO_FINISH_CANCELLED);
    }
    proto_cancel_free(&m);
}

static void on_empty(coord_t *c, cclient *cl, proto_type t, const json_t *body)
{
    proto_empty m;
    proto_err err;
    memset(&err, 0, sizeof err);
    proto_cmd cmd = t == PROTO_T_STATUS_REQ ? PROTO_CMD_STATUS : PROTO_CMD_HEALTH;
    if (proto_parse(t, body, &m, &err) != 0) {
        client_error(c, cl, err.id, cmd, err.code, 0, "%s", err.message);
        return;
    }
    proto_free(t, &m);
    client_reply(c, cl, cmd, cmd == PROTO_CMD_STATUS ? coord_status_json(c) : coord_health_json(c));
}

static void on_client_msg(coord_t *c, proto_rc rc, proto_msg *msg, const proto_err *err, int fd)
{
    cclient *cl = client_get(c, &msg->route, 1);
    if (!cl) {
        CERR(c, "out of memory recording a client; its message is dropped");
        return;
    }
    if (fd >= 0) cl->fd = fd;
    if (rc == PROTO_INVALID) {
        client_error(c, cl, err->id, err->cmd, err->code, 0, "%s", err->message);
    } else {
        switch (msg->cmd) {
        case PROTO_CMD_GENERATE: on_generate(c, cl, msg->body); break;
        case PROTO_CMD_CANCEL: on_cancel(c, cl, msg->body); break;
        case PROTO_CMD_STATUS: on_empty(c, cl, PROTO_T_STATUS_REQ, msg->body); break;
        case PROTO_CMD_HEALTH: on_empty(c, cl, PROTO_T_HEALTH_REQ, msg->body); break;
        default:
            client_error(c, cl, NULL, msg->cmd, PROTO_ERR_UNEXPECTED_COMMAND, 0,
                         "frame 1: '%s' is not a request duetd serves", proto_cmd_name(msg->cmd));
        }
    }
    if (cl->n_reqs == 0 && !cl->oq_head && !cl->in_flush) client_free(c, cl);
}

/* ---- receiving ---------------------------------------------------------------------------------- */

/* One message from sock without waiting. *fd: the connection it came on (-1 unknown). */
static proto_rc recv_one(void *sock, proto_side side, proto_msg *msg, proto_err *err, int *fd)
{
    zmq_msg_t parts[MAX_FRAMES];
    int n_have = 0, n_total = 0, more = 1;
    proto_rc out = PROTO_OK;
    *fd = -1;
    msg->body = NULL;
    msg->route.n = 0;
    msg->cmd = PROTO_CMD_NONE;
    while (more) {
        zmq_msg_t scratch, *m = n_have < MAX_FRAMES ? &parts[n_have] : &scratch;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, sock, ZMQ_DONTWAIT) < 0) {
            int e = errno;
            zmq_msg_close(m);
            out = e == EAGAIN && n_total == 0 ? PROTO_TIMEOUT : PROTO_SYSERR;
            proto_err_set(err, PROTO_ERR_INTERNAL, "zmq_msg_recv: %s", zmq_strerror(e));
            break;
        }
        /* the routing frame that a ROUTER prefetched for zmq_poll carries no fd: take
         * the first frame that came from the wire */
        if (*fd < 0) *fd = zmq_msg_get(m, ZMQ_SRCFD);
        more = zmq_msg_more(m);
        if (m == &scratch) zmq_msg_close(m);
        else n_have++;
        n_total++;
    }
    if (out == PROTO_OK) {
        proto_frame frames[MAX_FRAMES];
        for (int i = 0; i < n_have; i++) {
            frames[i].data = zmq_msg_data(&parts[i]);
            frames[i].size = zmq_msg_size(&parts[i]);
        }
        out = proto_decode(frames, n_have, side, 1, msg, err);
        if (out == PROTO_INVALID && err->code == PROTO_ERR_BAD_FRAMES && n_total > n_have)
            snprintf(err->message, sizeof err->message,
                     "expected 3 frames (tag, command, body) after 1 routing frame, got %d", n_total - 1);
    }
    for (int i = 0; i < n_have; i++) zmq_msg_close(&parts[i]);
    return out;
}

static void drain_monitor(coord_t *c, void *mon, int clients);

static void drain_socket(coord_t *c, void *sock, proto_side side)
{
    int clients = side == PROTO_SIDE_DUETD_CLIENTS;
    void *mon = clients ? c->cmon : c->wmon;
    for (int k = 0; k < RECV_BATCH; k++) {
        proto_msg msg;
        proto_err err;
        memset(&err, 0, sizeof err);
        int fd;
        proto_rc rc = recv_one(sock, side, &msg, &err, &fd);
        if (rc == PROTO_TIMEOUT) return;
        if (rc == PROTO_SYSERR) {
            if (errno != EINTR) CERR(c, "receiving: %s", err.message);
            return;
        }
        /* A closed connection's fd is reused by the next one accepted. Its DISCONNECTED
         * event is queued on the monitor before the fd is closed, so before any message
         * of a later connection on that fd arrives: take those events now, or the new
         * client (or worker) would be taken for the one that left when they come. */
        if (mon) drain_monitor(c, mon, clients);
        if (clients) {
            on_client_msg(c, rc, &msg, &err, fd);
        } else if (rc == PROTO_INVALID) {
            CWARN(c, "worker message refused: %s: %s", proto_code_name(err.code), err.message);
            proto_send_error(sock, &msg.route, PROTO_WORKER, &err, ZMQ_DONTWAIT);
        } else {
            coord_worker_msg(c, &msg, fd);
        }
        proto_msg_clear(&msg);
    }
}

/* Socket monitor events: a closed connection's fd. */
static void drain_monitor(coord_t *c, void *mon, int clients)
{
    for (int k = 0; k < RECV_BATCH; k++) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, mon, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&m);
            return;
        }
        uint16_t ev = 0;
        uint32_t value = 0;
        if (zmq_msg_size(&m) >= 6) {
            memcpy(&ev, zmq_msg_data(&m), 2);
            memcpy(&value, (char *)zmq_msg_data(&m) + 2, 4);
        }
        int more = zmq_msg_more(&m);
        zmq_msg_close(&m);
        while (more) { /* the endpoint frame */
            zmq_msg_init(&m);
            if (zmq_msg_recv(&m, mon, ZMQ_DONTWAIT) < 0) more = 0;
            else more = zmq_msg_more(&m);
            zmq_msg_close(&m);
        }
        if (ev != ZMQ_EVENT_DISCONNECTED) continue;
        int fd = (int)value;
        if (!clients) {
            coord_worker_disconnected(c, fd);
            continue;
        }
        for (size_t i = 0; i < c->clients.cap; i++) {
            cclient *cl = c->clients.vals[i];
            if (cl && cl->fd == fd && !cl->gone) {
                CDEBUG(c, "client fd %d disconnected", fd);
                cl->gone = 1;
                coord_client_dirty(c, cl);
            }
        }
    }
}

/* ---- life cycle ------------------------------------------------------------------------------- */

static int model_int(const gguf_t *g, const char *arch, const char *key, int64_t *out)
{
    char k[160];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    return gguf_get_int(g, k, out) == GGUF_OK ? 0 : -1;
}

static int load_chat(coord_t *c, const gguf_t *g)
{
    chat_template_free(&c->chat);
    const char *style = c->cfg->model.chat_style == CONFIG_CHAT_AUTO ? NULL
                                                                        : config_chat_name(c->cfg->model.chat_style);
    char *tmpl = g ? gguf_get_str_dup(g, "tokenizer.chat_template") : NULL;
    int rc;
    if (g) {
        rc = chat_template_init(&c->chat, tmpl, style, c->chat_err, sizeof c->chat_err);
    } else {
        /* a reload without the file at hand: keep the default system prompt */
        chat_style st;
        rc = style ? chat_style_from_name(style, &st) : -1;
        if (rc == 0) c->chat.style = st;
        else snprintf(c->chat_err, sizeof c->chat_err, "chat_style auto needs the model's template");
    }
    free(tmpl);
    c->chat_ok = rc == 0;
    return rc;
}

static int load_model(coord_t *c, char *err, size_t errlen)
{
    const char *path = c->cfg->model.path;
    gguf_t *g = NULL;
    char why[512];
    if (gguf_open(path, &g, why, sizeof why) != 0) {
        snprintf(err, errlen, "model: %s", why);
        return -1;
    }
    int rc = -1;
    if (tok_new_from_gguf(g, &c->tok, why, sizeof why) != 0) {
        snprintf(err, errlen, "model %s: tokenizer: %s", path, why);
        goto out;
    }
    c->n_vocab = tok_n_vocab(c->tok);
    char *arch = gguf_get_str_dup(g, "general.architecture");
    int64_t v;
    c->n_ctx = arch && model_int(g, arch, "context_length", &v) == 0 && v > 1 && v <= INT32_MAX ? (int)v : 4096;
    c->n_head = arch && model_int(g, arch, "attention.head_count", &v) == 0 && v > 0 ? (int)v : 0;
    c->n_head_kv = arch && model_int(g, arch, "attention.head_count_kv", &v) == 0 && v > 0 ? (int)v : c->n_head;
    c->n_layer = arch && model_int(g, arch, "block_count", &v) == 0 && v > 0 ? (int)v : 0;
    free(arch);
    if (c->cfg->model.max_context > 0) c->n_ctx = c->cfg->model.max_context;
    if (load_chat(c, g) != 0) CWARN(c, "model %s: chat requests will be refused: %s", path, c->chat_err);
    const char *name = c->cfg->model.name && *c->cfg->model.name ? c->cfg->model.name : NULL;
    char *gname = name ? NULL : gguf_get_str_dup(g, "general.name");
    snprintf(c->model_name, sizeof c->model_name, "%s", name ? name : gname ? gname : path);
    free(gname);
    const char *given = c->opts.model_sha256;
    if (given && strlen(given) == 64 && strspn(given, "0123456789abcdef") == 64) {
        memcpy(c->sha256, given, 65);
    } else if (coord_sha256_hex(gguf_base(g), gguf_file_size(g), c->sha256) != 0) {
        snprintf(err, errlen, "model %s: computing its SHA-256 failed", path);
        goto out;
    }
    rc = 0;
out:
    gguf_close(&g);
    return rc;
}

static void *open_socket(coord_t *c, int type, proto_side side, const char *ep, char *bound,
                         void **mon, const char *what, char *err, size_t errlen)
{
    void *s = zmq_socket(c->zctx, type);
    if (!s) {
        snprintf(err, errlen, "%s socket: %s", what, zmq_strerror(errno));
        return NULL;
    }
    int hb = c->cfg->daemon.heartbeat_ms;
    if (proto_socket_options(s, side, hb) != 0) goto fail;
    if (side == PROTO_SIDE_DUETD_CLIENTS) {
        if (c->opts.client_sndhwm > 0 &&
            zmq_setsockopt(s, ZMQ_SNDHWM, &c->opts.client_sndhwm, sizeof(int)) != 0)
            goto fail;
        if (c->opts.client_sndbuf > 0 &&
            zmq_setsockopt(s, ZMQ_SNDBUF, &c->opts.client_sndbuf, sizeof(int)) != 0)
            goto fail;
    } else {
        int hwm = 100000; /* workers read their socket; a full pipe means a stuck worker */
        if (zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm) != 0) goto fail;
    }
    char mep[64];
    snprintf(mep, sizeof mep, "inproc://duetd-mon-%p-%s", (void *)c, what);
    if (zmq_socket_monitor(s, mep, ZMQ_EVENT_DISCONNECTED) != 0) goto fail;
    *mon = zmq_socket(c->zctx, ZMQ_PAIR);
    if (!*mon || zmq_connect(*mon, mep) != 0) goto fail;
    if (zmq_bind(s, ep) != 0) {
        snprintf(err, errlen, "%s socket: binding %s: %s", what, ep, zmq_strerror(errno));
        zmq_close(s);
        return NULL;
    }
    size_t len = PROTO_MAX_ENDPOINT + 1;
    if (zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, bound, &len) != 0) snprintf(bound, 8, "?");
    return s;
fail:
    snprintf(err, errlen, "%s socket: %s", what, zmq_strerror(errno));
    zmq_close(s);
    return NULL;
}

int coord_new(duet_config **cfg_p, const coord_opts *opts, coord_t **out, char *err, size_t errlen)
{
    *out = NULL;
    if (!cfg_p || !*cfg_p) {
        snprintf(err, errlen, "coord_new: no configuration");
        return -1;
    }
    coord_t *c = calloc(1, sizeof *c);
    if (!c) {
        config_free(cfg_p);
        snprintf(err, errlen, "coord_new: out of memory");
        return -1;
    }
    c->cfg = *cfg_p;
    *cfg_p = NULL;
    if (opts) c->opts = *opts;
    else coord_opts_default(&c->opts);
    c->efd = -1;
    c->log_level = (int)c->cfg->daemon.log_level;
    c->next_rid = 1;
    c->block_tokens = 16;
    c->t_start = coord_now_ms();
    uint64_t seed;
    if (getrandom(&seed, sizeof seed, 0) != (ssize_t)sizeof seed) seed = (uint64_t)c->t_start ^ (uint64_t)getpid();
    sample_rng_seed(&c->rng, seed);
    if (load_model(c, err, errlen) != 0) goto fail;
    if (coord_groups_init(c, err, errlen) != 0) goto fail;
    c->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (c->efd < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        goto fail;
    }
    c->zctx = zmq_ctx_new();
    if (!c->zctx) {
        snprintf(err, errlen, "zmq_ctx_new: %s", zmq_strerror(errno));
        goto fail;
    }
    const char *cep = c->opts.client_endpoint ? c->opts.client_endpoint : c->cfg->daemon.client_endpoint;
    const char *wep = c->opts.worker_endpoint ? c->opts.worker_endpoint : c->cfg->daemon.worker_endpoint;
    c->csock = open_socket(c, ZMQ_ROUTER, PROTO_SIDE_DUETD_CLIENTS, cep, c->cep, &c->cmon, "client", err, errlen);
    if (!c->csock) goto fail;
    c->wsock = open_socket(c, ZMQ_ROUTER, PROTO_SIDE_DUETD_WORKERS, wep, c->wep, &c->wmon, "worker", err, errlen);
    if (!c->wsock) goto fail;
    CINFO(c, "model %s (%s, sha256 %.12s..., %d tokens of context); clients on %s, workers on %s",
          c->cfg->model.path, c->model_name, c->sha256, c->n_ctx, c->cep, c->wep);
    *out = c;
    return 0;
fail:
    coord_destroy(&c);
    return -1;
}

void coord_destroy(coord_t **self_p)
{
    if (!self_p || !*self_p) return;
    coord_t *c = *self_p;
    *self_p = NULL;
    /* requests and clients */
    for (size_t i = 0; i < c->clients.cap; i++) {
        cclient *cl = c->clients.vals[i];
        if (!cl) continue;
        while (cl->head) coord_req_free(c, cl->head);
    }
    while (c->q_head) coord_req_free(c, c->q_head); /* none left: every request has a client */
    for (size_t i = 0; i < c->clients.cap; i++) {
        cclient *cl = c->clients.vals[i];
        if (!cl) continue;
        while (cl->oq_head) {
            coutmsg *m = cl->oq_head;
            cl->oq_head = m->next;
            outmsg_free(m);
        }
        free(cl);
    }
    cmap_free(&c->clients);
    cmap_free(&c->reqs);
    for (size_t i = 0; i < c->sessions.cap; i++) {
        csession *s = c->sessions.vals[i];
        if (s) {
            free(s->id);
            free(s);
        }
    }
    cmap_free(&c->sessions);
    free(c->flush);
    coord_workers_free(c);
    if (c->cmon) zmq_close(c->cmon);
    if (c->wmon) zmq_close(c->wmon);
    if (c->csock) zmq_close(c->csock);
    if (c->wsock) zmq_close(c->wsock);
    if (c->zctx) zmq_ctx_term(c->zctx);
    if (c->efd >= 0) close(c->efd);
    tok_destroy(&c->tok);
    chat_template_free(&c->chat);
    config_free(&c->cfg);
    free(c);
}

void coord_signal(coord_t *c, int sig)
{
    atomic_fetch_or(&c->sigs, sig);
    uint64_t one = 1;
    ssize_t w = write(c->efd, &one, sizeof one);
    (void)w; /* a full counter already wakes the loop */
}

const char *coord_client_endpoint(const coord_t *c) { return c->cep; }
const char *coord_worker_endpoint(const coord_t *c) { return c->wep; }
const char *coord_model_sha256(const coord_t *c) { return c->sha256; }
const tok_t *coord_tok(const coord_t *c) { return c->tok; }
int coord_n_ctx(const coord_t *c) { return c->n_ctx; }

/* ---- reload, drain ---------------------------------------------------------------------------- */

static void reload(coord_t *c)
{
    const char *path = c->cfg->source;
    if (!path || !*path) {
        CWARN(c, "reload: the configuration has no file to re-read");
        return;
    }
    duet_config *nc = NULL;
    char err[8192];
    if (config_load(path, &nc, err, sizeof err) != 0) {
        CERR(c, "reload of %s refused: the file has errors:", path);
        char *sv = NULL;
        for (char *line = strtok_r(err, "\n", &sv); line; line = strtok_r(NULL, "\n", &sv))
            CERR(c, "  %s", line);
        return;
    }
    char diff[8192];
    int restart = config_diff_reloadable(c->cfg, nc, diff, sizeof diff);
    if (restart != 0) {
        CERR(c, "reload of %s refused: %d changes need a restart (nothing applied):", path, restart);
        char *sv = NULL;
        for (char *line = strtok_r(diff, "\n", &sv); line; line = strtok_r(NULL, "\n", &sv))
            CERR(c, "  %s", line);
        config_free(&nc);
        return;
    }
    char note[128];
    snprintf(note, sizeof note, "RELOADING=1\nMONOTONIC_USEC=%llu",
             (unsigned long long)(coord_now_ms() * 1000.0));
    coord_notify(c, note);
    int chat_changed = nc->model.chat_style != c->cfg->model.chat_style;
    int name_changed = strcmp(nc->model.name ? nc->model.name : "", c->cfg->model.name ? c->cfg->model.name : "") != 0;
    duet_config *old = c->cfg;
    c->cfg = nc;
    coord_groups_rebind(c);
    c->log_level = (int)c->cfg->daemon.log_level;
    if (chat_changed || name_changed) {
        gguf_t *g = NULL;
        char why[512];
        if (gguf_open(c->cfg->model.path, &g, why, sizeof why) != 0)
            CWARN(c, "reload: %s (chat style and name stay as they were)", why);
        if (g && chat_changed && load_chat(c, g) != 0)
            CWARN(c, "reload: chat requests will be refused: %s", c->chat_err);
        if (g && name_changed) {
            const char *name = c->cfg->model.name && *c->cfg->model.name ? c->cfg->model.name : NULL;
            char *gname = name ? NULL : gguf_get_str_dup(g, "general.name");
            snprintf(c->model_name, sizeof c->model_name, "%s", name ? name : gname ? gname : c->cfg->model.path);
            free(gname);
        }
        gguf_close(&g);
    }
    char *sv = NULL;
    if (*diff)
        for (char *line = strtok_r(diff, "\n", &sv); line; line = strtok_r(NULL, "\n", &sv))
            CINFO(c, "reload: %s", line);
    else
        CINFO(c, "reload: %s unchanged", path);
    config_free(&old);
    coord_notify(c, "READY=1");
    coord_schedule(c); /* limits may have grown */
}

/* Every running request ends with `error` code (drain timeout, stop). */
static void fail_all(coord_t *c, proto_code code, const char *msg)
{
    for (size_t i = 0; i < c->clients.cap; i++) {
        cclient *cl = c->clients.vals[i];
        if (!cl) continue;
        creq *next;
        for (creq *r = cl->head; r; r = next) {
            next = r->cnext;
            if (r->state <= COORD_DECODING) req_error(c, r, COORD_CANCELLED, 0, code, msg);
        }
    }
}

static void handle_sigs(coord_t *c, int sigs)
{
    if (sigs & COORD_SIG_RELOAD) reload(c);
    if (sigs & COORD_SIG_STOP) {
        CINFO(c, "stopping now");
        c->phase = COORD_DONE;
        return;
    }
    if (sigs & COORD_SIG_DRAIN) {
        if (c->phase == COORD_RUNNING) {
            c->phase = COORD_DRAINING;
            c->drain_deadline = coord_now_ms() + c->opts.drain_timeout_ms;
            CINFO(c, "draining: no new requests; %d running and %d queued may finish within %d ms",
                  c->n_running, c->n_queued, c->opts.drain_timeout_ms);
            coord_notify(c, "STOPPING=1");
            coord_notify_status(c);
        }
    }
}

static void read_signalfd(coord_t *c)
{
    struct signalfd_siginfo si;
    while (read(c->opts.signal_fd, &si, sizeof si) == (ssize_t)sizeof si) {
        if (si.ssi_signo == SIGHUP) {
            handle_sigs(c, COORD_SIG_RELOAD);
        } else if (si.ssi_signo == SIGTERM || si.ssi_signo == SIGINT) {
            if (c->n_sigterm++ > 0) {
                CWARN(c, "second %s: stopping without waiting", si.ssi_signo == SIGTERM ? "SIGTERM" : "SIGINT");
                handle_sigs(c, COORD_SIG_STOP);
            } else {
                handle_sigs(c, COORD_SIG_DRAIN);
            }
        }
    }
}

static void tick(coord_t *c, double now)
{
    coord_worker_tick(c, now);
    int timeout = c->cfg->daemon.request_timeout_ms;
    if (timeout > 0) {
        for (size_t i = 0; i < c->reqs.cap; i++) {
            creq *r = c->reqs.vals[i];
            if (r && r->state <= COORD_DECODING && now - r->t_recv > timeout) {
                char msg[PROTO_MAX_TEXT];
                snprintf(msg, sizeof msg, "the request ran past request_timeout_ms (%d ms)", timeout);
                req_error(c, r, COORD_CANCELLED, 0, PROTO_ERR_CANCELLED, msg);
                i = (size_t)-1; /* the map changed under the scan: start over */
            }
        }
    }
    coord_notify_status(c);
}

int coord_run(coord_t *c)
{
    coord_notify(c, "READY=1");
    coord_notify_status(c);
    int hb = c->cfg->daemon.heartbeat_ms;
    int period = hb / 4 < TICK_MIN_MS ? TICK_MIN_MS : hb / 4 > TICK_MAX_MS ? TICK_MAX_MS : hb / 4;
    c->next_tick = coord_now_ms() + period;
    double flush_deadline = 0;
    int rc = 0, retry_ms = BLOCKED_RETRY_MS;
    while (c->phase != COORD_DONE) {
        double now = coord_now_ms();
        int timeout = (int)(c->next_tick - now);
        if (timeout < 0) timeout = 0;
        if (c->n_flush > 0 && timeout > retry_ms) timeout = retry_ms;
        zmq_pollitem_t items[6] = {
            {.socket = c->wsock, .events = ZMQ_POLLIN},
            {.socket = c->csock, .events = ZMQ_POLLIN},
            {.socket = c->wmon, .events = ZMQ_POLLIN},
            {.socket = c->cmon, .events = ZMQ_POLLIN},
            {.fd = c->efd, .events = ZMQ_POLLIN},
            {.fd = c->opts.signal_fd, .events = ZMQ_POLLIN},
        };
        int n_items = c->opts.signal_fd >= 0 ? 6 : 5;
        if (zmq_poll(items, n_items, timeout) < 0) {
            if (errno == EINTR) continue;
            CERR(c, "zmq_poll: %s", zmq_strerror(errno));
            rc = -1;
            break;
        }
        if (items[4].revents & ZMQ_POLLIN) {
            uint64_t v;
            ssize_t rd = read(c->efd, &v, sizeof v);
            (void)rd;
            handle_sigs(c, atomic_exchange(&c->sigs, 0));
            if (c->phase == COORD_DONE) break;
        }
        if (n_items == 6 && (items[5].revents & ZMQ_POLLIN)) {
            read_signalfd(c);
            if (c->phase == COORD_DONE) break;
        }
        if (items[2].revents & ZMQ_POLLIN) drain_monitor(c, c->wmon, 0);
        if (items[3].revents & ZMQ_POLLIN) drain_monitor(c, c->cmon, 1);
        if (items[0].revents & ZMQ_POLLIN) drain_socket(c, c->wsock, PROTO_SIDE_DUETD_WORKERS);
        if (items[1].revents & ZMQ_POLLIN) drain_socket(c, c->csock, PROTO_SIDE_DUETD_CLIENTS);
        now = coord_now_ms();
        if (now >= c->next_tick) {
            tick(c, now);
            c->next_tick = now + period;
        }
        coord_schedule(c);
        int had = c->n_flush;
        if (flush_all(c) > 0 || c->n_flush < had) retry_ms = BLOCKED_RETRY_MS;
        else if (c->n_flush > 0 && retry_ms < BLOCKED_RETRY_MAX) retry_ms *= 2;
        if (c->phase == COORD_DRAINING) {
            if (c->n_queued + c->n_running > 0 && now >= c->drain_deadline) {
                CWARN(c, "drain: drain_timeout_ms ran out; cancelling %d requests", c->n_queued + c->n_running);
                fail_all(c, PROTO_ERR_CANCELLED, "duetd is shutting down: the drain time ran out");
                flush_all(c);
            }
            if (c->n_queued + c->n_running == 0) {
                if (flush_deadline == 0) flush_deadline = now + DRAIN_FLUSH_MS;
                if (c->n_flush == 0 || now >= flush_deadline) {
                    CINFO(c, "drained");
                    c->phase = COORD_DONE;
                }
            }
        }
    }
    /* leaving: running requests are cancelled at their workers */
    for (size_t i = 0; i < c->reqs.cap; i++) {
        creq *r = c->reqs.vals[i];
        if (r && r->listed == 2) coord_req_detach(c, r, 1);
    }
    return rc;
}
