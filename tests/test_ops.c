/* tests/test_ops.c: ops_* against straightforward double-precision references, on
 * both code paths (the binary re-runs itself with DUET_NO_AVX2=1). */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#include "kernels/cpu.h"
#include "kernels/dtype.h"
#include "kernels/ops.h"

static uint64_t rng = 0x2545F4914F6CDD1Dull;
static float frand(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return (float)((rng >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static void assert_close(float got, double want, double rel, double abs_tol)
{
    double tol = abs_tol + rel * fabs(want);
    if (!(fabs(got - want) <= tol)) print_error("got %.9g want %.9g (tol %.3g)\n", got, want, tol);
    assert_true(fabs(got - want) <= tol);
}

static void test_rmsnorm(void **state)
{
    (void)state;
    int64_t sizes[] = {1, 7, 16, 576, 1001};
    for (size_t k = 0; k < sizeof sizes / sizeof *sizes; k++) {
        int64_t n = sizes[k];
        float *x = malloc(sizeof(float) * n), *w = malloc(sizeof(float) * n), *y = malloc(sizeof(float) * n);
        for (int64_t i = 0; i < n; i++) { x[i] = frand() * 3; w[i] = frand(); }
        double ss = 0;
        for (int64_t i = 0; i < n; i++) ss += (double)x[i] * x[i];
        double sc = 1.0 / sqrt(ss / n + 1e-6);
        ops_rmsnorm(y, x, w, n, 1e-6f);
        for (int64_t i = 0; i < n; i++) assert_close(y[i], x[i] * sc * w[i], 1e-5, 1e-6);
        ops_rmsnorm(y, x, NULL, n, 1e-6f);
        for (int64_t i = 0; i < n; i++) assert_close(y[i], x[i] * sc, 1e-5, 1e-6);
        ops_rmsnorm(x, x, w, n, 1e-6f); /* in place */
        for (int64_t i = 0; i < n; i++) assert_close(x[i], y[i] * w[i], 1e-5, 1e-6);
        free(x); free(w); free(y);
    }
}

static void test_swiglu(void **state)
{
    (void)state;
    const int64_t n = 203;
    float g[203], u[203], y[203];
    for (int64_t i = 0; i < n; i++) {
        g[i] = frand() * 12;
        u[i] = frand() * 2;
    }
    g[0] = 100.0f; g[1] = -100.0f; g[2] = 0.0f; g[3] = -87.5f; g[4] = 89.0f; g[5] = -1e-8f;
    ops_swiglu(y, g, u, n);
    for (int64_t i = 0; i < n; i++) {
        double s = g[i] / (1.0 + exp(-(double)g[i]));
        assert_close(y[i], s * u[i], 1e-5, 1e-30);
    }
    ops_swiglu(g, g, u, n); /* in place */
    assert_memory_equal(g, y, sizeof y);
}

static void test_softmax_add_scale(void **state)
{
    (void)state;
    float x[37], a[37], b[37], y[37];
    for (int i = 0; i < 37; i++) { x[i] = frand() * 20; a[i] = frand(); b[i] = frand(); }
    double mx = -INFINITY, sum = 0, ref[37];
    for (int i = 0; i < 37; i++) mx = fmax(mx, x[i]);
    for (int i = 0; i < 37; i++) sum += ref[i] = exp(x[i] - mx);
    ops_softmax(x, 37);
    double tot = 0;
    for (int i = 0; i < 37; i++) { assert_close(x[i], ref[i] / sum, 1e-5, 1e-12); tot += x[i]; }
    assert_close((float)tot, 1.0, 1e-5, 0);
    ops_add(y, a, b, 37);
    for (int i = 0; i < 37; i++) assert_float_equal(y[i], a[i] + b[i], 0);
    ops_scale(y, a, 0.5f, 37);
    for (int i = 0; i < 37; i++) assert_float_equal(y[i], a[i] * 0.5f, 0);
}

/* Masked (-inf) entries, as attention pads a row to a multiple of 16, come out exactly 0
 * and leave the others as they are without the padding (up to the 16-chunk boundary). */
static void test_softmax_masked(void **state)
{
    (void)state;
    float x[48], y[48];
    for (int i = 0; i < 48; i++) x[i] = frand() * 10;
    for (int i = 0; i < 48; i++) y[i] = i < 37 ? x[i] : -INFINITY;
    ops_softmax(y, 48);
    double tot = 0;
    for (int i = 0; i < 48; i++) tot += y[i];
    for (int i = 37; i < 48; i++) assert_true(y[i] == 0.0f);
    assert_close((float)tot, 1.0, 1e-6, 0);
    float big[4] = {1e30f, -1e30f, 0.0f, 88.0f};
    ops_softmax(big, 4);
    assert_true(big[0] == 1.0f && big[1] == 0.0f && big[2] == 0.0f && big[3] == 0.0f);
}

/* Naive RoPE in double. */
static void rope_ref(double *x, int n_head, int head_dim, int pos, const ops_rope_params *p)
{
    for (int h = 0; h < n_head; h++) {
        double *v = x + h * head_dim;
        for (int i = 0; i < p->n_dims / 2; i++) {
            double th = pos * p->freq_scale * pow(p->freq_base, -2.0 * i / p->n_dims);
            if (p->freq_factors) th /= p->freq_factors[i];
            int ia = p->mode == OPS_ROPE_NEOX ? i : 2 * i, ib = p->mode == OPS_ROPE_NEOX ? i + p->n_dims / 2 : 2 * i + 1;
            double a = v[ia], b = v[ib];
            v[ia] = a * cos(th) - b * sin(th);
            v[ib] = a * sin(th) + b * cos(th);
        }
    }
}

static void test_rope(void **state)
{
    (void)state;
    enum { H = 3, D = 64 };
    float ff[32];
    for (int i = 0; i < 32; i++) ff[i] = 1.0f + (float)i * 0.25f;
    ops_rope_params ps[] = {
        {.n_dims = 64, .freq_base = 10000.0f, .freq_scale = 1.0f, .mode = OPS_ROPE_NORMAL},
        {.n_dims = 64, .freq_base = 1000000.0f, .freq_scale = 1.0f, .mode = OPS_ROPE_NEOX},
        {.n_dims = 32, .freq_base = 500000.0f, .freq_scale = 0.25f, .freq_factors = ff, .mode = OPS_ROPE_NORMAL},
        {.n_dims = 48, .freq_base = 10000.0f, .freq_scale = 0.5f, .freq_factors = ff, .mode = OPS_ROPE_NEOX},
    };
    int positions[] = {0, 1, 17, 4095, 100000};
    for (size_t k = 0; k < sizeof ps / sizeof *ps; k++)
        for (size_t pi = 0; pi < sizeof positions / sizeof *positions; pi++) {
            int pos = positions[pi];
            float x[H * D], x2[H * D], cs[D];
            double r[H * D];
            for (int i = 0; i < H * D; i++) r[i] = x[i] = x2[i] = frand();
            rope_ref(r, H, D, pos, &ps[k]);
            ops_rope(x, H, D, pos, &ps[k]);
            ops_rope_cache(cs, pos, &ps[k]);
            ops_rope_apply(x2, H, D, cs, ps[k].n_dims, ps[k].mode);
            for (int i = 0; i < H * D; i++) {
                /* the angles follow llama.cpp's float recurrence theta_i = theta_(i-1) * base^(-2/n)
                 * (so duet's rotations match its bits): each step rounds, so the angle error grows
                 * with the position, about pos * 2^-24 per rotated pair: bound it by 1e-7 * pos */
                const double tol = 1e-5 + 1e-7 * pos;
                assert_close(x[i], r[i], 0, tol);
                assert_close(x2[i], r[i], 0, tol);
            }
        }
}

static void test_embed(void **state)
{
    (void)state;
    enum { V = 10, E = 64 };
    float tab[V * E];
    for (int i = 0; i < V * E; i++) tab[i] = frand();
    uint8_t q[V * 40];
    for (int v = 0; v < V; v++) dtype_from_f32(DTYPE_Q4_1, tab + v * E, q + v * dtype_row_bytes(DTYPE_Q4_1, E), E);
    int32_t ids[3] = {9, 0, 4};
    float y[3 * E], want[E];
    assert_int_equal(ops_embed(y, DTYPE_Q4_1, q, V, E, ids, 3), 0);
    for (int t = 0; t < 3; t++) {
        dtype_to_f32(DTYPE_Q4_1, q + ids[t] * dtype_row_bytes(DTYPE_Q4_1, E), want, E);
        assert_memory_equal(y + t * E, want, sizeof want);
    }
    assert_int_equal(ops_embed(y, DTYPE_F32, tab, V, E, ids, 3), 0);
    assert_memory_equal(y, tab + 9 * E, E * sizeof(float));
    int32_t bad[2] = {1, V};
    assert_int_equal(ops_embed(y, DTYPE_F32, tab, V, E, bad, 2), -1);
    bad[1] = -1;
    assert_int_equal(ops_embed(y, DTYPE_F32, tab, V, E, bad, 2), -1);
    assert_int_equal(ops_embed(y, DTYPE_Q4_K, q, V, E, ids, 1), -1); /* 64 is not a multiple of 256 */
}

int main(int argc, char **argv)
{
    (void)argc;
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rmsnorm), cmocka_unit_test(test_swiglu), cmocka_unit_test(test_softmax_add_scale),
        cmocka_unit_test(test_softmax_masked),
        cmocka_unit_test(test_rope),    cmocka_unit_test(test_embed),
    };
    fprintf(stderr, "test_ops: %s path\n", cpu_path_name());
    int rc = cmocka_run_group_tests_name(cpu_use_avx2() ? "ops_avx2" : "ops_portable", tests, NULL, NULL);
    if (cpu_use_avx2()) {
        fflush(stdout);
        fflush(stderr);
        pid_t pid = fork();
        if (pid == 0) {
            setenv("DUET_NO_AVX2", "1", 1);
            execv("/proc/self/exe", argv);
            _exit(127);
        }
        int st = 0;
        if (pid < 0 || waitpid(pid, &st, 0) < 0 || !WIFEXITED(st) || WEXITSTATUS(st) != 0) rc = rc ? rc : 1;
    }
    return rc;
}
