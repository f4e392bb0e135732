//! Support for dogslow's root-only integration tests: start real target
//! programs and a real `dogslow` against the real kernel, and collect what
//! it reports.
pub mod container;
pub mod pg;
pub mod running_stalls;
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

pub mod smtp;

/// The dogslow binary under test: `$DOGSLOW_BIN` (set by `cargo xtask
/// test`), else the workspace's release build.
pub fn dogslow_bin() -> PathBuf {
    std::env::var_os("DOGSLOW_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/release/dogslow"))
}

/// A test program compiled by build.rs.
pub fn target_bin(name: &str) -> PathBuf {
    Path::new(env!("DOGSLOW_TEST_TARGETS")).join(name)
}

/// These tests load eBPF programs: they need root and a real kernel. They
/// fail (never skip) without them, so CI cannot pass by not running them.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the eBPF integration tests must run as root (cargo xtask test does)"
    );
    assert!(
        dogslow_bin().exists(),
        "{} is missing: run `cargo xtask build`",
        dogslow_bin().display()
    );
}

/// Lines a child writes to a pipe, collected by a thread.
#[derive(Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<String>>>);

impl Lines {
    pub fn collect(pipe: impl std::io::Read + Send + 'static) -> Self {
        let lines = Self::default();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                sink.0.lock().unwrap().push(line);
            }
        });
        lines
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits until a line satisfies `pred`; returns it.
    pub fn wait_for(&self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Option<String> {
        let until = Instant::now() + timeout;
        while Instant::now() < until {
            if let Some(line) = self.snapshot().into_iter().find(|l| pred(l)) {
                return Some(line);
            }
            thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

/// A program being watched.
pub struct Target {
    pub child: Child,
    pub stdout: Lines,
}

impl Target {
    /// Starts a test program; with `--wait` among `args` it waits for `go()`.
    pub fn spawn(name: &str, args: &[&str]) -> Self {
        Self::spawn_command(Command::new(target_bin(name)).args(args))
    }

    pub fn spawn_command(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {command:?}: {err}"));
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let target = Self { child, stdout };
        target.wait_until_loaded();
        target
    }

    /// Waits until the dynamic linker has mapped libc: until then the
    /// process's libraries (and, just after spawn, even its executable) are
    /// not all in its maps yet. Gives up quietly for static programs.
    fn wait_until_loaded(&self) {
        let maps = format!("/proc/{}/maps", self.child.id());
        for _ in 0..200 {
            if std::fs::read_to_string(&maps).is_ok_and(|text| text.contains("libc.so")) {
                return;
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Lets a `--wait` program start serving.
    pub fn go(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        stdin.write_all(b"go\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the program to exit; returns its stdout lines.
    pub fn finish(mut self, timeout: Duration) -> Vec<String> {
        let until = Instant::now() + timeout;
        loop {
            if self.child.try_wait().unwrap().is_some() {
                break;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                panic!("target did not finish within {timeout:?}");
            }
            thread::sleep(Duration::from_millis(20));
        }
        thread::sleep(Duration::from_millis(50));
        self.stdout.snapshot()
    }
}

impl Drop for Target {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running dogslow.
pub struct Agent {
    child: Child,
    pub stdout: Lines,
    pub stderr: Lines,
}

/// What a finished dogslow left.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<String>,
    pub stderr: String,
}

impl Finished {
    /// Every stdout line parsed as JSON (stdout carries reports only).
    pub fn reports(&self) -> Vec<Value> {
        self.stdout
            .iter()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|err| panic!("stdout line is not JSON ({err}): {line}"))
            })
            .collect()
    }

    pub fn stalls(&self) -> Vec<Value> {
        self.reports()
            .into_iter()
            .filter(|r| r["kind"] == "stall")
            .collect()
    }

    pub fn completions(&self) -> Vec<Value> {
        self.reports()
            .into_iter()
            .filter(|r| r["kind"] == "completed")
            .collect()
    }
}

impl Agent {
    /// Starts `dogslow ARGS` and waits until its probes are attached.
    pub fn start(args: &[&str]) -> Self {
        Self::start_with(&dogslow_bin(), args)
    }

    /// Starts another dogslow binary (the one taken out of the image).
    pub fn start_with(bin: &Path, args: &[&str]) -> Self {
        Self::start_command(Command::new(bin).args(args))
    }

    /// Starts dogslow through `command` (e.g. `setpriv ... dogslow ARGS`)
    /// and waits until its probes are attached.
    pub fn start_command(command: &mut Command) -> Self {
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start dogslow");
        let stdout = Lines::collect(child.stdout.take().unwrap());
        let stderr = Lines::collect(child.stderr.take().unwrap());
        let agent = Self {
            child,
            stdout,
            stderr,
        };
        // Only a fatal error ends the wait: diagnostics such as "cannot reach
        // the SMTP server" may come before "watching" and contain "error".
        let ready = agent.stderr.wait_for(Duration::from_secs(60), |l| {
            l.contains("dogslow: watching") || l.contains("dogslow: error")
        });
        match ready {
            Some(line) if line.contains("watching") => agent,
            _ => {
                let finished = agent.wait(Duration::from_secs(5));
                panic!("dogslow did not start: {}", finished.stderr);
            }
        }
    }

    /// Waits for dogslow to exit by itself.
    pub fn wait(mut self, timeout: Duration) -> Finished {
        let until = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > until {
                let _ = self.child.kill();
                let status = self.child.wait().unwrap();
                let stderr = self.stderr.snapshot().join("\n");
                panic!("dogslow did not exit within {timeout:?} ({status}); stderr:\n{stderr}");
            }
            thread::sleep(Duration::from_millis(20));
        };
        // Let the reader threads take the last lines.
        thread::sleep(Duration::from_millis(100));
        Finished {
            status,
            stdout: self.stdout.snapshot(),
            stderr: self.stderr.snapshot().join("\n"),
        }
    }

    /// Sends `signal` and waits for the exit.
    pub fn stop_with(self, signal: i32) -> Finished {
        // SAFETY: sending a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        self.wait(Duration::from_secs(30))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs dogslow to completion (for bad-input cases).
pub fn run_dogslow(args: &[&str]) -> Finished {
    run_dogslow_command(Command::new(dogslow_bin()).args(args))
}

pub fn run_dogslow_command(command: &mut Command) -> Finished {
    let output = command.stdin(Stdio::null()).output().expect("run dogslow");
    Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout)
            .lines()
            .map(str::to_owned)
            .collect(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// Function names of a report's stack (`user_stack` or `kernel_stack`).
pub fn functions(report: &Value, stack: &str) -> Vec<String> {
    report[stack]
        .as_array()
        .unwrap_or_else(|| panic!("report has no {stack}: {report}"))
        .iter()
        .map(|frame| frame["function"].as_str().unwrap_or("?").to_owned())
        .collect()
}

/// The frame of `function` in a report's user stack.
pub fn frame<'a>(report: &'a Value, function: &str) -> &'a Value {
    report["user_stack"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["function"] == function)
        .unwrap_or_else(|| panic!("no frame {function} in {}", report["user_stack"]))
}

/// Asserts `expected` appear in `names` in this order (innermost first),
/// other frames allowed between them.
pub fn assert_in_order(names: &[String], expected: &[&str]) {
    let mut rest = names.iter();
    for want in expected {
        assert!(
            rest.any(|name| name == want),
            "expected {expected:?} in order in the stack, got {names:?}"
        );
    }
}

/// Asserts each named frame has a source file ending in `file` and a line.
pub fn assert_source_lines(report: &Value, functions: &[&str], file: &str) {
    for function in functions {
        let frame = frame(report, function);
        let path = frame["file"].as_str().unwrap_or("");
        assert!(
            path.ends_with(file),
            "{function}: file {path:?} is not {file}: {frame}"
        );
        assert!(
            frame["line"].as_u64().unwrap_or(0) > 0,
            "{function} has no line: {frame}"
        );
    }
}

/// Parses `slow <i> <start_ns> <end_ns>` / `request ...` lines of the test programs.
pub fn timed_lines(lines: &[String], tag: &str) -> Vec<(u64, u64)> {
    lines
        .iter()
        .filter_map(|line| {
            let mut parts = line.split_whitespace();
            (parts.next()? == tag).then_some(())?;
            let _index = parts.next()?;
            Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
        })
        .collect()
}

/// Wall-clock ns of an RFC 3339 `time`/`started` field.
pub fn rfc3339_ns(value: &Value) -> u64 {
    let text = value
        .as_str()
        .unwrap_or_else(|| panic!("not a time: {value}"));
    let time = humantime::parse_rfc3339(text).unwrap_or_else(|err| panic!("{text}: {err}"));
    time.duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// The first byte of `function` as the live process `pid` has it, and as
/// the executable file has it. A uprobe shows as 0xCC (int3) in the live
/// process; after detach the two are equal again.
pub fn function_first_bytes(pid: u32, function: &str) -> (u8, u8) {
    use std::os::unix::fs::FileExt as _;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link");
    let nm = Command::new("nm")
        .arg(&exe)
        .output()
        .expect("nm (binutils) is needed");
    let vaddr = String::from_utf8_lossy(&nm.stdout)
        .lines()
        .find_map(|line| {
            let mut parts = line.split_whitespace();
            let addr = parts.next()?;
            let _kind = parts.next()?;
            (parts.next()? == function).then(|| u64::from_str_radix(addr, 16).ok())?
        })
        .unwrap_or_else(|| panic!("{function} not in {}", exe.display()));
    // gcc's PIE text: file offset == vaddr; the mapping of offset 0 is the base.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let base = maps
        .lines()
        .find(|l| {
            l.contains(exe.to_str().unwrap()) && l.split_whitespace().nth(2) == Some("00000000")
        })
        .and_then(|l| u64::from_str_radix(l.split('-').next()?, 16).ok())
        .expect("base mapping");
    let mut live = [0u8; 1];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap()
        .read_at(&mut live, base + vaddr)
        .unwrap();
    let mut file = [0u8; 1];
    std::fs::File::open(&exe)
        .unwrap()
        .read_at(&mut file, vaddr)
        .unwrap();
    (live[0], file[0])
}

/// What a program run under dogslow left: dogslow's output and the
/// program's own stdout lines.
pub struct Watched {
    pub dogslow: Finished,
    pub program: Vec<String>,
}

/// Starts `program PROGRAM_ARGS --wait`, attaches `dogslow attach --pid
/// <it> DOGSLOW_ARGS`, lets the program serve, and waits for both (dogslow
/// stops when its only process exits).
pub fn watch(program: &str, program_args: &[&str], dogslow_args: &[&str]) -> Watched {
    require_root();
    let mut args = program_args.to_vec();
    args.push("--wait");
    let mut target = Target::spawn(program, &args);
    let pid = target.pid().to_string();
    let mut attach = vec!["attach", "--pid", &pid];
    attach.extend_from_slice(dogslow_args);
    let agent = Agent::start(&attach);
    target.go();
    let program = target.finish(Duration::from_secs(60));
    let dogslow = agent.wait(Duration::from_secs(30));
    assert!(
        dogslow.status.success(),
        "dogslow failed: {}",
        dogslow.stderr
    );
    Watched { dogslow, program }
}
