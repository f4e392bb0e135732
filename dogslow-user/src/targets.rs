//! Turning probe specifications into attach points: which file, at which
//! file offset, for a given process.
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::{
    elf::{ElfError, ElfImage},
    probe_spec::{ProbeLocation, ProbeSpec},
    procfs::{self, ProcError},
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
    #[error("`{spec}`: USDT probes are not supported yet")]
    UsdtUnsupported { spec: String },
}

/// A probe resolved to a file and offset.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachPoint {
    /// A path the kernel can open from dogslow's mount namespace.
    pub path: PathBuf,
    pub file_offset: u64,
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

/// Resolves `spec` in `object` to a file offset.
pub fn resolve(object: &Path, spec: &ProbeSpec) -> Result<AttachPoint, TargetError> {
    let file_offset = match &spec.location {
        ProbeLocation::FileOffset(offset) => {
            // Still check it is ELF, so a wrong file gets a clear error.
            ElfImage::open(object)?;
            *offset
        }
        ProbeLocation::Symbol { name, offset } => {
            let image = ElfImage::open(object)?;
            image.find_function(name)?.file_offset + offset
        }
        ProbeLocation::Usdt { .. } => {
            return Err(TargetError::UsdtUnsupported {
                spec: spec.text.clone(),
            });
        }
    };
    Ok(AttachPoint {
        path: object.to_owned(),
        file_offset,
    })
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
        let point = resolve(&object, &spec).unwrap();
        assert!(point.file_offset > 0);
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
