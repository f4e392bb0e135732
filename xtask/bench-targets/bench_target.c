/* The program `cargo xtask bench` measures dogslow against. One binary, three
 * modes, driven by lines on stdin so that the bench can attach a tool first:
 *
 *   bench_target loop
 *     prints "ready", then per stdin line:
 *       run FUNC MS      call the five copies of FUNC in turn, a batch of
 *                        calls each, for at least MS milliseconds; prints
 *                        "ran CALLS_PER_COPY NS0 NS1 NS2 NS3 NS4", the
 *                        median time per call of each copy's batches
 *                        FUNC: request | exit, optionally with _endbr or
 *                        _nop5 (exit = bench_begin() then bench_end())
 *       serve RATE SECS  call bench_request_0 RATE times a second, paced
 *                        every millisecond; prints
 *                        "served CALLS ELAPSED_NS CPU_NS"
 *
 *   bench_target stalls MODE THREADS PER_THREAD STALL_MS GAP_MS
 *     after one stdin line, THREADS threads each make PER_THREAD requests
 *     (0: until killed) that stall for STALL_MS, running (spin) or blocked
 *     (nanosleep) per MODE, GAP_MS (randomized 0.5x-1.5x) apart. Prints
 *     "start TID REALTIME_NS" as each request starts, "done" at the end.
 *
 *   bench_target switches
 *     prints "ready", then per stdin line "run MS": two threads pinned to
 *     CPU 0 hand a byte back and forth through pipes for MS milliseconds,
 *     both inside switch_request() the whole time; prints
 *     "switched SWITCHES ELAPSED_NS" (switches counted by getrusage).
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define COPIES 5
#define DECLARE_COPY(kind, copy)                   \
    void bench_request##kind##copy(unsigned long); \
    void bench_begin##kind##copy(unsigned long);   \
    void bench_end##kind##copy(unsigned long);
#define DECLARE_KIND(kind) \
    DECLARE_COPY(kind, _0) DECLARE_COPY(kind, _1) DECLARE_COPY(kind, _2) DECLARE_COPY(kind, _3) DECLARE_COPY(kind, _4)
DECLARE_KIND()
DECLARE_KIND(_endbr)
DECLARE_KIND(_nop5)

static volatile unsigned long sink;

static long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static long cpu_ns(void) { return now_ns(CLOCK_PROCESS_CPUTIME_ID); }

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static pthread_mutex_t say_lock = PTHREAD_MUTEX_INITIALIZER;
#include <stdarg.h>
static void say(const char *fmt, ...) {
    va_list args;
    va_start(args, fmt);
    pthread_mutex_lock(&say_lock);
    vprintf(fmt, args);
    fflush(stdout);
    pthread_mutex_unlock(&say_lock);
    va_end(args);
}

/* ---- loop ---- */

/* Calls per timed batch: long enough that the two clock reads around it
 * are noise, short enough that a preemption spoils few batches. */
#define BATCH 64

typedef void (*request_fn)(unsigned long);

/* FUNC names: request (function-scoped) or exit (begin + end), each with an
 * optional _endbr or _nop5 suffix for the other entry instructions. */
#define FORM(name, kind, begin, end)                                                         \
    {name,                                                                                   \
     {begin##kind##_0, begin##kind##_1, begin##kind##_2, begin##kind##_3, begin##kind##_4}, \
     {end##kind##_0, end##kind##_1, end##kind##_2, end##kind##_3, end##kind##_4}}
#define FUNCTION_FORM(name, kind)                                                            \
    {name,                                                                                   \
     {bench_request##kind##_0, bench_request##kind##_1, bench_request##kind##_2,             \
      bench_request##kind##_3, bench_request##kind##_4},                                     \
     {NULL, NULL, NULL, NULL, NULL}}

static const struct {
    const char *name;
    request_fn begin[COPIES], end[COPIES];
} forms[] = {
    FUNCTION_FORM("request", ),
    FORM("exit", , bench_begin, bench_end),
    FUNCTION_FORM("request_endbr", _endbr),
    FORM("exit_endbr", _endbr, bench_begin, bench_end),
    FUNCTION_FORM("request_nop5", _nop5),
    FORM("exit_nop5", _nop5, bench_begin, bench_end),
};

static int find_form(const char *name) {
    for (unsigned i = 0; i < sizeof forms / sizeof forms[0]; i++)
        if (!strcmp(forms[i].name, name)) return (int)i;
    return -1;
}

static void call_batch(int form, int copy, unsigned long base) {
    request_fn begin = forms[form].begin[copy], end = forms[form].end[copy];
    if (end) {
        for (unsigned long i = 0; i < BATCH; i++) {
            begin(base + i);
            end(base + i);
        }
    } else {
        for (unsigned long i = 0; i < BATCH; i++) begin(base + i);
    }
}

static int compare_long(const void *a, const void *b) {
    long x = *(const long *)a, y = *(const long *)b;
    return (x > y) - (x < y);
}

/* Calls the COPIES copies of FUNC in turn, one timed batch each, for at
 * least MS milliseconds; prints the calls per copy and, per copy, the
 * median batch time per call in ns. */
static void run_loop(const char *func, long ms) {
    int form = find_form(func);
    if (form < 0) {
        say("error unknown function form %s\n", func);
        return;
    }
    long capacity = 1024, batches = 0;
    long *times[COPIES];
    for (int c = 0; c < COPIES; c++) times[c] = malloc(capacity * sizeof(long));
    long until = now_ns(CLOCK_MONOTONIC) + ms * 1000000L;
    unsigned long base = 0;
    while (now_ns(CLOCK_MONOTONIC) < until) {
        if (batches == capacity) {
            capacity *= 2;
            for (int c = 0; c < COPIES; c++) times[c] = realloc(times[c], capacity * sizeof(long));
        }
        for (int c = 0; c < COPIES; c++) {
            long start = now_ns(CLOCK_MONOTONIC);
            call_batch(form, c, base);
            times[c][batches] = now_ns(CLOCK_MONOTONIC) - start;
        }
        base += BATCH;
        batches++;
    }
    char line[256];
    int at = snprintf(line, sizeof line, "ran %ld", batches * BATCH);
    for (int c = 0; c < COPIES; c++) {
        qsort(times[c], batches, sizeof(long), compare_long);
        at += snprintf(line + at, sizeof line - at, " %.2f", (double)times[c][batches / 2] / BATCH);
        free(times[c]);
    }
    say("%s\n", line);
}

static void serve(long rate, long seconds) {
    long start = now_ns(CLOCK_MONOTONIC);
    long cpu_start = cpu_ns();
    long until = start + seconds * 1000000000L;
    unsigned long calls = 0;
    /* Requests owed so far, in thousandths, so any rate paces evenly. */
    long owed_milli = 0;
    struct timespec next;
    clock_gettime(CLOCK_MONOTONIC, &next);
    while (now_ns(CLOCK_MONOTONIC) < until) {
        owed_milli += rate;
        for (; owed_milli >= 1000; owed_milli -= 1000) bench_request_0(calls++);
        next.tv_nsec += 1000000;
        if (next.tv_nsec >= 1000000000) {
            next.tv_nsec -= 1000000000;
            next.tv_sec++;
        }
        clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &next, NULL);
    }
    say("served %lu %ld %ld\n", calls, now_ns(CLOCK_MONOTONIC) - start, cpu_ns() - cpu_start);
}

static int loop_mode(void) {
    char line[128], func[32];
    long a, b;
    say("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "run %31s %ld", func, &a) == 2) run_loop(func, a);
        else if (sscanf(line, "serve %ld %ld", &a, &b) == 2) serve(a, b);
        else if (!strncmp(line, "quit", 4)) break;
    }
    return 0;
}

/* ---- stalls ---- */

static int stall_running;
static long stall_ms, gap_ms, per_thread;

__attribute__((noinline)) void spin_until(long until) {
    while (now_ns(CLOCK_MONOTONIC) < until)
        for (int i = 0; i < 1000; i++) sink += i;
}

__attribute__((noinline)) void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0) {
    }
}

/* The request function dogslow watches in the latency and storm benches. */
__attribute__((noinline)) void stall_request(long ms) {
    if (stall_running) spin_until(now_ns(CLOCK_MONOTONIC) + ms * 1000000L);
    else sleep_ms(ms);
    sink++;
}

static void *stall_thread(void *arg) {
    unsigned int seed = (unsigned int)(unsigned long)arg * 7919u + (unsigned int)getpid();
    long tid = syscall(SYS_gettid);
    for (long i = 0; per_thread == 0 || i < per_thread; i++) {
        say("start %ld %ld\n", tid, now_ns(CLOCK_REALTIME));
        stall_request(stall_ms);
        /* Random gaps keep request starts from locking onto the sampler's phase. */
        if (gap_ms > 0) sleep_ms(gap_ms / 2 + rand_r(&seed) % (gap_ms + 1));
    }
    return NULL;
}

static int stalls_mode(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: bench_target stalls running|blocked THREADS PER_THREAD STALL_MS GAP_MS\n");
        return 2;
    }
    stall_running = !strcmp(argv[2], "running");
    int threads = atoi(argv[3]);
    per_thread = atol(argv[4]);
    stall_ms = atol(argv[5]);
    gap_ms = atol(argv[6]);
    char line[16];
    say("ready\n");
    if (!fgets(line, sizeof line, stdin)) return 1;
    pthread_t ids[64];
    if (threads > 64) threads = 64;
    for (long t = 0; t < threads; t++) pthread_create(&ids[t], NULL, stall_thread, (void *)t);
    for (int t = 0; t < threads; t++) pthread_join(ids[t], NULL);
    say("done\n");
    return 0;
}

/* ---- switches ---- */

static int ping[2], pong[2];
static long switch_until;
static long thread_switches[2];

static long own_switches(void) {
    struct rusage usage;
    getrusage(RUSAGE_THREAD, &usage);
    return usage.ru_nvcsw + usage.ru_nivcsw;
}

static void pin_to_cpu0(void) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    sched_setaffinity(0, sizeof set, &set);
}

/* Both threads spend the whole run inside this call: with dogslow watching
 * it, each is a tracked request at every switch. */
__attribute__((noinline)) void switch_request(int side) {
    long before = own_switches();
    char byte = 0;
    if (side == 0) {
        while (now_ns(CLOCK_MONOTONIC) < switch_until) {
            byte = 1;
            if (write(ping[1], &byte, 1) != 1 || read(pong[0], &byte, 1) != 1) break;
        }
        byte = 0;
        if (write(ping[1], &byte, 1) != 1) return;
    } else {
        while (read(ping[0], &byte, 1) == 1 && byte != 0)
            if (write(pong[1], &byte, 1) != 1) break;
    }
    thread_switches[side] = own_switches() - before;
    sink++;
}

static void *switch_peer(void *arg) {
    (void)arg;
    pin_to_cpu0();
    switch_request(1);
    return NULL;
}

/* Never called: with dogslow watching it, every switch is of an untracked thread. */
__attribute__((noinline)) void idle_request(void) { sink++; }

static int switches_mode(void) {
    char line[64];
    long ms;
    if (pipe(ping) || pipe(pong)) return 1;
    pin_to_cpu0();
    say("ready\n");
    while (fgets(line, sizeof line, stdin)) {
        if (sscanf(line, "run %ld", &ms) != 1) continue;
        pthread_t peer;
        long start = now_ns(CLOCK_MONOTONIC);
        switch_until = start + ms * 1000000L;
        pthread_create(&peer, NULL, switch_peer, NULL);
        switch_request(0);
        pthread_join(peer, NULL);
        long elapsed = now_ns(CLOCK_MONOTONIC) - start;
        say("switched %ld %ld\n", thread_switches[0] + thread_switches[1], elapsed);
    }
    if (sink == 12345) idle_request();
    return 0;
}

int main(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "loop")) return loop_mode();
    if (argc >= 2 && !strcmp(argv[1], "stalls")) return stalls_mode(argc, argv);
    if (argc >= 2 && !strcmp(argv[1], "switches")) return switches_mode();
    fprintf(stderr, "usage: bench_target loop | stalls ... | switches\n");
    return 2;
}
