/* tests/test_proto.c: daemon/proto against docs/PROTOCOL.md.
 *
 * Real ZeroMQ sockets (inproc:// and tcp://127.0.0.1 on an ephemeral port) carry a
 * round trip of every message of both protocols; raw frames carry every kind of
 * malformed message, and the receiver's `error` reply goes back to the sender; the
 * schema tables are probed field by field (the error code and that the message names
 * the field); and the doc's ```json examples, error code table and command tables are
 * checked against the code.
 */
#include <errno.h>
#include <math.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cmocka.h>
#include <zmq.h>

#include "daemon/proto.h"

#define DOC_PATH "docs/PROTOCOL.md"
#define WAIT_MS 5000

/* ---- helpers ----------------------------------------------------------------------------- */

/* duetd's ROUTER (bound) and a peer's DEALER (connected) on one endpoint. */
typedef struct {
    void *zctx;
    void *router; /* duetd's side */
    void *dealer; /* the client's or worker's side */
    char endpoint[256];
} pair_t;

static void pair_open(pair_t *p, const char *where, proto_side router_side)
{
    memset(p, 0, sizeof *p);
    p->zctx = zmq_ctx_new();
    assert_non_null(p->zctx);
    p->router = zmq_socket(p->zctx, ZMQ_ROUTER);
    p->dealer = zmq_socket(p->zctx, ZMQ_DEALER);
    assert_non_null(p->router);
    assert_non_null(p->dealer);
    proto_side peer = router_side == PROTO_SIDE_DUETD_CLIENTS ? PROTO_SIDE_CLIENT : PROTO_SIDE_WORKER;
    assert_int_equal(proto_socket_options(p->router, router_side, 1000), 0);
    assert_int_equal(proto_socket_options(p->dealer, peer, 1000), 0);
    int sndtimeo = WAIT_MS;
    assert_int_equal(zmq_setsockopt(p->dealer, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo), 0);
    assert_int_equal(zmq_setsockopt(p->router, ZMQ_SNDTIMEO, &sndtimeo, sizeof sndtimeo), 0);
    assert_int_equal(zmq_bind(p->router, where), 0);
    size_t len = sizeof p->endpoint;
    assert_int_equal(zmq_getsockopt(p->router, ZMQ_LAST_ENDPOINT, p->endpoint, &len), 0);
    assert_int_equal(zmq_connect(p->dealer, p->endpoint), 0);
}

static void pair_close(pair_t *p)
{
    zmq_close(p->router);
    zmq_close(p->dealer);
    zmq_ctx_term(p->zctx);
}

/* Send n raw frames. */
static void send_frames(void *sock, const void *const *data, const size_t *len, int n)
{
    for (int i = 0; i < n; i++)
        assert_true(zmq_send(sock, data[i], len[i], i + 1 < n ? ZMQ_SNDMORE : 0) >= 0);
}

static void send_strs(void *sock, int n, ...)
{
    const void *data[8];
    size_t len[8];
    va_list ap;
    va_start(ap, n);
    for (int i = 0; i < n; i++) {
        data[i] = va_arg(ap, const char *);
        len[i] = strlen(data[i]);
    }
    va_end(ap);
    send_frames(sock, data, len, n);
}

static int contains(const char *hay, const char *needle)
{
    if (!strstr(hay, needle)) {
        print_error("'%s' not found in '%s'\n", needle, hay);
        return 0;
    }
    return 1;
}

static json_t *jparse(const char *text)
{
    json_error_t je;
    json_t *j = json_loads(text, JSON_DECODE_ANY, &je);
    if (!j) print_error("test JSON does not parse: %s: %s\n", je.text, text);
    assert_non_null(j);
    return j;
}

/* Is every member of a (recursively) in b, numbers within a relative 1e-12? */
static int json_subset(const json_t *a, const json_t *b)
{
    if (json_is_number(a) && json_is_number(b)) {
        double x = json_number_value(a), y = json_number_value(b);
        double tol = 1e-12 * (fabs(x) > 1 ? fabs(x) : 1);
        return fabs(x - y) <= tol;
    }
    if (json_typeof(a) != json_typeof(b)) return 0;
    if (json_is_object(a)) {
        const char *k;
        json_t *v;
        json_object_foreach((json_t *)a, k, v) {
            json_t *w = json_object_get(b, k);
            if (!w || !json_subset(v, w)) {
                print_error("member '%s' differs or is missing\n", k);
                return 0;
            }
        }
        return 1;
    }
    if (json_is_array(a)) {
        if (json_array_size(a) != json_array_size(b)) return 0;
        for (size_t i = 0; i < json_array_size(a); i++)
            if (!json_subset(json_array_get(a, i), json_array_get(b, i))) return 0;
        return 1;
    }
    return json_equal((json_t *)a, (json_t *)b);
}

static char *dump(const json_t *j)
{
    return json_dumps(j, JSON_COMPACT | JSON_REAL_PRECISION(15) | JSON_ENCODE_ANY);
}

/* ---- every message, fully populated --------------------------------------------------------- */

typedef struct {
    proto_kind kind;
    proto_cmd cmd;
    proto_sender from;
    const char *json; /* every field given, so build(parse(json)) == json */
} sample_t;

#define SHA "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
#define RNG "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
#define SAMPLING                                                                          \
    "\"sampling\":{\"temperature\":0.5,\"top_k\":10,\"top_p\":0.9,\"min_p\":0.1,"        \
    "\"repeat_penalty\":1.1,\"repeat_last_n\":32,\"seed\":123}"

static const sample_t samples[] = {
    {PROTO_CLIENT, PROTO_CMD_GENERATE, PROTO_FROM_PEER,
     "{\"id\":\"g1\",\"prompt\":\"Hello, w\\u00f6rld\\n\"," SAMPLING ",\"max_tokens\":100,"
     "\"stop\":[\"\\n\",\"END\"],\"stop_token_ids\":[2,3],\"ignore_eos\":true,\"stream\":true,"
     "\"session\":\"s-1\"}"},
    {PROTO_CLIENT, PROTO_CMD_GENERATE, PROTO_FROM_PEER,
     "{\"id\":\"g2\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},"
     "{\"role\":\"user\",\"content\":\"\"}]," SAMPLING "}"},
    {PROTO_CLIENT, PROTO_CMD_GENERATE, PROTO_FROM_PEER,
     "{\"id\":\"g3\",\"tokens\":[1,2,2147483647]," SAMPLING ",\"max_tokens\":262144}"},
    {PROTO_CLIENT, PROTO_CMD_CANCEL, PROTO_FROM_PEER, "{\"id\":\"g1\"}"},
    {PROTO_CLIENT, PROTO_CMD_STATUS, PROTO_FROM_PEER, "{}"},
    {PROTO_CLIENT, PROTO_CMD_HEALTH, PROTO_FROM_PEER, "{}"},
    {PROTO_CLIENT, PROTO_CMD_ACCEPTED, PROTO_FROM_DUETD,
     "{\"id\":\"g1\",\"prompt_tokens\":7,\"max_tokens\":100,\"seed\":9007199254740991}"},
    {PROTO_CLIENT, PROTO_CMD_DELTA, PROTO_FROM_DUETD,
     "{\"id\":\"g1\",\"index\":3,\"text\":\" caf\\u00e9\",\"token_ids\":[11,12]}"},
    {PROTO_CLIENT, PROTO_CMD_DONE, PROTO_FROM_DUETD,
     "{\"id\":\"g1\",\"finish_reason\":\"length\",\"text\":\"abc\",\"token_ids\":[5,6,7],"
     "\"usage\":{\"prompt_tokens\":7,\"cached_prompt_tokens\":4,\"completion_tokens\":3,"
     "\"retries\":1},\"timings\":{\"queue_ms\":0.25,\"ttft_ms\":12.5,\"tpot_ms_mean\":6.125,"
     "\"total_ms\":30.0}}"},
    {PROTO_CLIENT, PROTO_CMD_ERROR, PROTO_FROM_DUETD,
     "{\"id\":\"g1\",\"code\":\"busy\",\"message\":\"queue full (1024 waiting)\","
     "\"command\":\"generate\",\"retry_after_ms\":250}"},
    {PROTO_CLIENT, PROTO_CMD_STATUS, PROTO_FROM_DUETD,
     "{\"version\":\"duet 0.1.0\",\"model\":\"SmolLM2\",\"model_sha256\":\"" SHA "\","
     "\"uptime_s\":12.5,\"groups\":[{\"group\":0,\"role\":\"both\",\"tp_size\":2,"
     "\"workers_alive\":2,\"running\":3,\"waiting\":1,\"kv_blocks_total\":100,"
     "\"kv_blocks_free\":50,\"kv_blocks_cached\":10}],\"workers\":[{\"worker_id\":\"w0\","
     "\"rank\":0,\"group\":0,\"tp_rank\":0,\"role\":\"both\",\"device\":\"cpu\",\"state\":"
     "\"ready\",\"last_seen_ms\":5,\"kv_capacity_blocks\":100},{\"worker_id\":\"w1\",\"rank\":1,"
     "\"group\":0,\"tp_rank\":1,\"role\":\"both\",\"device\":\"cpu\",\"state\":\"dead\","
     "\"last_seen_ms\":9000,\"kv_capacity_blocks\":100}],\"kv\":{\"blocks_total\":100,"
     "\"blocks_used\":50,\"blocks_cached\":10,\"use\":0.5},\"queue\":{\"waiting\":1,"
     "\"running\":3,\"limit\":1024},\"prefix_cache\":{\"prompt_tokens\":1000,"
     "\"cached_tokens\":250,\"hit_rate\":0.25},\"transfers\":{\"completed\":0,\"failed\":0,"
     "\"in_flight\":0,\"bytes\":0,\"mean_ms\":0.0,\"max_ms\":0.0},\"requests\":{\"served\":5,"
     "\"failed\":1,\"cancelled\":2,\"retried\":3}}"},
    {PROTO_CLIENT, PROTO_CMD_HEALTH, PROTO_FROM_DUETD,
     "{\"ok\":false,\"state\":\"draining\",\"groups_ready\":1,\"workers_alive\":2,"
     "\"uptime_s\":99.5}"},
    {PROTO_WORKER, PROTO_CMD_REGISTER, PROTO_FROM_PEER,
     "{\"worker_id\":\"node1-gpu0\",\"software\":\"duet 0.1.0\",\"model\":{\"sha256\":\"" SHA
     "\",\"name\":\"SmolLM2\",\"n_vocab\":49152,\"n_ctx\":8192},\"kv\":{\"block_tokens\":16,"
     "\"dtype\":\"bf16\",\"n_layer\":30,\"n_head_kv\":3,\"head0\":1,\"n_heads\":2,"
     "\"head_dim\":64,\"capacity_blocks\":4096},\"rank\":3,\"group\":1,\"role\":\"decode\","
     "\"tp_rank\":1,\"tp_size\":2,\"device\":{\"kind\":\"cuda\",\"index\":1,\"name\":"
     "\"NVIDIA H100\",\"memory_bytes\":85899345920},\"backend\":\"tcp\",\"endpoint\":"
     "\"tcp://10.0.0.2:5601\",\"max_batch\":128}"},
    {PROTO_WORKER, PROTO_CMD_REGISTERED, PROTO_FROM_DUETD,
     "{\"rank\":3,\"group\":1,\"role\":\"decode\",\"tp_rank\":1,\"tp_size\":2,"
     "\"heartbeat_ms\":500,\"dead_after\":5}"},
    {PROTO_WORKER, PROTO_CMD_REFUSED, PROTO_FROM_DUETD,
     "{\"code\":\"layout_mismatch\",\"message\":\"block_tokens 32, cluster has 16\"}"},
    {PROTO_WORKER, PROTO_CMD_HEARTBEAT, PROTO_FROM_PEER,
     "{\"running\":4,\"waiting\":0,\"kv_free_blocks\":4000,\"kv_cached_blocks\":12}"},
    {PROTO_WORKER, PROTO_CMD_HEARTBEAT, PROTO_FROM_DUETD, "{}"},
    {PROTO_WORKER, PROTO_CMD_ASSIGN, PROTO_FROM_DUETD,
     "{\"rid\":18,\"role\":\"prefill\",\"tokens\":[1,2,3],\"generated\":[4]," SAMPLING
     ",\"rng\":\"" RNG "\",\"max_tokens\":64,\"stop_token_ids\":[2],\"ignore_eos\":true,"
     "\"session\":\"s-1\",\"transfer\":{\"xfer\":9,\"seq\":4,\"peer_group\":1,\"first_block\":2,"
     "\"peers\":[{\"rank\":2,\"head0\":0,\"n_heads\":2},{\"rank\":3,\"head0\":2,\"n_heads\":1}],"
     "\"lease_ms\":10000}}"},
    {PROTO_WORKER, PROTO_CMD_TOKENS, PROTO_FROM_PEER,
     "{\"events\":[{\"rid\":17,\"index\":0,\"ids\":[7042]},{\"rid\":12,\"index\":40,"
     "\"ids\":[253,254]}]}"},
    {PROTO_WORKER, PROTO_CMD_FINISHED, PROTO_FROM_PEER,
     "{\"rid\":17,\"reason\":\"cancelled\",\"n_generated\":3,\"cached_tokens\":16}"},
    {PROTO_WORKER, PROTO_CMD_FAILED, PROTO_FROM_PEER,
     "{\"rid\":18,\"xfer\":9,\"code\":\"transfer_failed\",\"message\":\"peer 2 gone\","
     "\"retryable\":true}"},
    {PROTO_WORKER, PROTO_CMD_CANCEL, PROTO_FROM_DUETD, "{\"rid\":17}"},
    {PROTO_WORKER, PROTO_CMD_RESERVE, PROTO_FROM_DUETD,
     "{\"xfer\":9,\"rid\":18,\"seq\":4,\"src_group\":0,\"src\":[{\"rank\":0,\"head0\":0,"
     "\"n_heads\":3}],\"tokens\":[1,2,3,4],\"lease_ms\":10000}"},
    {PROTO_WORKER, PROTO_CMD_RESERVED, PROTO_FROM_PEER,
     "{\"xfer\":9,\"rid\":18,\"cached_tokens\":16,\"lease_ms\":5000}"},
    {PROTO_WORKER, PROTO_CMD_KV_READY, PROTO_FROM_PEER,
     "{\"xfer\":9,\"rid\":18,\"n_tokens\":40,\"cached_tokens\":16,\"rng\":\"" RNG "\"}"},
    {PROTO_WORKER, PROTO_CMD_KV_ACK, PROTO_FROM_PEER, "{\"xfer\":9,\"rid\":18}"},
    {PROTO_WORKER, PROTO_CMD_RELEASE, PROTO_FROM_DUETD, "{\"xfer\":9,\"rid\":18}"},
    {PROTO_WORKER, PROTO_CMD_COMM_ID, PROTO_FROM_PEER,
     "{\"unique_id\":\"" RNG RNG RNG RNG "\"}"},
    {PROTO_WORKER, PROTO_CMD_COMM_INIT, PROTO_FROM_DUETD,
     "{\"backend\":\"nccl\",\"world_size\":4,\"rank\":3,\"unique_id\":\"" RNG RNG RNG RNG
     "\",\"peers\":[{\"rank\":0,\"endpoint\":\"tcp://a:1\"}]}"},
    {PROTO_WORKER, PROTO_CMD_ERROR, PROTO_FROM_PEER,
     "{\"code\":\"bad_request\",\"message\":\"assign: field 'rid' is missing\","
     "\"command\":\"assign\"}"},
    {PROTO_WORKER, PROTO_CMD_ERROR, PROTO_FROM_DUETD,
     "{\"code\":\"unexpected_command\",\"message\":\"tokens before registered\"}"},
};
#define N_SAMPLES ((int)(sizeof samples / sizeof samples[0]))

/* Send every sample of kind over a real pair: peer messages DEALER -> ROUTER, duetd's
 * ROUTER -> DEALER (to the route learnt from the first message). Each arrives, decodes to
 * its command and type, parses, and builds back to the JSON sent. */
static void roundtrip_all(proto_kind kind, const char *where)
{
    pair_t p;
    proto_side rside = kind == PROTO_CLIENT ? PROTO_SIDE_DUETD_CLIENTS : PROTO_SIDE_DUETD_WORKERS;
    proto_side dside = kind == PROTO_CLIENT ? PROTO_SIDE_CLIENT : PROTO_SIDE_WORKER;
    pair_open(&p, where, rside);
    proto_route route = {0};
    int have_route = 0, n = 0;
    for (int pass = 0; pass < 2; pass++) /* peers' messages first: they give the route */
        for (int i = 0; i < N_SAMPLES; i++) {
            const sample_t *s = &samples[i];
            if (s->kind != kind || (int)s->from != pass) continue;
            proto_type t = proto_body_type(kind, s->cmd, s->from);
            assert_int_not_equal(t, PROTO_T_NONE);
            json_t *orig = jparse(s->json);
            void *m = calloc(1, proto_type_size(t)), *m2 = calloc(1, proto_type_size(t));
            proto_err err;
            if (proto_parse(t, orig, m, &err)) print_error("%s: %s\n", s->json, err.message);
            assert_int_equal(err.code, PROTO_ERR_NONE);

            int from_peer = s->from == PROTO_FROM_PEER;
            void *tx = from_peer ? p.dealer : p.router, *rx = from_peer ? p.router : p.dealer;
            if (!from_peer) assert_true(have_route);
            assert_int_equal(proto_send_body(tx, from_peer ? NULL : &route, kind, s->cmd, t, m, 0), 0);
            proto_msg msg = {0};
            proto_rc rc = proto_recv(rx, from_peer ? rside : dside, from_peer ? 1 : 0, WAIT_MS,
                                     &msg, &err);
            if (rc != PROTO_OK) print_error("%s: %s\n", proto_cmd_name(s->cmd), err.message);
            assert_int_equal(rc, PROTO_OK);
            assert_int_equal(msg.cmd, s->cmd);
            assert_int_equal(msg.kind, kind);
            assert_int_equal(proto_msg_type(&msg, from_peer ? rside : dside), t);
            if (from_peer) {
                assert_int_equal(msg.route.n, 1);
                assert_true(msg.route.len[0] > 0);
                route = msg.route;
                have_route = 1;
            } else {
                assert_int_equal(msg.route.n, 0);
            }
            assert_int_equal(proto_parse(t, msg.body, m2, &err), 0);
            json_t *back = proto_build(t, m2);
            assert_non_null(back);
            if (!json_subset(orig, back) || !json_subset(back, orig)) {
                char *a = dump(orig), *b = dump(back);
                print_error("round trip of %s changed it:\n  sent %s\n  got  %s\n",
                            proto_cmd_name(s->cmd), a, b);
                free(a);
                free(b);
                fail();
            }
            json_decref(back);
            json_decref(orig);
            proto_msg_clear(&msg);
            proto_msg_clear(&msg); /* safe twice */
            proto_free(t, m);
            proto_free(t, m2);
            proto_free(t, m2); /* safe twice */
            free(m);
            free(m2);
            n++;
        }
    assert_true(n > 10);
    pair_close(&p);
}

static void test_roundtrip_client_inproc(void **state)
{
    (void)state;
    roundtrip_all(PROTO_CLIENT, "inproc://proto-client");
}

static void test_roundtrip_worker_tcp(void **state)
{
    (void)state;
    roundtrip_all(PROTO_WORKER, "tcp://127.0.0.1:*");
}

static void test_roundtrip_client_tcp(void **state)
{
    (void)state;
    roundtrip_all(PROTO_CLIENT, "tcp://127.0.0.1:*");
}

/* Every direction that exists has a sample above. */
static void test_samples_cover_every_message(void **state)
{
    (void)state;
    int n_dirs = 0;
    for (int k = 0; k < 2; k++)
        for (int c = 1; c < PROTO_CMD__COUNT; c++)
            for (int f = 0; f < 2; f++) {
                if (proto_body_type((proto_kind)k, (proto_cmd)c, (proto_sender)f) == PROTO_T_NONE)
                    continue;
                n_dirs++;
                int found = 0;
                for (int i = 0; i < N_SAMPLES; i++)
                    found |= samples[i].kind == (proto_kind)k && samples[i].cmd == (proto_cmd)c &&
                             samples[i].from == (proto_sender)f;
                if (!found) print_error("no sample for %s from %d\n", proto_cmd_name(c), f);
                assert_true(found);
            }
    assert_int_equal(n_dirs, 29);
    /* every type is the body of some direction */
    for (int t = 1; t < PROTO_T__COUNT; t++) {
        int used = 0;
        for (int k = 0; k < 2; k++)
            for (int c = 1; c < PROTO_CMD__COUNT; c++)
                for (int f = 0; f < 2; f++)
                    used |= proto_body_type((proto_kind)k, (proto_cmd)c, (proto_sender)f) ==
                            (proto_type)t;
        assert_true(used);
        assert_true(proto_type_size((proto_type)t) > 0);
        assert_true(strlen(proto_type_name((proto_type)t)) > 0);
    }
}

/* ---- typed values ----------------------------------------------------------------------- */

static void test_generate_values(void **state)
{
    (void)state;
    json_t *j = jparse(samples[0].json);
    proto_generate g;
    proto_err err;
    assert_int_equal(proto_generate_parse(j, &g, &err), 0);
    assert_string_equal(g.id, "g1");
    assert_int_equal(g.form, PROTO_PROMPT_TEXT);
    assert_string_equal(g.prompt, "Hello, w\xc3\xb6rld\n");
    assert_null(g.messages);
    assert_null(g.tokens);
    assert_true(g.sampling.temperature == 0.5);
    assert_int_equal(g.sampling.top_k, 10);
    assert_true(g.sampling.top_p == 0.9);
    assert_true(g.sampling.min_p == 0.1);
    assert_true(g.sampling.repeat_penalty == 1.1);
    assert_int_equal(g.sampling.repeat_last_n, 32);
    assert_int_equal(g.sampling.seed, 123);
    assert_int_equal(g.max_tokens, 100);
    assert_int_equal(g.n_stop, 2);
    assert_string_equal(g.stop[0], "\n");
    assert_string_equal(g.stop[1], "END");
    assert_int_equal(g.n_stop_token_ids, 2);
    assert_int_equal(g.stop_token_ids[1], 3);
    assert_int_equal(g.ignore_eos, 1);
    assert_int_equal(g.stream, 1);
    assert_string_equal(g.session, "s-1");
    sample_params sp = proto_sampling_params(&g.sampling, 99);
    assert_true(sp.temperature == 0.5f && sp.top_k == 10 && sp.top_p == 0.9f);
    assert_true(sp.seed == 123);
    proto_generate_free(&g);
    assert_null(g.id);
    assert_null(g.stop);
    assert_int_equal(g.n_stop, 0);
    proto_generate_free(&g);
    json_decref(j);

    j = jparse(samples[1].json);
    assert_int_equal(proto_generate_parse(j, &g, &err), 0);
    assert_int_equal(g.form, PROTO_PROMPT_CHAT);
    assert_int_equal(g.n_messages, 2);
    assert_string_equal(g.messages[0].role, "system");
    assert_string_equal(g.messages[1].content, "");
    proto_generate_free(&g);
    json_decref(j);

    j = jparse(samples[2].json);
    assert_int_equal(proto_generate_parse(j, &g, &err), 0);
    assert_int_equal(g.form, PROTO_PROMPT_TOKENS);
    assert_int_equal(g.n_tokens, 3);
    assert_int_equal(g.tokens[2], 2147483647);
    assert_int_equal(g.max_tokens, PROTO_MAX_TOKENS);
    proto_generate_free(&g);
    json_decref(j);
}

/* Absent and null optional fields take the defaults; the sampling defaults are the
 * kernel's. */
static void test_generate_defaults(void **state)
{
    (void)state;
    json_t *j = jparse("{\"id\":\"a\",\"prompt\":\"\",\"messages\":null,\"sampling\":{\"seed\":null},"
                       "\"stop\":null,\"session\":null}");
    proto_generate g;
    proto_err err;
    assert_int_equal(proto_generate_parse(j, &g, &err), 0);
    assert_int_equal(g.form, PROTO_PROMPT_TEXT);
    assert_string_equal(g.prompt, "");
    assert_int_equal(g.max_tokens, 0);
    assert_int_equal(g.stream, 0);
    assert_int_equal(g.ignore_eos, 0);
    assert_null(g.session);
    assert_int_equal(g.n_stop, 0);
    assert_int_equal(g.sampling.seed, -1);
    sample_params got = proto_sampling_params(&g.sampling, 77), want = sample_params_default();
    assert_true(got.temperature == want.temperature);
    assert_int_equal(got.top_k, want.top_k);
    assert_true(got.top_p == want.top_p);
    assert_true(got.min_p == want.min_p);
    assert_true(got.repeat_penalty == want.repeat_penalty);
    assert_int_equal(got.repeat_last_n, want.repeat_last_n);
    assert_true(got.seed == 77);
    assert_int_equal(sample_params_check(&got, NULL, 0), 0);
    proto_generate_free(&g);
    json_decref(j);

    /* the init'ed struct equals what an empty sampling object parses to */
    proto_generate a;
    proto_generate_init(&a);
    assert_true(a.sampling.temperature == 0.8 && a.sampling.top_k == 40 && a.sampling.seed == -1);
    assert_null(a.id);
    proto_generate_free(&a);
}

/* Builders write canonical bytes: compact, table order, defaults left out. */
static void test_canonical_json(void **state)
{
    (void)state;
    proto_accepted a;
    proto_accepted_init(&a);
    a.id = "r1";
    a.prompt_tokens = 6;
    a.max_tokens = 16;
    a.seed = 42;
    json_t *j = proto_accepted_build(&a);
    char *s = dump(j);
    assert_string_equal(s, "{\"id\":\"r1\",\"prompt_tokens\":6,\"max_tokens\":16,\"seed\":42}");
    free(s);
    json_decref(j);

    proto_generate g;
    proto_generate_init(&g);
    g.id = "x";
    g.prompt = "hi";
    j = proto_generate_build(&g);
    s = dump(j);
    assert_string_equal(s, "{\"id\":\"x\",\"prompt\":\"hi\",\"sampling\":{\"temperature\":0.8,"
                           "\"top_k\":40,\"top_p\":0.95,\"min_p\":0.05,\"repeat_penalty\":1.0,"
                           "\"repeat_last_n\":64}}");
    free(s);
    json_decref(j);

    proto_error e;
    proto_error_init(&e);
    e.code = PROTO_ERR_NOT_FOUND;
    e.message = "no request 'r9'";
    j = proto_error_build(&e);
    s = dump(j);
    assert_string_equal(s, "{\"code\":\"not_found\",\"message\":\"no request 'r9'\"}");
    free(s);
    json_decref(j);

    /* a required string left NULL, or an enum out of range, cannot be built */
    e.message = NULL;
    assert_null(proto_error_build(&e));
    e.message = "m";
    e.code = (proto_code)999;
    assert_null(proto_error_build(&e));

    /* worker heartbeat without load is {} */
    proto_heartbeat h;
    proto_heartbeat_init(&h);
    j = proto_heartbeat_build(&h);
    s = dump(j);
    assert_string_equal(s, "{}");
    free(s);
    json_decref(j);
}

/* ---- malformed messages on real sockets ------------------------------------------------- */

typedef struct {
    int n;              /* frames */
    const char *f[6];   /* frame texts (NULL: use raw below) */
    proto_code code;
    const char *needle; /* in the message */
} bad_frames_t;

/* A malformed message sent DEALER -> ROUTER gives PROTO_INVALID with the code, the route
 * is known, and proto_send_error() gets the code back to the sender. */
static void expect_invalid(pair_t *p, proto_side rside, const void *const *data, const size_t *len,
                           int n, proto_code code, const char *needle, proto_cmd cmd)
{
    proto_kind kind = proto_side_kind(rside);
    proto_side dside = kind == PROTO_CLIENT ? PROTO_SIDE_CLIENT : PROTO_SIDE_WORKER;
    send_frames(p->dealer, data, len, n);
    proto_msg msg = {0};
    proto_err err;
    proto_rc rc = proto_recv(p->router, rside, 1, WAIT_MS, &msg, &err);
    assert_int_equal(rc, PROTO_INVALID);
    if (err.code != code)
        print_error("expected %s, got %s: %s\n", proto_code_name(code), proto_code_name(err.code),
                    err.message);
    assert_int_equal(err.code, code);
    assert_true(contains(err.message, needle));
    assert_null(msg.body);
    assert_int_equal(msg.route.n, 1);
    assert_int_equal(msg.cmd, cmd);
    assert_int_equal(err.cmd, cmd);

    assert_int_equal(proto_send_error(p->router, &msg.route, kind, &err, ZMQ_DONTWAIT), 0);
    proto_msg reply = {0};
    proto_err e2;
    assert_int_equal(proto_recv(p->dealer, dside, 0, WAIT_MS, &reply, &e2), PROTO_OK);
    assert_int_equal(reply.cmd, PROTO_CMD_ERROR);
    proto_error eb;
    assert_int_equal(proto_error_parse(reply.body, &eb, &e2), 0);
    assert_int_equal(eb.code, code);
    assert_string_equal(eb.message, err.message);
    if (cmd != PROTO_CMD_NONE)
        assert_string_equal(eb.command, proto_cmd_name(cmd));
    else
        assert_null(eb.command);
    proto_error_free(&eb);
    proto_msg_clear(&reply);
    proto_msg_clear(&msg);
}

static void expect_invalid_strs(pair_t *p, proto_side rside, int n, const char *const *f,
                                proto_code code, const char *needle, proto_cmd cmd)
{
    const void *data[8];
    size_t len[8];
    for (int i = 0; i < n; i++) {
        data[i] = f[i];
        len[i] = strlen(f[i]);
    }
    expect_invalid(p, rside, data, len, n, code, needle, cmd);
}

static void test_malformed_client(void **state)
{
    (void)state;
    pair_t p;
    const proto_side rs = PROTO_SIDE_DUETD_CLIENTS;
    pair_open(&p, "inproc://proto-bad", rs);
    const char *T = PROTO_CLIENT_TAG;
    struct {
        int n;
        const char *f[6];
        proto_code code;
        const char *needle;
        proto_cmd cmd;
    } cases[] = {
        {1, {T}, PROTO_ERR_BAD_FRAMES, "expected 3 frames (tag, command, body) after 1 routing frame, got 1", 0},
        {2, {T, "status"}, PROTO_ERR_BAD_FRAMES, "got 2", 0},
        {4, {T, "status", "{}", "{}"}, PROTO_ERR_BAD_FRAMES, "got 4", 0},
        {5, {T, "status", "{}", "{}", "{}"}, PROTO_ERR_BAD_FRAMES, "got 5", 0},
        {4, {"", T, "status", "{}"}, PROTO_ERR_BAD_FRAMES, "use a DEALER socket", 0},
        {3, {"http/1.1", "status", "{}"}, PROTO_ERR_UNKNOWN_PROTOCOL, "frame 0: 'http/1.1' is not a duet protocol tag", 0},
        {3, {"", "status", "{}"}, PROTO_ERR_UNKNOWN_PROTOCOL, "frame 0: ''", 0},
        {3, {"duet.client", "status", "{}"}, PROTO_ERR_UNKNOWN_PROTOCOL, "frame 0", 0},
        {3, {PROTO_WORKER_TAG, "status", "{}"}, PROTO_ERR_UNKNOWN_PROTOCOL, "is the worker protocol; this socket speaks duet.client/1", 0},
        {3, {"duet.client/2", "status", "{}"}, PROTO_ERR_UNSUPPORTED_VERSION, "frame 0: 'duet.client/2' is not a supported version of duet.client", 0},
        {3, {"duet.client/10", "status", "{}"}, PROTO_ERR_UNSUPPORTED_VERSION, "this peer speaks duet.client/1", 0},
        {3, {"duet.client/", "status", "{}"}, PROTO_ERR_UNSUPPORTED_VERSION, "frame 0", 0},
        {3, {T, "generat", "{}"}, PROTO_ERR_UNKNOWN_COMMAND, "frame 1: unknown command 'generat'", 0},
        {3, {T, "", "{}"}, PROTO_ERR_UNKNOWN_COMMAND, "frame 1: unknown command ''", 0},
        {3, {T, "GENERATE", "{}"}, PROTO_ERR_UNKNOWN_COMMAND, "generate, cancel, status, health", 0},
        {3, {T, "register", "{}"}, PROTO_ERR_UNKNOWN_COMMAND, "frame 1", 0},
        {3, {T, "done", "{}"}, PROTO_ERR_UNEXPECTED_COMMAND, "frame 1: 'done' is sent by duetd, not by a client", PROTO_CMD_DONE},
        {3, {T, "delta", "{}"}, PROTO_ERR_UNEXPECTED_COMMAND, "'delta'", PROTO_CMD_DELTA},
        {3, {T, "error", "{}"}, PROTO_ERR_UNEXPECTED_COMMAND, "'error'", PROTO_CMD_ERROR},
        {3, {T, "status", "{\"a\":"}, PROTO_ERR_BAD_JSON, "frame 2: invalid JSON at line 1", PROTO_CMD_STATUS},
        {3, {T, "generate", "not json"}, PROTO_ERR_BAD_JSON, "frame 2: invalid JSON", PROTO_CMD_GENERATE},
        {3, {T, "status", ""}, PROTO_ERR_BAD_JSON, "frame 2 is empty", PROTO_CMD_STATUS},
        {3, {T, "status", "[1,2]"}, PROTO_ERR_BAD_JSON, "frame 2: the body must be a JSON object, not an array", PROTO_CMD_STATUS},
        {3, {T, "status", "42"}, PROTO_ERR_BAD_JSON, "not an integer", PROTO_CMD_STATUS},
        {3, {T, "status", "\"s\""}, PROTO_ERR_BAD_JSON, "not a string", PROTO_CMD_STATUS},
        {3, {T, "status", "null"}, PROTO_ERR_BAD_JSON, "not a null", PROTO_CMD_STATUS},
        {3, {T, "status", "{\"a\":1,\"a\":2}"}, PROTO_ERR_BAD_JSON, "frame 2", PROTO_CMD_STATUS},
        {3, {T, "status", "{\"a\":\"\xff\xfe\"}"}, PROTO_ERR_BAD_JSON, "frame 2", PROTO_CMD_STATUS},
        {3, {T, "status", "{} {}"}, PROTO_ERR_BAD_JSON, "frame 2", PROTO_CMD_STATUS},
        {3, {T, "status", "{\"a\":\"\\u0000\"}"}, PROTO_ERR_BAD_JSON, "frame 2", PROTO_CMD_STATUS},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_invalid_strs(&p, rs, cases[i].n, cases[i].f, cases[i].code, cases[i].needle,
                            cases[i].cmd);

    /* a tag with a NUL byte and binary junk is quoted, not printed raw */
    {
        const char junk[] = {'d', 'u', 'e', 't', 0, 1, '\n'};
        const void *data[3] = {junk, "status", "{}"};
        size_t len[3] = {sizeof junk, 6, 2};
        expect_invalid(&p, rs, data, len, 3, PROTO_ERR_UNKNOWN_PROTOCOL, "'duet\\x00\\x01\\x0a'",
                       PROTO_CMD_NONE);
    }
    /* a body over the limit */
    {
        size_t n = PROTO_MAX_BODY + 1;
        char *big = malloc(n);
        assert_non_null(big);
        memset(big, ' ', n);
        big[0] = '{';
        big[n - 1] = '}';
        const void *data[3] = {T, "generate", big};
        size_t len[3] = {strlen(T), 8, n};
        expect_invalid(&p, rs, data, len, 3, PROTO_ERR_TOO_LARGE, "frame 2: body of 16777217 bytes",
                       PROTO_CMD_GENERATE);
        free(big);
    }
    /* after all that, a good message still goes through */
    send_strs(p.dealer, 3, T, "health", "{}");
    proto_msg msg = {0};
    proto_err err;
    assert_int_equal(proto_recv(p.router, rs, 1, WAIT_MS, &msg, &err), PROTO_OK);
    assert_int_equal(msg.cmd, PROTO_CMD_HEALTH);
    assert_int_equal(proto_msg_type(&msg, rs), PROTO_T_HEALTH_REQ);
    proto_msg_clear(&msg);
    pair_close(&p);
}

static void test_malformed_worker(void **state)
{
    (void)state;
    pair_t p;
    const proto_side rs = PROTO_SIDE_DUETD_WORKERS;
    pair_open(&p, "tcp://127.0.0.1:*", rs);
    const char *T = PROTO_WORKER_TAG;
    struct {
        int n;
        const char *f[6];
        proto_code code;
        const char *needle;
        proto_cmd cmd;
    } cases[] = {
        {1, {T}, PROTO_ERR_BAD_FRAMES, "got 1", 0},
        {5, {T, "heartbeat", "{}", "x", "y"}, PROTO_ERR_BAD_FRAMES, "got 5", 0},
        {3, {PROTO_CLIENT_TAG, "heartbeat", "{}"}, PROTO_ERR_UNKNOWN_PROTOCOL, "is the client protocol; this socket speaks duet.worker/1", 0},
        {3, {"duet.worker/0", "heartbeat", "{}"}, PROTO_ERR_UNSUPPORTED_VERSION, "'duet.worker/0' is not a supported version of duet.worker", 0},
        {3, {T, "generate", "{}"}, PROTO_ERR_UNKNOWN_COMMAND, "frame 1: unknown command 'generate' (duet.worker/1 has: cancel, error, register", 0},
        {3, {T, "assign", "{}"}, PROTO_ERR_UNEXPECTED_COMMAND, "frame 1: 'assign' is sent by duetd, not by a worker", PROTO_CMD_ASSIGN},
        {3, {T, "cancel", "{}"}, PROTO_ERR_UNEXPECTED_COMMAND, "'cancel' is sent by duetd", PROTO_CMD_CANCEL},
        {3, {T, "registered", "{}"}, PROTO_ERR_UNEXPECTED_COMMAND, "'registered'", PROTO_CMD_REGISTERED},
        {3, {T, "tokens", "{\"events\":[}"}, PROTO_ERR_BAD_JSON, "frame 2: invalid JSON", PROTO_CMD_TOKENS},
        {3, {T, "tokens", "[]"}, PROTO_ERR_BAD_JSON, "not an array", PROTO_CMD_TOKENS},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        expect_invalid_strs(&p, rs, cases[i].n, cases[i].f, cases[i].code, cases[i].needle,
                            cases[i].cmd);
    pair_close(&p);
}

/* The receiving side of a worker refuses what only a worker sends. */
static void test_wrong_direction_at_peer(void **state)
{
    (void)state;
    proto_frame f[3] = {{PROTO_WORKER_TAG, strlen(PROTO_WORKER_TAG)}, {"tokens", 6}, {"{}", 2}};
    proto_msg msg = {0};
    proto_err err;
    assert_int_equal(proto_decode(f, 3, PROTO_SIDE_WORKER, 0, &msg, &err), PROTO_INVALID);
    assert_int_equal(err.code, PROTO_ERR_UNEXPECTED_COMMAND);
    assert_true(contains(err.message, "frame 1: 'tokens' is sent by a worker, not by duetd"));
    proto_frame c[3] = {{PROTO_CLIENT_TAG, strlen(PROTO_CLIENT_TAG)}, {"generate", 8}, {"{}", 2}};
    assert_int_equal(proto_decode(c, 3, PROTO_SIDE_CLIENT, 0, &msg, &err), PROTO_INVALID);
    assert_int_equal(err.code, PROTO_ERR_UNEXPECTED_COMMAND);
    assert_true(contains(err.message, "'generate' is sent by a client, not by duetd"));
    /* status travels both ways with two schemas */
    proto_frame s[3] = {{PROTO_CLIENT_TAG, strlen(PROTO_CLIENT_TAG)}, {"status", 6}, {"{}", 2}};
    assert_int_equal(proto_decode(s, 3, PROTO_SIDE_CLIENT, 0, &msg, &err), PROTO_OK);
    assert_int_equal(proto_msg_type(&msg, PROTO_SIDE_CLIENT), PROTO_T_STATUS);
    proto_status st;
    assert_int_equal(proto_status_parse(msg.body, &st, &err), -1);
    assert_true(contains(err.message, "status: field 'version' is missing"));
    proto_msg_clear(&msg);
    /* routing frames: too many asked, or a routing frame too long */
    assert_int_equal(proto_decode(s, 3, PROTO_SIDE_CLIENT, PROTO_MAX_ROUTE + 1, &msg, &err),
                     PROTO_SYSERR);
    char longid[300];
    memset(longid, 'x', sizeof longid);
    proto_frame r[4] = {{longid, sizeof longid}, s[0], s[1], s[2]};
    assert_int_equal(proto_decode(r, 4, PROTO_SIDE_DUETD_CLIENTS, 1, &msg, &err), PROTO_INVALID);
    assert_int_equal(err.code, PROTO_ERR_BAD_FRAMES);
    assert_true(contains(err.message, "routing frame 0"));
    /* the same frames with a sane identity are fine */
    r[0].size = 5;
    assert_int_equal(proto_decode(r, 4, PROTO_SIDE_DUETD_CLIENTS, 1, &msg, &err), PROTO_OK);
    assert_int_equal(msg.route.n, 1);
    assert_int_equal(msg.route.len[0], 5);
    assert_memory_equal(msg.route.id[0], "xxxxx", 5);
    proto_msg_clear(&msg);
}

/* ---- body schemas, field by field --------------------------------------------------------- */

typedef struct {
    const char *body;
    const char *needle; /* NULL: must parse */
} schema_case_t;

static void run_schema_cases(proto_type t, const schema_case_t *cases, int n)
{
    for (int i = 0; i < n; i++) {
        json_t *j = jparse(cases[i].body);
        void *m = calloc(1, proto_type_size(t));
        proto_err err;
        int rc = proto_parse(t, j, m, &err);
        if (!cases[i].needle) {
            if (rc) print_error("case %d (%s) failed: %s\n", i, cases[i].body, err.message);
            assert_int_equal(rc, 0);
            assert_int_equal(err.code, PROTO_ERR_NONE);
        } else {
            if (rc == 0) print_error("case %d (%s) parsed\n", i, cases[i].body);
            assert_int_equal(rc, -1);
            assert_int_equal(err.code, PROTO_ERR_BAD_REQUEST);
            assert_true(contains(err.message, cases[i].needle));
            /* the message starts with the command */
            assert_int_equal(strncmp(err.message, proto_type_name(t), strlen(proto_type_name(t))), 0);
        }
        proto_free(t, m);
        free(m);
        json_decref(j);
    }
}

#define P "\"prompt\":\"x\""
static const schema_case_t generate_cases[] = {
    {"{" P "}", "field 'id' is missing"},
    {"{\"id\":null," P "}", "field 'id' is missing"},
    {"{\"id\":5," P "}", "field 'id' must be a string (got integer)"},
    {"{\"id\":\"\"," P "}", "field 'id' must be 1 to 64 bytes long (got 0)"},
    {"{\"id\":\"a b\"," P "}", "field 'id' may hold only printable ASCII without spaces (byte 0x20 at offset 1)"},
    {"{\"id\":\"\\u00e9\"," P "}", "field 'id' may hold only printable ASCII"},
    {"{\"id\":\"0123456789012345678901234567890123456789012345678901234567890123X\"," P "}",
     "field 'id' must be 1 to 64 bytes long (got 65)"},
    {"{\"id\":\"a\"}", "give exactly one of 'prompt', 'messages', 'tokens' (got none)"},
    {"{\"id\":\"a\"," P ",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}]}",
     "give exactly one of 'prompt', 'messages', 'tokens' (got prompt and messages)"},
    {"{\"id\":\"a\"," P ",\"tokens\":[1]}", "(got prompt and tokens)"},
    {"{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"}],\"tokens\":[1]}",
     "(got messages and tokens)"},
    {"{\"id\":\"a\",\"prompt\":5}", "field 'prompt' must be a string (got integer)"},
    {"{\"id\":\"a\",\"messages\":[]}", "field 'messages' must hold 1 to 1024 items (got 0)"},
    {"{\"id\":\"a\",\"messages\":{\"role\":\"user\"}}", "field 'messages' must be an array (got object)"},
    {"{\"id\":\"a\",\"messages\":[\"hi\"]}", "field 'messages[0]' must be an object (got string)"},
    {"{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"x\"},{\"role\":\"user\"}]}",
     "field 'messages[1].content' is missing"},
    {"{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":\"x\",\"name\":\"bob\"}]}",
     "unknown field 'messages[0].name'"},
    {"{\"id\":\"a\",\"messages\":[{\"role\":\"\",\"content\":\"x\"}]}",
     "field 'messages[0].role' must be 1 to 32 bytes long (got 0)"},
    {"{\"id\":\"a\",\"messages\":[{\"role\":\"user\",\"content\":7}]}",
     "field 'messages[0].content' must be a string (got integer)"},
    {"{\"id\":\"a\",\"tokens\":[]}", "field 'tokens' must hold 1 to 262144 items (got 0)"},
    {"{\"id\":\"a\",\"tokens\":[1,-1]}", "field 'tokens[1]' must be in [0, 2147483647] (got -1)"},
    {"{\"id\":\"a\",\"tokens\":[1,2.5]}", "field 'tokens[1]' must be an integer (got number)"},
    {"{\"id\":\"a\",\"tokens\":[1,3000000000]}", "field 'tokens[1]' must be in [0, 2147483647] (got 3000000000)"},
    {"{\"id\":\"a\",\"tokens\":[\"1\"]}", "field 'tokens[0]' must be an integer (got string)"},
    {"{\"id\":\"a\"," P ",\"sampling\":[]}", "field 'sampling' must be an object (got array)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"temperature\":-0.1}}", "field 'sampling.temperature' must be >= 0 (got -0.1)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"temperature\":\"hot\"}}", "field 'sampling.temperature' must be a number (got string)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"top_p\":0}}", "field 'sampling.top_p' must be in (0, 1] (got 0)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"top_p\":1.5}}", "field 'sampling.top_p' must be in (0, 1] (got 1.5)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"min_p\":1.01}}", "field 'sampling.min_p' must be in [0, 1] (got 1.01)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"min_p\":-1}}", "field 'sampling.min_p' must be in [0, 1] (got -1)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"repeat_penalty\":0}}", "field 'sampling.repeat_penalty' must be > 0 (got 0)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"repeat_last_n\":-2}}", "field 'sampling.repeat_last_n' must be in [-1, 2147483647] (got -2)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"top_k\":-1}}", "field 'sampling.top_k' must be in [0, 2147483647] (got -1)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"top_k\":40.0}}", "field 'sampling.top_k' must be an integer (got number)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"top_k\":true}}", "field 'sampling.top_k' must be an integer (got boolean)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"seed\":-1}}", "field 'sampling.seed' must be in [0, 9007199254740991] (got -1)"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"seed\":9007199254740992}}", "field 'sampling.seed' must be in [0, 9007199254740991]"},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"temp\":1}}", "unknown field 'sampling.temp'"},
    {"{\"id\":\"a\"," P ",\"temperature\":0}", "unknown field 'temperature'"},
    {"{\"id\":\"a\"," P ",\"max_tokens\":0}", "field 'max_tokens' must be in [1, 262144] (got 0)"},
    {"{\"id\":\"a\"," P ",\"max_tokens\":262145}", "field 'max_tokens' must be in [1, 262144] (got 262145)"},
    {"{\"id\":\"a\"," P ",\"max_tokens\":\"10\"}", "field 'max_tokens' must be an integer (got string)"},
    {"{\"id\":\"a\"," P ",\"stop\":\"END\"}", "field 'stop' must be an array (got string)"},
    {"{\"id\":\"a\"," P ",\"stop\":[\"1\",\"2\",\"3\",\"4\",\"5\",\"6\",\"7\",\"8\",\"9\",\"10\",\"11\","
     "\"12\",\"13\",\"14\",\"15\",\"16\",\"17\"]}", "field 'stop' must hold 0 to 16 items (got 17)"},
    {"{\"id\":\"a\"," P ",\"stop\":[\"ok\",\"\"]}", "field 'stop[1]' must be 1 to 256 bytes long (got 0)"},
    {"{\"id\":\"a\"," P ",\"stop\":[1]}", "field 'stop[0]' must be a string (got integer)"},
    {"{\"id\":\"a\"," P ",\"stop_token_ids\":[-3]}", "field 'stop_token_ids[0]' must be in [0, 2147483647] (got -3)"},
    {"{\"id\":\"a\"," P ",\"stop_token_ids\":2}", "field 'stop_token_ids' must be an array (got integer)"},
    {"{\"id\":\"a\"," P ",\"ignore_eos\":\"yes\"}", "field 'ignore_eos' must be true or false (got string)"},
    {"{\"id\":\"a\"," P ",\"stream\":1}", "field 'stream' must be true or false (got integer)"},
    {"{\"id\":\"a\"," P ",\"session\":\"\"}", "field 'session' must be 1 to 64 bytes long (got 0)"},
    {"{\"id\":\"a\"," P ",\"session\":\"a\\nb\"}", "field 'session' may hold only printable ASCII without spaces (byte 0x0a at offset 1)"},
    {"{\"id\":\"a\"," P ",\"Stream\":true}", "unknown field 'Stream'"},
    /* good ones */
    {"{\"id\":\"a\",\"prompt\":\"\"}", NULL},
    {"{\"id\":\"a\"," P ",\"tokens\":null,\"sampling\":{\"temperature\":0,\"top_p\":1,\"min_p\":0,"
     "\"repeat_last_n\":-1,\"seed\":0}}", NULL},
    {"{\"id\":\"~!@#$%^&*()_+{}|:<>?\"," P ",\"stop_token_ids\":[]}", NULL},
    {"{\"id\":\"a\"," P ",\"sampling\":{\"seed\":9007199254740991},\"max_tokens\":262144}", NULL},
};

static void test_generate_schema(void **state)
{
    (void)state;
    run_schema_cases(PROTO_T_GENERATE, generate_cases,
                     (int)(sizeof generate_cases / sizeof generate_cases[0]));

    /* long strings: a stop string of 257 bytes, a role of 33 */
    char body[1200];
    char s257[258], s33[34];
    memset(s257, 'z', 257);
    s257[257] = '\0';
    memset(s33, 'r', 33);
    s33[33] = '\0';
    snprintf(body, sizeof body, "{\"id\":\"a\"," P ",\"stop\":[\"%s\"]}", s257);
    schema_case_t c1[] = {{body, "field 'stop[0]' must be 1 to 256 bytes long (got 257)"}};
    run_schema_cases(PROTO_T_GENERATE, c1, 1);
    snprintf(body, sizeof body, "{\"id\":\"a\",\"messages\":[{\"role\":\"%s\",\"content\":\"\"}]}", s33);
    schema_case_t c2[] = {{body, "field 'messages[0].role' must be 1 to 32 bytes long (got 33)"}};
    run_schema_cases(PROTO_T_GENERATE, c2, 1);

    /* chat content over the prompt limit in all, though no single message is */
    json_t *j = jparse("{\"id\":\"big\",\"messages\":[]}");
    json_t *msgs = json_object_get(j, "messages");
    size_t part = PROTO_MAX_PROMPT / 2 + 1;
    char *text = malloc(part + 1);
    memset(text, 'a', part);
    text[part] = '\0';
    for (int i = 0; i < 2; i++)
        json_array_append_new(msgs, json_pack("{s:s, s:s}", "role", "user", "content", text));
    free(text);
    proto_generate g;
    proto_err err;
    assert_int_equal(proto_generate_parse(j, &g, &err), -1);
    assert_int_equal(err.code, PROTO_ERR_BAD_REQUEST);
    assert_true(contains(err.message, "field 'messages' holds 4194306 bytes of content"));
    assert_string_equal(err.id, "big"); /* the error can name the request */
    assert_int_equal(err.cmd, PROTO_CMD_GENERATE);
    assert_null(g.messages);            /* nothing left allocated */
    json_decref(j);

    /* the id goes into the error only when it is a valid id */
    j = jparse("{\"id\":\"r 1\",\"prompt\":\"x\"}");
    assert_int_equal(proto_generate_parse(j, &g, &err), -1);
    assert_string_equal(err.id, "");
    json_decref(j);
    j = jparse("{\"id\":\"r7\",\"prompt\":\"x\",\"sampling\":{\"top_p\":2}}");
    assert_int_equal(proto_generate_parse(j, &g, &err), -1);
    assert_string_equal(err.id, "r7");
    json_decref(j);
    /* not an object at all */
    j = jparse("[1]");
    assert_int_equal(proto_generate_parse(j, &g, &err), -1);
    assert_int_equal(err.code, PROTO_ERR_BAD_REQUEST);
    assert_true(contains(err.message, "generate: the body must be a JSON object (got array)"));
    json_decref(j);
}

static void test_client_small_schemas(void **state)
{
    (void)state;
    static const schema_case_t cancel[] = {
        {"{}", "cancel: field 'id' is missing"},
        {"{\"id\":\"a\",\"why\":1}", "cancel: unknown field 'why'"},
        {"{\"id\":\"a\"}", NULL},
    };
    run_schema_cases(PROTO_T_CANCEL, cancel, 3);
    static const schema_case_t status_req[] = {
        {"{\"verbose\":true}", "status: unknown field 'verbose'"},
        {"{}", NULL},
    };
    run_schema_cases(PROTO_T_STATUS_REQ, status_req, 2);
    static const schema_case_t health_req[] = {{"{\"x\":null}", "health: unknown field 'x'"}};
    run_schema_cases(PROTO_T_HEALTH_REQ, health_req, 1);
    /* replies: unknown fields are ignored (forward compatible), unknown codes parse */
    static const schema_case_t replies[] = {
        {"{\"id\":\"a\",\"code\":\"busy\",\"message\":\"m\",\"new_field\":[1]}", NULL},
        {"{\"code\":\"busy\"}", "error: field 'message' is missing"},
        {"{\"code\":5,\"message\":\"m\"}", "error: field 'code' must be a string (got integer)"},
    };
    run_schema_cases(PROTO_T_ERROR, replies, 3);
    json_t *j = jparse("{\"code\":\"quota_exceeded\",\"message\":\"new code\"}");
    proto_error e;
    proto_err err;
    assert_int_equal(proto_error_parse(j, &e, &err), 0);
    assert_int_equal(e.code, PROTO_ERR_OTHER);
    proto_error_free(&e);
    json_decref(j);
    static const schema_case_t done[] = {
        {"{\"id\":\"a\",\"finish_reason\":\"timeout\",\"usage\":{\"prompt_tokens\":1,"
         "\"cached_prompt_tokens\":0,\"completion_tokens\":1,\"retries\":0},\"timings\":{"
         "\"queue_ms\":0,\"ttft_ms\":0,\"tpot_ms_mean\":0,\"total_ms\":0}}",
         "done: field 'finish_reason' must be one of stop, length, eos, cancelled (got 'timeout')"},
        {"{\"id\":\"a\",\"finish_reason\":\"eos\",\"usage\":{\"prompt_tokens\":1,"
         "\"cached_prompt_tokens\":0,\"completion_tokens\":1,\"retries\":0},\"timings\":{"
         "\"queue_ms\":-1,\"ttft_ms\":0,\"tpot_ms_mean\":0,\"total_ms\":0}}",
         "done: field 'timings.queue_ms' must be >= 0 (got -1)"},
        {"{\"id\":\"a\",\"finish_reason\":\"eos\",\"usage\":{\"prompt_tokens\":1},\"timings\":{"
         "\"queue_ms\":0,\"ttft_ms\":0,\"tpot_ms_mean\":0,\"total_ms\":0}}",
         "done: field 'usage.cached_prompt_tokens' is missing"},
    };
    run_schema_cases(PROTO_T_DONE, done, 3);
}

#define KV "\"kv\":{\"block_tokens\":16,\"dtype\":\"f16\",\"n_layer\":30,\"n_head_kv\":3,\"head0\":0,\"n_heads\":3,\"head_dim\":64,\"capacity_blocks\":10}"
#define MODEL "\"model\":{\"sha256\":\"" SHA "\",\"n_vocab\":49152,\"n_ctx\":8192}"
#define DEV "\"device\":{\"kind\":\"cpu\",\"index\":0}"
#define REG_TAIL "\"tp_rank\":0,\"tp_size\":1," DEV ",\"backend\":\"mpi\",\"max_batch\":8"
#define REG_NODEV "\"tp_rank\":0,\"tp_size\":1,\"backend\":\"mpi\",\"max_batch\":8"

static void test_worker_schemas(void **state)
{
    (void)state;
    static const schema_case_t reg[] = {
        {"{\"worker_id\":\"w\"," MODEL "," KV "," REG_TAIL "}", NULL},
        {"{\"worker_id\":\"w\"," KV "," REG_TAIL "}", "register: field 'model' is missing"},
        {"{\"worker_id\":\"w\",\"model\":{\"sha256\":\"" "B179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
         "\",\"n_vocab\":1,\"n_ctx\":1}," KV "," REG_TAIL "}",
         "register: field 'model.sha256' must be lower-case hex digits (byte 0x42 at offset 0)"},
        {"{\"worker_id\":\"w\",\"model\":{\"sha256\":\"abc\",\"n_vocab\":1,\"n_ctx\":1}," KV "," REG_TAIL "}",
         "register: field 'model.sha256' must be 64 bytes long (got 3)"},
        {"{\"worker_id\":\"w\"," MODEL ",\"kv\":{\"block_tokens\":16,\"dtype\":\"q4_0\",\"n_layer\":30,"
         "\"n_head_kv\":3,\"head0\":0,\"n_heads\":3,\"head_dim\":64,\"capacity_blocks\":10}," REG_TAIL "}",
         "register: field 'kv.dtype' must be one of f32, f16, bf16, i8 (got 'q4_0')"},
        {"{\"worker_id\":\"w\"," MODEL ",\"kv\":{\"block_tokens\":16,\"dtype\":\"i8\",\"n_layer\":30,"
         "\"n_head_kv\":3,\"head0\":2,\"n_heads\":2,\"head_dim\":64,\"capacity_blocks\":10}," REG_TAIL "}",
         "register: field 'kv.head0' + 'kv.n_heads' (2 + 2) exceeds 'kv.n_head_kv' (3)"},
        {"{\"worker_id\":\"w\"," MODEL ",\"kv\":{\"block_tokens\":0,\"dtype\":\"i8\",\"n_layer\":30,"
         "\"n_head_kv\":3,\"head0\":0,\"n_heads\":2,\"head_dim\":64,\"capacity_blocks\":10}," REG_TAIL "}",
         "register: field 'kv.block_tokens' must be in [1, 4096] (got 0)"},
        {"{\"worker_id\":\"w\"," MODEL "," KV ",\"tp_rank\":1,\"tp_size\":1," DEV ",\"backend\":\"mpi\",\"max_batch\":8}",
         "register: field 'tp_rank' (1) must be below 'tp_size' (1)"},
        {"{\"worker_id\":\"w\"," MODEL "," KV ",\"tp_rank\":0,\"tp_size\":2," DEV ",\"backend\":\"mpi\",\"max_batch\":8}",
         "register: field 'group' is required when 'tp_size' > 1"},
        {"{\"worker_id\":\"w\"," MODEL "," KV ",\"tp_rank\":0,\"tp_size\":1," DEV ",\"backend\":\"tcp\",\"max_batch\":8}",
         "register: field 'endpoint' is required with backend 'tcp'"},
        {"{\"worker_id\":\"w\"," MODEL "," KV ",\"role\":\"leader\"," REG_TAIL "}",
         "register: field 'role' must be one of both, prefill, decode, any (got 'leader')"},
        {"{\"worker_id\":\"w\"," MODEL "," KV "," REG_NODEV ",\"device\":{\"kind\":\"tpu\",\"index\":0}}",
         "register: field 'device.kind' must be one of cpu, cuda (got 'tpu')"},
        {"{\"worker_id\":\"w\"," MODEL "," KV "," REG_TAIL ",\"gpu\":true}", "register: unknown field 'gpu'"},
    };
    run_schema_cases(PROTO_T_REGISTER, reg, (int)(sizeof reg / sizeof reg[0]));

    static const schema_case_t registered[] = {
        {"{\"rank\":0,\"group\":0,\"role\":\"any\",\"tp_rank\":0,\"tp_size\":1,\"heartbeat_ms\":1000,\"dead_after\":4}",
         "registered: field 'role' must be one of both, prefill, decode (got 'any')"},
        {"{\"rank\":0,\"group\":0,\"role\":\"both\",\"tp_rank\":0,\"tp_size\":1,\"heartbeat_ms\":5,\"dead_after\":4}",
         "registered: field 'heartbeat_ms' must be in [10, 600000] (got 5)"},
        {"{\"rank\":0,\"group\":0,\"role\":\"both\",\"tp_rank\":0,\"tp_size\":1,\"heartbeat_ms\":1000,\"dead_after\":1}",
         "registered: field 'dead_after' must be in [2, 10] (got 1)"},
    };
    run_schema_cases(PROTO_T_REGISTERED, registered, 3);

#define A0 "\"rid\":1,\"tokens\":[1,2],\"sampling\":{\"seed\":1},\"max_tokens\":8"
    static const schema_case_t assign[] = {
        {"{" A0 ",\"role\":\"both\"}", NULL},
        {"{" A0 ",\"role\":\"prefill\"}", "assign: field 'transfer' is required with role 'prefill'"},
        {"{" A0 ",\"role\":\"prefill\",\"transfer\":{\"xfer\":1}}", "assign: field 'transfer.seq' is required"},
        {"{" A0 ",\"role\":\"prefill\",\"transfer\":{\"xfer\":1,\"seq\":0,\"peer_group\":1,\"lease_ms\":5}}",
         "assign: field 'transfer.peers' must list the decode ranks"},
        {"{" A0 ",\"role\":\"prefill\",\"transfer\":{\"xfer\":1,\"seq\":0,\"peer_group\":1,\"peers\":[{\"rank\":1,\"head0\":0,\"n_heads\":3}]}}",
         "assign: field 'transfer.lease_ms' is required"},
        {"{" A0 ",\"role\":\"prefill\",\"transfer\":{\"xfer\":0}}", "assign: field 'transfer.xfer' must be in [1, 9007199254740991] (got 0)"},
        {"{" A0 ",\"role\":\"prefill\",\"transfer\":{\"xfer\":1,\"seq\":0,\"peer_group\":1,\"lease_ms\":5,"
         "\"peers\":[{\"rank\":1,\"head0\":0,\"n_heads\":0}]}}", "assign: field 'transfer.peers[0].n_heads' must be in [1, 4096] (got 0)"},
        {"{" A0 ",\"role\":\"decode\",\"transfer\":{\"xfer\":1}}", "assign: field 'generated' must hold the prefill's first token"},
        {"{" A0 ",\"role\":\"decode\",\"generated\":[5],\"transfer\":{\"xfer\":1}}", NULL},
        {"{" A0 ",\"role\":\"decode\",\"generated\":[5]}", "assign: field 'transfer' is required with role 'decode'"},
        {"{" A0 ",\"role\":\"both\",\"transfer\":{\"xfer\":1}}", "assign: field 'transfer' is not allowed with role 'both'"},
        {"{\"rid\":1,\"tokens\":[1],\"sampling\":{},\"max_tokens\":8,\"role\":\"both\"}",
         "assign: field 'sampling.seed' is missing"},
        {"{\"rid\":1,\"tokens\":[1],\"generated\":[1,2],\"sampling\":{\"seed\":1},\"max_tokens\":2,\"role\":\"both\"}",
         "assign: field 'generated' holds 2 tokens, no fewer than 'max_tokens' (2)"},
        {"{" A0 ",\"role\":\"both\",\"rng\":\"abc\"}", "assign: field 'rng' must be 64 bytes long (got 3)"},
        {"{" A0 ",\"role\":\"any\"}", "assign: field 'role' must be one of both, prefill, decode (got 'any')"},
        {"{\"rid\":0,\"tokens\":[1],\"sampling\":{\"seed\":1},\"max_tokens\":8,\"role\":\"both\"}",
         "assign: field 'rid' must be in [1, 9007199254740991] (got 0)"},
        {"{\"rid\":1,\"tokens\":[],\"sampling\":{\"seed\":1},\"max_tokens\":8,\"role\":\"both\"}",
         "assign: field 'tokens' must hold 1 to 262144 items (got 0)"},
    };
    run_schema_cases(PROTO_T_ASSIGN, assign, (int)(sizeof assign / sizeof assign[0]));

    static const schema_case_t tokens[] = {
        {"{\"events\":[]}", "tokens: field 'events' must hold 1 to 4096 items (got 0)"},
        {"{\"events\":[{\"rid\":1,\"index\":0,\"ids\":[]}]}", "tokens: field 'events[0].ids' must hold 1 to 262144 items (got 0)"},
        {"{\"events\":[{\"rid\":1,\"index\":0,\"ids\":[1]},{\"rid\":2,\"index\":-1,\"ids\":[1]}]}",
         "tokens: field 'events[1].index' must be in [0, 262144] (got -1)"},
    };
    run_schema_cases(PROTO_T_TOKENS, tokens, 3);
    static const schema_case_t failed[] = {
        {"{\"code\":\"kv_full\",\"message\":\"m\"}", "failed: give 'rid' or 'xfer' (or both)"},
        {"{\"xfer\":3,\"code\":\"kv_full\",\"message\":\"m\",\"retryable\":\"no\"}", "failed: field 'retryable' must be true or false"},
        {"{\"xfer\":3,\"code\":\"kv_full\",\"message\":\"m\"}", NULL},
    };
    run_schema_cases(PROTO_T_FAILED, failed, 3);
    static const schema_case_t comm_init[] = {
        {"{\"backend\":\"nccl\",\"world_size\":2,\"rank\":1}", "comm_init: field 'unique_id' is required with backend 'nccl'"},
        {"{\"backend\":\"mpi\",\"world_size\":2,\"rank\":2}", "comm_init: field 'rank' (2) must be below 'world_size' (2)"},
        {"{\"backend\":\"tcp\",\"world_size\":2,\"rank\":0}", "comm_init: field 'peers' must list the ranks' endpoints"},
        {"{\"backend\":\"tcp\",\"world_size\":1,\"rank\":0,\"peers\":[{\"rank\":0,\"endpoint\":\"tcp://x y\"}]}",
         "comm_init: field 'peers[0].endpoint' may hold only printable ASCII without spaces"},
    };
    run_schema_cases(PROTO_T_COMM_INIT, comm_init, 4);
    static const schema_case_t kv_ready[] = {
        {"{\"xfer\":1,\"rid\":1,\"n_tokens\":4,\"cached_tokens\":16}", "kv_ready: field 'cached_tokens' (16) exceeds 'n_tokens' (4)"},
    };
    run_schema_cases(PROTO_T_KV_READY, kv_ready, 1);
    static const schema_case_t reserve[] = {
        {"{\"xfer\":1,\"rid\":1,\"seq\":0,\"src_group\":0,\"src\":[],\"tokens\":[1],\"lease_ms\":10}",
         "reserve: field 'src' must hold 1 to 4096 items (got 0)"},
        {"{\"xfer\":1,\"rid\":1,\"seq\":0,\"src_group\":0,\"src\":[{\"rank\":0,\"head0\":0,\"n_heads\":1}],\"tokens\":[1],\"lease_ms\":0}",
         "reserve: field 'lease_ms' must be in [1, 3600000] (got 0)"},
    };
    run_schema_cases(PROTO_T_RESERVE, reserve, 2);
    static const schema_case_t release[] = {
        {"{\"xfer\":1}", "release: field 'rid' is missing"},
    };
    run_schema_cases(PROTO_T_RELEASE, release, 1);
    static const schema_case_t kv_ack[] = {
        {"{\"rid\":1}", "kv_ack: field 'xfer' is missing"},
    };
    run_schema_cases(PROTO_T_KV_ACK, kv_ack, 1);
    static const schema_case_t hb[] = {
        {"{\"load\":1}", "heartbeat: unknown field 'load'"},
        {"{\"running\":-1}", "heartbeat: field 'running' must be in [0, 2147483647] (got -1)"},
        {"{}", NULL},
    };
    run_schema_cases(PROTO_T_HEARTBEAT, hb, 3);
    static const schema_case_t comm_id[] = {
        {"{\"unique_id\":\"00\"}", "comm_id: field 'unique_id' must be 256 bytes long (got 2)"},
    };
    run_schema_cases(PROTO_T_COMM_ID, comm_id, 1);
}

/* What duetd does with a generate whose body breaks the schema, end to end over TCP: the
 * message decodes, the parse fails with bad_request naming the field, and the client
 * gets an `error` carrying its request id and the command. */
static void test_bad_generate_over_socket(void **state)
{
    (void)state;
    pair_t p;
    pair_open(&p, "tcp://127.0.0.1:*", PROTO_SIDE_DUETD_CLIENTS);
    static const struct {
        const char *body;
        const char *needle;
    } cases[] = {
        {"{\"id\":\"q1\",\"prompt\":\"hi\",\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}",
         "give exactly one of 'prompt', 'messages', 'tokens' (got prompt and messages)"},
        {"{\"id\":\"q2\",\"prompt\":\"hi\",\"sampling\":{\"temperature\":-1}}",
         "field 'sampling.temperature' must be >= 0 (got -1)"},
        {"{\"id\":\"q3\",\"prompt\":\"hi\",\"max_tokens\":\"many\"}",
         "field 'max_tokens' must be an integer (got string)"},
        {"{\"id\":\"q4\",\"prompt\":[\"hi\"]}", "field 'prompt' must be a string (got array)"},
        {"{\"id\":\"q5\",\"tokens\":[1,-5]}", "field 'tokens[1]' must be in [0, 2147483647] (got -5)"},
        {"{\"id\":\"q6\",\"prompt\":\"hi\",\"stop\":[\"\"]}", "field 'stop[0]' must be 1 to 256 bytes long"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        send_strs(p.dealer, 3, PROTO_CLIENT_TAG, "generate", cases[i].body);
        proto_msg msg = {0};
        proto_err err;
        assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, WAIT_MS, &msg, &err), PROTO_OK);
        assert_int_equal(proto_msg_type(&msg, PROTO_SIDE_DUETD_CLIENTS), PROTO_T_GENERATE);
        proto_generate g;
        assert_int_equal(proto_generate_parse(msg.body, &g, &err), -1);
        assert_int_equal(err.code, PROTO_ERR_BAD_REQUEST);
        assert_true(contains(err.message, cases[i].needle));
        assert_int_equal(proto_send_error(p.router, &msg.route, PROTO_CLIENT, &err, ZMQ_DONTWAIT), 0);
        proto_msg_clear(&msg);

        proto_msg reply = {0};
        assert_int_equal(proto_recv(p.dealer, PROTO_SIDE_CLIENT, 0, WAIT_MS, &reply, &err), PROTO_OK);
        assert_int_equal(reply.cmd, PROTO_CMD_ERROR);
        proto_error e;
        assert_int_equal(proto_error_parse(reply.body, &e, &err), 0);
        char want_id[8];
        snprintf(want_id, sizeof want_id, "q%zu", i + 1);
        assert_string_equal(e.id, want_id);
        assert_int_equal(e.code, PROTO_ERR_BAD_REQUEST);
        assert_string_equal(e.command, "generate");
        assert_true(contains(e.message, cases[i].needle));
        assert_true(contains(e.message, "generate: "));
        proto_error_free(&e);
        proto_msg_clear(&reply);
    }
    pair_close(&p);
}

/* ---- timeouts, ownership, arguments --------------------------------------------------------- */

static double now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void test_recv_timeout(void **state)
{
    (void)state;
    pair_t p;
    pair_open(&p, "inproc://proto-timeout", PROTO_SIDE_DUETD_CLIENTS);
    proto_msg msg = {0};
    proto_err err;
    double t0 = now_ms();
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, 0, &msg, &err), PROTO_TIMEOUT);
    double t1 = now_ms();
    assert_true(t1 - t0 < 50);
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, 60, &msg, &err), PROTO_TIMEOUT);
    double t2 = now_ms();
    assert_true(t2 - t1 >= 50);
    assert_true(t2 - t1 < 2000);
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, -1, &msg, &err), PROTO_SYSERR);
    assert_int_equal(errno, EINVAL);
    assert_int_equal(proto_recv(NULL, PROTO_SIDE_DUETD_CLIENTS, 1, 0, &msg, &err), PROTO_SYSERR);
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, PROTO_MAX_ROUTE + 1, 0, &msg, &err),
                     PROTO_SYSERR);
    pair_close(&p);
}

static void test_send_ownership(void **state)
{
    (void)state;
    pair_t p;
    pair_open(&p, "inproc://proto-own", PROTO_SIDE_DUETD_CLIENTS);
    /* taken on success */
    json_t *body = json_pack("{s:s}", "id", "r1");
    assert_int_equal(proto_send(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_CANCEL, &body, 0), 0);
    assert_null(body);
    /* taken on failure: a worker command on the client protocol */
    body = json_object();
    assert_int_equal(proto_send(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_ASSIGN, &body, 0), -1);
    assert_int_equal(errno, EINVAL);
    assert_null(body);
    /* a body that is not an object */
    body = json_array();
    assert_int_equal(proto_send(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_STATUS, &body, 0), -1);
    assert_int_equal(errno, EINVAL);
    assert_null(body);
    /* bad flags */
    body = json_object();
    assert_int_equal(proto_send(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_STATUS, &body, ZMQ_SNDMORE), -1);
    assert_null(body);
    /* over the size limit */
    char *big = malloc(PROTO_MAX_BODY + 1);
    memset(big, 'a', PROTO_MAX_BODY);
    big[PROTO_MAX_BODY] = '\0';
    body = json_pack("{s:s}", "prompt", big);
    free(big);
    assert_int_equal(proto_send(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_GENERATE, &body, 0), -1);
    assert_int_equal(errno, EMSGSIZE);
    assert_null(body);
    /* a NULL body sends {} */
    assert_int_equal(proto_send(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_HEALTH, NULL, 0), 0);
    /* a type that is not the command's body */
    proto_health h;
    proto_health_init(&h);
    assert_int_equal(proto_send_body(p.dealer, NULL, PROTO_CLIENT, PROTO_CMD_STATUS, PROTO_T_HEALTH, &h, 0), -1);
    assert_int_equal(errno, EINVAL);

    proto_msg msg = {0};
    proto_err err;
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, WAIT_MS, &msg, &err), PROTO_OK);
    assert_int_equal(msg.cmd, PROTO_CMD_CANCEL);
    proto_cancel c;
    assert_int_equal(proto_cancel_parse(msg.body, &c, &err), 0);
    assert_string_equal(c.id, "r1");
    proto_cancel_free(&c);
    proto_route route = msg.route;
    proto_msg_clear(&msg);
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, WAIT_MS, &msg, &err), PROTO_OK);
    assert_int_equal(msg.cmd, PROTO_CMD_HEALTH);
    assert_int_equal(json_object_size(msg.body), 0);
    proto_msg_clear(&msg);
    /* nothing else arrived: the refused sends sent nothing */
    assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_CLIENTS, 1, 20, &msg, &err), PROTO_TIMEOUT);

    /* ROUTER_MANDATORY: a reply to a peer that does not exist fails instead of vanishing */
    proto_route ghost = {.n = 1, .len = {5}};
    memcpy(ghost.id[0], "ghost", 5);
    body = json_object();
    assert_int_equal(proto_send(p.router, &ghost, PROTO_CLIENT, PROTO_CMD_HEALTH, &body, ZMQ_DONTWAIT), -1);
    assert_int_equal(errno, EHOSTUNREACH);
    assert_null(body);
    /* and one to the real peer arrives */
    proto_health_init(&h);
    h.ok = 1;
    h.state = PROTO_HEALTH_READY;
    h.uptime_s = 1.5;
    assert_int_equal(proto_send_body(p.router, &route, PROTO_CLIENT, PROTO_CMD_HEALTH, PROTO_T_HEALTH, &h,
                                     ZMQ_DONTWAIT), 0);
    assert_int_equal(proto_recv(p.dealer, PROTO_SIDE_CLIENT, 0, WAIT_MS, &msg, &err), PROTO_OK);
    proto_health h2;
    assert_int_equal(proto_health_parse(msg.body, &h2, &err), 0);
    assert_int_equal(h2.ok, 1);
    assert_int_equal(h2.state, PROTO_HEALTH_READY);
    assert_true(h2.uptime_s == 1.5);
    proto_health_free(&h2);
    proto_msg_clear(&msg);
    pair_close(&p);
}

/* Several messages queued on a socket come out one by one, whole. */
static void test_many_in_flight(void **state)
{
    (void)state;
    pair_t p;
    pair_open(&p, "tcp://127.0.0.1:*", PROTO_SIDE_DUETD_WORKERS);
    enum { N = 200 };
    for (int i = 0; i < N; i++) {
        proto_tokens t;
        proto_tokens_init(&t);
        proto_token_event ev = {.rid = i + 1, .index = i, .ids = (int32_t[]){i, i + 1}, .n_ids = 2};
        t.events = &ev;
        t.n_events = 1;
        assert_int_equal(proto_send_body(p.dealer, NULL, PROTO_WORKER, PROTO_CMD_TOKENS, PROTO_T_TOKENS, &t, 0), 0);
    }
    for (int i = 0; i < N; i++) {
        proto_msg msg = {0};
        proto_err err;
        assert_int_equal(proto_recv(p.router, PROTO_SIDE_DUETD_WORKERS, 1, WAIT_MS, &msg, &err), PROTO_OK);
        proto_tokens t;
        assert_int_equal(proto_tokens_parse(msg.body, &t, &err), 0);
        assert_int_equal(t.n_events, 1);
        assert_int_equal(t.events[0].rid, i + 1);
        assert_int_equal(t.events[0].index, i);
        assert_int_equal(t.events[0].n_ids, 2);
        assert_int_equal(t.events[0].ids[1], i + 1);
        proto_tokens_free(&t);
        proto_msg_clear(&msg);
    }
    pair_close(&p);
}

/* ---- names ---------------------------------------------------------------------------------- */

static void test_names(void **state)
{
    (void)state;
    for (int c = 1; c < PROTO_CMD__COUNT; c++) {
        const char *n = proto_cmd_name((proto_cmd)c);
        assert_true(strlen(n) > 0 && strlen(n) <= PROTO_MAX_CMD);
        int found = 0;
        for (int k = 0; k < 2; k++) {
            proto_cmd got = proto_cmd_lookup((proto_kind)k, n, strlen(n));
            if (got != PROTO_CMD_NONE) {
                assert_int_equal(got, c);
                found = 1;
            }
        }
        assert_true(found);
    }
    assert_string_equal(proto_cmd_name(PROTO_CMD__COUNT), "");
    assert_int_equal(proto_cmd_lookup(PROTO_CLIENT, "assign", 6), PROTO_CMD_NONE);
    assert_int_equal(proto_cmd_lookup(PROTO_WORKER, "generate", 8), PROTO_CMD_NONE);
    assert_int_equal(proto_cmd_lookup(PROTO_CLIENT, "cancelx", 6), PROTO_CMD_CANCEL);
    for (int c = 0; c < PROTO_ERR__COUNT; c++)
        assert_int_equal(proto_code_lookup(proto_code_name((proto_code)c)), c);
    assert_int_equal(proto_code_lookup("no_such_code"), PROTO_ERR_OTHER);
    assert_string_equal(proto_code_name(PROTO_ERR_BAD_FRAMES), "bad_frames");
    assert_string_equal(proto_tag(PROTO_CLIENT), "duet.client/1");
    assert_string_equal(proto_tag(PROTO_WORKER), "duet.worker/1");
    assert_string_equal(proto_role_name(PROTO_ROLE_PREFILL), "prefill");
    assert_string_equal(proto_finish_name(PROTO_FINISH_CANCELLED), "cancelled");
    assert_string_equal(proto_finish_name((proto_finish)9), "");
}

/* ---- docs/PROTOCOL.md ------------------------------------------------------------------------ */

static char *read_doc(void)
{
    FILE *f = fopen(DOC_PATH, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = malloc((size_t)n + 1);
    assert_non_null(s);
    assert_int_equal(fread(s, 1, (size_t)n, f), (size_t)n);
    s[n] = '\0';
    fclose(f);
    return s;
}

/* Every ```json block parses; every one annotated "to-duetd|to-client|to-worker" is a
 * message (an array of frames; "socket=client|worker" names duetd's socket when the tag
 * does not) that decodes and parses as its direction says, or gives
 * the code of its "expect=CODE"; a valid one rebuilds with every member it had; and
 * every direction of both protocols has a valid example. */
static void test_doc_examples(void **state)
{
    (void)state;
    char *doc = read_doc();
    if (!doc) {
        print_error("%s not found (run from the repository root)\n", DOC_PATH);
        fail();
    }
    int seen[2][PROTO_CMD__COUNT][2] = {{{0}}};
    int n_blocks = 0, n_msgs = 0, n_bad = 0;
    char *line = doc;
    while ((line = strstr(line, "```json"))) {
        char *eol = strchr(line, '\n');
        assert_non_null(eol);
        char info[128] = "";
        size_t il = (size_t)(eol - line - 7);
        if (il >= sizeof info) il = sizeof info - 1;
        memcpy(info, line + 7, il);
        info[il] = '\0';
        char *end = strstr(eol, "\n```");
        assert_non_null(end);
        *end = '\0';
        json_error_t je;
        json_t *j = json_loads(eol + 1, JSON_DECODE_ANY, &je);
        if (!j) print_error("doc block '%s' does not parse: %s\n", eol + 1, je.text);
        assert_non_null(j);
        n_blocks++;
        char *dir = strstr(info, "to-");
        if (dir) {
            assert_true(json_is_array(j));
            n_msgs++;
            const char *exp = strstr(info, "expect=");
            proto_code want = PROTO_ERR_NONE;
            if (exp) {
                want = proto_code_lookup(exp + 7);
                assert_int_not_equal(want, PROTO_ERR_OTHER);
                n_bad++;
            }
            /* frames: strings as raw bytes, anything else as compact JSON */
            int nf = (int)json_array_size(j);
            assert_true(nf <= 8);
            proto_frame fr[8];
            char *owned[8] = {0};
            for (int i = 0; i < nf; i++) {
                json_t *e = json_array_get(j, i);
                if (json_is_string(e)) {
                    fr[i].data = json_string_value(e);
                    fr[i].size = json_string_length(e);
                } else {
                    owned[i] = dump(e);
                    fr[i].data = owned[i];
                    fr[i].size = strlen(owned[i]);
                }
            }
            proto_side side;
            if (strncmp(dir, "to-client", 9) == 0)
                side = PROTO_SIDE_CLIENT;
            else if (strncmp(dir, "to-worker", 9) == 0)
                side = PROTO_SIDE_WORKER;
            else {
                assert_int_equal(strncmp(dir, "to-duetd", 8), 0);
                /* the socket: "socket=client|worker", else the one of the tag */
                const char *tag = json_string_value(json_array_get(j, 0));
                const char *sock = strstr(info, "socket=");
                int worker = sock ? strncmp(sock + 7, "worker", 6) == 0
                                  : tag && strncmp(tag, "duet.worker", 11) == 0;
                side = worker ? PROTO_SIDE_DUETD_WORKERS : PROTO_SIDE_DUETD_CLIENTS;
            }
            proto_msg msg = {0};
            proto_err err;
            proto_rc rc = proto_decode(fr, nf, side, 0, &msg, &err);
            proto_code got = rc == PROTO_OK ? PROTO_ERR_NONE : err.code;
            if (rc == PROTO_OK) {
                proto_type t = proto_msg_type(&msg, side);
                assert_int_not_equal(t, PROTO_T_NONE);
                void *m = calloc(1, proto_type_size(t));
                if (proto_parse(t, msg.body, m, &err)) {
                    got = err.code;
                    if (!exp) print_error("doc example %s: %s\n", (char *)fr[1].data, err.message);
                } else {
                    json_t *back = proto_build(t, m);
                    assert_non_null(back);
                    if (!json_subset(msg.body, back)) {
                        print_error("doc example of %s loses members when rebuilt\n",
                                    proto_cmd_name(msg.cmd));
                        fail();
                    }
                    json_decref(back);
                    seen[msg.kind][msg.cmd][proto_side_expects(side)] = 1;
                }
                proto_free(t, m);
                free(m);
            }
            if (got != want)
                print_error("doc example '%s': expected %s, got %s (%s)\n", info,
                            proto_code_name(want), proto_code_name(got), err.message);
            assert_int_equal(got, want);
            proto_msg_clear(&msg);
            for (int i = 0; i < nf; i++) free(owned[i]);
        }
        json_decref(j);
        *end = '\n';
        line = end + 4;
    }
    free(doc);
    assert_true(n_blocks >= 40);
    assert_true(n_msgs == n_blocks); /* every example in the doc is a message */
    assert_true(n_bad >= 10);
    for (int k = 0; k < 2; k++)
        for (int c = 1; c < PROTO_CMD__COUNT; c++)
            for (int f = 0; f < 2; f++)
                if (proto_body_type((proto_kind)k, (proto_cmd)c, (proto_sender)f) != PROTO_T_NONE &&
                    !seen[k][c][f]) {
                    print_error("docs/PROTOCOL.md has no valid example of %s %s from %s\n",
                                k ? "duet.worker" : "duet.client", proto_cmd_name((proto_cmd)c),
                                f ? "duetd" : (k ? "a worker" : "a client"));
                    fail();
                }
}

/* The error code table lists exactly the codes of proto_code; the command tables list
 * exactly each protocol's commands. */
static void test_doc_tables(void **state)
{
    (void)state;
    char *doc = read_doc();
    assert_non_null(doc);
    /* section 3: rows "| `code` | ..." */
    char *sec = strstr(doc, "## 3. Error codes");
    char *sec_end = sec ? strstr(sec, "\n## 4.") : NULL;
    assert_non_null(sec);
    assert_non_null(sec_end);
    int listed[PROTO_ERR__COUNT] = {0};
    for (char *l = sec; l && l < sec_end; l = strchr(l + 1, '\n')) {
        if (strncmp(l, "\n| `", 4) != 0) continue;
        char name[64];
        const char *a = l + 4, *b = strchr(a, '`');
        assert_non_null(b);
        assert_true((size_t)(b - a) < sizeof name);
        memcpy(name, a, (size_t)(b - a));
        name[b - a] = '\0';
        proto_code c = proto_code_lookup(name);
        if (c == PROTO_ERR_OTHER) print_error("doc lists unknown code '%s'\n", name);
        assert_int_not_equal(c, PROTO_ERR_OTHER);
        assert_int_equal(listed[c], 0);
        listed[c] = 1;
    }
    for (int c = 1; c < PROTO_ERR_OTHER; c++) {
        if (!listed[c]) print_error("code '%s' is not in the doc's table\n", proto_code_name(c));
        assert_true(listed[c]);
    }
    /* "### Commands" tables of sections 2 and 4 */
    const char *secs[2] = {"## 2. The client protocol", "## 4. The worker protocol"};
    for (int k = 0; k < 2; k++) {
        char *s = strstr(doc, secs[k]);
        assert_non_null(s);
        char *t = strstr(s, "### Commands");
        assert_non_null(t);
        char *tbl = strstr(t, "\n| "); /* the header row */
        assert_non_null(tbl);
        char *t_end = strstr(tbl, "\n\n"); /* the table ends at the first blank line */
        assert_non_null(t_end);
        int have[PROTO_CMD__COUNT] = {0};
        for (char *l = t; l && l < t_end; l = strchr(l + 1, '\n')) {
            if (strncmp(l, "\n| `", 4) != 0) continue;
            const char *a = l + 4, *b = strchr(a, '`');
            proto_cmd c = proto_cmd_lookup((proto_kind)k, a, (size_t)(b - a));
            if (c == PROTO_CMD_NONE) print_error("doc command table lists '%.*s'\n", (int)(b - a), a);
            assert_int_not_equal(c, PROTO_CMD_NONE);
            have[c] = 1;
        }
        for (int c = 1; c < PROTO_CMD__COUNT; c++) {
            int in_kind = proto_cmd_lookup((proto_kind)k, proto_cmd_name((proto_cmd)c),
                                           strlen(proto_cmd_name((proto_cmd)c))) == (proto_cmd)c;
            if (in_kind && !have[c])
                print_error("command '%s' missing from the doc's table\n", proto_cmd_name((proto_cmd)c));
            assert_int_equal(have[c], in_kind);
        }
    }
    /* the limits the doc states are the header's */
    assert_non_null(strstr(doc, "| frame 2 (JSON body) | 16 MiB"));
    assert_int_equal(PROTO_MAX_BODY, 16u << 20);
    assert_non_null(strstr(doc, "| prompt token ids (`tokens`) | 262144 |"));
    assert_int_equal(PROTO_MAX_TOKENS, 262144);
    assert_non_null(strstr(doc, "| stop strings | 16, each 1 to 256 bytes |"));
    assert_int_equal(PROTO_MAX_STOPS, 16);
    assert_int_equal(PROTO_MAX_STOP_LEN, 256);
    assert_non_null(strstr(doc, "| stop token ids | 64 |"));
    assert_int_equal(PROTO_MAX_STOP_IDS, 64);
    free(doc);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_names),
        cmocka_unit_test(test_samples_cover_every_message),
        cmocka_unit_test(test_roundtrip_client_inproc),
        cmocka_unit_test(test_roundtrip_client_tcp),
        cmocka_unit_test(test_roundtrip_worker_tcp),
        cmocka_unit_test(test_generate_values),
        cmocka_unit_test(test_generate_defaults),
        cmocka_unit_test(test_canonical_json),
        cmocka_unit_test(test_malformed_client),
        cmocka_unit_test(test_malformed_worker),
        cmocka_unit_test(test_wrong_direction_at_peer),
        cmocka_unit_test(test_generate_schema),
        cmocka_unit_test(test_bad_generate_over_socket),
        cmocka_unit_test(test_client_small_schemas),
        cmocka_unit_test(test_worker_schemas),
        cmocka_unit_test(test_recv_timeout),
        cmocka_unit_test(test_send_ownership),
        cmocka_unit_test(test_many_in_flight),
        cmocka_unit_test(test_doc_examples),
        cmocka_unit_test(test_doc_tables),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
