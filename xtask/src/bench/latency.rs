//! Item 2: how long after a request's deadline its report is on dogslow's
//! stdout, for threads stalled on a CPU and for threads blocked off it.
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Bench,
    proc::{self, Line},
    report::{Check, Section, Table},
    stats::percentile,
};

pub const TITLE: &str = "Detection latency";

const TIMEOUT_MS: u64 = 100;
/// How far past the deadline a stall lasts: far beyond any expected
/// latency, so a late report is measured rather than missed.
const STALL_PAST_DEADLINE_MS: u64 = 250;
const GAP_MS: u64 = 20;
/// dogslow's default sampler rate (`--sample-hz`), which this measures.
const SAMPLE_HZ: f64 = 99.0;

#[derive(Clone, Copy)]
enum StallKind {
    Running,
    Blocked,
}

impl StallKind {
    fn name(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Blocked => "blocked",
        }
    }

    /// Running stalls get one thread (a spinning thread per CPU would
    /// measure CPU starvation, not dogslow); blocked ones run five at once.
    fn threads(self) -> usize {
        match self {
            Self::Running => 1,
            Self::Blocked => 5,
        }
    }

    fn target_ms(self) -> f64 {
        match self {
            Self::Running => 1000.0 / SAMPLE_HZ + 50.0,
            Self::Blocked => 50.0,
        }
    }
}

/// The latencies of one run.
struct Measured {
    stalls: usize,
    /// Report on stdout minus deadline, ms.
    end_to_end_ms: Vec<f64>,
    /// Report's capture time minus deadline, ms (whole ms, from the report).
    capture_ms: Vec<f64>,
    /// (request start ns, end-to-end ms, capture ms) per report, in report order.
    raw: Vec<(u64, f64, f64)>,
    missed: usize,
    wrong_state: usize,
    unmatched_reports: usize,
}

fn measure(bench: &Bench, kind: StallKind) -> Result<Measured> {
    let threads = kind.threads();
    let per_thread = bench.settings.latency_stalls.div_ceil(threads);
    let stall_ms = TIMEOUT_MS + STALL_PAST_DEADLINE_MS;
    let mut target = bench.start_target(&[
        "stalls",
        kind.name(),
        &threads.to_string(),
        &per_thread.to_string(),
        &stall_ms.to_string(),
        &GAP_MS.to_string(),
    ])?;
    let mut agent = bench.start_dogslow(&[
        "attach".into(),
        "--pid".into(),
        target.pid().to_string(),
        "--entry".into(),
        "stall_request".into(),
        "--timeout".into(),
        format!("{TIMEOUT_MS}ms"),
    ])?;
    target.send("go")?;
    let expected = Duration::from_millis(per_thread as u64 * (stall_ms + GAP_MS * 2));
    target.wait_stdout(0, expected * 2 + Duration::from_secs(30), "\"done\"", |l| {
        l == "done"
    })?;
    // The last report may still be on its way.
    proc::sleep(Duration::from_millis(STALL_PAST_DEADLINE_MS))?;
    if !agent.is_running() {
        bail!("exited during the run: {}", agent.why());
    }
    agent.stop(Duration::from_secs(10));
    let starts = parse_starts(&target.stdout.snapshot())?;
    let reports = agent.stdout.snapshot();
    Ok(match_reports(kind, &starts, &reports))
}

/// (tid, start realtime ns) of every request, from "start TID NS" lines.
fn parse_starts(lines: &[Line]) -> Result<Vec<(u64, u64)>> {
    lines
        .iter()
        .filter_map(|l| l.text.strip_prefix("start "))
        .map(|rest| {
            let mut fields = rest.split_whitespace().map(str::parse::<u64>);
            match (fields.next(), fields.next()) {
                (Some(Ok(tid)), Some(Ok(ns))) => Ok((tid, ns)),
                _ => bail!("bench_target printed a malformed start line: start {rest}"),
            }
        })
        .collect()
}

fn rfc3339_ns(value: &Value) -> Option<u64> {
    let time = humantime::parse_rfc3339(value.as_str()?).ok()?;
    Some(time.duration_since(std::time::UNIX_EPOCH).ok()?.as_nanos() as u64)
}

/// How far a report's start may be from the start the target printed: far
/// more than a preemption between the print and the call, far less than
/// the time between two requests of one thread.
const MATCH_WINDOW_NS: u64 = 100_000_000;

/// Pairs each stall report with the request it is about (same thread,
/// start within `MATCH_WINDOW_NS`: reports carry it to the millisecond).
fn match_reports(kind: StallKind, starts: &[(u64, u64)], reports: &[Line]) -> Measured {
    let deadline_ns = TIMEOUT_MS * 1_000_000;
    let mut matched = vec![false; starts.len()];
    let mut measured = Measured {
        stalls: starts.len(),
        end_to_end_ms: Vec::new(),
        capture_ms: Vec::new(),
        raw: Vec::new(),
        missed: 0,
        wrong_state: 0,
        unmatched_reports: 0,
    };
    for line in reports {
        let Ok(report) = serde_json::from_str::<Value>(&line.text) else {
            measured.unmatched_reports += 1;
            continue;
        };
        if report["kind"] != "stall" {
            continue;
        }
        let (Some(tid), Some(started)) = (report["tid"].as_u64(), rfc3339_ns(&report["started"]))
        else {
            measured.unmatched_reports += 1;
            continue;
        };
        let found = starts
            .iter()
            .enumerate()
            .filter(|(i, (t, _))| *t == tid && !matched[*i])
            .min_by_key(|(_, (_, start))| start.abs_diff(started));
        match found {
            Some((index, &(_, printed))) if printed.abs_diff(started) < MATCH_WINDOW_NS => {
                matched[index] = true;
                // The target prints its start just before the call; on a busy
                // machine it can be preempted in between, so the request
                // began at the later of that and the report's own start
                // (which is truncated to the millisecond).
                let start = printed.max(started);
                let deadline = start + deadline_ns;
                let end_to_end = (line.read_ns as f64 - deadline as f64) / 1e6;
                measured.end_to_end_ms.push(end_to_end);
                let capture = match (report["elapsed_ms"].as_f64(), report["timeout_ms"].as_f64()) {
                    (Some(elapsed), Some(timeout)) => elapsed - timeout,
                    _ => f64::NAN,
                };
                measured.capture_ms.push(capture);
                measured.raw.push((start, end_to_end, capture));
                if report["state"] != kind.name() {
                    measured.wrong_state += 1;
                }
            }
            _ => measured.unmatched_reports += 1,
        }
    }
    measured.missed = matched.iter().filter(|m| !**m).count();
    measured
}

pub fn run(bench: &Bench) -> Result<Section> {
    let mut section = Section::new(TITLE);
    let target = bench.shown(&bench.target);
    section.method = vec![format!(
        "Requests of `stall_request` in the bench target stall for {} ms against a {TIMEOUT_MS} ms \
         deadline, spinning on a CPU (running: one thread) or sleeping in `nanosleep` (blocked: \
         {} threads at once), {GAP_MS} ms (randomized 0.5×–1.5×) apart so that starts do not lock \
         onto the sampler's phase. The target prints each request's start (CLOCK_REALTIME) just \
         before the call (a request starts at the later of that and the report's `started`, in \
         case the thread was preempted in between); the bench stamps each report line as it reads it from dogslow's stdout pipe. \
         Latency = report read − (request start + deadline): it includes capture, unwinding, \
         symbolization and the write. The capture column is the report's own `elapsed_ms − \
         timeout_ms` (whole milliseconds): when the stack was taken. dogslow runs with its \
         defaults: a {SAMPLE_HZ} Hz sampler and a 10 ms deadline scan.",
        TIMEOUT_MS + STALL_PAST_DEADLINE_MS,
        StallKind::Blocked.threads()
    )];
    section.commands = vec![
        format!(
            "{target} stalls running|blocked THREADS PER_THREAD {} {GAP_MS}",
            TIMEOUT_MS + STALL_PAST_DEADLINE_MS
        ),
        format!("dogslow attach --pid <target> --entry stall_request --timeout {TIMEOUT_MS}ms"),
    ];
    let mut table = Table::new(
        "Deadline to report on stdout, ms:",
        &[
            "stall",
            "stalls",
            "reported",
            "p50",
            "p99",
            "max",
            "first report",
            "p99 after it",
            "capture p50 / p99",
            "target (p99)",
        ],
    );
    let mut cold_notes = Vec::new();
    for kind in [StallKind::Running, StallKind::Blocked] {
        let measured = measure(bench, kind).with_context(|| format!("{} stalls", kind.name()))?;
        let raw_path = bench.work.join(format!("latency-{}.csv", kind.name()));
        let raw: String =
            std::iter::once("request_start_ns,deadline_to_stdout_ms,capture_ms\n".to_owned())
                .chain(
                    measured
                        .raw
                        .iter()
                        .map(|(start, e2e, capture)| format!("{start},{e2e:.3},{capture}\n")),
                )
                .collect();
        std::fs::write(&raw_path, raw)
            .with_context(|| format!("writing {}", raw_path.display()))?;
        let p = |values: &[f64], q: f64| percentile(values, q);
        let fmt = |v: Option<f64>| v.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.1}"));
        let p99 = p(&measured.end_to_end_ms, 99.0);
        let reported = measured.stalls - measured.missed;
        // The first report of a run pays for parsing the target's CFI and
        // DWARF and /proc/kallsyms; stalls whose deadline came before it was
        // out queued behind it.
        let deadline_ms = TIMEOUT_MS as f64;
        let read_ms = |(start, e2e, _): &(u64, f64, f64)| *start as f64 / 1e6 + deadline_ms + e2e;
        let first = measured
            .raw
            .iter()
            .min_by(|a, b| read_ms(a).total_cmp(&read_ms(b)))
            .copied();
        let (first_ms, queued, warm): (Option<f64>, usize, Vec<f64>) = match first {
            Some(first) => {
                let first_read = read_ms(&first);
                let deadline = |(start, ..): &(u64, f64, f64)| *start as f64 / 1e6 + deadline_ms;
                let warm: Vec<f64> = measured
                    .raw
                    .iter()
                    .filter(|r| deadline(r) > first_read)
                    .map(|r| r.1)
                    .collect();
                (Some(first.1), measured.raw.len() - warm.len(), warm)
            }
            None => (None, 0, Vec::new()),
        };
        let warm_p99 = p(&warm, 99.0);
        if let (Some(first_ms), Some(warm_p99)) = (first_ms, warm_p99)
            && p99.is_some_and(|p99| p99 > kind.target_ms())
            && warm_p99 <= kind.target_ms()
        {
            cold_notes.push(format!(
                "{} stalls: the first report took {first_ms:.1} ms and {queued} report(s) \
                     (its own included) waited behind it; after it, p99 is {warm_p99:.1} ms.",
                kind.name()
            ));
        }
        table.row(vec![
            kind.name().to_owned(),
            measured.stalls.to_string(),
            format!(
                "{reported}{}",
                if measured.wrong_state > 0 {
                    format!(" ({} with the wrong state)", measured.wrong_state)
                } else {
                    String::new()
                }
            ),
            fmt(p(&measured.end_to_end_ms, 50.0)),
            fmt(p99),
            fmt(p(&measured.end_to_end_ms, 100.0)),
            fmt(first_ms),
            fmt(warm_p99),
            format!(
                "{} / {}",
                fmt(p(&measured.capture_ms, 50.0)),
                fmt(p(&measured.capture_ms, 99.0))
            ),
            format!("≤ {:.1}", kind.target_ms()),
        ]);
        section.checks.push(Check::new(
            &format!(
                "{} stalls: p99 ≤ {:.1} ms, every stall reported once",
                kind.name(),
                kind.target_ms()
            ),
            format!(
                "p99 {} ms; {reported}/{} reported, {} extra",
                fmt(p99),
                measured.stalls,
                measured.unmatched_reports
            ),
            p99.map(|p99| {
                p99 <= kind.target_ms()
                    && measured.missed == 0
                    && measured.unmatched_reports == 0
                    && measured.wrong_state == 0
            }),
        ));
    }
    section.tables.push(table);
    if !cold_notes.is_empty() {
        section.notes.push(format!(
            "**Where the p99 target is missed, the first report is why.** {} The first report \
             of a process pays for whatever the reporter has not parsed yet (item 5), and every \
             report captured meanwhile waits behind it on the single reporting thread.",
            cold_notes.join(" ")
        ));
    }
    Ok(section)
}
