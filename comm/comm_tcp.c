/* comm/comm_tcp.c: the tcp backend of the data plane (comm.h) over ZeroMQ.
 *
 * Sockets. Each rank binds one PULL socket at its data endpoint (comm_zsock) and keeps one
 * PUSH socket per live peer (itself included), connected to the endpoint that
 * comm_tcp_set_world gave; a peer whose endpoint is withdrawn or changed gets its PUSH
 * closed with ZMQ_LINGER 0 (ZeroMQ drops what it still queues) and a fresh one for the new
 * endpoint.
 *
 * Messages are two frames: a 40-byte header (magic, source rank, destination rank, tag,
 * length, and the hash of the source's own endpoint in its world list: its incarnation)
 * and the data. The data frame is zero-copy (zmq_msg_init_data over the caller's buffer);
 * its free callback, run by ZeroMQ when it no longer needs the buffer (written to the
 * kernel, or dropped), marks the send complete. Sends never block: ZMQ_DONTWAIT, and a
 * send that meets the high-water mark waits in the peer's queue here until a later call.
 *
 * Receiving. comm_progress (and comm_test, comm_wait) read what the PULL socket holds.
 * Messages are kept per channel, (source, tag): receives posted on a channel are filled in
 * arrival order (ZeroMQ keeps one sender's order), messages that come first wait in the
 * channel. A message from an incarnation other than the one this rank's world names for its
 * source waits unmatched, and is dropped when the source's endpoint changes. A channel
 * remembers discards and cancelled receives (skip counts) in a bounded ring. */
#include "comm/comm.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <zmq.h>

#define TCP_MAGIC 0x31435544u   /* "DUC1" little-endian */
#define TCP_HDR 40              /* header frame bytes */
#define TCP_HWM 4096            /* messages ZeroMQ queues per socket */
#define TCP_DRAIN_MAX 256       /* messages read per progress call */
#define TCP_REMEMBER 4096       /* (peer, tag) channels remembered for discards and cancels */
#define TCP_CLOSE_WAIT_MS 5000  /* destroy waits this long for ZeroMQ to release buffers */
#define TCP_EP_MAX 256          /* longest endpoint */

enum { OP_SEND, OP_RECV };
enum { ST_QUEUED, ST_INFLIGHT, ST_POSTED, ST_DONE };

typedef struct chan chan;
typedef struct tcp_op tcp_op;

struct tcp_op {
    int kind, state;
    int peer;
    uint64_t tag;
    const void *sbuf;   /* send: the caller's buffer */
    void *rbuf;         /* receive: the caller's buffer */
    size_t len;         /* send: bytes; receive: capacity */
    size_t got;         /* receive: the message's length */
    comm_status st;     /* final status once ST_DONE (or the status an inflight send ends with) */
    atomic_int released; /* send: ZeroMQ let go of sbuf (its free callback ran) */
    int orphan;         /* send: the caller cancelled it; freed once released */
    tcp_op *prev, *next; /* in a peer's queue, the inflight list, or a channel's posted list */
    chan *ch;           /* receive: its channel while posted */
};

/* A message waiting for its receive. */
typedef struct umsg {
    struct umsg *next;
    zmq_msg_t data;
    uint64_t hash;      /* the sender's incarnation */
    int dst;
} umsg;

struct chan {
    chan *hnext;        /* hash chain */
    int peer;
    uint64_t tag;
    tcp_op *posted_head, *posted_tail;
    umsg *uq_head, *uq_tail;
    uint32_t skip;      /* messages to drop: receives cancelled before their message came */
    int discard;        /* drop everything */
    int remembered;     /* in the ring (kept alive until it leaves it) */
};

typedef struct {
    char *ep;           /* NULL when not live; owned */
    uint64_t hash;      /* of ep; 0 when not live */
    void *sock;         /* PUSH, or NULL */
    tcp_op *q_head, *q_tail; /* sends not handed to ZeroMQ yet */
} tcp_peer;

typedef struct {
    void *zctx;
    int own_ctx;
    void *pull;
    char endpoint[TCP_EP_MAX];
    int rank, size;
    uint64_t my_hash;
    tcp_peer *peers;    /* [size] */
    tcp_op *inflight_head, *inflight_tail; /* sends ZeroMQ holds */
    chan **buckets;
    size_t nbuckets, nchans;
    struct {
        int peer;
        uint64_t tag;
    } *ring;            /* [TCP_REMEMBER] remembered channels, oldest at ring_head */
    size_t ring_head, ring_n;
    uint64_t dropped;   /* messages dropped (discarded, cancelled, stale, malformed) */
} tcp_impl;

static const comm_ops tcp_ops;

static uint64_t fnv(const char *s)
{
    uint64_t h = 1469598103934665603ull;
    for (; s && *s; s++) {
        h ^= (unsigned char)*s;
        h *= 1099511628211ull;
    }
    return h ? h : 1;
}

static int live_ep(const char *e) { return e && *e; }

static void put_u32(unsigned char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static void put_u64(unsigned char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}
static uint32_t get_u32(const unsigned char *p)
{
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v |= (uint32_t)p[i] << (8 * i);
    return v;
}
static uint64_t get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 0; i < 8; i++) v |= (uint64_t)p[i] << (8 * i);
    return v;
}

/* ---- lists ------------------------------------------------------------------------------------ */

static void list_push(tcp_op **head, tcp_op **tail, tcp_op *op)
{
    op->prev = *tail;
    op->next = NULL;
    if (*tail)
        (*tail)->next = op;
    else
        *head = op;
    *tail = op;
}

static void list_del(tcp_op **head, tcp_op **tail, tcp_op *op)
{
    if (op->prev)
        op->prev->next = op->next;
    else
        *head = op->next;
    if (op->next)
        op->next->prev = op->prev;
    else
        *tail = op->prev;
    op->prev = op->next = NULL;
}

/* ---- channels --------------------------------------------------------------------------------- */

static size_t chan_slot(const tcp_impl *t, int peer, uint64_t tag)
{
    uint64_t x = tag * 0x9e3779b97f4a7c15ull ^ ((uint64_t)(uint32_t)peer * 0xc2b2ae3d27d4eb4full);
    x ^= x >> 29;
    return (size_t)x & (t->nbuckets - 1);
}

static chan *chan_find(const tcp_impl *t, int peer, uint64_t tag)
{
    for (chan *ch = t->buckets[chan_slot(t, peer, tag)]; ch; ch = ch->hnext)
        if (ch->peer == peer && ch->tag == tag) return ch;
    return NULL;
}

static int chan_grow(tcp_impl *t)
{
    size_t n = t->nbuckets * 2;
    chan **b = calloc(n, sizeof *b);
    if (!b) return -1;
    chan **old = t->buckets;
    size_t oldn = t->nbuckets;
    t->buckets = b;
    t->nbuckets = n;
    for (size_t i = 0; i < oldn; i++)
        while (old[i]) {
            chan *ch = old[i];
            old[i] = ch->hnext;
            size_t s = chan_slot(t, ch->peer, ch->tag);
            ch->hnext = b[s];
            b[s] = ch;
        }
    free(old);
    return 0;
}

static chan *chan_get(tcp_impl *t, int peer, uint64_t tag)
{
    chan *ch = chan_find(t, peer, tag);
    if (ch) return ch;
    if (t->nchans >= t->nbuckets && chan_grow(t) != 0) return NULL;
    ch = calloc(1, sizeof *ch);
    if (!ch) return NULL;
    ch->peer = peer;
    ch->tag = tag;
    size_t s = chan_slot(t, peer, tag);
    ch->hnext = t->buckets[s];
    t->buckets[s] = ch;
    t->nchans++;
    return ch;
}

static void umsg_free(umsg *m)
{
    zmq_msg_close(&m->data);
    free(m);
}

/* Free ch when it holds nothing and remembers nothing. */
static void chan_maybe_free(tcp_impl *t, chan *ch)
{
    if (ch->posted_head || ch->uq_head || ch->skip || ch->discard || ch->remembered) return;
    for (chan **p = &t->buckets[chan_slot(t, ch->peer, ch->tag)]; *p; p = &(*p)->hnext)
        if (*p == ch) {
            *p = ch->hnext;
            break;
        }
    t->nchans--;
    free(ch);
}

/* Put ch in the ring of remembered channels; the oldest one forgets its discard and skips. */
static void remember(tcp_impl *t, chan *ch)
{
    if (ch->remembered) return;
    if (t->ring_n == TCP_REMEMBER) {
        chan *old = chan_find(t, t->ring[t->ring_head].peer, t->ring[t->ring_head].tag);
        t->ring_head = (t->ring_head + 1) % TCP_REMEMBER;
        t->ring_n--;
        if (old) {
            old->remembered = 0;
            old->discard = 0;
            old->skip = 0;
            chan_maybe_free(t, old);
        }
    }
    size_t at = (t->ring_head + t->ring_n) % TCP_REMEMBER;
    t->ring[at].peer = ch->peer;
    t->ring[at].tag = ch->tag;
    t->ring_n++;
    ch->remembered = 1;
}

static void uq_drop_all(tcp_impl *t, chan *ch)
{
    while (ch->uq_head) {
        umsg *m = ch->uq_head;
        ch->uq_head = m->next;
        umsg_free(m);
        t->dropped++;
    }
    ch->uq_tail = NULL;
}

/* ---- receiving ---------------------------------------------------------------------------------- */

/* Can m (from src) be matched now: it names this rank and the incarnation of src that this
 * rank's world knows (0: a sender that did not know its own endpoint). */
static int matchable(const tcp_impl *t, int src, const umsg *m)
{
    if (m->dst != t->rank) return 0;
    if (m->hash == 0) return 1;
    return src >= 0 && src < t->size && t->peers[src].hash == m->hash;
}

/* Copy m into the posted receive op (or fail it with COMM_ERR_TRUNC); frees m. */
static void fill(tcp_impl *t, tcp_op *op, umsg *m)
{
    const size_t n = zmq_msg_size(&m->data);
    op->got = n;
    if (n > op->len) {
        op->st = COMM_ERR_TRUNC;
        t->dropped++;
    } else {
        if (n) memcpy(op->rbuf, zmq_msg_data(&m->data), n);
        op->st = COMM_OK;
    }
    op->state = ST_DONE;
    op->ch = NULL;
    umsg_free(m);
}

/* A message arrived: drop it, fill a posted receive, or queue it. Takes m. */
static void deliver(tcp_impl *t, int src, uint64_t tag, umsg *m)
{
    if (t->rank >= 0 && m->dst != t->rank) {
        umsg_free(m);
        t->dropped++;
        return;
    }
    chan *ch = chan_get(t, src, tag);
    if (!ch) { /* out of memory: lose the message rather than the process */
        umsg_free(m);
        t->dropped++;
        return;
    }
    if (ch->discard) {
        umsg_free(m);
        t->dropped++;
        return;
    }
    if (matchable(t, src, m)) {
        if (ch->skip) {
            ch->skip--;
            umsg_free(m);
            t->dropped++;
            return;
        }
        if (ch->posted_head) {
            tcp_op *op = ch->posted_head;
            list_del(&ch->posted_head, &ch->posted_tail, op);
            fill(t, op, m);
            chan_maybe_free(t, ch);
            return;
        }
    }
    m->next = NULL;
    if (ch->uq_tail)
        ch->uq_tail->next = m;
    else
        ch->uq_head = m;
    ch->uq_tail = m;
}

/* Read what the PULL socket holds (at most TCP_DRAIN_MAX messages). */
static void drain(tcp_impl *t)
{
    for (int k = 0; k < TCP_DRAIN_MAX; k++) {
        zmq_msg_t h;
        zmq_msg_init(&h);
        if (zmq_msg_recv(&h, t->pull, ZMQ_DONTWAIT) < 0) {
            zmq_msg_close(&h);
            return;
        }
        int more = zmq_msg_more(&h);
        const unsigned char *p = zmq_msg_data(&h);
        int ok = more && zmq_msg_size(&h) == TCP_HDR && get_u32(p) == TCP_MAGIC;
        int src = 0, dst = 0;
        uint64_t tag = 0, len = 0, hash = 0;
        if (ok) {
            src = (int)get_u32(p + 4);
            dst = (int)get_u32(p + 8);
            tag = get_u64(p + 16);
            len = get_u64(p + 24);
            hash = get_u64(p + 32);
        }
        zmq_msg_close(&h);
        umsg *m = NULL;
        if (more) {
            m = malloc(sizeof *m);
            zmq_msg_t sink, *d = m ? &m->data : &sink;
            zmq_msg_init(d);
            if (zmq_msg_recv(d, t->pull, ZMQ_DONTWAIT) < 0) ok = 0;
            more = zmq_msg_more(d);
            if (!m) {
                zmq_msg_close(&sink);
                ok = 0;
            }
            while (more) { /* not ours: skip the rest of the message */
                zmq_msg_t x;
                zmq_msg_init(&x);
                if (zmq_msg_recv(&x, t->pull, ZMQ_DONTWAIT) < 0) more = 0;
                else more = zmq_msg_more(&x);
                zmq_msg_close(&x);
                ok = 0;
            }
        }
        if (ok && zmq_msg_size(&m->data) != len) ok = 0;
        if (!ok || src < 0) {
            if (m) umsg_free(m);
            t->dropped++;
            continue;
        }
        m->hash = hash;
        m->dst = dst;
        deliver(t, src, tag, m);
    }
}

/* ---- sending ------------------------------------------------------------------------------------- */

static void free_cb(void *data, void *hint)
{
    (void)data;
    atomic_store_explicit(&((tcp_op *)hint)->released, 1, memory_order_release);
}

static int released(tcp_op *op)
{
    return atomic_load_explicit(&op->released, memory_order_acquire);
}

static void send_fail(comm_t *c, tcp_impl *t, tcp_op *op, const char *call, int err)
{
    tcp_peer *pe = &t->peers[op->peer];
    list_del(&pe->q_head, &pe->q_tail, op);
    op->state = ST_DONE;
    op->st = COMM_ERR_SYS;
    comm_set_error(c, "comm_isend(peer %d, tag %llu): %s: %s", op->peer,
                   (unsigned long long)op->tag, call, zmq_strerror(err));
}

/* Hand peer p's queued sends to ZeroMQ while it takes them. */
static void flush(comm_t *c, tcp_impl *t, int p)
{
    tcp_peer *pe = &t->peers[p];
    while (pe->q_head) {
        tcp_op *op = pe->q_head;
        unsigned char h[TCP_HDR] = {0};
        put_u32(h, TCP_MAGIC);
        put_u32(h + 4, (uint32_t)t->rank);
        put_u32(h + 8, (uint32_t)p);
        put_u64(h + 16, op->tag);
        put_u64(h + 24, op->len);
        put_u64(h + 32, t->my_hash);
        zmq_msg_t m;
        if (op->len == 0) {
            zmq_msg_init(&m);
        } else if (zmq_msg_init_data(&m, (void *)op->sbuf, op->len, free_cb, op) != 0) {
            send_fail(c, t, op, "zmq_msg_init_data", errno);
            continue;
        }
        /* The data frame cannot meet the high-water mark once the header went (ZeroMQ counts
         * whole messages); if it fails anyway, ZeroMQ rolls the header back. */
        const char *call = "zmq_send";
        int rc = zmq_send(pe->sock, h, TCP_HDR, ZMQ_SNDMORE | ZMQ_DONTWAIT);
        if (rc >= 0) {
            call = "zmq_msg_send";
            rc = zmq_msg_send(&m, pe->sock, ZMQ_DONTWAIT);
        }
        if (rc < 0) {
            const int e = errno;
            zmq_msg_close(&m); /* runs free_cb here and now: we are its only owner */
            atomic_store_explicit(&op->released, 0, memory_order_relaxed);
            if (e == EAGAIN || e == EINTR) return;
            send_fail(c, t, op, call, e);
            continue;
        }
        if (op->len == 0) atomic_store_explicit(&op->released, 1, memory_order_relaxed);
        list_del(&pe->q_head, &pe->q_tail, op);
        op->state = ST_INFLIGHT;
        list_push(&t->inflight_head, &t->inflight_tail, op);
    }
}

/* Sends ZeroMQ has released are done; orphans are freed. */
static void sweep(tcp_impl *t)
{
    for (tcp_op *op = t->inflight_head, *next; op; op = next) {
        next = op->next;
        if (!released(op)) continue;
        list_del(&t->inflight_head, &t->inflight_tail, op);
        if (op->orphan) {
            free(op);
            continue;
        }
        op->state = ST_DONE;
    }
}

static comm_status tcp_progress(comm_t *c, void *impl)
{
    tcp_impl *t = impl;
    drain(t);
    for (int p = 0; p < t->size; p++)
        if (t->peers[p].q_head) flush(c, t, p);
    sweep(t);
    return COMM_OK;
}

/* ---- the table ----------------------------------------------------------------------------------- */

static int tcp_rank(void *impl) { return ((tcp_impl *)impl)->rank; }
static int tcp_size(void *impl) { return ((tcp_impl *)impl)->size; }

static comm_status check_peer(comm_t *c, tcp_impl *t, const char *call, int peer, uint64_t tag)
{
    if (t->size == 0) {
        comm_set_error(c, "%s(peer %d, tag %llu): no world yet (comm_tcp_set_world)", call, peer,
                       (unsigned long long)tag);
        return COMM_ERR_PEER;
    }
    if (peer < 0 || peer >= t->size) {
        comm_set_error(c, "%s(peer %d, tag %llu): rank outside the world of %d", call, peer,
                       (unsigned long long)tag, t->size);
        return COMM_ERR_INVAL;
    }
    if (!t->peers[peer].ep || !t->peers[peer].sock) {
        comm_set_error(c, "%s(peer %d, tag %llu): the peer has no endpoint (not live)", call,
                       peer, (unsigned long long)tag);
        return COMM_ERR_PEER;
    }
    return COMM_OK;
}

static comm_status tcp_isend(comm_t *c, void *impl, int peer, uint64_t tag, const void *buf,
                             size_t len, void **out)
{
    tcp_impl *t = impl;
    comm_status st = check_peer(c, t, "comm_isend", peer, tag);
    if (st != COMM_OK) return st;
    tcp_op *op = calloc(1, sizeof *op);
    if (!op) {
        comm_set_error(c, "comm_isend(peer %d, tag %llu): out of memory", peer,
                       (unsigned long long)tag);
        return COMM_ERR_NOMEM;
    }
    op->kind = OP_SEND;
    op->state = ST_QUEUED;
    op->peer = peer;
    op->tag = tag;
    op->sbuf = buf;
    op->len = len;
    atomic_init(&op->released, 0);
    tcp_peer *pe = &t->peers[peer];
    list_push(&pe->q_head, &pe->q_tail, op);
    flush(c, t, peer);
    *out = op;
    return COMM_OK;
}

static comm_status tcp_irecv(comm_t *c, void *impl, int peer, uint64_t tag, void *buf, size_t cap,
                             void **out)
{
    tcp_impl *t = impl;
    comm_status st = check_peer(c, t, "comm_irecv", peer, tag);
    if (st != COMM_OK) return st;
    drain(t);
    chan *ch = chan_get(t, peer, tag);
    tcp_op *op = ch ? calloc(1, sizeof *op) : NULL;
    if (!op) {
        if (ch) chan_maybe_free(t, ch);
        comm_set_error(c, "comm_irecv(peer %d, tag %llu): out of memory", peer,
                       (unsigned long long)tag);
        return COMM_ERR_NOMEM;
    }
    if (ch->discard) {
        free(op);
        comm_set_error(c, "comm_irecv(peer %d, tag %llu): the pair was discarded (comm_discard)",
                       peer, (unsigned long long)tag);
        return COMM_ERR_INVAL;
    }
    op->kind = OP_RECV;
    op->peer = peer;
    op->tag = tag;
    op->rbuf = buf;
    op->len = cap;
    /* the first waiting message this rank can match, if no receive is posted before it */
    umsg *prev = NULL, *m = ch->posted_head ? NULL : ch->uq_head;
    while (m && !matchable(t, peer, m)) {
        prev = m;
        m = m->next;
    }
    if (m) {
        if (prev)
            prev->next = m->next;
        else
            ch->uq_head = m->next;
        if (ch->uq_tail == m) ch->uq_tail = prev;
        fill(t, op, m);
        chan_maybe_free(t, ch);
    } else {
        op->state = ST_POSTED;
        op->ch = ch;
        list_push(&ch->posted_head, &ch->posted_tail, op);
    }
    *out = op;
    return COMM_OK;
}

static comm_status tcp_test(comm_t *c, void *impl, void *opv, int *done, size_t *len)
{
    tcp_impl *t = impl;
    tcp_op *op = opv;
    (void)tcp_progress(c, t);
    *done = op->state == ST_DONE;
    *len = 0;
    if (!*done) return COMM_OK;
    if (op->st == COMM_OK) {
        *len = op->kind == OP_SEND ? op->len : op->got;
        return COMM_OK;
    }
    const char *dir = op->kind == OP_SEND ? "send to" : "receive from";
    switch (op->st) {
    case COMM_ERR_PEER:
        comm_set_error(c, "comm_test: %s peer %d tag %llu: the peer's endpoint was withdrawn or "
                       "changed (comm_tcp_set_world)", dir, op->peer, (unsigned long long)op->tag);
        break;
    case COMM_ERR_TRUNC:
        comm_set_error(c, "comm_test: receive from peer %d tag %llu: a %zu-byte message does not "
                       "fit in %zu bytes (dropped)", op->peer, (unsigned long long)op->tag,
                       op->got, op->len);
        break;
    default: /* COMM_ERR_SYS: the message was set when it failed */
        break;
    }
    return op->st;
}

/* Cancel or free op. */
static void tcp_cancel(comm_t *c, void *impl, void *opv)
{
    (void)c;
    tcp_impl *t = impl;
    tcp_op *op = opv;
    if (!op) return;
    switch (op->state) {
    case ST_QUEUED: {
        tcp_peer *pe = &t->peers[op->peer];
        list_del(&pe->q_head, &pe->q_tail, op);
        free(op);
        return;
    }
    case ST_INFLIGHT:
        if (released(op)) {
            list_del(&t->inflight_head, &t->inflight_tail, op);
            free(op);
        } else {
            op->orphan = 1; /* freed by sweep once ZeroMQ lets go of it */
        }
        return;
    case ST_POSTED: {
        chan *ch = op->ch;
        list_del(&ch->posted_head, &ch->posted_tail, op);
        ch->skip++;
        remember(t, ch);
        free(op);
        return;
    }
    default:
        free(op);
        return;
    }
}

static void tcp_discard(comm_t *c, void *impl, int peer, uint64_t tag)
{
    (void)c;
    tcp_impl *t = impl;
    drain(t);
    chan *ch = chan_get(t, peer, tag);
    if (!ch) return;
    ch->discard = 1;
    uq_drop_all(t, ch);
    remember(t, ch);
}

static void *tcp_zsock(void *impl) { return ((tcp_impl *)impl)->pull; }

static void close_sock(void **s)
{
    if (*s) {
        int zero = 0;
        zmq_setsockopt(*s, ZMQ_LINGER, &zero, sizeof zero);
        zmq_close(*s);
        *s = NULL;
    }
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void tcp_destroy(void *impl)
{
    tcp_impl *t = impl;
    if (!t) return;
    close_sock(&t->pull);
    for (int p = 0; p < t->size; p++) {
        close_sock(&t->peers[p].sock);
        while (t->peers[p].q_head) {
            tcp_op *op = t->peers[p].q_head;
            list_del(&t->peers[p].q_head, &t->peers[p].q_tail, op);
            free(op); /* only orphans can be here: comm_destroy freed the caller's handles */
        }
        free(t->peers[p].ep);
    }
    free(t->peers);
    if (t->own_ctx) {
        zmq_ctx_term(t->zctx); /* every message is closed when it returns */
    } else {
        for (int waited = 0; t->inflight_head && waited < TCP_CLOSE_WAIT_MS; waited++) {
            sweep(t);
            if (t->inflight_head) sleep_ms(1);
        }
    }
    sweep(t);
    /* whatever ZeroMQ still holds (a borrowed context that did not let go in time) must
     * outlive its callback: left allocated */
    for (size_t i = 0; i < t->nbuckets; i++)
        while (t->buckets[i]) {
            chan *ch = t->buckets[i];
            t->buckets[i] = ch->hnext;
            uq_drop_all(t, ch);
            while (ch->posted_head) {
                tcp_op *op = ch->posted_head;
                list_del(&ch->posted_head, &ch->posted_tail, op);
                free(op);
            }
            free(ch);
        }
    free(t->buckets);
    free(t->ring);
    free(t);
}

static const comm_ops tcp_ops = {
    .backend = COMM_BACKEND_TCP,
    .rank = tcp_rank,
    .size = tcp_size,
    .isend = tcp_isend,
    .irecv = tcp_irecv,
    .test = tcp_test,
    .cancel = tcp_cancel,
    .op_free = tcp_cancel,
    .discard = tcp_discard,
    .progress = tcp_progress,
    .zsock = tcp_zsock,
    .destroy = tcp_destroy,
};

/* ---- construction and the world ---------------------------------------------------------------- */

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

comm_status comm_tcp_new(const char *bind_endpoint, void *zctx, comm_t **out, char *err,
                         size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (!out || !bind_endpoint || strlen(bind_endpoint) >= TCP_EP_MAX - 8) {
        set_err(err, errlen, "comm_tcp_new: %s", !out ? "out is NULL" : "bad bind endpoint");
        return COMM_ERR_INVAL;
    }
    *out = NULL;
    tcp_impl *t = calloc(1, sizeof *t);
    if (t) {
        t->nbuckets = 64;
        t->buckets = calloc(t->nbuckets, sizeof *t->buckets);
        t->ring = calloc(TCP_REMEMBER, sizeof *t->ring);
    }
    if (!t || !t->buckets || !t->ring) {
        if (t) {
            free(t->buckets);
            free(t->ring);
        }
        free(t);
        set_err(err, errlen, "comm_tcp_new: out of memory");
        return COMM_ERR_NOMEM;
    }
    t->rank = -1;
    t->zctx = zctx;
    if (!t->zctx) {
        t->zctx = zmq_ctx_new();
        t->own_ctx = 1;
        if (!t->zctx) {
            set_err(err, errlen, "comm_tcp_new: zmq_ctx_new: %s", zmq_strerror(errno));
            tcp_destroy(t);
            return COMM_ERR_SYS;
        }
    }
    /* "tcp://host:0" means any free port: ZeroMQ spells it "*" */
    char ep[TCP_EP_MAX];
    snprintf(ep, sizeof ep, "%s", bind_endpoint);
    size_t n = strlen(ep);
    if (strncmp(ep, "tcp://", 6) == 0 && n > 2 && strcmp(ep + n - 2, ":0") == 0)
        ep[n - 1] = '*';
    t->pull = zmq_socket(t->zctx, ZMQ_PULL);
    int zero = 0, hwm = TCP_HWM;
    if (!t->pull || zmq_setsockopt(t->pull, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
        zmq_setsockopt(t->pull, ZMQ_RCVHWM, &hwm, sizeof hwm) != 0) {
        set_err(err, errlen, "comm_tcp_new: PULL socket: %s", zmq_strerror(errno));
        tcp_destroy(t);
        return COMM_ERR_SYS;
    }
    if (zmq_bind(t->pull, ep) != 0) {
        set_err(err, errlen, "comm_tcp_new: zmq_bind(%s): %s", bind_endpoint, zmq_strerror(errno));
        tcp_destroy(t);
        return COMM_ERR_SYS;
    }
    char last[TCP_EP_MAX];
    size_t ll = sizeof last;
    if (zmq_getsockopt(t->pull, ZMQ_LAST_ENDPOINT, last, &ll) != 0) {
        set_err(err, errlen, "comm_tcp_new: ZMQ_LAST_ENDPOINT of %s: %s", bind_endpoint,
                zmq_strerror(errno));
        tcp_destroy(t);
        return COMM_ERR_SYS;
    }
    static const char *const wild[] = {"tcp://0.0.0.0:", "tcp://[::]:", "tcp://*:"};
    const char *host = NULL;
    for (size_t i = 0; i < sizeof wild / sizeof *wild && !host; i++)
        if (strncmp(last, wild[i], strlen(wild[i])) == 0) host = last + strlen(wild[i]);
    if (host)
        snprintf(t->endpoint, sizeof t->endpoint, "tcp://127.0.0.1:%s", host);
    else
        snprintf(t->endpoint, sizeof t->endpoint, "%s", last);
    comm_status st = comm_wrap(&tcp_ops, t, out);
    if (st != COMM_OK) set_err(err, errlen, "comm_tcp_new: %s", comm_strerror(st));
    return st;
}

const char *comm_tcp_endpoint(const comm_t *c)
{
    tcp_impl *t = comm_impl_of(c, &tcp_ops);
    return t ? t->endpoint : NULL;
}

/* Peer p's endpoint is gone or changed: its operations end with COMM_ERR_PEER, its PUSH is
 * closed (ZeroMQ drops what it still holds) and its messages from other incarnations than
 * new_hash are dropped. */
static void withdraw(tcp_impl *t, int p, uint64_t new_hash)
{
    tcp_peer *pe = &t->peers[p];
    sweep(t); /* sends ZeroMQ already let go of are done, and ok */
    close_sock(&pe->sock);
    while (pe->q_head) {
        tcp_op *op = pe->q_head;
        list_del(&pe->q_head, &pe->q_tail, op);
        op->state = ST_DONE;
        op->st = COMM_ERR_PEER;
    }
    for (tcp_op *op = t->inflight_head; op; op = op->next)
        if (op->peer == p) op->st = COMM_ERR_PEER; /* done once ZeroMQ lets go of it */
    for (size_t i = 0; i < t->nbuckets; i++)
        for (chan *ch = t->buckets[i], *next; ch; ch = next) {
            next = ch->hnext;
            if (ch->peer != p) continue;
            while (ch->posted_head) {
                tcp_op *op = ch->posted_head;
                list_del(&ch->posted_head, &ch->posted_tail, op);
                op->state = ST_DONE;
                op->st = COMM_ERR_PEER;
                op->ch = NULL;
            }
            umsg *keep = NULL, **tail = &keep;
            while (ch->uq_head) {
                umsg *m = ch->uq_head;
                ch->uq_head = m->next;
                m->next = NULL;
                if (new_hash && m->hash == new_hash) {
                    *tail = m;
                    tail = &m->next;
                } else {
                    umsg_free(m);
                    t->dropped++;
                }
            }
            ch->uq_head = keep;
            ch->uq_tail = NULL;
            for (umsg *m = keep; m; m = m->next) ch->uq_tail = m;
            ch->skip = 0;
            chan_maybe_free(t, ch);
        }
    free(pe->ep);
    pe->ep = NULL;
    pe->hash = 0;
}

comm_status comm_tcp_set_world(comm_t *c, int rank, int world_size,
                               const char *const *endpoints)
{
    tcp_impl *t = comm_impl_of(c, &tcp_ops);
    if (!t) {
        if (c) comm_set_error(c, "comm_tcp_set_world: not a tcp comm");
        return COMM_ERR_INVAL;
    }
    if (world_size < 1 || rank < 0 || rank >= world_size || !endpoints) {
        comm_set_error(c, "comm_tcp_set_world: bad world (rank %d of %d%s)", rank, world_size,
                       endpoints ? "" : ", endpoints NULL");
        return COMM_ERR_INVAL;
    }
    for (int p = 0; p < world_size; p++)
        if (live_ep(endpoints[p]) && strlen(endpoints[p]) >= TCP_EP_MAX) {
            comm_set_error(c, "comm_tcp_set_world: endpoint of rank %d is too long", p);
            return COMM_ERR_INVAL;
        }
    drain(t); /* what came from the old world is sorted before the world changes */
    const int rank_changed = t->rank != rank;
    /* peers beyond the new world go first */
    for (int p = world_size; p < t->size; p++) withdraw(t, p, 0);
    if (world_size != t->size) {
        /* orphans and queued sends hold peer indices only while their peer exists: the
         * withdrawn ones were emptied above */
        tcp_peer *np = realloc(t->peers, (size_t)world_size * sizeof *np);
        if (!np) {
            comm_set_error(c, "comm_tcp_set_world: out of memory");
            if (world_size < t->size) t->size = world_size;
            return COMM_ERR_NOMEM;
        }
        for (int p = t->size; p < world_size; p++) memset(&np[p], 0, sizeof np[p]);
        t->peers = np;
    }
    const int old_size = t->size;
    t->size = world_size;
    t->rank = rank;
    t->my_hash = live_ep(endpoints[rank]) ? fnv(endpoints[rank]) : 0;
    comm_status st = COMM_OK;
    for (int p = 0; p < world_size; p++) {
        tcp_peer *pe = &t->peers[p];
        const char *e = live_ep(endpoints[p]) ? endpoints[p] : NULL;
        const int same = (!e && !pe->ep) || (e && pe->ep && strcmp(e, pe->ep) == 0);
        if (same && !rank_changed && (pe->sock || !e)) continue;
        if (p < old_size) withdraw(t, p, e ? fnv(e) : 0);
        if (!e) continue;
        pe->ep = strdup(e);
        pe->hash = fnv(e);
        void *s = zmq_socket(t->zctx, ZMQ_PUSH);
        int zero = 0, hwm = TCP_HWM;
        if (!pe->ep || !s || zmq_setsockopt(s, ZMQ_LINGER, &zero, sizeof zero) != 0 ||
            zmq_setsockopt(s, ZMQ_SNDHWM, &hwm, sizeof hwm) != 0 || zmq_connect(s, e) != 0) {
            comm_set_error(c, "comm_tcp_set_world: rank %d at %s: %s", p, e,
                           pe->ep ? zmq_strerror(errno) : "out of memory");
            if (s) close_sock(&s);
            free(pe->ep);
            pe->ep = NULL;
            pe->hash = 0;
            st = COMM_ERR_SYS;
            continue;
        }
        pe->sock = s;
    }
    if (rank_changed) /* messages queued for another rank number of this process */
        for (size_t i = 0; i < t->nbuckets; i++)
            for (chan *ch = t->buckets[i], *next; ch; ch = next) {
                next = ch->hnext;
                umsg *keep = NULL, **tail = &keep;
                while (ch->uq_head) {
                    umsg *m = ch->uq_head;
                    ch->uq_head = m->next;
                    m->next = NULL;
                    if (m->dst == rank) {
                        *tail = m;
                        tail = &m->next;
                    } else {
                        umsg_free(m);
                        t->dropped++;
                    }
                }
                ch->uq_head = keep;
                ch->uq_tail = NULL;
                for (umsg *m = keep; m; m = m->next) ch->uq_tail = m;
                chan_maybe_free(t, ch);
            }
    return st;
}
