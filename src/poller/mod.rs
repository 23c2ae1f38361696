//! The database poller: Bugzilla's database in, confirmed Pulse messages out.
//!
//! Owns the poll loop, the `GET_LOCK` that makes exactly one poller active
//! (the others wait as hot standbys), reconnection with capped backoff for
//! both the database and the broker, and the rule that a change is forgotten
//! only after the broker confirmed it. It must never drop a change it has
//! not seen confirmed, and never log a credential. The two sources (what to
//! read, what to forget) live in [`push_notify`] and [`bugs`].

mod bugs;
mod push_notify;

use std::time::{Duration, Instant};

use log::info;
use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};

use crate::config::{PollConfig, Source as SourceKind};
use crate::notification::{BugId, ChangeTime, Notification};
use crate::pulse::{PublishError, Publisher};
use crate::retry::{Backoff, Link};
use crate::shutdown::Shutdown;

/// How long one `GET_LOCK` attempt waits: bounds how late a standby notices
/// shutdown, and how often it asks.
const LOCK_WAIT_SECS: u32 = 1;
/// A query that takes longer than this means the connection is dead.
const DB_IO_TIMEOUT: Duration = Duration::from_secs(30);
const DB_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What a source read in one poll: the notifications to publish, and what
/// it needs back to forget them once they are confirmed.
struct Batch<R> {
    notifications: Vec<Notification>,
    receipt: R,
    /// The source had more than one batch to give: poll again at once.
    full: bool,
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

/// Runs the poller until `shutdown`. Database and broker failures are
/// retried forever; they never end the loop.
pub fn run(config: &PollConfig, shutdown: &Shutdown) {
    match config.source {
        SourceKind::PushNotify => {
            Poller::new(config, shutdown, push_notify::PushNotify::new(config)).run()
        }
        SourceKind::Bugs => Poller::new(config, shutdown, bugs::Bugs::new(config)).run(),
    }
}

struct Poller<'a, S> {
    config: &'a PollConfig,
    shutdown: &'a Shutdown,
    source: S,
    database: Link,
    broker: Link,
    publisher: Option<Publisher>,
    role: Option<Role>,
}

/// Which part this poller plays; logged when it changes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Standby,
    Active,
}

impl<'a, S: Source> Poller<'a, S> {
    fn new(config: &'a PollConfig, shutdown: &'a Shutdown, source: S) -> Self {
        Poller {
            config,
            shutdown,
            source,
            database: Link::new("database", config.database.to_string()),
            broker: Link::new("broker", config.amqp.to_string()),
            publisher: None,
            role: None,
        }
    }

    fn run(mut self) {
        let mut backoff = Backoff::default();
        loop {
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
        let mut db = self.connect_database()?;
        if self.take_lock(&mut db)? {
            self.work(&mut db, backoff)?;
        }
        Ok(())
    }

    fn connect_database(&self) -> Result<Conn, mysql::Error> {
        let opts = OptsBuilder::from_opts(self.config.database.opts.clone())
            .tcp_connect_timeout(Some(DB_CONNECT_TIMEOUT))
            .read_timeout(Some(DB_IO_TIMEOUT))
            .write_timeout(Some(DB_IO_TIMEOUT));
        Conn::new(opts)
    }

    /// Waits for the poller lock as a hot standby. `Ok(false)`: shutdown
    /// came first.
    fn take_lock(&mut self, db: &mut Conn) -> Result<bool, mysql::Error> {
        let name = self.config.lock_name.as_str();
        let mut waited = false;
        loop {
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
        let mut broker_backoff = Backoff::default();
        let mut next_poll = Instant::now();
        loop {
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
                if let Err(e) = self.publish(&batch.notifications) {
                    // Nothing was forgotten: the same changes are read again.
                    self.broker.down(&e);
                    self.publisher = None;
                    if broker_backoff.wait(self.shutdown) {
                        return Ok(());
                    }
                    next_poll = Instant::now();
                    continue;
                }
                self.broker.up();
                broker_backoff.reset();
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

    fn publish(&mut self, batch: &[Notification]) -> Result<(), PublishError> {
        let publisher = match self.publisher.take() {
            Some(p) => p,
            None => Publisher::connect(&self.config.amqp, &self.config.exchange, "bzpush poll")?,
        };
        publisher.publish(batch)?;
        self.publisher = Some(publisher);
        Ok(())
    }
}

/// A DATETIME as the database stored it, `YYYY-MM-DDTHH:MM:SS`.
fn change_time(value: &mysql::Value) -> Option<ChangeTime> {
    match *value {
        mysql::Value::Date(year, month, day, hour, minute, second, _) => Some(ChangeTime::new(
            format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}"),
        )),
        _ => None,
    }
}

/// A bug id column, which Bugzilla declares as a signed MEDIUMINT.
fn bug_id(value: &mysql::Value) -> Option<BugId> {
    match *value {
        mysql::Value::Int(n) => u32::try_from(n).ok().and_then(BugId::new),
        mysql::Value::UInt(n) => u32::try_from(n).ok().and_then(BugId::new),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_keep_the_stored_value() {
        let v = mysql::Value::Date(2026, 11, 28, 2, 4, 50, 0);
        assert_eq!(
            change_time(&v).map(|t| t.to_string()).as_deref(),
            Some("2026-11-28T02:04:50")
        );
        assert_eq!(change_time(&mysql::Value::NULL), None);
    }

    #[test]
    fn bug_ids_must_be_positive() {
        assert_eq!(bug_id(&mysql::Value::Int(7)), BugId::new(7));
        assert_eq!(bug_id(&mysql::Value::Int(0)), None);
        assert_eq!(bug_id(&mysql::Value::Int(-3)), None);
        assert_eq!(bug_id(&mysql::Value::NULL), None);
    }
}
