/* tests/test_comm_mpi.c: the mpi backend of the data plane (comm/comm.h), run for real under
 * Open MPI: build/tools/comm_mpi_check (tests/tools/comm_mpi_check.c, next to this binary's
 * folder) under
 *
 *   mpirun --allow-run-as-root --oversubscribe --bind-to none --mca btl self,vader
 *          --mca btl_vader_single_copy_mechanism none -np N
 *
 * with N = 2 and 4. The helper checks ordering of one (source, tag), many tags interleaved,
 * a 64 MiB message and the INT_MAX refusal, truncation, discard (a sender of rendezvous-sized
 * messages finishes only if the receiver drained them), cancel of a receive, all-reduce,
 * broadcast and all-gather bit-exact against the sum in list order (world and pairs), and a
 * collective that times out; rank 0 prints "comm_mpi_check: np=N ok checks=K", which this
 * test requires along with exit status 0.
 *
 * Only shared memory (btl self,vader) and no single-copy (CMA needs ptrace rights that
 * containers often lack), so it runs in a container without network surprises. Under ASan
 * the helper's leak report leaves out Open MPI's own allocations (suppressions for its
 * libraries; its components are kept loaded so their names show). Skipped, visibly, when
 * mpirun is not on PATH. */
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#define RUN_TIMEOUT_S 240 /* the whole mpirun (ASan, a loaded 2-core machine) */

typedef struct {
    char mpirun[PATH_MAX];
    char helper[PATH_MAX + 64];
    char dir[64];  /* temporary: the leak suppressions */
    char supp[128];
} fixture;

static int find_in_path(const char *name, char *out, size_t cap)
{
    const char *path = getenv("PATH");
    if (!path) path = "/usr/bin:/bin";
    while (*path) {
        const char *end = strchr(path, ':');
        size_t n = end ? (size_t)(end - path) : strlen(path);
        if (n > 0 && (size_t)snprintf(out, cap, "%.*s/%s", (int)n, path, name) < cap &&
            access(out, X_OK) == 0)
            return 0;
        path += n + (end ? 1 : 0);
    }
    return -1;
}

static int setup(void **state)
{
    fixture *f = calloc(1, sizeof *f);
    if (!f) return -1;
    *state = f;
    if (find_in_path("mpirun", f->mpirun, sizeof f->mpirun) != 0) f->mpirun[0] = 0;
    /* this binary is BUILD/tests/test_comm_mpi: the helper is BUILD/tools/comm_mpi_check */
    char self[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
    if (n <= 0) return -1;
    self[n] = 0;
    char *slash = strrchr(self, '/');
    if (slash) *slash = 0;
    slash = strrchr(self, '/');
    if (slash) *slash = 0;
    snprintf(f->helper, sizeof f->helper, "%s/tools/comm_mpi_check", self);
    snprintf(f->dir, sizeof f->dir, "/tmp/duet-comm-mpi-XXXXXX");
    if (!mkdtemp(f->dir)) return -1;
    snprintf(f->supp, sizeof f->supp, "%s/lsan.supp", f->dir);
    FILE *s = fopen(f->supp, "w");
    if (!s) return -1;
    static const char *const libs[] = {"libmpi.so", "libopen-pal.so", "libopen-rte.so",
                                       "libpmix.so", "libhwloc.so", "libevent", "mca_",
                                       "libucs", "libucp", "libfabric", "libpsm"};
    for (size_t i = 0; i < sizeof libs / sizeof *libs; i++) fprintf(s, "leak:%s\n", libs[i]);
    fclose(s);
    return 0;
}

static int teardown(void **state)
{
    fixture *f = *state;
    if (f) {
        if (f->supp[0]) unlink(f->supp);
        if (f->dir[0]) rmdir(f->dir);
        free(f);
    }
    return 0;
}

/* Append to an environment variable's ':'-separated options. */
static void env_add(const char *var, const char *opts)
{
    const char *old = getenv(var);
    char buf[1024];
    snprintf(buf, sizeof buf, "%s%s%s", old && *old ? old : "", old && *old ? ":" : "", opts);
    setenv(var, buf, 1);
}

static void run_np(void **state, int np)
{
    fixture *f = *state;
    if (!f->mpirun[0]) {
        printf("[  SKIP    ] mpirun is not on PATH: the mpi backend is not tested (install "
               "openmpi-bin)\n");
        skip();
    }
    if (access(f->helper, X_OK) != 0)
        fail_msg("%s is missing: build it (make ... BUILD/tools/comm_mpi_check)", f->helper);
    char opts[256];
    snprintf(opts, sizeof opts, "suppressions=%s:print_suppressions=0", f->supp);
    env_add("LSAN_OPTIONS", opts);
    env_add("ASAN_OPTIONS", "fast_unwind_on_malloc=0");
    setenv("OMPI_MCA_mca_base_component_disable_dlclose", "1", 1);
    char cmd[3 * PATH_MAX + 512];
    snprintf(cmd, sizeof cmd,
             "timeout -k 5 %d '%s' --allow-run-as-root --oversubscribe --bind-to none "
             "--mca btl self,vader --mca btl_vader_single_copy_mechanism none -np %d '%s' 2>&1",
             RUN_TIMEOUT_S, f->mpirun, np, f->helper);
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    static char out[1 << 16];
    size_t len = 0, got;
    while ((got = fread(out + len, 1, sizeof out - 1 - len, p)) > 0) len += got;
    out[len] = 0;
    int status = pclose(p);
    char want[64];
    snprintf(want, sizeof want, "comm_mpi_check: np=%d ok checks=", np);
    const int ok = strstr(out, want) != NULL;
    if (!ok || status == -1 || !WIFEXITED(status) || WEXITSTATUS(status) != 0)
        fail_msg("%s\n--- exit status %d; its output (last part):\n%s", cmd,
                 WIFEXITED(status) ? WEXITSTATUS(status) : -1,
                 len > 6000 ? out + len - 6000 : out);
    const char *line = strstr(out, want); /* the helper's result line */
    printf("%.*s\n", (int)strcspn(line, "\n"), line);
}

static void test_mpi_np2(void **state) { run_np(state, 2); }
static void test_mpi_np4(void **state) { run_np(state, 4); }

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mpi_np2),
        cmocka_unit_test(test_mpi_np4),
    };
    return cmocka_run_group_tests_name("comm_mpi", tests, setup, teardown);
}
