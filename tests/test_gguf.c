/* tests/test_gguf.c: the GGUF reader on good files from the test writer, and on
 * damaged ones (each damage must be a clean error with a useful message). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>

#include "tests/support/gguf_write.h"
#include "worker/gguf.h"

/* ---- helpers ------------------------------------------------------------ */

typedef struct {
    uint8_t *buf;
    size_t size;
} file_t;

static const float tdata_f32[2 * 32] = {1, 2, 3, 4, 5, 6, 7, 8};

/* A small file with every metadata type and three tensors. */
static gguf_writer_t *sample_writer(uint32_t alignment)
{
    gguf_writer_t *w;
    assert_int_equal(gguf_writer_new(&w), 0);
    if (alignment != 32) gguf_writer_set_alignment(w, alignment);
    gguf_w_str(w, "general.architecture", "llama");
    gguf_w_u8(w, "t.u8", 200);
    gguf_w_i8(w, "t.i8", -100);
    gguf_w_u16(w, "t.u16", 60000);
    gguf_w_i16(w, "t.i16", -30000);
    gguf_w_u32(w, "t.u32", 4000000000u);
    gguf_w_i32(w, "t.i32", -2000000000);
    gguf_w_u64(w, "t.u64", 0xffffffffffffffffull);
    gguf_w_i64(w, "t.i64", -5000000000ll);
    gguf_w_f32(w, "t.f32", 1.5f);
    gguf_w_f64(w, "t.f64", -2.25);
    gguf_w_bool(w, "t.bool", 1);
    gguf_w_str_n(w, "t.str", "hi\0there", 8);
    int32_t ia[5] = {1, -2, 3, -4, 5};
    gguf_w_arr(w, "t.arr_i32", GGUF_TYPE_INT32, ia, 5);
    float fa[3] = {0.5f, 1.5f, -3.0f};
    gguf_w_arr(w, "t.arr_f32", GGUF_TYPE_FLOAT32, fa, 3);
    uint8_t ba[2] = {0, 1};
    gguf_w_arr(w, "t.arr_bool", GGUF_TYPE_BOOL, ba, 2);
    const char *sa[4] = {"alpha", "", "gamma\xe2\x96\x81", "delta"};
    gguf_w_arr_str(w, "t.arr_str", sa, NULL, 4);
    gguf_w_arr(w, "t.arr_empty", GGUF_TYPE_UINT8, NULL, 0);

    int64_t ne1[2] = {32, 2};
    assert_int_equal(gguf_w_tensor(w, "a.weight", DTYPE_F32, 2, ne1, tdata_f32), 0);
    uint8_t q[2 * 18];
    for (size_t i = 0; i < sizeof q; i++) q[i] = (uint8_t)(i * 7);
    int64_t ne2[1] = {64};
    assert_int_equal(gguf_w_tensor(w, "b.weight", DTYPE_Q4_0, 1, ne2, q), 0);
    int64_t ne3[4] = {3, 1, 2, 1};
    uint16_t h[6] = {1, 2, 3, 4, 5, 6};
    assert_int_equal(gguf_w_tensor(w, "c.weight", DTYPE_F16, 4, ne3, h), 0);
    return w;
}

static file_t sample_file(uint32_t alignment)
{
    gguf_writer_t *w = sample_writer(alignment);
    file_t f;
    assert_int_equal(gguf_writer_to_mem(w, &f.buf, &f.size), 0);
    gguf_writer_destroy(&w);
    gguf_writer_destroy(&w);
    return f;
}

/* Open size bytes of buf through an exactly sized copy (so that ASan sees over-reads). */
static int open_copy(const uint8_t *buf, size_t size, gguf_t **g, char *err, size_t errlen)
{
    uint8_t *c = malloc(size ? size : 1);
    assert_non_null(c);
    memcpy(c, buf, size);
    int rc = gguf_open_mem(c, size, "test.gguf", g, err, errlen);
    if (rc == 0) {
        /* touch everything to catch dangling offsets */
        for (int64_t i = 0; i < gguf_n_tensors(*g); i++) {
            const gguf_tensor_t *t = gguf_tensor(*g, i);
            volatile uint8_t s = 0;
            for (size_t j = 0; j < t->nbytes; j++) s ^= ((const uint8_t *)t->data)[j];
            (void)s;
        }
        for (int64_t i = 0; i < gguf_n_kv(*g); i++) {
            gguf_type_t et;
            uint64_t n;
            if (gguf_arr_info(*g, i, &et, &n) == GGUF_OK && et == GGUF_TYPE_STRING)
                for (uint64_t j = 0; j < n; j++) {
                    const char *s;
                    size_t l;
                    gguf_arr_get_str(*g, i, j, &s, &l);
                    volatile char x = l ? s[l - 1] : 0;
                    (void)x;
                }
        }
        gguf_close(g);
    }
    free(c);
    return rc;
}

/* Expect open to fail with an error mentioning every given substring. */
static void expect_error(const uint8_t *buf, size_t size, ...)
{
    gguf_t *g = NULL;
    char err[512] = "";
    int rc = open_copy(buf, size, &g, err, sizeof err);
    if (rc == 0) fail_msg("open succeeded, expected an error");
    assert_null(g);
    assert_non_null(strstr(err, "test.gguf"));
    va_list ap;
    va_start(ap, size);
    for (const char *s; (s = va_arg(ap, const char *));)
        if (!strstr(err, s)) {
            va_end(ap);
            fail_msg("error '%s' lacks '%s'", err, s);
        }
    va_end(ap);
}

/* Offset of the first occurrence of a GGUF string (u64 length + bytes) s in f. */
static size_t find_gstr(const file_t *f, const char *s)
{
    size_t n = strlen(s);
    for (size_t i = 0; i + 8 + n <= f->size; i++) {
        uint64_t l;
        memcpy(&l, f->buf + i, 8);
        if (l == n && memcmp(f->buf + i + 8, s, n) == 0) return i;
    }
    fail_msg("string %s not found", s);
    return 0;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* ---- good files --------------------------------------------------------- */

static void check_sample(gguf_t *g, uint32_t alignment)
{
    assert_int_equal(gguf_version(g), 3);
    assert_int_equal(gguf_alignment(g), alignment);
    assert_int_equal(gguf_n_kv(g), 18 + (alignment != 32));
    uint8_t u8;
    int8_t i8;
    uint16_t u16;
    int16_t i16;
    uint32_t u32;
    int32_t i32;
    uint64_t u64;
    int64_t i64;
    float f32;
    double f64;
    int b;
    assert_int_equal(gguf_get_u8(g, "t.u8", &u8), GGUF_OK);
    assert_int_equal(u8, 200);
    assert_int_equal(gguf_get_i8(g, "t.i8", &i8), GGUF_OK);
    assert_int_equal(i8, -100);
    assert_int_equal(gguf_get_u16(g, "t.u16", &u16), GGUF_OK);
    assert_int_equal(u16, 60000);
    assert_int_equal(gguf_get_i16(g, "t.i16", &i16), GGUF_OK);
    assert_int_equal(i16, -30000);
    assert_int_equal(gguf_get_u32(g, "t.u32", &u32), GGUF_OK);
    assert_int_equal(u32, 4000000000u);
    assert_int_equal(gguf_get_i32(g, "t.i32", &i32), GGUF_OK);
    assert_int_equal(i32, -2000000000);
    assert_int_equal(gguf_get_u64(g, "t.u64", &u64), GGUF_OK);
    assert_true(u64 == 0xffffffffffffffffull);
    assert_int_equal(gguf_get_i64(g, "t.i64", &i64), GGUF_OK);
    assert_true(i64 == -5000000000ll);
    assert_int_equal(gguf_get_f32(g, "t.f32", &f32), GGUF_OK);
    assert_true(f32 == 1.5f);
    assert_int_equal(gguf_get_f64(g, "t.f64", &f64), GGUF_OK);
    assert_true(f64 == -2.25);
    assert_int_equal(gguf_get_bool(g, "t.bool", &b), GGUF_OK);
    assert_int_equal(b, 1);
    /* strict types, missing keys, lenient getters */
    assert_int_equal(gguf_get_u32(g, "t.i32", &u32), GGUF_ETYPE);
    assert_int_equal(gguf_get_u32(g, "nope", &u32), GGUF_ENOKEY);
    assert_int_equal(gguf_get_int(g, "t.u16", &i64), GGUF_OK);
    assert_int_equal(i64, 60000);
    assert_int_equal(gguf_get_int(g, "t.i8", &i64), GGUF_OK);
    assert_int_equal(i64, -100);
    assert_int_equal(gguf_get_int(g, "t.u64", &i64), GGUF_ERANGE);
    assert_int_equal(gguf_get_int(g, "t.f32", &i64), GGUF_ETYPE);
    assert_int_equal(gguf_get_float(g, "t.f32", &f64), GGUF_OK);
    assert_true(f64 == 1.5);
    assert_int_equal(gguf_get_float(g, "t.u8", &f64), GGUF_ETYPE);
    /* strings */
    const char *s;
    size_t len;
    assert_int_equal(gguf_get_str(g, "t.str", &s, &len), GGUF_OK);
    assert_int_equal(len, 8);
    assert_memory_equal(s, "hi\0there", 8);
    char *d = gguf_get_str_dup(g, "general.architecture");
    assert_string_equal(d, "llama");
    free(d);
    assert_null(gguf_get_str_dup(g, "t.u8"));
    assert_null(gguf_get_str_dup(g, "nope"));
    /* keys by index */
    int64_t ki = gguf_find_key(g, "t.f64");
    assert_true(ki >= 0);
    assert_string_equal(gguf_kv_key(g, ki), "t.f64");
    assert_int_equal(gguf_kv_type(g, ki), GGUF_TYPE_FLOAT64);
    assert_int_equal(gguf_find_key(g, "t.f6"), -1);
    assert_int_equal(gguf_find_key(g, "t.f644"), -1);
    assert_null(gguf_kv_key(g, -1));
    assert_null(gguf_kv_key(g, gguf_n_kv(g)));
    assert_int_equal(gguf_kv_type(g, 1000), GGUF_TYPE_COUNT_);
    /* arrays */
    gguf_type_t et;
    uint64_t n;
    int64_t ai = gguf_find_key(g, "t.arr_i32");
    assert_int_equal(gguf_arr_info(g, ai, &et, &n), GGUF_OK);
    assert_int_equal(et, GGUF_TYPE_INT32);
    assert_int_equal(n, 5);
    assert_int_equal(gguf_arr_get_int(g, ai, 3, &i64), GGUF_OK);
    assert_int_equal(i64, -4);
    assert_int_equal(gguf_arr_get_int(g, ai, 5, &i64), GGUF_ERANGE);
    assert_int_equal(gguf_arr_get_float(g, ai, 0, &f64), GGUF_ETYPE);
    int32_t raw[5];
    memcpy(raw, gguf_arr_data(g, ai), sizeof raw);
    assert_int_equal(raw[4], 5);
    int64_t af = gguf_find_key(g, "t.arr_f32");
    assert_int_equal(gguf_arr_get_float(g, af, 2, &f64), GGUF_OK);
    assert_true(f64 == -3.0);
    int64_t ab = gguf_find_key(g, "t.arr_bool");
    assert_int_equal(gguf_arr_get_int(g, ab, 1, &i64), GGUF_OK);
    assert_int_equal(i64, 1);
    int64_t as = gguf_find_key(g, "t.arr_str");
    assert_int_equal(gguf_arr_info(g, as, &et, &n), GGUF_OK);
    assert_int_equal(et, GGUF_TYPE_STRING);
    assert_int_equal(n, 4);
    assert_null(gguf_arr_data(g, as));
    assert_int_equal(gguf_arr_get_str(g, as, 2, &s, &len), GGUF_OK);
    assert_int_equal(len, 8);
    assert_memory_equal(s, "gamma\xe2\x96\x81", 8);
    assert_int_equal(gguf_arr_get_str(g, as, 1, &s, &len), GGUF_OK);
    assert_int_equal(len, 0);
    assert_int_equal(gguf_arr_get_str(g, as, 4, &s, &len), GGUF_ERANGE);
    assert_int_equal(gguf_arr_get_int(g, as, 0, &i64), GGUF_ETYPE);
    assert_int_equal(gguf_arr_info(g, gguf_find_key(g, "t.u8"), &et, &n), GGUF_ETYPE);
    assert_int_equal(gguf_arr_info(g, -1, &et, &n), GGUF_ENOKEY);
    assert_int_equal(gguf_arr_info(g, gguf_find_key(g, "t.arr_empty"), &et, &n), GGUF_OK);
    assert_int_equal(n, 0);
    /* tensors */
    assert_int_equal(gguf_n_tensors(g), 3);
    const gguf_tensor_t *t = gguf_find_tensor(g, "a.weight");
    assert_non_null(t);
    assert_ptr_equal(t, gguf_tensor(g, 0));
    assert_int_equal(t->type, DTYPE_F32);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 32);
    assert_int_equal(t->ne[1], 2);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->n_elems, 64);
    assert_int_equal(t->nbytes, 256);
    assert_memory_equal(t->data, tdata_f32, 256);
    assert_int_equal(t->offset % alignment, 0);
    assert_int_equal((uintptr_t)t->data - (uintptr_t)gguf_base(g), t->offset);
    t = gguf_find_tensor(g, "b.weight");
    assert_int_equal(t->type, DTYPE_Q4_0);
    assert_int_equal(t->nbytes, 36);
    assert_int_equal(((const uint8_t *)t->data)[5], 35);
    assert_int_equal(t->offset % alignment, 0);
    t = gguf_find_tensor(g, "c.weight");
    assert_int_equal(t->n_dims, 4);
    assert_int_equal(t->ne[2], 2);
    assert_int_equal(t->nbytes, 12);
    assert_null(gguf_find_tensor(g, "d.weight"));
    assert_null(gguf_tensor(g, 3));
    assert_null(gguf_tensor(g, -1));
}

static void test_roundtrip_file(void **state)
{
    (void)state;
    static const uint32_t aligns[] = {32, 64, 8};
    for (size_t k = 0; k < 3; k++) {
        gguf_writer_t *w = sample_writer(aligns[k]);
        char path[] = "/tmp/duet_test_gguf_XXXXXX";
        int fd = mkstemp(path);
        assert_true(fd >= 0);
        close(fd);
        char err[512];
        assert_int_equal(gguf_writer_write(w, path, err, sizeof err), 0);
        gguf_writer_destroy(&w);
        gguf_t *g = NULL;
        if (gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
        check_sample(g, aligns[k]);
        assert_string_equal(gguf_path(g), path);
        /* data pointers in the mapping are aligned in memory too */
        assert_int_equal((uintptr_t)gguf_find_tensor(g, "b.weight")->data % aligns[k], 0);
        gguf_close(&g);
        assert_null(g);
        gguf_close(&g);
        unlink(path);
    }
}

static void test_roundtrip_mem_and_v2(void **state)
{
    (void)state;
    file_t f = sample_file(32);
    gguf_t *g = NULL;
    char err[512];
    assert_int_equal(gguf_open_mem(f.buf, f.size, "mem", &g, err, sizeof err), 0);
    check_sample(g, 32);
    assert_int_equal(gguf_file_size(g), f.size);
    gguf_close(&g);
    put32(f.buf + 4, 2); /* version 2 has the same layout */
    assert_int_equal(gguf_open_mem(f.buf, f.size, "mem", &g, err, sizeof err), 0);
    assert_int_equal(gguf_version(g), 2);
    gguf_close(&g);
    free(f.buf);
}

static void test_empty_file_ok(void **state)
{
    (void)state;
    gguf_writer_t *w;
    gguf_writer_new(&w);
    uint8_t *buf;
    size_t size;
    assert_int_equal(gguf_writer_to_mem(w, &buf, &size), 0);
    assert_int_equal(size, 24);
    gguf_t *g;
    char err[256];
    assert_int_equal(gguf_open_mem(buf, size, "e", &g, err, sizeof err), 0);
    assert_int_equal(gguf_n_kv(g), 0);
    assert_int_equal(gguf_n_tensors(g), 0);
    assert_int_equal(gguf_find_key(g, "x"), -1);
    assert_null(gguf_find_tensor(g, "x"));
    gguf_close(&g);
    gguf_writer_destroy(&w);
    free(buf);
}

/* ---- damaged files ------------------------------------------------------ */

static void test_truncated_everywhere(void **state)
{
    (void)state;
    file_t f = sample_file(32);
    gguf_t *g = NULL;
    char err[512];
    /* the end of the last tensor's data: truncation before it must fail */
    assert_int_equal(gguf_open_mem(f.buf, f.size, "x", &g, err, sizeof err), 0);
    size_t need = 0;
    for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
        const gguf_tensor_t *t = gguf_tensor(g, i);
        if (t->offset + t->nbytes > need) need = t->offset + t->nbytes;
    }
    gguf_close(&g);
    for (size_t n = 0; n < need; n++) {
        err[0] = 0;
        int rc = open_copy(f.buf, n, &g, err, sizeof err);
        if (rc == 0) fail_msg("truncated at %zu of %zu bytes: opened", n, f.size);
        assert_non_null(strstr(err, "test.gguf"));
        if (n >= 24 && !strstr(err, "truncated") && !strstr(err, "beyond the end") &&
            !strstr(err, "impossible") && !strstr(err, "larger than the file"))
            fail_msg("truncated at %zu: unhelpful error '%s'", n, err);
    }
    for (size_t n = need; n <= f.size; n++) assert_int_equal(open_copy(f.buf, n, &g, err, sizeof err), 0);
    /* and through a real file */
    char path[] = "/tmp/duet_test_gguf_XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    assert_int_equal(write(fd, f.buf, need - 1), (ssize_t)(need - 1));
    close(fd);
    assert_int_equal(gguf_open(path, &g, err, sizeof err), -1);
    assert_non_null(strstr(err, path));
    assert_non_null(strstr(err, "c.weight"));
    unlink(path);
    free(f.buf);
}

static void test_bad_header(void **state)
{
    (void)state;
    file_t f = sample_file(32);
    uint8_t *c = malloc(f.size);
    memcpy(c, f.buf, f.size);
    c[0] = 'X';
    expect_error(c, f.size, "magic", NULL);
    memcpy(c, f.buf, f.size);
    put32(c + 4, 1);
    expect_error(c, f.size, "version 1", NULL);
    put32(c + 4, 4);
    expect_error(c, f.size, "version 4", NULL);
    put32(c + 4, 0x03000000);
    expect_error(c, f.size, "big-endian", NULL);
    memcpy(c, f.buf, f.size);
    put64(c + 8, 1ull << 40); /* absurd tensor count */
    expect_error(c, f.size, "tensor count", NULL);
    put64(c + 8, 4); /* one more tensor than there is */
    expect_error(c, f.size, NULL);
    memcpy(c, f.buf, f.size);
    put64(c + 16, 0xffffffffffffffffull); /* absurd metadata count */
    expect_error(c, f.size, "metadata count", NULL);
    put64(c + 16, 1000);
    expect_error(c, f.size, NULL);
    free(c);
    free(f.buf);
    char err[256];
    gguf_t *g;
    expect_error((const uint8_t *)"GG", 2, "too short", NULL);
    assert_int_equal(gguf_open("/nonexistent/duet.gguf", &g, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent/duet.gguf"));
    assert_int_equal(gguf_open("/tmp", &g, err, sizeof err), -1);
    assert_non_null(strstr(err, "not a regular file"));
    assert_null(g);
    assert_int_equal(gguf_open("/dev/null", &g, NULL, 0), -1);
}

static void test_bad_metadata(void **state)
{
    (void)state;
    file_t f = sample_file(32);
    uint8_t *c = malloc(f.size);
    size_t k;
    /* absurd string length */
    memcpy(c, f.buf, f.size);
    k = find_gstr(&f, "t.str");
    put64(c + k + 8 + 5 + 4, 1ull << 50);
    expect_error(c, f.size, "t.str", "length", NULL);
    put64(c + k + 8 + 5 + 4, 0xffffffffffffffffull);
    expect_error(c, f.size, "t.str", NULL);
    /* absurd key length */
    memcpy(c, f.buf, f.size);
    put64(c + k, 0xfffffffffffffff0ull);
    expect_error(c, f.size, "key of metadata entry", NULL);
    /* empty key */
    put64(c + k, 0);
    expect_error(c, f.size, NULL);
    /* unknown value type */
    memcpy(c, f.buf, f.size);
    put32(c + k + 8 + 5, 13);
    expect_error(c, f.size, "unknown value type 13", "t.str", NULL);
    /* absurd array lengths */
    memcpy(c, f.buf, f.size);
    k = find_gstr(&f, "t.arr_i32");
    size_t arr = k + 8 + 9 + 4;
    put64(c + arr + 4, 1ull << 62);
    expect_error(c, f.size, "t.arr_i32", "beyond the end", NULL);
    put64(c + arr + 4, 0x4000000000000001ull); /* n * 4 overflows 64 bits */
    expect_error(c, f.size, "t.arr_i32", NULL);
    /* unknown and nested element types */
    memcpy(c, f.buf, f.size);
    put32(c + arr, 77);
    expect_error(c, f.size, "t.arr_i32", "element type 77", NULL);
    put32(c + arr, GGUF_TYPE_ARRAY);
    expect_error(c, f.size, "t.arr_i32", "arrays", NULL);
    /* array of strings: a string length beyond the file, and an absurd count */
    memcpy(c, f.buf, f.size);
    k = find_gstr(&f, "alpha");
    put64(c + k, 1ull << 40);
    expect_error(c, f.size, "t.arr_str", NULL);
    memcpy(c, f.buf, f.size);
    k = find_gstr(&f, "t.arr_str");
    put64(c + k + 8 + 9 + 4 + 4, 1ull << 61);
    expect_error(c, f.size, "t.arr_str", "strings", NULL);
    /* a bool that is neither 0 nor 1 */
    memcpy(c, f.buf, f.size);
    k = find_gstr(&f, "t.bool");
    c[k + 8 + 6 + 4] = 7;
    expect_error(c, f.size, "t.bool", NULL);
    /* duplicate key: rename t.u16 to t.u32's... same length: t.i16 -> t.u16 */
    memcpy(c, f.buf, f.size);
    k = find_gstr(&f, "t.i16");
    c[k + 8 + 2] = 'u';
    expect_error(c, f.size, "duplicate", "t.u16", NULL);
    /* a key with a NUL */
    memcpy(c, f.buf, f.size);
    c[k + 8 + 1] = 0;
    expect_error(c, f.size, "NUL", NULL);
    free(c);
    free(f.buf);
}

static void test_bad_alignment_key(void **state)
{
    (void)state;
    file_t f = sample_file(64);
    uint8_t *c = malloc(f.size);
    size_t k = find_gstr(&f, "general.alignment");
    size_t v = k + 8 + 17 + 4;
    memcpy(c, f.buf, f.size);
    put32(c + v, 48);
    expect_error(c, f.size, "general.alignment", "48", NULL);
    put32(c + v, 0);
    expect_error(c, f.size, "general.alignment", NULL);
    memcpy(c, f.buf, f.size);
    put32(c + k + 8 + 17, GGUF_TYPE_INT32);
    expect_error(c, f.size, "general.alignment", "int32", NULL);
    free(c);
    free(f.buf);
}

static void test_bad_tensors(void **state)
{
    (void)state;
    file_t f = sample_file(32);
    uint8_t *c = malloc(f.size);
    size_t a = find_gstr(&f, "a.weight") + 8 + 8; /* n_dims of a.weight (2 dims) */
    size_t ta = a + 4 + 16;                       /* its type */
    size_t oa = ta + 4;                           /* its offset */
    size_t b = find_gstr(&f, "b.weight") + 8 + 8; /* b: 1 dim */
    size_t tb = b + 4 + 8, ob = tb + 4;
    /* n_dims */
    memcpy(c, f.buf, f.size);
    put32(c + a, 5);
    expect_error(c, f.size, "a.weight", "5 dimensions", NULL);
    put32(c + a, 0);
    expect_error(c, f.size, "a.weight", "0 dimensions", NULL);
    /* zero and overflowing dimensions */
    memcpy(c, f.buf, f.size);
    put64(c + a + 4 + 8, 0);
    expect_error(c, f.size, "a.weight", "zero", NULL);
    put64(c + a + 4 + 8, 1ull << 62);
    expect_error(c, f.size, "a.weight", "overflow", NULL);
    put64(c + a + 4 + 8, 1ull << 40);
    expect_error(c, f.size, "a.weight", "larger than the file", NULL);
    /* unknown and unsupported types */
    memcpy(c, f.buf, f.size);
    put32(c + ta, 99);
    expect_error(c, f.size, "a.weight", "type 99", NULL);
    put32(c + ta, 6); /* Q5_0: a GGUF type duet does not support */
    expect_error(c, f.size, "a.weight", "type 6", NULL);
    /* row length not a multiple of the block: b is q4_0 with 64 elements */
    memcpy(c, f.buf, f.size);
    put64(c + b + 4, 48);
    expect_error(c, f.size, "b.weight", "block", NULL);
    /* wrong size: q4_0 -> f32 makes it 256 bytes, running past c's data and the file */
    memcpy(c, f.buf, f.size);
    put32(c + tb, DTYPE_F32);
    put64(c + b + 4, 64 * 64);
    expect_error(c, f.size, "b.weight", NULL);
    /* offsets: misaligned, beyond the file, wrapping */
    memcpy(c, f.buf, f.size);
    put64(c + ob, 33);
    expect_error(c, f.size, "b.weight", "alignment", NULL);
    put64(c + ob, 1ull << 20);
    expect_error(c, f.size, "b.weight", "beyond the end", NULL);
    put64(c + oa, 0xffffffffffffffe0ull);
    expect_error(c, f.size, "a.weight", NULL);
    /* duplicate tensor names */
    memcpy(c, f.buf, f.size);
    c[find_gstr(&f, "b.weight") + 8] = 'a';
    expect_error(c, f.size, "duplicate", "a.weight", NULL);
    /* absurd name length */
    memcpy(c, f.buf, f.size);
    put64(c + find_gstr(&f, "c.weight"), 1ull << 60);
    expect_error(c, f.size, "tensor 2", NULL);
    free(c);
    free(f.buf);
}

/* Random damage in the header must never crash or read out of bounds. */
static void test_random_damage(void **state)
{
    (void)state;
    file_t f = sample_file(32);
    gguf_t *g = NULL;
    char err[512];
    assert_int_equal(gguf_open_mem(f.buf, f.size, "x", &g, err, sizeof err), 0);
    size_t hdr = gguf_data_offset(g);
    gguf_close(&g);
    uint64_t s = 12345;
    int ok = 0, bad = 0;
    uint8_t *c = malloc(f.size);
    for (int it = 0; it < 3000; it++) {
        memcpy(c, f.buf, f.size);
        int flips = 1 + it % 4;
        for (int k = 0; k < flips; k++) {
            s = s * 6364136223846793005ull + 1442695040888963407ull;
            size_t at = (size_t)(s >> 33) % hdr;
            uint8_t v = (uint8_t)(s >> 13);
            if (it % 3 == 0) v = (uint8_t)(v & 1 ? 0xff : 0x80);
            c[at] = v;
        }
        if (open_copy(c, f.size, &g, err, sizeof err) == 0) ok++;
        else {
            bad++;
            assert_true(strlen(err) > 10);
        }
    }
    assert_true(bad > 1000);
    (void)ok;
    free(c);
    free(f.buf);
}

/* ---- random models ------------------------------------------------------ */

static void test_mkmodel_types(void **state)
{
    (void)state;
    static const dtype_t types[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_Q8_0,
                                    DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q4_K, DTYPE_Q6_K};
    char dir[] = "/tmp/duet_test_mkmodel_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char path[128], err[512];
    int n_vocab = mkmodel_builtin_vocab_size();
    assert_true(n_vocab > 300);
    for (size_t k = 0; k < sizeof types / sizeof *types; k++) {
        mkmodel_opts o;
        mkmodel_defaults(&o);
        o.type = types[k];
        o.n_embd = 256;
        o.n_ff = 512;
        o.n_layer = 1;
        o.arch = k % 2 ? "qwen2" : "llama";
        o.tied = k % 3 == 0;
        snprintf(path, sizeof path, "%s/m%zu.gguf", dir, k);
        if (mkmodel_write(&o, path, err, sizeof err) != 0) fail_msg("%s: %s", dtype_name(types[k]), err);
        gguf_t *g;
        if (gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
        char key[64];
        uint32_t v;
        snprintf(key, sizeof key, "%s.embedding_length", o.arch);
        assert_int_equal(gguf_get_u32(g, key, &v), GGUF_OK);
        assert_int_equal(v, 256);
        snprintf(key, sizeof key, "%s.attention.head_count_kv", o.arch);
        assert_int_equal(gguf_get_u32(g, key, &v), GGUF_OK);
        assert_int_equal(v, 2);
        const gguf_tensor_t *t = gguf_find_tensor(g, "blk.0.ffn_down.weight");
        assert_non_null(t);
        assert_int_equal(t->type, types[k]);
        assert_int_equal(t->ne[0], 512);
        assert_int_equal(t->ne[1], 256);
        t = gguf_find_tensor(g, "token_embd.weight");
        assert_int_equal(t->ne[1], n_vocab);
        assert_int_equal(gguf_find_tensor(g, "blk.0.attn_norm.weight")->type, DTYPE_F32);
        assert_int_equal(gguf_find_tensor(g, "blk.0.attn_k.weight")->ne[1], 128);
        assert_true((gguf_find_tensor(g, "output.weight") == NULL) == o.tied);
        assert_true((gguf_find_tensor(g, "blk.0.attn_q.bias") != NULL) == (k % 2 == 1));
        /* weights dequantize to sane values: N(0, 1/16) roughly */
        t = gguf_find_tensor(g, "blk.0.attn_q.weight");
        float row[256];
        assert_int_equal(dtype_to_f32(t->type, t->data, row, 256), 0);
        double ss = 0;
        for (int i = 0; i < 256; i++) ss += row[i] * row[i];
        double sd = sqrt(ss / 256);
        assert_true(sd > 0.03 && sd < 0.12);
        gguf_close(&g);
        unlink(path);
    }
    /* deterministic for a seed, different for another */
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.type = DTYPE_Q8_0;
    char p1[160], p2[160], p3[160];
    snprintf(p1, sizeof p1, "%s/a.gguf", dir);
    snprintf(p2, sizeof p2, "%s/b.gguf", dir);
    snprintf(p3, sizeof p3, "%s/c.gguf", dir);
    assert_int_equal(mkmodel_write(&o, p1, err, sizeof err), 0);
    assert_int_equal(mkmodel_write(&o, p2, err, sizeof err), 0);
    o.seed = 2;
    assert_int_equal(mkmodel_write(&o, p3, err, sizeof err), 0);
    gguf_t *g1, *g2, *g3;
    assert_int_equal(gguf_open(p1, &g1, err, sizeof err), 0);
    assert_int_equal(gguf_open(p2, &g2, err, sizeof err), 0);
    assert_int_equal(gguf_open(p3, &g3, err, sizeof err), 0);
    assert_int_equal(gguf_file_size(g1), gguf_file_size(g2));
    assert_memory_equal(gguf_base(g1), gguf_base(g2), gguf_file_size(g1));
    assert_int_equal(gguf_file_size(g1), gguf_file_size(g3));
    assert_true(memcmp(gguf_base(g1), gguf_base(g3), gguf_file_size(g1)) != 0);
    gguf_close(&g1);
    gguf_close(&g2);
    gguf_close(&g3);
    /* bad options are errors, not crashes */
    mkmodel_defaults(&o);
    o.type = DTYPE_Q4_K; /* n_embd 64 is not a multiple of 256 */
    assert_int_equal(mkmodel_write(&o, p1, err, sizeof err), -1);
    assert_non_null(strstr(err, "block"));
    mkmodel_defaults(&o);
    o.arch = "gpt-j";
    assert_int_equal(mkmodel_write(&o, p1, err, sizeof err), -1);
    mkmodel_defaults(&o);
    o.vocab_from = "/nonexistent.gguf";
    assert_int_equal(mkmodel_write(&o, p1, err, sizeof err), -1);
    assert_non_null(strstr(err, "/nonexistent.gguf"));
    unlink(p1);
    unlink(p2);
    unlink(p3);
    rmdir(dir);
}

/* --vocab-from copies every tokenizer.* key of another file. */
static void test_mkmodel_vocab_from(void **state)
{
    (void)state;
    char dir[] = "/tmp/duet_test_mkmodel_XXXXXX";
    assert_non_null(mkdtemp(dir));
    char p1[160], p2[160], err[512];
    snprintf(p1, sizeof p1, "%s/src.gguf", dir);
    snprintf(p2, sizeof p2, "%s/dst.gguf", dir);
    mkmodel_opts o;
    mkmodel_defaults(&o);
    assert_int_equal(mkmodel_write(&o, p1, err, sizeof err), 0);
    o.vocab_from = p1;
    o.arch = "qwen2";
    assert_int_equal(mkmodel_write(&o, p2, err, sizeof err), 0);
    gguf_t *a, *b;
    assert_int_equal(gguf_open(p1, &a, err, sizeof err), 0);
    assert_int_equal(gguf_open(p2, &b, err, sizeof err), 0);
    int copied = 0;
    for (int64_t i = 0; i < gguf_n_kv(a); i++) {
        const char *k = gguf_kv_key(a, i);
        if (strncmp(k, "tokenizer.", 10) != 0) continue;
        int64_t j = gguf_find_key(b, k);
        assert_true(j >= 0);
        assert_int_equal(gguf_kv_type(a, i), gguf_kv_type(b, j));
        copied++;
    }
    assert_true(copied >= 10);
    int64_t ta = gguf_find_key(a, "tokenizer.ggml.merges"), tb = gguf_find_key(b, "tokenizer.ggml.merges");
    uint64_t na, nb;
    gguf_arr_info(a, ta, NULL, &na);
    gguf_arr_info(b, tb, NULL, &nb);
    assert_int_equal(na, nb);
    const char *sa, *sb;
    size_t la, lb;
    gguf_arr_get_str(a, ta, na - 1, &sa, &la);
    gguf_arr_get_str(b, tb, nb - 1, &sb, &lb);
    assert_int_equal(la, lb);
    assert_memory_equal(sa, sb, la);
    gguf_close(&a);
    gguf_close(&b);
    unlink(p1);
    unlink(p2);
    rmdir(dir);
}

/* The default model, when present: the reader sees what llama.cpp's converter wrote. */
static void test_default_model(void **state)
{
    (void)state;
    const char *path = "models/SmolLM2-135M-Instruct.Q4_1.gguf";
    if (access(path, R_OK) != 0) {
        printf("skip: %s is missing (run 'make model')\n", path);
        skip();
    }
    gguf_t *g;
    char err[512];
    if (gguf_open(path, &g, err, sizeof err) != 0) fail_msg("%s", err);
    char *arch = gguf_get_str_dup(g, "general.architecture");
    assert_string_equal(arch, "llama");
    free(arch);
    uint32_t v;
    assert_int_equal(gguf_get_u32(g, "llama.embedding_length", &v), GGUF_OK);
    assert_int_equal(v, 576);
    assert_int_equal(gguf_get_u32(g, "llama.block_count", &v), GGUF_OK);
    assert_int_equal(v, 30);
    int64_t tk = gguf_find_key(g, "tokenizer.ggml.tokens");
    uint64_t n;
    assert_int_equal(gguf_arr_info(g, tk, NULL, &n), GGUF_OK);
    assert_int_equal(n, 49152);
    const char *s;
    size_t len;
    assert_int_equal(gguf_arr_get_str(g, tk, 2, &s, &len), GGUF_OK);
    assert_int_equal(len, 10);
    assert_memory_equal(s, "<|im_end|>", 10);
    assert_int_equal(gguf_n_tensors(g), 272);
    const gguf_tensor_t *t = gguf_find_tensor(g, "blk.29.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->type, DTYPE_Q4_1);
    assert_int_equal(t->ne[0], 1536);
    assert_int_equal(t->ne[1], 576);
    gguf_close(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_file),
        cmocka_unit_test(test_roundtrip_mem_and_v2),
        cmocka_unit_test(test_empty_file_ok),
        cmocka_unit_test(test_truncated_everywhere),
        cmocka_unit_test(test_bad_header),
        cmocka_unit_test(test_bad_metadata),
        cmocka_unit_test(test_bad_alignment_key),
        cmocka_unit_test(test_bad_tensors),
        cmocka_unit_test(test_random_damage),
        cmocka_unit_test(test_mkmodel_types),
        cmocka_unit_test(test_mkmodel_vocab_from),
        cmocka_unit_test(test_default_model),
    };
    return cmocka_run_group_tests_name("gguf", tests, NULL, NULL);
}
