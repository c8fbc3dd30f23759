/* tests/test_config.c: daemon/config: the shipped conf/duet.conf, every kind of error
 * with its FILE:LINE message, size suffixes, dump -> parse round trips, reload diffs. */
#include <setjmp.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "daemon/config.h"

#define SHIPPED "conf/duet.conf"
#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define ERRLEN 16384

/* A temporary folder holding an (empty) model file "tiny.gguf"; "@M" in test texts
 * stands for its path. */
typedef struct {
    char dir[64];
    char model[128];
} fixture;

static fixture *fx(void **state) { return *state; }

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f) return -1;
    snprintf(f->dir, sizeof f->dir, "/tmp/duet_conf_XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    snprintf(f->model, sizeof f->model, "%s/tiny.gguf", f->dir);
    FILE *m = fopen(f->model, "w");
    if (!m) return -1;
    fputs("GGUF", m);
    fclose(m);
    *state = f;
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    char p[256];
    snprintf(p, sizeof p, "%s/tiny.gguf", f->dir);
    unlink(p);
    snprintf(p, sizeof p, "%s/test.conf", f->dir);
    unlink(p);
    rmdir(f->dir);
    free(f);
    return 0;
}

/* text with every "@M" replaced by the model path; the caller frees. */
static char *subst(void **state, const char *text)
{
    const char *model = fx(state)->model;
    size_t n = strlen(text) + 1;
    for (const char *p = strstr(text, "@M"); p; p = strstr(p + 2, "@M")) n += strlen(model);
    char *out = malloc(n), *o = out;
    assert_non_null(out);
    for (const char *p = text; *p;) {
        if (p[0] == '@' && p[1] == 'M') {
            o = stpcpy(o, model);
            p += 2;
        } else {
            *o++ = *p++;
        }
    }
    *o = 0;
    return out;
}

/* Parse text (as "test.conf") and return 0 or -1; err gets the messages. */
static int parse(void **state, const char *text, duet_config **out, char *err)
{
    char *t = subst(state, text);
    int rc = config_parse(t, "test.conf", out, err, ERRLEN);
    free(t);
    return rc;
}

static duet_config *parse_ok(void **state, const char *text)
{
    char err[ERRLEN];
    duet_config *cfg = NULL;
    int rc = parse(state, text, &cfg, err);
    if (rc != 0) fprintf(stderr, "unexpected errors:\n%s\n", err);
    assert_int_equal(rc, 0);
    assert_non_null(cfg);
    assert_string_equal(err, "");
    return cfg;
}

/* Parsing text fails, and its errors hold each of the NULL-terminated lines (as whole
 * lines, with the model path standing for @M). Returns the number of error lines. */
static int expect_errs(void **state, const char *text, ...)
{
    char err[ERRLEN];
    duet_config *cfg = (duet_config *)&err; /* must be set to NULL */
    int rc = parse(state, text, &cfg, err);
    assert_int_equal(rc, -1);
    assert_null(cfg);
    va_list ap;
    va_start(ap, text);
    for (const char *want; (want = va_arg(ap, const char *));) {
        char *w = subst(state, want);
        size_t wl = strlen(w);
        bool found = false;
        for (const char *p = err; *p;) {
            size_t ll = strcspn(p, "\n");
            if (ll == wl && memcmp(p, w, wl) == 0) found = true;
            p += ll + (p[ll] == '\n');
        }
        if (!found) fprintf(stderr, "missing error line:\n  %s\ngot:\n%s\n", w, err);
        assert_true(found);
        free(w);
    }
    va_end(ap);
    int lines = *err ? 1 : 0;
    for (const char *p = err; *p; p++) lines += *p == '\n';
    return lines;
}

#define BASE "[model]\npath = @M\n[group main]\nrole = both\n" /* lines 1-4 */

/* ---- the shipped configuration ------------------------------------------------------ */

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *buf = malloc((size_t)n + 1);
    assert_non_null(buf);
    assert_int_equal(fread(buf, 1, (size_t)n, f), (size_t)n);
    buf[n] = 0;
    fclose(f);
    return buf;
}

static void test_shipped_loads(void **state)
{
    (void)state;
    if (access(DEFAULT_MODEL, R_OK) != 0) {
        fprintf(stderr, "skipped: %s is absent (make model)\n", DEFAULT_MODEL);
        skip();
    }
    char err[ERRLEN];
    duet_config *cfg = NULL;
    int rc = config_load(SHIPPED, &cfg, err, sizeof err);
    if (rc) fprintf(stderr, "%s\n", err);
    assert_int_equal(rc, 0);
    assert_string_equal(cfg->source, SHIPPED);
    assert_string_equal(cfg->model.path, DEFAULT_MODEL);
    assert_string_equal(cfg->model.name, "SmolLM2-135M-Instruct.Q4_1");
    assert_int_equal(cfg->model.chat_style, CONFIG_CHAT_AUTO);
    assert_int_equal(cfg->model.kv_type, DTYPE_F16);
    assert_string_equal(cfg->daemon.client_endpoint, "tcp://127.0.0.1:7070");
    assert_string_equal(cfg->daemon.worker_endpoint, "tcp://127.0.0.1:7071");
    assert_int_equal(cfg->daemon.heartbeat_ms, 1000);
    assert_int_equal(cfg->daemon.dead_after, 4);
    assert_int_equal(cfg->n_groups, 1);
    const config_group *g = &cfg->groups[0];
    assert_string_equal(g->name, "main");
    assert_int_equal(g->role, CONFIG_ROLE_BOTH);
    assert_int_equal(g->tp_size, 1);
    assert_int_equal(g->n_devices, 1);
    assert_int_equal(g->devices[0].kind, CONFIG_DEV_CPU);
    assert_int_equal(g->kv_budget, 256 << 20);
    assert_int_equal(g->transport, CONFIG_TRANSPORT_TCP);
    assert_string_equal(g->data_endpoint, "");
    config_free(&cfg);
    assert_null(cfg);
    config_free(&cfg); /* safe twice */
    config_free(NULL);
}

/* Every key of the table (as config_dump lists them) is documented in the shipped file. */
static void test_shipped_documents_every_key(void **state)
{
    duet_config *cfg = parse_ok(state, BASE);
    char *dump = NULL;
    size_t dlen = 0;
    FILE *m = open_memstream(&dump, &dlen);
    assert_non_null(m);
    assert_int_equal(config_dump(cfg, m), 0);
    fclose(m);
    char *conf = read_file(SHIPPED);
    assert_non_null(conf);
    int keys = 0;
    for (char *line = strtok(dump, "\n"); line; line = strtok(NULL, "\n")) {
        char *eq = strstr(line, " = ");
        if (line[0] == ';' || line[0] == '[' || !eq) continue;
        char want[96];
        snprintf(want, sizeof want, "\n%.*s =", (int)(eq - line), line);
        if (!strstr(conf, want)) fprintf(stderr, "conf/duet.conf lacks%s\n", want);
        assert_non_null(strstr(conf, want));
        keys++;
    }
    assert_int_equal(keys, 5 + 13 + 9);
    free(conf);
    free(dump);
    config_free(&cfg);
}

/* The commented-out disaggregated layouts of the shipped file load once uncommented in
 * place of [group main]. */
static void test_shipped_examples_load(void **state)
{
    char *conf = read_file(SHIPPED);
    assert_non_null(conf);
    char *main_grp = strstr(conf, "\n[group main]");
    char *layouts = strstr(conf, "; ---- A disaggregated layout");
    char *cpu = strstr(conf, "; On the CPU alone");
    assert_non_null(main_grp);
    assert_non_null(layouts);
    assert_non_null(cpu);
    const char *ranges[2][2] = {{layouts, cpu}, {cpu, conf + strlen(conf)}};
    for (int r = 0; r < 2; r++) {
        char *text = NULL;
        size_t tlen = 0;
        FILE *m = open_memstream(&text, &tlen);
        assert_non_null(m);
        fprintf(m, "%.*s\n", (int)(main_grp - conf), conf);
        int groups = 0;
        for (const char *p = ranges[r][0]; p < ranges[r][1];) {
            size_t ll = strcspn(p, "\n");
            /* "; [group x]" and "; key = value" lines are the example */
            if (ll > 2 && p[0] == ';' && p[1] == ' ' && (p[2] == '[' || memchr(p, '=', ll))) {
                fprintf(m, "%.*s\n", (int)ll - 2, p + 2);
                groups += p[2] == '[';
            }
            p += ll + (p[ll] == '\n');
        }
        fclose(m);
        assert_int_equal(groups, 2);
        char err[ERRLEN];
        duet_config *cfg = NULL;
        /* the model path of the shipped file may be absent: point it at the fixture's */
        char *path = strstr(text, DEFAULT_MODEL);
        assert_non_null(path);
        char *t2 = NULL;
        assert_true(asprintf(&t2, "%.*s%s%s", (int)(path - text), text, fx(state)->model,
                             path + strlen(DEFAULT_MODEL)) > 0);
        int rc = config_parse(t2, "example.conf", &cfg, err, sizeof err);
        if (rc) fprintf(stderr, "%s\n", err);
        assert_int_equal(rc, 0);
        assert_int_equal(cfg->n_groups, 2);
        assert_string_equal(cfg->groups[0].name, "prefill");
        assert_int_equal(cfg->groups[0].role, CONFIG_ROLE_PREFILL);
        assert_int_equal(cfg->groups[1].role, CONFIG_ROLE_DECODE);
        if (r == 0) {
            assert_int_equal(cfg->groups[1].tp_size, 2);
            assert_int_equal(cfg->groups[1].devices[1].kind, CONFIG_DEV_CUDA);
            assert_int_equal(cfg->groups[1].devices[1].index, 3);
            assert_int_equal(cfg->groups[1].kv_budget, (int64_t)40 << 30);
            assert_int_equal(cfg->groups[1].transport, CONFIG_TRANSPORT_NCCL);
        } else {
            assert_string_equal(cfg->groups[1].data_endpoint, "tcp://127.0.0.1:7110");
        }
        config_free(&cfg);
        free(t2);
        free(text);
    }
    free(conf);
}

/* ---- defaults, syntax ---------------------------------------------------------------- */

static void test_minimal_defaults(void **state)
{
    duet_config *cfg = parse_ok(state, BASE);
    assert_string_equal(cfg->model.path, fx(state)->model);
    assert_string_equal(cfg->model.name, "tiny");
    assert_int_equal(cfg->model.max_context, 0);
    assert_int_equal(cfg->model.kv_type, DTYPE_F16);
    const config_daemon *d = &cfg->daemon;
    assert_string_equal(d->client_endpoint, "tcp://127.0.0.1:7070");
    assert_string_equal(d->worker_endpoint, "tcp://127.0.0.1:7071");
    assert_int_equal(d->heartbeat_ms, 1000);
    assert_int_equal(d->dead_after, 4);
    assert_int_equal(d->queue_limit, 256);
    assert_int_equal(d->when_full, CONFIG_FULL_WAIT);
    assert_int_equal(d->max_prompt_tokens, 0);
    assert_int_equal(d->max_tokens_default, 256);
    assert_int_equal(d->max_tokens_limit, 0);
    assert_int_equal(d->client_buffer_bytes, 16 << 20);
    assert_int_equal(d->request_timeout_ms, 600000);
    assert_int_equal(d->log_level, CONFIG_LOG_INFO);
    const config_group *g = &cfg->groups[0];
    assert_int_equal(g->threads, 0);
    assert_int_equal(g->max_batch_tokens, 512);
    assert_int_equal(g->max_seqs, 64);
    config_free(&cfg);
}

static void test_syntax_variants(void **state)
{
    /* BOM, CRLF, indentation (no continuation lines), inline comments, '#' comments,
     * name:value, an explicit empty name (derived), explicit model name */
    duet_config *cfg = parse_ok(state, "\xEF\xBB\xBF"
                                       "# comment\r\n"
                                       "[model]\r\n"
                                       "  path = @M\r\n"
                                       "name =\r\n"
                                       "[daemon] ; inline\n"
                                       "\theartbeat_ms = 500 ; half a second\n"
                                       "  dead_after = 3\n"
                                       "log_level: debug\n"
                                       "[ group main ]\n"
                                       "role = both\n");
    assert_string_equal(cfg->model.name, "tiny");
    assert_int_equal(cfg->daemon.heartbeat_ms, 500);
    assert_int_equal(cfg->daemon.dead_after, 3);
    assert_int_equal(cfg->daemon.log_level, CONFIG_LOG_DEBUG);
    assert_string_equal(cfg->groups[0].name, "main");
    config_free(&cfg);

    cfg = parse_ok(state, "[model]\npath = @M\nname = my model v2\nchat_style = llama3\n"
                          "[group main]\nrole = both\n");
    assert_string_equal(cfg->model.name, "my model v2");
    assert_int_equal(cfg->model.chat_style, CONFIG_CHAT_LLAMA3);
    config_free(&cfg);
}

static void test_syntax_errors(void **state)
{
    int n = expect_errs(state,
                        "heartbeat_ms = 5\n"           /* 1 */
                        "mystery = 1\n"                /* 2 */
                        BASE                           /* 3-6 */
                        "this line has no equals\n"    /* 7 */
                        "[daemon\n"                    /* 8 */
                        "queue_limit = 1\n"            /* 9: ignored, under a bad header */
                        "[daemon] trailing\n",         /* 10 */
                        "test.conf:1: heartbeat_ms: key outside any section (expected it under [daemon])",
                        "test.conf:2: mystery: key outside any section (expected [model], [daemon] or [group NAME] first)",
                        "test.conf:7: syntax error (expected 'key = value', '[section]' or a comment)",
                        "test.conf:8: unterminated section header (expected [section])",
                        "test.conf:10: text after the section header: 'trailing' (expected a comment)",
                        NULL);
    assert_int_equal(n, 5);

    char long_line[800];
    snprintf(long_line, sizeof long_line, BASE "name = %0300d\n= 3\n", 0);
    n = expect_errs(state, long_line,
                    "test.conf:5: line of 307 characters is too long (expected at most 196)",
                    "test.conf:6: [group main]: syntax error: no key before '=' (expected 'key = value')",
                    NULL);
    assert_int_equal(n, 2);
    /* long comments are fine, and none of their text is read */
    snprintf(long_line, sizeof long_line, "; %0300d\n" BASE "# %0250d tp_size = 2\n", 0, 0);
    duet_config *cfg = parse_ok(state, long_line);
    assert_int_equal(cfg->groups[0].tp_size, 1);
    config_free(&cfg);
}

/* ---- values of each type ----------------------------------------------------------- */

static void test_bad_values(void **state)
{
    int n = expect_errs(
        state,
        "[model]\n"                           /* 1 */
        "path = @M.missing\n"                 /* 2 */
        "max_context = lots\n"                /* 3 */
        "kv_type = fp8\n"                     /* 4 */
        "chat_style = chatlm\n"               /* 5 */
        "[daemon]\n"                          /* 6 */
        "heartbeat_ms = fast\n"               /* 7 */
        "dead_after = 7\n"                    /* 8 */
        "queue_limit = 99999999999999999999\n" /* 9 */
        "when_full = maybe\n"                 /* 10 */
        "client_endpoint = http://x:1\n"      /* 11 */
        "worker_endpoint = tcp://localhost\n" /* 12 */
        "client_buffer_bytes = 1KiB\n"        /* 13 */
        "log_level =\n"                       /* 14 */
        "request_timeout_ms = 1.5\n"          /* 15 */
        "[group main]\n"                      /* 16 */
        "role = prefil\n"                     /* 17 */
        "tp_size = 0\n"                       /* 18 */
        "devices = gpu0\n"                    /* 19 */
        "kv_budget = 12 parsecs\n"            /* 20 */
        "transport = ib\n"                    /* 21 */
        "data_endpoint = ipc:///tmp/x\n"      /* 22 */
        "threads = -1\n",                     /* 23 */
        "test.conf:2: [model] path: cannot read '@M.missing': No such file or directory (expected the path of a readable GGUF file)",
        "test.conf:3: [model] max_context: 'lots' is not an integer (expected an integer in 0..1048576)",
        "test.conf:4: [model] kv_type: unknown value 'fp8' (expected one of f32|f16|bf16|int8)",
        "test.conf:5: [model] chat_style: unknown value 'chatlm'; did you mean 'chatml'? (expected one of auto|chatml|llama2|llama3|phi3)",
        "test.conf:7: [daemon] heartbeat_ms: 'fast' is not an integer (expected an integer in 10..60000)",
        "test.conf:8: [daemon] dead_after: 7 is out of range (expected an integer in 3..5)",
        "test.conf:9: [daemon] queue_limit: 99999999999999999999 is out of range (expected an integer in 0..1000000)",
        "test.conf:10: [daemon] when_full: unknown value 'maybe' (expected one of wait|busy)",
        "test.conf:11: [daemon] client_endpoint: 'http://x:1' has an unsupported transport 'http' (expected a ZeroMQ endpoint: tcp://HOST:PORT, ipc://PATH or inproc://NAME)",
        "test.conf:12: [daemon] worker_endpoint: 'tcp://localhost' needs a host and a port in 1..65535 (expected a ZeroMQ endpoint: tcp://HOST:PORT, ipc://PATH or inproc://NAME)",
        "test.conf:13: [daemon] client_buffer_bytes: 1KiB is out of range (expected a size in 64KiB..64GiB, in bytes or with a suffix K, M, G, T, KiB, MiB, GiB, TiB)",
        "test.conf:14: [daemon] log_level: empty value (expected one of error|warn|info|debug)",
        "test.conf:15: [daemon] request_timeout_ms: '1.5' is not an integer (expected an integer in 0..86400000)",
        "test.conf:17: [group main] role: unknown value 'prefil'; did you mean 'prefill'? (expected one of prefill|decode|both)",
        "test.conf:18: [group main] tp_size: 0 is out of range (expected an integer in 1..64)",
        "test.conf:19: [group main] devices: 'gpu0' is not a device (expected cpu or cuda:N for each TP rank, comma-separated, e.g. cuda:0,cuda:1)",
        "test.conf:20: [group main] kv_budget: '12 parsecs' has an unknown size suffix 'parsecs' (expected a size in 1MiB..16TiB, in bytes or with a suffix K, M, G, T, KiB, MiB, GiB, TiB)",
        "test.conf:21: [group main] transport: unknown value 'ib' (expected one of tcp|mpi|nccl)",
        "test.conf:22: [group main] data_endpoint: 'ipc:///tmp/x' has an unsupported transport 'ipc' (expected tcp://HOST:PORT, or empty for any free port)",
        "test.conf:23: [group main] threads: -1 is out of range (expected an integer in 0..1024)",
        NULL);
    /* one error per bad value: rejected values cause no cross-check errors, and the
     * bad role counts as set (no "missing required key") */
    assert_int_equal(n, 20);

    expect_errs(state, BASE "devices = cuda:0,cuda:0\n",
                "test.conf:5: [group main] devices: cuda:0 is listed twice (expected cpu or cuda:N for each TP rank, comma-separated, e.g. cuda:0,cuda:1)",
                NULL);
    expect_errs(state, BASE "devices = cpu,cuda:0\n",
                "test.conf:5: [group main] devices: 'cpu,cuda:0' mixes cpu and cuda devices (expected cpu or cuda:N for each TP rank, comma-separated, e.g. cuda:0,cuda:1)",
                NULL);
    expect_errs(state, BASE "devices = cpu,,cpu\n",
                "test.conf:5: [group main] devices: empty entry in 'cpu,,cpu' (expected cpu or cuda:N for each TP rank, comma-separated, e.g. cuda:0,cuda:1)",
                NULL);
    expect_errs(state, "[model]\npath =\n[group main]\nrole = both\n",
                "test.conf:2: [model] path: empty value (expected the path of a readable GGUF file)",
                NULL);
    char longname[300];
    snprintf(longname, sizeof longname, BASE "[daemon]\nclient_endpoint = ipc://%0170d\n", 0);
    expect_errs(state, longname,
                "test.conf:6: [daemon] client_endpoint: value of 176 characters is too long (expected a ZeroMQ endpoint: tcp://HOST:PORT, ipc://PATH or inproc://NAME)",
                NULL);
    /* the directory is not a regular file */
    char dir_path[256];
    snprintf(dir_path, sizeof dir_path, "[model]\npath = %s\n[group main]\nrole = both\n",
             fx(state)->dir);
    char err[ERRLEN];
    duet_config *cfg = NULL;
    assert_int_equal(config_parse(dir_path, "t.conf", &cfg, err, sizeof err), -1);
    assert_non_null(strstr(err, "is not a regular file"));
}

static void test_good_values(void **state)
{
    duet_config *cfg = parse_ok(state,
                                "[model]\npath = @M\nkv_type = int8\nmax_context = 4096\n"
                                "[daemon]\nclient_endpoint = ipc:///run/duet/client\n"
                                "worker_endpoint = inproc://workers\nwhen_full = busy\n"
                                "max_prompt_tokens = 4095\nmax_tokens_limit = 4096\n"
                                "max_tokens_default = 4096\nrequest_timeout_ms = 0\n"
                                "[group g]\nrole = both\ntp_size = 3\n"
                                "devices = cuda:7, cuda:0 ,cuda:12\ntransport = nccl\n");
    assert_int_equal(cfg->model.kv_type, DTYPE_I8);
    assert_string_equal(cfg->daemon.client_endpoint, "ipc:///run/duet/client");
    assert_int_equal(cfg->daemon.when_full, CONFIG_FULL_BUSY);
    const config_group *g = &cfg->groups[0];
    assert_int_equal(g->n_devices, 3);
    assert_int_equal(g->devices[0].index, 7);
    assert_int_equal(g->devices[1].index, 0);
    assert_int_equal(g->devices[2].index, 12);
    assert_int_equal(g->devices[2].kind, CONFIG_DEV_CUDA);
    config_free(&cfg);
}

static void test_size_suffixes(void **state)
{
    static const struct {
        const char *text;
        int64_t bytes;
    } ok[] = {
        {"1048576", 1 << 20},     {"1024K", 1 << 20},        {"1024k", 1 << 20},
        {"1024KiB", 1 << 20},     {"1024kib", 1 << 20},      {"3M", 3 << 20},
        {"3MiB", 3 << 20},        {"64 MiB", 64 << 20},      {"2G", (int64_t)2 << 30},
        {"2gib", (int64_t)2 << 30}, {"1T", (int64_t)1 << 40}, {"16TiB", (int64_t)16 << 40},
        {"1536M", (int64_t)1536 << 20},
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        char text[256];
        snprintf(text, sizeof text, BASE "kv_budget = %s\n", ok[i].text);
        duet_config *cfg = parse_ok(state, text);
        assert_int_equal(cfg->groups[0].kv_budget, ok[i].bytes);
        config_free(&cfg);
    }
    static const char *const bad[][2] = {
        {"1KB", "'1KB' has an unknown size suffix 'KB'"},
        {"1.5G", "'1.5G' has an unknown size suffix '.5G'"},
        {"G", "'G' is not a size"},
        {"-1M", "'-1M' is not a size"},
        {"+1M", "'+1M' is not a size"},
        {"99999999999T", "'99999999999T' is too large"},
        {"99999999999999999999", "'99999999999999999999' is too large"},
        {"17TiB", "17TiB is out of range"},
        {"1023K", "1023K is out of range"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char text[256], want[512];
        snprintf(text, sizeof text, BASE "kv_budget = %s\n", bad[i][0]);
        snprintf(want, sizeof want,
                 "test.conf:5: [group main] kv_budget: %s (expected a size in 1MiB..16TiB, in bytes or with a suffix K, M, G, T, KiB, MiB, GiB, TiB)",
                 bad[i][1]);
        expect_errs(state, text, want, NULL);
    }
}

/* ---- keys and sections --------------------------------------------------------------- */

static void test_unknown_keys(void **state)
{
    expect_errs(state,
                BASE                         /* 1-4 */
                "tp_szie = 2\n"              /* 5 */
                "kvbudget = 1G\n"            /* 6 */
                "log_level = debug\n"        /* 7 */
                "colour = blue\n"            /* 8 */
                "[daemon]\n"                 /* 9 */
                "heartbeat = 100\n"          /* 10 */
                "Queue_Limit = 3\n",         /* 11 */
                "test.conf:5: [group main] tp_szie: unknown key; did you mean 'tp_size'? (expected one of: role, tp_size, devices, threads, kv_budget, max_batch_tokens, max_seqs, transport, data_endpoint)",
                "test.conf:6: [group main] kvbudget: unknown key; did you mean 'kv_budget'? (expected one of: role, tp_size, devices, threads, kv_budget, max_batch_tokens, max_seqs, transport, data_endpoint)",
                "test.conf:7: [group main] log_level: unknown key; it belongs in [daemon] (expected one of: role, tp_size, devices, threads, kv_budget, max_batch_tokens, max_seqs, transport, data_endpoint)",
                "test.conf:8: [group main] colour: unknown key (expected one of: role, tp_size, devices, threads, kv_budget, max_batch_tokens, max_seqs, transport, data_endpoint)",
                "test.conf:10: [daemon] heartbeat: unknown key; did you mean 'heartbeat_ms'? (expected one of: client_endpoint, worker_endpoint, heartbeat_ms, dead_after, queue_limit, when_full, max_prompt_tokens, max_tokens_default, max_tokens_limit, client_buffer_bytes, request_timeout_ms, transfer_lease_ms, log_level)",
                "test.conf:11: [daemon] Queue_Limit: unknown key; did you mean 'queue_limit'? (expected one of: client_endpoint, worker_endpoint, heartbeat_ms, dead_after, queue_limit, when_full, max_prompt_tokens, max_tokens_default, max_tokens_limit, client_buffer_bytes, request_timeout_ms, transfer_lease_ms, log_level)",
                NULL);
}

static void test_unknown_sections(void **state)
{
    int n = expect_errs(state,
                        BASE                  /* 1-4 */
                        "[deamon]\n"          /* 5 */
                        "heartbeat_ms = 1\n"  /* 6: ignored with its section */
                        "[groups decode]\n"   /* 7 */
                        "role = decode\n"     /* 8 */
                        "[group]\n"           /* 9 */
                        "[group a b]\n"       /* 10 */
                        "[Model]\n"           /* 11 */
                        "[logging]\n",        /* 12 */
                        "test.conf:5: [deamon]: unknown section; did you mean [daemon]? (expected [model], [daemon] or [group NAME])",
                        "test.conf:7: [groups decode]: unknown section; did you mean [group decode]? (expected [model], [daemon] or [group NAME])",
                        "test.conf:9: [group]: a group needs a name (expected [group NAME])",
                        "test.conf:10: [group a b]: invalid group name 'a b' (expected 1 to 32 letters, digits, '_', '.' or '-')",
                        "test.conf:11: [Model]: unknown section; did you mean [model]? (expected [model], [daemon] or [group NAME])",
                        "test.conf:12: [logging]: unknown section (expected [model], [daemon] or [group NAME])",
                        NULL);
    assert_int_equal(n, 6);
}

static void test_duplicates(void **state)
{
    int n = expect_errs(state,
                        BASE                      /* 1-4 */
                        "role = decode\n"         /* 5 */
                        "[daemon]\n"              /* 6 */
                        "heartbeat_ms = 100\n"    /* 7 */
                        "heartbeat_ms = 200\n"    /* 8 */
                        "[group main]\n"          /* 9 */
                        "role = both\n"           /* 10: ignored with its section */
                        "[model]\n",              /* 11 */
                        "test.conf:5: [group main] role: duplicate key (first set on line 4)",
                        "test.conf:8: [daemon] heartbeat_ms: duplicate key (first set on line 7)",
                        "test.conf:9: [group main]: duplicate section (first on line 3)",
                        "test.conf:11: [model]: duplicate section (first on line 1)", NULL);
    assert_int_equal(n, 4);
}

static void test_missing_required(void **state)
{
    expect_errs(state, "[group main]\nrole = both\n",
                "test.conf: missing section [model] (expected at least: [model] with path = FILE.gguf)",
                NULL);
    expect_errs(state, "[model]\nchat_style = auto\n[group main]\nrole = both\n",
                "test.conf:1: [model] path: missing required key (expected the path of a readable GGUF file)",
                NULL);
    expect_errs(state, "[model]\npath = @M\n[group main]\ntp_size = 1\n[group other]\nrole = both\n",
                "test.conf:3: [group main] role: missing required key (expected one of prefill|decode|both)",
                NULL);
    expect_errs(state, "[model]\npath = @M\n[daemon]\n",
                "test.conf: no [group NAME] section (expected at least one, e.g. [group main] with role = both)",
                NULL);
    /* an empty file: both whole-file errors */
    int n = expect_errs(state, "",
                        "test.conf: missing section [model] (expected at least: [model] with path = FILE.gguf)",
                        "test.conf: no [group NAME] section (expected at least one, e.g. [group main] with role = both)",
                        NULL);
    assert_int_equal(n, 2);
}

/* ---- cross-checks -------------------------------------------------------------------- */

static void test_cross_checks(void **state)
{
    int n;
    expect_errs(state, BASE "tp_size = 2\n",
                "test.conf:5: [group main] tp_size: 1 device for tp_size 2 (expected 2 comma-separated devices, e.g. cpu,cpu)",
                NULL);
    expect_errs(state, BASE "devices = cuda:0,cuda:1,cuda:2\ntp_size = 2\n",
                "test.conf:5: [group main] devices: 3 devices for tp_size 2 (expected 2 comma-separated devices, e.g. cuda:0,cuda:1)",
                NULL);
    expect_errs(state, BASE "transport = nccl\n",
                "test.conf:5: [group main] transport: nccl needs cuda devices (expected tcp or mpi for cpu devices)",
                NULL);
    expect_errs(state, BASE "transport = mpi\ndata_endpoint = tcp://127.0.0.1:7100\n",
                "test.conf:6: [group main] data_endpoint: only used with transport = tcp, not mpi (expected it empty)",
                NULL);
    expect_errs(state, BASE "tp_size = 4\ndevices = cpu,cpu,cpu,cpu\ndata_endpoint = tcp://h:65533\n",
                "test.conf:7: [group main] data_endpoint: ports 65533..65536 run past 65535 (expected a base port up to 65532)",
                NULL);
    expect_errs(state, BASE "max_batch_tokens = 16\nmax_seqs = 32\n",
                "test.conf:6: [group main] max_seqs: 32 sequences cannot all decode in a step of max_batch_tokens 16 (expected at most 16)",
                NULL);
    /* a prefill group may batch fewer tokens than sequences... */
    duet_config *cfg = parse_ok(state, "[model]\npath = @M\n[group p]\nrole = prefill\nmax_batch_tokens = 16\n"
                                       "max_seqs = 32\n[group d]\nrole = decode\n");
    config_free(&cfg);
    /* ...and a 'both' group serves prefill and decode groups alike */
    cfg = parse_ok(state, "[model]\npath = @M\n[group p]\nrole = prefill\n[group b]\nrole = both\n");
    config_free(&cfg);
    cfg = parse_ok(state, "[model]\npath = @M\n[group b]\nrole = both\n[group d]\nrole = decode\n");
    config_free(&cfg);

    expect_errs(state, "[model]\npath = @M\n[group p1]\nrole = prefill\n[group p2]\nrole = prefill\n",
                "test.conf:4: [group p1] role: a prefill group needs a group to decode (expected another group with role = decode, or role = both)",
                NULL);
    expect_errs(state, "[model]\npath = @M\n[group d]\nrole = decode\n",
                "test.conf:4: [group d] role: a decode group needs a group to prefill (expected another group with role = prefill, or role = both)",
                NULL);

    expect_errs(state, BASE "[daemon]\nworker_endpoint = tcp://127.0.0.1:7070\n",
                "test.conf:6: [daemon] worker_endpoint: 'tcp://127.0.0.1:7070' clashes with client_endpoint 'tcp://127.0.0.1:7070' (expected a different address or port)",
                NULL);
    expect_errs(state, BASE "[daemon]\nclient_endpoint = tcp://0.0.0.0:7071\n",
                "test.conf:6: [daemon] client_endpoint: 'tcp://0.0.0.0:7071' clashes with worker_endpoint 'tcp://127.0.0.1:7071' (expected a different address or port)",
                NULL);
    expect_errs(state, BASE "[daemon]\nmax_tokens_default = 300\nmax_tokens_limit = 200\n",
                "test.conf:6: [daemon] max_tokens_default: 300 is above max_tokens_limit 200 (expected at most 200)",
                NULL);
    n = expect_errs(state,
                    "[model]\npath = @M\nmax_context = 100\n[group main]\nrole = both\n[daemon]\n"
                    "max_prompt_tokens = 100\nmax_tokens_limit = 101\nmax_tokens_default = 50\n",
                    "test.conf:7: [daemon] max_prompt_tokens: 100 leaves no room to generate in [model] max_context 100 (expected at most 99)",
                    "test.conf:8: [daemon] max_tokens_limit: 101 is above [model] max_context 100 (expected at most 100)",
                    NULL);
    assert_int_equal(n, 2);

    /* errors come in line order, whole-file ones last, whatever check found them */
    char err[ERRLEN];
    duet_config *cfg2 = NULL;
    assert_int_equal(parse(state, "[model]\npath = @M\n[group a]\nrole = prefill\n"
                                  "devices = cuda:0,cuda:1\n[daemon]\nlog_level = loud\n",
                           &cfg2, err),
                     -1);
    assert_string_equal(err,
                        "test.conf:4: [group a] role: a prefill group needs a group to decode (expected another group with role = decode, or role = both)\n"
                        "test.conf:5: [group a] devices: 2 devices for tp_size 1 (expected one device, e.g. cuda:0)\n"
                        "test.conf:7: [daemon] log_level: unknown value 'loud' (expected one of error|warn|info|debug)");
    assert_int_equal(parse(state, "[group a]\nrole = decode\ntp_size = x\n", &cfg2, err), -1);
    assert_string_equal(err,
                        "test.conf:2: [group a] role: a decode group needs a group to prefill (expected another group with role = prefill, or role = both)\n"
                        "test.conf:3: [group a] tp_size: 'x' is not an integer (expected an integer in 1..64)\n"
                        "test.conf: missing section [model] (expected at least: [model] with path = FILE.gguf)");

    /* data ports: rank r of a group listens on its base port + r */
    n = expect_errs(state,
                        "[model]\npath = @M\n"                                        /* 1-2 */
                        "[group p]\nrole = prefill\ntp_size = 2\ndevices = cpu,cpu\n" /* 3-6 */
                        "data_endpoint = tcp://127.0.0.1:7100\n"                       /* 7 */
                        "[group d]\nrole = decode\ndata_endpoint = tcp://127.0.0.1:7101\n" /* 8-10 */
                        "[group e]\nrole = decode\ndata_endpoint = tcp://10.0.0.2:7101\n"  /* 11-13 */
                        "[group f]\nrole = decode\ndata_endpoint = tcp://127.0.0.1:7071\n" /* 14-16 */
                        "[group g]\nrole = decode\ndata_endpoint = tcp://*:7300\n",        /* 17-19 */
                        "test.conf:10: [group d] data_endpoint: ports of 'tcp://127.0.0.1:7101' (one per rank) overlap those of [group p] on line 7 (expected other ports)",
                        "test.conf:16: [group f] data_endpoint: ports of 'tcp://127.0.0.1:7071' (one per rank) clash with [daemon] worker_endpoint 'tcp://127.0.0.1:7071' (expected other ports)",
                        "test.conf:19: [group g] data_endpoint: 'tcp://*:7300' needs a host that peers can connect to, not '*' (expected tcp://HOST:PORT, or empty for any free port)",
                        NULL);
    assert_int_equal(n, 3);
}

static void test_error_bound(void **state)
{
    /* more errors than CONFIG_MAX_ERRORS: the first ones listed, the rest counted */
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    assert_non_null(m);
    fputs(BASE, m);
    for (int i = 0; i < CONFIG_MAX_ERRORS + 8; i++) fprintf(m, "bogus%d = 1\n", i);
    fclose(m);
    char err[ERRLEN];
    duet_config *cfg = NULL;
    assert_int_equal(parse(state, text, &cfg, err), -1);
    int lines = 1;
    for (const char *p = err; *p; p++) lines += *p == '\n';
    assert_int_equal(lines, CONFIG_MAX_ERRORS + 1);
    assert_non_null(strstr(err, "test.conf:5: [group main] bogus0: unknown key"));
    assert_non_null(strstr(err, "\ntest.conf: ... and 8 more errors"));
    assert_null(strstr(err, "bogus32"));

    /* a short err buffer is truncated, NUL-terminated; NULL err is allowed */
    char small[40];
    memset(small, 'x', sizeof small);
    assert_int_equal(parse(state, text, &cfg, NULL), -1);
    char *t = subst(state, text);
    assert_int_equal(config_parse(t, "test.conf", &cfg, small, sizeof small), -1);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_int_equal(config_parse(t, "test.conf", &cfg, NULL, 0), -1);
    free(t);
    free(text);
}

static void test_load_file(void **state)
{
    char path[256], err[ERRLEN];
    snprintf(path, sizeof path, "%s/test.conf", fx(state)->dir);
    duet_config *cfg = NULL;

    assert_int_equal(config_load("/nonexistent/duet.conf", &cfg, err, sizeof err), -1);
    assert_string_equal(err, "/nonexistent/duet.conf: cannot open: No such file or directory");
    assert_null(cfg);

    FILE *f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "[model]\npath = %s\n[group main]\nrole = both\n[daemon]\ndead_after = 9\n",
            fx(state)->model);
    fclose(f);
    assert_int_equal(config_load(path, &cfg, err, sizeof err), -1);
    char want[512];
    snprintf(want, sizeof want,
             "%s:6: [daemon] dead_after: 9 is out of range (expected an integer in 3..5)", path);
    assert_string_equal(err, want);

    f = fopen(path, "w");
    assert_non_null(f);
    fprintf(f, "[model]\npath = %s\n[group main]\nrole = both\n", fx(state)->model);
    fclose(f);
    assert_int_equal(config_load(path, &cfg, err, sizeof err), 0);
    assert_string_equal(cfg->source, path);
    config_free(&cfg);

    f = fopen(path, "w");
    assert_non_null(f);
    fwrite("[model]\0", 1, 8, f);
    fclose(f);
    assert_int_equal(config_load(path, &cfg, err, sizeof err), -1);
    snprintf(want, sizeof want, "%s: holds a NUL byte (expected a text file)", path);
    assert_string_equal(err, want);

    assert_int_equal(config_load(NULL, &cfg, err, sizeof err), -1);
    assert_int_equal(config_parse(NULL, "x", &cfg, err, sizeof err), -1);
}

/* ---- dump, doc, diff ----------------------------------------------------------------- */

static char *dump_text(const duet_config *cfg)
{
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    assert_non_null(m);
    assert_int_equal(config_dump(cfg, m), 0);
    fclose(m);
    return text;
}

#define RICH                                                                                    \
    "[model]\npath = @M\nchat_style = phi3\nname = served\nmax_context = 8192\nkv_type = bf16\n" \
    "[daemon]\nclient_endpoint = tcp://0.0.0.0:9000\nworker_endpoint = ipc:///tmp/duet-w\n"     \
    "heartbeat_ms = 250\ndead_after = 5\nqueue_limit = 0\nwhen_full = busy\n"                  \
    "max_prompt_tokens = 8000\nmax_tokens_default = 100\nmax_tokens_limit = 4000\n"            \
    "client_buffer_bytes = 1000000\nrequest_timeout_ms = 0\nlog_level = warn\n"                \
    "[group pre]\nrole = prefill\ntp_size = 2\ndevices = cuda:1,cuda:0\nthreads = 2\n"          \
    "kv_budget = 3G\nmax_batch_tokens = 8192\nmax_seqs = 16\ntransport = nccl\n"                \
    "[group dec]\nrole = decode\ntp_size = 2\ndevices = cpu,cpu\nkv_budget = 1536MiB\n"         \
    "transport = tcp\ndata_endpoint = tcp://127.0.0.1:7200\n"

static void test_dump_round_trip(void **state)
{
    const char *texts[] = {BASE, RICH};
    for (int t = 0; t < 2; t++) {
        duet_config *a = parse_ok(state, texts[t]);
        char *d1 = dump_text(a);
        duet_config *b = NULL;
        char err[ERRLEN];
        int rc = config_parse(d1, "dump.conf", &b, err, sizeof err);
        if (rc) fprintf(stderr, "%s\n--- dump:\n%s\n", err, d1);
        assert_int_equal(rc, 0);
        assert_int_equal(config_diff_reloadable(a, b, err, sizeof err), 0);
        assert_string_equal(err, ""); /* no key differs */
        char *d2 = dump_text(b);
        /* equal but for the source named in the first line */
        assert_string_equal(strchr(d1, '\n'), strchr(d2, '\n'));
        if (t == 1) {
            assert_string_equal(b->model.name, "served");
            assert_int_equal(b->daemon.client_buffer_bytes, 1000000);
            assert_int_equal(b->groups[0].kv_budget, (int64_t)3 << 30);
            assert_int_equal(b->groups[0].devices[0].index, 1);
            assert_int_equal(b->groups[1].kv_budget, (int64_t)1536 << 20);
            assert_non_null(strstr(d1, "\nkv_budget = 3GiB\n"));
            assert_non_null(strstr(d1, "\nkv_budget = 1536MiB\n"));
            assert_non_null(strstr(d1, "\ndevices = cuda:1,cuda:0\n"));
            assert_non_null(strstr(d1, "\n[group dec]\n"));
            assert_non_null(strstr(d1, "\n; heartbeat interval between duetd and workers, milliseconds (10..60000; default 1000; restart to change)\nheartbeat_ms = 250\n"));
        }
        free(d1);
        free(d2);
        config_free(&a);
        config_free(&b);
    }
}

static void test_doc(void **state)
{
    (void)state;
    char *text = NULL;
    size_t len = 0;
    FILE *m = open_memstream(&text, &len);
    assert_non_null(m);
    assert_int_equal(config_doc(m), 0);
    fclose(m);
    int rows = 0;
    for (const char *p = text; (p = strstr(p, "\n| [")); p++) rows++;
    assert_int_equal(rows, 5 + 13 + 9);
    assert_non_null(strstr(text, "| [daemon] | `dead_after` | integer | an integer in 3..5 | 4 | yes |"));
    assert_non_null(strstr(text, "| [model] | `path` | path | the path of a readable GGUF file | (required) | no |"));
    free(text);
}

static void test_reload_diff(void **state)
{
    duet_config *a = parse_ok(state, RICH);
    char err[ERRLEN];
    assert_int_equal(config_diff_reloadable(a, a, err, sizeof err), 0);
    assert_string_equal(err, "");
    assert_int_equal(config_diff_reloadable(NULL, a, err, sizeof err), -1);

    /* limits, timeouts, log level: reloadable */
    char *t = subst(state, RICH);
    char *u = NULL;
    assert_true(asprintf(&u, "%s", t) > 0);
    free(t);
    duet_config *b = NULL;
    {
        char *s1 = strstr(u, "log_level = warn");
        memcpy(s1, "log_level = info", 16);
        char *s2 = strstr(u, "request_timeout_ms = 0\n");
        memcpy(s2, "request_timeout_ms = 9\n", 23);
    }
    assert_int_equal(config_parse(u, "new.conf", &b, err, sizeof err), 0);
    assert_int_equal(config_diff_reloadable(a, b, err, sizeof err), 0);
    assert_string_equal(err, "[daemon] request_timeout_ms: 0 -> 9 (reloadable)\n"
                             "[daemon] log_level: warn -> info (reloadable)");
    config_free(&b);
    free(u);

    /* endpoints, model path, tp_size/devices, groups added and removed: restart */
    duet_config *c = parse_ok(state,
                              "[model]\npath = @M\nchat_style = phi3\nname = served\nmax_context = 8192\nkv_type = bf16\n"
                              "[daemon]\nclient_endpoint = tcp://0.0.0.0:9001\nworker_endpoint = ipc:///tmp/duet-w\n"
                              "heartbeat_ms = 250\ndead_after = 5\nqueue_limit = 10\nwhen_full = busy\n"
                              "max_prompt_tokens = 8000\nmax_tokens_default = 100\nmax_tokens_limit = 4000\n"
                              "client_buffer_bytes = 1000000\nrequest_timeout_ms = 0\nlog_level = warn\n"
                              "[group pre]\nrole = prefill\ntp_size = 1\ndevices = cuda:1\nthreads = 2\n"
                              "kv_budget = 3G\nmax_batch_tokens = 8192\nmax_seqs = 16\ntransport = nccl\n"
                              "[group dec2]\nrole = decode\n");
    int n = config_diff_reloadable(a, c, err, sizeof err);
    assert_string_equal(err, "[daemon] client_endpoint: tcp://0.0.0.0:9000 -> tcp://0.0.0.0:9001 (needs a restart)\n"
                             "[daemon] queue_limit: 0 -> 10 (reloadable)\n"
                             "[group pre] tp_size: 2 -> 1 (needs a restart)\n"
                             "[group pre] devices: cuda:1,cuda:0 -> cuda:1 (needs a restart)\n"
                             "[group dec]: removed (needs a restart)\n"
                             "[group dec2]: added (needs a restart)");
    assert_int_equal(n, 5);

    /* a new model file */
    char other[256];
    snprintf(other, sizeof other, "%s.gguf", fx(state)->model);
    FILE *f = fopen(other, "w");
    assert_non_null(f);
    fclose(f);
    char text[512];
    snprintf(text, sizeof text, "[model]\npath = %s\n[group main]\nrole = both\n", other);
    duet_config *d = NULL, *e = parse_ok(state, BASE);
    assert_int_equal(config_parse(text, "t.conf", &d, err, sizeof err), 0);
    assert_int_equal(config_diff_reloadable(e, d, err, sizeof err), 1);
    char want[1024];
    snprintf(want, sizeof want,
             "[model] path: %s -> %s (needs a restart)\n[model] name: tiny -> tiny.gguf (reloadable)",
             fx(state)->model, other);
    assert_string_equal(err, want);
    unlink(other);

    /* a short buffer truncates and still counts */
    char small[20];
    assert_int_equal(config_diff_reloadable(a, c, small, sizeof small), 5);
    assert_int_equal(strlen(small), sizeof small - 1);
    assert_int_equal(config_diff_reloadable(a, c, NULL, 0), 5);

    config_free(&a);
    config_free(&c);
    config_free(&d);
    config_free(&e);
}

static void test_enum_names(void **state)
{
    (void)state;
    assert_string_equal(config_role_name(CONFIG_ROLE_BOTH), "both");
    assert_string_equal(config_role_name((config_role)9), "?");
    assert_string_equal(config_transport_name(CONFIG_TRANSPORT_NCCL), "nccl");
    assert_string_equal(config_log_level_name(CONFIG_LOG_DEBUG), "debug");
    assert_string_equal(config_chat_name(CONFIG_CHAT_AUTO), "auto");
    assert_string_equal(config_chat_name(CONFIG_CHAT_LLAMA2), "llama2");
    assert_string_equal(config_when_full_name(CONFIG_FULL_BUSY), "busy");
    assert_string_equal(config_kv_type_name(DTYPE_I8), "int8");
    assert_string_equal(config_kv_type_name(DTYPE_Q4_0), "?");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_shipped_loads),
        cmocka_unit_test(test_shipped_documents_every_key),
        cmocka_unit_test(test_shipped_examples_load),
        cmocka_unit_test(test_minimal_defaults),
        cmocka_unit_test(test_syntax_variants),
        cmocka_unit_test(test_syntax_errors),
        cmocka_unit_test(test_bad_values),
        cmocka_unit_test(test_good_values),
        cmocka_unit_test(test_size_suffixes),
        cmocka_unit_test(test_unknown_keys),
        cmocka_unit_test(test_unknown_sections),
        cmocka_unit_test(test_duplicates),
        cmocka_unit_test(test_missing_required),
        cmocka_unit_test(test_cross_checks),
        cmocka_unit_test(test_error_bound),
        cmocka_unit_test(test_load_file),
        cmocka_unit_test(test_dump_round_trip),
        cmocka_unit_test(test_doc),
        cmocka_unit_test(test_reload_diff),
        cmocka_unit_test(test_enum_names),
    };
    return cmocka_run_group_tests_name("config", tests, setup, teardown);
}
