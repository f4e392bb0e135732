//! Where reports go. Every sink gets every report; the JSON stream on
//! stdout is never filtered or rate-limited (storm control is email's own).
use thiserror::Error;

use crate::{
    config::{OutputConfig, ReportFormat},
    report::Report,
};

pub mod email;
pub mod files;
pub mod json;
pub mod smtp;
pub mod storm;
pub mod text;

pub use email::EmailSink;
pub use files::ReportFiles;
pub use json::JsonLines;
pub use text::TextStream;

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

/// The sinks `output` asks for, stdout first: a slow disk or mail server
/// never delays the stream.
pub fn build(output: &OutputConfig) -> Result<Vec<Box<dyn Sink>>, SinkError> {
    let mut sinks: Vec<Box<dyn Sink>> = vec![match output.format {
        ReportFormat::Json => Box::new(JsonLines::new(std::io::stdout())),
        ReportFormat::Text => Box::new(TextStream::new(std::io::stdout())),
    }];
    if let Some(dir) = &output.dir {
        sinks.push(Box::new(ReportFiles::open(dir)?));
    }
    if let Some(email) = &output.email {
        sinks.push(Box::new(EmailSink::start(email.clone())?));
    }
    Ok(sinks)
}
