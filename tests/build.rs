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
    println!("cargo:rustc-env=DOGSLOW_TEST_TARGETS={}", out.display());
}
