/* tests/test_e2e_errors.c: the service's error paths, with real processes on loopback.
 *
 * Starts $BUILD/bin/duetd and $BUILD/bin/duet-worker from configs written here (as
 * tests/test_e2e.c does) and checks that each error gets its stable code and that duetd
 * still serves a normal request afterwards:
 *   - malformed messages from a raw ZeroMQ DEALER: wrong frame count, a foreign or
 *     other-version protocol tag, unknown and unexpected commands, bad JSON, a body over
 *     16 MiB, fields of the wrong type, unknown fields;
 *   - a prompt longer than the context, prompt + max_tokens over it, max_tokens over
 *     max_tokens_limit;
 *   - a full group with when_full = busy: the overflow requests get busy;
 *   - a client that disconnects mid-stream: its request is dropped and its KV blocks
 *     freed (status: no request running, blocks used back to the idle level);
 *   - a full queue (when_full = wait, set by SIGHUP): queue_limit requests wait, the rest
 *     get busy; a client leaving with requests running and queued frees them all;
 *   - connections closing while new ones open (fd reuse): every request is answered;
 *   - the only worker SIGKILLed: its requests end with worker_lost, new ones get
 *     unavailable; started again, it serves;
 *   - (default model) two colocated groups, one worker SIGKILLed (then started again), or
 *     stopped past dead_after (then continued), mid-request: every request ends within a
 *     bound, either done on the survivor (retries >= 1, the tokens of `duet generate`) or
 *     with worker_lost; no KV block stays used; the worker registers again;
 *   - (default model) duetd SIGKILLed and started again: the workers, answered
 *     unexpected_command, register again.
 * Env: E2E_FILTER=pattern runs only matching tests; E2E_KEEP=1 keeps the logs.
 * Group 1 uses a tiny random model; group 2 needs models/SmolLM2-135M-Instruct.Q4_1.gguf
 * (skipped with a note when it is missing).
 */
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <cmocka.h>

/* Sanitizer builds compute ~10x slower: their waits for the real model are longer. */
#if defined(__SANITIZE_ADDRESS__)
#define SLOW 6
#else
#define SLOW 1
#endif
#include <jansson.h>
#include <zmq.h>

#include "client/libduet.h"
#include "tests/support/gguf_write.h"
#include "tests/support/testutil.h"

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define TINY_CTX 8192
#define MAX_TOKENS_LIMIT 7000
#define BUSY_SEQS 2       /* max_seqs of the tiny group */
#define N_KILL_REQ 6      /* requests in flight when a worker is killed */
#define KILL_MAX_TOKENS 32
#define REPLY_MS 10000    /* bound on any single reply */

typedef struct {
    char tmpdir[256], model[512], conf[512], endpoint[600], build[256];
    pid_t duetd;
    pid_t workers[2];
    char groups[2][8];
    int n_workers;
    int skip;             /* the model is missing: the group's tests skip */
    char skip_why[256];
    int64_t idle_used;    /* status kv.blocks_used with nothing running */
} fixture;

static fixture tiny_fx, kill_fx;


/* ---- processes --------------------------------------------------------------------------- */


static void show_log(const fixture *fx, const char *name) { tu_show_log(fx->tmpdir, name, 20); }

static void show_logs(const fixture *fx)
{
    show_log(fx, "duetd");
    for (int i = 0; i < fx->n_workers; i++) {
        char n[32];
        snprintf(n, sizeof n, "worker-%s", fx->groups[i]);
        show_log(fx, n);
    }
}

/* Write the config (daemon_extra: more [daemon] keys; group_body: each group's keys),
 * start duetd and one worker per group, and wait until every group is ready. */
static int fx_start(fixture *fx, const char *daemon_extra, const char *group_body, int n_groups)
{
    char line[1024];
    snprintf(fx->endpoint, sizeof fx->endpoint, "ipc://%s/client.sock", fx->tmpdir);
    snprintf(fx->conf, sizeof fx->conf, "%s/duet.conf", fx->tmpdir);
    FILE *f = fopen(fx->conf, "w");
    if (!f) return -1;
    fprintf(f,
            "[model]\npath = %s\nkv_type = f16\n"
            "[daemon]\nclient_endpoint = %s\nworker_endpoint = ipc://%s/worker.sock\n"
            "heartbeat_ms = 500\ndead_after = 4\nlog_level = info\n%s",
            fx->model, fx->endpoint, fx->tmpdir, daemon_extra);
    fx->n_workers = n_groups;
    for (int i = 0; i < n_groups; i++) {
        snprintf(fx->groups[i], sizeof fx->groups[i], "%c", 'a' + i);
        fprintf(f, "[group %s]\n%s", fx->groups[i], group_body);
    }
    fclose(f);
    char bin_d[300], bin_w[300], log_d[600];
    snprintf(bin_d, sizeof bin_d, "%s/bin/duetd", fx->build);
    snprintf(bin_w, sizeof bin_w, "%s/bin/duet-worker", fx->build);
    snprintf(log_d, sizeof log_d, "%s/duetd.log", fx->tmpdir);
    char *argv_d[] = {bin_d, "--config", fx->conf, NULL};
    fx->duetd = tu_spawn(argv_d, log_d);
    for (int i = 0; i < n_groups; i++) {
        snprintf(line, sizeof line, "%s/worker-%s.log", fx->tmpdir, fx->groups[i]);
        char *argv_w[] = {bin_w, "--config", fx->conf, "--group", fx->groups[i], NULL};
        fx->workers[i] = tu_spawn(argv_w, line);
    }
    duet_client *c = NULL;
    if (duet_connect(fx->endpoint, NULL, &c, NULL) != DUET_OK) return -1;
    int ok = 0;
    for (double t0 = tu_now_ms(); !ok && tu_now_ms() - t0 < 60000;) {
        duet_health_info hi;
        if (duet_health(c, 1000, &hi, NULL, NULL) == DUET_OK && hi.ok && hi.groups_ready == n_groups) ok = 1;
        else usleep(50000);
    }
    duet_destroy(&c);
    if (!ok) {
        fprintf(stderr, "e2e_errors: duetd did not get %d ready groups within 60 s\n", n_groups);
        show_logs(fx);
        return -1;
    }
    return 0;
}

static int fx_init(fixture *fx, const char *tag)
{
    memset(fx, 0, sizeof *fx);
    fx->duetd = fx->workers[0] = fx->workers[1] = -1;
    snprintf(fx->build, sizeof fx->build, "%s", getenv("BUILD") ? getenv("BUILD") : "build");
    snprintf(fx->tmpdir, sizeof fx->tmpdir, "/tmp/duet-e2eerr-%s-XXXXXX", tag);
    return mkdtemp(fx->tmpdir) ? 0 : -1;
}

static int fx_stop(fixture *fx)
{
    int bad = 0;
    for (int i = 0; i < fx->n_workers; i++) {
        int rc = tu_stop(&fx->workers[i], 15000);
        if (rc != 0) {
            fprintf(stderr, "e2e_errors: duet-worker %s exit %d\n", fx->groups[i], rc);
            bad = 1;
        }
    }
    int rd = tu_stop(&fx->duetd, 15000);
    if (rd != 0) {
        fprintf(stderr, "e2e_errors: duetd exit %d\n", rd);
        bad = 1;
    }
    if (bad) show_logs(fx);
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", fx->tmpdir);
    if (getenv("E2E_KEEP")) printf("[  NOTE    ] E2E_KEEP: logs kept in %s\n", fx->tmpdir);
    else if (system(cmd) != 0) bad = 1;
    return bad ? -1 : 0;
}

/* ---- status ---------------------------------------------------------------------------------- */

static json_t *get_status(const fixture *fx)
{
    duet_client *c = NULL;
    json_t *st = NULL;
    duet_error err;
    if (duet_connect(fx->endpoint, NULL, &c, &err) != DUET_OK) fail_msg("connect: %s", err.message);
    if (duet_status(c, REPLY_MS, &st, &err) != DUET_OK) fail_msg("status: %s", err.message);
    duet_destroy(&c);
    return st;
}

static int64_t jint(const json_t *o, const char *a, const char *b)
{
    const json_t *x = json_object_get(o, a);
    if (b) x = json_object_get(x, b);
    return json_integer_value(x);
}

/* Wait up to ms for no request running and kv.blocks_used <= want (the idle level);
 * 0 when reached. The last values seen go to *running, *used. */
static int wait_idle(const fixture *fx, int64_t want, int ms, int64_t *running, int64_t *used)
{
    for (double t0 = tu_now_ms();;) {
        json_t *st = get_status(fx);
        *running = jint(st, "queue", "running") + jint(st, "queue", "waiting");
        *used = jint(st, "kv", "blocks_used");
        json_decref(st);
        if (*running == 0 && *used <= want) return 0;
        if (tu_now_ms() - t0 > ms) return -1;
        usleep(100000);
    }
}

/* ---- a raw DEALER --------------------------------------------------------------------------- */

typedef struct {
    void *ctx, *sock;
} raw_t;

static void raw_open(raw_t *r, const char *endpoint)
{
    r->ctx = zmq_ctx_new();
    assert_non_null(r->ctx);
    r->sock = zmq_socket(r->ctx, ZMQ_DEALER);
    assert_non_null(r->sock);
    int linger = 0;
    zmq_setsockopt(r->sock, ZMQ_LINGER, &linger, sizeof linger);
    assert_int_equal(zmq_connect(r->sock, endpoint), 0);
}

static void raw_close(raw_t *r)
{
    if (r->sock) zmq_close(r->sock);
    if (r->ctx) zmq_ctx_term(r->ctx);
    r->sock = r->ctx = NULL;
}

/* Send n frames (sizes[i] bytes each; a size of -1: strlen). */
static void raw_send(raw_t *r, int n, const char *const *frames, const long *sizes)
{
    for (int i = 0; i < n; i++) {
        size_t len = sizes && sizes[i] >= 0 ? (size_t)sizes[i] : strlen(frames[i]);
        if (zmq_send(r->sock, frames[i], len, i + 1 < n ? ZMQ_SNDMORE : 0) < 0)
            fail_msg("zmq_send frame %d: %s", i, zmq_strerror(errno));
    }
}

/* Receive one reply: its command into cmd and its body (a new reference); -1 on
 * timeout. Checks the framing (tag, command, JSON object). */
static int raw_recv(raw_t *r, int timeout_ms, char cmd[33], json_t **body)
{
    zmq_pollitem_t it = {r->sock, 0, ZMQ_POLLIN, 0};
    if (zmq_poll(&it, 1, timeout_ms) <= 0) return -1;
    char frames[3][256];
    json_t *j = NULL;
    int n = 0, more = 1;
    while (more) {
        zmq_msg_t m;
        zmq_msg_init(&m);
        if (zmq_msg_recv(&m, r->sock, 0) < 0) fail_msg("zmq_msg_recv: %s", zmq_strerror(errno));
        more = zmq_msg_more(&m);
        if (n < 2) {
            size_t len = zmq_msg_size(&m) < 255 ? zmq_msg_size(&m) : 255;
            memcpy(frames[n], zmq_msg_data(&m), len);
            frames[n][len] = 0;
        } else if (n == 2) {
            j = json_loadb(zmq_msg_data(&m), zmq_msg_size(&m), 0, NULL);
        }
        zmq_msg_close(&m);
        n++;
    }
    if (n != 3 || strcmp(frames[0], "duet.client/1") != 0 || !json_is_object(j))
        fail_msg("duetd's reply: %d frames, tag '%s', body %s", n, frames[0], j ? "ok" : "not JSON");
    snprintf(cmd, 33, "%.32s", frames[1]);
    *body = j;
    return 0;
}

/* Send frames and expect one `error` with code (and the given id, if any). */
static void expect_error(raw_t *r, const char *what, int n, const char *const *frames, const long *sizes,
                         const char *code, const char *id)
{
    raw_send(r, n, frames, sizes);
    char cmd[33];
    json_t *b = NULL;
    if (raw_recv(r, REPLY_MS, cmd, &b) != 0) fail_msg("%s: no reply within %d ms", what, REPLY_MS);
    const char *got = json_string_value(json_object_get(b, "code"));
    const char *msg = json_string_value(json_object_get(b, "message"));
    if (strcmp(cmd, "error") != 0 || !got || strcmp(got, code) != 0)
        fail_msg("%s: expected error %s, got %s %s (%s)", what, code, cmd, got ? got : "-", msg ? msg : "");
    if (!msg || !*msg) fail_msg("%s: error %s without a message", what, code);
    if (id) {
        const char *gid = json_string_value(json_object_get(b, "id"));
        if (!gid || strcmp(gid, id) != 0) fail_msg("%s: error %s names id '%s', not '%s'", what, code, gid ? gid : "-", id);
    }
    printf("[ errors   ] %-34s -> %s: %s\n", what, code, msg);
    json_decref(b);
}

/* A normal request on the raw socket: accepted, then done with n tokens. */
static void raw_normal(raw_t *r, const char *id)
{
    char body[256];
    snprintf(body, sizeof body,
             "{\"id\": \"%s\", \"prompt\": \"hello there\", \"max_tokens\": 3, \"ignore_eos\": true, "
             "\"sampling\": {\"temperature\": 0}}", id);
    const char *f[] = {"duet.client/1", "generate", body};
    raw_send(r, 3, f, NULL);
    char cmd[33];
    json_t *b = NULL;
    if (raw_recv(r, REPLY_MS, cmd, &b) != 0) fail_msg("%s: no accepted", id);
    if (strcmp(cmd, "accepted") != 0)
        fail_msg("%s: expected accepted, got %s %s", id, cmd,
                 json_string_value(json_object_get(b, "message")) ?: "");
    json_decref(b);
    if (raw_recv(r, 30000 * SLOW, cmd, &b) != 0) {
        show_logs(&tiny_fx);
        fail_msg("%s: no done within 30 s", id);
    }
    if (strcmp(cmd, "done") != 0) fail_msg("%s: expected done, got %s", id, cmd);
    assert_int_equal(json_array_size(json_object_get(b, "token_ids")), 3);
    json_decref(b);
}

/* A normal request through libduet on a new connection. */
static void lib_normal(const fixture *fx)
{
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    duet_params p;
    duet_params_init(&p);
    p.prompt = "a normal request";
    p.max_tokens = 4;
    p.ignore_eos = 1;
    p.sampling.temperature = 0;
    duet_request *req = NULL;
    const duet_result *res = NULL;
    if (duet_generate(c, &p, &req, &err) != DUET_OK) fail_msg("generate: %s", err.message);
    if (duet_wait(req, 30000 * SLOW, &res, &err) != DUET_OK) {
        show_logs(fx);
        fail_msg("normal request: %s: %s", err.code_name, err.message);
    }
    assert_int_equal(res->n_token_ids, 4);
    duet_request_free(&req);
    duet_destroy(&c);
}

/* Wait until n groups are ready again (30 s at most). */
static void wait_groups_ready(const fixture *fx, int n, const char *why)
{
    duet_client *c = NULL;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    int ok = 0;
    for (double t0 = tu_now_ms(); !ok && tu_now_ms() - t0 < 30000 * SLOW;) {
        duet_health_info hi;
        if (duet_health(c, 1000, &hi, NULL, NULL) == DUET_OK && hi.ok && hi.groups_ready == n) ok = 1;
        else usleep(50000);
    }
    duet_destroy(&c);
    if (!ok) fail_msg("%s: %d groups not ready again within 30 s", why, n);
}

/* ---- group 1: tiny model ---------------------------------------------------------------------- */

static int tiny_setup(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    if (fx_init(fx, "tiny") != 0) return -1;
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.type = DTYPE_Q8_0;
    o.n_embd = 64;
    o.n_ff = 128;
    o.n_ctx = TINY_CTX;
    snprintf(fx->model, sizeof fx->model, "%.400s/tiny.gguf", fx->tmpdir);
    char err[256];
    if (mkmodel_write(&o, fx->model, err, sizeof err) != 0) {
        fprintf(stderr, "e2e_errors: %s\n", err);
        return -1;
    }
    char extra[256];
    snprintf(extra, sizeof extra, "when_full = busy\nqueue_limit = 2\nmax_tokens_limit = %d\n", MAX_TOKENS_LIMIT);
    char body[256];
    snprintf(body, sizeof body,
             "role = both\ndevices = cpu\nthreads = 1\nkv_budget = 8MiB\nmax_batch_tokens = 256\nmax_seqs = %d\n",
             BUSY_SEQS);
    if (fx_start(fx, extra, body, 1) != 0) return -1;
    int64_t running;
    /* the idle level: nothing has run yet */
    for (double t0 = tu_now_ms(); tu_now_ms() - t0 < 3000; usleep(100000)) {
        json_t *st = get_status(fx);
        running = jint(st, "queue", "running");
        fx->idle_used = jint(st, "kv", "blocks_used");
        json_decref(st);
        if (running == 0) break;
    }
    return 0;
}

static int tiny_teardown(void **state)
{
    (void)state;
    return fx_stop(&tiny_fx);
}

static void test_malformed(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    raw_t r;
    raw_open(&r, fx->endpoint);
    raw_normal(&r, "ok0");

    const char *two[] = {"duet.client/1", "status"};
    expect_error(&r, "2 frames", 2, two, NULL, "bad_frames", NULL);
    raw_normal(&r, "ok1");

    const char *four[] = {"duet.client/1", "status", "{}", "{}"};
    expect_error(&r, "4 frames", 4, four, NULL, "bad_frames", NULL);
    raw_normal(&r, "ok2");

    const char *http[] = {"GET / HTTP/1.1", "status", "{}"};
    expect_error(&r, "tag: not duet", 3, http, NULL, "unknown_protocol", NULL);
    const char *wrk[] = {"duet.worker/1", "status", "{}"};
    expect_error(&r, "tag: the worker protocol", 3, wrk, NULL, "unknown_protocol", NULL);
    const char *v2[] = {"duet.client/2", "status", "{}"};
    expect_error(&r, "tag: version 2", 3, v2, NULL, "unsupported_version", NULL);
    raw_normal(&r, "ok3");

    const char *unk[] = {"duet.client/1", "generat", "{\"id\": \"x\"}"};
    expect_error(&r, "unknown command", 3, unk, NULL, "unknown_command", NULL);
    const char *unexp[] = {"duet.client/1", "done", "{}"};
    expect_error(&r, "a reply sent to duetd", 3, unexp, NULL, "unexpected_command", NULL);
    const char *reg[] = {"duet.client/1", "register", "{}"};
    expect_error(&r, "a worker command", 3, reg, NULL, "unknown_command", NULL);
    raw_normal(&r, "ok4");

    const char *badjson[] = {"duet.client/1", "generate", "{\"id\": \"j1\", \"prompt\": "};
    expect_error(&r, "bad JSON", 3, badjson, NULL, "bad_json", NULL);
    const char *arr[] = {"duet.client/1", "status", "[1, 2]"};
    expect_error(&r, "JSON array body", 3, arr, NULL, "bad_json", NULL);
    const char *empty[] = {"duet.client/1", "health", ""};
    expect_error(&r, "empty body", 3, empty, NULL, "bad_json", NULL);
    const char *dup[] = {"duet.client/1", "generate", "{\"id\": \"d1\", \"id\": \"d2\", \"prompt\": \"x\"}"};
    expect_error(&r, "duplicate key", 3, dup, NULL, "bad_json", NULL);
    const char bad_utf8[] = "{\"id\": \"u1\", \"prompt\": \"\xff\xfe\"}";
    const char *utf[] = {"duet.client/1", "generate", bad_utf8};
    expect_error(&r, "invalid UTF-8", 3, utf, NULL, "bad_json", NULL);
    raw_normal(&r, "ok5");

    /* a body over 16 MiB */
    size_t big_n = 17u << 20;
    char *big = malloc(big_n);
    assert_non_null(big);
    memset(big, ' ', big_n);
    memcpy(big, "{\"id\": \"big\", \"prompt\": \"", 25);
    memcpy(big + big_n - 2, "\"}", 2);
    const char *bigf[] = {"duet.client/1", "generate", big};
    long bigs[] = {-1, -1, (long)big_n};
    expect_error(&r, "body over 16 MiB", 3, bigf, bigs, "too_large", NULL);
    free(big);
    raw_normal(&r, "ok6");

    const char *wt1[] = {"duet.client/1", "generate", "{\"id\": \"w1\", \"prompt\": \"x\", \"max_tokens\": \"ten\"}"};
    expect_error(&r, "max_tokens a string", 3, wt1, NULL, "bad_request", "w1");
    const char *wt2[] = {"duet.client/1", "generate", "{\"id\": \"w2\", \"prompt\": 42}"};
    expect_error(&r, "prompt a number", 3, wt2, NULL, "bad_request", "w2");
    const char *wt3[] = {"duet.client/1", "generate",
                         "{\"id\": \"w3\", \"prompt\": \"x\", \"sampling\": {\"temperature\": \"hot\"}}"};
    expect_error(&r, "sampling.temperature a string", 3, wt3, NULL, "bad_request", "w3");
    const char *wt4[] = {"duet.client/1", "generate", "{\"id\": \"w4\", \"prompt\": \"x\", \"stream\": 1}"};
    expect_error(&r, "stream an integer", 3, wt4, NULL, "bad_request", "w4");
    const char *wt5[] = {"duet.client/1", "generate", "{\"id\": \"w5\", \"prompt\": \"x\", \"max_tokens\": 4.0}"};
    expect_error(&r, "max_tokens with a fraction", 3, wt5, NULL, "bad_request", "w5");
    const char *wt6[] = {"duet.client/1", "generate", "{\"id\": 7, \"prompt\": \"x\"}"};
    expect_error(&r, "id a number", 3, wt6, NULL, "bad_request", NULL);
    const char *wt7[] = {"duet.client/1", "generate", "{\"id\": \"w7\", \"prompt\": \"x\", \"temprature\": 0}"};
    expect_error(&r, "unknown field", 3, wt7, NULL, "bad_request", "w7");
    const char *wt8[] = {"duet.client/1", "cancel", "{\"id\": [1]}"};
    expect_error(&r, "cancel id an array", 3, wt8, NULL, "bad_request", NULL);
    const char *wt9[] = {"duet.client/1", "generate", "{\"id\": \"w9\", \"tokens\": [1, 999999]}"};
    expect_error(&r, "token id beyond the vocabulary", 3, wt9, NULL, "bad_request", "w9");
    const char *nf[] = {"duet.client/1", "cancel", "{\"id\": \"nope\"}"};
    expect_error(&r, "cancel of no request", 3, nf, NULL, "not_found", "nope");
    raw_normal(&r, "ok7");

    /* the same id twice in flight */
    const char *g1[] = {"duet.client/1", "generate",
                        "{\"id\": \"same\", \"prompt\": \"x\", \"max_tokens\": 2000, \"ignore_eos\": true, "
                        "\"stream\": true}"};
    raw_send(&r, 3, g1, NULL);
    raw_send(&r, 3, g1, NULL);
    const char *c1[] = {"duet.client/1", "cancel", "{\"id\": \"same\"}"};
    /* the replies of the two interleave: the first's accepted (and deltas) and the
     * second's error, in either order; then the first's done once cancelled */
    int dup_seen = 0, done_seen = 0;
    for (double t0 = tu_now_ms(); !(dup_seen && done_seen);) {
        char cmd[33];
        json_t *b = NULL;
        if (tu_now_ms() - t0 > REPLY_MS || raw_recv(&r, REPLY_MS, cmd, &b) != 0)
            fail_msg("duplicate id: no %s within %d ms", dup_seen ? "done" : "duplicate_id", REPLY_MS);
        assert_string_equal(json_string_value(json_object_get(b, "id")), "same");
        if (strcmp(cmd, "error") == 0) {
            const char *code = json_string_value(json_object_get(b, "code"));
            if (dup_seen || !code || strcmp(code, "duplicate_id") != 0)
                fail_msg("duplicate id: unexpected error %s: %s", code ? code : "-",
                         json_string_value(json_object_get(b, "message")) ?: "");
            printf("[ errors   ] %-34s -> %s: %s\n", "duplicate id", code,
                   json_string_value(json_object_get(b, "message")));
            dup_seen = 1;
            raw_send(&r, 3, c1, NULL);
        } else if (strcmp(cmd, "done") == 0) {
            assert_true(dup_seen);
            assert_string_equal(json_string_value(json_object_get(b, "finish_reason")), "cancelled");
            done_seen = 1;
        } else if (strcmp(cmd, "accepted") != 0 && strcmp(cmd, "delta") != 0) {
            fail_msg("duplicate id: unexpected %s", cmd);
        }
        json_decref(b);
    }
    raw_normal(&r, "ok8");
    raw_close(&r);
    lib_normal(fx);
}

static void test_limits(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    raw_t r;
    raw_open(&r, fx->endpoint);
    /* a prompt over the context: TINY_CTX + 100 token ids */
    size_t cap = (TINY_CTX + 200) * 8 + 64, off = 0;
    char *body = malloc(cap);
    assert_non_null(body);
    off += (size_t)snprintf(body + off, cap - off, "{\"id\": \"long\", \"tokens\": [");
    for (int i = 0; i < TINY_CTX + 100; i++) off += (size_t)snprintf(body + off, cap - off, "%s%d", i ? "," : "", 5 + i % 50);
    snprintf(body + off, cap - off, "], \"max_tokens\": 4}");
    const char *f1[] = {"duet.client/1", "generate", body};
    expect_error(&r, "prompt tokens over the context", 3, f1, NULL, "prompt_too_long", "long");
    free(body);
    raw_normal(&r, "ok1");

    /* a text prompt over the context */
    cap = (size_t)TINY_CTX * 12 + 64;
    body = malloc(cap);
    assert_non_null(body);
    off = (size_t)snprintf(body, cap, "{\"id\": \"longtext\", \"prompt\": \"");
    for (int i = 0; i < TINY_CTX + 100; i++) off += (size_t)snprintf(body + off, cap - off, "w%d ", i % 97);
    snprintf(body + off, cap - off, "\"}");
    const char *f1b[] = {"duet.client/1", "generate", body};
    expect_error(&r, "text prompt over the context", 3, f1b, NULL, "prompt_too_long", "longtext");
    free(body);

    /* prompt + max_tokens over the context */
    char b2[256];
    snprintf(b2, sizeof b2, "{\"id\": \"fit\", \"prompt\": \"hello there\", \"max_tokens\": %d}", TINY_CTX);
    const char *f2[] = {"duet.client/1", "generate", b2};
    /* max_tokens_limit (MAX_TOKENS_LIMIT) is checked first when it is below the context */
    expect_error(&r, "max_tokens over max_tokens_limit", 3, f2, NULL, "bad_request", "fit");
    snprintf(b2, sizeof b2, "{\"id\": \"fit2\", \"tokens\": [");
    off = strlen(b2);
    cap = (size_t)TINY_CTX * 8;
    body = malloc(cap);
    assert_non_null(body);
    memcpy(body, b2, off + 1);
    int n_prompt = TINY_CTX - MAX_TOKENS_LIMIT + 10;
    for (int i = 0; i < n_prompt; i++) off += (size_t)snprintf(body + off, cap - off, "%s%d", i ? "," : "", 5 + i % 50);
    snprintf(body + off, cap - off, "], \"max_tokens\": %d}", MAX_TOKENS_LIMIT);
    const char *f3[] = {"duet.client/1", "generate", body};
    expect_error(&r, "prompt + max_tokens over the context", 3, f3, NULL, "prompt_too_long", "fit2");
    free(body);
    const char *f4[] = {"duet.client/1", "generate", "{\"id\": \"big\", \"prompt\": \"x\", \"max_tokens\": 262145}"};
    expect_error(&r, "max_tokens over the protocol's limit", 3, f4, NULL, "bad_request", "big");
    const char *f5[] = {"duet.client/1", "generate", "{\"id\": \"zero\", \"prompt\": \"x\", \"max_tokens\": 0}"};
    expect_error(&r, "max_tokens 0", 3, f5, NULL, "bad_request", "zero");
    raw_normal(&r, "ok2");
    raw_close(&r);
    lib_normal(fx);
}

static void test_busy(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    enum { N = BUSY_SEQS + 4 };
    duet_request *req[N];
    for (int i = 0; i < N; i++) {
        duet_params p;
        duet_params_init(&p);
        p.prompt = "fill the group";
        p.max_tokens = MAX_TOKENS_LIMIT;
        p.ignore_eos = 1;
        p.stream = 1;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate %d: %s", i, err.message);
    }
    int n_busy = 0, n_running = 0;
    for (int i = 0; i < N; i++) {
        duet_event ev;
        if (duet_next(req[i], REPLY_MS, &ev, &err) != DUET_OK) fail_msg("request %d: no reply: %s", i, err.message);
        if (ev.kind == DUET_EVENT_ERROR) {
            if (ev.error->code != DUET_E_BUSY) fail_msg("request %d: %s: %s", i, ev.error->code_name, ev.error->message);
            assert_true(ev.error->retry_after_ms > 0);
            n_busy++;
        } else {
            assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
            n_running++;
        }
    }
    printf("[ errors   ] %d requests on a group of max_seqs %d (when_full = busy): %d run, %d busy\n", N,
           BUSY_SEQS, n_running, n_busy);
    assert_int_equal(n_running, BUSY_SEQS);
    assert_int_equal(n_busy, N - BUSY_SEQS);
    for (int i = 0; i < N; i++) {
        if (!duet_request_finished(req[i])) {
            duet_cancel(req[i], NULL);
            const duet_result *res = NULL;
            if (duet_wait(req[i], REPLY_MS, &res, &err) != DUET_OK) fail_msg("cancel %d: %s", i, err.message);
            assert_int_equal(res->finish_reason, DUET_FINISH_CANCELLED);
        }
        duet_request_free(&req[i]);
    }
    duet_destroy(&c);
    lib_normal(fx);
    int64_t running, used;
    if (wait_idle(fx, fx->idle_used, 5000, &running, &used) != 0)
        fail_msg("after cancelling: %lld requests running, %lld KV blocks used (idle %lld)", (long long)running,
                 (long long)used, (long long)fx->idle_used);
}

/* Rewrite the config's when_full and queue_limit, SIGHUP duetd, and wait until status
 * shows the new queue_limit. */
static void reconfigure(fixture *fx, const char *when_full, int queue_limit)
{
    FILE *f = fopen(fx->conf, "r");
    assert_non_null(f);
    char text[8192], line[1024];
    size_t off = 0;
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "when_full", 9) == 0) snprintf(line, sizeof line, "when_full = %s\n", when_full);
        else if (strncmp(line, "queue_limit", 11) == 0) snprintf(line, sizeof line, "queue_limit = %d\n", queue_limit);
        off += (size_t)snprintf(text + off, sizeof text - off, "%s", line);
    }
    fclose(f);
    f = fopen(fx->conf, "w");
    assert_non_null(f);
    fputs(text, f);
    fclose(f);
    kill(fx->duetd, SIGHUP);
    for (double t0 = tu_now_ms();; usleep(50000)) {
        json_t *st = get_status(fx);
        int64_t lim = jint(st, "queue", "limit");
        json_decref(st);
        if (lim == queue_limit) break;
        if (tu_now_ms() - t0 > REPLY_MS) fail_msg("SIGHUP: queue_limit still %lld, not %d", (long long)lim, queue_limit);
    }
}

static void test_queue_full(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    enum { QLIM = 3, N = BUSY_SEQS + QLIM + 2 };
    reconfigure(fx, "wait", QLIM);
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[N];
    for (int i = 0; i < N; i++) {
        duet_params p;
        duet_params_init(&p);
        p.prompt = "fill the group and the queue";
        p.max_tokens = MAX_TOKENS_LIMIT;
        p.ignore_eos = 1;
        p.stream = 1;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate %d: %s", i, err.message);
    }
    int n_busy = 0, n_accepted = 0;
    for (int i = 0; i < N; i++) {
        duet_event ev;
        if (duet_next(req[i], REPLY_MS, &ev, &err) != DUET_OK) fail_msg("request %d: no reply: %s", i, err.message);
        if (ev.kind == DUET_EVENT_ERROR) {
            if (ev.error->code != DUET_E_BUSY) fail_msg("request %d: %s: %s", i, ev.error->code_name, ev.error->message);
            assert_true(ev.error->retry_after_ms > 0);
            n_busy++;
        } else {
            assert_int_equal(ev.kind, DUET_EVENT_ACCEPTED);
            n_accepted++;
        }
    }
    json_t *st = get_status(fx);
    int64_t running = jint(st, "queue", "running"), waiting = jint(st, "queue", "waiting");
    json_decref(st);
    printf("[ errors   ] %d requests, max_seqs %d, when_full = wait, queue_limit %d: %lld run, %lld wait, "
           "%d busy\n", N, BUSY_SEQS, QLIM, (long long)running, (long long)waiting, n_busy);
    assert_int_equal(n_accepted, BUSY_SEQS + QLIM);
    assert_int_equal(n_busy, N - BUSY_SEQS - QLIM);
    assert_int_equal(running, BUSY_SEQS);
    assert_int_equal(waiting, QLIM);
    /* the client leaves with requests running and queued: all of them go */
    duet_destroy(&c);
    for (int i = 0; i < N; i++) duet_request_free(&req[i]);
    int64_t used;
    if (wait_idle(fx, fx->idle_used, 5000, &running, &used) != 0)
        fail_msg("after the client left: %lld requests running or queued, %lld KV blocks used (idle %lld)",
                 (long long)running, (long long)used, (long long)fx->idle_used);
    lib_normal(fx);
    reconfigure(fx, "busy", 2);
    lib_normal(fx);
}

static void test_disconnect_midstream(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    json_t *st = get_status(fx);
    int64_t cancelled0 = jint(st, "requests", "cancelled"), served0 = jint(st, "requests", "served");
    json_decref(st);

    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[BUSY_SEQS];
    enum { N_PROMPT = 600 }; /* ~38 KV blocks each, so that their use shows in status */
    int32_t prompt[N_PROMPT];
    for (int i = 0; i < BUSY_SEQS; i++) {
        for (int k = 0; k < N_PROMPT; k++) prompt[k] = 3 + (k * 7 + i * 13) % 300;
        duet_params p;
        duet_params_init(&p);
        p.tokens = prompt;
        p.n_tokens = N_PROMPT;
        p.max_tokens = MAX_TOKENS_LIMIT;
        p.ignore_eos = 1;
        p.stream = 1;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate: %s", err.message);
    }
    /* each streams tokens, and a worker heartbeat shows their blocks in use */
    int got[BUSY_SEQS] = {0};
    int64_t used_mid = 0;
    double t_start = tu_now_ms();
    while (used_mid <= fx->idle_used) {
        if (tu_now_ms() - t_start > REPLY_MS) fail_msg("no KV blocks in use within %d ms", REPLY_MS);
        for (int i = 0; i < BUSY_SEQS; i++) {
            duet_event ev;
            while (duet_next(req[i], got[i] ? 0 : REPLY_MS, &ev, &err) == DUET_OK) {
                if (ev.kind == DUET_EVENT_DELTA) got[i] += ev.n_token_ids;
                else if (ev.kind != DUET_EVENT_ACCEPTED) fail_msg("request %d: ended before the disconnect", i);
            }
            if (!got[i]) fail_msg("request %d: no tokens streamed", i);
        }
        st = get_status(fx);
        used_mid = jint(st, "kv", "blocks_used");
        assert_int_equal(jint(st, "queue", "running"), BUSY_SEQS);
        json_decref(st);
        usleep(50000);
    }
    /* the connection goes away without a cancel */
    duet_destroy(&c);
    double t0 = tu_now_ms();
    int64_t running, used;
    if (wait_idle(fx, fx->idle_used, 5000, &running, &used) != 0)
        fail_msg("after the client left: %lld requests running, %lld KV blocks used (idle %lld)", (long long)running,
                 (long long)used, (long long)fx->idle_used);
    st = get_status(fx);
    int64_t cancelled = jint(st, "requests", "cancelled") - cancelled0, served = jint(st, "requests", "served") - served0;
    json_decref(st);
    printf("[ errors   ] client gone mid-stream (%d and %d tokens streamed): %lld KV blocks used before, idle "
           "level %lld again %.0f ms after; %lld cancelled, %lld served\n", got[0], got[1], (long long)used_mid,
           (long long)fx->idle_used, tu_now_ms() - t0, (long long)cancelled, (long long)served);
    for (int i = 0; i < BUSY_SEQS; i++) duet_request_free(&req[i]);
    assert_int_equal(cancelled, BUSY_SEQS);
    assert_int_equal(served, 0);
    lib_normal(fx);
}

/* Connections come and go: each new one likely gets the fd of the one that just
 * closed. Every request on the new one must still be answered (duetd once took a
 * new client for the old one when the old one's disconnect event came late, and
 * dropped its requests silently). */
static void test_reconnect_churn(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    enum { ROUNDS = 40 };
    double t0 = tu_now_ms();
    raw_t busy; /* keeps duetd's loop busy on the client socket while connections swap */
    raw_open(&busy, fx->endpoint);
    for (int i = 0; i < ROUNDS; i++) {
        raw_t a;
        raw_open(&a, fx->endpoint);
        const char *h[] = {"duet.client/1", "health", "{}"};
        raw_send(&a, 3, h, NULL);
        char cmd[33];
        json_t *b = NULL;
        if (raw_recv(&a, REPLY_MS, cmd, &b) != 0) fail_msg("round %d: no health reply", i);
        json_decref(b);
        const char *st[] = {"duet.client/1", "status", "{}"};
        for (int k = 0; k < 100; k++) raw_send(&busy, 3, st, NULL);
        raw_close(&a);
        raw_t n;
        raw_open(&n, fx->endpoint);
        char body[160];
        snprintf(body, sizeof body, "{\"id\": \"c%d\", \"prompt\": \"hi\", \"max_tokens\": 1, \"stream\": true}", i);
        const char *g[] = {"duet.client/1", "generate", body};
        raw_send(&n, 3, g, NULL);
        int done = 0;
        while (!done) {
            if (raw_recv(&n, REPLY_MS, cmd, &b) != 0) {
                show_logs(fx);
                fail_msg("round %d: request on a new connection not answered within %d ms", i, REPLY_MS);
            }
            if (strcmp(cmd, "error") == 0)
                fail_msg("round %d: %s", i, json_string_value(json_object_get(b, "message")));
            done = strcmp(cmd, "done") == 0;
            json_decref(b);
        }
        raw_close(&n);
        for (int k = 0; k < 100; k++) {
            if (raw_recv(&busy, REPLY_MS, cmd, &b) != 0) fail_msg("round %d: status %d not answered", i, k);
            json_decref(b);
        }
    }
    raw_close(&busy);
    printf("[ errors   ] %d rounds of a connection closing and a new one sending a request: all answered "
           "(%.0f ms)\n", ROUNDS, tu_now_ms() - t0);
}

/* The only worker SIGKILLed mid-request: with no group left, its requests end with
 * worker_lost (after waiting a bounded time for one to come back), a new request gets
 * unavailable; the worker started again serves, with no KV block in use. */
static void test_only_worker_killed(void **state)
{
    (void)state;
    fixture *fx = &tiny_fx;
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[BUSY_SEQS];
    for (int i = 0; i < BUSY_SEQS; i++) {
        duet_params p;
        duet_params_init(&p);
        p.prompt = "the only worker dies";
        p.max_tokens = MAX_TOKENS_LIMIT;
        p.ignore_eos = 1;
        p.stream = 1;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate: %s", err.message);
        int got = 0;
        for (double t0 = tu_now_ms(); got < 4;) {
            duet_event ev;
            if (tu_now_ms() - t0 > REPLY_MS || duet_next(req[i], REPLY_MS, &ev, &err) != DUET_OK)
                fail_msg("request %d: no tokens streamed", i);
            if (ev.kind == DUET_EVENT_DELTA) got += ev.n_token_ids;
            else if (ev.kind != DUET_EVENT_ACCEPTED) fail_msg("request %d: ended before the kill", i);
        }
    }
    double t_kill = tu_now_ms();
    kill(fx->workers[0], SIGKILL);
    int wst;
    waitpid(fx->workers[0], &wst, 0);
    fx->workers[0] = -1;
    for (int i = 0; i < BUSY_SEQS; i++) {
        const duet_result *res = NULL;
        duet_code rc = duet_wait(req[i], 20000, &res, &err);
        if (rc == DUET_E_TIMEOUT) fail_msg("request %d: no end within 20 s of the only worker's death", i);
        if (rc != DUET_E_WORKER_LOST) fail_msg("request %d: expected worker_lost, got %s: %s", i, err.code_name, err.message);
        if (i == 0) printf("[ errors   ] only worker SIGKILLed: its requests end with worker_lost after %.1f s (%s)\n",
                           (tu_now_ms() - t_kill) / 1e3, err.message);
        duet_request_free(&req[i]);
    }
    duet_params p;
    duet_params_init(&p);
    p.prompt = "no worker";
    p.max_tokens = 2;
    duet_request *r = NULL;
    assert_int_equal(duet_generate(c, &p, &r, &err), DUET_OK);
    duet_code rc = duet_wait(r, REPLY_MS, NULL, &err);
    if (rc != DUET_E_UNAVAILABLE) fail_msg("with no worker: expected unavailable, got %s: %s", err.code_name, err.message);
    assert_true(err.retry_after_ms > 0);
    duet_request_free(&r);
    duet_destroy(&c);
    char bin_w[300], log_w[600];
    snprintf(bin_w, sizeof bin_w, "%.255s/bin/duet-worker", fx->build);
    snprintf(log_w, sizeof log_w, "%.255s/worker-a-2.log", fx->tmpdir);
    char *argv_w[] = {bin_w, "--config", fx->conf, "--group", "a", NULL};
    fx->workers[0] = tu_spawn(argv_w, log_w);
    wait_groups_ready(fx, 1, "the only worker started again");
    lib_normal(fx);
    int64_t running, used;
    if (wait_idle(fx, fx->idle_used, 5000, &running, &used) != 0)
        fail_msg("after the restart: %lld requests running, %lld KV blocks used (idle %lld)", (long long)running,
                 (long long)used, (long long)fx->idle_used);
}

/* ---- group 2: two colocated groups, one worker killed ----------------------------------------- */

static int kill_setup(void **state)
{
    (void)state;
    fixture *fx = &kill_fx;
    if (fx_init(fx, "kill") != 0) return -1;
    if (access(DEFAULT_MODEL, R_OK) != 0) {
        fx->skip = 1;
        snprintf(fx->skip_why, sizeof fx->skip_why, "%s is missing (make model)", DEFAULT_MODEL);
        return 0;
    }
    snprintf(fx->model, sizeof fx->model, "%s", DEFAULT_MODEL);
    if (fx_start(fx, "",
                 "role = both\ndevices = cpu\nthreads = 1\nkv_budget = 32MiB\nmax_batch_tokens = 256\nmax_seqs = 16\n",
                 2) != 0)
        return -1;
    json_t *st = get_status(fx);
    fx->idle_used = jint(st, "kv", "blocks_used");
    json_decref(st);
    return 0;
}

static int kill_teardown(void **state)
{
    (void)state;
    return fx_stop(&kill_fx);
}


/* Read req's queued events (waiting at most timeout_ms for the first), appending its
 * token ids to ids[*n]; 1 once it has ended (*res or *lost set), else 0. */
static int pump(duet_request *req, int timeout_ms, int32_t *ids, int *n, int cap, const duet_result **res,
                const duet_error **lost)
{
    duet_event ev;
    duet_error err;
    while (duet_next(req, timeout_ms, &ev, &err) == DUET_OK) {
        timeout_ms = 0;
        if (ev.kind == DUET_EVENT_DELTA) {
            if (ev.index != *n) fail_msg("%s: delta index %d after %d tokens", ev.id, ev.index, *n);
            for (int k = 0; k < ev.n_token_ids && *n < cap; k++) ids[(*n)++] = ev.token_ids[k];
        } else if (ev.kind == DUET_EVENT_DONE) {
            *res = ev.result;
            return 1;
        } else if (ev.kind == DUET_EVENT_ERROR) {
            *lost = ev.error;
            return 1;
        }
    }
    return 0;
}

typedef enum { DISRUPT_KILL, DISRUPT_STALL } disrupt_mode;

/* N_KILL_REQ greedy streamed requests over both groups; once both run some, the worker
 * of the busier group is SIGKILLed (and started again at the end), or stopped
 * (SIGSTOP) until duetd declares it dead and then continued. Every request must end,
 * done with duet generate's tokens or worker_lost; no KV block may stay in use. */
static void disrupt_run(fixture *fx, disrupt_mode mode)
{
    const char *what = mode == DISRUPT_KILL ? "SIGKILL" : "SIGSTOP";
    static const char *prompts[N_KILL_REQ] = {
        "The history of the river Thames begins",
        "Seven facts about the planet Mars:",
        "Write a short poem about winter light.",
        "The best way to bake bread at home is",
        "Quantum computers differ from classical computers because",
        "Paris is a city known for",
    };
    duet_client *c = NULL;
    duet_error err;
    assert_int_equal(duet_connect(fx->endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[N_KILL_REQ];
    static int32_t ids[N_KILL_REQ][KILL_MAX_TOKENS + 8];
    int n_ids[N_KILL_REQ] = {0}, ended[N_KILL_REQ] = {0};
    const duet_result *res[N_KILL_REQ] = {0};
    const duet_error *lost[N_KILL_REQ] = {0};
    for (int i = 0; i < N_KILL_REQ; i++) {
        duet_params p;
        duet_params_init(&p);
        p.prompt = prompts[i];
        p.max_tokens = KILL_MAX_TOKENS;
        p.ignore_eos = 1;
        p.sampling.temperature = 0;
        p.stream = 1;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate %d: %s", i, err.message);
    }
    /* wait until both groups run requests and tokens are coming out */
    int victim = -1;
    int64_t victim_running = 0;
    for (double t0 = tu_now_ms(); victim < 0;) {
        if (tu_now_ms() - t0 > 30000 * SLOW) fail_msg("the requests did not run on both groups within 30 s");
        duet_poll(c, 100, NULL);
        int any_tokens = 0;
        for (int i = 0; i < N_KILL_REQ; i++) {
            if (!ended[i])
                ended[i] = pump(req[i], 0, ids[i], &n_ids[i], KILL_MAX_TOKENS + 8, &res[i], &lost[i]);
            any_tokens += n_ids[i];
        }
        if (any_tokens < 2 * N_KILL_REQ) continue;
        json_t *st = get_status(fx);
        json_t *groups = json_object_get(st, "groups");
        int64_t run[2] = {0, 0};
        for (size_t g = 0; g < json_array_size(groups) && g < 2; g++)
            run[g] = jint(json_array_get(groups, g), "running", NULL);
        json_decref(st);
        if (run[0] > 0 && run[1] > 0) {
            victim = run[0] >= run[1] ? 0 : 1;
            victim_running = run[victim];
        }
    }
    double t_kill = tu_now_ms();
    int n_before = 0;
    for (int i = 0; i < N_KILL_REQ; i++) n_before += n_ids[i];
    if (mode == DISRUPT_KILL) {
        kill(fx->workers[victim], SIGKILL);
        int wst;
        waitpid(fx->workers[victim], &wst, 0);
        fx->workers[victim] = -1;
    } else {
        kill(fx->workers[victim], SIGSTOP);
        /* until duetd counts it dead (dead_after 4 x 500 ms), then a little longer */
        int dead = 0;
        for (double t0 = tu_now_ms(); !dead;) {
            if (tu_now_ms() - t0 > 15000) {
                kill(fx->workers[victim], SIGCONT);
                fail_msg("duetd did not declare the stopped worker dead within 15 s");
            }
            duet_poll(c, 100, NULL);
            json_t *st = get_status(fx);
            json_t *groups = json_object_get(st, "groups");
            dead = jint(json_array_get(groups, (size_t)victim), "workers_alive", NULL) == 0;
            json_decref(st);
        }
        usleep(300000);
        kill(fx->workers[victim], SIGCONT);
    }
    printf("[ errors   ] %s to group %s's worker with %lld requests running on it (%d tokens streamed "
           "so far)\n", what, fx->groups[victim], (long long)victim_running, n_before);

    /* every request ends within a bound */
    for (int left = N_KILL_REQ; left > 0;) {
        if (tu_now_ms() - t_kill > 60000) fail_msg("%d requests did not end within 60 s of the kill", left);
        duet_poll(c, 200, NULL);
        left = 0;
        for (int i = 0; i < N_KILL_REQ; i++) {
            if (!ended[i]) ended[i] = pump(req[i], 0, ids[i], &n_ids[i], KILL_MAX_TOKENS + 8, &res[i], &lost[i]);
            left += !ended[i];
        }
    }
    double t_end = tu_now_ms();
    int n_retried = 0, n_lost = 0, n_done = 0;
    for (int i = 0; i < N_KILL_REQ; i++) {
        if (lost[i]) {
            if (lost[i]->code != DUET_E_WORKER_LOST)
                fail_msg("request %d: %s: %s", i, lost[i]->code_name, lost[i]->message);
            n_lost++;
            continue;
        }
        n_done++;
        n_retried += res[i]->usage.retries >= 1;
        assert_int_equal(res[i]->usage.completion_tokens, KILL_MAX_TOKENS);
        assert_int_equal(n_ids[i], KILL_MAX_TOKENS);
        int32_t ref[KILL_MAX_TOKENS + 8];
        int n = tu_generate_ids(fx->build, fx->model, fx->tmpdir, prompts[i], KILL_MAX_TOKENS, "-t 1 --ignore-eos", ref,
                                KILL_MAX_TOKENS + 8);
        if (n != n_ids[i] || memcmp(ref, ids[i], (size_t)n * sizeof *ref) != 0) {
            int k = 0;
            while (k < n && k < n_ids[i] && ref[k] == ids[i][k]) k++;
            fail_msg("request %d (%d retries): its %d tokens differ from duet generate's %d from index %d",
                     i, res[i]->usage.retries, n_ids[i], n, k);
        }
    }
    printf("[ errors   ] after the %s: all %d requests ended within %.1f s: %d done (%d retried, every "
           "token equal to duet generate's), %d worker_lost\n", what, N_KILL_REQ, (t_end - t_kill) / 1e3, n_done,
           n_retried, n_lost);
    assert_true(n_retried + n_lost >= victim_running);
    for (int i = 0; i < N_KILL_REQ; i++) duet_request_free(&req[i]);
    duet_destroy(&c);
    int64_t running, used;
    if (wait_idle(fx, fx->idle_used, 5000, &running, &used) != 0)
        fail_msg("after the run: %lld requests running, %lld KV blocks used on the survivor (idle %lld)",
                 (long long)running, (long long)used, (long long)fx->idle_used);
    /* the survivor still serves; the killed worker, started again, registers again (the
     * stopped one, continued, hears unexpected_command and registers again) */
    lib_normal(fx);
    if (mode == DISRUPT_KILL) {
        char bin_w[300], log_w[600];
        snprintf(bin_w, sizeof bin_w, "%.255s/bin/duet-worker", fx->build);
        snprintf(log_w, sizeof log_w, "%.255s/worker-%.7s-2.log", fx->tmpdir, fx->groups[victim]);
        char *argv_w[] = {bin_w, "--config", fx->conf, "--group", fx->groups[victim], NULL};
        fx->workers[victim] = tu_spawn(argv_w, log_w);
    }
    double t_back = tu_now_ms();
    wait_groups_ready(fx, 2, what);
    printf("[ errors   ] group %s ready again %.1f s later\n", fx->groups[victim], (tu_now_ms() - t_back) / 1e3);
    lib_normal(fx);
    if (wait_idle(fx, fx->idle_used, 5000, &running, &used) != 0)
        fail_msg("with both groups back: %lld requests running, %lld KV blocks used (idle %lld)",
                 (long long)running, (long long)used, (long long)fx->idle_used);
}

static void test_worker_killed(void **state)
{
    (void)state;
    if (kill_fx.skip) {
        printf("[  SKIP    ] worker killed mid-request: %s\n", kill_fx.skip_why);
        skip();
    }
    disrupt_run(&kill_fx, DISRUPT_KILL);
}

static void test_worker_stalled(void **state)
{
    (void)state;
    if (kill_fx.skip) {
        printf("[  SKIP    ] worker stalled past dead_after: %s\n", kill_fx.skip_why);
        skip();
    }
    disrupt_run(&kill_fx, DISRUPT_STALL);
}

/* duetd SIGKILLed and started again: the workers hear unexpected_command on their next
 * heartbeat and register again; the service serves. */
static void test_duetd_restarted(void **state)
{
    (void)state;
    fixture *fx = &kill_fx;
    if (fx->skip) {
        printf("[  SKIP    ] duetd restarted: %s\n", fx->skip_why);
        skip();
    }
    kill(fx->duetd, SIGKILL);
    int wst;
    waitpid(fx->duetd, &wst, 0);
    char bin_d[300], log_d[600];
    snprintf(bin_d, sizeof bin_d, "%.255s/bin/duetd", fx->build);
    snprintf(log_d, sizeof log_d, "%.255s/duetd-2.log", fx->tmpdir);
    char *argv_d[] = {bin_d, "--config", fx->conf, NULL};
    double t0 = tu_now_ms();
    fx->duetd = tu_spawn(argv_d, log_d);
    wait_groups_ready(fx, 2, "duetd restarted");
    printf("[ errors   ] duetd SIGKILLed and started again: both workers registered again within %.1f s\n",
           (tu_now_ms() - t0) / 1e3);
    /* through unexpected_command (not by waiting for duetd's silence): each live worker's log says so */
    char cmd[800];
    snprintf(cmd, sizeof cmd, "grep -l 'does not count this worker as registered' '%.255s'/worker-*.log | wc -l",
             fx->tmpdir);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    int n = 0;
    if (fscanf(p, "%d", &n) != 1) n = -1;
    pclose(p);
    if (n < 2) {
        show_logs(fx);
        fail_msg("%d worker logs tell of duetd's unexpected_command after its restart, not 2", n);
    }
    lib_normal(fx);
}

int main(void)
{
    /* E2E_FILTER: run only the tests whose names match (cmocka's pattern) */
    if (getenv("E2E_FILTER")) cmocka_set_test_filter(getenv("E2E_FILTER"));
    const struct CMUnitTest tiny[] = {
        cmocka_unit_test(test_malformed),
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_busy),
        cmocka_unit_test(test_queue_full),
        cmocka_unit_test(test_disconnect_midstream),
        cmocka_unit_test(test_reconnect_churn),
        cmocka_unit_test(test_only_worker_killed),
    };
    const struct CMUnitTest killed[] = {
        cmocka_unit_test(test_worker_killed),
        cmocka_unit_test(test_worker_stalled),
        cmocka_unit_test(test_duetd_restarted),
    };
    int fails = cmocka_run_group_tests_name("e2e_errors", tiny, tiny_setup, tiny_teardown);
    fails += cmocka_run_group_tests_name("e2e_errors_failover", killed, kill_setup, kill_teardown);
    return fails;
}
