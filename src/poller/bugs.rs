//! Source `bugs`: stock Bugzilla, no extension, read-only.
//!
//! Bugzilla stamps `bugs.delta_ts` on every change. Each poll reads the
//! changes stamped at or after `watermark - overlap`, where the watermark is
//! the database's own clock at the previous poll, and suppresses the
//! `(bug, delta_ts)` pairs it already published within that window. The
//! overlap catches transactions that commit after the second they stamped.
//!
//! The watermark survives a restart in a [`WatermarkFile`], saved after each
//! confirmed poll: a start or a takeover replays from it, at most the
//! replay limit back (and says what a cap skipped). With no state it starts
//! one overlap before the database's current time, so a takeover within the
//! overlap loses nothing. This source must never write to the database.

use std::collections::HashSet;

use log::{info, warn};
use mysql::Conn;
use mysql::prelude::Queryable;

use super::pipeline::{Batch, Source};
use super::watermark::{WatermarkFile, is_datetime};
use crate::config::PollerConfig;
use crate::database::{bug_id, change_time};
use crate::metrics::Metrics;
use crate::notification::{ChangeTime, Notification};

/// How far back a change the sink keeps refusing may hold the watermark,
/// in seconds. Every poll reads again everything stamped since it, and a
/// restart replays it all: past this the change is given up (said once).
/// Only the queue that refuses lacks it, full by its own policy (a nack
/// goes out for a queue that refused, while every other queue took it).
const KEPT_HOLD_SECS: i64 = 600;

pub struct Bugs<'a> {
    batch_size: usize,
    overlap_secs: u64,
    /// Database time of the last poll that published everything it read.
    watermark: Option<ChangeTime>,
    /// What was published (confirmed) within the current window.
    published: HashSet<Notification>,
    /// Where the watermark is kept across restarts, if anywhere.
    state: Option<WatermarkFile>,
    replay_limit_secs: u64,
    /// A saved watermark to resume from, checked against the replay limit
    /// on the next read (which has the database at hand).
    resume: Option<ChangeTime>,
    /// The source is the default, not chosen, and nobody looked yet for a
    /// PushNotify table an upgraded install may still rely on.
    look_for_push_notify: bool,
    /// Where `/health`'s warnings go.
    metrics: &'a Metrics,
    /// Changes kept at a confirm (the sink refused them, or they wait to
    /// be sent again): the watermark stays at the oldest, so that every
    /// read, and a restart, finds them, until they are taken or the bug
    /// changes again.
    kept: HashSet<Notification>,
    /// How much further back than one overlap reads go after taking over
    /// from a poller that let go of the lock for want of a broker: it
    /// published nothing for up to its grace first. Zero without a broker.
    takeover_lookback_secs: u64,
    /// That extra look back, until a read leaves nothing in the window.
    lookback_secs: u64,
}

/// What a batch needs to be remembered once confirmed.
pub struct Window {
    published: Vec<Notification>,
    /// Everything in the window, published now or earlier.
    seen: HashSet<Notification>,
    /// The new watermark, when this batch leaves nothing in the window.
    complete_at: Option<ChangeTime>,
}

impl<'a> Bugs<'a> {
    pub fn new(config: &PollerConfig, metrics: &'a Metrics) -> Bugs<'a> {
        Bugs {
            batch_size: config.batch_size,
            overlap_secs: config.overlap.as_secs().max(1),
            watermark: None,
            published: HashSet::new(),
            state: config
                .state_directory
                .as_deref()
                .map(|dir| WatermarkFile::new(dir, &config.lock_name)),
            replay_limit_secs: config.replay_limit.as_secs().max(1),
            resume: None,
            look_for_push_notify: !config.source_given,
            metrics,
            kept: HashSet::new(),
            // The grace, and an overlap for the time between the other
            // poller's last confirm and the lock changing hands.
            takeover_lookback_secs: config
                .broker_grace
                .map_or(0, |grace| grace.as_secs() + config.overlap.as_secs()),
            lookback_secs: 0,
        }
    }

    /// Moves the watermark back to `saved` (from the state file), but not
    /// past the replay limit; says what it does.
    fn resume_from(&mut self, db: &mut Conn, saved: ChangeTime) -> Result<(), mysql::Error> {
        const FORMAT: &str = "'%Y-%m-%dT%H:%i:%s'";
        let row: Option<(String, String, Option<String>, Option<String>)> = db.exec_first(
            format!(
                "SELECT DATE_FORMAT(NOW(), {FORMAT}), \
                 DATE_FORMAT(NOW() - INTERVAL ? SECOND, {FORMAT}), \
                 DATE_FORMAT(STR_TO_DATE(?, {FORMAT}) - INTERVAL ? SECOND, {FORMAT}), \
                 DATE_FORMAT(NOW() - INTERVAL ? SECOND, {FORMAT})"
            ),
            (
                self.replay_limit_secs,
                saved.as_str(),
                self.overlap_secs,
                self.replay_limit_secs + self.overlap_secs,
            ),
        )?;
        let Some((now, cap, saved_from, cap_from)) = row else {
            return Ok(());
        };
        if !is_datetime(&now) || !is_datetime(&cap) {
            return Ok(());
        }
        // Same fixed-width form: text order is time order.
        let start = if saved.as_str() < cap.as_str() {
            warn!(
                "the saved watermark {saved} is older than BZPUSH_REPLAY_LIMIT allows: \
                 changes stamped from {} to {} are not replayed; clients that need them \
                 must refresh from Bugzilla",
                saved_from.unwrap_or_default(),
                cap_from.unwrap_or_default()
            );
            ChangeTime::new(cap)
        } else if saved.as_str() < now.as_str() {
            info!(
                "resuming from the saved watermark {saved}: replaying changes stamped since {}",
                saved_from.unwrap_or_default()
            );
            saved
        } else {
            // Saved "in the future": the database's clock went back.
            ChangeTime::new(now)
        };
        if self.watermark.as_ref().is_none_or(|w| start < *w) {
            self.watermark = Some(start);
        }
        Ok(())
    }
}

/// Whether this account can read the PushNotify extension's table while
/// the source is `bugs` by default: before this version the default was
/// `push_notify`, and an install upgraded without `BZPUSH_SOURCE` now reads
/// `bugs` and no longer empties that table. Nothing is lost either way (the
/// `bugs` table has every change); it is said, and the operator chooses.
/// A table this account may not read (the README's one grant on `bugs`
/// answers "denied" whether or not it exists) is none it ever emptied.
pub fn push_notify_left_alone(db: &mut Conn) -> bool {
    db.query_drop("SELECT 1 FROM push_notify LIMIT 0").is_ok()
}

/// What `check` and the poller say about a PushNotify table that source
/// `bugs`, the default, leaves alone.
pub const PUSH_NOTIFY_LEFT_ALONE: &str = "this database has the PushNotify extension's table \
    push_notify, and BZPUSH_SOURCE is not set, so bzpush reads the bugs table (the default \
    since this version; it was push_notify before) and leaves push_notify alone. Set \
    BZPUSH_SOURCE=push_notify to read it as before, or BZPUSH_SOURCE=bugs to keep this and \
    say so (the extension can then be removed)";

impl Bugs<'_> {
    /// Gives up the kept changes stamped more than [`KEPT_HOLD_SECS`]
    /// before `now`: they no longer hold the watermark back.
    fn give_up_kept_before(&mut self, now: &ChangeTime) {
        let Some(oldest_held) = now.at().map(|at| at.plus_secs(-KEPT_HOLD_SECS)) else {
            return;
        };
        let (kept, given_up): (HashSet<Notification>, HashSet<Notification>) =
            std::mem::take(&mut self.kept)
                .into_iter()
                .partition(|n| n.when.at().is_none_or(|at| at >= oldest_held));
        self.kept = kept;
        if let Some(oldest) = given_up.iter().min_by(|a, b| a.when.cmp(&b.when)) {
            warn!(
                "gave up sending {} refused change(s) again, the oldest of bug {} changed {}: \
                 the broker refused them for {} s (every queue but the refusing one has them); \
                 the watermark moves on",
                given_up.len(),
                oldest.bug,
                oldest.when,
                KEPT_HOLD_SECS
            );
        }
    }
}

impl Source for Bugs<'_> {
    type Connection = Conn;
    type Receipt = Window;

    fn activated(&mut self, now: &ChangeTime, took_over: bool) {
        // With no state, a fresh start begins now (no replay of history),
        // reading one overlap back. After another
        // poller was active, begin where it stopped: it was alive at `now`,
        // and the overlap covers what it read but had not yet published.
        // Reconnecting with nobody else active keeps our own watermark.
        // The state file may know of an earlier watermark: this poller's
        // own from before a restart, or one that another poller sharing the
        // state directory saved.
        if took_over || self.watermark.is_none() {
            self.watermark = Some(now.clone());
            self.resume = self.state.as_ref().and_then(WatermarkFile::load);
        }
        self.lookback_secs = if took_over {
            self.takeover_lookback_secs
        } else {
            0
        };
    }

    fn reads_ahead(&self) -> bool {
        // What a read finds depends on what was confirmed before it.
        false
    }

    fn reset(&mut self) {
        // Nothing moves before a confirm, so nothing is to be undone.
    }

    fn read(&mut self, db: &mut Conn) -> Result<Batch<Window>, mysql::Error> {
        if std::mem::take(&mut self.look_for_push_notify) && push_notify_left_alone(db) {
            warn!("{PUSH_NOTIFY_LEFT_ALONE}");
            self.metrics
                .warning("source", Some(PUSH_NOTIFY_LEFT_ALONE.to_string()));
        }
        if let Some(saved) = self.resume.clone() {
            self.resume_from(db, saved)?;
            self.resume = None;
        }
        let now: Option<String> =
            db.query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%dT%H:%i:%s')")?;
        let now = ChangeTime::new(now.unwrap_or_default());
        let watermark = self.watermark.clone().unwrap_or_else(|| now.clone());
        let rows: Vec<(mysql::Value, mysql::Value, Option<i64>)> = db.exec(
            "SELECT bug_id, delta_ts, TIMESTAMPDIFF(SECOND, delta_ts, NOW()) FROM bugs \
             WHERE delta_ts >= STR_TO_DATE(?, '%Y-%m-%dT%H:%i:%s') - INTERVAL ? SECOND \
             ORDER BY delta_ts, bug_id",
            (watermark.as_str(), self.overlap_secs + self.lookback_secs),
        )?;
        let in_window: Vec<(Notification, i64)> = rows
            .iter()
            .filter_map(|(bug, delta_ts, lag)| {
                let notification = Notification {
                    bug: bug_id(bug)?,
                    when: change_time(delta_ts)?,
                };
                Some((notification, lag.unwrap_or(0)))
            })
            .collect();
        let seen: HashSet<Notification> = in_window.iter().map(|(n, _)| n.clone()).collect();
        let (mut fresh, lags): (Vec<Notification>, Vec<i64>) = in_window
            .into_iter()
            .filter(|(n, _)| !self.published.contains(n))
            .unzip();
        // Rows come oldest first.
        let lag_secs = lags.first().map_or(0, |lag| lag.max(&0).unsigned_abs());
        // A kept change is read again at each poll until the sink takes it:
        // it never takes the place of a new one.
        let limit = self.batch_size + fresh.iter().filter(|n| self.kept.contains(n)).count();
        let full = fresh.len() > limit;
        fresh.truncate(limit);
        Ok(Batch {
            notifications: fresh.clone(),
            receipt: Window {
                published: fresh,
                seen,
                complete_at: (!full).then_some(now),
            },
            full,
            lag_secs,
        })
    }

    fn confirmed(
        &mut self,
        _db: &mut Conn,
        window: Window,
        kept: &HashSet<Notification>,
    ) -> Result<Vec<Notification>, mysql::Error> {
        for n in window.published {
            if kept.contains(&n) {
                self.kept.insert(n);
            } else {
                self.kept.remove(&n);
                self.published.insert(n);
            }
        }
        if let Some(now) = window.complete_at {
            // A pair that fell out of this window never comes back into a
            // later one: forget it. A kept pair no longer there was
            // overwritten by a later change of its bug, which goes out.
            self.published.retain(|n| window.seen.contains(n));
            self.kept.retain(|n| window.seen.contains(n));
            self.give_up_kept_before(&now);
            // Same fixed-width form: text order is time order.
            let watermark = self
                .kept
                .iter()
                .map(|n| &n.when)
                .chain([&now])
                .min_by_key(|when| when.as_str())
                .cloned()
                .unwrap_or(now);
            if let Some(state) = &mut self.state {
                state.save(&watermark);
                self.metrics.warning("watermark", state.failing());
            }
            self.watermark = Some(watermark);
            self.lookback_secs = 0;
        }
        // Only read, never locked: nothing stays.
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_config;
    use super::*;
    use crate::notification::BugId;

    fn change(bug: u32, when: &str) -> Notification {
        Notification {
            bug: BugId::new(bug).expect("a bug id"),
            when: ChangeTime::new(when),
        }
    }

    #[test]
    fn a_change_refused_for_longer_than_the_hold_is_given_up() {
        let metrics = Metrics::default();
        let mut bugs = Bugs::new(&test_config("bugs"), &metrics);
        // Now 12:00:00; the hold reaches back to 11:50:00.
        let (old, recent) = (
            change(1, "2026-12-06T11:49:59"),
            change(2, "2026-12-06T11:50:00"),
        );
        bugs.kept.extend([old.clone(), recent.clone()]);
        bugs.give_up_kept_before(&ChangeTime::new("2026-12-06T12:00:00"));
        assert!(!bugs.kept.contains(&old));
        assert!(bugs.kept.contains(&recent));
    }
}
