/* The bundled demo: a small multi-threaded "server" whose workers call
 * handle_request() for each request. Most requests take 5-50 ms; now and
 * then one stalls for 2 s in one of the ways real servers do: spinning on
 * the CPU, waiting for a lock another worker holds, or waiting on a socket
 * whose peer answers late.
 *
 *   demo_server [--forever] [--requests N]
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
static pthread_mutex_t cache_lock = PTHREAD_MUTEX_INITIALIZER;

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1000000000L + ts.tv_nsec;
}

static void sleep_ms(long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
}

__attribute__((noinline)) void render_template(long ms) {
    long until = now_ns() + ms * 1000000L;
    while (now_ns() < until) sink++;
}

__attribute__((noinline)) void refresh_cache(long hold_ms) {
    pthread_mutex_lock(&cache_lock);
    sleep_ms(hold_ms);
    pthread_mutex_unlock(&cache_lock);
    sink++;
}

__attribute__((noinline)) void read_cache(void) {
    pthread_mutex_lock(&cache_lock);
    sink++;
    pthread_mutex_unlock(&cache_lock);
}

struct reply { int fd; long delay_ms; };

static void *slow_backend(void *arg) {
    struct reply *reply = arg;
    sleep_ms(reply->delay_ms);
    char byte = 'k';
    if (write(reply->fd, &byte, 1) != 1) perror("write");
    return NULL;
}

__attribute__((noinline)) void query_backend(long delay_ms) {
    int fds[2];
    if (socketpair(AF_UNIX, SOCK_STREAM, 0, fds)) return;
    struct reply reply = {fds[1], delay_ms};
    pthread_t backend;
    pthread_create(&backend, NULL, slow_backend, &reply);
    char byte;
    if (recv(fds[0], &byte, 1, 0) < 0) perror("recv");
    pthread_join(backend, NULL);
    close(fds[0]);
    close(fds[1]);
    sink++;
}

__attribute__((noinline)) void handle_request(unsigned int number) {
    switch (number % 40) {
    case 6: render_template(2000); break;  /* stalls on the CPU */
    case 13: query_backend(2000); break;   /* stalls in recv() */
    case 31: read_cache(); break;          /* may wait for worker 0's lock */
    default: render_template(5 + number % 45); break;
    }
    sink++;
}

static int forever;
static int requests = 200;

static void *worker(void *arg) {
    long id = (long)arg;
    for (unsigned int n = id; forever || n < (unsigned int)requests; n += 4) {
        if (id == 0 && n % 40 == 28) refresh_cache(2500); /* holds the lock */
        handle_request(n);
    }
    return NULL;
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--forever")) forever = 1;
        else if (!strcmp(argv[i], "--requests") && i + 1 < argc) requests = atoi(argv[++i]);
    }
    pthread_t workers[4];
    for (long i = 0; i < 4; i++) pthread_create(&workers[i], NULL, worker, (void *)i);
    for (int i = 0; i < 4; i++) pthread_join(workers[i], NULL);
    return 0;
}
