/* daemon/coord_worker.c: the coordinator's worker side: registration, heartbeats, dead
 * workers and failover, groups, routing (prefix, then load), admission by KV budget,
 * sessions, and the status and health bodies. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

#include "daemon/coord_int.h"

#define PFX_MIN 4096   /* prefix hashes remembered per group, at least */
#define PFX_MAX (1 << 22)
#define LOAD_FRESH 2   /* a heartbeat's load counts for this many heartbeat intervals */

static proto_role role_of(config_role r)
{
    return r == CONFIG_ROLE_PREFILL ? PROTO_ROLE_PREFILL
           : r == CONFIG_ROLE_DECODE ? PROTO_ROLE_DECODE
                                     : PROTO_ROLE_BOTH;
}

static int route_eq(const proto_route *a, const proto_route *b)
{
    if (a->n != b->n) return 0;
    for (int i = 0; i < a->n; i++)
        if (a->len[i] != b->len[i] || memcmp(a->id[i], b->id[i], a->len[i]) != 0) return 0;
    return 1;
}

int coord_blocks_of(const coord_t *c, int64_t tokens)
{
    int bt = c->block_tokens > 0 ? c->block_tokens : 16;
    return (int)((tokens + bt - 1) / bt);
}

/* ---- groups ----------------------------------------------------------------------------- */

int coord_groups_init(coord_t *c, char *err, size_t errlen)
{
    c->n_groups = c->cfg->n_groups;
    c->groups = calloc((size_t)c->n_groups, sizeof *c->groups);
    if (!c->groups) goto oom;
    int rank = 0;
    for (int i = 0; i < c->n_groups; i++) {
        cgroup *g = &c->groups[i];
        g->id = i;
        g->cfg = &c->cfg->groups[i];
        g->role = role_of(g->cfg->role);
        g->tp_size = g->cfg->tp_size;
        g->rank0 = rank;
        rank += g->tp_size;
        g->ranks = calloc((size_t)g->tp_size, sizeof *g->ranks);
        if (!g->ranks) goto oom;
        g->pidx.limit = PFX_MIN;
    }
    c->world_size = rank;
    c->next_xfer = 1;
    c->pair_seq = calloc((size_t)c->n_groups * (size_t)c->n_groups + 1, sizeof *c->pair_seq);
    if (!c->pair_seq) goto oom;
    return 0;
oom:
    snprintf(err, errlen, "coord: out of memory building the groups");
    return -1;
}

void coord_groups_rebind(coord_t *c)
{
    for (int i = 0; i < c->n_groups && i < c->cfg->n_groups; i++) c->groups[i].cfg = &c->cfg->groups[i];
}

void coord_workers_free(coord_t *c)
{
    while (c->workers) {
        cworker *w = c->workers;
        c->workers = w->next;
        free(w->worker_id);
        free(w->endpoint);
        free(w);
    }
    for (int i = 0; i < c->n_groups; i++) {
        free(c->groups[i].ranks);
        cpfx_free(&c->groups[i].pidx);
    }
    free(c->groups);
    c->groups = NULL;
    free(c->pair_seq);
    c->pair_seq = NULL;
    free(c->nccl_id);
    c->nccl_id = NULL;
}

int64_t coord_group_capacity(const cgroup *g)
{
    int64_t cap = -1;
    for (int r = 0; r < g->tp_size; r++)
        if (g->ranks[r] && (cap < 0 || g->ranks[r]->capacity < cap)) cap = g->ranks[r]->capacity;
    return cap < 0 ? 0 : cap;
}

static void group_update(coord_t *c, cgroup *g)
{
    int ready = 1;
    for (int r = 0; r < g->tp_size; r++) ready &= g->ranks[r] != NULL && g->ranks[r]->alive;
    g->ready = ready;
    if (ready) {
        int64_t lim = 4 * coord_group_capacity(g);
        g->pidx.limit = (size_t)(lim < PFX_MIN ? PFX_MIN : lim > PFX_MAX ? PFX_MAX : lim);
    }
    (void)c;
}

int coord_groups_ready(const coord_t *c) { return coord_units_ready(c); }

int64_t coord_max_capacity(const coord_t *c)
{
    int64_t best = 0;
    for (int i = 0; i < c->n_groups; i++) {
        const cgroup *g = &c->groups[i];
        if (g->ready && g->role != PROTO_ROLE_PREFILL && coord_group_capacity(g) > best)
            best = coord_group_capacity(g);
    }
    return best;
}

/* KV blocks the group can still give, as far as duetd knows: its capacity less the
 * contexts of its requests, and no more than its leader's last heartbeat says is free
 * (less the prompts sent since) while that heartbeat is fresh. */
int64_t coord_group_avail(const coord_t *c, const cgroup *g, double now)
{
    int64_t cap = coord_group_capacity(g), used = 0;
    for (const creq *r = g->head; r; r = r->lnext) used += coord_blocks_of(c, (int64_t)r->n_prompt + r->n_gen + 1);
    int64_t avail = cap - used;
    const cworker *l = g->ranks[0];
    if (l && l->has_load && l->load.kv_free_blocks >= 0 &&
        now - l->load_at < LOAD_FRESH * c->cfg->daemon.heartbeat_ms) {
        int64_t hb = l->load.kv_free_blocks + (l->load.kv_cached_blocks > 0 ? l->load.kv_cached_blocks : 0) -
                     l->blocks_since_load;
        if (hb < avail) avail = hb;
    }
    return avail;
}

int coord_group_fits(const coord_t *c, const cgroup *g, int need, double now)
{
    if (g->n_running >= g->cfg->max_seqs) return 0;
    if (g->n_running == 0) return need <= coord_group_capacity(g);
    return need <= coord_group_avail(c, g, now);
}

/* ---- sessions ----------------------------------------------------------------------------- */

static int session_match(const void *val, const void *arg)
{
    return strcmp(((const csession *)val)->id, arg) == 0;
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

/* Forget the least recently used half of the idle sessions. */
static void sessions_evict(coord_t *c)
{
    double *t = malloc((size_t)c->n_sessions * sizeof *t);
    if (!t) return;
    int k = 0;
    for (size_t i = 0; i < c->sessions.cap; i++) {
        csession *s = c->sessions.vals[i];
        if (s && !s->busy) t[k++] = s->last_used;
    }
    qsort(t, (size_t)k, sizeof *t, cmp_double);
    double cut = k ? t[k / 2] : 0;
    free(t);
    for (size_t i = 0; i < c->sessions.cap; i++) {
        csession *s = c->sessions.vals[i];
        if (s && !s->busy && s->last_used <= cut) {
            cmap_del(&c->sessions, coord_hash_bytes(s->id, strlen(s->id)), s);
            free(s->id);
            free(s);
            c->n_sessions--;
            i = (size_t)-1; /* deletion shifts entries: scan again */
        }
    }
}

csession *coord_session_get(coord_t *c, const char *id, int create)
{
    uint64_t h = coord_hash_bytes(id, strlen(id));
    csession *s = cmap_find(&c->sessions, h, session_match, id);
    if (s || !create) return s;
    if (c->n_sessions >= 65536) sessions_evict(c);
    s = calloc(1, sizeof *s);
    if (!s || !(s->id = strdup(id))) {
        free(s);
        return NULL;
    }
    s->group = -1;
    if (cmap_put(&c->sessions, h, s) != 0) {
        free(s->id);
        free(s);
        return NULL;
    }
    c->n_sessions++;
    return s;
}

void coord_session_note(coord_t *c, creq *r)
{
    if (!r->session || r->group < 0 || r->group >= c->n_groups) return;
    csession *s = coord_session_get(c, r->session, 0);
    if (!s) return;
    s->group = r->group;
    s->last_used = coord_now_ms();
    /* the group keeps the whole context: prompt and completion */
    int n = r->n_prompt + r->n_gen;
    int32_t *ctx = malloc((size_t)n * sizeof *ctx);
    int nb = n / (c->block_tokens > 0 ? c->block_tokens : 16);
    uint64_t *h = malloc((size_t)(nb > 0 ? nb : 1) * sizeof *h);
    if (ctx && h) {
        memcpy(ctx, r->prompt, (size_t)r->n_prompt * sizeof *ctx);
        if (r->n_gen) memcpy(ctx + r->n_prompt, r->gen, (size_t)r->n_gen * sizeof *ctx);
        nb = coord_block_hashes(ctx, n, c->block_tokens, h, nb);
        cpfx_add(&c->groups[r->group].pidx, h, nb);
    }
    free(ctx);
    free(h);
}

/* ---- sending to workers ------------------------------------------------------------------- */

static const char *wname(const cworker *w) { return w->worker_id ? w->worker_id : "?"; }

static void worker_kill(coord_t *c, cworker *w, const char *why)
{
    if (!w->alive) return;
    w->alive = 0;
    w->t_dead = coord_now_ms();
    CWARN(c, "worker %s (rank %d, group %d) is dead: %s", wname(w), w->rank, w->group, why);
    if (w->group >= 0 && w->group < c->n_groups) {
        cgroup *g = &c->groups[w->group];
        if (w->tp_rank >= 0 && w->tp_rank < g->tp_size && g->ranks[w->tp_rank] == w) g->ranks[w->tp_rank] = NULL;
        g->ready = 0;
        g->failover = 1;
        cpfx_clear(&g->pidx); /* a worker that comes back has an empty cache */
        c->failover_pending = 1;
    }
    if (w->backend == PROTO_BACKEND_NCCL) {
        free(c->nccl_id); /* the communicator is rebuilt with a new id */
        c->nccl_id = NULL;
    }
    if (w->backend == PROTO_BACKEND_TCP) c->comm_changed = 1;
}

int coord_worker_send(coord_t *c, cworker *w, proto_cmd cmd, proto_type t, const void *body)
{
    if (!w->alive) return -1;
    if (proto_send_body(c->wsock, &w->route, PROTO_WORKER, cmd, t, body, ZMQ_DONTWAIT) == 0) {
        w->last_sent = coord_now_ms();
        return 0;
    }
    int e = errno;
    char why[PROTO_MAX_TEXT];
    snprintf(why, sizeof why, "sending '%s' failed: %s", proto_cmd_name(cmd),
             e == EAGAIN ? "its queue is full (it does not read)" : zmq_strerror(e));
    if (e == EAGAIN || e == EHOSTUNREACH) worker_kill(c, w, why);
    else CERR(c, "worker %s: %s", wname(w), why);
    return -1;
}

static void send_worker_error(coord_t *c, const proto_route *route, proto_code code, proto_cmd cmd,
                              const char *fmt, ...) __attribute__((format(printf, 5, 6)));
static void send_worker_error(coord_t *c, const proto_route *route, proto_code code, proto_cmd cmd,
                              const char *fmt, ...)
{
    proto_err e;
    memset(&e, 0, sizeof e);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e.message, sizeof e.message, fmt, ap);
    va_end(ap);
    e.code = code;
    e.cmd = cmd;
    CWARN(c, "to a worker: %s: %s", proto_code_name(code), e.message);
    proto_send_error(c->wsock, route, PROTO_WORKER, &e, ZMQ_DONTWAIT);
}

/* comm_init with the live TCP ranks' endpoints, to each of them. */
static void send_comm_tcp(coord_t *c)
{
    c->comm_changed = 0;
    int n = 0;
    for (cworker *w = c->workers; w; w = w->next) n += w->alive && w->backend == PROTO_BACKEND_TCP && w->endpoint;
    if (n == 0) return;
    proto_endpoint *peers = calloc((size_t)n, sizeof *peers);
    if (!peers) return;
    int k = 0;
    for (cworker *w = c->workers; w; w = w->next)
        if (w->alive && w->backend == PROTO_BACKEND_TCP && w->endpoint)
            peers[k++] = (proto_endpoint){.rank = w->rank, .endpoint = w->endpoint};
    for (cworker *w = c->workers; w; w = w->next) {
        if (!w->alive || w->backend != PROTO_BACKEND_TCP) continue;
        proto_comm_init m;
        proto_comm_init_init(&m);
        m.backend = PROTO_BACKEND_TCP;
        m.world_size = c->world_size;
        m.rank = w->rank;
        m.peers = peers;
        m.n_peers = n;
        coord_worker_send(c, w, PROTO_CMD_COMM_INIT, PROTO_T_COMM_INIT, &m);
    }
    free(peers);
}

/* comm_init with the NCCL id, once every rank of the world is up and rank 0 gave it. */
static void send_comm_nccl(coord_t *c)
{
    if (!c->nccl_id) return;
    for (int i = 0; i < c->n_groups; i++)
        for (int r = 0; r < c->groups[i].tp_size; r++) {
            cworker *w = c->groups[i].ranks[r];
            if (!w || !w->alive || w->backend != PROTO_BACKEND_NCCL) return;
        }
    for (cworker *w = c->workers; w; w = w->next) {
        if (!w->alive || w->backend != PROTO_BACKEND_NCCL) continue;
        proto_comm_init m;
        proto_comm_init_init(&m);
        m.backend = PROTO_BACKEND_NCCL;
        m.world_size = c->world_size;
        m.rank = w->rank;
        m.unique_id = c->nccl_id;
        coord_worker_send(c, w, PROTO_CMD_COMM_INIT, PROTO_T_COMM_INIT, &m);
    }
}

/* ---- requests on groups -------------------------------------------------------------------- */

void coord_req_detach(coord_t *c, creq *r, int send_cancel)
{
    /* a D that got no decode assign yet knows the transfer, not the request: release it */
    if (r->xstate == XS_RESERVING || r->xstate == XS_PREFILLING) send_cancel = 0;
    coord_xfer_detach(c, r);
    if (r->listed != 2) return;
    cgroup *g = &c->groups[r->group];
    if (r->lprev) r->lprev->lnext = r->lnext;
    else g->head = r->lnext;
    if (r->lnext) r->lnext->lprev = r->lprev;
    else g->tail = r->lprev;
    r->lprev = r->lnext = NULL;
    r->listed = 0;
    g->n_running--;
    c->n_running--;
    if (send_cancel && r->leader && r->leader->alive) {
        proto_wcancel m;
        proto_wcancel_init(&m);
        m.rid = r->rid;
        coord_worker_send(c, r->leader, PROTO_CMD_CANCEL, PROTO_T_WCANCEL, &m);
    }
}

/* r (detached, still running) could not go on where it was: run it elsewhere or fail it. */
void coord_req_retry(coord_t *c, creq *r, int avoid, const char *why)
{
    if (r->ended_by_token) {
        coord_req_finished(c, r, r->ended_by_token == 1 ? PROTO_FINISH_EOS : PROTO_FINISH_STOP, -1);
        return;
    }
    if (r->n_gen >= r->max_tokens || r->n_prompt + r->n_gen >= c->n_ctx) {
        coord_req_finished(c, r, PROTO_FINISH_LENGTH, -1);
        return;
    }
    if (r->retries >= c->opts.max_retries) {
        coord_req_fail(c, r, PROTO_ERR_WORKER_LOST, "%s; its %d retries (max_retries) are spent", why, r->retries);
        return;
    }
    /* with no group ready it waits in the queue for one to come back (a worker declared
     * dead registers again at once when it was only slow); coord_worker_tick fails it
     * when none does within the grace time */
    /* The new attempt gets a new rid: what a worker still sends about the old one (the
     * `finished` cancelled that answers the detach's cancel, late `tokens` or `failed`)
     * then finds no request, even when the retry lands on the same worker. */
    const int64_t old_rid = r->rid;
    cmap_del(&c->reqs, (uint64_t)r->rid, r);
    r->rid = c->next_rid++;
    if (cmap_put(&c->reqs, (uint64_t)r->rid, r) != 0) {
        coord_req_fail(c, r, PROTO_ERR_INTERNAL, "%s; duetd ran out of memory retrying it", why);
        return;
    }
    r->retries++;
    c->st_retried++;
    r->avoid_group = avoid;
    r->group = -1;
    r->leader = NULL;
    CINFO(c, "request %s (rid %lld, now %lld) retried (%d of %d) after %d tokens: %s", r->id,
          (long long)old_rid, (long long)r->rid, r->retries, c->opts.max_retries, r->n_gen, why);
    coord_queue_push(c, r, 1);
}

void coord_failover(coord_t *c)
{
    if (!c->failover_pending && !c->comm_changed) return;
    int pending = c->failover_pending;
    c->failover_pending = 0;
    for (int i = 0; pending && i < c->n_groups; i++) {
        cgroup *g = &c->groups[i];
        if (!g->failover) continue;
        g->failover = 0;
        char why[PROTO_MAX_TEXT];
        snprintf(why, sizeof why, "a worker of group %d (%s) died", g->id, g->cfg->name);
        while (g->head) {
            creq *r = g->head;
            coord_req_detach(c, r, 1); /* a live leader drops it */
            coord_req_retry(c, r, g->id, why);
        }
        coord_xfer_failover(c, g);
    }
    if (pending && coord_groups_ready(c) == 0 && c->t_groups_down <= 0) c->t_groups_down = coord_now_ms();
    if (c->comm_changed) send_comm_tcp(c);
    coord_notify_status(c);
}

void coord_req_hashes(coord_t *c, creq *r)
{
    int bt = c->block_tokens > 0 ? c->block_tokens : 16;
    if (!r->phash && r->n_prompt >= bt) {
        int nb = r->n_prompt / bt;
        r->phash = malloc((size_t)nb * sizeof *r->phash);
        if (r->phash) r->n_phash = coord_block_hashes(r->prompt, r->n_prompt, bt, r->phash, nb);
    }
}

void coord_note_prefix(coord_t *c, creq *r, cgroup *g)
{
    int bt = c->block_tokens > 0 ? c->block_tokens : 16;
    int match = cpfx_match(&g->pidx, r->phash, r->n_phash) * bt;
    int most = ((r->n_prompt - 1) / bt) * bt; /* the last prompt token is always computed */
    r->predicted_cached = match < most ? match : most;
    cpfx_add(&g->pidx, r->phash, r->n_phash);
    g->ranks[0]->blocks_since_load += coord_blocks_of(c, (int64_t)r->n_prompt + r->n_gen);
}

void coord_assign_body(const creq *r, proto_role role, proto_assign *a)
{
    proto_assign_init(a);
    a->rid = r->rid;
    a->role = role;
    a->tokens = r->prompt;
    a->n_tokens = r->n_prompt;
    a->generated = r->gen;
    a->n_generated = r->n_gen;
    a->sampling = r->sampling;
    a->max_tokens = r->max_tokens;
    a->stop_token_ids = r->stop_ids;
    a->n_stop_token_ids = r->n_stop_ids;
    a->ignore_eos = r->ignore_eos;
    a->session = r->session;
}

cgroup *coord_pick_group(coord_t *c, creq *r, int *any_ready)
{
    coord_req_hashes(c, r);
    int need = coord_blocks_of(c, (int64_t)r->n_prompt + r->n_gen + 1);
    double now = coord_now_ms();
    int n_ready = 0, n_other = 0;
    for (int i = 0; i < c->n_groups; i++) {
        const cgroup *g = &c->groups[i];
        if (!g->ready || g->role != PROTO_ROLE_BOTH) continue;
        n_ready++;
        n_other += g->id != r->avoid_group;
    }
    *any_ready = n_ready;
    const csession *s = r->session ? coord_session_get(c, r->session, 0) : NULL;
    cgroup *best = NULL;
    int best_match = -1, best_load = 0;
    for (int i = 0; i < c->n_groups; i++) {
        cgroup *g = &c->groups[i];
        if (!g->ready || g->role != PROTO_ROLE_BOTH || !coord_group_fits(c, g, need, now)) continue;
        if (g->id == r->avoid_group && n_other > 0) continue;
        if (s && s->group == g->id) return g; /* the session's KV is there */
        int match = cpfx_match(&g->pidx, r->phash, r->n_phash);
        int load = g->n_running;
        const cworker *l = g->ranks[0];
        if (l->has_load && l->load.waiting > 0) load += l->load.waiting;
        if (match > best_match || (match == best_match && load < best_load)) {
            best = g;
            best_match = match;
            best_load = load;
        }
    }
    return best;
}

int coord_assign(coord_t *c, creq *r, cgroup *g)
{
    cworker *leader = g->ranks[0];
    proto_assign a;
    coord_assign_body(r, PROTO_ROLE_BOTH, &a);
    if (coord_worker_send(c, leader, PROTO_CMD_ASSIGN, PROTO_T_ASSIGN, &a) != 0) { /* a is borrowed */
        coord_queue_push(c, r, 1);
        return -1;
    }
    r->lprev = g->tail;
    r->lnext = NULL;
    if (g->tail) g->tail->lnext = r;
    else g->head = r;
    g->tail = r;
    r->listed = 2;
    g->n_running++;
    c->n_running++;
    r->group = g->id;
    r->leader = leader;
    r->state = COORD_PREFILLING;
    if (r->t_assign <= 0) r->t_assign = coord_now_ms();
    coord_note_prefix(c, r, g);
    CDEBUG(c, "request %s (rid %lld) -> group %d (%s), %d cached prompt tokens expected", r->id,
           (long long)r->rid, g->id, g->cfg->name, r->predicted_cached);
    return 0;
}

void coord_schedule(coord_t *c)
{
    coord_failover(c);
    while (c->q_head) {
        creq *r = c->q_head;
        int any;
        cgroup *g = coord_pick_group(c, r, &any), *pg = NULL, *dg = NULL;
        if (g) {
            coord_queue_remove(c, r);
            coord_assign(c, r, g); /* on failure the leader is dead: the next pick differs */
        } else if (coord_pick_pair(c, r, &pg, &dg)) {
            coord_queue_remove(c, r);
            coord_reserve(c, r, pg, dg); /* likewise */
        } else {
            break;
        }
    }
    coord_failover(c);
}

/* ---- registration ----------------------------------------------------------------------------- */

static cworker *find_live(coord_t *c, const proto_route *route)
{
    for (cworker *w = c->workers; w; w = w->next)
        if (w->alive && route_eq(&w->route, route)) return w;
    return NULL;
}

static void refuse(coord_t *c, const proto_route *route, proto_code code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static void refuse(coord_t *c, const proto_route *route, proto_code code, const char *fmt, ...)
{
    char msg[PROTO_MAX_TEXT];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    CWARN(c, "registration refused: %s: %s", proto_code_name(code), msg);
    proto_refused m;
    proto_refused_init(&m);
    m.code = code;
    m.message = msg;
    proto_send_body(c->wsock, route, PROTO_WORKER, PROTO_CMD_REFUSED, PROTO_T_REFUSED, &m, ZMQ_DONTWAIT);
}

/* The KV heads that TP rank r of t holds (DESIGN.md): the KV heads its query heads use.
 * 0, or -1 when the split is uneven and duetd does not check it. */
static int expected_heads(const coord_t *c, int r, int t, int *head0, int *n_heads)
{
    int hq = c->n_head, hkv = c->n_head_kv;
    if (hq <= 0 || hkv <= 0 || hq % hkv != 0 || hq % t != 0) return -1;
    if (t <= hkv ? hkv % t != 0 : t % hkv != 0) return -1;
    int gs = hq / hkv, q0 = r * hq / t, q1 = (r + 1) * hq / t;
    *head0 = q0 / gs;
    *n_heads = (q1 + gs - 1) / gs - *head0;
    return 0;
}

static int role_fits(proto_role want, proto_role group) { return want == PROTO_ROLE_ANY || want == group; }

/* The group and rank slot for a registering worker; NULL with why set. */
static cgroup *find_place(coord_t *c, const proto_register *reg, char *why, size_t n)
{
    if (reg->group >= 0) {
        if (reg->group >= c->n_groups) {
            snprintf(why, n, "register: group %d is not configured (duetd has %d groups)", reg->group, c->n_groups);
            return NULL;
        }
        cgroup *g = &c->groups[reg->group];
        if (g->tp_size != reg->tp_size) {
            snprintf(why, n, "register: group %d (%s) has tp_size %d, the worker %d", g->id, g->cfg->name,
                     g->tp_size, reg->tp_size);
            return NULL;
        }
        if (!role_fits(reg->role, g->role)) {
            snprintf(why, n, "register: group %d (%s) has role %s, the worker asks for %s", g->id, g->cfg->name,
                     proto_role_name(g->role), proto_role_name(reg->role));
            return NULL;
        }
        if (reg->rank >= 0 && reg->rank != g->rank0 + reg->tp_rank) {
            snprintf(why, n, "register: rank %d is not tp rank %d of group %d (that is rank %d)", reg->rank,
                     reg->tp_rank, g->id, g->rank0 + reg->tp_rank);
            return NULL;
        }
        cworker *o = g->ranks[reg->tp_rank];
        if (o && o->alive) {
            snprintf(why, n, "register: tp rank %d of group %d (%s) is taken by worker %s", reg->tp_rank, g->id,
                     g->cfg->name, wname(o));
            return NULL;
        }
        return g;
    }
    if (reg->tp_size > 1) {
        snprintf(why, n, "register: a worker of tp_size %d must name its group", reg->tp_size);
        return NULL;
    }
    for (int i = 0; i < c->n_groups; i++) {
        cgroup *g = &c->groups[i];
        if (g->tp_size != 1 || !role_fits(reg->role, g->role) || g->ranks[0]) continue;
        if (reg->rank >= 0 && reg->rank != g->rank0) continue;
        return g;
    }
    snprintf(why, n, "register: no free place for a worker of tp_size 1, role %s%s", proto_role_name(reg->role),
             reg->rank >= 0 ? " at that rank" : "");
    return NULL;
}

static void on_register(coord_t *c, proto_msg *msg, int fd)
{
    proto_register reg;
    proto_err err;
    memset(&err, 0, sizeof err);
    if (proto_register_parse(msg->body, &reg, &err) != 0) {
        err.cmd = PROTO_CMD_REGISTER;
        CWARN(c, "register refused: %s", err.message);
        proto_send_error(c->wsock, &msg->route, PROTO_WORKER, &err, ZMQ_DONTWAIT);
        return;
    }
    cworker *old = find_live(c, &msg->route);
    if (old) worker_kill(c, old, "registered again on the same connection");
    char why[PROTO_MAX_TEXT];
    cgroup *g = NULL;
    int h0, nh;
    if (strcmp(reg.model.sha256, c->sha256) != 0) {
        refuse(c, &msg->route, PROTO_ERR_MODEL_MISMATCH,
               "register: model sha256 %.12s... of worker %s differs from duetd's %.12s... (%s)",
               reg.model.sha256, reg.worker_id, c->sha256, c->cfg->model.path);
        goto out;
    }
    if (c->kv_fixed && (reg.kv.block_tokens != c->block_tokens || reg.kv.dtype != c->kv_dtype)) {
        refuse(c, &msg->route, PROTO_ERR_LAYOUT_MISMATCH,
               "register: KV blocks of %d tokens in %s; the cluster's are %d tokens in %s", reg.kv.block_tokens,
               dtype_name(reg.kv.dtype), c->block_tokens, dtype_name(c->kv_dtype));
        goto out;
    }
    if (c->n_head_kv > 0 && reg.kv.n_head_kv != c->n_head_kv) {
        refuse(c, &msg->route, PROTO_ERR_LAYOUT_MISMATCH, "register: kv.n_head_kv %d; the model has %d",
               reg.kv.n_head_kv, c->n_head_kv);
        goto out;
    }
    if (expected_heads(c, reg.tp_rank, reg.tp_size, &h0, &nh) == 0 &&
        (reg.kv.head0 != h0 || reg.kv.n_heads != nh)) {
        refuse(c, &msg->route, PROTO_ERR_LAYOUT_MISMATCH,
               "register: tp rank %d of %d holds KV heads [%d, %d), not [%d, %d)", reg.tp_rank, reg.tp_size, h0,
               h0 + nh, reg.kv.head0, reg.kv.head0 + reg.kv.n_heads);
        goto out;
    }
    for (cworker *w = c->workers; w; w = w->next)
        if (w->alive && strcmp(w->worker_id, reg.worker_id) == 0) {
            refuse(c, &msg->route, PROTO_ERR_DUPLICATE_WORKER,
                   "register: worker '%s' is registered and alive (rank %d)", reg.worker_id, w->rank);
            goto out;
        }
    if (!(g = find_place(c, &reg, why, sizeof why))) {
        refuse(c, &msg->route, PROTO_ERR_NO_SLOT, "%s", why);
        goto out;
    }
    /* a dead entry of the same worker is replaced */
    for (cworker **pp = &c->workers; *pp; pp = &(*pp)->next)
        if (!(*pp)->alive && strcmp((*pp)->worker_id, reg.worker_id) == 0) {
            cworker *d = *pp;
            *pp = d->next;
            free(d->worker_id);
            free(d->endpoint);
            free(d);
            c->n_workers--;
            break;
        }
    cworker *w = calloc(1, sizeof *w);
    if (!w || !(w->worker_id = strdup(reg.worker_id)) || (reg.endpoint && !(w->endpoint = strdup(reg.endpoint)))) {
        if (w) free(w->worker_id);
        free(w);
        refuse(c, &msg->route, PROTO_ERR_INTERNAL, "register: duetd is out of memory");
        goto out;
    }
    double now = coord_now_ms();
    w->route = msg->route;
    w->fd = fd;
    w->rank = g->rank0 + reg.tp_rank;
    w->group = g->id;
    w->tp_rank = reg.tp_rank;
    w->tp_size = reg.tp_size;
    w->role = g->role;
    if (reg.device.kind == PROTO_DEVICE_CUDA)
        snprintf(w->device, sizeof w->device, "cuda:%d%s%s", reg.device.index, reg.device.name ? " " : "",
                 reg.device.name ? reg.device.name : "");
    else
        snprintf(w->device, sizeof w->device, "cpu");
    w->capacity = reg.kv.capacity_blocks;
    w->head0 = reg.kv.head0;
    w->n_heads = reg.kv.n_heads;
    w->backend = reg.backend;
    w->max_batch = reg.max_batch;
    w->alive = 1;
    w->last_seen = w->t_registered = now;
    w->last_sent = now;
    proto_heartbeat_init(&w->load);
    w->next = c->workers;
    c->workers = w;
    c->n_workers++;
    g->ranks[reg.tp_rank] = w;
    if (!c->kv_fixed) {
        c->kv_fixed = 1;
        c->block_tokens = reg.kv.block_tokens;
        c->kv_dtype = reg.kv.dtype;
    }
    if (reg.model.n_ctx > 0 && reg.model.n_ctx < c->n_ctx) {
        CWARN(c, "worker %s serves a context of %d tokens; duetd's limit drops from %d", reg.worker_id,
              reg.model.n_ctx, c->n_ctx);
        c->n_ctx = reg.model.n_ctx;
    }
    group_update(c, g);
    proto_registered m;
    proto_registered_init(&m);
    m.rank = w->rank;
    m.group = g->id;
    m.role = g->role;
    m.tp_rank = w->tp_rank;
    m.tp_size = w->tp_size;
    m.heartbeat_ms = c->cfg->daemon.heartbeat_ms;
    m.dead_after = c->cfg->daemon.dead_after;
    CINFO(c, "worker %s registered: rank %d, group %d (%s) tp rank %d of %d, %s, %lld KV blocks%s", w->worker_id,
          w->rank, g->id, g->cfg->name, w->tp_rank, w->tp_size, w->device, (long long)w->capacity,
          g->ready ? "; the group is ready" : "");
    if (coord_worker_send(c, w, PROTO_CMD_REGISTERED, PROTO_T_REGISTERED, &m) != 0) goto out;
    if (w->backend == PROTO_BACKEND_TCP) send_comm_tcp(c);
    if (w->backend == PROTO_BACKEND_NCCL) send_comm_nccl(c);
    coord_notify_status(c);
out:
    proto_register_free(&reg);
}

/* ---- worker messages --------------------------------------------------------------------------- */

static creq *req_of(coord_t *c, int64_t rid, const cworker *w)
{
    creq *r = cmap_find(&c->reqs, (uint64_t)rid, NULL, NULL);
    if (r && r->pleader == w && r->pgroup >= 0) return r; /* its prefill group */
    return r && r->leader == w && r->listed == 2 ? r : NULL;
}

static void on_failed(coord_t *c, cworker *w, const proto_failed *f)
{
    if (coord_xfer_failed(c, w, f)) return;
    creq *r = f->rid > 0 ? req_of(c, f->rid, w) : NULL;
    if (!r) {
        CDEBUG(c, "worker %s: failed for rid %lld (not running there): %s", wname(w), (long long)f->rid,
               f->message ? f->message : "");
        return;
    }
    int gid = r->group;
    coord_req_detach(c, r, 0);
    char why[PROTO_MAX_TEXT];
    snprintf(why, sizeof why, "worker %s failed it: %s: %s", wname(w), proto_code_name(f->code),
             f->message ? f->message : "");
    if (f->retryable) coord_req_retry(c, r, gid, why);
    else coord_req_fail(c, r, PROTO_ERR_INTERNAL, "%s", why);
}

void coord_worker_msg(coord_t *c, proto_msg *msg, int fd)
{
    if (msg->cmd == PROTO_CMD_REGISTER) {
        on_register(c, msg, fd);
        return;
    }
    cworker *w = find_live(c, &msg->route);
    if (!w) {
        int was = 0;
        for (cworker *d = c->workers; d; d = d->next) was |= route_eq(&d->route, &msg->route);
        send_worker_error(c, &msg->route, PROTO_ERR_UNEXPECTED_COMMAND, msg->cmd,
                          was ? "%s from a worker declared dead: register again" : "%s before registered",
                          proto_cmd_name(msg->cmd));
        return;
    }
    double now = coord_now_ms();
    w->last_seen = now;
    if (fd >= 0) w->fd = fd;
    proto_err err;
    memset(&err, 0, sizeof err);
    switch (msg->cmd) {
    case PROTO_CMD_HEARTBEAT: {
        proto_heartbeat m;
        if (proto_heartbeat_parse(msg->body, &m, &err) != 0) break;
        w->load = m;
        w->has_load = 1;
        w->load_at = now;
        w->blocks_since_load = 0;
        return;
    }
    case PROTO_CMD_TOKENS: {
        proto_tokens m;
        if (proto_tokens_parse(msg->body, &m, &err) != 0) break;
        for (int i = 0; i < m.n_events; i++) {
            const proto_token_event *e = &m.events[i];
            creq *r = req_of(c, e->rid, w);
            if (!r) continue;
            int from_p = r->pleader == w && r->pgroup >= 0;
            coord_req_tokens(c, r, e->index, e->ids, e->n_ids);
            if (from_p) coord_xfer_tokens(c, r);
        }
        proto_tokens_free(&m);
        return;
    }
    case PROTO_CMD_FINISHED: {
        proto_finished m;
        if (proto_finished_parse(msg->body, &m, &err) != 0) break;
        creq *r = req_of(c, m.rid, w);
        if (r) {
            if (m.n_generated != r->n_gen)
                CWARN(c, "worker %s: finished rid %lld with n_generated %d; duetd received %d tokens", wname(w),
                      (long long)m.rid, m.n_generated, r->n_gen);
            coord_req_finished(c, r, m.reason, m.cached_tokens);
        }
        return;
    }
    case PROTO_CMD_FAILED: {
        proto_failed m;
        if (proto_failed_parse(msg->body, &m, &err) != 0) break;
        on_failed(c, w, &m);
        proto_failed_free(&m);
        return;
    }
    case PROTO_CMD_COMM_ID: {
        proto_comm_id m;
        if (proto_comm_id_parse(msg->body, &m, &err) != 0) break;
        if (w->rank == 0) {
            free(c->nccl_id);
            c->nccl_id = m.unique_id;
            m.unique_id = NULL;
            send_comm_nccl(c);
        } else {
            CWARN(c, "worker %s (rank %d) sent comm_id; only world rank 0 does: ignored", wname(w), w->rank);
        }
        proto_comm_id_free(&m);
        return;
    }
    case PROTO_CMD_ERROR: {
        proto_error m;
        if (proto_error_parse(msg->body, &m, &err) != 0) break;
        CWARN(c, "worker %s reports: %s: %s%s%s%s", wname(w), proto_code_name(m.code), m.message ? m.message : "",
              m.command ? " (answering '" : "", m.command ? m.command : "", m.command ? "')" : "");
        proto_error_free(&m);
        return;
    }
    case PROTO_CMD_RESERVED: {
        proto_reserved m;
        if (proto_reserved_parse(msg->body, &m, &err) != 0) break;
        coord_on_reserved(c, w, &m);
        proto_reserved_free(&m);
        return;
    }
    case PROTO_CMD_KV_READY: {
        proto_kv_ready m;
        if (proto_kv_ready_parse(msg->body, &m, &err) != 0) break;
        coord_on_kv_ready(c, w, &m);
        proto_kv_ready_free(&m);
        return;
    }
    case PROTO_CMD_KV_ACK: {
        proto_xfer_ref m;
        if (proto_parse(PROTO_T_KV_ACK, msg->body, &m, &err) != 0) break;
        coord_on_kv_ack(c, w, &m);
        proto_free(PROTO_T_KV_ACK, &m);
        return;
    }
    default:
        send_worker_error(c, &msg->route, PROTO_ERR_UNEXPECTED_COMMAND, msg->cmd,
                          "frame 1: '%s' is not sent by a worker", proto_cmd_name(msg->cmd));
        return;
    }
    /* a schema error */
    err.cmd = msg->cmd;
    CWARN(c, "worker %s: %s", wname(w), err.message);
    proto_send_error(c->wsock, &msg->route, PROTO_WORKER, &err, ZMQ_DONTWAIT);
}

void coord_worker_disconnected(coord_t *c, int fd)
{
    for (cworker *w = c->workers; w; w = w->next)
        if (w->alive && w->fd == fd) worker_kill(c, w, "its connection closed");
}

void coord_worker_tick(coord_t *c, double now)
{
    int hb = c->cfg->daemon.heartbeat_ms;
    double dead_ms = (double)c->cfg->daemon.dead_after * hb;
    for (cworker *w = c->workers; w; w = w->next) {
        if (!w->alive) continue;
        if (now - w->last_seen > dead_ms) {
            char why[PROTO_MAX_TEXT];
            snprintf(why, sizeof why, "silent for %.0f ms (dead_after %d x heartbeat_ms %d)", now - w->last_seen,
                     c->cfg->daemon.dead_after, hb);
            worker_kill(c, w, why);
        } else if (now - w->last_sent >= hb) {
            proto_heartbeat m;
            proto_heartbeat_init(&m);
            coord_worker_send(c, w, PROTO_CMD_HEARTBEAT, PROTO_T_HEARTBEAT, &m);
        }
    }
    coord_failover(c);
    /* every group down: queued requests wait for one to come back, up to the grace time */
    if (coord_groups_ready(c) > 0) {
        c->t_groups_down = 0;
    } else if (c->q_head && c->t_groups_down > 0) {
        double grace = 2.0 * c->cfg->daemon.dead_after * hb;
        if (now - c->t_groups_down > grace) {
            int p = 0, d = 0; /* ready prefill and decode groups (no colocated one is) */
            for (int i = 0; i < c->n_groups; i++) {
                p += c->groups[i].ready && c->groups[i].role == PROTO_ROLE_PREFILL;
                d += c->groups[i].ready && c->groups[i].role == PROTO_ROLE_DECODE;
            }
            const char *what = p && !d   ? "no decode group is up (every one is down)"
                               : d && !p ? "no prefill group is up (every one is down)"
                                         : "every worker group is down";
            while (c->q_head)
                coord_req_fail(c, c->q_head, PROTO_ERR_WORKER_LOST, "%s and none came back within %.0f ms",
                               what, grace);
        }
    }
}

/* ---- status and health ---------------------------------------------------------------------- */

static void group_load(const coord_t *c, const cgroup *g, int64_t *total, int64_t *free_b, int64_t *cached)
{
    *total = coord_group_capacity(g);
    const cworker *l = g->ranks[0];
    if (l && l->alive && l->has_load && l->load.kv_free_blocks >= 0) {
        *free_b = l->load.kv_free_blocks;
        *cached = l->load.kv_cached_blocks > 0 ? l->load.kv_cached_blocks : 0;
    } else {
        int64_t used = 0;
        for (const creq *r = g->head; r; r = r->lnext) used += coord_blocks_of(c, (int64_t)r->n_prompt + r->n_gen);
        *free_b = *total > used ? *total - used : 0;
        *cached = 0;
    }
}

json_t *coord_status_json(coord_t *c)
{
    proto_status s;
    proto_status_init(&s);
    double now = coord_now_ms();
    s.version = "duet 0.1.0";
    s.model = c->model_name;
    s.model_sha256 = c->sha256;
    s.uptime_s = (now - c->t_start) / 1e3;
    s.groups = calloc((size_t)(c->n_groups ? c->n_groups : 1), sizeof *s.groups);
    s.workers = calloc((size_t)(c->n_workers ? c->n_workers : 1), sizeof *s.workers);
    if (!s.groups || !s.workers) {
        free(s.groups);
        free(s.workers);
        return NULL;
    }
    s.n_groups = c->n_groups;
    for (int i = 0; i < c->n_groups; i++) {
        const cgroup *g = &c->groups[i];
        proto_group_status *o = &s.groups[i];
        o->group = g->id;
        o->role = g->role;
        o->tp_size = g->tp_size;
        for (int r = 0; r < g->tp_size; r++) o->workers_alive += g->ranks[r] && g->ranks[r]->alive;
        o->running = g->n_running;
        const cworker *l = g->ranks[0];
        o->waiting = l && l->has_load && l->load.waiting > 0 ? l->load.waiting : 0;
        group_load(c, g, &o->kv_blocks_total, &o->kv_blocks_free, &o->kv_blocks_cached);
        o->transfers = g->x_count;
        o->transfer_bytes = g->x_bytes;
        o->transfer_ms = g->x_ms;
        o->transfer_gbps = g->x_ms > 0 ? (double)g->x_bytes / (g->x_ms * 1e6) : 0;
        o->transfer_tail_ms = g->x_tail_ms;
        double tot = g->sh_queue + g->sh_prefill + g->sh_transfer + g->sh_decode;
        if (tot > 0) {
            o->share_queue = g->sh_queue / tot;
            o->share_prefill = g->sh_prefill / tot;
            o->share_transfer = g->sh_transfer / tot;
            o->share_decode = g->sh_decode / tot;
        }
        s.kv.blocks_total += o->kv_blocks_total;
        s.kv.blocks_cached += o->kv_blocks_cached;
        int64_t used = o->kv_blocks_total - o->kv_blocks_free - o->kv_blocks_cached;
        s.kv.blocks_used += used > 0 ? used : 0;
    }
    s.kv.use = s.kv.blocks_total > 0 ? (double)s.kv.blocks_used / (double)s.kv.blocks_total : 0;
    int k = 0;
    for (cworker *w = c->workers; w && k < c->n_workers; w = w->next, k++) {
        proto_worker_status *o = &s.workers[k];
        o->worker_id = w->worker_id;
        o->rank = w->rank;
        o->group = w->group;
        o->tp_rank = w->tp_rank;
        o->role = w->role;
        o->device = w->device;
        o->state = !w->alive ? PROTO_WSTATE_DEAD
                   : (w->group >= 0 && c->groups[w->group].ready) ? PROTO_WSTATE_READY
                                                                   : PROTO_WSTATE_STARTING;
        o->last_seen_ms = (int64_t)(now - w->last_seen);
        o->kv_capacity_blocks = w->capacity;
    }
    s.n_workers = k;
    s.queue.waiting = c->n_queued;
    s.queue.running = c->n_running;
    s.queue.limit = c->cfg->daemon.queue_limit;
    s.prefix_cache.prompt_tokens = c->st_prompt_tokens;
    s.prefix_cache.cached_tokens = c->st_cached_tokens;
    s.prefix_cache.hit_rate = c->st_prompt_tokens > 0 ? (double)c->st_cached_tokens / (double)c->st_prompt_tokens : 0;
    s.transfers.completed = c->st_x_done;
    s.transfers.failed = c->st_x_failed;
    for (int i = 0; i < c->n_groups; i++)
        for (const creq *r = c->groups[i].head; r; r = r->lnext) s.transfers.in_flight += r->xstate != XS_NONE && !r->got_kv_ack;
    s.transfers.bytes = c->st_x_bytes;
    s.transfers.mean_ms = c->st_x_done > 0 ? c->st_x_ms_sum / (double)c->st_x_done : 0;
    s.transfers.max_ms = c->st_x_ms_max;
    s.requests.served = c->st_served;
    s.requests.failed = c->st_failed;
    s.requests.cancelled = c->st_cancelled;
    s.requests.retried = c->st_retried;
    json_t *j = proto_status_build(&s); /* borrows the strings */
    free(s.groups);
    free(s.workers);
    return j;
}

json_t *coord_health_json(coord_t *c)
{
    proto_health h;
    proto_health_init(&h);
    int ready = coord_groups_ready(c), alive = 0;
    for (cworker *w = c->workers; w; w = w->next) alive += w->alive;
    h.groups_ready = 0;
    for (int i = 0; i < c->n_groups; i++) h.groups_ready += c->groups[i].ready;
    h.workers_alive = alive;
    h.state = c->phase != COORD_RUNNING ? PROTO_HEALTH_DRAINING : ready ? PROTO_HEALTH_READY : PROTO_HEALTH_STARTING;
    h.ok = c->phase == COORD_RUNNING && ready > 0;
    h.uptime_s = (coord_now_ms() - c->t_start) / 1e3;
    return proto_health_build(&h);
}
