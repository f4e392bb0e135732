//! Issue 9: the container image builds with Debian's podman from
//! `deploy/Containerfile`, holds a static binary and a CA bundle, and that
//! binary, taken back out of the built image, catches stalls like the one
//! `cargo build` makes.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use dogslow_tests::*;
use serde_json::Value;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the image the way CI and developers do (`cargo xtask image`) and
/// returns the binary taken out of it and the image's configuration.
fn build_image() -> (PathBuf, Value) {
    let root = workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = Command::new(cargo)
        .current_dir(&root)
        .args(["xtask", "image"])
        .status()
        .expect("run cargo xtask image");
    assert!(status.success(), "cargo xtask image failed: {status}");
    let inspect = std::fs::read_to_string(root.join("target/image/inspect.json"))
        .expect("xtask image writes target/image/inspect.json");
    let images: Value = serde_json::from_str(&inspect).expect("podman image inspect is JSON");
    (root.join("target/image/dogslow"), images[0].clone())
}

fn readelf(flag: &str, bin: &Path) -> String {
    let out = Command::new("readelf")
        .args([flag, "--wide"])
        .arg(bin)
        .output()
        .expect("readelf (binutils) is needed");
    assert!(out.status.success(), "readelf {flag} {}", bin.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_binary_taken_out_of_the_image_reports_running_stalls() {
    require_root();
    let (bin, image) = build_image();

    // Static: no program interpreter, no shared libraries (FROM scratch has
    // neither a dynamic linker nor a libc).
    let headers = readelf("--program-headers", &bin);
    assert!(headers.contains("LOAD"), "{headers}");
    assert!(!headers.contains("INTERP"), "not static:\n{headers}");
    let dynamic = readelf("--dynamic", &bin);
    assert!(!dynamic.contains("(NEEDED)"), "needs libraries:\n{dynamic}");

    // The image runs the agent from the ConfigMap the DaemonSet mounts.
    let config = &image["Config"];
    assert_eq!(
        config["Entrypoint"],
        serde_json::json!(["/usr/local/bin/dogslow"]),
        "{config}"
    );
    assert_eq!(
        config["Cmd"],
        serde_json::json!(["run", "--config", "/etc/dogslow/dogslow.toml"]),
        "{config}"
    );
    assert_eq!(
        config["Labels"]["org.opencontainers.image.title"], "dogslow",
        "{config}"
    );
    // Nothing but the binary and the CA bundle: FROM scratch, two layers.
    assert_eq!(
        image["RootFS"]["Layers"].as_array().map(Vec::len),
        Some(2),
        "{}",
        image["RootFS"]
    );
    // The mail sink's TLS needs CA certificates, which scratch lacks.
    let cas = std::fs::read_to_string(workspace_root().join("target/image/ca-certificates.crt"))
        .expect("xtask image takes the CA bundle out of the image too");
    assert!(
        cas.matches("BEGIN CERTIFICATE").count() > 50,
        "the image's CA bundle holds few certificates"
    );

    running_stalls::check(|args| Agent::start_with(&bin, args));
}
