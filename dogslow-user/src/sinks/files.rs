//! `--output-dir`: each report in its own pair of files, the text report
//! and its JSON line, named so that `ls` sorts them by time and says which
//! process stalled: `20260516T021012.345Z-slow_requests-4242-1a2b3c4d5e6f7081.txt`.
//! A completion record goes next to its stall as `<stall>.completed.txt`/`.json`.
//!
//! Reports hold request data and stacks: files are created mode 0600, and
//! only ever created, never opened if they exist (O_CREAT|O_EXCL, plus
//! O_NOFOLLOW), so a file or symlink planted under the name a report will
//! get is left alone and the report takes the next free name (`-1`, `-2`, ...).
use std::{
    collections::{HashMap, VecDeque},
    fs::{self, File, OpenOptions},
    io::{self, Write as _},
    os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
};

use thiserror::Error;

use super::{
    Sink,
    text::{self, base_name},
};
use crate::report::{CompletionReport, Report, StallReport};

#[derive(Debug, Error)]
pub enum FilesError {
    #[error(
        "--output-dir {}: {source}; give a directory dogslow can create or write to",
        path.display()
    )]
    Directory {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("--output-dir {}: not a directory", path.display())]
    NotADirectory { path: PathBuf },
}

/// How many report ids remember their file names, so that a completion
/// lands next to its stall. Older ones get a name of their own.
const REMEMBERED_STEMS: usize = 4096;
/// Names tried (`stem`, `stem-1`, ...) before a report is given up.
const MAX_SUFFIX: u32 = 100;
/// Characters of the program's name kept in a file name.
const PROGRAM_CHARS: usize = 32;

pub struct ReportFiles {
    dir: PathBuf,
    stems: HashMap<String, String>,
    stem_order: VecDeque<String>,
    /// Reports not written since the last success (said once per streak).
    failed: u64,
}

impl ReportFiles {
    /// Uses `dir`, creating it (mode 0700) if it does not exist.
    pub fn open(dir: &Path) -> Result<Self, FilesError> {
        let directory_error = |source| FilesError::Directory {
            path: dir.to_owned(),
            source,
        };
        match fs::metadata(dir) {
            Ok(meta) if meta.is_dir() => {
                // Others could plant or remove files: reports stay safe
                // (never followed or overwritten), but say so.
                if meta.permissions().mode() & 0o002 != 0 {
                    eprintln!(
                        "dogslow: warning: --output-dir {} is writable by everyone; prefer a directory only dogslow's user can write",
                        dir.display()
                    );
                }
            }
            Ok(_) => {
                return Err(FilesError::NotADirectory {
                    path: dir.to_owned(),
                });
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                fs::DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(dir)
                    .map_err(directory_error)?;
            }
            Err(err) => return Err(directory_error(err)),
        }
        Ok(Self {
            dir: dir.to_owned(),
            stems: HashMap::new(),
            stem_order: VecDeque::new(),
            failed: 0,
        })
    }

    /// Writes a stall report; returns the paths of its text and JSON files.
    pub fn write_stall(&mut self, report: &StallReport) -> io::Result<(PathBuf, PathBuf)> {
        let stem = format!(
            "{}-{}-{}-{}",
            compact_time(&report.time),
            file_safe(text::program(report)),
            report.pid,
            file_safe(&report.id)
        );
        let json = Report::Stall(Box::new(report.clone())).to_json_line();
        let (stem, paths) = self.write_pair(&stem, &text::render_stall(report), &json)?;
        self.remember(report.id.clone(), stem);
        Ok(paths)
    }

    /// Writes a completion record next to its stall's files.
    pub fn write_completion(&mut self, done: &CompletionReport) -> io::Result<(PathBuf, PathBuf)> {
        let stem = match self.stems.get(&done.id) {
            Some(stall_stem) => format!("{stall_stem}.completed"),
            None => format!(
                "{}-{}-{}.completed",
                compact_time(&done.time),
                done.pid,
                file_safe(&done.id)
            ),
        };
        let json = Report::Completed(done.clone()).to_json_line();
        let (_, paths) = self.write_pair(&stem, &text::render_completion(done), &json)?;
        Ok(paths)
    }

    fn remember(&mut self, id: String, stem: String) {
        if self.stem_order.len() >= REMEMBERED_STEMS
            && let Some(oldest) = self.stem_order.pop_front()
        {
            self.stems.remove(&oldest);
        }
        self.stem_order.push_back(id.clone());
        self.stems.insert(id, stem);
    }

    /// Creates `<stem>.txt` and `<stem>.json` (or the first free `<stem>-N`
    /// pair) and writes them.
    fn write_pair(
        &self,
        stem: &str,
        text: &str,
        json_line: &str,
    ) -> io::Result<(String, (PathBuf, PathBuf))> {
        for attempt in 0..MAX_SUFFIX {
            let candidate = match attempt {
                0 => stem.to_owned(),
                n => format!("{stem}-{n}"),
            };
            let text_path = self.dir.join(format!("{candidate}.txt"));
            let mut text_file = match create_new(&text_path) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(err) => return Err(err),
            };
            let json_path = self.dir.join(format!("{candidate}.json"));
            let mut json_file = match create_new(&json_path) {
                Ok(file) => file,
                Err(err) => {
                    // The text file is ours and empty: take it back so the
                    // pair keeps one name.
                    drop(text_file);
                    let _ = fs::remove_file(&text_path);
                    if err.kind() == io::ErrorKind::AlreadyExists {
                        continue;
                    }
                    return Err(err);
                }
            };
            text_file.write_all(text.as_bytes())?;
            json_file.write_all(json_line.as_bytes())?;
            json_file.write_all(b"\n")?;
            return Ok((candidate, (text_path, json_path)));
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{stem}.txt and {MAX_SUFFIX} alternatives exist already"),
        ))
    }

    fn note(&mut self, written: io::Result<(PathBuf, PathBuf)>) {
        match written {
            Ok(_) if self.failed > 0 => {
                eprintln!(
                    "dogslow: writing to --output-dir {} works again; {} report(s) were not written there (they are on stdout)",
                    self.dir.display(),
                    self.failed
                );
                self.failed = 0;
            }
            Ok(_) => {}
            Err(err) => {
                if self.failed == 0 {
                    eprintln!(
                        "dogslow: cannot write a report to --output-dir {}: {err}; reports still go to stdout",
                        self.dir.display()
                    );
                }
                self.failed += 1;
            }
        }
    }
}

impl Sink for ReportFiles {
    fn emit(&mut self, report: &Report) {
        let written = match report {
            Report::Stall(stall) => self.write_stall(stall),
            Report::Completed(done) => self.write_completion(done),
        };
        self.note(written);
    }

    fn finish(&mut self) {
        if self.failed > 0 {
            eprintln!(
                "dogslow: {} report(s) could not be written to --output-dir {}",
                self.failed,
                self.dir.display()
            );
        }
    }
}

/// Creates `path` for writing, mode 0600; fails if anything (a file, a
/// symlink, dangling or not) is there already.
fn create_new(path: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // The umask can only take bits away from 0600; this makes it exact.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    Ok(file)
}

/// RFC 3339 without `-` and `:`: `20260516T021012.345Z`, which sorts by time.
fn compact_time(rfc3339: &str) -> String {
    file_safe(&rfc3339.replace(['-', ':'], ""))
}

/// Letters, digits, `.`, `_`, `+` and `-`; anything else (a `/` in a
/// thread-chosen name, spaces, control characters) becomes `_`. Never
/// starts with a dot, never empty, at most `PROGRAM_CHARS` characters.
fn file_safe(text: &str) -> String {
    let mut out: String = base_name(text)
        .chars()
        .take(PROGRAM_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '+' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    if out.starts_with('.') {
        out.replace_range(0..1, "_");
    }
    if out.is_empty() {
        out.push_str("unknown");
    }
    out
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::*;

    fn mode(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o777
    }

    const STEM: &str = "20260516T021012.345Z-slow_requests-4242-1a2b3c4d5e6f7081";

    #[test]
    fn stall_files_are_private_and_named_by_time_and_process() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = ReportFiles::open(dir.path()).unwrap();
        let report = StallReport::example();
        let (text_path, json_path) = files.write_stall(&report).unwrap();
        assert_eq!(text_path, dir.path().join(format!("{STEM}.txt")));
        assert_eq!(json_path, dir.path().join(format!("{STEM}.json")));
        assert_eq!(mode(&text_path), 0o600);
        assert_eq!(mode(&json_path), 0o600);
        let text = fs::read_to_string(&text_path).unwrap();
        assert!(text.starts_with("Undead request intercepted at: 2026-05-16T02:10:12.345Z"));
        assert!(text.contains("spin_for+0x24 at /src/slow_requests.c:30"));
        let json = fs::read_to_string(&json_path).unwrap();
        assert_eq!(
            json,
            format!(
                "{}\n",
                Report::Stall(Box::new(report.clone())).to_json_line()
            )
        );
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(value["user_stack"][0]["function"], "spin_for");
    }

    #[test]
    fn existing_files_and_symlinks_are_never_clobbered_or_followed() {
        let dir = tempfile::tempdir().unwrap();
        let victim = dir.path().join("victim");
        fs::write(&victim, "precious").unwrap();
        // Someone planted a file under the text name and a symlink under
        // the JSON name of the next candidate.
        fs::write(dir.path().join(format!("{STEM}.txt")), "mine").unwrap();
        symlink(&victim, dir.path().join(format!("{STEM}-1.json"))).unwrap();
        // And a dangling symlink, which O_CREAT alone would follow.
        symlink(
            dir.path().join("nowhere"),
            dir.path().join(format!("{STEM}-2.txt")),
        )
        .unwrap();

        let mut files = ReportFiles::open(dir.path()).unwrap();
        let (text_path, json_path) = files.write_stall(&StallReport::example()).unwrap();
        assert_eq!(text_path, dir.path().join(format!("{STEM}-3.txt")));
        assert_eq!(json_path, dir.path().join(format!("{STEM}-3.json")));
        assert_eq!(
            fs::read_to_string(dir.path().join(format!("{STEM}.txt"))).unwrap(),
            "mine"
        );
        assert_eq!(fs::read_to_string(&victim).unwrap(), "precious");
        assert!(!dir.path().join("nowhere").exists());
        // The half-made candidate was taken back.
        assert!(!dir.path().join(format!("{STEM}-1.txt")).exists());
        assert!(fs::read_to_string(&text_path).unwrap().contains("spin_for"));

        // A second report with the same name gets the next one.
        let (again, _) = files.write_stall(&StallReport::example()).unwrap();
        assert_eq!(again, dir.path().join(format!("{STEM}-4.txt")));
    }

    #[test]
    fn completions_go_next_to_their_stall() {
        let dir = tempfile::tempdir().unwrap();
        let mut files = ReportFiles::open(dir.path()).unwrap();
        let report = StallReport::example();
        files.write_stall(&report).unwrap();
        let done = CompletionReport {
            kind: "completed",
            id: report.id.clone(),
            time: "2026-05-16T02:10:14.000Z".into(),
            host: "web-1".into(),
            pid: report.pid,
            tid: report.tid,
            target: "handle_request".into(),
            duration_ms: 1967,
            outcome: "returned",
            signal: None,
        };
        let (text_path, json_path) = files.write_completion(&done).unwrap();
        assert_eq!(text_path, dir.path().join(format!("{STEM}.completed.txt")));
        assert_eq!(mode(&json_path), 0o600);
        assert!(
            fs::read_to_string(&text_path)
                .unwrap()
                .contains("returned after 1967 ms")
        );
    }

    #[test]
    fn a_missing_directory_is_created_private() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/reports");
        ReportFiles::open(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);
        let file = dir.path().join("file");
        fs::write(&file, "").unwrap();
        let err = ReportFiles::open(&file).err().unwrap().to_string();
        assert!(err.contains("not a directory"), "{err}");
    }

    #[test]
    fn names_are_file_safe() {
        assert_eq!(file_safe("../x y\n"), "x_y_");
        assert_eq!(file_safe(".hidden"), "_hidden");
        assert_eq!(file_safe(""), "unknown");
        assert_eq!(
            compact_time("2026-05-16T02:10:12.345Z"),
            "20260516T021012.345Z"
        );
    }
}
