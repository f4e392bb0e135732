//! Symbolization with one long-lived blazesym `Symbolizer` (it is the cache
//! of parsed binaries; not `Sync`, so it lives on the reporting thread).
use blazesym::{
    MaybeDefault, Pid,
    symbolize::{
        CodeInfo, Input, Symbolized, Symbolizer as Blaze,
        cache::{Cache, Process as ProcessCache},
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
        }
    }

    /// Remembers `pid`'s mappings so its stacks still symbolize after it exits.
    pub fn cache_process(&self, pid: u32) {
        let mut cache = ProcessCache::new(Pid::from(pid));
        cache.cache_vmas = true;
        cache.cache_perf_map = false;
        let _ = self.blaze.cache(&Cache::Process(cache));
    }

    /// Symbolizes an unwound user stack of process `pid`. Return addresses
    /// are looked up at `addr - 1` (the call instruction).
    pub fn user_frames(&self, pid: u32, addresses: &[FrameAddress]) -> Vec<Frame> {
        let lookups: Vec<u64> = addresses.iter().map(|a| a.address_for_lookup()).collect();
        let mut process = Process::new(Pid::from(pid));
        process.perf_map = true;
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
        let addr = dogslow_symbolize_probe_target as usize as u64;
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
    fn return_addresses_report_their_own_offset() {
        let addr = dogslow_symbolize_probe_target as usize as u64 + 4;
        let symbolizer = Symbolizer::new();
        let ret = FrameAddress::from_return_address(addr).unwrap();
        let frames = symbolizer.user_frames(std::process::id(), &[ret]);
        let frame = frames.last().unwrap();
        assert_eq!(frame.addr, addr);
        assert_eq!(frame.offset, Some(4));
    }
}
