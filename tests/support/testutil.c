/* tests/support/testutil.c: see testutil.h. */
#include "tests/support/testutil.h"

#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tests/support/gguf_write.h"

double tu_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int tu_mkdtemp(char *buf, size_t cap, const char *name)
{
    int n = snprintf(buf, cap, "/tmp/duet-%s-XXXXXX", name);
    if (n < 0 || (size_t)n >= cap) return -1;
    return mkdtemp(buf) ? 0 : -1;
}

int tu_tiny_model(const char *name, char *dir, size_t dircap, char *model, size_t modelcap)
{
    if (tu_mkdtemp(dir, dircap, name) != 0) return -1;
    int n = snprintf(model, modelcap, "%s/tiny-f32.gguf", dir);
    if (n < 0 || (size_t)n >= modelcap) return -1;
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.seed = 11;
    o.n_ctx = 1024;
    char err[256];
    if (mkmodel_write(&o, model, err, sizeof err) != 0) {
        fprintf(stderr, "mkmodel: %s\n", err);
        return -1;
    }
    return 0;
}

int tu_serving_model(const char *dir, char *model, size_t cap)
{
    if (access(TU_DEFAULT_MODEL, R_OK) == 0) {
        int n = snprintf(model, cap, "%s", TU_DEFAULT_MODEL);
        return n < 0 || (size_t)n >= cap ? -1 : 0;
    }
    printf("[  NOTE    ] %s is missing (make model): using a tiny random model\n", TU_DEFAULT_MODEL);
    mkmodel_opts o;
    mkmodel_defaults(&o);
    o.type = DTYPE_Q8_0;
    o.n_embd = 128;
    o.n_ff = 256;
    int n = snprintf(model, cap, "%s/tiny.gguf", dir);
    if (n < 0 || (size_t)n >= cap) return -1;
    char err[256];
    if (mkmodel_write(&o, model, err, sizeof err) != 0) {
        fprintf(stderr, "mkmodel: %s\n", err);
        return -1;
    }
    return 0;
}

int tu_generate_ids(const char *build, const char *model, const char *dir, const char *prompt,
                    int n, const char *extra, int32_t *ids, int cap)
{
    char cmd[4096], path[600];
    snprintf(path, sizeof path, "%s/ref.txt", dir);
    FILE *pf = fopen(path, "w");
    if (!pf) return -1;
    fputs(prompt, pf);
    fclose(pf);
    snprintf(cmd, sizeof cmd,
             "%s/bin/duet generate -m '%s' -p \"$(cat '%s')\" -n %d %s --print-ids --no-stats "
             "2>&1 >/dev/null | sed -n 's/^generated ids: *//p'",
             build, model, path, n, extra ? extra : "");
    FILE *p = popen(cmd, "r");
    if (!p) return -1;
    char line[8192] = "";
    if (!fgets(line, sizeof line, p)) line[0] = 0;
    pclose(p);
    int k = 0;
    for (char *s = line; *s && k < cap;) {
        char *end;
        long v = strtol(s, &end, 10);
        if (end == s) break;
        ids[k++] = (int32_t)v;
        s = *end == ',' ? end + 1 : end;
    }
    return k;
}

static int rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st;
    (void)flag;
    (void)ftw;
    return remove(path);
}

int tu_rmtree(const char *dir)
{
    return nftw(dir, rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

pid_t tu_spawn(char *const argv[], const char *log)
{
    pid_t pid = fork();
    if (pid == 0) {
        int fd = open(log, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd >= 0) {
            dup2(fd, 1);
            dup2(fd, 2);
        }
        execv(argv[0], argv);
        _exit(127);
    }
    return pid;
}

int tu_stop(pid_t *pid, int timeout_ms)
{
    if (*pid <= 0) return 0;
    kill(*pid, SIGTERM);
    int st = 0;
    for (int waited = 0; waited < timeout_ms; waited += 20) {
        if (waitpid(*pid, &st, WNOHANG) == *pid) {
            *pid = -1;
            return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        }
        usleep(20000);
    }
    kill(*pid, SIGKILL);
    waitpid(*pid, &st, 0);
    *pid = -1;
    return -1;
}

void tu_show_log(const char *dir, const char *name, int n)
{
    char path[700], line[512];
    snprintf(path, sizeof path, "%s/%s.log", dir, name);
    FILE *f = fopen(path, "r");
    if (!f) return;
    fprintf(stderr, "---- %s (last lines)\n", path);
    long lines = 0;
    while (fgets(line, sizeof line, f)) lines++;
    rewind(f);
    for (long i = 0; fgets(line, sizeof line, f); i++)
        if (i >= lines - n) fputs(line, stderr);
    fclose(f);
}

static const char *const tu_words[] = {"the",   "river",   "quantum", "bread", "Paris",
                                       "seven", "engine",  "music",   "history", "green",
                                       "winter", "code",   "light",   "stone"};

const char *tu_word(int k) { return tu_words[k % 14]; }

void tu_mixed_prompt(char *buf, size_t cap, int i)
{
    int n_words = 3 + (i * 37) % 90; /* mixed lengths: 3..92 words */
    size_t off = (size_t)snprintf(buf, cap, "Request %d:", i);
    for (int w = 0; w < n_words && off + 16 < cap; w++)
        off += (size_t)snprintf(buf + off, cap - off, " %s", tu_word(i * 7 + w * 3));
}
