/// Indices into the per-CPU `STATS` array: one counter per failure path in
/// the eBPF programs, summed by the agent. Nothing is dropped silently.
pub mod stat {
    /// An entry probe found `INFLIGHT` full: that request is not tracked.
    pub const INFLIGHT_FULL: u32 = 0;
    /// A stall capture found the ring buffer full (retried at the next tick).
    pub const RINGBUF_FULL: u32 = 1;
    /// A completion record found the ring buffer full.
    pub const COMPLETION_DROPPED: u32 = 2;
    /// Reading the user registers of a thread failed.
    pub const REGS_UNREADABLE: u32 = 3;
    /// A request's captured arguments could not be stored.
    pub const ARGS_FULL: u32 = 4;
    /// Requests started (entry probe hits that began a request).
    pub const REQUESTS_STARTED: u32 = 5;
    /// Stall captures taken on-CPU by the sampler.
    pub const CAPTURES_SAMPLED: u32 = 6;
    /// Stall captures taken off-CPU by the deadline iterator.
    pub const CAPTURES_OFF_CPU: u32 = 7;
    /// Number of counters.
    pub const COUNT: u32 = 8;
}
