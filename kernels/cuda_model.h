/* kernels/cuda_model.h: a Llama-family model on one GPU, with worker/model.h's forward pass.
 *
 * cuda_model_new takes a loaded CPU model (worker/model.h: its hyper-parameters, its TP
 * shard and its GGUF mapping), plans device memory from one budget (kernels/cuda_plan.h:
 * one arena each for the weights, the KV pool and the workspace; a budget too small is
 * a clear error here, at start-up, never later), uploads the shard's weights (dequantized
 * to bf16, or to f32 in the EXACT precision), and creates its stream and cuBLAS handle.
 *
 * The forward pass has model_forward's contract: a batch of sequences, each with any
 * number of new tokens (prefill chunks and decode tokens mix), whose KV slots the caller
 * reserved in a kv/ cache beforehand (kv_seq_append) and commits afterwards. The kv/
 * cache keeps the books (block tables, lengths, prefix cache); the K/V themselves live in
 * the device pool, in the same block numbering, so a host kv/ cache made with
 * cuda_model_kv_config (exactly as many blocks as the device pool) drives it unchanged.
 * Prefix-cache hits are positions already in the pool: the forward starts at pos0.
 * Rule (kv/kv.h's): kv_seq_append's copy-on-write of a shared partial block copies host
 * memory only; the engine copies the device block itself when told through
 * cuda_model_kv_copy_block (see the worker hook in the notes).
 *
 * Decode steps (every sequence one token, logits for each) are captured once per batch
 * size as a CUDA graph and replayed (unless config.no_graphs): the per-step inputs go up
 * in one copy into fixed buffers, so the replay sees new tokens, positions and block
 * tables, and the attention split count depends on the batch size only.
 *
 * Threads: one thread uses a cuda_model_t at a time (it owns a stream).
 */
#ifndef DUET_KERNELS_CUDA_MODEL_H
#define DUET_KERNELS_CUDA_MODEL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda.h"
#include "kernels/cuda_plan.h"

#ifdef __cplusplus
extern "C" {
#endif

#include "kernels/sample.h"
#include "kv/kv.h"
#include "worker/model.h"

typedef struct cuda_model cuda_model_t;

/* Load shard m onto device cfg->device. m is borrowed and must outlive the GPU model
 * (its GGUF mapping is read during this call only, its hyper-parameters later too).
 * On failure returns -1, *out NULL and a message in err: no device ("no CUDA device:
 * cudaGetDeviceCount: ..."), a budget too small (every figure named), a tensor of a type
 * the GPU does not take, or any CUDA/cuBLAS error with its call, file, line and device. */
int cuda_model_new(const model_t *m, const cuda_model_config *cfg, cuda_model_t **out,
                   char *err, size_t errlen);
/* Free everything (device memory, graphs, stream, handle); NULL *self_p; safe twice. */
void cuda_model_destroy(cuda_model_t **self_p);

/* The device and the memory plan in use (borrowed). */
const cuda_device_info *cuda_model_device(const cuda_model_t *cm);
const cuda_plan *cuda_model_plan(const cuda_model_t *cm);
/* The host kv/ configuration to pass to kv_new (cuda_plan_kv_config of the plan). */
kv_config cuda_model_kv_config(const cuda_model_t *cm);

/* Tensor-parallel collectives on device buffers, ordered on the model's stream (passed
 * as cuda_stream); comm/'s NCCL backend provides them. Needed when tp_size > 1. */
typedef struct {
    void *user;
    /* In place over the group: dbuf[n] = the sum of every rank's dbuf[n]. 0 or -1. */
    int (*allreduce_sum)(void *user, float *dbuf, size_t n, cuda_stream s);
    /* dfull[r][0..n_vocab) = every rank's rows, where dpart is this rank's
     * [n_rows][shard n_vocab] (model_shard vocab0/n_vocab of each rank). 0 or -1. */
    int (*gather_vocab)(void *user, const float *dpart, int n_rows, float *dfull, cuda_stream s);
} cuda_collectives;
void cuda_model_set_collectives(cuda_model_t *cm, const cuda_collectives *c);
/* The model's stream (a cudaStream_t), for collectives and transfers. */
cuda_stream cuda_model_stream(const cuda_model_t *cm);

/* Called during cuda_model_forward on the calling thread once per layer, as model_forward's
 * progress hook (worker/model.h), when that layer's K/V store is enqueued: event (a
 * cudaEvent_t, borrowed) is recorded on the model's stream right after it, so a transfer
 * stream that waits on it (cudaStreamWaitEvent) ships the layer's KV while the rest of
 * the step runs. Decode steps replayed from a CUDA graph do not call it (nothing is
 * shipped from them). fn NULL removes it; fn must not call into the model. */
typedef void (*cuda_layer_fn)(void *user, int layer, void *event);
void cuda_model_set_progress(cuda_model_t *cm, cuda_layer_fn fn, void *user);

/* Run one batch, as model_forward (worker/model.h): logits, when not NULL, receives one
 * row of n_vocab floats per requested logit row, in batch order ([n_rows][n_vocab], host
 * memory); with NULL the rows stay on the device for cuda_model_sample (then n_rows must
 * be at most config.max_logit_rows). Returns 0, or -1 with a message (too many tokens or
 * sequences for the plan, a block id beyond the device pool, positions that disagree
 * with the cache, a token outside the vocabulary, a CUDA error). */
int cuda_model_forward(cuda_model_t *cm, kv_cache_t *kv, const model_seq_batch *b, int n_seqs,
                       float *logits, char *err, size_t errlen);

/* One row of the last forward's logits to sample. */
typedef struct {
    int row;                /* logit row of the last forward (batch order) */
    sampler_t *s;           /* the sequence's sampler: its parameters and generator (advanced) */
    const int32_t *history; /* the sequence's tokens so far (prompt and generated) */
    int n_history;
} cuda_sample_req;
/* Choose tokens[i] for every request from the last forward (called with logits NULL),
 * with the sampler's parameters: on the device where cuda_sample_k allows it (greedy,
 * top-k up to CUDA_SAMPLE_K_MAX, at most CUDA_PEN_MAX distinct penalized tokens), else
 * by copying that row to the host and calling sampler_sample. Greedy tokens equal the
 * CPU sampler's on the same logits. Returns 0, or -1 with a message. */
int cuda_model_sample(cuda_model_t *cm, const cuda_sample_req *reqs, int n, int32_t *tokens,
                      char *err, size_t errlen);

/* Layer l of the device KV pool (pointers into the KV arena, kv/kv.h's layout): what
 * cuda_op_kv_pack/unpack (transfers) and cuda_op_attention take. NULL for a bad index. */
const cuda_kv_layer *cuda_model_kv_layer(const cuda_model_t *cm, int layer);

/* Copy device KV block src to block dst (all layers): the device side of kv/'s
 * copy-on-write. 0, or -1 with a message. */
int cuda_model_kv_copy_block(cuda_model_t *cm, int src, int dst, char *err, size_t errlen);
/* Fill the whole KV pool with random values in [-amp, amp) (benchmarks time decode over
 * long contexts without computing them). 0, or -1. */
int cuda_model_kv_fill_random(cuda_model_t *cm, float amp, uint64_t seed, char *err,
                              size_t errlen);
/* Read K and V of one position of one layer back as f32 (tests): k, v: [n_kv_head][head_dim]
 * of this shard, from device block `block`, row `slot`. 0, or -1. */
int cuda_model_kv_read(cuda_model_t *cm, int layer, int block, int slot, float *k, float *v,
                       char *err, size_t errlen);

/* Counters (tests, logs). */
typedef struct {
    uint64_t forwards;        /* cuda_model_forward calls that ran */
    uint64_t graph_captures;  /* decode graphs captured */
    uint64_t graph_replays;   /* forwards run as a graph replay */
    uint64_t rows_sampled_gpu, rows_sampled_host;
} cuda_model_stats;
void cuda_model_get_stats(const cuda_model_t *cm, cuda_model_stats *out);

#ifdef __cplusplus
}
#endif

#endif
