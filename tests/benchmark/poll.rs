//! Group `poll`: `bzpush poll` with the `push_notify` source.
//!
//! - throughput: a backlog of [`BACKLOG`] rows, drained into the broker
//!   with publisher confirms and deleted, from the poller's start until the
//!   table is empty and the consumer has every bug. Fresh database, exchange
//!   and process per run.
//! - lag: single changes committed at random moments while the poller runs
//!   at its default interval; lag is the consumer's arrival time minus the
//!   writer's commit time, both taken in this process.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::common::{AMQP_ADDR, Bzpush, MYSQL_ADDR, TestBroker, TestDb};
use crate::{Row, quantile};

const BACKLOG: u32 = 100_000;
const RUNS: usize = 3;
const BATCH_SIZES: &[usize] = &[1000, 5000];
const TARGET_ROWS_PER_SEC: f64 = 20_000.0;

/// The default `BZPUSH_POLL_INTERVAL`.
const INTERVAL: Duration = Duration::from_secs(1);
const LAG_SAMPLES: usize = 80;
const LAG_GAP_MS: (u64, u64) = (50, 400);
/// What polling may add to the interval/2 a fixed-rate poll costs on average.
const LAG_OVERHEAD: Duration = Duration::from_millis(20);

/// Generous bounds, so a broken poller fails the run instead of hanging it.
const DRAIN_DEADLINE: Duration = Duration::from_secs(120);
const ARRIVAL_DEADLINE: Duration = Duration::from_secs(20);

pub fn run() -> Vec<Row> {
    let mut rows: Vec<Row> = BATCH_SIZES.iter().map(|&b| throughput(b)).collect();
    rows.push(lag());
    rows
}

/// The settings every scenario gives the poller; `extra` wins.
fn poller(db: &TestDb, broker: &TestBroker, extra: &[(&str, String)]) -> Bzpush {
    let mut env = vec![
        (
            "BZPUSH_POLL_INTERVAL",
            format!("{}ms", INTERVAL.as_millis()),
        ),
        ("BZPUSH_LOG", "warn".to_string()),
    ];
    env.extend(extra.iter().cloned());
    Bzpush::poll(db, MYSQL_ADDR, AMQP_ADDR, &broker.exchange, &env)
}

fn throughput(batch_size: usize) -> Row {
    let mut rates: Vec<f64> = (1..=RUNS)
        .map(|run| {
            let rate = drain_backlog(batch_size);
            eprintln!("throughput, batch {batch_size}, run {run}/{RUNS}: {rate:.0} rows/s");
            rate
        })
        .collect();
    let runs = rates
        .iter()
        .map(|r| crate::thousands(*r))
        .collect::<Vec<_>>()
        .join(" / ");
    rates.sort_by(f64::total_cmp);
    let median = quantile(&rates, 0.5);
    Row {
        scenario: format!("throughput ({}k-row backlog)", BACKLOG / 1000),
        setting: format!("BZPUSH_BATCH_SIZE={batch_size}"),
        center: format!("{} rows/s", crate::thousands(median)),
        spread: format!("runs: {runs}"),
        target: format!(">= {} rows/s", crate::thousands(TARGET_ROWS_PER_SEC)),
        met: Some(median >= TARGET_ROWS_PER_SEC),
    }
}

/// One run: rows per second from the poller's start until every bug has
/// arrived and the table is empty.
fn drain_backlog(batch_size: usize) -> f64 {
    let db = TestDb::new();
    db.push_notify_backlog(1..BACKLOG + 1, "2026-11-28 02:04:50");
    let broker = TestBroker::new();
    let mut seen = vec![false; BACKLOG as usize + 1];
    let mut distinct = 0;
    let mut messages = 0u64;

    let start = Instant::now();
    let deadline = start + DRAIN_DEADLINE;
    let _poller = poller(
        &db,
        &broker,
        &[("BZPUSH_BATCH_SIZE", batch_size.to_string())],
    );
    while distinct < BACKLOG {
        let message = broker
            .recv(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|| {
                panic!("only {distinct} of {BACKLOG} bugs arrived within {DRAIN_DEADLINE:?}")
            });
        messages += 1;
        let bug: usize = message.routing_key.parse().expect("a numeric routing key");
        if !std::mem::replace(&mut seen[bug], true) {
            distinct += 1;
        }
    }
    let all_arrived = start.elapsed();
    let mut conn = db.conn();
    let emptied =
        crate::common::wait_until(deadline.saturating_duration_since(Instant::now()), || {
            use mysql::prelude::Queryable;
            let left: Option<u64> = conn
                .query_first("SELECT COUNT(*) FROM push_notify")
                .expect("count");
            left == Some(0)
        });
    assert!(emptied, "push_notify not empty within {DRAIN_DEADLINE:?}");
    let elapsed = start.elapsed();
    eprintln!(
        "  {messages} messages ({} duplicates); all arrived after {:.2} s, table empty after {:.2} s",
        messages - u64::from(BACKLOG),
        all_arrived.as_secs_f64(),
        elapsed.as_secs_f64()
    );
    f64::from(BACKLOG) / elapsed.as_secs_f64()
}

/// Commit-to-arrival lag of single changes at the default interval.
///
/// The poller polls at a fixed rate, so a change waits for the next poll:
/// uniformly between 0 and one interval, whatever the rest costs. With a few
/// dozen truly random commit moments the sample median of that wait alone
/// would scatter by ±60 ms from run to run. So the commit moments are
/// stratified: their phases modulo the interval fill an even grid of
/// [`LAG_SAMPLES`] slots (in random order, with random gaps of 50–400 ms
/// where a free slot allows it). Whatever the poller's own phase, the waits
/// then form that same even grid, and what the percentiles measure beyond
/// it is the poller's real cost.
///
/// A lag can come out below zero: InnoDB makes a commit visible before it
/// flushes its log and answers the writer, so a poll can read a change
/// before the writer's COMMIT returns. Such a lag counts as zero.
fn lag() -> Row {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let _poller = poller(&db, &broker, &[]);
    let mut conn = db.conn();

    // Warm-up: the poller connects to the broker at its first publish.
    TestDb::push_notify_change(&mut conn, 1, None);
    let first = broker.recv(ARRIVAL_DEADLINE);
    assert!(first.is_some(), "the warm-up change never arrived");

    let mut rng = XorShift::seeded();
    let schedule = stratified_schedule(&mut rng);
    let base = Instant::now() + Duration::from_millis(100);
    let mut committed: HashMap<String, Instant> = HashMap::new();
    for (i, offset) in schedule.iter().enumerate() {
        std::thread::sleep((base + *offset).saturating_duration_since(Instant::now()));
        let bug = 1000 + i as u32;
        TestDb::push_notify_change(&mut conn, bug, None);
        committed.insert(bug.to_string(), Instant::now());
    }

    let mut lags: Vec<Duration> = Vec::with_capacity(LAG_SAMPLES);
    let mut arrived: HashMap<String, ()> = HashMap::new();
    while lags.len() < LAG_SAMPLES {
        let message = broker.recv(ARRIVAL_DEADLINE).unwrap_or_else(|| {
            panic!(
                "only {} of {LAG_SAMPLES} changes arrived within {ARRIVAL_DEADLINE:?} of each other",
                lags.len()
            )
        });
        let Some(commit) = committed.get(&message.routing_key) else {
            continue;
        };
        if arrived.insert(message.routing_key.clone(), ()).is_none() {
            lags.push(message.at.saturating_duration_since(*commit));
        }
    }
    lags.sort();
    let ms = |d: Duration| format!("{:.0} ms", d.as_secs_f64() * 1000.0);
    let p50 = quantile(&lags, 0.5);
    let target = INTERVAL / 2 + LAG_OVERHEAD;
    let mean = lags.iter().sum::<Duration>() / lags.len() as u32;
    eprintln!(
        "lag: {LAG_SAMPLES} samples over {:.1} s; min {}, mean {}, p50 {}, max {}",
        schedule.last().map_or(0.0, |d| d.as_secs_f64()),
        ms(lags[0]),
        ms(mean),
        ms(p50),
        ms(*lags.last().expect("samples"))
    );
    Row {
        scenario: format!("lag, commit → consumer ({LAG_SAMPLES} changes)"),
        setting: format!("BZPUSH_POLL_INTERVAL={}s (default)", INTERVAL.as_secs()),
        center: format!("p50 {}", ms(p50)),
        spread: format!(
            "p90 {} / p99 {} (max {})",
            ms(quantile(&lags, 0.9)),
            ms(quantile(&lags, 0.99)),
            ms(*lags.last().expect("samples"))
        ),
        target: format!("p50 <= {}", ms(target)),
        met: Some(p50 <= target),
    }
}

/// Commit moments, as offsets from the start, whose phases modulo
/// [`INTERVAL`] are the slots of an even grid, each used once.
fn stratified_schedule(rng: &mut XorShift) -> Vec<Duration> {
    let interval = INTERVAL.as_micros() as u64;
    let slot = interval / LAG_SAMPLES as u64;
    let (min_gap, max_gap) = (LAG_GAP_MS.0 * 1000, LAG_GAP_MS.1 * 1000);
    let mut free: Vec<u64> = (0..LAG_SAMPLES as u64).map(|j| j * slot).collect();
    let mut now = free.swap_remove(rng.below(free.len()));
    let mut schedule = vec![Duration::from_micros(now)];
    while !free.is_empty() {
        // How far ahead each free slot is, at least the smallest gap.
        let ahead = |phase: u64| {
            let d = (phase + interval - now % interval) % interval;
            if d < min_gap { d + interval } else { d }
        };
        let fits: Vec<usize> = (0..free.len())
            .filter(|&i| ahead(free[i]) <= max_gap)
            .collect();
        let pick = if fits.is_empty() {
            (0..free.len())
                .min_by_key(|&i| ahead(free[i]))
                .expect("a free slot")
        } else {
            fits[rng.below(fits.len())]
        };
        let gap = ahead(free.swap_remove(pick));
        now += gap;
        schedule.push(Duration::from_micros(now));
    }
    schedule
}

/// A small PRNG: the schedule needs variety, not quality.
struct XorShift(u64);

impl XorShift {
    fn seeded() -> XorShift {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        XorShift(nanos | 1)
    }

    /// A number in `0..n`.
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}
