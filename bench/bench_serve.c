/* bench/bench_serve.c: the service under load: N concurrent clients against a running duetd.
 *
 * Clients: N threads, each with its own libduet connection (its own ZeroMQ DEALER socket)
 * and one request in flight at a time (a closed loop: a client sends its next request when
 * its previous one is done). The requests are numbered 0, 1, 2, ...; a free client takes the
 * next number, until R requests were sent (-n) or the duration ran out (--duration; requests
 * in flight then still finish and count).
 *
 * Workload (fixed, seeded; --seed, default 42), request i:
 *   prompt      uniform 16..512 token ids (--prompt MIN:MAX), sent as token ids (no chat
 *               template), each id uniform in [1000, 20000) (--ids LO:HI)
 *   output      uniform 16..128 tokens (--output MIN:MAX): max_tokens, with ignore_eos so
 *               that every request generates exactly that many
 *   sampling    greedy (temperature 0); stream = 1
 * Both lengths depend only on the seed and i, so every concurrency level runs the same
 * sequence of lengths (a level with more requests extends it). The token ids depend on the
 * seed, i and N (and --salt), so the levels share no prompt prefix: duetd's prefix cache
 * would otherwise serve a later level's prompts from an earlier level's (the "cached"
 * column shows any prompt token that came from the cache).
 *
 * Measured per request, on the client's monotonic clock:
 *   TTFT   from sending `generate` to the arrival of the first DELTA with a token
 *   TPOT   (arrival of the last DELTA - arrival of the first) / (tokens - 1)
 *   E2E    from sending to the arrival of DONE
 * and beside them duetd's own figures from the result (timings.ttft_ms, tpot_ms_mean,
 * total_ms, queue_ms; measured from duetd's receipt of the request). Percentiles are over
 * the level's completed requests, linear between order statistics (numpy's default); with
 * fewer than 100 requests p99 lies between the two slowest.
 * Throughput per level: completed requests, output tokens (completion_tokens) and prompt +
 * output tokens, each divided by the level's wall time (first send to last DONE).
 *
 *   bench_serve [-e ENDPOINT] [-c 1,4,16] [-n REQUESTS | --duration S] [--seed S]
 *               [--prompt MIN:MAX] [--output MIN:MAX] [--ids LO:HI] [--salt X]
 *               [--wait-ready S] [--timeout S] [--json]
 *
 * -n defaults to max(8, 2N) per level. --wait-ready polls duetd's health first. Prints a
 * Markdown table (--json: one JSON document instead). Exits 1 when any request failed.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "client/libduet.h"

#define MAX_LEVELS 16
#define DURATION_CAP 100000 /* requests recorded per level in --duration mode */

typedef struct {
    const char *endpoint;
    int levels[MAX_LEVELS];      /* concurrency levels, in order */
    int n_levels;
    int requests;                /* per level; 0: max(8, 2N) */
    double duration_s;           /* > 0: send for this long instead of -n */
    uint64_t seed, salt;
    int prompt_min, prompt_max;  /* prompt tokens, inclusive */
    int output_min, output_max;  /* max_tokens, inclusive */
    int mix;                     /* --mix: even requests answer in 8..16 tokens, odd ones have
                                    16..32-token prompts */
    int id_lo, id_hi;            /* token ids in [id_lo, id_hi) */
    double wait_ready_s;
    int timeout_ms;              /* longest wait for one event */
    int json;
} options;

/* One request's outcome. Written by the client thread that ran it. */
typedef struct {
    int sent;                    /* 1 once taken by a client */
    int ok;                      /* 1 when it ended with DONE */
    int prompt_tokens, output_tokens, cached_tokens, n_delta_tokens;
    double t_send, t_first, t_last, t_done; /* client clock, ms from the level's start */
    duet_timings server;
    duet_code err_code;
    char err[160];
} record;

typedef struct {
    const options *o;
    int clients;                 /* N */
    int cap;                     /* records[] length: requests to send at most */
    record *records;             /* [cap] */
    atomic_int next;             /* next request number */
    double t0;                   /* level start, absolute ms */
    pthread_barrier_t start;
} level_run;

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

/* splitmix64: one well-mixed 64-bit value per (state) step. */
static uint64_t mix(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int uniform(uint64_t *s, int lo, int hi) /* inclusive */
{
    return lo + (int)(mix(s) % (uint64_t)(hi - lo + 1));
}

/* Request i's prompt and output lengths: from the seed and i only. */
static void lengths(const options *o, int i, int *prompt, int *output)
{
    uint64_t s = o->seed * 0x100000001b3ull + (uint64_t)i;
    mix(&s);
    *prompt = uniform(&s, o->prompt_min, o->prompt_max);
    *output = uniform(&s, o->output_min, o->output_max);
    if (o->mix) { /* long prompts with short answers, short prompts with long answers */
        if (i % 2 == 0)
            *output = uniform(&s, 8, 16);
        else
            *prompt = uniform(&s, 16, 32);
    }
}

/* Request i's prompt ids at concurrency n. */
static void prompt_ids(const options *o, int n, int i, int32_t *ids, int len)
{
    uint64_t s = o->seed ^ (o->salt * 0xd6e8feb86659fd93ull) ^ ((uint64_t)n << 40) ^
                 ((uint64_t)i * 0xa0761d6478bd642full);
    mix(&s);
    for (int k = 0; k < len; k++) ids[k] = uniform(&s, o->id_lo, o->id_hi - 1);
}

static void fail(record *r, duet_code code, const char *msg)
{
    r->ok = 0;
    r->err_code = code;
    snprintf(r->err, sizeof r->err, "%.150s", msg);
}

/* Run request i on client c, filling rec. */
static void run_one(level_run *L, duet_client *c, int i, int32_t *ids)
{
    const options *o = L->o;
    record *rec = &L->records[i];
    int plen, olen;
    lengths(o, i, &plen, &olen);
    prompt_ids(o, L->clients, i, ids, plen);
    char id[32];
    snprintf(id, sizeof id, "b%d", i);
    duet_params p;
    duet_params_init(&p);
    p.id = id;
    p.tokens = ids;
    p.n_tokens = plen;
    p.sampling.temperature = 0;
    p.max_tokens = olen;
    p.ignore_eos = 1;
    p.stream = 1;
    rec->sent = 1;
    rec->t_send = now_ms() - L->t0;
    duet_request *req = NULL;
    duet_error err;
    if (duet_generate(c, &p, &req, &err) != DUET_OK) {
        fail(rec, err.code, err.message);
        return;
    }
    for (;;) {
        duet_event ev;
        duet_code rc = duet_next(req, o->timeout_ms, &ev, &err);
        double t = now_ms() - L->t0;
        if (rc != DUET_OK) {
            fail(rec, rc, err.message);
            break;
        }
        if (ev.kind == DUET_EVENT_DELTA && ev.n_token_ids > 0) {
            if (rec->n_delta_tokens == 0) rec->t_first = t;
            rec->t_last = t;
            rec->n_delta_tokens += ev.n_token_ids;
        } else if (ev.kind == DUET_EVENT_DONE) {
            const duet_result *res = ev.result;
            rec->t_done = t;
            rec->ok = rec->n_delta_tokens > 0;
            rec->prompt_tokens = res->usage.prompt_tokens;
            rec->output_tokens = res->usage.completion_tokens;
            rec->cached_tokens = res->usage.cached_prompt_tokens;
            rec->server = res->timings;
            if (!rec->ok) fail(rec, DUET_E_BAD_REPLY, "done without any streamed token");
            break;
        } else if (ev.kind == DUET_EVENT_ERROR) {
            fail(rec, ev.error->code, ev.error->message);
            break;
        }
    }
    duet_request_free(&req);
}

static void *client_main(void *arg)
{
    level_run *L = arg;
    const options *o = L->o;
    duet_client *c = NULL;
    duet_error err;
    int32_t *ids = malloc((size_t)o->prompt_max * sizeof *ids);
    duet_code rc = duet_connect(o->endpoint, NULL, &c, &err);
    /* bring the connection up before the clock starts */
    if (rc == DUET_OK) rc = duet_health(c, 10000, NULL, NULL, &err);
    pthread_barrier_wait(&L->start);
    for (;;) {
        int i = atomic_fetch_add(&L->next, 1);
        if (i >= L->cap) break;
        if (o->duration_s > 0 && now_ms() - L->t0 >= o->duration_s * 1e3) break;
        if (rc != DUET_OK || !ids) {
            L->records[i].sent = 1;
            fail(&L->records[i], rc != DUET_OK ? rc : DUET_E_SYSTEM,
                 rc != DUET_OK ? err.message : "out of memory");
            break;
        }
        run_one(L, c, i, ids);
    }
    duet_destroy(&c);
    free(ids);
    return NULL;
}

/* ---- statistics ---------------------------------------------------------------------- */

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct {
    double p50, p90, p99, mean;
    int n;
} dist;

/* Percentiles of v[n] (sorted in place), linear between order statistics. */
static dist summarize(double *v, int n)
{
    dist d = {0};
    d.n = n;
    if (n == 0) return d;
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    double q[3] = {0.50, 0.90, 0.99}, *out[3] = {&d.p50, &d.p90, &d.p99};
    for (int k = 0; k < 3; k++) {
        double pos = q[k] * (n - 1);
        int lo = (int)pos;
        int hi = lo + 1 < n ? lo + 1 : lo;
        *out[k] = v[lo] + (pos - lo) * (v[hi] - v[lo]);
    }
    for (int i = 0; i < n; i++) d.mean += v[i] / n;
    return d;
}

typedef struct {
    int clients, sent, completed, errors;
    double wall_s, req_s, out_tok_s, total_tok_s;
    long prompt_tokens, output_tokens, cached_tokens;
    dist ttft_c, ttft_d, tpot_c, tpot_d, e2e_c, e2e_d, queue_d;
    char first_error[200];
} level_stats;

static level_stats stats(const level_run *L)
{
    level_stats s = {.clients = L->clients};
    int n = L->cap;
    double *v[7];
    for (int k = 0; k < 7; k++) v[k] = malloc(((size_t)n + 1) * sizeof(double));
    int m = 0, mt = 0;
    double t_end = 0;
    for (int i = 0; i < n; i++) {
        const record *r = &L->records[i];
        if (!r->sent) continue;
        s.sent++;
        if (!r->ok) {
            if (s.errors++ == 0)
                snprintf(s.first_error, sizeof s.first_error, "request %d: %s (%s)", i, r->err,
                         duet_code_name(r->err_code));
            continue;
        }
        s.completed++;
        s.prompt_tokens += r->prompt_tokens;
        s.output_tokens += r->output_tokens;
        s.cached_tokens += r->cached_tokens;
        if (r->t_done > t_end) t_end = r->t_done;
        v[0][m] = r->t_first - r->t_send;
        v[2][m] = r->server.ttft_ms;
        v[4][m] = r->t_done - r->t_send;
        v[5][m] = r->server.total_ms;
        v[6][m] = r->server.queue_ms;
        m++;
        if (r->n_delta_tokens > 1) {
            v[1][mt] = (r->t_last - r->t_first) / (r->n_delta_tokens - 1);
            v[3][mt] = r->server.tpot_ms_mean;
            mt++;
        }
    }
    s.ttft_c = summarize(v[0], m);
    s.ttft_d = summarize(v[2], m);
    s.tpot_c = summarize(v[1], mt);
    s.tpot_d = summarize(v[3], mt);
    s.e2e_c = summarize(v[4], m);
    s.e2e_d = summarize(v[5], m);
    s.queue_d = summarize(v[6], m);
    s.wall_s = t_end / 1e3;
    if (s.wall_s > 0) {
        s.req_s = s.completed / s.wall_s;
        s.out_tok_s = s.output_tokens / s.wall_s;
        s.total_tok_s = (s.prompt_tokens + s.output_tokens) / s.wall_s;
    }
    for (int k = 0; k < 7; k++) free(v[k]);
    return s;
}

/* ---- one level ------------------------------------------------------------------------- */

static int run_level(const options *o, int clients, level_stats *out)
{
    level_run L = {.o = o, .clients = clients};
    L.cap = o->duration_s > 0 ? DURATION_CAP
                              : (o->requests > 0 ? o->requests : (2 * clients > 8 ? 2 * clients : 8));
    L.records = calloc((size_t)L.cap, sizeof *L.records);
    pthread_t *th = calloc((size_t)clients, sizeof *th);
    if (!L.records || !th || pthread_barrier_init(&L.start, NULL, (unsigned)clients + 1) != 0) {
        fprintf(stderr, "bench_serve: out of memory for %d clients\n", clients);
        free(L.records);
        free(th);
        return -1;
    }
    atomic_init(&L.next, 0);
    int started = 0;
    for (; started < clients; started++)
        if (pthread_create(&th[started], NULL, client_main, &L) != 0) break;
    if (started < clients) {
        /* cannot happen with sane N; fail loudly rather than hang on the barrier */
        fprintf(stderr, "bench_serve: could not start client thread %d of %d\n", started, clients);
        exit(1);
    }
    L.t0 = now_ms(); /* before the barrier opens: no client reads it earlier */
    pthread_barrier_wait(&L.start);
    for (int k = 0; k < clients; k++) pthread_join(th[k], NULL);
    pthread_barrier_destroy(&L.start);
    *out = stats(&L);
    free(L.records);
    free(th);
    return 0;
}

/* ---- output ---------------------------------------------------------------------------- */

static double pick(const dist *d, int q)
{
    return q == 50 ? d->p50 : q == 90 ? d->p90 : d->p99;
}

/* One "client (duetd)" table cell at percentile q, with `decimals` decimals. */
static void cell(const dist *c, const dist *d, int q, int decimals)
{
    printf(" %.*f (%.*f) |", decimals, pick(c, q), decimals, pick(d, q));
}

static void print_table(const options *o, const level_stats *s, int n)
{
    printf("Workload: closed loop, N clients (one thread and one libduet connection each, one "
           "request in flight per client); %s; prompt %d..%d token ids, output %d..%d tokens "
           "(uniform, seed %llu, ignore_eos%s), greedy, streamed.\n",
           o->duration_s > 0 ? "requests sent for a fixed duration" : "fixed number of requests",
           o->prompt_min, o->prompt_max, o->output_min, o->output_max,
           (unsigned long long)o->seed,
           o->mix ? "; --mix: even requests answer in 8..16 tokens, odd ones have 16..32-token "
                    "prompts" : "");
    printf("Latency cells: client-side ms (duetd's own timings in parentheses); TPOT excludes "
           "the first token.\n\n");
    printf("| clients | requests | errors | wall s | req/s | output tok/s | total tok/s "
           "| TTFT p50 ms | TTFT p90 | TTFT p99 | TPOT p50 ms | TPOT p90 | TPOT p99 |\n");
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const level_stats *x = &s[i];
        printf("| %d | %d | %d | %.1f | %.2f | %.1f | %.1f |", x->clients, x->completed, x->errors,
               x->wall_s, x->req_s, x->out_tok_s, x->total_tok_s);
        cell(&x->ttft_c, &x->ttft_d, 50, 0);
        cell(&x->ttft_c, &x->ttft_d, 90, 0);
        cell(&x->ttft_c, &x->ttft_d, 99, 0);
        cell(&x->tpot_c, &x->tpot_d, 50, 1);
        cell(&x->tpot_c, &x->tpot_d, 90, 1);
        cell(&x->tpot_c, &x->tpot_d, 99, 1);
        printf("\n");
    }
    printf("\n| clients | mean prompt tok | mean output tok | cached prompt tok | queue p50 ms "
           "(duetd) | queue p90 | E2E p50 ms | E2E p90 | E2E p99 |\n");
    printf("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const level_stats *x = &s[i];
        int c = x->completed ? x->completed : 1;
        printf("| %d | %.0f | %.0f | %ld | %.0f | %.0f |", x->clients,
               (double)x->prompt_tokens / c, (double)x->output_tokens / c, x->cached_tokens,
               x->queue_d.p50, x->queue_d.p90);
        cell(&x->e2e_c, &x->e2e_d, 50, 0);
        cell(&x->e2e_c, &x->e2e_d, 90, 0);
        cell(&x->e2e_c, &x->e2e_d, 99, 0);
        printf("\n");
    }
    for (int i = 0; i < n; i++)
        if (s[i].errors) printf("\nclients %d: %d failed; first: %s\n", s[i].clients, s[i].errors, s[i].first_error);
}

static json_t *jdist(const dist *d)
{
    return json_pack("{s:f, s:f, s:f, s:f, s:i}", "p50", d->p50, "p90", d->p90, "p99", d->p99,
                     "mean", d->mean, "n", d->n);
}

static json_t *jpair(const dist *c, const dist *d)
{
    return json_pack("{s:o, s:o}", "client", jdist(c), "duetd", jdist(d));
}

static void print_json(const options *o, const level_stats *s, int n)
{
    json_t *levels = json_array();
    for (int i = 0; i < n; i++) {
        const level_stats *x = &s[i];
        json_array_append_new(
            levels,
            json_pack("{s:i, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:I, s:I, s:I, s:o, s:o, s:o, s:o, "
                      "s:s}",
                      "clients", x->clients, "sent", x->sent, "completed", x->completed, "errors",
                      x->errors, "wall_s", x->wall_s, "req_s", x->req_s, "output_tok_s",
                      x->out_tok_s, "total_tok_s", x->total_tok_s, "prompt_tokens",
                      (json_int_t)x->prompt_tokens, "output_tokens", (json_int_t)x->output_tokens,
                      "cached_prompt_tokens", (json_int_t)x->cached_tokens, "ttft_ms",
                      jpair(&x->ttft_c, &x->ttft_d), "tpot_ms", jpair(&x->tpot_c, &x->tpot_d),
                      "e2e_ms", jpair(&x->e2e_c, &x->e2e_d), "queue_ms_duetd", jdist(&x->queue_d),
                      "first_error", x->first_error));
    }
    json_t *doc = json_pack(
        "{s:s, s:{s:s, s:i, s:f, s:I, s:[i,i], s:[i,i], s:[i,i], s:I, s:b, s:b, s:s}, s:o}",
        "endpoint", o->endpoint, "workload", "mode", o->duration_s > 0 ? "duration" : "requests",
        "requests", o->requests, "duration_s", o->duration_s, "seed", (json_int_t)o->seed,
        "prompt_tokens", o->prompt_min, o->prompt_max, "output_tokens", o->output_min,
        o->output_max, "token_ids", o->id_lo, o->id_hi, "salt", (json_int_t)o->salt, "greedy", 1,
        "ignore_eos", 1, "clients", "one thread and one libduet connection each, closed loop",
        "levels", levels);
    char *txt = json_dumps(doc, JSON_COMPACT);
    printf("%s\n", txt);
    free(txt);
    json_decref(doc);
}

/* ---- main ------------------------------------------------------------------------------ */

static void usage(void)
{
    fprintf(stderr,
            "usage: bench_serve [-e ENDPOINT] [-c 1,4,16] [-n REQUESTS | --duration S] [--seed S]\n"
            "                   [--prompt MIN:MAX] [--output MIN:MAX] [--ids LO:HI] [--salt X]\n"
            "                   [--wait-ready S] [--timeout S] [--json]\n"
            "  -e ENDPOINT     duetd's client endpoint [$%s or %s]\n"
            "  -c LIST         concurrency levels, comma-separated [1,4,16]\n"
            "  -n R            requests per level [max(8, 2N)]\n"
            "  --duration S    send requests for S seconds per level instead of -n\n"
            "  --seed S        workload seed [42]\n"
            "  --prompt A:B    prompt length in tokens, uniform [16:512]\n"
            "  --output A:B    output length (max_tokens, ignore_eos), uniform [16:128]\n"
            "  --ids LO:HI     prompt token ids, uniform in [LO, HI) [1000:20000]\n"
            "  --salt X        changes the prompt ids, not the lengths [0]\n"
            "  --wait-ready S  first wait up to S seconds for duetd's health to be ok\n"
            "  --timeout S     longest wait for one reply [600]\n"
            "  --json          one JSON document instead of the Markdown tables\n"
            "  --mix           a mixed workload: even requests keep their prompt and answer in\n"
            "                  8..16 tokens, odd ones keep their output with 16..32-token prompts\n",
            DUET_ENDPOINT_ENV, DUET_DEFAULT_ENDPOINT);
}

static int parse_pair(const char *s, int *a, int *b)
{
    char *end;
    long x = strtol(s, &end, 10);
    if (*end != ':') return -1;
    long y = strtol(end + 1, &end, 10);
    if (*end || x < 0 || y < x || y > 1 << 20) return -1;
    *a = (int)x;
    *b = (int)y;
    return 0;
}

static int wait_ready(const options *o)
{
    duet_client *c = NULL;
    duet_error err;
    if (duet_connect(o->endpoint, NULL, &c, &err) != DUET_OK) {
        fprintf(stderr, "bench_serve: connect %s: %s\n", o->endpoint, err.message);
        return -1;
    }
    double t0 = now_ms();
    int ok = 0;
    while (!ok && now_ms() - t0 < o->wait_ready_s * 1e3) {
        duet_health_info hi;
        if (duet_health(c, 1000, &hi, NULL, NULL) == DUET_OK && hi.ok) ok = 1;
        else usleep(100000);
    }
    duet_destroy(&c);
    if (!ok) fprintf(stderr, "bench_serve: %s not healthy within %.0f s\n", o->endpoint, o->wait_ready_s);
    return ok ? 0 : -1;
}

/* One short request, not measured: the worker's first pass touches its weights and buffers. */
static int warm_up(const options *o)
{
    duet_client *c = NULL;
    duet_error err;
    int32_t ids[16];
    for (int k = 0; k < 16; k++) ids[k] = o->id_lo + k;
    duet_params p;
    duet_params_init(&p);
    p.tokens = ids;
    p.n_tokens = 16;
    p.sampling.temperature = 0;
    p.max_tokens = 4;
    duet_request *r = NULL;
    duet_code rc = duet_connect(o->endpoint, NULL, &c, &err);
    if (rc == DUET_OK) rc = duet_generate(c, &p, &r, &err);
    if (rc == DUET_OK) rc = duet_wait(r, o->timeout_ms, NULL, &err);
    if (rc != DUET_OK) fprintf(stderr, "bench_serve: warm-up request: %s\n", err.message);
    duet_request_free(&r);
    duet_destroy(&c);
    return rc == DUET_OK ? 0 : -1;
}

int main(int argc, char **argv)
{
    options o = {.endpoint = getenv(DUET_ENDPOINT_ENV) ? getenv(DUET_ENDPOINT_ENV) : DUET_DEFAULT_ENDPOINT,
                 .levels = {1, 4, 16}, .n_levels = 3, .seed = 42, .prompt_min = 16,
                 .prompt_max = 512, .output_min = 16, .output_max = 128, .id_lo = 1000,
                 .id_hi = 20000, .timeout_ms = 600000};
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        int takes = 1;
        if (!strcmp(a, "--mix")) {
            o.mix = 1;
            continue;
        }
        if (!strcmp(a, "--json")) {
            o.json = 1;
            takes = 0;
        } else if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            usage();
            return 0;
        } else if (!v) {
            fprintf(stderr, "bench_serve: %s needs a value\n", a);
            usage();
            return 2;
        } else if (!strcmp(a, "-e") || !strcmp(a, "--endpoint")) {
            o.endpoint = v;
        } else if (!strcmp(a, "-c") || !strcmp(a, "--clients")) {
            o.n_levels = 0;
            for (const char *s = v; *s && o.n_levels < MAX_LEVELS;) {
                char *end;
                long n = strtol(s, &end, 10);
                if (end == s || n < 1 || n > 4096) {
                    fprintf(stderr, "bench_serve: -c %s: want a list of counts in 1..4096\n", v);
                    return 2;
                }
                o.levels[o.n_levels++] = (int)n;
                s = *end == ',' ? end + 1 : end;
            }
        } else if (!strcmp(a, "-n") || !strcmp(a, "--requests")) {
            o.requests = atoi(v);
            if (o.requests < 1) { fprintf(stderr, "bench_serve: -n %s: want >= 1\n", v); return 2; }
        } else if (!strcmp(a, "--duration")) {
            o.duration_s = atof(v);
            if (!(o.duration_s > 0)) { fprintf(stderr, "bench_serve: --duration %s: want > 0\n", v); return 2; }
        } else if (!strcmp(a, "--seed")) {
            o.seed = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--salt")) {
            o.salt = strtoull(v, NULL, 10);
        } else if (!strcmp(a, "--prompt") || !strcmp(a, "--output") || !strcmp(a, "--ids")) {
            int *lo = a[2] == 'p' ? &o.prompt_min : a[2] == 'o' ? &o.output_min : &o.id_lo;
            int *hi = a[2] == 'p' ? &o.prompt_max : a[2] == 'o' ? &o.output_max : &o.id_hi;
            if (parse_pair(v, lo, hi) != 0 || (a[2] == 'i' ? *hi == *lo : *lo < 1)) {
                fprintf(stderr, "bench_serve: %s %s: want MIN:MAX (MIN <= MAX; lengths >= 1, ids LO < HI)\n", a, v);
                return 2;
            }
        } else if (!strcmp(a, "--wait-ready")) {
            o.wait_ready_s = atof(v);
        } else if (!strcmp(a, "--timeout")) {
            o.timeout_ms = (int)(atof(v) * 1e3);
        } else {
            fprintf(stderr, "bench_serve: unknown argument %s\n", a);
            usage();
            return 2;
        }
        i += takes;
    }
    if (o.wait_ready_s > 0 && wait_ready(&o) != 0) return 1;
    if (warm_up(&o) != 0) return 1;
    level_stats s[MAX_LEVELS];
    int failed = 0;
    for (int k = 0; k < o.n_levels; k++) {
        if (run_level(&o, o.levels[k], &s[k]) != 0) return 1;
        failed |= s[k].errors > 0;
        fprintf(stderr, "bench_serve: %d clients: %d requests in %.1f s, %d failed\n", s[k].clients,
                s[k].completed, s[k].wall_s, s[k].errors);
    }
    if (o.json) print_json(&o, s, o.n_levels);
    else print_table(&o, s, o.n_levels);
    return failed;
}
