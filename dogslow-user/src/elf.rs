//! ELF lookups on target binaries: function symbols (for probe placement and
//! "did you mean" suggestions), virtual address to file offset, and sections.
use std::{
    fs, io,
    path::{Path, PathBuf},
    sync::Arc,
};

use memmap2::Mmap;
use object::{Object as _, ObjectSegment as _, ObjectSymbol as _, SymbolKind};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ElfError {
    #[error("cannot open {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "{path} is not an ELF executable or library ({reason}); point dogslow at the native \
         binary the process runs (for scripts, the interpreter)"
    )]
    NotElf { path: PathBuf, reason: String },
    #[error("{message}")]
    SymbolNotFound { message: String },
    #[error(
        "`{name}` matches several functions in {path}: {candidates}; give the exact (mangled) name"
    )]
    Ambiguous {
        name: String,
        path: PathBuf,
        candidates: String,
    },
    #[error("{path}: address {vaddr:#x} of `{name}` is not in any loadable segment")]
    NotLoaded {
        path: PathBuf,
        name: String,
        vaddr: u64,
    },
}

/// An ELF file mapped read-only. Cheap to clone.
#[derive(Clone)]
pub struct ElfImage {
    path: PathBuf,
    data: Arc<Mmap>,
}

/// A function symbol found in an image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FunctionSymbol {
    pub name: String,
    pub vaddr: u64,
    pub size: u64,
    pub file_offset: u64,
}

impl ElfImage {
    /// Maps `path` and checks it is ELF.
    pub fn open(path: &Path) -> Result<Self, ElfError> {
        let file = fs::File::open(path).map_err(|source| ElfError::Open {
            path: path.to_owned(),
            source,
        })?;
        if file.metadata().is_ok_and(|metadata| !metadata.is_file()) {
            return Err(ElfError::NotElf {
                path: path.to_owned(),
                reason: "not a regular file".into(),
            });
        }
        // SAFETY: the mapping is read-only and private; a binary changing under
        // us would only give wrong symbols, which the parser tolerates.
        let data = unsafe { Mmap::map(&file) }.map_err(|source| ElfError::Open {
            path: path.to_owned(),
            source,
        })?;
        let image = Self {
            path: path.to_owned(),
            data: Arc::new(data),
        };
        image.parse()?;
        Ok(image)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The whole file.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    fn parse(&self) -> Result<object::File<'_>, ElfError> {
        let not_elf = |reason: String| ElfError::NotElf {
            path: self.path.clone(),
            reason,
        };
        if !self.data.starts_with(b"\x7fELF") {
            return Err(not_elf("no ELF magic".into()));
        }
        let file = object::File::parse(&**self.data).map_err(|err| not_elf(err.to_string()))?;
        if file.format() != object::BinaryFormat::Elf {
            return Err(not_elf("not ELF".into()));
        }
        Ok(file)
    }

    /// Every function symbol (`.symtab` and `.dynsym`), with its file offset.
    pub fn functions(&self) -> Vec<FunctionSymbol> {
        let Ok(file) = self.parse() else {
            return Vec::new();
        };
        let mut functions: Vec<FunctionSymbol> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|symbol| symbol.kind() == SymbolKind::Text && symbol.address() != 0)
            .filter_map(|symbol| {
                let name = symbol.name().ok()?.to_owned();
                let vaddr = symbol.address();
                Some(FunctionSymbol {
                    file_offset: vaddr_to_offset(&file, vaddr)?,
                    name,
                    vaddr,
                    size: symbol.size(),
                })
            })
            .collect();
        functions.sort_by(|a, b| a.name.cmp(&b.name).then(a.vaddr.cmp(&b.vaddr)));
        functions.dedup_by(|a, b| a.name == b.name && a.vaddr == b.vaddr);
        functions
    }

    /// Finds the function `name`: its exact symbol name first, then its
    /// demangled name (with or without the Rust hash), then a unique
    /// demangled name ending in `::name`.
    pub fn find_function(&self, name: &str) -> Result<FunctionSymbol, ElfError> {
        let functions = self.functions();
        if let Some(found) = functions.iter().find(|f| f.name == name) {
            return Ok(found.clone());
        }
        let demangled: Vec<(String, &FunctionSymbol)> =
            functions.iter().map(|f| (demangle(&f.name), f)).collect();
        let exact: Vec<&FunctionSymbol> = demangled
            .iter()
            .filter(|(d, _)| d == name)
            .map(|(_, f)| *f)
            .collect();
        let suffix = format!("::{name}");
        let candidates = if exact.is_empty() {
            demangled
                .iter()
                .filter(|(d, _)| d.ends_with(&suffix))
                .map(|(_, f)| *f)
                .collect()
        } else {
            exact
        };
        match candidates.as_slice() {
            [] => Err(ElfError::SymbolNotFound {
                message: self.not_found_message(name, &demangled),
            }),
            [one] => Ok((*one).clone()),
            many if many.iter().all(|f| f.vaddr == many[0].vaddr) => Ok(many[0].clone()),
            many => Err(ElfError::Ambiguous {
                name: name.into(),
                path: self.path.clone(),
                candidates: many
                    .iter()
                    .take(5)
                    .map(|f| f.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            }),
        }
    }

    fn not_found_message(&self, name: &str, demangled: &[(String, &FunctionSymbol)]) -> String {
        let mut scored: Vec<(f64, &str)> = demangled
            .iter()
            .map(|(d, _)| (strsim::jaro_winkler(name, d), d.as_str()))
            .filter(|(score, _)| *score > 0.8)
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut close: Vec<&str> = scored.into_iter().map(|(_, n)| n).collect();
        close.dedup();
        close.truncate(5);
        let mut message = format!(
            "function `{name}` not found in {} (searched .symtab and .dynsym: {} functions)",
            self.path.display(),
            demangled.len()
        );
        if close.is_empty() {
            message
                .push_str("; list the functions with `dogslow probes --binary PATH --filter TEXT`");
        } else {
            message.push_str(&format!("; did you mean {}?", close.join(", ")));
        }
        if demangled.is_empty() {
            message
                .push_str(" (the binary has no function symbols: it is stripped of both tables)");
        }
        message
    }

    /// Whether `file_offset` holds code: it lies in an executable loadable
    /// segment's file range.
    pub fn is_code(&self, file_offset: u64) -> bool {
        self.parse().is_ok_and(|file| {
            file.segments().any(|segment| {
                let (start, size) = segment.file_range();
                let executable = matches!(
                    segment.flags(),
                    object::SegmentFlags::Elf { p_flags, .. } if p_flags.0 & object::elf::PF_X.0 != 0
                );
                executable && file_offset >= start && file_offset - start < size
            })
        })
    }

    /// Whether `file_offset` is known to lie inside a function symbol but
    /// not at its start. Unknown (a stripped binary's code outside
    /// `.dynsym`) is not "inside".
    pub fn is_mid_function(&self, file_offset: u64) -> bool {
        let functions = self.functions();
        let starts_here = functions.iter().any(|f| f.file_offset == file_offset);
        !starts_here
            && functions
                .iter()
                .any(|f| file_offset > f.file_offset && file_offset - f.file_offset < f.size)
    }

    /// Whether this is a Go program (its build info, build id or pc-line
    /// table is there; stripping keeps them, since the runtime reads them).
    pub fn is_go(&self) -> bool {
        self.parse().is_ok_and(|file| {
            [".go.buildinfo", ".note.go.buildid", ".gopclntab"]
                .iter()
                .any(|name| file.section_by_name(name).is_some())
        })
    }

    /// File offset of virtual address `vaddr`.
    pub fn vaddr_to_offset(&self, vaddr: u64) -> Option<u64> {
        vaddr_to_offset(&self.parse().ok()?, vaddr)
    }
}

fn vaddr_to_offset(file: &object::File<'_>, vaddr: u64) -> Option<u64> {
    file.segments().find_map(|segment| {
        let (offset, size) = segment.file_range();
        let start = segment.address();
        (vaddr >= start && vaddr < start + size).then(|| offset + (vaddr - start))
    })
}

/// A symbol name as people write it: Rust without the hash, C++ demangled.
pub fn demangle(name: &str) -> String {
    match rustc_demangle::try_demangle(name) {
        Ok(demangled) => format!("{demangled:#}"),
        Err(_) => name.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_own_functions_and_suggests() {
        let exe = std::env::current_exe().unwrap();
        let image = ElfImage::open(&exe).unwrap();
        // `main` is in every Rust test binary's symbol table.
        let main = image.find_function("main").unwrap();
        assert!(main.file_offset > 0);
        assert_eq!(image.vaddr_to_offset(main.vaddr), Some(main.file_offset));
        let err = image.find_function("mian").unwrap_err().to_string();
        assert!(err.contains("not found"), "{err}");
        assert!(err.contains("did you mean"), "{err}");
        assert!(err.contains("main"), "{err}");
    }

    #[test]
    fn knows_code_and_function_starts() {
        let exe = std::env::current_exe().unwrap();
        let image = ElfImage::open(&exe).unwrap();
        let main = image.find_function("main").unwrap();
        assert!(image.is_code(main.file_offset));
        assert!(!image.is_mid_function(main.file_offset));
        assert!(image.is_mid_function(main.file_offset + 1));
        // The ELF header is not code; nor is anything past the file.
        assert!(!image.is_code(0));
        assert!(!image.is_code(u64::MAX));
        assert!(!image.is_go());
    }

    #[test]
    fn rejects_directories() {
        let err = ElfImage::open(Path::new("/tmp")).err().unwrap().to_string();
        assert!(err.contains("not a regular file"), "{err}");
    }

    #[test]
    fn rejects_non_elf() {
        let dir = std::env::temp_dir().join(format!("dogslow-elf-{}", std::process::id()));
        fs::write(&dir, b"#!/bin/sh\necho hi\n").unwrap();
        let err = ElfImage::open(&dir).err().unwrap().to_string();
        fs::remove_file(&dir).unwrap();
        assert!(err.contains("not an ELF"), "{err}");
    }

    #[test]
    fn demangles_rust_without_hash() {
        assert_eq!(
            demangle("_ZN4demo14handle_request17h0123456789abcdefE"),
            "demo::handle_request"
        );
        assert_eq!(demangle("handle_request"), "handle_request");
    }
}
