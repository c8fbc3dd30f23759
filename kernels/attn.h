/* kernels/attn.h: causal attention over a paged KV cache (CPU).
 *
 * The KV of one layer is read through a view of kv/'s layout: for each layer one K and
 * one V array of [n_blocks][n_kv_heads][block_tokens][head_dim] elements, so the keys of
 * one block and one KV head are contiguous. A sequence's position p lives in block
 * block_table[p / block_tokens], slot p % block_tokens. Nothing is gathered: each query
 * row walks its sequence's blocks twice: first every score (q·k, scaled), then an exact
 * softmax over them, then the values weighted by it. The orders of these sums follow
 * llama.cpp's, so that duet's logits match its bits (tests/test_golden.c); each row is
 * computed the same way whatever else is in the batch (batch invariance).
 *
 * Grouped-query attention: query head h reads KV head h / (n_head / n_kv_head); the
 * query heads of one group are processed together so each key and value row is read
 * (and converted from f16/bf16/int8) once per group.
 */
#ifndef DUET_KERNELS_ATTN_H
#define DUET_KERNELS_ATTN_H

#include <stdint.h>
#include "kernels/dtype.h"
#include "kernels/pool.h"

/* One layer's paged K/V as attention sees it. */
typedef struct {
    dtype_t dtype;          /* DTYPE_F32, DTYPE_F16, DTYPE_BF16 or DTYPE_I8 */
    int n_kv_head;          /* KV heads in the pool (this shard's) */
    int head_dim;
    int block_tokens;
    const void *k;          /* [n_blocks][n_kv_head][block_tokens][head_dim] of dtype */
    const void *v;          /* same shape */
    const float *k_scale;   /* int8 only: [n_blocks][n_kv_head][block_tokens], one per row */
    const float *v_scale;   /* int8 only: same */
} attn_kv_view;

/* One query row: a token of some sequence. */
typedef struct {
    const int32_t *blocks;  /* that sequence's block table */
    int pos;                /* the token's position: it attends to keys [0, pos] */
} attn_query;

/* out[t][h][:] = softmax(q[t][h]·K[0..pos_t] * scale) · V[0..pos_t] for every query row t
 * and query head h; q, out: [n_q][n_head][head_dim]. Work is split across the pool's
 * threads by (row, KV group). pool may be NULL (runs on the caller's thread).
 * Returns 0, or -1 for an unsupported dtype, head counts that do not divide, or when a
 * thread's score buffer (one row of scores per query head of a group) cannot be allocated. */
int attn_paged(pool_t *pool, const attn_kv_view *kv, const attn_query *rows, int n_q,
               int n_head, const float *q, float scale, float *out);

#endif
