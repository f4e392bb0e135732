//! The command line. Everything here turns into a plain `AgentConfig`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{ArgGroup, Args, Parser, Subcommand, ValueEnum};
use thiserror::Error;

use crate::{
    config::{
        AgentConfig, DEFAULT_MAX_INFLIGHT, DEFAULT_SAMPLE_HZ, OutputError, OutputSettings,
        ReportFormat, TargetSpec, parse_positive_duration, parse_timeout,
    },
    config_file::{self, ConfigFileError},
    metrics,
    probe_list::{ListConfig, ProbeSource},
    probe_spec::ProbeSpec,
    request_args::{CaptureRequest, DEFAULT_CAPTURE_LEN},
    sinks::smtp::PASSWORD_ENV,
};

#[derive(Debug, Parser)]
#[command(
    name = "dogslow",
    version,
    about = "Report requests that run past their deadline, with the stack of the thread stuck in them",
    long_about = "dogslow watches request boundaries in running processes with uprobes and, when a \
                  request runs past its deadline, captures where its thread is (running or blocked), \
                  symbolizes the stack and prints a JSON report on stdout."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per run: the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Watch processes for requests that run past a deadline.
    Attach(AttachArgs),
    /// Watch the targets of a config file (TOML; SIGHUP reloads it).
    Run(RunArgs),
    /// List the USDT probes a binary or process offers and, with --filter,
    /// its functions: what --entry and --exit can name.
    Probes(ProbesArgs),
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("source").required(true).args(["pid", "binary"])))]
pub struct ProbesArgs {
    /// A running process: its executable and the libraries it maps.
    #[arg(long, value_name = "PID")]
    pub pid: Option<u32>,

    /// A binary or library on disk (no root needed).
    #[arg(long, value_name = "PATH")]
    pub binary: Option<PathBuf>,

    /// Only probes and functions whose name contains TEXT (case-insensitive);
    /// functions are listed only with a filter.
    #[arg(long, value_name = "TEXT")]
    pub filter: Option<String>,

    /// One JSON object per probe or function instead of a table.
    #[arg(long)]
    pub json: bool,
}

impl ProbesArgs {
    pub fn into_config(self) -> ListConfig {
        let source = match (self.pid, self.binary) {
            (Some(pid), _) => ProbeSource::Pid(pid),
            (None, Some(path)) => ProbeSource::Binary(path),
            // clap's group makes one of them required.
            (None, None) => ProbeSource::Pid(0),
        };
        ListConfig {
            source,
            filter: self.filter.filter(|text| !text.is_empty()),
            json: self.json,
        }
    }
}

#[derive(Debug, Args)]
pub struct AttachArgs {
    /// Process to watch (repeatable).
    #[arg(long = "pid", value_name = "PID", required_unless_present = "binaries")]
    pub pids: Vec<u32>,

    /// Watch every process that runs this executable or maps this library,
    /// now and later, in any mount namespace (the path as the process sees
    /// it, e.g. inside its container). Repeatable; combines with --pid.
    #[arg(long = "binary", value_name = "PATH")]
    pub binaries: Vec<PathBuf>,

    /// Where a request starts: FUNCTION, LIBRARY:FUNCTION (e.g. libc.so.6:recv),
    /// FUNCTION+OFFSET, 0xFILE_OFFSET or usdt:PROVIDER:NAME.
    #[arg(long, value_name = "PROBE", value_parser = parse_probe)]
    pub entry: ProbeSpec,

    /// Where a request ends (the same thread entering it). Without it a
    /// request is one call of the entry function, ending when it returns.
    #[arg(long, value_name = "PROBE", value_parser = parse_probe)]
    pub exit: Option<ProbeSpec>,

    /// Record an argument at request entry and show it in reports as
    /// "request": {NAME: value}. argN is the function's N-th integer argument
    /// (x86-64 SysV) or the USDT probe's N-th argument; TYPE is str, u64,
    /// i64 or hex. Repeatable (up to 4).
    #[arg(long = "capture", value_name = "[NAME=]argN:TYPE", value_parser = parse_capture)]
    pub captures: Vec<CaptureRequest>,

    /// Bytes kept of each `str` capture (longer strings are cut and marked).
    #[arg(long, value_name = "BYTES", default_value_t = DEFAULT_CAPTURE_LEN,
          value_parser = clap::value_parser!(u32).range(1..=dogslow_common::MAX_CAPTURE_STR as i64))]
    pub capture_len: u32,

    /// Deadline after which a running request is reported (e.g. 250ms, 2s, 1m).
    #[arg(long, value_name = "DURATION", default_value = "25s", value_parser = parse_timeout)]
    pub timeout: Duration,

    /// Rate of the cpu-clock sampler that catches threads stalled on a CPU.
    #[arg(long, value_name = "HZ", default_value_t = DEFAULT_SAMPLE_HZ,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub sample_hz: u64,

    /// Stop after this long (SIGINT and SIGTERM also stop cleanly).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,

    /// Most threads tracked at once (each thread in or between requests
    /// keeps one entry until it exits); requests of more are counted as dropped.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_MAX_INFLIGHT,
          value_parser = clap::value_parser!(u32).range(16..=1_048_576))]
    pub max_inflight: u32,

    /// Bytes of user stack copied at a stall for DWARF unwinding (4096..=65536).
    #[arg(long, value_name = "BYTES", default_value_t = dogslow_common::DEFAULT_USER_STACK_COPY,
          value_parser = clap::value_parser!(u32).range(4096..=dogslow_common::MAX_USER_STACK_COPY as i64))]
    pub user_stack_bytes: u32,

    /// Serve Prometheus metrics on /metrics and a health check on /healthz:
    /// PORT (loopback only), HOST:PORT or [IPV6]:PORT. Off by default.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<SocketAddr>,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// The TOML file with the agent settings, outputs and targets (keys are
    /// the attach flags with `_` for `-`; see the README).
    #[arg(long, value_name = "FILE")]
    pub config: PathBuf,

    /// Serve metrics here instead of the file's `metrics_addr`.
    #[arg(long, value_name = "ADDR", value_parser = parse_metrics_addr)]
    pub metrics_addr: Option<SocketAddr>,

    /// Stop after this long (SIGINT and SIGTERM also stop cleanly).
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub duration: Option<Duration>,
}

impl RunArgs {
    /// The file's configuration with the command line's overrides.
    pub fn into_config(self) -> Result<(AgentConfig, PathBuf), CliError> {
        let mut config = config_file::load(&self.config, std::env::var(PASSWORD_ENV).ok())?;
        if self.metrics_addr.is_some() {
            config.metrics_addr = self.metrics_addr;
        }
        config.duration = self.duration;
        Ok((config, self.config))
    }
}

fn parse_metrics_addr(text: &str) -> Result<SocketAddr, String> {
    metrics::parse_addr(text).map_err(|err| err.to_string())
}

#[derive(Debug, Error)]
pub enum CliError {
    #[error("give at least one --pid or --binary")]
    NoTarget,
    #[error(transparent)]
    Output(#[from] OutputError),
    #[error(transparent)]
    ConfigFile(#[from] ConfigFileError),
}

fn parse_capture(text: &str) -> Result<CaptureRequest, String> {
    text.parse()
        .map_err(|err: crate::request_args::CaptureError| err.to_string())
}

fn parse_probe(text: &str) -> Result<ProbeSpec, String> {
    text.parse()
        .map_err(|err: crate::probe_spec::ProbeSpecError| err.to_string())
}

impl AttachArgs {
    pub fn into_config(self) -> Result<AgentConfig, CliError> {
        if self.pids.is_empty() && self.binaries.is_empty() {
            return Err(CliError::NoTarget);
        }
        Ok(AgentConfig {
            targets: vec![TargetSpec {
                name: self.entry.text.clone(),
                pids: self.pids,
                binaries: self.binaries,
                entry: self.entry,
                exit: self.exit,
                timeout: self.timeout,
                captures: self.captures,
                capture_len: self.capture_len,
                output: None,
            }],
            sample_hz: self.sample_hz,
            duration: self.duration,
            max_inflight: self.max_inflight,
            user_stack_bytes: self.user_stack_bytes,
            scan_interval: Duration::from_millis(10),
            metrics_addr: self.metrics_addr,
            output: self
                .output
                .into_settings()
                .into_config(std::env::var(PASSWORD_ENV).ok())?,
        })
    }
}

/// Report format on stdout.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum FormatArg {
    /// One JSON object per line.
    Json,
    /// The human report ("Undead request intercepted at: ...").
    Text,
}

/// Where reports go: stdout's format, files, email.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Report format on stdout.
    #[arg(long, value_enum, default_value = "json")]
    pub format: FormatArg,

    /// Also write each report to its own files in DIR (text and JSON, mode 0600).
    #[arg(long, value_name = "DIR")]
    pub output_dir: Option<PathBuf>,

    /// Mail stall reports to ADDR (repeatable); needs --smtp.
    #[arg(long = "email-to", value_name = "ADDR")]
    pub email_to: Vec<String>,

    /// Sender address of the mails (default dogslow@HOSTNAME).
    #[arg(long, value_name = "ADDR")]
    pub email_from: Option<String>,

    /// Mail server: smtp://HOST[:PORT] (plain), smtp://HOST[:PORT]?tls=required
    /// (STARTTLS), smtps://HOST[:PORT] (TLS); USER@HOST to authenticate, with
    /// the password in $DOGSLOW_SMTP_PASSWORD or --smtp-password-file.
    #[arg(long, value_name = "URL")]
    pub smtp: Option<String>,

    /// File whose first line is the SMTP password.
    #[arg(long, value_name = "PATH")]
    pub smtp_password_file: Option<PathBuf>,

    /// Also trust the CA certificate(s) in this PEM file for the SMTP server.
    #[arg(long, value_name = "PEM")]
    pub smtp_ca_file: Option<PathBuf>,

    /// At most one mail per kind of stall (fingerprint) per interval; the
    /// next says how many were suppressed.
    #[arg(long, value_name = "DURATION", value_parser = parse_positive_duration)]
    pub email_interval: Option<Duration>,

    /// At most this many mails per hour in all.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub email_max_per_hour: Option<u32>,
}

impl OutputArgs {
    /// The plain settings these flags stand for.
    pub fn into_settings(self) -> OutputSettings {
        OutputSettings {
            format: Some(match self.format {
                FormatArg::Json => ReportFormat::Json,
                FormatArg::Text => ReportFormat::Text,
            }),
            output_dir: self.output_dir,
            email_to: self.email_to,
            email_from: self.email_from,
            smtp: self.smtp,
            smtp_password_file: self.smtp_password_file,
            smtp_ca_file: self.smtp_ca_file,
            email_interval: self.email_interval,
            email_max_per_hour: self.email_max_per_hour,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{OutputConfig, parse_duration};

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5"), Ok(Duration::from_millis(1500)));
        // Absurd lengths are refused, not wrapped or panicked on.
        for huge in ["1e20", "1e300", "20y", "9999999999999999999s"] {
            let err = parse_duration(huge).unwrap_err();
            assert!(
                err.contains("too long") || err.contains("not a duration"),
                "{huge}: {err}"
            );
        }
        assert!(parse_duration("3650days").is_ok());
        assert!(parse_timeout("1e20").unwrap_err().contains("too long"));
        assert!(
            parse_duration("soon")
                .unwrap_err()
                .contains("not a duration")
        );
    }

    #[test]
    fn timeouts_must_be_positive() {
        assert!(parse_timeout("0s").unwrap_err().contains("zero"));
        assert!(parse_timeout("0").unwrap_err().contains("zero"));
        assert!(parse_timeout("abc").is_err());
        assert_eq!(parse_timeout("300ms"), Ok(Duration::from_millis(300)));
    }

    #[test]
    fn attach_defaults() {
        let cli = Cli::try_parse_from(["dogslow", "attach", "--pid", "1", "--entry", "f"]).unwrap();
        let Command::Attach(args) = cli.command else {
            panic!("not attach: {cli:?}");
        };
        let config = args.into_config().unwrap();
        assert_eq!(config.targets[0].timeout, Duration::from_secs(25));
        assert_eq!(config.sample_hz, 99);
        assert_eq!(config.targets[0].exit, None);
        assert_eq!(config.targets[0].pids, vec![1]);
    }

    fn output(args: &[&str], password_env: Option<&str>) -> Result<OutputConfig, OutputError> {
        let mut argv = vec!["dogslow", "attach", "--pid", "1", "--entry", "f"];
        argv.extend_from_slice(args);
        let Command::Attach(args) = Cli::try_parse_from(argv).unwrap().command else {
            unreachable!("parsed an attach command");
        };
        args.output
            .into_settings()
            .into_config(password_env.map(str::to_owned))
    }

    #[test]
    fn output_defaults_to_json_on_stdout_only() {
        assert_eq!(output(&[], None).unwrap(), OutputConfig::default());
        let text = output(&["--format", "text", "--output-dir", "/tmp/r"], None).unwrap();
        assert_eq!(text.format, ReportFormat::Text);
        assert_eq!(text.dir, Some(PathBuf::from("/tmp/r")));
        assert!(
            Cli::try_parse_from([
                "dogslow", "attach", "--pid", "1", "--entry", "f", "--format", "xml"
            ])
            .is_err()
        );
    }

    #[test]
    fn email_options() {
        let config = output(
            &[
                "--email-to",
                "ops@example.com",
                "--email-to",
                "Dev <dev@example.com>",
                "--email-from",
                "dogslow@web-1.example.com",
                "--smtp",
                "smtp://127.0.0.1:2525",
                "--email-interval",
                "30s",
                "--email-max-per-hour",
                "5",
            ],
            None,
        )
        .unwrap();
        let email = config.email.unwrap();
        assert_eq!(email.to.len(), 2);
        assert_eq!(email.to[1].email.to_string(), "dev@example.com");
        assert_eq!(email.from.email.to_string(), "dogslow@web-1.example.com");
        assert_eq!(email.server.port, 2525);
        assert_eq!(email.interval, Duration::from_secs(30));
        assert_eq!(email.max_per_hour, 5);
        let defaults = output(&["--email-to", "a@b.c", "--smtp", "smtp://localhost"], None)
            .unwrap()
            .email
            .unwrap();
        assert_eq!(defaults.interval, Duration::from_secs(600));
        assert_eq!(defaults.from.email.user(), "dogslow");
    }

    #[test]
    fn bad_email_options_say_what_to_do() {
        let err = |args: &[&str], env: Option<&str>| output(args, env).unwrap_err().to_string();
        assert!(err(&["--email-to", "a@b.c"], None).contains("needs --smtp"));
        assert!(err(&["--smtp", "smtp://h"], None).contains("--smtp is only used for email"));
        assert!(
            err(&["--email-from", "a@b.c"], None).contains("--email-from is only used for email")
        );
        assert!(
            err(
                &["--email-to", "not an address", "--smtp", "smtp://h"],
                None
            )
            .contains("not a mail address")
        );
        assert!(
            err(&["--email-to", "a@b.c", "--smtp", "mail.example.com"], None)
                .contains("write e.g.")
        );
        assert!(
            err(
                &["--email-to", "a@b.c", "--smtp", "smtp://u@127.0.0.1"],
                None
            )
            .contains("DOGSLOW_SMTP_PASSWORD")
        );
        assert!(
            err(
                &[
                    "--email-to",
                    "a@b.c",
                    "--smtp",
                    "smtp://u@127.0.0.1",
                    "--smtp-password-file",
                    "/nonexistent/pw"
                ],
                None
            )
            .contains("/nonexistent/pw")
        );
        assert!(
            output(
                &["--email-to", "a@b.c", "--smtp", "smtp://u@127.0.0.1"],
                Some("pw")
            )
            .is_ok()
        );
        assert!(
            Cli::try_parse_from([
                "dogslow",
                "attach",
                "--pid",
                "1",
                "--entry",
                "f",
                "--email-interval",
                "0s"
            ])
            .is_err()
        );
        // There is no flag for the password itself.
        assert!(
            Cli::try_parse_from([
                "dogslow",
                "attach",
                "--pid",
                "1",
                "--entry",
                "f",
                "--smtp-password",
                "x"
            ])
            .is_err()
        );
    }

    #[test]
    fn probes_needs_exactly_one_source() {
        let cli =
            Cli::try_parse_from(["dogslow", "probes", "--binary", "/bin/x", "--json"]).unwrap();
        let Command::Probes(args) = cli.command else {
            panic!("not probes: {cli:?}");
        };
        let config = args.into_config();
        assert_eq!(config.source, ProbeSource::Binary("/bin/x".into()));
        assert!(config.json);
        assert_eq!(config.filter, None);
        let cli =
            Cli::try_parse_from(["dogslow", "probes", "--pid", "7", "--filter", "recv"]).unwrap();
        let Command::Probes(args) = cli.command else {
            panic!("not probes: {cli:?}");
        };
        let config = args.into_config();
        assert_eq!(config.source, ProbeSource::Pid(7));
        assert_eq!(config.filter.as_deref(), Some("recv"));
        assert!(Cli::try_parse_from(["dogslow", "probes"]).is_err());
        assert!(
            Cli::try_parse_from(["dogslow", "probes", "--pid", "1", "--binary", "/bin/x"]).is_err()
        );
    }

    #[test]
    fn attach_needs_a_target_and_an_entry() {
        assert!(Cli::try_parse_from(["dogslow", "attach", "--entry", "f"]).is_err());
        assert!(Cli::try_parse_from(["dogslow", "attach", "--pid", "1"]).is_err());
        assert!(Cli::try_parse_from(["dogslow", "attach", "--pid", "x", "--entry", "f"]).is_err());
    }
}
