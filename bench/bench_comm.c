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
 * Then the KV transfer itself (worker/xfer.h, as duet-worker runs it): a request's KV in a
 * model's layout (f16, 16-token blocks) from rank 0's pool to rank 1's: rank 1 reserves
 * blocks and posts its receives, rank 0 packs and sends every layer back to back (no
 * forward pass in between, so this is the engine's ceiling), rank 1 unpacks each layer
 * into its blocks as it lands; the clock runs from the start to rank 1's XFER_EV_RECEIVED.
 * Checksums are on, as in the default build. Beside it, the raw stream of the same
 * messages (one per layer, same size, same count) on the same backend.
 *
 *   bench_comm          the table
 *   bench_comm quick    fewer bytes per size (a smoke test)
 *   bench_comm --mpi    the mpi side only (run under mpirun -np 2; prints "mpi SIZE GBPS") */
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "comm/comm.h"
#include "kv/kv.h"
#include "worker/xfer.h"

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

/* Two tcp ranks of one world in this process (bind: "tcp://127.0.0.1:0" or an ipc://
 * prefix) into c[2]. 0, or -1 with a message on stderr and nothing kept. */
static int tcp_pair(const char *bind0, const char *bind1, comm_t *c[2])
{
    char err[256];
    const char *binds[2] = {bind0, bind1};
    c[0] = c[1] = NULL;
    for (int r = 0; r < 2; r++)
        if (comm_tcp_new(binds[r], NULL, &c[r], err, sizeof err) != COMM_OK) {
            fprintf(stderr, "bench_comm: %s\n", err);
            comm_destroy(&c[0]);
            return -1;
        }
    const char *eps[2] = {comm_tcp_endpoint(c[0]), comm_tcp_endpoint(c[1])};
    if (comm_tcp_set_world(c[0], 0, 2, eps) != COMM_OK || comm_tcp_set_world(c[1], 1, 2, eps) != COMM_OK) {
        fprintf(stderr, "bench_comm: set_world: %s\n", comm_last_error(c[0]));
        comm_destroy(&c[0]);
        comm_destroy(&c[1]);
        return -1;
    }
    return 0;
}

/* GB/s of size-byte messages over tcp (bind: "tcp://127.0.0.1:0" or an ipc:// prefix), or
 * -1. */
static double bench_tcp(const char *bind0, const char *bind1, size_t size, size_t total)
{
    comm_t *c[2];
    if (tcp_pair(bind0, bind1, c) != 0) return -1;
    double best = -1;
    const int window = window_of(size), iters = iters_of(size, total);
    unsigned char *sbuf = malloc(size), *rbuf = malloc(size * (size_t)window);
    if (!sbuf || !rbuf) goto out;
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


/* ---- the KV transfer (worker/xfer) ------------------------------------------------------- */

typedef struct {
    const char *name;
    int n_layers, n_kv_heads, head_dim, n_tokens;
} kv_layout;

#define N_LAYOUTS 2
static const kv_layout layouts[N_LAYOUTS] = {
    {"SmolLM2-135M (30 layers, 3 KV heads of 64)", 30, 3, 64, 512},
    {"Llama-3-8B (32 layers, 8 KV heads of 128)", 32, 8, 128, 2048},
};

/* Bytes of one layer's message (a kv_pack buffer of the layer's K and V, + the checksum). */
static size_t kv_msg_bytes(const kv_layout *l)
{
    return sizeof(kv_pack_header) + (size_t)2 * (size_t)l->n_kv_heads * (size_t)l->head_dim *
                                         (size_t)l->n_tokens * 2 + sizeof(uint64_t);
}

static int kv_reps(const kv_layout *l, int quick)
{
    size_t total = (size_t)l->n_layers * kv_msg_bytes(l);
    size_t want = quick ? (size_t)64 << 20 : (size_t)512 << 20;
    size_t n = want / total;
    return n < 3 ? 3 : n > 40 ? 40 : (int)n;
}

/* A barrier of both sides that also says whether either side failed (failed: this side's
 * state): nonzero when one did, so that a failure on one side never leaves the other
 * waiting at the next barrier. */
typedef int (*sync_fn)(void *user, int failed);

static double wall_ms(void) { return now() * 1e3; }

/* One side of reps KV transfers of layout l between ranks 0 (sends) and 1 (receives); sync
 * is a barrier of both sides. Rank 1 returns the payload GB/s of the best transfer (from the
 * barrier before it to its reception), rank 0 returns 0; -1 with a message on stderr. */
static double kv_side(comm_t *c, int rank, const kv_layout *l, int reps, sync_fn sync, void *user)
{
    kv_config kc = {.n_layers = l->n_layers, .n_kv_heads = l->n_kv_heads, .head_dim = l->head_dim,
                    .block_tokens = 16, .dtype = DTYPE_F16};
    const int blocks = (l->n_tokens + 1 + 15) / 16;
    kc.budget_bytes = kv_block_bytes(&kc) * (size_t)(2 * blocks + 4);
    kv_cache_t *kv = NULL;
    xfer_t *x = NULL;
    int32_t *ctx = malloc((size_t)l->n_tokens * sizeof *ctx);
    double best = rank == 1 ? -1 : 0;
    char err[256] = "";
    if (!ctx || kv_new(&kc, &kv) != KV_OK || xfer_new(kv, &x) != XFER_OK)
        snprintf(err, sizeof err, "out of memory for a %s pool", l->name);
    else
        xfer_set_comm(x, c);
    const xfer_peer peer = {.rank = 1 - rank, .head0 = 0, .n_heads = l->n_kv_heads};
    for (int r = 0; r <= reps; r++) { /* r == 0 warms up */
        const int64_t id = r + 1;
        for (int i = 0; i < l->n_tokens; i++) ctx[i] = 1000 + (i * 31 + r * 7919) % 30000; /* no prefix hits */
        int seq = -1, cached = 0, n_tok = 0;
        if (!err[0] && rank == 1)
            (void)xfer_reserve(x, id, (uint64_t)id, ctx, l->n_tokens, &peer, 1, WAIT_MS, &cached, err,
                               sizeof err);
        else if (!err[0] && (kv_seq_new(kv, &seq) != KV_OK || kv_seq_append(kv, seq, ctx, l->n_tokens) != KV_OK))
            snprintf(err, sizeof err, "no KV sequence of %d tokens", l->n_tokens);
        else if (!err[0])
            (void)xfer_send_begin(x, id, (uint64_t)id, &peer, 1, 0, WAIT_MS, err, sizeof err);
        if (sync(user, err[0] != 0)) {
            if (!err[0]) snprintf(err, sizeof err, "the other side failed");
            if (seq >= 0) kv_seq_free(kv, seq);
            break;
        }
        const double t0 = wall_ms();
        if (rank == 0)
            for (int layer = 0; layer < l->n_layers; layer++) xfer_ship(x, id, seq, layer, l->n_tokens);
        size_t got = 0; /* payload bytes moved */
        for (int done = 0; !done && !err[0];) {
            xfer_poll(x, (int64_t)wall_ms());
            xfer_event ev;
            while (xfer_next_event(x, &ev)) {
                if (ev.type == XFER_EV_RECEIVED || ev.type == XFER_EV_SENT) {
                    done = 1;
                    got = ev.bytes;
                } else
                    snprintf(err, sizeof err, "transfer %lld: %s", (long long)ev.xfer, ev.msg);
            }
        }
        const double ms = wall_ms() - t0;
        if (err[0]) { /* the lease (WAIT_MS) ends the other side's wait too */
            if (seq >= 0) kv_seq_free(kv, seq);
            break;
        }
        if (rank == 1) {
            if (xfer_take(x, id, &seq, &n_tok) != XFER_OK || n_tok != l->n_tokens) {
                snprintf(err, sizeof err, "transfer %lld: not taken", (long long)id);
                break;
            }
            const double gbs = (double)got / (ms * 1e6);
            if (r && gbs > best) best = gbs;
        }
        kv_seq_free(kv, seq);
    }
    if (err[0]) {
        fprintf(stderr, "bench_comm: %s, rank %d: %s\n", l->name, rank, err);
        best = -1;
    }
    xfer_set_comm(x, NULL);
    xfer_destroy(&x);
    kv_destroy(&kv);
    free(ctx);
    return best;
}

typedef struct {
    pthread_barrier_t bar;
    atomic_int failed;
} kv_bar;

typedef struct {
    comm_t *c;
    int rank, reps;
    const kv_layout *l;
    kv_bar *bar;
    double gbs;
} kv_thread;

static int bar_sync(void *user, int failed)
{
    kv_bar *b = user;
    if (failed) atomic_store(&b->failed, 1);
    pthread_barrier_wait(&b->bar);
    return atomic_load(&b->failed);
}

static void *kv_thread_main(void *p)
{
    kv_thread *k = p;
    k->gbs = kv_side(k->c, k->rank, k->l, k->reps, bar_sync, k->bar);
    return NULL;
}

/* KV transfer GB/s of layout l over tcp between two threads, or -1. */
static double bench_kv_tcp(const char *bind0, const char *bind1, const kv_layout *l, int quick)
{
    comm_t *c[2];
    if (tcp_pair(bind0, bind1, c) != 0) return -1;
    kv_bar bar;
    pthread_barrier_init(&bar.bar, NULL, 2);
    atomic_init(&bar.failed, 0);
    const int reps = kv_reps(l, quick);
    kv_thread k[2] = {{c[0], 0, reps, l, &bar, 0}, {c[1], 1, reps, l, &bar, 0}};
    pthread_t th[2];
    for (int r = 0; r < 2; r++) pthread_create(&th[r], NULL, kv_thread_main, &k[r]);
    for (int r = 0; r < 2; r++) pthread_join(th[r], NULL);
    pthread_barrier_destroy(&bar.bar);
    const double gbs = k[0].gbs < 0 ? -1 : k[1].gbs;
    comm_destroy(&c[0]);
    comm_destroy(&c[1]);
    return gbs;
}

/* The raw stream of layout l's messages: as many and as large as its transfers'. */
static size_t kv_raw_total(const kv_layout *l, int quick)
{
    return (size_t)kv_reps(l, quick) * (size_t)l->n_layers * kv_msg_bytes(l);
}

/* ---- mpi ----------------------------------------------------------------------------------------- */

static int mpi_sync(void *user, int failed)
{
    float v = failed ? 1.0f : 0.0f;
    return comm_allreduce_sum_f32(user, &v, 1, WAIT_MS) != COMM_OK || v > 0;
}

/* Under mpirun -np 2: print "mpi SIZE GBPS" per size (rank 0), then "mpikv LAYOUT KV RAW" per
 * KV layout (rank 1: the KV transfer's and the same messages' raw GB/s). */
static int mpi_side(size_t total, int quick)
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
    for (int k = 0; k < N_LAYOUTS && !rc; k++) {
        const kv_layout *l = &layouts[k];
        double kvg = kv_side(c, rank, l, kv_reps(l, quick), mpi_sync, g);
        const size_t size = kv_msg_bytes(l);
        const int window = window_of(size), iters = (int)(kv_raw_total(l, quick) / size);
        unsigned char *buf = calloc(1, size * (size_t)(rank ? window : 1));
        double raw = -1;
        for (int r = 0; r <= RUNS && buf; r++) {
            float sync = 0;
            if (comm_allreduce_sum_f32(g, &sync, 1, WAIT_MS) != COMM_OK) break;
            double t0 = now();
            if (stream(c, rank, buf, size, r ? iters : 2, window) != 0) break;
            if (comm_allreduce_sum_f32(g, &sync, 1, WAIT_MS) != COMM_OK) break;
            double gbs = (double)size * iters / (now() - t0) / 1e9;
            if (r && gbs > raw) raw = gbs;
        }
        free(buf);
        if (rank == 1) printf("mpikv %d %.3f %.3f\n", k, kvg, raw);
        fflush(stdout);
    }
    comm_group_destroy(&g);
    comm_destroy(&c);
    comm_mpi_finalize();
    return rc;
}

/* Run this program under mpirun -np 2 --mpi (extra: more mpirun options) and collect its
 * figures into gbs[]. 0 or -1. */
static int run_mpi(int quick, const char *extra, double *gbs, double (*kvg)[2], char *why, size_t whylen)
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
        int li = -1;
        double v2 = 0;
        if (sscanf(line, "mpikv %d %lf %lf", &li, &v, &v2) == 3 && li >= 0 && li < N_LAYOUTS) {
            kvg[li][0] = v;
            kvg[li][1] = v2;
        } else if (sscanf(line, "mpi %zu %lf", &size, &v) == 2) {
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

static void kv_cell(double kv, double raw)
{
    if (kv < 0)
        printf(" n/a");
    else
        printf(" %.2f", kv);
    if (raw < 0)
        printf(" (n/a) |");
    else
        printf(" (%.2f) |", raw);
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
    if (mpi || comm_mpi_launched()) return mpi_side(total, quick);

    double mpi_gbs[N_SIZES], mpi_kv[N_LAYOUTS][2];
    for (int k = 0; k < N_SIZES; k++) mpi_gbs[k] = -1;
    for (int k = 0; k < N_LAYOUTS; k++) mpi_kv[k][0] = mpi_kv[k][1] = -1;
    char why[256] = "";
    /* shared memory with single-copy (CMA) first; without it where ptrace is not allowed */
    const char *mech = "vader, CMA";
    int mpi_ok = run_mpi(quick, "", mpi_gbs, mpi_kv, why, sizeof why) == 0;
    if (!mpi_ok) {
        mech = "vader, no single-copy";
        for (int k = 0; k < N_SIZES; k++) mpi_gbs[k] = -1;
        for (int k = 0; k < N_LAYOUTS; k++) mpi_kv[k][0] = mpi_kv[k][1] = -1;
        mpi_ok = run_mpi(quick, "--mca btl_vader_single_copy_mechanism none", mpi_gbs, mpi_kv, why,
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
    printf("\nA request's KV through the transfer engine (worker/xfer: reserve, pack, send, "
           "receive, unpack, checksums), f16, layers shipped back to back; payload GB/s, best "
           "of the transfers, and in brackets the raw stream of the same messages.\n\n");
    printf("| KV layout | tokens | message (a layer) | KV per request | tcp (tcp://127.0.0.1) | "
           "tcp (ipc://) | mpi (%s) |\n", mech);
    printf("|---|---:|---:|---:|---:|---:|---:|\n");
    for (int k = 0; k < N_LAYOUTS; k++) {
        const kv_layout *l = &layouts[k];
        const size_t msg = kv_msg_bytes(l);
        printf("| %s | %d | %.0f KiB | %.1f MB |", l->name, l->n_tokens, (double)msg / 1024.0,
               (double)msg * l->n_layers / 1e6);
        const char *b0[2] = {"tcp://127.0.0.1:0", ipc0}, *b1[2] = {"tcp://127.0.0.1:0", ipc1};
        for (int t = 0; t < 2; t++) {
            double kvg = bench_kv_tcp(b0[t], b1[t], l, quick);
            double raw = bench_tcp(b0[t], b1[t], msg, kv_raw_total(l, quick));
            kv_cell(kvg, raw);
        }
        kv_cell(mpi_kv[k][0], mpi_kv[k][1]);
        printf("\n");
        fflush(stdout);
    }
    if (!mpi_ok) printf("\nmpi: n/a (%s)\n", why);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "bench_comm: could not remove %s\n", dir);
    return 0;
}
