//! One JSON object per line, flushed per report so a supervisor killing the
//! pipeline loses nothing already captured.
use std::io::Write;

use super::Sink;
use crate::report::Report;

pub struct JsonLines<W: Write + Send> {
    out: W,
    failed: bool,
}

impl<W: Write + Send> JsonLines<W> {
    pub fn new(out: W) -> Self {
        Self { out, failed: false }
    }
}

impl<W: Write + Send> Sink for JsonLines<W> {
    fn emit(&mut self, report: &Report) {
        let line = report.to_json_line();
        let written = writeln!(self.out, "{line}").and_then(|()| self.out.flush());
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
        let mut sink = JsonLines::new(Vec::new());
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
