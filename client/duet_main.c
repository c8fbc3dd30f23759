/* client/duet_main.c: the `duet` command line. */
#include <stdio.h>
#include <string.h>

#include "client/cli_net.h"
#include "client/generate.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: duet COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  generate   generate text: in this process from a GGUF model (duet generate -m MODEL),\n"
            "             or through duetd (duet generate --endpoint URL; see --help of each)\n"
            "  chat       chat with the model that duetd serves (duet chat --help)\n"
            "  status     the cluster's state: groups, workers, KV cache, queue (duet status --help)\n"
            "  health     exit 0 when duetd can serve requests (duet health --help)\n"
            "\n"
            "The network commands use --endpoint, else $DUET_ENDPOINT, else tcp://127.0.0.1:7070.\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    const char *cmd = argv[1];
    if (strcmp(cmd, "generate") == 0) {
        if (cli_net_generate_wanted(argc - 1, argv + 1)) return cli_net_generate_main(argc - 1, argv + 1);
        return generate_main(argc - 1, argv + 1);
    }
    if (strcmp(cmd, "chat") == 0) return cli_net_chat_main(argc - 1, argv + 1);
    if (strcmp(cmd, "status") == 0) return cli_net_status_main(argc - 1, argv + 1);
    if (strcmp(cmd, "health") == 0) return cli_net_health_main(argc - 1, argv + 1);
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "duet: unknown command '%s'\n", cmd);
    usage(stderr);
    return 2;
}
