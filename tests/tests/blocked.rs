//! Issue 3: a request whose thread is off-CPU at its deadline (in recv, on a
//! mutex, in nanosleep) is reported at the deadline, with the stack where it
//! blocked, even if it never wakes.
use std::time::Duration;

use dogslow_tests::*;
use serde_json::Value;

const TIMEOUT_MS: u64 = 300;
/// Issue 3's bound for blocked stalls.
const BLOCKED_BOUND_MS: u64 = TIMEOUT_MS + 100;

/// Runs `blocked_requests MODE` once under dogslow; returns the reports and
/// the request's (start, end) wall-clock times.
fn run_mode(mode: &str, stall_ms: &str, timeout: &str) -> (Vec<Value>, Vec<Value>, (u64, u64)) {
    let watched = watch(
        "blocked_requests",
        &[mode, "--stall-ms", stall_ms],
        &["--entry", "handle_request", "--timeout", timeout],
    );
    let requests = timed_lines(&watched.program, "request");
    assert_eq!(requests.len(), 1);
    (
        watched.dogslow.stalls(),
        watched.dogslow.completions(),
        requests[0],
    )
}

fn any_of(names: &[String], candidates: &[&str]) -> bool {
    names.iter().any(|n| candidates.contains(&n.as_str()))
}

/// The common checks of a blocked report.
fn assert_blocked_on_time(stall: &Value, request: (u64, u64)) {
    assert_eq!(stall["state"], "blocked", "{stall}");
    let elapsed = stall["elapsed_ms"].as_u64().unwrap();
    assert!(
        (TIMEOUT_MS..BLOCKED_BOUND_MS).contains(&elapsed),
        "elapsed_ms {elapsed}"
    );
    assert!(
        rfc3339_ns(&stall["time"]) < request.1,
        "reported after the request ended"
    );
    let blocked = stall["blocked_ms"].as_u64().unwrap();
    assert!(
        blocked <= elapsed,
        "blocked_ms {blocked} > elapsed_ms {elapsed}"
    );
    assert!(stall["syscall"]["nr"].as_u64().is_some(), "{stall}");
    assert_eq!(stall["user_stack_truncated"], false, "{stall}");
}

#[test]
fn blocked_in_recv() {
    let (stalls, completions, request) = run_mode("recv", "2000", "300ms");
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let stall = &stalls[0];
    assert_blocked_on_time(stall, request);
    assert_eq!(stall["syscall"]["name"], "recvfrom");
    let kernel = functions(stall, "kernel_stack");
    assert!(
        any_of(
            &kernel,
            &[
                "unix_stream_read_generic",
                "unix_stream_recvmsg",
                "__sys_recvfrom"
            ]
        ),
        "{kernel:?}"
    );
    let user = functions(stall, "user_stack");
    assert!(
        any_of(&user, &["__libc_recv", "recv", "__recv"]),
        "{user:?}"
    );
    assert_in_order(&user, &["wait_for_peer", "handle_request", "serve", "main"]);
    assert_source_lines(
        stall,
        &["wait_for_peer", "handle_request", "serve", "main"],
        "blocked_requests.c",
    );
    assert_eq!(completions.len(), 1);
    assert_eq!(completions[0]["id"], stall["id"]);
    assert_eq!(completions[0]["outcome"], "returned");
}

#[test]
fn blocked_on_a_mutex() {
    let (stalls, _, request) = run_mode("mutex", "2000", "300ms");
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let stall = &stalls[0];
    assert_blocked_on_time(stall, request);
    assert_eq!(stall["syscall"]["name"], "futex");
    let kernel = functions(stall, "kernel_stack");
    assert!(
        any_of(
            &kernel,
            &["futex_wait", "__futex_wait", "futex_do_wait", "do_futex"]
        ),
        "{kernel:?}"
    );
    let user = functions(stall, "user_stack");
    assert!(
        any_of(
            &user,
            &[
                "___pthread_mutex_lock",
                "pthread_mutex_lock",
                "__pthread_mutex_lock",
                "__GI___lll_lock_wait"
            ]
        ),
        "{user:?}"
    );
    assert_in_order(&user, &["wait_for_lock", "handle_request", "serve", "main"]);
}

#[test]
fn blocked_in_nanosleep() {
    let (stalls, _, request) = run_mode("nanosleep", "2000", "300ms");
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let stall = &stalls[0];
    assert_blocked_on_time(stall, request);
    assert_eq!(stall["syscall"]["name"], "clock_nanosleep");
    let kernel = functions(stall, "kernel_stack");
    assert!(
        any_of(
            &kernel,
            &["hrtimer_nanosleep", "common_nsleep", "do_nanosleep"]
        ),
        "{kernel:?}"
    );
    let user = functions(stall, "user_stack");
    assert!(
        any_of(
            &user,
            &[
                "__GI___nanosleep",
                "__nanosleep",
                "nanosleep",
                "__GI___clock_nanosleep"
            ]
        ),
        "{user:?}"
    );
    assert_in_order(
        &user,
        &[
            "sleep_ms",
            "wait_for_timer",
            "handle_request",
            "serve",
            "main",
        ],
    );
}

#[test]
fn a_request_that_never_wakes_is_still_reported_on_time() {
    require_root();
    let mut target = Target::spawn("blocked_requests", &["never", "--wait"]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
        "--duration",
        "3s",
    ]);
    target.go();
    let finished = agent.wait(Duration::from_secs(30));
    assert!(
        finished.status.success(),
        "stops cleanly: {}",
        finished.stderr
    );
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    assert_eq!(stalls[0]["state"], "blocked");
    let elapsed = stalls[0]["elapsed_ms"].as_u64().unwrap();
    assert!(
        (TIMEOUT_MS..BLOCKED_BOUND_MS).contains(&elapsed),
        "{elapsed}"
    );
    assert_in_order(
        &functions(&stalls[0], "user_stack"),
        &["wait_for_peer", "handle_request", "main"],
    );
    // The request never ended: no completion.
    assert!(finished.completions().is_empty());
    // The target is untouched: still blocked, alive, not stopped or signalled.
    let state = std::fs::read_to_string(format!("/proc/{}/stat", target.pid())).unwrap();
    let state = state
        .rsplit(')')
        .next()
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned();
    assert_eq!(state, "S", "the target should still be sleeping in recv");
}

#[test]
fn mixed_request_is_reported_in_its_state_at_the_deadline() {
    // 2 s request: 1 s on the CPU, then 1 s asleep.
    let (stalls, _, _) = run_mode("mixed", "2000", "300ms");
    assert_eq!(stalls.len(), 1);
    assert_eq!(stalls[0]["state"], "running");
    assert_in_order(
        &functions(&stalls[0], "user_stack"),
        &["compute", "handle_request", "main"],
    );

    let (stalls, _, request) = run_mode("mixed", "2000", "1300ms");
    assert_eq!(stalls.len(), 1);
    let stall = &stalls[0];
    assert_eq!(stall["state"], "blocked");
    let elapsed = stall["elapsed_ms"].as_u64().unwrap();
    assert!((1300..1400).contains(&elapsed), "{elapsed}");
    assert!(rfc3339_ns(&stall["time"]) < request.1);
    assert_in_order(
        &functions(stall, "user_stack"),
        &["wait_for_timer", "handle_request", "main"],
    );
}

#[test]
fn a_thread_that_woke_and_blocked_again_is_reported_where_it_is_at_the_deadline() {
    let (stalls, _, request) = run_mode("twice", "2000", "300ms");
    assert_eq!(stalls.len(), 1);
    let stall = &stalls[0];
    assert_blocked_on_time(stall, request);
    let user = functions(stall, "user_stack");
    assert_in_order(&user, &["second_wait", "handle_request", "main"]);
    assert!(!user.contains(&"first_wait".to_owned()), "{user:?}");
    // It has been blocked only since the second wait began (~120 ms in).
    assert!(stall["blocked_ms"].as_u64().unwrap() < stall["elapsed_ms"].as_u64().unwrap() - 100);
}
