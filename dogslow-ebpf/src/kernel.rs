//! Small wrappers over helpers used by several programs.
use aya_ebpf::helpers::{bpf_get_current_pid_tgid, bpf_ktime_get_boot_ns, bpf_probe_read_kernel};

/// `CLOCK_BOOTTIME` in nanoseconds: the time base of every record.
#[inline(always)]
pub fn now_ns() -> u64 {
    // SAFETY: the helper has no preconditions.
    unsafe { bpf_ktime_get_boot_ns() }
}

/// The current thread's (tid, tgid).
#[inline(always)]
pub fn current_ids() -> (u32, u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    (pid_tgid as u32, (pid_tgid >> 32) as u32)
}

/// Reads a `T` at `base + offset` in kernel memory; a fault yields `None`.
#[inline(always)]
pub fn read_field<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails on a fault.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T) }.ok()
}
