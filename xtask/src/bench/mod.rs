//! `cargo xtask bench`: what dogslow costs, measured on this machine in one
//! go, side by side with the kernel floor and with bpftrace, written to
//! BENCHMARKS.md. Each benchmark is one file; this one builds what they
//! need, runs them in turn and writes the results.
mod agent_cost;
mod floor;
mod latency;
mod overhead;
mod pgbench;
mod proc;
mod report;
mod stats;
mod switches;
mod unwind;

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use self::{
    proc::{Proc, SpawnOptions},
    report::{RunInfo, Section},
};

/// How much of each benchmark to run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Rounds of the per-request overhead matrix (every tool, every form).
    pub overhead_rounds: usize,
    /// Milliseconds of calls per measurement, after a warm-up.
    pub overhead_ms: u64,
    pub warmup_ms: u64,
    /// Stalls measured per kind (running, blocked).
    pub latency_stalls: usize,
    pub agent_rounds: usize,
    pub agent_phase: Duration,
    pub switch_rounds: usize,
    pub switch_ms: u64,
    pub unwind_runs: usize,
    pub unwind_warm_iterations: usize,
    /// Cycles of turns (each configuration once, between not-attached
    /// turns) in the pgbench run.
    pub pg_cycles: usize,
}

impl Settings {
    fn new(quick: bool) -> Self {
        if quick {
            Self {
                overhead_rounds: 1,
                overhead_ms: 150,
                warmup_ms: 20,
                latency_stalls: 10,
                agent_rounds: 1,
                agent_phase: Duration::from_secs(3),
                switch_rounds: 1,
                switch_ms: 200,
                unwind_runs: 2,
                unwind_warm_iterations: 20,
                pg_cycles: 2,
            }
        } else {
            Self {
                overhead_rounds: 5,
                overhead_ms: 500,
                warmup_ms: 50,
                latency_stalls: 60,
                agent_rounds: 3,
                agent_phase: Duration::from_secs(10),
                switch_rounds: 7,
                switch_ms: 1000,
                unwind_runs: 7,
                unwind_warm_iterations: 200,
                pg_cycles: 10,
            }
        }
    }
}

/// What every benchmark shares: paths and how to start the tools.
pub struct Bench {
    pub root: PathBuf,
    pub settings: Settings,
    pub dogslow: PathBuf,
    /// The C program the benchmarks drive (bench-targets/bench_target.c).
    pub target: PathBuf,
    pub unwind_bench: PathBuf,
    /// Scratch space: target/bench.
    pub work: PathBuf,
}

const READY_TIMEOUT: Duration = Duration::from_secs(60);

impl Bench {
    /// Starts the bench target in `args` mode and waits for its "ready".
    pub fn start_target(&self, args: &[&str]) -> Result<Proc> {
        let mut target = Proc::spawn("bench_target", Command::new(&self.target).args(args))?;
        target.wait_stdout(0, Duration::from_secs(10), "\"ready\"", |l| l == "ready")?;
        Ok(target)
    }

    /// Starts `dogslow ARGS` and waits until its probes are attached.
    pub fn start_dogslow(&self, args: &[String]) -> Result<Proc> {
        let mut agent = Proc::spawn_with(
            "dogslow",
            Command::new(&self.dogslow).args(args),
            SpawnOptions {
                stop_signal: Some(libc::SIGINT),
                ..SpawnOptions::default()
            },
        )?;
        agent.wait_stderr(READY_TIMEOUT, "\"dogslow: watching\"", |l| {
            l.starts_with("dogslow: watching")
        })?;
        Ok(agent)
    }

    /// Starts bpftrace on `pid` and waits until its probes are attached
    /// (bpftrace runs BEGIN after attaching every probe).
    pub fn start_bpftrace(&self, pid: u32, program: &str) -> Result<Proc> {
        let program = format!("BEGIN {{ printf(\"ready\\n\"); }} {program}");
        let mut tracer = Proc::spawn_with(
            "bpftrace",
            Command::new("bpftrace").args(["-p", &pid.to_string(), "-e", &program]),
            SpawnOptions {
                stop_signal: Some(libc::SIGINT),
                ..SpawnOptions::default()
            },
        )?;
        tracer.wait_stdout(0, READY_TIMEOUT, "bpftrace's BEGIN", |l| l == "ready")?;
        Ok(tracer)
    }

    /// `path` relative to the workspace root, for the commands shown in
    /// BENCHMARKS.md.
    pub fn shown(&self, path: &Path) -> String {
        path.strip_prefix(&self.root)
            .unwrap_or(path)
            .display()
            .to_string()
    }
}

/// Runs every benchmark (or those whose title contains `only`) and writes
/// BENCHMARKS.md; a quick or partial run writes target/bench/BENCHMARKS-quick.md
/// or BENCHMARKS-partial.md instead, so it never overwrites the full results.
pub fn run(root: &Path, dogslow: &Path, quick: bool, only: Option<&str>) -> Result<()> {
    let started = Instant::now();
    proc::install_signal_handlers();
    let settings = Settings::new(quick);
    preflight()?;
    let work = root.join("target/bench");
    std::fs::create_dir_all(&work).with_context(|| format!("creating {}", work.display()))?;
    let info_start = run_info(root, quick, only);
    let target = build_target(root, &work)?;
    let unwind_bench = unwind::build(root)?;
    let bench = Bench {
        root: root.to_owned(),
        settings,
        dogslow: dogslow.to_owned(),
        target,
        unwind_bench,
        work,
    };

    type Benchmark = fn(&Bench) -> Result<Section>;
    let benchmarks: [(&str, Benchmark); 6] = [
        (overhead::TITLE, overhead::run),
        (latency::TITLE, latency::run),
        (agent_cost::TITLE, agent_cost::run),
        (switches::TITLE, switches::run),
        (unwind::TITLE, unwind::run),
        (pgbench::TITLE, pgbench::run),
    ];
    let mut sections = Vec::new();
    for (title, benchmark) in benchmarks {
        if only.is_some_and(|only| !title.to_lowercase().contains(&only.to_lowercase())) {
            continue;
        }
        eprintln!("xtask bench: {title}");
        let section_started = Instant::now();
        let section = match benchmark(&bench) {
            Ok(section) => section,
            Err(err) => {
                eprintln!("xtask bench: {title} failed: {err:#}");
                Section::failed(title, &err)
            }
        };
        eprintln!(
            "xtask bench: {title} took {:.0} s",
            section_started.elapsed().as_secs_f64()
        );
        sections.push(section);
        if proc::check_interrupted().is_err() {
            bail!("interrupted; BENCHMARKS.md left as it was");
        }
    }

    let mut info = info_start;
    info.duration = format!("{:.0} s", started.elapsed().as_secs_f64());
    info.load_end = load_average();
    let text = report::markdown(&info, &sections);
    let out = if only.is_some() {
        bench.work.join("BENCHMARKS-partial.md")
    } else if quick {
        bench.work.join("BENCHMARKS-quick.md")
    } else {
        root.join("BENCHMARKS.md")
    };
    std::fs::write(&out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("xtask bench: wrote {}", out.display());
    let failed: Vec<&str> = sections
        .iter()
        .filter(|s| s.error.is_some())
        .map(|s| s.title.as_str())
        .collect();
    if !failed.is_empty() {
        bail!(
            "benchmarks failed: {} (see {})",
            failed.join(", "),
            out.display()
        );
    }
    Ok(())
}

/// Every tool the benchmarks start, present, or a clear message.
fn preflight() -> Result<()> {
    let mut missing = Vec::new();
    for tool in ["gcc", "bpftrace", "git"] {
        if which(tool).is_none() {
            missing.push(tool.to_owned());
        }
    }
    if let Err(err) = pgbench::find_install() {
        missing.push(format!("{err:#}"));
    }
    if !missing.is_empty() {
        bail!(
            "the benchmarks need: {}; `cargo xtask setup` installs them (Debian packages gcc, bpftrace, postgresql)",
            missing.join("; ")
        );
    }
    Ok(())
}

pub fn which(tool: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(tool))
            .find(|path| path.is_file())
    })
}

/// The request-function copies and their required first bytes: the bench
/// fails if a compiler ever lays them out differently.
pub const ENTRY_KINDS: [(&str, &[u8], &str); 3] = [
    ("", &[0x55], "`push %rbp` (emulated: one int3 trap)"),
    (
        "_endbr",
        &[0xf3, 0x0f, 0x1e, 0xfa],
        "`endbr64` (int3 trap + out-of-line single-step)",
    ),
    (
        "_nop5",
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        "5-byte NOP `nopl 0x0(%rax,%rax,1)` (optimized by 6.18: no trap)",
    ),
];

/// The flags each file of the bench target is compiled with (shown in
/// BENCHMARKS.md too).
pub const TARGET_SOURCES: [(&str, &[&str]); 4] = [
    ("bench_target.c", &[]),
    ("requests.c", &[]),
    ("requests_endbr.c", &["-fcf-protection=full"]),
    ("requests_nop5.c", &["-pg", "-mfentry", "-mnop-mcount"]),
];
pub const TARGET_CFLAGS: [&str; 5] = ["-O2", "-g", "-fno-pie", "-fno-omit-frame-pointer", "-Wall"];

/// Compiles bench-targets/ into target/bench/bench_target and checks the
/// first bytes of every request function.
fn build_target(root: &Path, work: &Path) -> Result<PathBuf> {
    let sources = root.join("xtask/bench-targets");
    let mut objects = Vec::new();
    for (source, extra) in TARGET_SOURCES {
        let object = work.join(source.replace(".c", ".o"));
        proc::output(
            Command::new("gcc")
                .args(TARGET_CFLAGS)
                .args(extra)
                .arg("-I")
                .arg(&sources)
                .arg("-c")
                .arg(sources.join(source))
                .arg("-o")
                .arg(&object),
        )?;
        objects.push(object);
    }
    let binary = work.join("bench_target");
    proc::output(
        Command::new("gcc")
            .args(["-no-pie", "-pthread", "-o"])
            .arg(&binary)
            .args(&objects),
    )?;
    for (suffix, bytes, what) in ENTRY_KINDS {
        for function in ["bench_request", "bench_begin", "bench_end"] {
            for copy in 0..5 {
                let name = format!("{function}{suffix}_{copy}");
                let found = floor::function(&binary, &name)?;
                if !found.first_bytes.starts_with(bytes) {
                    bail!(
                        "{name} in {} begins with {:02x?}, not {what} ({bytes:02x?}): the compiler laid it out differently",
                        binary.display(),
                        found.first_bytes
                    );
                }
            }
        }
    }
    Ok(binary)
}

fn first_line_of(command: &mut Command) -> String {
    proc::output(command)
        .ok()
        .and_then(|out| out.lines().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".to_owned())
}

fn run_info(root: &Path, quick: bool, only: Option<&str>) -> RunInfo {
    let read = |path: &str| std::fs::read_to_string(path).unwrap_or_default();
    let cpuinfo = read("/proc/cpuinfo");
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let cpu_model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_default();
    let memory = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| format!("{:.1} GiB", kib as f64 / (1024.0 * 1024.0)))
        .unwrap_or_default();
    let git = |args: &[&str]| {
        proc::output(Command::new("git").arg("-C").arg(root).args(args)).unwrap_or_default()
    };
    let mut revision = git(&["rev-parse", "--short=12", "HEAD"]).trim().to_owned();
    let dirty = git(&[
        "status",
        "--porcelain",
        "--untracked-files=no",
        "--",
        ".",
        ":!BENCHMARKS.md",
    ]);
    if !dirty.trim().is_empty() {
        revision.push_str(" (with uncommitted changes)");
    }
    let postgres = pgbench::find_install()
        .map(|pg| first_line_of(Command::new(pg.bin.join("postgres")).arg("--version")))
        .unwrap_or_else(|_| "not installed".into());
    RunInfo {
        date: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        revision,
        cpus: cpus.to_string(),
        cpu_model,
        memory,
        kernel: read("/proc/sys/kernel/osrelease").trim().to_owned(),
        tools: vec![
            (
                "bpftrace".into(),
                first_line_of(Command::new("bpftrace").arg("--version")),
            ),
            (
                "gcc".into(),
                first_line_of(Command::new("gcc").arg("--version")),
            ),
            ("postgres".into(), postgres),
        ],
        command: format!(
            "cargo xtask bench{}{}",
            if quick { " --quick" } else { "" },
            only.map(|o| format!(" --only {o}")).unwrap_or_default()
        ),
        mode: if quick {
            "quick (fewer and shorter runs: checks the bench works; do not quote these numbers)"
                .into()
        } else {
            "full".into()
        },
        duration: String::new(),
        load: load_average(),
        load_end: String::new(),
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
