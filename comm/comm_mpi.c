/* comm/comm_mpi.c: the mpi backend of the data plane (comm.h) over Open MPI.
 *
 * The world is a duplicate of MPI_COMM_WORLD (same ranks, its own tag space) with
 * MPI_ERRORS_RETURN, so failures come back as statuses with MPI's error string. Point to
 * point maps to MPI_Isend / MPI_Irecv of bytes; the 63-bit tag is folded into [0, mask],
 * mask the largest 2^k - 1 <= MPI_TAG_UB (2^31 - 1 with Open MPI's ob1): fold(t) = (t ^ (t >>
 * 31) ^ (t >> 62)) & mask, the identity on tags below 2^31 (duet's transfer ids), so nearby
 * ids never collide. Messages are at most INT_MAX bytes (refused above).
 *
 * Discards and cancels. A discarded (peer, tag) is remembered (the last 256); every progress
 * (comm_progress, comm_test, comm_wait) drains its unexpected messages with MPI_Improbe +
 * MPI_Mrecv. A cancelled receive is MPI_Cancel'ed; when the cancel takes, its message is
 * owed a drop (a skip count drained the same way), and receives posted later for the same
 * pair wait (deferred, not yet handed to MPI) until it is dropped, so they get the messages
 * after it. A cancelled send cannot be taken back: MPI finishes it (the handle is freed when
 * it does).
 *
 * Collectives run on a communicator per group (MPI_Comm_create_group, members only) with
 * non-blocking MPI calls polled until the timeout, on scratch buffers of the group's own (a
 * collective that timed out may still write them: they are handed to the comm and freed
 * when MPI completes it, and the group is broken). The all-reduce is MPI_Igather to index
 * 0, a sum in list order there, MPI_Ibcast: the same bits as the tcp backend's. */
#include "comm/comm.h"

#include <limits.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mpi.h>

#define MPI_REMEMBER 256  /* discarded pairs remembered */
#define MPI_GROUP_TAG 4242 /* MPI_Comm_create_group's tag */

enum { OP_SEND, OP_RECV };

typedef struct mpi_op mpi_op;
struct mpi_op {
    int kind;
    int peer;
    uint64_t tag;
    int ftag;            /* folded */
    MPI_Request req;     /* MPI_REQUEST_NULL while deferred or when done */
    void *buf;
    int count;           /* bytes sent / receive capacity */
    int deferred;        /* receive waiting for a cancelled one's message to be dropped */
    int done;
    comm_status st;
    size_t len;
    int orphan;          /* cancelled: freed when MPI completes it */
    char err[512];       /* the failure's message (set into the comm by test) */
    mpi_op *prev, *next; /* in the deferred list or the orphan list */
};

/* A remembered (peer, folded tag). */
typedef struct {
    int peer, ftag;
    int discard;         /* drop every message */
    unsigned skip;       /* drop this many (cancels that took) */
    unsigned pending;    /* cancelled receives MPI has not completed yet */
    uint64_t age;        /* when it was discarded (the oldest is forgotten first) */
} mpi_key;

/* A collective that timed out: MPI may still use its buffers. */
typedef struct mpi_linger {
    struct mpi_linger *next;
    MPI_Request req;
    void *a, *b;
} mpi_linger;

typedef struct {
    MPI_Comm comm;
    int rank, size;
    int mask;            /* tag fold mask */
    mpi_key *keys;
    int nkeys, capkeys, ndiscard;
    uint64_t clock;
    mpi_op *def_head, *def_tail; /* deferred receives, in posting order */
    mpi_op *orphans;
    mpi_linger *lingering;
    void *scratch;       /* drained messages land here */
    size_t scratch_cap;
} mpi_impl;

typedef struct {
    MPI_Comm comm;
    int n, idx;
    int broken;          /* a collective timed out */
    void *a, *b;         /* scratch */
    size_t acap, bcap;
} mpi_group;

static const comm_ops mpi_ops;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

static void errstr(int rc, char *buf, size_t cap)
{
    char s[MPI_MAX_ERROR_STRING];
    int n = 0;
    if (MPI_Error_string(rc, s, &n) != MPI_SUCCESS) snprintf(s, sizeof s, "MPI error %d", rc);
    snprintf(buf, cap, "%s", s);
}

/* The status of a failed MPI call on a transfer. */
static comm_status mpi_status_of(int rc)
{
    int cls = rc;
    MPI_Error_class(rc, &cls);
    switch (cls) {
    case MPI_ERR_TRUNCATE: return COMM_ERR_TRUNC;
    case MPI_ERR_RANK:
    case MPI_ERR_TAG:
    case MPI_ERR_COUNT:
    case MPI_ERR_ARG:
    case MPI_ERR_BUFFER: return COMM_ERR_INVAL;
    case MPI_ERR_NO_MEM: return COMM_ERR_NOMEM;
    default: return COMM_ERR_PEER;
    }
}

static int fold(const mpi_impl *m, uint64_t tag)
{
    return (int)((tag ^ (tag >> 31) ^ (tag >> 62)) & (uint64_t)m->mask);
}

static void list_push(mpi_op **head, mpi_op **tail, mpi_op *op)
{
    op->prev = *tail;
    op->next = NULL;
    if (*tail)
        (*tail)->next = op;
    else
        *head = op;
    *tail = op;
}

static void list_del(mpi_op **head, mpi_op **tail, mpi_op *op)
{
    if (op->prev)
        op->prev->next = op->next;
    else
        *head = op->next;
    if (op->next)
        op->next->prev = op->prev;
    else if (tail)
        *tail = op->prev;
    op->prev = op->next = NULL;
}

/* ---- remembered pairs ---------------------------------------------------------------------- */

static mpi_key *key_find(mpi_impl *m, int peer, int ftag)
{
    for (int i = 0; i < m->nkeys; i++)
        if (m->keys[i].peer == peer && m->keys[i].ftag == ftag) return &m->keys[i];
    return NULL;
}

static mpi_key *key_get(mpi_impl *m, int peer, int ftag)
{
    mpi_key *k = key_find(m, peer, ftag);
    if (k) return k;
    if (m->nkeys == m->capkeys) {
        int cap = m->capkeys ? 2 * m->capkeys : 16;
        mpi_key *nk = realloc(m->keys, (size_t)cap * sizeof *nk);
        if (!nk) return NULL;
        m->keys = nk;
        m->capkeys = cap;
    }
    k = &m->keys[m->nkeys++];
    memset(k, 0, sizeof *k);
    k->peer = peer;
    k->ftag = ftag;
    return k;
}

/* Forget keys that remember nothing. */
static void key_compact(mpi_impl *m)
{
    int j = 0;
    for (int i = 0; i < m->nkeys; i++)
        if (m->keys[i].discard || m->keys[i].skip || m->keys[i].pending) m->keys[j++] = m->keys[i];
    m->nkeys = j;
}

static int key_blocks(mpi_impl *m, int peer, int ftag)
{
    mpi_key *k = key_find(m, peer, ftag);
    return k && (k->skip || k->pending);
}

/* Receive and drop one unexpected message, if one of (peer, ftag) is there. 1 when one was. */
static int drop_one(mpi_impl *m, int peer, int ftag)
{
    int flag = 0;
    MPI_Message msg;
    MPI_Status st;
    if (MPI_Improbe(peer, ftag, m->comm, &flag, &msg, &st) != MPI_SUCCESS || !flag) return 0;
    int n = 0;
    MPI_Get_count(&st, MPI_BYTE, &n);
    if (n < 0) n = 0;
    if ((size_t)n > m->scratch_cap) {
        void *s = realloc(m->scratch, (size_t)n);
        if (s) {
            m->scratch = s;
            m->scratch_cap = (size_t)n;
        }
    }
    /* without room the receive truncates: an error, but the message is gone all the same */
    int cap = (size_t)n <= m->scratch_cap ? n : (int)m->scratch_cap;
    MPI_Mrecv(m->scratch, cap, MPI_BYTE, &msg, MPI_STATUS_IGNORE);
    return 1;
}

/* ---- progress -------------------------------------------------------------------------------- */

/* Complete a finished orphan: a cancel that took owes its pair a drop. */
static void orphan_done(mpi_impl *m, mpi_op *op, MPI_Status *st)
{
    mpi_key *k = key_find(m, op->peer, op->ftag);
    if (op->kind == OP_RECV && k) {
        int cancelled = 0;
        MPI_Test_cancelled(st, &cancelled);
        if (k->pending) k->pending--;
        if (cancelled) k->skip++;
    }
    free(op);
}

static comm_status mpi_progress(comm_t *c, void *impl)
{
    (void)c;
    mpi_impl *m = impl;
    int flag = 0;
    MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, m->comm, &flag, MPI_STATUS_IGNORE); /* moves MPI */
    for (mpi_op *op = m->orphans, *next; op; op = next) {
        next = op->next;
        MPI_Status st;
        flag = 0;
        if (MPI_Test(&op->req, &flag, &st) != MPI_SUCCESS) flag = 1;
        if (!flag) continue;
        list_del(&m->orphans, NULL, op);
        orphan_done(m, op, &st);
    }
    for (int i = 0; i < m->nkeys; i++) {
        mpi_key *k = &m->keys[i];
        if (k->discard) {
            while (drop_one(m, k->peer, k->ftag)) {
            }
        } else {
            while (k->skip && !k->pending && drop_one(m, k->peer, k->ftag)) k->skip--;
        }
    }
    key_compact(m);
    /* deferred receives whose pair is clear go to MPI, in order */
    for (mpi_op *op = m->def_head, *next; op; op = next) {
        next = op->next;
        if (key_blocks(m, op->peer, op->ftag)) continue;
        /* an earlier deferred receive of the same pair goes first */
        int earlier = 0;
        for (mpi_op *e = m->def_head; e != op && !earlier; e = e->next)
            earlier = e->peer == op->peer && e->ftag == op->ftag;
        if (earlier) continue;
        list_del(&m->def_head, &m->def_tail, op);
        if (op->orphan) { /* a cancelled deferred receive: its message is dropped */
            mpi_key *k = key_get(m, op->peer, op->ftag);
            if (k) k->skip++;
            free(op);
            continue;
        }
        op->deferred = 0;
        int rc = MPI_Irecv(op->buf, op->count, MPI_BYTE, op->peer, op->ftag, m->comm, &op->req);
        if (rc != MPI_SUCCESS) {
            char e[MPI_MAX_ERROR_STRING];
            errstr(rc, e, sizeof e);
            op->done = 1;
            op->st = mpi_status_of(rc);
            snprintf(op->err, sizeof op->err, "comm_irecv(peer %d, tag %llu): MPI_Irecv: %.300s",
                     op->peer, (unsigned long long)op->tag, e);
        }
    }
    for (mpi_linger **p = &m->lingering; *p;) {
        mpi_linger *l = *p;
        flag = 0;
        if (MPI_Test(&l->req, &flag, MPI_STATUS_IGNORE) != MPI_SUCCESS) flag = 1;
        if (!flag) {
            p = &l->next;
            continue;
        }
        *p = l->next;
        free(l->a);
        free(l->b);
        free(l);
    }
    return COMM_OK;
}

/* ---- point to point -------------------------------------------------------------------------- */

static int mpi_rank_of(void *impl) { return ((mpi_impl *)impl)->rank; }
static int mpi_size_of(void *impl) { return ((mpi_impl *)impl)->size; }

static comm_status check(comm_t *c, mpi_impl *m, const char *call, int peer, uint64_t tag,
                         size_t len)
{
    if (peer < 0 || peer >= m->size) {
        comm_set_error(c, "%s(peer %d, tag %llu): rank outside the world of %d", call, peer,
                       (unsigned long long)tag, m->size);
        return COMM_ERR_INVAL;
    }
    if (len > INT_MAX) {
        comm_set_error(c, "%s(peer %d, tag %llu): %zu bytes: the mpi backend moves at most "
                       "INT_MAX (%d) bytes per message", call, peer, (unsigned long long)tag, len,
                       INT_MAX);
        return COMM_ERR_INVAL;
    }
    return COMM_OK;
}

static mpi_op *op_new(comm_t *c, int kind, int peer, uint64_t tag, int ftag, const void *buf,
                      size_t len)
{
    mpi_op *op = calloc(1, sizeof *op);
    if (!op) {
        comm_set_error(c, "comm_%s(peer %d, tag %llu): out of memory",
                       kind == OP_SEND ? "isend" : "irecv", peer, (unsigned long long)tag);
        return NULL;
    }
    op->kind = kind;
    op->peer = peer;
    op->tag = tag;
    op->ftag = ftag;
    op->buf = (void *)buf;
    op->count = (int)len;
    op->req = MPI_REQUEST_NULL;
    return op;
}

static comm_status mpi_isend(comm_t *c, void *impl, int peer, uint64_t tag, const void *buf,
                             size_t len, void **out)
{
    mpi_impl *m = impl;
    comm_status st = check(c, m, "comm_isend", peer, tag, len);
    if (st != COMM_OK) return st;
    mpi_op *op = op_new(c, OP_SEND, peer, tag, fold(m, tag), buf, len);
    if (!op) return COMM_ERR_NOMEM;
    int rc = MPI_Isend(buf, op->count, MPI_BYTE, peer, op->ftag, m->comm, &op->req);
    if (rc != MPI_SUCCESS) {
        char e[MPI_MAX_ERROR_STRING];
        errstr(rc, e, sizeof e);
        comm_set_error(c, "comm_isend(peer %d, tag %llu): MPI_Isend: %s", peer,
                       (unsigned long long)tag, e);
        free(op);
        return mpi_status_of(rc);
    }
    *out = op;
    return COMM_OK;
}

static comm_status mpi_irecv(comm_t *c, void *impl, int peer, uint64_t tag, void *buf, size_t cap,
                             void **out)
{
    mpi_impl *m = impl;
    if (cap > INT_MAX) cap = INT_MAX; /* no message is larger */
    comm_status st = check(c, m, "comm_irecv", peer, tag, cap);
    if (st != COMM_OK) return st;
    const int ftag = fold(m, tag);
    mpi_key *k = key_find(m, peer, ftag);
    if (k && k->discard) {
        comm_set_error(c, "comm_irecv(peer %d, tag %llu): the pair was discarded (comm_discard)",
                       peer, (unsigned long long)tag);
        return COMM_ERR_INVAL;
    }
    mpi_op *op = op_new(c, OP_RECV, peer, tag, ftag, buf, cap);
    if (!op) return COMM_ERR_NOMEM;
    int later = 0; /* behind a deferred receive of the same pair */
    for (mpi_op *e = m->def_head; e && !later; e = e->next)
        later = e->peer == peer && e->ftag == ftag;
    if (later || (k && (k->skip || k->pending))) {
        op->deferred = 1;
        list_push(&m->def_head, &m->def_tail, op);
        *out = op;
        return COMM_OK;
    }
    int rc = MPI_Irecv(buf, op->count, MPI_BYTE, peer, ftag, m->comm, &op->req);
    if (rc != MPI_SUCCESS) {
        char e[MPI_MAX_ERROR_STRING];
        errstr(rc, e, sizeof e);
        comm_set_error(c, "comm_irecv(peer %d, tag %llu): MPI_Irecv: %s", peer,
                       (unsigned long long)tag, e);
        free(op);
        return mpi_status_of(rc);
    }
    *out = op;
    return COMM_OK;
}

static comm_status mpi_test(comm_t *c, void *impl, void *opv, int *done, size_t *len)
{
    mpi_impl *m = impl;
    mpi_op *op = opv;
    *done = 0;
    *len = 0;
    if (!op->done) (void)mpi_progress(c, m);
    if (!op->done && !op->deferred) {
        int flag = 0;
        MPI_Status s;
        memset(&s, 0, sizeof s);
        int rc = MPI_Test(&op->req, &flag, &s);
        if (rc == MPI_SUCCESS && flag && op->kind == OP_RECV && s.MPI_ERROR != MPI_SUCCESS &&
            s.MPI_ERROR != MPI_ERR_PENDING)
            rc = s.MPI_ERROR;
        if (rc != MPI_SUCCESS) {
            char e[MPI_MAX_ERROR_STRING];
            errstr(rc, e, sizeof e);
            op->done = 1;
            op->st = mpi_status_of(rc);
            op->req = MPI_REQUEST_NULL;
            if (op->st == COMM_ERR_TRUNC)
                snprintf(op->err, sizeof op->err,
                         "comm_test: receive from peer %d tag %llu: a message larger than %d "
                         "bytes (dropped): %.300s", op->peer, (unsigned long long)op->tag, op->count,
                         e);
            else
                snprintf(op->err, sizeof op->err, "comm_test: %s peer %d tag %llu: MPI_Test: %.300s",
                         op->kind == OP_SEND ? "send to" : "receive from", op->peer,
                         (unsigned long long)op->tag, e);
        } else if (flag) {
            op->done = 1;
            op->st = COMM_OK;
            if (op->kind == OP_SEND) {
                op->len = (size_t)op->count;
            } else {
                int n = 0;
                MPI_Get_count(&s, MPI_BYTE, &n);
                op->len = n > 0 ? (size_t)n : 0;
            }
        }
    }
    if (!op->done) return COMM_OK;
    *done = 1;
    if (op->st != COMM_OK) {
        comm_set_error(c, "%s", op->err);
        return op->st;
    }
    *len = op->len;
    return COMM_OK;
}

static void mpi_cancel(comm_t *c, void *impl, void *opv)
{
    (void)c;
    mpi_impl *m = impl;
    mpi_op *op = opv;
    if (!op) return;
    if (op->deferred) {
        /* it never reached MPI: its message is owed a drop all the same, when its turn comes
         * (progress turns it into a skip once the receives before it are served) */
        op->orphan = 1;
        return;
    }
    if (op->done || op->req == MPI_REQUEST_NULL) {
        free(op);
        return;
    }
    if (op->kind == OP_RECV) {
        /* The caller may free the buffer as soon as this returns, so the receive must be
         * over: either the cancel took, or the receive had been matched and completes.
         * MPI_Wait on a request marked for cancellation is local (MPI 4.0, 3.8.4), so this
         * does not block on the peer. */
        MPI_Cancel(&op->req);
        mpi_key *k = key_get(m, op->peer, op->ftag);
        if (k) k->pending++;
        MPI_Status st;
        if (MPI_Wait(&op->req, &st) != MPI_SUCCESS) memset(&st, 0, sizeof st);
        orphan_done(m, op, &st);
        return;
    }
    int flag = 0;
    MPI_Status st;
    if (MPI_Test(&op->req, &flag, &st) != MPI_SUCCESS) flag = 1;
    op->orphan = 1;
    if (flag) {
        orphan_done(m, op, &st);
        return;
    }
    op->next = m->orphans;
    op->prev = NULL;
    if (m->orphans) m->orphans->prev = op;
    m->orphans = op;
}

static void mpi_discard(comm_t *c, void *impl, int peer, uint64_t tag)
{
    (void)c;
    mpi_impl *m = impl;
    if (peer < 0 || peer >= m->size) return;
    mpi_key *k = key_get(m, peer, fold(m, tag));
    if (!k) return;
    if (!k->discard) {
        k->discard = 1;
        k->age = ++m->clock;
        if (++m->ndiscard > MPI_REMEMBER) { /* forget the oldest discard */
            mpi_key *old = NULL;
            for (int i = 0; i < m->nkeys; i++)
                if (m->keys[i].discard && (!old || m->keys[i].age < old->age)) old = &m->keys[i];
            old->discard = 0;
            m->ndiscard--;
        }
    }
    (void)mpi_progress(c, m);
}

/* ---- collectives ------------------------------------------------------------------------------ */

static comm_status mpi_group_new(comm_t *c, void *impl, const int *ranks, int n, void **gimpl)
{
    mpi_impl *m = impl;
    mpi_group *g = calloc(1, sizeof *g);
    if (!g) {
        comm_set_error(c, "comm_group_new: out of memory");
        return COMM_ERR_NOMEM;
    }
    g->comm = MPI_COMM_NULL;
    MPI_Group world = MPI_GROUP_NULL, sub = MPI_GROUP_NULL;
    const char *call = "MPI_Comm_group";
    int rc = MPI_Comm_group(m->comm, &world);
    if (rc == MPI_SUCCESS) {
        call = "MPI_Group_incl";
        rc = MPI_Group_incl(world, n, ranks, &sub);
    }
    if (rc == MPI_SUCCESS) {
        call = "MPI_Comm_create_group";
        rc = MPI_Comm_create_group(m->comm, sub, MPI_GROUP_TAG, &g->comm);
    }
    if (sub != MPI_GROUP_NULL) MPI_Group_free(&sub);
    if (world != MPI_GROUP_NULL) MPI_Group_free(&world);
    if (rc != MPI_SUCCESS || g->comm == MPI_COMM_NULL) {
        char e[MPI_MAX_ERROR_STRING] = "not a member";
        if (rc != MPI_SUCCESS) errstr(rc, e, sizeof e);
        comm_set_error(c, "comm_group_new: group of %d: %s: %s", n, call, e);
        if (g->comm != MPI_COMM_NULL) MPI_Comm_free(&g->comm);
        free(g);
        return COMM_ERR_SYS;
    }
    MPI_Comm_set_errhandler(g->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(g->comm, &g->idx);
    g->n = n;
    *gimpl = g;
    return COMM_OK;
}

static void mpi_group_free(comm_t *c, void *impl, void *gimpl)
{
    (void)c;
    (void)impl;
    mpi_group *g = gimpl;
    if (!g) return;
    if (g->comm != MPI_COMM_NULL) MPI_Comm_free(&g->comm);
    free(g->a);
    free(g->b);
    free(g);
}

static int room(void **p, size_t *cap, size_t need)
{
    if (need <= *cap) return 0;
    void *n = realloc(*p, need);
    if (!n) return -1;
    *p = n;
    *cap = need;
    return 0;
}

/* Poll req until done or deadline; on a timeout the group's scratch goes to the comm's
 * lingering list with req and the group is broken. */
static comm_status coll_wait(comm_t *c, mpi_impl *m, mpi_group *g, const char *call,
                             MPI_Request *req, double deadline, int timeout_ms)
{
    const double start = now_ms();
    for (long it = 0;; it++) {
        int flag = 0;
        int rc = MPI_Test(req, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            char e[MPI_MAX_ERROR_STRING];
            errstr(rc, e, sizeof e);
            comm_set_error(c, "%s: group of %d (index %d): %s", call, g->n, g->idx, e);
            g->broken = 1;
            return COMM_ERR_PEER;
        }
        if (flag) return COMM_OK;
        const double t = now_ms();
        if (deadline >= 0 && t >= deadline) {
            mpi_linger *l = calloc(1, sizeof *l);
            if (l) {
                l->req = *req;
                l->a = g->a;
                l->b = g->b;
                l->next = m->lingering;
                m->lingering = l;
                g->a = g->b = NULL;
                g->acap = g->bcap = 0;
            } /* else: left to the group, which then never frees them (MPI may write) */
            g->broken = 1;
            comm_set_error(c, "%s: group of %d (index %d): not finished within %d ms (the group "
                           "is broken: make a new one)", call, g->n, g->idx, timeout_ms);
            return COMM_ERR_TIMEOUT;
        }
        if (t - start < 0.2) {
            sched_yield();
        } else {
            struct timespec ts = {0, 20000L};
            nanosleep(&ts, NULL);
        }
    }
}

static comm_status coll_start(comm_t *c, mpi_group *g, const char *call, size_t count_limit,
                              size_t count)
{
    if (g->broken) {
        comm_set_error(c, "%s: the group is broken by an earlier timeout or error", call);
        return COMM_ERR_PEER;
    }
    if (count > count_limit) {
        comm_set_error(c, "%s: %zu elements: the mpi backend moves at most %zu per member", call,
                       count, count_limit);
        return COMM_ERR_INVAL;
    }
    return COMM_OK;
}

static double deadline_of(int timeout_ms) { return timeout_ms < 0 ? -1.0 : now_ms() + timeout_ms; }

static comm_status mpi_call_failed(comm_t *c, mpi_group *g, const char *call, const char *fn,
                                   int rc)
{
    char e[MPI_MAX_ERROR_STRING];
    errstr(rc, e, sizeof e);
    comm_set_error(c, "%s: group of %d (index %d): %s: %s", call, g->n, g->idx, fn, e);
    g->broken = 1;
    return COMM_ERR_PEER;
}

static comm_status mpi_allreduce(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                                 float *buf, size_t count, int timeout_ms)
{
    (void)ranks;
    (void)n;
    static const char call[] = "comm_allreduce_sum_f32";
    mpi_impl *m = impl;
    mpi_group *g = gimpl;
    const double deadline = deadline_of(timeout_ms);
    comm_status st = coll_start(c, g, call, (size_t)INT_MAX, count);
    if (st != COMM_OK) return st;
    const size_t bytes = count * sizeof(float);
    if (room(&g->a, &g->acap, bytes) != 0 ||
        (g->idx == 0 && room(&g->b, &g->bcap, bytes * (size_t)g->n) != 0)) {
        comm_set_error(c, "%s: out of memory (%zu bytes)", call, bytes * (size_t)g->n);
        return COMM_ERR_NOMEM;
    }
    memcpy(g->a, buf, bytes);
    MPI_Request req;
    int rc = MPI_Igather(g->a, (int)count, MPI_FLOAT, g->b, (int)count, MPI_FLOAT, 0, g->comm,
                         &req);
    if (rc != MPI_SUCCESS) return mpi_call_failed(c, g, call, "MPI_Igather", rc);
    st = coll_wait(c, m, g, call, &req, deadline, timeout_ms);
    if (st != COMM_OK) return st;
    if (g->idx == 0) {
        float *acc = g->a;
        const float *parts = g->b;
        memcpy(acc, parts, bytes);
        for (int i = 1; i < g->n; i++) {
            const float *p = parts + (size_t)i * count;
            for (size_t j = 0; j < count; j++) acc[j] += p[j];
        }
    }
    rc = MPI_Ibcast(g->a, (int)count, MPI_FLOAT, 0, g->comm, &req);
    if (rc != MPI_SUCCESS) return mpi_call_failed(c, g, call, "MPI_Ibcast", rc);
    st = coll_wait(c, m, g, call, &req, deadline, timeout_ms);
    if (st == COMM_OK) memcpy(buf, g->a, bytes);
    return st;
}

static comm_status mpi_broadcast(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                                 int root, void *buf, size_t len, int timeout_ms)
{
    (void)ranks;
    (void)n;
    static const char call[] = "comm_broadcast";
    mpi_impl *m = impl;
    mpi_group *g = gimpl;
    comm_status st = coll_start(c, g, call, (size_t)INT_MAX, len);
    if (st != COMM_OK) return st;
    if (room(&g->a, &g->acap, len ? len : 1) != 0) {
        comm_set_error(c, "%s: out of memory (%zu bytes)", call, len);
        return COMM_ERR_NOMEM;
    }
    if (g->idx == root && len) memcpy(g->a, buf, len);
    MPI_Request req;
    int rc = MPI_Ibcast(g->a, (int)len, MPI_BYTE, root, g->comm, &req);
    if (rc != MPI_SUCCESS) return mpi_call_failed(c, g, call, "MPI_Ibcast", rc);
    st = coll_wait(c, m, g, call, &req, deadline_of(timeout_ms), timeout_ms);
    if (st == COMM_OK && g->idx != root && len) memcpy(buf, g->a, len);
    return st;
}

static comm_status mpi_allgather(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                                 const void *send, size_t len, void *recv, int timeout_ms)
{
    (void)ranks;
    (void)n;
    static const char call[] = "comm_allgather";
    mpi_impl *m = impl;
    mpi_group *g = gimpl;
    comm_status st = coll_start(c, g, call, (size_t)INT_MAX, len);
    if (st != COMM_OK) return st;
    if (room(&g->a, &g->acap, len) != 0 || room(&g->b, &g->bcap, len * (size_t)g->n) != 0) {
        comm_set_error(c, "%s: out of memory (%zu bytes)", call, len * (size_t)g->n);
        return COMM_ERR_NOMEM;
    }
    memcpy(g->a, send, len);
    MPI_Request req;
    int rc = MPI_Iallgather(g->a, (int)len, MPI_BYTE, g->b, (int)len, MPI_BYTE, g->comm, &req);
    if (rc != MPI_SUCCESS) return mpi_call_failed(c, g, call, "MPI_Iallgather", rc);
    st = coll_wait(c, m, g, call, &req, deadline_of(timeout_ms), timeout_ms);
    if (st == COMM_OK) memcpy(recv, g->b, len * (size_t)g->n);
    return st;
}

/* ---- the table -------------------------------------------------------------------------------- */

static void *mpi_zsock(void *impl)
{
    (void)impl;
    return NULL;
}

static void mpi_destroy(void *impl)
{
    mpi_impl *m = impl;
    if (!m) return;
    while (m->def_head) {
        mpi_op *op = m->def_head;
        list_del(&m->def_head, &m->def_tail, op);
        free(op);
    }
    /* orphans still running: MPI finishes them on its own; the handles go */
    while (m->orphans) {
        mpi_op *op = m->orphans;
        list_del(&m->orphans, NULL, op);
        int flag = 0;
        if (MPI_Test(&op->req, &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && !flag)
            MPI_Request_free(&op->req);
        free(op);
    }
    while (m->lingering) {
        mpi_linger *l = m->lingering;
        m->lingering = l->next;
        int flag = 0;
        if (MPI_Test(&l->req, &flag, MPI_STATUS_IGNORE) == MPI_SUCCESS && flag) {
            free(l->a);
            free(l->b);
        } /* else MPI may still write them: left allocated */
        free(l);
    }
    if (m->comm != MPI_COMM_NULL) MPI_Comm_free(&m->comm);
    free(m->keys);
    free(m->scratch);
    free(m);
}

static const comm_ops mpi_ops = {
    .backend = COMM_BACKEND_MPI,
    .rank = mpi_rank_of,
    .size = mpi_size_of,
    .isend = mpi_isend,
    .irecv = mpi_irecv,
    .test = mpi_test,
    .cancel = mpi_cancel,
    .op_free = mpi_cancel,
    .discard = mpi_discard,
    .progress = mpi_progress,
    .zsock = mpi_zsock,
    .group_new = mpi_group_new,
    .group_free = mpi_group_free,
    .allreduce_sum_f32 = mpi_allreduce,
    .broadcast = mpi_broadcast,
    .allgather = mpi_allgather,
    .destroy = mpi_destroy,
};

/* ---- construction ------------------------------------------------------------------------------ */

int comm_mpi_launched(void)
{
    static const char *const vars[] = {"OMPI_COMM_WORLD_RANK", "PMIX_RANK", "PMI_RANK"};
    for (size_t i = 0; i < sizeof vars / sizeof *vars; i++) {
        const char *v = getenv(vars[i]);
        if (v && *v) return 1;
    }
    return 0;
}

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

comm_status comm_mpi_new(comm_t **out, char *err, size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (!out) {
        set_err(err, errlen, "comm_mpi_new: out is NULL");
        return COMM_ERR_INVAL;
    }
    *out = NULL;
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (fin) {
        set_err(err, errlen, "comm_mpi_new: MPI was finalized already (comm_mpi_finalize)");
        return COMM_ERR_SYS;
    }
    if (!inited) {
        int provided = MPI_THREAD_SINGLE;
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_FUNNELED, &provided);
        if (rc != MPI_SUCCESS) {
            char e[MPI_MAX_ERROR_STRING];
            errstr(rc, e, sizeof e);
            set_err(err, errlen, "comm_mpi_new: MPI_Init_thread: %s", e);
            return COMM_ERR_SYS;
        }
        if (provided < MPI_THREAD_FUNNELED) {
            set_err(err, errlen, "comm_mpi_new: MPI_Init_thread gave thread level %d, not "
                    "MPI_THREAD_FUNNELED", provided);
            return COMM_ERR_SYS;
        }
    }
    mpi_impl *m = calloc(1, sizeof *m);
    if (!m) {
        set_err(err, errlen, "comm_mpi_new: out of memory");
        return COMM_ERR_NOMEM;
    }
    m->comm = MPI_COMM_NULL;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &m->comm);
    if (rc != MPI_SUCCESS) {
        char e[MPI_MAX_ERROR_STRING];
        errstr(rc, e, sizeof e);
        set_err(err, errlen, "comm_mpi_new: MPI_Comm_dup(MPI_COMM_WORLD): %s", e);
        m->comm = MPI_COMM_NULL;
        mpi_destroy(m);
        return COMM_ERR_SYS;
    }
    MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(m->comm, &m->rank);
    MPI_Comm_size(m->comm, &m->size);
    int *ub = NULL, flag = 0;
    MPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &ub, &flag);
    long long lim = flag && ub ? *ub : 32767;
    long long mask = 1;
    while (mask * 2 + 1 <= lim) mask = mask * 2 + 1;
    m->mask = (int)mask;
    comm_status st = comm_wrap(&mpi_ops, m, out);
    if (st != COMM_OK) set_err(err, errlen, "comm_mpi_new: %s", comm_strerror(st));
    return st;
}

void comm_mpi_finalize(void)
{
    int inited = 0, fin = 0;
    MPI_Initialized(&inited);
    MPI_Finalized(&fin);
    if (inited && !fin) MPI_Finalize();
}
