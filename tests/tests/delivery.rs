//! Issue 7: reports people act on. The real dogslow, real stalls, a real
//! SMTP server (aiosmtpd on loopback): mails delivered to every recipient
//! with the stack, storm control, an SMTP outage, text output and files.
use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use dogslow_tests::{smtp::*, *};
use serde_json::Value;

const STACK: [&str; 5] = [
    "spin_for",
    "handle_request",
    "dispatch",
    "serve_forever",
    "main",
];

/// Starts `slow_requests` with `args` (plus `--wait`).
fn target(args: &[&str]) -> Target {
    let mut all = args.to_vec();
    all.push("--wait");
    Target::spawn("slow_requests", &all)
}

fn attach(pids: &[u32], extra: &[&str]) -> Agent {
    let pids: Vec<String> = pids.iter().map(u32::to_string).collect();
    let mut args = vec!["attach"];
    for pid in &pids {
        args.extend(["--pid", pid.as_str()]);
    }
    args.extend([
        "--entry",
        "handle_request",
        "--timeout",
        "150ms",
        "--sample-hz",
        "199",
    ]);
    args.extend_from_slice(extra);
    Agent::start(&args)
}

fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}

fn assert_stack_in_text(text: &str) {
    for function in STACK {
        assert!(
            text.contains(&format!(" {function}+")),
            "{function} is not in the text report:\n{text}"
        );
    }
}

#[test]
fn one_stall_is_one_mail_to_every_recipient_with_the_stack() {
    require_root();
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &[]);
    let mut target = target(&["--requests", "3", "--slow-every", "3", "--slow-ms", "600"]);
    let agent = attach(
        &[target.pid()],
        &[
            "--email-to",
            "ops@example.com",
            "--email-to",
            "Dev Team <dev@example.com>",
            "--email-from",
            "dogslow@example.com",
            "--smtp",
            &server.url(),
        ],
    );
    target.go();
    target.finish(Duration::from_secs(30));
    let finished = agent.wait(Duration::from_secs(30));
    assert!(finished.status.success(), "{}", finished.stderr);
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 1, "{stalls:#?}");

    let mails = server.wait_for_mails(1, Duration::from_secs(10));
    thread::sleep(Duration::from_millis(300));
    assert_eq!(server.mails().len(), 1, "exactly one mail: {mails:#?}");
    let mail = &mails[0];
    assert_eq!(
        sorted(mail.rcpt_tos()),
        ["dev@example.com", "ops@example.com"]
    );
    assert_eq!(mail.0["mail_from"], "dogslow@example.com");
    assert!(
        mail.subject()
            .starts_with("[dogslow] slow_requests stalled in spin_for (running, "),
        "{}",
        mail.subject()
    );
    assert!(mail.subject().ends_with("): handle_request"));
    assert!(mail.text().starts_with("Undead request intercepted at: "));
    assert_stack_in_text(mail.text());
    assert!(
        mail.text()
            .contains(&format!("Process ID:  {}", stalls[0]["pid"])),
        "{}",
        mail.text()
    );
    let attached = mail.json_attachment();
    assert_eq!(attached["id"], stalls[0]["id"]);
    assert_eq!(attached["fingerprint"], stalls[0]["fingerprint"]);
    assert_eq!(
        mail.header("X-Dogslow-Fingerprint"),
        [stalls[0]["fingerprint"].as_str().unwrap()]
    );
}

#[test]
fn fifty_alike_stalls_are_fifty_json_lines_one_mail_then_a_digest_of_49() {
    require_root();
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &[]);
    let interval = Duration::from_secs(20);
    // 50 requests of 250 ms, each past the 150 ms deadline: about 13 s.
    let mut target = target(&["--requests", "50", "--slow-every", "1", "--slow-ms", "250"]);
    // A second process, never told to start, keeps dogslow running after
    // the first is done, so the digest comes from the interval, not the exit.
    let idle = self::target(&["--requests", "1"]);
    let agent = attach(
        &[target.pid(), idle.pid()],
        &[
            "--email-to",
            "ops@example.com",
            "--smtp",
            &server.url(),
            "--email-interval",
            "20s",
        ],
    );
    let started = Instant::now();
    target.go();
    let slow = timed_lines(&target.finish(Duration::from_secs(60)), "slow");
    assert_eq!(slow.len(), 50);
    assert!(
        started.elapsed() < interval,
        "the storm must fit in one interval"
    );
    assert_eq!(
        server.mails().len(),
        1,
        "one mail for the storm so far: {:#?}",
        server.mails()
    );

    let mails = server.wait_for_mails(2, interval + Duration::from_secs(15));
    assert_eq!(mails.len(), 2, "the digest after the interval: {mails:#?}");
    let (first, digest) = (&mails[0], &mails[1]);
    let gap = digest.received() - first.received();
    assert!(
        gap >= interval.as_secs_f64() - 1.0,
        "the digest came {gap:.1}s after the first mail"
    );
    assert_eq!(digest.header("X-Dogslow-Suppressed"), ["49"]);
    assert!(
        digest
            .subject()
            .starts_with("[dogslow] 49 more: slow_requests stalled in spin_for"),
        "{}",
        digest.subject()
    );
    assert!(
        digest
            .text()
            .starts_with("49 more stall(s) like this one were not mailed, between "),
        "{}",
        digest.text()
    );
    assert_stack_in_text(digest.text());
    assert_eq!(digest.header("In-Reply-To"), first.header("Message-ID"));

    let finished = agent.stop_with(libc::SIGTERM);
    assert!(finished.status.success(), "{}", finished.stderr);
    // Storm control never touches the JSON stream.
    let stalls = finished.stalls();
    assert_eq!(stalls.len(), 50);
    assert!(
        stalls
            .iter()
            .all(|s| s["fingerprint"] == stalls[0]["fingerprint"])
    );
    assert_eq!(first.json_attachment()["id"], stalls[0]["id"]);
    assert_eq!(digest.json_attachment()["id"], stalls[49]["id"]);
    // Both in the first and last stall's time span.
    let text = digest.text();
    assert!(text.contains(stalls[1]["time"].as_str().unwrap()), "{text}");
    assert!(
        text.contains(stalls[49]["time"].as_str().unwrap()),
        "{text}"
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(server.mails().len(), 2, "nothing was pending at exit");
    drop(idle);
}

#[test]
fn smtp_down_leaves_json_and_files_alone_and_delivery_resumes() {
    require_root();
    let port = free_port();
    let maildir = tempfile::tempdir().unwrap();
    let reports = tempfile::tempdir().unwrap();
    let out = reports.path().join("out");
    let mut target = target(&["--requests", "2", "--slow-every", "2", "--slow-ms", "600"]);
    let idle = self::target(&["--requests", "1"]);
    let agent = attach(
        &[target.pid(), idle.pid()],
        &[
            "--email-to",
            "ops@example.com",
            "--smtp",
            &format!("smtp://127.0.0.1:{port}"),
            "--output-dir",
            out.to_str().unwrap(),
        ],
    );
    target.go();
    target.finish(Duration::from_secs(30));
    // The report is on stdout and in the files at once.
    let line = agent
        .stdout
        .wait_for(Duration::from_secs(10), |l| l.contains("\"stall\""))
        .expect("a stall on stdout while the mail server is down");
    let stall: Value = serde_json::from_str(&line).unwrap();
    let files = wait_for_files(&out, 4);
    let json_file = files
        .iter()
        .find(|f| {
            f.to_string_lossy()
                .ends_with(&format!("{}.json", stall["id"].as_str().unwrap()))
        })
        .unwrap_or_else(|| panic!("no JSON file for the stall in {files:?}"));
    let written: Value =
        serde_json::from_str(&std::fs::read_to_string(json_file).unwrap()).unwrap();
    assert_eq!(written, stall);
    assert!(
        files
            .iter()
            .any(|f| f.to_string_lossy().ends_with(".completed.json")),
        "{files:?}"
    );
    // And stderr says clearly that mail does not go out.
    let error = agent
        .stderr
        .wait_for(Duration::from_secs(10), |l| l.contains("cannot send"))
        .expect("a clear error on stderr");
    assert!(
        error.contains(&format!("127.0.0.1:{port}")) && error.contains("retrying"),
        "{error}"
    );
    assert!(mails_in(maildir.path()).is_empty());

    // The server comes back: the mail goes out without a restart.
    let server = SmtpServer::start_on(port, maildir.path(), &[]);
    let mails = server.wait_for_mails(1, Duration::from_secs(90));
    assert_eq!(mails.len(), 1, "delivery resumed");
    assert_eq!(mails[0].json_attachment()["id"], stall["id"]);
    agent
        .stderr
        .wait_for(Duration::from_secs(5), |l| l.contains("takes mail again"))
        .expect("stderr says delivery resumed");
    let finished = agent.stop_with(libc::SIGTERM);
    assert!(finished.status.success(), "{}", finished.stderr);
    assert_eq!(finished.stalls().len(), 1);
    drop(idle);
}

fn wait_for_files(dir: &Path, count: usize) -> Vec<std::path::PathBuf> {
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        if files.len() >= count || Instant::now() > until {
            return files;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn text_format_and_output_dir() {
    require_root();
    let reports = tempfile::tempdir().unwrap();
    let out = reports.path().join("reports");
    // A file already there under a name dogslow could pick is never touched.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    let mut target = target(&["--requests", "2", "--slow-every", "2", "--slow-ms", "600"]);
    let pid = target.pid();
    let agent = attach(
        &[pid],
        &["--format", "text", "--output-dir", out.to_str().unwrap()],
    );
    target.go();
    target.finish(Duration::from_secs(30));
    let finished = agent.wait(Duration::from_secs(30));
    assert!(finished.status.success(), "{}", finished.stderr);

    // stdout: the human report, then the completion line.
    let stdout = finished.stdout.join("\n");
    assert!(
        stdout.starts_with("Undead request intercepted at: "),
        "{stdout}"
    );
    assert_stack_in_text(&stdout);
    assert!(
        stdout.contains(&format!("Process ID:  {pid}\n")),
        "{stdout}"
    );
    assert!(stdout.contains("State:       running (on CPU "));
    assert!(stdout.contains(": returned after "), "{stdout}");

    // The directory: the stall and its completion, text and JSON each.
    let files = wait_for_files(&out, 5);
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert_eq!(
        std::fs::read_to_string(out.join("keep.txt")).unwrap(),
        "mine"
    );
    let json_name = names
        .iter()
        .find(|n| n.ends_with(".json") && !n.contains(".completed"))
        .expect("a stall JSON file");
    let stall: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join(json_name)).unwrap()).unwrap();
    assert_eq!(stall["kind"], "stall");
    assert_in_order(&functions(&stall, "user_stack"), &STACK);
    let stem = json_name.trim_end_matches(".json");
    // 20260516T021012.345Z-slow_requests-PID-ID: sorts by time, names the process.
    assert_eq!(
        stem,
        format!(
            "{}-slow_requests-{}-{}",
            stall["time"].as_str().unwrap().replace(['-', ':'], ""),
            stall["pid"],
            stall["id"].as_str().unwrap()
        )
    );
    let text = std::fs::read_to_string(out.join(format!("{stem}.txt"))).unwrap();
    assert!(text.starts_with(&format!(
        "Undead request intercepted at: {}",
        stall["time"].as_str().unwrap()
    )));
    assert_stack_in_text(&text);
    let completed: Value = serde_json::from_str(
        &std::fs::read_to_string(out.join(format!("{stem}.completed.json"))).unwrap(),
    )
    .unwrap();
    assert_eq!(completed["id"], stall["id"]);
    assert_eq!(completed["outcome"], "returned");
    for file in &files {
        if file.ends_with("keep.txt") {
            continue;
        }
        let mode = std::fs::symlink_metadata(file)
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{}", file.display());
    }
}

#[test]
fn bad_output_options_fail_clearly() {
    require_root();
    let target = target(&["--requests", "1"]);
    let pid = target.pid().to_string();
    let base = ["attach", "--pid", pid.as_str(), "--entry", "handle_request"];
    let not_a_dir = tempfile::NamedTempFile::new().unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--email-to", "ops@example.com"],
            "--email-to needs --smtp",
        ),
        (
            vec![
                "--email-to",
                "ops@example.com",
                "--smtp",
                "mail.example.com:25",
            ],
            "write e.g. smtp://",
        ),
        (
            vec![
                "--email-to",
                "ops@example.com",
                "--smtp",
                "smtp://u:pw@127.0.0.1",
            ],
            "do not put the password in the URL",
        ),
        (
            vec![
                "--email-to",
                "ops@example.com",
                "--smtp",
                "smtp://u@127.0.0.1",
                "--smtp-password-file",
                "/nonexistent/password",
            ],
            "--smtp-password-file /nonexistent/password",
        ),
        (
            vec!["--email-to", "not-an-address", "--smtp", "smtp://127.0.0.1"],
            "is not a mail address",
        ),
        (
            vec!["--output-dir", not_a_dir.path().to_str().unwrap()],
            "not a directory",
        ),
    ];
    for (extra, want) in cases {
        let mut args = base.to_vec();
        args.extend(extra.iter().copied());
        let finished = run_dogslow(&args);
        assert_eq!(
            finished.status.code(),
            Some(1),
            "{args:?}: {}",
            finished.stderr
        );
        assert!(
            finished.stderr.contains(want),
            "{args:?}: expected {want:?} in {}",
            finished.stderr
        );
        assert!(finished.stdout.is_empty());
    }
}
