//! The core issue's running-stall check (`tests/core.rs`), shared so that
//! the same assertions run against the binary taken out of the container
//! image and against dogslow holding only its documented capabilities.
use std::time::Duration;

use crate::*;

pub const TIMEOUT_MS: u64 = 300;
pub const SAMPLE_HZ: u64 = 99;

/// The latency bound of a running stall: one sample period plus 50 ms.
pub fn running_bound_ms() -> u64 {
    TIMEOUT_MS + 1000 / SAMPLE_HZ + 50
}

/// Runs `slow_requests` (16 requests, every 4th spinning 1.5 s on the CPU)
/// under the dogslow that `start` launches with the given arguments, and
/// asserts one report per slow request, on time, with its whole symbolized
/// stack, and one `returned` completion each.
pub fn check(start: impl FnOnce(&[&str]) -> Agent) {
    let mut target = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "16",
            "--slow-every",
            "4",
            "--slow-ms",
            "1500",
            "--fast-us",
            "2000",
            "--wait",
        ],
    );
    let target_pid = target.pid();
    let pid = target_pid.to_string();
    let agent = start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
        "--sample-hz",
        "99",
    ]);
    target.go();
    let slow = timed_lines(&target.finish(Duration::from_secs(30)), "slow");
    let finished = agent.wait(Duration::from_secs(20));
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(slow.len(), 4);

    let stalls = finished.stalls();
    assert_eq!(
        stalls.len(),
        slow.len(),
        "one report per slow request: {stalls:#?}"
    );
    let mut ids = std::collections::HashSet::new();
    for (stall, (start_ns, end_ns)) in stalls.iter().zip(&slow) {
        assert!(
            ids.insert(stall["id"].as_str().unwrap().to_owned()),
            "ids must be unique"
        );
        assert_eq!(stall["kind"], "stall");
        assert_eq!(stall["state"], "running");
        assert_eq!(stall["pid"].as_u64(), Some(u64::from(target_pid)));
        assert_eq!(stall["tid"], stall["pid"]);
        assert_eq!(stall["timeout_ms"], TIMEOUT_MS);
        assert_eq!(stall["entry"], "handle_request");
        assert_eq!(stall["comm"], "slow_requests");
        assert!(stall["exe"].as_str().unwrap().ends_with("/slow_requests"));
        assert!(stall["ppid"].as_u64().unwrap() > 0);
        let elapsed = stall["elapsed_ms"].as_u64().unwrap();
        assert!(
            (TIMEOUT_MS..=running_bound_ms()).contains(&elapsed),
            "elapsed_ms {elapsed} outside [{TIMEOUT_MS}, {}]",
            running_bound_ms()
        );
        // Captured while the request was still running, and it is that request.
        let captured = rfc3339_ns(&stall["time"]);
        assert!(captured < *end_ns, "reported after the request ended");
        let started = rfc3339_ns(&stall["started"]);
        assert!(
            started.abs_diff(*start_ns) < 5_000_000,
            "started {started} vs {start_ns}"
        );

        let names = functions(stall, "user_stack");
        assert_in_order(
            &names,
            &[
                "spin_for",
                "handle_request",
                "dispatch",
                "serve_forever",
                "main",
            ],
        );
        assert_source_lines(
            stall,
            &[
                "spin_for",
                "handle_request",
                "dispatch",
                "serve_forever",
                "main",
            ],
            "slow_requests.c",
        );
        assert_eq!(stall["user_stack_truncated"], false, "{stall}");
    }
    // Every reported request ended: one completion each, same id.
    let completions = finished.completions();
    assert_eq!(completions.len(), stalls.len());
    for (done, stall) in completions.iter().zip(&stalls) {
        assert_eq!(done["id"], stall["id"]);
        assert_eq!(done["outcome"], "returned");
        assert!(done["duration_ms"].as_u64().unwrap() >= 1500);
    }
}
