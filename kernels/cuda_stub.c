/* kernels/cuda_stub.c: the CUDA backend of a build without CUDA (make CUDA=0).
 *
 * Every function of kernels/cuda.h and kernels/cuda_model.h that needs the GPU fails
 * with one clear message, so programs link and say why they cannot use a GPU. With
 * CUDA=1 (DUET_CUDA=1) this file is empty and the .cu files of kernels/ provide them. The
 * pure host logic (kernels/cuda_plan.c) is the same in both builds.
 */
#include "kernels/cuda.h"
#include "kernels/cuda_model.h"

#if !defined(DUET_CUDA) || !DUET_CUDA

#include <string.h>

#define NO_CUDA "built without CUDA (rebuild with make CUDA=1 where nvcc and the CUDA toolkit are installed)"

static int no_cuda(duet_cuda_err *err, const char *what)
{
    duet_cuda_err_set(err, "%s: %s", what, NO_CUDA);
    return -1;
}

static int no_cuda_s(char *err, size_t errlen, const char *what)
{
    if (err && errlen) {
        duet_cuda_err e = {0};
        no_cuda(&e, what);
        strncpy(err, e.msg, errlen - 1);
        err[errlen - 1] = '\0';
    }
    return -1;
}

int cuda_device_count(int *n, duet_cuda_err *err)
{
    if (n) *n = 0;
    return no_cuda(err, "no CUDA device");
}

int cuda_device_select(int index, cuda_device_info *info, duet_cuda_err *err)
{
    (void)index;
    if (info) memset(info, 0, sizeof *info);
    return no_cuda(err, "no CUDA device");
}

int cuda_arena_new(const char *what, size_t bytes, cuda_arena_t **out, duet_cuda_err *err)
{
    (void)what, (void)bytes;
    if (out) *out = NULL;
    return no_cuda(err, "cuda_arena_new");
}
void cuda_arena_destroy(cuda_arena_t **self_p)
{
    if (self_p) *self_p = NULL;
}
void *cuda_arena_base(const cuda_arena_t *a) { (void)a; return NULL; }
size_t cuda_arena_size(const cuda_arena_t *a) { (void)a; return 0; }

int cuda_mem_alloc(void **dptr, size_t bytes, duet_cuda_err *err)
{
    (void)bytes;
    if (dptr) *dptr = NULL;
    return no_cuda(err, "cuda_mem_alloc");
}
void cuda_mem_free(void *dptr) { (void)dptr; }
int cuda_mem_h2d(void *dst, const void *src, size_t bytes, duet_cuda_err *err)
{
    (void)dst, (void)src, (void)bytes;
    return no_cuda(err, "cuda_mem_h2d");
}
int cuda_mem_d2h(void *dst, const void *src, size_t bytes, duet_cuda_err *err)
{
    (void)dst, (void)src, (void)bytes;
    return no_cuda(err, "cuda_mem_d2h");
}
int cuda_mem_set(void *dst, int byte, size_t bytes, duet_cuda_err *err)
{
    (void)dst, (void)byte, (void)bytes;
    return no_cuda(err, "cuda_mem_set");
}
int cuda_sync(duet_cuda_err *err) { return no_cuda(err, "cuda_sync"); }

int cuda_op_dequant(void *dst, cuda_act out, float *mins, dtype_t t, const void *src,
                    int64_t n_rows, int64_t n_in, int64_t c0, int64_t n_cols, cuda_stream s,
                    duet_cuda_err *err)
{
    (void)dst, (void)out, (void)mins, (void)t, (void)src, (void)n_rows, (void)n_in, (void)c0,
        (void)n_cols, (void)s;
    return no_cuda(err, "cuda_op_dequant");
}

int cuda_op_embed(float *y, dtype_t t, const void *table, int64_t n_vocab, int64_t n_embd,
                  const int32_t *ids, int n_tok, cuda_stream s, duet_cuda_err *err)
{
    (void)y, (void)t, (void)table, (void)n_vocab, (void)n_embd, (void)ids, (void)n_tok, (void)s;
    return no_cuda(err, "cuda_op_embed");
}

int cuda_op_rmsnorm(void *y, cuda_act out, int64_t ldy, const float *x, int64_t ldx,
                    const float *w, int n_rows, int64_t n, float eps, cuda_stream s,
                    duet_cuda_err *err)
{
    (void)y, (void)out, (void)ldy, (void)x, (void)ldx, (void)w, (void)n_rows, (void)n, (void)eps,
        (void)s;
    return no_cuda(err, "cuda_op_rmsnorm");
}

int cuda_op_swiglu(void *y, cuda_act out, int64_t ldy, const float *gate, const float *up,
                   int64_t ld_in, int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err)
{
    (void)y, (void)out, (void)ldy, (void)gate, (void)up, (void)ld_in, (void)n_rows, (void)n,
        (void)s;
    return no_cuda(err, "cuda_op_swiglu");
}

int cuda_op_rope_cache(float *cs, const int32_t *pos, int n_tok, const cuda_rope *r, cuda_stream s,
                       duet_cuda_err *err)
{
    (void)cs, (void)pos, (void)n_tok, (void)r, (void)s;
    return no_cuda(err, "cuda_op_rope_cache");
}

int cuda_op_rope_apply(float *x, int64_t ldx, int n_tok, int n_head, int head_dim, const float *cs,
                       int n_dims, int neox, cuda_stream s, duet_cuda_err *err)
{
    (void)x, (void)ldx, (void)n_tok, (void)n_head, (void)head_dim, (void)cs, (void)n_dims,
        (void)neox, (void)s;
    return no_cuda(err, "cuda_op_rope_apply");
}

int cuda_op_rope_store(float *qkv, int64_t ldqkv, const float *bias, int n_tok, int n_head,
                       const float *cs, int n_dims, int neox, const int32_t *slot,
                       const cuda_kv_layer *kv, cuda_stream s, duet_cuda_err *err)
{
    (void)qkv, (void)ldqkv, (void)bias, (void)n_tok, (void)n_head, (void)cs, (void)n_dims,
        (void)neox, (void)slot, (void)kv, (void)s;
    return no_cuda(err, "cuda_op_rope_store");
}

int cuda_op_attention(const cuda_attn_args *a, cuda_stream s, duet_cuda_err *err)
{
    (void)a, (void)s;
    return no_cuda(err, "cuda_op_attention");
}

int cuda_op_actq(float *xq, float *bsum, cuda_actq_form form, const float *x, int64_t ldx,
                 int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err)
{
    (void)xq, (void)bsum, (void)form, (void)x, (void)ldx, (void)n_rows, (void)n, (void)s;
    return no_cuda(err, "cuda_op_actq");
}

int cuda_blas_new(cuda_stream s, void *ws, size_t ws_bytes, cuda_blas_t **out, duet_cuda_err *err)
{
    (void)s, (void)ws, (void)ws_bytes;
    if (out) *out = NULL;
    return no_cuda(err, "cuda_blas_new");
}
void cuda_blas_destroy(cuda_blas_t **self_p)
{
    if (self_p) *self_p = NULL;
}

int cuda_gemm(cuda_blas_t *b, cuda_act wt, const void *w, int64_t n_out, int64_t n_in,
              const void *x, int64_t ldx, int n_tok, float *y, int64_t ldy, int add,
              duet_cuda_err *err)
{
    (void)b, (void)wt, (void)w, (void)n_out, (void)n_in, (void)x, (void)ldx, (void)n_tok, (void)y,
        (void)ldy, (void)add;
    return no_cuda(err, "cuda_gemm");
}

int cuda_op_add(float *y, const float *x, size_t n, cuda_stream s, duet_cuda_err *err)
{
    (void)y, (void)x, (void)n, (void)s;
    return no_cuda(err, "cuda_op_add");
}

int cuda_op_gather_rows(float *dst, int64_t ldd, const float *src, int64_t lds, const int32_t *idx,
                        int n_rows, int64_t n, cuda_stream s, duet_cuda_err *err)
{
    (void)dst, (void)ldd, (void)src, (void)lds, (void)idx, (void)n_rows, (void)n, (void)s;
    return no_cuda(err, "cuda_op_gather_rows");
}

int cuda_op_fill_random(void *dst, cuda_kv_type t, size_t n, float amp, uint64_t seed,
                        cuda_stream s, duet_cuda_err *err)
{
    (void)dst, (void)t, (void)n, (void)amp, (void)seed, (void)s;
    return no_cuda(err, "cuda_op_fill_random");
}

int cuda_op_fill_f32(float *dst, size_t n, float v, cuda_stream s, duet_cuda_err *err)
{
    (void)dst, (void)n, (void)v, (void)s;
    return no_cuda(err, "cuda_op_fill_f32");
}

int cuda_op_sample(const float *logits, int64_t ld, int n_rows, int n_vocab, cuda_sample_row *rows,
                   const int32_t *pen_ids, int32_t *token, cuda_stream s, duet_cuda_err *err)
{
    (void)logits, (void)ld, (void)n_rows, (void)n_vocab, (void)rows, (void)pen_ids, (void)token,
        (void)s;
    return no_cuda(err, "cuda_op_sample");
}

int cuda_op_kv_pack(const cuda_kv_span *sp, cuda_stream s, duet_cuda_err *err)
{
    (void)sp, (void)s;
    return no_cuda(err, "cuda_op_kv_pack");
}

int cuda_op_kv_unpack(const cuda_kv_span *sp, cuda_stream s, duet_cuda_err *err)
{
    (void)sp, (void)s;
    return no_cuda(err, "cuda_op_kv_unpack");
}

/* ---- cuda_model.h ---------------------------------------------------------------------- */

int cuda_model_new(const model_t *m, const cuda_model_config *cfg, cuda_model_t **out,
                   char *err, size_t errlen)
{
    (void)m, (void)cfg;
    if (out) *out = NULL;
    return no_cuda_s(err, errlen, "no CUDA device");
}
void cuda_model_destroy(cuda_model_t **self_p)
{
    if (self_p) *self_p = NULL;
}
const cuda_device_info *cuda_model_device(const cuda_model_t *cm) { (void)cm; return NULL; }
const cuda_plan *cuda_model_plan(const cuda_model_t *cm) { (void)cm; return NULL; }
kv_config cuda_model_kv_config(const cuda_model_t *cm)
{
    (void)cm;
    kv_config c;
    memset(&c, 0, sizeof c);
    return c;
}
void cuda_model_set_collectives(cuda_model_t *cm, const cuda_collectives *c) { (void)cm, (void)c; }
cuda_stream cuda_model_stream(const cuda_model_t *cm) { (void)cm; return NULL; }
const cuda_kv_layer *cuda_model_kv_layer(const cuda_model_t *cm, int layer)
{
    (void)cm, (void)layer;
    return NULL;
}
void cuda_model_set_progress(cuda_model_t *cm, cuda_layer_fn fn, void *user) { (void)cm, (void)fn, (void)user; }
int cuda_model_forward(cuda_model_t *cm, kv_cache_t *kv, const model_seq_batch *b, int n_seqs,
                       float *logits, char *err, size_t errlen)
{
    (void)cm, (void)kv, (void)b, (void)n_seqs, (void)logits;
    return no_cuda_s(err, errlen, "cuda_model_forward");
}
int cuda_model_sample(cuda_model_t *cm, const cuda_sample_req *reqs, int n, int32_t *tokens,
                      char *err, size_t errlen)
{
    (void)cm, (void)reqs, (void)n, (void)tokens;
    return no_cuda_s(err, errlen, "cuda_model_sample");
}
int cuda_model_kv_copy_block(cuda_model_t *cm, int src, int dst, char *err, size_t errlen)
{
    (void)cm, (void)src, (void)dst;
    return no_cuda_s(err, errlen, "cuda_model_kv_copy_block");
}
int cuda_model_kv_fill_random(cuda_model_t *cm, float amp, uint64_t seed, char *err,
                              size_t errlen)
{
    (void)cm, (void)amp, (void)seed;
    return no_cuda_s(err, errlen, "cuda_model_kv_fill_random");
}
int cuda_model_kv_read(cuda_model_t *cm, int layer, int block, int slot, float *k, float *v,
                       char *err, size_t errlen)
{
    (void)cm, (void)layer, (void)block, (void)slot, (void)k, (void)v;
    return no_cuda_s(err, errlen, "cuda_model_kv_read");
}
void cuda_model_get_stats(const cuda_model_t *cm, cuda_model_stats *out)
{
    (void)cm;
    if (out) memset(out, 0, sizeof *out);
}

#else

typedef int duet_cuda_stub_unused; /* CUDA build: the .cu files of kernels/ provide everything */

#endif
