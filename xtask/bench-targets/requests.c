/* The probed request functions of the per-request overhead benchmark,
 * compiled with frame pointers: each begins with `push %rbp`, which uprobes
 * emulate, so a hit is one int3 trap.
 *
 * requests_endbr.c and requests_nop5.c include this file again with other
 * flags, so that the same functions begin with `endbr64` (a trap plus an
 * out-of-line single-step) or with the 5-byte NOP that kernel 6.18 turns
 * into a call instead of a trap. The copies differ in nothing else; the
 * bench checks each copy's first bytes.
 *
 * Every function exists COPIES times (suffix _0 .. _4): the bench probes
 * each copy with a different tool at the same time and interleaves calls to
 * them, so that all tools are measured in the same milliseconds.
 */
#ifndef KIND
#define KIND
#endif

#define NAME_(base, kind, copy) base##kind##copy
#define NAME(base, kind, copy) NAME_(base, kind, copy)

/* bench_work is what a request does. It is a call so that the request
 * functions need a frame (gcc gives a leaf that uses no stack none, even
 * with frame pointers). */
#define DEFINE_COPY(copy)                                                           \
    volatile unsigned long NAME(bench_sink, KIND, copy);                            \
    __attribute__((noinline)) void NAME(bench_work, KIND, copy)(unsigned long i) {  \
        NAME(bench_sink, KIND, copy) += i;                                          \
    }                                                                               \
    /* Function-scoped request: one call is one request. */                         \
    __attribute__((noinline)) void NAME(bench_request, KIND, copy)(unsigned long i) { \
        NAME(bench_work, KIND, copy)(i);                                            \
        NAME(bench_sink, KIND, copy)++;                                             \
    }                                                                               \
    /* Exit-scoped request: begin ... end. */                                       \
    __attribute__((noinline)) void NAME(bench_begin, KIND, copy)(unsigned long i) { \
        NAME(bench_work, KIND, copy)(i);                                            \
        NAME(bench_sink, KIND, copy)++;                                             \
    }                                                                               \
    __attribute__((noinline)) void NAME(bench_end, KIND, copy)(unsigned long i) {   \
        NAME(bench_work, KIND, copy)(i);                                            \
        NAME(bench_sink, KIND, copy)--;                                             \
    }

DEFINE_COPY(_0)
DEFINE_COPY(_1)
DEFINE_COPY(_2)
DEFINE_COPY(_3)
DEFINE_COPY(_4)
