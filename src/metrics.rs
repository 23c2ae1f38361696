//! Counters and gauges shared by every thread, rendered for `/metrics`
//! (Prometheus text format) and `/health`.
//!
//! Only relaxed atomics: a scrape may see counters a moment apart, never a
//! torn value. Nothing here may block or allocate on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub subscriptions: AtomicU64,
    pub notifications_in: AtomicU64,
    pub notifications_out: AtomicU64,
    pub slow_client_closes: AtomicU64,
    pub broker_reconnects: AtomicU64,
    pub poison_messages: AtomicU64,
    pub poll_batches: AtomicU64,
    /// Age in seconds of the oldest change in the last batch published.
    pub poll_lag_seconds: AtomicU64,
    /// What the server's updates come from: `broker` (serve) or
    /// `database` (run).
    pub upstream: &'static str,
    /// Whether each upstream link (one per feed for serve) is up.
    pub upstream_links: Vec<AtomicBool>,
    /// When the poller and the hub last showed they were alive, in
    /// milliseconds since start: the systemd watchdog reads them.
    pub poller_beat: AtomicU64,
    pub hub_beat: AtomicU64,
    pub started: Option<Instant>,
    /// The database poller's role and state (poll, run); see
    /// [`Metrics::poller`].
    poller_state: Mutex<PollerState>,
}

/// What the poller last said about itself: written by the poller thread
/// when it changes, read by `/health` and `/metrics`. Not on a hot path.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PollerState {
    /// `None` while the poller has no database connection.
    pub role: Option<PollerRole>,
    /// The database answers but refuses the poller: what, and the fix.
    pub refused: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PollerRole {
    /// Holds the lock and polls.
    Active,
    /// Waits for the lock, which this connection holds.
    Standby(LockHolder),
}

/// The database connection holding the poller lock.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LockHolder {
    pub connection: u64,
    /// Where it connects from, as the server sees it (`host:port`); `None`
    /// when this user may not see it (no PROCESS privilege).
    pub host: Option<String>,
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "database connection {} from {}",
            self.connection,
            self.host.as_deref().unwrap_or("an unknown host")
        )
    }
}

impl Metrics {
    /// Metrics for a process whose updates come over `links` links of kind
    /// `upstream`.
    pub fn new(upstream: &'static str, links: usize) -> Metrics {
        Metrics {
            upstream,
            upstream_links: (0..links).map(|_| AtomicBool::new(false)).collect(),
            started: Some(Instant::now()),
            ..Metrics::default()
        }
    }

    /// Whether every upstream link is up.
    pub fn upstream_up(&self) -> bool {
        self.upstream_links
            .iter()
            .all(|l| l.load(Ordering::Relaxed))
    }

    /// Records that the thread behind `beat` is alive now.
    pub fn beat(&self, beat: &AtomicU64) {
        beat.store(self.uptime().as_millis() as u64, Ordering::Relaxed);
    }

    /// How long since `beat` was last recorded.
    pub fn since(&self, beat: &AtomicU64) -> Duration {
        self.uptime()
            .saturating_sub(Duration::from_millis(beat.load(Ordering::Relaxed)))
    }

    fn uptime(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// The poller's state, to read or to change. A panic while it was held
    /// left a whole value behind: take it.
    pub fn poller(&self) -> MutexGuard<'_, PollerState> {
        self.poller_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.map_or(0, |s| s.elapsed().as_secs())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let upstream_up = format!("{}_up", self.upstream);
        let metrics: [(&str, &str, &str, u64); 11] = [
            (
                "connections",
                "gauge",
                "Open WebSocket connections.",
                get(&self.connections),
            ),
            (
                "subscriptions",
                "gauge",
                "Bug subscriptions over all connections.",
                get(&self.subscriptions),
            ),
            (
                "notifications_in_total",
                "counter",
                "Notifications received from upstream.",
                get(&self.notifications_in),
            ),
            (
                "notifications_out_total",
                "counter",
                "Updates queued to clients.",
                get(&self.notifications_out),
            ),
            (
                "slow_client_closes_total",
                "counter",
                "Clients closed for not keeping up: 1008, or cut when a write stalled.",
                get(&self.slow_client_closes),
            ),
            (
                "broker_reconnects_total",
                "counter",
                "Broker connections re-established after a failure.",
                get(&self.broker_reconnects),
            ),
            (
                "poison_messages_total",
                "counter",
                "Broker messages dropped as not a notification.",
                get(&self.poison_messages),
            ),
            (
                "poll_batches_total",
                "counter",
                "Batches the poller handed on.",
                get(&self.poll_batches),
            ),
            (
                "poll_lag_seconds",
                "gauge",
                "Age of the oldest change in the last batch handed on.",
                get(&self.poll_lag_seconds),
            ),
            (
                &upstream_up,
                "gauge",
                "1 when every upstream link (broker or database) is up.",
                u64::from(self.upstream_up()),
            ),
            (
                "uptime_seconds",
                "counter",
                "Seconds since start.",
                self.uptime_secs(),
            ),
        ];
        let mut out = String::new();
        let poller_active = (self.upstream == "database").then(|| {
            (
                "poller_active",
                "gauge",
                "1 while this poller holds the lock and polls; 0 as a standby or unconnected.",
                u64::from(self.poller().role == Some(PollerRole::Active)),
            )
        });
        for (name, kind, help, value) in metrics.into_iter().chain(poller_active) {
            let _ = write!(
                out,
                "# HELP bzpush_{name} {help}\n# TYPE bzpush_{name} {kind}\nbzpush_{name} {value}\n"
            );
        }
        out
    }
}
