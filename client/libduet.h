/* client/libduet.h: libduet, the C client of duetd (protocol duet.client/1).
 *
 * One duet_client is one connection (a ZeroMQ DEALER socket) to duetd's client endpoint.
 * On it you start any number of generation requests; their replies interleave on the
 * socket and libduet sorts them by request id into one duet_request handle each.
 *
 *     duet_client *c = NULL;
 *     duet_error err;
 *     if (duet_connect("tcp://127.0.0.1:7070", NULL, &c, &err) != DUET_OK) { ... }
 *
 *     duet_params p;
 *     duet_params_init(&p);               // protocol defaults; set what you need
 *     p.prompt = "The capital of France is";
 *     p.sampling.temperature = 0;         // greedy
 *     p.max_tokens = 32;
 *     p.stream = 1;
 *     duet_request *r = NULL;
 *     if (duet_generate(c, &p, &r, &err) != DUET_OK) { ... err.code, err.message ... }
 *
 *     duet_event ev;                      // iterator style: one event at a time
 *     while (duet_next(r, 30000, &ev, &err) == DUET_OK) {
 *         if (ev.kind == DUET_EVENT_DELTA) fwrite(ev.text, 1, ev.text_len, stdout);
 *         if (ev.kind == DUET_EVENT_DONE || ev.kind == DUET_EVENT_ERROR) break;
 *     }
 *     duet_request_free(&r);
 *     duet_destroy(&c);
 *
 * A request's events come in the protocol's order: ACCEPTED, then DELTA* (streaming
 * only), then exactly one of DONE or ERROR; or one ERROR alone when duetd refused it.
 * libduet checks that order and the deltas' contiguity: a reply that breaks the protocol
 * (bad frames, bad JSON, a schema violation, a delta out of order) ends its request with
 * DUET_E_BAD_REPLY, never with a crash. Whatever the mode, the final duet_result holds the
 * whole text and every token id (libduet concatenates the deltas).
 *
 * Three ways to consume events, mixable per request:
 *   - duet_next(req): the next event of one request (others' replies are queued);
 *   - duet_wait(req): block until the request ends; returns its result;
 *   - callbacks: set duet_params.on_event; events are then delivered from inside
 *     duet_poll/duet_wait/duet_next/duet_status/duet_health calls on the same client.
 *
 * Errors: every function returns a duet_code (DUET_OK = 0) and, when err is not NULL,
 * fills *err with the code, its wire name and a one-line message. Codes below 100 are the
 * protocol's stable error codes (docs/PROTOCOL.md, "Error codes"), sent by duetd or found
 * by libduet's own check of a request before it is sent (DUET_E_BAD_REQUEST); codes from
 * 100 are client-side conditions (timeout, no connection, malformed reply). libduet never
 * exits, aborts or prints.
 *
 * Timeouts: every waiting call takes timeout_ms; a negative value waits without limit,
 * 0 only processes what has already arrived. A timeout leaves a request in flight: wait
 * again, or duet_cancel it.
 *
 * Threads: a duet_client, its requests and its events belong to one thread at a time
 * (no internal locking). Distinct clients are independent: use one client per thread.
 * Signals: a waiting call interrupted by a signal returns DUET_E_INTERRUPTED (the
 * request stays in flight), so that a SIGINT handler can lead to duet_cancel.
 *
 * Ownership: duet_generate copies everything it needs from duet_params. Strings and
 * arrays in events and results are borrowed from the request (see each). Handles are the
 * caller's: free them with duet_request_free (which cancels a request still in flight).
 * duet_destroy closes the connection; handles stay valid to read and must still be freed.
 *
 * Links with: libzmq, jansson (and libduet.a's protocol module daemon/proto.c).
 */
#ifndef DUET_CLIENT_LIBDUET_H
#define DUET_CLIENT_LIBDUET_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#define DUET_DEFAULT_ENDPOINT "tcp://127.0.0.1:7070" /* conf/duet.conf's client_endpoint */
#define DUET_ENDPOINT_ENV "DUET_ENDPOINT"            /* environment variable the CLI reads */

/* ---- errors -------------------------------------------------------------------------- */

typedef enum {
    DUET_OK = 0,
    /* the protocol's codes (same numbers as proto_code in daemon/proto.h) */
    DUET_E_BAD_FRAMES = 1,          /* duetd: our message had the wrong frames */
    DUET_E_UNKNOWN_PROTOCOL = 2,    /* duetd: frame 0 not duet.client */
    DUET_E_UNSUPPORTED_VERSION = 3, /* duetd does not speak duet.client/1 */
    DUET_E_UNKNOWN_COMMAND = 4,     /* duetd does not know the command */
    DUET_E_UNEXPECTED_COMMAND = 5,  /* duetd does not accept the command */
    DUET_E_BAD_JSON = 6,            /* the body was not a JSON object */
    DUET_E_TOO_LARGE = 7,           /* the body is over 16 MiB */
    DUET_E_BAD_REQUEST = 8,         /* the request breaks the schema; message names the field */
    DUET_E_DUPLICATE_ID = 9,        /* an id already in flight on this connection */
    DUET_E_PROMPT_TOO_LONG = 10,    /* prompt (+ max_tokens) does not fit the context */
    DUET_E_BUSY = 11,               /* queue full: retry after error.retry_after_ms */
    DUET_E_SESSION_BUSY = 12,       /* the session has a request in flight */
    DUET_E_UNAVAILABLE = 13,        /* no worker group can serve now */
    DUET_E_NOT_FOUND = 14,          /* duetd has no such request in flight (it lost it) */
    DUET_E_CANCELLED = 15,          /* duetd cancelled it (shutdown drain ran out) */
    DUET_E_SHUTTING_DOWN = 16,      /* duetd is draining */
    DUET_E_WORKER_LOST = 17,        /* its workers died and the retries are spent */
    DUET_E_SLOW_CLIENT = 18,        /* we did not read replies fast enough */
    DUET_E_INTERNAL = 19,           /* a bug or failure in duetd; also any code this build
                                       does not know (error.code_name keeps duetd's name) */
    /* client-side conditions */
    DUET_E_TIMEOUT = 100,           /* nothing (or not the awaited reply) within timeout_ms */
    DUET_E_UNREACHABLE = 101,       /* could not send: no connection to duetd in send_timeout_ms */
    DUET_E_BAD_REPLY = 102,         /* duetd's reply broke the protocol (the message says how) */
    DUET_E_SYSTEM = 103,            /* a ZeroMQ or memory failure */
    DUET_E_USAGE = 104,             /* bad arguments to a libduet call, or a closed client */
    DUET_E_INTERRUPTED = 105,       /* a signal interrupted the wait; nothing was lost */
} duet_code;

/* What went wrong. */
typedef struct {
    duet_code code;
    char code_name[33]; /* "busy", "timeout", ...: the wire name (duetd's own for unknown codes) */
    char message[512];  /* one line for people, naming the field, frame or request */
    char id[65];        /* the request it concerns, or "" */
    int retry_after_ms; /* busy/unavailable: duetd's hint, else 0 */
} duet_error;

/* "busy", "timeout", ... for a code; "" when out of range. Static. */
const char *duet_code_name(duet_code code);

/* ---- connection ------------------------------------------------------------------------ */

typedef struct duet_client duet_client;   /* one connection to duetd */
typedef struct duet_request duet_request; /* one generate request on a connection */

typedef struct {
    int send_timeout_ms; /* how long a send waits for the connection to come up; then
                            DUET_E_UNREACHABLE [5000] */
    int heartbeat_ms;    /* ZMTP heartbeats so a dead TCP peer is noticed; 0 = off [0] */
} duet_options;

/* Defaults into *o. */
void duet_options_init(duet_options *o);

/* Connect to duetd at endpoint ("tcp://HOST:PORT", "ipc://PATH"; NULL: DUET_DEFAULT_ENDPOINT).
 * ZeroMQ connects in the background: an absent duetd shows up at the first send
 * (DUET_E_UNREACHABLE) or wait (DUET_E_TIMEOUT). opts may be NULL (defaults). */
duet_code duet_connect(const char *endpoint, const duet_options *opts, duet_client **out,
                       duet_error *err);

/* Close the connection (unsent messages are dropped; requests in flight are abandoned
 * and duetd cancels them when it notices). Handles stay readable; an unfinished one
 * ends with DUET_E_USAGE "connection closed". NULLs *self_p; safe twice. */
void duet_destroy(duet_client **self_p);

/* The endpoint given to duet_connect. Borrowed. */
const char *duet_endpoint(const duet_client *c);

/* ---- requests ---------------------------------------------------------------------------- */

/* One chat message (duet_params.messages). */
typedef struct {
    const char *role;    /* "system", "user", "assistant", ... */
    const char *content; /* UTF-8 text */
} duet_message;

/* Sampling parameters; duet_params_init sets the protocol's defaults. */
typedef struct {
    double temperature;    /* >= 0; 0 is greedy [0.8] */
    int top_k;             /* >= 0; 0 is off [40] */
    double top_p;          /* in (0, 1]; 1 is off [0.95] */
    double min_p;          /* in [0, 1]; 0 is off [0.05] */
    double repeat_penalty; /* > 0; 1 is off [1.0] */
    int repeat_last_n;     /* >= -1; -1 the whole context, 0 none [64] */
    int64_t seed;          /* in [0, 2^53 - 1]; -1: duetd draws one (see result.seed) [-1] */
} duet_sampling;

/* Why a generation ended. */
typedef enum {
    DUET_FINISH_STOP = 0,      /* a stop string or stop token id */
    DUET_FINISH_LENGTH = 1,    /* max_tokens, or the context is full */
    DUET_FINISH_EOS = 2,       /* the model's end-of-generation token */
    DUET_FINISH_CANCELLED = 3, /* duet_cancel */
} duet_finish;

/* "stop", "length", "eos", "cancelled"; "" out of range. Static. */
const char *duet_finish_name(duet_finish f);

typedef struct {
    int prompt_tokens;        /* after the chat template */
    int cached_prompt_tokens; /* of which came from the prefix cache */
    int completion_tokens;    /* tokens sampled, the end token included */
    int retries;              /* transparent retries after worker failures */
} duet_usage;

/* Measured by duetd from its receipt of the request, in milliseconds. */
typedef struct {
    double queue_ms;     /* until its prefill started */
    double ttft_ms;      /* until the first token */
    double tpot_ms_mean; /* mean time per output token after the first */
    double total_ms;     /* until done */
} duet_timings;

/* The outcome of a finished request. Borrowed from the request (valid until
 * duet_request_free). */
typedef struct {
    const char *id;
    duet_finish finish_reason;
    const char *text;         /* the whole completion, NUL-terminated (may hold NULs: use
                                 text_len) */
    size_t text_len;
    const int32_t *token_ids; /* [n_token_ids] every token sampled, the end token included */
    int n_token_ids;
    int prompt_tokens;        /* from accepted */
    int max_tokens;           /* the limit in force (duetd's default filled in) */
    int64_t seed;             /* the seed in force */
    duet_usage usage;
    duet_timings timings;
} duet_result;

typedef enum {
    DUET_EVENT_ACCEPTED = 1, /* duetd admitted the request: prompt_tokens, max_tokens, seed */
    DUET_EVENT_DELTA = 2,    /* new text and tokens (stream only): index, text, token_ids */
    DUET_EVENT_DONE = 3,     /* the last event: result */
    DUET_EVENT_ERROR = 4,    /* the last event: error (refused, or failed after accepted) */
} duet_event_kind;

/* One event of one request. Pointers are borrowed: from duet_next, valid until the next
 * duet_next/duet_wait/duet_request_free on that request; in a callback, during the call. */
typedef struct {
    duet_event_kind kind;
    const char *id;           /* the request's id */
    /* ACCEPTED */
    int prompt_tokens, max_tokens;
    int64_t seed;
    /* DELTA */
    int index;                /* completion position of token_ids[0] */
    const char *text;         /* [text_len] new text, complete UTF-8 characters (may be "") */
    size_t text_len;
    const int32_t *token_ids; /* [n_token_ids] */
    int n_token_ids;
    /* DONE */
    const duet_result *result;
    /* ERROR */
    const duet_error *error;
} duet_event;

/* Event callback (duet_params.on_event). It may call duet_cancel on any request of the
 * client; it must not call duet_request_free or duet_destroy, nor wait. */
typedef void (*duet_event_fn)(duet_request *req, const duet_event *ev, void *user);

/* A generate request. Exactly one of prompt, messages and tokens. */
typedef struct {
    const char *id;                /* unique among this client's requests in flight; NULL:
                                      libduet picks "r1", "r2", ... */
    const char *prompt;            /* text (special-token text is parsed), or NULL */
    const duet_message *messages;  /* [n_messages] chat, rendered with the model's template */
    int n_messages;
    const int32_t *tokens;         /* [n_tokens] token ids */
    int n_tokens;
    duet_sampling sampling;
    int max_tokens;                /* 1..262144; 0: duetd's default */
    const char *const *stop;       /* [n_stop] stop strings (at most 16, 1..256 bytes) */
    int n_stop;
    const int32_t *stop_token_ids; /* [n_stop_token_ids] (at most 64) */
    int n_stop_token_ids;
    int ignore_eos;                /* 1: the model's end tokens do not stop it */
    int stream;                    /* 1: DELTA events as text comes */
    const char *session;           /* conversation id: duetd keeps its KV between turns; or NULL */
    duet_event_fn on_event;        /* NULL: events are queued for duet_next */
    void *user;                    /* passed to on_event */
} duet_params;

/* Zero *p and set the protocol defaults (sampling as documented, seed -1). */
void duet_params_init(duet_params *p);

/* Check *p against the protocol's schema, send `generate`, and return its handle in *out
 * without waiting for any reply. A request that breaks the schema is refused here with
 * DUET_E_BAD_REQUEST (message naming the field) and nothing is sent; a duplicate id with
 * DUET_E_DUPLICATE_ID. */
duet_code duet_generate(duet_client *c, const duet_params *p, duet_request **out,
                        duet_error *err);

/* The next event of req (queued mode), waiting at most timeout_ms. DUET_OK with *ev set;
 * DUET_E_TIMEOUT; DUET_E_USAGE when req uses on_event or its last event was already
 * returned. A DUET_EVENT_ERROR event is returned with DUET_OK (ev->error says what). */
duet_code duet_next(duet_request *req, int timeout_ms, duet_event *ev, duet_error *err);

/* Wait until req ends (at most timeout_ms in all), discarding its queued events. DUET_OK
 * with *result (may be NULL) set when it ended with done (DUET_FINISH_CANCELLED too);
 * the request's error code when it ended with an error; DUET_E_TIMEOUT. */
duet_code duet_wait(duet_request *req, int timeout_ms, const duet_result **result,
                    duet_error *err);

/* Receive and dispatch replies for every request of c for up to timeout_ms (returns once
 * at least one message was handled and no more are waiting). DUET_OK or DUET_E_TIMEOUT. */
duet_code duet_poll(duet_client *c, int timeout_ms, duet_error *err);

/* Ask duetd to end req; returns at once. The request then ends with DONE
 * (finish_reason cancelled, usage so far), or as it was already ending. Idempotent; a
 * no-op on a finished request. */
duet_code duet_cancel(duet_request *req, duet_error *err);

/* 1 once the request's last event (DONE or ERROR) has arrived. */
int duet_request_finished(const duet_request *req);
/* Its id. Borrowed. */
const char *duet_request_id(const duet_request *req);
/* Its result when it ended with done, else NULL. Borrowed. */
const duet_result *duet_request_result(const duet_request *req);
/* Its error when it ended with one, else NULL. Borrowed. */
const duet_error *duet_request_error(const duet_request *req);

/* Free a handle; a request still in flight is cancelled first (best effort, no wait).
 * NULLs *req_p; safe twice. */
void duet_request_free(duet_request **req_p);

/* ---- cluster state ---------------------------------------------------------------------- */

/* The `status` reply (docs/PROTOCOL.md, "status and health"), checked against its schema,
 * as a new JSON object in *out (the caller json_decref()s it). Replies to other requests
 * that arrive meanwhile are dispatched as usual. */
duet_code duet_status(duet_client *c, int timeout_ms, json_t **out, duet_error *err);

/* The `health` reply. */
typedef struct {
    int ok;              /* 1 when generate requests can be served now */
    char state[16];      /* "starting", "ready", "draining" */
    int groups_ready;    /* groups with every rank alive */
    int workers_alive;
    double uptime_s;
} duet_health_info;

/* Send `health` and wait for the reply; *info and/or *json_out (new object, the caller's)
 * may be NULL. A reply with ok false is still DUET_OK: look at info->ok. */
duet_code duet_health(duet_client *c, int timeout_ms, duet_health_info *info, json_t **json_out,
                      duet_error *err);

#endif
