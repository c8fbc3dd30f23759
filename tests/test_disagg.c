/* tests/test_disagg.c: disaggregated serving end to end, as real processes on loopback:
 * duetd, prefill workers and decode workers, with the KV moving over the data plane.
 *
 * For each layout (one prefill and one decode worker; two of each) and each backend (tcp:
 * workers started separately, as systemd would; mpi: the workers launched together by
 * `mpirun --allow-run-as-root --oversubscribe`), 32 concurrent greedy requests of mixed
 * prompt and output lengths must each get exactly the tokens of single-process
 * `duet generate` (which tests/test_e2e.c shows colocated serving gives too), and `status`
 * must show the transfers and no KV block held once they are done.
 *
 * Failures (tcp, two prefill and two decode workers): a decode worker killed with SIGKILL
 * during decode and during transfers, a prefill worker killed mid-prompt, and a transfer
 * cut on the wire (DUET_FAULT_DROP_LAYER on a prefill worker): every request ends,
 * completed or with a clear error, none hangs, and every surviving group holds no block
 * afterwards. A request that completed must have duet generate's tokens, retried or not:
 * a retry recomputes the KV of the prompt and of the tokens generated so far, which gives
 * the same bytes as computing them step by step (worker/sched.h).
 */
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "client/libduet.h"
#include "tests/support/testutil.h"

#define N_REQ 32
#define MAX_W 4

static char tmpdir[256], model[512], build[256];
static char prompts[N_REQ][1024];
static int max_tok[N_REQ], n_ref[N_REQ];
static int32_t refs[N_REQ][64];

typedef struct {
    char conf[600], endpoint[600];
    pid_t duetd, workers[MAX_W], mpirun;
    int n_workers;
    int n_p, n_d;
} cluster;

static void show_log(const char *name) { tu_show_log(tmpdir, name, 25); }

static void show_logs(const cluster *cl)
{
    show_log("duetd");
    for (int i = 0; i < cl->n_workers; i++) {
        char n[32];
        snprintf(n, sizeof n, "w%d", i);
        show_log(n);
    }
    show_log("mpirun");
}



static int setup(void **state)
{
    (void)state;
    snprintf(build, sizeof build, "%s", getenv("BUILD") ? getenv("BUILD") : "build");
    if (tu_mkdtemp(tmpdir, sizeof tmpdir, "disagg") != 0) return -1;
    if (tu_serving_model(tmpdir, model, sizeof model) != 0) return -1;
    /* the reference answers, once */
    for (int i = 0; i < N_REQ; i++) {
        tu_mixed_prompt(prompts[i], sizeof prompts[i], i);
        max_tok[i] = 4 + (i * 13) % 37; /* 4..40 */
        n_ref[i] = tu_generate_ids(build, model, tmpdir, prompts[i], max_tok[i], "-t 2", refs[i], 64);
        if (n_ref[i] < 1) return -1;
    }
    return 0;
}

/* Processes of the running cluster: a failed test case leaves its cluster behind
 * (fail_msg jumps out of it), so the next case's setup and the group's teardown stop
 * whatever is still here. Children not yet reaped keep their pids. */
static pid_t live[64];
static int n_live;

static void live_add(pid_t p)
{
    if (p > 0 && n_live < (int)(sizeof live / sizeof live[0])) live[n_live++] = p;
}

static void live_del(pid_t p)
{
    for (int i = 0; i < n_live; i++)
        if (live[i] == p) live[i--] = live[--n_live];
}

static void live_stop_all(void)
{
    for (int i = 0; i < n_live; i++) (void)tu_stop(&live[i], 5000);
    n_live = 0;
}

static int teardown(void **state)
{
    (void)state;
    live_stop_all();
    return tu_rmtree(tmpdir);
}

/* Sanitizer builds run several times slower: heartbeats, leases and waits scale. */
#if defined(__SANITIZE_ADDRESS__)
#define SLOW 4
#else
#define SLOW 1
#endif

/* Heartbeats: every 500 ms (x SLOW), dead after 5 missed; DISAGG_HEARTBEAT_MS and DISAGG_DEAD_AFTER
 * override them (short values make duetd declare busy workers dead: a stress test of the
 * failure paths). */
static int hb_ms(void) { return getenv("DISAGG_HEARTBEAT_MS") ? atoi(getenv("DISAGG_HEARTBEAT_MS")) : 500 * SLOW; }
static int hb_dead(void) { return getenv("DISAGG_DEAD_AFTER") ? atoi(getenv("DISAGG_DEAD_AFTER")) : 5; }

/* Write the configuration: n_p prefill groups, n_d decode groups, on transport. */
static void write_conf(cluster *cl, const char *transport, int lease_ms)
{
    static int serial;
    serial++;
    snprintf(cl->conf, sizeof cl->conf, "%s/duet%d.conf", tmpdir, serial);
    snprintf(cl->endpoint, sizeof cl->endpoint, "ipc://%s/c%d.sock", tmpdir, serial);
    FILE *f = fopen(cl->conf, "w");
    assert_non_null(f);
    fprintf(f,
            "[model]\npath = %s\nkv_type = f16\n"
            "[daemon]\nclient_endpoint = %s\nworker_endpoint = ipc://%s/w%d.sock\n"
            "heartbeat_ms = %d\ndead_after = %d\nlog_level = info\ntransfer_lease_ms = %d\n",
            model, cl->endpoint, tmpdir, serial, hb_ms(), hb_dead(), lease_ms * SLOW);
    for (int i = 0; i < cl->n_p + cl->n_d; i++) {
        int pre = i < cl->n_p;
        fprintf(f,
                "[group %s%d]\nrole = %s\ndevices = cpu\nthreads = 1\nkv_budget = 48MiB\n"
                "max_batch_tokens = %d\nmax_seqs = 48\ntransport = %s\n",
                pre ? "prefill" : "decode", pre ? i : i - cl->n_p, pre ? "prefill" : "decode",
                pre ? 256 : 128, transport);
    }
    fclose(f);
}

static int wait_healthy(const cluster *cl, int want_workers)
{
    duet_client *c = NULL;
    if (duet_connect(cl->endpoint, NULL, &c, NULL) != DUET_OK) return -1;
    int ok = 0;
    for (double t0 = tu_now_ms(); !ok && tu_now_ms() - t0 < 60000 * SLOW;) {
        duet_health_info hi;
        if (duet_health(c, 1000, &hi, NULL, NULL) == DUET_OK && hi.ok && hi.workers_alive >= want_workers)
            ok = 1;
        else
            usleep(100000);
    }
    duet_destroy(&c);
    return ok ? 0 : -1;
}

/* Start duetd and the workers (tcp: one process each; mpi: one mpirun). fault_worker: the
 * index of a worker started with DUET_FAULT_DROP_LAYER=1, or -1. */
static void start(cluster *cl, const char *transport, int n_p, int n_d, int lease_ms, int fault_worker)
{
    live_stop_all(); /* what a failed case left */
    memset(cl, 0, sizeof *cl);
    cl->duetd = cl->mpirun = -1;
    cl->n_p = n_p;
    cl->n_d = n_d;
    write_conf(cl, transport, lease_ms);
    char bin_d[300], bin_w[300], log[700];
    snprintf(bin_d, sizeof bin_d, "%s/bin/duetd", build);
    snprintf(bin_w, sizeof bin_w, "%s/bin/duet-worker", build);
    snprintf(log, sizeof log, "%s/duetd.log", tmpdir);
    char *argv_d[] = {bin_d, "--config", cl->conf, NULL};
    cl->duetd = tu_spawn(argv_d, log);
    if (strcmp(transport, "mpi") == 0) {
        char np[16];
        snprintf(np, sizeof np, "%d", n_p + n_d);
        snprintf(log, sizeof log, "%s/mpirun.log", tmpdir);
        char *argv_m[] = {"mpirun", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none",
                          "--mca", "btl", "self,vader", "-np", np, bin_w, "--config", cl->conf, NULL};
        char mp[300];
        snprintf(mp, sizeof mp, "%s", "/usr/bin/mpirun");
        argv_m[0] = mp;
        cl->mpirun = tu_spawn(argv_m, log);
    } else {
        for (int i = 0; i < n_p + n_d; i++) {
            char group[32];
            snprintf(group, sizeof group, "%s%d", i < n_p ? "prefill" : "decode", i < n_p ? i : i - n_p);
            snprintf(log, sizeof log, "%s/w%d.log", tmpdir, i);
            char *argv_w[] = {bin_w, "--config", cl->conf, "--group", group, NULL};
            if (i == fault_worker) setenv("DUET_FAULT_DROP_LAYER", "1", 1);
            cl->workers[i] = tu_spawn(argv_w, log);
            if (i == fault_worker) unsetenv("DUET_FAULT_DROP_LAYER");
            cl->n_workers++;
        }
    }
    live_add(cl->duetd);
    live_add(cl->mpirun);
    for (int i = 0; i < cl->n_workers; i++) live_add(cl->workers[i]);
    if (wait_healthy(cl, n_p + n_d) != 0) {
        show_logs(cl);
        fail_msg("%s %d+%d: duetd did not become healthy with every worker within 60 s", transport, n_p, n_d);
    }
}

static void stop(cluster *cl)
{
    for (int i = 0; i < cl->n_workers; i++)
        if (cl->workers[i] > 0) tu_stop(&cl->workers[i], 15000);
    if (cl->mpirun > 0) tu_stop(&cl->mpirun, 15000); /* its exit status reflects signalled ranks */
    int rd = tu_stop(&cl->duetd, 15000);
    n_live = 0; /* all stopped (the tests run one cluster at a time) */
    if (rd != 0) {
        show_logs(cl);
        fail_msg("duetd exited with %d", rd);
    }
}

/* Every live group of the cluster holds no KV block (status, after heartbeats). Returns
 * the status (caller frees). */
static json_t *check_no_leaks(const cluster *cl, const char *what)
{
    duet_client *c = NULL;
    assert_int_equal(duet_connect(cl->endpoint, NULL, &c, NULL), DUET_OK);
    json_t *st = NULL;
    int clean = 0;
    char why[256] = "";
    for (double t0 = tu_now_ms(); !clean && tu_now_ms() - t0 < 15000;) {
        usleep(600000 * SLOW); /* a heartbeat brings fresh counts */
        json_decref(st);
        st = NULL;
        assert_int_equal(duet_status(c, 5000, &st, NULL), DUET_OK);
        clean = 1;
        size_t i;
        json_t *g;
        json_array_foreach(json_object_get(st, "groups"), i, g)
        {
            if (json_integer_value(json_object_get(g, "workers_alive")) < 1) continue;
            json_int_t tot = json_integer_value(json_object_get(g, "kv_blocks_total"));
            json_int_t fr = json_integer_value(json_object_get(g, "kv_blocks_free"));
            json_int_t ca = json_integer_value(json_object_get(g, "kv_blocks_cached"));
            json_int_t run = json_integer_value(json_object_get(g, "running"));
            if (tot != fr + ca || run != 0) {
                clean = 0;
                snprintf(why, sizeof why, "group %zu: %lld blocks, %lld free, %lld cached, %lld running",
                         i, (long long)tot, (long long)fr, (long long)ca, (long long)run);
            }
        }
        json_int_t inflight = json_integer_value(json_object_get(json_object_get(st, "transfers"), "in_flight"));
        if (inflight) clean = 0;
    }
    duet_destroy(&c);
    if (!clean) {
        show_logs(cl);
        fail_msg("%s: KV blocks still held after every request ended: %s", what, why);
    }
    return st;
}

/* The 32 requests at once; each must equal duet generate's answer. */
/* Workers that status shows dead (a crash, or silence past dead_after). */
static int n_dead(const json_t *st)
{
    int dead = 0;
    size_t i;
    json_t *w;
    json_array_foreach(json_object_get(st, "workers"), i, w) {
        const char *state = json_string_value(json_object_get(w, "state"));
        dead += state && strcmp(state, "dead") == 0;
    }
    return dead;
}

static void run_all_equal(const cluster *cl, const char *what)
{
    duet_client *c = NULL;
    assert_int_equal(duet_connect(cl->endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[N_REQ];
    double t0 = tu_now_ms();
    for (int i = 0; i < N_REQ; i++) {
        duet_params p;
        duet_params_init(&p);
        p.prompt = prompts[i];
        p.sampling.temperature = 0;
        p.max_tokens = max_tok[i];
        p.stream = i % 2;
        duet_error err;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("%s: generate %d: %s", what, i, err.message);
    }
    double ttft = 0;
    for (int i = 0; i < N_REQ; i++) {
        const duet_result *r = NULL;
        duet_error err;
        if (duet_wait(req[i], 180000 * SLOW, &r, &err) != DUET_OK) {
            show_logs(cl);
            fail_msg("%s: request %d: %s", what, i, err.message);
        }
        if (n_ref[i] != r->n_token_ids || memcmp(refs[i], r->token_ids, (size_t)n_ref[i] * sizeof(int32_t)) != 0)
            fail_msg("%s: request %d: %d tokens differ from duet generate's %d", what, i, r->n_token_ids, n_ref[i]);
        ttft += r->timings.ttft_ms;
        duet_request_free(&req[i]);
    }
    duet_destroy(&c);
    json_t *st = check_no_leaks(cl, what);
    json_t *tr = json_object_get(st, "transfers");
    json_int_t done = json_integer_value(json_object_get(tr, "completed"));
    printf("[ disagg   ] %s: %d concurrent requests equal duet generate's in %.1f s (mean TTFT %.0f ms); "
           "%lld transfers, %lld KV bytes, mean %.1f ms; no block held after\n",
           what, N_REQ, (tu_now_ms() - t0) / 1e3, ttft / N_REQ, (long long)done,
           (long long)json_integer_value(json_object_get(tr, "bytes")),
           json_real_value(json_object_get(tr, "mean_ms")));
    assert_true(done >= N_REQ);
    /* the prefill groups' figures add up to the totals; the tail is part of the send time */
    json_int_t bytes = 0, sent = 0;
    size_t i;
    json_t *g;
    json_array_foreach(json_object_get(st, "groups"), i, g) {
        const char *role = json_string_value(json_object_get(g, "role"));
        if (!role || strcmp(role, "prefill") != 0) continue;
        sent += json_integer_value(json_object_get(g, "transfers"));
        bytes += json_integer_value(json_object_get(g, "transfer_bytes"));
        double ms = json_number_value(json_object_get(g, "transfer_ms"));
        double tail = json_number_value(json_object_get(g, "transfer_tail_ms"));
        if (!(ms > 0 && tail > 0 && tail <= ms && json_number_value(json_object_get(g, "transfer_gbps")) > 0))
            fail_msg("%s: prefill group %lld: transfer_ms %.3f, transfer_tail_ms %.3f", what,
                     (long long)json_integer_value(json_object_get(g, "group")), ms, tail);
    }
    assert_int_equal(sent, done);
    assert_int_equal(n_dead(st), 0);
    assert_int_equal(bytes, json_integer_value(json_object_get(tr, "bytes")));
    json_decref(st);
}

static void test_tcp_1p1d(void **state)
{
    (void)state;
    cluster cl;
    start(&cl, "tcp", 1, 1, 30000, -1);
    run_all_equal(&cl, "tcp 1+1");
    stop(&cl);
}

static void test_tcp_2p2d(void **state)
{
    (void)state;
    cluster cl;
    start(&cl, "tcp", 2, 2, 30000, -1);
    run_all_equal(&cl, "tcp 2+2");
    stop(&cl);
}

static int have_mpirun(void)
{
    if (access("/usr/bin/mpirun", X_OK) == 0) return 1;
    printf("[  SKIP    ] mpirun is not installed (scripts/setup installs openmpi-bin)\n");
    return 0;
}

static void test_mpi_1p1d(void **state)
{
    (void)state;
    if (!have_mpirun()) skip();
    cluster cl;
    start(&cl, "mpi", 1, 1, 30000, -1);
    run_all_equal(&cl, "mpi 1+1");
    stop(&cl);
}

static void test_mpi_2p2d(void **state)
{
    (void)state;
    if (!have_mpirun()) skip();
    cluster cl;
    start(&cl, "mpi", 2, 2, 30000, -1);
    run_all_equal(&cl, "mpi 2+2");
    stop(&cl);
}

/* Send n requests (prompts[first..], max_tokens mt), kill worker victim with SIGKILL when
 * cond says so, and check every request ends: completed with duet generate's tokens
 * (when mt is the reference's) or with a clear error. */
typedef enum { KILL_AFTER_TOKENS, KILL_AT_ONCE } kill_when;

static void kill_and_check(cluster *cl, int victim, kill_when when, int long_prompts, const char *what)
{
    enum { N = 12 };
    static char lp[N][4096];
    duet_client *c = NULL;
    assert_int_equal(duet_connect(cl->endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[N];
    for (int i = 0; i < N; i++) {
        duet_params p;
        duet_params_init(&p);
        if (long_prompts) { /* several prefill chunks each */
            size_t off = (size_t)snprintf(lp[i], sizeof lp[i], "Story %d:", i);
            for (int w = 0; w < 500 && off + 16 < sizeof lp[i]; w++)
                off += (size_t)snprintf(lp[i] + off, sizeof lp[i] - off, " %s", tu_word(i * 5 + w * 7));
            p.prompt = lp[i];
            p.max_tokens = 8;
        } else {
            p.prompt = prompts[i];
            p.max_tokens = max_tok[i];
        }
        p.sampling.temperature = 0;
        p.stream = 1;
        duet_error err;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("%s: generate %d: %s", what, i, err.message);
    }
    if (when == KILL_AFTER_TOKENS) { /* wait until decoding is under way */
        for (double t0 = tu_now_ms(); tu_now_ms() - t0 < 30000;) {
            json_t *st = NULL;
            int going = 0;
            if (duet_status(c, 2000, &st, NULL) == DUET_OK)
                going = json_integer_value(json_object_get(json_object_get(st, "transfers"), "completed")) >= 3;
            json_decref(st);
            if (going) break;
            usleep(20000);
        }
    } else {
        usleep(150000);
    }
    live_del(cl->workers[victim]); /* reaped below */
    kill(cl->workers[victim], SIGKILL);
    int st;
    waitpid(cl->workers[victim], &st, 0);
    cl->workers[victim] = -1;
    int ok = 0, failed = 0, retried = 0;
    for (int i = 0; i < N; i++) {
        const duet_result *r = NULL;
        duet_error err;
        duet_code rc = duet_wait(req[i], 120000 * SLOW, &r, &err);
        if (rc == DUET_E_TIMEOUT) {
            show_logs(cl);
            fail_msg("%s: request %d hangs", what, i);
        }
        if (rc != DUET_OK) {
            assert_true(strlen(err.message) > 0);
            if (!failed++) printf("[ disagg   ] %s: request %d: error: %s\n", what, i, err.message);
        } else {
            ok++;
            retried += r->usage.retries > 0;
            int same = r->n_token_ids == n_ref[i] &&
                       memcmp(r->token_ids, refs[i], (size_t)n_ref[i] * sizeof(int32_t)) == 0;
            if (!long_prompts && !same)
                fail_msg("%s: request %d completed (%d retries) with tokens that differ from duet "
                         "generate's", what, i, (int)r->usage.retries);
        }
        duet_request_free(&req[i]);
    }
    duet_destroy(&c);
    json_t *s = check_no_leaks(cl, what);
    json_decref(s);
    printf("[ disagg   ] %s: %d completed (%d after a retry)%s, %d clear errors, none hung; no block "
           "held after\n", what, ok, retried, long_prompts ? "" : ", all equal to duet generate's", failed);
    assert_int_equal(ok + failed, N);
    assert_true(ok > 0);
}

static void test_failures(void **state)
{
    (void)state;
    cluster cl;
    /* workers 0, 1: prefill; 2, 3: decode */
    start(&cl, "tcp", 2, 2, 30000, -1);
    kill_and_check(&cl, 3, KILL_AFTER_TOKENS, 0, "decode worker SIGKILLed during decode");
    kill_and_check(&cl, 0, KILL_AT_ONCE, 1, "prefill worker SIGKILLed mid-prompt");
    stop(&cl);
    start(&cl, "tcp", 2, 2, 30000, -1);
    kill_and_check(&cl, 2, KILL_AT_ONCE, 1, "decode worker SIGKILLed during transfers");
    stop(&cl);
}

static void test_cut_transfer(void **state)
{
    (void)state;
    cluster cl;
    /* prefill worker 0 never sends layer 1: its decode partners' leases (1.5 s) expire */
    start(&cl, "tcp", 2, 1, 1500, 0);
    enum { N = 8 };
    duet_client *c = NULL;
    assert_int_equal(duet_connect(cl.endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[N];
    for (int i = 0; i < N; i++) {
        duet_params p;
        duet_params_init(&p);
        p.prompt = prompts[i];
        p.max_tokens = max_tok[i];
        p.sampling.temperature = 0;
        duet_error err;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate %d: %s", i, err.message);
    }
    int ok = 0, failed = 0, retried = 0;
    for (int i = 0; i < N; i++) {
        const duet_result *r = NULL;
        duet_error err;
        duet_code rc = duet_wait(req[i], 120000 * SLOW, &r, &err);
        if (rc == DUET_E_TIMEOUT) {
            show_logs(&cl);
            fail_msg("cut transfer: request %d hangs", i);
        }
        if (rc == DUET_OK) {
            ok++;
            retried += r->usage.retries > 0;
            if (r->n_token_ids != n_ref[i] || memcmp(r->token_ids, refs[i], (size_t)n_ref[i] * sizeof(int32_t)) != 0)
                fail_msg("cut transfer: request %d completed with tokens unlike duet generate's", i);
        } else {
            if (!failed++) printf("[ disagg   ] cut transfer: request %d: error: %s\n", i, err.message);
            assert_true(strlen(err.message) > 0);
        }
        duet_request_free(&req[i]);
    }
    duet_destroy(&c);
    json_t *s = check_no_leaks(&cl, "cut transfer");
    json_int_t xf = json_integer_value(json_object_get(json_object_get(s, "transfers"), "failed"));
    printf("[ disagg   ] transfer cut on the wire: %d completed (%d after a retry), %d clear errors, %lld "
           "transfers failed; no block held after\n", ok, retried, failed, (long long)xf);
    assert_true(xf > 0);
    assert_int_equal(ok + failed, N);
    assert_int_equal(n_dead(s), 0); /* a cut transfer fails transfers, not workers */
    assert_true(ok > 0);
    json_decref(s);
    stop(&cl);
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_tcp_1p1d),   cmocka_unit_test(test_tcp_2p2d),
        cmocka_unit_test(test_mpi_1p1d),   cmocka_unit_test(test_mpi_2p2d),
        cmocka_unit_test(test_failures),   cmocka_unit_test(test_cut_transfer),
    };
    if (getenv("DISAGG_FILTER")) cmocka_set_test_filter(getenv("DISAGG_FILTER")); /* e.g. test_tcp* */
    return cmocka_run_group_tests_name("disagg", tests, setup, teardown);
}
