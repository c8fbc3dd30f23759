/* client/cli_net.c: `duet generate --endpoint`, `duet chat`, `duet status`, `duet health`. */
#include "client/cli_net.h"

#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "client/libduet.h"

#define MAX_STOPS 16
#define STATE_TIMEOUT_S 5.0 /* status, health: the whole call */
#define GEN_TIMEOUT_S 300.0 /* generate, chat: the longest silence between two replies */

/* Options shared by the network commands. */
typedef struct {
    const char *endpoint;
    double timeout_s;
    /* generate and chat */
    const char *prompt, *prompt_ids, *system, *session;
    int chat, n_predict, ignore_eos, print_ids, quiet, no_stats, no_stream, stats;
    const char *stops[MAX_STOPS];
    int n_stops;
    duet_sampling sp;
    int json; /* status, health */
} net_opts;

/* Set by SIGINT; the waits return DUET_E_INTERRUPTED and the command cancels. */
static volatile sig_atomic_t interrupted;

static void on_sigint(int sig)
{
    (void)sig;
    interrupted++;
}

/* SIGINT without SA_RESTART, so that a wait returns and the request can be cancelled. */
static void catch_sigint(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_sigint;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGINT, &sa, NULL);
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static const char *default_endpoint(void)
{
    const char *e = getenv(DUET_ENDPOINT_ENV);
    return e && *e ? e : DUET_DEFAULT_ENDPOINT;
}

static int timeout_ms(const net_opts *o)
{
    return o->timeout_s > 0 ? (int)(o->timeout_s * 1e3 + 0.5) : -1;
}

static int parse_int(const char *cmd, const char *opt, const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "duet %s: %s '%s' is not an integer in [%ld, %ld]\n", cmd, opt, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_num(const char *cmd, const char *opt, const char *s, double *out)
{
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || v != v) {
        fprintf(stderr, "duet %s: %s '%s' is not a number\n", cmd, opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* Connect, with the send timeout bounded by the command's timeout. */
static duet_client *connect_or_say(const char *cmd, const net_opts *o)
{
    duet_options dopt;
    duet_options_init(&dopt);
    int t = timeout_ms(o);
    if (t >= 0 && t < dopt.send_timeout_ms) dopt.send_timeout_ms = t;
    duet_client *c = NULL;
    duet_error err;
    if (duet_connect(o->endpoint, &dopt, &c, &err) != DUET_OK) {
        fprintf(stderr, "duet %s: %s\n", cmd, err.message);
        return NULL;
    }
    return c;
}

static void say_error(const char *cmd, const duet_error *e)
{
    fprintf(stderr, "duet %s: %s: %s", cmd, e->code_name, e->message);
    if (e->retry_after_ms) fprintf(stderr, " (retry after %d ms)", e->retry_after_ms);
    fprintf(stderr, "\n");
}

/* ---- generate and chat: options ------------------------------------------------------------ */

static void gen_usage(FILE *f, int chat)
{
    if (chat)
        fprintf(f, "usage: duet chat [--endpoint URL] [options]\n"
                   "\n"
                   "Reads your messages from stdin, one per line, and streams duetd's answers; the\n"
                   "conversation is one session, so duetd keeps its KV cache between turns.\n"
                   "Lines: /quit (or end of input) ends, /reset starts a new conversation.\n"
                   "\n"
                   "      --system TEXT       system message\n"
                   "      --session ID        session id [chat-PID-RANDOM]\n"
                   "      --stats             timings after each answer, on stderr\n");
    else
        fprintf(f, "usage: duet generate --endpoint URL -p PROMPT [options]\n"
                   "\n"
                   "Generates through duetd (without --endpoint and $DUET_ENDPOINT, or with -m,\n"
                   "`duet generate` runs the model in this process: duet generate -m MODEL --help).\n"
                   "\n"
                   "  -p, --prompt TEXT       the prompt (with --chat: the user's message)\n"
                   "      --prompt-ids LIST   the prompt as comma-separated token ids\n"
                   "      --chat              send the prompt as a chat message (duetd applies the template)\n"
                   "      --system TEXT       system message (with --chat)\n"
                   "      --session ID        session id: duetd keeps this conversation's KV cached\n"
                   "      --no-stream         one reply at the end instead of text as it comes\n");
    fprintf(f,
            "  -e, --endpoint URL      duetd's client endpoint [$DUET_ENDPOINT or %s]\n"
            "      --timeout S         give up when duetd is silent for S seconds; 0 waits forever [%.0f]\n"
            "  -n, --n-predict N       tokens to generate at most [%d]\n"
            "sampling (default greedy):\n"
            "      --temp T            temperature; 0 is greedy [0]\n"
            "      --top-k K           keep the K most likely tokens [40]\n"
            "      --top-p P           nucleus sampling mass [0.95]\n"
            "      --min-p P           drop tokens below P x the best probability [0.05]\n"
            "      --repeat-penalty R  penalty on recent tokens; 1 is off [1]\n"
            "      --repeat-last-n N   tokens the penalty looks back over [64]\n"
            "  -s, --seed S            sampling seed [drawn by duetd]\n"
            "      --stop STR          stop when STR appears (repeatable, up to %d)\n"
            "      --ignore-eos        do not stop at end-of-generation tokens\n",
            DUET_DEFAULT_ENDPOINT, GEN_TIMEOUT_S, chat ? 512 : 128, MAX_STOPS);
    if (!chat)
        fprintf(f, "output:\n"
                   "      --print-ids         print the generated token ids on stderr\n"
                   "      --no-stats          do not print timings\n"
                   "  -q, --quiet             print only the generated text\n");
}

/* Parse generate's (chat = 0) or chat's options. 0, or an exit status (-1: help shown). */
static int parse_gen(int argc, char **argv, int chat, net_opts *o)
{
    const char *cmd = chat ? "chat" : "generate";
    enum { O_CHAT = 256, O_SYSTEM, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_REP, O_REPN, O_STOP, O_IGN,
           O_IDS, O_PIDS, O_NOSTATS, O_SESSION, O_NOSTREAM, O_TIMEOUT, O_STATS, O_LOCAL };
    static const struct option lo[] = {
        {"endpoint", required_argument, 0, 'e'}, {"prompt", required_argument, 0, 'p'},
        {"n-predict", required_argument, 0, 'n'}, {"seed", required_argument, 0, 's'},
        {"quiet", no_argument, 0, 'q'}, {"help", no_argument, 0, 'h'},
        {"chat", no_argument, 0, O_CHAT}, {"system", required_argument, 0, O_SYSTEM},
        {"temp", required_argument, 0, O_TEMP}, {"top-k", required_argument, 0, O_TOPK},
        {"top-p", required_argument, 0, O_TOPP}, {"min-p", required_argument, 0, O_MINP},
        {"repeat-penalty", required_argument, 0, O_REP},
        {"repeat-last-n", required_argument, 0, O_REPN}, {"stop", required_argument, 0, O_STOP},
        {"ignore-eos", no_argument, 0, O_IGN}, {"print-ids", no_argument, 0, O_IDS},
        {"prompt-ids", required_argument, 0, O_PIDS}, {"no-stats", no_argument, 0, O_NOSTATS},
        {"session", required_argument, 0, O_SESSION}, {"no-stream", no_argument, 0, O_NOSTREAM},
        {"timeout", required_argument, 0, O_TIMEOUT}, {"stats", no_argument, 0, O_STATS},
        /* in-process options: a clear error instead of "unrecognized" */
        {"model", required_argument, 0, 'm'}, {"threads", required_argument, 0, O_LOCAL},
        {"ctx", required_argument, 0, O_LOCAL}, {"batch", required_argument, 0, O_LOCAL},
        {"kv-type", required_argument, 0, O_LOCAL}, {"chat-style", required_argument, 0, O_LOCAL},
        {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    o->endpoint = default_endpoint();
    o->timeout_s = GEN_TIMEOUT_S;
    o->n_predict = chat ? 512 : 128;
    duet_params p;
    duet_params_init(&p);
    o->sp = p.sampling;
    o->sp.temperature = 0; /* greedy, like the in-process `duet generate` */
    o->sp.repeat_penalty = 1;
    optind = 1;
    opterr = 1;
    int c;
    while ((c = getopt_long(argc, argv, "e:p:n:s:qhm:t:c:b:", lo, NULL)) != -1) {
        int ok = 0;
        switch (c) {
        case 'e': o->endpoint = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'n': ok = parse_int(cmd, "--n-predict", optarg, 1, 262144, &o->n_predict); break;
        case 's': {
            double v;
            ok = parse_num(cmd, "--seed", optarg, &v);
            if (!ok && (v < 0 || v > 9007199254740991.0 || v != (double)(int64_t)v)) {
                fprintf(stderr, "duet %s: --seed '%s' is not an integer in [0, 2^53 - 1]\n", cmd, optarg);
                ok = -1;
            }
            o->sp.seed = (int64_t)v;
            break;
        }
        case 'q': o->quiet = 1; break;
        case 'h': gen_usage(stdout, chat); return -1;
        case O_CHAT: o->chat = 1; break;
        case O_SYSTEM: o->system = optarg; break;
        case O_TEMP: ok = parse_num(cmd, "--temp", optarg, &o->sp.temperature); break;
        case O_TOPK: ok = parse_int(cmd, "--top-k", optarg, 0, 1 << 30, &o->sp.top_k); break;
        case O_TOPP: ok = parse_num(cmd, "--top-p", optarg, &o->sp.top_p); break;
        case O_MINP: ok = parse_num(cmd, "--min-p", optarg, &o->sp.min_p); break;
        case O_REP: ok = parse_num(cmd, "--repeat-penalty", optarg, &o->sp.repeat_penalty); break;
        case O_REPN: ok = parse_int(cmd, "--repeat-last-n", optarg, -1, 1 << 30, &o->sp.repeat_last_n); break;
        case O_STOP:
            if (o->n_stops == MAX_STOPS) {
                fprintf(stderr, "duet %s: more than %d --stop strings\n", cmd, MAX_STOPS);
                ok = -1;
            } else {
                o->stops[o->n_stops++] = optarg;
            }
            break;
        case O_IGN: o->ignore_eos = 1; break;
        case O_IDS: o->print_ids = 1; break;
        case O_PIDS: o->prompt_ids = optarg; break;
        case O_NOSTATS: o->no_stats = 1; break;
        case O_SESSION: o->session = optarg; break;
        case O_NOSTREAM: o->no_stream = 1; break;
        case O_STATS: o->stats = 1; break;
        case O_TIMEOUT:
            ok = parse_num(cmd, "--timeout", optarg, &o->timeout_s);
            if (!ok && (o->timeout_s < 0 || o->timeout_s > 2e6)) {
                fprintf(stderr, "duet %s: --timeout '%s' is not in [0, 2000000] seconds\n", cmd, optarg);
                ok = -1;
            }
            break;
        case 'm': case 't': case 'c': case 'b': case O_LOCAL:
            fprintf(stderr,
                    "duet %s: -m, --threads, --ctx, --batch, --kv-type and --chat-style are for "
                    "in-process generation; duetd (--endpoint %s) serves its own model\n",
                    cmd, o->endpoint);
            return 2;
        default: gen_usage(stderr, chat); return 2;
        }
        if (ok) return 2;
    }
    if (optind < argc) {
        fprintf(stderr, "duet %s: unexpected argument '%s'\n", cmd, argv[optind]);
        return 2;
    }
    if (!chat && !o->prompt == !o->prompt_ids) {
        fprintf(stderr, "duet generate: give -p PROMPT or --prompt-ids LIST (one of them)\n");
        return 2;
    }
    if (!chat && o->prompt_ids && o->chat) {
        fprintf(stderr, "duet generate: --chat needs -p PROMPT, not --prompt-ids\n");
        return 2;
    }
    return 0;
}

/* "1,2,3" into a new array. */
static int parse_ids(const char *s, int32_t **out, int *n_out)
{
    size_t cap = strlen(s) / 2 + 1;
    int32_t *ids = malloc(cap * sizeof *ids);
    int n = 0;
    if (!ids) return -1;
    const char *q = s;
    while (*q) {
        char *end;
        errno = 0;
        long v = strtol(q, &end, 10);
        if (end == q || errno || v < 0 || v > 2147483647L || (*end && *end != ',')) {
            fprintf(stderr, "duet generate: --prompt-ids: '%s' is not a comma-separated list of token ids\n", s);
            free(ids);
            return -1;
        }
        ids[n++] = (int32_t)v;
        q = *end ? end + 1 : end;
    }
    *out = ids;
    *n_out = n;
    return 0;
}

static void fill_params(const net_opts *o, duet_params *p)
{
    duet_params_init(p);
    p->sampling = o->sp;
    p->max_tokens = o->n_predict;
    p->stop = o->stops;
    p->n_stop = o->n_stops;
    p->ignore_eos = o->ignore_eos;
    p->stream = !o->no_stream;
    p->session = o->session;
}

/* One request, printed as it streams. Returns 0 when it ended with done (also cancelled
 * by SIGINT), 1 on an error; *res is the result, owned by *req_out. t_ttft: seconds
 * from the send to the first text on this side. */
static int run_request(const char *cmd, duet_client *c, const duet_params *p, const net_opts *o,
                       duet_request **req_out, const duet_result **res, double *t_ttft)
{
    duet_error err;
    *res = NULL;
    *t_ttft = 0;
    double t0 = now_s();
    if (duet_generate(c, p, req_out, &err) != DUET_OK) {
        say_error(cmd, &err);
        return 1;
    }
    duet_request *r = *req_out;
    int ended_line = 1;
    for (;;) {
        duet_event ev;
        duet_code rc = duet_next(r, timeout_ms(o), &ev, &err);
        if (rc == DUET_E_INTERRUPTED) {
            if (interrupted > 1) break; /* a second ^C: give up waiting */
            duet_cancel(r, NULL);
            continue;
        }
        if (rc != DUET_OK) {
            if (!ended_line) fputc('\n', stdout);
            fflush(stdout);
            say_error(cmd, &err);
            duet_cancel(r, NULL);
            return 1;
        }
        if (ev.kind == DUET_EVENT_DELTA) {
            if (*t_ttft == 0 && ev.n_token_ids) *t_ttft = now_s() - t0;
            if (ev.text_len) {
                fwrite(ev.text, 1, ev.text_len, stdout);
                fflush(stdout);
                ended_line = ev.text[ev.text_len - 1] == '\n';
            }
        } else if (ev.kind == DUET_EVENT_DONE) {
            *res = ev.result;
            if (*t_ttft == 0) *t_ttft = now_s() - t0;
            if (!p->stream) fwrite(ev.result->text, 1, ev.result->text_len, stdout);
            break;
        } else if (ev.kind == DUET_EVENT_ERROR) {
            if (!ended_line) fputc('\n', stdout);
            fflush(stdout);
            say_error(cmd, ev.error);
            return 1;
        }
    }
    if (!*res) { /* gave up after a second ^C */
        fputc('\n', stdout);
        fflush(stdout);
        fprintf(stderr, "duet %s: interrupted\n", cmd);
        return 1;
    }
    return 0;
}

static void print_stats(const duet_result *res, double t_ttft, const char *endpoint)
{
    const duet_usage *u = &res->usage;
    const duet_timings *t = &res->timings;
    fprintf(stderr,
            "\nprompt %d tokens (%d cached), generated %d (finish: %s)\n"
            "TTFT %.1f ms | decode %.1f tokens/s | queue %.1f ms | total %.1f ms | retries %d "
            "(duetd at %s; TTFT here %.1f ms)\n",
            u->prompt_tokens, u->cached_prompt_tokens, u->completion_tokens,
            duet_finish_name(res->finish_reason), t->ttft_ms,
            t->tpot_ms_mean > 0 ? 1e3 / t->tpot_ms_mean : 0.0, t->queue_ms, t->total_ms, u->retries,
            endpoint, t_ttft * 1e3);
}

/* ---- generate ---------------------------------------------------------------------------------- */

int cli_net_generate_wanted(int argc, char **argv)
{
    /* Options of either generate that take an argument, so that their values are skipped. */
    static const char *const with_arg[] = {"-m", "--model", "-p", "--prompt", "-n", "--n-predict",
                                           "-t", "--threads", "-c", "--ctx", "-b", "--batch", "-s",
                                           "--seed", "--system", "--chat-style", "--kv-type", "--temp",
                                           "--top-k", "--top-p", "--min-p", "--repeat-penalty",
                                           "--repeat-last-n", "--stop", "--prompt-ids", "--session",
                                           "--timeout", NULL};
    int model = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "--") == 0) break;
        if (strcmp(a, "-e") == 0 || strcmp(a, "--endpoint") == 0 || strncmp(a, "--endpoint=", 11) == 0 ||
            (strncmp(a, "-e", 2) == 0 && a[2]))
            return 1;
        if (strcmp(a, "-m") == 0 || strcmp(a, "--model") == 0 || strncmp(a, "--model=", 8) == 0 ||
            (strncmp(a, "-m", 2) == 0 && a[2]))
            model = 1;
        for (int k = 0; with_arg[k]; k++)
            if (strcmp(a, with_arg[k]) == 0) {
                i++;
                break;
            }
    }
    const char *env = getenv(DUET_ENDPOINT_ENV);
    return !model && env && *env;
}

int cli_net_generate_main(int argc, char **argv)
{
    net_opts o;
    int rc = parse_gen(argc, argv, 0, &o);
    if (rc) return rc < 0 ? 0 : rc;
    duet_params p;
    fill_params(&o, &p);
    duet_message msgs[2];
    int32_t *ids = NULL;
    if (o.prompt_ids) {
        if (parse_ids(o.prompt_ids, &ids, &p.n_tokens) != 0) return 2;
        p.tokens = ids;
    } else if (o.chat) {
        int n = 0;
        if (o.system) msgs[n++] = (duet_message){"system", o.system};
        msgs[n++] = (duet_message){"user", o.prompt};
        p.messages = msgs;
        p.n_messages = n;
    } else {
        p.prompt = o.prompt;
    }
    duet_client *c = connect_or_say("generate", &o);
    if (!c) {
        free(ids);
        return 1;
    }
    catch_sigint();
    duet_request *r = NULL;
    const duet_result *res = NULL;
    double t_ttft;
    int status = run_request("generate", c, &p, &o, &r, &res, &t_ttft);
    if (status == 0) {
        printf("\n");
        fflush(stdout);
        if (o.print_ids) {
            fprintf(stderr, "generated ids:");
            for (int i = 0; i < res->n_token_ids; i++) fprintf(stderr, "%s%d", i ? "," : " ", res->token_ids[i]);
            fprintf(stderr, "\n");
        }
        if (!o.quiet && !o.no_stats) print_stats(res, t_ttft, o.endpoint);
    }
    duet_request_free(&r);
    duet_destroy(&c);
    free(ids);
    return status;
}

/* ---- chat -------------------------------------------------------------------------------------- */

typedef struct {
    duet_message *m; /* [n] roles static, contents owned */
    int n, cap;
} history;

static int history_add(history *h, const char *role, const char *content, size_t len)
{
    if (h->n == h->cap) {
        int cap = h->cap ? h->cap * 2 : 16;
        duet_message *m = realloc(h->m, (size_t)cap * sizeof *m);
        if (!m) return -1;
        h->m = m;
        h->cap = cap;
    }
    char *s = malloc(len + 1);
    if (!s) return -1;
    memcpy(s, content, len);
    s[len] = '\0';
    h->m[h->n++] = (duet_message){role, s};
    return 0;
}

static void history_trim(history *h, int n)
{
    while (h->n > n) free((char *)h->m[--h->n].content);
}

static void new_session(char *buf, size_t size)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    unsigned long x = (unsigned long)ts.tv_nsec ^ ((unsigned long)ts.tv_sec << 20) ^ (unsigned long)getpid() << 8;
    snprintf(buf, size, "chat-%ld-%lx", (long)getpid(), x & 0xffffffffUL);
}

int cli_net_chat_main(int argc, char **argv)
{
    net_opts o;
    int rc = parse_gen(argc, argv, 1, &o);
    if (rc) return rc < 0 ? 0 : rc;
    if (o.prompt || o.prompt_ids || o.chat) {
        fprintf(stderr, "duet chat: -p, --prompt-ids and --chat are for `duet generate`; type your messages on stdin\n");
        return 2;
    }
    char session[64];
    if (o.session)
        snprintf(session, sizeof session, "%s", o.session);
    else
        new_session(session, sizeof session);
    duet_client *c = connect_or_say("chat", &o);
    if (!c) return 1;
    catch_sigint();
    int tty = isatty(STDIN_FILENO);
    if (tty)
        fprintf(stderr, "duet chat with %s (session %s); /quit to end, /reset to start over\n", o.endpoint,
                session);
    history h = {0};
    int status = 0;
    if (o.system && history_add(&h, "system", o.system, strlen(o.system)) != 0) goto oom;
    int base = h.n;
    char *line = NULL;
    size_t cap = 0;
    for (;;) {
        if (tty) {
            printf("> ");
            fflush(stdout);
        }
        interrupted = 0;
        ssize_t n = getline(&line, &cap, stdin);
        if (n < 0) break; /* end of input, or ^C at the prompt */
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = '\0';
        if (n == 0) continue;
        if (strcmp(line, "/quit") == 0 || strcmp(line, "/exit") == 0) break;
        if (strcmp(line, "/reset") == 0) {
            history_trim(&h, base);
            new_session(session, sizeof session);
            if (tty) fprintf(stderr, "(new conversation, session %s)\n", session);
            continue;
        }
        int before = h.n;
        if (history_add(&h, "user", line, (size_t)n) != 0) goto oom;
        duet_params p;
        fill_params(&o, &p);
        p.messages = h.m;
        p.n_messages = h.n;
        p.session = session;
        duet_request *r = NULL;
        const duet_result *res = NULL;
        double t_ttft;
        if (run_request("chat", c, &p, &o, &r, &res, &t_ttft) != 0) {
            status = 1;
            history_trim(&h, before); /* the turn failed: forget it */
        } else {
            printf("\n");
            fflush(stdout);
            if (o.stats) print_stats(res, t_ttft, o.endpoint);
            if (history_add(&h, "assistant", res->text, res->text_len) != 0) {
                duet_request_free(&r);
                goto oom;
            }
        }
        duet_request_free(&r);
    }
    goto done;
oom:
    fprintf(stderr, "duet chat: out of memory\n");
    status = 1;
done:
    free(line);
    history_trim(&h, 0);
    free(h.m);
    duet_destroy(&c);
    return status;
}

/* ---- status and health ----------------------------------------------------------------------- */

static void state_usage(FILE *f, const char *cmd)
{
    fprintf(f,
            "usage: duet %s [--endpoint URL] [--json] [--timeout S]\n"
            "\n"
            "%s"
            "  -e, --endpoint URL  duetd's client endpoint [$DUET_ENDPOINT or %s]\n"
            "      --json          print duetd's reply as JSON\n"
            "      --timeout S     wait at most S seconds [%.0f]\n",
            cmd,
            strcmp(cmd, "status") == 0
                ? "Prints the cluster's state: groups, workers, KV cache, queue, transfers.\n\n"
                : "Prints whether duetd can serve requests now; exit status 0 when it can, 1 when\n"
                  "it cannot or does not answer.\n\n",
            DUET_DEFAULT_ENDPOINT, STATE_TIMEOUT_S);
}

static int parse_state(int argc, char **argv, const char *cmd, net_opts *o)
{
    static const struct option lo[] = {{"endpoint", required_argument, 0, 'e'},
                                        {"json", no_argument, 0, 'j'},
                                        {"timeout", required_argument, 0, 'T'},
                                        {"help", no_argument, 0, 'h'},
                                        {0, 0, 0, 0}};
    memset(o, 0, sizeof *o);
    o->endpoint = default_endpoint();
    o->timeout_s = STATE_TIMEOUT_S;
    optind = 1;
    opterr = 1;
    int c;
    while ((c = getopt_long(argc, argv, "e:h", lo, NULL)) != -1) {
        switch (c) {
        case 'e': o->endpoint = optarg; break;
        case 'j': o->json = 1; break;
        case 'T':
            if (parse_num(cmd, "--timeout", optarg, &o->timeout_s) || o->timeout_s <= 0 || o->timeout_s > 2e6) {
                fprintf(stderr, "duet %s: --timeout must be in (0, 2000000] seconds\n", cmd);
                return 2;
            }
            break;
        case 'h': state_usage(stdout, cmd); return -1;
        default: state_usage(stderr, cmd); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "duet %s: unexpected argument '%s'\n", cmd, argv[optind]);
        return 2;
    }
    return 0;
}

static void print_json(const json_t *j)
{
    char *s = json_dumps(j, JSON_INDENT(2) | JSON_PRESERVE_ORDER);
    if (s) printf("%s\n", s);
    free(s);
}

static void fmt_uptime(double s, char *buf, size_t size)
{
    long t = (long)s;
    if (t >= 86400)
        snprintf(buf, size, "%ldd %02ldh %02ldm", t / 86400, t / 3600 % 24, t / 60 % 60);
    else if (t >= 3600)
        snprintf(buf, size, "%ldh %02ldm %02lds", t / 3600, t / 60 % 60, t % 60);
    else
        snprintf(buf, size, "%ldm %02lds", t / 60, t % 60);
}

static void fmt_bytes(double b, char *buf, size_t size)
{
    const char *unit[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    int u = 0;
    while (b >= 1024 && u < 4) {
        b /= 1024;
        u++;
    }
    snprintf(buf, size, u ? "%.1f %s" : "%.0f %s", b, unit[u]);
}

/* Field helpers for a reply already checked against its schema. */
static json_t *jo(const json_t *o, const char *k) { return json_object_get(o, k); }
static long long ji(const json_t *o, const char *k) { return (long long)json_number_value(jo(o, k)); }
static double jd(const json_t *o, const char *k) { return json_number_value(jo(o, k)); }
static const char *js(const json_t *o, const char *k)
{
    const char *s = json_string_value(jo(o, k));
    return s ? s : "-";
}

static void print_status(const json_t *j, const char *endpoint)
{
    char up[32], bytes[32];
    fmt_uptime(jd(j, "uptime_s"), up, sizeof up);
    const char *sha = json_string_value(jo(j, "model_sha256"));
    printf("duetd at %s: %s, up %s\n", endpoint, js(j, "version"), up);
    printf("model      %s%s%.12s%s\n", js(j, "model"), sha ? " (sha256 " : "", sha ? sha : "", sha ? "...)" : "");
    const json_t *q = jo(j, "queue"), *rq = jo(j, "requests"), *kv = jo(j, "kv"), *pc = jo(j, "prefix_cache"),
                 *tr = jo(j, "transfers");
    printf("requests   %lld running, %lld waiting (limit %lld); served %lld, failed %lld, cancelled %lld, "
           "retried %lld\n",
           ji(q, "running"), ji(q, "waiting"), ji(q, "limit"), ji(rq, "served"), ji(rq, "failed"),
           ji(rq, "cancelled"), ji(rq, "retried"));
    printf("KV         %lld of %lld blocks used (%.1f%%), %lld cached\n", ji(kv, "blocks_used"),
           ji(kv, "blocks_total"), 100 * jd(kv, "use"), ji(kv, "blocks_cached"));
    printf("prefixes   %.1f%% of prompt tokens from the cache (%lld of %lld)\n", 100 * jd(pc, "hit_rate"),
           ji(pc, "cached_tokens"), ji(pc, "prompt_tokens"));
    fmt_bytes(jd(tr, "bytes"), bytes, sizeof bytes);
    printf("transfers  %lld done, %lld failed, %lld in flight; %s moved; mean %.1f ms, max %.1f ms\n",
           ji(tr, "completed"), ji(tr, "failed"), ji(tr, "in_flight"), bytes, jd(tr, "mean_ms"), jd(tr, "max_ms"));
    const json_t *groups = jo(j, "groups"), *workers = jo(j, "workers"), *g, *w;
    size_t i;
    printf("\n%-6s %-8s %3s %6s %8s %8s %14s %8s\n", "GROUP", "ROLE", "TP", "ALIVE", "RUNNING", "WAITING",
           "KV FREE/TOTAL", "CACHED");
    json_array_foreach(groups, i, g) {
        char kvs[48];
        snprintf(kvs, sizeof kvs, "%lld/%lld", ji(g, "kv_blocks_free"), ji(g, "kv_blocks_total"));
        printf("%-6lld %-8s %3lld %6lld %8lld %8lld %14s %8lld\n", ji(g, "group"), js(g, "role"), ji(g, "tp_size"),
               ji(g, "workers_alive"), ji(g, "running"), ji(g, "waiting"), kvs, ji(g, "kv_blocks_cached"));
    }
    if (json_array_size(groups) == 0) printf("(no groups)\n");
    printf("\n%-20s %4s %5s %3s %-8s %-9s %-22s %9s %8s\n", "WORKER", "RANK", "GROUP", "TP", "ROLE", "STATE",
           "DEVICE", "SEEN", "KV CAP");
    json_array_foreach(workers, i, w) {
        char seen[32];
        snprintf(seen, sizeof seen, "%lld ms", ji(w, "last_seen_ms"));
        printf("%-20s %4lld %5lld %3lld %-8s %-9s %-22.22s %9s %8lld\n", js(w, "worker_id"), ji(w, "rank"),
               ji(w, "group"), ji(w, "tp_rank"), js(w, "role"), js(w, "state"), js(w, "device"), seen,
               ji(w, "kv_capacity_blocks"));
    }
    if (json_array_size(workers) == 0) printf("(no workers)\n");
}

int cli_net_status_main(int argc, char **argv)
{
    net_opts o;
    int rc = parse_state(argc, argv, "status", &o);
    if (rc) return rc < 0 ? 0 : rc;
    duet_client *c = connect_or_say("status", &o);
    if (!c) return 1;
    json_t *j = NULL;
    duet_error err;
    int status = 0;
    if (duet_status(c, timeout_ms(&o), &j, &err) != DUET_OK) {
        say_error("status", &err);
        status = 1;
    } else if (o.json) {
        print_json(j);
    } else {
        print_status(j, o.endpoint);
    }
    json_decref(j);
    duet_destroy(&c);
    return status;
}

int cli_net_health_main(int argc, char **argv)
{
    net_opts o;
    int rc = parse_state(argc, argv, "health", &o);
    if (rc) return rc < 0 ? 0 : rc;
    duet_client *c = connect_or_say("health", &o);
    if (!c) return 1;
    json_t *j = NULL;
    duet_health_info h;
    duet_error err;
    int status;
    if (duet_health(c, timeout_ms(&o), &h, &j, &err) != DUET_OK) {
        say_error("health", &err);
        status = 1;
    } else {
        status = h.ok ? 0 : 1;
        if (o.json) {
            print_json(j);
        } else {
            char up[32];
            fmt_uptime(h.uptime_s, up, sizeof up);
            printf("%s: %s, %d group%s ready, %d worker%s alive, up %s\n", h.ok ? "ok" : "NOT OK", h.state,
                   h.groups_ready, h.groups_ready == 1 ? "" : "s", h.workers_alive, h.workers_alive == 1 ? "" : "s",
                   up);
        }
    }
    json_decref(j);
    duet_destroy(&c);
    return status;
}
