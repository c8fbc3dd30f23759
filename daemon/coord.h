/* daemon/coord.h: duetd's coordinator, the event loop that serves clients with workers.
 *
 * One thread runs coord_run(): a zmq_poll loop over
 *   - the client ROUTER socket (duet.client/1, docs/PROTOCOL.md section 2),
 *   - the worker ROUTER socket (duet.worker/1, section 4),
 *   - a monitor of each (disconnected peers),
 *   - an eventfd that coord_signal() writes (drain, stop, reload from another thread or a
 *     signal handler) and optionally a signalfd (SIGTERM/SIGINT drain, SIGHUP reloads).
 * No call in the loop blocks on a peer: every send is ZMQ_DONTWAIT; a client whose pipe
 * is full gets its output buffered (deltas merge) up to [daemon] client_buffer_bytes, and
 * then its requests end with `slow_client`.
 *
 * What it does (colocated groups, role `both`; prefill/decode groups register but are not
 * routed to yet):
 *   - registers workers (model SHA-256, KV layout, place from the [group] sections),
 *     heartbeats both ways, declares a worker silent for dead_after intervals (or whose
 *     connection closed) dead and retries its requests on another group, resuming from
 *     the tokens already sent (max_retries; with no group left they wait up to
 *     2 x dead_after heartbeat intervals for one to come back), else fails them
 *     (`worker_lost`);
 *   - keeps the request table (states: coord_state), tokenizes (chat templates for
 *     `messages`), checks limits, admits (queue_limit, when_full, KV budgets), routes to
 *     the group with the longest cached prefix and then the least load (sessions stick to
 *     their group), detokenizes incrementally, cuts stop strings (never streaming a
 *     partial one), and answers `done` with usage and timings;
 *   - answers `status` and `health`.
 *
 * Prefix tracking is approximate: per group, duetd remembers the hashes of the full
 * blocks (block_tokens from the workers' KV layout) of the prompts it sent there (and of
 * whole session contexts), the most recently used ones first, up to 4 times the group's
 * KV capacity; it forgets them when the group goes down. The worker's own prefix cache
 * decides what is really reused; usage.cached_prompt_tokens comes from its `finished`
 * (from duetd's estimate when a stop string ended the request first).
 *
 * Library code: errors are returned, never exit(); bad client or worker input is
 * answered with the protocol's error code and the loop goes on.
 */
#ifndef DUET_DAEMON_COORD_H
#define DUET_DAEMON_COORD_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/config.h"
#include "daemon/tok.h"

typedef struct coord coord_t;

/* The explicit states of a request in duetd's table. */
typedef enum {
    COORD_QUEUED = 0,     /* admitted, waiting for a group with room */
    COORD_PREFILLING = 1, /* assigned to a group, no token yet */
    COORD_DECODING = 2,   /* tokens are coming */
    COORD_FINISHED = 3,   /* ended with `done` (stop, length, eos) */
    COORD_FAILED = 4,     /* ended with `error` after `accepted` */
    COORD_CANCELLED = 5,  /* ended by the client's cancel or disappearance */
} coord_state;

/* "queued", "prefilling", ...; "?" out of range. Static. */
const char *coord_state_name(coord_state s);

/* Bits of coord_signal(). */
enum {
    COORD_SIG_DRAIN = 1,  /* stop taking requests; finish running ones (drain_timeout_ms),
                             then cancel the rest; then coord_run returns 0 */
    COORD_SIG_STOP = 2,   /* return from coord_run now (workers are told to cancel) */
    COORD_SIG_RELOAD = 4, /* re-read the configuration file (the config's source) */
};

/* Things the configuration file does not hold (defaults in brackets). */
typedef struct {
    const char *client_endpoint; /* bind here instead of [daemon] client_endpoint (e.g.
                                    "tcp://127.0.0.1:*" for an ephemeral port), or NULL */
    const char *worker_endpoint; /* the same for [daemon] worker_endpoint, or NULL */
    const char *model_sha256;    /* the model file's SHA-256 (64 lower-case hex digits),
                                    trusted as given, or NULL: duetd hashes the file */
    int signal_fd;               /* a signalfd for SIGTERM, SIGINT (drain; a second one
                                    stops) and SIGHUP (reload), or -1 [-1] */
    int max_retries;             /* transparent retries of a request [2] */
    int max_inflight_per_client; /* requests in flight per connection, `busy` beyond [256] */
    int drain_timeout_ms;        /* how long a drain lets requests run [30000] */
    int client_sndhwm;           /* ZMQ_SNDHWM of the client socket (messages per client
                                    queued in ZeroMQ before duetd buffers); 0: ZeroMQ's [0] */
    int client_sndbuf;           /* ZMQ_SNDBUF (kernel bytes per client connection); 0: the
                                    OS default [0] */
    /* Log sink: one line without newline, priority as syslog's (3 err .. 7 debug). NULL:
     * stderr as "<N>duetd: line". Lines above [daemon] log_level are not formatted. */
    void (*log)(void *ctx, int priority, const char *line);
    void *log_ctx;
    /* Service manager notification ("READY=1", "STATUS=...", "RELOADING=1\n...",
     * "STOPPING=1"), e.g. sd_notify; NULL: none. */
    void (*notify)(void *ctx, const char *state);
    void *notify_ctx;
} coord_opts;

/* Fill *o with the defaults above. */
void coord_opts_default(coord_opts *o);

/* Open the model's GGUF (tokenizer, chat template, identity; never the tensors), hash it,
 * create the sockets and bind them. Takes *cfg_p (NULLed, also on failure). opts may be
 * NULL (defaults). 0 and *out, or -1 with a message in err naming what failed. */
int coord_new(duet_config **cfg_p, const coord_opts *opts, coord_t **out, char *err,
              size_t errlen);
/* Close sockets, free everything; *self_p = NULL; safe on NULL and twice. Call after
 * coord_run returned (or instead of it). */
void coord_destroy(coord_t **self_p);

/* Run the loop until a drain completes or COORD_SIG_STOP. Notifies READY=1 first.
 * Returns 0, or -1 on a fatal failure of the loop itself (zmq_poll), after logging it. */
int coord_run(coord_t *c);

/* Ask the loop for sig (COORD_SIG_* bits). Thread-safe and async-signal-safe. */
void coord_signal(coord_t *c, int sig);

/* The endpoints actually bound (ZMQ_LAST_ENDPOINT: the port chosen for ":*"). Borrowed. */
const char *coord_client_endpoint(const coord_t *c);
const char *coord_worker_endpoint(const coord_t *c);
/* The model's SHA-256 as workers must report it (64 hex digits). Borrowed. */
const char *coord_model_sha256(const coord_t *c);
/* The tokenizer (borrowed; immutable, usable from other threads). */
const tok_t *coord_tok(const coord_t *c);
/* Context length served (tokens, prompt and completion together). */
int coord_n_ctx(const coord_t *c);

#endif
