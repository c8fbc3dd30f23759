/* tests/test_sched.c: the worker's step scheduler on tiny random models.
 *
 * Every output is checked against a single-sequence reference loop written like
 * client/generate.c's (prefill in chunks of 512, then one token per forward; sampler
 * history = prompt + generated; stop at an end-of-generation id, a stop id or
 * max_tokens):
 * - 36 concurrent requests (prompts of 1..200 tokens, some sharing a prefix, outputs of
 *   1..40 tokens, greedy and seeded sampling mixed, stop ids and eog ids, requests that
 *   join while others run) give each exactly its reference tokens;
 * - a 300-token prompt prefilled in chunks (max_batch_tokens 64) never stalls 4 decoders;
 * - a KV pool too small for everyone: preemption, same tokens, no block leaked;
 * - prefix cache: cached prompt tokens reported, same tokens;
 * - cancellation while waiting, mid-prefill and mid-decode; a tiny event buffer;
 * - bad requests and bad configurations give clear errors.
 *
 * The models use F32 (and F16) weights: their matrix kernels compute every output row
 * the same way whatever the batch around it, so batched logits equal the reference's
 * bit for bit and token equality is exact. (The quantized kernels take another code
 * path for tiles of 4 tokens, so with Q4/Q8 weights batched and single-sequence logits
 * differ in the last bits, and a near tie can flip a token.)
 */
#include <inttypes.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/testutil.h"

#include "kernels/sample.h"
#include "kv/kv.h"
#include "tests/support/gguf_write.h"
#include "worker/model.h"
#include "worker/sched.h"

static char tmpdir[256];
static char model_file[512];

#define MAX_OUT 64

/* ---- helpers ----------------------------------------------------------------------- */

static model_t *load_model(void)
{
    model_t *m = NULL;
    char err[256];
    if (model_load(model_file, 0, 1, &m, err, sizeof err) != 0) fail_msg("model_load: %s", err);
    return m;
}

static kv_cache_t *new_kv(const model_t *m, int n_blocks)
{
    kv_config c = model_kv_config(m, DTYPE_F16, 0);
    c.budget_bytes = kv_block_bytes(&c) * (size_t)n_blocks;
    kv_cache_t *kv = NULL;
    assert_int_equal(kv_new(&c, &kv), KV_OK);
    assert_int_equal(kv_n_blocks(kv), n_blocks);
    return kv;
}

static unsigned lcg(unsigned *state)
{
    *state = *state * 1103515245u + 12345u;
    return *state >> 8;
}

static void fill_prompt(int32_t *ids, int n, int n_vocab, unsigned seed)
{
    for (int i = 0; i < n; i++) ids[i] = (int32_t)(lcg(&seed) % (unsigned)n_vocab);
}

static sample_params greedy(void)
{
    sample_params p = sample_params_default();
    p.temperature = 0.0f;
    p.repeat_penalty = 1.0f;
    return p;
}

static sample_params sampled(uint64_t seed, float rep)
{
    sample_params p = sample_params_default();
    p.temperature = 0.9f;
    p.top_k = 20;
    p.top_p = 0.95f;
    p.min_p = 0.02f;
    p.repeat_penalty = rep;
    p.seed = seed;
    return p;
}

/* What one request produced. */
typedef struct {
    int32_t tok[MAX_OUT];
    int n;
    int finished, failed;
    sched_finish reason;
    sched_usage usage;
    char msg[192];
} outcome;

/* The reference: q run alone, as client/generate.c runs it. */
static void reference(const model_t *m, model_ctx_t *ctx, kv_cache_t *kv, const sched_req *q,
                      const int32_t *eog, int n_eog, outcome *o)
{
    const int V = model_hparams_of(m)->n_vocab;
    memset(o, 0, sizeof *o);
    int32_t *ids = malloc((size_t)(q->n_prompt + q->max_tokens) * sizeof *ids);
    float *logits = malloc((size_t)V * sizeof(float));
    sampler_t *smp = NULL;
    assert_int_equal(sampler_new(&q->sp, V, &smp), 0);
    memcpy(ids, q->prompt, (size_t)q->n_prompt * sizeof *ids);
    int seq;
    char err[256];
    assert_int_equal(kv_seq_new(kv, &seq), KV_OK);
    const int batch = 512;
    for (int p = 0; p < q->n_prompt; p += batch) {
        int k = q->n_prompt - p < batch ? q->n_prompt - p : batch;
        assert_int_equal(kv_seq_append(kv, seq, ids + p, k), KV_OK);
        model_seq_batch b = {.seq = seq, .pos0 = p, .n_tokens = k, .tokens = ids + p,
                             .logits = p + k == q->n_prompt};
        if (model_forward(ctx, m, kv, &b, 1, logits, err, sizeof err) != 0) fail_msg("%s", err);
        kv_seq_commit(kv, seq, p + k);
    }
    int n = q->n_prompt;
    o->reason = SCHED_FINISH_LENGTH;
    while (o->n < q->max_tokens) {
        int32_t id = sampler_sample(smp, logits, ids, n);
        assert_true(id >= 0);
        ids[n++] = id;
        o->tok[o->n++] = id;
        int is_eog = 0, is_stop = 0;
        for (int i = 0; i < n_eog && !q->ignore_eog; i++) is_eog |= eog[i] == id;
        for (int i = 0; i < q->n_stop_ids; i++) is_stop |= q->stop_ids[i] == id;
        if (is_eog) {
            o->reason = SCHED_FINISH_EOS;
            break;
        }
        if (is_stop) {
            o->reason = SCHED_FINISH_STOP;
            break;
        }
        if (o->n == q->max_tokens) break;
        assert_int_equal(kv_seq_append(kv, seq, &id, 1), KV_OK);
        model_seq_batch b = {.seq = seq, .pos0 = n - 1, .n_tokens = 1, .tokens = &ids[n - 1],
                             .logits = 1};
        if (model_forward(ctx, m, kv, &b, 1, logits, err, sizeof err) != 0) fail_msg("%s", err);
        kv_seq_commit(kv, seq, n);
    }
    o->finished = 1;
    assert_int_equal(kv_seq_free(kv, seq), KV_OK);
    sampler_destroy(&smp);
    free(logits);
    free(ids);
}

/* A reference runner with its own context and roomy cache. */
typedef struct {
    model_ctx_t *ctx;
    kv_cache_t *kv;
} refrun;

static void refrun_init(refrun *rr, const model_t *m)
{
    assert_int_equal(model_ctx_new(m, 512, 2, &rr->ctx), 0);
    rr->kv = new_kv(m, 128);
}

static void refrun_fini(refrun *rr)
{
    model_ctx_destroy(&rr->ctx);
    kv_destroy(&rr->kv);
}

/* Record events into outcomes (ids are base + index). Checks event consistency. */
static void record(const sched_event *ev, int n_ev, uint64_t base, outcome *out, int n_out)
{
    for (int i = 0; i < n_ev; i++) {
        const sched_event *e = &ev[i];
        assert_true(e->id >= base && e->id < base + (uint64_t)n_out);
        outcome *o = &out[e->id - base];
        if (o->finished || o->failed) fail_msg("request %" PRIu64 ": event after its end", e->id);
        switch (e->type) {
        case SCHED_EV_TOKEN:
            assert_int_equal(e->index, o->n);
            assert_int_equal(e->first, o->n == 0);
            assert_true(o->n < MAX_OUT);
            o->tok[o->n++] = e->token;
            break;
        case SCHED_EV_FINISHED:
            o->finished = 1;
            o->reason = e->reason;
            o->usage = e->usage;
            assert_int_equal(e->usage.n_generated, o->n);
            break;
        case SCHED_EV_FAILED:
            o->failed = 1;
            o->usage = e->usage;
            snprintf(o->msg, sizeof o->msg, "%s", e->msg);
            break;
        }
    }
}

/* Step until idle, at most max_steps. Returns the number of steps. */
static int run_until_idle(sched_t *s, uint64_t base, outcome *out, int n_out, int max_steps)
{
    int cap = sched_events_max(s) + 8, steps = 0;
    sched_event *ev = malloc((size_t)cap * sizeof *ev);
    while (sched_busy(s)) {
        int n_ev = -1;
        assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
        record(ev, n_ev, base, out, n_out);
        if (++steps > max_steps) fail_msg("not idle after %d steps", max_steps);
    }
    free(ev);
    return steps;
}

static void assert_same(const outcome *got, const outcome *want, uint64_t id)
{
    if (!got->finished)
        fail_msg("request %" PRIu64 ": not finished (failed %d: %s)", id, got->failed, got->msg);
    if (got->n != want->n || memcmp(got->tok, want->tok, (size_t)got->n * sizeof *got->tok) != 0) {
        char a[512] = "", b[512] = "";
        for (int i = 0; i < got->n; i++)
            snprintf(a + strlen(a), sizeof a - strlen(a), "%d,", got->tok[i]);
        for (int i = 0; i < want->n; i++)
            snprintf(b + strlen(b), sizeof b - strlen(b), "%d,", want->tok[i]);
        fail_msg("request %" PRIu64 ": tokens differ\n  sched:     %s\n  reference: %s", id, a, b);
    }
    if (got->reason != want->reason)
        fail_msg("request %" PRIu64 ": finish %s, reference %s", id, sched_finish_name(got->reason),
                 sched_finish_name(want->reason));
}

static void assert_kv_clean(kv_cache_t *kv)
{
    char msg[256];
    if (kv_check(kv, msg, sizeof msg) != KV_OK) fail_msg("kv_check: %s", msg);
    kv_stats st;
    kv_get_stats(kv, &st);
    assert_int_equal(st.blocks_used, 0);
    assert_int_equal(st.seqs, 0);
}

static sched_t *new_sched(const model_t *m, kv_cache_t *kv, int max_batch, int max_running,
                          const int32_t *eog, int n_eog)
{
    sched_config c = {.max_batch_tokens = max_batch, .max_running = max_running, .n_threads = 2,
                      .eog_ids = eog, .n_eog = n_eog};
    sched_t *s = NULL;
    char err[256];
    if (sched_new(m, kv, &c, &s, err, sizeof err) != SCHED_OK) fail_msg("sched_new: %s", err);
    return s;
}

static void add_ok(sched_t *s, const sched_req *q)
{
    char err[256];
    sched_status st = sched_add(s, q, err, sizeof err);
    if (st != SCHED_OK) fail_msg("sched_add: %s", err);
}

/* ---- tests ------------------------------------------------------------------------- */

#define NREQ 36

static void test_many_requests_equal_alone(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    refrun rr;
    refrun_init(&rr, m);
    unsigned rng = 12345;
    static int32_t prompts[NREQ][200];
    int32_t stops[NREQ];
    sched_req q[NREQ];
    int32_t common[80];
    fill_prompt(common, 80, V, 99);
    for (int i = 0; i < NREQ; i++) {
        int len = i == 0 ? 1 : i == 1 ? 200 : 1 + (int)(lcg(&rng) % 200);
        fill_prompt(prompts[i], len, V, 1000 + i);
        if (i % 3 == 0 && len > 90) memcpy(prompts[i], common, sizeof common);
        q[i] = (sched_req){.id = 500 + i, .prompt = prompts[i], .n_prompt = len,
                           .max_tokens = 1 + (int)(lcg(&rng) % 40)};
        q[i].sp = i % 2 ? sampled(77 + i, i % 4 == 1 ? 1.1f : 1.0f) : greedy();
    }
    q[2].max_tokens = 40;
    /* An eog id that request 2 meets (its 6th token), a stop id for every 5th request
     * (its own middle token); request 7 ignores eog. */
    outcome want[NREQ], got[NREQ];
    reference(m, rr.ctx, rr.kv, &q[2], NULL, 0, &want[2]);
    int32_t eog = want[2].tok[5];
    for (int i = 0; i < NREQ; i += 5) {
        reference(m, rr.ctx, rr.kv, &q[i], &eog, 1, &want[i]);
        stops[i] = want[i].tok[want[i].n / 2];
        q[i].stop_ids = &stops[i];
        q[i].n_stop_ids = 1;
    }
    q[7].ignore_eog = 1;
    int n_eos = 0, n_stop = 0, n_len = 0;
    for (int i = 0; i < NREQ; i++) {
        reference(m, rr.ctx, rr.kv, &q[i], &eog, 1, &want[i]);
        n_eos += want[i].reason == SCHED_FINISH_EOS;
        n_stop += want[i].reason == SCHED_FINISH_STOP;
        n_len += want[i].reason == SCHED_FINISH_LENGTH;
    }
    assert_true(n_eos >= 1 && n_stop >= 1 && n_len >= 1);
    assert_int_equal(want[2].reason, SCHED_FINISH_EOS);

    kv_cache_t *kv = new_kv(m, 512);
    sched_t *s = new_sched(m, kv, 128, 16, &eog, 1);
    memset(got, 0, sizeof got);
    /* two thirds now, the rest while the first ones run */
    for (int i = 0; i < 24; i++) add_ok(s, &q[i]);
    int cap = sched_events_max(s);
    sched_event *ev = malloc((size_t)cap * sizeof *ev);
    for (int step = 0; step < 6; step++) {
        int n_ev;
        assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
        record(ev, n_ev, 500, got, NREQ);
    }
    sched_stats st;
    sched_get_stats(s, &st);
    assert_true(st.running > 1 && st.running <= 16);
    for (int i = 24; i < NREQ; i++) add_ok(s, &q[i]);
    run_until_idle(s, 500, got, NREQ, 5000);
    for (int i = 0; i < NREQ; i++) {
        assert_same(&got[i], &want[i], q[i].id);
        assert_int_equal(got[i].usage.n_prompt, q[i].n_prompt);
        assert_true(got[i].usage.n_cached >= 0 && got[i].usage.n_cached < q[i].n_prompt);
    }
    sched_get_stats(s, &st);
    assert_int_equal(st.running, 0);
    assert_int_equal(st.waiting, 0);
    assert_int_equal(st.requests_finished, NREQ);
    assert_int_equal(st.requests_failed, 0);
    assert_int_equal(st.preemptions, 0);
    uint64_t gen = 0, prompt = 0;
    for (int i = 0; i < NREQ; i++) gen += (uint64_t)want[i].n, prompt += (uint64_t)q[i].n_prompt;
    assert_int_equal(st.tokens_decoded, gen);
    assert_int_equal(st.tokens_prefilled + st.tokens_cached, prompt);
    assert_true(st.tokens_cached >= 64); /* the shared 80-token prefix */
    assert_int_equal(st.kv.blocks_used, 0);
    free(ev);
    sched_destroy(&s);
    sched_destroy(&s); /* safe twice */
    assert_kv_clean(kv);
    kv_destroy(&kv);
    refrun_fini(&rr);
    model_destroy(&m);
}

static void test_chunked_prefill_does_not_stall_decodes(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    refrun rr;
    refrun_init(&rr, m);
    int32_t small[4][10], big[300];
    sched_req q[5];
    for (int i = 0; i < 4; i++) {
        fill_prompt(small[i], 10, V, 50 + i);
        q[i] = (sched_req){.id = i, .prompt = small[i], .n_prompt = 10, .max_tokens = 30,
                           .sp = i % 2 ? sampled(5 + i, 1.0f) : greedy()};
    }
    fill_prompt(big, 300, V, 77);
    q[4] = (sched_req){.id = 4, .prompt = big, .n_prompt = 300, .max_tokens = 5, .sp = greedy()};
    outcome want[5], got[5];
    for (int i = 0; i < 5; i++) reference(m, rr.ctx, rr.kv, &q[i], NULL, 0, &want[i]);

    kv_cache_t *kv = new_kv(m, 256);
    sched_t *s = new_sched(m, kv, 64, 8, NULL, 0);
    memset(got, 0, sizeof got);
    int cap = sched_events_max(s);
    sched_event *ev = malloc((size_t)cap * sizeof *ev);
    for (int i = 0; i < 4; i++) add_ok(s, &q[i]);
    int n_ev;
    assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK); /* 4 prompts, 4 first tokens */
    record(ev, n_ev, 0, got, 5);
    for (int i = 0; i < 4; i++) assert_int_equal(got[i].n, 1);
    add_ok(s, &q[4]);
    int steps = 0;
    while (got[4].n == 0) {
        int before[4];
        for (int i = 0; i < 4; i++) before[i] = got[i].n;
        assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
        record(ev, n_ev, 0, got, 5);
        for (int i = 0; i < 4; i++)
            if (!got[i].finished && got[i].n != before[i] + 1)
                fail_msg("step %d: decoder %d got %d tokens", steps, i, got[i].n - before[i]);
        sched_stats st;
        sched_get_stats(s, &st);
        if (got[4].n == 0) assert_int_equal(st.tokens_prefilled, (uint64_t)(40 + 60 * (steps + 1)));
        steps++;
    }
    assert_int_equal(steps, 5); /* 300 tokens at 64 - 4 per step */
    run_until_idle(s, 0, got, 5, 100);
    for (int i = 0; i < 5; i++) assert_same(&got[i], &want[i], q[i].id);
    free(ev);
    sched_destroy(&s);
    assert_kv_clean(kv);
    kv_destroy(&kv);
    refrun_fini(&rr);
    model_destroy(&m);
}

static void test_preemption(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    refrun rr;
    refrun_init(&rr, m);
    enum { N = 10 };
    int32_t prompts[N][60];
    sched_req q[N];
    outcome want[N], got[N];
    for (int i = 0; i < N; i++) {
        int len = 20 + 4 * i;
        fill_prompt(prompts[i], len, V, 300 + i);
        q[i] = (sched_req){.id = 1000 + i, .prompt = prompts[i], .n_prompt = len,
                           .max_tokens = 40, .sp = i % 2 ? greedy() : sampled(9 + i, 1.1f)};
        reference(m, rr.ctx, rr.kv, &q[i], NULL, 0, &want[i]);
        assert_int_equal(want[i].n, 40);
    }
    /* each needs up to ceil((56 + 40 - 1) / 16) = 6 blocks alone; 10 need ~50 */
    kv_cache_t *kv = new_kv(m, 16);
    sched_t *s = new_sched(m, kv, 128, 10, NULL, 0);
    memset(got, 0, sizeof got);
    for (int i = 0; i < N; i++) add_ok(s, &q[i]);
    run_until_idle(s, 1000, got, N, 5000);
    for (int i = 0; i < N; i++) assert_same(&got[i], &want[i], q[i].id);
    sched_stats st;
    sched_get_stats(s, &st);
    assert_true(st.preemptions > 0);
    assert_true(st.tokens_recomputed > 0);
    assert_int_equal(st.requests_finished, N);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_int_equal(st.tokens_decoded, (uint64_t)N * 40);
    sched_destroy(&s);
    assert_kv_clean(kv);
    kv_destroy(&kv);
    refrun_fini(&rr);
    model_destroy(&m);
}

static void test_prefix_cache(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    refrun rr;
    refrun_init(&rr, m);
    int32_t a[100], b[110];
    fill_prompt(a, 100, V, 4);
    memcpy(b, a, 90 * sizeof *a);
    fill_prompt(b + 90, 20, V, 5);
    sched_req q[3] = {
        {.id = 1, .prompt = a, .n_prompt = 100, .max_tokens = 8, .sp = greedy()},
        {.id = 2, .prompt = b, .n_prompt = 110, .max_tokens = 8, .sp = sampled(3, 1.0f)},
        {.id = 3, .prompt = a, .n_prompt = 100, .max_tokens = 8, .sp = greedy()},
    };
    outcome want[3], got[3];
    for (int i = 0; i < 3; i++) reference(m, rr.ctx, rr.kv, &q[i], NULL, 0, &want[i]);
    kv_cache_t *kv = new_kv(m, 64);
    sched_t *s = new_sched(m, kv, 256, 8, NULL, 0);
    memset(got, 0, sizeof got);
    add_ok(s, &q[0]);
    run_until_idle(s, 1, got, 3, 100);
    assert_int_equal(got[0].usage.n_cached, 0);
    add_ok(s, &q[1]);
    run_until_idle(s, 1, got, 3, 100);
    assert_int_equal(got[1].usage.n_cached, 80); /* 5 full blocks of the shared 90 */
    add_ok(s, &q[2]);
    run_until_idle(s, 1, got, 3, 100);
    assert_int_equal(got[2].usage.n_cached, 96); /* all full blocks of the first 99 tokens */
    for (int i = 0; i < 3; i++) assert_same(&got[i], &want[i], q[i].id);
    assert_memory_equal(got[0].tok, got[2].tok, (size_t)got[0].n * sizeof *got[0].tok);
    sched_stats st;
    sched_get_stats(s, &st);
    assert_int_equal(st.tokens_cached, 176);
    assert_int_equal(st.tokens_prefilled, 100 + 30 + 4);
    assert_true(st.kv.prefix_hit_tokens >= 176);
    sched_destroy(&s);
    assert_kv_clean(kv);
    kv_destroy(&kv);
    refrun_fini(&rr);
    model_destroy(&m);
}

static void test_cancel(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    int32_t big[300], p1[12], p2[12];
    fill_prompt(big, 300, V, 8);
    fill_prompt(p1, 12, V, 9);
    fill_prompt(p2, 12, V, 10);
    sched_req q[3] = {
        {.id = 0, .prompt = big, .n_prompt = 300, .max_tokens = 10, .sp = greedy()},
        {.id = 1, .prompt = p1, .n_prompt = 12, .max_tokens = 30, .sp = sampled(1, 1.0f)},
        {.id = 2, .prompt = p2, .n_prompt = 12, .max_tokens = 30, .sp = greedy()},
    };
    kv_cache_t *kv = new_kv(m, 64);
    sched_t *s = new_sched(m, kv, 64, 2, NULL, 0);
    outcome got[3];
    memset(got, 0, sizeof got);
    int cap = sched_events_max(s) + 4, n_ev;
    sched_event *ev = malloc((size_t)cap * sizeof *ev);
    for (int i = 0; i < 3; i++) add_ok(s, &q[i]);
    /* step 1: request 0's first chunk (64 tokens), request 1 admitted next step */
    assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
    assert_int_equal(n_ev, 0);
    sched_stats st;
    sched_get_stats(s, &st);
    assert_int_equal(st.running, 1);
    assert_int_equal(st.kv.blocks_used, 4);
    /* cancel the waiting request 2 and request 0 mid-prefill: blocks released at once */
    assert_int_equal(sched_cancel(s, 2), SCHED_OK);
    assert_int_equal(sched_cancel(s, 0), SCHED_OK);
    assert_int_equal(sched_cancel(s, 0), SCHED_ERR_NOTFOUND);
    assert_int_equal(sched_cancel(s, 42), SCHED_ERR_NOTFOUND);
    sched_get_stats(s, &st);
    assert_int_equal(st.kv.blocks_used, 0);
    assert_int_equal(st.running + st.waiting, 1);
    assert_int_equal(st.events_pending, 2);
    assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
    record(ev, n_ev, 0, got, 3);
    assert_true(got[0].finished && got[2].finished);
    assert_int_equal(got[0].reason, SCHED_FINISH_CANCELLED);
    assert_int_equal(got[2].reason, SCHED_FINISH_CANCELLED);
    assert_int_equal(got[0].n, 0);
    assert_int_equal(got[1].n, 1); /* request 1 was admitted in that step */
    /* mid-decode */
    while (got[1].n < 4) {
        assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
        record(ev, n_ev, 0, got, 3);
    }
    assert_int_equal(sched_cancel(s, 1), SCHED_OK);
    assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
    assert_int_equal(n_ev, 1);
    record(ev, n_ev, 0, got, 3);
    assert_true(got[1].finished);
    assert_int_equal(got[1].reason, SCHED_FINISH_CANCELLED);
    assert_int_equal(got[1].usage.n_generated, 4);
    assert_int_equal(got[1].usage.n_prompt, 12);
    assert_false(sched_busy(s));
    sched_get_stats(s, &st);
    assert_int_equal(st.requests_finished, 3);
    /* the id is free again; destroy with a running request releases its blocks */
    add_ok(s, &q[1]);
    assert_int_equal(sched_step(s, ev, cap, &n_ev), SCHED_OK);
    sched_get_stats(s, &st);
    assert_int_equal(st.running, 1);
    assert_true(st.kv.blocks_used > 0);
    sched_destroy(&s);
    assert_kv_clean(kv);
    free(ev);
    kv_destroy(&kv);
    model_destroy(&m);
}

/* A buffer of one event: each call delivers one; the tokens are still right. */
static void test_small_event_buffer(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    refrun rr;
    refrun_init(&rr, m);
    int32_t p[3][20];
    sched_req q[3];
    outcome want[3], got[3];
    for (int i = 0; i < 3; i++) {
        fill_prompt(p[i], 20, V, 60 + i);
        q[i] = (sched_req){.id = i, .prompt = p[i], .n_prompt = 20, .max_tokens = 6 + i,
                           .sp = sampled(i, 1.0f)};
        reference(m, rr.ctx, rr.kv, &q[i], NULL, 0, &want[i]);
    }
    kv_cache_t *kv = new_kv(m, 64);
    sched_t *s = new_sched(m, kv, 64, 4, NULL, 0);
    memset(got, 0, sizeof got);
    for (int i = 0; i < 3; i++) add_ok(s, &q[i]);
    sched_event ev;
    int n_ev, calls = 0, max_pending = 0;
    while (sched_busy(s)) {
        assert_int_equal(sched_step(s, &ev, 1, &n_ev), SCHED_OK);
        assert_true(n_ev <= 1);
        record(&ev, n_ev, 0, got, 3);
        sched_stats st;
        sched_get_stats(s, &st);
        if (st.events_pending > max_pending) max_pending = st.events_pending;
        assert_true(++calls < 1000);
    }
    assert_true(max_pending <= sched_events_max(s));
    for (int i = 0; i < 3; i++) assert_same(&got[i], &want[i], q[i].id);
    assert_int_equal(sched_step(s, NULL, 0, &n_ev), SCHED_OK);
    assert_int_equal(n_ev, 0);
    assert_int_equal(sched_step(s, NULL, 1, &n_ev), SCHED_ERR_INVAL);
    sched_destroy(&s);
    assert_kv_clean(kv);
    kv_destroy(&kv);
    refrun_fini(&rr);
    model_destroy(&m);
}

static void expect_add_error(sched_t *s, const sched_req *q, sched_status want, const char *text)
{
    char err[256] = "";
    sched_status st = sched_add(s, q, err, sizeof err);
    if (st != want) fail_msg("sched_add: status %d, wanted %d (%s)", st, want, err);
    if (!strstr(err, text)) fail_msg("sched_add: message '%s' lacks '%s'", err, text);
}

static void test_bad_requests(void **state)
{
    (void)state;
    model_t *m = load_model();
    const int V = model_hparams_of(m)->n_vocab;
    kv_cache_t *kv = new_kv(m, 8); /* 128 tokens */
    sched_config c = {.max_batch_tokens = 32, .max_running = 4, .n_ctx = 200};
    sched_t *s = NULL;
    char err[256];
    assert_int_equal(sched_new(m, kv, &c, &s, err, sizeof err), SCHED_OK);
    const sched_config *cc = sched_config_of(s);
    assert_int_equal(cc->n_threads, 1);
    assert_int_equal(cc->n_ctx, 200);
    int32_t p[150];
    fill_prompt(p, 150, V, 1);
    sched_req q = {.id = 7, .prompt = p, .n_prompt = 10, .max_tokens = 5, .sp = greedy()};
    sched_req b = q;
    b.n_prompt = 0;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "request 7: the prompt is empty");
    b = q;
    b.prompt = NULL;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "the prompt is empty");
    int32_t bad[3] = {1, V, 2};
    b = q;
    b.prompt = bad;
    b.n_prompt = 3;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "prompt token");
    char want[128];
    snprintf(want, sizeof want, "token %d (position 1) is outside the vocabulary [0, %d)", V, V);
    expect_add_error(s, &b, SCHED_ERR_INVAL, want);
    bad[1] = -1;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "token -1 (position 1)");
    b = q;
    b.max_tokens = 0;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "max_tokens 0 must be at least 1");
    int32_t stop = V + 5;
    b = q;
    b.stop_ids = &stop;
    b.n_stop_ids = 1;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "stop token");
    b = q;
    b.sp.repeat_penalty = 0.0f;
    expect_add_error(s, &b, SCHED_ERR_INVAL, "request 7: sampling parameters:");
    b = q;
    b.n_prompt = 150;
    b.max_tokens = 51;
    expect_add_error(s, &b, SCHED_ERR_TOO_LONG,
                     "the prompt (150 tokens) plus max_tokens 51 exceed the context limit of 200");
    b.max_tokens = 50; /* 199 KV positions: 13 blocks > 8 */
    expect_add_error(s, &b, SCHED_ERR_TOO_LONG, "need 13 KV blocks of 16 tokens, more than the whole pool (8 blocks)");
    b.n_prompt = 100;
    b.max_tokens = 29; /* 128 KV positions (the last token is never stored): 8 blocks */
    b.id = 9;
    add_ok(s, &b);
    b.id = 8;
    b.max_tokens = 30;
    expect_add_error(s, &b, SCHED_ERR_TOO_LONG, "more than the whole pool");
    add_ok(s, &q);
    expect_add_error(s, &q, SCHED_ERR_DUP, "request 7: a live request already has this id");
    assert_int_equal(sched_add(s, NULL, err, sizeof err), SCHED_ERR_INVAL);
    sched_destroy(&s);

    /* configurations */
    c = (sched_config){.max_batch_tokens = 8, .max_running = 9};
    assert_int_equal(sched_new(m, kv, &c, &s, err, sizeof err), SCHED_ERR_INVAL);
    assert_non_null(strstr(err, "max_running 9 exceeds max_batch_tokens 8"));
    assert_null(s);
    int32_t eog = V;
    c = (sched_config){.eog_ids = &eog, .n_eog = 1};
    assert_int_equal(sched_new(m, kv, &c, &s, err, sizeof err), SCHED_ERR_INVAL);
    assert_non_null(strstr(err, "eog_ids[0]"));
    c = (sched_config){.max_batch_tokens = -1};
    assert_int_equal(sched_new(m, kv, &c, &s, err, sizeof err), SCHED_ERR_INVAL);
    kv_config kc = model_kv_config(m, DTYPE_F16, 1u << 20);
    kc.n_layers++;
    kv_cache_t *other = NULL;
    assert_int_equal(kv_new(&kc, &other), KV_OK);
    c = (sched_config){0};
    assert_int_equal(sched_new(m, other, &c, &s, err, sizeof err), SCHED_ERR_MODEL);
    assert_non_null(strstr(err, "does not fit the model"));
    kv_destroy(&other);
    assert_int_equal(sched_new(m, kv, &c, &s, err, sizeof err), SCHED_OK);
    assert_int_equal(sched_config_of(s)->max_batch_tokens, 256);
    assert_int_equal(sched_config_of(s)->max_running, 64);
    assert_non_null(sched_model_ctx(s));
    assert_string_equal(sched_finish_name(SCHED_FINISH_EOS), "eos");
    sched_destroy(&s);
    assert_kv_clean(kv);
    kv_destroy(&kv);
    model_destroy(&m);
}

static int setup(void **state)
{
    (void)state;
    return tu_tiny_model("test-sched", tmpdir, sizeof tmpdir, model_file, sizeof model_file);
}

static int teardown(void **state)
{
    (void)state;
    return tu_rmtree(tmpdir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_many_requests_equal_alone),
        cmocka_unit_test(test_chunked_prefill_does_not_stall_decodes),
        cmocka_unit_test(test_preemption),
        cmocka_unit_test(test_prefix_cache),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_small_event_buffer),
        cmocka_unit_test(test_bad_requests),
    };
    return cmocka_run_group_tests_name("sched", tests, setup, teardown);
}
