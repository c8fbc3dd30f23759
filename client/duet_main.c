/* client/duet_main.c: the `duet` command line. */
#include <stdio.h>
#include <string.h>

#include "client/generate.h"

static void usage(FILE *f)
{
    fprintf(f,
            "usage: duet COMMAND [options]\n"
            "\n"
            "commands:\n"
            "  generate   generate text from a GGUF model in this process (duet generate --help)\n");
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (strcmp(argv[1], "generate") == 0) return generate_main(argc - 1, argv + 1);
    if (strcmp(argv[1], "-h") == 0 || strcmp(argv[1], "--help") == 0) {
        usage(stdout);
        return 0;
    }
    fprintf(stderr, "duet: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return 2;
}
