/* worker/model.c: Llama-family weights (a TP shard of them) and the CPU forward pass. */
#include "worker/model.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/attn.h"
#include "kernels/matmul.h"
#include "kernels/ops.h"

typedef struct {
    const float *attn_norm;      /* [n_embd] */
    mm_weight wq, wk, wv, wo;    /* wq: [n_head*hd][n_embd] (shard rows), wo: [n_embd][n_head*hd] */
    const float *bq, *bk, *bv;   /* qwen2 biases of the shard's rows, or NULL */
    const float *ffn_norm;       /* [n_embd] */
    mm_weight wgate, wup, wdown; /* gate/up: [n_ff][n_embd], down: [n_embd][n_ff] */
} layer_w;

struct model {
    model_hparams hp;
    model_shard sh;
    gguf_t *gguf;
    dtype_t embd_type;
    const void *embd;            /* token_embd: [n_vocab][n_embd] rows of embd_type */
    const float *out_norm;       /* [n_embd] */
    mm_weight wout;              /* the shard's vocabulary rows: [n_vocab_shard][n_embd] */
    const float *rope_freqs;     /* NULL or [rope_dims/2] */
    layer_w *layers;             /* [n_layer] */
    void **owned;                /* copies made at load (f32 conversions, column shards) */
    int n_owned, cap_owned;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static void *own(model_t *m, size_t bytes)
{
    if (m->n_owned == m->cap_owned) {
        int cap = m->cap_owned ? m->cap_owned * 2 : 64;
        void **p = realloc(m->owned, (size_t)cap * sizeof *p);
        if (!p) return NULL;
        m->owned = p;
        m->cap_owned = cap;
    }
    void *buf = malloc(bytes ? bytes : 1);
    if (buf) m->owned[m->n_owned++] = buf;
    return buf;
}

/* Find a tensor and check its shape: ne0 x ne1 (ne1 = 1 for vectors). */
static const gguf_tensor_t *need(model_t *m, const char *name, int64_t ne0, int64_t ne1,
                                 int optional, char *err, size_t errlen)
{
    const gguf_tensor_t *t = gguf_find_tensor(m->gguf, name);
    if (!t) {
        if (!optional)
            set_err(err, errlen, "%s: tensor '%s' is missing", gguf_path(m->gguf), name);
        return NULL;
    }
    if (t->ne[0] != ne0 || t->ne[1] != ne1 || t->ne[2] != 1 || t->ne[3] != 1) {
        set_err(err, errlen,
                "%s: tensor '%s' has shape [%lld, %lld, %lld, %lld], expected [%lld, %lld]",
                gguf_path(m->gguf), name, (long long)t->ne[0], (long long)t->ne[1],
                (long long)t->ne[2], (long long)t->ne[3], (long long)ne0, (long long)ne1);
        return NULL;
    }
    return t;
}

/* Elements [off, off+n) of a vector tensor as f32 (points into the file when it is f32). */
static const float *vec_f32(model_t *m, const gguf_tensor_t *t, int64_t off, int64_t n,
                            char *err, size_t errlen)
{
    if (off < 0 || n < 0 || off + n > t->ne[0]) {
        set_err(err, errlen, "%s: tensor '%s' has no elements [%lld, %lld)", gguf_path(m->gguf),
                t->name, (long long)off, (long long)(off + n));
        return NULL;
    }
    if (t->type == DTYPE_F32) return (const float *)t->data + off;
    if (dtype_block_elems(t->type) != 1) {
        set_err(err, errlen, "%s: tensor '%s' has type %s; a vector must be f32, f16 or bf16",
                gguf_path(m->gguf), t->name, dtype_name(t->type));
        return NULL;
    }
    float *all = own(m, (size_t)t->ne[0] * sizeof(float));
    if (!all || dtype_to_f32(t->type, t->data, all, t->ne[0]) != 0) {
        set_err(err, errlen, "%s: cannot convert tensor '%s'", gguf_path(m->gguf), t->name);
        return NULL;
    }
    return all + off;
}

/* A matrix shard by rows [r0, r0 + nr): points into the file. */
static int mat_rows(model_t *m, const gguf_tensor_t *t, int64_t r0, int64_t nr, mm_weight *w,
                    char *err, size_t errlen)
{
    if (!mm_supported(t->type)) {
        set_err(err, errlen, "%s: tensor '%s' has type %s, which matrix products do not support",
                gguf_path(m->gguf), t->name, dtype_name(t->type));
        return -1;
    }
    size_t rb = dtype_row_bytes(t->type, t->ne[0]);
    w->type = t->type;
    w->n_in = t->ne[0];
    w->n_out = nr;
    w->data = (const uint8_t *)t->data + (size_t)r0 * rb;
    return 0;
}

/* A matrix shard by columns [c0, c0 + nc): copied once, row by row. */
static int mat_cols(model_t *m, const gguf_tensor_t *t, int64_t c0, int64_t nc, mm_weight *w,
                    char *err, size_t errlen)
{
    if (mat_rows(m, t, 0, t->ne[1], w, err, errlen) != 0) return -1;
    if (c0 == 0 && nc == t->ne[0]) return 0;
    size_t be = dtype_block_elems(t->type);
    if (c0 % (int64_t)be || nc % (int64_t)be) {
        set_err(err, errlen,
                "%s: tensor '%s': the shard's columns [%lld, %lld) do not fall on %s block "
                "boundaries (%zu); choose another tp_size",
                gguf_path(m->gguf), t->name, (long long)c0, (long long)(c0 + nc),
                dtype_name(t->type), be);
        return -1;
    }
    size_t src_rb = dtype_row_bytes(t->type, t->ne[0]);
    size_t off = dtype_row_bytes(t->type, c0), rb = dtype_row_bytes(t->type, nc);
    uint8_t *dst = own(m, rb * (size_t)t->ne[1]);
    if (!dst) {
        set_err(err, errlen, "out of memory copying the shard of '%s'", t->name);
        return -1;
    }
    for (int64_t r = 0; r < t->ne[1]; r++)
        memcpy(dst + (size_t)r * rb, (const uint8_t *)t->data + (size_t)r * src_rb + off, rb);
    w->n_in = nc;
    w->data = dst;
    return 0;
}

static int get_int_key(model_t *m, const char *key, int64_t def, int required, int64_t *out,
                       char *err, size_t errlen)
{
    int rc = gguf_get_int(m->gguf, key, out);
    if (rc == GGUF_ENOKEY && !required) {
        *out = def;
        return 0;
    }
    if (rc != GGUF_OK || *out <= 0 || *out > (1 << 30)) {
        set_err(err, errlen, "%s: metadata '%s' is %s", gguf_path(m->gguf), key,
                rc == GGUF_ENOKEY ? "missing" : rc != GGUF_OK ? "not an integer" : "out of range");
        return -1;
    }
    return 0;
}

static int read_hparams(model_t *m, char *err, size_t errlen)
{
    model_hparams *hp = &m->hp;
    const char *path = gguf_path(m->gguf);
    const char *s;
    size_t len;
    if (gguf_get_str(m->gguf, "general.architecture", &s, &len) != GGUF_OK) {
        set_err(err, errlen, "%s: metadata 'general.architecture' is missing", path);
        return -1;
    }
    if (!(len == 5 && memcmp(s, "llama", 5) == 0) && !(len == 5 && memcmp(s, "qwen2", 5) == 0)) {
        set_err(err, errlen, "%s: architecture '%.*s' is not supported (llama, qwen2 are)", path,
                (int)(len > 32 ? 32 : len), s);
        return -1;
    }
    memcpy(hp->arch, s, len);
    hp->arch[len] = '\0';
    char key[128];
    int64_t v;
#define KEY(suffix) (snprintf(key, sizeof key, "%s.%s", hp->arch, suffix), key)
    if (get_int_key(m, KEY("embedding_length"), 0, 1, &v, err, errlen)) return -1;
    hp->n_embd = (int)v;
    if (get_int_key(m, KEY("block_count"), 0, 1, &v, err, errlen)) return -1;
    hp->n_layer = (int)v;
    if (get_int_key(m, KEY("feed_forward_length"), 0, 1, &v, err, errlen)) return -1;
    hp->n_ff = (int)v;
    if (get_int_key(m, KEY("attention.head_count"), 0, 1, &v, err, errlen)) return -1;
    hp->n_head = (int)v;
    if (get_int_key(m, KEY("attention.head_count_kv"), hp->n_head, 0, &v, err, errlen)) return -1;
    hp->n_head_kv = (int)v;
    if (get_int_key(m, KEY("context_length"), 4096, 0, &v, err, errlen)) return -1;
    hp->n_ctx_train = (int)v;
    if (hp->n_embd % hp->n_head) {
        set_err(err, errlen, "%s: embedding_length %d is not a multiple of head_count %d", path,
                hp->n_embd, hp->n_head);
        return -1;
    }
    if (get_int_key(m, KEY("attention.key_length"), hp->n_embd / hp->n_head, 0, &v, err, errlen))
        return -1;
    hp->head_dim = (int)v;
    if (hp->n_head % hp->n_head_kv) {
        set_err(err, errlen, "%s: head_count %d is not a multiple of head_count_kv %d", path,
                hp->n_head, hp->n_head_kv);
        return -1;
    }
    if (get_int_key(m, KEY("rope.dimension_count"), hp->head_dim, 0, &v, err, errlen)) return -1;
    hp->rope_dims = (int)v;
    if (hp->rope_dims > hp->head_dim || hp->rope_dims % 2) {
        set_err(err, errlen, "%s: rope.dimension_count %d does not fit head dimension %d", path,
                hp->rope_dims, hp->head_dim);
        return -1;
    }
    double d;
    hp->rms_eps = 1e-5f;
    if (gguf_get_float(m->gguf, KEY("attention.layer_norm_rms_epsilon"), &d) == GGUF_OK)
        hp->rms_eps = (float)d;
    hp->rope_base = 10000.0f;
    if (gguf_get_float(m->gguf, KEY("rope.freq_base"), &d) == GGUF_OK) hp->rope_base = (float)d;
    hp->rope_freq_scale = 1.0f;
    if (gguf_get_str(m->gguf, KEY("rope.scaling.type"), &s, &len) == GGUF_OK) {
        if (len == 6 && memcmp(s, "linear", 6) == 0) {
            if (gguf_get_float(m->gguf, KEY("rope.scaling.factor"), &d) == GGUF_OK && d > 0)
                hp->rope_freq_scale = (float)(1.0 / d);
        } else if (!(len == 4 && memcmp(s, "none", 4) == 0)) {
            set_err(err, errlen, "%s: rope.scaling.type '%.*s' is not supported (linear is)", path,
                    (int)(len > 32 ? 32 : len), s);
            return -1;
        }
    } else if (gguf_get_float(m->gguf, KEY("rope.scale_linear"), &d) == GGUF_OK && d > 0) {
        hp->rope_freq_scale = (float)(1.0 / d);
    }
#undef KEY
    hp->rope_mode = strcmp(hp->arch, "qwen2") == 0 ? ROPE_NEOX : ROPE_NORMAL;
    hp->qkv_bias = strcmp(hp->arch, "qwen2") == 0;
    return 0;
}

static int make_shard(model_t *m, int rank, int size, char *err, size_t errlen)
{
    const model_hparams *hp = &m->hp;
    model_shard *sh = &m->sh;
    if (size < 1 || rank < 0 || rank >= size) {
        set_err(err, errlen, "tp_rank %d is outside tp_size %d", rank, size);
        return -1;
    }
    if (hp->n_head % size) {
        set_err(err, errlen,
                "%s: tp_size %d does not divide the %d query heads; use a divisor of %d",
                gguf_path(m->gguf), size, hp->n_head, hp->n_head);
        return -1;
    }
    if (hp->n_head_kv % size && size % hp->n_head_kv) {
        set_err(err, errlen,
                "%s: tp_size %d neither divides nor is a multiple of the %d KV heads",
                gguf_path(m->gguf), size, hp->n_head_kv);
        return -1;
    }
    if (hp->n_ff % size) {
        set_err(err, errlen, "%s: tp_size %d does not divide feed_forward_length %d",
                gguf_path(m->gguf), size, hp->n_ff);
        return -1;
    }
    const int group = hp->n_head / hp->n_head_kv;
    sh->tp_rank = rank;
    sh->tp_size = size;
    sh->n_head = hp->n_head / size;
    sh->head0 = rank * sh->n_head;
    sh->kv_head0 = sh->head0 / group;
    sh->n_head_kv = (sh->head0 + sh->n_head - 1) / group + 1 - sh->kv_head0;
    sh->n_ff = hp->n_ff / size;
    sh->ff0 = rank * sh->n_ff;
    sh->vocab0 = (int)((int64_t)hp->n_vocab * rank / size);
    sh->n_vocab = (int)((int64_t)hp->n_vocab * (rank + 1) / size) - sh->vocab0;
    return 0;
}

static int load_layer(model_t *m, int il, char *err, size_t errlen)
{
    const model_hparams *hp = &m->hp;
    const model_shard *sh = &m->sh;
    layer_w *L = &m->layers[il];
    const int64_t E = hp->n_embd, hd = hp->head_dim;
    const int64_t nq = (int64_t)hp->n_head * hd, nkv = (int64_t)hp->n_head_kv * hd;
    char name[96];
    const gguf_tensor_t *t;
#define T(fmt, ne0, ne1) (snprintf(name, sizeof name, "blk.%d." fmt, il), \
                          need(m, name, ne0, ne1, 0, err, errlen))
    if (!(t = T("attn_norm.weight", E, 1)) || !(L->attn_norm = vec_f32(m, t, 0, E, err, errlen)))
        return -1;
    if (!(t = T("ffn_norm.weight", E, 1)) || !(L->ffn_norm = vec_f32(m, t, 0, E, err, errlen)))
        return -1;
    if (!(t = T("attn_q.weight", E, nq)) ||
        mat_rows(m, t, sh->head0 * hd, sh->n_head * hd, &L->wq, err, errlen))
        return -1;
    if (!(t = T("attn_k.weight", E, nkv)) ||
        mat_rows(m, t, sh->kv_head0 * hd, sh->n_head_kv * hd, &L->wk, err, errlen))
        return -1;
    if (!(t = T("attn_v.weight", E, nkv)) ||
        mat_rows(m, t, sh->kv_head0 * hd, sh->n_head_kv * hd, &L->wv, err, errlen))
        return -1;
    if (!(t = T("attn_output.weight", nq, E)) ||
        mat_cols(m, t, sh->head0 * hd, sh->n_head * hd, &L->wo, err, errlen))
        return -1;
    if (!(t = T("ffn_gate.weight", E, hp->n_ff)) ||
        mat_rows(m, t, sh->ff0, sh->n_ff, &L->wgate, err, errlen))
        return -1;
    if (!(t = T("ffn_up.weight", E, hp->n_ff)) ||
        mat_rows(m, t, sh->ff0, sh->n_ff, &L->wup, err, errlen))
        return -1;
    if (!(t = T("ffn_down.weight", hp->n_ff, E)) ||
        mat_cols(m, t, sh->ff0, sh->n_ff, &L->wdown, err, errlen))
        return -1;
    if (hp->qkv_bias) {
        if (!(t = T("attn_q.bias", nq, 1)) ||
            !(L->bq = vec_f32(m, t, sh->head0 * hd, sh->n_head * hd, err, errlen)))
            return -1;
        if (!(t = T("attn_k.bias", nkv, 1)) ||
            !(L->bk = vec_f32(m, t, sh->kv_head0 * hd, sh->n_head_kv * hd, err, errlen)))
            return -1;
        if (!(t = T("attn_v.bias", nkv, 1)) ||
            !(L->bv = vec_f32(m, t, sh->kv_head0 * hd, sh->n_head_kv * hd, err, errlen)))
            return -1;
    }
#undef T
    return 0;
}

int model_load(const char *path, int tp_rank, int tp_size, model_t **out, char *err,
               size_t errlen)
{
    *out = NULL;
    model_t *m = calloc(1, sizeof *m);
    if (!m) {
        set_err(err, errlen, "out of memory");
        return -1;
    }
    if (gguf_open(path, &m->gguf, err, errlen) != 0) goto fail;
    if (read_hparams(m, err, errlen) != 0) goto fail;

    const gguf_tensor_t *te = gguf_find_tensor(m->gguf, "token_embd.weight");
    if (!te || te->n_dims != 2 || te->ne[0] != m->hp.n_embd) {
        set_err(err, errlen, "%s: tensor 'token_embd.weight' is %s", path,
                te ? "not [n_embd, n_vocab]" : "missing");
        goto fail;
    }
    m->hp.n_vocab = (int)te->ne[1];
    m->embd_type = te->type;
    m->embd = te->data;
    if (make_shard(m, tp_rank, tp_size, err, errlen) != 0) goto fail;

    const gguf_tensor_t *t;
    if (!(t = need(m, "output_norm.weight", m->hp.n_embd, 1, 0, err, errlen)) ||
        !(m->out_norm = vec_f32(m, t, 0, m->hp.n_embd, err, errlen)))
        goto fail;
    t = need(m, "output.weight", m->hp.n_embd, m->hp.n_vocab, 1, err, errlen);
    if (!t && gguf_find_tensor(m->gguf, "output.weight")) goto fail; /* present, bad shape */
    m->hp.tied_output = t == NULL;
    if (mat_rows(m, t ? t : te, m->sh.vocab0, m->sh.n_vocab, &m->wout, err, errlen)) goto fail;
    t = need(m, "rope_freqs.weight", m->hp.rope_dims / 2, 1, 1, err, errlen);
    if (t && !(m->rope_freqs = vec_f32(m, t, 0, m->hp.rope_dims / 2, err, errlen))) goto fail;
    if (!t && gguf_find_tensor(m->gguf, "rope_freqs.weight")) goto fail;

    m->layers = calloc((size_t)m->hp.n_layer, sizeof *m->layers);
    if (!m->layers) {
        set_err(err, errlen, "out of memory");
        goto fail;
    }
    for (int il = 0; il < m->hp.n_layer; il++)
        if (load_layer(m, il, err, errlen) != 0) goto fail;
    *out = m;
    return 0;
fail:
    model_destroy(&m);
    return -1;
}

void model_destroy(model_t **self_p)
{
    if (!self_p || !*self_p) return;
    model_t *m = *self_p;
    for (int i = 0; i < m->n_owned; i++) free(m->owned[i]);
    free(m->owned);
    free(m->layers);
    gguf_close(&m->gguf);
    free(m);
    *self_p = NULL;
}

const model_hparams *model_hparams_of(const model_t *m) { return &m->hp; }
const model_shard *model_shard_of(const model_t *m) { return &m->sh; }
const gguf_t *model_gguf(const model_t *m) { return m->gguf; }

kv_config model_kv_config(const model_t *m, dtype_t kv_type, size_t budget_bytes)
{
    kv_config c;
    memset(&c, 0, sizeof c);
    c.n_layers = m->hp.n_layer;
    c.n_kv_heads = m->sh.n_head_kv;
    c.kv_head0 = m->sh.kv_head0;
    c.head_dim = m->hp.head_dim;
    c.block_tokens = 16;
    c.dtype = kv_type;
    c.budget_bytes = budget_bytes;
    return c;
}

static size_t wbytes(const mm_weight *w) { return dtype_row_bytes(w->type, w->n_in) * (size_t)w->n_out; }

size_t model_weight_bytes(const model_t *m)
{
    size_t b = wbytes(&m->wout);
    for (int il = 0; il < m->hp.n_layer; il++) {
        const layer_w *L = &m->layers[il];
        b += wbytes(&L->wq) + wbytes(&L->wk) + wbytes(&L->wv) + wbytes(&L->wo) +
             wbytes(&L->wgate) + wbytes(&L->wup) + wbytes(&L->wdown);
    }
    return b;
}

/* ---- forward pass ---------------------------------------------------------------- */

struct model_ctx {
    pool_t *pool;
    mm_scratch *ws;
    int max_tokens;
    int n_embd, n_q, n_kv, n_ff, n_vocab_shard, n_vocab, rope_dims;
    float *x;         /* [max_tokens][n_embd] residual stream */
    float *tmp;       /* [max_tokens][n_embd] partial sums (TP) and logit rows */
    float *q;         /* [max_tokens][n_q] */
    float *k, *v;     /* [max_tokens][n_kv] */
    float *att;       /* [max_tokens][n_q] */
    float *gate, *up; /* [max_tokens][n_ff] */
    float *rope_cs;   /* [max_tokens][rope_dims] */
    float *part;      /* TP: [max_tokens][n_vocab_shard] */
    int32_t *tok, *pos, *seq; /* [max_tokens] */
    attn_query *rows; /* [max_tokens] */
    model_collectives coll;
    model_progress_fn progress; /* after every layer, or NULL */
    void *progress_user;
};

int model_ctx_new(const model_t *m, int max_tokens, int n_threads, model_ctx_t **out)
{
    *out = NULL;
    if (max_tokens < 1 || n_threads < 1) return -1;
    model_ctx_t *c = calloc(1, sizeof *c);
    if (!c) return -1;
    const model_hparams *hp = &m->hp;
    const size_t T = (size_t)max_tokens;
    c->max_tokens = max_tokens;
    c->n_embd = hp->n_embd;
    c->n_q = m->sh.n_head * hp->head_dim;
    c->n_kv = m->sh.n_head_kv * hp->head_dim;
    c->n_ff = m->sh.n_ff;
    c->n_vocab = hp->n_vocab;
    c->n_vocab_shard = m->sh.n_vocab;
    c->rope_dims = hp->rope_dims;
    int ok = pool_new(n_threads, &c->pool) == 0 && mm_scratch_new(&c->ws) == 0;
    ok = ok && (c->x = malloc(T * c->n_embd * sizeof(float)));
    ok = ok && (c->tmp = malloc(T * c->n_embd * sizeof(float)));
    ok = ok && (c->q = malloc(T * c->n_q * sizeof(float)));
    ok = ok && (c->att = malloc(T * c->n_q * sizeof(float)));
    ok = ok && (c->k = malloc(T * c->n_kv * sizeof(float)));
    ok = ok && (c->v = malloc(T * c->n_kv * sizeof(float)));
    ok = ok && (c->gate = malloc(T * c->n_ff * sizeof(float)));
    ok = ok && (c->up = malloc(T * c->n_ff * sizeof(float)));
    ok = ok && (c->rope_cs = malloc(T * (c->rope_dims ? c->rope_dims : 1) * sizeof(float)));
    ok = ok && (c->tok = malloc(T * sizeof(int32_t)));
    ok = ok && (c->pos = malloc(T * sizeof(int32_t)));
    ok = ok && (c->seq = malloc(T * sizeof(int32_t)));
    ok = ok && (c->rows = malloc(T * sizeof(attn_query)));
    if (ok && m->sh.tp_size > 1) ok = (c->part = malloc(T * c->n_vocab_shard * sizeof(float))) != NULL;
    int64_t widest = hp->n_embd > m->sh.n_ff ? hp->n_embd : m->sh.n_ff;
    if (widest < c->n_q) widest = c->n_q;
    ok = ok && mm_scratch_reserve(c->ws, widest, max_tokens, n_threads) == 0;
    if (!ok) {
        model_ctx_destroy(&c);
        return -1;
    }
    *out = c;
    return 0;
}

void model_ctx_destroy(model_ctx_t **self_p)
{
    if (!self_p || !*self_p) return;
    model_ctx_t *c = *self_p;
    pool_destroy(&c->pool);
    mm_scratch_destroy(&c->ws);
    free(c->x);
    free(c->tmp);
    free(c->q);
    free(c->att);
    free(c->k);
    free(c->v);
    free(c->gate);
    free(c->up);
    free(c->rope_cs);
    free(c->part);
    free(c->tok);
    free(c->pos);
    free(c->seq);
    free(c->rows);
    free(c);
    *self_p = NULL;
}

pool_t *model_ctx_pool(model_ctx_t *ctx) { return ctx->pool; }

void model_ctx_set_collectives(model_ctx_t *ctx, const model_collectives *c) { ctx->coll = *c; }

void model_ctx_set_progress(model_ctx_t *ctx, model_progress_fn fn, void *user)
{
    ctx->progress = fn;
    ctx->progress_user = user;
}

/* y (+)= x·Wᵀ for one weight (x replaced by silu(x) * up when up is given); in a TP group the partial sums are all-reduced first. */
static int project_add(model_ctx_t *c, int tp, const mm_weight *w, const float *x, const float *up,
                       int n_tok, float *y)
{
    mm_input in = {.x = x, .n_tok = n_tok, .up = up};
    if (tp == 1) {
        mm_job job = {.w = w, .y = y, .add = 1};
        return mm_run(c->pool, &in, &job, 1, c->ws);
    }
    mm_job job = {.w = w, .y = c->tmp};
    if (mm_run(c->pool, &in, &job, 1, c->ws) != 0) return -1;
    size_t n = (size_t)n_tok * w->n_out;
    if (c->coll.allreduce_sum(c->coll.user, c->tmp, n) != 0) return -1;
    ops_add(y, y, c->tmp, (int64_t)n);
    return 0;
}

int model_forward(model_ctx_t *c, const model_t *m, kv_cache_t *kv, const model_seq_batch *b,
                  int n_seqs, float *logits, char *err, size_t errlen)
{
    const model_hparams *hp = &m->hp;
    const int hd = hp->head_dim, E = hp->n_embd, tp = m->sh.tp_size;
    if (tp > 1 && (!c->coll.allreduce_sum || !c->coll.gather_vocab)) {
        set_err(err, errlen, "tp_size %d needs collectives (model_ctx_set_collectives)", tp);
        return -1;
    }
    /* Flatten the batch into token rows. */
    int T = 0, n_logit_rows = 0;
    for (int s = 0; s < n_seqs; s++) {
        const model_seq_batch *sb = &b[s];
        int len = kv_seq_len(kv, sb->seq);
        if (len < 0) {
            set_err(err, errlen, "batch entry %d: unknown KV sequence %d", s, sb->seq);
            return -1;
        }
        if (sb->n_tokens < 1 || sb->pos0 < 0 || sb->pos0 + sb->n_tokens > len) {
            set_err(err, errlen,
                    "batch entry %d: tokens [%d, %d) of sequence %d are not reserved in the KV "
                    "cache (it holds %d)", s, sb->pos0, sb->pos0 + sb->n_tokens, sb->seq, len);
            return -1;
        }
        if (T + sb->n_tokens > c->max_tokens) {
            set_err(err, errlen, "batch of more than %d tokens (the context's limit)",
                    c->max_tokens);
            return -1;
        }
        int nb;
        const int32_t *blocks = kv_seq_blocks(kv, sb->seq, &nb);
        for (int i = 0; i < sb->n_tokens; i++, T++) {
            c->tok[T] = sb->tokens[i];
            c->pos[T] = sb->pos0 + i;
            c->seq[T] = sb->seq;
            c->rows[T].blocks = blocks;
            c->rows[T].pos = sb->pos0 + i;
        }
        n_logit_rows += sb->logits == 2 ? sb->n_tokens : sb->logits == 1 ? 1 : 0;
    }
    if (T == 0) return 0;
    if (ops_embed(c->x, m->embd_type, m->embd, hp->n_vocab, E, c->tok, T) != 0) {
        for (int t = 0; t < T; t++)
            if (c->tok[t] < 0 || c->tok[t] >= hp->n_vocab) {
                set_err(err, errlen, "token id %d is outside the vocabulary [0, %d)", c->tok[t],
                        hp->n_vocab);
                return -1;
            }
        set_err(err, errlen, "embedding lookup failed (type %s)", dtype_name(m->embd_type));
        return -1;
    }
    ops_rope_params rp = {.n_dims = hp->rope_dims, .freq_base = hp->rope_base,
                          .freq_scale = hp->rope_freq_scale, .freq_factors = m->rope_freqs,
                          .mode = hp->rope_mode == ROPE_NEOX ? OPS_ROPE_NEOX : OPS_ROPE_NORMAL};
    for (int t = 0; t < T; t++) ops_rope_cache(c->rope_cs + (size_t)t * c->rope_dims, c->pos[t], &rp);

    const kv_config *kc = kv_config_of(kv);
    const float scale = 1.0f / sqrtf((float)hd);
    const int nh = m->sh.n_head, nkv = m->sh.n_head_kv;
    for (int il = 0; il < hp->n_layer; il++) {
        const layer_w *L = &m->layers[il];
        mm_input in = {.x = c->x, .n_tok = T, .rms_w = L->attn_norm, .rms_eps = hp->rms_eps};
        mm_job qkv[3] = {{.w = &L->wq, .y = c->q, .bias = L->bq}, {.w = &L->wk, .y = c->k, .bias = L->bk},
                         {.w = &L->wv, .y = c->v, .bias = L->bv}};
        if (mm_run(c->pool, &in, qkv, 3, c->ws) != 0) goto mm_fail;
        for (int t = 0; t < T; t++) {
            float *qt = c->q + (size_t)t * c->n_q, *kt = c->k + (size_t)t * c->n_kv;
            float *vt = c->v + (size_t)t * c->n_kv;
            const float *cs = c->rope_cs + (size_t)t * c->rope_dims;
            ops_rope_apply(qt, nh, hd, cs, hp->rope_dims, rp.mode);
            ops_rope_apply(kt, nkv, hd, cs, hp->rope_dims, rp.mode);
            kv_status ks = kv_store(kv, c->seq[t], il, c->pos[t], kt, vt);
            if (ks != KV_OK) {
                set_err(err, errlen, "layer %d: storing K/V of sequence %d position %d: %s", il,
                        c->seq[t], c->pos[t], kv_strerror(ks));
                return -1;
            }
        }
        if (c->progress) c->progress(c->progress_user, il);
        attn_kv_view view = {.dtype = kc->dtype, .n_kv_head = nkv, .head_dim = hd,
                             .block_tokens = kc->block_tokens,
                             .k = kv_k_layer(kv, il), .v = kv_v_layer(kv, il)};
        if (kc->dtype == DTYPE_I8) {
            view.k_scale = kv_k_scales(kv, il, 0);
            view.v_scale = kv_v_scales(kv, il, 0);
        }
        if (attn_paged(c->pool, &view, c->rows, T, nh, c->q, scale, c->att) != 0) {
            set_err(err, errlen, "layer %d: attention over KV type %s failed", il,
                    dtype_name(kc->dtype));
            return -1;
        }
        if (project_add(c, tp, &L->wo, c->att, NULL, T, c->x) != 0) goto mm_fail;

        mm_input fin = {.x = c->x, .n_tok = T, .rms_w = L->ffn_norm, .rms_eps = hp->rms_eps};
        mm_job gu[2] = {{.w = &L->wgate, .y = c->gate}, {.w = &L->wup, .y = c->up}};
        if (mm_run(c->pool, &fin, gu, 2, c->ws) != 0) goto mm_fail;
        /* down(silu(gate) * up): SwiGLU is applied as the down projection reads its input */
        if (project_add(c, tp, &L->wdown, c->gate, c->up, T, c->x) != 0) goto mm_fail;
    }
    if (n_logit_rows == 0) return 0;

    /* Logit rows: gather the residual rows that want logits, normalize, project. */
    int r = 0, t0 = 0;
    for (int s = 0; s < n_seqs; s++) {
        const model_seq_batch *sb = &b[s];
        int first = sb->logits == 2 ? 0 : sb->n_tokens - 1;
        if (sb->logits)
            for (int i = first; i < sb->n_tokens; i++, r++)
                memcpy(c->tmp + (size_t)r * E, c->x + (size_t)(t0 + i) * E, (size_t)E * sizeof(float));
        t0 += sb->n_tokens;
    }
    mm_input oin = {.x = c->tmp, .n_tok = n_logit_rows, .rms_w = m->out_norm, .rms_eps = hp->rms_eps};
    mm_job oj = {.w = &m->wout, .y = tp > 1 ? c->part : logits};
    if (mm_run(c->pool, &oin, &oj, 1, c->ws) != 0) goto mm_fail;
    if (tp > 1 && c->coll.gather_vocab(c->coll.user, c->part, n_logit_rows, logits) != 0) {
        set_err(err, errlen, "gathering the vocabulary shards failed");
        return -1;
    }
    return 0;
mm_fail:
    set_err(err, errlen, "matrix product failed (unsupported weight type or out of memory)");
    return -1;
}
