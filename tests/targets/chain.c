/* A five-deep named call chain from main, built without frame pointers
 * (-O2 -fomit-frame-pointer): level1 .. level5, where level5 either spins on
 * the CPU or blocks in read() on a pipe nobody writes to for a while.
 *
 *   chain spin|read|deep [--stall-ms MS] [--wait]
 *
 * deep: level5 recurses 400 times (about 200 KiB of stack) and spins at the
 * bottom, deeper than dogslow copies by default.
 *
 * Prints "request 1 <start_ns> <end_ns>" when the request is done.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static long stall_ms = 2000;
static int pipe_fds[2];

static long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void *late_writer(void *arg) {
    struct timespec ts = {stall_ms / 1000, (stall_ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    if (write(pipe_fds[1], "x", 1) != 1) perror("write");
    return arg;
}

__attribute__((noinline)) void recurse(int depth) {
    volatile char frame[512];
    frame[0] = (char)depth;
    if (depth > 0) recurse(depth - 1);
    else {
        long until = now_ns(CLOCK_MONOTONIC) + stall_ms * 1000000L;
        while (now_ns(CLOCK_MONOTONIC) < until) sink++;
    }
    sink += frame[0];
}

__attribute__((noinline)) void level5(int mode) {
    if (mode == 2) {
        recurse(400);
    } else if (mode == 0) {
        long until = now_ns(CLOCK_MONOTONIC) + stall_ms * 1000000L;
        while (now_ns(CLOCK_MONOTONIC) < until) sink++;
    } else {
        char byte;
        if (read(pipe_fds[0], &byte, 1) != 1) perror("read");
    }
    sink++;
}

__attribute__((noinline)) void level4(int mode) { level5(mode); sink++; }
__attribute__((noinline)) void level3(int mode) { level4(mode); sink++; }
__attribute__((noinline)) void level2(int mode) { level3(mode); sink++; }
__attribute__((noinline)) void level1(int mode) { level2(mode); sink++; }

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s spin|read [--stall-ms MS] [--wait]\n", argv[0]);
        return 2;
    }
    int mode = !strcmp(argv[1], "read") ? 1 : !strcmp(argv[1], "deep") ? 2 : 0;
    int wait = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--stall-ms") && i + 1 < argc) stall_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--wait")) wait = 1;
    }
    if (pipe(pipe_fds)) return 1;
    if (wait) {
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    pthread_t writer;
    if (mode == 1) pthread_create(&writer, NULL, late_writer, NULL);
    long start = now_ns(CLOCK_REALTIME);
    level1(mode);
    printf("request 1 %ld %ld\n", start, now_ns(CLOCK_REALTIME));
    fflush(stdout);
    if (mode == 1) pthread_join(writer, NULL);
    sink++;
    return 0;
}
