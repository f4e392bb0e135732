//! USDT (SystemTap SDT) probes: reading them from a binary's `.note.stapsdt`
//! notes and decoding their x86-64 argument specifications.
//!
//! A probe site is a `nop` at `pc` plus a note that says where it is, which
//! provider and name it has, where its semaphore is (a `u16` the program
//! checks before preparing the probe's arguments; the kernel increments it
//! while a uprobe with that "reference counter" is attached) and how to find
//! each argument at the `nop` (`8@%rdi`, `-4@-144(%rbp)`, `-4@$1`, ...).
//!
//! Everything here is in file terms: the uprobe wants the probe's file
//! offset, and the kernel's `ref_ctr_offset` is the semaphore's file offset.
use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use object::{
    Endianness,
    elf::{PF_X, PT_LOAD, SHT_NOTE},
    read::elf::{ElfFile64, ProgramHeader as _, SectionHeader as _},
};
use thiserror::Error;

use crate::elf::{ElfError, ElfImage};

/// `n_type` of a SystemTap probe note (owner "stapsdt").
const NT_STAPSDT: u32 = 3;
const STAPSDT_OWNER: &[u8] = b"stapsdt";
/// The section whose link-time address the notes' `base` field recorded;
/// when a tool like prelink moved the image, the difference adjusts them.
const STAPSDT_BASE_SECTION: &[u8] = b".stapsdt.base";

#[derive(Debug, Error)]
pub enum UsdtError {
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("{path}: {reason}")]
    Malformed { path: PathBuf, reason: String },
    #[error(
        "{path} has no USDT probes (no .note.stapsdt notes: it was built without <sys/sdt.h> \
         probes, or they were stripped); probe a function instead, listed by \
         `dogslow probes --binary {path} --filter TEXT`"
    )]
    NoProbes { path: PathBuf },
    #[error(
        "{path} has no USDT provider `{provider}`; its providers are: {providers} \
         (list the probes with `dogslow probes --binary {path}`)"
    )]
    UnknownProvider {
        path: PathBuf,
        provider: String,
        providers: String,
    },
    #[error("{path}: USDT provider `{provider}` has no probe `{name}`; its probes are: {probes}")]
    UnknownProbe {
        path: PathBuf,
        provider: String,
        name: String,
        probes: String,
    },
    #[error(
        "USDT probe {probe} has {count} argument{plural}{specs}; there is no arg{index} \
         (arguments are numbered from arg0)",
        plural = if *count == 1 { "" } else { "s" }
    )]
    NoSuchArgument {
        probe: String,
        index: usize,
        count: usize,
        /// ` (arg0 = 8@%rdi, ...)`, or empty.
        specs: String,
    },
    #[error("USDT argument `{spec}` is not understood: {reason}")]
    BadArgSpec { spec: String, reason: String },
    #[error("USDT probe {probe}: arg{index} (`{spec}`) cannot be captured: {reason}")]
    Unsupported {
        probe: String,
        index: usize,
        spec: String,
        reason: String,
    },
    #[error(
        "{path}: USDT probe {probe} is at {address:#x}, which no executable loadable segment \
         holds; the binary is malformed or was rewritten"
    )]
    NotExecutable {
        path: PathBuf,
        probe: String,
        address: u64,
    },
    #[error(
        "{path}: the semaphore of USDT probe {probe} is at {address:#x}, which no writable \
         file-backed segment holds; the kernel cannot count it"
    )]
    BadSemaphore {
        path: PathBuf,
        probe: String,
        address: u64,
    },
}

/// One USDT probe site. A provider:name pair may have several sites (one
/// per place the macro was expanded); each is its own `UsdtProbe`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    pub provider: String,
    pub name: String,
    /// The probe's link-time virtual address, `.stapsdt.base`-adjusted.
    pub pc: u64,
    /// Where the probe is in the file: the uprobe's offset.
    pub file_offset: u64,
    /// The semaphore's link-time virtual address, when the probe has one.
    pub semaphore: Option<u64>,
    /// The semaphore's file offset: the uprobe's `ref_ctr_offset`.
    pub semaphore_offset: Option<u64>,
    /// The argument specifications as the note has them (`8@%rdi -4@$1`).
    pub arg_text: String,
}

impl UsdtProbe {
    /// `provider:name`.
    pub fn qualified_name(&self) -> String {
        format!("{}:{}", self.provider, self.name)
    }

    /// How many arguments the probe passes.
    pub fn arg_count(&self) -> usize {
        self.arg_text.split_whitespace().count()
    }

    /// Every argument, decoded.
    pub fn args(&self) -> Result<Vec<UsdtArg>, UsdtError> {
        self.arg_text.split_whitespace().map(parse_arg).collect()
    }

    /// Argument `index` (from 0), decoded.
    pub fn arg(&self, index: usize) -> Result<UsdtArg, UsdtError> {
        match self.arg_text.split_whitespace().nth(index) {
            Some(text) => parse_arg(text),
            None => {
                let specs: Vec<String> = self
                    .arg_text
                    .split_whitespace()
                    .enumerate()
                    .map(|(i, spec)| format!("arg{i} = {spec}"))
                    .collect();
                Err(UsdtError::NoSuchArgument {
                    probe: self.qualified_name(),
                    index,
                    count: specs.len(),
                    specs: if specs.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", specs.join(", "))
                    },
                })
            }
        }
    }

    /// How the eBPF side reads argument `index` at this probe from the
    /// probe's `struct pt_regs` (and user memory). Symbols (`NBuffers(%rip)`)
    /// are resolved against `image`, the file the probe was read from.
    pub fn arg_read(&self, index: usize, image: &ElfImage) -> Result<ArgRead, UsdtError> {
        let arg = self.arg(index)?;
        let unsupported = |reason: String| UsdtError::Unsupported {
            probe: self.qualified_name(),
            index,
            spec: arg.text.clone(),
            reason,
        };
        let source = match &arg.location {
            ArgLocation::Register(register) => ArgSource::Register {
                regs_offset: register.pt_regs_offset(),
            },
            ArgLocation::Memory { base, offset } => ArgSource::Memory {
                regs_offset: base.pt_regs_offset(),
                offset: *offset,
            },
            ArgLocation::Constant(value) => ArgSource::Constant(*value),
            ArgLocation::Symbol { name, addend, .. } => {
                // At a uprobe the saved instruction pointer is the probe's
                // address, so a symbol's run-time address is that plus its
                // link-time distance from the probe, with or without ASLR.
                let address = symbol_address(image, name).ok_or_else(|| {
                    unsupported(format!(
                        "symbol `{name}` is in neither .symtab nor .dynsym of {}",
                        image.path().display()
                    ))
                })?;
                ArgSource::Memory {
                    regs_offset: Register::Rip.pt_regs_offset(),
                    offset: (address as i64)
                        .wrapping_add(*addend)
                        .wrapping_sub(self.pc as i64),
                }
            }
            ArgLocation::Indexed { .. } => {
                return Err(unsupported(
                    "base + index * scale addressing is not supported for capture".into(),
                ));
            }
        };
        Ok(ArgRead {
            size: arg.size,
            signed: arg.signed,
            source,
        })
    }
}

/// One decoded argument specification, `[-]SIZE@LOCATION`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtArg {
    /// The specification as written (`-4@-144(%rbp)`).
    pub text: String,
    /// Bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// A leading `-`: the value is signed (sign-extend it).
    pub signed: bool,
    pub location: ArgLocation,
}

impl fmt::Display for UsdtArg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Where an argument's value is at the probe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ArgLocation {
    /// In a register (`%rdi`, `%r14d`, `%al`: the low `size` bytes).
    Register(Register),
    /// In memory at a register plus an offset (`-144(%rbp)`, `(%r12)`).
    Memory { base: Register, offset: i64 },
    /// In memory at `offset + base + index * scale`
    /// (`8(%rax,%rdx,8)`, `(,%rcx,4)`).
    Indexed {
        base: Option<Register>,
        index: Register,
        scale: u8,
        offset: i64,
    },
    /// A constant (`$42`).
    Constant(i64),
    /// In memory at a link-time symbol plus `addend`: RIP-relative
    /// (`NBuffers(%rip)`, `40+CheckpointStats(%rip)`) or absolute
    /// (`counter`, in non-PIE code).
    Symbol {
        name: String,
        addend: i64,
        rip_relative: bool,
    },
}

/// How to read an argument at the probe: what the eBPF side needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ArgRead {
    /// Bytes: 1, 2, 4 or 8 (the low bytes of a register; a read of this
    /// many bytes from memory).
    pub size: u8,
    /// Sign-extend from `size` bytes.
    pub signed: bool,
    pub source: ArgSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgSource {
    /// The register at byte `regs_offset` of `struct pt_regs`.
    Register {
        regs_offset: u32,
    },
    /// User memory at (the register at `regs_offset`) + `offset`.
    Memory {
        regs_offset: u32,
        offset: i64,
    },
    Constant(i64),
}

/// An x86-64 register an argument can name, as the 64-bit register it is
/// part of (`%eax`, `%ax` and `%al` are `Rax`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Register {
    R15,
    R14,
    R13,
    R12,
    Rbp,
    Rbx,
    R11,
    R10,
    R9,
    R8,
    Rax,
    Rcx,
    Rdx,
    Rsi,
    Rdi,
    Rip,
    Rsp,
}

/// Names: 64-bit, 32-bit, 16-bit, low 8-bit.
const REGISTER_NAMES: [(Register, [&str; 4]); 17] = [
    (Register::Rax, ["rax", "eax", "ax", "al"]),
    (Register::Rbx, ["rbx", "ebx", "bx", "bl"]),
    (Register::Rcx, ["rcx", "ecx", "cx", "cl"]),
    (Register::Rdx, ["rdx", "edx", "dx", "dl"]),
    (Register::Rsi, ["rsi", "esi", "si", "sil"]),
    (Register::Rdi, ["rdi", "edi", "di", "dil"]),
    (Register::Rbp, ["rbp", "ebp", "bp", "bpl"]),
    (Register::Rsp, ["rsp", "esp", "sp", "spl"]),
    (Register::R8, ["r8", "r8d", "r8w", "r8b"]),
    (Register::R9, ["r9", "r9d", "r9w", "r9b"]),
    (Register::R10, ["r10", "r10d", "r10w", "r10b"]),
    (Register::R11, ["r11", "r11d", "r11w", "r11b"]),
    (Register::R12, ["r12", "r12d", "r12w", "r12b"]),
    (Register::R13, ["r13", "r13d", "r13w", "r13b"]),
    (Register::R14, ["r14", "r14d", "r14w", "r14b"]),
    (Register::R15, ["r15", "r15d", "r15w", "r15b"]),
    (Register::Rip, ["rip", "eip", "ip", ""]),
];

impl Register {
    /// The register named `name` (without the `%`), in any width.
    pub fn from_name(name: &str) -> Option<Self> {
        if name.is_empty() {
            return None;
        }
        REGISTER_NAMES
            .iter()
            .find(|(_, names)| names.contains(&name))
            .map(|(register, _)| *register)
    }

    /// The 64-bit name.
    pub fn name(self) -> &'static str {
        REGISTER_NAMES
            .iter()
            .find(|(register, _)| *register == self)
            .map_or("?", |(_, names)| names[0])
    }

    /// Byte offset of the register in x86-64's `struct pt_regs`.
    pub fn pt_regs_offset(self) -> u32 {
        match self {
            Self::R15 => 0,
            Self::R14 => 8,
            Self::R13 => 16,
            Self::R12 => 24,
            Self::Rbp => 32,
            Self::Rbx => 40,
            Self::R11 => 48,
            Self::R10 => 56,
            Self::R9 => 64,
            Self::R8 => 72,
            Self::Rax => 80,
            Self::Rcx => 88,
            Self::Rdx => 96,
            Self::Rsi => 104,
            Self::Rdi => 112,
            // orig_rax is at 120.
            Self::Rip => 128,
            // cs 136, eflags 144.
            Self::Rsp => 152,
        }
    }
}

/// Every USDT probe site in `image`, in note order. A binary without
/// `.note.stapsdt` has none (an empty list, not an error).
pub fn read_probes(image: &ElfImage) -> Result<Vec<UsdtProbe>, UsdtError> {
    let path = image.path();
    let malformed = |reason: String| UsdtError::Malformed {
        path: path.to_owned(),
        reason,
    };
    let file = ElfFile64::<Endianness>::parse(image.bytes()).map_err(|err| {
        malformed(format!(
            "cannot read it as a 64-bit ELF file ({err}); dogslow supports x86-64 binaries"
        ))
    })?;
    let endian = file.endian();
    let data = image.bytes();
    let sections = file.elf_section_table();

    let stapsdt_base = sections
        .iter()
        .find(|section| {
            sections
                .section_name(endian, section)
                .is_ok_and(|name| name == STAPSDT_BASE_SECTION)
        })
        .map(|section| section.sh_addr(endian));
    let segments: Vec<Segment> = file
        .elf_program_headers()
        .iter()
        .filter(|header| header.p_type(endian) == PT_LOAD)
        .map(|header| Segment {
            vaddr: header.p_vaddr(endian),
            offset: header.p_offset(endian),
            file_size: header.p_filesz(endian),
            executable: header.p_flags(endian).0 & PF_X.0 != 0,
        })
        .collect();

    let mut probes = Vec::new();
    for section in sections.iter() {
        if section.sh_type(endian) != SHT_NOTE {
            continue;
        }
        let Some(mut notes) = section
            .notes(endian, data)
            .map_err(|err| malformed(format!("bad note section: {err}")))?
        else {
            continue;
        };
        while let Some(note) = notes
            .next()
            .map_err(|err| malformed(format!("bad note: {err}")))?
        {
            if note.name() != STAPSDT_OWNER || note.n_type(endian).0 != NT_STAPSDT {
                continue;
            }
            let raw = parse_note_desc(note.desc(), endian)
                .ok_or_else(|| malformed("truncated stapsdt note".into()))?;
            probes.push(raw.resolve(path, stapsdt_base, &segments)?);
        }
    }
    Ok(probes)
}

/// Every USDT probe site in the binary at `path`.
pub fn read_probes_at(path: &Path) -> Result<Vec<UsdtProbe>, UsdtError> {
    read_probes(&ElfImage::open(path)?)
}

/// The sites of probe `provider:name` in `image` (at least one), or an
/// error that lists what the binary does have.
pub fn find_probes(
    image: &ElfImage,
    provider: &str,
    name: &str,
) -> Result<Vec<UsdtProbe>, UsdtError> {
    let probes = read_probes(image)?;
    select(image.path(), probes, provider, name)
}

fn select(
    path: &Path,
    probes: Vec<UsdtProbe>,
    provider: &str,
    name: &str,
) -> Result<Vec<UsdtProbe>, UsdtError> {
    if probes.is_empty() {
        return Err(UsdtError::NoProbes {
            path: path.to_owned(),
        });
    }
    let providers: BTreeSet<&str> = probes.iter().map(|p| p.provider.as_str()).collect();
    if !providers.contains(provider) {
        return Err(UsdtError::UnknownProvider {
            path: path.to_owned(),
            provider: provider.into(),
            providers: providers.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    let names: BTreeSet<&str> = probes
        .iter()
        .filter(|p| p.provider == provider)
        .map(|p| p.name.as_str())
        .collect();
    if !names.contains(name) {
        return Err(UsdtError::UnknownProbe {
            path: path.to_owned(),
            provider: provider.into(),
            name: name.into(),
            probes: names.into_iter().collect::<Vec<_>>().join(", "),
        });
    }
    Ok(probes
        .into_iter()
        .filter(|p| p.provider == provider && p.name == name)
        .collect())
}

/// A loadable segment: where link-time addresses are in the file.
#[derive(Clone, Copy, Debug)]
struct Segment {
    vaddr: u64,
    offset: u64,
    file_size: u64,
    executable: bool,
}

impl Segment {
    fn file_offset(&self, vaddr: u64) -> Option<u64> {
        (vaddr >= self.vaddr && vaddr - self.vaddr < self.file_size)
            .then(|| self.offset + (vaddr - self.vaddr))
    }
}

/// A note's fields as stored.
#[derive(Debug, PartialEq, Eq)]
struct RawNote {
    pc: u64,
    base: u64,
    semaphore: u64,
    provider: String,
    name: String,
    args: String,
}

/// desc: pc, base, semaphore (each a 64-bit address), then the provider,
/// name and argument strings, each NUL-terminated.
fn parse_note_desc(desc: &[u8], endian: Endianness) -> Option<RawNote> {
    let word = |index: usize| -> Option<u64> {
        let bytes: [u8; 8] = desc.get(index * 8..index * 8 + 8)?.try_into().ok()?;
        Some(match endian {
            Endianness::Little => u64::from_le_bytes(bytes),
            Endianness::Big => u64::from_be_bytes(bytes),
        })
    };
    let (pc, base, semaphore) = (word(0)?, word(1)?, word(2)?);
    let mut strings = desc.get(24..)?.split(|&b| b == 0);
    let mut next = || {
        strings
            .next()
            .map(|s| String::from_utf8_lossy(s).into_owned())
    };
    let provider = next()?;
    let name = next()?;
    // A probe without arguments may end right after its name.
    let args = next().unwrap_or_default();
    Some(RawNote {
        pc,
        base,
        semaphore,
        provider,
        name,
        args,
    })
}

impl RawNote {
    fn resolve(
        self,
        path: &Path,
        stapsdt_base: Option<u64>,
        segments: &[Segment],
    ) -> Result<UsdtProbe, UsdtError> {
        let probe = format!("{}:{}", self.provider, self.name);
        // The note's addresses are as linked; if the image was moved after
        // (prelink), `.stapsdt.base` moved with it and the difference applies
        // to the probe and its semaphore alike.
        let shift = match stapsdt_base {
            Some(actual) if self.base != 0 => actual.wrapping_sub(self.base),
            _ => 0,
        };
        let pc = self.pc.wrapping_add(shift);
        let file_offset = segments
            .iter()
            .filter(|segment| segment.executable)
            .find_map(|segment| segment.file_offset(pc))
            .ok_or_else(|| UsdtError::NotExecutable {
                path: path.to_owned(),
                probe: probe.clone(),
                address: pc,
            })?;
        let semaphore = (self.semaphore != 0).then(|| self.semaphore.wrapping_add(shift));
        let semaphore_offset = semaphore
            .map(|address| {
                segments
                    .iter()
                    .filter(|segment| !segment.executable)
                    .find_map(|segment| segment.file_offset(address))
                    .ok_or_else(|| UsdtError::BadSemaphore {
                        path: path.to_owned(),
                        probe: probe.clone(),
                        address,
                    })
            })
            .transpose()?;
        Ok(UsdtProbe {
            provider: self.provider,
            name: self.name,
            pc,
            file_offset,
            semaphore,
            semaphore_offset,
            arg_text: self.args,
        })
    }
}

/// The link-time address of symbol `name` (.symtab first, then .dynsym).
fn symbol_address(image: &ElfImage, name: &str) -> Option<u64> {
    use object::{Object as _, ObjectSymbol as _};
    let file = object::File::parse(image.bytes()).ok()?;
    file.symbols()
        .chain(file.dynamic_symbols())
        .find(|symbol| symbol.name() == Ok(name) && symbol.address() != 0)
        .map(|symbol| symbol.address())
}

/// Parses one argument specification, `[-]SIZE@LOCATION`.
pub fn parse_arg(text: &str) -> Result<UsdtArg, UsdtError> {
    let bad = |reason: &str| UsdtError::BadArgSpec {
        spec: text.into(),
        reason: reason.into(),
    };
    let Some((size_text, location)) = text.split_once('@') else {
        return Err(bad("expected SIZE@LOCATION, e.g. 8@%rdi"));
    };
    let (signed, size_digits) = match size_text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, size_text),
    };
    let size = match size_digits.parse::<u8>() {
        Ok(size @ (1 | 2 | 4 | 8)) => size,
        _ => {
            return Err(bad(
                "the size must be 1, 2, 4 or 8 bytes, optionally negative",
            ));
        }
    };
    let location = parse_location(location).map_err(|reason| bad(&reason))?;
    Ok(UsdtArg {
        text: text.into(),
        size,
        signed,
        location,
    })
}

/// An AT&T operand: `%reg`, `$const`, `disp(%base)`, `(%base)`,
/// `disp(%base,%index,scale)`, `sym(%rip)`, `sym`.
fn parse_location(text: &str) -> Result<ArgLocation, String> {
    if let Some(name) = text.strip_prefix('%') {
        return register(name).map(ArgLocation::Register);
    }
    if let Some(value) = text.strip_prefix('$') {
        return parse_integer(value)
            .map(ArgLocation::Constant)
            .ok_or_else(|| format!("`${value}` is not an integer constant"));
    }
    let (displacement, registers) = match text.find('(') {
        Some(open) => {
            let inner = text[open + 1..]
                .strip_suffix(')')
                .ok_or_else(|| format!("`{text}`: unbalanced parentheses"))?;
            (&text[..open], Some(inner))
        }
        None => (text, None),
    };
    let displacement = parse_displacement(displacement)?;
    let Some(registers) = registers else {
        return match displacement {
            Displacement::Symbol { name, addend } => Ok(ArgLocation::Symbol {
                name,
                addend,
                rip_relative: false,
            }),
            Displacement::Number(_) => Err(format!(
                "`{text}`: an absolute numeric address is not a location dogslow can read"
            )),
        };
    };
    let parts: Vec<&str> = registers.split(',').map(str::trim).collect();
    let operand_register = |part: &str| -> Result<Register, String> {
        let name = part
            .strip_prefix('%')
            .ok_or_else(|| format!("`{part}` in `{text}` is not a register"))?;
        register(name)
    };
    match (parts.as_slice(), displacement) {
        ([base], Displacement::Number(offset)) => Ok(ArgLocation::Memory {
            base: operand_register(base)?,
            offset,
        }),
        ([base], Displacement::Symbol { name, addend }) => {
            if operand_register(base)? != Register::Rip {
                return Err(format!(
                    "`{text}`: a symbol relative to a register other than %rip is not supported"
                ));
            }
            Ok(ArgLocation::Symbol {
                name,
                addend,
                rip_relative: true,
            })
        }
        ([base, index, rest @ ..], Displacement::Number(offset)) if rest.len() <= 1 => {
            let scale = match rest.first() {
                None => 1,
                Some(scale) => match scale.parse::<u8>() {
                    Ok(scale @ (1 | 2 | 4 | 8)) => scale,
                    _ => return Err(format!("`{text}`: the scale must be 1, 2, 4 or 8")),
                },
            };
            let base = if base.is_empty() {
                None
            } else {
                Some(operand_register(base)?)
            };
            Ok(ArgLocation::Indexed {
                base,
                index: operand_register(index)?,
                scale,
                offset,
            })
        }
        (_, Displacement::Symbol { .. }) => Err(format!(
            "`{text}`: a symbol with index addressing is not supported"
        )),
        _ => Err(format!("`{text}` is not a memory operand")),
    }
}

fn register(name: &str) -> Result<Register, String> {
    if matches!(name, "ah" | "bh" | "ch" | "dh") {
        return Err(format!("the high-byte register %{name} is not supported"));
    }
    Register::from_name(name).ok_or_else(|| format!("`%{name}` is not an x86-64 register"))
}

#[derive(Debug, PartialEq, Eq)]
enum Displacement {
    Number(i64),
    Symbol { name: String, addend: i64 },
}

/// `-144`, `0x10`, empty (0), `sym`, `sym+8`, `sym-8`, `40+sym`.
fn parse_displacement(text: &str) -> Result<Displacement, String> {
    if text.is_empty() {
        return Ok(Displacement::Number(0));
    }
    if let Some(value) = parse_integer(text) {
        return Ok(Displacement::Number(value));
    }
    // Split into terms at '+' and '-' that are not at the start.
    let mut terms: Vec<(i64, &str)> = Vec::new();
    let mut sign = 1;
    let mut start = 0;
    let bytes = text.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        if (b == b'+' || b == b'-') && i > start {
            terms.push((sign, &text[start..i]));
            sign = if b == b'-' { -1 } else { 1 };
            start = i + 1;
        } else if (b == b'+' || b == b'-') && i == start {
            if b == b'-' {
                sign = -sign;
            }
            start = i + 1;
        }
    }
    terms.push((sign, &text[start..]));
    let mut symbol = None;
    let mut addend: i64 = 0;
    for (sign, term) in terms {
        if let Some(value) = parse_integer(term) {
            addend = addend.wrapping_add(sign * value);
        } else if is_symbol(term) && sign == 1 && symbol.is_none() {
            symbol = Some(term.to_owned());
        } else {
            return Err(format!("`{text}` is not a displacement"));
        }
    }
    match symbol {
        Some(name) => Ok(Displacement::Symbol { name, addend }),
        None => Ok(Displacement::Number(addend)),
    }
}

fn is_symbol(text: &str) -> bool {
    let mut chars = text.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '$')
}

/// Decimal or 0x-hex, optionally negative.
fn parse_integer(text: &str) -> Option<i64> {
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let magnitude = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok()?,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    let value = magnitude as i64;
    Some(if negative {
        value.wrapping_neg()
    } else {
        value
    })
}

#[cfg(test)]
mod tests {
    use std::{fs, process::Command};

    use super::*;

    fn arg(text: &str) -> UsdtArg {
        parse_arg(text).unwrap_or_else(|err| panic!("{text}: {err}"))
    }

    fn location(text: &str) -> ArgLocation {
        arg(text).location
    }

    #[test]
    fn registers_in_every_width() {
        for (text, register, size, signed) in [
            ("8@%rdi", Register::Rdi, 8, false),
            ("-4@%eax", Register::Rax, 4, true),
            ("2@%ax", Register::Rax, 2, false),
            ("1@%al", Register::Rax, 1, false),
            ("1@%dil", Register::Rdi, 1, false),
            ("1@%sil", Register::Rsi, 1, false),
            ("-4@%r14d", Register::R14, 4, true),
            ("2@%r8w", Register::R8, 2, false),
            ("1@%r15b", Register::R15, 1, false),
            ("8@%rsp", Register::Rsp, 8, false),
            ("4@%esp", Register::Rsp, 4, false),
            ("1@%bpl", Register::Rbp, 1, false),
            ("-8@%r12", Register::R12, 8, true),
        ] {
            let parsed = arg(text);
            assert_eq!(parsed.location, ArgLocation::Register(register), "{text}");
            assert_eq!((parsed.size, parsed.signed), (size, signed), "{text}");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn pt_regs_offsets_match_the_kernel_layout() {
        let expected = [
            ("r15", 0),
            ("r14", 8),
            ("r13", 16),
            ("r12", 24),
            ("rbp", 32),
            ("rbx", 40),
            ("r11", 48),
            ("r10", 56),
            ("r9", 64),
            ("r8", 72),
            ("rax", 80),
            ("rcx", 88),
            ("rdx", 96),
            ("rsi", 104),
            ("rdi", 112),
            ("rip", 128),
            ("rsp", 152),
        ];
        for (name, offset) in expected {
            let register = Register::from_name(name).unwrap();
            assert_eq!(register.pt_regs_offset(), offset, "{name}");
            assert_eq!(register.name(), name);
        }
        assert_eq!(Register::from_name("ecx"), Some(Register::Rcx));
        assert_eq!(Register::from_name("r9d"), Some(Register::R9));
        assert_eq!(Register::from_name("xmm0"), None);
        assert_eq!(Register::from_name(""), None);
    }

    #[test]
    fn memory_operands() {
        assert_eq!(
            location("-4@-144(%rbp)"),
            ArgLocation::Memory {
                base: Register::Rbp,
                offset: -144
            }
        );
        assert_eq!(
            location("4@(%r12)"),
            ArgLocation::Memory {
                base: Register::R12,
                offset: 0
            }
        );
        assert_eq!(
            location("4@60(%rax)"),
            ArgLocation::Memory {
                base: Register::Rax,
                offset: 60
            }
        );
        assert_eq!(
            location("8@0x10(%rsp)"),
            ArgLocation::Memory {
                base: Register::Rsp,
                offset: 16
            }
        );
        assert_eq!(
            location("8@8(%rax,%rdx,8)"),
            ArgLocation::Indexed {
                base: Some(Register::Rax),
                index: Register::Rdx,
                scale: 8,
                offset: 8
            }
        );
        assert_eq!(
            location("4@(,%rcx,4)"),
            ArgLocation::Indexed {
                base: None,
                index: Register::Rcx,
                scale: 4,
                offset: 0
            }
        );
        assert_eq!(
            location("4@-8(%rbx,%rsi)"),
            ArgLocation::Indexed {
                base: Some(Register::Rbx),
                index: Register::Rsi,
                scale: 1,
                offset: -8
            }
        );
    }

    #[test]
    fn constants_and_symbols() {
        assert_eq!(location("-4@$1"), ArgLocation::Constant(1));
        assert_eq!(location("-4@$-1"), ArgLocation::Constant(-1));
        assert_eq!(location("4@$8192"), ArgLocation::Constant(8192));
        assert_eq!(location("8@$0x20"), ArgLocation::Constant(32));
        assert_eq!(
            location("-4@NBuffers(%rip)"),
            ArgLocation::Symbol {
                name: "NBuffers".into(),
                addend: 0,
                rip_relative: true
            }
        );
        assert_eq!(
            location("-4@40+CheckpointStats(%rip)"),
            ArgLocation::Symbol {
                name: "CheckpointStats".into(),
                addend: 40,
                rip_relative: true
            }
        );
        assert_eq!(
            location("8@table+8(%rip)"),
            ArgLocation::Symbol {
                name: "table".into(),
                addend: 8,
                rip_relative: true
            }
        );
        assert_eq!(
            location("8@counter-4"),
            ArgLocation::Symbol {
                name: "counter".into(),
                addend: -4,
                rip_relative: false
            }
        );
    }

    #[test]
    fn bad_specs_say_what_is_wrong() {
        for (text, says) in [
            ("%rdi", "SIZE@LOCATION"),
            ("3@%rdi", "1, 2, 4 or 8"),
            ("x@%rdi", "1, 2, 4 or 8"),
            ("8@%xmm0", "not an x86-64 register"),
            ("1@%ah", "high-byte"),
            ("8@$abc", "not an integer"),
            ("8@8(%rax", "parentheses"),
            ("8@8(%rax,%rdx,3)", "scale"),
            ("8@8(rax)", "not a register"),
            ("8@1234", "absolute numeric"),
            ("8@sym(%rbx)", "other than %rip"),
            ("8@sym(%rax,%rdx,8)", "index addressing"),
            ("8@a+b(%rip)", "not a displacement"),
        ] {
            let err = parse_arg(text).unwrap_err().to_string();
            assert!(err.contains(says), "{text}: {err}");
            assert!(err.contains(text), "{text}: {err}");
        }
    }

    #[test]
    fn note_descriptors() {
        let mut desc = Vec::new();
        for word in [0x1234u64, 0x2000, 0x4038] {
            desc.extend_from_slice(&word.to_le_bytes());
        }
        desc.extend_from_slice(b"prov\0probe__x\08@%rdi -4@$1\0");
        let note = parse_note_desc(&desc, Endianness::Little).unwrap();
        assert_eq!(
            note,
            RawNote {
                pc: 0x1234,
                base: 0x2000,
                semaphore: 0x4038,
                provider: "prov".into(),
                name: "probe__x".into(),
                args: "8@%rdi -4@$1".into(),
            }
        );
        // No arguments: the string may be empty or absent.
        let mut bare = desc[..24].to_vec();
        bare.extend_from_slice(b"p\0n\0");
        assert_eq!(parse_note_desc(&bare, Endianness::Little).unwrap().args, "");
        assert_eq!(parse_note_desc(&desc[..20], Endianness::Little), None);
        assert_eq!(parse_note_desc(&desc[..24], Endianness::Little), None);
    }

    #[test]
    fn base_adjustment_moves_probe_and_semaphore() {
        let segments = [
            Segment {
                vaddr: 0x1000,
                offset: 0x1000,
                file_size: 0x1000,
                executable: true,
            },
            Segment {
                vaddr: 0x3dd0,
                offset: 0x2dd0,
                file_size: 0x300,
                executable: false,
            },
        ];
        let note = || RawNote {
            pc: 0x1200,
            base: 0x2000,
            semaphore: 0x3f00,
            provider: "p".into(),
            name: "n".into(),
            args: String::new(),
        };
        let path = Path::new("/x");
        let same = note().resolve(path, Some(0x2000), &segments).unwrap();
        assert_eq!((same.pc, same.file_offset), (0x1200, 0x1200));
        assert_eq!(same.semaphore, Some(0x3f00));
        assert_eq!(same.semaphore_offset, Some(0x2f00));
        // The image was moved by 0x20 after the notes were written.
        let moved = note().resolve(path, Some(0x2020), &segments).unwrap();
        assert_eq!((moved.pc, moved.file_offset), (0x1220, 0x1220));
        assert_eq!(moved.semaphore_offset, Some(0x2f20));
        // No .stapsdt.base: nothing to adjust.
        let plain = note().resolve(path, None, &segments).unwrap();
        assert_eq!(plain.pc, 0x1200);
        // A pc outside the executable segment, a semaphore in .bss.
        let outside = RawNote {
            pc: 0x3e00,
            ..note()
        };
        assert!(matches!(
            outside.resolve(path, None, &segments),
            Err(UsdtError::NotExecutable {
                address: 0x3e00,
                ..
            })
        ));
        let bss = RawNote {
            semaphore: 0x40f0,
            ..note()
        };
        assert!(matches!(
            bss.resolve(path, None, &segments),
            Err(UsdtError::BadSemaphore { .. })
        ));
    }

    const POSTGRES: &str = "/usr/lib/postgresql/15/bin/postgres";

    #[test]
    fn postgres_query_probes() {
        let image = ElfImage::open(Path::new(POSTGRES))
            .unwrap_or_else(|err| panic!("{err} (cargo xtask setup installs postgresql)"));
        let probes = read_probes(&image).unwrap();
        assert!(probes.len() >= 70, "{} probes", probes.len());
        assert!(probes.iter().all(|p| p.provider == "postgresql"));
        for name in ["query__start", "query__done"] {
            let sites = find_probes(&image, "postgresql", name).unwrap();
            assert_eq!(sites.len(), 1, "{name}: {sites:?}");
            let probe = &sites[0];
            assert!(probe.semaphore.is_some(), "{name} has a semaphore");
            // The probe is a nop in the file at its offset.
            assert_eq!(
                image.bytes()[probe.file_offset as usize],
                0x90,
                "{name} at {:#x}",
                probe.file_offset
            );
            // The semaphore's file bytes are its initial value, 0.
            let sema = probe.semaphore_offset.unwrap() as usize;
            assert_eq!(&image.bytes()[sema..sema + 2], &[0, 0]);
            assert_eq!(image.vaddr_to_offset(probe.pc), Some(probe.file_offset));
        }
        let start = &find_probes(&image, "postgresql", "query__start").unwrap()[0];
        assert_eq!(start.arg_count(), 1);
        let query = start.arg(0).unwrap();
        assert_eq!((query.size, query.signed), (8, false));
        assert!(matches!(query.location, ArgLocation::Register(_)));
        let err = start.arg(1).unwrap_err().to_string();
        assert!(err.contains("has 1 argument (arg0 = 8@%"), "{err}");
        assert!(err.contains("no arg1"), "{err}");

        // Every argument of every probe decodes.
        for probe in &probes {
            probe
                .args()
                .unwrap_or_else(|err| panic!("{}: {err}", probe.qualified_name()));
        }
        // A RIP-relative global resolves through the symbol table.
        let (probe, index) = probes
            .iter()
            .find_map(|p| {
                let args = p.args().ok()?;
                let index = args.iter().position(|a| {
                    matches!(&a.location, ArgLocation::Symbol { name, .. } if name == "NBuffers")
                })?;
                Some((p, index))
            })
            .expect("a probe reads NBuffers");
        let read = probe.arg_read(index, &image).unwrap();
        let nbuffers = symbol_address(&image, "NBuffers").unwrap();
        assert_eq!(
            read.source,
            ArgSource::Memory {
                regs_offset: 128,
                offset: nbuffers as i64 - probe.pc as i64
            }
        );
        assert_eq!((read.size, read.signed), (4, true));
    }

    #[test]
    fn unknown_names_list_what_exists() {
        let image = ElfImage::open(Path::new(POSTGRES)).unwrap();
        let err = find_probes(&image, "postgres", "query__start")
            .unwrap_err()
            .to_string();
        assert!(err.contains("no USDT provider `postgres`"), "{err}");
        assert!(err.contains("providers are: postgresql"), "{err}");
        let err = find_probes(&image, "postgresql", "query_start")
            .unwrap_err()
            .to_string();
        assert!(err.contains("has no probe `query_start`"), "{err}");
        assert!(err.contains("query__start"), "{err}");
        assert!(err.contains("query__done"), "{err}");
        // A binary without notes.
        let own = ElfImage::open(&std::env::current_exe().unwrap()).unwrap();
        assert!(read_probes(&own).unwrap().is_empty());
        let err = find_probes(&own, "a", "b").unwrap_err().to_string();
        assert!(err.contains("has no USDT probes"), "{err}");
    }

    /// Compiles a program with <sys/sdt.h> probes: one guarded by a
    /// semaphore, one without at two sites, several argument forms.
    fn compile_sdt_program(dir: &Path) -> PathBuf {
        let source = dir.join("sdt.c");
        fs::write(
            &source,
            r#"
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
volatile unsigned short app_start__req_semaphore __attribute__((section(".probes")));
long counter = 5;
__attribute__((noinline)) void serve(long id, const char *name) {
    if (app_start__req_semaphore)
        DTRACE_PROBE4(app, start__req, id, name, counter, 7);
}
int main(int argc, char **argv) { serve(argc, argv[0]); return 0; }
"#,
        )
        .unwrap();
        let plain = dir.join("plain.c");
        fs::write(
            &plain,
            r#"
#include <sys/sdt.h>
__attribute__((noinline)) void a(int x) { DTRACE_PROBE1(app, end__req, x); __asm__ volatile(""); }
__attribute__((noinline)) void b(int x) { DTRACE_PROBE1(app, end__req, x + 1); __asm__ volatile(""); }
"#,
        )
        .unwrap();
        let out = dir.join("sdt");
        let status = Command::new("gcc")
            .args(["-O2", "-o"])
            .arg(&out)
            .arg(&source)
            .arg(&plain)
            .status()
            .expect("gcc is needed (cargo xtask setup installs it)");
        assert!(
            status.success(),
            "compiling with <sys/sdt.h> failed: install systemtap-sdt-dev (cargo xtask setup)"
        );
        out
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("dogslow-usdt-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn compiled_sdt_program() {
        let dir = temp_dir("compiled");
        let binary = compile_sdt_program(&dir);
        let image = ElfImage::open(&binary).unwrap();
        let probes = read_probes(&image).unwrap();
        fs::remove_dir_all(&dir).unwrap();

        let start = select(image.path(), probes.clone(), "app", "start__req").unwrap();
        assert_eq!(start.len(), 1);
        let start = &start[0];
        let semaphore = start.semaphore.unwrap();
        assert_eq!(
            Some(semaphore),
            symbol_address(&image, "app_start__req_semaphore")
        );
        assert_eq!(
            start.semaphore_offset,
            image.vaddr_to_offset(semaphore),
            "the semaphore's file offset"
        );
        assert_eq!(image.bytes()[start.file_offset as usize], 0x90, "a nop");
        assert_eq!(start.arg_count(), 4);
        let args = start.args().unwrap();
        assert_eq!(args[0].size, 8);
        assert!(matches!(args[0].location, ArgLocation::Register(_)));
        assert!(matches!(
            &args[2].location,
            ArgLocation::Symbol { name, rip_relative: true, .. } if name == "counter"
        ));
        assert_eq!(args[3].location, ArgLocation::Constant(7));
        assert_eq!(
            start.arg_read(3, &image).unwrap().source,
            ArgSource::Constant(7)
        );
        let counter = symbol_address(&image, "counter").unwrap();
        assert_eq!(
            start.arg_read(2, &image).unwrap().source,
            ArgSource::Memory {
                regs_offset: Register::Rip.pt_regs_offset(),
                offset: counter as i64 - start.pc as i64
            }
        );
        let err = start.arg(4).unwrap_err().to_string();
        assert!(err.contains("has 4 arguments"), "{err}");

        let ends = select(image.path(), probes, "app", "end__req").unwrap();
        assert_eq!(ends.len(), 2, "two sites: {ends:?}");
        assert_ne!(ends[0].file_offset, ends[1].file_offset);
        for end in &ends {
            assert_eq!(end.semaphore, None);
            assert_eq!(end.semaphore_offset, None);
            assert_eq!(image.bytes()[end.file_offset as usize], 0x90);
            assert_eq!(end.arg(0).unwrap().size, 4);
        }
    }

    #[test]
    fn moved_image_is_adjusted_by_stapsdt_base() {
        let dir = temp_dir("moved");
        let binary = compile_sdt_program(&dir);
        let original = read_probes(&ElfImage::open(&binary).unwrap()).unwrap();
        // Rewrite each note's base as if the image had been linked 0x10
        // higher and moved down since: probes and semaphores move by -0x10.
        let mut bytes = fs::read(&binary).unwrap();
        let file = ElfFile64::<Endianness>::parse(&*bytes).unwrap();
        let endian = file.endian();
        let section = file
            .elf_section_table()
            .iter()
            .find(|s| {
                file.elf_section_table()
                    .section_name(endian, s)
                    .is_ok_and(|n| n == b".note.stapsdt")
            })
            .unwrap();
        let (start, size) = (
            section.sh_offset(endian) as usize,
            section.sh_size(endian) as usize,
        );
        drop(file);
        let mut at = start;
        while at < start + size {
            let word = |i: usize| u32::from_le_bytes(bytes[at + i..at + i + 4].try_into().unwrap());
            let (namesz, descsz) = (word(0) as usize, word(4) as usize);
            let desc = at + 12 + namesz.div_ceil(4) * 4;
            let base = u64::from_le_bytes(bytes[desc + 8..desc + 16].try_into().unwrap());
            bytes[desc + 8..desc + 16].copy_from_slice(&(base + 0x10).to_le_bytes());
            at = desc + descsz.div_ceil(4) * 4;
        }
        let moved_path = dir.join("moved");
        fs::write(&moved_path, &bytes).unwrap();
        let moved = read_probes(&ElfImage::open(&moved_path).unwrap()).unwrap();
        fs::remove_dir_all(&dir).unwrap();
        assert_eq!(moved.len(), original.len());
        for (before, after) in original.iter().zip(&moved) {
            assert_eq!(after.pc, before.pc - 0x10);
            assert_eq!(after.file_offset, before.file_offset - 0x10);
            assert_eq!(after.semaphore, before.semaphore.map(|s| s - 0x10));
            assert_eq!(
                after.semaphore_offset,
                before.semaphore_offset.map(|s| s - 0x10)
            );
        }
    }
}
