//! Request boundaries: the uprobe on the entry function, the uretprobe on its
//! return (function-scoped requests) and the uprobe on the exit function
//! (exit-scoped requests). This is the per-request hot path: a few map
//! operations, no stack work.
use aya_ebpf::{
    EbpfContext as _,
    bindings::{BPF_ANY, BPF_NOEXIST},
    helpers::generated::bpf_get_attach_cookie,
    macros::{uprobe, uretprobe},
    programs::{ProbeContext, RetProbeContext},
};
use dogslow_common::{
    CAPTURE_CONSTANT, CAPTURE_MEMORY, CAPTURE_REGISTER, CAPTURE_STR_BUF, CompletionEvent,
    EVENT_COMPLETION, Inflight, MAX_CAPTURES, OUTCOME_ABANDONED, OUTCOME_RETURNED, PT_REGS_COUNT,
    TARGET_FUNCTION_SCOPED, TargetConfig, stat,
};

use crate::{
    kernel::{current_ids, now_ns},
    maps::{ARGS_SCRATCH, EVENTS, INFLIGHT, REQUEST_ARGS, TARGETS, count, set_tracked},
};

#[uprobe]
pub fn request_entry(ctx: ProbeContext) -> u32 {
    // SAFETY: the context is this uprobe's; the cookie is the target index.
    let target = unsafe { bpf_get_attach_cookie(ctx.as_ptr()) } as u32;
    let Some(config) = TARGETS.get(target) else {
        return 0;
    };
    let (tid, tgid) = current_ids();
    let start_ns = now_ns();
    // A thread keeps its entry between requests (idle: start_ns == 0), so a
    // request costs a lookup and a few stores, not an insert and a delete.
    let entry = match INFLIGHT.get_ptr_mut(tid) {
        Some(entry) => entry,
        None => {
            let idle = Inflight::default();
            if INFLIGHT.insert(tid, idle, BPF_NOEXIST as u64).is_err() {
                count(stat::INFLIGHT_FULL);
                return 0;
            }
            set_tracked(tid, true);
            match INFLIGHT.get_ptr_mut(tid) {
                Some(entry) => entry,
                None => return 0,
            }
        }
    };
    // SAFETY: the entry is this thread's own; its other writers (its own
    // probes, sched_switch, the exit tracepoint) run only as this thread,
    // which is here.
    unsafe {
        if (*entry).start_ns != 0 {
            if config.flags & TARGET_FUNCTION_SCOPED != 0 {
                // Nested or recursive call: still the outermost request.
                (*entry).depth += 1;
                return 0;
            }
            // Exit-scoped: entering again without passing the exit means
            // the earlier request was abandoned (an error path skipped it).
            end_request(tid, entry, OUTCOME_ABANDONED);
        }
        (*entry).deadline_ns = start_ns.saturating_add(config.timeout_ns);
        (*entry).off_cpu_since_ns = 0;
        (*entry).switch_outs = 0;
        (*entry).tgid = tgid;
        (*entry).target = target;
        (*entry).depth = 1;
        (*entry).off_cpu_state = 0;
        (*entry).reported = 0;
        (*entry).has_args = 0;
        (*entry).start_ns = start_ns;
    }
    count(stat::REQUESTS_STARTED);
    if config.capture_count > 0 && capture_args(&ctx, config, tid, start_ns) {
        // SAFETY: as above.
        unsafe { (*entry).has_args = 1 };
    }
    0
}

#[uretprobe]
pub fn request_return(_ctx: RetProbeContext) -> u32 {
    let (tid, _) = current_ids();
    if let Some(entry) = INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: the entry belongs to this thread, which is running here.
        unsafe {
            if (*entry).start_ns == 0 {
                return 0;
            }
            if (*entry).depth > 1 {
                (*entry).depth -= 1;
                return 0;
            }
            end_request(tid, entry, OUTCOME_RETURNED);
        }
    }
    0
}

#[uprobe]
pub fn request_exit(_ctx: ProbeContext) -> u32 {
    let (tid, _) = current_ids();
    if let Some(entry) = INFLIGHT.get_ptr_mut(tid) {
        // SAFETY: the entry belongs to this thread, which is running here.
        unsafe {
            if (*entry).start_ns != 0 {
                end_request(tid, entry, OUTCOME_RETURNED);
            }
        }
    }
    0
}

/// Ends the request `entry` holds and leaves the entry idle for the
/// thread's next request.
///
/// # Safety
/// `entry` is `tid`'s own `INFLIGHT` entry, and the caller runs as `tid`.
#[inline(always)]
pub unsafe fn end_request(tid: u32, entry: *mut Inflight, outcome: u32) {
    // SAFETY: per the contract.
    unsafe {
        complete(tid, &*entry, outcome, 0, 0);
        (*entry).start_ns = 0;
        (*entry).reported = 0;
        (*entry).has_args = 0;
        (*entry).depth = 0;
    }
}

/// A request ends: a completion record if it was reported, and its
/// captured arguments go. Shared by every path that ends a request.
#[inline(always)]
pub fn complete(tid: u32, inflight: &Inflight, outcome: u32, signal: u32, exit_code: u32) {
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
    if inflight.has_args != 0 {
        let _ = REQUEST_ARGS.remove(tid);
    }
}

/// Records the target's `--capture` arguments for `tid`'s new request.
/// Only targets that capture pay for this.
#[inline(always)]
fn capture_args(ctx: &ProbeContext, config: &TargetConfig, tid: u32, start_ns: u64) -> bool {
    let Some(args) = ARGS_SCRATCH.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: the context of a uprobe is the probed thread's pt_regs.
    let regs: [u64; PT_REGS_COUNT] = unsafe { *(ctx.regs as *const [u64; PT_REGS_COUNT]) };
    // SAFETY: `args` is this CPU's scratch slot; uprobes do not nest on a CPU.
    let args = unsafe { &mut *args };
    args.start_ns = start_ns;
    for (index, spec) in config.captures.iter().enumerate() {
        if index >= config.capture_count as usize || index >= MAX_CAPTURES {
            break;
        }
        let register = regs.get(spec.register as usize).copied().unwrap_or(0);
        let raw = match spec.location {
            CAPTURE_REGISTER => register,
            CAPTURE_MEMORY => read_user_value(register.wrapping_add(spec.offset as u64), spec.size),
            CAPTURE_CONSTANT => spec.offset as u64,
            _ => 0,
        };
        let value = sized(raw, spec.size, spec.signed != 0);
        args.values[index] = value;
        args.lens[index] = 0;
        if spec.string != 0 {
            // Read one byte past the kept length to see whether it was cut.
            let mut size = spec.max_len as usize + 2;
            if size > CAPTURE_STR_BUF {
                size = CAPTURE_STR_BUF;
            }
            let dst = &mut args.strings[index];
            // SAFETY: size <= the buffer's length; the helper checks the source.
            let read = unsafe {
                aya_ebpf::helpers::generated::bpf_probe_read_user_str(
                    dst.as_mut_ptr().cast(),
                    size as u32,
                    value as *const core::ffi::c_void,
                )
            };
            args.lens[index] = if read > 0 {
                (read - 1) as i32
            } else {
                read as i32
            };
        }
    }
    if REQUEST_ARGS.insert(tid, &*args, BPF_ANY as u64).is_err() {
        count(stat::ARGS_FULL);
        return false;
    }
    true
}

/// Reads a `size`-byte value from user memory (0 if unreadable).
#[inline(always)]
fn read_user_value(addr: u64, size: u32) -> u64 {
    let mut value: u64 = 0;
    let mut size = size & 15;
    if size > 8 {
        size = 8;
    }
    // SAFETY: reads at most 8 bytes into a u64; the helper checks `addr`.
    let ret = unsafe {
        aya_ebpf::helpers::generated::bpf_probe_read_user(
            (&raw mut value).cast(),
            size,
            addr as *const core::ffi::c_void,
        )
    };
    if ret < 0 { 0 } else { value }
}

/// Truncates `raw` to `size` bytes, sign-extending when asked.
#[inline(always)]
fn sized(raw: u64, size: u32, signed: bool) -> u64 {
    match (size, signed) {
        (1, false) => raw & 0xff,
        (2, false) => raw & 0xffff,
        (4, false) => raw & 0xffff_ffff,
        (1, true) => raw as u8 as i8 as i64 as u64,
        (2, true) => raw as u16 as i16 as i64 as u64,
        (4, true) => raw as u32 as i32 as i64 as u64,
        _ => raw,
    }
}
