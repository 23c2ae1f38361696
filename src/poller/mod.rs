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
    /// A batch sent and not yet settled.
    type Pending;

    /// What to call it in log lines: a kind and a target, e.g. `broker`
    /// and a URL without its password.
    fn describe(&self) -> (&'static str, String);

    /// Starts handing over every notification of `batch`, in order after
    /// any batch sent before it.
    fn send(&mut self, batch: &[Notification]) -> Result<Self::Pending, Self::Error>;

    /// Waits for a sent batch. `Ok` only once the sink is responsible for
    /// every notification in it: the poller forgets them then.
    fn settle(&mut self, pending: Self::Pending) -> Result<(), Self::Error>;
}

/// A place changes are read from. Each batch is `read`, sent, settled,
/// then `confirmed`; while one batch is being settled, the next may be
/// read and sent, if the source can read past it.
trait Source {
    type Receipt;

    /// This poller just took the lock. `now` is the database time of the
    /// lock attempt; `took_over` says another poller was active before it.
    fn activated(&mut self, now: &ChangeTime, took_over: bool);

    /// Whether `read` would now skip every batch not yet confirmed. If not,
    /// the poller settles what is in flight before it reads again.
    fn reads_ahead(&self) -> bool;

    fn read(&mut self, db: &mut Conn) -> Result<Batch<Self::Receipt>, mysql::Error>;

    /// Every notification of the batch is now the sink's.
    fn confirmed(&mut self, db: &mut Conn, receipt: Self::Receipt) -> Result<(), mysql::Error>;

    /// The batches in flight were not delivered: read them again.
    fn reset(&mut self);
}

/// Why a poll stopped short.
enum Failure<E> {
    /// The database failed: the connection, and the lock, are gone.
    Database(mysql::Error),
    /// The sink failed: nothing in flight counts as delivered.
    Sink(E),
}

impl<E> From<mysql::Error> for Failure<E> {
    fn from(e: mysql::Error) -> Self {
        Failure::Database(e)
    }
}

/// A batch sent to the sink, not yet settled and forgotten.
struct InFlight<P, R> {
    /// `None` when the batch had nothing to send (only rows to forget).
    pending: Option<P>,
    receipt: R,
    /// When its oldest change was made, on this process's clock.
    oldest: Instant,
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
    sink_backoff: Backoff,
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
            sink_backoff: Backoff::default(),
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
                    self.database.down(&database::Sentence(&e));
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
            // A standby owes no changes: its lag stays zero, and the
            // active poller's shows.
            self.metrics.poll_lag_from(Instant::now());
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
        let mut next_poll = Instant::now();
        let mut in_flight = None;
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            if self
                .shutdown
                .sleep(next_poll.saturating_duration_since(Instant::now()))
            {
                // Finish the batch in hand.
                return match self.settle(db, in_flight.take()) {
                    Ok(()) => Ok(()),
                    Err(Failure::Sink(e)) => {
                        self.sink_link.down(&e);
                        Ok(())
                    }
                    Err(Failure::Database(e)) => Err(e),
                };
            }
            let started = Instant::now();
            next_poll = match self.step(db, &mut in_flight) {
                // Poll at a fixed rate, not after a fixed pause, so the lag
                // from a commit to its publication averages half an interval.
                Ok(false) => started + self.config.poll_interval,
                Ok(true) => Instant::now(),
                Err(Failure::Sink(e)) => {
                    // Nothing in flight was forgotten: it is read again.
                    in_flight = None;
                    self.source.reset();
                    self.sink_link.down(&e);
                    if self.sink_backoff.wait(self.shutdown) {
                        return Ok(());
                    }
                    Instant::now()
                }
                Err(Failure::Database(e)) => return Err(e),
            };
            db_backoff.reset();
        }
    }

    /// One poll: reads a batch and sends it, then settles the batch before
    /// it, and this one too if it ended a backlog. `Ok(true)`: the batch was
    /// full, poll again at once.
    ///
    /// In a backlog the steps overlap: batch N+1 is read and sent while the
    /// sink still works on batch N, whose confirms are then awaited and
    /// whose rows are then forgotten. The broker is the slowest part, and
    /// this way it never waits for the database. Batches are still settled
    /// and forgotten in order, and none is forgotten before the sink took
    /// it.
    fn step(
        &mut self,
        db: &mut Conn,
        in_flight: &mut Option<InFlight<K::Pending, S::Receipt>>,
    ) -> Result<bool, Failure<K::Error>> {
        if !self.source.reads_ahead() {
            self.settle(db, in_flight.take())?;
        }
        let read_at = Instant::now();
        let batch = self.source.read(db)?;
        self.database.up();
        let oldest = read_at
            .checked_sub(Duration::from_secs(batch.lag_secs))
            .unwrap_or(read_at);
        let pending = if batch.notifications.is_empty() {
            None
        } else {
            Some(
                self.sink
                    .send(&batch.notifications)
                    .map_err(Failure::Sink)?,
            )
        };
        let previous = in_flight.replace(InFlight {
            pending,
            receipt: batch.receipt,
            oldest,
        });
        self.settle(db, previous)?;
        if !batch.full {
            // The backlog is drained: nothing stays in flight between polls.
            self.settle(db, in_flight.take())?;
        }
        // The lag counts from the oldest change still in flight or, with
        // none, from this poll: it has seen everything older.
        self.metrics
            .poll_lag_from(in_flight.as_ref().map_or(read_at, |f| f.oldest));
        Ok(batch.full)
    }

    /// Waits until the sink holds `in_flight`, then lets the source forget
    /// it. A sink failure forgets nothing.
    fn settle(
        &mut self,
        db: &mut Conn,
        in_flight: Option<InFlight<K::Pending, S::Receipt>>,
    ) -> Result<(), Failure<K::Error>> {
        let Some(InFlight {
            pending, receipt, ..
        }) = in_flight
        else {
            return Ok(());
        };
        if let Some(pending) = pending {
            self.sink.settle(pending).map_err(Failure::Sink)?;
            self.sink_link.up();
            self.sink_backoff.reset();
            self.metrics.poll_batches.fetch_add(1, Ordering::Relaxed);
        }
        self.source.confirmed(db, receipt)?;
        Ok(())
    }
}
