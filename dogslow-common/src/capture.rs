/// Request arguments captured at entry (`--capture`): where each comes
/// from, and the per-request record that holds them.
///
/// How many arguments a target may capture.
pub const MAX_CAPTURES: usize = 4;
/// The longest string a capture keeps (upper bound of `--capture-len`).
pub const MAX_CAPTURE_STR: usize = 512;
/// A string capture's buffer: room to read one byte past the kept length
/// (to tell a truncated string from one that fits) plus the NUL, rounded.
pub const CAPTURE_STR_BUF: usize = MAX_CAPTURE_STR + 8;
/// Registers in x86-64 `struct pt_regs`.
pub const PT_REGS_COUNT: usize = 21;

/// `CaptureSpec::location`: unused slot.
pub const CAPTURE_NONE: u32 = 0;
/// The value is register `register`.
pub const CAPTURE_REGISTER: u32 = 1;
/// The value is in user memory at register `register` + `offset`.
pub const CAPTURE_MEMORY: u32 = 2;
/// The value is the constant `offset`.
pub const CAPTURE_CONSTANT: u32 = 3;

/// Where one captured argument comes from at the entry probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CaptureSpec {
    pub location: u32,
    /// Index of the register in `struct pt_regs` (byte offset / 8).
    pub register: u32,
    /// Size of the value in bytes: 1, 2, 4 or 8.
    pub size: u32,
    /// Non-zero: sign-extend the value from `size` bytes.
    pub signed: u32,
    /// Non-zero: the value points at a NUL-terminated string to copy.
    pub string: u32,
    /// For strings, how many bytes to keep (at most [`MAX_CAPTURE_STR`]).
    pub max_len: u32,
    /// Displacement for `CAPTURE_MEMORY`, the value for `CAPTURE_CONSTANT`.
    pub offset: i64,
}
const _: () = assert!(core::mem::size_of::<CaptureSpec>() == 32);

/// The arguments of one request, keyed by thread in `REQUEST_ARGS` and
/// copied into its stall report.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestArgs {
    /// The request's `start_ns`, so a stale record is never mistaken for
    /// the current request's.
    pub start_ns: u64,
    /// Each capture's value (for strings, the pointer).
    pub values: [u64; MAX_CAPTURES],
    /// For strings: the bytes read before the NUL (more than the kept
    /// length means truncated), or a negative errno.
    pub lens: [i32; MAX_CAPTURES],
    pub strings: [[u8; CAPTURE_STR_BUF]; MAX_CAPTURES],
}
const _: () = assert!(core::mem::size_of::<RequestArgs>() == 56 + 4 * CAPTURE_STR_BUF);
