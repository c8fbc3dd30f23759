/* kv/kv.h: duet's paged KV cache (one per worker, holding that worker's shard of KV heads).
 *
 * A pool of fixed-size blocks, each holding K and V of `block_tokens` consecutive
 * positions of one sequence, for every layer and every KV head of the shard. Sequences
 * own block tables; blocks carry reference counts, so parallel samples of one prompt
 * (fork) and requests with a common prompt prefix (prefix caching) share blocks.
 *
 * ---- Memory layout -----------------------------------------------------------------
 *
 * For each layer, one K array and one V array, each
 *     [n_blocks][n_kv_heads][block_tokens][head_dim]  elements of cfg.dtype
 * so K of one block, one layer and one KV head is one contiguous [block_tokens][head_dim]
 * tile (kv_k_block). Position p of a sequence lives in block table[p / block_tokens],
 * row p % block_tokens of that tile. Attention walks a sequence tile by tile; nothing is
 * gathered. For int8 there is, per layer, one K and one V scale array of
 * [n_blocks][n_kv_heads][block_tokens] floats, one per row (token and head):
 * value = q * scale, scale = the row's amax / 127. A row's bytes depend on that row
 * only, so the same tokens give the same KV whatever the chunking, batching or order
 * that wrote them (a per-block scale would requantize earlier rows as later ones
 * arrive, and a prompt prefilled in other chunks would then decode differently).
 *
 *   layer l, K:  block 0                      block 1                     ...
 *               +----------+----------+-----+----------+----------+-----+
 *               | head 0   | head 1   | ... | head 0   | head 1   | ... |
 *               | bt x hd  | bt x hd  |     | bt x hd  | bt x hd  |     |
 *               +----------+----------+-----+----------+----------+-----+
 *   layer l, V:  same shape                 (then layer l+1's K, V, ...)
 *
 *   sequence s, block table [7, 2, 9]:  positions 0..15 -> block 7, 16..31 -> block 2,
 *                                       32..   -> block 9 (block_tokens = 16)
 *
 * ---- Block states --------------------------------------------------------------------
 *
 *   free       on the free list, holds nothing;
 *   used       referenced by >= 1 sequence (ref = number of block tables holding it);
 *   cached     named in the prefix cache (a full block whose K/V were committed);
 *              a cached block may also be used. Cached and unreferenced blocks are
 *              "evictable": they stay on an LRU list until a block is needed and the free
 *              list is empty; then the least recently released one is evicted.
 *
 * Writes: a block is writable only when exactly one sequence holds it and it is not
 * cached. kv_seq_append copies a shared or cached partial last block (copy-on-write)
 * before new tokens land in it; kv_store and kv_unpack refuse (KV_ERR_INVAL) to write
 * into a shared or cached block, so a cached block's K/V never change after commit.
 * Callers that write tiles directly (GPU kernels) must keep the same rule:
 * only positions appended after the last commit/attach are written.
 *
 * ---- Prefix cache ---------------------------------------------------------------------
 *
 * Block i of a token sequence is named by h_i = mix(h_{i-1}, tokens of block i), with
 * h_{-1} a fixed seed, so a name covers the whole prefix. A lookup matches a cached block
 * only when its hash, its parent (the exact cached block matched for block i-1, checked
 * by block id and a generation counter that changes on eviction) and its own token ids
 * are all equal: a hash collision can never answer with the wrong K/V. When a block is
 * evicted, cached blocks chained below it become unreachable and age out through the LRU
 * list (a sequence's blocks are released last block first, so children go before their
 * parents). If an equal block is already cached when a sequence commits its own copy,
 * the sequence keeps its copy privately and the cached one stays the named one.
 *
 * Threads: a kv_cache_t is not synchronized. One thread (the scheduler) mutates it;
 * attention may read tiles from other threads while no mutating call runs.
 */
#ifndef DUET_KV_KV_H
#define DUET_KV_KV_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/dtype.h"

typedef struct kv_cache kv_cache_t; /* opaque */

typedef enum {
    KV_OK = 0,
    KV_ERR_NOMEM,   /* out of blocks (even after evicting every evictable block) */
    KV_ERR_NOSEQ,   /* unknown or freed sequence id, or no free sequence slot */
    KV_ERR_INVAL,   /* bad argument (range, count, NULL, write into a read-only block) */
    KV_ERR_BUFSIZE, /* caller's buffer too small */
    KV_ERR_SHAPE,   /* packed buffer does not match this pool/sequence/range */
    KV_ERR_ALLOC,   /* malloc failed */
} kv_status;

/* A short English description of s ("out of KV blocks", ...). Static, borrowed. */
const char *kv_strerror(kv_status s);

typedef struct {
    int n_layers;        /* layers held */
    int n_kv_heads;      /* KV heads held by this pool (this worker's shard) */
    int head_dim;        /* elements per head row */
    int kv_head0;        /* global index of this pool's first KV head (pack/unpack ranges) */
    int block_tokens;    /* tokens per block; 0 -> 16 */
    dtype_t dtype;       /* DTYPE_F32, DTYPE_F16, DTYPE_BF16 or DTYPE_I8 */
    size_t budget_bytes; /* bytes for K+V data (+ int8 scales); n_blocks = budget / kv_block_bytes */
    int max_seqs;        /* 0 -> 1024; sequence ids are in [0, max_seqs) */
} kv_config;

/* Bytes one block takes for cfg (K and V of all layers and heads, + int8 scales);
 * 0 for an invalid cfg. */
size_t kv_block_bytes(const kv_config *cfg);
/* Make a pool. KV_ERR_INVAL (bad dtype, non-positive sizes, budget below one block),
 * KV_ERR_ALLOC. On success *out owns the pool; on error *out is NULL. */
kv_status kv_new(const kv_config *cfg, kv_cache_t **out);
/* Free the pool and NULL *self_p; safe on NULL and twice. */
void kv_destroy(kv_cache_t **self_p);
/* The configuration, with defaults filled in (block_tokens, max_seqs). Borrowed. */
const kv_config *kv_config_of(const kv_cache_t *kv);
/* Blocks in the pool. */
int kv_n_blocks(const kv_cache_t *kv);

/* ---- Sequences ------------------------------------------------------------------------ */

/* A new empty sequence; *seq_out gets its id. KV_ERR_NOSEQ when all slots are taken. */
kv_status kv_seq_new(kv_cache_t *kv, int *seq_out);
/* Release the sequence's blocks and its id. A second free -> KV_ERR_NOSEQ. */
kv_status kv_seq_free(kv_cache_t *kv, int seq);
/* A new sequence sharing all of src's blocks (ref++), tokens and commit state.
 * KV_ERR_NOSEQ for an unknown src or no free slot. */
kv_status kv_seq_fork(kv_cache_t *kv, int src, int *dst_out);
/* Reserve room for n more tokens (ids recorded, for prefix hashing; tokens may be NULL
 * only when n == 0). All or nothing: KV_ERR_NOMEM leaves the sequence and the pool
 * unchanged. Copy-on-write: a shared or cached partial last block is copied first.
 * Evicts unreferenced cached blocks (LRU) only when the free list is empty. */
kv_status kv_seq_append(kv_cache_t *kv, int seq, const int32_t *tokens, int n);
/* Keep the first n_tokens positions (0 <= n_tokens <= len), releasing the blocks past
 * them (last first). Never allocates, never fails on a valid sequence. */
kv_status kv_seq_truncate(kv_cache_t *kv, int seq, int n_tokens);
/* Tokens held; -1 for an unknown sequence. */
int kv_seq_len(const kv_cache_t *kv, int seq);
/* The token ids, [kv_seq_len]; NULL for an unknown sequence. Borrowed until the next
 * mutating call on seq. */
const int32_t *kv_seq_tokens(const kv_cache_t *kv, int seq);
/* The block table: ceil(len / block_tokens) block ids (*n_blocks gets the count; may be
 * NULL). NULL (and *n_blocks = 0) for an unknown sequence. Borrowed until the next
 * mutating call on seq. */
const int32_t *kv_seq_blocks(const kv_cache_t *kv, int seq, int *n_blocks);
/* Tokens [0, n_valid) of seq now hold computed K/V (n_valid <= len): full blocks among
 * them are named by their chained hash and enter the prefix cache (those already named
 * are skipped). After this, those blocks are read-only. */
kv_status kv_seq_commit(kv_cache_t *kv, int seq, int n_valid);

/* ---- Prefix cache ------------------------------------------------------------------------ */

/* How many leading tokens of tokens[0..n) are cached (a multiple of block_tokens).
 * Pure query: changes neither the LRU order nor the statistics. */
int kv_prefix_lookup(kv_cache_t *kv, const int32_t *tokens, int n);
/* Same, and attach those blocks (ref++) to seq, which must be empty (else KV_ERR_INVAL);
 * *n_cached gets the count, and seq's length becomes it. Counts prefix hit tokens
 * (*n_cached) and miss tokens (n - *n_cached) in the statistics. (The engine passes
 * n_prompt - 1 so the last prompt token is always computed.) */
kv_status kv_prefix_attach(kv_cache_t *kv, int seq, const int32_t *tokens, int n, int *n_cached);

/* ---- Data ---------------------------------------------------------------------------- */

/* Where attention reads: K (or V) of one block, one layer, one local KV head (0-based in
 * this pool): [block_tokens][head_dim] elements of cfg.dtype, contiguous. NULL when an
 * index is out of range. */
void *kv_k_block(kv_cache_t *kv, int layer, int block, int head);
void *kv_v_block(kv_cache_t *kv, int layer, int block, int head);
/* Base of one layer's K (or V) array: [n_blocks][n_kv_heads][block_tokens][head_dim]
 * elements (what kernels/attn.h's attn_kv_view.k/.v take). NULL for a bad layer. */
void *kv_k_layer(kv_cache_t *kv, int layer);
void *kv_v_layer(kv_cache_t *kv, int layer);
/* int8 only: the scales of one block and layer: [n_kv_heads][block_tokens] floats, one
 * per row (value = q * scale); block 0 gives the layer's whole
 * [n_blocks][n_kv_heads][block_tokens] array. NULL for other dtypes or a bad index. */
float *kv_k_scales(kv_cache_t *kv, int layer, int block);
float *kv_v_scales(kv_cache_t *kv, int layer, int block);
/* Write K and V of position pos (< kv_seq_len) of seq for one layer from f32:
 * k, v: [n_kv_heads][head_dim]. Rounds to nearest for f16/bf16. int8: each row (token and
 * head) gets its own scale, amax/127 of that row, and rounds to nearest; no other row
 * changes. KV_ERR_INVAL when the block
 * holding pos is shared or cached (read-only). */
kv_status kv_store(kv_cache_t *kv, int seq, int layer, int pos, const float *k, const float *v);
/* Read back K and V of one position as f32: k, v: [n_kv_heads][head_dim]. */
kv_status kv_load(const kv_cache_t *kv, int seq, int layer, int pos, float *k, float *v);

/* ---- Admission ------------------------------------------------------------------------- */

/* Blocks on the free list. */
int kv_free_blocks(const kv_cache_t *kv);
/* Blocks that eviction could free: cached and unreferenced. */
int kv_evictable_blocks(const kv_cache_t *kv);
/* Blocks that appending n_tokens to seq (-1: a new sequence) would take, copy-on-write
 * included; -1 for an unknown sequence or n_tokens < 0. */
int kv_blocks_needed(const kv_cache_t *kv, int seq, int n_tokens);
/* 1 when appending n_tokens to seq (-1: a new sequence) would succeed now (counting
 * evictable blocks; for -1 also a free sequence slot), else 0. */
int kv_can_append(const kv_cache_t *kv, int seq, int n_tokens);

/* ---- Pack / unpack --------------------------------------------------------------------
 *
 * The unit of KV transfer and of TP re-sharding: K and V of one sequence for layers
 * [layer0, layer0 + n_layers), GLOBAL KV heads [head0, head0 + n_heads) (inside this
 * pool's shard [kv_head0, kv_head0 + n_kv_heads)) and positions [tok0, tok0 + n_tok).
 *
 * Buffer layout (host byte order, no padding between parts):
 *   kv_pack_header                                         (64 bytes)
 *   for each layer l in [layer0, layer0 + n_layers):
 *     K: for each head h in [head0, head0 + n_heads): [n_tok][head_dim] elements of dtype
 *     V: same
 *     int8 only:
 *     K scales: for each head h: [n_tok] f32 (one per row)
 *     V scales: same
 * Rows are dense (no block padding), so KV of every dtype moves between pools with
 * different block_tokens, and any range of positions can be packed. Parts are 4-byte
 * aligned when head_dim % 4 == 0. One layer's part is contiguous, so a transfer can
 * stream layer by layer (n_layers = 1 per call).
 * Speed: one memcpy per block, head and K/V (block_tokens * head_dim elements); copies of
 * 1 MiB or more use streaming stores (they bypass the caches) when the destination is
 * 16-byte aligned, so a 16-byte aligned buffer is best.
 */
#define KV_PACK_MAGIC 0x31564b44u /* "DKV1" */
typedef struct {
    uint32_t magic;        /* KV_PACK_MAGIC */
    uint32_t dtype;        /* dtype_t of the elements */
    int32_t head_dim;      /* elements per row */
    int32_t block_tokens;  /* the source pool's (informative) */
    int32_t layer0, n_layers;
    int32_t head0, n_heads; /* global KV heads */
    int32_t tok0, n_tok;   /* positions */
    uint32_t reserved[6];  /* 0 */
} kv_pack_header;

/* Bytes kv_pack would write for all kv_seq_len tokens; 0 for an unknown sequence or a
 * bad range. */
size_t kv_pack_size(const kv_cache_t *kv, int seq, int layer0, int n_layers, int head0, int n_heads);
/* Pack all kv_seq_len tokens into buf[cap]; *written (may be NULL) gets the bytes used.
 * KV_ERR_NOSEQ, KV_ERR_INVAL (range), KV_ERR_BUFSIZE (cap < kv_pack_size; nothing written). */
kv_status kv_pack(const kv_cache_t *kv, int seq, int layer0, int n_layers, int head0, int n_heads,
                  void *buf, size_t cap, size_t *written);
/* Unpack a kv_pack buffer into seq, which must already hold the same number of tokens
 * (appended) and writable blocks over them. KV_ERR_SHAPE when the buffer's header
 * (magic, dtype, head_dim, ranges, token count, int8 block_tokens) or len does not match;
 * KV_ERR_INVAL for a bad range or read-only destination blocks. Nothing is written on
 * error. */
kv_status kv_unpack(kv_cache_t *kv, int seq, int layer0, int n_layers, int head0, int n_heads,
                    const void *buf, size_t len);
/* The same for positions [tok0, tok0 + n_tok) only (e.g. a prompt's chunk, or the
 * uncached suffix after a prefix attach). */
size_t kv_pack_range_size(const kv_cache_t *kv, int layer0, int n_layers, int head0, int n_heads,
                          int n_tok);
kv_status kv_pack_range(const kv_cache_t *kv, int seq, int layer0, int n_layers, int head0,
                        int n_heads, int tok0, int n_tok, void *buf, size_t cap, size_t *written);
kv_status kv_unpack_range(kv_cache_t *kv, int seq, int layer0, int n_layers, int head0,
                          int n_heads, int tok0, int n_tok, const void *buf, size_t len);

/* ---- Statistics and checks ------------------------------------------------------------ */

typedef struct {
    int blocks_total;            /* kv_n_blocks */
    int blocks_used;             /* referenced by >= 1 sequence */
    int blocks_cached;           /* named in the prefix cache (used or not) */
    uint64_t prefix_hit_tokens;  /* kv_prefix_attach: tokens found cached */
    uint64_t prefix_miss_tokens; /* kv_prefix_attach: tokens not found */
    uint64_t evictions;          /* cached blocks evicted to make room */
    int blocks_free;             /* on the free list */
    int blocks_evictable;        /* cached and unreferenced */
    int seqs;                    /* live sequences */
} kv_stats;
void kv_get_stats(const kv_cache_t *kv, kv_stats *out);

/* Introspection (tests, debugging): a block's reference count and whether it is named
 * in the prefix cache; -1 for a bad block id. */
int kv_block_ref(const kv_cache_t *kv, int block);
int kv_block_cached(const kv_cache_t *kv, int block);
/* Walk every internal structure (free list, LRU list, hash table, block tables,
 * reference counts) and check they agree. KV_OK, or KV_ERR_INVAL with a description in
 * msg[cap] (may be NULL). O(n_blocks + tokens held). */
kv_status kv_check(const kv_cache_t *kv, char *msg, size_t cap);
/* Testing: AND every block hash with mask (e.g. 0 or 3) so that hash collisions become
 * common; lookups must stay exact. Call on an empty cache (nothing committed yet). */
void kv_debug_hash_mask(kv_cache_t *kv, uint64_t mask);

#endif
