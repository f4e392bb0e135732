//! Turning probe specifications into attach points: which file, at which
//! file offset, for a given process.
use std::path::{Path, PathBuf};

use thiserror::Error;

use dogslow_common::{CaptureSpec, MAX_CAPTURES};

use crate::{
    elf::{ElfError, ElfImage},
    probe_cost::{self, FirstInstruction},
    probe_spec::{ProbeLocation, ProbeSpec},
    procfs::{self, ProcError},
    request_args::{self, ArgumentLocation, CaptureError, CaptureRequest},
    usdt::{self, ArgSource, UsdtError, UsdtProbe},
};

#[derive(Debug, Error)]
pub enum TargetError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error("process {pid} does not map a library named `{library}`; it maps: {mapped}")]
    LibraryNotMapped {
        pid: u32,
        library: String,
        mapped: String,
    },
    #[error(transparent)]
    Usdt(#[from] UsdtError),
    #[error(transparent)]
    Capture(#[from] CaptureError),
    #[error(
        "file offset {offset:#x} is not code in {path} (no executable segment holds \
         it); list the functions and their offsets with `dogslow probes --binary {path} --filter \
         NAME`"
    )]
    NotCode { offset: u64, path: String },
    #[error(
        "{function} is {size} bytes long, so offset {offset} is past its end; the \
         offset must be an instruction boundary inside it (see `objdump -d`)"
    )]
    PastFunctionEnd {
        function: String,
        size: u64,
        offset: u64,
    },
    #[error(
        "{path} is a Go program, which dogslow does not probe: Go runs each goroutine on any \
         thread and moves its stack, so requests followed by their thread would be reported \
         stalled when they are not, and the return probes used without --exit crash Go \
         programs. Use Go's own tools for it (net/http/pprof, runtime/trace)"
    )]
    GoProgram { path: PathBuf },
}

/// A probe resolved to a file and offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPoint {
    /// A path the kernel can open from dogslow's mount namespace.
    pub path: PathBuf,
    pub file_offset: u64,
    /// A USDT semaphore to raise while attached (its file offset).
    pub ref_ctr_offset: Option<u64>,
    /// The USDT probe site, for its argument specifications.
    pub usdt: Option<UsdtProbe>,
    /// The probed instruction: how dear each hit is.
    pub instruction: FirstInstruction,
    /// Known to be inside a function, past its first instruction (where a
    /// return probe must not go).
    pub mid_function: bool,
}

impl AttachPoint {
    fn with_usdt(self, site: UsdtProbe) -> Self {
        Self {
            usdt: Some(site),
            ..self
        }
    }
}

/// The object file `spec` lives in, for process `pid`, as a host path.
pub fn object_for_pid(pid: u32, spec: &ProbeSpec) -> Result<PathBuf, TargetError> {
    let Some(library) = &spec.library else {
        // The exe link resolves to the process's executable even across
        // mount namespaces.
        if !procfs::process_exists(pid) {
            return Err(ProcError::NoSuchProcess { pid }.into());
        }
        return Ok(PathBuf::from(format!("/proc/{pid}/exe")));
    };
    let mappings = procfs::maps(pid)?;
    let mut libraries: Vec<&str> = mappings
        .iter()
        .filter(|m| m.is_file() && m.executable)
        .map(|m| m.path.as_str())
        .collect();
    libraries.dedup();
    let found = libraries.iter().find(|path| library_matches(path, library));
    match found {
        Some(path) => Ok(procfs::path_in_process_root(pid, path)),
        None => Err(TargetError::LibraryNotMapped {
            pid,
            library: library.clone(),
            mapped: libraries
                .iter()
                .map(|p| p.rsplit('/').next().unwrap_or(p))
                .collect::<Vec<_>>()
                .join(", "),
        }),
    }
}

/// `libc` matches `/usr/lib/x86_64-linux-gnu/libc.so.6`, as do `libc.so.6`
/// and the full path.
fn library_matches(path: &str, library: &str) -> bool {
    if library.starts_with('/') {
        return path == library;
    }
    let base = path.rsplit('/').next().unwrap_or(path);
    base == library
        || base
            .strip_prefix(library)
            .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('-'))
}

/// Resolves `spec` in `object` to the places to probe: one for a function
/// or file offset, one per site for a USDT probe (a probe macro expanded in
/// several places has several sites).
pub fn resolve(object: &Path, spec: &ProbeSpec) -> Result<Vec<AttachPoint>, TargetError> {
    let image = ElfImage::open(object)?;
    if image.is_go() {
        // `/proc/PID/exe` names the program it links to.
        let path = std::fs::read_link(object).unwrap_or_else(|_| object.to_owned());
        return Err(TargetError::GoProgram { path });
    }
    let point = |file_offset, mid_function| AttachPoint {
        path: object.to_owned(),
        file_offset,
        ref_ctr_offset: None,
        usdt: None,
        instruction: probe_cost::at(&image, file_offset),
        mid_function,
    };
    let shown = || object.display().to_string();
    Ok(match &spec.location {
        ProbeLocation::FileOffset(offset) => {
            if !image.is_code(*offset) {
                return Err(TargetError::NotCode {
                    offset: *offset,
                    path: shown(),
                });
            }
            vec![point(*offset, image.is_mid_function(*offset))]
        }
        ProbeLocation::Symbol { name, offset } => {
            let function = image.find_function(name)?;
            // Symbols without a size (hand-written assembly) are taken on trust.
            if function.size > 0 && *offset >= function.size {
                return Err(TargetError::PastFunctionEnd {
                    function: name.clone(),
                    size: function.size,
                    offset: *offset,
                });
            }
            let at = function.file_offset + offset;
            if !image.is_code(at) {
                return Err(TargetError::NotCode {
                    offset: at,
                    path: shown(),
                });
            }
            vec![point(at, *offset != 0)]
        }
        ProbeLocation::Usdt { provider, name } => usdt::find_probes(&image, provider, name)?
            .into_iter()
            .map(|site| {
                AttachPoint {
                    ref_ctr_offset: site.semaphore_offset,
                    ..point(site.file_offset, false)
                }
                .with_usdt(site)
            })
            .collect(),
    })
}

/// Where each `--capture` of a target is at this entry point: SysV
/// registers for a function, the site's argument specification for a USDT
/// probe.
pub fn capture_specs(
    point: &AttachPoint,
    captures: &[CaptureRequest],
    capture_len: u32,
) -> Result<[CaptureSpec; MAX_CAPTURES], TargetError> {
    let mut specs = [CaptureSpec::default(); MAX_CAPTURES];
    let image = match &point.usdt {
        Some(_) if !captures.is_empty() => Some(ElfImage::open(&point.path)?),
        _ => None,
    };
    for (slot, capture) in specs.iter_mut().zip(captures) {
        *slot = match (&point.usdt, &image) {
            (Some(site), Some(image)) => {
                let read = site.arg_read(capture.arg as usize, image)?;
                let location = match read.source {
                    ArgSource::Register { regs_offset } => ArgumentLocation::Register {
                        register: regs_offset / 8,
                    },
                    ArgSource::Memory {
                        regs_offset,
                        offset,
                    } => ArgumentLocation::Memory {
                        register: regs_offset / 8,
                        displacement: offset,
                    },
                    ArgSource::Constant(value) => ArgumentLocation::Constant(value),
                };
                let size = i32::from(read.size) * if read.signed { -1 } else { 1 };
                request_args::probe_argument(capture, location, size, capture_len)
            }
            _ => request_args::function_argument(capture, capture_len)?,
        };
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn library_names() {
        let libc = "/usr/lib/x86_64-linux-gnu/libc.so.6";
        assert!(library_matches(libc, "libc"));
        assert!(library_matches(libc, "libc.so.6"));
        assert!(library_matches(libc, libc));
        assert!(!library_matches(libc, "libcrypto"));
        assert!(!library_matches("/usr/lib/libcrypt.so.1", "libc"));
        assert!(library_matches("/usr/lib/libssl-3.so", "libssl"));
    }

    #[test]
    fn own_process_libc() {
        let spec: ProbeSpec = "libc.so.6:getpid".parse().unwrap();
        let object = object_for_pid(std::process::id(), &spec).unwrap();
        let points = resolve(&object, &spec).unwrap();
        assert_eq!(points.len(), 1);
        assert!(points[0].file_offset > 0);
        let missing: ProbeSpec = "libnotthere.so:f".parse().unwrap();
        let err = object_for_pid(std::process::id(), &missing)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("does not map a library named `libnotthere.so`"),
            "{err}"
        );
        assert!(err.contains("libc.so.6"), "{err}");
    }
}
