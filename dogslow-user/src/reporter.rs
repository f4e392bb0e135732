//! The reporting thread: turns captures into reports (dedup, unwind,
//! symbolize, describe the process) and hands them to the sinks, in the
//! order the kernel produced them. Owns everything that is not `Sync`.
use std::{
    collections::{HashMap, VecDeque},
    panic::{self, AssertUnwindSafe},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use crate::{
    events::{Completion, Event, StallCapture, ThreadState},
    metrics::Metrics,
    procfs::{self, ProcessInfo},
    report::{
        Clock, CompletionReport, FrameJson, Report, StallReport, Syscall, fingerprint, ns_to_ms,
        rfc3339,
    },
    request_args::{self, CaptureRequest},
    sinks::SinkSet,
    symbolize::Symbolizer,
    tracker::Tracker,
    unwind::StackUnwinder,
};

/// What the reporter needs to know about each target (index = cookie).
#[derive(Clone, Debug)]
pub struct TargetInfo {
    pub name: String,
    pub entry: String,
    pub timeout: Duration,
    pub captures: Vec<CaptureRequest>,
    pub capture_len: u32,
}

/// Work for the reporting thread.
pub enum Message {
    /// A kernel target slot (attach cookie) and what it stands for; sent
    /// before any probe can report through it.
    Target(u32, TargetInfo),
    Event(Event),
    /// A process was seen for the first time: cache what symbolizing it
    /// needs, in case it exits before its reports are written.
    ProcessSeen(u32),
    /// A watched process exited: release its caches once late records
    /// about it have had time to arrive.
    ProcessGone(u32),
    /// New report destinations (the config file was reloaded).
    Sinks(Box<SinkSet>),
}

impl Message {
    /// What the message is about, for an error message.
    fn describe(&self) -> String {
        match self {
            Self::Target(slot, _) => format!("target slot {slot}"),
            Self::Event(Event::Stall(capture)) => format!(
                "the stall of thread {} of process {} (its report is lost)",
                capture.tid, capture.pid
            ),
            Self::Event(Event::Completion(completion)) => format!(
                "the completion of thread {} of process {}",
                completion.tid, completion.pid
            ),
            Self::ProcessSeen(pid) => format!("new process {pid}"),
            Self::ProcessGone(pid) => format!("exited process {pid}"),
            Self::Sinks(_) => "reloaded outputs".to_owned(),
        }
    }
}

/// How long a dead process's caches are kept for records still in flight.
const FORGET_AFTER: Duration = Duration::from_secs(30);

pub struct Reporter {
    targets: HashMap<u32, TargetInfo>,
    host: String,
    unwinder: StackUnwinder,
    symbolizer: Symbolizer,
    tracker: Tracker,
    processes: HashMap<u32, ProcessInfo>,
    /// Exited processes whose caches go at the given time.
    gone: VecDeque<(Instant, u32)>,
    sinks: SinkSet,
    metrics: Metrics,
}

/// Process descriptions kept for processes that may exit before their
/// completion is written; pruned to live processes past this size.
const PROCESS_CACHE_LIMIT: usize = 4096;

impl Reporter {
    pub fn new(sinks: SinkSet, metrics: Metrics) -> Self {
        Self {
            targets: HashMap::new(),
            host: procfs::host_name(),
            unwinder: StackUnwinder::new(),
            symbolizer: Symbolizer::new(),
            tracker: Tracker::new(procfs::boot_id(), 1 << 16),
            processes: HashMap::new(),
            gone: VecDeque::new(),
            sinks,
            metrics,
        }
    }

    /// Starts a reporter on its own thread (the symbolizer is not `Send`, so
    /// it is built there); runs until the channel closes, then finishes the
    /// sinks.
    pub fn spawn(
        sinks: SinkSet,
        metrics: Metrics,
        messages: mpsc::Receiver<Message>,
    ) -> thread::JoinHandle<()> {
        thread::Builder::new()
            .name("dogslow-report".into())
            .spawn(move || {
                let mut reporter = Self::new(sinks, metrics);
                reporter.symbolizer.warm_kernel();
                for message in messages {
                    let what = message.describe();
                    // A bug met on one record (a damaged binary, say) must
                    // not end every later report.
                    let handled =
                        panic::catch_unwind(AssertUnwindSafe(|| reporter.handle(message)));
                    if handled.is_err() {
                        eprintln!(
                            "dogslow: internal error while handling {what} (a dogslow bug; \
                             please report it with the message above); continuing"
                        );
                    }
                }
                reporter.sinks.finish();
            })
            .unwrap_or_else(|err| {
                eprintln!("dogslow: cannot start the reporting thread: {err}");
                std::process::exit(1)
            })
    }

    pub fn handle(&mut self, message: Message) {
        self.forget_exited();
        match message {
            Message::Target(slot, info) => {
                self.targets.insert(slot, info);
            }
            Message::ProcessSeen(pid) => {
                self.process(pid);
                self.symbolizer.warm_process(pid);
                self.unwinder.refresh_process(pid);
            }
            Message::ProcessGone(pid) => self.gone.push_back((Instant::now() + FORGET_AFTER, pid)),
            Message::Sinks(sinks) => {
                // A reload changed the destinations: the old ones finish
                // (pending mail included) before the new ones take over.
                let mut old = std::mem::replace(&mut self.sinks, *sinks);
                old.finish();
            }
            Message::Event(Event::Stall(capture)) => {
                if let Some(report) = self.stall(&capture) {
                    self.metrics.stall(&report.target, report.state);
                    self.emit(&Report::Stall(Box::new(report)));
                }
            }
            Message::Event(Event::Completion(completion)) => {
                if let Some(report) = self.completion(&completion) {
                    self.metrics.completion(report.outcome);
                    self.emit(&Report::Completed(report));
                }
            }
        }
    }

    /// Drops the caches of processes that exited long enough ago.
    fn forget_exited(&mut self) {
        let now = Instant::now();
        while let Some(&(when, pid)) = self.gone.front() {
            if when > now {
                break;
            }
            self.gone.pop_front();
            // The PID may be in use again: keep the caches only if it is
            // the process last described under it (a watched process that
            // took the PID was described when it was seen); another one
            // must not keep a dead process's caches alive.
            let described_lives = self
                .processes
                .get(&pid)
                .is_some_and(|known| procfs::start_ticks(pid) == Some(known.start_ticks));
            if described_lives {
                continue;
            }
            self.symbolizer.forget_process(pid);
            self.unwinder.forget_process(pid);
            self.processes.remove(&pid);
        }
    }

    fn emit(&mut self, report: &Report) {
        self.sinks.emit(report);
    }

    /// The process's description: fresh from /proc while it lives, the
    /// last one seen after it exits.
    fn process(&mut self, pid: u32) -> ProcessInfo {
        match procfs::process_info(pid) {
            Ok(info) => {
                if self.processes.len() >= PROCESS_CACHE_LIMIT {
                    self.processes.retain(|&pid, _| procfs::process_exists(pid));
                }
                self.processes.insert(pid, info.clone());
                info
            }
            Err(_) => self.processes.get(&pid).cloned().unwrap_or(ProcessInfo {
                pid,
                ..Default::default()
            }),
        }
    }

    fn stall(&mut self, capture: &StallCapture) -> Option<StallReport> {
        let id = self.tracker.on_stall(capture)?;
        let process = self.process(capture.pid);
        self.symbolizer.cache_process(capture.pid);
        let unwound = self.unwinder.unwind(capture);
        let mut user_frames = self.symbolizer.user_frames(capture.pid, &unwound.frames);
        // Name modules as the process maps them (blazesym names the
        // /proc/PID/map_files link it read them through).
        for frame in &mut user_frames {
            if let Some(module) = self.unwinder.module_name(capture.pid, frame.addr) {
                frame.module = Some(module.to_owned());
            }
        }
        let kernel_frames = self.symbolizer.kernel_frames(&capture.kernel_stack);
        let target = self.targets.get(&capture.target);
        let state = capture.state.as_str();
        let blocked_ms = match (capture.state, capture.off_cpu_since_ns) {
            (ThreadState::Blocked, Some(since)) => {
                Some(ns_to_ms(capture.captured_ns.saturating_sub(since)))
            }
            _ => None,
        };
        Some(StallReport {
            kind: "stall",
            id,
            time: rfc3339(Clock::wall(capture.captured_ns)),
            started: rfc3339(Clock::wall(capture.start_ns)),
            elapsed_ms: ns_to_ms(capture.captured_ns.saturating_sub(capture.start_ns)),
            timeout_ms: target.map_or(0, |t| t.timeout.as_millis() as u64),
            host: self.host.clone(),
            pid: capture.pid,
            tid: capture.tid,
            ppid: process.ppid,
            ns_pid: process.ns_pid,
            ns_tid: procfs::thread_ns_tid(capture.pid, capture.tid),
            comm: process.comm.clone(),
            thread: capture.comm.clone(),
            exe: process.exe.clone(),
            cgroup: process.cgroup.clone(),
            container_id: process.kube.container_id.clone(),
            pod_uid: process.kube.pod_uid.clone(),
            pod: process.kube.pod.clone(),
            pod_namespace: process.kube.namespace.clone(),
            target: target.map_or_else(String::new, |t| t.name.clone()),
            entry: target.map_or_else(String::new, |t| t.entry.clone()),
            request: match (target, &capture.args) {
                (Some(target), Some(args)) => Some(request_args::render(
                    &target.captures,
                    args,
                    target.capture_len,
                )),
                _ => None,
            },
            state,
            blocked_ms,
            syscall: Syscall::from_orig_ax(capture.regs.orig_ax),
            cpu: capture.cpu,
            fingerprint: fingerprint(&process.exe, state, &user_frames),
            user_stack: user_frames.iter().map(FrameJson::from).collect(),
            user_stack_unwinder: unwound.method,
            user_stack_truncated: unwound.truncated.is_some(),
            user_stack_truncated_reason: unwound.truncated,
            kernel_stack: kernel_frames.iter().map(FrameJson::from).collect(),
        })
    }

    fn completion(&mut self, completion: &Completion) -> Option<CompletionReport> {
        let reported = self.tracker.on_completion(completion)?;
        Some(CompletionReport {
            kind: "completed",
            id: reported.id,
            time: rfc3339(Clock::wall(completion.end_ns)),
            host: self.host.clone(),
            pid: reported.pid,
            tid: completion.tid,
            target: self
                .targets
                .get(&reported.target)
                .map_or_else(String::new, |t| t.name.clone()),
            duration_ms: ns_to_ms(completion.end_ns.saturating_sub(completion.start_ns)),
            outcome: completion.outcome.as_str(),
            signal: completion.signal,
        })
    }
}
