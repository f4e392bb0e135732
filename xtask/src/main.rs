//! The developer front door: `cargo xtask setup | build | image | demo | test | bench`.
//! Every command sets up what is missing first (idempotent, fast when all is
//! present), so each works on a fresh machine of this project's kind.
mod bench;
mod image;
mod setup;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "xtask", about = "dogslow's developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain pieces and packages dogslow needs.
    Setup,
    /// Build dogslow (release) and the test programs.
    Build,
    /// Build the container image (deploy/Containerfile) around the static
    /// binary, and take the binary back out of it to target/image/dogslow.
    Image,
    /// Start a bundled demo server with slow requests and watch it with dogslow.
    Demo {
        /// How long to watch.
        #[arg(long, default_value = "20s")]
        duration: String,
    },
    /// Run every test: unit tests, then the root-only eBPF integration tests.
    Test {
        /// Only run integration tests whose name contains this.
        filter: Option<String>,
    },
    /// Measure what dogslow costs, beside the kernel floor and bpftrace; writes BENCHMARKS.md.
    Bench {
        /// A minute or two of fewer, shorter runs (CI: checks the bench works).
        #[arg(long)]
        quick: bool,
        /// Only the benchmarks whose title contains this (results go to target/bench).
        #[arg(long)]
        only: Option<String>,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root();
    match cli.command {
        Task::Setup => setup::all(),
        Task::Build => {
            setup::all()?;
            build(&root)
        }
        Task::Image => {
            setup::all()?;
            image::build(&root).map(|_| ())
        }
        Task::Demo { duration } => {
            setup::all()?;
            build(&root)?;
            demo(&root, &duration)
        }
        Task::Test { filter } => {
            setup::all()?;
            build(&root)?;
            test(&root, filter.as_deref())
        }
        Task::Bench { quick, only } => {
            setup::all()?;
            build(&root)?;
            require_root("the benchmarks")?;
            bench::run(&root, &dogslow_bin(&root), quick, only.as_deref())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Runs a command, failing with its name if it fails.
pub fn run(command: &mut Command) -> Result<()> {
    let status = command
        .status()
        .with_context(|| format!("cannot start {command:?}"))?;
    if !status.success() {
        bail!("{command:?} failed with {status}");
    }
    Ok(())
}

fn cargo() -> Command {
    Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
}

fn build(root: &Path) -> Result<()> {
    eprintln!("xtask: building dogslow (release)");
    run(cargo().current_dir(root).args([
        "build",
        "--release",
        "--package",
        "dogslow-user",
        "--bin",
        "dogslow",
    ]))
}

fn dogslow_bin(root: &Path) -> PathBuf {
    root.join("target/release/dogslow")
}

fn require_root(what: &str) -> Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("{what} loads eBPF programs and must run as root: run it again with sudo");
    }
    Ok(())
}

fn demo(root: &Path, duration: &str) -> Result<()> {
    require_root("the demo")?;
    let targets = root.join("target/demo");
    std::fs::create_dir_all(&targets)?;
    let demo_bin = targets.join("demo_server");
    run(Command::new("gcc")
        .args(["-O2", "-g", "-pthread", "-o"])
        .arg(&demo_bin)
        .arg(root.join("tests/targets/demo_server.c")))?;
    eprintln!(
        "xtask: starting the demo server (requests take 5-50 ms; some stall for 2 s on the CPU, on a lock or in recv)"
    );
    let mut server = Command::new(&demo_bin)
        .arg("--forever")
        .stdout(Stdio::null())
        .spawn()
        .context("cannot start the demo server")?;
    let pid = server.id().to_string();
    eprintln!(
        "xtask: running: dogslow attach --pid {pid} --entry handle_request --timeout 500ms --format text --duration {duration}"
    );
    let status = Command::new(dogslow_bin(root))
        .args([
            "attach",
            "--pid",
            &pid,
            "--entry",
            "handle_request",
            "--timeout",
            "500ms",
            "--format",
            "text",
            "--duration",
            duration,
        ])
        .status();
    let _ = server.kill();
    let _ = server.wait();
    let status = status.context("cannot start dogslow")?;
    if !status.success() {
        bail!("dogslow failed with {status}");
    }
    Ok(())
}

fn test(root: &Path, filter: Option<&str>) -> Result<()> {
    eprintln!("xtask: unit tests");
    // The eBPF crate only builds for the bpf target (its host test binary
    // has no `main`); dogslow-user's build.rs builds and embeds it.
    run(cargo().current_dir(root).args([
        "test",
        "--workspace",
        "--exclude",
        "dogslow-tests",
        "--exclude",
        "dogslow-ebpf",
    ]))?;
    require_root("the integration tests")?;
    eprintln!("xtask: eBPF integration tests (root, real kernel, one at a time)");
    let mut command = cargo();
    command
        .current_dir(root)
        .env("DOGSLOW_BIN", dogslow_bin(root))
        .args([
            "test",
            "--package",
            "dogslow-tests",
            "--",
            "--test-threads=1",
        ]);
    if let Some(filter) = filter {
        command.arg(filter);
    }
    run(&mut command)
}
