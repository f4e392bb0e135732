//! Decoding ring buffer records into owned values. Every record is length
//! checked and read with `read_unaligned`; nothing is transmuted.
use dogslow_common::{
    CompletionEvent, EVENT_COMPLETION, EVENT_STALL, MAX_KERNEL_FRAMES, MAX_RETURN_SLOTS,
    MAX_USER_STACK_COPY, OUTCOME_ABANDONED, OUTCOME_EXECED, OUTCOME_KILLED, OUTCOME_PROCESS_EXITED,
    OUTCOME_RETURNED, OUTCOME_THREAD_EXITED, RequestArgs, ReturnSlot, SOURCE_OFF_CPU,
    SOURCE_SAMPLER, STALL_ARGS_OFFSET, STALL_STACK_OFFSET, STATE_BLOCKED, STATE_RUNNING,
    StallHeader, UserRegs,
};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {len} bytes is too short for its kind {kind}")]
    Truncated { kind: u32, len: usize },
    #[error("record of {len} bytes has no kind")]
    NoKind { len: usize },
    #[error("unknown record kind {0}")]
    UnknownKind(u32),
    #[error("unknown {field} value {value}")]
    BadValue { field: &'static str, value: u32 },
}

/// Whether the thread was running or waiting when captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadState {
    Running,
    Blocked,
}

impl ThreadState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Blocked => "blocked",
        }
    }
}

impl TryFrom<u32> for ThreadState {
    type Error = DecodeError;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            STATE_RUNNING => Ok(Self::Running),
            STATE_BLOCKED => Ok(Self::Blocked),
            value => Err(DecodeError::BadValue {
                field: "state",
                value,
            }),
        }
    }
}

/// Which kernel path took the capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaptureSource {
    Sampler,
    OffCpu,
}

impl TryFrom<u32> for CaptureSource {
    type Error = DecodeError;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            SOURCE_SAMPLER => Ok(Self::Sampler),
            SOURCE_OFF_CPU => Ok(Self::OffCpu),
            value => Err(DecodeError::BadValue {
                field: "source",
                value,
            }),
        }
    }
}

/// How a reported request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Returned,
    ThreadExited,
    ProcessExited,
    Killed,
    Abandoned,
    Execed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Returned => "returned",
            Self::ThreadExited => "thread_exited",
            Self::ProcessExited => "process_exited",
            Self::Killed => "killed",
            Self::Abandoned => "abandoned",
            Self::Execed => "execed",
        }
    }
}

impl TryFrom<u32> for Outcome {
    type Error = DecodeError;
    fn try_from(value: u32) -> Result<Self, Self::Error> {
        match value {
            OUTCOME_RETURNED => Ok(Self::Returned),
            OUTCOME_THREAD_EXITED => Ok(Self::ThreadExited),
            OUTCOME_PROCESS_EXITED => Ok(Self::ProcessExited),
            OUTCOME_KILLED => Ok(Self::Killed),
            OUTCOME_ABANDONED => Ok(Self::Abandoned),
            OUTCOME_EXECED => Ok(Self::Execed),
            value => Err(DecodeError::BadValue {
                field: "outcome",
                value,
            }),
        }
    }
}

/// A stall capture, owned, with only the valid part of the stack copy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StallCapture {
    pub source: CaptureSource,
    pub tid: u32,
    pub pid: u32,
    pub target: u32,
    pub state: ThreadState,
    pub start_ns: u64,
    pub deadline_ns: u64,
    pub captured_ns: u64,
    pub off_cpu_since_ns: Option<u64>,
    pub regs: UserRegs,
    pub cpu: u32,
    pub comm: String,
    /// Kernel frames, innermost first.
    pub kernel_stack: Vec<u64>,
    /// The user stack from `regs.sp` upwards.
    pub user_stack: Vec<u8>,
    /// Negative errno that ended the stack copy early, or 0.
    pub user_stack_error: i32,
    pub return_slots: Vec<ReturnSlot>,
    /// The request's captured arguments, when its target has `--capture`.
    pub args: Option<Box<RequestArgs>>,
}

/// A reported request that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    pub outcome: Outcome,
    pub tid: u32,
    pub pid: u32,
    pub start_ns: u64,
    pub end_ns: u64,
    pub signal: Option<u32>,
}

/// A decoded ring buffer record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Stall(Box<StallCapture>),
    Completion(Completion),
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Result<Event, DecodeError> {
    let kind_bytes: [u8; 4] = bytes
        .get(..4)
        .and_then(|b| b.try_into().ok())
        .ok_or(DecodeError::NoKind { len: bytes.len() })?;
    match u32::from_ne_bytes(kind_bytes) {
        EVENT_STALL => decode_stall(bytes).map(|stall| Event::Stall(Box::new(stall))),
        EVENT_COMPLETION => decode_completion(bytes).map(Event::Completion),
        kind => Err(DecodeError::UnknownKind(kind)),
    }
}

/// Reads a `T` from the start of `bytes` after checking the length.
fn read_record<T: Copy>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    if bytes.len() < size_of::<T>() {
        return Err(DecodeError::Truncated {
            kind,
            len: bytes.len(),
        });
    }
    // SAFETY: the length was checked; T is a plain-data `#[repr(C)]` record
    // from dogslow-common for which every bit pattern is valid, and the read
    // tolerates any alignment.
    Ok(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

fn decode_stall(bytes: &[u8]) -> Result<StallCapture, DecodeError> {
    let event: StallHeader = read_record(bytes, EVENT_STALL)?;
    let stack_len = (event.user_stack_len as usize).min(MAX_USER_STACK_COPY);
    let args = if event.has_args != 0 {
        let args_bytes = bytes.get(STALL_ARGS_OFFSET..).unwrap_or_default();
        Some(Box::new(read_record::<RequestArgs>(
            args_bytes,
            EVENT_STALL,
        )?))
    } else {
        None
    };
    let user_stack = bytes
        .get(STALL_STACK_OFFSET..STALL_STACK_OFFSET + stack_len)
        .ok_or(DecodeError::Truncated {
            kind: EVENT_STALL,
            len: bytes.len(),
        })?
        .to_vec();
    let frames = (event.kernel_frames as usize).min(MAX_KERNEL_FRAMES);
    let slots = (event.return_slots_len as usize).min(MAX_RETURN_SLOTS);
    let comm_len = event
        .comm
        .iter()
        .position(|&b| b == 0)
        .unwrap_or(event.comm.len());
    Ok(StallCapture {
        source: CaptureSource::try_from(event.source)?,
        tid: event.tid,
        pid: event.tgid,
        target: event.target,
        state: ThreadState::try_from(event.state)?,
        start_ns: event.start_ns,
        deadline_ns: event.deadline_ns,
        captured_ns: event.captured_ns,
        off_cpu_since_ns: (event.off_cpu_since_ns != 0).then_some(event.off_cpu_since_ns),
        regs: event.regs,
        cpu: event.cpu,
        comm: String::from_utf8_lossy(&event.comm[..comm_len]).into_owned(),
        kernel_stack: event.kernel_stack[..frames].to_vec(),
        user_stack,
        user_stack_error: event.user_stack_error,
        return_slots: event.return_slots[..slots].to_vec(),
        args,
    })
}

fn decode_completion(bytes: &[u8]) -> Result<Completion, DecodeError> {
    let event: CompletionEvent = read_record(bytes, EVENT_COMPLETION)?;
    let outcome = Outcome::try_from(event.outcome)?;
    Ok(Completion {
        outcome,
        tid: event.tid,
        pid: event.tgid,
        start_ns: event.start_ns,
        end_ns: event.end_ns,
        signal: (outcome == Outcome::Killed).then_some(event.signal),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn as_bytes<T: Copy>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-data value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    #[test]
    fn completion_round_trip() {
        let event = CompletionEvent {
            kind: EVENT_COMPLETION,
            outcome: OUTCOME_KILLED,
            tid: 11,
            tgid: 10,
            start_ns: 100,
            end_ns: 900,
            signal: 9,
            exit_code: 9,
        };
        let decoded = decode(&as_bytes(&event)).unwrap();
        assert_eq!(
            decoded,
            Event::Completion(Completion {
                outcome: Outcome::Killed,
                tid: 11,
                pid: 10,
                start_ns: 100,
                end_ns: 900,
                signal: Some(9),
            })
        );
    }

    #[test]
    fn stall_round_trip_keeps_only_valid_stack() {
        // SAFETY: all-zero is a valid StallEvent.
        let mut record: Box<dogslow_common::StallEvent> =
            unsafe { Box::new_zeroed().assume_init() };
        let event = &mut record.header;
        event.kind = EVENT_STALL;
        event.source = SOURCE_SAMPLER;
        event.tid = 7;
        event.tgid = 6;
        event.state = STATE_RUNNING;
        event.start_ns = 1;
        event.deadline_ns = 2;
        event.captured_ns = 3;
        event.regs = UserRegs {
            ip: 0x1000,
            sp: 0x7ff0,
            bp: 0,
            orig_ax: -1,
        };
        event.kernel_frames = 2;
        event.kernel_stack[0] = 0xffff_ffff_8100_0000;
        event.kernel_stack[1] = 0xffff_ffff_8100_0010;
        event.user_stack_len = 16;
        event.comm[..4].copy_from_slice(b"demo");
        event.return_slots_len = 1;
        event.return_slots[0] = ReturnSlot {
            stack: 0x7ff8,
            orig_ret_vaddr: 0x1234,
        };
        record.user_stack[..16].copy_from_slice(&[0xab; 16]);
        // The ring buffer hands over the whole record.
        let bytes = as_bytes(&*record);
        let Event::Stall(stall) = decode(&bytes).unwrap() else {
            panic!("not a stall");
        };
        assert_eq!(stall.tid, 7);
        assert_eq!(stall.pid, 6);
        assert_eq!(stall.state, ThreadState::Running);
        assert_eq!(stall.comm, "demo");
        assert_eq!(
            stall.kernel_stack,
            vec![0xffff_ffff_8100_0000, 0xffff_ffff_8100_0010]
        );
        assert_eq!(stall.user_stack, vec![0xab; 16]);
        assert_eq!(stall.off_cpu_since_ns, None);
        assert_eq!(stall.return_slots.len(), 1);
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert_eq!(decode(&[1, 0]), Err(DecodeError::NoKind { len: 2 }));
        assert_eq!(
            decode(&[1, 0, 0, 0, 5]),
            Err(DecodeError::Truncated {
                kind: EVENT_STALL,
                len: 5
            })
        );
        assert_eq!(decode(&[99, 0, 0, 0]), Err(DecodeError::UnknownKind(99)));
    }

    #[test]
    fn rejects_bad_enum_values() {
        let event = CompletionEvent {
            kind: EVENT_COMPLETION,
            outcome: 77,
            ..Default::default()
        };
        assert_eq!(
            decode(&as_bytes(&event)),
            Err(DecodeError::BadValue {
                field: "outcome",
                value: 77
            })
        );
    }
}
