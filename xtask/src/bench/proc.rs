//! The processes a benchmark starts: spawned with a parent-death signal so
//! that none outlives the bench however it ends, stopped on drop, with their
//! output collected line by line and stamped with the time it was read.
use std::{
    io::{BufRead as _, BufReader, Read, Write as _},
    os::unix::process::CommandExt as _,
    process::{Child, ChildStdin, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context as _, Result, bail};

/// Set by SIGINT/SIGTERM: every wait gives up, and the guards clean up.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turns SIGINT and SIGTERM into a flag the waits check, so an interrupted
/// bench unwinds through its guards instead of leaving processes behind.
pub fn install_signal_handlers() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(signal, on_signal as *const () as libc::sighandler_t) };
    }
}

pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// Sleeps, waking early (with an error) when interrupted.
pub fn sleep(duration: Duration) -> Result<()> {
    let until = Instant::now() + duration;
    loop {
        check_interrupted()?;
        let now = Instant::now();
        if now >= until {
            return Ok(());
        }
        thread::sleep((until - now).min(Duration::from_millis(50)));
    }
}

/// Wall-clock now, in nanoseconds since the epoch (what reports and the
/// bench target's start lines use).
pub fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// One line a child wrote, with when the bench read it.
#[derive(Clone, Debug)]
pub struct Line {
    pub read_ns: u64,
    pub text: String,
}

#[derive(Default)]
struct LinesState {
    lines: Vec<Line>,
    closed: bool,
}

/// Lines of one pipe, collected by a thread as they arrive.
#[derive(Clone, Default)]
pub struct Lines(Arc<(Mutex<LinesState>, Condvar)>);

impl Lines {
    fn collect(pipe: impl Read + Send + 'static) -> Self {
        let lines = Self::default();
        let shared = lines.clone();
        thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut text = String::new();
            loop {
                text.clear();
                match reader.read_line(&mut text) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        let line = Line {
                            read_ns: realtime_ns(),
                            text: text.trim_end_matches('\n').to_owned(),
                        };
                        let (state, ready) = &*shared.0;
                        if let Ok(mut state) = state.lock() {
                            state.lines.push(line);
                        }
                        ready.notify_all();
                    }
                }
            }
            let (state, ready) = &*shared.0;
            if let Ok(mut state) = state.lock() {
                state.closed = true;
            }
            ready.notify_all();
        });
        lines
    }

    pub fn snapshot(&self) -> Vec<Line> {
        self.0.0.lock().map(|s| s.lines.clone()).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.0.0.lock().map(|s| s.lines.len()).unwrap_or(0)
    }

    /// Waits for the first line from index `from` on that satisfies `pred`;
    /// returns its index and the line.
    pub fn wait_for(
        &self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Line)> {
        let until = Instant::now() + timeout;
        let (state, ready) = &*self.0;
        let mut guard = state
            .lock()
            .map_err(|_| anyhow::anyhow!("line collector poisoned"))?;
        loop {
            if let Some((index, line)) = guard
                .lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| pred(&l.text))
            {
                return Ok((index, line.clone()));
            }
            if guard.closed {
                bail!("the process closed its output before {what}");
            }
            check_interrupted()?;
            let now = Instant::now();
            if now >= until {
                bail!("timed out after {timeout:?} waiting for {what}");
            }
            let wait = (until - now).min(Duration::from_millis(100));
            guard = ready
                .wait_timeout(guard, wait)
                .map_err(|_| anyhow::anyhow!("line collector poisoned"))?
                .0;
        }
    }

    /// The last lines, for error messages.
    pub fn tail(&self, count: usize) -> String {
        let lines = self.snapshot();
        let start = lines.len().saturating_sub(count);
        lines[start..]
            .iter()
            .map(|l| l.text.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// How a child is started.
#[derive(Clone, Copy, Debug, Default)]
pub struct SpawnOptions {
    /// Signal that stops it (also its parent-death signal); SIGTERM if unset.
    pub stop_signal: Option<i32>,
    /// Run as this user and group (postgres refuses to run as root).
    pub credentials: Option<(libc::uid_t, libc::gid_t)>,
    /// Run on this CPU only (children inherit it).
    pub cpu: Option<usize>,
}

/// A child process that is stopped when dropped.
pub struct Proc {
    pub name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    pub stdout: Lines,
    pub stderr: Lines,
    stop_signal: i32,
    exited: Option<ExitStatus>,
}

impl Proc {
    pub fn spawn(name: &str, command: &mut Command) -> Result<Self> {
        Self::spawn_with(name, command, SpawnOptions::default())
    }

    pub fn spawn_with(name: &str, command: &mut Command, options: SpawnOptions) -> Result<Self> {
        let stop_signal = options.stop_signal.unwrap_or(libc::SIGTERM);
        let credentials = options.credentials;
        let cpu = options.cpu;
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls.
        unsafe {
            command.pre_exec(move || {
                if let Some((uid, gid)) = credentials
                    && (libc::setgroups(0, std::ptr::null()) != 0
                        || libc::setgid(gid) != 0
                        || libc::setuid(uid) != 0)
                {
                    return Err(std::io::Error::last_os_error());
                }
                if let Some(cpu) = cpu {
                    // SAFETY: a zeroed cpu_set_t is a valid empty set.
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(cpu, &mut set);
                    if libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                // After setuid, which clears it: the child dies with the bench.
                if libc::prctl(libc::PR_SET_PDEATHSIG, stop_signal as libc::c_ulong) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("cannot start {name} ({command:?})"))?;
        let stdout = Lines::collect(child.stdout.take().context("child stdout")?);
        let stderr = Lines::collect(child.stderr.take().context("child stderr")?);
        let stdin = child.stdin.take();
        Ok(Self {
            name: name.to_owned(),
            child,
            stdin,
            stdout,
            stderr,
            stop_signal,
            exited: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Writes one line to the child's stdin.
    pub fn send(&mut self, line: &str) -> Result<()> {
        let stdin = self
            .stdin
            .as_mut()
            .with_context(|| format!("{}: stdin is closed", self.name))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|err| anyhow::anyhow!("stopped reading its input ({err}): {}", self.why()))
    }

    /// "NAME exited with …; stderr: …" or "NAME still running", for error
    /// messages.
    pub fn why(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("{} exited with {status}", self.name),
            _ => format!("{} still running", self.name),
        };
        let tail = self.stderr.tail(8);
        if tail.is_empty() {
            status
        } else {
            format!("{status}; stderr:\n{tail}")
        }
    }

    /// Waits for a stdout line from index `from` on matching `pred`.
    pub fn wait_stdout(
        &mut self,
        from: usize,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Line)> {
        let result = self.stdout.wait_for(from, timeout, what, pred);
        result.map_err(|err| anyhow::anyhow!("{err} ({})", self.why()))
    }

    /// Waits for a stderr line matching `pred`.
    pub fn wait_stderr(
        &mut self,
        timeout: Duration,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line> {
        let result = self.stderr.wait_for(0, timeout, what, pred);
        result
            .map(|(_, line)| line)
            .map_err(|err| anyhow::anyhow!("{err} ({})", self.why()))
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends the stop signal and waits (then SIGKILL after `grace`).
    pub fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Some(status) = self.exited {
            return Some(status);
        }
        self.stdin = None;
        if let Ok(Some(status)) = self.child.try_wait() {
            self.exited = Some(status);
            return Some(status);
        }
        // SAFETY: signals our own child, which has not been reaped.
        unsafe { libc::kill(self.child.id() as libc::pid_t, self.stop_signal) };
        let until = Instant::now() + grace;
        while Instant::now() < until {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exited = Some(status);
                return Some(status);
            }
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let status = self.child.wait().ok();
        self.exited = status;
        status
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(5));
    }
}

/// CPU time (user + system) of every thread of `pid`, in nanoseconds:
/// `/proc/PID/task/*/schedstat` (nanosecond resolution), else
/// `/proc/PID/stat` (clock ticks).
pub fn cpu_ns(pid: u32) -> Result<u64> {
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        let mut total = 0u64;
        let mut found = false;
        for task in tasks.flatten() {
            let path = task.path().join("schedstat");
            if let Ok(text) = std::fs::read_to_string(&path)
                && let Some(Ok(ns)) = text.split_whitespace().next().map(str::parse::<u64>)
            {
                total += ns;
                found = true;
            }
        }
        if found {
            return Ok(total);
        }
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("process {pid} is gone"))?;
    // Fields after the command name, which may hold spaces: utime is the 14th
    // field of the line, the 12th after ") ".
    let after = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok((ticks(11) + ticks(12)) * 1_000_000_000 / hz)
}

/// Peak resident set size of `pid` (`VmHWM`), in KiB.
pub fn peak_rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")
}

/// Resident KiB of `pid`'s mappings of BPF maps (`anon_inode:bpf-map`, the
/// ring buffer): kernel memory mapped for reading, counted in its RSS.
pub fn bpf_map_rss_kib(pid: u32) -> Result<u64> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mut in_bpf_map = false;
    let mut total = 0;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if first.contains('-') && !first.ends_with(':') {
            // A mapping header: "start-end perms offset dev inode [name]".
            in_bpf_map = line
                .split_whitespace()
                .nth(5)
                .is_some_and(|n| n.starts_with("anon_inode:bpf"));
        } else if first == "Rss:" && in_bpf_map {
            total += fields
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// Runs a command to completion and returns its stdout, failing with its
/// stderr. For setup steps (compilers, initdb), not for measured processes.
pub fn output(command: &mut Command) -> Result<String> {
    let out = command
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !out.status.success() {
        bail!(
            "{command:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}
