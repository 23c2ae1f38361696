//! Catch-up from the source of truth: Bugzilla's `bugs` table.
//!
//! When a client subscribes with `since` and the hub's cache cannot prove it
//! holds every change since then (the server restarted, or the cache moved
//! past that time), the hub asks this worker instead. One thread with its own
//! read-only database connection answers each [`Job`] with every asked bug's
//! latest change at or after `since` (`bugs.delta_ts`), and sends the answer
//! back to the hub as a message. It must never write to the database, and
//! never block the hub: the hub only queues jobs.

use std::time::Duration;

use crossbeam_channel::Receiver;
use log::debug;
use mysql::Conn;
use mysql::prelude::Queryable;

use crate::config::DatabaseUrl;
use crate::database::{self, bug_id, change_time};
use crate::hub::{ConnId, HubSender, Message};
use crate::notification::{BugId, Notification};
use crate::protocol::Since;
use crate::retry::Link;

/// Jobs waiting for the worker before the hub answers `partial` instead.
pub const JOB_QUEUE: usize = 1024;
/// Ids per query: keeps each `IN (…)` list and its placeholders small.
const IDS_PER_QUERY: usize = 1000;
/// A catch-up query slower than this fails over to `partial`.
const QUERY_TIMEOUT: Duration = Duration::from_secs(10);

/// One subscription's catch-up request.
pub struct Job {
    pub conn: ConnId,
    pub bugs: Vec<BugId>,
    pub since: Since,
}

/// Answers jobs until the hub drops its end of `jobs`.
pub fn run(database: &DatabaseUrl, jobs: Receiver<Job>, hub: HubSender) {
    let mut link = Link::new("catch-up database", database.to_string());
    let mut db: Option<Conn> = None;
    for job in jobs {
        let result = answer(database, &mut db, &job);
        let updates = match result {
            Ok(updates) => {
                link.up();
                Some(updates)
            }
            Err(e) => {
                // Reconnect on the next job; this one is answered `partial`.
                link.down(&database::Sentence(&e));
                db = None;
                None
            }
        };
        debug!(
            "catch-up for connection {}: {:?} updates",
            job.conn,
            updates.as_ref().map(Vec::len)
        );
        let message = Message::CaughtUp {
            conn: job.conn,
            updates,
        };
        if hub.send(message).is_err() {
            break;
        }
    }
}

fn answer(
    url: &DatabaseUrl,
    db: &mut Option<Conn>,
    job: &Job,
) -> Result<Vec<Notification>, mysql::Error> {
    let conn = match db {
        Some(conn) => conn,
        None => db.insert(database::connect(url, QUERY_TIMEOUT)?),
    };
    let mut updates = Vec::new();
    for ids in job.bugs.chunks(IDS_PER_QUERY) {
        let placeholders = vec!["?"; ids.len()].join(",");
        let mut params: Vec<mysql::Value> = vec![job.since.as_str().into()];
        params.extend(ids.iter().map(|id| mysql::Value::from(id.get())));
        let rows: Vec<(mysql::Value, mysql::Value)> = conn.exec(
            format!(
                "SELECT bug_id, delta_ts FROM bugs \
                 WHERE delta_ts >= STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s') AND bug_id IN ({placeholders})"
            ),
            params,
        )?;
        updates.extend(rows.iter().filter_map(|(bug, when)| {
            Some(Notification {
                bug: bug_id(bug)?,
                when: change_time(when)?,
            })
        }));
    }
    updates.sort_by(|a, b| a.when.cmp(&b.when));
    Ok(updates)
}
