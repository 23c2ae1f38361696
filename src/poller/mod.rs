//! The database poller: Bugzilla's database in, notifications handed to a
//! [`Sink`] (the broker for `poll`, the in-process hub for `run`).
//!
//! Owns the poll loop, the `GET_LOCK` that makes exactly one poller active
//! (the others wait as hot standbys), reconnection with capped backoff for
//! both the database and the sink, and the rule that a change is forgotten
//! only after the sink took it (the broker confirmed it). It must never drop
//! a change the sink has not taken, and never log a credential. A
//! connection that worked and was then dropped (idle past `wait_timeout`,
//! a `KILL`, a cut) is replaced at once without a word; only when that
//! fails too is the database reported down. The two
//! sources (what to read, what to forget) live in [`push_notify`] and
//! [`bugs`]. The loop runs on Bugzilla's MariaDB or, for `bzpush demo`
//! without a database, on a simulated `push_notify` table in memory
//! ([`memory`]): what it needs of either is [`Database`] and [`Session`].
//!
//! Errors come in two kinds: the database is down (connection and I/O
//! errors, retried with capped backoff) or it answers and refuses (a missing
//! table or privilege: said once with the fix, retried slowly; an active
//! poller refused lets go of the lock meanwhile, so that a standby whose
//! account works takes over). The role
//! (active or standby, and who holds the lock) and a refusal are logged once
//! per change, sent to systemd as `STATUS=`, and kept in [`Metrics`] for
//! `/health` and `/metrics`.

mod bugs;
pub mod memory;
mod push_notify;
mod recheck;
mod state;

pub use push_notify::delete_statement;

use std::collections::{HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, info, warn};
use mysql::Conn;
use mysql::prelude::Queryable;

use crate::config::{PollerConfig, Source as SourceKind};
use crate::database;
use crate::metrics::{LockHolder, Metrics, PollerRole};
use crate::notification::{ChangeTime, Notification};
use crate::retry::{Backoff, Link, REFUSED_RETRY};
use crate::shutdown::Shutdown;
use crate::systemd;

/// How long one `GET_LOCK` attempt waits: bounds how late a standby notices
/// shutdown, and how often it asks.
const LOCK_WAIT_SECS: u32 = 1;
/// A query that takes longer than this means the connection is dead.
const DB_IO_TIMEOUT: Duration = Duration::from_secs(30);
/// How many batches stay sent and not yet settled while the next one is
/// read and sent, when the source reads ahead. The broker confirms at its
/// own pace; with one batch in flight it idled while the poller waited for
/// the last confirm of a batch and deleted its rows. 4 (4,000 messages at
/// the default batch size) drained 8,716 -> 12,556 rows/s against 1, back
/// to back; 8 was not clearly faster on the shared machine and leaves
/// twice as much to send again after a failure: see the README's poller
/// benchmark.
const IN_FLIGHT_BATCHES: usize = 4;
/// How many batches' worth of changes the sink took but the source could
/// not yet forget are remembered, so that they are not handed over (and
/// counted) again when read again: every batch in flight, the one just
/// sent and the one whose confirm failed. Past that, the memory starts
/// over: the sink may see a change twice, which it tolerates.
const HANDED_OVER_BATCHES: usize = IN_FLIGHT_BATCHES + 2;

/// Connections dropped closer together than this are a fault to report,
/// not idle ones the server closed: it closes one idle past `wait_timeout`,
/// which is 8 h by default and never less than the poll it would have to
/// fall between.
const QUIET_RECONNECT_GAP: Duration = Duration::from_secs(10);

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

    /// A poll found nothing to send: makes sure the sink is ready anyway
    /// (connected, its exchange declared), so that its state is known and
    /// logged while idle, not only at the next change.
    fn idle(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// This poller just took the lock, by `database_now` on the database's
    /// clock (`None` if the database did not say): everything stamped later
    /// reaches this sink. Another poller may have taken changes meanwhile.
    fn activated(&mut self, _database_now: Option<crate::notification::Moment>) {}

    /// This poller lost its connection, and the lock with it: another
    /// poller may hand changes elsewhere until this one takes it again.
    fn deactivated(&mut self) {}
}

/// The database the poller runs on: Bugzilla's MariaDB ([`MariaDb`]), or
/// the demo's simulated one ([`memory::Memory`]).
trait Database {
    type Session: Session;

    /// Where it is, for log lines: a URL without its password.
    fn describe(&self) -> String;

    fn connect(&self) -> Result<Self::Session, mysql::Error>;

    /// Whether `error` is one no retry cures; if so, what it means and
    /// what to do (see [`refusal`]).
    fn refusal(&self, error: &mysql::Error) -> Option<String>;
}

/// One connection to a [`Database`], and the poller lock on it: the lock
/// goes with the connection.
trait Session {
    /// One attempt at the lock `name`, waiting at most `wait_secs`: whether
    /// it was taken (`Some(1)`), the database's time (`YYYY-MM-DDTHH:MM:SS`)
    /// and the connection that holds the lock, if any.
    fn try_lock(
        &mut self,
        name: &str,
        wait_secs: u32,
    ) -> Result<(Option<i64>, String, Option<u64>), mysql::Error>;

    /// This connection's id, as [`Session::try_lock`] names a holder.
    fn connection_id(&mut self) -> Result<Option<u64>, mysql::Error>;

    /// The holder of the lock, connection `id`, as far as it can be seen.
    fn lock_holder(&mut self, id: u64) -> LockHolder;

    /// Ends connection `id`, which took its lock with it.
    fn end_connection(&mut self, id: u64) -> Result<(), mysql::Error>;
}

/// Bugzilla's database on MariaDB or MySQL, as `config` names it.
struct MariaDb<'a>(&'a PollerConfig);

impl Database for MariaDb<'_> {
    type Session = Conn;

    fn describe(&self) -> String {
        self.0.database.to_string()
    }

    fn connect(&self) -> Result<Conn, mysql::Error> {
        database::connect(&self.0.database, DB_IO_TIMEOUT)
    }

    fn refusal(&self, error: &mysql::Error) -> Option<String> {
        refusal(error, self.0)
    }
}

impl Session for Conn {
    fn try_lock(
        &mut self,
        name: &str,
        wait_secs: u32,
    ) -> Result<(Option<i64>, String, Option<u64>), mysql::Error> {
        let row: Option<(Option<i64>, String, Option<u64>)> = self.exec_first(
            "SELECT GET_LOCK(?, ?), DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s'), IS_USED_LOCK(?)",
            (name, wait_secs, name),
        )?;
        Ok(row.unwrap_or((None, String::new(), None)))
    }

    fn connection_id(&mut self) -> Result<Option<u64>, mysql::Error> {
        self.query_first("SELECT CONNECTION_ID()")
    }

    fn lock_holder(&mut self, id: u64) -> LockHolder {
        lock_holder(self, id)
    }

    fn end_connection(&mut self, id: u64) -> Result<(), mysql::Error> {
        self.query_drop(format!("KILL CONNECTION {id}"))
    }
}

/// A place changes are read from, over a connection `C`. Each batch is
/// `read`, sent, settled, then `confirmed`; while batches are being
/// settled, the next ones may be read and sent, if the source can read past
/// them.
trait Source<C> {
    type Receipt;

    /// This poller just took the lock. `now` is the database time of the
    /// lock attempt; `took_over` says another poller was active before it.
    fn activated(&mut self, now: &ChangeTime, took_over: bool);

    /// Whether `read` would now skip every batch not yet confirmed. If not,
    /// the poller settles what is in flight before it reads again.
    fn reads_ahead(&self) -> bool;

    fn read(&mut self, db: &mut C) -> Result<Batch<Self::Receipt>, mysql::Error>;

    /// Every notification of the batch is now the sink's.
    fn confirmed(&mut self, db: &mut C, receipt: Self::Receipt) -> Result<(), mysql::Error>;

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
    /// Every change the batch carries, sent now or before.
    notifications: Vec<Notification>,
    receipt: R,
    /// When its oldest change was made, on this process's clock.
    oldest: Instant,
}

/// Whether the database `error` is one no retry cures: the server is up
/// and answers, but refuses what the poller asks. If so, what it means and
/// what to do, for the log and `/health`; `None` for an outage.
fn refusal(error: &mysql::Error, config: &PollerConfig) -> Option<String> {
    let mysql::Error::MySqlError(e) = error else {
        return None;
    };
    let db = config.database.opts.get_db_name().unwrap_or_default();
    let user = config.database.opts.get_user().unwrap_or_default();
    let todo = match (e.code, config.source) {
        // ER_NO_SUCH_TABLE
        (1146, SourceKind::PushNotify) => "push_notify does not exist: install Mozilla's \
             PushNotify extension in Bugzilla, or set BZPUSH_SOURCE=bugs"
            .to_string(),
        (1146, SourceKind::Bugs) => {
            "is the database in BZPUSH_DATABASE_URL Bugzilla's?".to_string()
        }
        // ER_TABLEACCESS_DENIED_ERROR, ER_COLUMNACCESS_DENIED_ERROR
        (1142 | 1143, SourceKind::PushNotify) => {
            format!("GRANT SELECT, DELETE ON `{db}`.push_notify TO '{user}'@…")
        }
        (1142 | 1143, SourceKind::Bugs) => {
            format!("GRANT SELECT (bug_id, delta_ts) ON `{db}`.bugs TO '{user}'@…")
        }
        // ER_DBACCESS_DENIED_ERROR, ER_ACCESS_DENIED_ERROR, ER_BAD_DB_ERROR,
        // ER_HOST_NOT_PRIVILEGED
        (1044 | 1045 | 1049 | 1130, _) => "check the user, password, host and database \
             in BZPUSH_DATABASE_URL against the server's accounts (`bzpush check`)"
            .to_string(),
        // ER_BAD_FIELD_ERROR
        (1054, _) => "the table lacks a column bzpush reads: is it Bugzilla's?".to_string(),
        _ => return None,
    };
    Some(format!("{} — {todo}", database::Sentence(error)))
}

/// The holder of lock `id` as the server lists it, if this user may see it
/// (its own connections always; others' with the PROCESS privilege).
pub fn lock_holder(db: &mut Conn, id: u64) -> LockHolder {
    let host: Option<String> = db
        .exec_first(
            "SELECT HOST FROM information_schema.PROCESSLIST WHERE ID = ?",
            (id,),
        )
        .ok()
        .flatten();
    LockHolder {
        connection: id,
        host,
    }
}

/// Runs the poller until `shutdown`, handing changes to `sink`. Database
/// and sink failures are retried forever; they never end the loop.
/// `metrics` gets poll counts, and the database link's state in
/// `upstream_links[0]` when there is one.
pub fn run(config: &PollerConfig, sink: impl Sink, metrics: &Metrics, shutdown: &Shutdown) {
    let settings = Settings {
        lock_name: &config.lock_name,
        poll_interval: config.poll_interval,
        batch_size: config.batch_size,
    };
    let database = MariaDb(config);
    match config.source {
        SourceKind::PushNotify => {
            let source = push_notify::PushNotify::new(config);
            Poller::new(settings, database, sink, metrics, shutdown, source).run()
        }
        SourceKind::Bugs => {
            let source = bugs::Bugs::new(config);
            Poller::new(settings, database, sink, metrics, shutdown, source).run()
        }
    }
}

/// Runs the poller like [`run`], on the simulated Bugzilla database
/// `table` (source `push_notify`, lock `lock_name`).
pub fn run_in_memory(
    table: &memory::Table,
    lock_name: &str,
    poll_interval: Duration,
    batch_size: usize,
    sink: impl Sink,
    metrics: &Metrics,
    shutdown: &Shutdown,
) {
    let settings = Settings {
        lock_name,
        poll_interval,
        batch_size,
    };
    let source = memory::PushNotify::new(batch_size);
    let database = memory::Memory(table);
    Poller::new(settings, database, sink, metrics, shutdown, source).run()
}

/// How the poller polls, whatever its database.
struct Settings<'a> {
    lock_name: &'a str,
    poll_interval: Duration,
    batch_size: usize,
}

struct Poller<'a, D, S, K> {
    settings: Settings<'a>,
    db: D,
    shutdown: &'a Shutdown,
    metrics: &'a Metrics,
    source: S,
    sink: K,
    database: Link<'a>,
    sink_link: Link<'a>,
    sink_backoff: Backoff,
    /// The role last logged: a reconnect that takes the same role again
    /// says nothing.
    role: Option<PollerRole>,
    /// The connection that last held the lock, as the server lists it: if
    /// it still holds the lock after this poller reconnected (the server
    /// has not noticed it is gone), it is ended rather than waited for.
    session: Option<LockHolder>,
    /// Changes the sink took whose rows the source has not forgotten yet
    /// (the confirm failed): read again, they are not handed over again.
    handed_over: HashSet<Notification>,
    /// A statement has worked on the current connection since the last
    /// quiet reconnection: the next dropped connection may be replaced
    /// without a word.
    reconnect_quietly: bool,
    last_quiet_reconnect: Option<Instant>,
    /// The refusal in force was met while polling (a table or privilege
    /// missing), not while connecting: waiting for the lock does not show
    /// that it is over, only a whole poll does.
    refused_at_work: bool,
}

impl<'a, D: Database, S: Source<D::Session>, K: Sink> Poller<'a, D, S, K> {
    fn new(
        settings: Settings<'a>,
        db: D,
        sink: K,
        metrics: &'a Metrics,
        shutdown: &'a Shutdown,
        source: S,
    ) -> Self {
        let mut database = Link::new("database", db.describe());
        if let Some(flag) = metrics.upstream_links.first() {
            database = database.reporting(flag);
        }
        let (kind, target) = sink.describe();
        Poller {
            settings,
            db,
            shutdown,
            metrics,
            source,
            sink,
            database,
            sink_link: Link::new(kind, target),
            sink_backoff: Backoff::default(),
            role: None,
            session: None,
            handed_over: HashSet::new(),
            reconnect_quietly: false,
            last_quiet_reconnect: None,
            refused_at_work: false,
        }
    }

    fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            match self.connect_and_work(&mut backoff) {
                Ok(()) => break,
                Err(e) if self.may_reconnect_quietly(&e) => {
                    // Most likely closed while idle (wait_timeout, a KILL):
                    // reconnect at once and say nothing unless that fails
                    // too. The lock went with the connection; taking it
                    // again is the same as after an outage.
                    debug!("database connection dropped ({e}); reconnecting");
                    self.sink.deactivated();
                    self.reconnect_quietly = false;
                    self.last_quiet_reconnect = Some(Instant::now());
                }
                Err(e) => {
                    // The lock went with the connection: whoever reconnects
                    // first is the active poller.
                    self.sink.deactivated();
                    self.metrics.poller().role = None;
                    self.reconnect_quietly = false;
                    let stop = match self.db.refusal(&e) {
                        Some(reason) => {
                            self.refused(&reason);
                            self.shutdown.sleep(REFUSED_RETRY)
                        }
                        None => {
                            self.database_down(&e);
                            backoff.wait(self.shutdown)
                        }
                    };
                    if stop {
                        break;
                    }
                }
            }
        }
        info!("poller stopped");
    }

    /// Whether `error` ended a connection that worked, and not just after
    /// the last time that happened.
    fn may_reconnect_quietly(&self, error: &mysql::Error) -> bool {
        self.reconnect_quietly
            && database::connection_dropped(error)
            && self
                .last_quiet_reconnect
                .is_none_or(|at| at.elapsed() >= QUIET_RECONNECT_GAP)
    }

    /// Connects, waits for the lock, polls. `Ok` only on shutdown.
    fn connect_and_work(&mut self, backoff: &mut Backoff) -> Result<(), mysql::Error> {
        let mut db = self
            .db
            .connect()
            .inspect_err(|_| self.refused_at_work = false)?;
        if self.take_lock(&mut db)? {
            self.work(&mut db, backoff)?;
        }
        Ok(())
    }

    /// Waits for the poller lock as a hot standby. `Ok(false)`: shutdown
    /// came first.
    fn take_lock(&mut self, db: &mut D::Session) -> Result<bool, mysql::Error> {
        let name = self.settings.lock_name;
        let mut waited = false;
        let mut holder: Option<LockHolder> = None;
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            let (got, now, holder_id) = db.try_lock(name, LOCK_WAIT_SECS)?;
            self.reconnect_quietly = true;
            if got == Some(1) {
                let id = db.connection_id()?;
                // Without its host, an id alone could name another
                // process's connection after a server restart: not kept.
                self.session = id.map(|id| db.lock_holder(id)).filter(|h| h.host.is_some());
                self.set_role(PollerRole::Active);
                let now = ChangeTime::new(now);
                self.source.activated(&now, waited);
                // NOW() is when the statement began: GET_LOCK took the lock
                // at most its wait later.
                let locked = now.at().map(|at| at.plus_secs(LOCK_WAIT_SECS.into()));
                self.sink.activated(locked);
                return Ok(true);
            }
            if !self.refused_at_work {
                self.database_up();
            }
            // A standby owes no changes: its lag stays zero, and the
            // active poller's shows.
            self.metrics.poll_lag_from(Instant::now());
            // `None`: freed since GET_LOCK gave up; the next one takes it.
            if let Some(id) = holder_id {
                // Looked up once per holder, not once a second.
                let current = match holder.take() {
                    Some(known) if known.connection == id => known,
                    _ => db.lock_holder(id),
                };
                if self.session.as_ref() == Some(&current) {
                    self.end_own_session(db, id);
                    continue;
                }
                waited = true;
                self.set_role(PollerRole::Standby(current.clone()));
                holder = Some(current);
            }
            // A standby keeps its sink ready too: a wrong password or an
            // outage shows now, not when it takes over.
            match self.sink.idle() {
                Ok(()) => self.sink_link.up(),
                Err(e) => self.sink_link.down(&e),
            }
            if self.shutdown.requested() {
                return Ok(false);
            }
        }
    }

    /// This poller's previous connection still holds the lock: the server
    /// has not noticed it is gone (a link that went silent, a query stuck
    /// in a lock wait). Waiting on it would make this poller a standby of
    /// itself until the server's `wait_timeout`, hours away: end it. KILL
    /// of a connection of one's own user needs no privilege. Tried once;
    /// if it fails, the poller waits as a standby like any other.
    fn end_own_session(&mut self, db: &mut D::Session, id: u64) {
        self.session = None;
        let name = self.settings.lock_name;
        info!(
            "database lock {name:?} is still held by this poller's previous connection {id}: ending it"
        );
        if let Err(e) = db.end_connection(id) {
            warn!(
                "could not end database connection {id} ({e}); waiting for the server to drop it"
            );
        }
    }

    /// Logs, tells systemd and records a role that differs from the last
    /// one (for a standby: or whose lock holder differs).
    fn set_role(&mut self, role: PollerRole) {
        self.metrics.poller().role = Some(role.clone());
        if self.role.as_ref() == Some(&role) {
            return;
        }
        let line = self.role_line(&role);
        info!("{line}");
        systemd::notify(&format!("STATUS={line}"));
        self.role = Some(role);
    }

    fn role_line(&self, role: &PollerRole) -> String {
        let name = self.settings.lock_name;
        match role {
            PollerRole::Standby(holder) => {
                format!("standby: database lock {name:?} is held by {holder}; waiting to take over")
            }
            PollerRole::Active => format!("active: holding database lock {name:?}"),
        }
    }

    /// The database answers: connected, no longer refusing.
    fn database_up(&mut self) {
        self.refused_at_work = false;
        self.database.up();
        let was_refused = self.metrics.poller().refused.take().is_some();
        if was_refused && let Some(role) = &self.role {
            // The last STATUS= was the refusal.
            systemd::notify(&format!("STATUS={}", self.role_line(role)));
        }
    }

    fn database_down(&mut self, error: &mysql::Error) {
        self.refused_at_work = false;
        let was_refused = self.metrics.poller().refused.take().is_some();
        if was_refused {
            // The last STATUS= was the refusal.
            systemd::notify("STATUS=database down; retrying with backoff");
        }
        self.database.down(&database::Sentence(error));
    }

    /// The database refuses the poller for `reason` (which says the fix).
    fn refused(&mut self, reason: &str) {
        self.metrics.poller().refused = Some(reason.to_string());
        if self.database.refused(reason) {
            systemd::notify(&format!("STATUS=database refused: {reason}"));
        }
    }

    /// Polls while this poller holds the lock on `db`, until shutdown
    /// (`Ok`) or a database error, an outage or a refusal: the caller drops
    /// the connection, and the lock with it.
    fn work(&mut self, db: &mut D::Session, db_backoff: &mut Backoff) -> Result<(), mysql::Error> {
        let mut next_poll = Instant::now();
        // Oldest first: settled and forgotten in the order they were read.
        let mut in_flight = VecDeque::new();
        loop {
            self.metrics.beat(&self.metrics.poller_beat);
            if self
                .shutdown
                .sleep(next_poll.saturating_duration_since(Instant::now()))
            {
                // Finish the batches in hand, in order.
                return match self.settle_all(db, &mut in_flight) {
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
                Ok(full) => {
                    // Only a whole poll, its confirm included, shows that
                    // a refusal is over.
                    self.database_up();
                    db_backoff.reset();
                    self.reconnect_quietly = true;
                    if full {
                        Instant::now()
                    } else {
                        started + self.settings.poll_interval
                    }
                }
                Err(Failure::Sink(e)) => {
                    // Nothing in flight was forgotten: it is read again.
                    in_flight.clear();
                    self.source.reset();
                    self.sink_link.down(&e);
                    if self.sink_backoff.wait(self.shutdown) {
                        return Ok(());
                    }
                    Instant::now()
                }
                Err(Failure::Database(e)) => {
                    // What the sink already has is not handed over again by
                    // this poller. Another one that takes over reads those
                    // rows too and sends them again: a duplicate, never a
                    // loss.
                    self.abandon(in_flight.drain(..));
                    self.source.reset();
                    // Down or refused, the lock goes with the connection. A
                    // refused poller that kept it would leave a standby
                    // whose account works waiting forever, while nothing is
                    // forgotten; without it, one takes over, and this one
                    // asks for the lock again after its slow retry, as a
                    // standby.
                    self.refused_at_work = self.db.refusal(&e).is_some();
                    return Err(e);
                }
            };
        }
    }

    /// Batches in flight that will not be forgotten now: whatever the sink
    /// takes of them is remembered as handed over, so that reading them
    /// again sends (and counts) nothing twice.
    fn abandon(&mut self, in_flight: impl Iterator<Item = InFlight<K::Pending, S::Receipt>>) {
        for InFlight {
            pending,
            notifications,
            ..
        } in in_flight
        {
            if let Some(pending) = pending
                && self.sink.settle(pending).is_ok()
            {
                self.remember_handed_over(notifications);
            }
        }
    }

    fn remember_handed_over(&mut self, notifications: Vec<Notification>) {
        if self.handed_over.len() + notifications.len()
            > HANDED_OVER_BATCHES * self.settings.batch_size
        {
            self.handed_over.clear();
        }
        self.handed_over.extend(notifications);
    }

    /// One poll: reads a batch and sends it, then settles the oldest batch
    /// in flight if more than [`IN_FLIGHT_BATCHES`] are, and every one if
    /// this batch ended a backlog. `Ok(true)`: the batch was full, poll
    /// again at once.
    ///
    /// In a backlog the steps overlap: batch N+k is read and sent while the
    /// sink still works on batches N to N+k-1; then N's confirms are
    /// awaited and its rows forgotten. The broker is the slowest part, and
    /// this way it never waits for the database, nor for the poller
    /// between two batches. Batches are still settled and forgotten in
    /// order, and none is forgotten before the sink took it.
    fn step(
        &mut self,
        db: &mut D::Session,
        in_flight: &mut VecDeque<InFlight<K::Pending, S::Receipt>>,
    ) -> Result<bool, Failure<K::Error>> {
        if !self.source.reads_ahead() {
            self.settle_all(db, in_flight)?;
        }
        let read_at = Instant::now();
        let batch = self.source.read(db)?;
        let fresh: Vec<Notification> = batch
            .notifications
            .iter()
            .filter(|n| !self.handed_over.contains(n))
            .cloned()
            .collect();
        let oldest = read_at
            .checked_sub(Duration::from_secs(batch.lag_secs))
            .unwrap_or(read_at);
        let pending = if fresh.is_empty() {
            // Nothing to send: the broker link is still checked, so an
            // outage or a wrong password shows while idle.
            self.sink.idle().map_err(Failure::Sink)?;
            self.sink_link.up();
            self.sink_backoff.reset();
            None
        } else {
            Some(self.sink.send(&fresh).map_err(Failure::Sink)?)
        };
        in_flight.push_back(InFlight {
            pending,
            notifications: batch.notifications,
            receipt: batch.receipt,
            oldest,
        });
        if batch.full {
            while in_flight.len() > IN_FLIGHT_BATCHES {
                self.settle(db, in_flight.pop_front())?;
            }
        } else {
            // The backlog is drained: nothing stays in flight between polls.
            self.settle_all(db, in_flight)?;
        }
        // The lag counts from the oldest change still in flight or, with
        // none, from this poll: it has seen everything older.
        self.metrics
            .poll_lag_from(in_flight.front().map_or(read_at, |f| f.oldest));
        Ok(batch.full)
    }

    /// Settles every batch in flight, oldest first. On a failure the
    /// batches after the one that failed stay in `in_flight`.
    fn settle_all(
        &mut self,
        db: &mut D::Session,
        in_flight: &mut VecDeque<InFlight<K::Pending, S::Receipt>>,
    ) -> Result<(), Failure<K::Error>> {
        while let Some(oldest) = in_flight.pop_front() {
            self.settle(db, Some(oldest))?;
        }
        Ok(())
    }

    /// Waits until the sink holds `in_flight`, then lets the source forget
    /// it. A sink failure forgets nothing.
    fn settle(
        &mut self,
        db: &mut D::Session,
        in_flight: Option<InFlight<K::Pending, S::Receipt>>,
    ) -> Result<(), Failure<K::Error>> {
        let Some(InFlight {
            pending,
            notifications,
            receipt,
            ..
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
        if let Err(e) = self.source.confirmed(db, receipt) {
            self.remember_handed_over(notifications);
            return Err(e.into());
        }
        if !self.handed_over.is_empty() {
            for n in &notifications {
                self.handed_over.remove(n);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsString;

    use super::*;
    use crate::config::{Config, Invocation};
    use crate::notification::BugId;

    fn config(source: &str) -> PollerConfig {
        let env = [
            ("BZPUSH_SOURCE", source),
            ("BZPUSH_DATABASE_URL", "mysql://bzpush@db.example/bugs"),
        ]
        .map(|(k, v)| (OsString::from(k), OsString::from(v)));
        match crate::config::parse([OsString::from("run")], env) {
            Ok(Invocation::Start(Config::Run(c))) => c.poller,
            other => panic!("expected run, got {other:?}"),
        }
    }

    fn server_error(code: u16) -> mysql::Error {
        mysql::Error::MySqlError(mysql::MySqlError {
            state: "42000".into(),
            message: "refused".into(),
            code,
        })
    }

    /// A sink that holds each batch until it is settled, fails the settle
    /// of the batches numbered in `fail` (from 1, in the order sent), and
    /// checks that no row was forgotten before the sink took its change.
    struct Scripted {
        table: memory::Table,
        rows: usize,
        fail: Vec<usize>,
        sent: Vec<Vec<Notification>>,
        taken: Vec<Notification>,
        /// How many batches were sent before the first was settled.
        depth: Option<usize>,
        /// How many batches were sent when the first settle failed.
        sent_at_failure: Option<usize>,
    }

    impl Sink for Scripted {
        type Error = String;
        type Pending = (usize, Vec<Notification>);

        fn describe(&self) -> (&'static str, String) {
            ("test sink", String::new())
        }

        fn send(&mut self, batch: &[Notification]) -> Result<Self::Pending, String> {
            self.sent.push(batch.to_vec());
            Ok((self.sent.len(), batch.to_vec()))
        }

        fn settle(&mut self, (n, batch): Self::Pending) -> Result<(), String> {
            self.depth.get_or_insert(self.sent.len());
            let taken: HashSet<_> = self.taken.iter().map(|t| t.bug).collect();
            assert!(
                self.rows - self.table.rows() <= taken.len(),
                "a row was forgotten before the sink took its change"
            );
            if self.fail.contains(&n) {
                self.sent_at_failure.get_or_insert(self.sent.len());
                return Err(format!("batch {n} failed"));
            }
            self.taken.extend(batch);
            Ok(())
        }
    }

    /// The simulated source, whose `confirmed` fails on the calls numbered
    /// in `fail` (from 1) as a dropped connection would, forgetting nothing.
    struct FailingConfirm {
        inner: memory::PushNotify,
        fail: Vec<usize>,
        calls: usize,
    }

    impl Source<memory::Connection> for FailingConfirm {
        type Receipt = memory::Rows;

        fn activated(&mut self, now: &ChangeTime, took_over: bool) {
            self.inner.activated(now, took_over)
        }

        fn reads_ahead(&self) -> bool {
            self.inner.reads_ahead()
        }

        fn read(
            &mut self,
            db: &mut memory::Connection,
        ) -> Result<Batch<memory::Rows>, mysql::Error> {
            self.inner.read(db)
        }

        fn confirmed(
            &mut self,
            db: &mut memory::Connection,
            receipt: memory::Rows,
        ) -> Result<(), mysql::Error> {
            self.calls += 1;
            if self.fail.contains(&self.calls) {
                return Err(mysql::Error::IoError(
                    std::io::ErrorKind::ConnectionReset.into(),
                ));
            }
            self.inner.confirmed(db, receipt)
        }

        fn reset(&mut self) {
            self.inner.reset()
        }
    }

    /// Drains 20 rows in 3-row batches (several in flight at once), the
    /// sink failing to settle `sink_fails` and the database failing to
    /// confirm `confirm_fails`, handling each failure as `work` does;
    /// returns the sink.
    fn drain_with_failures(sink_fails: Vec<usize>, confirm_fails: Vec<usize>) -> Scripted {
        const ROWS: u32 = 20;
        let table = memory::Table::new();
        for bug in 1..=ROWS {
            let bug = BugId::new(bug).unwrap_or_else(|| panic!("{bug} is a bug id"));
            table.change(bug, ChangeTime::new("2026-01-01T00:00:01"));
        }
        let metrics = Metrics::new("test", 0);
        let (_trigger, shutdown) = crate::shutdown::channel();
        let settings = Settings {
            lock_name: "test",
            poll_interval: Duration::ZERO,
            batch_size: 3,
        };
        let sink = Scripted {
            table: table.clone(),
            rows: ROWS as usize,
            fail: sink_fails,
            sent: Vec::new(),
            taken: Vec::new(),
            depth: None,
            sent_at_failure: None,
        };
        let source = FailingConfirm {
            inner: memory::PushNotify::new(3),
            fail: confirm_fails,
            calls: 0,
        };
        let mut poller = Poller::new(
            settings,
            memory::Memory(&table),
            sink,
            &metrics,
            &shutdown,
            source,
        );
        let mut db = poller.db.connect().unwrap_or_else(|e| panic!("{e}"));
        let mut in_flight = VecDeque::new();
        let mut polls = 0;
        loop {
            polls += 1;
            assert!(polls < 100, "the backlog drains");
            match poller.step(&mut db, &mut in_flight) {
                Ok(true) => {}
                Ok(false) => break,
                Err(Failure::Sink(_)) => {
                    in_flight.clear();
                    poller.source.reset();
                }
                Err(Failure::Database(_)) => {
                    poller.abandon(in_flight.drain(..));
                    poller.source.reset();
                }
            }
        }
        assert!(
            in_flight.is_empty(),
            "nothing stays in flight after a drain"
        );
        assert_eq!(table.rows(), 0, "every row is forgotten");
        let taken: HashSet<_> = poller.sink.taken.iter().map(|n| n.bug.get()).collect();
        assert_eq!(taken, (1..=ROWS).collect(), "every change reaches the sink");
        assert_eq!(
            poller.sink.depth,
            Some(IN_FLIGHT_BATCHES + 1),
            "batches in flight"
        );
        poller.sink
    }

    #[test]
    fn a_failed_settle_of_one_batch_of_several_in_flight_reads_it_and_all_after_it_again() {
        let sink = drain_with_failures(vec![2], vec![]);
        // Batch 1 was taken and forgotten; batch 2 failed with the batches
        // behind it in flight: the next batch sent starts again at batch 2.
        let next = sink
            .sent_at_failure
            .unwrap_or_else(|| panic!("batch 2 failed"));
        assert!(next > 2, "batches were in flight behind batch 2");
        assert_eq!(sink.sent[next][0], sink.sent[1][0]);
    }

    #[test]
    fn a_failed_confirm_of_one_batch_of_several_in_flight_hands_over_nothing_twice() {
        let sink = drain_with_failures(vec![], vec![2]);
        // Batch 2's rows were not forgotten and those behind it were
        // abandoned: all are read again, and none is sent again.
        let sent = sink.sent.concat();
        assert_eq!(sent.len(), 20, "{sent:?}");
        assert_eq!(sink.taken.len(), 20, "{:?}", sink.taken);
    }

    #[test]
    fn a_refusal_says_its_fix_and_an_outage_is_no_refusal() {
        let push_notify = config("push_notify");
        let bugs = config("bugs");
        let says = |e: &mysql::Error, c: &PollerConfig, fix: &str| {
            let reason = refusal(e, c).unwrap_or_else(|| panic!("{e} is a refusal"));
            assert!(reason.contains(fix), "{reason}");
        };
        says(&server_error(1146), &push_notify, "BZPUSH_SOURCE=bugs");
        says(
            &server_error(1142),
            &push_notify,
            "GRANT SELECT, DELETE ON `bugs`.push_notify",
        );
        says(
            &server_error(1143),
            &bugs,
            "GRANT SELECT (bug_id, delta_ts) ON `bugs`.bugs",
        );
        says(&server_error(1045), &bugs, "BZPUSH_DATABASE_URL");
        // Lock wait timeout, deadlock, too many connections, server
        // shutting down: a retry cures them.
        for code in [1205, 1213, 1040, 1053] {
            assert_eq!(refusal(&server_error(code), &push_notify), None, "{code}");
        }
        let io = mysql::Error::IoError(std::io::ErrorKind::TimedOut.into());
        assert_eq!(refusal(&io, &push_notify), None);
    }
}
