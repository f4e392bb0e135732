//! What one stall report costs the agent to unwind and symbolize: cold (a
//! new unwinder and symbolizer and no warm-up), the warm-up the reporter
//! does when it first sees a process and the first report after it, and
//! warm (reused, as for every later report). Run by `cargo xtask bench`,
//! which builds it with line tables so that symbolization reads DWARF like
//! a real target's.
//!
//! The program recurses `DEPTH` calls deep, captures its own registers and
//! a copy of its stack there, exactly what dogslow's eBPF side records for a
//! stalled thread, then unwinds and symbolizes that capture the way the
//! reporter does. Prints one JSON object; exits 1 if the stack did not come
//! out whole.
use std::{hint::black_box, time::Instant};

use dogslow::{
    events::{CaptureSource, StallCapture, ThreadState},
    symbolize::Symbolizer,
    unwind::StackUnwinder,
};
use dogslow_common::UserRegs;

const DEPTH: u32 = 30;
/// dogslow's default `--user-stack-bytes`.
const STACK_COPY: usize = 32 * 1024;
/// Kernel functions of a typical blocked thread's wait path.
const KERNEL_PATH: [&str; 6] = [
    "schedule",
    "do_nanosleep",
    "hrtimer_nanosleep",
    "__x64_sys_clock_nanosleep",
    "do_syscall_64",
    "entry_SYSCALL_64_after_hwframe",
];

#[inline(never)]
fn recurse(depth: u32) -> StallCapture {
    if depth == 0 {
        return capture_here();
    }
    let capture = recurse(depth - 1);
    // Work after the call, so the compiler keeps a real frame per level.
    black_box(&capture);
    capture
}

/// The end of the mapping that holds `addr` (its stack), from /proc/self/maps.
fn mapping_end(addr: u64) -> Option<u64> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let range = line.split_whitespace().next()?;
        let (start, end) = range.split_once('-')?;
        let start = u64::from_str_radix(start, 16).ok()?;
        let end = u64::from_str_radix(end, 16).ok()?;
        (start <= addr && addr < end).then_some(end)
    })
}

#[inline(never)]
fn capture_here() -> StallCapture {
    let (ip, sp, bp): (u64, u64, u64);
    // SAFETY: reads three registers, no memory effects.
    unsafe {
        std::arch::asm!("lea {ip}, [rip]", "mov {sp}, rsp", "mov {bp}, rbp",
            ip = out(reg) ip, sp = out(reg) sp, bp = out(reg) bp);
    }
    let available = mapping_end(sp).map_or(0, |end| (end - sp) as usize);
    let len = available.min(STACK_COPY);
    // SAFETY: [sp, sp + len) lies inside this thread's stack mapping, and the
    // part above sp is live frames of this thread.
    let user_stack = unsafe { std::slice::from_raw_parts(sp as *const u8, len) }.to_vec();
    StallCapture {
        source: CaptureSource::Sampler,
        tid: std::process::id(),
        pid: std::process::id(),
        target: 0,
        state: ThreadState::Running,
        start_ns: 0,
        deadline_ns: 0,
        captured_ns: 0,
        off_cpu_since_ns: None,
        regs: UserRegs {
            ip,
            sp,
            bp,
            orig_ax: -1,
        },
        cpu: 0,
        comm: String::new(),
        kernel_stack: kernel_stack(),
        user_stack,
        user_stack_error: 0,
        return_slots: Vec::new(),
        args: None,
    }
}

/// Return addresses in `KERNEL_PATH`, from /proc/kallsyms (empty without
/// root, which hides kernel addresses).
fn kernel_stack() -> Vec<u64> {
    let Ok(kallsyms) = std::fs::read_to_string("/proc/kallsyms") else {
        return Vec::new();
    };
    KERNEL_PATH
        .iter()
        .filter_map(|name| {
            kallsyms.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let addr = u64::from_str_radix(fields.next()?, 16).ok()?;
                let _kind = fields.next()?;
                (fields.next()? == *name && addr != 0).then_some(addr + 0x10)
            })
        })
        .collect()
}

/// Time of each step for one report, microseconds.
#[derive(Clone, Copy, Default)]
struct Steps {
    unwind: f64,
    user_symbolize: f64,
    kernel_symbolize: f64,
}

impl Steps {
    fn total(self) -> f64 {
        self.unwind + self.user_symbolize + self.kernel_symbolize
    }
}

fn micros(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1e6
}

/// One report's worth of work, as the reporter does it.
fn report(
    unwinder: &mut StackUnwinder,
    symbolizer: &mut Symbolizer,
    capture: &StallCapture,
) -> (Steps, Vec<String>, usize) {
    let t = Instant::now();
    let unwound = unwinder.unwind(capture);
    let unwind = micros(t);
    let t = Instant::now();
    symbolizer.cache_process(capture.pid);
    let frames = symbolizer.user_frames(capture.pid, &unwound.frames);
    let user_symbolize = micros(t);
    let t = Instant::now();
    let kernel = symbolizer.kernel_frames(&capture.kernel_stack);
    let kernel_symbolize = micros(t);
    let names = frames
        .iter()
        .map(|f| f.function.clone().unwrap_or_default())
        .collect();
    let kernel_named = kernel.iter().filter(|f| f.function.is_some()).count();
    black_box(&kernel);
    (
        Steps {
            unwind,
            user_symbolize,
            kernel_symbolize,
        },
        names,
        kernel_named,
    )
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let warm_iterations: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(100);
    let capture = recurse(DEPTH);
    let pid = capture.pid;

    // Cold: the first report with nothing parsed yet.
    let t = Instant::now();
    let mut unwinder = StackUnwinder::new();
    let mut symbolizer = Symbolizer::new();
    let construct = micros(t);
    let (cold, names, kernel_named) = report(&mut unwinder, &mut symbolizer, &capture);

    // What the reporter does when it first sees a process (and, for the
    // kernel, at start), then the first report after that.
    let mut unwinder_warmed = StackUnwinder::new();
    let mut symbolizer_warmed = Symbolizer::new();
    let t = Instant::now();
    unwinder_warmed.refresh_process(pid);
    let warmup_unwind = micros(t);
    let t = Instant::now();
    symbolizer_warmed.warm_process(pid);
    let warmup_user = micros(t);
    let t = Instant::now();
    symbolizer_warmed.warm_kernel();
    let warmup_kernel = micros(t);
    let (after_warmup, ..) = report(&mut unwinder_warmed, &mut symbolizer_warmed, &capture);

    let mut warm = Vec::with_capacity(warm_iterations);
    for _ in 0..warm_iterations {
        warm.push(report(&mut unwinder, &mut symbolizer, &capture).0);
    }
    let warm_median = |step: fn(&Steps) -> f64| median(warm.iter().map(step).collect());

    let recurse_frames = names.iter().filter(|n| n.ends_with("recurse")).count();
    // Whole: through main down to the program's entry point.
    let reaches_start =
        names.iter().any(|n| n == "main") && names.last().is_some_and(|n| n == "_start");
    let result = serde_json::json!({
        "frames": names.len(),
        "recurse_frames": recurse_frames,
        "reaches_start": reaches_start,
        "kernel_frames": capture.kernel_stack.len(),
        "kernel_frames_named": kernel_named,
        "stack_bytes": capture.user_stack.len(),
        "cold_us": {
            "construct": construct,
            "unwind": cold.unwind,
            "user_symbolize": cold.user_symbolize,
            "kernel_symbolize": cold.kernel_symbolize,
            "total": construct + cold.total(),
        },
        "warmup_us": {
            "unwind": warmup_unwind,
            "user_symbolize": warmup_user,
            "kernel_symbolize": warmup_kernel,
            "total": warmup_unwind + warmup_user + warmup_kernel,
        },
        "after_warmup_us": {
            "unwind": after_warmup.unwind,
            "user_symbolize": after_warmup.user_symbolize,
            "kernel_symbolize": after_warmup.kernel_symbolize,
            "total": after_warmup.total(),
        },
        "warm_us": {
            "unwind": warm_median(|s| s.unwind),
            "user_symbolize": warm_median(|s| s.user_symbolize),
            "kernel_symbolize": warm_median(|s| s.kernel_symbolize),
            "total": warm_median(|s| s.total()),
        },
        "warm_iterations": warm_iterations,
    });
    println!("{result}");
    if recurse_frames < DEPTH as usize || !reaches_start {
        eprintln!(
            "unwind_bench: the stack did not come out whole ({recurse_frames} recurse frames, \
             _start {}): {names:?}",
            if reaches_start {
                "reached"
            } else {
                "not reached"
            }
        );
        std::process::exit(1);
    }
}
