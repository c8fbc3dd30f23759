/* kernels/cuda_plan.c: the CUDA backend's host-side planning (see cuda_plan.h). Plain C,
 * compiled in every build. */
#include "kernels/cuda_plan.h"

#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifndef DUET_CUDA
#define DUET_CUDA 0
#endif

#define MIB(x) ((double)(x) / 1048576.0)

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

void duet_cuda_err_set(duet_cuda_err *e, const char *fmt, ...)
{
    if (!e || e->set) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(e->msg, sizeof e->msg, fmt, ap);
    va_end(ap);
    e->set = 1;
}

int cuda_built(void) { return DUET_CUDA ? 1 : 0; }

static size_t al(size_t v) { return (v + CUDA_ALIGN - 1) / CUDA_ALIGN * CUDA_ALIGN; }

/* ---- names and types ------------------------------------------------------------------------ */

const char *cuda_kv_type_name(cuda_kv_type t)
{
    switch (t) {
    case CUDA_KV_F16: return "f16";
    case CUDA_KV_BF16: return "bf16";
    case CUDA_KV_FP8: return "fp8";
    case CUDA_KV_F32: return "f32";
    }
    return "unknown";
}

int cuda_kv_type_parse(const char *s, cuda_kv_type *out)
{
    static const struct { const char *name; cuda_kv_type t; } names[] = {
        {"f16", CUDA_KV_F16}, {"bf16", CUDA_KV_BF16}, {"fp8", CUDA_KV_FP8},
        {"fp8_e4m3", CUDA_KV_FP8}, {"e4m3", CUDA_KV_FP8}, {"f32", CUDA_KV_F32},
    };
    if (!s || !out) return -1;
    for (size_t i = 0; i < sizeof names / sizeof *names; i++)
        if (strcmp(s, names[i].name) == 0) {
            *out = names[i].t;
            return 0;
        }
    return -1;
}

size_t cuda_kv_elt_bytes(cuda_kv_type t)
{
    switch (t) {
    case CUDA_KV_F16: case CUDA_KV_BF16: return 2;
    case CUDA_KV_FP8: return 1;
    case CUDA_KV_F32: return 4;
    }
    return 0;
}

int cuda_weight_type_supported(dtype_t t)
{
    switch (t) {
    case DTYPE_F32: case DTYPE_F16: case DTYPE_BF16: case DTYPE_Q4_0: case DTYPE_Q4_1:
    case DTYPE_Q8_0: case DTYPE_Q4_K: case DTYPE_Q6_K:
        return 1;
    default:
        return 0;
    }
}

int cuda_device_parse(const char *spec, int *index, char *err, size_t errlen)
{
    if (!spec || !index) {
        set_err(err, errlen, "no device given");
        return -1;
    }
    const char *p = strncmp(spec, "cuda:", 5) == 0 ? spec + 5 : spec;
    char *end = NULL;
    long v = *p >= '0' && *p <= '9' ? strtol(p, &end, 10) : -1;
    if (v < 0 || v > 1024 || !end || *end != '\0') {
        set_err(err, errlen, "bad CUDA device '%s' (expected cuda:N or N, N >= 0)", spec);
        return -1;
    }
    *index = (int)v;
    return 0;
}

int cuda_bf16_flops_per_clock_sm(int cc_major, int cc_minor)
{
    /* dense bf16 with f32 accumulation, 2 FLOP per FMA (the datasheets' figures divided
     * by SMs and boost clock: H100 SXM 989 TFLOP/s = 132 SMs * 1.83 GHz * 4096) */
    if (cc_major == 9 && cc_minor == 0) return 4096;
    if (cc_major == 8 && cc_minor == 0) return 2048;
    if (cc_major == 8 && (cc_minor == 6 || cc_minor == 7 || cc_minor == 9)) return 1024;
    return 0;
}

double cuda_peak_bw_gbs(int mem_clock_khz, int bus_width_bits)
{
    if (mem_clock_khz <= 0 || bus_width_bits <= 0) return 0.0;
    return 2.0 * (double)mem_clock_khz * 1e3 * (double)bus_width_bits / 8.0 / 1e9;
}

double cuda_peak_bf16_tflops(int cc_major, int cc_minor, int n_sm, int clock_khz)
{
    int f = cuda_bf16_flops_per_clock_sm(cc_major, cc_minor);
    if (f == 0 || n_sm <= 0 || clock_khz <= 0) return 0.0;
    return (double)f * n_sm * (double)clock_khz * 1e3 / 1e12;
}

int cuda_attn_supported(int head_dim, int group)
{
    const int max_rows = head_dim <= 128 ? 64 : 32;
    return head_dim > 0 && head_dim % 8 == 0 && head_dim <= 256 && group >= 1 && group <= max_rows;
}

/* ---- configuration ---------------------------------------------------------------------------- */

int cuda_model_config_resolve(cuda_model_config *c, const model_hparams *hp, char *err,
                              size_t errlen)
{
    if (!c || !hp) {
        set_err(err, errlen, "no configuration");
        return -1;
    }
    if (c->device < 0) {
        set_err(err, errlen, "CUDA device index %d is negative", c->device);
        return -1;
    }
    if (cuda_kv_elt_bytes(c->kv_type) == 0) {
        set_err(err, errlen, "KV type %d is not one of f16, bf16, fp8, f32", (int)c->kv_type);
        return -1;
    }
    if (c->precision != CUDA_PREC_BF16 && c->precision != CUDA_PREC_EXACT) {
        set_err(err, errlen, "precision %d is not bf16 (0) or exact (1)", (int)c->precision);
        return -1;
    }
    if (c->block_tokens < 0 || c->max_tokens < 0 || c->max_seqs < 0 || c->max_ctx < 0 ||
        c->max_logit_rows < 0 || c->max_graphs < 0) {
        set_err(err, errlen, "GPU model configuration: sizes must not be negative");
        return -1;
    }
    if (!c->block_tokens) c->block_tokens = 16;
    if (!c->max_tokens) c->max_tokens = 512;
    if (!c->max_seqs) c->max_seqs = 64;
    if (c->max_seqs > c->max_tokens) c->max_seqs = c->max_tokens;
    if (!c->max_ctx) c->max_ctx = hp->n_ctx_train < 8192 ? hp->n_ctx_train : 8192;
    if (!c->max_logit_rows) c->max_logit_rows = c->max_seqs;
    if (c->max_logit_rows > c->max_tokens) c->max_logit_rows = c->max_tokens;
    if (!c->max_graphs) c->max_graphs = 16;
    if (c->block_tokens > 1024 || c->max_tokens > (1 << 20) || c->max_ctx > (1 << 24)) {
        set_err(err, errlen, "GPU model configuration out of range (block_tokens %d, "
                "max_tokens %d, max_ctx %d)", c->block_tokens, c->max_tokens, c->max_ctx);
        return -1;
    }
    return 0;
}

/* ---- weights ---------------------------------------------------------------------------------- */

typedef struct {
    const gguf_t *g;
    cuda_wplan *p;
    size_t cur;          /* next free byte of the arena */
    size_t store_bytes;  /* 2 (bf16) or 4 (f32) */
    int exact;
    int cap_copies;
    cuda_wdesc **need_mins; /* [cap_copies]: the matrix of each copy that gets minimums, or NULL */
    char *err;
    size_t errlen;
} wbuild;

static cuda_wcopy *add_copy(wbuild *b)
{
    cuda_wplan *p = b->p;
    if (p->n_copies == b->cap_copies) {
        int cap = b->cap_copies ? b->cap_copies * 2 : 64;
        cuda_wcopy *c = realloc(p->copies, (size_t)cap * sizeof *c);
        if (!c) return NULL;
        p->copies = c;
        cuda_wdesc **nm = realloc(b->need_mins, (size_t)cap * sizeof *nm);
        if (!nm) return NULL;
        b->need_mins = nm;
        b->cap_copies = cap;
    }
    b->need_mins[p->n_copies] = NULL;
    cuda_wcopy *c = &p->copies[p->n_copies++];
    memset(c, 0, sizeof *c);
    c->mins = CUDA_NO_OFF;
    return c;
}

/* The tensor `name`, ne[0] x ne[1] (ne1 = 1 for vectors), or NULL with a message. */
static const gguf_tensor_t *find(wbuild *b, const char *name, int64_t ne0, int64_t ne1)
{
    const gguf_tensor_t *t = gguf_find_tensor(b->g, name);
    if (!t) {
        set_err(b->err, b->errlen, "%s: tensor '%s' is missing", gguf_path(b->g), name);
        return NULL;
    }
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        set_err(b->err, b->errlen, "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected "
                "[%lld, %lld]", gguf_path(b->g), name, (long long)t->ne[0], (long long)t->ne[1],
                (long long)t->ne[2], (long long)t->ne[3], (long long)ne0, (long long)ne1);
        return NULL;
    }
    return t;
}

/* Rows [r0, r0 + nr) and columns [c0, c0 + nc) of matrix t into d. fuse: place right
 * after the previous matrix (no alignment gap), so that fused products can read both. */
static int place_matrix(wbuild *b, const gguf_tensor_t *t, int64_t r0, int64_t nr, int64_t c0,
                        int64_t nc, int fuse, cuda_wdesc *d)
{
    if (!cuda_weight_type_supported(t->type)) {
        set_err(b->err, b->errlen, "%s: tensor '%s' has type %s, which the GPU does not "
                "dequantize (f32, f16, bf16, q4_0, q4_1, q8_0, q4_k, q6_k)", gguf_path(b->g),
                t->name, dtype_name(t->type));
        return -1;
    }
    const int64_t be = (int64_t)dtype_block_elems(t->type);
    if (c0 % be || nc % be || r0 < 0 || nr < 1 || r0 + nr > t->ne[1] || c0 < 0 ||
        c0 + nc > t->ne[0]) {
        set_err(b->err, b->errlen, "%s: tensor '%s': the shard's columns [%lld, %lld) and rows "
                "[%lld, %lld) do not fall on %s block boundaries (%lld) inside [%lld, %lld]; "
                "choose another tp_size", gguf_path(b->g), t->name, (long long)c0,
                (long long)(c0 + nc), (long long)r0, (long long)(r0 + nr), dtype_name(t->type),
                (long long)be, (long long)t->ne[0], (long long)t->ne[1]);
        return -1;
    }
    cuda_wcopy *c = add_copy(b);
    if (!c) {
        set_err(b->err, b->errlen, "out of memory planning the GPU weights");
        return -1;
    }
    size_t rb = dtype_row_bytes(t->type, t->ne[0]);
    if (rb > b->p->max_row_bytes) b->p->max_row_bytes = rb;
    d->off = fuse ? b->cur : al(b->cur);
    d->mins = CUDA_NO_OFF;
    d->n_in = nc;
    d->n_out = nr;
    d->src_type = t->type;
    b->cur = d->off + (size_t)nr * (size_t)nc * b->store_bytes;
    c->kind = CUDA_COPY_MATRIX;
    c->name = t->name;
    c->src = t->data;
    c->type = t->type;
    c->n_in = t->ne[0];
    c->r0 = r0;
    c->n_rows = nr;
    c->c0 = c0;
    c->n_cols = nc;
    c->dst = d->off;
    if (b->exact && t->type == DTYPE_Q4_1) b->need_mins[b->p->n_copies - 1] = d;
    return 0;
}

/* Elements [c0, c0 + n) of vector t (f32, f16 or bf16) as f32; *off gets the place. */
static int place_vector(wbuild *b, const gguf_tensor_t *t, int64_t c0, int64_t n, int fuse,
                        size_t *off)
{
    if (dtype_block_elems(t->type) != 1 || t->type == DTYPE_I8 ||
        !cuda_weight_type_supported(t->type)) {
        set_err(b->err, b->errlen, "%s: tensor '%s' has type %s; a vector must be f32, f16 or bf16",
                gguf_path(b->g), t->name, dtype_name(t->type));
        return -1;
    }
    if (c0 < 0 || n < 1 || c0 + n > t->ne[0]) {
        set_err(b->err, b->errlen, "%s: tensor '%s' has no elements [%lld, %lld)", gguf_path(b->g),
                t->name, (long long)c0, (long long)(c0 + n));
        return -1;
    }
    cuda_wcopy *c = add_copy(b);
    if (!c) {
        set_err(b->err, b->errlen, "out of memory planning the GPU weights");
        return -1;
    }
    *off = fuse ? b->cur : al(b->cur);
    b->cur = *off + (size_t)n * sizeof(float);
    c->kind = CUDA_COPY_VECTOR;
    c->name = t->name;
    c->src = t->data;
    c->type = t->type;
    c->n_in = t->ne[0];
    c->r0 = 0;
    c->n_rows = 1;
    c->c0 = c0;
    c->n_cols = n;
    c->dst = *off;
    return 0;
}

static int plan_layer(wbuild *b, const model_hparams *hp, const model_shard *sh, int il)
{
    cuda_layer_w *L = &b->p->layers[il];
    const int64_t E = hp->n_embd, hd = hp->head_dim;
    const int64_t nq = (int64_t)hp->n_head * hd, nkv = (int64_t)hp->n_head_kv * hd;
    const int64_t q0 = (int64_t)sh->head0 * hd, qn = (int64_t)sh->n_head * hd;
    const int64_t k0 = (int64_t)sh->kv_head0 * hd, kn = (int64_t)sh->n_head_kv * hd;
    char name[96];
    const gguf_tensor_t *t;
#define T(fmt, ne0, ne1) (snprintf(name, sizeof name, "blk.%d." fmt, il), find(b, name, ne0, ne1))
    if (!(t = T("attn_norm.weight", E, 1)) || place_vector(b, t, 0, E, 0, &L->attn_norm)) return -1;
    if (!(t = T("ffn_norm.weight", E, 1)) || place_vector(b, t, 0, E, 0, &L->ffn_norm)) return -1;
    L->bqkv = CUDA_NO_OFF;
    if (hp->qkv_bias) {
        size_t bk, bv;
        if (!(t = T("attn_q.bias", nq, 1)) || place_vector(b, t, q0, qn, 0, &L->bqkv)) return -1;
        if (!(t = T("attn_k.bias", nkv, 1)) || place_vector(b, t, k0, kn, 1, &bk)) return -1;
        if (!(t = T("attn_v.bias", nkv, 1)) || place_vector(b, t, k0, kn, 1, &bv)) return -1;
    }
    if (!(t = T("attn_q.weight", E, nq)) || place_matrix(b, t, q0, qn, 0, E, 0, &L->q)) return -1;
    if (!(t = T("attn_k.weight", E, nkv)) || place_matrix(b, t, k0, kn, 0, E, 1, &L->k)) return -1;
    if (!(t = T("attn_v.weight", E, nkv)) || place_matrix(b, t, k0, kn, 0, E, 1, &L->v)) return -1;
    if (!(t = T("attn_output.weight", nq, E)) || place_matrix(b, t, 0, E, q0, qn, 0, &L->o))
        return -1;
    const int64_t f0 = sh->ff0, fn = sh->n_ff;
    if (!(t = T("ffn_gate.weight", E, hp->n_ff)) || place_matrix(b, t, f0, fn, 0, E, 0, &L->gate))
        return -1;
    if (!(t = T("ffn_up.weight", E, hp->n_ff)) || place_matrix(b, t, f0, fn, 0, E, 1, &L->up))
        return -1;
    if (!(t = T("ffn_down.weight", hp->n_ff, E)) || place_matrix(b, t, 0, E, f0, fn, 0, &L->down))
        return -1;
#undef T
    return 0;
}

int cuda_wplan_make(const gguf_t *g, const model_hparams *hp, const model_shard *sh,
                    cuda_precision prec, cuda_wplan *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    wbuild b = {.g = g, .p = out, .exact = prec == CUDA_PREC_EXACT, .err = err, .errlen = errlen};
    b.store_bytes = b.exact ? 4 : 2;
    out->store = b.exact ? CUDA_ACT_F32 : CUDA_ACT_BF16;
    out->rope_freqs = CUDA_NO_OFF;
    out->n_layer = hp->n_layer;
    out->layers = calloc((size_t)(hp->n_layer > 0 ? hp->n_layer : 1), sizeof *out->layers);
    if (!out->layers) {
        set_err(err, errlen, "out of memory planning the GPU weights");
        goto fail;
    }
    const int64_t E = hp->n_embd;
    const gguf_tensor_t *te = find(&b, "token_embd.weight", E, hp->n_vocab), *t;
    if (!te) goto fail;
    if (!cuda_weight_type_supported(te->type)) {
        set_err(err, errlen, "%s: tensor 'token_embd.weight' has type %s, which the GPU does not "
                "read", gguf_path(g), dtype_name(te->type));
        goto fail;
    }
    /* the raw embedding table: looked up in its own type, so rows equal the CPU's */
    cuda_wcopy *c = add_copy(&b);
    if (!c) {
        set_err(err, errlen, "out of memory planning the GPU weights");
        goto fail;
    }
    out->embd_type = te->type;
    out->embd = al(b.cur);
    b.cur = out->embd + te->nbytes;
    c->kind = CUDA_COPY_RAW;
    c->name = te->name;
    c->src = te->data;
    c->type = te->type;
    c->n_in = te->ne[0];
    c->n_rows = te->ne[1];
    c->n_cols = te->ne[0];
    c->dst = out->embd;

    if (!(t = find(&b, "output_norm.weight", E, 1)) || place_vector(&b, t, 0, E, 0, &out->out_norm))
        goto fail;
    t = gguf_find_tensor(g, "output.weight");
    if (t && !(t = find(&b, "output.weight", E, hp->n_vocab))) goto fail;
    if (place_matrix(&b, t ? t : te, sh->vocab0, sh->n_vocab, 0, E, 0, &out->out)) goto fail;
    if (gguf_find_tensor(g, "rope_freqs.weight")) {
        if (!(t = find(&b, "rope_freqs.weight", hp->rope_dims / 2, 1)) ||
            place_vector(&b, t, 0, hp->rope_dims / 2, 0, &out->rope_freqs))
            goto fail;
    }
    for (int il = 0; il < hp->n_layer; il++)
        if (plan_layer(&b, hp, sh, il) != 0) goto fail;
    /* EXACT: Q4_1 block minimums after everything else */
    for (int i = 0; i < out->n_copies; i++) {
        cuda_wdesc *d = b.need_mins[i];
        if (!d) continue;
        d->mins = out->copies[i].mins = al(b.cur);
        b.cur = d->mins + (size_t)d->n_out * (size_t)(d->n_in / 32) * sizeof(float);
    }
    out->bytes = al(b.cur);
    free(b.need_mins);
    return 0;
fail:
    free(b.need_mins);
    cuda_wplan_free(out);
    return -1;
}

void cuda_wplan_free(cuda_wplan *p)
{
    if (!p) return;
    free(p->layers);
    free(p->copies);
    p->layers = NULL;
    p->copies = NULL;
    p->n_layer = p->n_copies = 0;
}

/* ---- KV pool ------------------------------------------------------------------------------------ */

size_t cuda_kv_block_bytes(int n_layer, int n_kv_head, int head_dim, int block_tokens,
                           cuda_kv_type t)
{
    size_t e = cuda_kv_elt_bytes(t);
    if (!e || n_layer < 1 || n_kv_head < 1 || head_dim < 1 || block_tokens < 1) return 0;
    size_t row = (size_t)head_dim * e + (t == CUDA_KV_FP8 ? sizeof(float) : 0);
    return (size_t)n_layer * 2 * (size_t)n_kv_head * (size_t)block_tokens * row;
}

static void kv_sizes(cuda_kv_plan *p)
{
    const size_t rows = (size_t)p->n_blocks * (size_t)p->n_kv_head * (size_t)p->block_tokens;
    p->data_bytes = rows * (size_t)p->head_dim * p->elt_bytes;
    p->scale_bytes = p->type == CUDA_KV_FP8 ? rows * sizeof(float) : 0;
    p->layer_bytes = 2 * al(p->data_bytes) + 2 * al(p->scale_bytes);
    p->bytes = (size_t)p->n_layer * p->layer_bytes;
}

int cuda_kv_plan_make(int n_layer, int n_kv_head, int head_dim, int block_tokens,
                      cuda_kv_type t, size_t bytes, cuda_kv_plan *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    size_t bb = cuda_kv_block_bytes(n_layer, n_kv_head, head_dim, block_tokens, t);
    if (!bb) {
        set_err(err, errlen, "bad KV pool shape (%d layers, %d KV heads, head_dim %d, "
                "block_tokens %d, type %s)", n_layer, n_kv_head, head_dim, block_tokens,
                cuda_kv_type_name(t));
        return -1;
    }
    out->type = t;
    out->n_layer = n_layer;
    out->n_kv_head = n_kv_head;
    out->head_dim = head_dim;
    out->block_tokens = block_tokens;
    out->elt_bytes = cuda_kv_elt_bytes(t);
    out->block_bytes = bb;
    size_t nb = bytes / bb;
    if (nb > INT32_MAX / 2) nb = INT32_MAX / 2;
    out->n_blocks = (int)nb;
    kv_sizes(out);
    while (out->n_blocks > 0 && out->bytes > bytes) { /* alignment padding */
        out->n_blocks--;
        kv_sizes(out);
    }
    if (out->n_blocks < 1) {
        set_err(err, errlen, "%.1f MiB hold no KV block (one takes %.2f MiB: %d layers, %d KV "
                "heads, %d tokens of head_dim %d in %s)", MIB(bytes), MIB(bb), n_layer, n_kv_head,
                block_tokens, head_dim, cuda_kv_type_name(t));
        return -1;
    }
    return 0;
}

void cuda_kv_layer_offsets(const cuda_kv_plan *p, int layer, size_t *k, size_t *v, size_t *ks,
                           size_t *vs)
{
    size_t base = (size_t)layer * p->layer_bytes, d = al(p->data_bytes), s = al(p->scale_bytes);
    if (k) *k = base;
    if (v) *v = base + d;
    if (ks) *ks = p->scale_bytes ? base + 2 * d : CUDA_NO_OFF;
    if (vs) *vs = p->scale_bytes ? base + 2 * d + s : CUDA_NO_OFF;
}

/* ---- workspace ----------------------------------------------------------------------------------- */

#define BLAS_WS_BYTES ((size_t)32 << 20) /* cuBLAS's recommendation for Hopper */
#define SPLIT_CAP 1024

static size_t take(size_t *cur, size_t bytes)
{
    size_t off = al(*cur);
    *cur = off + bytes;
    return off;
}

static void plan_ws(const cuda_plan *p, cuda_ws_plan *w)
{
    const cuda_model_config *c = &p->cfg;
    const model_hparams *hp = &p->hp;
    const model_shard *sh = &p->sh;
    const size_t T = (size_t)c->max_tokens, R = (size_t)c->max_logit_rows, E = (size_t)hp->n_embd;
    const size_t sb = p->w.store == CUDA_ACT_F32 ? 4 : 2;
    const int exact = c->precision == CUDA_PREC_EXACT;
    memset(w, 0, sizeof *w);
    w->max_tokens = c->max_tokens;
    w->max_seqs = c->max_seqs;
    w->max_blocks = (c->max_ctx + c->block_tokens - 1) / c->block_tokens;
    w->max_logit_rows = c->max_logit_rows;
    w->split_cap = SPLIT_CAP;
    int width = hp->n_embd;
    if (p->n_q > width) width = p->n_q;
    if (sh->n_ff > width) width = sh->n_ff;
    w->width = width;
    w->mid_width = p->n_q + 2 * p->n_kv > 2 * sh->n_ff ? p->n_q + 2 * p->n_kv : 2 * sh->n_ff;

    cuda_meta_layout *m = &w->meta;
    size_t n = 0;
    m->tok = n; n += T;
    m->pos = n; n += T;
    m->slot = n; n += T;
    m->lidx = n; n += T;
    m->tiles = n; n += 4 * T;
    m->blocks = n; n += (size_t)c->max_seqs * (size_t)w->max_blocks;
    m->n = n;

    size_t cur = 0;
    w->x = take(&cur, T * E * 4);
    w->xa = take(&cur, T * (size_t)width * sb);
    w->xq = exact ? take(&cur, T * (size_t)width * 4) : CUDA_NO_OFF;
    w->xk = exact ? take(&cur, T * (size_t)width * 4) : CUDA_NO_OFF;
    w->bsum = exact ? take(&cur, T * (size_t)((width + 31) / 32) * 4) : CUDA_NO_OFF;
    w->mid = take(&cur, T * (size_t)w->mid_width * 4);
    w->tmp = sh->tp_size > 1 ? take(&cur, T * E * 4) : CUDA_NO_OFF;
    w->cs = take(&cur, T * (size_t)(hp->rope_dims > 0 ? hp->rope_dims : 1) * 4);
    w->lrows = take(&cur, R * E * 4);
    w->logits = take(&cur, R * (size_t)hp->n_vocab * 4);
    w->lpart = sh->tp_size > 1 ? take(&cur, R * (size_t)sh->n_vocab * 4) : CUDA_NO_OFF;
    w->partial = take(&cur, (size_t)SPLIT_CAP * (size_t)sh->n_head * (size_t)(hp->head_dim + 2) * 4);
    w->meta_d = take(&cur, m->n * 4);
    w->samp = take(&cur, R * sizeof(cuda_sample_row));
    w->pen = take(&cur, R * CUDA_PEN_MAX * 4);
    w->stok = take(&cur, R * 4);
    w->blas_bytes = BLAS_WS_BYTES;
    w->blas = take(&cur, BLAS_WS_BYTES);
    w->bytes = al(cur);
    /* the whole workspace doubles as the staging area of the weight upload */
    size_t stage = p->w.max_row_bytes > CUDA_STAGING_MIN ? al(p->w.max_row_bytes) : CUDA_STAGING_MIN;
    if (w->bytes < stage) w->bytes = stage;
}

/* ---- the whole plan --------------------------------------------------------------------------------- */

int cuda_plan_make(const model_t *m, const cuda_model_config *cfg, size_t mem_free,
                   cuda_plan *out, char *err, size_t errlen)
{
    memset(out, 0, sizeof *out);
    if (!m || !cfg) {
        set_err(err, errlen, "cuda_plan_make: no model or configuration");
        return -1;
    }
    out->hp = *model_hparams_of(m);
    out->sh = *model_shard_of(m);
    out->cfg = *cfg;
    const char *path = gguf_path(model_gguf(m));
    if (cuda_model_config_resolve(&out->cfg, &out->hp, err, errlen) != 0) return -1;
    const cuda_model_config *c = &out->cfg;
    const model_hparams *hp = &out->hp;
    const model_shard *sh = &out->sh;
    out->n_q = sh->n_head * hp->head_dim;
    out->n_kv = sh->n_head_kv * hp->head_dim;
    const int group = sh->n_head / sh->n_head_kv;
    if (sh->n_head % sh->n_head_kv || !cuda_attn_supported(hp->head_dim, group)) {
        set_err(err, errlen, "%s: the GPU attention does not take head_dim %d with %d query heads "
                "per KV head (head_dim a multiple of 8 up to 256, at most 64 heads per KV head, "
                "32 above head_dim 128)", path, hp->head_dim, group);
        return -1;
    }
    out->rows_per_tile = cuda_attn_rows_per_tile(group, hp->head_dim);
    if (cuda_wplan_make(model_gguf(m), hp, sh, c->precision, &out->w, err, errlen) != 0) return -1;
    plan_ws(out, &out->ws);

    size_t budget = c->mem_budget;
    if (!budget) budget = mem_free / 10 * 9;
    if (c->mem_budget && c->mem_budget > mem_free) {
        set_err(err, errlen, "GPU memory budget of %.0f MiB exceeds the %.0f MiB free on cuda:%d",
                MIB(c->mem_budget), MIB(mem_free), c->device);
        goto fail;
    }
    out->budget = budget;
    const size_t fixed = out->w.bytes + out->ws.bytes;
    if (fixed >= budget) {
        set_err(err, errlen, "GPU memory budget of %.0f MiB cannot hold the weights (%.0f MiB, %s) "
                "and the workspace (%.0f MiB for %d tokens per step) of %s", MIB(budget),
                MIB(out->w.bytes), c->precision == CUDA_PREC_EXACT ? "f32" : "bf16",
                MIB(out->ws.bytes), c->max_tokens, path);
        goto fail;
    }
    size_t kv_bytes = c->kv_bytes ? c->kv_bytes : budget - fixed;
    if (kv_bytes > budget - fixed) {
        set_err(err, errlen, "KV pool of %.0f MiB does not fit: the budget of %.0f MiB leaves "
                "%.0f MiB after the weights (%.0f MiB) and the workspace (%.0f MiB)",
                MIB(kv_bytes), MIB(budget), MIB(budget - fixed), MIB(out->w.bytes),
                MIB(out->ws.bytes));
        goto fail;
    }
    size_t bb = cuda_kv_block_bytes(hp->n_layer, sh->n_head_kv, hp->head_dim, c->block_tokens,
                                    c->kv_type);
    size_t one_seq = (size_t)out->ws.max_blocks * bb;
    if (kv_bytes < one_seq + (size_t)2 * CUDA_ALIGN * 2 * hp->n_layer) {
        set_err(err, errlen, "GPU memory: %.0f MiB left for the KV cache, less than one sequence "
                "of max_ctx %d tokens needs (%.0f MiB of %s; weights %.0f MiB, workspace %.0f "
                "MiB, budget %.0f MiB)", MIB(kv_bytes), c->max_ctx, MIB(one_seq),
                cuda_kv_type_name(c->kv_type), MIB(out->w.bytes), MIB(out->ws.bytes), MIB(budget));
        goto fail;
    }
    if (cuda_kv_plan_make(hp->n_layer, sh->n_head_kv, hp->head_dim, c->block_tokens, c->kv_type,
                          kv_bytes, &out->kv, err, errlen) != 0)
        goto fail;
    return 0;
fail:
    cuda_plan_free(out);
    return -1;
}

void cuda_plan_free(cuda_plan *p)
{
    if (p) cuda_wplan_free(&p->w);
}

kv_config cuda_plan_kv_config(const cuda_plan *p)
{
    kv_config c;
    memset(&c, 0, sizeof c);
    c.n_layers = p->hp.n_layer;
    c.n_kv_heads = p->sh.n_head_kv;
    c.kv_head0 = p->sh.kv_head0;
    c.head_dim = p->hp.head_dim;
    c.block_tokens = p->cfg.block_tokens;
    c.dtype = DTYPE_I8; /* the smallest host pool: its data is never used, only its books */
    c.max_seqs = 0;
    c.budget_bytes = kv_block_bytes(&c) * (size_t)p->kv.n_blocks;
    return c;
}

/* ---- attention work ------------------------------------------------------------------------------ */

int cuda_attn_rows_per_tile(int group, int head_dim)
{
    const int max_rows = head_dim <= 128 ? 64 : 32;
    int r = group > 0 ? max_rows / group : 1;
    return r < 1 ? 1 : r;
}

int cuda_attn_splits(int n_tiles, int n_kv_head, int n_sm, int n_tok, int split_cap)
{
    if (n_tiles < 1 || n_kv_head < 1 || n_sm < 1 || n_tok < 1) return 1;
    long items = (long)n_tiles * n_kv_head;
    long want = (2L * n_sm + items - 1) / items;
    if (want > CUDA_ATTN_MAX_SPLITS) want = CUDA_ATTN_MAX_SPLITS;
    if (want > split_cap / n_tok) want = split_cap / n_tok;
    return want < 1 ? 1 : (int)want;
}

int cuda_attn_tiles(const int *n_new, const int *pos0, const int *bt_off, int n_seqs,
                    int rows_per_tile, cuda_attn_tile *tiles, int cap)
{
    if (rows_per_tile < 1) return -1;
    int n = 0, row = 0;
    for (int s = 0; s < n_seqs; s++) {
        for (int i = 0; i < n_new[s]; i += rows_per_tile) {
            if (n == cap) return -1;
            int k = n_new[s] - i < rows_per_tile ? n_new[s] - i : rows_per_tile;
            tiles[n].row0 = row + i;
            tiles[n].n_rows = k;
            tiles[n].pos0 = pos0[s] + i;
            tiles[n].bt_off = bt_off[s];
            n++;
        }
        row += n_new[s];
    }
    return n;
}

/* ---- sampling ---------------------------------------------------------------------------------------- */

int cuda_sample_k(const sample_params *p, int n_vocab)
{
    if (!p || n_vocab < 1) return -1;
    if (!(p->temperature > 0.0f)) return 0;
    const int top_k_on = p->top_k > 0 && p->top_k < n_vocab;
    if (top_k_on && p->top_k <= CUDA_SAMPLE_K_MAX) return p->top_k;
    if (!top_k_on && n_vocab <= CUDA_SAMPLE_K_MAX) return n_vocab;
    return -1;
}

int cuda_sample_penalty_ids(const sample_params *p, const int32_t *history, int n_history,
                            int n_vocab, int32_t *out, int cap)
{
    if (!p || p->repeat_penalty == 1.0f || p->repeat_last_n == 0 || !history || n_history <= 0)
        return 0;
    int n = p->repeat_last_n < 0 || p->repeat_last_n > n_history ? n_history : p->repeat_last_n;
    int k = 0;
    for (int i = n_history - n; i < n_history; i++) {
        int32_t t = history[i];
        if (t < 0 || t >= n_vocab) continue;
        int seen = 0;
        for (int j = 0; j < k && !seen; j++) seen = out[j] == t;
        if (seen) continue;
        if (k == cap) return -1;
        out[k++] = t;
    }
    return k;
}
