/* kernels/cuda.h: duet's CUDA backend, low level, as plain C (no CUDA header needed).
 *
 * Devices, device memory (one arena per lifetime class) and every operation of the
 * forward pass on device pointers, one launcher per operation (the kernels live in
 * kernels/cuda_*.cu, one file per operation). kernels/cuda_model.h builds the model's
 * forward pass on top of these.
 *
 * Builds: with CUDA (make CUDA=1, the default where nvcc is found; DUET_CUDA=1) these
 * are the real thing; without it (CUDA=0) kernels/cuda_stub.c makes every function
 * fail with "built without CUDA (rebuild with make CUDA=1)". Either way the program
 * links, and a machine without a GPU gets a clear error, never a crash:
 *   "no CUDA device: cudaGetDeviceCount: <the runtime's reason>".
 *
 * Errors: every function that can fail returns 0, or -1 and writes the first error into
 * a duet_cuda_err (the failing call, file, line and device: "cudaMalloc(...) failed:
 * out of memory (kernels/cuda_device.cu:88, device 0)"); a later error never overwrites
 * an earlier one, so one err can collect a whole sequence of calls. Nothing here exits.
 *
 * Streams: a cuda_stream is a cudaStream_t passed as void *; NULL is the legacy default
 * stream. Launchers are asynchronous: they enqueue work on the stream and return; an
 * error of the kernel itself surfaces at the next synchronizing call (cuda_sync).
 *
 * Device pointers are marked "dev:"; shapes as elsewhere: [rows][cols], row-major.
 */
#ifndef DUET_KERNELS_CUDA_H
#define DUET_KERNELS_CUDA_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" { /* the C headers below have no guards of their own */
#endif

#include "kernels/dtype.h"

/* ---- errors ---------------------------------------------------------------------------- */

/* The first error of a sequence of calls. Zero-initialize it ({0}) before use. */
typedef struct {
    int set;        /* 1 once an error was recorded */
    char msg[320];  /* what failed, where (call, file:line, device) */
} duet_cuda_err;

/* Record a formatted error unless one is already recorded (e may be NULL). */
void duet_cuda_err_set(duet_cuda_err *e, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

/* 1 when this build has the CUDA backend (DUET_CUDA=1), 0 for the CUDA=0 stubs. */
int cuda_built(void);

typedef void *cuda_stream; /* a cudaStream_t; NULL: the default stream */

/* ---- devices ----------------------------------------------------------------------------- */

typedef struct {
    int index;                /* CUDA device index */
    char name[256];           /* "NVIDIA H100 80GB HBM3" */
    int cc_major, cc_minor;   /* compute capability (9.0 for Hopper) */
    int n_sm;                 /* multiprocessors */
    int clock_khz;            /* peak SM clock */
    int mem_clock_khz;        /* peak memory clock */
    int bus_width_bits;       /* memory bus width */
    size_t smem_optin;        /* shared memory a block may opt in to (bytes) */
    size_t mem_total;         /* device memory (bytes) */
    size_t mem_free;          /* free when queried (bytes) */
    double peak_bw_gbs;       /* memory bandwidth from clock and bus width (GB/s, 1e9), 0: unknown */
    double peak_bf16_tflops;  /* dense bf16 tensor-core peak at the SM clock (1e12/s), 0: unknown */
} cuda_device_info;

/* How many CUDA devices this process sees. 0 devices is an error: -1 with
 * "no CUDA device: cudaGetDeviceCount: <reason>" (no driver, no GPU, CUDA_VISIBLE_DEVICES
 * empty) or "built without CUDA ...". */
int cuda_device_count(int *n, duet_cuda_err *err);
/* Make device `index` current for the calling thread and describe it (info may be NULL).
 * -1 for an index outside the devices present ("cuda:3 does not exist: 1 CUDA device"). */
int cuda_device_select(int index, cuda_device_info *info, duet_cuda_err *err);

/* ---- device memory ------------------------------------------------------------------------- */

/* One allocation of one lifetime class (weights, KV pool, workspace), carved by a table
 * of offsets (kernels/cuda_plan.h). Its base is 256-byte aligned. Running out is
 * "out of GPU memory for the <what> (N MiB): M MiB free of T MiB on cuda:D (<name>)". */
typedef struct cuda_arena cuda_arena_t;
int cuda_arena_new(const char *what, size_t bytes, cuda_arena_t **out, duet_cuda_err *err);
/* Free the memory, NULL *self_p; safe on NULL and twice. */
void cuda_arena_destroy(cuda_arena_t **self_p);
/* dev: the base, and the size in bytes. */
void *cuda_arena_base(const cuda_arena_t *a);
size_t cuda_arena_size(const cuda_arena_t *a);

/* Plain buffers for tests and tools (the engine itself uses arenas). Synchronous copies. */
int cuda_mem_alloc(void **dptr, size_t bytes, duet_cuda_err *err);
void cuda_mem_free(void *dptr); /* NULL is fine */
int cuda_mem_h2d(void *dst, const void *src, size_t bytes, duet_cuda_err *err);
int cuda_mem_d2h(void *dst, const void *src, size_t bytes, duet_cuda_err *err);
int cuda_mem_set(void *dst, int byte, size_t bytes, duet_cuda_err *err);
/* Wait for all work on the device; reports asynchronous kernel errors. */
int cuda_sync(duet_cuda_err *err);

/* ---- element types ------------------------------------------------------------------------- */

/* Activations handed between operations: f32, or bf16 (the GEMM input in bf16 mode). */
typedef enum { CUDA_ACT_F32 = 0, CUDA_ACT_BF16 = 1 } cuda_act;

/* KV cache elements on the device (zero, the default, is f16). FP8 is e4m3 with one f32
 * scale per stored row (one position of one KV head): value = fp8 * scale, scale =
 * amax(row) / 448 (1 for an all-zero row). */
typedef enum { CUDA_KV_F16 = 0, CUDA_KV_BF16 = 1, CUDA_KV_FP8 = 2, CUDA_KV_F32 = 3 } cuda_kv_type;

/* ---- operations ---------------------------------------------------------------------------- */

/* Dequantize a GGUF weight: rows [0, n_rows) of src (rows of n_in elements of type t,
 * dtype_row_bytes(t, n_in) bytes each), columns [c0, c0 + n_cols), into dst:
 * [n_rows][n_cols] of `out` (CUDA_ACT_F32: exactly dtype_to_f32's values; CUDA_ACT_BF16:
 * those rounded to nearest even). c0 and n_cols must fall on block boundaries. When
 * mins is not NULL (t must be Q4_1) the block minimum m is left out of dst and written
 * to mins: [n_rows][n_cols/32] (the exact mode's split of Q4_1, see cuda_op_actq).
 * Types: F32, F16, BF16, Q4_0, Q4_1, Q8_0, Q4_K, Q6_K. */
int cuda_op_dequant(void *dst, cuda_act out, float *mins, dtype_t t, const void *src,
                    int64_t n_rows, int64_t n_in, int64_t c0, int64_t n_cols, cuda_stream s,
                    duet_cuda_err *err);

/* Embedding lookup: y[t] = row ids[t] of table (type t, [n_vocab][n_embd]) as f32, with
 * exactly ops_embed's values; y: [n_tok][n_embd]. ids are checked by the caller (an id
 * outside [0, n_vocab) gives a zero row). */
int cuda_op_embed(float *y, dtype_t t, const void *table, int64_t n_vocab, int64_t n_embd,
                  const int32_t *ids, int n_tok, cuda_stream s, duet_cuda_err *err);

/* y[r] = x[r] / sqrt(mean(x[r]²) + eps) * w, for n_rows rows of n elements. x: [n_rows][ldx]
 * f32, w: [n] f32 (NULL: ones), y: [n_rows][ldy] of type `out`. */
int cuda_op_rmsnorm(void *y, cuda_act out, int64_t ldy, const float *x, int64_t ldx,
                    const float *w, int n_rows, int64_t n, float eps, cuda_stream s,
                    duet_cuda_err *err);

/* y = silu(gate) * up over n_rows rows of n elements; gate, up: [n_rows][ld_in] f32 (may
 * be two column ranges of one buffer), y: [n_rows][ldy] of type `out`. */
int cuda_op_swiglu(void *y, cuda_act out, int64_t ldy, const float *gate, const float *up,
                   int64_t ld_in, int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err);

/* RoPE, ops_rope_cache's convention (kernels/ops.h): pair i of a head rotates by
 * pos * freq_scale * freq_base^(-2i/n_dims) / freq_factors[i], the angles advanced by the
 * same float recurrence; NORMAL pairs (2i, 2i+1), NEOX pairs (i, i + n_dims/2). */
typedef struct {
    int n_dims;                /* rotated dimensions per head (even, <= head_dim) */
    float freq_base;
    float freq_scale;
    const float *freq_factors; /* dev: [n_dims/2] or NULL */
    int neox;                  /* 0: NORMAL (llama), 1: NEOX (qwen2) */
} cuda_rope;
/* cs[t][2i], cs[t][2i+1] = cos, sin of pair i's angle at position pos[t]; cs: [n_tok][n_dims]. */
int cuda_op_rope_cache(float *cs, const int32_t *pos, int n_tok, const cuda_rope *r, cuda_stream s,
                       duet_cuda_err *err);
/* Rotate x: n_tok rows of n_head heads of head_dim, row stride ldx floats, with cs from
 * cuda_op_rope_cache (fmaf as ops_rope_apply). */
int cuda_op_rope_apply(float *x, int64_t ldx, int n_tok, int n_head, int head_dim, const float *cs,
                       int n_dims, int neox, cuda_stream s, duet_cuda_err *err);

/* One layer's paged KV on the device, kv/kv.h's layout: K and V each
 * [n_blocks][n_kv_head][block_tokens][head_dim] elements; FP8 adds per-row scales
 * [n_blocks][n_kv_head][block_tokens] f32 for K and for V. */
typedef struct {
    cuda_kv_type type;
    int n_kv_head, head_dim, block_tokens, n_blocks;
    void *k, *v;               /* dev */
    float *k_scale, *v_scale;  /* dev, FP8 only (else NULL) */
} cuda_kv_layer;

/* The step after the Q/K/V projection, fused: for each token row t, qkv[t] holds
 * [n_head*hd | n_kv*hd | n_kv*hd] (row stride ldqkv): add the bias (dev [n_head*hd + 2*n_kv*hd]
 * or NULL), rotate Q in place and K, and store K and V into the pool at slot[t]
 * (= block * block_tokens + position % block_tokens, dev [n_tok]). cs as cuda_op_rope_cache's. */
int cuda_op_rope_store(float *qkv, int64_t ldqkv, const float *bias, int n_tok, int n_head,
                       const float *cs, int n_dims, int neox, const int32_t *slot,
                       const cuda_kv_layer *kv, cuda_stream s, duet_cuda_err *err);

/* Attention work: one tile = consecutive new tokens of one sequence (kernels/cuda_plan.h
 * builds the list). Token row row0 + i is at position pos0 + i and attends keys [0, pos0 + i]. */
typedef struct {
    int32_t row0;    /* first token row (in q and out) */
    int32_t n_rows;  /* tokens in the tile, 1..rows_per_tile */
    int32_t pos0;    /* position of the first */
    int32_t bt_off;  /* offset of the sequence's block table in the block-table array */
} cuda_attn_tile;

/* Causal attention over the paged KV, GQA-aware: a thread block takes one tile, one KV
 * head and its whole group of query heads, so each key and value is read once per group.
 * Splits (n_splits > 1) divide each tile's keys into n_splits ranges computed in
 * parallel and merged (split-K, for long contexts with few tokens); they need
 * `partial`: dev f32 [n_tok][n_head][n_splits][head_dim + 2] (n_tok = the rows of q).
 * q: dev f32 [n_tok][ldq] (head h at columns h*head_dim); out: dev [n_tok][ldo] of type
 * `out`; blocks: dev int32 block tables; tiles: dev [n_tiles]. scale is usually
 * 1/sqrt(head_dim). rows_per_tile: the most rows a tile holds (cuda_attn_rows_per_tile). */
typedef struct {
    const cuda_kv_layer *kv;
    const int32_t *blocks;
    const cuda_attn_tile *tiles;
    int n_tiles, rows_per_tile, n_tok, n_head, n_splits;
    const float *q;
    int64_t ldq;
    void *out;
    cuda_act out_type;
    int64_t ldo;
    float scale;
    float *partial;
    int tensor_cores;  /* 1: with rows_per_tile > 1 (prefill), n_splits 1 and head_dim 64 or
                        * 128, take the bf16 tensor-core kernel (Q, K, V and the softmax
                        * weights rounded to bf16, f32 accumulation: the BF16 mode's
                        * prefill); 0: f32 throughout */
} cuda_attn_args;
int cuda_op_attention(const cuda_attn_args *a, cuda_stream s, duet_cuda_err *err);
/* The head dimensions and group sizes the attention kernel takes (shared-memory limits):
 * head_dim a multiple of 8 up to 256, group (n_head / n_kv_head) up to 64 (up to 32 for
 * head_dim > 128). 1 when supported. */
int cuda_attn_supported(int head_dim, int group);

/* Activation quantization of the exact mode: the same values the CPU matmul multiplies
 * (kernels/matmul.c): for Q4_0/Q4_1/Q8_0 weights, blocks of 32 quantized to int8 with
 * scale d = amax/127 rounded to f16 (form A32); for Q4_K/Q6_K, blocks of 256 with d =
 * amax/127 (form AK). xq = q * d as f32, [n_rows][n] (ld n); for A32, bsum (may be NULL):
 * [n_rows][n/32] the f16-rounded d * sum(q), which Q4_1's minimum multiplies. */
typedef enum { CUDA_ACTQ_A32 = 1, CUDA_ACTQ_AK = 2 } cuda_actq_form;
int cuda_op_actq(float *xq, float *bsum, cuda_actq_form form, const float *x, int64_t ldx,
                 int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err);

/* ---- matrix products (cuBLAS) ---------------------------------------------------------------- */

typedef struct cuda_blas cuda_blas_t;
/* A cuBLAS handle bound to stream s with its workspace (dev, ws_bytes; may be NULL/0 when
 * no graph capture is needed), in the default math mode (no TF32). */
int cuda_blas_new(cuda_stream s, void *ws, size_t ws_bytes, cuda_blas_t **out, duet_cuda_err *err);
void cuda_blas_destroy(cuda_blas_t **self_p);

/* y[t][o] (+)= sum_i x[t][i] * W[o][i]: W dev [n_out][n_in] (ldw = n_in) of type `wt`,
 * x dev [n_tok][ldx] of the same type, y dev f32 [n_tok][ldy]; accumulation in f32
 * (CUBLAS_COMPUTE_32F; bf16 inputs on tensor cores, f32 inputs in plain f32).
 * add: 0 overwrite, 1 accumulate into y (residual connections). */
int cuda_gemm(cuda_blas_t *b, cuda_act wt, const void *w, int64_t n_out, int64_t n_in,
              const void *x, int64_t ldx, int n_tok, float *y, int64_t ldy, int add,
              duet_cuda_err *err);

/* y[i] += x[i] for n floats (a TP group's reduced partial sums into the residual). */
int cuda_op_add(float *y, const float *x, size_t n, cuda_stream s, duet_cuda_err *err);
/* dst[r] = src[idx[r]] for n_rows rows of n floats (gathering the rows that want logits). */
int cuda_op_gather_rows(float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *idx,
                        int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err);
/* Fill n elements of type t at dst with uniform random values in [-amp, amp) from seed
 * (benchmarks fill the KV pool this way). t: CUDA_KV_* as element type; FP8 fills its
 * data only (scales are set separately with cuda_op_fill_f32). */
int cuda_op_fill_random(void *dst, cuda_kv_type t, size_t n, float amp, uint64_t seed,
                        cuda_stream s, duet_cuda_err *err);
int cuda_op_fill_f32(float *dst, size_t n, float v, cuda_stream s, duet_cuda_err *err);

/* ---- sampling ---------------------------------------------------------------------------------- */

/* One row to sample on the device (kernels/sample.h's filters; see cuda_op_sample). */
typedef struct {
    int32_t logit_row;   /* the row of logits it samples */
    float temperature;   /* <= 0: greedy */
    int k;               /* candidates kept by top-k (1..CUDA_SAMPLE_K_MAX); the whole
                          * vocabulary when n_vocab <= CUDA_SAMPLE_K_MAX */
    float top_p, min_p;
    float repeat_penalty;
    int pen_off, n_pen;  /* distinct penalized token ids: pen_ids[pen_off .. + n_pen) */
    uint64_t rng[4];     /* xoshiro256** state (sample_rng), advanced in place */
} cuda_sample_row;
#define CUDA_SAMPLE_K_MAX 1024

/* For each r < n_rows: logits[rows[r].logit_row] (dev f32 rows of ld floats, modified in
 * place by the penalty) -> token[r] (dev int32), as kernels/sample.c decides: repetition penalty, then greedy
 * (the largest logit, lowest id on ties; NaN counts as -inf) or top-k -> top-p -> min-p
 * -> temperature -> one draw of the row's generator. The kept set is the CPU's (ties at
 * the top-k boundary keep the lower ids); the draw walks the kept tokens best first, so
 * a seed gives the same token as the CPU's whenever the CPU's walk order agrees, and
 * always the same distribution. rows: dev [n_rows] (rng updated). -1 when no logit is
 * above -inf. */
int cuda_op_sample(const float *logits, int64_t ld, int n_rows, int n_vocab, cuda_sample_row *rows,
                   const int32_t *pen_ids, int32_t *token, cuda_stream s, duet_cuda_err *err);

/* ---- KV pack / unpack (transfer) ------------------------------------------------------------------ */

/* One layer's K or V of one sequence between the paged pool and a dense buffer
 * (kernels/kv_pack.cuh, in plain C): dense = [n_heads][n_tok][head_dim] elements, plus
 * for FP8 (elt_bytes 1) dense_scales = [n_heads][n_tok] f32 from pool_scales. */
typedef struct {
    void *pool;              /* dev: the layer's K (or V) array */
    const int32_t *blocks;   /* dev: the sequence's block table */
    int n_kv_heads, block_tokens, head_dim, elt_bytes;  /* elt_bytes 1 (fp8), 2 or 4 */
    int head0, n_heads;      /* local heads of the pool */
    int tok0, n_tok;         /* positions */
    void *dense;             /* dev */
    float *pool_scales;      /* dev: FP8 only, the layer's [n_blocks][n_kv_heads][block_tokens] */
    float *dense_scales;     /* dev: FP8 only, [n_heads][n_tok] */
} cuda_kv_span;
int cuda_op_kv_pack(const cuda_kv_span *sp, cuda_stream s, duet_cuda_err *err);
int cuda_op_kv_unpack(const cuda_kv_span *sp, cuda_stream s, duet_cuda_err *err);

#ifdef __cplusplus
}
#endif

#endif
