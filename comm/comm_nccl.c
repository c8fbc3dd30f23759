/* comm/comm_nccl.c: the NCCL backend's host logic (comm_nccl.h), plain C: order, batching,
 * events, error polling, abort and rebuild, bootstrap. Every NCCL or CUDA call goes through
 * the comm_nccl_api table.
 *
 * Locking: the owner thread takes n->mu around its api calls; the watchdog thread takes it to
 * poll and abort. Blocking loops release it while they sleep. Functions named *_locked run
 * with it held.
 */
#include "comm/comm_nccl.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEFAULT_INIT_TIMEOUT_MS 120000
#define DEFAULT_MAX_BATCH 128
#define GROUP_ID_TAG UINT64_MAX /* the id exchange of comm_nccl_group_new (no transfer) */
#define POLL_SLEEP_NS 20000     /* blocking loops sleep this long between polls */

enum { OP_SEND = 0, OP_RECV = 1 };
enum { ST_QUEUED = 0, ST_ISSUED, ST_DONE, ST_FAILED };

typedef struct nbatch nbatch;
typedef struct nxfer nxfer;

struct comm_nccl_op {
    comm_nccl_t *n;
    int kind;            /* OP_SEND, OP_RECV */
    int peer;
    uint64_t tag;
    void *buf;
    size_t len;
    void *after_user;    /* the caller's event, or NULL */
    void *after_own;     /* our event on the compute stream (when after_user is NULL) */
    nxfer *x;            /* its transfer while queued, or NULL */
    uint64_t seq;        /* the transfer's seq (for messages) */
    int has_seq;
    int state;           /* ST_* */
    int orphan;          /* the caller let go while it ran: freed when it ends */
    comm_status err;     /* ST_FAILED: why */
    char msg[224];
    nbatch *batch;       /* ST_ISSUED: its group */
    comm_nccl_op *qprev, *qnext; /* the queue (ST_QUEUED) */
    comm_nccl_op *aprev, *anext; /* every op of n */
};

struct nbatch {
    void *ev;            /* recorded after the group (NULL while its group end is pending) */
    comm_nccl_op **ops;  /* [n_ops] */
    int n_ops;
    nbatch *next;
};

struct nxfer {
    uint64_t tag, chan, seq;
    int ended;           /* every op posted */
    int gone;            /* released or skipped */
    int n_posted, n_issued;
    nxfer *next;
};

typedef struct nchan {
    uint64_t chan;
    uint64_t next_seq;   /* the transfer that may issue now */
    struct nchan *next;
} nchan;

struct comm_nccl_group {
    comm_nccl_t *n;      /* NULL once n is destroyed */
    int *ranks;          /* [nr] world ranks */
    int nr, index;
    void *gcomm;
    int dead;            /* aborted by the watchdog */
    comm_nccl_state state;
    void *stream;
    char fail[256];
    comm_nccl_group_t *next;
};

struct comm_nccl {
    comm_t *comm;
    comm_nccl_api api;
    comm_nccl_opts opts;
    pthread_mutex_t mu;
    pthread_cond_t wd_cv;
    pthread_t wd;
    int wd_on, wd_stop;
    comm_nccl_state state;
    int epoch;
    int rank, size;
    void *ncomm;
    int ncomm_dead;      /* aborted by the watchdog: the owner fails the ops */
    char dead_msg[256];
    double init_deadline;
    nbatch *busy;        /* a batch whose group end returned PENDING */
    void *xstream, *cstream;
    comm_nccl_op *qhead, *qtail; /* queued ops, in posting order */
    comm_nccl_op *all;   /* every op */
    nbatch *bhead, *btail;       /* issued groups, in issue order */
    nxfer *xfers;
    nchan *chans;
    void **evpool;
    int n_ev, cap_ev;
    unsigned char *blocked; /* [2 * size] scratch of the issue scan */
    int cap_blocked;
    comm_nccl_op **scan;    /* [cap_scan] scratch of the issue scan */
    int cap_scan;
    int n_queued;           /* ops in the queue */
    comm_nccl_group_t *groups;
    int n_in_flight;
    char fail[256];
};

/* ---- small helpers -------------------------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void nap(void)
{
    struct timespec ts = {0, POLL_SLEEP_NS};
    nanosleep(&ts, NULL);
}

static double deadline_of(int timeout_ms)
{
    return timeout_ms < 0 ? -1 : now_ms() + timeout_ms;
}

static int past(double deadline)
{
    return deadline >= 0 && now_ms() >= deadline;
}

static void nerr(comm_nccl_t *n, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void nerr(comm_nccl_t *n, const char *fmt, ...)
{
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n->comm) comm_set_error(n->comm, "%s", buf);
}

static const char *api_msg(comm_nccl_t *n)
{
    const char *m = n->api.last_error ? n->api.last_error(n->api.ctx) : NULL;
    return m && *m ? m : "no message";
}

static const char *rc_name(int rc)
{
    switch (rc) {
    case NCCL_API_OK: return "ok";
    case NCCL_API_PENDING: return "in progress";
    case NCCL_API_REMOTE: return "remote error";
    default: return "error";
    }
}

const char *comm_nccl_state_name(comm_nccl_state s)
{
    switch (s) {
    case COMM_NCCL_NONE: return "none";
    case COMM_NCCL_INIT: return "init";
    case COMM_NCCL_UP: return "up";
    case COMM_NCCL_FAILED: return "failed";
    }
    return "?";
}

/* ---- events --------------------------------------------------------------------------------- */

static void *ev_get_locked(comm_nccl_t *n)
{
    if (n->n_ev > 0) return n->evpool[--n->n_ev];
    void *ev = NULL;
    if (n->api.event_new(n->api.ctx, &ev) != NCCL_API_OK) {
        nerr(n, "nccl: creating an event failed: %s", api_msg(n));
        return NULL;
    }
    return ev;
}

static void ev_put_locked(comm_nccl_t *n, void *ev)
{
    if (!ev) return;
    if (n->n_ev == n->cap_ev) {
        int cap = n->cap_ev ? 2 * n->cap_ev : 16;
        void **p = realloc(n->evpool, (size_t)cap * sizeof *p);
        if (!p) {
            n->api.event_free(n->api.ctx, ev);
            return;
        }
        n->evpool = p;
        n->cap_ev = cap;
    }
    n->evpool[n->n_ev++] = ev;
}

/* ---- channels and transfers ----------------------------------------------------------------- */

uint64_t comm_nccl_chan(int src_group, int dst_group)
{
    return ((uint64_t)(uint32_t)src_group << 32) | (uint32_t)dst_group;
}

static nchan *chan_find(comm_nccl_t *n, uint64_t chan, int create)
{
    for (nchan *c = n->chans; c; c = c->next)
        if (c->chan == chan) return c;
    if (!create) return NULL;
    nchan *c = calloc(1, sizeof *c);
    if (!c) return NULL;
    c->chan = chan;
    c->next = n->chans;
    n->chans = c;
    return c;
}

static nxfer *xfer_by_tag(comm_nccl_t *n, uint64_t tag)
{
    for (nxfer *x = n->xfers; x; x = x->next)
        if (!x->gone && x->tag == tag) return x;
    return NULL;
}

static nxfer *xfer_by_seq(comm_nccl_t *n, uint64_t chan, uint64_t seq)
{
    for (nxfer *x = n->xfers; x; x = x->next)
        if (x->chan == chan && x->seq == seq) return x;
    return NULL;
}

static void xfer_unlink(comm_nccl_t *n, nxfer *x)
{
    for (nxfer **p = &n->xfers; *p; p = &(*p)->next)
        if (*p == x) {
            *p = x->next;
            free(x);
            return;
        }
}

/* Move every channel past the transfers that are over (ended with all issued, released,
 * skipped). */
static void chans_advance(comm_nccl_t *n)
{
    for (nchan *c = n->chans; c; c = c->next)
        for (;;) {
            nxfer *x = xfer_by_seq(n, c->chan, c->next_seq);
            if (!x) break;
            if (!x->gone && !(x->ended && x->n_issued == x->n_posted)) break;
            xfer_unlink(n, x);
            c->next_seq++;
        }
}

static void xfers_clear(comm_nccl_t *n)
{
    while (n->xfers) {
        nxfer *x = n->xfers;
        n->xfers = x->next;
        free(x);
    }
    while (n->chans) {
        nchan *c = n->chans;
        n->chans = c->next;
        free(c);
    }
}

/* ---- ops ------------------------------------------------------------------------------------ */

static void q_remove(comm_nccl_t *n, comm_nccl_op *o)
{
    n->n_queued--;
    if (o->qprev) o->qprev->qnext = o->qnext;
    else n->qhead = o->qnext;
    if (o->qnext) o->qnext->qprev = o->qprev;
    else n->qtail = o->qprev;
    o->qprev = o->qnext = NULL;
}

static void op_unlink_free(comm_nccl_t *n, comm_nccl_op *o)
{
    if (o->aprev) o->aprev->anext = o->anext;
    else n->all = o->anext;
    if (o->anext) o->anext->aprev = o->aprev;
    free(o);
}

static const char *kind_name(int k)
{
    return k == OP_SEND ? "send to" : "receive from";
}

/* "send to rank 1 (tag 9, seq 4)" */
static void op_what(const comm_nccl_op *o, char *buf, size_t cap)
{
    if (o->has_seq)
        snprintf(buf, cap, "%s rank %d (tag %llu, seq %llu)", kind_name(o->kind), o->peer,
                 (unsigned long long)o->tag, (unsigned long long)o->seq);
    else
        snprintf(buf, cap, "%s rank %d (tag %llu)", kind_name(o->kind), o->peer,
                 (unsigned long long)o->tag);
}

/* End o (queued or issued, not in a list any more) with err: the caller sees it in test; an
 * orphan is freed. */
static void op_end_locked(comm_nccl_t *n, comm_nccl_op *o, comm_status err, const char *why)
{
    if (o->after_own) {
        ev_put_locked(n, o->after_own);
        o->after_own = NULL;
    }
    o->batch = NULL;
    o->x = NULL;
    n->n_in_flight--;
    if (err == COMM_OK) {
        o->state = ST_DONE;
    } else {
        char what[96];
        op_what(o, what, sizeof what);
        o->state = ST_FAILED;
        o->err = err;
        snprintf(o->msg, sizeof o->msg, "nccl: %s failed: %s", what, why);
    }
    if (o->orphan) op_unlink_free(n, o);
}

static void batch_free_locked(comm_nccl_t *n, nbatch *b)
{
    ev_put_locked(n, b->ev);
    free(b->ops);
    free(b);
}

/* ---- failure -------------------------------------------------------------------------------- */

/* The communicator failed: abort it, end every unfinished op with COMM_ERR_PEER. */
static void fail_comm_locked(comm_nccl_t *n, const char *why)
{
    if (n->ncomm) {
        if (!n->ncomm_dead) n->api.comm_abort(n->api.ctx, n->ncomm);
        n->ncomm = NULL;
    }
    n->ncomm_dead = 0;
    n->busy = NULL;
    if (n->state == COMM_NCCL_INIT || n->state == COMM_NCCL_UP)
        snprintf(n->fail, sizeof n->fail, "%s (communicator %d aborted)", why, n->epoch);
    n->state = COMM_NCCL_FAILED;
    while (n->bhead) {
        nbatch *b = n->bhead;
        n->bhead = b->next;
        for (int i = 0; i < b->n_ops; i++) op_end_locked(n, b->ops[i], COMM_ERR_PEER, n->fail);
        batch_free_locked(n, b);
    }
    n->btail = NULL;
    while (n->qhead) {
        comm_nccl_op *o = n->qhead;
        q_remove(n, o);
        op_end_locked(n, o, COMM_ERR_PEER, n->fail);
    }
    xfers_clear(n);
    nerr(n, "nccl: %s", n->fail);
}

static void group_fail_locked(comm_nccl_group_t *g, const char *why)
{
    comm_nccl_t *n = g->n;
    if (g->gcomm) {
        if (!g->dead) n->api.comm_abort(n->api.ctx, g->gcomm);
        g->gcomm = NULL;
    }
    g->dead = 0;
    if (g->state != COMM_NCCL_FAILED)
        snprintf(g->fail, sizeof g->fail, "group of %d ranks (index %d): %s", g->nr, g->index, why);
    g->state = COMM_NCCL_FAILED;
    nerr(n, "nccl: %s", g->fail);
}

/* Map an api failure to a reason and fail the communicator. */
static void fail_call_locked(comm_nccl_t *n, const char *call, int rc)
{
    char why[320];
    snprintf(why, sizeof why, "%s: %s: %s", call, rc_name(rc), api_msg(n));
    fail_comm_locked(n, why);
}

/* ---- the watchdog --------------------------------------------------------------------------- */

static void *watchdog_main(void *arg)
{
    comm_nccl_t *n = arg;
    pthread_mutex_lock(&n->mu);
    while (!n->wd_stop) {
        struct timespec ts;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        long long ns = (long long)ts.tv_nsec + (long long)n->opts.watchdog_ms * 1000000LL;
        ts.tv_sec += (time_t)(ns / 1000000000LL);
        ts.tv_nsec = (long)(ns % 1000000000LL);
        int rc = pthread_cond_timedwait(&n->wd_cv, &n->mu, &ts);
        if (n->wd_stop) break;
        if (rc != ETIMEDOUT) continue;
        if (n->ncomm && !n->ncomm_dead) {
            int s = n->api.comm_status(n->api.ctx, n->ncomm);
            if (s == NCCL_API_ERR || s == NCCL_API_REMOTE) {
                snprintf(n->dead_msg, sizeof n->dead_msg,
                         "asynchronous error (seen by the watchdog): %s: %s", rc_name(s),
                         api_msg(n));
                n->api.comm_abort(n->api.ctx, n->ncomm);
                n->ncomm_dead = 1;
            }
        }
        for (comm_nccl_group_t *g = n->groups; g; g = g->next)
            if (g->gcomm && !g->dead) {
                int s = n->api.comm_status(n->api.ctx, g->gcomm);
                if (s == NCCL_API_ERR || s == NCCL_API_REMOTE) {
                    snprintf(g->fail, sizeof g->fail,
                             "group of %d ranks (index %d): asynchronous error (seen by the "
                             "watchdog): %s: %s",
                             g->nr, g->index, rc_name(s), api_msg(n));
                    n->api.comm_abort(n->api.ctx, g->gcomm);
                    g->dead = 1;
                }
            }
    }
    pthread_mutex_unlock(&n->mu);
    return NULL;
}

/* ---- issue ---------------------------------------------------------------------------------- */

/* o may go now: its transfer's turn (a transfer's op), or no earlier held op in its direction
 * (an op of no transfer). */
static int op_ready(comm_nccl_t *n, const comm_nccl_op *o)
{
    if (!o->x) return !n->blocked[2 * o->peer + o->kind];
    nchan *c = chan_find(n, o->x->chan, 0);
    return c && c->next_seq == o->x->seq;
}

/* Hand ops[k] to NCCL as one group after their events. 0, or -1 (the comm failed). */
static int issue_batch_locked(comm_nccl_t *n, comm_nccl_op **ops, int k)
{
    nbatch *b = calloc(1, sizeof *b);
    comm_nccl_op **bo = malloc((size_t)k * sizeof *bo);
    if (!b || !bo) {
        free(b);
        free(bo);
        nerr(n, "nccl: out of memory issuing %d operations", k);
        return 1; /* try again later */
    }
    memcpy(bo, ops, (size_t)k * sizeof *bo);
    b->ops = bo;
    b->n_ops = k;
    for (int i = 0; i < k; i++) {
        comm_nccl_op *o = ops[i];
        void *ev = o->after_user ? o->after_user : o->after_own;
        int seen = 0;
        for (int j = 0; j < i && !seen; j++)
            seen = (ops[j]->after_user ? ops[j]->after_user : ops[j]->after_own) == ev;
        if (!ev || seen) continue;
        int rc = n->api.stream_wait_event(n->api.ctx, n->xstream, ev);
        if (rc != NCCL_API_OK) {
            batch_free_locked(n, b);
            fail_call_locked(n, "cudaStreamWaitEvent (transfer stream after compute)", rc);
            return -1;
        }
    }
    /* the ops leave the queue and count as issued now: a failure below ends them */
    for (int i = 0; i < k; i++) {
        comm_nccl_op *o = ops[i];
        q_remove(n, o);
        if (o->x) o->x->n_issued++;
        o->x = NULL;
        o->state = ST_ISSUED;
        o->batch = b;
        if (o->after_own) {
            ev_put_locked(n, o->after_own);
            o->after_own = NULL;
        }
    }
    if (n->btail) n->btail->next = b;
    else n->bhead = b;
    n->btail = b;
    int rc = n->api.group_start(n->api.ctx);
    if (rc != NCCL_API_OK) {
        fail_call_locked(n, "ncclGroupStart", rc);
        return -1;
    }
    int bad = NCCL_API_OK;
    const char *bad_call = NULL;
    for (int i = 0; i < k && bad == NCCL_API_OK; i++) {
        comm_nccl_op *o = ops[i];
        if (o->kind == OP_SEND) {
            bad = n->api.send(n->api.ctx, n->ncomm, o->buf, o->len, o->peer, n->xstream);
            bad_call = "ncclSend";
        } else {
            bad = n->api.recv(n->api.ctx, n->ncomm, o->buf, o->len, o->peer, n->xstream);
            bad_call = "ncclRecv";
        }
        if (bad == NCCL_API_PENDING) bad = NCCL_API_OK; /* only group_end's says anything */
    }
    rc = n->api.group_end(n->api.ctx);
    if (bad != NCCL_API_OK) {
        fail_call_locked(n, bad_call, bad);
        return -1;
    }
    if (rc == NCCL_API_PENDING) {
        n->busy = b;
        return 0;
    }
    if (rc != NCCL_API_OK) {
        fail_call_locked(n, "ncclGroupEnd", rc);
        return -1;
    }
    b->ev = ev_get_locked(n);
    if (!b->ev) {
        fail_comm_locked(n, "no event for a group's completion");
        return -1;
    }
    rc = n->api.event_record(n->api.ctx, b->ev, n->xstream);
    if (rc != NCCL_API_OK) {
        fail_call_locked(n, "cudaEventRecord (after a group)", rc);
        return -1;
    }
    return 0;
}

/* To its own rank, a send and the receive it matches must be in one group (apart, the first
 * would hold the stream forever): drop from ops[k] the unpaired ones (the last of the more
 * numerous kind), which wait for their partners. The new k. */
static int pair_self(const comm_nccl_t *n, comm_nccl_op **ops, int k)
{
    int cnt[2] = {0, 0};
    for (int i = 0; i < k; i++)
        if (ops[i]->peer == n->rank) cnt[ops[i]->kind]++;
    if (cnt[OP_SEND] == cnt[OP_RECV]) return k;
    int kind = cnt[OP_SEND] > cnt[OP_RECV] ? OP_SEND : OP_RECV;
    int keep = cnt[1 - kind], seen = 0, j = 0;
    for (int i = 0; i < k; i++) {
        comm_nccl_op *o = ops[i];
        if (o->peer == n->rank && o->kind == kind && seen++ >= keep) continue;
        ops[j++] = o;
    }
    return j;
}

/* At most max_batch of the (paired) ops[k], keeping pairs to its own rank whole: P pairs
 * (at most half the batch) and the first other ops up to the rest; each a prefix of its
 * kind, so no direction's order changes. The new k. */
static int cap_batch(const comm_nccl_t *n, comm_nccl_op **ops, int k)
{
    int pairs = 0, maxb = n->opts.max_batch;
    for (int i = 0; i < k; i++) pairs += ops[i]->peer == n->rank && ops[i]->kind == OP_SEND;
    int p = pairs < maxb / 2 ? pairs : maxb / 2;
    int budget = maxb - 2 * p, cnt[2] = {0, 0}, others = 0, j = 0;
    for (int i = 0; i < k; i++) {
        comm_nccl_op *o = ops[i];
        if (o->peer == n->rank) {
            if (cnt[o->kind] >= p) continue;
            cnt[o->kind]++;
        } else {
            if (others >= budget) continue;
            others++;
        }
        ops[j++] = o;
    }
    return j;
}

/* Issue every op that may go, batch by batch. 0, or -1 when the comm failed. */
static int issue_locked(comm_nccl_t *n)
{
    while (n->state == COMM_NCCL_UP && !n->busy && n->qhead) {
        if (n->n_queued > n->cap_scan) {
            int cap = n->n_queued + 64;
            comm_nccl_op **p = realloc(n->scan, (size_t)cap * sizeof *p);
            if (!p) return 0; /* try again later */
            n->scan = p;
            n->cap_scan = cap;
        }
        comm_nccl_op **ops = n->scan;
        memset(n->blocked, 0, (size_t)2 * (size_t)n->size);
        int k = 0;
        void *batch_ev = NULL;
        for (comm_nccl_op *o = n->qhead; o; o = o->qnext) {
            if (!op_ready(n, o)) {
                n->blocked[2 * o->peer + o->kind] = 1;
                continue;
            }
            /* a later layer (another caller event): its own group, so it delays no earlier one */
            if (o->after_user && batch_ev && o->after_user != batch_ev) break;
            if (o->after_user) batch_ev = o->after_user;
            ops[k++] = o;
        }
        k = pair_self(n, ops, k);
        if (k > n->opts.max_batch) k = cap_batch(n, ops, k);
        if (k == 0) break;
        int rc = issue_batch_locked(n, ops, k);
        if (rc < 0) return -1;
        if (rc > 0) break;
        chans_advance(n);
    }
    return 0;
}

/* Completed groups: their ops are done. */
static void reap_locked(comm_nccl_t *n)
{
    while (n->bhead && n->bhead->ev) {
        nbatch *b = n->bhead;
        int rc = n->api.event_query(n->api.ctx, b->ev);
        if (rc == NCCL_API_PENDING) return;
        if (rc != NCCL_API_OK) {
            fail_call_locked(n, "cudaEventQuery (a group's completion)", rc);
            return;
        }
        n->bhead = b->next;
        if (!n->bhead) n->btail = NULL;
        for (int i = 0; i < b->n_ops; i++) op_end_locked(n, b->ops[i], COMM_OK, NULL);
        batch_free_locked(n, b);
    }
}

/* One step of everything: the watchdog's verdict, the build, a pending group end,
 * asynchronous errors, issue, completions, the groups' communicators. */
static void pump_locked(comm_nccl_t *n)
{
    if (n->ncomm_dead) {
        char why[256];
        snprintf(why, sizeof why, "%s", n->dead_msg);
        fail_comm_locked(n, why);
    }
    for (comm_nccl_group_t *g = n->groups; g; g = g->next) {
        if (g->state != COMM_NCCL_UP) continue;
        if (g->dead) {
            g->gcomm = NULL;
            g->dead = 0;
            g->state = COMM_NCCL_FAILED;
            nerr(n, "nccl: %s", g->fail);
            continue;
        }
        int s = n->api.comm_status(n->api.ctx, g->gcomm);
        if (s == NCCL_API_ERR || s == NCCL_API_REMOTE) {
            char why[320];
            snprintf(why, sizeof why, "asynchronous error: %s: %s", rc_name(s), api_msg(n));
            group_fail_locked(g, why);
        }
    }
    if (n->state == COMM_NCCL_INIT) {
        int s = n->api.comm_status(n->api.ctx, n->ncomm);
        if (s == NCCL_API_OK) {
            n->state = COMM_NCCL_UP;
        } else if (s == NCCL_API_PENDING) {
            if (past(n->init_deadline)) {
                char why[256];
                snprintf(why, sizeof why,
                         "building the communicator (rank %d of %d) took more than %d ms: "
                         "did every rank get the same comm_init?",
                         n->rank, n->size, n->opts.init_timeout_ms);
                fail_comm_locked(n, why);
            }
            return;
        } else {
            char why[320];
            snprintf(why, sizeof why, "building the communicator (rank %d of %d): %s: %s",
                     n->rank, n->size, rc_name(s), api_msg(n));
            fail_comm_locked(n, why);
            return;
        }
    }
    if (n->state != COMM_NCCL_UP) return;
    int s = n->api.comm_status(n->api.ctx, n->ncomm);
    if (s == NCCL_API_ERR || s == NCCL_API_REMOTE) {
        char why[320];
        snprintf(why, sizeof why, "asynchronous error: %s: %s", rc_name(s), api_msg(n));
        fail_comm_locked(n, why);
        return;
    }
    if (n->busy && s == NCCL_API_OK) {
        nbatch *b = n->busy;
        n->busy = NULL;
        b->ev = ev_get_locked(n);
        if (!b->ev) {
            fail_comm_locked(n, "no event for a group's completion");
            return;
        }
        int rc = n->api.event_record(n->api.ctx, b->ev, n->xstream);
        if (rc != NCCL_API_OK) {
            fail_call_locked(n, "cudaEventRecord (after a group)", rc);
            return;
        }
    }
    if (issue_locked(n) < 0) return;
    reap_locked(n);
}

/* ---- the public calls ----------------------------------------------------------------------- */

comm_status comm_nccl_progress(comm_nccl_t *n)
{
    if (!n) return COMM_ERR_INVAL;
    pthread_mutex_lock(&n->mu);
    pump_locked(n);
    comm_status st = COMM_OK;
    if (n->state == COMM_NCCL_FAILED) {
        nerr(n, "nccl: %s", n->fail);
        st = COMM_ERR_PEER;
    }
    pthread_mutex_unlock(&n->mu);
    return st;
}

static comm_status post(comm_nccl_t *n, int kind, int peer, uint64_t tag, void *buf, size_t len,
                        void *after, comm_nccl_op **out)
{
    if (out) *out = NULL;
    if (!n || !out || (!buf && len > 0)) return COMM_ERR_INVAL;
    comm_status st = COMM_OK;
    pthread_mutex_lock(&n->mu);
    if (n->state == COMM_NCCL_NONE) {
        nerr(n, "nccl: %s rank %d: no communicator yet (waiting for comm_init)", kind_name(kind),
             peer);
        st = COMM_ERR_PEER;
        goto out;
    }
    if (n->state == COMM_NCCL_FAILED) {
        nerr(n, "nccl: %s rank %d: %s; waiting for a new comm_init", kind_name(kind), peer,
             n->fail);
        st = COMM_ERR_PEER;
        goto out;
    }
    if (peer < 0 || peer >= n->size) {
        nerr(n, "nccl: %s rank %d: outside the world of %d ranks", kind_name(kind), peer, n->size);
        st = COMM_ERR_INVAL;
        goto out;
    }
    nxfer *x = xfer_by_tag(n, tag);
    if (x && x->ended) {
        nerr(n, "nccl: %s rank %d: transfer with tag %llu (seq %llu) already ended",
             kind_name(kind), peer, (unsigned long long)tag, (unsigned long long)x->seq);
        st = COMM_ERR_INVAL;
        goto out;
    }
    comm_nccl_op *o = calloc(1, sizeof *o);
    if (!o) {
        nerr(n, "nccl: out of memory posting a %s rank %d", kind_name(kind), peer);
        st = COMM_ERR_NOMEM;
        goto out;
    }
    o->n = n;
    o->kind = kind;
    o->peer = peer;
    o->tag = tag;
    o->buf = buf;
    o->len = len;
    o->after_user = after;
    if (!after) {
        o->after_own = ev_get_locked(n);
        int rc = o->after_own ? n->api.event_record(n->api.ctx, o->after_own, n->cstream)
                              : NCCL_API_ERR;
        if (rc != NCCL_API_OK) {
            if (o->after_own) {
                nerr(n, "nccl: cudaEventRecord on the compute stream: %s", api_msg(n));
                ev_put_locked(n, o->after_own);
            }
            free(o);
            st = COMM_ERR_SYS;
            goto out;
        }
    }
    if (x) {
        o->x = x;
        o->seq = x->seq;
        o->has_seq = 1;
        x->n_posted++;
    }
    o->state = ST_QUEUED;
    n->n_queued++;
    o->qprev = n->qtail;
    if (n->qtail) n->qtail->qnext = o;
    else n->qhead = o;
    n->qtail = o;
    o->anext = n->all;
    if (n->all) n->all->aprev = o;
    n->all = o;
    n->n_in_flight++;
    *out = o;
out:
    pthread_mutex_unlock(&n->mu);
    return st;
}

comm_status comm_nccl_isend(comm_nccl_t *n, int peer, uint64_t tag, const void *buf, size_t len,
                            void *after, comm_nccl_op **op)
{
    return post(n, OP_SEND, peer, tag, (void *)buf, len, after, op);
}

comm_status comm_nccl_irecv(comm_nccl_t *n, int peer, uint64_t tag, void *buf, size_t len,
                            void *after, comm_nccl_op **op)
{
    return post(n, OP_RECV, peer, tag, buf, len, after, op);
}

comm_status comm_nccl_op_test(comm_nccl_t *n, comm_nccl_op *op, int *done, size_t *len)
{
    if (done) *done = 0;
    if (!n || !op || !done) return COMM_ERR_INVAL;
    pthread_mutex_lock(&n->mu);
    if (op->state == ST_QUEUED || op->state == ST_ISSUED) pump_locked(n);
    comm_status st = COMM_OK;
    if (op->state == ST_DONE) {
        *done = 1;
        if (len) *len = op->len;
    } else if (op->state == ST_FAILED) {
        *done = 1;
        if (len) *len = 0;
        nerr(n, "%s", op->msg);
        st = op->err;
    }
    pthread_mutex_unlock(&n->mu);
    return st;
}

int comm_nccl_op_issued(const comm_nccl_op *op)
{
    return op && op->state != ST_QUEUED;
}

comm_status comm_nccl_op_stream_wait(comm_nccl_t *n, comm_nccl_op *op, void *stream)
{
    if (!n || !op) return COMM_ERR_INVAL;
    pthread_mutex_lock(&n->mu);
    comm_status st = COMM_OK;
    if (op->state == ST_FAILED) {
        nerr(n, "%s", op->msg);
        st = op->err;
    } else if (op->state == ST_DONE) {
        st = COMM_OK; /* nothing to wait for */
    } else if (op->state == ST_QUEUED || !op->batch || !op->batch->ev) {
        nerr(n, "nccl: comm_nccl_op_stream_wait: the operation is not issued yet (progress first)");
        st = COMM_ERR_INVAL;
    } else {
        int rc = n->api.stream_wait_event(n->api.ctx, stream, op->batch->ev);
        if (rc != NCCL_API_OK) {
            nerr(n, "nccl: cudaStreamWaitEvent (a stream after a transfer): %s", api_msg(n));
            st = COMM_ERR_SYS;
        }
    }
    pthread_mutex_unlock(&n->mu);
    return st;
}

void comm_nccl_op_free(comm_nccl_t *n, comm_nccl_op **op)
{
    if (!op || !*op) return;
    comm_nccl_op *o = *op;
    *op = NULL;
    if (!n) n = o->n;
    pthread_mutex_lock(&n->mu);
    if (o->state == ST_QUEUED) {
        q_remove(n, o);
        if (o->x) o->x->n_posted--;
        o->orphan = 1;
        op_end_locked(n, o, COMM_ERR_PEER, "cancelled");
        chans_advance(n);
    } else if (o->state == ST_ISSUED) {
        o->orphan = 1; /* it runs on; freed when its group ends */
    } else {
        op_unlink_free(n, o);
    }
    pthread_mutex_unlock(&n->mu);
}

int comm_nccl_in_flight(const comm_nccl_t *n)
{
    return n ? n->n_in_flight : 0;
}

/* ---- transfers ------------------------------------------------------------------------------ */

comm_status comm_nccl_xfer_begin(comm_nccl_t *n, uint64_t tag, uint64_t chan, uint64_t seq)
{
    if (!n) return COMM_ERR_INVAL;
    comm_status st = COMM_OK;
    pthread_mutex_lock(&n->mu);
    nchan *c = chan_find(n, chan, 1);
    if (!c) {
        st = COMM_ERR_NOMEM;
        goto out;
    }
    if (xfer_by_tag(n, tag)) {
        nerr(n, "nccl: transfer with tag %llu begun twice", (unsigned long long)tag);
        st = COMM_ERR_INVAL;
        goto out;
    }
    if (seq < c->next_seq || xfer_by_seq(n, chan, seq)) {
        nerr(n, "nccl: transfer tag %llu: seq %llu of channel %llx is already %s (next: %llu)",
             (unsigned long long)tag, (unsigned long long)seq, (unsigned long long)chan,
             seq < c->next_seq ? "past" : "taken", (unsigned long long)c->next_seq);
        st = COMM_ERR_INVAL;
        goto out;
    }
    nxfer *x = calloc(1, sizeof *x);
    if (!x) {
        st = COMM_ERR_NOMEM;
        goto out;
    }
    x->tag = tag;
    x->chan = chan;
    x->seq = seq;
    x->next = n->xfers;
    n->xfers = x;
out:
    pthread_mutex_unlock(&n->mu);
    return st;
}

comm_status comm_nccl_xfer_end(comm_nccl_t *n, uint64_t tag)
{
    if (!n) return COMM_ERR_INVAL;
    comm_status st = COMM_OK;
    pthread_mutex_lock(&n->mu);
    nxfer *x = xfer_by_tag(n, tag);
    if (!x) {
        nerr(n, "nccl: comm_nccl_xfer_end: no transfer with tag %llu", (unsigned long long)tag);
        st = COMM_ERR_INVAL;
    } else {
        x->ended = 1;
        chans_advance(n);
        pump_locked(n);
    }
    pthread_mutex_unlock(&n->mu);
    return st;
}

comm_status comm_nccl_xfer_skip(comm_nccl_t *n, uint64_t chan, uint64_t seq)
{
    if (!n) return COMM_ERR_INVAL;
    comm_status st = COMM_OK;
    pthread_mutex_lock(&n->mu);
    nchan *c = chan_find(n, chan, 1);
    nxfer *x = c ? xfer_by_seq(n, chan, seq) : NULL;
    if (!c) {
        st = COMM_ERR_NOMEM;
    } else if (seq < c->next_seq || x) {
        nerr(n, "nccl: skip seq %llu of channel %llx: already %s (next: %llu)",
             (unsigned long long)seq, (unsigned long long)chan, seq < c->next_seq ? "past" : "begun",
             (unsigned long long)c->next_seq);
        st = COMM_ERR_INVAL;
    } else if (!(x = calloc(1, sizeof *x))) {
        st = COMM_ERR_NOMEM;
    } else {
        x->chan = chan;
        x->seq = seq;
        x->gone = 1;
        x->ended = 1;
        x->next = n->xfers;
        n->xfers = x;
        chans_advance(n);
        pump_locked(n);
    }
    pthread_mutex_unlock(&n->mu);
    return st;
}

comm_status comm_nccl_xfer_release(comm_nccl_t *n, uint64_t tag)
{
    if (!n) return COMM_ERR_INVAL;
    comm_status st = COMM_OK;
    pthread_mutex_lock(&n->mu);
    nxfer *x = xfer_by_tag(n, tag);
    if (!x) goto out;
    int broken = x->n_issued > 0 && !x->ended;
    char why[160];
    snprintf(why, sizeof why, "transfer tag %llu (seq %llu) released", (unsigned long long)tag,
             (unsigned long long)x->seq);
    for (comm_nccl_op *o = n->qhead, *nx; o; o = nx) {
        nx = o->qnext;
        if (o->x != x) continue;
        q_remove(n, o);
        op_end_locked(n, o, COMM_ERR_PEER, why);
    }
    x->gone = 1;
    if (broken) {
        char r[256];
        snprintf(r, sizeof r,
                 "transfer tag %llu (seq %llu) released after %d of its operations were issued: "
                 "the order of the pair is broken",
                 (unsigned long long)tag, (unsigned long long)x->seq, x->n_issued);
        fail_comm_locked(n, r);
        st = COMM_ERR_PEER;
        goto out;
    }
    chans_advance(n);
    pump_locked(n);
out:
    pthread_mutex_unlock(&n->mu);
    return st;
}

/* ---- state, bootstrap ----------------------------------------------------------------------- */

comm_t *comm_nccl_comm(comm_nccl_t *n)
{
    return n ? n->comm : NULL;
}

comm_nccl_state comm_nccl_get_state(const comm_nccl_t *n)
{
    return n ? n->state : COMM_NCCL_NONE;
}

int comm_nccl_epoch(const comm_nccl_t *n)
{
    return n ? n->epoch : 0;
}

const char *comm_nccl_fail_reason(const comm_nccl_t *n)
{
    return n && n->state == COMM_NCCL_FAILED ? n->fail : "";
}

void comm_nccl_id_to_hex(const uint8_t id[COMM_NCCL_ID_BYTES], char hex[COMM_NCCL_ID_HEX + 1])
{
    static const char dig[] = "0123456789abcdef";
    for (int i = 0; i < COMM_NCCL_ID_BYTES; i++) {
        hex[2 * i] = dig[id[i] >> 4];
        hex[2 * i + 1] = dig[id[i] & 15];
    }
    hex[COMM_NCCL_ID_HEX] = '\0';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

comm_status comm_nccl_id_from_hex(const char *hex, uint8_t id[COMM_NCCL_ID_BYTES], char *err,
                                  size_t errlen)
{
    if (!hex || !id) {
        if (err && errlen) snprintf(err, errlen, "nccl unique id: NULL");
        return COMM_ERR_INVAL;
    }
    size_t len = strlen(hex);
    if (len != COMM_NCCL_ID_HEX) {
        if (err && errlen)
            snprintf(err, errlen, "nccl unique id: %zu hex digits, expected %d", len,
                     COMM_NCCL_ID_HEX);
        return COMM_ERR_INVAL;
    }
    for (size_t i = 0; i < len; i++)
        if (hexval(hex[i]) < 0) {
            if (err && errlen)
                snprintf(err, errlen, "nccl unique id: '%c' at offset %zu is not a hex digit",
                         hex[i], i);
            return COMM_ERR_INVAL;
        }
    for (int i = 0; i < COMM_NCCL_ID_BYTES; i++)
        id[i] = (uint8_t)(hexval(hex[2 * i]) << 4 | hexval(hex[2 * i + 1]));
    return COMM_OK;
}

comm_status comm_nccl_make_id(comm_nccl_t *n, char hex[COMM_NCCL_ID_HEX + 1])
{
    if (!n || !hex) return COMM_ERR_INVAL;
    uint8_t id[COMM_NCCL_ID_BYTES];
    pthread_mutex_lock(&n->mu);
    int rc = n->api.get_unique_id(n->api.ctx, id);
    if (rc != NCCL_API_OK) nerr(n, "nccl: ncclGetUniqueId: %s: %s", rc_name(rc), api_msg(n));
    pthread_mutex_unlock(&n->mu);
    if (rc != NCCL_API_OK) return COMM_ERR_SYS;
    comm_nccl_id_to_hex(id, hex);
    return COMM_OK;
}

comm_status comm_nccl_init(comm_nccl_t *n, int world_size, int rank, const char *id_hex)
{
    if (!n) return COMM_ERR_INVAL;
    uint8_t id[COMM_NCCL_ID_BYTES];
    char e[128];
    if (comm_nccl_id_from_hex(id_hex, id, e, sizeof e) != COMM_OK) {
        nerr(n, "nccl: comm_init: %s", e);
        return COMM_ERR_INVAL;
    }
    if (world_size < 1 || rank < 0 || rank >= world_size) {
        nerr(n, "nccl: comm_init: rank %d outside a world of %d ranks", rank, world_size);
        return COMM_ERR_INVAL;
    }
    comm_status st = COMM_OK;
    pthread_mutex_lock(&n->mu);
    if ((size_t)world_size * 2 > (size_t)n->cap_blocked) {
        unsigned char *b = realloc(n->blocked, (size_t)world_size * 2);
        if (!b) {
            nerr(n, "nccl: comm_init: out of memory for a world of %d ranks", world_size);
            st = COMM_ERR_NOMEM;
            goto out;
        }
        n->blocked = b;
        n->cap_blocked = world_size * 2;
    }
    if (n->state == COMM_NCCL_INIT || n->state == COMM_NCCL_UP) {
        char why[96];
        snprintf(why, sizeof why, "replaced by a new comm_init (world of %d ranks)", world_size);
        fail_comm_locked(n, why);
    }
    xfers_clear(n); /* every channel restarts at seq 0 */
    n->epoch++;
    n->rank = rank;
    n->size = world_size;
    n->fail[0] = '\0';
    n->state = COMM_NCCL_INIT;
    n->init_deadline = now_ms() + n->opts.init_timeout_ms;
    void *c = NULL;
    int rc = n->api.comm_init(n->api.ctx, world_size, id, rank, &c);
    n->ncomm = c;
    if (rc == NCCL_API_OK) {
        /* a non-blocking build still reports through comm_status: pump decides */
    } else if (rc != NCCL_API_PENDING) {
        char why[320];
        snprintf(why, sizeof why, "ncclCommInitRankConfig (rank %d of %d): %s: %s", rank,
                 world_size, rc_name(rc), api_msg(n));
        fail_comm_locked(n, why);
        st = COMM_ERR_PEER;
        goto out;
    }
    pump_locked(n);
    if (n->state == COMM_NCCL_FAILED) st = COMM_ERR_PEER;
out:
    pthread_mutex_unlock(&n->mu);
    return st;
}

comm_status comm_nccl_wait_ready(comm_nccl_t *n, int timeout_ms)
{
    if (!n) return COMM_ERR_INVAL;
    double dl = deadline_of(timeout_ms);
    for (;;) {
        pthread_mutex_lock(&n->mu);
        pump_locked(n);
        comm_nccl_state s = n->state;
        if (s == COMM_NCCL_FAILED) nerr(n, "nccl: %s", n->fail);
        if (s == COMM_NCCL_NONE) nerr(n, "nccl: no communicator (comm_nccl_init first)");
        pthread_mutex_unlock(&n->mu);
        if (s == COMM_NCCL_UP) return COMM_OK;
        if (s == COMM_NCCL_FAILED || s == COMM_NCCL_NONE) return COMM_ERR_PEER;
        if (past(dl)) {
            nerr(n, "nccl: the communicator is not built after %d ms", timeout_ms);
            return COMM_ERR_TIMEOUT;
        }
        nap();
    }
}

void comm_nccl_abort(comm_nccl_t *n, const char *why)
{
    if (!n) return;
    pthread_mutex_lock(&n->mu);
    if (n->state == COMM_NCCL_INIT || n->state == COMM_NCCL_UP) {
        char w[224];
        snprintf(w, sizeof w, "aborted by the caller: %s", why ? why : "no reason given");
        fail_comm_locked(n, w);
    }
    pthread_mutex_unlock(&n->mu);
}

comm_status comm_nccl_bootstrap_mpi(comm_nccl_t *n, comm_t *mpi, int timeout_ms)
{
    if (!n || !mpi) return COMM_ERR_INVAL;
    int rank = comm_rank(mpi), size = comm_size(mpi);
    if (size < 1 || rank < 0 || rank >= size) {
        nerr(n, "nccl: bootstrap over %s: no world yet (rank %d of %d)",
             comm_backend_name(comm_backend_of(mpi)), rank, size);
        return COMM_ERR_INVAL;
    }
    int *ranks = malloc((size_t)size * sizeof *ranks);
    if (!ranks) return COMM_ERR_NOMEM;
    for (int i = 0; i < size; i++) ranks[i] = i;
    comm_group_t *g = NULL;
    uint8_t id[COMM_NCCL_ID_BYTES];
    memset(id, 0, sizeof id);
    char hex[COMM_NCCL_ID_HEX + 1];
    comm_status st = comm_group_new(mpi, ranks, size, &g);
    free(ranks);
    if (st != COMM_OK) {
        nerr(n, "nccl: bootstrap: a group of the %d %s ranks: %s", size,
             comm_backend_name(comm_backend_of(mpi)), comm_last_error(mpi));
        return st;
    }
    if (rank == 0) {
        st = comm_nccl_make_id(n, hex);
        if (st == COMM_OK) st = comm_nccl_id_from_hex(hex, id, NULL, 0);
        /* a failure here still broadcasts (zeros), so that no rank waits forever: they fail
         * to build instead */
    }
    comm_status bs = comm_broadcast(g, 0, id, sizeof id, timeout_ms);
    comm_group_destroy(&g);
    if (st != COMM_OK) return st;
    if (bs != COMM_OK) {
        nerr(n, "nccl: bootstrap: broadcasting rank 0's unique id over %s: %s",
             comm_backend_name(comm_backend_of(mpi)), comm_last_error(mpi));
        return bs;
    }
    comm_nccl_id_to_hex(id, hex);
    st = comm_nccl_init(n, size, rank, hex);
    if (st != COMM_OK) return st;
    return comm_nccl_wait_ready(n, timeout_ms);
}

void comm_nccl_set_compute_stream(comm_nccl_t *n, void *stream)
{
    if (!n) return;
    pthread_mutex_lock(&n->mu);
    n->cstream = stream;
    pthread_mutex_unlock(&n->mu);
}

void *comm_nccl_stream(const comm_nccl_t *n)
{
    return n ? n->xstream : NULL;
}

/* ---- groups --------------------------------------------------------------------------------- */

/* Wait for ops[k] (progress in between). COMM_OK, or the first failure. */
static comm_status wait_ops(comm_nccl_t *n, comm_nccl_op **ops, int k, double dl)
{
    for (;;) {
        int all = 1;
        for (int i = 0; i < k; i++) {
            if (!ops[i]) continue;
            int done = 0;
            comm_status st = comm_nccl_op_test(n, ops[i], &done, NULL);
            if (st != COMM_OK) return st;
            all &= done;
        }
        if (all) return COMM_OK;
        if (past(dl)) {
            nerr(n, "nccl: timed out waiting for %d operations", k);
            return COMM_ERR_TIMEOUT;
        }
        nap();
    }
}

/* Poll comm's status until not PENDING: its value. */
static int wait_status(comm_nccl_t *n, void *comm, double dl, int *dead)
{
    for (;;) {
        pthread_mutex_lock(&n->mu);
        int s = (dead && *dead) ? NCCL_API_ERR : n->api.comm_status(n->api.ctx, comm);
        pthread_mutex_unlock(&n->mu);
        if (s != NCCL_API_PENDING) return s;
        if (past(dl)) return NCCL_API_PENDING;
        nap();
    }
}

static void group_unlink_locked(comm_nccl_t *n, comm_nccl_group_t *g)
{
    for (comm_nccl_group_t **p = &n->groups; *p; p = &(*p)->next)
        if (*p == g) {
            *p = g->next;
            return;
        }
}

comm_status comm_nccl_group_new(comm_nccl_t *n, const int *ranks, int nr, int timeout_ms,
                                comm_nccl_group_t **out)
{
    if (out) *out = NULL;
    if (!n || !ranks || nr < 1 || !out) return COMM_ERR_INVAL;
    if (timeout_ms < 0) timeout_ms = n->opts.init_timeout_ms;
    double dl = deadline_of(timeout_ms);
    int index = -1;
    for (int i = 0; i < nr; i++) {
        if (ranks[i] < 0 || (n->size > 0 && ranks[i] >= n->size)) {
            nerr(n, "nccl: group: rank %d (index %d) outside the world of %d ranks", ranks[i], i,
                 n->size);
            return COMM_ERR_INVAL;
        }
        for (int j = 0; j < i; j++)
            if (ranks[j] == ranks[i]) {
                nerr(n, "nccl: group: rank %d listed twice (index %d and %d)", ranks[i], j, i);
                return COMM_ERR_INVAL;
            }
        if (ranks[i] == n->rank) index = i;
    }
    if (nr == 1 && n->state == COMM_NCCL_NONE) index = 0; /* a group of one needs no world */
    if (index < 0) {
        nerr(n, "nccl: group: this rank (%d) is not in the list of %d ranks", n->rank, nr);
        return COMM_ERR_INVAL;
    }
    if (nr > 1 && n->state != COMM_NCCL_UP) {
        nerr(n, "nccl: group of %d ranks: the world communicator is %s%s%s", nr,
             comm_nccl_state_name(n->state), n->fail[0] ? ": " : "", n->fail);
        return COMM_ERR_PEER;
    }
    comm_nccl_group_t *g = calloc(1, sizeof *g);
    int *rk = malloc((size_t)nr * sizeof *rk);
    comm_nccl_op **ops = calloc((size_t)nr, sizeof *ops);
    if (!g || !rk || !ops) {
        free(g);
        free(rk);
        free(ops);
        return COMM_ERR_NOMEM;
    }
    memcpy(rk, ranks, (size_t)nr * sizeof *rk);
    g->n = n;
    g->ranks = rk;
    g->nr = nr;
    g->index = index;
    g->state = COMM_NCCL_INIT;
    uint8_t id[COMM_NCCL_ID_BYTES];
    memset(id, 0, sizeof id);
    void *scratch = NULL;
    comm_status st = COMM_OK;
    int rc;
    if (index == 0) {
        pthread_mutex_lock(&n->mu);
        rc = n->api.get_unique_id(n->api.ctx, id);
        if (rc != NCCL_API_OK) nerr(n, "nccl: group: ncclGetUniqueId: %s", api_msg(n));
        pthread_mutex_unlock(&n->mu);
        if (rc != NCCL_API_OK) {
            st = COMM_ERR_SYS;
            goto fail;
        }
    }
    if (nr > 1) {
        pthread_mutex_lock(&n->mu);
        rc = n->api.dev_alloc(n->api.ctx, COMM_NCCL_ID_BYTES, &scratch);
        if (rc == NCCL_API_OK && index == 0)
            rc = n->api.copy_to_dev(n->api.ctx, scratch, id, COMM_NCCL_ID_BYTES);
        if (rc != NCCL_API_OK) nerr(n, "nccl: group: the id's device buffer: %s", api_msg(n));
        pthread_mutex_unlock(&n->mu);
        if (rc != NCCL_API_OK) {
            st = COMM_ERR_SYS;
            goto fail;
        }
        if (index == 0) {
            for (int i = 1; i < nr && st == COMM_OK; i++)
                st = comm_nccl_isend(n, rk[i], GROUP_ID_TAG, scratch, COMM_NCCL_ID_BYTES, NULL,
                                     &ops[i]);
        } else {
            st = comm_nccl_irecv(n, rk[0], GROUP_ID_TAG, scratch, COMM_NCCL_ID_BYTES, NULL, &ops[0]);
        }
        if (st == COMM_OK) st = wait_ops(n, ops, nr, dl);
        for (int i = 0; i < nr; i++) comm_nccl_op_free(n, &ops[i]);
        if (st != COMM_OK) goto fail;
        if (index != 0) {
            pthread_mutex_lock(&n->mu);
            rc = n->api.copy_to_host(n->api.ctx, id, scratch, COMM_NCCL_ID_BYTES);
            if (rc != NCCL_API_OK) nerr(n, "nccl: group: copying the id back: %s", api_msg(n));
            pthread_mutex_unlock(&n->mu);
            if (rc != NCCL_API_OK) {
                st = COMM_ERR_SYS;
                goto fail;
            }
        }
    }
    pthread_mutex_lock(&n->mu);
    rc = n->api.stream_new(n->api.ctx, &g->stream);
    if (rc != NCCL_API_OK) {
        nerr(n, "nccl: group: creating its stream: %s", api_msg(n));
        pthread_mutex_unlock(&n->mu);
        st = COMM_ERR_SYS;
        goto fail;
    }
    rc = n->api.comm_init(n->api.ctx, nr, id, index, &g->gcomm);
    if (rc != NCCL_API_OK && rc != NCCL_API_PENDING) {
        nerr(n, "nccl: group of %d ranks (index %d): ncclCommInitRankConfig: %s", nr, index,
             api_msg(n));
        if (g->gcomm) n->api.comm_abort(n->api.ctx, g->gcomm);
        g->gcomm = NULL;
        pthread_mutex_unlock(&n->mu);
        st = COMM_ERR_PEER;
        goto fail;
    }
    g->next = n->groups;
    n->groups = g; /* the watchdog sees it from now on */
    pthread_mutex_unlock(&n->mu);
    rc = wait_status(n, g->gcomm, dl, &g->dead);
    if (rc != NCCL_API_OK) {
        pthread_mutex_lock(&n->mu);
        group_unlink_locked(n, g);
        if (!g->dead) n->api.comm_abort(n->api.ctx, g->gcomm);
        g->gcomm = NULL;
        if (rc == NCCL_API_PENDING)
            nerr(n, "nccl: group of %d ranks (index %d): not built after %d ms", nr, index,
                 timeout_ms);
        else
            nerr(n, "nccl: group of %d ranks (index %d): build failed: %s", nr, index, api_msg(n));
        pthread_mutex_unlock(&n->mu);
        st = rc == NCCL_API_PENDING ? COMM_ERR_TIMEOUT : COMM_ERR_PEER;
        goto fail;
    }
    g->state = COMM_NCCL_UP;
    if (scratch) {
        pthread_mutex_lock(&n->mu);
        n->api.dev_free(n->api.ctx, scratch);
        pthread_mutex_unlock(&n->mu);
    }
    free(ops);
    *out = g;
    return COMM_OK;
fail:
    pthread_mutex_lock(&n->mu);
    if (scratch) n->api.dev_free(n->api.ctx, scratch);
    if (g->stream) n->api.stream_free(n->api.ctx, g->stream);
    pthread_mutex_unlock(&n->mu);
    free(ops);
    free(g->ranks);
    free(g);
    return st;
}

/* Drop the group's NCCL resources (n's lock held). */
static void group_release_locked(comm_nccl_t *n, comm_nccl_group_t *g)
{
    if (g->gcomm) {
        if (g->dead) {
            /* already aborted */
        } else if (g->state == COMM_NCCL_UP) {
            n->api.comm_destroy(n->api.ctx, g->gcomm);
        } else {
            n->api.comm_abort(n->api.ctx, g->gcomm);
        }
        g->gcomm = NULL;
    }
    if (g->stream) n->api.stream_free(n->api.ctx, g->stream);
    g->stream = NULL;
    g->n = NULL;
}

void comm_nccl_group_destroy(comm_nccl_group_t **self_p)
{
    if (!self_p || !*self_p) return;
    comm_nccl_group_t *g = *self_p;
    *self_p = NULL;
    comm_nccl_t *n = g->n;
    if (n) {
        pthread_mutex_lock(&n->mu);
        group_unlink_locked(n, g);
        group_release_locked(n, g);
        pthread_mutex_unlock(&n->mu);
    }
    free(g->ranks);
    free(g);
}

comm_nccl_state comm_nccl_group_state(const comm_nccl_group_t *g)
{
    return g ? g->state : COMM_NCCL_NONE;
}

enum { COLL_ALLREDUCE, COLL_BROADCAST, COLL_ALLGATHER };

typedef struct {
    int kind;
    void *buf;           /* allreduce, broadcast: in place; allgather: recv */
    const void *send;    /* allgather */
    size_t n;            /* allreduce: floats; others: bytes */
    int root;
} coll_args;

static const char *coll_name(int kind)
{
    return kind == COLL_ALLREDUCE ? "ncclAllReduce" : kind == COLL_BROADCAST ? "ncclBroadcast"
                                                                             : "ncclAllGather";
}

/* Enqueue a collective on stream and wait until NCCL took it (n's lock held on entry and
 * exit; released while it polls). NCCL_API_OK, or a failure (the group failed). */
static int coll_enqueue_locked(comm_nccl_group_t *g, const coll_args *a, void *stream, double dl)
{
    comm_nccl_t *n = g->n;
    int rc;
    switch (a->kind) {
    case COLL_ALLREDUCE:
        rc = n->api.allreduce_sum_f32(n->api.ctx, g->gcomm, a->buf, a->n, stream);
        break;
    case COLL_BROADCAST:
        rc = n->api.broadcast(n->api.ctx, g->gcomm, a->buf, a->n, a->root, stream);
        break;
    default:
        rc = n->api.allgather(n->api.ctx, g->gcomm, a->send, a->buf, a->n, stream);
        break;
    }
    if (rc == NCCL_API_PENDING) {
        pthread_mutex_unlock(&n->mu);
        rc = wait_status(n, g->gcomm, dl, &g->dead);
        pthread_mutex_lock(&n->mu);
        if (rc == NCCL_API_PENDING) {
            group_fail_locked(g, "the collective was not enqueued in time");
            return NCCL_API_ERR;
        }
    }
    if (rc != NCCL_API_OK) {
        char why[320];
        snprintf(why, sizeof why, "%s: %s: %s", coll_name(a->kind), rc_name(rc), api_msg(n));
        group_fail_locked(g, why);
    }
    return rc;
}

static comm_status coll_check(comm_nccl_group_t *g)
{
    if (!g || !g->n) return COMM_ERR_INVAL;
    comm_nccl_t *n = g->n;
    if (g->dead) {
        g->gcomm = NULL;
        g->dead = 0;
        g->state = COMM_NCCL_FAILED;
    }
    if (g->state == COMM_NCCL_UP) {
        int s = n->api.comm_status(n->api.ctx, g->gcomm);
        if (s == NCCL_API_ERR || s == NCCL_API_REMOTE) {
            char why[320];
            snprintf(why, sizeof why, "asynchronous error: %s: %s", rc_name(s), api_msg(n));
            group_fail_locked(g, why);
        }
    }
    if (g->state != COMM_NCCL_UP) {
        nerr(n, "nccl: %s", g->fail[0] ? g->fail : "group not built");
        return COMM_ERR_PEER;
    }
    return COMM_OK;
}

static comm_status coll_block(comm_nccl_group_t *g, const coll_args *a, int timeout_ms)
{
    if (!g || !g->n) return COMM_ERR_INVAL;
    comm_nccl_t *n = g->n;
    double dl = deadline_of(timeout_ms);
    pthread_mutex_lock(&n->mu);
    comm_status st = coll_check(g);
    void *after = NULL, *done = NULL;
    if (st != COMM_OK) goto out;
    after = ev_get_locked(n);
    done = ev_get_locked(n);
    if (!after || !done) {
        st = COMM_ERR_SYS;
        goto out;
    }
    if (n->api.event_record(n->api.ctx, after, n->cstream) != NCCL_API_OK ||
        n->api.stream_wait_event(n->api.ctx, g->stream, after) != NCCL_API_OK) {
        nerr(n, "nccl: %s: ordering after the compute stream: %s", coll_name(a->kind), api_msg(n));
        st = COMM_ERR_SYS;
        goto out;
    }
    if (coll_enqueue_locked(g, a, g->stream, dl) != NCCL_API_OK) {
        st = COMM_ERR_PEER;
        goto out;
    }
    if (n->api.event_record(n->api.ctx, done, g->stream) != NCCL_API_OK) {
        nerr(n, "nccl: %s: cudaEventRecord: %s", coll_name(a->kind), api_msg(n));
        st = COMM_ERR_SYS;
        goto out;
    }
    for (;;) {
        int q = n->api.event_query(n->api.ctx, done);
        if (q == NCCL_API_OK) break;
        int s = g->dead ? NCCL_API_ERR : n->api.comm_status(n->api.ctx, g->gcomm);
        if (q != NCCL_API_PENDING || s == NCCL_API_ERR || s == NCCL_API_REMOTE) {
            char why[320];
            if (g->dead) snprintf(why, sizeof why, "%s", g->fail);
            else
                snprintf(why, sizeof why, "%s: %s: %s", coll_name(a->kind),
                         rc_name(q != NCCL_API_PENDING ? q : s), api_msg(n));
            group_fail_locked(g, why);
            st = COMM_ERR_PEER;
            goto out;
        }
        if (past(dl)) {
            char why[128];
            snprintf(why, sizeof why, "%s did not finish within %d ms", coll_name(a->kind),
                     timeout_ms);
            group_fail_locked(g, why);
            st = COMM_ERR_TIMEOUT;
            goto out;
        }
        pthread_mutex_unlock(&n->mu);
        nap();
        pthread_mutex_lock(&n->mu);
    }
out:
    ev_put_locked(n, after);
    ev_put_locked(n, done);
    pthread_mutex_unlock(&n->mu);
    return st;
}

static comm_status coll_async(comm_nccl_group_t *g, const coll_args *a, void *stream)
{
    if (!g || !g->n) return COMM_ERR_INVAL;
    comm_nccl_t *n = g->n;
    pthread_mutex_lock(&n->mu);
    comm_status st = coll_check(g);
    if (st == COMM_OK &&
        coll_enqueue_locked(g, a, stream, deadline_of(n->opts.init_timeout_ms)) != NCCL_API_OK)
        st = COMM_ERR_PEER;
    pthread_mutex_unlock(&n->mu);
    return st;
}

comm_status comm_nccl_allreduce_sum_f32(comm_nccl_group_t *g, float *buf, size_t count,
                                        int timeout_ms)
{
    coll_args a = {.kind = COLL_ALLREDUCE, .buf = buf, .n = count};
    return coll_block(g, &a, timeout_ms);
}

comm_status comm_nccl_broadcast(comm_nccl_group_t *g, int root, void *buf, size_t len,
                                int timeout_ms)
{
    if (g && (root < 0 || root >= g->nr)) return COMM_ERR_INVAL;
    coll_args a = {.kind = COLL_BROADCAST, .buf = buf, .n = len, .root = root};
    return coll_block(g, &a, timeout_ms);
}

comm_status comm_nccl_allgather(comm_nccl_group_t *g, const void *send, size_t len, void *recv,
                                int timeout_ms)
{
    coll_args a = {.kind = COLL_ALLGATHER, .buf = recv, .send = send, .n = len};
    return coll_block(g, &a, timeout_ms);
}

comm_status comm_nccl_allreduce_sum_f32_async(comm_nccl_group_t *g, float *buf, size_t count,
                                              void *stream)
{
    coll_args a = {.kind = COLL_ALLREDUCE, .buf = buf, .n = count};
    return coll_async(g, &a, stream);
}

comm_status comm_nccl_broadcast_async(comm_nccl_group_t *g, int root, void *buf, size_t len,
                                      void *stream)
{
    if (g && (root < 0 || root >= g->nr)) return COMM_ERR_INVAL;
    coll_args a = {.kind = COLL_BROADCAST, .buf = buf, .n = len, .root = root};
    return coll_async(g, &a, stream);
}

comm_status comm_nccl_allgather_async(comm_nccl_group_t *g, const void *send, size_t len,
                                      void *recv, void *stream)
{
    coll_args a = {.kind = COLL_ALLGATHER, .buf = recv, .send = send, .n = len};
    return coll_async(g, &a, stream);
}

/* ---- the comm_ops table --------------------------------------------------------------------- */

static int o_rank(void *impl)
{
    return ((comm_nccl_t *)impl)->rank;
}

static int o_size(void *impl)
{
    return ((comm_nccl_t *)impl)->size;
}

static comm_status o_isend(comm_t *c, void *impl, int peer, uint64_t tag, const void *buf,
                           size_t len, void **op)
{
    (void)c;
    return comm_nccl_isend(impl, peer, tag, buf, len, NULL, (comm_nccl_op **)op);
}

static comm_status o_irecv(comm_t *c, void *impl, int peer, uint64_t tag, void *buf, size_t cap,
                           void **op)
{
    (void)c;
    return comm_nccl_irecv(impl, peer, tag, buf, cap, NULL, (comm_nccl_op **)op);
}

static comm_status o_test(comm_t *c, void *impl, void *op, int *done, size_t *len)
{
    (void)c;
    return comm_nccl_op_test(impl, op, done, len);
}

static void o_free(comm_t *c, void *impl, void *op)
{
    (void)c;
    comm_nccl_op *o = op;
    comm_nccl_op_free(impl, &o);
}

static void o_discard(comm_t *c, void *impl, int peer, uint64_t tag)
{
    (void)c;
    (void)peer;
    comm_nccl_xfer_release(impl, tag);
}

static comm_status o_progress(comm_t *c, void *impl)
{
    (void)c;
    return comm_nccl_progress(impl);
}

static void *o_zsock(void *impl)
{
    (void)impl;
    return NULL;
}

static comm_status o_group_new(comm_t *c, void *impl, const int *ranks, int n, void **gimpl)
{
    (void)c;
    return comm_nccl_group_new(impl, ranks, n, -1, (comm_nccl_group_t **)gimpl);
}

static void o_group_free(comm_t *c, void *impl, void *gimpl)
{
    (void)c;
    (void)impl;
    comm_nccl_group_t *g = gimpl;
    comm_nccl_group_destroy(&g);
}

static comm_status o_allreduce(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                               float *buf, size_t count, int timeout_ms)
{
    (void)c;
    (void)impl;
    (void)ranks;
    (void)n;
    return comm_nccl_allreduce_sum_f32(gimpl, buf, count, timeout_ms);
}

static comm_status o_broadcast(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                               int root, void *buf, size_t len, int timeout_ms)
{
    (void)c;
    (void)impl;
    (void)ranks;
    (void)n;
    return comm_nccl_broadcast(gimpl, root, buf, len, timeout_ms);
}

static comm_status o_allgather(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                               const void *send, size_t len, void *recv, int timeout_ms)
{
    (void)c;
    (void)impl;
    (void)ranks;
    (void)n;
    return comm_nccl_allgather(gimpl, send, len, recv, timeout_ms);
}

static void nccl_free(void *impl);

static const comm_ops nccl_ops = {
    .backend = COMM_BACKEND_NCCL,
    .rank = o_rank,
    .size = o_size,
    .isend = o_isend,
    .irecv = o_irecv,
    .test = o_test,
    .cancel = o_free,
    .op_free = o_free,
    .discard = o_discard,
    .progress = o_progress,
    .zsock = o_zsock,
    .group_new = o_group_new,
    .group_free = o_group_free,
    .allreduce_sum_f32 = o_allreduce,
    .broadcast = o_broadcast,
    .allgather = o_allgather,
    .destroy = nccl_free,
};

comm_nccl_t *comm_nccl_of(const comm_t *c)
{
    return comm_impl_of(c, &nccl_ops);
}

/* ---- new / destroy -------------------------------------------------------------------------- */

static void nccl_free(void *impl)
{
    comm_nccl_t *n = impl;
    if (!n) return;
    if (n->wd_on) {
        pthread_mutex_lock(&n->mu);
        n->wd_stop = 1;
        pthread_cond_signal(&n->wd_cv);
        pthread_mutex_unlock(&n->mu);
        pthread_join(n->wd, NULL);
        n->wd_on = 0;
    }
    pthread_mutex_lock(&n->mu);
    n->comm = NULL; /* no messages into a comm_t being destroyed */
    while (n->groups) {
        comm_nccl_group_t *g = n->groups;
        n->groups = g->next;
        group_release_locked(n, g); /* the caller's struct stays, detached */
    }
    if (n->ncomm) {
        int idle = n->state == COMM_NCCL_UP && !n->qhead && !n->bhead && !n->busy && !n->ncomm_dead;
        if (idle) {
            n->api.comm_destroy(n->api.ctx, n->ncomm);
            n->ncomm = NULL;
        } else {
            fail_comm_locked(n, "the comm is being destroyed");
        }
    }
    fail_comm_locked(n, "the comm is being destroyed"); /* ends what is left, frees batches */
    while (n->all) op_unlink_free(n, n->all);
    for (int i = 0; i < n->n_ev; i++) n->api.event_free(n->api.ctx, n->evpool[i]);
    if (n->xstream) n->api.stream_free(n->api.ctx, n->xstream);
    pthread_mutex_unlock(&n->mu);
    if (n->api.release) n->api.release(n->api.ctx);
    free(n->evpool);
    free(n->blocked);
    free(n->scan);
    pthread_mutex_destroy(&n->mu);
    pthread_cond_destroy(&n->wd_cv);
    free(n);
}

static int api_complete(const comm_nccl_api *a)
{
    return a->get_unique_id && a->comm_init && a->comm_status && a->comm_abort &&
           a->comm_destroy && a->group_start && a->group_end && a->send && a->recv &&
           a->allreduce_sum_f32 && a->broadcast && a->allgather && a->stream_new &&
           a->stream_free && a->event_new && a->event_free && a->event_record && a->event_query &&
           a->stream_wait_event && a->dev_alloc && a->dev_free && a->copy_to_dev && a->copy_to_host;
}

comm_status comm_nccl_new(const comm_nccl_api *api, const comm_nccl_opts *opts, comm_t **out,
                          comm_nccl_t **nccl, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (nccl) *nccl = NULL;
    if (!api || !out) {
        if (err && errlen) snprintf(err, errlen, "comm_nccl_new: NULL argument");
        return COMM_ERR_INVAL;
    }
    if (!api_complete(api)) {
        if (err && errlen) snprintf(err, errlen, "comm_nccl_new: the NCCL table lacks a function");
        if (api->release) api->release(api->ctx);
        return COMM_ERR_INVAL;
    }
    comm_nccl_t *n = calloc(1, sizeof *n);
    if (!n) {
        if (err && errlen) snprintf(err, errlen, "comm_nccl_new: out of memory");
        if (api->release) api->release(api->ctx);
        return COMM_ERR_NOMEM;
    }
    n->api = *api;
    if (opts) n->opts = *opts;
    if (n->opts.init_timeout_ms <= 0) n->opts.init_timeout_ms = DEFAULT_INIT_TIMEOUT_MS;
    if (n->opts.max_batch <= 0) n->opts.max_batch = DEFAULT_MAX_BATCH;
    if (n->opts.max_batch < 2) n->opts.max_batch = 2; /* a send to itself and its receive */
    if (n->opts.watchdog_ms < 0) n->opts.watchdog_ms = 0;
    n->rank = -1;
    pthread_mutex_init(&n->mu, NULL);
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_cond_init(&n->wd_cv, &ca);
    pthread_condattr_destroy(&ca);
    int rc = n->api.stream_new(n->api.ctx, &n->xstream);
    if (rc != NCCL_API_OK) {
        if (err && errlen)
            snprintf(err, errlen, "comm_nccl_new: creating the transfer stream: %s", api_msg(n));
        nccl_free(n);
        return COMM_ERR_SYS;
    }
    if (n->opts.watchdog_ms > 0) {
        if (pthread_create(&n->wd, NULL, watchdog_main, n) != 0) {
            if (err && errlen) snprintf(err, errlen, "comm_nccl_new: starting the watchdog thread failed");
            nccl_free(n);
            return COMM_ERR_SYS;
        }
        n->wd_on = 1;
    }
    comm_t *c = NULL;
    comm_status st = comm_wrap(&nccl_ops, n, &c); /* frees n on failure */
    if (st != COMM_OK) {
        if (err && errlen) snprintf(err, errlen, "comm_nccl_new: comm_wrap: %s", comm_strerror(st));
        return st;
    }
    n->comm = c;
    *out = c;
    if (nccl) *nccl = n;
    return COMM_OK;
}
