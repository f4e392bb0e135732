//! Item 5: the agent's per-report work, unwinding and symbolizing, cold and
//! warm, measured by dogslow-user/examples/unwind_bench.rs.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use super::{
    Bench, proc,
    report::{Section, Table},
    stats::{Summary, show},
};

pub const TITLE: &str = "Unwinding and symbolization";

/// Builds the example optimized, with line tables (like a target built with
/// `-g`), in cargo's `bench` profile so the release dogslow stays as it is.
const BUILD_ENV: (&str, &str) = ("CARGO_PROFILE_BENCH_DEBUG", "line-tables-only");

pub fn build(root: &Path) -> Result<PathBuf> {
    eprintln!("xtask bench: building the unwinding benchmark (bench profile, line tables)");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    crate::run(
        Command::new(cargo)
            .current_dir(root)
            .env(BUILD_ENV.0, BUILD_ENV.1)
            .args([
                "build",
                "--quiet",
                "--profile",
                "bench",
                "--package",
                "dogslow-user",
                "--example",
                "unwind_bench",
            ]),
    )?;
    let binary = root.join("target/release/examples/unwind_bench");
    if !binary.exists() {
        bail!("{} was not built", binary.display());
    }
    Ok(binary)
}

pub fn run(bench: &Bench) -> Result<Section> {
    let settings = &bench.settings;
    let mut runs = Vec::new();
    for _ in 0..settings.unwind_runs {
        proc::check_interrupted()?;
        let out = proc::output(
            Command::new(&bench.unwind_bench).arg(settings.unwind_warm_iterations.to_string()),
        )
        .context("running unwind_bench")?;
        let value: Value = serde_json::from_str(out.trim())
            .with_context(|| format!("unwind_bench printed `{}`", out.trim()))?;
        runs.push(value);
    }
    let field = |group: &str, step: &str| -> Option<Summary> {
        Summary::of(
            &runs
                .iter()
                .filter_map(|r| r[group][step].as_f64())
                .collect::<Vec<_>>(),
        )
    };
    let first = &runs[0];
    let mut section = Section::new(TITLE);
    section.method = vec![format!(
        "`unwind_bench` recurses 30 calls deep, then captures its own registers and {} bytes of \
         its stack above the stack pointer — what dogslow's eBPF side records for a stalled \
         thread — and unwinds (DWARF CFI via framehop) and symbolizes (blazesym, with file and \
         line) that capture as the reporter does, plus {} kernel return addresses of a blocked \
         thread's wait path (from /proc/kallsyms). The stack has {} user frames and must come \
         out whole ({} `recurse` frames, through `main` to `_start`) or the bench fails. Cold: a new \
         unwinder and symbolizer and no warm-up, so the first report parses the binary's CFI \
         and DWARF and /proc/kallsyms. The reporter warms up instead when it first sees a \
         process (kallsyms: at start): that warm-up and the first report after it are timed \
         with an unwinder and symbolizer of their own. Warm: the cold ones reused, median of \
         {} reports. Each run is a fresh process; {} runs.",
        first["stack_bytes"],
        first["kernel_frames"],
        first["frames"],
        first["recurse_frames"],
        settings.unwind_warm_iterations,
        settings.unwind_runs
    )];
    section.commands = vec![
        format!(
            "{}={} cargo build --profile bench -p dogslow-user --example unwind_bench",
            BUILD_ENV.0, BUILD_ENV.1
        ),
        format!(
            "{} {}",
            bench.shown(&bench.unwind_bench),
            settings.unwind_warm_iterations
        ),
    ];
    let mut table = Table::new(
        "Microseconds per report:",
        &[
            "",
            "unwind",
            "symbolize user frames",
            "symbolize kernel frames",
            "total",
        ],
    );
    table.row(vec![
        "cold: first report, no warm-up".into(),
        show(field("cold_us", "unwind"), 0),
        show(field("cold_us", "user_symbolize"), 0),
        show(field("cold_us", "kernel_symbolize"), 0),
        show(field("cold_us", "total"), 0),
    ]);
    table.row(vec![
        "warm-up when a process is first seen (kernel: at start)".into(),
        show(field("warmup_us", "unwind"), 0),
        show(field("warmup_us", "user_symbolize"), 0),
        show(field("warmup_us", "kernel_symbolize"), 0),
        show(field("warmup_us", "total"), 0),
    ]);
    table.row(vec![
        "first report after the warm-up".into(),
        show(field("after_warmup_us", "unwind"), 1),
        show(field("after_warmup_us", "user_symbolize"), 1),
        show(field("after_warmup_us", "kernel_symbolize"), 1),
        show(field("after_warmup_us", "total"), 1),
    ]);
    table.row(vec![
        "warm: later reports".into(),
        show(field("warm_us", "unwind"), 1),
        show(field("warm_us", "user_symbolize"), 1),
        show(field("warm_us", "kernel_symbolize"), 1),
        show(field("warm_us", "total"), 1),
    ]);
    section.tables.push(table);
    Ok(section)
}
