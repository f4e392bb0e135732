//! Where reports go. Every sink gets every report; the JSON stream on
//! stdout is never filtered or rate-limited (storm control is email's own).
use std::collections::HashMap;

use thiserror::Error;

use crate::{
    config::{AgentConfig, OutputConfig, ReportFormat},
    metrics::MailCounters,
    report::Report,
};

pub mod email;
pub mod files;
pub mod smtp;
pub mod storm;
pub mod stream;
pub mod text;

pub use email::EmailSink;
pub use files::ReportFiles;
pub use stream::ReportStream;

#[derive(Debug, Error)]
pub enum SinkError {
    #[error(transparent)]
    Files(#[from] files::FilesError),
    #[error(transparent)]
    Email(#[from] email::EmailError),
}

/// A destination for reports. Runs on the reporting thread: a sink that
/// may block (network) must hand work to its own task.
pub trait Sink: Send {
    fn emit(&mut self, report: &Report);
    /// Called once at shutdown, after the last report.
    fn finish(&mut self) {}
}

/// Every destination of a run: stdout gets every report, first (a slow
/// disk or mail server never delays the stream); the files and mail of the
/// `[output]` section get the reports of targets without their own, and a
/// target with its own `output` gets its files and mail instead.
pub struct SinkSet {
    stdout: Box<dyn Sink>,
    shared: Vec<Box<dyn Sink>>,
    own: HashMap<String, Vec<Box<dyn Sink>>>,
}

impl SinkSet {
    pub fn build(config: &AgentConfig, mail: &MailCounters) -> Result<Self, SinkError> {
        let stdout: Box<dyn Sink> = match config.output.format {
            ReportFormat::Json => Box::new(ReportStream::json(std::io::stdout())),
            ReportFormat::Text => Box::new(ReportStream::text(std::io::stdout())),
        };
        let mut own = HashMap::new();
        for target in &config.targets {
            if let Some(output) = &target.output {
                own.insert(target.name.clone(), destinations(output, mail)?);
            }
        }
        Ok(Self {
            stdout,
            shared: destinations(&config.output, mail)?,
            own,
        })
    }

    pub fn emit(&mut self, report: &Report) {
        self.stdout.emit(report);
        let target = match report {
            Report::Stall(stall) => &stall.target,
            Report::Completed(done) => &done.target,
        };
        let sinks = match self.own.get_mut(target) {
            Some(own) => own,
            None => &mut self.shared,
        };
        for sink in sinks {
            sink.emit(report);
        }
    }

    /// Flushes stdout and lets the others finish (pending mail gets its
    /// grace period).
    pub fn finish(&mut self) {
        self.stdout.finish();
        for sink in self
            .shared
            .iter_mut()
            .chain(self.own.values_mut().flatten())
        {
            sink.finish();
        }
    }
}

/// The files and mail one `output` asks for.
fn destinations(
    output: &OutputConfig,
    mail: &MailCounters,
) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
    if let Some(dir) = &output.dir {
        sinks.push(Box::new(ReportFiles::open(dir)?));
    }
    if let Some(email) = &output.email {
        sinks.push(Box::new(EmailSink::start_counted(
            email.clone(),
            mail.clone(),
        )?));
    }
    Ok(sinks)
}
