//! Counters and gauges shared by every thread, rendered for `/metrics`
//! (Prometheus text format) and `/health`.
//!
//! Only relaxed atomics: a scrape may see counters a moment apart, never a
//! torn value. Nothing here may block or allocate on the hot path.

use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

#[derive(Default)]
pub struct Metrics {
    pub connections: AtomicU64,
    pub subscriptions: AtomicU64,
    pub notifications_in: AtomicU64,
    pub notifications_out: AtomicU64,
    pub slow_client_closes: AtomicU64,
    pub broker_reconnects: AtomicU64,
    pub poison_messages: AtomicU64,
    /// Whether each feed's broker consumer is connected.
    pub broker_links: Vec<AtomicBool>,
    pub started: Option<Instant>,
}

impl Metrics {
    pub fn new(feeds: usize) -> Metrics {
        Metrics {
            broker_links: (0..feeds).map(|_| AtomicBool::new(false)).collect(),
            started: Some(Instant::now()),
            ..Metrics::default()
        }
    }

    /// Whether every feed's broker consumer is connected.
    pub fn broker_up(&self) -> bool {
        self.broker_links.iter().all(|l| l.load(Ordering::Relaxed))
    }

    pub fn uptime_secs(&self) -> u64 {
        self.started.map_or(0, |s| s.elapsed().as_secs())
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
            let _ = write!(
                out,
                "# HELP bzpush_{name} {help}\n# TYPE bzpush_{name} {kind}\nbzpush_{name} {value}\n"
            );
        };
        metric(
            "connections",
            "gauge",
            "Open WebSocket connections.",
            get(&self.connections),
        );
        metric(
            "subscriptions",
            "gauge",
            "Bug subscriptions over all connections.",
            get(&self.subscriptions),
        );
        metric(
            "notifications_in_total",
            "counter",
            "Notifications received from the broker.",
            get(&self.notifications_in),
        );
        metric(
            "notifications_out_total",
            "counter",
            "Updates queued to clients.",
            get(&self.notifications_out),
        );
        metric(
            "slow_client_closes_total",
            "counter",
            "Clients closed (1008) for not keeping up.",
            get(&self.slow_client_closes),
        );
        metric(
            "broker_reconnects_total",
            "counter",
            "Broker connections re-established after a failure.",
            get(&self.broker_reconnects),
        );
        metric(
            "poison_messages_total",
            "counter",
            "Broker messages dropped as not a notification.",
            get(&self.poison_messages),
        );
        metric(
            "broker_up",
            "gauge",
            "1 when every feed's broker consumer is connected.",
            u64::from(self.broker_up()),
        );
        metric(
            "uptime_seconds",
            "counter",
            "Seconds since start.",
            self.uptime_secs(),
        );
        out
    }
}
