//! Kubernetes context for a report: the container (from the cgroup path)
//! and, when the node shows them, the pod's name and namespace.
//!
//! Sources, best first: the downward API in the process's environment
//! (`POD_NAME`, `POD_NAMESPACE`), the service-account namespace file in the
//! container's filesystem, and the pod's hostname (its name unless the pod
//! sets `hostname`).
use std::fs;

use crate::procfs;

use serde::Serialize;

/// What a report says about the pod and container a process runs in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KubeContext {
    pub container_id: Option<String>,
    pub pod_uid: Option<String>,
    pub pod: Option<String>,
    pub namespace: Option<String>,
}

impl KubeContext {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

/// The container id and pod UID named in a `/proc/PID/cgroup` text, in any
/// of the layouts container runtimes use:
/// `/kubepods/burstable/pod<uid>/<id>`,
/// `/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope`,
/// `/docker/<id>`, `.../crio-<id>.scope`.
pub fn from_cgroup(cgroup: &str) -> (Option<String>, Option<String>) {
    let mut container = None;
    let mut pod = None;
    for line in cgroup.lines() {
        let path = line.splitn(3, ':').nth(2).unwrap_or(line);
        for part in path.split('/') {
            if let Some(uid) = pod_uid(part) {
                pod.get_or_insert(uid);
            }
            if let Some(id) = container_id(part) {
                container.get_or_insert(id);
            }
        }
    }
    (container, pod)
}

/// `pod<uid>` or `kubepods-<qos>-pod<uid_with_underscores>.slice`.
fn pod_uid(part: &str) -> Option<String> {
    let at = part.rfind("pod")?;
    let uid = part[at + 3..].trim_end_matches(".slice").replace('_', "-");
    let is_uid = uid.len() == 36 && uid.chars().all(|c| c.is_ascii_hexdigit() || c == '-');
    is_uid.then_some(uid)
}

/// A 64-hex-digit container id, bare or inside `<runtime>-<id>.scope`.
fn container_id(part: &str) -> Option<String> {
    let part = part.trim_end_matches(".scope");
    let id = part.rsplit('-').next().unwrap_or(part);
    (id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit())).then(|| id.to_owned())
}

/// The Kubernetes context of `pid`, or an empty one outside Kubernetes.
pub fn context(pid: u32, cgroup: &str) -> KubeContext {
    let (container_id, pod_uid) = from_cgroup(cgroup);
    if container_id.is_none() && pod_uid.is_none() {
        return KubeContext::default();
    }
    let environ = fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    let env = |key: &str| -> Option<String> {
        environ
            .split(|&b| b == 0)
            .filter_map(|entry| std::str::from_utf8(entry).ok())
            .find_map(|entry| entry.strip_prefix(key)?.strip_prefix('='))
            .map(str::to_owned)
            .filter(|value| !value.is_empty())
    };
    // The container controls these files: read only a small regular one.
    let in_container = |path: &str| -> Option<String> {
        procfs::read_small_file(format!("/proc/{pid}/root{path}").as_ref(), 4096)
            .map(|text| text.trim().to_owned())
            .filter(|text| !text.is_empty())
    };
    let namespace = env("POD_NAMESPACE")
        .or_else(|| in_container("/var/run/secrets/kubernetes.io/serviceaccount/namespace"))
        .or_else(|| in_container("/run/secrets/kubernetes.io/serviceaccount/namespace"));
    let pod = env("POD_NAME").or_else(|| pod_uid.as_ref().and(env("HOSTNAME")));
    KubeContext {
        container_id,
        pod_uid,
        pod,
        namespace,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "3f2d5bd0b7c64fd8b0b5a7e3c1f0e2d4a6b8c0d2e4f6a8b0c2d4e6f8a0b2c4d6";

    #[test]
    fn cgroupfs_layout() {
        let text = format!(
            "11:pids:/kubepods/burstable/pod1d2c3b4a-0000-4111-8222-933344455566/{ID}\n0::/\n"
        );
        let (container, pod) = from_cgroup(&text);
        assert_eq!(container.as_deref(), Some(ID));
        assert_eq!(pod.as_deref(), Some("1d2c3b4a-0000-4111-8222-933344455566"));
    }

    #[test]
    fn systemd_layout() {
        let text = format!(
            "0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1d2c3b4a_0000_4111_8222_933344455566.slice/cri-containerd-{ID}.scope\n"
        );
        let (container, pod) = from_cgroup(&text);
        assert_eq!(container.as_deref(), Some(ID));
        assert_eq!(pod.as_deref(), Some("1d2c3b4a-0000-4111-8222-933344455566"));
    }

    #[test]
    fn docker_and_crio() {
        assert_eq!(
            from_cgroup(&format!("0::/docker/{ID}\n")).0.as_deref(),
            Some(ID)
        );
        assert_eq!(
            from_cgroup(&format!("0::/machine.slice/crio-{ID}.scope\n"))
                .0
                .as_deref(),
            Some(ID)
        );
    }

    #[test]
    fn plain_hosts_have_no_context() {
        assert_eq!(
            from_cgroup("0::/user.slice/user-1000.slice/session-2.scope\n"),
            (None, None)
        );
        assert!(context(std::process::id(), "0::/\n").is_empty());
    }
}
