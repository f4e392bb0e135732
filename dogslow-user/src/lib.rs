//! dogslow's userspace agent, as a library so that its pieces are testable
//! without root: decoding, bookkeeping, unwinding, symbolization, reports.
pub mod agent;
pub mod cli;
pub mod config;
pub mod config_file;
pub mod elf;
pub mod events;
pub mod kernel_btf;
pub mod kube;
pub mod loader;
pub mod metrics;
pub mod privileges;
pub mod probe_cost;
pub mod probe_list;
pub mod probe_spec;
pub mod procfs;
pub mod refctr_uprobe;
pub mod report;
pub mod reporter;
pub mod request_args;
pub mod sinks;
pub mod symbolize;
pub mod targets;
pub mod tracker;
pub mod unwind;
pub mod usdt;
pub mod watch;
