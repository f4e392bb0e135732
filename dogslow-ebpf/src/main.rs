//! dogslow's kernel side: request bookkeeping on uprobes, off-CPU state on
//! `sched_switch`, and stall captures from a cpu-clock sampler (threads on a
//! CPU) and a task iterator the agent runs at deadlines (threads off a CPU).
#![no_std]
#![no_main]

mod capture;
mod kernel;
mod maps;
mod request;
mod sampler;
mod sched_switch;
mod task_iter;
mod thread_exit;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // A reachable panic makes the verifier reject the program (infinite loop)
    // instead of silently doing nothing at run time.
    #[allow(clippy::empty_loop)]
    loop {}
}

/// The helpers dogslow uses (user stack reads, task stacks) are GPL-only.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
