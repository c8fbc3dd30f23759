/* worker/wrk.h: the duet-worker process as a library: one model shard, one paged KV
 * cache, one step scheduler, and a DEALER connection to duetd speaking duet.worker/1
 * (docs/PROTOCOL.md, section 4). worker/worker_main.c is only its command line.
 *
 * Life of a worker:
 *   wrk_new      loads the model (tp_size 1 only: TP across worker processes is not
 *                wired yet), makes the KV cache and the scheduler, hashes the GGUF file
 *                (SHA-256), and opens the data plane (comm/) of a prefill or decode worker:
 *                tcp binds data_endpoint, mpi joins MPI_COMM_WORLD (under mpirun);
 *   wrk_run      the event loop, on the calling thread (the forward pass adds the
 *                scheduler's compute pool). It connects to duetd and sends `register`
 *                (the file's hash, KV layout, place, device, capacity); it is ready only
 *                after `registered`. It then serves `assign`, `cancel`, `heartbeat`, and
 *                for the disaggregated roles `reserve`, `release` and `comm_init`
 *                (PROTOCOL.md's transfer handshake: a prefill worker ships each layer's KV
 *                from the scheduler's layer hook as the final chunk's forward pass stores
 *                it, then sends kv_ready; a decode worker receives into reserved blocks,
 *                sends kv_ack, and starts the request when its decode assign is here too;
 *                worker/xfer.h), runs one sched_step per turn while there is work, and
 *                sends each step's tokens as one `tokens` message, then `finished` or
 *                `failed` for the requests that ended. It sends a `heartbeat` with its
 *                load (running, waiting, free and cached KV blocks) every heartbeat_ms.
 *                When duetd is silent for dead_after intervals (or a send to it fails,
 *                or duetd answers with an `error` unexpected_command: it no longer counts
 *                this worker as registered) the worker drops every request (their KV blocks freed), closes the
 *                socket, waits 100 ms doubling to 5 s times a random factor in
 *                [0.5, 1.5], and registers again on a new socket; it never gives up.
 *                `refused` ends wrk_run with WRK_ERR_REFUSED, except no_slot and
 *                duplicate_worker, which are retried with the same back-off (PROTOCOL.md:
 *                "retries later for no_slot, duplicate_worker").
 *   wrk_stop     (any thread, or a signal handler) starts a drain: new assigns get
 *                `failed` (internal, retryable), the requests held run to their end for
 *                at most drain_ms. A second wrk_stop, or the end of the drain, makes the
 *                worker fail every request it still holds with `failed` (code internal,
 *                retryable: duetd runs them elsewhere from the tokens already streamed).
 *                Then it closes the connection (waiting up to linger_ms for the last
 *                messages to leave) and wrk_run returns WRK_OK. The protocol has no
 *                goodbye message: duetd sees the connection end, or the silence.
 *
 * Requests are numbered by duetd's rid; the scheduler's id is the rid. An assign's
 * context is tokens ++ generated: the worker prefills all of it and numbers the new
 * tokens from len(generated), so a retried request continues where it stopped.
 *
 * Logging: one line per message on stderr (or the log callback), prefixed with the
 * sd-daemon priority "<3>" error, "<4>" warning, "<6>" info, "<7>" debug, so that the
 * journal keeps the levels; levels above log_level are dropped before formatting.
 * With notify set, systemd gets READY=1 after the first `registered`, STATUS= lines,
 * and STOPPING=1 (sd_notify; nothing happens outside systemd).
 *
 * Threads: wrk_run runs on one thread; wrk_stop and wrk_get_stats may be called from any
 * thread while it runs (wrk_stop also from a signal handler). Everything else belongs to
 * the thread that owns the worker. Library code: every failure is a returned status and
 * a message, never an exit.
 */
#ifndef DUET_WORKER_WRK_H
#define DUET_WORKER_WRK_H

#include <stddef.h>
#include <stdint.h>

#include "daemon/config.h"
#include "daemon/proto.h"
#include "kernels/dtype.h"

typedef struct wrk wrk_t; /* opaque */

typedef enum {
    WRK_OK = 0,
    WRK_ERR_CONFIG,  /* bad configuration or arguments (message names the key/option) */
    WRK_ERR_MODEL,   /* the model, KV cache or scheduler could not be made */
    WRK_ERR_REFUSED, /* duetd refused the registration (code and message in err) */
    WRK_ERR_SYS,     /* a ZeroMQ or system call failed (message names it) */
    WRK_ERR_NOMEM,   /* out of memory */
} wrk_status;

/* A log sink: prio is the syslog priority (3 error, 4 warning, 6 info, 7 debug), line
 * the message without prefix or newline. */
typedef void (*wrk_log_fn)(void *user, int prio, const char *line);

/* What a worker is and how it behaves. wrk_config_default() fills every field; strings
 * are borrowed (they must outlive wrk_new, which copies them). */
typedef struct {
    const char *model_path;   /* GGUF file (required) */
    const char *endpoint;     /* duetd's worker endpoint ["tcp://127.0.0.1:7071"] */
    const char *worker_id;    /* NULL: "HOST-GROUP-TPRANK" (GROUP "cpu" without a config) */
    const char *group_name;   /* [group NAME] this worker belongs to, for ids and logs, or NULL */
    int group;                /* group id sent in register; -1: duetd assigns [-1] */
    proto_role role;          /* both, prefill or decode (these two open the data plane) [both] */
    int tp_rank, tp_size;     /* place in the group; tp_size > 1 is refused for now [0, 1] */
    int n_threads;            /* forward-pass threads; 0: one per online core [0] */
    int64_t kv_budget;        /* bytes of KV cache [256 MiB] */
    dtype_t kv_type;          /* DTYPE_F32, DTYPE_F16, DTYPE_BF16 or DTYPE_I8 [f16] */
    int max_batch_tokens;     /* tokens per scheduler step [2048] */
    int max_seqs;             /* sequences running at once (register's max_batch) [64] */
    int n_ctx;                /* per-request limit, prompt + max_tokens; 0: the model's
                                 trained context [0] */
    proto_backend backend;    /* data plane: tcp or mpi (nccl needs a GPU worker) [tcp] */
    const char *data_endpoint; /* tcp: base data endpoint (port + tp_rank); NULL or "":
                                  "tcp://127.0.0.1:0", a free port [NULL] */
    int heartbeat_ms;         /* until `registered` gives its own: ZMTP heartbeats and the
                                 wait for an answer to register [1000] */
    int dead_after;           /* until `registered`: intervals without an answer before
                                 registering again [4] */
    int backoff_min_ms;       /* first reconnect delay, doubled each failure [100] */
    int backoff_max_ms;       /* cap of the reconnect delay [5000] */
    int linger_ms;            /* at stop: how long the last messages may take to leave [1000] */
    int drain_ms;             /* at stop: how long held requests may run on; 0: hand them
                                 back at once [30000] */
    config_log_level log_level; /* least severe level logged [info] */
    wrk_log_fn log;           /* NULL: stderr with "<N>" prefixes */
    void *log_user;           /* passed to log */
    int signal_fd;            /* a readable fd (e.g. main's signalfd for SIGTERM/SIGINT)
                                 that means "stop"; -1: none [-1] */
    int notify;               /* 1: sd_notify READY/STATUS/STOPPING [0] */
    uint64_t seed;            /* back-off jitter PRNG; 0: from the clock and pid [0] */
} wrk_config;

/* Fill c with the defaults listed above. */
void wrk_config_default(wrk_config *c);

/* Fill c (already defaulted) from a loaded duet.conf for the worker at tp_rank of the
 * group named group_name: model path and kv_type, max_context, the group's threads,
 * kv_budget, max_batch_tokens, max_seqs, transport, data_endpoint, role and group id
 * (the section's index in file order), duetd's worker_endpoint, heartbeat_ms,
 * dead_after and log_level. Strings point into dc. WRK_ERR_CONFIG with a message
 * naming the file and group for an unknown group, a tp_rank outside [0, tp_size), a
 * cuda device, transport nccl, or tp_size > 1. */
wrk_status wrk_config_from_file(const duet_config *dc, const char *group_name, int tp_rank,
                                wrk_config *c, char *err, size_t errlen);

/* Make a worker: load the model, make the KV cache and scheduler, hash the file. No
 * connection is made yet. On error returns a status, writes a message (naming the file,
 * option or problem) into err[errlen] and sets *out to NULL. */
wrk_status wrk_new(const wrk_config *c, wrk_t **out, char *err, size_t errlen);
/* Free everything (the socket included; requests are dropped without messages); NULLs
 * *self_p; safe on NULL and twice. Not while wrk_run runs. */
void wrk_destroy(wrk_t **self_p);

/* The event loop (above). Returns WRK_OK after wrk_stop (or the signal fd), or
 * WRK_ERR_REFUSED (err: "refused by duetd: CODE: MESSAGE"), WRK_ERR_CONFIG (duetd gave a
 * place this worker cannot serve: another role, tp place), WRK_ERR_SYS or WRK_ERR_NOMEM.
 * A dead duetd is not an error: the loop reconnects. May be called again after it
 * returned WRK_OK (it registers anew). */
wrk_status wrk_run(wrk_t *w, char *err, size_t errlen);

/* Ask wrk_run to stop (see above). Async-signal-safe and thread-safe; idempotent. A
 * stop requested before wrk_run starts makes it return at once. */
void wrk_stop(wrk_t *w);

/* Where the worker stands in its connection's life. */
typedef enum {
    WRK_STATE_IDLE = 0,        /* wrk_run not running */
    WRK_STATE_REGISTERING = 1, /* connected, register sent or being sent, no answer yet */
    WRK_STATE_READY = 2,       /* registered: serving */
    WRK_STATE_BACKOFF = 3,     /* waiting before registering again */
} wrk_state;

/* A snapshot of the worker, consistent as of the end of a loop turn. */
typedef struct {
    wrk_state state;
    int registrations;       /* `registered` received (each reconnect counts) */
    int refusals;            /* `refused` received */
    int reconnects;          /* connections dropped (silent duetd, failed send, retried refusal) */
    int rank, group;         /* from the last `registered` (-1 before) */
    int heartbeat_ms, dead_after; /* in force */
    int64_t assigns;         /* assign messages accepted into the scheduler */
    int64_t rejected;        /* assigns answered with failed */
    int64_t cancels;         /* cancel messages received */
    int64_t heartbeats_in;   /* heartbeat messages received from duetd */
    int64_t heartbeats_out;  /* heartbeat messages sent */
    int64_t msgs_in;         /* valid messages received */
    int64_t bad_msgs_in;     /* malformed or unexpected messages received */
    int64_t steps;           /* forward passes */
    int64_t tokens_out;      /* tokens sent in `tokens` events */
    int64_t finished;        /* `finished` sent */
    int64_t failed;          /* `failed` sent for requests (rejections included) */
    int64_t dropped;         /* requests dropped because duetd went silent */
    int live;                /* requests held (running, waiting, or ending) */
    int running, waiting;    /* the scheduler's */
    int kv_blocks_total, kv_blocks_used, kv_blocks_free, kv_blocks_cached; /* cached: unreferenced
                                                                            prefix-cache blocks */
    int64_t xfers_sent, xfers_received;   /* KV transfers completed (prefill, decode side) */
    int64_t xfers_failed, xfers_expired;  /* broken, or lease run out */
    int64_t xfer_bytes_sent, xfer_bytes_received; /* KV payload */
    int xfers_in_flight;                  /* transfers held now */
    int kv_blocks_reserved;               /* KV blocks held by receptions now */
} wrk_stats;

/* Copy the snapshot (thread-safe). */
void wrk_get_stats(const wrk_t *w, wrk_stats *out);

/* The model file's SHA-256 as 64 lower-case hex digits (borrowed, static for w's life). */
const char *wrk_model_sha256(const wrk_t *w);
/* The model's end-of-generation token ids (tokenizer eos/eot/... as tok_is_eog says),
 * which stop a request unless ignore_eos. Borrowed; *n gets the count. */
const int32_t *wrk_eog_ids(const wrk_t *w, int *n);
/* The worker id sent in register (borrowed). */
const char *wrk_worker_id(const wrk_t *w);

/* SHA-256 of the file at path into hex[65] (NUL-terminated, lower case). 0, or -1 with a
 * message naming the file in err. */
int wrk_sha256_file(const char *path, char hex[65], char *err, size_t errlen);

/* "ok", "bad configuration", ... Static. */
const char *wrk_strerror(wrk_status s);

#endif
