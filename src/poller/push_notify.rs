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
//! The extension itself loses a change when a row is deleted between its
//! read of the row id and its update by that id; for one overlap after a
//! delete the bug's `bugs.delta_ts` is checked ([`Recheck`]), which needs
//! SELECT on `bugs (bug_id, delta_ts)`. This source needs SELECT and DELETE
//! on `push_notify` and must never write anything else.

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use log::{debug, warn};
use mysql::prelude::Queryable;
use mysql::{Conn, Value};

use super::pipeline::{Batch, Source};
use super::recheck::Recheck;
use crate::config::PollerConfig;
use crate::database::{bug_id, change_time};
use crate::logging::Throttle;
use crate::notification::{BugId, ChangeTime, Notification};

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

pub struct PushNotify {
    batch_size: usize,
    /// The last `id` of a full batch: in a backlog the next batch is read
    /// past it while that batch's confirms and DELETE are still pending.
    /// `None`: read from the start of the table.
    after: Option<i64>,
    /// The server takes `FOR UPDATE SKIP LOCKED` (MariaDB 10.6, MySQL 8.0
    /// on): a row another session holds is left, not waited for.
    skip_locked: bool,
    /// Bugs whose row was deleted lately, checked against `bugs.delta_ts`.
    recheck: Recheck,
    /// The checks failed for want of a privilege (or of the table): off
    /// until the next activation.
    recheck_refused: bool,
    /// That was said once; it is not said again.
    recheck_warned: bool,
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

/// MariaDB's answers for a table or column the user may not read, or that
/// does not exist: retrying cannot cure them.
const REFUSALS: [u16; 4] = [
    1142, // ER_TABLEACCESS_DENIED_ERROR
    1143, // ER_COLUMNACCESS_DENIED_ERROR
    1146, // ER_NO_SUCH_TABLE
    1054, // ER_BAD_FIELD_ERROR
];

/// Bugs per check statement, like [`DELETE_CHUNK`].
const RECHECK_CHUNK: usize = 1000;
/// Checks made in one poll at most. After a backlog every drained row's
/// bug falls due within the same second: with a budget of one batch (500
/// at `--batch-size 500`), a 20,000-row backlog kept a bug changed after it
/// waiting 48 to over 90 s for its check, past its window.
const RECHECKS_PER_POLL: usize = 10 * RECHECK_CHUNK;

impl PushNotify {
    pub fn new(config: &PollerConfig) -> PushNotify {
        PushNotify {
            batch_size: config.batch_size,
            after: None,
            skip_locked: true,
            recheck: Recheck::new(config.overlap),
            recheck_refused: false,
            recheck_warned: false,
        }
    }

    /// The changes the extension lost that `bugs.delta_ts` still shows: for
    /// each bug due for a check, a later time than the one published, when
    /// no row is there to carry it. One statement per chunk reads both
    /// tables in one snapshot, by primary key and unique index: a change
    /// that did land in `push_notify` committed its row with its
    /// `delta_ts`, and goes out from the row.
    ///
    /// None while a backlog drains (the last read was full): a check is
    /// another lookup per row on the database that shares the machine with
    /// the broker, and checks that wait lose nothing, as the rows behind
    /// the backlog wait too. They run when it ends, at most
    /// [`RECHECKS_PER_POLL`] a poll, the longest due first (measured on a
    /// 100,000-row backlog: the drain went from 82 % to 92 % of the broker
    /// floor, back to back).
    fn rechecked(&mut self, db: &mut Conn) -> Result<Vec<Notification>, mysql::Error> {
        if self.recheck_refused || self.after.is_some() {
            return Ok(Vec::new());
        }
        let due = self.recheck.due(Instant::now(), RECHECKS_PER_POLL);
        let mut found = Vec::new();
        for chunk in due.chunks(RECHECK_CHUNK) {
            let ids = vec!["?"; chunk.len()].join(", ");
            let params: Vec<Value> = chunk.iter().map(|(bug, _)| bug.get().into()).collect();
            let rows: Vec<(Value, Value)> = match db.exec(
                format!(
                    "SELECT b.bug_id, b.delta_ts FROM bugs b WHERE b.bug_id IN ({ids}) \
                     AND NOT EXISTS (SELECT 1 FROM push_notify p WHERE p.bug_id = b.bug_id)"
                ),
                params,
            ) {
                Ok(rows) => rows,
                Err(mysql::Error::MySqlError(e)) if REFUSALS.contains(&e.code) => {
                    if !self.recheck_warned {
                        warn!(
                            "cannot read bugs.bug_id and bugs.delta_ts ({e}); going on without \
                             the check that catches changes the PushNotify extension loses when \
                             a row is deleted under it. Fix: GRANT SELECT (bug_id, delta_ts) ON \
                             bugs TO the poller's user, and restart it"
                        );
                        self.recheck_warned = true;
                    }
                    self.recheck_refused = true;
                    self.recheck.clear();
                    return Ok(Vec::new());
                }
                Err(e) => return Err(e),
            };
            let published: HashMap<BugId, &ChangeTime> =
                chunk.iter().map(|(bug, when)| (*bug, when)).collect();
            for (bug, delta_ts) in rows {
                let (Some(bug), Some(when)) = (bug_id(&bug), change_time(&delta_ts)) else {
                    continue;
                };
                // Both in the database's fixed-width form: text order is
                // time order.
                if published.get(&bug).is_some_and(|last| when > **last) {
                    self.recheck.found(bug);
                    found.push(Notification { bug, when });
                }
            }
        }
        Ok(found)
    }
}

impl Source for PushNotify {
    type Connection = Conn;
    type Receipt = Rows;

    fn activated(&mut self, _now: &ChangeTime, _took_over: bool) {
        // What a check found and sent before the connection went is looked
        // for again; a privilege granted since is tried.
        self.recheck.reset(Instant::now());
        self.recheck_refused = false;
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
        // change made after the one found.
        let mut notifications = self.rechecked(db)?;
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
        self.recheck.reset(Instant::now());
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
        if !self.recheck_refused {
            let now = Instant::now();
            for Notification { bug, when } in published.into_iter().filter(|n| !kept.contains(n)) {
                self.recheck.watch(bug, when, now);
            }
        }
        Ok(held)
    }
}

impl PushNotify {
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
        let mut tx = db.start_transaction(mysql::TxOpts::default())?;
        let placeholders = vec!["?"; chunk.len()].join(", ");
        let free: Result<Vec<i64>, _> = tx.exec(
            format!(
                "SELECT id FROM push_notify WHERE id IN ({placeholders}) FOR UPDATE SKIP LOCKED"
            ),
            ids,
        );
        let free: HashSet<i64> = match free {
            Ok(free) => free.into_iter().collect(),
            // ER_PARSE_ERROR, ER_NOT_SUPPORTED_YET: a server older than
            // SKIP LOCKED; its row locks are waited for, at most the bound
            // `database::connect` sets.
            Err(mysql::Error::MySqlError(e)) if e.code == 1064 || e.code == 1235 => {
                drop(tx);
                debug!("the database has no SKIP LOCKED ({e}); deleting without it");
                self.skip_locked = false;
                return self.forget(db, chunk);
            }
            Err(e) => return Err(e),
        };
        let (mine, locked): (Vec<&Row>, Vec<&Row>) =
            chunk.iter().partition(|row| free.contains(&row.id));
        let mut deleted = 0;
        if !mine.is_empty() {
            tx.exec_drop(delete_statement(mine.len()), pairs(&mine))?;
            deleted = tx.affected_rows();
        }
        tx.commit()?;
        Ok((deleted, locked))
    }
}
