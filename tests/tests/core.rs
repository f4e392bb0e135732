//! Issue 2: `dogslow attach --pid` reports requests that run past their
//! deadline on a CPU, once each, with a symbolized stack; bad input fails
//! clearly.
use std::time::Duration;

use dogslow_tests::*;

use dogslow_tests::running_stalls::{TIMEOUT_MS, running_bound_ms};

#[test]
fn running_stalls_are_reported_once_each_with_their_stack() {
    require_root();
    running_stalls::check(Agent::start);
}

#[test]
fn fast_requests_are_never_reported() {
    // About 3 s of 2 ms requests, then one slow request as the control:
    // the probes were live all along, and only the slow one is reported.
    let watched = watch(
        "slow_requests",
        &[
            "--requests",
            "1501",
            "--fast-us",
            "2000",
            "--slow-every",
            "1501",
            "--slow-ms",
            "600",
        ],
        &["--entry", "handle_request", "--timeout", "300ms"],
    );
    let slow = timed_lines(&watched.program, "slow");
    assert_eq!(slow.len(), 1, "{:?}", watched.program);
    let stalls = watched.dogslow.stalls();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");
    let (slow_start, _) = slow[0];
    // Its start, not any fast request's (clocks agree to well under 2 ms).
    let started = rfc3339_ns(&stalls[0]["started"]);
    assert!(
        started.abs_diff(slow_start) < 2_000_000,
        "reported request started at {started}, the slow one at {slow_start}"
    );
    let completions = watched.dogslow.completions();
    assert_eq!(completions.len(), 1, "{completions:#?}");
    assert_eq!(completions[0]["outcome"], "returned");
    // handle_request begins with an emulated `push %rbp`: nothing to note.
    assert!(
        !watched.dogslow.stderr.contains("single-steps"),
        "{}",
        watched.dogslow.stderr
    );
}

#[test]
fn exit_form_requests_end_at_the_exit_function() {
    let watched = watch(
        "slow_requests",
        &[
            "--requests",
            "9",
            "--slow-every",
            "3",
            "--slow-ms",
            "1200",
            "--exit-form",
        ],
        &[
            "--entry",
            "begin_request",
            "--exit",
            "end_request",
            "--timeout",
            "300ms",
        ],
    );
    let slow = timed_lines(&watched.program, "slow");
    let stalls = watched.dogslow.stalls();
    assert_eq!(stalls.len(), slow.len(), "{stalls:#?}");
    for stall in &stalls {
        assert_eq!(stall["state"], "running");
        assert_eq!(stall["entry"], "begin_request");
        let elapsed = stall["elapsed_ms"].as_u64().unwrap();
        assert!(
            (TIMEOUT_MS..=running_bound_ms()).contains(&elapsed),
            "{elapsed}"
        );
        assert_in_order(
            &functions(stall, "user_stack"),
            &["spin_for", "dispatch", "serve_forever", "main"],
        );
    }
    // begin_request and end_request begin with a RIP-relative load, which
    // uprobes single-step: dogslow says so, once per probe.
    for probe in ["begin_request", "end_request"] {
        let note = format!("note: probe `{probe}` in process");
        assert_eq!(
            watched.dogslow.stderr.matches(&note).count(),
            1,
            "{}",
            watched.dogslow.stderr
        );
    }
    assert!(watched.dogslow.stderr.contains("single-steps"));
    // Each ended at end_request, not by the next begin_request (that
    // would be "abandoned") or by the process's exit.
    let completions = watched.dogslow.completions();
    assert_eq!(completions.len(), stalls.len(), "{completions:#?}");
    for completion in &completions {
        assert_eq!(completion["outcome"], "returned", "{completion:#}");
        let duration = completion["duration_ms"].as_u64().unwrap();
        assert!((1200..1500).contains(&duration), "{completion:#}");
    }
}

/// (file offset of `function`, file offset of its second instruction),
/// from the target's own disassembly.
fn function_offsets(function: &str) -> (u64, u64) {
    let out = std::process::Command::new("objdump")
        .args(["-d", "--no-show-raw-insn"])
        .arg(target_bin("slow_requests"))
        .output()
        .expect("objdump (binutils)");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut lines = text
        .lines()
        .skip_while(|l| !l.ends_with(&format!("<{function}>:")))
        .skip(1);
    let mut address = || -> u64 {
        let line = lines.next().unwrap();
        u64::from_str_radix(line.trim().split(':').next().unwrap(), 16).unwrap()
    };
    (address(), address())
}

#[test]
fn symbol_plus_offset_and_file_offset_probes() {
    require_root();
    let (begin, second) = function_offsets("begin_request");
    let (end, _) = function_offsets("end_request");
    // gcc's PIE text: file offset == address.
    let entry = format!("begin_request+{}", second - begin);
    let exit = format!("{end:#x}");
    let mut target = Target::spawn(
        "slow_requests",
        &[
            "--requests",
            "4",
            "--slow-every",
            "2",
            "--slow-ms",
            "800",
            "--exit-form",
            "--wait",
        ],
    );
    let pid = target.pid().to_string();
    let agent = Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        &entry,
        "--exit",
        &exit,
        "--timeout",
        "300ms",
    ]);
    target.go();
    target.finish(Duration::from_secs(30));
    let finished = agent.wait(Duration::from_secs(20));
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 2, "{stalls:#?}\n{}", finished.stderr);
    assert_eq!(stalls[0]["entry"], entry.as_str());
    assert_in_order(
        &functions(&stalls[0], "user_stack"),
        &["spin_for", "dispatch", "main"],
    );
    assert_eq!(
        finished.completions().len(),
        2,
        "the file-offset exit ended them"
    );

    // Without --exit the entry must be a function's first instruction.
    let finished = run_dogslow(&["attach", "--pid", &pid, "--entry", &entry]);
    assert!(!finished.status.success());
    assert!(
        finished.stderr.contains("first instruction"),
        "{}",
        finished.stderr
    );
}

#[test]
fn another_request_on_the_same_thread_gets_its_own_report() {
    let watched = watch(
        "slow_requests",
        &["--requests", "2", "--slow-every", "1", "--slow-ms", "800"],
        &["--entry", "handle_request", "--timeout", "300ms"],
    );
    let stalls = watched.dogslow.stalls();
    assert_eq!(stalls.len(), 2);
    assert_eq!(stalls[0]["tid"], stalls[1]["tid"]);
    assert_ne!(stalls[0]["id"], stalls[1]["id"]);
}

#[test]
fn sigterm_and_sigint_stop_cleanly_and_leave_no_probes() {
    require_root();
    for signal in [libc::SIGTERM, libc::SIGINT] {
        let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
        let pid = target.pid().to_string();
        let agent = Agent::start(&["attach", "--pid", &pid, "--entry", "handle_request"]);
        let (live, file) = function_first_bytes(target.pid(), "handle_request");
        assert_eq!(live, 0xcc, "the uprobe should be an int3 while attached");
        assert_ne!(file, 0xcc);
        let finished = agent.stop_with(signal);
        assert!(
            finished.status.success(),
            "signal {signal}: {:?} {}",
            finished.status,
            finished.stderr
        );
        // The probe is gone from the target: its code is the file's again.
        let (live, file) = function_first_bytes(target.pid(), "handle_request");
        assert_eq!(live, file, "uprobe left behind after signal {signal}");
    }
}

#[test]
fn a_killed_agent_leaves_no_probes() {
    require_root();
    let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
    let pid = target.pid().to_string();
    let agent = Agent::start(&["attach", "--pid", &pid, "--entry", "handle_request"]);
    assert_eq!(function_first_bytes(target.pid(), "handle_request").0, 0xcc);
    let finished = agent.stop_with(libc::SIGKILL);
    assert!(!finished.status.success());
    // The kernel drops the probes with the agent's file descriptors.
    std::thread::sleep(Duration::from_millis(200));
    let (live, file) = function_first_bytes(target.pid(), "handle_request");
    assert_eq!(live, file, "uprobe left behind by a SIGKILLed agent");
}

#[test]
fn duration_stops_dogslow() {
    require_root();
    let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
    let pid = target.pid().to_string();
    let started = std::time::Instant::now();
    let agent = Agent::start(&[
        "attach",
        "--pid",
        &pid,
        "--entry",
        "handle_request",
        "--duration",
        "1s",
    ]);
    // Attached: at most the rest of the second remains, plus the exit.
    let attached = std::time::Instant::now();
    let finished = agent.wait(Duration::from_secs(30));
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        started.elapsed() >= Duration::from_secs(1),
        "stopped before its duration: {:?}",
        started.elapsed()
    );
    assert!(
        attached.elapsed() < Duration::from_secs(3),
        "--duration 1s still running {:?} after attaching",
        attached.elapsed()
    );
}

mod bad_input {
    use super::*;

    fn assert_fails_with(finished: &Finished, needle: &str) {
        assert!(
            !finished.status.success(),
            "expected failure, got {:?}",
            finished.status
        );
        assert!(
            finished.stderr.contains(needle),
            "stderr should say {needle:?}:\n{}",
            finished.stderr
        );
        assert!(!finished.stderr.contains("panicked"), "{}", finished.stderr);
        assert!(finished.stdout.is_empty(), "no reports on bad input");
    }

    #[test]
    fn no_such_pid() {
        require_root();
        let finished = run_dogslow(&["attach", "--pid", "4000000", "--entry", "handle_request"]);
        assert_fails_with(&finished, "no process with PID 4000000");
    }

    #[test]
    fn pid_that_exits_while_attaching() {
        require_root();
        // A private copy of the program, watched with inotify: dogslow opens
        // it while it checks the target, and the test kills the target when
        // the check is done, so it is gone by the time the probes attach.
        let copy = std::env::temp_dir().join(format!("dogslow-exits-{}", std::process::id()));
        std::fs::copy(target_bin("slow_requests"), &copy).unwrap();
        let mut target = Target::spawn_command(std::process::Command::new(&copy).args([
            "--requests",
            "1",
            "--wait",
        ]));
        let pid = target.pid().to_string();
        // SAFETY: plain inotify calls on a path we own.
        let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(inotify >= 0);
        let path = std::ffi::CString::new(copy.to_str().unwrap()).unwrap();
        // SAFETY: as above.
        assert!(unsafe { libc::inotify_add_watch(inotify, path.as_ptr(), libc::IN_OPEN) } >= 0);
        let dogslow = std::process::Command::new(dogslow_bin())
            .args(["attach", "--pid", &pid, "--entry", "handle_request"])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // dogslow opens the program once per probe (return, then entry) to
        // check it before loading; kill the target after the second.
        let mut event = [0u8; 256];
        for _ in 0..2 {
            // SAFETY: reading into our own buffer; blocks until dogslow opens the copy.
            let read = unsafe { libc::read(inotify, event.as_mut_ptr().cast(), event.len()) };
            assert!(read > 0);
        }
        let _ = target.child.kill();
        let _ = target.child.wait();
        // SAFETY: closing our own descriptor.
        unsafe { libc::close(inotify) };
        let output = dogslow.wait_with_output().unwrap();
        let _ = std::fs::remove_file(&copy);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{stderr}");
        assert!(
            stderr.contains(&format!("process {pid} exited while dogslow was attaching")),
            "{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{stderr}");
    }

    #[test]
    fn symbol_not_found_suggests_close_names() {
        require_root();
        let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
        let pid = target.pid().to_string();
        let finished = run_dogslow(&["attach", "--pid", &pid, "--entry", "handle_requst"]);
        assert_fails_with(&finished, "function `handle_requst` not found in");
        assert!(
            finished.stderr.contains("did you mean handle_request"),
            "{}",
            finished.stderr
        );
        assert!(
            finished.stderr.contains(".symtab and .dynsym"),
            "{}",
            finished.stderr
        );
    }

    #[test]
    fn library_not_mapped() {
        require_root();
        let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
        let pid = target.pid().to_string();
        let finished = run_dogslow(&["attach", "--pid", &pid, "--entry", "libnope.so.1:f"]);
        assert_fails_with(&finished, "does not map a library named `libnope.so.1`");
        assert!(finished.stderr.contains("libc.so.6"), "{}", finished.stderr);
    }

    /// Probe points that would corrupt the target, or define no request, are
    /// refused before anything is attached.
    #[test]
    fn probe_points_that_cannot_work_are_refused() {
        require_root();
        let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
        let pid = target.pid().to_string();
        let (begin, second) = function_offsets("begin_request");
        let mid_function = format!("{second:#x}");
        let cases: [(&[&str], &str); 6] = [
            (&["--entry", "0x0", "--exit", "end_request"], "is not code"),
            (
                &["--entry", "begin_request+100000", "--exit", "end_request"],
                "is past its end",
            ),
            // A return probe must be on a function's first instruction.
            (
                &["--entry", &mid_function],
                "is inside a function, past its start",
            ),
            (
                &["--entry", "begin_request", "--exit", "begin_request"],
                "are the same probe",
            ),
            (
                &["--entry", ":begin_request"],
                "the library before `:` is empty",
            ),
            (
                &["--entry", "+4", "--exit", "end_request"],
                "function before `+` is empty",
            ),
        ];
        for (args, needle) in cases {
            let mut command = vec!["attach", "--pid", &pid];
            command.extend_from_slice(args);
            assert_fails_with(&run_dogslow(&command), needle);
        }
        // A function's start is fine without --exit.
        let start = format!("{begin:#x}");
        let finished = run_dogslow(&[
            "attach",
            "--pid",
            &pid,
            "--entry",
            &start,
            "--duration",
            "100ms",
        ]);
        assert!(finished.status.success(), "{}", finished.stderr);
        // --binary takes the absolute path processes run.
        let finished = run_dogslow(&["attach", "--binary", "slow_requests", "--entry", "f"]);
        assert_fails_with(&finished, "give an absolute path");
    }

    #[test]
    fn zero_or_unparsable_timeout() {
        require_root();
        for (timeout, needle) in [
            ("0s", "zero timeout"),
            ("0", "zero timeout"),
            ("soon", "not a duration"),
        ] {
            let finished =
                run_dogslow(&["attach", "--pid", "1", "--entry", "f", "--timeout", timeout]);
            assert_fails_with(&finished, needle);
        }
    }

    #[test]
    fn unprivileged_user_is_told_what_is_needed() {
        require_root();
        let target = Target::spawn("slow_requests", &["--requests", "1", "--wait"]);
        let pid = target.pid().to_string();
        let finished = run_dogslow_command(
            std::process::Command::new("setpriv")
                .args([
                    "--reuid=65534",
                    "--regid=65534",
                    "--clear-groups",
                    "--inh-caps=-all",
                ])
                .arg(dogslow_bin())
                .args(["attach", "--pid", &pid, "--entry", "handle_request"]),
        );
        assert_fails_with(
            &finished,
            "dogslow needs root, or the capabilities CAP_SYS_ADMIN, CAP_SYS_PTRACE, \
             CAP_DAC_READ_SEARCH and CAP_SYSLOG; missing: CAP_SYS_ADMIN (",
        );
    }
}
