//! Reports on a stream (stdout): JSON lines (`--format json`) or the text
//! report followed by a blank line (`--format text`), flushed per report so
//! a supervisor killing the pipeline loses nothing already captured.
use std::io::Write;

use super::{Sink, text};
use crate::report::Report;

pub struct ReportStream<W: Write + Send> {
    out: W,
    /// The report's text, without the final line ending.
    render: fn(&Report) -> String,
    failed: bool,
}

impl<W: Write + Send> ReportStream<W> {
    /// One JSON object per line.
    pub fn json(out: W) -> Self {
        Self::new(out, Report::to_json_line)
    }

    /// The human report, each followed by a blank line.
    pub fn text(out: W) -> Self {
        Self::new(out, text::render)
    }

    fn new(out: W, render: fn(&Report) -> String) -> Self {
        Self {
            out,
            render,
            failed: false,
        }
    }

    #[cfg(test)]
    pub fn into_inner(self) -> W {
        self.out
    }
}

impl<W: Write + Send> Sink for ReportStream<W> {
    fn emit(&mut self, report: &Report) {
        let text = (self.render)(report);
        let written = writeln!(self.out, "{text}").and_then(|()| self.out.flush());
        if let Err(err) = written
            && !self.failed
        {
            eprintln!("dogslow: writing reports to stdout failed: {err}");
            self.failed = true;
        }
    }

    fn finish(&mut self) {
        let _ = self.out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::CompletionReport;

    #[test]
    fn one_line_per_report() {
        let mut sink = ReportStream::json(Vec::new());
        let report = Report::Completed(CompletionReport {
            kind: "completed",
            id: "x".into(),
            time: "t".into(),
            host: "h".into(),
            pid: 1,
            tid: 1,
            target: "handle_request".into(),
            duration_ms: 5,
            outcome: "returned",
            signal: None,
        });
        sink.emit(&report);
        sink.emit(&report);
        let text = String::from_utf8(sink.out.clone()).unwrap();
        assert_eq!(text.lines().count(), 2);
        for line in text.lines() {
            let value: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(value["kind"], "completed");
        }
    }
}
