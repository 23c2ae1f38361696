//! The catch-up worker: one thread, with its own read-only connection to
//! Bugzilla's database, answers each [`Job`] with every asked bug's latest
//! change at or after `since` (`bugs.delta_ts`, the source of truth), as
//! [`Event::Answered`]. Each time it connects, it measures the database's
//! clock against this host's ([`Event::DatabaseClock`], for
//! [`super::cache`]): Bugzilla stamps with the database's `NOW()`, in the
//! server's default time zone, which is also this connection's. It must
//! never write to the database, and never block the hub: the room only
//! offers it jobs.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, SystemTime};

use std::sync::Arc;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::debug;
use mysql::prelude::Queryable;

use super::{Answer, Event};
use crate::config::DatabaseUrl;
use crate::database::{self, bug_id, change_time};
use crate::hub::{self, ConnId, HubSender};
use crate::metrics::{Metrics, Task};
use crate::notification::{BugId, ChangeTime, Moment, Notification};
use crate::protocol::Since;
use crate::retry::Link;

/// Jobs handed to the worker at once. More wait in the room, so a storm of
/// reconnecting clients queues instead of being answered `partial`; the
/// worker takes all that wait into one query.
pub const JOB_QUEUE: usize = 1024;
/// Bug ids one merged query may ask for: jobs are taken until their ids
/// reach this, which bounds the worker's memory whatever waits.
const IDS_PER_BATCH: usize = 50_000;
/// Ids per statement: keeps each `IN (…)` list and its placeholders small.
const IDS_PER_QUERY: usize = 1000;
/// A catch-up query slower than this fails over to `partial`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How often an idle worker compares the database's newest changes with
/// what the feeds received (serve's freshness).
const FRESHNESS_CHECK: Duration = Duration::from_secs(5);

/// Where the worker reports what the feeds owe: `serve`'s freshness slot
/// for the catch-up database, in `metrics`. `run` has none: its poller
/// measures the same database.
pub struct Owed {
    pub metrics: Arc<Metrics>,
    pub slot: usize,
}

/// One subscription's catch-up, for when the cache cannot vouch for `since`.
pub struct Job {
    pub conn: ConnId,
    pub bugs: Vec<BugId>,
    pub since: Since,
}

/// Answers jobs until the room drops its end of `jobs`. Every job waiting
/// when the worker is free is answered by one merged query: the union of
/// their bugs since the earliest `since`, then each job gets its own bugs
/// and times from the rows. `task` tells the watchdog when a query is under
/// way; with `owed`, an idle worker checks every `FRESHNESS_CHECK`
/// whether the database has changes the feeds never received.
pub fn run(
    database: &DatabaseUrl,
    jobs: Receiver<Job>,
    hub: HubSender,
    task: &Task,
    owed: Option<Owed>,
) {
    let mut link = Link::new("catch-up database", database.to_string());
    // Connected at once, so that the clock is known before the first
    // catch-up; if the database is down, the first job connects and says so.
    let mut db = connect(database, &hub)
        .inspect_err(|e| debug!("catch-up database: {e}; connecting again at the first catch-up"))
        .ok();
    // What nothing received yet is measured from: the database's time at
    // the first check.
    let mut since_start: Option<String> = None;
    if let Some(owed) = &owed {
        check_freshness(database, &mut db, &hub, owed, &mut since_start);
    }
    loop {
        let first = match jobs.recv_timeout(FRESHNESS_CHECK) {
            Ok(job) => job,
            Err(RecvTimeoutError::Timeout) => {
                if let Some(owed) = &owed {
                    let _working = task.working();
                    check_freshness(database, &mut db, &hub, owed, &mut since_start);
                }
                continue;
            }
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let _working = task.working();
        let mut ids = first.bugs.len();
        let mut batch = vec![first];
        while ids < IDS_PER_BATCH
            && let Ok(job) = jobs.try_recv()
        {
            ids += job.bugs.len();
            batch.push(job);
        }
        let rows = latest_changes(database, &mut db, &batch, &hub)
            .inspect(|_| link.up())
            .inspect_err(|e| {
                // Reconnect on the next batch; this one is answered `partial`.
                link.down(&database::Sentence(e));
                db = None;
            })
            .ok();
        let (asking, found) = (batch.len(), rows.as_ref().map(|(rows, _)| rows.len()));
        debug!("catch-up for {asking} connections: {found:?} rows");
        for job in batch {
            let updates = rows.as_ref().map(|(rows, newest)| Answer {
                updates: answer(rows, &job),
                newest: *newest,
            });
            let answered = Event::Answered {
                conn: job.conn,
                updates,
            };
            if hub.send(hub::Event::CatchUp(answered)).is_err() {
                return;
            }
        }
    }
}

/// Reports in `owed` how long the oldest change of the database that the
/// feeds never received has waited: none newer than the newest received
/// (or than the first check, before anything was received) is owed.
fn check_freshness(
    url: &DatabaseUrl,
    db: &mut Option<mysql::Conn>,
    hub: &HubSender,
    owed: &Owed,
    since_start: &mut Option<String>,
) {
    let freshness = &owed.metrics.freshness;
    let checked = (|| -> Result<Option<i64>, mysql::Error> {
        let conn = match db {
            Some(conn) => conn,
            None => db.insert(connect(url, hub)?),
        };
        // After the newest received; from the start on, that second
        // included, before anything was received.
        let (mark, after) = match owed.metrics.newest_received() {
            Some(newest) => (newest.as_str().to_string(), ">"),
            None => match since_start {
                Some(start) => (start.clone(), ">="),
                None => {
                    let now: Option<String> =
                        conn.query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s')")?;
                    (since_start.insert(now.unwrap_or_default()).clone(), ">=")
                }
            },
        };
        let age: Option<Option<i64>> = conn.exec_first(
            format!(
                "SELECT TIMESTAMPDIFF(SECOND, MIN(delta_ts), NOW()) FROM bugs \
                 WHERE delta_ts {after} STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s')"
            ),
            (mark,),
        )?;
        Ok(age.flatten())
    })();
    match checked {
        // Nothing owed as of now, and none is looked for until the next
        // check: credited until then, so that the lag does not grow between
        // two checks that each find nothing.
        Ok(None) => {
            freshness.handed_on_until(owed.slot, std::time::Instant::now() + FRESHNESS_CHECK);
            freshness.explain(owed.slot, None);
        }
        Ok(Some(age)) => {
            freshness.behind_by(owed.slot, Duration::from_secs(age.max(0).unsigned_abs()));
            freshness.explain(
                owed.slot,
                Some(format!(
                    "its bugs table has changes from {age} s ago that no feed received: is a \
                     poller publishing to this server's exchanges?"
                )),
            );
        }
        // What cannot be measured is not owed: the catch-up database
        // measures here, it does not deliver. Its outage shows in the log.
        Err(e) => {
            debug!("catch-up database: {e}; not measuring freshness until it answers");
            *db = None;
            freshness.handed_on_until(owed.slot, std::time::Instant::now() + FRESHNESS_CHECK);
            freshness.explain(owed.slot, None);
        }
    }
}

/// One job's answer from the merged rows: its bugs changed at or after its
/// `since`, oldest first.
fn answer(rows: &HashMap<BugId, ChangeTime>, job: &Job) -> Vec<Notification> {
    let mut updates: Vec<Notification> = job
        .bugs
        .iter()
        .filter_map(|bug| {
            let when = rows.get(bug)?;
            job.since.covers(when).then(|| Notification {
                bug: *bug,
                when: when.clone(),
            })
        })
        .collect();
    updates.sort_by(|a, b| a.when.cmp(&b.when));
    updates
}

/// Each asked bug's `delta_ts`, for the bugs of `batch` changed at or after
/// the earliest `since` among them, and the newest change the database
/// held before it read them (a replica's lag shows there). A connection that was idle may have
/// been closed by the server meanwhile (`wait_timeout`, a proxy, a
/// restart): such a failure is retried once on a new connection before
/// anyone is told.
fn latest_changes(
    url: &DatabaseUrl,
    db: &mut Option<mysql::Conn>,
    batch: &[Job],
    hub: &HubSender,
) -> Result<Rows, mysql::Error> {
    if let Some(open) = db.as_mut() {
        match query(open, batch) {
            Ok(rows) => return Ok(rows),
            Err(e) => {
                debug!("catch-up database: {e}; reconnecting and asking again");
                *db = None;
            }
        }
    }
    let fresh = db.insert(connect(url, hub)?);
    query(fresh, batch)
}

/// A new connection, once the room knows the database's clock by it.
fn connect(url: &DatabaseUrl, hub: &HubSender) -> Result<mysql::Conn, mysql::Error> {
    let mut db = database::connect(url, QUERY_TIMEOUT)?;
    let ahead = clock_ahead(&mut db)?;
    debug!("catch-up database: its clock is at most {ahead} s ahead of this host's");
    // Fails only when the hub has stopped, which ends this worker anyway.
    let _ = hub.send(hub::Event::CatchUp(Event::DatabaseClock { ahead }));
    Ok(db)
}

/// At most how many seconds the database's clock runs ahead of this host's
/// (negative: behind). Its `NOW()` is truncated to the second and read at
/// some moment after `before`: the true offset is below `now + 1 - before`.
fn clock_ahead(db: &mut mysql::Conn) -> Result<i64, mysql::Error> {
    let before = Moment::from_system(SystemTime::now());
    let now: Option<String> = db.query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s')")?;
    let Some(now) = now.as_deref().and_then(Moment::parse) else {
        return Err(mysql::Error::IoError(std::io::Error::other(format!(
            "the database answered NOW() with {now:?}, not a time: is it MariaDB or MySQL?"
        ))));
    };
    Ok(now.secs() + 1 - before.secs())
}

/// Each bug's latest change, and the newest change in `bugs`.
type Rows = (HashMap<BugId, ChangeTime>, Option<Moment>);

fn query(db: &mut mysql::Conn, batch: &[Job]) -> Result<Rows, mysql::Error> {
    let ids: BTreeSet<BugId> = batch.iter().flat_map(|j| j.bugs.iter().copied()).collect();
    // First: the rows read after it hold at least this much.
    let newest: Option<Option<String>> =
        db.query_first("SELECT DATE_FORMAT(MAX(delta_ts), '%Y-%m-%dT%H:%i:%s') FROM bugs")?;
    let newest = newest.flatten().as_deref().and_then(Moment::parse);
    let Some(since) = batch.iter().map(|j| &j.since).min_by_key(|s| s.at()) else {
        return Ok((HashMap::new(), newest));
    };
    let ids: Vec<BugId> = ids.into_iter().collect();
    let mut rows = HashMap::new();
    for ids in ids.chunks(IDS_PER_QUERY) {
        let placeholders = vec!["?"; ids.len()].join(",");
        let mut params: Vec<mysql::Value> = vec![since.as_str().into()];
        params.extend(ids.iter().map(|id| mysql::Value::from(id.get())));
        let found: Vec<(mysql::Value, mysql::Value)> = db.exec(
            format!(
                "SELECT bug_id, delta_ts FROM bugs \
                 WHERE delta_ts >= STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s') AND bug_id IN ({placeholders})"
            ),
            params,
        )?;
        rows.extend(
            found
                .iter()
                .filter_map(|(bug, when)| Some((bug_id(bug)?, change_time(when)?))),
        );
    }
    Ok((rows, newest))
}
