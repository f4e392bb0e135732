//! Item 1: what one request costs the target, with no probes, with the
//! kernel floor (empty programs), with dogslow and with bpftrace doing the
//! same job, for both request forms and three kinds of entry instruction.
use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context as _, Result, bail};

use super::{
    Bench, ENTRY_KINDS, TARGET_CFLAGS, TARGET_SOURCES,
    floor::{self, Mechanism, Probe},
    proc::Proc,
    report::{Check, Section, Table},
    stats::{Summary, show},
};

pub const TITLE: &str = "Per-request overhead";

/// One request form on one kind of entry instruction.
struct Family {
    /// `run FUNC` in the bench target.
    func: String,
    /// Entry and exit function names without the copy suffix (`_0` .. `_4`).
    entry: String,
    exit: Option<String>,
    form: &'static str,
    entry_kind: &'static str,
}

fn families() -> Vec<Family> {
    let mut families = Vec::new();
    for (suffix, _, entry_kind) in ENTRY_KINDS {
        families.push(Family {
            func: format!("request{suffix}"),
            entry: format!("bench_request{suffix}"),
            exit: None,
            form: "function-scoped (uprobe + uretprobe)",
            entry_kind,
        });
        families.push(Family {
            func: format!("exit{suffix}"),
            entry: format!("bench_begin{suffix}"),
            exit: Some(format!("bench_end{suffix}")),
            form: "`--exit` form (uprobe + uprobe)",
            entry_kind,
        });
    }
    families
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tool {
    None,
    /// Empty programs attached as aya attaches dogslow's (perf events).
    Floor,
    /// Empty programs through uprobe_multi links.
    FloorMulti,
    Dogslow,
    Bpftrace,
}

const TOOLS: [Tool; 5] = [
    Tool::None,
    Tool::Floor,
    Tool::FloorMulti,
    Tool::Dogslow,
    Tool::Bpftrace,
];

/// The bench target has five identical copies of every request function;
/// each tool probes its own copy.
const COPIES: usize = 5;

fn copy_name(base: &str, copy: usize) -> String {
    format!("{base}_{copy}")
}

fn bpftrace_program(binary: &str, family: &Family, copy: usize) -> String {
    let entry = copy_name(&family.entry, copy);
    let start = format!("uprobe:{binary}:{entry} {{ @start[tid] = nsecs; }}");
    let end = match &family.exit {
        None => format!("uretprobe:{binary}:{entry} {{ delete(@start[tid]); }}"),
        Some(exit) => format!(
            "uprobe:{binary}:{} {{ delete(@start[tid]); }}",
            copy_name(exit, copy)
        ),
    };
    format!("{start} {end}")
}

fn dogslow_args(pid: u32, family: &Family, copy: usize) -> Vec<String> {
    let mut args = vec![
        "attach".to_owned(),
        "--pid".to_owned(),
        pid.to_string(),
        "--entry".to_owned(),
        copy_name(&family.entry, copy),
    ];
    if let Some(exit) = &family.exit {
        args.extend(["--exit".to_owned(), copy_name(exit, copy)]);
    }
    // A deadline no request reaches: this measures the path every request takes.
    args.extend(["--timeout".to_owned(), "1h".to_owned()]);
    args
}

/// What one tool attached; detaches when dropped.
enum Attached {
    Nothing,
    Floor(#[allow(dead_code)] floor::FloorProbes),
    Tool(Proc),
}

/// Asks the target to call the copies of `func` in turn for `ms`
/// milliseconds; the median ns per call of each copy.
pub fn run_calls(target: &mut Proc, func: &str, ms: u64) -> Result<[f64; COPIES]> {
    let from = target.stdout.len();
    target.send(&format!("run {func} {ms}"))?;
    let timeout = Duration::from_millis(ms * 4 + 30_000);
    let (_, line) = target.wait_stdout(from, timeout, "the loop's result", |l| {
        l.starts_with("ran ") || l.starts_with("error")
    })?;
    let fields: Vec<f64> = line
        .text
        .split_whitespace()
        .skip(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    fields
        .try_into()
        .map_err(|_| anyhow::anyhow!("bench_target said `{}`", line.text))
}

fn attach(bench: &Bench, pid: u32, family: &Family, tool: Tool, copy: usize) -> Result<Attached> {
    let binary = bench.target.display().to_string();
    Ok(match tool {
        Tool::None => Attached::Nothing,
        Tool::Floor | Tool::FloorMulti => {
            let mechanism = if tool == Tool::Floor {
                Mechanism::PerfEvent
            } else {
                Mechanism::UprobeMulti
            };
            let entry = floor::function(&bench.target, &copy_name(&family.entry, copy))?;
            let end = match &family.exit {
                None => Probe::ret(entry.file_offset),
                Some(exit) => Probe::entry(
                    floor::function(&bench.target, &copy_name(exit, copy))?.file_offset,
                ),
            };
            Attached::Floor(floor::attach(
                mechanism,
                &bench.target,
                &[Probe::entry(entry.file_offset), end],
                Some(pid),
            )?)
        }
        Tool::Dogslow => Attached::Tool(bench.start_dogslow(&dogslow_args(pid, family, copy))?),
        Tool::Bpftrace => {
            Attached::Tool(bench.start_bpftrace(pid, &bpftrace_program(&binary, family, copy))?)
        }
    })
}

/// One round of one family: every tool attached at once, each to its own
/// copy (rotated by `round`), calls interleaved; ns per call by tool.
fn measure(bench: &Bench, family: &Family, round: usize) -> Result<BTreeMap<Tool, f64>> {
    let mut target = bench.start_target(&["loop"])?;
    let pid = target.pid();
    let copy_of = |index: usize| (index + round) % COPIES;
    let mut attached = Vec::new();
    for (index, tool) in TOOLS.iter().enumerate() {
        attached.push(
            attach(bench, pid, family, *tool, copy_of(index))
                .with_context(|| format!("attaching {tool:?}"))?,
        );
    }
    let settings = &bench.settings;
    // The warm-up also takes the first hits, which is when 6.18 rewrites a
    // NOP-5 probe into a call.
    run_calls(&mut target, &family.func, settings.warmup_ms)?;
    let per_copy = run_calls(&mut target, &family.func, settings.overhead_ms)?;
    for tool in attached {
        if let Attached::Tool(mut tool_proc) = tool {
            if !tool_proc.is_running() {
                bail!("exited during the measurement: {}", tool_proc.why());
            }
            tool_proc.stop(Duration::from_secs(10));
        }
    }
    Ok(TOOLS
        .iter()
        .enumerate()
        .map(|(index, tool)| (*tool, per_copy[copy_of(index)]))
        .collect())
}

/// Per-round measurements of one family: tool -> ns per call, by round.
type Rounds = BTreeMap<Tool, Vec<f64>>;

pub fn run(bench: &Bench) -> Result<Section> {
    let settings = &bench.settings;
    let families = families();
    let mut results: Vec<Rounds> = families.iter().map(|_| Rounds::new()).collect();
    for round in 0..settings.overhead_rounds {
        for (family, rounds) in families.iter().zip(&mut results) {
            let measured =
                measure(bench, family, round).with_context(|| format!("{}_N", family.entry))?;
            for (tool, ns) in measured {
                rounds.entry(tool).or_default().push(ns);
            }
        }
        eprintln!(
            "xtask bench:   overhead round {}/{} done",
            round + 1,
            settings.overhead_rounds
        );
    }
    Ok(section(bench, &families, &results))
}

/// Per-round cost over no probes, in ns.
fn added(rounds: &Rounds, tool: Tool) -> Vec<f64> {
    let none = rounds.get(&Tool::None).cloned().unwrap_or_default();
    rounds
        .get(&tool)
        .map(|v| v.iter().zip(&none).map(|(t, n)| t - n).collect())
        .unwrap_or_default()
}

fn ratios(numerator: &[f64], denominator: &[f64]) -> Vec<f64> {
    numerator
        .iter()
        .zip(denominator)
        .filter(|(_, d)| **d > 0.0)
        .map(|(n, d)| n / d)
        .collect()
}

fn section(bench: &Bench, families: &[Family], results: &[Rounds]) -> Section {
    let settings = &bench.settings;
    let target = bench.shown(&bench.target);
    let mut section = Section::new(TITLE);
    section.method = vec![
        format!(
            "The bench target has five identical copies of each request function. In each round \
             every tool attaches at once to the one target process, each to its own copy \
             (rotated every round; one copy stays unprobed), and the target calls the five \
             copies in turn, a batch of 64 calls each, for {} ms after a {} ms warm-up that \
             also takes the first probe hits. A tool's time per request is the median of its \
             copy's batches. So every tool is measured in the same milliseconds as the \
             baseline and the others, which cancels the drift of a shared machine. {} rounds; \
             costs are per-round differences against the unprobed copy, and ratios are taken \
             per round, then summarized.",
            settings.warmup_ms.max(settings.overhead_ms),
            settings.warmup_ms,
            settings.overhead_rounds
        ),
        "**Kernel floor**: the bench's own empty BPF program (`r0 = 0; exit`) on the same uprobe \
         and uretprobe (or the two uprobes), attached exactly as aya attaches dogslow's \
         (`perf_event_open` on the uprobe PMU for the one process, then a BPF perf link): the \
         price of the probes alone, before any program does work; the ratios use this floor. \
         The same empty program through a `uprobe_multi` link (kernel 6.6+; aya 0.14 cannot \
         create one) is shown beside it. \
         **bpftrace** does the same job as dogslow's request probes: the entry stores the start \
         time per thread in a hash map, the return (or exit) deletes it."
            .to_owned(),
        format!(
            "The same three functions (`bench_request`; `bench_begin`/`bench_end`) are compiled \
             three times from `xtask/bench-targets/requests.c`, differing only in their first \
             instruction, which the bench checks: {}.",
            ENTRY_KINDS
                .iter()
                .map(|(suffix, _, what)| format!("`*{}`: {what}", suffix))
                .collect::<Vec<_>>()
                .join("; ")
        ),
    ];
    let flags = TARGET_CFLAGS.join(" ");
    section.commands = TARGET_SOURCES
        .iter()
        .map(|(source, extra)| {
            format!(
                "gcc {flags} {} -c xtask/bench-targets/{source}",
                extra.join(" ")
            )
            .replace("  ", " ")
        })
        .chain([
            format!("gcc -no-pie -pthread -o {target} *.o"),
            format!("{target} loop   # then: run FUNC MS"),
            "dogslow attach --pid <target> --entry bench_request_N --timeout 1h".to_owned(),
            "dogslow attach --pid <target> --entry bench_begin_N --exit bench_end_N --timeout 1h"
                .to_owned(),
            format!(
                "bpftrace -p <target> -e '{}'",
                bpftrace_program(&target, &families[0], 0).replace("_0", "_N")
            ),
            format!(
                "bpftrace -p <target> -e '{}'",
                bpftrace_program(&target, &families[1], 0).replace("_0", "_N")
            ),
        ])
        .collect();

    let mut per_call = Table::new(
        "Time per request, ns (the loop's and the batch timing's own cost included):",
        &[
            "request form",
            "entry instruction",
            "no probes",
            "kernel floor",
            "floor, uprobe_multi",
            "dogslow",
            "bpftrace",
        ],
    );
    let mut costs = Table::new(
        "Cost per request over no probes, ns, and ratios (per round, then median (min–max)):",
        &[
            "request form",
            "entry instruction",
            "kernel floor",
            "floor, uprobe_multi",
            "dogslow",
            "bpftrace",
            "dogslow / floor",
            "dogslow / bpftrace",
        ],
    );
    let mut family_costs = Vec::new();
    let mut above_bpftrace = Vec::new();
    for (family, rounds) in families.iter().zip(results) {
        let summary = |tool| Summary::of(rounds.get(&tool).map_or(&[][..], |v| v.as_slice()));
        per_call.row(vec![
            family.form.to_owned(),
            family.entry_kind.to_owned(),
            show(summary(Tool::None), 1),
            show(summary(Tool::Floor), 0),
            show(summary(Tool::FloorMulti), 0),
            show(summary(Tool::Dogslow), 0),
            show(summary(Tool::Bpftrace), 0),
        ]);
        let floor_cost = added(rounds, Tool::Floor);
        let dogslow_cost = added(rounds, Tool::Dogslow);
        let bpftrace_cost = added(rounds, Tool::Bpftrace);
        let vs_floor = Summary::of(&ratios(&dogslow_cost, &floor_cost));
        let vs_bpftrace = Summary::of(&ratios(&dogslow_cost, &bpftrace_cost));
        costs.row(vec![
            family.form.to_owned(),
            family.entry_kind.to_owned(),
            show(Summary::of(&floor_cost), 0),
            show(Summary::of(&added(rounds, Tool::FloorMulti)), 0),
            show(Summary::of(&dogslow_cost), 0),
            show(Summary::of(&bpftrace_cost), 0),
            show(vs_floor, 2),
            show(vs_bpftrace, 2),
        ]);
        let label = format!("{}, entry {}", short_form(family), short_entry(family));
        section.checks.push(Check::new(
            &format!("dogslow ≤ 1.05 × kernel floor ({label})"),
            format!("{}×", show(vs_floor, 3)),
            vs_floor.map(|s| s.median <= 1.05),
        ));
        section.checks.push(Check::new(
            &format!("dogslow ≤ bpftrace ({label})"),
            format!("{}×", show(vs_bpftrace, 3)),
            vs_bpftrace.map(|s| s.median <= 1.0),
        ));
        let over_bpftrace: Vec<f64> = dogslow_cost
            .iter()
            .zip(&bpftrace_cost)
            .map(|(d, b)| d - b)
            .collect();
        if vs_bpftrace.is_some_and(|r| r.median > 1.0)
            && let Some(extra) = Summary::of(&over_bpftrace)
        {
            above_bpftrace.push(format!(
                "{}, entry {}: {} ns",
                short_form(family),
                short_entry(family),
                extra.show(0)
            ));
        }
        family_costs.push((
            family,
            Summary::of(&floor_cost),
            Summary::of(&dogslow_cost),
            vs_floor,
        ));
    }
    section.tables = vec![per_call, costs];
    section.notes = notes(&family_costs);
    if !above_bpftrace.is_empty() {
        section.notes.push(format!(
            "**Where dogslow costs more than bpftrace** (per request, per-round difference): {}. \
             bpftrace's programs for this job are one map update at the entry and one delete at \
             the end; what dogslow does beyond that (its target settings, counters, nesting \
             depth and completion records) is in dogslow-ebpf/src/request.rs.",
            above_bpftrace.join("; ")
        ));
    }
    section
}

fn short_form(family: &Family) -> &'static str {
    if family.exit.is_some() {
        "--exit form"
    } else {
        "function-scoped"
    }
}

fn short_entry(family: &Family) -> &'static str {
    if family.func.ends_with("_nop5") {
        "NOP-5"
    } else if family.func.ends_with("_endbr") {
        "endbr64"
    } else {
        "push %rbp"
    }
}

type FamilyCost<'a> = (
    &'a Family,
    Option<Summary>,
    Option<Summary>,
    Option<Summary>,
);

/// What the numbers say, written from them.
fn notes(costs: &[FamilyCost<'_>]) -> Vec<String> {
    let mut notes = Vec::new();
    let cost_of = |form_exit: bool, entry: &str| {
        costs
            .iter()
            .find(|(f, ..)| f.exit.is_some() == form_exit && short_entry(f) == entry)
            .and_then(|(_, _, dogslow, _)| *dogslow)
            .map(|s| s.median)
    };
    if let (Some(push), Some(endbr), Some(nop5), Some(exit_nop5)) = (
        cost_of(false, "push %rbp"),
        cost_of(false, "endbr64"),
        cost_of(false, "NOP-5"),
        cost_of(true, "NOP-5"),
    ) {
        notes.push(format!(
            "**The entry instruction decides the price.** A function-scoped request under dogslow \
             costs {endbr:.0} ns when the function begins with `endbr64` (any instruction uprobes \
             cannot emulate: `endbr64`, `sub $N,%rsp`, a RIP-relative `mov`; the kernel traps, then \
             single-steps it out of line, a second trap, which is what is slow in this VM), \
             {push:.0} ns when it begins with `push %rbp` (emulated: one trap) and {nop5:.0} ns \
             when it begins with a 5-byte NOP, which kernel 6.18 rewrites into a call to a \
             trampoline (no trap at all); with `--exit` on two NOP-5 entries, {exit_nop5:.0} ns."
        ));
    }
    notes.push(
        "**How a user gets the cheap path:** make the probed instruction a 5-byte NOP \
         (`0f 1f 44 00 00`). For C and C++ built with gcc, compile the files holding the request \
         functions with `-pg -mfentry -mnop-mcount` and link without `-pg`: every function then \
         begins with that NOP (this is how the bench builds its `*_nop5` copies; gcc accepts \
         `-mnop-mcount` only for non-PIC code, i.e. `-fno-pie` executables). Otherwise probe \
         functions built with frame pointers (`-fno-omit-frame-pointer`: they begin with the \
         emulated `push %rbp`), and avoid entries that begin with `endbr64` (`-fcf-protection`, \
         the Ubuntu and Fedora default) or other instructions that need a single-step. With a \
         NOP-5 entry the uretprobe return dominates; the `--exit` form on two NOP-5 points \
         (function entries or USDT-style markers placed as 5-byte NOPs) is the cheapest. \
         `dogslow attach --entry FUNC` probes offset 0, i.e. the NOP itself."
            .to_owned(),
    );
    let over: Vec<String> = costs
        .iter()
        .filter(|(.., ratio)| ratio.is_some_and(|r| r.median > 1.05))
        .map(|(family, floor, dogslow, ratio)| {
            let extra = match (floor, dogslow) {
                (Some(floor), Some(dogslow)) => format!("{:.0}", dogslow.median - floor.median),
                _ => "?".to_owned(),
            };
            format!(
                "{}, entry {}: {extra} ns more than the floor ({}×)",
                short_form(family),
                short_entry(family),
                show(*ratio, 2)
            )
        })
        .collect();
    if !over.is_empty() {
        notes.push(format!(
            "**Where dogslow is above 1.05 × the floor:** {}. The floor runs no instructions; \
             dogslow's request programs (dogslow-ebpf/src/request.rs) do the bookkeeping the job \
             needs, a fixed cost of the same order as bpftrace's for the same job (see dogslow / \
             bpftrace). So the ratio to the floor is large where the probe itself is cheap \
             (NOP-5, emulated `push`) and small where it is expensive (single-stepped): no \
             program that records a request start per thread can be within 5 % of an empty one \
             on a 0.4 µs probe.",
            over.join("; ")
        ));
    }
    notes
}
