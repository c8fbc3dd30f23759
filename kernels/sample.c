/* kernels/sample.c: penalties, top-k/top-p/min-p, temperature and the draw; stop strings. */
#include "kernels/sample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* top-k up to this size runs as a heap over the logits; larger ones by quickselect. */
#define TOP_K_HEAP_MAX 1024
/* top-p buckets candidates by logit into this many ranges over at most TOP_P_RANGE
 * below the largest logit (e^-64 is nothing next to the largest token's weight). */
#define TOP_P_BUCKETS 128
#define TOP_P_RANGE 64.0f
/* Below this many candidates quickselect hands over to insertion sort. */
#define SELECT_SMALL 16

/* One candidate token: its (penalized) logit and id. */
typedef struct {
    float logit;
    int32_t id;
} cand;

struct sampler {
    sample_params p;
    sample_rng rng;
    int n_vocab;
    cand *cands;       /* [n_vocab] scratch */
    uint8_t *flag;     /* [n_vocab]: 1 for tokens in the penalty window; all 0 between calls */
};

/* ---- PRNG ------------------------------------------------------------------------ */

static uint64_t splitmix64(uint64_t *x)
{
    uint64_t z = (*x += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void sample_rng_seed(sample_rng *r, uint64_t seed)
{
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) r->s[i] = splitmix64(&x);
}

static uint64_t rotl(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t sample_rng_next(sample_rng *r)
{
    uint64_t *s = r->s;
    const uint64_t out = rotl(s[1] * 5, 7) * 9;
    const uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl(s[3], 45);
    return out;
}

double sample_rng_uniform(sample_rng *r)
{
    return (double)(sample_rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
}

/* ---- parameters ------------------------------------------------------------------ */

sample_params sample_params_default(void)
{
    sample_params p = {
        .temperature = 0.8f, .top_k = 40, .top_p = 0.95f, .min_p = 0.05f,
        .repeat_penalty = 1.0f, .repeat_last_n = 64, .seed = 0,
    };
    return p;
}

int sample_params_check(const sample_params *p, char *err, size_t errlen)
{
    const char *why = NULL;
    if (!p) why = "no parameters";
    else if (isnan(p->temperature)) why = "temperature is NaN";
    else if (isnan(p->top_p)) why = "top_p is NaN";
    else if (isnan(p->min_p)) why = "min_p is NaN";
    else if (!(p->repeat_penalty > 0.0f) || isinf(p->repeat_penalty))
        why = "repeat_penalty must be a finite number > 0";
    else if (p->repeat_last_n < -1) why = "repeat_last_n must be >= -1";
    if (!why) return 0;
    if (err && errlen) snprintf(err, errlen, "sample params: %s", why);
    return -1;
}

/* ---- sampler lifetime ------------------------------------------------------------ */

int sampler_new(const sample_params *p, int n_vocab, sampler_t **out)
{
    if (!out) return -1;
    *out = NULL;
    if (n_vocab <= 0 || sample_params_check(p, NULL, 0) != 0) return -1;
    sampler_t *s = calloc(1, sizeof *s);
    if (!s) return -1;
    s->cands = malloc((size_t)n_vocab * sizeof *s->cands);
    s->flag = calloc((size_t)n_vocab, 1);
    if (!s->cands || !s->flag) {
        sampler_destroy(&s);
        return -1;
    }
    s->n_vocab = n_vocab;
    s->p = *p;
    sample_rng_seed(&s->rng, p->seed);
    *out = s;
    return 0;
}

void sampler_destroy(sampler_t **self_p)
{
    if (!self_p || !*self_p) return;
    sampler_t *s = *self_p;
    free(s->cands);
    free(s->flag);
    free(s);
    *self_p = NULL;
}

int sampler_reset(sampler_t *s, const sample_params *p)
{
    if (!s || sample_params_check(p, NULL, 0) != 0) return -1;
    s->p = *p;
    sample_rng_seed(&s->rng, p->seed);
    return 0;
}

const sample_params *sampler_params(const sampler_t *s) { return s ? &s->p : NULL; }

sample_rng *sampler_rng(sampler_t *s) { return s ? &s->rng : NULL; }

/* ---- candidates ------------------------------------------------------------------ */

/* The total order of candidates: a before b when its logit is larger, or equal with a
 * lower id. */
static inline int better(const cand *a, const cand *b)
{
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static inline void swap_cand(cand *a, cand *b)
{
    cand t = *a;
    *a = *b;
    *b = t;
}

static void insertion_sort(cand *c, int n)
{
    for (int i = 1; i < n; i++) {
        cand x = c[i];
        int j = i - 1;
        while (j >= 0 && better(&x, &c[j])) {
            c[j + 1] = c[j];
            j--;
        }
        c[j + 1] = x;
    }
}

/* Rearranges c[0..n) so that c[0..k) holds the k best candidates (in no particular
 * order), each better than all of c[k..n). 0 < k < n. */
static void select_best(cand *c, int n, int k)
{
    int lo = 0, hi = n - 1; /* the k-th boundary lies within [lo, hi] */
    while (hi - lo + 1 > SELECT_SMALL) {
        /* median of three as pivot, moved to c[hi] */
        int mid = lo + (hi - lo) / 2;
        if (better(&c[mid], &c[lo])) swap_cand(&c[mid], &c[lo]);
        if (better(&c[hi], &c[lo])) swap_cand(&c[hi], &c[lo]);
        if (better(&c[mid], &c[hi])) swap_cand(&c[mid], &c[hi]);
        const cand pivot = c[hi];
        int store = lo;
        for (int i = lo; i < hi; i++)
            if (better(&c[i], &pivot)) swap_cand(&c[i], &c[store++]);
        swap_cand(&c[store], &c[hi]); /* the pivot at its final rank */
        if (store == k || store == k - 1) return;
        if (store > k) hi = store - 1;
        else lo = store + 1;
    }
    insertion_sort(c + lo, hi - lo + 1);
}

static int cmp_cand(const void *a, const void *b)
{
    return better(a, b) ? -1 : better(b, a) ? 1 : 0;
}

/* Sorts c[0..n) best first. */
static void sort_cands(cand *c, int n)
{
    if (n <= SELECT_SMALL) insertion_sort(c, n);
    else qsort(c, (size_t)n, sizeof *c, cmp_cand);
}

/* Min-heap on `better` (the root is the worst kept candidate). */
static void heap_sift_down(cand *h, int n, int i)
{
    for (;;) {
        int l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && better(&h[w], &h[l])) w = l;
        if (r < n && better(&h[w], &h[r])) w = r;
        if (w == i) return;
        swap_cand(&h[i], &h[w]);
        i = w;
    }
}

/* Offers x to the heap h[*n] of capacity k. */
static void heap_offer(cand *h, int *n, int k, cand x)
{
    if (*n < k) {
        int i = (*n)++;
        h[i] = x;
        while (i > 0 && better(&h[(i - 1) / 2], &h[i])) { /* sift up */
            swap_cand(&h[(i - 1) / 2], &h[i]);
            i = (i - 1) / 2;
        }
    } else if (better(&x, &h[0])) {
        h[0] = x;
        heap_sift_down(h, *n, 0);
    }
}

/* ---- repetition penalty ---------------------------------------------------------- */

/* The window of history the penalty looks at: history[*first, n_history). Flags the
 * in-range tokens in it; returns 0 when the penalty is off (nothing flagged). Every
 * path that flags tokens clears them again with for_each_penalized(). */
static int flag_history(sampler_t *s, const int32_t *history, int n_history, int *first)
{
    const sample_params *p = &s->p;
    if (p->repeat_penalty == 1.0f || p->repeat_last_n == 0 || !history || n_history <= 0)
        return 0;
    int n = p->repeat_last_n < 0 || p->repeat_last_n > n_history ? n_history : p->repeat_last_n;
    *first = n_history - n;
    for (int i = *first; i < n_history; i++) {
        int32_t t = history[i];
        if (t >= 0 && t < s->n_vocab) s->flag[t] = 1;
    }
    return 1;
}

static inline float clean(float l) { return isnan(l) ? -INFINITY : l; }

static inline float penalized(const sampler_t *s, float l)
{
    return l > 0.0f ? l / s->p.repeat_penalty : l * s->p.repeat_penalty;
}

/* ---- sampling -------------------------------------------------------------------- */

/* Greedy: one pass over the raw logits that skips flagged tokens (looked up only when a
 * token would become the best), then the flagged tokens with their penalized logits. */
static int sample_greedy(sampler_t *s, const float *logits, const int32_t *history,
                         int first, int n_history, int penalize)
{
    cand best = {-INFINITY, -1};
    for (int i = 0; i < s->n_vocab; i++) {
        float l = logits[i];
        if (l > best.logit && !(penalize && s->flag[i])) { /* NaN never passes */
            best.logit = l;
            best.id = i;
        }
    }
    if (penalize) {
        for (int i = first; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= s->n_vocab || !s->flag[t]) continue;
            s->flag[t] = 0;
            cand x = {penalized(s, clean(logits[t])), t};
            if (x.logit > -INFINITY && (best.id < 0 || better(&x, &best))) best = x;
        }
    }
    return best.id;
}

/* top-k by a heap of k straight from the logits; returns the largest kept logit and
 * sets *min_out to the smallest. */
static float gather_top_k(sampler_t *s, const float *logits, const int32_t *history,
                          int first, int n_history, int penalize, int k, float *min_out)
{
    cand *h = s->cands;
    int n = 0;
    for (int i = 0; i < s->n_vocab; i++) {
        float l = logits[i];
        /* ids grow, so a later equal logit never beats the root */
        if (n == k && !(l > h[0].logit)) continue;
        if (penalize && s->flag[i]) continue;
        heap_offer(h, &n, k, (cand){clean(l), i});
    }
    if (penalize) {
        for (int i = first; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= s->n_vocab || !s->flag[t]) continue;
            s->flag[t] = 0;
            heap_offer(h, &n, k, (cand){penalized(s, clean(logits[t])), t});
        }
    }
    float m = -INFINITY, lo = INFINITY;
    for (int i = 0; i < n; i++) {
        if (h[i].logit > m) m = h[i].logit;
        if (h[i].logit < lo) lo = h[i].logit;
    }
    *min_out = lo;
    return m;
}

/* Every token as a candidate (cands[i].id == i); returns the largest logit and sets
 * *min_out to the smallest. */
static float gather_all(sampler_t *s, const float *logits, const int32_t *history,
                        int first, int n_history, int penalize, float *min_out)
{
    cand *c = s->cands;
    const int n = s->n_vocab;
    float m = -INFINITY, lo = INFINITY;
    for (int i = 0; i < n; i++) {
        float l = clean(logits[i]);
        c[i].logit = l;
        c[i].id = i;
        m = l > m ? l : m;
        lo = l < lo ? l : lo;
    }
    if (penalize) {
        int rescan = 0;
        for (int i = first; i < n_history; i++) {
            int32_t t = history[i];
            if (t < 0 || t >= n || !s->flag[t]) continue;
            s->flag[t] = 0;
            float l = penalized(s, c[t].logit);
            if (c[t].logit == m && l < m) rescan = 1;
            if (l > m) m = l;
            if (l < lo) lo = l;
            c[t].logit = l;
        }
        if (rescan) {
            m = -INFINITY;
            for (int i = 0; i < n; i++) m = c[i].logit > m ? c[i].logit : m;
        }
    }
    *min_out = lo;
    return m;
}

/* The top-p bucket of a logit: (max_l - l) * scale, clamped to the last bucket. */
static inline int top_p_bucket(float l, float max_l, float scale)
{
    float d = (max_l - l) * scale;
    return d < (float)(TOP_P_BUCKETS - 1) ? (int)d : TOP_P_BUCKETS - 1;
}

/* top-p over c[0..n) (the min-p survivors, a best-first prefix of the top-k set whose
 * mass is z; mass[b]: the weight of the survivors in bucket b): moves the kept candidates to the front and returns their count. Buckets
 * by logit find the one where the running mass crosses the target; the buckets above
 * it are kept whole and only the crossing bucket is sorted to find the cut. */
static int top_p_keep(cand *c, int n, float max_l, double z, float top_p, float scale,
                      const double *mass /* [TOP_P_BUCKETS] */)
{
    const double target = top_p > 0.0f ? (double)top_p * z : 0.0;
    double cum = 0.0;
    int cross = -1;
    for (int b = 0; b < TOP_P_BUCKETS; b++) {
        cum += mass[b];
        if (cum >= target) {
            cross = b;
            break;
        }
    }
    if (cross < 0) return n; /* min-p ran out first: keep them all, in any order */
    /* [buckets above the crossing one: all kept | the crossing bucket | the rest] */
    int above = 0, m = 0;
    double cum_above = 0.0;
    for (int b = 0; b < cross; b++) cum_above += mass[b];
    for (int pass = 0; pass < 2; pass++) {
        const int first = m;
        for (int i = first; i < n; i++) {
            int b = top_p_bucket(c[i].logit, max_l, scale);
            if (pass == 0 ? b < cross : b == cross) swap_cand(&c[m++], &c[i]);
        }
        if (pass == 0) above = m;
    }
    sort_cands(c + above, m - above);
    cum = cum_above;
    for (int i = above; i < m; i++) {
        cum += expf(c[i].logit - max_l);
        if (cum >= target) return i + 1;
    }
    return m; /* rounding between the two sums: the whole crossing bucket */
}

int sampler_sample(sampler_t *s, const float *logits, const int32_t *history, int n_history)
{
    if (!s || !logits) return -1;
    const sample_params *p = &s->p;
    int first = 0;
    const int penalize = flag_history(s, history, n_history, &first);
    if (!(p->temperature > 0.0f))
        return sample_greedy(s, logits, history, first, n_history, penalize);

    /* candidates: the top-k set, or everything */
    cand *c = s->cands;
    int n;
    float max_l, min_l;
    const int top_k_on = p->top_k > 0 && p->top_k < s->n_vocab;
    if (top_k_on && p->top_k <= TOP_K_HEAP_MAX) {
        n = p->top_k;
        max_l = gather_top_k(s, logits, history, first, n_history, penalize, n, &min_l);
    } else {
        n = s->n_vocab;
        max_l = gather_all(s, logits, history, first, n_history, penalize, &min_l);
        if (top_k_on && max_l > -INFINITY) {
            select_best(c, n, p->top_k);
            n = p->top_k;
            min_l = INFINITY;
            for (int i = 0; i < n; i++) min_l = c[i].logit < min_l ? c[i].logit : min_l;
        }
    }
    if (max_l == -INFINITY) return -1;
    if (max_l == INFINITY) { /* +inf dominates: the lowest such id, as greedy */
        int b = -1;
        for (int i = 0; i < n; i++)
            if (c[i].logit == INFINITY && (b < 0 || c[i].id < c[b].id)) b = i;
        return c[b].id;
    }

    /* the top-p mass is measured over the top-k set; min-p then shrinks the set to
     * p_i >= min_p * p_max, i.e. logit_i >= max + log(min_p) (order kept; the max stays) */
    const int top_p_on = p->top_p < 1.0f;
    const float thr = p->min_p > 0.0f ? max_l + logf(p->min_p) : -INFINITY;
    double z = 0.0;
    double mass[TOP_P_BUCKETS];
    float scale = 0.0f;
    if (top_p_on) {
        /* buckets over the survivors' logit range, at most TOP_P_RANGE wide */
        float range = max_l - (min_l > thr ? min_l : thr);
        if (!(range <= TOP_P_RANGE)) range = TOP_P_RANGE; /* inf too */
        scale = range > 0.0f ? (float)TOP_P_BUCKETS / range : 0.0f;
        memset(mass, 0, sizeof mass);
    }
    if (top_p_on || thr > -INFINITY) {
        int m = 0;
        for (int i = 0; i < n; i++) {
            const float l = c[i].logit;
            const float w = top_p_on ? expf(l - max_l) : 0.0f;
            z += w;
            if (l >= thr) {
                c[m++] = c[i];
                if (top_p_on) mass[top_p_bucket(l, max_l, scale)] += w;
            }
        }
        if (m == 0) { /* min_p > 1: the best alone */
            for (int i = 0; i < n; i++)
                if (c[i].logit == max_l) {
                    c[0] = c[i];
                    break;
                }
            m = 1;
        }
        n = m;
    }
    if (top_p_on && n > 1) n = top_p_keep(c, n, max_l, z, p->top_p, scale, mass);

    /* temperature and the draw: weights in place of the logits */
    const double u01 = sample_rng_uniform(&s->rng); /* one draw per call, always */
    if (n == 1) return c[0].id;
    const float inv_t = 1.0f / p->temperature;
    double sum = 0.0;
    for (int i = 0; i < n; i++) {
        float w = expf((c[i].logit - max_l) * inv_t);
        c[i].logit = w;
        sum += w;
    }
    const double u = u01 * sum;
    double acc = 0.0;
    int last = 0;
    for (int i = 0; i < n; i++) {
        if (c[i].logit <= 0.0f) continue;
        acc += c[i].logit;
        last = i;
        if (u < acc) return c[i].id;
    }
    return c[last].id; /* rounding left u at the very top */
}

/* ---- stop strings ---------------------------------------------------------------- */

int stop_match(const char *text, size_t len, const char *const *stops, int n_stops,
               size_t from, stop_result *out)
{
    if (!out || (!text && len > 0) || (!stops && n_stops > 0)) return -1;
    out->stop = -1;
    out->stop_at = 0;
    out->safe_len = len;
    if (from > len) from = len;

    /* the earliest complete occurrence that ends after `from` */
    for (int k = 0; k < n_stops; k++) {
        const char *st = stops[k];
        size_t sl = st ? strlen(st) : 0;
        if (sl == 0 || sl > len) continue;
        size_t start = from >= sl ? from - sl + 1 : 0;
        size_t last = len - sl; /* last possible start */
        if (out->stop >= 0 && out->stop_at < last) last = out->stop_at; /* only earlier wins */
        for (size_t a = start; a <= last; a++) {
            const char *hit = memchr(text + a, st[0], last - a + 1);
            if (!hit) break;
            a = (size_t)(hit - text);
            if (memcmp(hit, st, sl) == 0) {
                if (out->stop < 0 || a < out->stop_at) {
                    out->stop = k;
                    out->stop_at = a;
                }
                break;
            }
        }
    }
    if (out->stop >= 0) {
        out->safe_len = out->stop_at;
        return 1;
    }

    /* hold back the longest tail that some stop string begins with */
    size_t hold = 0;
    for (int k = 0; k < n_stops; k++) {
        const char *st = stops[k];
        size_t sl = st ? strlen(st) : 0;
        if (sl == 0) continue;
        size_t maxl = sl - 1 < len ? sl - 1 : len; /* proper prefixes only */
        for (size_t l = maxl; l > hold; l--) {
            if (memcmp(text + len - l, st, l) == 0) {
                hold = l;
                break;
            }
        }
    }
    out->safe_len = len - hold;
    return 0;
}

void sample_rng_to_hex(const sample_rng *r, char hex[65])
{
    static const char dig[] = "0123456789abcdef";
    for (int w = 0; w < 4; w++)
        for (int b = 0; b < 8; b++) {
            unsigned v = (unsigned)(r->s[w] >> (8 * b)) & 0xffu;
            hex[16 * w + 2 * b] = dig[v >> 4];
            hex[16 * w + 2 * b + 1] = dig[v & 15];
        }
    hex[64] = 0;
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

int sample_rng_from_hex(const char *hex, sample_rng *r)
{
    if (!hex || !r || strlen(hex) != 64) return -1;
    sample_rng t = {{0, 0, 0, 0}};
    for (int w = 0; w < 4; w++)
        for (int b = 0; b < 8; b++) {
            int hi = hexval(hex[16 * w + 2 * b]), lo = hexval(hex[16 * w + 2 * b + 1]);
            if (hi < 0 || lo < 0) return -1;
            t.s[w] |= (uint64_t)(hi << 4 | lo) << (8 * b);
        }
    if (!(t.s[0] | t.s[1] | t.s[2] | t.s[3])) return -1;
    *r = t;
    return 0;
}
