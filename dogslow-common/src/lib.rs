//! The `#[repr(C)]` records that cross the kernel/user boundary.
//!
//! Everything here is fixed-width with explicit padding so that the eBPF
//! object and the agent agree byte for byte; a size assertion sits beside
//! each type. Enumerations cross as `u32` constants and are decoded with
//! `TryFrom` on the user side.
#![no_std]

pub mod capture;
pub mod event;
pub mod inflight;
pub mod stats;
pub mod target;

#[cfg(feature = "user")]
mod user;

pub use capture::*;
pub use event::*;
pub use inflight::*;
pub use stats::*;
pub use target::*;
