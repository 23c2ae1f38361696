//! Counters and gauges shared by every thread, rendered for `/metrics`
//! (Prometheus text format) and `/health`.
//!
//! Only relaxed atomics: a scrape may see counters a moment apart, never a
//! torn value. Nothing here may block or allocate on the hot path.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use crate::freshness::{Freshness, Lag};
use crate::notification::ChangeTime;
use crate::{poller, pulse};

/// The poller's slot in [`Metrics::freshness`] (poll, run, demo).
pub const POLLER: usize = 0;

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
    /// Changes the audit of source `push_notify` published because no row
    /// carried them, by [`MissedBy`].
    pub missed: [AtomicU64; MissedBy::ALL.len()],
    /// How long the oldest change owed downstream has waited; for a
    /// process with a poller, slot [`POLLER`] is the poller's.
    pub freshness: Freshness,
    /// What the server's updates come from: `broker` (serve) or
    /// `database` (run).
    pub upstream: &'static str,
    /// Whether each upstream link (one per feed for serve) is up.
    pub upstream_links: Vec<AtomicBool>,
    /// The pipeline threads, and how long each has been at the work in
    /// hand: the systemd watchdog reads them.
    pub tasks: Tasks,
    /// serve: each feed's broker link, by feed: its node, or why none.
    pub broker_links: Vec<Mutex<pulse::LinkState>>,
    /// The newest change time any feed received: what a catch-up database
    /// holding a newer change has not handed on (serve's freshness).
    newest_received: Mutex<Option<ChangeTime>>,
    /// serve: the broker's resource alarm, as a sentence, while it blocks
    /// publishers ([`pulse::alarm::watch`]).
    pub broker_alarm: Mutex<Option<String>>,
    /// serve, run: why this machine allows no WebSocket connection at all
    /// ([`crate::capacity`]); `/health` then answers 503 with it.
    pub no_room: OnceLock<String>,
    pub started: Option<Instant>,
    /// The wall-clock time of `started`, for `process_start_time_seconds`.
    started_at: Option<SystemTime>,
    /// What the database poller is doing (poll, run); see
    /// [`Metrics::poller`].
    poller_state: Mutex<poller::State>,
    /// Things an operator should act on that stop nothing (a missed
    /// change's likely cause, a watermark that cannot be saved), by kind,
    /// for `/health`.
    warnings: Mutex<BTreeMap<&'static str, String>>,
}

/// Why a change of `bugs` had no `push_notify` row (the audit's guess).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissedBy {
    /// The extension has written no row since the poller started.
    NoRows,
    /// The poller deleted the bug's row under the extension's update.
    Race,
    /// Written by plain SQL (Bugzilla's admin pages).
    PlainSql,
}

impl MissedBy {
    pub const ALL: [MissedBy; 3] = [MissedBy::NoRows, MissedBy::Race, MissedBy::PlainSql];

    /// Its `cause` label in `/metrics`.
    pub fn label(self) -> &'static str {
        match self {
            MissedBy::NoRows => "no_rows",
            MissedBy::Race => "race",
            MissedBy::PlainSql => "plain_sql",
        }
    }
}

/// The pipeline threads the watchdog watches, each with the moment it
/// began the work in hand (milliseconds since start, plus one), or 0 while
/// it waits for work: a thread that waits has nothing to be late with,
/// one stuck in its work does.
#[derive(Default)]
pub struct Tasks {
    threads: Mutex<Vec<(String, Arc<AtomicU64>)>>,
    started: Option<Instant>,
}

/// One pipeline thread's entry in [`Tasks`].
#[derive(Clone)]
pub struct Task {
    since: Arc<AtomicU64>,
    started: Instant,
}

/// A task at work; it waits again when this is dropped.
pub struct Working<'a>(&'a Task);

impl Tasks {
    /// Watches a thread called `name` from now on, waiting for work.
    pub fn register(&self, name: &str) -> Task {
        let since = Arc::new(AtomicU64::new(0));
        let mut threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.push((name.to_string(), Arc::clone(&since)));
        Task {
            since,
            started: self.started.unwrap_or_else(Instant::now),
        }
    }

    /// A thread that has been at one piece of work for `longer` than
    /// this, if any: by name, with how long.
    pub fn stuck(&self, longer: Duration) -> Option<(String, Duration)> {
        let now = self.started.map_or(Duration::ZERO, |s| s.elapsed());
        let threads = self.threads.lock().unwrap_or_else(PoisonError::into_inner);
        threads.iter().find_map(|(name, since)| {
            let since = since.load(Ordering::Relaxed);
            let busy = now.saturating_sub(Duration::from_millis(since.checked_sub(1)?));
            (busy > longer).then(|| (name.clone(), busy))
        })
    }
}

impl Task {
    /// The thread begins a piece of work, until the guard is dropped.
    pub fn working(&self) -> Working<'_> {
        let ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
        self.since.store(ms + 1, Ordering::Relaxed);
        Working(self)
    }
}

impl Drop for Working<'_> {
    fn drop(&mut self) {
        self.0.since.store(0, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Metrics for a process whose updates come over `links` links of kind
    /// `upstream`, owing changes downstream as `freshness` measures.
    pub fn new(upstream: &'static str, links: usize, freshness: Freshness) -> Metrics {
        let started = Instant::now();
        Metrics {
            upstream,
            upstream_links: (0..links).map(|_| AtomicBool::new(false)).collect(),
            freshness,
            tasks: Tasks {
                threads: Mutex::default(),
                started: Some(started),
            },
            started: Some(started),
            broker_links: (0..links).map(|_| Mutex::default()).collect(),
            started_at: Some(SystemTime::now()),
            ..Metrics::default()
        }
    }

    /// Why this process is stale, if `lag` (read from `freshness`) says
    /// it is: what owes, how long, and why (the part's own word, or else a
    /// pipeline thread stuck in one piece of work, such as a statement on
    /// a link gone silent, which says nothing until its I/O timeout). For
    /// `/health` and the log.
    pub fn stale(&self, lag: Option<&Lag>) -> Option<String> {
        let lag = lag.filter(|lag| lag.stale)?;
        let mut text = lag.sentence();
        if lag.why.is_none()
            && let Some((thread, busy)) = self.tasks.stuck(Duration::from_secs(1))
        {
            text.push_str(&format!(
                ": its {thread} thread has been in one piece of work for {} s (a statement or \
                 a write on a link gone silent?)",
                busy.as_secs()
            ));
        }
        Some(text)
    }

    /// Whether every upstream link is up.
    pub fn upstream_up(&self) -> bool {
        self.upstream_links
            .iter()
            .all(|l| l.load(Ordering::Relaxed))
    }

    fn uptime(&self) -> Duration {
        self.started.map_or(Duration::ZERO, |s| s.elapsed())
    }

    /// A feed received a change stamped `when`.
    pub fn received(&self, when: &ChangeTime) {
        let mut newest = self
            .newest_received
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if newest.as_ref().is_none_or(|newest| when > newest) {
            *newest = Some(when.clone());
        }
    }

    /// The newest change time any feed received, if any.
    pub fn newest_received(&self) -> Option<ChangeTime> {
        self.newest_received
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Sets (or with `None` clears) the warning of `kind`.
    pub fn warning(&self, kind: &'static str, text: Option<String>) {
        let mut warnings = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        match text {
            Some(text) => warnings.insert(kind, text),
            None => warnings.remove(kind),
        };
    }

    /// The warnings in force, by kind.
    pub fn warnings(&self) -> Vec<String> {
        let warnings = self.warnings.lock().unwrap_or_else(PoisonError::into_inner);
        warnings.values().cloned().collect()
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
        self.freshness.handed_on_until(POLLER, at);
    }

    /// The poller's lag now.
    pub fn poll_lag(&self) -> Duration {
        self.freshness.age(POLLER)
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
        let lag = self.freshness.lag();
        let metrics: [(bool, &str, &str, &str, String); 16] = [
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
                lag.is_some(),
                "freshness_lag_seconds",
                "gauge",
                "Age of the oldest change this process owes downstream and has not handed on, measured from the source of truth (bugs.delta_ts, the broker's queues); it grows while anything on the way is down, refused or stuck.",
                format!("{:.3}", lag.as_ref().map_or(0.0, |l| l.age.as_secs_f64())),
            ),
            (
                lag.is_some(),
                "stale",
                "gauge",
                "1 while the freshness lag is past BZPUSH_STALE_AFTER (/health answers 503).",
                u64::from(lag.as_ref().is_some_and(|l| l.stale)).to_string(),
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
        if poller {
            out.push_str(
                "# HELP bzpush_missed_changes_total Changes of bugs.delta_ts that no push_notify row carried, published from the audit, by likely cause.\n\
                 # TYPE bzpush_missed_changes_total counter\n",
            );
            for cause in MissedBy::ALL {
                let _ = writeln!(
                    out,
                    "bzpush_missed_changes_total{{cause=\"{}\"}} {}",
                    cause.label(),
                    get(&self.missed[cause as usize])
                );
            }
        }
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
