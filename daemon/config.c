/* daemon/config.c: the configuration table, and loading, checking, dumping and
 * diffing through it. libinih parses the INI syntax; this file sees each line as
 * libinih's reader (to count lines, reject over-long ones, and learn section headers,
 * which libinih does not report) and each "key = value" pair as its handler. */
#include "daemon/config.h"

#include <ctype.h>
#include <errno.h>
#include <ini.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define MAX_VALUE 160     /* longest text value: a dumped "key = value" line stays under CONFIG_MAX_LINE */
#define MAX_GROUP_NAME 32 /* longest NAME in [group NAME] */
#define MAX_SECTIONS (CONFIG_MAX_GROUPS + 16)

/* ---- enums ------------------------------------------------------------------------- */

typedef struct {
    const char *const *names; /* [n] as written in the file */
    const int *values;        /* [n] C values */
    int n;
} enum_def;

#define ENUM_DEF(id, ...)                                                                    \
    static const char *const id##_names[] = {__VA_ARGS__};                                 \
    static const enum_def id = {id##_names, id##_values,                                   \
                                (int)(sizeof id##_names / sizeof id##_names[0])}

static const int chat_values[] = {CONFIG_CHAT_AUTO, CONFIG_CHAT_CHATML, CONFIG_CHAT_LLAMA2,
                                  CONFIG_CHAT_LLAMA3, CONFIG_CHAT_PHI3};
ENUM_DEF(chat, "auto", "chatml", "llama2", "llama3", "phi3");
static const int kv_values[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8};
ENUM_DEF(kv, "f32", "f16", "bf16", "int8");
static const int full_values[] = {CONFIG_FULL_WAIT, CONFIG_FULL_BUSY};
ENUM_DEF(full, "wait", "busy");
static const int loglvl_values[] = {CONFIG_LOG_ERROR, CONFIG_LOG_WARN, CONFIG_LOG_INFO,
                                 CONFIG_LOG_DEBUG};
ENUM_DEF(loglvl, "error", "warn", "info", "debug");
static const int role_values[] = {CONFIG_ROLE_PREFILL, CONFIG_ROLE_DECODE, CONFIG_ROLE_BOTH};
ENUM_DEF(role, "prefill", "decode", "both");
static const int transport_values[] = {CONFIG_TRANSPORT_TCP, CONFIG_TRANSPORT_MPI,
                                       CONFIG_TRANSPORT_NCCL};
ENUM_DEF(transport, "tcp", "mpi", "nccl");

/* Enum fields are stored as int. */
_Static_assert(sizeof(config_chat) == sizeof(int), "enum size");
_Static_assert(sizeof(dtype_t) == sizeof(int), "enum size");
_Static_assert(sizeof(config_role) == sizeof(int), "enum size");

static const char *enum_name(const enum_def *e, int v)
{
    for (int i = 0; i < e->n; i++)
        if (e->values[i] == v) return e->names[i];
    return "?";
}

const char *config_role_name(config_role r) { return enum_name(&role, (int)r); }
const char *config_transport_name(config_transport t) { return enum_name(&transport, (int)t); }
const char *config_log_level_name(config_log_level l) { return enum_name(&loglvl, (int)l); }
const char *config_chat_name(config_chat c) { return enum_name(&chat, (int)c); }
const char *config_when_full_name(config_when_full w) { return enum_name(&full, (int)w); }
const char *config_kv_type_name(dtype_t t) { return enum_name(&kv, (int)t); }

/* ---- the table --------------------------------------------------------------------- */

typedef enum { SEC_MODEL, SEC_DAEMON, SEC_GROUP, SEC_UNKNOWN } sec_kind;
static const char *const sec_names[] = {"model", "daemon", "group NAME"};

typedef enum {
    T_STR,      /* text (empty only where the default is empty) */
    T_PATH,     /* text naming a readable regular file */
    T_ENDPOINT, /* ZeroMQ endpoint: tcp://HOST:PORT, ipc://PATH, inproc://NAME */
    T_DATA_EP,  /* tcp://HOST:PORT or empty */
    T_INT,      /* integer in [lo, hi], stored as int */
    T_BYTES,    /* byte count with an optional binary suffix, in [lo, hi], stored as int64_t */
    T_ENUM,     /* one of en's names, stored as int */
    T_DEVICES,  /* cpu | cuda:N list, stored in config_group.devices/n_devices */
} ptype;

typedef struct {
    sec_kind sec;
    const char *key;
    ptype type;
    const char *def; /* default as written in the file; NULL: required */
    int64_t lo, hi;  /* T_INT, T_BYTES */
    const enum_def *en;
    int reloadable; /* 1: a reload may change it */
    size_t off;     /* of the field in config_model, config_daemon or config_group */
    const char *doc;
} param;

#define KI ((int64_t)1 << 10)
#define MI ((int64_t)1 << 20)
#define GI ((int64_t)1 << 30)
#define TI ((int64_t)1 << 40)
#define M_(f) offsetof(config_model, f)
#define D_(f) offsetof(config_daemon, f)
#define G_(f) offsetof(config_group, f)

static const param params[] = {
    {SEC_MODEL, "path", T_PATH, NULL, 0, 0, NULL, 0, M_(path),
     "GGUF model file (weights, tokenizer, chat template), relative to the working directory"},
    {SEC_MODEL, "chat_style", T_ENUM, "auto", 0, 0, &chat, 1, M_(chat_style),
     "chat template family; auto: recognise it from the model's template"},
    {SEC_MODEL, "name", T_STR, "", 0, 0, NULL, 1, M_(name),
     "model name served to clients; empty: the file's name without .gguf"},
    {SEC_MODEL, "max_context", T_INT, "0", 0, 1 << 20, NULL, 0, M_(max_context),
     "tokens per sequence (prompt and output); 0: the model's trained context"},
    {SEC_MODEL, "kv_type", T_ENUM, "f16", 0, 0, &kv, 0, M_(kv_type),
     "element type of the KV cache"},

    {SEC_DAEMON, "client_endpoint", T_ENDPOINT, "tcp://127.0.0.1:7070", 0, 0, NULL, 0,
     D_(client_endpoint), "ZeroMQ endpoint duetd binds for clients"},
    {SEC_DAEMON, "worker_endpoint", T_ENDPOINT, "tcp://127.0.0.1:7071", 0, 0, NULL, 0,
     D_(worker_endpoint), "ZeroMQ endpoint duetd binds for workers"},
    {SEC_DAEMON, "heartbeat_ms", T_INT, "1000", 10, 60000, NULL, 0, D_(heartbeat_ms),
     "heartbeat interval between duetd and workers, milliseconds"},
    {SEC_DAEMON, "dead_after", T_INT, "4", 3, 5, NULL, 1, D_(dead_after),
     "heartbeats missed before a peer counts as dead"},
    {SEC_DAEMON, "queue_limit", T_INT, "256", 0, 1000000, NULL, 1, D_(queue_limit),
     "requests that may wait for room before new ones are answered busy"},
    {SEC_DAEMON, "when_full", T_ENUM, "wait", 0, 0, &full, 1, D_(when_full),
     "when every group is full: wait in the queue, or answer busy at once"},
    {SEC_DAEMON, "max_prompt_tokens", T_INT, "0", 0, 1 << 20, NULL, 1, D_(max_prompt_tokens),
     "longest prompt accepted, tokens; 0: the context length"},
    {SEC_DAEMON, "max_tokens_default", T_INT, "256", 1, 1 << 20, NULL, 1,
     D_(max_tokens_default), "max_tokens of a request that sets none"},
    {SEC_DAEMON, "max_tokens_limit", T_INT, "0", 0, 1 << 20, NULL, 1, D_(max_tokens_limit),
     "largest max_tokens a request may ask for; 0: the context length"},
    {SEC_DAEMON, "client_buffer_bytes", T_BYTES, "16MiB", 64 * KI, 64 * GI, NULL, 1,
     D_(client_buffer_bytes),
     "output buffered for a slow client beyond which its request is cancelled"},
    {SEC_DAEMON, "request_timeout_ms", T_INT, "600000", 0, 86400000, NULL, 1,
     D_(request_timeout_ms), "longest life of a request, milliseconds; 0: no limit"},
    {SEC_DAEMON, "transfer_lease_ms", T_INT, "30000", 10, 3600000, NULL, 1, D_(transfer_lease_ms),
     "disaggregated groups: how long a KV transfer may go without progress, milliseconds"},
    {SEC_DAEMON, "log_level", T_ENUM, "info", 0, 0, &loglvl, 1, D_(log_level),
     "least severe message logged"},

    {SEC_GROUP, "role", T_ENUM, NULL, 0, 0, &role, 0, G_(role),
     "prefill (prompts, ships KV), decode (generates), or both (colocated)"},
    {SEC_GROUP, "tp_size", T_INT, "1", 1, CONFIG_MAX_TP, NULL, 0, G_(tp_size),
     "tensor-parallel size: workers in the group, one per device"},
    {SEC_GROUP, "devices", T_DEVICES, "cpu", 0, 0, NULL, 0, G_(devices),
     "one device per TP rank: cpu, or cuda:N (e.g. cuda:0,cuda:1; cpu,cpu)"},
    {SEC_GROUP, "threads", T_INT, "0", 0, 1024, NULL, 0, G_(threads),
     "CPU threads per worker; 0: one per core"},
    {SEC_GROUP, "kv_budget", T_BYTES, "256MiB", MI, 16 * TI, NULL, 0, G_(kv_budget),
     "bytes of KV cache per worker"},
    {SEC_GROUP, "max_batch_tokens", T_INT, "512", 1, 1 << 20, NULL, 0, G_(max_batch_tokens),
     "tokens in one scheduler step (prompt chunks and decode tokens)"},
    {SEC_GROUP, "max_seqs", T_INT, "64", 1, 65536, NULL, 0, G_(max_seqs),
     "sequences in one batch"},
    {SEC_GROUP, "transport", T_ENUM, "tcp", 0, 0, &transport, 0, G_(transport),
     "data plane: tcp (ZeroMQ, host memory), mpi (under mpirun), nccl (cuda devices)"},
    {SEC_GROUP, "data_endpoint", T_DATA_EP, "", 0, 0, NULL, 0, G_(data_endpoint),
     "tcp only: base endpoint tcp://HOST:PORT, rank r uses PORT+r; empty: any free port"},
};
#define N_PARAMS ((int)(sizeof params / sizeof params[0]))

/* ---- errors ------------------------------------------------------------------------ */

typedef struct {
    sec_kind kind;
    char *name;     /* group NAME (owned); NULL for model/daemon/unknown */
    int line;       /* of the header */
    bool bad;       /* unknown, invalid or duplicate: its keys are ignored */
    int group;      /* index into cfg->groups, or -1 */
    int key_line[N_PARAMS]; /* line where each key was set; 0: default */
    bool key_bad[N_PARAMS]; /* the value was rejected */
} section;

typedef enum { LINE_BLANK, LINE_HEADER, LINE_KEY } line_kind;

typedef struct {
    const char *file;   /* for messages */
    const char *text;   /* whole input */
    size_t len, pos;    /* input length, read position */
    int lineno;         /* lines handed to libinih */
    line_kind last_kind;
    int handled_line;   /* last line the handler saw */
    int max_line;       /* longest line accepted */

    duet_config *cfg;
    section *secs;      /* [n_secs] */
    int n_secs;
    section *cur;       /* the section being read; NULL before the first header */
    section skip;       /* current after a header that could not be registered */
    int group_headers;  /* [group ...] headers seen, valid or not */

    struct {
        int line;       /* 0: about the whole file */
        char *msg;      /* owned */
    } errs[CONFIG_MAX_ERRORS]; /* the first errors found */
    int n_err;
    bool oom;
} ctx;

static void add_err(ctx *c, int line, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void add_err(ctx *c, int line, const char *fmt, ...)
{
    c->n_err++;
    if (c->n_err > CONFIG_MAX_ERRORS || c->oom) return;
    char msg[1024];
    int k = line > 0 ? snprintf(msg, sizeof msg, "%s:%d: ", c->file, line)
                     : snprintf(msg, sizeof msg, "%s: ", c->file);
    if (k < 0 || (size_t)k >= sizeof msg) k = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg + k, sizeof msg - (size_t)k, fmt, ap);
    va_end(ap);
    char *m = strdup(msg);
    if (!m) {
        c->oom = true;
        return;
    }
    c->errs[c->n_err - 1].line = line;
    c->errs[c->n_err - 1].msg = m;
}

/* "[model]", "[group main]" */
static void sec_label(const section *s, char *buf, size_t n)
{
    if (s->kind == SEC_GROUP)
        snprintf(buf, n, "[group %s]", s->name ? s->name : "?");
    else
        snprintf(buf, n, "[%s]", s->kind < SEC_UNKNOWN ? sec_names[s->kind] : "?");
}

static void fmt_bytes(int64_t v, char *buf, size_t n)
{
    static const struct {
        int64_t mul;
        const char *suf;
    } u[] = {{TI, "TiB"}, {GI, "GiB"}, {MI, "MiB"}, {KI, "KiB"}};
    for (size_t i = 0; i < sizeof u / sizeof u[0]; i++)
        if (v != 0 && v % u[i].mul == 0) {
            snprintf(buf, n, "%lld%s", (long long)(v / u[i].mul), u[i].suf);
            return;
        }
    snprintf(buf, n, "%lld", (long long)v);
}

/* What a valid value of p looks like, for "(expected ...)". */
static void expected(const param *p, char *buf, size_t n)
{
    char lo[32], hi[32];
    switch (p->type) {
    case T_STR:
        snprintf(buf, n, "%s text of at most %d characters", p->def && !*p->def ? "a" : "a non-empty",
                 MAX_VALUE);
        break;
    case T_PATH: snprintf(buf, n, "the path of a readable GGUF file"); break;
    case T_ENDPOINT:
        snprintf(buf, n, "a ZeroMQ endpoint: tcp://HOST:PORT, ipc://PATH or inproc://NAME");
        break;
    case T_DATA_EP: snprintf(buf, n, "tcp://HOST:PORT, or empty for any free port"); break;
    case T_INT:
        snprintf(buf, n, "an integer in %lld..%lld", (long long)p->lo, (long long)p->hi);
        break;
    case T_BYTES:
        fmt_bytes(p->lo, lo, sizeof lo);
        fmt_bytes(p->hi, hi, sizeof hi);
        snprintf(buf, n, "a size in %s..%s, in bytes or with a suffix K, M, G, T, KiB, MiB, GiB, TiB",
                 lo, hi);
        break;
    case T_ENUM: {
        size_t k = (size_t)snprintf(buf, n, "one of ");
        for (int i = 0; i < p->en->n && k < n; i++)
            k += (size_t)snprintf(buf + k, n - k, "%s%s", i ? "|" : "", p->en->names[i]);
        break;
    }
    case T_DEVICES:
        snprintf(buf, n, "cpu or cuda:N for each TP rank, comma-separated, e.g. cuda:0,cuda:1");
        break;
    }
}

/* ---- suggestions ------------------------------------------------------------------- */

/* Optimal string alignment distance (Levenshtein plus adjacent transpositions), case-
 * insensitive; strings longer than 63 characters are compared by their first 63. */
static int edit_distance(const char *a, const char *b)
{
    enum { N = 64 };
    int la = (int)strnlen(a, N - 1), lb = (int)strnlen(b, N - 1);
    int d[N][N];
    for (int i = 0; i <= la; i++) d[i][0] = i;
    for (int j = 0; j <= lb; j++) d[0][j] = j;
    for (int i = 1; i <= la; i++)
        for (int j = 1; j <= lb; j++) {
            int ca = tolower((unsigned char)a[i - 1]), cb = tolower((unsigned char)b[j - 1]);
            int cost = ca != cb;
            int v = d[i - 1][j] + 1;
            if (d[i][j - 1] + 1 < v) v = d[i][j - 1] + 1;
            if (d[i - 1][j - 1] + cost < v) v = d[i - 1][j - 1] + cost;
            if (i > 1 && j > 1 && ca == tolower((unsigned char)b[j - 2]) &&
                tolower((unsigned char)a[i - 2]) == cb && d[i - 2][j - 2] + 1 < v)
                v = d[i - 2][j - 2] + 1;
            d[i][j] = v;
        }
    return d[la][lb];
}

/* Whether word is close enough to candidate to suggest it. */
static int close_enough(const char *word, const char *cand)
{
    int len = (int)strlen(cand);
    int limit = len <= 4 ? 1 : len <= 8 ? 2 : 3;
    return edit_distance(word, cand) <= limit;
}

/* The candidate closest to word within close_enough, or NULL. */
static const char *closest(const char *word, const char *const *cands, int n)
{
    const char *best = NULL;
    int bd = 1 << 30;
    for (int i = 0; i < n; i++) {
        if (!close_enough(word, cands[i])) continue;
        int d = edit_distance(word, cands[i]);
        if (d < bd) {
            bd = d;
            best = cands[i];
        }
    }
    return best;
}

/* ---- value parsing ----------------------------------------------------------------- */

static void *field(const param *p, void *base) { return (char *)base + p->off; }
static const void *cfield(const param *p, const void *base) { return (const char *)base + p->off; }

static int parse_int64(const char *s, int64_t *out, const char **end)
{
    errno = 0;
    char *e;
    long long v = strtoll(s, &e, 10);
    *end = e;
    if (e == s || !isdigit((unsigned char)e[-1])) return -1;
    if (errno == ERANGE) return -2;
    *out = v;
    return 0;
}

/* A byte count: digits, optional blanks, optional binary suffix. */
static int parse_bytes(const char *s, int64_t *out, char *why, size_t whylen)
{
    int64_t v;
    const char *e;
    int r = *s == '-' || *s == '+' ? -1 : parse_int64(s, &v, &e);
    if (r != 0) {
        snprintf(why, whylen, r == -2 ? "'%s' is too large" : "'%s' is not a size", s);
        return -1;
    }
    while (*e == ' ' || *e == '\t') e++;
    static const struct {
        const char *suf;
        int64_t mul;
    } u[] = {{"", 1},     {"k", KI},   {"kib", KI}, {"m", MI}, {"mib", MI},
             {"g", GI},   {"gib", GI}, {"t", TI},   {"tib", TI}};
    for (size_t i = 0; i < sizeof u / sizeof u[0]; i++)
        if (strcasecmp(e, u[i].suf) == 0) {
            if (v > INT64_MAX / u[i].mul) {
                snprintf(why, whylen, "'%s' is too large", s);
                return -1;
            }
            *out = v * u[i].mul;
            return 0;
        }
    snprintf(why, whylen, "'%s' has an unknown size suffix '%s'", s, e);
    return -1;
}

/* A tcp://HOST:PORT endpoint: host (borrowed span) and port. */
static int split_tcp(const char *ep, const char **host, size_t *hostlen, int *port)
{
    if (strncmp(ep, "tcp://", 6) != 0) return -1;
    const char *h = ep + 6, *colon = strrchr(h, ':');
    if (!colon || colon == h) return -1;
    const char *ps = colon + 1;
    if (!*ps || strspn(ps, "0123456789") != strlen(ps) || strlen(ps) > 5) return -1;
    int pn = atoi(ps);
    if (pn < 1 || pn > 65535) return -1;
    *host = h;
    *hostlen = (size_t)(colon - h);
    *port = pn;
    return 0;
}

static int check_endpoint(const char *s, bool tcp_only, char *why, size_t whylen)
{
    const char *h;
    size_t hl;
    int port;
    if (strncmp(s, "tcp://", 6) == 0) {
        if (split_tcp(s, &h, &hl, &port) != 0) {
            snprintf(why, whylen, "'%s' needs a host and a port in 1..65535", s);
            return -1;
        }
        /* a data endpoint is also where peers connect: it needs a real address */
        if (tcp_only && ((hl == 1 && *h == '*') || (hl == 7 && strncmp(h, "0.0.0.0", 7) == 0))) {
            snprintf(why, whylen, "'%s' needs a host that peers can connect to, not '%.*s'", s,
                     (int)hl, h);
            return -1;
        }
        return 0;
    }
    if (!tcp_only && (strncmp(s, "ipc://", 6) == 0 || strncmp(s, "inproc://", 9) == 0)) {
        if (strchr(s, '/')[2] != '\0') return 0;
        snprintf(why, whylen, "'%s' has an empty address", s);
        return -1;
    }
    const char *sep = strstr(s, "://");
    if (sep)
        snprintf(why, whylen, "'%s' has an unsupported transport '%.*s'", s, (int)(sep - s), s);
    else
        snprintf(why, whylen, "'%s' is not an endpoint", s);
    return -1;
}

static int parse_devices(const char *s, config_group *g, char *why, size_t whylen)
{
    config_device dev[CONFIG_MAX_TP];
    int n = 0;
    const char *p = s;
    for (;;) {
        const char *comma = strchr(p, ',');
        size_t len = comma ? (size_t)(comma - p) : strlen(p);
        while (len && isspace((unsigned char)*p)) p++, len--;
        while (len && isspace((unsigned char)p[len - 1])) len--;
        char item[32];
        if (len == 0 || len >= sizeof item) {
            if (len)
                snprintf(why, whylen, "'%.*s' is not a device", (int)len, p);
            else
                snprintf(why, whylen, "empty entry in '%s'", s);
            return -1;
        }
        memcpy(item, p, len);
        item[len] = 0;
        if (n == CONFIG_MAX_TP) {
            snprintf(why, whylen, "more than %d devices", CONFIG_MAX_TP);
            return -1;
        }
        if (strcmp(item, "cpu") == 0) {
            dev[n] = (config_device){CONFIG_DEV_CPU, 0};
        } else if (strncmp(item, "cuda:", 5) == 0 && item[5] && strlen(item + 5) <= 4 &&
                   strspn(item + 5, "0123456789") == strlen(item + 5)) {
            dev[n] = (config_device){CONFIG_DEV_CUDA, atoi(item + 5)};
            for (int i = 0; i < n; i++)
                if (dev[i].kind == CONFIG_DEV_CUDA && dev[i].index == dev[n].index) {
                    snprintf(why, whylen, "%s is listed twice", item);
                    return -1;
                }
        } else {
            snprintf(why, whylen, "'%s' is not a device", item);
            return -1;
        }
        if (n && dev[n].kind != dev[0].kind) {
            snprintf(why, whylen, "'%s' mixes cpu and cuda devices", s);
            return -1;
        }
        n++;
        if (!comma) break;
        p = comma + 1;
    }
    memcpy(g->devices, dev, sizeof dev[0] * (size_t)n);
    g->n_devices = n;
    return 0;
}

static int set_str(char **dst, const char *v)
{
    char *d = strdup(v);
    if (!d) return -1;
    free(*dst);
    *dst = d;
    return 0;
}

/* Parse value for p into base (config_model, config_daemon or config_group). 0, or -1
 * with the problem in why. */
static int set_value(const param *p, void *base, const char *v, char *why, size_t whylen)
{
    void *f = field(p, base);
    bool is_text = p->type == T_STR || p->type == T_PATH || p->type == T_ENDPOINT ||
                   p->type == T_DATA_EP;
    if (!*v && !(p->def && !*p->def)) {
        snprintf(why, whylen, "empty value");
        return -1;
    }
    if (is_text) {
        if (strlen(v) > MAX_VALUE) {
            snprintf(why, whylen, "value of %zu characters is too long", strlen(v));
            return -1;
        }
        for (const char *q = v; *q; q++)
            if ((unsigned char)*q < 0x20 || *q == 0x7f) {
                snprintf(why, whylen, "control character in '%s'", v);
                return -1;
            }
    }
    switch (p->type) {
    case T_PATH: {
        struct stat st;
        if (stat(v, &st) != 0 || access(v, R_OK) != 0) {
            snprintf(why, whylen, "cannot read '%s': %s", v, strerror(errno));
            return -1;
        }
        if (!S_ISREG(st.st_mode)) {
            snprintf(why, whylen, "'%s' is not a regular file", v);
            return -1;
        }
        break;
    }
    case T_ENDPOINT:
    case T_DATA_EP:
        if (*v && check_endpoint(v, p->type == T_DATA_EP, why, whylen) != 0) return -1;
        break;
    case T_STR: break;
    case T_INT: {
        int64_t x;
        const char *e;
        int r = parse_int64(v, &x, &e);
        if (r == -1 || (r == 0 && *e)) {
            snprintf(why, whylen, "'%s' is not an integer", v);
            return -1;
        }
        if (r == -2 || x < p->lo || x > p->hi) {
            snprintf(why, whylen, "%s is out of range", v);
            return -1;
        }
        *(int *)f = (int)x;
        return 0;
    }
    case T_BYTES: {
        int64_t x;
        if (parse_bytes(v, &x, why, whylen) != 0) return -1;
        if (x < p->lo || x > p->hi) {
            snprintf(why, whylen, "%s is out of range", v);
            return -1;
        }
        *(int64_t *)f = x;
        return 0;
    }
    case T_ENUM: {
        for (int i = 0; i < p->en->n; i++)
            if (strcmp(v, p->en->names[i]) == 0) {
                *(int *)f = p->en->values[i];
                return 0;
            }
        const char *near = closest(v, p->en->names, p->en->n);
        if (near)
            snprintf(why, whylen, "unknown value '%s'; did you mean '%s'?", v, near);
        else
            snprintf(why, whylen, "unknown value '%s'", v);
        return -1;
    }
    case T_DEVICES: return parse_devices(v, (config_group *)base, why, whylen);
    }
    if (set_str((char **)f, v) != 0) {
        snprintf(why, whylen, "out of memory");
        return -1;
    }
    return 0;
}

/* The value of p in base, as written in the file. */
static void fmt_value(const param *p, const void *base, char *buf, size_t n)
{
    const void *f = cfield(p, base);
    switch (p->type) {
    case T_STR:
    case T_PATH:
    case T_ENDPOINT:
    case T_DATA_EP: {
        const char *s = *(char *const *)f;
        snprintf(buf, n, "%s", s ? s : "");
        break;
    }
    case T_INT: snprintf(buf, n, "%d", *(const int *)f); break;
    case T_BYTES: fmt_bytes(*(const int64_t *)f, buf, n); break;
    case T_ENUM: snprintf(buf, n, "%s", enum_name(p->en, *(const int *)f)); break;
    case T_DEVICES: {
        const config_group *g = base;
        size_t k = 0;
        buf[0] = 0;
        for (int i = 0; i < g->n_devices && k < n; i++) {
            if (g->devices[i].kind == CONFIG_DEV_CPU)
                k += (size_t)snprintf(buf + k, n - k, "%scpu", i ? "," : "");
            else
                k += (size_t)snprintf(buf + k, n - k, "%scuda:%d", i ? "," : "",
                                      g->devices[i].index);
        }
        break;
    }
    }
}

static void *section_base(duet_config *cfg, sec_kind k, int group)
{
    switch (k) {
    case SEC_MODEL: return &cfg->model;
    case SEC_DAEMON: return &cfg->daemon;
    case SEC_GROUP: return &cfg->groups[group];
    default: return NULL;
    }
}

static const void *csection_base(const duet_config *cfg, sec_kind k, int group)
{
    return section_base((duet_config *)cfg, k, group);
}

/* Fill base with the defaults of the params of kind k. -1 only when out of memory. */
static int apply_defaults(sec_kind k, void *base)
{
    char why[256];
    for (int i = 0; i < N_PARAMS; i++) {
        if (params[i].sec != k || !params[i].def) continue;
        if (set_value(&params[i], base, params[i].def, why, sizeof why) != 0) return -1;
    }
    return 0;
}

static void free_fields(sec_kind k, void *base)
{
    for (int i = 0; i < N_PARAMS; i++) {
        const param *p = &params[i];
        if (p->sec != k) continue;
        if (p->type == T_STR || p->type == T_PATH || p->type == T_ENDPOINT ||
            p->type == T_DATA_EP) {
            char **s = field(p, base);
            free(*s);
            *s = NULL;
        }
    }
}

void config_free(duet_config **cfg_p)
{
    if (!cfg_p || !*cfg_p) return;
    duet_config *cfg = *cfg_p;
    free_fields(SEC_MODEL, &cfg->model);
    free_fields(SEC_DAEMON, &cfg->daemon);
    for (int g = 0; g < cfg->n_groups; g++) {
        free_fields(SEC_GROUP, &cfg->groups[g]);
        free(cfg->groups[g].name);
    }
    free(cfg->groups);
    free(cfg->source);
    free(cfg);
    *cfg_p = NULL;
}

/* ---- sections (seen by the reader) -------------------------------------------------- */

static int valid_group_name(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > MAX_GROUP_NAME) return 0;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && !strchr("_.-", s[i])) return 0;
    return 1;
}

/* A header "[text]" at line: register its section and make it current. */
static void open_section(ctx *c, const char *text, size_t len, int line)
{
    char name[CONFIG_MAX_LINE + 1];
    while (len && isspace((unsigned char)*text)) text++, len--;
    while (len && isspace((unsigned char)text[len - 1])) len--;
    memcpy(name, text, len);
    name[len] = 0;

    c->skip.bad = true;
    c->cur = &c->skip;
    if (strncmp(name, "group", 5) == 0) c->group_headers++;
    if (c->n_secs == MAX_SECTIONS) {
        add_err(c, line, "[%s]: too many sections (at most %d groups)", name, CONFIG_MAX_GROUPS);
        return;
    }
    section *s = &c->secs[c->n_secs++];
    memset(s, 0, sizeof *s);
    s->line = line;
    s->group = -1;
    s->kind = SEC_UNKNOWN;
    s->bad = true;
    c->cur = s;

    char word[CONFIG_MAX_LINE + 1];
    size_t wl = strcspn(name, " \t");
    memcpy(word, name, wl);
    word[wl] = 0;
    const char *rest = name + wl;
    while (isspace((unsigned char)*rest)) rest++;

    if (strcmp(name, "model") == 0)
        s->kind = SEC_MODEL;
    else if (strcmp(name, "daemon") == 0)
        s->kind = SEC_DAEMON;
    else if (strcmp(word, "group") == 0) {
        if (!*rest) {
            add_err(c, line, "[group]: a group needs a name (expected [group NAME])");
            return;
        }
        if (!valid_group_name(rest)) {
            add_err(c, line,
                    "[%s]: invalid group name '%s' (expected 1 to %d letters, digits, '_', '.' or '-')",
                    name, rest, MAX_GROUP_NAME);
            return;
        }
        s->kind = SEC_GROUP;
        s->name = strdup(rest);
        if (!s->name) {
            c->oom = true;
            s->kind = SEC_UNKNOWN;
            return;
        }
    } else {
        static const char *const known[] = {"model", "daemon", "group"};
        const char *near = closest(word, known, 3);
        char hint[CONFIG_MAX_LINE + 64] = "";
        if (near && strcmp(near, "group") == 0)
            snprintf(hint, sizeof hint, "; did you mean [group %s]?", *rest ? rest : "NAME");
        else if (near)
            snprintf(hint, sizeof hint, "; did you mean [%s]?", near);
        add_err(c, line, "[%s]: unknown section%s (expected [model], [daemon] or [group NAME])",
                name, hint);
        return;
    }

    for (int i = 0; i < c->n_secs - 1; i++) {
        const section *o = &c->secs[i];
        if (o->kind != s->kind) continue;
        if (s->kind == SEC_GROUP && (!o->name || strcmp(o->name, s->name) != 0)) continue;
        char lab[64];
        sec_label(s, lab, sizeof lab);
        add_err(c, line, "%s: duplicate section (first on line %d)", lab, o->line);
        return;
    }

    if (s->kind == SEC_GROUP) {
        duet_config *cfg = c->cfg;
        if (cfg->n_groups == CONFIG_MAX_GROUPS) {
            add_err(c, line, "[group %s]: too many groups (at most %d)", s->name, CONFIG_MAX_GROUPS);
            return;
        }
        config_group *gs = realloc(cfg->groups, sizeof *gs * (size_t)(cfg->n_groups + 1));
        if (!gs) {
            c->oom = true;
            return;
        }
        cfg->groups = gs;
        config_group *g = &gs[cfg->n_groups];
        memset(g, 0, sizeof *g);
        g->name = strdup(s->name);
        s->group = cfg->n_groups++;
        if (!g->name || apply_defaults(SEC_GROUP, g) != 0) {
            c->oom = true;
            return;
        }
    }
    s->bad = false;
}

/* ---- libinih callbacks ------------------------------------------------------------- */

/* Called before each new line: a "key = value" line that libinih did not hand to the
 * handler had a syntax error. */
static void end_line(ctx *c)
{
    if (c->lineno > 0 && c->last_kind == LINE_KEY && c->handled_line != c->lineno)
        add_err(c, c->lineno, "syntax error (expected 'key = value', '[section]' or a comment)");
    c->last_kind = LINE_BLANK;
}

/* libinih's fgets-like reader over the text in memory: hands over one line at a time,
 * without leading blanks (so libinih sees no continuation lines), and registers
 * section headers. */
static char *reader(char *str, int num, void *stream)
{
    ctx *c = stream;
    end_line(c);
    if (c->pos >= c->len) return NULL;
    const char *line = c->text + c->pos;
    const char *nl = memchr(line, '\n', c->len - c->pos);
    size_t n = nl ? (size_t)(nl - line) : c->len - c->pos;
    c->pos += n + (nl != NULL);
    c->lineno++;
    if (c->lineno == 1 && n >= 3 && memcmp(line, "\xEF\xBB\xBF", 3) == 0) line += 3, n -= 3;
    while (n && isspace((unsigned char)*line)) line++, n--;
    while (n && isspace((unsigned char)line[n - 1])) n--;

    size_t max = num - 2 < CONFIG_MAX_LINE ? (size_t)(num > 2 ? num - 2 : 0) : CONFIG_MAX_LINE;
    if (n == 0 || *line == ';' || *line == '#') {
        /* blank or comment, of any length: libinih needs to see nothing of it */
        c->last_kind = LINE_BLANK;
        snprintf(str, (size_t)num, "\n");
        return str;
    }
    if (n > max) {
        add_err(c, c->lineno, "line of %zu characters is too long (expected at most %zu)", n, max);
        /* keys that follow belong to a section we may not know */
        if (*line == '[') c->cur = &c->skip;
        snprintf(str, (size_t)num, "\n");
        return str;
    }
    memcpy(str, line, n);
    str[n] = '\n';
    str[n + 1] = 0;

    if (*line == '[') {
        c->last_kind = LINE_HEADER;
        const char *close = memchr(line, ']', n);
        if (!close) {
            add_err(c, c->lineno, "unterminated section header (expected [section])");
            c->skip.bad = true;
            c->cur = &c->skip;
        } else {
            const char *after = close + 1;
            size_t rest = n - (size_t)(after - line);
            while (rest && isspace((unsigned char)*after)) after++, rest--;
            if (rest && *after != ';' && *after != '#')
                add_err(c, c->lineno, "text after the section header: '%.*s' (expected a comment)",
                        (int)rest, after);
            open_section(c, line + 1, (size_t)(close - line - 1), c->lineno);
        }
    } else {
        c->last_kind = LINE_KEY;
    }
    return str;
}

static int param_index(sec_kind k, const char *key)
{
    for (int i = 0; i < N_PARAMS; i++)
        if (params[i].sec == k && strcmp(params[i].key, key) == 0) return i;
    return -1;
}

/* "role, tp_size, devices, ..." */
static void key_list(sec_kind k, char *buf, size_t n)
{
    size_t len = 0;
    buf[0] = 0;
    for (int i = 0; i < N_PARAMS && len < n; i++)
        if (params[i].sec == k)
            len += (size_t)snprintf(buf + len, n - len, "%s%s", len ? ", " : "", params[i].key);
}

static int handler(void *user, const char *section_name, const char *key, const char *value)
{
    (void)section_name; /* the reader tracks sections, with their header lines */
    ctx *c = user;
    c->handled_line = c->lineno;
    int line = c->lineno;
    section *s = c->cur;
    char lab[64], why[512], exp[256];

    if (!s) {
        for (int i = 0; i < N_PARAMS; i++)
            if (strcmp(params[i].key, key) == 0) {
                add_err(c, line, "%s: key outside any section (expected it under [%s])", key,
                        sec_names[params[i].sec]);
                return 1;
            }
        add_err(c, line, "%s: key outside any section (expected [model], [daemon] or [group NAME] first)",
                key);
        return 1;
    }
    if (s->bad) return 1;
    sec_label(s, lab, sizeof lab);
    if (!*key) {
        add_err(c, line, "%s: syntax error: no key before '=' (expected 'key = value')", lab);
        return 1;
    }

    int idx = param_index(s->kind, key);
    if (idx < 0) {
        char keys[512];
        key_list(s->kind, keys, sizeof keys);
        for (int i = 0; i < N_PARAMS; i++)
            if (params[i].sec != s->kind && strcmp(params[i].key, key) == 0) {
                add_err(c, line, "%s %s: unknown key; it belongs in [%s] (expected one of: %s)", lab,
                        key, sec_names[params[i].sec], keys);
                return 1;
            }
        const char *cands[N_PARAMS];
        int nc = 0;
        for (int i = 0; i < N_PARAMS; i++)
            if (params[i].sec == s->kind) cands[nc++] = params[i].key;
        const char *near = closest(key, cands, nc);
        if (near)
            add_err(c, line, "%s %s: unknown key; did you mean '%s'? (expected one of: %s)", lab, key,
                    near, keys);
        else
            add_err(c, line, "%s %s: unknown key (expected one of: %s)", lab, key, keys);
        return 1;
    }
    if (s->key_line[idx]) {
        add_err(c, line, "%s %s: duplicate key (first set on line %d)", lab, key, s->key_line[idx]);
        return 1;
    }
    s->key_line[idx] = line;
    if (set_value(&params[idx], section_base(c->cfg, s->kind, s->group), value, why, sizeof why) !=
        0) {
        s->key_bad[idx] = true;
        expected(&params[idx], exp, sizeof exp);
        add_err(c, line, "%s %s: %s (expected %s)", lab, key, why, exp);
    }
    return 1;
}

/* ---- whole-file checks ------------------------------------------------------------- */

static const section *find_section(const ctx *c, sec_kind k)
{
    for (int i = 0; i < c->n_secs; i++)
        if (c->secs[i].kind == k && !c->secs[i].bad) return &c->secs[i];
    return NULL;
}

/* Line of key in s (where it was set, else the header); 0 without a section. */
static int kline(const section *s, const char *key)
{
    if (!s) return 0;
    int i = param_index(s->kind, key);
    return i >= 0 && s->key_line[i] ? s->key_line[i] : s->line;
}

static bool kbad(const section *s, const char *key)
{
    int i = s ? param_index(s->kind, key) : -1;
    return i >= 0 && s->key_bad[i];
}

/* Two tcp endpoints that a host could not both bind: same port on the same host, or on
 * a wildcard host. Non-tcp endpoints clash when equal. ports: how many consecutive
 * ports each uses from its base. */
static bool endpoints_clash(const char *a, int na, const char *b, int nb)
{
    const char *ha, *hb;
    size_t la, lb;
    int pa, pb;
    if (split_tcp(a, &ha, &la, &pa) != 0 || split_tcp(b, &hb, &lb, &pb) != 0)
        return strcmp(a, b) == 0;
    bool wild_a = (la == 1 && *ha == '*') || (la == 7 && strncmp(ha, "0.0.0.0", 7) == 0);
    bool wild_b = (lb == 1 && *hb == '*') || (lb == 7 && strncmp(hb, "0.0.0.0", 7) == 0);
    bool same_host = wild_a || wild_b || (la == lb && strncasecmp(ha, hb, la) == 0);
    return same_host && pa < pb + nb && pb < pa + na;
}

static void devices_example(const config_group *g, char *buf, size_t n)
{
    bool cuda = g->n_devices > 0 && g->devices[0].kind == CONFIG_DEV_CUDA;
    size_t k = 0;
    buf[0] = 0;
    for (int i = 0; i < g->tp_size && i < 4 && k < n; i++)
        k += cuda ? (size_t)snprintf(buf + k, n - k, "%scuda:%d", i ? "," : "", i)
                  : (size_t)snprintf(buf + k, n - k, "%scpu", i ? "," : "");
    if (g->tp_size > 4 && k < n) snprintf(buf + k, n - k, ",...");
}

static void check_daemon(ctx *c)
{
    const duet_config *cfg = c->cfg;
    const config_daemon *d = &cfg->daemon;
    const section *ds = find_section(c, SEC_DAEMON), *ms = find_section(c, SEC_MODEL);

    if (!kbad(ds, "client_endpoint") && !kbad(ds, "worker_endpoint") &&
        endpoints_clash(d->client_endpoint, 1, d->worker_endpoint, 1)) {
        bool worker_set = ds && ds->key_line[param_index(SEC_DAEMON, "worker_endpoint")];
        const char *key = worker_set ? "worker_endpoint" : "client_endpoint";
        add_err(c, kline(ds, key),
                "[daemon] %s: '%s' clashes with %s '%s' (expected a different address or port)", key,
                worker_set ? d->worker_endpoint : d->client_endpoint,
                worker_set ? "client_endpoint" : "worker_endpoint",
                worker_set ? d->client_endpoint : d->worker_endpoint);
    }
    if (!kbad(ds, "max_tokens_default") && !kbad(ds, "max_tokens_limit") && d->max_tokens_limit > 0 &&
        d->max_tokens_default > d->max_tokens_limit)
        add_err(c, kline(ds, "max_tokens_default"),
                "[daemon] max_tokens_default: %d is above max_tokens_limit %d (expected at most %d)",
                d->max_tokens_default, d->max_tokens_limit, d->max_tokens_limit);
    int ctx_len = cfg->model.max_context;
    if (ctx_len > 0 && !kbad(ms, "max_context")) {
        if (!kbad(ds, "max_prompt_tokens") && d->max_prompt_tokens >= ctx_len)
            add_err(c, kline(ds, "max_prompt_tokens"),
                    "[daemon] max_prompt_tokens: %d leaves no room to generate in [model] max_context %d (expected at most %d)",
                    d->max_prompt_tokens, ctx_len, ctx_len - 1);
        if (!kbad(ds, "max_tokens_limit") && d->max_tokens_limit > ctx_len)
            add_err(c, kline(ds, "max_tokens_limit"),
                    "[daemon] max_tokens_limit: %d is above [model] max_context %d (expected at most %d)",
                    d->max_tokens_limit, ctx_len, ctx_len);
    }
}

static void check_groups(ctx *c)
{
    const duet_config *cfg = c->cfg;
    const section *ds = find_section(c, SEC_DAEMON);
    const section *first_prefill = NULL, *first_decode = NULL;
    bool any_both = false, roles_ok = true;

    for (int si = 0; si < c->n_secs; si++) {
        const section *s = &c->secs[si];
        if (s->kind != SEC_GROUP || s->bad) continue;
        const config_group *g = &cfg->groups[s->group];
        const char *name = g->name;

        int ri = param_index(SEC_GROUP, "role");
        if (!s->key_line[ri] || s->key_bad[ri])
            roles_ok = false;
        else if (g->role == CONFIG_ROLE_BOTH)
            any_both = true;
        else if (g->role == CONFIG_ROLE_PREFILL && !first_prefill)
            first_prefill = s;
        else if (g->role == CONFIG_ROLE_DECODE && !first_decode)
            first_decode = s;

        bool devs_ok = !kbad(s, "devices") && !kbad(s, "tp_size");
        if (devs_ok && g->n_devices != g->tp_size) {
            char ex[64];
            devices_example(g, ex, sizeof ex);
            bool dev_set = s->key_line[param_index(SEC_GROUP, "devices")] != 0;
            char want[48];
            if (g->tp_size == 1)
                snprintf(want, sizeof want, "one device");
            else
                snprintf(want, sizeof want, "%d comma-separated devices", g->tp_size);
            add_err(c, kline(s, dev_set ? "devices" : "tp_size"),
                    "[group %s] %s: %d device%s for tp_size %d (expected %s, e.g. %s)", name,
                    dev_set ? "devices" : "tp_size", g->n_devices, g->n_devices == 1 ? "" : "s",
                    g->tp_size, want, ex);
        }
        if (!kbad(s, "transport") && !kbad(s, "devices") && g->transport == CONFIG_TRANSPORT_NCCL &&
            g->n_devices > 0 && g->devices[0].kind != CONFIG_DEV_CUDA)
            add_err(c, kline(s, "transport"),
                    "[group %s] transport: nccl needs cuda devices (expected tcp or mpi for cpu devices)",
                    name);
        bool ep_ok = !kbad(s, "data_endpoint") && !kbad(s, "transport") && *g->data_endpoint;
        if (ep_ok && g->transport != CONFIG_TRANSPORT_TCP) {
            add_err(c, kline(s, "data_endpoint"),
                    "[group %s] data_endpoint: only used with transport = tcp, not %s (expected it empty)",
                    name, config_transport_name(g->transport));
            ep_ok = false;
        }
        if (ep_ok && !kbad(s, "tp_size")) {
            const char *h;
            size_t hl;
            int port;
            if (split_tcp(g->data_endpoint, &h, &hl, &port) == 0 && port + g->tp_size - 1 > 65535) {
                add_err(c, kline(s, "data_endpoint"),
                        "[group %s] data_endpoint: ports %d..%d run past 65535 (expected a base port up to %d)",
                        name, port, port + g->tp_size - 1, 65536 - g->tp_size);
                ep_ok = false;
            }
        }
        if (ep_ok) {
            const char *dk[] = {"client_endpoint", "worker_endpoint"};
            const char *dv[] = {cfg->daemon.client_endpoint, cfg->daemon.worker_endpoint};
            for (int k = 0; k < 2; k++)
                if (!kbad(ds, dk[k]) && endpoints_clash(g->data_endpoint, g->tp_size, dv[k], 1))
                    add_err(c, kline(s, "data_endpoint"),
                            "[group %s] data_endpoint: ports of '%s' (one per rank) clash with [daemon] %s '%s' (expected other ports)",
                            name, g->data_endpoint, dk[k], dv[k]);
            for (int oi = 0; oi < si; oi++) {
                const section *o = &c->secs[oi];
                if (o->kind != SEC_GROUP || o->bad || kbad(o, "data_endpoint") || kbad(o, "tp_size"))
                    continue;
                const config_group *og = &cfg->groups[o->group];
                if (*og->data_endpoint && og->transport == CONFIG_TRANSPORT_TCP &&
                    endpoints_clash(g->data_endpoint, g->tp_size, og->data_endpoint, og->tp_size))
                    add_err(c, kline(s, "data_endpoint"),
                            "[group %s] data_endpoint: ports of '%s' (one per rank) overlap those of [group %s] on line %d (expected other ports)",
                            name, g->data_endpoint, og->name, kline(o, "data_endpoint"));
            }
        }
        if (!kbad(s, "max_seqs") && !kbad(s, "max_batch_tokens") && !kbad(s, "role") &&
            g->role != CONFIG_ROLE_PREFILL && g->max_seqs > g->max_batch_tokens)
            add_err(c, kline(s, "max_seqs"),
                    "[group %s] max_seqs: %d sequences cannot all decode in a step of max_batch_tokens %d (expected at most %d)",
                    name, g->max_seqs, g->max_batch_tokens, g->max_batch_tokens);
    }

    if (roles_ok && !any_both) {
        if (first_prefill && !first_decode)
            add_err(c, kline(first_prefill, "role"),
                    "[group %s] role: a prefill group needs a group to decode (expected another group with role = decode, or role = both)",
                    first_prefill->name);
        else if (first_decode && !first_prefill)
            add_err(c, kline(first_decode, "role"),
                    "[group %s] role: a decode group needs a group to prefill (expected another group with role = prefill, or role = both)",
                    first_decode->name);
    }
}

static void finish(ctx *c)
{
    duet_config *cfg = c->cfg;
    char lab[64], exp[256];

    if (!find_section(c, SEC_MODEL) && !c->oom) {
        bool seen = false; /* a [model] that was rejected already has its error */
        for (int i = 0; i < c->n_secs; i++) seen |= c->secs[i].kind == SEC_MODEL;
        if (!seen) add_err(c, 0, "missing section [model] (expected at least: [model] with path = FILE.gguf)");
    }
    for (int si = 0; si < c->n_secs; si++) {
        const section *s = &c->secs[si];
        if (s->bad) continue;
        sec_label(s, lab, sizeof lab);
        for (int i = 0; i < N_PARAMS; i++)
            if (params[i].sec == s->kind && !params[i].def && !s->key_line[i]) {
                expected(&params[i], exp, sizeof exp);
                add_err(c, s->line, "%s %s: missing required key (expected %s)", lab, params[i].key,
                        exp);
            }
    }
    if (cfg->n_groups == 0 && c->group_headers == 0)
        add_err(c, 0, "no [group NAME] section (expected at least one, e.g. [group main] with role = both)");

    /* the served name defaults to the model file's name without ".gguf" */
    if (cfg->model.path && (!cfg->model.name || !*cfg->model.name)) {
        const char *base = strrchr(cfg->model.path, '/');
        base = base ? base + 1 : cfg->model.path;
        size_t n = strlen(base);
        if (n > 5 && strcasecmp(base + n - 5, ".gguf") == 0) n -= 5;
        char *name = strndup(base, n);
        if (!name) {
            c->oom = true;
            return;
        }
        free(cfg->model.name);
        cfg->model.name = name;
    }
    check_daemon(c);
    check_groups(c);
}

/* Copy the collected errors to err (errlen bytes, NUL-terminated). */
static void report(ctx *c, char *err, size_t errlen)
{
    if (!err || !errlen) return;
    err[0] = 0;
    /* in line order, stable; whole-file errors last */
    int n = c->n_err < CONFIG_MAX_ERRORS ? c->n_err : CONFIG_MAX_ERRORS, order[CONFIG_MAX_ERRORS];
    for (int i = 0; i < n; i++) {
        int j = i, key = c->errs[i].line ? c->errs[i].line : INT32_MAX;
        for (; j > 0; j--) {
            int prev = c->errs[order[j - 1]].line ? c->errs[order[j - 1]].line : INT32_MAX;
            if (prev <= key) break;
            order[j] = order[j - 1];
        }
        order[j] = i;
    }
    size_t k = 0;
    for (int i = 0; i < n && k < errlen; i++)
        if (c->errs[order[i]].msg)
            k += (size_t)snprintf(err + k, errlen - k, "%s%s", k ? "\n" : "", c->errs[order[i]].msg);
    if (k < errlen && c->oom)
        k += (size_t)snprintf(err + k, errlen - k, "%s%s: out of memory", k ? "\n" : "", c->file);
    if (k < errlen && c->n_err > CONFIG_MAX_ERRORS)
        snprintf(err + k, errlen - k, "\n%s: ... and %d more error%s", c->file,
                 c->n_err - CONFIG_MAX_ERRORS, c->n_err - CONFIG_MAX_ERRORS == 1 ? "" : "s");
}

int config_parse(const char *text, const char *filename, duet_config **out, char *err,
                 size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (out) *out = NULL;
    if (!text || !out) {
        if (err && errlen) snprintf(err, errlen, "config_parse: NULL %s", text ? "out" : "text");
        return -1;
    }
    ctx c = {0};
    c.file = filename ? filename : "(config)";
    c.text = text;
    c.len = strlen(text);
    c.secs = calloc(MAX_SECTIONS, sizeof *c.secs);
    c.cfg = calloc(1, sizeof *c.cfg);
    if (!c.secs || !c.cfg || !(c.cfg->source = strdup(c.file)) ||
        apply_defaults(SEC_MODEL, &c.cfg->model) != 0 ||
        apply_defaults(SEC_DAEMON, &c.cfg->daemon) != 0) {
        c.oom = true;
    } else {
        int r = ini_parse_stream(reader, &c, handler, &c);
        if (r > 0 && c.n_err == 0)
            add_err(&c, r, "syntax error (expected 'key = value', '[section]' or a comment)");
        else if (r < 0)
            add_err(&c, 0, "libinih failed (%d)", r);
        if (!c.oom) finish(&c);
    }
    int rc = 0;
    if (c.n_err || c.oom) {
        report(&c, err, errlen);
        config_free(&c.cfg);
        rc = -1;
    }
    *out = c.cfg;
    for (int i = 0; c.secs && i < c.n_secs; i++) free(c.secs[i].name);
    free(c.secs);
    for (int i = 0; i < c.n_err && i < CONFIG_MAX_ERRORS; i++) free(c.errs[i].msg);
    return rc;
}

int config_load(const char *path, duet_config **out, char *err, size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (out) *out = NULL;
    if (!path || !out) {
        if (err && errlen) snprintf(err, errlen, "config_load: NULL %s", path ? "out" : "path");
        return -1;
    }
    FILE *f = fopen(path, "rb");
    if (!f) {
        if (err && errlen) snprintf(err, errlen, "%s: cannot open: %s", path, strerror(errno));
        return -1;
    }
    char *buf = malloc(CONFIG_MAX_FILE + 1);
    size_t n = buf ? fread(buf, 1, CONFIG_MAX_FILE + 1, f) : 0;
    int rerr = ferror(f);
    fclose(f);
    const char *problem = !buf ? "out of memory" : rerr ? "read error"
                        : n > CONFIG_MAX_FILE ? "larger than 1 MiB (expected a configuration file)"
                        : memchr(buf, 0, n) ? "holds a NUL byte (expected a text file)" : NULL;
    if (problem) {
        if (err && errlen) snprintf(err, errlen, "%s: %s", path, problem);
        free(buf);
        return -1;
    }
    buf[n] = 0;
    int rc = config_parse(buf, path, out, err, errlen);
    free(buf);
    return rc;
}

/* ---- dump, doc, diff --------------------------------------------------------------- */

static void describe(const param *p, char *buf, size_t n)
{
    char exp[256], def[64];
    switch (p->type) {
    case T_INT: snprintf(exp, sizeof exp, "%lld..%lld", (long long)p->lo, (long long)p->hi); break;
    case T_BYTES: {
        char lo[32], hi[32];
        fmt_bytes(p->lo, lo, sizeof lo);
        fmt_bytes(p->hi, hi, sizeof hi);
        snprintf(exp, sizeof exp, "%s..%s", lo, hi);
        break;
    }
    case T_ENUM: expected(p, exp, sizeof exp); memmove(exp, exp + 7, strlen(exp + 7) + 1); break;
    default: exp[0] = 0;
    }
    if (!p->def)
        snprintf(def, sizeof def, "required");
    else
        snprintf(def, sizeof def, "default %s", *p->def ? p->def : "empty");
    snprintf(buf, n, "%s%s%s; %s", exp, *exp ? "; " : "", def,
             p->reloadable ? "reloadable" : "restart to change");
}

static void dump_section(sec_kind k, const void *base, FILE *f)
{
    char val[512], desc[512];
    for (int i = 0; i < N_PARAMS; i++) {
        if (params[i].sec != k) continue;
        describe(&params[i], desc, sizeof desc);
        fmt_value(&params[i], base, val, sizeof val);
        fprintf(f, "; %s (%s)\n%s = %s\n", params[i].doc, desc, params[i].key, val);
    }
}

int config_dump(const duet_config *cfg, FILE *f)
{
    if (!cfg || !f) return -1;
    fprintf(f, "; duet configuration: effective values, defaults filled in (from %s)\n\n",
            cfg->source ? cfg->source : "?");
    fprintf(f, "[model]\n");
    dump_section(SEC_MODEL, &cfg->model, f);
    fprintf(f, "\n[daemon]\n");
    dump_section(SEC_DAEMON, &cfg->daemon, f);
    for (int g = 0; g < cfg->n_groups; g++) {
        fprintf(f, "\n[group %s]\n", cfg->groups[g].name);
        dump_section(SEC_GROUP, &cfg->groups[g], f);
    }
    return fflush(f) == 0 && !ferror(f) ? 0 : -1;
}

int config_doc(FILE *f)
{
    static const char *const tnames[] = {"text", "path", "endpoint", "endpoint", "integer",
                                         "size", "enum", "devices"};
    if (!f) return -1;
    fprintf(f, "| section | key | type | allowed | default | reload | meaning |\n");
    fprintf(f, "| --- | --- | --- | --- | --- | --- | --- |\n");
    for (int i = 0; i < N_PARAMS; i++) {
        const param *p = &params[i];
        char exp[256], esc[512];
        expected(p, exp, sizeof exp);
        size_t k = 0; /* '|' would end a Markdown cell */
        for (const char *q = exp; *q && k + 3 < sizeof esc; q++) {
            if (*q == '|') esc[k++] = '\\';
            esc[k++] = *q;
        }
        esc[k] = 0;
        fprintf(f, "| [%s] | `%s` | %s | %s | %s | %s | %s |\n", sec_names[p->sec], p->key,
                tnames[p->type], esc, !p->def ? "(required)" : *p->def ? p->def : "(empty)",
                p->reloadable ? "yes" : "no", p->doc);
    }
    return fflush(f) == 0 && !ferror(f) ? 0 : -1;
}

typedef struct {
    char *buf;
    size_t len, cap;
    int restart;
} diff_out;

static void diff_line(diff_out *d, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void diff_line(diff_out *d, const char *fmt, ...)
{
    if (!d->buf || !d->cap || d->len + 1 >= d->cap) return;
    if (d->len) d->buf[d->len++] = '\n';
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(d->buf + d->len, d->cap - d->len, fmt, ap);
    va_end(ap);
    d->len = k < 0 ? d->len : d->len + (size_t)k < d->cap ? d->len + (size_t)k : d->cap - 1;
}

static void diff_section(diff_out *d, const char *label, sec_kind k, const void *a, const void *b)
{
    char va[512], vb[512];
    for (int i = 0; i < N_PARAMS; i++) {
        const param *p = &params[i];
        if (p->sec != k) continue;
        fmt_value(p, a, va, sizeof va);
        fmt_value(p, b, vb, sizeof vb);
        if (strcmp(va, vb) == 0) continue;
        if (!p->reloadable) d->restart++;
        diff_line(d, "%s %s: %s -> %s (%s)", label, p->key, *va ? va : "\"\"", *vb ? vb : "\"\"",
                  p->reloadable ? "reloadable" : "needs a restart");
    }
}

static const config_group *group_named(const duet_config *cfg, const char *name)
{
    for (int g = 0; g < cfg->n_groups; g++)
        if (strcmp(cfg->groups[g].name, name) == 0) return &cfg->groups[g];
    return NULL;
}

int config_diff_reloadable(const duet_config *old, const duet_config *new_cfg, char *err,
                           size_t errlen)
{
    if (err && errlen) err[0] = 0;
    if (!old || !new_cfg) return -1;
    diff_out d = {err, 0, errlen, 0};
    diff_section(&d, "[model]", SEC_MODEL, csection_base(old, SEC_MODEL, 0),
                 csection_base(new_cfg, SEC_MODEL, 0));
    diff_section(&d, "[daemon]", SEC_DAEMON, csection_base(old, SEC_DAEMON, 0),
                 csection_base(new_cfg, SEC_DAEMON, 0));
    char label[64];
    for (int g = 0; g < old->n_groups; g++) {
        const config_group *og = &old->groups[g], *ng = group_named(new_cfg, og->name);
        snprintf(label, sizeof label, "[group %s]", og->name);
        if (!ng) {
            d.restart++;
            diff_line(&d, "%s: removed (needs a restart)", label);
        } else {
            diff_section(&d, label, SEC_GROUP, og, ng);
        }
    }
    for (int g = 0; g < new_cfg->n_groups; g++)
        if (!group_named(old, new_cfg->groups[g].name)) {
            d.restart++;
            diff_line(&d, "[group %s]: added (needs a restart)", new_cfg->groups[g].name);
        }
    return d.restart;
}
