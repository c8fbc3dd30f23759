/* comm/comm.c: the backend-independent half of the data plane (comm.h): the comm_t wrapper
 * and its dispatch through a comm_ops table, errors, operation handles, groups, and the
 * collectives built on point to point for backends that have none of their own (tcp).
 *
 * Generic collectives. Their messages use tags with bit 63 set (users' tags are 63-bit):
 * bits 62..40 a hash of the group's rank list, bits 39..2 the group's call counter, bits
 * 1..0 the phase. Sends go from a copy that this file owns, so a collective returns without
 * waiting for its sends to finish; the copies linger in the comm until the backend lets go
 * of them (reaped by every comm_* call, freed at comm_destroy). The all-reduce gathers every
 * member's buffer at index 0, which sums in list order, ((m0 + m1) + m2) + ..., and sends
 * the result back: every member gets the same bits, and so do the mpi backend's. */
#include "comm/comm.h"

#include <errno.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#define COMM_ERR_BYTES 512
#define TAG_COLL (1ull << 63)      /* generic collectives' tags */
#define SPIN_US 200.0              /* comm_wait polls without sleeping this long */
#define SLEEP_NS 50000L            /* then sleeps this long between polls (no zsock) */

/* A collective's send buffer, shared by its sends to every member. */
typedef struct {
    int refs;
    size_t len;
    void *data;
} coll_buf;

/* A collective's send still in flight. */
typedef struct linger {
    struct linger *next;
    comm_op_t *op;
    coll_buf *buf;
} linger;

struct comm_op {
    comm_t *c;
    void *bop;          /* the backend's handle */
    int send;           /* 1 send, 0 receive (for messages) */
    int peer;
    uint64_t tag;
    int finished;       /* the backend said done or failed: st and len are final */
    comm_status st;
    size_t len;
    comm_op_t *prev, *next; /* in c's list of live operations */
};

struct comm {
    const comm_ops *ops; /* borrowed (static) */
    void *impl;          /* owned: ops->destroy */
    char err[COMM_ERR_BYTES];
    comm_op_t *live;     /* operations not freed yet (comm_destroy frees them) */
    linger *lingering;   /* generic collectives' sends not finished yet */
};

struct comm_group {
    comm_t *c;      /* borrowed: the group dies before its comm */
    int *ranks;     /* [n] world ranks, owned */
    int n;
    int idx;        /* this rank's index in ranks */
    uint32_t key;   /* 23-bit hash of the list (generic collectives' tags) */
    uint64_t seq;   /* generic collectives called so far */
    void *gimpl;    /* the backend's group state, or NULL */
};

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

const char *comm_strerror(comm_status s)
{
    switch (s) {
    case COMM_OK: return "ok";
    case COMM_ERR_INVAL: return "invalid argument";
    case COMM_ERR_SYS: return "transport failure";
    case COMM_ERR_NOMEM: return "out of memory";
    case COMM_ERR_PEER: return "peer unknown or gone";
    case COMM_ERR_TIMEOUT: return "timed out";
    case COMM_ERR_TRUNC: return "message larger than the receive buffer";
    case COMM_ERR_UNSUPPORTED: return "not supported by this backend";
    }
    return "unknown status";
}

const char *comm_backend_name(comm_backend b)
{
    switch (b) {
    case COMM_BACKEND_TCP: return "tcp";
    case COMM_BACKEND_MPI: return "mpi";
    case COMM_BACKEND_NCCL: return "nccl";
    }
    return "unknown";
}

/* ---- the wrapper ---------------------------------------------------------------------------- */

comm_status comm_wrap(const comm_ops *ops, void *impl, comm_t **out)
{
    if (!ops || !out) {
        if (ops && ops->destroy && impl) ops->destroy(impl);
        if (out) *out = NULL;
        return COMM_ERR_INVAL;
    }
    *out = NULL;
    comm_t *c = calloc(1, sizeof *c);
    if (!c) {
        if (ops->destroy && impl) ops->destroy(impl);
        return COMM_ERR_NOMEM;
    }
    c->ops = ops;
    c->impl = impl;
    *out = c;
    return COMM_OK;
}

void *comm_impl_of(const comm_t *c, const comm_ops *ops)
{
    return c && c->ops == ops ? c->impl : NULL;
}

static void op_unlink(comm_t *c, comm_op_t *op)
{
    if (op->prev)
        op->prev->next = op->next;
    else
        c->live = op->next;
    if (op->next) op->next->prev = op->prev;
    op->prev = op->next = NULL;
}

/* Hand op back to the backend (op_free when finished, else cancel) and free the handle. */
static void op_drop(comm_t *c, comm_op_t *op)
{
    if (op->bop) {
        if (op->finished && c->ops->op_free)
            c->ops->op_free(c, c->impl, op->bop);
        else if (c->ops->cancel)
            c->ops->cancel(c, c->impl, op->bop);
        else if (c->ops->op_free)
            c->ops->op_free(c, c->impl, op->bop);
    }
    op_unlink(c, op);
    free(op);
}

static void buf_unref(coll_buf *b)
{
    if (b && --b->refs == 0) {
        free(b->data);
        free(b);
    }
}

void comm_destroy(comm_t **self_p)
{
    if (!self_p || !*self_p) return;
    comm_t *c = *self_p;
    *self_p = NULL;
    /* Lingering sends: cancelled (the backend keeps what the transport still reads until its
     * destroy has closed the transport), their buffers freed after that. */
    linger *keep = c->lingering;
    c->lingering = NULL;
    for (linger *l = keep; l; l = l->next) {
        if (l->op) op_drop(c, l->op);
        l->op = NULL;
    }
    while (c->live) op_drop(c, c->live);
    if (c->ops->destroy) c->ops->destroy(c->impl);
    while (keep) {
        linger *l = keep;
        keep = l->next;
        buf_unref(l->buf);
        free(l);
    }
    free(c);
}

void comm_set_error(comm_t *c, const char *fmt, ...)
{
    if (!c || !fmt) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(c->err, sizeof c->err, fmt, ap);
    va_end(ap);
}

const char *comm_last_error(const comm_t *c) { return c ? c->err : "no comm"; }

comm_backend comm_backend_of(const comm_t *c) { return c ? c->ops->backend : COMM_BACKEND_TCP; }

int comm_rank(const comm_t *c) { return c && c->ops->rank ? c->ops->rank(c->impl) : -1; }

int comm_size(const comm_t *c) { return c && c->ops->size ? c->ops->size(c->impl) : 0; }

/* ---- point to point ------------------------------------------------------------------------ */

static comm_status unsupported(comm_t *c, const char *call, const char *what)
{
    comm_set_error(c, "%s: the %s backend has no %s", call, comm_backend_name(c->ops->backend),
                   what);
    return COMM_ERR_UNSUPPORTED;
}

/* Start a send (buf[len]) or a receive (into buf, at most len bytes); any tag. */
static comm_status op_start(comm_t *c, const char *call, int send, int peer, uint64_t tag,
                            void *buf, size_t len, comm_op_t **out)
{
    *out = NULL;
    if (send ? !c->ops->isend : !c->ops->irecv) return unsupported(c, call, send ? "isend" : "irecv");
    if (!c->ops->test) return unsupported(c, call, "test");
    comm_op_t *op = calloc(1, sizeof *op);
    if (!op) {
        comm_set_error(c, "%s(peer %d, tag %llu): out of memory", call, peer,
                       (unsigned long long)tag);
        return COMM_ERR_NOMEM;
    }
    comm_status st = send ? c->ops->isend(c, c->impl, peer, tag, buf, len, &op->bop)
                          : c->ops->irecv(c, c->impl, peer, tag, buf, len, &op->bop);
    if (st != COMM_OK) {
        free(op);
        return st;
    }
    op->c = c;
    op->send = send;
    op->peer = peer;
    op->tag = tag;
    op->next = c->live;
    if (c->live) c->live->prev = op;
    c->live = op;
    *out = op;
    return COMM_OK;
}

/* Ask the backend about op (unless it finished before). */
static comm_status op_poll(comm_t *c, comm_op_t *op, int *done, size_t *len)
{
    if (!op->finished) {
        int d = 0;
        size_t l = 0;
        comm_status st = c->ops->test(c, c->impl, op->bop, &d, &l);
        if (st != COMM_OK) {
            op->finished = 1;
            op->st = st;
            op->len = 0;
        } else if (d) {
            op->finished = 1;
            op->st = COMM_OK;
            op->len = l;
        }
    }
    *done = op->finished;
    if (len) *len = op->finished ? op->len : 0;
    return op->finished ? op->st : COMM_OK;
}

/* Free the generic collectives' sends that have finished. */
static void reap(comm_t *c)
{
    for (linger **p = &c->lingering; *p;) {
        linger *l = *p;
        int done = 0;
        (void)op_poll(c, l->op, &done, NULL);
        if (!done) {
            p = &l->next;
            continue;
        }
        *p = l->next;
        op_drop(c, l->op);
        buf_unref(l->buf);
        free(l);
    }
}

static comm_status check_user_op(comm_t *c, const char *call, int peer, uint64_t tag,
                                 const void *buf, size_t len, comm_op_t **op)
{
    if (!c) return COMM_ERR_INVAL;
    if (!op || (!buf && len > 0)) {
        comm_set_error(c, "%s(peer %d, tag %llu): %s is NULL", call, peer,
                       (unsigned long long)tag, op ? "buf" : "op");
        return COMM_ERR_INVAL;
    }
    *op = NULL;
    if (tag & TAG_COLL) {
        comm_set_error(c, "%s(peer %d, tag %llu): tags are 63-bit (bit 63 is the collectives')",
                       call, peer, (unsigned long long)tag);
        return COMM_ERR_INVAL;
    }
    return COMM_OK;
}

comm_status comm_isend(comm_t *c, int peer, uint64_t tag, const void *buf, size_t len,
                       comm_op_t **op)
{
    comm_status st = check_user_op(c, "comm_isend", peer, tag, buf, len, op);
    if (st != COMM_OK) return st;
    reap(c);
    return op_start(c, "comm_isend", 1, peer, tag, (void *)buf, len, op);
}

comm_status comm_irecv(comm_t *c, int peer, uint64_t tag, void *buf, size_t cap, comm_op_t **op)
{
    comm_status st = check_user_op(c, "comm_irecv", peer, tag, buf, cap, op);
    if (st != COMM_OK) return st;
    reap(c);
    return op_start(c, "comm_irecv", 0, peer, tag, buf, cap, op);
}

comm_status comm_test(comm_t *c, comm_op_t *op, int *done, size_t *len)
{
    if (done) *done = 0;
    if (len) *len = 0;
    if (!c || !op || !done || op->c != c) {
        if (c) comm_set_error(c, "comm_test: %s", !op ? "op is NULL" : !done ? "done is NULL"
                                                                         : "op of another comm");
        return COMM_ERR_INVAL;
    }
    reap(c);
    return op_poll(c, op, done, len);
}

/* Wait a little for something to happen: spin at first, then poll the backend's socket
 * (woken by incoming data) or sleep, never past deadline (< 0: none). */
static void idle(comm_t *c, double start, double deadline)
{
    double t = now_ms();
    if ((t - start) * 1e3 < SPIN_US) {
        sched_yield();
        return;
    }
    void *zs = c->ops->zsock ? c->ops->zsock(c->impl) : NULL;
    if (zs) {
        int ms = 1;
        if (deadline >= 0 && deadline - t < 1.0) ms = 0;
        zmq_pollitem_t it = {.socket = zs, .events = ZMQ_POLLIN};
        if (ms > 0) {
            (void)zmq_poll(&it, 1, ms);
            return;
        }
    }
    struct timespec ts = {0, SLEEP_NS};
    nanosleep(&ts, NULL);
}

comm_status comm_wait(comm_t *c, comm_op_t *op, int timeout_ms, size_t *len)
{
    if (len) *len = 0;
    if (!c || !op || op->c != c) {
        if (c) comm_set_error(c, "comm_wait: %s", op ? "op of another comm" : "op is NULL");
        return COMM_ERR_INVAL;
    }
    const double start = now_ms();
    const double deadline = timeout_ms < 0 ? -1.0 : start + timeout_ms;
    for (;;) {
        int done = 0;
        comm_status st = comm_test(c, op, &done, len);
        if (done) return st;
        if (deadline >= 0 && now_ms() >= deadline) {
            comm_set_error(c, "comm_wait: %s peer %d tag %llu: not finished after %d ms",
                           op->send ? "send to" : "receive from", op->peer,
                           (unsigned long long)op->tag, timeout_ms);
            return COMM_ERR_TIMEOUT;
        }
        idle(c, start, deadline);
    }
}

void comm_op_free(comm_t *c, comm_op_t **op)
{
    if (!op || !*op) return;
    comm_op_t *o = *op;
    *op = NULL;
    if (!c) c = o->c;
    op_drop(c, o);
}

void comm_cancel(comm_t *c, comm_op_t **op) { comm_op_free(c, op); }

void comm_discard(comm_t *c, int peer, uint64_t tag)
{
    if (c && c->ops->discard) c->ops->discard(c, c->impl, peer, tag);
}

comm_status comm_progress(comm_t *c)
{
    if (!c) return COMM_ERR_INVAL;
    reap(c);
    return c->ops->progress ? c->ops->progress(c, c->impl) : COMM_OK;
}

void *comm_zsock(comm_t *c) { return c && c->ops->zsock ? c->ops->zsock(c->impl) : NULL; }

/* ---- groups ------------------------------------------------------------------------------------ */

comm_status comm_group_new(comm_t *c, const int *ranks, int n, comm_group_t **out)
{
    if (!c) return COMM_ERR_INVAL;
    if (!out || !ranks || n < 1) {
        comm_set_error(c, "comm_group_new: %s", !out ? "out is NULL" : !ranks ? "ranks is NULL"
                                                                           : "empty group");
        return COMM_ERR_INVAL;
    }
    *out = NULL;
    const int size = comm_size(c), me = comm_rank(c);
    int idx = -1;
    for (int i = 0; i < n; i++) {
        if (ranks[i] < 0 || ranks[i] >= size) {
            comm_set_error(c, "comm_group_new: ranks[%d] = %d is outside the world (size %d)", i,
                           ranks[i], size);
            return COMM_ERR_INVAL;
        }
        for (int j = 0; j < i; j++)
            if (ranks[j] == ranks[i]) {
                comm_set_error(c, "comm_group_new: rank %d is listed twice (at %d and %d)",
                               ranks[i], j, i);
                return COMM_ERR_INVAL;
            }
        if (ranks[i] == me) idx = i;
    }
    if (idx < 0) {
        comm_set_error(c, "comm_group_new: this rank (%d) is not in the list", me);
        return COMM_ERR_INVAL;
    }
    comm_group_t *g = calloc(1, sizeof *g);
    int *copy = malloc((size_t)n * sizeof *copy);
    if (!g || !copy) {
        free(g);
        free(copy);
        comm_set_error(c, "comm_group_new: out of memory");
        return COMM_ERR_NOMEM;
    }
    memcpy(copy, ranks, (size_t)n * sizeof *copy);
    uint64_t h = 1469598103934665603ull; /* FNV-1a over the list */
    for (int i = 0; i < n; i++)
        for (int b = 0; b < 4; b++) {
            h ^= ((uint32_t)ranks[i] >> (8 * b)) & 0xffu;
            h *= 1099511628211ull;
        }
    g->c = c;
    g->ranks = copy;
    g->n = n;
    g->idx = idx;
    g->key = (uint32_t)((h ^ (h >> 23) ^ (h >> 46)) & 0x7fffffu);
    if (c->ops->group_new) {
        comm_status st = c->ops->group_new(c, c->impl, copy, n, &g->gimpl);
        if (st != COMM_OK) {
            free(copy);
            free(g);
            return st;
        }
    }
    *out = g;
    return COMM_OK;
}

void comm_group_destroy(comm_group_t **self_p)
{
    if (!self_p || !*self_p) return;
    comm_group_t *g = *self_p;
    *self_p = NULL;
    if (g->gimpl && g->c->ops->group_free) g->c->ops->group_free(g->c, g->c->impl, g->gimpl);
    free(g->ranks);
    free(g);
}

int comm_group_size(const comm_group_t *g) { return g ? g->n : 0; }

int comm_group_index(const comm_group_t *g) { return g ? g->idx : -1; }

/* ---- generic collectives over point to point ------------------------------------------------- */

static uint64_t coll_tag(const comm_group_t *g, uint64_t seq, int phase)
{
    return TAG_COLL | ((uint64_t)g->key << 40) | ((seq & ((1ull << 38) - 1)) << 2) |
           (uint64_t)phase;
}

static coll_buf *buf_copy(const void *src, size_t len)
{
    coll_buf *b = calloc(1, sizeof *b);
    if (!b) return NULL;
    b->data = malloc(len ? len : 1);
    if (!b->data) {
        free(b);
        return NULL;
    }
    if (len) memcpy(b->data, src, len);
    b->len = len;
    b->refs = 1;
    return b;
}

/* Send b to world rank peer; the send lingers in c until it finishes. */
static comm_status coll_send(comm_t *c, const char *call, int peer, uint64_t tag, coll_buf *b)
{
    linger *l = calloc(1, sizeof *l);
    if (!l) {
        comm_set_error(c, "%s: out of memory", call);
        return COMM_ERR_NOMEM;
    }
    comm_status st = op_start(c, call, 1, peer, tag, b->data, b->len, &l->op);
    if (st != COMM_OK) {
        free(l);
        return st;
    }
    b->refs++;
    l->buf = b;
    l->next = c->lingering;
    c->lingering = l;
    return COMM_OK;
}

/* Wait for the receives ops[k] (from world rank peers[k], exactly want[k] bytes) until
 * deadline (< 0: none). Every op is freed (cancelled when unfinished) on return. */
static comm_status coll_wait(comm_group_t *g, const char *call, comm_op_t **ops, const int *peers,
                             const size_t *want, int k, double deadline, int timeout_ms)
{
    comm_t *c = g->c;
    comm_status st = COMM_OK;
    const double start = now_ms();
    for (;;) {
        reap(c);
        int left = 0;
        for (int i = 0; i < k && st == COMM_OK; i++) {
            if (!ops[i]) continue;
            int done = 0;
            size_t len = 0;
            comm_status s = op_poll(c, ops[i], &done, &len);
            if (s != COMM_OK) {
                char msg[COMM_ERR_BYTES];
                snprintf(msg, sizeof msg, "%s", c->err);
                comm_set_error(c, "%s: group of %d (index %d), from rank %d: %s: %s", call, g->n,
                               g->idx, peers[i], comm_strerror(s), msg);
                st = s;
            } else if (done && len != want[i]) {
                comm_set_error(c, "%s: group of %d (index %d): rank %d sent %zu bytes, not %zu "
                               "(do all members pass the same sizes?)",
                               call, g->n, g->idx, peers[i], len, want[i]);
                st = COMM_ERR_INVAL;
            } else if (done) {
                comm_op_free(c, &ops[i]);
            } else {
                left++;
            }
        }
        if (st != COMM_OK || left == 0) break;
        if (deadline >= 0 && now_ms() >= deadline) {
            int who = -1;
            for (int i = 0; i < k && who < 0; i++)
                if (ops[i]) who = peers[i];
            comm_set_error(c, "%s: group of %d (index %d): nothing from rank %d within %d ms",
                           call, g->n, g->idx, who, timeout_ms);
            st = COMM_ERR_TIMEOUT;
            break;
        }
        idle(c, start, deadline);
    }
    for (int i = 0; i < k; i++) comm_cancel(c, &ops[i]);
    return st;
}

static comm_status generic_ok(comm_group_t *g, const char *call)
{
    comm_t *c = g->c;
    if (!c->ops->isend || !c->ops->irecv || !c->ops->test)
        return unsupported(c, call, "collectives (nor isend, irecv and test to build them)");
    return COMM_OK;
}

static comm_status generic_allreduce(comm_group_t *g, float *buf, size_t count, double deadline,
                                     int timeout_ms)
{
    static const char call[] = "comm_allreduce_sum_f32";
    comm_t *c = g->c;
    const size_t bytes = count * sizeof(float);
    const uint64_t seq = g->seq++;
    comm_status st;
    if (g->idx != 0) {
        coll_buf *b = buf_copy(buf, bytes);
        if (!b) {
            comm_set_error(c, "%s: out of memory (%zu bytes)", call, bytes);
            return COMM_ERR_NOMEM;
        }
        comm_op_t *r = NULL;
        st = op_start(c, call, 0, g->ranks[0], coll_tag(g, seq, 1), buf, bytes, &r);
        if (st == COMM_OK) st = coll_send(c, call, g->ranks[0], coll_tag(g, seq, 0), b);
        buf_unref(b);
        if (st != COMM_OK) {
            comm_cancel(c, &r);
            return st;
        }
        return coll_wait(g, call, &r, &g->ranks[0], &bytes, 1, deadline, timeout_ms);
    }
    const int k = g->n - 1;
    float *parts = malloc(bytes * (size_t)k);
    comm_op_t **ops = calloc((size_t)k, sizeof *ops);
    size_t *want = malloc((size_t)k * sizeof *want);
    if (!parts || !ops || !want) {
        free(parts);
        free(ops);
        free(want);
        comm_set_error(c, "%s: out of memory (%zu bytes)", call, bytes * (size_t)k);
        return COMM_ERR_NOMEM;
    }
    st = COMM_OK;
    for (int i = 0; i < k && st == COMM_OK; i++) {
        want[i] = bytes;
        st = op_start(c, call, 0, g->ranks[i + 1], coll_tag(g, seq, 0), parts + (size_t)i * count,
                      bytes, &ops[i]);
    }
    if (st == COMM_OK)
        st = coll_wait(g, call, ops, &g->ranks[1], want, k, deadline, timeout_ms);
    else
        for (int i = 0; i < k; i++) comm_cancel(c, &ops[i]);
    if (st == COMM_OK) {
        for (int i = 0; i < k; i++) {
            const float *p = parts + (size_t)i * count;
            for (size_t j = 0; j < count; j++) buf[j] += p[j];
        }
        coll_buf *b = buf_copy(buf, bytes);
        if (!b) {
            comm_set_error(c, "%s: out of memory (%zu bytes)", call, bytes);
            st = COMM_ERR_NOMEM;
        }
        for (int i = 1; b && i < g->n && st == COMM_OK; i++)
            st = coll_send(c, call, g->ranks[i], coll_tag(g, seq, 1), b);
        buf_unref(b);
    }
    free(parts);
    free(ops);
    free(want);
    return st;
}

static comm_status generic_broadcast(comm_group_t *g, int root, void *buf, size_t len,
                                     double deadline, int timeout_ms)
{
    static const char call[] = "comm_broadcast";
    comm_t *c = g->c;
    const uint64_t seq = g->seq++;
    if (g->idx == root) {
        coll_buf *b = buf_copy(buf, len);
        if (!b) {
            comm_set_error(c, "%s: out of memory (%zu bytes)", call, len);
            return COMM_ERR_NOMEM;
        }
        comm_status st = COMM_OK;
        for (int i = 0; i < g->n && st == COMM_OK; i++)
            if (i != root) st = coll_send(c, call, g->ranks[i], coll_tag(g, seq, 0), b);
        buf_unref(b);
        return st;
    }
    comm_op_t *r = NULL;
    comm_status st = op_start(c, call, 0, g->ranks[root], coll_tag(g, seq, 0), buf, len, &r);
    if (st != COMM_OK) return st;
    return coll_wait(g, call, &r, &g->ranks[root], &len, 1, deadline, timeout_ms);
}

static comm_status generic_allgather(comm_group_t *g, const void *send, size_t len, void *recv,
                                     double deadline, int timeout_ms)
{
    static const char call[] = "comm_allgather";
    comm_t *c = g->c;
    const uint64_t seq = g->seq++;
    const int k = g->n - 1;
    coll_buf *b = buf_copy(send, len);
    comm_op_t **ops = calloc((size_t)k, sizeof *ops);
    size_t *want = malloc((size_t)k * sizeof *want);
    int *peers = malloc((size_t)k * sizeof *peers);
    comm_status st = COMM_OK;
    if (!b || !ops || !want || !peers) {
        comm_set_error(c, "%s: out of memory", call);
        st = COMM_ERR_NOMEM;
    }
    for (int i = 0, j = 0; st == COMM_OK && i < g->n; i++) {
        if (i == g->idx) continue;
        peers[j] = g->ranks[i];
        want[j] = len;
        st = op_start(c, call, 0, g->ranks[i], coll_tag(g, seq, 0), (char *)recv + (size_t)i * len,
                      len, &ops[j]);
        j++;
    }
    for (int i = 0; st == COMM_OK && i < g->n; i++)
        if (i != g->idx) st = coll_send(c, call, g->ranks[i], coll_tag(g, seq, 0), b);
    if (st == COMM_OK) {
        memcpy((char *)recv + (size_t)g->idx * len, b->data, len);
        st = coll_wait(g, call, ops, peers, want, k, deadline, timeout_ms);
    } else if (ops) {
        for (int i = 0; i < k; i++) comm_cancel(c, &ops[i]);
    }
    buf_unref(b);
    free(ops);
    free(want);
    free(peers);
    return st;
}

/* ---- collectives: dispatch -------------------------------------------------------------------- */

static double deadline_of(int timeout_ms) { return timeout_ms < 0 ? -1.0 : now_ms() + timeout_ms; }

comm_status comm_allreduce_sum_f32(comm_group_t *g, float *buf, size_t count, int timeout_ms)
{
    if (!g) return COMM_ERR_INVAL;
    comm_t *c = g->c;
    if (!buf && count > 0) {
        comm_set_error(c, "comm_allreduce_sum_f32: buf is NULL");
        return COMM_ERR_INVAL;
    }
    if (count > SIZE_MAX / sizeof(float) / (size_t)g->n) {
        comm_set_error(c, "comm_allreduce_sum_f32: count %zu is too large", count);
        return COMM_ERR_INVAL;
    }
    reap(c);
    if (g->n == 1 || count == 0) return COMM_OK;
    if (c->ops->allreduce_sum_f32)
        return c->ops->allreduce_sum_f32(c, c->impl, g->gimpl, g->ranks, g->n, buf, count,
                                         timeout_ms);
    comm_status st = generic_ok(g, "comm_allreduce_sum_f32");
    if (st != COMM_OK) return st;
    return generic_allreduce(g, buf, count, deadline_of(timeout_ms), timeout_ms);
}

comm_status comm_broadcast(comm_group_t *g, int root, void *buf, size_t len, int timeout_ms)
{
    if (!g) return COMM_ERR_INVAL;
    comm_t *c = g->c;
    if ((!buf && len > 0) || root < 0 || root >= g->n) {
        if (root < 0 || root >= g->n)
            comm_set_error(c, "comm_broadcast: root index %d outside the group of %d", root, g->n);
        else
            comm_set_error(c, "comm_broadcast: buf is NULL");
        return COMM_ERR_INVAL;
    }
    reap(c);
    if (g->n == 1) return COMM_OK;
    if (c->ops->broadcast)
        return c->ops->broadcast(c, c->impl, g->gimpl, g->ranks, g->n, root, buf, len, timeout_ms);
    comm_status st = generic_ok(g, "comm_broadcast");
    if (st != COMM_OK) return st;
    return generic_broadcast(g, root, buf, len, deadline_of(timeout_ms), timeout_ms);
}

comm_status comm_allgather(comm_group_t *g, const void *send, size_t len, void *recv,
                           int timeout_ms)
{
    if (!g) return COMM_ERR_INVAL;
    comm_t *c = g->c;
    if (len > 0 && (!send || !recv)) {
        comm_set_error(c, "comm_allgather: %s is NULL", !send ? "send" : "recv");
        return COMM_ERR_INVAL;
    }
    if (len > SIZE_MAX / (size_t)g->n) {
        comm_set_error(c, "comm_allgather: len %zu is too large", len);
        return COMM_ERR_INVAL;
    }
    reap(c);
    if (len == 0) return COMM_OK;
    if (g->n == 1) {
        memmove(recv, send, len);
        return COMM_OK;
    }
    if (c->ops->allgather)
        return c->ops->allgather(c, c->impl, g->gimpl, g->ranks, g->n, send, len, recv, timeout_ms);
    comm_status st = generic_ok(g, "comm_allgather");
    if (st != COMM_OK) return st;
    return generic_allgather(g, send, len, recv, deadline_of(timeout_ms), timeout_ms);
}
