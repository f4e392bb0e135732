//! Threads and processes that end mid-request: the entry goes, and a
//! reported request gets a completion saying how it ended (the SIGKILL from
//! a supervisor being the case dogslow exists for).
use aya_ebpf::{macros::btf_tracepoint, programs::BtfTracePointContext};
use dogslow_common::{
    OUTCOME_EXECED, OUTCOME_KILLED, OUTCOME_PROCESS_EXITED, OUTCOME_THREAD_EXITED,
};

use crate::{
    kernel::{current_ids, read_field},
    maps::{INFLIGHT, OFFSETS, set_tracked},
    request::complete,
};

/// `signal_struct::flags` bit set while the whole thread group exits.
const SIGNAL_GROUP_EXIT: u32 = 0x4;

/// `sched_process_exit(task_struct *p, bool group_dead)`, `p` being current.
#[btf_tracepoint(function = "sched_process_exit")]
pub fn thread_exit(ctx: BtfTracePointContext) -> i32 {
    let (tid, _) = current_ids();
    let Some(inflight) = INFLIGHT.get_ptr_mut(tid) else {
        return 0;
    };
    let task: u64 = ctx.arg(0);
    let group_dead: u64 = ctx.arg(1);
    let offsets = OFFSETS.load();
    let exit_code: u32 = read_field(task, offsets.task_exit_code).unwrap_or(0);
    let signal_struct: u64 = read_field(task, offsets.task_signal).unwrap_or(0);
    let signal_flags: u32 = read_field(signal_struct, offsets.signal_flags).unwrap_or(0);
    // exit_code is a wait status: the low 7 bits name a fatal signal.
    let signal = exit_code & 0x7f;
    let outcome = if signal != 0 {
        OUTCOME_KILLED
    } else if group_dead & 1 != 0 || signal_flags & SIGNAL_GROUP_EXIT != 0 {
        OUTCOME_PROCESS_EXITED
    } else {
        OUTCOME_THREAD_EXITED
    };
    // SAFETY: the entry is the exiting thread's own.
    let request = unsafe { &*inflight };
    if request.start_ns != 0 {
        complete(tid, request, outcome, signal, exit_code);
    }
    // The thread is gone: so is its entry, idle or not.
    let _ = INFLIGHT.remove(tid);
    set_tracked(tid, false);
    0
}

/// `sched_process_exec`: the thread's program image is gone, and with it the
/// request it was in.
#[btf_tracepoint(function = "sched_process_exec")]
pub fn thread_exec(_ctx: BtfTracePointContext) -> i32 {
    let (tid, _) = current_ids();
    if let Some(inflight) = INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: the entry is the exec'ing thread's own.
        let request = unsafe { &*inflight };
        if request.start_ns != 0 {
            complete(tid, request, OUTCOME_EXECED, 0, 0);
        }
        // The new program's requests start from scratch.
        let _ = INFLIGHT.remove(tid);
        set_tracked(tid, false);
    }
    0
}
