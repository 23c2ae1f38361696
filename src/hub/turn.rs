//! One command per connection in the hub at a time.
//!
//! A connection thread takes its connection's [`Turn`] before it hands the
//! hub a command, and the hub gives it back by dropping it once it has
//! handled the command (or dropped it unread). So the hub's queue holds at
//! most one command of each connection: a client that sends big commands
//! without pause waits for each, in the socket it writes to, instead of
//! filling the queue that every other client's commands wait in. It must
//! never make the hub wait: only connection threads wait here.

use std::sync::{Arc, Condvar, Mutex, PoisonError};

/// A connection's turns; one per connection, on its thread.
#[derive(Default)]
pub struct Turns(Arc<State>);

#[derive(Default)]
struct State {
    /// A turn is out.
    taken: Mutex<bool>,
    returned: Condvar,
}

/// The right to have one command in the hub; given back when dropped.
pub struct Turn(Arc<State>);

impl Turns {
    /// Waits until the previous turn is given back, then takes the next.
    pub fn take(&self) -> Turn {
        let taken = self.0.taken.lock().unwrap_or_else(PoisonError::into_inner);
        let mut taken = self
            .0
            .returned
            .wait_while(taken, |t| *t)
            .unwrap_or_else(PoisonError::into_inner);
        *taken = true;
        Turn(Arc::clone(&self.0))
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        *self.0.taken.lock().unwrap_or_else(PoisonError::into_inner) = false;
        self.0.returned.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;
    use std::thread;
    use std::time::Duration;

    #[test]
    fn the_next_turn_waits_until_the_last_is_given_back() {
        let turns = Turns::default();
        let first = turns.take();
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(|| {
                let _second = turns.take();
                tx.send(()).expect("send");
            });
            assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
            drop(first);
            assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
        });
    }
}
