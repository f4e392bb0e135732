//! Issue 9: `dogslow run --config FILE` drives several targets, rejects bad
//! files precisely, reloads on SIGHUP without losing requests in flight,
//! and serves Prometheus metrics and a health check.
use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    time::Duration,
};

use dogslow_tests::*;

/// A config file in a temp dir, removed on drop.
struct ConfigFile {
    path: PathBuf,
}

impl ConfigFile {
    fn new(text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "dogslow-config-{}-{}.toml",
            std::process::id(),
            unique()
        ));
        std::fs::write(&path, text).unwrap();
        Self { path }
    }

    fn rewrite(&self, text: &str) {
        std::fs::write(&self.path, text).unwrap();
    }

    fn arg(&self) -> &str {
        self.path.to_str().unwrap()
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

fn target_section(name: &str, pid: u32, timeout: &str) -> String {
    format!(
        "[[target]]\nname = \"{name}\"\npid = [{pid}]\nentry = \"handle_request\"\ntimeout = \"{timeout}\"\n"
    )
}

#[test]
fn a_two_target_file_drives_both_with_their_own_timeouts() {
    require_root();
    let mut fast = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "2",
            "--slow-every",
            "2",
            "--slow-ms",
            "900",
            "--wait",
        ],
    );
    let mut slow = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "2",
            "--slow-every",
            "2",
            "--slow-ms",
            "900",
            "--wait",
        ],
    );
    let config = ConfigFile::new(&format!(
        "{}\n{}",
        target_section("short", fast.pid(), "200ms"),
        target_section("long", slow.pid(), "600ms")
    ));
    let (fast_pid, slow_pid) = (u64::from(fast.pid()), u64::from(slow.pid()));
    let agent = Agent::start(&["run", "--config", config.arg()]);
    fast.go();
    slow.go();
    fast.finish(Duration::from_secs(20));
    slow.finish(Duration::from_secs(20));
    let finished = agent.wait(Duration::from_secs(20));
    assert!(finished.status.success(), "{}", finished.stderr);
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 2, "{stalls:#?}");
    for stall in &stalls {
        let (timeout, pid) = match stall["target"].as_str().unwrap() {
            "short" => (200, fast_pid),
            "long" => (600, slow_pid),
            other => panic!("unknown target {other}"),
        };
        assert_eq!(stall["timeout_ms"], timeout);
        assert_eq!(stall["pid"], pid);
        let elapsed = stall["elapsed_ms"].as_u64().unwrap();
        assert!(
            (timeout..timeout + 100).contains(&elapsed),
            "{elapsed} vs {timeout}"
        );
    }
    assert_ne!(stalls[0]["target"], stalls[1]["target"]);
    // Completions name their target too.
    let done = finished.completions();
    assert_eq!(done.len(), 2);
    assert!(
        done.iter()
            .all(|c| c["target"] == "short" || c["target"] == "long"),
        "{done:#?}"
    );
}

#[test]
fn bad_config_files_are_rejected_with_file_line_and_reason() {
    require_root();
    for (text, needles) in [
        (
            "[[target]]\npid = [1]\nentry = \"f\"\ntimeout_ms = 5\n",
            vec!["line 4", "unknown field `timeout_ms`"],
        ),
        (
            "[[target]]\npid = [1]\nentry = \"f\"\ntimeout = \"2 fortnights\"\n",
            vec!["line 4", "is not a duration"],
        ),
        (
            "[agent]\nsample_hz = 99\n\n[[target]]\nname = \"web\"\npid = [1]\n",
            vec!["line 4", "missing field `entry`"],
        ),
        (
            "[agnet]\nsample_hz = 99\n",
            vec!["line 1", "unknown field `agnet`"],
        ),
    ] {
        let config = ConfigFile::new(text);
        let finished = run_dogslow(&["run", "--config", config.arg()]);
        assert!(!finished.status.success(), "{text}");
        assert!(
            finished.stderr.contains(config.arg()),
            "names the file: {}",
            finished.stderr
        );
        for needle in needles {
            assert!(
                finished.stderr.contains(needle),
                "{text}: {}",
                finished.stderr
            );
        }
        assert!(!finished.stderr.contains("panicked"));
    }
    let finished = run_dogslow(&["run", "--config", "/nonexistent/dogslow.toml"]);
    assert!(
        finished
            .stderr
            .contains("cannot read the config file /nonexistent/dogslow.toml"),
        "{}",
        finished.stderr
    );
}

#[test]
fn sighup_reload_keeps_requests_in_flight_and_adds_targets() {
    require_root();
    // Target A's request is blocked 3 s with a 1.5 s deadline; the reload
    // happens while it is in flight.
    let mut kept = Target::spawn(
        "blocked_requests",
        &["nanosleep", "--stall-ms", "3000", "--wait"],
    );
    let mut added = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "1",
            "--slow-every",
            "1",
            "--slow-ms",
            "800",
            "--wait",
        ],
    );
    let a = "[[target]]\nname = \"kept\"\npid = [PID]\nentry = \"handle_request\"\ntimeout = \"1500ms\"\n"
        .replace("PID", &kept.pid().to_string());
    let config = ConfigFile::new(&a);
    let agent = Agent::start(&["run", "--config", config.arg()]);
    kept.go();
    std::thread::sleep(Duration::from_millis(500));
    config.rewrite(&format!(
        "{a}\n{}",
        target_section("added", added.pid(), "300ms")
    ));
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    agent
        .stderr
        .wait_for(Duration::from_secs(5), |l| {
            l.contains("1 target(s) kept, 1 added, 0 removed")
        })
        .expect("the reload is reported");
    added.go();
    kept.finish(Duration::from_secs(20));
    added.finish(Duration::from_secs(20));
    let finished = agent.stop_with(libc::SIGTERM);
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", finished.stderr);
    let a_stall = stalls
        .iter()
        .find(|s| s["target"] == "kept")
        .expect("the kept target's stall");
    // Its request started before the reload and was still timed from then.
    let elapsed = a_stall["elapsed_ms"].as_u64().unwrap();
    assert!((1500..1600).contains(&elapsed), "{elapsed}");
    assert_eq!(a_stall["state"], "blocked");
    let b_stall = stalls
        .iter()
        .find(|s| s["target"] == "added")
        .expect("the new target's stall");
    assert_eq!(b_stall["timeout_ms"], 300);
    let done = finished.completions();
    assert!(
        done.iter()
            .any(|c| c["id"] == a_stall["id"] && c["outcome"] == "returned"),
        "{done:#?}"
    );
}

#[test]
fn a_broken_file_on_reload_keeps_the_running_configuration() {
    require_root();
    let mut target = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "1",
            "--slow-every",
            "1",
            "--slow-ms",
            "700",
            "--wait",
        ],
    );
    let config = ConfigFile::new(&target_section("web", target.pid(), "300ms"));
    let agent = Agent::start(&["run", "--config", config.arg()]);
    config.rewrite("[[target]]\nentry = \n");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(agent.pid() as i32, libc::SIGHUP) };
    let refused = agent
        .stderr
        .wait_for(Duration::from_secs(5), |l| l.contains("reload refused"))
        .expect("a refused reload");
    assert!(refused.contains(config.arg()), "{refused}");
    target.go();
    target.finish(Duration::from_secs(20));
    let finished = agent.wait(Duration::from_secs(20));
    assert_eq!(
        finished.stalls().len(),
        1,
        "still watching: {}",
        finished.stderr
    );
}

fn http_get(addr: &str, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).expect("metrics endpoint");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

#[test]
fn metrics_show_the_stall_and_the_tracked_requests() {
    require_root();
    let port = 19000 + (std::process::id() % 1000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let mut target = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "6",
            "--slow-every",
            "3",
            "--slow-ms",
            "700",
            "--wait",
        ],
    );
    // Through the binary, so dogslow keeps running after the target exits.
    let binary = target_bin("slow_requests");
    let agent = Agent::start(&[
        "attach",
        "--binary",
        binary.to_str().unwrap(),
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
        "--metrics-addr",
        &port.to_string(),
    ]);
    assert!(http_get(&addr, "/healthz").starts_with("HTTP/1.1 200 OK"));
    target.go();
    target.finish(Duration::from_secs(20));
    // Gauges and kernel counters are read once a second.
    std::thread::sleep(Duration::from_millis(1500));
    let metrics = http_get(&addr, "/metrics");
    assert!(metrics.starts_with("HTTP/1.1 200 OK"), "{metrics}");
    assert!(
        metrics.contains(
            "dogslow_stalls_reported_total{target=\"handle_request\",state=\"running\"} 2"
        ),
        "{metrics}"
    );
    assert!(
        metrics.contains("dogslow_requests_started_total 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dogslow_completions_total{outcome=\"returned\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dogslow_bpf_map_capacity{map=\"inflight\"} 16384"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dogslow_watched_processes 0"),
        "the target has exited: {metrics}"
    );
    let finished = agent.stop_with(libc::SIGINT);
    assert!(finished.status.success());
    // Loopback only unless told otherwise.
    assert!(
        finished
            .stderr
            .contains(&format!("metrics on http://{addr}/metrics")),
        "{}",
        finished.stderr
    );
}
