//! The plain configuration the agent runs from, whatever produced it (the
//! command line today). No clap types here.
use std::{path::PathBuf, time::Duration};

use crate::{probe_spec::ProbeSpec, request_args::CaptureRequest, sinks::email::EmailConfig};

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
}

/// The form of the reports on stdout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
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

impl AgentConfig {
    /// The longest a running stall may wait for a sample: one sample period.
    pub fn sample_period(&self) -> Duration {
        Duration::from_nanos(1_000_000_000 / self.sample_hz.max(1))
    }
}
