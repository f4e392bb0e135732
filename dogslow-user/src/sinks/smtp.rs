//! The mail server: `--smtp URL` parsed into a plain `SmtpServer`, the
//! password read from where it may come from, and the lettre transport.
//!
//! URL forms (lettre's own, minus the password):
//! `smtp://host[:port]` plain SMTP (port 25), `smtp://host[:port]?tls=required`
//! STARTTLS or fail (port 587), `?tls=opportunistic` STARTTLS when offered,
//! `smtps://host[:port]` implicit TLS (port 465); `user@host` (percent-encode
//! an `@` in the user name as `%40`) to authenticate.
use std::{
    fmt,
    net::IpAddr,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use lettre::{
    AsyncSmtpTransport, Tokio1Executor,
    transport::smtp::{
        authentication::Credentials,
        client::{Certificate, Tls, TlsParameters},
    },
};
use thiserror::Error;

/// Environment variable holding the SMTP password (never a flag: command
/// lines are readable by every user through /proc).
pub const PASSWORD_ENV: &str = "DOGSLOW_SMTP_PASSWORD";
/// Per-command SMTP timeout: a hung server must not hold mails forever.
const SMTP_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Error)]
pub enum SmtpError {
    #[error(
        "--smtp {url}: {reason}; write e.g. smtp://mail.example.com:25, smtp://user@mail.example.com?tls=required or smtps://mail.example.com"
    )]
    BadUrl { url: String, reason: String },
    #[error(
        "--smtp: do not put the password in the URL (every user can read command lines); set {PASSWORD_ENV} or use --smtp-password-file"
    )]
    PasswordInUrl,
    #[error(
        "--smtp {url} has the user `{user}` but no password was given: set {PASSWORD_ENV} or use --smtp-password-file"
    )]
    MissingPassword { url: String, user: String },
    #[error(
        "an SMTP password was given ({source_name}) but --smtp {url} has no user: write smtp://USER@HOST"
    )]
    PasswordWithoutUser { url: String, source_name: String },
    #[error(
        "the SMTP password was given twice ({PASSWORD_ENV} and --smtp-password-file); give it one way"
    )]
    TwoPasswords,
    #[error("--smtp-password-file {}: {source}", path.display())]
    PasswordFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("--smtp-password-file {}: the file is empty", path.display())]
    EmptyPasswordFile { path: PathBuf },
    #[error(
        "--smtp {url}: authenticating without TLS would send the password to {host} in clear text; use ?tls=required or smtps://"
    )]
    CleartextAuth { url: String, host: String },
    #[error("--smtp-ca-file {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },
    #[error("--smtp-ca-file is only used with TLS (smtps:// or ?tls=required|opportunistic)")]
    CaFileWithoutTls,
    #[error("setting up TLS for {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: lettre::transport::smtp::Error,
    },
}

/// How the connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Security {
    /// Plain SMTP: for a relay on the same host or a trusted network.
    Plain,
    /// STARTTLS when the server offers it, plain otherwise.
    Opportunistic,
    /// STARTTLS or no mail.
    StartTls,
    /// TLS from the first byte (`smtps://`).
    Implicit,
}

/// A password that never shows in `Debug` output or errors.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(text: String) -> Self {
        Self(text)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// Where and how to send mail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SmtpServer {
    /// The URL as given (it never holds a password), for messages.
    pub url: String,
    pub host: String,
    pub port: u16,
    pub security: Security,
    pub user: Option<String>,
    pub password: Option<Secret>,
    /// Extra trusted CA certificates (PEM), besides the system's.
    pub ca_file: Option<PathBuf>,
}

impl SmtpServer {
    /// Parses `--smtp URL`; the password comes separately (`with_password`).
    pub fn parse(text: &str) -> Result<Self, SmtpError> {
        let bad = |reason: &str| SmtpError::BadUrl {
            url: text.to_owned(),
            reason: reason.to_owned(),
        };
        let url = url::Url::parse(text).map_err(|err| bad(&err.to_string()))?;
        if url.password().is_some() {
            return Err(SmtpError::PasswordInUrl);
        }
        let mut tls = None;
        for (key, value) in url.query_pairs() {
            match (key.as_ref(), tls) {
                ("tls", None) => tls = Some(value.into_owned()),
                _ => return Err(bad(&format!("unknown or repeated parameter `{key}`"))),
            }
        }
        let security = match (url.scheme(), tls.as_deref()) {
            ("smtp", None | Some("none")) => Security::Plain,
            ("smtp", Some("required")) => Security::StartTls,
            ("smtp", Some("opportunistic")) => Security::Opportunistic,
            ("smtps", None) => Security::Implicit,
            ("smtp", Some(other)) => {
                return Err(bad(&format!(
                    "tls={other} is not one of none, opportunistic, required"
                )));
            }
            ("smtps", Some(_)) => return Err(bad("smtps:// is always TLS; drop ?tls=")),
            (scheme, _) => {
                return Err(bad(&format!(
                    "the scheme must be smtp:// or smtps://, not {scheme}://"
                )));
            }
        };
        let host = match url.host() {
            Some(url::Host::Domain(name)) if !name.is_empty() => name.to_owned(),
            Some(url::Host::Ipv4(ip)) => ip.to_string(),
            Some(url::Host::Ipv6(ip)) => ip.to_string(),
            _ => return Err(bad("no host")),
        };
        if !matches!(url.path(), "" | "/") || url.fragment().is_some() {
            return Err(bad("unexpected path after the host"));
        }
        let port = url.port().unwrap_or(match security {
            Security::Plain => 25,
            Security::Opportunistic | Security::StartTls => 587,
            Security::Implicit => 465,
        });
        if port == 0 {
            return Err(bad("port 0 is no server's port"));
        }
        let user = match url.username() {
            "" => None,
            encoded => Some(
                percent_encoding::percent_decode_str(encoded)
                    .decode_utf8()
                    .map_err(|_| bad("the user name is not UTF-8"))?
                    .into_owned(),
            ),
        };
        Ok(Self {
            url: text.to_owned(),
            host,
            port,
            security,
            user,
            password: None,
            ca_file: None,
        })
    }

    /// Takes the password from the environment variable's value or the
    /// file, and checks that it and the user come together and that neither
    /// travels in clear text beyond this host.
    pub fn with_password(
        mut self,
        from_env: Option<String>,
        from_file: Option<&Path>,
    ) -> Result<Self, SmtpError> {
        // An empty variable is as good as none: say the password is missing.
        let from_env = from_env.filter(|password| !password.is_empty());
        let (password, source_name) = match (from_env, from_file) {
            (Some(_), Some(_)) => return Err(SmtpError::TwoPasswords),
            (Some(password), None) => (Some(password), PASSWORD_ENV.to_owned()),
            (None, Some(path)) => (
                Some(read_password_file(path)?),
                format!("--smtp-password-file {}", path.display()),
            ),
            (None, None) => (None, String::new()),
        };
        match (&self.user, password) {
            (Some(user), None) => {
                return Err(SmtpError::MissingPassword {
                    url: self.url.clone(),
                    user: user.clone(),
                });
            }
            (None, Some(_)) => {
                return Err(SmtpError::PasswordWithoutUser {
                    url: self.url.clone(),
                    source_name,
                });
            }
            (Some(_), Some(password)) => {
                let encrypted = matches!(self.security, Security::StartTls | Security::Implicit);
                if !encrypted && !is_loopback(&self.host) {
                    return Err(SmtpError::CleartextAuth {
                        url: self.url.clone(),
                        host: self.host.clone(),
                    });
                }
                self.password = Some(Secret::new(password));
            }
            (None, None) => {}
        }
        Ok(self)
    }

    /// Trusts the CA certificates in `path` (PEM) too.
    pub fn with_ca_file(mut self, path: Option<&Path>) -> Result<Self, SmtpError> {
        if let Some(path) = path {
            if self.security == Security::Plain {
                return Err(SmtpError::CaFileWithoutTls);
            }
            // Read now, so a wrong path fails at start and not at the first stall.
            self.ca_certificate(path)?;
            self.ca_file = Some(path.to_owned());
        }
        Ok(self)
    }

    /// Where mail goes, for messages: `host:port (STARTTLS)`.
    pub fn describe(&self) -> String {
        let security = match self.security {
            Security::Plain => "plain SMTP",
            Security::Opportunistic => "STARTTLS if offered",
            Security::StartTls => "STARTTLS",
            Security::Implicit => "TLS",
        };
        format!("{}:{} ({security})", self.host, self.port)
    }

    /// Mail to a host other than this one, unencrypted.
    pub fn is_cleartext_remote(&self) -> bool {
        self.security == Security::Plain && !is_loopback(&self.host)
    }

    /// The lettre transport for this server.
    pub fn transport(&self) -> Result<AsyncSmtpTransport<Tokio1Executor>, SmtpError> {
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&self.host)
            .port(self.port)
            .timeout(Some(SMTP_TIMEOUT));
        let tls_error = |source| SmtpError::Tls {
            host: self.host.clone(),
            source,
        };
        if self.security != Security::Plain {
            let mut parameters = TlsParameters::builder(self.host.clone());
            if let Some(path) = &self.ca_file {
                parameters = parameters.add_root_certificate(self.ca_certificate(path)?);
            }
            let parameters = parameters.build_rustls().map_err(tls_error)?;
            builder = builder.tls(match self.security {
                Security::Opportunistic => Tls::Opportunistic(parameters),
                Security::StartTls => Tls::Required(parameters),
                Security::Implicit | Security::Plain => Tls::Wrapper(parameters),
            });
        }
        if let (Some(user), Some(Secret(password))) = (&self.user, &self.password) {
            builder = builder.credentials(Credentials::new(user.clone(), password.clone()));
        }
        Ok(builder.build())
    }

    fn ca_certificate(&self, path: &Path) -> Result<Certificate, SmtpError> {
        let ca_error = |reason: String| SmtpError::CaFile {
            path: path.to_owned(),
            reason,
        };
        let pem = std::fs::read(path).map_err(|err| ca_error(err.to_string()))?;
        if !pem
            .windows(b"-----BEGIN CERTIFICATE-----".len())
            .any(|window| window == b"-----BEGIN CERTIFICATE-----")
        {
            return Err(ca_error(
                "it holds no PEM certificate (-----BEGIN CERTIFICATE-----)".into(),
            ));
        }
        Certificate::from_pem(&pem)
            .map_err(|err| ca_error(format!("not a PEM certificate ({err})")))
    }
}

/// The first line of the file, without its line ending.
fn read_password_file(path: &Path) -> Result<String, SmtpError> {
    let file_error = |source| SmtpError::PasswordFile {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(file_error)?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        eprintln!(
            "dogslow: warning: --smtp-password-file {} can be read by other users; chmod 600 it",
            path.display()
        );
    }
    let password = text.lines().next().unwrap_or("").to_owned();
    if password.is_empty() {
        return Err(SmtpError::EmptyPasswordFile {
            path: path.to_owned(),
        });
    }
    Ok(password)
}

fn is_loopback(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_forms() {
        let plain = SmtpServer::parse("smtp://127.0.0.1:2525").unwrap();
        assert_eq!(
            (plain.host.as_str(), plain.port, plain.security, plain.user),
            ("127.0.0.1", 2525, Security::Plain, None)
        );
        let starttls =
            SmtpServer::parse("smtp://ops%40example.com@mail.example.com?tls=required").unwrap();
        assert_eq!(starttls.port, 587);
        assert_eq!(starttls.security, Security::StartTls);
        assert_eq!(starttls.user.as_deref(), Some("ops@example.com"));
        let implicit = SmtpServer::parse("smtps://mail.example.com").unwrap();
        assert_eq!(
            (implicit.port, implicit.security),
            (465, Security::Implicit)
        );
        assert_eq!(SmtpServer::parse("smtp://[::1]:25").unwrap().host, "::1");
        assert_eq!(
            SmtpServer::parse("smtp://h?tls=opportunistic")
                .unwrap()
                .security,
            Security::Opportunistic
        );
    }

    #[test]
    fn bad_urls_say_what_to_write() {
        for (url, want) in [
            ("mail.example.com", "relative URL"),
            ("http://mail.example.com", "smtp:// or smtps://"),
            ("smtp://h?tls=maybe", "tls=maybe"),
            ("smtp://h?port=1", "unknown or repeated parameter"),
            ("smtp://h/path", "unexpected path"),
            ("smtps://h?tls=required", "always TLS"),
            ("smtp://h:0", "port 0"),
        ] {
            let err = SmtpServer::parse(url).unwrap_err().to_string();
            assert!(err.contains(want), "{url}: {err}");
            assert!(err.contains("write e.g."), "{err}");
        }
        assert!(matches!(
            SmtpServer::parse("smtp://u:secret@h"),
            Err(SmtpError::PasswordInUrl)
        ));
        assert!(
            !SmtpServer::parse("smtp://u:secret@h")
                .unwrap_err()
                .to_string()
                .contains("secret")
        );
    }

    #[test]
    fn a_ca_file_must_hold_a_certificate() {
        let path = std::env::temp_dir().join(format!("dogslow-ca-{}.pem", std::process::id()));
        std::fs::write(&path, "hi\n").unwrap();
        let err = SmtpServer::parse("smtps://127.0.0.1:1")
            .unwrap()
            .with_ca_file(Some(&path))
            .err()
            .unwrap()
            .to_string();
        std::fs::remove_file(&path).unwrap();
        assert!(err.contains("holds no PEM certificate"), "{err}");
    }

    #[test]
    fn passwords_come_with_a_user_and_not_in_clear_text() {
        let local = || SmtpServer::parse("smtp://u@127.0.0.1:2525").unwrap();
        assert!(matches!(
            local().with_password(None, None),
            Err(SmtpError::MissingPassword { .. })
        ));
        assert!(matches!(
            local().with_password(Some(String::new()), None),
            Err(SmtpError::MissingPassword { .. })
        ));
        let ok = local().with_password(Some("pw".into()), None).unwrap();
        assert_eq!(ok.password, Some(Secret::new("pw".into())));
        assert!(!format!("{ok:?}").contains("pw\""));
        assert!(matches!(
            SmtpServer::parse("smtp://127.0.0.1")
                .unwrap()
                .with_password(Some("pw".into()), None),
            Err(SmtpError::PasswordWithoutUser { .. })
        ));
        assert!(matches!(
            SmtpServer::parse("smtp://u@mail.example.com")
                .unwrap()
                .with_password(Some("pw".into()), None),
            Err(SmtpError::CleartextAuth { .. })
        ));
        assert!(
            SmtpServer::parse("smtps://u@mail.example.com")
                .unwrap()
                .with_password(Some("pw".into()), None)
                .is_ok()
        );
    }

    #[test]
    fn password_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let server = SmtpServer::parse("smtp://u@localhost")
            .unwrap()
            .with_password(None, Some(&path))
            .unwrap();
        assert_eq!(server.password, Some(Secret::new("s3cret".into())));
        let missing = SmtpServer::parse("smtp://u@localhost")
            .unwrap()
            .with_password(None, Some(&dir.path().join("nope")))
            .unwrap_err()
            .to_string();
        assert!(
            missing.contains("--smtp-password-file") && missing.contains("nope"),
            "{missing}"
        );
        std::fs::write(&path, "\n").unwrap();
        assert!(matches!(
            SmtpServer::parse("smtp://u@localhost")
                .unwrap()
                .with_password(None, Some(&path)),
            Err(SmtpError::EmptyPasswordFile { .. })
        ));
        assert!(matches!(
            SmtpServer::parse("smtp://u@localhost")
                .unwrap()
                .with_password(Some("x".into()), Some(&path)),
            Err(SmtpError::TwoPasswords)
        ));
    }

    #[test]
    fn ca_files_are_checked_at_start() {
        let tls = SmtpServer::parse("smtps://localhost").unwrap();
        let err = tls
            .clone()
            .with_ca_file(Some(Path::new("/nonexistent.pem")))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent.pem"), "{err}");
        assert!(matches!(
            SmtpServer::parse("smtp://localhost")
                .unwrap()
                .with_ca_file(Some(Path::new("/x.pem"))),
            Err(SmtpError::CaFileWithoutTls)
        ));
        assert!(tls.transport().is_ok());
    }
}
