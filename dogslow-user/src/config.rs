//! The plain configuration the agent runs from, whatever produced it (the
//! command line today). No clap types here.
use std::{path::PathBuf, time::Duration};

use serde::Deserialize;
use thiserror::Error;

use crate::{
    probe_spec::ProbeSpec,
    request_args::CaptureRequest,
    sinks::{
        email::{DEFAULT_MAX_PER_HOUR, EmailConfig, RetryPolicy},
        smtp::{SmtpError, SmtpServer},
    },
};

/// The original Dogslow's deadline.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(25);
pub const DEFAULT_SAMPLE_HZ: u64 = 99;
pub const DEFAULT_MAX_INFLIGHT: u32 = 16384;

/// One set of request probes and the processes they apply to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TargetSpec {
    /// A name for reports and metrics (defaults to the entry probe).
    pub name: String,
    pub pids: Vec<u32>,
    pub binaries: Vec<PathBuf>,
    pub entry: ProbeSpec,
    /// `None`: a request is one call of `entry`, ending when it returns.
    pub exit: Option<ProbeSpec>,
    pub timeout: Duration,
    /// Arguments recorded at entry and shown in reports as `request`.
    pub captures: Vec<CaptureRequest>,
    /// Bytes kept of each string capture.
    pub capture_len: u32,
    /// This target's own files and mail, instead of the agent's.
    pub output: Option<OutputConfig>,
}

/// Everything `dogslow attach` needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentConfig {
    pub targets: Vec<TargetSpec>,
    pub sample_hz: u64,
    /// Stop after this long; `None` runs until SIGINT/SIGTERM.
    pub duration: Option<Duration>,
    pub max_inflight: u32,
    pub user_stack_bytes: u32,
    /// How often the deadline scan looks for overdue off-CPU requests.
    pub scan_interval: Duration,
    /// Where reports go besides stdout, and stdout's format.
    pub output: OutputConfig,
    /// Serve Prometheus metrics and /healthz here.
    pub metrics_addr: Option<std::net::SocketAddr>,
}

/// The form of the reports on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReportFormat {
    /// One JSON object per line (the stable interface).
    #[default]
    Json,
    /// The human report, as mailed.
    Text,
}

/// Report destinations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OutputConfig {
    pub format: ReportFormat,
    /// Also write each report to its own files here.
    pub dir: Option<PathBuf>,
    /// Also mail stall reports (storm-controlled).
    pub email: Option<EmailConfig>,
}

/// Report destinations as the user writes them: the `attach` flags and the
/// config file's `[output]` keys (the flag names with `_` for `-`) are both
/// read into this, so both are checked the same way.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSettings {
    pub format: Option<ReportFormat>,
    pub output_dir: Option<PathBuf>,
    #[serde(default)]
    pub email_to: Vec<String>,
    pub email_from: Option<String>,
    pub smtp: Option<String>,
    pub smtp_password_file: Option<PathBuf>,
    pub smtp_ca_file: Option<PathBuf>,
    #[serde(default, deserialize_with = "optional_positive_duration")]
    pub email_interval: Option<Duration>,
    pub email_max_per_hour: Option<u32>,
}

#[derive(Debug, Error)]
pub enum OutputError {
    #[error(
        "--email-to needs --smtp URL, the mail server to send through (e.g. smtp://localhost:25)"
    )]
    EmailWithoutServer,
    #[error("--{0} is only used for email: add --email-to ADDR and --smtp URL")]
    EmailOptionWithoutEmail(&'static str),
    #[error(
        "--{flag} `{address}` is not a mail address ({reason}); write e.g. ops@example.com or \"Ops <ops@example.com>\""
    )]
    BadAddress {
        flag: &'static str,
        address: String,
        reason: String,
    },
    #[error(transparent)]
    Smtp(#[from] SmtpError),
}

impl OutputSettings {
    /// `password_env`: the value of $DOGSLOW_SMTP_PASSWORD, if set.
    pub fn into_config(self, password_env: Option<String>) -> Result<OutputConfig, OutputError> {
        let format = self.format.unwrap_or_default();
        let email = match (self.email_to.is_empty(), &self.smtp) {
            (true, None) => {
                let email_only = [
                    ("email-from", self.email_from.is_some()),
                    ("smtp-password-file", self.smtp_password_file.is_some()),
                    ("smtp-ca-file", self.smtp_ca_file.is_some()),
                    ("email-interval", self.email_interval.is_some()),
                    ("email-max-per-hour", self.email_max_per_hour.is_some()),
                ];
                if let Some((flag, _)) = email_only.iter().find(|(_, given)| *given) {
                    return Err(OutputError::EmailOptionWithoutEmail(flag));
                }
                None
            }
            (true, Some(_)) => return Err(OutputError::EmailOptionWithoutEmail("smtp")),
            (false, None) => return Err(OutputError::EmailWithoutServer),
            (false, Some(url)) => {
                let server = SmtpServer::parse(url)?
                    .with_password(password_env, self.smtp_password_file.as_deref())?
                    .with_ca_file(self.smtp_ca_file.as_deref())?;
                let to = self
                    .email_to
                    .iter()
                    .map(|address| parse_mailbox("email-to", address))
                    .collect::<Result<Vec<_>, _>>()?;
                let from = match &self.email_from {
                    Some(address) => parse_mailbox("email-from", address)?,
                    None => default_sender(),
                };
                Some(EmailConfig {
                    to,
                    from,
                    server,
                    interval: self
                        .email_interval
                        .unwrap_or(crate::sinks::email::DEFAULT_INTERVAL),
                    max_per_hour: self.email_max_per_hour.unwrap_or(DEFAULT_MAX_PER_HOUR),
                    retry: RetryPolicy::default(),
                })
            }
        };
        Ok(OutputConfig {
            format,
            dir: self.output_dir,
            email,
        })
    }
}

fn parse_mailbox(
    flag: &'static str,
    address: &str,
) -> Result<lettre::message::Mailbox, OutputError> {
    address.parse().map_err(
        |err: lettre::address::AddressError| OutputError::BadAddress {
            flag,
            address: address.to_owned(),
            reason: err.to_string(),
        },
    )
}

/// `dogslow@HOSTNAME`, or `dogslow@localhost` when the host name is not a
/// valid mail domain.
fn default_sender() -> lettre::message::Mailbox {
    let host = crate::procfs::host_name();
    format!("dogslow@{host}").parse().unwrap_or_else(|_| {
        lettre::message::Mailbox::new(None, lettre::Address::new_dangerous("dogslow", "localhost"))
    })
}

/// The longest duration accepted anywhere: longer ones are typos, and
/// deadlines and timers must not overflow.
const MAX_DURATION: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// A human duration (`250ms`, `2s`, `1m`, `1h30m`); bare numbers are seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let duration = match text.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() && seconds >= 0.0 => {
            Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
        }
        _ => humantime::parse_duration(text).map_err(|err| {
            format!("`{text}` is not a duration ({err}); write e.g. 250ms, 2s, 1m or 1h30m")
        })?,
    };
    if duration > MAX_DURATION {
        return Err(format!("`{text}` is too long: at most 10 years (3650days)"));
    }
    Ok(duration)
}

pub fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if duration.is_zero() {
        return Err("must be greater than zero".into());
    }
    Ok(duration)
}

pub fn parse_timeout(text: &str) -> Result<Duration, String> {
    let timeout = parse_duration(text)?;
    if timeout.is_zero() {
        return Err(
            "a zero timeout would report every request; give a deadline such as 500ms or 25s"
                .into(),
        );
    }
    if timeout < Duration::from_millis(1) {
        return Err("the timeout must be at least 1ms".into());
    }
    Ok(timeout)
}

fn optional_positive_duration<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Duration>, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_positive_duration(&text)
        .map(Some)
        .map_err(serde::de::Error::custom)
}
