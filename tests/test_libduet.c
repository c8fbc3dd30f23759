/* tests/test_libduet.c: libduet and the `duet` CLI's network commands against a fake duetd.
 *
 * The fake duetd is a ZeroMQ ROUTER on tcp://127.0.0.1 (ephemeral port) served by a
 * thread of this process; it speaks duet.client/1 through daemon/proto, checks every
 * message libduet sends against the schema, and answers as each test scripts it: in
 * order, interleaved, with errors, malformed, or not at all. The CLI tests run
 * $BUILD/bin/duet (BUILD defaults to "build") against the same fake.
 */
#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>
#include <zmq.h>

#include "client/libduet.h"
#include "daemon/proto.h"

#define WAIT_MS 5000

/* ---- the fake duetd ------------------------------------------------------------------------ */

typedef struct fake fake_t;
/* Called on the server thread for each valid message a client sent. */
typedef void (*fake_fn)(fake_t *f, const proto_route *rt, proto_cmd cmd, json_t *body);

#define FAKE_MAX 256

struct fake {
    void *zctx, *router;
    char endpoint[256];
    pthread_t th;
    pthread_mutex_t mu;
    int stop;
    fake_fn fn;
    void *user;
    /* what arrived (under mu) */
    int n_generate, n_cancel, n_status, n_health;
    int n_invalid;              /* messages that broke the protocol or the schema */
    char invalid[256];          /* the last such message */
    char cancelled[FAKE_MAX][PROTO_MAX_ID + 1];
    json_t *gens[FAKE_MAX];     /* generate bodies, in order */
    /* script state (server thread only) */
    proto_route routes[FAKE_MAX];
    char ids[FAKE_MAX][PROTO_MAX_ID + 1];
    int n_held;
};

static void *fake_run(void *arg)
{
    fake_t *f = arg;
    for (;;) {
        pthread_mutex_lock(&f->mu);
        int stop = f->stop;
        pthread_mutex_unlock(&f->mu);
        if (stop) break;
        proto_msg m;
        proto_err pe;
        memset(&pe, 0, sizeof pe);
        proto_rc rc = proto_recv(f->router, PROTO_SIDE_DUETD_CLIENTS, 1, 20, &m, &pe);
        if (rc == PROTO_TIMEOUT) continue;
        if (rc != PROTO_OK) {
            pthread_mutex_lock(&f->mu);
            f->n_invalid++;
            snprintf(f->invalid, sizeof f->invalid, "%s", pe.message);
            pthread_mutex_unlock(&f->mu);
            proto_msg_clear(&m);
            continue;
        }
        proto_type t = proto_msg_type(&m, PROTO_SIDE_DUETD_CLIENTS);
        union {
            proto_generate g;
            proto_cancel c;
            proto_empty e;
        } u;
        int ok = proto_parse(t, m.body, &u, &pe) == 0;
        pthread_mutex_lock(&f->mu);
        if (!ok) {
            f->n_invalid++;
            snprintf(f->invalid, sizeof f->invalid, "%s", pe.message);
        } else if (m.cmd == PROTO_CMD_GENERATE) {
            if (f->n_generate < FAKE_MAX) f->gens[f->n_generate] = json_incref(m.body);
            f->n_generate++;
        } else if (m.cmd == PROTO_CMD_CANCEL) {
            if (f->n_cancel < FAKE_MAX) snprintf(f->cancelled[f->n_cancel], PROTO_MAX_ID + 1, "%s", u.c.id);
            f->n_cancel++;
        } else if (m.cmd == PROTO_CMD_STATUS) {
            f->n_status++;
        } else if (m.cmd == PROTO_CMD_HEALTH) {
            f->n_health++;
        }
        pthread_mutex_unlock(&f->mu);
        if (ok) proto_free(t, &u);
        if (ok && f->fn) f->fn(f, &m.route, m.cmd, m.body);
        proto_msg_clear(&m);
    }
    return NULL;
}

static fake_t *fake_start(fake_fn fn, void *user)
{
    fake_t *f = calloc(1, sizeof *f);
    assert_non_null(f);
    pthread_mutex_init(&f->mu, NULL);
    f->fn = fn;
    f->user = user;
    f->zctx = zmq_ctx_new();
    assert_non_null(f->zctx);
    f->router = zmq_socket(f->zctx, ZMQ_ROUTER);
    assert_non_null(f->router);
    assert_int_equal(proto_socket_options(f->router, PROTO_SIDE_DUETD_CLIENTS, 0), 0);
    assert_int_equal(zmq_bind(f->router, "tcp://127.0.0.1:*"), 0);
    size_t len = sizeof f->endpoint;
    assert_int_equal(zmq_getsockopt(f->router, ZMQ_LAST_ENDPOINT, f->endpoint, &len), 0);
    assert_int_equal(pthread_create(&f->th, NULL, fake_run, f), 0);
    return f;
}

/* Stop the server; checks that every message libduet sent was valid. */
static void fake_stop(fake_t **fp)
{
    fake_t *f = *fp;
    *fp = NULL;
    pthread_mutex_lock(&f->mu);
    f->stop = 1;
    pthread_mutex_unlock(&f->mu);
    pthread_join(f->th, NULL);
    zmq_close(f->router);
    zmq_ctx_term(f->zctx);
    if (f->n_invalid) fprintf(stderr, "fake duetd: invalid message from the client: %s\n", f->invalid);
    int invalid = f->n_invalid;
    for (int i = 0; i < f->n_generate && i < FAKE_MAX; i++) json_decref(f->gens[i]);
    pthread_mutex_destroy(&f->mu);
    free(f);
    assert_int_equal(invalid, 0);
}

static int fake_count(fake_t *f, const int *counter)
{
    pthread_mutex_lock(&f->mu);
    int n = *counter;
    pthread_mutex_unlock(&f->mu);
    return n;
}

/* Wait (up to WAIT_MS) until *counter reaches n. */
static void fake_wait_count(fake_t *f, const int *counter, int n)
{
    for (int i = 0; i < WAIT_MS / 5 && fake_count(f, counter) < n; i++) usleep(5000);
    assert_true(fake_count(f, counter) >= n);
}

/* Send cmd with a body given as JSON text. */
static void fsend(fake_t *f, const proto_route *rt, proto_cmd cmd, const char *json)
{
    json_error_t je;
    json_t *b = json_loads(json, 0, &je);
    if (!b) fprintf(stderr, "fsend: bad test JSON: %s: %s\n", json, je.text);
    assert_non_null(b);
    assert_int_equal(proto_send(f->router, rt, PROTO_CLIENT, cmd, &b, 0), 0);
}

__attribute__((format(printf, 4, 5))) static void fsendf(fake_t *f, const proto_route *rt,
                                                         proto_cmd cmd, const char *fmt, ...)
{
    char buf[4096];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fsend(f, rt, cmd, buf);
}

/* Send raw frames after the route. */
static void fsend_raw(fake_t *f, const proto_route *rt, int n, const char *const *frames)
{
    assert_true(zmq_send(f->router, rt->id[0], rt->len[0], ZMQ_SNDMORE) >= 0);
    for (int i = 0; i < n; i++)
        assert_true(zmq_send(f->router, frames[i], strlen(frames[i]), i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
}

static const char *body_id(const json_t *body)
{
    return json_string_value(json_object_get(body, "id"));
}

static int body_stream(const json_t *body)
{
    return json_is_true(json_object_get(body, "stream"));
}

static const char *USAGE_JSON =
    "\"usage\": {\"prompt_tokens\": 6, \"cached_prompt_tokens\": 2, \"completion_tokens\": 3, "
    "\"retries\": 0}, \"timings\": {\"queue_ms\": 0.4, \"ttft_ms\": 21.5, \"tpot_ms_mean\": 6.2, "
    "\"total_ms\": 33.9}";

/* The well-behaved server: accepted, then " Paris" "." "" as three deltas (stream) or one
 * done with the text, finish eos. */
static void serve_paris(fake_t *f, const proto_route *rt, const char *id, int stream)
{
    fsendf(f, rt, PROTO_CMD_ACCEPTED, "{\"id\": \"%s\", \"prompt_tokens\": 6, \"max_tokens\": 16, \"seed\": 42}", id);
    if (stream) {
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 0, \"text\": \" Paris\", \"token_ids\": [7042]}", id);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 1, \"text\": \".\", \"token_ids\": [30], \"new_field\": 1}", id);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 2, \"text\": \"\", \"token_ids\": [2]}", id);
        fsendf(f, rt, PROTO_CMD_DONE, "{\"id\": \"%s\", \"finish_reason\": \"eos\", %s}", id, USAGE_JSON);
    } else {
        fsendf(f, rt, PROTO_CMD_DONE,
               "{\"id\": \"%s\", \"finish_reason\": \"eos\", \"text\": \" Paris.\", \"token_ids\": [7042, 30, 2], %s}",
               id, USAGE_JSON);
    }
}

static const char *STATUS_JSON =
    "{\"version\": \"duet 0.1.0\", \"model\": \"SmolLM2 135M Instruct\", \"model_sha256\": "
    "\"b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53\", \"uptime_s\": 3600.5, "
    "\"groups\": [{\"group\": 0, \"role\": \"prefill\", \"tp_size\": 1, \"workers_alive\": 1, "
    "\"running\": 1, \"waiting\": 0, \"kv_blocks_total\": 4096, \"kv_blocks_free\": 3900, "
    "\"kv_blocks_cached\": 150}, {\"group\": 1, \"role\": \"decode\", \"tp_size\": 1, "
    "\"workers_alive\": 1, \"running\": 12, \"waiting\": 0, \"kv_blocks_total\": 8192, "
    "\"kv_blocks_free\": 6000, \"kv_blocks_cached\": 40}], \"workers\": [{\"worker_id\": "
    "\"node1-cpu0\", \"rank\": 0, \"group\": 0, \"tp_rank\": 0, \"role\": \"prefill\", \"device\": "
    "\"cpu\", \"state\": \"ready\", \"last_seen_ms\": 120, \"kv_capacity_blocks\": 4096}, "
    "{\"worker_id\": \"node1-cpu1\", \"rank\": 1, \"group\": 1, \"tp_rank\": 0, \"role\": "
    "\"decode\", \"device\": \"cpu\", \"state\": \"ready\", \"last_seen_ms\": 40, "
    "\"kv_capacity_blocks\": 8192}], \"kv\": {\"blocks_total\": 12288, \"blocks_used\": 2388, "
    "\"blocks_cached\": 190, \"use\": 0.194}, \"queue\": {\"waiting\": 0, \"running\": 13, "
    "\"limit\": 1024}, \"prefix_cache\": {\"prompt_tokens\": 51200, \"cached_tokens\": 20480, "
    "\"hit_rate\": 0.4}, \"transfers\": {\"completed\": 812, \"failed\": 1, \"in_flight\": 1, "
    "\"bytes\": 1357000000, \"mean_ms\": 3.1, \"max_ms\": 18.7}, \"requests\": {\"served\": 811, "
    "\"failed\": 0, \"cancelled\": 3, \"retried\": 1}}";

static const char *HEALTH_OK = "{\"ok\": true, \"state\": \"ready\", \"groups_ready\": 2, \"workers_alive\": 2, \"uptime_s\": 3600.5}";
static const char *HEALTH_BAD = "{\"ok\": false, \"state\": \"starting\", \"groups_ready\": 0, \"workers_alive\": 0, \"uptime_s\": 1.5}";

/* Serves every generate with serve_paris, status and health from the doc. */
static void fn_good(fake_t *f, const proto_route *rt, proto_cmd cmd, json_t *body)
{
    if (cmd == PROTO_CMD_GENERATE) serve_paris(f, rt, body_id(body), body_stream(body));
    if (cmd == PROTO_CMD_STATUS) fsend(f, rt, PROTO_CMD_STATUS, STATUS_JSON);
    if (cmd == PROTO_CMD_HEALTH) fsend(f, rt, PROTO_CMD_HEALTH, f->user ? (const char *)f->user : HEALTH_OK);
    if (cmd == PROTO_CMD_CANCEL)
        fsendf(f, rt, PROTO_CMD_ERROR, "{\"id\": \"%s\", \"code\": \"not_found\", \"message\": \"cancel: no request\", \"command\": \"cancel\"}",
               body_id(body));
}

static duet_client *connect_to(fake_t *f)
{
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(f->endpoint, NULL, &c, &err), DUET_OK);
    assert_non_null(c);
    return c;
}

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + ts.tv_nsec * 1e-6;
}

/* ---- streaming, results -------------------------------------------------------------------- */

static void test_stream_order(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_good, NULL);
    duet_client *c = connect_to(f);
    duet_params p;
    duet_params_init(&p);
    p.prompt = "The capital of France is";
    p.sampling.temperature = 0;
    p.max_tokens = 16;
    p.stream = 1;
    duet_request *r = NULL;
    duet_error err;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_string_equal(duet_request_id(r), "r1");

    duet_event ev;
    assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
    assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
    assert_int_equal(ev.prompt_tokens, 6);
    assert_int_equal(ev.max_tokens, 16);
    assert_int_equal(ev.seed, 42);
    char text[64] = "";
    int32_t ids[8];
    int n_ids = 0, n_deltas = 0;
    for (;;) {
        assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
        assert_string_equal(ev.id, "r1");
        if (ev.kind != DUET_EVENT_DELTA) break;
        assert_int_equal(ev.index, n_ids); /* contiguous, in order */
        strncat(text, ev.text, ev.text_len);
        memcpy(ids + n_ids, ev.token_ids, (size_t)ev.n_token_ids * sizeof *ids);
        n_ids += ev.n_token_ids;
        n_deltas++;
    }
    assert_int_equal(n_deltas, 3);
    assert_string_equal(text, " Paris.");
    assert_int_equal(ev.kind, DUET_EVENT_DONE);
    const duet_result *res = ev.result;
    assert_non_null(res);
    assert_string_equal(res->text, " Paris.");
    assert_int_equal(res->text_len, 7);
    assert_int_equal(res->n_token_ids, 3);
    assert_int_equal(res->token_ids[0], 7042);
    assert_int_equal(res->token_ids[2], 2);
    assert_int_equal(res->finish_reason, DUET_FINISH_EOS);
    assert_string_equal(duet_finish_name(res->finish_reason), "eos");
    assert_int_equal(res->usage.prompt_tokens, 6);
    assert_int_equal(res->usage.cached_prompt_tokens, 2);
    assert_int_equal(res->usage.completion_tokens, 3);
    assert_true(res->timings.ttft_ms > 21.4 && res->timings.ttft_ms < 21.6);
    assert_true(res->timings.tpot_ms_mean > 6.1 && res->timings.tpot_ms_mean < 6.3);
    assert_int_equal(res->seed, 42);
    /* The last event was returned: no more. */
    assert_int_equal(duet_next(r, 0, &ev, &err), DUET_E_USAGE);
    assert_true(duet_request_finished(r));
    assert_ptr_equal(duet_request_result(r), res);
    assert_null(duet_request_error(r));

    /* What went on the wire is the canonical generate. */
    pthread_mutex_lock(&f->mu);
    char *sent = json_dumps(f->gens[0], JSON_COMPACT | JSON_SORT_KEYS);
    pthread_mutex_unlock(&f->mu);
    assert_non_null(strstr(sent, "\"prompt\":\"The capital of France is\""));
    assert_non_null(strstr(sent, "\"stream\":true"));
    assert_non_null(strstr(sent, "\"max_tokens\":16"));
    assert_null(strstr(sent, "\"seed\"")); /* not given: duetd draws it */
    free(sent);

    duet_request_free(&r);
    duet_request_free(&r); /* safe twice */
    duet_destroy(&c);
    duet_destroy(&c);
    fake_stop(&f);
}

static void test_nonstream_and_wait(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_good, NULL);
    duet_client *c = connect_to(f);
    duet_params p;
    duet_params_init(&p);
    const int32_t toks[] = {1, 504, 3458, 282};
    p.tokens = toks;
    p.n_tokens = 4;
    p.sampling.seed = 7;
    p.id = "t3";
    duet_request *r = NULL;
    duet_error err;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    const duet_result *res = NULL;
    assert_int_equal(duet_wait(r, WAIT_MS, &res, &err), DUET_OK);
    assert_non_null(res);
    assert_string_equal(res->id, "t3");
    assert_string_equal(res->text, " Paris.");
    assert_int_equal(res->n_token_ids, 3);
    assert_int_equal(res->token_ids[1], 30);
    /* After duet_wait the events are gone. */
    duet_event ev;
    assert_int_equal(duet_next(r, 0, &ev, &err), DUET_E_USAGE);
    duet_request_free(&r);

    /* Chat messages, stop strings and a session travel as the schema says. */
    duet_message msgs[] = {{"system", "You are terse."}, {"user", "Name a prime number."}};
    const char *stops[] = {"\n\n"};
    duet_params_init(&p);
    p.messages = msgs;
    p.n_messages = 2;
    p.stop = stops;
    p.n_stop = 1;
    p.session = "alice-1";
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_int_equal(duet_wait(r, WAIT_MS, NULL, &err), DUET_OK);
    pthread_mutex_lock(&f->mu);
    json_t *g = f->gens[1];
    assert_string_equal(json_string_value(json_object_get(json_array_get(json_object_get(g, "messages"), 1), "content")),
                        "Name a prime number.");
    assert_string_equal(json_string_value(json_object_get(g, "session")), "alice-1");
    assert_string_equal(json_string_value(json_array_get(json_object_get(g, "stop"), 0)), "\n\n");
    pthread_mutex_unlock(&f->mu);
    duet_request_free(&r);
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- multiplexing -------------------------------------------------------------------------- */

#define N_MUX 8

/* Holds generates until N_MUX arrived, then answers them all interleaved: accepted in
 * reverse order, then round after round of one delta each, then the dones. */
static void fn_mux(fake_t *f, const proto_route *rt, proto_cmd cmd, json_t *body)
{
    if (cmd != PROTO_CMD_GENERATE) return;
    f->routes[f->n_held] = *rt;
    snprintf(f->ids[f->n_held], sizeof f->ids[0], "%s", body_id(body));
    if (++f->n_held < N_MUX) return;
    for (int i = N_MUX - 1; i >= 0; i--)
        fsendf(f, &f->routes[i], PROTO_CMD_ACCEPTED, "{\"id\": \"%s\", \"prompt_tokens\": %d, \"max_tokens\": 3, \"seed\": %d}",
               f->ids[i], i + 1, i);
    for (int k = 0; k < 3; k++)
        for (int i = 0; i < N_MUX; i++)
            fsendf(f, &f->routes[i], PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": %d, \"text\": \"%s.%d \", \"token_ids\": [%d]}",
                   f->ids[i], k, f->ids[i], k, 100 * i + k);
    for (int i = N_MUX - 1; i >= 0; i--)
        fsendf(f, &f->routes[i], PROTO_CMD_DONE, "{\"id\": \"%s\", \"finish_reason\": \"length\", %s}", f->ids[i], USAGE_JSON);
    f->n_held = 0;
}

static void test_multiplex_8(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_mux, NULL);
    duet_client *c = connect_to(f);
    duet_request *r[N_MUX];
    duet_error err;
    char idbuf[N_MUX][16];
    for (int i = 0; i < N_MUX; i++) {
        duet_params p;
        duet_params_init(&p);
        snprintf(idbuf[i], sizeof idbuf[i], "q-%d", i);
        p.id = idbuf[i];
        p.prompt = "hello";
        p.stream = 1;
        assert_int_equal(duet_generate(c, &p, &r[i], &err), DUET_OK);
    }
    /* Read the requests one after another: the others' replies wait in their queues. */
    for (int i = N_MUX - 1; i >= 0; i--) {
        duet_event ev;
        char text[64] = "";
        int n_delta = 0;
        assert_int_equal(duet_next(r[i], WAIT_MS, &ev, &err), DUET_OK);
        assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
        assert_int_equal(ev.prompt_tokens, i + 1);
        while (duet_next(r[i], WAIT_MS, &ev, &err) == DUET_OK && ev.kind == DUET_EVENT_DELTA) {
            assert_string_equal(ev.id, idbuf[i]);
            assert_int_equal(ev.token_ids[0], 100 * i + n_delta);
            strncat(text, ev.text, ev.text_len);
            n_delta++;
        }
        assert_int_equal(ev.kind, DUET_EVENT_DONE);
        char want[512];
        snprintf(want, sizeof want, "%s.0 %s.1 %s.2 ", idbuf[i], idbuf[i], idbuf[i]);
        assert_string_equal(text, want);
        assert_string_equal(ev.result->text, want);
        assert_int_equal(ev.result->n_token_ids, 3);
        assert_int_equal(ev.result->finish_reason, DUET_FINISH_LENGTH);
    }
    for (int i = 0; i < N_MUX; i++) duet_request_free(&r[i]);
    assert_int_equal(fake_count(f, &f->n_cancel), 0); /* finished requests are not cancelled */
    duet_destroy(&c);
    fake_stop(&f);
}

typedef struct {
    int n_events[N_MUX];
    char text[N_MUX][128];
    int last_kind[N_MUX];
    int order_ok;
} cb_log;

static void on_event(duet_request *req, const duet_event *ev, void *user)
{
    cb_log *log = user;
    int i = atoi(duet_request_id(req) + 2);
    int expect_first = log->n_events[i] == 0;
    if (expect_first != (ev->kind == DUET_EVENT_ACCEPTED)) log->order_ok = 0;
    if (log->last_kind[i] == DUET_EVENT_DONE || log->last_kind[i] == DUET_EVENT_ERROR) log->order_ok = 0;
    if (ev->kind == DUET_EVENT_DELTA) strncat(log->text[i], ev->text, ev->text_len);
    log->n_events[i]++;
    log->last_kind[i] = ev->kind;
}

static void test_multiplex_callbacks(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_mux, NULL);
    duet_client *c = connect_to(f);
    duet_request *r[N_MUX];
    duet_error err;
    cb_log log;
    memset(&log, 0, sizeof log);
    log.order_ok = 1;
    char idbuf[N_MUX][16];
    for (int i = 0; i < N_MUX; i++) {
        duet_params p;
        duet_params_init(&p);
        snprintf(idbuf[i], sizeof idbuf[i], "q-%d", i);
        p.id = idbuf[i];
        p.prompt = "hello";
        p.stream = 1;
        p.on_event = on_event;
        p.user = &log;
        assert_int_equal(duet_generate(c, &p, &r[i], &err), DUET_OK);
    }
    duet_event ev;
    assert_int_equal(duet_next(r[0], 0, &ev, &err), DUET_E_USAGE); /* callback mode */
    double t0 = now_ms();
    int done = 0;
    while (!done && now_ms() - t0 < WAIT_MS) {
        duet_code rc = duet_poll(c, 100, &err);
        assert_true(rc == DUET_OK || rc == DUET_E_TIMEOUT);
        done = 1;
        for (int i = 0; i < N_MUX; i++) done &= duet_request_finished(r[i]);
    }
    assert_true(done);
    assert_true(log.order_ok);
    for (int i = 0; i < N_MUX; i++) {
        char want[512];
        snprintf(want, sizeof want, "%s.0 %s.1 %s.2 ", idbuf[i], idbuf[i], idbuf[i]);
        assert_string_equal(log.text[i], want);
        assert_int_equal(log.n_events[i], 5); /* accepted, 3 deltas, done */
        assert_int_equal(log.last_kind[i], DUET_EVENT_DONE);
        const duet_result *res = NULL;
        assert_int_equal(duet_wait(r[i], 0, &res, &err), DUET_OK);
        assert_string_equal(res->text, want);
        duet_request_free(&r[i]);
    }
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- cancel ---------------------------------------------------------------------------------- */

/* accepted + one delta; on cancel: done cancelled, then a not_found that crossed it. */
static void fn_cancel(fake_t *f, const proto_route *rt, proto_cmd cmd, json_t *body)
{
    const char *id = body_id(body);
    if (cmd == PROTO_CMD_GENERATE) {
        fsendf(f, rt, PROTO_CMD_ACCEPTED, "{\"id\": \"%s\", \"prompt_tokens\": 2, \"max_tokens\": 100, \"seed\": 1}", id);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 0, \"text\": \"Once\", \"token_ids\": [9]}", id);
    } else if (cmd == PROTO_CMD_CANCEL) {
        if (strcmp(id, "lost") == 0) { /* duetd forgot this one */
            fsendf(f, rt, PROTO_CMD_ERROR, "{\"id\": \"%s\", \"code\": \"not_found\", \"message\": \"cancel: no request 'lost' in flight\", \"command\": \"cancel\"}", id);
            return;
        }
        fsendf(f, rt, PROTO_CMD_DONE, "{\"id\": \"%s\", \"finish_reason\": \"cancelled\", %s}", id, USAGE_JSON);
        fsendf(f, rt, PROTO_CMD_ERROR, "{\"id\": \"%s\", \"code\": \"not_found\", \"message\": \"cancel: no request\", \"command\": \"cancel\"}", id);
    }
}

static void test_cancel(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_cancel, NULL);
    duet_client *c = connect_to(f);
    duet_params p;
    duet_params_init(&p);
    p.prompt = "Tell me a story";
    p.stream = 1;
    p.id = "story";
    duet_request *r = NULL;
    duet_error err;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    duet_event ev;
    assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
    assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
    assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
    assert_int_equal(ev.kind, DUET_EVENT_DELTA);
    assert_int_equal(duet_cancel(r, &err), DUET_OK);
    assert_int_equal(duet_cancel(r, &err), DUET_OK); /* idempotent: sent once */
    const duet_result *res = NULL;
    assert_int_equal(duet_wait(r, WAIT_MS, &res, &err), DUET_OK);
    assert_int_equal(res->finish_reason, DUET_FINISH_CANCELLED);
    assert_string_equal(res->text, "Once");
    assert_int_equal(duet_cancel(r, &err), DUET_OK); /* no-op once finished */
    fake_wait_count(f, &f->n_cancel, 1);
    pthread_mutex_lock(&f->mu);
    assert_string_equal(f->cancelled[0], "story");
    pthread_mutex_unlock(&f->mu);
    /* The id is free again: a new request with it is not confused by the stale not_found. */
    duet_request *r2 = NULL;
    assert_int_equal(duet_generate(c, &p, &r2, &err), DUET_OK);
    assert_int_equal(duet_next(r2, WAIT_MS, &ev, &err), DUET_OK);
    assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
    /* Freeing a request in flight cancels it. */
    duet_request_free(&r2);
    fake_wait_count(f, &f->n_cancel, 2);
    duet_request_free(&r);

    /* A cancel answered by not_found for a request never seen finishing: duetd lost it. */
    p.id = "lost";
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
    assert_int_equal(duet_cancel(r, &err), DUET_OK);
    assert_int_equal(duet_wait(r, WAIT_MS, NULL, &err), DUET_E_NOT_FOUND);
    assert_string_equal(err.code_name, "not_found");
    assert_string_equal(err.id, "lost");
    duet_request_free(&r);
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- error codes ----------------------------------------------------------------------------- */

/* The code to answer generate with, before (refusal) or after accepted. */
typedef struct {
    const char *code;
    int after_accepted;
} err_script;

static void fn_error(fake_t *f, const proto_route *rt, proto_cmd cmd, json_t *body)
{
    const err_script *s = f->user;
    if (cmd == PROTO_CMD_STATUS || cmd == PROTO_CMD_HEALTH) {
        fsendf(f, rt, PROTO_CMD_ERROR, "{\"code\": \"%s\", \"message\": \"%s failed here\", \"command\": \"%s\"}",
               s->code, proto_cmd_name(cmd), proto_cmd_name(cmd));
        return;
    }
    if (cmd != PROTO_CMD_GENERATE) return;
    const char *id = body_id(body);
    if (s->after_accepted) {
        fsendf(f, rt, PROTO_CMD_ACCEPTED, "{\"id\": \"%s\", \"prompt_tokens\": 2, \"max_tokens\": 10, \"seed\": 1}", id);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 0, \"text\": \"x\", \"token_ids\": [5]}", id);
    }
    fsendf(f, rt, PROTO_CMD_ERROR,
           "{\"id\": \"%s\", \"code\": \"%s\", \"message\": \"generate: %s for '%s'\", \"command\": \"generate\", \"retry_after_ms\": %d}",
           id, s->code, s->code, id, strcmp(s->code, "busy") == 0 ? 250 : 0);
}

static void test_every_error_code(void **state)
{
    (void)state;
    err_script s = {NULL, 0};
    fake_t *f = fake_start(fn_error, &s);
    duet_client *c = connect_to(f);
    for (int after = 0; after < 2; after++)
        for (int code = DUET_E_BAD_FRAMES; code <= DUET_E_INTERNAL; code++) {
            /* The fake reads s on its thread: change it only between requests. */
            s.code = duet_code_name((duet_code)code);
            s.after_accepted = after;
            assert_string_equal(s.code, proto_code_name((proto_code)code));
            duet_params p;
            duet_params_init(&p);
            p.prompt = "hi";
            p.stream = 1;
            duet_request *r = NULL;
            duet_error err;
            assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
            duet_event ev;
            if (after) {
                assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
                assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
                assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
                assert_int_equal(ev.kind, DUET_EVENT_DELTA);
            }
            assert_int_equal(duet_next(r, WAIT_MS, &ev, &err), DUET_OK);
            assert_int_equal(ev.kind, DUET_EVENT_ERROR);
            assert_int_equal(ev.error->code, code);
            assert_string_equal(ev.error->code_name, s.code);
            assert_non_null(strstr(ev.error->message, s.code));
            assert_string_equal(ev.error->id, duet_request_id(r));
            assert_int_equal(ev.error->retry_after_ms, code == DUET_E_BUSY ? 250 : 0);
            /* duet_wait reports the same error. */
            assert_int_equal(duet_wait(r, 0, NULL, &err), code);
            assert_int_equal(duet_request_error(r)->code, code);
            assert_null(duet_request_result(r));
            duet_request_free(&r);
        }

    /* A code this build does not know counts as internal; its name is kept. */
    s.code = "quota_exceeded";
    s.after_accepted = 0;
    duet_params p;
    duet_params_init(&p);
    p.prompt = "hi";
    duet_request *r = NULL;
    duet_error err;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_int_equal(duet_wait(r, WAIT_MS, NULL, &err), DUET_E_INTERNAL);
    assert_string_equal(err.code_name, "quota_exceeded");
    duet_request_free(&r);

    /* status and health answered with errors. */
    s.code = "unavailable";
    json_t *j = NULL;
    assert_int_equal(duet_status(c, WAIT_MS, &j, &err), DUET_E_UNAVAILABLE);
    assert_null(j);
    assert_non_null(strstr(err.message, "status failed here"));
    duet_health_info h;
    assert_int_equal(duet_health(c, WAIT_MS, &h, NULL, &err), DUET_E_UNAVAILABLE);
    assert_non_null(strstr(err.message, "health failed here"));
    assert_int_equal(fake_count(f, &f->n_cancel), 0);
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- checks before sending -------------------------------------------------------------------- */

static void test_local_checks(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_good, NULL);
    duet_client *c = connect_to(f);
    duet_params p;
    duet_request *r = NULL;
    duet_error err;

    duet_params_init(&p);
    p.prompt = "hi";
    p.sampling.top_p = 1.5;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_BAD_REQUEST);
    assert_null(r);
    assert_non_null(strstr(err.message, "sampling.top_p"));
    assert_string_equal(err.code_name, "bad_request");

    duet_message m = {"user", "hi"};
    duet_params_init(&p);
    p.prompt = "hi";
    p.messages = &m;
    p.n_messages = 1;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_BAD_REQUEST);
    assert_non_null(strstr(err.message, "exactly one"));

    duet_params_init(&p);
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_BAD_REQUEST); /* no prompt at all */

    duet_params_init(&p);
    p.prompt = "bad \xff utf-8";
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_BAD_REQUEST);
    assert_non_null(strstr(err.message, "'prompt'"));

    duet_params_init(&p);
    p.prompt = "hi";
    p.id = "has space";
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_BAD_REQUEST);
    assert_non_null(strstr(err.message, "'id'"));

    duet_params_init(&p);
    p.prompt = "hi";
    p.max_tokens = 300000;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_BAD_REQUEST);
    assert_non_null(strstr(err.message, "max_tokens"));

    duet_params_init(&p);
    p.prompt = "hi";
    p.n_stop = 1; /* stop is NULL */
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_USAGE);

    assert_int_equal(duet_generate(NULL, &p, &r, &err), DUET_E_USAGE);
    assert_int_equal(duet_generate(c, NULL, &r, &err), DUET_E_USAGE);

    /* Two requests with one id in flight (r1's replies are not read yet). */
    duet_params_init(&p);
    p.prompt = "hi";
    p.id = "same";
    duet_request *r1 = NULL;
    assert_int_equal(duet_generate(c, &p, &r1, &err), DUET_OK);
    /* The replies have not been read yet, so r1 is still in flight for libduet. */
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_DUPLICATE_ID);
    assert_string_equal(err.id, "same");
    assert_int_equal(duet_wait(r1, WAIT_MS, NULL, &err), DUET_OK);
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK); /* reusable after done */
    assert_int_equal(duet_wait(r, WAIT_MS, NULL, &err), DUET_OK);
    duet_request_free(&r);
    duet_request_free(&r1);

    /* Nothing that failed the checks reached the server. */
    assert_int_equal(fake_count(f, &f->n_generate), 2);
    assert_string_equal(duet_code_name(DUET_E_TIMEOUT), "timeout");
    assert_string_equal(duet_code_name((duet_code)12345), "");
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- a silent server, an absent one ------------------------------------------------------------ */

static void test_timeout_silent_server(void **state)
{
    (void)state;
    fake_t *f = fake_start(NULL, NULL); /* reads, never answers */
    duet_client *c = connect_to(f);
    duet_params p;
    duet_params_init(&p);
    p.prompt = "hi";
    duet_request *r = NULL;
    duet_error err;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    double t0 = now_ms();
    assert_int_equal(duet_wait(r, 200, NULL, &err), DUET_E_TIMEOUT);
    double dt = now_ms() - t0;
    assert_true(dt >= 190 && dt < 2000);
    assert_string_equal(err.code_name, "timeout");
    assert_non_null(strstr(err.message, "200 ms"));
    duet_event ev;
    assert_int_equal(duet_next(r, 50, &ev, &err), DUET_E_TIMEOUT);
    assert_int_equal(duet_next(r, 0, &ev, &err), DUET_E_TIMEOUT);
    assert_false(duet_request_finished(r));
    json_t *j = NULL;
    t0 = now_ms();
    assert_int_equal(duet_status(c, 100, &j, &err), DUET_E_TIMEOUT);
    assert_int_equal(duet_health(c, 100, NULL, NULL, &err), DUET_E_TIMEOUT);
    assert_true(now_ms() - t0 < 2000);
    assert_int_equal(duet_poll(c, 50, &err), DUET_E_TIMEOUT);
    /* Closing the client ends the handle, which stays readable. */
    duet_destroy(&c);
    assert_true(duet_request_finished(r));
    assert_int_equal(duet_request_error(r)->code, DUET_E_USAGE);
    assert_int_equal(duet_wait(r, 0, NULL, &err), DUET_E_USAGE);
    assert_int_equal(duet_cancel(r, &err), DUET_OK);
    duet_request_free(&r);
    fake_stop(&f);
}

static void test_unreachable(void **state)
{
    (void)state;
    /* A port that nothing listens on: bind one, note it, close it. */
    void *z = zmq_ctx_new();
    void *s = zmq_socket(z, ZMQ_ROUTER);
    assert_int_equal(zmq_bind(s, "tcp://127.0.0.1:*"), 0);
    char ep[256];
    size_t len = sizeof ep;
    assert_int_equal(zmq_getsockopt(s, ZMQ_LAST_ENDPOINT, ep, &len), 0);
    zmq_close(s);
    zmq_ctx_term(z);

    duet_options o;
    duet_options_init(&o);
    o.send_timeout_ms = 150;
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(ep, &o, &c, &err), DUET_OK);
    duet_params p;
    duet_params_init(&p);
    p.prompt = "hi";
    duet_request *r = NULL;
    double t0 = now_ms();
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_E_UNREACHABLE);
    assert_true(now_ms() - t0 < 2000);
    assert_null(r);
    assert_non_null(strstr(err.message, ep));
    assert_int_equal(duet_health(c, 100, NULL, NULL, &err), DUET_E_UNREACHABLE);
    duet_destroy(&c);

    assert_int_equal(duet_connect("nonsense://x", NULL, &c, &err), DUET_E_USAGE);
    assert_null(c);
    assert_non_null(strstr(err.message, "nonsense://x"));
}

/* ---- malformed replies ------------------------------------------------------------------------- */

typedef enum {
    BAD_RAW = 0,        /* raw frames that break the framing, then a good answer */
    BAD_RAW_ONLY,       /* raw frames that break the framing, nothing else */
    BAD_SCHEMA,         /* a delta without index */
    BAD_EARLY_DELTA,    /* a delta before accepted */
    BAD_GAP,            /* delta index 0 then 2 */
    BAD_DELTA_NOSTREAM, /* a delta for a request that is not streamed */
    BAD_DONE_EARLY,     /* done before accepted */
    BAD_TWO_ACCEPTED,   /* accepted twice */
    BAD_WRONG_ID_TYPE,  /* id is a number: nothing can be attributed */
} bad_kind;

static void fn_bad(fake_t *f, const proto_route *rt, proto_cmd cmd, json_t *body)
{
    const bad_kind *k = f->user;
    if (cmd == PROTO_CMD_STATUS) { /* a status missing its kv object, then bad JSON for health */
        fsend(f, rt, PROTO_CMD_STATUS, "{\"version\": \"x\", \"model\": \"m\", \"uptime_s\": 1}");
        return;
    }
    if (cmd == PROTO_CMD_HEALTH) {
        const char *fr[] = {PROTO_CLIENT_TAG, "health", "{\"ok\": tru"};
        fsend_raw(f, rt, 3, fr);
        return;
    }
    if (cmd != PROTO_CMD_GENERATE) return;
    const char *id = body_id(body);
    char acc[256];
    snprintf(acc, sizeof acc, "{\"id\": \"%s\", \"prompt_tokens\": 2, \"max_tokens\": 10, \"seed\": 1}", id);
    switch (*k) {
    case BAD_RAW:
    case BAD_RAW_ONLY: {
        const char *two[] = {PROTO_CLIENT_TAG, "delta"};
        const char *wtag[] = {PROTO_WORKER_TAG, "delta", "{}"};
        const char *v2[] = {"duet.client/2", "delta", "{}"};
        const char *bj[] = {PROTO_CLIENT_TAG, "delta", "{\"id\": "};
        const char *arr[] = {PROTO_CLIENT_TAG, "done", "[1, 2]"};
        const char *unk[] = {PROTO_CLIENT_TAG, "deltas", "{}"};
        const char *unex[] = {PROTO_CLIENT_TAG, "generate", "{\"id\": \"x\", \"prompt\": \"p\"}"};
        const char *four[] = {PROTO_CLIENT_TAG, "delta", "{}", "{}"};
        fsend_raw(f, rt, 2, two);
        fsend_raw(f, rt, 3, wtag);
        fsend_raw(f, rt, 3, v2);
        fsend_raw(f, rt, 3, bj);
        fsend_raw(f, rt, 3, arr);
        fsend_raw(f, rt, 3, unk);
        fsend_raw(f, rt, 3, unex);
        fsend_raw(f, rt, 4, four);
        if (*k == BAD_RAW) serve_paris(f, rt, id, body_stream(body));
        break;
    }
    case BAD_SCHEMA:
        fsend(f, rt, PROTO_CMD_ACCEPTED, acc);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"text\": \"a\", \"token_ids\": [1]}", id);
        break;
    case BAD_EARLY_DELTA:
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 0, \"text\": \"a\", \"token_ids\": [1]}", id);
        break;
    case BAD_GAP:
        fsend(f, rt, PROTO_CMD_ACCEPTED, acc);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 0, \"text\": \"a\", \"token_ids\": [1]}", id);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 2, \"text\": \"b\", \"token_ids\": [1]}", id);
        break;
    case BAD_DELTA_NOSTREAM:
        fsend(f, rt, PROTO_CMD_ACCEPTED, acc);
        fsendf(f, rt, PROTO_CMD_DELTA, "{\"id\": \"%s\", \"index\": 0, \"text\": \"a\", \"token_ids\": [1]}", id);
        break;
    case BAD_DONE_EARLY:
        fsendf(f, rt, PROTO_CMD_DONE, "{\"id\": \"%s\", \"finish_reason\": \"eos\", %s}", id, USAGE_JSON);
        break;
    case BAD_TWO_ACCEPTED:
        fsend(f, rt, PROTO_CMD_ACCEPTED, acc);
        fsend(f, rt, PROTO_CMD_ACCEPTED, acc);
        break;
    case BAD_WRONG_ID_TYPE:
        fsend(f, rt, PROTO_CMD_ACCEPTED, "{\"id\": 17, \"prompt_tokens\": 2, \"max_tokens\": 10, \"seed\": 1}");
        break;
    }
}

static void test_malformed_replies(void **state)
{
    (void)state;
    bad_kind k = BAD_RAW;
    fake_t *f = fake_start(fn_bad, &k);
    duet_client *c = connect_to(f);
    duet_error err;
    duet_request *r = NULL;
    duet_params p;
    duet_params_init(&p);
    p.prompt = "hi";
    p.stream = 1;

    /* Broken framing is discarded; the good replies behind it still arrive. */
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    const duet_result *res = NULL;
    assert_int_equal(duet_wait(r, WAIT_MS, &res, &err), DUET_OK);
    assert_string_equal(res->text, " Paris.");
    duet_request_free(&r);

    /* Only broken framing: the wait times out and says what was discarded. */
    k = BAD_RAW_ONLY;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_int_equal(duet_wait(r, 300, NULL, &err), DUET_E_TIMEOUT);
    assert_non_null(strstr(err.message, "malformed"));
    duet_request_free(&r);

    /* Replies that name the request but break the schema or the order end it. */
    struct {
        bad_kind k;
        int stream;
        const char *says;
    } cases[] = {
        {BAD_SCHEMA, 1, "index"},         {BAD_EARLY_DELTA, 1, "before 'accepted'"},
        {BAD_GAP, 1, "expected 1"},       {BAD_DELTA_NOSTREAM, 0, "not streamed"},
        {BAD_DONE_EARLY, 1, "before 'accepted'"}, {BAD_TWO_ACCEPTED, 1, "second 'accepted'"},
    };
    int n_cancel = fake_count(f, &f->n_cancel);
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        k = cases[i].k;
        p.stream = cases[i].stream;
        assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
        assert_int_equal(duet_wait(r, WAIT_MS, NULL, &err), DUET_E_BAD_REPLY);
        if (!strstr(err.message, cases[i].says)) fprintf(stderr, "case %zu: %s\n", i, err.message);
        assert_non_null(strstr(err.message, cases[i].says));
        assert_string_equal(err.code_name, "bad_reply");
        /* libduet tells duetd to stop the request it no longer trusts. */
        fake_wait_count(f, &f->n_cancel, ++n_cancel);
        duet_request_free(&r);
    }

    /* An id of the wrong type cannot be attributed: a timeout naming it. */
    k = BAD_WRONG_ID_TYPE;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_int_equal(duet_wait(r, 300, NULL, &err), DUET_E_TIMEOUT);
    assert_non_null(strstr(err.message, "'id'"));
    duet_request_free(&r);

    /* status breaking its schema, health with bad JSON: errors, at once. */
    json_t *j = NULL;
    double t0 = now_ms();
    assert_int_equal(duet_status(c, WAIT_MS, &j, &err), DUET_E_BAD_REPLY);
    assert_null(j);
    assert_non_null(strstr(err.message, "status"));
    assert_int_equal(duet_health(c, WAIT_MS, NULL, &j, &err), DUET_E_BAD_REPLY);
    assert_non_null(strstr(err.message, "bad_json"));
    assert_true(now_ms() - t0 < 2000);
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- status, health ------------------------------------------------------------------------------ */

static void test_status_health(void **state)
{
    (void)state;
    fake_t *f = fake_start(fn_good, NULL);
    duet_client *c = connect_to(f);
    duet_error err;
    json_t *j = NULL;
    assert_int_equal(duet_status(c, WAIT_MS, &j, &err), DUET_OK);
    assert_non_null(j);
    assert_string_equal(json_string_value(json_object_get(j, "model")), "SmolLM2 135M Instruct");
    assert_int_equal(json_array_size(json_object_get(j, "workers")), 2);
    json_decref(j);
    duet_health_info h;
    assert_int_equal(duet_health(c, WAIT_MS, &h, &j, &err), DUET_OK);
    assert_int_equal(h.ok, 1);
    assert_string_equal(h.state, "ready");
    assert_int_equal(h.groups_ready, 2);
    assert_int_equal(h.workers_alive, 2);
    assert_true(h.uptime_s > 3600 && h.uptime_s < 3601);
    assert_true(json_is_true(json_object_get(j, "ok")));
    json_decref(j);

    /* status while a request streams: the request's replies are not lost. */
    duet_params p;
    duet_params_init(&p);
    p.prompt = "hi";
    p.stream = 1;
    duet_request *r = NULL;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    assert_int_equal(duet_status(c, WAIT_MS, &j, &err), DUET_OK);
    json_decref(j);
    const duet_result *res = NULL;
    assert_int_equal(duet_wait(r, WAIT_MS, &res, &err), DUET_OK);
    assert_string_equal(res->text, " Paris.");
    duet_request_free(&r);
    duet_destroy(&c);
    fake_stop(&f);
}

/* ---- the CLI ----------------------------------------------------------------------------------- */

static char duet_bin[512];

static int have_cli(void)
{
    const char *b = getenv("BUILD");
    snprintf(duet_bin, sizeof duet_bin, "%s/bin/duet", b && *b ? b : "build");
    if (access(duet_bin, X_OK) != 0) {
        fprintf(stderr, "skipping: %s not built (set BUILD to the build folder)\n", duet_bin);
        return 0;
    }
    return 1;
}

/* Run "duet ARGS" with stdin from in_text (or /dev/null); stdout and stderr into
 * out/err (malloc'd). Returns the exit status. */
static int run_cli(const char *args, const char *in_text, char **out, char **errs)
{
    char in_path[] = "/tmp/duet-cli-in-XXXXXX", out_path[] = "/tmp/duet-cli-out-XXXXXX",
         err_path[] = "/tmp/duet-cli-err-XXXXXX";
    int fi = mkstemp(in_path), fo = mkstemp(out_path), fe = mkstemp(err_path);
    assert_true(fi >= 0 && fo >= 0 && fe >= 0);
    if (in_text) assert_int_equal(write(fi, in_text, strlen(in_text)), (ssize_t)strlen(in_text));
    close(fi);
    close(fo);
    close(fe);
    char cmd[2048];
    snprintf(cmd, sizeof cmd, "env -u DUET_ENDPOINT %s %s <%s >%s 2>%s", duet_bin, args, in_path, out_path,
             err_path);
    int st = system(cmd);
    char *paths[2] = {out_path, err_path};
    char **dst[2] = {out, errs};
    for (int i = 0; i < 2; i++) {
        FILE *fp = fopen(paths[i], "rb");
        assert_non_null(fp);
        char *buf = calloc(1, 1 << 16);
        size_t n = fread(buf, 1, (1 << 16) - 1, fp);
        buf[n] = '\0';
        fclose(fp);
        *dst[i] = buf;
    }
    unlink(in_path);
    unlink(out_path);
    unlink(err_path);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

static void test_cli_status_health(void **state)
{
    (void)state;
    if (!have_cli()) skip();
    fake_t *f = fake_start(fn_good, NULL);
    char args[512], *out, *errs;

    snprintf(args, sizeof args, "status --endpoint %s", f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 0);
    assert_non_null(strstr(out, "SmolLM2 135M Instruct"));
    assert_non_null(strstr(out, "node1-cpu1"));
    assert_non_null(strstr(out, "decode"));
    free(out);
    free(errs);

    snprintf(args, sizeof args, "status --json --endpoint %s", f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 0);
    json_error_t je;
    json_t *j = json_loads(out, 0, &je);
    assert_non_null(j);
    json_t *want = json_loads(STATUS_JSON, 0, &je);
    assert_true(json_equal(j, want));
    json_decref(j);
    json_decref(want);
    free(out);
    free(errs);

    snprintf(args, sizeof args, "health --endpoint %s", f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 0);
    assert_non_null(strstr(out, "ready"));
    free(out);
    free(errs);
    fake_stop(&f);

    f = fake_start(fn_good, (void *)HEALTH_BAD); /* not ready: exit 1 */
    snprintf(args, sizeof args, "health --endpoint %s", f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 1);
    assert_non_null(strstr(out, "starting"));
    free(out);
    free(errs);
    /* DUET_ENDPOINT is the default endpoint. */
    char cmd[1024];
    snprintf(cmd, sizeof cmd, "DUET_ENDPOINT=%s %s health >/dev/null 2>&1", f->endpoint, duet_bin);
    int st = system(cmd);
    assert_true(WIFEXITED(st) && WEXITSTATUS(st) == 1);
    fake_stop(&f);

    /* Nobody there: a clear error, not a hang. */
    assert_int_equal(run_cli("health --endpoint tcp://127.0.0.1:9 --timeout 0.3", NULL, &out, &errs), 1);
    assert_non_null(strstr(errs, "tcp://127.0.0.1:9"));
    free(out);
    free(errs);
    assert_int_equal(run_cli("status --bogus", NULL, &out, &errs), 2);
    free(out);
    free(errs);
}

static void test_cli_generate(void **state)
{
    (void)state;
    if (!have_cli()) skip();
    fake_t *f = fake_start(fn_good, NULL);
    char args[512], *out, *errs;
    snprintf(args, sizeof args, "generate --endpoint %s -p 'The capital of France is' -n 16 --stop '\\n\\n' --top-k 5",
             f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 0);
    assert_string_equal(out, " Paris.\n");
    assert_non_null(strstr(errs, "TTFT"));
    assert_non_null(strstr(errs, "finish: eos"));
    assert_non_null(strstr(errs, "prompt 6 tokens"));
    free(out);
    free(errs);
    pthread_mutex_lock(&f->mu);
    json_t *g = f->gens[0];
    assert_true(json_is_true(json_object_get(g, "stream")));
    assert_int_equal(json_integer_value(json_object_get(g, "max_tokens")), 16);
    json_t *smp = json_object_get(g, "sampling");
    assert_int_equal(json_integer_value(json_object_get(smp, "top_k")), 5);
    assert_true(json_number_value(json_object_get(smp, "temperature")) == 0); /* greedy, as in-process */
    pthread_mutex_unlock(&f->mu);

    /* --chat sends messages. */
    snprintf(args, sizeof args, "generate --endpoint %s -p hello --chat --system terse -q", f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 0);
    assert_string_equal(out, " Paris.\n");
    assert_null(strstr(errs, "TTFT"));
    free(out);
    free(errs);
    pthread_mutex_lock(&f->mu);
    json_t *msgs = json_object_get(f->gens[1], "messages");
    assert_int_equal(json_array_size(msgs), 2);
    assert_string_equal(json_string_value(json_object_get(json_array_get(msgs, 0), "role")), "system");
    assert_string_equal(json_string_value(json_object_get(json_array_get(msgs, 1), "content")), "hello");
    pthread_mutex_unlock(&f->mu);
    fake_stop(&f);

    /* A refusal is printed with its code; exit 1. */
    err_script s = {"prompt_too_long", 0};
    f = fake_start(fn_error, &s);
    snprintf(args, sizeof args, "generate --endpoint %s -p hi", f->endpoint);
    assert_int_equal(run_cli(args, NULL, &out, &errs), 1);
    assert_non_null(strstr(errs, "prompt_too_long"));
    free(out);
    free(errs);
    fake_stop(&f);
}

static void test_cli_chat(void **state)
{
    (void)state;
    if (!have_cli()) skip();
    fake_t *f = fake_start(fn_good, NULL);
    char args[512], *out, *errs;
    snprintf(args, sizeof args, "chat --endpoint %s --system 'Be brief.'", f->endpoint);
    assert_int_equal(run_cli(args, "hello\nand again\n/quit\nnever sent\n", &out, &errs), 0);
    /* Two turns, each answered. */
    const char *a = strstr(out, " Paris.");
    assert_non_null(a);
    assert_non_null(strstr(a + 1, " Paris."));
    assert_int_equal(fake_count(f, &f->n_generate), 2);
    pthread_mutex_lock(&f->mu);
    json_t *g1 = f->gens[0], *g2 = f->gens[1];
    const char *s1 = json_string_value(json_object_get(g1, "session"));
    const char *s2 = json_string_value(json_object_get(g2, "session"));
    assert_non_null(s1);
    assert_string_equal(s1, s2); /* one conversation, one session */
    json_t *m2 = json_object_get(g2, "messages");
    assert_int_equal(json_array_size(m2), 4); /* system, user, assistant, user */
    assert_string_equal(json_string_value(json_object_get(json_array_get(m2, 0), "content")), "Be brief.");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m2, 1), "content")), "hello");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m2, 2), "role")), "assistant");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m2, 2), "content")), " Paris.");
    assert_string_equal(json_string_value(json_object_get(json_array_get(m2, 3), "content")), "and again");
    pthread_mutex_unlock(&f->mu);
    free(out);
    free(errs);

    /* End of input ends the chat too. */
    assert_int_equal(run_cli(args, "one turn\n", &out, &errs), 0);
    assert_non_null(strstr(out, " Paris."));
    free(out);
    free(errs);
    fake_stop(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stream_order),
        cmocka_unit_test(test_nonstream_and_wait),
        cmocka_unit_test(test_multiplex_8),
        cmocka_unit_test(test_multiplex_callbacks),
        cmocka_unit_test(test_cancel),
        cmocka_unit_test(test_every_error_code),
        cmocka_unit_test(test_local_checks),
        cmocka_unit_test(test_timeout_silent_server),
        cmocka_unit_test(test_unreachable),
        cmocka_unit_test(test_malformed_replies),
        cmocka_unit_test(test_status_health),
        cmocka_unit_test(test_cli_status_health),
        cmocka_unit_test(test_cli_generate),
        cmocka_unit_test(test_cli_chat),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
