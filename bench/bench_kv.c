/* bench/bench_kv.c: KV cache throughput: block allocation, commit, prefix lookup and attach
 * (ops/s), and pack/unpack bandwidth (GB/s) beside a plain memcpy of the same bytes.
 *
 * Shapes: SmolLM2-135M (30 layers, 3 KV heads, head_dim 64) and a Llama-3-8B-like worker
 * (32 layers, 8 KV heads, head_dim 128), f16 (and int8 for SmolLM2), 16 tokens per block.
 * Every figure is the best of several runs; single thread.
 *
 *   bench_kv            the tables
 *   bench_kv quick      smaller sequences (a smoke test) */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "kv/kv.h"

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void die(const char *what, kv_status s)
{
    fprintf(stderr, "bench_kv: %s: %s\n", what, kv_strerror(s));
    exit(1);
}

#define CHECK(call, what)                     \
    do {                                      \
        kv_status s_ = (call);                \
        if (s_ != KV_OK) die((what), s_);     \
    } while (0)

static kv_cache_t *make(int n_layers, int n_heads, int head_dim, dtype_t t, int n_blocks)
{
    kv_config c = {.n_layers = n_layers, .n_kv_heads = n_heads, .head_dim = head_dim,
                   .block_tokens = 16, .dtype = t, .max_seqs = 4096};
    c.budget_bytes = kv_block_bytes(&c) * (size_t)n_blocks;
    kv_cache_t *kv = NULL;
    CHECK(kv_new(&c, &kv), "kv_new");
    return kv;
}

static void tokens(int32_t *t, int n, uint32_t seed)
{
    for (int i = 0; i < n; i++) {
        seed = seed * 1664525u + 1013904223u;
        t[i] = (int32_t)(seed >> 12) % 49152;
    }
}

static void row_ops(const char *op, const char *detail, double n_ops, double secs)
{
    printf("| %s | %s | %.2f M | %.0f |\n", op, detail, n_ops / secs / 1e6, secs / n_ops * 1e9);
}

/* ---- metadata operations ------------------------------------------------------------------- */

static void bench_ops(int quick)
{
    const int NBLK = 4096, BT = 16, reps = quick ? 2 : 5;
    kv_cache_t *kv = make(30, 3, 64, DTYPE_F16, NBLK);
    int32_t *tok = malloc((size_t)NBLK * BT * sizeof *tok);
    tokens(tok, NBLK * BT, 1);
    printf("| operation | detail | Mops/s | ns/op |\n|---|---|---:|---:|\n");

    double best = 1e30, best_free = 1e30;
    for (int r = 0; r < reps; r++) { /* one block per append */
        int s;
        CHECK(kv_seq_new(kv, &s), "seq_new");
        double t0 = now();
        for (int i = 0; i < NBLK; i++) CHECK(kv_seq_append(kv, s, tok + i * BT, BT), "append");
        double t1 = now();
        CHECK(kv_seq_free(kv, s), "free");
        double t2 = now();
        if (t1 - t0 < best) best = t1 - t0;
        if (t2 - t1 < best_free) best_free = t2 - t1;
    }
    row_ops("append 16 tokens", "takes 1 block each, 4096 blocks", NBLK, best);
    row_ops("free", "per block released (4096-block sequence)", NBLK, best_free);

    best = 1e30;
    for (int r = 0; r < reps; r++) { /* decode: 1 token per append */
        int s;
        CHECK(kv_seq_new(kv, &s), "seq_new");
        const int n = NBLK * BT / 4;
        double t0 = now();
        for (int i = 0; i < n; i++) CHECK(kv_seq_append(kv, s, tok + i, 1), "append");
        double t1 = now();
        CHECK(kv_seq_free(kv, s), "free");
        if ((t1 - t0) / n < best) best = (t1 - t0) / n;
    }
    row_ops("append 1 token", "decode step; a block every 16th", 1, best);

    /* fork of a 2048-token (128-block) sequence, and free of the fork */
    best = 1e30;
    {
        int s;
        CHECK(kv_seq_new(kv, &s), "seq_new");
        CHECK(kv_seq_append(kv, s, tok, 2048), "append");
        for (int r = 0; r < reps; r++) {
            int f[256];
            double t0 = now();
            for (int i = 0; i < 256; i++) CHECK(kv_seq_fork(kv, s, &f[i]), "fork");
            for (int i = 0; i < 256; i++) CHECK(kv_seq_free(kv, f[i]), "free");
            double t1 = now();
            if ((t1 - t0) / 256 < best) best = (t1 - t0) / 256;
        }
        CHECK(kv_seq_free(kv, s), "free");
    }
    row_ops("fork + free", "2048-token sequence (128 blocks)", 1, best);

    /* commit: hash 16 tokens and insert, per block; a new cache each run */
    best = 1e30;
    double best_lookup = 1e30, best_attach = 1e30, best_miss = 1e30, best_evict = 1e30;
    const int n_prompts = 16, plen = 2048; /* 16 prompts x 128 blocks = 2048 cached blocks */
    for (int r = 0; r < reps; r++) {
        kv_cache_t *c = make(30, 3, 64, DTYPE_F16, NBLK);
        int seqs[16];
        for (int p = 0; p < n_prompts; p++) {
            CHECK(kv_seq_new(c, &seqs[p]), "seq_new");
            CHECK(kv_seq_append(c, seqs[p], tok + p * plen, plen), "append");
        }
        double t0 = now();
        for (int p = 0; p < n_prompts; p++) CHECK(kv_seq_commit(c, seqs[p], plen), "commit");
        double t1 = now();
        if ((t1 - t0) / (n_prompts * plen / BT) < best) best = (t1 - t0) / (n_prompts * plen / BT);
        for (int p = 0; p < n_prompts; p++) CHECK(kv_seq_free(c, seqs[p]), "free");
        /* lookup of a fully cached 2048-token prompt (128 blocks) */
        const int nl = 2000;
        t0 = now();
        int sum = 0;
        for (int i = 0; i < nl; i++) sum += kv_prefix_lookup(c, tok + (i % n_prompts) * plen, plen);
        t1 = now();
        if (sum != nl * plen) {
            fprintf(stderr, "bench_kv: lookup found %d tokens, expected %d\n", sum, nl * plen);
            exit(1);
        }
        if ((t1 - t0) / nl < best_lookup) best_lookup = (t1 - t0) / nl;
        /* a miss at block 0 */
        t0 = now();
        for (int i = 0; i < nl * 50; i++) sum += kv_prefix_lookup(c, tok + 3 + i % 64, plen);
        t1 = now();
        if ((t1 - t0) / (nl * 50) < best_miss) best_miss = (t1 - t0) / (nl * 50);
        /* attach (+ free) of the whole prompt */
        t0 = now();
        for (int i = 0; i < nl; i++) {
            int s, got;
            CHECK(kv_seq_new(c, &s), "seq_new");
            CHECK(kv_prefix_attach(c, s, tok + (i % n_prompts) * plen, plen, &got), "attach");
            CHECK(kv_seq_free(c, s), "free");
        }
        t1 = now();
        if ((t1 - t0) / nl < best_attach) best_attach = (t1 - t0) / nl;
        /* eviction: the free list is exhausted, every block comes from the LRU list */
        int big;
        CHECK(kv_seq_new(c, &big), "seq_new");
        CHECK(kv_seq_append(c, big, tok, (NBLK - n_prompts * plen / BT) * BT), "append");
        t0 = now();
        int ev;
        CHECK(kv_seq_new(c, &ev), "seq_new");
        for (int i = 0; i < n_prompts * plen / BT; i++) CHECK(kv_seq_append(c, ev, tok + i * BT, BT), "append");
        t1 = now();
        if ((t1 - t0) / (n_prompts * plen / BT) < best_evict) best_evict = (t1 - t0) / (n_prompts * plen / BT);
        kv_destroy(&c);
    }
    row_ops("append 16 tokens, evicting", "free list empty: LRU victim, unhashed", 1, best_evict);
    row_ops("commit", "per block: chained hash of 16 tokens + insert", 1, best);
    row_ops("prefix lookup, hit", "2048 tokens, 128 cached blocks", 1, best_lookup);
    printf("| prefix lookup, hit | per block of the above | %.2f M | %.0f |\n",
           128 / best_lookup / 1e6, best_lookup / 128 * 1e9);
    row_ops("prefix lookup, miss", "2048 tokens, no first block", 1, best_miss);
    row_ops("prefix attach + free", "2048 tokens, 128 cached blocks", 1, best_attach);
    kv_destroy(&kv);
    free(tok);
}

/* ---- pack / unpack ------------------------------------------------------------------------ */

typedef struct {
    const char *name;
    int n_layers, n_heads, head_dim;
    dtype_t dtype;
    int n_tok;
} shape;

static double best_of(int reps, double (*fn)(void *), void *arg)
{
    double b = 1e30;
    for (int r = 0; r < reps; r++) {
        double t = fn(arg);
        if (t < b) b = t;
    }
    return b;
}

typedef struct {
    kv_cache_t *src, *dst;
    int ss, ds;
    int layer0, n_layers, head0, n_heads, per_layer;
    unsigned char *buf, *buf2;
    size_t bytes;
} job;

static double do_pack(void *p)
{
    job *j = p;
    double t0 = now();
    if (j->per_layer) {
        size_t off = 0, w;
        for (int l = j->layer0; l < j->layer0 + j->n_layers; l++) {
            CHECK(kv_pack(j->src, j->ss, l, 1, j->head0, j->n_heads, j->buf + off, j->bytes - off, &w), "pack");
            off += w;
        }
    } else {
        CHECK(kv_pack(j->src, j->ss, j->layer0, j->n_layers, j->head0, j->n_heads, j->buf, j->bytes, NULL), "pack");
    }
    return now() - t0;
}

static double do_unpack(void *p)
{
    job *j = p;
    double t0 = now();
    if (j->per_layer) {
        size_t off = 0;
        for (int l = j->layer0; l < j->layer0 + j->n_layers; l++) {
            size_t w = kv_pack_size(j->dst, j->ds, l, 1, j->head0, j->n_heads);
            CHECK(kv_unpack(j->dst, j->ds, l, 1, j->head0, j->n_heads, j->buf + off, w), "unpack");
            off += w;
        }
    } else {
        CHECK(kv_unpack(j->dst, j->ds, j->layer0, j->n_layers, j->head0, j->n_heads, j->buf, j->bytes), "unpack");
    }
    return now() - t0;
}

static double do_memcpy(void *p)
{
    job *j = p;
    double t0 = now();
    memcpy(j->buf2, j->buf, j->bytes);
    double t = now() - t0;
    __asm__ volatile("" ::"r"(j->buf2) : "memory");
    return t;
}

/* One contiguous copy with non-temporal (streaming) stores, what kv_pack/kv_unpack use for
 * large transfers: the best a single thread can do for bytes that leave the caches. */
static double do_stream(void *p)
{
    job *j = p;
    double t0 = now();
#if defined(__SSE2__)
    __m128i *d = (__m128i *)j->buf2;
    const __m128i *s = (const __m128i *)j->buf;
    size_t n64 = j->bytes / 64;
    for (size_t i = 0; i < n64; i++, d += 4, s += 4) {
        __m128i a = _mm_loadu_si128(s), b = _mm_loadu_si128(s + 1);
        __m128i c = _mm_loadu_si128(s + 2), e = _mm_loadu_si128(s + 3);
        _mm_stream_si128(d, a);
        _mm_stream_si128(d + 1, b);
        _mm_stream_si128(d + 2, c);
        _mm_stream_si128(d + 3, e);
    }
    memcpy(d, s, j->bytes % 64);
    _mm_sfence();
#else
    memcpy(j->buf2, j->buf, j->bytes);
#endif
    double t = now() - t0;
    __asm__ volatile("" ::"r"(j->buf2) : "memory");
    return t;
}

static void bench_pack(const shape *sh, int quick)
{
    const int BT = 16, nb = (sh->n_tok + BT - 1) / BT, reps = quick ? 2 : 15;
    kv_cache_t *src = make(sh->n_layers, sh->n_heads, sh->head_dim, sh->dtype, nb);
    kv_cache_t *dst = make(sh->n_layers, sh->n_heads, sh->head_dim, sh->dtype, nb);
    int32_t *tok = malloc((size_t)sh->n_tok * sizeof *tok);
    tokens(tok, sh->n_tok, 7);
    job j = {.src = src, .dst = dst};
    CHECK(kv_seq_new(src, &j.ss), "seq_new");
    CHECK(kv_seq_new(dst, &j.ds), "seq_new");
    CHECK(kv_seq_append(src, j.ss, tok, sh->n_tok), "append");
    CHECK(kv_seq_append(dst, j.ds, tok, sh->n_tok), "append");
    /* scatter the sequence over the pool the way a busy cache would: reverse the free order
     * is not possible through the API, so blocks stay in allocation order; fill the data */
    const kv_config *c = kv_config_of(src);
    size_t layer_bytes = (size_t)nb * c->n_kv_heads * BT * c->head_dim *
                         (sh->dtype == DTYPE_F16 ? 2 : sh->dtype == DTYPE_I8 ? 1 : 4);
    for (int l = 0; l < c->n_layers; l++) {
        memset(kv_k_layer(src, l), 0x11 + l, layer_bytes);
        memset(kv_v_layer(src, l), 0x22 + l, layer_bytes);
        memset(kv_k_layer(dst, l), 0, layer_bytes);
        memset(kv_v_layer(dst, l), 0, layer_bytes);
    }
    struct { const char *what; int head0, n_heads, per_layer; } cases[] = {
        {"all layers, all heads", 0, sh->n_heads, 0},
        {"layer by layer, all heads", 0, sh->n_heads, 1},
        {"all layers, half the heads (TP 2 re-shard)", 0, sh->n_heads / 2 ? sh->n_heads / 2 : 1, 0},
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        if (k == 2 && sh->n_heads % 2) cases[k].n_heads = 1, cases[k].what = "all layers, 1 head (TP re-shard)";
        j.layer0 = 0;
        j.n_layers = sh->n_layers;
        j.head0 = cases[k].head0;
        j.n_heads = cases[k].n_heads;
        j.per_layer = cases[k].per_layer;
        j.bytes = j.per_layer ? (size_t)sh->n_layers * kv_pack_size(src, j.ss, 0, 1, j.head0, j.n_heads)
                              : kv_pack_size(src, j.ss, 0, sh->n_layers, j.head0, j.n_heads);
        j.buf = malloc(j.bytes);
        j.buf2 = malloc(j.bytes);
        memset(j.buf, 1, j.bytes);
        memset(j.buf2, 2, j.bytes);
        do_pack(&j); /* warm up */
        double tp = best_of(reps, do_pack, &j);
        double tu = best_of(reps, do_unpack, &j);
        double tm = best_of(reps, do_memcpy, &j);
        double ts = best_of(reps, do_stream, &j);
        double tbest = tm < ts ? tm : ts;
        /* check the round trip on the first case */
        if (k == 0) {
            unsigned char *again = malloc(j.bytes);
            kv_pack(dst, j.ds, 0, sh->n_layers, 0, sh->n_heads, again, j.bytes, NULL);
            if (memcmp(again, j.buf, j.bytes) != 0) {
                fprintf(stderr, "bench_kv: pack/unpack round trip differs\n");
                exit(1);
            }
            free(again);
        }
        const double gb = (double)j.bytes / 1e9;
        printf("| %s | %s | %d | %s | %.1f | %.2f | %.2f | %.2f | %.2f | %.0f%% / %.0f%% |\n",
               sh->name, dtype_name(sh->dtype), sh->n_tok, cases[k].what,
               (double)j.bytes / (1 << 20), gb / tp, gb / tu, gb / tm, gb / ts,
               100 * tbest / tp, 100 * tbest / tu);
        free(j.buf);
        free(j.buf2);
    }
    kv_destroy(&src);
    kv_destroy(&dst);
    free(tok);
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "quick") == 0;
    printf("KV cache metadata operations (SmolLM2-135M shape, f16, 16 tokens per block, "
           "4096-block pool; best of runs, one thread)\n\n");
    bench_ops(quick);
    printf("\nPack / unpack bandwidth (bytes moved per second). Baselines move the same bytes "
           "between two contiguous buffers: glibc memcpy, and a loop of streaming "
           "(non-temporal) stores, which is what pack/unpack use from 1 MiB up. Last column: "
           "pack and unpack speed as a share of the faster baseline.\n\n");
    printf("| shape | type | tokens | range | MiB | pack GB/s | unpack GB/s | memcpy GB/s | "
           "stream copy GB/s | pack / unpack of best copy |\n"
           "|---|---|---:|---|---:|---:|---:|---:|---:|---:|\n");
    const shape shapes[] = {
        {"SmolLM2-135M (30 L, 3 KV heads, d 64)", 30, 3, 64, DTYPE_F16, quick ? 256 : 4096},
        {"SmolLM2-135M (30 L, 3 KV heads, d 64)", 30, 3, 64, DTYPE_I8, quick ? 256 : 4096},
        {"Llama-8B-like (32 L, 8 KV heads, d 128)", 32, 8, 128, DTYPE_F16, quick ? 256 : 2048},
    };
    for (size_t i = 0; i < sizeof shapes / sizeof shapes[0]; i++) bench_pack(&shapes[i], quick);
    return 0;
}
