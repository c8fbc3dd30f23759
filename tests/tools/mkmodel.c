/* tests/tools/mkmodel.c: write a random Llama-shaped GGUF model (see mkmodel_write).
 *
 *   mkmodel --arch llama|qwen2 --type f32|f16|bf16|q8_0|q4_0|q4_1|q4_k|q6_k --seed N
 *           --n-embd N --n-layer N --n-head N --n-head-kv N --n-ff N [--n-ctx N]
 *           [--rope-base F] [--rms-eps F] [--tied] [--vocab-from FILE.gguf] -o out.gguf
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/support/gguf_write.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: mkmodel [--arch llama|qwen2] [--type f32|f16|bf16|q8_0|q4_0|q4_1|q4_k|q6_k]\n"
            "               [--seed N] [--n-embd N] [--n-layer N] [--n-head N] [--n-head-kv N]\n"
            "               [--n-ff N] [--n-ctx N] [--rope-base F] [--rms-eps F] [--tied]\n"
            "               [--vocab-from FILE.gguf] -o OUT.gguf\n"
            "K-quants need --n-embd and --n-ff multiples of 256; other quants, of 32.\n");
}

static int parse_type(const char *s, dtype_t *t)
{
    static const struct { const char *name; dtype_t t; } types[] = {
        {"f32", DTYPE_F32},   {"f16", DTYPE_F16},   {"bf16", DTYPE_BF16}, {"q8_0", DTYPE_Q8_0},
        {"q4_0", DTYPE_Q4_0}, {"q4_1", DTYPE_Q4_1}, {"q4_k", DTYPE_Q4_K}, {"q6_k", DTYPE_Q6_K},
    };
    for (size_t i = 0; i < sizeof types / sizeof *types; i++)
        if (strcasecmp(s, types[i].name) == 0) {
            *t = types[i].t;
            return 0;
        }
    return -1;
}

static int parse_int(const char *opt, const char *s, int *out)
{
    char *end;
    long v = strtol(s, &end, 10);
    if (*s == 0 || *end != 0 || v <= 0 || v > 1 << 24) {
        fprintf(stderr, "mkmodel: %s wants a positive integer, got '%s'\n", opt, s);
        return -1;
    }
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv)
{
    mkmodel_opts o;
    mkmodel_defaults(&o);
    const char *out = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (strcmp(a, "-h") == 0 || strcmp(a, "--help") == 0) {
            usage(stdout);
            return 0;
        }
        if (strcmp(a, "--tied") == 0) {
            o.tied = 1;
            continue;
        }
        if (i + 1 >= argc) {
            fprintf(stderr, "mkmodel: %s needs a value\n", a);
            usage(stderr);
            return 2;
        }
        const char *v = argv[++i];
        int bad = 0;
        if (strcmp(a, "--arch") == 0) o.arch = v;
        else if (strcmp(a, "--type") == 0) {
            if (parse_type(v, &o.type)) {
                fprintf(stderr, "mkmodel: unknown --type '%s'\n", v);
                bad = 1;
            }
        } else if (strcmp(a, "--seed") == 0) {
            char *end;
            o.seed = strtoull(v, &end, 0);
            if (*v == 0 || *end != 0) {
                fprintf(stderr, "mkmodel: --seed wants an integer, got '%s'\n", v);
                bad = 1;
            }
        } else if (strcmp(a, "--n-embd") == 0) bad = parse_int(a, v, &o.n_embd);
        else if (strcmp(a, "--n-layer") == 0) bad = parse_int(a, v, &o.n_layer);
        else if (strcmp(a, "--n-head") == 0) bad = parse_int(a, v, &o.n_head);
        else if (strcmp(a, "--n-head-kv") == 0) bad = parse_int(a, v, &o.n_head_kv);
        else if (strcmp(a, "--n-ff") == 0) bad = parse_int(a, v, &o.n_ff);
        else if (strcmp(a, "--n-ctx") == 0) bad = parse_int(a, v, &o.n_ctx);
        else if (strcmp(a, "--rope-base") == 0) o.rope_base = strtof(v, NULL);
        else if (strcmp(a, "--rms-eps") == 0) o.rms_eps = strtof(v, NULL);
        else if (strcmp(a, "--vocab-from") == 0) o.vocab_from = v;
        else if (strcmp(a, "-o") == 0 || strcmp(a, "--output") == 0) out = v;
        else {
            fprintf(stderr, "mkmodel: unknown option %s\n", a);
            usage(stderr);
            return 2;
        }
        if (bad) return 2;
    }
    if (!out) {
        fprintf(stderr, "mkmodel: no output file (-o)\n");
        usage(stderr);
        return 2;
    }
    char err[512];
    if (mkmodel_write(&o, out, err, sizeof err) != 0) {
        fprintf(stderr, "mkmodel: %s\n", err);
        return 1;
    }
    return 0;
}
