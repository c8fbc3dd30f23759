/* tests/test_e2e.c: the whole service, as real processes on loopback.
 *
 * Starts build/bin/duetd and build/bin/duet-worker (role both) from a config written
 * here, talks to them through libduet (and the Python client), and checks that:
 *   - 32 concurrent greedy requests of mixed prompt and output lengths each get exactly the
 *     tokens that single-process `duet generate` gives for the same prompt;
 *   - a request sharing a long prefix with an earlier one reports cached prompt tokens and
 *     gets its first token sooner; a session's second turn reuses the first turn's KV;
 *   - the Python client gets the same tokens;
 *   - SIGTERM shuts both processes down cleanly (exit status 0).
 * Uses the default model when it is there (make model), else a tiny random model.
 * Liveness limits are generous (10 s): a sanitizer build computes a step ~10x slower, and
 * the worker reports between steps; tests/test_e2e_errors.c covers dead workers.
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
#include <jansson.h>

#include "client/libduet.h"
#include "tests/support/testutil.h"

#define N_REQ 32

static char tmpdir[256], model[512], conf[512], endpoint[600], build[256];
static pid_t duetd_pid = -1, worker_pid = -1;




static int setup(void **state)
{
    (void)state;
    snprintf(build, sizeof build, "%s", getenv("BUILD") ? getenv("BUILD") : "build");
    if (tu_mkdtemp(tmpdir, sizeof tmpdir, "e2e") != 0) return -1;
    if (tu_serving_model(tmpdir, model, sizeof model) != 0) return -1;
    snprintf(endpoint, sizeof endpoint, "ipc://%s/client.sock", tmpdir);
    snprintf(conf, sizeof conf, "%s/duet.conf", tmpdir);
    FILE *f = fopen(conf, "w");
    if (!f) return -1;
    fprintf(f,
            "[model]\npath = %s\nkv_type = f16\n"
            "[daemon]\nclient_endpoint = %s\nworker_endpoint = ipc://%s/worker.sock\n"
            "heartbeat_ms = 2000\ndead_after = 5\nlog_level = info\n"
            "[group main]\nrole = both\ntp_size = 1\ndevices = cpu\nthreads = 2\n"
            "kv_budget = 96MiB\nmax_batch_tokens = 128\nmax_seqs = 64\n",
            model, endpoint, tmpdir);
    fclose(f);
    char bin_d[300], bin_w[300], log_d[600], log_w[600];
    snprintf(bin_d, sizeof bin_d, "%s/bin/duetd", build);
    snprintf(bin_w, sizeof bin_w, "%s/bin/duet-worker", build);
    snprintf(log_d, sizeof log_d, "%s/duetd.log", tmpdir);
    snprintf(log_w, sizeof log_w, "%s/worker.log", tmpdir);
    char *argv_d[] = {bin_d, "--config", conf, NULL};
    char *argv_w[] = {bin_w, "--config", conf, "--group", "main", NULL};
    duetd_pid = tu_spawn(argv_d, log_d);
    worker_pid = tu_spawn(argv_w, log_w);
    /* wait until duetd says it can serve */
    duet_client *c = NULL;
    if (duet_connect(endpoint, NULL, &c, NULL) != DUET_OK) return -1;
    int ok = 0;
    for (double t0 = tu_now_ms(); !ok && tu_now_ms() - t0 < 60000;) {
        duet_health_info hi;
        if (duet_health(c, 1000, &hi, NULL, NULL) == DUET_OK && hi.ok) ok = 1;
        else usleep(100000);
    }
    duet_destroy(&c);
    if (!ok) {
        fprintf(stderr, "e2e: duetd did not become healthy within 60 s\n");
        tu_show_log(tmpdir, "duetd", 15);
        tu_show_log(tmpdir, "worker", 15);
        return -1;
    }
    return 0;
}

static int teardown(void **state)
{
    (void)state;
    int rw = tu_stop(&worker_pid, 15000), rd = tu_stop(&duetd_pid, 15000);
    if (rw != 0 || rd != 0) {
        fprintf(stderr, "e2e: shutdown: duet-worker exit %d, duetd exit %d\n", rw, rd);
        tu_show_log(tmpdir, "duetd", 15);
        tu_show_log(tmpdir, "worker", 15);
    }
    if (tu_rmtree(tmpdir) != 0) return -1;
    return rw == 0 && rd == 0 ? 0 : -1;
}




/* The 32 requests and duet generate's answers to them (kept for the Python client's test). */
static char prompts[N_REQ][1024];
static int max_tokens[N_REQ], n_ref[N_REQ];
static int32_t refs[N_REQ][64];

static void test_concurrent_equal_generate(void **state)
{
    (void)state;
    duet_client *c = NULL;
    assert_int_equal(duet_connect(endpoint, NULL, &c, NULL), DUET_OK);
    duet_request *req[N_REQ];
    for (int i = 0; i < N_REQ; i++) {
        tu_mixed_prompt(prompts[i], sizeof prompts[i], i);
        duet_params p;
        duet_params_init(&p);
        p.prompt = prompts[i];
        p.sampling.temperature = 0;
        p.max_tokens = max_tokens[i] = 4 + (i * 13) % 37; /* mixed: 4..40 */
        p.stream = i % 2;
        duet_error err;
        if (duet_generate(c, &p, &req[i], &err) != DUET_OK) fail_msg("generate %d: %s", i, err.message);
    }
    for (int i = 0; i < N_REQ; i++) {
        const duet_result *r = NULL;
        duet_error err;
        if (duet_wait(req[i], 120000, &r, &err) != DUET_OK) {
            tu_show_log(tmpdir, "duetd", 15);
            tu_show_log(tmpdir, "worker", 15);
            fail_msg("request %d: %s", i, err.message);
        }
        int32_t *ref = refs[i];
        int n = n_ref[i] = tu_generate_ids(build, model, tmpdir, prompts[i], max_tokens[i], "-t 2", ref, 64);
        if (n != r->n_token_ids || memcmp(ref, r->token_ids, (size_t)n * sizeof *ref) != 0)
            fail_msg("request %d: %d tokens through duetd differ from duet generate's %d", i,
                     r->n_token_ids, n);
        duet_request_free(&req[i]);
    }
    printf("[ e2e      ] %d concurrent requests: every greedy answer equals duet generate's\n", N_REQ);
    duet_destroy(&c);
}

static const duet_result *run(duet_client *c, duet_params *p, duet_request **req)
{
    duet_error err;
    const duet_result *r = NULL;
    if (duet_generate(c, p, req, &err) != DUET_OK) fail_msg("generate: %s", err.message);
    if (duet_wait(*req, 120000, &r, &err) != DUET_OK) fail_msg("wait: %s", err.message);
    return r;
}

static void test_prefix_cache_and_session(void **state)
{
    (void)state;
    duet_client *c = NULL;
    assert_int_equal(duet_connect(endpoint, NULL, &c, NULL), DUET_OK);
    static char a[8192], b[8192];
    size_t off = 0;
    for (int w = 0; w < 300; w++) off += (size_t)snprintf(a + off, sizeof a - off, "%s ", tu_word(w * 5));
    memcpy(b, a, off);
    snprintf(a + off, sizeof a - off, "First question?");
    snprintf(b + off, sizeof b - off, "Another, different question?");
    duet_params p;
    duet_params_init(&p);
    p.sampling.temperature = 0;
    p.max_tokens = 4;
    duet_request *ra = NULL, *rb = NULL;
    p.prompt = a;
    const duet_result *r1 = run(c, &p, &ra);
    p.prompt = b;
    const duet_result *r2 = run(c, &p, &rb);
    printf("[ e2e      ] shared prefix: first %d prompt tokens (%d cached), TTFT %.1f ms; second %d "
           "(%d cached), TTFT %.1f ms\n", r1->usage.prompt_tokens, r1->usage.cached_prompt_tokens,
           r1->timings.ttft_ms, r2->usage.prompt_tokens, r2->usage.cached_prompt_tokens, r2->timings.ttft_ms);
    assert_true(r2->usage.cached_prompt_tokens >= 256);
    assert_true(r2->timings.ttft_ms < r1->timings.ttft_ms);
    duet_request_free(&ra);
    duet_request_free(&rb);

    /* a session: the second turn's prompt holds the first turn, whose KV stays cached */
    duet_message m[3] = {{"user", "Tell me about rivers and the sea, in some detail please."},
                         {"assistant", NULL}, {"user", "And lakes?"}};
    duet_params_init(&p);
    p.sampling.temperature = 0;
    p.max_tokens = 16;
    p.session = "e2e-session";
    p.messages = m;
    p.n_messages = 1;
    const duet_result *t1 = run(c, &p, &ra);
    m[1].content = t1->text;
    p.n_messages = 3;
    const duet_result *t2 = run(c, &p, &rb);
    printf("[ e2e      ] session: turn 1 %d prompt tokens, turn 2 %d prompt tokens of which %d cached\n",
           t1->usage.prompt_tokens, t2->usage.prompt_tokens, t2->usage.cached_prompt_tokens);
    assert_true(t2->usage.cached_prompt_tokens >= 16);
    duet_request_free(&ra);
    duet_request_free(&rb);
    duet_destroy(&c);
}

/* The Python client (client/python/duet_client.py) sends the same 32 requests at once on
 * one connection; each answer must be duet generate's. */
static void test_python_client(void **state)
{
    (void)state;
    if (access(".venv/bin/python", X_OK) != 0 ||
        system(".venv/bin/python -c 'import zmq' 2>/dev/null") != 0) {
        printf("[  SKIP    ] python client: .venv with pyzmq missing (scripts/setup installs it)\n");
        skip();
    }
    if (n_ref[0] == 0) fail_msg("the C client's test did not record duet generate's answers");
    char path[600], script[700], cmd[2048];
    snprintf(path, sizeof path, "%s/prompts.json", tmpdir);
    json_t *arr = json_array();
    for (int i = 0; i < N_REQ; i++)
        json_array_append_new(arr, json_pack("{s:s, s:i}", "prompt", prompts[i], "max_tokens", max_tokens[i]));
    assert_int_equal(json_dump_file(arr, path, 0), 0);
    json_decref(arr);
    snprintf(script, sizeof script, "%s/e2e.py", tmpdir);
    FILE *f = fopen(script, "w");
    assert_non_null(f);
    fprintf(f, "import json, sys\n"
               "import duet_client as d\n"
               "c = d.Client(sys.argv[1])\n"
               "reqs = [c.generate(prompt=p['prompt'], max_tokens=p['max_tokens'], temperature=0,\n"
               "                   stream=bool(i %% 2)) for i, p in enumerate(json.load(open(sys.argv[2])))]\n"
               "for r in reqs:\n"
               "    print(','.join(map(str, r.result().token_ids)))\n");
    fclose(f);
    snprintf(cmd, sizeof cmd, "PYTHONPATH=client/python .venv/bin/python '%s' '%s' '%s'", script,
             endpoint, path);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    char line[4096];
    int i = 0;
    for (; i < N_REQ && fgets(line, sizeof line, p); i++) {
        line[strcspn(line, "\n")] = 0;
        char want[4096] = "";
        size_t off = 0;
        for (int k = 0; k < n_ref[i]; k++)
            off += (size_t)snprintf(want + off, sizeof want - off, "%s%d", k ? "," : "", refs[i][k]);
        if (strcmp(line, want) != 0) {
            pclose(p);
            fail_msg("python client, request %d: got [%s], duet generate [%s]", i, line, want);
        }
    }
    int rc = pclose(p);
    if (rc != 0 || i != N_REQ) fail_msg("python client failed (exit %d) after %d answers", rc, i);
    printf("[ e2e      ] python client: %d concurrent requests, every answer equals duet generate's\n", N_REQ);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_concurrent_equal_generate),
        cmocka_unit_test(test_prefix_cache_and_session),
        cmocka_unit_test(test_python_client),
    };
    return cmocka_run_group_tests_name("e2e", tests, setup, teardown);
}
