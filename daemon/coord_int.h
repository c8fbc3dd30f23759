/* daemon/coord_int.h: the coordinator's internal structures, shared by coord.c (loop,
 * clients, requests), coord_worker.c (workers, groups, routing) and coord_util.c (maps,
 * prefix index, hashing). Not a public header: include daemon/coord.h.
 */
#ifndef DUET_DAEMON_COORD_INT_H
#define DUET_DAEMON_COORD_INT_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "daemon/chat.h"
#include "daemon/config.h"
#include "daemon/coord.h"
#include "daemon/proto.h"
#include "daemon/tok.h"
#include "kernels/sample.h"

/* ---- utilities (coord_util.c) ---------------------------------------------------------- */

/* Milliseconds on the monotonic clock. */
double coord_now_ms(void);
/* A 64-bit mix (splitmix64's finaliser). */
uint64_t coord_mix64(uint64_t x);
/* FNV-1a of bytes, mixed. */
uint64_t coord_hash_bytes(const void *p, size_t n);
/* SHA-256 of n bytes as 64 lower-case hex digits (+ NUL) in hex. 0 or -1. */
int coord_sha256_hex(const void *data, size_t n, char hex[65]);
/* Hashes of the full blocks of tokens[n] (block bt tokens), each chained over its parent:
 * out[i] names blocks 0..i. Returns the number of full blocks (n / bt), at most max. */
int coord_block_hashes(const int32_t *tokens, int n, int bt, uint64_t *out, int max);

/* An open-addressing multimap from 64-bit keys to non-NULL pointers (linear probing,
 * backward-shift deletion). Several values may share a key; lookups take a predicate. */
typedef struct {
    uint64_t *keys; /* [cap] */
    void **vals;    /* [cap]; NULL: empty slot */
    size_t cap, n;
} cmap;

int cmap_put(cmap *m, uint64_t key, void *val); /* 0 or -1 (out of memory) */
/* The first value under key that match(val, arg) accepts (match NULL: any), or NULL. */
void *cmap_find(const cmap *m, uint64_t key, int (*match)(const void *val, const void *arg),
                const void *arg);
void cmap_del(cmap *m, uint64_t key, const void *val); /* removes that exact value */
void cmap_free(cmap *m);

/* A set of prefix-block hashes with a recency tick each; when it holds more than limit
 * entries it forgets the least recently used half. */
typedef struct {
    uint64_t *keys;  /* [cap]; 0: empty */
    uint64_t *ticks; /* [cap] */
    size_t cap, n, limit;
    uint64_t tick;
} cpfx;

int cpfx_add(cpfx *p, const uint64_t *hashes, int n); /* 0 or -1 */
/* How many of hashes[0..n) are present from the start (the cached prefix, in blocks). */
int cpfx_match(const cpfx *p, const uint64_t *hashes, int n);
void cpfx_clear(cpfx *p);
void cpfx_free(cpfx *p);

/* ---- the coordinator's tables ----------------------------------------------------------- */

typedef struct creq creq;

/* Where a disaggregated request's transfer stands. */
typedef enum {
    XS_NONE = 0,       /* colocated, or not placed */
    XS_RESERVING = 1,  /* reserve sent to D, waiting for reserved */
    XS_PREFILLING = 2, /* assign prefill sent to P */
    XS_DECODING = 3,   /* assign decode sent to D (after kv_ready) */
} coord_xstate;
typedef struct cclient cclient;
typedef struct cworker cworker;

/* A message queued for a client that is not tied to a request in flight (a refusal,
 * status, health, not_found). */
typedef struct coutmsg {
    proto_cmd cmd;
    json_t *body; /* owned */
    size_t bytes; /* its JSON size */
    struct coutmsg *next;
} coutmsg;

/* One client connection (a routing id on the client socket). Freed when it has no
 * request and nothing left to send. */
struct cclient {
    proto_route route;
    uint64_t hash;          /* of route: key in coord.clients */
    int fd;                 /* the TCP/IPC connection's fd (ZMQ_SRCFD), -1 unknown */
    creq *head, *tail;      /* its requests in arrival order, ended ones whose last
                               message is not sent yet included */
    int n_reqs;
    int n_active;           /* of which still running (queued/prefilling/decoding) */
    coutmsg *oq_head, *oq_tail;
    size_t oq_bytes;
    int blocked;            /* its last send met a full pipe (EAGAIN) */
    int in_flush;           /* listed in coord.flush */
    int gone;               /* its connection is gone: free at the next sweep */
};

/* One request. */
struct creq {
    int64_t rid;                 /* cluster-wide id (duet.worker's rid) */
    coord_state state;
    cclient *client;
    creq *cprev, *cnext;         /* client's list */
    creq *lprev, *lnext;         /* the queue (QUEUED) or its group's list (assigned) */
    int listed;                  /* 0 none, 1 queue, 2 group list */
    char id[PROTO_MAX_ID + 1];   /* the client's id */
    char *session;               /* owned, or NULL */
    int32_t *prompt;             /* [n_prompt] */
    int n_prompt;
    int32_t *gen;                /* [n_gen] completion tokens received */
    int n_gen, cap_gen;
    proto_sampling sampling;     /* seed filled in */
    int max_tokens;
    char **stops;                /* [n_stops] owned */
    int n_stops;
    int32_t *stop_ids;           /* [n_stop_ids] */
    int n_stop_ids;
    int ignore_eos, stream;
    tok_stream_t *ts;
    char *text;                  /* decoded completion text, cut at a stop string */
    size_t text_len, text_cap;
    size_t shown;                /* bytes of text that may go out (no partial stop) */
    size_t sent_text;            /* stream: bytes of text sent in deltas */
    int sent_tokens;             /* stream: tokens sent in deltas */
    int ended_by_token;          /* an end token (eos / stop id) arrived: 1 eos, 2 stop */
    int accepted_sent;
    proto_cmd final_cmd;         /* PROTO_CMD_DONE or PROTO_CMD_ERROR once ended */
    json_t *final;               /* the last message, owned, until sent */
    size_t final_bytes;
    int group;                   /* current group, or -1 */
    cworker *leader;             /* the worker it was assigned to, or NULL */
    int avoid_group;             /* retry: prefer another group than this, or -1 */
    int retries;
    int cached_tokens;           /* from the worker's finished, or -1 */
    int predicted_cached;        /* duetd's prefix-index estimate at assign */
    uint64_t *phash;             /* [n_phash] prompt block hashes (computed at routing) */
    int n_phash;
    double t_recv, t_assign, t_first, t_last;

    /* disaggregated: prefill group P (below) and decode group D (group, leader above,
     * from the reservation on); daemon/coord_xfer.c */
    int pgroup;                  /* P, or -1 */
    cworker *pleader;            /* P's leader while it holds the request */
    creq *pprev, *pnext;         /* P's list */
    coord_xstate xstate;
    int64_t xfer;                /* the current transfer (0: none) */
    int64_t xseq;                /* its seq between P and D */
    int got_kv_ready, got_kv_ack;
    char rng[65];                /* the sampler state from kv_ready ("" none) */
    int p_cached;                /* kv_ready.cached_tokens */
    double t_reserve, t_pre_assign, t_kv_ready, t_kv_ack;
};

/* A registered worker (live or dead). */
struct cworker {
    proto_route route;
    int fd;
    char *worker_id;
    int rank, group, tp_rank, tp_size;
    proto_role role;
    char device[160];
    int64_t capacity;            /* KV blocks of its pool */
    proto_backend backend;
    char *endpoint;              /* data plane (tcp), or NULL */
    int head0, n_heads;          /* its KV heads */
    int max_batch;
    int alive;
    double last_seen, last_sent, t_registered, t_dead, load_at;
    proto_heartbeat load;        /* its last heartbeat's load (-1 fields: not sent) */
    int has_load;
    int64_t blocks_since_load;   /* prompt blocks assigned to its group since that load */
    cworker *next;
};

/* A [group NAME] of the configuration. */
typedef struct {
    int id;                      /* index in the configuration */
    const config_group *cfg;     /* borrowed from coord.cfg */
    proto_role role;
    int tp_size;
    int rank0;                   /* world rank of its TP rank 0 */
    cworker **ranks;             /* [tp_size] live workers, NULL where none */
    creq *head, *tail;           /* requests assigned to it */
    int n_running;
    cpfx pidx;                   /* prefix blocks sent to it */
    int ready;                   /* every rank alive */
    int failover;                /* a rank died: its requests wait for coord_failover */
    creq *phead, *ptail;         /* prefill group: requests it prefills */
    int n_prefill;
    /* transfer and time statistics of the disaggregated requests it took part in */
    int64_t x_count, x_bytes;    /* transfers it sent (P) or received (D), KV payload bytes */
    double x_ms;                 /* P: summed send time (first layer to last completion) */
    double x_tail_ms;            /* P: summed part of it after the last layer was shipped */
    int64_t sh_n;                /* requests finished whose time is split below */
    double sh_queue, sh_prefill, sh_transfer, sh_decode; /* summed ms */
} cgroup;

/* A session: the group that holds its KV, and its request in flight. */
typedef struct {
    char *id;        /* owned */
    int group;       /* -1 none */
    creq *busy;      /* its request in flight, or NULL */
    double last_used;
} csession;

typedef enum {
    COORD_RUNNING = 0,
    COORD_DRAINING = 1,
    COORD_DONE = 2,
} coord_phase;

struct coord {
    duet_config *cfg;            /* owned */
    coord_opts opts;
    int log_level;               /* config_log_level */

    /* the model */
    tok_t *tok;
    chat_template chat;
    int chat_ok;                 /* 0: no usable chat template (chat requests refused) */
    char chat_err[PROTO_MAX_TEXT];
    char sha256[65];
    char model_name[PROTO_MAX_TEXT];
    int n_ctx, n_vocab, n_head, n_head_kv, n_layer;

    /* sockets */
    void *zctx, *csock, *wsock, *cmon, *wmon;
    char cep[PROTO_MAX_ENDPOINT + 1], wep[PROTO_MAX_ENDPOINT + 1];
    int efd;                     /* eventfd: coord_signal */
    atomic_int sigs;

    /* the cluster */
    cgroup *groups;              /* [n_groups] */
    int n_groups, world_size;
    cworker *workers;            /* every registered worker, dead ones included */
    int n_workers;
    int kv_fixed;                /* the first worker fixed the cluster's KV format */
    int block_tokens;
    dtype_t kv_dtype;
    char *nccl_id;               /* from comm_id, or NULL */
    int failover_pending;        /* some group has failover set */
    int64_t next_xfer;           /* transfer ids */
    int64_t *pair_seq;           /* [n_groups * n_groups] next seq from group P to group D */
    int comm_changed;            /* the live TCP ranks changed: send comm_init */
    double t_groups_down;        /* when the last ready group went down, or 0 */

    /* requests */
    cmap reqs;                   /* rid -> creq (running ones) */
    cmap clients;                /* route hash -> cclient */
    cmap sessions;               /* id hash -> csession */
    int n_sessions;
    creq *q_head, *q_tail;       /* the queue */
    int n_queued, n_running;
    int64_t next_rid;
    cclient **flush;             /* [n_flush] clients with output to send */
    int n_flush, cap_flush;
    sample_rng rng;              /* seeds drawn for requests */

    /* statistics */
    int64_t st_served, st_failed, st_cancelled, st_retried;
    int64_t st_prompt_tokens, st_cached_tokens;
    int64_t st_x_done, st_x_failed, st_x_bytes;
    double st_x_ms_sum, st_x_ms_max; /* reserve to kv_ack */

    /* loop */
    coord_phase phase;
    double t_start, drain_deadline, next_tick;
    int n_sigterm;
    char status_line[256];       /* last STATUS= sent */
};

/* ---- logging ------------------------------------------------------------------------------ */

void coord_log(coord_t *c, int level, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
/* level: a config_log_level; the arguments are evaluated only when it is logged. */
#define CLOG(c, level, ...)                                                 \
    do {                                                                    \
        if ((int)(level) <= (c)->log_level) coord_log((c), (level), __VA_ARGS__); \
    } while (0)
#define CERR(c, ...) CLOG(c, CONFIG_LOG_ERROR, __VA_ARGS__)
#define CWARN(c, ...) CLOG(c, CONFIG_LOG_WARN, __VA_ARGS__)
#define CINFO(c, ...) CLOG(c, CONFIG_LOG_INFO, __VA_ARGS__)
#define CDEBUG(c, ...) CLOG(c, CONFIG_LOG_DEBUG, __VA_ARGS__)

void coord_notify(coord_t *c, const char *state);
/* Tell the service manager the cluster's state in one STATUS= line (when it changed). */
void coord_notify_status(coord_t *c);

/* ---- coord.c: requests and clients, used by coord_worker.c ------------------------------- */

/* New tokens of r from its worker (index: completion position of ids[0]). */
void coord_req_tokens(coord_t *c, creq *r, int index, const int32_t *ids, int n);
/* The worker ended r (finished). */
void coord_req_finished(coord_t *c, creq *r, proto_finish reason, int cached_tokens);
/* End r with an error (after accepted): code and message for the client. */
void coord_req_fail(coord_t *c, creq *r, proto_code code, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
/* Free the request (unlinked from everything). */
void coord_req_free(coord_t *c, creq *r);
/* Queue / unqueue. */
void coord_queue_push(coord_t *c, creq *r, int at_head);
void coord_queue_remove(coord_t *c, creq *r);
/* Mark a client as having output to send. */
void coord_client_dirty(coord_t *c, cclient *cl);

/* ---- coord_worker.c -------------------------------------------------------------------------- */

/* One message on the worker socket (already decoded). fd: its connection. */
void coord_worker_msg(coord_t *c, proto_msg *msg, int fd);
/* Retry or fail the requests of groups that lost a rank (deferred from the moment the
 * worker was declared dead, so that no list is changed under a caller's loop). */
void coord_failover(coord_t *c);
/* Heartbeats to idle workers, dead-worker detection. */
void coord_worker_tick(coord_t *c, double now);
/* A worker connection (fd) closed. */
void coord_worker_disconnected(coord_t *c, int fd);
/* Assign queued requests to groups with room. */
void coord_schedule(coord_t *c);
/* Send r's assign to group g (r is QUEUED and unlinked). 0, or -1 when the send failed
 * (the worker is then declared dead and r is back in the queue or failed). */
int coord_assign(coord_t *c, creq *r, cgroup *g);
/* Tell r's worker to drop it (cancel {rid}) and unlink r from its group. */
void coord_req_detach(coord_t *c, creq *r, int send_cancel);
/* A group that could serve r now (ready, role both, room), or NULL; *any_ready says
 * whether some group of role both is ready at all. */
cgroup *coord_pick_group(coord_t *c, creq *r, int *any_ready);
/* r's assign body for role (its context, sampling, limits; no transfer), borrowing r's
 * arrays. */
void coord_assign_body(const creq *r, proto_role role, proto_assign *a);
/* r's prompt block hashes (computed once, for prefix routing). */
void coord_req_hashes(coord_t *c, creq *r);
/* r's prompt goes to group g: predict its cached prefix there and remember the prefix. */
void coord_note_prefix(coord_t *c, creq *r, cgroup *g);
/* KV blocks of a context of n tokens. */
int coord_blocks_of(const coord_t *c, int64_t tokens);
/* A group's KV capacity (its smallest rank's), and what it can still give. */
int64_t coord_group_capacity(const cgroup *g);
int coord_group_fits(const coord_t *c, const cgroup *g, int need, double now);
int64_t coord_group_avail(const coord_t *c, const cgroup *g, double now);
/* Retry r elsewhere (detached) or fail it; avoid: a group to avoid, or -1. */
void coord_req_retry(coord_t *c, creq *r, int avoid, const char *why);

/* ---- coord_xfer.c: disaggregated requests ------------------------------------------------ */

/* A prefill group and a decode group for r, or 0 (none ready with room). */
int coord_pick_pair(coord_t *c, creq *r, cgroup **p, cgroup **d);
/* Start r (QUEUED, unlinked) on P and D: reserve on D. 0, or -1 (r is back in the queue). */
int coord_reserve(coord_t *c, creq *r, cgroup *p, cgroup *d);
/* Undo r's transfer state: P dropped (cancel or release), D's reservation released when
 * the decode assign was not sent yet. */
void coord_xfer_detach(coord_t *c, creq *r);
/* reserved, kv_ready, kv_ack from w. */
void coord_on_reserved(coord_t *c, cworker *w, const proto_reserved *m);
void coord_on_kv_ready(coord_t *c, cworker *w, const proto_kv_ready *m);
void coord_on_kv_ack(coord_t *c, cworker *w, const proto_xfer_ref *m);
/* A `failed` naming a transfer or a request held by w as P or D: 1 when handled. */
int coord_xfer_failed(coord_t *c, cworker *w, const proto_failed *f);
/* After tokens from P: end r when its first token ends it. */
void coord_xfer_tokens(coord_t *c, creq *r);
/* Retry the requests that group g was prefilling (g lost a rank). */
void coord_xfer_failover(coord_t *c, cgroup *g);
/* r ended normally: account its time split. */
void coord_xfer_account(coord_t *c, creq *r);
/* Ready serving units: groups of role both, plus one when a prefill and a decode group are
 * ready. */
int coord_units_ready(const coord_t *c);

/* Ready groups of role both. */
int coord_groups_ready(const coord_t *c);
/* Largest KV capacity (blocks) of a ready group; 0 when none. */
int64_t coord_max_capacity(const coord_t *c);
/* Send a message to a worker (DONTWAIT); a failed send declares it dead. 0 or -1. */
int coord_worker_send(coord_t *c, cworker *w, proto_cmd cmd, proto_type t, const void *body);
/* The status and health bodies. */
json_t *coord_status_json(coord_t *c);
json_t *coord_health_json(coord_t *c);
/* Free workers and groups. */
void coord_workers_free(coord_t *c);
/* Build the groups from the configuration. 0 or -1. */
int coord_groups_init(coord_t *c, char *err, size_t errlen);
/* After a reload: point groups at the new configuration's sections. */
void coord_groups_rebind(coord_t *c);
/* Session lookup (NULL when absent) and creation. */
csession *coord_session_get(coord_t *c, const char *id, int create);
/* Record where a session's KV now lives (the context tokens it holds). */
void coord_session_note(coord_t *c, creq *r);

#endif
