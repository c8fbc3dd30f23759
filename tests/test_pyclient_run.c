/* tests/test_pyclient_run.c: runs the Python client's tests (tests/test_pyclient.py) from
 * `make test`: `.venv/bin/python -m pytest -q tests/test_pyclient.py` from the repository
 * root (the working directory of scripts/run-tests). Skipped, with the reason, when the
 * venv, pyzmq or pytest is missing (scripts/setup installs them).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cmocka.h>

#define PYTHON ".venv/bin/python"
#define TESTS "tests/test_pyclient.py"

static void test_pyclient(void **state)
{
    (void)state;
    if (access(TESTS, R_OK) != 0) {
        fprintf(stderr, "skipping: %s not found (run from the repository root)\n", TESTS);
        skip();
    }
    if (access(PYTHON, X_OK) != 0) {
        fprintf(stderr, "skipping: %s missing (run scripts/setup)\n", PYTHON);
        skip();
    }
    if (system(PYTHON " -c 'import zmq, pytest' >/dev/null 2>&1") != 0) {
        fprintf(stderr, "skipping: pyzmq or pytest missing in .venv (run scripts/setup)\n");
        skip();
    }
    /* No byte-code or pytest cache files in the tree. */
    int st = system("PYTHONDONTWRITEBYTECODE=1 " PYTHON " -m pytest -q -p no:cacheprovider " TESTS " 2>&1");
    assert_true(WIFEXITED(st));
    if (WEXITSTATUS(st) != 0) fprintf(stderr, "pytest exited with status %d\n", WEXITSTATUS(st));
    assert_int_equal(WEXITSTATUS(st), 0);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_pyclient),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
