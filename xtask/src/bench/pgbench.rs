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
const PROBE_FORM: PgProbes = PgProbes::Usdt;

#[allow(dead_code)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PgProbes {
    /// `PortalRun` function-scoped (uprobe + uretprobe) in each backend,
    /// attached by PID once pgbench has connected.
    PortalRunPerBackend,
    /// The `query__start` / `query__done` USDT probes in every process of
    /// the postgres binary (`--binary`).
    Usdt,
}

impl PgProbes {
    fn describe(self) -> &'static str {
        match self {
            Self::PortalRunPerBackend => {
                "the function `PortalRun` (function-scoped: uprobe + uretprobe), attached to each \
                 pgbench backend by `--pid` once pgbench has connected"
            }
            Self::Usdt => {
                "the USDT probes `postgresql:query__start` and `postgresql:query__done` \
                 (`--exit` form) in every process of the postgres binary (`--binary`)"
            }
        }
    }

    /// How the floor attaches, which is how dogslow attaches in this form.
    fn floor_attach(self) -> &'static str {
        match self {
            Self::PortalRunPerBackend => {
                "one perf event per backend, as aya attaches `--pid` probes"
            }
            Self::Usdt => {
                "perf events for every process of the file with the probes' semaphores \
                 (`ref_ctr_offset`), as dogslow attaches `--binary` USDT probes"
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
/// The widest spread, (max - min) / median, of the not-attached turns'
/// throughput for which the run gives a verdict.
const MAX_BASELINE_SPREAD: f64 = 0.2;

/// How long each configuration's turn is measured during the pgbench run,
/// after `SETTLE` in place.
const SEGMENT: Duration = Duration::from_secs(2);
const SETTLE: Duration = Duration::from_secs(1);

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

/// The configurations of this run; not attached first. uprobe_multi links
/// only differ from perf events when those are per process.
fn configs() -> Vec<Config> {
    let mut configs = vec![Config::NotAttached, Config::Floor];
    if PROBE_FORM.per_backend() {
        configs.push(Config::FloorMulti);
    }
    // dogslow's cpu-clock sampler runs only while a request is overdue, so
    // an always-on empty sampler is not part of its cost here.
    configs.push(Config::Dogslow);
    configs
}

impl Config {
    fn name(self) -> &'static str {
        match self {
            Self::NotAttached => "not attached",
            Self::Floor => "kernel floor (empty probes, attached as dogslow attaches)",
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

/// One turn of a configuration during the pgbench run.
struct Turn {
    config: usize,
    /// Realtime ns: attached (or, for not attached, the turn began) ...
    from_ns: u64,
    /// ... and detached.
    to_ns: u64,
}

/// Waits until pgbench's backends exist; their PIDs. The set must be
/// exactly one per client and the same on two looks 100 ms apart, so that a
/// backend of an earlier connection that is still exiting is not taken.
fn wait_for_backends(postmaster: u32, pgbench: &mut Proc) -> Result<Vec<u32>> {
    let mut previous = Vec::new();
    for _ in 0..100 {
        let mut found = backends(postmaster);
        found.sort_unstable();
        if found.len() == CLIENTS && found == previous {
            return Ok(found);
        }
        if !pgbench.is_running() {
            break;
        }
        previous = found;
        proc::sleep(Duration::from_millis(100))?;
    }
    bail!(
        "did not find pgbench's {CLIENTS} backends (last saw {}; {})",
        previous.len(),
        pgbench.why()
    )
}

/// The order of turns: not attached before and after every other
/// configuration's turn, the others in an order rotated per cycle.
fn schedule(cycles: usize) -> Vec<usize> {
    let others = configs().len() - 1;
    let mut order = vec![0];
    for cycle in 0..cycles {
        for offset in 0..others {
            order.push(1 + (cycle + offset) % others);
            order.push(0);
        }
    }
    order
}

/// Per configuration, the throughput of each of its turns and, for all but
/// not attached, each turn's ratio (%) to the mean of the not-attached
/// turns right before and after it.
struct Measured {
    tps: Vec<Vec<f64>>,
    ratios: Vec<Vec<f64>>,
    /// dogslow's own CPU during each of its turns, % of a core.
    agent_cpu: Vec<f64>,
}

/// One long pgbench run during which the configurations take `SEGMENT`
/// turns; a turn's throughput is the mean of the progress seconds that fell
/// wholly inside it.
fn measure(bench: &Bench, pg: &PgInstall, cluster: &mut Cluster) -> Result<Measured> {
    let configs = configs();
    let order = schedule(bench.settings.pg_cycles);
    // Long enough for every turn and its attaching; stopped after the last.
    let total =
        (SETTLE + SEGMENT + Duration::from_secs(3)) * order.len() as u32 + Duration::from_secs(30);
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
    // Let connections settle before the first turn.
    proc::sleep(Duration::from_secs(1))?;
    let mut turns = Vec::new();
    let mut agent_cpu = Vec::new();
    for &config in &order {
        let attached = attach(bench, configs[config], &postgres, &backends)
            .with_context(|| configs[config].name())?;
        // Start-up work (dogslow warms its caches for every process it
        // finds) is a one-off; the turn measures the steady state after it.
        proc::sleep(SETTLE)?;
        let agent_pid = match &attached {
            Attached::Dogslow(agent) => Some(agent.pid()),
            _ => None,
        };
        let cpu_before = agent_pid.map(proc::cpu_ns).transpose()?;
        let from_ns = proc::realtime_ns();
        proc::sleep(SEGMENT)?;
        let to_ns = proc::realtime_ns();
        if let (Some(pid), Some(before)) = (agent_pid, cpu_before) {
            let used = proc::cpu_ns(pid)?.saturating_sub(before) as f64;
            agent_cpu.push(used / (to_ns - from_ns) as f64 * 100.0);
        }
        attached.detach().with_context(|| configs[config].name())?;
        if !pgbench.is_running() {
            bail!("pgbench ended early: {}", pgbench.why());
        }
        turns.push(Turn {
            config,
            from_ns,
            to_ns,
        });
    }
    pgbench.stop(Duration::from_secs(10));
    // "progress: 1795756529.868 s, 12345.6 tps, lat 0.321 ms stddev 0.100, 0 failed"
    // (--progress-timestamp): the second that ended at that wall-clock time.
    let seconds: Vec<(u64, f64)> = pgbench
        .stderr
        .snapshot()
        .iter()
        .filter_map(|l| {
            let mut fields = l.text.strip_prefix("progress: ")?.split(", ");
            let end_s: f64 = fields.next()?.trim_end_matches(" s").parse().ok()?;
            let tps: f64 = fields.next()?.trim_end_matches(" tps").parse().ok()?;
            Some(((end_s * 1e9) as u64, tps))
        })
        .collect();
    let mut turn_tps = Vec::with_capacity(turns.len());
    for (index, turn) in turns.iter().enumerate() {
        let inside: Vec<f64> = seconds
            .iter()
            .filter(|(end, _)| {
                end.saturating_sub(1_000_000_000) >= turn.from_ns && *end <= turn.to_ns
            })
            .map(|(_, tps)| *tps)
            .collect();
        if inside.is_empty() {
            bail!(
                "no whole progress second inside turn {} ({})",
                index + 1,
                configs[turn.config].name()
            );
        }
        turn_tps.push(inside.iter().sum::<f64>() / inside.len() as f64);
    }
    let mut measured = Measured {
        tps: vec![Vec::new(); configs.len()],
        ratios: vec![Vec::new(); configs.len()],
        agent_cpu,
    };
    for (index, turn) in turns.iter().enumerate() {
        measured.tps[turn.config].push(turn_tps[index]);
        if turn.config != 0 {
            // schedule() puts a not-attached turn on both sides.
            let around = (turn_tps[index - 1] + turn_tps[index + 1]) / 2.0;
            measured.ratios[turn.config].push(turn_tps[index] / around * 100.0);
        }
    }
    Ok(measured)
}

pub fn run(bench: &Bench) -> Result<Section> {
    let pg = find_install()?;
    let mut cluster = Cluster::start(&pg)?;
    let settings = &bench.settings;
    let measured = measure(bench, &pg, &mut cluster)?;
    drop(cluster);
    let ratio = |config: usize| Summary::of(&measured.ratios[config]);
    let mut section = Section::new(TITLE);
    let postgres = pg.bin.join("postgres");
    section.method = vec![
        format!(
            "A throwaway PostgreSQL cluster (Unix socket only, `fsync=off`; the server pinned \
             to CPU 0 and pgbench to CPU 1, since the scheduler's placement otherwise swings \
             throughput between two levels), scale {SCALE}; one \
             `pgbench -S` (select-only) run with {CLIENTS} clients and {THREADS} threads, \
             progress every second. While it runs, configurations take turns of {} s: the \
             kernel floor (the empty program on the same probes, attached through {}){} and \
             dogslow, each turn with a not-attached turn right before and after it \
             (no request here is late, so dogslow's stall sampler stays off); \
             {} cycles, order rotated per cycle. A turn's throughput is the mean of the progress \
             seconds wholly inside it, measured from {} s after attaching (start-up work is a \
             one-off) to detaching; its ratio is to the mean of the two not-attached turns \
             around it, so the drift of a shared machine cancels as far as it can.",
            SEGMENT.as_secs(),
            PROBE_FORM.floor_attach(),
            if PROBE_FORM.per_backend() {
                ", the same empty program through uprobe_multi links"
            } else {
                ""
            },
            settings.pg_cycles,
            SETTLE.as_secs()
        ),
        format!("Measured form: dogslow watches {}.", PROBE_FORM.describe()),
    ];
    section.commands = vec![
        format!(
            "initdb -U postgres --auth=trust -D DIR; postgres -D DIR -k SOCKET -p PORT -c listen_addresses= -c fsync=off; pgbench -i -q -s {SCALE} bench"
        ),
        format!(
            "pgbench -h SOCKET -p PORT -U postgres -S -n -c {CLIENTS} -j {THREADS} -T {} -P 1 --progress-timestamp bench",
            ((SETTLE + SEGMENT + Duration::from_secs(3))
                * (settings.pg_cycles * 2 * (configs().len() - 1) + 1) as u32)
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
        &[
            "configuration",
            "transactions/s",
            "% of the not-attached turns around it",
            "dogslow's own CPU, % of a core",
        ],
    );
    let configs = configs();
    for (index, config) in configs.iter().enumerate() {
        table.row(vec![
            config.name().to_owned(),
            show(Summary::of(&measured.tps[index]), 0),
            if *config == Config::NotAttached {
                "100".into()
            } else {
                show(ratio(index), 1)
            },
            if *config == Config::Dogslow {
                show(Summary::of(&measured.agent_cpu), 2)
            } else {
                "—".into()
            },
        ]);
    }
    section.tables.push(table);
    let of = |wanted: Config| configs.iter().position(|c| *c == wanted).and_then(&ratio);
    let (floor_ratio, multi_ratio, dogslow) = (
        of(Config::Floor),
        of(Config::FloorMulti),
        of(Config::Dogslow),
    );
    // A verdict needs a machine quiet enough that the not-attached turns
    // agree: on a busy one the server idles and hides any cost.
    let spread = Summary::of(&measured.tps[0]).map(|b| (b.max - b.min) / b.median);
    let quiet = spread.is_some_and(|s| s <= MAX_BASELINE_SPREAD);
    section.checks.push(Check::new(
        "pgbench throughput with dogslow ≥ 95 % of without",
        format!(
            "{} % (floor: {} %){}",
            show(dogslow, 1),
            show(floor_ratio, 1),
            match spread {
                Some(spread) if !quiet => format!(
                    "; too noisy to judge: not-attached turns spread {:.0} % (at most {:.0} %)",
                    spread * 100.0,
                    MAX_BASELINE_SPREAD * 100.0
                ),
                _ => String::new(),
            }
        ),
        dogslow.filter(|_| quiet).map(|d| d.median >= 95.0),
    ));
    if settings.pg_cycles < 3 {
        section.notes.push(
            "Too few cycles in this run to explain a difference; do not quote these numbers."
                .into(),
        );
    } else if let (Some(dogslow), Some(floor)) = (dogslow, floor_ratio) {
        let baseline = Summary::of(&measured.tps[0]);
        let mut note = format!(
            "Not attached, throughput ranged {} transactions/s between turns (other tenants of \
             the machine; while they hold back pgbench, the server has idle time that absorbs \
             the probes' cost, so a noisy run shows smaller losses than a quiet one). Medians: \
             the kernel floor (empty programs on the same probes, attached as dogslow attaches \
             them) keeps {:.1} %, dogslow {:.1} %.",
            baseline.map_or_else(
                || "n/a".to_owned(),
                |b| format!("{:.0}–{:.0}", b.min, b.max)
            ),
            floor.median,
            dogslow.median
        );
        if dogslow.median < 95.0 {
            let probes = 100.0 - floor.median;
            let rest = (100.0 - dogslow.median) - probes.max(0.0);
            let rest_text = if rest.abs() < 1.0 {
                "nothing measurable is left for dogslow's programs and agent beyond that".to_owned()
            } else if rest > 0.0 {
                format!(
                    "the remaining {rest:.1} are dogslow's own work: its request bookkeeping at \
                     each probe hit and its sched_switch program at every context switch (the \
                     agent itself uses the CPU in the last column)"
                )
            } else {
                format!("the two overlap or are noisy by {:.1}", -rest)
            };
            note.push_str(&format!(
                " **Below 95 %:** of the {:.1} points lost, the probes themselves (what any tool \
                 attaching the same way pays: two uprobe hits per query on a server whose \
                 select-only queries take a few microseconds) account for {probes:.1}; \
                 {rest_text}.",
                100.0 - dogslow.median
            ));
        }
        if let Some(multi) = multi_ratio.filter(|m| m.median > floor.median + 1.0) {
            let strength = if multi.min > floor.max {
                "every uprobe_multi turn beat every perf-event turn"
            } else {
                "indicative: their turns' ranges overlap"
            };
            note.push_str(&format!(
                " Through uprobe_multi links the same empty probes lose {:.1} points instead of \
                 {:.1}: the attach mechanism accounts for {:.1} ({strength}; item 4 shows its \
                 per-switch side). aya 0.14 attaches uprobes only through perf events; creating \
                 uprobe_multi links directly (BPF_LINK_CREATE with BPF_TRACE_UPROBE_MULTI, \
                 kernel 6.6+, as this bench's floor does) would avoid it.",
                100.0 - multi.median,
                100.0 - floor.median,
                multi.median - floor.median
            ));
        }
        if dogslow.max >= floor.median && dogslow.median < floor.median {
            note.push_str(&format!(
                " dogslow's turns ranged {:.1}–{:.1} %, across the floor's median: read the \
                 split as indicative, not exact.",
                dogslow.min, dogslow.max
            ));
        }
        section.notes.push(note);
    }
    Ok(section)
}
