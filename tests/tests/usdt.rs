//! Issue 6 building blocks: USDT probes guarded by a semaphore fire while
//! dogslow holds them, in processes already running and in new ones, and
//! the semaphore is released when dogslow lets go; `dogslow probes` lists
//! what a binary or a process offers.
use std::{
    io::Write as _,
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use dogslow::{
    elf::ElfImage,
    loader::{LoadOptions, ProbeRole, Probes},
    procfs,
    refctr_uprobe::{
        self, AttachMethod, RefCtrError, RefCtrUprobe, UprobeKind, UprobeRequest, UprobeScope,
    },
    usdt::{self, UsdtProbe},
};
use dogslow_common::{Inflight, TargetConfig, stat};
use dogslow_tests::*;

/// The target index the tests attach with: the entry program reads it as
/// its attach cookie.
const COOKIE: u32 = 7;

/// `usdt_requests`, serving one request per `tick`.
struct UsdtProcess {
    target: Target,
    semaphore_address: u64,
    ticks: u64,
}

/// What one `tick` reported.
#[derive(Debug, PartialEq, Eq)]
struct Tick {
    guarded: u64,
    semaphore: u16,
}

impl UsdtProcess {
    fn spawn(args: &[&str]) -> Self {
        let target = Target::spawn_command(Command::new(target_bin("usdt_requests")).args(args));
        let ready = target
            .stdout
            .wait_for(Duration::from_secs(10), |line| line.starts_with("ready "))
            .expect("usdt_requests did not start");
        let address = ready
            .strip_prefix("ready semaphore=0x")
            .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
            .unwrap_or_else(|| panic!("bad ready line: {ready}"));
        Self {
            target,
            semaphore_address: address,
            ticks: 0,
        }
    }

    fn pid(&self) -> u32 {
        self.target.pid()
    }

    /// Serves one request; returns what the program saw.
    fn tick(&mut self) -> Tick {
        self.ticks += 1;
        let stdin = self.target.child.stdin.as_mut().unwrap();
        stdin.write_all(b"tick\n").unwrap();
        stdin.flush().unwrap();
        let prefix = format!("tick {} ", self.ticks);
        let line = self
            .target
            .stdout
            .wait_for(Duration::from_secs(10), |line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no answer to tick {}", self.ticks));
        let field = |name: &str| -> u64 {
            line.split_whitespace()
                .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
                .and_then(|value| value.parse().ok())
                .unwrap_or_else(|| panic!("no {name} in {line}"))
        };
        Tick {
            guarded: field("guarded"),
            semaphore: field("semaphore") as u16,
        }
    }

    /// The semaphore as the live process has it.
    fn semaphore(&self) -> u16 {
        let mut bytes = [0u8; 2];
        std::fs::File::open(format!("/proc/{}/mem", self.pid()))
            .unwrap()
            .read_exact_at(&mut bytes, self.semaphore_address)
            .unwrap();
        u16::from_ne_bytes(bytes)
    }

    /// Waits up to a second for the semaphore to read `want`.
    fn semaphore_becomes(&self, want: u16) -> u16 {
        let until = Instant::now() + Duration::from_secs(1);
        loop {
            let value = self.semaphore();
            if value == want || Instant::now() > until {
                return value;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The run-time address of file offset `offset` of the executable.
    fn address_of(&self, offset: u64) -> u64 {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid())).unwrap();
        procfs::maps(self.pid())
            .unwrap()
            .into_iter()
            .find(|m| {
                Path::new(&m.path) == exe
                    && m.offset <= offset
                    && offset < m.offset + (m.end - m.start)
            })
            .map(|m| m.start + (offset - m.offset))
            .unwrap_or_else(|| panic!("file offset {offset:#x} is not mapped"))
    }

    /// The live byte at file offset `offset`: 0xCC while a uprobe is there.
    fn live_byte(&self, offset: u64) -> u8 {
        let mut byte = [0u8; 1];
        std::fs::File::open(format!("/proc/{}/mem", self.pid()))
            .unwrap()
            .read_exact_at(&mut byte, self.address_of(offset))
            .unwrap();
        byte[0]
    }

    fn exe_path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/{}/exe", self.pid()))
    }
}

fn binary() -> PathBuf {
    target_bin("usdt_requests")
}

fn probe(name: &str) -> Vec<UsdtProbe> {
    let image = ElfImage::open(&binary()).unwrap();
    usdt::find_probes(&image, "dogslow_test", name).unwrap()
}

/// The agent's real eBPF object, with target `COOKIE` set to a deadline
/// no test reaches.
fn load() -> Probes {
    require_root();
    let mut probes = Probes::load(&LoadOptions {
        max_inflight: 1024,
        user_stack_bytes: 4096,
        sample_hz: 1,
    })
    .unwrap_or_else(|err| panic!("loading dogslow's eBPF object: {err}"));
    for index in [0, COOKIE] {
        probes
            .set_target(
                index,
                TargetConfig {
                    timeout_ns: 3_600_000_000_000,
                    flags: 0,
                    capture_count: 0,
                    captures: Default::default(),
                },
            )
            .unwrap();
    }
    probes
}

fn attach_entry(
    probes: &Probes,
    path: &Path,
    probe: &UsdtProbe,
    scope: UprobeScope,
) -> RefCtrUprobe {
    refctr_uprobe::attach(
        probes.program_fd(ProbeRole::Entry).unwrap(),
        &UprobeRequest {
            path,
            file_offset: probe.file_offset,
            ref_ctr_offset: probe.semaphore_offset,
            kind: UprobeKind::Entry,
            scope,
            cookie: u64::from(COOKIE),
        },
    )
    .unwrap_or_else(|err| panic!("attaching {}: {err}", probe.qualified_name()))
}

fn started(probes: &Probes) -> u64 {
    probes.stats()[stat::REQUESTS_STARTED as usize]
}

/// The in-flight request of thread `tid`, as the entry program recorded it.
fn inflight(probes: &Probes, tid: u32) -> Option<Inflight> {
    probes
        .inflight()
        .into_iter()
        .find_map(|(thread, entry)| (thread == tid).then_some(entry))
}

#[test]
fn semaphore_probe_fires_while_attached_and_is_released_on_drop() {
    let probes = load();
    let start = &probe("request__start")[0];
    let semaphore_offset = start
        .semaphore_offset
        .expect("request__start has a semaphore");
    let mut process = UsdtProcess::spawn(&[]);
    // usdt.rs found the semaphore where the program has it.
    assert_eq!(
        process.address_of(semaphore_offset),
        process.semaphore_address,
        "semaphore file offset {semaphore_offset:#x}"
    );
    assert_eq!(
        process.tick(),
        Tick {
            guarded: 0,
            semaphore: 0
        }
    );
    assert_eq!(process.live_byte(start.file_offset), 0x90, "a nop");

    let exe = process.exe_path();
    let handle = attach_entry(&probes, &exe, start, UprobeScope::Process(process.pid()));
    assert_eq!(handle.method(), AttachMethod::Link);
    assert_eq!(process.semaphore_becomes(1), 1, "held while attached");
    assert_eq!(
        process.live_byte(start.file_offset),
        0xCC,
        "the uprobe's int3"
    );
    let before = started(&probes);
    for expected in 1..=3 {
        assert_eq!(
            process.tick(),
            Tick {
                guarded: expected,
                semaphore: 1
            }
        );
    }
    assert_eq!(
        started(&probes) - before,
        3,
        "the entry program ran once per guarded probe hit"
    );
    let entry = inflight(&probes, process.pid()).expect("the request is in flight");
    assert_eq!(
        entry.target, COOKIE,
        "the attach cookie reached the program"
    );
    assert_eq!(entry.tgid, process.pid());

    drop(handle);
    assert_eq!(process.semaphore_becomes(0), 0, "released on drop");
    assert_eq!(
        process.live_byte(start.file_offset),
        0x90,
        "the nop is back"
    );
    let after = started(&probes);
    assert_eq!(
        process.tick(),
        Tick {
            guarded: 3,
            semaphore: 0
        },
        "the guarded branch no longer runs"
    );
    assert_eq!(started(&probes), after, "nothing fires after detach");
}

#[test]
fn binary_wide_probe_reaches_running_and_new_processes() {
    let probes = load();
    let start = &probe("request__start")[0];
    let mut running = UsdtProcess::spawn(&[]);
    let handle = attach_entry(&probes, &binary(), start, UprobeScope::AllProcesses);
    assert_eq!(running.semaphore_becomes(1), 1, "the running process");

    // Started after the attach: the kernel counts its semaphore when it
    // maps the binary, before main runs.
    let mut fresh = UsdtProcess::spawn(&[]);
    assert_eq!(fresh.semaphore(), 1, "the process started after attach");
    let before = started(&probes);
    assert_eq!(
        fresh.tick(),
        Tick {
            guarded: 1,
            semaphore: 1
        }
    );
    assert_eq!(
        running.tick(),
        Tick {
            guarded: 1,
            semaphore: 1
        }
    );
    assert_eq!(started(&probes) - before, 2);
    for process in [&fresh, &running] {
        let entry = inflight(&probes, process.pid()).expect("request in flight");
        assert_eq!(entry.target, COOKIE);
        assert_eq!(entry.tgid, process.pid());
    }

    drop(handle);
    assert_eq!(fresh.semaphore_becomes(0), 0);
    assert_eq!(running.semaphore_becomes(0), 0);
    assert_eq!(fresh.tick().guarded, 1, "no longer guarded-in");
    // And a process started after the detach starts at 0.
    let late = UsdtProcess::spawn(&[]);
    assert_eq!(late.semaphore(), 0);
}

#[test]
fn uretprobe_bit_makes_a_return_probe() {
    let probes = load();
    let start = &probe("request__start")[0];
    let image = ElfImage::open(&binary()).unwrap();
    let handle_request = image.find_function("handle_request").unwrap();
    let mut process = UsdtProcess::spawn(&[]);
    let scope = UprobeScope::Process(process.pid());
    let exe = process.exe_path();
    let _entry = attach_entry(&probes, &exe, start, scope);

    process.tick();
    assert!(
        inflight(&probes, process.pid()).is_some(),
        "without an end probe the request stays in flight"
    );
    // request_return at handle_request's return ends the request the USDT
    // probe inside it started. As an entry probe it would run before the
    // USDT probe and leave the request in flight.
    let ret = refctr_uprobe::attach(
        probes.program_fd(ProbeRole::Return).unwrap(),
        &UprobeRequest {
            path: &exe,
            file_offset: handle_request.file_offset,
            ref_ctr_offset: None,
            kind: UprobeKind::Return,
            scope,
            cookie: u64::from(COOKIE),
        },
    )
    .unwrap();
    let before = started(&probes);
    process.tick();
    assert_eq!(started(&probes) - before, 1);
    assert_eq!(
        inflight(&probes, process.pid()),
        None,
        "the uretprobe ended the request"
    );
    drop(ret);
    process.tick();
    assert!(inflight(&probes, process.pid()).is_some());
}

#[test]
fn ioctl_attach_works_without_a_cookie() {
    let probes = load();
    let start = &probe("request__start")[0];
    let mut process = UsdtProcess::spawn(&[]);
    let exe = process.exe_path();
    let mut request = UprobeRequest {
        path: &exe,
        file_offset: start.file_offset,
        ref_ctr_offset: start.semaphore_offset,
        kind: UprobeKind::Entry,
        scope: UprobeScope::Process(process.pid()),
        cookie: u64::from(COOKIE),
    };
    let program = probes.program_fd(ProbeRole::Entry).unwrap();
    let err = refctr_uprobe::attach_with_ioctl(program, &request).unwrap_err();
    assert!(
        matches!(err, RefCtrError::CookieUnsupported { .. }),
        "{err}"
    );
    request.cookie = 0;
    let handle = refctr_uprobe::attach_with_ioctl(program, &request).unwrap();
    assert_eq!(handle.method(), AttachMethod::Ioctl);
    assert!(handle.link_fd().is_none());
    assert_eq!(process.semaphore_becomes(1), 1);
    assert_eq!(process.tick().guarded, 1);
    assert_eq!(inflight(&probes, process.pid()).map(|e| e.target), Some(0));
    drop(handle);
    assert_eq!(process.semaphore_becomes(0), 0);
}

#[test]
fn attach_errors_say_what_went_wrong() {
    let probes = load();
    let start = &probe("request__start")[0];
    let program = probes.program_fd(ProbeRole::Entry).unwrap();
    let process = UsdtProcess::spawn(&[]);
    let exe = process.exe_path();
    let first = attach_entry(&probes, &exe, start, UprobeScope::Process(process.pid()));
    // The kernel keeps one semaphore offset per probe location.
    let err = refctr_uprobe::attach(
        program,
        &UprobeRequest {
            path: &exe,
            file_offset: start.file_offset,
            ref_ctr_offset: start.semaphore_offset.map(|offset| offset + 2),
            kind: UprobeKind::Entry,
            scope: UprobeScope::Process(process.pid()),
            cookie: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("different semaphore offset"), "{err}");
    drop(first);
    assert_eq!(process.semaphore_becomes(0), 0);

    // A process that is gone.
    let mut gone = UsdtProcess::spawn(&[]);
    let pid = gone.pid();
    gone.target.child.kill().unwrap();
    gone.target.child.wait().unwrap();
    let err = refctr_uprobe::attach(
        program,
        &UprobeRequest {
            path: &binary(),
            file_offset: start.file_offset,
            ref_ctr_offset: start.semaphore_offset,
            kind: UprobeKind::Entry,
            scope: UprobeScope::Process(pid),
            cookie: 1,
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, RefCtrError::ProcessGone { pid: p } if p == pid),
        "{err}"
    );

    // A file that does not exist.
    let err = refctr_uprobe::attach(
        program,
        &UprobeRequest {
            path: Path::new("/nonexistent/usdt_requests"),
            file_offset: start.file_offset,
            ref_ctr_offset: None,
            kind: UprobeKind::Entry,
            scope: UprobeScope::AllProcesses,
            cookie: 1,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("/nonexistent/usdt_requests"), "{err}");
    assert!(err.contains("does not exist"), "{err}");
}

fn table_rows<'a>(stdout: &'a [String], name: &str) -> Vec<Vec<&'a str>> {
    stdout
        .iter()
        .map(|line| line.split_whitespace().collect::<Vec<_>>())
        .filter(|cells| cells.get(1) == Some(&name))
        .collect()
}

#[test]
fn probes_lists_a_binary() {
    let path = binary();
    let path_text = path.to_str().unwrap();
    let finished = run_dogslow(&["probes", "--binary", path_text]);
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(
        finished.stdout[0].starts_with(&format!("{path_text}: 3 USDT probes")),
        "{:?}",
        finished.stdout
    );
    let start = &probe("request__start")[0];
    let rows = table_rows(&finished.stdout, "request__start");
    assert_eq!(rows.len(), 1, "{:?}", finished.stdout);
    let offset = format!("{:#x}", start.file_offset);
    let semaphore = format!("{:#x}", start.semaphore_offset.unwrap());
    assert_eq!(
        rows[0][..4],
        ["dogslow_test", "request__start", &offset, &semaphore]
    );
    // A USDT site is a `nop`, which uprobes emulate.
    assert_eq!(rows[0][4], "emulated");
    assert_eq!(rows[0][5..].join(" "), start.arg_text);
    assert_eq!(start.arg_count(), 5);
    // Two sites of the probe without a semaphore.
    let done = table_rows(&finished.stdout, "request__done");
    assert_eq!(done.len(), 2);
    assert!(done.iter().all(|row| row[3] == "-"));

    // A filter also lists functions, as --entry takes them.
    let finished = run_dogslow(&["probes", "--binary", path_text, "--filter", "handle_"]);
    assert!(finished.status.success(), "{}", finished.stderr);
    let image = ElfImage::open(&path).unwrap();
    let function = image.find_function("handle_request").unwrap();
    let row = finished
        .stdout
        .iter()
        .find(|line| line.trim_start().starts_with("handle_request "))
        .unwrap_or_else(|| panic!("{:?}", finished.stdout));
    assert_eq!(
        row.split_whitespace().nth(1),
        Some(format!("{:#x}", function.file_offset).as_str())
    );
    assert!(finished.stdout[0].contains("0 USDT probes matching `handle_`"));
}

#[test]
fn probes_lists_a_process_and_its_libraries() {
    let process = UsdtProcess::spawn(&["--dlopen", "libstdc++.so.6"]);
    let pid = process.pid().to_string();
    let finished = run_dogslow(&["probes", "--pid", &pid, "--json"]);
    assert!(finished.status.success(), "{}", finished.stderr);
    let lines = finished.reports();
    let exe = std::fs::read_link(process.exe_path()).unwrap();
    let start = lines
        .iter()
        .find(|line| line["name"] == "request__start")
        .unwrap_or_else(|| panic!("{lines:#?}"));
    assert_eq!(start["probe"], "usdt:dogslow_test:request__start");
    assert_eq!(start["object"], exe.to_str().unwrap());
    assert_eq!(start["arguments"].as_array().unwrap().len(), 5);
    assert!(start["semaphore_offset"].is_string());
    // libstdc++ has `libstdcxx:throw` and friends; they are named through
    // the library.
    let throw = lines
        .iter()
        .find(|line| line["provider"] == "libstdcxx" && line["name"] == "throw")
        .unwrap_or_else(|| panic!("libstdc++'s probes are not listed: {lines:#?}"));
    let object = throw["object"].as_str().unwrap();
    let library = object.rsplit('/').next().unwrap();
    assert!(library.starts_with("libstdc++.so.6"), "{object}");
    assert_eq!(
        throw["probe"],
        format!("usdt:{library}:libstdcxx:throw"),
        "named by the file the process maps"
    );
    // Only objects with probes: libc has none here.
    assert!(lines.iter().all(|line| line["kind"] == "usdt"));
    // And the spec parses back to the library and the probe.
    let spec: dogslow::probe_spec::ProbeSpec = throw["probe"].as_str().unwrap().parse().unwrap();
    assert_eq!(spec.library.as_deref(), Some(library));
}

#[test]
fn probes_rejects_bad_input() {
    let finished = run_dogslow(&["probes", "--pid", "999999999"]);
    assert_eq!(finished.status.code(), Some(1));
    assert!(
        finished.stderr.contains("no process with PID 999999999"),
        "{}",
        finished.stderr
    );
    assert!(finished.stdout.is_empty());
    let script = std::env::temp_dir().join(format!("dogslow-script-{}", std::process::id()));
    std::fs::write(&script, "#!/bin/sh\necho hello\n").unwrap();
    let finished = run_dogslow(&["probes", "--binary", script.to_str().unwrap()]);
    std::fs::remove_file(&script).unwrap();
    assert_eq!(finished.status.code(), Some(1));
    assert!(
        finished
            .stderr
            .contains(&format!("{} is not an ELF", script.display())),
        "{}",
        finished.stderr
    );
    let finished = run_dogslow(&["probes"]);
    assert_eq!(finished.status.code(), Some(2), "clap usage error");
    assert!(finished.stderr.contains("--pid"), "{}", finished.stderr);
}

/// Run by `killed_holder_releases_the_semaphore` in a child process:
/// attaches to `DOGSLOW_HOLD_PID`'s probe, says so, and waits to be killed.
#[test]
#[ignore = "a helper process for killed_holder_releases_the_semaphore"]
fn hold_semaphore_until_killed() {
    let pid: u32 = std::env::var("DOGSLOW_HOLD_PID").unwrap().parse().unwrap();
    let probes = load();
    let start = &probe("request__start")[0];
    let exe = PathBuf::from(format!("/proc/{pid}/exe"));
    let _handle = attach_entry(&probes, &exe, start, UprobeScope::Process(pid));
    println!("holding");
    std::io::stdout().flush().unwrap();
    thread::sleep(Duration::from_secs(120));
}

#[test]
fn killed_holder_releases_the_semaphore() {
    require_root();
    let mut process = UsdtProcess::spawn(&[]);
    let mut holder = Target::spawn_command(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "hold_semaphore_until_killed",
                "--ignored",
                "--nocapture",
            ])
            .env("DOGSLOW_HOLD_PID", process.pid().to_string()),
    );
    holder
        .stdout
        .wait_for(Duration::from_secs(30), |line| line.contains("holding"))
        .expect("the holder did not attach");
    assert_eq!(process.semaphore(), 1);
    assert_eq!(process.tick().guarded, 1);
    // SIGKILL: no destructor runs; the kernel closes the descriptors.
    holder.child.kill().unwrap();
    holder.child.wait().unwrap();
    assert_eq!(process.semaphore_becomes(0), 0, "released by the kernel");
    assert_eq!(process.tick().guarded, 1);
}
