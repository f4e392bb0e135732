//! `dogslow probes`: what a binary or a running process offers to probe.
//! Its USDT probes (from `.note.stapsdt`) and, with a filter, its functions,
//! each with the text to give `--entry` / `--exit`.
use std::{
    fs,
    io::{self, Write},
    path::PathBuf,
};

use serde_json::json;
use thiserror::Error;

use crate::{
    elf::{ElfError, ElfImage, FunctionSymbol, demangle},
    probe_cost::{self, FirstInstruction},
    procfs::{self, ProcError},
    usdt::{self, UsdtError, UsdtProbe},
};

#[derive(Debug, Error)]
pub enum ListError {
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    Elf(#[from] ElfError),
    #[error(transparent)]
    Usdt(#[from] UsdtError),
    #[error("writing the listing: {0}")]
    Write(#[source] io::Error),
}

/// Where to look.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProbeSource {
    /// A running process: its executable and the libraries it maps.
    Pid(u32),
    /// A binary on disk (no root needed).
    Binary(PathBuf),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListConfig {
    pub source: ProbeSource,
    /// Only USDT probes whose `provider:name`, and functions whose
    /// (demangled) name, contain this (case-insensitive); functions are
    /// listed only with a filter.
    pub filter: Option<String>,
    /// One JSON object per line instead of a table.
    pub json: bool,
}

/// What one object file offers.
#[derive(Clone, Debug)]
pub struct ObjectListing {
    /// The path as the process (or the user) names it.
    pub path: String,
    /// For a library of a process, the name to put before `:` in a probe
    /// spec (`libc.so.6`); `None` for the executable.
    pub library: Option<String>,
    pub usdt: Vec<Listed<UsdtProbe>>,
    pub functions: Vec<Listed<FunctionSymbol>>,
}

/// A USDT probe or function, with the instruction a probe on it would hit.
#[derive(Clone, Debug)]
pub struct Listed<T> {
    pub item: T,
    pub instruction: FirstInstruction,
}

impl ObjectListing {
    /// The `--entry` text for a USDT probe of this object.
    pub fn usdt_spec(&self, probe: &UsdtProbe) -> String {
        match &self.library {
            Some(library) => format!("usdt:{library}:{}:{}", probe.provider, probe.name),
            None => format!("usdt:{}:{}", probe.provider, probe.name),
        }
    }

    /// The `--entry` text for a function of this object.
    pub fn function_spec(&self, function: &FunctionSymbol) -> String {
        let name = demangle(&function.name);
        match &self.library {
            Some(library) => format!("{library}:{name}"),
            None => name,
        }
    }
}

/// Collects the listing. For a process, objects that offer nothing that
/// matches are left out; a library that cannot be read is skipped with a
/// note on stderr (the executable's errors are returned).
pub fn collect(config: &ListConfig) -> Result<Vec<ObjectListing>, ListError> {
    let filter = config.filter.as_deref().map(str::to_lowercase);
    match &config.source {
        ProbeSource::Binary(path) => {
            let image = ElfImage::open(path)?;
            Ok(vec![listing(
                &image,
                path.display().to_string(),
                None,
                filter.as_deref(),
            )?])
        }
        ProbeSource::Pid(pid) => {
            let pid = *pid;
            if !procfs::process_exists(pid) {
                return Err(ProcError::NoSuchProcess { pid }.into());
            }
            let exe_link = PathBuf::from(format!("/proc/{pid}/exe"));
            let exe_path = fs::read_link(&exe_link)
                .map(|path| path.to_string_lossy().into_owned())
                .unwrap_or_else(|_| exe_link.display().to_string());
            let exe = ElfImage::open(&exe_link)?;
            let mut listings = vec![listing(&exe, exe_path.clone(), None, filter.as_deref())?];
            let mut libraries: Vec<String> = procfs::maps(pid)?
                .into_iter()
                .filter(|mapping| mapping.is_file() && mapping.executable)
                .map(|mapping| mapping.path)
                .filter(|path| *path != exe_path.trim_end_matches(" (deleted)"))
                .collect();
            libraries.sort();
            libraries.dedup();
            for path in libraries {
                let host_path = procfs::path_in_process_root(pid, &path);
                let library = path.rsplit('/').next().unwrap_or(&path).to_owned();
                let found = ElfImage::open(&host_path)
                    .map_err(ListError::from)
                    .and_then(|image| {
                        listing(&image, path.clone(), Some(library), filter.as_deref())
                    });
                match found {
                    Ok(found) => listings.push(found),
                    Err(err) => eprintln!("dogslow: skipping {path}: {err}"),
                }
            }
            listings.retain(|l| !l.usdt.is_empty() || !l.functions.is_empty());
            // The executable stays, so the output says where it looked.
            if listings.is_empty() {
                listings.push(ObjectListing {
                    path: exe_path,
                    library: None,
                    usdt: Vec::new(),
                    functions: Vec::new(),
                });
            }
            Ok(listings)
        }
    }
}

fn listing(
    image: &ElfImage,
    path: String,
    library: Option<String>,
    filter: Option<&str>,
) -> Result<ObjectListing, ListError> {
    let mut usdt = usdt::read_probes(image)?;
    let mut functions = Vec::new();
    if let Some(filter) = filter {
        usdt.retain(|probe| probe.qualified_name().to_lowercase().contains(filter));
        functions = image
            .functions()
            .into_iter()
            .filter(|function| {
                function.name.to_lowercase().contains(filter)
                    || demangle(&function.name).to_lowercase().contains(filter)
            })
            .collect();
    }
    let listed = |file_offset| probe_cost::at(image, file_offset);
    Ok(ObjectListing {
        path,
        library,
        usdt: usdt
            .into_iter()
            .map(|probe| Listed {
                instruction: listed(probe.file_offset),
                item: probe,
            })
            .collect(),
        functions: functions
            .into_iter()
            .map(|function| Listed {
                instruction: listed(function.file_offset),
                item: function,
            })
            .collect(),
    })
}

/// Runs `dogslow probes`: the listing on `out`.
pub fn run(config: &ListConfig, out: &mut impl Write) -> Result<(), ListError> {
    let listings = collect(config)?;
    let written = if config.json {
        write_json(&listings, out)
    } else {
        write_table(&listings, config.filter.as_deref(), out)
    };
    match written {
        // `dogslow probes ... | head` is not an error.
        Err(err) if err.kind() == io::ErrorKind::BrokenPipe => Ok(()),
        other => other.map_err(ListError::Write),
    }
}

fn hex(value: u64) -> String {
    format!("{value:#x}")
}

/// One JSON object per USDT probe and per function.
pub fn write_json(listings: &[ObjectListing], out: &mut impl Write) -> io::Result<()> {
    for listing in listings {
        for Listed {
            item: probe,
            instruction,
        } in &listing.usdt
        {
            let arguments: Vec<serde_json::Value> = probe
                .arg_text
                .split_whitespace()
                .enumerate()
                .map(|(index, spec)| {
                    let parsed = usdt::parse_arg(spec).ok();
                    json!({
                        "index": index,
                        "spec": spec,
                        "size": parsed.as_ref().map(|arg| arg.size),
                        "signed": parsed.as_ref().map(|arg| arg.signed),
                    })
                })
                .collect();
            let line = json!({
                "kind": "usdt",
                "object": listing.path,
                "provider": probe.provider,
                "name": probe.name,
                "probe": listing.usdt_spec(probe),
                "address": hex(probe.pc),
                "file_offset": hex(probe.file_offset),
                "semaphore": probe.semaphore.map(hex),
                "semaphore_offset": probe.semaphore_offset.map(hex),
                "arguments": arguments,
                "instruction": instruction.text,
                "uprobe": instruction.handling.as_str(),
            });
            writeln!(out, "{line}")?;
        }
        for Listed {
            item: function,
            instruction,
        } in &listing.functions
        {
            let line = json!({
                "kind": "function",
                "object": listing.path,
                "name": function.name,
                "demangled": demangle(&function.name),
                "probe": listing.function_spec(function),
                "address": hex(function.vaddr),
                "file_offset": hex(function.file_offset),
                "size": function.size,
                "instruction": instruction.text,
                "uprobe": instruction.handling.as_str(),
            });
            writeln!(out, "{line}")?;
        }
    }
    out.flush()
}

/// The table's columns for USDT probes.
const USDT_COLUMNS: [&str; 6] = [
    "PROVIDER",
    "NAME",
    "FILE OFFSET",
    "SEMAPHORE",
    "UPROBE",
    "ARGUMENTS",
];

/// A readable table per object.
pub fn write_table(
    listings: &[ObjectListing],
    filter: Option<&str>,
    out: &mut impl Write,
) -> io::Result<()> {
    let matching = filter
        .map(|text| format!(" matching `{text}`"))
        .unwrap_or_default();
    let mut first = true;
    for listing in listings {
        if listing.usdt.is_empty() && listing.functions.is_empty() && listings.len() > 1 {
            continue;
        }
        if !first {
            writeln!(out)?;
        }
        first = false;
        let spec_form = match &listing.library {
            Some(library) => format!("usdt:{library}:PROVIDER:NAME"),
            None => "usdt:PROVIDER:NAME".to_owned(),
        };
        let count = listing.usdt.len();
        writeln!(
            out,
            "{}: {count} USDT probe{}{matching}{}",
            listing.path,
            if count == 1 { "" } else { "s" },
            if count > 0 {
                format!(" (probe with --entry {spec_form})")
            } else {
                String::new()
            }
        )?;
        if count > 0 {
            let rows: Vec<[String; 6]> = listing
                .usdt
                .iter()
                .map(
                    |Listed {
                         item: probe,
                         instruction,
                     }| {
                        [
                            probe.provider.clone(),
                            probe.name.clone(),
                            hex(probe.file_offset),
                            probe.semaphore_offset.map_or_else(|| "-".to_owned(), hex),
                            instruction.handling.as_str().to_owned(),
                            if probe.arg_text.is_empty() {
                                "-".to_owned()
                            } else {
                                probe.arg_text.clone()
                            },
                        ]
                    },
                )
                .collect();
            write_rows(out, USDT_COLUMNS, &rows)?;
        }
        if filter.is_some() {
            let count = listing.functions.len();
            writeln!(
                out,
                "{}: {count} function{}{matching}",
                listing.path,
                if count == 1 { "" } else { "s" },
            )?;
            if count > 0 {
                let rows: Vec<[String; 5]> = listing
                    .functions
                    .iter()
                    .map(
                        |Listed {
                             item: function,
                             instruction,
                         }| {
                            [
                                listing.function_spec(function),
                                hex(function.file_offset),
                                function.size.to_string(),
                                instruction.handling.as_str().to_owned(),
                                instruction.text.clone(),
                            ]
                        },
                    )
                    .collect();
                write_rows(
                    out,
                    [
                        "PROBE",
                        "FILE OFFSET",
                        "SIZE",
                        "UPROBE",
                        "FIRST INSTRUCTION",
                    ],
                    &rows,
                )?;
            }
        }
    }
    out.flush()
}

fn write_rows<const N: usize>(
    out: &mut impl Write,
    header: [&str; N],
    rows: &[[String; N]],
) -> io::Result<()> {
    let mut widths = header.map(str::len);
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.len());
        }
    }
    let line = |cells: [&str; N]| -> String {
        let mut text = String::from("  ");
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == N {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        text
    };
    writeln!(out, "{}", line(header))?;
    for row in rows {
        writeln!(out, "{}", line(row.each_ref().map(String::as_str)))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const POSTGRES: &str = "/usr/lib/postgresql/15/bin/postgres";

    fn binary(path: &str, filter: Option<&str>, json: bool) -> ListConfig {
        ListConfig {
            source: ProbeSource::Binary(PathBuf::from(path)),
            filter: filter.map(str::to_owned),
            json,
        }
    }

    fn output(config: &ListConfig) -> String {
        let mut out = Vec::new();
        run(config, &mut out).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn postgres_table() {
        let text = output(&binary(POSTGRES, None, false));
        let header = text.lines().next().unwrap();
        assert!(header.starts_with(&format!("{POSTGRES}: ")), "{header}");
        assert!(header.contains("USDT probes"), "{header}");
        assert!(header.contains("--entry usdt:PROVIDER:NAME"), "{header}");
        let columns = text.lines().nth(1).unwrap();
        for column in USDT_COLUMNS {
            assert!(columns.contains(column), "{columns}");
        }
        let image = ElfImage::open(Path::new(POSTGRES)).unwrap();
        let start = &usdt::find_probes(&image, "postgresql", "query__start").unwrap()[0];
        let row = text
            .lines()
            .find(|line| line.split_whitespace().nth(1) == Some("query__start"))
            .unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "postgresql",
                "query__start",
                &hex(start.file_offset),
                &hex(start.semaphore_offset.unwrap()),
                // A USDT site is a 1-byte `nop`.
                "emulated",
                &start.arg_text,
            ]
        );
        // Without a filter, no functions.
        assert!(!text.contains("function"), "{text}");
    }

    #[test]
    fn filter_narrows_probes_and_lists_functions() {
        let text = output(&binary(POSTGRES, Some("query__"), false));
        assert!(text.contains("query__start"));
        assert!(!text.contains("transaction__start"), "{text}");
        let text = output(&binary(POSTGRES, Some("PortalRun"), false));
        assert!(
            text.contains("0 USDT probes matching `PortalRun`"),
            "{text}"
        );
        assert!(text.contains("functions matching `PortalRun`"), "{text}");
        let portal_run = text
            .lines()
            .find(|line| line.split_whitespace().next() == Some("PortalRun"))
            .unwrap_or_else(|| panic!("no PortalRun row in {text}"));
        let image = ElfImage::open(Path::new(POSTGRES)).unwrap();
        let function = image.find_function("PortalRun").unwrap();
        let cells: Vec<&str> = portal_run.split_whitespace().collect();
        assert_eq!(cells[1], hex(function.file_offset));
        // Debian's postgres keeps frame pointers: `push %rbp`, emulated.
        assert_eq!(cells[3..], ["emulated", "push", "%rbp"], "{portal_run}");
    }

    #[test]
    fn json_lines() {
        let text = output(&binary(POSTGRES, Some("query__"), true));
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        let start = lines
            .iter()
            .find(|line| line["name"] == "query__start")
            .unwrap();
        assert_eq!(start["kind"], "usdt");
        assert_eq!(start["object"], POSTGRES);
        assert_eq!(start["provider"], "postgresql");
        assert_eq!(start["probe"], "usdt:postgresql:query__start");
        assert!(
            start["semaphore_offset"]
                .as_str()
                .unwrap()
                .starts_with("0x")
        );
        assert_eq!(start["arguments"][0]["size"], 8);
        assert_eq!(start["arguments"][0]["signed"], false);
        assert_eq!(start["instruction"], "nop");
        assert_eq!(start["uprobe"], "emulated");
        assert!(
            lines
                .iter()
                .all(|line| line["kind"] == "usdt" || line["kind"] == "function")
        );
    }

    #[test]
    fn own_process_lists_its_libraries_functions() {
        let config = ListConfig {
            source: ProbeSource::Pid(std::process::id()),
            filter: Some("getpid".into()),
            json: true,
        };
        let text = output(&config);
        let getpid = text
            .lines()
            .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
            .find(|line| line["probe"] == "libc.so.6:getpid")
            .unwrap_or_else(|| panic!("libc's getpid is not listed: {text}"));
        assert_eq!(getpid["kind"], "function");
        assert!(getpid["object"].as_str().unwrap().ends_with("/libc.so.6"));
    }

    #[test]
    fn bad_sources_say_what_is_wrong() {
        let mut out = Vec::new();
        let err = run(&binary("/etc/passwd", None, false), &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not an ELF"), "{err}");
        let err = run(&binary("/nonexistent/dogslow", None, false), &mut out)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot open /nonexistent/dogslow"), "{err}");
        let config = ListConfig {
            source: ProbeSource::Pid(u32::MAX - 1),
            filter: None,
            json: false,
        };
        let err = run(&config, &mut out).unwrap_err().to_string();
        assert!(err.contains("no process with PID"), "{err}");
    }
}
