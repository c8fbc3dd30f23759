/* daemon/tok.c: byte-level BPE and SentencePiece-BPE tokenizers from GGUF metadata;
 * see tok.h. */
#define PCRE2_CODE_UNIT_WIDTH 8
#include "daemon/tok.h"

#include <pcre2.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define TOK_MAX_RE 8
#define SPM_SPACE "\xe2\x96\x81" /* U+2581, SentencePiece's space */
#define UTF8_REPLACEMENT "\xef\xbf\xbd"

struct tok {
    tok_model model;
    char pre[48];
    int n_vocab;
    char *text;          /* vocabulary texts, back to back */
    uint32_t *text_off;  /* [n_vocab + 1] */
    char *piece;         /* decoded pieces, back to back */
    uint32_t *piece_off; /* [n_vocab + 1] */
    uint8_t *type;       /* [n_vocab] tok_type */
    uint8_t *eog;        /* [n_vocab] */
    float *score;        /* [n_vocab] SPM merge scores */
    int32_t *vhash;      /* open-addressed text -> id, -1 empty */
    size_t vmask;
    uint64_t *mkey;      /* open-addressed (left << 32 | right) -> merge */
    int32_t *mrank, *mres;
    size_t mmask;
    int32_t byte_tok[256]; /* BPE: token of each byte's character; SPM: <0xXX> */
    int32_t bos, eos, eot, eom, pad, unk;
    int add_bos, add_eos, add_space_prefix, ignore_merges;
    int32_t *spec;       /* special tokens, grouped by first byte, longest first */
    int spec_start[257]; /* spec[spec_start[b] .. spec_start[b + 1]) start with byte b */
    int n_re;
    pcre2_code *re[TOK_MAX_RE];
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static uint64_t hash_bytes(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        h ^= (uint8_t)s[i];
        h *= 1099511628211ull;
    }
    return h;
}

static uint64_t hash_u64(uint64_t x)
{
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ull;
    return x ^ (x >> 33);
}

static size_t pow2_at_least(size_t n)
{
    size_t c = 16;
    while (c < n) c *= 2;
    return c;
}

int32_t tok_find(const tok_t *t, const char *s, size_t len)
{
    for (size_t h = hash_bytes(s, len) & t->vmask;; h = (h + 1) & t->vmask) {
        int32_t id = t->vhash[h];
        if (id < 0) return -1;
        size_t l = t->text_off[id + 1] - t->text_off[id];
        if (l == len && memcmp(t->text + t->text_off[id], s, len) == 0) return id;
    }
}

/* Merge (left, right) -> rank and result, or -1. */
static int32_t merge_find(const tok_t *t, int32_t l, int32_t r, int32_t *res)
{
    if (!t->mkey) return -1;
    uint64_t k = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
    for (size_t h = hash_u64(k) & t->mmask;; h = (h + 1) & t->mmask) {
        if (t->mkey[h] == UINT64_MAX) return -1;
        if (t->mkey[h] == k) {
            *res = t->mres[h];
            return t->mrank[h];
        }
    }
}

/* ---- GPT-2's byte <-> character map -------------------------------------- */

static int byte_is_printable(int b)
{
    return (b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
}

/* Code point that stands for byte b. */
static int byte_to_cp(int b)
{
    if (byte_is_printable(b)) return b;
    int n = 0;
    for (int x = 0; x < b; x++) n += !byte_is_printable(x);
    return 256 + n;
}

static size_t utf8_put(uint32_t cp, char *o)
{
    if (cp < 0x80) {
        o[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        o[0] = (char)(0xc0 | (cp >> 6));
        o[1] = (char)(0x80 | (cp & 0x3f));
        return 2;
    }
    if (cp < 0x10000) {
        o[0] = (char)(0xe0 | (cp >> 12));
        o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
        o[2] = (char)(0x80 | (cp & 0x3f));
        return 3;
    }
    o[0] = (char)(0xf0 | (cp >> 18));
    o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
    o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[3] = (char)(0x80 | (cp & 0x3f));
    return 4;
}


/* Length of the valid UTF-8 character at s[0..n): >0 complete; 0 a valid but truncated
 * prefix (needs more bytes); -k when the first k bytes are an invalid sequence (the
 * maximal subpart that U+FFFD replaces). */
static int utf8_check(const uint8_t *s, size_t n)
{
    uint8_t c = s[0];
    int len;
    uint8_t lo = 0x80, hi = 0xbf;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) len = 2;
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else
        return -1;
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) return 0;
        uint8_t lo_i = i == 1 ? lo : 0x80, hi_i = i == 1 ? hi : 0xbf;
        if (s[i] < lo_i || s[i] > hi_i) return -i;
    }
    return len;
}

/* Bytes of the character at s[0..n): a valid UTF-8 sequence, else one byte. */
static size_t char_len(const char *s, size_t n)
{
    int l = utf8_check((const uint8_t *)s, n);
    return l > 0 ? (size_t)l : 1;
}

/* ---- pre-tokenizer regular expressions ---------------------------------- */

/* The split that GPT-2 and many others use. */
#define RE_GPT2 "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)"
/* Llama 3's (tiktoken cl100k-style), with digits in runs of up to three. */
#define RE_LLAMA3                                                                              \
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|" \
    "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* Qwen2's: like Llama 3 with single digits. */
#define RE_QWEN2                                                                               \
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|" \
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* Tekken (Mistral Nemo) and GPT-4o: case-aware words. */
#define RE_TEKKEN                                                                              \
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+|" \
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*|" \
    "\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
#define RE_GPT4O                                                                               \
    "[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]*[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]+" \
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\\r\\n\\p{L}\\p{N}]?[\\p{Lu}\\p{Lt}\\p{Lm}\\p{Lo}\\p{M}]+" \
    "[\\p{Ll}\\p{Lm}\\p{Lo}\\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\\p{N}{1,3}|"                 \
    " ?[^\\s\\p{L}\\p{N}]+[\\r\\n/]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"
/* DeepSeek LLM: letters of the Latin, Greek, Cyrillic... scripts, ASCII and full-width
 * punctuation, trailing spaces, CJK runs and digits, each isolated in turn. */
#define RE_DEEPSEEK_LETTERS                                                                    \
    "\\s?[A-Za-z\\x{b5}\\x{c0}-\\x{d6}\\x{d8}-\\x{f6}\\x{f8}-\\x{1ba}\\x{1bc}-\\x{1bf}"         \
    "\\x{1c4}-\\x{293}\\x{295}-\\x{2af}\\x{370}-\\x{373}\\x{376}\\x{377}\\x{37b}-\\x{37d}"      \
    "\\x{37f}\\x{386}\\x{388}-\\x{38a}\\x{38c}\\x{38e}-\\x{3a1}\\x{3a3}-\\x{3f5}"                \
    "\\x{3f7}-\\x{481}\\x{48a}-\\x{52f}\\x{531}-\\x{556}\\x{10a0}-\\x{10c5}\\x{13a0}-\\x{13f5}" \
    "\\x{13f8}-\\x{13fd}\\x{1c90}-\\x{1cba}\\x{1cbd}-\\x{1cbf}\\x{1d00}-\\x{1d2b}"              \
    "\\x{1d6b}-\\x{1d77}\\x{1d79}-\\x{1d9a}\\x{1e00}-\\x{1f15}\\x{1f18}-\\x{1f1d}"              \
    "\\x{1f20}-\\x{1f45}\\x{1f48}-\\x{1f4d}\\x{1f50}-\\x{1f57}\\x{1f59}\\x{1f5b}\\x{1f5d}"      \
    "\\x{1f5f}-\\x{1f7d}\\x{1f80}-\\x{1fb4}\\x{1fb6}-\\x{1fbc}\\x{1fbe}\\x{1fc2}-\\x{1fc4}"     \
    "\\x{1fc6}-\\x{1fcc}\\x{1fd0}-\\x{1fd3}\\x{1fd6}-\\x{1fdb}\\x{1fe0}-\\x{1fec}"              \
    "\\x{1ff2}-\\x{1ff4}\\x{1ff6}-\\x{1ffc}\\x{2102}\\x{2107}\\x{210a}-\\x{2113}\\x{2115}"      \
    "\\x{2119}-\\x{211d}\\x{2124}\\x{2126}\\x{2128}\\x{212a}-\\x{212d}\\x{212f}-\\x{2134}"     \
    "\\x{2139}\\x{213c}-\\x{213f}\\x{2145}-\\x{2149}\\x{214e}\\x{2183}\\x{2184}"                \
    "\\x{2c00}-\\x{2c7b}\\x{2c7e}-\\x{2ce4}\\x{2ceb}-\\x{2cee}\\x{2cf2}\\x{2cf3}"               \
    "\\x{a640}-\\x{a66d}\\x{a680}-\\x{a69b}\\x{a722}-\\x{a76f}\\x{a771}-\\x{a787}"              \
    "\\x{a78b}-\\x{a78e}\\x{ab70}-\\x{abbf}\\x{fb00}-\\x{fb06}\\x{fb13}-\\x{fb17}"              \
    "\\x{ff21}-\\x{ff3a}\\x{ff41}-\\x{ff5a}\\x{10400}-\\x{1044f}\\x{104b0}-\\x{104d3}"         \
    "\\x{104d8}-\\x{104fb}\\x{10c80}-\\x{10cb2}\\x{10cc0}-\\x{10cf2}\\x{118a0}-\\x{118df}"      \
    "\\x{1e900}-\\x{1e943}]+"
#define RE_DEEPSEEK_PUNCT "\\s?[!-/:-~\\x{ff01}-\\x{ff0f}\\x{ff1a}-\\x{ff5e}\\x{2018}-\\x{201f}\\x{3000}-\\x{3002}]+"
#define RE_CJK "[\\x{4e00}-\\x{9fa5}\\x{0800}-\\x{4e00}\\x{ac00}-\\x{d7ff}]+"

typedef struct {
    const char *names;   /* space-separated tokenizer.ggml.pre values */
    const char *re[TOK_MAX_RE];
    int ignore_merges;   /* a piece that is a token is taken whole */
    int add_bos;         /* default for add_bos_token */
} pre_def;

static const pre_def pre_defs[] = {
    {"default", {"[\\p{P}\\$\\+<=>\\^~\\|]+", RE_GPT2, "\\p{N}+", "[0-9][0-9][0-9]"}, 0, 0},
    {"gpt2 gpt-2 phi-2 mpt olmo jais jina-es jina-de jina-v1-en jina-v2-es jina-v2-de "
     "jina-v2-code roberta-bpe gigachat trillion",
     {RE_GPT2}, 0, 0},
    {"llama3 llama-v3 llama-bpe falcon3 pixtral", {RE_LLAMA3}, 1, 1},
    {"dbrx smaug-bpe chatglm-bpe", {RE_LLAMA3}, 0, 0},
    {"qwen2 qwen2.5 qwen-2.5 deepseek-r1-qwen stablelm2 megrez hunyuan", {RE_QWEN2}, 0, 0},
    {"starcoder refact command-r smollm codeshell exaone minerva-7b", {"\\p{N}", RE_GPT2}, 0, 0},
    {"falcon", {"[\\p{P}\\$\\+<=>\\^~\\|`]+", RE_GPT2, "[0-9][0-9][0-9]"}, 0, 0},
    {"deepseek-llm",
     {"[\\r\\n]", RE_DEEPSEEK_LETTERS, RE_DEEPSEEK_PUNCT, "\\s+$", RE_CJK, "\\p{N}+"}, 0, 0},
    {"deepseek-coder", {"[\\r\\n]", "\\s?\\p{L}+", "\\s?\\p{P}+", RE_CJK, "\\p{N}"}, 0, 0},
    {"deepseek-v3",
     {"\\p{N}{1,3}", "[\\x{4e00}-\\x{9fa5}\\x{3040}-\\x{309f}\\x{30a0}-\\x{30ff}]+",
      "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\\r\\n\\p{L}\\p{P}\\p{S}]?"
      "[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
     0, 0},
    {"poro-chat bloom gpt3-finnish", {" ?[^(\\s|.,!?\\x{2026}\\x{3002}\\x{ff0c}\\x{3001}\\x{964}\\x{6d4}\\x{60c})]+"}, 0, 0},
    {"viking", {" ?[^(\\s|.,!?\\x{2026}\\x{3002}\\x{ff0c}\\x{3001}\\x{964}\\x{6d4}\\x{60c})]+", "\\p{N}"}, 0, 0},
    {"tekken", {RE_TEKKEN}, 1, 1},
    {"gpt-4o", {RE_GPT4O}, 0, 0},
};

static const pre_def *find_pre(const char *name, size_t len)
{
    for (size_t i = 0; i < sizeof pre_defs / sizeof *pre_defs; i++) {
        const char *p = pre_defs[i].names;
        while (*p) {
            size_t n = strcspn(p, " ");
            if (n == len && memcmp(p, name, len) == 0) return &pre_defs[i];
            p += n;
            while (*p == ' ') p++;
        }
    }
    return NULL;
}

/* ---- loading ------------------------------------------------------------- */

void tok_destroy(tok_t **self_p)
{
    if (!self_p || !*self_p) return;
    tok_t *t = *self_p;
    free(t->text);
    free(t->text_off);
    free(t->piece);
    free(t->piece_off);
    free(t->type);
    free(t->eog);
    free(t->score);
    free(t->vhash);
    free(t->mkey);
    free(t->mrank);
    free(t->mres);
    free(t->spec);
    for (int i = 0; i < t->n_re; i++) pcre2_code_free(t->re[i]);
    free(t);
    *self_p = NULL;
}

static int is_special_type(int type)
{
    return type == TOK_CONTROL || type == TOK_UNKNOWN || type == TOK_USER_DEFINED;
}

/* Token id from metadata key (any integer type), or dflt; -1 when out of range. */
static int32_t meta_id(const gguf_t *g, const char *key, int32_t dflt, int n_vocab)
{
    int64_t v;
    if (gguf_get_int(g, key, &v) != GGUF_OK) v = dflt;
    return v >= 0 && v < n_vocab ? (int32_t)v : -1;
}

static int meta_bool(const gguf_t *g, const char *key, int dflt)
{
    int b;
    if (gguf_get_bool(g, key, &b) == GGUF_OK) return b;
    int64_t v;
    if (gguf_get_int(g, key, &v) == GGUF_OK) return v != 0;
    return dflt;
}

/* Decoded bytes of token id into o (capacity: 4 bytes per byte of text suffices).
 * Returns the length. */
static size_t make_piece(const tok_t *t, int32_t id, const int16_t *rev, char *o)
{
    const char *s = t->text + t->text_off[id];
    size_t n = t->text_off[id + 1] - t->text_off[id], k = 0;
    int type = t->type[id];
    if (is_special_type(type)) {
        memcpy(o, s, n);
        return n;
    }
    if (t->model == TOK_MODEL_SPM) {
        if (type == TOK_BYTE && n == 6 && memcmp(s, "<0x", 3) == 0 && s[5] == '>') {
            unsigned v;
            if (sscanf(s + 3, "%2x", &v) == 1) {
                o[0] = (char)v;
                return 1;
            }
        }
        for (size_t i = 0; i < n;) {
            if (i + 3 <= n && memcmp(s + i, SPM_SPACE, 3) == 0) {
                o[k++] = ' ';
                i += 3;
            } else
                o[k++] = s[i++];
        }
        return k;
    }
    /* byte-level: each character stands for a byte; others pass through */
    for (size_t i = 0; i < n;) {
        int l = utf8_check((const uint8_t *)s + i, n - i);
        if (l == 2) {
            uint32_t cp = ((uint32_t)(s[i] & 0x1f) << 6) | (s[i + 1] & 0x3f);
            if (cp < 0x144 && rev[cp] >= 0) {
                o[k++] = (char)rev[cp];
                i += 2;
                continue;
            }
        } else if (l == 1 && rev[(uint8_t)s[i]] >= 0) {
            o[k++] = (char)rev[(uint8_t)s[i]];
            i++;
            continue;
        }
        size_t m = l > 0 ? (size_t)l : 1;
        memcpy(o + k, s + i, m);
        k += m;
        i += m;
    }
    return k;
}

static int cmp_spec(const void *a, const void *b, void *ctx)
{
    const tok_t *t = ctx;
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    uint8_t fx = (uint8_t)t->text[t->text_off[x]], fy = (uint8_t)t->text[t->text_off[y]];
    if (fx != fy) return fx < fy ? -1 : 1;
    uint32_t lx = t->text_off[x + 1] - t->text_off[x], ly = t->text_off[y + 1] - t->text_off[y];
    if (lx != ly) return lx > ly ? -1 : 1;
    return x < y ? -1 : x > y;
}

int tok_new_from_gguf(const gguf_t *g, tok_t **out, char *err, size_t errlen)
{
    *out = NULL;
    const char *path = gguf_path(g);
    const char *s;
    size_t len;
    tok_t *t = calloc(1, sizeof *t);
    char *tmp = NULL;
    if (!t) goto oom;
    t->bos = t->eos = t->eot = t->eom = t->pad = t->unk = -1;
    if (gguf_get_str(g, "tokenizer.ggml.model", &s, &len) != GGUF_OK) {
        set_err(err, errlen, "%s: no tokenizer.ggml.model string: not a model with a tokenizer",
                path);
        goto fail;
    }
    if (len == 4 && memcmp(s, "gpt2", 4) == 0) t->model = TOK_MODEL_BPE;
    else if (len == 5 && memcmp(s, "llama", 5) == 0) t->model = TOK_MODEL_SPM;
    else {
        set_err(err, errlen, "%s: tokenizer.ggml.model '%.*s' is not supported (gpt2, llama)",
                path, (int)(len > 40 ? 40 : len), s);
        goto fail;
    }

    /* vocabulary */
    int64_t kt = gguf_find_key(g, "tokenizer.ggml.tokens");
    gguf_type_t et;
    uint64_t n;
    if (kt < 0 || gguf_arr_info(g, kt, &et, &n) != GGUF_OK || et != GGUF_TYPE_STRING) {
        set_err(err, errlen, "%s: tokenizer.ggml.tokens is missing or not an array of strings",
                path);
        goto fail;
    }
    if (n == 0 || n > (1u << 24)) {
        set_err(err, errlen, "%s: tokenizer.ggml.tokens has %llu tokens (1 to 16M supported)", path,
                (unsigned long long)n);
        goto fail;
    }
    t->n_vocab = (int)n;
    size_t total = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_arr_get_str(g, kt, i, &s, &len);
        total += len;
    }
    if (total > UINT32_MAX / 4) {
        set_err(err, errlen, "%s: vocabulary text too large", path);
        goto fail;
    }
    t->text = malloc(total + 1);
    t->text_off = malloc((n + 1) * sizeof *t->text_off);
    t->type = malloc(n);
    t->eog = calloc(n, 1);
    t->score = calloc(n, sizeof *t->score);
    t->vmask = pow2_at_least(n * 2) - 1;
    t->vhash = malloc((t->vmask + 1) * sizeof *t->vhash);
    if (!t->text || !t->text_off || !t->type || !t->eog || !t->score || !t->vhash) goto oom;
    memset(t->vhash, 0xff, (t->vmask + 1) * sizeof *t->vhash);
    uint32_t off = 0;
    for (uint64_t i = 0; i < n; i++) {
        gguf_arr_get_str(g, kt, i, &s, &len);
        t->text_off[i] = off;
        memcpy(t->text + off, s, len);
        off += (uint32_t)len;
        t->type[i] = TOK_NORMAL;
    }
    t->text_off[n] = off;
    /* hash; on duplicates the first id wins */
    for (uint64_t i = 0; i < n; i++) {
        const char *ts = t->text + t->text_off[i];
        size_t tl = t->text_off[i + 1] - t->text_off[i];
        if (tok_find(t, ts, tl) >= 0) continue;
        size_t h = hash_bytes(ts, tl) & t->vmask;
        while (t->vhash[h] >= 0) h = (h + 1) & t->vmask;
        t->vhash[h] = (int32_t)i;
    }

    int64_t ky = gguf_find_key(g, "tokenizer.ggml.token_type");
    if (ky >= 0) {
        if (gguf_arr_info(g, ky, &et, &n) != GGUF_OK || n != (uint64_t)t->n_vocab ||
            et == GGUF_TYPE_STRING || et == GGUF_TYPE_FLOAT32 || et == GGUF_TYPE_FLOAT64) {
            set_err(err, errlen, "%s: tokenizer.ggml.token_type is not an integer array of %d "
                    "entries", path, t->n_vocab);
            goto fail;
        }
        for (int i = 0; i < t->n_vocab; i++) {
            int64_t v = TOK_NORMAL;
            gguf_arr_get_int(g, ky, (uint64_t)i, &v);
            t->type[i] = v >= TOK_NORMAL && v <= TOK_BYTE ? (uint8_t)v : TOK_NORMAL;
            /* an empty special token could never be matched or rendered */
            if (t->text_off[i + 1] == t->text_off[i] && is_special_type(t->type[i]))
                t->type[i] = TOK_UNUSED;
        }
    }
    int64_t ks = gguf_find_key(g, "tokenizer.ggml.scores");
    if (ks >= 0) {
        if (gguf_arr_info(g, ks, &et, &n) != GGUF_OK || n != (uint64_t)t->n_vocab ||
            (et != GGUF_TYPE_FLOAT32 && et != GGUF_TYPE_FLOAT64)) {
            set_err(err, errlen, "%s: tokenizer.ggml.scores is not a float array of %d entries",
                    path, t->n_vocab);
            goto fail;
        }
        for (int i = 0; i < t->n_vocab; i++) {
            double d = 0;
            gguf_arr_get_float(g, ks, (uint64_t)i, &d);
            t->score[i] = (float)d;
        }
    }

    /* pre-tokenizer */
    const pre_def *pd = NULL;
    if (gguf_get_str(g, "tokenizer.ggml.pre", &s, &len) != GGUF_OK) {
        s = "default";
        len = 7;
    }
    snprintf(t->pre, sizeof t->pre, "%.*s", (int)(len < sizeof t->pre ? len : sizeof t->pre - 1), s);
    if (t->model == TOK_MODEL_BPE) {
        pd = find_pre(s, len);
        if (!pd) {
            set_err(err, errlen, "%s: unknown pre-tokenizer tokenizer.ggml.pre = '%.*s'", path,
                    (int)(len > 40 ? 40 : len), s);
            goto fail;
        }
        t->ignore_merges = pd->ignore_merges;
        for (int i = 0; i < TOK_MAX_RE && pd->re[i]; i++) {
            int ec;
            PCRE2_SIZE eo;
            t->re[i] = pcre2_compile((PCRE2_SPTR)pd->re[i], PCRE2_ZERO_TERMINATED,
                                     PCRE2_UTF | PCRE2_UCP | PCRE2_MATCH_INVALID_UTF, &ec, &eo, NULL);
            if (!t->re[i]) {
                PCRE2_UCHAR msg[160];
                pcre2_get_error_message(ec, msg, sizeof msg);
                set_err(err, errlen, "%s: pre-tokenizer '%s': regex %d does not compile at %zu: %s",
                        path, t->pre, i, (size_t)eo, (const char *)msg);
                goto fail;
            }
            t->n_re = i + 1;
            pcre2_jit_compile(t->re[i], PCRE2_JIT_COMPLETE); /* optional: falls back when absent */
        }
    }

    /* special ids and flags */
    int spm = t->model == TOK_MODEL_SPM;
    t->bos = meta_id(g, "tokenizer.ggml.bos_token_id", spm ? 1 : -1, t->n_vocab);
    t->eos = meta_id(g, "tokenizer.ggml.eos_token_id", spm ? 2 : -1, t->n_vocab);
    t->unk = meta_id(g, "tokenizer.ggml.unknown_token_id", spm ? 0 : -1, t->n_vocab);
    t->pad = meta_id(g, "tokenizer.ggml.padding_token_id", -1, t->n_vocab);
    t->eot = meta_id(g, "tokenizer.ggml.eot_token_id", -1, t->n_vocab);
    t->eom = meta_id(g, "tokenizer.ggml.eom_token_id", -1, t->n_vocab);
    t->add_bos = meta_bool(g, "tokenizer.ggml.add_bos_token", spm ? 1 : pd->add_bos);
    t->add_eos = meta_bool(g, "tokenizer.ggml.add_eos_token", 0);
    t->add_space_prefix = meta_bool(g, "tokenizer.ggml.add_space_prefix", spm);
    if (t->add_bos && t->bos < 0) t->add_bos = 0;
    if (t->add_eos && t->eos < 0) t->add_eos = 0;

    /* end of generation: eos, eot, eom and the usual end-of-turn control tokens */
    static const char *const eog_texts[] = {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
                                            "<|eom_id|>", "<EOT>", "<|end_of_text|>",
                                            "<|endoftext|>"};
    for (size_t i = 0; i < sizeof eog_texts / sizeof *eog_texts; i++) {
        int32_t id = tok_find(t, eog_texts[i], strlen(eog_texts[i]));
        if (id < 0 || !is_special_type(t->type[id])) continue;
        t->eog[id] = 1;
        if (t->eot < 0 && i < 4) t->eot = id;
    }
    if (t->eos >= 0) t->eog[t->eos] = 1;
    if (t->eot >= 0) t->eog[t->eot] = 1;
    if (t->eom >= 0) t->eog[t->eom] = 1;

    /* byte tokens */
    for (int b = 0; b < 256; b++) {
        char c[8];
        size_t l;
        if (spm) l = (size_t)snprintf(c, sizeof c, "<0x%02X>", b);
        else l = utf8_put((uint32_t)byte_to_cp(b), c);
        t->byte_tok[b] = tok_find(t, c, l);
        if (spm && t->byte_tok[b] < 0) {
            c[0] = (char)b;
            t->byte_tok[b] = b < 0x80 ? tok_find(t, c, 1) : -1;
            if (t->byte_tok[b] < 0) t->byte_tok[b] = t->unk;
        }
    }

    /* merges */
    if (!spm) {
        int64_t km = gguf_find_key(g, "tokenizer.ggml.merges");
        if (km < 0 || gguf_arr_info(g, km, &et, &n) != GGUF_OK || et != GGUF_TYPE_STRING) {
            set_err(err, errlen, "%s: byte-level BPE needs tokenizer.ggml.merges (an array of "
                    "strings)", path);
            goto fail;
        }
        if (n > INT32_MAX) {
            set_err(err, errlen, "%s: too many merges", path);
            goto fail;
        }
        t->mmask = pow2_at_least(n * 2) - 1;
        t->mkey = malloc((t->mmask + 1) * sizeof *t->mkey);
        t->mrank = malloc((t->mmask + 1) * sizeof *t->mrank);
        t->mres = malloc((t->mmask + 1) * sizeof *t->mres);
        size_t cap = 256;
        tmp = malloc(cap);
        if (!t->mkey || !t->mrank || !t->mres || !tmp) goto oom;
        memset(t->mkey, 0xff, (t->mmask + 1) * sizeof *t->mkey);
        for (uint64_t i = 0; i < n; i++) {
            gguf_arr_get_str(g, km, i, &s, &len);
            /* "left right": split at the first space after the first byte */
            const char *sp = len > 1 ? memchr(s + 1, ' ', len - 1) : NULL;
            if (!sp) continue;
            size_t ll = (size_t)(sp - s), rl = len - ll - 1;
            int32_t l = tok_find(t, s, ll), r = tok_find(t, sp + 1, rl);
            if (len > cap) {
                cap = len * 2;
                char *p = realloc(tmp, cap);
                if (!p) goto oom;
                tmp = p;
            }
            memcpy(tmp, s, ll);
            memcpy(tmp + ll, sp + 1, rl);
            int32_t res = tok_find(t, tmp, ll + rl), dummy;
            if (l < 0 || r < 0 || res < 0 || merge_find(t, l, r, &dummy) >= 0) continue;
            uint64_t k = (uint64_t)(uint32_t)l << 32 | (uint32_t)r;
            size_t h = hash_u64(k) & t->mmask;
            while (t->mkey[h] != UINT64_MAX) h = (h + 1) & t->mmask;
            t->mkey[h] = k;
            t->mrank[h] = (int32_t)i;
            t->mres[h] = res;
        }
        free(tmp);
        tmp = NULL;
    }

    /* decoded pieces */
    int16_t rev[0x144];
    memset(rev, 0xff, sizeof rev);
    for (int b = 0; b < 256; b++) rev[byte_to_cp(b)] = (int16_t)b;
    size_t ptotal = (size_t)t->text_off[t->n_vocab] * 4 + 1;
    t->piece = malloc(ptotal);
    t->piece_off = malloc(((size_t)t->n_vocab + 1) * sizeof *t->piece_off);
    if (!t->piece || !t->piece_off) goto oom;
    uint32_t po = 0;
    for (int i = 0; i < t->n_vocab; i++) {
        t->piece_off[i] = po;
        po += (uint32_t)make_piece(t, i, rev, t->piece + po);
    }
    t->piece_off[t->n_vocab] = po;

    /* special tokens for text matching */
    int n_spec = 0;
    for (int i = 0; i < t->n_vocab; i++) n_spec += is_special_type(t->type[i]);
    t->spec = malloc((n_spec ? n_spec : 1) * sizeof *t->spec);
    if (!t->spec) goto oom;
    n_spec = 0;
    for (int i = 0; i < t->n_vocab; i++)
        if (is_special_type(t->type[i])) t->spec[n_spec++] = i;
    qsort_r(t->spec, (size_t)n_spec, sizeof *t->spec, cmp_spec, t);
    for (int b = 0, k = 0; b <= 256; b++) {
        while (k < n_spec && (uint8_t)t->text[t->text_off[t->spec[k]]] < b) k++;
        t->spec_start[b] = b == 256 ? n_spec : k;
    }
    *out = t;
    return 0;
oom:
    set_err(err, errlen, "%s: out of memory building the tokenizer", path);
fail:
    free(tmp);
    tok_destroy(&t);
    return -1;
}

/* ---- accessors ------------------------------------------------------------ */

int tok_n_vocab(const tok_t *t) { return t->n_vocab; }
tok_model tok_model_of(const tok_t *t) { return t->model; }
const char *tok_pre_name(const tok_t *t) { return t->pre; }
int32_t tok_bos(const tok_t *t) { return t->bos; }
int32_t tok_eos(const tok_t *t) { return t->eos; }
int32_t tok_eot(const tok_t *t) { return t->eot; }
int32_t tok_pad(const tok_t *t) { return t->pad; }
int32_t tok_unk(const tok_t *t) { return t->unk; }
int tok_add_bos(const tok_t *t) { return t->add_bos; }
int tok_add_eos(const tok_t *t) { return t->add_eos; }
int tok_add_space_prefix(const tok_t *t) { return t->add_space_prefix; }

int tok_is_eog(const tok_t *t, int32_t id) { return id >= 0 && id < t->n_vocab && t->eog[id]; }

tok_type tok_type_of(const tok_t *t, int32_t id)
{
    return id >= 0 && id < t->n_vocab ? (tok_type)t->type[id] : (tok_type)0;
}

const char *tok_text(const tok_t *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab) return NULL;
    *len = t->text_off[id + 1] - t->text_off[id];
    return t->text + t->text_off[id];
}

const char *tok_piece(const tok_t *t, int32_t id, size_t *len)
{
    if (id < 0 || id >= t->n_vocab) return NULL;
    *len = t->piece_off[id + 1] - t->piece_off[id];
    return t->piece + t->piece_off[id];
}

/* ---- encoding ------------------------------------------------------------- */

typedef struct {
    int32_t *v;
    size_t n, cap;
    int oom;
} ids_t;

static void ids_push(ids_t *o, int32_t id)
{
    if (o->oom || id < 0) return;
    if (o->n == o->cap) {
        size_t cap = o->cap ? o->cap * 2 : 64;
        int32_t *p = realloc(o->v, cap * sizeof *p);
        if (!p) {
            o->oom = 1;
            return;
        }
        o->v = p;
        o->cap = cap;
    }
    o->v[o->n++] = id;
}

/* A candidate merge of symbols left and right. */
typedef struct {
    double key;    /* BPE: rank; SPM: -score; smallest first */
    int left, right;
    int32_t a, b;  /* BPE: the ids merged; SPM: a = byte size of the merge */
} bigram_t;

typedef struct {
    bigram_t *h;
    size_t n, cap;
} heap_t;

static int bg_less(const bigram_t *x, const bigram_t *y)
{
    return x->key < y->key || (x->key == y->key && x->left < y->left);
}

static int heap_push(heap_t *hp, bigram_t b)
{
    if (hp->n == hp->cap) {
        size_t cap = hp->cap ? hp->cap * 2 : 64;
        bigram_t *p = realloc(hp->h, cap * sizeof *p);
        if (!p) return -1;
        hp->h = p;
        hp->cap = cap;
    }
    size_t i = hp->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!bg_less(&b, &hp->h[parent])) break;
        hp->h[i] = hp->h[parent];
        i = parent;
    }
    hp->h[i] = b;
    return 0;
}

static bigram_t heap_pop(heap_t *hp)
{
    bigram_t top = hp->h[0], last = hp->h[--hp->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= hp->n) break;
        if (c + 1 < hp->n && bg_less(&hp->h[c + 1], &hp->h[c])) c++;
        if (!bg_less(&hp->h[c], &last)) break;
        hp->h[i] = hp->h[c];
        i = c;
    }
    if (hp->n > 0) hp->h[i] = last;
    return top;
}

/* Scratch space of one encode call. */
typedef struct {
    int32_t *id;      /* BPE symbol ids */
    size_t *off, *len; /* SPM symbol byte ranges */
    int *prev, *next;
    size_t cap;
    heap_t heap;
    char *buf;        /* mapped or escaped text */
    size_t buf_cap;
    pcre2_match_data *md;
} scratch_t;

static int scratch_fit(scratch_t *s, size_t n)
{
    if (n <= s->cap) return 0;
    size_t cap = s->cap ? s->cap : 64;
    while (cap < n) cap *= 2;
    int32_t *id = realloc(s->id, cap * sizeof *id);
    if (id) s->id = id;
    size_t *off = realloc(s->off, cap * sizeof *off);
    if (off) s->off = off;
    size_t *len = realloc(s->len, cap * sizeof *len);
    if (len) s->len = len;
    int *prev = realloc(s->prev, cap * sizeof *prev);
    if (prev) s->prev = prev;
    int *next = realloc(s->next, cap * sizeof *next);
    if (next) s->next = next;
    if (!id || !off || !len || !prev || !next) return -1;
    s->cap = cap;
    return 0;
}

static int buf_fit(scratch_t *s, size_t n)
{
    if (n <= s->buf_cap) return 0;
    size_t cap = s->buf_cap ? s->buf_cap : 256;
    while (cap < n) cap *= 2;
    char *p = realloc(s->buf, cap);
    if (!p) return -1;
    s->buf = p;
    s->buf_cap = cap;
    return 0;
}

static void bpe_try(const tok_t *t, scratch_t *s, int l, int r)
{
    if (l < 0 || r < 0 || s->id[l] < 0 || s->id[r] < 0) return;
    int32_t res;
    int32_t rank = merge_find(t, s->id[l], s->id[r], &res);
    if (rank < 0) return;
    bigram_t b = {(double)rank, l, r, s->id[l], s->id[r]};
    if (heap_push(&s->heap, b)) s->heap.n = 0; /* out of memory: stop merging (still valid) */
}

/* Byte-level BPE of one pre-tokenized piece. */
static int bpe_word(const tok_t *t, scratch_t *s, const uint8_t *w, size_t n, ids_t *out)
{
    if (t->ignore_merges) {
        if (buf_fit(s, n * 2)) return -1;
        size_t k = 0;
        for (size_t i = 0; i < n; i++) k += utf8_put((uint32_t)byte_to_cp(w[i]), s->buf + k);
        int32_t id = tok_find(t, s->buf, k);
        if (id >= 0) {
            ids_push(out, id);
            return 0;
        }
    }
    if (scratch_fit(s, n)) return -1;
    for (size_t i = 0; i < n; i++) {
        s->id[i] = t->byte_tok[w[i]];
        s->prev[i] = (int)i - 1;
        s->next[i] = i + 1 < n ? (int)i + 1 : -1;
    }
    s->heap.n = 0;
    for (size_t i = 1; i < n; i++) bpe_try(t, s, (int)i - 1, (int)i);
    while (s->heap.n > 0) {
        bigram_t b = heap_pop(&s->heap);
        /* stale when either side has merged since (a merged-away symbol has id -2) */
        if (s->id[b.left] != b.a || s->id[b.right] != b.b || s->next[b.left] != b.right) continue;
        int32_t res;
        merge_find(t, b.a, b.b, &res);
        s->id[b.left] = res;
        s->id[b.right] = -2;
        s->next[b.left] = s->next[b.right];
        if (s->next[b.right] >= 0) s->prev[s->next[b.right]] = b.left;
        bpe_try(t, s, s->prev[b.left], b.left);
        bpe_try(t, s, b.left, s->next[b.left]);
    }
    /* a byte without a token (some vocabularies lack the bytes that never occur in
     * UTF-8) is dropped, as llama.cpp does, rather than becoming <unk> */
    for (int i = 0; i >= 0; i = s->next[i])
        if (s->id[i] >= 0) ids_push(out, s->id[i]);
    return 0;
}

typedef struct {
    size_t off, len;
} span_t;

typedef struct {
    span_t *v;
    size_t n, cap;
} spans_t;

static int spans_push(spans_t *s, size_t off, size_t len)
{
    if (len == 0) return 0;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        span_t *p = realloc(s->v, cap * sizeof *p);
        if (!p) return -1;
        s->v = p;
        s->cap = cap;
    }
    s->v[s->n++] = (span_t){off, len};
    return 0;
}

/* Split every span of in by re into (gap, match, gap, match, ..., rest) spans. */
static int regex_split(const pcre2_code *re, pcre2_match_data *md, const char *text,
                       const spans_t *in, spans_t *out)
{
    out->n = 0;
    PCRE2_SIZE *ov = pcre2_get_ovector_pointer(md);
    for (size_t i = 0; i < in->n; i++) {
        const char *sub = text + in->v[i].off;
        size_t n = in->v[i].len, gap = 0, from = 0;
        while (from < n) {
            int rc = pcre2_match(re, (PCRE2_SPTR)sub, n, from, 0, md, NULL);
            if (rc == PCRE2_ERROR_NOMATCH) break;
            if (rc < 0) return -1;
            size_t ms = ov[0], me = ov[1];
            if (me <= ms) { /* empty match: look again one character on */
                from = ms + char_len(sub + ms, n - ms);
                continue;
            }
            if (spans_push(out, in->v[i].off + gap, ms - gap) ||
                spans_push(out, in->v[i].off + ms, me - ms))
                return -1;
            gap = from = me;
        }
        if (spans_push(out, in->v[i].off + gap, n - gap)) return -1;
    }
    return 0;
}

static int bpe_fragment(const tok_t *t, scratch_t *s, const char *text, size_t len, ids_t *out)
{
    spans_t a = {0}, b = {0};
    int rc = -1;
    if (spans_push(&a, 0, len)) goto done;
    for (int r = 0; r < t->n_re; r++) {
        if (regex_split(t->re[r], s->md, text, &a, &b)) goto done;
        spans_t x = a;
        a = b;
        b = x;
    }
    for (size_t i = 0; i < a.n; i++)
        if (bpe_word(t, s, (const uint8_t *)text + a.v[i].off, a.v[i].len, out)) goto done;
    rc = 0;
done:
    free(a.v);
    free(b.v);
    return rc;
}

static void spm_try(const tok_t *t, scratch_t *s, int l, int r)
{
    if (l < 0 || r < 0) return;
    int32_t id = tok_find(t, s->buf + s->off[l], s->len[l] + s->len[r]);
    if (id < 0) return;
    bigram_t b = {-(double)t->score[id], l, r, (int32_t)(s->len[l] + s->len[r]), 0};
    if (heap_push(&s->heap, b)) s->heap.n = 0;
}

/* SentencePiece BPE of one raw fragment. */
static int spm_fragment(const tok_t *t, scratch_t *s, const char *text, size_t len,
                        int prefix, ids_t *out)
{
    size_t n = 0;
    for (size_t i = 0; i < len; i++) n += text[i] == ' ' ? 3 : 1;
    n += prefix ? 3 : 0;
    if (buf_fit(s, n) || scratch_fit(s, n)) return -1;
    size_t k = 0;
    if (prefix) {
        memcpy(s->buf, SPM_SPACE, 3);
        k = 3;
    }
    for (size_t i = 0; i < len; i++) {
        if (text[i] == ' ') {
            memcpy(s->buf + k, SPM_SPACE, 3);
            k += 3;
        } else
            s->buf[k++] = text[i];
    }
    int ns = 0;
    for (size_t i = 0; i < k; ns++) {
        size_t l = char_len(s->buf + i, k - i);
        s->off[ns] = i;
        s->len[ns] = l;
        s->prev[ns] = ns - 1;
        s->next[ns] = i + l < k ? ns + 1 : -1;
        i += l;
    }
    s->heap.n = 0;
    for (int i = 1; i < ns; i++) spm_try(t, s, i - 1, i);
    while (s->heap.n > 0) {
        bigram_t b = heap_pop(&s->heap);
        if (s->len[b.left] == 0 || s->len[b.right] == 0 ||
            s->len[b.left] + s->len[b.right] != (size_t)b.a)
            continue;
        s->len[b.left] += s->len[b.right];
        s->len[b.right] = 0;
        s->next[b.left] = s->next[b.right];
        if (s->next[b.right] >= 0) s->prev[s->next[b.right]] = b.left;
        spm_try(t, s, s->prev[b.left], b.left);
        spm_try(t, s, b.left, s->next[b.left]);
    }
    for (int i = ns ? 0 : -1; i >= 0; i = s->next[i]) {
        int32_t id = tok_find(t, s->buf + s->off[i], s->len[i]);
        if (id >= 0) {
            ids_push(out, id);
            continue;
        }
        for (size_t j = 0; j < s->len[i]; j++)
            ids_push(out, t->byte_tok[(uint8_t)s->buf[s->off[i] + j]]);
    }
    return 0;
}

/* The longest special token at text[i..len) allowed by parse_special, or -1. */
static int32_t special_at(const tok_t *t, const char *text, size_t i, size_t len, int parse_special)
{
    uint8_t c = (uint8_t)text[i];
    for (int k = t->spec_start[c]; k < t->spec_start[c + 1]; k++) {
        int32_t id = t->spec[k];
        if (!parse_special && t->type[id] != TOK_USER_DEFINED) continue;
        size_t l = t->text_off[id + 1] - t->text_off[id];
        if (l <= len - i && memcmp(text + i, t->text + t->text_off[id], l) == 0) return id;
    }
    return -1;
}

int tok_encode(const tok_t *t, const char *text, size_t len, int add_special, int parse_special,
               int32_t **ids_out, int *n_out)
{
    *ids_out = NULL;
    *n_out = 0;
    ids_t out = {0};
    scratch_t s = {0};
    int rc = -1;
    if (len > (size_t)INT32_MAX / 4) return -1;
    if (t->n_re > 0) {
        s.md = pcre2_match_data_create(4, NULL);
        if (!s.md) return -1;
    }
    if (add_special && t->add_bos) ids_push(&out, t->bos);
    int prev_special = 1;
    size_t frag = 0;
    for (size_t i = 0; i <= len;) {
        int32_t sp = i < len ? special_at(t, text, i, len, parse_special) : -1;
        if (sp < 0 && i < len) {
            i++;
            continue;
        }
        if (i > frag) {
            int r = t->model == TOK_MODEL_BPE
                        ? bpe_fragment(t, &s, text + frag, i - frag, &out)
                        : spm_fragment(t, &s, text + frag, i - frag,
                                       t->add_space_prefix && prev_special, &out);
            if (r) goto done;
            prev_special = 0;
        }
        if (sp < 0) break; /* i == len */
        ids_push(&out, sp);
        prev_special = 1;
        i += t->text_off[sp + 1] - t->text_off[sp];
        frag = i;
    }
    if (add_special && t->add_eos) ids_push(&out, t->eos);
    if (out.oom || out.n > INT32_MAX) goto done;
    if (!out.v && !(out.v = malloc(sizeof *out.v))) goto done;
    *ids_out = out.v;
    *n_out = (int)out.n;
    out.v = NULL;
    rc = 0;
done:
    free(out.v);
    free(s.id);
    free(s.off);
    free(s.len);
    free(s.prev);
    free(s.next);
    free(s.heap.h);
    free(s.buf);
    if (s.md) pcre2_match_data_free(s.md);
    return rc;
}

/* ---- decoding ------------------------------------------------------------- */

static int is_rendered_special(const tok_t *t, int32_t id)
{
    return t->type[id] == TOK_CONTROL || t->type[id] == TOK_UNKNOWN;
}

/* The bytes id contributes given the flags and whether a special token (or nothing)
 * came before it; updates *prev_special. */
static const char *piece_for(const tok_t *t, int32_t id, int flags, int *prev_special, size_t *len)
{
    const char *p = tok_piece(t, id, len);
    if (is_rendered_special(t, id) && !(flags & TOK_DECODE_SPECIAL)) *len = 0;
    if (is_special_type(t->type[id])) {
        *prev_special = 1;
        return p;
    }
    if ((flags & TOK_DECODE_STRIP_SPACE) && *prev_special && t->model == TOK_MODEL_SPM &&
        t->add_space_prefix && *len > 0 && p[0] == ' ') {
        p++;
        (*len)--;
    }
    *prev_special = 0;
    return p;
}

int tok_decode(const tok_t *t, const int32_t *ids, int n, int flags, char **text_out,
               size_t *len_out)
{
    *text_out = NULL;
    *len_out = 0;
    size_t total = 0, l;
    for (int i = 0; i < n; i++) {
        if (ids[i] < 0 || ids[i] >= t->n_vocab) return -1;
        total += t->piece_off[ids[i] + 1] - t->piece_off[ids[i]];
    }
    char *o = malloc(total + 1);
    if (!o) return -1;
    size_t k = 0;
    int prev_special = 1;
    for (int i = 0; i < n; i++) {
        const char *p = piece_for(t, ids[i], flags, &prev_special, &l);
        memcpy(o + k, p, l);
        k += l;
    }
    o[k] = 0;
    *text_out = o;
    *len_out = k;
    return 0;
}

struct tok_stream {
    const tok_t *t;
    int flags;
    int prev_special;
    char held[4];    /* the start of an incomplete character */
    size_t n_held;
    char *out;
    size_t cap;
};

int tok_stream_new(const tok_t *t, int flags, tok_stream_t **out)
{
    tok_stream_t *s = calloc(1, sizeof *s);
    *out = s;
    if (!s) return -1;
    s->t = t;
    s->flags = flags;
    s->prev_special = 1;
    return 0;
}

void tok_stream_destroy(tok_stream_t **self_p)
{
    if (!self_p || !*self_p) return;
    free((*self_p)->out);
    free(*self_p);
    *self_p = NULL;
}

static int stream_fit(tok_stream_t *s, size_t n)
{
    if (n <= s->cap) return 0;
    size_t cap = s->cap ? s->cap : 64;
    while (cap < n) cap *= 2;
    char *p = realloc(s->out, cap);
    if (!p) return -1;
    s->out = p;
    s->cap = cap;
    return 0;
}

int tok_stream_push(tok_stream_t *s, int32_t id, const char **text, size_t *len)
{
    *text = "";
    *len = 0;
    if (id < 0 || id >= s->t->n_vocab) return -1;
    size_t pl;
    const char *p = piece_for(s->t, id, s->flags, &s->prev_special, &pl);
    /* worst case: every byte becomes a 3-byte U+FFFD */
    size_t n = s->n_held + pl;
    if (stream_fit(s, n * 3 + 4)) return -1;
    /* the input is held + piece; write valid UTF-8 to out, keep a trailing prefix */
    char *in = s->out + s->cap - n; /* the input sits at the end of the buffer */
    memmove(in + s->n_held, p, pl);
    memcpy(in, s->held, s->n_held);
    size_t k = 0, i = 0;
    s->n_held = 0;
    while (i < n) {
        int l = utf8_check((const uint8_t *)in + i, n - i);
        if (l == 0) { /* incomplete at the end: hold back */
            memcpy(s->held, in + i, n - i);
            s->n_held = n - i;
            break;
        }
        if (l < 0) {
            memcpy(s->out + k, UTF8_REPLACEMENT, 3);
            k += 3;
            i += (size_t)-l;
            continue;
        }
        memmove(s->out + k, in + i, (size_t)l);
        k += (size_t)l;
        i += (size_t)l;
    }
    *text = s->out;
    *len = k;
    return 0;
}

int tok_stream_flush(tok_stream_t *s, const char **text, size_t *len)
{
    *text = "";
    *len = 0;
    if (stream_fit(s, 4)) return -1;
    if (s->n_held > 0) {
        memcpy(s->out, UTF8_REPLACEMENT, 3);
        *text = s->out;
        *len = 3;
    }
    s->n_held = 0;
    s->prev_special = 1;
    return 0;
}
