/* daemon/proto.c: framing, schemas and builders of duet.client/1 and duet.worker/1.
 *
 * Every body type is a table of fields (name, type, place in the C struct, default,
 * range, length and count bounds); one parser, one builder, one init and one free walk
 * those tables, so that every message gets the same checks and the same error wording,
 * and the JSON field names are the C member names. Rules that tie several fields
 * together are small `check` functions run after the fields parse.
 */
#include "daemon/proto.h"

#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zmq.h>

/* ---- names ---------------------------------------------------------------------------- */

enum { K_CLIENT = 1, K_WORKER = 2 };

static const struct {
    const char *name;
    unsigned kinds; /* K_CLIENT | K_WORKER */
} cmd_table[PROTO_CMD__COUNT] = {
    [PROTO_CMD_NONE] = {"", 0},
    [PROTO_CMD_GENERATE] = {"generate", K_CLIENT},
    [PROTO_CMD_CANCEL] = {"cancel", K_CLIENT | K_WORKER},
    [PROTO_CMD_STATUS] = {"status", K_CLIENT},
    [PROTO_CMD_HEALTH] = {"health", K_CLIENT},
    [PROTO_CMD_ACCEPTED] = {"accepted", K_CLIENT},
    [PROTO_CMD_DELTA] = {"delta", K_CLIENT},
    [PROTO_CMD_DONE] = {"done", K_CLIENT},
    [PROTO_CMD_ERROR] = {"error", K_CLIENT | K_WORKER},
    [PROTO_CMD_REGISTER] = {"register", K_WORKER},
    [PROTO_CMD_REGISTERED] = {"registered", K_WORKER},
    [PROTO_CMD_REFUSED] = {"refused", K_WORKER},
    [PROTO_CMD_HEARTBEAT] = {"heartbeat", K_WORKER},
    [PROTO_CMD_ASSIGN] = {"assign", K_WORKER},
    [PROTO_CMD_TOKENS] = {"tokens", K_WORKER},
    [PROTO_CMD_FINISHED] = {"finished", K_WORKER},
    [PROTO_CMD_FAILED] = {"failed", K_WORKER},
    [PROTO_CMD_RESERVE] = {"reserve", K_WORKER},
    [PROTO_CMD_RESERVED] = {"reserved", K_WORKER},
    [PROTO_CMD_KV_READY] = {"kv_ready", K_WORKER},
    [PROTO_CMD_KV_ACK] = {"kv_ack", K_WORKER},
    [PROTO_CMD_RELEASE] = {"release", K_WORKER},
    [PROTO_CMD_COMM_ID] = {"comm_id", K_WORKER},
    [PROTO_CMD_COMM_INIT] = {"comm_init", K_WORKER},
};

static unsigned kind_bit(proto_kind k) { return k == PROTO_WORKER ? K_WORKER : K_CLIENT; }

const char *proto_cmd_name(proto_cmd c)
{
    return ((int)c > 0 && c < PROTO_CMD__COUNT) ? cmd_table[c].name : "";
}

proto_cmd proto_cmd_lookup(proto_kind kind, const char *name, size_t len)
{
    if (!name) return PROTO_CMD_NONE;
    for (int c = 1; c < PROTO_CMD__COUNT; c++)
        if ((cmd_table[c].kinds & kind_bit(kind)) && strlen(cmd_table[c].name) == len &&
            memcmp(cmd_table[c].name, name, len) == 0)
            return (proto_cmd)c;
    return PROTO_CMD_NONE;
}

const char *proto_tag(proto_kind kind)
{
    return kind == PROTO_WORKER ? PROTO_WORKER_TAG : PROTO_CLIENT_TAG;
}

proto_kind proto_side_kind(proto_side side)
{
    return (side == PROTO_SIDE_WORKER || side == PROTO_SIDE_DUETD_WORKERS) ? PROTO_WORKER
                                                                           : PROTO_CLIENT;
}

proto_sender proto_side_expects(proto_side side)
{
    return (side == PROTO_SIDE_CLIENT || side == PROTO_SIDE_WORKER) ? PROTO_FROM_DUETD
                                                                    : PROTO_FROM_PEER;
}

static const char *const code_names[PROTO_ERR__COUNT] = {
    [PROTO_ERR_NONE] = "none",
    [PROTO_ERR_BAD_FRAMES] = "bad_frames",
    [PROTO_ERR_UNKNOWN_PROTOCOL] = "unknown_protocol",
    [PROTO_ERR_UNSUPPORTED_VERSION] = "unsupported_version",
    [PROTO_ERR_UNKNOWN_COMMAND] = "unknown_command",
    [PROTO_ERR_UNEXPECTED_COMMAND] = "unexpected_command",
    [PROTO_ERR_BAD_JSON] = "bad_json",
    [PROTO_ERR_TOO_LARGE] = "too_large",
    [PROTO_ERR_BAD_REQUEST] = "bad_request",
    [PROTO_ERR_DUPLICATE_ID] = "duplicate_id",
    [PROTO_ERR_PROMPT_TOO_LONG] = "prompt_too_long",
    [PROTO_ERR_BUSY] = "busy",
    [PROTO_ERR_SESSION_BUSY] = "session_busy",
    [PROTO_ERR_UNAVAILABLE] = "unavailable",
    [PROTO_ERR_NOT_FOUND] = "not_found",
    [PROTO_ERR_CANCELLED] = "cancelled",
    [PROTO_ERR_SHUTTING_DOWN] = "shutting_down",
    [PROTO_ERR_WORKER_LOST] = "worker_lost",
    [PROTO_ERR_SLOW_CLIENT] = "slow_client",
    [PROTO_ERR_INTERNAL] = "internal",
    [PROTO_ERR_MODEL_MISMATCH] = "model_mismatch",
    [PROTO_ERR_LAYOUT_MISMATCH] = "layout_mismatch",
    [PROTO_ERR_NO_SLOT] = "no_slot",
    [PROTO_ERR_DUPLICATE_WORKER] = "duplicate_worker",
    [PROTO_ERR_KV_FULL] = "kv_full",
    [PROTO_ERR_TRANSFER_FAILED] = "transfer_failed",
    [PROTO_ERR_LEASE_EXPIRED] = "lease_expired",
    [PROTO_ERR_OTHER] = "other",
};

const char *proto_code_name(proto_code c)
{
    return ((int)c >= 0 && c < PROTO_ERR__COUNT) ? code_names[c] : "";
}

proto_code proto_code_lookup(const char *name)
{
    if (name)
        for (int c = 0; c < PROTO_ERR__COUNT; c++)
            if (strcmp(code_names[c], name) == 0) return (proto_code)c;
    return PROTO_ERR_OTHER;
}

static const char *const role_names[] = {"both", "prefill", "decode", "any"};
static const char *const finish_names[] = {"stop", "length", "eos", "cancelled"};

const char *proto_role_name(proto_role r)
{
    return ((int)r >= 0 && r <= PROTO_ROLE_ANY) ? role_names[r] : "";
}

const char *proto_finish_name(proto_finish f)
{
    return ((int)f >= 0 && f <= PROTO_FINISH_CANCELLED) ? finish_names[f] : "";
}

/* ---- errors ----------------------------------------------------------------------------- */

static int verr(proto_err *err, proto_code code, const char *fmt, va_list ap)
{
    if (err) {
        err->code = code;
        vsnprintf(err->message, sizeof err->message, fmt, ap);
    }
    return -1;
}

int proto_err_set(proto_err *err, proto_code code, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    verr(err, code, fmt, ap);
    va_end(ap);
    return -1;
}

static void err_reset(proto_err *err)
{
    if (!err) return;
    err->code = PROTO_ERR_NONE;
    err->message[0] = '\0';
    err->id[0] = '\0';
    err->cmd = PROTO_CMD_NONE;
}

/* Writes data[n] into dst[cap] as a quoted, printable excerpt: 'abc\x01...'. */
static void quote(char *dst, size_t cap, const void *data, size_t n)
{
    const unsigned char *s = data;
    size_t o = 0, shown = n < 40 ? n : 40;
    if (cap < 8) {
        if (cap) dst[0] = '\0';
        return;
    }
    dst[o++] = '\'';
    for (size_t i = 0; i < shown && o + 8 < cap; i++) {
        if (s[i] >= 0x20 && s[i] < 0x7f && s[i] != '\'' && s[i] != '\\')
            dst[o++] = (char)s[i];
        else
            o += (size_t)snprintf(dst + o, cap - o, "\\x%02x", s[i]);
    }
    if (shown < n && o + 5 < cap) {
        memcpy(dst + o, "...", 3);
        o += 3;
    }
    dst[o++] = '\'';
    dst[o] = '\0';
}

/* ---- framing ------------------------------------------------------------------------------ */

void proto_msg_clear(proto_msg *msg)
{
    if (!msg) return;
    json_decref(msg->body);
    msg->body = NULL;
    msg->cmd = PROTO_CMD_NONE;
    msg->route.n = 0;
}

static const char *json_type_word(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "object";
    case JSON_ARRAY: return "array";
    case JSON_STRING: return "string";
    case JSON_INTEGER: return "integer";
    case JSON_REAL: return "number";
    case JSON_TRUE:
    case JSON_FALSE: return "boolean";
    case JSON_NULL: return "null";
    }
    return "value";
}

/* frames[0, n_have) are readable; n_total frames arrived in all. */
static proto_rc decode(const proto_frame *frames, int n_have, int n_total, proto_side side,
                       int n_route, proto_msg *msg, proto_err *err)
{
    proto_kind kind = proto_side_kind(side);
    const char *tag = proto_tag(kind);
    char q[200];
    msg->route.n = 0;
    msg->kind = kind;
    msg->cmd = PROTO_CMD_NONE;
    msg->body = NULL;
    err_reset(err);

    for (int i = 0; i < n_route && i < n_have; i++) {
        if (frames[i].size > PROTO_MAX_ROUTE_LEN) {
            proto_err_set(err, PROTO_ERR_BAD_FRAMES,
                          "routing frame %d holds %zu bytes (at most %d)", i, frames[i].size,
                          PROTO_MAX_ROUTE_LEN);
            return PROTO_INVALID;
        }
        if (frames[i].size) memcpy(msg->route.id[i], frames[i].data, frames[i].size);
        msg->route.len[i] = frames[i].size;
        msg->route.n = i + 1;
    }
    int n = n_total - n_route;
    if (n != 3) {
        if (n == 4 && n_have > n_route && frames[n_route].size == 0)
            proto_err_set(err, PROTO_ERR_BAD_FRAMES,
                          "expected 3 frames (tag, command, body), got 4 starting with an empty "
                          "frame: use a DEALER socket (no REQ-style empty delimiter)");
        else
            proto_err_set(err, PROTO_ERR_BAD_FRAMES,
                          "expected 3 frames (tag, command, body) after %d routing frame%s, got %d",
                          n_route, n_route == 1 ? "" : "s", n < 0 ? 0 : n);
        return PROTO_INVALID;
    }
    const proto_frame *f0 = &frames[n_route], *f1 = f0 + 1, *f2 = f0 + 2;

    /* frame 0: "duet.<name>/<version>" */
    size_t tl = strlen(tag), nl = strchr(tag, '/') - tag; /* "duet.client" */
    if (f0->size != tl || memcmp(f0->data, tag, tl) != 0) {
        const char *s = f0->data;
        quote(q, sizeof q, f0->data, f0->size);
        const char *other = proto_tag(kind == PROTO_CLIENT ? PROTO_WORKER : PROTO_CLIENT);
        size_t ol = strchr(other, '/') - other;
        if (f0->size > nl && memcmp(s, tag, nl + 1) == 0)
            proto_err_set(err, PROTO_ERR_UNSUPPORTED_VERSION,
                          "frame 0: %s is not a supported version of %.*s; this peer speaks %s", q,
                          (int)nl, tag, tag);
        else if (f0->size > ol && memcmp(s, other, ol + 1) == 0)
            proto_err_set(err, PROTO_ERR_UNKNOWN_PROTOCOL,
                          "frame 0: %s is the %s protocol; this socket speaks %s", q,
                          kind == PROTO_CLIENT ? "worker" : "client", tag);
        else
            proto_err_set(err, PROTO_ERR_UNKNOWN_PROTOCOL,
                          "frame 0: %s is not a duet protocol tag; this socket speaks %s", q, tag);
        return PROTO_INVALID;
    }

    /* frame 1: the command */
    proto_cmd cmd = f1->size <= PROTO_MAX_CMD ? proto_cmd_lookup(kind, f1->data, f1->size)
                                              : PROTO_CMD_NONE;
    if (cmd == PROTO_CMD_NONE) {
        char list[400];
        size_t o = 0;
        for (int c = 1; c < PROTO_CMD__COUNT && o < sizeof list; c++)
            if (cmd_table[c].kinds & kind_bit(kind))
                o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", o ? ", " : "",
                                      cmd_table[c].name);
        quote(q, sizeof q, f1->data, f1->size);
        proto_err_set(err, PROTO_ERR_UNKNOWN_COMMAND, "frame 1: unknown command %s (%s has: %s)",
                      q, tag, list);
        return PROTO_INVALID;
    }
    msg->cmd = cmd;
    if (err) err->cmd = cmd;
    proto_sender from = proto_side_expects(side);
    if (proto_body_type(kind, cmd, from) == PROTO_T_NONE) {
        const char *peer = kind == PROTO_CLIENT ? "a client" : "a worker";
        if (from == PROTO_FROM_PEER)
            proto_err_set(err, PROTO_ERR_UNEXPECTED_COMMAND,
                          "frame 1: '%s' is sent by duetd, not by %s", proto_cmd_name(cmd), peer);
        else
            proto_err_set(err, PROTO_ERR_UNEXPECTED_COMMAND,
                          "frame 1: '%s' is sent by %s, not by duetd", proto_cmd_name(cmd), peer);
        return PROTO_INVALID;
    }

    /* frame 2: a JSON object */
    if (f2->size > PROTO_MAX_BODY) {
        proto_err_set(err, PROTO_ERR_TOO_LARGE, "frame 2: body of %zu bytes is over the limit of %u",
                      f2->size, PROTO_MAX_BODY);
        return PROTO_INVALID;
    }
    if (f2->size == 0) {
        proto_err_set(err, PROTO_ERR_BAD_JSON,
                      "frame 2 is empty: the body must be a JSON object (at least {})");
        return PROTO_INVALID;
    }
    json_error_t je;
    json_t *body = json_loadb(f2->data, f2->size, JSON_DECODE_ANY | JSON_REJECT_DUPLICATES, &je);
    if (!body) {
        proto_err_set(err, PROTO_ERR_BAD_JSON, "frame 2: invalid JSON at line %d column %d: %s",
                      je.line, je.column, je.text);
        return PROTO_INVALID;
    }
    if (!json_is_object(body)) {
        proto_err_set(err, PROTO_ERR_BAD_JSON, "frame 2: the body must be a JSON object, not %s %s",
                      json_is_array(body) || json_is_integer(body) ? "an" : "a",
                      json_type_word(body));
        json_decref(body);
        return PROTO_INVALID;
    }
    msg->body = body;
    return PROTO_OK;
}

proto_rc proto_decode(const proto_frame *frames, int n, proto_side side, int n_route,
                      proto_msg *msg, proto_err *err)
{
    if (!msg || (n > 0 && !frames) || n < 0 || n_route < 0 || n_route > PROTO_MAX_ROUTE) {
        errno = EINVAL;
        proto_err_set(err, PROTO_ERR_INTERNAL, "proto_decode: bad arguments");
        return PROTO_SYSERR;
    }
    return decode(frames, n, n, side, n_route, msg, err);
}

#define MAX_PARTS (PROTO_MAX_ROUTE + 4)

proto_rc proto_recv(void *sock, proto_side side, int n_route, int timeout_ms, proto_msg *msg,
                    proto_err *err)
{
    if (!sock || !msg || timeout_ms < 0 || n_route < 0 || n_route > PROTO_MAX_ROUTE) {
        errno = EINVAL;
        proto_err_set(err, PROTO_ERR_INTERNAL, "proto_recv: bad arguments");
        return PROTO_SYSERR;
    }
    msg->body = NULL;
    msg->route.n = 0;
    msg->cmd = PROTO_CMD_NONE;
    msg->kind = proto_side_kind(side);
    zmq_pollitem_t it = {.socket = sock, .events = ZMQ_POLLIN};
    int rc = zmq_poll(&it, 1, timeout_ms);
    if (rc < 0) {
        int e = errno;
        proto_err_set(err, PROTO_ERR_INTERNAL, "zmq_poll: %s", zmq_strerror(e));
        errno = e;
        return PROTO_SYSERR;
    }
    if (rc == 0) return PROTO_TIMEOUT;

    zmq_msg_t parts[MAX_PARTS];
    int n_have = 0, n_total = 0, more = 1;
    proto_rc out = PROTO_OK;
    while (more) {
        zmq_msg_t scratch, *m = n_have < MAX_PARTS ? &parts[n_have] : &scratch;
        zmq_msg_init(m);
        if (zmq_msg_recv(m, sock, ZMQ_DONTWAIT) < 0) {
            int e = errno;
            zmq_msg_close(m);
            if (e == EAGAIN && n_total == 0) {
                out = PROTO_TIMEOUT;
            } else {
                proto_err_set(err, PROTO_ERR_INTERNAL, "zmq_msg_recv: %s", zmq_strerror(e));
                out = PROTO_SYSERR;
            }
            errno = e;
            break;
        }
        more = zmq_msg_more(m);
        if (m == &scratch)
            zmq_msg_close(m);
        else
            n_have++;
        n_total++;
    }
    if (out == PROTO_OK) {
        proto_frame frames[MAX_PARTS];
        for (int i = 0; i < n_have; i++) {
            frames[i].data = zmq_msg_data(&parts[i]);
            frames[i].size = zmq_msg_size(&parts[i]);
        }
        out = decode(frames, n_have, n_total, side, n_route, msg, err);
    }
    for (int i = 0; i < n_have; i++) zmq_msg_close(&parts[i]);
    return out;
}

static void free_buf(void *data, void *hint)
{
    (void)hint;
    free(data);
}

int proto_send(void *sock, const proto_route *route, proto_kind kind, proto_cmd cmd,
               json_t **body_p, int flags)
{
    json_t *body = body_p ? *body_p : NULL;
    if (body_p) *body_p = NULL;
    if (!sock || (kind != PROTO_CLIENT && kind != PROTO_WORKER) || (int)cmd <= 0 ||
        cmd >= PROTO_CMD__COUNT || !(cmd_table[cmd].kinds & kind_bit(kind)) ||
        (flags & ~ZMQ_DONTWAIT) || (body && !json_is_object(body)) ||
        (route && (route->n < 0 || route->n > PROTO_MAX_ROUTE))) {
        json_decref(body);
        errno = EINVAL;
        return -1;
    }
    char *text = body ? json_dumps(body, JSON_COMPACT | JSON_REAL_PRECISION(15)) : strdup("{}");
    json_decref(body);
    if (!text) {
        errno = ENOMEM;
        return -1;
    }
    size_t len = strlen(text);
    if (len > PROTO_MAX_BODY) {
        free(text);
        errno = EMSGSIZE;
        return -1;
    }
    int nr = route ? route->n : 0;
    for (int i = 0; i < nr; i++) {
        if (route->len[i] > PROTO_MAX_ROUTE_LEN ||
            zmq_send(sock, route->id[i], route->len[i], flags | ZMQ_SNDMORE) < 0)
            goto fail;
        flags &= ~ZMQ_DONTWAIT; /* later parts of a message are never refused */
    }
    const char *tag = proto_tag(kind), *name = cmd_table[cmd].name;
    if (zmq_send(sock, tag, strlen(tag), flags | ZMQ_SNDMORE) < 0) goto fail;
    flags &= ~ZMQ_DONTWAIT;
    if (zmq_send(sock, name, strlen(name), flags | ZMQ_SNDMORE) < 0) goto fail;
    zmq_msg_t m;
    if (zmq_msg_init_data(&m, text, len, free_buf, NULL) < 0) goto fail;
    text = NULL; /* the message owns it now */
    if (zmq_msg_send(&m, sock, flags) < 0) {
        int e = errno;
        zmq_msg_close(&m);
        errno = e;
        return -1;
    }
    return 0;
fail:;
    int e = errno;
    free(text);
    errno = e;
    return -1;
}

int proto_send_error(void *sock, const proto_route *route, proto_kind kind, const proto_err *err,
                     int flags)
{
    if (!err) {
        errno = EINVAL;
        return -1;
    }
    proto_error e;
    proto_error_init(&e);
    e.id = err->id[0] ? (char *)err->id : NULL;
    e.code = err->code == PROTO_ERR_NONE ? PROTO_ERR_INTERNAL : err->code;
    e.message = (char *)err->message;
    e.command = err->cmd != PROTO_CMD_NONE ? (char *)proto_cmd_name(err->cmd) : NULL;
    json_t *body = proto_error_build(&e); /* borrows the strings; e is not freed */
    if (!body) {
        errno = ENOMEM;
        return -1;
    }
    return proto_send(sock, route, kind, PROTO_CMD_ERROR, &body, flags);
}

int proto_socket_options(void *sock, proto_side side, int heartbeat_ms)
{
    int zero = 0, one = 1, sndtimeo = PROTO_SEND_TIMEOUT_MS;
    int64_t maxsize = PROTO_MAX_SOCKET_MSG;
    if (!sock) {
        errno = EINVAL;
        return -1;
    }
    if (zmq_setsockopt(sock, ZMQ_LINGER, &zero, sizeof zero) < 0) return -1;
    if (zmq_setsockopt(sock, ZMQ_MAXMSGSIZE, &maxsize, sizeof maxsize) < 0) return -1;
    if (zmq_setsockopt(sock, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo) < 0) return -1;
    if (side == PROTO_SIDE_DUETD_CLIENTS || side == PROTO_SIDE_DUETD_WORKERS) {
        if (zmq_setsockopt(sock, ZMQ_ROUTER_MANDATORY, &one, sizeof one) < 0) return -1;
    } else {
        if (zmq_setsockopt(sock, ZMQ_IMMEDIATE, &one, sizeof one) < 0) return -1;
    }
    if (heartbeat_ms > 0) {
        int timeout = 4 * heartbeat_ms;
        if (zmq_setsockopt(sock, ZMQ_HEARTBEAT_IVL, &heartbeat_ms, sizeof heartbeat_ms) < 0 ||
            zmq_setsockopt(sock, ZMQ_HEARTBEAT_TIMEOUT, &timeout, sizeof timeout) < 0)
            return -1;
    }
    return 0;
}

/* ---- schema engine ------------------------------------------------------------------------- */

typedef enum {
    FT_INT,  /* int; JSON integer */
    FT_I64,  /* int64_t; JSON integer */
    FT_DBL,  /* double; JSON number */
    FT_BOOL, /* int 0/1; JSON true/false */
    FT_STR,  /* char * (owned); JSON string */
    FT_ENUM, /* int; JSON string, one of a list */
    FT_I32S, /* int32_t * + int n_<name>; JSON array of integers */
    FT_STRS, /* char ** + int n_<name>; JSON array of strings */
    FT_OBJ,  /* embedded struct; JSON object */
    FT_OBJS, /* struct array + int n_<name>; JSON array of objects */
} ftype;

enum {
    FL_REQ = 1,     /* must be present (and not null) */
    FL_OMIT = 2,    /* build leaves it out at its default / NULL / empty / not present */
    FL_LO_OPEN = 4, /* value > lo instead of >= lo */
    FL_OPEN = 8,    /* enum: an unknown name parses as the default (forward compatible) */
};

enum { CS_ANY = 0, CS_ID, CS_HEX };

typedef struct {
    const char *const *names;
    const int *values; /* NULL: the index */
    int n;
} enum_def;

typedef struct schema schema;

typedef struct {
    const char *name;
    ftype type;
    unsigned flags;
    size_t off;        /* the member */
    size_t aux;        /* arrays: the count member; optional objects: the has_ member */
    int has_aux;
    double def;        /* numbers, booleans, enums */
    double lo, hi;     /* numbers and array elements; FT_STRS: element byte lengths */
    long nlo, nhi;     /* string byte length or array item count */
    int cs;            /* strings: charset */
    const schema *sub; /* FT_OBJ, FT_OBJS */
    size_t sub_size;   /* FT_OBJS element size */
    const enum_def *en;
} field;

typedef struct {
    const char *top; /* type name for messages */
    char path[160];  /* "sampling." ... */
    proto_err *err;
} ctx;

struct schema {
    size_t size;
    const field *f;
    int nf;
    int lenient;                                             /* ignore unknown fields */
    int (*check)(const void *m, ctx *c);                     /* cross-field rules, or NULL */
};

#define NF(a) ((int)(sizeof(a) / sizeof((a)[0])))
#define BASE(S, N, T, FL) .name = #N, .type = T, .flags = FL, .off = offsetof(S, N)
#define FINT(S, N, FL, D, LO, HI) {BASE(S, N, FT_INT, FL), .def = D, .lo = LO, .hi = HI}
#define FI64(S, N, FL, D, LO, HI) {BASE(S, N, FT_I64, FL), .def = D, .lo = LO, .hi = HI}
#define FDBL(S, N, FL, D, LO, HI) {BASE(S, N, FT_DBL, FL), .def = D, .lo = LO, .hi = HI}
#define FBOOL(S, N, FL, D) {BASE(S, N, FT_BOOL, FL), .def = D}
#define FSTR(S, N, FL, NLO, NHI, CS) {BASE(S, N, FT_STR, FL), .nlo = NLO, .nhi = NHI, .cs = CS}
#define FENUM(S, N, FL, D, EN) {BASE(S, N, FT_ENUM, FL), .def = D, .en = &EN}
#define FI32S(S, N, FL, NLO, NHI, LO, HI)                                                   \
    {BASE(S, N, FT_I32S, FL), .aux = offsetof(S, n_##N), .nlo = NLO, .nhi = NHI, .lo = LO, \
     .hi = HI}
#define FSTRS(S, N, FL, NLO, NHI, ELO, EHI)                                                 \
    {BASE(S, N, FT_STRS, FL), .aux = offsetof(S, n_##N), .nlo = NLO, .nhi = NHI, .lo = ELO, \
     .hi = EHI}
#define FOBJ(S, N, FL, SUB) {BASE(S, N, FT_OBJ, FL), .sub = &SUB}
#define FOBJOPT(S, N, SUB) \
    {BASE(S, N, FT_OBJ, FL_OMIT), .aux = offsetof(S, has_##N), .has_aux = 1, .sub = &SUB}
#define FOBJS(S, N, FL, NLO, NHI, SUB, ET)                                                  \
    {BASE(S, N, FT_OBJS, FL), .aux = offsetof(S, n_##N), .nlo = NLO, .nhi = NHI, .sub = &SUB, \
     .sub_size = sizeof(ET)}

#define INF HUGE_VAL
#define IMAX ((double)INT_MAX)
#define MAXI ((double)PROTO_MAX_INT)

static void *at(void *m, size_t off) { return (char *)m + off; }
static const void *cat(const void *m, size_t off) { return (const char *)m + off; }

static int bad(ctx *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static int bad(ctx *c, const char *fmt, ...)
{
    char text[PROTO_MAX_TEXT];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    return proto_err_set(c->err, PROTO_ERR_BAD_REQUEST, "%s: %s", c->top, text);
}

/* "generate: field 'sampling.top_p' ..." */
static int badf(ctx *c, const char *name, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int badf(ctx *c, const char *name, const char *fmt, ...)
{
    char text[PROTO_MAX_TEXT];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof text, fmt, ap);
    va_end(ap);
    return proto_err_set(c->err, PROTO_ERR_BAD_REQUEST, "%s: field '%s%s' %s", c->top, c->path,
                         name, text);
}

static void init_obj(const schema *s, void *m);
static void free_obj(const schema *s, void *m);

static void init_obj(const schema *s, void *m)
{
    memset(m, 0, s->size);
    for (int i = 0; i < s->nf; i++) {
        const field *f = &s->f[i];
        switch (f->type) {
        case FT_INT:
        case FT_BOOL:
        case FT_ENUM: *(int *)at(m, f->off) = (int)f->def; break;
        case FT_I64: *(int64_t *)at(m, f->off) = (int64_t)f->def; break;
        case FT_DBL: *(double *)at(m, f->off) = f->def; break;
        case FT_OBJ: init_obj(f->sub, at(m, f->off)); break;
        default: break;
        }
    }
}

static void free_obj(const schema *s, void *m)
{
    for (int i = 0; i < s->nf; i++) {
        const field *f = &s->f[i];
        void *p = at(m, f->off);
        switch (f->type) {
        case FT_STR:
            free(*(char **)p);
            *(char **)p = NULL;
            break;
        case FT_I32S:
            free(*(int32_t **)p);
            *(int32_t **)p = NULL;
            *(int *)at(m, f->aux) = 0;
            break;
        case FT_STRS: {
            char **a = *(char ***)p;
            int n = *(int *)at(m, f->aux);
            for (int k = 0; a && k < n; k++) free(a[k]);
            free(a);
            *(char ***)p = NULL;
            *(int *)at(m, f->aux) = 0;
            break;
        }
        case FT_OBJ: free_obj(f->sub, p); break;
        case FT_OBJS: {
            char *a = *(char **)p;
            int n = *(int *)at(m, f->aux);
            for (int k = 0; a && k < n; k++) free_obj(f->sub, a + (size_t)k * f->sub_size);
            free(a);
            *(char **)p = NULL;
            *(int *)at(m, f->aux) = 0;
            break;
        }
        default: break;
        }
    }
}

/* "in [0, 1]", ">= 0", "> 0", ... for numbers; integers print as integers. */
static void range_text(const field *f, int integral, char *out, size_t cap)
{
    char lo[32], hi[32];
    if (integral) {
        snprintf(lo, sizeof lo, "%lld", (long long)f->lo);
        snprintf(hi, sizeof hi, "%lld", (long long)f->hi);
    } else {
        snprintf(lo, sizeof lo, "%g", f->lo);
        snprintf(hi, sizeof hi, "%g", f->hi);
    }
    int open = (f->flags & FL_LO_OPEN) != 0;
    if (isinf(f->hi))
        snprintf(out, cap, "%s %s", open ? ">" : ">=", lo);
    else
        snprintf(out, cap, "in %c%s, %s]", open ? '(' : '[', lo, hi);
}

static int in_range(const field *f, double v)
{
    if (f->flags & FL_LO_OPEN) {
        if (!(v > f->lo)) return 0;
    } else if (!(v >= f->lo)) {
        return 0;
    }
    return v <= f->hi;
}

static int i64_in_range(const field *f, long long v)
{
    /* bounds are whole numbers well inside +-2^63 */
    long long lo = (long long)f->lo, hi = isinf(f->hi) ? LLONG_MAX : (long long)f->hi;
    return (f->flags & FL_LO_OPEN) ? (v > lo && v <= hi) : (v >= lo && v <= hi);
}

static int check_chars(ctx *c, const char *name, const char *s, size_t len, int cs)
{
    for (size_t i = 0; i < len; i++) {
        unsigned char b = (unsigned char)s[i];
        if (cs == CS_ID && (b <= 0x20 || b >= 0x7f))
            return badf(c, name, "may hold only printable ASCII without spaces (byte 0x%02x at "
                                 "offset %zu)", b, i);
        if (cs == CS_HEX && !((b >= '0' && b <= '9') || (b >= 'a' && b <= 'f')))
            return badf(c, name, "must be lower-case hex digits (byte 0x%02x at offset %zu)", b, i);
    }
    return 0;
}

static int parse_str(ctx *c, const char *name, const json_t *v, long nlo, long nhi, int cs,
                     char **out)
{
    if (!json_is_string(v)) return badf(c, name, "must be a string (got %s)", json_type_word(v));
    size_t len = json_string_length(v);
    const char *s = json_string_value(v);
    if ((long)len < nlo || (long)len > nhi) {
        if (nlo == nhi) return badf(c, name, "must be %ld bytes long (got %zu)", nlo, len);
        return badf(c, name, "must be %ld to %ld bytes long (got %zu)", nlo, nhi, len);
    }
    if (check_chars(c, name, s, len, cs)) return -1;
    if (out) {
        *out = malloc(len + 1);
        if (!*out) return proto_err_set(c->err, PROTO_ERR_INTERNAL, "%s: out of memory", c->top);
        memcpy(*out, s, len + 1);
    }
    return 0;
}

static int parse_obj(ctx *c, const schema *s, const json_t *obj, void *m);

static int parse_count(ctx *c, const field *f, const json_t *v)
{
    if (!json_is_array(v)) return badf(c, f->name, "must be an array (got %s)", json_type_word(v));
    long n = (long)json_array_size(v);
    if (n < f->nlo || n > f->nhi)
        return badf(c, f->name, "must hold %ld to %ld items (got %ld)", f->nlo, f->nhi, n);
    return 0;
}

static int parse_field(ctx *c, const field *f, const json_t *v, void *m)
{
    void *p = at(m, f->off);
    char rt[96], nm[96];
    switch (f->type) {
    case FT_INT:
    case FT_I64: {
        if (!json_is_integer(v))
            return badf(c, f->name, "must be an integer (got %s)", json_type_word(v));
        long long x = json_integer_value(v);
        if (!i64_in_range(f, x)) {
            range_text(f, 1, rt, sizeof rt);
            return badf(c, f->name, "must be %s (got %lld)", rt, x);
        }
        if (f->type == FT_INT)
            *(int *)p = (int)x;
        else
            *(int64_t *)p = x;
        return 0;
    }
    case FT_DBL: {
        if (!json_is_number(v)) return badf(c, f->name, "must be a number (got %s)", json_type_word(v));
        double x = json_number_value(v);
        if (!in_range(f, x)) {
            range_text(f, 0, rt, sizeof rt);
            return badf(c, f->name, "must be %s (got %g)", rt, x);
        }
        *(double *)p = x;
        return 0;
    }
    case FT_BOOL:
        if (!json_is_boolean(v))
            return badf(c, f->name, "must be true or false (got %s)", json_type_word(v));
        *(int *)p = json_is_true(v);
        return 0;
    case FT_STR: return parse_str(c, f->name, v, f->nlo, f->nhi, f->cs, (char **)p);
    case FT_ENUM: {
        if (!json_is_string(v)) return badf(c, f->name, "must be a string (got %s)", json_type_word(v));
        const char *s = json_string_value(v);
        for (int k = 0; k < f->en->n; k++)
            if (strcmp(s, f->en->names[k]) == 0) {
                *(int *)p = f->en->values ? f->en->values[k] : k;
                return 0;
            }
        if (f->flags & FL_OPEN) {
            *(int *)p = (int)f->def;
            return 0;
        }
        char list[160], q[64];
        size_t o = 0;
        for (int k = 0; k < f->en->n && o < sizeof list; k++)
            o += (size_t)snprintf(list + o, sizeof list - o, "%s%s", k ? ", " : "", f->en->names[k]);
        quote(q, sizeof q, s, json_string_length(v));
        return badf(c, f->name, "must be one of %s (got %s)", list, q);
    }
    case FT_I32S: {
        if (parse_count(c, f, v)) return -1;
        size_t n = json_array_size(v);
        int32_t *a = n ? malloc(n * sizeof *a) : NULL;
        if (n && !a) return proto_err_set(c->err, PROTO_ERR_INTERNAL, "%s: out of memory", c->top);
        for (size_t k = 0; k < n; k++) {
            const json_t *e = json_array_get(v, k);
            snprintf(nm, sizeof nm, "%s[%zu]", f->name, k);
            long long x = json_is_integer(e) ? json_integer_value(e) : 0;
            if (!json_is_integer(e) || !i64_in_range(f, x)) {
                free(a);
                range_text(f, 1, rt, sizeof rt);
                if (!json_is_integer(e))
                    return badf(c, nm, "must be an integer (got %s)", json_type_word(e));
                return badf(c, nm, "must be %s (got %lld)", rt, x);
            }
            a[k] = (int32_t)x;
        }
        *(int32_t **)p = a;
        *(int *)at(m, f->aux) = (int)n;
        return 0;
    }
    case FT_STRS: {
        if (parse_count(c, f, v)) return -1;
        size_t n = json_array_size(v);
        char **a = n ? calloc(n, sizeof *a) : NULL;
        if (n && !a) return proto_err_set(c->err, PROTO_ERR_INTERNAL, "%s: out of memory", c->top);
        *(char ***)p = a;
        *(int *)at(m, f->aux) = (int)n;
        for (size_t k = 0; k < n; k++) {
            snprintf(nm, sizeof nm, "%s[%zu]", f->name, k);
            if (parse_str(c, nm, json_array_get(v, k), (long)f->lo, (long)f->hi, CS_ANY, &a[k]))
                return -1;
        }
        return 0;
    }
    case FT_OBJ: {
        if (!json_is_object(v)) return badf(c, f->name, "must be an object (got %s)", json_type_word(v));
        size_t plen = strlen(c->path);
        snprintf(c->path + plen, sizeof c->path - plen, "%s.", f->name);
        int rc = parse_obj(c, f->sub, v, p);
        c->path[plen] = '\0';
        if (rc == 0 && f->has_aux) *(int *)at(m, f->aux) = 1;
        return rc;
    }
    case FT_OBJS: {
        if (parse_count(c, f, v)) return -1;
        size_t n = json_array_size(v);
        char *a = n ? calloc(n, f->sub_size) : NULL;
        if (n && !a) return proto_err_set(c->err, PROTO_ERR_INTERNAL, "%s: out of memory", c->top);
        for (size_t k = 0; k < n; k++) init_obj(f->sub, a + k * f->sub_size);
        *(char **)p = a;
        *(int *)at(m, f->aux) = (int)n;
        size_t plen = strlen(c->path);
        for (size_t k = 0; k < n; k++) {
            const json_t *e = json_array_get(v, k);
            snprintf(nm, sizeof nm, "%s[%zu]", f->name, k);
            if (!json_is_object(e)) {
                return badf(c, nm, "must be an object (got %s)", json_type_word(e));
            }
            snprintf(c->path + plen, sizeof c->path - plen, "%s.", nm);
            int rc = parse_obj(c, f->sub, e, a + k * f->sub_size);
            c->path[plen] = '\0';
            if (rc) return -1;
        }
        return 0;
    }
    }
    return -1;
}

static int parse_obj(ctx *c, const schema *s, const json_t *obj, void *m)
{
    const char *key;
    const json_t *v;
    if (!s->lenient) {
        json_object_foreach((json_t *)obj, key, v) {
            int known = 0;
            for (int i = 0; i < s->nf && !known; i++) known = strcmp(key, s->f[i].name) == 0;
            if (!known) {
                char full[200], q[240];
                snprintf(full, sizeof full, "%s%s", c->path, key);
                quote(q, sizeof q, full, strlen(full));
                return bad(c, "unknown field %s", q);
            }
        }
    }
    for (int i = 0; i < s->nf; i++) {
        const field *f = &s->f[i];
        v = json_object_get(obj, f->name);
        if (!v || json_is_null(v)) {
            if (f->flags & FL_REQ) return badf(c, f->name, "is missing");
            continue;
        }
        if (parse_field(c, f, v, m)) return -1;
    }
    return s->check ? s->check(m, c) : 0;
}

static int set_json(json_t *obj, const char *key, json_t *v)
{
    return v ? json_object_set_new(obj, key, v) : -1;
}

static json_t *build_obj(const schema *s, const void *m)
{
    json_t *o = json_object();
    if (!o) return NULL;
    for (int i = 0; i < s->nf; i++) {
        const field *f = &s->f[i];
        const void *p = cat(m, f->off);
        int omit = (f->flags & FL_OMIT) != 0;
        json_t *v = NULL;
        switch (f->type) {
        case FT_INT:
            if (omit && *(const int *)p == (int)f->def) continue;
            v = json_integer(*(const int *)p);
            break;
        case FT_I64:
            if (omit && *(const int64_t *)p == (int64_t)f->def) continue;
            v = json_integer(*(const int64_t *)p);
            break;
        case FT_DBL:
            if (omit && *(const double *)p == f->def) continue;
            v = json_real(*(const double *)p);
            break;
        case FT_BOOL:
            if (omit && *(const int *)p == (int)f->def) continue;
            v = json_boolean(*(const int *)p);
            break;
        case FT_STR: {
            const char *s2 = *(char *const *)p;
            if (!s2) {
                if (f->flags & FL_REQ) goto fail;
                continue;
            }
            v = json_string(s2);
            break;
        }
        case FT_ENUM: {
            int x = *(const int *)p, k;
            if (omit && x == (int)f->def) continue;
            for (k = 0; k < f->en->n; k++)
                if ((f->en->values ? f->en->values[k] : k) == x) break;
            if (k == f->en->n) goto fail;
            v = json_string(f->en->names[k]);
            break;
        }
        case FT_I32S: {
            const int32_t *a = *(int32_t *const *)p;
            int n = *(const int *)cat(m, f->aux);
            if (omit && n == 0) continue;
            v = json_array();
            for (int k = 0; v && k < n; k++)
                if (json_array_append_new(v, json_integer(a[k]))) {
                    json_decref(v);
                    v = NULL;
                }
            break;
        }
        case FT_STRS: {
            char *const *a = *(char **const *)p;
            int n = *(const int *)cat(m, f->aux);
            if (omit && n == 0) continue;
            v = json_array();
            for (int k = 0; v && k < n; k++)
                if (!a[k] || json_array_append_new(v, json_string(a[k]))) {
                    json_decref(v);
                    v = NULL;
                }
            break;
        }
        case FT_OBJ:
            if (f->has_aux && !*(const int *)cat(m, f->aux)) continue;
            v = build_obj(f->sub, p);
            break;
        case FT_OBJS: {
            const char *a = *(char *const *)p;
            int n = *(const int *)cat(m, f->aux);
            if (omit && n == 0) continue;
            v = json_array();
            for (int k = 0; v && k < n; k++)
                if (json_array_append_new(v, build_obj(f->sub, a + (size_t)k * f->sub_size))) {
                    json_decref(v);
                    v = NULL;
                }
            break;
        }
        }
        if (set_json(o, f->name, v)) goto fail;
    }
    return o;
fail:
    json_decref(o);
    return NULL;
}

/* ---- enums ---------------------------------------------------------------------------------- */

static const enum_def en_role3 = {role_names, NULL, 3};
static const enum_def en_role4 = {role_names, NULL, 4};
static const enum_def en_finish = {finish_names, NULL, 4};
static const enum_def en_code = {code_names, NULL, PROTO_ERR__COUNT};
static const char *const wstate_names[] = {"starting", "ready", "dead"};
static const enum_def en_wstate = {wstate_names, NULL, 3};
static const char *const health_names[] = {"starting", "ready", "draining"};
static const enum_def en_health = {health_names, NULL, 3};
static const char *const dtype_names[] = {"f32", "f16", "bf16", "i8"};
static const int dtype_values[] = {DTYPE_F32, DTYPE_F16, DTYPE_BF16, DTYPE_I8};
static const enum_def en_dtype = {dtype_names, dtype_values, 4};
static const char *const device_names[] = {"cpu", "cuda"};
static const enum_def en_device = {device_names, NULL, 2};
static const char *const backend_names[] = {"tcp", "mpi", "nccl"};
static const enum_def en_backend = {backend_names, NULL, 3};

/* ---- client schemas --------------------------------------------------------------------------- */

#define TOK_LO 0
#define TOK_HI ((double)PROTO_MAX_TOKEN_ID)

static const field f_sampling[] = {
    FDBL(proto_sampling, temperature, 0, 0.8, 0, INF),
    FINT(proto_sampling, top_k, 0, 40, 0, IMAX),
    FDBL(proto_sampling, top_p, FL_LO_OPEN, 0.95, 0, 1),
    FDBL(proto_sampling, min_p, 0, 0.05, 0, 1),
    FDBL(proto_sampling, repeat_penalty, FL_LO_OPEN, 1.0, 0, INF),
    FINT(proto_sampling, repeat_last_n, 0, 64, -1, IMAX),
    FI64(proto_sampling, seed, FL_OMIT, -1, 0, MAXI),
};
static const schema s_sampling = {sizeof(proto_sampling), f_sampling, NF(f_sampling), 0, NULL};

static const field f_chat_msg[] = {
    FSTR(proto_chat_msg, role, FL_REQ, 1, PROTO_MAX_ROLE, CS_ID),
    FSTR(proto_chat_msg, content, FL_REQ, 0, PROTO_MAX_PROMPT, CS_ANY),
};
static const schema s_chat_msg = {sizeof(proto_chat_msg), f_chat_msg, NF(f_chat_msg), 0, NULL};

static int check_generate(const void *mv, ctx *c)
{
    proto_generate *m = (proto_generate *)mv;
    int forms = (m->prompt != NULL) + (m->messages != NULL) + (m->tokens != NULL);
    if (forms != 1) {
        if (forms == 0) return bad(c, "give exactly one of 'prompt', 'messages', 'tokens' (got none)");
        return bad(c, "give exactly one of 'prompt', 'messages', 'tokens' (got %s%s%s%s%s)",
                   m->prompt ? "prompt" : "", m->prompt && (m->messages || m->tokens) ? " and " : "",
                   m->messages ? "messages" : "", m->messages && m->tokens ? " and " : "",
                   m->tokens ? "tokens" : "");
    }
    m->form = m->prompt ? PROTO_PROMPT_TEXT : m->messages ? PROTO_PROMPT_CHAT : PROTO_PROMPT_TOKENS;
    size_t total = 0;
    for (int i = 0; i < m->n_messages; i++) total += strlen(m->messages[i].content);
    if (total > PROTO_MAX_PROMPT)
        return bad(c, "field 'messages' holds %zu bytes of content (at most %d)", total,
                   PROTO_MAX_PROMPT);
    return 0;
}

static const field f_generate[] = {
    FSTR(proto_generate, id, FL_REQ, 1, PROTO_MAX_ID, CS_ID),
    FSTR(proto_generate, prompt, FL_OMIT, 0, PROTO_MAX_PROMPT, CS_ANY),
    FOBJS(proto_generate, messages, FL_OMIT, 1, PROTO_MAX_MESSAGES, s_chat_msg, proto_chat_msg),
    FI32S(proto_generate, tokens, FL_OMIT, 1, PROTO_MAX_TOKENS, TOK_LO, TOK_HI),
    FOBJ(proto_generate, sampling, 0, s_sampling),
    FINT(proto_generate, max_tokens, FL_OMIT, 0, 1, PROTO_MAX_TOKENS),
    FSTRS(proto_generate, stop, FL_OMIT, 0, PROTO_MAX_STOPS, 1, PROTO_MAX_STOP_LEN),
    FI32S(proto_generate, stop_token_ids, FL_OMIT, 0, PROTO_MAX_STOP_IDS, TOK_LO, TOK_HI),
    FBOOL(proto_generate, ignore_eos, FL_OMIT, 0),
    FBOOL(proto_generate, stream, FL_OMIT, 0),
    FSTR(proto_generate, session, FL_OMIT, 1, PROTO_MAX_ID, CS_ID),
};
static const schema s_generate = {sizeof(proto_generate), f_generate, NF(f_generate), 0,
                                  check_generate};

static const field f_cancel[] = {FSTR(proto_cancel, id, FL_REQ, 1, PROTO_MAX_ID, CS_ID)};
static const schema s_cancel = {sizeof(proto_cancel), f_cancel, NF(f_cancel), 0, NULL};

static const schema s_empty = {sizeof(proto_empty), NULL, 0, 0, NULL};

static const field f_accepted[] = {
    FSTR(proto_accepted, id, FL_REQ, 1, PROTO_MAX_ID, CS_ID),
    FINT(proto_accepted, prompt_tokens, FL_REQ, 0, 0, PROTO_MAX_TOKENS),
    FINT(proto_accepted, max_tokens, FL_REQ, 0, 1, PROTO_MAX_TOKENS),
    FI64(proto_accepted, seed, FL_REQ, 0, 0, MAXI),
};
static const schema s_accepted = {sizeof(proto_accepted), f_accepted, NF(f_accepted), 1, NULL};

static const field f_delta[] = {
    FSTR(proto_delta, id, FL_REQ, 1, PROTO_MAX_ID, CS_ID),
    FINT(proto_delta, index, FL_REQ, 0, 0, PROTO_MAX_TOKENS),
    FSTR(proto_delta, text, FL_REQ, 0, PROTO_MAX_BODY, CS_ANY),
    FI32S(proto_delta, token_ids, FL_REQ, 0, PROTO_MAX_TOKENS, TOK_LO, TOK_HI),
};
static const schema s_delta = {sizeof(proto_delta), f_delta, NF(f_delta), 1, NULL};

static const field f_usage[] = {
    FINT(proto_usage, prompt_tokens, FL_REQ, 0, 0, IMAX),
    FINT(proto_usage, cached_prompt_tokens, FL_REQ, 0, 0, IMAX),
    FINT(proto_usage, completion_tokens, FL_REQ, 0, 0, IMAX),
    FINT(proto_usage, retries, FL_REQ, 0, 0, IMAX),
};
static const schema s_usage = {sizeof(proto_usage), f_usage, NF(f_usage), 1, NULL};

static const field f_timings[] = {
    FDBL(proto_timings, queue_ms, FL_REQ, 0, 0, INF),
    FDBL(proto_timings, ttft_ms, FL_REQ, 0, 0, INF),
    FDBL(proto_timings, tpot_ms_mean, FL_REQ, 0, 0, INF),
    FDBL(proto_timings, total_ms, FL_REQ, 0, 0, INF),
};
static const schema s_timings = {sizeof(proto_timings), f_timings, NF(f_timings), 1, NULL};

static const field f_done[] = {
    FSTR(proto_done, id, FL_REQ, 1, PROTO_MAX_ID, CS_ID),
    FENUM(proto_done, finish_reason, FL_REQ, 0, en_finish),
    FSTR(proto_done, text, FL_OMIT, 0, PROTO_MAX_BODY, CS_ANY),
    FI32S(proto_done, token_ids, FL_OMIT, 0, PROTO_MAX_TOKENS, TOK_LO, TOK_HI),
    FOBJ(proto_done, usage, FL_REQ, s_usage),
    FOBJ(proto_done, timings, FL_REQ, s_timings),
};
static const schema s_done = {sizeof(proto_done), f_done, NF(f_done), 1, NULL};

static const field f_error[] = {
    FSTR(proto_error, id, FL_OMIT, 1, PROTO_MAX_ID, CS_ID),
    FENUM(proto_error, code, FL_REQ | FL_OPEN, PROTO_ERR_OTHER, en_code),
    FSTR(proto_error, message, FL_REQ, 0, 4096, CS_ANY),
    FSTR(proto_error, command, FL_OMIT, 1, PROTO_MAX_CMD, CS_ID),
    FINT(proto_error, retry_after_ms, FL_OMIT, 0, 0, IMAX),
};
static const schema s_error = {sizeof(proto_error), f_error, NF(f_error), 1, NULL};

static const field f_group_status[] = {
    FINT(proto_group_status, group, FL_REQ, 0, 0, IMAX),
    FENUM(proto_group_status, role, FL_REQ, 0, en_role3),
    FINT(proto_group_status, tp_size, FL_REQ, 1, 1, PROTO_MAX_PEERS),
    FINT(proto_group_status, workers_alive, FL_REQ, 0, 0, PROTO_MAX_PEERS),
    FINT(proto_group_status, running, FL_REQ, 0, 0, IMAX),
    FINT(proto_group_status, waiting, FL_REQ, 0, 0, IMAX),
    FI64(proto_group_status, kv_blocks_total, FL_REQ, 0, 0, MAXI),
    FI64(proto_group_status, kv_blocks_free, FL_REQ, 0, 0, MAXI),
    FI64(proto_group_status, kv_blocks_cached, FL_REQ, 0, 0, MAXI),
    FI64(proto_group_status, transfers, FL_OMIT, 0, 0, MAXI),
    FI64(proto_group_status, transfer_bytes, FL_OMIT, 0, 0, MAXI),
    FDBL(proto_group_status, transfer_ms, FL_OMIT, 0, 0, INF),
    FDBL(proto_group_status, transfer_gbps, FL_OMIT, 0, 0, INF),
    FDBL(proto_group_status, transfer_tail_ms, FL_OMIT, 0, 0, INF),
    FDBL(proto_group_status, share_queue, FL_OMIT, 0, 0, 1),
    FDBL(proto_group_status, share_prefill, FL_OMIT, 0, 0, 1),
    FDBL(proto_group_status, share_transfer, FL_OMIT, 0, 0, 1),
    FDBL(proto_group_status, share_decode, FL_OMIT, 0, 0, 1),
};
static const schema s_group_status = {sizeof(proto_group_status), f_group_status,
                                      NF(f_group_status), 1, NULL};

static const field f_worker_status[] = {
    FSTR(proto_worker_status, worker_id, FL_REQ, 1, PROTO_MAX_ID, CS_ID),
    FINT(proto_worker_status, rank, FL_REQ, 0, 0, PROTO_MAX_PEERS - 1),
    FINT(proto_worker_status, group, FL_REQ, 0, 0, IMAX),
    FINT(proto_worker_status, tp_rank, FL_REQ, 0, 0, PROTO_MAX_PEERS - 1),
    FENUM(proto_worker_status, role, FL_REQ, 0, en_role3),
    FSTR(proto_worker_status, device, FL_REQ, 0, PROTO_MAX_TEXT, CS_ANY),
    FENUM(proto_worker_status, state, FL_REQ, 0, en_wstate),
    FI64(proto_worker_status, last_seen_ms, FL_REQ, 0, 0, MAXI),
    FI64(proto_worker_status, kv_capacity_blocks, FL_REQ, 0, 0, MAXI),
};
static const schema s_worker_status = {sizeof(proto_worker_status), f_worker_status,
                                       NF(f_worker_status), 1, NULL};

static const field f_kv_status[] = {
    FI64(proto_kv_status, blocks_total, FL_REQ, 0, 0, MAXI),
    FI64(proto_kv_status, blocks_used, FL_REQ, 0, 0, MAXI),
    FI64(proto_kv_status, blocks_cached, FL_REQ, 0, 0, MAXI),
    FDBL(proto_kv_status, use, FL_REQ, 0, 0, 1),
};
static const schema s_kv_status = {sizeof(proto_kv_status), f_kv_status, NF(f_kv_status), 1, NULL};

static const field f_queue_status[] = {
    FINT(proto_queue_status, waiting, FL_REQ, 0, 0, IMAX),
    FINT(proto_queue_status, running, FL_REQ, 0, 0, IMAX),
    FINT(proto_queue_status, limit, FL_REQ, 0, 0, IMAX),
};
static const schema s_queue_status = {sizeof(proto_queue_status), f_queue_status,
                                      NF(f_queue_status), 1, NULL};

static const field f_prefix_status[] = {
    FI64(proto_prefix_status, prompt_tokens, FL_REQ, 0, 0, MAXI),
    FI64(proto_prefix_status, cached_tokens, FL_REQ, 0, 0, MAXI),
    FDBL(proto_prefix_status, hit_rate, FL_REQ, 0, 0, 1),
};
static const schema s_prefix_status = {sizeof(proto_prefix_status), f_prefix_status,
                                       NF(f_prefix_status), 1, NULL};

static const field f_transfer_status[] = {
    FI64(proto_transfer_status, completed, FL_REQ, 0, 0, MAXI),
    FI64(proto_transfer_status, failed, FL_REQ, 0, 0, MAXI),
    FI64(proto_transfer_status, in_flight, FL_REQ, 0, 0, MAXI),
    FI64(proto_transfer_status, bytes, FL_REQ, 0, 0, MAXI),
    FDBL(proto_transfer_status, mean_ms, FL_REQ, 0, 0, INF),
    FDBL(proto_transfer_status, max_ms, FL_REQ, 0, 0, INF),
};
static const schema s_transfer_status = {sizeof(proto_transfer_status), f_transfer_status,
                                         NF(f_transfer_status), 1, NULL};

static const field f_request_status[] = {
    FI64(proto_request_status, served, FL_REQ, 0, 0, MAXI),
    FI64(proto_request_status, failed, FL_REQ, 0, 0, MAXI),
    FI64(proto_request_status, cancelled, FL_REQ, 0, 0, MAXI),
    FI64(proto_request_status, retried, FL_REQ, 0, 0, MAXI),
};
static const schema s_request_status = {sizeof(proto_request_status), f_request_status,
                                        NF(f_request_status), 1, NULL};

static const field f_status[] = {
    FSTR(proto_status, version, FL_REQ, 0, PROTO_MAX_TEXT, CS_ANY),
    FSTR(proto_status, model, FL_OMIT, 0, PROTO_MAX_TEXT, CS_ANY),
    FSTR(proto_status, model_sha256, FL_OMIT, 64, 64, CS_HEX),
    FDBL(proto_status, uptime_s, FL_REQ, 0, 0, INF),
    FOBJS(proto_status, groups, FL_REQ, 0, PROTO_MAX_PEERS, s_group_status, proto_group_status),
    FOBJS(proto_status, workers, FL_REQ, 0, PROTO_MAX_PEERS, s_worker_status, proto_worker_status),
    FOBJ(proto_status, kv, FL_REQ, s_kv_status),
    FOBJ(proto_status, queue, FL_REQ, s_queue_status),
    FOBJ(proto_status, prefix_cache, FL_REQ, s_prefix_status),
    FOBJ(proto_status, transfers, FL_REQ, s_transfer_status),
    FOBJ(proto_status, requests, FL_REQ, s_request_status),
};
static const schema s_status = {sizeof(proto_status), f_status, NF(f_status), 1, NULL};

static const field f_health[] = {
    FBOOL(proto_health, ok, FL_REQ, 0),
    FENUM(proto_health, state, FL_REQ, 0, en_health),
    FINT(proto_health, groups_ready, FL_REQ, 0, 0, IMAX),
    FINT(proto_health, workers_alive, FL_REQ, 0, 0, IMAX),
    FDBL(proto_health, uptime_s, FL_REQ, 0, 0, INF),
};
static const schema s_health = {sizeof(proto_health), f_health, NF(f_health), 1, NULL};

/* ---- worker schemas ------------------------------------------------------------------------ */

#define MAXRANK (PROTO_MAX_PEERS - 1)
#define MAX_LEASE 3600000

static const field f_model_id[] = {
    FSTR(proto_model_id, sha256, FL_REQ, 64, 64, CS_HEX),
    FSTR(proto_model_id, name, FL_OMIT, 0, PROTO_MAX_TEXT, CS_ANY),
    FINT(proto_model_id, n_vocab, FL_REQ, 1, 1, TOK_HI),
    FINT(proto_model_id, n_ctx, FL_REQ, 1, 1, IMAX),
};
static const schema s_model_id = {sizeof(proto_model_id), f_model_id, NF(f_model_id), 0, NULL};

static int check_kv_layout(const void *mv, ctx *c)
{
    const proto_kv_layout *m = mv;
    if (m->head0 + m->n_heads > m->n_head_kv)
        return bad(c, "field '%shead0' + '%sn_heads' (%d + %d) exceeds '%sn_head_kv' (%d)", c->path,
                   c->path, m->head0, m->n_heads, c->path, m->n_head_kv);
    return 0;
}

static const field f_kv_layout[] = {
    FINT(proto_kv_layout, block_tokens, FL_REQ, 16, 1, 4096),
    FENUM(proto_kv_layout, dtype, FL_REQ, DTYPE_F16, en_dtype),
    FINT(proto_kv_layout, n_layer, FL_REQ, 1, 1, 4096),
    FINT(proto_kv_layout, n_head_kv, FL_REQ, 1, 1, 4096),
    FINT(proto_kv_layout, head0, FL_REQ, 0, 0, 4095),
    FINT(proto_kv_layout, n_heads, FL_REQ, 1, 1, 4096),
    FINT(proto_kv_layout, head_dim, FL_REQ, 1, 1, 4096),
    FI64(proto_kv_layout, capacity_blocks, FL_REQ, 1, 1, MAXI),
};
static const schema s_kv_layout = {sizeof(proto_kv_layout), f_kv_layout, NF(f_kv_layout), 0,
                                   check_kv_layout};

static const field f_device[] = {
    FENUM(proto_device, kind, FL_REQ, 0, en_device),
    FINT(proto_device, index, FL_REQ, 0, 0, 1024),
    FSTR(proto_device, name, FL_OMIT, 0, PROTO_MAX_TEXT, CS_ANY),
    FI64(proto_device, memory_bytes, FL_OMIT, 0, 0, MAXI),
};
static const schema s_device = {sizeof(proto_device), f_device, NF(f_device), 0, NULL};

static int check_register(const void *mv, ctx *c)
{
    const proto_register *m = mv;
    if (m->tp_rank >= m->tp_size)
        return bad(c, "field 'tp_rank' (%d) must be below 'tp_size' (%d)", m->tp_rank, m->tp_size);
    if (m->tp_size > 1 && m->group < 0)
        return bad(c, "field 'group' is required when 'tp_size' > 1 (ranks of a group name it)");
    if (m->backend == PROTO_BACKEND_TCP && !m->endpoint)
        return bad(c, "field 'endpoint' is required with backend 'tcp'");
    return 0;
}

static const field f_register[] = {
    FSTR(proto_register, worker_id, FL_REQ, 1, PROTO_MAX_ID, CS_ID),
    FSTR(proto_register, software, FL_OMIT, 0, PROTO_MAX_TEXT, CS_ANY),
    FOBJ(proto_register, model, FL_REQ, s_model_id),
    FOBJ(proto_register, kv, FL_REQ, s_kv_layout),
    FINT(proto_register, rank, FL_OMIT, -1, 0, MAXRANK),
    FINT(proto_register, group, FL_OMIT, -1, 0, IMAX),
    FENUM(proto_register, role, FL_OMIT, PROTO_ROLE_ANY, en_role4),
    FINT(proto_register, tp_rank, FL_REQ, 0, 0, MAXRANK),
    FINT(proto_register, tp_size, FL_REQ, 1, 1, PROTO_MAX_PEERS),
    FOBJ(proto_register, device, FL_REQ, s_device),
    FENUM(proto_register, backend, FL_REQ, 0, en_backend),
    FSTR(proto_register, endpoint, FL_OMIT, 1, PROTO_MAX_ENDPOINT, CS_ID),
    FINT(proto_register, max_batch, FL_REQ, 1, 1, 65536),
};
static const schema s_register = {sizeof(proto_register), f_register, NF(f_register), 0,
                                  check_register};

static int check_registered(const void *mv, ctx *c)
{
    const proto_registered *m = mv;
    if (m->tp_rank >= m->tp_size)
        return bad(c, "field 'tp_rank' (%d) must be below 'tp_size' (%d)", m->tp_rank, m->tp_size);
    return 0;
}

static const field f_registered[] = {
    FINT(proto_registered, rank, FL_REQ, 0, 0, MAXRANK),
    FINT(proto_registered, group, FL_REQ, 0, 0, IMAX),
    FENUM(proto_registered, role, FL_REQ, 0, en_role3),
    FINT(proto_registered, tp_rank, FL_REQ, 0, 0, MAXRANK),
    FINT(proto_registered, tp_size, FL_REQ, 1, 1, PROTO_MAX_PEERS),
    FINT(proto_registered, heartbeat_ms, FL_REQ, 1000, 10, 600000),
    FINT(proto_registered, dead_after, FL_REQ, 4, 2, 10),
};
static const schema s_registered = {sizeof(proto_registered), f_registered, NF(f_registered), 0,
                                    check_registered};

static const field f_refused[] = {
    FENUM(proto_refused, code, FL_REQ | FL_OPEN, PROTO_ERR_OTHER, en_code),
    FSTR(proto_refused, message, FL_REQ, 0, 4096, CS_ANY),
};
static const schema s_refused = {sizeof(proto_refused), f_refused, NF(f_refused), 0, NULL};

static const field f_heartbeat[] = {
    FINT(proto_heartbeat, running, FL_OMIT, -1, 0, IMAX),
    FINT(proto_heartbeat, waiting, FL_OMIT, -1, 0, IMAX),
    FI64(proto_heartbeat, kv_free_blocks, FL_OMIT, -1, 0, MAXI),
    FI64(proto_heartbeat, kv_cached_blocks, FL_OMIT, -1, 0, MAXI),
};
static const schema s_heartbeat = {sizeof(proto_heartbeat), f_heartbeat, NF(f_heartbeat), 0, NULL};

static const field f_peer[] = {
    FINT(proto_peer, rank, FL_REQ, 0, 0, MAXRANK),
    FINT(proto_peer, head0, FL_REQ, 0, 0, 4095),
    FINT(proto_peer, n_heads, FL_REQ, 1, 1, 4096),
};
static const schema s_peer = {sizeof(proto_peer), f_peer, NF(f_peer), 0, NULL};

static const field f_transfer[] = {
    FI64(proto_transfer, xfer, FL_REQ, 0, 1, MAXI),
    FI64(proto_transfer, seq, FL_OMIT, -1, 0, MAXI),
    FINT(proto_transfer, peer_group, FL_OMIT, -1, 0, IMAX),
    FINT(proto_transfer, first_block, 0, 0, 0, IMAX),
    FOBJS(proto_transfer, peers, FL_OMIT, 0, PROTO_MAX_PEERS, s_peer, proto_peer),
    FINT(proto_transfer, lease_ms, FL_OMIT, 0, 1, MAX_LEASE),
};
static const schema s_transfer = {sizeof(proto_transfer), f_transfer, NF(f_transfer), 0, NULL};

static int check_assign(const void *mv, ctx *c)
{
    const proto_assign *m = mv;
    const proto_transfer *t = &m->transfer;
    if (m->sampling.seed < 0) return bad(c, "field 'sampling.seed' is missing (duetd always sets it)");
    if (m->n_generated >= m->max_tokens)
        return bad(c, "field 'generated' holds %d tokens, no fewer than 'max_tokens' (%d)",
                   m->n_generated, m->max_tokens);
    switch (m->role) {
    case PROTO_ROLE_BOTH:
        if (m->has_transfer) return bad(c, "field 'transfer' is not allowed with role 'both'");
        break;
    case PROTO_ROLE_PREFILL:
        if (!m->has_transfer) return bad(c, "field 'transfer' is required with role 'prefill'");
        if (t->seq < 0) return bad(c, "field 'transfer.seq' is required with role 'prefill'");
        if (t->peer_group < 0)
            return bad(c, "field 'transfer.peer_group' is required with role 'prefill'");
        if (t->n_peers < 1) return bad(c, "field 'transfer.peers' must list the decode ranks");
        if (t->lease_ms < 1) return bad(c, "field 'transfer.lease_ms' is required with role 'prefill'");
        break;
    case PROTO_ROLE_DECODE:
        if (!m->has_transfer) return bad(c, "field 'transfer' is required with role 'decode'");
        if (m->n_generated < 1)
            return bad(c, "field 'generated' must hold the prefill's first token with role 'decode'");
        break;
    default: return bad(c, "field 'role' must be both, prefill or decode");
    }
    return 0;
}

static const field f_assign[] = {
    FI64(proto_assign, rid, FL_REQ, 0, 1, MAXI),
    FENUM(proto_assign, role, FL_REQ, 0, en_role3),
    FI32S(proto_assign, tokens, FL_REQ, 1, PROTO_MAX_TOKENS, TOK_LO, TOK_HI),
    FI32S(proto_assign, generated, FL_OMIT, 0, PROTO_MAX_TOKENS, TOK_LO, TOK_HI),
    FOBJ(proto_assign, sampling, FL_REQ, s_sampling),
    FSTR(proto_assign, rng, FL_OMIT, 64, 64, CS_HEX),
    FINT(proto_assign, max_tokens, FL_REQ, 1, 1, PROTO_MAX_TOKENS),
    FI32S(proto_assign, stop_token_ids, FL_OMIT, 0, PROTO_MAX_STOP_IDS, TOK_LO, TOK_HI),
    FBOOL(proto_assign, ignore_eos, FL_OMIT, 0),
    FSTR(proto_assign, session, FL_OMIT, 1, PROTO_MAX_ID, CS_ID),
    FOBJOPT(proto_assign, transfer, s_transfer),
};
static const schema s_assign = {sizeof(proto_assign), f_assign, NF(f_assign), 0, check_assign};

static const field f_token_event[] = {
    FI64(proto_token_event, rid, FL_REQ, 0, 1, MAXI),
    FINT(proto_token_event, index, FL_REQ, 0, 0, PROTO_MAX_TOKENS),
    FI32S(proto_token_event, ids, FL_REQ, 1, PROTO_MAX_TOKENS, TOK_LO, TOK_HI),
};
static const schema s_token_event = {sizeof(proto_token_event), f_token_event, NF(f_token_event),
                                     0, NULL};

static const field f_tokens[] = {
    FOBJS(proto_tokens, events, FL_REQ, 1, PROTO_MAX_EVENTS, s_token_event, proto_token_event),
};
static const schema s_tokens = {sizeof(proto_tokens), f_tokens, NF(f_tokens), 0, NULL};

static const field f_finished[] = {
    FI64(proto_finished, rid, FL_REQ, 0, 1, MAXI),
    FENUM(proto_finished, reason, FL_REQ, 0, en_finish),
    FINT(proto_finished, n_generated, FL_REQ, 0, 0, PROTO_MAX_TOKENS),
    FINT(proto_finished, cached_tokens, FL_REQ, 0, 0, IMAX),
};
static const schema s_finished = {sizeof(proto_finished), f_finished, NF(f_finished), 0, NULL};

static int check_failed(const void *mv, ctx *c)
{
    const proto_failed *m = mv;
    if (m->rid == 0 && m->xfer == 0) return bad(c, "give 'rid' or 'xfer' (or both)");
    return 0;
}

static const field f_failed[] = {
    FI64(proto_failed, rid, FL_OMIT, 0, 1, MAXI),
    FI64(proto_failed, xfer, FL_OMIT, 0, 1, MAXI),
    FENUM(proto_failed, code, FL_REQ | FL_OPEN, PROTO_ERR_OTHER, en_code),
    FSTR(proto_failed, message, FL_REQ, 0, 4096, CS_ANY),
    FBOOL(proto_failed, retryable, 0, 0),
};
static const schema s_failed = {sizeof(proto_failed), f_failed, NF(f_failed), 0, check_failed};

static const field f_wcancel[] = {FI64(proto_wcancel, rid, FL_REQ, 0, 1, MAXI)};
static const schema s_wcancel = {sizeof(proto_wcancel), f_wcancel, NF(f_wcancel), 0, NULL};

static const field f_reserve[] = {
    FI64(proto_reserve, xfer, FL_REQ, 0, 1, MAXI),
    FI64(proto_reserve, rid, FL_REQ, 0, 1, MAXI),
    FI64(proto_reserve, seq, FL_REQ, 0, 0, MAXI),
    FINT(proto_reserve, src_group, FL_REQ, 0, 0, IMAX),
    FOBJS(proto_reserve, src, FL_REQ, 1, PROTO_MAX_PEERS, s_peer, proto_peer),
    FI32S(proto_reserve, tokens, FL_REQ, 1, PROTO_MAX_TOKENS * 2, TOK_LO, TOK_HI),
    FINT(proto_reserve, lease_ms, FL_REQ, 0, 1, MAX_LEASE),
};
static const schema s_reserve = {sizeof(proto_reserve), f_reserve, NF(f_reserve), 0, NULL};

static const field f_reserved[] = {
    FI64(proto_reserved, xfer, FL_REQ, 0, 1, MAXI),
    FI64(proto_reserved, rid, FL_REQ, 0, 1, MAXI),
    FINT(proto_reserved, cached_tokens, FL_REQ, 0, 0, IMAX),
    FINT(proto_reserved, lease_ms, FL_REQ, 0, 1, MAX_LEASE),
};
static const schema s_reserved = {sizeof(proto_reserved), f_reserved, NF(f_reserved), 0, NULL};

static int check_kv_ready(const void *mv, ctx *c)
{
    const proto_kv_ready *m = mv;
    if (m->cached_tokens > m->n_tokens)
        return bad(c, "field 'cached_tokens' (%d) exceeds 'n_tokens' (%d)", m->cached_tokens,
                   m->n_tokens);
    return 0;
}

static const field f_kv_ready[] = {
    FI64(proto_kv_ready, xfer, FL_REQ, 0, 1, MAXI),
    FI64(proto_kv_ready, rid, FL_REQ, 0, 1, MAXI),
    FINT(proto_kv_ready, n_tokens, FL_REQ, 0, 1, IMAX),
    FINT(proto_kv_ready, cached_tokens, FL_REQ, 0, 0, IMAX),
    FSTR(proto_kv_ready, rng, FL_OMIT, 64, 64, CS_HEX),
    FI64(proto_kv_ready, bytes, FL_OMIT, 0, 0, MAXI),
    FDBL(proto_kv_ready, send_ms, FL_OMIT, 0, 0, 1e9),
    FDBL(proto_kv_ready, tail_ms, FL_OMIT, 0, 0, 1e9),
};
static const schema s_kv_ready = {sizeof(proto_kv_ready), f_kv_ready, NF(f_kv_ready), 0,
                                  check_kv_ready};

static const field f_xfer_ref[] = {
    FI64(proto_xfer_ref, xfer, FL_REQ, 0, 1, MAXI),
    FI64(proto_xfer_ref, rid, FL_REQ, 0, 1, MAXI),
};
static const schema s_xfer_ref = {sizeof(proto_xfer_ref), f_xfer_ref, NF(f_xfer_ref), 0, NULL};

static const field f_comm_id[] = {FSTR(proto_comm_id, unique_id, FL_REQ, 256, 256, CS_HEX)};
static const schema s_comm_id = {sizeof(proto_comm_id), f_comm_id, NF(f_comm_id), 0, NULL};

static const field f_endpoint[] = {
    FINT(proto_endpoint, rank, FL_REQ, 0, 0, MAXRANK),
    FSTR(proto_endpoint, endpoint, FL_REQ, 1, PROTO_MAX_ENDPOINT, CS_ID),
};
static const schema s_endpoint = {sizeof(proto_endpoint), f_endpoint, NF(f_endpoint), 0, NULL};

static int check_comm_init(const void *mv, ctx *c)
{
    const proto_comm_init *m = mv;
    if (m->rank >= m->world_size)
        return bad(c, "field 'rank' (%d) must be below 'world_size' (%d)", m->rank, m->world_size);
    if (m->backend == PROTO_BACKEND_NCCL && !m->unique_id)
        return bad(c, "field 'unique_id' is required with backend 'nccl'");
    if (m->backend == PROTO_BACKEND_TCP && m->n_peers < 1)
        return bad(c, "field 'peers' must list the ranks' endpoints with backend 'tcp'");
    return 0;
}

static const field f_comm_init[] = {
    FENUM(proto_comm_init, backend, FL_REQ, 0, en_backend),
    FINT(proto_comm_init, world_size, FL_REQ, 1, 1, PROTO_MAX_PEERS),
    FINT(proto_comm_init, rank, FL_REQ, 0, 0, MAXRANK),
    FSTR(proto_comm_init, unique_id, FL_OMIT, 256, 256, CS_HEX),
    FOBJS(proto_comm_init, peers, FL_OMIT, 0, PROTO_MAX_PEERS, s_endpoint, proto_endpoint),
};
static const schema s_comm_init = {sizeof(proto_comm_init), f_comm_init, NF(f_comm_init), 0,
                                   check_comm_init};

/* ---- types ---------------------------------------------------------------------------------- */

static const struct {
    const schema *s;
    proto_cmd cmd;
} types[PROTO_T__COUNT] = {
    [PROTO_T_NONE] = {NULL, PROTO_CMD_NONE},
    [PROTO_T_GENERATE] = {&s_generate, PROTO_CMD_GENERATE},
    [PROTO_T_CANCEL] = {&s_cancel, PROTO_CMD_CANCEL},
    [PROTO_T_STATUS_REQ] = {&s_empty, PROTO_CMD_STATUS},
    [PROTO_T_HEALTH_REQ] = {&s_empty, PROTO_CMD_HEALTH},
    [PROTO_T_ACCEPTED] = {&s_accepted, PROTO_CMD_ACCEPTED},
    [PROTO_T_DELTA] = {&s_delta, PROTO_CMD_DELTA},
    [PROTO_T_DONE] = {&s_done, PROTO_CMD_DONE},
    [PROTO_T_ERROR] = {&s_error, PROTO_CMD_ERROR},
    [PROTO_T_STATUS] = {&s_status, PROTO_CMD_STATUS},
    [PROTO_T_HEALTH] = {&s_health, PROTO_CMD_HEALTH},
    [PROTO_T_REGISTER] = {&s_register, PROTO_CMD_REGISTER},
    [PROTO_T_REGISTERED] = {&s_registered, PROTO_CMD_REGISTERED},
    [PROTO_T_REFUSED] = {&s_refused, PROTO_CMD_REFUSED},
    [PROTO_T_HEARTBEAT] = {&s_heartbeat, PROTO_CMD_HEARTBEAT},
    [PROTO_T_ASSIGN] = {&s_assign, PROTO_CMD_ASSIGN},
    [PROTO_T_TOKENS] = {&s_tokens, PROTO_CMD_TOKENS},
    [PROTO_T_FINISHED] = {&s_finished, PROTO_CMD_FINISHED},
    [PROTO_T_FAILED] = {&s_failed, PROTO_CMD_FAILED},
    [PROTO_T_WCANCEL] = {&s_wcancel, PROTO_CMD_CANCEL},
    [PROTO_T_RESERVE] = {&s_reserve, PROTO_CMD_RESERVE},
    [PROTO_T_RESERVED] = {&s_reserved, PROTO_CMD_RESERVED},
    [PROTO_T_KV_READY] = {&s_kv_ready, PROTO_CMD_KV_READY},
    [PROTO_T_KV_ACK] = {&s_xfer_ref, PROTO_CMD_KV_ACK},
    [PROTO_T_RELEASE] = {&s_xfer_ref, PROTO_CMD_RELEASE},
    [PROTO_T_COMM_ID] = {&s_comm_id, PROTO_CMD_COMM_ID},
    [PROTO_T_COMM_INIT] = {&s_comm_init, PROTO_CMD_COMM_INIT},
};

/* Who sends what: every (protocol, command, sender) that exists. */
static const struct {
    proto_kind kind;
    proto_cmd cmd;
    proto_sender from;
    proto_type t;
} directions[] = {
    {PROTO_CLIENT, PROTO_CMD_GENERATE, PROTO_FROM_PEER, PROTO_T_GENERATE},
    {PROTO_CLIENT, PROTO_CMD_CANCEL, PROTO_FROM_PEER, PROTO_T_CANCEL},
    {PROTO_CLIENT, PROTO_CMD_STATUS, PROTO_FROM_PEER, PROTO_T_STATUS_REQ},
    {PROTO_CLIENT, PROTO_CMD_HEALTH, PROTO_FROM_PEER, PROTO_T_HEALTH_REQ},
    {PROTO_CLIENT, PROTO_CMD_ACCEPTED, PROTO_FROM_DUETD, PROTO_T_ACCEPTED},
    {PROTO_CLIENT, PROTO_CMD_DELTA, PROTO_FROM_DUETD, PROTO_T_DELTA},
    {PROTO_CLIENT, PROTO_CMD_DONE, PROTO_FROM_DUETD, PROTO_T_DONE},
    {PROTO_CLIENT, PROTO_CMD_ERROR, PROTO_FROM_DUETD, PROTO_T_ERROR},
    {PROTO_CLIENT, PROTO_CMD_STATUS, PROTO_FROM_DUETD, PROTO_T_STATUS},
    {PROTO_CLIENT, PROTO_CMD_HEALTH, PROTO_FROM_DUETD, PROTO_T_HEALTH},
    {PROTO_WORKER, PROTO_CMD_REGISTER, PROTO_FROM_PEER, PROTO_T_REGISTER},
    {PROTO_WORKER, PROTO_CMD_REGISTERED, PROTO_FROM_DUETD, PROTO_T_REGISTERED},
    {PROTO_WORKER, PROTO_CMD_REFUSED, PROTO_FROM_DUETD, PROTO_T_REFUSED},
    {PROTO_WORKER, PROTO_CMD_HEARTBEAT, PROTO_FROM_PEER, PROTO_T_HEARTBEAT},
    {PROTO_WORKER, PROTO_CMD_HEARTBEAT, PROTO_FROM_DUETD, PROTO_T_HEARTBEAT},
    {PROTO_WORKER, PROTO_CMD_ASSIGN, PROTO_FROM_DUETD, PROTO_T_ASSIGN},
    {PROTO_WORKER, PROTO_CMD_TOKENS, PROTO_FROM_PEER, PROTO_T_TOKENS},
    {PROTO_WORKER, PROTO_CMD_FINISHED, PROTO_FROM_PEER, PROTO_T_FINISHED},
    {PROTO_WORKER, PROTO_CMD_FAILED, PROTO_FROM_PEER, PROTO_T_FAILED},
    {PROTO_WORKER, PROTO_CMD_CANCEL, PROTO_FROM_DUETD, PROTO_T_WCANCEL},
    {PROTO_WORKER, PROTO_CMD_RESERVE, PROTO_FROM_DUETD, PROTO_T_RESERVE},
    {PROTO_WORKER, PROTO_CMD_RESERVED, PROTO_FROM_PEER, PROTO_T_RESERVED},
    {PROTO_WORKER, PROTO_CMD_KV_READY, PROTO_FROM_PEER, PROTO_T_KV_READY},
    {PROTO_WORKER, PROTO_CMD_KV_ACK, PROTO_FROM_PEER, PROTO_T_KV_ACK},
    {PROTO_WORKER, PROTO_CMD_RELEASE, PROTO_FROM_DUETD, PROTO_T_RELEASE},
    {PROTO_WORKER, PROTO_CMD_COMM_ID, PROTO_FROM_PEER, PROTO_T_COMM_ID},
    {PROTO_WORKER, PROTO_CMD_COMM_INIT, PROTO_FROM_DUETD, PROTO_T_COMM_INIT},
    {PROTO_WORKER, PROTO_CMD_ERROR, PROTO_FROM_PEER, PROTO_T_ERROR},
    {PROTO_WORKER, PROTO_CMD_ERROR, PROTO_FROM_DUETD, PROTO_T_ERROR},
};

proto_type proto_body_type(proto_kind kind, proto_cmd cmd, proto_sender sender)
{
    for (size_t i = 0; i < sizeof directions / sizeof directions[0]; i++)
        if (directions[i].kind == kind && directions[i].cmd == cmd && directions[i].from == sender)
            return directions[i].t;
    return PROTO_T_NONE;
}

proto_type proto_msg_type(const proto_msg *msg, proto_side side)
{
    return msg ? proto_body_type(proto_side_kind(side), msg->cmd, proto_side_expects(side))
               : PROTO_T_NONE;
}

static const schema *type_schema(proto_type t)
{
    return ((int)t > 0 && t < PROTO_T__COUNT) ? types[t].s : NULL;
}

size_t proto_type_size(proto_type t)
{
    const schema *s = type_schema(t);
    return s ? s->size : 0;
}

const char *proto_type_name(proto_type t)
{
    return type_schema(t) ? cmd_table[types[t].cmd].name : "";
}

void proto_init(proto_type t, void *m)
{
    const schema *s = type_schema(t);
    if (s && m) init_obj(s, m);
}

void proto_free(proto_type t, void *m)
{
    const schema *s = type_schema(t);
    if (!s || !m) return;
    free_obj(s, m);
    init_obj(s, m);
}

int proto_parse(proto_type t, const json_t *body, void *out, proto_err *err)
{
    const schema *s = type_schema(t);
    err_reset(err);
    if (!s || !out) return proto_err_set(err, PROTO_ERR_INTERNAL, "proto_parse: bad arguments");
    if (err) err->cmd = types[t].cmd;
    ctx c = {.top = proto_type_name(t), .err = err};
    init_obj(s, out);
    int rc;
    if (!json_is_object(body))
        rc = bad(&c, "the body must be a JSON object (got %s)", body ? json_type_word(body) : "nothing");
    else
        rc = parse_obj(&c, s, body, out);
    if (rc) {
        proto_free(t, out);
        const json_t *id = json_is_object(body) ? json_object_get(body, "id") : NULL;
        size_t n = json_is_string(id) ? json_string_length(id) : 0;
        if (err && n >= 1 && n <= PROTO_MAX_ID) {
            const char *v = json_string_value(id);
            size_t k = 0;
            while (k < n && (unsigned char)v[k] > 0x20 && (unsigned char)v[k] < 0x7f) k++;
            if (k == n) memcpy(err->id, v, n + 1);
        }
        return -1;
    }
    return 0;
}

json_t *proto_build(proto_type t, const void *m)
{
    const schema *s = type_schema(t);
    return s && m ? build_obj(s, m) : NULL;
}

int proto_send_body(void *sock, const proto_route *route, proto_kind kind, proto_cmd cmd,
                    proto_type t, const void *m, int flags)
{
    if (proto_body_type(kind, cmd, PROTO_FROM_PEER) != t &&
        proto_body_type(kind, cmd, PROTO_FROM_DUETD) != t) {
        errno = EINVAL;
        return -1;
    }
    json_t *body = proto_build(t, m);
    if (!body) {
        errno = ENOMEM;
        return -1;
    }
    return proto_send(sock, route, kind, cmd, &body, flags);
}

sample_params proto_sampling_params(const proto_sampling *s, uint64_t seed_if_absent)
{
    sample_params p = sample_params_default();
    if (!s) return p;
    p.temperature = (float)s->temperature;
    p.top_k = s->top_k;
    p.top_p = (float)s->top_p;
    p.min_p = (float)s->min_p;
    p.repeat_penalty = (float)s->repeat_penalty;
    p.repeat_last_n = s->repeat_last_n;
    p.seed = s->seed >= 0 ? (uint64_t)s->seed : seed_if_absent;
    return p;
}

/* ---- typed wrappers -------------------------------------------------------------------------- */

#define PROTO_DEFINE_BODY(X, T)                                                                \
    void proto_##X##_init(proto_##X *m) { proto_init(T, m); }                                  \
    int proto_##X##_parse(const json_t *body, proto_##X *out, proto_err *err)                  \
    {                                                                                          \
        return proto_parse(T, body, out, err);                                                 \
    }                                                                                          \
    json_t *proto_##X##_build(const proto_##X *m) { return proto_build(T, m); }                \
    void proto_##X##_free(proto_##X *m) { proto_free(T, m); }

PROTO_DEFINE_BODY(generate, PROTO_T_GENERATE)
PROTO_DEFINE_BODY(cancel, PROTO_T_CANCEL)
PROTO_DEFINE_BODY(accepted, PROTO_T_ACCEPTED)
PROTO_DEFINE_BODY(delta, PROTO_T_DELTA)
PROTO_DEFINE_BODY(done, PROTO_T_DONE)
PROTO_DEFINE_BODY(error, PROTO_T_ERROR)
PROTO_DEFINE_BODY(status, PROTO_T_STATUS)
PROTO_DEFINE_BODY(health, PROTO_T_HEALTH)
PROTO_DEFINE_BODY(register, PROTO_T_REGISTER)
PROTO_DEFINE_BODY(registered, PROTO_T_REGISTERED)
PROTO_DEFINE_BODY(refused, PROTO_T_REFUSED)
PROTO_DEFINE_BODY(heartbeat, PROTO_T_HEARTBEAT)
PROTO_DEFINE_BODY(assign, PROTO_T_ASSIGN)
PROTO_DEFINE_BODY(tokens, PROTO_T_TOKENS)
PROTO_DEFINE_BODY(finished, PROTO_T_FINISHED)
PROTO_DEFINE_BODY(failed, PROTO_T_FAILED)
PROTO_DEFINE_BODY(wcancel, PROTO_T_WCANCEL)
PROTO_DEFINE_BODY(reserve, PROTO_T_RESERVE)
PROTO_DEFINE_BODY(reserved, PROTO_T_RESERVED)
PROTO_DEFINE_BODY(kv_ready, PROTO_T_KV_READY)
PROTO_DEFINE_BODY(comm_id, PROTO_T_COMM_ID)
PROTO_DEFINE_BODY(comm_init, PROTO_T_COMM_INIT)
