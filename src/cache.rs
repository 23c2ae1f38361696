//! The catch-up cache of one feed: its last updates, which pairs it already
//! delivered, and the proof of what it holds.
//!
//! A client that subscribes with `since` is owed every update of its bugs
//! with `when >= since`, or `"partial": true`. The cache answers only when
//! it can prove it holds all of them; otherwise the hub asks the catch-up
//! database, or answers `partial`. It must never claim more than it can
//! prove: a wrong claim is a silent loss.
//!
//! # The proof
//!
//! Updates do not arrive in time order. The poller publishes in row order,
//! and a `push_notify` row keeps its id while its time moves on, so a low
//! row id can carry a late time; two requests can commit in the other order
//! than they stamped; a clock can go back. And a restarted `serve` inherits
//! a durable queue that its predecessor partly consumed: what the
//! predecessor took is gone for good, whatever its time. So the first
//! update received says nothing about what came before it.
//!
//! What can be proven is the moment the cache started receiving from a
//! point known to be complete: the hub calls [`Cache::resume`] when a
//! broker consumer has bound its queue and started consuming, and when the
//! in-process poller took the poller lock. Every message published after
//! that moment reaches the cache. It assumes:
//!
//! 1. A change is published after it was stamped: Bugzilla stamps it, then
//!    commits, then the poller reads and publishes it.
//! 2. Stamps come from a clock that runs at most [`CLOCK_MARGIN_SECS`]
//!    ahead of this host's, read as UTC (a database on UTC, both hosts on
//!    NTP). A stamp that arrives before this host's clock reached it
//!    shows the stamping clock ahead by at least the difference: that
//!    difference is added to the margin for good (see `ahead`).
//! 3. Stamps have whole seconds, truncated.
//!
//! Then a change stamped after second `resume + margin + ahead` was
//! stamped after the resume, so published after it, so received. The cache
//! vouches for `since` only if `since` is after that second, and after
//! every time it has evicted (evictions do not follow time order either, so
//! the bound is the latest time evicted, not the last). Messages already in
//! an inherited queue are delivered, and deduplicated, but prove nothing. A stamping clock that goes back (summer time ending in a
//! database on local time, an NTP step) breaks assumption 2 for changes
//! stamped in the repeated span: time-based `since` cannot see those, which
//! is why `bzpush check` warns about a database not on UTC.
//!
//! # Duplicates
//!
//! A pair `(bug, when)` already in the cache was already delivered on the
//! feed (a redelivery, a poller retrying a batch): [`Cache::add`] refuses
//! it. Any other pair is new and is delivered, even one earlier than the
//! bug's last time. Memory stays bounded: only the cache's own entries are
//! remembered.

use std::collections::{HashMap, HashSet, VecDeque};

use crate::notification::{BugId, Moment, Notification};
use crate::protocol::Since;

/// How far the clock that stamps changes may run ahead of this host's
/// before the stream shows it: NTP keeps hosts within milliseconds; a
/// couple of seconds covers a host that synchronises rarely.
pub const CLOCK_MARGIN_SECS: i64 = 2;

/// The last updates of a feed, to answer `since`.
pub struct Cache {
    entries: VecDeque<Notification>,
    capacity: usize,
    /// How many entries hold each pair: the pairs already delivered.
    pairs: HashMap<Notification, usize>,
    /// When this process last started receiving from a point known to be
    /// complete, on this host's clock; `None` before it ever did.
    resumed: Option<Moment>,
    /// How many seconds ahead of this host's clock the stamping clock was
    /// seen to run (a stamp later than its arrival); added to
    /// [`CLOCK_MARGIN_SECS`], never lowered.
    ahead: i64,
    /// The latest time the cache evicted.
    evicted: Option<Moment>,
}

impl Cache {
    pub fn new(capacity: usize) -> Cache {
        Cache {
            entries: VecDeque::new(),
            capacity,
            pairs: HashMap::new(),
            resumed: None,
            ahead: 0,
            evicted: None,
        }
    }

    /// The cache receives everything published from `now` on (its
    /// upstream just started, or started again after a gap): it vouches
    /// only for what is stamped after that.
    pub fn resume(&mut self, now: Moment) {
        self.resumed = Some(self.resumed.map_or(now, |r| r.max(now)));
    }

    /// Takes in an update that arrived at `now` (this host's clock);
    /// `false` if the same pair was already delivered on this feed.
    pub fn add(&mut self, notification: &Notification, now: Moment) -> bool {
        if self.pairs.contains_key(notification) {
            return false;
        }
        if let Some(at) = notification.when.at() {
            let ahead = at.secs() - now.secs();
            self.ahead = self.ahead.max(ahead);
        }
        if self.capacity == 0 {
            // Kept nowhere: evicted as soon as it came.
            self.evicted_time(notification);
            return true;
        }
        if self.entries.len() == self.capacity
            && let Some(evicted) = self.entries.pop_front()
        {
            self.evicted_time(&evicted);
            if let Some(count) = self.pairs.get_mut(&evicted) {
                *count -= 1;
                if *count == 0 {
                    self.pairs.remove(&evicted);
                }
            }
        }
        *self.pairs.entry(notification.clone()).or_insert(0) += 1;
        self.entries.push_back(notification.clone());
        true
    }

    fn evicted_time(&mut self, notification: &Notification) {
        // A time that names no moment is answered to every `since` (see
        // `Since::covers`); there is none to raise the bound to.
        if let Some(at) = notification.when.at() {
            self.evicted = Some(self.evicted.map_or(at, |e| e.max(at)));
        }
    }

    /// Whether every update at or after `since` is here (see the module's
    /// proof).
    pub fn complete_since(&self, since: &Since) -> bool {
        let Some(resumed) = self.resumed else {
            return false;
        };
        // Stamps are whole seconds: one stamped in the resume's own second
        // may have been stamped before it.
        let received_after = resumed.secs() + CLOCK_MARGIN_SECS + self.ahead;
        since.at().secs() > received_after && self.evicted.is_none_or(|e| since.at() > e)
    }

    /// Cached updates of `bugs` at or after `since`, oldest first; one
    /// bug's updates at the same time keep their arrival order.
    pub fn since(&self, bugs: &HashSet<BugId>, since: &Since) -> Vec<&Notification> {
        let mut found: Vec<&Notification> = self
            .entries
            .iter()
            .filter(|n| bugs.contains(&n.bug) && since.covers(&n.when))
            .collect();
        found.sort_by(|a, b| a.when.cmp(&b.when));
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::n;

    fn at(s: &str) -> Moment {
        Moment::parse(s).expect("a time")
    }

    fn since(s: &str) -> Since {
        Since::parse(s).expect("a since")
    }

    fn bugs(ids: &[u32]) -> HashSet<BugId> {
        ids.iter().filter_map(|&b| BugId::new(b)).collect()
    }

    #[test]
    fn vouches_for_nothing_before_it_resumed() {
        let mut cache = Cache::new(10);
        // The first update of an inherited queue: its time proves nothing
        // about what a predecessor consumed.
        assert!(cache.add(&n(2, "2026-11-30T10:00:25"), at("2026-11-30T10:00:40")));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:26")));
        assert!(!cache.complete_since(&since("2026-11-30T11:00:00")));
    }

    #[test]
    fn an_inherited_queue_proves_only_what_came_after_the_resume() {
        let mut cache = Cache::new(10);
        // A predecessor delivered bug 1 at :30 and died; bug 2 at :25 waits.
        cache.resume(at("2026-11-30T10:00:40.300"));
        assert!(cache.add(&n(2, "2026-11-30T10:00:25"), at("2026-11-30T10:00:40.400")));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:26")));
        // The resume's own second, and the margin, are not vouched for.
        assert!(!cache.complete_since(&since("2026-11-30T10:00:40")));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:42")));
        assert!(cache.complete_since(&since("2026-11-30T10:00:43")));
    }

    #[test]
    fn a_stamping_clock_seen_ahead_raises_the_bound() {
        let mut cache = Cache::new(10);
        cache.resume(at("2026-11-30T10:00:00"));
        assert!(cache.complete_since(&since("2026-11-30T10:00:03")));
        // A database on local time, an hour ahead of UTC.
        cache.add(&n(1, "2026-11-30T11:00:05"), at("2026-11-30T10:00:05"));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:03")));
        assert!(!cache.complete_since(&since("2026-11-30T11:00:02")));
        assert!(cache.complete_since(&since("2026-11-30T11:00:03")));
    }

    #[test]
    fn a_resume_after_a_gap_raises_the_bound() {
        let mut cache = Cache::new(10);
        cache.resume(at("2026-11-30T10:00:00"));
        cache.resume(at("2026-11-30T10:05:00"));
        assert!(!cache.complete_since(&since("2026-11-30T10:01:00")));
        assert!(cache.complete_since(&since("2026-11-30T10:05:03")));
    }

    #[test]
    fn eviction_raises_the_bound_to_the_latest_time_evicted_whatever_the_order() {
        let mut cache = Cache::new(2);
        cache.resume(at("2026-11-30T10:00:00"));
        let now = at("2026-11-30T10:01:00");
        cache.add(&n(1, "2026-11-30T10:00:30"), now);
        cache.add(&n(2, "2026-11-30T10:00:10"), now);
        cache.add(&n(3, "2026-11-30T10:00:20"), now);
        // :30 was evicted though :10 and :20 stay.
        assert!(!cache.complete_since(&since("2026-11-30T10:00:30")));
        assert!(cache.complete_since(&since("2026-11-30T10:00:31")));
        let none = Cache::new(0);
        assert!(!none.complete_since(&since("2026-11-30T10:00:31")));
    }

    #[test]
    fn only_a_pair_already_delivered_is_refused() {
        let mut cache = Cache::new(10);
        let now = at("2026-11-30T10:00:00");
        assert!(cache.add(&n(31, "2026-10-25T02:30:00"), now));
        assert!(cache.add(&n(32, "2026-10-25T02:30:00"), now));
        // Earlier than bug 31's last time: a new pair, delivered.
        assert!(cache.add(&n(31, "2026-10-25T02:10:00"), now));
        assert!(!cache.add(&n(31, "2026-10-25T02:30:00"), now));
        // The same time in another spelling is the same pair.
        assert!(!cache.add(&n(31, "2026-10-25 02:10:00"), now));
        // Once evicted, a pair is forgotten: delivering it again is a
        // duplicate, which clients must accept anyway.
        let mut small = Cache::new(1);
        assert!(small.add(&n(1, "2026-10-25T02:30:00"), now));
        assert!(small.add(&n(2, "2026-10-25T02:30:00"), now));
        assert!(small.add(&n(1, "2026-10-25T02:30:00"), now));
    }

    #[test]
    fn answers_by_time_not_text() {
        let mut cache = Cache::new(10);
        let now = at("2026-11-30T10:00:00");
        cache.add(&n(1, "2026-11-30 10:00:05"), now);
        cache.add(&n(1, "2026-11-30T10:00:01Z"), now);
        cache.add(&n(2, "2026-11-30T10:00:07.5"), now);
        cache.add(&n(1, "2026-11-30T09:59:59"), now);
        let found = cache.since(&bugs(&[1, 2]), &since("2026-11-30T10:00:00"));
        let texts: Vec<&str> = found.iter().map(|n| n.when.as_str()).collect();
        assert_eq!(
            texts,
            [
                "2026-11-30T10:00:01Z",
                "2026-11-30 10:00:05",
                "2026-11-30T10:00:07.5"
            ]
        );
    }
}
