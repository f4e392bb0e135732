//! Threads that stall on a CPU: a cpu-clock perf event on every CPU looks at
//! whichever thread it interrupted and captures it once its request is past
//! the deadline.
use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_current_task_btf, macros::perf_event,
    programs::PerfEventContext,
};
use dogslow_common::{SOURCE_SAMPLER, STATE_RUNNING, stat};

use crate::{
    capture::{OnCpu, Stall, capture},
    kernel::{current_ids, now_ns},
    maps::{INFLIGHT, count},
};

#[perf_event]
pub fn stall_sampler(ctx: PerfEventContext) -> u32 {
    let (tid, _) = current_ids();
    let Some(inflight) = INFLIGHT.get_ptr_mut(tid) else {
        return 0;
    };
    // SAFETY: the entry is the interrupted thread's; its own probes cannot
    // run while it is interrupted here.
    let snapshot = unsafe { *inflight };
    if snapshot.start_ns == 0 || snapshot.reported != 0 || now_ns() < snapshot.deadline_ns {
        return 0;
    }
    // SAFETY: the helper has no preconditions.
    let task = unsafe { bpf_get_current_task_btf() };
    let stall = Stall {
        tid,
        state: STATE_RUNNING,
        source: SOURCE_SAMPLER,
        off_cpu_since_ns: 0,
    };
    if capture(&OnCpu { ctx: ctx.as_ptr() }, task, &snapshot, &stall) {
        // SAFETY: as above.
        unsafe { (*inflight).reported = 1 };
        count(stat::CAPTURES_SAMPLED);
    }
    0
}
