/* kernels/cuda_common.cuh: what every CUDA operation of duet shares.
 *
 * One family of check macros (STYLE.md, "Errors"): CUDA_CHECK and CUBLAS_CHECK record the
 * failing call's text, file, line and device in a duet_cuda_err and jump to the calling
 * function's `fail` label; the function returns -1 and the caller reads the message.
 * Nothing here exits or aborts.
 */
#ifndef DUET_KERNELS_CUDA_COMMON_CUH
#define DUET_KERNELS_CUDA_COMMON_CUH

#include <stdio.h>

#include <cublas_v2.h>
#include <cuda_runtime.h>

/* The first error of an operation (a later one never overwrites it). */
typedef struct {
    int set;
    char msg[256];
} duet_cuda_err;

static inline void duet_cuda_record(duet_cuda_err *e, const char *call, const char *what,
                                    const char *file, int line)
{
    if (!e || e->set) return;
    int dev = -1;
    cudaGetDevice(&dev);
    snprintf(e->msg, sizeof e->msg, "%s failed: %s (%s:%d, device %d)", call, what, file, line, dev);
    e->set = 1;
}

#define CUDA_CHECK(err, call)                                                           \
    do {                                                                                \
        cudaError_t st_ = (call);                                                       \
        if (st_ != cudaSuccess) {                                                       \
            duet_cuda_record((err), #call, cudaGetErrorString(st_), __FILE__, __LINE__); \
            goto fail;                                                                  \
        }                                                                               \
    } while (0)

#define CUBLAS_CHECK(err, call)                                                          \
    do {                                                                                 \
        cublasStatus_t st_ = (call);                                                     \
        if (st_ != CUBLAS_STATUS_SUCCESS) {                                              \
            duet_cuda_record((err), #call, cublasGetStatusString(st_), __FILE__, __LINE__); \
            goto fail;                                                                   \
        }                                                                                \
    } while (0)

#endif
