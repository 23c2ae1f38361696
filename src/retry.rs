//! Living with dependencies that come and go: capped exponential backoff,
//! and a [`Link`] that logs a dependency's state only when it changes, so an
//! outage is one line when it starts and one when it ends, however many
//! retries lie between. A dependency that is up but refuses what is asked
//! of it (a missing table, a missing privilege) is a third state, retried
//! slowly: no retry cures it, someone must act. Nothing here decides what
//! to retry.

use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{info, warn};

use crate::shutdown::Shutdown;

/// First and largest pause between reconnection attempts.
const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// Pause between attempts while a dependency refuses: an operator has to
/// act first (install a table, grant a privilege), so a fast retry only
/// fills the log; this picks up the fix within half a minute.
pub const REFUSED_RETRY: Duration = Duration::from_secs(30);

/// The state of one dependency, logged only when it changes: an outage is
/// one line when it starts and one when it ends, however many retries. It
/// can also report the state to a flag that `/health` reads.
pub struct Link<'a> {
    name: &'static str,
    target: String,
    state: Option<State>,
    flag: Option<&'a AtomicBool>,
}

/// What a link was last logged as.
#[derive(PartialEq, Eq)]
enum State {
    Up,
    Down,
    /// Refused, for this reason: a different reason is logged again.
    Refused(String),
}

impl<'a> Link<'a> {
    pub fn new(name: &'static str, target: String) -> Link<'a> {
        Link {
            name,
            target,
            state: None,
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

    /// Names another target (a link that moved to another node): the
    /// next `up` or `down` is logged with it, even in the same state.
    pub fn retarget(&mut self, target: String) {
        if self.target != target {
            self.target = target;
            self.state = None;
        }
    }

    pub fn up(&mut self) {
        if self.state != Some(State::Up) {
            info!("{} {}: connected", self.name, self.target);
            self.set(State::Up);
        }
    }

    pub fn down(&mut self, error: &dyn fmt::Display) {
        if self.state != Some(State::Down) {
            warn!(
                "{} {}: {error}; retrying with backoff",
                self.name, self.target
            );
            self.set(State::Down);
        }
    }

    /// The dependency answers but refuses: `reason` says what and how to
    /// fix it, once for as long as the reason stays the same. `true` if
    /// that was news (logged).
    pub fn refused(&mut self, reason: &str) -> bool {
        let state = State::Refused(reason.to_string());
        if self.state.as_ref() == Some(&state) {
            return false;
        }
        warn!(
            "{} {}: refused: {reason}; retrying every {} s",
            self.name,
            self.target,
            REFUSED_RETRY.as_secs()
        );
        self.set(state);
        true
    }

    fn set(&mut self, state: State) {
        if let Some(flag) = self.flag {
            flag.store(state == State::Up, Ordering::Relaxed);
        }
        self.state = Some(state);
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
