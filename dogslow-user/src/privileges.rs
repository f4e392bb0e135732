//! Checks up front that dogslow may load eBPF programs and read other
//! processes, so the user gets one clear sentence instead of an EPERM deep
//! inside the loader.
use std::fs;

use thiserror::Error;

const CAP_SYS_PTRACE: u32 = 19;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PrivilegeError {
    #[error(
        "dogslow needs root, or the capabilities CAP_BPF, CAP_PERFMON and CAP_SYS_PTRACE \
         (missing: {missing}); run it with sudo, or grant them with \
         `sudo setcap cap_bpf,cap_perfmon,cap_sys_ptrace,cap_sys_resource+ep $(command -v dogslow)`"
    )]
    Missing { missing: String },
    #[error("cannot read this process's capabilities from /proc/self/status: {0}")]
    Unreadable(String),
}

/// Fails with the list of missing capabilities, if any.
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
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    // CAP_SYS_ADMIN implies what CAP_BPF and CAP_PERFMON split out of it.
    let admin = has(CAP_SYS_ADMIN);
    let mut missing = Vec::new();
    if !admin && !has(CAP_BPF) {
        missing.push("CAP_BPF");
    }
    if !admin && !has(CAP_PERFMON) {
        missing.push("CAP_PERFMON");
    }
    if !has(CAP_SYS_PTRACE) {
        missing.push("CAP_SYS_PTRACE");
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(PrivilegeError::Missing {
            missing: missing.join(", "),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_has_everything() {
        assert_eq!(missing(u64::MAX >> 23), Ok(()));
        assert_eq!(
            parse_cap_eff("CapEff:\t000001ffffffffff\n"),
            Some(0x1ff_ffff_ffff)
        );
    }

    #[test]
    fn unprivileged_user_is_told_what_is_missing() {
        let err = missing(0).unwrap_err().to_string();
        assert!(
            err.contains("CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE"),
            "{err}"
        );
        assert!(err.contains("sudo"), "{err}");
    }

    #[test]
    fn sys_admin_covers_bpf_and_perfmon() {
        let caps = (1 << CAP_SYS_ADMIN) | (1 << CAP_SYS_PTRACE);
        assert_eq!(missing(caps), Ok(()));
        let err = missing(1 << CAP_BPF).unwrap_err().to_string();
        assert!(err.contains("CAP_PERFMON, CAP_SYS_PTRACE"), "{err}");
    }
}
