//! Checks up front that dogslow holds the capabilities it needs, so the user
//! gets one clear sentence instead of an EPERM deep inside the loader, or,
//! worse, no error at all: without CAP_SYS_PTRACE or CAP_DAC_READ_SEARCH a
//! `--binary` target's processes are silently never found and stacks come
//! out unsymbolized, and without CAP_SYSLOG kernel frames have no names.
//!
//! The set is the one proven necessary by running the agent as an
//! unprivileged uid with only ambient capabilities (README, "Deploying on
//! Kubernetes"), against a process of another user.
use std::fs;

use thiserror::Error;

const CAP_DAC_READ_SEARCH: u32 = 2;
const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_SYSLOG: u32 = 34;

/// Each required capability, with what fails without it.
const REQUIRED: &[(u32, &str, &str)] = &[
    (
        CAP_SYS_ADMIN,
        "CAP_SYS_ADMIN",
        "only it lets the kernel create uprobes: perf_event_open of a uprobe fails with EACCES \
         even with CAP_BPF and CAP_PERFMON; it also covers loading the eBPF programs, the \
         cpu-clock sampler and /proc/PID/map_files",
    ),
    (
        CAP_SYS_PTRACE,
        "CAP_SYS_PTRACE",
        "to open /proc/PID/exe, /proc/PID/root and /proc/PID/mem of other users' processes: \
         targets, binaries inside containers, stacks to unwind",
    ),
    (
        CAP_DAC_READ_SEARCH,
        "CAP_DAC_READ_SEARCH",
        "to read the owner-only /proc/PID/mem and /proc/PID/map_files of other users' \
         processes and search container root file systems; without it stacks are not \
         symbolized",
    ),
    (
        CAP_SYSLOG,
        "CAP_SYSLOG",
        "to read kernel symbol addresses in /proc/kallsyms, which shows zeros to others \
         (unless kernel.perf_event_paranoid <= 1); without it kernel stacks have no function \
         names",
    ),
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrivilegeError {
    #[error(
        "dogslow needs root, or the capabilities CAP_SYS_ADMIN, CAP_SYS_PTRACE, \
         CAP_DAC_READ_SEARCH and CAP_SYSLOG; missing: {missing}. Run it with sudo, grant them \
         with `sudo setcap cap_sys_admin,cap_sys_ptrace,cap_dac_read_search,cap_syslog+ep \
         $(command -v dogslow)`, or in a container add exactly these four (see the README's \
         Kubernetes section)"
    )]
    Missing { missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Unreadable(String),
}

/// The names of the capabilities dogslow requires (`CAP_SYS_ADMIN`, ...),
/// for the deployment manifests' test to hold them to the same set.
pub fn required_capabilities() -> impl Iterator<Item = &'static str> {
    REQUIRED.iter().map(|(_, name, _)| *name)
}

/// Fails with the missing capabilities, and why each is needed, if any.
pub fn check() -> Result<(), PrivilegeError> {
    let status = fs::read_to_string("/proc/self/status")
        .map_err(|err| PrivilegeError::Unreadable(err.to_string()))?;
    let effective = parse_cap_eff(&status)
        .ok_or_else(|| PrivilegeError::Unreadable("no CapEff line".into()))?;
    missing(effective)
}

fn parse_cap_eff(status: &str) -> Option<u64> {
    let hex = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))?;
    u64::from_str_radix(hex.trim(), 16).ok()
}

fn missing(effective: u64) -> Result<(), PrivilegeError> {
    let missing: Vec<String> = REQUIRED
        .iter()
        .filter(|(cap, _, _)| effective & (1u64 << cap) == 0)
        .map(|(_, name, why)| format!("{name} ({why})"))
        .collect();
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing.join("; "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;

    fn caps(list: &[u32]) -> u64 {
        list.iter().map(|cap| 1u64 << cap).sum()
    }

    #[test]
    fn root_has_everything() {
        assert_eq!(missing(u64::MAX >> 23), Ok(()));
        assert_eq!(
            parse_cap_eff("CapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
    }

    #[test]
    fn the_proven_set_is_enough() {
        assert_eq!(
            missing(caps(&[
                CAP_SYS_ADMIN,
                CAP_SYS_PTRACE,
                CAP_DAC_READ_SEARCH,
                CAP_SYSLOG
            ])),
            Ok(())
        );
    }

    #[test]
    fn unprivileged_user_is_told_what_is_missing_and_why() {
        let err = missing(0).unwrap_err().to_string();
        assert!(err.contains("missing: CAP_SYS_ADMIN ("), "{err}");
        for name in ["CAP_SYS_PTRACE (", "CAP_DAC_READ_SEARCH (", "CAP_SYSLOG ("] {
            assert!(err.contains(name), "{name} not named: {err}");
        }
        assert!(err.contains("sudo"), "{err}");
        assert!(err.contains("uprobe"), "{err}");
    }

    #[test]
    fn bpf_and_perfmon_without_sys_admin_cannot_create_uprobes() {
        let err = missing(caps(&[
            CAP_BPF,
            CAP_PERFMON,
            CAP_SYS_PTRACE,
            CAP_DAC_READ_SEARCH,
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("missing: CAP_SYS_ADMIN ("), "{err}");
        assert!(!err.contains("CAP_SYS_PTRACE ("), "{err}");
    }

    #[test]
    fn each_missing_capability_is_named_alone() {
        for (cap, name, _) in REQUIRED {
            let all = caps(&[
                CAP_SYS_ADMIN,
                CAP_SYS_PTRACE,
                CAP_DAC_READ_SEARCH,
                CAP_SYSLOG,
            ]);
            let err = missing(all & !(1u64 << cap)).unwrap_err().to_string();
            let named: Vec<_> = REQUIRED
                .iter()
                .filter(|(_, other, _)| err.contains(&format!("{other} (")))
                .map(|(_, other, _)| *other)
                .collect();
            assert_eq!(named, vec![*name], "{err}");
        }
    }
}
