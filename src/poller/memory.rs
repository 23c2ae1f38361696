//! A simulated Bugzilla database in memory, for `bzpush demo` without a
//! database server: a `push_notify` table the demo's simulator writes
//! as Mozilla's PushNotify extension does, and the poller lock, both
//! behind one mutex shared with the simulator's thread.
//!
//! The poller reads it through [`PushNotify`], with the semantics of the
//! real source: batches in `id` order, read ahead past a full batch still
//! in flight, each row forgotten once confirmed only if unchanged since it
//! was read. What the real source needs beyond that does not arise here:
//! a change and its row are one step under the mutex, so none is lost
//! between them (no check against `bugs`), and nothing here fails.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use super::database::{Database, LockAttempt, Session};
use super::pipeline::{Batch, Source};
use super::state::LockHolder;
use crate::notification::{BugId, ChangeTime, Notification};
use crate::pulse::rfc3339_utc;

/// The simulated database; clones share it.
#[derive(Clone, Default)]
pub struct Table(Arc<Mutex<Tables>>);

#[derive(Default)]
struct Tables {
    /// `push_notify` by `id`: one row per bug.
    push_notify: BTreeMap<u64, Row>,
    /// The last `id` given, as by AUTO_INCREMENT.
    last_id: u64,
    /// The connection holding the poller lock.
    lock: Option<u64>,
    /// The last connection id given.
    last_connection: u64,
}

struct Row {
    bug: BugId,
    delta_ts: ChangeTime,
    /// When it was written, for the poller's lag.
    written: Instant,
}

impl Table {
    pub fn new() -> Table {
        Table::default()
    }

    /// A change of `bug` made at `when`, recorded as the PushNotify
    /// extension does: the bug's row takes the new `delta_ts` in place, or
    /// a new row is added with the next `id`.
    pub fn change(&self, bug: BugId, when: ChangeTime) {
        let mut tables = self.lock();
        let tables = &mut *tables;
        let written = Instant::now();
        match tables.push_notify.values_mut().find(|row| row.bug == bug) {
            Some(row) => {
                row.delta_ts = when;
                row.written = written;
            }
            None => {
                tables.last_id += 1;
                let row = Row {
                    bug,
                    delta_ts: when,
                    written,
                };
                tables.push_notify.insert(tables.last_id, row);
            }
        }
    }

    /// The rows not yet forgotten.
    #[cfg(test)]
    pub(super) fn rows(&self) -> usize {
        self.lock().push_notify.len()
    }

    fn lock(&self) -> MutexGuard<'_, Tables> {
        // Every change under the lock is one assignment or insertion: a
        // panic elsewhere leaves the tables whole.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The simulated database, as the poller connects to it.
pub(super) struct Memory<'a>(pub(super) &'a Table);

impl Database for Memory<'_> {
    type Session = Connection;

    fn describe(&self) -> String {
        "in memory (simulated)".into()
    }

    fn connect(&self) -> Result<Connection, mysql::Error> {
        let mut tables = self.0.lock();
        tables.last_connection += 1;
        Ok(Connection {
            table: self.0.clone(),
            id: tables.last_connection,
        })
    }

    fn refusal(&self, _error: &mysql::Error) -> Option<String> {
        None
    }
}

/// A connection to the simulated database: the lock it holds goes when
/// it is dropped, as a server's does.
pub(super) struct Connection {
    table: Table,
    id: u64,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut tables = self.table.lock();
        if tables.lock == Some(self.id) {
            tables.lock = None;
        }
    }
}

impl Session for Connection {
    fn try_lock(&mut self, _name: &str, wait_secs: u32) -> Result<LockAttempt, mysql::Error> {
        // Like GET_LOCK, a lock held by another waits a while before the
        // answer, so that a standby does not spin.
        let mut waited = false;
        loop {
            let holder = *self.table.lock().lock.get_or_insert(self.id);
            if holder == self.id || waited {
                let now = rfc3339_utc(SystemTime::now());
                return Ok(LockAttempt {
                    taken: holder == self.id,
                    now: ChangeTime::new(now.get(..19).unwrap_or(&now)),
                    holder: Some(holder),
                });
            }
            thread::sleep(Duration::from_secs(wait_secs.into()));
            waited = true;
        }
    }

    fn connection_id(&mut self) -> Result<Option<u64>, mysql::Error> {
        Ok(Some(self.id))
    }

    fn lock_holder(&mut self, id: u64) -> LockHolder {
        // No host: nothing to tell one process's connections from another's.
        LockHolder {
            connection: id,
            host: None,
        }
    }

    fn oldest_change_after(
        &mut self,
        _mark: &ChangeTime,
    ) -> Result<Option<Duration>, mysql::Error> {
        // One process, always active: it never owes as a standby.
        Ok(None)
    }

    fn end_connection(&mut self, id: u64) -> Result<(), mysql::Error> {
        let mut tables = self.table.lock();
        if tables.lock == Some(id) {
            tables.lock = None;
        }
        Ok(())
    }
}

/// Source `push_notify` on the simulated table.
pub(super) struct PushNotify {
    batch_size: usize,
    /// The last `id` of a full batch still in flight: the next batch is
    /// read past it. `None`: from the start of the table.
    after: Option<u64>,
}

/// A batch's rows as read: `(id, delta_ts)`.
pub(super) struct Rows(Vec<(u64, ChangeTime)>);

impl PushNotify {
    pub(super) fn new(batch_size: usize) -> PushNotify {
        PushNotify {
            batch_size,
            after: None,
        }
    }
}

impl Source for PushNotify {
    type Connection = Connection;
    type Receipt = Rows;

    fn activated(&mut self, _now: &ChangeTime, _took_over: bool) {
        self.after = None;
    }

    fn reads_ahead(&self) -> bool {
        self.after.is_some()
    }

    fn read(&mut self, db: &mut Connection) -> Result<Batch<Rows>, mysql::Error> {
        let tables = db.table.lock();
        let start = self.after.map_or(0, |id| id + 1);
        let now = Instant::now();
        let mut notifications = Vec::new();
        let mut rows = Vec::new();
        let mut lag_secs = 0;
        for (&id, row) in tables.push_notify.range(start..).take(self.batch_size) {
            lag_secs = lag_secs.max(now.saturating_duration_since(row.written).as_secs());
            notifications.push(Notification {
                bug: row.bug,
                when: row.delta_ts.clone(),
            });
            rows.push((id, row.delta_ts.clone()));
        }
        let full = rows.len() == self.batch_size;
        self.after = if full {
            rows.last().map(|(id, _)| *id)
        } else {
            None
        };
        Ok(Batch {
            notifications,
            receipt: Rows(rows),
            full,
            lag_secs,
        })
    }

    fn confirmed(
        &mut self,
        db: &mut Connection,
        Rows(rows): Rows,
        kept: &HashSet<Notification>,
    ) -> Result<Vec<Notification>, mysql::Error> {
        let mut tables = db.table.lock();
        let mut changed = false;
        for (id, delta_ts) in rows {
            // Compared as text, as the real DELETE compares the column.
            let Some(row) = tables.push_notify.get(&id) else {
                changed = true;
                continue;
            };
            let unchanged = row.delta_ts.as_str() == delta_ts.as_str();
            let change = Notification {
                bug: row.bug,
                when: delta_ts,
            };
            // A kept change's row stays, for the read that sends it again
            // when the backlog ends.
            if kept.contains(&change) {
                continue;
            }
            if unchanged {
                tables.push_notify.remove(&id);
            } else {
                changed = true;
            }
        }
        if changed {
            // A row changed since it was read stays for its new change:
            // read from the start again rather than skip it.
            self.after = None;
        }
        // One mutex, held only for a step: no row is ever held.
        Ok(Vec::new())
    }

    fn reset(&mut self) {
        self.after = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bug(n: u32) -> BugId {
        BugId::new(n).unwrap_or_else(|| panic!("{n} is a bug id"))
    }

    fn read(source: &mut PushNotify, db: &mut Connection) -> Batch<Rows> {
        source.read(db).unwrap_or_else(|e| panic!("{e}"))
    }

    /// One row per bug updated in place; a batch in `id` order; a
    /// confirmed row is forgotten unless it changed since it was read,
    /// and then it is read again.
    #[test]
    fn rows_are_forgotten_only_when_unchanged() {
        let table = Table::new();
        let mut db = Memory(&table).connect().unwrap_or_else(|e| panic!("{e}"));
        let mut source = PushNotify::new(2);
        let t1 = ChangeTime::new("2026-01-01T00:00:01");
        let t2 = ChangeTime::new("2026-01-01T00:00:02");
        table.change(bug(7), t1.clone());
        table.change(bug(3), t1.clone());
        table.change(bug(7), t2.clone());
        table.change(bug(5), t2.clone());
        assert_eq!(table.rows(), 3);

        let first = read(&mut source, &mut db);
        assert!(first.full);
        let bugs: Vec<u32> = first.notifications.iter().map(|n| n.bug.get()).collect();
        assert_eq!(bugs, [7, 3]);
        assert_eq!(first.notifications[0].when, t2);
        // Read ahead past the batch in flight.
        assert!(source.reads_ahead());
        let second = read(&mut source, &mut db);
        assert!(!second.full);
        assert_eq!(second.notifications.len(), 1);

        // Bug 3 changes after it was read: its row stays.
        let t3 = ChangeTime::new("2026-01-01T00:00:03");
        table.change(bug(3), t3.clone());
        source
            .confirmed(&mut db, first.receipt, &HashSet::new())
            .unwrap_or_else(|e| panic!("{e}"));
        source
            .confirmed(&mut db, second.receipt, &HashSet::new())
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(table.rows(), 1);
        let again = read(&mut source, &mut db);
        assert_eq!(again.notifications.len(), 1);
        assert_eq!(again.notifications[0].bug, bug(3));
        assert_eq!(again.notifications[0].when, t3);
    }

    /// The lock is one connection's until it is dropped.
    #[test]
    fn the_lock_goes_with_its_connection() {
        let table = Table::new();
        let memory = Memory(&table);
        let connect = || memory.connect().unwrap_or_else(|e| panic!("{e}"));
        let (mut first, mut second) = (connect(), connect());
        let lock = |c: &mut Connection| c.try_lock("l", 0).unwrap_or_else(|e| panic!("{e}"));
        assert!(lock(&mut first).taken);
        let attempt = lock(&mut second);
        assert_eq!((attempt.taken, attempt.holder), (false, Some(first.id)));
        assert_eq!(attempt.now.as_str().len(), 19, "{attempt:?}");
        drop(first);
        assert!(lock(&mut second).taken);
    }
}
