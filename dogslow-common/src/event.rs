/// Records the eBPF programs write to the `EVENTS` ring buffer. Every record
/// starts with a `u32` kind.
pub const EVENT_STALL: u32 = 1;
pub const EVENT_COMPLETION: u32 = 2;

/// How many kernel frames a stall record holds.
pub const MAX_KERNEL_FRAMES: usize = 64;
/// Hard cap on the bytes of user stack a stall record carries.
pub const MAX_USER_STACK_COPY: usize = 64 * 1024;
/// Default number of user stack bytes copied at a stall.
pub const DEFAULT_USER_STACK_COPY: u32 = 32 * 1024;
/// Page-sized slack after the user stack copy: the copy loop reads up to a
/// page at a time and the verifier must see every read stay in the record.
pub const USER_STACK_SLACK: usize = 4096;
/// How many pending uretprobe returns a stall record can undo.
pub const MAX_RETURN_SLOTS: usize = 16;
/// Length of `task_struct::comm`.
pub const COMM_LEN: usize = 16;

/// `StallEvent::state`: the thread was on a CPU or runnable.
pub const STATE_RUNNING: u32 = 1;
/// `StallEvent::state`: the thread was off-CPU, waiting.
pub const STATE_BLOCKED: u32 = 2;

/// `StallEvent::source`: caught on-CPU by the cpu-clock sampler.
pub const SOURCE_SAMPLER: u32 = 1;
/// `StallEvent::source`: caught off-CPU by the deadline task iterator.
pub const SOURCE_OFF_CPU: u32 = 2;

/// The user registers a stall needs for unwinding, from the thread's
/// `pt_regs` (its state at kernel entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UserRegs {
    pub ip: u64,
    pub sp: u64,
    pub bp: u64,
    /// `orig_ax`: the system call number when the thread is inside one, else negative.
    pub orig_ax: i64,
}
const _: () = assert!(core::mem::size_of::<UserRegs>() == 32);

/// A return address a uretprobe replaced with its trampoline: the stack slot
/// that holds the trampoline address and the caller address it stands for.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReturnSlot {
    pub stack: u64,
    pub orig_ret_vaddr: u64,
}
const _: () = assert!(core::mem::size_of::<ReturnSlot>() == 16);

/// A stall capture: where a request's thread is at (or just after) its
/// deadline. The user stack copy follows the header in the same record;
/// `user_stack_len` says how much of it is valid.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StallEvent {
    pub header: StallHeader,
    /// Valid when `header.has_args` is non-zero.
    pub args: crate::RequestArgs,
    pub user_stack: [u8; MAX_USER_STACK_COPY + USER_STACK_SLACK],
}

/// The fixed part of a [`StallEvent`].
#[repr(C)]
#[derive(Clone, Copy)]
pub struct StallHeader {
    pub kind: u32,
    pub source: u32,
    pub tid: u32,
    pub tgid: u32,
    pub target: u32,
    pub state: u32,
    pub start_ns: u64,
    pub deadline_ns: u64,
    pub captured_ns: u64,
    /// When the thread switched out, for blocked captures; else 0.
    pub off_cpu_since_ns: u64,
    pub regs: UserRegs,
    pub cpu: u32,
    /// Number of valid entries in `kernel_stack`.
    pub kernel_frames: u32,
    /// Number of valid bytes in `user_stack`, copied from `regs.sp` upwards.
    pub user_stack_len: u32,
    /// Negative errno of the read that ended the stack copy early, or 0.
    pub user_stack_error: i32,
    /// Number of valid entries in `return_slots`.
    pub return_slots_len: u32,
    /// Non-zero when `StallEvent::args` holds the request's arguments.
    pub has_args: u32,
    pub comm: [u8; COMM_LEN],
    pub return_slots: [ReturnSlot; MAX_RETURN_SLOTS],
    pub kernel_stack: [u64; MAX_KERNEL_FRAMES],
}
/// Size of a [`StallHeader`].
pub const STALL_HEADER_LEN: usize = 128 + 16 * MAX_RETURN_SLOTS + 8 * MAX_KERNEL_FRAMES;
/// Offset of the captured arguments inside a [`StallEvent`].
pub const STALL_ARGS_OFFSET: usize = STALL_HEADER_LEN;
/// Offset of the user stack bytes inside a [`StallEvent`].
pub const STALL_STACK_OFFSET: usize = STALL_HEADER_LEN + core::mem::size_of::<crate::RequestArgs>();
const _: () = assert!(core::mem::size_of::<StallHeader>() == STALL_HEADER_LEN);
const _: () = assert!(core::mem::offset_of!(StallEvent, args) == STALL_ARGS_OFFSET);
const _: () = assert!(core::mem::offset_of!(StallEvent, user_stack) == STALL_STACK_OFFSET);
const _: () = assert!(
    core::mem::size_of::<StallEvent>()
        == STALL_STACK_OFFSET + MAX_USER_STACK_COPY + USER_STACK_SLACK
);

/// `CompletionEvent::outcome` values.
pub const OUTCOME_RETURNED: u32 = 1;
pub const OUTCOME_THREAD_EXITED: u32 = 2;
pub const OUTCOME_PROCESS_EXITED: u32 = 3;
pub const OUTCOME_KILLED: u32 = 4;
/// Exit-scoped requests only: the thread entered the entry probe again before
/// reaching the exit probe, so the earlier request was abandoned.
pub const OUTCOME_ABANDONED: u32 = 5;
/// The thread called `execve` mid-request.
pub const OUTCOME_EXECED: u32 = 6;

/// A reported request ended.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CompletionEvent {
    pub kind: u32,
    pub outcome: u32,
    pub tid: u32,
    pub tgid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    /// The fatal signal for `OUTCOME_KILLED`, else 0.
    pub signal: u32,
    /// The thread's raw `exit_code` for exits, else 0.
    pub exit_code: u32,
}
const _: () = assert!(core::mem::size_of::<CompletionEvent>() == 40);
