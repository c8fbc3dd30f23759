/* tests/support/gguf_write.c: GGUF writer and random-model generator; see gguf_write.h. */
#include "tests/support/gguf_write.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint8_t *p;
    size_t len, cap;
    int oom;
} bytes_t;

static void put(bytes_t *b, const void *src, size_t n)
{
    if (b->oom || n == 0) return;
    if (b->len + n > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->len + n) cap *= 2;
        uint8_t *p = realloc(b->p, cap);
        if (!p) {
            b->oom = 1;
            return;
        }
        b->p = p;
        b->cap = cap;
    }
    memcpy(b->p + b->len, src, n);
    b->len += n;
}

static void put_u32(bytes_t *b, uint32_t v) { put(b, &v, 4); }
static void put_u64(bytes_t *b, uint64_t v) { put(b, &v, 8); }
static void put_str(bytes_t *b, const char *s, size_t n)
{
    put_u64(b, n);
    put(b, s, n);
}

typedef struct {
    char *name;
    dtype_t type;
    int n_dims;
    int64_t ne[4];
    void *data;
    size_t nbytes;
} wtensor_t;

struct gguf_writer {
    uint32_t version;
    uint32_t alignment;
    bytes_t kv;          /* serialized metadata entries */
    uint64_t n_kv;
    wtensor_t *tensors;
    size_t n_tensors, cap_tensors;
};

int gguf_writer_new(gguf_writer_t **out)
{
    *out = calloc(1, sizeof **out);
    if (!*out) return -1;
    (*out)->version = 3;
    (*out)->alignment = GGUF_DEFAULT_ALIGNMENT;
    return 0;
}

void gguf_writer_destroy(gguf_writer_t **self_p)
{
    if (!self_p || !*self_p) return;
    gguf_writer_t *w = *self_p;
    for (size_t i = 0; i < w->n_tensors; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].data);
    }
    free(w->tensors);
    free(w->kv.p);
    free(w);
    *self_p = NULL;
}

void gguf_writer_set_version(gguf_writer_t *w, uint32_t version) { w->version = version; }

void gguf_writer_set_alignment(gguf_writer_t *w, uint32_t alignment)
{
    w->alignment = alignment;
    if (alignment != GGUF_DEFAULT_ALIGNMENT) gguf_w_u32(w, "general.alignment", alignment);
}

static int kv_head(gguf_writer_t *w, const char *key, gguf_type_t t)
{
    put_str(&w->kv, key, strlen(key));
    put_u32(&w->kv, (uint32_t)t);
    w->n_kv++;
    return w->kv.oom ? -1 : 0;
}

static int kv_scalar(gguf_writer_t *w, const char *key, gguf_type_t t, const void *v, size_t n)
{
    kv_head(w, key, t);
    put(&w->kv, v, n);
    return w->kv.oom ? -1 : 0;
}

int gguf_w_u8(gguf_writer_t *w, const char *k, uint8_t v) { return kv_scalar(w, k, GGUF_TYPE_UINT8, &v, 1); }
int gguf_w_i8(gguf_writer_t *w, const char *k, int8_t v) { return kv_scalar(w, k, GGUF_TYPE_INT8, &v, 1); }
int gguf_w_u16(gguf_writer_t *w, const char *k, uint16_t v) { return kv_scalar(w, k, GGUF_TYPE_UINT16, &v, 2); }
int gguf_w_i16(gguf_writer_t *w, const char *k, int16_t v) { return kv_scalar(w, k, GGUF_TYPE_INT16, &v, 2); }
int gguf_w_u32(gguf_writer_t *w, const char *k, uint32_t v) { return kv_scalar(w, k, GGUF_TYPE_UINT32, &v, 4); }
int gguf_w_i32(gguf_writer_t *w, const char *k, int32_t v) { return kv_scalar(w, k, GGUF_TYPE_INT32, &v, 4); }
int gguf_w_u64(gguf_writer_t *w, const char *k, uint64_t v) { return kv_scalar(w, k, GGUF_TYPE_UINT64, &v, 8); }
int gguf_w_i64(gguf_writer_t *w, const char *k, int64_t v) { return kv_scalar(w, k, GGUF_TYPE_INT64, &v, 8); }
int gguf_w_f32(gguf_writer_t *w, const char *k, float v) { return kv_scalar(w, k, GGUF_TYPE_FLOAT32, &v, 4); }
int gguf_w_f64(gguf_writer_t *w, const char *k, double v) { return kv_scalar(w, k, GGUF_TYPE_FLOAT64, &v, 8); }

int gguf_w_bool(gguf_writer_t *w, const char *k, int v)
{
    uint8_t b = v ? 1 : 0;
    return kv_scalar(w, k, GGUF_TYPE_BOOL, &b, 1);
}

int gguf_w_str_n(gguf_writer_t *w, const char *key, const char *s, size_t len)
{
    kv_head(w, key, GGUF_TYPE_STRING);
    put_str(&w->kv, s, len);
    return w->kv.oom ? -1 : 0;
}

int gguf_w_str(gguf_writer_t *w, const char *key, const char *s)
{
    return gguf_w_str_n(w, key, s, strlen(s));
}

int gguf_w_arr(gguf_writer_t *w, const char *key, gguf_type_t et, const void *data, uint64_t n)
{
    size_t es = gguf_type_size(et);
    if (es == 0) return -1;
    kv_head(w, key, GGUF_TYPE_ARRAY);
    put_u32(&w->kv, (uint32_t)et);
    put_u64(&w->kv, n);
    put(&w->kv, data, (size_t)n * es);
    return w->kv.oom ? -1 : 0;
}

int gguf_w_arr_str(gguf_writer_t *w, const char *key, const char *const *strs,
                   const size_t *lens, uint64_t n)
{
    kv_head(w, key, GGUF_TYPE_ARRAY);
    put_u32(&w->kv, GGUF_TYPE_STRING);
    put_u64(&w->kv, n);
    for (uint64_t i = 0; i < n; i++) put_str(&w->kv, strs[i], lens ? lens[i] : strlen(strs[i]));
    return w->kv.oom ? -1 : 0;
}

int gguf_w_copy_kv(gguf_writer_t *w, const gguf_t *src, int64_t kv)
{
    const char *key = gguf_kv_key(src, kv);
    if (!key) return -1;
    gguf_type_t t = gguf_kv_type(src, kv);
    if (t == GGUF_TYPE_STRING) {
        const char *s;
        size_t len;
        gguf_get_str(src, key, &s, &len);
        return gguf_w_str_n(w, key, s, len);
    }
    if (t != GGUF_TYPE_ARRAY) {
        /* scalars: the value bytes follow the key and type in the source file; find them
         * through the typed getters (every scalar is at most 8 bytes) */
        uint8_t v[8] = {0};
        switch (t) {
        case GGUF_TYPE_UINT8: gguf_get_u8(src, key, (uint8_t *)v); break;
        case GGUF_TYPE_INT8: gguf_get_i8(src, key, (int8_t *)v); break;
        case GGUF_TYPE_UINT16: { uint16_t x; gguf_get_u16(src, key, &x); memcpy(v, &x, 2); break; }
        case GGUF_TYPE_INT16: { int16_t x; gguf_get_i16(src, key, &x); memcpy(v, &x, 2); break; }
        case GGUF_TYPE_UINT32: { uint32_t x; gguf_get_u32(src, key, &x); memcpy(v, &x, 4); break; }
        case GGUF_TYPE_INT32: { int32_t x; gguf_get_i32(src, key, &x); memcpy(v, &x, 4); break; }
        case GGUF_TYPE_FLOAT32: { float x; gguf_get_f32(src, key, &x); memcpy(v, &x, 4); break; }
        case GGUF_TYPE_UINT64: { uint64_t x; gguf_get_u64(src, key, &x); memcpy(v, &x, 8); break; }
        case GGUF_TYPE_INT64: { int64_t x; gguf_get_i64(src, key, &x); memcpy(v, &x, 8); break; }
        case GGUF_TYPE_FLOAT64: { double x; gguf_get_f64(src, key, &x); memcpy(v, &x, 8); break; }
        case GGUF_TYPE_BOOL: { int x; gguf_get_bool(src, key, &x); v[0] = (uint8_t)x; break; }
        default: return -1;
        }
        return kv_scalar(w, key, t, v, gguf_type_size(t));
    }
    gguf_type_t et;
    uint64_t n;
    gguf_arr_info(src, kv, &et, &n);
    if (et != GGUF_TYPE_STRING) return gguf_w_arr(w, key, et, gguf_arr_data(src, kv), n);
    kv_head(w, key, GGUF_TYPE_ARRAY);
    put_u32(&w->kv, GGUF_TYPE_STRING);
    put_u64(&w->kv, n);
    for (uint64_t i = 0; i < n; i++) {
        const char *s;
        size_t len;
        gguf_arr_get_str(src, kv, i, &s, &len);
        put_str(&w->kv, s, len);
    }
    return w->kv.oom ? -1 : 0;
}

int gguf_w_tensor(gguf_writer_t *w, const char *name, dtype_t t, int n_dims, const int64_t *ne,
                  const void *data)
{
    if (n_dims < 1 || n_dims > 4) return -1;
    size_t row = dtype_row_bytes(t, ne[0]);
    if (row == 0) return -1;
    size_t rows = 1;
    for (int d = 1; d < n_dims; d++) {
        if (ne[d] <= 0) return -1;
        rows *= (size_t)ne[d];
    }
    if (w->n_tensors == w->cap_tensors) {
        size_t cap = w->cap_tensors ? w->cap_tensors * 2 : 16;
        wtensor_t *p = realloc(w->tensors, cap * sizeof *p);
        if (!p) return -1;
        w->tensors = p;
        w->cap_tensors = cap;
    }
    wtensor_t *wt = &w->tensors[w->n_tensors];
    memset(wt, 0, sizeof *wt);
    wt->nbytes = row * rows;
    wt->name = strdup(name);
    wt->data = malloc(wt->nbytes ? wt->nbytes : 1);
    if (!wt->name || !wt->data) {
        free(wt->name);
        free(wt->data);
        return -1;
    }
    if (wt->nbytes) memcpy(wt->data, data, wt->nbytes);
    wt->type = t;
    wt->n_dims = n_dims;
    for (int d = 0; d < 4; d++) wt->ne[d] = d < n_dims ? ne[d] : 1;
    w->n_tensors++;
    return 0;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

int gguf_writer_to_mem(const gguf_writer_t *w, uint8_t **buf, size_t *size)
{
    bytes_t b = {0};
    uint64_t a = w->alignment ? w->alignment : GGUF_DEFAULT_ALIGNMENT;
    put(&b, GGUF_MAGIC, 4);
    put_u32(&b, w->version);
    put_u64(&b, w->n_tensors);
    put_u64(&b, w->n_kv);
    put(&b, w->kv.p, w->kv.len);
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_tensors; i++) {
        const wtensor_t *t = &w->tensors[i];
        put_str(&b, t->name, strlen(t->name));
        put_u32(&b, (uint32_t)t->n_dims);
        for (int d = 0; d < t->n_dims; d++) put_u64(&b, (uint64_t)t->ne[d]);
        put_u32(&b, (uint32_t)t->type);
        put_u64(&b, off);
        off = align_up(off + t->nbytes, a);
    }
    static const uint8_t zeros[64] = {0};
    if (w->n_tensors > 0) {
        while (b.len % a) put(&b, zeros, (size_t)(a - b.len % a) < sizeof zeros ? (size_t)(a - b.len % a) : sizeof zeros);
        for (size_t i = 0; i < w->n_tensors; i++) {
            const wtensor_t *t = &w->tensors[i];
            put(&b, t->data, t->nbytes);
            while (b.len % a && !b.oom)
                put(&b, zeros, (size_t)(a - b.len % a) < sizeof zeros ? (size_t)(a - b.len % a) : sizeof zeros);
        }
    }
    if (b.oom) {
        free(b.p);
        return -1;
    }
    *buf = b.p;
    *size = b.len;
    return 0;
}

int gguf_writer_write(const gguf_writer_t *w, const char *path, char *err, size_t errlen)
{
    uint8_t *buf;
    size_t size;
    if (gguf_writer_to_mem(w, &buf, &size) != 0) {
        if (err) snprintf(err, errlen, "%s: out of memory building the file", path);
        return -1;
    }
    FILE *f = fopen(path, "wb");
    if (!f) {
        if (err) snprintf(err, errlen, "%s: cannot create: %s", path, strerror(errno));
        free(buf);
        return -1;
    }
    size_t wr = fwrite(buf, 1, size, f);
    int rc = fclose(f);
    free(buf);
    if (wr != size || rc != 0) {
        if (err) snprintf(err, errlen, "%s: write failed: %s", path, strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- random models ------------------------------------------------------ */

void mkmodel_defaults(mkmodel_opts *o)
{
    memset(o, 0, sizeof *o);
    o->arch = "llama";
    o->type = DTYPE_F32;
    o->seed = 1;
    o->n_embd = 64;
    o->n_layer = 2;
    o->n_head = 4;
    o->n_head_kv = 2;
    o->n_ff = 128;
    o->n_ctx = 512;
    o->rope_base = 10000.0f;
    o->rms_eps = 1e-5f;
}

static uint64_t splitmix64(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in (0, 1). */
static double uniform01(uint64_t *s) { return ((double)(splitmix64(s) >> 11) + 0.5) / 9007199254740992.0; }

/* Fill x[n] with N(mean, std) from a stream seeded by (seed, name). */
static void fill_normal(float *x, size_t n, uint64_t seed, const char *name, float mean, float std)
{
    uint64_t s = seed * 0x100000001b3ull;
    for (const char *c = name; *c; c++) s = (s ^ (uint8_t)*c) * 0x100000001b3ull;
    for (size_t i = 0; i < n; i += 2) {
        double u1 = uniform01(&s), u2 = uniform01(&s);
        double r = sqrt(-2.0 * log(u1));
        x[i] = mean + std * (float)(r * cos(6.283185307179586 * u2));
        if (i + 1 < n) x[i + 1] = mean + std * (float)(r * sin(6.283185307179586 * u2));
    }
}

/* GPT-2's byte-to-unicode map: the printable bytes stand for themselves, the others
 * for code points from 256 up, in byte order. Writes the UTF-8 of byte b's char. */
static size_t byte_char(int b, char out[4])
{
    int cp;
    if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff)) {
        cp = b;
    } else {
        int n = 0;
        for (int x = 0; x < b; x++)
            if (!((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae && x <= 0xff)))
                n++;
        cp = 256 + n;
    }
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    out[0] = (char)(0xc0 | (cp >> 6));
    out[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
}

/* Words of the built-in vocabulary (in GPT-2's byte-unicode form: "Ġ" is a space, "Ċ" a
 * newline); each becomes a chain of merges from the left. */
static const char *const builtin_words[] = {
    "Ġthe", "Ġand", "Ġof", "Ġto", "Ġin", "Ġis", "Ġthat", "Ġit", "Ġfor", "Ġyou",
    "Ġwas", "Ġwith", "Ġon", "Ġas", "Ġhe", "Ġbe", "Ġat", "Ġby", "Ġthis", "Ġhello",
    "Ġworld", "ing", "ed", "er", "ion", "Hello", "The", "ĠThe", "ĠI", "Ġa",
    "Ġan", "Ġare", "Ġnot", "Ġor", "Ġwhat", "Ġcan", "Ġhave", "Ġwill", "Ġmodel", "Ġtoken",
    "ĠĠ", "ĠĠĠĠ", "ĊĊ", "00", "Ġ1", "Ġ2", "re", "on", "en", "an",
    "user", "assistant", "system",
};

static const char *const builtin_specials[] = {"<|endoftext|>", "<|im_start|>", "<|im_end|>"};

static const char builtin_template[] =
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

typedef struct {
    char **tok;
    size_t n, cap;
    char **merge;
    size_t n_merge, cap_merge;
} vocab_build_t;

static int vb_push(char ***arr, size_t *n, size_t *cap, const char *s, size_t len)
{
    if (*n == *cap) {
        size_t c = *cap ? *cap * 2 : 512;
        char **p = realloc(*arr, c * sizeof *p);
        if (!p) return -1;
        *arr = p;
        *cap = c;
    }
    char *d = malloc(len + 1);
    if (!d) return -1;
    memcpy(d, s, len);
    d[len] = 0;
    (*arr)[(*n)++] = d;
    return 0;
}

static int vb_has(const vocab_build_t *v, const char *s)
{
    for (size_t i = 0; i < v->n; i++)
        if (strcmp(v->tok[i], s) == 0) return 1;
    return 0;
}

static void vb_free(vocab_build_t *v)
{
    for (size_t i = 0; i < v->n; i++) free(v->tok[i]);
    for (size_t i = 0; i < v->n_merge; i++) free(v->merge[i]);
    free(v->tok);
    free(v->merge);
}

/* UTF-8 length of the character starting with byte c. */
static size_t u8len(unsigned char c) { return c < 0x80 ? 1 : c < 0xe0 ? 2 : c < 0xf0 ? 3 : 4; }

static int build_vocab(vocab_build_t *v)
{
    memset(v, 0, sizeof *v);
    for (size_t i = 0; i < 3; i++)
        if (vb_push(&v->tok, &v->n, &v->cap, builtin_specials[i], strlen(builtin_specials[i])))
            return -1;
    for (int b = 0; b < 256; b++) {
        char c[4];
        size_t n = byte_char(b, c);
        if (vb_push(&v->tok, &v->n, &v->cap, c, n)) return -1;
    }
    for (size_t w = 0; w < sizeof builtin_words / sizeof *builtin_words; w++) {
        const char *word = builtin_words[w];
        size_t len = strlen(word), pre = u8len((unsigned char)word[0]);
        while (pre < len) {
            size_t ch = u8len((unsigned char)word[pre]);
            char m[128], r[128];
            snprintf(m, sizeof m, "%.*s %.*s", (int)pre, word, (int)ch, word + pre);
            snprintf(r, sizeof r, "%.*s", (int)(pre + ch), word);
            if (!vb_has(v, r)) {
                if (vb_push(&v->tok, &v->n, &v->cap, r, strlen(r))) return -1;
                if (vb_push(&v->merge, &v->n_merge, &v->cap_merge, m, strlen(m))) return -1;
            }
            pre += ch;
        }
    }
    return 0;
}

int mkmodel_builtin_vocab_size(void)
{
    vocab_build_t v;
    int n = build_vocab(&v) == 0 ? (int)v.n : -1;
    vb_free(&v);
    return n;
}

static int add_builtin_tokenizer(gguf_writer_t *w, int *n_vocab)
{
    vocab_build_t v;
    if (build_vocab(&v) != 0) {
        vb_free(&v);
        return -1;
    }
    int rc = 0;
    int32_t *types = malloc(v.n * sizeof *types);
    if (!types) {
        vb_free(&v);
        return -1;
    }
    for (size_t i = 0; i < v.n; i++) types[i] = i < 3 ? 3 : 1; /* CONTROL, NORMAL */
    rc |= gguf_w_str(w, "tokenizer.ggml.model", "gpt2");
    rc |= gguf_w_str(w, "tokenizer.ggml.pre", "smollm");
    rc |= gguf_w_arr_str(w, "tokenizer.ggml.tokens", (const char *const *)v.tok, NULL, v.n);
    rc |= gguf_w_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, v.n);
    rc |= gguf_w_arr_str(w, "tokenizer.ggml.merges", (const char *const *)v.merge, NULL, v.n_merge);
    rc |= gguf_w_u32(w, "tokenizer.ggml.bos_token_id", 1);
    rc |= gguf_w_u32(w, "tokenizer.ggml.eos_token_id", 2);
    rc |= gguf_w_u32(w, "tokenizer.ggml.unknown_token_id", 0);
    rc |= gguf_w_u32(w, "tokenizer.ggml.padding_token_id", 2);
    rc |= gguf_w_bool(w, "tokenizer.ggml.add_bos_token", 0);
    rc |= gguf_w_bool(w, "tokenizer.ggml.add_eos_token", 0);
    rc |= gguf_w_str(w, "tokenizer.chat_template", builtin_template);
    *n_vocab = (int)v.n;
    free(types);
    vb_free(&v);
    return rc ? -1 : 0;
}

static int copy_tokenizer(gguf_writer_t *w, const char *path, int *n_vocab, char *err,
                          size_t errlen)
{
    gguf_t *src;
    if (gguf_open(path, &src, err, errlen) != 0) return -1;
    int64_t tk = gguf_find_key(src, "tokenizer.ggml.tokens");
    uint64_t n = 0;
    gguf_type_t et;
    if (tk < 0 || gguf_arr_info(src, tk, &et, &n) != GGUF_OK || et != GGUF_TYPE_STRING || n == 0 ||
        n > INT32_MAX) {
        if (err) snprintf(err, errlen, "%s: no usable tokenizer.ggml.tokens array", path);
        gguf_close(&src);
        return -1;
    }
    for (int64_t i = 0; i < gguf_n_kv(src); i++) {
        if (strncmp(gguf_kv_key(src, i), "tokenizer.", 10) != 0) continue;
        if (gguf_w_copy_kv(w, src, i) != 0) {
            if (err) snprintf(err, errlen, "%s: out of memory copying the tokenizer", path);
            gguf_close(&src);
            return -1;
        }
    }
    *n_vocab = (int)n;
    gguf_close(&src);
    return 0;
}

/* Add a matrix of rows x cols (ne = {cols, rows}) of N(0, std) in type t. */
static int add_matrix(gguf_writer_t *w, const mkmodel_opts *o, const char *name, dtype_t t,
                      int64_t cols, int64_t rows, float mean, float std, char *err, size_t errlen)
{
    size_t n = (size_t)(cols * rows);
    size_t row_bytes = dtype_row_bytes(t, cols);
    if (row_bytes == 0) {
        if (err) snprintf(err, errlen, "%s: row length %lld is not a multiple of %s's block (%zu)",
                          name, (long long)cols, dtype_name(t), dtype_block_elems(t));
        return -1;
    }
    float *x = malloc(n * sizeof *x);
    uint8_t *q = malloc(row_bytes * (size_t)rows);
    int rc = -1;
    if (!x || !q) {
        if (err) snprintf(err, errlen, "%s: out of memory", name);
        goto done;
    }
    fill_normal(x, n, o->seed, name, mean, std);
    for (int64_t r = 0; r < rows; r++)
        if (dtype_from_f32(t, x + r * cols, q + (size_t)r * row_bytes, cols) != 0) {
            if (err) snprintf(err, errlen, "%s: cannot convert to %s", name, dtype_name(t));
            goto done;
        }
    int64_t ne[2] = {cols, rows};
    if (gguf_w_tensor(w, name, t, rows == 1 ? 1 : 2, ne, q) != 0) {
        if (err) snprintf(err, errlen, "%s: out of memory", name);
        goto done;
    }
    rc = 0;
done:
    free(x);
    free(q);
    return rc;
}

/* llama.cpp's file_type (LLAMA_FTYPE_*) for a matrix type. */
static uint32_t file_type_of(dtype_t t)
{
    switch (t) {
    case DTYPE_F32: return 0;
    case DTYPE_F16: return 1;
    case DTYPE_Q4_0: return 2;
    case DTYPE_Q4_1: return 3;
    case DTYPE_Q8_0: return 7;
    case DTYPE_Q4_K: return 15; /* Q4_K_M */
    case DTYPE_Q6_K: return 18;
    case DTYPE_BF16: return 32;
    default: return 0;
    }
}

int mkmodel_write(const mkmodel_opts *o, const char *path, char *err, size_t errlen)
{
    int is_qwen2 = strcmp(o->arch, "qwen2") == 0;
    if (!is_qwen2 && strcmp(o->arch, "llama") != 0) {
        if (err) snprintf(err, errlen, "unknown architecture '%s' (llama or qwen2)", o->arch);
        return -1;
    }
    if (o->n_embd <= 0 || o->n_layer <= 0 || o->n_head <= 0 || o->n_head_kv <= 0 ||
        o->n_ff <= 0 || o->n_embd % o->n_head != 0 || o->n_head % o->n_head_kv != 0) {
        if (err) snprintf(err, errlen, "bad shape: n_embd %d must divide into n_head %d heads, "
                          "n_head into n_head_kv %d groups; all positive", o->n_embd, o->n_head,
                          o->n_head_kv);
        return -1;
    }
    if (!dtype_supported(o->type) || o->type == DTYPE_Q8_1 || o->type == DTYPE_Q8_K ||
        o->type == DTYPE_I8) {
        if (err) snprintf(err, errlen, "unsupported weight type %s", dtype_name(o->type));
        return -1;
    }
    gguf_writer_t *w = NULL, *tok = NULL;
    int rc = 0, n_vocab = 0;
    if (gguf_writer_new(&w) != 0 || gguf_writer_new(&tok) != 0) {
        if (err) snprintf(err, errlen, "out of memory");
        goto fail;
    }
    /* the tokenizer first (into its own writer): the vocabulary size goes in the header */
    if (o->vocab_from) {
        if (copy_tokenizer(tok, o->vocab_from, &n_vocab, err, errlen) != 0) goto fail;
    } else if (add_builtin_tokenizer(tok, &n_vocab) != 0) {
        if (err) snprintf(err, errlen, "out of memory building the vocabulary");
        goto fail;
    }
    char key[128];
    const char *a = o->arch;
    int head_dim = o->n_embd / o->n_head, kv_dim = head_dim * o->n_head_kv;
    rc |= gguf_w_str(w, "general.architecture", a);
    rc |= gguf_w_str(w, "general.name", "duet random model");
    rc |= gguf_w_u32(w, "general.file_type", file_type_of(o->type));
    rc |= gguf_w_u32(w, "general.quantization_version", 2);
#define KEY(suffix) (snprintf(key, sizeof key, "%s.%s", a, suffix), key)
    rc |= gguf_w_u32(w, KEY("vocab_size"), (uint32_t)n_vocab);
    rc |= gguf_w_u32(w, KEY("context_length"), (uint32_t)o->n_ctx);
    rc |= gguf_w_u32(w, KEY("embedding_length"), (uint32_t)o->n_embd);
    rc |= gguf_w_u32(w, KEY("block_count"), (uint32_t)o->n_layer);
    rc |= gguf_w_u32(w, KEY("feed_forward_length"), (uint32_t)o->n_ff);
    rc |= gguf_w_u32(w, KEY("attention.head_count"), (uint32_t)o->n_head);
    rc |= gguf_w_u32(w, KEY("attention.head_count_kv"), (uint32_t)o->n_head_kv);
    rc |= gguf_w_f32(w, KEY("attention.layer_norm_rms_epsilon"), o->rms_eps);
    rc |= gguf_w_f32(w, KEY("rope.freq_base"), o->rope_base);
    rc |= gguf_w_u32(w, KEY("rope.dimension_count"), (uint32_t)head_dim);
#undef KEY
    put(&w->kv, tok->kv.p, tok->kv.len);
    w->n_kv += tok->n_kv;
    gguf_writer_destroy(&tok);
    if (rc || w->kv.oom) {
        if (err) snprintf(err, errlen, "out of memory");
        goto fail;
    }

    /* tied: a small embedding, or the residual stream (dominated by the token's own
     * embedding) makes every token predict itself */
    float emb_std = o->tied ? 0.1f : 0.5f;
    float in_std = 1.0f / sqrtf((float)o->n_embd), ff_std = 0.5f / sqrtf((float)o->n_ff);
    float out_std = 0.5f / sqrtf((float)o->n_embd);
    char name[96];
    dtype_t mt = o->type;
    if (add_matrix(w, o, "token_embd.weight", mt, o->n_embd, n_vocab, 0, emb_std, err, errlen))
        goto fail;
    for (int l = 0; l < o->n_layer; l++) {
#define T(s) (snprintf(name, sizeof name, "blk.%d.%s", l, s), name)
        if (add_matrix(w, o, T("attn_norm.weight"), DTYPE_F32, o->n_embd, 1, 1.0f, 0.1f, err, errlen) ||
            add_matrix(w, o, T("attn_q.weight"), mt, o->n_embd, o->n_embd, 0, in_std, err, errlen) ||
            add_matrix(w, o, T("attn_k.weight"), mt, o->n_embd, kv_dim, 0, in_std, err, errlen) ||
            add_matrix(w, o, T("attn_v.weight"), mt, o->n_embd, kv_dim, 0, in_std, err, errlen))
            goto fail;
        if (is_qwen2 &&
            (add_matrix(w, o, T("attn_q.bias"), DTYPE_F32, o->n_embd, 1, 0, 0.1f, err, errlen) ||
             add_matrix(w, o, T("attn_k.bias"), DTYPE_F32, kv_dim, 1, 0, 0.1f, err, errlen) ||
             add_matrix(w, o, T("attn_v.bias"), DTYPE_F32, kv_dim, 1, 0, 0.1f, err, errlen)))
            goto fail;
        if (add_matrix(w, o, T("attn_output.weight"), mt, o->n_embd, o->n_embd, 0, out_std, err, errlen) ||
            add_matrix(w, o, T("ffn_norm.weight"), DTYPE_F32, o->n_embd, 1, 1.0f, 0.1f, err, errlen) ||
            add_matrix(w, o, T("ffn_gate.weight"), mt, o->n_embd, o->n_ff, 0, in_std, err, errlen) ||
            add_matrix(w, o, T("ffn_up.weight"), mt, o->n_embd, o->n_ff, 0, in_std, err, errlen) ||
            add_matrix(w, o, T("ffn_down.weight"), mt, o->n_ff, o->n_embd, 0, ff_std, err, errlen))
            goto fail;
#undef T
    }
    if (add_matrix(w, o, "output_norm.weight", DTYPE_F32, o->n_embd, 1, 1.0f, 0.1f, err, errlen))
        goto fail;
    if (!o->tied &&
        add_matrix(w, o, "output.weight", mt, o->n_embd, n_vocab, 0, in_std * 2.0f, err, errlen))
        goto fail;
    rc = gguf_writer_write(w, path, err, errlen);
    gguf_writer_destroy(&w);
    return rc;
fail:
    gguf_writer_destroy(&tok);
    gguf_writer_destroy(&w);
    return -1;
}
