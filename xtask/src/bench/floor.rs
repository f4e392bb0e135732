//! The kernel floor: an empty BPF program (`r0 = 0; exit`) on a uprobe and a
//! uretprobe (or two uprobes), attached exactly the way aya 0.14 attaches
//! dogslow's request probes: a `perf_event_open` on the uprobe PMU scoped to
//! the process, then a BPF perf link. What it costs is what any eBPF tool
//! pays per request before its program does any work.
//!
//! The same empty program can also be attached with a `uprobe_multi` link
//! (kernel 6.6+), which aya 0.14 cannot create: no perf event, so none of
//! perf's per-task scheduling work at the watched threads' context switches.
use std::{
    ffi::CString,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use anyhow::{Context as _, Result, bail};
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _};

/// A symbol's file offset and its first bytes.
#[derive(Clone, Debug)]
pub struct Function {
    pub file_offset: u64,
    pub first_bytes: Vec<u8>,
}

/// Finds function `name` (symtab, then dynsym) in the ELF file `path`.
pub fn function(path: &Path, name: &str) -> Result<Function> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("{} is not an ELF file", path.display()))?;
    let symbol = file
        .symbols()
        .chain(file.dynamic_symbols())
        .find(|s| s.name() == Ok(name) && s.address() != 0)
        .with_context(|| format!("no function `{name}` in {}", path.display()))?;
    let vaddr = symbol.address();
    let file_offset = file
        .segments()
        .find_map(|segment| {
            let (offset, size) = segment.file_range();
            let start = segment.address();
            (vaddr >= start && vaddr < start + size).then(|| vaddr - start + offset)
        })
        .with_context(|| format!("`{name}` is in no loadable segment of {}", path.display()))?;
    let at = file_offset as usize;
    let first_bytes = bytes.get(at..at + 8).unwrap_or_default().to_vec();
    Ok(Function {
        file_offset,
        first_bytes,
    })
}

/// A USDT probe's location and semaphore, as file offsets.
#[derive(Clone, Copy, Debug)]
pub struct UsdtProbe {
    pub file_offset: u64,
    /// The semaphore the probe's code tests, which the kernel raises while
    /// the probe is attached (`ref_ctr_offset`); 0 when it has none.
    pub semaphore_offset: u64,
}

/// Finds USDT probe `provider:name` in the `.note.stapsdt` of `path`.
pub fn usdt(path: &Path, provider: &str, name: &str) -> Result<UsdtProbe> {
    use object::ObjectSection as _;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let file = object::File::parse(&*bytes)
        .with_context(|| format!("{} is not an ELF file", path.display()))?;
    let notes = file
        .section_by_name(".note.stapsdt")
        .and_then(|s| s.data().ok())
        .with_context(|| format!("{} has no USDT probes", path.display()))?;
    // Probes record the link-time address of .stapsdt.base; prelinking may move it.
    let base_now = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let to_offset = |vaddr: u64| {
        file.segments().find_map(|segment| {
            let (offset, size) = segment.file_range();
            let start = segment.address();
            (vaddr >= start && vaddr < start + size).then(|| vaddr - start + offset)
        })
    };
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(notes.get(at..at + 8)?.try_into().ok()?))
    };
    let mut at = 0usize;
    while at + 12 <= notes.len() {
        let field = |i: usize| -> usize {
            u32::from_le_bytes(notes[at + i..at + i + 4].try_into().unwrap_or([0; 4])) as usize
        };
        let (name_size, desc_size, note_type) = (field(0), field(4), field(8));
        let desc_at = at + 12 + name_size.next_multiple_of(4);
        let next = desc_at + desc_size.next_multiple_of(4);
        if note_type == 3 && desc_size > 24 && desc_at + desc_size <= notes.len() {
            let strings = &notes[desc_at + 24..desc_at + desc_size];
            let mut parts = strings.split(|b| *b == 0);
            let (found_provider, found_name) = (parts.next(), parts.next());
            if found_provider == Some(provider.as_bytes()) && found_name == Some(name.as_bytes()) {
                let (Some(pc), Some(base), Some(semaphore)) =
                    (word(desc_at), word(desc_at + 8), word(desc_at + 16))
                else {
                    break;
                };
                let pc = match base_now {
                    Some(now) if base != 0 => pc.wrapping_add(now).wrapping_sub(base),
                    _ => pc,
                };
                return Ok(UsdtProbe {
                    file_offset: to_offset(pc).context("USDT probe outside any segment")?,
                    semaphore_offset: if semaphore == 0 {
                        0
                    } else {
                        to_offset(semaphore).context("USDT semaphore outside any segment")?
                    },
                });
            }
        }
        at = next;
    }
    bail!("no USDT probe {provider}:{name} in {}", path.display())
}

/// Which kind of probe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Entry,
    Return,
}

/// One probe for the floor: where, which kind, and the USDT semaphore (0: none).
#[derive(Clone, Copy, Debug)]
pub struct Probe {
    pub file_offset: u64,
    pub kind: Kind,
    pub semaphore_offset: u64,
}

impl Probe {
    pub fn entry(file_offset: u64) -> Self {
        Self {
            file_offset,
            kind: Kind::Entry,
            semaphore_offset: 0,
        }
    }

    pub fn ret(file_offset: u64) -> Self {
        Self {
            file_offset,
            kind: Kind::Return,
            semaphore_offset: 0,
        }
    }

    pub fn usdt(probe: UsdtProbe) -> Self {
        Self {
            file_offset: probe.file_offset,
            kind: Kind::Entry,
            semaphore_offset: probe.semaphore_offset,
        }
    }
}

/// How the empty program is attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mechanism {
    /// `perf_event_open` (uprobe PMU, per process) + BPF perf link: aya's way.
    PerfEvent,
    /// A `BPF_TRACE_UPROBE_MULTI` link filtered to the process.
    UprobeMulti,
}

/// Attached empty probes; detached when dropped (closing the fds).
pub struct FloorProbes {
    _links: Vec<OwnedFd>,
    _events: Vec<OwnedFd>,
    _program: OwnedFd,
}

const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_PROG_TYPE_KPROBE: u32 = 2;
/// `perf_event_attr.freq`: sample_freq instead of sample_period.
const BPF_PERF_EVENT: u32 = 41;
const BPF_TRACE_UPROBE_MULTI: u32 = 48;
const BPF_F_UPROBE_MULTI_RETURN: u32 = 1;
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 8;

fn bpf(command: libc::c_long, attr: &mut [u8]) -> std::io::Result<OwnedFd> {
    // SAFETY: attr is a zero-initialized bpf_attr of the size we pass, with
    // every pointer in it alive for the call.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr.as_mut_ptr(), attr.len()) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn put_u32(buf: &mut [u8], at: usize, value: u32) {
    buf[at..at + 4].copy_from_slice(&value.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, value: u64) {
    buf[at..at + 8].copy_from_slice(&value.to_ne_bytes());
}

/// Loads `r0 = 0; exit` as a kprobe-type program (what uprobes run).
fn load_empty_program(expected_attach_type: u32) -> Result<OwnedFd> {
    load_empty(BPF_PROG_TYPE_KPROBE, expected_attach_type)
}

fn load_empty(program_type: u32, expected_attach_type: u32) -> Result<OwnedFd> {
    // mov64 r0, 0 ; exit
    let instructions: [u8; 16] = [0xb7, 0, 0, 0, 0, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0];
    let license = c"GPL";
    let mut attr = [0u8; 128];
    put_u32(&mut attr, 0, program_type); // prog_type
    put_u32(&mut attr, 4, 2); // insn_cnt
    put_u64(&mut attr, 8, instructions.as_ptr() as u64); // insns
    put_u64(&mut attr, 16, license.as_ptr() as u64); // license
    attr[48..59].copy_from_slice(b"bench_floor"); // prog_name
    put_u32(&mut attr, 68, expected_attach_type);
    bpf(BPF_PROG_LOAD, &mut attr).context("loading the empty floor program (BPF_PROG_LOAD)")
}

fn sysfs_number(path: &str) -> Result<u64> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    let digits = text.trim().trim_start_matches("config:");
    digits
        .parse()
        .with_context(|| format!("{path} holds `{}`, not a number", text.trim()))
}

/// Attaches the empty program at each probe of `binary`, in process `pid`
/// only or, with `None`, in every process (as aya does: pid -1, CPU 0).
pub fn attach(
    mechanism: Mechanism,
    binary: &Path,
    probes: &[Probe],
    pid: Option<u32>,
) -> Result<FloorProbes> {
    if mechanism == Mechanism::UprobeMulti {
        return attach_multi(binary, probes, pid);
    }
    let program = load_empty_program(0)?;
    let pmu_type = sysfs_number("/sys/bus/event_source/devices/uprobe/type")?;
    let retprobe_bit = sysfs_number("/sys/bus/event_source/devices/uprobe/format/retprobe")?;
    let path = CString::new(binary.as_os_str().as_encoded_bytes())?;
    let mut events = Vec::new();
    let mut links = Vec::new();
    let (pid, cpu) = match pid {
        Some(pid) => (pid as libc::pid_t, -1),
        None => (-1, 0),
    };
    for probe in probes {
        let offset = probe.file_offset;
        let mut config = 0u64;
        if probe.kind == Kind::Return {
            config |= 1 << retprobe_bit;
        }
        if probe.semaphore_offset != 0 {
            // The uprobe PMU's `ref_ctr_offset` is config:32-63.
            config |= probe.semaphore_offset << 32;
        }
        let mut attr = [0u8; 128];
        put_u32(&mut attr, 0, pmu_type as u32); // type
        put_u32(&mut attr, 4, 128); // size (PERF_ATTR_SIZE_VER7)
        put_u64(&mut attr, 8, config);
        put_u64(&mut attr, 56, path.as_ptr() as u64); // config1: uprobe_path
        put_u64(&mut attr, 64, offset); // config2: probe_offset
        // SAFETY: attr is a perf_event_attr of the size it declares; the path
        // outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_perf_event_open,
                attr.as_ptr(),
                pid,
                cpu as libc::c_int,
                -1 as libc::c_int,
                PERF_FLAG_FD_CLOEXEC,
            )
        };
        if fd < 0 {
            bail!(
                "perf_event_open of a uprobe on {} at {offset:#x}: {}",
                binary.display(),
                std::io::Error::last_os_error()
            );
        }
        // SAFETY: a new fd that nothing else owns.
        let event = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let mut link_attr = [0u8; 64];
        put_u32(&mut link_attr, 0, fd_raw(&program)); // prog_fd
        put_u32(&mut link_attr, 4, fd_raw(&event)); // target_fd
        put_u32(&mut link_attr, 8, BPF_PERF_EVENT); // attach_type
        let link = bpf(BPF_LINK_CREATE, &mut link_attr)
            .context("linking the floor program to its uprobe (BPF_LINK_CREATE)")?;
        events.push(event);
        links.push(link);
    }
    Ok(FloorProbes {
        _links: links,
        _events: events,
        _program: program,
    })
}

/// One `uprobe_multi` link for the entries and one for the returns.
fn attach_multi(binary: &Path, probes: &[Probe], pid: Option<u32>) -> Result<FloorProbes> {
    let program = load_empty_program(BPF_TRACE_UPROBE_MULTI)?;
    let path = CString::new(binary.as_os_str().as_encoded_bytes())?;
    let mut links = Vec::new();
    for kind in [Kind::Entry, Kind::Return] {
        let chosen: Vec<&Probe> = probes.iter().filter(|p| p.kind == kind).collect();
        if chosen.is_empty() {
            continue;
        }
        let offsets: Vec<u64> = chosen.iter().map(|p| p.file_offset).collect();
        let ref_ctrs: Vec<u64> = chosen.iter().map(|p| p.semaphore_offset).collect();
        let mut attr = [0u8; 64];
        put_u32(&mut attr, 0, fd_raw(&program)); // prog_fd
        put_u32(&mut attr, 8, BPF_TRACE_UPROBE_MULTI); // attach_type
        if kind == Kind::Return {
            put_u32(&mut attr, 52, BPF_F_UPROBE_MULTI_RETURN); // .flags
        }
        put_u64(&mut attr, 16, path.as_ptr() as u64); // uprobe_multi.path
        put_u64(&mut attr, 24, offsets.as_ptr() as u64); // .offsets
        if ref_ctrs.iter().any(|r| *r != 0) {
            put_u64(&mut attr, 32, ref_ctrs.as_ptr() as u64); // .ref_ctr_offsets
        }
        put_u32(&mut attr, 48, offsets.len() as u32); // .cnt
        put_u32(&mut attr, 56, pid.unwrap_or(0)); // .pid (0: every process)
        links.push(
            bpf(BPF_LINK_CREATE, &mut attr)
                .context("creating a uprobe_multi link for the floor (BPF_LINK_CREATE)")?,
        );
    }
    Ok(FloorProbes {
        _links: links,
        _events: Vec::new(),
        _program: program,
    })
}

fn fd_raw(fd: &OwnedFd) -> u32 {
    use std::os::fd::AsRawFd as _;
    fd.as_raw_fd() as u32
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_functions() {
        let exe = std::env::current_exe().unwrap();
        let found = function(&exe, "main").unwrap();
        assert!(found.file_offset > 0);
        assert!(function(&exe, "no_such_function_here").is_err());
    }

    /// PostgreSQL's USDT probe sites are single-byte NOPs guarded by
    /// semaphores; skipped only where PostgreSQL is not installed.
    #[test]
    fn finds_postgres_usdt_probes() {
        let Some(postgres) = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|mut versions| versions.find_map(|v| v.ok()))
            .map(|v| v.path().join("bin/postgres"))
            .filter(|p| p.exists())
        else {
            eprintln!("skipped: PostgreSQL is not installed");
            return;
        };
        let bytes = std::fs::read(&postgres).unwrap();
        for name in ["query__start", "query__done"] {
            let probe = usdt(&postgres, "postgresql", name).unwrap();
            assert_eq!(bytes[probe.file_offset as usize], 0x90, "{name}");
            assert!(probe.semaphore_offset > 0 && (probe.semaphore_offset as usize) < bytes.len());
        }
        assert!(usdt(&postgres, "postgresql", "no__such__probe").is_err());
    }
}
