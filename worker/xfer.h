/* worker/xfer.h: a worker's KV transfers over the data plane (comm/): the prefill side
 * ships a request's KV layer by layer while its forward pass runs; the decode side
 * reserves blocks for it, receives straight into them and says when all of it is there.
 * The protocol around it (reserve, reserved, kv_ready, kv_ack, release, leases) is
 * docs/PROTOCOL.md's; this module is its data part, without messages to duetd.
 *
 * The wire: for each layer l (in order) and each pair (source rank, destination rank)
 * whose KV heads overlap, ONE message with tag = the transfer's xfer id: a kv_pack_range
 * buffer of layer l, the overlapping heads, positions [tok0, n_tokens) (tok0 = the
 * destination's cached prefix, first_block * block_tokens), followed by an 8-byte
 * checksum of that buffer (0 when the sender does not compute it). Messages of one pair
 * and one xfer are matched in send order (comm.h), so the receiver posts one receive per
 * layer and source, in layer order, at reserve time. Both sides know the sizes from the
 * shared KV layout, so nothing else goes on the wire.
 *
 * Checksums: computed and checked unless the build defines NDEBUG; a mismatch fails the
 * transfer (never decode from KV that is not what left).
 *
 * Leases: every transfer has a lease, and a transfer that outlives it is freed with all
 * it held. A send must complete within lease_ms of its first layer shipped (else
 * XFER_EV_FAILED). A reception's clock starts when its first message lands or when the
 * source says it sent everything (xfer_expect: the decode assign came), and each message
 * that lands restarts it: a reception that stops making progress for lease_ms is freed
 * with XFER_EV_EXPIRED, and so is a complete one not taken within lease_ms. Before that,
 * a reservation waits for its prefill however long the prefill group's queue is: duetd,
 * which knows whether the request and the prefill worker are still alive, releases it
 * otherwise (and the worker drops every transfer when it loses duetd).
 *
 * Fault injection (tests): with DUET_FAULT_DROP_LAYER=L in the environment, the sender
 * packs layer L but never sends it and counts it as sent, as a transfer cut on the wire
 * would look to the receiver (whose lease then expires).
 *
 * Threads: one thread (the worker's loop). xfer_ship may run inside the scheduler's layer
 * hook (it only reads the KV cache).
 */
#ifndef DUET_WORKER_XFER_H
#define DUET_WORKER_XFER_H

#include <stddef.h>
#include <stdint.h>

#include "comm/comm.h"
#include "kv/kv.h"

typedef struct xfer_engine xfer_t; /* opaque */

typedef enum {
    XFER_OK = 0,
    XFER_ERR_INVAL,   /* bad argument, unknown or duplicate transfer, layouts that do not match */
    XFER_ERR_FULL,    /* not enough free KV blocks (after eviction) for the reservation */
    XFER_ERR_COMM,    /* the data plane refused (message from comm_last_error) or is absent */
    XFER_ERR_NOMEM,
} xfer_status;

/* A rank on the other side and the global KV heads it holds. */
typedef struct {
    int rank;
    int head0, n_heads;
} xfer_peer;

typedef enum {
    XFER_EV_RECEIVED = 0, /* decode side: all KV arrived (take it with xfer_take) */
    XFER_EV_SENT,         /* prefill side: every send completed (the buffers are free) */
    XFER_EV_FAILED,       /* either side: the transfer broke (msg says how); it is freed */
    XFER_EV_EXPIRED,      /* either side: its lease ran out; it is freed */
} xfer_event_type;

typedef struct {
    xfer_event_type type;
    int64_t xfer;
    uint64_t rid;
    int n_tokens;      /* context tokens of the transfer */
    int tok0;          /* first position moved (the receiver's cached prefix) */
    size_t bytes;      /* payload bytes moved by this rank (all layers, all peers) */
    double ms;         /* from reserve (decode) or the first layer shipped (prefill) to the end */
    double tail_ms;    /* SENT: from the last layer shipped to the end, the part of the send
                          that the prefill's forward pass did not hide (an upper bound: the
                          end is seen at the next xfer_poll) */
    char msg[192];     /* FAILED / EXPIRED: what happened */
} xfer_event;

typedef struct {
    int64_t sent, received, failed, expired; /* transfers */
    int64_t bytes_sent, bytes_received;      /* payload */
    double ms_sent, ms_received;             /* summed durations */
    int in_flight;                           /* transfers held now (both directions) */
    int blocks_reserved;                     /* KV blocks held by receptions now */
} xfer_stats;

/* An engine over kv (borrowed; outlives it), whose shard is this rank's KV heads. */
xfer_status xfer_new(kv_cache_t *kv, xfer_t **out);
/* Drops every transfer (their blocks freed, operations cancelled); NULLs *self_p. */
void xfer_destroy(xfer_t **self_p);
/* The data plane (borrowed), or NULL. Changing it drops every transfer in flight (each gets
 * an XFER_EV_FAILED event). Buffers of sends that the old transport may still read are kept
 * until xfer_destroy, so the order at the end is: xfer_set_comm(x, NULL), comm_destroy,
 * xfer_destroy. */
void xfer_set_comm(xfer_t *x, comm_t *comm);

/* ---- decode side -------------------------------------------------------------------------- */

/* Reserve a transfer: a new KV sequence with the cached prefix of ctx[n] attached and
 * blocks for the rest (and for one more token), receives posted from the sources src[n_src]
 * (each source's heads that overlap this shard). *cached gets the prefix (a multiple of
 * block_tokens; the sender starts there). lease_ms: see Leases above. A reservation with
 * nothing to receive (all cached) is complete at once. XFER_ERR_FULL without room
 * (nothing kept). */
xfer_status xfer_reserve(xfer_t *x, int64_t xfer, uint64_t rid, const int32_t *ctx, int n,
                         const xfer_peer *src, int n_src, int lease_ms, int *cached,
                         char *err, size_t errlen);
/* The source says every message of reception xfer is sent (the decode assign came): its
 * lease clock starts now if no message started it. Unknown ids are ignored. */
void xfer_expect(xfer_t *x, int64_t xfer);
/* 1 when the reception of xfer is complete (all KV arrived), 0 when not (or unknown). */
int xfer_received(const xfer_t *x, int64_t xfer);
/* Hand a complete reception's KV sequence to the caller (who owns it from now on: give it
 * to the scheduler with has_kv, or kv_seq_free it); its full blocks are committed to the
 * prefix cache. *seq and *n_tokens (context tokens, all with K/V). The transfer is forgotten.
 * XFER_ERR_INVAL when xfer is unknown or not complete. */
xfer_status xfer_take(xfer_t *x, int64_t xfer, int *seq, int *n_tokens);

/* ---- prefill side ----------------------------------------------------------------------- */

/* Announce that request rid's KV goes to dst[n_dst] from block first_block on (tag xfer).
 * Nothing moves until xfer_ship; from the first layer shipped, the sends have lease_ms to
 * complete. */
xfer_status xfer_send_begin(xfer_t *x, int64_t xfer, uint64_t rid, const xfer_peer *dst, int n_dst,
                            int first_block, int lease_ms, char *err, size_t errlen);
/* The transfer announced for rid, or 0. */
int64_t xfer_of_rid(const xfer_t *x, uint64_t rid);
/* Layer `layer` of sequence seq is final for positions [0, n_tokens): pack and send it
 * (for every destination). Called for layers 0, 1, ... in order (the scheduler's layer
 * hook). A failure fails the transfer (an XFER_EV_FAILED event follows). */
void xfer_ship(xfer_t *x, int64_t xfer, int seq, int layer, int n_tokens);

/* ---- both ------------------------------------------------------------------------------- */

/* Drop a transfer (release, cancel, or a failed peer): operations cancelled, its messages
 * discarded, its blocks and buffers freed. Unknown ids are ignored. */
void xfer_release(xfer_t *x, int64_t xfer);
/* Move data, complete receptions and sends, expire leases (now_ms: monotonic). Never blocks. */
void xfer_poll(xfer_t *x, int64_t now_ms);
/* Take the next event (after xfer_poll or the calls above); 1 when one was taken, 0 when none. */
int xfer_next_event(xfer_t *x, xfer_event *ev);
/* 1 when xfer is held here (either side, complete or not). */
int xfer_holds(const xfer_t *x, int64_t xfer);
/* Drop every transfer without events (the worker lost duetd: everything it held is gone). */
void xfer_clear(xfer_t *x);
/* Transfers in flight. */
int xfer_busy(const xfer_t *x);
void xfer_get_stats(const xfer_t *x, xfer_stats *out);

/* The checksum of the wire (exposed for tests): 64-bit, over len bytes. */
uint64_t xfer_checksum(const void *p, size_t len);

#endif
