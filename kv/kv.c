/* kv/kv.c: the paged KV cache: block pool, block tables, prefix cache, pack/unpack. */
#include "kv/kv.h"

#include <math.h>
#include <stdarg.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define KV_DEFAULT_BLOCK_TOKENS 16
#define KV_DEFAULT_MAX_SEQS 1024
#define KV_HASH_SEED 0x6a09e667f3bcc908ull /* h_{-1}: the hash "before" block 0 */
#define KV_NONE (-1)

/* Per-block metadata. */
typedef struct {
    int32_t ref;        /* block tables holding this block */
    int32_t prev, next; /* LRU links (cached && ref == 0), else KV_NONE */
    int32_t parent;     /* cached: the cached block matched before it, KV_NONE for block 0 */
    uint32_t parent_gen;/* cached: parent's gen when this block was named */
    uint32_t gen;       /* changes each time the block leaves the prefix cache */
    int32_t cached;     /* 1: named in the hash table */
    uint64_t hash;      /* cached: the chained hash */
} kv_block;

/* One sequence. chain_* describe blocks [0, n_chain): the hash and the cached block
 * (id and gen) that names each, i.e. the parent identity for the next block. */
typedef struct {
    int active;
    int len;                /* tokens held */
    int cap_tok, cap_blk;   /* capacities of the arrays below */
    int32_t *tokens;        /* [cap_tok] */
    int32_t *blocks;        /* [cap_blk], ceil(len / bt) used */
    int n_chain;
    uint64_t *chain_hash;   /* [cap_blk] */
    int32_t *chain_blk;     /* [cap_blk] */
    uint32_t *chain_gen;    /* [cap_blk] */
} kv_seq;

struct kv_cache {
    kv_config cfg;
    int n_blocks, bt, nh, hd;
    size_t esz;             /* bytes per element */
    size_t tile_elems;      /* bt * hd */
    size_t layer_bytes;     /* bytes of one layer's K (or V) array */
    unsigned char *data;    /* [n_layers][2][n_blocks][nh][bt][hd], mmap'ed */
    size_t data_bytes;
    float *scales;          /* int8: [n_layers][2][n_blocks][nh][bt], one per row */
    kv_block *blk;          /* [n_blocks] */
    int32_t *btok;          /* [n_blocks][bt]: token ids of cached blocks */
    int32_t *free_ids;      /* stack, n_free used */
    int n_free;
    int lru_head, lru_tail, n_lru; /* head = least recently released */
    int n_cached, n_used;
    int32_t *ht;            /* open addressing, linear probing: block ids or KV_NONE */
    uint32_t ht_mask;
    kv_seq *seqs;           /* [max_seqs] */
    int32_t *seq_free;      /* FIFO ring of free ids */
    int seq_free_head, seq_n_free;
    uint64_t prefix_hit, prefix_miss, evictions;
    uint64_t hash_mask;     /* all ones, or narrower for collision tests */
};

const char *kv_strerror(kv_status s)
{
    switch (s) {
    case KV_OK: return "ok";
    case KV_ERR_NOMEM: return "out of KV blocks";
    case KV_ERR_NOSEQ: return "unknown or freed KV sequence (or no free sequence slot)";
    case KV_ERR_INVAL: return "invalid argument to the KV cache";
    case KV_ERR_BUFSIZE: return "buffer too small for the packed KV";
    case KV_ERR_SHAPE: return "packed KV does not match the destination's layout or range";
    case KV_ERR_ALLOC: return "out of memory (malloc failed) in the KV cache";
    }
    return "unknown KV status";
}

static size_t elem_size(dtype_t t)
{
    switch (t) {
    case DTYPE_F32: return 4;
    case DTYPE_F16: case DTYPE_BF16: return 2;
    case DTYPE_I8: return 1;
    default: return 0;
    }
}

size_t kv_block_bytes(const kv_config *cfg)
{
    if (!cfg) return 0;
    size_t es = elem_size(cfg->dtype);
    int bt = cfg->block_tokens ? cfg->block_tokens : KV_DEFAULT_BLOCK_TOKENS;
    if (!es || cfg->n_layers <= 0 || cfg->n_kv_heads <= 0 || cfg->head_dim <= 0 || bt <= 0)
        return 0;
    size_t per = (size_t)cfg->n_layers * 2 * cfg->n_kv_heads;
    size_t b = per * (size_t)bt * (size_t)cfg->head_dim * es;
    if (cfg->dtype == DTYPE_I8) b += per * (size_t)bt * sizeof(float);
    return b;
}

/* ---- construction ---------------------------------------------------------------------- */

kv_status kv_new(const kv_config *cfg, kv_cache_t **out)
{
    if (!out) return KV_ERR_INVAL;
    *out = NULL;
    size_t bb = kv_block_bytes(cfg);
    if (!bb || cfg->kv_head0 < 0 || cfg->max_seqs < 0 || cfg->block_tokens < 0 ||
        cfg->budget_bytes < bb)
        return KV_ERR_INVAL;
    size_t nb = cfg->budget_bytes / bb;
    if (nb > (size_t)INT32_MAX / 4) nb = (size_t)INT32_MAX / 4;
    kv_cache_t *kv = calloc(1, sizeof *kv);
    if (!kv) return KV_ERR_ALLOC;
    kv->cfg = *cfg;
    if (!kv->cfg.block_tokens) kv->cfg.block_tokens = KV_DEFAULT_BLOCK_TOKENS;
    if (!kv->cfg.max_seqs) kv->cfg.max_seqs = KV_DEFAULT_MAX_SEQS;
    kv->n_blocks = (int)nb;
    kv->bt = kv->cfg.block_tokens;
    kv->nh = cfg->n_kv_heads;
    kv->hd = cfg->head_dim;
    kv->esz = elem_size(cfg->dtype);
    kv->tile_elems = (size_t)kv->bt * kv->hd;
    kv->layer_bytes = nb * (size_t)kv->nh * kv->tile_elems * kv->esz;
    uint32_t cap = 16;
    while (cap < 2 * nb) cap <<= 1;
    kv->ht_mask = cap - 1;
    const int ms = kv->cfg.max_seqs;
    /* Huge pages (where the kernel allows them) spare attention and pack/unpack most TLB
     * misses. The pool is faulted in now: the budget is a reservation, and first-touch
     * faults (the kernel zeroing 2 MiB pages) would otherwise land in the first steps'
     * latency, spread over every layer's array. */
    kv->data_bytes = (size_t)cfg->n_layers * 2 * kv->layer_bytes;
    void *d = mmap(NULL, kv->data_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (d != MAP_FAILED) {
        kv->data = d;
#ifdef MADV_HUGEPAGE
        madvise(d, kv->data_bytes, MADV_HUGEPAGE); /* advice only: failure is harmless */
#endif
#ifdef MADV_POPULATE_WRITE
        if (madvise(d, kv->data_bytes, MADV_POPULATE_WRITE) != 0)
#endif
            for (size_t off = 0; off < kv->data_bytes; off += 4096) ((volatile unsigned char *)d)[off] = 0;
    }
    if (cfg->dtype == DTYPE_I8)
        kv->scales = calloc((size_t)cfg->n_layers * 2 * nb * kv->nh * kv->bt, sizeof(float));
    kv->blk = calloc(nb, sizeof *kv->blk);
    kv->btok = calloc(nb * kv->bt, sizeof *kv->btok);
    kv->free_ids = calloc(nb, sizeof *kv->free_ids);
    kv->ht = malloc((size_t)cap * sizeof *kv->ht);
    kv->seqs = calloc((size_t)ms, sizeof *kv->seqs);
    kv->seq_free = calloc((size_t)ms, sizeof *kv->seq_free);
    if (!kv->data || (cfg->dtype == DTYPE_I8 && !kv->scales) || !kv->blk || !kv->btok ||
        !kv->free_ids || !kv->ht || !kv->seqs || !kv->seq_free) {
        kv_destroy(&kv);
        return KV_ERR_ALLOC;
    }
    for (uint32_t i = 0; i < cap; i++) kv->ht[i] = KV_NONE;
    for (int b = 0; b < kv->n_blocks; b++) {
        kv->blk[b].prev = kv->blk[b].next = kv->blk[b].parent = KV_NONE;
        kv->free_ids[b] = kv->n_blocks - 1 - b; /* block 0 is taken first */
    }
    kv->n_free = kv->n_blocks;
    kv->lru_head = kv->lru_tail = KV_NONE;
    for (int i = 0; i < ms; i++) kv->seq_free[i] = i;
    kv->seq_n_free = ms;
    kv->hash_mask = ~0ull;
    *out = kv;
    return KV_OK;
}

static void seq_release_arrays(kv_seq *s)
{
    free(s->tokens);
    free(s->blocks);
    free(s->chain_hash);
    free(s->chain_blk);
    free(s->chain_gen);
    memset(s, 0, sizeof *s);
}

void kv_destroy(kv_cache_t **self_p)
{
    if (!self_p || !*self_p) return;
    kv_cache_t *kv = *self_p;
    if (kv->seqs)
        for (int i = 0; i < kv->cfg.max_seqs; i++) seq_release_arrays(&kv->seqs[i]);
    if (kv->data) munmap(kv->data, kv->data_bytes);
    free(kv->scales);
    free(kv->blk);
    free(kv->btok);
    free(kv->free_ids);
    free(kv->ht);
    free(kv->seqs);
    free(kv->seq_free);
    free(kv);
    *self_p = NULL;
}

const kv_config *kv_config_of(const kv_cache_t *kv) { return kv ? &kv->cfg : NULL; }
int kv_n_blocks(const kv_cache_t *kv) { return kv ? kv->n_blocks : 0; }

/* ---- addressing ------------------------------------------------------------------------ */

static inline unsigned char *tile(const kv_cache_t *kv, int layer, int which, int block, int head)
{
    return kv->data + ((size_t)layer * 2 + which) * kv->layer_bytes +
           ((size_t)block * kv->nh + head) * kv->tile_elems * kv->esz;
}

/* int8: the scales of one block, layer and K or V: [nh][bt] (rows in tile order). */
static inline float *scale_tile(const kv_cache_t *kv, int layer, int which, int block)
{
    return kv->scales + (((size_t)layer * 2 + which) * kv->n_blocks + block) * kv->nh * kv->bt;
}

static int layer_ok(const kv_cache_t *kv, int layer) { return layer >= 0 && layer < kv->cfg.n_layers; }
static int block_ok(const kv_cache_t *kv, int b) { return b >= 0 && b < kv->n_blocks; }

void *kv_k_block(kv_cache_t *kv, int layer, int block, int head)
{
    if (!kv || !layer_ok(kv, layer) || !block_ok(kv, block) || head < 0 || head >= kv->nh) return NULL;
    return tile(kv, layer, 0, block, head);
}

void *kv_v_block(kv_cache_t *kv, int layer, int block, int head)
{
    if (!kv || !layer_ok(kv, layer) || !block_ok(kv, block) || head < 0 || head >= kv->nh) return NULL;
    return tile(kv, layer, 1, block, head);
}

void *kv_k_layer(kv_cache_t *kv, int layer) { return kv_k_block(kv, layer, 0, 0); }
void *kv_v_layer(kv_cache_t *kv, int layer) { return kv_v_block(kv, layer, 0, 0); }

float *kv_k_scales(kv_cache_t *kv, int layer, int block)
{
    if (!kv || !kv->scales || !layer_ok(kv, layer) || !block_ok(kv, block)) return NULL;
    return scale_tile(kv, layer, 0, block);
}

float *kv_v_scales(kv_cache_t *kv, int layer, int block)
{
    if (!kv || !kv->scales || !layer_ok(kv, layer) || !block_ok(kv, block)) return NULL;
    return scale_tile(kv, layer, 1, block);
}

/* ---- hashing and the hash table ---------------------------------------------------------- */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Name of a block: its parent's name and its own token ids, mixed (splitmix64's finalizer
 * per token). Collisions only cost a comparison: matches also check parent and tokens. */
static uint64_t block_hash(const kv_cache_t *kv, uint64_t parent, const int32_t *tok, int n)
{
    uint64_t h = mix64(parent ^ 0x9e3779b97f4a7c15ull);
    for (int i = 0; i < n; i++) h = mix64(h + (uint32_t)tok[i] + 0x9e3779b97f4a7c15ull);
    return h & kv->hash_mask;
}

static int ht_find(const kv_cache_t *kv, uint64_t h, int parent, uint32_t parent_gen,
                   const int32_t *tok)
{
    for (uint32_t i = (uint32_t)h & kv->ht_mask;; i = (i + 1) & kv->ht_mask) {
        int b = kv->ht[i];
        if (b == KV_NONE) return KV_NONE;
        const kv_block *k = &kv->blk[b];
        if (k->hash == h && k->parent == parent && (parent == KV_NONE || k->parent_gen == parent_gen) &&
            memcmp(kv->btok + (size_t)b * kv->bt, tok, (size_t)kv->bt * sizeof *tok) == 0)
            return b;
    }
}

static void ht_insert(kv_cache_t *kv, int b)
{
    uint32_t i = (uint32_t)kv->blk[b].hash & kv->ht_mask;
    while (kv->ht[i] != KV_NONE) i = (i + 1) & kv->ht_mask;
    kv->ht[i] = b;
}

/* Remove block b (backward-shift deletion keeps probe chains intact). */
static void ht_remove(kv_cache_t *kv, int b)
{
    uint32_t i = (uint32_t)kv->blk[b].hash & kv->ht_mask;
    while (kv->ht[i] != b) i = (i + 1) & kv->ht_mask;
    for (uint32_t j = (i + 1) & kv->ht_mask;; j = (j + 1) & kv->ht_mask) {
        int c = kv->ht[j];
        if (c == KV_NONE) break;
        uint32_t home = (uint32_t)kv->blk[c].hash & kv->ht_mask;
        /* c may move to i when i lies cyclically in [home, j) */
        if (((j - home) & kv->ht_mask) >= ((j - i) & kv->ht_mask)) {
            kv->ht[i] = c;
            i = j;
        }
    }
    kv->ht[i] = KV_NONE;
}

/* ---- block lifecycle ------------------------------------------------------------------- */

static void lru_unlink(kv_cache_t *kv, int b)
{
    kv_block *k = &kv->blk[b];
    if (k->prev != KV_NONE) kv->blk[k->prev].next = k->next; else kv->lru_head = k->next;
    if (k->next != KV_NONE) kv->blk[k->next].prev = k->prev; else kv->lru_tail = k->prev;
    k->prev = k->next = KV_NONE;
    kv->n_lru--;
}

static void lru_push_tail(kv_cache_t *kv, int b)
{
    kv_block *k = &kv->blk[b];
    k->prev = kv->lru_tail;
    k->next = KV_NONE;
    if (kv->lru_tail != KV_NONE) kv->blk[kv->lru_tail].next = b; else kv->lru_head = b;
    kv->lru_tail = b;
    kv->n_lru++;
}

static void uncache(kv_cache_t *kv, int b)
{
    ht_remove(kv, b);
    kv->blk[b].cached = 0;
    kv->blk[b].gen++;
    kv->blk[b].parent = KV_NONE;
    kv->n_cached--;
}

/* Reset int8 scales of a block about to be written from scratch (rows never written read
 * as 0). */
static void clear_scales(kv_cache_t *kv, int b)
{
    if (!kv->scales) return;
    for (int l = 0; l < kv->cfg.n_layers; l++)
        for (int w = 0; w < 2; w++)
            memset(scale_tile(kv, l, w, b), 0, (size_t)kv->nh * kv->bt * sizeof(float));
}

/* Take one block (ref = 1); the caller checked that one is available. */
static int take_block(kv_cache_t *kv)
{
    int b;
    if (kv->n_free > 0) {
        b = kv->free_ids[--kv->n_free];
    } else {
        b = kv->lru_head;
        lru_unlink(kv, b);
        uncache(kv, b);
        kv->evictions++;
    }
    kv->blk[b].ref = 1;
    kv->n_used++;
    clear_scales(kv, b);
    return b;
}

static void release_block(kv_cache_t *kv, int b)
{
    kv_block *k = &kv->blk[b];
    if (--k->ref > 0) return;
    kv->n_used--;
    if (k->cached) lru_push_tail(kv, b);
    else kv->free_ids[kv->n_free++] = b;
}

static void retain_block(kv_cache_t *kv, int b)
{
    kv_block *k = &kv->blk[b];
    if (k->ref++ == 0) {
        kv->n_used++;
        if (k->cached) lru_unlink(kv, b);
    }
}

static void copy_block(kv_cache_t *kv, int dst, int src)
{
    const size_t bytes = (size_t)kv->nh * kv->tile_elems * kv->esz;
    for (int l = 0; l < kv->cfg.n_layers; l++)
        for (int w = 0; w < 2; w++) {
            memcpy(tile(kv, l, w, dst, 0), tile(kv, l, w, src, 0), bytes);
            if (kv->scales)
                memcpy(scale_tile(kv, l, w, dst), scale_tile(kv, l, w, src),
                       (size_t)kv->nh * kv->bt * sizeof(float));
        }
}

/* ---- sequences ------------------------------------------------------------------------- */

static kv_seq *get_seq(const kv_cache_t *kv, int seq)
{
    if (!kv || seq < 0 || seq >= kv->cfg.max_seqs || !kv->seqs[seq].active) return NULL;
    return &kv->seqs[seq];
}

static int n_blocks_for(const kv_cache_t *kv, int len) { return (len + kv->bt - 1) / kv->bt; }

/* realloc p to n elements of esz bytes; on failure p is kept and NULL returned. */
static void *grow(void *p, int n, size_t esz) { return realloc(p, (size_t)n * esz); }

#define GROW(field, n)                                                   \
    do {                                                                 \
        void *q_ = grow(s->field, (n), sizeof *s->field);                \
        if (!q_) return KV_ERR_ALLOC;                                    \
        s->field = q_;                                                   \
    } while (0)

/* Make room for n_tok tokens and n_blk blocks. On failure the capacities stay (arrays
 * that did grow keep their contents), so the sequence is unchanged. */
static kv_status seq_reserve(kv_seq *s, int n_tok, int n_blk)
{
    if (n_tok > s->cap_tok) {
        int c = s->cap_tok ? s->cap_tok : 64;
        while (c < n_tok) c = c > INT32_MAX / 2 ? n_tok : c * 2;
        GROW(tokens, c);
        s->cap_tok = c;
    }
    if (n_blk > s->cap_blk) {
        int c = s->cap_blk ? s->cap_blk : 8;
        while (c < n_blk) c = c > INT32_MAX / 2 ? n_blk : c * 2;
        GROW(blocks, c);
        GROW(chain_hash, c);
        GROW(chain_blk, c);
        GROW(chain_gen, c);
        s->cap_blk = c;
    }
    return KV_OK;
}
#undef GROW

static kv_status seq_alloc_id(kv_cache_t *kv, int *id)
{
    if (kv->seq_n_free == 0) return KV_ERR_NOSEQ;
    *id = kv->seq_free[kv->seq_free_head];
    kv->seq_free_head = (kv->seq_free_head + 1) % kv->cfg.max_seqs;
    kv->seq_n_free--;
    memset(&kv->seqs[*id], 0, sizeof kv->seqs[*id]);
    kv->seqs[*id].active = 1;
    return KV_OK;
}

static void seq_release_id(kv_cache_t *kv, int id)
{
    seq_release_arrays(&kv->seqs[id]);
    int tail = (kv->seq_free_head + kv->seq_n_free) % kv->cfg.max_seqs;
    kv->seq_free[tail] = id;
    kv->seq_n_free++;
}

kv_status kv_seq_new(kv_cache_t *kv, int *seq_out)
{
    if (!kv || !seq_out) return KV_ERR_INVAL;
    return seq_alloc_id(kv, seq_out);
}

/* Release blocks [from, nb) of s, last first (children age out before parents). */
static void seq_drop_blocks(kv_cache_t *kv, kv_seq *s, int from)
{
    for (int i = n_blocks_for(kv, s->len) - 1; i >= from; i--) release_block(kv, s->blocks[i]);
}

kv_status kv_seq_free(kv_cache_t *kv, int seq)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    seq_drop_blocks(kv, s, 0);
    seq_release_id(kv, seq);
    return KV_OK;
}

kv_status kv_seq_fork(kv_cache_t *kv, int src, int *dst_out)
{
    kv_seq *s = get_seq(kv, src);
    if (!s) return KV_ERR_NOSEQ;
    if (!dst_out) return KV_ERR_INVAL;
    int id;
    kv_status st = seq_alloc_id(kv, &id);
    if (st) return st;
    kv_seq *d = &kv->seqs[id];
    s = &kv->seqs[src];
    int nb = n_blocks_for(kv, s->len);
    if ((st = seq_reserve(d, s->len, nb)) != KV_OK) {
        seq_release_id(kv, id);
        return st;
    }
    if (s->len) memcpy(d->tokens, s->tokens, (size_t)s->len * sizeof *s->tokens);
    if (nb) {
        memcpy(d->blocks, s->blocks, (size_t)nb * sizeof *s->blocks);
        memcpy(d->chain_hash, s->chain_hash, (size_t)s->n_chain * sizeof *s->chain_hash);
        memcpy(d->chain_blk, s->chain_blk, (size_t)s->n_chain * sizeof *s->chain_blk);
        memcpy(d->chain_gen, s->chain_gen, (size_t)s->n_chain * sizeof *s->chain_gen);
    }
    d->len = s->len;
    d->n_chain = s->n_chain;
    for (int i = 0; i < nb; i++) retain_block(kv, d->blocks[i]);
    *dst_out = id;
    return KV_OK;
}

/* Does seq's partial last block need a copy before tokens are appended to it? */
static int needs_cow(const kv_cache_t *kv, const kv_seq *s)
{
    if (s->len % kv->bt == 0) return 0;
    const kv_block *k = &kv->blk[s->blocks[s->len / kv->bt]];
    return k->ref > 1 || k->cached;
}

int kv_blocks_needed(const kv_cache_t *kv, int seq, int n_tokens)
{
    if (!kv || n_tokens < 0) return -1;
    if (seq == -1) return n_blocks_for(kv, n_tokens);
    const kv_seq *s = get_seq(kv, seq);
    if (!s) return -1;
    if (n_tokens == 0) return 0;
    if ((int64_t)s->len + n_tokens > INT32_MAX - kv->bt) return -1;
    return n_blocks_for(kv, s->len + n_tokens) - n_blocks_for(kv, s->len) + needs_cow(kv, s);
}

int kv_free_blocks(const kv_cache_t *kv) { return kv ? kv->n_free : 0; }
int kv_evictable_blocks(const kv_cache_t *kv) { return kv ? kv->n_lru : 0; }

int kv_can_append(const kv_cache_t *kv, int seq, int n_tokens)
{
    int need = kv_blocks_needed(kv, seq, n_tokens);
    if (need < 0) return 0;
    if (seq == -1 && kv->seq_n_free == 0) return 0;
    return need <= kv->n_free + kv->n_lru;
}

kv_status kv_seq_append(kv_cache_t *kv, int seq, const int32_t *tokens, int n)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (n < 0 || (n > 0 && !tokens)) return KV_ERR_INVAL;
    if (n == 0) return KV_OK;
    int need = kv_blocks_needed(kv, seq, n);
    if (need < 0) return KV_ERR_INVAL;
    if (need > kv->n_free + kv->n_lru) return KV_ERR_NOMEM;
    const int old_nb = n_blocks_for(kv, s->len), new_nb = n_blocks_for(kv, s->len + n);
    kv_status st = seq_reserve(s, s->len + n, new_nb);
    if (st) return st;
    if (needs_cow(kv, s)) {
        int i = s->len / kv->bt, old = s->blocks[i];
        int b = take_block(kv); /* old is referenced, so never the one evicted */
        copy_block(kv, b, old);
        s->blocks[i] = b;
        release_block(kv, old);
    }
    for (int i = old_nb; i < new_nb; i++) s->blocks[i] = take_block(kv);
    memcpy(s->tokens + s->len, tokens, (size_t)n * sizeof *tokens);
    s->len += n;
    return KV_OK;
}

kv_status kv_seq_truncate(kv_cache_t *kv, int seq, int n_tokens)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (n_tokens < 0 || n_tokens > s->len) return KV_ERR_INVAL;
    seq_drop_blocks(kv, s, n_blocks_for(kv, n_tokens));
    s->len = n_tokens;
    if (s->n_chain > n_tokens / kv->bt) s->n_chain = n_tokens / kv->bt;
    return KV_OK;
}

int kv_seq_len(const kv_cache_t *kv, int seq)
{
    const kv_seq *s = get_seq(kv, seq);
    return s ? s->len : -1;
}

const int32_t *kv_seq_tokens(const kv_cache_t *kv, int seq)
{
    const kv_seq *s = get_seq(kv, seq);
    return s ? s->tokens : NULL;
}

const int32_t *kv_seq_blocks(const kv_cache_t *kv, int seq, int *n_blocks)
{
    const kv_seq *s = get_seq(kv, seq);
    if (n_blocks) *n_blocks = s ? n_blocks_for(kv, s->len) : 0;
    return s ? s->blocks : NULL;
}

kv_status kv_seq_commit(kv_cache_t *kv, int seq, int n_valid)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (n_valid < 0 || n_valid > s->len) return KV_ERR_INVAL;
    const int bt = kv->bt;
    for (int i = s->n_chain; i < n_valid / bt; i++) {
        const int32_t *tok = s->tokens + (size_t)i * bt;
        uint64_t ph = i ? s->chain_hash[i - 1] : KV_HASH_SEED;
        int pb = i ? s->chain_blk[i - 1] : KV_NONE;
        uint32_t pg = i ? s->chain_gen[i - 1] : 0;
        uint64_t h = block_hash(kv, ph, tok, bt);
        int b = s->blocks[i], named;
        if (kv->blk[b].cached) {
            named = b; /* attached, forked or committed before: already this block's name */
        } else if ((named = ht_find(kv, h, pb, pg, tok)) == KV_NONE) {
            kv_block *k = &kv->blk[b];
            k->hash = h;
            k->parent = pb;
            k->parent_gen = pg;
            k->cached = 1;
            memcpy(kv->btok + (size_t)b * bt, tok, (size_t)bt * sizeof *tok);
            ht_insert(kv, b);
            kv->n_cached++;
            named = b;
        } /* else an equal block is cached already: ours stays private */
        s->chain_hash[i] = kv->blk[named].hash;
        s->chain_blk[i] = named;
        s->chain_gen[i] = kv->blk[named].gen;
    }
    if (n_valid / bt > s->n_chain) s->n_chain = n_valid / bt;
    return KV_OK;
}

/* ---- prefix cache ------------------------------------------------------------------------ */

/* Walk the cache along tokens: matched blocks go to out[] (may be NULL); returns the count. */
static int prefix_walk(const kv_cache_t *kv, const int32_t *tokens, int n, int32_t *out)
{
    if (!tokens || n <= 0) return 0;
    uint64_t h = KV_HASH_SEED;
    int pb = KV_NONE;
    uint32_t pg = 0;
    int i = 0;
    for (; (i + 1) * kv->bt <= n; i++) {
        const int32_t *tok = tokens + (size_t)i * kv->bt;
        h = block_hash(kv, h, tok, kv->bt);
        int b = ht_find(kv, h, pb, pg, tok);
        if (b == KV_NONE) break;
        if (out) out[i] = b;
        pb = b;
        pg = kv->blk[b].gen;
    }
    return i;
}

int kv_prefix_lookup(kv_cache_t *kv, const int32_t *tokens, int n)
{
    if (!kv) return 0;
    return prefix_walk(kv, tokens, n, NULL) * kv->bt;
}

kv_status kv_prefix_attach(kv_cache_t *kv, int seq, const int32_t *tokens, int n, int *n_cached)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (n < 0 || (n > 0 && !tokens) || s->len != 0) return KV_ERR_INVAL;
    kv_status st = seq_reserve(s, n, n_blocks_for(kv, n));
    if (st) return st;
    int nb = prefix_walk(kv, tokens, n, s->blocks);
    for (int i = 0; i < nb; i++) {
        int b = s->blocks[i];
        retain_block(kv, b);
        s->chain_hash[i] = kv->blk[b].hash;
        s->chain_blk[i] = b;
        s->chain_gen[i] = kv->blk[b].gen;
    }
    s->len = nb * kv->bt;
    s->n_chain = nb;
    if (s->len) memcpy(s->tokens, tokens, (size_t)s->len * sizeof *tokens);
    kv->prefix_hit += (uint64_t)s->len;
    kv->prefix_miss += (uint64_t)(n - s->len);
    if (n_cached) *n_cached = s->len;
    return KV_OK;
}

/* ---- data ---------------------------------------------------------------------------- */

static int block_writable(const kv_cache_t *kv, int b)
{
    return kv->blk[b].ref == 1 && !kv->blk[b].cached;
}

static void store_row(kv_cache_t *kv, int layer, int which, int b, int slot, const float *x)
{
    const int hd = kv->hd;
    for (int h = 0; h < kv->nh; h++) {
        const float *src = x + (size_t)h * hd;
        unsigned char *t = tile(kv, layer, which, b, h);
        switch (kv->cfg.dtype) {
        case DTYPE_F32:
            memcpy(t + (size_t)slot * hd * 4, src, (size_t)hd * 4);
            break;
        case DTYPE_F16: {
            uint16_t *d = (uint16_t *)t + (size_t)slot * hd;
            for (int i = 0; i < hd; i++) d[i] = fp16_from_f32(src[i]);
            break;
        }
        case DTYPE_BF16: {
            uint16_t *d = (uint16_t *)t + (size_t)slot * hd;
            for (int i = 0; i < hd; i++) d[i] = bf16_from_f32(src[i]);
            break;
        }
        case DTYPE_I8: {
            /* one scale per row: a row's values depend on that row only, so the KV (and
             * everything computed from it) is the same whatever the order, chunking or
             * batching that wrote the block */
            float *sc = &scale_tile(kv, layer, which, b)[(size_t)h * kv->bt + (size_t)slot];
            float amax = 0;
            for (int i = 0; i < hd; i++) {
                float a = fabsf(src[i]);
                if (a > amax) amax = a; /* NaN compares false: it does not widen the range */
            }
            *sc = amax / 127.0f;
            int8_t *qr = (int8_t *)t + (size_t)slot * hd;
            float inv = *sc > 0 ? 1.0f / *sc : 0.0f;
            for (int i = 0; i < hd; i++) {
                float v = rintf(src[i] * inv);
                qr[i] = (int8_t)(v > 127.0f ? 127 : v < -127.0f ? -127 : v == v ? v : 0); /* NaN -> 0 */
            }
            break;
        }
        default:
            break;
        }
    }
}

static void load_row(const kv_cache_t *kv, int layer, int which, int b, int slot, float *x)
{
    const int hd = kv->hd;
    for (int h = 0; h < kv->nh; h++) {
        float *dst = x + (size_t)h * hd;
        const unsigned char *t = tile(kv, layer, which, b, h);
        switch (kv->cfg.dtype) {
        case DTYPE_F32:
            memcpy(dst, t + (size_t)slot * hd * 4, (size_t)hd * 4);
            break;
        case DTYPE_F16: {
            const uint16_t *d = (const uint16_t *)t + (size_t)slot * hd;
            for (int i = 0; i < hd; i++) dst[i] = fp16_to_f32(d[i]);
            break;
        }
        case DTYPE_BF16: {
            const uint16_t *d = (const uint16_t *)t + (size_t)slot * hd;
            for (int i = 0; i < hd; i++) dst[i] = bf16_to_f32(d[i]);
            break;
        }
        case DTYPE_I8: {
            const float sc = scale_tile(kv, layer, which, b)[(size_t)h * kv->bt + (size_t)slot];
            const int8_t *q = (const int8_t *)t + (size_t)slot * hd;
            for (int i = 0; i < hd; i++) dst[i] = (float)q[i] * sc;
            break;
        }
        default:
            break;
        }
    }
}

kv_status kv_store(kv_cache_t *kv, int seq, int layer, int pos, const float *k, const float *v)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (!layer_ok(kv, layer) || pos < 0 || pos >= s->len || !k || !v) return KV_ERR_INVAL;
    int b = s->blocks[pos / kv->bt];
    if (!block_writable(kv, b)) return KV_ERR_INVAL;
    store_row(kv, layer, 0, b, pos % kv->bt, k);
    store_row(kv, layer, 1, b, pos % kv->bt, v);
    return KV_OK;
}

kv_status kv_load(const kv_cache_t *kv, int seq, int layer, int pos, float *k, float *v)
{
    const kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (!layer_ok(kv, layer) || pos < 0 || pos >= s->len || (!k && !v)) return KV_ERR_INVAL;
    int b = s->blocks[pos / kv->bt];
    if (k) load_row(kv, layer, 0, b, pos % kv->bt, k);
    if (v) load_row(kv, layer, 1, b, pos % kv->bt, v);
    return KV_OK;
}

/* ---- pack / unpack ------------------------------------------------------------------- */

static int range_ok(const kv_cache_t *kv, int layer0, int n_layers, int head0, int n_heads)
{
    return layer0 >= 0 && n_layers >= 1 && layer0 <= kv->cfg.n_layers - n_layers &&
           head0 >= kv->cfg.kv_head0 && n_heads >= 1 &&
           head0 - kv->cfg.kv_head0 <= kv->nh - n_heads;
}

/* Bytes of one layer's part. */
static size_t layer_part_bytes(const kv_cache_t *kv, int n_heads, int n_tok)
{
    size_t b = 2 * (size_t)n_heads * n_tok * kv->hd * kv->esz;
    if (kv->scales) b += 2 * (size_t)n_heads * n_tok * sizeof(float);
    return b;
}

size_t kv_pack_range_size(const kv_cache_t *kv, int layer0, int n_layers, int head0, int n_heads,
                          int n_tok)
{
    if (!kv || n_tok < 0 || !range_ok(kv, layer0, n_layers, head0, n_heads)) return 0;
    return sizeof(kv_pack_header) + (size_t)n_layers * layer_part_bytes(kv, n_heads, n_tok);
}

size_t kv_pack_size(const kv_cache_t *kv, int seq, int layer0, int n_layers, int head0, int n_heads)
{
    const kv_seq *s = get_seq(kv, seq);
    if (!s) return 0;
    return kv_pack_range_size(kv, layer0, n_layers, head0, n_heads, s->len);
}

/* Packs and unpacks at least this large bypass the caches (streaming stores): the data is
 * bigger than the caches anyway, and it saves the destination's read-for-ownership. */
#define KV_STREAM_MIN_BYTES ((size_t)1 << 20)
/* How far ahead (in blocks) a pack of a subset of heads prefetches. */
#ifndef KV_PREFETCH_BLOCKS
#define KV_PREFETCH_BLOCKS 4
#endif

/* memcpy, or with non-temporal stores when nt and the destination is 16-byte aligned
 * (the caller ends with a fence). */
static inline void copy_bytes(void *dst, const void *src, size_t n, int nt)
{
#if defined(__SSE2__)
    if (nt && ((uintptr_t)dst & 15) == 0) {
        __m128i *d = dst;
        const __m128i *s = src;
        size_t i = 0, n64 = n / 64;
        for (; i < n64; i++, d += 4, s += 4) {
            __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1);
            __m128i c = _mm_loadu_si128(s + 2), e = _mm_loadu_si128(s + 3);
            _mm_stream_si128(d, a);
            _mm_stream_si128(d + 1, b);
            _mm_stream_si128(d + 2, c);
            _mm_stream_si128(d + 3, e);
        }
        if (n % 64) memcpy(d, s, n % 64);
        return;
    }
#endif
    (void)nt;
    memcpy(dst, src, n);
}

static inline void copy_fence(int nt)
{
#if defined(__SSE2__)
    if (nt) _mm_sfence();
#endif
    (void)nt;
}

/* Copy rows [tok0, tok0+n_tok) of one (layer, which) for local heads [h0, h0+n_heads)
 * between the tiles and n_heads dense [n_tok][hd] runs at p; to_buf selects the direction.
 * Blocks outer, heads inner: the pool side is read (written) in address order, one
 * contiguous memcpy per block and head. */
static void copy_rows(const kv_cache_t *kv, const kv_seq *s, int layer, int which, int h0,
                      int n_heads, int tok0, int n_tok, unsigned char *p, int to_buf, int nt)
{
    const size_t row = (size_t)kv->hd * kv->esz, run = (size_t)n_tok * row;
    int t = tok0, end = tok0 + n_tok;
    while (t < end) {
        int slot = t % kv->bt, n = kv->bt - slot;
        if (n > end - t) n = end - t;
        const int b = s->blocks[t / kv->bt];
        unsigned char *q = p + (size_t)(t - tok0) * row;
        const int ahead = t / kv->bt + KV_PREFETCH_BLOCKS;
        if (to_buf && n_heads < kv->nh && ahead < (end + kv->bt - 1) / kv->bt) {
            /* a subset of heads reads the pool with gaps, which the hardware prefetcher
             * does not follow across pages: ask for rows a few blocks ahead */
            const int nb = s->blocks[ahead];
            const size_t len = (size_t)kv->bt * row;
            for (int h = h0; h < h0 + n_heads; h++) {
                const unsigned char *np = tile(kv, layer, which, nb, h);
                for (size_t o = 0; o < len; o += 64) __builtin_prefetch(np + o, 0, 1); /* to L2 */
            }
        }
        for (int h = h0; h < h0 + n_heads; h++, q += run) {
            unsigned char *tp = tile(kv, layer, which, b, h) + (size_t)slot * row;
            if (to_buf) copy_bytes(q, tp, (size_t)n * row, nt);
            else copy_bytes(tp, q, (size_t)n * row, nt);
        }
        t += n;
    }
}

/* The int8 scales of rows [tok0, tok0+n_tok) of one (layer, which) for local heads
 * [h0, h0+n_heads), between the pool and n_heads dense [n_tok] f32 runs at p. */
static void copy_scales(const kv_cache_t *kv, const kv_seq *s, int layer, int which, int h0,
                        int n_heads, int tok0, int n_tok, unsigned char *p, int to_buf)
{
    const size_t run = (size_t)n_tok * sizeof(float);
    for (int t = tok0, end = tok0 + n_tok; t < end;) {
        int slot = t % kv->bt, n = kv->bt - slot;
        if (n > end - t) n = end - t;
        const float *tile_sc = scale_tile(kv, layer, which, s->blocks[t / kv->bt]);
        unsigned char *q = p + (size_t)(t - tok0) * sizeof(float);
        for (int h = h0; h < h0 + n_heads; h++, q += run) {
            float *sc = (float *)tile_sc + (size_t)h * kv->bt + (size_t)slot;
            if (to_buf) memcpy(q, sc, (size_t)n * sizeof(float));
            else memcpy(sc, q, (size_t)n * sizeof(float));
        }
        t += n;
    }
}

/* Move the body (everything after the header) in one direction. */
static void move_body(const kv_cache_t *kv, const kv_seq *s, int layer0, int n_layers, int h0,
                      int n_heads, int tok0, int n_tok, unsigned char *p, int to_buf)
{
    const size_t run = (size_t)n_tok * kv->hd * kv->esz;
    const size_t srun = (size_t)n_tok * sizeof(float);
    const int nt = (size_t)n_layers * 2 * n_heads * run >= KV_STREAM_MIN_BYTES;
    for (int l = layer0; l < layer0 + n_layers; l++) {
        for (int w = 0; w < 2; w++, p += n_heads * run)
            copy_rows(kv, s, l, w, h0, n_heads, tok0, n_tok, p, to_buf, nt);
        if (kv->scales)
            for (int w = 0; w < 2; w++, p += n_heads * srun)
                copy_scales(kv, s, l, w, h0, n_heads, tok0, n_tok, p, to_buf);
    }
    copy_fence(nt);
}

kv_status kv_pack_range(const kv_cache_t *kv, int seq, int layer0, int n_layers, int head0,
                        int n_heads, int tok0, int n_tok, void *buf, size_t cap, size_t *written)
{
    if (written) *written = 0;
    const kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (!range_ok(kv, layer0, n_layers, head0, n_heads) || tok0 < 0 || n_tok < 0 ||
        tok0 > s->len - n_tok)
        return KV_ERR_INVAL;
    size_t need = kv_pack_range_size(kv, layer0, n_layers, head0, n_heads, n_tok);
    if (!buf || cap < need) return KV_ERR_BUFSIZE;
    kv_pack_header hdr = {
        .magic = KV_PACK_MAGIC, .dtype = (uint32_t)kv->cfg.dtype, .head_dim = kv->hd,
        .block_tokens = kv->bt, .layer0 = layer0, .n_layers = n_layers, .head0 = head0,
        .n_heads = n_heads, .tok0 = tok0, .n_tok = n_tok,
    };
    memcpy(buf, &hdr, sizeof hdr);
    move_body(kv, s, layer0, n_layers, head0 - kv->cfg.kv_head0, n_heads, tok0, n_tok,
              (unsigned char *)buf + sizeof hdr, 1);
    if (written) *written = need;
    return KV_OK;
}

kv_status kv_pack(const kv_cache_t *kv, int seq, int layer0, int n_layers, int head0, int n_heads,
                  void *buf, size_t cap, size_t *written)
{
    int len = kv_seq_len(kv, seq);
    if (len < 0) {
        if (written) *written = 0;
        return KV_ERR_NOSEQ;
    }
    return kv_pack_range(kv, seq, layer0, n_layers, head0, n_heads, 0, len, buf, cap, written);
}

kv_status kv_unpack_range(kv_cache_t *kv, int seq, int layer0, int n_layers, int head0,
                          int n_heads, int tok0, int n_tok, const void *buf, size_t len)
{
    kv_seq *s = get_seq(kv, seq);
    if (!s) return KV_ERR_NOSEQ;
    if (!range_ok(kv, layer0, n_layers, head0, n_heads) || tok0 < 0 || n_tok < 0 ||
        tok0 > s->len - n_tok || !buf)
        return KV_ERR_INVAL;
    kv_pack_header hdr;
    if (len < sizeof hdr) return KV_ERR_SHAPE;
    memcpy(&hdr, buf, sizeof hdr);
    if (hdr.magic != KV_PACK_MAGIC || hdr.dtype != (uint32_t)kv->cfg.dtype ||
        hdr.head_dim != kv->hd ||
        hdr.layer0 != layer0 || hdr.n_layers != n_layers || hdr.head0 != head0 ||
        hdr.n_heads != n_heads || hdr.tok0 != tok0 || hdr.n_tok != n_tok ||
        len != kv_pack_range_size(kv, layer0, n_layers, head0, n_heads, n_tok))
        return KV_ERR_SHAPE;
    for (int i = tok0 / kv->bt; i < n_blocks_for(kv, tok0 + n_tok); i++)
        if (!block_writable(kv, s->blocks[i])) return KV_ERR_INVAL;
    move_body(kv, s, layer0, n_layers, head0 - kv->cfg.kv_head0, n_heads, tok0, n_tok,
              (unsigned char *)buf + sizeof hdr, 0);
    return KV_OK;
}

kv_status kv_unpack(kv_cache_t *kv, int seq, int layer0, int n_layers, int head0, int n_heads,
                    const void *buf, size_t len)
{
    int n = kv_seq_len(kv, seq);
    if (n < 0) return KV_ERR_NOSEQ;
    return kv_unpack_range(kv, seq, layer0, n_layers, head0, n_heads, 0, n, buf, len);
}

/* ---- statistics and checks -------------------------------------------------------------- */

void kv_get_stats(const kv_cache_t *kv, kv_stats *out)
{
    if (!out) return;
    memset(out, 0, sizeof *out);
    if (!kv) return;
    out->blocks_total = kv->n_blocks;
    out->blocks_used = kv->n_used;
    out->blocks_cached = kv->n_cached;
    out->prefix_hit_tokens = kv->prefix_hit;
    out->prefix_miss_tokens = kv->prefix_miss;
    out->evictions = kv->evictions;
    out->blocks_free = kv->n_free;
    out->blocks_evictable = kv->n_lru;
    out->seqs = kv->cfg.max_seqs - kv->seq_n_free;
}

int kv_block_ref(const kv_cache_t *kv, int block)
{
    return kv && block_ok(kv, block) ? kv->blk[block].ref : -1;
}

int kv_block_cached(const kv_cache_t *kv, int block)
{
    return kv && block_ok(kv, block) ? kv->blk[block].cached : -1;
}

void kv_debug_hash_mask(kv_cache_t *kv, uint64_t mask)
{
    if (kv && kv->n_cached == 0) kv->hash_mask = mask;
}

static kv_status fail(char *msg, size_t cap, const char *fmt, ...)
{
    if (msg && cap) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(msg, cap, fmt, ap);
        va_end(ap);
    }
    return KV_ERR_INVAL;
}

kv_status kv_check(const kv_cache_t *kv, char *msg, size_t cap)
{
    if (msg && cap) msg[0] = 0;
    if (!kv) return fail(msg, cap, "kv_check: NULL cache");
    const int nb = kv->n_blocks;
    int32_t *refs = calloc((size_t)nb, sizeof *refs);
    unsigned char *seen = calloc((size_t)nb, 1); /* 1 free list, 2 lru, 4 hash table */
    if (!refs || !seen) {
        free(refs);
        free(seen);
        return KV_ERR_ALLOC;
    }
    kv_status st = KV_OK;
#define CHECK(cond, ...) do { if (!(cond)) { st = fail(msg, cap, __VA_ARGS__); goto out; } } while (0)
    int live = 0;
    for (int i = 0; i < kv->cfg.max_seqs; i++) {
        const kv_seq *s = &kv->seqs[i];
        if (!s->active) continue;
        live++;
        int n = n_blocks_for(kv, s->len);
        CHECK(s->len >= 0 && s->len <= s->cap_tok && n <= s->cap_blk, "seq %d: len %d beyond capacity", i, s->len);
        CHECK(s->n_chain >= 0 && s->n_chain <= s->len / kv->bt, "seq %d: n_chain %d > full blocks", i, s->n_chain);
        for (int j = 0; j < n; j++) {
            CHECK(block_ok(kv, s->blocks[j]), "seq %d: block table[%d] = %d out of range", i, j, s->blocks[j]);
            refs[s->blocks[j]]++;
        }
    }
    CHECK(live == kv->cfg.max_seqs - kv->seq_n_free, "%d live sequences, %d ids taken", live,
          kv->cfg.max_seqs - kv->seq_n_free);
    for (int k = 0; k < kv->seq_n_free; k++) {
        int id = kv->seq_free[(kv->seq_free_head + k) % kv->cfg.max_seqs];
        CHECK(id >= 0 && id < kv->cfg.max_seqs && !kv->seqs[id].active, "free sequence id %d is live", id);
    }
    for (int k = 0; k < kv->n_free; k++) {
        int b = kv->free_ids[k];
        CHECK(block_ok(kv, b) && !(seen[b] & 1), "free list entry %d: block %d bad or repeated", k, b);
        seen[b] |= 1;
    }
    int n_lru = 0, prev = KV_NONE;
    for (int b = kv->lru_head; b != KV_NONE; prev = b, b = kv->blk[b].next) {
        CHECK(block_ok(kv, b) && !(seen[b] & 2) && n_lru < nb, "LRU list: bad block %d or cycle", b);
        CHECK(kv->blk[b].prev == prev, "LRU list: block %d's prev is %d, not %d", b, kv->blk[b].prev, prev);
        seen[b] |= 2;
        n_lru++;
    }
    CHECK(prev == kv->lru_tail && n_lru == kv->n_lru, "LRU list: %d blocks, count says %d", n_lru, kv->n_lru);
    int n_ht = 0;
    for (uint32_t i = 0; i <= kv->ht_mask; i++) {
        int b = kv->ht[i];
        if (b == KV_NONE) continue;
        CHECK(block_ok(kv, b) && !(seen[b] & 4), "hash table slot %u: bad or repeated block %d", i, b);
        seen[b] |= 4;
        n_ht++;
        CHECK(ht_find(kv, kv->blk[b].hash, kv->blk[b].parent, kv->blk[b].parent_gen,
                      kv->btok + (size_t)b * kv->bt) != KV_NONE, "cached block %d cannot be found", b);
    }
    CHECK(n_ht == kv->n_cached, "hash table holds %d blocks, count says %d", n_ht, kv->n_cached);
    int used = 0;
    for (int b = 0; b < nb; b++) {
        const kv_block *k = &kv->blk[b];
        CHECK(k->ref == refs[b], "block %d: ref %d but %d block tables hold it", b, k->ref, refs[b]);
        CHECK(!!k->cached == !!(seen[b] & 4), "block %d: cached flag %d disagrees with the table", b, k->cached);
        int want = k->ref > 0 ? 0 : k->cached ? 2 : 1;
        CHECK((seen[b] & 3) == want, "block %d (ref %d, cached %d) on the wrong list (%d)", b, k->ref,
              k->cached, seen[b] & 3);
        used += k->ref > 0;
    }
    CHECK(used == kv->n_used, "%d blocks used, count says %d", used, kv->n_used);
    CHECK(kv->n_used + kv->n_free + kv->n_lru == nb, "used %d + free %d + evictable %d != %d blocks",
          kv->n_used, kv->n_free, kv->n_lru, nb);
#undef CHECK
out:
    free(refs);
    free(seen);
    return st;
}
