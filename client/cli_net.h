/* client/cli_net.h: the `duet` CLI's commands that talk to duetd through libduet.
 *
 *   duet generate --endpoint URL -p PROMPT [...]  one generation through duetd: the text
 *                                                 streamed to stdout, timings on stderr
 *   duet chat [--endpoint URL]                    interactive chat, one session (KV kept)
 *   duet status [--endpoint URL] [--json]         the cluster's state
 *   duet health [--endpoint URL]                  exit 0 when duetd can serve requests
 *
 * The endpoint is --endpoint, else $DUET_ENDPOINT, else tcp://127.0.0.1:7070.
 * Exit statuses: 0 success; 1 a failure at run time (duetd's error, no answer, health
 * not ok); 2 bad command-line usage.
 */
#ifndef DUET_CLIENT_CLI_NET_H
#define DUET_CLIENT_CLI_NET_H

/* 1 when the arguments of `duet generate` (argv[0] "generate") ask for duetd: an
 * --endpoint/-e option, or $DUET_ENDPOINT set and no -m/--model. */
int cli_net_generate_wanted(int argc, char **argv);

/* The subcommands' mains: argv[0] is the subcommand's name. Return an exit status. */
int cli_net_generate_main(int argc, char **argv);
int cli_net_chat_main(int argc, char **argv);
int cli_net_status_main(int argc, char **argv);
int cli_net_health_main(int argc, char **argv);

#endif
