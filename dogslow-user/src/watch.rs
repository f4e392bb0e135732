//! Which processes dogslow watches and the uprobes on them: the processes
//! named with `--pid`, and every process that runs (or maps) a `--binary`
//! file, in any mount namespace, now or started later.
//!
//! A probe in the watched binary itself is attached once per distinct file
//! (uprobes live on the inode, so they fire in every process mapping it,
//! including processes started after the attach). A probe in a library of a
//! watched process (`LIBRARY:FUNCTION`) is attached per process.
use std::{
    collections::{HashMap, HashSet},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
};

use dogslow_common::{CaptureSpec, MAX_CAPTURES, TARGET_FUNCTION_SCOPED, TargetConfig};

use crate::{
    agent::AgentError,
    config::TargetSpec,
    elf::ElfImage,
    loader::{AttachError, ProbeRole, Probes, UprobeLink},
    probe_cost::{self, Handling},
    probe_spec::{ProbeLocation, ProbeSpec},
    procfs::{self, ProcError},
    reporter::{Message, TargetInfo},
    request_args,
    targets::{self, AttachPoint, TargetError},
};

/// A file's identity.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub struct FileId {
    pub dev: u64,
    pub ino: u64,
}

impl FileId {
    fn of(path: &Path) -> Option<Self> {
        let meta = fs::metadata(path).ok()?;
        Some(Self {
            dev: meta.dev(),
            ino: meta.ino(),
        })
    }
}

/// The probes of a target, exit side first: a request must never start
/// whose end could be missed.
fn probe_roles(target: &TargetSpec) -> Vec<(ProbeRole, &ProbeSpec)> {
    let end = match &target.exit {
        Some(exit) => (ProbeRole::Exit, exit),
        None => (ProbeRole::Return, &target.entry),
    };
    vec![end, (ProbeRole::Entry, &target.entry)]
}

pub struct Watcher {
    /// Indexed by target number; `None` for a target a reload removed (the
    /// numbers of the others stay, so their slots and links stay valid).
    targets: Vec<Option<TargetSpec>>,
    /// Binary-wide attachments: (target, file) -> links.
    file_links: HashMap<(u32, FileId), Vec<UprobeLink>>,
    /// The processes found using each attached file, so that a file no
    /// process runs any more (an old version after a redeploy) is let go.
    file_users: HashMap<(u32, FileId), HashSet<u32>>,
    /// Per-process attachments: (target, pid) -> links.
    process_links: HashMap<(u32, u32), Vec<UprobeLink>>,
    /// Processes already examined: pid -> (start time, executable).
    seen: HashMap<u32, (u64, Option<FileId>)>,
    /// Processes found running or mapping a `--binary`.
    matched: HashSet<u32>,
    /// Kernel target slots (attach cookies): a target, and where its
    /// captures are at the entry points that use the slot. A target whose
    /// USDT sites lay their arguments out differently gets a slot per layout.
    slots: Vec<(u32, [CaptureSpec; MAX_CAPTURES])>,
    /// Probe points already noted on stderr as single-stepped: (target,
    /// file offset), so many processes of one binary note it once.
    noted_single_step: HashSet<(u32, u64)>,
    messages: mpsc::SyncSender<Message>,
}

impl Watcher {
    pub fn new(targets: Vec<TargetSpec>, messages: mpsc::SyncSender<Message>) -> Self {
        Self {
            targets: targets.into_iter().map(Some).collect(),
            file_links: HashMap::new(),
            file_users: HashMap::new(),
            process_links: HashMap::new(),
            seen: HashMap::new(),
            matched: HashSet::new(),
            slots: Vec::new(),
            noted_single_step: HashSet::new(),
            messages,
        }
    }

    /// The kernel slot for target `index` with captures laid out as `specs`,
    /// configured (timeout, scope, captures) and announced to the reporter
    /// before any probe can use it.
    fn slot(
        &mut self,
        probes: &mut Probes,
        index: u32,
        specs: [CaptureSpec; MAX_CAPTURES],
    ) -> Result<u32, AgentError> {
        if let Some(slot) = self.slots.iter().position(|s| *s == (index, specs)) {
            return Ok(slot as u32);
        }
        // The slots of targets a reload removed are free again (their probes
        // are detached and their requests forgotten): reuse them, so that
        // reloads cannot run out of the kernel's fixed number.
        let free = self
            .slots
            .iter()
            .position(|(owner, _)| self.target(*owner).is_none());
        let slot = free.unwrap_or(self.slots.len()) as u32;
        let Some(target) = self.target(index) else {
            return Err(AgentError::Unsupported(format!(
                "target {index} was removed"
            )));
        };
        probes.set_target(
            slot,
            TargetConfig {
                timeout_ns: target.timeout.as_nanos().min(u128::from(u64::MAX)) as u64,
                flags: if target.exit.is_none() {
                    TARGET_FUNCTION_SCOPED
                } else {
                    0
                },
                capture_count: target.captures.len() as u32,
                captures: specs,
            },
        )?;
        let _ = self.messages.send(Message::Target(
            slot,
            TargetInfo {
                name: target.name.clone(),
                entry: target.entry.text.clone(),
                timeout: target.timeout,
                captures: target.captures.clone(),
                capture_len: target.capture_len,
            },
        ));
        match free {
            Some(free) => self.slots[free] = (index, specs),
            None => self.slots.push((index, specs)),
        }
        Ok(slot)
    }

    /// Attaches every point of one probe; the entry's cookie is its slot.
    fn attach_points(
        &mut self,
        probes: &mut Probes,
        index: u32,
        role: ProbeRole,
        points: &[AttachPoint],
        pid: Option<u32>,
        links: &mut Vec<UprobeLink>,
    ) -> Result<(), AgentError> {
        let Some(target) = self.target(index).cloned() else {
            return Ok(());
        };
        for point in points {
            check_return_point(&target, role, point)?;
            let cookie = if role == ProbeRole::Entry {
                let specs = targets::capture_specs(point, &target.captures, target.capture_len)
                    .map_err(|source| AgentError::Target {
                        target: target.name.clone(),
                        source,
                    })?;
                self.slot(probes, index, specs)?
            } else {
                0
            };
            links.push(probes.attach_uprobe(role, point, pid, cookie)?);
            if point.instruction.handling == Handling::SingleStepped
                && self.noted_single_step.insert((index, point.file_offset))
            {
                let spec = if role == ProbeRole::Exit {
                    target.exit.as_ref().unwrap_or(&target.entry)
                } else {
                    &target.entry
                };
                let object = match pid {
                    Some(pid) => format!("process {pid}"),
                    None => point.path.display().to_string(),
                };
                eprintln!(
                    "dogslow: {}",
                    probe_cost::single_step_note(&spec.to_string(), &object, &point.instruction)
                );
            }
        }
        Ok(())
    }

    /// Checks what can be checked before the eBPF programs load, so bad
    /// input fails fast: every `--pid` process and every `--binary` that
    /// exists on this host must resolve every probe.
    pub fn validate(&self) -> Result<(), AgentError> {
        validate(self.targets.iter().flatten())
    }

    fn target(&self, index: u32) -> Option<&TargetSpec> {
        self.targets.get(index as usize)?.as_ref()
    }

    /// The live targets with their numbers.
    fn live(&self) -> Vec<(u32, TargetSpec)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(index, target)| Some((index as u32, target.clone()?)))
            .collect()
    }

    /// Attaches to everything there is now: the `--pid` processes (failing
    /// if one is gone), the `--binary` files on this host, and the running
    /// processes of every `--binary`.
    pub fn attach_initial(&mut self, probes: &mut Probes) -> Result<(), AgentError> {
        for (index, target) in self.live() {
            self.attach_target(probes, index, &target)?;
        }
        self.rescan(probes);
        Ok(())
    }

    /// Attaches one target's `--pid` processes and host `--binary` files;
    /// its processes in other namespaces come with the next rescan.
    fn attach_target(
        &mut self,
        probes: &mut Probes,
        index: u32,
        target: &TargetSpec,
    ) -> Result<(), AgentError> {
        for &pid in &target.pids {
            self.attach_process(probes, index, target, pid, true)?;
            // A process that exited during the attach may still have taken
            // the probes as a zombie: that is not a process to watch.
            if !procfs::process_exists(pid) {
                return Err(AttachError::ProcessGone { pid }.into());
            }
        }
        for binary in &target.binaries {
            if let Some(file) = FileId::of(binary) {
                self.attach_file(probes, index, target, binary, file)?;
            } else {
                eprintln!(
                    "dogslow: {} is not on this host; watching for processes that run it in their own mount namespace",
                    binary.display()
                );
            }
        }
        Ok(())
    }

    /// Applies a reloaded configuration: targets whose settings did not
    /// change keep their probes and their requests in flight; removed or
    /// changed ones are detached (their requests forgotten) and new ones
    /// attached. Nothing changes if the new targets do not check out.
    pub fn reload(
        &mut self,
        probes: &mut Probes,
        targets: Vec<TargetSpec>,
    ) -> Result<ReloadSummary, AgentError> {
        validate(&targets)?;
        let mut summary = ReloadSummary::default();
        for (index, old) in self.live() {
            if let Some(new) = targets.iter().find(|new| same_probes(new, &old)) {
                // Its outputs may have changed: the reporter routes by name.
                self.targets[index as usize] = Some(new.clone());
                summary.kept += 1;
                continue;
            }
            self.detach_target(probes, index);
            summary.removed += 1;
        }
        for target in targets {
            if self
                .targets
                .iter()
                .flatten()
                .any(|live| same_probes(live, &target))
            {
                continue;
            }
            let index = self.targets.len() as u32;
            self.targets.push(Some(target.clone()));
            match self.attach_target(probes, index, &target) {
                Ok(()) => summary.added += 1,
                Err(err) => {
                    eprintln!("dogslow: reload: target `{}`: {err}", target.name);
                    summary.failed += 1;
                }
            }
        }
        // Processes already seen may run a new target's binary.
        self.seen.clear();
        self.rescan(probes);
        Ok(summary)
    }

    /// Detaches every probe of target `index` and forgets its requests.
    fn detach_target(&mut self, probes: &mut Probes, index: u32) {
        let files: Vec<_> = self
            .file_links
            .keys()
            .filter(|(t, _)| *t == index)
            .copied()
            .collect();
        for key in files {
            for link in self.file_links.remove(&key).unwrap_or_default() {
                probes.detach_uprobe(link);
            }
        }
        self.file_users.retain(|(t, _), _| *t != index);
        let processes: Vec<_> = self
            .process_links
            .keys()
            .filter(|(t, _)| *t == index)
            .copied()
            .collect();
        for key in processes {
            for link in self.process_links.remove(&key).unwrap_or_default() {
                probes.detach_uprobe(link);
            }
        }
        let slots: Vec<u32> = self
            .slots
            .iter()
            .enumerate()
            .filter(|(_, (target, _))| *target == index)
            .map(|(slot, _)| slot as u32)
            .collect();
        // Their exits are no longer probed: without this they would look
        // stalled forever.
        probes.forget_requests(&slots);
        if let Some(target) = self.targets.get_mut(index as usize) {
            *target = None;
        }
    }

    /// True when every process named with `--pid` has exited and nothing
    /// else is watched: there is nothing left to report on.
    pub fn finished(&self) -> bool {
        let live = self.live();
        let watches_binaries = live.iter().any(|(_, t)| !t.binaries.is_empty());
        let pids: Vec<u32> = live
            .iter()
            .flat_map(|(_, t)| t.pids.iter().copied())
            .collect();
        !watches_binaries
            && !pids.is_empty()
            && pids.iter().all(|&pid| !procfs::process_exists(pid))
    }

    /// Finds processes of the `--binary` targets that appeared or exec'd
    /// since the last scan, attaches what they need, and detaches from
    /// processes that are gone.
    pub fn rescan(&mut self, probes: &mut Probes) {
        let gone: Vec<(u32, u32)> = self
            .process_links
            .keys()
            .filter(|(_, pid)| !procfs::process_exists(*pid))
            .copied()
            .collect();
        for key in gone {
            if let Some(links) = self.process_links.remove(&key) {
                for link in links {
                    probes.detach_uprobe(link);
                }
                let _ = self.messages.send(Message::ProcessGone(key.1));
            }
        }
        if self.live().iter().all(|(_, t)| t.binaries.is_empty()) {
            return;
        }
        let live = live_pids();
        self.seen.retain(|pid, _| live.contains(pid));
        let exited: Vec<u32> = self
            .matched
            .iter()
            .filter(|pid| !live.contains(pid))
            .copied()
            .collect();
        for pid in exited {
            self.matched.remove(&pid);
            let _ = self.messages.send(Message::ProcessGone(pid));
        }
        self.release_unused_files(probes, &live);
        for pid in live {
            let identity = (
                procfs::start_ticks(pid).unwrap_or(0),
                FileId::of(Path::new(&format!("/proc/{pid}/exe"))),
            );
            if self.seen.get(&pid) == Some(&identity) {
                continue;
            }
            self.seen.insert(pid, identity);
            self.examine(probes, pid);
        }
    }

    /// Attaches `pid` to every `--binary` target it runs or maps.
    fn examine(&mut self, probes: &mut Probes, pid: u32) {
        for (index, target) in self.live() {
            let index = index as usize;
            for binary in &target.binaries {
                let Some(file) = process_uses(pid, binary) else {
                    continue;
                };
                let path = procfs::path_in_process_root(pid, &binary.to_string_lossy());
                if let Err(err) = self.attach_file(probes, index as u32, &target, &path, file) {
                    eprintln!("dogslow: process {pid} runs {}: {err}", binary.display());
                    continue;
                }
                self.file_users
                    .entry((index as u32, file))
                    .or_default()
                    .insert(pid);
                let needs_process_probes = probe_roles(&target)
                    .iter()
                    .any(|(_, s)| s.library.is_some());
                if needs_process_probes
                    && !self.process_links.contains_key(&(index as u32, pid))
                    && let Err(err) = self.attach_process(probes, index as u32, &target, pid, false)
                {
                    eprintln!("dogslow: process {pid}: {err}");
                }
                if self.matched.insert(pid) {
                    eprintln!("dogslow: watching process {pid} ({})", binary.display());
                }
                let _ = self.messages.send(Message::ProcessSeen(pid));
            }
        }
    }

    /// Detaches the probes of files that no live process uses and that
    /// their target's path no longer names on this host: a replaced binary
    /// (a redeploy, a container gone) must not keep its probes, and the
    /// deleted file its disk space, for the agent's lifetime.
    fn release_unused_files(&mut self, probes: &mut Probes, live: &[u32]) {
        let mut unused = Vec::new();
        for (&(index, file), users) in &mut self.file_users {
            users.retain(|pid| live.contains(pid));
            let named_here = self
                .targets
                .get(index as usize)
                .and_then(Option::as_ref)
                .is_some_and(|target| {
                    target
                        .binaries
                        .iter()
                        .any(|path| FileId::of(path) == Some(file))
                });
            if users.is_empty() && !named_here {
                unused.push((index, file));
            }
        }
        for key in unused {
            self.file_users.remove(&key);
            for link in self.file_links.remove(&key).unwrap_or_default() {
                probes.detach_uprobe(link);
            }
        }
    }

    /// Attaches a target's in-binary probes to `file` once.
    fn attach_file(
        &mut self,
        probes: &mut Probes,
        index: u32,
        target: &TargetSpec,
        path: &Path,
        file: FileId,
    ) -> Result<(), AgentError> {
        if self.file_links.contains_key(&(index, file)) {
            return Ok(());
        }
        let error = |source: TargetError| AgentError::Target {
            target: target.name.clone(),
            source,
        };
        let mut links = Vec::new();
        for (role, spec) in probe_roles(target) {
            if spec.library.is_some() {
                continue;
            }
            let attached = targets::resolve(path, spec)
                .map_err(error)
                .and_then(|points| {
                    self.attach_points(probes, index, role, &points, None, &mut links)
                });
            if let Err(err) = attached {
                for link in links {
                    probes.detach_uprobe(link);
                }
                return Err(err);
            }
        }
        self.file_links.insert((index, file), links);
        Ok(())
    }

    /// Attaches a target's probes to one process: all of them for a
    /// `--pid` target, the library ones for a `--binary` process.
    fn attach_process(
        &mut self,
        probes: &mut Probes,
        index: u32,
        target: &TargetSpec,
        pid: u32,
        explicit: bool,
    ) -> Result<(), AgentError> {
        let error = |source: TargetError| match source {
            // It was there when the targets were checked: it exited since.
            TargetError::Proc(ProcError::NoSuchProcess { pid }) => {
                AgentError::Attach(AttachError::ProcessGone { pid })
            }
            source => AgentError::Target {
                target: target.name.clone(),
                source,
            },
        };
        let mut links = Vec::new();
        for (role, spec) in probe_roles(target) {
            if !explicit && spec.library.is_none() {
                continue;
            }
            let attached = targets::object_for_pid(pid, spec)
                .and_then(|object| targets::resolve(&object, spec))
                .map_err(error)
                .and_then(|points| {
                    self.attach_points(probes, index, role, &points, Some(pid), &mut links)
                });
            if let Err(err) = attached {
                for link in links {
                    probes.detach_uprobe(link);
                }
                return Err(err);
            }
        }
        self.process_links.insert((index, pid), links);
        let _ = self.messages.send(Message::ProcessSeen(pid));
        Ok(())
    }

    /// How many kernel target slots are configured.
    pub fn slot_count(&self) -> usize {
        self.slots.len()
    }

    /// The shortest timeout of the live targets.
    pub fn min_timeout(&self) -> Option<std::time::Duration> {
        self.live().iter().map(|(_, t)| t.timeout).min()
    }

    /// Every process currently watched, explicitly or through a binary.
    pub fn watched_processes(&self) -> usize {
        let mut pids: HashSet<u32> = self.process_links.keys().map(|(_, pid)| *pid).collect();
        pids.extend(self.matched.iter().copied());
        pids.len()
    }
}

/// Checks `targets` without attaching anything (at start, and for a reload
/// before anything changes).
fn validate<'a>(targets: impl IntoIterator<Item = &'a TargetSpec>) -> Result<(), AgentError> {
    for target in targets {
        let error = |source: TargetError| AgentError::Target {
            target: target.name.clone(),
            source,
        };
        if matches!(target.entry.location, ProbeLocation::Usdt { .. }) && target.exit.is_none() {
            return Err(AgentError::Unsupported(format!(
                "target `{}`: a USDT entry probe needs --exit (a probe site is not a function: \
                 there is no return to wait for), e.g. --exit usdt:PROVIDER:DONE_PROBE",
                target.name
            )));
        }
        if let (None, ProbeLocation::Symbol { offset, .. }) = (&target.exit, &target.entry.location)
            && *offset != 0
        {
            // A uretprobe anywhere but a function's first instruction
            // would overwrite something other than the return address.
            return Err(AgentError::Unsupported(format!(
                "target `{}`: without --exit a request ends when the entry function returns, \
                     which needs the probe on the function's first instruction; drop the +{offset} \
                     or give --exit",
                target.name
            )));
        }
        if let Some(exit) = &target.exit
            && exit.location == target.entry.location
            && exit.library == target.entry.library
        {
            return Err(AgentError::Unsupported(format!(
                "target `{}`: --entry and --exit are the same probe ({}); a request needs an \
                 end elsewhere, or drop --exit to end it when the entry function returns",
                target.name, target.entry
            )));
        }
        request_args::check_all(&target.captures).map_err(|e| error(e.into()))?;
        let check = |object: &Path, role: ProbeRole, spec: &ProbeSpec| -> Result<(), AgentError> {
            for point in targets::resolve(object, spec).map_err(error)? {
                check_return_point(target, role, &point)?;
                if role == ProbeRole::Entry {
                    targets::capture_specs(&point, &target.captures, target.capture_len)
                        .map_err(error)?;
                }
            }
            Ok(())
        };
        for &pid in &target.pids {
            for (role, spec) in probe_roles(target) {
                let object = targets::object_for_pid(pid, spec).map_err(error)?;
                check(&object, role, spec)?;
            }
        }
        for binary in &target.binaries {
            // Processes are matched by the path they run, which is absolute.
            if !binary.is_absolute() {
                return Err(AgentError::Unsupported(format!(
                    "--binary {}: give an absolute path (as seen on the host or inside the container)",
                    binary.display()
                )));
            }
            if binary.exists() {
                ElfImage::open(binary).map_err(|e| error(e.into()))?;
                for (role, spec) in probe_roles(target)
                    .into_iter()
                    .filter(|(_, s)| s.library.is_none())
                {
                    check(binary, role, spec)?;
                }
            }
        }
    }
    Ok(())
}

/// A return probe (a request that ends when the entry function returns)
/// must sit on a function's first instruction: anywhere else it would take
/// something other than the return address for one, and corrupt the target.
fn check_return_point(
    target: &TargetSpec,
    role: ProbeRole,
    point: &AttachPoint,
) -> Result<(), AgentError> {
    if role != ProbeRole::Return || !point.mid_function {
        return Ok(());
    }
    Err(AgentError::Unsupported(format!(
        "target `{}`: without --exit a request ends when the entry function returns, which \
         needs --entry on a function's first instruction, and file offset {:#x} in {} is inside \
         a function, past its start; give the function's name, or give --exit",
        target.name,
        point.file_offset,
        point.path.display()
    )))
}

/// Whether two targets probe the same way (their outputs aside).
fn same_probes(a: &TargetSpec, b: &TargetSpec) -> bool {
    TargetSpec {
        output: None,
        ..a.clone()
    } == TargetSpec {
        output: None,
        ..b.clone()
    }
}

/// What a reload did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReloadSummary {
    pub kept: usize,
    pub added: usize,
    pub removed: usize,
    /// New targets whose probes could not be attached (said on stderr).
    pub failed: usize,
}

fn live_pids() -> Vec<u32> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The file `binary` names inside `pid`'s mount namespace, if the process
/// runs it or maps it.
fn process_uses(pid: u32, binary: &Path) -> Option<FileId> {
    let in_namespace: PathBuf = procfs::path_in_process_root(pid, &binary.to_string_lossy());
    let file = FileId::of(&in_namespace)?;
    if FileId::of(Path::new(&format!("/proc/{pid}/exe"))) == Some(file) {
        return Some(file);
    }
    let maps = procfs::maps(pid).ok()?;
    maps.iter()
        .filter(|m| m.is_file() && m.executable)
        .any(|m| {
            let mapped = PathBuf::from(format!("/proc/{pid}/map_files/{:x}-{:x}", m.start, m.end));
            FileId::of(&mapped) == Some(file)
        })
        .then_some(file)
}
