/* requests.c again, compiled with -fcf-protection=full (Ubuntu's and
 * Fedora's default): every function begins with `endbr64`, which uprobes do
 * not emulate, so each hit also single-steps that instruction out of line. */
#define KIND _endbr
#include "requests.c"
