/* kernels/cuda_plan.h: the CUDA backend's host-side planning, in plain C.
 *
 * Everything about the GPU engine that needs no GPU lives here, so that it is compiled
 * and unit-tested everywhere (tests/test_cuda_host.c), CUDA or not:
 *   - the configuration of a GPU model (cuda_model_config) and its defaults;
 *   - the device memory plan: three arenas, one per lifetime class, each carved by a
 *     table of offsets: the weights (which GGUF tensor goes where, dequantized to bf16 or
 *     f32), the KV pool (kv/kv.h's layout, per layer), the workspace (activations,
 *     per-step metadata, attention partials, logits, cuBLAS workspace), sized from one
 *     budget; a budget too small is an error naming every figure;
 *   - type tables (weights the GPU dequantizes, KV element types), the attention work
 *     split (tiles, split-K count), the sampler's choice between device and host, and the
 *     peak figures of a device (bandwidth, bf16 TFLOP/s) for the benchmarks.
 */
#ifndef DUET_KERNELS_CUDA_PLAN_H
#define DUET_KERNELS_CUDA_PLAN_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/cuda.h"

#ifdef __cplusplus
extern "C" { /* for the .cu files; the C headers below have no guards of their own */
#endif

#include "kernels/dtype.h"
#include "kernels/sample.h"
#include "kv/kv.h"
#include "worker/gguf.h"
#include "worker/model.h"

#define CUDA_NO_OFF ((size_t)-1)   /* "no such part" in an offset table */
#define CUDA_ALIGN 256             /* alignment of every part of an arena */
#define CUDA_ATTN_MAX_SPLITS 32    /* split-K ranges per attention tile at most */
#define CUDA_PEN_MAX 256           /* distinct penalized tokens per row sampled on the device */
#define CUDA_STAGING_MIN ((size_t)64 << 20) /* workspace bytes at least: weight upload staging */

/* ---- names and types ---------------------------------------------------------------------- */

/* "f32", "f16", "bf16", "fp8" (e4m3); "unknown" otherwise. Static. */
const char *cuda_kv_type_name(cuda_kv_type t);
/* Parse one of those names (also "fp8_e4m3", "e4m3"). 0, or -1 for anything else. */
int cuda_kv_type_parse(const char *s, cuda_kv_type *out);
/* Bytes per element: 2 (f16, bf16), 1 (fp8), 4 (f32); 0 for a bad type. */
size_t cuda_kv_elt_bytes(cuda_kv_type t);
/* 1 when the GPU dequantizes weights of GGUF type t at load (F32, F16, BF16, Q4_0, Q4_1,
 * Q8_0, Q4_K, Q6_K), else 0. */
int cuda_weight_type_supported(dtype_t t);
/* Parse a device name: "cuda:N" or "N" (N >= 0). 0, or -1 with a message in err. */
int cuda_device_parse(const char *spec, int *index, char *err, size_t errlen);

/* Dense bf16 tensor-core FLOP per clock per multiprocessor for compute capability
 * major.minor (4096 for 9.0, Hopper; 2048 for 8.0; 1024 for 8.6/8.9), 0 when unknown. */
int cuda_bf16_flops_per_clock_sm(int cc_major, int cc_minor);
/* Peak memory bandwidth in GB/s (1e9 bytes): 2 (double data rate) * clock * bus bytes. */
double cuda_peak_bw_gbs(int mem_clock_khz, int bus_width_bits);
/* Peak dense bf16 TFLOP/s at the given SM clock; 0 when the architecture is unknown. */
double cuda_peak_bf16_tflops(int cc_major, int cc_minor, int n_sm, int clock_khz);

/* ---- configuration ---------------------------------------------------------------------------- */

/* How matrix products are computed.
 * BF16: weights dequantized to bf16, activations rounded to bf16, f32 accumulation on
 *       tensor cores (the fast mode).
 * EXACT: weights dequantized to f32 and activations quantized exactly as the CPU's
 *       matmul does (kernels/matmul.c: int8 blocks for quantized weight types), products
 *       in f32: the GPU then differs from the CPU only by summation order, so greedy
 *       tokens agree (the fidelity mode; 2x the weight memory of f16 models, 4x of bf16). */
typedef enum { CUDA_PREC_BF16 = 0, CUDA_PREC_EXACT = 1 } cuda_precision;

/* Zero fields take the defaults in brackets (cuda_model_config_resolve). */
typedef struct {
    int device;              /* CUDA device index [0] */
    size_t mem_budget;       /* device bytes for weights + KV + workspace [90% of free] */
    size_t kv_bytes;         /* bytes of the KV pool [all the budget leaves] */
    cuda_kv_type kv_type;    /* KV element type [CUDA_KV_F16] */
    int block_tokens;        /* tokens per KV block [16] */
    int max_tokens;          /* tokens per forward pass [512] */
    int max_seqs;            /* sequences per forward pass [64] */
    int max_ctx;             /* positions per sequence [min(n_ctx_train, 8192)] */
    int max_logit_rows;      /* logit rows computed at once (more are done in chunks) [max_seqs] */
    cuda_precision precision;/* [CUDA_PREC_BF16] */
    int no_graphs;           /* 1: never capture decode steps as CUDA graphs [0] */
    int max_graphs;          /* decode graphs kept (one per batch size) [16] */
} cuda_model_config;

/* Fill the zero fields of c with the defaults for a model with these hyper-parameters
 * and check the rest (positive sizes, max_ctx <= n_ctx_train is NOT required). 0, or -1
 * with a message. */
int cuda_model_config_resolve(cuda_model_config *c, const model_hparams *hp, char *err,
                              size_t errlen);

/* ---- weights ------------------------------------------------------------------------------- */

/* One matrix in the weights arena: [n_out][n_in] elements of the store type. */
typedef struct {
    size_t off;        /* arena offset */
    size_t mins;       /* EXACT and Q4_1 only: [n_out][n_in/32] f32 block minimums, else CUDA_NO_OFF */
    int64_t n_in, n_out;
    dtype_t src_type;  /* the GGUF type it was dequantized from */
} cuda_wdesc;

/* One layer. q, k, v are consecutive in the arena (one fused [n_q + 2 n_kv][n_embd]
 * matrix), and so are gate and up ([2 n_ff][n_embd]); bqkv likewise. */
typedef struct {
    size_t attn_norm, ffn_norm;   /* f32 [n_embd] */
    size_t bqkv;                  /* f32 [n_q + 2 n_kv] (qwen2), or CUDA_NO_OFF */
    cuda_wdesc q, k, v, o;        /* o: [n_embd][n_q] (the shard's columns) */
    cuda_wdesc gate, up, down;    /* down: [n_embd][n_ff] */
} cuda_layer_w;

typedef enum {
    CUDA_COPY_MATRIX = 0, /* dequantize rows/columns to the store type (and mins) */
    CUDA_COPY_VECTOR,     /* elements [c0, c0 + n_cols) of a vector, to f32 */
    CUDA_COPY_RAW,        /* the tensor's bytes as they are (the embedding table) */
} cuda_copy_kind;

/* One upload at load time. */
typedef struct {
    cuda_copy_kind kind;
    const char *name;      /* the GGUF tensor (borrowed from the gguf) */
    const void *src;       /* host: the tensor's data (row 0) */
    dtype_t type;
    int64_t n_in;          /* elements per source row */
    int64_t r0, n_rows;    /* source rows */
    int64_t c0, n_cols;    /* source columns (block-aligned) */
    size_t dst;            /* arena offset */
    size_t mins;           /* MATRIX: arena offset of Q4_1 minimums (EXACT), else CUDA_NO_OFF */
} cuda_wcopy;

typedef struct {
    cuda_act store;        /* CUDA_ACT_BF16, or CUDA_ACT_F32 (EXACT) */
    size_t embd;           /* the raw token_embd table: [n_vocab] rows of embd_type */
    dtype_t embd_type;
    size_t out_norm;       /* f32 [n_embd] */
    cuda_wdesc out;        /* output projection, the shard's [n_vocab_shard][n_embd] */
    size_t rope_freqs;     /* f32 [rope_dims/2] or CUDA_NO_OFF */
    cuda_layer_w *layers;  /* [n_layer] (owned) */
    int n_layer;
    cuda_wcopy *copies;    /* [n_copies] every upload, in arena order (owned) */
    int n_copies;
    size_t bytes;          /* the arena's size */
    size_t max_row_bytes;  /* the largest source row (staging must hold one) */
} cuda_wplan;

/* Plan the weights of shard sh of the model in g: every tensor's place and upload. Checks
 * that each is present with its shape, of a type the GPU dequantizes, and that column
 * shards fall on block boundaries. 0, or -1 with a message naming the file and tensor. */
int cuda_wplan_make(const gguf_t *g, const model_hparams *hp, const model_shard *sh,
                    cuda_precision prec, cuda_wplan *out, char *err, size_t errlen);
void cuda_wplan_free(cuda_wplan *p);

/* ---- KV pool --------------------------------------------------------------------------------- */

typedef struct {
    cuda_kv_type type;
    int n_layer, n_kv_head, head_dim, block_tokens, n_blocks;
    size_t elt_bytes;
    size_t block_bytes;    /* one block, all layers, K and V (and FP8 scales) */
    size_t data_bytes;     /* K (or V) data of one layer: n_blocks * n_kv * bt * hd * elt */
    size_t scale_bytes;    /* K (or V) scales of one layer (FP8), else 0 */
    size_t layer_bytes;    /* one layer: 2 data + 2 scales, each CUDA_ALIGN-aligned */
    size_t bytes;          /* the arena's size: n_layer * layer_bytes */
} cuda_kv_plan;

/* A pool of as many blocks as fit in `bytes`. -1 (message) for bad sizes or no block. */
int cuda_kv_plan_make(int n_layer, int n_kv_head, int head_dim, int block_tokens,
                      cuda_kv_type t, size_t bytes, cuda_kv_plan *out, char *err, size_t errlen);
/* Bytes of one block (all layers), so a budget can be turned into blocks; 0 if invalid. */
size_t cuda_kv_block_bytes(int n_layer, int n_kv_head, int head_dim, int block_tokens,
                           cuda_kv_type t);
/* Arena offsets of layer l's K data, V data, K scales and V scales (CUDA_NO_OFF unless FP8). */
void cuda_kv_layer_offsets(const cuda_kv_plan *p, int layer, size_t *k, size_t *v, size_t *ks,
                           size_t *vs);

/* ---- workspace --------------------------------------------------------------------------------- */

/* Per-step metadata (int32, uploaded in one copy before each step), offsets in int32s. */
typedef struct {
    size_t tok, pos, slot;  /* [max_tokens] token ids, positions, KV slots */
    size_t lidx;            /* [max_tokens] token rows that want logits */
    size_t tiles;           /* [max_tokens] cuda_attn_tile (4 int32 each) */
    size_t blocks;          /* [max_seqs][max_blocks] block tables */
    size_t n;               /* int32s in all */
} cuda_meta_layout;

typedef struct {
    int max_tokens, max_seqs, max_blocks, max_logit_rows, split_cap;
    int width;              /* the widest GEMM input: max(n_embd, n_q, n_ff) */
    int mid_width;          /* max(n_q + 2 n_kv, 2 n_ff) */
    cuda_meta_layout meta;
    /* arena offsets */
    size_t x;       /* f32 [T][n_embd]: the residual stream */
    size_t xa;      /* [T][width] GEMM input of the store type */
    size_t xq;      /* EXACT: f32 [T][width] quantized activations (CUDA_NO_OFF otherwise) */
    size_t xk;      /* EXACT: f32 [T][width] second form (AK) */
    size_t bsum;    /* EXACT: f32 [T][width / 32] Q4_1 block sums */
    size_t mid;     /* f32 [T][mid_width]: QKV, then gate|up */
    size_t tmp;     /* f32 [T][n_embd]: partial sums of a TP group (CUDA_NO_OFF when tp 1) */
    size_t cs;      /* f32 [T][rope_dims] */
    size_t lrows;   /* f32 [R][n_embd] gathered rows that want logits (R = max_logit_rows) */
    size_t logits;  /* f32 [R][n_vocab] */
    size_t lpart;   /* f32 [R][n_vocab_shard] (TP), or CUDA_NO_OFF */
    size_t partial; /* f32 [split_cap][n_head][head_dim + 2] attention split partials */
    size_t meta_d;  /* int32 [meta.n] */
    size_t samp;    /* cuda_sample_row [R] */
    size_t pen;     /* int32 [R][CUDA_PEN_MAX] */
    size_t stok;    /* int32 [R] sampled tokens */
    size_t blas;    /* the cuBLAS workspace */
    size_t blas_bytes;
    size_t bytes;   /* the arena's size (at least CUDA_STAGING_MIN and one weight row) */
} cuda_ws_plan;

/* ---- the whole plan ------------------------------------------------------------------------------ */

typedef struct {
    cuda_model_config cfg;  /* resolved */
    model_hparams hp;
    model_shard sh;
    int n_q, n_kv;          /* the shard's query and KV widths (heads * head_dim) */
    int rows_per_tile;      /* attention rows per tile */
    cuda_wplan w;
    cuda_ws_plan ws;
    cuda_kv_plan kv;
    size_t budget;          /* the budget it was sized from */
} cuda_plan;

/* Plan model m's shard on a device with mem_free bytes free: weights, workspace, and the
 * KV pool from what the budget leaves (cfg->kv_bytes, or all of it). Errors name the
 * figures: "GPU memory budget of 1024 MiB cannot hold the weights (2300 MiB) and the
 * workspace (310 MiB) of models/x.gguf"; "... leaves 12 MiB for the KV cache: less than
 * one sequence of max_ctx 8192 tokens needs (256 MiB)". 0, or -1 with a message. */
int cuda_plan_make(const model_t *m, const cuda_model_config *cfg, size_t mem_free,
                   cuda_plan *out, char *err, size_t errlen);
void cuda_plan_free(cuda_plan *p);
/* The host kv/ configuration that keeps the books of this device pool: same layers,
 * heads, block_tokens, and a budget that gives exactly kv.n_blocks blocks. Its dtype is
 * int8, the smallest: its host data (about half the device pool's bytes for an f16
 * pool) is allocated by kv_new but never used by the GPU engine. */
kv_config cuda_plan_kv_config(const cuda_plan *p);

/* ---- attention work ---------------------------------------------------------------------------- */

/* Query rows (tokens) per attention tile for a GQA group and head dimension: as many
 * tokens as keep tokens * group within the kernel's row limit, at least 1. */
int cuda_attn_rows_per_tile(int group, int head_dim);
/* Split-K ranges for n_tiles tiles of n_kv_head KV heads on n_sm multiprocessors
 * (about two thread blocks per multiprocessor), at most CUDA_ATTN_MAX_SPLITS and such
 * that n_tok * splits <= split_cap. Depends on neither positions nor lengths, so a
 * captured decode graph stays valid as sequences grow. >= 1. */
int cuda_attn_splits(int n_tiles, int n_kv_head, int n_sm, int n_tok, int split_cap);
/* Tiles for n_seqs sequences, where sequence i has n_new[i] new tokens at positions
 * pos0[i].. (rows consecutive in batch order) and its block table at bt_off[i]. Writes
 * at most cap tiles; returns how many, or -1 when cap is too small. */
int cuda_attn_tiles(const int *n_new, const int *pos0, const int *bt_off, int n_seqs,
                    int rows_per_tile, cuda_attn_tile *tiles, int cap);

/* ---- sampling --------------------------------------------------------------------------------- */

/* Candidates the device sampler keeps for parameters p: 0 for greedy, k for top-k with
 * 0 < k <= CUDA_SAMPLE_K_MAX (or n_vocab when n_vocab <= CUDA_SAMPLE_K_MAX), and -1 when
 * the row must be sampled on the host (top-k off or larger than CUDA_SAMPLE_K_MAX). */
int cuda_sample_k(const sample_params *p, int n_vocab);
/* The distinct in-range token ids the repetition penalty applies to (kernels/sample.c's
 * window: the last repeat_last_n of history, all for -1), in first-seen order, into
 * out[cap]. Returns the count (0 when the penalty is off), or -1 when more than cap. */
int cuda_sample_penalty_ids(const sample_params *p, const int32_t *history, int n_history,
                            int n_vocab, int32_t *out, int cap);

#ifdef __cplusplus
}
#endif

#endif
