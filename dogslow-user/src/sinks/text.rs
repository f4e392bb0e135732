//! The human report, in the spirit of the original Dogslow's mail
//! ("Undead request intercepted at: ..."), and the small pieces the other
//! sinks share: the program's name, the top meaningful frame, a one-line
//! summary of the request, and escaping of untrusted text.
//!
//! Everything a report carries may come from the target (its thread names,
//! captured request arguments, even symbol names): text that reaches a
//! terminal or a mail reader has its control characters escaped, so a
//! request cannot move the cursor, rewrite earlier lines or reorder text.
use std::{borrow::Cow, fmt::Write as _};

use crate::report::{CompletionReport, FrameJson, Report, StallReport};

/// The text form of any report; ends with a newline.
pub fn render(report: &Report) -> String {
    match report {
        Report::Stall(stall) => render_stall(stall),
        Report::Completed(done) => render_completion(done),
    }
}

/// The full text report of a stall.
pub fn render_stall(report: &StallReport) -> String {
    let mut out = String::with_capacity(2048);
    // Writing to a String cannot fail: the results are ignored below.
    let _ = writeln!(out, "Undead request intercepted at: {}", report.time);
    out.push('\n');
    match &report.request {
        Some(request) if !request.is_empty() => {
            let _ = writeln!(out, "Request ({}):", printable(&report.target));
            for (name, value) in request {
                let _ = writeln!(out, "  {}: {}", printable(name), value_text(value));
            }
        }
        _ => {
            let _ = writeln!(
                out,
                "Request:     {} (no request arguments captured)",
                printable(&report.target)
            );
        }
    }
    let field = |out: &mut String, name: &str, value: &str| {
        let _ = writeln!(out, "{:<13}{}", format!("{name}:"), value);
    };
    field(&mut out, "Host", &printable(&report.host));
    field(
        &mut out,
        "Program",
        &format!(
            "{} (comm {}, thread {})",
            printable(&report.exe),
            printable(&report.comm),
            printable(&report.thread)
        ),
    );
    field(&mut out, "Process ID", &with_ns(report.pid, report.ns_pid));
    field(&mut out, "Thread ID", &with_ns(report.tid, report.ns_tid));
    field(&mut out, "Parent PID", &report.ppid.to_string());
    field(&mut out, "Started", &report.started);
    field(
        &mut out,
        "Elapsed",
        &format!(
            "{} ms (deadline {} ms)",
            report.elapsed_ms, report.timeout_ms
        ),
    );
    field(&mut out, "State", &state_text(report));
    field(
        &mut out,
        "Entry",
        &format!(
            "{} (target {})",
            printable(&report.entry),
            printable(&report.target)
        ),
    );
    if let Some(cgroup) = &report.cgroup {
        field(&mut out, "Cgroup", &printable(cgroup));
    }
    field(&mut out, "Report ID", &report.id);
    field(&mut out, "Fingerprint", &report.fingerprint);

    out.push('\n');
    let _ = writeln!(
        out,
        "User stack (innermost first, unwound with {}):",
        report.user_stack_unwinder
    );
    write_frames(&mut out, &report.user_stack);
    if report.user_stack_truncated {
        let _ = writeln!(
            out,
            "  ... truncated: {}",
            printable(
                report
                    .user_stack_truncated_reason
                    .as_deref()
                    .unwrap_or("the walk stopped early")
            )
        );
    }
    out.push('\n');
    if report.kernel_stack.is_empty() {
        let _ = writeln!(out, "Kernel stack: (none captured)");
    } else {
        let _ = writeln!(out, "Kernel stack (innermost first):");
        write_frames(&mut out, &report.kernel_stack);
    }
    out
}

/// A completion record: one line.
pub fn render_completion(done: &CompletionReport) -> String {
    let outcome = match (done.outcome, done.signal) {
        ("killed", Some(signal)) => format!("killed by {}", signal_name(signal)),
        (outcome, _) => outcome.replace('_', " "),
    };
    format!(
        "Request {} (host {}, PID {}, TID {}) ended at {}: {} after {} ms\n",
        done.id,
        printable(&done.host),
        done.pid,
        done.tid,
        done.time,
        outcome,
        done.duration_ms
    )
}

fn with_ns(id: u32, ns_id: Option<u32>) -> String {
    match ns_id {
        Some(ns_id) => format!("{id} ({ns_id} in its PID namespace)"),
        None => id.to_string(),
    }
}

fn state_text(report: &StallReport) -> String {
    let mut text = match (report.state, report.blocked_ms) {
        ("blocked", Some(ms)) => format!("blocked (off CPU for {ms} ms)"),
        ("running", _) => format!("running (on CPU {})", report.cpu),
        (state, _) => state.to_owned(),
    };
    if let Some(syscall) = &report.syscall {
        match syscall.name {
            Some(name) => {
                let _ = write!(text, " in {name}(2)");
            }
            None => {
                let _ = write!(text, " in system call {}", syscall.nr);
            }
        }
    }
    text
}

fn write_frames(out: &mut String, frames: &[FrameJson]) {
    if frames.is_empty() {
        let _ = writeln!(out, "  (no frames)");
    }
    for (index, frame) in frames.iter().enumerate() {
        let _ = write!(out, "  #{index:<2} {:>18}  ", frame.addr);
        match &frame.function {
            Some(function) => {
                let _ = write!(out, "{}", printable(function));
                if let Some(offset) = frame.offset {
                    let _ = write!(out, "+{offset:#x}");
                }
            }
            None => out.push_str("??"),
        }
        if frame.inlined {
            out.push_str(" [inlined]");
        }
        if let Some(file) = &frame.file {
            let _ = write!(out, " at {}", printable(file));
            if let Some(line) = frame.line {
                let _ = write!(out, ":{line}");
            }
        }
        if let Some(module) = &frame.module {
            let _ = write!(out, " ({})", printable(base_name(module)));
        }
        out.push('\n');
    }
}

/// A request argument's value: strings as they are (escaped), the rest as JSON.
fn value_text(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(text) => printable(text).into_owned(),
        other => other.to_string(),
    }
}

/// The last path component.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/')
        .find(|part| !part.is_empty())
        .unwrap_or(path)
}

/// The program's name: the executable's file name, else its `comm`.
pub fn program(report: &StallReport) -> &str {
    let exe = base_name(&report.exe);
    if exe.is_empty() { &report.comm } else { exe }
}

/// Libraries whose frames say how a thread waits, not why: the C runtime,
/// the dynamic loader, the vDSO.
const RUNTIME_LIBRARIES: &[&str] = &[
    "libc.so",
    "libc-",
    "ld-linux",
    "ld-musl",
    "libpthread",
    "libm.so",
    "libdl.so",
    "librt.so",
    "libstdc++",
    "libgcc_s",
    "[vdso]",
    "linux-vdso",
];

/// The innermost frame that says where the program itself is: the first
/// named frame in the executable, else the first outside the C runtime,
/// else the first named frame. A thread blocked in `recv` is reported
/// "in handle_request", not "in recv", which the state already says.
pub fn top_frame(report: &StallReport) -> Option<&FrameJson> {
    let named = || report.user_stack.iter().filter(|f| f.function.is_some());
    let exe = base_name(&report.exe);
    named()
        .find(|f| {
            !exe.is_empty()
                && f.module
                    .as_deref()
                    .is_some_and(|module| base_name(module) == exe)
        })
        .or_else(|| {
            named().find(|f| {
                let module = f.module.as_deref().map_or("", base_name);
                !RUNTIME_LIBRARIES
                    .iter()
                    .any(|runtime| module.starts_with(runtime))
            })
        })
        .or_else(|| named().next())
}

/// The request in one line: the captured arguments as `name=value`, else
/// the target's name. Not escaped: callers escape for where it goes.
pub fn request_summary(report: &StallReport) -> String {
    match &report.request {
        Some(request) if !request.is_empty() => request
            .iter()
            .map(|(name, value)| match value {
                serde_json::Value::String(text) => format!("{name}={text}"),
                other => format!("{name}={other}"),
            })
            .collect::<Vec<_>>()
            .join(" "),
        _ => report.target.clone(),
    }
}

/// Characters that change how the text around them reads: bidirectional
/// overrides and isolates ("Trojan Source"), and zero-width joiners.
fn is_format_trick(c: char) -> bool {
    matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// `text` with control and bidi characters escaped (`\n`, `\r`, `\t`,
/// `\u{1b}`); other Unicode kept. For terminals, files and mail bodies.
pub fn printable(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || is_format_trick(c)) {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        push_escaped(&mut out, c, |c| !c.is_control() && !is_format_trick(c));
    }
    Cow::Owned(out)
}

/// `text` as printable ASCII only, at most `max_chars` long (then cut with
/// `...`): CR, LF and everything outside `' '..='~'` escaped. For mail
/// headers, where a CR/LF would start a new header and non-ASCII would need
/// an encoding that hides what was there.
pub fn header_safe(text: &str, max_chars: usize) -> String {
    let mut out = String::with_capacity(text.len().min(max_chars) + 8);
    for c in text.chars() {
        let before = out.len();
        push_escaped(&mut out, c, |c| matches!(c, ' '..='~'));
        if out.len() > max_chars {
            out.truncate(before);
            out.push_str("...");
            break;
        }
    }
    out
}

fn push_escaped(out: &mut String, c: char, keep: impl Fn(char) -> bool) {
    match c {
        c if keep(c) => out.push(c),
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c => {
            let _ = write!(out, "\\u{{{:x}}}", u32::from(c));
        }
    }
}

fn signal_name(signal: u32) -> String {
    const NAMES: &[&str] = &[
        "", "SIGHUP", "SIGINT", "SIGQUIT", "SIGILL", "SIGTRAP", "SIGABRT", "SIGBUS", "SIGFPE",
        "SIGKILL", "SIGUSR1", "SIGSEGV", "SIGUSR2", "SIGPIPE", "SIGALRM", "SIGTERM",
    ];
    match NAMES.get(signal as usize) {
        Some(name) if !name.is_empty() => format!("{name} ({signal})"),
        _ => format!("signal {signal}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Syscall;

    #[test]
    fn stall_text_reads_like_dogslow() {
        let mut report = StallReport::example();
        report.kernel_stack = vec![FrameJson {
            addr: "0xffffffff81000000".into(),
            function: Some("schedule".into()),
            offset: Some(0x10),
            file: None,
            line: None,
            module: None,
            inlined: false,
        }];
        let text = render_stall(&report);
        assert!(
            text.starts_with("Undead request intercepted at: 2026-05-16T02:10:12.345Z\n"),
            "{text}"
        );
        for want in [
            "Request:     handle_request (no request arguments captured)",
            "Host:        web-1",
            "Process ID:  4242",
            "Thread ID:   4243",
            "Parent PID:  1",
            "Started:     2026-05-16T02:10:12.033Z",
            "Elapsed:     312 ms (deadline 300 ms)",
            "State:       running (on CPU 1)",
            "spin_for+0x24 at /src/slow_requests.c:30 (slow_requests)",
            "#4 ",
            "main+0x24 at /src/slow_requests.c:90",
            "Kernel stack (innermost first):",
            "schedule+0x10",
        ] {
            assert!(text.contains(want), "missing {want:?} in:\n{text}");
        }
        // Innermost first.
        assert!(text.find("spin_for").unwrap() < text.find("serve_forever").unwrap());
    }

    #[test]
    fn blocked_state_names_the_wait() {
        let mut report = StallReport::example();
        report.state = "blocked";
        report.blocked_ms = Some(305);
        report.syscall = Syscall::from_orig_ax(45);
        assert!(
            render_stall(&report)
                .contains("State:       blocked (off CPU for 305 ms) in recvfrom(2)")
        );
    }

    #[test]
    fn request_arguments_are_listed_and_escaped() {
        let mut report = StallReport::example();
        let mut request = serde_json::Map::new();
        request.insert("line".into(), "GET /x\r\nBcc: x@evil\u{1b}[2J".into());
        request.insert("size".into(), 42.into());
        report.request = Some(request);
        let text = render_stall(&report);
        assert!(text.contains("Request (handle_request):\n"), "{text}");
        assert!(
            text.contains("  line: GET /x\\r\\nBcc: x@evil\\u{1b}[2J\n"),
            "{text}"
        );
        assert!(text.contains("  size: 42\n"));
        assert!(!text.contains('\r') && !text.contains('\u{1b}'));
    }

    #[test]
    fn completion_is_one_line() {
        let done = CompletionReport {
            kind: "completed",
            id: "abc".into(),
            time: "t".into(),
            host: "h".into(),
            pid: 1,
            tid: 2,
            target: "handle_request".into(),
            duration_ms: 2000,
            outcome: "killed",
            signal: Some(9),
        };
        assert_eq!(
            render_completion(&done),
            "Request abc (host h, PID 1, TID 2) ended at t: killed by SIGKILL (9) after 2000 ms\n"
        );
    }

    #[test]
    fn top_frame_skips_the_c_runtime() {
        let mut report = StallReport::example();
        assert_eq!(
            top_frame(&report).unwrap().function.as_deref(),
            Some("spin_for")
        );
        report.exe = "/opt/other".into();
        let mut recv = report.user_stack[0].clone();
        recv.function = Some("recv".into());
        recv.module = Some("/usr/lib/x86_64-linux-gnu/libc.so.6".into());
        report.user_stack.insert(0, recv);
        assert_eq!(
            top_frame(&report).unwrap().function.as_deref(),
            Some("spin_for")
        );
    }

    #[test]
    fn header_safe_is_printable_ascii_and_bounded() {
        assert_eq!(header_safe("plain text", 100), "plain text");
        assert_eq!(header_safe("a\r\nBcc: x@evil", 100), "a\\r\\nBcc: x@evil");
        assert_eq!(header_safe("caf\u{e9}", 100), "caf\\u{e9}");
        assert_eq!(header_safe("abcdefgh", 5), "abcde...");
        let cut = header_safe(&"\n".repeat(50), 9);
        assert_eq!(cut, "\\n\\n\\n\\n...");
        assert!(header_safe("\u{202e}x\u{7f}", 100).is_ascii());
    }

    #[test]
    fn printable_keeps_unicode_but_not_controls() {
        assert!(matches!(printable("café"), Cow::Borrowed("café")));
        assert_eq!(printable("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        assert_eq!(printable("x\u{202e}y"), "x\\u{202e}y");
    }

    #[test]
    fn text_stream_writes_each_report() {
        use crate::sinks::{ReportStream, Sink as _};
        let mut sink = ReportStream::text(Vec::new());
        sink.emit(&Report::Stall(Box::new(StallReport::example())));
        let text = String::from_utf8(sink.into_inner()).unwrap();
        assert!(text.starts_with("Undead request intercepted at:"));
        assert!(text.ends_with("\n\n"));
    }
}
