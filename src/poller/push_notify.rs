//! Source `push_notify`: the queue table of Mozilla's PushNotify extension.
//!
//! The extension keeps one row per bug and updates its `delta_ts` in place.
//! A poll reads the oldest rows; once the broker has confirmed them, each is
//! deleted only if it is unchanged (`id` and `delta_ts` both match), so a
//! change that lands between the read and the delete stays for the next
//! poll. In a backlog the next batch is read past the last `id` of the one
//! still in flight, so the two overlap. Reads are plain consistent reads,
//! which take no locks; the DELETE locks only the rows it deletes (see
//! [`delete_statement`]), so a row another session holds never stalls it.
//!
//! Not every change gets a row (the extension disabled, admin SQL, the
//! extension's own race): each poll first audits the table against
//! `bugs.delta_ts` ([`Audit`]), which needs SELECT on `bugs (bug_id,
//! delta_ts)`. This source needs SELECT and DELETE on `push_notify` and
//! must never write anything else.

use std::collections::HashSet;

use log::{debug, warn};
use mysql::prelude::Queryable;
use mysql::{Conn, Value};

use super::audit::Audit;
use super::pipeline::{Batch, Source};
use crate::config::PollerConfig;
use crate::database::{bug_id, change_time};
use crate::logging::Throttle;
use crate::metrics::Metrics;
use crate::notification::{ChangeTime, Notification};

/// Rows that hold no change: whoever writes them can fill the log.
static INVALID_ROWS: Throttle = Throttle::new();

/// Rows per DELETE statement: three placeholders each, well under the
/// protocol's 65,535.
const DELETE_CHUNK: usize = 1000;

/// The statement that forgets `rows` confirmed rows: `rows` ids, then
/// `rows` `(id, delta_ts)` pairs. Public so a test can EXPLAIN it.
///
/// It must lock only the rows it deletes: a full scan (EXPLAIN `type=ALL`)
/// waits on any row another session holds locked, such as the extension's
/// uncommitted INSERT of an unrelated bug, and every notification stalls
/// behind it. Measured on MariaDB 10.11, both plain forms go wrong: a
/// one-element `(id, delta_ts) IN ((?, ?))` becomes a row comparison that
/// never uses an index, and once a batch is more than about half the table
/// (every backlog), the optimizer prefers a full scan to a range for any
/// form, `(id = ? AND delta_ts = ?) OR …` included. So the `id IN` list
/// gives a range on the primary key and `FORCE INDEX` keeps it whatever the
/// table's size (an index hint needs the multi-table DELETE syntax). The
/// row-value list then keeps a row changed since it was read; the server
/// looks each row up in that sorted list (~7 µs a row at 1000), where an OR
/// chain would test every term (~30 µs a row).
pub fn delete_statement(rows: usize) -> String {
    let ids = vec!["?"; rows].join(", ");
    let pairs = vec!["(?, ?)"; rows].join(", ");
    format!(
        "DELETE p FROM push_notify p FORCE INDEX (PRIMARY) \
         WHERE p.id IN ({ids}) AND (p.id, p.delta_ts) IN ({pairs})"
    )
}

pub struct PushNotify<'a> {
    batch_size: usize,
    /// The last `id` of a full batch: in a backlog the next batch is read
    /// past it while that batch's confirms and DELETE are still pending.
    /// `None`: read from the start of the table.
    after: Option<i64>,
    /// The server takes `FOR UPDATE SKIP LOCKED` (MariaDB 10.6, MySQL 8.0
    /// on): a row another session holds is left, not waited for.
    skip_locked: bool,
    /// The table against `bugs.delta_ts`.
    audit: Audit,
    /// Where the audit counts what it finds.
    metrics: &'a Metrics,
}

/// What a batch needs once it is confirmed.
pub struct Rows {
    /// The rows it came from, as read.
    rows: Vec<Row>,
    /// Everything it published, from rows and from checks.
    published: Vec<Notification>,
}

/// One `push_notify` row as read.
struct Row {
    id: i64,
    delta_ts: Value,
    /// Its change; `None` for a row that holds none (it is deleted).
    change: Option<Notification>,
}

impl<'a> PushNotify<'a> {
    pub fn new(config: &PollerConfig, metrics: &'a Metrics) -> PushNotify<'a> {
        PushNotify {
            batch_size: config.batch_size,
            after: None,
            skip_locked: true,
            audit: Audit::new(config.overlap),
            metrics,
        }
    }
}

impl Source for PushNotify<'_> {
    type Connection = Conn;
    type Receipt = Rows;

    fn activated(&mut self, now: &ChangeTime, _took_over: bool) {
        self.audit.activated(now);
        // The table is the whole state: whatever a previous poller (or this
        // one, before it lost its connection) left unconfirmed is still
        // there, from the start.
        self.after = None;
    }

    fn reads_ahead(&self) -> bool {
        self.after.is_some()
    }

    fn read(&mut self, db: &mut Conn) -> Result<Batch<Rows>, mysql::Error> {
        // Before the rows: a row read below for a bug found here carries a
        // change made after the one found. Not while a backlog drains
        // (reading ahead): the audit is another read of the database that
        // shares the machine with the broker, and what waits for it loses
        // nothing, as the rows behind the backlog wait too (measured on a
        // 100,000-row backlog with the per-bug checks the audit replaced:
        // the drain went from 82 % to 92 % of the broker floor).
        let mut notifications = match self.after {
            Some(_) => Vec::new(),
            None => self.audit.missed(db, self.metrics)?,
        };
        const COLUMNS: &str = "SELECT id, bug_id, delta_ts, TIMESTAMPDIFF(SECOND, delta_ts, NOW()) \
             FROM push_notify";
        let rows: Vec<(Value, Value, Value, Option<i64>)> = match self.after {
            Some(after) => db.exec(
                format!("{COLUMNS} WHERE id > ? ORDER BY id LIMIT ?"),
                (after, self.batch_size),
            )?,
            None => db.exec(format!("{COLUMNS} ORDER BY id LIMIT ?"), (self.batch_size,))?,
        };
        let full = rows.len() == self.batch_size;
        self.audit.rows_read(rows.len());
        notifications.reserve(rows.len());
        let mut receipt = Vec::with_capacity(rows.len());
        let mut lag_secs = 0;
        for (id, bug, delta_ts, lag) in rows {
            // The primary key is an INT: anything else is no table of the
            // extension's, and `check` says so.
            let Ok(id) = mysql::from_value_opt::<i64>(id) else {
                continue;
            };
            lag_secs = lag_secs.max(lag.unwrap_or(0).max(0).unsigned_abs());
            let change = match (bug_id(&bug), change_time(&delta_ts)) {
                (Some(bug), Some(when)) => Some(Notification { bug, when }),
                // Deleted below without being published: it can never be,
                // and leaving it would keep it at the head of every batch.
                _ => {
                    if let Some(held) = INVALID_ROWS.allow() {
                        warn!(
                            "push_notify row id {id} has no valid bug_id/delta_ts ({bug:?}, \
                             {delta_ts:?}); deleting it{held}"
                        );
                    }
                    None
                }
            };
            notifications.extend(change.clone());
            receipt.push(Row {
                id,
                delta_ts,
                change,
            });
        }
        // Reading ahead skips a row whose id came from AUTO_INCREMENT before
        // a lower one committed, and a row updated after it was read; both
        // are read when the backlog ends and the next read starts over.
        self.after = if full {
            receipt.last().map(|row| row.id)
        } else {
            None
        };
        Ok(Batch {
            receipt: Rows {
                rows: receipt,
                published: notifications.clone(),
            },
            notifications,
            full,
            lag_secs,
        })
    }

    fn reset(&mut self) {
        self.after = None;
    }

    fn confirmed(
        &mut self,
        db: &mut Conn,
        Rows { rows, published }: Rows,
        kept: &HashSet<Notification>,
    ) -> Result<Vec<Notification>, mysql::Error> {
        // A kept change's row stays, for the read that sends it again: the
        // next read from the start of the table, when the backlog ends.
        let rows: Vec<Row> = rows
            .into_iter()
            .filter(|row| row.change.as_ref().is_none_or(|c| !kept.contains(c)))
            .collect();
        let mut deleted = 0;
        let mut held = Vec::new();
        for chunk in rows.chunks(DELETE_CHUNK) {
            let (gone, locked) = self.forget(db, chunk)?;
            deleted += gone;
            held.extend(locked.into_iter().filter_map(|row| row.change.clone()));
        }
        if deleted < rows.len() as u64 {
            // A row changed since it was read, and stays for its new
            // change, or another session holds it: read from the start
            // again rather than skip it until the backlog ends.
            self.after = None;
        }
        let forgotten = rows
            .iter()
            .filter_map(|row| row.change.as_ref())
            .filter(|n| !held.contains(n) && !kept.contains(n))
            .map(|n| n.bug);
        let taken = published.iter().filter(|n| !kept.contains(n));
        self.audit.handed_on(taken, forgotten);
        Ok(held)
    }
}

/// `error`, after rolling back the transaction on `db` if the server
/// answered it (the connection is alive); a dead connection is dropped by
/// the caller, which ends its transaction.
fn rolled_back(db: &mut Conn, error: mysql::Error) -> mysql::Error {
    if matches!(error, mysql::Error::MySqlError(_)) {
        let _ = db.query_drop("ROLLBACK");
    }
    error
}

impl PushNotify<'_> {
    /// Deletes the rows of `chunk` that are unchanged and that no other
    /// session holds locked: how many it deleted, and the rows it left
    /// because another session holds them. Such a row (an extension's
    /// transaction updating it, left open) is not waited for: every other
    /// row goes meanwhile, and it is tried again at the next poll.
    fn forget<'r>(
        &mut self,
        db: &mut Conn,
        chunk: &'r [Row],
    ) -> Result<(u64, Vec<&'r Row>), mysql::Error> {
        let ids: Vec<Value> = chunk.iter().map(|row| row.id.into()).collect();
        let pairs = |rows: &[&Row]| -> Vec<Value> {
            rows.iter()
                .map(|row| row.id.into())
                .chain(
                    rows.iter()
                        .flat_map(|row| [row.id.into(), row.delta_ts.clone()]),
                )
                .collect()
        };
        if !self.skip_locked {
            db.exec_drop(
                delete_statement(chunk.len()),
                pairs(&chunk.iter().collect::<Vec<_>>()),
            )?;
            return Ok((db.affected_rows(), Vec::new()));
        }
        // A transaction by hand: on a link that went silent, the mysql
        // crate's transaction would wait out a second I/O timeout rolling
        // back as it is dropped. The server rolls back a connection that
        // ends; one that answered with an error is rolled back here.
        db.query_drop("START TRANSACTION")?;
        let placeholders = vec!["?"; chunk.len()].join(", ");
        let locking = db.exec(
            format!(
                "SELECT id FROM push_notify WHERE id IN ({placeholders}) FOR UPDATE SKIP LOCKED"
            ),
            ids,
        );
        let free: HashSet<i64> = match locking {
            Ok(free) => free.into_iter().collect(),
            // ER_PARSE_ERROR, ER_NOT_SUPPORTED_YET: a server older than
            // SKIP LOCKED; its row locks are waited for, at most the bound
            // `database::connect` sets.
            Err(mysql::Error::MySqlError(e)) if e.code == 1064 || e.code == 1235 => {
                db.query_drop("ROLLBACK")?;
                debug!("the database has no SKIP LOCKED ({e}); deleting without it");
                self.skip_locked = false;
                return self.forget(db, chunk);
            }
            Err(e) => return Err(rolled_back(db, e)),
        };
        let (mine, locked): (Vec<&Row>, Vec<&Row>) =
            chunk.iter().partition(|row| free.contains(&row.id));
        let mut deleted = 0;
        if !mine.is_empty() {
            if let Err(e) = db.exec_drop(delete_statement(mine.len()), pairs(&mine)) {
                return Err(rolled_back(db, e));
            }
            deleted = db.affected_rows();
        }
        db.query_drop("COMMIT")?;
        Ok((deleted, locked))
    }
}
