/* kernels/matmul.h: y = x·Wᵀ for every weight type, on the CPU.
 *
 * W is a GGUF weight: n_out rows of n_in elements, each row dtype_row_bytes(type, n_in)
 * bytes (the tensor's ne[0] = n_in, ne[1] = n_out). The activations x are quantized once
 * per call into the type that W's blocks multiply with in the integer domain (blocks of
 * 32 int8 with scale and sum for Q4_0/Q4_1/Q8_0, Q8_K super-blocks for Q4_K/Q6_K);
 * F32/F16/BF16 weights multiply f32 activations. Nothing is dequantized per call.
 *
 * Output rows are split across the pool's threads; for n_tok > 1 every weight row that a
 * thread loads is used for several tokens before the next is read (prefill speed).
 *
 * Three levels:
 *   mm_matmul      one weight, one pool_run;
 *   mm_run         several weights sharing one input (Q,K,V; gate and up), optionally
 *                  RMS-normalizing x on the way, one pool_run;
 *   mm_run_th      the same, called by every thread from inside a running pool_run
 *                  function, so a whole layer can be one dispatch.
 * Row data must be 2-byte aligned (4 for F32); GGUF's 32-byte alignment is plenty.
 */
#ifndef DUET_KERNELS_MATMUL_H
#define DUET_KERNELS_MATMUL_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/dtype.h"
#include "kernels/pool.h"

/* A weight matrix (borrowed; typically points into the mapped GGUF file). */
typedef struct {
    dtype_t type;        /* F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K or Q6_K */
    int64_t n_in;        /* elements per row (a multiple of the type's block size) */
    int64_t n_out;       /* rows */
    const void *data;    /* [n_out] rows of dtype_row_bytes(type, n_in) bytes */
} mm_weight;

/* Workspace for the quantized activations, owned by the caller; one per concurrent user
 * (a pool and the functions it runs share one). Grows on demand in mm_matmul/mm_run,
 * never inside mm_run_th. */
typedef struct mm_scratch mm_scratch;

int mm_scratch_new(mm_scratch **out);
void mm_scratch_destroy(mm_scratch **self_p);
/* Make room for inputs of up to n_in columns and n_tok tokens on up to nth threads.
 * Returns 0, or -1 when out of memory. Required before mm_run_th. */
int mm_scratch_reserve(mm_scratch *ws, int64_t n_in, int n_tok, int nth);

/* The shared input of one call. */
typedef struct {
    const float *x;       /* [n_tok][ldx]: the first n_in columns of each row are used */
    int n_tok;            /* tokens (rows of x), >= 1 */
    int64_t ldx;          /* row stride of x in floats; 0 means n_in */
    const float *rms_w;   /* NULL, or [n_in]: multiply by rmsnorm(x_t) * rms_w instead of x_t */
    float rms_eps;        /* epsilon of that RMS norm */
    const float *up;      /* NULL, or [n_tok][ldx] like x: multiply by silu(x_t) * up_t
                           * instead of x_t (SwiGLU fused into the down projection; applied
                           * before rms_w when both are set) */
} mm_input;

/* One weight and its output. */
typedef struct {
    const mm_weight *w;   /* n_in must equal the other jobs' n_in */
    float *y;             /* [n_tok][ldy]: the first w->n_out columns of each row are written */
    int64_t ldy;          /* row stride of y in floats; 0 means w->n_out */
    int add;              /* 0: y = x·Wᵀ; 1: y += x·Wᵀ (residual connections) */
    const float *bias;    /* NULL, or [w->n_out] added to every output row (qwen2's Q/K/V) */
} mm_job;

/* y[t][o] = sum_i x[t][i] * W[o][i]. x: [n_tok][w->n_in], y: [n_tok][w->n_out].
 * pool may be NULL. Returns 0, or -1 for an unsupported type, bad sizes or no memory. */
int mm_matmul(pool_t *pool, const mm_weight *w, const float *x, int n_tok, float *y,
              mm_scratch *ws);

/* Every job of jobs[n_jobs] on the same input, in one pool_run. Returns 0 or -1. */
int mm_run(pool_t *pool, const mm_input *in, const mm_job *jobs, int n_jobs, mm_scratch *ws);

/* mm_run from inside a pool_run function: every thread ith of nth calls it with the
 * same arguments. The input must be complete on every thread before the call (a
 * pool_barrier after it was written). On return this thread's rows are written; call
 * pool_barrier(pool) before reading y on other threads or reusing ws. The scratch must
 * have been reserved (mm_scratch_reserve) for n_in, n_tok and nth. Returns the same value
 * on every thread: 0, or -1 for bad arguments or a scratch too small (nothing written). */
int mm_run_th(pool_t *pool, int ith, int nth, const mm_input *in, const mm_job *jobs,
              int n_jobs, mm_scratch *ws);

/* 1 when mm_* can compute with weights of type t. */
int mm_supported(dtype_t t);

#endif
