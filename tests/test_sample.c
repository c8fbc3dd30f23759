/* tests/test_sample.c: sampling filters, distributions, seeds, greedy ties, stop strings. */
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "kernels/sample.h"

/* Chi-square critical values at p = 0.001 by degrees of freedom (index = df). With a
 * fixed seed the statistic is deterministic; this bound only says how far a correct
 * sampler may stray. */
static const double CHI2_CRIT_001[] = {0, 10.83, 13.82, 16.27, 18.47, 20.52, 22.46, 24.32,
                                       26.12, 27.88, 29.59};

static sample_params params(float temp, int top_k, float top_p, float min_p, uint64_t seed)
{
    sample_params p = {
        .temperature = temp, .top_k = top_k, .top_p = top_p, .min_p = min_p,
        .repeat_penalty = 1.0f, .repeat_last_n = 0, .seed = seed,
    };
    return p;
}

static sampler_t *make(const sample_params *p, int n_vocab)
{
    sampler_t *s = NULL;
    assert_int_equal(sampler_new(p, n_vocab, &s), 0);
    assert_non_null(s);
    return s;
}

/* Logits whose softmax is exactly probs[n] (up to float rounding). */
static void logits_from_probs(const double *probs, int n, float *logits)
{
    for (int i = 0; i < n; i++) logits[i] = probs[i] > 0 ? (float)log(probs[i]) : -INFINITY;
}

/* Draws `draws` tokens and checks them against the expected probabilities want[n]
 * (zero entries must never appear) with a chi-square test over the nonzero ones. */
static void check_distribution(sampler_t *s, const float *logits, int n, const double *want,
                               int draws)
{
    int *count = calloc((size_t)n, sizeof *count);
    assert_non_null(count);
    for (int d = 0; d < draws; d++) {
        int t = sampler_sample(s, logits, NULL, 0);
        assert_true(t >= 0 && t < n);
        count[t]++;
    }
    double chi2 = 0.0;
    int df = -1;
    for (int i = 0; i < n; i++) {
        if (want[i] == 0.0) {
            if (count[i] != 0) fail_msg("token %d has probability 0 but came %d times", i, count[i]);
            continue;
        }
        double e = want[i] * draws;
        chi2 += (count[i] - e) * (count[i] - e) / e;
        df++;
    }
    assert_true(df >= 0 && df <= 10);
    if (df > 0 && chi2 > CHI2_CRIT_001[df])
        fail_msg("chi-square %.2f exceeds %.2f (df %d)", chi2, CHI2_CRIT_001[df], df);
    free(count);
}

/* ---- PRNG and parameters -------------------------------------------------------- */

static void test_rng(void **state)
{
    (void)state;
    sample_rng a, b, c;
    sample_rng_seed(&a, 42);
    sample_rng_seed(&b, 42);
    sample_rng_seed(&c, 43);
    int differ = 0;
    for (int i = 0; i < 1000; i++) {
        uint64_t x = sample_rng_next(&a), y = sample_rng_next(&b), z = sample_rng_next(&c);
        assert_true(x == y);
        differ += x != z;
    }
    assert_true(differ > 990);
    /* uniform in [0, 1), mean near 1/2, seed 0 is fine */
    sample_rng_seed(&a, 0);
    double sum = 0;
    for (int i = 0; i < 100000; i++) {
        double u = sample_rng_uniform(&a);
        assert_true(u >= 0.0 && u < 1.0);
        sum += u;
    }
    assert_true(fabs(sum / 100000 - 0.5) < 0.005);
}

static void test_params_check(void **state)
{
    (void)state;
    char err[128];
    sample_params p = sample_params_default();
    assert_int_equal(sample_params_check(&p, err, sizeof err), 0);
    p.repeat_penalty = 0.0f;
    assert_int_equal(sample_params_check(&p, err, sizeof err), -1);
    assert_non_null(strstr(err, "repeat_penalty"));
    p = sample_params_default();
    p.temperature = NAN;
    assert_int_equal(sample_params_check(&p, err, sizeof err), -1);
    assert_non_null(strstr(err, "temperature"));
    p = sample_params_default();
    p.repeat_last_n = -2;
    assert_int_equal(sample_params_check(&p, NULL, 0), -1);
    assert_int_equal(sample_params_check(NULL, err, sizeof err), -1);

    sampler_t *s = (sampler_t *)&p; /* must be overwritten with NULL on failure */
    assert_int_equal(sampler_new(&p, 10, &s), -1);
    assert_null(s);
    p = sample_params_default();
    assert_int_equal(sampler_new(&p, 0, &s), -1);
    assert_null(s);
    assert_int_equal(sampler_new(&p, 10, NULL), -1);
    assert_int_equal(sampler_new(&p, 10, &s), 0);
    /* reset with bad params leaves the sampler unchanged */
    sample_params bad = p;
    bad.top_p = NAN;
    assert_int_equal(sampler_reset(s, &bad), -1);
    assert_true(sampler_params(s)->top_p == p.top_p);
    assert_int_equal(sampler_sample(s, NULL, NULL, 0), -1);
    sampler_destroy(&s);
    assert_null(s);
    sampler_destroy(&s); /* twice is fine */
    sampler_destroy(NULL);
}

/* ---- greedy --------------------------------------------------------------------- */

static void test_greedy(void **state)
{
    (void)state;
    sample_params p = params(0.0f, 0, 1.0f, 0.0f, 7);
    sampler_t *s = make(&p, 6);
    float l[6] = {1.0f, 3.0f, -2.0f, 3.0f, 2.9f, 0.0f};
    assert_int_equal(sampler_sample(s, l, NULL, 0), 1); /* tie 1 vs 3: lowest id */
    l[3] = 3.0001f;
    assert_int_equal(sampler_sample(s, l, NULL, 0), 3);
    /* NaN counts as -inf; -inf everywhere gives -1 */
    float m[6] = {NAN, -INFINITY, -5.0f, NAN, -INFINITY, -6.0f};
    assert_int_equal(sampler_sample(s, m, NULL, 0), 2);
    for (int i = 0; i < 6; i++) m[i] = i % 2 ? -INFINITY : NAN;
    assert_int_equal(sampler_sample(s, m, NULL, 0), -1);
    /* negative temperature is greedy too; greedy draws nothing from the PRNG */
    sample_rng before = *sampler_rng(s);
    p.temperature = -1.0f;
    assert_int_equal(sampler_reset(s, &p), 0);
    before = *sampler_rng(s);
    for (int i = 0; i < 10; i++) assert_int_equal(sampler_sample(s, l, NULL, 0), 3);
    assert_memory_equal(&before, sampler_rng(s), sizeof before);
    sampler_destroy(&s);

    /* all equal: the first id */
    p.temperature = 0.0f;
    s = make(&p, 1000);
    float *flat = calloc(1000, sizeof *flat);
    assert_non_null(flat);
    assert_int_equal(sampler_sample(s, flat, NULL, 0), 0);
    free(flat);
    sampler_destroy(&s);
}

/* ---- repetition penalty ----------------------------------------------------------- */

static void test_repeat_penalty(void **state)
{
    (void)state;
    sample_params p = params(0.0f, 0, 1.0f, 0.0f, 1);
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 3;
    sampler_t *s = make(&p, 4);
    /* positive logits are divided, negative multiplied */
    float l[4] = {4.0f, 3.0f, -1.0f, -1.5f};
    int32_t h1[] = {0};
    assert_int_equal(sampler_sample(s, l, h1, 1), 1);          /* 4/2 = 2 < 3 */
    int32_t h2[] = {0, 1};
    assert_int_equal(sampler_sample(s, l, h2, 2), 0);          /* 2 vs 1.5 */
    /* a token repeated many times is penalized once: 0 -> 2, 1 -> 1.5 */
    int32_t h3[] = {1, 0, 0};
    assert_int_equal(sampler_sample(s, l, h3, 3), 0);
    /* only the last 3 tokens count: 0 is out of the window */
    int32_t h4[] = {0, 1, 1, 1};
    assert_int_equal(sampler_sample(s, l, h4, 4), 0);
    /* negative: -1 * 2 = -2 < -1.5 */
    float neg[4] = {-1.0f, -1.5f, -9.0f, -9.0f};
    int32_t h5[] = {0};
    assert_int_equal(sampler_sample(s, neg, h5, 1), 1);
    /* ids out of range are ignored; repeat_last_n = -1 looks at everything */
    int32_t h6[] = {0, -3, 99, 7};
    p.repeat_last_n = -1;
    assert_int_equal(sampler_reset(s, &p), 0);
    assert_int_equal(sampler_sample(s, l, h6, 4), 1);
    /* repeat_last_n = 0 and penalty 1 are off */
    p.repeat_last_n = 0;
    assert_int_equal(sampler_reset(s, &p), 0);
    assert_int_equal(sampler_sample(s, l, h6, 4), 0);
    p.repeat_last_n = 64;
    p.repeat_penalty = 1.0f;
    assert_int_equal(sampler_reset(s, &p), 0);
    assert_int_equal(sampler_sample(s, l, h6, 4), 0);
    /* logits are not modified */
    assert_true(l[0] == 4.0f && l[1] == 3.0f);
    sampler_destroy(&s);

    /* nothing of one call's history sticks to the next, on every path: greedy, top-k by
     * heap, all candidates (min-p 1 keeps the best alone) */
    const sample_params paths[] = {params(0.0f, 0, 1.0f, 0.0f, 1), params(1.0f, 1, 1.0f, 0.0f, 1),
                                   params(1.0f, 0, 1.0f, 1.0f, 1)};
    for (size_t k = 0; k < sizeof paths / sizeof paths[0]; k++) {
        p = paths[k];
        p.repeat_penalty = 2.0f;
        p.repeat_last_n = 8;
        s = make(&p, 4);
        float m[4] = {4.0f, 3.0f, 2.5f, -1.0f};
        int32_t only0[] = {0, 0}, only1[] = {1};
        assert_int_equal(sampler_sample(s, m, only0, 2), 1); /* 2 vs 3 vs 2.5 */
        assert_int_equal(sampler_sample(s, m, only1, 1), 0); /* 0 is not penalized now */
        assert_int_equal(sampler_sample(s, m, NULL, 0), 0);
        sampler_destroy(&s);
    }

    /* with sampling: penalized probabilities. logits ln(.5), ln(.25), ln(.25); penalty
     * on token 0 multiplies its (negative) logit by 2: weight .25 -> p = 1/3 each. */
    double probs[3] = {0.5, 0.25, 0.25};
    float lg[3];
    logits_from_probs(probs, 3, lg);
    p = params(1.0f, 0, 1.0f, 0.0f, 11);
    p.repeat_penalty = 2.0f;
    p.repeat_last_n = 8;
    s = make(&p, 3);
    int32_t h[] = {0, 0};
    int count[3] = {0};
    for (int i = 0; i < 30000; i++) count[sampler_sample(s, lg, h, 2)]++;
    for (int i = 0; i < 3; i++) assert_true(abs(count[i] - 10000) < 450);
    sampler_destroy(&s);
}

/* ---- filters on a known small distribution ------------------------------------------ */

static const double P6[6] = {0.40, 0.25, 0.15, 0.10, 0.06, 0.04};

static void test_temperature_one(void **state)
{
    (void)state;
    float l[6];
    logits_from_probs(P6, 6, l);
    sample_params p = params(1.0f, 0, 1.0f, 0.0f, 1234);
    sampler_t *s = make(&p, 6);
    check_distribution(s, l, 6, P6, 40000);
    sampler_destroy(&s);
}

static void test_temperature_scaling(void **state)
{
    (void)state;
    float l[6];
    logits_from_probs(P6, 6, l);
    double want[6], z = 0;
    /* T = 0.5 squares the probabilities; T = 2 takes their square roots */
    for (int i = 0; i < 6; i++) z += want[i] = P6[i] * P6[i];
    for (int i = 0; i < 6; i++) want[i] /= z;
    sample_params p = params(0.5f, 0, 1.0f, 0.0f, 99);
    sampler_t *s = make(&p, 6);
    check_distribution(s, l, 6, want, 40000);
    z = 0;
    for (int i = 0; i < 6; i++) z += want[i] = sqrt(P6[i]);
    for (int i = 0; i < 6; i++) want[i] /= z;
    p.temperature = 2.0f;
    assert_int_equal(sampler_reset(s, &p), 0);
    check_distribution(s, l, 6, want, 40000);
    sampler_destroy(&s);
}

static void test_top_k(void **state)
{
    (void)state;
    float l[6];
    /* shuffled order so the selection has work to do */
    const int perm[6] = {4, 0, 5, 2, 1, 3};
    double pp[6];
    for (int i = 0; i < 6; i++) pp[perm[i]] = P6[i];
    logits_from_probs(pp, 6, l);
    double want[6] = {0};
    double z = P6[0] + P6[1] + P6[2];
    for (int i = 0; i < 3; i++) want[perm[i]] = P6[i] / z;
    sample_params p = params(1.0f, 3, 1.0f, 0.0f, 5);
    sampler_t *s = make(&p, 6);
    check_distribution(s, l, 6, want, 30000);
    /* top_k = 1 is greedy */
    p.top_k = 1;
    assert_int_equal(sampler_reset(s, &p), 0);
    for (int i = 0; i < 100; i++) assert_int_equal(sampler_sample(s, l, NULL, 0), perm[0]);
    /* top_k >= n_vocab is off */
    p.top_k = 6;
    assert_int_equal(sampler_reset(s, &p), 0);
    check_distribution(s, l, 6, pp, 30000);
    sampler_destroy(&s);
}

static void test_top_p(void **state)
{
    (void)state;
    float l[6];
    logits_from_probs(P6, 6, l);
    /* cumulative: .40 .65 .80 .90 .96 1.0 */
    struct { float top_p; int keep; } cases[] = {
        {0.39f, 1}, {0.41f, 2}, {0.64f, 2}, {0.66f, 3}, {0.79f, 3}, {0.81f, 4}, {0.95f, 5},
        {0.0f, 1},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        sample_params p = params(1.0f, 0, cases[c].top_p, 0.0f, 77 + c);
        sampler_t *s = make(&p, 6);
        double want[6] = {0}, z = 0;
        for (int i = 0; i < cases[c].keep; i++) z += P6[i];
        for (int i = 0; i < cases[c].keep; i++) want[i] = P6[i] / z;
        check_distribution(s, l, 6, want, 20000);
        sampler_destroy(&s);
    }
    /* top-p measures mass within the top-k set: top_k 3 gives .40/.80 = .5, .65/.8 = .81 */
    sample_params p = params(1.0f, 3, 0.8f, 0.0f, 3);
    sampler_t *s = make(&p, 6);
    double want[6] = {0.40 / 0.65, 0.25 / 0.65, 0, 0, 0, 0};
    check_distribution(s, l, 6, want, 20000);
    sampler_destroy(&s);
}

static void test_min_p(void **state)
{
    (void)state;
    float l[6];
    logits_from_probs(P6, 6, l);
    /* p_i >= min_p * 0.40: min_p .26 keeps .40 .25 .15 (>= .104); .5 keeps .40 .25 */
    struct { float min_p; int keep; } cases[] = {{0.26f, 3}, {0.5f, 2}, {0.7f, 1}, {0.09f, 6},
                                                {1.5f, 1}};
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        sample_params p = params(1.0f, 0, 1.0f, cases[c].min_p, 500 + c);
        sampler_t *s = make(&p, 6);
        double want[6] = {0}, z = 0;
        for (int i = 0; i < cases[c].keep; i++) z += P6[i];
        for (int i = 0; i < cases[c].keep; i++) want[i] = P6[i] / z;
        check_distribution(s, l, 6, want, 20000);
        sampler_destroy(&s);
    }
    /* min-p and top-p together: the shorter prefix wins (top-p .41 -> 2, min-p .26 -> 3) */
    sample_params p = params(1.0f, 0, 0.41f, 0.26f, 8);
    sampler_t *s = make(&p, 6);
    double want[6] = {0.40 / 0.65, 0.25 / 0.65, 0, 0, 0, 0};
    check_distribution(s, l, 6, want, 20000);
    sampler_destroy(&s);
    /* temperature does not change which tokens min-p keeps (it runs last) */
    p = params(0.25f, 0, 1.0f, 0.26f, 9);
    s = make(&p, 6);
    double w2[6] = {0}, z = 0;
    for (int i = 0; i < 3; i++) z += w2[i] = pow(P6[i], 4);
    for (int i = 0; i < 3; i++) w2[i] /= z;
    check_distribution(s, l, 6, w2, 20000);
    sampler_destroy(&s);
}

/* ---- large vocabularies: the partial selection against a full sort ------------------ */

typedef struct {
    float logit;
    int id;
} ref_cand;

static int ref_cmp(const void *a, const void *b)
{
    const ref_cand *x = a, *y = b;
    if (x->logit != y->logit) return x->logit > y->logit ? -1 : 1;
    return x->id - y->id;
}

/* The set of tokens a top-k/top-p/min-p sampler may return, by brute force: keep[] 0/1. */
static int ref_keep(const float *l, int n, int top_k, float top_p, float min_p, char *keep)
{
    ref_cand *c = malloc((size_t)n * sizeof *c);
    assert_non_null(c);
    for (int i = 0; i < n; i++) c[i] = (ref_cand){l[i], i};
    qsort(c, (size_t)n, sizeof *c, ref_cmp);
    int m = top_k > 0 && top_k < n ? top_k : n;
    double z = 0;
    for (int i = 0; i < m; i++) z += exp((double)c[i].logit - c[0].logit);
    int keep_n = m;
    if (top_p < 1.0f) {
        double cum = 0;
        for (int i = 0; i < m; i++) {
            cum += exp((double)c[i].logit - c[0].logit) / z;
            if (cum >= top_p) {
                keep_n = i + 1;
                break;
            }
        }
    }
    if (min_p > 0) {
        int j = 0;
        while (j < keep_n && c[j].logit >= c[0].logit + logf(min_p)) j++;
        keep_n = j > 0 ? j : 1;
    }
    memset(keep, 0, (unsigned)n);
    for (int i = 0; i < keep_n; i++) keep[c[i].id] = 1;
    free(c);
    return keep_n;
}

static void random_logits(float *l, int n, uint64_t seed, float scale)
{
    sample_rng r;
    sample_rng_seed(&r, seed);
    for (int i = 0; i < n; i++) {
        /* sum of 4 uniforms: roughly normal */
        double x = 0;
        for (int k = 0; k < 4; k++) x += sample_rng_uniform(&r) - 0.5;
        l[i] = (float)(x * scale);
    }
    /* some exact ties near the top */
    l[100] = l[200] = l[300] = 2.2f * scale;
}

/* Checks the tokens a sampler returns against the brute-force kept set, at a
 * temperature so high that the kept tokens are near uniform (temperature runs last and
 * does not change the set): never outside it, all of it when it is small, and a good
 * part of it when it is large. */
static void check_kept_set(const float *l, int n, int top_k, float top_p, float min_p,
                           uint64_t seed, const char *what)
{
    char *keep = malloc((size_t)n), *seen = calloc((size_t)n, 1);
    assert_true(keep && seen);
    int kept = ref_keep(l, n, top_k, top_p, min_p, keep);
    const int small = kept <= 100;
    sample_params p = params(1e6f, top_k, top_p, min_p, seed);
    sampler_t *s = make(&p, n);
    int distinct = 0;
    const int draws = small ? 25 * kept + 50 : 2000;
    for (int d = 0; d < draws; d++) {
        int t = sampler_sample(s, l, NULL, 0);
        assert_true(t >= 0 && t < n);
        if (!keep[t])
            fail_msg("%s: token %d (logit %g) is outside the kept set of %d", what, t, l[t], kept);
        distinct += !seen[t];
        seen[t] = 1;
    }
    int expect = small ? kept : kept < draws ? kept / 2 : draws / 2;
    if (distinct < expect) fail_msg("%s: %d distinct tokens, want %d (kept %d)", what, distinct,
                                    expect, kept);
    sampler_destroy(&s);
    free(keep);
    free(seen);
}

static void test_large_vocab(void **state)
{
    (void)state;
    const int n = 49152;
    float *l = malloc((size_t)n * sizeof *l);
    assert_non_null(l);
    struct { float scale; int top_k; float top_p; float min_p; } cases[] = {
        {6.0f, 40, 1.0f, 0.0f},      /* top-k alone */
        {6.0f, 2000, 1.0f, 0.0f},    /* top-k by quickselect */
        {6.0f, 0, 0.9f, 0.0f},       /* top-p keeping thousands */
        {1.0f, 0, 0.3f, 0.0f},       /* nearly flat: top-p keeps a third */
        {6.0f, 0, 1.0f, 0.05f},      /* min-p alone */
        {6.0f, 40, 0.95f, 0.05f},    /* llama.cpp's defaults */
        {6.0f, 1000, 0.5f, 0.0f},    /* top-p inside a large top-k */
    };
    char what[64];
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        random_logits(l, n, 1000 + c, cases[c].scale);
        snprintf(what, sizeof what, "random case %zu", c);
        check_kept_set(l, n, cases[c].top_k, cases[c].top_p, cases[c].min_p, c, what);
    }
    /* a peaked distribution like a language model's: 40 tokens well above the rest,
     * spaced so that top-p and min-p cut inside it, with ties at the cut */
    random_logits(l, n, 77, 2.0f);
    for (int j = 0; j < 40; j++) l[(j * 7919) % n] = 12.0f - 0.2f * (float)(j / 2);
    const float tops[] = {0.05f, 0.2f, 0.5f, 0.7f, 0.9f, 0.99f};
    for (size_t t = 0; t < sizeof tops / sizeof tops[0]; t++) {
        snprintf(what, sizeof what, "peaked top_p %.2f", tops[t]);
        check_kept_set(l, n, 0, tops[t], 0.0f, 40 + t, what);
        snprintf(what, sizeof what, "peaked top_k 25 top_p %.2f", tops[t]);
        check_kept_set(l, n, 25, tops[t], 0.0f, 50 + t, what);
        snprintf(what, sizeof what, "peaked min_p %.2f", tops[t]);
        check_kept_set(l, n, 0, 1.0f, tops[t], 60 + t, what);
    }
    free(l);
}

/* ---- reproducibility ------------------------------------------------------------- */

static void test_seed_reproducible(void **state)
{
    (void)state;
    const int n = 4096, steps = 200;
    float *l = malloc((size_t)n * sizeof *l);
    assert_non_null(l);
    random_logits(l, n, 5, 3.0f);
    sample_params p = sample_params_default();
    p.seed = 123456789;
    p.repeat_penalty = 1.1f;
    sampler_t *a = make(&p, n), *b = make(&p, n);
    int32_t ha[200], hb[200];
    for (int i = 0; i < steps; i++) {
        ha[i] = sampler_sample(a, l, ha, i);
        hb[i] = sampler_sample(b, l, hb, i);
        assert_int_equal(ha[i], hb[i]);
    }
    /* reset replays the same sequence */
    assert_int_equal(sampler_reset(a, &p), 0);
    for (int i = 0; i < steps; i++) assert_int_equal(sampler_sample(a, l, ha, i), ha[i]);
    /* saving and restoring the PRNG replays one step */
    sample_rng saved = *sampler_rng(a);
    int t1 = sampler_sample(a, l, NULL, 0);
    *sampler_rng(a) = saved;
    assert_int_equal(sampler_sample(a, l, NULL, 0), t1);
    /* another seed gives another sequence */
    p.seed = 987654321;
    assert_int_equal(sampler_reset(b, &p), 0);
    int differ = 0;
    for (int i = 0; i < steps; i++) differ += sampler_sample(b, l, ha, i) != ha[i];
    assert_true(differ > steps / 4);
    sampler_destroy(&a);
    sampler_destroy(&b);
    free(l);
}

/* ---- stop strings ---------------------------------------------------------------- */

static void expect_stop(const char *text, const char *const *stops, int n, size_t from,
                        int want_rc, int want_stop, size_t want_at, size_t want_safe)
{
    stop_result r;
    int rc = stop_match(text, strlen(text), stops, n, from, &r);
    if (rc != want_rc || r.stop != want_stop || (want_stop >= 0 && r.stop_at != want_at) ||
        r.safe_len != want_safe)
        fail_msg("text \"%s\": rc %d stop %d at %zu safe %zu; want rc %d stop %d at %zu safe %zu",
                 text, rc, r.stop, r.stop_at, r.safe_len, want_rc, want_stop, want_at,
                 want_safe);
}

static void test_stop_match(void **state)
{
    (void)state;
    const char *im[] = {"<|im_end|>"};
    expect_stop("Hello world", im, 1, 0, 0, -1, 0, 11);
    expect_stop("Hello <|im", im, 1, 0, 0, -1, 0, 6);           /* hold back "<|im" */
    expect_stop("Hello <", im, 1, 0, 0, -1, 0, 6);
    expect_stop("Hello <|im_end|", im, 1, 0, 0, -1, 0, 6);
    expect_stop("Hello <|im_end|>", im, 1, 0, 1, 0, 6, 6);
    expect_stop("Hello <|im_end|> more", im, 1, 0, 1, 0, 6, 6);
    expect_stop("a <|im_x b", im, 1, 0, 0, -1, 0, 10);          /* broken prefix: show it */
    expect_stop("<|im_end|>", im, 1, 0, 1, 0, 0, 0);
    expect_stop("", im, 1, 0, 0, -1, 0, 0);
    /* several: the earliest wins, then the lower index */
    const char *two[] = {"END", "\n\n", "ND"};
    expect_stop("abc\n\nxyz END", two, 3, 0, 1, 1, 3, 3);
    expect_stop("xEND", two, 3, 0, 1, 0, 1, 1);
    expect_stop("xyzEN", two, 3, 0, 0, -1, 0, 3);               /* "EN" held back */
    expect_stop("xyzE\n", two, 3, 0, 0, -1, 0, 4);
    /* self-overlapping stop: "aab" in "aaab" */
    const char *aab[] = {"aab"};
    expect_stop("xaaab", aab, 1, 0, 1, 0, 2, 2);
    expect_stop("xaaa", aab, 1, 0, 0, -1, 0, 2);
    /* empty and NULL stop strings are ignored */
    const char *odd[] = {"", NULL, "zz"};
    expect_stop("abz", odd, 3, 0, 0, -1, 0, 2);
    expect_stop("abzz", odd, 3, 0, 1, 2, 2, 2);
    /* no stops at all */
    expect_stop("anything", NULL, 0, 0, 0, -1, 0, 8);
    /* incremental: `from` = the previous length still finds a stop that straddles it */
    expect_stop("Hello <|im_end|>", im, 1, 10, 1, 0, 6, 6);
    expect_stop("Hello <|im_end|>", im, 1, 15, 1, 0, 6, 6);
    /* ... but not one that lies entirely before it */
    expect_stop("Hello <|im_end|>", im, 1, 16, 0, -1, 0, 16);
    expect_stop("<|im_end|> and on", im, 1, 12, 0, -1, 0, 17);
    /* stop longer than the text: only the hold-back applies */
    expect_stop("<|", im, 1, 0, 0, -1, 0, 0);
    /* bytes beyond ASCII, UTF-8 stop string */
    const char *u[] = {"\xc3\xa9t\xc3\xa9"}; /* "été" */
    expect_stop("l'\xc3\xa9t\xc3", u, 1, 0, 0, -1, 0, 2);
    expect_stop("l'\xc3\xa9t\xc3\xa9!", u, 1, 0, 1, 0, 2, 2);
    /* NUL bytes inside the text are data */
    stop_result r;
    const char bin[] = {'a', '\0', 'E', 'N', 'D'};
    assert_int_equal(stop_match(bin, sizeof bin, two, 3, 0, &r), 1);
    assert_int_equal(r.stop_at, 2);
    /* bad arguments */
    assert_int_equal(stop_match(NULL, 3, im, 1, 0, &r), -1);
    assert_int_equal(stop_match("abc", 3, NULL, 1, 0, &r), -1);
    assert_int_equal(stop_match("abc", 3, im, 1, 0, NULL), -1);
    assert_int_equal(stop_match(NULL, 0, im, 1, 0, &r), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_rng),
        cmocka_unit_test(test_params_check),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_repeat_penalty),
        cmocka_unit_test(test_temperature_one),
        cmocka_unit_test(test_temperature_scaling),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_large_vocab),
        cmocka_unit_test(test_seed_reproducible),
        cmocka_unit_test(test_stop_match),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
