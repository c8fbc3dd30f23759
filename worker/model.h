/* worker/model.h: a Llama-family model (GGUF architectures "llama" and "qwen2") and its
 * forward pass over the paged KV cache, on the CPU.
 *
 * Weights are the memory-mapped GGUF tensors themselves (no copy) wherever the shard
 * (tp_rank, tp_size) of DESIGN.md is a contiguous run of rows; a split by columns
 * (attention output and down projections when tp_size > 1) is copied once at load.
 *
 * A forward call runs a batch made of several sequences, each with any number of new
 * tokens: prefill chunks and single decode tokens mix freely. Before the call the caller
 * has reserved the new tokens' slots in the KV cache (kv_seq_append); the call writes
 * their K and V, attends causally over everything before them, and returns the logits
 * the caller asked for; afterwards the caller commits (kv_seq_commit).
 */
#ifndef DUET_WORKER_MODEL_H
#define DUET_WORKER_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/dtype.h"
#include "kernels/pool.h"
#include "kv/kv.h"
#include "worker/gguf.h"

typedef struct model model_t;

typedef enum { ROPE_NORMAL = 0, ROPE_NEOX = 2 } rope_pairing;

/* Hyper-parameters, from the GGUF metadata (whole model, not the shard). */
typedef struct {
    char arch[16];        /* "llama" or "qwen2" */
    int n_vocab;
    int n_ctx_train;      /* context length the model was trained for */
    int n_embd;
    int n_layer;
    int n_head;           /* query heads */
    int n_head_kv;        /* KV heads (GQA when fewer than n_head) */
    int head_dim;
    int n_ff;
    float rms_eps;
    float rope_base;
    float rope_freq_scale;  /* 1 / linear scaling factor */
    int rope_dims;          /* rotated dimensions per head */
    rope_pairing rope_mode;
    int tied_output;        /* output projection is token_embd */
    int qkv_bias;           /* qwen2 */
} model_hparams;

/* This worker's shard. */
typedef struct {
    int tp_rank, tp_size;
    int head0, n_head;        /* query heads [head0, head0 + n_head) */
    int kv_head0, n_head_kv;  /* KV heads [kv_head0, kv_head0 + n_head_kv) */
    int ff0, n_ff;            /* feed-forward columns */
    int vocab0, n_vocab;      /* vocabulary rows of the output projection */
} model_shard;

/* Load path as shard (tp_rank, tp_size); tp_size 1 is the whole model. On failure
 * returns -1 and writes a message naming the file and the problem into err. */
int model_load(const char *path, int tp_rank, int tp_size, model_t **out, char *err,
               size_t errlen);
void model_destroy(model_t **self_p);

const model_hparams *model_hparams_of(const model_t *m);
const model_shard *model_shard_of(const model_t *m);
/* The opened GGUF (for the tokenizer and chat template). Borrowed. */
const gguf_t *model_gguf(const model_t *m);
/* A KV cache configuration that fits this shard, of the given element type and byte budget. */
kv_config model_kv_config(const model_t *m, dtype_t kv_type, size_t budget_bytes);
/* Bytes of weights this shard reads per forward pass (for bandwidth figures). */
size_t model_weight_bytes(const model_t *m);

/* One sequence's part of a batch. */
typedef struct {
    int seq;                /* kv/ sequence id */
    int pos0;               /* position of tokens[0] (tokens before it are in the cache) */
    int n_tokens;           /* new tokens */
    const int32_t *tokens;  /* [n_tokens] */
    int logits;             /* 0: none, 1: last token's, 2: every token's */
} model_seq_batch;

/* Working memory for forward calls of up to max_tokens tokens in all. */
typedef struct model_ctx model_ctx_t;
int model_ctx_new(const model_t *m, int max_tokens, int n_threads, model_ctx_t **out);
void model_ctx_destroy(model_ctx_t **self_p);
pool_t *model_ctx_pool(model_ctx_t *ctx);

/* Tensor-parallel collectives across the tp_size ranks of a group (comm/ provides
 * them; tests may provide in-process ones). Every rank calls them in the same order. */
typedef struct {
    void *user;
    /* In place: buf[n] = the sum of every rank's buf[n]. Returns 0 or -1. */
    int (*allreduce_sum)(void *user, float *buf, size_t n);
    /* full[r][0..n_vocab) = the vocabulary rows of every rank, where part is this rank's
     * [n_rows][shard n_vocab] (model_shard vocab0/n_vocab of each rank). Returns 0 or -1. */
    int (*gather_vocab)(void *user, const float *part, int n_rows, float *full);
} model_collectives;

/* Called by model_forward on the calling thread once per layer, as soon as that layer's
 * K and V of the whole batch are stored in the KV cache (before its attention), with the
 * layer's index: a caller whose event loop shares the thread (duet-worker) keeps its
 * heartbeats going through a long step, and a prefill worker ships the layer's KV while
 * the rest of the forward pass runs. fn NULL removes it. fn must not call model_forward
 * or change the KV cache. */
typedef void (*model_progress_fn)(void *user, int layer);
void model_ctx_set_progress(model_ctx_t *ctx, model_progress_fn fn, void *user);

/* Needed before model_forward when tp_size > 1. c is copied. */
void model_ctx_set_collectives(model_ctx_t *ctx, const model_collectives *c);

/* Run one batch. logits receives, in batch order, one row of n_vocab floats per
 * requested logit row (sequences with logits 1 give one row, with 2 n_tokens rows):
 * [n_rows][n_vocab]. Returns 0, or -1 with a message in err (too many tokens for ctx,
 * positions that disagree with the cache, an unknown sequence). */
int model_forward(model_ctx_t *ctx, const model_t *m, kv_cache_t *kv, const model_seq_batch *b,
                  int n_seqs, float *logits, char *err, size_t errlen);

#endif
