/* comm/comm.h: the data plane (DESIGN.md): byte ranges between world ranks, and the
 * collectives of a group of ranks, behind one interface with several backends:
 *
 *   tcp   ZeroMQ over TCP (or ipc://), host memory; workers started separately (systemd):
 *         each rank binds a data endpoint, duetd tells everyone the endpoints of the
 *         live ranks (comm_init), comm_tcp_set_world installs them.
 *   mpi   Open MPI, host memory; workers launched by `mpirun` (the world is
 *         MPI_COMM_WORLD).
 *   nccl  NVIDIA NCCL, device memory (comm/comm_nccl.c, issue 7).
 *
 * A backend is a table of functions (comm_ops) behind an opaque comm_t; comm_wrap makes a
 * comm_t from any table, so tests can put a fake transport behind the interface.
 *
 * Point to point. comm_isend / comm_irecv start an operation and return a handle
 * (comm_op_t); comm_test polls it, comm_wait blocks on it, comm_op_free releases a
 * finished one and comm_cancel abandons an unfinished one. A message is matched by
 * (source rank, tag): receives posted for the same (source, tag) are filled in the order
 * the sender issued its sends, and a message that arrives before its receive is posted is
 * kept until it is (or until comm_discard drops it). Tags are 63-bit (duet uses a KV
 * transfer's cluster-wide `xfer` id; backends with narrower tags fold them, and since
 * duet never has two transfers with colliding folded tags in flight between one pair of
 * ranks at once this keeps matching unambiguous). A send is complete when its buffer may
 * be reused or freed; that does NOT mean the peer has received it.
 *
 * Progress: nothing moves unless some comm_* call runs on the owning thread (tcp and mpi
 * do their work inside comm_test, comm_wait and comm_progress). A caller with its own
 * event loop calls comm_progress each turn, and polls comm_zsock (when not NULL) among
 * its ZeroMQ sockets to wake up when data arrives.
 *
 * Failures never hang: comm_wait takes a timeout, and an operation whose peer is gone
 * (tcp: its endpoint was withdrawn or changed by comm_tcp_set_world; mpi: an error from
 * the library) ends with COMM_ERR_PEER. Open MPI, as launched by mpirun, ends the whole job
 * when a rank dies; the tcp backend survives a dead peer.
 *
 * Groups and collectives. comm_group_new names a list of world ranks (every member passes
 * the same list, in the same order); the collectives below run over it, blocking, and
 * every member must call them in the same order. They are for tensor parallelism
 * (all-reduce of partial sums, all-gather of vocabulary shards, broadcast of a step plan).
 *
 * Threads: a comm_t and its groups and operations belong to one thread.
 * Library code: every failure is a returned status with a message in the comm's last
 * error (comm_last_error), never an exit.
 */
#ifndef DUET_COMM_COMM_H
#define DUET_COMM_COMM_H

#include <stddef.h>
#include <stdint.h>

typedef struct comm comm_t;         /* opaque: one rank's endpoint of the data plane */
typedef struct comm_op comm_op_t;   /* opaque: a pending send or receive */
typedef struct comm_group comm_group_t; /* opaque: a list of world ranks */

typedef enum {
    COMM_OK = 0,
    COMM_ERR_INVAL,       /* bad argument (NULL, rank outside the world, len too large) */
    COMM_ERR_SYS,         /* the transport failed (message names the call) */
    COMM_ERR_NOMEM,       /* out of memory */
    COMM_ERR_PEER,        /* the peer is unknown, gone, or the link to it broke */
    COMM_ERR_TIMEOUT,     /* comm_wait or a collective ran past its timeout */
    COMM_ERR_TRUNC,       /* a message larger than the receive buffer arrived (dropped) */
    COMM_ERR_UNSUPPORTED, /* the backend does not do this (e.g. mpi not built in) */
} comm_status;

typedef enum {
    COMM_BACKEND_TCP = 0,
    COMM_BACKEND_MPI = 1,
    COMM_BACKEND_NCCL = 2,
} comm_backend;

/* "ok", "invalid argument", ... Static. */
const char *comm_strerror(comm_status s);
/* "tcp", "mpi", "nccl". Static. */
const char *comm_backend_name(comm_backend b);

/* ---- the backend table ------------------------------------------------------------------ */

/* What a backend implements. impl is the backend's own state (comm_wrap's argument). Every
 * function may set a message with comm_set_error. Functions a backend does not have may be
 * NULL: isend, irecv, test answer COMM_ERR_UNSUPPORTED; progress answers COMM_OK and discard,
 * zsock, group_new, group_free do nothing; missing collectives are built by comm.c on
 * isend/irecv/test (COMM_ERR_UNSUPPORTED when those are missing too); rank -1, size 0. */
typedef struct {
    comm_backend backend;
    int (*rank)(void *impl);
    int (*size)(void *impl);
    /* Start a send of buf[len] to peer / a receive of at most cap bytes into buf from peer.
     * *op gets the backend's handle (freed by op_free). */
    comm_status (*isend)(comm_t *c, void *impl, int peer, uint64_t tag, const void *buf,
                         size_t len, void **op);
    comm_status (*irecv)(comm_t *c, void *impl, int peer, uint64_t tag, void *buf, size_t cap,
                         void **op);
    /* *done 1 when finished (then *len: bytes received, or sent); a failed operation
     * returns its error (and counts as finished). */
    comm_status (*test)(comm_t *c, void *impl, void *op, int *done, size_t *len);
    /* Abandon an operation (finished or not) and free its handle. */
    void (*cancel)(comm_t *c, void *impl, void *op);
    /* Free a finished operation's handle. */
    void (*op_free)(comm_t *c, void *impl, void *op);
    /* Drop every message from peer with tag, queued now or arriving later. */
    void (*discard)(comm_t *c, void *impl, int peer, uint64_t tag);
    /* Move data; never blocks. */
    comm_status (*progress)(comm_t *c, void *impl);
    /* A ZeroMQ socket to poll for incoming data, or NULL. */
    void *(*zsock)(void *impl);
    /* Collectives over ranks[n] (see above); gimpl is the group's backend state made by
     * group_new (NULL when the backend keeps none). */
    comm_status (*group_new)(comm_t *c, void *impl, const int *ranks, int n, void **gimpl);
    void (*group_free)(comm_t *c, void *impl, void *gimpl);
    comm_status (*allreduce_sum_f32)(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                                     float *buf, size_t count, int timeout_ms);
    comm_status (*broadcast)(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                             int root, void *buf, size_t len, int timeout_ms);
    comm_status (*allgather)(comm_t *c, void *impl, void *gimpl, const int *ranks, int n,
                             const void *send, size_t len, void *recv, int timeout_ms);
    /* Free impl. */
    void (*destroy)(void *impl);
} comm_ops;

/* A comm_t over a backend table (borrowed: static) and its state (owned from now on: freed
 * by ops->destroy in comm_destroy, also when comm_wrap fails). */
comm_status comm_wrap(const comm_ops *ops, void *impl, comm_t **out);
/* NULLs *self_p; safe on NULL and twice. Groups go first (comm_group_destroy). Operations
 * still held are cancelled and freed here (their comm_op_t pointers die with the comm). When
 * it returns the transport holds no buffer of the caller's any more (tcp waits for ZeroMQ to
 * let go of cancelled sends, see comm_cancel). */
void comm_destroy(comm_t **self_p);

/* For backends: record the last error's message (printf format). */
void comm_set_error(comm_t *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* For backends: c's impl when c runs on the table ops, else NULL (e.g. comm_tcp_endpoint on
 * a comm_t of another backend). */
void *comm_impl_of(const comm_t *c, const comm_ops *ops);
/* The last error's message ("" when none). Borrowed until the next call. */
const char *comm_last_error(const comm_t *c);

comm_backend comm_backend_of(const comm_t *c);
int comm_rank(const comm_t *c);  /* this rank in the world, or -1 before it has one (tcp) */
int comm_size(const comm_t *c);  /* ranks in the world, or 0 before it is known (tcp) */

/* ---- point to point ------------------------------------------------------------------------ */

/* Tags must be < 2^63 (bit 63 belongs to the generic collectives): COMM_ERR_INVAL. A peer
 * outside the world: COMM_ERR_INVAL; a peer not live (tcp: no endpoint): COMM_ERR_PEER.
 * tcp: the send is complete when ZeroMQ has let go of buf (written to the kernel, or
 * dropped when the peer was withdrawn), zero-copy. mpi: when MPI_Isend's request completes;
 * len and cap above INT_MAX are refused (COMM_ERR_INVAL) / clamped. A receive posted for a
 * (peer, tag) that comm_discard dropped fails with COMM_ERR_INVAL. */
comm_status comm_isend(comm_t *c, int peer, uint64_t tag, const void *buf, size_t len,
                       comm_op_t **op);
comm_status comm_irecv(comm_t *c, int peer, uint64_t tag, void *buf, size_t cap, comm_op_t **op);
/* *done 1 when op has finished; then *len (may be NULL) gets the bytes moved. Returns the
 * operation's error when it failed. */
comm_status comm_test(comm_t *c, comm_op_t *op, int *done, size_t *len);
/* Block until op finishes or timeout_ms passes (-1: no limit): COMM_ERR_TIMEOUT (op is
 * still pending then). Polls comm_zsock while it waits, so incoming data wakes it at once. */
comm_status comm_wait(comm_t *c, comm_op_t *op, int timeout_ms, size_t *len);
/* Free a finished op; NULLs *op. */
void comm_op_free(comm_t *c, comm_op_t **op);
/* Abandon op, finished or not, and free it; NULLs *op. An abandoned receive's message is
 * dropped when it arrives (if it was not already received); a later receive for the same
 * (peer, tag) gets the message after it. A send cannot be taken back once the transport
 * holds it: its buffer must stay valid until the send would have finished, the peer is
 * withdrawn (tcp) or comm_destroy returns; comm_progress frees the handle's remains. */
void comm_cancel(comm_t *c, comm_op_t **op);
/* Drop every message from peer with tag, queued now or arriving later (a transfer given
 * up). The comm remembers the last few thousand (tcp) / 256 (mpi) discarded pairs; older
 * ones are forgotten. Receives already posted for the pair stay posted. */
void comm_discard(comm_t *c, int peer, uint64_t tag);
comm_status comm_progress(comm_t *c);
void *comm_zsock(comm_t *c);

/* ---- groups and collectives ---------------------------------------------------------------- */

/* A group of the world ranks ranks[n] (copied), which must include this rank. At most one
 * live group per distinct list (the generic collectives' tags come from the list). mpi:
 * blocking (MPI_Comm_create_group over the members). A group must be destroyed before its
 * comm. */
comm_status comm_group_new(comm_t *c, const int *ranks, int n, comm_group_t **out);
void comm_group_destroy(comm_group_t **self_p);
int comm_group_size(const comm_group_t *g);
int comm_group_index(const comm_group_t *g); /* this rank's index in the list */
/* In place: buf[count] = the sum over the members, taken at index 0 in list order,
 * ((m0 + m1) + m2) + ... in float, and sent to every member: every member, and every
 * backend with a host implementation (tcp, mpi), gets the same bits.
 * After COMM_ERR_TIMEOUT the generic (tcp) collectives stay usable (the late messages are
 * dropped); an mpi group is broken (its later collectives fail: make a new group). */
comm_status comm_allreduce_sum_f32(comm_group_t *g, float *buf, size_t count, int timeout_ms);
/* buf[len] of the member at index root to every member. */
comm_status comm_broadcast(comm_group_t *g, int root, void *buf, size_t len, int timeout_ms);
/* recv[n][len] = every member's send[len], in list order. */
comm_status comm_allgather(comm_group_t *g, const void *send, size_t len, void *recv,
                           int timeout_ms);

/* ---- the tcp backend (comm_tcp.c) ------------------------------------------------------ */

/* Bind a data endpoint ("tcp://HOST:PORT", port 0 or "*" for a free one, or ipc://PATH).
 * zctx: a ZeroMQ context to use (borrowed), or NULL for one of its own. The world is
 * unknown until comm_tcp_set_world. */
comm_status comm_tcp_new(const char *bind_endpoint, void *zctx, comm_t **out, char *err,
                         size_t errlen);
/* The endpoint peers connect to (the bound one, with the port resolved and a wildcard
 * host replaced by 127.0.0.1). Borrowed. */
const char *comm_tcp_endpoint(const comm_t *c);
/* The world: this rank, and endpoints[world_size] (NULL or "" for a rank that is not live).
 * May be called again whenever duetd's list changes: operations with a peer whose endpoint
 * was withdrawn or changed end with COMM_ERR_PEER (a send once ZeroMQ has dropped it:
 * promptly), what this rank queued for it is dropped, and a fresh connection goes to the
 * new endpoint. Messages name their sender's own endpoint in the sender's world: those from
 * an incarnation other than the one this world names are dropped when the peer changes
 * (the old one's), or wait until it does (a sender whose world is newer). An unchanged
 * entry changes nothing. A connect that fails leaves that rank not live: COMM_ERR_SYS. */
comm_status comm_tcp_set_world(comm_t *c, int rank, int world_size,
                               const char *const *endpoints);

/* ---- the mpi backend (comm_mpi.c) ------------------------------------------------------- */

/* 1 when this process was started by mpirun (Open MPI's or PMIx's rank variables are set). */
int comm_mpi_launched(void);
/* MPI_Init_thread (once per process; MPI_THREAD_FUNNELED) and a comm_t over
 * MPI_COMM_WORLD. */
comm_status comm_mpi_new(comm_t **out, char *err, size_t errlen);
/* MPI_Finalize, after every mpi comm_t is destroyed (once, at the end of main). */
void comm_mpi_finalize(void);

#endif
