/* worker/sched.h: the worker's step scheduler (continuous batching over the paged KV).
 *
 * The scheduler owns the requests a worker serves and turns them into forward passes.
 * Each sched_step() runs ONE model_forward over a batch built from
 *   1. every running sequence's next decode token (oldest first), then
 *   2. prefill chunks of partially prefilled sequences (oldest first), then
 *   3. prefill chunks of newly admitted sequences (waiting queue, first come first served),
 * within a budget of max_batch_tokens tokens, so a long prompt is prefilled in chunks
 * next to the running decodes and never stalls their tokens. Sequences join and leave
 * at every step. After the forward it commits the computed tokens to the KV (so full
 * blocks enter the prefix cache), samples the next token of every sequence whose
 * pending tokens are all computed, and queues events.
 *
 * Fidelity: a request's tokens are those of client/generate.c's single-sequence loop for
 * the same prompt and parameters (same model_forward, sampler history = prompt + tokens
 * generated so far, one PRNG per request), as long as model_forward gives every token
 * row the same logits bit for bit whatever the batch around it and however the prompt
 * is chunked. That holds for every weight type and kernel (the AVX2 kernels' 4-token
 * tiles do a single token's float operations in the same order: tests/test_kernels)
 * and for every KV type (int8 KV has one scale per row, so a row's bytes never depend
 * on rows written after it: tests/test_model's test_kv_independent_of_chunking). So a
 * request recomputed from its prompt and generated tokens (after a preemption, or a
 * retry on another worker) continues with the same tokens.
 *
 * Prefix caching: on admission the longest cached prefix of the prompt (all but its
 * last token) is attached instead of computed; the cached prompt tokens are reported
 * in the request's usage.
 *
 * KV admission and preemption: a waiting sequence is admitted only when the KV can hold
 * its next chunk. When a running sequence's decode token cannot get a block, the NEWEST
 * running sequences are preempted: their blocks are released (full blocks stay in the
 * prefix cache) and they go back to the head of the waiting queue, to recompute their
 * prompt and generated tokens later. Their sampler state (PRNG) is kept, so a preempted
 * request produces exactly the tokens it would have. The oldest running sequence always
 * progresses, and sched_add refuses a request that could not fit the whole pool alone,
 * so every request finishes. The scheduler assumes that it is the KV cache's only user
 * (blocks held by others shrink what it can count on).
 *
 * Events: a request produces TOKEN events (the token that ends it included: a stop or
 * end-of-generation token is both a TOKEN and the reason of the FINISHED that follows)
 * and ends with exactly one FINISHED or FAILED event.
 *
 * Threads: not synchronized; one thread calls every function (the kv cache is mutated
 * from that thread only; model_forward's pool threads read it during a step).
 */
#ifndef DUET_WORKER_SCHED_H
#define DUET_WORKER_SCHED_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/sample.h"
#include "kv/kv.h"
#include "worker/model.h"

typedef struct sched sched_t; /* opaque */

typedef enum {
    SCHED_OK = 0,
    SCHED_ERR_INVAL,    /* bad argument or bad request (empty prompt, token id, parameters) */
    SCHED_ERR_TOO_LONG, /* prompt + max_tokens beyond the context limit or the KV pool */
    SCHED_ERR_DUP,      /* a live request already has this id */
    SCHED_ERR_NOTFOUND, /* no live request has this id */
    SCHED_ERR_NOMEM,    /* out of memory */
    SCHED_ERR_MODEL,    /* model/KV mismatch, or the model context could not be made */
} sched_status;

/* Configuration; zero fields take the defaults in brackets. */
typedef struct {
    int max_batch_tokens;  /* tokens per forward pass, decodes and prefill chunks [256] */
    int max_running;       /* sequences holding KV at once; at most max_batch_tokens [64] */
    int n_ctx;             /* per-request limit on prompt + max_tokens [min(4096, trained)] */
    int n_threads;         /* threads of the forward pass [1] */
    const int32_t *eog_ids; /* [n_eog] the model's end-of-generation token ids (copied) */
    int n_eog;
} sched_config;

/* One request. Everything is copied by sched_add. */
typedef struct {
    uint64_t id;             /* caller's id, unique among live requests */
    const int32_t *prompt;   /* [n_prompt] token ids */
    int n_prompt;            /* >= 1 */
    sample_params sp;        /* sampling parameters (sample_params_check must accept them) */
    int max_tokens;          /* tokens to generate at most, >= 1 */
    const int32_t *stop_ids; /* [n_stop_ids] tokens that end the generation (may be NULL) */
    int n_stop_ids;
    int ignore_eog;          /* 0: also stop at the configured eog_ids; 1: do not */
    const sample_rng *rng;   /* the PRNG state to continue from (a request sampled across
                                workers), or NULL: seeded from sp.seed */
    int ship_kv;             /* 1: report this request to the layer hook (sched_set_layer_hook)
                                in the step that computes its last pending token, so its KV
                                can be shipped layer by layer (a prefill worker) */
    int has_kv;              /* 1: the KV of prompt[0, n_kv) is already in the KV sequence
                                kv_seq (a decode worker that received it): the scheduler takes
                                the sequence over (on SCHED_OK only) and computes the rest */
    int kv_seq;              /* has_kv: the sequence (kv_seq_len == n_kv, same tokens) */
    int n_kv;                /* has_kv: tokens with K/V, 1 <= n_kv < n_prompt */
} sched_req;

typedef enum {
    SCHED_EV_TOKEN = 0, /* a generated token */
    SCHED_EV_FINISHED,  /* the request ended normally (see reason) */
    SCHED_EV_FAILED,    /* the request ended with an error (see msg) */
} sched_event_type;

typedef enum {
    SCHED_FINISH_STOP = 0,  /* a stop token id (the last TOKEN event) */
    SCHED_FINISH_EOS,       /* an end-of-generation token (the last TOKEN event) */
    SCHED_FINISH_LENGTH,    /* max_tokens generated */
    SCHED_FINISH_CANCELLED, /* sched_cancel */
} sched_finish;

/* Name of a finish reason: "stop", "eos", "length", "cancelled". Static. */
const char *sched_finish_name(sched_finish f);

/* Usage of one request. */
typedef struct {
    int n_prompt;    /* prompt tokens */
    int n_cached;    /* prompt tokens found in the prefix cache at first admission */
    int n_generated; /* tokens generated (the stop/eos token included) */
} sched_usage;

typedef struct {
    uint64_t id;             /* the request */
    sched_event_type type;
    int32_t token;           /* TOKEN: the token id */
    int index;               /* TOKEN: 0-based index among the generated tokens */
    int first;               /* TOKEN: 1 for the first generated token (TTFT) */
    sample_rng rng;          /* TOKEN: the request's PRNG state after drawing this token */
    sched_finish reason;     /* FINISHED: why */
    sched_usage usage;       /* FINISHED, FAILED: counts at the end */
    char msg[192];           /* FAILED: what went wrong, naming the request */
} sched_event;

typedef struct {
    int running;                 /* requests holding KV (decoding or being prefilled) */
    int waiting;                 /* requests queued without KV (new or preempted) */
    int events_pending;          /* events queued for the next sched_step */
    uint64_t steps;              /* forward passes run */
    uint64_t preemptions;        /* sequences preempted (each time counts) */
    uint64_t tokens_prefilled;   /* tokens run as prefill chunks (recomputation included) */
    uint64_t tokens_recomputed;  /* tokens computed again after a preemption */
    uint64_t tokens_decoded;     /* tokens generated */
    uint64_t tokens_cached;      /* prompt tokens attached from the prefix cache (first admissions) */
    uint64_t requests_finished;  /* FINISHED events (cancelled included) */
    uint64_t requests_failed;    /* FAILED events */
    kv_stats kv;                 /* the KV cache's own statistics */
} sched_stats;

/* A scheduler over model m and cache kv (both borrowed; they must outlive it; kv must
 * fit the model, i.e. come from model_kv_config). Makes its own model context of
 * max_batch_tokens tokens and n_threads threads. On error returns a status, writes a
 * message into err[errlen] (may be NULL) and sets *out to NULL. */
sched_status sched_new(const model_t *m, kv_cache_t *kv, const sched_config *cfg, sched_t **out,
                       char *err, size_t errlen);
/* Frees every request (releasing its KV sequence) and the scheduler; NULLs *self_p;
 * safe on NULL and twice. No events are produced. */
void sched_destroy(sched_t **self_p);

/* The configuration in use, defaults filled in (eog_ids points to the scheduler's copy).
 * Borrowed. */
const sched_config *sched_config_of(const sched_t *s);
/* The model context the steps run on (borrowed), e.g. for model_ctx_set_collectives. */
model_ctx_t *sched_model_ctx(sched_t *s);

/* A request whose last pending token is computed in the current step (ship_kv set). */
typedef struct {
    uint64_t id;   /* the request */
    int seq;       /* its KV sequence (read-only for the hook) */
    int n_tokens;  /* positions [0, n_tokens) have K/V once the step is done */
} sched_ship;

/* Called once per layer of every forward pass, on the stepping thread, as soon as the
 * layer's K/V are stored (model_progress_fn), with the requests of the step that have
 * ship_kv set and complete their prompt in it: for them, positions [0, n_tokens) of that
 * layer are final. n may be 0 (the hook then only keeps an event loop alive). The hook
 * must not call the scheduler or change the KV cache. fn NULL removes it. */
typedef void (*sched_layer_fn)(void *user, int layer, const sched_ship *ships, int n);
void sched_set_layer_hook(sched_t *s, sched_layer_fn fn, void *user);

/* Queue a request (copied). SCHED_ERR_INVAL for a NULL or empty prompt, a token or stop
 * id outside the vocabulary, max_tokens < 1, bad sampling parameters;
 * SCHED_ERR_TOO_LONG when prompt + max_tokens exceed n_ctx or could never fit the KV
 * pool; SCHED_ERR_DUP for an id in use; SCHED_ERR_NOMEM. The message in err[errlen]
 * names the request id and the problem.
 * With has_kv, the request runs at once when a running slot is free (its KV is there);
 * otherwise its sequence is released (the caller committed its full blocks to the prefix
 * cache, so little is recomputed) and it waits like any other. */
sched_status sched_add(sched_t *s, const sched_req *r, char *err, size_t errlen);

/* Cancel a live request: its KV blocks are released at once and a FINISHED event with
 * reason SCHED_FINISH_CANCELLED is delivered by the next sched_step. SCHED_ERR_NOTFOUND
 * when no live request has this id (also when it has just ended and its last event is
 * still queued); SCHED_ERR_NOMEM. */
sched_status sched_cancel(sched_t *s, uint64_t id);

/* Most events one step can produce: pass cap >= this (plus one per sched_cancel since
 * the previous call) to get every step's events from that step's call. */
int sched_events_max(const sched_t *s);

/* Deliver queued events into events[cap], then, when none remain queued, run one step
 * (one forward pass, when there is anything to run) and deliver its events.
 * *n_events gets the count delivered. When more events are queued than fit, the call
 * only delivers (runs no forward); call again. Returns SCHED_OK (a request's failure
 * is a FAILED event, not an error) or SCHED_ERR_INVAL (NULL arguments, cap < 0) or
 * SCHED_ERR_NOMEM (nothing ran). */
sched_status sched_step(sched_t *s, sched_event *events, int cap, int *n_events);

/* 1 when a step could have work: running or waiting requests, or queued events. */
int sched_busy(const sched_t *s);

void sched_get_stats(const sched_t *s, sched_stats *out);

#endif
