/* A tiny "server" whose requests are usually fast but sometimes stall on the
 * CPU. Request boundaries are one function call (handle_request) or, with
 * --exit-form, begin_request()/end_request() calls.
 *
 *   slow_requests [--requests N] [--slow-every K] [--slow-ms MS] [--fast-us US]
 *                 [--exit-form] [--wait]
 *
 * With --wait it reads one line from stdin before serving, so a test can
 * attach dogslow first. Prints one line per slow request on stdout:
 *   slow <index> <start_realtime_ns> <end_realtime_ns>
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Busy work that the compiler cannot remove. */
static volatile unsigned long sink;

__attribute__((noinline)) void spin_for(long ms) {
    long until = now_ns(CLOCK_MONOTONIC) + ms * 1000000L;
    while (now_ns(CLOCK_MONOTONIC) < until) {
        for (int i = 0; i < 1000; i++) sink += i;
    }
}

__attribute__((noinline)) void do_fast_work(long us) {
    long until = now_ns(CLOCK_MONOTONIC) + us * 1000L;
    while (now_ns(CLOCK_MONOTONIC) < until) sink++;
}

/* Each caller touches `sink` after its call so that -O2 cannot turn the
 * call into a tail jump: every function keeps its own frame. */
__attribute__((noinline)) void handle_request(int index, int slow, long slow_ms, long fast_us) {
    if (slow) spin_for(slow_ms);
    else do_fast_work(fast_us);
    sink += index;
}

__attribute__((noinline)) void begin_request(int index) { sink += index; }
__attribute__((noinline)) void end_request(int index) { sink -= index; }

__attribute__((noinline)) void dispatch(int index, int slow, long slow_ms, long fast_us, int exit_form) {
    if (exit_form) {
        begin_request(index);
        if (slow) spin_for(slow_ms);
        else do_fast_work(fast_us);
        end_request(index);
    } else {
        handle_request(index, slow, slow_ms, fast_us);
    }
    sink++;
}

__attribute__((noinline)) void serve_forever(int requests, int slow_every, long slow_ms, long fast_us, int exit_form) {
    for (int i = 1; i <= requests; i++) {
        int slow = slow_every > 0 && i % slow_every == 0;
        long start = now_ns(CLOCK_REALTIME);
        dispatch(i, slow, slow_ms, fast_us, exit_form);
        sink++;
        if (slow) {
            printf("slow %d %ld %ld\n", i, start, now_ns(CLOCK_REALTIME));
            fflush(stdout);
        }
    }
}

int main(int argc, char **argv) {
    int requests = 10, slow_every = 0, exit_form = 0, wait = 0;
    long slow_ms = 1500, fast_us = 1000;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--requests") && i + 1 < argc) requests = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--slow-every") && i + 1 < argc) slow_every = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--slow-ms") && i + 1 < argc) slow_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--fast-us") && i + 1 < argc) fast_us = atol(argv[++i]);
        else if (!strcmp(argv[i], "--exit-form")) exit_form = 1;
        else if (!strcmp(argv[i], "--wait")) wait = 1;
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    if (wait) {
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    serve_forever(requests, slow_every, slow_ms, fast_us, exit_form);
    sink++;
    return 0;
}
