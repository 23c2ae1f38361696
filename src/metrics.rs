//! Counters and gauges shared by every thread, rendered for `/metrics`
//! (Prometheus text format) and `/health`.
//!
//! Only relaxed atomics: a scrape may see counters a moment apart, never a
//! torn value. Nothing here may block or allocate on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::{poller, pulse};

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
    /// When, in milliseconds since start, the oldest change the poller
    /// has not yet handed on was made; with none, when the poller last
    /// found itself caught up. `/metrics` shows the age of that moment, so
    /// the lag keeps growing while the poller cannot poll.
    poll_lag_from: AtomicU64,
    /// What the server's updates come from: `broker` (serve) or
    /// `database` (run).
    pub upstream: &'static str,
    /// Whether each upstream link (one per feed for serve) is up.
    pub upstream_links: Vec<AtomicBool>,
    /// serve: each feed's broker link, by feed: its node, or why none.
    pub broker_links: Vec<Mutex<pulse::LinkState>>,
    /// serve: the broker's resource alarm, as a sentence, while it blocks
    /// publishers ([`pulse::alarm::watch`]).
    pub broker_alarm: Mutex<Option<String>>,
    /// When the poller and the hub last showed they were alive, in
    /// milliseconds since start: the systemd watchdog reads them.
    pub poller_beat: AtomicU64,
    pub hub_beat: AtomicU64,
    pub started: Option<Instant>,
    /// The wall-clock time of `started`, for `process_start_time_seconds`.
    started_at: Option<SystemTime>,
    /// What the database poller is doing (poll, run); see
    /// [`Metrics::poller`].
    poller_state: Mutex<poller::State>,
}

impl Metrics {
    /// Metrics for a process whose updates come over `links` links of kind
    /// `upstream`.
    pub fn new(upstream: &'static str, links: usize) -> Metrics {
        Metrics {
            upstream,
            upstream_links: (0..links).map(|_| AtomicBool::new(false)).collect(),
            broker_links: (0..links).map(|_| Mutex::default()).collect(),
            started: Some(Instant::now()),
            started_at: Some(SystemTime::now()),
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

    /// What the poller is doing, to read or to change. A panic while it
    /// was held left a whole value behind: take it.
    pub fn poller(&self) -> MutexGuard<'_, poller::State> {
        self.poller_state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.map_or(0, |s| s.elapsed().as_secs())
    }

    /// The poller's lag counts from `at`: the moment of the oldest change
    /// it has not handed on, or of the poll that found it caught up.
    pub fn poll_lag_from(&self, at: Instant) {
        let at = self
            .started
            .map_or(Duration::ZERO, |s| at.saturating_duration_since(s));
        self.poll_lag_from
            .store(at.as_millis() as u64, Ordering::Relaxed);
    }

    /// The poller's lag now.
    pub fn poll_lag(&self) -> Duration {
        self.since(&self.poll_lag_from)
    }

    /// The Prometheus text exposition of the metrics that apply: a server
    /// fed by the broker (serve) has no poller, a process with its own
    /// poller (run) no broker.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed).to_string();
        let poller = self.upstream == "database";
        let upstream_up = format!("{}_up", self.upstream);
        let build_info = format!("build_info{{version=\"{}\"}}", env!("CARGO_PKG_VERSION"));
        let started_at = self
            .started_at
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .unwrap_or_default();
        let metrics: [(bool, &str, &str, &str, String); 14] = [
            (
                true,
                "connections",
                "gauge",
                "Open WebSocket connections.",
                get(&self.connections),
            ),
            (
                true,
                "subscriptions",
                "gauge",
                "Bug subscriptions over all connections.",
                get(&self.subscriptions),
            ),
            (
                true,
                "notifications_in_total",
                "counter",
                "Notifications received from upstream.",
                get(&self.notifications_in),
            ),
            (
                true,
                "notifications_out_total",
                "counter",
                "Updates queued to clients.",
                get(&self.notifications_out),
            ),
            (
                true,
                "slow_client_closes_total",
                "counter",
                "Clients closed for not keeping up: 1008, or cut when a write stalled.",
                get(&self.slow_client_closes),
            ),
            (
                !poller,
                "broker_reconnects_total",
                "counter",
                "Broker connections re-established after a failure.",
                get(&self.broker_reconnects),
            ),
            (
                !poller,
                "poison_messages_total",
                "counter",
                "Broker messages dropped as not a notification.",
                get(&self.poison_messages),
            ),
            (
                poller,
                "poll_batches_total",
                "counter",
                "Batches the poller handed on.",
                get(&self.poll_batches),
            ),
            (
                poller,
                "poller_active",
                "gauge",
                "1 while this poller holds the lock and polls; 0 as a standby or unconnected.",
                u64::from(self.poller().role() == Some(poller::Role::Active)).to_string(),
            ),
            (
                poller,
                "poll_lag_seconds",
                "gauge",
                "Age of the oldest change not yet handed on, or of the last poll that found none; grows while the database is unreachable.",
                format!("{:.3}", self.poll_lag().as_secs_f64()),
            ),
            (
                true,
                &upstream_up,
                "gauge",
                "1 when every upstream link (broker or database) is up.",
                u64::from(self.upstream_up()).to_string(),
            ),
            (
                true,
                "log_lines_dropped_total",
                "counter",
                "Log lines dropped because stderr did not take them (journald stuck).",
                crate::logging::dropped().to_string(),
            ),
            (
                true,
                "uptime_seconds",
                "gauge",
                "Seconds since start.",
                format!("{:.3}", self.uptime().as_secs_f64()),
            ),
            (
                true,
                &build_info,
                "gauge",
                "Always 1; the version is in the label.",
                "1".to_string(),
            ),
        ];
        let mut out = String::new();
        for (applies, name, kind, help, value) in metrics {
            if !applies {
                continue;
            }
            let family = name.split('{').next().unwrap_or_default();
            let _ = write!(
                out,
                "# HELP bzpush_{family} {help}\n# TYPE bzpush_{family} {kind}\nbzpush_{name} {value}\n"
            );
        }
        let _ = write!(
            out,
            "# HELP process_start_time_seconds Start time of the process since the Unix epoch.\n\
             # TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {:.3}\n",
            started_at.as_secs_f64()
        );
        out
    }
}
