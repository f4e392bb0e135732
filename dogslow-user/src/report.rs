//! The report model: what a stall report and a completion record say, and
//! their JSON form (one object per line; fields are only ever added).
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::symbolize::Frame;

/// One stack frame as JSON.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FrameJson {
    pub addr: String,
    pub function: Option<String>,
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    pub inlined: bool,
}

impl From<&Frame> for FrameJson {
    fn from(frame: &Frame) -> Self {
        Self {
            addr: format!("{:#x}", frame.addr),
            function: frame.function.clone(),
            offset: frame.offset,
            file: frame.file.clone(),
            line: frame.line,
            module: frame.module.clone(),
            inlined: frame.inlined,
        }
    }
}

/// The system call a blocked thread is in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Syscall {
    pub nr: i64,
    pub name: Option<&'static str>,
}

impl Syscall {
    /// From `pt_regs.orig_ax`: negative means "not in a system call".
    pub fn from_orig_ax(orig_ax: i64) -> Option<Self> {
        if orig_ax < 0 {
            return None;
        }
        Some(Self {
            nr: orig_ax,
            name: syscalls::Sysno::new(orig_ax as usize).map(|sysno| sysno.name()),
        })
    }
}

/// A request that ran past its deadline, and where its thread was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StallReport {
    pub kind: &'static str,
    pub id: String,
    pub time: String,
    pub started: String,
    pub elapsed_ms: u64,
    pub timeout_ms: u64,
    pub host: String,
    pub pid: u32,
    pub tid: u32,
    pub ppid: u32,
    pub ns_pid: Option<u32>,
    pub ns_tid: Option<u32>,
    pub comm: String,
    pub thread: String,
    pub exe: String,
    pub cgroup: Option<String>,
    /// The container (from the cgroup path) and pod, when there is one.
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub pod: Option<String>,
    pub pod_namespace: Option<String>,
    pub target: String,
    pub entry: String,
    /// Arguments captured at the request's entry (`--capture`), by name.
    /// From untrusted traffic: strings are escaped, but sinks that put them
    /// in headers or terminals must still treat them as hostile.
    pub request: Option<serde_json::Map<String, serde_json::Value>>,
    pub state: &'static str,
    pub blocked_ms: Option<u64>,
    pub syscall: Option<Syscall>,
    pub cpu: u32,
    pub fingerprint: String,
    pub user_stack: Vec<FrameJson>,
    pub user_stack_unwinder: &'static str,
    pub user_stack_truncated: bool,
    pub user_stack_truncated_reason: Option<String>,
    pub kernel_stack: Vec<FrameJson>,
}

impl StallReport {
    /// A complete, plausible report for tests (the sinks' and their
    /// integration tests against real servers); not used at run time.
    #[doc(hidden)]
    pub fn example() -> Self {
        let frame = |addr: u64, function: &str, line: u32| FrameJson {
            addr: format!("{addr:#x}"),
            function: Some(function.into()),
            offset: Some(0x24),
            file: Some("/src/slow_requests.c".into()),
            line: Some(line),
            module: Some("/usr/bin/slow_requests".into()),
            inlined: false,
        };
        Self {
            kind: "stall",
            id: "1a2b3c4d5e6f7081".into(),
            time: "2026-05-16T02:10:12.345Z".into(),
            started: "2026-05-16T02:10:12.033Z".into(),
            elapsed_ms: 312,
            timeout_ms: 300,
            host: "web-1".into(),
            pid: 4242,
            tid: 4243,
            ppid: 1,
            ns_pid: None,
            ns_tid: None,
            comm: "slow_requests".into(),
            thread: "worker-1".into(),
            exe: "/usr/bin/slow_requests".into(),
            cgroup: Some("/system.slice/app.service".into()),
            container_id: None,
            pod_uid: None,
            pod: None,
            pod_namespace: None,
            target: "handle_request".into(),
            entry: "handle_request".into(),
            state: "running",
            blocked_ms: None,
            syscall: None,
            cpu: 1,
            fingerprint: "00c0ffee00c0ffee".into(),
            user_stack: vec![
                frame(0x5555_5555_5189, "spin_for", 30),
                frame(0x5555_5555_5210, "handle_request", 44),
                frame(0x5555_5555_5280, "dispatch", 58),
                frame(0x5555_5555_5300, "serve_forever", 69),
                frame(0x5555_5555_5400, "main", 90),
            ],
            user_stack_unwinder: "dwarf",
            user_stack_truncated: false,
            user_stack_truncated_reason: None,
            kernel_stack: vec![],
            request: None,
        }
    }
}

/// A reported request ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CompletionReport {
    pub kind: &'static str,
    pub id: String,
    pub time: String,
    pub host: String,
    pub pid: u32,
    pub tid: u32,
    /// The target the request belongs to (as in its stall report).
    pub target: String,
    pub duration_ms: u64,
    pub outcome: &'static str,
    pub signal: Option<u32>,
}

/// Anything dogslow writes as a report line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    Stall(Box<StallReport>),
    Completed(CompletionReport),
}

impl Report {
    /// The report as one line of JSON.
    pub fn to_json_line(&self) -> String {
        let json = match self {
            Self::Stall(stall) => serde_json::to_string(stall),
            Self::Completed(done) => serde_json::to_string(done),
        };
        // Serializing these plain structs cannot fail; keep a line anyway.
        json.unwrap_or_else(|err| format!("{{\"kind\":\"error\",\"error\":\"{err}\"}}"))
    }
}

/// RFC 3339 UTC with milliseconds.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

/// Nanoseconds to whole milliseconds, rounding down.
pub fn ns_to_ms(ns: u64) -> u64 {
    ns / 1_000_000
}

/// Converts between the kernel's `CLOCK_BOOTTIME` and wall-clock time.
#[derive(Clone, Copy, Debug)]
pub struct Clock;

impl Clock {
    /// Now, in `CLOCK_BOOTTIME` nanoseconds (the eBPF time base).
    pub fn boot_ns() -> u64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid out-pointer; CLOCK_BOOTTIME always exists on Linux.
        unsafe { libc::clock_gettime(libc::CLOCK_BOOTTIME, &mut ts) };
        ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
    }

    /// The wall-clock time of a `CLOCK_BOOTTIME` instant.
    pub fn wall(boot_ns: u64) -> SystemTime {
        let now_boot = Self::boot_ns();
        let now = SystemTime::now();
        if boot_ns <= now_boot {
            now - Duration::from_nanos(now_boot - boot_ns)
        } else {
            now + Duration::from_nanos(boot_ns - now_boot)
        }
    }
}

/// FNV-1a, 64 bit: a stable hash for ids and fingerprints (stable across
/// runs and versions, unlike `DefaultHasher`).
pub fn fnv1a(parts: &[&[u8]]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for &byte in *part {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // Separator so ("ab","c") and ("a","bc") differ.
        hash ^= 0xff;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash
}

/// A report id unique across hosts and boots: the boot id, thread and start.
pub fn report_id(boot_id: &str, tid: u32, start_ns: u64) -> String {
    format!(
        "{:016x}",
        fnv1a(&[
            boot_id.as_bytes(),
            &tid.to_le_bytes(),
            &start_ns.to_le_bytes()
        ])
    )
}

/// How many frames from the top make a fingerprint.
const FINGERPRINT_FRAMES: usize = 5;

/// Groups reports that stalled the same way: the program, the state and the
/// top frames of the program's own code. Addresses and paths differ across
/// processes and hosts; library and vDSO frames and inlined helpers differ
/// with where exactly a sample landed (`clock_gettime` or the loop calling
/// it), so they count only when the program has no frames of its own.
pub fn fingerprint(exe: &str, state: &str, frames: &[Frame]) -> String {
    let program = exe.rsplit('/').next().unwrap_or(exe);
    let named = |frame: &&Frame| frame.function.is_some() && !frame.inlined;
    let own: Vec<&Frame> = frames
        .iter()
        .filter(named)
        .filter(|f| f.module.as_deref().is_some_and(|m| m == exe))
        .collect();
    let chosen: Vec<&Frame> = if own.is_empty() {
        frames.iter().filter(named).collect()
    } else {
        own
    };
    let mut parts: Vec<&[u8]> = vec![program.as_bytes(), state.as_bytes()];
    parts.extend(
        chosen
            .iter()
            .filter_map(|f| f.function.as_deref())
            .take(FINGERPRINT_FRAMES)
            .map(str::as_bytes),
    );
    format!("{:016x}", fnv1a(&parts))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(function: &str) -> Frame {
        Frame {
            addr: 0x1000,
            function: Some(function.into()),
            offset: Some(4),
            file: Some("/src/demo.c".into()),
            line: Some(12),
            module: Some("/usr/bin/demo".into()),
            inlined: false,
        }
    }

    fn stall() -> StallReport {
        StallReport {
            kind: "stall",
            id: report_id("boot", 7, 1),
            time: rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(1_500)),
            started: rfc3339(SystemTime::UNIX_EPOCH),
            elapsed_ms: 1500,
            timeout_ms: 300,
            host: "h".into(),
            pid: 6,
            tid: 7,
            ppid: 1,
            ns_pid: None,
            ns_tid: None,
            comm: "demo".into(),
            thread: "demo".into(),
            exe: "/usr/bin/demo".into(),
            cgroup: None,
            container_id: None,
            pod_uid: None,
            pod: None,
            pod_namespace: None,
            target: "demo".into(),
            entry: "handle_request".into(),
            request: None,
            state: "running",
            blocked_ms: None,
            syscall: None,
            cpu: 0,
            fingerprint: fingerprint("/usr/bin/demo", "running", &[frame("spin")]),
            user_stack: vec![FrameJson::from(&frame("spin"))],
            user_stack_unwinder: "dwarf",
            user_stack_truncated: false,
            user_stack_truncated_reason: None,
            kernel_stack: vec![],
        }
    }

    #[test]
    fn stall_json_has_documented_fields() {
        let line = Report::Stall(Box::new(stall())).to_json_line();
        assert!(!line.contains('\n'));
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["kind"], "stall");
        assert_eq!(value["time"], "1970-01-01T00:00:01.500Z");
        assert_eq!(value["started"], "1970-01-01T00:00:00.000Z");
        assert_eq!(value["elapsed_ms"], 1500);
        assert_eq!(value["state"], "running");
        let frame = &value["user_stack"][0];
        assert_eq!(frame["addr"], "0x1000");
        assert_eq!(frame["function"], "spin");
        assert_eq!(frame["offset"], 4);
        assert_eq!(frame["file"], "/src/demo.c");
        assert_eq!(frame["line"], 12);
        assert_eq!(frame["module"], "/usr/bin/demo");
        assert!(value["ns_pid"].is_null());
        assert!(value["kernel_stack"].as_array().unwrap().is_empty());
        assert!(value["request"].is_null());
    }

    #[test]
    fn completion_json() {
        let line = Report::Completed(CompletionReport {
            kind: "completed",
            id: "abc".into(),
            time: rfc3339(SystemTime::UNIX_EPOCH),
            host: "h".into(),
            pid: 1,
            tid: 2,
            target: "handle_request".into(),
            duration_ms: 2000,
            outcome: "killed",
            signal: Some(9),
        })
        .to_json_line();
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["kind"], "completed");
        assert_eq!(value["outcome"], "killed");
        assert_eq!(value["signal"], 9);
        assert_eq!(value["duration_ms"], 2000);
    }

    #[test]
    fn ids_are_stable_and_distinct() {
        assert_eq!(report_id("b", 1, 2), report_id("b", 1, 2));
        assert_ne!(report_id("b", 1, 2), report_id("b", 1, 3));
        assert_ne!(report_id("b", 1, 2), report_id("c", 1, 2));
        assert_eq!(report_id("b", 1, 2).len(), 16);
    }

    #[test]
    fn fingerprint_ignores_where_in_a_loop_the_sample_landed() {
        let exe = "/usr/bin/demo";
        let own = |function: &str| frame(function);
        let library = |function: &str| Frame {
            module: Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into()),
            ..frame(function)
        };
        let inlined = |function: &str| Frame {
            inlined: true,
            ..frame(function)
        };
        let in_loop = [own("spin_for"), own("handle_request"), own("main")];
        let in_libc = [
            library("clock_gettime"),
            library("__GI___clock_gettime"),
            inlined("now_ns"),
            own("spin_for"),
            own("handle_request"),
            own("main"),
        ];
        assert_eq!(
            fingerprint(exe, "running", &in_loop),
            fingerprint(exe, "running", &in_libc)
        );
        // A program with no frames of its own still groups by what it has.
        let only_libc = [library("epoll_wait"), library("__libc_start_main")];
        assert_ne!(
            fingerprint(exe, "blocked", &only_libc),
            fingerprint(exe, "blocked", &[])
        );
    }

    #[test]
    fn fingerprint_ignores_addresses_and_paths_but_not_state() {
        let a = fingerprint("/a/bin/demo", "running", &[frame("spin"), frame("main")]);
        let mut moved = frame("spin");
        moved.addr = 0x9999;
        let b = fingerprint("/other/demo", "running", &[moved, frame("main")]);
        assert_eq!(a, b);
        assert_ne!(
            a,
            fingerprint("/a/bin/demo", "blocked", &[frame("spin"), frame("main")])
        );
    }

    #[test]
    fn syscall_names() {
        assert_eq!(Syscall::from_orig_ax(-1), None);
        let read = Syscall::from_orig_ax(0).unwrap();
        assert_eq!(read.name, Some("read"));
        assert_eq!(Syscall::from_orig_ax(45).unwrap().name, Some("recvfrom"));
    }

    #[test]
    fn boot_clock_maps_to_now() {
        let wall = Clock::wall(Clock::boot_ns());
        let drift = SystemTime::now().duration_since(wall).unwrap_or_default();
        assert!(drift < Duration::from_secs(1));
    }
}
