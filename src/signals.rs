//! SIGTERM and SIGINT, turned into the shutdown trigger; SIGHUP, logged
//! and ignored.
//!
//! A named thread waits for the signals and fires the [`Trigger`]; it does
//! nothing else, so every other thread learns of shutdown through
//! [`crate::shutdown::Shutdown`] alone. SIGHUP (a sysadmin's `kill -HUP`,
//! a closing terminal) would otherwise end the process without a close
//! frame to any client, and systemd counts that exit as clean, so
//! `Restart=on-failure` would leave the unit down: there is nothing to
//! reload, so it is said and ignored.

use std::io;
use std::thread::{self, JoinHandle};

use log::{info, warn};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::shutdown::Trigger;

/// The signal-watching thread; [`SignalThread::stop`] ends and joins it.
pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

/// Starts watching for SIGTERM and SIGINT, the first of which fires
/// `trigger`, and SIGHUP, which is logged and ignored.
pub fn spawn(mut trigger: Trigger) -> io::Result<SignalThread> {
    let mut signals = Signals::new([SIGTERM, SIGINT, SIGHUP])?;
    let handle = signals.handle();
    let thread = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = match signal {
                    SIGHUP => {
                        warn!(
                            "SIGHUP: ignored; bzpush has nothing to reload (restart it to \
                             change settings)"
                        );
                        continue;
                    }
                    SIGTERM => "SIGTERM",
                    _ => "SIGINT",
                };
                info!("{name}: finishing the work in hand, then stopping");
                trigger.fire();
            }
        })?;
    Ok(SignalThread { handle, thread })
}

impl SignalThread {
    /// Stops watching and joins the thread.
    pub fn stop(self) {
        self.handle.close();
        if self.thread.join().is_err() {
            log::error!("the signal thread panicked");
        }
    }
}
