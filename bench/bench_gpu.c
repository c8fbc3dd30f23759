/* bench/bench_gpu.c: the GPU engine's decode and prefill speed beside the GPU's limits.
 *
 * The model: a Llama-shaped random model of ~1.2B parameters (n_embd 2048, 16 layers, 32
 * query heads and 8 KV heads of 64, n_ff 8192, bf16 weights; SmolLM2's 49152-token
 * vocabulary when models/ has it), written once by tests/support/gguf_write.h, or any
 * GGUF with -m. BF16 precision, bf16 KV (what PyTorch keeps), CUDA graphs on.
 *
 * Workloads (scripts/bench-gpu-torch.py runs the same with transformers):
 *   decode B x C  B sequences (1, 8, 64) holding C positions (512 .. 8192) of random K/V;
 *                 one step = one token per sequence, logits on the device; the time is the
 *                 median step; bandwidth = (weights read + K/V read) / time, beside the
 *                 peak of the memory (clock x bus width);
 *   prefill T     one prompt of T tokens (512, 2048, 8192) in one forward; tokens/s and
 *                 TFLOP/s = (2 x matrix parameters x T + 2 x T^2 x layers x q-width, the
 *                 causal QK^T and PV) / time, beside the bf16 tensor-core peak.
 *
 *   bench_gpu --run [-m MODEL.gguf] [--reps N] [--json FILE] [--quick]
 * Without --run it only says how to run it (make bench runs every benchmark, and this one
 * needs a GPU and minutes); with --run and no GPU it fails with the reason.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "kernels/cuda.h"
#include "kernels/cuda_model.h"
#include "kv/kv.h"
#include "tests/support/gguf_write.h"
#include "worker/model.h"

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"

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

static void rand_ids(int32_t *ids, int n, int n_vocab, uint64_t *st)
{
    for (int i = 0; i < n; i++) {
        *st = *st * 6364136223846793005ull + 1442695040888963407ull;
        ids[i] = (int32_t)((*st >> 33) % (uint64_t)n_vocab);
    }
}

typedef struct {
    int batch, ctx;
    double ms, gbs, tok_s;
} decode_row;

typedef struct {
    int tokens;
    double ms, tok_s, tflops;
} prefill_row;

/* Bytes of the matrices a step reads (the whole output projection included). */
static double matrix_params(const model_hparams *hp)
{
    const double E = hp->n_embd, q = (double)hp->n_head * hp->head_dim, kv = (double)hp->n_head_kv * hp->head_dim;
    return hp->n_layer * (E * q * 2 + E * kv * 2 + 3.0 * E * hp->n_ff) + E * hp->n_vocab;
}

static int die(const char *what, const char *err)
{
    fprintf(stderr, "bench_gpu: %s: %s\n", what, err);
    return 1;
}

int main(int argc, char **argv)
{
    const char *model = NULL, *json = NULL;
    int run = 0, reps = 20, quick = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--run") == 0) run = 1;
        else if (strcmp(argv[i], "--quick") == 0) quick = 1;
        else if (strcmp(argv[i], "-m") == 0 && i + 1 < argc) model = argv[++i];
        else if (strcmp(argv[i], "--json") == 0 && i + 1 < argc) json = argv[++i];
        else if (strcmp(argv[i], "--reps") == 0 && i + 1 < argc) reps = atoi(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_gpu --run [-m MODEL.gguf] [--reps N] [--json FILE] [--quick]\n");
            return 2;
        }
    }
    if (!run) {
        printf("bench_gpu: run it with `make bench-gpu` on a machine with an NVIDIA GPU (it takes minutes)\n");
        return 0;
    }
    if (reps < 3) reps = 3;
    duet_cuda_err e = {0};
    cuda_device_info dev;
    if (cuda_device_select(0, &dev, &e) != 0) return die("no GPU", e.msg);

    char err[512], path[512];
    if (!model) {
        snprintf(path, sizeof path, "/tmp/duet-bench-llama-1b-bf16%s.gguf",
                 access(DEFAULT_MODEL, R_OK) == 0 ? "-v49152" : "");
        if (access(path, R_OK) != 0) {
            mkmodel_opts o;
            mkmodel_defaults(&o);
            o.type = DTYPE_BF16;
            o.seed = 2024;
            o.n_embd = 2048;
            o.n_layer = 16;
            o.n_head = 32;
            o.n_head_kv = 8;
            o.n_ff = 8192;
            o.n_ctx = 16384;
            o.rope_base = 500000.0f;
            o.vocab_from = access(DEFAULT_MODEL, R_OK) == 0 ? DEFAULT_MODEL : NULL;
            fprintf(stderr, "bench_gpu: writing the random 1B model to %s\n", path);
            if (mkmodel_write(&o, path, err, sizeof err) != 0) return die("mkmodel", err);
        }
        model = path;
    }
    model_t *m = NULL;
    if (model_load(model, 0, 1, &m, err, sizeof err) != 0) return die("model_load", err);
    const model_hparams *hp = model_hparams_of(m);

    const int batches[] = {1, 8, 64}, ctxs[] = {512, 1024, 2048, 4096, 8192}, prefills[] = {512, 2048, 8192};
    const int n_b = quick ? 2 : 3, n_c = quick ? 2 : 5, n_p = quick ? 2 : 3;
    const int max_ctx = 8192 + reps + 8, max_prefill = 8192;
    const size_t kv_tok = (size_t)hp->n_layer * 2 * hp->n_head_kv * hp->head_dim * 2; /* bf16 */
    cuda_model_config c;
    memset(&c, 0, sizeof c);
    c.precision = CUDA_PREC_BF16;
    c.kv_type = CUDA_KV_BF16;
    c.max_tokens = max_prefill;
    c.max_seqs = 64;
    c.max_logit_rows = 64;
    c.max_ctx = max_ctx;
    c.kv_bytes = kv_tok * (size_t)(64 + 1) * (size_t)(max_ctx + 16) + ((size_t)64 << 20);
    cuda_model_t *cm = NULL;
    if (cuda_model_new(m, &c, &cm, err, sizeof err) != 0) return die("cuda_model_new", err);
    kv_config kc = cuda_model_kv_config(cm);
    kv_cache_t *kv = NULL;
    if (kv_new(&kc, &kv) != KV_OK) return die("kv_new", "cannot make the host KV books");
    if (cuda_model_kv_fill_random(cm, 1.0f, 7, err, sizeof err) != 0) return die("kv fill", err);

    const double wbytes = matrix_params(hp) * 2.0; /* bf16 */
    const double peak_bw = dev.peak_bw_gbs, peak_tf = dev.peak_bf16_tflops;
    decode_row drows[16];
    prefill_row prows[4];
    int nd = 0, np = 0;
    uint64_t st = 42;
    double *t = malloc((size_t)(reps + 3) * sizeof(double));
    int32_t *ids = malloc((size_t)max_prefill * sizeof(int32_t));

    for (int bi = 0; bi < n_b; bi++)
        for (int ci = 0; ci < n_c; ci++) {
            const int B = batches[bi], C = ctxs[ci];
            int seqs[64];
            model_seq_batch b[64];
            int32_t tok[64];
            /* books only: the positions hold the pool's random K/V */
            rand_ids(ids, C, hp->n_vocab, &st);
            for (int s = 0; s < B; s++) {
                if (kv_seq_new(kv, &seqs[s]) != KV_OK || kv_seq_append(kv, seqs[s], ids, C) != KV_OK)
                    return die("kv", "cannot reserve the contexts");
            }
            for (int r = 0; r < reps + 3; r++) {
                rand_ids(tok, B, hp->n_vocab, &st);
                for (int s = 0; s < B; s++) {
                    const int pos = kv_seq_len(kv, seqs[s]);
                    if (kv_seq_append(kv, seqs[s], &tok[s], 1) != KV_OK) return die("kv", "append");
                    b[s] = (model_seq_batch){.seq = seqs[s], .pos0 = pos, .n_tokens = 1, .tokens = &tok[s], .logits = 1};
                }
                const double t0 = now_s();
                if (cuda_model_forward(cm, kv, b, B, NULL, err, sizeof err) != 0) return die("decode", err);
                t[r] = now_s() - t0;
            }
            for (int s = 0; s < B; s++) kv_seq_free(kv, seqs[s]);
            decode_row *d = &drows[nd++];
            d->batch = B;
            d->ctx = C;
            d->ms = median(t + 3, reps) * 1e3; /* the first steps: eager, then the graph capture */
            d->gbs = (wbytes + (double)B * (C + reps / 2.0) * (double)kv_tok) / (d->ms * 1e-3) / 1e9;
            d->tok_s = B / (d->ms * 1e-3);
        }

    const double attn_w = (double)hp->n_layer * hp->n_head * hp->head_dim;
    for (int pi = 0; pi < n_p; pi++) {
        const int T = prefills[pi];
        const int pr = reps < 5 ? reps : 5;
        for (int r = 0; r < pr + 1; r++) {
            int s;
            rand_ids(ids, T, hp->n_vocab, &st);
            if (kv_seq_new(kv, &s) != KV_OK || kv_seq_append(kv, s, ids, T) != KV_OK) return die("kv", "prefill");
            model_seq_batch b = {.seq = s, .pos0 = 0, .n_tokens = T, .tokens = ids, .logits = 1};
            const double t0 = now_s();
            if (cuda_model_forward(cm, kv, &b, 1, NULL, err, sizeof err) != 0) return die("prefill", err);
            t[r] = now_s() - t0;
            kv_seq_free(kv, s);
        }
        prefill_row *p = &prows[np++];
        p->tokens = T;
        p->ms = median(t + 1, pr) * 1e3;
        p->tok_s = T / (p->ms * 1e-3);
        p->tflops = (2.0 * matrix_params(hp) * T + 2.0 * (double)T * T * attn_w) / (p->ms * 1e-3) / 1e12;
    }

    printf("GPU: %s, %d SMs, %.0f GB/s and %.0f bf16 TFLOP/s peak (clocks x widths)\n", dev.name, dev.n_sm, peak_bw,
           peak_tf);
    printf("model: %s, %.2f G matrix parameters (%d layers, %d/%d heads of %d, n_ff %d, vocab %d), bf16, KV bf16\n\n",
           model, matrix_params(hp) / 1e9, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim, hp->n_ff,
           hp->n_vocab);
    printf("| decode batch | context | step ms | tokens/s | GB/s | of peak |\n|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < nd; i++)
        printf("| %d | %d | %.3f | %.0f | %.0f | %.0f%% |\n", drows[i].batch, drows[i].ctx, drows[i].ms,
               drows[i].tok_s, drows[i].gbs, peak_bw > 0 ? 100 * drows[i].gbs / peak_bw : 0);
    printf("\n| prefill tokens | ms | tokens/s | TFLOP/s | of peak |\n|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < np; i++)
        printf("| %d | %.1f | %.0f | %.1f | %.0f%% |\n", prows[i].tokens, prows[i].ms, prows[i].tok_s,
               prows[i].tflops, peak_tf > 0 ? 100 * prows[i].tflops / peak_tf : 0);

    if (json) {
        FILE *f = fopen(json, "w");
        if (!f) return die("cannot write", json);
        fprintf(f, "{\"gpu\": \"%s\", \"n_sm\": %d, \"peak_bw_gbs\": %.1f, \"peak_bf16_tflops\": %.1f,\n", dev.name,
                dev.n_sm, peak_bw, peak_tf);
        fprintf(f, " \"model\": {\"path\": \"%s\", \"n_embd\": %d, \"n_layer\": %d, \"n_head\": %d, \"n_head_kv\": %d, "
                   "\"head_dim\": %d, \"n_ff\": %d, \"n_vocab\": %d, \"rope_base\": %.1f, \"rms_eps\": %g, "
                   "\"matrix_params\": %.0f, \"kv_bytes_per_token\": %zu},\n",
                model, hp->n_embd, hp->n_layer, hp->n_head, hp->n_head_kv, hp->head_dim, hp->n_ff, hp->n_vocab,
                hp->rope_base, hp->rms_eps, matrix_params(hp), kv_tok);
        fprintf(f, " \"reps\": %d,\n \"decode\": [", reps);
        for (int i = 0; i < nd; i++)
            fprintf(f, "%s\n  {\"batch\": %d, \"ctx\": %d, \"ms\": %.4f, \"tok_s\": %.1f, \"gbs\": %.1f}", i ? "," : "",
                    drows[i].batch, drows[i].ctx, drows[i].ms, drows[i].tok_s, drows[i].gbs);
        fprintf(f, "],\n \"prefill\": [");
        for (int i = 0; i < np; i++)
            fprintf(f, "%s\n  {\"tokens\": %d, \"ms\": %.3f, \"tok_s\": %.1f, \"tflops\": %.2f}", i ? "," : "",
                    prows[i].tokens, prows[i].ms, prows[i].tok_s, prows[i].tflops);
        fprintf(f, "]}\n");
        fclose(f);
    }
    free(t);
    free(ids);
    kv_destroy(&kv);
    cuda_model_destroy(&cm);
    model_destroy(&m);
    return 0;
}
