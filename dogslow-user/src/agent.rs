//! The agent: checks, resolves and attaches the targets, then runs the event
//! loop (ring buffer, deadline scan, process watch, signals) until told to
//! stop, and drains every captured report before returning.
use std::{sync::mpsc, time::Duration};

use dogslow_common::stat;
use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{self, Instant, MissedTickBehavior},
};

use crate::{
    config::AgentConfig,
    events,
    loader::{AttachError, LoadError, LoadOptions, Probes},
    privileges::{self, PrivilegeError},
    procfs::ProcError,
    report::Clock,
    reporter::{Message, Reporter},
    sinks::{self, SinkError},
    targets::TargetError,
    tracker::{needs_off_cpu_capture, next_scan_in},
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
}

/// Runs `config` until its duration ends, SIGINT/SIGTERM, or every watched
/// process has exited.
pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    privileges::check()?;
    let (tx, rx) = mpsc::channel();
    let mut watcher = Watcher::new(config.targets.clone(), tx.clone());
    watcher.validate()?;
    let mut probes = Probes::load(&LoadOptions {
        max_inflight: config.max_inflight,
        user_stack_bytes: config.user_stack_bytes,
        sample_hz: config.sample_hz,
    })?;
    let sinks = sinks::build(&config.output)?;
    let reporter = Reporter::spawn(sinks, rx);

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

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(event_loop(&mut probes, &mut watcher, &config, &tx));
    // Close the channel so the reporter drains and finishes, then detach.
    drop(tx);
    drop(watcher);
    let _ = reporter.join();
    drop(probes);
    result
}

async fn event_loop(
    probes: &mut Probes,
    watcher: &mut Watcher,
    config: &AgentConfig,
    tx: &mpsc::Sender<Message>,
) -> Result<(), AgentError> {
    let ring = probes.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for the AsyncFd's whole life (we never replace the inner value).
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|err| AgentError::Io(err.into()))?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let tick_ns = config.scan_interval.as_nanos() as u64;
    let min_timeout_ns = config
        .targets
        .iter()
        .map(|t| t.timeout.as_nanos() as u64)
        .min()
        .unwrap_or(tick_ns);
    let next_scan = time::sleep(Duration::ZERO);
    tokio::pin!(next_scan);
    let mut watch = time::interval(Duration::from_secs(1));
    watch.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let stop_at = config.duration.map(|d| Instant::now() + d);
    let mut drops = DropReporter::default();
    let mut capture_failed = false;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                drain(guard.get_inner_mut(), tx);
                guard.clear_ready();
            }
            () = &mut next_scan => {
                let inflight = probes.inflight();
                let now = Clock::boot_ns();
                if needs_off_cpu_capture(&inflight, now) {
                    if let Err(err) = probes.capture_off_cpu() {
                        if !capture_failed {
                            eprintln!("dogslow: {err}; blocked requests cannot be reported");
                            capture_failed = true;
                        }
                    }
                }
                let wait = next_scan_in(&inflight, now, min_timeout_ns, tick_ns);
                next_scan.as_mut().reset(Instant::now() + Duration::from_nanos(wait));
            }
            _ = watch.tick() => {
                drops.check(&probes.stats());
                watcher.rescan(probes);
                if watcher.finished() {
                    eprintln!("dogslow: every watched process has exited; stopping");
                    break;
                }
            }
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
            _ = sleep_until(stop_at) => break,
        }
    }
    // Captures already in the ring buffer are reports too.
    drain(ring.get_mut(), tx);
    drops.check(&probes.stats());
    let inflight = probes.inflight();
    eprintln!(
        "dogslow: stopping; {} request(s) in flight, {} of them reported",
        inflight.len(),
        inflight
            .iter()
            .filter(|(_, request)| request.reported != 0)
            .count()
    );
    Ok(())
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn drain(ring: &mut aya::maps::RingBuf<aya::maps::MapData>, tx: &mpsc::Sender<Message>) {
    while let Some(record) = ring.next() {
        match events::decode(&record) {
            Ok(event) => {
                let _ = tx.send(Message::Event(event));
            }
            Err(err) => eprintln!("dogslow: dropping an undecodable record: {err}"),
        }
    }
}

/// Says on stderr when the kernel side had to drop something.
#[derive(Default)]
struct DropReporter {
    seen: [u64; stat::COUNT as usize],
}

impl DropReporter {
    fn check(&mut self, stats: &[u64; stat::COUNT as usize]) {
        let explain = [
            (
                stat::INFLIGHT_FULL,
                "requests were not tracked because the in-flight map was full (raise --max-inflight)",
            ),
            (
                stat::RINGBUF_FULL,
                "stall captures waited for room in the ring buffer (they are retried)",
            ),
            (
                stat::COMPLETION_DROPPED,
                "completion records were dropped: the ring buffer was full",
            ),
        ];
        for (index, text) in explain {
            let index = index as usize;
            if stats[index] > self.seen[index] {
                eprintln!("dogslow: {} {text}", stats[index] - self.seen[index]);
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
