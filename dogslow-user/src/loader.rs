//! Loading the embedded eBPF object and attaching its programs: the fixed
//! ones (scheduler and exit tracepoints, the cpu-clock sampler, the off-CPU
//! task iterator) at load, the request probes per target as they are found.
use std::{
    io::{self, Read as _},
    num::NonZeroU32,
    os::fd::{AsFd as _, BorrowedFd},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{Array, HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, Iter, PerfEvent, ProgramError, UProbe,
        perf_event::{
            PerfEventConfig, PerfEventLinkId, PerfEventScope, SamplePolicy, SoftwareEvent,
        },
        uprobe::{UProbeAttachLocation, UProbeAttachPoint, UProbeLinkId, UProbeScope},
    },
};
use dogslow_common::{
    CaptureSettings, Inflight, KernelOffsets, MAX_TARGETS, RequestArgs, TargetConfig, stat,
    tid_slots,
};
use thiserror::Error;

use crate::{
    kernel_btf,
    refctr_uprobe::{self, RefCtrError, RefCtrUprobe, UprobeKind, UprobeRequest},
    targets::AttachPoint,
};

/// The eBPF object, built by build.rs and embedded: one self-contained binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dogslow"));

#[derive(Debug, Error)]
pub enum LoadError {
    #[error(transparent)]
    Btf(#[from] kernel_btf::BtfError),
    #[error("loading the eBPF programs failed: {source}{hint}")]
    Load {
        #[source]
        source: aya::EbpfError,
        hint: &'static str,
    },
    #[error("eBPF program `{program}`: {source}")]
    Program {
        program: &'static str,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map `{map}` is missing or has the wrong type: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("cannot list online CPUs for the sampler: {0}")]
    Cpus(String),
}

#[derive(Debug, Error)]
pub enum AttachError {
    #[error("process {pid} exited while dogslow was attaching to it")]
    ProcessGone { pid: u32 },
    #[error("attaching a uprobe to {path} at file offset {offset:#x}: {source}")]
    Uprobe {
        path: String,
        offset: u64,
        #[source]
        source: ProgramError,
    },
    #[error(transparent)]
    RefCtr(#[from] RefCtrError),
    #[error("{0}")]
    Program(String),
    #[error(
        "too many targets: dogslow drives at most {MAX_TARGETS} (each USDT probe site with its own argument layout counts)"
    )]
    TooManyTargets,
    #[error("writing the target table: {0}")]
    Map(#[from] aya::maps::MapError),
}

#[derive(Debug, Error)]
pub enum CaptureError {
    #[error("running the off-CPU capture iterator: {0}")]
    Program(#[from] ProgramError),
    #[error("reading the off-CPU capture iterator: {0}")]
    Read(#[from] io::Error),
    #[error("creating the off-CPU capture iterator: {0}")]
    Link(#[from] aya::programs::links::LinkError),
}

/// The kernel's `kernel.pid_max`: thread ids are below it. If unreadable,
/// the largest it can be.
fn pid_max() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/pid_max")
        .ok()
        .and_then(|text| text.trim().parse().ok())
        .unwrap_or(4_194_304)
}

/// Which request probe program a uprobe runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeRole {
    /// Request start (uprobe on the entry function or USDT probe).
    Entry,
    /// Function-scoped request end (uretprobe on the entry function).
    Return,
    /// Exit-scoped request end (uprobe on the exit function or USDT probe).
    Exit,
}

impl ProbeRole {
    fn program(self) -> &'static str {
        match self {
            Self::Entry => "request_entry",
            Self::Return => "request_return",
            Self::Exit => "request_exit",
        }
    }
}

/// A uprobe attachment, to detach when its process or binary goes away.
#[derive(Debug)]
pub enum UprobeLink {
    /// Attached through aya.
    Aya { role: ProbeRole, id: UProbeLinkId },
    /// Attached with a USDT semaphore (detaches when dropped).
    RefCtr(RefCtrUprobe),
}

/// Settings fixed at load time.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub max_inflight: u32,
    pub user_stack_bytes: u32,
    pub sample_hz: u64,
}

/// The loaded object. Dropping it detaches every program: nothing is left
/// in the kernel (no pinning), even when the agent is killed.
pub struct Probes {
    ebpf: Ebpf,
    max_inflight: u32,
    sample_hz: u64,
    cpus: Vec<u32>,
    /// The sampler's per-CPU events while it runs (see `set_sampling`).
    sampling: Vec<PerfEventLinkId>,
}

const TRACEPOINTS: [(&str, &str); 3] = [
    ("sched_switch", "sched_switch"),
    ("thread_exit", "sched_process_exit"),
    ("thread_exec", "sched_process_exec"),
];

impl Probes {
    /// Loads the object, then attaches the scheduler tracepoints, the
    /// sampler on every online CPU and prepares the off-CPU iterator.
    pub fn load(options: &LoadOptions) -> Result<Self, LoadError> {
        let offsets: KernelOffsets = kernel_btf::kernel_offsets()?;
        let settings = CaptureSettings {
            user_stack_bytes: options.user_stack_bytes,
            _pad: 0,
        };
        let btf = Btf::from_sys_fs().map_err(|err| {
            LoadError::Btf(kernel_btf::BtfError::Unavailable {
                reason: err.to_string(),
            })
        })?;
        let mut ebpf = EbpfLoader::new()
            .btf(Some(&btf))
            .map_max_entries("INFLIGHT", options.max_inflight)
            .map_max_entries("REQUEST_ARGS", options.max_inflight)
            .map_max_entries("TRACKED_TIDS", tid_slots(pid_max()))
            .override_global("OFFSETS", &offsets, true)
            .override_global("SETTINGS", &settings, true)
            .load(OBJECT)
            .map_err(|source| {
                let hint = if is_permission_error(&source) {
                    "; dogslow needs root, or CAP_SYS_ADMIN, CAP_SYS_PTRACE, \
                     CAP_DAC_READ_SEARCH and CAP_SYSLOG: run it with sudo"
                } else {
                    ""
                };
                LoadError::Load { source, hint }
            })?;

        for role in [ProbeRole::Entry, ProbeRole::Return, ProbeRole::Exit] {
            uprobe(&mut ebpf, role.program())?
                .load()
                .map_err(|source| LoadError::Program {
                    program: role.program(),
                    source,
                })?;
        }
        for (program, tracepoint) in TRACEPOINTS {
            let prog: &mut BtfTracePoint = program_mut(&mut ebpf, program)?;
            prog.load(tracepoint, &btf)
                .and_then(|()| prog.attach().map(drop))
                .map_err(|source| LoadError::Program { program, source })?;
        }

        let sampler: &mut PerfEvent = program_mut(&mut ebpf, "stall_sampler")?;
        sampler.load().map_err(|source| LoadError::Program {
            program: "stall_sampler",
            source,
        })?;
        let cpus = aya::util::online_cpus()
            .map_err(|(what, err)| LoadError::Cpus(format!("{what}: {err}")))?;

        let iter: &mut Iter = program_mut(&mut ebpf, "capture_off_cpu")?;
        iter.load("task", &btf)
            .map_err(|source| LoadError::Program {
                program: "capture_off_cpu",
                source,
            })?;
        Ok(Self {
            ebpf,
            max_inflight: options.max_inflight,
            sample_hz: options.sample_hz,
            cpus,
            sampling: Vec::new(),
        })
    }

    /// Runs the cpu-clock sampler on every CPU, or stops it. It only has
    /// work while some request is past its deadline and not yet captured
    /// (a thread stalled on a CPU), and sampling every CPU at 99 Hz costs a
    /// busy server several percent, so the agent turns it on at the first
    /// overdue deadline and off when every overdue request is captured.
    pub fn set_sampling(&mut self, on: bool) -> Result<(), LoadError> {
        if on == self.sampling() {
            return Ok(());
        }
        let sampler: &mut PerfEvent = program_mut(&mut self.ebpf, "stall_sampler")?;
        let error = |source| LoadError::Program {
            program: "stall_sampler",
            source,
        };
        if !on {
            for link in self.sampling.drain(..) {
                sampler.detach(link).map_err(error)?;
            }
            return Ok(());
        }
        for &cpu in &self.cpus {
            let link = sampler
                .attach(
                    PerfEventConfig::Software(SoftwareEvent::CpuClock),
                    PerfEventScope::AllProcessesOneCpu { cpu },
                    SamplePolicy::Frequency(self.sample_hz),
                    false,
                )
                .map_err(error)?;
            self.sampling.push(link);
        }
        Ok(())
    }

    /// Whether the sampler runs now.
    pub fn sampling(&self) -> bool {
        !self.sampling.is_empty()
    }

    /// Writes target `index`'s timeout and flags.
    pub fn set_target(&mut self, index: u32, config: TargetConfig) -> Result<(), AttachError> {
        if index >= MAX_TARGETS {
            return Err(AttachError::TooManyTargets);
        }
        let map = self
            .ebpf
            .map_mut("TARGETS")
            .ok_or(aya::maps::MapError::InvalidName {
                name: "TARGETS".into(),
            })?;
        let mut targets: Array<&mut MapData, TargetConfig> = Array::try_from(map)?;
        targets.set(index, config, 0)?;
        Ok(())
    }

    /// Attaches request probe `role` at `point`, in process `pid` only or,
    /// with `None`, in every process that maps the file. `cookie` is what the
    /// entry program reads as its target slot.
    pub fn attach_uprobe(
        &mut self,
        role: ProbeRole,
        point: &AttachPoint,
        pid: Option<u32>,
        cookie: u32,
    ) -> Result<UprobeLink, AttachError> {
        if point.ref_ctr_offset.is_some() {
            // USDT probes with a semaphore: the kernel raises it while the
            // probe exists, in every process, and lowers it when it goes.
            let request = UprobeRequest {
                path: &point.path,
                file_offset: point.file_offset,
                ref_ctr_offset: point.ref_ctr_offset,
                kind: match role {
                    ProbeRole::Return => UprobeKind::Return,
                    ProbeRole::Entry | ProbeRole::Exit => UprobeKind::Entry,
                },
                scope: match pid {
                    Some(pid) => refctr_uprobe::UprobeScope::Process(pid),
                    None => refctr_uprobe::UprobeScope::AllProcesses,
                },
                cookie: u64::from(cookie),
            };
            let program = self
                .program_fd(role)
                .map_err(|err| AttachError::Program(err.to_string()))?;
            return refctr_uprobe::attach(program, &request)
                .map(UprobeLink::RefCtr)
                .map_err(|err| match err {
                    RefCtrError::ProcessGone { pid } => AttachError::ProcessGone { pid },
                    other => AttachError::RefCtr(other),
                });
        }
        let path = point.path.as_path();
        let file_offset = point.file_offset;
        let target = cookie;
        let scope = match pid.and_then(NonZeroU32::new) {
            Some(pid) => UProbeScope::OneProcess(pid),
            None => UProbeScope::AllProcesses,
        };
        let program =
            uprobe(&mut self.ebpf, role.program()).map_err(|err| AttachError::Uprobe {
                path: path.display().to_string(),
                offset: file_offset,
                source: match err {
                    LoadError::Program { source, .. } => source,
                    other => ProgramError::IOError(io::Error::other(other.to_string())),
                },
            })?;
        let point = UProbeAttachPoint {
            location: UProbeAttachLocation::AbsoluteOffset(file_offset),
            cookie: Some(u64::from(target)),
        };
        match program.attach(point, path, scope) {
            Ok(id) => Ok(UprobeLink::Aya { role, id }),
            Err(source) => {
                if let Some(pid) = pid
                    && !crate::procfs::process_exists(pid)
                {
                    return Err(AttachError::ProcessGone { pid });
                }
                Err(AttachError::Uprobe {
                    path: path.display().to_string(),
                    offset: file_offset,
                    source,
                })
            }
        }
    }

    /// The loaded request program for `role`, for attachments made outside
    /// aya (`refctr_uprobe`: uprobes that hold a USDT semaphore).
    pub fn program_fd(&self, role: ProbeRole) -> Result<BorrowedFd<'_>, LoadError> {
        let program = self
            .ebpf
            .program(role.program())
            .ok_or(LoadError::Program {
                program: role.program(),
                source: ProgramError::NotLoaded,
            })?;
        program
            .fd()
            .map(|fd| fd.as_fd())
            .map_err(|source| LoadError::Program {
                program: role.program(),
                source,
            })
    }

    /// Detaches a uprobe (its process is gone, or the agent reloads).
    pub fn detach_uprobe(&mut self, link: UprobeLink) {
        match link {
            UprobeLink::Aya { role, id } => {
                if let Ok(program) = uprobe(&mut self.ebpf, role.program()) {
                    let _ = program.detach(id);
                }
            }
            UprobeLink::RefCtr(probe) => drop(probe),
        }
    }

    /// Runs the off-CPU capture iterator over every task once; captures
    /// arrive on the ring buffer.
    pub fn capture_off_cpu(&mut self) -> Result<(), CaptureError> {
        let iter: &mut Iter =
            program_mut(&mut self.ebpf, "capture_off_cpu").map_err(|_| ProgramError::NotLoaded)?;
        let link_id = iter.attach()?;
        let link = iter.take_link(link_id)?;
        let mut file = link.into_file()?;
        let mut sink = Vec::new();
        file.read_to_end(&mut sink)?;
        Ok(())
    }

    /// The ring buffer of stall and completion records (taken once).
    pub fn take_events(&mut self) -> Result<RingBuf<MapData>, LoadError> {
        let map = self.ebpf.take_map("EVENTS").ok_or(LoadError::Map {
            map: "EVENTS",
            source: aya::maps::MapError::InvalidName {
                name: "EVENTS".into(),
            },
        })?;
        RingBuf::try_from(map).map_err(|source| LoadError::Map {
            map: "EVENTS",
            source,
        })
    }

    /// Forgets the in-flight requests that came through `slots` (their
    /// target was removed, so their ends are no longer probed).
    pub fn forget_requests(&mut self, slots: &[u32]) {
        let stale: Vec<u32> = self
            .inflight()
            .into_iter()
            .filter(|(_, request)| slots.contains(&request.target))
            .map(|(tid, _)| tid)
            .collect();
        if let Some(map) = self.ebpf.map_mut("INFLIGHT")
            && let Ok(mut requests) = HashMap::<&mut MapData, u32, Inflight>::try_from(map)
        {
            for tid in &stale {
                let _ = requests.remove(tid);
            }
        }
        if let Some(map) = self.ebpf.map_mut("REQUEST_ARGS")
            && let Ok(mut args) = HashMap::<&mut MapData, u32, RequestArgs>::try_from(map)
        {
            for tid in &stale {
                let _ = args.remove(tid);
            }
        }
    }

    /// Number of entries `INFLIGHT` can hold.
    pub fn inflight_capacity(&self) -> u32 {
        self.max_inflight
    }

    /// A snapshot of every request in flight: (tid, entry).
    pub fn inflight(&self) -> Vec<(u32, Inflight)> {
        let Some(map) = self.ebpf.map("INFLIGHT") else {
            return Vec::new();
        };
        let Ok(inflight) = HashMap::<&MapData, u32, Inflight>::try_from(map) else {
            return Vec::new();
        };
        // Idle entries (threads between requests) are not requests.
        inflight
            .iter()
            .filter_map(Result::ok)
            .filter(|(_, request)| request.start_ns != 0)
            .collect()
    }

    /// The kernel-side counters, summed over CPUs (see `dogslow_common::stat`).
    pub fn stats(&self) -> [u64; stat::COUNT as usize] {
        let mut totals = [0u64; stat::COUNT as usize];
        let Some(map) = self.ebpf.map("STATS") else {
            return totals;
        };
        let Ok(stats) = PerCpuArray::<&MapData, u64>::try_from(map) else {
            return totals;
        };
        for (index, total) in totals.iter_mut().enumerate() {
            if let Ok(per_cpu) = stats.get(&(index as u32), 0) {
                *total = per_cpu.iter().sum();
            }
        }
        totals
    }
}

fn program_mut<'a, T>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut T, LoadError>
where
    &'a mut T: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program = ebpf.program_mut(name).ok_or(LoadError::Program {
        program: name,
        source: ProgramError::NotLoaded,
    })?;
    program.try_into().map_err(|source| LoadError::Program {
        program: name,
        source,
    })
}

fn uprobe<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut UProbe, LoadError> {
    program_mut(ebpf, name)
}

fn is_permission_error(err: &aya::EbpfError) -> bool {
    let text = format!("{err:?}");
    text.contains("PermissionDenied")
        || text.contains("EPERM")
        || text.contains("Operation not permitted")
}
