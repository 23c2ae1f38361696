//! SIGTERM and SIGINT, turned into the shutdown trigger.
//!
//! A named thread waits for the signals and fires the [`Trigger`]; it does
//! nothing else, so every other thread learns of shutdown through
//! [`crate::shutdown::Shutdown`] alone.

use std::io;
use std::thread::{self, JoinHandle};

use log::info;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::{Handle, Signals};

use crate::shutdown::Trigger;

/// The signal-watching thread; [`SignalThread::stop`] ends and joins it.
pub struct SignalThread {
    handle: Handle,
    thread: JoinHandle<()>,
}

/// Starts watching for SIGTERM and SIGINT; the first one fires `trigger`.
pub fn spawn(mut trigger: Trigger) -> io::Result<SignalThread> {
    let mut signals = Signals::new([SIGTERM, SIGINT])?;
    let handle = signals.handle();
    let thread = thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                let name = if signal == SIGTERM {
                    "SIGTERM"
                } else {
                    "SIGINT"
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
