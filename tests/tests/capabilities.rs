//! Issue 9: the capabilities the README and deploy/daemonset.yaml document
//! (CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_DAC_READ_SEARCH, CAP_SYSLOG) are enough for an
//! unprivileged uid watching another user's process, and without any one of
//! them dogslow says which is missing and why before anything else fails.
//!
//! dogslow runs as uid 65534 with exactly these capabilities as ambient ones
//! (what a container runtime gives); the targets run as root, so every
//! access to them is one across users.
use std::{os::unix::fs::PermissionsExt as _, path::Path, process::Command, time::Duration};

use dogslow_tests::{container::*, *};
use serde_json::Value;

const DOCUMENTED: &[&str] = &["sys_admin", "sys_ptrace", "dac_read_search", "syslog"];

/// `setpriv` that runs its program as nobody holding only `caps`.
fn as_nobody_with(caps: &[&str]) -> Command {
    let set = std::iter::once("-all".to_owned())
        .chain(caps.iter().map(|cap| format!("+{cap}")))
        .collect::<Vec<_>>()
        .join(",");
    let mut command = Command::new("setpriv");
    command.args([
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        &format!("--inh-caps={set}"),
        &format!("--ambient-caps={set}"),
        &format!("--bounding-set={set}"),
    ]);
    command
}

#[test]
fn the_documented_capabilities_catch_running_stalls_of_another_user() {
    require_root();
    running_stalls::check(|args| {
        Agent::start_command(as_nobody_with(DOCUMENTED).arg(dogslow_bin()).args(args))
    });
}

#[test]
fn the_documented_capabilities_catch_a_blocked_stall_of_another_user() {
    require_root();
    let mut target = Target::spawn(
        "blocked_requests",
        &["recv", "--stall-ms", "1500", "--wait"],
    );
    let pid = target.pid().to_string();
    let agent = Agent::start_command(as_nobody_with(DOCUMENTED).arg(dogslow_bin()).args([
        "attach",
        "--pid",
        &pid,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]));
    target.go();
    target.finish(Duration::from_secs(30));
    let finished = agent.wait(Duration::from_secs(20));
    assert!(finished.status.success(), "{}", finished.stderr);
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 1, "{stalls:#?}\n{}", finished.stderr);
    let stall = &stalls[0];
    assert_eq!(stall["state"], "blocked", "{stall}");
    assert_eq!(stall["syscall"]["name"], "recvfrom", "{stall}");
    // Symbolized through /proc/PID/map_files and /proc/PID/mem of a root
    // process: what CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH are for.
    assert_in_order(
        &functions(stall, "user_stack"),
        &["wait_for_peer", "handle_request", "serve", "main"],
    );
    assert_source_lines(
        stall,
        &["wait_for_peer", "handle_request"],
        "blocked_requests.c",
    );
    // Named from /proc/kallsyms, which shows addresses only to CAP_SYSLOG
    // (or everyone, with perf_event_paranoid <= 1).
    let kernel = functions(stall, "kernel_stack");
    assert!(
        kernel.iter().any(|name| name.contains("recvmsg")),
        "the kernel stack names no wait path: {kernel:?}"
    );
}

/// The DaemonSet's case: `--binary` names a path inside containers, found
/// through /proc/PID/root of a root process in its own mount and PID
/// namespace, behind a directory only its owner may search.
#[test]
fn the_documented_capabilities_find_and_symbolize_a_container_process() {
    require_root();
    const INSIDE: &str = "/opt/dogslow-test/app";
    let root = container_root(&target_bin("slow_requests"), INSIDE);
    let private = root.join("opt/dogslow-test");
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o700)).unwrap();
    assert!(!Path::new(INSIDE).exists());
    let agent = Agent::start_command(as_nobody_with(DOCUMENTED).arg(dogslow_bin()).args([
        "attach",
        "--binary",
        INSIDE,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]));
    let (mut container, host_pid) = spawn_contained(
        &root,
        INSIDE,
        &[
            "--requests",
            "2",
            "--slow-every",
            "2",
            "--slow-ms",
            "1000",
            "--wait",
        ],
        &[],
    );
    let found = agent.stderr.wait_for(Duration::from_secs(3), |l| {
        l.contains(&format!("watching process {host_pid}"))
    });
    assert!(
        found.is_some(),
        "dogslow as nobody did not find the container process: {:?}",
        agent.stderr.snapshot()
    );
    container.go();
    let stall = agent
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
        .expect("a stall report");
    let stall: Value = serde_json::from_str(&stall).unwrap();
    container.finish(Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&root);
    assert_eq!(stall["pid"].as_u64(), Some(u64::from(host_pid)));
    assert_eq!(stall["ns_pid"].as_u64(), Some(1), "{stall}");
    assert_in_order(
        &functions(&stall, "user_stack"),
        &[
            "spin_for",
            "handle_request",
            "dispatch",
            "serve_forever",
            "main",
        ],
    );
    assert_source_lines(&stall, &["spin_for", "handle_request"], "slow_requests.c");
}

#[test]
fn each_missing_capability_is_named_before_anything_fails() {
    require_root();
    let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
    let pid = target.pid().to_string();
    for dropped in DOCUMENTED {
        let kept: Vec<&str> = DOCUMENTED
            .iter()
            .copied()
            .filter(|cap| cap != dropped)
            .collect();
        let finished = run_dogslow_command(as_nobody_with(&kept).arg(dogslow_bin()).args([
            "attach",
            "--pid",
            &pid,
            "--entry",
            "handle_request",
        ]));
        let name = format!("CAP_{}", dropped.to_uppercase());
        assert!(!finished.status.success(), "ran without {name}");
        assert!(
            finished
                .stderr
                .contains("dogslow: error: dogslow needs root, or the capabilities"),
            "without {name}: {}",
            finished.stderr
        );
        assert!(
            finished.stderr.contains(&format!("missing: {name} (")),
            "without {name}: {}",
            finished.stderr
        );
        for other in &kept {
            let other = format!("CAP_{} (", other.to_uppercase());
            assert!(
                !finished.stderr.contains(&other),
                "{other} is held, yet named: {}",
                finished.stderr
            );
        }
        // The check comes first: one error line, nothing from the loader.
        assert_eq!(
            finished.stderr.lines().count(),
            1,
            "without {name}: {}",
            finished.stderr
        );
        assert!(finished.stdout.is_empty());
    }
}
