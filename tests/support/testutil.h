/* tests/support/testutil.h: what many test suites need: time, temporary folders, and
 * processes (the service's end-to-end tests start real duetd and duet-worker binaries). */
#ifndef DUET_TESTS_TESTUTIL_H
#define DUET_TESTS_TESTUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Monotonic milliseconds. */
double tu_now_ms(void);
/* Make /tmp/duet-NAME-XXXXXX into buf[cap]. 0, or -1. */
int tu_mkdtemp(char *buf, size_t cap, const char *name);
/* Remove a folder and everything under it. 0, or -1. */
int tu_rmtree(const char *dir);
/* A temporary folder /tmp/duet-NAME-XXXXXX into dir[dircap] holding the suites' common tiny
 * random model (llama, f32, mkmodel defaults, seed 11, 1024-token context), whose path
 * goes into model[modelcap]. 0, or -1 with a message on stderr. */
int tu_tiny_model(const char *name, char *dir, size_t dircap, char *model, size_t modelcap);
/* The end-to-end suites' model into model[cap]: the default model (TU_DEFAULT_MODEL) when
 * `make model` fetched it, else a tiny random Q8_0 llama written into dir (with a printed
 * note). 0, or -1 with a message on stderr. */
#define TU_DEFAULT_MODEL "models/SmolLM2-135M-Instruct.Q4_1.gguf"
int tu_serving_model(const char *dir, char *model, size_t cap);
/* The reference: `BUILD/bin/duet generate -m model` run on prompt (written to a file in
 * dir) with -n n and the extra options (e.g. "-t 2"), greedy; its generated token ids
 * into ids[cap]. Returns how many, or -1. */
int tu_generate_ids(const char *build, const char *model, const char *dir, const char *prompt,
                    int n, const char *extra, int32_t *ids, int cap);
/* fork + execv(argv[0], argv) with stdout and stderr into the file log. The child's pid. */
pid_t tu_spawn(char *const argv[], const char *log);
/* SIGTERM *pid and wait up to timeout_ms: its exit status (128 + signal when killed by
 * one), or -1 when it had to be SIGKILLed. *pid becomes -1. 0 when *pid <= 0. */
int tu_stop(pid_t *pid, int timeout_ms);
/* Print the last n lines of DIR/NAME.log to stderr (nothing when it does not exist). */
void tu_show_log(const char *dir, const char *name, int n);
/* The end-to-end suites' prompt i: "Request i:" and 3..92 words (mixed lengths). */
void tu_mixed_prompt(char *buf, size_t cap, int i);
/* Word k of the suites' small vocabulary (any k >= 0). */
const char *tu_word(int k);

#endif
