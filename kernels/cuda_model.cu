/* kernels/cuda_model.cu: a Llama-family model on one GPU (kernels/cuda_model.h).
 *
 * Memory: three arenas from kernels/cuda_plan.c's plan (weights, KV pool, workspace);
 * nothing is allocated on the device after cuda_model_new. The workspace doubles as the
 * staging area of the weight upload.
 *
 * A step: the host flattens the batch into per-token metadata (ids, positions, KV slots,
 * logit rows, attention tiles, block tables) in a pinned buffer, sends it in one copy,
 * then enqueues on the model's stream: embedding, RoPE angles, and per layer RMSNorm ->
 * QKV product -> bias + RoPE + KV store -> paged attention -> output product (+ residual)
 * -> RMSNorm -> gate|up product -> SwiGLU -> down product (+ residual); then the rows that
 * want logits are gathered, normalized and projected onto the vocabulary. In BF16 mode Q,
 * K, V are one product and gate|up another; in EXACT mode every weight is its own f32
 * product on activations quantized like the CPU's (kernels/cuda_actq.cu).
 */
#include <math.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda_common.cuh"
#include "kernels/cuda_model.h"

typedef struct {
    int n_tok;                /* the decode batch size it was captured for */
    int seen;                 /* eager runs of this size so far (capture on the second) */
    int broken;               /* capture failed once: run eagerly */
    cudaGraphExec_t exec;
    uint64_t last_use;
} graph_slot;

/* Which activation forms of the current GEMM input exist (EXACT mode). */
typedef struct {
    const float *src;
    int64_t n;
    int a32, ak;
} actq_cache;

struct cuda_model {
    const model_t *m;
    cuda_plan plan;
    cuda_device_info dev;
    cudaStream_t stream;
    cudaEvent_t meta_done;     /* the last metadata upload has left the pinned buffer */
    cuda_blas_t *blas;
    cuda_arena_t *aw, *akv, *aws;
    uint8_t *W, *KVB, *WS;     /* dev: arena bases */
    int32_t *meta_h;           /* pinned [meta.n] */
    cuda_sample_row *samp_h;   /* pinned [R] */
    int32_t *pen_h, *stok_h;   /* pinned [R][CUDA_PEN_MAX], [R] */
    float *row_h;              /* [n_vocab] a logit row for the host sampler */
    int *samp_map;             /* [R] request index of each device-sampled row */
    cuda_kv_layer *kvl;        /* [n_layer] */
    int *n_new, *pos0, *bt_off; /* [max_seqs] per-step scratch */
    cuda_collectives coll;
    graph_slot *graphs;        /* [max_graphs] */
    uint64_t clock;
    int last_rows;             /* logit rows of the last forward still on the device, or -1 */
    cuda_model_stats stats;
    actq_cache aq;
    cuda_layer_fn progress;    /* per-layer hook, or NULL */
    void *progress_user;
    cudaEvent_t *layer_ev;     /* [n_layer] recorded after each layer's K/V store */
    int capturing;             /* enqueueing into a graph: no hook */
};

static void set_errs(char *err, size_t errlen, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void set_errs(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || !errlen) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int from_cuda_err(const duet_cuda_err *e, char *err, size_t errlen, const char *what)
{
    set_errs(err, errlen, "%s: %s", what, e->set ? e->msg : "unknown CUDA error");
    return -1;
}

/* The model's device, current for the calling thread (a worker may call from another
 * thread than the one that loaded it). */
static int use_device(const cuda_model_t *cm, char *err, size_t errlen)
{
    const cudaError_t st = cudaSetDevice(cm->dev.index);
    if (st == cudaSuccess) return 0;
    set_errs(err, errlen, "cudaSetDevice(%d) failed: %s", cm->dev.index, cudaGetErrorString(st));
    return -1;
}

/* ---- load ----------------------------------------------------------------------------------- */

static int upload_weights(cuda_model_t *cm, duet_cuda_err *e)
{
    const cuda_wplan *w = &cm->plan.w;
    uint8_t *stage = cm->WS;
    const size_t stage_bytes = cm->plan.ws.bytes;
    const size_t sb = w->store == CUDA_ACT_F32 ? 4 : 2;
    for (int i = 0; i < w->n_copies; i++) {
        const cuda_wcopy *c = &w->copies[i];
        const size_t rb = dtype_row_bytes(c->type, c->n_in);
        if (c->kind == CUDA_COPY_RAW) {
            CUDA_CHECK(e, cudaMemcpyAsync(cm->W + c->dst, c->src, rb * (size_t)c->n_rows, cudaMemcpyHostToDevice,
                                          cm->stream));
        } else if (c->kind == CUDA_COPY_VECTOR) {
            const size_t eb = dtype_block_bytes(c->type);
            CUDA_CHECK(e, cudaMemcpyAsync(stage, (const uint8_t *)c->src + (size_t)c->c0 * eb,
                                          (size_t)c->n_cols * eb, cudaMemcpyHostToDevice, cm->stream));
            if (cuda_op_dequant(cm->W + c->dst, CUDA_ACT_F32, NULL, c->type, stage, 1, c->n_cols, 0, c->n_cols,
                                cm->stream, e) != 0)
                goto fail;
        } else {
            int64_t per = (int64_t)(stage_bytes / rb);
            ARG_CHECK(e, per >= 1, "tensor '%s': a row of %zu bytes does not fit the %zu-byte staging area",
                      c->name, rb, stage_bytes);
            for (int64_t r = 0; r < c->n_rows; r += per) {
                const int64_t nr = c->n_rows - r < per ? c->n_rows - r : per;
                CUDA_CHECK(e, cudaMemcpyAsync(stage, (const uint8_t *)c->src + (size_t)(c->r0 + r) * rb,
                                              (size_t)nr * rb, cudaMemcpyHostToDevice, cm->stream));
                float *mins = c->mins != CUDA_NO_OFF ? (float *)(cm->W + c->mins) + r * (c->n_cols / 32) : NULL;
                if (cuda_op_dequant(cm->W + c->dst + (size_t)r * (size_t)c->n_cols * sb, w->store, mins, c->type,
                                    stage, nr, c->n_in, c->c0, c->n_cols, cm->stream, e) != 0)
                    goto fail;
            }
        }
    }
    CUDA_CHECK(e, cudaStreamSynchronize(cm->stream));
    return 0;
fail:
    if (!e->set) duet_cuda_err_set(e, "uploading the weights failed");
    (void)cudaStreamSynchronize(cm->stream);
    return -1;
}

extern "C" int cuda_model_new(const model_t *m, const cuda_model_config *cfg, cuda_model_t **out, char *err,
                              size_t errlen)
{
    duet_cuda_err e = {0, {0}};
    *out = NULL;
    cuda_model_t *cm = (cuda_model_t *)calloc(1, sizeof *cm);
    if (!cm) {
        set_errs(err, errlen, "out of host memory");
        return -1;
    }
    cm->m = m;
    cm->last_rows = -1;
    const char *path = gguf_path(model_gguf(m));
    if (cuda_device_select(cfg->device, &cm->dev, &e) != 0) {
        set_errs(err, errlen, "%s", e.msg);
        goto fail_quiet;
    }
    if (cuda_plan_make(m, cfg, cm->dev.mem_free, &cm->plan, err, errlen) != 0) goto fail_quiet;
    {
        const cuda_plan *p = &cm->plan;
        const int R = p->cfg.max_logit_rows;
        if (cuda_arena_new("workspace", p->ws.bytes, &cm->aws, &e) != 0 ||
            cuda_arena_new("weights", p->w.bytes, &cm->aw, &e) != 0 ||
            cuda_arena_new("KV cache", p->kv.bytes, &cm->akv, &e) != 0)
            goto fail;
        cm->W = (uint8_t *)cuda_arena_base(cm->aw);
        cm->KVB = (uint8_t *)cuda_arena_base(cm->akv);
        cm->WS = (uint8_t *)cuda_arena_base(cm->aws);
        CUDA_CHECK(&e, cudaStreamCreateWithFlags(&cm->stream, cudaStreamNonBlocking));
        CUDA_CHECK(&e, cudaEventCreateWithFlags(&cm->meta_done, cudaEventDisableTiming));
        CUDA_CHECK(&e, cudaMallocHost((void **)&cm->meta_h, p->ws.meta.n * sizeof(int32_t)));
        CUDA_CHECK(&e, cudaMallocHost((void **)&cm->samp_h, (size_t)R * sizeof(cuda_sample_row)));
        CUDA_CHECK(&e, cudaMallocHost((void **)&cm->pen_h, (size_t)R * CUDA_PEN_MAX * sizeof(int32_t)));
        CUDA_CHECK(&e, cudaMallocHost((void **)&cm->stok_h, (size_t)R * sizeof(int32_t)));
        cm->row_h = (float *)malloc((size_t)p->hp.n_vocab * sizeof(float));
        cm->samp_map = (int *)malloc((size_t)R * sizeof(int));
        cm->kvl = (cuda_kv_layer *)calloc((size_t)p->hp.n_layer, sizeof *cm->kvl);
        cm->n_new = (int *)malloc((size_t)p->cfg.max_seqs * sizeof(int));
        cm->pos0 = (int *)malloc((size_t)p->cfg.max_seqs * sizeof(int));
        cm->bt_off = (int *)malloc((size_t)p->cfg.max_seqs * sizeof(int));
        cm->graphs = (graph_slot *)calloc((size_t)p->cfg.max_graphs, sizeof *cm->graphs);
        cm->layer_ev = (cudaEvent_t *)calloc((size_t)p->hp.n_layer, sizeof *cm->layer_ev);
        ARG_CHECK(&e, cm->row_h && cm->samp_map && cm->kvl && cm->n_new && cm->pos0 && cm->bt_off && cm->graphs &&
                  cm->layer_ev, "out of host memory");
        for (int l = 0; l < p->hp.n_layer; l++)
            CUDA_CHECK(&e, cudaEventCreateWithFlags(&cm->layer_ev[l], cudaEventDisableTiming));
        for (int l = 0; l < p->hp.n_layer; l++) {
            size_t ko, vo, kso, vso;
            cuda_kv_layer_offsets(&p->kv, l, &ko, &vo, &kso, &vso);
            cuda_kv_layer *L = &cm->kvl[l];
            L->type = p->kv.type;
            L->n_kv_head = p->kv.n_kv_head;
            L->head_dim = p->kv.head_dim;
            L->block_tokens = p->kv.block_tokens;
            L->n_blocks = p->kv.n_blocks;
            L->k = cm->KVB + ko;
            L->v = cm->KVB + vo;
            L->k_scale = kso != CUDA_NO_OFF ? (float *)(cm->KVB + kso) : NULL;
            L->v_scale = vso != CUDA_NO_OFF ? (float *)(cm->KVB + vso) : NULL;
        }
        if (upload_weights(cm, &e) != 0) goto fail;
        /* the staging area is the workspace: cuBLAS gets its part only after the upload */
        if (cuda_blas_new(cm->stream, cm->WS + p->ws.blas, p->ws.blas_bytes, &cm->blas, &e) != 0) goto fail;
        CUDA_CHECK(&e, cudaEventRecord(cm->meta_done, cm->stream));
    }
    *out = cm;
    return 0;
fail:
    set_errs(err, errlen, "%s: loading onto cuda:%d: %s", path, cfg->device, e.set ? e.msg : "CUDA error");
fail_quiet:
    cuda_model_destroy(&cm);
    return -1;
}

extern "C" void cuda_model_destroy(cuda_model_t **self_p)
{
    if (!self_p || !*self_p) return;
    cuda_model_t *cm = *self_p;
    if (cm->stream) {
        (void)cudaSetDevice(cm->dev.index);
        (void)cudaStreamSynchronize(cm->stream);
    }
    if (cm->graphs)
        for (int i = 0; i < cm->plan.cfg.max_graphs; i++)
            if (cm->graphs[i].exec) (void)cudaGraphExecDestroy(cm->graphs[i].exec);
    free(cm->graphs);
    if (cm->layer_ev)
        for (int l = 0; l < cm->plan.hp.n_layer; l++)
            if (cm->layer_ev[l]) (void)cudaEventDestroy(cm->layer_ev[l]);
    free(cm->layer_ev);
    cuda_blas_destroy(&cm->blas);
    if (cm->meta_h) (void)cudaFreeHost(cm->meta_h);
    if (cm->samp_h) (void)cudaFreeHost(cm->samp_h);
    if (cm->pen_h) (void)cudaFreeHost(cm->pen_h);
    if (cm->stok_h) (void)cudaFreeHost(cm->stok_h);
    if (cm->meta_done) (void)cudaEventDestroy(cm->meta_done);
    if (cm->stream) (void)cudaStreamDestroy(cm->stream);
    cuda_arena_destroy(&cm->akv);
    cuda_arena_destroy(&cm->aw);
    cuda_arena_destroy(&cm->aws);
    free(cm->row_h);
    free(cm->samp_map);
    free(cm->kvl);
    free(cm->n_new);
    free(cm->pos0);
    free(cm->bt_off);
    cuda_plan_free(&cm->plan);
    free(cm);
    *self_p = NULL;
}

extern "C" const cuda_device_info *cuda_model_device(const cuda_model_t *cm) { return &cm->dev; }
extern "C" const cuda_plan *cuda_model_plan(const cuda_model_t *cm) { return &cm->plan; }
extern "C" kv_config cuda_model_kv_config(const cuda_model_t *cm) { return cuda_plan_kv_config(&cm->plan); }
extern "C" void cuda_model_set_collectives(cuda_model_t *cm, const cuda_collectives *c) { cm->coll = *c; }
extern "C" cuda_stream cuda_model_stream(const cuda_model_t *cm) { return (cuda_stream)cm->stream; }
extern "C" void cuda_model_get_stats(const cuda_model_t *cm, cuda_model_stats *out) { *out = cm->stats; }
extern "C" const cuda_kv_layer *cuda_model_kv_layer(const cuda_model_t *cm, int layer)
{
    return cm && layer >= 0 && layer < cm->plan.hp.n_layer ? &cm->kvl[layer] : NULL;
}
extern "C" void cuda_model_set_progress(cuda_model_t *cm, cuda_layer_fn fn, void *user)
{
    cm->progress = fn;
    cm->progress_user = user;
}

/* ---- one step ---------------------------------------------------------------------------------- */

/* Shapes of one step. */
typedef struct {
    int T;           /* token rows */
    int n_tiles, rows_per_tile, n_splits;
} step_shape;

static int actq_form(dtype_t t)
{
    switch (t) {
    case DTYPE_Q4_0: case DTYPE_Q4_1: case DTYPE_Q8_0: return CUDA_ACTQ_A32;
    case DTYPE_Q4_K: case DTYPE_Q6_K: return CUDA_ACTQ_AK;
    default: return 0;
    }
}

/* y (+)= x . W^T for one weight of the plan; x: [T][ldx] of the store type (f32 in EXACT
 * mode, where the input is first quantized like the CPU's matmul quantizes it). */
static int gemm_w(cuda_model_t *cm, const cuda_wdesc *d, const void *x, int64_t ldx, int T, float *y, int64_t ldy,
                  int add, int64_t n_out_fused, duet_cuda_err *e)
{
    const cuda_plan *p = &cm->plan;
    const int64_t n_out = n_out_fused ? n_out_fused : d->n_out;
    if (p->w.store == CUDA_ACT_BF16)
        return cuda_gemm(cm->blas, CUDA_ACT_BF16, cm->W + d->off, n_out, d->n_in, x, ldx, T, y, ldy, add, e);
    const int form = actq_form(d->src_type);
    const float *xf = (const float *)x;
    actq_cache *aq = &cm->aq;
    if (aq->src != xf || aq->n != d->n_in) {
        aq->src = xf;
        aq->n = d->n_in;
        aq->a32 = aq->ak = 0;
    }
    float *xq = (float *)(cm->WS + p->ws.xq), *xk = (float *)(cm->WS + p->ws.xk);
    float *bsum = (float *)(cm->WS + p->ws.bsum);
    if (form == CUDA_ACTQ_A32) {
        if (!aq->a32 && cuda_op_actq(xq, bsum, CUDA_ACTQ_A32, xf, ldx, T, d->n_in, cm->stream, e) != 0) return -1;
        aq->a32 = 1;
        if (cuda_gemm(cm->blas, CUDA_ACT_F32, cm->W + d->off, d->n_out, d->n_in, xq, d->n_in, T, y, ldy, add, e))
            return -1;
        if (d->mins != CUDA_NO_OFF &&
            cuda_gemm(cm->blas, CUDA_ACT_F32, cm->W + d->mins, d->n_out, d->n_in / 32, bsum, d->n_in / 32, T, y,
                      ldy, 1, e) != 0)
            return -1;
        return 0;
    }
    if (form == CUDA_ACTQ_AK) {
        if (!aq->ak && cuda_op_actq(xk, NULL, CUDA_ACTQ_AK, xf, ldx, T, d->n_in, cm->stream, e) != 0) return -1;
        aq->ak = 1;
        return cuda_gemm(cm->blas, CUDA_ACT_F32, cm->W + d->off, d->n_out, d->n_in, xk, d->n_in, T, y, ldy, add, e);
    }
    return cuda_gemm(cm->blas, CUDA_ACT_F32, cm->W + d->off, d->n_out, d->n_in, x, ldx, T, y, ldy, add, e);
}

/* A row-split product into the residual x: directly, or through the TP group's sum. */
static int gemm_residual(cuda_model_t *cm, const cuda_wdesc *d, const void *in, int64_t ldin, int T, float *x,
                         duet_cuda_err *e)
{
    const cuda_plan *p = &cm->plan;
    const int64_t E = p->hp.n_embd;
    if (p->sh.tp_size == 1) return gemm_w(cm, d, in, ldin, T, x, E, 1, 0, e);
    float *tmp = (float *)(cm->WS + p->ws.tmp);
    if (gemm_w(cm, d, in, ldin, T, tmp, E, 0, 0, e) != 0) return -1;
    if (cm->coll.allreduce_sum(cm->coll.user, tmp, (size_t)T * (size_t)E, (cuda_stream)cm->stream) != 0) {
        duet_cuda_err_set(e, "the tensor-parallel all-reduce failed");
        return -1;
    }
    return cuda_op_add(x, tmp, (size_t)T * (size_t)E, cm->stream, e);
}

/* Embedding, RoPE angles and every layer: x holds the final residual stream. */
static int enqueue_layers(cuda_model_t *cm, const step_shape *sh, duet_cuda_err *e)
{
    const cuda_plan *p = &cm->plan;
    const model_hparams *hp = &p->hp;
    const int T = sh->T, E = hp->n_embd, nq = p->n_q, nkv = p->n_kv, nff = p->sh.n_ff, hd = hp->head_dim;
    const int nqkv = nq + 2 * nkv;
    const cuda_act st = p->w.store;
    const int exact = st == CUDA_ACT_F32;
    const int32_t *meta = (const int32_t *)(cm->WS + p->ws.meta_d);
    float *x = (float *)(cm->WS + p->ws.x), *mid = (float *)(cm->WS + p->ws.mid), *cs = (float *)(cm->WS + p->ws.cs);
    void *xa = cm->WS + p->ws.xa;
    cuda_rope rope;
    rope.n_dims = hp->rope_dims;
    rope.freq_base = hp->rope_base;
    rope.freq_scale = hp->rope_freq_scale;
    rope.freq_factors = p->w.rope_freqs != CUDA_NO_OFF ? (const float *)(cm->W + p->w.rope_freqs) : NULL;
    rope.neox = hp->rope_mode == ROPE_NEOX;
    cm->aq.src = NULL;

    if (cuda_op_embed(x, p->w.embd_type, cm->W + p->w.embd, hp->n_vocab, E, meta + p->ws.meta.tok, T, cm->stream,
                      e) != 0)
        return -1;
    if (hp->rope_dims > 0 && cuda_op_rope_cache(cs, meta + p->ws.meta.pos, T, &rope, cm->stream, e) != 0) return -1;
    for (int il = 0; il < hp->n_layer; il++) {
        const cuda_layer_w *L = &p->w.layers[il];
        cm->aq.src = NULL;
        if (cuda_op_rmsnorm(xa, st, E, x, E, (const float *)(cm->W + L->attn_norm), T, E, hp->rms_eps, cm->stream,
                            e) != 0)
            return -1;
        if (!exact) {
            if (gemm_w(cm, &L->q, xa, E, T, mid, nqkv, 0, nqkv, e) != 0) return -1;
        } else {
            if (gemm_w(cm, &L->q, xa, E, T, mid, nqkv, 0, 0, e) != 0 ||
                gemm_w(cm, &L->k, xa, E, T, mid + nq, nqkv, 0, 0, e) != 0 ||
                gemm_w(cm, &L->v, xa, E, T, mid + nq + nkv, nqkv, 0, 0, e) != 0)
                return -1;
        }
        if (cuda_op_rope_store(mid, nqkv, L->bqkv != CUDA_NO_OFF ? (const float *)(cm->W + L->bqkv) : NULL, T,
                               p->sh.n_head, cs, hp->rope_dims, rope.neox, meta + p->ws.meta.slot, &cm->kvl[il],
                               cm->stream, e) != 0)
            return -1;
        if (cm->progress && !cm->capturing) {
            const cudaError_t st = cudaEventRecord(cm->layer_ev[il], cm->stream);
            if (st != cudaSuccess) {
                duet_cuda_record(e, "cudaEventRecord(layer_ev)", cudaGetErrorString(st), __FILE__, __LINE__);
                return -1;
            }
            cm->progress(cm->progress_user, il, (void *)cm->layer_ev[il]);
        }
        cuda_attn_args a;
        a.kv = &cm->kvl[il];
        a.blocks = meta + p->ws.meta.blocks;
        a.tiles = (const cuda_attn_tile *)(meta + p->ws.meta.tiles);
        a.n_tiles = sh->n_tiles;
        a.rows_per_tile = sh->rows_per_tile;
        a.n_tok = T;
        a.n_head = p->sh.n_head;
        a.n_splits = sh->n_splits;
        a.q = mid;
        a.ldq = nqkv;
        a.out = xa;
        a.out_type = st;
        a.ldo = nq;
        a.scale = 1.0f / sqrtf((float)hd);
        a.partial = (float *)(cm->WS + p->ws.partial);
        a.tensor_cores = !exact;
        if (cuda_op_attention(&a, cm->stream, e) != 0) return -1;
        cm->aq.src = NULL;
        if (gemm_residual(cm, &L->o, xa, nq, T, x, e) != 0) return -1;
        cm->aq.src = NULL;
        if (cuda_op_rmsnorm(xa, st, E, x, E, (const float *)(cm->W + L->ffn_norm), T, E, hp->rms_eps, cm->stream,
                            e) != 0)
            return -1;
        if (!exact) {
            if (gemm_w(cm, &L->gate, xa, E, T, mid, 2 * nff, 0, 2 * (int64_t)nff, e) != 0) return -1;
        } else {
            if (gemm_w(cm, &L->gate, xa, E, T, mid, 2 * nff, 0, 0, e) != 0 ||
                gemm_w(cm, &L->up, xa, E, T, mid + nff, 2 * nff, 0, 0, e) != 0)
                return -1;
        }
        if (cuda_op_swiglu(xa, st, nff, mid, mid + nff, 2 * nff, T, nff, cm->stream, e) != 0) return -1;
        cm->aq.src = NULL;
        if (gemm_residual(cm, &L->down, xa, nff, T, x, e) != 0) return -1;
    }
    return 0;
}

/* Logit rows [r0, r0 + nr) of the step (token rows meta.lidx[r0..]) into the logits buffer. */
static int enqueue_logits(cuda_model_t *cm, int r0, int nr, duet_cuda_err *e)
{
    const cuda_plan *p = &cm->plan;
    const model_hparams *hp = &p->hp;
    const int E = hp->n_embd;
    const int32_t *meta = (const int32_t *)(cm->WS + p->ws.meta_d);
    float *x = (float *)(cm->WS + p->ws.x), *lrows = (float *)(cm->WS + p->ws.lrows);
    float *logits = (float *)(cm->WS + p->ws.logits);
    void *xa = cm->WS + p->ws.xa;
    cm->aq.src = NULL;
    if (cuda_op_gather_rows(lrows, E, x, E, meta + p->ws.meta.lidx + r0, nr, E, cm->stream, e) != 0) return -1;
    if (cuda_op_rmsnorm(xa, p->w.store, E, lrows, E, (const float *)(cm->W + p->w.out_norm), nr, E, hp->rms_eps,
                        cm->stream, e) != 0)
        return -1;
    if (p->sh.tp_size == 1) return gemm_w(cm, &p->w.out, xa, E, nr, logits, hp->n_vocab, 0, 0, e);
    float *part = (float *)(cm->WS + p->ws.lpart);
    if (gemm_w(cm, &p->w.out, xa, E, nr, part, p->sh.n_vocab, 0, 0, e) != 0) return -1;
    if (cm->coll.gather_vocab(cm->coll.user, part, nr, logits, (cuda_stream)cm->stream) != 0) {
        duet_cuda_err_set(e, "gathering the vocabulary shards failed");
        return -1;
    }
    return 0;
}

static graph_slot *graph_for(cuda_model_t *cm, int T)
{
    graph_slot *free_slot = NULL, *lru = NULL;
    for (int i = 0; i < cm->plan.cfg.max_graphs; i++) {
        graph_slot *g = &cm->graphs[i];
        if (g->n_tok == T) return g;
        if (!g->n_tok && !free_slot) free_slot = g;
        if (g->n_tok && (!lru || g->last_use < lru->last_use)) lru = g;
    }
    graph_slot *g = free_slot ? free_slot : lru;
    if (g->exec) (void)cudaGraphExecDestroy(g->exec);
    memset(g, 0, sizeof *g);
    g->n_tok = T;
    return g;
}

/* The whole decode step as a graph: captured on the second step of this batch size
 * (after an eager one has loaded every kernel and let cuBLAS choose), replayed after. */
static int run_decode_graph(cuda_model_t *cm, const step_shape *sh, duet_cuda_err *e)
{
    graph_slot *g = graph_for(cm, sh->T);
    g->last_use = ++cm->clock;
    if (!g->exec && (g->broken || !g->seen)) {
        g->seen++;
        return enqueue_layers(cm, sh, e) != 0 || enqueue_logits(cm, 0, sh->T, e) != 0 ? -1 : 0;
    }
    if (!g->exec) {
        cudaGraph_t graph = NULL;
        duet_cuda_err ce = {0, {0}};
        CUDA_CHECK(e, cudaStreamBeginCapture(cm->stream, cudaStreamCaptureModeThreadLocal));
        cm->capturing = 1;
        int rc = enqueue_layers(cm, sh, &ce) != 0 || enqueue_logits(cm, 0, sh->T, &ce) != 0 ? -1 : 0;
        cm->capturing = 0;
        cudaError_t st = cudaStreamEndCapture(cm->stream, &graph);
        if (rc == 0 && st == cudaSuccess && graph) st = cudaGraphInstantiate(&g->exec, graph, 0);
        if (graph) (void)cudaGraphDestroy(graph);
        if (rc != 0 || st != cudaSuccess || !g->exec) {
            /* a step that cannot be captured still runs: eagerly, from now on */
            (void)cudaGetLastError();
            g->broken = 1;
            g->exec = NULL;
            return enqueue_layers(cm, sh, e) != 0 || enqueue_logits(cm, 0, sh->T, e) != 0 ? -1 : 0;
        }
        cm->stats.graph_captures++;
    }
    CUDA_CHECK(e, cudaGraphLaunch(g->exec, cm->stream));
    cm->stats.graph_replays++;
    return 0;
fail:
    return -1;
}

extern "C" int cuda_model_forward(cuda_model_t *cm, kv_cache_t *kv, const model_seq_batch *b, int n_seqs,
                                  float *logits, char *err, size_t errlen)
{
    if (use_device(cm, err, errlen) != 0) return -1;
    duet_cuda_err e = {0, {0}};
    const cuda_plan *p = &cm->plan;
    const cuda_ws_plan *ws = &p->ws;
    const model_hparams *hp = &p->hp;
    const int bt = p->cfg.block_tokens, maxb = ws->max_blocks, n_vocab = hp->n_vocab;
    int T = 0, R = 0, all_decode = 1, max_new = 1;
    cm->last_rows = -1;
    if (n_seqs < 0 || (n_seqs > 0 && !b)) {
        set_errs(err, errlen, "cuda_model_forward: bad batch");
        return -1;
    }
    if (p->sh.tp_size > 1 && (!cm->coll.allreduce_sum || !cm->coll.gather_vocab)) {
        set_errs(err, errlen, "tp_size %d needs collectives (cuda_model_set_collectives)", p->sh.tp_size);
        return -1;
    }
    if (n_seqs > p->cfg.max_seqs) {
        set_errs(err, errlen, "batch of %d sequences (the GPU plan's limit is %d)", n_seqs, p->cfg.max_seqs);
        return -1;
    }
    if (kv_config_of(kv)->block_tokens != bt) {
        set_errs(err, errlen, "KV cache has %d-token blocks, the GPU pool %d", kv_config_of(kv)->block_tokens, bt);
        return -1;
    }
    /* the pinned buffer is free once the previous upload is done */
    if (cudaEventSynchronize(cm->meta_done) != cudaSuccess) {
        duet_cuda_record(&e, "cudaEventSynchronize(meta_done)", cudaGetErrorString(cudaGetLastError()), __FILE__,
                         __LINE__);
        return from_cuda_err(&e, err, errlen, "cuda_model_forward");
    }
    int32_t *mh = cm->meta_h;
    int32_t *tok = mh + ws->meta.tok, *pos = mh + ws->meta.pos, *slot = mh + ws->meta.slot, *lidx = mh + ws->meta.lidx;
    for (int s = 0; s < n_seqs; s++) {
        const model_seq_batch *sb = &b[s];
        const int len = kv_seq_len(kv, sb->seq);
        if (len < 0) {
            set_errs(err, errlen, "batch entry %d: unknown KV sequence %d", s, sb->seq);
            return -1;
        }
        if (sb->n_tokens < 1 || sb->pos0 < 0 || sb->pos0 + sb->n_tokens > len || !sb->tokens) {
            set_errs(err, errlen, "batch entry %d: tokens [%d, %d) of sequence %d are not reserved in the KV cache "
                     "(it holds %d)", s, sb->pos0, sb->pos0 + sb->n_tokens, sb->seq, len);
            return -1;
        }
        if (T + sb->n_tokens > p->cfg.max_tokens) {
            set_errs(err, errlen, "batch of more than %d tokens (the GPU plan's limit)", p->cfg.max_tokens);
            return -1;
        }
        int nb = 0;
        const int32_t *blocks = kv_seq_blocks(kv, sb->seq, &nb);
        const int need = (sb->pos0 + sb->n_tokens + bt - 1) / bt;
        if (need > maxb) {
            set_errs(err, errlen, "batch entry %d: sequence %d reaches position %d, beyond max_ctx %d of the GPU "
                     "plan", s, sb->seq, sb->pos0 + sb->n_tokens - 1, p->cfg.max_ctx);
            return -1;
        }
        int32_t *tab = mh + ws->meta.blocks + (size_t)s * maxb;
        for (int i = 0; i < need; i++) {
            if (blocks[i] < 0 || blocks[i] >= p->kv.n_blocks) {
                set_errs(err, errlen, "batch entry %d: sequence %d uses KV block %d, beyond the %d blocks of the "
                         "GPU pool (make the kv/ cache with cuda_model_kv_config)", s, sb->seq, blocks[i],
                         p->kv.n_blocks);
                return -1;
            }
            tab[i] = blocks[i];
        }
        cm->n_new[s] = sb->n_tokens;
        cm->pos0[s] = sb->pos0;
        cm->bt_off[s] = s * maxb;
        if (sb->n_tokens > max_new) max_new = sb->n_tokens;
        if (sb->n_tokens != 1 || sb->logits != 1) all_decode = 0;
        for (int i = 0; i < sb->n_tokens; i++, T++) {
            const int32_t id = sb->tokens[i];
            if (id < 0 || id >= n_vocab) {
                set_errs(err, errlen, "token id %d is outside the vocabulary [0, %d)", id, n_vocab);
                return -1;
            }
            const int ps = sb->pos0 + i;
            tok[T] = id;
            pos[T] = ps;
            slot[T] = blocks[ps / bt] * bt + ps % bt;
            if (sb->logits == 2 || (sb->logits == 1 && i == sb->n_tokens - 1)) lidx[R++] = T;
        }
    }
    if (T == 0) return 0;
    if (!logits && R > p->cfg.max_logit_rows) {
        set_errs(err, errlen, "%d logit rows to keep on the device, more than max_logit_rows %d", R,
                 p->cfg.max_logit_rows);
        return -1;
    }
    step_shape sh;
    sh.T = T;
    sh.rows_per_tile = max_new < p->rows_per_tile ? max_new : p->rows_per_tile;
    sh.n_tiles = cuda_attn_tiles(cm->n_new, cm->pos0, cm->bt_off, n_seqs, sh.rows_per_tile,
                                 (cuda_attn_tile *)(mh + ws->meta.tiles), p->cfg.max_tokens);
    if (sh.n_tiles < 0) {
        set_errs(err, errlen, "cuda_model_forward: more attention tiles than tokens (internal error)");
        return -1;
    }
    sh.n_splits = cuda_attn_splits(sh.n_tiles, p->sh.n_head_kv, cm->dev.n_sm, T, ws->split_cap);
    {
        const size_t used = (ws->meta.blocks + (size_t)n_seqs * maxb) * sizeof(int32_t);
        CUDA_CHECK(&e, cudaMemcpyAsync(cm->WS + ws->meta_d, mh, used, cudaMemcpyHostToDevice, cm->stream));
        CUDA_CHECK(&e, cudaEventRecord(cm->meta_done, cm->stream));
    }
    if (all_decode && !p->cfg.no_graphs && p->sh.tp_size == 1 && R <= p->cfg.max_logit_rows) {
        if (run_decode_graph(cm, &sh, &e) != 0) goto fail;
        if (logits)
            CUDA_CHECK(&e, cudaMemcpyAsync(logits, cm->WS + ws->logits, (size_t)R * n_vocab * sizeof(float),
                                           cudaMemcpyDeviceToHost, cm->stream));
    } else {
        if (enqueue_layers(cm, &sh, &e) != 0) goto fail;
        for (int r0 = 0; r0 < R; r0 += p->cfg.max_logit_rows) {
            const int nr = R - r0 < p->cfg.max_logit_rows ? R - r0 : p->cfg.max_logit_rows;
            if (enqueue_logits(cm, r0, nr, &e) != 0) goto fail;
            if (logits)
                CUDA_CHECK(&e, cudaMemcpyAsync(logits + (size_t)r0 * n_vocab, cm->WS + ws->logits,
                                               (size_t)nr * n_vocab * sizeof(float), cudaMemcpyDeviceToHost,
                                               cm->stream));
        }
    }
    CUDA_CHECK(&e, cudaStreamSynchronize(cm->stream));
    cm->stats.forwards++;
    cm->last_rows = R <= p->cfg.max_logit_rows ? R : -1;
    return 0;
fail:
    (void)cudaStreamSynchronize(cm->stream);
    return from_cuda_err(&e, err, errlen, "cuda_model_forward");
}

/* ---- sampling --------------------------------------------------------------------------------- */

extern "C" int cuda_model_sample(cuda_model_t *cm, const cuda_sample_req *reqs, int n, int32_t *tokens, char *err,
                                 size_t errlen)
{
    if (use_device(cm, err, errlen) != 0) return -1;
    duet_cuda_err e = {0, {0}};
    const cuda_plan *p = &cm->plan;
    const int n_vocab = p->hp.n_vocab, R = p->cfg.max_logit_rows;
    const float *logits = (const float *)(cm->WS + p->ws.logits);
    int g = 0;
    if (n < 0 || (n > 0 && (!reqs || !tokens))) {
        set_errs(err, errlen, "cuda_model_sample: bad arguments");
        return -1;
    }
    for (int i = 0; i < n; i++)
        if (!reqs[i].s || reqs[i].row < 0 || reqs[i].row >= cm->last_rows) {
            set_errs(err, errlen, "cuda_model_sample: request %d: row %d is not among the %d logit rows the last "
                     "forward left on the device", i, reqs[i].row, cm->last_rows);
            return -1;
        }
    for (int i = 0; i < n; i++) {
        const sample_params *sp = sampler_params(reqs[i].s);
        const int k = cuda_sample_k(sp, n_vocab);
        int npen = -1;
        if (k >= 0 && g < R)
            npen = cuda_sample_penalty_ids(sp, reqs[i].history, reqs[i].n_history, n_vocab,
                                           cm->pen_h + (size_t)g * CUDA_PEN_MAX, CUDA_PEN_MAX);
        if (npen < 0) {
            tokens[i] = -2; /* on the host, below */
            continue;
        }
        cuda_sample_row *row = &cm->samp_h[g];
        memset(row, 0, sizeof *row);
        row->logit_row = reqs[i].row;
        row->temperature = sp->temperature;
        row->k = k;
        row->top_p = sp->top_p;
        row->min_p = sp->min_p;
        row->repeat_penalty = sp->repeat_penalty;
        row->pen_off = g * CUDA_PEN_MAX;
        row->n_pen = npen;
        memcpy(row->rng, sampler_rng(reqs[i].s)->s, sizeof row->rng);
        cm->samp_map[g++] = i;
    }
    if (g > 0) {
        cuda_sample_row *rows_d = (cuda_sample_row *)(cm->WS + p->ws.samp);
        int32_t *pen_d = (int32_t *)(cm->WS + p->ws.pen), *tok_d = (int32_t *)(cm->WS + p->ws.stok);
        CUDA_CHECK(&e, cudaMemcpyAsync(rows_d, cm->samp_h, (size_t)g * sizeof *rows_d, cudaMemcpyHostToDevice,
                                       cm->stream));
        CUDA_CHECK(&e, cudaMemcpyAsync(pen_d, cm->pen_h, (size_t)g * CUDA_PEN_MAX * sizeof(int32_t),
                                       cudaMemcpyHostToDevice, cm->stream));
        if (cuda_op_sample(logits, n_vocab, g, n_vocab, rows_d, pen_d, tok_d, cm->stream, &e) != 0) goto fail;
        CUDA_CHECK(&e, cudaMemcpyAsync(cm->stok_h, tok_d, (size_t)g * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                       cm->stream));
        CUDA_CHECK(&e, cudaMemcpyAsync(cm->samp_h, rows_d, (size_t)g * sizeof *rows_d, cudaMemcpyDeviceToHost,
                                       cm->stream));
        CUDA_CHECK(&e, cudaStreamSynchronize(cm->stream));
        for (int j = 0; j < g; j++) {
            const int i = cm->samp_map[j];
            tokens[i] = cm->stok_h[j];
            memcpy(sampler_rng(reqs[i].s)->s, cm->samp_h[j].rng, sizeof cm->samp_h[j].rng);
        }
        cm->stats.rows_sampled_gpu += (uint64_t)g;
    }
    for (int i = 0; i < n; i++) {
        if (tokens[i] != -2) continue;
        CUDA_CHECK(&e, cudaMemcpy(cm->row_h, logits + (size_t)reqs[i].row * n_vocab, (size_t)n_vocab * sizeof(float),
                                  cudaMemcpyDeviceToHost));
        tokens[i] = sampler_sample(reqs[i].s, cm->row_h, reqs[i].history, reqs[i].n_history);
        cm->stats.rows_sampled_host++;
    }
    return 0;
fail:
    (void)cudaStreamSynchronize(cm->stream);
    return from_cuda_err(&e, err, errlen, "cuda_model_sample");
}

/* ---- KV pool helpers ------------------------------------------------------------------------- */

extern "C" int cuda_model_kv_copy_block(cuda_model_t *cm, int src, int dst, char *err, size_t errlen)
{
    if (use_device(cm, err, errlen) != 0) return -1;
    duet_cuda_err e = {0, {0}};
    const cuda_kv_plan *kp = &cm->plan.kv;
    const size_t rows = (size_t)kp->n_kv_head * kp->block_tokens, data = rows * kp->head_dim * kp->elt_bytes;
    if (src < 0 || dst < 0 || src >= kp->n_blocks || dst >= kp->n_blocks) {
        set_errs(err, errlen, "cuda_model_kv_copy_block: blocks %d -> %d outside [0, %d)", src, dst, kp->n_blocks);
        return -1;
    }
    if (src == dst) return 0;
    for (int l = 0; l < kp->n_layer; l++) {
        const cuda_kv_layer *L = &cm->kvl[l];
        CUDA_CHECK(&e, cudaMemcpyAsync((uint8_t *)L->k + dst * data, (const uint8_t *)L->k + src * data, data,
                                       cudaMemcpyDeviceToDevice, cm->stream));
        CUDA_CHECK(&e, cudaMemcpyAsync((uint8_t *)L->v + dst * data, (const uint8_t *)L->v + src * data, data,
                                       cudaMemcpyDeviceToDevice, cm->stream));
        if (L->k_scale) {
            CUDA_CHECK(&e, cudaMemcpyAsync(L->k_scale + dst * rows, L->k_scale + src * rows, rows * sizeof(float),
                                           cudaMemcpyDeviceToDevice, cm->stream));
            CUDA_CHECK(&e, cudaMemcpyAsync(L->v_scale + dst * rows, L->v_scale + src * rows, rows * sizeof(float),
                                           cudaMemcpyDeviceToDevice, cm->stream));
        }
    }
    CUDA_CHECK(&e, cudaStreamSynchronize(cm->stream));
    return 0;
fail:
    return from_cuda_err(&e, err, errlen, "cuda_model_kv_copy_block");
}

extern "C" int cuda_model_kv_fill_random(cuda_model_t *cm, float amp, uint64_t seed, char *err, size_t errlen)
{
    if (use_device(cm, err, errlen) != 0) return -1;
    duet_cuda_err e = {0, {0}};
    const cuda_kv_plan *kp = &cm->plan.kv;
    const size_t n = kp->data_bytes / kp->elt_bytes, rows = kp->scale_bytes / sizeof(float);
    for (int l = 0; l < kp->n_layer; l++) {
        const cuda_kv_layer *L = &cm->kvl[l];
        if (cuda_op_fill_random(L->k, kp->type, n, amp, seed + 2 * (uint64_t)l, cm->stream, &e) != 0 ||
            cuda_op_fill_random(L->v, kp->type, n, amp, seed + 2 * (uint64_t)l + 1, cm->stream, &e) != 0)
            goto fail;
        if (L->k_scale && (cuda_op_fill_f32(L->k_scale, rows, 1.0f, cm->stream, &e) != 0 ||
                           cuda_op_fill_f32(L->v_scale, rows, 1.0f, cm->stream, &e) != 0))
            goto fail;
    }
    CUDA_CHECK(&e, cudaStreamSynchronize(cm->stream));
    return 0;
fail:
    return from_cuda_err(&e, err, errlen, "cuda_model_kv_fill_random");
}

/* One stored element as f32 on the host. */
static float host_elt(cuda_kv_type t, const uint8_t *p)
{
    uint16_t h;
    switch (t) {
    case CUDA_KV_F32: {
        float f;
        memcpy(&f, p, 4);
        return f;
    }
    case CUDA_KV_F16: memcpy(&h, p, 2); return fp16_to_f32(h);
    case CUDA_KV_BF16: memcpy(&h, p, 2); return bf16_to_f32(h);
    case CUDA_KV_FP8: {
        __nv_fp8_e4m3 f;
        f.__x = *p;
        return (float)f;
    }
    }
    return 0.0f;
}

extern "C" int cuda_model_kv_read(cuda_model_t *cm, int layer, int block, int slot, float *k, float *v, char *err,
                                  size_t errlen)
{
    if (use_device(cm, err, errlen) != 0) return -1;
    duet_cuda_err e = {0, {0}};
    const cuda_kv_plan *kp = &cm->plan.kv;
    const int hd = kp->head_dim, nkv = kp->n_kv_head;
    const size_t eb = kp->elt_bytes;
    uint8_t buf[256 * 4];
    if (layer < 0 || layer >= kp->n_layer || block < 0 || block >= kp->n_blocks || slot < 0 ||
        slot >= kp->block_tokens || hd > 256) {
        set_errs(err, errlen, "cuda_model_kv_read: layer %d, block %d, slot %d out of range", layer, block, slot);
        return -1;
    }
    for (int kvsel = 0; kvsel < 2; kvsel++) {
        const cuda_kv_layer *L = &cm->kvl[layer];
        const uint8_t *base = (const uint8_t *)(kvsel ? L->v : L->k);
        const float *scales = kvsel ? L->v_scale : L->k_scale;
        float *dst = kvsel ? v : k;
        for (int h = 0; h < nkv; h++) {
            const size_t r = ((size_t)block * nkv + h) * kp->block_tokens + slot;
            float sc = 1.0f;
            CUDA_CHECK(&e, cudaMemcpy(buf, base + r * hd * eb, hd * eb, cudaMemcpyDeviceToHost));
            if (scales) CUDA_CHECK(&e, cudaMemcpy(&sc, scales + r, sizeof sc, cudaMemcpyDeviceToHost));
            for (int d = 0; d < hd; d++) dst[(size_t)h * hd + d] = host_elt(kp->type, buf + d * eb) * sc;
        }
    }
    return 0;
fail:
    return from_cuda_err(&e, err, errlen, "cuda_model_kv_read");
}
