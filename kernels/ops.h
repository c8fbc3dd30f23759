/* kernels/ops.h: the element-wise and row operations of a Llama forward pass (CPU).
 *
 * All functions work on one thread on the rows they are given; callers split rows or
 * heads across a pool themselves. Outputs may alias inputs where noted.
 */
#ifndef DUET_KERNELS_OPS_H
#define DUET_KERNELS_OPS_H

#include <stdint.h>

#include "kernels/dtype.h"

/* y = x / sqrt(mean(x²) + eps) * w; x, y, w: [n]. y may equal x. w NULL means all ones. */
void ops_rmsnorm(float *y, const float *x, const float *w, int64_t n, float eps);

/* y = silu(gate) * up, silu(g) = g / (1 + e^-g); all [n]. y may equal gate or up. */
void ops_swiglu(float *y, const float *gate, const float *up, int64_t n);

/* In place: x = softmax(x) over [n] (max-subtracted). */
void ops_softmax(float *x, int64_t n);

/* y = a + b over [n]; y may equal a or b. */
void ops_add(float *y, const float *a, const float *b, int64_t n);

/* y = x * s over [n]; y may equal x. */
void ops_scale(float *y, const float *x, float s, int64_t n);

/* Rotary position embedding. Pair i (i < n_dims/2) rotates by the angle
 *   pos * freq_scale * freq_base^(-2i/n_dims) / freq_factors[i]   (freq_factors optional).
 * NORMAL pairs (x[2i], x[2i+1]) as GGUF "llama" does; NEOX pairs (x[i], x[i + n_dims/2])
 * as "qwen2" does. Dimensions at and after n_dims are left as they are. The values match
 * ggml's rope modes 0 and 2. */
typedef enum { OPS_ROPE_NORMAL = 0, OPS_ROPE_NEOX = 2 } ops_rope_mode;

typedef struct {
    int n_dims;                 /* rotated dimensions per head (even, <= head_dim) */
    float freq_base;            /* theta base, e.g. 10000 or 500000 */
    float freq_scale;           /* 1 / linear scaling factor (1: none) */
    const float *freq_factors;  /* NULL, or [n_dims/2] divisors (Llama 3.x rope_freqs) */
    ops_rope_mode mode;
} ops_rope_params;

/* cs[2i] = cos, cs[2i+1] = sin of pair i's angle at position pos; cs: [n_dims]. Compute it
 * once per token and apply it to every head of every layer. */
void ops_rope_cache(float *cs, int pos, const ops_rope_params *p);
/* Rotate n_head heads x: [n_head][head_dim] in place with a cache from ops_rope_cache. */
void ops_rope_apply(float *x, int n_head, int head_dim, const float *cs, int n_dims,
                    ops_rope_mode mode);
/* Both steps for one token (computes the angles; use the cache in hot loops). */
void ops_rope(float *x, int n_head, int head_dim, int pos, const ops_rope_params *p);

/* Embedding lookup: y[t] = row ids[t] of table (type t, [n_vocab][n_embd]) as f32;
 * y: [n_tok][n_embd]. Returns 0, or -1 for an id outside [0, n_vocab) or a bad type. */
int ops_embed(float *y, dtype_t type, const void *table, int64_t n_vocab, int64_t n_embd,
              const int32_t *ids, int n_tok);

#endif
