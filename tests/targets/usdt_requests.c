/* A program with USDT probes for dogslow's tests, built like PostgreSQL's:
 * `dogslow_test:request__start` is guarded by a semaphore (the expensive
 * argument set-up only runs while a tracer holds it), and its arguments take
 * the forms GCC emits (registers, stack memory, a global, a constant).
 * `dogslow_test:request__done` has no semaphore and two call sites; it
 * lives in usdt_plain.c because sys/sdt.h decides semaphores per unit.
 *
 *   usdt_requests [--dlopen LIBRARY]
 *
 * With --dlopen it maps LIBRARY first (for listing a process's libraries).
 * Prints `ready semaphore=0x<address of the semaphore>` and then serves one
 * request per `tick` line on stdin, answering
 *   tick <request id> guarded=<times the guarded branch ran> semaphore=<value>
 * It exits on `exit` or end of input.
 */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

/* What `dtrace -h` generates for a probe with a semaphore. The kernel
 * increments it while a uprobe with this reference counter is attached. */
__extension__ volatile unsigned short dogslow_test_request__start_semaphore
    __attribute__((unused)) __attribute__((section(".probes")));
#define DOGSLOW_TEST_REQUEST_START_ENABLED() \
    __builtin_expect(dogslow_test_request__start_semaphore, 0)

void request_done(long id);
void request_failed(long id);

long served_total = 40;
static long guarded_runs;

/* Requests are handled here; a uretprobe on it ends a request. */
__attribute__((noinline)) long handle_request(long id, const char *name) {
    char path[64];
    if (DOGSLOW_TEST_REQUEST_START_ENABLED()) {
        guarded_runs++;
        /* Built only while traced, as PostgreSQL builds its query string. */
        snprintf(path, sizeof path, "/%s/%ld", name, id);
        int depth = (int)(id % 7) - 3;
        DTRACE_PROBE5(dogslow_test, request__start, path, id, depth, served_total, 42);
    }
    served_total++;
    if (id % 2) request_failed(id);
    else request_done(id);
    return served_total;
}

int main(int argc, char **argv) {
    char line[64];
    long id = 0;
    if (argc == 3 && strcmp(argv[1], "--dlopen") == 0 && !dlopen(argv[2], RTLD_NOW)) {
        fprintf(stderr, "usdt_requests: %s\n", dlerror());
        return 1;
    }
    printf("ready semaphore=%p\n", (void *)&dogslow_test_request__start_semaphore);
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        if (strncmp(line, "exit", 4) == 0) break;
        if (strncmp(line, "tick", 4) != 0) continue;
        id++;
        handle_request(id, "items");
        printf("tick %ld guarded=%ld semaphore=%u\n", id, guarded_runs,
               (unsigned)dogslow_test_request__start_semaphore);
        fflush(stdout);
    }
    return 0;
}
