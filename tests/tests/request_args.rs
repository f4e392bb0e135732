//! Issue 6 (function probes): `--capture` records request arguments at
//! entry and reports carry them as "request": {NAME: value}.
use std::time::Duration;

use dogslow_tests::*;
use serde_json::Value;

fn stall_with(line: &str, extra: &[&str]) -> Value {
    require_root();
    let mut target = Target::spawn(
        "request_line",
        &[line, "--ms", "800", "--id", "-7", "--wait"],
    );
    let pid = target.pid().to_string();
    let mut args = vec![
        "attach",
        "--pid",
        &pid,
        "--entry",
        "handle_request",
        "--timeout",
        "300ms",
    ];
    args.extend_from_slice(extra);
    let agent = Agent::start(&args);
    target.go();
    let stall = agent
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
        .expect("a stall report");
    target.finish(Duration::from_secs(10));
    serde_json::from_str(&stall).unwrap()
}

#[test]
fn function_arguments_are_captured_by_register() {
    let stall = stall_with(
        "GET /slow HTTP/1.1",
        &[
            "--capture",
            "line=arg0:str",
            "--capture",
            "id=arg1:i64",
            "--capture",
            "arg2:u64",
            "--capture",
            "ptr=arg0:hex",
        ],
    );
    let request = &stall["request"];
    assert_eq!(request["line"], "GET /slow HTTP/1.1", "{stall}");
    assert_eq!(request["id"], -7);
    assert_eq!(request["arg2"], 800);
    assert!(request["ptr"].as_str().unwrap().starts_with("0x"));
}

#[test]
fn captured_text_is_escaped_and_truncation_marked() {
    let stall = stall_with(r"GET /x\r\nBcc: x@evil", &["--capture", "line=arg0:str"]);
    let line = stall["request"]["line"].as_str().unwrap();
    assert_eq!(line, r"GET /x\r\nBcc: x@evil");
    assert!(!line.contains('\r') && !line.contains('\n'));

    let stall = stall_with(
        "GET /a-rather-long-path",
        &["--capture", "line=arg0:str", "--capture-len", "8"],
    );
    assert_eq!(stall["request"]["line"], "GET /a-r…[truncated]");
}

#[test]
fn reports_without_captures_have_a_null_request() {
    let stall = stall_with("GET /", &[]);
    assert!(stall["request"].is_null());
}

#[test]
fn bad_captures_are_refused() {
    require_root();
    for (capture, needle) in [
        (
            "q=arg0:float",
            "unknown type `float`; use one of str, u64, i64, hex",
        ),
        ("q=arg7:u64", "arg7 is passed on the stack"),
        ("q=first:str", "write a capture as [NAME=]argN:TYPE"),
    ] {
        let target = Target::spawn("request_line", &["x", "--wait"]);
        let pid = target.pid().to_string();
        let finished = run_dogslow(&[
            "attach",
            "--pid",
            &pid,
            "--entry",
            "handle_request",
            "--capture",
            capture,
        ]);
        assert!(!finished.status.success(), "{capture}");
        assert!(
            finished.stderr.contains(needle),
            "{capture}: {}",
            finished.stderr
        );
        assert!(!finished.stderr.contains("panicked"));
    }
}
