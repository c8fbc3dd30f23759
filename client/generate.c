/* client/generate.c: `duet generate`. */
#include "client/generate.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "daemon/chat.h"
#include "daemon/tok.h"
#include "kernels/sample.h"
#include "kv/kv.h"
#include "worker/model.h"

#define MAX_STOPS 16

typedef struct {
    const char *model, *prompt, *system, *chat_style, *kv_type, *prompt_ids;
    int n_predict, chat, threads, ctx, batch, ignore_eos, print_ids, quiet, no_stats;
    const char *stops[MAX_STOPS];
    int n_stops;
    sample_params sp;
} gen_opts;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void usage(FILE *f)
{
    fprintf(f,
        "usage: duet generate -m MODEL.gguf -p PROMPT [options]\n"
        "\n"
        "  -m, --model FILE        GGUF model (architectures llama, qwen2)\n"
        "  -p, --prompt TEXT       the prompt (with --chat: the user's message)\n"
        "      --prompt-ids LIST   the prompt as comma-separated token ids instead of text\n"
        "  -n, --n-predict N       tokens to generate at most [128]\n"
        "      --chat              wrap the prompt in the model's chat template\n"
        "      --system TEXT       system message (with --chat)\n"
        "      --chat-style NAME   chatml, llama2 or llama3, when the template is not recognised\n"
        "  -t, --threads N         CPU threads [number of cores]\n"
        "  -c, --ctx N             context length: prompt + generated tokens [min(4096, trained)]\n"
        "  -b, --batch N           prefill chunk in tokens [512]\n"
        "      --kv-type T         KV cache elements: f32, f16, bf16, int8 [f16]\n"
        "sampling (default greedy):\n"
        "      --temp T            temperature; 0 is greedy [0]\n"
        "      --top-k K           keep the K most likely tokens [40]\n"
        "      --top-p P           nucleus sampling mass [0.95]\n"
        "      --min-p P           drop tokens below P x the best probability [0.05]\n"
        "      --repeat-penalty R  penalty on recent tokens; 1 is off [1]\n"
        "      --repeat-last-n N   tokens the penalty looks back over [64]\n"
        "  -s, --seed S            sampling seed [0]\n"
        "      --stop STR          stop when STR appears (repeatable, up to %d)\n"
        "      --ignore-eos        do not stop at end-of-generation tokens\n"
        "output:\n"
        "      --print-ids         print the prompt's and the generated token ids on stderr\n"
        "      --no-stats          do not print timings\n"
        "  -q, --quiet             print only the generated text\n",
        MAX_STOPS);
}

static int parse_int(const char *opt, const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "duet generate: %s '%s' is not an integer in [%ld, %ld]\n", opt, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

static int parse_float(const char *opt, const char *s, float *out)
{
    char *end;
    errno = 0;
    float v = strtof(s, &end);
    if (errno || end == s || *end || v != v) {
        fprintf(stderr, "duet generate: %s '%s' is not a number\n", opt, s);
        return -1;
    }
    *out = v;
    return 0;
}

/* 0: run; 1: --help was printed; -1: bad arguments (reported). */
static int parse_args(int argc, char **argv, gen_opts *o)
{
    enum { O_CHAT = 256, O_SYSTEM, O_STYLE, O_KV, O_TEMP, O_TOPK, O_TOPP, O_MINP, O_REP, O_REPN,
           O_STOP, O_IGN, O_IDS, O_PIDS, O_NOSTATS };
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"n-predict", required_argument, 0, 'n'}, {"threads", required_argument, 0, 't'},
        {"ctx", required_argument, 0, 'c'}, {"batch", required_argument, 0, 'b'},
        {"seed", required_argument, 0, 's'}, {"quiet", no_argument, 0, 'q'},
        {"help", no_argument, 0, 'h'}, {"chat", no_argument, 0, O_CHAT},
        {"system", required_argument, 0, O_SYSTEM}, {"chat-style", required_argument, 0, O_STYLE},
        {"kv-type", required_argument, 0, O_KV}, {"temp", required_argument, 0, O_TEMP},
        {"top-k", required_argument, 0, O_TOPK}, {"top-p", required_argument, 0, O_TOPP},
        {"min-p", required_argument, 0, O_MINP}, {"repeat-penalty", required_argument, 0, O_REP},
        {"repeat-last-n", required_argument, 0, O_REPN}, {"stop", required_argument, 0, O_STOP},
        {"ignore-eos", no_argument, 0, O_IGN}, {"print-ids", no_argument, 0, O_IDS},
        {"prompt-ids", required_argument, 0, O_PIDS}, {"no-stats", no_argument, 0, O_NOSTATS},
        {0, 0, 0, 0}};
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    o->n_predict = 128;
    o->threads = ncpu > 0 ? (int)ncpu : 1;
    o->batch = 512;
    o->kv_type = "f16";
    o->sp = sample_params_default();
    o->sp.temperature = 0.0f;
    o->sp.repeat_penalty = 1.0f;
    optind = 1;
    int c, seed;
    while ((c = getopt_long(argc, argv, "m:p:n:t:c:b:s:qh", lo, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case 'p': o->prompt = optarg; break;
        case 'n': if (parse_int("--n-predict", optarg, 0, 1 << 24, &o->n_predict)) return -1; break;
        case 't': if (parse_int("--threads", optarg, 1, 1024, &o->threads)) return -1; break;
        case 'c': if (parse_int("--ctx", optarg, 1, 1 << 24, &o->ctx)) return -1; break;
        case 'b': if (parse_int("--batch", optarg, 1, 1 << 16, &o->batch)) return -1; break;
        case 's': if (parse_int("--seed", optarg, 0, 0x7fffffff, &seed)) return -1;
                  o->sp.seed = (uint64_t)seed; break;
        case 'q': o->quiet = 1; break;
        case 'h': usage(stdout); return 1; /* done: the caller exits 0 */
        case O_CHAT: o->chat = 1; break;
        case O_SYSTEM: o->system = optarg; break;
        case O_STYLE: o->chat_style = optarg; break;
        case O_KV: o->kv_type = optarg; break;
        case O_TEMP: if (parse_float("--temp", optarg, &o->sp.temperature)) return -1; break;
        case O_TOPK: if (parse_int("--top-k", optarg, 0, 1 << 30, &o->sp.top_k)) return -1; break;
        case O_TOPP: if (parse_float("--top-p", optarg, &o->sp.top_p)) return -1; break;
        case O_MINP: if (parse_float("--min-p", optarg, &o->sp.min_p)) return -1; break;
        case O_REP: if (parse_float("--repeat-penalty", optarg, &o->sp.repeat_penalty)) return -1; break;
        case O_REPN: if (parse_int("--repeat-last-n", optarg, -1, 1 << 30, &o->sp.repeat_last_n)) return -1; break;
        case O_STOP:
            if (o->n_stops == MAX_STOPS) {
                fprintf(stderr, "duet generate: more than %d --stop strings\n", MAX_STOPS);
                return -1;
            }
            o->stops[o->n_stops++] = optarg;
            break;
        case O_IGN: o->ignore_eos = 1; break;
        case O_IDS: o->print_ids = 1; break;
        case O_PIDS: o->prompt_ids = optarg; break;
        case O_NOSTATS: o->no_stats = 1; break;
        default: usage(stderr); return -1;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "duet generate: unexpected argument '%s'\n", argv[optind]);
        return -1;
    }
    if (!o->model || (!o->prompt && !o->prompt_ids)) {
        fprintf(stderr, "duet generate: -m MODEL and -p PROMPT (or --prompt-ids) are required\n");
        usage(stderr);
        return -1;
    }
    char err[256];
    if (sample_params_check(&o->sp, err, sizeof err) != 0) {
        fprintf(stderr, "duet generate: %s\n", err);
        return -1;
    }
    return 0;
}

static int parse_kv_type(const char *s, dtype_t *out)
{
    static const struct { const char *name; dtype_t t; } map[] = {
        {"f32", DTYPE_F32}, {"f16", DTYPE_F16}, {"bf16", DTYPE_BF16}, {"int8", DTYPE_I8}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcmp(s, map[i].name) == 0) {
            *out = map[i].t;
            return 0;
        }
    fprintf(stderr, "duet generate: --kv-type '%s' is not one of f32, f16, bf16, int8\n", s);
    return -1;
}

static int parse_ids(const char *s, int n_vocab, int32_t **ids_out, int *n_out)
{
    size_t cap = strlen(s) / 2 + 1;
    int32_t *ids = malloc(cap * sizeof *ids);
    int n = 0;
    if (!ids) return -1;
    const char *p = s;
    while (*p) {
        char *end;
        long v = strtol(p, &end, 10);
        if (end == p || v < 0 || v >= n_vocab) {
            fprintf(stderr, "duet generate: --prompt-ids: '%s' is not a token id below %d\n", p,
                    n_vocab);
            free(ids);
            return -1;
        }
        ids[n++] = (int32_t)v;
        p = *end == ',' ? end + 1 : end;
        if (*end && *end != ',') {
            fprintf(stderr, "duet generate: --prompt-ids: unexpected '%c'\n", *end);
            free(ids);
            return -1;
        }
    }
    *ids_out = ids;
    *n_out = n;
    return 0;
}

/* The prompt's token ids: plain text, chat-templated text, or given ids. */
static int make_prompt(const gen_opts *o, const model_t *m, const tok_t *tok, int32_t **ids,
                       int *n)
{
    if (o->prompt_ids) return parse_ids(o->prompt_ids, tok_n_vocab(tok), ids, n);
    char *text = NULL;
    const char *src = o->prompt;
    if (o->chat) {
        char err[256];
        char *tmpl = gguf_get_str_dup(model_gguf(m), "tokenizer.chat_template");
        chat_template ct;
        int rc = chat_template_init(&ct, tmpl, o->chat_style, err, sizeof err);
        free(tmpl);
        if (rc != 0) {
            fprintf(stderr, "duet generate: %s: %s\n", o->model, err);
            return -1;
        }
        chat_msg msgs[2];
        int nm = 0;
        if (o->system) msgs[nm++] = (chat_msg){.role = "system", .content = o->system};
        msgs[nm++] = (chat_msg){.role = "user", .content = o->prompt};
        rc = chat_template_render(&ct, msgs, nm, 1, &text, err, sizeof err);
        chat_template_free(&ct);
        if (rc != 0) {
            fprintf(stderr, "duet generate: chat template: %s\n", err);
            return -1;
        }
        src = text;
    }
    int rc = tok_encode(tok, src, strlen(src), 1, o->chat, ids, n);
    free(text);
    if (rc != 0) {
        fprintf(stderr, "duet generate: tokenizing the prompt failed (out of memory)\n");
        return -1;
    }
    /* A template that writes BOS itself and a tokenizer that adds one: keep one. */
    if (*n >= 2 && (*ids)[0] == tok_bos(tok) && (*ids)[1] == tok_bos(tok)) {
        memmove(*ids, *ids + 1, (size_t)(*n - 1) * sizeof **ids);
        (*n)--;
    }
    return 0;
}

static void print_ids(const char *what, const int32_t *ids, int n)
{
    fprintf(stderr, "%s:", what);
    for (int i = 0; i < n; i++) fprintf(stderr, "%s%d", i ? "," : " ", ids[i]);
    fprintf(stderr, "\n");
}

/* Text output with stop strings: text that may be the start of a stop string is held
 * back until it resolves. */
typedef struct {
    char *buf;
    size_t len, cap, shown;
    int stopped;
} out_text;

static int out_push(out_text *t, const gen_opts *o, const char *s, size_t n)
{
    if (t->len + n + 1 > t->cap) {
        size_t cap = (t->len + n + 1) * 2;
        char *b = realloc(t->buf, cap);
        if (!b) return -1;
        t->buf = b;
        t->cap = cap;
    }
    memcpy(t->buf + t->len, s, n);
    t->len += n;
    stop_result r = {.stop = -1, .safe_len = t->len};
    /* Shown bytes never hold the start of a stop string, so the search starts there. */
    if (o->n_stops) stop_match(t->buf, t->len, o->stops, o->n_stops, t->shown, &r);
    if (r.stop >= 0) t->stopped = 1;
    if (r.safe_len > t->shown) {
        fwrite(t->buf + t->shown, 1, r.safe_len - t->shown, stdout);
        fflush(stdout);
        t->shown = r.safe_len;
    }
    return 0;
}

int generate_main(int argc, char **argv)
{
    gen_opts o;
    memset(&o, 0, sizeof o);
    int pa = parse_args(argc, argv, &o);
    if (pa != 0) return pa > 0 ? 0 : 2;
    dtype_t kv_type;
    if (parse_kv_type(o.kv_type, &kv_type) != 0) return 2;

    int status = 1;
    char err[512];
    model_t *m = NULL;
    tok_t *tok = NULL;
    model_ctx_t *ctx = NULL;
    kv_cache_t *kv = NULL;
    sampler_t *smp = NULL;
    tok_stream_t *ts = NULL;
    int32_t *ids = NULL;
    float *logits = NULL;
    out_text out = {0};
    int n_prompt = 0, n_gen = 0, seq = -1;

    double t_load = now_s();
    if (model_load(o.model, 0, 1, &m, err, sizeof err) != 0) {
        fprintf(stderr, "duet generate: %s\n", err);
        goto done;
    }
    if (tok_new_from_gguf(model_gguf(m), &tok, err, sizeof err) != 0) {
        fprintf(stderr, "duet generate: %s: tokenizer: %s\n", o.model, err);
        goto done;
    }
    const model_hparams *hp = model_hparams_of(m);
    if (make_prompt(&o, m, tok, &ids, &n_prompt) != 0) goto done;
    if (n_prompt == 0) {
        fprintf(stderr, "duet generate: the prompt is empty after tokenization\n");
        goto done;
    }
    int n_ctx = o.ctx ? o.ctx : (hp->n_ctx_train < 4096 ? hp->n_ctx_train : 4096);
    if (n_prompt + o.n_predict > n_ctx) {
        fprintf(stderr,
                "duet generate: the prompt (%d tokens) plus --n-predict %d exceed the context of "
                "%d tokens; shorten the prompt, lower -n or raise --ctx\n",
                n_prompt, o.n_predict, n_ctx);
        goto done;
    }
    int32_t *all = realloc(ids, (size_t)(n_prompt + o.n_predict + 1) * sizeof *ids);
    if (!all) goto oom;
    ids = all;

    kv_config kc = model_kv_config(m, kv_type, 0);
    size_t elt = kv_type == DTYPE_F32 ? 4 : kv_type == DTYPE_I8 ? 1 : 2;
    size_t per_block = (size_t)2 * kc.n_layers * kc.n_kv_heads * kc.head_dim * elt * 16 +
                       (kv_type == DTYPE_I8 ? (size_t)2 * kc.n_layers * kc.n_kv_heads * 4 : 0);
    kc.budget_bytes = per_block * (size_t)((n_ctx + 15) / 16 + 1);
    kv_status ks = kv_new(&kc, &kv);
    if (ks != KV_OK) {
        fprintf(stderr, "duet generate: KV cache of %zu bytes: %s\n", kc.budget_bytes, kv_strerror(ks));
        goto done;
    }
    int batch = o.batch < n_prompt ? o.batch : n_prompt;
    if (model_ctx_new(m, batch, o.threads, &ctx) != 0) goto oom;
    if (sampler_new(&o.sp, hp->n_vocab, &smp) != 0) goto oom;
    if (tok_stream_new(tok, 0, &ts) != 0) goto oom;
    if (!(logits = malloc((size_t)hp->n_vocab * sizeof(float)))) goto oom;
    if (o.print_ids) print_ids("prompt ids", ids, n_prompt);
    t_load = now_s() - t_load;

    /* Prefill in chunks; logits of the last prompt token only. */
    double t0 = now_s();
    if (kv_seq_new(kv, &seq) != KV_OK) goto oom;
    for (int p = 0; p < n_prompt; p += batch) {
        int k = n_prompt - p < batch ? n_prompt - p : batch;
        if ((ks = kv_seq_append(kv, seq, ids + p, k)) != KV_OK) {
            fprintf(stderr, "duet generate: KV cache: %s\n", kv_strerror(ks));
            goto done;
        }
        model_seq_batch b = {.seq = seq, .pos0 = p, .n_tokens = k, .tokens = ids + p,
                             .logits = p + k == n_prompt};
        if (model_forward(ctx, m, kv, &b, 1, logits, err, sizeof err) != 0) {
            fprintf(stderr, "duet generate: %s\n", err);
            goto done;
        }
        kv_seq_commit(kv, seq, p + k);
    }
    double t_first = 0, t_prefill = now_s() - t0;

    /* Decode. */
    int n = n_prompt;
    const char *finish = "length";
    while (n_gen < o.n_predict) {
        int32_t id = sampler_sample(smp, logits, ids, n);
        if (id < 0) {
            fprintf(stderr, "duet generate: sampling found no finite logit\n");
            goto done;
        }
        if (n_gen == 0) t_first = now_s() - t0;
        ids[n++] = id;
        n_gen++;
        if (!o.ignore_eos && tok_is_eog(tok, id)) {
            finish = "eos";
            break;
        }
        const char *piece;
        size_t plen;
        if (tok_stream_push(ts, id, &piece, &plen) != 0) goto oom;
        if (plen && out_push(&out, &o, piece, plen) != 0) goto oom;
        if (out.stopped) {
            finish = "stop";
            break;
        }
        if (n_gen == o.n_predict) break;
        if ((ks = kv_seq_append(kv, seq, &id, 1)) != KV_OK) {
            fprintf(stderr, "duet generate: KV cache: %s\n", kv_strerror(ks));
            goto done;
        }
        model_seq_batch b = {.seq = seq, .pos0 = n - 1, .n_tokens = 1, .tokens = &ids[n - 1], .logits = 1};
        if (model_forward(ctx, m, kv, &b, 1, logits, err, sizeof err) != 0) {
            fprintf(stderr, "duet generate: %s\n", err);
            goto done;
        }
        kv_seq_commit(kv, seq, n);
    }
    if (!out.stopped) {
        const char *piece;
        size_t plen;
        if (tok_stream_flush(ts, &piece, &plen) == 0 && plen) out_push(&out, &o, piece, plen);
        if (!out.stopped && out.shown < out.len) fwrite(out.buf + out.shown, 1, out.len - out.shown, stdout);
    }
    printf("\n");
    fflush(stdout);
    double t_total = now_s() - t0;
    if (o.print_ids) print_ids("generated ids", ids + n_prompt, n_gen);
    if (!o.quiet && !o.no_stats) {
        double t_dec = t_total - t_first;
        fprintf(stderr,
                "\nprompt %d tokens, generated %d (finish: %s)\n"
                "load %.2f s | TTFT %.1f ms | prefill %.1f tokens/s | decode %.1f tokens/s "
                "(%d threads, KV %s)\n",
                n_prompt, n_gen, finish, t_load, t_first * 1e3, n_prompt / t_prefill,
                n_gen > 1 ? (n_gen - 1) / t_dec : 0.0, o.threads, o.kv_type);
    }
    status = 0;
    goto done;
oom:
    fprintf(stderr, "duet generate: out of memory\n");
done:
    if (kv && seq >= 0) kv_seq_free(kv, seq);
    free(out.buf);
    free(logits);
    free(ids);
    tok_stream_destroy(&ts);
    sampler_destroy(&smp);
    kv_destroy(&kv);
    model_ctx_destroy(&ctx);
    tok_destroy(&tok);
    model_destroy(&m);
    return status;
}
