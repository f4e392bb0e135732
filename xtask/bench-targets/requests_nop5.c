/* requests.c again, with a 5-byte NOP at every function entry: compiled with
 * `gcc -pg -mfentry -mnop-mcount` (the kernel's own ftrace trick: the
 * `call __fentry__` becomes `nopl 0x0(%rax,%rax,1)`). gcc accepts
 * -mnop-mcount only without -fPIC, so the bench target is not PIE. */
#define KIND _nop5
#include "requests.c"
