/* bench/bench_comm.c: raw bandwidth of the data plane (comm/comm.h) between two ranks on this
 * machine, per message size (64 KiB .. 64 MiB), beside a memcpy of the same bytes:
 *
 *   tcp   two threads of this process, one comm_t each, over tcp://127.0.0.1 and ipc://;
 *   mpi   this program re-executed under `mpirun -np 2` (shared memory: btl self,vader, with
 *         single-copy CMA, or without it where that fails), when mpirun is on PATH and this
 *         process was not launched by it.
 *
 * Rank 0 streams messages to rank 1 with a window of receives (and sends) in flight; the
 * figure is bytes over the time from the start to the last message received (mpi: to rank
 * 1's acknowledgement). GB/s = 1e9 bytes/s; best of 2 runs.
 *
 *   bench_comm          the table
 *   bench_comm quick    fewer bytes per size (a smoke test)
 *   bench_comm --mpi    the mpi side only (run under mpirun -np 2; prints "mpi SIZE GBPS") */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm/comm.h"

#define N_SIZES 6
#define RUNS 2
#define WAIT_MS 60000

static const size_t sizes[N_SIZES] = {64u << 10, 256u << 10, 1u << 20, 4u << 20, 16u << 20,
                                      64u << 20};

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int window_of(size_t size)
{
    size_t w = ((size_t)32 << 20) / size;
    return w < 2 ? 2 : w > 16 ? 16 : (int)w;
}

static int iters_of(size_t size, size_t total)
{
    size_t n = total / size;
    return n < 8 ? 8 : (int)n;
}

/* One side of a stream of iters messages of size bytes. Rank 0 sends from buf, rank 1
 * receives into window slots of buf. 0, or -1 with a message on stderr. */
static int stream(comm_t *c, int rank, unsigned char *buf, size_t size, int iters, int window)
{
    comm_op_t **ops = calloc((size_t)window, sizeof *ops);
    if (!ops) return -1;
    int rc = 0;
    comm_status st = COMM_OK;
    if (rank == 0) {
        for (int i = 0; i < iters && st == COMM_OK; i++) {
            comm_op_t **o = &ops[i % window];
            if (*o) {
                st = comm_wait(c, *o, WAIT_MS, NULL);
                comm_op_free(c, o);
            }
            if (st == COMM_OK) st = comm_isend(c, 1, 1, buf, size, o);
        }
    } else {
        for (int i = 0; i < window && i < iters && st == COMM_OK; i++)
            st = comm_irecv(c, 0, 1, buf + (size_t)i * size, size, &ops[i]);
        for (int i = 0; i < iters && st == COMM_OK; i++) {
            comm_op_t **o = &ops[i % window];
            st = comm_wait(c, *o, WAIT_MS, NULL);
            comm_op_free(c, o);
            if (st == COMM_OK && i + window < iters)
                st = comm_irecv(c, 0, 1, buf + (size_t)(i % window) * size, size, o);
        }
    }
    for (int i = 0; i < window; i++) {
        if (ops[i] && st == COMM_OK) st = comm_wait(c, ops[i], WAIT_MS, NULL);
        comm_cancel(c, &ops[i]);
    }
    if (st != COMM_OK) {
        fprintf(stderr, "bench_comm: rank %d, %zu-byte messages: %s: %s\n", rank, size,
                comm_strerror(st), comm_last_error(c));
        rc = -1;
    }
    free(ops);
    return rc;
}

/* ---- memcpy ---------------------------------------------------------------------------------- */

static double bench_memcpy(size_t size, size_t total)
{
    unsigned char *a = malloc(size), *b = malloc(size);
    if (!a || !b) {
        free(a);
        free(b);
        return 0;
    }
    memset(a, 1, size);
    memset(b, 2, size);
    const int iters = iters_of(size, total);
    double best = 0;
    for (int r = 0; r < RUNS; r++) {
        double t0 = now();
        for (int i = 0; i < iters; i++) {
            memcpy(b, a, size);
            a[i % size] = b[(i * 7) % size]; /* keep the copies */
        }
        double gbs = (double)size * iters / (now() - t0) / 1e9;
        if (gbs > best) best = gbs;
    }
    free(a);
    free(b);
    return best;
}

/* ---- tcp: two threads ------------------------------------------------------------------------ */

typedef struct {
    comm_t *c;
    int rank;
    unsigned char *buf;
    size_t size;
    int iters, window;
    pthread_barrier_t *bar;
    double t1;
    int rc;
} side;

static void *side_main(void *p)
{
    side *s = p;
    pthread_barrier_wait(s->bar);
    s->rc = stream(s->c, s->rank, s->buf, s->size, s->iters, s->window);
    s->t1 = now();
    return NULL;
}

/* GB/s of size-byte messages over tcp (bind: "tcp://127.0.0.1:0" or an ipc:// prefix), or
 * -1. */
static double bench_tcp(const char *bind0, const char *bind1, size_t size, size_t total)
{
    comm_t *c[2] = {NULL, NULL};
    char err[256];
    const char *binds[2] = {bind0, bind1};
    for (int r = 0; r < 2; r++)
        if (comm_tcp_new(binds[r], NULL, &c[r], err, sizeof err) != COMM_OK) {
            fprintf(stderr, "bench_comm: %s\n", err);
            comm_destroy(&c[0]);
            return -1;
        }
    const char *eps[2] = {comm_tcp_endpoint(c[0]), comm_tcp_endpoint(c[1])};
    double best = -1;
    const int window = window_of(size), iters = iters_of(size, total);
    unsigned char *sbuf = malloc(size), *rbuf = malloc(size * (size_t)window);
    if (!sbuf || !rbuf || comm_tcp_set_world(c[0], 0, 2, eps) != COMM_OK ||
        comm_tcp_set_world(c[1], 1, 2, eps) != COMM_OK)
        goto out;
    memset(sbuf, 3, size);
    memset(rbuf, 0, size * (size_t)window);
    for (int r = 0; r <= RUNS; r++) { /* run 0 warms up */
        pthread_barrier_t bar;
        pthread_barrier_init(&bar, NULL, 3);
        side s[2] = {{c[0], 0, sbuf, size, r ? iters : 2, window, &bar, 0, 0},
                     {c[1], 1, rbuf, size, r ? iters : 2, window, &bar, 0, 0}};
        pthread_t th[2];
        for (int k = 0; k < 2; k++) pthread_create(&th[k], NULL, side_main, &s[k]);
        pthread_barrier_wait(&bar);
        double t0 = now();
        for (int k = 0; k < 2; k++) pthread_join(th[k], NULL);
        pthread_barrier_destroy(&bar);
        if (s[0].rc || s[1].rc) {
            best = -1;
            break;
        }
        double gbs = (double)size * s[1].iters / (s[1].t1 - t0) / 1e9;
        if (r && gbs > best) best = gbs;
    }
out:
    comm_destroy(&c[0]);
    comm_destroy(&c[1]);
    free(sbuf);
    free(rbuf);
    return best;
}

/* ---- mpi ----------------------------------------------------------------------------------------- */

/* Under mpirun -np 2: print "mpi SIZE GBPS" per size (rank 0). */
static int mpi_side(size_t total)
{
    comm_t *c = NULL;
    char err[512];
    if (comm_mpi_new(&c, err, sizeof err) != COMM_OK) {
        fprintf(stderr, "bench_comm: %s\n", err);
        return 1;
    }
    const int rank = comm_rank(c);
    int rc = 0;
    if (comm_size(c) != 2) {
        fprintf(stderr, "bench_comm --mpi: needs exactly 2 ranks, not %d\n", comm_size(c));
        rc = 1;
    }
    const int pair[2] = {0, 1};
    comm_group_t *g = NULL;
    if (!rc && comm_group_new(c, pair, 2, &g) != COMM_OK) rc = 1;
    for (int k = 0; k < N_SIZES && !rc; k++) {
        const size_t size = sizes[k];
        const int window = window_of(size), iters = iters_of(size, total);
        unsigned char *buf = calloc(1, size * (size_t)(rank ? window : 1));
        double best = -1;
        for (int r = 0; r <= RUNS && !rc && buf; r++) {
            float sync = 0;
            if (comm_allreduce_sum_f32(g, &sync, 1, WAIT_MS) != COMM_OK) rc = 1;
            double t0 = now();
            if (!rc && stream(c, rank, buf, size, r ? iters : 2, window) != 0) rc = 1;
            /* rank 1's acknowledgement ends the clock */
            if (!rc && comm_allreduce_sum_f32(g, &sync, 1, WAIT_MS) != COMM_OK) rc = 1;
            double gbs = (double)size * iters / (now() - t0) / 1e9;
            if (r && gbs > best) best = gbs;
        }
        if (!buf) rc = 1;
        free(buf);
        if (rank == 0 && !rc) printf("mpi %zu %.3f\n", size, best);
        fflush(stdout);
    }
    comm_group_destroy(&g);
    comm_destroy(&c);
    comm_mpi_finalize();
    return rc;
}

/* Run this program under mpirun -np 2 --mpi (extra: more mpirun options) and collect its
 * figures into gbs[]. 0 or -1. */
static int run_mpi(int quick, const char *extra, double *gbs, char *why, size_t whylen)
{
    char self[4096];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) {
        snprintf(why, whylen, "no /proc/self/exe");
        return -1;
    }
    self[n] = 0;
    if (system("command -v mpirun >/dev/null 2>&1") != 0) {
        snprintf(why, whylen, "mpirun is not on PATH");
        return -1;
    }
    char cmd[4400];
    snprintf(cmd, sizeof cmd,
             "OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 timeout 300 mpirun "
             "--oversubscribe --bind-to none --mca btl self,vader %s -np 2 '%s' --mpi%s 2>&1",
             extra, self, quick ? " quick" : "");
    FILE *p = popen(cmd, "r");
    if (!p) {
        snprintf(why, whylen, "popen failed");
        return -1;
    }
    char line[512];
    int got = 0;
    snprintf(why, whylen, "mpirun printed no figures");
    while (fgets(line, sizeof line, p)) {
        size_t size = 0;
        double v = 0;
        if (sscanf(line, "mpi %zu %lf", &size, &v) == 2) {
            for (int k = 0; k < N_SIZES; k++)
                if (sizes[k] == size) gbs[k] = v;
            got++;
        } else if (!got) {
            snprintf(why, whylen, "%.*s", (int)strcspn(line, "\n"), line);
        }
    }
    int st = pclose(p);
    return got == N_SIZES && st == 0 ? 0 : -1;
}

static void cell(double v)
{
    if (v < 0)
        printf(" n/a |");
    else
        printf(" %.2f |", v);
}

int main(int argc, char **argv)
{
    int quick = 0, mpi = 0;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "quick") == 0)
            quick = 1;
        else if (strcmp(argv[i], "--mpi") == 0)
            mpi = 1;
        else {
            fprintf(stderr, "usage: bench_comm [quick] [--mpi]\n");
            return 2;
        }
    }
    const size_t total = quick ? (size_t)64 << 20 : (size_t)512 << 20;
    if (mpi || comm_mpi_launched()) return mpi_side(total);

    double mpi_gbs[N_SIZES];
    for (int k = 0; k < N_SIZES; k++) mpi_gbs[k] = -1;
    char why[256] = "";
    /* shared memory with single-copy (CMA) first; without it where ptrace is not allowed */
    const char *mech = "vader, CMA";
    int mpi_ok = run_mpi(quick, "", mpi_gbs, why, sizeof why) == 0;
    if (!mpi_ok) {
        mech = "vader, no single-copy";
        for (int k = 0; k < N_SIZES; k++) mpi_gbs[k] = -1;
        mpi_ok = run_mpi(quick, "--mca btl_vader_single_copy_mechanism none", mpi_gbs, why,
                         sizeof why) == 0;
    }

    char dir[64] = "/tmp/duet-bench-comm-XXXXXX";
    if (!mkdtemp(dir)) {
        perror("bench_comm: mkdtemp");
        return 1;
    }
    char ipc0[128], ipc1[128];
    snprintf(ipc0, sizeof ipc0, "ipc://%s/r0", dir);
    snprintf(ipc1, sizeof ipc1, "ipc://%s/r1", dir);

    printf("Two ranks on this machine, rank 0 streaming to rank 1 (window of 2-16 messages in "
           "flight); GB/s, best of %d.\n\n", RUNS);
    printf("| message | memcpy | tcp (tcp://127.0.0.1) | tcp (ipc://) | mpi (%s) |\n", mech);
    printf("|---:|---:|---:|---:|---:|\n");
    for (int k = 0; k < N_SIZES; k++) {
        const size_t s = sizes[k];
        if (s >= (1u << 20))
            printf("| %zu MiB |", s >> 20);
        else
            printf("| %zu KiB |", s >> 10);
        cell(bench_memcpy(s, total));
        cell(bench_tcp("tcp://127.0.0.1:0", "tcp://127.0.0.1:0", s, total));
        cell(bench_tcp(ipc0, ipc1, s, total));
        cell(mpi_gbs[k]);
        printf("\n");
        fflush(stdout);
    }
    if (!mpi_ok) printf("\nmpi: n/a (%s)\n", why);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "bench_comm: could not remove %s\n", dir);
    return 0;
}
