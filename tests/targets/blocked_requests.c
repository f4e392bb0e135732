/* Requests that stall off-CPU, one kind per run:
 *
 *   blocked_requests MODE [--stall-ms MS] [--requests N] [--wait]
 *
 * MODE:
 *   recv       handle_request blocks in recv() on a socket whose peer
 *              (another thread) writes after MS
 *   mutex      handle_request blocks in pthread_mutex_lock on a mutex another
 *              thread holds for MS
 *   nanosleep  handle_request sleeps MS in nanosleep()
 *   mixed      handle_request spins on the CPU for MS/2, then sleeps MS/2
 *   never      handle_request blocks in recv() on a socket nobody writes to
 *   twice      handle_request sleeps 100 ms in first_wait(), runs briefly,
 *              then sleeps MS in second_wait()
 *
 * With --wait it reads one line from stdin first. Prints one line per request:
 *   request <index> <start_realtime_ns> <end_realtime_ns>
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static volatile unsigned long sink;
static long stall_ms = 2000;
static int sockets[2];
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_mutex_t ready_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t ready = PTHREAD_COND_INITIALIZER;
static int holder_ready;

static long now_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

static void *late_writer(void *arg) {
    sleep_ms(stall_ms);
    char byte = 'x';
    if (write(sockets[1], &byte, 1) != 1) perror("write");
    return arg;
}

static void *lock_holder(void *arg) {
    pthread_mutex_lock(&lock);
    pthread_mutex_lock(&ready_lock);
    holder_ready = 1;
    pthread_cond_signal(&ready);
    pthread_mutex_unlock(&ready_lock);
    sleep_ms(stall_ms);
    pthread_mutex_unlock(&lock);
    return arg;
}

__attribute__((noinline)) void wait_for_peer(void) {
    char byte;
    if (recv(sockets[0], &byte, 1, 0) < 0) perror("recv");
    sink++;
}

__attribute__((noinline)) void wait_for_lock(void) {
    pthread_mutex_lock(&lock);
    pthread_mutex_unlock(&lock);
    sink++;
}

__attribute__((noinline)) void wait_for_timer(long ms) {
    sleep_ms(ms);
    sink++;
}

__attribute__((noinline)) void first_wait(void) {
    sleep_ms(100);
    sink++;
}

__attribute__((noinline)) void second_wait(long ms) {
    sleep_ms(ms);
    sink++;
}

__attribute__((noinline)) void compute(long ms) {
    long until = now_ns(CLOCK_MONOTONIC) + ms * 1000000L;
    while (now_ns(CLOCK_MONOTONIC) < until) sink++;
}

__attribute__((noinline)) void handle_request(const char *mode) {
    if (!strcmp(mode, "recv") || !strcmp(mode, "never")) wait_for_peer();
    else if (!strcmp(mode, "mutex")) wait_for_lock();
    else if (!strcmp(mode, "nanosleep")) wait_for_timer(stall_ms);
    else if (!strcmp(mode, "mixed")) {
        compute(stall_ms / 2);
        wait_for_timer(stall_ms / 2);
    } else if (!strcmp(mode, "twice")) {
        first_wait();
        compute(20);
        second_wait(stall_ms);
    }
    sink++;
}

__attribute__((noinline)) void serve(const char *mode, int requests) {
    for (int i = 1; i <= requests; i++) {
        pthread_t helper = 0;
        if (!strcmp(mode, "recv")) pthread_create(&helper, NULL, late_writer, NULL);
        if (!strcmp(mode, "mutex")) {
            holder_ready = 0;
            pthread_create(&helper, NULL, lock_holder, NULL);
            pthread_mutex_lock(&ready_lock);
            while (!holder_ready) pthread_cond_wait(&ready, &ready_lock);
            pthread_mutex_unlock(&ready_lock);
        }
        long start = now_ns(CLOCK_REALTIME);
        handle_request(mode);
        long end = now_ns(CLOCK_REALTIME);
        if (helper) pthread_join(helper, NULL);
        printf("request %d %ld %ld\n", i, start, end);
        fflush(stdout);
    }
    sink++;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s recv|mutex|nanosleep|mixed|never [--stall-ms MS] [--requests N] [--wait]\n", argv[0]);
        return 2;
    }
    const char *mode = argv[1];
    int requests = 1, wait = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--stall-ms") && i + 1 < argc) stall_ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--requests") && i + 1 < argc) requests = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--wait")) wait = 1;
        else { fprintf(stderr, "unknown argument %s\n", argv[i]); return 2; }
    }
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, sockets)) { perror("socketpair"); return 1; }
    if (wait) {
        char line[16];
        if (!fgets(line, sizeof line, stdin)) return 3;
    }
    serve(mode, requests);
    sink++;
    return 0;
}
