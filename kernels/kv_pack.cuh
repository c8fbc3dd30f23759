/* kernels/kv_pack.cuh: KV pack and unpack on the GPU, in kv/kv.h's layouts.
 *
 * The pool on the device has kv/kv.h's layout: per layer a K and a V array of
 * [n_blocks][n_kv_heads][block_tokens][head_dim] elements. Packing one layer's K (or V) of
 * one sequence writes, for each head h of [head0, head0 + n_heads) (local indices), the
 * rows of positions [tok0, tok0 + n_tok) densely: [n_heads][n_tok][head_dim], which is one
 * layer's K (or V) part of kv/kv.h's pack buffer (after its header). Unpacking is the
 * inverse into another pool's blocks. These run on the transfer's stream, so that NCCL can
 * send the dense buffer (issue 7); f16, bf16 and f32 elements (elt_bytes 2 or 4).
 */
#ifndef DUET_KERNELS_KV_PACK_CUH
#define DUET_KERNELS_KV_PACK_CUH

#include <stdint.h>

#include <cuda_runtime.h>

#include "kernels/cuda_common.cuh"

#ifdef __cplusplus
extern "C" {
#endif

/* One layer's K or V of one sequence between the paged pool and a dense buffer. */
typedef struct {
    void *pool;             /* device: the layer's K (or V) array */
    const int32_t *blocks;  /* device: the sequence's block table */
    int n_kv_heads, block_tokens, head_dim, elt_bytes;
    int head0, n_heads;     /* local heads of the pool */
    int tok0, n_tok;        /* positions */
    void *dense;            /* device: [n_heads][n_tok][head_dim] elements */
} kv_cuda_span;

/* pool -> dense (pack) or dense -> pool (unpack), on stream. 0, or -1 with err set. */
int kv_cuda_pack(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err);
int kv_cuda_unpack(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err);

#ifdef __cplusplus
}
#endif

#endif
