//! Off-CPU bookkeeping. Runs on every context switch of the machine, so a
//! thread that never made a request costs one array read and nothing else;
//! a tracked one a hash lookup and three stores. The expensive part (stacks) waits for the deadline: a
//! blocked thread's stacks cannot change while it stays blocked.
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use dogslow_common::OFF_CPU_PREEMPTED;

use crate::{
    kernel::{current_ids, now_ns},
    maps::{INFLIGHT, may_be_tracked},
};

/// `sched_switch(bool preempt, task_struct *prev, task_struct *next, unsigned int prev_state)`;
/// the current task is still `prev`.
#[btf_tracepoint(function = "sched_switch")]
pub fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let (tid, _) = current_ids();
    if !may_be_tracked(tid) {
        return 0; // never made a request: most threads of the machine
    }
    let Some(inflight) = INFLIGHT.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: the switching-out thread's own entry.
    if unsafe { (*inflight).start_ns } == 0 {
        return 0; // between requests
    }
    let preempt: u64 = ctx.arg(0);
    let prev_state: u64 = ctx.arg(3);
    let state = if preempt & 1 != 0 {
        OFF_CPU_PREEMPTED
    } else {
        prev_state as u32
    };
    // SAFETY: the entry is the switching-out thread's own; it is not running
    // anything else while it switches out.
    unsafe {
        (*inflight).off_cpu_since_ns = now_ns();
        (*inflight).off_cpu_state = state;
        (*inflight).switch_outs += 1;
    }
    0
}
