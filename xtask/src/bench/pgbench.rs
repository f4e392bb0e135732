//! Item 6: a real server. PostgreSQL's `pgbench -S` throughput with
//! dogslow watching its queries, against not attached and against the kernel
//! floor on the same probes, alternating runs.
use std::{
    ffi::CString,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use super::{
    Bench,
    floor::{self, FloorProbes, Mechanism, Probe},
    proc::{self, Proc, SpawnOptions},
    report::{Check, Section, Table},
    stats::{Summary, show},
};

pub const TITLE: &str = "A real server: PostgreSQL pgbench";

/// How dogslow watches postgres. When `--binary` and USDT probes land,
/// switching is this one line: `PgProbes::Usdt`.
const PROBE_FORM: PgProbes = PgProbes::PortalRunPerBackend;

#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PgProbes {
    /// `PortalRun` function-scoped (uprobe + uretprobe) in each backend,
    /// attached by PID once pgbench has connected.
    PortalRunPerBackend,
    /// The `query__start` / `query__done` USDT probes in every process of
    /// the postgres binary, attached before pgbench connects.
    Usdt,
}

impl PgProbes {
    fn describe(self) -> &'static str {
        match self {
            Self::PortalRunPerBackend => {
                "the function `PortalRun` (function-scoped: uprobe + uretprobe), attached to each \
                 pgbench backend by `--pid` once pgbench has connected (`--binary` and USDT \
                 probes are not in dogslow yet)"
            }
            Self::Usdt => {
                "the USDT probes `postgresql:query__start` and `postgresql:query__done` \
                 (`--exit` form) in every process of the postgres binary (`--binary`)"
            }
        }
    }

    /// Whether the probes go on the backends' PIDs (after they exist).
    fn per_backend(self) -> bool {
        self == Self::PortalRunPerBackend
    }

    fn dogslow_args(self, postgres: &Path, backends: &[u32]) -> Vec<String> {
        let mut args = vec!["attach".to_owned()];
        match self {
            Self::PortalRunPerBackend => {
                for pid in backends {
                    args.extend(["--pid".to_owned(), pid.to_string()]);
                }
                args.extend(["--entry".to_owned(), "PortalRun".to_owned()]);
            }
            Self::Usdt => args.extend([
                "--binary".to_owned(),
                postgres.display().to_string(),
                "--entry".to_owned(),
                "usdt:postgresql:query__start".to_owned(),
                "--exit".to_owned(),
                "usdt:postgresql:query__done".to_owned(),
            ]),
        }
        args.extend(["--timeout".to_owned(), "5s".to_owned()]);
        args
    }

    fn floor_probes(self, postgres: &Path) -> Result<Vec<Probe>> {
        Ok(match self {
            Self::PortalRunPerBackend => {
                let portal_run = floor::function(postgres, "PortalRun")?.file_offset;
                vec![Probe::entry(portal_run), Probe::ret(portal_run)]
            }
            Self::Usdt => vec![
                Probe::usdt(floor::usdt(postgres, "postgresql", "query__start")?),
                Probe::usdt(floor::usdt(postgres, "postgresql", "query__done")?),
            ],
        })
    }
}

const CLIENTS: usize = 4;
const THREADS: usize = 2;
const SCALE: u32 = 1;
/// How long each configuration stays in place during the pgbench run.
const SEGMENT: Duration = Duration::from_secs(2);

/// The server runs on CPU 0 and pgbench on CPU 1 when there are two or
/// more: left to the scheduler, the placement of seven busy processes on
/// two CPUs swings throughput between two levels far apart, which buries
/// what is measured.
fn server_cpu() -> Option<usize> {
    std::thread::available_parallelism()
        .is_ok_and(|n| n.get() >= 2)
        .then_some(0)
}

/// A PostgreSQL installation (Debian: /usr/lib/postgresql/VERSION/bin).
pub struct PgInstall {
    pub bin: PathBuf,
    uid: libc::uid_t,
    gid: libc::gid_t,
}

/// The newest installed PostgreSQL with initdb, postgres and pgbench, and
/// the `postgres` user to run it as.
pub fn find_install() -> Result<PgInstall> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (no /usr/lib/postgresql)")?
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = entry.path().join("bin");
            ["postgres", "initdb", "pgbench", "createdb"]
                .iter()
                .all(|tool| bin.join(tool).is_file())
                .then_some((version, bin))
        })
        .collect();
    versions.sort();
    let (_, bin) = versions.pop().context(
        "no PostgreSQL under /usr/lib/postgresql has postgres, initdb, pgbench and createdb",
    )?;
    let user = CString::new("postgres")?;
    // SAFETY: getpwnam takes a NUL-terminated name; the result is read at once.
    let entry = unsafe { libc::getpwnam(user.as_ptr()) };
    if entry.is_null() {
        bail!("there is no `postgres` user to run PostgreSQL as");
    }
    // SAFETY: non-null, from getpwnam just above.
    let (uid, gid) = unsafe { ((*entry).pw_uid, (*entry).pw_gid) };
    Ok(PgInstall { bin, uid, gid })
}

/// A throwaway cluster on a Unix socket in its own directory; stopped and
/// removed when dropped.
struct Cluster {
    dir: PathBuf,
    socket_dir: PathBuf,
    port: u16,
    server: Option<Proc>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut server) = self.server.take() {
            server.stop(Duration::from_secs(20));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Cluster {
    fn start(pg: &PgInstall) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("dogslow-bench-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let mut cluster = Self {
            socket_dir: dir.join("socket"),
            dir,
            port: 54329,
            server: None,
        };
        std::fs::create_dir_all(&cluster.socket_dir)?;
        for path in [&cluster.dir, &cluster.socket_dir] {
            let c_path = CString::new(path.as_os_str().as_encoded_bytes())?;
            // SAFETY: a valid path; ownership of our own scratch directory.
            if unsafe { libc::chown(c_path.as_ptr(), pg.uid, pg.gid) } != 0 {
                bail!(
                    "chown {}: {}",
                    path.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        let data = cluster.dir.join("data");
        eprintln!("xtask bench:   initdb and pgbench -i (scale {SCALE})");
        proc::output(
            Command::new(pg.bin.join("initdb"))
                .args([
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data)
                .uid(pg.uid)
                .gid(pg.gid),
        )?;
        let mut server = Proc::spawn_with(
            "postgres",
            Command::new(pg.bin.join("postgres"))
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&cluster.socket_dir)
                .args(["-p", &cluster.port.to_string()])
                .args(["-c", "listen_addresses=", "-c", "fsync=off"])
                .args(["-c", "max_connections=20"]),
            SpawnOptions {
                // Fast shutdown: disconnect clients, stop.
                stop_signal: Some(libc::SIGINT),
                credentials: Some((pg.uid, pg.gid)),
                cpu: server_cpu(),
            },
        )?;
        server.wait_stderr(
            Duration::from_secs(60),
            "postgres to accept connections",
            |l| l.contains("ready to accept connections"),
        )?;
        cluster.server = Some(server);
        proc::output(cluster.client(pg, "createdb").arg("bench"))?;
        proc::output(cluster.client(pg, "pgbench").args([
            "-i",
            "-q",
            "-s",
            &SCALE.to_string(),
            "bench",
        ]))?;
        Ok(cluster)
    }

    /// A client tool of `pg` pointed at this cluster.
    fn client(&self, pg: &PgInstall, tool: &str) -> Command {
        let mut command = Command::new(pg.bin.join(tool));
        command.arg("-h").arg(&self.socket_dir).args([
            "-p",
            &self.port.to_string(),
            "-U",
            "postgres",
        ]);
        command
    }

    fn postmaster_pid(&mut self) -> Option<u32> {
        self.server.as_ref().map(Proc::pid)
    }
}

/// The postmaster's children serving clients on the socket
/// ("postgres: postgres bench [local] ...").
fn backends(postmaster: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            ppid == Some(postmaster) && String::from_utf8_lossy(&cmdline).contains("bench [local]")
        })
        .collect()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Config {
    NotAttached,
    Floor,
    /// The floor through uprobe_multi links instead of perf events.
    FloorMulti,
    Dogslow,
}

const CONFIGS: [Config; 4] = [
    Config::NotAttached,
    Config::Floor,
    Config::FloorMulti,
    Config::Dogslow,
];

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::NotAttached => "not attached",
            Self::Floor => "kernel floor (empty probes, perf events as aya attaches)",
            Self::FloorMulti => "empty probes through a uprobe_multi link",
            Self::Dogslow => "dogslow attached",
        }
    }
}

enum Attached {
    Nothing,
    Floor(#[allow(dead_code)] Vec<FloorProbes>),
    Dogslow(Proc),
}

impl Attached {
    /// Detaches; fails if dogslow did not survive its segment.
    fn detach(self) -> Result<()> {
        if let Self::Dogslow(mut agent) = self {
            if !agent.is_running() {
                bail!("exited while attached: {}", agent.why());
            }
            agent.stop(Duration::from_secs(10));
        }
        Ok(())
    }
}

fn attach(bench: &Bench, config: Config, postgres: &Path, backends: &[u32]) -> Result<Attached> {
    Ok(match config {
        Config::NotAttached => Attached::Nothing,
        Config::Floor | Config::FloorMulti => {
            let mechanism = if config == Config::Floor {
                Mechanism::PerfEvent
            } else {
                Mechanism::UprobeMulti
            };
            let probes = PROBE_FORM.floor_probes(postgres)?;
            if PROBE_FORM.per_backend() {
                Attached::Floor(
                    backends
                        .iter()
                        .map(|pid| floor::attach(mechanism, postgres, &probes, Some(*pid)))
                        .collect::<Result<_>>()?,
                )
            } else {
                Attached::Floor(vec![floor::attach(mechanism, postgres, &probes, None)?])
            }
        }
        Config::Dogslow => {
            Attached::Dogslow(bench.start_dogslow(&PROBE_FORM.dogslow_args(postgres, backends))?)
        }
    })
}

/// When one configuration was in place during the pgbench run.
struct Segment {
    cycle: usize,
    config: usize,
    /// Realtime ns: attached (or, for not attached, the segment began) ...
    from_ns: u64,
    /// ... and detached.
    to_ns: u64,
}

/// Waits until pgbench's backends exist; their PIDs.
fn wait_for_backends(postmaster: u32, pgbench: &mut Proc) -> Result<Vec<u32>> {
    let mut found = Vec::new();
    for _ in 0..500 {
        found = backends(postmaster);
        if found.len() >= CLIENTS || !pgbench.is_running() {
            break;
        }
        proc::sleep(Duration::from_millis(10))?;
    }
    if found.len() < CLIENTS {
        bail!(
            "found {} of pgbench's {CLIENTS} backends ({})",
            found.len(),
            pgbench.why()
        );
    }
    Ok(found)
}

/// One long pgbench run during which the configurations take turns, in
/// segments of `SEGMENT`, in an order rotated per cycle; returns, per cycle
/// and configuration, the mean tps of the progress seconds that fell wholly
/// inside the configuration's segment.
fn measure(
    bench: &Bench,
    pg: &PgInstall,
    cluster: &mut Cluster,
) -> Result<Vec<[f64; CONFIGS.len()]>> {
    let cycles = bench.settings.pg_cycles;
    // Long enough for every turn and its attaching; stopped after the last.
    let turns = (cycles * CONFIGS.len()) as u32;
    let total = (SEGMENT + Duration::from_secs(3)) * turns + Duration::from_secs(30);
    let postgres = pg.bin.join("postgres");
    let postmaster = cluster
        .postmaster_pid()
        .context("postgres is not running")?;
    let mut pgbench = Proc::spawn_with(
        "pgbench",
        cluster.client(pg, "pgbench").args([
            "-S",
            "-n",
            "-c",
            &CLIENTS.to_string(),
            "-j",
            &THREADS.to_string(),
            "-T",
            &total.as_secs().to_string(),
            "-P",
            "1",
            "--progress-timestamp",
            "bench",
        ]),
        SpawnOptions {
            cpu: server_cpu().map(|_| 1),
            ..SpawnOptions::default()
        },
    )?;
    let backends = wait_for_backends(postmaster, &mut pgbench)?;
    // Let connections settle before the first segment.
    proc::sleep(Duration::from_secs(1))?;
    let mut segments = Vec::new();
    for cycle in 0..cycles {
        for offset in 0..CONFIGS.len() {
            let config = (cycle + offset) % CONFIGS.len();
            let attached = attach(bench, CONFIGS[config], &postgres, &backends)
                .with_context(|| CONFIGS[config].name())?;
            let from_ns = proc::realtime_ns();
            proc::sleep(SEGMENT)?;
            let to_ns = proc::realtime_ns();
            attached.detach().with_context(|| CONFIGS[config].name())?;
            if !pgbench.is_running() {
                bail!("pgbench ended early: {}", pgbench.why());
            }
            segments.push(Segment {
                cycle,
                config,
                from_ns,
                to_ns,
            });
        }
    }
    pgbench.stop(Duration::from_secs(10));
    // "progress: 5.0 s, 12345.6 tps, lat 0.321 ms stddev 0.100, 0 failed",
    // printed as each second ends: the second is [read - 1 s, read].
    let seconds: Vec<(u64, f64)> = pgbench
        .stderr
        .snapshot()
        .iter()
        .filter_map(|l| {
            let rest = l.text.strip_prefix("progress: ")?;
            let tps: f64 = rest
                .split(", ")
                .nth(1)?
                .trim_end_matches(" tps")
                .parse()
                .ok()?;
            Some((l.read_ns, tps))
        })
        .collect();
    let mut results = vec![[f64::NAN; CONFIGS.len()]; cycles];
    for segment in &segments {
        let inside: Vec<f64> = seconds
            .iter()
            .filter(|(end, _)| {
                end.saturating_sub(1_000_000_000) >= segment.from_ns && *end <= segment.to_ns
            })
            .map(|(_, tps)| *tps)
            .collect();
        if inside.is_empty() {
            bail!(
                "no whole progress second inside the {} segment of cycle {}",
                CONFIGS[segment.config].name(),
                segment.cycle + 1
            );
        }
        results[segment.cycle][segment.config] = inside.iter().sum::<f64>() / inside.len() as f64;
    }
    Ok(results)
}

pub fn run(bench: &Bench) -> Result<Section> {
    let pg = find_install()?;
    let mut cluster = Cluster::start(&pg)?;
    let settings = &bench.settings;
    let cycles = measure(bench, &pg, &mut cluster)?;
    drop(cluster);

    let results: Vec<Vec<f64>> = (0..CONFIGS.len())
        .map(|config| cycles.iter().map(|cycle| cycle[config]).collect())
        .collect();
    let baseline = results[0].clone();
    let ratio = |values: &[f64]| -> Vec<f64> {
        values
            .iter()
            .zip(&baseline)
            .map(|(v, b)| v / b * 100.0)
            .collect()
    };
    let mut section = Section::new(TITLE);
    let postgres = pg.bin.join("postgres");
    section.method = vec![
        format!(
            "A throwaway PostgreSQL cluster (Unix socket only, `fsync=off`; the server pinned \
             to CPU 0 and pgbench to CPU 1, since the scheduler's placement otherwise swings \
             throughput between two levels), scale {SCALE}; one \
             `pgbench -S` (select-only) run with {CLIENTS} clients and {THREADS} threads, \
             progress every second. While it runs, four configurations take turns for {} s \
             each: not attached; the kernel floor (the empty program on the same probes, \
             attached as aya attaches dogslow's: per-process perf events); the same empty \
             program through uprobe_multi links; and dogslow. {} cycles, order rotated per cycle. Throughput of a turn is the mean of \
             the progress seconds wholly inside it (attaching is outside). Taking turns inside \
             one run cancels the slow drifts of a shared machine that separate runs suffer. \
             Ratios are per cycle against not attached.",
            SEGMENT.as_secs(),
            settings.pg_cycles
        ),
        format!("Measured form: dogslow watches {}.", PROBE_FORM.describe()),
    ];
    section.commands = vec![
        format!(
            "initdb -U postgres --auth=trust -D DIR; postgres -D DIR -k SOCKET -p PORT -c listen_addresses= -c fsync=off; pgbench -i -q -s {SCALE} bench"
        ),
        format!(
            "pgbench -h SOCKET -p PORT -U postgres -S -n -c {CLIENTS} -j {THREADS} -T {} -P 1 --progress-timestamp bench",
            ((SEGMENT + Duration::from_secs(3)) * (settings.pg_cycles * CONFIGS.len()) as u32)
                .as_secs()
                + 30
        ),
        format!(
            "dogslow {}",
            PROBE_FORM
                .dogslow_args(&postgres, &[])
                .join(" ")
                .replace("attach --entry", "attach --pid <backend> ... --entry")
        ),
    ];
    let mut table = Table::new(
        "",
        &["configuration", "transactions/s", "% of not attached"],
    );
    for (config, values) in CONFIGS.iter().zip(&results) {
        table.row(vec![
            config.name().to_owned(),
            show(Summary::of(values), 0),
            if *config == Config::NotAttached {
                "100".into()
            } else {
                show(Summary::of(&ratio(values)), 1)
            },
        ]);
    }
    section.tables.push(table);
    let dogslow = Summary::of(&ratio(&results[3]));
    let floor_ratio = Summary::of(&ratio(&results[1]));
    let multi_ratio = Summary::of(&ratio(&results[2]));
    section.checks.push(Check::new(
        "pgbench throughput with dogslow ≥ 95 % of without",
        format!("{} % (floor: {} %)", show(dogslow, 1), show(floor_ratio, 1)),
        dogslow.map(|d| d.median >= 95.0),
    ));
    // Explaining a loss takes a few cycles and a floor that lost something.
    let explainable = settings.pg_cycles >= 3;
    if !explainable {
        section.notes.push(
            "Too few cycles in this run to split a loss between the probes and dogslow.".into(),
        );
    }
    if let (Some(dogslow), Some(floor_ratio)) = (dogslow, floor_ratio)
        && dogslow.median < 95.0
        && explainable
        && floor_ratio.median <= 100.0
        && floor_ratio.median >= dogslow.median
    {
        let mut note = format!(
            "**Below 95 %.** The kernel floor alone — empty programs on the same probes, \
             attached as dogslow attaches them — keeps {:.1} % of the throughput: {:.1} of the \
             {:.1} points lost are the probes' own cost, which any tool attaching the same way \
             pays, and {:.1} are dogslow's programs (including its `sched_switch` program, which \
             runs at every context switch of the machine) and agent.",
            floor_ratio.median,
            100.0 - floor_ratio.median,
            100.0 - dogslow.median,
            floor_ratio.median - dogslow.median
        );
        // Only when uprobe_multi beat the perf-event floor in every cycle.
        let multi_wins = results[2]
            .iter()
            .zip(&results[1])
            .all(|(multi, perf)| multi > perf);
        if let Some(multi) = multi_ratio.filter(|m| multi_wins && m.median > floor_ratio.median) {
            note.push_str(&format!(
                " The same empty programs through uprobe_multi links keep {:.1} %: the attach \
                 mechanism alone costs {:.1} points here (item 4 measures the per-switch side of \
                 it). aya 0.14 attaches uprobes only through perf events; creating uprobe_multi \
                 links directly (BPF_LINK_CREATE, kernel 6.6+, as this bench does) is the largest \
                 saving available to dogslow on a server like this one.",
                multi.median,
                multi.median - floor_ratio.median
            ));
        }
        section.notes.push(note);
    }
    Ok(section)
}
