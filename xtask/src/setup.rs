//! Installs what building and testing dogslow needs, checking first so that
//! a second run costs a few process spawns (see ../shared/TOOLCHAIN.md).
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};

use crate::run;

/// Debian packages: LLVM 22 for bpf-linker, a C compiler and <sys/sdt.h>
/// (USDT probes) for the test programs, and the real peers and servers the
/// tests and benchmarks use; for the container image, musl-gcc (C
/// dependencies such as ring compile with it for the static binary), podman
/// to build the image, the CA bundle it ships, python3-venv for the
/// manifest validator, and Go for the test that dogslow refuses Go programs.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "gcc",
    "libc6-dev",
    "systemtap-sdt-dev",
    "bpftrace",
    "postgresql",
    "python3-aiosmtpd",
    "openssl",
    "util-linux",
    "binutils",
    "musl-tools",
    "podman",
    "ca-certificates",
    "python3-venv",
    "golang-go",
];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// The static binary that goes into the container image.
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Validates deploy/*.yaml against the Kubernetes schemas (tests/tests/manifests.rs).
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

pub fn all() -> Result<()> {
    packages()?;
    nightly()?;
    bpf_linker()?;
    musl_target()?;
    manifest_validator()?;
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
        .unwrap_or(false)
}

fn package_installed(name: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", name])
        .stderr(Stdio::null())
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|p| !package_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing Debian packages {}: install them with `sudo apt-get install -y {}` or run this as root",
            missing.join(" "),
            missing.join(" ")
        );
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    run(Command::new("apt-get").args(["update", "-qq"]))?;
    run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"))
}

fn nightly() -> Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("rustup is needed to build the eBPF programs")?;
    if !String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        eprintln!("xtask: installing the nightly toolchain (eBPF programs need it)");
        run(Command::new("rustup").args([
            "toolchain",
            "install",
            "nightly",
            "--profile",
            "minimal",
        ]))?;
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()?;
    if !String::from_utf8_lossy(&components.stdout).contains("rust-src") {
        eprintln!("xtask: adding rust-src to nightly (build-std for the bpf target)");
        run(Command::new("rustup").args([
            "component",
            "add",
            "rust-src",
            "--toolchain",
            "nightly",
        ]))?;
    }
    Ok(())
}

fn bpf_linker() -> Result<()> {
    let installed = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|out| String::from_utf8_lossy(&out.stdout).contains(BPF_LINKER_VERSION))
        .unwrap_or(false);
    if installed {
        return Ok(());
    }
    eprintln!("xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about 2 minutes)");
    let path = format!(
        "/usr/lib/llvm-22/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--version",
            BPF_LINKER_VERSION,
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .env("PATH", path))
}

fn musl_target() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .context("rustup is needed to add the musl target")?;
    if String::from_utf8_lossy(&installed.stdout)
        .lines()
        .any(|l| l.trim() == MUSL_TARGET)
    {
        return Ok(());
    }
    eprintln!("xtask: adding the {MUSL_TARGET} target (the static binary of the image)");
    run(Command::new("rustup").args(["target", "add", MUSL_TARGET]))
}

/// A virtualenv under target/ with kubernetes-validate, from Debian's own
/// python3 (the PATH's python3 may be another one, without venv support).
fn manifest_validator() -> Result<()> {
    let venv = crate::workspace_root().join("target/k8s-venv");
    let pip = venv.join("bin/pip");
    let present = Command::new(&pip)
        .args(["show", "kubernetes-validate"])
        .stderr(Stdio::null())
        .output()
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .any(|l| l.trim() == format!("Version: {KUBERNETES_VALIDATE_VERSION}"))
        })
        .unwrap_or(false);
    if present {
        return Ok(());
    }
    let package = format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}");
    eprintln!("xtask: installing {package} into {}", venv.display());
    run(Command::new("/usr/bin/python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv))?;
    run(Command::new(&pip).args(["install", "--quiet", &package]))
}
