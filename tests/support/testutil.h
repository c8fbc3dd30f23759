/* tests/support/testutil.h: what many test suites need: time, temporary folders, and
 * processes (the service's end-to-end tests start real duetd and duet-worker binaries). */
#ifndef DUET_TESTS_TESTUTIL_H
#define DUET_TESTS_TESTUTIL_H

#include <stddef.h>
#include <sys/types.h>

/* Monotonic milliseconds. */
double tu_now_ms(void);
/* Make /tmp/duet-NAME-XXXXXX into buf[cap]. 0, or -1. */
int tu_mkdtemp(char *buf, size_t cap, const char *name);
/* Remove a folder and everything under it. 0, or -1. */
int tu_rmtree(const char *dir);
/* fork + execv(argv[0], argv) with stdout and stderr into the file log. The child's pid. */
pid_t tu_spawn(char *const argv[], const char *log);
/* SIGTERM *pid and wait up to timeout_ms: its exit status (128 + signal when killed by
 * one), or -1 when it had to be SIGKILLed. *pid becomes -1. 0 when *pid <= 0. */
int tu_stop(pid_t *pid, int timeout_ms);

#endif
