//! Symbolization with one long-lived blazesym `Symbolizer` (it is the cache
//! of parsed binaries; not `Sync`, so it lives on the reporting thread).
use std::{collections::HashMap, path::PathBuf};

use blazesym::{
    MaybeDefault, Pid,
    symbolize::{
        CodeInfo, Input, Symbolized, Symbolizer as Blaze,
        cache::{self, Cache, Process as ProcessCache},
        evict::{self, Evict},
        source::{Kernel, Process, Source},
    },
};
use framehop::FrameAddress;

/// One frame of a report, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// The address as captured: the instruction pointer for the innermost
    /// frame, return addresses for the others.
    pub addr: u64,
    pub function: Option<String>,
    /// Byte offset of `addr` from the function's start.
    pub offset: Option<u64>,
    pub file: Option<String>,
    pub line: Option<u32>,
    pub module: Option<String>,
    /// A function inlined into the next frame (same address).
    pub inlined: bool,
}

impl Frame {
    fn unknown(addr: u64) -> Self {
        Self {
            addr,
            function: None,
            offset: None,
            file: None,
            line: None,
            module: None,
            inlined: false,
        }
    }
}

pub struct Symbolizer {
    blaze: Blaze,
    /// Per process, the mapped files pinned in blazesym's cache so that its
    /// stacks symbolize after it exits; released by `forget_process`.
    pinned: HashMap<u32, Vec<PathBuf>>,
}

impl Default for Symbolizer {
    fn default() -> Self {
        Self::new()
    }
}

impl Symbolizer {
    pub fn new() -> Self {
        Self {
            blaze: Blaze::builder()
                .enable_code_info(true)
                .enable_inlined_fns(true)
                .enable_demangling(true)
                .build(),
            pinned: HashMap::new(),
        }
    }

    /// Remembers `pid`'s mappings and pins the files they map, so its
    /// stacks still symbolize after it exits (when /proc/PID is gone).
    /// Called when a process is first seen and again at each of its reports
    /// (it may have loaded libraries since).
    pub fn cache_process(&mut self, pid: u32) {
        let mut process = ProcessCache::new(Pid::from(pid));
        process.cache_vmas = true;
        process.cache_perf_map = false;
        if self.blaze.cache(&Cache::Process(process)).is_err() {
            // Already gone: keep what was cached before.
            return;
        }
        let Ok(mappings) = crate::procfs::maps(pid) else {
            return;
        };
        let pinned = self.pinned.entry(pid).or_default();
        for mapping in mappings.iter().filter(|m| m.is_file() && m.executable) {
            // The path blazesym itself uses for a live process's mappings.
            let path = PathBuf::from(format!(
                "/proc/{pid}/map_files/{:x}-{:x}",
                mapping.start, mapping.end
            ));
            if pinned.contains(&path) {
                continue;
            }
            if self
                .blaze
                .cache(&Cache::Elf(cache::Elf::new(path.clone())))
                .is_ok()
            {
                pinned.push(path);
            }
        }
    }

    /// Parses what symbolizing `pid` needs now (symbol tables, DWARF line
    /// and inline data of each mapped binary), so the first report from
    /// it is not the slow one.
    pub fn warm_process(&mut self, pid: u32) {
        self.cache_process(pid);
        let Ok(mappings) = crate::procfs::maps(pid) else {
            return;
        };
        let starts: Vec<FrameAddress> = mappings
            .iter()
            .filter(|m| m.executable && (m.is_file() || m.path == "[vdso]"))
            .map(|m| FrameAddress::from_instruction_pointer(m.start))
            .collect();
        let _ = self.user_frames(pid, &starts);
    }

    /// Parses the kernel's symbols (kallsyms) ahead of the first report.
    pub fn warm_kernel(&self) {
        let _ = self.kernel_frames(&[0xffff_ffff_8100_0000]);
    }

    /// Releases what `cache_process` kept for `pid` (it exited a while ago).
    pub fn forget_process(&mut self, pid: u32) {
        let _ = self
            .blaze
            .evict(&Evict::Process(evict::Process::new(Pid::from(pid))));
        for path in self.pinned.remove(&pid).unwrap_or_default() {
            let _ = self.blaze.evict(&Evict::Elf(evict::Elf::new(path)));
        }
    }

    /// Number of processes whose files are pinned.
    pub fn cached_processes(&self) -> usize {
        self.pinned.len()
    }

    /// Symbolizes an unwound user stack of process `pid`. Return addresses
    /// are looked up at `addr - 1` (the call instruction).
    pub fn user_frames(&self, pid: u32, addresses: &[FrameAddress]) -> Vec<Frame> {
        let lookups: Vec<u64> = addresses.iter().map(|a| a.address_for_lookup()).collect();
        let mut process = Process::new(Pid::from(pid));
        process.perf_map = perf_map_is_regular_file(pid);
        let source = Source::Process(process);
        let symbolized = self
            .blaze
            .symbolize(&source, Input::AbsAddr(&lookups))
            .unwrap_or_default();
        let mut frames = Vec::with_capacity(addresses.len());
        for (index, address) in addresses.iter().enumerate() {
            let reported = address.address();
            let lookup = lookups[index];
            frames.extend(frames_for(symbolized.get(index), reported, lookup));
        }
        frames
    }

    /// Symbolizes kernel return addresses (from kallsyms).
    pub fn kernel_frames(&self, addresses: &[u64]) -> Vec<Frame> {
        let kernel = Kernel {
            kallsyms: MaybeDefault::Default,
            vmlinux: MaybeDefault::None,
            ..Default::default()
        };
        let source = Source::Kernel(kernel);
        // Kernel stacks hold return addresses except the first entry, which
        // may be an interrupted instruction; look all up at addr - 1 except it.
        let lookups: Vec<u64> = addresses
            .iter()
            .enumerate()
            .map(|(i, &a)| if i == 0 { a } else { a.saturating_sub(1) })
            .collect();
        let symbolized = self
            .blaze
            .symbolize(&source, Input::AbsAddr(&lookups))
            .unwrap_or_default();
        addresses
            .iter()
            .enumerate()
            .flat_map(|(i, &addr)| frames_for(symbolized.get(i), addr, lookups[i]))
            .collect()
    }
}

/// The frames one address stands for: inlined callees first (innermost),
/// then the function the address is in.
fn frames_for(symbolized: Option<&Symbolized<'_>>, reported: u64, lookup: u64) -> Vec<Frame> {
    let Some(Symbolized::Sym(sym)) = symbolized else {
        return vec![Frame::unknown(reported)];
    };
    let module = sym
        .module
        .as_ref()
        .map(|m| m.to_string_lossy().into_owned());
    let offset = (sym.offset as u64) + (reported - lookup);
    let mut frames = Vec::with_capacity(sym.inlined.len() + 1);
    // blazesym lists inlined calls outermost first, each with the location
    // inside it; the symbol's own code_info is where it calls the first.
    for inlined in sym.inlined.iter().rev() {
        let (file, line) = location(inlined.code_info.as_ref());
        frames.push(Frame {
            addr: reported,
            function: Some(inlined.name.to_string()),
            offset: None,
            file,
            line,
            module: module.clone(),
            inlined: true,
        });
    }
    let (file, line) = location(sym.code_info.as_deref());
    frames.push(Frame {
        addr: reported,
        function: Some(sym.name.to_string()),
        offset: Some(offset),
        file,
        line,
        module,
        inlined: false,
    });
    frames
}

fn location(code_info: Option<&CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match code_info {
        Some(info) => (
            Some(info.to_path().to_string_lossy().into_owned()),
            info.line,
        ),
        None => (None, None),
    }
}

/// Whether the process's JIT perf map (`/tmp/perf-NSPID.map` in its root, as
/// blazesym reads it) is a regular file. The process controls that path: a
/// FIFO or a link to a device there must not hang or exhaust the reporter.
fn perf_map_is_regular_file(pid: u32) -> bool {
    let ns_pid = crate::procfs::thread_ns_tid(pid, pid).unwrap_or(pid);
    std::fs::metadata(format!("/proc/{pid}/root/tmp/perf-{ns_pid}.map"))
        .is_ok_and(|metadata| metadata.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    #[unsafe(no_mangle)]
    extern "C" fn dogslow_symbolize_probe_target() -> u64 {
        std::hint::black_box(42)
    }

    #[test]
    fn symbolizes_own_function_with_file_and_line() {
        let addr = dogslow_symbolize_probe_target as *const () as u64;
        let symbolizer = Symbolizer::new();
        let frames = symbolizer.user_frames(
            std::process::id(),
            &[FrameAddress::from_instruction_pointer(addr)],
        );
        let last = frames.last().unwrap();
        assert_eq!(
            last.function.as_deref(),
            Some("dogslow_symbolize_probe_target")
        );
        assert_eq!(last.offset, Some(0));
        assert!(
            last.file.as_deref().unwrap_or("").ends_with("symbolize.rs"),
            "{last:?}"
        );
        assert!(last.line.is_some());
    }

    #[test]
    fn a_process_cached_when_seen_still_symbolizes_after_it_exits() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Wait for the dynamic linker to map libc.
        let libc = (0..200)
            .find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(5));
                crate::procfs::maps(pid)
                    .ok()?
                    .into_iter()
                    .find(|m| m.path.contains("libc.so") && m.offset == 0)
            })
            .expect("libc mapped in the child");
        let image = crate::elf::ElfImage::open(std::path::Path::new(&libc.path)).unwrap();
        let nanosleep = image.find_function("nanosleep").unwrap();
        let addr = libc.start + nanosleep.vaddr;

        let mut symbolizer = Symbolizer::new();
        symbolizer.cache_process(pid);
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!crate::procfs::process_exists(pid));

        let frames = symbolizer.user_frames(pid, &[FrameAddress::from_instruction_pointer(addr)]);
        let name = frames.last().unwrap().function.clone().unwrap_or_default();
        assert!(name.contains("nanosleep"), "{frames:?}");
        symbolizer.forget_process(pid);
        assert_eq!(symbolizer.cached_processes(), 0);
    }

    #[test]
    fn return_addresses_report_their_own_offset() {
        let addr = dogslow_symbolize_probe_target as *const () as u64 + 4;
        let symbolizer = Symbolizer::new();
        let ret = FrameAddress::from_return_address(addr).unwrap();
        let frames = symbolizer.user_frames(std::process::id(), &[ret]);
        let frame = frames.last().unwrap();
        assert_eq!(frame.addr, addr);
        assert_eq!(frame.offset, Some(4));
    }
}
