/* bench/bench_nccl.c: NCCL transfer bandwidth for one request's KV against a plain
 * device-to-device copy of the same bytes, on one GPU (the NCCL world is that GPU alone, so
 * the KV goes by send and receive to its own rank, as when one GPU is both the prefill and
 * the decode worker).
 *
 * A request's KV: for each layer one message of K and V for every KV head of its tokens
 * (kv_pack_range's unit), f16. Shapes: SmolLM2-135M (30 layers, 3 KV heads, head_dim 64)
 * and Llama-3-8B (32 layers, 8 KV heads, head_dim 128); 512 and 2048 tokens. Ways:
 *   nccl 1 group    every layer posted (after one event), then one comm_progress: one
 *                   ncclGroupStart/End
 *   nccl per layer  post a layer, progress: one group per layer (the layer-by-layer path,
 *                   each layer's sends after its own event)
 *   d2d per layer   one cudaMemcpyAsync per layer on one stream
 *   d2d one copy    one cudaMemcpyAsync of all the bytes
 * Times: GPU time between events on the stream that carries the transfer (best of the
 * runs), and the host's wall time from the first post to the last completion seen (median).
 * Bandwidth counts each byte once. The received bytes are checked against the sent ones.
 *
 *   bench_nccl            the table (a GPU needed; without one it says why and exits 0)
 *   bench_nccl quick      fewer runs, 128 and 512 tokens
 * NCCL is loaded at run time (DUET_NCCL_LIB or libnccl.so.2, see comm/comm_nccl_cuda.c).
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "comm/comm.h"
#include "comm/comm_nccl.h"

#if defined(DUET_CUDA) && DUET_CUDA

#include <cuda_runtime.h>

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec * 1e3 + (double)ts.tv_nsec / 1e6;
}

#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "bench_nccl: %s: %s (%s:%d)\n", #call, cudaGetErrorString(e_), \
                    __FILE__, __LINE__);                                                  \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static void die(comm_t *c, const char *what)
{
    fprintf(stderr, "bench_nccl: %s: %s\n", what, c ? comm_last_error(c) : "");
    exit(1);
}

typedef struct {
    const char *name;
    int layers, heads, head_dim;
} shape;

typedef struct {
    double gpu_best_ms, wall_med_ms;
} timing;

static int cmp_d(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

enum { NCCL_ONE, NCCL_LAYERED, D2D_LAYERED, D2D_ONE, N_WAYS };

/* One run of way w: src -> dst, layers messages of msg bytes. GPU ms into *gpu_ms, wall ms
 * returned. */
static double run_once(int w, comm_t *c, comm_nccl_t *n, cudaStream_t copy_stream,
                       cudaEvent_t t0, cudaEvent_t t1, cudaEvent_t *layer_ev, char *src,
                       char *dst, int layers, size_t msg, float *gpu_ms)
{
    double start = now_ms();
    if (w == D2D_LAYERED || w == D2D_ONE) {
        CK(cudaEventRecord(t0, copy_stream));
        if (w == D2D_ONE)
            CK(cudaMemcpyAsync(dst, src, msg * (size_t)layers, cudaMemcpyDeviceToDevice, copy_stream));
        else
            for (int l = 0; l < layers; l++)
                CK(cudaMemcpyAsync(dst + (size_t)l * msg, src + (size_t)l * msg, msg,
                                   cudaMemcpyDeviceToDevice, copy_stream));
        CK(cudaEventRecord(t1, copy_stream));
        CK(cudaEventSynchronize(t1));
    } else {
        cudaStream_t xs = (cudaStream_t)comm_nccl_stream(n);
        comm_nccl_op *s[256], *r[256];
        CK(cudaEventRecord(t0, xs));
        if (w == NCCL_ONE) CK(cudaEventRecord(layer_ev[0], NULL)); /* "every layer computed" */
        for (int l = 0; l < layers; l++) {
            cudaEvent_t ev = layer_ev[w == NCCL_ONE ? 0 : l];
            if (w == NCCL_LAYERED) CK(cudaEventRecord(ev, NULL)); /* "layer l computed" */
            if (comm_nccl_irecv(n, 0, 1, dst + (size_t)l * msg, msg, NULL, &r[l]) != COMM_OK ||
                comm_nccl_isend(n, 0, 1, src + (size_t)l * msg, msg, ev, &s[l]) != COMM_OK)
                die(c, "posting");
            if (w == NCCL_LAYERED && comm_nccl_progress(n) != COMM_OK) die(c, "progress");
        }
        if (comm_nccl_progress(n) != COMM_OK) die(c, "progress");
        if (!comm_nccl_op_issued(s[layers - 1])) die(c, "the last layer is not issued");
        CK(cudaEventRecord(t1, xs));
        for (int l = 0; l < layers; l++) {
            for (;;) {
                int d1 = 0, d2 = 0;
                if (comm_nccl_op_test(n, s[l], &d1, NULL) != COMM_OK ||
                    comm_nccl_op_test(n, r[l], &d2, NULL) != COMM_OK)
                    die(c, "transfer");
                if (d1 && d2) break;
            }
            comm_nccl_op_free(n, &s[l]);
            comm_nccl_op_free(n, &r[l]);
        }
        CK(cudaEventSynchronize(t1));
    }
    double wall = now_ms() - start;
    CK(cudaEventElapsedTime(gpu_ms, t0, t1));
    return wall;
}

int main(int argc, char **argv)
{
    int quick = argc > 1 && strcmp(argv[1], "quick") == 0;
    int runs = quick ? 5 : 30;
    char err[512] = "";
    comm_t *c = NULL;
    comm_nccl_t *n = NULL;
    if (comm_nccl_cuda_new(0, NULL, &c, &n, err, sizeof err) != COMM_OK) {
        printf("bench_nccl: skipped: %s\n", err);
        return 0;
    }
    char hex[COMM_NCCL_ID_HEX + 1];
    if (comm_nccl_make_id(n, hex) != COMM_OK || comm_nccl_init(n, 1, 0, hex) != COMM_OK ||
        comm_nccl_wait_ready(n, 60000) != COMM_OK)
        die(c, "building a world of one");
    struct cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    static const shape shapes[] = {{"SmolLM2-135M", 30, 3, 64}, {"Llama-3-8B", 32, 8, 128}};
    int toks_full[] = {512, 2048}, toks_quick[] = {128, 512};
    int *toks = quick ? toks_quick : toks_full;
    cudaStream_t cs;
    CK(cudaStreamCreateWithFlags(&cs, cudaStreamNonBlocking));
    cudaEvent_t t0, t1, layer_ev[64];
    CK(cudaEventCreate(&t0));
    CK(cudaEventCreate(&t1));
    for (int l = 0; l < 64; l++) CK(cudaEventCreateWithFlags(&layer_ev[l], cudaEventDisableTiming));
    static const char *way_name[N_WAYS] = {"nccl 1 group", "nccl per layer", "d2d per layer",
                                           "d2d one copy"};
    printf("One request's KV (f16, K and V of every KV head, one message per layer) on %s, to "
           "its own rank by NCCL send/receive against cudaMemcpy device to device. GPU time: best "
           "of %d; wall: median, host post to completion.\n\n",
           prop.name, runs);
    printf("| shape | tokens | MiB | way | GPU us | GB/s | wall us |\n|---|---:|---:|---|---:|---:|---:|\n");
    for (size_t si = 0; si < sizeof shapes / sizeof *shapes; si++)
        for (int ti = 0; ti < 2; ti++) {
            const shape *sh = &shapes[si];
            size_t msg = (size_t)2 * (size_t)sh->heads * (size_t)toks[ti] * (size_t)sh->head_dim * 2;
            size_t total = msg * (size_t)sh->layers;
            char *src, *dst;
            CK(cudaMalloc((void **)&src, total));
            CK(cudaMalloc((void **)&dst, total));
            unsigned char *h = malloc(total), *b = malloc(total);
            for (size_t i = 0; i < total; i++) h[i] = (unsigned char)(i * 2654435761u >> 11);
            CK(cudaMemcpy(src, h, total, cudaMemcpyHostToDevice));
            for (int w = 0; w < N_WAYS; w++) {
                double walls[64];
                float best = 1e30f;
                CK(cudaMemset(dst, 0, total));
                for (int it = 0; it < 3 + runs; it++) {
                    float g = 0;
                    double wall = run_once(w, c, n, cs, t0, t1, layer_ev, src, dst, sh->layers, msg, &g);
                    if (it < 3) continue;
                    walls[it - 3] = wall;
                    if (g < best) best = g;
                }
                CK(cudaMemcpy(b, dst, total, cudaMemcpyDeviceToHost));
                if (memcmp(h, b, total) != 0) {
                    fprintf(stderr, "bench_nccl: %s, %s %d tokens: received bytes differ\n",
                            way_name[w], sh->name, toks[ti]);
                    return 1;
                }
                qsort(walls, (size_t)runs, sizeof *walls, cmp_d);
                printf("| %s | %d | %.2f | %s | %.1f | %.1f | %.1f |\n", sh->name, toks[ti],
                       (double)total / 1048576.0, way_name[w], best * 1e3,
                       (double)total / ((double)best * 1e-3) / 1e9, walls[runs / 2] * 1e3);
            }
            CK(cudaFree(src));
            CK(cudaFree(dst));
            free(h);
            free(b);
        }
    for (int l = 0; l < 64; l++) CK(cudaEventDestroy(layer_ev[l]));
    CK(cudaEventDestroy(t0));
    CK(cudaEventDestroy(t1));
    CK(cudaStreamDestroy(cs));
    comm_destroy(&c);
    return 0;
}

#else /* a build without CUDA */

int main(void)
{
    char err[256] = "";
    comm_t *c = NULL;
    comm_nccl_cuda_new(0, NULL, &c, NULL, err, sizeof err);
    printf("bench_nccl: skipped: %s\n", err);
    return 0;
}

#endif
