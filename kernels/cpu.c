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
    c.avx512vl = __builtin_cpu_supports("avx512vl") != 0;
    c.avx512vnni = __builtin_cpu_supports("avx512vnni") != 0;
#endif
    return c;
}

/* Set once by pthread_once and read-only afterwards. */
static pthread_once_t g_once = PTHREAD_ONCE_INIT;
static int g_use_avx2, g_use_vnni;

static int env_set(const char *name)
{
    const char *env = getenv(name);
    return env && *env && !(env[0] == '0' && env[1] == '\0');
}

static void decide(void)
{
    cpu_caps c = cpu_detect();
    g_use_avx2 = c.avx2 && c.fma && c.f16c && !env_set("DUET_NO_AVX2");
    g_use_vnni = g_use_avx2 && c.avx512vl && c.avx512vnni && !env_set("DUET_NO_AVX512");
}

int cpu_use_avx2(void)
{
    pthread_once(&g_once, decide);
    return g_use_avx2;
}

int cpu_use_vnni(void)
{
    pthread_once(&g_once, decide);
    return g_use_vnni;
}

const char *cpu_path_name(void) { return cpu_use_vnni() ? "avx2+vnni" : cpu_use_avx2() ? "avx2" : "portable"; }
