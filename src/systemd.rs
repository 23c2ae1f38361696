//! Talking to systemd: readiness, stopping, and the watchdog.
//!
//! The notify protocol is one datagram to the socket named in
//! `$NOTIFY_SOCKET`; without that variable (not under systemd) every call
//! here does nothing. The watchdog thread tells systemd the process is alive
//! only while a liveness check passes, so a stuck process is restarted. This
//! module never affects the service itself: a failed notification is logged
//! at debug level and ignored.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use log::debug;

use crate::shutdown::Shutdown;

/// Sends `state` (e.g. `READY=1`) to systemd, if it is listening.
pub fn notify(state: &str) {
    if let Err(e) = try_notify(state) {
        debug!("systemd notification {state:?} not sent: {e}");
    }
}

fn try_notify(state: &str) -> io::Result<()> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(());
    };
    let path = path.to_string_lossy();
    let addr = match path.strip_prefix('@') {
        Some(name) => abstract_addr(name)?,
        None => SocketAddr::from_pathname(path.as_ref())?,
    };
    let socket = UnixDatagram::unbound()?;
    socket.send_to_addr(state.as_bytes(), &addr)?;
    Ok(())
}

fn abstract_addr(name: &str) -> io::Result<SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    SocketAddr::from_abstract_name(name.as_bytes())
}

/// The interval systemd expects watchdog pings at, if it asked for them
/// (`WatchdogSec=`), for this process.
pub fn watchdog_interval() -> Option<Duration> {
    if let Some(pid) = std::env::var_os("WATCHDOG_PID")
        && pid.to_str() != Some(&std::process::id().to_string())
    {
        return None;
    }
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Starts the watchdog thread if systemd wants one: every half interval it
/// runs `alive` and pings systemd only if that says the process is alive.
pub fn spawn_watchdog(
    shutdown: &Shutdown,
    alive: impl Fn(Duration) -> bool + Send + 'static,
) -> io::Result<Option<JoinHandle<()>>> {
    let Some(interval) = watchdog_interval() else {
        return Ok(None);
    };
    let shutdown = shutdown.clone();
    thread::Builder::new()
        .name("watchdog".into())
        .spawn(move || {
            while !shutdown.sleep(interval / 2) {
                if alive(interval) {
                    notify("WATCHDOG=1");
                } else {
                    log::error!("not alive: withholding the systemd watchdog ping");
                }
            }
        })
        .map(Some)
}
