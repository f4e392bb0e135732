//! Structure offsets the eBPF programs read through, taken from the running
//! kernel's BTF (Rust eBPF has no CO-RE relocations).
use std::path::Path;

use btf_rs::{Backend, Btf, Type};
use dogslow_common::KernelOffsets;
use thiserror::Error;

pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, Error)]
pub enum BtfError {
    #[error(
        "cannot read the kernel's BTF at {VMLINUX_BTF}: {reason}; dogslow needs a kernel built \
         with CONFIG_DEBUG_INFO_BTF=y (most distribution kernels since 2021)"
    )]
    Unavailable { reason: String },
    #[error("the kernel's BTF has no `{field}`; this kernel is not supported")]
    Missing { field: String },
}

/// Reads the offsets dogslow needs from `/sys/kernel/btf/vmlinux`.
pub fn kernel_offsets() -> Result<KernelOffsets, BtfError> {
    // Mapped, not parsed whole: a dozen offsets do not justify the tens of
    // megabytes a parsed vmlinux BTF takes.
    let btf =
        Btf::from_file_with_backend(Path::new(VMLINUX_BTF), Backend::Mmap).map_err(|err| {
            BtfError::Unavailable {
                reason: err.to_string(),
            }
        })?;
    let field = |strukt: &str, member: &str| member_offset(&btf, strukt, member);
    Ok(KernelOffsets {
        task_pid: field("task_struct", "pid")?,
        task_tgid: field("task_struct", "tgid")?,
        task_on_cpu: field("task_struct", "on_cpu")?,
        task_exit_code: field("task_struct", "exit_code")?,
        task_signal: field("task_struct", "signal")?,
        signal_flags: field("signal_struct", "flags")?,
        task_comm: field("task_struct", "comm")?,
        task_utask: field("task_struct", "utask")?,
        utask_return_instances: field("uprobe_task", "return_instances")?,
        return_instance_stack: field("return_instance", "stack")?,
        return_instance_orig_ret_vaddr: field("return_instance", "orig_ret_vaddr")?,
        return_instance_next: field("return_instance", "next")?,
    })
}

/// Byte offset of `member` in `struct strukt`, looking through anonymous
/// structs and unions.
fn member_offset(btf: &Btf, strukt: &str, member: &str) -> Result<u32, BtfError> {
    let missing = || BtfError::Missing {
        field: format!("{strukt}.{member}"),
    };
    let types = btf.resolve_types_by_name(strukt).map_err(|_| missing())?;
    types
        .iter()
        .find_map(|ty| match ty {
            Type::Struct(st) if !st.members.is_empty() => find_member(btf, st, member, 0),
            _ => None,
        })
        .ok_or_else(missing)
}

fn find_member(btf: &Btf, st: &btf_rs::Struct, member: &str, base_bits: u32) -> Option<u32> {
    for m in &st.members {
        let bits = base_bits + m.bit_offset();
        let name = btf.resolve_name(m).unwrap_or_default();
        if name == member {
            return Some(bits / 8);
        }
        if name.is_empty() {
            // Anonymous struct or union: search inside it.
            if let Ok(Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(m)
                && let Some(found) = find_member(btf, &inner, member, bits)
            {
                return Some(found);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_kernels_offsets() {
        if !Path::new(VMLINUX_BTF).exists() {
            eprintln!("skipped: this kernel exposes no BTF");
            return;
        }
        let offsets = kernel_offsets().unwrap();
        assert!(offsets.task_pid > 0);
        assert_eq!(offsets.task_tgid, offsets.task_pid + 4);
        assert!(offsets.task_comm > 0);
    }
}
