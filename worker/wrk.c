/* worker/wrk.c: the duet-worker event loop (see worker/wrk.h). */
#include "worker/wrk.h"

#include "comm/comm.h"
#include "worker/xfer.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#include <openssl/evp.h>
#include <systemd/sd-daemon.h>
#include <zmq.h>

#include "daemon/tok.h"
#include "kv/kv.h"
#include "worker/gguf.h"
#include "worker/model.h"
#include "worker/sched.h"

#define WRK_SOFTWARE "duet 0.1.0"
#define WRK_EVENTS_SLACK 64     /* event buffer beyond sched_events_max (cancels between steps) */
#define WRK_XFER_POLL_MS 1      /* longest wait while transfers are in flight (MPI has no fd) */
#define WRK_POLL_MAX_MS 1000    /* longest single wait, so a clock jump cannot stall the loop */
#define WRK_LINE 1024           /* longest log line */
#define WRK_DROP_MAX_STEPS 4096 /* bound on the calls that drain a cancelled scheduler */

/* One request this worker holds (from sched_add until its finished/failed, or for a
 * prefill its kv_ready, is sent). */
typedef struct {
    int64_t rid;      /* 0: empty slot */
    int gen0;         /* completion tokens before this assign (assign.generated) */
    proto_role role;  /* both, prefill or decode */
    int64_t xfer;     /* prefill, decode: its transfer */
    int done;         /* prefill: the scheduler ended it (first token sampled) */
    int sent;         /* prefill: every send of its KV completed */
    int xfailed;      /* prefill: the transfer failed and `failed` went out: the scheduler's
                         end of it is swallowed */
    int n_cached;     /* prefill: prompt tokens found in the prefix cache */
    int n_tokens;     /* prefill: context tokens whose KV was sent */
    int64_t bytes;    /* prefill: KV bytes sent */
    double send_ms;   /* prefill: shipping time */
    double tail_ms;   /* prefill: of which after the last layer was shipped */
    sample_rng rng;   /* prefill: the PRNG after the first token */
} live_req;

/* A decode assign whose KV has not all arrived yet. */
typedef struct pend_assign {
    proto_assign a;   /* owned */
    struct pend_assign *next;
} pend_assign;

/* What a phase of the loop ended with. */
typedef enum {
    PH_OK = 0, /* registered (register phase) */
    PH_STOP,   /* wrk_stop or the signal fd */
    PH_RETRY,  /* no answer, a retryable refusal, or duetd lost: register again */
    PH_FATAL,  /* an error for the caller (err is set) */
} phase_rc;

struct wrk {
    wrk_config cfg; /* strings below replace the caller's */
    char *model_path, *endpoint, *worker_id, *group_name, *data_endpoint;
    model_t *model;
    kv_cache_t *kv;
    sched_t *sched;
    comm_t *comm;      /* the data plane (prefill and decode roles, or mpi), or NULL */
    xfer_t *xfer;      /* KV transfers over comm */
    pend_assign *pend; /* decode assigns waiting for their KV */
    int32_t *eog; /* [n_eog] */
    int n_eog;
    char sha256[65];
    char *model_name; /* general.name, or NULL */
    int n_vocab, n_ctx;
    char cpu_name[PROTO_MAX_TEXT];
    int64_t mem_bytes;

    void *zctx;
    void *sock;       /* the DEALER to duetd, or NULL */
    int wake_fd;      /* eventfd written by wrk_stop */
    atomic_int stop;  /* stop requests so far (wrk_stop, signals): 1 drains, 2 hands back */
    int draining;     /* serving only the requests held when the stop came */
    int64_t drain_until; /* monotonic ms: then the rest are handed back */
    uint64_t rng;     /* back-off jitter (splitmix64 state) */

    int hb_ms, dead_after;      /* in force for the current connection */
    int64_t last_recv, last_hb; /* monotonic ms: last message from duetd, last heartbeat sent */
    int registered;             /* the current connection got `registered` */
    proto_role role;            /* from `registered` */
    wrk_status fatal;           /* the status that goes with a PH_FATAL */
    int notified_ready;

    live_req *live; /* open-addressing table [live_cap] (power of two), keyed by rid */
    int live_cap, n_live;

    sched_event *ev; /* [ev_cap] one step's events */
    int ev_cap;
    proto_token_event *tev; /* [ev_cap] token events of one message */
    int32_t *tids;          /* [ev_cap] their ids */

    pthread_mutex_t mu; /* guards st */
    wrk_stats st;
};

/* ---- small helpers ------------------------------------------------------------------- */

static void heartbeat_during_step(void *user);
static void on_layer(void *user, int layer, const sched_ship *ships, int n);

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static char *dup_or_null(const char *s)
{
    return s ? strdup(s) : NULL;
}

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

const char *wrk_strerror(wrk_status s)
{
    switch (s) {
    case WRK_OK: return "ok";
    case WRK_ERR_CONFIG: return "bad configuration";
    case WRK_ERR_MODEL: return "model, KV cache or scheduler could not be made";
    case WRK_ERR_REFUSED: return "registration refused by duetd";
    case WRK_ERR_SYS: return "system or ZeroMQ failure";
    case WRK_ERR_NOMEM: return "out of memory";
    }
    return "unknown status";
}

/* ---- logging --------------------------------------------------------------------------- */

static void wlog_(const wrk_t *w, config_log_level lvl, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void wlog_(const wrk_t *w, config_log_level lvl, const char *fmt, ...)
{
    static const int prio[] = {3, 4, 6, 7};
    char line[WRK_LINE];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    int p = prio[lvl <= CONFIG_LOG_DEBUG ? lvl : CONFIG_LOG_DEBUG];
    if (w->cfg.log)
        w->cfg.log(w->cfg.log_user, p, line);
    else
        fprintf(stderr, "<%d>duet-worker %s: %s\n", p, w->worker_id, line);
}

/* The level is tested before the arguments are evaluated. */
#define WLOG(w, lvl, ...)                                                   \
    do {                                                                    \
        if ((int)(lvl) <= (int)(w)->cfg.log_level) wlog_((w), (lvl), __VA_ARGS__); \
    } while (0)
#define LOG_E(w, ...) WLOG(w, CONFIG_LOG_ERROR, __VA_ARGS__)
#define LOG_W(w, ...) WLOG(w, CONFIG_LOG_WARN, __VA_ARGS__)
#define LOG_I(w, ...) WLOG(w, CONFIG_LOG_INFO, __VA_ARGS__)
#define LOG_D(w, ...) WLOG(w, CONFIG_LOG_DEBUG, __VA_ARGS__)

static void notify(const wrk_t *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void notify(const wrk_t *w, const char *fmt, ...)
{
    if (!w->cfg.notify) return;
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    sd_notify(0, buf);
}

/* ---- the table of live requests ------------------------------------------------------- */

static size_t slot_of(const wrk_t *w, int64_t rid)
{
    uint64_t h = (uint64_t)rid * 0x9e3779b97f4a7c15ull;
    return (size_t)(h ^ (h >> 29)) & (size_t)(w->live_cap - 1);
}

static live_req *live_find(wrk_t *w, int64_t rid)
{
    for (size_t i = slot_of(w, rid);; i = (i + 1) & (size_t)(w->live_cap - 1)) {
        if (w->live[i].rid == rid) return &w->live[i];
        if (w->live[i].rid == 0) return NULL;
    }
}

static int live_grow(wrk_t *w)
{
    int cap = w->live_cap * 2;
    live_req *t = calloc((size_t)cap, sizeof *t);
    if (!t) return -1;
    live_req *old = w->live;
    int old_cap = w->live_cap;
    w->live = t;
    w->live_cap = cap;
    for (int i = 0; i < old_cap; i++) {
        if (!old[i].rid) continue;
        size_t j = slot_of(w, old[i].rid);
        while (t[j].rid) j = (j + 1) & (size_t)(cap - 1);
        t[j] = old[i];
    }
    free(old);
    return 0;
}

/* Add rid (not present). 0 or -1 (out of memory). */
static int live_put(wrk_t *w, int64_t rid, int gen0)
{
    if ((w->n_live + 1) * 2 > w->live_cap && live_grow(w) != 0) return -1;
    size_t i = slot_of(w, rid);
    while (w->live[i].rid) i = (i + 1) & (size_t)(w->live_cap - 1);
    w->live[i] = (live_req){.rid = rid, .gen0 = gen0};
    w->n_live++;
    return 0;
}

/* Remove e (a slot of the table), shifting the entries of its probe run back. */
static void live_del(wrk_t *w, live_req *e)
{
    const size_t mask = (size_t)(w->live_cap - 1);
    size_t i = (size_t)(e - w->live);
    w->live[i].rid = 0;
    w->n_live--;
    for (size_t j = (i + 1) & mask; w->live[j].rid; j = (j + 1) & mask) {
        size_t home = slot_of(w, w->live[j].rid);
        /* entry j may move to hole i when its home is not cyclically in (i, j] */
        int stays = i <= j ? (home > i && home <= j) : (home > i || home <= j);
        if (stays) continue;
        w->live[i] = w->live[j];
        w->live[j].rid = 0;
        i = j;
    }
}

/* ---- configuration ----------------------------------------------------------------------- */

void wrk_config_default(wrk_config *c)
{
    memset(c, 0, sizeof *c);
    c->endpoint = "tcp://127.0.0.1:7071";
    c->group = -1;
    c->role = PROTO_ROLE_BOTH;
    c->tp_size = 1;
    c->kv_budget = (int64_t)256 << 20;
    c->kv_type = DTYPE_F16;
    c->max_batch_tokens = 2048;
    c->max_seqs = 64;
    c->backend = PROTO_BACKEND_TCP;
    c->heartbeat_ms = 1000;
    c->dead_after = 4;
    c->backoff_min_ms = 100;
    c->backoff_max_ms = 5000;
    c->linger_ms = 1000;
    c->drain_ms = 30000;
    c->log_level = CONFIG_LOG_INFO;
    c->signal_fd = -1;
}

static proto_role role_of_config(config_role r)
{
    switch (r) {
    case CONFIG_ROLE_PREFILL: return PROTO_ROLE_PREFILL;
    case CONFIG_ROLE_DECODE: return PROTO_ROLE_DECODE;
    case CONFIG_ROLE_BOTH: break;
    }
    return PROTO_ROLE_BOTH;
}

static proto_backend backend_of_config(config_transport t)
{
    switch (t) {
    case CONFIG_TRANSPORT_MPI: return PROTO_BACKEND_MPI;
    case CONFIG_TRANSPORT_NCCL: return PROTO_BACKEND_NCCL;
    case CONFIG_TRANSPORT_TCP: break;
    }
    return PROTO_BACKEND_TCP;
}

wrk_status wrk_config_from_file(const duet_config *dc, const char *group_name, int tp_rank,
                                wrk_config *c, char *err, size_t errlen)
{
    if (!dc || !c || !group_name) {
        set_err(err, errlen, "wrk_config_from_file: NULL argument");
        return WRK_ERR_CONFIG;
    }
    const char *src = dc->source ? dc->source : "(config)";
    int gi = -1;
    for (int i = 0; i < dc->n_groups; i++)
        if (dc->groups[i].name && strcmp(dc->groups[i].name, group_name) == 0) gi = i;
    if (gi < 0) {
        char names[256] = "";
        for (int i = 0; i < dc->n_groups; i++)
            snprintf(names + strlen(names), sizeof names - strlen(names), "%s%s", i ? ", " : "",
                     dc->groups[i].name);
        set_err(err, errlen, "%s: no [group %s] (groups: %s)", src, group_name, names);
        return WRK_ERR_CONFIG;
    }
    const config_group *g = &dc->groups[gi];
    if (tp_rank < 0 || tp_rank >= g->tp_size) {
        set_err(err, errlen, "%s: [group %s]: rank %d is outside [0, tp_size %d)", src, g->name,
                tp_rank, g->tp_size);
        return WRK_ERR_CONFIG;
    }
    if (g->tp_size > 1) {
        set_err(err, errlen,
                "%s: [group %s] tp_size %d: tensor parallelism across worker processes is "
                "not wired into duet-worker yet; it runs groups of tp_size 1 only", src, g->name,
                g->tp_size);
        return WRK_ERR_CONFIG;
    }
    if (g->transport == CONFIG_TRANSPORT_NCCL) {
        set_err(err, errlen,
                "%s: [group %s] transport nccl: the NCCL data plane needs GPU workers; this "
                "duet-worker runs on the CPU (use transport tcp or mpi)", src, g->name);
        return WRK_ERR_CONFIG;
    }
    if (tp_rank < g->n_devices && g->devices[tp_rank].kind != CONFIG_DEV_CPU) {
        set_err(err, errlen,
                "%s: [group %s] devices: rank %d runs on cuda:%d, but this duet-worker runs on "
                "the CPU only", src, g->name, tp_rank, g->devices[tp_rank].index);
        return WRK_ERR_CONFIG;
    }
    c->model_path = dc->model.path;
    c->kv_type = dc->model.kv_type;
    c->n_ctx = dc->model.max_context;
    c->endpoint = dc->daemon.worker_endpoint;
    c->heartbeat_ms = dc->daemon.heartbeat_ms;
    c->dead_after = dc->daemon.dead_after;
    c->log_level = dc->daemon.log_level;
    c->group_name = g->name;
    c->group = gi;
    c->role = role_of_config(g->role);
    c->tp_rank = tp_rank;
    c->tp_size = g->tp_size;
    c->n_threads = g->threads;
    c->kv_budget = g->kv_budget;
    c->max_batch_tokens = g->max_batch_tokens;
    c->max_seqs = g->max_seqs;
    c->backend = backend_of_config(g->transport);
    c->data_endpoint = g->data_endpoint;
    return WRK_OK;
}

/* ---- identity ---------------------------------------------------------------------------- */

static int sha256_hex(const void *p, size_t n, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    if (EVP_Digest(p, n, md, &len, EVP_sha256(), NULL) != 1 || len != 32) return -1;
    for (unsigned i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
    return 0;
}

int wrk_sha256_file(const char *path, char hex[65], char *err, size_t errlen)
{
    FILE *f = path ? fopen(path, "rb") : NULL;
    if (!f) {
        set_err(err, errlen, "%s: cannot open: %s", path ? path : "(null)", strerror(errno));
        return -1;
    }
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    unsigned char *buf = malloc(1 << 20);
    int rc = -1;
    if (!ctx || !buf || EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) != 1) {
        set_err(err, errlen, "%s: SHA-256: out of memory", path);
        goto out;
    }
    size_t n;
    while ((n = fread(buf, 1, 1 << 20, f)) > 0)
        if (EVP_DigestUpdate(ctx, buf, n) != 1) {
            set_err(err, errlen, "%s: SHA-256 update failed", path);
            goto out;
        }
    if (ferror(f)) {
        set_err(err, errlen, "%s: read error: %s", path, strerror(errno));
        goto out;
    }
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned len = 0;
    if (EVP_DigestFinal_ex(ctx, md, &len) != 1 || len != 32) {
        set_err(err, errlen, "%s: SHA-256 final failed", path);
        goto out;
    }
    for (unsigned i = 0; i < 32; i++) snprintf(hex + 2 * i, 3, "%02x", md[i]);
    rc = 0;
out:
    free(buf);
    EVP_MD_CTX_free(ctx);
    fclose(f);
    return rc;
}

/* Bytes 0x21..0x7e only (protocol ids); others become '_'. */
static void sanitize_id(char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x21 || (unsigned char)*s > 0x7e) *s = '_';
}

static char *make_worker_id(const wrk_config *c)
{
    char host[256] = "host";
    if (gethostname(host, sizeof host) != 0) snprintf(host, sizeof host, "host");
    host[sizeof host - 1] = 0;
    char tail[PROTO_MAX_ID + 1];
    snprintf(tail, sizeof tail, "-%.40s-%d", c->group_name ? c->group_name : "cpu", c->tp_rank);
    size_t room = PROTO_MAX_ID - strlen(tail);
    size_t hl = strlen(host);
    if (hl > room) hl = room;
    char id[PROTO_MAX_ID + 1];
    memcpy(id, host, hl);
    memcpy(id + hl, tail, strlen(tail) + 1);
    sanitize_id(id);
    return strdup(id);
}

static void read_cpu_name(char *out, size_t n)
{
    snprintf(out, n, "cpu");
    FILE *f = fopen("/proc/cpuinfo", "r");
    if (!f) return;
    char line[512];
    while (fgets(line, sizeof line, f)) {
        if (strncmp(line, "model name", 10) != 0) continue;
        char *p = strchr(line, ':');
        if (!p) break;
        p++;
        while (*p == ' ' || *p == '\t') p++;
        size_t len = strcspn(p, "\n");
        while (len > 0 && (p[len - 1] == ' ' || p[len - 1] == '\t')) len--;
        if (len > 0) snprintf(out, n, "%.*s", (int)len, p);
        break;
    }
    fclose(f);
}

/* "tcp://HOST:PORT" + tp_rank on the port, or a placeholder without a data endpoint. */
static char *make_data_endpoint(const wrk_config *c)
{
    const char *base = c->data_endpoint;
    if (!base || !*base) return strdup("tcp://127.0.0.1:0");
    const char *colon = strrchr(base, ':');
    char *end = NULL;
    long port = colon ? strtol(colon + 1, &end, 10) : -1;
    if (!colon || !end || *end || port < 0 || port + c->tp_rank > 65535) return strdup(base);
    char buf[PROTO_MAX_ENDPOINT + 1];
    snprintf(buf, sizeof buf, "%.*s:%ld", (int)(colon - base), base, port + c->tp_rank);
    return strdup(buf);
}

/* ---- new / destroy ---------------------------------------------------------------------- */

static wrk_status check_config(const wrk_config *c, char *err, size_t errlen)
{
    if (!c->model_path || !*c->model_path) {
        set_err(err, errlen, "no model file given (-m MODEL or [model] path)");
        return WRK_ERR_CONFIG;
    }
    if (!c->endpoint || !*c->endpoint || strlen(c->endpoint) > PROTO_MAX_ENDPOINT) {
        set_err(err, errlen, "duetd's worker endpoint '%s' is empty or longer than %d bytes",
                c->endpoint ? c->endpoint : "", PROTO_MAX_ENDPOINT);
        return WRK_ERR_CONFIG;
    }
    if (c->tp_size != 1) {
        set_err(err, errlen,
                "tp_size %d: tensor parallelism across worker processes is not wired into "
                "duet-worker yet; it runs groups of tp_size 1 only", c->tp_size);
        return WRK_ERR_CONFIG;
    }
    if (c->tp_rank != 0) {
        set_err(err, errlen, "rank %d is outside [0, tp_size 1)", c->tp_rank);
        return WRK_ERR_CONFIG;
    }
    if (c->backend == PROTO_BACKEND_NCCL) {
        set_err(err, errlen, "backend nccl needs a GPU worker; this duet-worker runs on the CPU "
                             "(use tcp or mpi)");
        return WRK_ERR_CONFIG;
    }
    if (c->worker_id) {
        size_t n = strlen(c->worker_id);
        int ok = n >= 1 && n <= PROTO_MAX_ID;
        for (size_t i = 0; ok && i < n; i++)
            ok = (unsigned char)c->worker_id[i] >= 0x21 && (unsigned char)c->worker_id[i] <= 0x7e;
        if (!ok) {
            set_err(err, errlen,
                    "worker id '%s' must be 1 to %d bytes of printable ASCII without spaces",
                    c->worker_id, PROTO_MAX_ID);
            return WRK_ERR_CONFIG;
        }
    }
    if (c->heartbeat_ms < 10 || c->heartbeat_ms > 600000 || c->dead_after < 2 || c->dead_after > 10) {
        set_err(err, errlen, "heartbeat_ms %d must be in [10, 600000] and dead_after %d in [2, 10]",
                c->heartbeat_ms, c->dead_after);
        return WRK_ERR_CONFIG;
    }
    if (c->kv_budget <= 0 || c->n_threads < 0 || c->max_batch_tokens < 1 || c->max_seqs < 1 ||
        c->max_seqs > 65536 || c->n_ctx < 0) {
        set_err(err, errlen,
                "bad sizes: kv_budget %" PRId64 ", threads %d, max_batch_tokens %d, max_seqs %d "
                "(1..65536), n_ctx %d", c->kv_budget, c->n_threads, c->max_batch_tokens,
                c->max_seqs, c->n_ctx);
        return WRK_ERR_CONFIG;
    }
    if (c->kv_type != DTYPE_F32 && c->kv_type != DTYPE_F16 && c->kv_type != DTYPE_BF16 &&
        c->kv_type != DTYPE_I8) {
        set_err(err, errlen, "KV type %d is not one of f32, f16, bf16, int8", (int)c->kv_type);
        return WRK_ERR_CONFIG;
    }
    if (c->backoff_min_ms < 1 || c->backoff_max_ms < c->backoff_min_ms || c->linger_ms < 0 ||
        c->drain_ms < 0) {
        set_err(err, errlen,
                "back-off %d..%d ms, linger %d ms and drain %d ms must be positive and ordered",
                c->backoff_min_ms, c->backoff_max_ms, c->linger_ms, c->drain_ms);
        return WRK_ERR_CONFIG;
    }
    return WRK_OK;
}

/* The model's end-of-generation ids, from its tokenizer. */
static wrk_status load_eog(wrk_t *w, char *err, size_t errlen)
{
    tok_t *tok = NULL;
    char why[256];
    if (tok_new_from_gguf(model_gguf(w->model), &tok, why, sizeof why) != 0) {
        set_err(err, errlen, "%s: tokenizer (for the end-of-generation tokens): %s",
                w->model_path, why);
        return WRK_ERR_MODEL;
    }
    int n = tok_n_vocab(tok), k = 0;
    for (int32_t id = 0; id < n; id++) k += tok_is_eog(tok, id) != 0;
    w->eog = malloc((size_t)(k ? k : 1) * sizeof *w->eog);
    if (!w->eog) {
        tok_destroy(&tok);
        set_err(err, errlen, "out of memory");
        return WRK_ERR_NOMEM;
    }
    for (int32_t id = 0; id < n; id++)
        if (tok_is_eog(tok, id)) w->eog[w->n_eog++] = id;
    tok_destroy(&tok);
    return WRK_OK;
}

wrk_status wrk_new(const wrk_config *c, wrk_t **out, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (!c || !out) {
        set_err(err, errlen, "wrk_new: NULL argument");
        return WRK_ERR_CONFIG;
    }
    wrk_status rc = check_config(c, err, errlen);
    if (rc != WRK_OK) return rc;
    wrk_t *w = calloc(1, sizeof *w);
    if (!w) {
        set_err(err, errlen, "out of memory");
        return WRK_ERR_NOMEM;
    }
    w->wake_fd = -1;
    pthread_mutex_init(&w->mu, NULL);
    w->cfg = *c;
    w->model_path = dup_or_null(c->model_path);
    w->endpoint = dup_or_null(c->endpoint);
    w->group_name = dup_or_null(c->group_name);
    w->worker_id = c->worker_id ? strdup(c->worker_id) : make_worker_id(c);
    w->data_endpoint = make_data_endpoint(c);
    w->live_cap = 64;
    w->live = calloc((size_t)w->live_cap, sizeof *w->live);
    if (!w->model_path || !w->endpoint || !w->worker_id || !w->data_endpoint || !w->live ||
        (c->group_name && !w->group_name)) {
        set_err(err, errlen, "out of memory");
        rc = WRK_ERR_NOMEM;
        goto fail;
    }
    w->cfg.model_path = w->model_path;
    w->cfg.endpoint = w->endpoint;
    w->cfg.group_name = w->group_name;
    w->cfg.worker_id = w->worker_id;
    w->cfg.data_endpoint = w->data_endpoint;
    w->hb_ms = c->heartbeat_ms;
    w->dead_after = c->dead_after;
    w->rng = c->seed ? c->seed : ((uint64_t)now_ms() << 20) ^ (uint64_t)getpid();
    if (w->cfg.n_threads == 0) {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        w->cfg.n_threads = n > 0 ? (int)n : 1;
    }
    w->st.rank = w->st.group = -1;

    char why[512];
    if (model_load(w->model_path, 0, 1, &w->model, why, sizeof why) != 0) {
        set_err(err, errlen, "%s", why);
        rc = WRK_ERR_MODEL;
        goto fail;
    }
    const model_hparams *hp = model_hparams_of(w->model);
    w->n_vocab = hp->n_vocab;
    w->n_ctx = c->n_ctx ? c->n_ctx : hp->n_ctx_train;
    const gguf_t *g = model_gguf(w->model);
    if (sha256_hex(gguf_base(g), gguf_file_size(g), w->sha256) != 0) {
        set_err(err, errlen, "%s: SHA-256 failed", w->model_path);
        rc = WRK_ERR_SYS;
        goto fail;
    }
    w->model_name = gguf_get_str_dup(g, "general.name");
    if ((rc = load_eog(w, err, errlen)) != WRK_OK) goto fail;

    kv_config kc = model_kv_config(w->model, c->kv_type, (size_t)c->kv_budget);
    kv_status ks = kv_new(&kc, &w->kv);
    if (ks != KV_OK) {
        size_t bb = kv_block_bytes(&kc);
        set_err(err, errlen, "KV cache of %" PRId64 " bytes (blocks of %zu bytes): %s",
                c->kv_budget, bb, kv_strerror(ks));
        rc = ks == KV_ERR_ALLOC ? WRK_ERR_NOMEM : WRK_ERR_CONFIG;
        goto fail;
    }
    sched_config sc = {.max_batch_tokens = c->max_batch_tokens, .max_running = c->max_seqs,
                       .n_ctx = w->n_ctx, .n_threads = w->cfg.n_threads, .eog_ids = w->eog,
                       .n_eog = w->n_eog};
    sched_status ss = sched_new(w->model, w->kv, &sc, &w->sched, why, sizeof why);
    if (ss != SCHED_OK) {
        set_err(err, errlen, "scheduler: %s", why);
        rc = ss == SCHED_ERR_NOMEM ? WRK_ERR_NOMEM : WRK_ERR_CONFIG;
        goto fail;
    }
    sched_set_layer_hook(w->sched, on_layer, w);
    if (xfer_new(w->kv, &w->xfer) != XFER_OK) {
        set_err(err, errlen, "out of memory");
        rc = WRK_ERR_NOMEM;
        goto fail;
    }
    w->ev_cap = sched_events_max(w->sched) + WRK_EVENTS_SLACK;
    w->ev = malloc((size_t)w->ev_cap * sizeof *w->ev);
    w->tev = malloc((size_t)w->ev_cap * sizeof *w->tev);
    w->tids = malloc((size_t)w->ev_cap * sizeof *w->tids);
    if (!w->ev || !w->tev || !w->tids) {
        set_err(err, errlen, "out of memory");
        rc = WRK_ERR_NOMEM;
        goto fail;
    }
    read_cpu_name(w->cpu_name, sizeof w->cpu_name);
    long pages = sysconf(_SC_PHYS_PAGES), psz = sysconf(_SC_PAGESIZE);
    w->mem_bytes = pages > 0 && psz > 0 ? (int64_t)pages * psz : 0;

    w->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (w->wake_fd < 0) {
        set_err(err, errlen, "eventfd: %s", strerror(errno));
        rc = WRK_ERR_SYS;
        goto fail;
    }
    w->zctx = zmq_ctx_new();
    if (!w->zctx) {
        set_err(err, errlen, "zmq_ctx_new: %s", zmq_strerror(zmq_errno()));
        rc = WRK_ERR_SYS;
        goto fail;
    }
    /* The data plane: a worker that may move KV (any role but both), or one started by
     * mpirun with transport mpi. */
    if (c->backend == PROTO_BACKEND_MPI) {
        if (!comm_mpi_launched()) {
            set_err(err, errlen, "transport mpi: this worker was not started by mpirun (start the "
                                 "workers with mpirun -np N duet-worker --config FILE, or use "
                                 "transport tcp)");
            rc = WRK_ERR_CONFIG;
            goto fail;
        }
        if (comm_mpi_new(&w->comm, why, sizeof why) != COMM_OK) {
            set_err(err, errlen, "data plane (mpi): %s", why);
            rc = WRK_ERR_SYS;
            goto fail;
        }
    } else if (c->role != PROTO_ROLE_BOTH) {
        const char *bind = w->data_endpoint;
        if (comm_tcp_new(bind, w->zctx, &w->comm, why, sizeof why) != COMM_OK) {
            set_err(err, errlen, "data plane (tcp) at %s: %s", bind, why);
            rc = WRK_ERR_SYS;
            goto fail;
        }
    }
    xfer_set_comm(w->xfer, w->comm);
    kv_stats kst;
    kv_get_stats(w->kv, &kst);
    w->st.kv_blocks_total = kst.blocks_total;
    w->st.kv_blocks_free = kst.blocks_free;
    *out = w;
    return WRK_OK;
fail:
    wrk_destroy(&w);
    return rc;
}

void wrk_destroy(wrk_t **self_p)
{
    if (!self_p || !*self_p) return;
    wrk_t *w = *self_p;
    if (w->sock) zmq_close(w->sock);
    while (w->pend) {
        pend_assign *p = w->pend;
        w->pend = p->next;
        proto_assign_free(&p->a);
        free(p);
    }
    xfer_set_comm(w->xfer, NULL); /* then the comm lets go of the buffers, then they go */
    comm_destroy(&w->comm);
    xfer_destroy(&w->xfer);
    if (w->zctx) zmq_ctx_term(w->zctx);
    if (w->wake_fd >= 0) close(w->wake_fd);
    sched_destroy(&w->sched);
    kv_destroy(&w->kv);
    model_destroy(&w->model);
    free(w->eog);
    free(w->model_name);
    free(w->ev);
    free(w->tev);
    free(w->tids);
    free(w->live);
    free(w->model_path);
    free(w->endpoint);
    free(w->worker_id);
    free(w->group_name);
    free(w->data_endpoint);
    pthread_mutex_destroy(&w->mu);
    free(w);
    *self_p = NULL;
}

void wrk_stop(wrk_t *w)
{
    if (!w) return;
    atomic_fetch_add(&w->stop, 1);
    uint64_t one = 1;
    ssize_t r = write(w->wake_fd, &one, sizeof one);
    (void)r;
}

const char *wrk_model_sha256(const wrk_t *w) { return w ? w->sha256 : ""; }
const char *wrk_worker_id(const wrk_t *w) { return w ? w->worker_id : ""; }

const int32_t *wrk_eog_ids(const wrk_t *w, int *n)
{
    if (n) *n = w ? w->n_eog : 0;
    return w ? w->eog : NULL;
}

void wrk_get_stats(const wrk_t *w, wrk_stats *out)
{
    if (!w || !out) return;
    pthread_mutex_t *mu = (pthread_mutex_t *)&w->mu;
    pthread_mutex_lock(mu);
    *out = w->st;
    pthread_mutex_unlock(mu);
}

/* Statistics: counters are bumped under the lock; the snapshot refreshes load and KV. */
#define ST_ADD(w, field, n)              \
    do {                                 \
        pthread_mutex_lock(&(w)->mu);    \
        (w)->st.field += (n);            \
        pthread_mutex_unlock(&(w)->mu);  \
    } while (0)

static void set_state(wrk_t *w, wrk_state s)
{
    pthread_mutex_lock(&w->mu);
    w->st.state = s;
    pthread_mutex_unlock(&w->mu);
}

static void refresh_stats(wrk_t *w)
{
    sched_stats ss;
    sched_get_stats(w->sched, &ss);
    pthread_mutex_lock(&w->mu);
    w->st.running = ss.running;
    w->st.waiting = ss.waiting;
    w->st.steps = (int64_t)ss.steps;
    w->st.live = w->n_live;
    w->st.kv_blocks_total = ss.kv.blocks_total;
    w->st.kv_blocks_used = ss.kv.blocks_used;
    w->st.kv_blocks_free = ss.kv.blocks_free;
    w->st.kv_blocks_cached = ss.kv.blocks_evictable;
    w->st.heartbeat_ms = w->hb_ms;
    w->st.dead_after = w->dead_after;
    if (w->xfer) {
        xfer_stats xs;
        xfer_get_stats(w->xfer, &xs);
        w->st.xfers_sent = xs.sent;
        w->st.xfers_received = xs.received;
        w->st.xfers_failed = xs.failed;
        w->st.xfers_expired = xs.expired;
        w->st.xfer_bytes_sent = xs.bytes_sent;
        w->st.xfer_bytes_received = xs.bytes_received;
        w->st.xfers_in_flight = xs.in_flight;
        w->st.kv_blocks_reserved = xs.blocks_reserved;
    }
    pthread_mutex_unlock(&w->mu);
}

/* ---- the connection ----------------------------------------------------------------------- */

static void close_socket(wrk_t *w, int linger_ms)
{
    if (!w->sock) return;
    zmq_setsockopt(w->sock, ZMQ_LINGER, &linger_ms, sizeof linger_ms);
    zmq_close(w->sock);
    w->sock = NULL;
    w->registered = 0;
}

static wrk_status open_socket(wrk_t *w, char *err, size_t errlen)
{
    w->sock = zmq_socket(w->zctx, ZMQ_DEALER);
    if (!w->sock) {
        set_err(err, errlen, "zmq_socket(DEALER): %s", zmq_strerror(zmq_errno()));
        return WRK_ERR_SYS;
    }
    if (proto_socket_options(w->sock, PROTO_SIDE_WORKER, w->cfg.heartbeat_ms) != 0 ||
        zmq_connect(w->sock, w->endpoint) != 0) {
        set_err(err, errlen, "connect to duetd at %s: %s", w->endpoint, zmq_strerror(zmq_errno()));
        close_socket(w, 0);
        /* a malformed endpoint is the configuration's fault */
        return WRK_ERR_CONFIG;
    }
    return WRK_OK;
}

/* Send a body to duetd. 0, or -1 when the connection must be considered lost. */
static int send_body(wrk_t *w, proto_cmd cmd, proto_type t, const void *m, int flags)
{
    if (proto_send_body(w->sock, NULL, PROTO_WORKER, cmd, t, m, flags) == 0) return 0;
    int e = errno;
    if (flags & ZMQ_DONTWAIT && e == EAGAIN) return 0; /* best effort (heartbeat) */
    LOG_W(w, "send %s to duetd failed: %s", proto_cmd_name(cmd), zmq_strerror(e));
    return -1;
}

static int send_failed(wrk_t *w, int64_t rid, int64_t xfer, proto_code code, int retryable,
                       const char *msg)
{
    proto_failed f;
    proto_failed_init(&f);
    f.rid = rid;
    f.xfer = xfer;
    f.code = code;
    f.message = (char *)msg;
    f.retryable = retryable;
    int rc = send_body(w, PROTO_CMD_FAILED, PROTO_T_FAILED, &f, 0);
    if (rid) ST_ADD(w, failed, 1);
    return rc;
}

static int send_heartbeat(wrk_t *w)
{
    sched_stats ss;
    sched_get_stats(w->sched, &ss);
    proto_heartbeat h;
    proto_heartbeat_init(&h);
    h.running = ss.running;
    h.waiting = ss.waiting;
    h.kv_free_blocks = ss.kv.blocks_free;
    h.kv_cached_blocks = ss.kv.blocks_evictable;
    w->last_hb = now_ms();
    ST_ADD(w, heartbeats_out, 1);
    return send_body(w, PROTO_CMD_HEARTBEAT, PROTO_T_HEARTBEAT, &h, ZMQ_DONTWAIT);
}

/* model_forward's per-layer hook: a step can outlast several heartbeat intervals (a long
 * prefill chunk on a loaded machine), and duetd would declare a silent worker dead. This
 * runs on the loop's own thread, so the socket stays single-threaded. */
static void heartbeat_during_step(void *user)
{
    wrk_t *w = user;
    if (w->sock && w->st.state == WRK_STATE_READY && now_ms() - w->last_hb >= w->hb_ms)
        (void)send_heartbeat(w);
}

/* The scheduler's layer hook: ship the layer's KV of the prefills that complete in this
 * step, keep the data plane moving, and keep heartbeats going through a long step. */
static void on_layer(void *user, int layer, const sched_ship *ships, int n)
{
    wrk_t *w = user;
    for (int i = 0; i < n; i++) {
        int64_t xf = xfer_of_rid(w->xfer, ships[i].id);
        if (xf) xfer_ship(w->xfer, xf, ships[i].seq, layer, ships[i].n_tokens);
    }
    if (w->comm) (void)comm_progress(w->comm);
    heartbeat_during_step(w);
}

/* Wait for the socket (events), the wake fd or the signal fd, at most timeout_ms.
 * Returns the socket's revents (0 on timeout or a stop). */
static int wait_io(wrk_t *w, short events, int64_t timeout_ms)
{
    zmq_pollitem_t it[4];
    int n = 0, si = -1, wi, gi = -1;
    void *dz = w->comm ? comm_zsock(w->comm) : NULL;
    if (dz && w->registered) it[n++] = (zmq_pollitem_t){.socket = dz, .events = ZMQ_POLLIN};
    if (w->sock && events) {
        si = n;
        it[n++] = (zmq_pollitem_t){.socket = w->sock, .events = events};
    }
    wi = n;
    it[n++] = (zmq_pollitem_t){.fd = w->wake_fd, .events = ZMQ_POLLIN};
    if (w->cfg.signal_fd >= 0) {
        gi = n;
        it[n++] = (zmq_pollitem_t){.fd = w->cfg.signal_fd, .events = ZMQ_POLLIN};
    }
    if (timeout_ms > WRK_POLL_MAX_MS) timeout_ms = WRK_POLL_MAX_MS;
    if (timeout_ms < 0) timeout_ms = 0;
    if (zmq_poll(it, n, (long)timeout_ms) <= 0) return 0; /* timeout, or EINTR: the caller loops */
    if (it[wi].revents & ZMQ_POLLIN) {
        uint64_t v;
        ssize_t k = read(w->wake_fd, &v, sizeof v);
        (void)k;
    }
    if (gi >= 0 && (it[gi].revents & ZMQ_POLLIN)) {
        struct signalfd_siginfo sig;
        ssize_t k = read(w->cfg.signal_fd, &sig, sizeof sig);
        if (k == (ssize_t)sizeof sig)
            LOG_I(w, "signal %u (%s): stopping", sig.ssi_signo, strsignal((int)sig.ssi_signo));
        else
            LOG_I(w, "stop requested through the signal fd");
        atomic_fetch_add(&w->stop, 1);
    }
    return si >= 0 ? it[si].revents : 0;
}

static int stopping(const wrk_t *w) { return atomic_load(&w->stop) != 0; }

/* While serving: whether to stop now. The first stop request starts a drain (no new
 * requests; those held run to their end) of at most drain_ms; a second one, the end of
 * the drain, or nothing left to run, stops. */
static int stop_now(wrk_t *w)
{
    int n = atomic_load(&w->stop);
    if (n == 0) return 0;
    if (n >= 2 || w->cfg.drain_ms == 0 || w->n_live == 0) return 1;
    int64_t now = now_ms();
    if (!w->draining) {
        w->draining = 1;
        w->drain_until = now + w->cfg.drain_ms;
        LOG_I(w, "stopping: draining %d requests for at most %d ms (no new ones; stop again to "
                 "hand them back now)", w->n_live, w->cfg.drain_ms);
        notify(w, "STOPPING=1\nSTATUS=draining %d requests", w->n_live);
        return 0;
    }
    return now >= w->drain_until;
}

/* ---- registration ------------------------------------------------------------------------- */

static int send_register(wrk_t *w)
{
    proto_register r;
    proto_register_init(&r);
    const model_hparams *hp = model_hparams_of(w->model);
    const model_shard *sh = model_shard_of(w->model);
    const kv_config *kc = kv_config_of(w->kv);
    r.worker_id = w->worker_id;
    r.software = (char *)WRK_SOFTWARE;
    r.model.sha256 = w->sha256;
    r.model.name = w->model_name;
    r.model.n_vocab = hp->n_vocab;
    r.model.n_ctx = w->n_ctx;
    r.kv.block_tokens = kc->block_tokens;
    r.kv.dtype = kc->dtype;
    r.kv.n_layer = hp->n_layer;
    r.kv.n_head_kv = hp->n_head_kv;
    r.kv.head0 = sh->kv_head0;
    r.kv.n_heads = sh->n_head_kv;
    r.kv.head_dim = hp->head_dim;
    r.kv.capacity_blocks = kv_n_blocks(w->kv);
    r.rank = w->comm && comm_backend_of(w->comm) == COMM_BACKEND_MPI ? comm_rank(w->comm) : -1;
    r.group = w->cfg.group;
    r.role = w->cfg.role;
    r.tp_rank = w->cfg.tp_rank;
    r.tp_size = w->cfg.tp_size;
    r.device.kind = PROTO_DEVICE_CPU;
    r.device.index = 0;
    r.device.name = w->cpu_name;
    r.device.memory_bytes = w->mem_bytes;
    r.backend = w->cfg.backend;
    r.endpoint = w->cfg.backend != PROTO_BACKEND_TCP ? NULL
                 : w->comm ? (char *)comm_tcp_endpoint(w->comm) : w->data_endpoint;
    r.max_batch = w->cfg.max_seqs;
    /* the caller polled for POLLOUT: this does not wait */
    if (proto_send_body(w->sock, NULL, PROTO_WORKER, PROTO_CMD_REGISTER, PROTO_T_REGISTER, &r,
                        ZMQ_DONTWAIT) == 0)
        return 0;
    return errno == EAGAIN ? 1 : -1;
}

/* The place duetd gave must be one this worker can serve. */
static phase_rc accept_registered(wrk_t *w, const proto_registered *r, char *err, size_t errlen)
{
    if (r->role != PROTO_ROLE_BOTH && !w->comm) {
        set_err(err, errlen,
                "duetd gave this worker role '%s', which moves KV over the data plane, but it "
                "was started without one (role both); configure its group's role",
                proto_role_name(r->role));
        w->fatal = WRK_ERR_CONFIG;
        return PH_FATAL;
    }
    w->role = r->role;
    if (r->tp_size != w->cfg.tp_size || r->tp_rank != w->cfg.tp_rank) {
        set_err(err, errlen,
                "duetd placed this worker at tp rank %d of %d, but it loaded rank %d of %d",
                r->tp_rank, r->tp_size, w->cfg.tp_rank, w->cfg.tp_size);
        w->fatal = WRK_ERR_CONFIG;
        return PH_FATAL;
    }
    w->hb_ms = r->heartbeat_ms;
    w->dead_after = r->dead_after;
    int sndtimeo = w->hb_ms * w->dead_after;
    if (sndtimeo > PROTO_SEND_TIMEOUT_MS) sndtimeo = PROTO_SEND_TIMEOUT_MS;
    zmq_setsockopt(w->sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo);
    w->registered = 1;
    pthread_mutex_lock(&w->mu);
    w->st.registrations++;
    w->st.rank = r->rank;
    w->st.group = r->group;
    w->st.heartbeat_ms = w->hb_ms;
    w->st.dead_after = w->dead_after;
    w->st.state = WRK_STATE_READY;
    pthread_mutex_unlock(&w->mu);
    LOG_I(w, "registered with duetd at %s: rank %d, group %d, role %s, heartbeat %d ms, dead "
             "after %d", w->endpoint, r->rank, r->group, proto_role_name(r->role), r->heartbeat_ms,
          r->dead_after);
    if (!w->notified_ready) {
        notify(w, "READY=1\nSTATUS=registered with %s as rank %d, group %d", w->endpoint, r->rank,
               r->group);
        w->notified_ready = 1;
    } else {
        notify(w, "STATUS=registered again with %s as rank %d, group %d", w->endpoint, r->rank,
               r->group);
    }
    return PH_OK;
}

/* A refusal: retry later for a place that may free up, else an error for the caller. */
static phase_rc on_refused(wrk_t *w, const json_t *body, char *err, size_t errlen)
{
    proto_refused rf;
    proto_err pe;
    ST_ADD(w, refusals, 1);
    if (proto_refused_parse(body, &rf, &pe) != 0) {
        set_err(err, errlen, "refused by duetd (malformed refusal: %s)", pe.message);
        w->fatal = WRK_ERR_REFUSED;
        return PH_FATAL;
    }
    phase_rc rc;
    if (rf.code == PROTO_ERR_NO_SLOT || rf.code == PROTO_ERR_DUPLICATE_WORKER) {
        LOG_W(w, "refused by duetd: %s: %s; registering again later", proto_code_name(rf.code),
              rf.message ? rf.message : "");
        rc = PH_RETRY;
    } else {
        set_err(err, errlen, "refused by duetd: %s: %s", proto_code_name(rf.code),
                rf.message ? rf.message : "");
        w->fatal = WRK_ERR_REFUSED;
        rc = PH_FATAL;
    }
    proto_refused_free(&rf);
    return rc;
}

/* Log duetd's error; returns its code (PROTO_ERR_OTHER when malformed). */
static proto_code log_error_msg(wrk_t *w, const json_t *body)
{
    proto_error e;
    proto_err pe;
    if (proto_error_parse(body, &e, &pe) != 0) {
        LOG_W(w, "duetd sent a malformed error: %s", pe.message);
        return PROTO_ERR_OTHER;
    }
    LOG_W(w, "duetd reports an error%s%s: %s: %s", e.command ? " about " : "",
          e.command ? e.command : "", proto_code_name(e.code), e.message ? e.message : "");
    proto_code code = e.code;
    proto_error_free(&e);
    return code;
}

/* Connect, register, and wait for the answer (at most dead_after heartbeat intervals
 * of the configuration). */
static phase_rc do_register(wrk_t *w, char *err, size_t errlen)
{
    set_state(w, WRK_STATE_REGISTERING);
    w->hb_ms = w->cfg.heartbeat_ms;
    w->dead_after = w->cfg.dead_after;
    wrk_status os = open_socket(w, err, errlen);
    if (os != WRK_OK) {
        w->fatal = os;
        return PH_FATAL;
    }
    notify(w, "STATUS=registering with duetd at %s", w->endpoint);
    const int64_t deadline = now_ms() + (int64_t)w->cfg.heartbeat_ms * w->cfg.dead_after;
    int sent = 0;
    for (;;) {
        if (stopping(w)) return PH_STOP;
        int64_t now = now_ms();
        if (now >= deadline) {
            LOG_W(w, "%s duetd at %s within %d ms; registering again",
                  sent ? "no answer to register from" : "no connection to", w->endpoint,
                  w->cfg.heartbeat_ms * w->cfg.dead_after);
            return PH_RETRY;
        }
        int rev = wait_io(w, (short)(ZMQ_POLLIN | (sent ? 0 : ZMQ_POLLOUT)), deadline - now);
        if (stopping(w)) return PH_STOP;
        if (!sent && (rev & ZMQ_POLLOUT)) {
            int r = send_register(w);
            if (r < 0) {
                LOG_W(w, "send register to %s failed: %s", w->endpoint, zmq_strerror(errno));
                return PH_RETRY;
            }
            if (r == 0) {
                sent = 1;
                LOG_D(w, "register sent to %s (model sha256 %.16s..., %d KV blocks)", w->endpoint,
                      w->sha256, kv_n_blocks(w->kv));
            }
        }
        if (!(rev & ZMQ_POLLIN)) continue;
        for (;;) {
            proto_msg m = {0};
            proto_err pe;
            proto_rc pr = proto_recv(w->sock, PROTO_SIDE_WORKER, 0, 0, &m, &pe);
            if (pr == PROTO_TIMEOUT) break;
            if (pr == PROTO_SYSERR) {
                if (errno == EINTR) break;
                LOG_W(w, "receive from duetd failed: %s", pe.message);
                return PH_RETRY;
            }
            if (pr == PROTO_INVALID) {
                ST_ADD(w, bad_msgs_in, 1);
                LOG_W(w, "malformed message from duetd (%s): %s", proto_code_name(pe.code),
                      pe.message);
                continue;
            }
            ST_ADD(w, msgs_in, 1);
            phase_rc rc = PH_OK;
            int done = 1;
            if (m.cmd == PROTO_CMD_REGISTERED) {
                proto_registered r;
                if (proto_registered_parse(m.body, &r, &pe) != 0) {
                    set_err(err, errlen, "duetd's registered is malformed: %s", pe.message);
                    w->fatal = WRK_ERR_SYS;
                    rc = PH_FATAL;
                } else {
                    rc = accept_registered(w, &r, err, errlen);
                    proto_registered_free(&r);
                }
            } else if (m.cmd == PROTO_CMD_REFUSED) {
                rc = on_refused(w, m.body, err, errlen);
            } else if (m.cmd == PROTO_CMD_ERROR) {
                log_error_msg(w, m.body);
                done = 0;
            } else {
                ST_ADD(w, bad_msgs_in, 1);
                LOG_W(w, "'%s' from duetd before registered: ignored", proto_cmd_name(m.cmd));
                done = 0;
            }
            proto_msg_clear(&m);
            if (done) return rc;
        }
    }
}

/* ---- serving ------------------------------------------------------------------------------ */

static proto_finish finish_of(sched_finish f)
{
    switch (f) {
    case SCHED_FINISH_STOP: return PROTO_FINISH_STOP;
    case SCHED_FINISH_EOS: return PROTO_FINISH_EOS;
    case SCHED_FINISH_LENGTH: return PROTO_FINISH_LENGTH;
    case SCHED_FINISH_CANCELLED: return PROTO_FINISH_CANCELLED;
    }
    return PROTO_FINISH_CANCELLED;
}

/* Reject an assign (rid known): failed, with the code and message. */
static int reject(wrk_t *w, int64_t rid, int64_t xfer, proto_code code, int retryable,
                  const char *msg)
{
    LOG_I(w, "assign rid %" PRId64 " rejected (%s): %s", rid, proto_code_name(code), msg);
    ST_ADD(w, rejected, 1);
    return send_failed(w, rid, xfer, code, retryable, msg);
}

/* The sampler state of an assign (assign.rng), or NULL (seed from sampling.seed). */
static const sample_rng *assign_rng(wrk_t *w, const proto_assign *a, sample_rng *buf)
{
    if (!a->rng) return NULL;
    if (sample_rng_from_hex(a->rng, buf) == 0) return buf;
    LOG_W(w, "assign rid %" PRId64 ": 'rng' is not a usable PRNG state: seeding from "
             "sampling.seed", a->rid);
    return NULL;
}

/* Map a scheduler status of sched_add to a rejection. */
static int reject_sched(wrk_t *w, int64_t rid, int64_t xfer, sched_status st, const char *why)
{
    char msg[512];
    snprintf(msg, sizeof msg, "assign: %s", why);
    switch (st) {
    case SCHED_ERR_TOO_LONG: return reject(w, rid, xfer, PROTO_ERR_KV_FULL, 1, msg);
    case SCHED_ERR_NOMEM: return reject(w, rid, xfer, PROTO_ERR_INTERNAL, 1, msg);
    default: return reject(w, rid, xfer, PROTO_ERR_BAD_REQUEST, 0, msg);
    }
}

/* Add a request to the scheduler and the live table: *st SCHED_OK, or the refusal in *st
 * and why[]. Returns 1 when the scheduler took the request (and a has_kv sequence with
 * it) even if *st is not SCHED_OK (out of memory for the table: it was cancelled there). */
static int admit(wrk_t *w, const sched_req *q, const proto_assign *a, sched_status *st,
                 char *why, size_t whylen)
{
    *st = sched_add(w->sched, q, why, whylen);
    if (*st != SCHED_OK) return 0;
    if (live_put(w, a->rid, a->n_generated) != 0) {
        sched_cancel(w->sched, (uint64_t)a->rid); /* its FINISHED is dropped: not in the table */
        *st = SCHED_ERR_NOMEM;
        snprintf(why, whylen, "request %" PRId64 ": out of memory", a->rid);
        return 1;
    }
    live_req *lr = live_find(w, a->rid);
    lr->role = a->role;
    lr->xfer = a->has_transfer ? a->transfer.xfer : 0;
    ST_ADD(w, assigns, 1);
    return 1;
}

/* A decode assign whose KV is all here: hand the sequence to the scheduler. Returns -1
 * when the connection is lost. */
static int start_decode(wrk_t *w, const proto_assign *a)
{
    const int64_t xf = a->transfer.xfer;
    const int n_ctx_tokens = a->n_tokens + a->n_generated;
    int seq = -1, n_kv = 0;
    char msg[512];
    if (xfer_take(w->xfer, xf, &seq, &n_kv) != XFER_OK) {
        snprintf(msg, sizeof msg, "assign rid %" PRId64 ": transfer %" PRId64 " is not complete "
                 "here", a->rid, xf);
        return reject(w, a->rid, xf, PROTO_ERR_TRANSFER_FAILED, 1, msg);
    }
    if (n_kv != n_ctx_tokens - 1) {
        kv_seq_free(w->kv, seq);
        snprintf(msg, sizeof msg, "assign rid %" PRId64 ": transfer %" PRId64 " carried the KV of "
                 "%d tokens, but the context before the last generated token has %d", a->rid,
                 xf, n_kv, n_ctx_tokens - 1);
        return reject(w, a->rid, xf, PROTO_ERR_BAD_REQUEST, 0, msg);
    }
    int32_t *ctx = malloc((size_t)n_ctx_tokens * sizeof *ctx);
    if (!ctx) {
        kv_seq_free(w->kv, seq);
        return reject(w, a->rid, xf, PROTO_ERR_INTERNAL, 1, "assign: out of memory");
    }
    memcpy(ctx, a->tokens, (size_t)a->n_tokens * sizeof *ctx);
    memcpy(ctx + a->n_tokens, a->generated, (size_t)a->n_generated * sizeof *ctx);
    sample_rng rb;
    sched_req q = {.id = (uint64_t)a->rid, .prompt = ctx, .n_prompt = n_ctx_tokens,
                   .sp = proto_sampling_params(&a->sampling, (uint64_t)a->sampling.seed),
                   .max_tokens = a->max_tokens - a->n_generated, .stop_ids = a->stop_token_ids,
                   .n_stop_ids = a->n_stop_token_ids, .ignore_eog = a->ignore_eos,
                   .rng = assign_rng(w, a, &rb), .has_kv = 1, .kv_seq = seq, .n_kv = n_kv};
    char why[256];
    sched_status st;
    const int taken = admit(w, &q, a, &st, why, sizeof why);
    free(ctx);
    if (st != SCHED_OK) {
        if (!taken) kv_seq_free(w->kv, seq);
        return reject_sched(w, a->rid, xf, st, why);
    }
    LOG_D(w, "decode rid %" PRId64 ": KV of %d tokens from transfer %" PRId64 ", up to %d new",
          a->rid, n_kv, xf, a->max_tokens - a->n_generated);
    return 0;
}

/* assign: queue the request. Returns -1 when the connection is lost. */
static int on_assign(wrk_t *w, const json_t *body)
{
    proto_assign a;
    proto_err pe;
    if (proto_assign_parse(body, &a, &pe) != 0) {
        const json_t *jr = json_is_object(body) ? json_object_get(body, "rid") : NULL;
        json_int_t rid = json_is_integer(jr) ? json_integer_value(jr) : 0;
        if (rid >= 1 && rid <= PROTO_MAX_INT)
            return reject(w, (int64_t)rid, 0, pe.code, 0, pe.message);
        ST_ADD(w, bad_msgs_in, 1);
        LOG_W(w, "malformed assign without a valid rid: %s", pe.message);
        return 0;
    }
    char msg[512];
    int rc = 0;
    int32_t *ctx = NULL;
    const int64_t xf = a.has_transfer ? a.transfer.xfer : 0;
    if (w->draining) {
        snprintf(msg, sizeof msg, "assign: worker %s is stopping and takes no new requests",
                 w->worker_id);
        rc = reject(w, a.rid, xf, PROTO_ERR_INTERNAL, 1, msg);
        goto out;
    }
    if (a.role != PROTO_ROLE_BOTH && (!w->comm || (w->role != a.role && w->role != PROTO_ROLE_ANY))) {
        snprintf(msg, sizeof msg, "assign: role '%s' on a worker of role '%s'%s",
                 proto_role_name(a.role), proto_role_name(w->role),
                 w->comm ? "" : " without a KV data plane");
        rc = reject(w, a.rid, xf, PROTO_ERR_BAD_REQUEST, 0, msg);
        goto out;
    }
    if (a.role != PROTO_ROLE_BOTH && !a.has_transfer) {
        snprintf(msg, sizeof msg, "assign: role '%s' needs a 'transfer'", proto_role_name(a.role));
        rc = reject(w, a.rid, 0, PROTO_ERR_BAD_REQUEST, 0, msg);
        goto out;
    }
    if (live_find(w, a.rid)) {
        snprintf(msg, sizeof msg, "assign: rid %" PRId64 " is already running on this worker",
                 a.rid);
        rc = reject(w, a.rid, 0, PROTO_ERR_BAD_REQUEST, 0, msg);
        goto out;
    }
    const int n_ctx_tokens = a.n_tokens + a.n_generated;
    const int budget = a.max_tokens - a.n_generated; /* >= 1: the schema checks it */
    if ((int64_t)n_ctx_tokens + budget > w->n_ctx) {
        snprintf(msg, sizeof msg,
                 "assign rid %" PRId64 ": the context (%d prompt + %d generated tokens) plus the "
                 "%d tokens left exceed this worker's context limit of %d tokens", a.rid,
                 a.n_tokens, a.n_generated, budget, w->n_ctx);
        rc = reject(w, a.rid, xf, PROTO_ERR_BAD_REQUEST, 0, msg);
        goto out;
    }
    if (a.role == PROTO_ROLE_DECODE) {
        if (a.n_generated < 1) {
            rc = reject(w, a.rid, xf, PROTO_ERR_BAD_REQUEST, 0,
                        "assign: a decode assign carries the prefill's token in 'generated'");
            goto out;
        }
        if (xfer_received(w->xfer, xf)) {
            rc = start_decode(w, &a);
            goto out;
        }
        if (!xfer_holds(w->xfer, xf)) {
            snprintf(msg, sizeof msg, "assign rid %" PRId64 ": transfer %" PRId64 " is not held "
                     "here (never reserved, released, failed or expired)", a.rid, xf);
            rc = reject(w, a.rid, xf, PROTO_ERR_TRANSFER_FAILED, 1, msg);
            goto out;
        }
        pend_assign *p = calloc(1, sizeof *p);
        if (!p) {
            rc = reject(w, a.rid, xf, PROTO_ERR_INTERNAL, 1, "assign: out of memory");
            goto out;
        }
        p->a = a; /* ownership moves */
        proto_assign_init(&a);
        xfer_expect(w->xfer, xf); /* the source has sent it all: the lease runs from now */
        p->next = w->pend;
        w->pend = p;
        LOG_D(w, "decode rid %" PRId64 ": waiting for the rest of transfer %" PRId64, p->a.rid, xf);
        goto out;
    }
    ctx = malloc((size_t)n_ctx_tokens * sizeof *ctx);
    if (!ctx) {
        rc = reject(w, a.rid, xf, PROTO_ERR_INTERNAL, 1, "assign: out of memory");
        goto out;
    }
    memcpy(ctx, a.tokens, (size_t)a.n_tokens * sizeof *ctx);
    if (a.n_generated) memcpy(ctx + a.n_tokens, a.generated, (size_t)a.n_generated * sizeof *ctx);
    if (a.session)
        LOG_D(w, "assign rid %" PRId64 ": session '%s': its full blocks stay in the prefix cache",
              a.rid, a.session);
    const int prefill = a.role == PROTO_ROLE_PREFILL;
    sample_rng rb;
    sched_req q = {.id = (uint64_t)a.rid, .prompt = ctx, .n_prompt = n_ctx_tokens,
                   .sp = proto_sampling_params(&a.sampling, (uint64_t)a.sampling.seed),
                   .max_tokens = prefill ? 1 : budget, .stop_ids = a.stop_token_ids,
                   .n_stop_ids = a.n_stop_token_ids, .ignore_eog = a.ignore_eos,
                   .rng = assign_rng(w, &a, &rb), .ship_kv = prefill};
    char why[256];
    if (prefill) {
        xfer_peer *dst = calloc((size_t)a.transfer.n_peers + 1, sizeof *dst);
        if (!dst) {
            rc = reject(w, a.rid, xf, PROTO_ERR_INTERNAL, 1, "assign: out of memory");
            goto out;
        }
        for (int i = 0; i < a.transfer.n_peers; i++)
            dst[i] = (xfer_peer){.rank = a.transfer.peers[i].rank,
                                 .head0 = a.transfer.peers[i].head0,
                                 .n_heads = a.transfer.peers[i].n_heads};
        xfer_status xs = xfer_send_begin(w->xfer, xf, (uint64_t)a.rid, dst, a.transfer.n_peers,
                                         a.transfer.first_block, a.transfer.lease_ms, why,
                                         sizeof why);
        free(dst);
        if (xs != XFER_OK) {
            snprintf(msg, sizeof msg, "assign: %s", why);
            rc = reject(w, a.rid, xf,
                        xs == XFER_ERR_COMM ? PROTO_ERR_TRANSFER_FAILED
                        : xs == XFER_ERR_NOMEM ? PROTO_ERR_INTERNAL : PROTO_ERR_BAD_REQUEST,
                        xs != XFER_ERR_INVAL, msg);
            goto out;
        }
    }
    sched_status st;
    (void)admit(w, &q, &a, &st, why, sizeof why);
    if (st != SCHED_OK) {
        if (prefill) xfer_release(w->xfer, xf);
        rc = reject_sched(w, a.rid, xf, st, why);
        goto out;
    }
    LOG_D(w, "assign rid %" PRId64 " (%s): %d context tokens, up to %d new", a.rid,
          proto_role_name(a.role), n_ctx_tokens, prefill ? 1 : budget);
out:
    free(ctx);
    proto_assign_free(&a);
    return rc;
}

/* The pending decode assign of transfer xf, unlinked, or NULL. */
static pend_assign *pend_take(wrk_t *w, int64_t xf, int64_t rid)
{
    for (pend_assign **p = &w->pend; *p; p = &(*p)->next)
        if ((xf && (*p)->a.transfer.xfer == xf) || (rid && (*p)->a.rid == rid)) {
            pend_assign *r = *p;
            *p = r->next;
            return r;
        }
    return NULL;
}

static void pend_free(pend_assign *p)
{
    if (!p) return;
    proto_assign_free(&p->a);
    free(p);
}

static int send_finished(wrk_t *w, int64_t rid, proto_finish reason, int n_generated, int cached)
{
    proto_finished f;
    proto_finished_init(&f);
    f.rid = rid;
    f.reason = reason;
    f.n_generated = n_generated;
    f.cached_tokens = cached;
    ST_ADD(w, finished, 1);
    return send_body(w, PROTO_CMD_FINISHED, PROTO_T_FINISHED, &f, 0);
}

static int on_cancel(wrk_t *w, const json_t *body)
{
    proto_wcancel c;
    proto_err pe;
    if (proto_wcancel_parse(body, &c, &pe) != 0) {
        ST_ADD(w, bad_msgs_in, 1);
        LOG_W(w, "malformed cancel: %s", pe.message);
        return 0;
    }
    ST_ADD(w, cancels, 1);
    int rc = 0;
    pend_assign *p = pend_take(w, 0, c.rid);
    if (p) { /* a decode waiting for its KV */
        xfer_release(w->xfer, p->a.transfer.xfer);
        rc = send_finished(w, c.rid, PROTO_FINISH_CANCELLED, p->a.n_generated, 0);
        pend_free(p);
        proto_wcancel_free(&c);
        return rc;
    }
    live_req *lr = live_find(w, c.rid);
    sched_status st = sched_cancel(w->sched, (uint64_t)c.rid);
    /* Unknown: its finished or failed is already on its way (PROTOCOL.md). */
    LOG_D(w, "cancel rid %" PRId64 ": %s", c.rid, st == SCHED_OK ? "cancelled" : "not running");
    if (lr && (st == SCHED_OK || (lr->role == PROTO_ROLE_PREFILL && lr->done))) {
        /* Done with it now, not at the next step: duetd may assign the rid here again at
         * once (a retry), and the scheduler's own FINISHED finds no entry and is dropped. */
        const int gen = lr->gen0;
        if (lr->role == PROTO_ROLE_PREFILL) xfer_release(w->xfer, lr->xfer);
        const int answer = st == SCHED_OK;
        live_del(w, lr);
        if (answer) rc = send_finished(w, c.rid, PROTO_FINISH_CANCELLED, gen, 0);
    }
    proto_wcancel_free(&c);
    return rc;
}

/* reserve (decode side): room for a transfer's KV, receives posted. */
static int on_reserve(wrk_t *w, const json_t *body)
{
    proto_reserve r;
    proto_err pe;
    if (proto_reserve_parse(body, &r, &pe) != 0) {
        const json_t *jx = json_is_object(body) ? json_object_get(body, "xfer") : NULL;
        const json_t *jr = json_is_object(body) ? json_object_get(body, "rid") : NULL;
        ST_ADD(w, bad_msgs_in, 1);
        LOG_W(w, "malformed reserve: %s", pe.message);
        if (json_is_integer(jx) && json_is_integer(jr) && json_integer_value(jx) >= 1 &&
            json_integer_value(jr) >= 1)
            return send_failed(w, (int64_t)json_integer_value(jr), (int64_t)json_integer_value(jx),
                               PROTO_ERR_BAD_REQUEST, 0, pe.message);
        return 0;
    }
    char why[256];
    int rc = 0;
    if (w->draining || !w->comm || (w->role != PROTO_ROLE_DECODE && w->role != PROTO_ROLE_ANY)) {
        snprintf(why, sizeof why, "reserve: worker %s %s", w->worker_id,
                 w->draining ? "is stopping" : "does not receive KV (its role is not decode)");
        rc = send_failed(w, r.rid, r.xfer, w->draining ? PROTO_ERR_INTERNAL : PROTO_ERR_BAD_REQUEST,
                         w->draining, why);
        goto out;
    }
    xfer_peer *src = calloc((size_t)r.n_src + 1, sizeof *src);
    if (!src) {
        rc = send_failed(w, r.rid, r.xfer, PROTO_ERR_INTERNAL, 1, "reserve: out of memory");
        goto out;
    }
    for (int i = 0; i < r.n_src; i++)
        src[i] = (xfer_peer){.rank = r.src[i].rank, .head0 = r.src[i].head0,
                             .n_heads = r.src[i].n_heads};
    int cached = 0;
    int lease = r.lease_ms;
    xfer_status xs = xfer_reserve(w->xfer, r.xfer, (uint64_t)r.rid, r.tokens, r.n_tokens, src,
                                  r.n_src, lease, &cached, why, sizeof why);
    free(src);
    if (xs != XFER_OK) {
        LOG_I(w, "%s", why);
        rc = send_failed(w, r.rid, r.xfer,
                         xs == XFER_ERR_FULL ? PROTO_ERR_KV_FULL
                         : xs == XFER_ERR_INVAL ? PROTO_ERR_BAD_REQUEST
                         : xs == XFER_ERR_COMM ? PROTO_ERR_TRANSFER_FAILED : PROTO_ERR_INTERNAL,
                         xs != XFER_ERR_INVAL, why);
        goto out;
    }
    proto_reserved ok;
    proto_reserved_init(&ok);
    ok.xfer = r.xfer;
    ok.rid = r.rid;
    ok.cached_tokens = cached;
    ok.lease_ms = lease;
    LOG_D(w, "reserved transfer %" PRId64 " (rid %" PRId64 "): %d tokens, %d cached", r.xfer, r.rid,
          r.n_tokens, cached);
    rc = send_body(w, PROTO_CMD_RESERVED, PROTO_T_RESERVED, &ok, 0);
out:
    proto_reserve_free(&r);
    return rc;
}

/* release: drop a transfer (either side). */
static void on_release(wrk_t *w, const json_t *body)
{
    proto_xfer_ref x;
    proto_err pe;
    if (proto_parse(PROTO_T_RELEASE, body, &x, &pe) != 0) {
        ST_ADD(w, bad_msgs_in, 1);
        LOG_W(w, "malformed release: %s", pe.message);
        return;
    }
    pend_free(pend_take(w, x.xfer, 0)); /* abandoned by duetd: it expects nothing more */
    xfer_release(w->xfer, x.xfer);
    LOG_D(w, "release transfer %" PRId64 " (rid %" PRId64 ")", x.xfer, x.rid);
    proto_free(PROTO_T_RELEASE, &x);
}

/* comm_init (tcp): the endpoints of the live ranks. */
static void on_comm_init(wrk_t *w, const json_t *body)
{
    proto_comm_init ci;
    proto_err pe;
    if (proto_comm_init_parse(body, &ci, &pe) != 0) {
        ST_ADD(w, bad_msgs_in, 1);
        LOG_W(w, "malformed comm_init: %s", pe.message);
        return;
    }
    if (!w->comm || comm_backend_of(w->comm) != COMM_BACKEND_TCP || ci.backend != PROTO_BACKEND_TCP) {
        LOG_D(w, "comm_init (backend %d) ignored: %s", (int)ci.backend,
              w->comm ? "this worker's data plane is not tcp" : "this worker has no data plane");
        proto_comm_init_free(&ci);
        return;
    }
    const char **eps = calloc((size_t)ci.world_size + 1, sizeof *eps);
    if (!eps) {
        LOG_E(w, "comm_init: out of memory");
        proto_comm_init_free(&ci);
        return;
    }
    for (int i = 0; i < ci.n_peers; i++)
        if (ci.peers[i].rank >= 0 && ci.peers[i].rank < ci.world_size)
            eps[ci.peers[i].rank] = ci.peers[i].endpoint;
    comm_status cs = comm_tcp_set_world(w->comm, ci.rank, ci.world_size, eps);
    if (cs != COMM_OK)
        LOG_E(w, "comm_init: %s: %s", comm_strerror(cs), comm_last_error(w->comm));
    else
        LOG_D(w, "data plane: rank %d of %d, %d live peers", ci.rank, ci.world_size, ci.n_peers);
    free(eps);
    proto_comm_init_free(&ci);
}

/* One message from duetd. Returns PH_OK, PH_RETRY (connection lost or re-registration
 * asked) or PH_FATAL. */
static phase_rc on_message(wrk_t *w, proto_msg *m, char *err, size_t errlen)
{
    switch (m->cmd) {
    case PROTO_CMD_HEARTBEAT: {
        proto_heartbeat h;
        proto_err pe;
        if (proto_heartbeat_parse(m->body, &h, &pe) != 0) {
            ST_ADD(w, bad_msgs_in, 1);
            LOG_W(w, "malformed heartbeat: %s", pe.message);
        } else {
            ST_ADD(w, heartbeats_in, 1);
            proto_heartbeat_free(&h);
        }
        return PH_OK;
    }
    case PROTO_CMD_ASSIGN: return on_assign(w, m->body) == 0 ? PH_OK : PH_RETRY;
    case PROTO_CMD_CANCEL: return on_cancel(w, m->body) == 0 ? PH_OK : PH_RETRY;
    case PROTO_CMD_RESERVE: return on_reserve(w, m->body) == 0 ? PH_OK : PH_RETRY;
    case PROTO_CMD_RELEASE: on_release(w, m->body); return PH_OK;
    case PROTO_CMD_COMM_INIT: on_comm_init(w, m->body); return PH_OK;
    case PROTO_CMD_REGISTERED:
        LOG_W(w, "registered while already registered: ignored");
        return PH_OK;
    case PROTO_CMD_REFUSED: {
        phase_rc rc = on_refused(w, m->body, err, errlen);
        if (rc == PH_FATAL) return PH_FATAL;
        return PH_RETRY;
    }
    case PROTO_CMD_ERROR:
        /* unexpected_command answers a worker command that duetd takes only from a
         * registered worker: duetd no longer counts this one (it declared it dead, or
         * restarted), so its requests are gone there too. */
        if (log_error_msg(w, m->body) != PROTO_ERR_UNEXPECTED_COMMAND) return PH_OK;
        LOG_W(w, "duetd does not count this worker as registered: dropping %d requests, "
                 "registering again", w->n_live);
        return PH_RETRY;
    default:
        ST_ADD(w, bad_msgs_in, 1);
        LOG_W(w, "unexpected '%s' from duetd: ignored", proto_cmd_name(m->cmd));
        return PH_OK;
    }
}

/* kv_ready for a prefill whose first token is out and whose sends all completed; the
 * request is done here. */
static int send_kv_ready(wrk_t *w, live_req *lr)
{
    proto_kv_ready k;
    proto_kv_ready_init(&k);
    char hex[65];
    sample_rng_to_hex(&lr->rng, hex);
    k.xfer = lr->xfer;
    k.rid = lr->rid;
    k.n_tokens = lr->n_tokens;
    k.cached_tokens = lr->n_cached < lr->n_tokens ? lr->n_cached : lr->n_tokens;
    k.rng = hex;
    k.bytes = lr->bytes;
    k.send_ms = lr->send_ms;
    k.tail_ms = lr->tail_ms;
    LOG_D(w, "kv_ready transfer %" PRId64 " (rid %" PRId64 "): %d tokens, %" PRId64 " bytes in "
          "%.2f ms", lr->xfer, lr->rid, lr->n_tokens, lr->bytes, lr->send_ms);
    live_del(w, lr);
    return send_body(w, PROTO_CMD_KV_READY, PROTO_T_KV_READY, &k, 0);
}

/* The transfer engine's events: kv_ack, kv_ready, failures. -1 when the connection is lost. */
static int xfer_events(wrk_t *w)
{
    xfer_event ev;
    while (xfer_next_event(w->xfer, &ev)) {
        const int64_t rid = (int64_t)ev.rid;
        live_req *lr = live_find(w, rid);
        const int prefill = lr && lr->role == PROTO_ROLE_PREFILL && lr->xfer == ev.xfer;
        switch (ev.type) {
        case XFER_EV_RECEIVED: {
            proto_xfer_ref k = {.xfer = ev.xfer, .rid = rid};
            LOG_D(w, "transfer %" PRId64 " (rid %" PRId64 "): all KV here (%zu bytes, %.2f ms)",
                  ev.xfer, rid, ev.bytes, ev.ms);
            if (send_body(w, PROTO_CMD_KV_ACK, PROTO_T_KV_ACK, &k, 0) != 0) return -1;
            pend_assign *p = pend_take(w, ev.xfer, 0);
            if (p) {
                int rc = start_decode(w, &p->a);
                pend_free(p);
                if (rc != 0) return -1;
            }
            break;
        }
        case XFER_EV_SENT:
            if (!prefill) break;
            lr->sent = 1;
            lr->bytes = (int64_t)ev.bytes;
            lr->send_ms = ev.ms;
            lr->tail_ms = ev.tail_ms;
            lr->n_tokens = ev.n_tokens;
            if (lr->done && send_kv_ready(w, lr) != 0) return -1;
            break;
        case XFER_EV_FAILED:
        case XFER_EV_EXPIRED: {
            const proto_code code =
                ev.type == XFER_EV_EXPIRED ? PROTO_ERR_LEASE_EXPIRED : PROTO_ERR_TRANSFER_FAILED;
            LOG_W(w, "%s", ev.msg);
            if (prefill) {
                lr->xfailed = 1;
                if (lr->done)
                    live_del(w, lr);
                else
                    sched_cancel(w->sched, (uint64_t)rid);
            } else {
                pend_free(pend_take(w, ev.xfer, 0));
            }
            if (send_failed(w, rid, ev.xfer, code, 1, ev.msg) != 0) return -1;
            break;
        }
        }
    }
    return 0;
}

/* Send one delivery of scheduler events: their tokens (merged per request, at most
 * PROTO_MAX_EVENTS per message), then finished/failed. -1 when the connection is lost. */
static int send_events(wrk_t *w, const sched_event *ev, int n_ev)
{
    int n_tev = 0, n_ids = 0;
    int64_t n_tok = 0;
    for (int i = 0; i < n_ev; i++) {
        const sched_event *e = &ev[i];
        if (e->type != SCHED_EV_TOKEN) continue;
        live_req *lr = live_find(w, (int64_t)e->id);
        if (!lr || lr->xfailed) continue; /* dropped (out of memory at assign), or failed */
        if (lr->role == PROTO_ROLE_PREFILL) lr->rng = e->rng;
        int index = lr->gen0 + e->index;
        proto_token_event *last = n_tev ? &w->tev[n_tev - 1] : NULL;
        if (last && last->rid == lr->rid && last->index + last->n_ids == index &&
            last->ids + last->n_ids == &w->tids[n_ids]) {
            last->n_ids++;
        } else {
            if (n_tev == PROTO_MAX_EVENTS) {
                proto_tokens t = {.events = w->tev, .n_events = n_tev};
                if (send_body(w, PROTO_CMD_TOKENS, PROTO_T_TOKENS, &t, 0) != 0) return -1;
                n_tev = 0;
            }
            w->tev[n_tev++] = (proto_token_event){.rid = lr->rid, .index = index,
                                                  .ids = &w->tids[n_ids], .n_ids = 1};
        }
        w->tids[n_ids++] = e->token;
        n_tok++;
    }
    if (n_tev) {
        proto_tokens t = {.events = w->tev, .n_events = n_tev};
        if (send_body(w, PROTO_CMD_TOKENS, PROTO_T_TOKENS, &t, 0) != 0) return -1;
    }
    if (n_tok) ST_ADD(w, tokens_out, n_tok);
    for (int i = 0; i < n_ev; i++) {
        const sched_event *e = &ev[i];
        if (e->type == SCHED_EV_TOKEN) continue;
        live_req *lr = live_find(w, (int64_t)e->id);
        if (!lr) continue;
        int64_t rid = lr->rid;
        int gen0 = lr->gen0;
        if (lr->xfailed) { /* its failed went out with the transfer's */
            live_del(w, lr);
            continue;
        }
        if (lr->role == PROTO_ROLE_PREFILL && !(e->type == SCHED_EV_FINISHED &&
                                                e->reason == SCHED_FINISH_CANCELLED)) {
            if (e->type == SCHED_EV_FAILED) {
                int64_t xf = lr->xfer;
                live_del(w, lr);
                xfer_release(w->xfer, xf);
                LOG_W(w, "rid %" PRId64 " failed: %s", rid, e->msg);
                if (send_failed(w, rid, xf, PROTO_ERR_INTERNAL, 1, e->msg) != 0) return -1;
                continue;
            }
            /* the first token is out: kv_ready follows once every send completed */
            lr->done = 1;
            lr->n_cached = e->usage.n_cached > 0 ? e->usage.n_cached : 0;
            if (lr->sent && send_kv_ready(w, lr) != 0) return -1;
            continue;
        }
        if (lr->role == PROTO_ROLE_PREFILL) xfer_release(w->xfer, lr->xfer);
        live_del(w, lr);
        if (e->type == SCHED_EV_FINISHED) {
            proto_finished f;
            proto_finished_init(&f);
            f.rid = rid;
            f.reason = finish_of(e->reason);
            f.n_generated = gen0 + e->usage.n_generated;
            f.cached_tokens = e->usage.n_cached > 0 ? e->usage.n_cached : 0;
            LOG_D(w, "rid %" PRId64 " finished: %s, %d tokens, %d cached", rid,
                  proto_finish_name(f.reason), f.n_generated, f.cached_tokens);
            ST_ADD(w, finished, 1);
            if (send_body(w, PROTO_CMD_FINISHED, PROTO_T_FINISHED, &f, 0) != 0) return -1;
        } else {
            LOG_W(w, "rid %" PRId64 " failed: %s", rid, e->msg);
            if (send_failed(w, rid, 0, PROTO_ERR_INTERNAL, 1, e->msg) != 0) return -1;
        }
    }
    return 0;
}

/* Cancel everything the scheduler holds and discard the events (KV blocks freed). */
static void drop_all(wrk_t *w)
{
    int n = w->n_live;
    for (int i = 0; i < w->live_cap; i++)
        if (w->live[i].rid) sched_cancel(w->sched, (uint64_t)w->live[i].rid);
    memset(w->live, 0, (size_t)w->live_cap * sizeof *w->live);
    w->n_live = 0;
    while (w->pend) {
        pend_assign *p = w->pend;
        w->pend = p->next;
        pend_free(p);
    }
    xfer_clear(w->xfer);
    for (int k = 0; k < WRK_DROP_MAX_STEPS && sched_busy(w->sched); k++) {
        int n_ev = 0;
        if (sched_step(w->sched, w->ev, w->ev_cap, &n_ev) != SCHED_OK) break;
    }
    if (n) ST_ADD(w, dropped, n);
    refresh_stats(w);
}

/* At stop: every held request fails (retryable), so duetd runs it elsewhere. */
static void fail_all(wrk_t *w)
{
    int lost = 0;
    for (int i = 0; i < w->live_cap && !lost; i++) {
        if (!w->live[i].rid) continue;
        char msg[128];
        snprintf(msg, sizeof msg, "worker %s is stopping: request %" PRId64 " not finished here",
                 w->worker_id, w->live[i].rid);
        lost = send_failed(w, w->live[i].rid, w->live[i].xfer, PROTO_ERR_INTERNAL, 1, msg) != 0;
    }
    for (pend_assign *p = w->pend; p && !lost; p = p->next) {
        char msg[128];
        snprintf(msg, sizeof msg, "worker %s is stopping: request %" PRId64 " not finished here",
                 w->worker_id, p->a.rid);
        lost = send_failed(w, p->a.rid, p->a.transfer.xfer, PROTO_ERR_INTERNAL, 1, msg) != 0;
    }
    drop_all(w);
}

/* Serve a registered connection until it stops, is lost, or fails. */
static phase_rc serve(wrk_t *w, char *err, size_t errlen)
{
    w->last_recv = now_ms();
    if (send_heartbeat(w) != 0) return PH_RETRY;
    notify(w, "STATUS=serving: rank %d", w->st.rank);
    for (;;) {
        if (stop_now(w)) return PH_STOP;
        int64_t now = now_ms();
        const int64_t dead_ms = (int64_t)w->hb_ms * w->dead_after;
        int64_t due = w->last_hb + w->hb_ms;
        if (w->last_recv + dead_ms < due) due = w->last_recv + dead_ms;
        if (w->draining && w->drain_until < due) due = w->drain_until;
        int64_t timeout = sched_busy(w->sched) ? 0 : due - now;
        if (xfer_busy(w->xfer) && timeout > WRK_XFER_POLL_MS) timeout = WRK_XFER_POLL_MS;
        int rev = wait_io(w, ZMQ_POLLIN, timeout);
        if (stop_now(w)) return PH_STOP;
        if (rev & ZMQ_POLLIN) {
            for (;;) {
                proto_msg m = {0};
                proto_err pe;
                proto_rc pr = proto_recv(w->sock, PROTO_SIDE_WORKER, 0, 0, &m, &pe);
                if (pr == PROTO_TIMEOUT) break;
                if (pr == PROTO_SYSERR) {
                    if (errno == EINTR) break;
                    LOG_W(w, "receive from duetd failed: %s", pe.message);
                    return PH_RETRY;
                }
                w->last_recv = now_ms(); /* any message counts as a heartbeat */
                if (pr == PROTO_INVALID) {
                    ST_ADD(w, bad_msgs_in, 1);
                    LOG_W(w, "malformed message from duetd (%s): %s", proto_code_name(pe.code),
                          pe.message);
                    continue;
                }
                ST_ADD(w, msgs_in, 1);
                phase_rc rc = on_message(w, &m, err, errlen);
                proto_msg_clear(&m);
                if (rc != PH_OK) return rc;
            }
        }
        now = now_ms();
        if (now - w->last_recv >= dead_ms) {
            LOG_W(w, "duetd at %s silent for %" PRId64 " ms (%d intervals of %d ms): dropping %d "
                     "requests, registering again", w->endpoint, now - w->last_recv,
                  w->dead_after, w->hb_ms, w->n_live);
            return PH_RETRY;
        }
        if (w->comm) {
            xfer_poll(w->xfer, now_ms());
            if (xfer_events(w) != 0) return PH_RETRY;
        }
        if (sched_busy(w->sched)) {
            int n_ev = 0;
            sched_status st = sched_step(w->sched, w->ev, w->ev_cap, &n_ev);
            if (st != SCHED_OK) {
                set_err(err, errlen, "scheduler step failed (status %d: %s)", (int)st,
                        st == SCHED_ERR_NOMEM ? "out of memory" : "bad arguments");
                w->fatal = st == SCHED_ERR_NOMEM ? WRK_ERR_NOMEM : WRK_ERR_SYS;
                return PH_FATAL;
            }
            if (n_ev && send_events(w, w->ev, n_ev) != 0) return PH_RETRY;
            if (w->comm) {
                xfer_poll(w->xfer, now_ms());
                if (xfer_events(w) != 0) return PH_RETRY;
            }
        }
        refresh_stats(w);
        if (now_ms() - w->last_hb >= w->hb_ms && send_heartbeat(w) != 0) return PH_RETRY;
    }
}

/* Sleep the back-off of the attempt-th consecutive failure (1, 2, ...), unless stopped. */
static void backoff(wrk_t *w, int attempt)
{
    int64_t base = w->cfg.backoff_min_ms;
    for (int i = 1; i < attempt && base < w->cfg.backoff_max_ms; i++) base *= 2;
    if (base > w->cfg.backoff_max_ms) base = w->cfg.backoff_max_ms;
    double f = 0.5 + (double)(splitmix64(&w->rng) >> 11) * 0x1.0p-53; /* [0.5, 1.5) */
    int64_t delay = (int64_t)((double)base * f);
    set_state(w, WRK_STATE_BACKOFF);
    LOG_I(w, "registering again in %" PRId64 " ms", delay);
    const int64_t until = now_ms() + delay;
    for (int64_t now = now_ms(); now < until && !stopping(w); now = now_ms())
        wait_io(w, 0, until - now);
}

wrk_status wrk_run(wrk_t *w, char *err, size_t errlen)
{
    if (!w) {
        set_err(err, errlen, "wrk_run: NULL worker");
        return WRK_ERR_CONFIG;
    }
    wrk_status ret = WRK_OK;
    int attempt = 0;
    w->fatal = WRK_OK;
    w->draining = 0;
    if (err && errlen) err[0] = 0;
    LOG_I(w, "model %s (sha256 %s), %d KV blocks of %d tokens, %d threads; duetd at %s",
          w->model_path, w->sha256, kv_n_blocks(w->kv), kv_config_of(w->kv)->block_tokens,
          w->cfg.n_threads, w->endpoint);
    while (!stopping(w)) {
        if (attempt > 0) {
            backoff(w, attempt);
            if (stopping(w)) break;
        }
        phase_rc rc = do_register(w, err, errlen);
        if (rc == PH_OK) {
            attempt = 0;
            rc = serve(w, err, errlen);
            if (rc == PH_STOP) break; /* the socket stays open for the goodbye failures */
            if (rc == PH_RETRY) {
                ST_ADD(w, reconnects, 1);
                drop_all(w);
                close_socket(w, 0);
                attempt = 1;
                continue;
            }
        }
        if (rc == PH_STOP) break;
        if (rc == PH_FATAL) {
            ret = w->fatal != WRK_OK ? w->fatal : WRK_ERR_SYS;
            LOG_E(w, "%s", err ? err : wrk_strerror(ret));
            break;
        }
        /* PH_RETRY before registered */
        ST_ADD(w, reconnects, 1);
        close_socket(w, 0);
        attempt++;
    }
    if (stopping(w)) notify(w, "STOPPING=1\nSTATUS=stopping: handing %d requests back", w->n_live);
    if (w->sock && w->registered) {
        if (w->n_live) LOG_I(w, "stopping: %d requests handed back to duetd", w->n_live);
        fail_all(w);
        close_socket(w, w->cfg.linger_ms);
    } else {
        drop_all(w);
        close_socket(w, 0);
    }
    refresh_stats(w);
    set_state(w, WRK_STATE_IDLE);
    atomic_store(&w->stop, 0);
    return ret;
}
