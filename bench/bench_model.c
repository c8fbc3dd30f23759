/* bench/bench_model.c: duet's CPU engine on a GGUF model: prefill and decode speed.
 *
 * The workloads (the same as bench/llamacpp_peer.py's, so the two compare):
 *   prefill N   one prompt of N random token ids in [1000, 20000) (seed 42), one batch
 *   decode B    B sequences, each a 16-token prompt (not timed), then 128 steps of all B
 *               in one batch, logits for every sequence; the tokens fed are random too (as
 *               in bench/llamacpp_peer.py: nothing is sampled, so the work does not depend on
 *               what the model predicts); tokens/s = B * 128 / time of the steps
 * Each figure is the median of --reps runs. Also: peak resident memory, the weight bytes
 * read per decode step, this machine's read bandwidth with the same threads, and so the
 * decode limit (bandwidth / bytes per token).
 *
 *   bench_model -m MODEL.gguf [-t THREADS] [--reps N] [--json]
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>

#include "kernels/pool.h"
#include "kv/kv.h"
#include "worker/model.h"

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double median(double *v, int n)
{
    qsort(v, (size_t)n, sizeof *v, cmp_d);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static void rand_ids(int32_t *ids, int n, uint64_t *state)
{
    for (int i = 0; i < n; i++) {
        *state = *state * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = 1000 + (int32_t)((*state >> 33) % 19000);
    }
}

typedef struct {
    const model_t *m;
    model_ctx_t *ctx;
    float *logits;
} bench;

static kv_cache_t *fresh_kv(const model_t *m, int tokens)
{
    kv_config kc = model_kv_config(m, DTYPE_F16, 0);
    size_t per_tok = (size_t)2 * kc.n_layers * kc.n_kv_heads * kc.head_dim * 2;
    kc.budget_bytes = per_tok * (size_t)(tokens + 64);
    kv_cache_t *kv = NULL;
    return kv_new(&kc, &kv) == KV_OK ? kv : NULL;
}

static double run_prefill(bench *b, int n, uint64_t seed)
{
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    rand_ids(ids, n, &seed);
    kv_cache_t *kv = fresh_kv(b->m, n);
    int seq;
    char err[256];
    double t = -1;
    if (kv && kv_seq_new(kv, &seq) == KV_OK && kv_seq_append(kv, seq, ids, n) == KV_OK) {
        model_seq_batch sb = {.seq = seq, .pos0 = 0, .n_tokens = n, .tokens = ids, .logits = 1};
        double t0 = now_s();
        if (model_forward(b->ctx, b->m, kv, &sb, 1, b->logits, err, sizeof err) == 0)
            t = now_s() - t0;
        else
            fprintf(stderr, "bench_model: %s\n", err);
    }
    kv_destroy(&kv);
    free(ids);
    return t;
}

static double run_decode(bench *b, int n_seq, int steps, uint64_t seed)
{
    enum { PROMPT = 16 };
    kv_cache_t *kv = fresh_kv(b->m, n_seq * (PROMPT + steps + 16));
    int32_t *ids = malloc((size_t)n_seq * (PROMPT + steps) * sizeof *ids);
    model_seq_batch *sb = calloc((size_t)n_seq, sizeof *sb);
    int *seq = calloc((size_t)n_seq, sizeof *seq);
    char err[256];
    double t = -1;
    if (!kv) goto out;
    for (int s = 0; s < n_seq; s++) {
        int32_t *p = ids + (size_t)s * (PROMPT + steps);
        rand_ids(p, PROMPT, &seed);
        if (kv_seq_new(kv, &seq[s]) != KV_OK || kv_seq_append(kv, seq[s], p, PROMPT) != KV_OK) goto out;
        sb[s] = (model_seq_batch){.seq = seq[s], .pos0 = 0, .n_tokens = PROMPT, .tokens = p, .logits = 1};
    }
    if (model_forward(b->ctx, b->m, kv, sb, n_seq, b->logits, err, sizeof err) != 0) goto fail;
    double t0 = now_s();
    for (int step = 0; step < steps; step++) {
        for (int s = 0; s < n_seq; s++) {
            int32_t *p = ids + (size_t)s * (PROMPT + steps);
            int pos = PROMPT + step;
            rand_ids(&p[pos], 1, &seed);
            if (kv_seq_append(kv, seq[s], &p[pos], 1) != KV_OK) goto out;
            sb[s] = (model_seq_batch){.seq = seq[s], .pos0 = pos, .n_tokens = 1, .tokens = &p[pos],
                                      .logits = 1};
        }
        if (model_forward(b->ctx, b->m, kv, sb, n_seq, b->logits, err, sizeof err) != 0) goto fail;
    }
    t = now_s() - t0;
    goto out;
fail:
    fprintf(stderr, "bench_model: %s\n", err);
out:
    kv_destroy(&kv);
    free(ids);
    free(sb);
    free(seq);
    return t;
}

/* Read bandwidth: every thread sums its part of a 512 MiB buffer. */
typedef struct {
    const uint64_t *buf;
    size_t n;
    uint64_t sums[64];
} bw_job;

static void bw_task(void *p, int ith, int nth)
{
    bw_job *j = p;
    size_t a = j->n * (size_t)ith / (size_t)nth, e = j->n * (size_t)(ith + 1) / (size_t)nth;
    uint64_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    for (size_t i = a; i + 4 <= e; i += 4) {
        s0 += j->buf[i];
        s1 += j->buf[i + 1];
        s2 += j->buf[i + 2];
        s3 += j->buf[i + 3];
    }
    j->sums[ith % 64] = s0 + s1 + s2 + s3;
}

static double read_bandwidth(pool_t *pool)
{
    const size_t bytes = (size_t)512 << 20;
    uint64_t *buf = malloc(bytes);
    if (!buf) return 0;
    memset(buf, 1, bytes);
    bw_job j = {.buf = buf, .n = bytes / 8};
    double best = 0;
    for (int r = 0; r < 5; r++) {
        double t0 = now_s();
        pool_run(pool, bw_task, &j);
        double gbs = bytes / (now_s() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    free(buf);
    return best;
}

int main(int argc, char **argv)
{
    const char *path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    int threads = 1, reps = 3, json = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "-m") && i + 1 < argc) path = argv[++i];
        else if (!strcmp(argv[i], "-t") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--reps") && i + 1 < argc) reps = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--json")) json = 1;
        else {
            fprintf(stderr, "usage: bench_model -m MODEL.gguf [-t THREADS] [--reps N] [--json]\n");
            return 2;
        }
    }
    if (threads < 1 || reps < 1 || reps > 64) return 2;
    char err[512];
    model_t *m = NULL;
    if (model_load(path, 0, 1, &m, err, sizeof err) != 0) {
        fprintf(stderr, "bench_model: %s (run 'make model' for the default model)\n", err);
        return 1;
    }
    bench b = {.m = m};
    const int V = model_hparams_of(m)->n_vocab;
    if (model_ctx_new(m, 512, threads, &b.ctx) != 0 ||
        !(b.logits = malloc((size_t)8 * V * sizeof(float)))) {
        fprintf(stderr, "bench_model: out of memory\n");
        return 1;
    }
    double v[64], pf128, pf512, dec1, dec8;
    run_prefill(&b, 64, 1); /* warm up: page the weights in */
    for (int r = 0; r < reps; r++) v[r] = 128 / run_prefill(&b, 128, 42 + r);
    pf128 = median(v, reps);
    for (int r = 0; r < reps; r++) v[r] = 512 / run_prefill(&b, 512, 42 + r);
    pf512 = median(v, reps);
    for (int r = 0; r < reps; r++) v[r] = 128 / run_decode(&b, 1, 128, 7 + r);
    dec1 = median(v, reps);
    for (int r = 0; r < reps; r++) v[r] = 8 * 128 / run_decode(&b, 8, 128, 7 + r);
    dec8 = median(v, reps);
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double rss_mib = ru.ru_maxrss / 1024.0;
    double gbs = read_bandwidth(model_ctx_pool(b.ctx));
    double bytes_tok = (double)model_weight_bytes(m);
    double limit = gbs * 1e9 / bytes_tok;
    if (json)
        printf("{\"engine\":\"duet\",\"threads\":%d,\"prefill128\":%.1f,\"prefill512\":%.1f,"
               "\"decode_b1\":%.1f,\"decode_b8\":%.1f,\"peak_rss_mib\":%.1f,"
               "\"read_gbs\":%.2f,\"weight_bytes\":%.0f,\"decode_limit\":%.1f}\n",
               threads, pf128, pf512, dec1, dec8, rss_mib, gbs, bytes_tok, limit);
    else
        printf("| duet | %d | %.1f | %.1f | %.1f | %.1f | %.0f | %.1f GB/s, %.1f MB/token: %.0f tok/s |\n",
               threads, pf128, pf512, dec1, dec8, rss_mib, gbs, bytes_tok / 1e6, limit);
    free(b.logits);
    model_ctx_destroy(&b.ctx);
    model_destroy(&m);
    return 0;
}
