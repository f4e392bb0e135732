//! The stall capture both the sampler (thread on a CPU) and the task iterator
//! (thread off a CPU) take: user registers, kernel stack, a copy of the top
//! of the user stack and the uretprobe return slots, in one ring buffer
//! record. Runs once per stalled request, never on the per-request path.
use core::ffi::c_void;

use aya_ebpf::{
    bindings::{pt_regs, task_struct},
    helpers::{
        bpf_probe_read_kernel,
        generated::{
            self, bpf_copy_from_user_task, bpf_get_smp_processor_id, bpf_get_stack,
            bpf_get_task_stack, bpf_probe_read_user, bpf_task_pt_regs,
        },
    },
};
use dogslow_common::{
    EVENT_STALL, Inflight, MAX_KERNEL_FRAMES, MAX_RETURN_SLOTS, MAX_USER_STACK_COPY, StallEvent,
    UserRegs, stat,
};

use crate::{
    kernel::{now_ns, read_field},
    maps::{EVENTS, OFFSETS, REQUEST_ARGS, SETTINGS, count},
};

const PAGE_SIZE: usize = 4096;

/// How a capture reaches the thread: it is either the current task (sampler)
/// or another, stopped task (iterator).
pub trait ThreadAccess {
    /// Writes the kernel stack to `buf`; returns bytes written or a negative errno.
    fn kernel_stack(&self, buf: *mut c_void, size: u32) -> i64;
    /// Copies `size` bytes of the thread's user memory at `addr`.
    fn read_user(&self, dst: *mut c_void, size: u32, addr: u64) -> i64;
}

/// The thread running on this CPU, interrupted by a perf event.
pub struct OnCpu {
    pub ctx: *mut c_void,
}

impl ThreadAccess for OnCpu {
    #[inline(always)]
    fn kernel_stack(&self, buf: *mut c_void, size: u32) -> i64 {
        // SAFETY: ctx is the program's context; buf has room for size bytes.
        unsafe { bpf_get_stack(self.ctx, buf, size, 0) }
    }

    #[inline(always)]
    fn read_user(&self, dst: *mut c_void, size: u32, addr: u64) -> i64 {
        // SAFETY: dst has room for size bytes; the helper checks the source.
        unsafe { bpf_probe_read_user(dst, size, addr as *const c_void) }
    }
}

/// A task that is not running, reached from a sleepable task iterator.
pub struct OffCpu {
    pub task: *mut task_struct,
}

impl ThreadAccess for OffCpu {
    #[inline(always)]
    fn kernel_stack(&self, buf: *mut c_void, size: u32) -> i64 {
        // SAFETY: task is the iterator's trusted task pointer.
        unsafe { bpf_get_task_stack(self.task, buf, size, 0) }
    }

    #[inline(always)]
    fn read_user(&self, dst: *mut c_void, size: u32, addr: u64) -> i64 {
        // SAFETY: sleepable context; the helper faults pages in and checks addr.
        unsafe { bpf_copy_from_user_task(dst, size, addr as *const c_void, self.task, 0) }
    }
}

/// What the caller already knows about the stalled request.
pub struct Stall {
    pub tid: u32,
    pub state: u32,
    pub source: u32,
    pub off_cpu_since_ns: u64,
}

/// Captures `task` into one `StallEvent` and submits it. Returns false when
/// the ring buffer was full (the caller leaves the request unreported so the
/// next tick tries again).
#[inline(always)]
pub fn capture<A: ThreadAccess>(
    access: &A,
    task: *mut task_struct,
    inflight: &Inflight,
    stall: &Stall,
) -> bool {
    let Some(mut record) = EVENTS.reserve::<StallEvent>(0) else {
        count(stat::RINGBUF_FULL);
        return false;
    };
    let record_ptr = record.as_mut_ptr();
    // SAFETY: a reserved record; only its address is taken here.
    let event = unsafe { &raw mut (*record_ptr).header };
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer
    // record the size of StallEvent; every field written below lies in it.
    unsafe {
        (*event).kind = EVENT_STALL;
        (*event).source = stall.source;
        (*event).tid = stall.tid;
        (*event).tgid = inflight.tgid;
        (*event).target = inflight.target;
        (*event).state = stall.state;
        (*event).start_ns = inflight.start_ns;
        (*event).deadline_ns = inflight.deadline_ns;
        (*event).captured_ns = now_ns();
        (*event).off_cpu_since_ns = stall.off_cpu_since_ns;
        (*event).cpu = bpf_get_smp_processor_id();
        (*event).has_args = 0;
        if inflight.has_args != 0 {
            if let Some(args) = REQUEST_ARGS.get_ptr(stall.tid) {
                // Copied helper to record: the record is too big for the stack.
                let copied = generated::bpf_probe_read_kernel(
                    (&raw mut (*record_ptr).args).cast(),
                    size_of::<dogslow_common::RequestArgs>() as u32,
                    args.cast(),
                );
                if copied == 0 && (*record_ptr).args.start_ns == inflight.start_ns {
                    (*event).has_args = 1;
                }
            }
        }

        let regs = read_user_regs(task);
        if regs.sp == 0 {
            count(stat::REGS_UNREADABLE);
        }
        (*event).regs = regs;

        let offsets = OFFSETS.load();
        (*event).comm = read_field(task as u64, offsets.task_comm).unwrap_or([0; 16]);

        let written = access.kernel_stack(
            (*event).kernel_stack.as_mut_ptr().cast(),
            (MAX_KERNEL_FRAMES * 8) as u32,
        );
        (*event).kernel_frames = if written > 0 { (written / 8) as u32 } else { 0 };

        let (copied, error) = copy_user_stack(access, &mut (*record_ptr).user_stack, regs.sp);
        (*event).user_stack_len = copied;
        (*event).user_stack_error = error;

        (*event).return_slots_len = read_return_slots(task, &mut (*event).return_slots);
    }
    record.submit(0);
    true
}

/// The task's user registers as saved at its last kernel entry.
#[inline(always)]
fn read_user_regs(task: *mut task_struct) -> UserRegs {
    // SAFETY: task is a trusted task pointer; the helper returns its pt_regs.
    let regs_ptr = unsafe { bpf_task_pt_regs(task) } as *const pt_regs;
    // SAFETY: bpf_probe_read_kernel checks the address.
    match unsafe { bpf_probe_read_kernel(regs_ptr) } {
        Ok(regs) => UserRegs {
            ip: regs.rip,
            sp: regs.rsp,
            bp: regs.rbp,
            orig_ax: regs.orig_rax as i64,
        },
        Err(_) => UserRegs::default(),
    }
}

/// Copies up to `SETTINGS.user_stack_bytes` of user stack from `sp` upwards,
/// a page at a time so that the end of the stack mapping only shortens the
/// copy. Returns (bytes copied, negative errno of the read that stopped it).
#[inline(always)]
fn copy_user_stack<A: ThreadAccess>(
    access: &A,
    dst: &mut [u8; MAX_USER_STACK_COPY + dogslow_common::USER_STACK_SLACK],
    sp: u64,
) -> (u32, i32) {
    if sp == 0 {
        return (0, -14);
    }
    let mut want = SETTINGS.load().user_stack_bytes as usize;
    if want > MAX_USER_STACK_COPY {
        want = MAX_USER_STACK_COPY;
    }
    let mut copied: usize = 0;
    let mut error: i32 = 0;
    for _ in 0..(MAX_USER_STACK_COPY / PAGE_SIZE + 1) {
        if copied >= want {
            break;
        }
        let addr = sp + copied as u64;
        let mut chunk = PAGE_SIZE - (addr as usize & (PAGE_SIZE - 1));
        if chunk > want - copied {
            chunk = want - copied;
        }
        if chunk > PAGE_SIZE {
            chunk = PAGE_SIZE;
        }
        // copied < want <= MAX_USER_STACK_COPY, so the mask keeps its value
        // and shows the verifier the write stays inside `dst` (plus slack).
        let offset = copied & (MAX_USER_STACK_COPY - 1);
        // SAFETY: offset < MAX_USER_STACK_COPY and chunk <= PAGE_SIZE, and
        // dst holds MAX_USER_STACK_COPY + PAGE_SIZE bytes.
        let chunk_dst = unsafe { dst.as_mut_ptr().add(offset) };
        let ret = access.read_user(chunk_dst.cast(), chunk as u32, addr);
        if ret < 0 {
            error = ret as i32;
            break;
        }
        copied += chunk;
    }
    (copied as u32, error)
}

/// Walks the task's uretprobe return stack: each pending uretprobe replaced a
/// return address on the user stack with its trampoline, and the unwinder
/// needs the original.
#[inline(always)]
fn read_return_slots(
    task: *mut task_struct,
    slots: &mut [dogslow_common::ReturnSlot; MAX_RETURN_SLOTS],
) -> u32 {
    let offsets = OFFSETS.load();
    let utask: u64 = read_field(task as u64, offsets.task_utask).unwrap_or(0);
    let mut instance: u64 = read_field(utask, offsets.utask_return_instances).unwrap_or(0);
    let mut len = 0u32;
    for slot in slots.iter_mut() {
        if instance == 0 {
            break;
        }
        slot.stack = read_field(instance, offsets.return_instance_stack).unwrap_or(0);
        slot.orig_ret_vaddr =
            read_field(instance, offsets.return_instance_orig_ret_vaddr).unwrap_or(0);
        instance = read_field(instance, offsets.return_instance_next).unwrap_or(0);
        len += 1;
    }
    len
}
