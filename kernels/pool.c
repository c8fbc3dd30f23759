/* kernels/pool.c: spinning thread team with futex sleep; no lock on the hot path.
 *
 * A run publishes (fn, ctx) and bumps the generation counter `gen`; workers wait for
 * gen to change by spinning for spin_us, then sleeping on a futex on gen. Each worker
 * bumps `done` when its share returns; the caller spins on it. The barrier is a
 * counter plus a phase word.
 */
#include "kernels/pool.h"

#include <errno.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define CACHE_LINE 64
/* Busy-wait iterations between checks of the clock (spin) or yields (join, barrier). */
#define SPIN_CHECK 256
#define DEFAULT_SPIN_US 200
/* How long the caller spins for the join, and threads for a barrier, before sleeping. */
#define WAIT_SPIN_US 50

typedef struct {
    pool_t *pool;
    int ith;
} worker_arg;

struct pool {
    int n;                                   /* threads, caller included */
    pthread_t *threads;                      /* [n - 1] workers */
    worker_arg *args;                        /* [n - 1] */
    int n_started;                           /* workers actually created */
    atomic_int spin_us;

    _Alignas(CACHE_LINE) atomic_uint gen;    /* bumped to start a run (futex word) */
    atomic_int n_sleeping;                   /* workers in futex_wait */
    atomic_int stop;                         /* 1: workers exit at the next gen */
    pool_fn fn;                              /* the current run's function and context */
    void *ctx;

    _Alignas(CACHE_LINE) atomic_uint done;   /* workers finished with the current run (futex word) */
    atomic_int join_sleeping;                /* 1 while the caller sleeps on done */
    _Alignas(CACHE_LINE) atomic_int busy;    /* a run is in progress */
    _Alignas(CACHE_LINE) atomic_int bar_count;
    _Alignas(CACHE_LINE) atomic_uint bar_phase; /* futex word */
    atomic_int bar_sleeping;                  /* threads asleep in a barrier */
};

static inline void cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static long futex(atomic_uint *addr, int op, unsigned val)
{
    return syscall(SYS_futex, (unsigned *)addr, op, val, NULL, NULL, 0);
}

static int64_t now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000 + ts.tv_nsec / 1000;
}

/* Spin until *word != old for up to spin_us, then sleep on the futex, announcing it in
 * *sleeping (the waker checks it after changing the word). Returns the new value. */
static unsigned wait_change(atomic_uint *word, unsigned old, atomic_int *sleeping, int spin_us)
{
    int64_t t0 = -1;
    for (;;) {
        for (int i = 0; i < SPIN_CHECK; i++) {
            unsigned v = atomic_load_explicit(word, memory_order_acquire);
            if (v != old) return v;
            cpu_relax();
        }
        int64_t t = now_us();
        if (t0 < 0) t0 = t;
        if (t - t0 >= spin_us) break;
    }
    for (;;) {
        atomic_fetch_add(sleeping, 1);
        if (atomic_load(word) == old) futex(word, FUTEX_WAIT_PRIVATE, old);
        atomic_fetch_sub(sleeping, 1);
        unsigned v = atomic_load_explicit(word, memory_order_acquire);
        if (v != old) return v;
    }
}

/* Wait until gen differs from seen; returns the new value. */
static unsigned wait_gen(pool_t *p, unsigned seen)
{
    return wait_change(&p->gen, seen, &p->n_sleeping, atomic_load_explicit(&p->spin_us, memory_order_relaxed));
}

static void *worker_main(void *arg)
{
    worker_arg *a = arg;
    pool_t *p = a->pool;
    unsigned seen = 0;
    for (;;) {
        seen = wait_gen(p, seen);
        if (atomic_load_explicit(&p->stop, memory_order_acquire)) break;
        p->fn(p->ctx, a->ith, p->n);
        atomic_fetch_add(&p->done, 1); /* seq_cst: ordered before the join_sleeping load */
        if (atomic_load(&p->join_sleeping)) futex(&p->done, FUTEX_WAKE_PRIVATE, 1);
    }
    return NULL;
}

static void start_gen(pool_t *p)
{
    atomic_fetch_add(&p->gen, 1); /* seq_cst: ordered before the n_sleeping load */
    if (atomic_load(&p->n_sleeping) > 0) futex(&p->gen, FUTEX_WAKE_PRIVATE, INT_MAX);
}

int pool_new(int n_threads, pool_t **out)
{
    *out = NULL;
    if (n_threads < 1 || n_threads > 1024) return -1;
    pool_t *p = aligned_alloc(CACHE_LINE, (sizeof *p + CACHE_LINE - 1) / CACHE_LINE * CACHE_LINE);
    if (!p) return -1;
    *p = (pool_t){.n = n_threads};
    atomic_init(&p->spin_us, DEFAULT_SPIN_US);
    atomic_init(&p->gen, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->stop, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->join_sleeping, 0);
    atomic_init(&p->bar_sleeping, 0);
    atomic_init(&p->busy, 0);
    atomic_init(&p->bar_count, 0);
    atomic_init(&p->bar_phase, 0);
    if (n_threads > 1) {
        p->threads = calloc((size_t)n_threads - 1, sizeof *p->threads);
        p->args = calloc((size_t)n_threads - 1, sizeof *p->args);
        if (!p->threads || !p->args) goto fail;
        for (int i = 1; i < n_threads; i++) {
            p->args[i - 1] = (worker_arg){p, i};
            if (pthread_create(&p->threads[i - 1], NULL, worker_main, &p->args[i - 1]) != 0)
                goto fail;
            p->n_started++;
        }
    }
    *out = p;
    return 0;
fail:
    pool_destroy(&p);
    return -1;
}

void pool_destroy(pool_t **self_p)
{
    if (!self_p || !*self_p) return;
    pool_t *p = *self_p;
    if (p->n_started > 0) {
        atomic_store(&p->stop, 1);
        start_gen(p);
        for (int i = 0; i < p->n_started; i++) pthread_join(p->threads[i], NULL);
    }
    free(p->threads);
    free(p->args);
    free(p);
    *self_p = NULL;
}

int pool_size(const pool_t *pool) { return pool ? pool->n : 1; }

void pool_set_spin_us(pool_t *pool, int us)
{
    if (pool) atomic_store(&pool->spin_us, us < 0 ? 0 : us);
}

void pool_run(pool_t *p, pool_fn fn, void *ctx)
{
    if (!p || p->n == 1 || atomic_exchange(&p->busy, 1)) {
        fn(ctx, 0, 1);
        return;
    }
    p->fn = fn;
    p->ctx = ctx;
    atomic_store_explicit(&p->done, 0u, memory_order_relaxed);
    start_gen(p);
    fn(ctx, 0, p->n);
    unsigned want = (unsigned)p->n - 1, d;
    while ((d = atomic_load_explicit(&p->done, memory_order_acquire)) != want)
        wait_change(&p->done, d, &p->join_sleeping, WAIT_SPIN_US);
    atomic_store_explicit(&p->busy, 0, memory_order_release);
}

void pool_barrier(pool_t *p)
{
    if (!p || p->n == 1) return;
    unsigned phase = atomic_load_explicit(&p->bar_phase, memory_order_acquire);
    if (atomic_fetch_add_explicit(&p->bar_count, 1, memory_order_acq_rel) == p->n - 1) {
        atomic_store_explicit(&p->bar_count, 0, memory_order_relaxed);
        atomic_fetch_add(&p->bar_phase, 1); /* seq_cst: ordered before the bar_sleeping load */
        if (atomic_load(&p->bar_sleeping)) futex(&p->bar_phase, FUTEX_WAKE_PRIVATE, INT_MAX);
        return;
    }
    wait_change(&p->bar_phase, phase, &p->bar_sleeping, WAIT_SPIN_US);
}
