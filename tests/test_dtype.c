/* tests/test_dtype.c: the type table, GGUF block layouts and round-trip error bounds.
 *
 * Layout: fixed Q4_K and Q6_K blocks (bytes from a small LCG) whose expected values
 * were computed with the gguf Python package's dequantizer (an independent reader of
 * the same format); hand-made Q4_0/Q4_1/Q8_0 blocks. Round trip: relative RMS error of
 * dequant(quant(x)) on random data, per type, against a stated bound.
 */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

#include "kernels/dtype.h"
#include "kernels/quant.h"

static uint64_t rng = 88172645463325252ull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static void test_table(void **state)
{
    (void)state;
    struct { dtype_t t; const char *name; size_t elems, bytes; } want[] = {
        {DTYPE_F32, "f32", 1, 4},       {DTYPE_F16, "f16", 1, 2},       {DTYPE_BF16, "bf16", 1, 2},
        {DTYPE_I8, "i8", 1, 1},         {DTYPE_Q4_0, "q4_0", 32, 18},   {DTYPE_Q4_1, "q4_1", 32, 20},
        {DTYPE_Q8_0, "q8_0", 32, 34},   {DTYPE_Q8_1, "q8_1", 32, 36},   {DTYPE_Q4_K, "q4_k", 256, 144},
        {DTYPE_Q6_K, "q6_k", 256, 210}, {DTYPE_Q8_K, "q8_k", 256, 292},
    };
    for (size_t i = 0; i < sizeof want / sizeof *want; i++) {
        assert_true(dtype_supported((uint32_t)want[i].t));
        assert_string_equal(dtype_name(want[i].t), want[i].name);
        assert_int_equal(dtype_block_elems(want[i].t), want[i].elems);
        assert_int_equal(dtype_block_bytes(want[i].t), want[i].bytes);
        assert_int_equal(dtype_row_bytes(want[i].t, (int64_t)want[i].elems * 3), want[i].bytes * 3);
        if (want[i].elems > 1) assert_int_equal(dtype_row_bytes(want[i].t, (int64_t)want[i].elems + 1), 0);
    }
    assert_false(dtype_supported(4));   /* Q4_2, removed from GGUF */
    assert_false(dtype_supported(13));  /* Q5_K: not supported here */
    assert_false(dtype_supported(1000));
    assert_string_equal(dtype_name((dtype_t)13), "unknown");
    assert_int_equal(dtype_row_bytes((dtype_t)13, 256), 0);
    float x[32] = {0};
    uint8_t buf[64];
    assert_int_equal(dtype_from_f32((dtype_t)13, x, buf, 32), -1);
    assert_int_equal(dtype_to_f32(DTYPE_Q4_0, buf, x, 31), -1);
    assert_int_equal(dtype_from_f32(DTYPE_Q4_K, x, buf, 32), -1);
}

static void lcg_bytes(uint8_t *b, size_t n, uint32_t seed)
{
    for (size_t i = 0; i < n; i++) {
        seed = (seed * 1103515245u + 12345u) & 0x7fffffffu;
        b[i] = (uint8_t)((seed >> 16) & 0xff);
    }
}

static const int idx16[16] = {0, 1, 31, 32, 63, 64, 100, 127, 128, 150, 191, 192, 200, 223, 224, 255};

static void test_layout_k(void **state)
{
    (void)state;
    /* expected values from gguf-py's dequantize() on the same bytes */
    static const float q4k[16] = {18.3125f, 11.1875f, -3.0625f, 25.6875f, 53.4375f, 41.6875f,
                                  27.5625f, 50.5625f, 4.5625f,  9.8125f,  0.6875f,  14.0f,
                                  15.625f,  12.375f,  3.5f,     0.25f};
    static const double q6k[16] = {13.422866821289062,  -9.7620849609375,   -5.7012176513671875,
                                   -15.303268432617188, -2.520538330078125, -9.68206787109375,
                                   -6.16131591796875,   -3.12066650390625,  -3.44073486328125,
                                   -5.671211242675781,  -24.445220947265625, -2.3505020141601562,
                                   5.171104431152344,   11.44244384765625,  -10.102157592773438,
                                   -38.088134765625};
    uint8_t b[210];
    float y[256];
    lcg_bytes(b, 144, 7);
    uint16_t h = fp16_from_f32(0.125f);
    memcpy(b, &h, 2);
    h = fp16_from_f32(0.0625f);
    memcpy(b + 2, &h, 2);
    assert_int_equal(dtype_to_f32(DTYPE_Q4_K, b, y, 256), 0);
    for (int i = 0; i < 16; i++) assert_float_equal(y[idx16[i]], q4k[i], 1e-6);
    lcg_bytes(b, 210, 11);
    h = fp16_from_f32(0.01f);
    memcpy(b + 208, &h, 2);
    assert_int_equal(dtype_to_f32(DTYPE_Q6_K, b, y, 256), 0);
    for (int i = 0; i < 16; i++) assert_float_equal(y[idx16[i]], (float)q6k[i], 1e-4);
}

static void test_layout_32(void **state)
{
    (void)state;
    float y[32];
    blk_q4_0 a = {.d = fp16_from_f32(0.5f)};
    for (int j = 0; j < 16; j++) a.qs[j] = (uint8_t)(j | ((15 - j) << 4));
    dtype_to_f32(DTYPE_Q4_0, &a, y, 32);
    for (int j = 0; j < 16; j++) {
        assert_float_equal(y[j], 0.5f * (j - 8), 0);
        assert_float_equal(y[j + 16], 0.5f * (7 - j), 0);
    }
    blk_q4_1 b = {.d = fp16_from_f32(0.25f), .m = fp16_from_f32(-1.0f)};
    for (int j = 0; j < 16; j++) b.qs[j] = (uint8_t)(j | ((15 - j) << 4));
    dtype_to_f32(DTYPE_Q4_1, &b, y, 32);
    for (int j = 0; j < 16; j++) {
        assert_float_equal(y[j], 0.25f * j - 1.0f, 0);
        assert_float_equal(y[j + 16], 0.25f * (15 - j) - 1.0f, 0);
    }
    /* Q8_1 keeps s = d * sum(q); Q8_K keeps the sums of 16 */
    float x[256];
    for (int i = 0; i < 256; i++) x[i] = frand();
    blk_q8_1 c;
    dtype_from_f32(DTYPE_Q8_1, x, &c, 32);
    int sum = 0;
    for (int j = 0; j < 32; j++) sum += c.qs[j];
    assert_float_equal(fp16_to_f32(c.s), fp16_to_f32(c.d) * sum, fabsf(fp16_to_f32(c.s)) * 1e-3f + 1e-4f);
    blk_q8_k k;
    dtype_from_f32(DTYPE_Q8_K, x, &k, 256);
    for (int g = 0; g < 16; g++) {
        int s = 0;
        for (int j = 0; j < 16; j++) s += k.qs[16 * g + j];
        assert_int_equal(k.bsums[g], s);
    }
    /* Q4_K scale packing: every 6-bit scale/min survives */
    blk_q4_k q;
    memset(&q, 0, sizeof q);
    for (int i = 0; i < 256; i++) x[i] = (float)(i / 32 + 1) * (i % 2 ? 1.0f : -0.5f);
    dtype_from_f32(DTYPE_Q4_K, x, &q, 256);
    assert_int_equal(dtype_to_f32(DTYPE_Q4_K, &q, y, 32), -1); /* n must be a multiple of 256 */
    float yy[256];
    assert_int_equal(dtype_to_f32(DTYPE_Q4_K, &q, yy, 256), 0);
    for (int i = 0; i < 256; i++) assert_float_equal(yy[i], x[i], 0.25f);
}

static void test_f16_bf16(void **state)
{
    (void)state;
    uint16_t h[6] = {0x0001, 0x03ff, 0x3c00, 0x7bff, 0x7c00, 0xfc00};
    float y[6];
    dtype_to_f32(DTYPE_F16, h, y, 6);
    assert_float_equal(y[0], ldexpf(1.0f, -24), 0);
    assert_float_equal(y[1], 1023.0f * ldexpf(1.0f, -24), 0);
    assert_float_equal(y[2], 1.0f, 0);
    assert_float_equal(y[3], 65504.0f, 0);
    assert_true(isinf(y[4]) && y[4] > 0);
    assert_true(isinf(y[5]) && y[5] < 0);
    uint16_t back[6];
    dtype_from_f32(DTYPE_F16, y, back, 6);
    assert_memory_equal(back, h, sizeof h);
    float big = 1e6f;
    dtype_from_f32(DTYPE_F16, &big, back, 1);
    assert_int_equal(back[0], 0x7c00);
    float bv[2] = {1.0f, -3.5f};
    uint16_t bb[2];
    dtype_from_f32(DTYPE_BF16, bv, bb, 2);
    assert_int_equal(bb[0], 0x3f80);
    assert_int_equal(bb[1], 0xc060);
    int8_t i8[4];
    float iv[4] = {1.4f, -2.6f, 300.0f, -300.0f}, io[4];
    dtype_from_f32(DTYPE_I8, iv, i8, 4);
    dtype_to_f32(DTYPE_I8, i8, io, 4);
    assert_float_equal(io[0], 1.0f, 0);
    assert_float_equal(io[1], -3.0f, 0);
    assert_float_equal(io[2], 127.0f, 0);
    assert_float_equal(io[3], -128.0f, 0);
}

/* Relative RMS round-trip error on data with a few outliers; bound per type. */
static void test_round_trip(void **state)
{
    (void)state;
    struct { dtype_t t; double bound; } cases[] = {
        {DTYPE_F32, 0.0},   {DTYPE_F16, 5e-4}, {DTYPE_BF16, 4e-3}, {DTYPE_Q8_0, 0.01},
        {DTYPE_Q8_1, 0.01}, {DTYPE_Q8_K, 0.01}, {DTYPE_Q6_K, 0.03}, {DTYPE_Q4_K, 0.11},
        {DTYPE_Q4_0, 0.13}, {DTYPE_Q4_1, 0.12},
    };
    const int64_t n = 4096;
    float *x = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n);
    uint8_t *q = malloc((size_t)n * 4);
    for (int64_t i = 0; i < n; i++) x[i] = frand() * (i % 7 == 0 ? 4.0f : 1.0f) * (1.0f + (float)(i / 256) * 0.1f);
    for (size_t c = 0; c < sizeof cases / sizeof *cases; c++) {
        assert_int_equal(dtype_from_f32(cases[c].t, x, q, n), 0);
        assert_int_equal(dtype_to_f32(cases[c].t, q, y, n), 0);
        double e = 0, s = 0;
        for (int64_t i = 0; i < n; i++) {
            e += (double)(x[i] - y[i]) * (x[i] - y[i]);
            s += (double)x[i] * x[i];
        }
        double rel = sqrt(e / s);
        if (rel > cases[c].bound) print_error("%s: relative RMS error %.4g > %.4g\n", dtype_name(cases[c].t), rel, cases[c].bound);
        assert_true(rel <= cases[c].bound);
    }
    /* all-zero and constant blocks quantize exactly */
    dtype_t ts[] = {DTYPE_Q4_0, DTYPE_Q4_1, DTYPE_Q8_0, DTYPE_Q4_K, DTYPE_Q6_K, DTYPE_Q8_K};
    for (size_t c = 0; c < sizeof ts / sizeof *ts; c++) {
        memset(x, 0, sizeof(float) * 256);
        dtype_from_f32(ts[c], x, q, 256);
        dtype_to_f32(ts[c], q, y, 256);
        for (int i = 0; i < 256; i++) assert_float_equal(y[i], 0.0f, 0);
    }
    free(x);
    free(y);
    free(q);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_table),    cmocka_unit_test(test_layout_k), cmocka_unit_test(test_layout_32),
        cmocka_unit_test(test_f16_bf16), cmocka_unit_test(test_round_trip),
    };
    return cmocka_run_group_tests_name("dtype", tests, NULL, NULL);
}
