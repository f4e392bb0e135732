//! Builds the eBPF object with aya-build (nightly, bpf-linker) so that the
//! `dogslow` binary embeds it: one self-contained executable.
use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let root_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../dogslow-ebpf");
    aya_build::build_ebpf(
        [Package {
            name: "dogslow-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
    .context(
        "building the eBPF object failed; `cargo xtask setup` installs the nightly \
         toolchain, rust-src, LLVM 22 and bpf-linker it needs",
    )
    .map_err(|err| anyhow!("{err:#}"))
}
