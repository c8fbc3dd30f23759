/* kernels/ops_internal.h: the AVX2 versions of ops (kernels/ops_avx2.c); not public. */
#ifndef DUET_KERNELS_OPS_INTERNAL_H
#define DUET_KERNELS_OPS_INTERNAL_H

#include <stdint.h>

void ops_avx2_swiglu(float *y, const float *gate, const float *up, int64_t n);
/* ops_softmax, same bits. */
void ops_avx2_softmax(float *x, int64_t n);

#endif
