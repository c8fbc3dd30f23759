/* tests/test_comm_nccl.c: the NCCL backend's host logic (comm/comm_nccl.c) on the CPU, with a
 * fake NCCL and CUDA runtime behind its comm_nccl_api table.
 *
 * The fake ("fabric") models what the host logic relies on: streams run their items in order
 * (a wait on an event, a compute kernel that the test releases and that writes a payload
 * when it runs, a group of sends and receives, a collective); the k-th send from rank a to b
 * of a communicator matches the k-th receive at b from a, and the bytes move when both groups
 * are at the head of their streams (a length mismatch is counted); a communicator is built
 * when all its ranks joined with the same id; ncclGroupEnd may answer "in progress" (and
 * calling NCCL again before comm_status says OK is counted as a violation); asynchronous
 * errors and failing calls are injected per rank. Host memory stands in for device memory.
 *
 * Covered: unique-id hex round trip; bootstrap relayed by duetd (comm_id, comm_init) and under
 * mpirun (broadcast through a comm_t); build timeouts and failures; sends ordered after the
 * compute that writes them (events, not host waits); batching and splitting of groups;
 * strict seq order per channel (held, skipped, released transfers), per-direction order;
 * group ends in progress; asynchronous errors from progress and from the watchdog thread;
 * failing calls; abort and rebuild (ops failed clearly, seq restarting at 0); cancel; the
 * comm.h interface over the backend; TP groups and their collectives (blocking and async),
 * their failures and timeouts; resources released at destroy.
 */
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "comm/comm.h"
#include "comm/comm_nccl.h"

/* ================================ the fake NCCL / CUDA ===================================== */

#define MAXR 8   /* ranks of a clique */
#define MAXCL 32 /* cliques of a fabric */
#define MAXTOK 64

typedef struct fab fab;
typedef struct fctx fctx;
typedef struct fcomm fcomm;
typedef struct fstream fstream;
typedef struct fitem fitem;

enum { IT_WAIT, IT_COMPUTE, IT_GROUP, IT_COLL };
enum { P_SEND, P_RECV };
enum { C_ALLREDUCE, C_BROADCAST, C_ALLGATHER };

typedef struct {
    int kind;
    fcomm *c;
    int peer;
    void *buf;
    size_t len;
    long idx;
    int done;
} fp2p;

struct fitem {
    int type;
    fitem *next;
    /* wait */
    fstream *ws;
    long wpos;
    /* compute */
    int token;
    void *dst;
    const void *src;
    size_t n;
    /* group */
    fp2p *ops;
    int n_ops;
    /* collective */
    int ckind, cdone, root;
    fcomm *cc;
    long cidx;
    void *buf;
    const void *sendb;
    size_t len;
};

struct fstream {
    fitem *head, *tail;
    long n_enq, n_done;
    int freed;
    fstream *next;
};

typedef struct {
    uint8_t id[COMM_NCCL_ID_BYTES];
    int nranks, joined;
    fcomm *m[MAXR];
    long sidx[MAXR][MAXR], ridx[MAXR][MAXR], cidx[MAXR];
} fclique;

struct fcomm {
    fclique *cl;
    int rank;
    int aborted, destroyed;
    int pending; /* comm_status answers PENDING this many more times */
    int async;   /* comm_status's error */
    fctx *owner;
    int index;   /* 0: the first comm this rank built, 1: the next... */
    fcomm *next;
};

struct fab {
    pthread_mutex_t mu;
    fclique cl[MAXCL];
    int n_cl;
    fstream *streams;
    fcomm *comms;
    int released[MAXTOK];
    int mismatches;
    int violations;
    unsigned idgen;
};

typedef struct {
    fstream *s;
    long pos;
} fevent;

struct fctx {
    fab *f;
    char err[256];
    fstream *def;
    int n_comms;
    /* the open group */
    int in_group;
    fp2p pend[512];
    int n_pend;
    void *pend_stream;
    /* counters */
    int n_group_start, n_group_end, n_send, n_recv, n_abort, n_destroy, n_init, n_waits;
    int n_unique, n_coll;
    int ev_live, st_live, dev_live;
    char log[8192];
    /* knobs */
    int ge_pending;       /* the next group end answers PENDING, then comm_status PENDING so often */
    int fail_send;        /* the next send answers this (ERR/REMOTE) */
    int fail_init;        /* comm_init answers this */
    int fail_group_end;   /* the next group end answers this */
    int init_extra_polls; /* comm_status PENDING this often after a build completes */
};

static void lg(fctx *x, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void lg(fctx *x, const char *fmt, ...)
{
    size_t l = strlen(x->log);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(x->log + l, sizeof x->log - l, fmt, ap);
    va_end(ap);
}

static fab *fab_new(void)
{
    fab *f = calloc(1, sizeof *f);
    pthread_mutex_init(&f->mu, NULL);
    return f;
}

static void free_items(fstream *s)
{
    while (s->head) {
        fitem *it = s->head;
        s->head = it->next;
        free(it->ops);
        free(it);
    }
    s->tail = NULL;
}

static void fab_free(fab *f)
{
    while (f->streams) {
        fstream *s = f->streams;
        f->streams = s->next;
        free_items(s);
        free(s);
    }
    while (f->comms) {
        fcomm *c = f->comms;
        f->comms = c->next;
        free(c);
    }
    pthread_mutex_destroy(&f->mu);
    free(f);
}

static fstream *stream_alloc(fab *f)
{
    fstream *s = calloc(1, sizeof *s);
    s->next = f->streams;
    f->streams = s;
    return s;
}

static void push(fstream *s, fitem *it)
{
    if (s->tail) s->tail->next = it;
    else s->head = it;
    s->tail = it;
    s->n_enq++;
}

static fitem *head_coll(fab *f, fcomm *m, long idx)
{
    for (fstream *s = f->streams; s; s = s->next)
        if (!s->freed && s->head && s->head->type == IT_COLL && s->head->cc == m &&
            s->head->cidx == idx)
            return s->head;
    return NULL;
}

static fp2p *head_partner(fab *f, const fp2p *o)
{
    for (fstream *s = f->streams; s; s = s->next) {
        if (s->freed || !s->head || s->head->type != IT_GROUP) continue;
        fitem *it = s->head;
        for (int i = 0; i < it->n_ops; i++) {
            fp2p *q = &it->ops[i];
            if (q->done || q->kind == o->kind || q->c->cl != o->c->cl) continue;
            if (q->c->rank == o->peer && q->peer == o->c->rank && q->idx == o->idx) return q;
        }
    }
    return NULL;
}

static int item_try(fab *f, fitem *it)
{
    switch (it->type) {
    case IT_WAIT:
        return !it->ws || it->ws->n_done >= it->wpos;
    case IT_COMPUTE:
        if (!f->released[it->token]) return 0;
        if (it->dst) memcpy(it->dst, it->src, it->n);
        return 1;
    case IT_GROUP: {
        int all = 1;
        for (int i = 0; i < it->n_ops; i++) {
            fp2p *o = &it->ops[i];
            if (o->done) continue;
            if (o->c->aborted) {
                o->done = 1;
                continue;
            }
            fp2p *q = head_partner(f, o);
            if (!q) {
                all = 0;
                continue;
            }
            fp2p *s = o->kind == P_SEND ? o : q, *r = o->kind == P_SEND ? q : o;
            if (s->len != r->len) f->mismatches++;
            memcpy(r->buf, s->buf, s->len < r->len ? s->len : r->len);
            o->done = q->done = 1;
        }
        return all;
    }
    case IT_COLL: {
        if (it->cdone) return 1;
        if (it->cc->aborted) return 1;
        fclique *cl = it->cc->cl;
        fitem *mine[MAXR];
        for (int r = 0; r < cl->nranks; r++) {
            mine[r] = cl->m[r] ? head_coll(f, cl->m[r], it->cidx) : NULL;
            if (!mine[r]) return 0;
        }
        size_t len = it->len;
        if (it->ckind == C_ALLREDUCE) {
            float *sum = calloc(len, sizeof *sum);
            for (int r = 0; r < cl->nranks; r++)
                for (size_t i = 0; i < len; i++) sum[i] += ((float *)mine[r]->buf)[i];
            for (int r = 0; r < cl->nranks; r++) memcpy(mine[r]->buf, sum, len * sizeof *sum);
            free(sum);
        } else if (it->ckind == C_BROADCAST) {
            void *src = mine[it->root]->buf;
            for (int r = 0; r < cl->nranks; r++)
                if (r != it->root) memcpy(mine[r]->buf, src, len);
        } else {
            for (int r = 0; r < cl->nranks; r++)
                for (int q = 0; q < cl->nranks; q++)
                    memcpy((char *)mine[r]->buf + (size_t)q * len, mine[q]->sendb, len);
        }
        for (int r = 0; r < cl->nranks; r++) mine[r]->cdone = 1;
        return 1;
    }
    }
    return 0;
}

static void fab_run(fab *f)
{
    for (int changed = 1; changed;) {
        changed = 0;
        for (fstream *s = f->streams; s; s = s->next) {
            while (!s->freed && s->head && item_try(f, s->head)) {
                fitem *it = s->head;
                s->head = it->next;
                if (!s->head) s->tail = NULL;
                s->n_done++;
                free(it->ops);
                free(it);
                changed = 1;
            }
        }
    }
}

/* ---- the table ---- */

#define LOCK(x) pthread_mutex_lock(&(x)->f->mu)
#define UNLOCK(x) pthread_mutex_unlock(&(x)->f->mu)

static void check_quiet(fctx *x)
{
    for (fcomm *c = x->f->comms; c; c = c->next)
        if (c->owner == x && c->pending > 0 && !c->aborted && c->cl->joined == c->cl->nranks)
            x->f->violations++;
}

static fstream *str(fctx *x, void *s)
{
    return s ? (fstream *)s : x->def;
}

static const char *f_last_error(void *ctx)
{
    return ((fctx *)ctx)->err;
}

static int f_get_unique_id(void *ctx, uint8_t id[COMM_NCCL_ID_BYTES])
{
    fctx *x = ctx;
    LOCK(x);
    unsigned g = ++x->f->idgen;
    for (int i = 0; i < COMM_NCCL_ID_BYTES; i++) id[i] = (uint8_t)(g * 37u + (unsigned)i * 11u);
    x->n_unique++;
    UNLOCK(x);
    return NCCL_API_OK;
}

static int f_comm_init(void *ctx, int nranks, const uint8_t id[COMM_NCCL_ID_BYTES], int rank,
                       void **comm)
{
    fctx *x = ctx;
    *comm = NULL;
    LOCK(x);
    x->n_init++;
    if (x->fail_init) {
        snprintf(x->err, sizeof x->err, "fake ncclCommInitRankConfig: injected failure");
        UNLOCK(x);
        return x->fail_init;
    }
    fab *f = x->f;
    fclique *cl = NULL;
    for (int i = 0; i < f->n_cl; i++)
        if (!memcmp(f->cl[i].id, id, COMM_NCCL_ID_BYTES)) cl = &f->cl[i];
    if (!cl) {
        assert_true(f->n_cl < MAXCL);
        cl = &f->cl[f->n_cl++];
        memcpy(cl->id, id, COMM_NCCL_ID_BYTES);
        cl->nranks = nranks;
    }
    if (cl->nranks != nranks || rank < 0 || rank >= nranks || cl->m[rank]) {
        snprintf(x->err, sizeof x->err, "fake init: bad rank %d of %d", rank, nranks);
        UNLOCK(x);
        return NCCL_API_ERR;
    }
    fcomm *c = calloc(1, sizeof *c);
    c->cl = cl;
    c->rank = rank;
    c->owner = x;
    c->index = x->n_comms++;
    c->pending = x->init_extra_polls;
    c->next = f->comms;
    f->comms = c;
    cl->m[rank] = c;
    cl->joined++;
    *comm = c;
    UNLOCK(x);
    return NCCL_API_PENDING;
}

static int f_comm_status(void *ctx, void *comm)
{
    fctx *x = ctx;
    fcomm *c = comm;
    LOCK(x);
    fab_run(x->f);
    int rc = NCCL_API_OK;
    if (c->aborted || c->destroyed) {
        snprintf(x->err, sizeof x->err, "fake: comm_status on an aborted communicator");
        x->f->violations++;
        rc = NCCL_API_ERR;
    } else if (c->async) {
        snprintf(x->err, sizeof x->err, "fake: peer rank gone (injected)");
        rc = c->async;
    } else if (c->cl->joined < c->cl->nranks) {
        rc = NCCL_API_PENDING;
    } else if (c->pending > 0) {
        c->pending--;
        rc = NCCL_API_PENDING;
    }
    UNLOCK(x);
    return rc;
}

static void f_comm_abort(void *ctx, void *comm)
{
    fctx *x = ctx;
    fcomm *c = comm;
    LOCK(x);
    if (c->aborted || c->destroyed) x->f->violations++;
    c->aborted = 1;
    x->n_abort++;
    lg(x, "A");
    fab_run(x->f);
    UNLOCK(x);
}

static void f_comm_destroy(void *ctx, void *comm)
{
    fctx *x = ctx;
    fcomm *c = comm;
    LOCK(x);
    if (c->aborted || c->destroyed) x->f->violations++;
    c->destroyed = 1;
    c->aborted = 1; /* its items end */
    x->n_destroy++;
    UNLOCK(x);
}

static int f_group_start(void *ctx)
{
    fctx *x = ctx;
    LOCK(x);
    check_quiet(x);
    x->in_group = 1;
    x->n_pend = 0;
    x->n_group_start++;
    lg(x, "[");
    UNLOCK(x);
    return NCCL_API_OK;
}

static int f_p2p(fctx *x, int kind, void *comm, void *buf, size_t len, int peer, void *stream)
{
    LOCK(x);
    check_quiet(x);
    if (kind == P_SEND && x->fail_send) {
        int rc = x->fail_send;
        x->fail_send = 0;
        snprintf(x->err, sizeof x->err, "fake ncclSend: injected failure");
        UNLOCK(x);
        return rc;
    }
    assert_true(x->in_group);
    assert_true(x->n_pend < 512);
    x->pend[x->n_pend++] = (fp2p){.kind = kind, .c = comm, .peer = peer, .buf = buf, .len = len};
    x->pend_stream = stream;
    if (kind == P_SEND) x->n_send++;
    else x->n_recv++;
    lg(x, "%s%s%d:%zu", x->log[strlen(x->log) - 1] == '[' ? "" : " ", kind == P_SEND ? "s" : "r",
       peer, len);
    UNLOCK(x);
    return NCCL_API_OK;
}

static int f_send(void *ctx, void *comm, const void *buf, size_t len, int peer, void *stream)
{
    return f_p2p(ctx, P_SEND, comm, (void *)buf, len, peer, stream);
}

static int f_recv(void *ctx, void *comm, void *buf, size_t len, int peer, void *stream)
{
    return f_p2p(ctx, P_RECV, comm, buf, len, peer, stream);
}

static int f_group_end(void *ctx)
{
    fctx *x = ctx;
    LOCK(x);
    x->in_group = 0;
    x->n_group_end++;
    lg(x, "]");
    if (x->fail_group_end) {
        int rc = x->fail_group_end;
        x->fail_group_end = 0;
        snprintf(x->err, sizeof x->err, "fake ncclGroupEnd: injected failure");
        UNLOCK(x);
        return rc;
    }
    if (x->n_pend > 0) {
        fitem *it = calloc(1, sizeof *it);
        it->type = IT_GROUP;
        it->ops = malloc((size_t)x->n_pend * sizeof *it->ops);
        it->n_ops = x->n_pend;
        for (int i = 0; i < x->n_pend; i++) {
            fp2p o = x->pend[i];
            fclique *cl = o.c->cl;
            if (o.kind == P_SEND) o.idx = cl->sidx[o.c->rank][o.peer]++;
            else o.idx = cl->ridx[o.peer][o.c->rank]++;
            it->ops[i] = o;
        }
        push(str(x, x->pend_stream), it);
    }
    int rc = NCCL_API_OK;
    if (x->ge_pending > 0 && x->n_pend > 0) {
        for (int i = 0; i < x->n_pend; i++) x->pend[i].c->pending = x->ge_pending;
        x->ge_pending = 0;
        rc = NCCL_API_PENDING;
    }
    x->n_pend = 0;
    fab_run(x->f);
    UNLOCK(x);
    return rc;
}

static int f_coll(fctx *x, int kind, void *comm, void *buf, const void *send, size_t len, int root,
                  void *stream)
{
    LOCK(x);
    check_quiet(x);
    fcomm *c = comm;
    fitem *it = calloc(1, sizeof *it);
    it->type = IT_COLL;
    it->ckind = kind;
    it->cc = c;
    it->cidx = c->cl->cidx[c->rank]++;
    it->buf = buf;
    it->sendb = send;
    it->len = len;
    it->root = root;
    push(str(x, stream), it);
    x->n_coll++;
    fab_run(x->f);
    UNLOCK(x);
    return NCCL_API_OK;
}

static int f_allreduce(void *ctx, void *comm, float *buf, size_t count, void *stream)
{
    return f_coll(ctx, C_ALLREDUCE, comm, buf, NULL, count, 0, stream);
}

static int f_broadcast(void *ctx, void *comm, void *buf, size_t len, int root, void *stream)
{
    return f_coll(ctx, C_BROADCAST, comm, buf, NULL, len, root, stream);
}

static int f_allgather(void *ctx, void *comm, const void *send, void *recv, size_t len, void *stream)
{
    return f_coll(ctx, C_ALLGATHER, comm, recv, send, len, 0, stream);
}

static int f_stream_new(void *ctx, void **stream)
{
    fctx *x = ctx;
    LOCK(x);
    *stream = stream_alloc(x->f);
    x->st_live++;
    UNLOCK(x);
    return NCCL_API_OK;
}

static void f_stream_free(void *ctx, void *stream)
{
    fctx *x = ctx;
    LOCK(x);
    fstream *s = stream;
    s->freed = 1;
    free_items(s);
    x->st_live--;
    UNLOCK(x);
}

static int f_event_new(void *ctx, void **event)
{
    fctx *x = ctx;
    LOCK(x);
    *event = calloc(1, sizeof(fevent));
    x->ev_live++;
    UNLOCK(x);
    return NCCL_API_OK;
}

static void f_event_free(void *ctx, void *event)
{
    fctx *x = ctx;
    LOCK(x);
    free(event);
    x->ev_live--;
    UNLOCK(x);
}

static int f_event_record(void *ctx, void *event, void *stream)
{
    fctx *x = ctx;
    LOCK(x);
    fevent *e = event;
    e->s = str(x, stream);
    e->pos = e->s->n_enq;
    UNLOCK(x);
    return NCCL_API_OK;
}

static int f_event_query(void *ctx, void *event)
{
    fctx *x = ctx;
    LOCK(x);
    fab_run(x->f);
    fevent *e = event;
    int rc = !e->s || e->s->n_done >= e->pos ? NCCL_API_OK : NCCL_API_PENDING;
    UNLOCK(x);
    return rc;
}

static int f_stream_wait_event(void *ctx, void *stream, void *event)
{
    fctx *x = ctx;
    LOCK(x);
    fevent *e = event;
    fitem *it = calloc(1, sizeof *it);
    it->type = IT_WAIT;
    it->ws = e->s;
    it->wpos = e->pos;
    push(str(x, stream), it);
    x->n_waits++;
    UNLOCK(x);
    return NCCL_API_OK;
}

static int f_dev_alloc(void *ctx, size_t len, void **ptr)
{
    fctx *x = ctx;
    *ptr = calloc(1, len ? len : 1);
    LOCK(x);
    x->dev_live++;
    UNLOCK(x);
    return NCCL_API_OK;
}

static void f_dev_free(void *ctx, void *ptr)
{
    fctx *x = ctx;
    free(ptr);
    LOCK(x);
    x->dev_live--;
    UNLOCK(x);
}

static int f_copy(void *ctx, void *dst, const void *src, size_t len)
{
    (void)ctx;
    memcpy(dst, src, len);
    return NCCL_API_OK;
}

static comm_nccl_api fake_api(fctx *x)
{
    return (comm_nccl_api){
        .ctx = x,
        .last_error = f_last_error,
        .get_unique_id = f_get_unique_id,
        .comm_init = f_comm_init,
        .comm_status = f_comm_status,
        .comm_abort = f_comm_abort,
        .comm_destroy = f_comm_destroy,
        .group_start = f_group_start,
        .group_end = f_group_end,
        .send = f_send,
        .recv = f_recv,
        .allreduce_sum_f32 = f_allreduce,
        .broadcast = f_broadcast,
        .allgather = f_allgather,
        .stream_new = f_stream_new,
        .stream_free = f_stream_free,
        .event_new = f_event_new,
        .event_free = f_event_free,
        .event_record = f_event_record,
        .event_query = f_event_query,
        .stream_wait_event = f_stream_wait_event,
        .dev_alloc = f_dev_alloc,
        .dev_free = f_dev_free,
        .copy_to_dev = f_copy,
        .copy_to_host = f_copy,
    };
}

/* A compute kernel on stream s: when the test releases token, it writes src[n] into dst. */
static void fake_compute(fctx *x, void *s, int token, void *dst, const void *src, size_t n)
{
    LOCK(x);
    fitem *it = calloc(1, sizeof *it);
    it->type = IT_COMPUTE;
    it->token = token;
    it->dst = dst;
    it->src = src;
    it->n = n;
    push(str(x, s), it);
    UNLOCK(x);
}

static void fake_release(fab *f, int token)
{
    pthread_mutex_lock(&f->mu);
    f->released[token] = 1;
    fab_run(f);
    pthread_mutex_unlock(&f->mu);
}

/* Asynchronous error rc on x's index-th communicator (0: the first it built). */
static void fake_async(fctx *x, int index, int rc)
{
    LOCK(x);
    fcomm *last = NULL;
    for (fcomm *c = x->f->comms; c; c = c->next)
        if (c->owner == x && c->index == index && !c->aborted) last = c;
    assert_non_null(last);
    last->async = rc;
    UNLOCK(x);
}

/* ================================ test fixtures ============================================ */

typedef struct {
    fctx x;
    comm_t *c;
    comm_nccl_t *n;
} rk;

typedef struct {
    fab *f;
    rk r[MAXR];
    int k;
} world;

static void rank_new(world *w, int i, const comm_nccl_opts *o)
{
    rk *r = &w->r[i];
    memset(r, 0, sizeof *r);
    r->x.f = w->f;
    pthread_mutex_lock(&w->f->mu);
    r->x.def = stream_alloc(w->f);
    pthread_mutex_unlock(&w->f->mu);
    comm_nccl_api api = fake_api(&r->x);
    char err[256] = "";
    comm_status st = comm_nccl_new(&api, o, &r->c, &r->n, err, sizeof err);
    if (st != COMM_OK) fail_msg("comm_nccl_new: %s", err);
    assert_non_null(r->n);
    assert_ptr_equal(comm_nccl_comm(r->n), r->c);
    assert_ptr_equal(comm_nccl_of(r->c), r->n);
}

static int all_up(world *w)
{
    for (int i = 0; i < w->k; i++) {
        comm_progress(w->r[i].c);
        if (comm_nccl_get_state(w->r[i].n) != COMM_NCCL_UP) return 0;
    }
    return 1;
}

/* k ranks, not built. */
static world *world_new(int k, const comm_nccl_opts *o)
{
    world *w = calloc(1, sizeof *w);
    w->f = fab_new();
    w->k = k;
    for (int i = 0; i < k; i++) rank_new(w, i, o);
    return w;
}

/* The duetd way: rank 0's id, comm_init on every rank, progress until all are up. */
static void world_build(world *w)
{
    char hex[COMM_NCCL_ID_HEX + 1];
    assert_int_equal(comm_nccl_make_id(w->r[0].n, hex), COMM_OK);
    for (int i = 0; i < w->k; i++) assert_int_equal(comm_nccl_init(w->r[i].n, w->k, i, hex), COMM_OK);
    for (int it = 0; it < 100 && !all_up(w); it++) {
    }
    for (int i = 0; i < w->k; i++) assert_int_equal(comm_nccl_get_state(w->r[i].n), COMM_NCCL_UP);
}

static world *world_up(int k, const comm_nccl_opts *o)
{
    world *w = world_new(k, o);
    world_build(w);
    return w;
}

static void world_free(world *w)
{
    for (int i = 0; i < w->k; i++) {
        comm_destroy(&w->r[i].c);
        assert_null(w->r[i].c);
        comm_destroy(&w->r[i].c); /* safe twice */
        assert_int_equal(w->r[i].x.ev_live, 0);
        assert_int_equal(w->r[i].x.st_live, 0);
        assert_int_equal(w->r[i].x.dev_live, 0);
    }
    assert_int_equal(w->f->mismatches, 0);
    assert_int_equal(w->f->violations, 0);
    fab_free(w->f);
    free(w);
}

/* Progress every rank until every op of ops[k] (owned by ranks who[k]) is done or failed
 * (bounded). Returns how many are not finished. */
static int drive(world *w, comm_nccl_op **ops, const int *who, int k)
{
    int left = k;
    for (int it = 0; it < 200 && left > 0; it++) {
        left = 0;
        for (int i = 0; i < w->k; i++) comm_nccl_progress(w->r[i].n);
        for (int j = 0; j < k; j++) {
            if (!ops[j]) continue;
            int done = 0;
            comm_nccl_op_test(w->r[who[j]].n, ops[j], &done, NULL);
            left += !done;
        }
    }
    return left;
}

static void fill(unsigned char *p, size_t n, int seed)
{
    for (size_t i = 0; i < n; i++) p[i] = (unsigned char)(seed * 31 + (int)i * 7 + 1);
}

static void op_ok(rk *r, comm_nccl_op *op, size_t want_len)
{
    int done = 0;
    size_t len = 0;
    comm_status st = comm_nccl_op_test(r->n, op, &done, &len);
    if (st != COMM_OK) fail_msg("op failed: %s", comm_last_error(r->c));
    assert_int_equal(done, 1);
    assert_int_equal(len, want_len);
}

/* op ended with COMM_ERR_PEER and a message containing want. */
static void op_peer_err(rk *r, comm_nccl_op *op, const char *want)
{
    int done = 0;
    comm_status st = comm_nccl_op_test(r->n, op, &done, NULL);
    assert_int_equal(done, 1);
    assert_int_equal(st, COMM_ERR_PEER);
    const char *m = comm_last_error(r->c);
    if (!strstr(m, want)) fail_msg("message '%s' lacks '%s'", m, want);
}

/* ================================ the tests ================================================ */

static void test_id_hex(void **state)
{
    (void)state;
    uint8_t id[COMM_NCCL_ID_BYTES], back[COMM_NCCL_ID_BYTES];
    for (int i = 0; i < COMM_NCCL_ID_BYTES; i++) id[i] = (uint8_t)(i * 53 + 7);
    id[0] = 0x00;
    id[1] = 0xff;
    char hex[COMM_NCCL_ID_HEX + 1];
    comm_nccl_id_to_hex(id, hex);
    assert_int_equal(strlen(hex), COMM_NCCL_ID_HEX);
    assert_memory_equal(hex, "00ff", 4);
    for (int i = 0; i < COMM_NCCL_ID_HEX; i++)
        assert_true((hex[i] >= '0' && hex[i] <= '9') || (hex[i] >= 'a' && hex[i] <= 'f'));
    char err[128] = "";
    assert_int_equal(comm_nccl_id_from_hex(hex, back, err, sizeof err), COMM_OK);
    assert_memory_equal(id, back, sizeof id);
    /* upper case is accepted */
    char up[COMM_NCCL_ID_HEX + 1];
    for (int i = 0; i <= COMM_NCCL_ID_HEX; i++) up[i] = (char)(hex[i] >= 'a' ? hex[i] - 32 : hex[i]);
    memset(back, 0, sizeof back);
    assert_int_equal(comm_nccl_id_from_hex(up, back, err, sizeof err), COMM_OK);
    assert_memory_equal(id, back, sizeof id);
    /* errors name what is wrong and where */
    assert_int_equal(comm_nccl_id_from_hex("abcd", back, err, sizeof err), COMM_ERR_INVAL);
    assert_non_null(strstr(err, "4 hex digits, expected 256"));
    hex[77] = 'g';
    assert_int_equal(comm_nccl_id_from_hex(hex, back, err, sizeof err), COMM_ERR_INVAL);
    assert_non_null(strstr(err, "'g' at offset 77"));
    assert_int_equal(comm_nccl_id_from_hex(NULL, back, err, sizeof err), COMM_ERR_INVAL);
    /* the protocol's example id parses */
    const char *ex = "0200a1b2c0a80001000000000000000000000000000000000000000000000000000000000000"
                     "0000000000000000000000000000000000000000000000000000000000000000000000000000"
                     "0000000000000000000000000000000000000000000000000000000000000000000000000000"
                     "0000000000000000000000000000";
    assert_int_equal(strlen(ex), COMM_NCCL_ID_HEX);
    assert_int_equal(comm_nccl_id_from_hex(ex, back, err, sizeof err), COMM_OK);
    assert_int_equal(back[0], 0x02);
    assert_int_equal(back[2], 0xa1);
}

/* duetd's relay: rank 0 makes the id (comm_id), every rank gets comm_init with it. */
static void test_bootstrap_duetd(void **state)
{
    (void)state;
    world *w = world_new(3, NULL);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(comm_nccl_get_state(w->r[i].n), COMM_NCCL_NONE);
        assert_int_equal(comm_rank(w->r[i].c), -1);
        assert_int_equal(comm_size(w->r[i].c), 0);
        assert_int_equal(comm_backend_of(w->r[i].c), COMM_BACKEND_NCCL);
    }
    /* before comm_init: operations are refused clearly */
    unsigned char b[8];
    comm_nccl_op *op = NULL;
    assert_int_equal(comm_nccl_isend(w->r[0].n, 1, 1, b, 8, NULL, &op), COMM_ERR_PEER);
    assert_null(op);
    assert_non_null(strstr(comm_last_error(w->r[0].c), "no communicator yet"));

    char hex[COMM_NCCL_ID_HEX + 1];
    assert_int_equal(comm_nccl_make_id(w->r[0].n, hex), COMM_OK);
    assert_int_equal(w->r[0].x.n_unique, 1);
    /* a bad comm_init changes nothing */
    assert_int_equal(comm_nccl_init(w->r[1].n, 3, 1, "00ff"), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(w->r[1].c), "expected 256"));
    assert_int_equal(comm_nccl_init(w->r[1].n, 3, 3, hex), COMM_ERR_INVAL);
    assert_int_equal(comm_nccl_get_state(w->r[1].n), COMM_NCCL_NONE);

    /* ranks 0 and 1 join: still building (rank 2 missing) */
    assert_int_equal(comm_nccl_init(w->r[0].n, 3, 0, hex), COMM_OK);
    assert_int_equal(comm_nccl_init(w->r[1].n, 3, 1, hex), COMM_OK);
    for (int it = 0; it < 5; it++) comm_progress(w->r[0].c);
    assert_int_equal(comm_nccl_get_state(w->r[0].n), COMM_NCCL_INIT);
    assert_int_equal(comm_rank(w->r[1].c), 1);
    assert_int_equal(comm_size(w->r[1].c), 3);
    /* a send posted while building waits for the build */
    unsigned char src[64], dst[64];
    fill(src, sizeof src, 5);
    memset(dst, 0, sizeof dst);
    comm_nccl_op *s = NULL, *r = NULL;
    assert_int_equal(comm_nccl_isend(w->r[0].n, 2, 7, src, sizeof src, NULL, &s), COMM_OK);
    comm_progress(w->r[0].c);
    assert_int_equal(w->r[0].x.n_send, 0);
    assert_int_equal(comm_nccl_init(w->r[2].n, 3, 2, hex), COMM_OK);
    for (int it = 0; it < 10 && !all_up(w); it++) {
    }
    for (int i = 0; i < 3; i++) {
        assert_int_equal(comm_nccl_get_state(w->r[i].n), COMM_NCCL_UP);
        assert_int_equal(comm_nccl_epoch(w->r[i].n), 1);
        assert_string_equal(comm_nccl_fail_reason(w->r[i].n), "");
    }
    assert_int_equal(comm_nccl_irecv(w->r[2].n, 0, 7, dst, sizeof dst, NULL, &r), COMM_OK);
    comm_nccl_op *ops[2] = {s, r};
    int who[2] = {0, 2};
    assert_int_equal(drive(w, ops, who, 2), 0);
    op_ok(&w->r[0], s, 64);
    op_ok(&w->r[2], r, 64);
    assert_memory_equal(src, dst, sizeof src);
    comm_nccl_op_free(w->r[0].n, &s);
    comm_nccl_op_free(w->r[2].n, &r);
    assert_null(s);
    world_free(w);
}

static void test_bootstrap_timeout_and_failure(void **state)
{
    (void)state;
    comm_nccl_opts o = {.init_timeout_ms = 30};
    world *w = world_new(2, &o);
    char hex[COMM_NCCL_ID_HEX + 1];
    assert_int_equal(comm_nccl_make_id(w->r[0].n, hex), COMM_OK);
    assert_int_equal(comm_nccl_init(w->r[0].n, 2, 0, hex), COMM_OK); /* rank 1 never comes */
    assert_int_equal(comm_nccl_wait_ready(w->r[0].n, 5), COMM_ERR_TIMEOUT);
    assert_int_equal(comm_nccl_wait_ready(w->r[0].n, 2000), COMM_ERR_PEER);
    assert_int_equal(comm_nccl_get_state(w->r[0].n), COMM_NCCL_FAILED);
    assert_non_null(strstr(comm_nccl_fail_reason(w->r[0].n), "took more than 30 ms"));
    assert_int_equal(w->r[0].x.n_abort, 1);
    assert_int_equal(comm_progress(w->r[0].c), COMM_ERR_PEER);
    /* a failing build call */
    w->r[1].x.fail_init = NCCL_API_ERR;
    assert_int_equal(comm_nccl_init(w->r[1].n, 2, 1, hex), COMM_ERR_PEER);
    assert_int_equal(comm_nccl_get_state(w->r[1].n), COMM_NCCL_FAILED);
    assert_non_null(strstr(comm_nccl_fail_reason(w->r[1].n), "injected failure"));
    assert_non_null(strstr(comm_last_error(w->r[1].c), "ncclCommInitRankConfig (rank 1 of 2)"));
    /* both come back with a new id */
    w->r[1].x.fail_init = 0;
    world_build(w);
    assert_int_equal(comm_nccl_epoch(w->r[0].n), 2);
    world_free(w);
}

/* ---- mpirun: a comm_t whose broadcast hands rank 0's bytes to the others ---- */

typedef struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    unsigned char data[COMM_NCCL_ID_BYTES];
    int posted;
    int fail;
} board;

typedef struct {
    board *b;
    int rank, size;
} mini_mpi;

static int mm_rank(void *impl) { return ((mini_mpi *)impl)->rank; }
static int mm_size(void *impl) { return ((mini_mpi *)impl)->size; }

static comm_status mm_bcast(comm_t *c, void *impl, void *gimpl, const int *ranks, int n, int root,
                            void *buf, size_t len, int timeout_ms)
{
    (void)gimpl;
    (void)ranks;
    (void)n;
    (void)timeout_ms;
    mini_mpi *m = impl;
    assert_int_equal(len, COMM_NCCL_ID_BYTES);
    assert_int_equal(root, 0);
    pthread_mutex_lock(&m->b->mu);
    comm_status st = COMM_OK;
    if (m->b->fail) {
        comm_set_error(c, "mini mpi: broadcast failed (injected)");
        st = COMM_ERR_SYS;
    } else if (m->rank == 0) {
        memcpy(m->b->data, buf, len);
        m->b->posted = 1;
        pthread_cond_broadcast(&m->b->cv);
    } else {
        while (!m->b->posted) pthread_cond_wait(&m->b->cv, &m->b->mu);
        memcpy(buf, m->b->data, len);
    }
    pthread_mutex_unlock(&m->b->mu);
    return st;
}

static void mm_destroy(void *impl) { free(impl); }

static const comm_ops mini_mpi_ops = {
    .backend = COMM_BACKEND_MPI,
    .rank = mm_rank,
    .size = mm_size,
    .broadcast = mm_bcast,
    .destroy = mm_destroy,
};

typedef struct {
    rk *r;
    comm_t *mpi;
    comm_status st;
} boot_arg;

static void *boot_main(void *p)
{
    boot_arg *a = p;
    a->st = comm_nccl_bootstrap_mpi(a->r->n, a->mpi, 5000);
    return NULL;
}

static void test_bootstrap_mpi(void **state)
{
    (void)state;
    world *w = world_new(3, NULL);
    board b = {.posted = 0};
    pthread_mutex_init(&b.mu, NULL);
    pthread_cond_init(&b.cv, NULL);
    pthread_t th[3];
    boot_arg a[3];
    for (int i = 0; i < 3; i++) {
        mini_mpi *m = calloc(1, sizeof *m);
        m->b = &b;
        m->rank = i;
        m->size = 3;
        a[i].r = &w->r[i];
        assert_int_equal(comm_wrap(&mini_mpi_ops, m, &a[i].mpi), COMM_OK);
        pthread_create(&th[i], NULL, boot_main, &a[i]);
    }
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 3; i++) {
        if (a[i].st != COMM_OK) fail_msg("rank %d: %s", i, comm_last_error(w->r[i].c));
        assert_int_equal(comm_nccl_get_state(w->r[i].n), COMM_NCCL_UP);
        assert_int_equal(comm_rank(w->r[i].c), i);
        assert_int_equal(comm_size(w->r[i].c), 3);
    }
    /* only rank 0 made an id, and all joined one clique */
    assert_int_equal(w->r[0].x.n_unique, 1);
    assert_int_equal(w->r[1].x.n_unique + w->r[2].x.n_unique, 0);
    assert_int_equal(w->f->n_cl, 1);
    assert_int_equal(w->f->cl[0].joined, 3);
    /* a failing broadcast fails clearly */
    b.fail = 1;
    comm_status st = comm_nccl_bootstrap_mpi(w->r[1].n, a[1].mpi, 100);
    assert_int_equal(st, COMM_ERR_SYS);
    assert_non_null(strstr(comm_last_error(w->r[1].c), "broadcasting rank 0's unique id over mpi"));
    assert_null(comm_nccl_of(a[0].mpi)); /* not an NCCL comm */
    for (int i = 0; i < 3; i++) comm_destroy(&a[i].mpi);
    pthread_mutex_destroy(&b.mu);
    pthread_cond_destroy(&b.cv);
    world_free(w);
}

/* Several sends posted together go in one group; the bytes arrive. Through comm.h. */
static void test_p2p_batch_comm_h(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    enum { N = 3 };
    size_t lens[N] = {100, 200, 300};
    unsigned char *src[N], *dst[N];
    comm_op_t *s[N], *r[N];
    for (int i = 0; i < N; i++) {
        src[i] = malloc(lens[i]);
        dst[i] = calloc(1, lens[i]);
        fill(src[i], lens[i], i);
        assert_int_equal(comm_isend(w->r[0].c, 1, 40 + (uint64_t)i, src[i], lens[i], &s[i]), COMM_OK);
        assert_int_equal(comm_irecv(w->r[1].c, 0, 40 + (uint64_t)i, dst[i], lens[i], &r[i]), COMM_OK);
    }
    assert_int_equal(w->r[0].x.n_send, 0); /* queued, not issued */
    comm_progress(w->r[1].c);
    size_t len = 0;
    for (int i = 0; i < N; i++) {
        assert_int_equal(comm_wait(w->r[0].c, s[i], 1000, &len), COMM_OK);
        assert_int_equal(len, lens[i]);
        assert_int_equal(comm_wait(w->r[1].c, r[i], 1000, &len), COMM_OK);
        assert_int_equal(len, lens[i]);
        assert_memory_equal(src[i], dst[i], lens[i]);
        comm_op_free(w->r[0].c, &s[i]);
        comm_op_free(w->r[1].c, &r[i]);
    }
    assert_string_equal(w->r[0].x.log, "[s1:100 s1:200 s1:300]");
    assert_string_equal(w->r[1].x.log, "[r0:100 r0:200 r0:300]");
    assert_int_equal(comm_nccl_in_flight(w->r[0].n), 0);
    assert_null(comm_zsock(w->r[0].c));
    /* a peer outside the world */
    comm_op_t *bad = NULL;
    assert_int_equal(comm_isend(w->r[0].c, 2, 1, src[0], 1, &bad), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(w->r[0].c), "outside the world of 2"));
    for (int i = 0; i < N; i++) {
        free(src[i]);
        free(dst[i]);
    }
    world_free(w);
}

/* The send waits for the compute that writes its buffer (an event, not the host): the stale
 * bytes never leave; layer l+1's compute does not hold layer l's transfer; a consumer stream
 * waits for a receive on the GPU. */
static void test_send_after_compute(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    fctx *x0 = &w->r[0].x, *x1 = &w->r[1].x;
    void *compute = NULL, *consumer = NULL;
    f_stream_new(x0, &compute);
    f_stream_new(x1, &consumer);
    comm_nccl_set_compute_stream(w->r[0].n, compute);
    unsigned char layer[2][32], fresh[2][32], got[2][32];
    for (int l = 0; l < 2; l++) {
        memset(layer[l], 0xee, 32); /* stale until the compute runs */
        fill(fresh[l], 32, 10 + l);
        memset(got[l], 0, 32);
    }
    /* layer 0's kernel, its event, layer 1's kernel, its event (both pending) */
    void *ev[2];
    comm_nccl_op *s[2], *r[2];
    for (int l = 0; l < 2; l++) {
        fake_compute(x0, compute, 1 + l, layer[l], fresh[l], 32);
        f_event_new(x0, &ev[l]);
        f_event_record(x0, ev[l], compute);
    }
    for (int l = 0; l < 2; l++) {
        assert_int_equal(comm_nccl_isend(w->r[0].n, 1, 9, layer[l], 32, ev[l], &s[l]), COMM_OK);
        /* the receiver issues each layer's receive alone, so that each completes alone */
        assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 9, got[l], 32, NULL, &r[l]), COMM_OK);
        comm_progress(w->r[1].c);
    }
    comm_progress(w->r[0].c);
    /* two groups: one per caller event; both issued, neither done */
    assert_string_equal(x0->log, "[s1:32][s1:32]");
    assert_string_equal(x1->log, "[r0:32][r0:32]");
    assert_int_equal(comm_nccl_op_issued(s[0]), 1);
    assert_int_equal(comm_nccl_op_issued(s[1]), 1);
    int done = 1;
    assert_int_equal(comm_nccl_op_test(w->r[0].n, s[0], &done, NULL), COMM_OK);
    assert_int_equal(done, 0);
    /* the consumer's stream waits (on the GPU) for receive 0 */
    void *cev = NULL;
    assert_int_equal(comm_nccl_op_stream_wait(w->r[1].n, r[0], consumer), COMM_OK);
    f_event_new(x1, &cev);
    f_event_record(x1, cev, consumer);
    assert_int_equal(f_event_query(x1, cev), NCCL_API_PENDING);
    /* layer 0 computed: its transfer runs while layer 1 still computes */
    fake_release(w->f, 1);
    comm_nccl_op *ops[2] = {s[0], r[0]};
    int who[2] = {0, 1};
    assert_int_equal(drive(w, ops, who, 2), 0);
    op_ok(&w->r[1], r[0], 32);
    assert_memory_equal(got[0], fresh[0], 32);
    assert_int_equal(f_event_query(x1, cev), NCCL_API_OK);
    assert_int_equal(comm_nccl_op_test(w->r[0].n, s[1], &done, NULL), COMM_OK);
    assert_int_equal(done, 0);
    fake_release(w->f, 2);
    ops[0] = s[1];
    ops[1] = r[1];
    assert_int_equal(drive(w, ops, who, 2), 0);
    assert_memory_equal(got[1], fresh[1], 32);
    /* without an event of its own, a send is ordered after the compute stream's work */
    unsigned char buf[16], fr[16], out[16];
    memset(buf, 0xee, 16);
    fill(fr, 16, 3);
    fake_compute(x0, compute, 3, buf, fr, 16);
    comm_nccl_op *s2 = NULL, *r2 = NULL;
    assert_int_equal(comm_nccl_isend(w->r[0].n, 1, 10, buf, 16, NULL, &s2), COMM_OK);
    assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 10, out, 16, NULL, &r2), COMM_OK);
    ops[0] = s2;
    ops[1] = r2;
    assert_int_equal(drive(w, ops, who, 2), 2); /* held by the compute */
    fake_release(w->f, 3);
    assert_int_equal(drive(w, ops, who, 2), 0);
    assert_memory_equal(out, fr, 16);
    /* waiting on an op not issued yet is refused */
    comm_nccl_op *q = NULL;
    comm_nccl_xfer_begin(w->r[1].n, 99, comm_nccl_chan(0, 1), 5); /* held: seq 0 first */
    assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 99, out, 16, NULL, &q), COMM_OK);
    comm_progress(w->r[1].c);
    assert_int_equal(comm_nccl_op_issued(q), 0);
    assert_int_equal(comm_nccl_op_stream_wait(w->r[1].n, q, consumer), COMM_ERR_INVAL);
    comm_nccl_op_free(w->r[1].n, &q);
    for (int l = 0; l < 2; l++) {
        comm_nccl_op_free(w->r[0].n, &s[l]);
        comm_nccl_op_free(w->r[1].n, &r[l]);
        f_event_free(x0, ev[l]);
    }
    comm_nccl_op_free(w->r[0].n, &s2);
    comm_nccl_op_free(w->r[1].n, &r2);
    f_event_free(x1, cev);
    f_stream_free(x0, compute);
    f_stream_free(x1, consumer);
    world_free(w);
}

/* Transfers of a channel go strictly in seq order on both ends, whatever order the caller
 * posts them in; equal sizes, so a wrong match would swap the bytes. */
static void test_seq_order(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    uint64_t ch = comm_nccl_chan(0, 1);
    enum { T = 4, L = 2, SZ = 24 };
    unsigned char src[T][L][SZ], dst[T][L][SZ];
    comm_nccl_op *s[T][L], *r[T][L];
    memset(dst, 0, sizeof dst);
    for (int t = 0; t < T; t++)
        for (int l = 0; l < L; l++) fill(src[t][l], SZ, t * 10 + l);
    /* the sender learns of the transfers in order 2, 0, 3, 1; the receiver in 3, 1, 0, 2 */
    int sorder[T] = {2, 0, 3, 1}, rorder[T] = {3, 1, 0, 2};
    for (int i = 0; i < T; i++) {
        int t = sorder[i];
        assert_int_equal(comm_nccl_xfer_begin(w->r[0].n, 100 + (uint64_t)t, ch, (uint64_t)t), COMM_OK);
        for (int l = 0; l < L; l++)
            assert_int_equal(comm_nccl_isend(w->r[0].n, 1, 100 + (uint64_t)t, src[t][l], SZ, NULL,
                                             &s[t][l]),
                             COMM_OK);
        if (t != 0) assert_int_equal(comm_nccl_xfer_end(w->r[0].n, 100 + (uint64_t)t), COMM_OK);
        comm_progress(w->r[0].c);
        if (i == 0) assert_int_equal(w->r[0].x.n_send, 0); /* seq 2 waits for 0 and 1 */
    }
    /* seq 0 not ended: its sends went, later seqs wait */
    assert_int_equal(w->r[0].x.n_send, L);
    assert_int_equal(comm_nccl_op_issued(s[1][0]), 0);
    assert_int_equal(comm_nccl_xfer_end(w->r[0].n, 100), COMM_OK);
    comm_progress(w->r[0].c);
    assert_int_equal(w->r[0].x.n_send, T * L);
    for (int i = 0; i < T; i++) {
        int t = rorder[i];
        assert_int_equal(comm_nccl_xfer_begin(w->r[1].n, 100 + (uint64_t)t, ch, (uint64_t)t), COMM_OK);
        for (int l = 0; l < L; l++)
            assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 100 + (uint64_t)t, dst[t][l], SZ, NULL,
                                             &r[t][l]),
                             COMM_OK);
        assert_int_equal(comm_nccl_xfer_end(w->r[1].n, 100 + (uint64_t)t), COMM_OK);
    }
    comm_nccl_op *ops[2 * T * L];
    int who[2 * T * L];
    for (int t = 0; t < T; t++)
        for (int l = 0; l < L; l++) {
            ops[2 * (t * L + l)] = s[t][l];
            who[2 * (t * L + l)] = 0;
            ops[2 * (t * L + l) + 1] = r[t][l];
            who[2 * (t * L + l) + 1] = 1;
        }
    assert_int_equal(drive(w, ops, who, 2 * T * L), 0);
    for (int t = 0; t < T; t++)
        for (int l = 0; l < L; l++) {
            op_ok(&w->r[1], r[t][l], SZ);
            assert_memory_equal(src[t][l], dst[t][l], SZ);
            comm_nccl_op_free(w->r[0].n, &s[t][l]);
            comm_nccl_op_free(w->r[1].n, &r[t][l]);
        }
    /* bad uses */
    assert_int_equal(comm_nccl_xfer_begin(w->r[0].n, 200, ch, 2), COMM_ERR_INVAL); /* past */
    assert_non_null(strstr(comm_last_error(w->r[0].c), "already past (next: 4)"));
    assert_int_equal(comm_nccl_xfer_begin(w->r[0].n, 200, ch, 6), COMM_OK);
    assert_int_equal(comm_nccl_xfer_begin(w->r[0].n, 200, ch, 7), COMM_ERR_INVAL); /* tag twice */
    assert_int_equal(comm_nccl_xfer_begin(w->r[0].n, 201, ch, 6), COMM_ERR_INVAL); /* seq taken */
    assert_int_equal(comm_nccl_xfer_end(w->r[0].n, 555), COMM_ERR_INVAL);
    assert_int_equal(comm_nccl_xfer_skip(w->r[0].n, ch, 6), COMM_ERR_INVAL);
    assert_int_equal(comm_nccl_xfer_end(w->r[0].n, 200), COMM_OK);
    comm_nccl_op *late = NULL;
    assert_int_equal(comm_nccl_isend(w->r[0].n, 1, 200, src[0][0], SZ, NULL, &late), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(w->r[0].c), "already ended"));
    world_free(w);
}

/* skip and release let later seqs go; a half-issued release breaks the pair: abort. */
static void test_skip_release(void **state)
{
    (void)state;
    world *w = world_up(3, NULL);
    rk *a = &w->r[0];
    uint64_t ch = comm_nccl_chan(3, 4);
    unsigned char b[4][16];
    memset(b, 0, sizeof b);
    /* seq 1 waits for 0; skipping 0 lets it go */
    comm_nccl_op *o1 = NULL;
    assert_int_equal(comm_nccl_xfer_begin(a->n, 11, ch, 1), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 11, b[0], 16, NULL, &o1), COMM_OK);
    comm_progress(a->c);
    assert_int_equal(comm_nccl_op_issued(o1), 0);
    assert_int_equal(comm_nccl_xfer_skip(a->n, ch, 0), COMM_OK);
    assert_int_equal(comm_nccl_op_issued(o1), 1);
    assert_int_equal(comm_nccl_xfer_skip(a->n, ch, 0), COMM_ERR_INVAL); /* past */
    assert_int_equal(comm_nccl_xfer_end(a->n, 11), COMM_OK);
    /* seq 3 waits for 2; releasing 2 before anything of it was issued is clean */
    comm_nccl_op *o2 = NULL, *o3 = NULL, *u = NULL, *v = NULL;
    assert_int_equal(comm_nccl_xfer_begin(a->n, 13, ch, 3), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 13, b[1], 16, NULL, &o3), COMM_OK);
    assert_int_equal(comm_nccl_xfer_end(a->n, 13), COMM_OK);
    /* an untagged send to the same peer must not overtake the held one; to rank 2 it may */
    assert_int_equal(comm_nccl_isend(a->n, 1, 77, b[2], 16, NULL, &u), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 2, 78, b[3], 16, NULL, &v), COMM_OK);
    comm_progress(a->c);
    assert_int_equal(comm_nccl_op_issued(o3), 0);
    assert_int_equal(comm_nccl_op_issued(u), 0);
    assert_int_equal(comm_nccl_op_issued(v), 1);
    assert_int_equal(comm_nccl_xfer_begin(a->n, 12, ch, 2), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 12, b[0], 16, NULL, &o2), COMM_OK);
    assert_int_equal(comm_nccl_xfer_release(a->n, 12), COMM_OK);
    op_peer_err(a, o2, "(tag 12, seq 2) failed: transfer tag 12 (seq 2) released");
    assert_int_equal(comm_nccl_op_issued(o3), 1);
    assert_int_equal(comm_nccl_op_issued(u), 1);
    assert_int_equal(comm_nccl_get_state(a->n), COMM_NCCL_UP);
    assert_int_equal(comm_nccl_xfer_release(a->n, 12345), COMM_OK); /* unknown: nothing */
    /* seq 4 issues one op and is released before its end: the pair's order is broken */
    comm_nccl_op *o4 = NULL;
    assert_int_equal(comm_nccl_xfer_begin(a->n, 14, ch, 4), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 14, b[0], 16, NULL, &o4), COMM_OK);
    comm_progress(a->c);
    assert_int_equal(comm_nccl_op_issued(o4), 1);
    assert_int_equal(comm_nccl_xfer_release(a->n, 14), COMM_ERR_PEER);
    assert_int_equal(comm_nccl_get_state(a->n), COMM_NCCL_FAILED);
    assert_non_null(strstr(comm_nccl_fail_reason(a->n), "released after 1 of its operations"));
    assert_int_equal(a->x.n_abort, 1);
    op_peer_err(a, o4, "the order of the pair is broken");
    op_peer_err(a, o1, "send to rank 1 (tag 11, seq 1) failed");
    op_peer_err(a, u, "send to rank 1 (tag 77) failed");
    comm_nccl_op *all[] = {o1, o2, o3, o4, u, v};
    for (int i = 0; i < 6; i++) comm_nccl_op_free(a->n, &all[i]);
    world_free(w);
}

/* A group end in progress: no NCCL call until comm_status says OK; then its event. */
static void test_group_end_in_progress(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    rk *a = &w->r[0];
    void *e1 = NULL, *e2 = NULL;
    f_event_new(&a->x, &e1);
    f_event_new(&a->x, &e2);
    unsigned char x1[8], x2[8], y1[8], y2[8];
    fill(x1, 8, 1);
    fill(x2, 8, 2);
    a->x.ge_pending = 3;
    comm_nccl_op *s1, *s2, *r1, *r2;
    assert_int_equal(comm_nccl_isend(a->n, 1, 1, x1, 8, e1, &s1), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 1, x2, 8, e2, &s2), COMM_OK); /* its own group */
    comm_progress(a->c);
    assert_int_equal(a->x.n_group_end, 1);
    for (int i = 0; i < 2; i++) comm_progress(a->c);
    assert_int_equal(a->x.n_group_end, 1); /* still waiting for the first group end */
    comm_progress(a->c);
    comm_progress(a->c);
    assert_int_equal(a->x.n_group_end, 2);
    assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 1, y1, 8, NULL, &r1), COMM_OK);
    assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 1, y2, 8, NULL, &r2), COMM_OK);
    comm_nccl_op *ops[4] = {s1, s2, r1, r2};
    int who[4] = {0, 0, 1, 1};
    assert_int_equal(drive(w, ops, who, 4), 0);
    assert_memory_equal(x1, y1, 8);
    assert_memory_equal(x2, y2, 8);
    for (int i = 0; i < 4; i++) comm_nccl_op_free(w->r[who[i]].n, &ops[i]);
    f_event_free(&a->x, e1);
    f_event_free(&a->x, e2);
    world_free(w); /* checks: no call while in progress (violations 0) */
}

/* An asynchronous error seen by progress: abort, every op ends with COMM_ERR_PEER naming
 * the cause, new ops refused until a rebuild; after comm_init again, seq restarts at 0. */
static void test_async_error_abort_rebuild(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    rk *a = &w->r[0], *b = &w->r[1];
    uint64_t ch = comm_nccl_chan(0, 1);
    unsigned char buf[32];
    fill(buf, 32, 1);
    comm_nccl_op *s0 = NULL, *s1 = NULL, *held = NULL;
    assert_int_equal(comm_nccl_xfer_begin(a->n, 5, ch, 0), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 5, buf, 32, NULL, &s0), COMM_OK);
    assert_int_equal(comm_nccl_xfer_end(a->n, 5), COMM_OK);
    assert_int_equal(comm_nccl_xfer_begin(a->n, 7, ch, 2), COMM_OK); /* held behind seq 1 */
    assert_int_equal(comm_nccl_isend(a->n, 1, 7, buf, 32, NULL, &held), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 6, buf, 16, NULL, &s1), COMM_OK); /* untagged, blocked by direction */
    comm_progress(a->c);
    assert_int_equal(comm_nccl_op_issued(s0), 1); /* no receive: it hangs */
    assert_int_equal(comm_nccl_in_flight(a->n), 3);
    fake_async(&a->x, 0, NCCL_API_REMOTE);
    assert_int_equal(comm_progress(a->c), COMM_ERR_PEER);
    assert_int_equal(comm_nccl_get_state(a->n), COMM_NCCL_FAILED);
    assert_int_equal(a->x.n_abort, 1);
    assert_non_null(strstr(comm_nccl_fail_reason(a->n), "asynchronous error: remote error: fake: peer rank gone"));
    op_peer_err(a, s0, "send to rank 1 (tag 5, seq 0) failed: asynchronous error");
    op_peer_err(a, held, "(tag 7, seq 2) failed");
    op_peer_err(a, s1, "communicator 1 aborted");
    assert_int_equal(comm_nccl_in_flight(a->n), 0);
    comm_nccl_op *no = NULL;
    assert_int_equal(comm_nccl_isend(a->n, 1, 8, buf, 4, NULL, &no), COMM_ERR_PEER);
    assert_non_null(strstr(comm_last_error(a->c), "waiting for a new comm_init"));
    comm_nccl_op_free(a->n, &s0);
    comm_nccl_op_free(a->n, &held);
    comm_nccl_op_free(a->n, &s1);
    /* rank 1 is still up; a new comm_init replaces its communicator too: its posted receive
     * fails, naming why */
    comm_nccl_op *rr = NULL;
    unsigned char got[32];
    assert_int_equal(comm_nccl_irecv(b->n, 0, 9, got, 32, NULL, &rr), COMM_OK);
    comm_progress(b->c);
    world_build(w);
    op_peer_err(b, rr, "replaced by a new comm_init");
    comm_nccl_op_free(b->n, &rr);
    assert_int_equal(b->x.n_abort, 1);
    assert_int_equal(comm_nccl_epoch(a->n), 2);
    /* the channel restarts at seq 0 */
    comm_nccl_op *s = NULL, *r = NULL;
    memset(got, 0, sizeof got);
    assert_int_equal(comm_nccl_xfer_begin(a->n, 20, ch, 0), COMM_OK);
    assert_int_equal(comm_nccl_xfer_begin(b->n, 20, ch, 0), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 20, buf, 32, NULL, &s), COMM_OK);
    assert_int_equal(comm_nccl_irecv(b->n, 0, 20, got, 32, NULL, &r), COMM_OK);
    comm_nccl_op *ops[2] = {s, r};
    int who[2] = {0, 1};
    assert_int_equal(drive(w, ops, who, 2), 0);
    assert_memory_equal(buf, got, 32);
    comm_nccl_op_free(a->n, &s);
    comm_nccl_op_free(b->n, &r);
    world_free(w);
}

/* The watchdog thread aborts a failed communicator while the owner does not call in (e.g.
 * it waits on the GPU); the owner then sees its ops failed. */
static void test_watchdog(void **state)
{
    (void)state;
    comm_nccl_opts o = {.watchdog_ms = 2};
    world *w = world_up(2, &o);
    rk *a = &w->r[0];
    unsigned char buf[8] = {0};
    comm_nccl_op *s = NULL;
    assert_int_equal(comm_nccl_isend(a->n, 1, 3, buf, 8, NULL, &s), COMM_OK);
    comm_progress(a->c);
    assert_int_equal(comm_nccl_op_issued(s), 1);
    fake_async(&a->x, 0, NCCL_API_REMOTE);
    int aborted = 0;
    for (int i = 0; i < 2000 && !aborted; i++) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        pthread_mutex_lock(&w->f->mu);
        aborted = a->x.n_abort;
        pthread_mutex_unlock(&w->f->mu);
    }
    assert_int_equal(aborted, 1);
    op_peer_err(a, s, "seen by the watchdog");
    assert_int_equal(comm_nccl_get_state(a->n), COMM_NCCL_FAILED);
    assert_int_equal(a->x.n_abort, 1); /* not aborted twice */
    comm_nccl_op_free(a->n, &s);
    /* an explicit abort (e.g. a lease ran out on a hung peer) */
    comm_nccl_abort(w->r[1].n, "lease of xfer 9 expired");
    assert_int_equal(comm_nccl_get_state(w->r[1].n), COMM_NCCL_FAILED);
    assert_non_null(strstr(comm_nccl_fail_reason(w->r[1].n), "aborted by the caller: lease of xfer 9 expired"));
    world_free(w);
}

/* Failing calls fail the communicator, naming the call. */
static void test_failed_calls(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    unsigned char buf[8] = {0};
    comm_nccl_op *s = NULL;
    w->r[0].x.fail_send = NCCL_API_ERR;
    assert_int_equal(comm_nccl_isend(w->r[0].n, 1, 3, buf, 8, NULL, &s), COMM_OK);
    assert_int_equal(comm_progress(w->r[0].c), COMM_ERR_PEER);
    op_peer_err(&w->r[0], s, "ncclSend: error: fake ncclSend: injected failure");
    comm_nccl_op_free(w->r[0].n, &s);
    w->r[1].x.fail_group_end = NCCL_API_REMOTE;
    assert_int_equal(comm_nccl_irecv(w->r[1].n, 0, 3, buf, 8, NULL, &s), COMM_OK);
    assert_int_equal(comm_progress(w->r[1].c), COMM_ERR_PEER);
    op_peer_err(&w->r[1], s, "ncclGroupEnd: remote error");
    comm_nccl_op_free(w->r[1].n, &s);
    assert_int_equal(w->r[0].x.n_abort + w->r[1].x.n_abort, 2);
    world_free(w);
}

/* Cancel: a queued op leaves at once; an issued one runs on and is freed when it ends. */
static void test_cancel(void **state)
{
    (void)state;
    world *w = world_up(3, NULL);
    rk *a = &w->r[0];
    unsigned char x[8], y[8];
    fill(x, 8, 4);
    comm_nccl_op *held = NULL, *s = NULL, *r = NULL;
    assert_int_equal(comm_nccl_xfer_begin(a->n, 50, comm_nccl_chan(0, 1), 1), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 1, 50, x, 8, NULL, &held), COMM_OK);
    assert_int_equal(comm_nccl_isend(a->n, 2, 51, x, 8, NULL, &s), COMM_OK);
    comm_progress(a->c);
    assert_int_equal(comm_nccl_op_issued(s), 1);
    assert_int_equal(comm_nccl_in_flight(a->n), 2);
    comm_nccl_op_free(a->n, &held);
    assert_null(held);
    assert_int_equal(comm_nccl_in_flight(a->n), 1);
    comm_nccl_op_free(a->n, &s); /* issued: runs on until its receive comes */
    assert_null(s);
    assert_int_equal(comm_nccl_in_flight(a->n), 1);
    assert_int_equal(comm_nccl_irecv(w->r[2].n, 0, 51, y, 8, NULL, &r), COMM_OK);
    comm_nccl_op *ops[1] = {r};
    int who[1] = {2};
    assert_int_equal(drive(w, ops, who, 1), 0);
    assert_memory_equal(x, y, 8);
    comm_nccl_progress(a->n);
    assert_int_equal(comm_nccl_in_flight(a->n), 0);
    comm_nccl_op_free(w->r[2].n, &r);
    /* comm.h's cancel and destroy with ops in flight: nothing leaks (ASan) */
    comm_op_t *c1 = NULL, *c2 = NULL;
    assert_int_equal(comm_isend(a->c, 1, 60, x, 8, &c1), COMM_OK);
    assert_int_equal(comm_isend(a->c, 1, 61, x, 8, &c2), COMM_OK);
    comm_progress(a->c);
    comm_cancel(a->c, &c1);
    assert_null(c1);
    (void)c2; /* left to comm_destroy */
    world_free(w);
}

/* To its own rank (one GPU as prefill and decode): a send and its receive go in one group,
 * whatever the order they were posted in and whatever event the send waits for. */
static void test_self_pairs(void **state)
{
    (void)state;
    world *w = world_up(1, NULL);
    rk *a = &w->r[0];
    void *compute = NULL, *ev = NULL;
    f_stream_new(&a->x, &compute);
    f_event_new(&a->x, &ev);
    comm_nccl_set_compute_stream(a->n, compute);
    enum { L = 3, SZ = 40 };
    unsigned char src[L][SZ], dst[L][SZ];
    memset(dst, 0, sizeof dst);
    comm_nccl_op *s[L], *r[L];
    uint64_t ch = comm_nccl_chan(0, 0);
    /* the decode side posts every receive first (reserve) */
    assert_int_equal(comm_nccl_xfer_begin(a->n, 70, ch, 0), COMM_OK);
    for (int l = 0; l < L; l++) {
        fill(src[l], SZ, 40 + l);
        assert_int_equal(comm_nccl_irecv(a->n, 0, 70, dst[l], SZ, NULL, &r[l]), COMM_OK);
    }
    comm_progress(a->c);
    assert_string_equal(a->x.log, ""); /* alone they would hang the stream */
    /* the prefill side sends layer by layer, each after its layer's event */
    for (int l = 0; l < L; l++) {
        f_event_record(&a->x, ev, compute);
        assert_int_equal(comm_nccl_isend(a->n, 0, 70, src[l], SZ, ev, &s[l]), COMM_OK);
        comm_progress(a->c);
        assert_int_equal(comm_nccl_op_issued(s[l]), 1); /* so ev may be recorded again */
    }
    assert_string_equal(a->x.log, "[r0:40 s0:40][r0:40 s0:40][r0:40 s0:40]");
    assert_int_equal(comm_nccl_xfer_end(a->n, 70), COMM_OK);
    comm_nccl_op *ops[2 * L];
    int who[2 * L] = {0};
    for (int l = 0; l < L; l++) {
        ops[2 * l] = s[l];
        ops[2 * l + 1] = r[l];
    }
    assert_int_equal(drive(w, ops, who, 2 * L), 0);
    for (int l = 0; l < L; l++) {
        op_ok(a, r[l], SZ);
        assert_memory_equal(src[l], dst[l], SZ);
        comm_nccl_op_free(a->n, &s[l]);
        comm_nccl_op_free(a->n, &r[l]);
    }
    f_event_free(&a->x, ev);
    f_stream_free(&a->x, compute);
    world_free(w);
}

/* Many receives to itself queued ahead of their sends, and groups capped at max_batch: each
 * group still pairs every send with its receive. */
static void test_self_pairs_capped(void **state)
{
    (void)state;
    comm_nccl_opts o = {.max_batch = 4};
    world *w = world_up(1, &o);
    rk *a = &w->r[0];
    enum { N = 10 };
    unsigned char src[N][8], dst[N][8];
    comm_nccl_op *s[N], *r[N];
    memset(dst, 0, sizeof dst);
    for (int i = 0; i < N; i++) {
        fill(src[i], 8, i);
        assert_int_equal(comm_nccl_irecv(a->n, 0, 1, dst[i], 8, NULL, &r[i]), COMM_OK);
    }
    for (int i = 0; i < N; i++)
        assert_int_equal(comm_nccl_isend(a->n, 0, 1, src[i], 8, NULL, &s[i]), COMM_OK);
    comm_progress(a->c);
    assert_string_equal(a->x.log, "[r0:8 r0:8 s0:8 s0:8][r0:8 r0:8 s0:8 s0:8][r0:8 r0:8 s0:8 s0:8]"
                                  "[r0:8 r0:8 s0:8 s0:8][r0:8 r0:8 s0:8 s0:8]");
    comm_nccl_op *ops[2 * N];
    int who[2 * N] = {0};
    for (int i = 0; i < N; i++) {
        ops[2 * i] = s[i];
        ops[2 * i + 1] = r[i];
    }
    assert_int_equal(drive(w, ops, who, 2 * N), 0);
    for (int i = 0; i < N; i++) {
        assert_memory_equal(src[i], dst[i], 8);
        comm_nccl_op_free(a->n, &s[i]);
        comm_nccl_op_free(a->n, &r[i]);
    }
    world_free(w);
}

/* comm_discard on a transfer's tag releases it (later seqs go). */
static void test_discard(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    rk *a = &w->r[0];
    uint64_t ch = comm_nccl_chan(1, 2);
    unsigned char x[8] = {0};
    comm_op_t *h = NULL, *n1 = NULL;
    assert_int_equal(comm_nccl_xfer_begin(a->n, 30, ch, 0), COMM_OK);
    assert_int_equal(comm_nccl_xfer_begin(a->n, 31, ch, 1), COMM_OK);
    assert_int_equal(comm_isend(a->c, 1, 31, x, 8, &n1), COMM_OK);
    assert_int_equal(comm_isend(a->c, 1, 30, x, 8, &h), COMM_OK);
    assert_int_equal(comm_nccl_xfer_end(a->n, 31), COMM_OK);
    comm_discard(a->c, 1, 30);
    int done = 0;
    assert_int_equal(comm_test(a->c, h, &done, NULL), COMM_ERR_PEER);
    assert_int_equal(done, 1);
    assert_int_equal(a->x.n_send, 1); /* seq 1's send went */
    comm_op_free(a->c, &h);
    comm_op_free(a->c, &n1);
    world_free(w);
}

/* ---- groups and collectives, one thread per rank ---- */

typedef struct {
    world *w;
    int i;
    int ranks[4];
    int nr;
    comm_status st[8];
    float red[6];
    unsigned char bc[5], ag[4 * 3];
    comm_nccl_group_t *g;
} grp_arg;

static void *grp_main(void *p)
{
    grp_arg *a = p;
    rk *r = &a->w->r[a->i];
    comm_group_t *g = NULL;
    a->st[0] = comm_group_new(r->c, a->ranks, a->nr, &g);
    if (a->st[0] != COMM_OK) return NULL;
    int idx = comm_group_index(g);
    for (int k = 0; k < 6; k++) a->red[k] = (float)(idx + 1) * (float)(k + 1);
    a->st[1] = comm_allreduce_sum_f32(g, a->red, 6, 5000);
    if (idx == 1) memcpy(a->bc, "hello", 5);
    a->st[2] = comm_broadcast(g, 1, a->bc, 5, 5000);
    unsigned char mine[3] = {(unsigned char)idx, (unsigned char)(idx + 10), (unsigned char)(idx + 20)};
    a->st[3] = comm_allgather(g, mine, 3, a->ag, 5000);
    comm_group_destroy(&g);
    return NULL;
}

static void test_group_collectives(void **state)
{
    (void)state;
    world *w = world_up(4, NULL);
    /* the group is world ranks 3, 1, 2 (index 0, 1, 2); rank 0 is not in it */
    pthread_t th[3];
    grp_arg a[3];
    int members[3] = {3, 1, 2};
    for (int i = 0; i < 3; i++) {
        memset(&a[i], 0, sizeof a[i]);
        a[i].w = w;
        a[i].i = members[i];
        a[i].nr = 3;
        memcpy(a[i].ranks, members, sizeof members);
        pthread_create(&th[i], NULL, grp_main, &a[i]);
    }
    for (int i = 0; i < 3; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 3; i++) {
        for (int k = 0; k < 4; k++)
            if (a[i].st[k] != COMM_OK)
                fail_msg("member %d step %d: %s", i, k, comm_last_error(w->r[members[i]].c));
        for (int k = 0; k < 6; k++) assert_true(a[i].red[k] == 6.0f * (float)(k + 1));
        assert_memory_equal(a[i].bc, "hello", 5);
        for (int q = 0; q < 3; q++) {
            assert_int_equal(a[i].ag[3 * q], q);
            assert_int_equal(a[i].ag[3 * q + 2], q + 20);
        }
    }
    /* the id went from index 0 (world rank 3) to the others over the world communicator */
    assert_int_equal(w->r[3].x.n_send, 2);
    assert_int_equal(w->r[1].x.n_recv, 1);
    assert_int_equal(w->r[0].x.n_send + w->r[0].x.n_recv, 0);
    /* each destroyed its group's communicator cleanly */
    for (int i = 1; i < 4; i++) assert_int_equal(w->r[i].x.n_destroy, 1);
    world_free(w);
}

typedef struct {
    rk *r;
    comm_nccl_group_t *g;
    comm_status st;
} pair_arg;

static void *pair_main(void *q)
{
    pair_arg *p = q;
    int both[2] = {0, 1};
    p->st = comm_nccl_group_new(p->r->n, both, 2, 5000, &p->g);
    return NULL;
}

static void test_group_async_and_failures(void **state)
{
    (void)state;
    world *w = world_up(2, NULL);
    /* a group of one needs no peer: its collectives are local */
    comm_nccl_group_t *one = NULL;
    int me = 1;
    assert_int_equal(comm_nccl_group_new(w->r[1].n, &me, 1, 1000, &one), COMM_OK);
    float v[3] = {1, 2, 3};
    assert_int_equal(comm_nccl_allreduce_sum_f32(one, v, 3, 1000), COMM_OK);
    assert_true(v[2] == 3.0f);
    /* async, on the caller's stream: enqueued and returned; the stream's event says when */
    void *cs = NULL, *ev = NULL;
    f_stream_new(&w->r[1].x, &cs);
    f_event_new(&w->r[1].x, &ev);
    fake_compute(&w->r[1].x, cs, 5, NULL, NULL, 0); /* the kernel before the all-reduce */
    assert_int_equal(comm_nccl_allreduce_sum_f32_async(one, v, 3, cs), COMM_OK);
    f_event_record(&w->r[1].x, ev, cs);
    assert_int_equal(f_event_query(&w->r[1].x, ev), NCCL_API_PENDING);
    fake_release(w->f, 5);
    assert_int_equal(f_event_query(&w->r[1].x, ev), NCCL_API_OK);
    unsigned char bb[4] = {1, 2, 3, 4}, gg[4];
    assert_int_equal(comm_nccl_broadcast_async(one, 0, bb, 4, cs), COMM_OK);
    assert_int_equal(comm_nccl_allgather_async(one, bb, 4, gg, cs), COMM_OK);
    f_event_record(&w->r[1].x, ev, cs);
    assert_int_equal(f_event_query(&w->r[1].x, ev), NCCL_API_OK);
    assert_memory_equal(bb, gg, 4);
    assert_int_equal(comm_nccl_broadcast(one, 1, bb, 4, 10), COMM_ERR_INVAL); /* root outside */
    /* an asynchronous error on the group's communicator: it fails, the world stays up */
    fake_async(&w->r[1].x, 1, NCCL_API_REMOTE);
    assert_int_equal(comm_nccl_allreduce_sum_f32(one, v, 3, 1000), COMM_ERR_PEER);
    assert_int_equal(comm_nccl_group_state(one), COMM_NCCL_FAILED);
    assert_non_null(strstr(comm_last_error(w->r[1].c), "group of 1 ranks (index 0)"));
    assert_int_equal(comm_nccl_allreduce_sum_f32_async(one, v, 3, cs), COMM_ERR_PEER);
    assert_int_equal(comm_nccl_get_state(w->r[1].n), COMM_NCCL_UP);
    comm_nccl_group_destroy(&one);
    comm_nccl_group_destroy(&one); /* safe twice */
    /* a collective whose peer never calls: timeout, the group's communicator is aborted */
    pair_arg p[2] = {{.r = &w->r[0]}, {.r = &w->r[1]}};
    pthread_t th[2];
    for (int i = 0; i < 2; i++) pthread_create(&th[i], NULL, pair_main, &p[i]);
    for (int i = 0; i < 2; i++) pthread_join(th[i], NULL);
    for (int i = 0; i < 2; i++)
        if (p[i].st != COMM_OK) fail_msg("pair %d: %s", i, comm_last_error(w->r[i].c));
    int aborts = w->r[0].x.n_abort;
    assert_int_equal(comm_nccl_allreduce_sum_f32(p[0].g, v, 3, 30), COMM_ERR_TIMEOUT);
    assert_non_null(strstr(comm_last_error(w->r[0].c), "ncclAllReduce did not finish within 30 ms"));
    assert_int_equal(comm_nccl_group_state(p[0].g), COMM_NCCL_FAILED);
    assert_int_equal(w->r[0].x.n_abort, aborts + 1);
    assert_int_equal(comm_nccl_get_state(w->r[0].n), COMM_NCCL_UP); /* the world is not touched */
    comm_nccl_group_destroy(&p[0].g);
    comm_nccl_group_destroy(&p[1].g);
    /* a group that lacks this rank, or lists a rank twice */
    int bad1[2] = {0, 0}, bad2[1] = {0};
    comm_nccl_group_t *gx = NULL;
    assert_int_equal(comm_nccl_group_new(w->r[1].n, bad1, 2, 10, &gx), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(w->r[1].c), "listed twice"));
    assert_int_equal(comm_nccl_group_new(w->r[1].n, bad2, 1, 10, &gx), COMM_ERR_INVAL);
    assert_non_null(strstr(comm_last_error(w->r[1].c), "not in the list"));
    f_event_free(&w->r[1].x, ev);
    f_stream_free(&w->r[1].x, cs);
    world_free(w);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_id_hex),
        cmocka_unit_test(test_bootstrap_duetd),
        cmocka_unit_test(test_bootstrap_timeout_and_failure),
        cmocka_unit_test(test_bootstrap_mpi),
        cmocka_unit_test(test_p2p_batch_comm_h),
        cmocka_unit_test(test_send_after_compute),
        cmocka_unit_test(test_seq_order),
        cmocka_unit_test(test_skip_release),
        cmocka_unit_test(test_group_end_in_progress),
        cmocka_unit_test(test_async_error_abort_rebuild),
        cmocka_unit_test(test_watchdog),
        cmocka_unit_test(test_failed_calls),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_self_pairs),
        cmocka_unit_test(test_self_pairs_capped),
        cmocka_unit_test(test_discard),
        cmocka_unit_test(test_group_collectives),
        cmocka_unit_test(test_group_async_and_failures),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
