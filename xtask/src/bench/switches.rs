//! Item 4: what dogslow's sched_switch program adds to every context switch
//! on the machine: for threads in no request (one failed hash lookup) and
//! for threads inside a request (a lookup and three stores).
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use super::{
    Bench,
    floor::{self, Mechanism, Probe},
    proc::Proc,
    report::{Section, Table},
    stats::{Summary, show},
};

pub const TITLE: &str = "Context switches";

/// Short runs per attachment; the fastest counts.
const SLICES: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    NotAttached,
    /// Empty uprobe + uretprobe on the process, attached as aya does (per
    /// process perf events), and no sched_switch program.
    FloorPerfEvent,
    /// The same through a uprobe_multi link.
    FloorUprobeMulti,
    /// Empty per-process probes on another process: what the perf events
    /// cost processes nobody watches.
    FloorElsewhere,
    /// dogslow watching another process: what it costs processes it does
    /// not watch.
    DogslowElsewhere,
    Untracked,
    Tracked,
}

const CONFIGS: [Config; 7] = [
    Config::NotAttached,
    Config::FloorPerfEvent,
    Config::FloorUprobeMulti,
    Config::FloorElsewhere,
    Config::DogslowElsewhere,
    Config::Untracked,
    Config::Tracked,
];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::NotAttached => "dogslow not attached",
            Self::FloorPerfEvent => {
                "no dogslow; empty uprobe + uretprobe on the process (perf events, as aya attaches)"
            }
            Self::FloorUprobeMulti => "no dogslow; empty uprobe + uretprobe (uprobe_multi link)",
            Self::FloorElsewhere => {
                "no dogslow; empty uprobe + uretprobe (perf events) on another process only"
            }
            Self::DogslowElsewhere => "dogslow watching another process only",
            Self::Untracked => "attached, threads in no request",
            Self::Tracked => "attached, both threads inside a request",
        }
    }

    /// The entry dogslow watches: the function both threads run inside
    /// (tracked) or one nobody calls (untracked).
    fn entry(self) -> Option<&'static str> {
        match self {
            Self::NotAttached
            | Self::FloorPerfEvent
            | Self::FloorUprobeMulti
            | Self::FloorElsewhere => None,
            Self::Untracked | Self::DogslowElsewhere => Some("idle_request"),
            Self::Tracked => Some("switch_request"),
        }
    }
}

fn measure(bench: &Bench, config: Config) -> Result<f64> {
    let mut target = bench.start_target(&["switches"])?;
    // The "other process" of the *Elsewhere configurations: idle, waiting
    // on its input.
    let other = match config {
        Config::FloorElsewhere | Config::DogslowElsewhere => {
            Some(bench.start_target(&["switches"])?)
        }
        _ => None,
    };
    let watched = other.as_ref().map_or(target.pid(), Proc::pid);
    let mechanism = match config {
        Config::FloorPerfEvent | Config::FloorElsewhere => Some(Mechanism::PerfEvent),
        Config::FloorUprobeMulti => Some(Mechanism::UprobeMulti),
        _ => None,
    };
    let _floor = match mechanism {
        Some(mechanism) => {
            // On the function dogslow watches when untracked: never called.
            let offset = floor::function(&bench.target, "idle_request")?.file_offset;
            Some(floor::attach(
                mechanism,
                &bench.target,
                &[Probe::entry(offset), Probe::ret(offset)],
                Some(watched),
            )?)
        }
        None => None,
    };
    let agent: Option<Proc> = match config.entry() {
        None => None,
        Some(entry) => Some(bench.start_dogslow(&[
            "attach".into(),
            "--pid".into(),
            watched.to_string(),
            "--entry".into(),
            entry.into(),
            "--timeout".into(),
            "1h".into(),
        ])?),
    };
    // A warm-up, then SLICES short runs: the fastest is the one the other
    // tenants of the machine disturbed least (they can only add time).
    let slice_ms = (bench.settings.switch_ms / SLICES as u64).max(20);
    let mut result = f64::INFINITY;
    for (index, run_ms) in std::iter::once(slice_ms)
        .chain(std::iter::repeat_n(slice_ms, SLICES))
        .enumerate()
    {
        let from = target.stdout.len();
        target.send(&format!("run {run_ms}"))?;
        let (_, line) = target.wait_stdout(
            from,
            Duration::from_millis(run_ms * 4 + 30_000),
            "the switch count",
            |l| l.starts_with("switched "),
        )?;
        let fields: Vec<f64> = line
            .text
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        let [switches, elapsed_ns] = fields[..] else {
            bail!("bench_target said `{}`", line.text);
        };
        if switches < 1000.0 {
            bail!("only {switches} context switches in {run_ms} ms: the ping-pong did not run");
        }
        if index > 0 {
            result = result.min(elapsed_ns / switches);
        }
    }
    if let Some(mut agent) = agent {
        if !agent.is_running() {
            bail!("exited during the run: {}", agent.why());
        }
        agent.stop(Duration::from_secs(10));
    }
    Ok(result)
}

pub fn run(bench: &Bench) -> Result<Section> {
    let settings = &bench.settings;
    let mut results: Vec<Vec<f64>> = CONFIGS.iter().map(|_| Vec::new()).collect();
    for round in 0..settings.switch_rounds {
        for offset in 0..CONFIGS.len() {
            let index = (round + offset) % CONFIGS.len();
            let ns = measure(bench, CONFIGS[index]).with_context(|| CONFIGS[index].name())?;
            results[index].push(ns);
        }
    }
    let baseline = results[0].clone();
    let mut section = Section::new(TITLE);
    let target = bench.shown(&bench.target);
    section.method = vec![format!(
        "Two threads of the bench target, pinned to CPU 0, hand a byte back and forth through \
         two pipes, so that every hand-off is a context switch; the target counts the switches \
         with `getrusage(RUSAGE_THREAD)` and reports elapsed time per switch (the pipe read and \
         write included). Per attachment, after a warm-up, {SLICES} runs of {} ms; the fastest \
         counts, the one other tenants of the machine disturbed least. dogslow's \
         `sched_switch` program runs on every switch of the \
         machine: it is measured watching a function neither thread calls (untracked) and \
         watching `switch_request`, which both threads stay inside for the whole run (tracked). \
         To separate that program from the probes dogslow attaches to the process, two more \
         configurations attach only an empty uprobe + uretprobe to the never-called function: \
         through per-process perf events, as aya attaches dogslow's, and through a uprobe_multi \
         link. Two more put dogslow, or the empty per-process probes, on another (idle) \
         process only: what threads nobody watches pay. {} rounds, configurations in rotated order; added cost is the per-round \
         difference against not attached.",
        (settings.switch_ms / SLICES as u64).max(20),
        settings.switch_rounds
    )];
    section.commands = vec![
        format!("{target} switches   # then: run MS"),
        "dogslow attach --pid <target> --entry idle_request --timeout 1h     # untracked".into(),
        "dogslow attach --pid <target> --entry switch_request --timeout 1h   # tracked".into(),
        "dogslow attach --pid <other> --entry idle_request --timeout 1h      # elsewhere".into(),
    ];
    let mut table = Table::new(
        "",
        &["configuration", "ns per switch", "added ns per switch"],
    );
    for (config, values) in CONFIGS.iter().zip(&results) {
        let added: Vec<f64> = values.iter().zip(&baseline).map(|(v, b)| v - b).collect();
        table.row(vec![
            config.name().to_owned(),
            show(Summary::of(values), 0),
            if *config == Config::NotAttached {
                "—".into()
            } else {
                show(Summary::of(&added), 0)
            },
        ]);
    }
    section.tables.push(table);
    let added = |index: usize| -> Vec<f64> {
        results[index]
            .iter()
            .zip(&baseline)
            .map(|(v, b)| v - b)
            .collect()
    };
    let at = |wanted: Config| CONFIGS.iter().position(|c| *c == wanted).unwrap_or(0);
    let (perf, multi) = (
        added(at(Config::FloorPerfEvent)),
        added(at(Config::FloorUprobeMulti)),
    );
    if settings.switch_rounds >= 3 {
        // dogslow minus the perf-event floor, per round: its program's share.
        let program = |index: usize| -> Option<Summary> {
            Summary::of(
                &results[index]
                    .iter()
                    .zip(&results[at(Config::FloorPerfEvent)])
                    .map(|(d, p)| d - p)
                    .collect::<Vec<_>>(),
            )
        };
        if let (Some(untracked), Some(tracked)) =
            (program(at(Config::Untracked)), program(at(Config::Tracked)))
        {
            section.notes.push(format!(
                "dogslow attached minus the perf-event floor, per round — its `sched_switch` \
                 program's share: {} ns per switch of an untracked thread, {} ns of a tracked \
                 one.",
                untracked.show(0),
                tracked.show(0)
            ));
        }
    }
    let perf_dearer = settings.switch_rounds >= 3 && perf.iter().zip(&multi).all(|(p, m)| p > m);
    if let (true, Some(perf), Some(multi)) = (perf_dearer, Summary::of(&perf), Summary::of(&multi))
    {
        section.notes.push(format!(
            "**The attach mechanism shows at the watched process's context switches.** Empty \
             probes attached through per-process perf events (aya's way, so dogslow's) add {:.0} \
             ns per switch; the same probes through a uprobe_multi link {:+.0} ns; perf events \
             were dearer in every round. A perf event opened for a PID belongs to that thread \
             (the process's main thread; the probe itself fires in every thread), and perf \
             schedules a thread's events out and in at each of its context switches; a \
             uprobe_multi link is no perf event. Single-threaded servers such as PostgreSQL's \
             backends pay it at every switch, in a request or not.",
            perf.median, multi.median
        ));
    }
    if let (Some(dogslow), Some(floor)) = (
        Summary::of(&added(at(Config::DogslowElsewhere))),
        Summary::of(&added(at(Config::FloorElsewhere))),
    ) {
        if dogslow.min <= 0.0 {
            section.notes.push(format!(
                "While dogslow watches another process, the context switches of threads it does \
                 not watch cost {} ns more: not distinguishable from zero in this run.",
                dogslow.show(0)
            ));
        } else {
            let cause = if floor.median.abs() < 10.0 {
                "Empty per-process probes on another process add nothing measurable, so this is \
                 dogslow's own machine-wide work at each switch: its `sched_switch` program \
                 (dogslow-ebpf/src/sched_switch.rs), which runs for every thread on the host."
            } else {
                "Part of it comes with any per-process perf event (the empty probes elsewhere), \
                 the rest is dogslow's machine-wide `sched_switch` program \
                 (dogslow-ebpf/src/sched_switch.rs)."
            };
            section.notes.push(format!(
                "**Processes dogslow does not watch pay too.** While dogslow watches another \
                 process, each context switch of these unwatched threads costs {} ns more; empty \
                 per-process probes on another process (no dogslow) add {} ns. {cause}",
                dogslow.show(0),
                floor.show(0)
            ));
        }
    }
    Ok(section)
}
