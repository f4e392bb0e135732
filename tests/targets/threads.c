/* Many request threads in one process, and request lifecycles:
 *
 *   threads MODE [--threads N] [--ms MS] [--wait]
 *
 * MODE:
 *   spin     N threads each run one request spinning MS on the CPU, at once
 *   sleep    N threads each run one request sleeping MS, at once
 *   exit     one thread runs a request that sleeps MS, then pthread_exit()s
 *            inside it (the request never returns)
 *   recurse  handle_request recurses: levels 1-4 sleep 50 ms each and call
 *            the next level; level 5 spins MS
 *   forever  one thread blocks in a request forever (read on a pipe)
 *
 * Prints "start <tid> <realtime_ns>" when each request starts, then
 * "done" when every thread has finished.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static long ms = 1000;
static const char *mode;
static pthread_barrier_t barrier;
static pthread_mutex_t print_lock = PTHREAD_MUTEX_INITIALIZER;

static long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void sleep_ms(long duration) {
    struct timespec ts = {duration / 1000, (duration % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void spin_ms(long duration) {
    long until = now_ns(CLOCK_MONOTONIC) + duration * 1000000L;
    while (now_ns(CLOCK_MONOTONIC) < until) sink++;
}

static void announce(void) {
    pthread_mutex_lock(&print_lock);
    printf("start %d %ld\n", gettid(), now_ns(CLOCK_REALTIME));
    fflush(stdout);
    pthread_mutex_unlock(&print_lock);
}

__attribute__((noinline)) void handle_request(int level) {
    if (!strcmp(mode, "spin")) spin_ms(ms);
    else if (!strcmp(mode, "sleep")) sleep_ms(ms);
    else if (!strcmp(mode, "exit")) {
        sleep_ms(ms);
        pthread_exit(NULL);
    } else if (!strcmp(mode, "recurse")) {
        if (level < 5) {
            sleep_ms(50);
            handle_request(level + 1);
        } else {
            spin_ms(ms);
        }
    } else if (!strcmp(mode, "forever")) {
        int fds[2];
        char byte;
        if (pipe(fds) == 0 && read(fds[0], &byte, 1) < 0) perror("read");
    }
    sink++;
}

static void *worker(void *arg) {
    pthread_barrier_wait(&barrier);
    announce();
    handle_request(1);
    sink++;
    return arg;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s spin|sleep|exit|recurse|forever [--threads N] [--ms MS] [--wait]\n", argv[0]);
        return 2;
    }
    mode = argv[1];
    int threads = 1, wait = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--threads") && i + 1 < argc) threads = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--ms") && i + 1 < argc) ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--wait")) wait = 1;
    }
    if (wait) {
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    pthread_t *ids = calloc(threads, sizeof *ids);
    pthread_barrier_init(&barrier, NULL, threads);
    for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, worker, NULL);
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    printf("done\n");
    fflush(stdout);
    return 0;
}
