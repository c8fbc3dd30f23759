/* tests/test_kv_random.c: thousands of random operations on kv/ against a simple reference
 * model of the cache (arrays and linear scans, no hashing), checked after every step:
 * block tables, reference counts, cached flags, free/evictable counts, statistics, every
 * sequence's K/V contents, and kv_check's own walk.
 *
 * The seed is printed; replay one with DUET_SEED=<n> (DUET_STEPS=<n> scales the run).
 *
 * K/V values are a function of the token prefix they belong to (like a real model's), so
 * a block shared through fork or the prefix cache must hold exactly the values that the
 * sequence would have computed itself: a wrong prefix hit shows up as wrong contents. */
#include <inttypes.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <cmocka.h>

#include "kv/kv.h"

#define NB 40      /* blocks in pool A */
#define BT 4       /* tokens per block in pool A */
#define MS 12      /* sequence slots */
#define MAXT 72    /* longest sequence */
#define MAXB (MAXT / BT + 1)
#define NL 2       /* layers */
#define NH 4       /* KV heads in pool A: global 0..3 */
#define HD 4       /* head_dim */
#define B_HEAD0 1  /* pool B holds global heads 1..2 */
#define B_NH 2
#define N_STREAMS 4
#define ALPHABET 6 /* small, so equal blocks turn up at different depths and under different parents */

typedef struct {
    int active, len, n_chain;
    int stream;          /* which token stream its appends mostly follow */
    int32_t tok[MAXT];
    uint64_t dig[MAXT];  /* digest of tokens [0, p] */
    int32_t blocks[MAXB];
    long chain[MAXB];    /* model node naming each committed block */
} mseq;

typedef struct {
    kv_cache_t *kv, *kb; /* the cache under test, and pool B for pack/unpack */
    dtype_t dtype;
    int bt_b;
    uint64_t rng;
    uint64_t seed;       /* this run's */
    uint64_t base_seed;  /* DUET_SEED, from which every run's seed derives */
    int step;
    const char *op;
    /* blocks */
    int ref[NB];
    long node[NB];        /* alive node naming this block, or -1 */
    long node_parent[NB]; /* that node's parent node (-1: root) */
    int32_t node_tok[NB][BT];
    long next_node;
    int lru[NB], n_lru;   /* unreferenced cached blocks, least recently released first */
    mseq seq[MS];
    uint64_t evictions, hit, miss;
    int n_nomem, n_cow, n_pack, n_named;  /* coverage, printed at the end */
    int32_t stream[N_STREAMS][MAXT];
} model;

static uint64_t g_seed; /* DUET_SEED */
static int g_steps;     /* DUET_STEPS */

/* ---- helpers ---------------------------------------------------------------------------- */

static uint64_t next_u64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static int rnd(model *m, int n) { return (int)(next_u64(&m->rng) % (uint64_t)n); }

static uint64_t mix(uint64_t z)
{
    z = (z ^ (z >> 33)) * 0xff51afd7ed558ccdull;
    z = (z ^ (z >> 33)) * 0xc4ceb9fe1a85ec53ull;
    return z ^ (z >> 33);
}

/* The value K (w = 0) or V (w = 1) of layer l, global head h, dim d at a position whose
 * prefix digest is dig: a multiple of 1/4 in [-8, 8], exact in f16 and bf16. */
static float value(uint64_t dig, int l, int w, int h, int d)
{
    uint64_t x = mix(dig ^ ((uint64_t)(l * 1000 + w * 100 + h * 10 + d) << 40));
    return (float)((int)(x % 65) - 32) * 0.25f;
}

#define FAIL(m, ...)                                                                         \
    do {                                                                                     \
        char where_[160];                                                                    \
        snprintf(where_, sizeof where_, "run seed %" PRIu64 " (replay: DUET_SEED=%" PRIu64   \
                 ") dtype %s step %d op %s: ", (m)->seed, (m)->base_seed,                    \
                 dtype_name((m)->dtype), (m)->step, (m)->op);                                \
        char what_[512];                                                                     \
        snprintf(what_, sizeof what_, __VA_ARGS__);                                          \
        fail_msg("%s%s", where_, what_);                                                     \
    } while (0)

#define EXPECT(m, cond, ...) do { if (!(cond)) FAIL(m, __VA_ARGS__); } while (0)

static int n_blocks_for(int len, int bt) { return (len + bt - 1) / bt; }

static int model_used(const model *m)
{
    int u = 0;
    for (int b = 0; b < NB; b++) u += m->ref[b] > 0;
    return u;
}

static int model_cached(const model *m)
{
    int c = 0;
    for (int b = 0; b < NB; b++) c += m->node[b] >= 0;
    return c;
}

static int model_free(const model *m) { return NB - model_used(m) - m->n_lru; }

static void lru_remove(model *m, int b)
{
    for (int i = 0; i < m->n_lru; i++)
        if (m->lru[i] == b) {
            memmove(m->lru + i, m->lru + i + 1, (size_t)(m->n_lru - i - 1) * sizeof(int));
            m->n_lru--;
            return;
        }
    FAIL(m, "model: block %d not on the LRU list", b);
}

static void release(model *m, int b)
{
    if (--m->ref[b] == 0 && m->node[b] >= 0) m->lru[m->n_lru++] = b;
}

static void retain(model *m, int b)
{
    if (m->ref[b]++ == 0 && m->node[b] >= 0) lru_remove(m, b);
}

/* The alive node under parent with these tokens, as its block; -1 if none. */
static int find_node(const model *m, long parent, const int32_t *tok)
{
    for (int b = 0; b < NB; b++)
        if (m->node[b] >= 0 && m->node_parent[b] == parent &&
            memcmp(m->node_tok[b], tok, sizeof m->node_tok[b]) == 0)
            return b;
    return -1;
}

/* Matched blocks of tokens[0..n) into out (may be NULL); returns the count. */
static int model_walk(const model *m, const int32_t *tok, int n, int32_t *out)
{
    long parent = -1;
    int i = 0;
    for (; (i + 1) * BT <= n; i++) {
        int b = find_node(m, parent, tok + i * BT);
        if (b < 0) break;
        if (out) out[i] = b;
        parent = m->node[b];
    }
    return i;
}

static void set_digests(mseq *s, int from)
{
    for (int p = from; p < s->len; p++)
        s->dig[p] = mix((p ? s->dig[p - 1] : 0x1234567ull) * 31 + (uint64_t)(uint32_t)s->tok[p] + 1);
}

static void fill(uint64_t dig, int l, int head0, int nh, float *k, float *v)
{
    for (int h = 0; h < nh; h++)
        for (int d = 0; d < HD; d++) {
            k[h * HD + d] = value(dig, l, 0, head0 + h, d);
            v[h * HD + d] = value(dig, l, 1, head0 + h, d);
        }
}

/* Compute (store) K/V of positions [from, len) of seq in pool A. */
static void compute(model *m, int id, int from)
{
    const mseq *s = &m->seq[id];
    float k[NH * HD], v[NH * HD];
    for (int l = 0; l < NL; l++)
        for (int p = from; p < s->len; p++) {
            fill(s->dig[p], l, 0, NH, k, v);
            kv_status st = kv_store(m->kv, id, l, p, k, v);
            EXPECT(m, st == KV_OK, "kv_store seq %d pos %d: %s", id, p, kv_strerror(st));
        }
}

/* ---- checks after every step --------------------------------------------------------------- */

static void check_all(model *m)
{
    char msg[200];
    EXPECT(m, kv_check(m->kv, msg, sizeof msg) == KV_OK, "kv_check: %s", msg);
    EXPECT(m, kv_check(m->kb, msg, sizeof msg) == KV_OK, "kv_check (pool B): %s", msg);
    int refs[NB] = {0};
    const float tol = m->dtype == DTYPE_I8 ? 0.5f * (BT + 1) * 8.0f / 127 : 0.0f;
    float k[NH * HD], v[NH * HD], ek[NH * HD], ev[NH * HD];
    for (int id = 0; id < MS; id++) {
        const mseq *s = &m->seq[id];
        EXPECT(m, kv_seq_len(m->kv, id) == (s->active ? s->len : -1), "seq %d: len %d, model %d",
               id, kv_seq_len(m->kv, id), s->active ? s->len : -1);
        if (!s->active) continue;
        int nb;
        const int32_t *bl = kv_seq_blocks(m->kv, id, &nb);
        EXPECT(m, nb == n_blocks_for(s->len, BT), "seq %d: %d blocks, model %d", id, nb,
               n_blocks_for(s->len, BT));
        for (int i = 0; i < nb; i++) {
            EXPECT(m, bl[i] == s->blocks[i], "seq %d: table[%d] = %d, model %d", id, i, bl[i], s->blocks[i]);
            refs[bl[i]]++;
        }
        if (s->len)
            EXPECT(m, memcmp(kv_seq_tokens(m->kv, id), s->tok, (size_t)s->len * 4) == 0,
                   "seq %d: tokens differ", id);
        for (int l = 0; l < NL; l++)
            for (int p = 0; p < s->len; p++) {
                EXPECT(m, kv_load(m->kv, id, l, p, k, v) == KV_OK, "kv_load seq %d pos %d", id, p);
                fill(s->dig[p], l, 0, NH, ek, ev);
                for (int i = 0; i < NH * HD; i++)
                    EXPECT(m, fabsf(k[i] - ek[i]) <= tol && fabsf(v[i] - ev[i]) <= tol,
                           "seq %d layer %d pos %d (block %d) elem %d: k %g v %g, want %g %g", id,
                           l, p, s->blocks[p / BT], i, k[i], v[i], ek[i], ev[i]);
            }
    }
    for (int b = 0; b < NB; b++) {
        EXPECT(m, refs[b] == m->ref[b], "block %d: tables hold it %d times, model ref %d", b,
               refs[b], m->ref[b]);
        EXPECT(m, kv_block_ref(m->kv, b) == m->ref[b], "block %d: ref %d, model %d", b,
               kv_block_ref(m->kv, b), m->ref[b]);
        EXPECT(m, kv_block_cached(m->kv, b) == (m->node[b] >= 0), "block %d: cached %d, model %d",
               b, kv_block_cached(m->kv, b), m->node[b] >= 0);
    }
    kv_stats st;
    kv_get_stats(m->kv, &st);
    EXPECT(m, st.blocks_total == NB && st.blocks_used == model_used(m) &&
              st.blocks_cached == model_cached(m) && st.blocks_evictable == m->n_lru &&
              st.blocks_free == model_free(m),
           "stats total %d used %d cached %d evictable %d free %d; model used %d cached %d "
           "evictable %d free %d", st.blocks_total, st.blocks_used, st.blocks_cached,
           st.blocks_evictable, st.blocks_free, model_used(m), model_cached(m), m->n_lru, model_free(m));
    EXPECT(m, kv_free_blocks(m->kv) == model_free(m) && kv_evictable_blocks(m->kv) == m->n_lru,
           "free %d evictable %d; model %d %d", kv_free_blocks(m->kv), kv_evictable_blocks(m->kv),
           model_free(m), m->n_lru);
    EXPECT(m, st.evictions == m->evictions && st.prefix_hit_tokens == m->hit &&
              st.prefix_miss_tokens == m->miss,
           "evictions %" PRIu64 " hits %" PRIu64 " misses %" PRIu64 "; model %" PRIu64 " %" PRIu64
           " %" PRIu64, st.evictions, st.prefix_hit_tokens, st.prefix_miss_tokens, m->evictions,
           m->hit, m->miss);
}

/* ---- operations --------------------------------------------------------------------------- */

static int pick_seq(model *m, int want_len)
{
    int ids[MS], n = 0;
    for (int i = 0; i < MS; i++)
        if (m->seq[i].active && (!want_len || m->seq[i].len > 0)) ids[n++] = i;
    return n ? ids[rnd(m, n)] : -1;
}

static int pick_dead(model *m)
{
    int ids[MS], n = 0;
    for (int i = 0; i < MS; i++)
        if (!m->seq[i].active) ids[n++] = i;
    return n ? ids[rnd(m, n)] : MS + rnd(m, 3);
}

/* Tokens: mostly the continuation of stream s, sometimes a random token. */
static void gen_tokens(model *m, int s, int32_t *out, int from, int n)
{
    for (int i = 0; i < n; i++)
        out[i] = rnd(m, 20) ? m->stream[s][(from + i) % MAXT] : rnd(m, ALPHABET);
}

static int new_seq(model *m)
{
    int id = -1;
    kv_status st = kv_seq_new(m->kv, &id);
    int free_slots = 0;
    for (int i = 0; i < MS; i++) free_slots += !m->seq[i].active;
    if (!free_slots) {
        EXPECT(m, st == KV_ERR_NOSEQ, "kv_seq_new with no free slot: %s", kv_strerror(st));
        return -1;
    }
    EXPECT(m, st == KV_OK && id >= 0 && id < MS && !m->seq[id].active, "kv_seq_new: %s, id %d",
           kv_strerror(st), id);
    memset(&m->seq[id], 0, sizeof m->seq[id]);
    m->seq[id].active = 1;
    m->seq[id].stream = rnd(m, N_STREAMS);
    return id;
}

/* Append n tokens (given, or generated when given is NULL) and compute their K/V. */
static void op_append(model *m, int id, int n, const int32_t *given)
{
    mseq *s = &m->seq[id];
    if (s->len + n > MAXT) n = MAXT - s->len;
    int32_t t[MAXT];
    if (given) memcpy(t, given, (size_t)n * 4);
    else gen_tokens(m, s->stream, t, s->len, n);
    const int old_nb = n_blocks_for(s->len, BT), new_nb = n_blocks_for(s->len + n, BT);
    const int last = s->len / BT;
    const int cow = n > 0 && s->len % BT != 0 && (m->ref[s->blocks[last]] > 1 || m->node[s->blocks[last]] >= 0);
    const int need = new_nb - old_nb + cow, nfree = model_free(m);
    EXPECT(m, kv_blocks_needed(m->kv, id, n) == need, "kv_blocks_needed %d, model %d",
           kv_blocks_needed(m->kv, id, n), need);
    EXPECT(m, kv_can_append(m->kv, id, n) == (need <= nfree + m->n_lru), "kv_can_append");
    kv_status st = kv_seq_append(m->kv, id, t, n);
    if (need > nfree + m->n_lru) {
        EXPECT(m, st == KV_ERR_NOMEM, "append of %d needing %d blocks (free %d + %d): %s", n, need,
               nfree, m->n_lru, kv_strerror(st));
        m->n_nomem++;
        return;
    }
    EXPECT(m, st == KV_OK, "append of %d: %s", n, kv_strerror(st));
    const int32_t *bl = kv_seq_blocks(m->kv, id, NULL);
    /* the blocks taken: free ones first, then the k least recently released cached ones */
    int taken[MAXB + 1], nt = 0;
    if (cow) taken[nt++] = bl[last];
    for (int i = old_nb; i < new_nb; i++) taken[nt++] = bl[i];
    for (int i = 0; i < (cow ? last : old_nb); i++)
        EXPECT(m, bl[i] == s->blocks[i], "append changed table[%d]", i);
    const int k = need > nfree ? need - nfree : 0;
    int from_lru = 0;
    for (int i = 0; i < nt; i++) {
        int b = taken[i];
        for (int j = 0; j < i; j++) EXPECT(m, taken[j] != b, "block %d taken twice", b);
        int victim = 0;
        for (int j = 0; j < k; j++) victim |= m->lru[j] == b;
        EXPECT(m, victim || (m->ref[b] == 0 && m->node[b] < 0),
               "append took block %d: neither free nor among the %d LRU victims", b, k);
        from_lru += victim;
    }
    EXPECT(m, from_lru == k, "append evicted %d blocks, model %d", from_lru, k);
    for (int j = 0; j < k; j++) m->node[m->lru[j]] = -1;
    memmove(m->lru, m->lru + k, (size_t)(m->n_lru - k) * sizeof(int));
    m->n_lru -= k;
    m->evictions += (uint64_t)k;
    for (int i = 0; i < nt; i++) m->ref[taken[i]] = 1;
    if (cow) {
        m->n_cow++;
        int old = s->blocks[last];
        s->blocks[last] = bl[last];
        release(m, old);
    }
    for (int i = old_nb; i < new_nb; i++) s->blocks[i] = bl[i];
    memcpy(s->tok + s->len, t, (size_t)n * 4);
    int from = s->len;
    s->len += n;
    set_digests(s, from);
    compute(m, id, from);
}

static void op_truncate(model *m, int id, int n)
{
    mseq *s = &m->seq[id];
    EXPECT(m, kv_seq_truncate(m->kv, id, n) == KV_OK, "truncate to %d", n);
    for (int i = n_blocks_for(s->len, BT) - 1; i >= n_blocks_for(n, BT); i--) release(m, s->blocks[i]);
    s->len = n;
    if (s->n_chain > n / BT) s->n_chain = n / BT;
}

static void op_free(model *m, int id)
{
    mseq *s = &m->seq[id];
    EXPECT(m, kv_seq_free(m->kv, id) == KV_OK, "free %d", id);
    for (int i = n_blocks_for(s->len, BT) - 1; i >= 0; i--) release(m, s->blocks[i]);
    s->active = 0;
}

static void op_fork(model *m, int src)
{
    int id = -1, free_slots = 0;
    for (int i = 0; i < MS; i++) free_slots += !m->seq[i].active;
    kv_status st = kv_seq_fork(m->kv, src, &id);
    if (!free_slots) {
        EXPECT(m, st == KV_ERR_NOSEQ, "fork with no slot: %s", kv_strerror(st));
        return;
    }
    EXPECT(m, st == KV_OK && id >= 0 && id < MS && !m->seq[id].active, "fork: %s", kv_strerror(st));
    m->seq[id] = m->seq[src];
    for (int i = 0; i < n_blocks_for(m->seq[id].len, BT); i++) retain(m, m->seq[id].blocks[i]);
}

static void op_commit(model *m, int id, int n_valid)
{
    mseq *s = &m->seq[id];
    EXPECT(m, kv_seq_commit(m->kv, id, n_valid) == KV_OK, "commit %d", n_valid);
    for (int i = s->n_chain; i < n_valid / BT; i++) {
        long parent = i ? s->chain[i - 1] : -1;
        int b = s->blocks[i];
        if (m->node[b] >= 0) {
            s->chain[i] = m->node[b];
            continue;
        }
        int f = find_node(m, parent, s->tok + i * BT);
        if (f >= 0) {
            s->chain[i] = m->node[f];
            continue;
        }
        m->node[b] = m->next_node++;
        m->n_named++;
        m->node_parent[b] = parent;
        memcpy(m->node_tok[b], s->tok + i * BT, sizeof m->node_tok[b]);
        s->chain[i] = m->node[b];
    }
    if (n_valid / BT > s->n_chain) s->n_chain = n_valid / BT;
}

static void gen_prompt(model *m, int32_t *t, int n)
{
    int s = rnd(m, N_STREAMS);
    memcpy(t, m->stream[s], (size_t)n * 4);
    if (rnd(m, 3) == 0) t[rnd(m, n)] = rnd(m, ALPHABET); /* a mutation somewhere */
}

static void op_lookup(model *m)
{
    int32_t t[MAXT];
    int n = 1 + rnd(m, MAXT);
    gen_prompt(m, t, n);
    int want = model_walk(m, t, n, NULL) * BT, got = kv_prefix_lookup(m->kv, t, n);
    EXPECT(m, got == want, "lookup of %d tokens: %d cached, model %d", n, got, want);
}

static void op_attach(model *m)
{
    int id = new_seq(m);
    if (id < 0) return;
    int32_t t[MAXT], blocks[MAXB];
    int n = 1 + rnd(m, MAXT), got = -1;
    gen_prompt(m, t, n);
    int nb = model_walk(m, t, n, blocks);
    kv_status st = kv_prefix_attach(m->kv, id, t, n, &got);
    EXPECT(m, st == KV_OK && got == nb * BT, "attach of %d tokens: %s, %d cached, model %d", n,
           kv_strerror(st), got, nb * BT);
    mseq *s = &m->seq[id];
    for (int i = 0; i < nb; i++) {
        retain(m, blocks[i]);
        s->blocks[i] = blocks[i];
        s->chain[i] = m->node[blocks[i]];
    }
    s->len = nb * BT;
    s->n_chain = nb;
    memcpy(s->tok, t, (size_t)s->len * 4);
    set_digests(s, 0);
    m->hit += (uint64_t)s->len;
    m->miss += (uint64_t)(n - s->len);
    /* the engine then appends and computes the rest of the prompt */
    if (rnd(m, 2) && n > s->len) op_append(m, id, n - s->len, t + s->len);
}

/* Pack a random range of a sequence of A into a new sequence of B; compare. */
static void op_pack(model *m, int id)
{
    const mseq *s = &m->seq[id];
    int l0 = rnd(m, NL), nl = 1 + rnd(m, NL - l0);
    int h0 = B_HEAD0 + rnd(m, B_NH), nh = 1 + rnd(m, B_HEAD0 + B_NH - h0);
    int tok0 = 0, n_tok = s->len;
    if (rnd(m, 3) == 0) { /* a block-aligned range */
        tok0 = BT * rnd(m, s->len / BT + 1);
        n_tok = s->len - tok0;
    }
    size_t need = kv_pack_range_size(m->kv, l0, nl, h0, nh, n_tok);
    EXPECT(m, need >= sizeof(kv_pack_header), "kv_pack_range_size");
    if (tok0 == 0) EXPECT(m, need == kv_pack_size(m->kv, id, l0, nl, h0, nh), "kv_pack_size");
    unsigned char *buf = malloc(need + 16);
    EXPECT(m, buf != NULL, "malloc");
    memset(buf, 0x5a, need + 16);
    size_t wr = 1;
    if (rnd(m, 8) == 0) { /* too small */
        EXPECT(m, kv_pack_range(m->kv, id, l0, nl, h0, nh, tok0, n_tok, buf, need - 1, &wr) ==
                      KV_ERR_BUFSIZE && wr == 0, "pack into a short buffer");
        for (size_t i = 0; i < need + 16; i++) EXPECT(m, buf[i] == 0x5a, "short pack wrote byte %zu", i);
    }
    kv_status st = kv_pack_range(m->kv, id, l0, nl, h0, nh, tok0, n_tok, buf, need, &wr);
    EXPECT(m, st == KV_OK && wr == need, "pack: %s", kv_strerror(st));
    for (size_t i = need; i < need + 16; i++) EXPECT(m, buf[i] == 0x5a, "pack wrote past its size");
    int d = -1;
    EXPECT(m, kv_seq_new(m->kb, &d) == KV_OK, "pool B: seq_new");
    st = kv_seq_append(m->kb, d, s->tok, s->len);
    EXPECT(m, st == KV_OK, "pool B: append %d: %s", s->len, kv_strerror(st));
    if (rnd(m, 8) == 0 && s->len > 0) { /* the wrong length first: refused, B unchanged */
        EXPECT(m, kv_seq_truncate(m->kb, d, s->len - 1) == KV_OK, "pool B truncate");
        if (tok0 == 0)
            EXPECT(m, kv_unpack(m->kb, d, l0, nl, h0, nh, buf, wr) == KV_ERR_SHAPE, "unpack, wrong length");
        EXPECT(m, kv_unpack_range(m->kb, d, l0, nl, h0, nh, tok0, n_tok, buf, wr - 1) != KV_OK,
               "unpack of a cut buffer");
        EXPECT(m, kv_seq_append(m->kb, d, s->tok + s->len - 1, 1) == KV_OK, "pool B append");
    }
    st = kv_unpack_range(m->kb, d, l0, nl, h0, nh, tok0, n_tok, buf, wr);
    EXPECT(m, st == KV_OK, "unpack: %s", kv_strerror(st));
    float ka[NH * HD], va[NH * HD], kb[B_NH * HD], vb[B_NH * HD];
    for (int l = l0; l < l0 + nl; l++)
        for (int p = tok0; p < tok0 + n_tok; p++) {
            kv_load(m->kv, id, l, p, ka, va);
            kv_load(m->kb, d, l, p, kb, vb);
            for (int h = h0; h < h0 + nh; h++)
                for (int e = 0; e < HD; e++) {
                    float x = ka[h * HD + e], y = kb[(h - B_HEAD0) * HD + e];
                    float xv = va[h * HD + e], yv = vb[(h - B_HEAD0) * HD + e];
                    EXPECT(m, x == y && xv == yv, "pool B layer %d pos %d head %d: %g/%g vs %g/%g",
                           l, p, h, y, yv, x, xv);
                }
        }
    EXPECT(m, kv_seq_free(m->kb, d) == KV_OK, "pool B free");
    m->n_pack++;
    free(buf);
}

/* Calls that must fail and change nothing. */
static void op_errors(model *m)
{
    int dead = pick_dead(m), x = -5;
    int32_t t[4] = {1, 2, 3, 4};
    EXPECT(m, kv_seq_free(m->kv, dead) == KV_ERR_NOSEQ, "double free of %d", dead);
    EXPECT(m, kv_seq_fork(m->kv, dead, &x) == KV_ERR_NOSEQ && x == -5, "fork of freed %d", dead);
    EXPECT(m, kv_seq_append(m->kv, dead, t, 4) == KV_ERR_NOSEQ, "append to freed");
    EXPECT(m, kv_seq_truncate(m->kv, dead, 0) == KV_ERR_NOSEQ, "truncate freed");
    EXPECT(m, kv_seq_commit(m->kv, dead, 0) == KV_ERR_NOSEQ, "commit freed");
    EXPECT(m, kv_prefix_attach(m->kv, dead, t, 4, &x) == KV_ERR_NOSEQ, "attach freed");
    int id = pick_seq(m, 1);
    if (id < 0) return;
    const mseq *s = &m->seq[id];
    EXPECT(m, kv_seq_truncate(m->kv, id, s->len + 1) == KV_ERR_INVAL, "truncate past len");
    EXPECT(m, kv_seq_commit(m->kv, id, s->len + 1) == KV_ERR_INVAL, "commit past len");
    EXPECT(m, kv_prefix_attach(m->kv, id, t, 4, &x) == KV_ERR_INVAL, "attach to a non-empty seq");
    float k[NH * HD] = {0}, v[NH * HD] = {0};
    EXPECT(m, kv_store(m->kv, id, 0, s->len, k, v) == KV_ERR_INVAL, "store past len");
    /* a read-only position: shared or cached block */
    for (int p = 0; p < s->len; p++) {
        int b = s->blocks[p / BT];
        if (m->ref[b] > 1 || m->node[b] >= 0) {
            EXPECT(m, kv_store(m->kv, id, rnd(m, NL), p, k, v) == KV_ERR_INVAL,
                   "store into read-only block %d", b);
            break;
        }
    }
}

static void step(model *m)
{
    int r = rnd(m, 100), id;
    if (r < 28) {
        m->op = "append";
        id = pick_seq(m, 0);
        if (id < 0) id = new_seq(m);
        if (id >= 0) op_append(m, id, rnd(m, 4) ? 1 + rnd(m, 6) : 1 + rnd(m, 30), NULL);
    } else if (r < 36) {
        m->op = "new";
        new_seq(m);
    } else if (r < 44) {
        m->op = "fork";
        if ((id = pick_seq(m, 0)) >= 0) op_fork(m, id);
    } else if (r < 52) {
        m->op = "truncate";
        if ((id = pick_seq(m, 1)) >= 0) op_truncate(m, id, rnd(m, m->seq[id].len + 1));
    } else if (r < 62) {
        m->op = "free";
        if ((id = pick_seq(m, 0)) >= 0) op_free(m, id);
    } else if (r < 74) {
        m->op = "commit";
        if ((id = pick_seq(m, 1)) >= 0)
            op_commit(m, id, rnd(m, 2) ? m->seq[id].len : rnd(m, m->seq[id].len + 1));
    } else if (r < 80) {
        m->op = "lookup";
        op_lookup(m);
    } else if (r < 90) {
        m->op = "attach";
        op_attach(m);
    } else if (r < 95) {
        m->op = "pack";
        if ((id = pick_seq(m, 1)) >= 0) op_pack(m, id);
    } else {
        m->op = "errors";
        op_errors(m);
    }
}

static void run(dtype_t t, uint64_t seed, int steps, uint64_t hash_mask)
{
    model *m = calloc(1, sizeof *m);
    assert_non_null(m);
    m->dtype = t;
    m->seed = seed;
    m->base_seed = g_seed;
    m->rng = seed;
    m->op = "setup";
    kv_config ca = {.n_layers = NL, .n_kv_heads = NH, .head_dim = HD, .kv_head0 = 0,
                    .block_tokens = BT, .dtype = t, .max_seqs = MS};
    ca.budget_bytes = kv_block_bytes(&ca) * NB + kv_block_bytes(&ca) / 2;
    m->bt_b = t == DTYPE_I8 ? BT : 3; /* float data moves between block sizes */
    kv_config cb = {.n_layers = NL, .n_kv_heads = B_NH, .head_dim = HD, .kv_head0 = B_HEAD0,
                    .block_tokens = m->bt_b, .dtype = t, .max_seqs = 2};
    cb.budget_bytes = kv_block_bytes(&cb) * (MAXT / m->bt_b + 2);
    assert_int_equal(kv_new(&ca, &m->kv), KV_OK);
    assert_int_equal(kv_new(&cb, &m->kb), KV_OK);
    assert_int_equal(kv_n_blocks(m->kv), NB);
    kv_debug_hash_mask(m->kv, hash_mask);
    for (int b = 0; b < NB; b++) m->node[b] = -1;
    for (int s = 0; s < N_STREAMS; s++)
        for (int i = 0; i < MAXT; i++) m->stream[s][i] = rnd(m, ALPHABET);
    check_all(m);
    for (m->step = 0; m->step < steps; m->step++) {
        step(m);
        check_all(m);
    }
    for (int id = 0; id < MS; id++)
        if (m->seq[id].active) op_free(m, id);
    m->op = "teardown";
    check_all(m);
    EXPECT(m, model_used(m) == 0, "blocks still used after freeing everything");
    printf("  %s%s: %d steps: %d blocks named, %" PRIu64 " evicted, %" PRIu64 " prefix hit tokens, "
           "%d copy-on-write, %d out-of-blocks, %d pack/unpack\n", dtype_name(t),
           hash_mask == ~0ull ? "" : " (colliding hashes)", steps, m->n_named, m->evictions, m->hit,
           m->n_cow, m->n_nomem, m->n_pack);
    kv_destroy(&m->kv);
    kv_destroy(&m->kb);
    free(m);
}

static void test_random_f16(void **state) { (void)state; run(DTYPE_F16, g_seed, g_steps, ~0ull); }
static void test_random_f32(void **state) { (void)state; run(DTYPE_F32, g_seed + 1, g_steps / 3, ~0ull); }
static void test_random_bf16(void **state) { (void)state; run(DTYPE_BF16, g_seed + 2, g_steps / 3, ~0ull); }
static void test_random_i8(void **state) { (void)state; run(DTYPE_I8, g_seed + 3, g_steps / 3, ~0ull); }
/* 2-bit hashes: nearly every lookup meets colliding entries */
static void test_random_collisions(void **state) { (void)state; run(DTYPE_F16, g_seed + 4, g_steps / 2, 3); }

int main(void)
{
    const char *e = getenv("DUET_SEED");
    g_seed = e && *e ? strtoull(e, NULL, 0) : (uint64_t)time(NULL) ^ ((uint64_t)clock() << 32);
    const char *n = getenv("DUET_STEPS");
    g_steps = n && *n ? atoi(n) : 4000;
    if (g_steps < 3) g_steps = 3;
    printf("test_kv_random: seed %" PRIu64 " (replay with DUET_SEED=%" PRIu64 "), %d steps\n",
           g_seed, g_seed, g_steps);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_random_f16),
        cmocka_unit_test(test_random_f32),
        cmocka_unit_test(test_random_bf16),
        cmocka_unit_test(test_random_i8),
        cmocka_unit_test(test_random_collisions),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
