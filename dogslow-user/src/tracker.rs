//! Stall bookkeeping on the agent side: exactly one report per request,
//! completion records for reported requests, and when the deadline scan must
//! run the off-CPU capture.
use std::collections::{HashMap, VecDeque};

use dogslow_common::Inflight;

use crate::events::{Completion, StallCapture};

/// A request identity: its thread and start time (a thread is in at most
/// one request at a time, and starts are strictly increasing per thread).
pub type RequestKey = (u32, u64);

/// What is remembered about a reported request until it ends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reported {
    pub id: String,
    pub pid: u32,
    /// The kernel target slot the request came through.
    pub target: u32,
}

/// Reported requests that have not ended yet, bounded (oldest forgotten
/// first if completions were lost).
pub struct Tracker {
    reported: HashMap<RequestKey, Reported>,
    order: VecDeque<RequestKey>,
    capacity: usize,
    boot_id: String,
}

impl Tracker {
    pub fn new(boot_id: String, capacity: usize) -> Self {
        Self {
            reported: HashMap::new(),
            order: VecDeque::new(),
            capacity: capacity.max(1),
            boot_id,
        }
    }

    /// Registers a capture. Returns the new report's id, or `None` if this
    /// request was already reported (a second capture path raced the first).
    pub fn on_stall(&mut self, capture: &StallCapture) -> Option<String> {
        let key = (capture.tid, capture.start_ns);
        if self.reported.contains_key(&key) {
            return None;
        }
        let id = crate::report::report_id(&self.boot_id, capture.tid, capture.start_ns);
        if self.order.len() >= self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.reported.remove(&oldest);
        }
        self.order.push_back(key);
        self.reported.insert(
            key,
            Reported {
                id: id.clone(),
                pid: capture.pid,
                target: capture.target,
            },
        );
        Some(id)
    }

    /// The reported request a completion ends, if it was reported.
    pub fn on_completion(&mut self, completion: &Completion) -> Option<Reported> {
        let key = (completion.tid, completion.start_ns);
        let reported = self.reported.remove(&key)?;
        self.order.retain(|k| *k != key);
        Some(reported)
    }

    /// Number of reported requests still running.
    pub fn open_reports(&self) -> usize {
        self.reported.len()
    }
}

/// Whether some request is past its deadline, unreported, and its thread has
/// been off-CPU (so the sampler cannot see it): then the off-CPU capture
/// must run. A thread that ran again since is skipped by the capture itself.
pub fn needs_off_cpu_capture(inflight: &[(u32, Inflight)], now_ns: u64) -> bool {
    inflight.iter().any(|(_, request)| {
        request.reported == 0 && now_ns >= request.deadline_ns && request.off_cpu_since_ns != 0
    })
}

/// Whether some request is past its deadline and not yet captured: then
/// the cpu-clock sampler must run, in case its thread is on a CPU.
pub fn needs_sampling(inflight: &[(u32, Inflight)], now_ns: u64) -> bool {
    inflight
        .iter()
        .any(|(_, request)| request.reported == 0 && now_ns >= request.deadline_ns)
}

/// When the deadline scan must look again. Requests that start after `now`
/// cannot be due before `now + min_timeout`, and the current ones are due
/// at their deadlines; an overdue one that is still unreported (its thread
/// on a CPU, or the ring buffer was full) is looked at every `tick`. So an
/// idle agent wakes once per timeout, not once per tick.
pub fn next_scan_in(
    inflight: &[(u32, Inflight)],
    now_ns: u64,
    min_timeout_ns: u64,
    tick_ns: u64,
) -> u64 {
    let earliest = inflight
        .iter()
        .filter(|(_, request)| request.reported == 0)
        .map(|(_, request)| request.deadline_ns.saturating_sub(now_ns))
        .min()
        .unwrap_or(u64::MAX);
    earliest.min(min_timeout_ns).max(tick_ns)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{CaptureSource, Outcome, ThreadState};

    fn capture(tid: u32, start_ns: u64) -> StallCapture {
        StallCapture {
            source: CaptureSource::Sampler,
            tid,
            pid: 100,
            target: 0,
            state: ThreadState::Running,
            start_ns,
            deadline_ns: start_ns + 10,
            captured_ns: start_ns + 11,
            off_cpu_since_ns: None,
            regs: Default::default(),
            cpu: 0,
            comm: String::new(),
            kernel_stack: vec![],
            user_stack: vec![],
            user_stack_error: 0,
            return_slots: vec![],
            args: None,
        }
    }

    fn completion(tid: u32, start_ns: u64) -> Completion {
        Completion {
            outcome: Outcome::Returned,
            tid,
            pid: 100,
            start_ns,
            end_ns: start_ns + 50,
            signal: None,
        }
    }

    #[test]
    fn one_report_per_request() {
        let mut tracker = Tracker::new("boot".into(), 16);
        let first = tracker.on_stall(&capture(7, 1000));
        assert!(first.is_some());
        assert_eq!(tracker.on_stall(&capture(7, 1000)), None);
        // The next request on the same thread is its own report.
        let second = tracker.on_stall(&capture(7, 2000));
        assert!(second.is_some());
        assert_ne!(first, second);
    }

    #[test]
    fn completions_find_their_report_once() {
        let mut tracker = Tracker::new("boot".into(), 16);
        let id = tracker.on_stall(&capture(7, 1000)).unwrap();
        assert_eq!(tracker.on_completion(&completion(7, 999)), None);
        assert_eq!(
            tracker.on_completion(&completion(7, 1000)).map(|r| r.id),
            Some(id)
        );
        assert_eq!(tracker.on_completion(&completion(7, 1000)), None);
        assert_eq!(tracker.open_reports(), 0);
    }

    #[test]
    fn bounded() {
        let mut tracker = Tracker::new("boot".into(), 2);
        tracker.on_stall(&capture(1, 1));
        tracker.on_stall(&capture(2, 1));
        tracker.on_stall(&capture(3, 1));
        assert_eq!(tracker.open_reports(), 2);
        assert_eq!(tracker.on_completion(&completion(1, 1)), None);
    }

    #[test]
    fn sampling_only_while_an_overdue_request_is_unreported() {
        let request = |deadline_ns, reported| {
            (
                1,
                Inflight {
                    deadline_ns,
                    reported,
                    ..Default::default()
                },
            )
        };
        assert!(!needs_sampling(&[], 100));
        assert!(!needs_sampling(&[request(200, 0)], 100));
        assert!(needs_sampling(&[request(200, 0)], 200));
        assert!(!needs_sampling(&[request(200, 1)], 300));
    }

    #[test]
    fn scans_wake_at_the_next_possible_deadline() {
        const MS: u64 = 1_000_000;
        // Idle: one scan per timeout.
        assert_eq!(next_scan_in(&[], 0, 25_000 * MS, 10 * MS), 25_000 * MS);
        let request = |deadline_ns, reported| {
            (
                1,
                Inflight {
                    deadline_ns,
                    reported,
                    ..Default::default()
                },
            )
        };
        // A request due in 3 s.
        assert_eq!(
            next_scan_in(&[request(3_000 * MS, 0)], 0, 25_000 * MS, 10 * MS),
            3_000 * MS
        );
        // Reported requests do not count.
        assert_eq!(
            next_scan_in(&[request(3_000 * MS, 1)], 0, 25_000 * MS, 10 * MS),
            25_000 * MS
        );
        // Overdue and unreported: every tick.
        assert_eq!(
            next_scan_in(&[request(5 * MS, 0)], 9 * MS, 25_000 * MS, 10 * MS),
            10 * MS
        );
    }

    #[test]
    fn off_cpu_capture_only_for_overdue_unreported_switched_out() {
        let base = Inflight {
            start_ns: 0,
            deadline_ns: 100,
            ..Default::default()
        };
        let on_cpu = (1, base);
        assert!(!needs_off_cpu_capture(&[on_cpu], 200));
        let off_cpu = (
            2,
            Inflight {
                off_cpu_since_ns: 50,
                ..base
            },
        );
        assert!(!needs_off_cpu_capture(&[off_cpu], 99));
        assert!(needs_off_cpu_capture(&[on_cpu, off_cpu], 100));
        let reported = (
            3,
            Inflight {
                off_cpu_since_ns: 50,
                reported: 1,
                ..base
            },
        );
        assert!(!needs_off_cpu_capture(&[reported], 500));
    }
}
