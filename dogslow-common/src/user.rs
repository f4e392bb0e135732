//! Userspace-only impls: the records are plain old data for aya's maps.
use crate::{CaptureSettings, Inflight, KernelOffsets, RequestArgs, TargetConfig};

// SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers with
// explicit padding fields, so every bit pattern is a valid value.
unsafe impl aya::Pod for Inflight {}
// SAFETY: as above.
unsafe impl aya::Pod for TargetConfig {}
// SAFETY: as above.
unsafe impl aya::Pod for KernelOffsets {}
// SAFETY: as above.
unsafe impl aya::Pod for CaptureSettings {}
// SAFETY: as above (arrays of integers only).
unsafe impl aya::Pod for RequestArgs {}
