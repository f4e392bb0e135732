//! Request boundaries: the uprobe on the entry function, the uretprobe on its
//! return (function-scoped requests) and the uprobe on the exit function
//! (exit-scoped requests). This is the per-request hot path: a few map
//! operations, no stack work.
use aya_ebpf::{
    EbpfContext as _,
    bindings::BPF_ANY,
    helpers::generated::bpf_get_attach_cookie,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use dogslow_common::{
    CompletionEvent, EVENT_COMPLETION, Inflight, OUTCOME_ABANDONED, OUTCOME_RETURNED,
    TARGET_FUNCTION_SCOPED, stat,
};

use crate::{
    kernel::{current_ids, now_ns},
    maps::{EVENTS, INFLIGHT, TARGETS, count},
};

#[uprobe]
pub fn request_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: the context is this uprobe's; the cookie is the target index.
    let target = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let Some(config) = TARGETS.get(target) else {
        return 0;
    };
    let (tid, tgid) = current_ids();
    if let Some(inflight) = INFLIGHT.get_ptr_mut(tid) {
        if config.flags & TARGET_FUNCTION_SCOPED != 0 {
            // Nested or recursive call: still the outermost request.
            // SAFETY: only this thread writes its own depth.
            unsafe { (*inflight).depth += 1 };
            return 0;
        }
        // Exit-scoped: entering again without passing the exit means the
        // earlier request was abandoned (an error path skipped the exit).
        // SAFETY: the pointer came from a lookup and the entry is this thread's.
        finish(tid, unsafe { &*inflight }, OUTCOME_ABANDONED, 0, 0);
    }
    let start_ns = now_ns();
    let inflight = Inflight {
        start_ns,
        deadline_ns: start_ns + config.timeout_ns,
        off_cpu_since_ns: 0,
        switch_outs: 0,
        tgid,
        target,
        depth: 1,
        off_cpu_state: 0,
        reported: 0,
        _pad: 0,
    };
    if INFLIGHT.insert(tid, inflight, BPF_ANY as u64).is_err() {
        count(stat::INFLIGHT_FULL);
    } else {
        count(stat::REQUESTS_STARTED);
    }
    0
}

#[uretprobe]
pub fn request_return(_ctx: RetProbeContext) -> u32 {
    let (tid, _) = current_ids();
    if let Some(inflight) = INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: the entry belongs to this thread, which is running here.
        unsafe {
            if (*inflight).depth > 1 {
                (*inflight).depth -= 1;
                return 0;
            }
            finish(tid, &*inflight, OUTCOME_RETURNED, 0, 0);
        }
    }
    0
}

#[uprobe]
pub fn request_exit(_ctx: ProbeContext) -> u32 {
    let (tid, _) = current_ids();
    if let Some(inflight) = INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: the entry belongs to this thread, which is running here.
        finish(tid, unsafe { &*inflight }, OUTCOME_RETURNED, 0, 0);
    }
    0
}

/// Ends `tid`'s request: a completion record if it was reported, then the
/// entry goes. Shared by every path that ends a request.
#[inline(always)]
pub fn finish(tid: u32, inflight: &Inflight, outcome: u32, signal: u32, exit_code: u32) {
    if inflight.reported != 0 {
        let completion = CompletionEvent {
            kind: EVENT_COMPLETION,
            outcome,
            tid,
            tgid: inflight.tgid,
            start_ns: inflight.start_ns,
            end_ns: now_ns(),
            signal,
            exit_code,
        };
        if EVENTS.output::<CompletionEvent>(&completion, 0).is_err() {
            count(stat::COMPLETION_DROPPED);
        }
    }
    let _ = INFLIGHT.remove(tid);
}
