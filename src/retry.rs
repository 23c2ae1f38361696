//! Living with dependencies that come and go: capped exponential backoff,
//! and a [`Link`] that logs a dependency's state only when it changes, so an
//! outage is one line when it starts and one when it ends, however many
//! retries lie between. Nothing here decides what to retry.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{info, warn};

use crate::shutdown::Shutdown;

/// First and largest pause between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);

/// The state of one dependency, logged only when it changes: an outage is
/// one line when it starts and one when it ends, however many retries. It
/// can also report the state to a flag that `/health` reads.
pub struct Link<'a> {
    name: &'static str,
    target: String,
    up: Option<bool>,
    flag: Option<&'a AtomicBool>,
}

impl<'a> Link<'a> {
    pub fn new(name: &'static str, target: String) -> Link<'a> {
        Link {
            name,
            target,
            up: None,
            flag: None,
        }
    }

    /// Also keeps `flag` set to whether the link is up.
    pub fn reporting(self, flag: &'a AtomicBool) -> Link<'a> {
        Link {
            flag: Some(flag),
            ..self
        }
    }

    pub fn up(&mut self) {
        if self.up != Some(true) {
            info!("{} {}: connected", self.name, self.target);
            self.set(true);
        }
    }

    pub fn down(&mut self, error: &dyn fmt::Display) {
        if self.up != Some(false) {
            warn!(
                "{} {}: {error}; retrying with backoff",
                self.name, self.target
            );
            self.set(false);
        }
    }

    fn set(&mut self, up: bool) {
        self.up = Some(up);
        if let Some(flag) = self.flag {
            flag.store(up, Ordering::Relaxed);
        }
    }
}

/// Capped exponential backoff between reconnection attempts.
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            next: BACKOFF_START,
        }
    }
}

impl Backoff {
    pub fn reset(&mut self) {
        self.next = BACKOFF_START;
    }

    /// Sleeps the current delay and doubles it; `true` if shutdown came.
    pub fn wait(&mut self, shutdown: &Shutdown) -> bool {
        let delay = self.next;
        self.next = (self.next * 2).min(BACKOFF_CAP);
        shutdown.sleep(delay)
    }
}
