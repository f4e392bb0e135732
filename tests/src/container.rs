//! A process in its own mount and PID namespace, as a container runs it:
//! `unshare --mount --pid --fork chroot ROOT PROGRAM`, with ROOT holding the
//! program and its libraries.
use std::{
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::Target;

/// A directory holding `program` and the libraries it loads, at the paths
/// the dynamic linker expects, for chroot.
pub fn container_root(program: &Path, inside: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("dogslow-container-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    let copy = |from: &Path, to: &str| {
        let dest = root.join(to.trim_start_matches('/'));
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        std::fs::copy(from, &dest).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
    };
    copy(program, inside);
    let ldd = Command::new("ldd").arg(program).output().expect("ldd");
    for line in String::from_utf8_lossy(&ldd.stdout).lines() {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or "/lib64/ld-linux-x86-64.so.2 (0x...)"
        let path = line
            .split("=>")
            .last()
            .and_then(|rest| rest.split_whitespace().next())
            .filter(|p| p.starts_with('/'));
        if let Some(path) = path {
            copy(Path::new(path), path);
        }
    }
    root
}

/// The host PID of the process whose executable is `inside` in its own
/// mount namespace and whose root is `root`.
pub fn host_pid_of(root: &Path, inside: &str) -> Option<u32> {
    std::fs::read_dir("/proc")
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .find(|pid| {
            std::fs::read_link(format!("/proc/{pid}/root"))
                .map(|r| r == root)
                .unwrap_or(false)
                && Path::new(&format!("/proc/{pid}/root{inside}")).exists()
                && std::fs::read_to_string(format!("/proc/{pid}/comm"))
                    .map(|c| c.trim() == "app")
                    .unwrap_or(false)
        })
}

/// Starts `inside ARGS` chrooted into `root` in its own mount and PID
/// namespace, with `env` added; returns it and its host PID once it runs.
pub fn spawn_contained(
    root: &Path,
    inside: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (Target, u32) {
    let container = Target::spawn_command(
        Command::new("unshare")
            .args(["--mount", "--pid", "--fork", "chroot"])
            .arg(root)
            .arg(inside)
            .args(args)
            .envs(env.iter().copied()),
    );
    let host_pid = (0..200)
        .find_map(|_| {
            std::thread::sleep(Duration::from_millis(10));
            host_pid_of(root, inside)
        })
        .expect("the containerized process");
    (container, host_pid)
}
