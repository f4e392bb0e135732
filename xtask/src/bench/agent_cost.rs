//! Item 3: dogslow's own CPU and memory, idle, under a fast request load and
//! under a storm of stall reports.
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::{
    Bench,
    proc::{self, Proc},
    report::{Check, Section, Table},
    stats::{Summary, show},
};

pub const TITLE: &str = "Agent cost";

const RATE: u64 = 20_000;
const STORM_THREADS: u64 = 4;
const STORM_TIMEOUT_MS: u64 = 20;
const STORM_STALL_MS: u64 = 40;
/// Let attach-time work (loading, BTF, first symbolization) pass first.
const SETTLE: Duration = Duration::from_secs(1);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Requests,
    Storm,
}

const PHASES: [Phase; 3] = [Phase::Idle, Phase::Requests, Phase::Storm];

impl Phase {
    fn name(self) -> String {
        match self {
            Self::Idle => "idle (attached, no requests)".into(),
            Self::Requests => format!("{RATE} fast requests/s"),
            Self::Storm => format!("{} stall reports/s", STORM_THREADS * 1000 / STORM_STALL_MS),
        }
    }
}

struct Sample {
    agent_cpu_percent: f64,
    peak_rss_mib: f64,
    /// Of the RSS, the BPF maps mapped into dogslow (the ring buffer).
    bpf_map_rss_mib: f64,
    /// Requests/s (Requests) or reports/s (Storm) achieved during the window.
    rate: Option<f64>,
    /// The target's own CPU, % of a core (Requests): where the probes' cost lands.
    target_cpu_percent: Option<f64>,
}

fn attach(bench: &Bench, target: &Proc, entry: &str, timeout: &str) -> Result<Proc> {
    bench.start_dogslow(&[
        "attach".into(),
        "--pid".into(),
        target.pid().to_string(),
        "--entry".into(),
        entry.into(),
        "--timeout".into(),
        timeout.into(),
    ])
}

fn measure(bench: &Bench, phase: Phase) -> Result<Sample> {
    let window = bench.settings.agent_phase;
    let (mut target, mut agent) = match phase {
        Phase::Idle | Phase::Requests => {
            let target = bench.start_target(&["loop"])?;
            let agent = attach(bench, &target, "bench_request_0", "1s")?;
            (target, agent)
        }
        Phase::Storm => {
            let target = bench.start_target(&[
                "stalls",
                "blocked",
                &STORM_THREADS.to_string(),
                "0",
                &STORM_STALL_MS.to_string(),
                "0",
            ])?;
            let agent = attach(
                bench,
                &target,
                "stall_request",
                &format!("{STORM_TIMEOUT_MS}ms"),
            )?;
            (target, agent)
        }
    };
    let serve_seconds = (SETTLE + window).as_secs() + 2;
    match phase {
        Phase::Idle => {}
        Phase::Requests => target.send(&format!("serve {RATE} {serve_seconds}"))?,
        Phase::Storm => target.send("go")?,
    }
    proc::sleep(SETTLE)?;
    let pid = agent.pid();
    let cpu_before = proc::cpu_ns(pid)?;
    let window_start = proc::realtime_ns();
    proc::sleep(window)?;
    let cpu_after = proc::cpu_ns(pid)?;
    let window_end = proc::realtime_ns();
    let peak_rss_kib = proc::peak_rss_kib(pid)?;
    let bpf_map_rss_kib = proc::bpf_map_rss_kib(pid)?;
    if !agent.is_running() {
        bail!("exited during the run: {}", agent.why());
    }
    let seconds = (window_end - window_start) as f64 / 1e9;
    let agent_cpu_percent = (cpu_after - cpu_before) as f64 / 1e9 / seconds * 100.0;
    let (rate, target_cpu_percent) = match phase {
        Phase::Idle => (None, None),
        Phase::Requests => {
            let (_, line) = target.wait_stdout(
                0,
                Duration::from_secs(serve_seconds + 30),
                "the serve result",
                |l| l.starts_with("served "),
            )?;
            let fields: Vec<f64> = line
                .text
                .split_whitespace()
                .skip(1)
                .filter_map(|f| f.parse().ok())
                .collect();
            let [calls, elapsed_ns, cpu_ns] = fields[..] else {
                bail!("bench_target said `{}`", line.text);
            };
            (
                Some(calls / (elapsed_ns / 1e9)),
                Some(cpu_ns / elapsed_ns * 100.0),
            )
        }
        Phase::Storm => {
            let reports = agent
                .stdout
                .snapshot()
                .iter()
                .filter(|l| l.read_ns >= window_start && l.read_ns < window_end)
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(&l.text)
                        .is_ok_and(|report| report["kind"] == "stall")
                })
                .count();
            (Some(reports as f64 / seconds), None)
        }
    };
    agent.stop(Duration::from_secs(10));
    Ok(Sample {
        agent_cpu_percent,
        peak_rss_mib: peak_rss_kib as f64 / 1024.0,
        bpf_map_rss_mib: bpf_map_rss_kib as f64 / 1024.0,
        rate,
        target_cpu_percent,
    })
}

pub fn run(bench: &Bench) -> Result<Section> {
    let settings = &bench.settings;
    let mut samples: Vec<Vec<Sample>> = PHASES.iter().map(|_| Vec::new()).collect();
    for round in 0..settings.agent_rounds {
        for (phase, phase_samples) in PHASES.iter().zip(&mut samples) {
            phase_samples.push(measure(bench, *phase).with_context(|| phase.name())?);
        }
        eprintln!(
            "xtask bench:   agent round {}/{} done",
            round + 1,
            settings.agent_rounds
        );
    }

    let mut section = Section::new(TITLE);
    let target = bench.shown(&bench.target);
    section.method = vec![format!(
        "dogslow's CPU is the sum of its threads' run time (`/proc/PID/task/*/schedstat`) over a \
         {:.0} s window that starts {} s after it attached, as % of one core; peak RSS is \
         `VmHWM` at the end. Every phase is a fresh dogslow. Kernel-side probe cost runs in the \
         target's context and is billed to the target (its CPU is shown for the request load; \
         per-request cost is item 1). Fast requests: the target calls `bench_request_0` \
         ({RATE}/s, paced every millisecond; dogslow timeout 1 s, never reached). Stall storm: \
         {STORM_THREADS} threads make requests that sleep {STORM_STALL_MS} ms against a \
         {STORM_TIMEOUT_MS} ms deadline, back to back: every request is reported, and a \
         completion record follows each report. {} rounds.",
        settings.agent_phase.as_secs_f64(),
        SETTLE.as_secs(),
        settings.agent_rounds
    )];
    section.commands = vec![
        format!("{target} loop   # idle, then: serve {RATE} SECONDS"),
        "dogslow attach --pid <target> --entry bench_request_0 --timeout 1s".into(),
        format!("{target} stalls blocked {STORM_THREADS} 0 {STORM_STALL_MS} 0"),
        format!(
            "dogslow attach --pid <target> --entry stall_request --timeout {STORM_TIMEOUT_MS}ms"
        ),
    ];
    let mut table = Table::new(
        "",
        &[
            "phase",
            "achieved",
            "dogslow CPU, % of a core",
            "dogslow peak RSS, MiB",
            "of which BPF maps, MiB",
            "target CPU, % of a core",
        ],
    );
    let mut peak_rss = 0.0f64;
    let mut peak_maps = 0.0f64;
    let mut idle_cpu = None;
    // (phase, median RSS, median BPF-map RSS), for the notes.
    let mut rss_by_phase = Vec::new();
    for (phase, phase_samples) in PHASES.iter().zip(&samples) {
        let cpu = Summary::of(
            &phase_samples
                .iter()
                .map(|s| s.agent_cpu_percent)
                .collect::<Vec<_>>(),
        );
        let rss = Summary::of(
            &phase_samples
                .iter()
                .map(|s| s.peak_rss_mib)
                .collect::<Vec<_>>(),
        );
        let maps = Summary::of(
            &phase_samples
                .iter()
                .map(|s| s.bpf_map_rss_mib)
                .collect::<Vec<_>>(),
        );
        let rate = Summary::of(
            &phase_samples
                .iter()
                .filter_map(|s| s.rate)
                .collect::<Vec<_>>(),
        );
        let target_cpu = Summary::of(
            &phase_samples
                .iter()
                .filter_map(|s| s.target_cpu_percent)
                .collect::<Vec<_>>(),
        );
        peak_rss = peak_rss.max(rss.map_or(0.0, |r| r.max));
        peak_maps = peak_maps.max(maps.map_or(0.0, |m| m.max));
        if *phase == Phase::Idle {
            idle_cpu = cpu;
        }
        if let (Some(rss), Some(maps)) = (rss, maps) {
            rss_by_phase.push((*phase, rss.median, maps.median));
        }
        let achieved = match phase {
            Phase::Idle => "—".to_owned(),
            Phase::Requests => format!("{} requests/s", show(rate, 0)),
            Phase::Storm => format!("{} reports/s", show(rate, 0)),
        };
        table.row(vec![
            phase.name(),
            achieved,
            show(cpu, 2),
            show(rss, 1),
            show(maps, 1),
            if target_cpu.is_some() {
                show(target_cpu, 1)
            } else {
                "—".into()
            },
        ]);
        let limit = match phase {
            Phase::Idle => Some(0.5),
            Phase::Requests => Some(2.0),
            Phase::Storm => None,
        };
        if let Some(limit) = limit {
            section.checks.push(Check::new(
                &format!("agent CPU ≤ {limit} % of a core, {}", phase.name()),
                format!("{} %", show(cpu, 2)),
                cpu.map(|c| c.median <= limit),
            ));
        }
    }
    section.checks.push(Check::new(
        "agent peak RSS ≤ 64 MiB",
        format!("{peak_rss:.1} MiB (largest of every phase and round)"),
        Some(peak_rss <= 64.0),
    ));
    section.tables.push(table);
    if let Some(idle) = idle_cpu.filter(|idle| idle.median > 0.5) {
        section.notes.push(format!(
            "**Idle CPU is over the 0.5 % target** ({:.2} % of a core). An idle agent has \
             nothing to do but its timers (the deadline scan and the process watch in \
             dogslow-user/src/agent.rs): each should sleep until something can be due.",
            idle.median
        ));
    }
    if peak_rss > 64.0 {
        let btf_mb = std::fs::metadata("/sys/kernel/btf/vmlinux")
            .map(|m| m.len() as f64 / 1e6)
            .unwrap_or(0.0);
        let heap = |wanted: Phase| {
            rss_by_phase
                .iter()
                .find(|(phase, ..)| *phase == wanted)
                .map_or(0.0, |(_, rss, maps)| rss - maps)
        };
        section.notes.push(format!(
            "**Peak RSS is over 64 MiB** ({peak_rss:.1} MiB). {peak_maps:.1} MiB of it is the \
             BPF ring buffer mapped into dogslow to read events (16 MiB of kernel memory, mapped \
             twice so that records can wrap: its pages count twice). The rest is dogslow's own: \
             {:.1} MiB idle, which is start-up (dogslow parses the kernel's {btf_mb:.1} MB BTF \
             twice: with btf-rs for the structure offsets its programs read, in \
             dogslow-user/src/kernel_btf.rs, and with aya for loading, a parse `Probes` keeps), \
             and {:.1} MiB under the stall storm, where the unwinder's and symbolizer's caches \
             (CFI, DWARF, /proc/kallsyms) and captures in flight add to it. Taking the dozen \
             offsets from aya's parse instead of a second full parse, and a smaller ring buffer \
             (`EVENTS` in dogslow-ebpf/src/maps.rs; one capture is at most about 34 KiB), are \
             where to cut.",
            heap(Phase::Idle),
            heap(Phase::Storm)
        ));
    }
    Ok(section)
}
