//! Threads that stall off a CPU (blocked, or runnable but preempted): the
//! agent runs this sleepable task iterator when it sees a request past its
//! deadline whose thread is not running. The iterator visits every task and
//! captures the tracked, overdue, unreported ones that are off-CPU, through
//! helpers that work on a task other than the current one.
use aya_ebpf::bindings::task_struct;
use dogslow_common::{OFF_CPU_PREEMPTED, SOURCE_OFF_CPU, STATE_BLOCKED, STATE_RUNNING, stat};

use crate::{
    capture::{OffCpu, Stall, capture},
    kernel::{now_ns, read_field},
    maps::{INFLIGHT, OFFSETS, count},
};

/// `struct bpf_iter__task`, the iterator's context.
#[repr(C)]
pub struct TaskIterContext {
    pub meta: *mut core::ffi::c_void,
    pub task: *mut task_struct,
}

#[unsafe(no_mangle)]
#[unsafe(link_section = "iter.s/task")]
pub fn capture_off_cpu(ctx: *mut TaskIterContext) -> i32 {
    // SAFETY: ctx is the iterator context the kernel passes.
    let task = unsafe { (*ctx).task };
    if task.is_null() {
        return 0;
    }
    let offsets = OFFSETS.load();
    let Some(tid) = read_field::<u32>(task as u64, offsets.task_pid) else {
        return 0;
    };
    let Some(inflight) = INFLIGHT.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: a lookup result; the copy is what the capture describes.
    let snapshot = unsafe { *inflight };
    if snapshot.start_ns == 0 || snapshot.reported != 0 || now_ns() < snapshot.deadline_ns {
        return 0;
    }
    let on_cpu: u32 = read_field(task as u64, offsets.task_on_cpu).unwrap_or(1);
    if on_cpu != 0 {
        // Running: its registers are moving. The sampler takes it.
        return 0;
    }
    let state = if snapshot.off_cpu_state == OFF_CPU_PREEMPTED {
        STATE_RUNNING
    } else {
        STATE_BLOCKED
    };
    let stall = Stall {
        tid,
        state,
        source: SOURCE_OFF_CPU,
        off_cpu_since_ns: snapshot.off_cpu_since_ns,
    };
    if capture(&OffCpu { task }, task, &snapshot, &stall) {
        // The thread may have ended its request while we copied; mark only
        // the request we captured, not one that reused the slot.
        if let Some(current) = INFLIGHT.get_ptr_mut(tid) {
            // SAFETY: a lookup result in a preallocated map.
            unsafe {
                if (*current).start_ns == snapshot.start_ns {
                    (*current).reported = 1;
                }
            }
        }
        count(stat::CAPTURES_OFF_CPU);
    }
    0
}
