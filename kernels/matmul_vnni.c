/* kernels/matmul_vnni.c: the AVX2 kernels of matmul_avx2.c rebuilt with AVX-512 VNNI
 * (256-bit vpdpbusd replaces maddubs + madd in the integer dot products). Entered only
 * when the processor has avx512vnni and avx512vl (cpu_use_vnni()). */
#if defined(__x86_64__)
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")
#define MM_VNNI 1
#define MM_IMPL_NAME mm_impl_vnni
#include "kernels/matmul_avx2.c"
#else
#include "kernels/matmul_internal.h"
const mm_impl *mm_impl_vnni(void) { return 0; }
#endif
