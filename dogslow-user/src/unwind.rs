//! User stack unwinding with DWARF CFI (`.eh_frame`, `.debug_frame`) through
//! framehop, falling back to frame pointers where a module has no CFI.
//!
//! Unwind data is cached per binary (device and inode), so the second report
//! from a binary does not re-read it; each process gets a module list built
//! from its current mappings.
use std::{
    collections::HashMap,
    fs,
    ops::{Deref, Range},
    path::PathBuf,
    sync::Arc,
};

use framehop::{
    ExplicitModuleSectionInfo, FrameAddress, Module, Unwinder as _,
    x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64},
};
use memmap2::Mmap;
use object::{Object as _, ObjectSection as _, ObjectSegment as _};

use crate::{
    events::StallCapture,
    procfs::{self, Mapping},
};

/// Bytes of a section: a slice of a shared mapping or buffer.
#[derive(Clone)]
pub struct SectionBytes {
    backing: Backing,
    range: Range<usize>,
}

#[derive(Clone)]
enum Backing {
    File(Arc<Mmap>),
    Memory(Arc<Vec<u8>>),
}

impl Default for SectionBytes {
    fn default() -> Self {
        Self {
            backing: Backing::Memory(Arc::new(Vec::new())),
            range: 0..0,
        }
    }
}

impl Deref for SectionBytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let all: &[u8] = match &self.backing {
            Backing::File(map) => map,
            Backing::Memory(bytes) => bytes,
        };
        &all[self.range.clone()]
    }
}

/// What unwinding needs from one binary, independent of where it is mapped.
struct BinaryUnwindData {
    name: String,
    /// (p_offset, p_vaddr, p_filesz) of each executable loadable segment.
    code_segments: Vec<(u64, u64, u64)>,
    sections: ExplicitModuleSectionInfo<SectionBytes>,
    has_cfi: bool,
}

impl BinaryUnwindData {
    fn parse(name: String, backing: Backing) -> Option<Self> {
        let bytes: &[u8] = match &backing {
            Backing::File(map) => map,
            Backing::Memory(bytes) => bytes,
        };
        let file = object::File::parse(bytes).ok()?;
        let slice = |name: &str| {
            let section = file.section_by_name(name)?;
            let (offset, size) = section.file_range()?;
            // A damaged or truncated file may claim bytes it does not have.
            let end = offset
                .checked_add(size)
                .filter(|&end| end <= bytes.len() as u64)?;
            Some((
                section.address()..section.address().checked_add(section.size())?,
                SectionBytes {
                    backing: backing.clone(),
                    range: offset as usize..end as usize,
                },
            ))
        };
        let text = slice(".text");
        let eh_frame = slice(".eh_frame");
        let eh_frame_hdr = slice(".eh_frame_hdr");
        let debug_frame = slice(".debug_frame");
        let got = file
            .section_by_name(".got")
            .map(|s| s.address()..s.address() + s.size());
        let has_cfi = eh_frame.is_some() || debug_frame.is_some();
        let code_segments = file
            .segments()
            .filter(|segment| {
                matches!(segment.flags(), object::SegmentFlags::Elf { p_flags, .. } if p_flags.0 & object::elf::PF_X.0 != 0)
            })
            .map(|segment| {
                let (offset, size) = segment.file_range();
                (offset, segment.address(), size)
            })
            .collect();
        let sections = ExplicitModuleSectionInfo {
            base_svma: 0,
            text_svma: text.as_ref().map(|(range, _)| range.clone()),
            text: text.map(|(_, bytes)| bytes),
            got_svma: got,
            eh_frame_svma: eh_frame.as_ref().map(|(range, _)| range.clone()),
            eh_frame: eh_frame.map(|(_, bytes)| bytes),
            eh_frame_hdr_svma: eh_frame_hdr.as_ref().map(|(range, _)| range.clone()),
            eh_frame_hdr: eh_frame_hdr.map(|(_, bytes)| bytes),
            debug_frame: debug_frame.map(|(_, bytes)| bytes),
            ..Default::default()
        };
        Some(Self {
            name,
            code_segments,
            sections,
            has_cfi,
        })
    }

    /// How far the code in `mapping` is from where the file says it is
    /// (actual minus stated address). The mapping starts on a page
    /// boundary, which may lie in the segment before the code (linkers pack
    /// segments into shared pages), so the code segment is found by where
    /// its first byte falls in the mapping.
    fn bias(&self, mapping: &Mapping) -> Option<u64> {
        let len = mapping.end - mapping.start;
        self.code_segments
            .iter()
            .find(|(p_offset, _, size)| {
                *p_offset < mapping.offset + len && p_offset + size > mapping.offset
            })
            .map(|(p_offset, p_vaddr, _)| {
                // p_offset may precede the mapping by less than a page.
                (mapping.start + p_offset)
                    .wrapping_sub(mapping.offset)
                    .wrapping_sub(*p_vaddr)
            })
    }
}

/// Identity of a mapped binary.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
enum BinaryKey {
    File {
        dev: u64,
        inode: u64,
    },
    /// The vDSO: one image per kernel, read from the first process seen.
    Vdso,
}

/// How a stack was unwound and whether it is whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnwoundStack {
    /// Frames innermost first; the first is the instruction pointer.
    pub frames: Vec<FrameAddress>,
    /// "dwarf" when every step used CFI, "frame-pointer" when any step fell
    /// back to frame pointers (a module without CFI).
    pub method: &'static str,
    /// Why the walk stopped before the outermost frame, if it did.
    pub truncated: Option<String>,
}

/// A process's modules as framehop sees them.
struct ProcessModules {
    unwinder: UnwinderX86_64<SectionBytes>,
    /// Per module: where it is mapped, whether it has CFI, its path.
    ranges: Vec<ModuleRange>,
    /// The `[uprobes]` trampoline page, if mapped.
    uprobes: Option<Range<u64>>,
    /// The mappings the modules were built from.
    mappings: Vec<Mapping>,
}

struct ModuleRange {
    avma: Range<u64>,
    has_cfi: bool,
    name: String,
}

/// Unwinds stall captures. Holds the per-binary cache; not `Sync`, lives on
/// the reporting thread.
pub struct StackUnwinder {
    binaries: HashMap<BinaryKey, Option<Arc<BinaryUnwindData>>>,
    processes: HashMap<u32, ProcessModules>,
    cache: CacheX86_64,
}

impl Default for StackUnwinder {
    fn default() -> Self {
        Self::new()
    }
}

impl StackUnwinder {
    pub fn new() -> Self {
        Self {
            binaries: HashMap::new(),
            processes: HashMap::new(),
            cache: CacheX86_64::new(),
        }
    }

    /// Unwinds the user stack of `capture`.
    pub fn unwind(&mut self, capture: &StallCapture) -> UnwoundStack {
        self.refresh_process(capture.pid);
        let regs = capture.regs;
        if regs.ip == 0 {
            return UnwoundStack {
                frames: Vec::new(),
                method: "dwarf",
                truncated: Some("the thread's user registers could not be read".into()),
            };
        }
        let Some(process) = self.processes.get(&capture.pid) else {
            return UnwoundStack {
                frames: vec![FrameAddress::from_instruction_pointer(regs.ip)],
                method: "dwarf",
                truncated: Some("the process's memory map could not be read".into()),
            };
        };
        let stack = patched_stack(capture, process.uprobes.as_ref());
        let stack_start = regs.sp;
        let stack_end = regs.sp + stack.len() as u64;
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            if addr < stack_start || addr + 8 > stack_end {
                return Err(());
            }
            let at = (addr - stack_start) as usize;
            let word: [u8; 8] = stack[at..at + 8].try_into().map_err(|_| ())?;
            Ok(u64::from_le_bytes(word))
        };
        let mut frames = Vec::new();
        let mut iter = process.unwinder.iter_frames(
            regs.ip,
            UnwindRegsX86_64::new(regs.ip, regs.sp, regs.bp),
            &mut self.cache,
            &mut read_stack,
        );
        let truncated = loop {
            match iter.next() {
                Ok(Some(frame)) => {
                    frames.push(frame);
                    if frames.len() >= MAX_USER_FRAMES {
                        break Some(format!("more than {MAX_USER_FRAMES} frames"));
                    }
                }
                Ok(None) => break None,
                Err(err) => break Some(describe_stop(err, capture, stack_end)),
            }
        };
        let steps_without_cfi = frames
            .iter()
            .take(frames.len().saturating_sub(1))
            .any(|frame| {
                !process.ranges.iter().any(|module| {
                    module.has_cfi && module.avma.contains(&frame.address_for_lookup())
                })
            });
        UnwoundStack {
            frames,
            method: if steps_without_cfi {
                "frame-pointer"
            } else {
                "dwarf"
            },
            truncated,
        }
    }

    /// Builds (or rebuilds, when its mappings changed) the module list of
    /// `pid`, loading the unwind data of binaries not seen before. Called
    /// when a process is first seen, so the first stall does not pay it.
    pub fn refresh_process(&mut self, pid: u32) {
        let Ok(mappings) = procfs::maps(pid) else {
            // Gone: keep what we had, so late captures still unwind.
            return;
        };
        if self
            .processes
            .get(&pid)
            .is_some_and(|known| known.mappings == mappings)
        {
            return;
        }
        let mut unwinder = UnwinderX86_64::new();
        let mut ranges = Vec::new();
        let uprobes = mappings
            .iter()
            .find(|m| m.path == "[uprobes]")
            .map(|m| m.start..m.end);
        // One module per executable mapping: code addresses are what the
        // unwinder looks up, and the bias must come from the mapping that
        // holds the code (a process may also map the same file as data).
        for mapping in mappings.iter().filter(|m| m.executable) {
            let key = if mapping.path == "[vdso]" {
                BinaryKey::Vdso
            } else if mapping.is_file() {
                BinaryKey::File {
                    dev: mapping.dev,
                    inode: mapping.inode,
                }
            } else {
                continue;
            };
            let Some(data) = self.binary(pid, &key, mapping) else {
                continue;
            };
            let Some(bias) = data.bias(mapping) else {
                continue;
            };
            let avma = mapping.start..mapping.end;
            ranges.push(ModuleRange {
                avma: avma.clone(),
                has_cfi: data.has_cfi,
                name: data.name.clone(),
            });
            unwinder.add_module(Module::new(
                data.name.clone(),
                avma,
                bias,
                data.sections.clone(),
            ));
        }
        self.processes.insert(
            pid,
            ProcessModules {
                unwinder,
                ranges,
                uprobes,
                mappings,
            },
        );
    }

    /// The cached unwind data of a binary, loading it on first sight.
    fn binary(
        &mut self,
        pid: u32,
        key: &BinaryKey,
        mapping: &Mapping,
    ) -> Option<Arc<BinaryUnwindData>> {
        self.binaries
            .entry(key.clone())
            .or_insert_with(|| load_binary(pid, key, mapping).map(Arc::new))
            .clone()
    }

    /// The path of the module `pid` has mapped at `addr`, as last seen.
    pub fn module_name(&self, pid: u32, addr: u64) -> Option<&str> {
        let process = self.processes.get(&pid)?;
        process
            .ranges
            .iter()
            .find(|module| module.avma.contains(&addr))
            .map(|module| module.name.as_str())
    }

    /// Forgets a process (it exited and its reports are out).
    pub fn forget_process(&mut self, pid: u32) {
        self.processes.remove(&pid);
    }

    /// Number of binaries whose unwind data is cached.
    pub fn cached_binaries(&self) -> usize {
        self.binaries.len()
    }
}

/// Frames beyond this are cut (and the stack marked truncated).
pub const MAX_USER_FRAMES: usize = 256;

fn load_binary(pid: u32, key: &BinaryKey, mapping: &Mapping) -> Option<BinaryUnwindData> {
    match key {
        BinaryKey::Vdso => {
            let bytes =
                procfs::read_memory(pid, mapping.start, (mapping.end - mapping.start) as usize)
                    .ok()?;
            BinaryUnwindData::parse("[vdso]".into(), Backing::Memory(Arc::new(bytes)))
        }
        BinaryKey::File { .. } => {
            // map_files names the exact mapped file, even if replaced or in
            // another mount namespace; /proc/PID/root/PATH is the fallback.
            let candidates = [
                PathBuf::from(format!(
                    "/proc/{pid}/map_files/{:x}-{:x}",
                    mapping.start, mapping.end
                )),
                procfs::path_in_process_root(pid, &mapping.path),
            ];
            candidates.iter().find_map(|path| {
                let file = fs::File::open(path).ok()?;
                // SAFETY: read-only private mapping of a binary.
                let map = unsafe { Mmap::map(&file) }.ok()?;
                BinaryUnwindData::parse(mapping.path.clone(), Backing::File(Arc::new(map)))
            })
        }
    }
}

/// The captured stack with uretprobe trampolines replaced by the return
/// addresses they stand for.
fn patched_stack(capture: &StallCapture, uprobes: Option<&Range<u64>>) -> Vec<u8> {
    let mut stack = capture.user_stack.clone();
    let Some(trampoline) = uprobes else {
        return stack;
    };
    for slot in &capture.return_slots {
        let Some(at) = slot.stack.checked_sub(capture.regs.sp) else {
            continue;
        };
        let at = at as usize;
        let Some(word) = stack.get_mut(at..at + 8) else {
            continue;
        };
        let value = u64::from_le_bytes(word.try_into().unwrap_or([0; 8]));
        if trampoline.contains(&value) {
            word.copy_from_slice(&slot.orig_ret_vaddr.to_le_bytes());
        }
    }
    stack
}

fn describe_stop(err: framehop::Error, capture: &StallCapture, stack_end: u64) -> String {
    match err {
        framehop::Error::CouldNotReadStack(addr)
            if addr + 8 > stack_end && capture.user_stack_error == 0 =>
        {
            format!(
                "the stack is deeper than the {} bytes copied (raise --user-stack-bytes)",
                capture.user_stack.len()
            )
        }
        framehop::Error::CouldNotReadStack(addr) if addr + 8 > stack_end => format!(
            "the stack copy stopped at {} bytes (read error {})",
            capture.user_stack.len(),
            capture.user_stack_error
        ),
        framehop::Error::CouldNotReadStack(addr) => {
            format!("a frame pointed below the stack pointer ({addr:#x})")
        }
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dogslow_common::{ReturnSlot, UserRegs};

    fn capture_with_stack(stack: Vec<u8>, slots: Vec<ReturnSlot>) -> StallCapture {
        StallCapture {
            source: crate::events::CaptureSource::Sampler,
            tid: 1,
            pid: 1,
            target: 0,
            state: crate::events::ThreadState::Running,
            start_ns: 0,
            deadline_ns: 0,
            captured_ns: 0,
            off_cpu_since_ns: None,
            regs: UserRegs {
                ip: 0x1000,
                sp: 0x8000,
                bp: 0,
                orig_ax: -1,
            },
            cpu: 0,
            comm: String::new(),
            kernel_stack: Vec::new(),
            user_stack: stack,
            user_stack_error: 0,
            return_slots: slots,
            args: None,
        }
    }

    #[test]
    fn uretprobe_trampolines_are_replaced() {
        let mut stack = vec![0u8; 32];
        stack[8..16].copy_from_slice(&0x7fff_0000_0000u64.to_le_bytes());
        stack[16..24].copy_from_slice(&0x4444u64.to_le_bytes());
        let capture = capture_with_stack(
            stack,
            vec![
                ReturnSlot {
                    stack: 0x8008,
                    orig_ret_vaddr: 0x5555,
                },
                // Points at a slot that no longer holds the trampoline.
                ReturnSlot {
                    stack: 0x8010,
                    orig_ret_vaddr: 0x6666,
                },
            ],
        );
        let trampoline = 0x7fff_0000_0000..0x7fff_0000_1000;
        let patched = patched_stack(&capture, Some(&trampoline));
        assert_eq!(
            u64::from_le_bytes(patched[8..16].try_into().unwrap()),
            0x5555
        );
        assert_eq!(
            u64::from_le_bytes(patched[16..24].try_into().unwrap()),
            0x4444
        );
    }

    #[test]
    fn unwinds_own_thread_through_dwarf() {
        unwind_from_here();
        // Not a tail call: this frame stays on the stack to be unwound.
        std::hint::black_box(());
    }

    #[inline(never)]
    fn unwind_from_here() {
        // Unwind this test's own stack: copy it and the registers, then
        // check the walk gets past this function into the test harness.
        let (ip, sp, bp): (u64, u64, u64);
        // SAFETY: reads three registers, no memory effects.
        unsafe {
            std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp",
                ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
        }
        // Copy up to 16 KiB, but not past the end of this thread's stack mapping.
        let stack_end = crate::procfs::maps(std::process::id())
            .unwrap()
            .into_iter()
            .find(|m| (m.start..m.end).contains(&sp))
            .map(|m| m.end)
            .unwrap();
        let len = (16 * 1024).min((stack_end - sp) as usize);
        // SAFETY: [sp, sp + len) lies in this thread's live stack mapping.
        let stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
        let mut capture = capture_with_stack(stack, Vec::new());
        capture.pid = std::process::id();
        capture.regs = UserRegs {
            ip,
            sp,
            bp,
            orig_ax: -1,
        };
        let mut unwinder = StackUnwinder::new();
        let unwound = unwinder.unwind(&capture);
        assert!(unwound.frames.len() >= 3, "{unwound:?}");
        assert_eq!(unwound.method, "dwarf");
        let binaries = unwinder.cached_binaries();
        assert!(binaries > 0);
        // The second unwind of the same process reuses the parsed tables.
        assert_eq!(unwinder.unwind(&capture), unwound);
        assert_eq!(unwinder.cached_binaries(), binaries);
    }
}
