/* tests/test_gpu_nccl.c: the NCCL backend (comm/comm_nccl*.c) on a real GPU and a real NCCL.
 *
 * One GPU serves as both the prefill and the decode worker: a world of one rank, whose KV
 * blocks travel by NCCL send and receive to its own rank (NCCL refuses two ranks on one
 * GPU), from one paged pool to another, checked byte for byte against the source blocks.
 * Also: the same through comm.h, the collectives on a group of one, abort and rebuild, and a
 * build that times out (a second rank that never comes).
 *
 * Without a GPU (or in a build without CUDA, or without a loadable NCCL) every case is
 * skipped with the reason printed; with DUET_REQUIRE_GPU=1 (make test-gpu) that is a
 * failure instead.
 *
 * Run on a GPU machine:
 *   make CUDA=1 BUILD=build/gpu build/gpu/tests/test_gpu_nccl
 *   DUET_REQUIRE_GPU=1 build/gpu/tests/test_gpu_nccl
 * NCCL is loaded at run time: libnccl.so.2 from the loader's path (the programs' rpath
 * holds $(CUDA_HOME)/lib64), or the file named by DUET_NCCL_LIB, e.g. PyTorch's wheel:
 *   DUET_NCCL_LIB=$(python3 -c 'import nvidia.nccl,os;print(os.path.dirname(nvidia.nccl.__file__))')/lib/libnccl.so.2
 * NCCL_DEBUG=WARN shows NCCL's own view when something fails.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <cmocka.h>

#include "comm/comm.h"
#include "comm/comm_nccl.h"

#define TIMEOUT_MS 20000

typedef struct {
    comm_nccl_api api; /* a second table for device memory (its own ctx) */
    comm_t *c;
    comm_nccl_t *n;
} gpu;

/* Open device 0 and the backend; skip (or fail under DUET_REQUIRE_GPU) when impossible. */
static void gpu_open(gpu *g, const comm_nccl_opts *o)
{
    memset(g, 0, sizeof *g);
    char err[512] = "";
    comm_status st = comm_nccl_cuda_api(0, &g->api, err, sizeof err);
    if (st == COMM_OK) st = comm_nccl_cuda_new(0, o, &g->c, &g->n, err, sizeof err);
    if (st != COMM_OK) {
        if (g->api.release) g->api.release(g->api.ctx);
        memset(&g->api, 0, sizeof g->api);
        const char *req = getenv("DUET_REQUIRE_GPU");
        if (req && *req && strcmp(req, "0") != 0) fail_msg("no GPU for the NCCL backend: %s", err);
        fprintf(stderr, "test_gpu_nccl: skipped: %s\n", err);
        skip();
    }
}

static void gpu_close(gpu *g)
{
    comm_destroy(&g->c);
    if (g->api.release) g->api.release(g->api.ctx);
}

/* A world of one, built the way duetd relays it (comm_id, comm_init). */
static void world_of_one(gpu *g)
{
    char hex[COMM_NCCL_ID_HEX + 1];
    assert_int_equal(comm_nccl_make_id(g->n, hex), COMM_OK);
    assert_int_equal(comm_nccl_init(g->n, 1, 0, hex), COMM_OK);
    comm_status st = comm_nccl_wait_ready(g->n, TIMEOUT_MS);
    if (st != COMM_OK) fail_msg("building a world of one: %s", comm_last_error(g->c));
}

static void *dalloc(gpu *g, size_t n)
{
    void *p = NULL;
    if (g->api.dev_alloc(g->api.ctx, n, &p) != NCCL_API_OK) fail_msg("%s", g->api.last_error(g->api.ctx));
    return p;
}

static void to_dev(gpu *g, void *d, const void *h, size_t n)
{
    if (g->api.copy_to_dev(g->api.ctx, d, h, n) != NCCL_API_OK) fail_msg("%s", g->api.last_error(g->api.ctx));
}

static void to_host(gpu *g, void *h, const void *d, size_t n)
{
    if (g->api.copy_to_host(g->api.ctx, h, d, n) != NCCL_API_OK) fail_msg("%s", g->api.last_error(g->api.ctx));
}

static void wait_op(gpu *g, comm_nccl_op *op, size_t want)
{
    size_t len = 0;
    for (int i = 0;; i++) {
        int done = 0;
        comm_status st = comm_nccl_op_test(g->n, op, &done, &len);
        if (st != COMM_OK) fail_msg("operation failed: %s", comm_last_error(g->c));
        if (done) break;
        if (i > 20000000) fail_msg("operation not finished");
    }
    assert_int_equal(len, want);
}

/* KV layout of kv/kv.h: per layer a K and a V array of [n_blocks][n_heads][block_tokens]
 * [head_dim] f16. A request's blocks go from the prefill pool (block table src) to the
 * decode pool (table dst), one message per layer, K and V, and block, layer by layer after
 * each layer's event, the receives posted first (the reservation). */
enum { LAYERS = 6, HEADS = 3, BT = 16, HD = 64, POOL = 48, NB = 5 };
#define BLOCK_BYTES ((size_t)HEADS * BT * HD * 2)
#define ARRAY_BYTES ((size_t)POOL * BLOCK_BYTES)
#define POOL_BYTES ((size_t)LAYERS * 2 * ARRAY_BYTES)

static size_t at(int layer, int kv, int block)
{
    return ((size_t)layer * 2 + (size_t)kv) * ARRAY_BYTES + (size_t)block * BLOCK_BYTES;
}

static void test_kv_blocks_to_self(void **state)
{
    (void)state;
    gpu g;
    gpu_open(&g, NULL);
    world_of_one(&g);
    static const int src_tab[NB] = {5, 17, 3, 40, 22}, dst_tab[NB] = {47, 2, 33, 9, 11};
    unsigned char *host = malloc(POOL_BYTES), *back = malloc(POOL_BYTES);
    for (size_t i = 0; i < POOL_BYTES; i++) host[i] = (unsigned char)(i * 2654435761u >> 13);
    void *src = dalloc(&g, POOL_BYTES), *dst = dalloc(&g, POOL_BYTES);
    to_dev(&g, src, host, POOL_BYTES);
    memset(back, 0, POOL_BYTES);
    to_dev(&g, dst, back, POOL_BYTES); /* zeros */
    uint64_t ch = comm_nccl_chan(0, 0), tag = 9;
    assert_int_equal(comm_nccl_xfer_begin(g.n, tag, ch, 0), COMM_OK);
    comm_nccl_op *r[LAYERS][2][NB], *s[LAYERS][2][NB];
    for (int l = 0; l < LAYERS; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int b = 0; b < NB; b++)
                assert_int_equal(comm_nccl_irecv(g.n, 0, tag, (char *)dst + at(l, kv, dst_tab[b]),
                                                 BLOCK_BYTES, NULL, &r[l][kv][b]),
                                 COMM_OK);
    comm_nccl_progress(g.n);
    void *ev = NULL;
    assert_int_equal(g.api.event_new(g.api.ctx, &ev), NCCL_API_OK);
    for (int l = 0; l < LAYERS; l++) {
        /* layer l "computed": its event on the compute (default) stream */
        assert_int_equal(g.api.event_record(g.api.ctx, ev, NULL), NCCL_API_OK);
        for (int kv = 0; kv < 2; kv++)
            for (int b = 0; b < NB; b++)
                assert_int_equal(comm_nccl_isend(g.n, 0, tag, (char *)src + at(l, kv, src_tab[b]),
                                                 BLOCK_BYTES, ev, &s[l][kv][b]),
                                 COMM_OK);
        assert_int_equal(comm_nccl_progress(g.n), COMM_OK);
        assert_int_equal(comm_nccl_op_issued(s[l][0][0]), 1); /* ev may be recorded again */
    }
    assert_int_equal(comm_nccl_xfer_end(g.n, tag), COMM_OK);
    for (int l = 0; l < LAYERS; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int b = 0; b < NB; b++) {
                wait_op(&g, s[l][kv][b], BLOCK_BYTES);
                wait_op(&g, r[l][kv][b], BLOCK_BYTES);
                comm_nccl_op_free(g.n, &s[l][kv][b]);
                comm_nccl_op_free(g.n, &r[l][kv][b]);
            }
    to_host(&g, back, dst, POOL_BYTES);
    for (int l = 0; l < LAYERS; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int blk = 0; blk < POOL; blk++) {
                int from = -1;
                for (int b = 0; b < NB; b++)
                    if (dst_tab[b] == blk) from = src_tab[b];
                const unsigned char *got = back + at(l, kv, blk);
                if (from >= 0) {
                    if (memcmp(got, host + at(l, kv, from), BLOCK_BYTES) != 0)
                        fail_msg("layer %d %c block %d differs from source block %d", l, kv ? 'V' : 'K',
                                 blk, from);
                } else {
                    for (size_t i = 0; i < BLOCK_BYTES; i++)
                        if (got[i]) fail_msg("layer %d block %d was written (not in the table)", l, blk);
                }
            }
    g.api.event_free(g.api.ctx, ev);
    g.api.dev_free(g.api.ctx, src);
    g.api.dev_free(g.api.ctx, dst);
    free(host);
    free(back);
    gpu_close(&g);
}

/* Through comm.h: a packed buffer with comm_isend / comm_irecv / comm_wait. */
static void test_comm_h(void **state)
{
    (void)state;
    gpu g;
    gpu_open(&g, NULL);
    world_of_one(&g);
    assert_int_equal(comm_rank(g.c), 0);
    assert_int_equal(comm_size(g.c), 1);
    const size_t n = (size_t)3 << 20;
    unsigned char *h = malloc(n), *b = malloc(n);
    for (size_t i = 0; i < n; i++) h[i] = (unsigned char)(i * 131 + 7);
    void *src = dalloc(&g, n), *dst = dalloc(&g, n);
    to_dev(&g, src, h, n);
    comm_op_t *s = NULL, *r = NULL;
    assert_int_equal(comm_irecv(g.c, 0, 44, dst, n, &r), COMM_OK);
    assert_int_equal(comm_isend(g.c, 0, 44, src, n, &s), COMM_OK);
    size_t len = 0;
    assert_int_equal(comm_wait(g.c, r, TIMEOUT_MS, &len), COMM_OK);
    assert_int_equal(len, n);
    assert_int_equal(comm_wait(g.c, s, TIMEOUT_MS, &len), COMM_OK);
    comm_op_free(g.c, &s);
    comm_op_free(g.c, &r);
    to_host(&g, b, dst, n);
    assert_memory_equal(h, b, n);
    g.api.dev_free(g.api.ctx, src);
    g.api.dev_free(g.api.ctx, dst);
    free(h);
    free(b);
    gpu_close(&g);
}

static void test_collectives_group_of_one(void **state)
{
    (void)state;
    gpu g;
    gpu_open(&g, NULL);
    world_of_one(&g);
    comm_group_t *grp = NULL;
    int me = 0;
    assert_int_equal(comm_group_new(g.c, &me, 1, &grp), COMM_OK);
    float hv[1000], hb[1000];
    for (int i = 0; i < 1000; i++) hv[i] = (float)i * 0.5f;
    float *d = dalloc(&g, sizeof hv);
    to_dev(&g, d, hv, sizeof hv);
    assert_int_equal(comm_allreduce_sum_f32(grp, d, 1000, TIMEOUT_MS), COMM_OK);
    to_host(&g, hb, d, sizeof hb);
    assert_memory_equal(hv, hb, sizeof hv); /* a sum over one member */
    assert_int_equal(comm_broadcast(grp, 0, d, sizeof hv, TIMEOUT_MS), COMM_OK);
    void *gat = dalloc(&g, sizeof hv);
    assert_int_equal(comm_allgather(grp, d, sizeof hv, gat, TIMEOUT_MS), COMM_OK);
    to_host(&g, hb, gat, sizeof hb);
    assert_memory_equal(hv, hb, sizeof hv);
    comm_group_destroy(&grp);
    g.api.dev_free(g.api.ctx, d);
    g.api.dev_free(g.api.ctx, gat);
    gpu_close(&g);
}

/* Abort (as after a lease ran out on a hung peer), then a rebuild with a new id works. */
static void test_abort_rebuild(void **state)
{
    (void)state;
    gpu g;
    gpu_open(&g, NULL);
    world_of_one(&g);
    void *buf = dalloc(&g, 4096), *out = dalloc(&g, 4096);
    comm_nccl_op *s = NULL, *r = NULL;
    assert_int_equal(comm_nccl_isend(g.n, 0, 1, buf, 4096, NULL, &s), COMM_OK); /* unpaired */
    comm_nccl_progress(g.n);
    comm_nccl_abort(g.n, "test");
    int done = 0;
    assert_int_equal(comm_nccl_op_test(g.n, s, &done, NULL), COMM_ERR_PEER);
    assert_int_equal(done, 1);
    comm_nccl_op_free(g.n, &s);
    world_of_one(&g);
    assert_int_equal(comm_nccl_epoch(g.n), 2);
    assert_int_equal(comm_nccl_isend(g.n, 0, 2, buf, 4096, NULL, &s), COMM_OK);
    assert_int_equal(comm_nccl_irecv(g.n, 0, 2, out, 4096, NULL, &r), COMM_OK);
    wait_op(&g, s, 4096);
    wait_op(&g, r, 4096);
    comm_nccl_op_free(g.n, &s);
    comm_nccl_op_free(g.n, &r);
    g.api.dev_free(g.api.ctx, buf);
    g.api.dev_free(g.api.ctx, out);
    gpu_close(&g);
}

/* A world of two whose rank 1 never comes: the build times out and is aborted, no hang. */
static void test_build_timeout(void **state)
{
    (void)state;
    comm_nccl_opts o = {.init_timeout_ms = 3000};
    gpu g;
    gpu_open(&g, &o);
    char hex[COMM_NCCL_ID_HEX + 1];
    assert_int_equal(comm_nccl_make_id(g.n, hex), COMM_OK);
    assert_int_equal(comm_nccl_init(g.n, 2, 0, hex), COMM_OK);
    assert_int_equal(comm_nccl_wait_ready(g.n, TIMEOUT_MS), COMM_ERR_PEER);
    assert_non_null(strstr(comm_nccl_fail_reason(g.n), "took more than 3000 ms"));
    gpu_close(&g);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_kv_blocks_to_self),
        cmocka_unit_test(test_comm_h),
        cmocka_unit_test(test_collectives_group_of_one),
        cmocka_unit_test(test_abort_rebuild),
        cmocka_unit_test(test_build_timeout),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
