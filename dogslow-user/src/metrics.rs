//! Prometheus metrics and a health check over HTTP (`--metrics-addr`): what
//! dogslow tracks, reports, drops and mails, and how full its maps are.
//! Off by default; a bare port binds to loopback only.
use std::{
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use thiserror::Error;
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::{TcpListener, TcpStream},
};

#[derive(Debug, Error)]
pub enum MetricsError {
    #[error("`{addr}` is not an address to serve metrics on; give PORT, HOST:PORT or [IPV6]:PORT")]
    BadAddress { addr: String },
    #[error("cannot listen for metrics on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Parses `--metrics-addr`: a bare port means 127.0.0.1:PORT.
pub fn parse_addr(text: &str) -> Result<SocketAddr, MetricsError> {
    let text = text.trim();
    if let Ok(port) = text.parse::<u16>() {
        return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
    }
    text.parse()
        .map_err(|_| MetricsError::BadAddress { addr: text.into() })
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StallLabels {
    pub target: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MapLabels {
    pub map: String,
}

/// Every metric dogslow exports. Cheap to clone; updated from any thread.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub requests_started: Counter,
    pub requests_inflight: Gauge,
    pub stalls_reported: Family<StallLabels, Counter>,
    pub completions: Family<OutcomeLabels, Counter>,
    pub dropped: Family<ReasonLabels, Counter>,
    pub capture_retries: Counter,
    pub mails_sent: Counter,
    pub mails_failed: Counter,
    pub mails_suppressed: Counter,
    pub attach_errors: Counter,
    pub watched_processes: Gauge,
    pub map_entries: Family<MapLabels, Gauge>,
    pub map_capacity: Family<MapLabels, Gauge>,
    /// Unix seconds of the event loop's last turn, for /healthz.
    heartbeat: Arc<AtomicU64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("dogslow");
        let metrics = Self {
            registry: Arc::new(Registry::default()),
            requests_started: Counter::default(),
            requests_inflight: Gauge::default(),
            stalls_reported: Family::default(),
            completions: Family::default(),
            dropped: Family::default(),
            capture_retries: Counter::default(),
            mails_sent: Counter::default(),
            mails_failed: Counter::default(),
            mails_suppressed: Counter::default(),
            attach_errors: Counter::default(),
            watched_processes: Gauge::default(),
            map_entries: Family::default(),
            map_capacity: Family::default(),
            heartbeat: Arc::new(AtomicU64::new(now_secs())),
        };
        registry.register(
            "requests_started",
            "Requests that entered a probed entry point",
            metrics.requests_started.clone(),
        );
        registry.register(
            "requests_inflight",
            "Requests in flight at the last look",
            metrics.requests_inflight.clone(),
        );
        registry.register(
            "stalls_reported",
            "Stall reports written, by target and thread state",
            metrics.stalls_reported.clone(),
        );
        registry.register(
            "completions",
            "Reported requests that ended, by outcome",
            metrics.completions.clone(),
        );
        registry.register(
            "dropped",
            "Requests or records the kernel side could not keep, by reason (inflight_full, completion_dropped, args_full, undecodable)",
            metrics.dropped.clone(),
        );
        registry.register(
            "capture_retries",
            "Stall captures that waited for ring buffer room",
            metrics.capture_retries.clone(),
        );
        registry.register(
            "mails_sent",
            "Report mails delivered to the SMTP server",
            metrics.mails_sent.clone(),
        );
        registry.register(
            "mails_failed",
            "Report mails given up after retries",
            metrics.mails_failed.clone(),
        );
        registry.register(
            "mails_suppressed",
            "Report mails held back by storm control",
            metrics.mails_suppressed.clone(),
        );
        registry.register(
            "probe_attach_errors",
            "Probes that could not be attached",
            metrics.attach_errors.clone(),
        );
        registry.register(
            "watched_processes",
            "Processes currently watched",
            metrics.watched_processes.clone(),
        );
        registry.register(
            "bpf_map_entries",
            "Entries in dogslow's BPF maps",
            metrics.map_entries.clone(),
        );
        registry.register(
            "bpf_map_capacity",
            "Capacity of dogslow's BPF maps",
            metrics.map_capacity.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    /// The event loop is alive.
    pub fn beat(&self) {
        self.heartbeat.store(now_secs(), Ordering::Relaxed);
    }

    fn healthy(&self) -> bool {
        now_secs().saturating_sub(self.heartbeat.load(Ordering::Relaxed)) < HEALTHY_WITHIN.as_secs()
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }

    pub fn stall(&self, target: &str, state: &str) {
        self.stalls_reported
            .get_or_create(&StallLabels {
                target: target.into(),
                state: state.into(),
            })
            .inc();
    }

    pub fn completion(&self, outcome: &str) {
        self.completions
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
    }

    pub fn drop_by(&self, reason: &str, count: u64) {
        self.dropped
            .get_or_create(&ReasonLabels {
                reason: reason.into(),
            })
            .inc_by(count);
    }

    pub fn map_fill(&self, map: &str, entries: usize, capacity: u32) {
        let labels = MapLabels { map: map.into() };
        self.map_entries.get_or_create(&labels).set(entries as i64);
        self.map_capacity
            .get_or_create(&labels)
            .set(i64::from(capacity));
    }
}

/// The mail sink's counters (its own thread updates them).
#[derive(Clone, Debug, Default)]
pub struct MailCounters {
    pub sent: Counter,
    pub failed: Counter,
    pub suppressed: Counter,
}

impl Metrics {
    pub fn mail_counters(&self) -> MailCounters {
        MailCounters {
            sent: self.mails_sent.clone(),
            failed: self.mails_failed.clone(),
            suppressed: self.mails_suppressed.clone(),
        }
    }
}

/// /healthz fails when the event loop has not turned for this long.
const HEALTHY_WITHIN: Duration = Duration::from_secs(10);

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Binds `addr` (so a taken port fails at start, not later).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, MetricsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| MetricsError::Bind { addr, source })
}

/// Serves `GET /metrics` and `GET /healthz` until the runtime stops.
pub async fn serve(listener: TcpListener, metrics: Metrics) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(Duration::from_secs(5), respond(stream, &metrics)).await;
        });
    }
}

/// A minimal HTTP/1.1 exchange: read the request head, answer, close.
async fn respond(mut stream: TcpStream, metrics: &Metrics) -> std::io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 8192 {
        let read = stream.read(&mut buf).await?;
        if read == 0 {
            break;
        }
        head.extend_from_slice(&buf[..read]);
    }
    let request_line = String::from_utf8_lossy(&head);
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or(path);
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => (
            "200 OK",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(),
        ),
        ("GET", "/healthz") if metrics.healthy() => ("200 OK", "text/plain", "ok\n".to_owned()),
        ("GET", "/healthz") => (
            "503 Service Unavailable",
            "text/plain",
            "the event loop is stuck\n".to_owned(),
        ),
        ("GET", _) => (
            "404 Not Found",
            "text/plain",
            "try /metrics or /healthz\n".to_owned(),
        ),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET only\n".to_owned(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await?;
    stream.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses() {
        assert_eq!(
            parse_addr("9464").unwrap(),
            "127.0.0.1:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("0.0.0.0:9464").unwrap(),
            "0.0.0.0:9464".parse().unwrap()
        );
        assert_eq!(
            parse_addr("[::1]:9464").unwrap(),
            "[::1]:9464".parse().unwrap()
        );
        assert!(
            parse_addr("localhost")
                .unwrap_err()
                .to_string()
                .contains("PORT, HOST:PORT")
        );
    }

    #[test]
    fn renders_prefixed_metrics_with_labels() {
        let metrics = Metrics::new();
        metrics.stall("web", "blocked");
        metrics.stall("web", "blocked");
        metrics.drop_by("inflight_full", 3);
        metrics.map_fill("inflight", 5, 16384);
        let text = metrics.render();
        assert!(
            text.contains("dogslow_stalls_reported_total{target=\"web\",state=\"blocked\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("dogslow_dropped_total{reason=\"inflight_full\"} 3"),
            "{text}"
        );
        assert!(
            text.contains("dogslow_bpf_map_entries{map=\"inflight\"} 5"),
            "{text}"
        );
        assert!(
            text.contains("dogslow_bpf_map_capacity{map=\"inflight\"} 16384"),
            "{text}"
        );
        assert!(text.contains("# EOF"));
    }

    #[test]
    fn serves_metrics_and_health_over_http() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let metrics = Metrics::new();
            metrics.requests_started.inc_by(7);
            let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
            let addr = listener.local_addr().unwrap();
            tokio::spawn(serve(listener, metrics.clone()));
            let get = |path: &'static str| async move {
                let mut stream = TcpStream::connect(addr).await.unwrap();
                stream
                    .write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                    .await
                    .unwrap();
                let mut response = String::new();
                stream.read_to_string(&mut response).await.unwrap();
                response
            };
            let response = get("/metrics").await;
            assert!(response.starts_with("HTTP/1.1 200 OK"), "{response}");
            assert!(
                response.contains("dogslow_requests_started_total 7"),
                "{response}"
            );
            assert!(get("/healthz").await.starts_with("HTTP/1.1 200 OK"));
            assert!(get("/nope").await.starts_with("HTTP/1.1 404"));
        });
    }
}
