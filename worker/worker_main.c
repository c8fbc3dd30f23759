/* worker/worker_main.c: the duet-worker program (the work is in worker/wrk.c).
 *
 *   duet-worker --config conf/duet.conf --group NAME [--rank R] [--endpoint E]
 *   duet-worker -m MODEL.gguf --endpoint E [--threads N] [--kv-budget BYTES] ...
 *   mpirun -np N duet-worker --config conf/duet.conf   (rank r takes the r-th worker slot:
 *                                                       the groups in file order)
 *
 * Exit status: 0 after SIGTERM or SIGINT (running requests finish within --drain-timeout,
 * the rest are handed back to duetd; a second signal hands them back at once), 1 on a bad
 * command line or configuration, a model that does not load, or a refused registration.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include "comm/comm.h"
#include "daemon/config.h"
#include "worker/wrk.h"

static void usage(FILE *f)
{
    fprintf(f,
        "usage: duet-worker --config FILE --group NAME [--rank R] [options]\n"
        "       duet-worker -m MODEL.gguf --endpoint ENDPOINT [options]\n"
        "\n"
        "Serves one shard of the model to duetd (duet.worker/1, docs/PROTOCOL.md).\n"
        "\n"
        "  -c, --config FILE        duet.conf: [model], [daemon] and the [group NAME] sections\n"
        "  -g, --group NAME         the group this worker belongs to (default: the only one)\n"
        "  -r, --rank R             tensor-parallel rank in the group [0]\n"
        "  -e, --endpoint E         duetd's worker endpoint [config, or tcp://127.0.0.1:7071]\n"
        "  -m, --model FILE         GGUF model (without --config)\n"
        "  -t, --threads N          forward-pass threads; 0: one per core [config, or 0]\n"
        "      --kv-budget BYTES    KV cache size, suffixes K, M, G, T, KiB... [config, or 256M]\n"
        "      --kv-type T          f32, f16, bf16 or int8 [config, or f16]\n"
        "      --max-batch-tokens N tokens per scheduler step [config, or 2048]\n"
        "      --max-seqs N         sequences running at once [config, or 64]\n"
        "      --ctx N              tokens per request, prompt + output; 0: the model's [0]\n"
        "      --worker-id ID       name sent to duetd [HOST-GROUP-RANK]\n"
        "      --heartbeat-ms N     heartbeat until duetd gives its own [config, or 1000]\n"
        "      --log-level L        error, warn, info or debug [config, or info]\n"
        "      --drain-timeout MS   at SIGTERM, how long running requests may finish before\n"
        "                           they are handed back to duetd; a second signal hands them\n"
        "                           back at once [30000]\n"
        "  -h, --help               this text\n");
}

static void die_usage(const char *fmt, const char *arg)
{
    fprintf(stderr, "<3>duet-worker: ");
    fprintf(stderr, fmt, arg);
    fprintf(stderr, " (see duet-worker --help)\n");
}

static int parse_int(const char *opt, const char *s, long lo, long hi, int *out)
{
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) {
        fprintf(stderr, "<3>duet-worker: %s '%s' is not an integer in [%ld, %ld]\n", opt, s, lo, hi);
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* "256M", "1GiB", "4096": bytes (suffixes are powers of 1024). */
static int parse_bytes(const char *s, int64_t *out)
{
    char *end;
    errno = 0;
    long long v = strtoll(s, &end, 10);
    if (errno || end == s || v <= 0) return -1;
    static const char *const suf[] = {"K", "M", "G", "T"};
    int shift = 0;
    if (*end) {
        int found = 0;
        for (int i = 0; i < 4 && !found; i++) {
            size_t n = strlen(suf[i]);
            if (strncasecmp(end, suf[i], n) == 0 &&
                (end[n] == 0 || strcasecmp(end + n, "iB") == 0 || strcasecmp(end + n, "B") == 0)) {
                shift = 10 * (i + 1);
                found = 1;
            }
        }
        if (!found) return -1;
    }
    if (v > (INT64_MAX >> shift)) return -1;
    *out = (int64_t)v << shift;
    return 0;
}

static int parse_kv_type(const char *s, dtype_t *out)
{
    static const struct { const char *name; dtype_t t; } map[] = {
        {"f32", DTYPE_F32}, {"f16", DTYPE_F16}, {"bf16", DTYPE_BF16}, {"int8", DTYPE_I8},
        {"i8", DTYPE_I8}};
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++)
        if (strcmp(s, map[i].name) == 0) {
            *out = map[i].t;
            return 0;
        }
    return -1;
}

static int parse_level(const char *s, config_log_level *out)
{
    static const char *const names[] = {"error", "warn", "info", "debug"};
    for (int i = 0; i < 4; i++)
        if (strcmp(s, names[i]) == 0) {
            *out = (config_log_level)i;
            return 0;
        }
    return -1;
}

int main(int argc, char **argv)
{
    enum { O_KVB = 256, O_KVT, O_MBT, O_SEQS, O_CTX, O_WID, O_HB, O_LOG, O_DRAIN };
    static const struct option lo[] = {
        {"config", required_argument, 0, 'c'}, {"group", required_argument, 0, 'g'},
        {"rank", required_argument, 0, 'r'}, {"endpoint", required_argument, 0, 'e'},
        {"model", required_argument, 0, 'm'}, {"threads", required_argument, 0, 't'},
        {"kv-budget", required_argument, 0, O_KVB}, {"kv-type", required_argument, 0, O_KVT},
        {"max-batch-tokens", required_argument, 0, O_MBT},
        {"max-seqs", required_argument, 0, O_SEQS}, {"ctx", required_argument, 0, O_CTX},
        {"worker-id", required_argument, 0, O_WID}, {"heartbeat-ms", required_argument, 0, O_HB},
        {"log-level", required_argument, 0, O_LOG}, {"drain-timeout", required_argument, 0, O_DRAIN},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *config_path = NULL, *group = NULL, *endpoint = NULL, *model = NULL;
    const char *worker_id = NULL;
    int rank = 0, threads = -1, mbt = -1, seqs = -1, ctx = -1, hb = -1, drain = -1;
    int64_t kv_budget = -1;
    dtype_t kv_type = DTYPE_F16;
    int have_kv_type = 0, have_level = 0;
    config_log_level level = CONFIG_LOG_INFO;
    int c;
    while ((c = getopt_long(argc, argv, "c:g:r:e:m:t:h", lo, NULL)) != -1) {
        switch (c) {
        case 'c': config_path = optarg; break;
        case 'g': group = optarg; break;
        case 'r': if (parse_int("--rank", optarg, 0, 4095, &rank)) return 1; break;
        case 'e': endpoint = optarg; break;
        case 'm': model = optarg; break;
        case 't': if (parse_int("--threads", optarg, 0, 1024, &threads)) return 1; break;
        case O_KVB:
            if (parse_bytes(optarg, &kv_budget) != 0) {
                die_usage("--kv-budget '%s' is not a size (e.g. 512M, 2GiB)", optarg);
                return 1;
            }
            break;
        case O_KVT:
            if (parse_kv_type(optarg, &kv_type) != 0) {
                die_usage("--kv-type '%s' is not one of f32, f16, bf16, int8", optarg);
                return 1;
            }
            have_kv_type = 1;
            break;
        case O_MBT: if (parse_int("--max-batch-tokens", optarg, 1, 1 << 20, &mbt)) return 1; break;
        case O_SEQS: if (parse_int("--max-seqs", optarg, 1, 65536, &seqs)) return 1; break;
        case O_CTX: if (parse_int("--ctx", optarg, 0, 1 << 24, &ctx)) return 1; break;
        case O_WID: worker_id = optarg; break;
        case O_HB: if (parse_int("--heartbeat-ms", optarg, 10, 600000, &hb)) return 1; break;
        case O_LOG:
            if (parse_level(optarg, &level) != 0) {
                die_usage("--log-level '%s' is not one of error, warn, info, debug", optarg);
                return 1;
            }
            have_level = 1;
            break;
        case O_DRAIN: if (parse_int("--drain-timeout", optarg, 0, 3600000, &drain)) return 1; break;
        case 'h': usage(stdout); return 0;
        default: usage(stderr); return 1;
        }
    }
    if (optind < argc) {
        die_usage("unexpected argument '%s'", argv[optind]);
        return 1;
    }
    if (!config_path == !model) {
        die_usage("%sgive either --config FILE (with --group NAME) or -m MODEL, not both",
                  "");
        return 1;
    }

    char err[2048];
    wrk_config wc;
    wrk_config_default(&wc);
    duet_config *dc = NULL;
    if (config_path) {
        if (config_load(config_path, &dc, err, sizeof err) != 0) {
            fprintf(stderr, "<3>duet-worker: %s\n", err);
            return 1;
        }
        if (!group && dc->n_groups == 1) group = dc->groups[0].name;
        /* Under mpirun, world rank r is the r-th worker slot of the file: the groups in
         * order, each tp_size ranks (the same numbering duetd uses). */
        const char *wr = getenv("OMPI_COMM_WORLD_RANK");
        if (!wr) wr = getenv("PMIX_RANK");
        if (!group && comm_mpi_launched() && wr) {
            int world_rank = atoi(wr), base = 0;
            for (int i = 0; i < dc->n_groups && !group; i++) {
                if (world_rank < base + dc->groups[i].tp_size) {
                    group = dc->groups[i].name;
                    rank = world_rank - base;
                }
                base += dc->groups[i].tp_size;
            }
            if (!group) {
                fprintf(stderr, "<3>duet-worker: mpirun rank %d has no place in %s (%d worker "
                                "slots in its groups): start %d ranks\n", world_rank, config_path,
                        base, base);
                config_free(&dc);
                return 1;
            }
        }
        if (!group) {
            fprintf(stderr, "<3>duet-worker: %s has %d groups: name one with --group NAME\n",
                    config_path, dc->n_groups);
            config_free(&dc);
            return 1;
        }
        if (wrk_config_from_file(dc, group, rank, &wc, err, sizeof err) != WRK_OK) {
            fprintf(stderr, "<3>duet-worker: %s\n", err);
            config_free(&dc);
            return 1;
        }
    } else {
        wc.model_path = model;
        wc.tp_rank = rank;
        if (group) wc.group_name = group;
    }
    if (endpoint) wc.endpoint = endpoint;
    if (threads >= 0) wc.n_threads = threads;
    if (kv_budget > 0) wc.kv_budget = kv_budget;
    if (have_kv_type) wc.kv_type = kv_type;
    if (mbt > 0) wc.max_batch_tokens = mbt;
    if (seqs > 0) wc.max_seqs = seqs;
    if (ctx >= 0) wc.n_ctx = ctx;
    if (hb > 0) wc.heartbeat_ms = hb;
    if (have_level) wc.log_level = level;
    if (drain >= 0) wc.drain_ms = drain;
    if (worker_id) wc.worker_id = worker_id;
    wc.notify = 1;

    /* Signals arrive through a signalfd that the event loop polls; block them before
     * any thread starts so that every thread inherits the mask. */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    signal(SIGHUP, SIG_IGN); /* no reload yet: the configuration is read at start only */
    signal(SIGPIPE, SIG_IGN);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) {
        fprintf(stderr, "<3>duet-worker: pthread_sigmask failed\n");
        config_free(&dc);
        return 1;
    }
    int sfd = signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
    if (sfd < 0) {
        fprintf(stderr, "<3>duet-worker: signalfd: %s\n", strerror(errno));
        config_free(&dc);
        return 1;
    }
    wc.signal_fd = sfd;

    wrk_t *w = NULL;
    wrk_status st = wrk_new(&wc, &w, err, sizeof err);
    if (st != WRK_OK) {
        fprintf(stderr, "<3>duet-worker: %s\n", err);
        close(sfd);
        config_free(&dc);
        return 1;
    }
    const int used_mpi = wc.backend == PROTO_BACKEND_MPI;
    st = wrk_run(w, err, sizeof err); /* it logged its error, if any */
    wrk_destroy(&w);
    if (used_mpi) comm_mpi_finalize();
    close(sfd);
    config_free(&dc);
    return st == WRK_OK ? 0 : 1;
}
