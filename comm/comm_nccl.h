/* comm/comm_nccl.h: the NCCL backend of the data plane (comm.h), device memory, GPU workers.
 *
 * Layers. comm_nccl.c (plain C, in libduet everywhere) holds all the host logic: the order
 * of sends and receives, batching into ncclGroupStart/End groups, events between streams,
 * the polling of asynchronous errors, abort and rebuild, the bootstrap. It calls NCCL and
 * the CUDA runtime only through a table of functions, comm_nccl_api, so tests put a fake
 * behind it; comm_nccl_cuda.c fills the table with the real calls (CUDA builds; NCCL itself
 * is loaded at run time, so programs link and start without it).
 *
 * Streams and events. Sends and receives run on a stream of the backend's own (the
 * transfer stream). Each operation is ordered after the compute that wrote (or may still
 * read) its buffer by an event, never by a host synchronisation: either an event the caller
 * passes (comm_nccl_isend: e.g. recorded on the compute stream right after layer l's KV was
 * written), or, by default, an event the backend records on the compute stream
 * (comm_nccl_set_compute_stream) when the operation is posted. So layer l's transfer runs
 * on the transfer stream while layer l+1 computes. The other way round, a consumer orders
 * its stream after a finished receive with comm_nccl_op_stream_wait (no host wait).
 *
 * Issue and batching. comm_isend / comm_irecv only queue. comm_progress (also comm_test,
 * comm_wait, comm_nccl_progress, comm_nccl_xfer_end) issues what may go: consecutive ready
 * operations become one ncclGroupStart/End group (a layer's sends to all peers and any
 * receives in one launch), split before an operation that waits on another caller event
 * than the group's, so that a later layer never delays an earlier one (operations without
 * a caller event join any group). One event recorded after each group says when all its
 * operations are done: a receiver that wants each layer on its own posts and progresses
 * them one at a time. To its own rank (one GPU as both prefill and decode worker), a send
 * and the receive it matches always go in one group (apart, the first would hold the
 * stream forever): an unpaired one waits for its partner.
 *
 * Order. NCCL has no tags: the k-th send from a to b matches the k-th receive at b from a.
 * duetd numbers the transfers between one pair of groups with seq (PROTOCOL.md section 4),
 * and both ends issue them strictly in seq order. Here: comm_nccl_xfer_begin(tag, chan,
 * seq) says that the operations with tag (the transfer's xfer id) belong to transfer seq of
 * the ordered channel chan (one per pair of groups and direction: comm_nccl_chan). Such
 * operations are held until every earlier seq of the channel has ended (comm_nccl_xfer_end:
 * all its operations posted and issued) or was released or skipped; within a transfer they
 * go in posting order. Operations with a tag that no transfer claims (step plans, the group
 * bootstrap) go in posting order at once, but never overtake an earlier held operation in
 * the same direction with the same peer. One channel per direction of a pair of ranks: the
 * ranks of a pair of groups must not also exchange untagged operations while transfers are
 * held. Receives: NCCL has no message sizes, so a receive's cap must equal the matching
 * send's len (a completed receive reports len = cap). comm_discard(peer, tag) releases the
 * transfer with that tag (comm_nccl_xfer_release).
 *
 * Failures. An asynchronous error (ncclCommGetAsyncError, polled by every comm_progress and,
 * when opts.watchdog_ms > 0, by a host thread every watchdog_ms, which lets it end a stream
 * that hangs on a dead peer while the owner thread waits on the GPU), a failed NCCL or CUDA
 * call, a build that times out, comm_nccl_abort, or a transfer released half issued: the
 * communicator is aborted (ncclCommAbort), and every operation not finished ends with
 * COMM_ERR_PEER and a message naming the transfer and the cause. The state becomes
 * COMM_NCCL_FAILED; nothing is re-issued on a later communicator (the peer's side of the
 * order is lost with the old one): the caller retries the request (duetd does, with a new
 * xfer) or fails it. A rebuild is comm_nccl_init with a new unique id (from world rank 0,
 * relayed by duetd's comm_init, or by MPI); it resets every channel's seq to 0 and forgets
 * every transfer begun before it.
 *
 * Bootstrap. Under systemd: world rank 0 makes an id (comm_nccl_make_id), sends
 * `comm_id {unique_id}` to duetd; duetd relays it in `comm_init {backend: "nccl",
 * world_size, rank, unique_id}` and every rank calls comm_nccl_init. Under mpirun:
 * comm_nccl_bootstrap_mpi (rank 0's id broadcast over the mpi comm_t). The build is
 * non-blocking (ncclCommInitRankConfig with blocking = 0): comm_progress completes it;
 * operations posted meanwhile wait for it.
 *
 * Groups (TP). comm_nccl_group_new makes a communicator of its own for the listed world
 * ranks (the first member's id goes to the others over the world communicator). Blocking
 * collectives (comm.h's, with a timeout) run on the group's stream after the compute
 * stream's work; the _async ones are enqueued on a stream the caller names (its compute
 * stream: all-reduce in line with the kernels, no host wait).
 *
 * Threads: one owner thread per comm_t (comm.h); the watchdog thread only polls and aborts,
 * under a mutex shared with the owner's NCCL calls.
 */
#ifndef DUET_COMM_COMM_NCCL_H
#define DUET_COMM_COMM_NCCL_H

#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"

#define COMM_NCCL_ID_BYTES 128                     /* sizeof(ncclUniqueId) */
#define COMM_NCCL_ID_HEX (2 * COMM_NCCL_ID_BYTES)  /* hex digits of an id (PROTOCOL.md) */

/* ---- the table of NCCL and CUDA calls ---------------------------------------------------- */

/* What every function of the table returns. */
typedef enum {
    NCCL_API_OK = 0,
    NCCL_API_PENDING = 1, /* not finished: a build or group still in progress (ncclInProgress),
                             an event not reached yet */
    NCCL_API_ERR = -1,    /* a local failure (bad argument, CUDA error, internal) */
    NCCL_API_REMOTE = -2, /* a peer or the network failed (ncclRemoteError, ncclSystemError) */
} nccl_api_rc;

/* Handles are opaque pointers: ncclComm_t, cudaStream_t, cudaEvent_t, device pointers. A
 * NULL stream is CUDA's default stream. Every failing call leaves a message in last_error. */
typedef struct {
    void *ctx; /* the table's state, passed to every call */
    /* The message of the last failure (naming the call, the error and the device). */
    const char *(*last_error)(void *ctx);
    /* ncclGetUniqueId. */
    int (*get_unique_id)(void *ctx, uint8_t id[COMM_NCCL_ID_BYTES]);
    /* Start building rank `rank` of an nranks communicator, non-blocking: *comm is set at
     * once; OK or PENDING (then comm_status says when it is built). */
    int (*comm_init)(void *ctx, int nranks, const uint8_t id[COMM_NCCL_ID_BYTES], int rank,
                     void **comm);
    /* ncclCommGetAsyncError: OK (idle or working), PENDING (a build or group end still in
     * progress), ERR or REMOTE (the communicator failed: abort it). */
    int (*comm_status)(void *ctx, void *comm);
    /* ncclCommAbort: ends every operation of comm (also hung ones) and frees it. */
    void (*comm_abort)(void *ctx, void *comm);
    /* ncclCommFinalize + ncclCommDestroy of a healthy, idle communicator. */
    void (*comm_destroy)(void *ctx, void *comm);
    int (*group_start)(void *ctx);
    /* ncclGroupEnd: OK, or PENDING (poll comm_status of the communicators in the group). */
    int (*group_end)(void *ctx);
    /* ncclSend / ncclRecv of len bytes (ncclUint8) on stream. */
    int (*send)(void *ctx, void *comm, const void *buf, size_t len, int peer, void *stream);
    int (*recv)(void *ctx, void *comm, void *buf, size_t len, int peer, void *stream);
    /* In place: ncclAllReduce (sum, float32), ncclBroadcast (bytes), and ncclAllGather
     * (recv[nranks][len] from send[len]). */
    int (*allreduce_sum_f32)(void *ctx, void *comm, float *buf, size_t count, void *stream);
    int (*broadcast)(void *ctx, void *comm, void *buf, size_t len, int root, void *stream);
    int (*allgather)(void *ctx, void *comm, const void *send, void *recv, size_t len,
                     void *stream);
    /* A non-blocking stream (cudaStreamCreateWithFlags) / its destruction. */
    int (*stream_new)(void *ctx, void **stream);
    void (*stream_free)(void *ctx, void *stream);
    /* An event without timing / its destruction. */
    int (*event_new)(void *ctx, void **event);
    void (*event_free)(void *ctx, void *event);
    /* cudaEventRecord; cudaEventQuery: OK (reached), PENDING, ERR. */
    int (*event_record)(void *ctx, void *event, void *stream);
    int (*event_query)(void *ctx, void *event);
    /* cudaStreamWaitEvent: stream's later work waits for event's last record. */
    int (*stream_wait_event)(void *ctx, void *stream, void *event);
    /* Device memory (cudaMalloc / cudaFree) and synchronous copies host<->device. */
    int (*dev_alloc)(void *ctx, size_t len, void **ptr);
    void (*dev_free)(void *ctx, void *ptr);
    int (*copy_to_dev)(void *ctx, void *dst, const void *src, size_t len);
    int (*copy_to_host)(void *ctx, void *dst, const void *src, size_t len);
    /* Optional (may be NULL): frees ctx when the comm_t that owns the table is destroyed. */
    void (*release)(void *ctx);
} comm_nccl_api;

/* ---- the backend ------------------------------------------------------------------------- */

typedef struct comm_nccl comm_nccl_t;             /* opaque: the backend state of a comm_t */
typedef struct comm_nccl_op comm_nccl_op;         /* opaque: one send or receive */
typedef struct comm_nccl_group comm_nccl_group_t; /* opaque: a TP group's communicator */

typedef struct {
    int init_timeout_ms; /* a communicator build (world or group) that takes longer fails;
                            <= 0: 120000 */
    int watchdog_ms;     /* > 0: a host thread polls asynchronous errors that often and aborts
                            a failed communicator; 0: only comm_progress polls */
    int max_batch;       /* most operations in one group; <= 0: 128; at least 2 */
} comm_nccl_opts;

typedef enum {
    COMM_NCCL_NONE = 0, /* no communicator yet (waiting for comm_init / MPI) */
    COMM_NCCL_INIT,     /* being built (comm_progress completes it) */
    COMM_NCCL_UP,       /* built: operations flow */
    COMM_NCCL_FAILED,   /* aborted: operations fail until the next comm_nccl_init */
} comm_nccl_state;

/* A comm_t over the NCCL table api (copied; api->release, when set, frees api->ctx in
 * comm_destroy, also when this fails). *nccl (may be NULL) gets the backend state for the
 * calls below: borrowed, valid until comm_destroy(out). opts may be NULL (defaults). The
 * world is unknown (rank -1, size 0) until comm_nccl_init. */
comm_status comm_nccl_new(const comm_nccl_api *api, const comm_nccl_opts *opts, comm_t **out,
                          comm_nccl_t **nccl, char *err, size_t errlen);
/* The same over the real NCCL and CUDA runtime on CUDA device `device` (CUDA builds only:
 * comm_nccl_cuda.c, compiled with DUET_CUDA). */
comm_status comm_nccl_cuda_new(int device, const comm_nccl_opts *opts, comm_t **out,
                               comm_nccl_t **nccl, char *err, size_t errlen);
/* Only the real table (ctx allocated; its release frees it). CUDA builds only. */
comm_status comm_nccl_cuda_api(int device, comm_nccl_api *api, char *err, size_t errlen);

/* The comm_t that owns n, and back: c's backend state when c is an NCCL comm_t, else NULL. */
comm_t *comm_nccl_comm(comm_nccl_t *n);
comm_nccl_t *comm_nccl_of(const comm_t *c);
comm_nccl_state comm_nccl_get_state(const comm_nccl_t *n);
/* "none", "init", "up", "failed". Static. */
const char *comm_nccl_state_name(comm_nccl_state s);
/* How many communicators were built so far (comm_nccl_init calls that started one). */
int comm_nccl_epoch(const comm_nccl_t *n);
/* Why the communicator failed ("" when it did not). Borrowed. */
const char *comm_nccl_fail_reason(const comm_nccl_t *n);

/* ---- bootstrap ----------------------------------------------------------------------------- */

/* Lower-case hex of an id into hex[COMM_NCCL_ID_HEX + 1]. */
void comm_nccl_id_to_hex(const uint8_t id[COMM_NCCL_ID_BYTES], char hex[COMM_NCCL_ID_HEX + 1]);
/* Parse exactly COMM_NCCL_ID_HEX hex digits (either case). COMM_OK, or COMM_ERR_INVAL with a
 * message (length, first bad character and its offset) in err. */
comm_status comm_nccl_id_from_hex(const char *hex, uint8_t id[COMM_NCCL_ID_BYTES], char *err,
                                  size_t errlen);
/* A fresh unique id (ncclGetUniqueId) as hex: what world rank 0 sends in `comm_id`, at
 * registration and again after each failure of its communicator. */
comm_status comm_nccl_make_id(comm_nccl_t *n, char hex[COMM_NCCL_ID_HEX + 1]);
/* Build (or rebuild) the world communicator: this is rank `rank` of world_size, id_hex from
 * `comm_init` (or MPI). A communicator already there is aborted first (its unfinished
 * operations end with COMM_ERR_PEER); every channel restarts at seq 0. Non-blocking: the
 * state is COMM_NCCL_INIT until comm_progress sees the build done (UP) or failed or timed
 * out (FAILED). COMM_ERR_INVAL on bad arguments (nothing changed). */
comm_status comm_nccl_init(comm_nccl_t *n, int world_size, int rank, const char *id_hex);
/* Block until the communicator is UP (COMM_OK), failed (COMM_ERR_PEER), or timeout_ms
 * passed (COMM_ERR_TIMEOUT; -1: no limit). */
comm_status comm_nccl_wait_ready(comm_nccl_t *n, int timeout_ms);
/* Under mpirun: world rank 0 of mpi (a comm_t of the mpi backend, or any comm_t whose world
 * is the NCCL world) makes an id, comm_broadcast sends it to every rank, and each calls
 * comm_nccl_init with mpi's rank and size, then waits for the build (timeout_ms). Every rank
 * of mpi calls it. */
comm_status comm_nccl_bootstrap_mpi(comm_nccl_t *n, comm_t *mpi, int timeout_ms);
/* Abort the communicator now (e.g. a transfer's lease ran out on a hung peer): as an
 * asynchronous error would; why goes into the operations' messages. No-op unless INIT/UP. */
void comm_nccl_abort(comm_nccl_t *n, const char *why);

/* ---- streams, ordered transfers, operations ------------------------------------------------- */

/* The compute stream (borrowed cudaStream_t; NULL: the default stream): an operation posted
 * without an event of its own is ordered after the work queued on it when it is posted. */
void comm_nccl_set_compute_stream(comm_nccl_t *n, void *stream);
/* The transfer stream (owned by n), e.g. for kernels that pack or unpack next to transfers. */
void *comm_nccl_stream(const comm_nccl_t *n);

/* The channel id of the transfers from group src_group to group dst_group. */
uint64_t comm_nccl_chan(int src_group, int dst_group);
/* Operations with tag (the transfer's xfer id) are transfer seq of channel chan (see Order).
 * COMM_ERR_INVAL: tag already begun, or seq already passed, begun or skipped. */
comm_status comm_nccl_xfer_begin(comm_nccl_t *n, uint64_t tag, uint64_t chan, uint64_t seq);
/* Every operation of the transfer has been posted: once they are issued, later seqs go. */
comm_status comm_nccl_xfer_end(comm_nccl_t *n, uint64_t tag);
/* seq of chan has no transfer on this rank (e.g. a reservation refused before any receive
 * was posted): later seqs need not wait for it. */
comm_status comm_nccl_xfer_skip(comm_nccl_t *n, uint64_t chan, uint64_t seq);
/* Give the transfer up. Its operations not issued yet end with COMM_ERR_PEER ("released").
 * When none was issued, or it had ended with all issued, the order survives: COMM_OK (issued
 * ones still finish: keep their buffers until they do). When it had issued some and not
 * ended, the pair's order is broken (the peer's remaining matches would take later data):
 * the communicator is aborted (see Failures) and COMM_ERR_PEER is returned. Unknown tags:
 * COMM_OK. */
comm_status comm_nccl_xfer_release(comm_nccl_t *n, uint64_t tag);

/* Post a send of buf[len] (device memory) to world rank peer; it starts on the transfer stream
 * after `after` (a cudaEvent_t recorded by the caller, borrowed; it must not be recorded
 * again before the operation is issued: comm_nccl_op_issued) or, when after is NULL, after
 * the compute stream's work queued now. *op is the caller's (comm_nccl_op_free). */
comm_status comm_nccl_isend(comm_nccl_t *n, int peer, uint64_t tag, const void *buf,
                            size_t len, void *after, comm_nccl_op **op);
/* Post a receive of exactly len bytes into buf (device memory) from peer (see Order). */
comm_status comm_nccl_irecv(comm_nccl_t *n, int peer, uint64_t tag, void *buf, size_t len,
                            void *after, comm_nccl_op **op);
/* Issue what may go, poll the build, finished groups and asynchronous errors. Never blocks.
 * COMM_ERR_PEER when the communicator failed (now or before). */
comm_status comm_nccl_progress(comm_nccl_t *n);
/* Progress, then *done 1 when op finished (*len, may be NULL: bytes moved) or failed (its
 * status returned, message in the comm's last error). */
comm_status comm_nccl_op_test(comm_nccl_t *n, comm_nccl_op *op, int *done, size_t *len);
/* 1 once op is in a group handed to NCCL (its event may be recorded again). */
int comm_nccl_op_issued(const comm_nccl_op *op);
/* Make stream wait (on the GPU) for op's completion: e.g. the unpack after a receive, with
 * no host wait. COMM_ERR_INVAL when op is not issued yet (progress first). */
comm_status comm_nccl_op_stream_wait(comm_nccl_t *n, comm_nccl_op *op, void *stream);
/* Free a finished op (NULLs *op). An unfinished one is cancelled: removed when not issued,
 * else left to finish on the GPU (its buffer stays in use until comm_nccl_in_flight says
 * it is done). */
void comm_nccl_op_free(comm_nccl_t *n, comm_nccl_op **op);
/* Operations posted and not finished (cancelled ones still running included). */
int comm_nccl_in_flight(const comm_nccl_t *n);

/* ---- groups and collectives (TP) ------------------------------------------------------------ */

/* A communicator for world ranks ranks[nr] (every member passes the same list; this rank is
 * in it), built within timeout_ms (-1: opts.init_timeout_ms). Needs the world UP when nr > 1.
 * Blocking. */
comm_status comm_nccl_group_new(comm_nccl_t *n, const int *ranks, int nr, int timeout_ms,
                                comm_nccl_group_t **out);
void comm_nccl_group_destroy(comm_nccl_group_t **self_p); /* NULLs; safe twice */
/* Blocking, device memory, after the compute stream's queued work: COMM_ERR_TIMEOUT past
 * timeout_ms (-1: none; the group's communicator is then aborted: make a new group),
 * COMM_ERR_PEER when the group's communicator failed. */
comm_status comm_nccl_allreduce_sum_f32(comm_nccl_group_t *g, float *buf, size_t count,
                                        int timeout_ms);
comm_status comm_nccl_broadcast(comm_nccl_group_t *g, int root, void *buf, size_t len,
                                int timeout_ms);
comm_status comm_nccl_allgather(comm_nccl_group_t *g, const void *send, size_t len, void *recv,
                                int timeout_ms);
/* Enqueued on stream (the caller's, e.g. its compute stream) and returned: no host wait;
 * errors surface in a later call or comm_progress. */
comm_status comm_nccl_allreduce_sum_f32_async(comm_nccl_group_t *g, float *buf, size_t count,
                                              void *stream);
comm_status comm_nccl_broadcast_async(comm_nccl_group_t *g, int root, void *buf, size_t len,
                                      void *stream);
comm_status comm_nccl_allgather_async(comm_nccl_group_t *g, const void *send, size_t len,
                                      void *recv, void *stream);
/* COMM_NCCL_UP, or COMM_NCCL_FAILED once the group's communicator failed. */
comm_nccl_state comm_nccl_group_state(const comm_nccl_group_t *g);

#endif
