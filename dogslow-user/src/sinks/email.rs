//! Stall reports by email, the way the original Dogslow was used: a mail
//! in the team's inbox with the stack in it.
//!
//! The reporting thread must never wait for a mail server, so `emit` only
//! puts the report in a bounded queue. A thread of its own ("dogslow-mail",
//! with a small current-thread tokio runtime, separate from the agent's so
//! that SMTP can never delay the ring buffer or the deadline scan) applies
//! storm control, composes the mails and hands them to a delivery task that
//! sends them one at a time, retrying with exponential backoff while the
//! server is unreachable. Every failure, drop and recovery is said on
//! stderr; the JSON stream and the output files never depend on any of it.
use crate::metrics::MailCounters;
use std::{
    fmt::Write as _,
    sync::Arc,
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use lettre::{
    AsyncSmtpTransport, AsyncTransport as _, Message, Tokio1Executor,
    message::{
        Attachment, Mailbox, MultiPart, SinglePart,
        header::{ContentType, HeaderName, HeaderValue},
    },
};
use thiserror::Error;
use tokio::sync::{mpsc, watch};

use super::{
    Sink,
    smtp::{SmtpError, SmtpServer},
    storm::{Due, StormControl, Suppressed},
    text::{self, header_safe},
};
use crate::report::{Report, StallReport};

type Transport = AsyncSmtpTransport<Tokio1Executor>;

/// Reports waiting for the mail thread. It only does bookkeeping, so this
/// fills only if that thread is starved; what does not fit is counted.
const REPORT_QUEUE: usize = 4096;
/// Composed mails waiting for the server (storm control keeps this small;
/// it fills during a long outage).
const MAIL_QUEUE: usize = 256;
/// Longest parts of a subject, in characters.
const SUBJECT_PROGRAM: usize = 40;
const SUBJECT_FRAME: usize = 60;
const SUBJECT_REQUEST: usize = 80;
/// Longest one delivery attempt may take. lettre's own timeout covers only
/// connecting; a server that stops answering mid-dialogue must not hold
/// the queue.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Error)]
pub enum EmailError {
    #[error(transparent)]
    Smtp(#[from] SmtpError),
    #[error("cannot start the mail thread: {0}")]
    Thread(#[source] std::io::Error),
    #[error("composing a mail: {0}")]
    Compose(#[from] lettre::error::Error),
}

/// When and how long to retry a mail the server did not take.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Wait before the second attempt; doubles each time, up to `max_delay`.
    pub first_delay: Duration,
    pub max_delay: Duration,
    /// A mail still not sent this long after it was composed is dropped.
    pub give_up_after: Duration,
    /// At exit, how long pending mails may still take.
    pub flush_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            first_delay: Duration::from_secs(1),
            max_delay: Duration::from_secs(60),
            give_up_after: Duration::from_secs(3600),
            flush_timeout: Duration::from_secs(10),
        }
    }
}

/// Everything the email sink needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EmailConfig {
    pub to: Vec<Mailbox>,
    pub from: Mailbox,
    pub server: SmtpServer,
    /// At most one mail per fingerprint per interval.
    pub interval: Duration,
    /// At most this many mails per hour in all.
    pub max_per_hour: u32,
    pub retry: RetryPolicy,
}

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(600);
pub const DEFAULT_MAX_PER_HOUR: u32 = 30;

/// The sink on the reporting thread: a queue into the mail thread.
pub struct EmailSink {
    reports: Option<mpsc::Sender<Arc<StallReport>>>,
    worker: Option<thread::JoinHandle<()>>,
    /// Reports that did not fit in the queue.
    dropped: u64,
}

impl EmailSink {
    /// Checks the configuration (TLS set-up, CA file) and starts the mail thread.
    pub fn start(config: EmailConfig) -> Result<Self, EmailError> {
        Self::start_counted(config, MailCounters::default())
    }

    /// As `start`, counting sent, failed and suppressed mails in `counters`.
    pub fn start_counted(config: EmailConfig, counters: MailCounters) -> Result<Self, EmailError> {
        let transport = config.server.transport()?;
        if config.server.is_cleartext_remote() {
            eprintln!(
                "dogslow: warning: mail to {} travels unencrypted; use ?tls=required or smtps:// unless the network is trusted",
                config.server.host
            );
        }
        eprintln!(
            "dogslow: mailing stall reports to {} via {}; at most one mail per kind of stall every {}, {} per hour",
            config
                .to
                .iter()
                .map(|to| to.email.to_string())
                .collect::<Vec<_>>()
                .join(", "),
            config.server.describe(),
            humantime::format_duration(config.interval),
            config.max_per_hour
        );
        let (tx, rx) = mpsc::channel(REPORT_QUEUE);
        let worker = thread::Builder::new()
            .name("dogslow-mail".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(err) => {
                        eprintln!("dogslow: email: cannot start: {err}; no mail will be sent");
                        return;
                    }
                };
                runtime.block_on(mail_loop(config, transport, rx, counters));
            })
            .map_err(EmailError::Thread)?;
        Ok(Self {
            reports: Some(tx),
            worker: Some(worker),
            dropped: 0,
        })
    }
}

impl Sink for EmailSink {
    fn emit(&mut self, report: &Report) {
        // Completion records are not mailed: the stall's mail is the alert,
        // and the JSON stream and files say how it ended.
        let Report::Stall(stall) = report else {
            return;
        };
        let Some(reports) = &self.reports else {
            return;
        };
        match reports.try_send(Arc::new((**stall).clone())) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.dropped == 0 {
                    eprintln!(
                        "dogslow: email: the mail queue is full; stall reports are not mailed until it drains (they are on stdout)"
                    );
                }
                self.dropped += 1;
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.dropped += 1;
            }
        }
    }

    fn finish(&mut self) {
        // Closing the queue tells the mail thread to send what it has
        // (bounded by the flush timeout) and stop.
        self.reports = None;
        if let Some(worker) = self.worker.take() {
            let _ = worker.join();
        }
        if self.dropped > 0 {
            eprintln!(
                "dogslow: email: {} stall report(s) were not considered for mail because the queue was full",
                self.dropped
            );
        }
    }
}

/// A composed mail waiting for the server.
struct Outgoing {
    message: Message,
    subject: String,
    composed: Instant,
}

/// Storm control and composition, on the mail thread.
struct Gate {
    config: EmailConfig,
    storm: StormControl,
    outbox: mpsc::Sender<Outgoing>,
    /// Mails not queued because the outbox was full, since the last notice.
    dropped: u64,
    counters: MailCounters,
}

impl Gate {
    fn offer(&mut self, report: Arc<StallReport>) {
        match self.storm.offer(report, Instant::now()) {
            Some(due) => self.queue(due),
            None => {
                self.counters.suppressed.inc();
            }
        }
        if let Some(cap) = self.storm.take_cap_notice() {
            eprintln!(
                "dogslow: email: {cap} mails sent in the last hour (--email-max-per-hour); further stalls are counted and summarized when the hour allows"
            );
        }
    }

    fn due(&mut self) {
        for due in self.storm.due(Instant::now()) {
            self.queue(due);
        }
    }

    fn queue(&mut self, due: Due) {
        let composed = match compose(&due, &self.config) {
            Ok(composed) => composed,
            Err(err) => {
                eprintln!(
                    "dogslow: email: cannot compose the mail for report {}: {err}",
                    due.report.id
                );
                return;
            }
        };
        if due.thread.is_none() {
            self.storm
                .set_thread(&due.report.fingerprint, &composed.message_id);
        }
        match self.outbox.try_send(Outgoing {
            message: composed.message,
            subject: composed.subject,
            composed: Instant::now(),
        }) {
            Ok(()) => {
                if self.dropped > 0 {
                    eprintln!(
                        "dogslow: email: the outbox has room again; {} mail(s) were dropped while it was full",
                        self.dropped
                    );
                    self.dropped = 0;
                }
            }
            Err(_) => {
                if self.dropped == 0 {
                    eprintln!(
                        "dogslow: email: {MAIL_QUEUE} mails are waiting for the server; dropping new ones until it takes them (the reports are on stdout)"
                    );
                }
                self.dropped += 1;
            }
        }
    }
}

async fn mail_loop(
    config: EmailConfig,
    transport: Transport,
    mut reports: mpsc::Receiver<Arc<StallReport>>,
    counters: MailCounters,
) {
    let (outbox, outbox_rx) = mpsc::channel(MAIL_QUEUE);
    let (deadline_tx, deadline_rx) = watch::channel(None);
    let delivery = tokio::spawn(deliver(
        transport,
        config.server.describe(),
        config.retry,
        outbox_rx,
        deadline_rx,
        counters.clone(),
    ));
    let flush_timeout = config.retry.flush_timeout;
    let mut gate = Gate {
        storm: StormControl::new(config.interval, config.max_per_hour),
        config,
        outbox,
        dropped: 0,
        counters,
    };
    loop {
        let wake = gate.storm.next_wakeup();
        tokio::select! {
            report = reports.recv() => match report {
                Some(report) => gate.offer(report),
                None => break,
            },
            () = sleep_until(wake) => gate.due(),
        }
    }
    // Stopping: counts still pending become digests now, or they are lost.
    for due in gate.storm.drain() {
        gate.queue(due);
    }
    if gate.storm.overflow > 0 {
        eprintln!(
            "dogslow: email: {} stall(s) of new kinds were not mailed or counted: too many kinds at once",
            gate.storm.overflow
        );
    }
    let pending = MAIL_QUEUE - gate.outbox.capacity();
    if pending > 0 {
        eprintln!(
            "dogslow: email: sending {pending} pending mail(s) before exiting (at most {})",
            humantime::format_duration(flush_timeout)
        );
    }
    let _ = deadline_tx.send(Some(Instant::now() + flush_timeout));
    if gate.dropped > 0 {
        gate.counters.failed.inc_by(gate.dropped);
        eprintln!(
            "dogslow: email: {} mail(s) were dropped because the outbox was full (the reports are on stdout)",
            gate.dropped
        );
    }
    drop(gate);
    let _ = delivery.await;
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

enum Attempt {
    Sent,
    /// The server refused the mail for good (5xx): retrying cannot help.
    Refused(String),
    /// Connection, TLS, timeout or a temporary (4xx) answer.
    Failed(String),
}

/// Sends the outbox's mails one at a time, in order.
async fn deliver(
    transport: Transport,
    server: String,
    retry: RetryPolicy,
    mut mails: mpsc::Receiver<Outgoing>,
    mut deadline: watch::Receiver<Option<Instant>>,
    counters: MailCounters,
) {
    // Wrong host, TLS or credentials show now rather than at the first stall.
    match tokio::time::timeout(ATTEMPT_TIMEOUT, transport.test_connection()).await {
        Ok(Ok(true)) => {}
        Ok(Ok(false)) => {
            eprintln!("dogslow: email: {server} did not answer NOOP; mails will be retried")
        }
        Ok(Err(err)) if err.is_permanent() => eprintln!(
            "dogslow: email: the SMTP server {server} refuses dogslow: {}; check --smtp's user, the password and --email-from",
            describe(&err)
        ),
        Ok(Err(err)) => eprintln!(
            "dogslow: email: cannot reach the SMTP server {server} now: {}; mails will be retried",
            describe(&err)
        ),
        Err(_) => eprintln!(
            "dogslow: email: the SMTP server {server} did not answer within {}s; mails will be retried",
            ATTEMPT_TIMEOUT.as_secs()
        ),
    }
    // Failed attempts since the server last took a mail (an outage).
    let mut failures: u32 = 0;
    let mut unsent: u64 = 0;
    while let Some(mail) = mails.recv().await {
        if deadline.borrow().is_some_and(|at| Instant::now() >= at) {
            unsent += 1;
            continue;
        }
        loop {
            let at = *deadline.borrow();
            let attempt = match at {
                Some(at) => tokio::time::timeout_at(at.into(), send(&transport, &mail.message))
                    .await
                    .unwrap_or_else(|_| Attempt::Failed("no time left before exit".into())),
                None => send(&transport, &mail.message).await,
            };
            match attempt {
                Attempt::Sent => {
                    counters.sent.inc();
                    if failures > 0 {
                        eprintln!(
                            "dogslow: email: {server} takes mail again; sent \"{}\" after {failures} failed attempt(s)",
                            mail.subject
                        );
                        failures = 0;
                    }
                    break;
                }
                Attempt::Refused(err) => {
                    counters.failed.inc();
                    eprintln!(
                        "dogslow: email: {server} refused \"{}\": {err}; not retrying (the report is on stdout)",
                        mail.subject
                    );
                    break;
                }
                Attempt::Failed(err) => {
                    let delay = backoff(&retry, failures);
                    if failures == 0 {
                        eprintln!(
                            "dogslow: email: cannot send \"{}\" via {server}: {err}; retrying with backoff (reports still go to stdout)",
                            mail.subject
                        );
                    }
                    failures = failures.saturating_add(1);
                    let retry_at = Instant::now() + delay;
                    let too_old = mail.composed.elapsed() + delay > retry.give_up_after;
                    let too_late = deadline.borrow().is_some_and(|at| retry_at > at);
                    if too_old || too_late {
                        counters.failed.inc();
                        eprintln!(
                            "dogslow: email: giving up on \"{}\": {err}{}",
                            mail.subject,
                            if too_late { " (exiting)" } else { "" }
                        );
                        break;
                    }
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        // Exit started: re-check whether a retry still fits.
                        _ = deadline.changed() => {}
                    }
                }
            }
        }
    }
    if unsent > 0 {
        eprintln!("dogslow: email: {unsent} mail(s) were not sent before exit");
    }
}

/// The wait after `failures` failed attempts: doubling, capped.
fn backoff(retry: &RetryPolicy, failures: u32) -> Duration {
    retry
        .first_delay
        .saturating_mul(1u32 << failures.min(16))
        .min(retry.max_delay)
}

async fn send(transport: &Transport, message: &Message) -> Attempt {
    match tokio::time::timeout(ATTEMPT_TIMEOUT, transport.send(message.clone())).await {
        Ok(Ok(_)) => Attempt::Sent,
        Ok(Err(err)) if err.is_permanent() => Attempt::Refused(describe(&err)),
        Ok(Err(err)) => Attempt::Failed(describe(&err)),
        Err(_) => Attempt::Failed(format!("no answer within {}s", ATTEMPT_TIMEOUT.as_secs())),
    }
}

/// An SMTP error with its causes (lettre's top message alone says little).
fn describe(err: &lettre::transport::smtp::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            let _ = write!(text, ": {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A mail ready to queue.
pub struct Composed {
    pub message: Message,
    pub subject: String,
    pub message_id: String,
}

const FINGERPRINT_HEADER: HeaderName = HeaderName::new_from_ascii_str("X-Dogslow-Fingerprint");
const REPORT_ID_HEADER: HeaderName = HeaderName::new_from_ascii_str("X-Dogslow-Report-Id");
const SUPPRESSED_HEADER: HeaderName = HeaderName::new_from_ascii_str("X-Dogslow-Suppressed");

/// The mail for `due`: the subject, the text report as the body, the JSON
/// report attached, and headers that let mail rules and readers group a
/// storm (fingerprint, report id, and a thread for digests).
pub fn compose(due: &Due, config: &EmailConfig) -> Result<Composed, EmailError> {
    let report = &due.report;
    let subject = subject(report, due.suppressed.as_ref());
    let message_id = message_id(report);
    let mut builder = Message::builder()
        .from(config.from.clone())
        .subject(subject.clone())
        .message_id(Some(message_id.clone()));
    for to in &config.to {
        builder = builder.to(to.clone());
    }
    if let Some(thread) = &due.thread {
        builder = builder
            .in_reply_to(thread.clone())
            .references(thread.clone());
    }
    builder = builder
        .raw_header(HeaderValue::new(
            FINGERPRINT_HEADER,
            header_safe(&report.fingerprint, 64),
        ))
        .raw_header(HeaderValue::new(
            REPORT_ID_HEADER,
            header_safe(&report.id, 64),
        ));
    if let Some(suppressed) = &due.suppressed {
        builder = builder.raw_header(HeaderValue::new(
            SUPPRESSED_HEADER,
            suppressed.count.to_string(),
        ));
    }
    let json = serde_json::to_string_pretty(&**report).unwrap_or_else(|_| {
        // Serializing this plain struct cannot fail; keep the line form anyway.
        Report::Stall(Box::new((**report).clone())).to_json_line()
    });
    let attachment_name = format!("dogslow-{}.json", header_safe(&report.id, 64));
    let body = body(due, config, &attachment_name);
    let message = builder.multipart(
        MultiPart::mixed()
            .singlepart(SinglePart::plain(body))
            .singlepart(Attachment::new(attachment_name).body(json, json_content_type())),
    )?;
    Ok(Composed {
        message,
        subject,
        message_id,
    })
}

fn json_content_type() -> ContentType {
    ContentType::parse("application/json").unwrap_or(ContentType::TEXT_PLAIN)
}

/// `[dogslow] PROGRAM stalled in FRAME (STATE, ELAPSED): REQUEST`, or for a
/// digest `[dogslow] N more: ...`. Printable ASCII only: the request comes
/// from untrusted traffic and must not add headers (CR/LF) or hide behind
/// an encoded word.
pub fn subject(report: &StallReport, suppressed: Option<&Suppressed>) -> String {
    let program = header_safe(text::program(report), SUBJECT_PROGRAM);
    let frame = text::top_frame(report)
        .and_then(|frame| frame.function.as_deref())
        .map_or_else(
            || "an unknown function".to_owned(),
            |function| header_safe(function, SUBJECT_FRAME),
        );
    let request = header_safe(&text::request_summary(report), SUBJECT_REQUEST);
    let prefix = match suppressed {
        Some(suppressed) => format!("[dogslow] {} more: ", suppressed.count),
        None => "[dogslow] ".to_owned(),
    };
    let state = match report.state {
        "blocked" => "blocked",
        "running" => "running",
        other => {
            return format!(
                "{prefix}{program} stalled in {frame} ({}): {request}",
                header_safe(other, 16)
            );
        }
    };
    format!(
        "{prefix}{program} stalled in {frame} ({state}, {}): {request}",
        elapsed(report.elapsed_ms)
    )
}

fn elapsed(ms: u64) -> String {
    if ms < 10_000 {
        format!("{ms} ms")
    } else {
        format!("{:.1} s", ms as f64 / 1000.0)
    }
}

/// Unique per mail; the domain part is the host name when it is a valid one.
fn message_id(report: &StallReport) -> String {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_millis());
    let host_ok = !report.host.is_empty()
        && report
            .host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    let domain = if host_ok {
        report.host.as_str()
    } else {
        "dogslow.invalid"
    };
    format!(
        "<{}.{now_ms}.dogslow@{domain}>",
        header_safe(&report.id, 64).replace(['<', '>', '@'], "_")
    )
}

fn body(due: &Due, config: &EmailConfig, attachment_name: &str) -> String {
    let report = &due.report;
    let interval = humantime::format_duration(config.interval);
    let mut body = String::with_capacity(4096);
    if let Some(suppressed) = &due.suppressed {
        let _ = writeln!(
            body,
            "{} more stall(s) like this one were not mailed, between {} and {}: at most one mail per kind of stall every {interval}.",
            suppressed.count, suppressed.first, suppressed.last
        );
        let _ = writeln!(
            body,
            "They all have fingerprint {} (same program, state and top frames) and are all in dogslow's JSON output:",
            report.fingerprint
        );
        let _ = writeln!(
            body,
            "  jq 'select(.fingerprint == \"{}\")'",
            report.fingerprint
        );
        let _ = writeln!(body, "The latest of them:\n");
    }
    body.push_str(&text::render_stall(report));
    let _ = writeln!(body, "\n-- ");
    let _ = writeln!(
        body,
        "dogslow on {}. The report's JSON is attached ({attachment_name}).",
        text::printable(&report.host)
    );
    if due.suppressed.is_none() {
        let _ = writeln!(
            body,
            "More stalls like this one in the next {interval} will be summarized in one mail."
        );
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> EmailConfig {
        EmailConfig {
            to: vec![
                "ops@example.com".parse().unwrap(),
                "Dev <dev@example.com>".parse().unwrap(),
            ],
            from: "dogslow@example.com".parse().unwrap(),
            server: SmtpServer::parse("smtp://127.0.0.1:2525").unwrap(),
            interval: DEFAULT_INTERVAL,
            max_per_hour: DEFAULT_MAX_PER_HOUR,
            retry: RetryPolicy::default(),
        }
    }

    fn hostile() -> StallReport {
        let mut report = StallReport::example();
        let mut request = serde_json::Map::new();
        request.insert(
            "line".into(),
            "GET /x\r\nBcc: x@evil\r\n\r\nbody? caf\u{e9}".into(),
        );
        report.request = Some(request);
        report
    }

    fn headers(message: &Message) -> String {
        let formatted = String::from_utf8(message.formatted()).unwrap();
        formatted.split("\r\n\r\n").next().unwrap().to_owned()
    }

    #[test]
    fn subject_names_program_frame_and_request() {
        let report = StallReport::example();
        assert_eq!(
            subject(&report, None),
            "[dogslow] slow_requests stalled in spin_for (running, 312 ms): handle_request"
        );
        let digest = Suppressed {
            count: 49,
            first: "a".into(),
            last: "b".into(),
        };
        assert!(subject(&report, Some(&digest)).starts_with("[dogslow] 49 more: slow_requests"));
    }

    #[test]
    fn request_text_cannot_inject_headers() {
        let subject = subject(&hostile(), None);
        assert_eq!(
            subject,
            "[dogslow] slow_requests stalled in spin_for (running, 312 ms): line=GET /x\\r\\nBcc: x@evil\\r\\n\\r\\nbody? caf\\u{e9}"
        );
        let due = Due {
            report: Arc::new(hostile()),
            suppressed: None,
            thread: None,
        };
        let composed = compose(&due, &config()).unwrap();
        let headers = headers(&composed.message);
        assert!(
            !headers
                .lines()
                .any(|line| line.to_ascii_lowercase().starts_with("bcc")),
            "{headers}"
        );
        assert!(headers.is_ascii());
        assert!(
            headers.contains("Bcc: x@evil"),
            "shown, escaped, in the subject: {headers}"
        );
    }

    #[test]
    fn mail_has_body_attachment_and_grouping_headers() {
        let due = Due {
            report: Arc::new(StallReport::example()),
            suppressed: Some(Suppressed {
                count: 49,
                first: "2026-05-16T02:10:12.345Z".into(),
                last: "2026-05-16T02:11:00.000Z".into(),
            }),
            thread: Some("<first@web-1>".into()),
        };
        let composed = compose(&due, &config()).unwrap();
        let formatted = String::from_utf8(composed.message.formatted()).unwrap();
        let headers = headers(&composed.message);
        for want in [
            "From: dogslow@example.com",
            "To: ops@example.com, Dev <dev@example.com>",
            "X-Dogslow-Fingerprint: 00c0ffee00c0ffee",
            "X-Dogslow-Report-Id: 1a2b3c4d5e6f7081",
            "X-Dogslow-Suppressed: 49",
            "In-Reply-To: <first@web-1>",
            "References: <first@web-1>",
            "Subject: [dogslow] 49 more: slow_requests stalled in spin_for",
        ] {
            assert!(headers.contains(want), "missing {want:?} in:\n{headers}");
        }
        assert!(formatted.contains("49 more stall(s) like this one were not mailed"));
        assert!(formatted.contains("Undead request intercepted at"));
        assert!(formatted.contains("filename=\"dogslow-1a2b3c4d5e6f7081.json\""));
        assert!(formatted.contains("application/json"));
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let retry = RetryPolicy::default();
        let waits: Vec<u64> = (0..9).map(|n| backoff(&retry, n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(backoff(&retry, u32::MAX).as_secs(), 60);
    }
}
