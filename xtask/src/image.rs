//! `cargo xtask image`: the static (musl) dogslow binary, the container image
//! built from `deploy/Containerfile` with Debian's podman, and the binary
//! taken back out of the built image (target/image/dogslow, beside the CA
//! bundle it ships and the image's configuration in inspect.json), so that
//! tests run exactly what the image ships.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, run};

pub const TAG: &str = "localhost/dogslow:dev";
const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";
/// Where the Containerfile puts the binary.
const IMAGE_BINARY: &str = "/usr/local/bin/dogslow";
/// The CA certificates for the mail sink's TLS (FROM scratch has none):
/// Debian's bundle, at the same path in the image.
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Builds the image and returns the path of the binary extracted from it.
pub fn build(root: &Path) -> Result<PathBuf> {
    eprintln!("xtask: building the static dogslow binary ({MUSL_TARGET})");
    run(cargo().current_dir(root).args([
        "build",
        "--release",
        "--target",
        MUSL_TARGET,
        "--package",
        "dogslow-user",
        "--bin",
        "dogslow",
    ]))?;
    let out = root.join("target/image");
    // The binary is the whole build context: nothing else of the tree is
    // sent to the builder (target/ alone is gigabytes).
    let context = out.join("context");
    fs::create_dir_all(&context).with_context(|| format!("cannot create {}", context.display()))?;
    let built = root.join(format!("target/{MUSL_TARGET}/release/dogslow"));
    fs::copy(&built, context.join("dogslow"))
        .with_context(|| format!("cannot stage {}", built.display()))?;
    fs::copy(CA_BUNDLE, context.join("ca-certificates.crt")).with_context(|| {
        format!("cannot stage {CA_BUNDLE} (cargo xtask setup installs ca-certificates)")
    })?;

    let store = Store::pick(&out)?;
    eprintln!(
        "xtask: building the image {TAG} (podman, {} storage)",
        store.name()
    );
    run(store
        .podman()
        .args(["build", "--file"])
        .arg(root.join("deploy/Containerfile"))
        .args(["--tag", TAG, "--build-arg"])
        .arg(format!("VERSION={}", env!("CARGO_PKG_VERSION")))
        .arg(&context))?;

    // Take the binary back out of the image: what the tests run is what a
    // node would run.
    let extracted = out.join("dogslow");
    let _ = fs::remove_file(&extracted);
    let created = store
        .podman()
        .args(["create", TAG])
        .output()
        .context("cannot run podman create")?;
    if !created.status.success() {
        bail!(
            "podman create {TAG} failed: {}",
            String::from_utf8_lossy(&created.stderr).trim()
        );
    }
    let container = String::from_utf8_lossy(&created.stdout).trim().to_owned();
    let copied = [
        (IMAGE_BINARY, extracted.clone()),
        (CA_BUNDLE, out.join("ca-certificates.crt")),
    ]
    .iter()
    .try_for_each(|(inside, to)| {
        run(store
            .podman()
            .arg("cp")
            .arg(format!("{container}:{inside}"))
            .arg(to))
    });
    let removed = run(store.podman().args(["rm", &container]));
    copied?;
    removed?;
    run(Command::new(&extracted).arg("--version"))
        .context("the binary taken out of the image does not run")?;
    // The image's configuration (entrypoint, labels) for the tests, which
    // then need not know which podman store was used.
    let inspect = store
        .podman()
        .args(["image", "inspect", TAG])
        .output()
        .context("cannot run podman image inspect")?;
    if !inspect.status.success() {
        bail!(
            "podman image inspect {TAG} failed: {}",
            String::from_utf8_lossy(&inspect.stderr).trim()
        );
    }
    fs::write(out.join("inspect.json"), &inspect.stdout)
        .context("cannot write target/image/inspect.json")?;
    eprintln!("xtask: image {TAG}; its binary is {}", extracted.display());
    Ok(extracted)
}

/// Podman's storage: the machine's default (overlay where the kernel allows
/// it), else vfs in a store of our own. A store is tied to its driver, so
/// vfs cannot reuse the default one.
enum Store {
    Default,
    Vfs { root: PathBuf, run_root: PathBuf },
}

impl Store {
    fn pick(out: &Path) -> Result<Self> {
        let works = Command::new("podman")
            .args(["info", "--format", "{{.Store.GraphDriverName}}"])
            .output()
            .context("podman is needed to build the image (cargo xtask setup installs it)")?;
        if works.status.success() {
            return Ok(Self::Default);
        }
        eprintln!(
            "xtask: podman's default storage does not work here ({}); using vfs",
            String::from_utf8_lossy(&works.stderr).trim()
        );
        Ok(Self::Vfs {
            root: out.join("storage/root"),
            run_root: out.join("storage/run"),
        })
    }

    fn name(&self) -> &'static str {
        match self {
            Self::Default => "default",
            Self::Vfs { .. } => "vfs",
        }
    }

    fn podman(&self) -> Command {
        let mut command = Command::new("podman");
        if let Self::Vfs { root, run_root } = self {
            command
                .args(["--storage-driver", "vfs", "--root"])
                .arg(root)
                .arg("--runroot")
                .arg(run_root);
        }
        command
    }
}
