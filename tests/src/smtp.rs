//! A real SMTP server for the mail tests: `tests/smtp/smtp_sink.py`, an
//! aiosmtpd server (Debian's python3-aiosmtpd, run by Debian's python) on
//! loopback that stores every message it accepts, as received and as a
//! mail reader parses it.
use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;

use crate::Lines;

/// Debian's python, which has aiosmtpd (a `python3` earlier on PATH may not).
pub const PYTHON: &str = "/usr/bin/python3";

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("smtp/smtp_sink.py")
}

/// A loopback port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("bind a loopback port")
}

/// A running aiosmtpd process and where it stores messages.
pub struct SmtpServer {
    child: Child,
    pub port: u16,
    maildir: PathBuf,
}

impl SmtpServer {
    /// Starts a server on `port` storing into `maildir` (kept across a
    /// restart, so that a test can stop and start "the same" server).
    /// `extra`: `--auth USER:PASSWORD`, `--tls-cert PEM --tls-key PEM`, `--implicit-tls`.
    pub fn start_on(port: u16, maildir: &Path, extra: &[&str]) -> Self {
        std::fs::create_dir_all(maildir).expect("create the maildir");
        let mut child = Command::new(PYTHON)
            .arg(script())
            .args(["--port", &port.to_string(), "--maildir"])
            .arg(maildir)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|err| {
                panic!("cannot start {PYTHON} (cargo xtask setup installs python3-aiosmtpd): {err}")
            });
        let stdout = Lines::collect(child.stdout.take().expect("piped stdout"));
        let ready = stdout.wait_for(Duration::from_secs(20), |line| line.starts_with("ready "));
        let Some(line) = ready else {
            let _ = child.kill();
            panic!(
                "the SMTP test server did not start; is python3-aiosmtpd installed? (cargo xtask setup)"
            );
        };
        let port = line["ready ".len()..].trim().parse().expect("ready PORT");
        Self {
            child,
            port,
            maildir: maildir.to_owned(),
        }
    }

    /// The `--smtp` URL of this plain-SMTP server.
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    /// Every message accepted so far, in order.
    pub fn mails(&self) -> Vec<Mail> {
        mails_in(&self.maildir)
    }

    /// Waits until at least `count` messages arrived; returns them all.
    pub fn wait_for_mails(&self, count: usize, timeout: Duration) -> Vec<Mail> {
        wait_for_mails(&self.maildir, count, timeout)
    }

    /// Stops the server (the port is then closed: "the server is down").
    pub fn stop(mut self) {
        self.kill();
    }

    fn kill(&mut self) {
        // SAFETY: signalling our own child; SIGTERM lets it close its socket.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The messages stored in `maildir`, in arrival order.
pub fn mails_in(maildir: &Path) -> Vec<Mail> {
    let mut names: Vec<PathBuf> = std::fs::read_dir(maildir)
        .map(|dir| {
            dir.filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).expect("read a stored message");
            Mail(serde_json::from_str(&text).expect("stored message JSON"))
        })
        .collect()
}

pub fn wait_for_mails(maildir: &Path, count: usize, timeout: Duration) -> Vec<Mail> {
    let until = Instant::now() + timeout;
    loop {
        let mails = mails_in(maildir);
        if mails.len() >= count || Instant::now() >= until {
            return mails;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// One delivered message.
#[derive(Clone, Debug)]
pub struct Mail(pub Value);

impl Mail {
    pub fn rcpt_tos(&self) -> Vec<String> {
        strings(&self.0["rcpt_tos"])
    }

    pub fn subject(&self) -> &str {
        self.0["subject"].as_str().unwrap_or("")
    }

    /// The decoded text/plain body.
    pub fn text(&self) -> &str {
        self.0["text"].as_str().unwrap_or("")
    }

    /// The header block exactly as received.
    pub fn raw_headers(&self) -> &str {
        self.0["raw_headers"].as_str().unwrap_or("")
    }

    /// Values of the header `name` (case-insensitive), as parsed.
    pub fn header(&self, name: &str) -> Vec<String> {
        self.0["headers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|pair| {
                pair[0]
                    .as_str()
                    .is_some_and(|n| n.eq_ignore_ascii_case(name))
            })
            .filter_map(|pair| pair[1].as_str().map(str::to_owned))
            .collect()
    }

    /// Unix time the server accepted it.
    pub fn received(&self) -> f64 {
        self.0["received"].as_f64().unwrap_or(0.0)
    }

    /// The attached JSON report.
    pub fn json_attachment(&self) -> Value {
        let attachment = self.0["attachments"]
            .as_array()
            .and_then(|all| all.iter().find(|a| a["content_type"] == "application/json"))
            .unwrap_or_else(|| panic!("no JSON attachment in {}", self.0));
        serde_json::from_str(attachment["content"].as_str().unwrap_or(""))
            .unwrap_or_else(|err| panic!("attachment is not JSON ({err}): {attachment}"))
    }
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v.as_str().map(str::to_owned))
        .collect()
}

/// A throwaway CA and a certificate for 127.0.0.1 signed by it, made with
/// the openssl command: `(ca.pem, cert.pem, key.pem)` in `dir`.
pub fn make_certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let run = |args: &[&str]| {
        let status = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed for the TLS mail tests (cargo xtask setup installs it)");
        assert!(status.success(), "openssl {args:?} failed");
    };
    run(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=dogslow test CA",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
    ]);
    run(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-keyout",
        "key.pem",
        "-out",
        "cert.csr",
    ]);
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .expect("write ext.cnf");
    run(&[
        "x509",
        "-req",
        "-in",
        "cert.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "ext.cnf",
        "-out",
        "cert.pem",
    ]);
    (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    )
}
