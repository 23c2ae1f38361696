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
//! This source needs SELECT and DELETE on that one table and must never
//! write anything else.

use log::warn;
use mysql::prelude::Queryable;
use mysql::{Conn, Value};

use super::{Batch, Source};
use crate::config::PollerConfig;
use crate::database::{bug_id, change_time};
use crate::notification::{ChangeTime, Notification};

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
    after: Option<Value>,
}

/// The rows a batch came from, as read: `(id, delta_ts)`.
pub struct Rows(Vec<(Value, Value)>);

impl PushNotify {
    pub fn new(config: &PollerConfig) -> PushNotify {
        PushNotify {
            batch_size: config.batch_size,
            after: None,
        }
    }
}

impl Source for PushNotify {
    type Receipt = Rows;

    fn activated(&mut self, _now: &ChangeTime, _took_over: bool) {
        // The table is the whole state: whatever a previous poller (or this
        // one, before it lost its connection) left unconfirmed is still
        // there, from the start.
        self.after = None;
    }

    fn reads_ahead(&self) -> bool {
        self.after.is_some()
    }

    fn read(&mut self, db: &mut Conn) -> Result<Batch<Rows>, mysql::Error> {
        const COLUMNS: &str = "SELECT id, bug_id, delta_ts, TIMESTAMPDIFF(SECOND, delta_ts, NOW()) \
             FROM push_notify";
        let rows: Vec<(Value, Value, Value, Option<i64>)> = match &self.after {
            Some(after) => db.exec(
                format!("{COLUMNS} WHERE id > ? ORDER BY id LIMIT ?"),
                (after.clone(), self.batch_size),
            )?,
            None => db.exec(format!("{COLUMNS} ORDER BY id LIMIT ?"), (self.batch_size,))?,
        };
        let full = rows.len() == self.batch_size;
        // Reading ahead skips a row whose id came from AUTO_INCREMENT before
        // a lower one committed, and a row updated after it was read; both
        // are read when the backlog ends and the next read starts over.
        self.after = if full {
            rows.last().map(|(id, ..)| id.clone())
        } else {
            None
        };
        let mut notifications = Vec::with_capacity(rows.len());
        let mut receipt = Vec::with_capacity(rows.len());
        let mut lag_secs = 0;
        for (id, bug, delta_ts, lag) in rows {
            lag_secs = lag_secs.max(lag.unwrap_or(0).max(0).unsigned_abs());
            match (bug_id(&bug), change_time(&delta_ts)) {
                (Some(bug), Some(when)) => notifications.push(Notification { bug, when }),
                // Deleted below without being published: it can never be,
                // and leaving it would keep it at the head of every batch.
                _ => warn!(
                    "push_notify row id {id:?} has no valid bug_id/delta_ts ({bug:?}, {delta_ts:?}); deleting it"
                ),
            }
            receipt.push((id, delta_ts));
        }
        Ok(Batch {
            notifications,
            receipt: Rows(receipt),
            full,
            lag_secs,
        })
    }

    fn reset(&mut self) {
        self.after = None;
    }

    fn confirmed(&mut self, db: &mut Conn, Rows(rows): Rows) -> Result<(), mysql::Error> {
        let mut deleted = 0;
        for chunk in rows.chunks(DELETE_CHUNK) {
            let params: Vec<Value> = chunk
                .iter()
                .map(|(id, _)| id.clone())
                .chain(
                    chunk
                        .iter()
                        .flat_map(|(id, delta_ts)| [id.clone(), delta_ts.clone()]),
                )
                .collect();
            db.exec_drop(delete_statement(chunk.len()), params)?;
            deleted += db.affected_rows();
        }
        if deleted < rows.len() as u64 {
            // A row changed since it was read, and stays for its new
            // change: read from the start again rather than skip it until
            // the backlog ends.
            self.after = None;
        }
        Ok(())
    }
}
