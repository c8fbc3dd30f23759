/* kernels/pool.h: a fixed team of threads for the CPU kernels.
 *
 * pool_run() runs one function on every thread of the team (the caller is thread 0)
 * and returns when all are done. Workers spin for a short while after each run (200 µs
 * by default, pool_set_spin_us), so a run that follows soon after costs well under a
 * microsecond to dispatch and join (0.12 µs measured on 2 threads); idle workers then
 * sleep on a futex and use no CPU. The hot path takes no lock. A join or barrier that
 * waits longer than 50 µs sleeps too, so an oversubscribed machine still makes progress.
 *
 * Inside a running function, pool_barrier() synchronizes the team, so a caller can
 * fuse a whole sequence of dependent steps (a transformer layer) into one run.
 * A pool serves one caller at a time; pool_run() called while the pool is busy (for
 * instance from inside a running function) runs fn on the calling thread alone.
 */
#ifndef DUET_KERNELS_POOL_H
#define DUET_KERNELS_POOL_H

typedef struct pool pool_t;

/* The work of one thread: ith in [0, nth). */
typedef void (*pool_fn)(void *ctx, int ith, int nth);

/* A team of n_threads (>= 1) threads counting the caller: n_threads - 1 workers are
 * started. Returns 0, or -1 (bad count, or threads could not be created). */
int pool_new(int n_threads, pool_t **out);
/* Stops and joins the workers; NULLs *self_p; safe on NULL and twice. */
void pool_destroy(pool_t **self_p);

/* Threads in the team; 1 for a NULL pool. */
int pool_size(const pool_t *pool);

/* fn(ctx, ith, nth) on every thread; returns when all have returned. A NULL pool runs
 * fn(ctx, 0, 1) on the caller. Writes made by any thread are visible to the caller
 * on return. */
void pool_run(pool_t *pool, pool_fn fn, void *ctx);

/* Inside fn: returns once all nth threads of the current run have called it; writes
 * before the barrier are visible to every thread after it. Every thread must call it
 * the same number of times. No-op for a NULL pool or a one-thread run. */
void pool_barrier(pool_t *pool);

/* How long (microseconds) an idle worker spins before it sleeps; default 200. */
void pool_set_spin_us(pool_t *pool, int us);

#endif
