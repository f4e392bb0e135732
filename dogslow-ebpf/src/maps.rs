//! Every map and load-time global of the object, in one place.
use aya_ebpf::bindings::BPF_F_NO_PREALLOC;
use aya_ebpf::{
    Global,
    macros::map,
    maps::{Array, HashMap, PerCpuArray, RingBuf},
};
use dogslow_common::{
    CaptureSettings, Inflight, KernelOffsets, MAX_TARGETS, MAX_TID_SLOTS, RequestArgs,
    TIDS_PER_SLOT, TargetConfig, stat,
};

/// Thread id -> the request it is in. Preallocated and bounded; the agent
/// sets the size (`--max-inflight`). A full map is counted, never silent.
#[map]
pub static INFLIGHT: HashMap<u32, Inflight> = HashMap::with_max_entries(16384, 0);

/// One byte per thread id, 1 from the thread's first request until it exits
/// (while it may have an `INFLIGHT` entry). `sched_switch` runs at every
/// context switch of the machine: this lets it pass over threads that never
/// made a request with one array read instead of a hash lookup. The agent
/// sizes it to `kernel.pid_max`; a thread id beyond is looked up.
#[map]
pub static TRACKED_TIDS: Array<[u8; TIDS_PER_SLOT as usize]> =
    Array::with_max_entries(MAX_TID_SLOTS, 0);

/// Thread id -> the arguments its request captured at entry. Allocated on
/// insert (only targets with `--capture` use it), bounded like `INFLIGHT`.
#[map]
pub static REQUEST_ARGS: HashMap<u32, RequestArgs> =
    HashMap::with_max_entries(16384, BPF_F_NO_PREALLOC);

/// Per-CPU scratch to build a `RequestArgs` (too big for the BPF stack).
#[map]
pub static ARGS_SCRATCH: PerCpuArray<RequestArgs> = PerCpuArray::with_max_entries(1, 0);

/// Attach cookie -> the target's timeout and flags.
#[map]
pub static TARGETS: Array<TargetConfig> = Array::with_max_entries(MAX_TARGETS, 0);

/// Stall captures and completion records for the agent: room for about 60
/// captures, drained as they come (a full buffer delays a capture to the
/// next tick, never loses it). The agent maps it twice over, so its size
/// is twice in the agent's RSS.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 << 20, 0);

/// One counter per failure path (see `dogslow_common::stat`).
#[map]
pub static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(stat::COUNT, 0);

#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets::UNSET);

#[unsafe(no_mangle)]
pub static SETTINGS: Global<CaptureSettings> = Global::new(CaptureSettings {
    user_stack_bytes: dogslow_common::DEFAULT_USER_STACK_COPY,
    _pad: 0,
});

/// Marks `tid` as having (or no longer having) an `INFLIGHT` entry. Called
/// by the thread itself; each thread owns its byte, so no other thread's
/// mark can be lost.
#[inline(always)]
pub fn set_tracked(tid: u32, tracked: bool) {
    if let Some(slot) = TRACKED_TIDS.get_ptr_mut(tid / TIDS_PER_SLOT) {
        // SAFETY: this thread's own byte of a map element.
        unsafe { (*slot)[(tid % TIDS_PER_SLOT) as usize] = u8::from(tracked) };
    }
}

/// False only when `tid` certainly has no `INFLIGHT` entry.
#[inline(always)]
pub fn may_be_tracked(tid: u32) -> bool {
    match TRACKED_TIDS.get(tid / TIDS_PER_SLOT) {
        Some(slot) => slot[(tid % TIDS_PER_SLOT) as usize] != 0,
        None => true,
    }
}

/// Adds one to counter `index` of `STATS` on this CPU.
#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = STATS.get_ptr_mut(index) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array and
        // programs do not nest on one CPU for the same counter update.
        unsafe { *counter += 1 };
    }
}
