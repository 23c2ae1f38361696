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
//! ([`memory`]): what it needs of either is in [`database`]. What the
//! loop is doing is one [`State`] ([`state`]); the batches between a source
//! and the sink are [`pipeline`]'s.
//!
//! Errors come in two kinds: the database is down (connection and I/O
//! errors, retried with capped backoff) or it answers and refuses (a missing
//! table or privilege: said once with the fix, retried slowly; an active
//! poller refused lets go of the lock meanwhile, so that a standby whose
//! account works takes over). A poller that reaches no node of its broker
//! for longer than its grace lets go of the lock too, and competes for it
//! again only once a node answers, so that a standby that reaches the
//! broker takes over. The role
//! (active or standby, and who holds the lock) and a refusal are logged once
//! per change, sent to systemd as `STATUS=`, and kept in [`Metrics`] for
//! `/health` and `/metrics`.

mod audit;
mod bugs;
mod database;
pub mod memory;
mod pipeline;
mod push_notify;
mod refusals;
pub mod state;
mod watermark;

pub use bugs::{PUSH_NOTIFY_LEFT_ALONE, push_notify_left_alone};
pub use database::lock_holder;
pub use push_notify::delete_statement;
pub use state::{LockHolder, Role, State};

use std::fmt;
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use crate::config::{PollerConfig, Source as SourceKind};
use crate::metrics::{Metrics, POLLER, Task};
use crate::notification::{ChangeTime, Moment, Notification};
use crate::retry::{Backoff, REFUSED_RETRY};
use crate::shutdown::Shutdown;
use database::{Database, MariaDb, Session};
use pipeline::{Failure, Pipeline, Source};
use state::Reporter;

/// The poller settings of `bzpush run` with source `source` on a database
/// at db.example: a test's.
#[cfg(test)]
fn test_config(source: &str) -> PollerConfig {
    use crate::config::{Config, Invocation};
    use std::ffi::OsString;

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

/// How long one `GET_LOCK` attempt waits: bounds how late a standby notices
/// shutdown, and how often it asks.
const LOCK_WAIT_SECS: u32 = 1;
/// Connections dropped closer together than this are a fault to report,
/// not idle ones the server closed: it closes one idle past `wait_timeout`,
/// which is 8 h by default and never less than the poll it would have to
/// fall between.
const QUIET_RECONNECT_GAP: Duration = Duration::from_secs(10);

/// Where the poller hands its notifications: the broker (`PulseSink`) or
/// the in-process hub (`HubSink`).
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

    /// Waits for a sent batch. `Ok` once the sink is responsible for every
    /// notification in it but the ones it answers as refused: the poller
    /// forgets the others then, and keeps the refused ones to send again.
    fn settle(&mut self, pending: Self::Pending) -> Result<Refused, Self::Error>;

    /// A poll found nothing to send: makes sure the sink is ready anyway
    /// (connected, its exchange declared), so that its state is known and
    /// logged while idle, not only at the next change.
    fn idle(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// This poller just took the lock, by `database_now` on the database's
    /// clock (`None` if the database did not say): everything stamped later
    /// reaches this sink. Another poller may have taken changes meanwhile.
    fn activated(&mut self, _database_now: Option<Moment>) {}

    /// This poller lost its connection, and the lock with it: another
    /// poller may hand changes elsewhere until this one takes it again.
    fn deactivated(&mut self) {}

    /// Whether this sink's changes reach clients of this process alone
    /// (the in-process hub): then a standby owes them every change the
    /// active poller hands elsewhere, and is behind by the oldest one.
    fn local(&self) -> bool {
        false
    }

    /// How long the sink has been out of reach (no node of the broker
    /// answers); `None` while it is reachable, or for a sink that cannot
    /// be out of reach.
    fn unreachable_for(&self) -> Option<Duration> {
        None
    }
}

/// The changes of a settled batch that the sink refused, and why: it took
/// every other change of the batch. A refused change is not forgotten: it
/// is sent again, alone, after a growing pause (see `poller/refusals.rs`).
#[derive(Debug, Default)]
pub struct Refused {
    pub changes: Vec<Notification>,
    /// What refused them and what to do about it, for the log.
    pub why: String,
}

/// Runs the poller until `shutdown`, handing changes to `sink`. Database
/// and sink failures are retried forever; they never end the loop.
/// `metrics` gets poll counts, the poller's [`State`], and the database
/// link's state in `upstream_links[0]` when there is one.
pub fn run(config: &PollerConfig, sink: impl Sink, metrics: &Metrics, shutdown: &Shutdown) {
    let settings = Settings {
        lock_name: &config.lock_name,
        poll_interval: config.poll_interval,
        broker_grace: config.broker_grace,
    };
    let database = MariaDb(config);
    match config.source {
        SourceKind::PushNotify => {
            let pipeline = Pipeline::new(
                push_notify::PushNotify::new(config, metrics),
                sink,
                config.batch_size,
                metrics,
            );
            Poller::new(settings, database, pipeline, metrics, shutdown).run()
        }
        SourceKind::Bugs => {
            let pipeline = Pipeline::new(
                bugs::Bugs::new(config, metrics),
                sink,
                config.batch_size,
                metrics,
            );
            Poller::new(settings, database, pipeline, metrics, shutdown).run()
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
        broker_grace: None,
    };
    let pipeline = Pipeline::new(
        memory::PushNotify::new(batch_size),
        sink,
        batch_size,
        metrics,
    );
    Poller::new(settings, memory::Memory(table), pipeline, metrics, shutdown).run()
}

/// How the poller polls, whatever its database.
struct Settings<'a> {
    lock_name: &'a str,
    poll_interval: Duration,
    /// How long the sink may be out of reach before the poller lets go of
    /// the lock; `None`: never.
    broker_grace: Option<Duration>,
}

/// Why the poller let go of a database connection that was fine, and of
/// the lock with it.
enum Stopped {
    Shutdown,
    /// No node of the broker answered for this long, past the grace.
    BrokerLost(Duration),
}

/// How a connection ended: the error, and whether a statement had worked
/// on it (a connection that worked and then dropped may be replaced
/// without a word).
struct Ended {
    error: mysql::Error,
    worked: bool,
    /// It ended in a poll, not while connecting or waiting for the lock.
    at_work: bool,
}

struct Poller<'a, D: Database, S: Source, K: Sink> {
    settings: Settings<'a>,
    db: D,
    pipeline: Pipeline<'a, S, K>,
    state: Reporter<'a>,
    metrics: &'a Metrics,
    shutdown: &'a Shutdown,
    /// The connection that last held the lock, as the server lists it: if
    /// it still holds the lock after this poller reconnected (the server
    /// has not noticed it is gone), it is ended rather than waited for.
    session: Option<LockHolder>,
    /// When a dropped connection was last replaced without a word.
    last_quiet_reconnect: Option<Instant>,
    /// The watchdog's view of this thread.
    task: Task,
}

impl<'a, D, S, K> Poller<'a, D, S, K>
where
    D: Database,
    S: Source<Connection = D::Session>,
    K: Sink,
{
    fn new(
        settings: Settings<'a>,
        db: D,
        pipeline: Pipeline<'a, S, K>,
        metrics: &'a Metrics,
        shutdown: &'a Shutdown,
    ) -> Self {
        Poller {
            state: Reporter::new(settings.lock_name, db.describe(), metrics),
            settings,
            db,
            pipeline,
            metrics,
            shutdown,
            session: None,
            last_quiet_reconnect: None,
            task: metrics.tasks.register("poller"),
        }
    }

    fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
            let ended = match self.connect_and_work(&mut backoff) {
                Ok(Stopped::Shutdown) => break,
                Ok(Stopped::BrokerLost(after)) => {
                    self.pipeline.sink.deactivated();
                    self.state.broker_lost(after);
                    if self.wait_for_broker() {
                        break;
                    }
                    continue;
                }
                Err(ended) => ended,
            };
            // The lock went with the connection: whoever reconnects first
            // is the active poller.
            self.pipeline.sink.deactivated();
            if self.may_reconnect_quietly(&ended) {
                // Most likely closed while idle (wait_timeout, a KILL):
                // reconnect at once and say nothing unless that fails too.
                debug!(
                    "database connection dropped ({}); reconnecting",
                    ended.error
                );
                self.last_quiet_reconnect = Some(Instant::now());
                continue;
            }
            let stop = match self.db.refusal(&ended.error) {
                Some(reason) => {
                    self.state.refused(&reason, ended.at_work);
                    self.shutdown.sleep(REFUSED_RETRY)
                }
                None => {
                    self.state.down(&ended.error);
                    backoff.wait(self.shutdown)
                }
            };
            if stop {
                break;
            }
        }
        info!("poller stopped");
    }

    /// Whether the connection that `ended` worked and dropped, and not
    /// just after the last time that happened.
    fn may_reconnect_quietly(&self, ended: &Ended) -> bool {
        ended.worked
            && crate::database::connection_dropped(&ended.error)
            && self
                .last_quiet_reconnect
                .is_none_or(|at| at.elapsed() >= QUIET_RECONNECT_GAP)
    }

    /// Connects, waits for the lock, polls. `Ok` on shutdown, or when the
    /// broker has been out of reach past the grace.
    fn connect_and_work(&mut self, backoff: &mut Backoff) -> Result<Stopped, Ended> {
        let mut worked = false;
        let ended = |error, worked, at_work| Ended {
            error,
            worked,
            at_work,
        };
        let task = self.task.clone();
        let connecting = task.working();
        let mut db = self.db.connect().map_err(|e| ended(e, false, false))?;
        drop(connecting);
        match self.take_lock(&mut db, &mut worked) {
            Ok(None) => {}
            Ok(Some(stopped)) => return Ok(stopped),
            Err(e) => return Err(ended(e, worked, false)),
        }
        self.work(&mut db, backoff)
            .map_err(|e| ended(e, true, true))
    }

    /// How long the broker has been out of reach, once that is past the
    /// grace.
    fn broker_lost(&self) -> Option<Duration> {
        let grace = self.settings.broker_grace?;
        self.pipeline
            .sink
            .unreachable_for()
            .filter(|after| *after >= grace)
    }

    /// Tries the broker, with backoff, until a node answers; `true` if
    /// shutdown came first.
    fn wait_for_broker(&mut self) -> bool {
        let mut backoff = Backoff::default();
        let task = self.task.clone();
        loop {
            let working = task.working();
            self.pipeline.keep_sink_ready();
            drop(working);
            if self.pipeline.sink.unreachable_for().is_none() {
                self.state.broker_back();
                return false;
            }
            if backoff.wait(self.shutdown) {
                return true;
            }
        }
    }

    /// Waits for the poller lock as a hot standby. `Ok(None)`: it took the
    /// lock; otherwise why it stopped first: shutdown, or a broker out of
    /// reach past the grace (a poller that cannot publish must not take
    /// the lock from one that can). `worked` is set once a statement
    /// worked.
    fn take_lock(
        &mut self,
        db: &mut D::Session,
        worked: &mut bool,
    ) -> Result<Option<Stopped>, mysql::Error> {
        let name = self.settings.lock_name;
        let mut waited = false;
        let mut holder: Option<LockHolder> = None;
        let mut mark: Option<ChangeTime> = None;
        let task = self.task.clone();
        loop {
            let _working = task.working();
            if let Some(after) = self.broker_lost() {
                return Ok(Some(Stopped::BrokerLost(after)));
            }
            let attempt = db.try_lock(name, LOCK_WAIT_SECS)?;
            *worked = true;
            if attempt.taken {
                let id = db.connection_id()?;
                // Without its host, an id alone could name another
                // process's connection after a server restart: not kept.
                self.session = id.map(|id| db.lock_holder(id)).filter(|h| h.host.is_some());
                self.state.lock_attempt(Role::Active);
                // NOW() is when the statement began: GET_LOCK took the lock
                // at most its wait later.
                let locked = attempt
                    .now
                    .at()
                    .map(|at| at.plus_secs(LOCK_WAIT_SECS.into()));
                self.pipeline.activated(&attempt.now, waited, locked);
                return Ok(None);
            }
            self.standby_owes(db, &mut mark, &attempt.now)?;
            // `None`: freed since GET_LOCK gave up; the next one takes it.
            if let Some(id) = attempt.holder {
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
                self.state.lock_attempt(Role::Standby(current.clone()));
                holder = Some(current);
            }
            self.pipeline.keep_sink_ready();
            if self.shutdown.requested() {
                return Ok(Some(Stopped::Shutdown));
            }
        }
    }

    /// What a standby owes: nothing when its sink is shared (another
    /// poller publishes to the same broker); with the in-process hub, its
    /// clients are owed every change made since it began waiting (`mark`,
    /// set at the first attempt to the database's `now`), and it is behind
    /// by the oldest one.
    fn standby_owes(
        &mut self,
        db: &mut D::Session,
        mark: &mut Option<ChangeTime>,
        now: &ChangeTime,
    ) -> Result<(), mysql::Error> {
        if !self.pipeline.sink.local() {
            self.metrics.poll_lag_from(Instant::now());
            return Ok(());
        }
        let mark = mark.get_or_insert_with(|| now.clone());
        match db.oldest_change_after(mark)? {
            Some(age) => self.metrics.freshness.behind_by(POLLER, age),
            None => self.metrics.poll_lag_from(Instant::now()),
        }
        Ok(())
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

    /// Polls while this poller holds the lock on `db`, until shutdown or a
    /// broker out of reach past the grace (`Ok`), or a database error, an
    /// outage or a refusal: the caller drops the connection, and the lock
    /// with it.
    fn work(
        &mut self,
        db: &mut D::Session,
        db_backoff: &mut Backoff,
    ) -> Result<Stopped, mysql::Error> {
        let mut next_poll = Instant::now();
        let task = self.task.clone();
        loop {
            if self
                .shutdown
                .sleep(next_poll.saturating_duration_since(Instant::now()))
            {
                return self.pipeline.finish(db).map(|()| Stopped::Shutdown);
            }
            let _working = task.working();
            let started = Instant::now();
            next_poll = match self.pipeline.step(db) {
                // Poll at a fixed rate, not after a fixed pause, so the lag
                // from a commit to its publication averages half an interval.
                Ok(full) => {
                    // Only a whole poll, its confirm included, shows that
                    // a refusal is over.
                    match self.pipeline.lock_wait() {
                        Some(what) => self.state.lock_wait(what),
                        None => self.state.polled(),
                    }
                    db_backoff.reset();
                    if full {
                        Instant::now()
                    } else {
                        started + self.settings.poll_interval
                    }
                }
                Err(Failure::Sink(e)) => {
                    if self.pipeline.sink_failed(&e, self.shutdown) {
                        return Ok(Stopped::Shutdown);
                    }
                    if let Some(after) = self.broker_lost() {
                        return Ok(Stopped::BrokerLost(after));
                    }
                    Instant::now()
                }
                // Another session's lock: the connection and the poller
                // lock are fine; the statement is tried at the next poll.
                Err(Failure::Database(e)) if crate::database::is_lock_wait(&e) => {
                    self.pipeline.database_failed();
                    self.state.lock_wait(crate::database::sentence(&e));
                    started + self.settings.poll_interval
                }
                Err(Failure::Database(e)) => {
                    self.pipeline.database_failed();
                    return Err(e);
                }
            };
        }
    }
}
