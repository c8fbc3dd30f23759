/* worker/xfer.c: KV transfers over comm/ (see xfer.h). */
#include "worker/xfer.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XF_ALIGN 64 /* each message's slot in a transfer's buffer */
/* Transfer buffers are kept for reuse: a fresh buffer of tens or hundreds of MB costs a page
 * fault per 4 KiB on first touch, which bench_comm's KV table showed to cost more than the
 * copies themselves. At most XF_SPARES buffers and XF_SPARE_BYTES are kept. */
#define XF_SPARES 4
#define XF_SPARE_BYTES ((size_t)512 << 20)

/* One message slot: a layer's KV for one peer. */
typedef struct {
    int peer, head0, n_heads; /* the peer and the heads both sides hold */
} xf_link;

typedef struct xf {
    int64_t xfer;
    uint64_t rid;
    int send;           /* 1: prefill side */
    int complete;       /* recv: all arrived; send: every op posted and done */
    int seq;            /* recv: the KV sequence (owned), else -1 */
    int n_tokens, tok0; /* context tokens; first position moved */
    int first_block;    /* send */
    xf_link *links;     /* [n_links] */
    int n_links;
    int n_layers;
    uint8_t *buf;       /* [buf_cap] slots */
    size_t buf_cap;
    size_t *off, *len;  /* [n_layers * n_links] slot offset and message bytes (checksum included) */
    comm_op_t **ops;    /* [n_layers * n_links] */
    uint8_t *done;      /* [n_layers * n_links] */
    int n_slots, n_done, n_posted;
    int layers_shipped; /* send: layers packed and posted */
    int64_t deadline, lease_ms;
    double t0;
    double t_last;      /* send: when the last layer was posted (the prefill's compute is done) */
    size_t bytes;
    struct xf *next;
} xf;

struct xfer_engine {
    kv_cache_t *kv;
    comm_t *comm;
    int n_layers, head0, n_heads, block_tokens;
    xf *head;          /* transfers in flight */
    xf *zombies;       /* abandoned sends whose operations the transport still holds */
    xf *orphans;       /* such sends of a previous comm: freed at xfer_destroy */
    xfer_event *ev;    /* queued events [ev_head, ev_len) */
    int ev_head, ev_len, ev_cap;
    xfer_stats st;
    int drop_layer;    /* fault injection (DUET_FAULT_DROP_LAYER): never send this layer, or -1 */
    struct {
        uint8_t *p;
        size_t cap;
    } spare[XF_SPARES]; /* buffers kept for reuse (no transport holds them) */
    size_t spare_bytes;
};

static double mono_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
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

uint64_t xfer_checksum(const void *p, size_t len)
{
    /* Four independent multiply-xor lanes over 8-byte words (fast enough to hash tens of
     * MB per request), then the tail, then a final mix. Not cryptographic: it catches
     * corrupted, truncated or misplaced buffers. */
    const uint8_t *b = p;
    uint64_t h[4] = {0x9e3779b97f4a7c15ull ^ len, 0xc2b2ae3d27d4eb4full, 0x165667b19e3779f9ull,
                     0x27d4eb2f165667c5ull};
    const uint64_t m = 0xff51afd7ed558ccdull;
    size_t i = 0;
    for (; i + 32 <= len; i += 32)
        for (int k = 0; k < 4; k++) {
            uint64_t w;
            memcpy(&w, b + i + 8 * k, 8);
            h[k] = (h[k] ^ w) * m;
            h[k] ^= h[k] >> 31;
        }
    uint64_t t = 0;
    for (int s = 0; i < len; i++, s = (s + 8) & 63) t ^= (uint64_t)b[i] << s;
    uint64_t r = h[0] ^ (h[1] * 3) ^ (h[2] * 5) ^ (h[3] * 7) ^ t;
    r ^= r >> 33;
    r *= 0xc4ceb9fe1a85ec53ull;
    r ^= r >> 33;
    return r ? r : 1; /* 0 on the wire means "not computed" */
}

/* ---- events ------------------------------------------------------------------------------ */

static xfer_event *push_ev(xfer_t *x, xfer_event_type type, const xf *t)
{
    if (x->ev_head > 0 && x->ev_head == x->ev_len) x->ev_head = x->ev_len = 0;
    if (x->ev_len == x->ev_cap) {
        if (x->ev_head > 0) {
            memmove(x->ev, x->ev + x->ev_head, (size_t)(x->ev_len - x->ev_head) * sizeof *x->ev);
            x->ev_len -= x->ev_head;
            x->ev_head = 0;
        }
        if (x->ev_len == x->ev_cap) {
            int cap = x->ev_cap ? 2 * x->ev_cap : 16;
            xfer_event *e = realloc(x->ev, (size_t)cap * sizeof *e);
            if (!e) return NULL; /* the event is lost; the transfer is freed anyway */
            x->ev = e;
            x->ev_cap = cap;
        }
    }
    xfer_event *e = &x->ev[x->ev_len++];
    memset(e, 0, sizeof *e);
    e->type = type;
    e->xfer = t->xfer;
    e->rid = t->rid;
    e->n_tokens = t->n_tokens;
    e->tok0 = t->tok0;
    e->bytes = t->bytes;
    const double now = mono_ms();
    e->ms = t->t0 > 0 ? now - t->t0 : 0;
    e->tail_ms = t->send && t->t_last > 0 ? now - t->t_last : 0;
    return e;
}

int xfer_next_event(xfer_t *x, xfer_event *ev)
{
    if (!x || x->ev_head >= x->ev_len) return 0;
    *ev = x->ev[x->ev_head++];
    return 1;
}

/* ---- transfers --------------------------------------------------------------------------- */

static xf *find(const xfer_t *x, int64_t id)
{
    for (xf *t = x->head; t; t = t->next)
        if (t->xfer == id) return t;
    return NULL;
}

static void unlink_xf(xfer_t *x, xf *t)
{
    for (xf **p = &x->head; *p; p = &(*p)->next)
        if (*p == t) {
            *p = t->next;
            t->next = NULL;
            return;
        }
}

/* A buffer of at least size bytes: the smallest spare that fits, or a new one. */
static uint8_t *buf_get(xfer_t *x, size_t size, size_t *cap)
{
    int best = -1;
    for (int i = 0; i < XF_SPARES; i++)
        if (x->spare[i].p && x->spare[i].cap >= size && (best < 0 || x->spare[i].cap < x->spare[best].cap))
            best = i;
    if (best >= 0) {
        uint8_t *p = x->spare[best].p;
        *cap = x->spare[best].cap;
        x->spare_bytes -= *cap;
        x->spare[best].p = NULL;
        x->spare[best].cap = 0;
        return p;
    }
    *cap = size;
    return aligned_alloc(XF_ALIGN, size);
}

/* Keep a buffer that no transport holds any more for reuse, or free it: a free slot, else
 * the place of a smaller spare, within XF_SPARE_BYTES. */
static void buf_put(xfer_t *x, uint8_t *p, size_t cap)
{
    if (!p) return;
    if (!x) {
        free(p);
        return;
    }
    int slot = -1;
    for (int i = 0; i < XF_SPARES && slot < 0; i++)
        if (!x->spare[i].p) slot = i;
    if (slot < 0)
        for (int i = 0; i < XF_SPARES; i++)
            if (x->spare[i].cap < cap && (slot < 0 || x->spare[i].cap < x->spare[slot].cap)) slot = i;
    if (slot < 0 || x->spare_bytes - x->spare[slot].cap + cap > XF_SPARE_BYTES) {
        free(p);
        return;
    }
    if (x->spare[slot].p) {
        x->spare_bytes -= x->spare[slot].cap;
        free(x->spare[slot].p);
    }
    x->spare[slot].p = p;
    x->spare[slot].cap = cap;
    x->spare_bytes += cap;
}

/* Free t; its buffer goes to x's spares (x NULL: freed). */
static void free_xf(xfer_t *x, xf *t)
{
    if (!t) return;
    free(t->links);
    buf_put(x, t->buf, t->buf_cap);
    free(t->off);
    free(t->len);
    free(t->ops);
    free(t->done);
    free(t);
}

/* Sends still held by the transport. */
static int sends_pending(const xf *t)
{
    if (!t->ops || !t->done) return 0;
    for (int i = 0; i < t->n_slots; i++)
        if (t->ops[i] && !t->done[i]) return 1;
    return 0;
}

/* Drop t (already unlinked): receives cancelled and their messages discarded, the KV
 * sequence freed; sends that the transport still holds keep their buffer alive as a
 * zombie until they finish. */
static void drop_xf(xfer_t *x, xf *t)
{
    if (t->send && x->comm && sends_pending(t)) {
        t->next = x->zombies;
        x->zombies = t;
        return;
    }
    for (int i = 0; t->ops && t->done && i < t->n_slots; i++)
        if (t->ops[i]) {
            if (x->comm) {
                if (t->done[i])
                    comm_op_free(x->comm, &t->ops[i]);
                else
                    comm_cancel(x->comm, &t->ops[i]);
            }
            t->ops[i] = NULL;
        }
    if (!t->send && x->comm && !t->complete)
        for (int k = 0; k < t->n_links; k++) comm_discard(x->comm, t->links[k].peer, (uint64_t)t->xfer);
    if (t->seq >= 0) {
        kv_seq_free(x->kv, t->seq);
        t->seq = -1;
    }
    free_xf(x, t);
}

static void fail_xf(xfer_t *x, xf *t, xfer_event_type type, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void fail_xf(xfer_t *x, xf *t, xfer_event_type type, const char *fmt, ...)
{
    xfer_event *e = push_ev(x, type, t);
    if (e) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->msg, sizeof e->msg, fmt, ap);
        va_end(ap);
    }
    if (type == XFER_EV_EXPIRED)
        x->st.expired++;
    else
        x->st.failed++;
    unlink_xf(x, t);
    drop_xf(x, t);
}

/* The heads that two ranges share: 0 when none. */
static int overlap(int a0, int an, int b0, int bn, int *h0, int *hn)
{
    int lo = a0 > b0 ? a0 : b0, hi = a0 + an < b0 + bn ? a0 + an : b0 + bn;
    if (hi <= lo) return 0;
    *h0 = lo;
    *hn = hi - lo;
    return 1;
}

/* Links to the peers whose heads overlap this shard. */
static xfer_status make_links(xfer_t *x, xf *t, const xfer_peer *p, int n_p, char *err,
                              size_t errlen)
{
    if (n_p < 1) {
        set_err(err, errlen, "transfer %lld: no peer ranks", (long long)t->xfer);
        return XFER_ERR_INVAL;
    }
    if (!(t->links = calloc((size_t)n_p, sizeof *t->links))) return XFER_ERR_NOMEM;
    for (int i = 0; i < n_p; i++) {
        int h0, hn;
        if (p[i].rank < 0 || p[i].n_heads < 1) {
            set_err(err, errlen, "transfer %lld: peer %d has rank %d and %d heads",
                    (long long)t->xfer, i, p[i].rank, p[i].n_heads);
            return XFER_ERR_INVAL;
        }
        if (overlap(x->head0, x->n_heads, p[i].head0, p[i].n_heads, &h0, &hn))
            t->links[t->n_links++] = (xf_link){.peer = p[i].rank, .head0 = h0, .n_heads = hn};
    }
    if (t->n_links == 0) {
        set_err(err, errlen,
                "transfer %lld: no peer holds any of this rank's KV heads [%d, %d)",
                (long long)t->xfer, x->head0, x->head0 + x->n_heads);
        return XFER_ERR_INVAL;
    }
    return XFER_OK;
}

/* A slot per layer and link, and the buffer behind them (n_tokens and tok0 known). */
static xfer_status make_slots(xfer_t *x, xf *t, char *err, size_t errlen)
{
    t->n_layers = x->n_layers;
    t->n_slots = t->n_layers * t->n_links;
    t->off = calloc((size_t)t->n_slots, sizeof *t->off);
    t->len = calloc((size_t)t->n_slots, sizeof *t->len);
    t->ops = calloc((size_t)t->n_slots, sizeof *t->ops);
    t->done = calloc((size_t)t->n_slots, 1);
    if (!t->off || !t->len || !t->ops || !t->done) return XFER_ERR_NOMEM;
    const int n_tok = t->n_tokens - t->tok0;
    size_t total = 0;
    for (int l = 0; l < t->n_layers; l++)
        for (int k = 0; k < t->n_links; k++) {
            int s = l * t->n_links + k;
            size_t b = n_tok > 0 ? kv_pack_range_size(x->kv, l, 1, t->links[k].head0,
                                                      t->links[k].n_heads, n_tok)
                                 : 0;
            if (n_tok > 0 && b == 0) {
                set_err(err, errlen, "transfer %lld: bad range (layer %d, heads [%d, +%d))",
                        (long long)t->xfer, l, t->links[k].head0, t->links[k].n_heads);
                return XFER_ERR_INVAL;
            }
            t->off[s] = total;
            t->len[s] = b + sizeof(uint64_t);
            total += (t->len[s] + XF_ALIGN - 1) / XF_ALIGN * XF_ALIGN;
        }
    if (n_tok > 0 && !(t->buf = buf_get(x, total, &t->buf_cap))) return XFER_ERR_NOMEM;
    return XFER_OK;
}

/* ---- the engine ------------------------------------------------------------------------- */

xfer_status xfer_new(kv_cache_t *kv, xfer_t **out)
{
    if (!out) return XFER_ERR_INVAL;
    *out = NULL;
    if (!kv) return XFER_ERR_INVAL;
    xfer_t *x = calloc(1, sizeof *x);
    if (!x) return XFER_ERR_NOMEM;
    const kv_config *kc = kv_config_of(kv);
    x->kv = kv;
    x->n_layers = kc->n_layers;
    x->head0 = kc->kv_head0;
    x->n_heads = kc->n_kv_heads;
    x->block_tokens = kc->block_tokens;
    const char *fault = getenv("DUET_FAULT_DROP_LAYER");
    x->drop_layer = fault && *fault ? atoi(fault) : -1;
    *out = x;
    return XFER_OK;
}

static void drop_all(xfer_t *x, int with_events, const char *why)
{
    while (x->head) {
        xf *t = x->head;
        if (with_events)
            fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: %s", (long long)t->xfer, why);
        else {
            unlink_xf(x, t);
            drop_xf(x, t);
        }
    }
}

/* Free the zombies whose sends the transport has finished with. */
static void reap_zombies(xfer_t *x)
{
    for (xf **p = &x->zombies; *p;) {
        xf *t = *p;
        int busy = 0;
        for (int i = 0; i < t->n_slots; i++) {
            if (!t->ops[i] || t->done[i]) continue;
            int d = 0;
            if (x->comm && comm_test(x->comm, t->ops[i], &d, NULL) != COMM_OK) d = 1;
            if (d)
                t->done[i] = 1;
            else
                busy = 1;
        }
        if (busy) {
            p = &t->next;
            continue;
        }
        *p = t->next;
        t->next = NULL;
        for (int i = 0; i < t->n_slots; i++)
            if (t->ops[i] && x->comm) comm_op_free(x->comm, &t->ops[i]);
        free_xf(x, t);
    }
}

void xfer_destroy(xfer_t **self_p)
{
    if (!self_p || !*self_p) return;
    xfer_t *x = *self_p;
    drop_all(x, 0, "");
    reap_zombies(x);
    /* what is left: sends the transport still holds (the caller destroys the comm after
     * xfer_set_comm(NULL) and before this, so the transport has let go), and orphans of an
     * earlier comm: their handles died with their comm, their buffers go now */
    while (x->zombies) {
        xf *t = x->zombies;
        x->zombies = t->next;
        if (x->comm)
            for (int i = 0; i < t->n_slots; i++)
                if (t->ops[i]) comm_cancel(x->comm, &t->ops[i]);
        free_xf(NULL, t);
    }
    while (x->orphans) {
        xf *t = x->orphans;
        x->orphans = t->next;
        free_xf(NULL, t);
    }
    for (int i = 0; i < XF_SPARES; i++) free(x->spare[i].p);
    free(x->ev);
    free(x);
    *self_p = NULL;
}

void xfer_set_comm(xfer_t *x, comm_t *comm)
{
    if (!x || x->comm == comm) return;
    if (x->comm) {
        drop_all(x, 1, "the data plane changed");
        reap_zombies(x);
        /* sends the old transport still holds keep their buffers until xfer_destroy (the
         * old comm must be destroyed before that); their handles are never used again */
        while (x->zombies) {
            xf *t = x->zombies;
            x->zombies = t->next;
            t->next = x->orphans;
            x->orphans = t;
        }
    }
    x->comm = comm;
}

int xfer_holds(const xfer_t *x, int64_t id) { return x && find(x, id) != NULL; }

void xfer_clear(xfer_t *x)
{
    if (x) drop_all(x, 0, "");
}

int xfer_busy(const xfer_t *x)
{
    int n = 0;
    for (const xf *t = x ? x->head : NULL; t; t = t->next) n++;
    return n;
}

void xfer_get_stats(const xfer_t *x, xfer_stats *out)
{
    *out = x->st;
    out->in_flight = 0;
    out->blocks_reserved = 0;
    for (const xf *t = x->head; t; t = t->next) {
        out->in_flight++;
        if (t->seq >= 0) {
            int nb = 0;
            kv_seq_blocks(x->kv, t->seq, &nb);
            out->blocks_reserved += nb;
        }
    }
}

/* ---- decode side -------------------------------------------------------------------------- */

xfer_status xfer_reserve(xfer_t *x, int64_t id, uint64_t rid, const int32_t *ctx, int n,
                         const xfer_peer *src, int n_src, int lease_ms, int *cached,
                         char *err, size_t errlen)
{
    if (!x || !ctx || n < 1 || !src || !cached || id < 1) {
        set_err(err, errlen, "reserve: bad arguments");
        return XFER_ERR_INVAL;
    }
    if (find(x, id)) {
        set_err(err, errlen, "reserve: transfer %lld is already held here", (long long)id);
        return XFER_ERR_INVAL;
    }
    if (!x->comm) {
        set_err(err, errlen, "reserve: transfer %lld: no data plane yet (comm_init not received)",
                (long long)id);
        return XFER_ERR_COMM;
    }
    xf *t = calloc(1, sizeof *t);
    if (!t) return XFER_ERR_NOMEM;
    t->xfer = id;
    t->rid = rid;
    t->seq = -1;
    t->n_tokens = n;
    t->t0 = mono_ms();
    t->deadline = INT64_MAX; /* until the first message lands or xfer_expect */
    t->lease_ms = lease_ms > 0 ? lease_ms : 1;
    xfer_status rc = XFER_OK;
    int seq, c = 0;
    if (kv_seq_new(x->kv, &seq) != KV_OK) {
        set_err(err, errlen, "reserve: transfer %lld: no free KV sequence slot", (long long)id);
        rc = XFER_ERR_FULL;
        goto fail;
    }
    t->seq = seq;
    if (kv_prefix_attach(x->kv, seq, ctx, n, &c) != KV_OK) {
        set_err(err, errlen, "reserve: transfer %lld: prefix attach failed", (long long)id);
        rc = XFER_ERR_INVAL;
        goto fail;
    }
    t->tok0 = c;
    /* room for the rest and for the first decoded token */
    int need = kv_blocks_needed(x->kv, seq, n - c + 1);
    if (!kv_can_append(x->kv, seq, n - c + 1) || kv_seq_append(x->kv, seq, ctx + c, n - c) != KV_OK) {
        set_err(err, errlen,
                "reserve: transfer %lld: %d KV blocks needed for %d tokens, %d free after "
                "eviction", (long long)id, need, n - c, kv_free_blocks(x->kv) +
                kv_evictable_blocks(x->kv));
        rc = XFER_ERR_FULL;
        goto fail;
    }
    rc = make_links(x, t, src, n_src, err, errlen);
    if (rc == XFER_OK) rc = make_slots(x, t, err, errlen);
    if (rc != XFER_OK) goto fail;
    if (n - c > 0) {
        for (int s = 0; s < t->n_slots; s++) {
            const xf_link *lk = &t->links[s % t->n_links];
            comm_status cs = comm_irecv(x->comm, lk->peer, (uint64_t)id, t->buf + t->off[s],
                                        t->len[s], &t->ops[s]);
            if (cs != COMM_OK) {
                set_err(err, errlen, "reserve: transfer %lld: receive from rank %d: %s: %s",
                        (long long)id, lk->peer, comm_strerror(cs), comm_last_error(x->comm));
                rc = XFER_ERR_COMM;
                goto fail;
            }
            t->n_posted++;
        }
    } else {
        t->complete = 1;
        t->deadline = (int64_t)mono_ms() + t->lease_ms;
        push_ev(x, XFER_EV_RECEIVED, t);
        x->st.received++;
    }
    *cached = c;
    t->next = x->head;
    x->head = t;
    return XFER_OK;
fail:
    drop_xf(x, t);
    return rc;
}

int xfer_received(const xfer_t *x, int64_t id)
{
    const xf *t = x ? find(x, id) : NULL;
    return t && !t->send && t->complete;
}

xfer_status xfer_take(xfer_t *x, int64_t id, int *seq, int *n_tokens)
{
    xf *t = x ? find(x, id) : NULL;
    if (!t || t->send || !t->complete || !seq || !n_tokens) return XFER_ERR_INVAL;
    kv_seq_commit(x->kv, t->seq, t->n_tokens);
    *seq = t->seq;
    *n_tokens = t->n_tokens;
    t->seq = -1;
    unlink_xf(x, t);
    drop_xf(x, t);
    return XFER_OK;
}

/* A receive finished: check and unpack it. 0, or -1 (t failed and is freed). */
static int land(xfer_t *x, xf *t, int s, size_t got)
{
    const int l = s / t->n_links;
    const xf_link *lk = &t->links[s % t->n_links];
    if (got != t->len[s]) {
        fail_xf(x, t, XFER_EV_FAILED,
                "transfer %lld: layer %d from rank %d: %zu bytes arrived, %zu expected",
                (long long)t->xfer, l, lk->peer, got, t->len[s]);
        return -1;
    }
    const uint8_t *p = t->buf + t->off[s];
    const size_t body = t->len[s] - sizeof(uint64_t);
#ifndef NDEBUG
    uint64_t sum;
    memcpy(&sum, p + body, sizeof sum);
    if (sum != 0 && sum != xfer_checksum(p, body)) {
        fail_xf(x, t, XFER_EV_FAILED,
                "transfer %lld: layer %d from rank %d: checksum mismatch (the KV that arrived "
                "is not the KV that left)", (long long)t->xfer, l, lk->peer);
        return -1;
    }
#endif
    kv_status ks = kv_unpack_range(x->kv, t->seq, l, 1, lk->head0, lk->n_heads, t->tok0,
                                   t->n_tokens - t->tok0, p, body);
    if (ks != KV_OK) {
        fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: layer %d from rank %d: unpack: %s",
                (long long)t->xfer, l, lk->peer, kv_strerror(ks));
        return -1;
    }
    t->bytes += body;
    return 0;
}

/* ---- prefill side ----------------------------------------------------------------------- */

xfer_status xfer_send_begin(xfer_t *x, int64_t id, uint64_t rid, const xfer_peer *dst, int n_dst,
                            int first_block, int lease_ms, char *err, size_t errlen)
{
    if (!x || !dst || id < 1 || first_block < 0) {
        set_err(err, errlen, "transfer: bad arguments");
        return XFER_ERR_INVAL;
    }
    if (find(x, id) || xfer_of_rid(x, rid)) {
        set_err(err, errlen, "transfer %lld (rid %llu) is already held here", (long long)id,
                (unsigned long long)rid);
        return XFER_ERR_INVAL;
    }
    if (!x->comm) {
        set_err(err, errlen, "transfer %lld: no data plane yet (comm_init not received)",
                (long long)id);
        return XFER_ERR_COMM;
    }
    xf *t = calloc(1, sizeof *t);
    if (!t) return XFER_ERR_NOMEM;
    t->xfer = id;
    t->rid = rid;
    t->send = 1;
    t->seq = -1;
    t->first_block = first_block;
    t->deadline = INT64_MAX; /* until the first layer ships */
    t->lease_ms = lease_ms > 0 ? lease_ms : 1;
    xfer_status rc = make_links(x, t, dst, n_dst, err, errlen);
    if (rc != XFER_OK) {
        free_xf(x, t);
        return rc;
    }
    t->next = x->head;
    x->head = t;
    return XFER_OK;
}

int64_t xfer_of_rid(const xfer_t *x, uint64_t rid)
{
    for (const xf *t = x ? x->head : NULL; t; t = t->next)
        if (t->send && t->rid == rid) return t->xfer;
    return 0;
}

void xfer_ship(xfer_t *x, int64_t id, int seq, int layer, int n_tokens)
{
    xf *t = x ? find(x, id) : NULL;
    if (!t || !t->send || t->complete) return;
    if (layer != t->layers_shipped) {
        fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: layer %d shipped after %d layers",
                (long long)id, layer, t->layers_shipped);
        return;
    }
    char err[160];
    if (layer == 0) {
        t->t0 = mono_ms();
        t->deadline = (int64_t)t->t0 + t->lease_ms;
        t->n_tokens = n_tokens;
        t->tok0 = t->first_block * x->block_tokens;
        if (t->tok0 > n_tokens) t->tok0 = n_tokens;
        xfer_status rc = make_slots(x, t, err, sizeof err);
        if (rc != XFER_OK) {
            fail_xf(x, t, XFER_EV_FAILED, "%s", rc == XFER_ERR_NOMEM ? "out of memory" : err);
            return;
        }
    } else if (n_tokens != t->n_tokens) {
        fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: layer %d has %d tokens, layer 0 had %d",
                (long long)id, layer, n_tokens, t->n_tokens);
        return;
    }
    const int n_tok = t->n_tokens - t->tok0;
    t->layers_shipped++;
    if (t->layers_shipped == t->n_layers) t->t_last = mono_ms();
    if (n_tok <= 0) {
        if (t->layers_shipped == t->n_layers) t->complete = 1; /* nothing to move */
        return;
    }
    for (int k = 0; k < t->n_links; k++) {
        const int s = layer * t->n_links + k;
        const xf_link *lk = &t->links[k];
        uint8_t *p = t->buf + t->off[s];
        const size_t body = t->len[s] - sizeof(uint64_t);
        size_t wrote = 0;
        kv_status ks = kv_pack_range(x->kv, seq, layer, 1, lk->head0, lk->n_heads, t->tok0, n_tok,
                                     p, body, &wrote);
        if (ks != KV_OK || wrote != body) {
            fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: pack layer %d: %s", (long long)id, layer,
                    kv_strerror(ks));
            return;
        }
        uint64_t sum = 0;
#ifndef NDEBUG
        sum = xfer_checksum(p, body);
#endif
        memcpy(p + body, &sum, sizeof sum);
        if (layer == x->drop_layer) { /* a cut transfer, for the failure tests */
            t->done[s] = 1;
            t->n_done++;
            t->n_posted++;
            continue;
        }
        comm_status cs = comm_isend(x->comm, lk->peer, (uint64_t)id, p, t->len[s], &t->ops[s]);
        if (cs != COMM_OK) {
            fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: send layer %d to rank %d: %s: %s",
                    (long long)id, layer, lk->peer, comm_strerror(cs), comm_last_error(x->comm));
            return;
        }
        t->n_posted++;
        t->bytes += body;
    }
}

void xfer_expect(xfer_t *x, int64_t id)
{
    xf *t = x ? find(x, id) : NULL;
    if (!t || t->send || t->complete || t->deadline != INT64_MAX) return;
    t->deadline = (int64_t)mono_ms() + t->lease_ms;
}

/* ---- both ------------------------------------------------------------------------------- */

void xfer_release(xfer_t *x, int64_t id)
{
    xf *t = x ? find(x, id) : NULL;
    if (!t) return;
    unlink_xf(x, t);
    drop_xf(x, t);
}

void xfer_poll(xfer_t *x, int64_t now)
{
    if (!x) return;
    if (x->comm) (void)comm_progress(x->comm);
    for (xf *t = x->head, *next; t; t = next) {
        next = t->next;
        if (!t->complete && x->comm) {
            int failed = 0;
            /* once failed, t is freed: test `failed` before touching t again */
            for (int s = 0; !failed && s < t->n_slots; s++) {
                if (!t->ops[s] || t->done[s]) continue;
                int d = 0;
                size_t got = 0;
                comm_status cs = comm_test(x->comm, t->ops[s], &d, &got);
                if (cs != COMM_OK) {
                    fail_xf(x, t, XFER_EV_FAILED, "transfer %lld: %s layer %d %s rank %d: %s: %s",
                            (long long)t->xfer, t->send ? "send of" : "receive of",
                            s / t->n_links, t->send ? "to" : "from", t->links[s % t->n_links].peer,
                            comm_strerror(cs), comm_last_error(x->comm));
                    failed = 1;
                    break;
                }
                if (!d) continue;
                t->done[s] = 1;
                t->n_done++;
                comm_op_free(x->comm, &t->ops[s]);
                if (!t->send) {
                    if (land(x, t, s, got) != 0)
                        failed = 1;
                    else
                        t->deadline = now + t->lease_ms; /* progress restarts the clock */
                }
            }
            if (failed) continue;
            const int all = t->send ? t->n_layers > 0 && t->layers_shipped == t->n_layers &&
                                          t->n_done == t->n_posted
                                    : t->n_done == t->n_slots;
            if (all) {
                t->complete = 1;
                if (t->send) {
                    push_ev(x, XFER_EV_SENT, t);
                    x->st.sent++;
                    x->st.bytes_sent += (int64_t)t->bytes;
                    x->st.ms_sent += mono_ms() - t->t0;
                    unlink_xf(x, t);
                    drop_xf(x, t);
                    continue;
                }
                push_ev(x, XFER_EV_RECEIVED, t);
                x->st.received++;
                x->st.bytes_received += (int64_t)t->bytes;
                x->st.ms_received += mono_ms() - t->t0;
                t->deadline = now + t->lease_ms; /* now the decode assign has a lease to come */
                continue;
            }
        } else if (t->send && t->complete) {
            /* nothing to move (all cached at the destination) */
            push_ev(x, XFER_EV_SENT, t);
            x->st.sent++;
            unlink_xf(x, t);
            drop_xf(x, t);
            continue;
        }
        if (now >= t->deadline)
            fail_xf(x, t, XFER_EV_EXPIRED,
                    "transfer %lld: lease expired %s (%d of %d messages %s)", (long long)t->xfer,
                    t->complete ? "before the decode assign came" : "before all KV moved",
                    t->n_done, t->send ? t->n_posted : t->n_slots,
                    t->send ? "sent" : "received");
    }
    reap_zombies(x);
}
