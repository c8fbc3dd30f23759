/* tests/test_tok.c: the tokenizer against llama.cpp's test vectors (ids from Hugging
 * Face tokenizers), the default model's golden ids, round trips, special tokens and the
 * incremental decoder. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <jansson.h>

#include "daemon/tok.h"
#include "tests/support/gguf_write.h"
#include "worker/gguf.h"

#define DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
#define GOLDEN "tests/golden/tok_smollm2.jsonl"

static char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *b = malloc((size_t)n + 1);
    assert_non_null(b);
    assert_int_equal(fread(b, 1, (size_t)n, f), (size_t)n);
    b[n] = 0;
    fclose(f);
    *len = (size_t)n;
    return b;
}

static tok_t *load_tok(const char *path)
{
    gguf_t *g;
    tok_t *t;
    char err[512];
    if (gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
    if (tok_new_from_gguf(g, &t, err, sizeof err) != 0) fail_msg("%s", err);
    gguf_close(&g); /* the tokenizer keeps its own copy */
    return t;
}

static void print_ids(const char *what, const int32_t *ids, int n)
{
    printf("    %s:", what);
    for (int i = 0; i < n; i++) printf(" %d", ids[i]);
    printf("\n");
}

/* Encode text and check decode(encode(text)) == text. */
static void check_roundtrip(const tok_t *t, const char *text, size_t len, int add_special)
{
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(t, text, len, add_special, 0, &ids, &n), 0);
    char *back;
    size_t bl;
    assert_int_equal(tok_decode(t, ids, n, TOK_DECODE_STRIP_SPACE, &back, &bl), 0);
    if (bl != len || memcmp(back, text, len) != 0)
        fail_msg("round trip of '%.*s' gave '%s'", (int)len, text, back);
    free(back);
    free(ids);
}

/* ---- llama.cpp's vocabulary test vectors ----------------------------------- */

static void run_vocab(const char *name)
{
    const char *shared = getenv("DUET_SHARED");
    if (!shared || !*shared) {
        printf("skip: DUET_SHARED is not set (scripts/run-tests sets it to ../shared)\n");
        skip();
    }
    char path[1024], inp[1100], outp[1100];
    snprintf(path, sizeof path, "%s/testdata/tokenizer/%s.gguf", shared, name);
    snprintf(inp, sizeof inp, "%s.inp", path);
    snprintf(outp, sizeof outp, "%s.out", path);
    if (access(path, R_OK) != 0) {
        printf("skip: %s is missing\n", path);
        skip();
    }
    tok_t *t = load_tok(path);
    size_t il, ol;
    char *in = read_all(inp, &il), *out = read_all(outp, &ol);
    assert_non_null(in);
    assert_non_null(out);
    static const char sep[] = "\n__ggml_vocab_test__\n";
    char *p = in, *q = out;
    int n_cases = 0, n_bad = 0;
    for (;;) {
        char *e = strstr(p, sep);
        if (!e) break;
        size_t tl = (size_t)(e - p);
        char *nl = strchr(q, '\n');
        assert_non_null(nl);
        *nl = 0;
        int32_t want[4096];
        int nw = 0;
        for (char *c = q; *c;) {
            char *end;
            long v = strtol(c, &end, 10);
            if (end == c) break;
            want[nw++] = (int32_t)v;
            c = end;
        }
        q = nl + 1;
        int32_t *ids;
        int n;
        assert_int_equal(tok_encode(t, p, tl, 0, 0, &ids, &n), 0);
        n_cases++;
        if (n != nw || memcmp(ids, want, (size_t)n * sizeof *ids) != 0) {
            if (n_bad++ < 5) {
                printf("  %s: mismatch on '%.*s'\n", name, (int)(tl > 120 ? 120 : tl), p);
                print_ids("want", want, nw);
                print_ids("got ", ids, n);
            }
        }
        /* the text decodes back (the vectors are valid UTF-8) */
        char *back;
        size_t bl;
        assert_int_equal(tok_decode(t, ids, n, TOK_DECODE_STRIP_SPACE, &back, &bl), 0);
        if (bl != tl || memcmp(back, p, tl) != 0) {
            if (n_bad++ < 5) printf("  %s: round trip of '%.*s' gave '%s'\n", name, (int)tl, p, back);
        }
        free(back);
        free(ids);
        p = e + sizeof sep - 1;
    }
    printf("  %s: %d cases, %d mismatches\n", name, n_cases, n_bad);
    assert_int_equal(n_cases, 46);
    assert_int_equal(n_bad, 0);
    free(in);
    free(out);
    tok_destroy(&t);
    tok_destroy(&t);
}

static void test_vocab_gpt2(void **s) { (void)s; run_vocab("ggml-vocab-gpt-2"); }
static void test_vocab_starcoder(void **s) { (void)s; run_vocab("ggml-vocab-starcoder"); }
static void test_vocab_deepseek_llm(void **s) { (void)s; run_vocab("ggml-vocab-deepseek-llm"); }
static void test_vocab_falcon(void **s) { (void)s; run_vocab("ggml-vocab-falcon"); }
static void test_vocab_llama_spm(void **s) { (void)s; run_vocab("ggml-vocab-llama-spm"); }
static void test_vocab_phi3(void **s) { (void)s; run_vocab("ggml-vocab-phi-3"); }

/* ---- the default model ---------------------------------------------------- */

static tok_t *default_tok(void)
{
    if (access(DEFAULT_MODEL, R_OK) != 0) {
        printf("skip: %s is missing (run 'make model')\n", DEFAULT_MODEL);
        return NULL;
    }
    return load_tok(DEFAULT_MODEL);
}

static void test_smollm2_basics(void **state)
{
    (void)state;
    tok_t *t = default_tok();
    if (!t) skip();
    assert_int_equal(tok_n_vocab(t), 49152);
    assert_int_equal(tok_model_of(t), TOK_MODEL_BPE);
    assert_string_equal(tok_pre_name(t), "smollm");
    assert_int_equal(tok_bos(t), 1);
    assert_int_equal(tok_eos(t), 2);
    assert_int_equal(tok_add_bos(t), 0);
    assert_true(tok_is_eog(t, 2));  /* <|im_end|> */
    assert_true(tok_is_eog(t, 0));  /* <|endoftext|> */
    assert_false(tok_is_eog(t, 1)); /* <|im_start|> */
    assert_false(tok_is_eog(t, 100));
    assert_false(tok_is_eog(t, -1));
    assert_int_equal(tok_find(t, "<|im_start|>", 12), 1);
    assert_int_equal(tok_type_of(t, 1), TOK_CONTROL);
    /* special tokens only when asked */
    const char *chat = "<|im_start|>user\nHi there<|im_end|>\n";
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(t, chat, strlen(chat), 1, 1, &ids, &n), 0);
    assert_true(n >= 6);
    assert_int_equal(ids[0], 1);
    int found_end = 0;
    for (int i = 0; i < n; i++) found_end |= ids[i] == 2;
    assert_true(found_end);
    char *back;
    size_t bl;
    assert_int_equal(tok_decode(t, ids, n, TOK_DECODE_SPECIAL, &back, &bl), 0);
    assert_string_equal(back, chat);
    free(back);
    assert_int_equal(tok_decode(t, ids, n, 0, &back, &bl), 0);
    assert_string_equal(back, "user\nHi there\n");
    free(back);
    free(ids);
    assert_int_equal(tok_encode(t, chat, strlen(chat), 0, 0, &ids, &n), 0);
    for (int i = 0; i < n; i++) assert_true(ids[i] > 2);
    free(ids);
    /* empty input */
    assert_int_equal(tok_encode(t, "", 0, 1, 1, &ids, &n), 0);
    assert_int_equal(n, 0);
    assert_non_null(ids);
    free(ids);
    /* bad ids */
    int32_t bad[2] = {5, 49152};
    assert_int_equal(tok_decode(t, bad, 2, 0, &back, &bl), -1);
    assert_null(back);
    assert_null(tok_piece(t, -1, &bl));
    tok_destroy(&t);
}

static void test_smollm2_golden(void **state)
{
    (void)state;
    if (access(GOLDEN, R_OK) != 0) {
        printf("skip: %s is not recorded yet\n", GOLDEN);
        skip();
    }
    tok_t *t = default_tok();
    if (!t) skip();
    FILE *f = fopen(GOLDEN, "r");
    assert_non_null(f);
    char *line = NULL;
    size_t cap = 0;
    ssize_t ll;
    int n_cases = 0, n_bad = 0;
    while ((ll = getline(&line, &cap, f)) > 0) {
        if (ll <= 1) continue;
        json_error_t je;
        json_t *o = json_loadb(line, (size_t)ll, JSON_ALLOW_NUL, &je);
        if (!o) fail_msg("%s: line %d: %s", GOLDEN, n_cases + 1, je.text);
        json_t *jt = json_object_get(o, "text"), *ji = json_object_get(o, "ids");
        assert_true(json_is_string(jt) && json_is_array(ji));
        const char *text = json_string_value(jt);
        size_t tl = json_string_length(jt);
        int32_t *ids;
        int n;
        assert_int_equal(tok_encode(t, text, tl, 0, 1, &ids, &n), 0);
        int same = (size_t)n == json_array_size(ji);
        for (int i = 0; same && i < n; i++)
            same = json_integer_value(json_array_get(ji, (size_t)i)) == ids[i];
        if (!same && n_bad++ < 5) {
            printf("  golden mismatch on '%.*s'\n", (int)(tl > 120 ? 120 : tl), text);
            printf("    want:");
            for (size_t i = 0; i < json_array_size(ji); i++)
                printf(" %lld", (long long)json_integer_value(json_array_get(ji, i)));
            printf("\n");
            print_ids("got ", ids, n);
        }
        n_cases++;
        free(ids);
        json_decref(o);
    }
    free(line);
    fclose(f);
    printf("  %s: %d cases, %d mismatches\n", GOLDEN, n_cases, n_bad);
    assert_true(n_cases > 0);
    assert_int_equal(n_bad, 0);
    tok_destroy(&t);
}

/* Varied text: ASCII, code, whitespace runs, numbers, accents, CJK, emoji, controls. */
static const char *const varied[] = {
    "Hello, world!",
    "  leading spaces and trailing  ",
    "tabs\tand\nnewlines\r\n\n\n",
    "def f(x):\n    return x ** 2  # square\n",
    "1234567890 3.14159 -42 1e-9 0x1F",
    "Voilà, ça coûte 12 € — naïve café",
    "日本語のテキストと中文文本，한국어 텍스트。",
    "emoji: 🦙🚀😁 👩‍👩‍👧 🏳️‍🌈 ✅",
    "I've been 'told' he's there, 'RE you sure? WE'LL see",
    "<|im_start|> looks special but is not parsed here",
    "\x01\x02 control \x7f bytes",
    "ⅷ ① ² ½ Ⅻ",
    "",
    " ",
    "a",
};

static void test_roundtrip_all_vocabs(void **state)
{
    (void)state;
    const char *shared = getenv("DUET_SHARED");
    static const char *const vocabs[] = {"ggml-vocab-gpt-2", "ggml-vocab-starcoder",
                                         "ggml-vocab-deepseek-llm", "ggml-vocab-falcon",
                                         "ggml-vocab-llama-spm", "ggml-vocab-phi-3"};
    int n_tok = 0;
    for (size_t v = 0; shared && v < sizeof vocabs / sizeof *vocabs; v++) {
        char path[1024];
        snprintf(path, sizeof path, "%s/testdata/tokenizer/%s.gguf", shared, vocabs[v]);
        if (access(path, R_OK) != 0) continue;
        tok_t *t = load_tok(path);
        for (size_t i = 0; i < sizeof varied / sizeof *varied; i++)
            check_roundtrip(t, varied[i], strlen(varied[i]), 0);
        /* invalid UTF-8 still round-trips where the vocabulary has every byte (starcoder
         * and falcon lack 0xfe/0xff; deepseek-llm has them as added tokens) */
        if (v == 0 || v >= 4) check_roundtrip(t, "bad \xff\xfe utf8 \xe2\x82 end", 18, 0);
        else check_roundtrip(t, "bad \xe2\x82 utf8 \xc3 end", 16, 0);
        tok_destroy(&t);
        n_tok++;
    }
    tok_t *t = default_tok();
    if (t) {
        for (size_t i = 0; i < sizeof varied / sizeof *varied; i++)
            check_roundtrip(t, varied[i], strlen(varied[i]), 1);
        check_roundtrip(t, "bad \xe2\x82 utf8 \xc3 end", 16, 0); /* it lacks 0xfe/0xff */
        tok_destroy(&t);
        n_tok++;
    }
    if (n_tok == 0) {
        printf("skip: no vocabulary available (DUET_SHARED unset and %s missing)\n", DEFAULT_MODEL);
        skip();
    }
}

/* ---- a built-in vocabulary (no external files) ------------------------------ */

static tok_t *builtin_tok(char *dir_out, size_t dlen)
{
    snprintf(dir_out, dlen, "/tmp/duet_test_tok_XXXXXX");
    assert_non_null(mkdtemp(dir_out));
    char path[160], err[512];
    snprintf(path, sizeof path, "%s/m.gguf", dir_out);
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.n_layer = 1;
    assert_int_equal(mkmodel_write(&o, path, err, sizeof err), 0);
    tok_t *t = load_tok(path);
    unlink(path);
    rmdir(dir_out);
    return t;
}

static void test_builtin_vocab(void **state)
{
    (void)state;
    char dir[64];
    tok_t *t = builtin_tok(dir, sizeof dir);
    assert_int_equal(tok_n_vocab(t), mkmodel_builtin_vocab_size());
    int32_t *ids;
    int n;
    const char *s = " the world";
    assert_int_equal(tok_encode(t, s, strlen(s), 0, 0, &ids, &n), 0);
    assert_int_equal(n, 2);
    size_t l;
    const char *p = tok_piece(t, ids[0], &l);
    assert_int_equal(l, 4);
    assert_memory_equal(p, " the", 4);
    p = tok_text(t, ids[1], &l);
    assert_int_equal(l, 7);
    assert_memory_equal(p, "\xc4\xa0world", 7); /* "Ġworld" */
    free(ids);
    /* merges apply lowest rank first: "Ġhello" is a chain of merges */
    s = "Hello hello";
    assert_int_equal(tok_encode(t, s, strlen(s), 0, 0, &ids, &n), 0);
    assert_int_equal(n, 2);
    free(ids);
    /* every byte has a token */
    char all[256];
    for (int i = 0; i < 256; i++) all[i] = (char)i;
    check_roundtrip(t, all, 256, 0);
    /* the chat specials */
    s = "<|im_start|>user\nthe<|im_end|>";
    assert_int_equal(tok_encode(t, s, strlen(s), 0, 1, &ids, &n), 0);
    assert_int_equal(ids[0], 1);
    assert_int_equal(ids[n - 1], 2);
    free(ids);
    tok_destroy(&t);
}

/* A bad tokenizer is a clear error. */
static void test_bad_metadata(void **state)
{
    (void)state;
    gguf_writer_t *w;
    uint8_t *buf;
    size_t size;
    gguf_t *g;
    tok_t *t;
    char err[512];
    const char *toks[3] = {"a", "b", "ab"};
    const char *merges[1] = {"a b"};
    static const struct {
        const char *model, *pre;
        int with_tokens, with_merges;
        const char *expect;
    } cases[] = {
        {NULL, NULL, 1, 1, "tokenizer.ggml.model"},
        {"bert", NULL, 1, 1, "bert"},
        {"gpt2", "no-such-pre", 1, 1, "no-such-pre"},
        {"gpt2", "gpt-2", 0, 1, "tokenizer.ggml.tokens"},
        {"gpt2", "gpt-2", 1, 0, "merges"},
        {"gpt2", "gpt-2", 1, 1, NULL},
        {"llama", NULL, 1, 0, NULL},
    };
    for (size_t i = 0; i < sizeof cases / sizeof *cases; i++) {
        assert_int_equal(gguf_writer_new(&w), 0);
        if (cases[i].model) gguf_w_str(w, "tokenizer.ggml.model", cases[i].model);
        if (cases[i].pre) gguf_w_str(w, "tokenizer.ggml.pre", cases[i].pre);
        if (cases[i].with_tokens) gguf_w_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 3);
        if (cases[i].with_merges) gguf_w_arr_str(w, "tokenizer.ggml.merges", merges, NULL, 1);
        assert_int_equal(gguf_writer_to_mem(w, &buf, &size), 0);
        assert_int_equal(gguf_open_mem(buf, size, "v.gguf", &g, err, sizeof err), 0);
        int rc = tok_new_from_gguf(g, &t, err, sizeof err);
        if (cases[i].expect) {
            assert_int_equal(rc, -1);
            assert_null(t);
            if (!strstr(err, cases[i].expect) || !strstr(err, "v.gguf"))
                fail_msg("case %zu: error '%s' lacks '%s'", i, err, cases[i].expect);
        } else {
            if (rc != 0) fail_msg("case %zu: %s", i, err);
            int32_t *ids;
            int n;
            assert_int_equal(tok_encode(t, "ab", 2, 0, 0, &ids, &n), 0);
            if (strcmp(cases[i].model, "gpt2") == 0) {
                assert_int_equal(n, 1);
                assert_int_equal(ids[0], 2);
            }
            free(ids);
            tok_destroy(&t);
        }
        gguf_close(&g);
        free(buf);
        gguf_writer_destroy(&w);
    }
}

/* Every pre-tokenizer compiles and splits text into pieces that decode back. (Their ids
 * were compared with llama.cpp's on a 58-text corpus with the deepseek-llm vocabulary.) */
static void test_all_pre_types(void **state)
{
    (void)state;
    static const char *const pres[] = {
        "default", "gpt2", "gpt-2", "llama3", "llama-bpe", "qwen2", "smollm", "starcoder",
        "falcon", "deepseek-llm", "deepseek-coder", "deepseek-v3", "bloom", "viking", "tekken",
        "gpt-4o", "dbrx", "chatglm-bpe", "command-r", "stablelm2", "mpt", "olmo",
    };
    /* 256 byte characters and a few merges */
    char chars[256][4];
    const char *toks[260];
    for (int b = 0; b < 256; b++) {
        int cp = b, m = 0;
        if (!((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || b >= 0xae)) {
            for (int x = 0; x < b; x++)
                m += !((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || x >= 0xae);
            cp = 256 + m;
        }
        if (cp < 0x80) {
            chars[b][0] = (char)cp;
            chars[b][1] = 0;
        } else {
            chars[b][0] = (char)(0xc0 | (cp >> 6));
            chars[b][1] = (char)(0x80 | (cp & 0x3f));
            chars[b][2] = 0;
        }
        toks[b] = chars[b];
    }
    toks[256] = "th";
    toks[257] = "the";
    toks[258] = "\xc4\xa0the";
    toks[259] = "<|end|>";
    const char *merges[3] = {"t h", "th e", "\xc4\xa0 the"};
    int32_t types[260];
    for (int i = 0; i < 260; i++) types[i] = i == 259 ? TOK_CONTROL : TOK_NORMAL;
    for (size_t k = 0; k < sizeof pres / sizeof *pres; k++) {
        gguf_writer_t *w;
        uint8_t *buf;
        size_t size;
        gguf_t *g;
        tok_t *t;
        char err[512];
        assert_int_equal(gguf_writer_new(&w), 0);
        gguf_w_str(w, "tokenizer.ggml.model", "gpt2");
        gguf_w_str(w, "tokenizer.ggml.pre", pres[k]);
        gguf_w_arr_str(w, "tokenizer.ggml.tokens", toks, NULL, 260);
        gguf_w_arr(w, "tokenizer.ggml.token_type", GGUF_TYPE_INT32, types, 260);
        gguf_w_arr_str(w, "tokenizer.ggml.merges", merges, NULL, 3);
        gguf_w_u32(w, "tokenizer.ggml.eos_token_id", 259);
        assert_int_equal(gguf_writer_to_mem(w, &buf, &size), 0);
        assert_int_equal(gguf_open_mem(buf, size, pres[k], &g, err, sizeof err), 0);
        if (tok_new_from_gguf(g, &t, err, sizeof err) != 0) fail_msg("%s: %s", pres[k], err);
        assert_string_equal(tok_pre_name(t), pres[k]);
        for (size_t i = 0; i < sizeof varied / sizeof *varied; i++)
            check_roundtrip(t, varied[i], strlen(varied[i]), 0);
        int32_t *ids;
        int n;
        assert_int_equal(tok_encode(t, "the the<|end|>", 14, 0, 1, &ids, &n), 0);
        assert_int_equal(n, 3);
        assert_int_equal(ids[0], 257);
        assert_int_equal(ids[1], 258);
        assert_int_equal(ids[2], 259);
        assert_true(tok_is_eog(t, 259));
        free(ids);
        tok_destroy(&t);
        gguf_close(&g);
        free(buf);
        gguf_writer_destroy(&w);
    }
}

/* ---- incremental decoding ------------------------------------------------ */

/* Stream ids one by one; check every chunk is whole UTF-8 and the total is text. */
static void check_stream(const tok_t *t, const int32_t *ids, int n, const char *text, int flags)
{
    tok_stream_t *s;
    assert_int_equal(tok_stream_new(t, flags, &s), 0);
    char acc[4096];
    size_t k = 0;
    int partial_seen = 0;
    for (int i = 0; i < n; i++) {
        const char *c;
        size_t l;
        assert_int_equal(tok_stream_push(s, ids[i], &c, &l), 0);
        /* a chunk never ends inside a character */
        for (size_t j = 0; j < l;) {
            uint8_t b = (uint8_t)c[j];
            size_t cl = b < 0x80 ? 1 : b < 0xe0 ? 2 : b < 0xf0 ? 3 : 4;
            assert_true(b < 0x80 || b >= 0xc2);
            assert_true(j + cl <= l);
            j += cl;
        }
        size_t pl;
        tok_piece(t, ids[i], &pl);
        if (l == 0 && pl > 0) partial_seen = 1;
        memcpy(acc + k, c, l);
        k += l;
    }
    const char *c;
    size_t l;
    assert_int_equal(tok_stream_flush(s, &c, &l), 0);
    assert_int_equal(l, 0);
    acc[k] = 0;
    assert_string_equal(acc, text);
    tok_stream_destroy(&s);
    tok_stream_destroy(&s);
    (void)partial_seen;
}

/* Ids of the byte tokens of text: the worst case, every character split. */
static int byte_ids(const tok_t *t, const char *text, int32_t *ids)
{
    int n = 0;
    for (const uint8_t *p = (const uint8_t *)text; *p; p++) {
        char c[8];
        size_t l;
        if (tok_model_of(t) == TOK_MODEL_SPM) l = (size_t)snprintf(c, sizeof c, "<0x%02X>", *p);
        else {
            /* GPT-2's byte character */
            int b = *p, cp;
            if ((b >= '!' && b <= '~') || (b >= 0xa1 && b <= 0xac) || (b >= 0xae))
                cp = b;
            else {
                int m = 0;
                for (int x = 0; x < b; x++)
                    m += !((x >= '!' && x <= '~') || (x >= 0xa1 && x <= 0xac) || (x >= 0xae));
                cp = 256 + m;
            }
            if (cp < 0x80) {
                c[0] = (char)cp;
                l = 1;
            } else {
                c[0] = (char)(0xc0 | (cp >> 6));
                c[1] = (char)(0x80 | (cp & 0x3f));
                l = 2;
            }
        }
        ids[n] = tok_find(t, c, l);
        assert_true(ids[n] >= 0);
        n++;
    }
    return n;
}

static void test_stream(void **state)
{
    (void)state;
    char dir[64];
    tok_t *t = builtin_tok(dir, sizeof dir);
    static const char *const texts[] = {
        "🦙 llamas 日本語 👩‍👩‍👧 é", "中文文本，한국어", "plain ascii", "ü𝄞€",
    };
    for (size_t i = 0; i < sizeof texts / sizeof *texts; i++) {
        int32_t ids[256];
        int n = byte_ids(t, texts[i], ids);
        check_stream(t, ids, n, texts[i], 0);
        int32_t *enc;
        int ne;
        assert_int_equal(tok_encode(t, texts[i], strlen(texts[i]), 0, 0, &enc, &ne), 0);
        check_stream(t, enc, ne, texts[i], 0);
        free(enc);
    }
    /* held bytes: the first three bytes of a 4-byte emoji give nothing until the 4th */
    int32_t ids[8];
    int n = byte_ids(t, "\xf0\x9f\xa6\x99", ids);
    assert_int_equal(n, 4);
    tok_stream_t *s;
    assert_int_equal(tok_stream_new(t, 0, &s), 0);
    const char *c;
    size_t l;
    for (int i = 0; i < 3; i++) {
        assert_int_equal(tok_stream_push(s, ids[i], &c, &l), 0);
        assert_int_equal(l, 0);
    }
    assert_int_equal(tok_stream_push(s, ids[3], &c, &l), 0);
    assert_int_equal(l, 4);
    assert_memory_equal(c, "\xf0\x9f\xa6\x99", 4);
    /* an incomplete character at the end becomes U+FFFD at flush */
    assert_int_equal(tok_stream_push(s, ids[0], &c, &l), 0);
    assert_int_equal(l, 0);
    assert_int_equal(tok_stream_flush(s, &c, &l), 0);
    assert_int_equal(l, 3);
    assert_memory_equal(c, "\xef\xbf\xbd", 3);
    /* an interrupted character: one U+FFFD, then the rest */
    assert_int_equal(tok_stream_push(s, ids[0], &c, &l), 0);
    assert_int_equal(tok_stream_push(s, ids[1], &c, &l), 0);
    int32_t a = tok_find(t, "a", 1);
    assert_int_equal(tok_stream_push(s, a, &c, &l), 0);
    assert_int_equal(l, 4);
    assert_memory_equal(c, "\xef\xbf\xbd" "a", 4);
    /* a stray continuation byte */
    int32_t cont[1];
    byte_ids(t, "\x80", cont);
    assert_int_equal(tok_stream_push(s, cont[0], &c, &l), 0);
    assert_int_equal(l, 3);
    assert_int_equal(tok_stream_push(s, 100000, &c, &l), -1);
    /* special tokens: only with TOK_DECODE_SPECIAL */
    assert_int_equal(tok_stream_push(s, 2, &c, &l), 0);
    assert_int_equal(l, 0);
    tok_stream_destroy(&s);
    assert_int_equal(tok_stream_new(t, TOK_DECODE_SPECIAL, &s), 0);
    assert_int_equal(tok_stream_push(s, 2, &c, &l), 0);
    assert_int_equal(l, 10);
    assert_memory_equal(c, "<|im_end|>", 10);
    tok_stream_destroy(&s);
    tok_destroy(&t);
}

/* SentencePiece: byte fallback and the leading-space rule, in the stream too. */
static void test_stream_spm(void **state)
{
    (void)state;
    const char *shared = getenv("DUET_SHARED");
    char path[1024];
    snprintf(path, sizeof path, "%s/testdata/tokenizer/ggml-vocab-llama-spm.gguf",
             shared ? shared : ".");
    if (!shared || access(path, R_OK) != 0) {
        printf("skip: %s is missing (DUET_SHARED)\n", path);
        skip();
    }
    tok_t *t = load_tok(path);
    assert_int_equal(tok_model_of(t), TOK_MODEL_SPM);
    assert_int_equal(tok_add_bos(t), 1);
    const char *text = "Hello 🦙 wörld 𝄞 中文";
    int32_t *ids;
    int n;
    assert_int_equal(tok_encode(t, text, strlen(text), 1, 0, &ids, &n), 0);
    assert_int_equal(ids[0], tok_bos(t));
    check_stream(t, ids, n, text, TOK_DECODE_STRIP_SPACE);
    char *back;
    size_t bl;
    assert_int_equal(tok_decode(t, ids, n, 0, &back, &bl), 0);
    assert_int_equal(back[0], ' '); /* without the flag, the prefix space shows */
    assert_string_equal(back + 1, text);
    free(back);
    free(ids);
    /* byte-split emoji */
    int32_t b[8];
    int nb = byte_ids(t, "🦙", b);
    check_stream(t, b, nb, "🦙", 0);
    tok_destroy(&t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vocab_gpt2),
        cmocka_unit_test(test_vocab_starcoder),
        cmocka_unit_test(test_vocab_deepseek_llm),
        cmocka_unit_test(test_vocab_falcon),
        cmocka_unit_test(test_vocab_llama_spm),
        cmocka_unit_test(test_vocab_phi3),
        cmocka_unit_test(test_smollm2_basics),
        cmocka_unit_test(test_smollm2_golden),
        cmocka_unit_test(test_roundtrip_all_vocabs),
        cmocka_unit_test(test_builtin_vocab),
        cmocka_unit_test(test_bad_metadata),
        cmocka_unit_test(test_all_pre_types),
        cmocka_unit_test(test_stream),
        cmocka_unit_test(test_stream_spm),
    };
    return cmocka_run_group_tests_name("tok", tests, NULL, NULL);
}
