/* daemon/config.h: duet's configuration file, read by duetd and by every duet-worker.
 *
 * One INI file (parsed by libinih) with three kinds of sections:
 *   [model]        the GGUF file and what is served from it
 *   [daemon]       duetd: endpoints, heartbeats, admission limits, logging
 *   [group NAME]   one per model instance: role, TP size, devices, KV budget, batching
 * conf/duet.conf is the documented example; config_doc() prints the reference.
 *
 * Every parameter is one row of a single table in config.c (section, name, type,
 * default, range or allowed values, whether a reload may change it, one line of
 * documentation); parsing, validation, defaults, config_dump(), config_doc() and
 * config_diff_reloadable() all walk that table.
 *
 * Syntax (libinih): "key = value" lines, "[section]" headers, comments on lines of
 * their own starting with ';' or '#', inline comments after " ;". Values are one line
 * (leading whitespace is ignored, so there are no continuation lines); lines other
 * than comments are at most CONFIG_MAX_LINE characters. Each section appears once, each key at most once.
 * Unknown sections and keys are errors. Sizes (kv_budget, client_buffer_bytes) take
 * the binary suffixes K, M, G, T or KiB, MiB, GiB, TiB (all powers of 1024, any case).
 *
 * Errors read "FILE:LINE: [section] key: problem (expected ...)"; errors about a whole
 * section point at its header line, and errors about the whole file read "FILE: ...".
 * config_load collects up to CONFIG_MAX_ERRORS of them before giving up, one per line.
 */
#ifndef DUET_DAEMON_CONFIG_H
#define DUET_DAEMON_CONFIG_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "kernels/dtype.h"

#define CONFIG_MAX_TP 64          /* largest tp_size */
#define CONFIG_MAX_GROUPS 256     /* most [group NAME] sections */
#define CONFIG_MAX_ERRORS 32      /* errors listed by one config_load; the rest are counted */
#define CONFIG_MAX_LINE 196       /* longest line, in characters (libinih's buffer) */
#define CONFIG_MAX_FILE (1 << 20) /* largest configuration file, in bytes */

/* [model] chat_style: how chat requests are rendered. */
typedef enum {
    CONFIG_CHAT_AUTO = 0,   /* recognise the family from the GGUF's chat template */
    CONFIG_CHAT_CHATML = 1, /* the values match daemon/chat.h's chat_style */
    CONFIG_CHAT_LLAMA2 = 2,
    CONFIG_CHAT_LLAMA3 = 3,
    CONFIG_CHAT_PHI3 = 4,
} config_chat;

/* [daemon] when_full: what a request meets when every group is at its limit. */
typedef enum {
    CONFIG_FULL_WAIT = 0, /* wait in the queue (up to queue_limit requests), then busy */
    CONFIG_FULL_BUSY = 1, /* answer "busy" at once */
} config_when_full;

/* [daemon] log_level, most severe first: a level logs itself and the ones above. */
typedef enum {
    CONFIG_LOG_ERROR = 0,
    CONFIG_LOG_WARN = 1,
    CONFIG_LOG_INFO = 2,
    CONFIG_LOG_DEBUG = 3,
} config_log_level;

/* [group] role. */
typedef enum {
    CONFIG_ROLE_PREFILL = 0, /* runs prompts and ships their KV to a decode group */
    CONFIG_ROLE_DECODE = 1,  /* receives KV and generates */
    CONFIG_ROLE_BOTH = 2,    /* colocated: prefill and decode in the same group */
} config_role;

/* [group] transport: the data plane backend (comm/). */
typedef enum {
    CONFIG_TRANSPORT_TCP = 0,  /* host memory over ZeroMQ; workers started without MPI */
    CONFIG_TRANSPORT_MPI = 1,  /* host memory; workers under mpirun */
    CONFIG_TRANSPORT_NCCL = 2, /* device memory; every device must be cuda:N */
} config_transport;

/* One entry of a group's devices list. */
typedef enum {
    CONFIG_DEV_CPU = 0,
    CONFIG_DEV_CUDA = 1,
} config_dev_kind;

typedef struct {
    config_dev_kind kind; /* CPU or CUDA */
    int index;            /* CUDA device ordinal (cuda:N); 0 for the CPU */
} config_device;

/* [model] */
typedef struct {
    char *path;             /* GGUF file, as written (relative to the working directory) */
    config_chat chat_style; /* CONFIG_CHAT_AUTO: recognise from the model's template */
    char *name;             /* served model name; default: path's basename without ".gguf" */
    int max_context;        /* tokens per sequence; 0: the model's trained context */
    dtype_t kv_type;        /* KV element type: DTYPE_F32, DTYPE_F16, DTYPE_BF16 or DTYPE_I8 */
} config_model;

/* [daemon] */
typedef struct {
    char *client_endpoint;       /* ZeroMQ endpoint duetd binds for clients */
    char *worker_endpoint;       /* ZeroMQ endpoint duetd binds for workers */
    int heartbeat_ms;            /* heartbeat interval, both ways */
    int dead_after;              /* heartbeats missed before a peer is dead (3..5) */
    int queue_limit;             /* requests that may wait for room */
    config_when_full when_full;  /* wait in the queue or answer busy */
    int max_prompt_tokens;       /* longest prompt accepted; 0: the context length */
    int max_tokens_default;      /* max_tokens of a request that sets none */
    int max_tokens_limit;        /* largest max_tokens accepted; 0: the context length */
    int64_t client_buffer_bytes; /* a slow client's buffered output beyond which its request is cancelled */
    int request_timeout_ms;      /* a request's longest life; 0: none */
    int transfer_lease_ms;       /* a KV reservation's lease (disaggregated groups) */
    config_log_level log_level;  /* least severe level logged */
} config_daemon;

/* [group NAME] */
typedef struct {
    char *name;                            /* NAME of the section header */
    config_role role;                      /* prefill, decode or both */
    int tp_size;                           /* workers (devices) in the group */
    int n_devices;                         /* == tp_size once loaded */
    config_device devices[CONFIG_MAX_TP];  /* [n_devices]: rank r runs on devices[r] */
    int threads;                           /* CPU threads per worker; 0: one per core */
    int64_t kv_budget;                     /* bytes of KV cache per worker */
    int max_batch_tokens;                  /* tokens in one step of the scheduler */
    int max_seqs;                          /* sequences in one batch */
    config_transport transport;            /* data plane backend */
    char *data_endpoint;                   /* tcp only: base endpoint (rank r: port + r); "" = any free port */
} config_group;

/* A loaded configuration: plain data, every field filled in (defaults included). */
typedef struct duet_config {
    char *source;          /* the file it came from, for messages */
    config_model model;    /* [model] */
    config_daemon daemon;  /* [daemon] */
    int n_groups;          /* >= 1 */
    config_group *groups;  /* [n_groups], in file order */
} duet_config;

/* Read and validate the file at path. 0 and *out (the caller's, release with
 * config_free); or -1, *out NULL and every error found (up to CONFIG_MAX_ERRORS, one
 * per line, "FILE:LINE: [section] key: problem (expected ...)") in err (truncated to
 * errlen; err may be NULL). Checks that [model] path names a readable file. */
int config_load(const char *path, duet_config **out, char *err, size_t errlen);
/* The same from text in memory; filename only names it in messages (and in source). */
int config_parse(const char *text, const char *filename, duet_config **out, char *err,
                 size_t errlen);
/* Free *cfg_p and NULL it; safe on NULL and twice. */
void config_free(duet_config **cfg_p);

/* Print the effective configuration (every key, defaults filled in) as INI that
 * config_parse reads back to an equal configuration; each key is preceded by a
 * comment with its documentation. 0, or -1 on a write error. */
int config_dump(const duet_config *cfg, FILE *f);
/* Print the reference of every parameter (section, key, type, default, range,
 * reloadable, documentation) as a Markdown table. 0, or -1 on a write error. */
int config_doc(FILE *f);

/* Compare a running configuration with a newly loaded one, for a reload (SIGHUP).
 * err gets one line per changed key (up to errlen):
 *   "[daemon] log_level: info -> debug (reloadable)"
 *   "[daemon] client_endpoint: tcp://127.0.0.1:7070 -> tcp://0.0.0.0:7070 (needs a restart)"
 *   "[group g2]: added (needs a restart)"
 * Returns the number of changes that need a restart (0: new may replace old as it
 * is; err is empty when nothing changed at all), or -1 when old or new is NULL. */
int config_diff_reloadable(const duet_config *old, const duet_config *new_cfg, char *err,
                           size_t errlen);

/* Names of enum values as written in the file ("both", "nccl", "debug", "chatml",
 * "auto", "int8", ...); "?" for an out-of-range value. Static. */
const char *config_role_name(config_role r);
const char *config_transport_name(config_transport t);
const char *config_log_level_name(config_log_level l);
const char *config_chat_name(config_chat c);
const char *config_when_full_name(config_when_full w);
const char *config_kv_type_name(dtype_t t);

#endif
