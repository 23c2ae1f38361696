//! The way from a source to the sink: read a batch, hand it over, wait
//! until the sink took it, and only then let the source forget it. In a
//! backlog several batches are in flight at once, settled and forgotten in
//! the order they were read. What the sink took but the source could not
//! forget (its confirm failed) is remembered, so that reading it again
//! hands nothing over twice. A change the sink refused (a broker's nack)
//! is kept by the source and sent again alone after a growing pause
//! ([`super::refusals`]), while every other change flows. This module
//! never decides when to poll or holds the lock: that is the poll loop's
//! ([`super`]).

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use log::{info, warn};

use super::refusals::Refusals;
use super::{Refused, Sink};
use crate::metrics::Metrics;
use crate::notification::{ChangeTime, Moment, Notification};
use crate::retry::{Backoff, Link};
use crate::shutdown::Shutdown;

/// How many batches stay sent and not yet settled while the next one is
/// read and sent, when the source reads ahead. The broker confirms at its
/// own pace; with one batch in flight it idled while the poller waited for
/// the last confirm of a batch and deleted its rows. 4 (4,000 messages at
/// the default batch size) drained 8,716 -> 12,556 rows/s against 1, back
/// to back; 8 was not clearly faster on the shared machine and leaves
/// twice as much to send again after a failure: see doc/benchmarks.md.
pub const IN_FLIGHT_BATCHES: usize = 4;
/// How many batches' worth of changes the sink took but the source could
/// not yet forget are remembered, so that they are not handed over (and
/// counted) again when read again: every batch in flight, the one just
/// sent and the one whose confirm failed. Past that, the memory starts
/// over: the sink may see a change twice, which it tolerates.
const HANDED_OVER_BATCHES: usize = IN_FLIGHT_BATCHES + 2;

/// What a source read in one poll: the notifications to publish, and what
/// it needs back to forget them once they are confirmed.
pub struct Batch<R> {
    pub notifications: Vec<Notification>,
    pub receipt: R,
    /// The source had more than one batch to give: poll again at once.
    pub full: bool,
    /// Age in seconds, on the database's clock, of the oldest change read.
    pub lag_secs: u64,
}

/// A place changes are read from, over a database connection. Each batch
/// is `read`, sent, settled, then `confirmed`; while batches are being
/// settled, the next ones may be read and sent, if the source can read past
/// them. Three implementations: `push_notify` and `bugs` on MariaDB, and
/// `push_notify` in the demo's memory.
pub trait Source {
    /// The connection it reads over.
    type Connection;
    /// What a batch needs back to be forgotten.
    type Receipt;

    /// This poller just took the lock. `now` is the database time of the
    /// lock attempt; `took_over` says another poller was active before it.
    fn activated(&mut self, now: &ChangeTime, took_over: bool);

    /// Whether `read` would now skip every batch not yet confirmed. If not,
    /// the poller settles what is in flight before it reads again.
    fn reads_ahead(&self) -> bool;

    fn read(&mut self, db: &mut Self::Connection) -> Result<Batch<Self::Receipt>, mysql::Error>;

    /// Every notification of the batch but the ones in `kept` is now the
    /// sink's: forget them. Keep those of `kept` (the sink refused them, or
    /// they wait to be sent again): a later read, and a read after a
    /// restart, must find them again. Answers the changes whose rows stay
    /// because another session holds them locked (they are tried again at
    /// the next poll).
    fn confirmed(
        &mut self,
        db: &mut Self::Connection,
        receipt: Self::Receipt,
        kept: &HashSet<Notification>,
    ) -> Result<Vec<Notification>, mysql::Error>;

    /// The batches in flight were not delivered: read them again.
    fn reset(&mut self);
}

/// Why a poll stopped short.
pub enum Failure<E> {
    /// The database failed: the connection, and the lock, are gone.
    Database(mysql::Error),
    /// The sink failed: nothing in flight counts as delivered.
    Sink(E),
}

impl<E> From<mysql::Error> for Failure<E> {
    fn from(e: mysql::Error) -> Self {
        Failure::Database(e)
    }
}

/// A batch sent to the sink, not yet settled and forgotten.
struct InFlight<P, R> {
    /// `None` when the batch had nothing to send (only rows to forget).
    pending: Option<P>,
    /// Every change the batch carries, sent now or before.
    notifications: Vec<Notification>,
    /// Its changes not sent, because they wait to be sent again after a
    /// refusal: the sink does not have them.
    withheld: Vec<Notification>,
    receipt: R,
    /// When its oldest change was made, on this process's clock.
    oldest: Instant,
}

/// A source, a sink, and the batches between them.
pub struct Pipeline<'a, S: Source, K: Sink> {
    pub source: S,
    pub sink: K,
    batch_size: usize,
    /// Poll batches and lag go here.
    metrics: &'a Metrics,
    /// Oldest first: settled and forgotten in the order they were read.
    in_flight: VecDeque<InFlight<K::Pending, S::Receipt>>,
    /// Changes the sink took whose rows the source has not forgotten yet
    /// (the confirm failed): read again, they are not handed over again.
    handed_over: HashSet<Notification>,
    /// The first change whose row another session held locked in the
    /// last pass over the source (the batches from a read at its start to
    /// one that was not full), and how many were: the sink has them, the
    /// rows stay. Per pass, not per batch: in batches of one, the batch
    /// after a locked row's has none, and the row is still locked.
    locked: Option<(Notification, usize)>,
    /// The changes of locked rows met so far in the pass under way.
    locked_in_pass: Vec<Notification>,
    /// The sink's state, logged when it changes.
    sink_link: Link<'static>,
    sink_backoff: Backoff,
    /// Changes the sink refused, waiting to be sent again.
    refusals: Refusals,
}

impl<'a, S: Source, K: Sink> Pipeline<'a, S, K> {
    pub fn new(source: S, sink: K, batch_size: usize, metrics: &'a Metrics) -> Self {
        let (kind, target) = sink.describe();
        Pipeline {
            source,
            sink,
            batch_size,
            metrics,
            in_flight: VecDeque::new(),
            handed_over: HashSet::new(),
            locked: None,
            locked_in_pass: Vec::new(),
            sink_link: Link::new(kind, target),
            sink_backoff: Backoff::default(),
            refusals: Refusals::new(),
        }
    }

    /// This poller took the lock at `now` on the database's clock, after
    /// another poller (`took_over`): the source starts over, and the sink
    /// learns that everything stamped from the lock on reaches it.
    pub fn activated(&mut self, now: &ChangeTime, took_over: bool, locked: Option<Moment>) {
        self.source.activated(now, took_over);
        self.sink.activated(locked);
    }

    /// A standby keeps its sink ready too: a wrong password or an outage
    /// shows now, not when it takes over.
    pub fn keep_sink_ready(&mut self) {
        match self.sink.idle() {
            Ok(()) => self.sink_up(),
            Err(e) => self.sink_down(&e),
        }
    }

    /// The sink failed: nothing in flight was forgotten, so all of it is
    /// read again, after the sink's backoff. `true` if shutdown came.
    pub fn sink_failed(&mut self, error: &K::Error, shutdown: &Shutdown) -> bool {
        self.in_flight.clear();
        self.source.reset();
        self.sink_down(error);
        self.sink_backoff.wait(shutdown)
    }

    /// Logs the sink down, naming where it is (a broker's node) now.
    fn sink_down(&mut self, error: &K::Error) {
        self.sink_link.retarget(self.sink.describe().1);
        self.sink_link.down(error);
    }

    /// The database failed: what the sink already has of the batches in
    /// flight is not handed over again by this poller. Another one that
    /// takes over reads those rows too and sends them again: a duplicate,
    /// never a loss.
    pub fn database_failed(&mut self) {
        for InFlight {
            pending,
            notifications,
            withheld,
            ..
        } in std::mem::take(&mut self.in_flight)
        {
            if let Some(pending) = pending
                && let Ok(refused) = self.sink.settle(pending)
            {
                let kept = self.note_refusals(refused, withheld);
                self.remember_handed_over(
                    notifications
                        .into_iter()
                        .filter(|n| !kept.contains(n))
                        .collect(),
                );
            }
        }
        self.source.reset();
    }

    /// Shutdown: finishes the batches in hand, in order. A sink failure
    /// is logged; only a database failure is returned.
    pub fn finish(&mut self, db: &mut S::Connection) -> Result<(), mysql::Error> {
        match self.settle_all(db) {
            Ok(()) => Ok(()),
            Err(Failure::Sink(e)) => {
                self.sink_down(&e);
                Ok(())
            }
            Err(Failure::Database(e)) => Err(e),
        }
    }

    /// Rows the last confirm left because another session holds them
    /// locked, as a sentence for the log and `/health`; `None` if none.
    pub fn lock_wait(&self) -> Option<String> {
        let (first, count) = self.locked.as_ref()?;
        let others = match count {
            1 => String::new(),
            n => format!(" and {} more", n - 1),
        };
        Some(format!(
            "the source row of bug {} (changed {}){others} is locked by another database \
             session; its change went out, and the row is forgotten once the session lets go",
            first.bug, first.when
        ))
    }

    fn remember_handed_over(&mut self, notifications: Vec<Notification>) {
        if self.handed_over.len() + notifications.len() > HANDED_OVER_BATCHES * self.batch_size {
            self.handed_over.clear();
        }
        self.handed_over.extend(notifications);
    }

    /// One poll: reads a batch and sends it, then settles the oldest batch
    /// in flight if more than [`IN_FLIGHT_BATCHES`] are, and every one if
    /// this batch ended a backlog. `Ok(true)`: the batch was full, poll
    /// again at once.
    ///
    /// In a backlog the steps overlap: batch N+k is read and sent while the
    /// sink still works on batches N to N+k-1; then N's confirms are
    /// awaited and its rows forgotten. The broker is the slowest part, and
    /// this way it never waits for the database, nor for the poller
    /// between two batches. Batches are still settled and forgotten in
    /// order, and none is forgotten before the sink took it.
    pub fn step(&mut self, db: &mut S::Connection) -> Result<bool, Failure<K::Error>> {
        if !self.source.reads_ahead() {
            self.settle_all(db)?;
        }
        let read_at = Instant::now();
        self.refusals.expire(read_at);
        let batch = self.source.read(db)?;
        let mut withheld = Vec::new();
        let fresh: Vec<Notification> = batch
            .notifications
            .iter()
            .filter(|n| !self.handed_over.contains(n))
            .filter(|n| {
                let waits = self.refusals.waiting(n, read_at);
                if waits {
                    withheld.push((*n).clone());
                }
                !waits
            })
            .cloned()
            .collect();
        let oldest = read_at
            .checked_sub(Duration::from_secs(batch.lag_secs))
            .unwrap_or(read_at);
        let pending = if fresh.is_empty() {
            // Nothing to send: the broker link is still checked, so an
            // outage or a wrong password shows while idle.
            self.sink.idle().map_err(Failure::Sink)?;
            self.sink_up();
            None
        } else {
            Some(self.sink.send(&fresh).map_err(Failure::Sink)?)
        };
        self.in_flight.push_back(InFlight {
            pending,
            notifications: batch.notifications,
            withheld,
            receipt: batch.receipt,
            oldest,
        });
        if batch.full {
            while self.in_flight.len() > IN_FLIGHT_BATCHES {
                let oldest = self.in_flight.pop_front();
                self.settle(db, oldest)?;
            }
        } else {
            // The backlog is drained: nothing stays in flight between polls,
            // and the pass is over.
            self.settle_all(db)?;
            let locked = std::mem::take(&mut self.locked_in_pass);
            self.locked = locked.first().map(|n| (n.clone(), locked.len()));
        }
        // The lag counts from the oldest change still in flight or, with
        // none, from this poll: it has seen everything older.
        self.metrics
            .poll_lag_from(self.in_flight.front().map_or(read_at, |f| f.oldest));
        Ok(batch.full)
    }

    fn sink_up(&mut self) {
        self.sink_link.retarget(self.sink.describe().1);
        self.sink_link.up();
        self.sink_backoff.reset();
    }

    /// Schedules what the sink `refused` to be sent again, and forgets the
    /// schedule of the changes it now took; logs when refusals start and
    /// when every refused change is taken. Answers what the source must
    /// keep: the refused changes and the `withheld` ones.
    fn note_refusals(
        &mut self,
        refused: Refused,
        withheld: Vec<Notification>,
    ) -> HashSet<Notification> {
        let now = Instant::now();
        if let Some(first) = refused.changes.first()
            && self.refusals.is_empty()
        {
            let (kind, target) = self.sink.describe();
            warn!(
                "{kind} {target}: refused {} change(s), the first of bug {} changed {}: {}. \
                 Each is sent again alone, after a pause growing to {} s; every other change \
                 keeps flowing",
                refused.changes.len(),
                first.bug,
                first.when,
                refused.why,
                super::refusals::MAX_PAUSE.as_secs()
            );
        }
        for change in &refused.changes {
            self.refusals.refused(change.clone(), now);
        }
        refused.changes.into_iter().chain(withheld).collect()
    }

    /// The sink took every change of `notifications` but the `kept` ones:
    /// none of those waits to be sent again any more.
    fn note_taken(&mut self, notifications: &[Notification], kept: &HashSet<Notification>) {
        if self.refusals.is_empty() {
            return;
        }
        for n in notifications.iter().filter(|n| !kept.contains(n)) {
            self.refusals.taken(n);
        }
        if self.refusals.is_empty() {
            let (kind, target) = self.sink.describe();
            info!("{kind} {target}: took every change it had refused");
        }
    }

    /// Settles every batch in flight, oldest first. On a failure the
    /// batches after the one that failed stay in flight.
    fn settle_all(&mut self, db: &mut S::Connection) -> Result<(), Failure<K::Error>> {
        while let Some(oldest) = self.in_flight.pop_front() {
            self.settle(db, Some(oldest))?;
        }
        Ok(())
    }

    /// Waits until the sink holds `in_flight`, then lets the source forget
    /// it. A sink failure forgets nothing.
    fn settle(
        &mut self,
        db: &mut S::Connection,
        in_flight: Option<InFlight<K::Pending, S::Receipt>>,
    ) -> Result<(), Failure<K::Error>> {
        let Some(InFlight {
            pending,
            notifications,
            withheld,
            receipt,
            ..
        }) = in_flight
        else {
            return Ok(());
        };
        let refused = match pending {
            Some(pending) => {
                let refused = self.sink.settle(pending).map_err(Failure::Sink)?;
                self.sink_up();
                self.metrics.poll_batches.fetch_add(1, Ordering::Relaxed);
                refused
            }
            None => Refused::default(),
        };
        let kept = self.note_refusals(refused, withheld);
        self.note_taken(&notifications, &kept);
        let locked = match self.source.confirmed(db, receipt, &kept) {
            Ok(locked) => locked,
            Err(e) => {
                self.remember_handed_over(
                    notifications
                        .into_iter()
                        .filter(|n| !kept.contains(n))
                        .collect(),
                );
                return Err(e.into());
            }
        };
        if !self.handed_over.is_empty() {
            for n in &notifications {
                self.handed_over.remove(n);
            }
        }
        // Their rows stay until the other session lets go: read again
        // meanwhile, they are not sent again.
        for n in &locked {
            if !self.locked_in_pass.contains(n) {
                self.locked_in_pass.push(n.clone());
            }
        }
        self.remember_handed_over(locked);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::database::Database;
    use super::super::memory;
    use super::super::refusals::Refusals;
    use super::*;
    use crate::notification::BugId;

    /// A sink that holds each batch until it is settled, fails the settle
    /// of the batches numbered in `fail` (from 1, in the order sent),
    /// refuses (nacks) the change of each bug of `refuse` that many times,
    /// and checks that no row was forgotten before the sink took its change.
    struct Scripted {
        table: memory::Table,
        rows: usize,
        fail: Vec<usize>,
        refuse: Vec<(u32, usize)>,
        sent: Vec<Vec<Notification>>,
        taken: Vec<Notification>,
        /// How many batches were sent before the first was settled.
        depth: Option<usize>,
        /// How many batches were sent when the first settle failed.
        sent_at_failure: Option<usize>,
    }

    impl Sink for Scripted {
        type Error = String;
        type Pending = (usize, Vec<Notification>);

        fn describe(&self) -> (&'static str, String) {
            ("test sink", String::new())
        }

        fn send(&mut self, batch: &[Notification]) -> Result<Self::Pending, String> {
            self.sent.push(batch.to_vec());
            Ok((self.sent.len(), batch.to_vec()))
        }

        fn settle(&mut self, (n, batch): Self::Pending) -> Result<Refused, String> {
            self.depth.get_or_insert(self.sent.len());
            let taken: HashSet<_> = self.taken.iter().map(|t| t.bug).collect();
            assert!(
                self.rows - self.table.rows() <= taken.len(),
                "a row was forgotten before the sink took its change"
            );
            if self.fail.contains(&n) {
                self.sent_at_failure.get_or_insert(self.sent.len());
                return Err(format!("batch {n} failed"));
            }
            // Refuses the changes of the bugs in `refuse` while each has
            // refusals left.
            let mut refused = Vec::new();
            for change in batch {
                match self
                    .refuse
                    .iter_mut()
                    .find(|(bug, _)| *bug == change.bug.get())
                {
                    Some((_, left)) if *left > 0 => {
                        *left -= 1;
                        refused.push(change);
                    }
                    _ => self.taken.push(change),
                }
            }
            Ok(Refused {
                changes: refused,
                why: "a full queue".into(),
            })
        }
    }

    /// The simulated source, whose `confirmed` fails on the calls numbered
    /// in `fail` (from 1) as a dropped connection would, forgetting nothing.
    struct FailingConfirm {
        inner: memory::PushNotify,
        fail: Vec<usize>,
        calls: usize,
    }

    impl Source for FailingConfirm {
        type Connection = memory::Connection;
        type Receipt = memory::Rows;

        fn activated(&mut self, now: &ChangeTime, took_over: bool) {
            self.inner.activated(now, took_over)
        }

        fn reads_ahead(&self) -> bool {
            self.inner.reads_ahead()
        }

        fn read(
            &mut self,
            db: &mut memory::Connection,
        ) -> Result<Batch<memory::Rows>, mysql::Error> {
            self.inner.read(db)
        }

        fn confirmed(
            &mut self,
            db: &mut memory::Connection,
            receipt: memory::Rows,
            kept: &HashSet<Notification>,
        ) -> Result<Vec<Notification>, mysql::Error> {
            self.calls += 1;
            if self.fail.contains(&self.calls) {
                return Err(mysql::Error::IoError(
                    std::io::ErrorKind::ConnectionReset.into(),
                ));
            }
            self.inner.confirmed(db, receipt, kept)
        }

        fn reset(&mut self) {
            self.inner.reset()
        }
    }

    /// Drains 20 rows in 3-row batches (several in flight at once), the
    /// sink failing to settle `sink_fails`, refusing `refuse` and the
    /// database failing to confirm `confirm_fails`, handling each failure
    /// as `work` does; returns the sink.
    fn drain_with_failures(
        sink_fails: Vec<usize>,
        refuse: Vec<(u32, usize)>,
        confirm_fails: Vec<usize>,
    ) -> Scripted {
        const ROWS: u32 = 20;
        let table = memory::Table::new();
        for bug in 1..=ROWS {
            let bug = BugId::new(bug).unwrap_or_else(|| panic!("{bug} is a bug id"));
            table.change(bug, ChangeTime::new("2026-01-01T00:00:01"));
        }
        let metrics = Metrics::new("test", 0, Default::default());
        let (_trigger, shutdown) = crate::shutdown::channel();
        let sink = Scripted {
            table: table.clone(),
            rows: ROWS as usize,
            fail: sink_fails,
            refuse,
            sent: Vec::new(),
            taken: Vec::new(),
            depth: None,
            sent_at_failure: None,
        };
        let source = FailingConfirm {
            inner: memory::PushNotify::new(3),
            fail: confirm_fails,
            calls: 0,
        };
        let mut pipeline = Pipeline::new(source, sink, 3, &metrics);
        pipeline.refusals = Refusals::with_first_pause(Duration::from_millis(20));
        let mut db = memory::Memory(&table)
            .connect()
            .unwrap_or_else(|e| panic!("{e}"));
        let mut polls = 0;
        // As `work`: at once after a full batch, else after a pause.
        while table.rows() > 0 || !pipeline.in_flight.is_empty() {
            polls += 1;
            assert!(polls < 10_000, "the backlog drains");
            match pipeline.step(&mut db) {
                Ok(true) => {}
                Ok(false) => std::thread::sleep(Duration::from_millis(1)),
                Err(Failure::Sink(e)) => {
                    pipeline.sink_failed(&e, &shutdown);
                }
                Err(Failure::Database(_)) => pipeline.database_failed(),
            }
        }
        assert!(
            pipeline.refusals.is_empty(),
            "every refused change was taken"
        );
        let taken: HashSet<_> = pipeline.sink.taken.iter().map(|n| n.bug.get()).collect();
        assert_eq!(taken, (1..=ROWS).collect(), "every change reaches the sink");
        assert_eq!(
            pipeline.sink.depth,
            Some(IN_FLIGHT_BATCHES + 1),
            "batches in flight"
        );
        pipeline.sink
    }

    #[test]
    fn a_failed_settle_of_one_batch_of_several_in_flight_reads_it_and_all_after_it_again() {
        let sink = drain_with_failures(vec![2], vec![], vec![]);
        // Batch 1 was taken and forgotten; batch 2 failed with the batches
        // behind it in flight: the next batch sent starts again at batch 2.
        let next = sink
            .sent_at_failure
            .unwrap_or_else(|| panic!("batch 2 failed"));
        assert!(next > 2, "batches were in flight behind batch 2");
        assert_eq!(sink.sent[next][0], sink.sent[1][0]);
    }

    #[test]
    fn a_failed_confirm_of_one_batch_of_several_in_flight_hands_over_nothing_twice() {
        let sink = drain_with_failures(vec![], vec![], vec![2]);
        // Batch 2's rows were not forgotten and those behind it were
        // abandoned: all are read again, and none is sent again.
        let sent = sink.sent.concat();
        assert_eq!(sent.len(), 20, "{sent:?}");
        assert_eq!(sink.taken.len(), 20, "{:?}", sink.taken);
    }

    #[test]
    fn a_refused_change_is_kept_and_sent_again_alone_while_the_others_flow() {
        // Bug 2's change is refused three times, bug 11's once.
        let sink = drain_with_failures(vec![], vec![(2, 3), (11, 1)], vec![]);
        let sends = |bug: u32| {
            sink.sent
                .iter()
                .flatten()
                .filter(|n| n.bug.get() == bug)
                .count()
        };
        // Sent again after each refusal, never while its pause lasted
        // (reads found its row all along), and alone: no other change of
        // its batch went out twice.
        assert_eq!(sends(2), 4);
        assert_eq!(sends(11), 2);
        for bug in (1..=20).filter(|b| ![2, 11].contains(b)) {
            assert_eq!(sends(bug), 1, "bug {bug}: the broker took it once");
        }
        assert_eq!(
            sink.taken.len(),
            20,
            "each change taken once: {:?}",
            sink.taken
        );
        // The others flowed while bug 2 waited: it was taken last.
        assert_eq!(sink.taken.last().map(|n| n.bug.get()), Some(2));
    }

    #[test]
    fn a_refused_change_survives_a_failed_settle_and_a_failed_confirm() {
        let sink = drain_with_failures(vec![3], vec![(2, 2)], vec![4]);
        let refused_sends = sink
            .sent
            .iter()
            .flatten()
            .filter(|n| n.bug.get() == 2)
            .count();
        assert!(
            refused_sends >= 3,
            "sent after each refusal: {refused_sends}"
        );
        assert!(sink.taken.iter().any(|n| n.bug.get() == 2));
    }
}
