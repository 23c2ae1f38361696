//! Shutdown: one trigger, any number of listeners.
//!
//! The trigger is a channel that is never sent on: dropping the
//! [`Trigger`] disconnects every [`Shutdown`] at once, so a thread blocked in
//! `select!` or [`Shutdown::sleep`] wakes immediately instead of waiting out a
//! timer. This module owns only that signal; what "stop" means is up to each
//! loop.

use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};

/// Fires the shutdown when [`Trigger::fire`] is called or it is dropped.
pub struct Trigger(Option<Sender<()>>);

impl Trigger {
    /// Asks every [`Shutdown`] to stop. Idempotent.
    pub fn fire(&mut self) {
        self.0 = None;
    }
}

/// Tells a loop whether to stop; cheap to clone, one per thread.
#[derive(Clone)]
pub struct Shutdown(Receiver<()>);

/// A fresh trigger and the listener it controls.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = crossbeam_channel::bounded(0);
    (Trigger(Some(tx)), Shutdown(rx))
}

impl Shutdown {
    /// Whether shutdown has been asked for.
    pub fn requested(&self) -> bool {
        matches!(self.0.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps for `duration` or until shutdown, whichever comes first.
    /// Returns `true` if shutdown was asked for.
    pub fn sleep(&self, duration: Duration) -> bool {
        matches!(
            self.0.recv_timeout(duration),
            Err(RecvTimeoutError::Disconnected)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn firing_wakes_a_sleeper_at_once() {
        let (mut trigger, shutdown) = channel();
        assert!(!shutdown.requested());
        assert!(!shutdown.sleep(Duration::from_millis(1)));
        let sleeper = std::thread::spawn(move || shutdown.sleep(Duration::from_secs(60)));
        let start = Instant::now();
        trigger.fire();
        assert!(sleeper.join().expect("sleeper thread"));
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}
