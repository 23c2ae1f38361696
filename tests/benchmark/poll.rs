//! Group `poll`: `bzpush poll` with the `push_notify` source.
//!
//! - throughput: a backlog of [`BACKLOG`] rows, drained into the broker
//!   with publisher confirms and deleted, from the poller's start until the
//!   table is empty and the broker has every bug: waiting in a queue nobody
//!   consumes (as when Pulse's consumers run on other machines), or taken
//!   by a consumer in this process, on the same two cores. Fresh database,
//!   exchange and process per run.
//! - lag: single changes committed at random moments while the poller runs
//!   at its default interval; lag is the consumer's arrival time minus the
//!   writer's commit time, both taken in this process.

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bzpush::config::AmqpUrl;
use bzpush::notification::{BugId, ChangeTime, Notification};
use bzpush::pulse::Publisher;
use lapin::message::Delivery;

use crate::{AMQP_ADDR, Broker, Bzpush, MYSQL_ADDR, Rng, TestDb};
use crate::{Row, quantile};

const BACKLOG: u32 = 100_000;
const RUNS: usize = 5;
const BATCH_SIZES: &[usize] = &[1000, 5000];
/// The drain's target, as a share of the broker floor measured in the
/// same run: the broker, not the poller, is this machine's limit.
const TARGET_OF_FLOOR: f64 = 0.9;

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
    // `-- poll drain`: only the drain at the default batch size, each run
    // beside its floor run, for a quick comparison on a busy machine.
    if std::env::args().skip(1).any(|a| a == "drain") {
        return vec![throughput(1000, Consumer::None)];
    }
    let mut rows = vec![broker_floor(), throughput(1000, Consumer::None)];
    rows.extend(
        BATCH_SIZES
            .iter()
            .map(|&b| throughput(b, Consumer::SameCores)),
    );
    rows.push(lag());
    rows
}

/// A run's exchange, and what this process's consumer received, if it has
/// one.
type TestBroker = Broker<Arrival>;

/// A message as this process's consumer received it.
struct Arrival {
    /// When the consumer got it from the broker.
    at: Instant,
    routing_key: String,
}

impl Arrival {
    fn of(delivery: Delivery) -> Arrival {
        Arrival {
            at: Instant::now(),
            routing_key: delivery.routing_key.to_string(),
        }
    }
}

/// Who takes the messages off the broker while the backlog drains.
#[derive(Clone, Copy)]
enum Consumer {
    /// Nobody: they wait in a queue, counted at the end. Pulse consumers
    /// run elsewhere; here they would share the two cores with the broker,
    /// the poller and the database.
    None,
    /// This process, on the same two cores.
    SameCores,
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

/// Each run drains right after a run of the broker floor, and is
/// reported as a share of it: the machine is shared, and its load moves
/// between runs more than the poller's own cost does.
fn throughput(batch_size: usize, consumer: Consumer) -> Row {
    let (rates, shares): (Vec<f64>, Vec<f64>) = (1..=RUNS)
        .map(|run| {
            let floor = floor_once(run);
            let rate = drain_backlog(batch_size, consumer);
            eprintln!(
                "throughput, batch {batch_size}, run {run}/{RUNS}: {rate:.0} rows/s, \
                 {:.0} % of the floor's {floor:.0} just before",
                100.0 * rate / floor
            );
            (rate, rate / floor)
        })
        .unzip();
    let (median, runs) = median_and_runs(rates);
    let share = {
        let mut s = shares.clone();
        s.sort_by(f64::total_cmp);
        quantile(&s, 0.5)
    };
    let shares = shares
        .iter()
        .map(|s| format!("{:.0} %", 100.0 * s))
        .collect::<Vec<_>>()
        .join(" / ");
    let who = match consumer {
        Consumer::None => "queued, no consumer",
        Consumer::SameCores => "a consumer on the same cores",
    };
    Row {
        scenario: format!("throughput ({}k-row backlog), {who}", BACKLOG / 1000),
        setting: format!("BZPUSH_BATCH_SIZE={batch_size}"),
        center: format!(
            "{:.0} % of the floor (median), {} rows/s",
            100.0 * share,
            crate::thousands(median)
        ),
        spread: format!("runs: {runs} rows/s = {shares} of the floor run just before"),
        // The floor has no consumer: a row with one carries its cost too,
        // and is there for comparison.
        target: match consumer {
            Consumer::None => format!(">= {:.0} % of the broker floor", 100.0 * TARGET_OF_FLOOR),
            Consumer::SameCores => "– (the floor has no consumer)".into(),
        },
        met: matches!(consumer, Consumer::None).then_some(share >= TARGET_OF_FLOOR),
    }
}

/// One run: rows per second from the moment the whole backlog is in
/// `push_notify` to the moment the broker holds every bug (waiting in the
/// queue, or taken by the consumer), as the floor is timed from its first
/// publish to its last confirm.
///
/// The poller starts first, on an empty table, and is active and
/// connected to the broker when the backlog appears, all at once (one
/// statement, one commit): the floor's publisher too is connected before
/// its clock starts. Until 2026-12-01 the clock started before the
/// process, and the end was found by a `COUNT(*)` of the table every 20
/// ms, a scan of up to 100,000 rows that took MariaDB CPU from the two
/// cores the broker needs; the broker's count is cheap. The table must
/// still empty (every row deleted after its confirm), untimed.
fn drain_backlog(batch_size: usize, consumer: Consumer) -> f64 {
    use mysql::prelude::Queryable;
    let db = TestDb::new();
    db.push_notify_backlog(1..BACKLOG + 1, "2026-11-28 02:04:50");
    let mut conn = db.conn();
    conn.query_drop("RENAME TABLE push_notify TO backlog")
        .expect("set the backlog aside");
    conn.query_drop("CREATE TABLE push_notify LIKE backlog")
        .expect("an empty push_notify");
    // A queue nobody consumes holds the messages, and costs the broker no
    // deliveries; or this process consumes them.
    let (broker, queue) = match consumer {
        Consumer::None => {
            let (broker, _, queue) = TestBroker::with_queue();
            (broker, Some(queue))
        }
        Consumer::SameCores => (TestBroker::consuming(Arrival::of), None),
    };
    let queued = || broker.ready_in(queue.as_deref().expect("a queue nobody consumes"));
    let poller = poller(
        &db,
        &broker,
        &[
            ("BZPUSH_BATCH_SIZE", batch_size.to_string()),
            // A backlog is read batch after batch without waiting; the
            // interval is only how soon the idle poller sees it appear.
            ("BZPUSH_POLL_INTERVAL", "10ms".to_string()),
        ],
    );
    assert!(
        poller
            .wait_for_notice("STATUS=active", ARRIVAL_DEADLINE)
            .is_some(),
        "the poller did not become active"
    );
    // Its idle polls connect to the broker and declare the exchange.
    std::thread::sleep(Duration::from_secs(1));
    let bzpush = CpuClock::of_pid(Some(poller.pid().to_string()));
    let (rabbit, maria) = (
        CpuClock::of_process("beam.smp"),
        CpuClock::of_process("mariadbd"),
    );
    conn.query_drop("INSERT INTO push_notify SELECT * FROM backlog")
        .expect("the backlog appears");
    let start = Instant::now();
    let deadline = start + DRAIN_DEADLINE;
    let messages = match consumer {
        Consumer::None => {
            let all = crate::wait_until_every(
                deadline.saturating_duration_since(Instant::now()),
                Duration::from_millis(5),
                || queued() >= BACKLOG,
            );
            assert!(all, "the broker lacks messages after {DRAIN_DEADLINE:?}");
            None
        }
        Consumer::SameCores => Some(receive_every_bug(&broker, deadline)),
    };
    let elapsed = start.elapsed();
    let cpu = (rabbit.seconds(), maria.seconds(), bzpush.seconds());
    let emptied = crate::wait_until(ARRIVAL_DEADLINE, || {
        let left: Option<u64> = conn
            .query_first("SELECT COUNT(*) FROM push_notify")
            .expect("count");
        left == Some(0)
    });
    assert!(
        emptied,
        "push_notify not empty {ARRIVAL_DEADLINE:?} after the last confirm"
    );
    // Every row is deleted only after its confirm, so the queue holds them
    // all now; more if some went out twice.
    let messages = messages.unwrap_or_else(|| u64::from(queued()));
    assert!(
        messages >= u64::from(BACKLOG),
        "only {messages} messages reached the broker"
    );
    eprintln!(
        "  {messages} messages ({} duplicates); all the broker's after {:.2} s; CPU-s: \
         RabbitMQ {:.1}, MariaDB {:.1}, bzpush {:.1}",
        messages - u64::from(BACKLOG),
        elapsed.as_secs_f64(),
        cpu.0,
        cpu.1,
        cpu.2,
    );
    f64::from(BACKLOG) / elapsed.as_secs_f64()
}

/// What the broker alone takes on this machine: bzpush's own publisher
/// sends [`BACKLOG`] notifications with confirms, all in flight at once,
/// with no database to read or delete from. No poller, however it
/// overlaps its steps, can drain faster than this.
fn broker_floor() -> Row {
    let rates: Vec<f64> = (1..=RUNS).map(floor_once).collect();
    let (median, runs) = median_and_runs(rates);
    Row {
        scenario: format!(
            "broker floor: {}k messages published with confirms, no database",
            BACKLOG / 1000
        ),
        setting: "all in flight at once".into(),
        center: format!("{} messages/s", crate::thousands(median)),
        spread: format!("runs: {runs}"),
        target: "-".into(),
        met: None,
    }
}

/// One run of the broker floor, messages/s.
fn floor_once(run: usize) -> f64 {
    let (broker, _, queue) = TestBroker::with_queue();
    let url = AmqpUrl::parse(&crate::amqp_url_at(AMQP_ADDR)).expect("a URL");
    let mut publisher =
        Publisher::connect(&url, &broker.exchange, "bench").expect("connect to publish");
    let all: Vec<Notification> = (1..=BACKLOG)
        .map(|i| Notification {
            bug: BugId::new(i).expect("a bug id"),
            when: ChangeTime::new("2026-11-28T02:04:50"),
        })
        .collect();
    let rabbit = CpuClock::of_process("beam.smp");
    let start = Instant::now();
    let refused = publisher.publish(&all).expect("publish");
    assert!(
        refused.is_empty(),
        "the broker refused {} messages",
        refused.len()
    );
    let elapsed = start.elapsed();
    let rate = f64::from(BACKLOG) / elapsed.as_secs_f64();
    eprintln!(
        "broker floor, run {run}/{RUNS}: {rate:.0} messages/s; RabbitMQ {:.1} CPU-s",
        rabbit.seconds()
    );
    assert_eq!(
        broker.ready_in(&queue),
        BACKLOG,
        "the queue should hold every message"
    );
    rate
}

/// The median of `rates`, and every run in the order it ran, for the
/// table's spread column.
fn median_and_runs(mut rates: Vec<f64>) -> (f64, String) {
    let runs = rates
        .iter()
        .map(|r| crate::thousands(*r))
        .collect::<Vec<_>>()
        .join(" / ");
    rates.sort_by(f64::total_cmp);
    (quantile(&rates, 0.5), runs)
}

/// CPU time a process spent since this clock started, from `/proc`.
struct CpuClock {
    pid: Option<String>,
    start: f64,
}

impl CpuClock {
    /// The oldest process named `name`; reads as zero if there is none.
    fn of_process(name: &str) -> CpuClock {
        let pid = std::process::Command::new("pgrep")
            .args(["-o", "-x", name])
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .filter(|p| !p.is_empty());
        CpuClock::of_pid(pid)
    }

    fn of_pid(pid: Option<String>) -> CpuClock {
        let mut clock = CpuClock { pid, start: 0.0 };
        clock.start = clock.total();
        clock
    }

    /// utime + stime, in seconds (at Linux's 100 ticks per second).
    fn total(&self) -> f64 {
        let Some(pid) = &self.pid else { return 0.0 };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Fields after the command name, which is in parentheses.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map_or(vec![], |(_, rest)| rest.split_whitespace().collect());
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<f64>().ok())
                .unwrap_or(0.0)
        };
        // utime and stime are fields 14 and 15 of stat; 12 and 13 here.
        (ticks(11) + ticks(12)) / 100.0
    }

    fn seconds(&self) -> f64 {
        self.total() - self.start
    }
}

/// Receives until every bug of the backlog has arrived; the messages
/// received.
fn receive_every_bug(broker: &TestBroker, deadline: Instant) -> u64 {
    let mut seen = vec![false; BACKLOG as usize + 1];
    let (mut distinct, mut messages) = (0, 0u64);
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
    messages
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
    let broker = TestBroker::consuming(Arrival::of);
    let _poller = poller(&db, &broker, &[]);
    let mut conn = db.conn();

    // Warm-up: the poller connects to the broker at its first publish.
    TestDb::push_notify_change(&mut conn, 1, None);
    let first = broker.recv(ARRIVAL_DEADLINE);
    assert!(first.is_some(), "the warm-up change never arrived");

    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut rng = Rng(seed);
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
fn stratified_schedule(rng: &mut Rng) -> Vec<Duration> {
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
