/* daemon/duetd_main.c: `duetd`, the coordinator's program.
 *
 *   duetd --config FILE                run (in the foreground: systemd Type=notify)
 *   duetd --check-config FILE          validate FILE: every error, or "ok"; exit 0 / 1
 *   duetd --config FILE --dump-config  print the effective configuration and exit
 *   duetd --doc-config                 print the reference of every key and exit
 *
 * Logs go to stderr with <N> priority prefixes (the journal keeps the time). SIGTERM and
 * SIGINT drain (a second one stops at once), SIGHUP reloads the file. READY=1 is sent
 * once the model's tokenizer is loaded and both sockets are bound.
 */
#include <errno.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <unistd.h>

#include <systemd/sd-daemon.h>

#include "daemon/config.h"
#include "daemon/coord.h"

#define ERR_BYTES 16384

static void usage(FILE *f)
{
    fprintf(f,
            "usage: duetd --config FILE             run the coordinator\n"
            "       duetd --check-config FILE       check FILE, print every error or \"ok\"\n"
            "       duetd --config FILE --dump-config\n"
            "                                       print the effective configuration\n"
            "       duetd --doc-config              print the reference of every key\n"
            "options:\n"
            "  --client-endpoint EP                 bind clients here instead of [daemon] client_endpoint\n"
            "  --worker-endpoint EP                 bind workers here instead of [daemon] worker_endpoint\n"
            "  --drain-timeout MS                   how long SIGTERM lets requests finish (30000)\n"
            "  --max-retries N                      transparent retries per request (2)\n");
}

static void notify(void *ctx, const char *state)
{
    (void)ctx;
    sd_notify(0, state);
}

static int check_config(const char *path)
{
    duet_config *cfg = NULL;
    char *err = malloc(ERR_BYTES);
    if (!err) return 1;
    int rc = config_load(path, &cfg, err, ERR_BYTES);
    if (rc == 0) printf("ok\n");
    else fprintf(stderr, "%s%s", err, *err && err[strlen(err) - 1] != '\n' ? "\n" : "");
    config_free(&cfg);
    free(err);
    return rc == 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
    enum { O_CONFIG = 1, O_CHECK, O_DUMP, O_DOC, O_CEP, O_WEP, O_DRAIN, O_RETRIES, O_HELP };
    static const struct option longopts[] = {
        {"config", required_argument, NULL, O_CONFIG},
        {"check-config", required_argument, NULL, O_CHECK},
        {"dump-config", no_argument, NULL, O_DUMP},
        {"doc-config", no_argument, NULL, O_DOC},
        {"client-endpoint", required_argument, NULL, O_CEP},
        {"worker-endpoint", required_argument, NULL, O_WEP},
        {"drain-timeout", required_argument, NULL, O_DRAIN},
        {"max-retries", required_argument, NULL, O_RETRIES},
        {"help", no_argument, NULL, O_HELP},
        {NULL, 0, NULL, 0},
    };
    const char *config = NULL, *check = NULL;
    int dump = 0, doc = 0;
    coord_opts opts;
    coord_opts_default(&opts);
    int o;
    while ((o = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
        switch (o) {
        case O_CONFIG: config = optarg; break;
        case O_CHECK: check = optarg; break;
        case O_DUMP: dump = 1; break;
        case O_DOC: doc = 1; break;
        case O_CEP: opts.client_endpoint = optarg; break;
        case O_WEP: opts.worker_endpoint = optarg; break;
        case O_DRAIN: opts.drain_timeout_ms = atoi(optarg); break;
        case O_RETRIES: opts.max_retries = atoi(optarg); break;
        case O_HELP: usage(stdout); return 0;
        default: usage(stderr); return 2;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "duetd: unexpected argument '%s'\n", argv[optind]);
        usage(stderr);
        return 2;
    }
    if (check) return check_config(check);
    if (doc) return config_doc(stdout) == 0 ? 0 : 1;
    if (!config) {
        fprintf(stderr, "duetd: --config FILE is required\n");
        usage(stderr);
        return 2;
    }
    if (opts.drain_timeout_ms < 0 || opts.max_retries < 0) {
        fprintf(stderr, "duetd: --drain-timeout and --max-retries take values >= 0\n");
        return 2;
    }

    char *err = malloc(ERR_BYTES);
    if (!err) return 1;
    duet_config *cfg = NULL;
    if (config_load(config, &cfg, err, ERR_BYTES) != 0) {
        fprintf(stderr, "<3>duetd: %s has errors:\n%s%s", config, err,
                *err && err[strlen(err) - 1] != '\n' ? "\n" : "");
        free(err);
        return 1;
    }
    if (dump) {
        int rc = config_dump(cfg, stdout) == 0 ? 0 : 1;
        config_free(&cfg);
        free(err);
        return rc;
    }

    /* Signals go to a signalfd read by the loop: block them before any thread starts
     * (ZeroMQ's I/O threads inherit the mask). */
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGHUP);
    if (pthread_sigmask(SIG_BLOCK, &set, NULL) != 0) {
        fprintf(stderr, "<3>duetd: blocking signals failed\n");
        free(err);
        config_free(&cfg);
        return 1;
    }
    signal(SIGPIPE, SIG_IGN);
    int sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
    if (sfd < 0) {
        fprintf(stderr, "<3>duetd: signalfd: %s\n", strerror(errno));
        free(err);
        config_free(&cfg);
        return 1;
    }
    opts.signal_fd = sfd;
    opts.notify = notify;
    sd_notify(0, "STATUS=loading the model's tokenizer");

    coord_t *c = NULL;
    if (coord_new(&cfg, &opts, &c, err, ERR_BYTES) != 0) {
        fprintf(stderr, "<3>duetd: %s\n", err);
        sd_notifyf(0, "STATUS=failed: %s", err);
        free(err);
        close(sfd);
        return 1;
    }
    free(err);
    int rc = coord_run(c);
    coord_destroy(&c);
    close(sfd);
    return rc == 0 ? 0 : 1;
}
