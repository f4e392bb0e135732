//! Compiles the small programs the integration tests stall on purpose, with
//! the flags each test needs (frame pointers or not, stripped or not).
use std::{env, path::PathBuf, process::Command};

/// (output name, source, extra flags)
const C_TARGETS: &[(&str, &str, &[&str])] = &[
    (
        "slow_requests",
        "slow_requests.c",
        &["-O2", "-g", "-fno-omit-frame-pointer"],
    ),
    (
        "blocked_requests",
        "blocked_requests.c",
        &["-O2", "-g", "-pthread"],
    ),
    ("demo_server", "demo_server.c", &["-O2", "-g", "-pthread"]),
    ("threads", "threads.c", &["-O2", "-g", "-pthread"]),
    ("request_line", "request_line.c", &["-O2", "-g"]),
    (
        "chain",
        "chain.c",
        &["-O2", "-g", "-fomit-frame-pointer", "-pthread"],
    ),
    ("usdt_requests", "usdt_requests.c", &["-O2", "-g"]),
];

/// Further sources of a target. <sys/sdt.h> gives every USDT probe of a
/// translation unit a semaphore or none, so a program with both kinds has
/// two units.
const EXTRA_SOURCES: &[(&str, &[&str])] = &[("usdt_requests", &["usdt_plain.c"])];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("targets");
    std::fs::create_dir_all(&out).expect("create the targets directory");
    let sources = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("targets");
    println!("cargo:rerun-if-changed={}", sources.display());
    for (name, source, flags) in C_TARGETS {
        let extra = EXTRA_SOURCES
            .iter()
            .filter(|(target, _)| target == name)
            .flat_map(|(_, files)| files.iter().map(|file| sources.join(file)));
        let status = Command::new("gcc")
            .args(*flags)
            .arg("-o")
            .arg(out.join(name))
            .arg(sources.join(source))
            .args(extra)
            .status()
            .expect("gcc is needed to build the test programs (cargo xtask setup installs it)");
        assert!(
            status.success(),
            "compiling {source} failed (USDT programs need <sys/sdt.h>: cargo xtask setup \
             installs systemtap-sdt-dev)"
        );
    }
    // The same chain in Rust, release mode (no frame pointers by default).
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let status = Command::new(rustc)
        .args([
            "--edition",
            "2024",
            "-C",
            "opt-level=3",
            "-C",
            "debuginfo=2",
            "-o",
        ])
        .arg(out.join("chain_rust"))
        .arg(sources.join("chain.rs"))
        .status()
        .expect("run rustc for chain.rs");
    assert!(status.success(), "compiling chain.rs failed");
    // A stripped copy: no .symtab, no debug info, but .eh_frame kept.
    let status = Command::new("strip")
        .args(["--strip-all", "-o"])
        .arg(out.join("chain_stripped"))
        .arg(out.join("chain"))
        .status()
        .expect("strip (binutils) is needed");
    assert!(status.success(), "strip failed");
    println!("cargo:rustc-env=DOGSLOW_TEST_TARGETS={}", out.display());
}
