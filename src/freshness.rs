//! Freshness: how long the oldest change this process owes downstream has
//! waited, and whether that is past `BZPUSH_STALE_AFTER` (SPEC §6.1).
//!
//! Health is the outcome, not the state of each part: a process whose
//! links all say "up" but hands nothing on is stale. Each part that owes
//! changes downstream has an [`Owed`] slot and says, as it learns it, the
//! moment up to which it has handed on everything (the poller after each
//! poll, measured against `bugs.delta_ts`; `serve`'s queue monitor from
//! the broker's ready messages and the catch-up database's newest
//! change). The lag is the age of the oldest such moment, so it keeps
//! growing while a part is down, refused, stuck or blind. This module owns
//! the measure only: it never decides what is delivered, and reading it
//! never blocks.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// The default of `BZPUSH_STALE_AFTER`.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(30);

/// Every part's slot, and the threshold.
pub struct Freshness {
    started: Instant,
    stale_after: Duration,
    slots: Vec<Owed>,
}

/// What one part owes downstream: it has handed on every change made
/// before `handed_on_until`, and `why` it may be behind.
pub struct Owed {
    /// What owes, for `/health`: `poller`, `queue …`, `catch-up database`.
    name: String,
    /// Milliseconds since start; before it, negative.
    handed_on_until: AtomicI64,
    /// The part's own word on why it may be behind, if it has one.
    why: Mutex<Option<String>>,
}

/// The oldest change owed, as `/health` and `/metrics` show it.
pub struct Lag {
    /// Its age.
    pub age: Duration,
    /// Which part owes it, and why, if it said.
    pub owed_by: String,
    pub why: Option<String>,
    /// `age` is past `BZPUSH_STALE_AFTER`.
    pub stale: bool,
}

impl Freshness {
    /// A measure with one slot per name in `parts`, each caught up now.
    pub fn new(parts: &[String], stale_after: Duration) -> Freshness {
        Freshness {
            started: Instant::now(),
            stale_after,
            slots: parts
                .iter()
                .map(|name| Owed {
                    name: name.clone(),
                    handed_on_until: AtomicI64::new(0),
                    why: Mutex::new(None),
                })
                .collect(),
        }
    }

    /// The slot named `name`, if there is one.
    pub fn slot(&self, name: &str) -> Option<&Owed> {
        self.slots.iter().find(|s| s.name == name)
    }

    /// Slot `index` has handed on everything made before `at` (a part that
    /// measures now and then may give a moment after now, until its next
    /// measure).
    pub fn handed_on_until(&self, index: usize, at: Instant) {
        if let Some(slot) = self.slots.get(index) {
            let ms = match at.checked_duration_since(self.started) {
                Some(after) => millis(after),
                None => -millis(self.started.duration_since(at)),
            };
            slot.handed_on_until.store(ms, Ordering::Relaxed);
        }
    }

    /// Slot `index` has handed on nothing made in the last `age`.
    pub fn behind_by(&self, index: usize, age: Duration) {
        if let Some(slot) = self.slots.get(index) {
            let ms = millis(self.started.elapsed()) - millis(age);
            slot.handed_on_until.store(ms, Ordering::Relaxed);
        }
    }

    /// Slot `index`'s reason for being behind, or none.
    pub fn explain(&self, index: usize, why: Option<String>) {
        if let Some(slot) = self.slots.get(index) {
            *slot.why.lock().unwrap_or_else(PoisonError::into_inner) = why;
        }
    }

    /// How far behind slot `index` is.
    pub fn age(&self, index: usize) -> Duration {
        self.slots
            .get(index)
            .map_or(Duration::ZERO, |slot| self.age_of(slot))
    }

    fn age_of(&self, slot: &Owed) -> Duration {
        let until = slot.handed_on_until.load(Ordering::Relaxed);
        let age = millis(self.started.elapsed()).saturating_sub(until);
        Duration::from_millis(age.max(0).unsigned_abs())
    }

    /// The oldest change owed by any part; `None` with no part.
    pub fn lag(&self) -> Option<Lag> {
        let slot = self.slots.iter().max_by_key(|slot| self.age_of(slot))?;
        let age = self.age_of(slot);
        Some(Lag {
            age,
            owed_by: slot.name.clone(),
            why: slot
                .why
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
            stale: age > self.stale_after,
        })
    }

    pub fn stale_after(&self) -> Duration {
        self.stale_after
    }
}

impl Default for Freshness {
    /// No part owes anything.
    fn default() -> Freshness {
        Freshness::new(&[], DEFAULT_STALE_AFTER)
    }
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

impl Lag {
    /// `/health`'s sentence for a stale process: what owes, how long, why.
    pub fn sentence(&self) -> String {
        let mut text = format!(
            "the {} has handed on no change made in the last {} s",
            self.owed_by,
            self.age.as_secs()
        );
        if let Some(why) = &self.why {
            text.push_str(": ");
            text.push_str(why);
        }
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lag_is_the_oldest_part_and_stale_past_the_threshold() {
        let parts = ["poller".to_string(), "queue q".to_string()];
        let freshness = Freshness::new(&parts, Duration::from_secs(30));
        freshness.handed_on_until(0, Instant::now());
        freshness.behind_by(1, Duration::from_secs(45));
        freshness.explain(1, Some("57 messages ready, none taken".into()));
        let lag = freshness.lag().expect("two parts");
        assert_eq!(lag.owed_by, "queue q");
        assert!(lag.stale);
        assert!(lag.age >= Duration::from_secs(45));
        assert!(
            lag.sentence().contains("57 messages ready"),
            "{}",
            lag.sentence()
        );
        freshness.handed_on_until(1, Instant::now());
        assert!(!freshness.lag().expect("two parts").stale);
        assert!(Freshness::new(&[], DEFAULT_STALE_AFTER).lag().is_none());
    }
}
