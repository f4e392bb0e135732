//! Issue 5: `--binary`, processes started later, containers (own mount and
//! PID namespace), many threads, nested requests, bounded maps, and the
//! completion records that say how a reported request ended.
use std::{
    collections::HashSet,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use dogslow_tests::{container::*, *};
use serde_json::Value;

fn binary_path(name: &str) -> String {
    target_bin(name).to_string_lossy().into_owned()
}

#[test]
fn processes_started_after_dogslow_are_watched_through_their_binary() {
    require_root();
    let binary = binary_path("slow_requests");
    let agent = Agent::start(&[
        "attach",
        "--binary",
        &binary,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]);
    let first = Target::spawn(
        "slow_requests",
        &["--requests", "2", "--slow-every", "2", "--slow-ms", "800"],
    );
    let second = Target::spawn(
        "slow_requests",
        &["--requests", "2", "--slow-every", "2", "--slow-ms", "800"],
    );
    let pids: HashSet<u64> = [first.pid(), second.pid()]
        .into_iter()
        .map(u64::from)
        .collect();
    first.finish(Duration::from_secs(20));
    second.finish(Duration::from_secs(20));
    let finished = agent.stop_with(libc::SIGINT);
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", finished.stderr);
    let reported: HashSet<u64> = stalls.iter().map(|s| s["pid"].as_u64().unwrap()).collect();
    assert_eq!(reported, pids);
    for stall in &stalls {
        assert_eq!(stall["tid"], stall["pid"]);
        assert_in_order(
            &functions(stall, "user_stack"),
            &["spin_for", "handle_request", "main"],
        );
    }
}

#[test]
fn a_process_in_its_own_mount_and_pid_namespace() {
    require_root();
    const INSIDE: &str = "/opt/dogslow-test/app";
    let root = container_root(&target_bin("slow_requests"), INSIDE);
    // The path exists only inside the container.
    assert!(!Path::new(INSIDE).exists());
    let agent = Agent::start(&[
        "attach",
        "--binary",
        INSIDE,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]);
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
    // dogslow finds it within a second of its start.
    let found = agent.stderr.wait_for(Duration::from_secs(3), |l| {
        l.contains(&format!("watching process {host_pid}"))
    });
    assert!(
        found.is_some(),
        "dogslow did not pick up the container process: {:?}",
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
    assert_eq!(stall["ns_tid"].as_u64(), Some(1), "{stall}");
    assert!(stall["cgroup"].is_string());
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
fn eight_threads_stalling_at_once_get_eight_reports() {
    let watched = watch(
        "threads",
        &["spin", "--threads", "8", "--ms", "1500"],
        &["--entry", "handle_request", "--timeout", "300ms"],
    );
    let lines = watched.program;
    let finished = watched.dogslow;
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 8, "{stalls:#?}");
    let tids: HashSet<u64> = stalls.iter().map(|s| s["tid"].as_u64().unwrap()).collect();
    assert_eq!(tids.len(), 8, "distinct threads");
    let started: HashSet<u64> = lines
        .iter()
        .filter_map(|l| {
            l.strip_prefix("start ")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .collect();
    assert_eq!(
        tids, started,
        "the reported threads are the request threads"
    );
    for stall in &stalls {
        // Eight spinning threads share two CPUs: runnable ones are caught
        // off-CPU (state running) or by the sampler when they run.
        assert_eq!(stall["state"], "running", "{stall}");
        // Each is caught within the running bound all the same.
        let elapsed = stall["elapsed_ms"].as_u64().unwrap();
        assert!(
            (running_stalls::TIMEOUT_MS..=running_stalls::running_bound_ms()).contains(&elapsed),
            "{stall}"
        );
        assert_in_order(
            &functions(stall, "user_stack"),
            &["spin_ms", "handle_request", "worker"],
        );
    }
}

#[test]
fn a_sigkilled_worker_gets_a_killed_completion() {
    require_root();
    let mut target = Target::spawn("threads", &["forever", "--wait"]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]);
    target.go();
    let stall = agent
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
        .expect("stall");
    let stall: Value = serde_json::from_str(&stall).unwrap();
    assert_eq!(stall["state"], "blocked");
    // The supervisor's SIGKILL.
    // SAFETY: killing our own child.
    unsafe { libc::kill(target.pid() as i32, libc::SIGKILL) };
    let finished = agent.wait(Duration::from_secs(20));
    let completions = finished.completions();
    assert_eq!(completions.len(), 1, "{completions:#?}");
    assert_eq!(completions[0]["id"], stall["id"]);
    assert_eq!(completions[0]["outcome"], "killed");
    assert_eq!(completions[0]["signal"], 9);
    assert!(completions[0]["duration_ms"].as_u64().unwrap() >= 300);
    // The dead process left nothing behind in the kernel's bookkeeping.
    assert!(
        finished.stderr.contains("stopping; 0 request(s) in flight"),
        "{}",
        finished.stderr
    );
}

#[test]
fn a_thread_exiting_mid_request_gets_a_thread_exited_completion() {
    let watched = watch(
        "threads",
        &["exit", "--ms", "700"],
        &["--entry", "handle_request", "--timeout", "300ms"],
    );
    let finished = watched.dogslow;
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 1);
    let completions = finished.completions();
    assert_eq!(completions.len(), 1, "{completions:#?}");
    assert_eq!(completions[0]["id"], stalls[0]["id"]);
    assert_eq!(completions[0]["outcome"], "thread_exited");
    assert!(completions[0]["signal"].is_null());
    assert!(
        finished.stderr.contains("stopping; 0 request(s) in flight"),
        "{}",
        finished.stderr
    );
}

#[test]
fn a_recursive_entry_is_one_request_timed_from_the_outermost_call() {
    let watched = watch(
        "threads",
        &["recurse", "--ms", "1000"],
        &["--entry", "handle_request", "--timeout", "300ms"],
    );
    let lines = watched.program;
    let finished = watched.dogslow;
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 1, "one request, not five: {stalls:#?}");
    let stall = &stalls[0];
    let outer_start: u64 = lines
        .iter()
        .find_map(|l| {
            l.strip_prefix("start ")?
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        })
        .unwrap();
    // Timed from the outermost call: it started when the thread announced
    // it, 200 ms before the innermost level began.
    let started = rfc3339_ns(&stall["started"]);
    assert!(
        started.abs_diff(outer_start) < 10_000_000,
        "started {started} vs outermost {outer_start}"
    );
    let elapsed = stall["elapsed_ms"].as_u64().unwrap();
    assert!((300..400).contains(&elapsed), "{elapsed}");
    let depth = functions(stall, "user_stack")
        .iter()
        .filter(|n| *n == "handle_request")
        .count();
    assert_eq!(depth, 5, "{:?}", functions(stall, "user_stack"));
    let completions = finished.completions();
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0]["outcome"], "returned");
    assert!(completions[0]["duration_ms"].as_u64().unwrap() >= 1200);
}

#[test]
fn a_full_inflight_map_is_counted_never_silent() {
    let watched = watch(
        "threads",
        &["sleep", "--threads", "20", "--ms", "800"],
        &[
            "--entry",
            "handle_request",
            "--timeout",
            "10s",
            "--max-inflight",
            "16",
        ],
    );
    let finished = watched.dogslow;
    assert!(finished.status.success());
    assert!(
        finished
            .stderr
            .contains("4 requests were not tracked because the in-flight map was full"),
        "{}",
        finished.stderr
    );
}

#[test]
fn a_binary_that_is_not_elf_is_refused() {
    require_root();
    let script = std::env::temp_dir().join(format!("dogslow-script-{}.sh", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\necho hello\n").unwrap();
    let finished = run_dogslow(&[
        "attach",
        "--binary",
        script.to_str().unwrap(),
        "--entry",
        "main",
    ]);
    let _ = std::fs::remove_file(&script);
    assert!(!finished.status.success());
    assert!(
        finished
            .stderr
            .contains("is not an ELF executable or library"),
        "{}",
        finished.stderr
    );
    assert!(!finished.stderr.contains("panicked"));
}

/// A cgroup named the way the kubelet names a container's, holding `pid`;
/// removed on drop.
struct PodCgroup {
    dir: PathBuf,
}

impl PodCgroup {
    fn new(pod_uid: &str, container_id: &str, pid: u32) -> Self {
        // The pids controller exists in v1 (hybrid) and v2 layouts alike.
        let root = if Path::new("/sys/fs/cgroup/pids/cgroup.procs").exists() {
            PathBuf::from("/sys/fs/cgroup/pids")
        } else {
            PathBuf::from("/sys/fs/cgroup")
        };
        let dir = root.join(format!("kubepods/burstable/pod{pod_uid}/{container_id}"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cgroup.procs"), pid.to_string()).unwrap();
        Self { dir }
    }
}

impl Drop for PodCgroup {
    fn drop(&mut self) {
        let mut dir = self.dir.clone();
        for _ in 0..3 {
            let _ = std::fs::remove_dir(&dir);
            dir.pop();
        }
    }
}

#[test]
fn a_process_in_a_pod_is_reported_with_its_container_and_pod() {
    require_root();
    const INSIDE: &str = "/opt/dogslow-test/app";
    const POD_UID: &str = "1d2c3b4a-0000-4111-8222-933344455566";
    const CONTAINER: &str = "3f2d5bd0b7c64fd8b0b5a7e3c1f0e2d4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6";
    let root = container_root(&target_bin("slow_requests"), INSIDE);
    let secrets = root.join("var/run/secrets/kubernetes.io/serviceaccount");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("namespace"), "shop\n").unwrap();
    let agent = Agent::start(&[
        "attach",
        "--binary",
        INSIDE,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]);
    let (mut container, host_pid) = spawn_contained(
        &root,
        INSIDE,
        &[
            "--requests",
            "1",
            "--slow-every",
            "1",
            "--slow-ms",
            "800",
            "--wait",
        ],
        &[("HOSTNAME", "web-7d9f8-x2v4q")],
    );
    let _cgroup = PodCgroup::new(POD_UID, CONTAINER, host_pid);
    agent
        .stderr
        .wait_for(Duration::from_secs(3), |l| {
            l.contains(&format!("watching process {host_pid}"))
        })
        .expect("picked up");
    container.go();
    let stall = agent
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
        .expect("stall");
    container.finish(Duration::from_secs(20));
    let _ = std::fs::remove_dir_all(&root);
    let stall: Value = serde_json::from_str(&stall).unwrap();
    assert_eq!(stall["container_id"], CONTAINER, "{stall}");
    assert_eq!(stall["pod_uid"], POD_UID);
    assert_eq!(stall["pod"], "web-7d9f8-x2v4q");
    assert_eq!(stall["pod_namespace"], "shop");
    assert!(stall["cgroup"].as_str().unwrap().contains(CONTAINER));
}

/// dogslow's BPF links: its tracepoints', and two uprobes (entry and
/// return) per probed file.
fn bpf_links(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|entry| std::fs::read_link(entry.ok()?.path()).ok())
        .filter(|link| link.to_string_lossy() == "anon_inode:bpf_link")
        .count()
}

/// Polls `count` until it is `expected` (the agent rescans every second).
fn settles_at(count: impl Fn() -> usize, expected: usize, what: &str) {
    let until = std::time::Instant::now() + Duration::from_secs(6);
    while count() != expected {
        assert!(
            std::time::Instant::now() < until,
            "{what}: {} BPF links, expected {expected}",
            count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A redeploy replaces the binary with a new file at the same path: the old
/// file keeps its probes while a process still runs it, and lets them go
/// when the last one exits, instead of holding them (and the deleted file)
/// for the agent's lifetime.
#[test]
fn a_replaced_binary_is_let_go_when_its_last_process_exits() {
    require_root();
    let dir = std::env::temp_dir().join(format!("dogslow-redeploy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = dir.join("app");
    std::fs::copy(target_bin("slow_requests"), &app).unwrap();
    let agent = Agent::start(&[
        "attach",
        "--binary",
        app.to_str().unwrap(),
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ]);
    let probes = || bpf_links(agent.pid());
    let one_file = probes();
    assert!(
        one_file > 2,
        "tracepoints, entry and return probes: {one_file}"
    );
    let mut old = Target::spawn_command(Command::new(&app).args(["--requests", "1", "--wait"]));
    std::thread::sleep(Duration::from_millis(1500));

    let staged = dir.join("app.new");
    std::fs::copy(target_bin("slow_requests"), &staged).unwrap();
    std::fs::rename(&staged, &app).unwrap();
    settles_at(probes, one_file, "old file still run, new one not yet");
    let mut new = Target::spawn_command(Command::new(&app).args([
        "--requests",
        "2",
        "--slow-every",
        "2",
        "--slow-ms",
        "800",
        "--wait",
    ]));
    settles_at(probes, one_file + 2, "old and new files both run");
    old.go();
    old.finish(Duration::from_secs(20));
    settles_at(probes, one_file, "the old file's last process exited");

    let new_pid = new.pid();
    new.go();
    new.finish(Duration::from_secs(20));
    let finished = agent.stop_with(libc::SIGINT);
    std::fs::remove_dir_all(&dir).unwrap();
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 1, "{stalls:#?}\n{}", finished.stderr);
    assert_eq!(stalls[0]["pid"], new_pid);
}
