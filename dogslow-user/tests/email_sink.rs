//! The email sink against a real SMTP server (aiosmtpd on loopback, see
//! tests/smtp/smtp_sink.py): what arrives, to whom, with which headers.
//! No root needed: reports are built here and pushed through the sink as
//! the reporting thread would.
// Test helpers: a failed step is a failed test.
#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dogslow::{
    report::{Report, StallReport},
    sinks::{
        EmailSink, Sink,
        email::{EmailConfig, RetryPolicy},
        smtp::SmtpServer as SmtpUrl,
    },
};
use dogslow_tests::smtp::{SmtpServer, free_port, make_certificates};

fn config(url: &str, interval: Duration) -> EmailConfig {
    EmailConfig {
        to: vec![
            "ops@example.com".parse().unwrap(),
            "Dev Team <dev@example.com>".parse().unwrap(),
        ],
        from: "dogslow@web-1.example.com".parse().unwrap(),
        server: SmtpUrl::parse(url).unwrap(),
        interval,
        max_per_hour: 100,
        retry: RetryPolicy {
            first_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(1),
            ..RetryPolicy::default()
        },
    }
}

fn stall(report: StallReport) -> Report {
    Report::Stall(Box::new(report))
}

fn sorted(mut list: Vec<String>) -> Vec<String> {
    list.sort();
    list
}

#[test]
fn one_stall_is_one_mail_to_every_recipient_with_the_stack() {
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &[]);
    let mut sink = EmailSink::start(config(&server.url(), Duration::from_secs(600))).unwrap();
    let report = StallReport::example();
    sink.emit(&stall(report.clone()));
    sink.finish();

    let mails = server.wait_for_mails(1, Duration::from_secs(20));
    assert_eq!(mails.len(), 1, "{mails:#?}");
    let mail = &mails[0];
    assert_eq!(
        sorted(mail.rcpt_tos()),
        ["dev@example.com", "ops@example.com"]
    );
    assert_eq!(mail.0["mail_from"], "dogslow@web-1.example.com");
    assert_eq!(
        mail.subject(),
        "[dogslow] slow_requests stalled in spin_for (running, 312 ms): handle_request"
    );
    assert_eq!(
        mail.header("X-Dogslow-Fingerprint"),
        std::slice::from_ref(&report.fingerprint)
    );
    assert_eq!(
        mail.header("X-Dogslow-Report-Id"),
        std::slice::from_ref(&report.id)
    );
    let text = mail.text();
    assert!(
        text.starts_with("Undead request intercepted at: 2026-05-16T02:10:12.345Z"),
        "{text}"
    );
    for function in [
        "spin_for",
        "handle_request",
        "dispatch",
        "serve_forever",
        "main",
    ] {
        assert!(
            text.contains(&format!(" {function}+0x24 at /src/slow_requests.c:")),
            "{function} not in:\n{text}"
        );
    }
    assert!(text.contains("Process ID:  4242"));
    let attached = mail.json_attachment();
    assert_eq!(attached["id"], report.id.as_str());
    assert_eq!(attached["user_stack"][0]["function"], "spin_for");
}

#[test]
fn captured_request_text_cannot_add_headers_or_recipients() {
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &[]);
    let mut sink = EmailSink::start(config(&server.url(), Duration::from_secs(600))).unwrap();
    let mut report = StallReport::example();
    let mut request = serde_json::Map::new();
    request.insert(
        "line".into(),
        "GET /pay\r\nBcc: x@evil\r\nX-Injected: 1\n\u{e9}\u{202e}".into(),
    );
    report.request = Some(request);
    sink.emit(&stall(report));
    sink.finish();

    let mails = server.wait_for_mails(1, Duration::from_secs(20));
    assert_eq!(mails.len(), 1);
    let mail = &mails[0];
    assert_eq!(
        sorted(mail.rcpt_tos()),
        ["dev@example.com", "ops@example.com"],
        "no extra recipient"
    );
    assert!(mail.header("Bcc").is_empty(), "{}", mail.raw_headers());
    assert!(
        mail.header("X-Injected").is_empty(),
        "{}",
        mail.raw_headers()
    );
    let raw = mail.raw_headers();
    assert!(raw.is_ascii(), "{raw}");
    for line in raw.split("\r\n") {
        let lower = line.to_ascii_lowercase();
        assert!(
            !lower.starts_with("bcc") && !lower.starts_with("x-injected"),
            "{raw}"
        );
    }
    // The text is still there to read, escaped, in the subject and the body.
    assert!(
        mail.subject()
            .ends_with(r"line=GET /pay\r\nBcc: x@evil\r\nX-Injected: 1\n\u{e9}\u{202e}"),
        "{}",
        mail.subject()
    );
    assert!(
        mail.text()
            .contains(r"  line: GET /pay\r\nBcc: x@evil\r\nX-Injected: 1\n"),
        "{}",
        mail.text()
    );
}

#[test]
fn a_storm_is_one_mail_then_a_digest_after_the_interval() {
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &[]);
    let interval = Duration::from_secs(3);
    let mut sink = EmailSink::start(config(&server.url(), interval)).unwrap();
    let started = SystemTime::now();
    for i in 0..50 {
        let mut report = StallReport::example();
        report.id = format!("{i:016x}");
        report.time = format!("2026-05-16T02:10:{i:02}.000Z");
        sink.emit(&stall(report));
    }
    let first = server.wait_for_mails(1, Duration::from_secs(10));
    assert_eq!(first.len(), 1);
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(server.mails().len(), 1, "nothing more within the interval");
    let mails = server.wait_for_mails(2, Duration::from_secs(15));
    assert_eq!(mails.len(), 2, "{mails:#?}");
    let digest = &mails[1];
    let started = started.duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(digest.received() - started >= interval.as_secs_f64() - 0.1);
    assert_eq!(digest.header("X-Dogslow-Suppressed"), ["49"]);
    assert!(
        digest
            .subject()
            .starts_with("[dogslow] 49 more: slow_requests stalled in spin_for"),
        "{}",
        digest.subject()
    );
    assert!(
        digest.text().starts_with(
            "49 more stall(s) like this one were not mailed, between 2026-05-16T02:10:01.000Z and 2026-05-16T02:10:49.000Z"
        ),
        "{}",
        digest.text()
    );
    assert_eq!(digest.json_attachment()["id"], format!("{:016x}", 49));
    // Threaded under the first mail.
    assert_eq!(digest.header("In-Reply-To"), first[0].header("Message-ID"));
    sink.finish();
    assert_eq!(server.mails().len(), 2, "nothing pending at exit");
}

#[test]
fn pending_counts_are_mailed_at_exit() {
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &[]);
    let mut sink = EmailSink::start(config(&server.url(), Duration::from_secs(600))).unwrap();
    for _ in 0..3 {
        sink.emit(&stall(StallReport::example()));
    }
    sink.finish();
    let mails = server.wait_for_mails(2, Duration::from_secs(10));
    assert_eq!(mails.len(), 2);
    assert_eq!(mails[1].header("X-Dogslow-Suppressed"), ["2"]);
}

#[test]
fn delivery_resumes_when_the_server_comes_back() {
    let maildir = tempfile::tempdir().unwrap();
    let port = free_port();
    let url = format!("smtp://127.0.0.1:{port}");
    let mut sink = EmailSink::start(config(&url, Duration::from_secs(600))).unwrap();
    sink.emit(&stall(StallReport::example()));
    std::thread::sleep(Duration::from_secs(2));
    let server = SmtpServer::start_on(port, maildir.path(), &[]);
    let mails = server.wait_for_mails(1, Duration::from_secs(10));
    assert_eq!(
        mails.len(),
        1,
        "the queued mail is sent once the server is back"
    );
    sink.finish();
}

#[test]
fn authenticates_with_the_password() {
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &["--auth", "alerts:s3cret"]);
    let mut config = config(
        &format!("smtp://alerts@127.0.0.1:{}", server.port),
        Duration::from_secs(600),
    );
    config.server = config
        .server
        .with_password(Some("s3cret".into()), None)
        .unwrap();
    let mut sink = EmailSink::start(config).unwrap();
    sink.emit(&stall(StallReport::example()));
    sink.finish();
    let mails = server.wait_for_mails(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1);
    assert_eq!(mails[0].0["auth_login"], "alerts");
}

#[test]
fn a_wrong_password_sends_nothing() {
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(0, maildir.path(), &["--auth", "alerts:s3cret"]);
    let mut config = config(
        &format!("smtp://alerts@127.0.0.1:{}", server.port),
        Duration::from_secs(600),
    );
    config.server = config
        .server
        .with_password(Some("wrong".into()), None)
        .unwrap();
    config.retry.flush_timeout = Duration::from_secs(2);
    let mut sink = EmailSink::start(config).unwrap();
    sink.emit(&stall(StallReport::example()));
    sink.finish();
    assert!(server.mails().is_empty());
}

fn tls_mail(url: impl Fn(u16) -> String, server_args: &[&str]) {
    let certs = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certificates(certs.path());
    let maildir = tempfile::tempdir().unwrap();
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(server_args);
    let server = SmtpServer::start_on(0, maildir.path(), &args);
    let mut config = config(&url(server.port), Duration::from_secs(600));
    config.server = config.server.with_ca_file(Some(&ca)).unwrap();
    let mut sink = EmailSink::start(config).unwrap();
    sink.emit(&stall(StallReport::example()));
    sink.finish();
    let mails = server.wait_for_mails(1, Duration::from_secs(10));
    assert_eq!(mails.len(), 1);
    assert!(mails[0].text().contains("spin_for"));
}

#[test]
fn sends_over_implicit_tls() {
    tls_mail(
        |port| format!("smtps://127.0.0.1:{port}"),
        &["--implicit-tls"],
    );
}

#[test]
fn sends_over_starttls() {
    tls_mail(|port| format!("smtp://127.0.0.1:{port}?tls=required"), &[]);
}

#[test]
fn an_untrusted_certificate_sends_nothing() {
    let certs = tempfile::tempdir().unwrap();
    let (_, cert, key) = make_certificates(certs.path());
    let maildir = tempfile::tempdir().unwrap();
    let server = SmtpServer::start_on(
        0,
        maildir.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--implicit-tls",
        ],
    );
    let mut config = config(
        &format!("smtps://127.0.0.1:{}", server.port),
        Duration::from_secs(600),
    );
    config.retry.flush_timeout = Duration::from_secs(2);
    let mut sink = EmailSink::start(config).unwrap();
    sink.emit(&stall(StallReport::example()));
    sink.finish();
    assert!(server.mails().is_empty());
}
