/* USDT probes without a semaphore, for usdt_requests.c: sys/sdt.h gives
 * every probe of a translation unit a semaphore or none. Two call sites of
 * the same probe, as real programs have. */
#include <sys/sdt.h>

__attribute__((noinline)) void request_done(long id) {
    DTRACE_PROBE1(dogslow_test, request__done, id);
    __asm__ volatile("" ::: "memory");
}

__attribute__((noinline)) void request_failed(long id) {
    DTRACE_PROBE1(dogslow_test, request__done, -id);
    __asm__ volatile("" ::: "memory");
}
