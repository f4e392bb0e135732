/* The probed request functions of the per-request overhead benchmark,
 * compiled with frame pointers: each begins with `push %rbp`, which uprobes
 * emulate, so a hit is one int3 trap.
 *
 * requests_endbr.c and requests_nop5.c include this file again with other
 * flags, so that the same functions begin with `endbr64` (a trap plus an
 * out-of-line single-step) or with the 5-byte NOP that kernel 6.18 turns
 * into a call instead of a trap. The copies differ in nothing else; the
 * bench checks each copy's first bytes.
 */
#ifndef SUFFIX
#define SUFFIX(name) name
#endif

volatile unsigned long SUFFIX(bench_sink);

/* What a request does. A call, so that the request functions need a frame
 * (gcc gives a leaf that uses no stack none, even with frame pointers). */
__attribute__((noinline)) void SUFFIX(bench_work)(unsigned long index) {
    SUFFIX(bench_sink) += index;
}

/* Function-scoped request: one call is one request. */
__attribute__((noinline)) void SUFFIX(bench_request)(unsigned long index) {
    SUFFIX(bench_work)(index);
    SUFFIX(bench_sink)++;
}

/* Exit-scoped request: begin ... end. */
__attribute__((noinline)) void SUFFIX(bench_begin)(unsigned long index) {
    SUFFIX(bench_work)(index);
    SUFFIX(bench_sink)++;
}

__attribute__((noinline)) void SUFFIX(bench_end)(unsigned long index) {
    SUFFIX(bench_work)(index);
    SUFFIX(bench_sink)--;
}
