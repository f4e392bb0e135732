/// Per-target settings read by the entry probe (value of the `TARGETS`
/// array, indexed by the probe's attach cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TargetConfig {
    /// Deadline after the request starts, in nanoseconds.
    pub timeout_ns: u64,
    /// Bit set of `TARGET_*` flags.
    pub flags: u32,
    /// Number of valid entries in `captures`.
    pub capture_count: u32,
    pub captures: [crate::CaptureSpec; crate::MAX_CAPTURES],
}
const _: () = assert!(core::mem::size_of::<TargetConfig>() == 16 + 32 * crate::MAX_CAPTURES);

/// The request ends when the entry function returns (a uretprobe), so nested
/// and recursive calls count into `depth`.
pub const TARGET_FUNCTION_SCOPED: u32 = 1;

/// Maximum number of targets (probe sets) one agent drives.
pub const MAX_TARGETS: u32 = 64;

/// Kernel structure offsets the eBPF programs need, read from the running
/// kernel's BTF by the agent at load time (no CO-RE in Rust eBPF).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_on_cpu: u32,
    pub task_exit_code: u32,
    pub task_signal: u32,
    pub signal_flags: u32,
    pub task_comm: u32,
    /// `task_struct::utask`, the per-task uprobe state.
    pub task_utask: u32,
    /// `uprobe_task::return_instances`, the uretprobe return stack.
    pub utask_return_instances: u32,
    pub return_instance_stack: u32,
    pub return_instance_orig_ret_vaddr: u32,
    pub return_instance_next: u32,
}
const _: () = assert!(core::mem::size_of::<KernelOffsets>() == 48);

impl KernelOffsets {
    /// All zero: the value compiled into the object, replaced at load.
    pub const UNSET: Self = Self {
        task_pid: 0,
        task_tgid: 0,
        task_on_cpu: 0,
        task_exit_code: 0,
        task_signal: 0,
        signal_flags: 0,
        task_comm: 0,
        task_utask: 0,
        utask_return_instances: 0,
        return_instance_stack: 0,
        return_instance_orig_ret_vaddr: 0,
        return_instance_next: 0,
    };
}

/// Tunables the agent sets as globals before load.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureSettings {
    /// Bytes of the user stack copied at a stall, at most [`crate::MAX_USER_STACK_COPY`].
    pub user_stack_bytes: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<CaptureSettings>() == 8);
