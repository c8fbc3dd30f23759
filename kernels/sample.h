/* kernels/sample.h: choosing the next token from a row of logits, and stop strings.
 *
 * A sampler belongs to one sequence (one batch slot): it holds that sequence's sampling
 * parameters, its own PRNG state (xoshiro256**, seeded through splitmix64; no global
 * state) and a scratch area of 9 bytes per vocabulary entry (1.4 MB for a 152k
 * vocabulary), so sampling never allocates. A worker keeps one sampler per batch
 * slot and re-arms it for each new request with sampler_reset().
 *
 * The filters run in llama.cpp's default order, on the logits as given:
 *   repetition penalty -> top-k -> top-p -> min-p -> temperature -> draw.
 * So top-p and min-p see the distribution at temperature 1 and temperature only
 * reshapes the probabilities among the survivors (as in llama.cpp; HF and vLLM apply
 * temperature first, which changes which tokens top-p keeps). Every filter keeps at
 * least one token.
 *
 * - repetition penalty (llama.cpp / HF CTRL semantics): each DISTINCT token among the
 *   last repeat_last_n tokens of the history has its logit divided by repeat_penalty
 *   when positive and multiplied by it when negative (once, however often it occurs).
 * - top-k: keep the k largest logits (ties broken by the lower token id).
 * - top-p (nucleus): sort the survivors by probability (softmax over the top-k set),
 *   keep the shortest prefix whose probabilities add up to at least top_p.
 * - min-p: keep the tokens whose probability is at least min_p times the largest one.
 * - temperature: p_i proportional to exp(logit_i / temperature) over the survivors;
 *   temperature <= 0 means greedy: the largest penalized logit, ties broken by the
 *   lowest token id, and the other filters and the PRNG are not used.
 *
 * Cost: greedy is one pass over the logits. Sampling is a few linear passes: top-k
 * keeps a heap of k while it reads the logits (quickselect for k > 1024), top-p
 * buckets the candidates by logit and sorts only those above the bucket where the
 * running mass crosses top_p; the vocabulary is never fully sorted. Each non-greedy call draws exactly one
 * number from the PRNG, so a given seed, parameters, logits and history always give
 * the same token sequence.
 */
#ifndef DUET_KERNELS_SAMPLE_H
#define DUET_KERNELS_SAMPLE_H

#include <stddef.h>
#include <stdint.h>

/* Sampling parameters of one request. The defaults that sample_params_default() sets
 * are shown in brackets. */
typedef struct {
    float temperature;     /* <= 0: greedy [0.8] */
    int top_k;             /* keep the k best; <= 0 or >= n_vocab: off [40] */
    float top_p;           /* nucleus mass in (0, 1]; >= 1: off; <= 0: keeps one token [0.95] */
    float min_p;           /* in [0, 1]; <= 0: off [0.05] */
    float repeat_penalty;  /* > 0; 1: off [1.0] */
    int repeat_last_n;     /* history tokens the penalty looks at; 0: none, -1: all [64] */
    uint64_t seed;         /* PRNG seed; equal seeds give equal draws [0] */
} sample_params;

/* PRNG state (xoshiro256**). Public so that it can be saved, restored or shipped with
 * a sequence; treat the words as opaque. */
typedef struct {
    uint64_t s[4];
} sample_rng;

/* The state as 64 lower-case hex digits (+ NUL): the four words in order, each as its 8
 * little-endian bytes (docs/PROTOCOL.md, assign.rng). */
void sample_rng_to_hex(const sample_rng *r, char hex[65]);
/* Parse that form; 0, or -1 (not 64 hex digits, or the all-zero state xoshiro cannot use). */
int sample_rng_from_hex(const char *hex, sample_rng *r);

/* Seed r from seed (splitmix64 expansion; any seed, 0 included, gives a valid state). */
void sample_rng_seed(sample_rng *r, uint64_t seed);
/* Next 64 random bits. */
uint64_t sample_rng_next(sample_rng *r);
/* Uniform double in [0, 1) with 53 random bits. */
double sample_rng_uniform(sample_rng *r);

/* The defaults listed in sample_params (llama.cpp's, with greedy off). */
sample_params sample_params_default(void);

/* Returns 0 when p is usable, or -1 (with a one-line reason in err[errlen], when err is
 * not NULL) for NaN values, repeat_penalty <= 0 or repeat_last_n < -1. */
int sample_params_check(const sample_params *p, char *err, size_t errlen);

typedef struct sampler sampler_t;

/* A sampler for logits of n_vocab entries, with parameters *p and its PRNG seeded from
 * p->seed. Returns 0, or -1 for bad parameters or n_vocab <= 0, or when out of memory
 * (*out is then NULL). */
int sampler_new(const sample_params *p, int n_vocab, sampler_t **out);
/* Frees the sampler and sets *self_p to NULL; safe on NULL and twice. */
void sampler_destroy(sampler_t **self_p);
/* New parameters and a PRNG re-seeded from p->seed (for the next request in this slot).
 * Returns 0, or -1 for bad parameters (the sampler is then unchanged). */
int sampler_reset(sampler_t *s, const sample_params *p);
/* The parameters in use (borrowed). */
const sample_params *sampler_params(const sampler_t *s);
/* The sampler's PRNG state (borrowed, writable: save and restore it to replay). */
sample_rng *sampler_rng(sampler_t *s);

/* Chooses the next token from logits[n_vocab] (not modified), given the sequence's
 * tokens so far history[n_history] (prompt and generated, oldest first; may be NULL
 * when n_history is 0; ids outside [0, n_vocab) are ignored). NaN logits count as
 * -inf. Returns the token id, or -1 when logits is NULL or no logit is above -inf. */
int sampler_sample(sampler_t *s, const float *logits, const int32_t *history, int n_history);

/* ---- stop strings ---------------------------------------------------------------- */

/* What stop_match() found in the text generated so far. */
typedef struct {
    int stop;        /* index in stops[] of the stop string found, or -1 */
    size_t stop_at;  /* when stop >= 0: byte offset where it begins; the output ends there */
    size_t safe_len; /* bytes of text that may be shown now: up to stop_at when a stop
                        string was found, else all but the longest tail that is a
                        proper prefix of some stop string (held back until it resolves) */
} stop_result;

/* Looks for the stop strings stops[n_stops] (NUL-terminated; empty ones and NULLs are
 * ignored) in text[len] (not NUL-terminated; may hold any bytes). Where several occur,
 * the one that begins first wins (then the lower index). Occurrences that lie entirely
 * within text[0, from) are not looked for: pass the previous call's len when text only grew, to
 * keep the cost proportional to the new bytes, or 0 to scan everything. Returns 1 when
 * a stop string was found, 0 when not, -1 for bad arguments (NULL text with len > 0,
 * NULL stops with n_stops > 0, NULL out). */
int stop_match(const char *text, size_t len, const char *const *stops, int n_stops,
               size_t from, stop_result *out);

#endif
