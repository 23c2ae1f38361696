//! Source `push_notify`: the queue table of Mozilla's PushNotify extension.
//!
//! The extension keeps one row per bug and updates its `delta_ts` in place.
//! A poll reads the oldest rows; once the broker has confirmed them, each is
//! deleted only if it is unchanged (`id` and `delta_ts` both match), so a
//! change that lands between the read and the delete stays for the next
//! poll. In a backlog the next batch is read past the last `id` of the one
//! still in flight, so the two overlap. This source needs SELECT and DELETE on that one table and must
//! never write anything else.

use log::warn;
use mysql::prelude::Queryable;
use mysql::{Conn, Value};

use super::{Batch, Source};
use crate::config::PollerConfig;
use crate::database::{bug_id, change_time};
use crate::notification::{ChangeTime, Notification};

/// Rows per DELETE statement: two placeholders each, well under the
/// protocol's 65,535.
const DELETE_CHUNK: usize = 1000;

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
            // A row-constructor IN list, not `(id = ? AND delta_ts = ?) OR …`:
            // the server tests each row against the OR terms one by one
            // (quadratic in the chunk, ~30 µs per row at 1000), but looks it
            // up in the sorted IN list (~7 µs per row).
            let rows = vec!["(?, ?)"; chunk.len()].join(", ");
            let params: Vec<Value> = chunk
                .iter()
                .flat_map(|(id, delta_ts)| [id.clone(), delta_ts.clone()])
                .collect();
            db.exec_drop(
                format!("DELETE FROM push_notify WHERE (id, delta_ts) IN ({rows})"),
                params,
            )?;
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
