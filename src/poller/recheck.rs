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

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::notification::{BugId, ChangeTime};

/// Most bugs watched at once. A Bugzilla changes a few bugs a second, so
/// an overlap of 30 s watches about a hundred; only a drained backlog fills
/// this, and then the oldest entries go first (~100 bytes each: ~10 MB).
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
}

impl Recheck {
    pub fn new(window: Duration) -> Recheck {
        Recheck {
            window,
            watched: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// `bug`'s change at `published` is the sink's: watch the bug for one
    /// window from `now`.
    pub fn watch(&mut self, bug: BugId, published: ChangeTime, now: Instant) {
        self.watched.insert(
            bug,
            Watched {
                published,
                since: now,
                next_check: Some(now + FIRST_CHECK.min(self.window)),
                pending: false,
            },
        );
        self.order.push_back((now, bug));
        while self.watched.len() > MAX_WATCHED {
            let Some((since, oldest)) = self.order.pop_front() else {
                break;
            };
            if self.watched.get(&oldest).is_some_and(|w| w.since == since) {
                self.watched.remove(&oldest);
            }
        }
        if self.order.len() > 2 * MAX_WATCHED {
            let watched = &self.watched;
            self.order
                .retain(|(since, bug)| watched.get(bug).is_some_and(|w| w.since == *since));
        }
    }

    /// At most `max` bugs to look up now, with the time last published for
    /// each; forgets the bugs whose window is over. The rest stay due, so
    /// the checks cost at most one batch's worth of lookups a poll (and the
    /// poller asks for none while a backlog drains).
    pub fn due(&mut self, now: Instant, max: usize) -> Vec<(BugId, ChangeTime)> {
        let window = self.window;
        self.watched
            .retain(|_, w| w.next_check.is_some() || w.pending);
        let mut due = Vec::new();
        for (bug, w) in &mut self.watched {
            if due.len() == max {
                break;
            }
            let Some(at) = w.next_check.filter(|at| *at <= now && !w.pending) else {
                continue;
            };
            let age = at.duration_since(w.since);
            w.next_check = (age < window).then(|| w.since + (age * 2).min(window));
            due.push((*bug, w.published.clone()));
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
        for w in self.watched.values_mut().filter(|w| w.pending) {
            w.pending = false;
            w.next_check = Some(now);
        }
    }

    /// Stops watching everything (the checks cannot run).
    pub fn clear(&mut self) {
        self.watched.clear();
        self.order.clear();
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
        assert_eq!(
            recheck.due(t0 + Duration::from_secs(1), 5).len(),
            5,
            "at most as many as asked"
        );
    }
}
