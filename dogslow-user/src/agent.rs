//! The agent: checks, resolves and attaches the targets, then runs the event
//! loop (ring buffer, deadline scan, process watch, signals) until told to
//! stop, and drains every captured report before returning.
use std::{
    collections::BTreeSet,
    sync::{Arc, mpsc},
    time::Duration,
};

use dogslow_common::{TARGET_FUNCTION_SCOPED, TargetConfig, stat};
use thiserror::Error;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
    time::{self, Instant, MissedTickBehavior},
};

use crate::{
    config::{AgentConfig, TargetSpec},
    events,
    loader::{AttachError, LoadError, LoadOptions, ProbeRole, Probes},
    privileges::{self, PrivilegeError},
    procfs::{self, ProcError},
    report::Clock,
    reporter::{Message, Reporter, TargetInfo},
    sinks::{self, SinkError},
    targets::{self, AttachPoint, TargetError},
    tracker::needs_off_cpu_capture,
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

/// One uprobe to attach for a target.
#[derive(Clone, Debug)]
struct PlannedProbe {
    target: u32,
    role: ProbeRole,
    pid: Option<u32>,
    point: AttachPoint,
}

/// Resolves every probe of every `--pid` target before anything is loaded,
/// so bad input fails fast with a precise message.
fn plan(config: &AgentConfig) -> Result<Vec<PlannedProbe>, AgentError> {
    let mut planned = Vec::new();
    for (index, target) in config.targets.iter().enumerate() {
        let target_error = |source: TargetError| AgentError::Target {
            target: target.name.clone(),
            source,
        };
        if !target.binaries.is_empty() {
            return Err(AgentError::Unsupported(
                "--binary is not supported yet; use --pid".into(),
            ));
        }
        for &pid in &target.pids {
            // Exit probes first, so that no request starts whose end could be missed.
            let mut roles = Vec::new();
            match &target.exit {
                Some(exit) => roles.push((ProbeRole::Exit, exit)),
                None => roles.push((ProbeRole::Return, &target.entry)),
            }
            roles.push((ProbeRole::Entry, &target.entry));
            for (role, spec) in roles {
                let object = targets::object_for_pid(pid, spec).map_err(target_error)?;
                let point = targets::resolve(&object, spec).map_err(target_error)?;
                planned.push(PlannedProbe {
                    target: index as u32,
                    role,
                    pid: Some(pid),
                    point,
                });
            }
        }
    }
    Ok(planned)
}

fn target_config(target: &TargetSpec) -> TargetConfig {
    TargetConfig {
        timeout_ns: target.timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
        flags: if target.exit.is_none() {
            TARGET_FUNCTION_SCOPED
        } else {
            0
        },
        _pad: 0,
    }
}

/// Runs `config` until its duration ends, SIGINT/SIGTERM, or every watched
/// process has exited.
pub fn run(config: AgentConfig) -> Result<(), AgentError> {
    privileges::check()?;
    let planned = plan(&config)?;
    let mut probes = Probes::load(&LoadOptions {
        max_inflight: config.max_inflight,
        user_stack_bytes: config.user_stack_bytes,
        sample_hz: config.sample_hz,
    })?;
    for (index, target) in config.targets.iter().enumerate() {
        probes.set_target(index as u32, target_config(target))?;
    }

    let targets: Arc<Vec<TargetInfo>> = Arc::new(
        config
            .targets
            .iter()
            .map(|t| TargetInfo {
                name: t.name.clone(),
                entry: t.entry.text.clone(),
                timeout: t.timeout,
            })
            .collect(),
    );
    let sinks = sinks::build(&config.output)?;
    let (tx, rx) = mpsc::channel();
    let reporter = Reporter::spawn(targets, sinks, rx);

    let pids: BTreeSet<u32> = planned.iter().filter_map(|p| p.pid).collect();
    for &pid in &pids {
        let _ = tx.send(Message::ProcessSeen(pid));
    }
    let mut attached = Vec::new();
    for probe in &planned {
        attached.push(probes.attach_uprobe(
            probe.role,
            &probe.point.path,
            probe.point.file_offset,
            probe.pid,
            probe.target,
        )?);
    }
    eprintln!(
        "dogslow: watching {} process(es); timeout {}; reports on stdout",
        pids.len(),
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
    let result = runtime.block_on(event_loop(&mut probes, &config, &pids, &tx));
    // Close the channel so the reporter drains and finishes, then detach.
    drop(tx);
    let _ = reporter.join();
    drop(probes);
    result
}

async fn event_loop(
    probes: &mut Probes,
    config: &AgentConfig,
    pids: &BTreeSet<u32>,
    tx: &mpsc::Sender<Message>,
) -> Result<(), AgentError> {
    let ring = probes.take_events()?;
    // SAFETY: the ring buffer owns its map fd, which stays open and the same
    // for the AsyncFd's whole life (we never replace the inner value).
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(|err| AgentError::Io(err.into()))?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut scan = time::interval(config.scan_interval);
    scan.set_missed_tick_behavior(MissedTickBehavior::Skip);
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
            _ = scan.tick() => {
                let inflight = probes.inflight();
                if needs_off_cpu_capture(&inflight, Clock::boot_ns()) {
                    if let Err(err) = probes.capture_off_cpu() {
                        if !capture_failed {
                            eprintln!("dogslow: {err}; blocked requests cannot be reported");
                            capture_failed = true;
                        }
                    }
                }
            }
            _ = watch.tick() => {
                drops.check(&probes.stats());
                if !pids.is_empty() && pids.iter().all(|&pid| !procfs::process_exists(pid)) {
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
