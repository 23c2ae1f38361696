//! The audit of source `push_notify` against `bugs.delta_ts`, the source
//! of truth (SPEC §3.1).
//!
//! Bugzilla moves `bugs.delta_ts` on every change; the PushNotify
//! extension writes a row for most of them, but not all: BMO's variant
//! writes nothing until its `enable_simple_push` parameter is on, admin
//! pages that write `bugs.delta_ts` with plain SQL (deleting a milestone or
//! a user) write no row, and the extension loses a change when the poller
//! deletes a bug's row between the extension's read of the row id and its
//! update by that id. So at each poll the audit reads the bugs changed
//! lately, in one snapshot with their `push_notify` rows, and a change that
//! no row carries and that was not handed on is published from here,
//! counted by its likely cause, and said once per cause.
//!
//! Owns the memory of what was handed on lately and why a change was
//! missed; it reads `bugs` and `push_notify` and writes nothing.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{debug, warn};
use mysql::prelude::Queryable;
use mysql::{Conn, Value};

use crate::database::{bug_id, change_time};
use crate::metrics::{Metrics, MissedBy};
use crate::notification::{BugId, ChangeTime, Notification};

/// Rows one audit reads at most: a mass update (an admin SQL statement
/// touching every bug) is audited over several polls, oldest first.
const ROWS_PER_AUDIT: usize = 10_000;

/// MariaDB's answers for a table or column the user may not read, or that
/// does not exist: retrying cannot cure them.
const REFUSALS: [u16; 4] = [
    1142, // ER_TABLEACCESS_DENIED_ERROR
    1143, // ER_COLUMNACCESS_DENIED_ERROR
    1146, // ER_NO_SUCH_TABLE
    1054, // ER_BAD_FIELD_ERROR
];

pub struct Audit {
    overlap_secs: i64,
    /// The database's time at the last audit: the next one reads changes
    /// stamped from one overlap before it (late commits are stamped
    /// earlier than they become visible). `None` before the first.
    mark: Option<ChangeTime>,
    /// The database's time at which this poller took the lock: what was
    /// stamped before it, another poller (or this one before a restart)
    /// handed on; the first audit takes it as done.
    activated: Option<ChangeTime>,
    /// The latest time handed on for each bug, while it is in the window.
    handed_on: HashMap<BugId, ChangeTime>,
    /// When this poller last forgot each bug's row, for one overlap.
    forgotten: HashMap<BugId, Instant>,
    /// Rows the source read since it took the lock: none at all while
    /// bugs change means the extension writes nothing.
    rows_seen: u64,
    /// The audit may not read `bugs`: off until the next activation.
    refused: bool,
    /// The causes already said in the log.
    said: [bool; MissedBy::ALL.len()],
    /// What the last audit found and the sink has not taken yet: found
    /// again by the next one if the sink failed, whatever the window.
    unconfirmed: Vec<Notification>,
}

impl Audit {
    pub fn new(overlap: Duration) -> Audit {
        Audit {
            overlap_secs: i64::try_from(overlap.as_secs().max(1)).unwrap_or(i64::MAX),
            mark: None,
            activated: None,
            handed_on: HashMap::new(),
            forgotten: HashMap::new(),
            rows_seen: 0,
            refused: false,
            said: [false; MissedBy::ALL.len()],
            unconfirmed: Vec::new(),
        }
    }

    /// This poller took the lock at `now` on the database's clock.
    pub fn activated(&mut self, now: &ChangeTime) {
        self.mark = None;
        self.activated = Some(now.clone());
        self.handed_on.clear();
        self.rows_seen = 0;
        self.refused = false;
    }

    /// The source read `rows` rows.
    pub fn rows_read(&mut self, rows: usize) {
        self.rows_seen += rows as u64;
    }

    /// The sink took `published`, from rows whose bugs are `forgotten` or
    /// from this audit.
    pub fn handed_on<'n>(
        &mut self,
        published: impl Iterator<Item = &'n Notification>,
        forgotten: impl Iterator<Item = BugId>,
    ) {
        for n in published {
            let latest = self
                .handed_on
                .entry(n.bug)
                .or_insert_with(|| n.when.clone());
            if n.when > *latest {
                *latest = n.when.clone();
            }
        }
        let now = Instant::now();
        self.forgotten.extend(forgotten.map(|bug| (bug, now)));
        let handed_on = &self.handed_on;
        self.unconfirmed
            .retain(|n| handed_on.get(&n.bug).is_none_or(|t| *t < n.when));
    }

    /// The changes of `bugs` that no row carries and that were not handed
    /// on: to publish now, before the rows this poll reads.
    pub fn missed(
        &mut self,
        db: &mut Conn,
        metrics: &Metrics,
    ) -> Result<Vec<Notification>, mysql::Error> {
        if self.refused {
            return Ok(Vec::new());
        }
        if self.rows_seen > 0 && self.said[MissedBy::NoRows as usize] {
            // The extension writes now: that warning is over.
            metrics.warning(MissedBy::NoRows.label(), None);
        }
        let Some(now) =
            db.query_first::<String, _>("SELECT DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s')")?
        else {
            return Ok(Vec::new());
        };
        let now = ChangeTime::new(now);
        let from = self
            .mark
            .clone()
            .or_else(|| self.activated.clone())
            .unwrap_or_else(|| now.clone());
        let rows: Vec<(Value, Value, Value)> = match db.exec(
            "SELECT b.bug_id, b.delta_ts, p.delta_ts FROM bugs b \
             LEFT JOIN push_notify p ON p.bug_id = b.bug_id \
             WHERE b.delta_ts >= STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s') - INTERVAL ? SECOND \
             ORDER BY b.delta_ts LIMIT ?",
            (from.as_str(), self.overlap_secs, ROWS_PER_AUDIT),
        ) {
            Ok(rows) => rows,
            Err(mysql::Error::MySqlError(e)) if REFUSALS.contains(&e.code) => {
                warn!(
                    "cannot read bugs.bug_id and bugs.delta_ts ({e}); going on without the \
                     audit that catches changes the PushNotify extension writes no row for. \
                     Fix: GRANT SELECT (bug_id, delta_ts) ON bugs TO the poller's user"
                );
                self.refused = true;
                return Ok(Vec::new());
            }
            Err(e) => return Err(e),
        };
        let truncated = rows.len() == ROWS_PER_AUDIT;
        let first = self.mark.is_none();
        let mut missed = std::mem::take(&mut self.unconfirmed);
        let again = missed.len();
        for (bug, delta_ts, row) in &rows {
            let (Some(bug), Some(when)) = (bug_id(bug), change_time(delta_ts)) else {
                continue;
            };
            if self.handed_on.get(&bug).is_some_and(|t| *t >= when) {
                continue;
            }
            // Its row carries this change or a later one: the read after
            // this hands it on.
            if change_time(row).is_some_and(|t| t >= when) {
                continue;
            }
            // The first audit after taking the lock: what was stamped before
            // it, the poller before this one handed on.
            if first && self.activated.as_ref().is_some_and(|a| when < *a) {
                self.handed_on.insert(bug, when);
                continue;
            }
            let change = Notification { bug, when };
            if !missed.contains(&change) {
                missed.push(change);
            }
        }
        for n in &missed[again..] {
            self.count(n, metrics);
        }
        self.unconfirmed.clone_from(&missed);
        self.mark = match (truncated, rows.last()) {
            (true, Some((_, delta_ts, _))) => change_time(delta_ts).or(Some(now)),
            _ => Some(now),
        };
        self.forget_old();
        Ok(missed)
    }

    /// Counts a change published from the audit under its likely cause,
    /// and says each cause once.
    fn count(&mut self, missed: &Notification, metrics: &Metrics) {
        let cause = if self.rows_seen == 0 {
            MissedBy::NoRows
        } else if self.forgotten.contains_key(&missed.bug) {
            MissedBy::Race
        } else {
            MissedBy::PlainSql
        };
        metrics.missed[cause as usize].fetch_add(1, Ordering::Relaxed);
        debug!(
            "bug {} changed at {} with no push_notify row: publishing it ({})",
            missed.bug,
            missed.when,
            cause.label()
        );
        if !std::mem::replace(&mut self.said[cause as usize], true) {
            metrics.warning(
                cause.label(),
                Some(format!(
                    "changes with no push_notify row are published from bugs.delta_ts \
                     (bzpush_missed_changes_total{{cause=\"{}\"}}): {}",
                    cause.label(),
                    cause.reason()
                )),
            );
            warn!(
                "bug {} changed at {} and no push_notify row carries it: publishing it from \
                 bugs.delta_ts. {} Changes like it are published the same way and counted \
                 in bzpush_missed_changes_total{{cause=\"{}\"}}",
                missed.bug,
                missed.when,
                cause.reason(),
                cause.label()
            );
        }
    }

    /// What left the window: it never comes back into a later audit.
    fn forget_old(&mut self) {
        let window = Duration::from_secs(self.overlap_secs.unsigned_abs());
        self.forgotten.retain(|_, at| at.elapsed() <= window);
        let Some(oldest) = self
            .mark
            .as_ref()
            .and_then(ChangeTime::at)
            .map(|m| m.plus_secs(-self.overlap_secs))
        else {
            return;
        };
        self.handed_on
            .retain(|_, when| when.at().is_none_or(|at| at >= oldest));
    }
}

impl MissedBy {
    fn reason(self) -> &'static str {
        match self {
            MissedBy::NoRows => {
                "The PushNotify extension has written no row since this poller started: is \
                 it installed and enabled? (BMO's ZPushNotify writes nothing until its \
                 enable_simple_push parameter is on.) Or set BZPUSH_SOURCE=bugs, which \
                 needs no extension."
            }
            MissedBy::Race => {
                "The extension lost it: this poller deleted the bug's row between the \
                 extension's read of the row and its update (a known race of the extension)."
            }
            MissedBy::PlainSql => {
                "Likely written by plain SQL, which the extension never sees: Bugzilla's \
                 admin pages do that when deleting a milestone or a user."
            }
        }
    }
}
