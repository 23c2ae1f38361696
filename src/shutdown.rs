//! Shutdown: one trigger, any number of listeners, and the threads the
//! pipeline cannot do without.
//!
//! The trigger is a channel that is never sent on: dropping its sender
//! disconnects every [`Shutdown`] at once, so a thread blocked in `select!`
//! or [`Shutdown::sleep`] wakes immediately instead of waiting out a timer.
//! A shutdown is either asked for (SIGTERM, [`Trigger::fire`]) or fatal
//! ([`Shutdown::fail`]): a thread the pipeline needs ended, and the process
//! must exit with status 1 so that systemd restarts it, instead of living on
//! as a zombie that accepts clients and delivers nothing. [`spawn_essential`]
//! starts such a thread. This module owns only that signal; what "stop"
//! means is up to each loop.

use std::any::Any;
use std::io;
use std::panic::{self, AssertUnwindSafe};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use log::error;

/// FOR TESTS ONLY: names a pipeline thread (`hub`, `writer`, `pulse`,
/// `poller`, `catchup`) that panics as it starts, so that tests can prove
/// each one is supervised; a thread whose name starts with the value
/// panics. Inert unless set; never set it in production.
pub const TEST_PANIC_VAR: &str = "BZPUSH_TEST_PANIC";

/// What every handle shares: the sender whose drop is the signal, and why
/// the shutdown is fatal, if it is.
struct State {
    sender: Mutex<Option<Sender<()>>>,
    fatal: Mutex<Option<Fatal>>,
}

/// Why a shutdown is fatal.
struct Fatal {
    reason: String,
    /// A panic is the cause; a thread that merely ended may be an effect
    /// (its peer died under it), so a panic's reason replaces its reason.
    panicked: bool,
}

impl State {
    fn fire(&self) {
        self.sender.lock().unwrap_or_else(|e| e.into_inner()).take();
    }
}

/// Fires the shutdown when [`Trigger::fire`] is called or it is dropped.
pub struct Trigger(Arc<State>);

impl Trigger {
    /// Asks every [`Shutdown`] to stop. Idempotent.
    pub fn fire(&mut self) {
        self.0.fire();
    }
}

impl Drop for Trigger {
    fn drop(&mut self) {
        self.0.fire();
    }
}

/// Tells a loop whether to stop; cheap to clone, one per thread.
#[derive(Clone)]
pub struct Shutdown {
    receiver: Receiver<()>,
    state: Arc<State>,
}

/// A fresh trigger and the listener it controls.
pub fn channel() -> (Trigger, Shutdown) {
    let (tx, rx) = crossbeam_channel::bounded(0);
    let state = Arc::new(State {
        sender: Mutex::new(Some(tx)),
        fatal: Mutex::new(None),
    });
    (
        Trigger(Arc::clone(&state)),
        Shutdown {
            receiver: rx,
            state,
        },
    )
}

impl Shutdown {
    /// Whether shutdown has been asked for.
    pub fn requested(&self) -> bool {
        matches!(self.receiver.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Sleeps for `duration` or until shutdown, whichever comes first.
    /// Returns `true` if shutdown was asked for.
    pub fn sleep(&self, duration: Duration) -> bool {
        matches!(
            self.receiver.recv_timeout(duration),
            Err(RecvTimeoutError::Disconnected)
        )
    }

    /// Stops everything because the process can no longer do its job:
    /// `reason` becomes the exit's reason (status 1). The first reason
    /// wins; a shutdown already asked for stays a clean one.
    pub fn fail(&self, reason: String) {
        self.record(reason, false);
    }

    fn record(&self, reason: String, panicked: bool) {
        let mut fatal = self.state.fatal.lock().unwrap_or_else(|e| e.into_inner());
        match &*fatal {
            None if self.requested() => return,
            Some(first) if first.panicked || !panicked => return,
            _ => *fatal = Some(Fatal { reason, panicked }),
        }
        drop(fatal);
        self.state.fire();
    }

    /// Why the shutdown was fatal, if it was.
    pub fn failure(&self) -> Option<String> {
        let fatal = self.state.fatal.lock().unwrap_or_else(|e| e.into_inner());
        fatal.as_ref().map(|f| f.reason.clone())
    }
}

/// Starts a thread the pipeline cannot do without (the hub, a broker
/// consumer, the poller, a writer, the catch-up worker). If `work` panics,
/// or returns while no shutdown was asked for, the thread logs which it is
/// and why, and fails `shutdown`: the process stops with status 1 rather
/// than go on without it.
pub fn spawn_essential(
    name: String,
    builder: thread::Builder,
    shutdown: &Shutdown,
    work: impl FnOnce() + Send + 'static,
) -> io::Result<JoinHandle<()>> {
    let shutdown = shutdown.clone();
    builder.name(name.clone()).spawn(move || {
        let outcome = panic::catch_unwind(AssertUnwindSafe(|| {
            if test_panic().is_some_and(|t| name.starts_with(t)) {
                panic!("{TEST_PANIC_VAR} is set to {name:?}: panicking as asked");
            }
            work()
        }));
        let (why, panicked) = match outcome {
            Ok(()) if shutdown.requested() => return,
            Ok(()) => ("ended unexpectedly".to_string(), false),
            Err(payload) => (
                format!("panicked: {}", panic_message(payload.as_ref())),
                true,
            ),
        };
        let reason = format!("the {name} thread {why}");
        error!("{reason}; stopping everything so that the service manager restarts bzpush");
        shutdown.record(reason, panicked);
    })
}

/// [`TEST_PANIC_VAR`]'s value, read from the environment once, by the
/// first essential thread to start.
fn test_panic() -> Option<&'static str> {
    static VALUE: OnceLock<Option<String>> = OnceLock::new();
    VALUE
        .get_or_init(|| std::env::var(TEST_PANIC_VAR).ok().filter(|t| !t.is_empty()))
        .as_deref()
}

/// Joins `thread`, logging it if it panicked: no join result is thrown
/// away. `true` if it ended without a panic.
pub fn join(thread: JoinHandle<()>) -> bool {
    let name = thread.thread().name().unwrap_or("unnamed").to_string();
    match thread.join() {
        Ok(()) => true,
        Err(payload) => {
            error!(
                "the {name} thread panicked: {}",
                panic_message(payload.as_ref())
            );
            false
        }
    }
}

/// The text a panic was raised with.
pub fn panic_message(payload: &(dyn Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
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

    #[test]
    fn an_essential_thread_that_panics_or_returns_is_fatal() {
        let (_trigger, shutdown) = channel();
        let thread = spawn_essential("hub".into(), thread::Builder::new(), &shutdown, || {
            panic!("index out of bounds")
        })
        .expect("spawn");
        assert!(join(thread));
        assert!(shutdown.requested());
        assert_eq!(
            shutdown.failure().as_deref(),
            Some("the hub thread panicked: index out of bounds")
        );

        let (_trigger, shutdown) = channel();
        let thread = spawn_essential("catchup".into(), thread::Builder::new(), &shutdown, || {})
            .expect("spawn");
        assert!(join(thread));
        assert_eq!(
            shutdown.failure().as_deref(),
            Some("the catchup thread ended unexpectedly")
        );
    }

    #[test]
    fn a_panic_is_the_reason_even_if_a_thread_it_took_down_ended_first() {
        let (_trigger, shutdown) = channel();
        shutdown.fail("the pulse-0 thread ended unexpectedly".into());
        assert!(shutdown.requested());
        shutdown.record("the hub thread panicked: bug".into(), true);
        shutdown.record("the writer-0 thread panicked: later".into(), true);
        shutdown.fail("the catchup thread ended unexpectedly".into());
        assert_eq!(
            shutdown.failure().as_deref(),
            Some("the hub thread panicked: bug")
        );
    }

    #[test]
    fn an_essential_thread_that_returns_at_shutdown_is_not_fatal() {
        let (mut trigger, shutdown) = channel();
        let waiter = shutdown.clone();
        let thread = spawn_essential(
            "poller".into(),
            thread::Builder::new(),
            &shutdown,
            move || {
                while !waiter.sleep(Duration::from_secs(60)) {}
            },
        )
        .expect("spawn");
        trigger.fire();
        assert!(join(thread));
        assert!(shutdown.failure().is_none());
        // A failure after a clean stop does not turn it into a fatal one.
        shutdown.fail("late".into());
        assert!(shutdown.failure().is_none());
    }
}
