//! The database poller: Bugzilla's database in, notifications handed to a
//! [`Sink`] (the broker for `poll`, the in-process hub for `run`).
//!
//! Owns the poll loop, the `GET_LOCK` that makes exactly one poller active
//! (the others wait as hot standbys), reconnection with capped backoff for
//! both the database and the sink, and the rule that a change is forgotten
//! only after the sink took it (the broker confirmed it). It must never drop
//! a change the sink has not taken, and never log a credential. The two
//! sources (what to read, what to forget) live in [`push_notify`] and
//! [`bugs`].

mod bugs;
mod push_notify;

use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::info;
use mysql::Conn;
use mysql::prelude::Queryable;

use crate::config::{PollerConfig, Source as SourceKind};
use crate::database;
use crate::metrics::Metrics;
use crate::notification::{ChangeTime, Notification};
use crate::retry::{Backoff, Link};
use crate::shutdown::Shutdown;

/// How long one `GET_LOCK` attempt waits: bounds how late a standby notices
/// shutdown, and how often it asks.
const LOCK_WAIT_SECS: u32 = 1;
/// A query that takes longer than this means the connection is dead.
const DB_IO_TIMEOUT: Duration = Duration::from_secs(30);

/// What a source read in one poll: the notifications to publish, and what
/// it needs back to forget them once they are confirmed.
struct Batch<R> {
    notifications: Vec<Notification>,
    receipt: R,
    /// The source had more than one batch to give: poll again at once.
    full: bool,
    /// Age in seconds, on the database's clock, of the oldest change read.
    lag_secs: u64,
}

/// Where the poller hands its notifications.
pub trait Sink {
    type Error: fmt::Display;

    /// What to call it in log lines: a kind and a target, e.g. `broker`
    /// and a URL without its password.
    fn describe(&self) -> (&'static str, String);

    /// Hands over every notification of `batch`, in order. `Ok` only once
    /// the sink is responsible for all of them: the poller forgets them then.
    fn deliver(&mut self, batch: &[Notification]) -> Result<(), Self::Error>;
}

/// A place changes are read from. Each poll is `read`, publish, `confirmed`.
trait Source {
    type Receipt;

    /// This poller just took the lock. `now` is the database time of the
    /// lock attempt; `took_over` says another poller was active before it.
    fn activated(&mut self, now: &ChangeTime, took_over: bool);

    fn read(&mut self, db: &mut Conn) -> Result<Batch<Self::Receipt>, mysql::Error>;

    /// Every notification of the batch is now the broker's.
    fn confirmed(&mut self, db: &mut Conn, receipt: Self::Receipt) -> Result<(), mysql::Error>;
}

/// Runs the poller until `shutdown`, handing changes to `sink`. Database
/// and sink failures are retried forever; they never end the loop.
/// `metrics` gets poll counts, and the database link's state in
/// `upstream_links[0]` when there is one.
pub fn run(config: &PollerConfig, sink: impl Sink, metrics: &Metrics, shutdown: &Shutdown) {
    match config.source {
        SourceKind::PushNotify => {
            let source = push_notify::PushNotify::new(config);
            Poller::new(config, sink, metrics, shutdown, source).run()
        }
        SourceKind::Bugs => {
            let source = bugs::Bugs::new(config);
            Poller::new(config, sink, metrics, shutdown, source).run()
        }
    }
}

struct Poller<'a, S, K> {
    config: &'a PollerConfig,
    shutdown: &'a Shutdown,
    metrics: &'a Metrics,
    source: S,
    sink: K,
    database: Link<'a>,
    sink_link: Link<'a>,
    role: Option<Role>,
}

/// Which part this poller plays; logged when it changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Standby,
    Active,
}

impl<'a, S: Source, K: Sink> Poller<'a, S, K> {
    fn new(
        config: &'a PollerConfig,
        sink: K,
        metrics: &'a Metrics,
        shutdown: &'a Shutdown,
        source: S,
    ) -> Self {
        let mut database = Link::new("database", config.database.to_string());
        if let Some(flag) = metrics.upstream_links.first() {
            database = database.reporting(flag);
        }
        let (kind, target) = sink.describe();
        Poller {
            config,
            shutdown,
            metrics,
            source,
            sink,
            database,
            sink_link: Link::new(kind, target),
            role: None,
        }
    }

    fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            match self.connect_and_work(&mut backoff) {
                Ok(()) => break,
                Err(e) => {
                    // The lock went with the connection: whoever reconnects
                    // first is the active poller.
                    self.database.down(&e);
                    if backoff.wait(self.shutdown) {
                        break;
                    }
                }
            }
        }
        info!("poller stopped");
    }

    /// Connects, waits for the lock, polls. `Ok` only on shutdown.
    fn connect_and_work(&mut self, backoff: &mut Backoff) -> Result<(), mysql::Error> {
        let mut db = database::connect(&self.config.database, DB_IO_TIMEOUT)?;
        if self.take_lock(&mut db)? {
            self.work(&mut db, backoff)?;
        }
        Ok(())
    }

    /// Waits for the poller lock as a hot standby. `Ok(false)`: shutdown
    /// came first.
    fn take_lock(&mut self, db: &mut Conn) -> Result<bool, mysql::Error> {
        let name = self.config.lock_name.as_str();
        let mut waited = false;
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            let row: Option<(Option<i64>, String, Option<u64>)> = db.exec_first(
                "SELECT GET_LOCK(?, ?), DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s'), IS_USED_LOCK(?)",
                (name, LOCK_WAIT_SECS, name),
            )?;
            let (got, now, holder) = row.unwrap_or((None, String::new(), None));
            if got == Some(1) {
                self.set_role(Role::Active, None);
                self.source.activated(&ChangeTime::new(now), waited);
                return Ok(true);
            }
            self.database.up();
            waited = true;
            let holder = holder.map_or("another poller".to_string(), |id| {
                format!("database connection {id}")
            });
            self.set_role(Role::Standby, Some(&holder));
            if self.shutdown.requested() {
                return Ok(false);
            }
        }
    }

    fn set_role(&mut self, role: Role, holder: Option<&str>) {
        if self.role != Some(role) {
            let name = &self.config.lock_name;
            match holder {
                Some(holder) => info!(
                    "standby: database lock {name:?} is held by {holder}; waiting to take over"
                ),
                None => info!("active: holding database lock {name:?}"),
            }
            self.role = Some(role);
        }
    }

    /// Polls while this poller holds the lock on `db`, until shutdown
    /// (`Ok`) or a database error (the lock is gone with the connection).
    fn work(&mut self, db: &mut Conn, db_backoff: &mut Backoff) -> Result<(), mysql::Error> {
        let mut sink_backoff = Backoff::default();
        let mut next_poll = Instant::now();
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            if self
                .shutdown
                .sleep(next_poll.saturating_duration_since(Instant::now()))
            {
                return Ok(());
            }
            let started = Instant::now();
            let batch = self.source.read(db)?;
            self.database.up();
            db_backoff.reset();
            if !batch.notifications.is_empty() {
                if let Err(e) = self.sink.deliver(&batch.notifications) {
                    // Nothing was forgotten: the same changes are read again.
                    self.sink_link.down(&e);
                    if sink_backoff.wait(self.shutdown) {
                        return Ok(());
                    }
                    next_poll = Instant::now();
                    continue;
                }
                self.sink_link.up();
                sink_backoff.reset();
                self.metrics.poll_batches.fetch_add(1, Ordering::Relaxed);
                self.metrics
                    .poll_lag_seconds
                    .store(batch.lag_secs, Ordering::Relaxed);
            }
            self.source.confirmed(db, batch.receipt)?;
            // Poll at a fixed rate, not after a fixed pause, so the lag from
            // a commit to its publication averages half an interval.
            next_poll = if batch.full {
                Instant::now()
            } else {
                started + self.config.poll_interval
            };
        }
    }
}
