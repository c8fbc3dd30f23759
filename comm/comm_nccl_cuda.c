/* comm/comm_nccl_cuda.c: the real comm_nccl_api table (comm_nccl.h) over NCCL and the CUDA
 * runtime, in CUDA builds (DUET_CUDA=1, -I$(CUDA_HOME)/include, -lcudart). Without CUDA the
 * two public functions answer COMM_ERR_UNSUPPORTED ("built without CUDA").
 *
 * NCCL is loaded at run time (dlopen), not linked: every program links and starts on a
 * machine without NCCL (a CPU worker, CI), and one that asks for the nccl backend there gets
 * a clear error. The library: $DUET_NCCL_LIB when set (a path, e.g. the pip wheel's
 * .../site-packages/nvidia/nccl/lib/libnccl.so.2), else libnccl.so.2 then libnccl.so on
 * the loader's path (the programs' rpath has $(CUDA_HOME)/lib64). nccl.h gives the types;
 * ncclConfig_t carries its size and version, so a library older than the header reads the
 * part it knows.
 *
 * Every call first selects the table's device (cudaSetDevice is cheap, and the watchdog
 * thread calls comm_status and comm_abort too). Communicators are built non-blocking
 * (ncclConfig_t.blocking = 0): ncclCommInitRankConfig and ncclGroupEnd may answer
 * ncclInProgress, which the host logic polls with ncclCommGetAsyncError.
 */
#if defined(DUET_CUDA) && DUET_CUDA

#include "comm/comm_nccl.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cuda_runtime.h>
#include <nccl.h>

#define FINALIZE_WAIT_MS 5000 /* a clean destroy waits this long for ncclCommFinalize */

/* The NCCL functions used, from the loaded library. */
typedef struct {
    void *lib;
    ncclResult_t (*GetVersion)(int *);
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRankConfig)(ncclComm_t *, int, ncclUniqueId, int, ncclConfig_t *);
    ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
    ncclResult_t (*CommAbort)(ncclComm_t);
    ncclResult_t (*CommFinalize)(ncclComm_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    ncclResult_t (*GroupStart)(void);
    ncclResult_t (*GroupEnd)(void);
    ncclResult_t (*Send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*AllReduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t,
                              cudaStream_t);
    ncclResult_t (*Broadcast)(const void *, void *, size_t, ncclDataType_t, int, ncclComm_t,
                              cudaStream_t);
    ncclResult_t (*AllGather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
    const char *(*GetErrorString)(ncclResult_t);
    const char *(*GetLastError)(ncclComm_t);
} nccl_syms;

typedef struct {
    int device;
    int version;  /* the loaded NCCL's (ncclGetVersion) */
    nccl_syms f;
    char err[512];
} real_ctx;

static int sym(void *lib, const char *name, void *fp, size_t fpsize, char *err, size_t errlen)
{
    void *p = dlsym(lib, name);
    if (!p) {
        snprintf(err, errlen, "nccl: %s not found in the NCCL library: %s", name, dlerror());
        return -1;
    }
    memcpy(fp, &p, fpsize);
    return 0;
}

#define SYM(x, name) sym((x)->f.lib, "nccl" #name, &(x)->f.name, sizeof (x)->f.name, err, errlen)

/* Load NCCL into x->f. 0, or -1 with err. */
static int load_nccl(real_ctx *x, char *err, size_t errlen)
{
    const char *env = getenv("DUET_NCCL_LIB");
    const char *tries[3] = {env && *env ? env : NULL, "libnccl.so.2", "libnccl.so"};
    char why[256] = "";
    for (int i = 0; i < 3 && !x->f.lib; i++) {
        if (!tries[i]) continue;
        x->f.lib = dlopen(tries[i], RTLD_NOW | RTLD_LOCAL);
        if (!x->f.lib && !why[0]) snprintf(why, sizeof why, "%s", dlerror());
        if (!x->f.lib && i == 0) break; /* an explicit path that fails is the answer */
    }
    if (!x->f.lib) {
        snprintf(err, errlen, "nccl: cannot load the NCCL library (%s; set DUET_NCCL_LIB to its path)",
                 why);
        return -1;
    }
    if (SYM(x, GetVersion) || SYM(x, GetUniqueId) || SYM(x, CommInitRankConfig) ||
        SYM(x, CommGetAsyncError) || SYM(x, CommAbort) || SYM(x, CommFinalize) ||
        SYM(x, CommDestroy) || SYM(x, GroupStart) || SYM(x, GroupEnd) || SYM(x, Send) ||
        SYM(x, Recv) || SYM(x, AllReduce) || SYM(x, Broadcast) || SYM(x, AllGather) ||
        SYM(x, GetErrorString) || SYM(x, GetLastError)) {
        dlclose(x->f.lib);
        x->f.lib = NULL;
        return -1;
    }
    if (x->f.GetVersion(&x->version) != ncclSuccess) x->version = 0;
    if (x->version < NCCL_VERSION(2, 18, 0)) {
        snprintf(err, errlen, "nccl: the NCCL library is version %d; duet needs 2.18 or newer "
                 "(non-blocking communicators, ncclCommFinalize)", x->version);
        dlclose(x->f.lib);
        x->f.lib = NULL;
        return -1;
    }
    return 0;
}

static int fail_cuda(real_ctx *x, const char *call, cudaError_t e)
{
    snprintf(x->err, sizeof x->err, "%s: %s (device %d)", call, cudaGetErrorString(e), x->device);
    return NCCL_API_ERR;
}

static int nccl_rc(real_ctx *x, const char *call, ncclResult_t r, ncclComm_t comm)
{
    if (r == ncclSuccess) return NCCL_API_OK;
    if (r == ncclInProgress) return NCCL_API_PENDING;
    const char *last = x->f.GetLastError(comm);
    snprintf(x->err, sizeof x->err, "%s: %s%s%s (device %d)", call, x->f.GetErrorString(r),
             last && *last ? ": " : "", last ? last : "", x->device);
    return (r == ncclRemoteError || r == ncclSystemError) ? NCCL_API_REMOTE : NCCL_API_ERR;
}

static int dev(real_ctx *x)
{
    cudaError_t e = cudaSetDevice(x->device);
    return e == cudaSuccess ? NCCL_API_OK : fail_cuda(x, "cudaSetDevice", e);
}

static const char *r_last_error(void *ctx)
{
    return ((real_ctx *)ctx)->err;
}

static int r_get_unique_id(void *ctx, uint8_t id[COMM_NCCL_ID_BYTES])
{
    real_ctx *x = ctx;
    ncclUniqueId u;
    int rc = nccl_rc(x, "ncclGetUniqueId", x->f.GetUniqueId(&u), NULL);
    if (rc == NCCL_API_OK) memcpy(id, u.internal, COMM_NCCL_ID_BYTES);
    return rc;
}

static int r_comm_init(void *ctx, int nranks, const uint8_t id[COMM_NCCL_ID_BYTES], int rank,
                       void **comm)
{
    real_ctx *x = ctx;
    *comm = NULL;
    if (dev(x) != NCCL_API_OK) return NCCL_API_ERR;
    ncclUniqueId u;
    memcpy(u.internal, id, COMM_NCCL_ID_BYTES);
    ncclConfig_t cfg = NCCL_CONFIG_INITIALIZER;
    cfg.blocking = 0;
    ncclComm_t c = NULL;
    int rc = nccl_rc(x, "ncclCommInitRankConfig", x->f.CommInitRankConfig(&c, nranks, u, rank, &cfg), c);
    *comm = c;
    return rc;
}

static int r_comm_status(void *ctx, void *comm)
{
    real_ctx *x = ctx;
    if (dev(x) != NCCL_API_OK) return NCCL_API_ERR;
    ncclResult_t a = ncclSuccess;
    int rc = nccl_rc(x, "ncclCommGetAsyncError", x->f.CommGetAsyncError((ncclComm_t)comm, &a), comm);
    if (rc != NCCL_API_OK) return rc;
    return nccl_rc(x, "asynchronous error", a, comm);
}

static void r_comm_abort(void *ctx, void *comm)
{
    real_ctx *x = ctx;
    if (!comm) return;
    (void)dev(x);
    (void)x->f.CommAbort((ncclComm_t)comm);
}

static void r_comm_destroy(void *ctx, void *comm)
{
    real_ctx *x = ctx;
    if (!comm) return;
    (void)dev(x);
    ncclComm_t c = comm;
    ncclResult_t r = x->f.CommFinalize(c);
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (r == ncclInProgress || r == ncclSuccess) {
        ncclResult_t a = ncclSuccess;
        if (x->f.CommGetAsyncError(c, &a) != ncclSuccess) break;
        if (a == ncclSuccess) {
            (void)x->f.CommDestroy(c);
            return;
        }
        if (a != ncclInProgress) break;
        clock_gettime(CLOCK_MONOTONIC, &t);
        if ((t.tv_sec - t0.tv_sec) * 1000 + (t.tv_nsec - t0.tv_nsec) / 1000000 > FINALIZE_WAIT_MS)
            break;
        struct timespec nap = {0, 100000};
        nanosleep(&nap, NULL);
    }
    (void)x->f.CommAbort(c); /* finalize failed or hung: abort frees it */
}

static int r_group_start(void *ctx)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclGroupStart", x->f.GroupStart(), NULL);
}

static int r_group_end(void *ctx)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclGroupEnd", x->f.GroupEnd(), NULL);
}

static int r_send(void *ctx, void *comm, const void *buf, size_t len, int peer, void *stream)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclSend",
                   x->f.Send(buf, len, ncclUint8, peer, (ncclComm_t)comm, (cudaStream_t)stream),
                   comm);
}

static int r_recv(void *ctx, void *comm, void *buf, size_t len, int peer, void *stream)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclRecv",
                   x->f.Recv(buf, len, ncclUint8, peer, (ncclComm_t)comm, (cudaStream_t)stream),
                   comm);
}

static int r_allreduce(void *ctx, void *comm, float *buf, size_t count, void *stream)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclAllReduce",
                   x->f.AllReduce(buf, buf, count, ncclFloat32, ncclSum, (ncclComm_t)comm,
                                  (cudaStream_t)stream),
                   comm);
}

static int r_broadcast(void *ctx, void *comm, void *buf, size_t len, int root, void *stream)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclBroadcast",
                   x->f.Broadcast(buf, buf, len, ncclUint8, root, (ncclComm_t)comm,
                                  (cudaStream_t)stream),
                   comm);
}

static int r_allgather(void *ctx, void *comm, const void *send, void *recv, size_t len,
                       void *stream)
{
    real_ctx *x = ctx;
    return nccl_rc(x, "ncclAllGather",
                   x->f.AllGather(send, recv, len, ncclUint8, (ncclComm_t)comm, (cudaStream_t)stream),
                   comm);
}

static int r_stream_new(void *ctx, void **stream)
{
    real_ctx *x = ctx;
    if (dev(x) != NCCL_API_OK) return NCCL_API_ERR;
    cudaStream_t s = NULL;
    cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
    if (e != cudaSuccess) return fail_cuda(x, "cudaStreamCreateWithFlags", e);
    *stream = s;
    return NCCL_API_OK;
}

static void r_stream_free(void *ctx, void *stream)
{
    (void)dev(ctx);
    if (stream) (void)cudaStreamDestroy((cudaStream_t)stream);
}

static int r_event_new(void *ctx, void **event)
{
    real_ctx *x = ctx;
    if (dev(x) != NCCL_API_OK) return NCCL_API_ERR;
    cudaEvent_t ev = NULL;
    cudaError_t e = cudaEventCreateWithFlags(&ev, cudaEventDisableTiming);
    if (e != cudaSuccess) return fail_cuda(x, "cudaEventCreateWithFlags", e);
    *event = ev;
    return NCCL_API_OK;
}

static void r_event_free(void *ctx, void *event)
{
    (void)dev(ctx);
    if (event) (void)cudaEventDestroy((cudaEvent_t)event);
}

static int r_event_record(void *ctx, void *event, void *stream)
{
    cudaError_t e = cudaEventRecord((cudaEvent_t)event, (cudaStream_t)stream);
    return e == cudaSuccess ? NCCL_API_OK : fail_cuda(ctx, "cudaEventRecord", e);
}

static int r_event_query(void *ctx, void *event)
{
    cudaError_t e = cudaEventQuery((cudaEvent_t)event);
    if (e == cudaSuccess) return NCCL_API_OK;
    if (e == cudaErrorNotReady) return NCCL_API_PENDING;
    return fail_cuda(ctx, "cudaEventQuery", e);
}

static int r_stream_wait_event(void *ctx, void *stream, void *event)
{
    cudaError_t e = cudaStreamWaitEvent((cudaStream_t)stream, (cudaEvent_t)event, 0);
    return e == cudaSuccess ? NCCL_API_OK : fail_cuda(ctx, "cudaStreamWaitEvent", e);
}

static int r_dev_alloc(void *ctx, size_t len, void **ptr)
{
    real_ctx *x = ctx;
    if (dev(x) != NCCL_API_OK) return NCCL_API_ERR;
    cudaError_t e = cudaMalloc(ptr, len ? len : 1);
    return e == cudaSuccess ? NCCL_API_OK : fail_cuda(x, "cudaMalloc", e);
}

static void r_dev_free(void *ctx, void *ptr)
{
    (void)dev(ctx);
    if (ptr) (void)cudaFree(ptr);
}

static int r_copy_to_dev(void *ctx, void *dst, const void *src, size_t len)
{
    cudaError_t e = cudaMemcpy(dst, src, len, cudaMemcpyHostToDevice);
    return e == cudaSuccess ? NCCL_API_OK : fail_cuda(ctx, "cudaMemcpy (to the device)", e);
}

static int r_copy_to_host(void *ctx, void *dst, const void *src, size_t len)
{
    cudaError_t e = cudaMemcpy(dst, src, len, cudaMemcpyDeviceToHost);
    return e == cudaSuccess ? NCCL_API_OK : fail_cuda(ctx, "cudaMemcpy (to the host)", e);
}

static void r_release(void *ctx)
{
    real_ctx *x = ctx;
    if (x->f.lib) dlclose(x->f.lib);
    free(x);
}

comm_status comm_nccl_cuda_api(int device, comm_nccl_api *api, char *err, size_t errlen)
{
    if (!api) return COMM_ERR_INVAL;
    memset(api, 0, sizeof *api);
    real_ctx *x = calloc(1, sizeof *x);
    if (!x) return COMM_ERR_NOMEM;
    x->device = device;
    char lerr[384];
    if (load_nccl(x, lerr, sizeof lerr) != 0) {
        if (err && errlen) snprintf(err, errlen, "%s", lerr);
        free(x);
        return COMM_ERR_UNSUPPORTED;
    }
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || device < 0 || device >= n) {
        if (err && errlen)
            snprintf(err, errlen, "nccl: no usable CUDA device %d: %s", device,
                     e != cudaSuccess ? cudaGetErrorString(e) : "no such device");
        r_release(x);
        return COMM_ERR_UNSUPPORTED;
    }
    if (dev(x) != NCCL_API_OK) {
        if (err && errlen) snprintf(err, errlen, "nccl: %s", x->err);
        r_release(x);
        return COMM_ERR_SYS;
    }
    *api = (comm_nccl_api){
        .ctx = x,
        .last_error = r_last_error,
        .get_unique_id = r_get_unique_id,
        .comm_init = r_comm_init,
        .comm_status = r_comm_status,
        .comm_abort = r_comm_abort,
        .comm_destroy = r_comm_destroy,
        .group_start = r_group_start,
        .group_end = r_group_end,
        .send = r_send,
        .recv = r_recv,
        .allreduce_sum_f32 = r_allreduce,
        .broadcast = r_broadcast,
        .allgather = r_allgather,
        .stream_new = r_stream_new,
        .stream_free = r_stream_free,
        .event_new = r_event_new,
        .event_free = r_event_free,
        .event_record = r_event_record,
        .event_query = r_event_query,
        .stream_wait_event = r_stream_wait_event,
        .dev_alloc = r_dev_alloc,
        .dev_free = r_dev_free,
        .copy_to_dev = r_copy_to_dev,
        .copy_to_host = r_copy_to_host,
        .release = r_release,
    };
    return COMM_OK;
}

comm_status comm_nccl_cuda_new(int device, const comm_nccl_opts *opts, comm_t **out,
                               comm_nccl_t **nccl, char *err, size_t errlen)
{
    if (out) *out = NULL;
    if (nccl) *nccl = NULL;
    comm_nccl_api api;
    comm_status st = comm_nccl_cuda_api(device, &api, err, errlen);
    if (st != COMM_OK) return st;
    return comm_nccl_new(&api, opts, out, nccl, err, errlen);
}

#else /* a build without CUDA */

#include "comm/comm_nccl.h"

#include <stdio.h>

#define NO_CUDA "nccl: built without CUDA (rebuild with make CUDA=1 where nvcc and the CUDA toolkit are installed)"

comm_status comm_nccl_cuda_api(int device, comm_nccl_api *api, char *err, size_t errlen)
{
    (void)device;
    (void)api;
    if (err && errlen) snprintf(err, errlen, "%s", NO_CUDA);
    return COMM_ERR_UNSUPPORTED;
}

comm_status comm_nccl_cuda_new(int device, const comm_nccl_opts *opts, comm_t **out,
                               comm_nccl_t **nccl, char *err, size_t errlen)
{
    (void)device;
    (void)opts;
    if (out) *out = NULL;
    if (nccl) *nccl = NULL;
    if (err && errlen) snprintf(err, errlen, "%s", NO_CUDA);
    return COMM_ERR_UNSUPPORTED;
}

#endif
