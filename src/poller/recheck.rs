//! The bugs whose `push_notify` row this poller deleted lately, to be
//! checked against `bugs.delta_ts` for a while.
//!
//! Mozilla's PushNotify extension reads a bug's row id, then updates the
//! row by that id (or inserts one when there was none). If the poller
//! deletes the row between the two, the update matches nothing and the
//! change is never written to `push_notify`; `bugs.delta_ts` still moves.
//! So for one overlap after a bug's row is deleted, the poller looks up
//! that bug's `bugs.delta_ts` now and then, and publishes a later time than
//! the one it published, when no row is there to carry it.
//!
//! Owns only that list, in bounded memory: it never talks to the database
//! and never decides what is published.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::notification::{BugId, ChangeTime};

/// Most bugs watched at once. A Bugzilla changes a few bugs a second, so
/// an overlap of 30 s watches about a hundred; only a drained backlog fills
/// this, and then the oldest entries go first (~150 bytes each: ~15 MB).
const MAX_WATCHED: usize = 100_000;
/// First look after a delete. The extension's request commits within about
/// a second of its update (a Bugzilla change takes ~1 s), so most lost
/// changes show here; the gaps then double up to the end of the window.
const FIRST_CHECK: Duration = Duration::from_secs(1);

struct Watched {
    /// The latest time published for this bug.
    published: ChangeTime,
    since: Instant,
    /// `None`: the last check of the window is done.
    next_check: Option<Instant>,
    /// A later time was found and is on its way to the sink.
    pending: bool,
}

pub struct Recheck {
    window: Duration,
    watched: HashMap<BugId, Watched>,
    /// `(since, bug)` oldest first, to drop the oldest when full; an entry
    /// whose `since` no longer matches was replaced, and is skipped.
    order: VecDeque<(Instant, BugId)>,
    /// Every `(next_check, bug)` of `watched`, earliest first: checks are
    /// handed out in the order they fell due, so that none waits behind
    /// bugs that happen to come first in the map.
    queue: BTreeSet<(Instant, BugId)>,
    /// Bugs whose last check was handed out: forgotten at the next
    /// [`Recheck::due`] unless a change was found for them meanwhile.
    finished: Vec<BugId>,
}

impl Recheck {
    pub fn new(window: Duration) -> Recheck {
        Recheck {
            window,
            watched: HashMap::new(),
            order: VecDeque::new(),
            queue: BTreeSet::new(),
            finished: Vec::new(),
        }
    }

    /// `bug`'s change at `published` is the sink's: watch the bug for one
    /// window from `now`.
    pub fn watch(&mut self, bug: BugId, published: ChangeTime, now: Instant) {
        let next_check = now + FIRST_CHECK.min(self.window);
        let replaced = self.watched.insert(
            bug,
            Watched {
                published,
                since: now,
                next_check: Some(next_check),
                pending: false,
            },
        );
        if let Some(at) = replaced.and_then(|w| w.next_check) {
            self.queue.remove(&(at, bug));
        }
        self.queue.insert((next_check, bug));
        self.order.push_back((now, bug));
        while self.watched.len() > MAX_WATCHED {
            let Some((since, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.watched.get(&oldest).is_some_and(|w| w.since == since) {
                self.forget(oldest);
            }
        }
        if self.order.len() > 2 * MAX_WATCHED {
            let watched = &self.watched;
            self.order
                .retain(|(since, bug)| watched.get(bug).is_some_and(|w| w.since == *since));
        }
    }

    /// At most `max` bugs to look up now, the longest due first, with the
    /// time last published for each. A check made late is not made up for:
    /// the next one falls twice as long after the delete as this one.
    /// The rest stay due, so the checks cost at most `max` lookups a poll
    /// (and the poller asks for none while a backlog drains).
    pub fn due(&mut self, now: Instant, max: usize) -> Vec<(BugId, ChangeTime)> {
        for bug in std::mem::take(&mut self.finished) {
            if self
                .watched
                .get(&bug)
                .is_some_and(|w| w.next_check.is_none() && !w.pending)
            {
                self.watched.remove(&bug);
            }
        }
        let mut due = Vec::new();
        while due.len() < max {
            let Some(&(at, bug)) = self.queue.first().filter(|(at, _)| *at <= now) else {
                break;
            };
            self.queue.remove(&(at, bug));
            let Some(w) = self.watched.get_mut(&bug) else {
                continue;
            };
            if w.pending {
                // Looked at again only if its send fails (`reset`).
                w.next_check = None;
                continue;
            }
            let age = now.duration_since(w.since);
            w.next_check = (age < self.window).then(|| w.since + (age * 2).min(self.window));
            match w.next_check {
                Some(next) => {
                    self.queue.insert((next, bug));
                }
                None => self.finished.push(bug),
            }
            due.push((bug, w.published.clone()));
        }
        if self.watched.is_empty() {
            self.order.clear();
        }
        due
    }

    /// A check found `bug` changed: it is sent, not yet the sink's.
    pub fn found(&mut self, bug: BugId) {
        if let Some(w) = self.watched.get_mut(&bug) {
            w.pending = true;
        }
    }

    /// What was found and sent was not delivered: look again at once.
    pub fn reset(&mut self, now: Instant) {
        for (bug, w) in self.watched.iter_mut().filter(|(_, w)| w.pending) {
            w.pending = false;
            if let Some(at) = w.next_check.replace(now) {
                self.queue.remove(&(at, *bug));
            }
            self.queue.insert((now, *bug));
        }
    }

    /// Stops watching everything (the checks cannot run).
    pub fn clear(&mut self) {
        self.watched.clear();
        self.order.clear();
        self.queue.clear();
        self.finished.clear();
    }

    fn forget(&mut self, bug: BugId) {
        if let Some(at) = self.watched.remove(&bug).and_then(|w| w.next_check) {
            self.queue.remove(&(at, bug));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bug(n: u32) -> BugId {
        BugId::new(n).expect("a bug id")
    }

    #[test]
    fn a_bug_is_checked_at_growing_gaps_until_the_window_ends() {
        let mut recheck = Recheck::new(Duration::from_secs(5));
        let t0 = Instant::now();
        recheck.watch(bug(1), ChangeTime::new("2026-01-01T00:00:00"), t0);
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        assert!(recheck.due(t0, 10).is_empty());
        let checked: Vec<u64> = (0..=10)
            .filter(|s| !recheck.due(at(*s), 10).is_empty())
            .collect();
        assert_eq!(checked, [1, 2, 4, 5]);
        assert!(recheck.watched.is_empty(), "forgotten after its window");
    }

    /// After a backlog every drained bug falls due at once. The checks go
    /// out longest due first, whatever the map's order, and one made late
    /// is not made up for: 20,000 bugs due cost 20,000 checks, not one per
    /// missed slot, and a bug watched later waits only behind them.
    #[test]
    fn checks_go_out_longest_due_first_and_a_late_one_is_not_made_up_for() {
        let mut recheck = Recheck::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let when = ChangeTime::new("2026-01-01T00:00:00");
        for n in 1..=20_000 {
            recheck.watch(bug(n), when.clone(), t0);
        }
        recheck.watch(bug(30_000), when.clone(), at(2));
        // At 40 s every window is over: each bug is checked once, and the
        // one watched last comes last.
        let due = recheck.due(at(40), 100_000);
        assert_eq!(due.len(), 20_001);
        assert_eq!(due.last().map(|(b, _)| *b), Some(bug(30_000)));
        assert!(recheck.due(at(41), 100_000).is_empty(), "no make-up checks");
        assert!(recheck.watched.is_empty() && recheck.queue.is_empty());

        // Checked at 1 s, then 5 s late: the next one is at twice 6 s.
        recheck.watch(bug(7), when, t0);
        assert_eq!(recheck.due(at(1), 10).len(), 1);
        assert_eq!(recheck.due(at(6), 10).len(), 1);
        assert!(recheck.due(at(11), 10).is_empty());
        assert_eq!(recheck.due(at(12), 10).len(), 1);
    }

    #[test]
    fn a_found_change_is_looked_at_again_after_a_failed_send_and_memory_is_bounded() {
        let mut recheck = Recheck::new(Duration::from_secs(30));
        let t0 = Instant::now();
        recheck.watch(bug(1), ChangeTime::new("2026-01-01T00:00:00"), t0);
        let at = t0 + Duration::from_secs(1);
        assert_eq!(recheck.due(at, 10).len(), 1);
        recheck.found(bug(1));
        assert!(recheck.due(at + Duration::from_secs(60), 10).is_empty());
        recheck.reset(at);
        assert_eq!(recheck.due(at, 10).len(), 1);

        for n in 1..=(MAX_WATCHED as u32 + 10) {
            recheck.watch(bug(n), ChangeTime::new("2026-01-01T00:00:00"), t0);
        }
        assert_eq!(recheck.watched.len(), MAX_WATCHED);
        assert!(
            !recheck.watched.contains_key(&bug(1)),
            "the oldest went first"
        );
        assert!(recheck.order.len() <= 2 * MAX_WATCHED);
        assert_eq!(recheck.queue.len(), MAX_WATCHED, "one check queued per bug");
        assert_eq!(
            recheck.due(t0 + Duration::from_secs(1), 5).len(),
            5,
            "at most as many as asked"
        );
    }
}
