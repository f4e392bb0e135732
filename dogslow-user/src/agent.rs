//! The agent: checks, resolves and attaches the targets, then runs the event
//! loop (ring buffer, deadline scan, process watch, signals) until told to
//! stop, and drains every captured report before returning.
use std::{path::PathBuf, sync::mpsc, thread, time::Duration};

use dogslow_common::stat;
use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{self, Instant, MissedTickBehavior},
};

use crate::{
    config::AgentConfig,
    config_file, events,
    loader::{AttachError, LoadError, LoadOptions, Probes},
    metrics::{self, Metrics, MetricsError},
    privileges::{self, PrivilegeError},
    procfs::ProcError,
    report::Clock,
    reporter::{Message, Reporter},
    sinks::{SinkError, SinkSet, smtp::PASSWORD_ENV},
    targets::TargetError,
    tracker::{needs_off_cpu_capture, needs_sampling, next_scan_in},
    watch::Watcher,
};

#[derive(Debug, Error)]
pub enum AgentError {
    #[error(transparent)]
    Privileges(#[from] PrivilegeError),
    #[error("target `{target}`: {source}")]
    Target {
        target: String,
        #[source]
        source: TargetError,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("{0}")]
    Unsupported(String),
    #[error("event loop: {0}")]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Sinks(#[from] SinkError),
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    #[error(
        "the reporting thread stopped unexpectedly (a dogslow bug: see the message above); \
         reports after that point were not written"
    )]
    ReporterFailed,
}

/// Records queued for the reporting thread. Each stall carries its user
/// stack copy (up to `--user-stack-bytes`), so the queue is bounded: when the
/// reporter falls this far behind, the event loop waits for it, and records
/// wait in the kernel's ring buffer, whose overflow is counted and said on
/// stderr, instead of the agent's memory growing with a stall storm.
const REPORT_QUEUE: usize = 1024;

/// Runs `config` until its duration ends, SIGINT/SIGTERM, or every watched
/// process has exited. With `config_path` (`dogslow run`), SIGHUP reloads
/// the targets and outputs from that file.
pub fn run(config: AgentConfig, config_path: Option<PathBuf>) -> Result<(), AgentError> {
    privileges::check()?;
    let metrics = Metrics::new();
    let (tx, rx) = mpsc::sync_channel(REPORT_QUEUE);
    let mut watcher = Watcher::new(config.targets.clone(), tx.clone());
    watcher.validate()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Bind before loading anything: a taken port is a start-up error.
    let listener = match config.metrics_addr {
        Some(addr) => Some(runtime.block_on(metrics::bind(addr))?),
        None => None,
    };
    let mut probes = Probes::load(&LoadOptions {
        max_inflight: config.max_inflight,
        user_stack_bytes: config.user_stack_bytes,
        sample_hz: config.sample_hz,
    })?;
    release_freed_memory();
    let sinks = SinkSet::build(&config, &metrics.mail_counters())?;
    let reporter = Reporter::spawn(sinks, metrics.clone(), rx);

    watcher.attach_initial(&mut probes)?;
    eprintln!(
        "dogslow: watching {} process(es); timeout {}; reports on stdout",
        watcher.watched_processes(),
        config
            .targets
            .iter()
            .map(|t| format!("{} {}", t.name, humantime::format_duration(t.timeout)))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(listener) = listener {
        if let Ok(addr) = listener.local_addr() {
            eprintln!("dogslow: metrics on http://{addr}/metrics, health on /healthz");
        }
        runtime.spawn(metrics::serve(listener, metrics.clone()));
    }

    let mut agent = Agent {
        probes: &mut probes,
        watcher: &mut watcher,
        config,
        config_path,
        tx: &tx,
        reporter: &reporter,
        metrics,
    };
    let result = runtime.block_on(agent.event_loop());
    // Detach at once (the ring buffer was drained last), then close the
    // channel so the reporter writes what it has and finishes its sinks.
    drop(watcher);
    drop(probes);
    drop(tx);
    let reported = reporter.join();
    result?;
    reported.map_err(|_| AgentError::ReporterFailed)
}

/// The event loop's state.
struct Agent<'a> {
    probes: &'a mut Probes,
    watcher: &'a mut Watcher,
    config: AgentConfig,
    config_path: Option<PathBuf>,
    tx: &'a mpsc::SyncSender<Message>,
    reporter: &'a thread::JoinHandle<()>,
    metrics: Metrics,
}

impl Agent<'_> {
    async fn event_loop(&mut self) -> Result<(), AgentError> {
        let ring = self.probes.take_events()?;
        // SAFETY: the ring buffer owns its map fd, which stays open and the
        // same for the AsyncFd's whole life (we never replace the inner value).
        let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
            .map_err(|err| AgentError::Io(err.into()))?;
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let tick_ns = self.config.scan_interval.as_nanos() as u64;
        let next_scan = time::sleep(Duration::ZERO);
        tokio::pin!(next_scan);
        let mut watch = time::interval(Duration::from_secs(1));
        watch.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let stop_at = self.config.duration.map(|d| Instant::now() + d);
        let mut drops = DropCounter::default();
        let mut warned = Warned::default();
        let mut failure = None;

        loop {
            tokio::select! {
                guard = ring.readable_mut() => match guard {
                    Ok(mut guard) => {
                        drain(guard.get_inner_mut(), self.tx, &self.metrics);
                        guard.clear_ready();
                    }
                    Err(err) => {
                        // Stop, but still write what the ring holds.
                        failure = Some(err);
                        break;
                    }
                },
                () = &mut next_scan => {
                    let inflight = self.probes.inflight();
                    let now = Clock::boot_ns();
                    self.capture_overdue(&inflight, now, &mut warned);
                    let min_timeout_ns = self
                        .watcher
                        .min_timeout()
                        .map_or(tick_ns, |t| t.as_nanos() as u64);
                    let wait = next_scan_in(&inflight, now, min_timeout_ns, tick_ns);
                    next_scan.as_mut().reset(Instant::now() + Duration::from_nanos(wait));
                }
                _ = watch.tick() => {
                    if self.reporter.is_finished() {
                        // Nothing would write the reports: say so and stop.
                        return Err(AgentError::ReporterFailed);
                    }
                    drops.check(&self.probes.stats(), &self.metrics);
                    self.watcher.rescan(self.probes);
                    self.observe();
                    if self.watcher.finished() {
                        eprintln!("dogslow: every watched process has exited; stopping");
                        break;
                    }
                }
                _ = hangup.recv() => {
                    self.reload();
                    // New targets may have shorter timeouts: look again now.
                    next_scan.as_mut().reset(Instant::now());
                }
                _ = interrupt.recv() => break,
                _ = terminate.recv() => break,
                _ = sleep_until(stop_at) => break,
            }
        }
        // Captures already in the ring buffer are reports too.
        drain(ring.get_mut(), self.tx, &self.metrics);
        drops.check(&self.probes.stats(), &self.metrics);
        let inflight = self.probes.inflight();
        eprintln!(
            "dogslow: stopping; {} request(s) in flight, {} of them reported",
            inflight.len(),
            inflight
                .iter()
                .filter(|(_, request)| request.reported != 0)
                .count()
        );
        match failure {
            Some(err) => Err(err.into()),
            None => Ok(()),
        }
    }

    /// The deadline scan's work: off-CPU captures for overdue requests whose
    /// threads switched out, and the sampler on while any overdue request
    /// is not yet captured (its thread may be on a CPU).
    fn capture_overdue(
        &mut self,
        inflight: &[(u32, dogslow_common::Inflight)],
        now: u64,
        warned: &mut Warned,
    ) {
        if let Err(err) = self.probes.set_sampling(needs_sampling(inflight, now))
            && !warned.sampling
        {
            eprintln!("dogslow: {err}; requests stalled on a CPU cannot be reported");
            warned.sampling = true;
        }
        if needs_off_cpu_capture(inflight, now)
            && let Err(err) = self.probes.capture_off_cpu()
            && !warned.capture
        {
            eprintln!("dogslow: {err}; blocked requests cannot be reported");
            warned.capture = true;
        }
    }

    /// Gauges read once a second.
    fn observe(&self) {
        self.metrics.beat();
        let inflight = self.probes.inflight().len();
        self.metrics.requests_inflight.set(inflight as i64);
        self.metrics
            .map_fill("inflight", inflight, self.probes.inflight_capacity());
        self.metrics.map_fill(
            "targets",
            self.watcher.slot_count(),
            dogslow_common::MAX_TARGETS,
        );
        self.metrics
            .watched_processes
            .set(self.watcher.watched_processes() as i64);
    }

    /// SIGHUP: re-reads the config file. A file that does not check out
    /// changes nothing; unchanged targets keep their probes and requests.
    fn reload(&mut self) {
        let Some(path) = self.config_path.clone() else {
            eprintln!(
                "dogslow: SIGHUP ignored: there is no config file to reload (dogslow run --config reloads)"
            );
            return;
        };
        let new = match config_file::load(&path, std::env::var(PASSWORD_ENV).ok()) {
            Ok(new) => new,
            Err(err) => {
                eprintln!("dogslow: reload refused, keeping the running configuration: {err}");
                return;
            }
        };
        let restart_only = [
            ("sample_hz", new.sample_hz != self.config.sample_hz),
            ("max_inflight", new.max_inflight != self.config.max_inflight),
            (
                "user_stack_bytes",
                new.user_stack_bytes != self.config.user_stack_bytes,
            ),
            ("metrics_addr", new.metrics_addr != self.config.metrics_addr),
        ];
        for (key, changed) in restart_only {
            if changed {
                eprintln!(
                    "dogslow: reload: [agent] {key} changes only on restart; keeping the running value"
                );
            }
        }
        let outputs_changed = new.output != self.config.output
            || new.targets.iter().any(|t| {
                self.config
                    .targets
                    .iter()
                    .find(|o| o.name == t.name)
                    .map(|o| &o.output)
                    != Some(&t.output)
            });
        if outputs_changed {
            let mut with_new_outputs = self.config.clone();
            with_new_outputs.output = new.output.clone();
            with_new_outputs.targets = new.targets.clone();
            match SinkSet::build(&with_new_outputs, &self.metrics.mail_counters()) {
                Ok(sinks) => {
                    let _ = self.tx.send(Message::Sinks(Box::new(sinks)));
                }
                Err(err) => {
                    eprintln!("dogslow: reload refused, keeping the running configuration: {err}");
                    return;
                }
            }
        }
        match self.watcher.reload(self.probes, new.targets.clone()) {
            Ok(summary) => {
                if summary.failed > 0 {
                    self.metrics.attach_errors.inc();
                }
                eprintln!(
                    "dogslow: reloaded {}: {} target(s) kept, {} added, {} removed{}{}",
                    path.display(),
                    summary.kept,
                    summary.added,
                    summary.removed,
                    if summary.failed > 0 {
                        format!(", {} could not be attached (see above)", summary.failed)
                    } else {
                        String::new()
                    },
                    if outputs_changed { "; new outputs" } else { "" }
                );
                self.config.targets = new.targets;
                self.config.output = new.output;
            }
            Err(err) => {
                self.metrics.attach_errors.inc();
                eprintln!("dogslow: reload refused, keeping the running targets: {err}");
            }
        }
    }
}

/// Loading parses the kernel's BTF (tens of megabytes, freed after the
/// load); hand those pages back so a long-running agent does not keep them.
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel.
    unsafe {
        libc::malloc_trim(0);
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    tx: &mpsc::SyncSender<Message>,
    metrics: &Metrics,
) {
    while let Some(record) = ring.next() {
        match events::decode(&record) {
            Ok(event) => {
                let _ = tx.send(Message::Event(event));
            }
            Err(err) => {
                metrics.drop_by("undecodable", 1);
                eprintln!("dogslow: dropping an undecodable record: {err}");
            }
        }
    }
}

/// Failures said once on stderr, not at every scan.
#[derive(Default)]
struct Warned {
    sampling: bool,
    capture: bool,
}

/// Says on stderr, and in the metrics, when the kernel side had to drop
/// something; also carries the kernel's request count into the metrics.
#[derive(Default)]
struct DropCounter {
    seen: [u64; stat::COUNT as usize],
}

impl DropCounter {
    fn check(&mut self, stats: &[u64; stat::COUNT as usize], metrics: &Metrics) {
        let started = stat::REQUESTS_STARTED as usize;
        metrics
            .requests_started
            .inc_by(stats[started].saturating_sub(self.seen[started]));
        self.seen[started] = stats[started];
        let explain = [
            (
                stat::INFLIGHT_FULL,
                "inflight_full",
                "requests were not tracked because the in-flight map was full (it holds one entry per thread that makes requests: raise --max-inflight)",
            ),
            (
                stat::RINGBUF_FULL,
                "ringbuf_full",
                "stall captures waited for room in the ring buffer (they are retried)",
            ),
            (
                stat::COMPLETION_DROPPED,
                "completion_dropped",
                "completion records were dropped: the ring buffer was full",
            ),
        ];
        for (index, reason, text) in explain {
            let index = index as usize;
            if stats[index] > self.seen[index] {
                let new = stats[index] - self.seen[index];
                eprintln!("dogslow: {new} {text}");
                if index == stat::RINGBUF_FULL as usize {
                    metrics.capture_retries.inc_by(new);
                } else {
                    metrics.drop_by(reason, new);
                }
                self.seen[index] = stats[index];
            }
        }
    }
}

impl From<ProcError> for AgentError {
    fn from(err: ProcError) -> Self {
        Self::Target {
            target: String::new(),
            source: TargetError::Proc(err),
        }
    }
}
