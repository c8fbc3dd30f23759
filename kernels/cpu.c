/* kernels/cpu.c: CPU feature detection (cpuid through GCC/Clang builtins). */
#include "kernels/cpu.h"

#include <pthread.h>
#include <stdlib.h>

cpu_caps cpu_detect(void)
{
    cpu_caps c = {0};
#if defined(__x86_64__) || defined(__i386__)
    __builtin_cpu_init();
    c.avx2 = __builtin_cpu_supports("avx2") != 0;
    c.fma = __builtin_cpu_supports("fma") != 0;
    c.f16c = __builtin_cpu_supports("f16c") != 0;
    c.avx512f = __builtin_cpu_supports("avx512f") != 0;
    c.avx512bw = __builtin_cpu_supports("avx512bw") != 0;
    c.avx512vnni = __builtin_cpu_supports("avx512vnni") != 0;
#endif
    return c;
}

/* Set once by pthread_once and read-only afterwards. */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_use_avx2;

static void decide(void)
{
    cpu_caps c = cpu_detect();
    const char *env = getenv("DUET_NO_AVX2");
    int off = env && *env && !(env[0] == '0' && env[1] == '\0');
    g_use_avx2 = c.avx2 && c.fma && c.f16c && !off;
}

int cpu_use_avx2(void)
{
    pthread_once(&g_once, decide);
    return g_use_avx2;
}

const char *cpu_path_name(void) { return cpu_use_avx2() ? "avx2" : "portable"; }
