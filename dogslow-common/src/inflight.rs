/// Per-thread bookkeeping of the request a thread is inside (value of the
/// `INFLIGHT` map, keyed by the kernel thread id). A thread keeps its entry
/// between requests, idle (`start_ns == 0`), until it exits.
///
/// Written by the entry probe, touched by `sched_switch` when the thread
/// switches out, read by the agent's deadline scan.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Inflight {
    /// `CLOCK_BOOTTIME` nanoseconds at the outermost entry; 0 between requests.
    pub start_ns: u64,
    /// `start_ns` plus the target's timeout.
    pub deadline_ns: u64,
    /// When the thread last switched out (`CLOCK_BOOTTIME` ns).
    pub off_cpu_since_ns: u64,
    /// Number of times the thread switched out since the request started.
    /// Lets the agent notice a thread that ran between two of its reads.
    pub switch_outs: u64,
    /// Process id (kernel tgid) of the thread.
    pub tgid: u32,
    /// Index of the target (probe set) that started the request.
    pub target: u32,
    /// Nesting depth of the entry function (function-scoped requests).
    pub depth: u32,
    /// `prev_state` at the last switch-out, or [`OFF_CPU_PREEMPTED`] when the
    /// thread was still runnable (preempted or yielded).
    pub off_cpu_state: u32,
    /// Non-zero once a stall report for this request reached the ring buffer.
    pub reported: u32,
    /// Non-zero when `REQUEST_ARGS` holds this request's captured arguments.
    pub has_args: u32,
}
const _: () = assert!(core::mem::size_of::<Inflight>() == 56);

/// `off_cpu_state` of a thread that was runnable when it switched out.
pub const OFF_CPU_PREEMPTED: u32 = 0;

/// Thread ids per element of the `TRACKED_TIDS` map (one byte each).
pub const TIDS_PER_SLOT: u32 = 64;

/// Elements of `TRACKED_TIDS` for the kernel's largest possible pid_max
/// (`PID_MAX_LIMIT`, 4194304); the agent sizes the map to the running
/// kernel's `kernel.pid_max`.
pub const MAX_TID_SLOTS: u32 = 4_194_304 / TIDS_PER_SLOT;

/// Elements of `TRACKED_TIDS` that cover thread ids below `pid_max`.
pub fn tid_slots(pid_max: u32) -> u32 {
    pid_max.div_ceil(TIDS_PER_SLOT).clamp(1, MAX_TID_SLOTS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_slots_cover_every_thread_id_below_pid_max() {
        assert_eq!(tid_slots(32768), 512);
        assert_eq!(tid_slots(32769), 513);
        assert_eq!(tid_slots(4_194_304), MAX_TID_SLOTS);
        assert_eq!(tid_slots(u32::MAX), MAX_TID_SLOTS);
        assert_eq!(tid_slots(0), 1);
    }
}
