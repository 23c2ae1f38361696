//! One command per connection in the hub at a time, and when the next may
//! go.
//!
//! A connection thread takes its connection's [`Turn`] before it hands the
//! hub a command, and the hub gives it back by dropping it once it has
//! handled the command (or dropped it unread), saying when the next may
//! come if the client's address has used its share of the hub's time
//! ([`super::Budget::spent`]). So the hub's queue holds at most one command
//! of each connection, and a client that sends big commands without pause
//! waits for each, in the socket it writes to, instead of filling the
//! queue that every other client's commands wait in. It must never make
//! the hub wait: only connection threads wait here.

use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

/// How often a connection that waits for its next turn looks whether it
/// should stop waiting (shutdown closing it).
const STOP_CHECK: Duration = Duration::from_millis(100);

/// A connection's turns; one per connection, on its thread.
#[derive(Default)]
pub struct Turns(Arc<State>);

#[derive(Default)]
struct State {
    slot: Mutex<Slot>,
    returned: Condvar,
}

#[derive(Default)]
struct Slot {
    /// A turn is out.
    taken: bool,
    /// The next turn waits until then.
    not_before: Option<Instant>,
}

/// The right to have one command in the hub; given back when dropped.
pub struct Turn(Arc<State>);

impl State {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Turns {
    /// Waits until the previous turn is given back and the time it named
    /// has come, then takes the next; `None` if `stop` says to stop
    /// waiting first.
    pub fn take(&self, stop: impl Fn() -> bool) -> Option<Turn> {
        let slot = self.0.lock();
        let mut slot = self
            .0
            .returned
            .wait_while(slot, |s| s.taken)
            .unwrap_or_else(PoisonError::into_inner);
        let not_before = slot.not_before.take();
        slot.taken = true;
        drop(slot);
        let turn = Turn(Arc::clone(&self.0));
        if let Some(at) = not_before {
            loop {
                if stop() {
                    return None;
                }
                let left = at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                thread::sleep(left.min(STOP_CHECK));
            }
        }
        Some(turn)
    }
}

impl Turn {
    /// The connection's next command waits until `at`.
    pub fn not_before(&self, at: Instant) {
        self.0.lock().not_before = Some(at);
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.0.lock().taken = false;
        self.0.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn the_next_turn_waits_until_the_last_is_given_back_and_its_time() {
        let turns = Turns::default();
        let first = turns.take(|| false).expect("a turn");
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                let _second = turns.take(|| false).expect("a turn");
                tx.send(Instant::now()).expect("send");
            });
            assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
            let at = Instant::now() + Duration::from_millis(300);
            first.not_before(at);
            drop(first);
            let taken = rx.recv_timeout(Duration::from_secs(10)).expect("taken");
            assert!(taken >= at, "taken before its time");
        });
        let third = turns.take(|| false).expect("a turn");
        third.not_before(Instant::now() + Duration::from_secs(3600));
        drop(third);
        assert!(turns.take(|| true).is_none(), "told to stop waiting");
    }
}
