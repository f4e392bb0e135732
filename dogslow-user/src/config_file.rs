//! `dogslow run --config FILE`: several targets, each with its probes,
//! captures, timeout and report destinations, in TOML. The keys are the
//! `attach` flag names with `_` for `-`, and every value goes through the
//! same parser as its flag, so the file and the command line cannot drift.
//!
//! ```toml
//! [agent]
//! sample_hz = 99
//! metrics_addr = "127.0.0.1:9464"
//!
//! [output]                      # every target's, unless it has its own
//! format = "json"
//! output_dir = "/var/log/dogslow"
//!
//! [[target]]
//! name = "web"
//! binary = ["/usr/local/bin/app"]
//! entry = "handle_request"
//! timeout = "25s"
//! capture = ["path=arg0:str"]
//! [target.output]               # this target's files and mail
//! email_to = ["web-team@example.com"]
//! smtp = "smtp://mail.example.com:25"
//! ```
use std::{
    collections::HashSet,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Deserializer};
use thiserror::Error;
use toml::Spanned;

use crate::{
    config::{
        AgentConfig, DEFAULT_MAX_INFLIGHT, DEFAULT_SAMPLE_HZ, DEFAULT_TIMEOUT, OutputError,
        OutputSettings, TargetSpec, parse_timeout,
    },
    metrics,
    probe_spec::ProbeSpec,
    request_args::{CaptureRequest, DEFAULT_CAPTURE_LEN},
    sinks::smtp::SmtpServer,
};

#[derive(Debug, Error)]
pub enum ConfigFileError {
    #[error("cannot read the config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The TOML parser's message already names the line and column and
    /// shows the offending text.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}:{line}: {message}")]
    Invalid {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{path}: {context}: {source}")]
    Output {
        path: PathBuf,
        context: String,
        #[source]
        source: OutputError,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    #[serde(default)]
    agent: AgentSection,
    #[serde(default)]
    output: OutputSettings,
    #[serde(default)]
    target: Vec<Spanned<TargetSection>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentSection {
    #[serde(default, deserialize_with = "sample_hz")]
    sample_hz: Option<u64>,
    #[serde(default, deserialize_with = "max_inflight")]
    max_inflight: Option<u32>,
    #[serde(default, deserialize_with = "user_stack_bytes")]
    user_stack_bytes: Option<u32>,
    #[serde(default, deserialize_with = "metrics_addr")]
    metrics_addr: Option<SocketAddr>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TargetSection {
    name: Option<String>,
    #[serde(default)]
    pid: Vec<u32>,
    #[serde(default)]
    binary: Vec<PathBuf>,
    #[serde(deserialize_with = "probe")]
    entry: ProbeSpec,
    #[serde(default, deserialize_with = "optional_probe")]
    exit: Option<ProbeSpec>,
    #[serde(default, deserialize_with = "timeout")]
    timeout: Option<Duration>,
    #[serde(default, deserialize_with = "captures")]
    capture: Vec<CaptureRequest>,
    #[serde(default, deserialize_with = "capture_len")]
    capture_len: Option<u32>,
    output: Option<OutputSettings>,
}

/// `$DOGSLOW_SMTP_PASSWORD` for the outputs that need a password from it:
/// those whose server URL names a user and that have no password file. A
/// file may mix relays with and without authentication.
fn password_for(settings: &OutputSettings, password_env: &Option<String>) -> Option<String> {
    let has_user = settings
        .smtp
        .as_deref()
        .and_then(|url| SmtpServer::parse(url).ok())
        .is_some_and(|server| server.user.is_some());
    (has_user && settings.smtp_password_file.is_none())
        .then(|| password_env.clone())
        .flatten()
}

/// Reads and checks `path`. `password_env` is `$DOGSLOW_SMTP_PASSWORD`.
pub fn load(path: &Path, password_env: Option<String>) -> Result<AgentConfig, ConfigFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text, password_env)
}

/// Parses a config file's text (`path` only names it in messages).
pub fn parse(
    path: &Path,
    text: &str,
    password_env: Option<String>,
) -> Result<AgentConfig, ConfigFileError> {
    let file: FileConfig = toml::from_str(text).map_err(|err| ConfigFileError::Parse {
        path: path.to_owned(),
        message: err.to_string().trim_end().to_owned(),
    })?;
    let invalid = |offset: usize, message: String| ConfigFileError::Invalid {
        path: path.to_owned(),
        line: text[..offset.min(text.len())].matches('\n').count() + 1,
        message,
    };
    if file.target.is_empty() {
        return Err(invalid(
            text.len(),
            "no [[target]]: add one with `entry` and `pid` or `binary`".into(),
        ));
    }
    let output_error = |context: String| {
        move |source| ConfigFileError::Output {
            path: path.to_owned(),
            context: context.clone(),
            source,
        }
    };
    let env_for = |settings: &OutputSettings| password_for(settings, &password_env);
    let output = file
        .output
        .clone()
        .into_config(env_for(&file.output))
        .map_err(output_error("[output]".into()))?;
    let mut names = HashSet::new();
    let mut targets = Vec::with_capacity(file.target.len());
    for spanned in file.target {
        let at = spanned.span().start;
        let section = spanned.into_inner();
        let name = section
            .name
            .clone()
            .unwrap_or_else(|| section.entry.text.clone());
        if section.pid.is_empty() && section.binary.is_empty() {
            return Err(invalid(
                at,
                format!("target `{name}` watches nothing: give `pid = [..]` or `binary = [..]`"),
            ));
        }
        if !names.insert(name.clone()) {
            return Err(invalid(
                at,
                format!("two targets are named `{name}`: give each a distinct `name`"),
            ));
        }
        if section
            .output
            .as_ref()
            .is_some_and(|settings| settings.format.is_some())
        {
            // Reports share one stdout: its format is the [output] section's.
            return Err(invalid(
                at,
                format!(
                    "target `{name}`: `format` in [target.output] has no effect (stdout is \
                     shared by every target); set it in [output]"
                ),
            ));
        }
        let own_output = match section.output {
            Some(settings) => Some(
                settings
                    .clone()
                    .into_config(env_for(&settings))
                    .map_err(output_error(format!("target `{name}` [target.output]")))?,
            ),
            None => None,
        };
        targets.push(TargetSpec {
            name,
            pids: section.pid,
            binaries: section.binary,
            entry: section.entry,
            exit: section.exit,
            timeout: section.timeout.unwrap_or(DEFAULT_TIMEOUT),
            captures: section.capture,
            capture_len: section.capture_len.unwrap_or(DEFAULT_CAPTURE_LEN),
            output: own_output,
        });
    }
    Ok(AgentConfig {
        targets,
        sample_hz: file.agent.sample_hz.unwrap_or(DEFAULT_SAMPLE_HZ),
        duration: None,
        max_inflight: file.agent.max_inflight.unwrap_or(DEFAULT_MAX_INFLIGHT),
        user_stack_bytes: file
            .agent
            .user_stack_bytes
            .unwrap_or(dogslow_common::DEFAULT_USER_STACK_COPY),
        scan_interval: Duration::from_millis(10),
        output,
        metrics_addr: file.agent.metrics_addr,
    })
}

// Each value is parsed by the same function as its flag; a failure becomes a
// serde error, which the TOML parser reports with the line and the text.

fn from_str_with<'de, D, T>(
    deserializer: D,
    parse: impl Fn(&str) -> Result<T, String>,
) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
{
    let text = String::deserialize(deserializer)?;
    parse(&text).map_err(serde::de::Error::custom)
}

fn probe<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ProbeSpec, D::Error> {
    from_str_with(deserializer, |text| {
        text.parse()
            .map_err(|e: crate::probe_spec::ProbeSpecError| e.to_string())
    })
}

fn optional_probe<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ProbeSpec>, D::Error> {
    probe(deserializer).map(Some)
}

fn timeout<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<Duration>, D::Error> {
    from_str_with(deserializer, parse_timeout).map(Some)
}

fn captures<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<CaptureRequest>, D::Error> {
    let texts = Vec::<String>::deserialize(deserializer)?;
    texts
        .iter()
        .map(|text| {
            text.parse()
                .map_err(|e: crate::request_args::CaptureError| serde::de::Error::custom(e))
        })
        .collect()
}

fn ranged<'de, D, T>(
    deserializer: D,
    range: std::ops::RangeInclusive<T>,
    what: &str,
) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + PartialOrd + std::fmt::Display,
{
    let value = T::deserialize(deserializer)?;
    if range.contains(&value) {
        Ok(Some(value))
    } else {
        Err(serde::de::Error::custom(format!(
            "{what} {value} is out of range: give {}..={}",
            range.start(),
            range.end()
        )))
    }
}

fn sample_hz<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u64>, D::Error> {
    ranged(deserializer, 1..=10_000, "sample_hz")
}

fn max_inflight<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    ranged(deserializer, 16..=1_048_576, "max_inflight")
}

fn user_stack_bytes<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    ranged(
        deserializer,
        4096..=dogslow_common::MAX_USER_STACK_COPY as u32,
        "user_stack_bytes",
    )
}

fn capture_len<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<u32>, D::Error> {
    ranged(
        deserializer,
        1..=dogslow_common::MAX_CAPTURE_STR as u32,
        "capture_len",
    )
}

fn metrics_addr<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    from_str_with(deserializer, |text| {
        metrics::parse_addr(text).map_err(|e| e.to_string())
    })
    .map(Some)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_text(text: &str) -> Result<AgentConfig, ConfigFileError> {
        parse(Path::new("/etc/dogslow/dogslow.toml"), text, None)
    }

    const TWO_TARGETS: &str = r#"
[agent]
sample_hz = 49
metrics_addr = "9464"

[output]
format = "text"

[[target]]
name = "web"
binary = ["/usr/local/bin/app"]
entry = "handle_request"
timeout = "250ms"
capture = ["path=arg0:str"]

[[target]]
pid = [42]
entry = "usdt:postgresql:query__start"
exit = "usdt:postgresql:query__done"
timeout = "2s"
[target.output]
output_dir = "/var/log/pg"
"#;

    #[test]
    fn two_targets_with_their_own_timeouts() {
        let config = parse_text(TWO_TARGETS).unwrap();
        assert_eq!(config.sample_hz, 49);
        assert_eq!(config.metrics_addr, Some("127.0.0.1:9464".parse().unwrap()));
        assert_eq!(config.output.format, crate::config::ReportFormat::Text);
        assert_eq!(config.targets.len(), 2);
        let web = &config.targets[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.timeout, Duration::from_millis(250));
        assert_eq!(web.binaries, vec![PathBuf::from("/usr/local/bin/app")]);
        assert_eq!(web.captures[0].name, "path");
        assert_eq!(web.output, None);
        let pg = &config.targets[1];
        assert_eq!(pg.name, "usdt:postgresql:query__start");
        assert_eq!(pg.timeout, Duration::from_secs(2));
        assert_eq!(pg.pids, vec![42]);
        assert_eq!(
            pg.output.as_ref().unwrap().dir,
            Some(PathBuf::from("/var/log/pg"))
        );
    }

    fn error_of(text: &str) -> String {
        parse_text(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_key_names_file_line_and_key() {
        let err = error_of("[[target]]\npid = [1]\nentry = \"f\"\ntimeout_ms = 5\n");
        assert!(err.starts_with("/etc/dogslow/dogslow.toml: "), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("unknown field `timeout_ms`"), "{err}");
    }

    #[test]
    fn bad_duration_names_the_line_and_the_value() {
        let err = error_of("[[target]]\npid = [1]\nentry = \"f\"\ntimeout = \"25x\"\n");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("`25x` is not a duration"), "{err}");
        let err = error_of("[[target]]\npid = [1]\nentry = \"f\"\ntimeout = \"0s\"\n");
        assert!(err.contains("zero timeout"), "{err}");
    }

    #[test]
    fn missing_entry_and_empty_targets() {
        let err = error_of("[agent]\nsample_hz = 99\n\n[[target]]\nname = \"web\"\npid = [1]\n");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("missing field `entry`"), "{err}");
        let err = error_of("[agent]\nsample_hz = 99\n");
        assert!(err.contains("no [[target]]"), "{err}");
        let err = error_of("[[target]]\nentry = \"f\"\n");
        assert!(
            err.contains("/etc/dogslow/dogslow.toml:1: target `f` watches nothing"),
            "{err}"
        );
    }

    #[test]
    fn the_password_variable_goes_to_the_relays_with_a_user() {
        let text = "[output]\nemail_to = [\"ops@example.com\"]\n\
                    smtp = \"smtp://ops@127.0.0.1:2525\"\n\
                    [[target]]\npid = [1]\nentry = \"f\"\n\
                    [target.output]\nemail_to = [\"db@example.com\"]\n\
                    smtp = \"smtp://127.0.0.1:2526\"\n";
        let path = Path::new("/etc/dogslow/dogslow.toml");
        let config = parse(path, text, Some("secret".into())).unwrap();
        assert!(config.targets[0].output.is_some());
        // Without the variable, the relay with a user has no password.
        let err = parse(path, text, None).err().unwrap().to_string();
        assert!(err.contains("[output]"), "{err}");
    }

    #[test]
    fn values_are_checked_like_flags() {
        let err = error_of("[agent]\nsample_hz = 0\n[[target]]\npid=[1]\nentry=\"f\"\n");
        assert!(
            err.contains("line 2") && err.contains("sample_hz 0 is out of range"),
            "{err}"
        );
        let err = error_of("[[target]]\npid=[1]\nentry=\"f\"\ncapture=[\"q=arg0:float\"]\n");
        assert!(err.contains("unknown type `float`"), "{err}");
        let err = error_of("[[target]]\npid=[1]\nentry=\"usdt:x\"\n");
        assert!(err.contains("usdt:PROVIDER:NAME"), "{err}");
        let err = error_of("[output]\nemail_to = [\"a@b.c\"]\n[[target]]\npid=[1]\nentry=\"f\"\n");
        assert!(
            err.contains("[output]") && err.contains("needs --smtp"),
            "{err}"
        );
        let err = error_of(
            "[[target]]\nname=\"a\"\npid=[1]\nentry=\"f\"\n[[target]]\nname=\"a\"\npid=[2]\nentry=\"g\"\n",
        );
        assert!(err.contains(":5: two targets are named `a`"), "{err}");
        let err = error_of("[[target]]\npid=[1]\nentry=\"f\"\n[target.output]\nformat=\"text\"\n");
        assert!(
            err.contains(":1: target `f`: `format` in [target.output] has no effect"),
            "{err}"
        );
    }
}
