//! dogslow refuses to probe Go programs, with a sentence that says why, and
//! leaves them unharmed: Go runs goroutines on any thread (per-thread
//! request tracking would report stalls that are not there) and moves their
//! stacks (uretprobes crash Go programs).
use std::{path::PathBuf, process::Command, time::Duration};

use dogslow_tests::*;

/// tests/targets/go_server.go, built with Debian's Go (cargo xtask setup
/// installs golang-go) next to the other test programs.
fn go_server() -> PathBuf {
    let out = target_bin("go_server");
    let source = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("targets/go_server.go");
    let cache = out.with_file_name("go-cache");
    let status = Command::new("go")
        .args(["build", "-o"])
        .arg(&out)
        .arg(&source)
        .env("GOCACHE", &cache)
        .env("GO111MODULE", "off")
        .status()
        .expect("go (golang-go) is needed: run cargo xtask setup");
    assert!(status.success(), "go build {} failed", source.display());
    out
}

fn assert_refused(finished: &Finished, program: &str) {
    assert!(!finished.status.success(), "{:?}", finished.status);
    assert!(
        finished.stderr.contains(&format!(
            "{program} is a Go program, which dogslow does not probe"
        )),
        "{}",
        finished.stderr
    );
    assert!(!finished.stderr.contains("panicked"), "{}", finished.stderr);
    assert!(finished.stdout.is_empty(), "{:?}", finished.stdout);
}

#[test]
fn a_go_program_is_refused_and_keeps_running_unharmed() {
    require_root();
    let binary = go_server();
    let program = binary.to_str().unwrap();
    // About 5 s of 5 ms requests.
    let target = Target::spawn_command(Command::new(&binary).arg("1000"));
    let pid = target.pid().to_string();
    for exit in [None, Some("main.main")] {
        let mut args = vec![
            "attach",
            "--pid",
            &pid,
            "--entry",
            "main.handleRequest",
            "--timeout",
            "300ms",
        ];
        if let Some(exit) = exit {
            args.extend(["--exit", exit]);
        }
        assert_refused(&run_dogslow(&args), program);
    }
    let finished = run_dogslow(&[
        "attach",
        "--binary",
        program,
        "--entry",
        "main.handleRequest",
    ]);
    assert_refused(&finished, program);
    let lines = target.finish(Duration::from_secs(30));
    assert_eq!(lines, ["served 1000"]);
}
