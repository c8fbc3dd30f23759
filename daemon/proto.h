/* daemon/proto.h: duet's two control-plane protocols on ZeroMQ (docs/PROTOCOL.md is the
 * normative text; this module is its code, and tests/test_proto.c holds the two together).
 *
 *   duet.client/1   clients (DEALER) <-> duetd's client ROUTER socket
 *   duet.worker/1   duet-worker (DEALER) <-> duetd's worker ROUTER socket
 *
 * Every message is [routing frames...] tag command body: frame 0 the tag with its version,
 * frame 1 the command name, frame 2 a JSON object (UTF-8). Routing frames (a ROUTER's
 * peer identity) sit below the protocol; frames are numbered from the tag.
 *
 * The module has three layers:
 *   1. framing: proto_send() writes one message; proto_recv() reads one (with a timeout)
 *      and proto_decode() checks its frames: tag, version, command, direction and JSON
 *      object, with a stable error code and a message naming the frame;
 *   2. bodies: one C struct per message body, with init/parse/build/free. parse checks
 *      the schema (types, ranges, lengths, unknown fields, cross-field rules) and names
 *      the field on error; build writes the canonical JSON (fields in a fixed order,
 *      compact), so every process emits the same bytes for the same struct;
 *   3. errors: proto_code, the stable error codes, and proto_send_error().
 *
 * Ownership: parsed structs own their strings and arrays (malloc'd copies); free them
 * with the type's _free (safe twice; leaves the struct as _init made it). A json_t *
 * returned by a _build is the caller's. proto_send() TAKES the body (czmq style: it is
 * released and *body_p set to NULL, whether the send works or not). A proto_msg owns
 * its body until proto_msg_clear().
 *
 * No function here blocks without a bound: proto_recv() takes a timeout (0: do not
 * wait); proto_send() takes ZMQ_DONTWAIT or waits as the socket's ZMQ_SNDTIMEO says.
 * Nothing here keeps state between calls; all functions are thread-safe on distinct
 * sockets (a ZeroMQ socket itself belongs to one thread at a time).
 */
#ifndef DUET_DAEMON_PROTO_H
#define DUET_DAEMON_PROTO_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "kernels/dtype.h"
#include "kernels/sample.h"

/* ---- protocol identity and limits (docs/PROTOCOL.md, "Limits") ----------------------- */

#define PROTO_VERSION 1
#define PROTO_CLIENT_TAG "duet.client/1"
#define PROTO_WORKER_TAG "duet.worker/1"

#define PROTO_MAX_BODY (16u << 20)       /* bytes of frame 2 (the JSON body) */
#define PROTO_MAX_SOCKET_MSG (64 << 20)  /* ZMQ_MAXMSGSIZE that proto_socket_options sets:
                                            larger frames drop the connection */
#define PROTO_MAX_TAG 32                 /* bytes of frame 0 */
#define PROTO_MAX_CMD 32                 /* bytes of frame 1 */
#define PROTO_MAX_ROUTE 4                /* routing frames before the tag */
#define PROTO_MAX_ROUTE_LEN 255          /* bytes of one routing frame (ZeroMQ's limit) */
#define PROTO_MAX_ID 64                  /* bytes of a request id, session id, worker id */
#define PROTO_MAX_PROMPT (4 << 20)       /* bytes of prompt text (chat: all contents) */
#define PROTO_MAX_TOKENS 262144          /* token ids in a prompt; also max max_tokens */
#define PROTO_MAX_MESSAGES 1024          /* chat messages */
#define PROTO_MAX_ROLE 32                /* bytes of a chat role */
#define PROTO_MAX_STOPS 16               /* stop strings */
#define PROTO_MAX_STOP_LEN 256           /* bytes of one stop string */
#define PROTO_MAX_STOP_IDS 64            /* stop token ids */
#define PROTO_MAX_EVENTS 4096            /* token events in one `tokens` message */
#define PROTO_MAX_PEERS 4096             /* ranks listed in one message */
#define PROTO_MAX_TEXT 256               /* bytes of an error/refusal message, names */
#define PROTO_MAX_ENDPOINT 256           /* bytes of a ZeroMQ endpoint */
#define PROTO_MAX_INT 9007199254740991LL /* 2^53 - 1: largest rid, xfer, seq, seed (exact in
                                            every JSON implementation) */
#define PROTO_MAX_TOKEN_ID 2147483647    /* token ids are in [0, 2^31 - 1] */
#define PROTO_SEND_TIMEOUT_MS 5000       /* ZMQ_SNDTIMEO that proto_socket_options sets */

/* ---- protocols, sides, commands ------------------------------------------------------ */

/* Which protocol. */
typedef enum {
    PROTO_CLIENT = 0, /* duet.client */
    PROTO_WORKER = 1, /* duet.worker */
} proto_kind;

/* Which end of which socket is receiving; it fixes the protocol and who may send what. */
typedef enum {
    PROTO_SIDE_CLIENT = 0,        /* a client: receives duetd's replies (duet.client) */
    PROTO_SIDE_DUETD_CLIENTS = 1, /* duetd's client socket: receives client requests */
    PROTO_SIDE_WORKER = 2,        /* a worker: receives duetd's commands (duet.worker) */
    PROTO_SIDE_DUETD_WORKERS = 3, /* duetd's worker socket: receives worker messages */
} proto_side;

/* Who sends a message. */
typedef enum {
    PROTO_FROM_PEER = 0,  /* a client (duet.client) or a worker (duet.worker) */
    PROTO_FROM_DUETD = 1, /* duetd */
} proto_sender;

/* Command names of both protocols (frame 1). The same name may be a command of both
 * protocols (cancel, error) or travel both ways with two schemas (status, health). */
typedef enum {
    PROTO_CMD_NONE = 0, /* unknown or not yet read */
    /* duet.client */
    PROTO_CMD_GENERATE,
    PROTO_CMD_CANCEL, /* also duet.worker */
    PROTO_CMD_STATUS,
    PROTO_CMD_HEALTH,
    PROTO_CMD_ACCEPTED,
    PROTO_CMD_DELTA,
    PROTO_CMD_DONE,
    PROTO_CMD_ERROR, /* also duet.worker */
    /* duet.worker */
    PROTO_CMD_REGISTER,
    PROTO_CMD_REGISTERED,
    PROTO_CMD_REFUSED,
    PROTO_CMD_HEARTBEAT,
    PROTO_CMD_ASSIGN,
    PROTO_CMD_TOKENS,
    PROTO_CMD_FINISHED,
    PROTO_CMD_FAILED,
    PROTO_CMD_RESERVE,
    PROTO_CMD_RESERVED,
    PROTO_CMD_KV_READY,
    PROTO_CMD_KV_ACK,
    PROTO_CMD_RELEASE,
    PROTO_CMD_COMM_ID,
    PROTO_CMD_COMM_INIT,
    PROTO_CMD__COUNT
} proto_cmd;

/* "generate", "kv_ready", ...; "" for PROTO_CMD_NONE or out of range. Static. */
const char *proto_cmd_name(proto_cmd c);
/* The command named name[len] in protocol kind, or PROTO_CMD_NONE. */
proto_cmd proto_cmd_lookup(proto_kind kind, const char *name, size_t len);
/* PROTO_CLIENT_TAG or PROTO_WORKER_TAG. Static. */
const char *proto_tag(proto_kind kind);
/* The protocol a side speaks, and who sends the messages that side receives. */
proto_kind proto_side_kind(proto_side side);
proto_sender proto_side_expects(proto_side side);

/* ---- error codes ----------------------------------------------------------------------- */

/* Stable error codes (the `code` of `error`, `refused` and `failed` bodies). Names on the
 * wire are the lower-case suffixes: PROTO_ERR_BAD_FRAMES is "bad_frames". When each is
 * sent: docs/PROTOCOL.md, "Error codes". */
typedef enum {
    PROTO_ERR_NONE = 0,           /* "none": no error */
    /* any message (proto_decode and the body parsers) */
    PROTO_ERR_BAD_FRAMES,         /* not exactly tag, command, body after the routing frames */
    PROTO_ERR_UNKNOWN_PROTOCOL,   /* frame 0 is not this socket's protocol */
    PROTO_ERR_UNSUPPORTED_VERSION,/* frame 0 is this protocol at another version */
    PROTO_ERR_UNKNOWN_COMMAND,    /* frame 1 is no command of the protocol */
    PROTO_ERR_UNEXPECTED_COMMAND, /* a command the receiver does not accept (direction, state) */
    PROTO_ERR_BAD_JSON,           /* frame 2 is not a UTF-8 JSON object */
    PROTO_ERR_TOO_LARGE,          /* frame 2 is over PROTO_MAX_BODY */
    PROTO_ERR_BAD_REQUEST,        /* the body breaks the command's schema (names the field) */
    /* requests (duetd, client protocol) */
    PROTO_ERR_DUPLICATE_ID,       /* a generate id already in flight on this connection */
    PROTO_ERR_PROMPT_TOO_LONG,    /* prompt (+ max_tokens) does not fit the context */
    PROTO_ERR_BUSY,               /* admission control: queue full; retry after retry_after_ms */
    PROTO_ERR_SESSION_BUSY,       /* the session has a request in flight */
    PROTO_ERR_UNAVAILABLE,        /* no worker group can serve requests now */
    PROTO_ERR_NOT_FOUND,          /* cancel of an id that is not in flight */
    PROTO_ERR_CANCELLED,          /* duetd cancelled the request (shutdown drain ran out) */
    PROTO_ERR_SHUTTING_DOWN,      /* duetd is draining and takes no new requests */
    PROTO_ERR_WORKER_LOST,        /* the serving workers died or a transfer broke; retries spent */
    PROTO_ERR_SLOW_CLIENT,        /* the client did not read its replies in time */
    PROTO_ERR_INTERNAL,           /* a bug or unexpected failure; the message says where */
    /* worker protocol (refused, failed) */
    PROTO_ERR_MODEL_MISMATCH,     /* register: model sha256 differs from the cluster's */
    PROTO_ERR_LAYOUT_MISMATCH,    /* register: KV layout incompatible with the cluster's */
    PROTO_ERR_NO_SLOT,            /* register: the place asked for is taken or not configured */
    PROTO_ERR_DUPLICATE_WORKER,   /* register: a live worker has this worker_id */
    PROTO_ERR_KV_FULL,            /* reserve/assign: not enough KV blocks */
    PROTO_ERR_TRANSFER_FAILED,    /* a KV transfer broke on the data plane */
    PROTO_ERR_LEASE_EXPIRED,      /* a reservation or a source copy outlived its lease */
    PROTO_ERR_OTHER,              /* "other": a code this build does not know (parsed only;
                                     treat like internal) */
    PROTO_ERR__COUNT
} proto_code;

/* "bad_frames", ...; "" out of range. Static. */
const char *proto_code_name(proto_code c);
/* The code named name, or PROTO_ERR_OTHER when unknown. */
proto_code proto_code_lookup(const char *name);

/* An error found while decoding or parsing; what an `error` reply needs. */
typedef struct {
    proto_code code;                  /* PROTO_ERR_NONE when there is none */
    char message[PROTO_MAX_TEXT];     /* one line naming the frame or the field */
    char id[PROTO_MAX_ID + 1];        /* the request's id when the body had a valid one, else "" */
    proto_cmd cmd;                    /* the command it answers, when frame 1 was readable */
} proto_err;

/* Sets *err (err may be NULL) and returns -1. */
int proto_err_set(proto_err *err, proto_code code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* ---- messages on sockets ---------------------------------------------------------------- */

/* Routing frames (a ROUTER socket's peer identity), copied out of a received message so
 * that the reply can go back to the same peer. */
typedef struct {
    int n;                                            /* frames used */
    size_t len[PROTO_MAX_ROUTE];                      /* bytes of each */
    unsigned char id[PROTO_MAX_ROUTE][PROTO_MAX_ROUTE_LEN];
} proto_route;

/* One received message. */
typedef struct {
    proto_route route; /* filled even when the message is invalid (to send the error back) */
    proto_kind kind;   /* the protocol of the receiving side (replies use it) */
    proto_cmd cmd;     /* the command, when frame 1 named one; else PROTO_CMD_NONE */
    json_t *body;      /* owned JSON object; NULL unless the message is valid */
} proto_msg;

/* Frees msg's body and empties it. Safe twice. */
void proto_msg_clear(proto_msg *msg);

/* One frame's bytes (borrowed). */
typedef struct {
    const void *data;
    size_t size;
} proto_frame;

/* Results of proto_recv and proto_decode. */
typedef enum {
    PROTO_OK = 0,      /* a valid message is in *msg */
    PROTO_TIMEOUT = 1, /* nothing arrived within the timeout */
    PROTO_INVALID = 2, /* a message arrived and was consumed, but breaks the protocol: *err
                          says how, msg->route (and msg->cmd when known) are set, so the
                          caller can answer with proto_send_error(); body is NULL */
    PROTO_SYSERR = -1, /* a ZeroMQ or memory failure, or bad arguments: errno is set and
                          *err carries zmq_strerror's text (code PROTO_ERR_INTERNAL) */
} proto_rc;

/* Check frames[n]: the first n_route are routing frames (1 on a ROUTER socket, 0 on a
 * DEALER; at most PROTO_MAX_ROUTE), then tag, command and body as side expects them.
 * On PROTO_OK msg->body is a new JSON object. The body's schema is not checked here:
 * parse it with the command's body type (proto_body_type). Never fails silently: every
 * violation gives PROTO_INVALID with err->code one of bad_frames, unknown_protocol,
 * unsupported_version, unknown_command, unexpected_command, too_large, bad_json, and a
 * message naming the frame. *msg is overwritten (clear it first if it held a body). */
proto_rc proto_decode(const proto_frame *frames, int n, proto_side side, int n_route,
                      proto_msg *msg, proto_err *err);

/* Receive one message from sock, waiting at most timeout_ms (0: only what has already
 * arrived; negative values are refused with EINVAL: nothing here waits forever), then
 * proto_decode() it. All frames of the message are consumed, valid or not. EINTR from
 * a signal gives PROTO_SYSERR with errno EINTR. */
proto_rc proto_recv(void *sock, proto_side side, int n_route, int timeout_ms, proto_msg *msg,
                    proto_err *err);

/* Send [route frames] tag(kind) command body on sock. *body_p is TAKEN: it is released
 * and set to NULL in every case (a NULL *body_p or body_p sends "{}"). The body is
 * written compactly, fields in their insertion order. flags: 0 or ZMQ_DONTWAIT. cmd must
 * be a command of kind. Returns 0, or -1 with errno: EAGAIN (ZMQ_DONTWAIT and the
 * high-water mark is reached, or ZMQ_SNDTIMEO ran out), EHOSTUNREACH (ROUTER with
 * ZMQ_ROUTER_MANDATORY: the peer is gone), EMSGSIZE (body over PROTO_MAX_BODY), EINVAL
 * (bad kind/cmd, body not an object), ENOMEM, or ZeroMQ's errno. */
int proto_send(void *sock, const proto_route *route, proto_kind kind, proto_cmd cmd,
               json_t **body_p, int flags);

/* Send an `error` for err (id, code, message and command from err) to route. Same
 * returns as proto_send. */
int proto_send_error(void *sock, const proto_route *route, proto_kind kind, const proto_err *err,
                     int flags);

/* Socket options for a protocol socket of side: ZMQ_LINGER 0, ZMQ_MAXMSGSIZE
 * PROTO_MAX_SOCKET_MSG, ZMQ_SNDTIMEO PROTO_SEND_TIMEOUT_MS (so a send without
 * ZMQ_DONTWAIT fails with EAGAIN instead of waiting forever); on duetd's sides ZMQ_ROUTER_MANDATORY (sends to a gone peer fail
 * with EHOSTUNREACH instead of vanishing) and, with heartbeat_ms > 0, ZMTP heartbeats
 * (ZMQ_HEARTBEAT_IVL heartbeat_ms, ZMQ_HEARTBEAT_TIMEOUT 4 intervals) so dead TCP peers
 * are noticed; on client/worker sides ZMQ_IMMEDIATE and, with heartbeat_ms > 0, the same
 * heartbeats. Call before bind/connect. 0, or -1 with errno. */
int proto_socket_options(void *sock, proto_side side, int heartbeat_ms);

/* ---- bodies: common parts ------------------------------------------------------------- */

/* Roles of a worker group (and of an assign). */
typedef enum {
    PROTO_ROLE_BOTH = 0,    /* "both": colocated prefill and decode */
    PROTO_ROLE_PREFILL = 1, /* "prefill" */
    PROTO_ROLE_DECODE = 2,  /* "decode" */
    PROTO_ROLE_ANY = 3,     /* "any": register only: duetd chooses */
} proto_role;

/* Why a generation ended. */
typedef enum {
    PROTO_FINISH_STOP = 0,      /* "stop": a stop string or a stop token id */
    PROTO_FINISH_LENGTH = 1,    /* "length": max_tokens or the context is full */
    PROTO_FINISH_EOS = 2,       /* "eos": the model's end-of-generation token */
    PROTO_FINISH_CANCELLED = 3, /* "cancelled": the client's cancel (or duetd's, to a worker) */
} proto_finish;

/* Static names of the enums above ("both", "stop", ...); "" out of range. */
const char *proto_role_name(proto_role r);
const char *proto_finish_name(proto_finish f);

/* Sampling parameters as they travel (generate.sampling, assign.sampling). Doubles, so
 * that JSON numbers round-trip; defaults equal sample_params_default(). */
typedef struct {
    double temperature;  /* >= 0; 0 = greedy [0.8] */
    int top_k;           /* >= 0; 0 = off [40] */
    double top_p;        /* in (0, 1]; 1 = off [0.95] */
    double min_p;        /* in [0, 1]; 0 = off [0.05] */
    double repeat_penalty; /* > 0; 1 = off [1.0] */
    int repeat_last_n;   /* >= -1; -1 = whole history, 0 = none [64] */
    int64_t seed;        /* in [0, PROTO_MAX_INT]; -1 = not given (duetd draws one) [-1] */
} proto_sampling;

/* The kernel's parameters for s; seed_if_absent is used when s->seed is -1. */
sample_params proto_sampling_params(const proto_sampling *s, uint64_t seed_if_absent);

/* ---- duet.client bodies ---------------------------------------------------------------- */

/* status and health requests: the body is {} (any field is an error). */
typedef struct {
    int unused_; /* C needs a member */
} proto_empty;

/* One chat message. */
typedef struct {
    char *role;    /* 1..PROTO_MAX_ROLE bytes ("system", "user", "assistant", ...) */
    char *content; /* any UTF-8 text, may be empty */
} proto_chat_msg;

/* How a generate gives its prompt (exactly one form). */
typedef enum {
    PROTO_PROMPT_TEXT = 0,   /* prompt */
    PROTO_PROMPT_CHAT = 1,   /* messages */
    PROTO_PROMPT_TOKENS = 2, /* tokens */
} proto_prompt_form;

/* generate (client -> duetd). */
typedef struct {
    char *id;                  /* client's id, unique among its in-flight requests */
    proto_prompt_form form;    /* which one of the three below is set (derived, not sent) */
    char *prompt;              /* text, or NULL */
    proto_chat_msg *messages;  /* [n_messages], or NULL */
    int n_messages;
    int32_t *tokens;           /* [n_tokens] token ids, or NULL */
    int n_tokens;
    proto_sampling sampling;   /* "sampling": {...}; absent fields take defaults */
    int max_tokens;            /* 1..PROTO_MAX_TOKENS; 0 = not given (duetd's default) */
    char **stop;               /* [n_stop] stop strings, 1..PROTO_MAX_STOP_LEN bytes each */
    int n_stop;
    int32_t *stop_token_ids;   /* [n_stop_token_ids] */
    int n_stop_token_ids;
    int ignore_eos;            /* 1: do not stop at the model's end token [0] */
    int stream;                /* 1: delta messages as tokens come; 0: text in done [0] */
    char *session;             /* session id whose KV stays cached between turns, or NULL */
} proto_generate;

/* cancel (client -> duetd). */
typedef struct {
    char *id; /* the generate's id */
} proto_cancel;

/* accepted (duetd -> client): the request passed the checks and is queued. */
typedef struct {
    char *id;
    int prompt_tokens; /* tokens of the prompt (after the chat template) */
    int max_tokens;    /* the limit in force (the default filled in) */
    int64_t seed;      /* the seed in force (drawn by duetd when not given) */
} proto_accepted;

/* delta (duetd -> client, stream only). */
typedef struct {
    char *id;
    int index;          /* completion position of token_ids[0]; deltas are contiguous */
    char *text;         /* new text (may be "": incomplete UTF-8 or a possible stop string) */
    int32_t *token_ids; /* [n_token_ids] the tokens sampled since the last delta */
    int n_token_ids;
} proto_delta;

typedef struct {
    int prompt_tokens;        /* tokens of the prompt */
    int cached_prompt_tokens; /* of which found in the prefix cache (not computed) */
    int completion_tokens;    /* tokens sampled (the end token included) */
    int retries;              /* transparent retries after worker/transfer failures */
} proto_usage;

typedef struct {
    double queue_ms;     /* from generate to the start of prefill */
    double ttft_ms;      /* from generate to the first token */
    double tpot_ms_mean; /* mean time per output token after the first (0 with one token) */
    double total_ms;     /* from generate to done */
} proto_timings;

/* done (duetd -> client): the last message of a request. */
typedef struct {
    char *id;
    proto_finish finish_reason;
    char *text;          /* the whole text when not streaming, else NULL (not sent) */
    int32_t *token_ids;  /* [n_token_ids] all tokens when not streaming, else NULL */
    int n_token_ids;
    proto_usage usage;
    proto_timings timings;
} proto_done;

/* error (duetd -> client; either way on duet.worker). */
typedef struct {
    char *id;            /* the request it is about, or NULL */
    proto_code code;
    char *message;       /* one line, names the frame or field */
    char *command;       /* the command it answers, or NULL */
    int retry_after_ms;  /* busy/unavailable: a hint, else 0 (not sent) */
} proto_error;

typedef struct {
    int group;               /* group id */
    proto_role role;
    int tp_size;
    int workers_alive;       /* ranks alive (== tp_size when the group can serve) */
    int running;             /* sequences in its batch */
    int waiting;             /* assigned to it, not yet running */
    int64_t kv_blocks_total; /* its KV pool (per rank) */
    int64_t kv_blocks_free;
    int64_t kv_blocks_cached; /* unreferenced but kept for prefix hits */
    /* disaggregated groups (omitted when 0): KV transfers this group sent (prefill) or
     * received (decode), their payload, the senders' summed send time and its bandwidth,
     * and the summed part of the send time after the last layer was shipped (the part the
     * prefill's forward pass did not hide; transfer_ms includes the overlapped compute, so
     * transfer_gbps is a lower bound on what the data plane can do) */
    int64_t transfers, transfer_bytes;
    double transfer_ms, transfer_gbps, transfer_tail_ms;
    /* decode groups: of the finished requests' time, the shares (0..1) spent queued,
     * prefilling (to the first token), transferring (first token to all KV arrived) and
     * decoding */
    double share_queue, share_prefill, share_transfer, share_decode;
} proto_group_status;

typedef enum {
    PROTO_WSTATE_STARTING = 0, /* "starting": registered, communicators not up */
    PROTO_WSTATE_READY = 1,    /* "ready" */
    PROTO_WSTATE_DEAD = 2,     /* "dead": silent for dead_after intervals */
} proto_wstate;

typedef struct {
    char *worker_id;
    int rank, group, tp_rank;
    proto_role role;
    char *device;            /* "cpu", "cuda:0 NVIDIA H100", ... */
    proto_wstate state;
    int64_t last_seen_ms;    /* since its last message */
    int64_t kv_capacity_blocks;
} proto_worker_status;

typedef struct {
    int64_t blocks_total, blocks_used, blocks_cached; /* summed over groups */
    double use;                                       /* used / total, 0..1 */
} proto_kv_status;

typedef struct {
    int waiting; /* requests queued in duetd */
    int running; /* requests assigned to groups */
    int limit;   /* queue limit (busy beyond) */
} proto_queue_status;

typedef struct {
    int64_t prompt_tokens; /* prompt tokens of finished prefills */
    int64_t cached_tokens; /* of which prefix-cache hits */
    double hit_rate;       /* cached / prompt, 0..1 */
} proto_prefix_status;

typedef struct {
    int64_t completed, failed, in_flight;
    int64_t bytes;  /* KV bytes moved */
    double mean_ms; /* reserve to kv_ack */
    double max_ms;
} proto_transfer_status;

typedef struct {
    int64_t served, failed, cancelled, retried;
} proto_request_status;

/* status (duetd -> client). */
typedef struct {
    char *version;      /* duet's version */
    char *model;        /* model name */
    char *model_sha256; /* 64 hex digits, or NULL before a worker registered */
    double uptime_s;
    proto_group_status *groups; /* [n_groups] */
    int n_groups;
    proto_worker_status *workers; /* [n_workers] */
    int n_workers;
    proto_kv_status kv;
    proto_queue_status queue;
    proto_prefix_status prefix_cache;
    proto_transfer_status transfers;
    proto_request_status requests;
} proto_status;

typedef enum {
    PROTO_HEALTH_STARTING = 0, /* "starting" */
    PROTO_HEALTH_READY = 1,    /* "ready" */
    PROTO_HEALTH_DRAINING = 2, /* "draining" */
} proto_health_state;

/* health (duetd -> client). */
typedef struct {
    int ok;                   /* 1 when generate requests can be served now */
    proto_health_state state;
    int groups_ready;         /* groups with every rank alive */
    int workers_alive;
    double uptime_s;
} proto_health;

/* ---- duet.worker bodies ---------------------------------------------------------------- */

typedef struct {
    char *sha256;  /* SHA-256 of the GGUF file, 64 lower-case hex digits */
    char *name;    /* general.name, or NULL */
    int n_vocab;
    int n_ctx;     /* context length served */
} proto_model_id;

/* A worker's KV cache layout (the shard it holds). */
typedef struct {
    int block_tokens;      /* tokens per block */
    dtype_t dtype;         /* DTYPE_F32 "f32", DTYPE_F16 "f16", DTYPE_BF16 "bf16", DTYPE_I8 "i8" */
    int n_layer;
    int n_head_kv;         /* KV heads of the whole model */
    int head0;             /* first KV head of this shard */
    int n_heads;           /* KV heads of this shard: [head0, head0 + n_heads) */
    int head_dim;
    int64_t capacity_blocks; /* blocks in the pool */
} proto_kv_layout;

typedef enum {
    PROTO_DEVICE_CPU = 0,  /* "cpu" */
    PROTO_DEVICE_CUDA = 1, /* "cuda" */
} proto_device_kind;

typedef struct {
    proto_device_kind kind;
    int index;             /* device ordinal (0 for the CPU) */
    char *name;            /* "NVIDIA H100 80GB HBM3", CPU model, ... */
    int64_t memory_bytes;  /* device memory (CPU: RAM) */
} proto_device;

typedef enum {
    PROTO_BACKEND_TCP = 0,  /* "tcp": ZeroMQ, host memory */
    PROTO_BACKEND_MPI = 1,  /* "mpi" */
    PROTO_BACKEND_NCCL = 2, /* "nccl" */
} proto_backend;

/* register (worker -> duetd): the first message of a worker. */
typedef struct {
    char *worker_id;        /* stable name, unique in the cluster */
    char *software;         /* "duet 0.1.0", or NULL */
    proto_model_id model;
    proto_kv_layout kv;
    int rank;               /* world rank, or -1: duetd assigns [-1] */
    int group;              /* group id, or -1: duetd assigns (tp_size 1 only) [-1] */
    proto_role role;        /* or PROTO_ROLE_ANY: duetd assigns [any] */
    int tp_rank, tp_size;   /* place in the group (shapes the shard) */
    proto_device device;
    proto_backend backend;  /* data plane */
    char *endpoint;         /* tcp: where peers reach its data plane, else NULL */
    int max_batch;          /* sequences its scheduler runs at once */
} proto_register;

/* registered (duetd -> worker). */
typedef struct {
    int rank, group;
    proto_role role;        /* never "any" */
    int tp_rank, tp_size;
    int heartbeat_ms;       /* send something at least this often */
    int dead_after;         /* a peer silent this many intervals is dead (3..5) */
} proto_registered;

/* refused (duetd -> worker): registration refused; the worker exits or retries later. */
typedef struct {
    proto_code code;
    char *message;
} proto_refused;

/* heartbeat (both ways). duetd's is {}; a worker's carries its load (-1: not sent). */
typedef struct {
    int running, waiting;
    int64_t kv_free_blocks, kv_cached_blocks;
} proto_heartbeat;

/* A rank of the other group in a transfer and the KV heads it holds. */
typedef struct {
    int rank;
    int head0, n_heads;
} proto_peer;

/* The KV transfer part of an assign. */
typedef struct {
    int64_t xfer;          /* transfer id (cluster-wide, >= 1) */
    int64_t seq;           /* prefill: order of this transfer between the two groups */
    int peer_group;        /* prefill: the decode group */
    int first_block;       /* prefill: send blocks from this one (the rest are cached there) */
    proto_peer *peers;     /* prefill: [n_peers] the decode group's ranks */
    int n_peers;
    int lease_ms;          /* prefill: keep the source blocks at most this long after sending */
} proto_transfer;

/* assign (duetd -> group leader): run a request. The context is tokens ++ generated. */
typedef struct {
    int64_t rid;            /* request id (cluster-wide, >= 1) */
    proto_role role;        /* both, prefill or decode */
    int32_t *tokens;        /* [n_tokens] prompt ids */
    int n_tokens;
    int32_t *generated;     /* [n_generated] completion tokens so far (decode: >= 1) */
    int n_generated;
    proto_sampling sampling; /* seed always given by duetd */
    char *rng;              /* sampler state to continue from (64 hex digits), or NULL */
    int max_tokens;         /* completion budget, generated tokens included */
    int32_t *stop_token_ids; /* [n_stop_token_ids] (the model's end tokens are implied) */
    int n_stop_token_ids;
    int ignore_eos;
    char *session;          /* keep this sequence's KV for the next turn, or NULL */
    int has_transfer;       /* prefill and decode: 1 */
    proto_transfer transfer;
} proto_assign;

/* One request's new tokens. */
typedef struct {
    int64_t rid;
    int index;          /* completion position of ids[0] */
    int32_t *ids;       /* [n_ids] */
    int n_ids;
} proto_token_event;

/* tokens (worker -> duetd): new tokens of any number of requests (one step, or a few). */
typedef struct {
    proto_token_event *events; /* [n_events] */
    int n_events;
} proto_tokens;

/* finished (worker -> duetd): a both/decode assign ended. */
typedef struct {
    int64_t rid;
    proto_finish reason;
    int n_generated;    /* completion tokens in all (those of the assign included) */
    int cached_tokens;  /* context tokens found in this worker's prefix cache */
} proto_finished;

/* failed (worker -> duetd): a request or transfer could not go on here. */
typedef struct {
    int64_t rid;      /* 0: none */
    int64_t xfer;     /* 0: none */
    proto_code code;  /* kv_full, transfer_failed, lease_expired, internal, ... */
    char *message;
    int retryable;    /* 1 when running it elsewhere may work */
} proto_failed;

/* cancel (duetd -> worker). */
typedef struct {
    int64_t rid;
} proto_wcancel;

/* reserve (duetd -> decode leader): make room for a transfer's KV and post its receives. */
typedef struct {
    int64_t xfer;
    int64_t rid;
    int64_t seq;           /* order of this transfer between the two groups */
    int src_group;         /* the prefill group */
    proto_peer *src;       /* [n_src] its ranks and heads */
    int n_src;
    int32_t *tokens;       /* [n_tokens] the context whose KV will arrive */
    int n_tokens;
    int lease_ms;          /* free the reservation if the KV has not all arrived by then */
} proto_reserve;

/* reserved (decode leader -> duetd). */
typedef struct {
    int64_t xfer, rid;
    int cached_tokens;     /* context tokens already in its prefix cache (multiple of
                              block_tokens): the source sends from block cached/block_tokens */
    int lease_ms;          /* lease granted (<= the one asked) */
} proto_reserved;

/* kv_ready (prefill leader -> duetd): every block of the transfer is sent. */
typedef struct {
    int64_t xfer, rid;
    int n_tokens;          /* context tokens whose KV was sent */
    int cached_tokens;     /* of which were prefix-cache hits at the source */
    char *rng;             /* sampler state after the first token (64 hex), or NULL */
    int64_t bytes;         /* KV payload bytes this rank sent (optional, 0) */
    double send_ms;        /* from the first layer shipped to the last send's completion
                              (optional, 0): bytes / send_ms is the achieved bandwidth */
    double tail_ms;        /* of send_ms, the part after the last layer was shipped: what the
                              prefill's forward pass did not hide (optional, 0) */
} proto_kv_ready;

/* kv_ack (decode leader -> duetd) and release (duetd -> either leader). */
typedef struct {
    int64_t xfer, rid;
} proto_xfer_ref;

/* comm_id (world rank 0 -> duetd): the NCCL unique id to hand to every rank. */
typedef struct {
    char *unique_id;       /* hex of the 128-byte ncclUniqueId (256 digits) */
} proto_comm_id;

/* A rank's data-plane endpoint. */
typedef struct {
    int rank;
    char *endpoint;
} proto_endpoint;

/* comm_init (duetd -> worker): build the data-plane communicator. */
typedef struct {
    proto_backend backend;
    int world_size;
    int rank;
    char *unique_id;        /* nccl: 256 hex digits; else NULL */
    proto_endpoint *peers;  /* tcp: [n_peers] every live rank's endpoint */
    int n_peers;
} proto_comm_init;

/* ---- bodies: generic functions ----------------------------------------------------------- */

/* Body types, one per (protocol, command, sender). */
typedef enum {
    PROTO_T_NONE = 0,
    PROTO_T_GENERATE,   /* proto_generate */
    PROTO_T_CANCEL,     /* proto_cancel */
    PROTO_T_STATUS_REQ, /* proto_empty */
    PROTO_T_HEALTH_REQ, /* proto_empty */
    PROTO_T_ACCEPTED,   /* proto_accepted */
    PROTO_T_DELTA,      /* proto_delta */
    PROTO_T_DONE,       /* proto_done */
    PROTO_T_ERROR,      /* proto_error (both protocols) */
    PROTO_T_STATUS,     /* proto_status */
    PROTO_T_HEALTH,     /* proto_health */
    PROTO_T_REGISTER,   /* proto_register */
    PROTO_T_REGISTERED, /* proto_registered */
    PROTO_T_REFUSED,    /* proto_refused */
    PROTO_T_HEARTBEAT,  /* proto_heartbeat */
    PROTO_T_ASSIGN,     /* proto_assign */
    PROTO_T_TOKENS,     /* proto_tokens */
    PROTO_T_FINISHED,   /* proto_finished */
    PROTO_T_FAILED,     /* proto_failed */
    PROTO_T_WCANCEL,    /* proto_wcancel */
    PROTO_T_RESERVE,    /* proto_reserve */
    PROTO_T_RESERVED,   /* proto_reserved */
    PROTO_T_KV_READY,   /* proto_kv_ready */
    PROTO_T_KV_ACK,     /* proto_xfer_ref */
    PROTO_T_RELEASE,    /* proto_xfer_ref */
    PROTO_T_COMM_ID,    /* proto_comm_id */
    PROTO_T_COMM_INIT,  /* proto_comm_init */
    PROTO_T__COUNT
} proto_type;

/* The body type of cmd in protocol kind sent by sender, or PROTO_T_NONE when that
 * sender does not send cmd. */
proto_type proto_body_type(proto_kind kind, proto_cmd cmd, proto_sender sender);
/* The body type of a message received on side (proto_body_type of its kind, command and
 * the sender the side expects). */
proto_type proto_msg_type(const proto_msg *msg, proto_side side);
/* sizeof the struct of type t (0 for PROTO_T_NONE). */
size_t proto_type_size(proto_type t);
/* The command a type is the body of ("generate", ...). Static. */
const char *proto_type_name(proto_type t);

/* Fill *m (a struct of type t) with the defaults: what absent optional fields mean. */
void proto_init(proto_type t, void *m);
/* Check body against type t's schema and convert it into *out (which is init'ed first;
 * on error nothing stays allocated in it). Returns 0, or -1 with err->code
 * PROTO_ERR_BAD_REQUEST and a message like "generate: field 'sampling.top_p' must be in
 * (0, 1] (got 1.5)"; err->id is set when body has a valid "id". Unknown fields are
 * errors; JSON null counts as absent for optional fields. */
int proto_parse(proto_type t, const json_t *body, void *out, proto_err *err);
/* The canonical JSON object of *m (the caller's), or NULL when out of memory or m
 * breaks the schema's enums. Optional fields at their "absent" value are left out. */
json_t *proto_build(proto_type t, const void *m);
/* Free what *m owns and re-init it. Safe twice. */
void proto_free(proto_type t, void *m);

/* Typed wrappers: for each body struct proto_X of type PROTO_T_Y:
 *   void    proto_X_init(proto_X *m);
 *   int     proto_X_parse(const json_t *body, proto_X *out, proto_err *err);
 *   json_t *proto_X_build(const proto_X *m);
 *   void    proto_X_free(proto_X *m);
 * (proto_xfer_ref has two schemas: use the generic functions with PROTO_T_KV_ACK or
 * PROTO_T_RELEASE; proto_empty likewise with PROTO_T_STATUS_REQ or PROTO_T_HEALTH_REQ.) */
#define PROTO_DECLARE_BODY(X)                                                  \
    void proto_##X##_init(proto_##X *m);                                       \
    int proto_##X##_parse(const json_t *body, proto_##X *out, proto_err *err); \
    json_t *proto_##X##_build(const proto_##X *m);                             \
    void proto_##X##_free(proto_##X *m);
PROTO_DECLARE_BODY(generate)
PROTO_DECLARE_BODY(cancel)
PROTO_DECLARE_BODY(accepted)
PROTO_DECLARE_BODY(delta)
PROTO_DECLARE_BODY(done)
PROTO_DECLARE_BODY(error)
PROTO_DECLARE_BODY(status)
PROTO_DECLARE_BODY(health)
PROTO_DECLARE_BODY(register)
PROTO_DECLARE_BODY(registered)
PROTO_DECLARE_BODY(refused)
PROTO_DECLARE_BODY(heartbeat)
PROTO_DECLARE_BODY(assign)
PROTO_DECLARE_BODY(tokens)
PROTO_DECLARE_BODY(finished)
PROTO_DECLARE_BODY(failed)
PROTO_DECLARE_BODY(wcancel)
PROTO_DECLARE_BODY(reserve)
PROTO_DECLARE_BODY(reserved)
PROTO_DECLARE_BODY(kv_ready)
PROTO_DECLARE_BODY(comm_id)
PROTO_DECLARE_BODY(comm_init)
#undef PROTO_DECLARE_BODY

/* Build *m's body (type t) and send it as cmd: proto_build + proto_send. Same returns
 * as proto_send; ENOMEM when the build fails. */
int proto_send_body(void *sock, const proto_route *route, proto_kind kind, proto_cmd cmd,
                    proto_type t, const void *m, int flags);

#endif
