//! Storm control for email (never for the JSON stream or the files): one
//! bad deploy stalls thousands of requests the same way, and the team needs
//! one mail saying so, not thousands.
//!
//! Reports are grouped by their `fingerprint`. The first report of a group
//! is mailed at once; the ones after it within `interval` are counted, and
//! when the interval has passed a digest mail says how many there were and
//! over what time span, with the latest of them. On top of that, a global
//! cap on mails per hour: what it holds back is counted the same way and
//! summarized when the cap allows. Nothing is dropped silently; every
//! count reaches a mail or stderr.
//!
//! Pure bookkeeping with the time passed in, so it is tested without clocks.
use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::report::StallReport;

const HOUR: Duration = Duration::from_secs(3600);
/// Groups tracked at once; beyond this, reports of new fingerprints that
/// cannot be mailed right away are counted as `overflow`.
pub const MAX_GROUPS: usize = 10_000;

/// Reports of one group that were not mailed, to be summarized.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Suppressed {
    pub count: u64,
    /// `time` of the first and last of them (RFC 3339).
    pub first: String,
    pub last: String,
}

/// A mail to send now.
#[derive(Clone, Debug)]
pub struct Due {
    /// The report the mail shows: the new one, or the latest suppressed.
    pub report: Arc<StallReport>,
    /// Reports of the same group not mailed since the group's last mail;
    /// for a digest, `report` is the last of them and counted in it.
    pub suppressed: Option<Suppressed>,
    /// The Message-ID of the group's first mail, so that mail readers
    /// thread a storm as one conversation; `None` for that first mail.
    pub thread: Option<String>,
}

struct Group {
    /// No mail for this group before this instant.
    next_allowed: Instant,
    suppressed: Option<Suppressed>,
    latest: Option<Arc<StallReport>>,
    thread: Option<String>,
}

impl Group {
    /// A kind of stall first seen at `now`: nothing sent or held yet.
    fn new(now: Instant) -> Self {
        Self {
            next_allowed: now,
            suppressed: None,
            latest: None,
            thread: None,
        }
    }
}

pub struct StormControl {
    interval: Duration,
    max_per_hour: u32,
    groups: HashMap<String, Group>,
    /// When each mail of the last hour was let through, oldest first.
    sent: VecDeque<Instant>,
    /// Reports not even counted in a group because `MAX_GROUPS` were full.
    pub overflow: u64,
    /// The hourly cap is holding mails back now.
    capped: bool,
    /// The cap started holding mails back and nobody was told yet.
    cap_notice: bool,
}

impl StormControl {
    pub fn new(interval: Duration, max_per_hour: u32) -> Self {
        Self {
            interval,
            max_per_hour,
            groups: HashMap::new(),
            sent: VecDeque::new(),
            overflow: 0,
            capped: false,
            cap_notice: false,
        }
    }

    /// A new stall report: mail it now, or count it for a later digest.
    pub fn offer(&mut self, report: Arc<StallReport>, now: Instant) -> Option<Due> {
        self.expire(now);
        let allowed = self
            .groups
            .get(&report.fingerprint)
            .is_none_or(|group| now >= group.next_allowed && group.suppressed.is_none());
        if allowed && self.cap_allows() {
            let group = self
                .groups
                .entry(report.fingerprint.clone())
                .or_insert_with(|| Group::new(now));
            group.next_allowed = now + self.interval;
            self.sent.push_back(now);
            return Some(Due {
                report,
                suppressed: None,
                thread: group.thread.clone(),
            });
        }
        if !self.groups.contains_key(&report.fingerprint) && self.groups.len() >= MAX_GROUPS {
            self.overflow += 1;
            return None;
        }
        let group = self
            .groups
            .entry(report.fingerprint.clone())
            .or_insert_with(|| Group::new(now));
        match &mut group.suppressed {
            Some(suppressed) => {
                suppressed.count += 1;
                suppressed.last = report.time.clone();
            }
            None => {
                group.suppressed = Some(Suppressed {
                    count: 1,
                    first: report.time.clone(),
                    last: report.time.clone(),
                })
            }
        }
        group.latest = Some(report);
        None
    }

    /// Digests whose group's interval has passed, oldest group first, as
    /// far as the hourly cap allows.
    pub fn due(&mut self, now: Instant) -> Vec<Due> {
        self.expire(now);
        let mut ready: Vec<(&String, Instant)> = self
            .groups
            .iter()
            .filter(|(_, g)| g.suppressed.is_some() && now >= g.next_allowed)
            .map(|(key, g)| (key, g.next_allowed))
            .collect();
        ready.sort_by_key(|&(_, at)| at);
        let keys: Vec<String> = ready.into_iter().map(|(key, _)| key.clone()).collect();
        let mut due = Vec::new();
        for key in keys {
            if !self.cap_allows() {
                break;
            }
            if let Some(digest) = self.take_digest(&key, now + self.interval) {
                self.sent.push_back(now);
                due.push(digest);
            }
        }
        due
    }

    /// At shutdown: a digest for every group with suppressed reports,
    /// whatever the interval and cap, so that no count is lost.
    pub fn drain(&mut self) -> Vec<Due> {
        let keys: Vec<String> = self
            .groups
            .iter()
            .filter(|(_, g)| g.suppressed.is_some())
            .map(|(key, _)| key.clone())
            .collect();
        let far = Instant::now() + self.interval;
        keys.iter()
            .filter_map(|key| self.take_digest(key, far))
            .collect()
    }

    /// Records the Message-ID of a group's first mail.
    pub fn set_thread(&mut self, fingerprint: &str, message_id: &str) {
        if let Some(group) = self.groups.get_mut(fingerprint)
            && group.thread.is_none()
        {
            group.thread = Some(message_id.to_owned());
        }
    }

    /// When `due` may next have something to send.
    pub fn next_wakeup(&self) -> Option<Instant> {
        let group_ready = self
            .groups
            .values()
            .filter(|g| g.suppressed.is_some())
            .map(|g| g.next_allowed)
            .min()?;
        // Under the cap, wait for the oldest mail of the hour to age out.
        let cap_free = match self.sent.front() {
            Some(&oldest) if self.sent.len() as u64 >= u64::from(self.max_per_hour) => {
                oldest + HOUR
            }
            _ => group_ready,
        };
        Some(group_ready.max(cap_free))
    }

    /// The cap, once each time it starts holding mails back: for a
    /// one-line notice on stderr.
    pub fn take_cap_notice(&mut self) -> Option<u32> {
        std::mem::take(&mut self.cap_notice).then_some(self.max_per_hour)
    }

    fn take_digest(&mut self, key: &str, next_allowed: Instant) -> Option<Due> {
        let group = self.groups.get_mut(key)?;
        let suppressed = group.suppressed.take()?;
        let report = group.latest.take()?;
        group.next_allowed = next_allowed;
        Some(Due {
            report,
            suppressed: Some(suppressed),
            thread: group.thread.clone(),
        })
    }

    fn cap_allows(&mut self) -> bool {
        let allowed = (self.sent.len() as u64) < u64::from(self.max_per_hour);
        if !allowed && !self.capped {
            self.cap_notice = true;
        }
        self.capped = !allowed;
        allowed
    }

    /// Forgets mails older than an hour, and groups that are quiet: nothing
    /// pending and past their interval (their next report mails at once).
    fn expire(&mut self, now: Instant) {
        while self
            .sent
            .front()
            .is_some_and(|&at| now.saturating_duration_since(at) >= HOUR)
        {
            self.sent.pop_front();
        }
        if self.groups.len() > MAX_GROUPS / 2 {
            self.groups
                .retain(|_, g| g.suppressed.is_some() || now < g.next_allowed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(fingerprint: &str, time: &str) -> Arc<StallReport> {
        let mut report = StallReport::example();
        report.fingerprint = fingerprint.into();
        report.time = time.into();
        Arc::new(report)
    }

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn fifty_alike_make_one_mail_then_a_digest_of_49() {
        let start = Instant::now();
        let mut storm = StormControl::new(10 * MINUTE, 100);
        let first = storm
            .offer(report("a", "t0"), start)
            .expect("first is mailed");
        assert!(first.suppressed.is_none());
        storm.set_thread("a", "<m1@x>");
        for i in 1..50 {
            let at = start + Duration::from_millis(i * 1000);
            assert!(storm.offer(report("a", &format!("t{i}")), at).is_none());
        }
        assert!(storm.due(start + 9 * MINUTE).is_empty());
        assert_eq!(storm.next_wakeup(), Some(start + 10 * MINUTE));
        let digests = storm.due(start + 10 * MINUTE);
        assert_eq!(digests.len(), 1);
        let digest = &digests[0];
        assert_eq!(
            digest.suppressed,
            Some(Suppressed {
                count: 49,
                first: "t1".into(),
                last: "t49".into()
            })
        );
        assert_eq!(digest.report.time, "t49");
        assert_eq!(digest.thread.as_deref(), Some("<m1@x>"));
        // Nothing left; the next report waits for the next interval.
        assert!(storm.due(start + 30 * MINUTE).is_empty());
        assert!(storm.offer(report("a", "u"), start + 11 * MINUTE).is_none());
        assert!(storm.offer(report("a", "v"), start + 21 * MINUTE).is_none());
        let later = storm.due(start + 21 * MINUTE);
        assert_eq!(later[0].suppressed.as_ref().unwrap().count, 2);
    }

    #[test]
    fn different_fingerprints_are_mailed_separately() {
        let now = Instant::now();
        let mut storm = StormControl::new(10 * MINUTE, 100);
        assert!(storm.offer(report("a", "t"), now).is_some());
        assert!(storm.offer(report("b", "t"), now).is_some());
        assert!(storm.offer(report("a", "t"), now).is_none());
        // A quiet group mails its next report at once.
        assert!(storm.offer(report("b", "t"), now + 10 * MINUTE).is_some());
    }

    #[test]
    fn the_hourly_cap_holds_mails_back_and_counts_them() {
        let start = Instant::now();
        let mut storm = StormControl::new(MINUTE, 2);
        assert!(storm.offer(report("a", "t"), start).is_some());
        assert!(storm.offer(report("b", "t"), start).is_some());
        assert!(storm.offer(report("c", "t1"), start).is_none());
        assert!(storm.offer(report("c", "t2"), start).is_none());
        assert_eq!(storm.take_cap_notice(), Some(2));
        assert_eq!(storm.take_cap_notice(), None);
        // Past c's interval but still capped.
        assert!(storm.due(start + 2 * MINUTE).is_empty());
        assert_eq!(storm.next_wakeup(), Some(start + HOUR));
        let digests = storm.due(start + HOUR);
        assert_eq!(digests.len(), 1);
        assert_eq!(digests[0].report.fingerprint, "c");
        assert_eq!(digests[0].suppressed.as_ref().unwrap().count, 2);
    }

    #[test]
    fn drain_summarizes_everything_pending() {
        let now = Instant::now();
        let mut storm = StormControl::new(10 * MINUTE, 100);
        storm.offer(report("a", "t"), now);
        storm.offer(report("a", "t"), now);
        storm.offer(report("a", "t"), now);
        storm.offer(report("b", "t"), now);
        let drained = storm.drain();
        assert_eq!(drained.len(), 1);
        assert_eq!(drained[0].suppressed.as_ref().unwrap().count, 2);
        assert!(storm.drain().is_empty());
    }
}
