//! What /proc says about target processes: identity, parentage, namespaces,
//! cgroup and memory mappings.
use std::{
    fs,
    io::{self, Read as _},
    os::unix::fs::FileExt as _,
    path::{Path, PathBuf},
};

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ProcError {
    #[error("no process with PID {pid} (it is not running, or /proc is not this PID namespace's)")]
    NoSuchProcess { pid: u32 },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is malformed: {what}")]
    Malformed { path: PathBuf, what: &'static str },
}

/// Identity of a process as reports show it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcessInfo {
    pub pid: u32,
    pub ppid: u32,
    /// The process's `comm` (its main thread's name).
    pub comm: String,
    /// The executable, as the host sees it.
    pub exe: String,
    /// PID inside the process's own PID namespace, when it differs.
    pub ns_pid: Option<u32>,
    /// The process's cgroup v2 path (or the first v1 hierarchy's).
    pub cgroup: Option<String>,
    /// Its container and pod, when it runs in one.
    pub kube: crate::kube::KubeContext,
    /// Start time in clock ticks since boot: with the PID, a unique identity.
    pub start_ticks: u64,
}

fn proc_path(pid: u32, rest: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/{rest}"))
}

fn read_to_string(path: &Path, pid: u32) -> Result<String, ProcError> {
    fs::read_to_string(path).map_err(|source| {
        if source.kind() == io::ErrorKind::NotFound || source.raw_os_error() == Some(libc::ESRCH) {
            ProcError::NoSuchProcess { pid }
        } else {
            ProcError::Read {
                path: path.to_owned(),
                source,
            }
        }
    })
}

/// True when `pid` is a live process (not a zombie waiting to be reaped).
pub fn process_exists(pid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(proc_path(pid, "stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

/// Reads `pid`'s identity from /proc.
pub fn process_info(pid: u32) -> Result<ProcessInfo, ProcError> {
    let stat_path = proc_path(pid, "stat");
    let stat = read_to_string(&stat_path, pid)?;
    let (ppid, start_ticks) = parse_stat(&stat).ok_or(ProcError::Malformed {
        path: stat_path,
        what: "unexpected stat layout",
    })?;
    let comm = read_to_string(&proc_path(pid, "comm"), pid)?
        .trim_end()
        .to_owned();
    let exe = fs::read_link(proc_path(pid, "exe"))
        .map(|path| path.to_string_lossy().into_owned())
        .unwrap_or_default();
    let status = read_to_string(&proc_path(pid, "status"), pid)?;
    let ns_pid = namespace_id(&status, "NSpid:").filter(|&ns| ns != pid);
    let cgroup_text = fs::read_to_string(proc_path(pid, "cgroup")).unwrap_or_default();
    let cgroup = parse_cgroup(&cgroup_text);
    let kube = crate::kube::context(pid, &cgroup_text);
    Ok(ProcessInfo {
        pid,
        ppid,
        comm,
        exe,
        ns_pid,
        cgroup,
        kube,
        start_ticks,
    })
}

/// The process's start time in clock ticks since boot (with the PID, an
/// identity that survives PID reuse), from /proc/PID/stat alone.
pub fn start_ticks(pid: u32) -> Option<u64> {
    let stat = fs::read_to_string(proc_path(pid, "stat")).ok()?;
    parse_stat(&stat).map(|(_, start)| start)
}

/// The text of `path` if it is a regular file of at most `limit` bytes.
/// For files another party controls (a container's): a FIFO, a device or a
/// huge file there must not block or exhaust the agent.
pub fn read_small_file(path: &Path, limit: u64) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .ok()?;
    let metadata = file.metadata().ok()?;
    if !metadata.is_file() || metadata.len() > limit {
        return None;
    }
    let mut text = String::new();
    file.take(limit).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The thread's id inside its PID namespace, when it differs from `tid`.
pub fn thread_ns_tid(pid: u32, tid: u32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")).ok()?;
    namespace_id(&status, "NSpid:").filter(|&ns| ns != tid)
}

/// (ppid, starttime) from /proc/PID/stat. The comm field may hold spaces
/// and parentheses, so fields are counted from the last ')'.
fn parse_stat(stat: &str) -> Option<(u32, u64)> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = after_comm.split_whitespace().collect();
    // fields[0] is state (field 3); ppid is field 4, starttime field 22.
    let ppid = fields.get(1)?.parse().ok()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some((ppid, start_ticks))
}

/// The innermost id on a `NSpid:`-style line of /proc/PID/status.
fn namespace_id(status: &str, key: &str) -> Option<u32> {
    status
        .lines()
        .find_map(|line| line.strip_prefix(key))
        .and_then(|ids| ids.split_whitespace().last())
        .and_then(|id| id.parse().ok())
}

/// The cgroup v2 path ("0::/path"); on hybrid hosts where that is just
/// "/", the first v1 hierarchy's more specific path.
fn parse_cgroup(text: &str) -> Option<String> {
    let mut unified = None;
    let mut specific = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(_controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" {
            unified = Some(path.to_owned());
        } else if path != "/" {
            specific.get_or_insert_with(|| path.to_owned());
        }
    }
    match unified {
        Some(path) if path != "/" => Some(path),
        unified => specific.or(unified),
    }
}

/// One line of /proc/PID/maps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub executable: bool,
    /// File offset of `start`.
    pub offset: u64,
    pub dev: u64,
    pub inode: u64,
    /// The path as the process sees it, or a pseudo name like `[vdso]`.
    pub path: String,
}

impl Mapping {
    /// A mapping of a regular file (not anonymous, not a pseudo mapping).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.starts_with('/')
    }
}

/// Reads and parses /proc/PID/maps.
pub fn maps(pid: u32) -> Result<Vec<Mapping>, ProcError> {
    let path = proc_path(pid, "maps");
    let text = read_to_string(&path, pid)?;
    text.lines()
        .map(|line| {
            parse_maps_line(line).ok_or_else(|| ProcError::Malformed {
                path: path.clone(),
                what: "unexpected maps line",
            })
        })
        .collect()
}

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?;
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().unwrap_or("").trim_start().to_owned();
    let (start, end) = range.split_once('-')?;
    let (major, minor) = dev.split_once(':')?;
    let major = u64::from_str_radix(major, 16).ok()?;
    let minor = u64::from_str_radix(minor, 16).ok()?;
    Some(Mapping {
        start: u64::from_str_radix(start, 16).ok()?,
        end: u64::from_str_radix(end, 16).ok()?,
        readable: perms.as_bytes().first() == Some(&b'r'),
        executable: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        // The same encoding as `libc::makedev`, so it compares with stat's st_dev.
        dev: libc::makedev(major as u32, minor as u32),
        inode: inode.parse().ok()?,
        path: path.strip_suffix(" (deleted)").unwrap_or(&path).to_owned(),
    })
}

/// A path under which the host can open a file that `pid` sees as `path`,
/// even from another mount namespace.
pub fn path_in_process_root(pid: u32, path: &str) -> PathBuf {
    PathBuf::from(format!("/proc/{pid}/root{path}"))
}

/// Reads `len` bytes of `pid`'s memory at `addr` (the process is not stopped
/// or signalled; needs ptrace read access, which root has).
pub fn read_memory(pid: u32, addr: u64, len: usize) -> io::Result<Vec<u8>> {
    let file = fs::File::open(proc_path(pid, "mem"))?;
    let mut buf = vec![0; len];
    let read = file.read_at(&mut buf, addr)?;
    buf.truncate(read);
    Ok(buf)
}

/// The kernel's boot id, so report ids are unique across hosts and reboots.
pub fn boot_id() -> String {
    let mut text = String::new();
    let _ = fs::File::open("/proc/sys/kernel/random/boot_id")
        .and_then(|mut file| file.read_to_string(&mut text));
    text.trim().to_owned()
}

/// The node's name: `$NODE_NAME` when set (Kubernetes), else the host name
/// of the UTS namespace dogslow runs in.
pub fn host_name() -> String {
    // In a DaemonSet the pod has a hostname of its own; the manifest passes
    // the node's name through the downward API.
    if let Some(node) = std::env::var("NODE_NAME").ok().filter(|n| !n.is_empty()) {
        return node;
    }
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_files_only() {
        let dir = std::env::temp_dir().join(format!("dogslow-small-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let text = dir.join("namespace");
        fs::write(&text, "default\n").unwrap();
        assert_eq!(read_small_file(&text, 4096).as_deref(), Some("default\n"));
        assert_eq!(read_small_file(&text, 4), None, "larger than the limit");
        // A FIFO must not block, a device must not be read forever.
        let fifo = dir.join("fifo");
        let path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        assert_eq!(read_small_file(&fifo, 4096), None);
        let zero = dir.join("zero");
        std::os::unix::fs::symlink("/dev/zero", &zero).unwrap();
        assert_eq!(read_small_file(&zero, 4096), None);
        assert_eq!(read_small_file(&dir.join("missing"), 4096), None);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn stat_with_spaces_and_parens_in_comm() {
        let stat = "1234 (my (odd) name) S 77 1234 1234 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 555 1000 10";
        assert_eq!(parse_stat(stat), Some((77, 555)));
    }

    #[test]
    fn maps_line_with_path_and_without() {
        let line = "7f0000001000-7f0000002000 r-xp 00001000 fd:01 123456     /usr/lib/libc.so.6";
        let mapping = parse_maps_line(line).unwrap();
        assert_eq!(mapping.start, 0x7f0000001000);
        assert_eq!(mapping.end, 0x7f0000002000);
        assert!(mapping.executable);
        assert_eq!(mapping.offset, 0x1000);
        assert_eq!(mapping.inode, 123456);
        assert_eq!(mapping.path, "/usr/lib/libc.so.6");
        assert!(mapping.is_file());

        let anon = parse_maps_line("7ffd0000-7ffd1000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(anon.path, "");
        assert!(!anon.is_file());
        let vdso = parse_maps_line("7ffd0000-7ffd2000 r-xp 00000000 00:00 0   [vdso]").unwrap();
        assert_eq!(vdso.path, "[vdso]");
    }

    #[test]
    fn nspid_takes_the_innermost() {
        let status = "Name:\tx\nNSpid:\t4242\t7\n";
        assert_eq!(namespace_id(status, "NSpid:"), Some(7));
    }

    #[test]
    fn cgroup_prefers_v2() {
        assert_eq!(
            parse_cgroup("1:cpu:/v1\n0::/kubepods/pod1/abc\n"),
            Some("/kubepods/pod1/abc".to_owned())
        );
        assert_eq!(parse_cgroup("3:memory:/x\n"), Some("/x".to_owned()));
        assert_eq!(
            parse_cgroup("4:pids:/kubepods/p/c\n0::/\n"),
            Some("/kubepods/p/c".to_owned())
        );
        assert_eq!(parse_cgroup("4:pids:/\n0::/\n"), Some("/".to_owned()));
    }

    #[test]
    fn own_process_is_readable() {
        let info = process_info(std::process::id()).unwrap();
        assert_eq!(info.pid, std::process::id());
        assert!(!info.exe.is_empty());
        assert!(
            maps(std::process::id())
                .unwrap()
                .iter()
                .any(Mapping::is_file)
        );
    }
}
