/* kernels/cuda_gemm.cu: matrix products through cuBLAS (cuda_blas_new, cuda_gemm).
 *
 * GGUF weights are [n_out][n_in] row-major, activations [n_tok][n_in]: in cuBLAS's
 * column-major terms W is an n_in x n_out matrix (ld n_in), so y^T = W^T x^T is one
 * cublasGemmEx with op(A) = T: m = n_out, n = n_tok, k = n_in. bf16 inputs run on the
 * tensor cores with f32 accumulation; f32 inputs in plain f32 (CUBLAS_COMPUTE_32F, the
 * handle's default math mode: no TF32). The handle owns a fixed workspace so that the
 * products can be captured in a CUDA graph.
 */
#include <limits.h>
#include <stdlib.h>

#include "kernels/cuda_common.cuh"

struct cuda_blas {
    cublasHandle_t h;
};

extern "C" int cuda_blas_new(cuda_stream s, void *ws, size_t ws_bytes, cuda_blas_t **out, duet_cuda_err *err)
{
    cuda_blas_t *b = (cuda_blas_t *)calloc(1, sizeof *b);
    *out = NULL;
    if (!b) {
        duet_cuda_err_set(err, "out of host memory for a cuBLAS handle");
        return -1;
    }
    CUBLAS_CHECK(err, cublasCreate(&b->h));
    CUBLAS_CHECK(err, cublasSetStream(b->h, duet_stream(s)));
    if (ws && ws_bytes) CUBLAS_CHECK(err, cublasSetWorkspace(b->h, ws, ws_bytes));
    CUBLAS_CHECK(err, cublasSetMathMode(b->h, CUBLAS_DEFAULT_MATH));
    *out = b;
    return 0;
fail:
    if (b->h) (void)cublasDestroy(b->h);
    free(b);
    return -1;
}

extern "C" void cuda_blas_destroy(cuda_blas_t **self_p)
{
    if (!self_p || !*self_p) return;
    if ((*self_p)->h) (void)cublasDestroy((*self_p)->h);
    free(*self_p);
    *self_p = NULL;
}

extern "C" int cuda_gemm(cuda_blas_t *b, cuda_act wt, const void *w, int64_t n_out, int64_t n_in, const void *x,
                         int64_t ldx, int n_tok, float *y, int64_t ldy, int add, duet_cuda_err *err)
{
    const float alpha = 1.0f, beta = add ? 1.0f : 0.0f;
    const cudaDataType_t t = wt == CUDA_ACT_BF16 ? CUDA_R_16BF : CUDA_R_32F;
    ARG_CHECK(err, b && w && x && y && n_out >= 1 && n_in >= 1 && n_tok >= 0 && ldx >= n_in && ldy >= n_out &&
              n_out <= INT_MAX && n_in <= INT_MAX && ldx <= INT_MAX && ldy <= INT_MAX,
              "cuda_gemm: bad shape (%lld x %lld weights, %d tokens, ldx %lld, ldy %lld)", (long long)n_out,
              (long long)n_in, n_tok, (long long)ldx, (long long)ldy);
    if (n_tok == 0) return 0;
    CUBLAS_CHECK(err, cublasGemmEx(b->h, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, n_tok, (int)n_in, &alpha, w, t,
                                   (int)n_in, x, t, (int)ldx, &beta, y, CUDA_R_32F, (int)ldy, CUBLAS_COMPUTE_32F,
                                   CUBLAS_GEMM_DEFAULT));
    return 0;
fail:
    return -1;
}
