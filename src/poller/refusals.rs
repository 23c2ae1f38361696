//! Changes the sink refused (the broker nacked them), waiting to be sent
//! again: each alone (only it, never its batch), after a pause that doubles
//! with each refusal up to [`MAX_PAUSE`]. The source keeps a refused change
//! (its row is not deleted, the watermark does not pass it) until the sink
//! takes it, so reads keep finding it: a read before its pause is up
//! leaves it out. Nothing here reads the database or talks to the sink.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::notification::Notification;

/// The pause before a change refused once is sent again.
pub const FIRST_PAUSE: Duration = Duration::from_secs(1);
/// The longest pause: a refusal can last (a queue of another consumer
/// that stays full), and a change waiting this long costs one message a
/// pause; once the refusal ends, the change goes out within this long.
pub const MAX_PAUSE: Duration = Duration::from_secs(30);
/// A change due this long ago and not sent since is no longer read: its
/// row is gone, or holds a later change, which goes out on its own.
const FORGET_AFTER: Duration = Duration::from_secs(120);

pub struct Refusals {
    first_pause: Duration,
    waiting: HashMap<Notification, Retry>,
}

struct Retry {
    refusals: u32,
    /// When it may be sent again.
    due: Instant,
}

impl Refusals {
    pub fn new() -> Refusals {
        Refusals::with_first_pause(FIRST_PAUSE)
    }

    /// With pauses from `first_pause` on: a test's.
    pub fn with_first_pause(first_pause: Duration) -> Refusals {
        Refusals {
            first_pause,
            waiting: HashMap::new(),
        }
    }

    /// Whether `change` waits, at `now`, for its pause to end.
    pub fn waiting(&self, change: &Notification, now: Instant) -> bool {
        self.waiting.get(change).is_some_and(|r| r.due > now)
    }

    /// The sink refused `change` at `now`: its pause grows.
    pub fn refused(&mut self, change: Notification, now: Instant) {
        let retry = self.waiting.entry(change).or_insert(Retry {
            refusals: 0,
            due: now,
        });
        retry.refusals += 1;
        let pause = self
            .first_pause
            .saturating_mul(1 << (retry.refusals - 1).min(16))
            .min(MAX_PAUSE);
        retry.due = now + pause;
    }

    /// The sink took `change`.
    pub fn taken(&mut self, change: &Notification) {
        self.waiting.remove(change);
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Forgets the changes long past due that no read brought back.
    pub fn expire(&mut self, now: Instant) {
        self.waiting
            .retain(|_, r| now.saturating_duration_since(r.due) < FORGET_AFTER);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notification::{BugId, ChangeTime};

    #[test]
    fn the_pause_doubles_up_to_its_cap_and_a_taken_change_waits_no_more() {
        let change = Notification {
            bug: BugId::new(7).unwrap_or_else(|| panic!("a bug id")),
            when: ChangeTime::new("2026-01-01T00:00:01"),
        };
        let mut refusals = Refusals::new();
        let t0 = Instant::now();
        assert!(!refusals.waiting(&change, t0));
        let mut pauses = Vec::new();
        for _ in 0..8 {
            refusals.refused(change.clone(), t0);
            let due = (1..=60)
                .map(Duration::from_secs)
                .find(|d| !refusals.waiting(&change, t0 + *d))
                .unwrap_or(Duration::MAX);
            pauses.push(due.as_secs());
        }
        assert_eq!(pauses, [1, 2, 4, 8, 16, 30, 30, 30]);
        refusals.taken(&change);
        assert!(!refusals.waiting(&change, t0) && refusals.is_empty());
        refusals.refused(change.clone(), t0);
        refusals.expire(t0 + Duration::from_secs(60));
        assert!(!refusals.is_empty(), "not yet forgotten");
        refusals.expire(t0 + Duration::from_secs(200));
        assert!(refusals.is_empty(), "forgotten once long past due");
    }
}
