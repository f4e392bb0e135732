//! Where reports go. Every sink gets every report; the JSON stream on
//! stdout is never filtered or rate-limited.
use crate::report::Report;

pub mod json;

pub use json::JsonLines;

/// A destination for reports. Runs on the reporting thread: a sink that
/// may block (network) must hand work to its own task.
pub trait Sink: Send {
    fn emit(&mut self, report: &Report);
    /// Called once at shutdown, after the last report.
    fn finish(&mut self) {}
}
