/* kernels/kv_pack.cuh: KV pack and unpack on the GPU, in kv/kv.h's layouts.
 *
 * The pool on the device has kv/kv.h's layout: per layer a K and a V array of
 * [n_blocks][n_kv_heads][block_tokens][head_dim] elements. Packing one layer's K (or V) of
 * one sequence writes, for each head h of [head0, head0 + n_heads) (local indices), the
 * rows of positions [tok0, tok0 + n_tok) densely: [n_heads][n_tok][head_dim], which is one
 * layer's K (or V) part of kv/kv.h's pack buffer (after its header). Unpacking is the
 * inverse into another pool's blocks. These run on the transfer's stream, so that NCCL can
 * send the dense buffer (issue 7); f32, f16, bf16 (elt_bytes 4, 2) and fp8 e4m3
 * (elt_bytes 1, with its per-row scales moved along: [n_heads][n_tok] floats).
 *
 * The span is kernels/cuda.h's cuda_kv_span; cuda_op_kv_pack/unpack there are the same
 * calls with the stream as a void pointer, for C callers.
 */
#ifndef DUET_KERNELS_KV_PACK_CUH
#define DUET_KERNELS_KV_PACK_CUH

#include <stdint.h>

#include <cuda_runtime.h>

#include "kernels/cuda_common.cuh"

#ifdef __cplusplus
extern "C" {
#endif

typedef cuda_kv_span kv_cuda_span;

/* pool -> dense (pack) or dense -> pool (unpack), on stream. 0, or -1 with err set. */
int kv_cuda_pack(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err);
int kv_cuda_unpack(const kv_cuda_span *s, cudaStream_t stream, duet_cuda_err *err);

#ifdef __cplusplus
}
#endif

#endif
