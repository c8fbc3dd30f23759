/* kernels/cpu.h: run-time CPU feature detection for kernel dispatch.
 *
 * The kernels take their AVX2/FMA/F16C paths only when the processor has all three and
 * the environment variable DUET_NO_AVX2 is not set to a non-zero value (tests and
 * benchmarks use it to exercise the portable paths); DUET_NO_AVX512 likewise turns off
 * the AVX-512 VNNI variant of the integer dot products. The decision is made once per
 * process, at the first call, and never changes afterwards.
 */
#ifndef DUET_KERNELS_CPU_H
#define DUET_KERNELS_CPU_H

typedef struct {
    int avx2, fma, f16c;            /* what the processor (and OS) supports */
    int avx512f, avx512bw, avx512vl, avx512vnni;
} cpu_caps;

/* What the processor supports, ignoring DUET_NO_AVX2. */
cpu_caps cpu_detect(void);

/* 1 when the kernels use their AVX2/FMA/F16C code (cached after the first call). */
int cpu_use_avx2(void);

/* 1 when the AVX2 path may also use AVX-512 VNNI on 256-bit vectors (vpdpbusd): the
 * AVX2 path is on, the processor has avx512vnni and avx512vl, and DUET_NO_AVX512 is not
 * set to a non-zero value. Cached like cpu_use_avx2(). */
int cpu_use_vnni(void);

/* "avx2+vnni", "avx2" or "portable": the path the kernels take. */
const char *cpu_path_name(void);

#endif
