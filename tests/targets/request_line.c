/* One request whose handler receives the request line as its first
 * argument and an id as its second, and sleeps MS in it.
 *
 *   request_line LINE [--ms MS] [--id N] [--wait]
 */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static volatile unsigned long sink;

__attribute__((noinline)) void handle_request(const char *line, long id, long ms) {
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&ts, NULL);
    sink += (unsigned long)line[0] + (unsigned long)id;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LINE [--ms MS] [--id N] [--wait]\n", argv[0]);
        return 2;
    }
    long ms = 1000, id = 42;
    int wait = 0;
    for (int i = 2; i < argc; i++) {
        if (!strcmp(argv[i], "--ms") && i + 1 < argc) ms = atol(argv[++i]);
        else if (!strcmp(argv[i], "--id") && i + 1 < argc) id = atol(argv[++i]);
        else if (!strcmp(argv[i], "--wait")) wait = 1;
    }
    if (wait) {
        char buf[16];
        if (!fgets(buf, sizeof buf, stdin)) return 3;
    }
    /* Unescape \r and \n written literally on the command line. */
    char *line = strdup(argv[1]), *out = line;
    for (const char *in = argv[1]; *in; in++) {
        if (in[0] == '\\' && in[1] == 'r') { *out++ = '\r'; in++; }
        else if (in[0] == '\\' && in[1] == 'n') { *out++ = '\n'; in++; }
        else *out++ = *in;
    }
    *out = 0;
    handle_request(line, id, ms);
    sink++;
    return 0;
}
