/* daemon/coord_xfer.c: disaggregated requests (docs/PROTOCOL.md, "The KV transfer
 * handshake"): duetd picks a prefill group P and a decode group D, reserves the KV on D,
 * has P prefill and ship the KV, streams P's first token, starts the decode on D once P
 * says every send completed, and releases P once D has all of it. Every failure ends in a
 * retry (a new transfer) or a clear error, and every hold is released.
 *
 * A disaggregated request sits on D's request list (group, leader) from the reservation
 * on, and on P's prefill list (pgroup, pleader) until P is done with it (kv_ready and
 * kv_ack, or a failure).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "daemon/coord_int.h"


int coord_units_ready(const coord_t *c)
{
    int both = 0, p = 0, d = 0;
    for (int i = 0; i < c->n_groups; i++) {
        const cgroup *g = &c->groups[i];
        if (!g->ready) continue;
        both += g->role == PROTO_ROLE_BOTH;
        p += g->role == PROTO_ROLE_PREFILL;
        d += g->role == PROTO_ROLE_DECODE;
    }
    return both + (p > 0 && d > 0);
}

/* The request's context (prompt ++ tokens so far), as the KV that moves covers it. */
static int32_t *context_of(const creq *r)
{
    int32_t *ctx = malloc((size_t)(r->n_prompt + r->n_gen) * sizeof *ctx);
    if (!ctx) return NULL;
    memcpy(ctx, r->prompt, (size_t)r->n_prompt * sizeof *ctx);
    if (r->n_gen) memcpy(ctx + r->n_prompt, r->gen, (size_t)r->n_gen * sizeof *ctx);
    return ctx;
}

/* Ranks of g as transfer peers: {rank, head0, n_heads}; NULL when a rank is missing. */
static proto_peer *peers_of(const cgroup *g)
{
    proto_peer *p = calloc((size_t)g->tp_size, sizeof *p);
    if (!p) return NULL;
    for (int i = 0; i < g->tp_size; i++) {
        const cworker *w = g->ranks[i];
        if (!w || !w->alive) {
            free(p);
            return NULL;
        }
        p[i] = (proto_peer){.rank = w->rank, .head0 = w->head0, .n_heads = w->n_heads};
    }
    return p;
}

int coord_pick_pair(coord_t *c, creq *r, cgroup **pp, cgroup **dp)
{
    coord_req_hashes(c, r);
    const int need = coord_blocks_of(c, (int64_t)r->n_prompt + r->n_gen + 1);
    const double now = coord_now_ms();
    int n_p = 0, n_d = 0;
    for (int i = 0; i < c->n_groups; i++) {
        const cgroup *g = &c->groups[i];
        if (!g->ready) continue;
        n_p += g->role == PROTO_ROLE_PREFILL && g->id != r->avoid_group;
        n_d += g->role == PROTO_ROLE_DECODE && g->id != r->avoid_group;
    }
    /* P: the longest cached prefix, then the fewest prefills in flight */
    cgroup *bp = NULL, *bd = NULL;
    int best_match = -1, best_load = 0;
    for (int i = 0; i < c->n_groups; i++) {
        cgroup *g = &c->groups[i];
        if (!g->ready || g->role != PROTO_ROLE_PREFILL) continue;
        if (g->id == r->avoid_group && n_p > 0) continue;
        if (g->n_prefill >= g->cfg->max_seqs || need > coord_group_capacity(g)) continue;
        int match = cpfx_match(&g->pidx, r->phash, r->n_phash);
        const cworker *l = g->ranks[0];
        int load = g->n_prefill + (l->has_load && l->load.waiting > 0 ? l->load.waiting : 0);
        if (match > best_match || (match == best_match && load < best_load)) {
            bp = g;
            best_match = match;
            best_load = load;
        }
    }
    if (!bp) return 0;
    /* D: the most free KV blocks, then the fewest requests */
    int64_t best_free = 0;
    for (int i = 0; i < c->n_groups; i++) {
        cgroup *g = &c->groups[i];
        if (!g->ready || g->role != PROTO_ROLE_DECODE || !coord_group_fits(c, g, need, now)) continue;
        if (g->id == r->avoid_group && n_d > 0) continue;
        int64_t fr = coord_group_avail(c, g, now);
        if (!bd || fr > best_free || (fr == best_free && g->n_running < bd->n_running)) {
            bd = g;
            best_free = fr;
        }
    }
    if (!bd) return 0;
    *pp = bp;
    *dp = bd;
    return 1;
}

static void plist_add(cgroup *g, creq *r)
{
    r->pprev = g->ptail;
    r->pnext = NULL;
    if (g->ptail) g->ptail->pnext = r;
    else g->phead = r;
    g->ptail = r;
    g->n_prefill++;
}

static void plist_del(cgroup *g, creq *r)
{
    if (r->pprev) r->pprev->pnext = r->pnext;
    else g->phead = r->pnext;
    if (r->pnext) r->pnext->pprev = r->pprev;
    else g->ptail = r->pprev;
    r->pprev = r->pnext = NULL;
    g->n_prefill--;
}

static void send_release(coord_t *c, cworker *w, const creq *r)
{
    if (!w || !w->alive) return;
    proto_xfer_ref m = {.xfer = r->xfer, .rid = r->rid};
    coord_worker_send(c, w, PROTO_CMD_RELEASE, PROTO_T_RELEASE, &m);
}

/* P is done with r (or r is abandoned): off P's list. */
static void drop_p(coord_t *c, creq *r)
{
    if (r->pgroup < 0) return;
    plist_del(&c->groups[r->pgroup], r);
    r->pgroup = -1;
    r->pleader = NULL;
}

int coord_reserve(coord_t *c, creq *r, cgroup *p, cgroup *d)
{
    cworker *dl = d->ranks[0];
    proto_peer *src = peers_of(p);
    int32_t *ctx = context_of(r);
    if (!src || !ctx) {
        free(src);
        free(ctx);
        CERR(c, "request %s: out of memory reserving its transfer", r->id);
        coord_queue_push(c, r, 1);
        return -1;
    }
    r->xfer = c->next_xfer++;
    int64_t *seq = &c->pair_seq[(size_t)p->id * (size_t)c->n_groups + (size_t)d->id];
    proto_reserve m;
    proto_reserve_init(&m);
    m.xfer = r->xfer;
    m.rid = r->rid;
    m.seq = (*seq)++;
    r->xseq = m.seq;
    m.src_group = p->id;
    m.src = src;
    m.n_src = p->tp_size;
    m.tokens = ctx;
    m.n_tokens = r->n_prompt + r->n_gen;
    m.lease_ms = c->cfg->daemon.transfer_lease_ms;
    int rc = coord_worker_send(c, dl, PROTO_CMD_RESERVE, PROTO_T_RESERVE, &m);
    free(src);
    free(ctx);
    if (rc != 0) {
        r->xfer = 0;
        coord_queue_push(c, r, 1);
        return -1;
    }
    /* r belongs to D (its KV is held there) and to P */
    r->lprev = d->tail;
    r->lnext = NULL;
    if (d->tail) d->tail->lnext = r;
    else d->head = r;
    d->tail = r;
    r->listed = 2;
    d->n_running++;
    c->n_running++;
    r->group = d->id;
    r->leader = dl;
    r->pgroup = p->id;
    r->pleader = p->ranks[0];
    plist_add(p, r);
    r->xstate = XS_RESERVING;
    r->got_kv_ready = r->got_kv_ack = 0;
    r->rng[0] = 0;
    r->state = COORD_PREFILLING;
    double now = coord_now_ms();
    if (r->t_assign <= 0) r->t_assign = now;
    r->t_reserve = now;
    r->t_pre_assign = r->t_kv_ready = r->t_kv_ack = 0;
    dl->blocks_since_load += coord_blocks_of(c, (int64_t)r->n_prompt + r->n_gen);
    CDEBUG(c, "request %s (rid %lld): transfer %lld from group %d (%s) to group %d (%s), seq %lld",
           r->id, (long long)r->rid, (long long)r->xfer, p->id, p->cfg->name, d->id, d->cfg->name,
           (long long)m.seq);
    return 0;
}

void coord_xfer_detach(coord_t *c, creq *r)
{
    if (r->xstate == XS_NONE) return;
    if (r->pgroup >= 0) {
        cworker *pl = r->pleader;
        if (pl && pl->alive) {
            if (!r->got_kv_ready && r->xstate >= XS_PREFILLING) {
                proto_wcancel m = {.rid = r->rid};
                coord_worker_send(c, pl, PROTO_CMD_CANCEL, PROTO_T_WCANCEL, &m);
            } else if (r->got_kv_ready) {
                send_release(c, pl, r);
            }
        }
        drop_p(c, r);
    }
    if (r->xstate < XS_DECODING && r->listed == 2) send_release(c, r->leader, r);
    if (!r->got_kv_ack) c->st_x_failed++; /* abandoned before all its KV arrived */
    r->xstate = XS_NONE;
}

/* The request of a transfer message from w (its P or D), or NULL when stale. */
static creq *req_of_xfer(coord_t *c, int64_t rid, int64_t xfer)
{
    creq *r = cmap_find(&c->reqs, (uint64_t)rid, NULL, NULL);
    if (!r || r->xfer != xfer || r->xstate == XS_NONE) return NULL;
    return r;
}

void coord_on_reserved(coord_t *c, cworker *w, const proto_reserved *m)
{
    creq *r = req_of_xfer(c, m->rid, m->xfer);
    if (!r || r->leader != w || r->xstate != XS_RESERVING) {
        CDEBUG(c, "worker %s: reserved for transfer %lld (rid %lld): stale, released", w->worker_id,
               (long long)m->xfer, (long long)m->rid);
        proto_xfer_ref rel = {.xfer = m->xfer, .rid = m->rid};
        coord_worker_send(c, w, PROTO_CMD_RELEASE, PROTO_T_RELEASE, &rel);
        return;
    }
    cgroup *p = &c->groups[r->pgroup], *d = &c->groups[r->group];
    proto_peer *dst = peers_of(d);
    if (!dst || !r->pleader || !r->pleader->alive) {
        free(dst);
        coord_req_detach(c, r, 1);
        coord_req_retry(c, r, p->id, "its prefill group went away before the prefill started");
        return;
    }
    int bt = c->block_tokens > 0 ? c->block_tokens : 16;
    proto_assign a;
    coord_assign_body(r, PROTO_ROLE_PREFILL, &a);
    a.session = NULL; /* the session's KV lives on the decode group */
    a.has_transfer = 1;
    a.transfer.xfer = r->xfer;
    a.transfer.seq = r->xseq;
    a.transfer.peer_group = d->id;
    a.transfer.first_block = m->cached_tokens / bt;
    a.transfer.peers = dst;
    a.transfer.n_peers = d->tp_size;
    a.transfer.lease_ms = m->lease_ms;
    int rc = coord_worker_send(c, r->pleader, PROTO_CMD_ASSIGN, PROTO_T_ASSIGN, &a);
    free(dst);
    if (rc != 0) { /* P is dead now: its failover retries r */
        return;
    }
    r->xstate = XS_PREFILLING;
    r->t_pre_assign = coord_now_ms();
    coord_note_prefix(c, r, p);
}

void coord_xfer_tokens(coord_t *c, creq *r)
{
    if (r->state > COORD_DECODING || r->xstate == XS_NONE) return;
    if (r->ended_by_token || r->n_gen >= r->max_tokens) /* the first token ends it */
        coord_req_finished(c, r, r->ended_by_token == 1   ? PROTO_FINISH_EOS
                                 : r->ended_by_token == 2 ? PROTO_FINISH_STOP
                                                          : PROTO_FINISH_LENGTH,
                           -1);
}

/* After kv_ack and kv_ready: P may drop its copy. */
static void maybe_release_p(coord_t *c, creq *r)
{
    if (!r->got_kv_ready || !r->got_kv_ack || r->pgroup < 0) return;
    send_release(c, r->pleader, r);
    drop_p(c, r);
}

void coord_on_kv_ready(coord_t *c, cworker *w, const proto_kv_ready *m)
{
    creq *r = req_of_xfer(c, m->rid, m->xfer);
    if (!r || r->pleader != w || r->xstate != XS_PREFILLING) {
        CDEBUG(c, "worker %s: kv_ready for transfer %lld (rid %lld): stale, released", w->worker_id,
               (long long)m->xfer, (long long)m->rid);
        proto_xfer_ref rel = {.xfer = m->xfer, .rid = m->rid};
        coord_worker_send(c, w, PROTO_CMD_RELEASE, PROTO_T_RELEASE, &rel);
        return;
    }
    if (r->n_gen < 1) {
        coord_req_detach(c, r, 1);
        coord_req_retry(c, r, r->pgroup, "the prefill group sent kv_ready before the first token");
        return;
    }
    cgroup *p = &c->groups[r->pgroup];
    r->got_kv_ready = 1;
    r->t_kv_ready = coord_now_ms();
    r->p_cached = m->cached_tokens;
    snprintf(r->rng, sizeof r->rng, "%s", m->rng ? m->rng : "");
    p->x_count++;
    p->x_bytes += m->bytes;
    c->st_x_bytes += m->bytes;
    p->x_ms += m->send_ms;
    p->x_tail_ms += m->tail_ms;
    proto_assign a;
    coord_assign_body(r, PROTO_ROLE_DECODE, &a);
    a.rng = r->rng[0] ? r->rng : NULL;
    a.has_transfer = 1;
    a.transfer.xfer = r->xfer;
    if (coord_worker_send(c, r->leader, PROTO_CMD_ASSIGN, PROTO_T_ASSIGN, &a) != 0)
        return; /* D is dead: its failover retries r */
    r->xstate = XS_DECODING;
    maybe_release_p(c, r);
}

void coord_on_kv_ack(coord_t *c, cworker *w, const proto_xfer_ref *m)
{
    creq *r = req_of_xfer(c, m->rid, m->xfer);
    if (!r || r->leader != w || r->got_kv_ack) return;
    r->got_kv_ack = 1;
    r->t_kv_ack = coord_now_ms();
    double ms = r->t_kv_ack - r->t_reserve;
    c->st_x_done++;
    c->st_x_ms_sum += ms;
    if (ms > c->st_x_ms_max) c->st_x_ms_max = ms;
    cgroup *d = &c->groups[r->group];
    d->x_count++;
    maybe_release_p(c, r);
}

int coord_xfer_failed(coord_t *c, cworker *w, const proto_failed *f)
{
    creq *r = f->rid > 0 ? cmap_find(&c->reqs, (uint64_t)f->rid, NULL, NULL) : NULL;
    if (!r || r->xstate == XS_NONE) return 0;
    if (f->xfer > 0 && f->xfer != r->xfer) return 1; /* an old transfer's: already dealt with */
    const int from_p = r->pleader == w, from_d = r->leader == w;
    if (!from_p && !from_d) return 0;
    /* a decode already running after its transfer fails like a colocated one */
    if (from_d && r->xstate == XS_DECODING && r->got_kv_ack && f->code != PROTO_ERR_TRANSFER_FAILED &&
        f->code != PROTO_ERR_LEASE_EXPIRED)
        return 0;
    /* a transfer that broke or timed out at the decode side may be the sender's fault:
     * the retry avoids the prefill group (another decode group is free to be picked) */
    const int avoid = from_p || f->code == PROTO_ERR_TRANSFER_FAILED || f->code == PROTO_ERR_LEASE_EXPIRED
                          ? r->pgroup : r->group;
    char why[PROTO_MAX_TEXT];
    snprintf(why, sizeof why, "%s group's worker %s failed transfer %lld: %s: %s", from_p ? "the prefill" : "the decode",
             w->worker_id, (long long)r->xfer, proto_code_name(f->code), f->message ? f->message : "");
    coord_req_detach(c, r, 1);
    if (f->retryable || f->code == PROTO_ERR_KV_FULL)
        coord_req_retry(c, r, avoid, why);
    else
        coord_req_fail(c, r, PROTO_ERR_INTERNAL, "%s", why);
    return 1;
}

void coord_xfer_failover(coord_t *c, cgroup *g)
{
    char why[PROTO_MAX_TEXT];
    snprintf(why, sizeof why, "a worker of prefill group %d (%s) died", g->id, g->cfg->name);
    while (g->phead) {
        creq *r = g->phead;
        if (r->got_kv_ready) { /* the KV is all on D: P's death does not matter */
            drop_p(c, r);
            continue;
        }
        coord_req_detach(c, r, 1);
        coord_req_retry(c, r, g->id, why);
    }
    for (int i = 0; i < c->n_groups; i++) { /* the pairs with g restart their order */
        c->pair_seq[(size_t)g->id * (size_t)c->n_groups + (size_t)i] = 0;
        c->pair_seq[(size_t)i * (size_t)c->n_groups + (size_t)g->id] = 0;
    }
}

void coord_xfer_account(coord_t *c, creq *r)
{
    if (!r->got_kv_ack || r->t_pre_assign <= 0 || r->t_first <= 0) return;
    double end = r->t_last > r->t_kv_ack ? r->t_last : r->t_kv_ack;
    double q = r->t_reserve - r->t_recv, pf = r->t_first - r->t_reserve;
    double tr = r->t_kv_ack > r->t_first ? r->t_kv_ack - r->t_first : 0;
    double dc = end - (r->t_kv_ack > r->t_first ? r->t_kv_ack : r->t_first);
    cgroup *d = &c->groups[r->group];
    d->sh_n++;
    d->sh_queue += q > 0 ? q : 0;
    d->sh_prefill += pf > 0 ? pf : 0;
    d->sh_transfer += tr;
    d->sh_decode += dc > 0 ? dc : 0;
}
