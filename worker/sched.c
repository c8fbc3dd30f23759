/* worker/sched.c: the step scheduler (continuous batching, chunked prefill, prefix
 * caching, preemption by recomputation). */
#include "worker/sched.h"

#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DEF_MAX_BATCH_TOKENS 256
#define DEF_MAX_RUNNING 64
#define DEF_CTX_CAP 4096

/* One live request. Its tokens are toks[0, n_prompt + n_gen); the KV holds K/V of
 * positions [0, n_done) when it runs, so the tokens [n_done, n_prompt + n_gen) are
 * pending: the whole prompt at first, one token while decoding, prompt and generated
 * tokens after a preemption. When every pending token has been computed, the last
 * one's logits give the next token. */
typedef struct {
    uint64_t id;
    int32_t *toks;        /* [n_prompt + max_tokens] */
    int n_prompt, n_gen, max_tokens;
    int32_t *stop_ids;    /* [n_stop] */
    int n_stop;
    int ignore_eog;
    int ship_kv;
    sample_params sp;
    sample_rng rng;       /* the request's PRNG, carried across steps and preemptions */
    int seq;              /* KV sequence while running, -1 while waiting */
    int n_done;           /* positions with committed K/V */
    int n_high;           /* most positions ever computed (recomputation statistics) */
    int n_cached;         /* prompt tokens attached at first admission; -1 before it */
    uint64_t stamp;       /* admission order: larger is newer */
} req_t;

/* A batch entry's request, logit row (-1: none) and phase. */
typedef struct {
    req_t *r;
    int row;
    int prefill;          /* 1: a prefill chunk (or recomputation), 0: a decode token */
} entry;

struct sched {
    const model_t *m;
    kv_cache_t *kv;
    sched_config cfg;
    int32_t *eog;         /* [cfg.n_eog] */
    int n_vocab, block_tokens;
    model_ctx_t *ctx;
    sampler_t *smp;       /* scratch only: re-armed with each request's parameters and PRNG */
    float *logits;        /* [max_running][n_vocab] */
    model_seq_batch *batch; /* [max_running] this step's batch */
    entry *ent;           /* [max_running] what each batch entry is */
    req_t **run;          /* [max_running], oldest admission first */
    int n_run;
    req_t **wait;         /* [cap_wait], head first */
    int n_wait, cap_wait;
    sched_event *q;       /* queued events [q_head, q_len) */
    int q_head, q_len, q_cap;
    uint64_t next_stamp;
    sched_stats st;
    sched_layer_fn hook;  /* sched_set_layer_hook */
    void *hook_user;
    sched_ship *ships;    /* [max_running] this step's requests that complete with ship_kv */
    int n_ships;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

const char *sched_finish_name(sched_finish f)
{
    switch (f) {
    case SCHED_FINISH_STOP: return "stop";
    case SCHED_FINISH_EOS: return "eos";
    case SCHED_FINISH_LENGTH: return "length";
    case SCHED_FINISH_CANCELLED: return "cancelled";
    }
    return "unknown";
}

static int imin(int a, int b) { return a < b ? a : b; }

static void req_free(req_t *r)
{
    if (!r) return;
    free(r->toks);
    free(r->stop_ids);
    free(r);
}

/* ---- creation ------------------------------------------------------------------------ */

/* model_forward's per-layer hook: the user's layer hook with this step's ships. */
static void on_layer(void *user, int layer)
{
    sched_t *s = user;
    if (s->hook) s->hook(s->hook_user, layer, s->ships, s->n_ships);
}

void sched_set_layer_hook(sched_t *s, sched_layer_fn fn, void *user)
{
    s->hook = fn;
    s->hook_user = user;
}

sched_status sched_new(const model_t *m, kv_cache_t *kv, const sched_config *cfg, sched_t **out,
                       char *err, size_t errlen)
{
    if (!out) return SCHED_ERR_INVAL;
    *out = NULL;
    if (!m || !kv || !cfg) {
        set_err(err, errlen, "sched_new: model, KV cache and configuration are required");
        return SCHED_ERR_INVAL;
    }
    const model_hparams *hp = model_hparams_of(m);
    sched_config c = *cfg;
    if (c.max_batch_tokens == 0) c.max_batch_tokens = DEF_MAX_BATCH_TOKENS;
    if (c.max_running == 0) c.max_running = imin(DEF_MAX_RUNNING, c.max_batch_tokens);
    if (c.n_ctx == 0) c.n_ctx = imin(DEF_CTX_CAP, hp->n_ctx_train);
    if (c.n_threads == 0) c.n_threads = 1;
    if (c.max_batch_tokens < 1 || c.max_running < 1 || c.n_ctx < 1 || c.n_threads < 1 ||
        c.n_eog < 0 || (c.n_eog > 0 && !c.eog_ids)) {
        set_err(err, errlen,
                "sched_new: bad configuration (max_batch_tokens %d, max_running %d, n_ctx %d, "
                "n_threads %d, n_eog %d): counts must be positive",
                c.max_batch_tokens, c.max_running, c.n_ctx, c.n_threads, c.n_eog);
        return SCHED_ERR_INVAL;
    }
    if (c.max_running > c.max_batch_tokens) {
        set_err(err, errlen,
                "sched_new: max_running %d exceeds max_batch_tokens %d (every running "
                "sequence's decode token must fit one step)", c.max_running, c.max_batch_tokens);
        return SCHED_ERR_INVAL;
    }
    for (int i = 0; i < c.n_eog; i++)
        if (c.eog_ids[i] < 0 || c.eog_ids[i] >= hp->n_vocab) {
            set_err(err, errlen, "sched_new: eog_ids[%d] = %d is outside the vocabulary [0, %d)",
                    i, c.eog_ids[i], hp->n_vocab);
            return SCHED_ERR_INVAL;
        }
    const kv_config *kc = kv_config_of(kv);
    kv_config want = model_kv_config(m, kc->dtype, 0);
    if (kc->n_layers != want.n_layers || kc->n_kv_heads != want.n_kv_heads ||
        kc->head_dim != want.head_dim || kc->kv_head0 != want.kv_head0) {
        set_err(err, errlen,
                "sched_new: the KV cache (%d layers, KV heads [%d, +%d), head_dim %d) does not "
                "fit the model's shard (%d layers, KV heads [%d, +%d), head_dim %d)",
                kc->n_layers, kc->kv_head0, kc->n_kv_heads, kc->head_dim, want.n_layers,
                want.kv_head0, want.n_kv_heads, want.head_dim);
        return SCHED_ERR_MODEL;
    }

    sched_t *s = calloc(1, sizeof *s);
    if (!s) goto oom;
    s->m = m;
    s->kv = kv;
    s->cfg = c;
    s->n_vocab = hp->n_vocab;
    s->block_tokens = kc->block_tokens;
    const size_t R = (size_t)c.max_running;
    if (c.n_eog > 0) {
        if (!(s->eog = malloc((size_t)c.n_eog * sizeof *s->eog))) goto oom;
        memcpy(s->eog, c.eog_ids, (size_t)c.n_eog * sizeof *s->eog);
    }
    s->cfg.eog_ids = s->eog;
    sample_params dp = sample_params_default();
    int ok = sampler_new(&dp, s->n_vocab, &s->smp) == 0;
    ok = ok && (s->logits = malloc(R * (size_t)s->n_vocab * sizeof(float)));
    ok = ok && (s->batch = malloc(R * sizeof *s->batch));
    ok = ok && (s->ent = malloc(R * sizeof *s->ent));
    ok = ok && (s->run = malloc(R * sizeof *s->run));
    ok = ok && (s->ships = malloc(R * sizeof *s->ships));
    s->q_cap = 2 * c.max_running + 16;
    ok = ok && (s->q = malloc((size_t)s->q_cap * sizeof *s->q));
    if (!ok) goto oom;
    if (model_ctx_new(m, c.max_batch_tokens, c.n_threads, &s->ctx) != 0) {
        set_err(err, errlen,
                "sched_new: cannot make a model context of %d tokens and %d threads (out of "
                "memory?)", c.max_batch_tokens, c.n_threads);
        sched_destroy(&s);
        return SCHED_ERR_MODEL;
    }
    model_ctx_set_progress(s->ctx, on_layer, s);
    *out = s;
    return SCHED_OK;
oom:
    set_err(err, errlen, "sched_new: out of memory");
    sched_destroy(&s);
    return SCHED_ERR_NOMEM;
}

void sched_destroy(sched_t **self_p)
{
    if (!self_p || !*self_p) return;
    sched_t *s = *self_p;
    for (int i = 0; i < s->n_run; i++) {
        kv_seq_free(s->kv, s->run[i]->seq);
        req_free(s->run[i]);
    }
    for (int i = 0; i < s->n_wait; i++) req_free(s->wait[i]);
    model_ctx_destroy(&s->ctx);
    sampler_destroy(&s->smp);
    free(s->eog);
    free(s->logits);
    free(s->batch);
    free(s->ent);
    free(s->run);
    free(s->ships);
    free(s->wait);
    free(s->q);
    free(s);
    *self_p = NULL;
}

const sched_config *sched_config_of(const sched_t *s) { return &s->cfg; }
model_ctx_t *sched_model_ctx(sched_t *s) { return s->ctx; }
int sched_events_max(const sched_t *s) { return 2 * s->cfg.max_running; }
int sched_busy(const sched_t *s) { return s->n_run + s->n_wait + (s->q_len - s->q_head) > 0; }

void sched_get_stats(const sched_t *s, sched_stats *out)
{
    *out = s->st;
    out->running = s->n_run;
    out->waiting = s->n_wait;
    out->events_pending = s->q_len - s->q_head;
    kv_get_stats(s->kv, &out->kv);
}

/* ---- queues -------------------------------------------------------------------------- */

static req_t **find(sched_t *s, uint64_t id, int *running)
{
    for (int i = 0; i < s->n_run; i++)
        if (s->run[i]->id == id) {
            *running = 1;
            return &s->run[i];
        }
    for (int i = 0; i < s->n_wait; i++)
        if (s->wait[i]->id == id) {
            *running = 0;
            return &s->wait[i];
        }
    return NULL;
}

static void remove_at(req_t **arr, int *n, int i)
{
    memmove(arr + i, arr + i + 1, (size_t)(*n - i - 1) * sizeof *arr);
    (*n)--;
}

static void remove_run(sched_t *s, const req_t *r)
{
    for (int i = 0; i < s->n_run; i++)
        if (s->run[i] == r) {
            remove_at(s->run, &s->n_run, i);
            return;
        }
}

/* Room for n more queued events. 0 or -1. */
static int reserve_events(sched_t *s, int n)
{
    if (s->q_head > 0) {
        memmove(s->q, s->q + s->q_head, (size_t)(s->q_len - s->q_head) * sizeof *s->q);
        s->q_len -= s->q_head;
        s->q_head = 0;
    }
    if (s->q_len + n <= s->q_cap) return 0;
    int cap = (s->q_len + n) * 2;
    sched_event *q = realloc(s->q, (size_t)cap * sizeof *q);
    if (!q) return -1;
    s->q = q;
    s->q_cap = cap;
    return 0;
}

/* Append an event (room reserved beforehand). */
static sched_event *push_event(sched_t *s, const req_t *r, sched_event_type type)
{
    sched_event *e = &s->q[s->q_len++];
    memset(e, 0, sizeof *e);
    e->id = r->id;
    e->type = type;
    e->usage.n_prompt = r->n_prompt;
    e->usage.n_cached = r->n_cached > 0 ? r->n_cached : 0;
    e->usage.n_generated = r->n_gen;
    return e;
}

static void drain(sched_t *s, sched_event *ev, int cap, int *n)
{
    while (*n < cap && s->q_head < s->q_len) ev[(*n)++] = s->q[s->q_head++];
    if (s->q_head == s->q_len) s->q_head = s->q_len = 0;
}

/* End a running or waiting request with FINISHED(reason) or FAILED(msg); frees it. */
static void end_req(sched_t *s, req_t *r, sched_event_type type, sched_finish reason,
                    const char *msg)
{
    sched_event *e = push_event(s, r, type);
    if (type == SCHED_EV_FINISHED) {
        e->reason = reason;
        s->st.requests_finished++;
    } else {
        snprintf(e->msg, sizeof e->msg, "%s", msg);
        s->st.requests_failed++;
    }
    if (r->seq >= 0) {
        kv_seq_free(s->kv, r->seq);
        remove_run(s, r);
    }
    req_free(r);
}

/* ---- requests ------------------------------------------------------------------------ */

sched_status sched_add(sched_t *s, const sched_req *q, char *err, size_t errlen)
{
    if (!s || !q) {
        set_err(err, errlen, "sched_add: NULL scheduler or request");
        return SCHED_ERR_INVAL;
    }
    const uint64_t id = q->id;
    if (q->n_prompt < 1 || !q->prompt) {
        set_err(err, errlen, "request %" PRIu64 ": the prompt is empty", id);
        return SCHED_ERR_INVAL;
    }
    for (int i = 0; i < q->n_prompt; i++)
        if (q->prompt[i] < 0 || q->prompt[i] >= s->n_vocab) {
            set_err(err, errlen,
                    "request %" PRIu64 ": prompt token %d (position %d) is outside the "
                    "vocabulary [0, %d)", id, q->prompt[i], i, s->n_vocab);
            return SCHED_ERR_INVAL;
        }
    if (q->max_tokens < 1) {
        set_err(err, errlen, "request %" PRIu64 ": max_tokens %d must be at least 1", id,
                q->max_tokens);
        return SCHED_ERR_INVAL;
    }
    if (q->n_stop_ids < 0 || (q->n_stop_ids > 0 && !q->stop_ids)) {
        set_err(err, errlen, "request %" PRIu64 ": bad stop id list (%d ids)", id, q->n_stop_ids);
        return SCHED_ERR_INVAL;
    }
    for (int i = 0; i < q->n_stop_ids; i++)
        if (q->stop_ids[i] < 0 || q->stop_ids[i] >= s->n_vocab) {
            set_err(err, errlen,
                    "request %" PRIu64 ": stop token %d is outside the vocabulary [0, %d)", id,
                    q->stop_ids[i], s->n_vocab);
            return SCHED_ERR_INVAL;
        }
    char why[160];
    if (sample_params_check(&q->sp, why, sizeof why) != 0) {
        set_err(err, errlen, "request %" PRIu64 ": sampling parameters: %s", id, why);
        return SCHED_ERR_INVAL;
    }
    const int64_t total = (int64_t)q->n_prompt + q->max_tokens;
    if (total > s->cfg.n_ctx) {
        set_err(err, errlen,
                "request %" PRIu64 ": the prompt (%d tokens) plus max_tokens %d exceed the "
                "context limit of %d tokens", id, q->n_prompt, q->max_tokens, s->cfg.n_ctx);
        return SCHED_ERR_TOO_LONG;
    }
    /* The last generated token never enters the KV. */
    const int64_t blocks = (total - 1 + s->block_tokens - 1) / s->block_tokens;
    if (blocks > kv_n_blocks(s->kv)) {
        set_err(err, errlen,
                "request %" PRIu64 ": the prompt (%d tokens) plus max_tokens %d need %" PRId64
                " KV blocks of %d tokens, more than the whole pool (%d blocks)",
                id, q->n_prompt, q->max_tokens, blocks, s->block_tokens, kv_n_blocks(s->kv));
        return SCHED_ERR_TOO_LONG;
    }
    if (q->has_kv) {
        const int32_t *kt = kv_seq_tokens(s->kv, q->kv_seq);
        if (q->n_kv < 1 || q->n_kv >= q->n_prompt || !kt ||
            kv_seq_len(s->kv, q->kv_seq) != q->n_kv ||
            memcmp(kt, q->prompt, (size_t)q->n_kv * sizeof *kt) != 0) {
            set_err(err, errlen,
                    "request %" PRIu64 ": KV sequence %d does not hold the first %d of the %d "
                    "prompt tokens (it must hold 1 to n_prompt - 1 of them, the same ones)", id,
                    q->kv_seq, q->n_kv, q->n_prompt);
            return SCHED_ERR_INVAL;
        }
    }
    int running;
    if (find(s, id, &running)) {
        set_err(err, errlen, "request %" PRIu64 ": a live request already has this id", id);
        return SCHED_ERR_DUP;
    }
    if (s->n_wait == s->cap_wait) {
        int cap = s->cap_wait ? s->cap_wait * 2 : 64;
        req_t **w = realloc(s->wait, (size_t)cap * sizeof *w);
        if (!w) goto oom;
        s->wait = w;
        s->cap_wait = cap;
    }
    req_t *r = calloc(1, sizeof *r);
    if (!r) goto oom;
    r->toks = malloc((size_t)total * sizeof *r->toks);
    r->stop_ids = malloc((size_t)(q->n_stop_ids ? q->n_stop_ids : 1) * sizeof *r->stop_ids);
    if (!r->toks || !r->stop_ids) {
        req_free(r);
        goto oom;
    }
    r->id = id;
    memcpy(r->toks, q->prompt, (size_t)q->n_prompt * sizeof *r->toks);
    r->n_prompt = q->n_prompt;
    r->max_tokens = q->max_tokens;
    if (q->n_stop_ids) memcpy(r->stop_ids, q->stop_ids, (size_t)q->n_stop_ids * sizeof *r->stop_ids);
    r->n_stop = q->n_stop_ids;
    r->ignore_eog = q->ignore_eog;
    r->ship_kv = q->ship_kv;
    r->sp = q->sp;
    if (q->rng)
        r->rng = *q->rng;
    else
        sample_rng_seed(&r->rng, q->sp.seed);
    r->seq = -1;
    r->n_cached = -1;
    if (q->has_kv) {
        if (s->n_run < s->cfg.max_running) {
            r->seq = q->kv_seq;
            r->n_done = r->n_high = q->n_kv;
            r->n_cached = 0;
            r->stamp = s->next_stamp++;
            s->run[s->n_run++] = r;
            return SCHED_OK;
        }
        kv_seq_free(s->kv, q->kv_seq); /* its committed blocks stay in the prefix cache */
    }
    s->wait[s->n_wait++] = r;
    return SCHED_OK;
oom:
    set_err(err, errlen, "request %" PRIu64 ": out of memory", id);
    return SCHED_ERR_NOMEM;
}

sched_status sched_cancel(sched_t *s, uint64_t id)
{
    if (!s) return SCHED_ERR_INVAL;
    int running;
    req_t **slot = find(s, id, &running);
    if (!slot) return SCHED_ERR_NOTFOUND;
    if (reserve_events(s, 1) != 0) return SCHED_ERR_NOMEM;
    req_t *r = *slot;
    if (!running) remove_at(s->wait, &s->n_wait, (int)(slot - s->wait));
    end_req(s, r, SCHED_EV_FINISHED, SCHED_FINISH_CANCELLED, NULL);
    return SCHED_OK;
}

/* ---- one step ------------------------------------------------------------------------ */

/* Release run[i]'s blocks (full ones stay cached) and put it at the head of the waiting
 * queue, to recompute its tokens when admitted again. */
static void preempt(sched_t *s, int i)
{
    req_t *r = s->run[i];
    kv_seq_free(s->kv, r->seq);
    r->seq = -1;
    r->n_done = 0;
    remove_at(s->run, &s->n_run, i);
    memmove(s->wait + 1, s->wait, (size_t)s->n_wait * sizeof *s->wait);
    s->wait[0] = r;
    s->n_wait++;
    s->st.preemptions++;
}

/* The most tokens, up to want, that seq can append now. */
static int fit_tokens(const kv_cache_t *kv, int seq, int want)
{
    if (want <= 0 || kv_can_append(kv, seq, want)) return want > 0 ? want : 0;
    int lo = 0, hi = want; /* lo fits, hi does not */
    while (hi - lo > 1) {
        int mid = lo + (hi - lo) / 2;
        if (kv_can_append(kv, seq, mid))
            lo = mid;
        else
            hi = mid;
    }
    return lo;
}

/* Reserve k pending tokens of r and add them to the batch. 0, or -1 (KV refused). */
static int add_to_batch(sched_t *s, req_t *r, int k, int prefill, int *nb)
{
    if (kv_seq_append(s->kv, r->seq, r->toks + r->n_done, k) != KV_OK) return -1;
    const int pending = r->n_prompt + r->n_gen - r->n_done;
    s->batch[*nb] = (model_seq_batch){.seq = r->seq, .pos0 = r->n_done, .n_tokens = k,
                                      .tokens = r->toks + r->n_done, .logits = k == pending};
    s->ent[*nb] = (entry){.r = r, .row = -1, .prefill = prefill};
    (*nb)++;
    return 0;
}

static void fail_kv(sched_t *s, req_t *r)
{
    char msg[160];
    snprintf(msg, sizeof msg, "request %" PRIu64 ": the KV cache refused %d tokens at position %d",
             r->id, r->n_prompt + r->n_gen - r->n_done, r->n_done);
    end_req(s, r, SCHED_EV_FAILED, 0, msg);
}

/* Build this step's batch; returns its number of entries.
 *
 * Progress: the oldest running sequence is never a victim (a decode preempts only newer
 * ones, and itself only when it is the newest), and sched_add admitted only requests that
 * fit the pool alone, so it always gets its blocks. At most one sequence is left
 * partially prefilled by a step, and it is the newest: a chunk cut short by the budget
 * leaves no budget to admit anyone after it, and one cut short by the KV leaves no block.
 * So a prefill that waits for blocks waits for older decodes, which finish or preempt it. */
static int plan(sched_t *s)
{
    kv_cache_t *kv = s->kv;
    int nb = 0, budget = s->cfg.max_batch_tokens, preempted = 0;
    /* 1. decode tokens, oldest first; make room by preempting the newest */
    for (int i = 0; i < s->n_run;) {
        req_t *r = s->run[i];
        if (r->n_prompt + r->n_gen - r->n_done != 1) {
            i++;
            continue;
        }
        int self = 0;
        while (!kv_can_append(kv, r->seq, 1)) {
            self = s->n_run - 1 == i;
            preempt(s, s->n_run - 1);
            preempted = 1;
            if (self) break;
        }
        if (self) break;
        if (add_to_batch(s, r, 1, 0, &nb) != 0) {
            fail_kv(s, r);
            continue;
        }
        budget--;
        i++;
    }
    /* 2. partially prefilled sequences, oldest first */
    for (int i = 0; i < s->n_run && budget > 0;) {
        req_t *r = s->run[i];
        int pending = r->n_prompt + r->n_gen - r->n_done;
        int k = pending > 1 ? fit_tokens(kv, r->seq, imin(pending, budget)) : 0;
        if (k > 0) {
            if (add_to_batch(s, r, k, 1, &nb) != 0) {
                fail_kv(s, r);
                continue;
            }
            budget -= k;
        }
        i++;
    }
    /* 3. admissions, first come first served; none after a preemption (it would only
     * take back the blocks that the preemption freed) */
    while (!preempted && budget > 0 && s->n_wait > 0 && s->n_run < s->cfg.max_running) {
        req_t *r = s->wait[0];
        const int n_total = r->n_prompt + r->n_gen, bt = s->block_tokens;
        /* A first estimate without touching the cache: the blocks that the cached prefix
         * would pin may all be among the evictable ones. */
        int c = kv_prefix_lookup(kv, r->toks, n_total - 1);
        int64_t avail = (int64_t)kv_free_blocks(kv) + kv_evictable_blocks(kv) - c / bt;
        if (avail * bt < 1) break;
        int seq;
        if (kv_seq_new(kv, &seq) != KV_OK) break; /* no sequence slot */
        if (kv_prefix_attach(kv, seq, r->toks, n_total - 1, &c) != KV_OK) {
            kv_seq_free(kv, seq);
            break;
        }
        int k = fit_tokens(kv, seq, imin(n_total - c, budget));
        if (k == 0) {
            kv_seq_free(kv, seq);
            break;
        }
        remove_at(s->wait, &s->n_wait, 0);
        r->seq = seq;
        r->n_done = c;
        r->stamp = s->next_stamp++;
        if (r->n_cached < 0) {
            r->n_cached = c < r->n_prompt ? c : r->n_prompt;
            s->st.tokens_cached += (uint64_t)r->n_cached;
        }
        s->run[s->n_run++] = r;
        if (add_to_batch(s, r, k, 1, &nb) != 0) {
            fail_kv(s, r);
            continue;
        }
        budget -= k;
    }
    return nb;
}

/* The next token of r from its logit row: returns 0, or -1 (r failed and was freed). */
static int sample_next(sched_t *s, req_t *r, const float *row)
{
    const int n = r->n_prompt + r->n_gen;
    if (sampler_reset(s->smp, &r->sp) != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "request %" PRIu64 ": bad sampling parameters", r->id);
        end_req(s, r, SCHED_EV_FAILED, 0, msg);
        return -1;
    }
    *sampler_rng(s->smp) = r->rng;
    int32_t tok = sampler_sample(s->smp, row, r->toks, n);
    r->rng = *sampler_rng(s->smp);
    if (tok < 0) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "request %" PRIu64 ": sampling found no finite logit at position %d", r->id, n);
        end_req(s, r, SCHED_EV_FAILED, 0, msg);
        return -1;
    }
    r->toks[n] = tok;
    r->n_gen++;
    s->st.tokens_decoded++;
    sched_event *e = push_event(s, r, SCHED_EV_TOKEN);
    e->token = tok;
    e->index = r->n_gen - 1;
    e->first = r->n_gen == 1;
    e->rng = r->rng;
    int eog = 0, stop = 0;
    if (!r->ignore_eog)
        for (int i = 0; i < s->cfg.n_eog && !eog; i++) eog = s->eog[i] == tok;
    for (int i = 0; i < r->n_stop && !eog && !stop; i++) stop = r->stop_ids[i] == tok;
    if (eog || stop || r->n_gen == r->max_tokens)
        end_req(s, r, SCHED_EV_FINISHED,
                eog ? SCHED_FINISH_EOS : stop ? SCHED_FINISH_STOP : SCHED_FINISH_LENGTH, NULL);
    return 0;
}

sched_status sched_step(sched_t *s, sched_event *events, int cap, int *n_events)
{
    if (n_events) *n_events = 0;
    if (!s || !n_events || cap < 0 || (cap > 0 && !events)) return SCHED_ERR_INVAL;
    drain(s, events, cap, n_events);
    if (s->q_len > s->q_head) return SCHED_OK;
    /* Room for every event this step can make, before anything changes. */
    if (reserve_events(s, 2 * s->cfg.max_running) != 0) return SCHED_ERR_NOMEM;

    int nb = plan(s);
    if (nb == 0) {
        drain(s, events, cap, n_events);
        return SCHED_OK;
    }
    int rows = 0;
    s->n_ships = 0;
    for (int i = 0; i < nb; i++) {
        s->ent[i].row = s->batch[i].logits ? rows++ : -1;
        const req_t *r = s->ent[i].r;
        if (r->ship_kv && s->batch[i].logits)
            s->ships[s->n_ships++] = (sched_ship){.id = r->id, .seq = r->seq,
                                                  .n_tokens = r->n_done + s->batch[i].n_tokens};
    }
    char err[160];
    if (model_forward(s->ctx, s->m, s->kv, s->batch, nb, s->logits, err, sizeof err) != 0) {
        for (int i = 0; i < nb; i++) {
            char msg[192];
            snprintf(msg, sizeof msg, "request %" PRIu64 ": forward pass failed: %s",
                     s->ent[i].r->id, err);
            end_req(s, s->ent[i].r, SCHED_EV_FAILED, 0, msg);
        }
        drain(s, events, cap, n_events);
        return SCHED_OK;
    }
    s->st.steps++;
    for (int i = 0; i < nb; i++) {
        const entry *e = &s->ent[i];
        req_t *r = e->r;
        const model_seq_batch *b = &s->batch[i];
        if (e->prefill) s->st.tokens_prefilled += (uint64_t)b->n_tokens;
        if (r->n_done < r->n_high)
            s->st.tokens_recomputed +=
                (uint64_t)(imin(r->n_done + b->n_tokens, r->n_high) - r->n_done);
        r->n_done += b->n_tokens;
        if (r->n_done > r->n_high) r->n_high = r->n_done;
        kv_seq_commit(s->kv, r->seq, r->n_done);
        if (e->row >= 0) sample_next(s, r, s->logits + (size_t)e->row * s->n_vocab);
    }
    drain(s, events, cap, n_events);
    return SCHED_OK;
}
