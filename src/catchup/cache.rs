//! The catch-up cache of one feed: its last updates, which pairs it already
//! delivered, and the proof of what it holds.
//!
//! The cache answers `since` only when it can prove it holds every update
//! since then; it must never claim more than it can prove: a wrong claim
//! is a silent loss.
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
//! point known to be complete, the resume ([`Cache::resume`]):
//!
//! - `run` (and the demo): the database's own time at which this process's
//!   poller took the poller lock ([`Resumed::Database`]). The lock excludes
//!   every other poller from then on; a change stamped later was committed
//!   later, so it is still in `push_notify` (even if stamped earlier than a
//!   row published before) and this poller publishes it; source `bugs`
//!   replays from its watermark, one overlap back. The database's time is
//!   the clock that stamps, whatever its zone: no host clock takes part.
//! - `serve`: this host's time at which a broker consumer bound its queue
//!   and started consuming ([`Resumed::Host`]): every message published
//!   after that reaches the cache. To compare it with stamps, the
//!   database's clock offset from this host is measured on the catch-up
//!   database ([`DatabaseClock::Ahead`]); until it answered, nothing is
//!   vouched for. Without a catch-up database the database is assumed to
//!   stamp in UTC ([`DatabaseClock::AssumedUtc`], which `bzpush check poll`
//!   and `check run` verify with their time-zone warning); a `since` in
//!   this host's future, which only a clock ahead of it can give, is then
//!   never vouched for.
//!
//! It assumes:
//!
//! 1. A change is published after it was stamped: Bugzilla stamps it with
//!    the database's time, then commits, then the poller reads and
//!    publishes it.
//! 2. The stamping clock runs at most [`CLOCK_MARGIN_SECS`] ahead of the
//!    resume's clock shifted by what is known of their offset (none for
//!    the database's own time; the measured one for `serve`, or zero when
//!    assumed UTC). A stamp that arrives ahead of this host's clock by more
//!    than that shows the stamping clock further ahead: `serve` raises its
//!    bound by it for good.
//! 3. Stamps have whole seconds, truncated.
//!
//! Then a change stamped after second `resume + offset + margin` was
//! stamped after the resume, so published after it, so received. The cache
//! vouches for `since` only if `since` is after that second, and after
//! every time it has evicted (evictions do not follow time order either, so
//! the bound is the latest time evicted, not the last). Messages already in
//! an inherited queue are delivered, and deduplicated, but prove nothing.
//! A stamping clock that goes back (summer time ending in a database on
//! local time, an NTP step) breaks assumption 2 for changes stamped in the
//! repeated span: time-based `since` cannot see those, which is why
//! `bzpush check` warns about a database not on UTC.
//!
//! # Duplicates
//!
//! A pair `(bug, when)` already in the cache was already delivered on the
//! feed (a redelivery, a poller retrying a batch): [`Cache::add`] refuses
//! it. Any other pair is new and is delivered, even one earlier than the
//! bug's last time. Memory stays bounded: only the cache's own entries are
//! remembered.

use std::collections::{HashSet, VecDeque};

use crate::notification::{BugId, Moment, Notification};
use crate::protocol::Since;

/// How far the clock that stamps changes may run ahead of the clock the
/// resume was read on, beyond what is known: NTP keeps hosts within
/// milliseconds; a couple of seconds covers a host that synchronises
/// rarely, or a database replica whose clock is not the primary's.
pub const CLOCK_MARGIN_SECS: i64 = 2;

/// Where the cache's upstream started receiving from a point known to be
/// complete, on which clock (see the proof).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// The database's time when this process's poller took the lock
    /// (`run`, the demo); `None`: unknown, nothing is vouched for.
    Database(Option<Moment>),
    /// This host's time when a broker consumer started consuming (`serve`).
    Host(Moment),
}

/// What is known of the stamping clock's offset from this host's, for a
/// [`Resumed::Host`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DatabaseClock {
    /// No catch-up database to ask: assumed to stamp in UTC.
    AssumedUtc,
    /// The catch-up database has not answered yet: nothing is vouched for.
    Awaited,
    /// At most this many seconds ahead of this host's (negative: behind),
    /// as measured on the catch-up database.
    Ahead(i64),
}

/// The last updates of a feed, to answer `since`.
pub struct Cache {
    entries: VecDeque<Notification>,
    capacity: usize,
    /// The pairs in `entries`, each there once: the pairs already delivered.
    pairs: HashSet<Notification>,
    /// When this process last started receiving from a point known to be
    /// complete; `None` before it ever did.
    resumed: Option<Resumed>,
    /// The stamping clock's offset, for a resume on this host's clock.
    clock: DatabaseClock,
    /// How many seconds ahead of this host's clock the stamping clock was
    /// seen to run (a stamp minus its arrival), never lowered; `None`
    /// before any stamp arrived.
    seen_ahead: Option<i64>,
    /// The latest time the cache evicted.
    evicted: Option<Moment>,
    /// The latest time it ever received: what a catch-up database must
    /// hold to answer completely ([`Cache::seen_by`]).
    newest: Option<Moment>,
}

impl Cache {
    pub fn new(capacity: usize, clock: DatabaseClock) -> Cache {
        Cache {
            entries: VecDeque::new(),
            capacity,
            pairs: HashSet::new(),
            resumed: None,
            clock,
            seen_ahead: None,
            evicted: None,
            newest: None,
        }
    }

    /// The cache receives everything published from `at` on (its
    /// upstream just started, or started again after a gap): it vouches
    /// only for what is stamped after that. A resume on the same clock
    /// never moves the bound back.
    pub fn resume(&mut self, at: Resumed) {
        self.resumed = Some(match (self.resumed, at) {
            (Some(Resumed::Database(Some(r))), Resumed::Database(Some(a))) => {
                Resumed::Database(Some(r.max(a)))
            }
            (Some(Resumed::Host(r)), Resumed::Host(a)) => Resumed::Host(r.max(a)),
            (_, at) => at,
        });
    }

    /// The catch-up database measured its clock's offset from this host's.
    pub fn database_clock(&mut self, ahead: i64) {
        self.clock = DatabaseClock::Ahead(ahead);
    }

    /// Takes in an update that arrived at `now` (this host's clock);
    /// `false` if the same pair was already delivered on this feed.
    pub fn add(&mut self, notification: &Notification, now: Moment) -> bool {
        if !self.pairs.insert(notification.clone()) {
            return false;
        }
        if let Some(at) = notification.when.at() {
            let ahead = at.secs() - now.secs();
            self.seen_ahead = Some(self.seen_ahead.map_or(ahead, |seen| seen.max(ahead)));
            self.newest = Some(self.newest.map_or(at, |newest| newest.max(at)));
        }
        self.entries.push_back(notification.clone());
        if self.entries.len() > self.capacity
            && let Some(evicted) = self.entries.pop_front()
        {
            self.pairs.remove(&evicted);
            // A time that names no moment is answered to every `since`
            // (see `Since::covers`); there is none to raise the bound to.
            if let Some(at) = evicted.when.at() {
                self.evicted = Some(self.evicted.map_or(at, |e| e.max(at)));
            }
        }
        true
    }

    /// Whether a database whose newest change is stamped `newest` holds
    /// every change this feed has received. A replica that lags does not:
    /// an answer from it would miss what the server already saw (or a
    /// predecessor consumed), and only the live stream is complete beyond
    /// its newest change. A database that holds nothing yet holds only
    /// what came before anything received.
    pub fn seen_by(&self, newest: Option<Moment>) -> bool {
        match (self.newest, newest) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(seen), Some(newest)) => newest >= seen,
        }
    }

    /// Whether every update at or after `since` is here (see the module's
    /// proof); `now` is this host's clock.
    pub fn complete_since(&self, since: &Since, now: Moment) -> bool {
        // The last second that may hold a change stamped before the
        // resume: stamps are whole seconds, so one stamped in the resume's
        // own second may have been stamped before it.
        let last_unproven = match (self.resumed, self.clock) {
            (None | Some(Resumed::Database(None)), _) => return false,
            (Some(Resumed::Database(Some(at))), _) => at.secs() + CLOCK_MARGIN_SECS,
            (Some(Resumed::Host(_)), DatabaseClock::Awaited) => return false,
            (Some(Resumed::Host(at)), DatabaseClock::Ahead(measured)) => {
                // A stamp seen further ahead than measured: the clock
                // moved since.
                let ahead = self.seen_ahead.map_or(measured, |seen| seen.max(measured));
                at.secs() + ahead + CLOCK_MARGIN_SECS
            }
            (Some(Resumed::Host(at)), DatabaseClock::AssumedUtc) => {
                // A `since` in this host's future can only come from a
                // clock ahead of it, by an unknown offset: not provable.
                if since.at().secs() > now.secs() + CLOCK_MARGIN_SECS {
                    return false;
                }
                let ahead = self.seen_ahead.unwrap_or(0).max(0);
                at.secs() + ahead + CLOCK_MARGIN_SECS
            }
        };
        since.at().secs() > last_unproven && self.evicted.is_none_or(|e| since.at() > e)
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

    /// This host's clock long after every test's times.
    fn late() -> Moment {
        at("2026-11-30T23:00:00")
    }

    fn bugs(ids: &[u32]) -> HashSet<BugId> {
        ids.iter().filter_map(|&b| BugId::new(b)).collect()
    }

    #[test]
    fn a_database_holds_what_was_seen_only_if_its_newest_change_is_no_older() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        assert!(cache.seen_by(None), "nothing seen yet");
        cache.add(&n(1, "2026-11-30T10:00:20"), late());
        cache.add(&n(2, "2026-11-30T10:00:10"), late());
        // A replica 60 s behind holds changes up to 09:59:20.
        assert!(!cache.seen_by(Some(at("2026-11-30T09:59:20"))));
        assert!(!cache.seen_by(None));
        assert!(cache.seen_by(Some(at("2026-11-30T10:00:20"))));
        assert!(cache.seen_by(Some(at("2026-11-30T10:05:00"))));
    }

    #[test]
    fn vouches_for_nothing_before_it_resumed() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        // The first update of an inherited queue: its time proves nothing
        // about what a predecessor consumed.
        assert!(cache.add(&n(2, "2026-11-30T10:00:25"), at("2026-11-30T10:00:40")));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:26"), late()));
        assert!(!cache.complete_since(&since("2026-11-30T11:00:00"), late()));
    }

    #[test]
    fn an_inherited_queue_proves_only_what_came_after_the_resume() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        // A predecessor delivered bug 1 at :30 and died; bug 2 at :25 waits.
        cache.resume(Resumed::Host(at("2026-11-30T10:00:40.300")));
        assert!(cache.add(&n(2, "2026-11-30T10:00:25"), at("2026-11-30T10:00:40.400")));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:26"), late()));
        // The resume's own second, and the margin, are not vouched for.
        assert!(!cache.complete_since(&since("2026-11-30T10:00:40"), late()));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:42"), late()));
        assert!(cache.complete_since(&since("2026-11-30T10:00:43"), late()));
    }

    #[test]
    fn a_stamping_clock_seen_ahead_raises_the_bound() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        cache.resume(Resumed::Host(at("2026-11-30T10:00:00")));
        assert!(cache.complete_since(&since("2026-11-30T10:00:03"), late()));
        // A database on local time, an hour ahead of UTC.
        cache.add(&n(1, "2026-11-30T11:00:05"), at("2026-11-30T10:00:05"));
        assert!(!cache.complete_since(&since("2026-11-30T10:00:03"), late()));
        assert!(!cache.complete_since(&since("2026-11-30T11:00:02"), late()));
        assert!(cache.complete_since(&since("2026-11-30T11:00:03"), late()));
    }

    #[test]
    fn a_resume_after_a_gap_raises_the_bound() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        cache.resume(Resumed::Host(at("2026-11-30T10:00:00")));
        cache.resume(Resumed::Host(at("2026-11-30T10:05:00")));
        assert!(!cache.complete_since(&since("2026-11-30T10:01:00"), late()));
        assert!(cache.complete_since(&since("2026-11-30T10:05:03"), late()));
    }

    #[test]
    fn eviction_raises_the_bound_to_the_latest_time_evicted_whatever_the_order() {
        let mut cache = Cache::new(2, DatabaseClock::AssumedUtc);
        cache.resume(Resumed::Host(at("2026-11-30T10:00:00")));
        let now = at("2026-11-30T10:01:00");
        cache.add(&n(1, "2026-11-30T10:00:30"), now);
        cache.add(&n(2, "2026-11-30T10:00:10"), now);
        cache.add(&n(3, "2026-11-30T10:00:20"), now);
        // :30 was evicted though :10 and :20 stay.
        assert!(!cache.complete_since(&since("2026-11-30T10:00:30"), late()));
        assert!(cache.complete_since(&since("2026-11-30T10:00:31"), late()));
        let none = Cache::new(0, DatabaseClock::AssumedUtc);
        assert!(!none.complete_since(&since("2026-11-30T10:00:31"), late()));
    }

    #[test]
    fn only_a_pair_already_delivered_is_refused() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
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
        let mut small = Cache::new(1, DatabaseClock::AssumedUtc);
        assert!(small.add(&n(1, "2026-10-25T02:30:00"), now));
        assert!(small.add(&n(2, "2026-10-25T02:30:00"), now));
        assert!(small.add(&n(1, "2026-10-25T02:30:00"), now));
    }

    #[test]
    fn answers_by_time_not_text() {
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
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

    #[test]
    fn run_vouches_on_the_database_clock_ahead_of_the_host() {
        // A database on CET, an hour ahead of this host's UTC clock. The
        // client got bug 6 at 03:01:30; bug 5 at 03:01:50 was delivered
        // before a restart; the new poller took the lock at 03:02:10 on the
        // database's clock, 02:02:10 on this host's.
        let host_now = at("2026-12-01T02:02:15");
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        cache.resume(Resumed::Database(Some(at("2026-12-01T03:02:10"))));
        assert!(!cache.complete_since(&since("2026-12-01T03:01:30"), host_now));
        assert!(!cache.complete_since(&since("2026-12-01T03:02:12"), host_now));
        assert!(cache.complete_since(&since("2026-12-01T03:02:13"), host_now));
    }

    #[test]
    fn run_vouches_on_the_database_clock_behind_the_host() {
        // A database five hours behind this host: what it stamps after the
        // lock is vouched for at once, not five hours later.
        let host_now = at("2026-12-01T10:00:20");
        let mut cache = Cache::new(10, DatabaseClock::Awaited);
        cache.resume(Resumed::Database(Some(at("2026-12-01T05:00:10"))));
        assert!(!cache.complete_since(&since("2026-12-01T05:00:09"), host_now));
        assert!(cache.complete_since(&since("2026-12-01T05:00:13"), host_now));
        // A database that did not say its time proves nothing.
        cache.resume(Resumed::Database(None));
        assert!(!cache.complete_since(&since("2026-12-01T05:00:13"), host_now));
    }

    #[test]
    fn serve_shifts_the_resume_by_the_measured_offset() {
        // Restarted at 02:02:10 on this host; the database an hour ahead.
        let host_now = at("2026-12-01T02:02:15");
        let mut cache = Cache::new(10, DatabaseClock::Awaited);
        cache.resume(Resumed::Host(at("2026-12-01T02:02:10")));
        // Until the database answered, nothing is vouched for.
        assert!(!cache.complete_since(&since("2026-12-01T03:02:13"), host_now));
        cache.database_clock(3600);
        assert!(!cache.complete_since(&since("2026-12-01T03:01:30"), host_now));
        assert!(!cache.complete_since(&since("2026-12-01T03:02:12"), host_now));
        assert!(cache.complete_since(&since("2026-12-01T03:02:13"), host_now));
        // Behind by five hours.
        let mut behind = Cache::new(10, DatabaseClock::Awaited);
        behind.resume(Resumed::Host(at("2026-12-01T10:00:10")));
        behind.database_clock(-5 * 3600);
        assert!(!behind.complete_since(&since("2026-12-01T05:00:12"), host_now));
        assert!(behind.complete_since(&since("2026-12-01T05:00:13"), host_now));
        // A stamp ahead of the measured offset: the clock moved since.
        behind.add(&n(1, "2026-12-01T05:30:00"), at("2026-12-01T10:10:00"));
        assert!(!behind.complete_since(&since("2026-12-01T05:00:13"), host_now));
    }

    #[test]
    fn serve_without_a_database_never_vouches_for_the_hosts_future() {
        // The input of the report, with nothing to measure the offset on:
        // restarted at 02:02:10 on this host, a since an hour ahead.
        let mut cache = Cache::new(10, DatabaseClock::AssumedUtc);
        cache.resume(Resumed::Host(at("2026-12-01T02:02:10")));
        let host_now = at("2026-12-01T02:02:15");
        assert!(!cache.complete_since(&since("2026-12-01T03:01:30"), host_now));
        // Within the margin of this host's clock, today's rule holds.
        assert!(cache.complete_since(&since("2026-12-01T02:02:16"), host_now));
        assert!(!cache.complete_since(&since("2026-12-01T02:02:18"), host_now));
    }
}
