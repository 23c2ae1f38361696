//! Group `serve`: the release `bzpush serve` under many WebSocket clients.
//!
//! - idle: `--connections` (10,000) connections held open, each subscribed
//!   to 10 bugs of its own (the headline), then 1 and 100; the server's
//!   RSS per connection beside the floor, connections that never sent a
//!   frame, as a ratio to it; the server's CPU over `--idle-seconds` (10)
//!   while nothing happens; connections opened per second (the handshake
//!   alone, and with the subscription), beside the rate at which the same
//!   opener threads open connections to a bare thread-per-connection
//!   responder in this process.
//! - fanout: as many connections, all subscribed to one bug (their RSS is
//!   reported too); one change at a time, `--repeats` (100) times; the
//!   latency of every delivery. Beside it, the floor this machine puts
//!   under any server's fan-out, measured the same way: the same update
//!   frame written bare to as many distinct loopback sockets, from as many
//!   writer threads as the server's pool, read by the same epoll readers,
//!   in a child process of the benchmark's (the fleet takes the
//!   descriptors of this one); p50 and p99 as ratios to the floor's.
//! - throughput: `--tp-connections` (1,000) connections each subscribed to
//!   the same `--tp-bugs` (100) bugs, so each change fans out to every
//!   connection; changes published round-robin over the bugs at each of
//!   `--rates` (changes/s, 100,400,800,1600,3200) for `--seconds` (10) each;
//!   updates delivered per second in aggregate, loss, latency. Rates stop
//!   rising at the first that loses an update, gets a client closed, or is
//!   not sustained: delivers under 95 % of what was offered, or p99 over a
//!   second. Once for each of `--queue-types` (classic,quorum): the
//!   server's queue of that type (`BZPUSH_QUEUE_TYPE`), the rows of one
//!   rate side by side.
//!
//! - storm: `--connections` (10,000) connections, open and idle, as after
//!   an upgrade restart; then every one subscribes to 3 bugs with `since`
//!   at once, answered by the catch-up database (the restarted server's
//!   cache cannot vouch for the past). The time until the last connection
//!   has its complete answer, and how many answers were `partial` (must be
//!   none: `partial` is never for load).
//!
//! - noisy: a victim connection subscribed to one bug, changes published
//!   to it at `--noisy-rate` (200/s) for `--noisy-seconds` (5) at a time,
//!   the connection limits at their defaults: its latency alone, then
//!   beside one abusive client at another address that writes
//!   subscribe and unsubscribe commands of 20,000 bugs without pause (and
//!   reads what comes back), in `--noisy-rounds` (3) alternating rounds;
//!   the median of each side's p99, and their ratio.
//! - limit: `BZPUSH_MAX_CONNECTIONS=50000` on this machine's own limits
//!   (run it under `ulimit -n 20000` and the kernel's defaults):
//!   connections opened, each subscribed to a bug of its own, until a
//!   thousand past what the server says the machine allows; how many it
//!   held, their RSS each, the refusals, the process alive, and updates
//!   reaching the first ten connections afterwards.
//!
//! Flags follow the group: `cargo bench --bench bench -- serve --only
//! fanout --connections 5000`; `--only idle,fanout,throughput,storm,noisy,limit`
//! runs a subset; `limit` runs only when named. Everything the measurement saw (per-round fan-out times, CPU per
//! delivery, CPU by server thread, memory by kind) goes to stderr.
//!
//! The load generator holds every client socket without a thread per
//! socket: a few threads open connections over blocking sockets (the
//! handshake and the subscription by hand), then the sockets go to a couple
//! of epoll reader threads (mio, non-blocking) that parse server frames
//! minimally. Latency is a reader's arrival time minus the publish time,
//! both `Instant`s in this process: the publish time, a phase and a
//! sequence number travel in the update's `when`, which the server passes
//! through verbatim. Publishing is one lapin connection without confirms.
//! Each scenario has its own server process, exchange and queue; all are
//! killed or deleted when it ends, even on a panic.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use futures_lite::future::block_on;
use lapin::options::{
    BasicPublishOptions, ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use mio::{Events, Interest, Poll, Token};

use crate::Row;
use crate::frames::{MASK, client_frame, server_frame};
use crate::{AMQP_ADDR, Bzpush, amqp_url_at, unique, wait_until, wait_until_every};

/// Threads opening connections (blocking handshakes).
const OPENERS: usize = 4;
/// Threads watching every open socket with epoll.
const READERS: usize = 2;
/// The bug every fanout connection follows.
const FANOUT_BUG: u64 = 1;
/// The throughput scenario's bugs are `TP_FIRST_BUG..TP_FIRST_BUG + K`.
const TP_FIRST_BUG: u64 = 1000;
/// How long a fanout round may take before it counts as lost.
const ROUND_DEADLINE: Duration = Duration::from_secs(10);
/// A throughput phase has ended when nothing arrived for this long.
const QUIET: Duration = Duration::from_secs(3);
/// Server keepalive: longer than any scenario, so no ping costs anything
/// during a measurement (pings are answered anyway).
const PING_INTERVAL: &str = "10m";

/// Threads writing the fan-out floor: as many as the server's writer pool
/// (`WRITER_THREADS` in src/outbox.rs).
const FLOOR_WRITERS: usize = 4;
/// Descriptors the fan-out floor's process leaves free for what it holds
/// besides its socket pairs (stdio, a listener, epoll instances).
const FLOOR_SPARE_FDS: usize = 16;
/// The fan-out target, as a ratio of p99 to the floor's p99.
const TARGET_FANOUT_P99_RATIO: f64 = 1.3;

const TARGET_KIB_SUBSCRIBED_10: f64 = 12.0;
const TARGET_KIB_SUBSCRIBED_100: f64 = 16.0;
/// With the load generator on the same cores (bugzfeed here: 1,421/s).
const TARGET_CONNECTIONS_PER_SEC: f64 = 3000.0;
const TARGET_IDLE_CPU_PERCENT: f64 = 0.5;
const TARGET_UPDATES_PER_SEC: f64 = 100_000.0;
/// Sustained throughput keeps p99 latency within this (the README: "within
/// about a second").
const SUSTAINED_P99: Duration = Duration::from_secs(1);

struct Options {
    noisy_rate: u64,
    noisy_seconds: u64,
    noisy_rounds: usize,
    connections: usize,
    repeats: usize,
    idle_seconds: u64,
    tp_connections: usize,
    tp_bugs: usize,
    rates: Vec<u64>,
    seconds: u64,
    queue_types: Vec<String>,
    only: Option<Vec<String>>,
}

impl Options {
    fn from_args() -> Options {
        let mut o = Options {
            noisy_rate: 200,
            noisy_seconds: 5,
            noisy_rounds: 3,
            connections: 10_000,
            repeats: 100,
            idle_seconds: 10,
            tp_connections: 1000,
            tp_bugs: 100,
            rates: vec![100, 400, 800, 1600, 3200],
            seconds: 10,
            queue_types: vec!["classic".into(), "quorum".into()],
            only: None,
        };
        let args: Vec<String> = std::env::args().skip(1).collect();
        let mut i = 0;
        while i < args.len() {
            let flag = args[i].as_str();
            let value = || -> &str {
                args.get(i + 1)
                    .map(String::as_str)
                    .unwrap_or_else(|| panic!("{flag} needs a value"))
            };
            match flag {
                "--connections" => o.connections = parse(flag, value()),
                "--repeats" => o.repeats = parse(flag, value()),
                "--idle-seconds" => o.idle_seconds = parse(flag, value()),
                "--tp-connections" => o.tp_connections = parse(flag, value()),
                "--tp-bugs" => o.tp_bugs = parse(flag, value()),
                "--rates" => o.rates = value().split(',').map(|r| parse(flag, r)).collect(),
                "--seconds" => o.seconds = parse(flag, value()),
                "--queue-types" => o.queue_types = value().split(',').map(str::to_string).collect(),
                "--noisy-rate" => o.noisy_rate = parse(flag, value()),
                "--noisy-seconds" => o.noisy_seconds = parse(flag, value()),
                "--noisy-rounds" => o.noisy_rounds = parse(flag, value()),
                "--only" => o.only = Some(value().split(',').map(str::to_string).collect()),
                _ => {
                    i += 1;
                    continue;
                }
            }
            i += 2;
        }
        o
    }

    fn runs(&self, scenario: &str) -> bool {
        self.only
            .as_ref()
            .is_none_or(|only| only.iter().any(|s| s == scenario))
    }
}

fn parse<T: FromStr>(flag: &str, value: &str) -> T {
    value
        .parse()
        .unwrap_or_else(|_| panic!("{flag}: cannot read {value:?}"))
}

pub fn run() -> Vec<Row> {
    let o = Options::from_args();
    eprintln!("server binary: {}", env!("CARGO_BIN_EXE_bzpush"));
    let mut rows = Vec::new();
    if o.runs("idle") {
        rows.extend(idle(&o));
    }
    if o.runs("fanout") {
        rows.extend(fanout(&o));
    }
    if o.runs("throughput") {
        rows.extend(throughput(&o));
    }
    if o.runs("storm") {
        rows.extend(storm(&o));
    }
    if o.runs("noisy") {
        rows.extend(noisy(&o));
    }
    // Takes every thread this machine allows: only when asked for.
    if o.only
        .as_ref()
        .is_some_and(|only| only.iter().any(|s| s == "limit"))
    {
        rows.extend(limit());
    }
    rows
}

// ---------------------------------------------------------------------------
// Scenarios

/// Bugs each idle connection subscribes to: the floor (a connection that
/// never sent a frame), then the headline and the rows beside it.
const IDLE_BUGS: [u64; 4] = [0, 10, 1, 100];
/// The headline's bugs per connection (issue: a real client subscribes).
const IDLE_HEADLINE_BUGS: u64 = 10;

fn idle(o: &Options) -> Vec<Row> {
    // Both ends in this process: half as many keep it under its 20,000
    // file descriptors.
    let floor_connections = o.connections / 2;
    let bare = connection_rate_floor(floor_connections);
    eprintln!(
        "connection rate floor: {:.0}/s ({:.2} s); {:.1} KiB per connection ({})",
        bare.rate, bare.secs, bare.kib, bare.memory
    );
    let floor_rate = bare.rate;
    let mut rows = vec![
        Row {
            scenario: "connection rate floor: a bare responder, a thread per connection, \
                       answering the same upgrade request with a fixed 101"
                .into(),
            setting: format!(
                "{} connections, the same {OPENERS} load-generator threads",
                crate::thousands(floor_connections as f64)
            ),
            center: format!("{}/s", crate::thousands(floor_rate)),
            spread: format!("{:.2} s for all", bare.secs),
            target: "–".into(),
            met: None,
        },
        Row {
            scenario: "memory floor: the same bare responder's threads, each blocked in `read`"
                .into(),
            setting: format!(
                "{} connections (both ends in the load generator)",
                crate::thousands(floor_connections as f64)
            ),
            center: format!("{:.1} KiB RSS per connection", bare.kib),
            spread: bare.memory,
            target: "–".into(),
            met: None,
        },
    ];
    let mut floor: Option<f64> = None;
    for k in IDLE_BUGS {
        rows.extend(idle_with(o, k, &mut floor, floor_rate));
    }
    rows
}

/// The floor under the rate at which connections open here: the load
/// generator's own opener threads against a responder in this process
/// that does only what any thread-per-connection server must (accept,
/// start a thread, read the request head, write a fixed 101 answer, then
/// wait in `read`). Its threads, blocked in `read`, are the floor under
/// an idle connection's memory too.
fn connection_rate_floor(n: usize) -> BareFloor {
    const ANSWER: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\
        Connection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let addr = listener.local_addr().expect("listener address");
    let acceptor = thread::spawn(move || {
        let mut threads = Vec::with_capacity(n);
        for _ in 0..n {
            let Ok((mut socket, _)) = listener.accept() else {
                break;
            };
            let thread = thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match socket.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => head.extend_from_slice(&chunk[..k]),
                        }
                    }
                    if socket.write_all(ANSWER).is_err() {
                        return;
                    }
                    // Held, as a server holds a connection, until the
                    // client leaves.
                    while matches!(socket.read(&mut chunk), Ok(k) if k > 0) {}
                })
                .expect("spawn a responder thread");
            threads.push(thread);
        }
        threads
    });
    let before = Proc::of(std::process::id());
    let start = Instant::now();
    let sockets: Vec<TcpStream> = open_plain(addr, n, |e| panic!("connection rate floor: {e}"));
    let secs = start.elapsed().as_secs_f64();
    let opened = sockets.len();
    thread::sleep(Duration::from_secs(1));
    let after = Proc::of(std::process::id());
    drop(sockets);
    for thread in acceptor.join().expect("the floor's acceptor panicked") {
        let _ = thread.join();
    }
    // The client side closed first here: a moment for its ports' TIME_WAIT
    // to matter less to the next scenario's connects.
    thread::sleep(Duration::from_secs(1));
    BareFloor {
        rate: opened as f64 / secs,
        secs,
        kib: (after.rss_kib as f64 - before.rss_kib as f64) / opened.max(1) as f64,
        memory: after.memory.per_connection(&before.memory, opened),
    }
}

/// What [`connection_rate_floor`] measured.
struct BareFloor {
    /// Connections opened per second.
    rate: f64,
    /// Seconds to open them all.
    secs: f64,
    /// RSS per connection held open, KiB.
    kib: f64,
    /// The same by kind of mapping.
    memory: String,
}

/// One idle scenario: every connection subscribed to `k` bugs of its own
/// (no two connections share one: the costly case for the hub's index).
/// The first (`k` = 0) sets `floor`, the RSS per connection that never
/// sent a frame; the others are reported as a ratio to it.
fn idle_with(o: &Options, k: u64, floor: &mut Option<f64>, rate_floor: f64) -> Vec<Row> {
    let server = Server::start(o.connections);
    thread::sleep(Duration::from_secs(1));
    let before = Proc::of(server.pid());
    let opening = Instant::now();
    let bugs: Vec<u64> = (1..=k).collect();
    let fleet = Fleet::open_spread(server.addr, o.connections, &bugs, 1, k);
    let opened_in = opening.elapsed().as_secs_f64();
    let n = fleet.size;
    let rate = n as f64 / opened_in;
    eprintln!(
        "idle ({k} bugs each): opened {n} connections in {opened_in:.1} s ({rate:.0}/s, {} failed)",
        fleet.failed
    );
    thread::sleep(Duration::from_secs(2));
    let after = Proc::of(server.pid());
    let headline = k == IDLE_HEADLINE_BUGS;
    let cpu = headline.then(|| {
        let cpu_after = cpu_seconds(server.pid());
        let from = Instant::now();
        thread::sleep(Duration::from_secs(o.idle_seconds));
        let cpu = cpu_seconds(server.pid()) - cpu_after;
        (cpu, 100.0 * cpu / from.elapsed().as_secs_f64())
    });
    let still_open = fleet.alive();
    eprintln!(
        "idle ({k} bugs each): server RSS {} -> {} KiB ({}), threads {} -> {}, fds {} -> {}; \
         {still_open} of {n} still open; load generator RSS {} KiB",
        before.rss_kib,
        after.rss_kib,
        after.memory.per_connection(&before.memory, n),
        before.threads,
        after.threads,
        before.fds,
        after.fds,
        Proc::of(std::process::id()).rss_kib
    );
    let per_conn = (after.rss_kib as f64 - before.rss_kib as f64) / n.max(1) as f64;
    let all_open = n == o.connections && still_open == n;
    let setting = format!(
        "{} connections{}",
        crate::thousands(n as f64),
        if all_open {
            String::new()
        } else {
            format!(
                " (**{} asked, {still_open} open**)",
                crate::thousands(o.connections as f64)
            )
        }
    );
    let spread = format!(
        "RSS {} → {} MiB; {} threads, {} fds",
        before.rss_kib / 1024,
        after.rss_kib / 1024,
        after.threads,
        after.fds
    );
    let mut rows = Vec::new();
    if k == 0 {
        *floor = Some(per_conn);
        rows.push(Row {
            scenario: "idle floor: server RSS per connection that never sent a frame".into(),
            setting,
            center: format!("{per_conn:.1} KiB"),
            spread,
            target: "–".into(),
            met: None,
        });
        rows.push(Row {
            scenario: "connections opened per second (handshake only)".into(),
            setting: format!(
                "{} connections, {OPENERS} blocking load-generator threads on the same cores",
                crate::thousands(n as f64)
            ),
            center: format!(
                "{}/s = {:.2}× the floor",
                crate::thousands(rate),
                rate / rate_floor
            ),
            spread: format!("{opened_in:.2} s for all"),
            target: format!(
                ">= {}/s (bugzfeed: 1,421/s)",
                crate::thousands(TARGET_CONNECTIONS_PER_SEC)
            ),
            met: Some(all_open && rate >= TARGET_CONNECTIONS_PER_SEC),
        });
        tear_down(server, fleet);
        return rows;
    }
    let ratio = floor.map_or(String::new(), |f| {
        format!(" = {:.2}× the floor", per_conn / f)
    });
    let target = match k {
        IDLE_HEADLINE_BUGS => Some(TARGET_KIB_SUBSCRIBED_10),
        100 => Some(TARGET_KIB_SUBSCRIBED_100),
        _ => None,
    };
    rows.push(Row {
        scenario: format!(
            "idle: server RSS per connection subscribed to {k} bug{} of its own",
            if k == 1 { "" } else { "s" }
        ),
        setting: setting.clone(),
        center: format!("{per_conn:.1} KiB{ratio}"),
        spread,
        target: target.map_or("–".into(), |t| {
            format!(
                "<= {t:.0} KiB{}",
                if headline {
                    " (bugzfeed: 16.2 KiB)"
                } else {
                    ""
                }
            )
        }),
        met: target.map(|t| all_open && per_conn <= t),
    });
    if headline {
        rows.push(Row {
            scenario: "connections opened and subscribed per second".into(),
            setting: format!("{} connections × {k} bugs", crate::thousands(n as f64)),
            center: format!("{}/s", crate::thousands(rate)),
            spread: format!("{opened_in:.2} s for all"),
            target: "–".into(),
            met: None,
        });
    }
    if let Some((cpu, cpu_percent)) = cpu {
        rows.push(Row {
            scenario: "idle: server CPU".into(),
            setting: format!("{setting} × {k} bugs, {} s", o.idle_seconds),
            center: format!("{cpu_percent:.2} % of a core"),
            spread: format!("{cpu:.2} s CPU"),
            target: "~0 % (bugzfeed: 0 %)".into(),
            met: Some(all_open && cpu_percent <= TARGET_IDLE_CPU_PERCENT),
        });
    }
    tear_down(server, fleet);
    rows
}

fn fanout(o: &Options) -> Vec<Row> {
    let server = Server::start(o.connections);
    thread::sleep(Duration::from_secs(1));
    let before = Proc::of(server.pid());
    let opening = Instant::now();
    let fleet = Fleet::open(server.addr, o.connections, &[FANOUT_BUG], 0);
    let n = fleet.size as u64;
    eprintln!(
        "fanout: opened {n} connections in {:.1} s ({} failed)",
        opening.elapsed().as_secs_f64(),
        fleet.failed
    );
    thread::sleep(Duration::from_secs(1));
    let after = Proc::of(server.pid());
    let per_conn = (after.rss_kib as f64 - before.rss_kib as f64) / n.max(1) as f64;
    eprintln!(
        "fanout: server RSS {} -> {} KiB ({})",
        before.rss_kib,
        after.rss_kib,
        after.memory.per_connection(&before.memory, n as usize),
    );
    let phase = 1;
    fleet.reset(phase);
    let cpu_before = cpu_seconds(server.pid());
    let (server_threads, own_threads) =
        (thread_ticks(server.pid()), thread_ticks(std::process::id()));
    // The load generator's own CPU in the server's rounds only, not while
    // it waits for the floor's.
    let mut own_cpu = 0.0;
    let mut rounds = Vec::new();
    // A floor round, then the server's, and so on: the machine is shared,
    // and its load changes from one second to the next.
    let (floor, floor_rounds, pairs) = fanout_floor(n as usize, o.repeats, |round| {
        let round = round as u64;
        let own_before = cpu_seconds(std::process::id());
        server.exchange.publish(FANOUT_BUG, &when(phase, round));
        let complete = wait_until(ROUND_DEADLINE, || fleet.received() >= n * round);
        let (first, last) = fleet.take_extremes();
        eprintln!(
            "fanout round {round}/{}: first of {n} after {:.1} ms, last after {:.1} ms{}",
            o.repeats,
            first as f64 / 1000.0,
            last as f64 / 1000.0,
            if complete { "" } else { " (INCOMPLETE)" }
        );
        own_cpu += cpu_seconds(std::process::id()) - own_before;
        rounds.push(last);
        thread::sleep(Duration::from_millis(200));
    });
    let (floor_p50, floor_p99) = (floor.quantile(0.5), floor.quantile(0.99));
    eprintln!(
        "fanout floor: p50 {}, p99 {}, rounds {:?} µs",
        ms(floor_p50),
        ms(floor_p99),
        floor_rounds
    );
    let cpu = cpu_seconds(server.pid()) - cpu_before;
    let stats = fleet.collect();
    let shape = |h: &Histogram| -> String {
        [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
            .iter()
            .map(|&q| format!("p{} {}", q * 100.0, ms(h.quantile(q))))
            .collect::<Vec<_>>()
            .join(", ")
    };
    eprintln!(
        "fanout: CPU by thread, s: server {}; load generator {}",
        thread_ticks_delta(&server_threads, &thread_ticks(server.pid())),
        thread_ticks_delta(&own_threads, &thread_ticks(std::process::id()))
    );
    eprintln!("fanout arrivals, floor: {}", shape(&floor));
    eprintln!("fanout arrivals, server: {}", shape(&stats.latency));
    let expected = n * o.repeats as u64;
    let lost = expected.saturating_sub(stats.count);
    rounds.sort_unstable();
    let (p50, p99) = (stats.latency.quantile(0.5), stats.latency.quantile(0.99));
    let max = rounds.last().copied().unwrap_or(0);
    eprintln!(
        "fanout: {} deliveries, {lost} lost, {} out of order, {} stale, \
         CPU per delivery: server {:.1} µs, load generator {:.1} µs",
        stats.count,
        stats.disorder,
        stats.stale,
        cpu * 1e6 / stats.count.max(1) as f64,
        own_cpu * 1e6 / stats.count.max(1) as f64
    );
    let ratio = |x: u64, f: u64| x as f64 / f.max(1) as f64;
    let rows = vec![
        Row {
            scenario: format!(
                "fanout floor: {} update frames written bare to loopback sockets, {FLOOR_WRITERS} writer threads, \
                 the fleet's {READERS} epoll readers, no server",
                crate::thousands(n as f64)
            ),
            setting: format!(
                "{} distinct sockets ({:.1} writes each), {} rounds, each before a server round",
                crate::thousands(pairs as f64),
                n as f64 / pairs as f64,
                o.repeats
            ),
            center: format!("p50 {}", ms(floor_p50)),
            spread: format!("p99 {}", ms(floor_p99)),
            target: "–".into(),
            met: None,
        },
        Row {
            scenario: "subscribed: server RSS per connection".into(),
            setting: format!("{} connections × 1 bug", crate::thousands(n as f64)),
            center: format!("{per_conn:.1} KiB"),
            spread: format!(
                "RSS {} → {} MiB",
                before.rss_kib / 1024,
                after.rss_kib / 1024
            ),
            target: "– (information; bugzfeed idle: 16.6 KiB)".into(),
            met: None,
        },
        Row {
            scenario: "fanout: one change to every connection".into(),
            setting: format!(
                "{} connections × 1 bug, {} changes",
                crate::thousands(n as f64),
                o.repeats
            ),
            center: format!("p50 {} = {:.2}× the floor", ms(p50), ratio(p50, floor_p50)),
            spread: format!(
                "p99 {} = {:.2}× the floor, max {}; all reached in {} (median round); lost {lost}",
                ms(p99),
                ratio(p99, floor_p99),
                ms(max),
                ms(crate::quantile(&rounds, 0.5))
            ),
            target: format!(
                "p99 <= {TARGET_FANOUT_P99_RATIO}× the floor (bugzfeed: p50 283 ms, p99 919 ms)"
            ),
            met: Some(
                lost == 0
                    && n == o.connections as u64
                    && ratio(p99, floor_p99) <= TARGET_FANOUT_P99_RATIO,
            ),
        },
    ];
    tear_down(server, fleet);
    rows
}

/// The throughput rows of each queue type, side by side: each rate's rows
/// together, then each type's best.
fn throughput(o: &Options) -> Vec<Row> {
    let mut rates: Vec<std::vec::IntoIter<Row>> = Vec::new();
    let mut best = Vec::new();
    for queue_type in &o.queue_types {
        let mut rows = throughput_on(o, queue_type);
        best.extend(rows.pop());
        rates.push(rows.into_iter());
    }
    let mut rows = Vec::new();
    loop {
        let before = rows.len();
        rows.extend(rates.iter_mut().filter_map(Iterator::next));
        if rows.len() == before {
            break;
        }
    }
    rows.extend(best);
    rows
}

/// Throughput through a server whose queue is of `queue_type`.
fn throughput_on(o: &Options, queue_type: &str) -> Vec<Row> {
    let server = Server::start_with(
        o.tp_connections,
        &[("BZPUSH_QUEUE_TYPE", queue_type.to_string())],
    );
    let bugs: Vec<u64> = (TP_FIRST_BUG..TP_FIRST_BUG + o.tp_bugs as u64).collect();
    let opening = Instant::now();
    let fleet = Fleet::open(server.addr, o.tp_connections, &bugs, TP_FIRST_BUG);
    eprintln!(
        "throughput: opened {} connections × {} bugs in {:.1} s ({} failed)",
        fleet.size,
        bugs.len(),
        opening.elapsed().as_secs_f64(),
        fleet.failed
    );
    let setting = format!(
        "{} conns × {} bugs, {} s, {queue_type} queue",
        crate::thousands(fleet.size as f64),
        bugs.len(),
        o.seconds
    );
    let mut rows = Vec::new();
    let mut best_clean: Option<f64> = None;
    let mut seq = 0;
    for (i, &rate) in o.rates.iter().enumerate() {
        let phase = 100 + i as u64;
        fleet.reset(phase);
        let closed_before = fleet.size - fleet.alive();
        let subscribers = fleet.alive() as u64;
        let server_before = cpu_seconds(server.pid());
        let threads_before = thread_ticks(server.pid());
        let own_before = cpu_seconds(std::process::id());
        let start = Instant::now();
        let total = rate * o.seconds;
        for j in 0..total {
            let due = start + Duration::from_secs_f64(j as f64 / rate as f64);
            let now = Instant::now();
            if due > now {
                thread::sleep(due - now);
            }
            seq += 1;
            server
                .exchange
                .publish(bugs[j as usize % bugs.len()], &when(phase, seq));
        }
        let published_in = start.elapsed();
        let expected = total * subscribers;
        // Until everything arrived, or nothing has for QUIET.
        let mut last_count = 0;
        let mut last_change = Instant::now();
        while fleet.received() < expected && last_change.elapsed() < QUIET {
            thread::sleep(Duration::from_millis(20));
            let count = fleet.received();
            if count != last_count {
                last_count = count;
                last_change = Instant::now();
            }
        }
        let stats = fleet.collect();
        let server_cpu = cpu_seconds(server.pid()) - server_before;
        let own_cpu = cpu_seconds(std::process::id()) - own_before;
        let span = stats
            .last_arrival
            .map_or(published_in, |t| t.saturating_duration_since(start))
            .max(published_in);
        let delivered = stats.count as f64 / span.as_secs_f64();
        let lost = expected.saturating_sub(stats.count);
        let closed = fleet.size - fleet.alive() - closed_before;
        let clean = lost == 0 && closed == 0 && stats.disorder == 0;
        let (p50, p99) = (stats.latency.quantile(0.5), stats.latency.quantile(0.99));
        // What was asked for; below it by more than 5 %, the server no
        // longer keeps up and a backlog grows (in the broker). The README: a
        // client hears of a change within about a second.
        let offered = expected as f64 / published_in.as_secs_f64();
        let keeps_up = delivered >= 0.95 * offered && p99 <= SUSTAINED_P99.as_micros() as u64;
        eprintln!(
            "throughput ({queue_type}) @ {rate}/s: published {total} in {:.2} s, delivered {} of {expected} \
             ({} /s over {:.2} s), lost {lost}, {closed} clients closed ({} with 1008), \
             {} out of order, p50 {}, p99 {}, max {}; CPU: server {:.0} %, load generator {:.0} %",
            published_in.as_secs_f64(),
            stats.count,
            crate::thousands(delivered),
            span.as_secs_f64(),
            fleet.shared.closed_1008.load(Ordering::Relaxed),
            stats.disorder,
            ms(p50),
            ms(p99),
            ms(stats.max_us),
            100.0 * server_cpu / span.as_secs_f64(),
            100.0 * own_cpu / span.as_secs_f64(),
        );
        eprintln!(
            "  server threads (CPU s): {}",
            thread_ticks_delta(&threads_before, &thread_ticks(server.pid()))
        );
        if clean && keeps_up {
            best_clean = Some(best_clean.map_or(delivered, |b: f64| b.max(delivered)));
        }
        rows.push(Row {
            scenario: format!("throughput @ {} changes/s", crate::thousands(rate as f64)),
            setting: setting.clone(),
            center: format!("{} updates/s, p50 {}", crate::thousands(delivered), ms(p50)),
            spread: format!(
                "p99 {}, max {}; lost {lost}{}{}",
                ms(p99),
                ms(stats.max_us),
                if closed > 0 {
                    format!(", {closed} clients closed")
                } else {
                    String::new()
                },
                if keeps_up {
                    String::new()
                } else {
                    format!(
                        "; saturated: {} % of the {} /s offered or p99 over {} s",
                        (100.0 * delivered / offered).round(),
                        crate::thousands(offered),
                        SUSTAINED_P99.as_secs()
                    )
                }
            ),
            target: "none lost".into(),
            met: Some(clean),
        });
        if !clean || !keeps_up {
            eprintln!("throughput: saturated at {rate} changes/s; not going higher");
            break;
        }
        thread::sleep(Duration::from_millis(500));
    }
    let best = best_clean.unwrap_or(0.0);
    rows.push(Row {
        scenario: "throughput: best sustained without loss".into(),
        setting,
        center: format!("{} updates/s", crate::thousands(best)),
        spread: "–".into(),
        target: format!(
            ">= {} updates/s, none lost (bugzfeed: ~220/s)",
            crate::thousands(TARGET_UPDATES_PER_SEC)
        ),
        met: Some(best >= TARGET_UPDATES_PER_SEC),
    });
    tear_down(server, fleet);
    rows
}

/// Bugs in the storm's database; client `i` asks for three of them.
const STORM_BUGS: u64 = 3000;
/// Threads writing the storm's subscriptions, and reading its answers.
const STORM_THREADS: usize = 4;

fn storm(o: &Options) -> Vec<Row> {
    let db = crate::TestDb::new();
    let mut conn = db.conn();
    // Every bug changed at 01:00:00 + its id seconds; the clients ask
    // since midnight, so each gets three updates.
    let values: Vec<String> = (1..=STORM_BUGS)
        .map(|b| format!("({b}, '2026-01-01 01:00:00' + INTERVAL {b} SECOND)"))
        .collect();
    for chunk in values.chunks(1000) {
        mysql::prelude::Queryable::query_drop(
            &mut conn,
            format!(
                "INSERT INTO bugs (bug_id, delta_ts) VALUES {}",
                chunk.join(",")
            ),
        )
        .expect("seed the storm's bugs");
    }
    drop(conn);
    let server = Server::start_with(o.connections, &[("BZPUSH_CATCHUP_DATABASE_URL", db.url())]);
    let addr = server.addr;
    let mut sockets: Vec<TcpStream> = open_plain(addr, o.connections, |e| {
        eprintln!("storm: cannot open a connection: {e}");
    });
    let n = sockets.len();
    eprintln!("storm: {n} connections open");
    let rss_before = Memory::of(server.pid());
    let partial = AtomicU64::new(0);
    let incomplete = AtomicU64::new(0);
    let start = Instant::now();
    let chunk = n.div_ceil(STORM_THREADS).max(1);
    let (first, last) = thread::scope(|scope| {
        let workers: Vec<_> = sockets
            .chunks_mut(chunk)
            .enumerate()
            .map(|(t, mine)| {
                let (partial, incomplete) = (&partial, &incomplete);
                scope.spawn(move || {
                    let offset = t * chunk;
                    for (i, socket) in mine.iter_mut().enumerate() {
                        let i = (offset + i) as u64;
                        let bugs = [
                            i % STORM_BUGS + 1,
                            (i + 1000) % STORM_BUGS + 1,
                            (i + 2000) % STORM_BUGS + 1,
                        ];
                        let text = format!(
                            r#"{{"command":"subscribe","bugs":[{},{},{}],"since":"2026-01-01T00:00:00"}}"#,
                            bugs[0], bugs[1], bugs[2]
                        );
                        if socket.write_all(&client_frame(0x81, text.as_bytes(), Some(MASK))).is_err() {
                            incomplete.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    let mut first = Duration::MAX;
                    let mut last = Duration::ZERO;
                    for socket in mine.iter_mut() {
                        match read_frames(socket, 4) {
                            Some(frames) => {
                                let at = start.elapsed();
                                first = first.min(at);
                                last = last.max(at);
                                if frames[0].contains(r#""partial":true"#) {
                                    partial.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            None => {
                                incomplete.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    (first, last)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a storm thread panicked"))
            .fold((Duration::MAX, Duration::ZERO), |(a, b), (c, d)| {
                (a.min(c), b.max(d))
            })
    });
    let rss_after = Memory::of(server.pid());
    let (partial, incomplete) = (partial.into_inner(), incomplete.into_inner());
    eprintln!(
        "storm: {n} answers, first {} ms, last {} ms, {partial} partial, {incomplete} \
         incomplete; server heap {} KiB before, {} KiB after",
        first.as_millis(),
        last.as_millis(),
        rss_before.heap,
        rss_after.heap
    );
    drop(sockets);
    drop(server);
    vec![Row {
        scenario: format!(
            "storm: {n} clients subscribe to 3 bugs each with `since` at once \
             (a restarted server: the catch-up database answers)"
        ),
        setting: format!("{n} connections"),
        center: format!("{} ms to the last complete answer", last.as_millis()),
        spread: format!(
            "first {} ms; {partial} partial, {incomplete} incomplete",
            first.as_millis()
        ),
        target: "0 partial".to_string(),
        met: Some(partial == 0 && incomplete == 0),
    }]
}

/// The noisy neighbour's victim follows this bug, the abuser
/// `NOISY_FIRST_BUG..NOISY_FIRST_BUG + NOISY_BUGS`.
const NOISY_VICTIM_BUG: u64 = 7;
const NOISY_FIRST_BUG: u64 = 100_000;
/// As many as one connection may follow by default.
const NOISY_BUGS: u64 = 20_000;
/// The noisy neighbour's target: the victim's p99 beside the abuser at
/// most this many times its p99 alone.
const TARGET_NOISY_RATIO: f64 = 2.0;

fn noisy(o: &Options) -> Vec<Row> {
    // The connection limits at their defaults: each address's share of the
    // hub's time follows from them.
    let server = Server::start_with(
        10,
        &[
            ("BZPUSH_MAX_CONNECTIONS", "10000".into()),
            ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "1000".into()),
        ],
    );
    let victim = Fleet::open(server.addr, 1, &[NOISY_VICTIM_BUG], NOISY_VICTIM_BUG);
    let mut seq = 0;
    let mut alone = Vec::new();
    let mut beside = Vec::new();
    let mut commands = 0;
    for round in 0..o.noisy_rounds as u64 {
        alone.push(victim_round(o, &server, &victim, 2 * round + 1, &mut seq));
        let abuser = Abuser::start(server.addr);
        let threads = thread_ticks(server.pid());
        beside.push(victim_round(o, &server, &victim, 2 * round + 2, &mut seq));
        eprintln!(
            "noisy round {round}: server CPU by thread beside the abuser, s: {}",
            thread_ticks_delta(&threads, &thread_ticks(server.pid()))
        );
        let answered = abuser.stop();
        eprintln!(
            "noisy round {round}: victim p99 alone {}, beside the abuser {} ({answered} \
             commands of {NOISY_BUGS} bugs answered meanwhile)",
            ms(alone[alone.len() - 1].1),
            ms(beside[beside.len() - 1].1),
        );
        commands += answered;
    }
    let closed = victim.size - victim.alive();
    let median = |rounds: &[(u64, u64)], pick: fn(&(u64, u64)) -> u64| {
        let mut values: Vec<u64> = rounds.iter().map(pick).collect();
        values.sort_unstable();
        crate::quantile(&values, 0.5)
    };
    let (alone_p50, alone_p99) = (median(&alone, |r| r.0), median(&alone, |r| r.1));
    let (beside_p50, beside_p99) = (median(&beside, |r| r.0), median(&beside, |r| r.1));
    let ratio = beside_p99 as f64 / alone_p99.max(1) as f64;
    let setting = format!(
        "1 victim × 1 bug, {} changes/s, {} rounds of {} s",
        o.noisy_rate, o.noisy_rounds, o.noisy_seconds
    );
    let rows = vec![
        Row {
            scenario: "noisy neighbour: a victim's update latency, alone".into(),
            setting: setting.clone(),
            center: format!("p50 {}", ms(alone_p50)),
            spread: format!("p99 {} (median of the rounds')", ms(alone_p99)),
            target: "–".into(),
            met: None,
        },
        Row {
            scenario: format!(
                "noisy neighbour: the same beside one client writing subscribe/unsubscribe \
                 of {} bugs without pause",
                crate::thousands(NOISY_BUGS as f64)
            ),
            setting,
            center: format!("p50 {}", ms(beside_p50)),
            spread: format!(
                "p99 {} = {ratio:.2}× alone; {} commands answered{}",
                ms(beside_p99),
                crate::thousands(commands as f64),
                if closed > 0 {
                    "; **victim closed**"
                } else {
                    ""
                }
            ),
            target: format!("p99 <= {TARGET_NOISY_RATIO}× alone (issue 19: was 38×)"),
            met: Some(closed == 0 && ratio <= TARGET_NOISY_RATIO),
        },
    ];
    tear_down(server, victim);
    rows
}

/// One round of changes to the victim's bug: `(p50, p99)` of its
/// latency, µs.
fn victim_round(
    o: &Options,
    server: &Server,
    victim: &Fleet,
    phase: u64,
    seq: &mut u64,
) -> (u64, u64) {
    victim.reset(phase);
    let total = o.noisy_rate * o.noisy_seconds;
    let start = Instant::now();
    for j in 0..total {
        let due = start + Duration::from_secs_f64(j as f64 / o.noisy_rate as f64);
        let now = Instant::now();
        if due > now {
            thread::sleep(due - now);
        }
        *seq += 1;
        server
            .exchange
            .publish(NOISY_VICTIM_BUG, &when(phase, *seq));
    }
    let received = wait_until(QUIET * 3, || victim.received() >= total);
    let stats = victim.collect();
    if !received {
        eprintln!("noisy: the victim got {} of {total} updates", stats.count);
    }
    (stats.latency.quantile(0.5), stats.latency.quantile(0.99))
}

/// One abusive client: a thread writing subscribe and unsubscribe commands
/// of [`NOISY_BUGS`] bugs without pause, another reading every answer (a
/// client that did not would be closed for being slow, and stop).
struct Abuser {
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    threads: Vec<JoinHandle<()>>,
    socket: TcpStream,
}

impl Abuser {
    fn start(addr: SocketAddr) -> Abuser {
        let from = std::net::IpAddr::from([127, 0, 0, 2]);
        let (socket, _) = open_one_from(Some(from), addr, &[]).expect("the abuser connects");
        let bugs: Vec<String> = (NOISY_FIRST_BUG..NOISY_FIRST_BUG + NOISY_BUGS)
            .map(|b| b.to_string())
            .collect();
        let command = |name: &str| {
            let text = format!(r#"{{"command":"{name}","bugs":[{}]}}"#, bugs.join(","));
            client_frame(0x81, text.as_bytes(), Some(MASK))
        };
        let both = [command("subscribe"), command("unsubscribe")].concat();
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let writer =
            {
                let (mut socket, stop) = (socket.try_clone().expect("clone"), Arc::clone(&stop));
                thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) && socket.write_all(&both).is_ok() {}
                })
            };
        let reader = {
            let (mut socket, answered) =
                (socket.try_clone().expect("clone"), Arc::clone(&answered));
            thread::spawn(move || {
                let mut buffer = Vec::new();
                let mut chunk = vec![0u8; 256 * 1024];
                while let Ok(n) = socket.read(&mut chunk) {
                    if n == 0 {
                        return;
                    }
                    buffer.extend_from_slice(&chunk[..n]);
                    let mut used = 0;
                    while let Some((_, _, n)) = server_frame(&buffer[used..]) {
                        used += n;
                        answered.fetch_add(1, Ordering::Relaxed);
                    }
                    buffer.drain(..used);
                }
            })
        };
        Abuser {
            stop,
            answered,
            threads: vec![writer, reader],
            socket,
        }
    }

    /// Stops it; how many of its commands were answered.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
        for thread in self.threads {
            let _ = thread.join();
        }
        self.answered.load(Ordering::Relaxed)
    }
}

/// What `limit` asks for: more than this machine allows at its defaults.
const LIMIT_ASKED: usize = 50_000;
/// Connections tried past what the server says the machine allows.
const LIMIT_PAST: usize = 1000;
/// The limit scenario's connection `i` follows bug `LIMIT_FIRST_BUG + i`.
const LIMIT_FIRST_BUG: u64 = 1;

fn limit() -> Vec<Row> {
    let asked = LIMIT_ASKED.to_string();
    let server = Server::start_with(
        LIMIT_ASKED,
        &[
            ("BZPUSH_MAX_CONNECTIONS", asked.clone()),
            ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", asked),
        ],
    );
    let log = server.process.log();
    let allowed: usize = log
        .split_once("is more than this machine allows: ")
        .and_then(|(_, rest)| rest.split(' ').next()?.parse().ok())
        .unwrap_or(LIMIT_ASKED);
    let says = log
        .lines()
        .find(|l| l.contains("this machine allows"))
        .unwrap_or("")
        .to_string();
    eprintln!("limit: the server says: {says}");
    thread::sleep(Duration::from_secs(1));
    let before = Proc::of(server.pid());
    let kernel_before = kernel_kib();
    let opening = Instant::now();
    let fleet = Fleet::open_spread(
        server.addr,
        allowed + LIMIT_PAST,
        &[LIMIT_FIRST_BUG],
        LIMIT_FIRST_BUG,
        1,
    );
    let n = fleet.size;
    eprintln!(
        "limit: {n} connections held, {} refused, in {:.1} s",
        fleet.failed,
        opening.elapsed().as_secs_f64()
    );
    thread::sleep(Duration::from_secs(2));
    let after = Proc::of(server.pid());
    let kernel = kernel_kib()
        .iter()
        .zip(kernel_before)
        .map(|(a, b)| format!("{:.1}", (*a as f64 - b as f64) / n.max(1) as f64))
        .collect::<Vec<_>>();
    eprintln!(
        "limit: the kernel's memory per connection, KiB (machine-wide: the load generator's \
         sockets too): thread stacks {}, slab {}, page tables {}",
        kernel[0], kernel[1], kernel[2]
    );
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", server.pid()))
        .map_or(0, |m| m.lines().count());
    let per_conn = (after.rss_kib as f64 - before.rss_kib as f64) / n.max(1) as f64;
    let healthy = crate::process::http_get(&server.addr.to_string(), "/health").0 == 200;
    // Afterwards, the first ten connections' bugs change.
    let phase = 1;
    fleet.reset(phase);
    for bug in LIMIT_FIRST_BUG..LIMIT_FIRST_BUG + 10 {
        server.exchange.publish(bug, &when(phase, bug));
    }
    let delivered = wait_until(ROUND_DEADLINE, || fleet.received() >= 10);
    let alive = fleet.alive();
    let aborted = server.process.log().contains("panicked") || !healthy;
    eprintln!(
        "limit: server RSS {} -> {} KiB ({}), threads {}, fds {}, mappings {maps}; \
         {alive} of {n} still open; /health {}; updates to the first ten: {}",
        before.rss_kib,
        after.rss_kib,
        after.memory.per_connection(&before.memory, n),
        after.threads,
        after.fds,
        if healthy { 200 } else { 0 },
        fleet.received(),
    );
    let rows = vec![Row {
        scenario: format!(
            "at this machine's limit: BZPUSH_MAX_CONNECTIONS={} with the kernel's defaults",
            crate::thousands(LIMIT_ASKED as f64)
        ),
        setting: format!(
            "{} connections tried × 1 bug each; the server allowed {}",
            crate::thousands((allowed + LIMIT_PAST) as f64),
            crate::thousands(allowed as f64)
        ),
        center: format!(
            "{} held, {per_conn:.1} KiB RSS each",
            crate::thousands(n as f64)
        ),
        spread: format!(
            "{} refused (503); {} threads, {} mappings; the first ten got their updates: {}",
            crate::thousands(fleet.failed as f64),
            crate::thousands(after.threads as f64),
            crate::thousands(maps as f64),
            if delivered { "yes" } else { "**no**" }
        ),
        target: "refused past the limit, no abort, updates still delivered".into(),
        met: Some(n == allowed && fleet.failed == LIMIT_PAST && delivered && !aborted),
    }];
    tear_down(server, fleet);
    rows
}

/// The machine's `KernelStack`, `Slab` and `PageTables` from
/// `/proc/meminfo`, KiB.
fn kernel_kib() -> [u64; 3] {
    let text = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    ["KernelStack:", "Slab:", "PageTables:"].map(|name| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    })
}

/// The first `count` text frames on a blocking `socket`; `None` if it
/// closes or times out first.
fn read_frames(socket: &mut TcpStream, count: usize) -> Option<Vec<String>> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut frames = Vec::new();
    while frames.len() < count {
        if let Some((opcode, payload, used)) = server_frame(&buffer) {
            if opcode == 1 {
                frames.push(String::from_utf8_lossy(payload).into_owned());
            }
            buffer.drain(..used);
            continue;
        }
        let n = socket.read(&mut chunk).ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    Some(frames)
}

// ---------------------------------------------------------------------------
// The server, its exchange and queue

/// Ends a scenario: the server first, so that it is the side that closes
/// every connection and no client port is left in TIME_WAIT to slow the
/// next scenario's connects; then the clients; then a moment for the
/// kernel to tear the sockets down.
fn tear_down(server: Server, fleet: Fleet) {
    drop(server);
    drop(fleet);
    thread::sleep(Duration::from_secs(1));
}

/// A `bzpush serve` process on a feed `/` of its own exchange; killed, and
/// its queue and exchange deleted, when dropped.
struct Server {
    // Dropped first: the server goes before its queue does.
    process: Bzpush,
    exchange: Exchange,
    addr: SocketAddr,
}

impl Server {
    fn start(connections: usize) -> Server {
        Server::start_with(connections, &[])
    }

    /// As [`Server::start`], with `extra` settings.
    fn start_with(connections: usize, extra: &[(&str, String)]) -> Server {
        let mut exchange = Exchange::declare();
        let queue_prefix = format!("queue/guest/{}", unique("bzpush-bench"));
        let mut env = vec![
            ("BZPUSH_LOG", "info".to_string()),
            ("BZPUSH_QUEUE", queue_prefix.clone()),
            ("BZPUSH_MAX_CONNECTIONS", (connections + 100).to_string()),
            // Every client here has one address.
            (
                "BZPUSH_MAX_CONNECTIONS_PER_ADDRESS",
                (connections + 100).to_string(),
            ),
            ("BZPUSH_PING_INTERVAL", PING_INTERVAL.to_string()),
        ];
        env.extend(extra.iter().cloned());
        exchange.queue = Some(format!("{queue_prefix}/{}", exchange.name));
        let process = Bzpush::serve_at(AMQP_ADDR, &format!("/={}", exchange.name), &env);
        process.wait_healthy();
        let addr = process
            .listen_addr()
            .parse()
            .expect("the server logs a socket address");
        Server {
            process,
            exchange,
            addr,
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }
}

/// A topic exchange of its own and a publisher channel without confirms.
struct Exchange {
    name: String,
    /// The server's queue, deleted with the exchange.
    queue: Option<String>,
    connection: Connection,
    channel: Channel,
}

impl Exchange {
    fn declare() -> Exchange {
        let name = unique("bzpush.bench");
        let connection = block_on(Connection::connect(
            &amqp_url_at(AMQP_ADDR),
            ConnectionProperties::default(),
        ))
        .expect("connect to RabbitMQ at 127.0.0.1:5672 (guest/guest)");
        let channel = block_on(connection.create_channel()).expect("open a channel");
        block_on(channel.exchange_declare(
            name.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            },
            FieldTable::default(),
        ))
        .expect("declare the exchange");
        Exchange {
            name,
            queue: None,
            connection,
            channel,
        }
    }

    /// A change of `bug` at `when`, as the poller sends it; waits only
    /// until lapin has it, not for the broker's confirm.
    fn publish(&self, bug: u64, when: &str) {
        let body = format!(
            r#"{{"payload":{{"id":{bug},"delta_ts":"{when}"}},"_meta":{{"exchange":"{}","routing_key":"{bug}","serializer":"json","sent":"2026-11-28T00:00:00+00:00"}}}}"#,
            self.name
        );
        block_on(
            self.channel.basic_publish(
                self.name.as_str().into(),
                bug.to_string().into(),
                BasicPublishOptions::default(),
                body.as_bytes(),
                BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_delivery_mode(2),
            ),
        )
        .expect("publish");
    }
}

impl Drop for Exchange {
    fn drop(&mut self) {
        if let Some(queue) = &self.queue {
            let _ = block_on(
                self.channel
                    .queue_delete(queue.as_str().into(), QueueDeleteOptions::default()),
            );
        }
        let _ = block_on(
            self.channel
                .exchange_delete(self.name.as_str().into(), ExchangeDeleteOptions::default()),
        );
        let _ = block_on(self.connection.close(200, "benchmark done".into()));
    }
}

/// What `/proc` says about a process.
struct Proc {
    rss_kib: u64,
    memory: Memory,
    threads: u64,
    fds: usize,
}

impl Proc {
    fn of(pid: u32) -> Proc {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| -> u64 {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        Proc {
            rss_kib: field("VmRSS:"),
            memory: Memory::of(pid),
            threads: field("Threads:"),
            fds: std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count),
        }
    }
}

/// A process's CPU time so far (user and system), seconds: `/proc/…/stat`
/// alone, cheap enough to read right beside a measurement ([`Proc::of`]
/// reads `smaps`, tens of milliseconds of a core for a big process).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat_cpu_ticks(&stat) as f64 / clock_ticks()
}

/// A process's RSS by kind of mapping, KiB: where per-connection memory
/// goes.
#[derive(Default)]
struct Memory {
    /// Anonymous mappings right after a one-page guard: thread stacks (and
    /// their signal stacks).
    stacks: u64,
    /// Other anonymous mappings and `[heap]`: malloc.
    heap: u64,
    /// Mapped files: the binary and its libraries.
    files: u64,
}

impl Memory {
    fn of(pid: u32) -> Memory {
        let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
        let mut memory = Memory::default();
        let mut kind: Option<fn(&mut Memory) -> &mut u64> = None;
        let mut previous_guard_end = None;
        for line in smaps.lines() {
            let mut fields = line.split_whitespace();
            let first = fields.next().unwrap_or_default();
            if let Some((start, end)) = first.split_once('-')
                && let (Ok(start), Ok(end)) =
                    (u64::from_str_radix(start, 16), u64::from_str_radix(end, 16))
            {
                let perms = fields.next().unwrap_or_default();
                let path = fields.nth(3).unwrap_or_default();
                let after_guard = previous_guard_end == Some(start);
                previous_guard_end =
                    (perms.starts_with("---") && end - start == 4096).then_some(end);
                kind = match path {
                    "" if after_guard => Some(|m| &mut m.stacks),
                    "" | "[heap]" => Some(|m| &mut m.heap),
                    p if p.starts_with('/') => Some(|m| &mut m.files),
                    _ => None,
                };
            } else if first == "Rss:"
                && let Some(kind) = kind
            {
                *kind(&mut memory) += fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            }
        }
        memory
    }

    /// What each of `n` connections added since `before`.
    fn per_connection(&self, before: &Memory, n: usize) -> String {
        let per = |a: u64, b: u64| (a as f64 - b as f64) / n.max(1) as f64;
        format!(
            "per connection: stacks {:.1} KiB, heap {:.1} KiB, files {:.1} KiB",
            per(self.stacks, before.stacks),
            per(self.heap, before.heap),
            per(self.files, before.files)
        )
    }
}

/// How many socket pairs the fan-out floor's process may open for
/// `writes` writes: one per write if its descriptor limit allows, else as
/// many as it does. Fewer sockets, each written several times, make a
/// faster floor than the server's distinct ones (its kernel lookups stay in
/// cache): 5,000 subscribers, p99 1.66× and 1.11× a floor of 1,250 sockets
/// written 4 times, 0.91× and 0.77× one of 5,000 written once (2026-12-01,
/// alternating runs). That is why the floor has a process of its own: the
/// load generator's descriptors go to the fleet.
fn floor_pairs(writes: usize) -> usize {
    let limit = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|limits| {
            limits
                .lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3)?.parse::<usize>().ok())
        })
        .unwrap_or(1024);
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, Iterator::count);
    let free = limit.saturating_sub(open + FLOOR_SPARE_FDS);
    writes.min(free / 2).max(1)
}

/// The argument that makes the benchmark binary the fan-out floor's
/// process ([`floor_process`]) instead of running a group.
pub const FLOOR_PROCESS: &str = "fanout-floor";

/// The fan-out floor, measured as the server's fan-out is: `writes`
/// update frames, as the server sends them, written to distinct loopback
/// sockets (as many as [`floor_pairs`] allows) by [`FLOOR_WRITERS`]
/// threads (as many as the server's writer pool), read by the fleet's own
/// [`READERS`] epoll threads ([`Fleet::watch`]), no server, no broker. It
/// runs in a child process ([`floor_process`]) with descriptors of its
/// own, as the server has. Each arrival's time since its round started
/// goes into the histogram, so its p50 and p99 compare with the fan-out's. Returns the histogram of `rounds` rounds, each
/// round's last arrival (µs), and the number of sockets written.
///
/// `between(round)` runs after each floor round: the server's round, so
/// that both see the same load on this shared machine.
fn fanout_floor(
    writes: usize,
    rounds: usize,
    mut between: impl FnMut(usize),
) -> (Histogram, Vec<u64>, usize) {
    let exe = std::env::current_exe().expect("the benchmark's own path");
    let child = Command::new(exe)
        .arg(FLOOR_PROCESS)
        .arg(writes.to_string())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start the fan-out floor's process");
    let mut floor = FloorProcess(child);
    let mut to_floor = floor.0.stdin.take().expect("the floor's stdin");
    let mut from_floor = io::BufReader::new(floor.0.stdout.take().expect("the floor's stdout"));
    let mut answer = || {
        let mut line = String::new();
        io::BufRead::read_line(&mut from_floor, &mut line).expect("read the floor's answer");
        assert!(!line.is_empty(), "the fan-out floor's process ended early");
        line
    };
    let pairs: usize = answer().trim().parse().expect("the floor's socket count");
    let cpu_before = cpu_seconds(floor.0.id());
    let threads_before = thread_ticks(floor.0.id());
    let mut lasts = Vec::new();
    for round in 1..=rounds {
        writeln!(to_floor, "round").expect("start a floor round");
        lasts.push(
            answer()
                .trim()
                .parse()
                .expect("the floor round's last arrival"),
        );
        thread::sleep(Duration::from_millis(200));
        between(round);
    }
    eprintln!(
        "fanout floor: CPU per write (writer and reader) {:.1} µs; by thread, s: {}",
        (cpu_seconds(floor.0.id()) - cpu_before) * 1e6 / (writes * rounds) as f64,
        thread_ticks_delta(&threads_before, &thread_ticks(floor.0.id()))
    );
    writeln!(to_floor, "end").expect("end the floor");
    let mut histogram = Histogram::new();
    for (bucket, n) in answer().split_whitespace().enumerate() {
        let n: u64 = n.parse().expect("a floor histogram bucket");
        histogram.buckets[bucket] = n;
        histogram.count += n;
    }
    (histogram, lasts, pairs)
}

/// The floor's process, killed if the benchmark ends early.
struct FloorProcess(std::process::Child);

impl Drop for FloorProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The fan-out floor's process: `bench fanout-floor WRITES`. Opens its
/// socket pairs and prints how many; then, for each `round` line on stdin,
/// writes one round and prints its last arrival (µs after the stamp its
/// writers put in the frame); on `end`, prints the histogram's buckets and
/// exits.
pub fn floor_process() -> std::process::ExitCode {
    let writes: usize = std::env::args()
        .skip_while(|a| a != FLOOR_PROCESS)
        .nth(1)
        .and_then(|w| w.parse().ok())
        .expect("usage: bench fanout-floor WRITES");
    let pairs = floor_pairs(writes);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a listener");
    let addr = listener.local_addr().expect("listener address");
    let mut servers = Vec::with_capacity(pairs);
    let mut clients = Vec::with_capacity(pairs);
    for _ in 0..pairs {
        let client = TcpStream::connect(addr).expect("connect a socket pair");
        let (server, _) = listener.accept().expect("accept a socket pair");
        server.set_nodelay(true).expect("TCP_NODELAY");
        servers.push(server);
        clients.push((client, Vec::new()));
    }
    drop(listener);
    // The readers are the fleet's own, so both sides pay the same for
    // reading.
    let readers = Fleet::watch(clients, 0, 1, FANOUT_BUG, "floor-reader");
    let phase = 1;
    readers.reset(phase);
    println!("{pairs}");
    let round = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let go = std::sync::Barrier::new(FLOOR_WRITERS + 1);
    let done = std::sync::Barrier::new(FLOOR_WRITERS + 1);
    thread::scope(|scope| {
        let writers: Vec<_> = (0..FLOOR_WRITERS)
            .map(|w| {
                let (servers, go, done, stop, round) = (&servers, &go, &done, &stop, &round);
                let writer = thread::Builder::new().name(format!("floor-writer-{w}"));
                let writer = writer.spawn_scoped(scope, move || {
                    loop {
                        go.wait();
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        // The update frame the server sends, stamped with
                        // this round's start, as the broker message is.
                        let frame =
                            update_frame(FANOUT_BUG, &when(phase, round.load(Ordering::Relaxed)));
                        // Writer `w` takes every FLOOR_WRITERS-th socket
                        // from the `w`-th, and every FLOOR_WRITERS-th write.
                        let count =
                            writes / FLOOR_WRITERS + usize::from(w < writes % FLOOR_WRITERS);
                        let mine = servers.iter().skip(w).step_by(FLOOR_WRITERS);
                        for mut server in mine.cycle().take(count) {
                            server.write_all(&frame).expect("write to a socket pair");
                        }
                        done.wait();
                    }
                });
                writer.expect("start a floor writer")
            })
            .collect();
        let per_round = writes as u64;
        for line in io::stdin().lines() {
            if line.expect("read the benchmark's command") != "round" {
                break;
            }
            let round = round.fetch_add(1, Ordering::Relaxed) + 1;
            go.wait();
            done.wait();
            wait_until_every(ROUND_DEADLINE, Duration::from_millis(1), || {
                readers.received() >= per_round * round
            });
            println!("{}", readers.take_extremes().1);
        }
        stop.store(true, Ordering::Relaxed);
        go.wait();
        for w in writers {
            w.join().expect("a floor writer panicked");
        }
    });
    let histogram = readers.collect().latency;
    let buckets: Vec<String> = histogram.buckets.iter().map(u64::to_string).collect();
    println!("{}", buckets.join(" "));
    // The accepted side closes first: no client port is left in TIME_WAIT.
    drop(servers);
    drop(readers);
    std::process::ExitCode::SUCCESS
}

/// utime + stime from a `/proc/…/stat` line (fields 14 and 15; the name in
/// parentheses may hold spaces).
fn stat_cpu_ticks(stat: &str) -> u64 {
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| -> u64 { fields.get(i).and_then(|v| v.parse().ok()).unwrap_or(0) };
    get(11) + get(12)
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU ticks of a process's threads, by name with any `-N` suffix dropped
/// (`conn-17` and `writer-2` count as `conn` and `writer`).
fn thread_ticks(pid: u32) -> BTreeMap<String, u64> {
    let mut ticks = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return ticks;
    };
    for task in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
            continue;
        };
        let name = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            .map_or("?", |(n, _)| n);
        let name = name.trim_end_matches(|c: char| c.is_ascii_digit());
        let name = name.strip_suffix('-').unwrap_or(name);
        *ticks.entry(name.to_string()).or_default() += stat_cpu_ticks(&stat);
    }
    ticks
}

fn thread_ticks_delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> String {
    let mut parts: Vec<(u64, &String)> = after
        .iter()
        .map(|(name, t)| (t.saturating_sub(*before.get(name).unwrap_or(&0)), name))
        .filter(|(t, _)| *t > 0)
        .collect();
    parts.sort_unstable_by(|a, b| b.cmp(a));
    parts
        .iter()
        .map(|(t, name)| format!("{name} {:.2}", *t as f64 / clock_ticks()))
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// The load generator

/// The instant every publish time is measured from.
fn base() -> Instant {
    static BASE: OnceLock<Instant> = OnceLock::new();
    *BASE.get_or_init(Instant::now)
}

fn nanos_since_base(at: Instant) -> u64 {
    at.saturating_duration_since(base()).as_nanos() as u64
}

/// The `when` of a change: `phase.seq.publish-time-in-ns`, zero-padded:
/// the server compares change times as text and drops one that sorts
/// before the bug's latest, as it would drop a stale Bugzilla change.
fn when(phase: u64, seq: u64) -> String {
    format!(
        "{phase:03}.{seq:012}.{:020}",
        nanos_since_base(Instant::now())
    )
}

/// Latencies in µs: exact below 128, then 64 buckets per power of two
/// (under 1.6 % error).
#[derive(Clone)]
struct Histogram {
    buckets: Vec<u64>,
    count: u64,
}

impl Histogram {
    const BUCKETS: usize = 64 * 64;

    fn new() -> Histogram {
        Histogram {
            buckets: vec![0; Histogram::BUCKETS],
            count: 0,
        }
    }

    fn bucket(us: u64) -> usize {
        if us < 128 {
            return us as usize;
        }
        let shift = 63 - us.leading_zeros() as usize - 6;
        (shift * 64 + (us >> shift) as usize).min(Histogram::BUCKETS - 1)
    }

    /// The middle of bucket `i`.
    fn value(i: usize) -> u64 {
        if i < 128 {
            return i as u64;
        }
        let shift = i / 64 - 1;
        let low = ((i % 64 + 64) as u64) << shift;
        low + (1u64 << shift) / 2
    }

    fn record(&mut self, us: u64) {
        self.buckets[Histogram::bucket(us)] += 1;
        self.count += 1;
    }

    fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(&other.buckets) {
            *a += b;
        }
        self.count += other.count;
    }

    /// The `q`-quantile by nearest rank, in µs; 0 when empty.
    fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let rank = ((q * self.count as f64).ceil() as u64).clamp(1, self.count);
        let mut seen = 0;
        for (i, n) in self.buckets.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Histogram::value(i);
            }
        }
        Histogram::value(Histogram::BUCKETS - 1)
    }
}

/// What a reader saw in the current phase.
struct Stats {
    latency: Histogram,
    /// Updates of the current phase.
    count: u64,
    /// Largest latency, µs.
    max_us: u64,
    /// Smallest latency, µs.
    min_us: u64,
    /// Updates of an earlier phase.
    stale: u64,
    /// Updates not newer than the last one of the same bug on the same
    /// connection: duplicates or reordering.
    disorder: u64,
    last_arrival: Option<Instant>,
}

impl Stats {
    fn new() -> Stats {
        Stats {
            latency: Histogram::new(),
            count: 0,
            max_us: 0,
            min_us: u64::MAX,
            stale: 0,
            disorder: 0,
            last_arrival: None,
        }
    }

    fn merge(&mut self, other: &Stats) {
        self.latency.merge(&other.latency);
        self.count += other.count;
        self.max_us = self.max_us.max(other.max_us);
        self.min_us = self.min_us.min(other.min_us);
        self.stale += other.stale;
        self.disorder += other.disorder;
        self.last_arrival = self.last_arrival.max(other.last_arrival);
    }
}

/// What the readers and the benchmark share.
struct Shared {
    stop: AtomicBool,
    phase: AtomicU64,
    /// Connections not yet closed.
    open: AtomicUsize,
    closed_1008: AtomicU64,
    /// One per reader, locked by it while it handles a batch of events.
    stats: Vec<Mutex<Stats>>,
}

/// Client connections, watched by [`READERS`] epoll threads; closed when
/// dropped.
struct Fleet {
    shared: Arc<Shared>,
    readers: Vec<JoinHandle<()>>,
    /// Connections opened.
    size: usize,
    /// Connections that could not be opened.
    failed: usize,
}

impl Fleet {
    /// Opens `n` connections to `addr`, each subscribed to `bugs` (an
    /// answer awaited) unless there are none, and starts watching them. Updates of bug
    /// `first_bug + i` are checked for order per connection for `i` below
    /// `bugs.len()`.
    fn open(addr: SocketAddr, n: usize, bugs: &[u64], first_bug: u64) -> Fleet {
        Fleet::open_spread(addr, n, bugs, first_bug, 0)
    }

    /// As [`Fleet::open`], connection `i` subscribing to `bugs` shifted by
    /// `i × stride`: with a stride of `bugs.len()`, no two connections
    /// share a bug.
    fn open_spread(addr: SocketAddr, n: usize, bugs: &[u64], first_bug: u64, stride: u64) -> Fleet {
        let subscribe = |i: usize| -> Vec<u8> {
            if bugs.is_empty() {
                return Vec::new();
            }
            client_frame(
                0x81,
                format!(
                    r#"{{"command":"subscribe","bugs":[{}]}}"#,
                    bugs.iter()
                        .map(|b| (b + i as u64 * stride).to_string())
                        .collect::<Vec<_>>()
                        .join(",")
                )
                .as_bytes(),
                Some(MASK),
            )
        };
        let shared_frame = subscribe(0);
        let next = AtomicUsize::new(0);
        let failed = AtomicUsize::new(0);
        let opened: Vec<(TcpStream, Vec<u8>)> = thread::scope(|scope| {
            let openers: Vec<_> = (0..OPENERS)
                .map(|_| {
                    scope.spawn(|| {
                        let mut mine = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            if i >= n {
                                break;
                            }
                            let own;
                            let frame = if stride == 0 {
                                &shared_frame
                            } else {
                                own = subscribe(i);
                                &own
                            };
                            match open_one(addr, frame) {
                                Ok(c) => mine.push(c),
                                Err(e) => {
                                    if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                        eprintln!("cannot open a connection: {e}");
                                    }
                                }
                            }
                        }
                        mine
                    })
                })
                .collect();
            openers
                .into_iter()
                .flat_map(|t| t.join().expect("an opener thread panicked"))
                .collect()
        });
        assert!(
            !opened.is_empty(),
            "no connection could be opened to {addr}"
        );
        Fleet::watch(
            opened,
            failed.into_inner(),
            bugs.len(),
            first_bug,
            "lg-reader",
        )
    }

    /// Starts [`READERS`] threads named `name-N` watching `opened`
    /// (sockets, with whatever was read past the last whole frame), whose
    /// updates of bug `first_bug + i` are checked for order for `i` below
    /// `bugs`.
    fn watch(
        opened: Vec<(TcpStream, Vec<u8>)>,
        failed: usize,
        bugs: usize,
        first_bug: u64,
        name: &str,
    ) -> Fleet {
        let size = opened.len();
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            phase: AtomicU64::new(0),
            open: AtomicUsize::new(size),
            closed_1008: AtomicU64::new(0),
            stats: (0..READERS).map(|_| Mutex::new(Stats::new())).collect(),
        });
        let mut groups: Vec<Vec<Conn>> = (0..READERS).map(|_| Vec::new()).collect();
        for (i, (socket, pending)) in opened.into_iter().enumerate() {
            socket
                .set_nonblocking(true)
                .expect("make a socket non-blocking");
            groups[i % READERS].push(Conn {
                stream: mio::net::TcpStream::from_std(socket),
                pending,
                last_seq: vec![0; bugs],
                first_bug,
                open: true,
            });
        }
        let readers = groups
            .into_iter()
            .enumerate()
            .map(|(me, conns)| {
                let shared = Arc::clone(&shared);
                thread::Builder::new()
                    .name(format!("{name}-{me}"))
                    .spawn(move || read_loop(me, conns, &shared))
                    .expect("spawn a reader")
            })
            .collect();
        Fleet {
            shared,
            readers,
            size,
            failed,
        }
    }

    fn lock(&self, reader: usize) -> MutexGuard<'_, Stats> {
        self.shared.stats[reader]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Starts counting updates of `phase` only, from zero.
    fn reset(&self, phase: u64) {
        self.shared.phase.store(phase, Ordering::SeqCst);
        for r in 0..READERS {
            *self.lock(r) = Stats::new();
        }
    }

    /// Updates of the current phase received so far.
    fn received(&self) -> u64 {
        (0..READERS).map(|r| self.lock(r).count).sum()
    }

    /// The smallest and largest latency since the last call, µs.
    fn take_extremes(&self) -> (u64, u64) {
        (0..READERS)
            .map(|r| {
                let mut stats = self.lock(r);
                let min = std::mem::replace(&mut stats.min_us, u64::MAX);
                (min, std::mem::take(&mut stats.max_us))
            })
            .fold((u64::MAX, 0), |(a, b), (c, d)| (a.min(c), b.max(d)))
    }

    /// Everything seen in the current phase (except the extremes
    /// `take_extremes` took).
    fn collect(&self) -> Stats {
        let mut all = Stats::new();
        for r in 0..READERS {
            all.merge(&self.lock(r));
        }
        all
    }

    /// Connections not yet closed.
    fn alive(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        for reader in self.readers.drain(..) {
            let _ = reader.join();
        }
    }
}

/// Opens `n` WebSocket connections to `addr` with [`OPENERS`] threads,
/// sending nothing after the handshake; `failed` hears of each one that
/// could not be opened.
fn open_plain(addr: SocketAddr, n: usize, failed: impl Fn(io::Error) + Sync) -> Vec<TcpStream> {
    let next = AtomicUsize::new(0);
    thread::scope(|scope| {
        let openers: Vec<_> = (0..OPENERS)
            .map(|_| {
                scope.spawn(|| {
                    let mut mine = Vec::new();
                    while next.fetch_add(1, Ordering::Relaxed) < n {
                        match open_one(addr, &[]) {
                            Ok((socket, _)) => mine.push(socket),
                            Err(e) => failed(e),
                        }
                    }
                    mine
                })
            })
            .collect();
        openers
            .into_iter()
            .flat_map(|t| t.join().expect("an opener thread panicked"))
            .collect()
    })
}

/// Connects, upgrades to WebSocket and subscribes; returns the socket
/// (blocking) and whatever arrived after the subscription's answer.
fn open_one(addr: SocketAddr, subscribe: &[u8]) -> io::Result<(TcpStream, Vec<u8>)> {
    open_one_from(None, addr, subscribe)
}

/// As [`open_one`], from the local address `from` if given (another
/// client address on loopback: 127.0.0.2 and on).
fn open_one_from(
    from: Option<std::net::IpAddr>,
    addr: SocketAddr,
    subscribe: &[u8],
) -> io::Result<(TcpStream, Vec<u8>)> {
    let timeout = Duration::from_secs(10);
    let mut socket = match from {
        None => TcpStream::connect_timeout(&addr, timeout)?,
        Some(from) => {
            let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
            socket.bind(&SocketAddr::new(from, 0).into())?;
            socket.connect_timeout(&addr.into(), timeout)?;
            socket.into()
        }
    };
    socket.set_nodelay(true)?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    write!(
        socket,
        "GET / HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )?;
    let mut buffer = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(end) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break end + 4;
        }
        let n = socket.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("closed during the handshake"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    if !buffer.starts_with(b"HTTP/1.1 101") {
        let line = String::from_utf8_lossy(&buffer[..head_end]);
        let line = line.lines().next().unwrap_or_default().to_string();
        return Err(io::Error::other(format!("handshake refused: {line}")));
    }
    buffer.drain(..head_end);
    if subscribe.is_empty() {
        return Ok((socket, buffer));
    }
    socket.write_all(subscribe)?;
    loop {
        while let Some((opcode, payload, used)) = server_frame(&buffer) {
            let answer = (opcode == 1).then(|| String::from_utf8_lossy(payload).into_owned());
            buffer.drain(..used);
            if let Some(answer) = answer
                && answer.contains(r#""command":"subscribe""#)
            {
                if answer.contains(r#""result":"ok""#) {
                    return Ok((socket, buffer));
                }
                return Err(io::Error::other(format!("subscribe refused: {answer}")));
            }
        }
        let n = socket.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::other("closed before answering subscribe"));
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
}

/// A server-to-client text frame of the update of `bug` at `when`, as the
/// server sends it.
fn update_frame(bug: u64, when: &str) -> Vec<u8> {
    let payload = format!(r#"{{"command":"update","bug":{bug},"when":"{when}"}}"#);
    let mut frame = vec![0x81, u8::try_from(payload.len()).expect("under 126 bytes")];
    frame.extend_from_slice(payload.as_bytes());
    frame
}

/// `(bug, phase, seq, publish ns)` of an update this benchmark published.
fn parse_update(payload: &[u8]) -> Option<(u64, u64, u64, u64)> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.strip_prefix(r#"{"command":"update","bug":"#)?;
    let (bug, rest) = rest.split_once(',')?;
    let when = rest.strip_prefix(r#""when":""#)?.split('"').next()?;
    let mut parts = when.split('.').map(|p| p.parse::<u64>().ok());
    Some((
        bug.parse().ok()?,
        parts.next()??,
        parts.next()??,
        parts.next()??,
    ))
}

/// One client socket, owned by its reader.
struct Conn {
    stream: mio::net::TcpStream,
    /// Bytes of frames not yet whole.
    pending: Vec<u8>,
    /// The last sequence number seen, per bug `first_bug + i`.
    last_seq: Vec<u64>,
    first_bug: u64,
    open: bool,
}

impl Conn {
    /// Handles every whole frame in `pending`, all arrived at `at`.
    fn frames(&mut self, at: Instant, phase: u64, stats: &mut Stats, shared: &Shared) {
        let mut used = 0;
        let mut pongs = Vec::new();
        while let Some((opcode, payload, n)) = server_frame(&self.pending[used..]) {
            used += n;
            match opcode {
                0x1 => match parse_update(payload) {
                    Some((bug, p, seq, sent)) if p == phase => {
                        let us = nanos_since_base(at).saturating_sub(sent) / 1000;
                        stats.latency.record(us);
                        stats.count += 1;
                        stats.max_us = stats.max_us.max(us);
                        stats.min_us = stats.min_us.min(us);
                        stats.last_arrival = Some(at);
                        if let Some(last) = bug
                            .checked_sub(self.first_bug)
                            .and_then(|i| self.last_seq.get_mut(i as usize))
                        {
                            if seq <= *last {
                                stats.disorder += 1;
                            } else {
                                *last = seq;
                            }
                        }
                    }
                    Some(_) => stats.stale += 1,
                    None => {}
                },
                0x8 => {
                    if payload.starts_with(&1008u16.to_be_bytes()) {
                        shared.closed_1008.fetch_add(1, Ordering::Relaxed);
                    }
                    self.open = false;
                }
                0x9 => pongs.push(client_frame(0x8a, payload, Some(MASK))),
                _ => {}
            }
        }
        self.pending.drain(..used);
        for pong in pongs {
            // A pong is small and the socket idle: it fits at once.
            let _ = self.stream.write_all(&pong);
        }
    }
}

fn read_loop(me: usize, mut conns: Vec<Conn>, shared: &Shared) {
    let mut poll = Poll::new().expect("create an epoll instance");
    for (i, conn) in conns.iter_mut().enumerate() {
        poll.registry()
            .register(&mut conn.stream, Token(i), Interest::READABLE)
            .expect("register a socket");
    }
    let mut events = Events::with_capacity(1024);
    let mut scratch = vec![0u8; 64 * 1024];
    let close = |conn: &mut Conn, poll: &Poll| {
        let _ = poll.registry().deregister(&mut conn.stream);
        conn.open = false;
        conn.pending = Vec::new();
        shared.open.fetch_sub(1, Ordering::Relaxed);
    };
    // Whatever arrived with the subscription's answer.
    {
        let mut stats = shared.stats[me].lock().unwrap_or_else(|e| e.into_inner());
        let phase = shared.phase.load(Ordering::SeqCst);
        for conn in &mut conns {
            conn.frames(Instant::now(), phase, &mut stats, shared);
            if !conn.open {
                close(conn, &poll);
            }
        }
    }
    while !shared.stop.load(Ordering::Relaxed) {
        match poll.poll(&mut events, Some(Duration::from_millis(50))) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => panic!("epoll failed: {e}"),
        }
        if events.is_empty() {
            continue;
        }
        let mut stats = shared.stats[me].lock().unwrap_or_else(|e| e.into_inner());
        let phase = shared.phase.load(Ordering::SeqCst);
        for event in &events {
            let conn = &mut conns[event.token().0];
            if !conn.open {
                continue;
            }
            loop {
                match conn.stream.read(&mut scratch) {
                    Ok(0) => {
                        close(conn, &poll);
                        break;
                    }
                    Ok(n) => {
                        let at = Instant::now();
                        conn.pending.extend_from_slice(&scratch[..n]);
                        conn.frames(at, phase, &mut stats, shared);
                        if !conn.open {
                            close(conn, &poll);
                            break;
                        }
                        // A short read emptied the socket; data arriving
                        // later raises a new edge, so skip the read that
                        // would only say WouldBlock.
                        if n < scratch.len() {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => {
                        close(conn, &poll);
                        break;
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Small helpers

/// µs as milliseconds, `12.3 ms`.
fn ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms < 10.0 {
        format!("{ms:.2} ms")
    } else if ms < 100.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{} ms", crate::thousands(ms))
    }
}
