/* tests/tools/comm_mpi_check.c: the mpi backend of comm/comm.h checked under mpirun; run by
 * tests/test_comm_mpi.c as
 *
 *   mpirun --allow-run-as-root --oversubscribe -np N build/tools/comm_mpi_check
 *
 * Every rank runs every check (ordering of one (source, tag), many tags interleaved, a
 * 64 MiB message, the INT_MAX refusal, truncation, discard of queued and later messages
 * (rendezvous-sized, so a sender only finishes if they were drained), cancel of a receive,
 * all-reduce / broadcast / all-gather bit-exact against the sum in list order over the
 * world and over pairs, and a collective that times out) and prints its failures on
 * stderr; rank 0 then prints one line:
 *
 *   comm_mpi_check: np=N ok checks=K        (or: comm_mpi_check: np=N FAILED failures=F)
 *
 * and every rank exits 0 when all passed, 1 otherwise. */
#include <limits.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#include <mpi.h>

#include "comm/comm.h"

#define WAIT_MS 30000

typedef struct {
    comm_t *c;
    int rank, n;
    int checks, failures;
} ctx;

static void check(ctx *x, int ok, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void check(ctx *x, int ok, const char *fmt, ...)
{
    x->checks++;
    if (ok) return;
    x->failures++;
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "comm_mpi_check rank %d: FAIL %s (last error: %s)\n", x->rank, msg,
            comm_last_error(x->c));
}

static unsigned char pat(int a, int b, size_t i) { return (unsigned char)(a * 31 + b * 7 + i * 13 + (i >> 9)); }

static int wait_len(ctx *x, comm_op_t **op, size_t want, const char *what)
{
    size_t len = 0;
    comm_status st = comm_wait(x->c, *op, WAIT_MS, &len);
    check(x, st == COMM_OK && len == want, "%s: %s, %zu bytes (want %zu)", what, comm_strerror(st),
          len, want);
    if (st == COMM_ERR_TIMEOUT)
        comm_cancel(x->c, op);
    else
        comm_op_free(x->c, op);
    return st == COMM_OK && len == want;
}

static void barrier(void) { MPI_Barrier(MPI_COMM_WORLD); }

/* ---- point to point ----------------------------------------------------------------------- */

#define N_ORDER 200

static size_t order_len(int i) { return i % 10 == 3 ? (size_t)(100000 + i) : (size_t)(i * 37 % 3000); }

/* Every rank sends N_ORDER messages to the next one on one tag; half the receives are posted
 * before the sends, half after. */
static void check_order(ctx *x)
{
    const int to = (x->rank + 1) % x->n, from = (x->rank + x->n - 1) % x->n;
    unsigned char **sb = calloc(N_ORDER, sizeof *sb), **rb = calloc(N_ORDER, sizeof *rb);
    comm_op_t **so = calloc(N_ORDER, sizeof *so), **ro = calloc(N_ORDER, sizeof *ro);
    for (int i = 0; i < N_ORDER; i++) {
        sb[i] = malloc(order_len(i) + 1);
        rb[i] = malloc(200000);
        for (size_t j = 0; j < order_len(i); j++) sb[i][j] = pat(i, x->rank, j);
    }
    for (int i = 0; i < N_ORDER / 2; i++)
        check(x, comm_irecv(x->c, from, 7, rb[i], 200000, &ro[i]) == COMM_OK, "irecv %d", i);
    for (int i = 0; i < N_ORDER; i++)
        check(x, comm_isend(x->c, to, 7, sb[i], order_len(i), &so[i]) == COMM_OK, "isend %d", i);
    for (int i = N_ORDER / 2; i < N_ORDER; i++)
        check(x, comm_irecv(x->c, from, 7, rb[i], 200000, &ro[i]) == COMM_OK, "irecv %d", i);
    for (int i = N_ORDER - 1; i >= 0; i--) {
        if (!ro[i] || !wait_len(x, &ro[i], order_len(i), "order receive")) continue;
        int same = 1;
        for (size_t j = 0; j < order_len(i) && same; j++) same = rb[i][j] == pat(i, from, j);
        check(x, same, "order: message %d has the wrong bytes", i);
    }
    for (int i = 0; i < N_ORDER; i++) {
        if (so[i]) wait_len(x, &so[i], order_len(i), "order send");
        free(sb[i]);
        free(rb[i]);
    }
    free(sb);
    free(rb);
    free(so);
    free(ro);
    barrier();
}

#define MT_TAGS 20
#define MT_K 3

static void check_tags(ctx *x)
{
    const int to = (x->rank + 1) % x->n, from = (x->rank + x->n - 1) % x->n;
    enum { L = 48 };
    static unsigned char sb[MT_TAGS][MT_K][L], rb[MT_TAGS][MT_K][L];
    comm_op_t *so[MT_TAGS][MT_K] = {{0}}, *ro[MT_TAGS][MT_K] = {{0}};
    for (int k = 0; k < MT_K; k++)
        for (int t = 0; t < MT_TAGS; t++) {
            for (size_t j = 0; j < L; j++) sb[t][k][j] = pat(t * 10 + k, x->rank, j);
            check(x, comm_isend(x->c, to, 1000 + (uint64_t)t * 0x100000000ull, sb[t][k], L,
                                &so[t][k]) == COMM_OK, "tags isend");
        }
    for (int t = MT_TAGS - 1; t >= 0; t--)
        for (int k = 0; k < MT_K; k++)
            check(x, comm_irecv(x->c, from, 1000 + (uint64_t)t * 0x100000000ull, rb[t][k], L,
                                &ro[t][k]) == COMM_OK, "tags irecv");
    for (int t = 0; t < MT_TAGS; t++)
        for (int k = 0; k < MT_K; k++) {
            if (ro[t][k] && wait_len(x, &ro[t][k], L, "tags receive")) {
                int same = 1;
                for (size_t j = 0; j < L && same; j++) same = rb[t][k][j] == pat(t * 10 + k, from, j);
                check(x, same, "tags: tag %d message %d has the wrong bytes", t, k);
            }
            if (so[t][k]) wait_len(x, &so[t][k], L, "tags send");
        }
    barrier();
}

static void check_large(ctx *x)
{
    const size_t big = (size_t)64 << 20;
    if (x->rank <= 1) {
        unsigned char *b = malloc(big);
        comm_op_t *op = NULL;
        if (x->rank == 0) {
            for (size_t j = 0; j < big; j++) b[j] = pat(5, 6, j);
            check(x, comm_isend(x->c, 1, 3, b, big, &op) == COMM_OK, "large isend");
            if (op) wait_len(x, &op, big, "large send");
            /* more than INT_MAX bytes: refused before touching the buffer */
            comm_status st = comm_isend(x->c, 1, 4, b, (size_t)INT_MAX + 1, &op);
            check(x, st == COMM_ERR_INVAL && strstr(comm_last_error(x->c), "INT_MAX"),
                  "a message above INT_MAX: %s", comm_strerror(st));
        } else {
            memset(b, 0, big);
            check(x, comm_irecv(x->c, 0, 3, b, big, &op) == COMM_OK, "large irecv");
            if (op && wait_len(x, &op, big, "large receive")) {
                size_t bad = big;
                for (size_t j = 0; j < big && bad == big; j++)
                    if (b[j] != pat(5, 6, j)) bad = j;
                check(x, bad == big, "large: byte %zu is wrong", bad);
            }
        }
        free(b);
    }
    barrier();
}

static void check_trunc(ctx *x)
{
    if (x->rank <= 1) {
        char big[100], small[50];
        memset(big, 'b', sizeof big);
        comm_op_t *a = NULL, *b = NULL;
        if (x->rank == 0) {
            check(x, comm_isend(x->c, 1, 5, big, sizeof big, &a) == COMM_OK, "trunc isend");
            check(x, comm_isend(x->c, 1, 5, "ok", 3, &b) == COMM_OK, "trunc isend 2");
            if (a) wait_len(x, &a, sizeof big, "trunc send");
            if (b) wait_len(x, &b, 3, "trunc send 2");
        } else {
            check(x, comm_irecv(x->c, 0, 5, small, sizeof small, &a) == COMM_OK, "trunc irecv");
            comm_status st = a ? comm_wait(x->c, a, WAIT_MS, NULL) : COMM_ERR_INVAL;
            check(x, st == COMM_ERR_TRUNC && strstr(comm_last_error(x->c), "peer 0 tag 5"),
                  "trunc: %s", comm_strerror(st));
            comm_op_free(x->c, &a);
            check(x, comm_irecv(x->c, 0, 5, small, sizeof small, &b) == COMM_OK, "trunc irecv 2");
            if (b && wait_len(x, &b, 3, "trunc receive 2"))
                check(x, strcmp(small, "ok") == 0, "trunc: the next message is '%s'", small);
        }
    }
    barrier();
}

/* Rank 1 sends rendezvous-sized messages on tag 9 that rank 0 discards: rank 1's sends only
 * finish if rank 0 drains them. */
static void check_discard(ctx *x)
{
    if (x->rank <= 1) {
        const size_t n = (size_t)4 << 20;
        unsigned char *b = calloc(1, n);
        char m[8];
        comm_op_t *s[3] = {0}, *r = NULL;
        if (x->rank == 1) {
            for (int i = 0; i < 2; i++)
                check(x, comm_isend(x->c, 0, 9, b, n, &s[i]) == COMM_OK, "discard isend");
            check(x, comm_isend(x->c, 0, 10, "mark", 5, &r) == COMM_OK, "discard mark");
            if (r) wait_len(x, &r, 5, "discard mark send");
            check(x, comm_irecv(x->c, 0, 11, m, sizeof m, &r) == COMM_OK, "discard ack irecv");
            if (r) wait_len(x, &r, 4, "discard ack");
            check(x, comm_isend(x->c, 0, 9, b, n, &s[2]) == COMM_OK, "discard isend later");
            for (int i = 0; i < 3; i++)
                if (s[i]) wait_len(x, &s[i], n, "discarded send (drained by the receiver)");
            check(x, comm_isend(x->c, 0, 12, "done", 5, &r) == COMM_OK, "discard done");
            if (r) wait_len(x, &r, 5, "discard done send");
        } else {
            check(x, comm_irecv(x->c, 1, 10, m, sizeof m, &r) == COMM_OK, "discard mark irecv");
            if (r) wait_len(x, &r, 5, "discard mark");
            comm_discard(x->c, 1, 9);
            check(x, comm_isend(x->c, 1, 11, "ack", 4, &s[0]) == COMM_OK, "discard ack");
            check(x, comm_irecv(x->c, 1, 12, m, sizeof m, &r) == COMM_OK, "discard done irecv");
            if (r) wait_len(x, &r, 5, "discard done"); /* comm_wait's progress drains tag 9 */
            if (s[0]) wait_len(x, &s[0], 4, "discard ack send");
            comm_status st = comm_irecv(x->c, 1, 9, b, n, &r);
            check(x, st == COMM_ERR_INVAL && !r, "a receive on a discarded pair: %s",
                  comm_strerror(st));
        }
        free(b);
    }
    barrier();
}

/* Rank 0 cancels a receive, posts another: it gets the second message. */
static void check_cancel(ctx *x)
{
    if (x->rank <= 1) {
        char got[8] = "";
        comm_op_t *a = NULL, *b = NULL;
        if (x->rank == 0) {
            check(x, comm_irecv(x->c, 1, 20, got, sizeof got, &a) == COMM_OK, "cancel irecv");
            comm_cancel(x->c, &a);
            check(x, !a, "cancel NULLs the op");
            check(x, comm_irecv(x->c, 1, 20, got, sizeof got, &b) == COMM_OK, "cancel irecv 2");
            check(x, comm_isend(x->c, 1, 21, "go", 3, &a) == COMM_OK, "cancel go");
            if (a) wait_len(x, &a, 3, "cancel go send");
            if (b && wait_len(x, &b, 2, "the receive after a cancelled one"))
                check(x, strcmp(got, "B") == 0, "cancel: got '%s', not B", got);
        } else {
            check(x, comm_irecv(x->c, 0, 21, got, sizeof got, &a) == COMM_OK, "cancel go irecv");
            if (a) wait_len(x, &a, 3, "cancel go");
            check(x, comm_isend(x->c, 0, 20, "A", 2, &a) == COMM_OK, "cancel A");
            check(x, comm_isend(x->c, 0, 20, "B", 2, &b) == COMM_OK, "cancel B");
            if (a) wait_len(x, &a, 2, "cancel A send");
            if (b) wait_len(x, &b, 2, "cancel B send");
        }
    }
    barrier();
}

/* ---- collectives ---------------------------------------------------------------------------- */

#define COLL_COUNT 40000

static float coll_val(int rank, int round, size_t j)
{
    uint32_t v = (uint32_t)(rank * 7919 + round * 104729 + (int)j * 31337) * 2654435761u;
    float mant = (float)(v >> 8) / (float)(1 << 24) - 0.5f;
    int e = (int)((v >> 3) % 24) - 12;
    return ldexpf(mant, e);
}

static void check_collectives(ctx *x)
{
    const int n = x->n;
    int *list = malloc((size_t)n * sizeof *list);
    for (int i = 0; i < n; i++) list[i] = n - 1 - i; /* reversed: index 0 is the last rank */
    comm_group_t *g = NULL;
    comm_status st = comm_group_new(x->c, list, n, &g);
    check(x, st == COMM_OK, "group_new: %s", comm_strerror(st));
    if (!g) {
        free(list);
        return;
    }
    const int idx = comm_group_index(g);
    check(x, idx == n - 1 - x->rank, "group index %d", idx);
    float *buf = malloc(COLL_COUNT * sizeof *buf), *ref = malloc(COLL_COUNT * sizeof *ref);
    unsigned char *gath = malloc((size_t)n * 777), bc[5000], mine[777];
    for (int round = 0; round < 3; round++) {
        for (size_t j = 0; j < COLL_COUNT; j++) {
            buf[j] = coll_val(x->rank, round, j);
            float s = coll_val(list[0], round, j);
            for (int i = 1; i < n; i++) s += coll_val(list[i], round, j);
            ref[j] = s;
        }
        st = comm_allreduce_sum_f32(g, buf, COLL_COUNT, WAIT_MS);
        check(x, st == COMM_OK, "allreduce: %s", comm_strerror(st));
        check(x, memcmp(buf, ref, COLL_COUNT * sizeof *buf) == 0,
              "round %d: allreduce differs from the sum in list order", round);
        const int root = round % n;
        for (size_t j = 0; j < sizeof bc; j++) bc[j] = idx == root ? pat(round, 2, j) : 0;
        st = comm_broadcast(g, root, bc, sizeof bc, WAIT_MS);
        check(x, st == COMM_OK, "broadcast: %s", comm_strerror(st));
        int same = 1;
        for (size_t j = 0; j < sizeof bc && same; j++) same = bc[j] == pat(round, 2, j);
        check(x, same, "broadcast from index %d: wrong bytes", root);
        for (size_t j = 0; j < sizeof mine; j++) mine[j] = pat(idx, round, j);
        st = comm_allgather(g, mine, sizeof mine, gath, WAIT_MS);
        check(x, st == COMM_OK, "allgather: %s", comm_strerror(st));
        same = 1;
        for (int i = 0; i < n; i++)
            for (size_t j = 0; j < sizeof mine && same; j++) same = gath[(size_t)i * 777 + j] == pat(i, round, j);
        check(x, same, "allgather: wrong bytes");
    }
    /* pairs at once: {0, 2} and {3, 1} (4 ranks) */
    if (n == 4) {
        comm_group_t *p = NULL;
        int pair[2] = {x->rank % 2 == 0 ? 0 : 3, x->rank % 2 == 0 ? 2 : 1};
        st = comm_group_new(x->c, pair, 2, &p);
        check(x, st == COMM_OK, "pair group: %s", comm_strerror(st));
        float v[2] = {(float)x->rank, 0.25f};
        if (p) st = comm_allreduce_sum_f32(p, v, 2, WAIT_MS);
        check(x, st == COMM_OK && v[0] == (float)(pair[0] + pair[1]) && v[1] == 0.5f,
              "pair allreduce: %s, %g", comm_strerror(st), v[0]);
        comm_group_destroy(&p);
    }
    free(buf);
    free(ref);
    free(gath);
    comm_group_destroy(&g);
    free(list);
    barrier();
}

/* Rank 0 broadcasts on a pair group whose root (rank 1) comes late: COMM_ERR_TIMEOUT, and the
 * group is broken. Rank 1 then runs its side, which lets MPI finish rank 0's. */
static void check_coll_timeout(ctx *x)
{
    if (x->rank <= 1) {
        const int pair[2] = {0, 1};
        comm_group_t *g = NULL;
        comm_status st = comm_group_new(x->c, pair, 2, &g);
        check(x, st == COMM_OK, "timeout group: %s", comm_strerror(st));
        char b[64] = "root";
        if (g && x->rank == 0) {
            st = comm_broadcast(g, 1, b, sizeof b, 100);
            check(x, st == COMM_ERR_TIMEOUT, "a broadcast without its root: %s", comm_strerror(st));
            st = comm_broadcast(g, 1, b, sizeof b, 100);
            check(x, st == COMM_ERR_PEER && strstr(comm_last_error(x->c), "broken"),
                  "a broken group: %s", comm_strerror(st));
        }
        barrier();
        if (g && x->rank == 1) {
            st = comm_broadcast(g, 1, b, sizeof b, WAIT_MS);
            check(x, st == COMM_OK, "the late root: %s", comm_strerror(st));
        }
        comm_group_destroy(&g);
    } else {
        barrier();
    }
    barrier();
    /* rank 0: progress lets MPI finish the abandoned broadcast (its buffers are freed) */
    for (int i = 0; i < 100; i++) comm_progress(x->c);
}

int main(void)
{
    ctx x = {0};
    char err[512];
    if (!comm_mpi_launched()) {
        fprintf(stderr, "comm_mpi_check: run me under mpirun\n");
        return 2;
    }
    comm_status st = comm_mpi_new(&x.c, err, sizeof err);
    if (st != COMM_OK) {
        fprintf(stderr, "comm_mpi_check: %s\n", err);
        return 1;
    }
    x.rank = comm_rank(x.c);
    x.n = comm_size(x.c);
    check(&x, comm_backend_of(x.c) == COMM_BACKEND_MPI, "backend");
    check(&x, comm_zsock(x.c) == NULL, "no zsock");
    const char *er = getenv("OMPI_COMM_WORLD_RANK");
    check(&x, er && atoi(er) == x.rank, "rank %d, OMPI_COMM_WORLD_RANK %s", x.rank, er ? er : "-");
    if (x.n < 2) {
        fprintf(stderr, "comm_mpi_check: needs at least 2 ranks\n");
        comm_destroy(&x.c);
        comm_mpi_finalize();
        return 2;
    }
    check_order(&x);
    check_tags(&x);
    check_large(&x);
    check_trunc(&x);
    check_discard(&x);
    check_cancel(&x);
    check_collectives(&x);
    check_coll_timeout(&x);
    int fails = x.failures, total = 0, checks = 0;
    MPI_Allreduce(&fails, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(&x.checks, &checks, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (x.rank == 0) {
        if (total == 0)
            printf("comm_mpi_check: np=%d ok checks=%d\n", x.n, checks);
        else
            printf("comm_mpi_check: np=%d FAILED failures=%d checks=%d\n", x.n, total, checks);
        fflush(stdout);
    }
    comm_destroy(&x.c);
    comm_mpi_finalize();
    return total == 0 ? 0 : 1;
}
