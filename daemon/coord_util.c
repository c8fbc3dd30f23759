/* daemon/coord_util.c: the coordinator's small data structures: a multimap, the prefix
 * index, block hashes, SHA-256 and the clock. */
#include "daemon/coord_int.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <openssl/evp.h>

double coord_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

uint64_t coord_mix64(uint64_t x)
{
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ULL;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebULL;
    x ^= x >> 31;
    return x;
}

uint64_t coord_hash_bytes(const void *p, size_t n)
{
    const unsigned char *b = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++) {
        h ^= b[i];
        h *= 0x100000001b3ULL;
    }
    return coord_mix64(h ^ n);
}

int coord_sha256_hex(const void *data, size_t n, char hex[65])
{
    unsigned char md[EVP_MAX_MD_SIZE];
    unsigned int len = 0;
    EVP_MD_CTX *ctx = EVP_MD_CTX_new();
    if (!ctx) return -1;
    int ok = EVP_DigestInit_ex(ctx, EVP_sha256(), NULL) == 1;
    /* EVP_DigestUpdate takes size_t, but feed it in pieces to keep each call modest */
    const unsigned char *p = data;
    while (ok && n > 0) {
        size_t k = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ok = EVP_DigestUpdate(ctx, p, k) == 1;
        p += k;
        n -= k;
    }
    ok = ok && EVP_DigestFinal_ex(ctx, md, &len) == 1 && len == 32;
    EVP_MD_CTX_free(ctx);
    if (!ok) return -1;
    static const char digits[] = "0123456789abcdef";
    for (int i = 0; i < 32; i++) {
        hex[2 * i] = digits[md[i] >> 4];
        hex[2 * i + 1] = digits[md[i] & 15];
    }
    hex[64] = 0;
    return 0;
}

int coord_block_hashes(const int32_t *tokens, int n, int bt, uint64_t *out, int max)
{
    if (bt <= 0 || n <= 0) return 0;
    int nb = n / bt;
    if (nb > max) nb = max;
    uint64_t h = 0x6475657470726678ULL; /* the chain's root */
    for (int b = 0; b < nb; b++) {
        uint64_t x = h;
        for (int i = 0; i < bt; i++) {
            x ^= (uint32_t)tokens[b * bt + i];
            x *= 0x100000001b3ULL;
        }
        h = coord_mix64(x ^ h);
        out[b] = h ? h : 1; /* 0 marks an empty slot of cpfx */
    }
    return nb;
}

/* ---- cmap ---------------------------------------------------------------------------------- */

static size_t slot_of(uint64_t key, size_t cap) { return (size_t)coord_mix64(key) & (cap - 1); }

static int cmap_grow(cmap *m)
{
    size_t ncap = m->cap ? m->cap * 2 : 64;
    uint64_t *keys = calloc(ncap, sizeof *keys);
    void **vals = calloc(ncap, sizeof *vals);
    if (!keys || !vals) {
        free(keys);
        free(vals);
        return -1;
    }
    for (size_t i = 0; i < m->cap; i++) {
        if (!m->vals[i]) continue;
        size_t j = slot_of(m->keys[i], ncap);
        while (vals[j]) j = (j + 1) & (ncap - 1);
        keys[j] = m->keys[i];
        vals[j] = m->vals[i];
    }
    free(m->keys);
    free(m->vals);
    m->keys = keys;
    m->vals = vals;
    m->cap = ncap;
    return 0;
}

int cmap_put(cmap *m, uint64_t key, void *val)
{
    if (!val) return -1;
    if ((m->n + 1) * 4 > m->cap * 3 && cmap_grow(m) != 0) return -1;
    size_t j = slot_of(key, m->cap);
    while (m->vals[j]) j = (j + 1) & (m->cap - 1);
    m->keys[j] = key;
    m->vals[j] = val;
    m->n++;
    return 0;
}

void *cmap_find(const cmap *m, uint64_t key, int (*match)(const void *val, const void *arg),
                const void *arg)
{
    if (!m->cap) return NULL;
    for (size_t j = slot_of(key, m->cap); m->vals[j]; j = (j + 1) & (m->cap - 1))
        if (m->keys[j] == key && (!match || match(m->vals[j], arg))) return m->vals[j];
    return NULL;
}

void cmap_del(cmap *m, uint64_t key, const void *val)
{
    if (!m->cap) return;
    size_t mask = m->cap - 1, j = slot_of(key, m->cap);
    while (m->vals[j] && !(m->keys[j] == key && m->vals[j] == val)) j = (j + 1) & mask;
    if (!m->vals[j]) return;
    /* backward-shift: move later entries of the run into the hole when their home allows */
    size_t hole = j;
    for (size_t k = (j + 1) & mask; m->vals[k]; k = (k + 1) & mask) {
        size_t home = slot_of(m->keys[k], m->cap);
        /* k's entry may move to hole when home is not in (hole, k] cyclically */
        int between = hole <= k ? (home > hole && home <= k) : (home > hole || home <= k);
        if (!between) {
            m->keys[hole] = m->keys[k];
            m->vals[hole] = m->vals[k];
            hole = k;
        }
    }
    m->vals[hole] = NULL;
    m->keys[hole] = 0;
    m->n--;
}

void cmap_free(cmap *m)
{
    free(m->keys);
    free(m->vals);
    memset(m, 0, sizeof *m);
}

/* ---- cpfx ---------------------------------------------------------------------------------- */

static int cpfx_rehash(cpfx *p, size_t ncap, uint64_t min_tick)
{
    uint64_t *keys = calloc(ncap, sizeof *keys), *ticks = calloc(ncap, sizeof *ticks);
    if (!keys || !ticks) {
        free(keys);
        free(ticks);
        return -1;
    }
    size_t n = 0;
    for (size_t i = 0; i < p->cap; i++) {
        if (!p->keys[i] || p->ticks[i] < min_tick) continue;
        size_t j = slot_of(p->keys[i], ncap);
        while (keys[j]) j = (j + 1) & (ncap - 1);
        keys[j] = p->keys[i];
        ticks[j] = p->ticks[i];
        n++;
    }
    free(p->keys);
    free(p->ticks);
    p->keys = keys;
    p->ticks = ticks;
    p->cap = ncap;
    p->n = n;
    return 0;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* Forget the least recently used half. */
static int cpfx_evict(cpfx *p)
{
    uint64_t *t = malloc(p->n * sizeof *t);
    if (!t) return -1;
    size_t k = 0;
    for (size_t i = 0; i < p->cap; i++)
        if (p->keys[i]) t[k++] = p->ticks[i];
    qsort(t, k, sizeof *t, cmp_u64);
    uint64_t median = k ? t[k / 2] : 0;
    free(t);
    return cpfx_rehash(p, p->cap, median);
}

int cpfx_add(cpfx *p, const uint64_t *hashes, int n)
{
    if (p->limit == 0) p->limit = 4096;
    for (int i = 0; i < n; i++) {
        if (p->n >= p->limit && cpfx_evict(p) != 0) return -1;
        if ((p->n + 1) * 2 > p->cap && cpfx_rehash(p, p->cap ? p->cap * 2 : 256, 0) != 0)
            return -1;
        p->tick++;
        size_t j = slot_of(hashes[i], p->cap);
        while (p->keys[j] && p->keys[j] != hashes[i]) j = (j + 1) & (p->cap - 1);
        if (!p->keys[j]) {
            p->keys[j] = hashes[i];
            p->n++;
        }
        p->ticks[j] = p->tick;
    }
    return 0;
}

int cpfx_match(const cpfx *p, const uint64_t *hashes, int n)
{
    if (!p->cap) return 0;
    int k = 0;
    for (; k < n; k++) {
        size_t j = slot_of(hashes[k], p->cap);
        while (p->keys[j] && p->keys[j] != hashes[k]) j = (j + 1) & (p->cap - 1);
        if (!p->keys[j]) break;
    }
    return k;
}

void cpfx_clear(cpfx *p)
{
    if (p->cap) {
        memset(p->keys, 0, p->cap * sizeof *p->keys);
        memset(p->ticks, 0, p->cap * sizeof *p->ticks);
    }
    p->n = 0;
}

void cpfx_free(cpfx *p)
{
    free(p->keys);
    free(p->ticks);
    p->keys = p->ticks = NULL;
    p->cap = p->n = 0;
}
