//! Uprobes with a reference counter: the attach path for USDT probes that
//! have a semaphore.
//!
//! A program like PostgreSQL only builds a probe's arguments while the
//! probe's semaphore is non-zero; the kernel increments it in every process
//! the uprobe is installed in (running ones and those that map the binary
//! later) when the uprobe is opened with the semaphore's file offset as its
//! `ref_ctr_offset`, and decrements it when the uprobe goes. aya 0.14 cannot
//! pass that offset, so this opens the uprobe PMU event itself with
//! `perf_event_open` and attaches an already-loaded program to it with a BPF
//! link carrying the attach cookie. The returned handle owns both file
//! descriptors: dropping it, or dogslow exiting in any way, closes them, and
//! the kernel then removes the probe and releases the semaphore.
use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{AsFd as _, AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use thiserror::Error;

/// Where the kernel describes the uprobe PMU.
const UPROBE_PMU_DIR: &str = "/sys/bus/event_source/devices/uprobe";

/// `perf_event_open(2)` flag: close the event on exec.
const PERF_FLAG_FD_CLOEXEC: libc::c_ulong = 1 << 3;
/// `_IO('$', 0)`.
const PERF_EVENT_IOC_ENABLE: u64 = 0x2400;
/// `_IOW('$', 8, __u32)`.
const PERF_EVENT_IOC_SET_BPF: u64 = 0x4004_2408;
/// `enum bpf_cmd`: BPF_LINK_CREATE.
const BPF_LINK_CREATE: libc::c_long = 28;
/// `enum bpf_attach_type`: BPF_PERF_EVENT.
const BPF_PERF_EVENT: u32 = 41;
/// The kernel's internal "not supported" errno, which can leak to userspace.
const ENOTSUPP: i32 = 524;

#[derive(Debug, Error)]
pub enum RefCtrError {
    #[error(
        "this kernel has no uprobe PMU ({reason}); dogslow needs a kernel built with \
         CONFIG_UPROBE_EVENTS (4.17 or later)"
    )]
    NoUprobePmu { reason: String },
    #[error(
        "this kernel cannot count USDT semaphores (no {UPROBE_PMU_DIR}/format/ref_ctr_offset: \
         it needs Linux 4.20 or later); probe a function instead of a USDT probe with a semaphore"
    )]
    NoRefCtrSupport,
    #[error("{path} says `{text}`, which is not a perf format field such as `config:32-63`")]
    BadFormat { path: PathBuf, text: String },
    #[error("{what} {value:#x} does not fit in the {bits} bits the uprobe PMU gives it")]
    TooLarge {
        what: &'static str,
        value: u64,
        bits: u32,
    },
    #[error("{path}: a path with a NUL byte cannot be probed")]
    BadPath { path: PathBuf },
    #[error("process {pid} exited while dogslow was attaching to it")]
    ProcessGone { pid: u32 },
    #[error("opening a uprobe on {path} at file offset {offset:#x}: {source}{hint}")]
    Open {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
        hint: &'static str,
    },
    #[error("attaching the eBPF program to the uprobe on {path} at {offset:#x}: {source}")]
    Link {
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error(
        "attaching the eBPF program with a BPF link failed ({source}): kernels before 5.15 \
         have no perf-event links, and without one the target cookie cannot be passed"
    )]
    CookieUnsupported {
        #[source]
        source: io::Error,
    },
    #[error("{what} on the uprobe on {path} at {offset:#x}: {source}")]
    Ioctl {
        what: &'static str,
        path: PathBuf,
        offset: u64,
        #[source]
        source: io::Error,
    },
}

/// Which `perf_event_attr` word a format field lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigWord {
    Config,
    Config1,
    Config2,
}

/// A PMU format field (`config:32-63`): bit ranges of a config word, the
/// value's low bits going into the first range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FormatField {
    pub word: ConfigWord,
    /// Inclusive (low, high) bit ranges.
    pub ranges: Vec<(u32, u32)>,
}

impl FormatField {
    /// Parses a sysfs format file's text (`config:32-63`, `config:0`,
    /// `config1:0-7,16-23`).
    pub fn parse(text: &str) -> Option<Self> {
        let (word, bits) = text.trim().split_once(':')?;
        let word = match word {
            "config" => ConfigWord::Config,
            "config1" => ConfigWord::Config1,
            "config2" => ConfigWord::Config2,
            _ => return None,
        };
        let ranges = bits
            .split(',')
            .map(|range| {
                let (low, high) = match range.split_once('-') {
                    Some((low, high)) => (low.parse().ok()?, high.parse().ok()?),
                    None => {
                        let bit = range.parse().ok()?;
                        (bit, bit)
                    }
                };
                (low <= high && high < 64).then_some((low, high))
            })
            .collect::<Option<Vec<(u32, u32)>>>()?;
        Some(Self { word, ranges })
    }

    /// How many bits the field holds.
    pub fn bits(&self) -> u32 {
        self.ranges.iter().map(|(low, high)| high - low + 1).sum()
    }

    /// `value` spread over the field's bits, or `None` when it does not fit.
    pub fn encode(&self, value: u64) -> Option<u64> {
        let bits = self.bits();
        if bits < 64 && value >> bits != 0 {
            return None;
        }
        let mut rest = value;
        let mut word = 0u64;
        for &(low, high) in &self.ranges {
            let width = high - low + 1;
            let mask = if width == 64 {
                u64::MAX
            } else {
                (1 << width) - 1
            };
            word |= (rest & mask) << low;
            rest = rest.checked_shr(width).unwrap_or(0);
        }
        Some(word)
    }
}

/// The uprobe PMU as this kernel describes it in sysfs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UprobePmu {
    /// `perf_event_attr.type` for uprobes.
    pub pmu_type: u32,
    /// The bit that makes the event a uretprobe.
    pub retprobe: FormatField,
    /// Where `ref_ctr_offset` goes; `None` before Linux 4.20.
    pub ref_ctr_offset: Option<FormatField>,
}

impl UprobePmu {
    /// Reads `/sys/bus/event_source/devices/uprobe`.
    pub fn from_sysfs() -> Result<Self, RefCtrError> {
        Self::from_dir(Path::new(UPROBE_PMU_DIR))
    }

    /// Reads a PMU description laid out like the sysfs one.
    pub fn from_dir(dir: &Path) -> Result<Self, RefCtrError> {
        let read = |path: PathBuf| {
            fs::read_to_string(&path).map_err(|err| RefCtrError::NoUprobePmu {
                reason: format!("{}: {err}", path.display()),
            })
        };
        let type_path = dir.join("type");
        let type_text = read(type_path.clone())?;
        let pmu_type = type_text
            .trim()
            .parse()
            .map_err(|_| RefCtrError::BadFormat {
                path: type_path,
                text: type_text.trim().into(),
            })?;
        let field = |name: &str| -> Result<Option<FormatField>, RefCtrError> {
            let path = dir.join("format").join(name);
            let text = match fs::read_to_string(&path) {
                Ok(text) => text,
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(err) => {
                    return Err(RefCtrError::NoUprobePmu {
                        reason: format!("{}: {err}", path.display()),
                    });
                }
            };
            FormatField::parse(&text)
                .map(Some)
                .ok_or_else(|| RefCtrError::BadFormat {
                    path,
                    text: text.trim().into(),
                })
        };
        let retprobe = field("retprobe")?.ok_or_else(|| RefCtrError::NoUprobePmu {
            reason: format!("{} has no format/retprobe", dir.display()),
        })?;
        Ok(Self {
            pmu_type,
            retprobe,
            ref_ctr_offset: field("ref_ctr_offset")?,
        })
    }

    /// The `perf_event_attr` for `request`.
    fn attr(
        &self,
        request: &UprobeRequest<'_>,
        path: &CString,
    ) -> Result<PerfEventAttr, RefCtrError> {
        let mut words = [0u64; 3];
        let mut set = |field: &FormatField, value: u64, what: &'static str| {
            let encoded = field.encode(value).ok_or(RefCtrError::TooLarge {
                what,
                value,
                bits: field.bits(),
            })?;
            let index = match field.word {
                ConfigWord::Config => 0,
                ConfigWord::Config1 => 1,
                ConfigWord::Config2 => 2,
            };
            words[index] |= encoded;
            Ok::<(), RefCtrError>(())
        };
        if request.kind == UprobeKind::Return {
            set(&self.retprobe, 1, "the retprobe flag")?;
        }
        if let Some(offset) = request.ref_ctr_offset {
            let field = self
                .ref_ctr_offset
                .as_ref()
                .ok_or(RefCtrError::NoRefCtrSupport)?;
            set(field, offset, "the semaphore's file offset")?;
        }
        // For the uprobe PMU, config1 is the path and config2 the offset
        // (uprobe_path / probe_offset in the kernel's union); the format
        // fields above share only `config`.
        if words[1] != 0 || words[2] != 0 {
            return Err(RefCtrError::BadFormat {
                path: PathBuf::from(UPROBE_PMU_DIR).join("format"),
                text: "a field outside `config`".into(),
            });
        }
        Ok(PerfEventAttr {
            type_: self.pmu_type,
            size: size_of::<PerfEventAttr>() as u32,
            config: words[0],
            config1: path.as_ptr() as u64,
            config2: request.file_offset,
            ..PerfEventAttr::default()
        })
    }
}

/// Entry uprobe or uretprobe.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UprobeKind {
    Entry,
    Return,
}

/// Which processes the probe fires in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UprobeScope {
    /// This process only.
    Process(u32),
    /// Every process that maps the file, now and later.
    AllProcesses,
}

/// What to attach where.
#[derive(Clone, Copy, Debug)]
pub struct UprobeRequest<'a> {
    /// The object file; the kernel resolves it (so `/proc/PID/exe` and
    /// `/proc/PID/root/...` paths work).
    pub path: &'a Path,
    /// The probe's file offset.
    pub file_offset: u64,
    /// The semaphore's file offset (`UsdtProbe::semaphore_offset`).
    pub ref_ctr_offset: Option<u64>,
    pub kind: UprobeKind,
    pub scope: UprobeScope,
    /// Read by the program with `bpf_get_attach_cookie`.
    pub cookie: u64,
}

/// How the program was attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttachMethod {
    /// A BPF link (Linux 5.15+), with the cookie.
    Link,
    /// `PERF_EVENT_IOC_SET_BPF` (older kernels), without a cookie.
    Ioctl,
}

/// An attached uprobe. Dropping it detaches the program, removes the probe
/// and releases the semaphore in every process.
#[derive(Debug)]
pub struct RefCtrUprobe {
    // Fields drop in order: the link goes before the event it holds.
    link: Option<OwnedFd>,
    perf_event: OwnedFd,
    method: AttachMethod,
}

impl RefCtrUprobe {
    pub fn method(&self) -> AttachMethod {
        self.method
    }

    /// The uprobe's perf event.
    pub fn perf_event_fd(&self) -> BorrowedFd<'_> {
        self.perf_event.as_fd()
    }

    /// The BPF link, when attached with one.
    pub fn link_fd(&self) -> Option<BorrowedFd<'_>> {
        self.link.as_ref().map(OwnedFd::as_fd)
    }
}

/// Attaches the loaded uprobe program `program` (e.g. from aya's
/// `UProbe::fd()`) as `request` says, with a BPF link carrying the cookie;
/// on kernels without perf-event links, and only when the cookie is 0, with
/// `PERF_EVENT_IOC_SET_BPF`.
pub fn attach(
    program: BorrowedFd<'_>,
    request: &UprobeRequest<'_>,
) -> Result<RefCtrUprobe, RefCtrError> {
    let pmu = UprobePmu::from_sysfs()?;
    let perf_event = open(&pmu, request)?;
    match link_create(program, perf_event.as_fd(), request.cookie) {
        Ok(link) => {
            // Already enabled at open; as libbpf does, make sure.
            let _ = ioctl(perf_event.as_fd(), PERF_EVENT_IOC_ENABLE, 0);
            Ok(RefCtrUprobe {
                link: Some(link),
                perf_event,
                method: AttachMethod::Link,
            })
        }
        Err(source) if link_unsupported(&source) => {
            if request.cookie != 0 {
                return Err(RefCtrError::CookieUnsupported { source });
            }
            set_bpf(program, perf_event, request)
        }
        Err(source) => Err(RefCtrError::Link {
            path: request.path.to_owned(),
            offset: request.file_offset,
            source,
        }),
    }
}

/// Attaches with `PERF_EVENT_IOC_SET_BPF`, the pre-5.15 way: no cookie, so
/// `request.cookie` must be 0. [`attach`] falls back to it by itself.
pub fn attach_with_ioctl(
    program: BorrowedFd<'_>,
    request: &UprobeRequest<'_>,
) -> Result<RefCtrUprobe, RefCtrError> {
    if request.cookie != 0 {
        return Err(RefCtrError::CookieUnsupported {
            source: io::Error::new(
                io::ErrorKind::InvalidInput,
                "PERF_EVENT_IOC_SET_BPF carries no cookie",
            ),
        });
    }
    let pmu = UprobePmu::from_sysfs()?;
    let perf_event = open(&pmu, request)?;
    set_bpf(program, perf_event, request)
}

fn set_bpf(
    program: BorrowedFd<'_>,
    perf_event: OwnedFd,
    request: &UprobeRequest<'_>,
) -> Result<RefCtrUprobe, RefCtrError> {
    let failed = |what, source| RefCtrError::Ioctl {
        what,
        path: request.path.to_owned(),
        offset: request.file_offset,
        source,
    };
    ioctl(
        perf_event.as_fd(),
        PERF_EVENT_IOC_SET_BPF,
        program.as_raw_fd() as u64,
    )
    .map_err(|source| failed("PERF_EVENT_IOC_SET_BPF", source))?;
    ioctl(perf_event.as_fd(), PERF_EVENT_IOC_ENABLE, 0)
        .map_err(|source| failed("PERF_EVENT_IOC_ENABLE", source))?;
    Ok(RefCtrUprobe {
        link: None,
        perf_event,
        method: AttachMethod::Ioctl,
    })
}

/// `struct perf_event_attr` up to `config2` (PERF_ATTR_SIZE_VER1): all a
/// uprobe needs; the kernel zero-fills the rest.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct PerfEventAttr {
    type_: u32,
    size: u32,
    config: u64,
    sample_period: u64,
    sample_type: u64,
    read_format: u64,
    /// The `disabled:1, inherit:1, ...` bit field.
    flags: u64,
    wakeup_events: u32,
    bp_type: u32,
    /// `uprobe_path`: a pointer to the NUL-terminated path.
    config1: u64,
    /// `probe_offset`: the file offset.
    config2: u64,
}
const _: () = assert!(size_of::<PerfEventAttr>() == 72);

/// The `link_create` member of `union bpf_attr`, up to the perf-event cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    bpf_cookie: u64,
}
const _: () = assert!(size_of::<LinkCreateAttr>() == 24);

fn open(pmu: &UprobePmu, request: &UprobeRequest<'_>) -> Result<OwnedFd, RefCtrError> {
    let path =
        CString::new(request.path.as_os_str().as_bytes()).map_err(|_| RefCtrError::BadPath {
            path: request.path.to_owned(),
        })?;
    let attr = pmu.attr(request, &path)?;
    // A process-wide event may follow its task onto any CPU; an event for
    // every process must name a CPU, and for a uprobe any one will do: the
    // program runs on whichever CPU the probed thread hits the probe.
    let (pid, cpu): (libc::pid_t, libc::c_int) = match request.scope {
        UprobeScope::Process(pid) => (pid as libc::pid_t, -1),
        UprobeScope::AllProcesses => (-1, 0),
    };
    // SAFETY: `attr` is a properly sized, initialized perf_event_attr whose
    // `size` says how much the kernel may read; `config1` points into
    // `path`, which outlives the call. The returned value is checked.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_perf_event_open,
            &attr as *const PerfEventAttr,
            pid,
            cpu,
            -1 as libc::c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    if fd < 0 {
        let source = io::Error::last_os_error();
        if let UprobeScope::Process(pid) = request.scope
            && (source.raw_os_error() == Some(libc::ESRCH) || !crate::procfs::process_exists(pid))
        {
            return Err(RefCtrError::ProcessGone { pid });
        }
        let hint = match source.raw_os_error() {
            Some(libc::EINVAL) if request.ref_ctr_offset.is_some() => {
                "; the kernel refuses a second uprobe at the same place with a different \
                 semaphore offset (another tracer may hold one), and offsets that are not at \
                 an instruction"
            }
            Some(libc::EINVAL) => "; the offset may not be at an instruction boundary",
            Some(libc::EACCES | libc::EPERM) => {
                "; the kernel lets only root or CAP_SYS_ADMIN create uprobes (CAP_PERFMON \
                 and CAP_BPF are not enough): run it with sudo"
            }
            Some(libc::ENOENT) => "; the file does not exist (in dogslow's mount namespace)",
            _ => "",
        };
        return Err(RefCtrError::Open {
            path: request.path.to_owned(),
            offset: request.file_offset,
            source,
            hint,
        });
    }
    // SAFETY: perf_event_open returned a new file descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn link_create(
    program: BorrowedFd<'_>,
    perf_event: BorrowedFd<'_>,
    cookie: u64,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: program.as_raw_fd() as u32,
        target_fd: perf_event.as_raw_fd() as u32,
        attach_type: BPF_PERF_EVENT,
        flags: 0,
        bpf_cookie: cookie,
    };
    // SAFETY: `attr` is a prefix of `union bpf_attr` for BPF_LINK_CREATE
    // with its exact size passed; the kernel zero-fills the rest and only
    // reads it. Both fds are borrowed for the duration of the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            &attr as *const LinkCreateAttr,
            size_of::<LinkCreateAttr>() as libc::c_uint,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: BPF_LINK_CREATE returned a new file descriptor that nothing
    // else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

/// Errors by which an older kernel says it has no perf-event BPF links.
fn link_unsupported(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EINVAL | libc::EOPNOTSUPP | libc::E2BIG | ENOTSUPP)
    )
}

fn ioctl(fd: BorrowedFd<'_>, request: u64, arg: u64) -> io::Result<()> {
    // SAFETY: both perf ioctls used here take an integer argument by value
    // and `fd` is a live perf event borrowed for the call.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), request as _, arg) };
    if result < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format_fields() {
        assert_eq!(
            FormatField::parse("config:32-63\n"),
            Some(FormatField {
                word: ConfigWord::Config,
                ranges: vec![(32, 63)]
            })
        );
        assert_eq!(
            FormatField::parse("config:0"),
            Some(FormatField {
                word: ConfigWord::Config,
                ranges: vec![(0, 0)]
            })
        );
        assert_eq!(
            FormatField::parse("config1:0-7,16-23").map(|f| (f.word, f.bits())),
            Some((ConfigWord::Config1, 16))
        );
        for bad in [
            "",
            "config",
            "config:",
            "config:a-b",
            "config:9-3",
            "config:0-64",
            "cfg:1",
        ] {
            assert_eq!(FormatField::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn values_go_into_their_bits() {
        let ref_ctr = FormatField::parse("config:32-63").unwrap();
        assert_eq!(ref_ctr.encode(0x885918), Some(0x885918 << 32));
        assert_eq!(ref_ctr.encode(0xffff_ffff), Some(0xffff_ffff << 32));
        assert_eq!(ref_ctr.encode(1 << 32), None, "33 bits do not fit");
        let retprobe = FormatField::parse("config:0").unwrap();
        assert_eq!(retprobe.encode(1), Some(1));
        assert_eq!(retprobe.encode(2), None);
        let split = FormatField::parse("config:0-3,8-11").unwrap();
        assert_eq!(split.encode(0xab), Some(0xa0b));
        let whole = FormatField::parse("config:0-63").unwrap();
        assert_eq!(whole.encode(u64::MAX), Some(u64::MAX));
    }

    fn pmu_dir(name: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dogslow-pmu-{name}-{}", std::process::id()));
        fs::create_dir_all(dir.join("format")).unwrap();
        for (file, text) in files {
            fs::write(dir.join(file), text).unwrap();
        }
        dir
    }

    #[test]
    fn attr_for_an_entry_probe_with_a_semaphore_and_a_retprobe() {
        let dir = pmu_dir(
            "full",
            &[
                ("type", "8\n"),
                ("format/retprobe", "config:0\n"),
                ("format/ref_ctr_offset", "config:32-63\n"),
            ],
        );
        let pmu = UprobePmu::from_dir(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(pmu.pmu_type, 8);
        let path = CString::new("/usr/bin/x").unwrap();
        let mut request = UprobeRequest {
            path: Path::new("/usr/bin/x"),
            file_offset: 0x471d7c,
            ref_ctr_offset: Some(0x88596e),
            kind: UprobeKind::Entry,
            scope: UprobeScope::AllProcesses,
            cookie: 3,
        };
        let attr = pmu.attr(&request, &path).unwrap();
        assert_eq!(attr.type_, 8);
        assert_eq!(attr.size, 72);
        assert_eq!(attr.config, 0x88596e << 32);
        assert_eq!(attr.config1, path.as_ptr() as u64);
        assert_eq!(attr.config2, 0x471d7c);
        request.kind = UprobeKind::Return;
        request.ref_ctr_offset = None;
        assert_eq!(pmu.attr(&request, &path).unwrap().config, 1);
        request.ref_ctr_offset = Some(1 << 40);
        let err = pmu.attr(&request, &path).unwrap_err().to_string();
        assert!(err.contains("does not fit in the 32 bits"), "{err}");
    }

    #[test]
    fn old_kernels_without_ref_ctr_are_told_apart() {
        let dir = pmu_dir("old", &[("type", "7"), ("format/retprobe", "config:0")]);
        let pmu = UprobePmu::from_dir(&dir).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(pmu.ref_ctr_offset, None);
        let request = UprobeRequest {
            path: Path::new("/x"),
            file_offset: 0x10,
            ref_ctr_offset: Some(0x20),
            kind: UprobeKind::Entry,
            scope: UprobeScope::Process(1),
            cookie: 0,
        };
        let path = CString::new("/x").unwrap();
        let err = pmu.attr(&request, &path).unwrap_err();
        assert!(matches!(err, RefCtrError::NoRefCtrSupport), "{err}");
        assert!(err.to_string().contains("4.20"));

        let missing = std::env::temp_dir().join("dogslow-pmu-none");
        let err = UprobePmu::from_dir(&missing).unwrap_err().to_string();
        assert!(err.contains("no uprobe PMU"), "{err}");
        let garbled = pmu_dir("garbled", &[("type", "8"), ("format/retprobe", "bits 0")]);
        let err = UprobePmu::from_dir(&garbled).unwrap_err().to_string();
        fs::remove_dir_all(&garbled).unwrap();
        assert!(err.contains("not a perf format field"), "{err}");
    }

    #[test]
    fn this_kernels_uprobe_pmu() {
        let pmu = UprobePmu::from_sysfs().unwrap();
        assert!(pmu.ref_ctr_offset.is_some(), "kernel 6.x counts semaphores");
        assert_eq!(pmu.retprobe.bits(), 1);
    }
}
