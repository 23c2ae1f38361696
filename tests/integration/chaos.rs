//! Chaos: "nothing lost, nothing crashes", end to end.
//!
//! Everything real on loopback: one MariaDB database written the way
//! Bugzilla's PushNotify extension writes it, an active and a standby
//! `bzpush poll` (database and broker each through a [`Proxy`]), one test
//! exchange, two `bzpush serve` (each its own durable queue, broker through
//! a proxy of its own, catch-up database through a proxy), and a few hundred
//! WebSocket clients held by a few mio threads. While writers change bugs at
//! a few hundred changes per second, faults come at random moments from a
//! seeded PRNG: SIGKILL of the active poller (a new one starts as the next
//! standby), SIGKILL of a server (restarted on a new port with the same
//! queue; its clients reconnect to either server with `since`), broker and
//! database connections severed or refused for about a second.
//!
//! The writers change each bug the way Bugzilla does: `bugs.delta_ts`
//! first, then `push_notify` with `TestDb::push_notify_change`, every change
//! of one bug one second later than its previous one (the writers' clock:
//! seconds since they started), so each change has a distinct, known time.
//! A change counts as committed only when `push_notify_change` reports that
//! it landed. One that did not (the extension's read-then-update race with
//! the poller's DELETE, or a deadlock with it) is written again, so every
//! time put in `bugs.delta_ts` is eventually committed in `push_notify`.
//!
//! What is asserted, after the writers stop and the system settles:
//!
//! 1. Nothing lost: for every client and every bug it subscribes to, the
//!    latest `when` the client saw (live or through catch-up, over all its
//!    connections) is exactly the bug's latest committed `delta_ts`, and
//!    every bug's latest change was seen.
//! 2. No reordering: within one WebSocket connection, one bug's `when` never
//!    goes back in time in the live stream. Right after a bug's first update
//!    (a catch-up answer from the database gives only its latest time), one
//!    step back to a change still on its way is owed (README, "What a client
//!    is owed"). Equal times (duplicates) are
//!    allowed and counted, and so is an older time on a *new* connection
//!    (a catch-up from the cache answers every cached update since `since`).
//! 3. Nothing invented: every update is for a bug the client subscribed to,
//!    carries a time a writer wrote, and comes after the subscribe answer.
//! 4. Nothing grows without bound: each process's RSS at the end is below
//!    3 × its RSS at start + 50 MiB.
//! 5. Everything stops cleanly: SIGTERM to every process (servers first,
//!    with their clients connected): every client gets a close frame 1001,
//!    every process exits with status 0.
//!
//! Clients reconnect with `since` = the oldest of the last `when` seen of
//! each subscribed bug (the test start if a bug was never seen): one bug's
//! updates are ordered, different bugs' are not, so the last `when` of
//! whichever bug came last could skip another bug's change still in flight.
//! A `"partial": true` answer (the catch-up database was unreachable) makes
//! the client drop the connection and ask again later, as a client that
//! cannot refresh from the REST API would.
//!
//! Bounded by default (~40 s of chaos). `CHAOS_SECS=600` soaks longer;
//! `CHAOS_SEED=<n>` replays a run's fault schedule (printed at the start);
//! `CHAOS_NO_KILL=1` injects only link faults, so that the same processes
//! live through the whole soak and their memory can be watched. Run with
//! `--nocapture` to see the report.

use crate::util;

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, RwLock};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::util::{
    AMQP_ADDR, Bzpush, MYSQL_ADDR, Proxy, Rng, TestBroker, TestDb, rss_kib, unique, wait_until,
};
use mio::{Events, Interest, Poll, Token};
use mysql::prelude::Queryable;
use serde_json::{Value, json};
use tungstenite::protocol::Role;
use tungstenite::{Message, WebSocket};

/// Bugs `FIRST_BUG .. FIRST_BUG + BUGS`.
const FIRST_BUG: u32 = 100_000;
const BUGS: u32 = 300;
const CLIENTS: usize = 200;
const SUBSCRIPTIONS: usize = 50;
const CLIENT_THREADS: usize = 4;
const WRITERS: usize = 4;
/// Changes per second, all writers together.
const RATE: f64 = 250.0;
const DEFAULT_CHAOS_SECS: u64 = 40;
/// Pause between two faults, in milliseconds.
const FAULT_GAP_MS: (u64, u64) = (1000, 3000);
/// How long a refused ("down") link stays down, in milliseconds.
const DOWN_MS: (u64, u64) = (500, 1500);
/// After the writers stop, how long every client has to catch up.
const SETTLE: Duration = Duration::from_secs(30);
const STOP: Duration = Duration::from_secs(20);

#[test]
fn nothing_lost_nothing_crashes() {
    let chaos = Chaos::from_env("CHAOS", DEFAULT_CHAOS_SECS, RATE);
    let db = TestDb::new();
    setup_bugs(&db);
    let mut cluster = Cluster::start(&db);
    run(&mut cluster, &db, &chaos);
}

/// How long a chaos run injects faults, with which seed, at what rate the
/// writers change bugs; what every run prints first.
pub(super) struct Chaos {
    secs: u64,
    seed: u64,
    /// Changes per second, all writers together.
    rate: f64,
    /// Pause between two faults, in milliseconds.
    pub fault_gap_ms: (u64, u64),
    began: Instant,
}

impl Chaos {
    /// `{PREFIX}_SECS` (else `default_secs`) and `{PREFIX}_SEED` (else the
    /// clock) from the environment.
    pub fn from_env(prefix: &str, default_secs: u64, rate: f64) -> Chaos {
        let secs: u64 = env_number(&format!("{prefix}_SECS")).unwrap_or(default_secs);
        let seed = env_number(&format!("{prefix}_SEED")).unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
        println!(
            "chaos: seed {seed} (replay with {prefix}_SEED={seed}), {secs} s of faults, \
             {CLIENTS} clients x {SUBSCRIPTIONS} of {BUGS} bugs, ~{rate} changes/s"
        );
        Chaos {
            secs,
            seed,
            rate,
            fault_gap_ms: FAULT_GAP_MS,
            began: Instant::now(),
        }
    }
}

/// What a chaos run runs against: pollers and servers, and the faults it
/// can inject into them and what they depend on.
pub(super) trait System {
    /// The pollers, and the servers (one per slot; a killed server is
    /// replaced in its slot).
    fn processes(&mut self) -> (&mut Vec<Proc>, &mut Vec<Proc>);
    /// A new poller, once its log says it took one of `roles`
    /// ([`poller_in_role`]).
    fn start_poller(&self, roles: &[&str]) -> Proc;
    /// The server of `slot`, with that slot's queue, once healthy.
    fn start_server(&self, slot: usize) -> Proc;
    /// One fault, picked by `rng`; says what kind it was.
    fn inject(&mut self, rng: &mut Rng, world: &World, timeline: &mut Timeline) -> &'static str;
}

/// The chaos run against `system` (started, healthy) and `db` (its bugs
/// set up): clients, writers and faults, then the verdict, asserted.
pub(super) fn run(system: &mut impl System, db: &TestDb, chaos: &Chaos) {
    let (seed, began) = (chaos.seed, chaos.began);
    let mut rng = Rng(seed);
    let world = World::new(chaos.rate);
    *world.servers.write().expect("servers") = server_addrs(system);
    let clients = make_clients(&mut rng);
    let mut faults: BTreeMap<&'static str, u32> = BTreeMap::new();
    let mut stopped = Stopped::default();

    let mut timeline = Timeline::default();
    let (clients, settled) = thread::scope(|scope| {
        // Should anything below panic, the threads still stop and the
        // scope ends instead of waiting for them forever.
        let _stop = StopOnDrop(&world);
        let client_threads: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(t, clients)| {
                let (world, seed) = (&world, rng.next());
                thread::Builder::new()
                    .name(format!("chaos-clients-{t}"))
                    .spawn_scoped(scope, move || client_thread(t, world, clients, seed))
                    .expect("spawn a client thread")
            })
            .collect();
        assert!(
            wait_until(Duration::from_secs(30), || {
                world.answered.load(Ordering::SeqCst) == CLIENTS
            }),
            "only {} of {CLIENTS} clients got a subscribe answer",
            world.answered.load(Ordering::SeqCst)
        );
        // Memory baselines with every client connected.
        let (pollers, servers) = system.processes();
        for p in pollers.iter_mut().chain(servers.iter_mut()) {
            p.sample_start();
        }
        println!(
            "chaos: set up in {:.1} s; {CLIENTS} clients subscribed",
            began.elapsed().as_secs_f64()
        );

        let t0 = *world.t0.get_or_init(Instant::now);
        timeline.t0 = Some(t0);
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (world, db, seed) = (&world, db, rng.next());
                thread::Builder::new()
                    .name(format!("chaos-writer-{w}"))
                    .spawn_scoped(scope, move || writer(w, world, db, seed))
                    .expect("spawn a writer")
            })
            .collect();
        let chaos_end = t0 + Duration::from_secs(chaos.secs);
        loop {
            let (lo, hi) = chaos.fault_gap_ms;
            let gap = Duration::from_millis(rng.between(lo, hi));
            if Instant::now() + gap >= chaos_end {
                thread::sleep(chaos_end.saturating_duration_since(Instant::now()));
                break;
            }
            thread::sleep(gap);
            let kind = system.inject(&mut rng, &world, &mut timeline);
            *faults.entry(kind).or_default() += 1;
        }
        world.writers_stop.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().expect("a writer panicked");
        }
        let committed = world.committed.load(Ordering::SeqCst);
        timeline.note(format!(
            "writers stopped: {committed} changes committed, {:.0} per second",
            committed as f64 / t0.elapsed().as_secs_f64()
        ));

        // Settle: every client must reach every bug's latest committed time.
        let latest: Vec<Option<u32>> = world
            .bugs
            .iter()
            .map(|b| b.lock().expect("bug log").latest)
            .collect();
        world.latest.set(latest).expect("set once");
        let settled = wait_until(SETTLE, || {
            world.pending.iter().all(|p| p.load(Ordering::SeqCst) == 0)
        });
        let behind: u64 = world.pending.iter().map(|p| p.load(Ordering::SeqCst)).sum();
        timeline.note(format!(
            "settled: {settled}, {behind} (client, bug) pairs behind"
        ));
        if !settled {
            dump(system);
        }

        // Memory, then a clean stop of every process, servers first, with
        // their clients still connected.
        let (pollers, servers) = system.processes();
        for p in pollers.iter().chain(servers.iter()) {
            p.sample_end(&world, true);
        }
        world.no_reconnect.store(true, Ordering::SeqCst);
        stopped = stop(system, &world);
        world.stop_clients.store(true, Ordering::SeqCst);
        let clients: Vec<Client> = client_threads
            .into_iter()
            .flat_map(|t| t.join().expect("a client thread panicked"))
            .collect();
        (clients, settled)
    });

    let verdict = report(&world, &faults, &stopped, &clients, seed);
    println!(
        "chaos: total run time {:.1} s",
        began.elapsed().as_secs_f64()
    );
    let show = |lines: &[String]| {
        let mut shown: Vec<String> = lines.iter().take(30).cloned().collect();
        if lines.len() > 30 {
            shown.push(format!("... and {} more", lines.len() - 30));
        }
        shown.join("\n")
    };
    let timeline = timeline.lines.join("\n");
    assert!(
        verdict.missed.is_empty() && settled,
        "{} (client, bug) pairs never saw the latest committed change (seed {seed}):\n{}\n\
         timeline:\n{timeline}",
        verdict.missed.len(),
        show(&verdict.missed)
    );
    assert_eq!(
        verdict.latest_never_seen, 0,
        "a bug's latest change was never seen by anyone (seed {seed})"
    );
    let backwards = world.backwards.lock().expect("backwards");
    assert!(
        backwards.is_empty(),
        "{} times a bug's `when` went back in time within one connection (seed {seed}):\n{}\n\
         timeline:\n{timeline}",
        backwards.len(),
        show(&backwards)
    );
    let anomalies = world.anomalies.lock().expect("anomalies");
    assert!(
        anomalies.is_empty(),
        "unexpected frames (seed {seed}):\n{}",
        show(&anomalies)
    );
    assert!(
        verdict.grew.is_empty(),
        "processes grew: {:?}",
        verdict.grew
    );
    assert!(
        world.shutdown_closes.load(Ordering::SeqCst) >= stopped.connected,
        "not every connected client got a close frame (1001) at shutdown"
    );
    assert!(
        stopped.exits.iter().all(|e| e.ends_with("exit status: 0")),
        "not every process stopped cleanly on SIGTERM: {:?}",
        stopped.exits
    );
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
    )
}

/// `CLIENTS` clients, each subscribed to `SUBSCRIPTIONS` random bugs, dealt
/// out to `CLIENT_THREADS` threads.
fn make_clients(rng: &mut Rng) -> Vec<Vec<Client>> {
    let mut clients: Vec<Vec<Client>> = (0..CLIENT_THREADS).map(|_| Vec::new()).collect();
    for id in 0..CLIENTS {
        let mut bugs: Vec<u32> = Vec::new();
        while bugs.len() < SUBSCRIPTIONS {
            let bug = FIRST_BUG + rng.below(BUGS as usize) as u32;
            if !bugs.contains(&bug) {
                bugs.push(bug);
            }
        }
        bugs.sort_unstable();
        clients[id % CLIENT_THREADS].push(Client::new(id, bugs));
    }
    clients
}

/// What happened when, relative to the writers' start; printed as it
/// happens and again if the test fails.
#[derive(Default)]
pub(super) struct Timeline {
    t0: Option<Instant>,
    lines: Vec<String>,
}

impl Timeline {
    pub fn note(&mut self, what: String) {
        let at = self.t0.map_or(0.0, |t0| t0.elapsed().as_secs_f64());
        let line = format!("t={at:6.2}s {what}");
        println!("chaos: {line}");
        self.lines.push(line);
    }
}

/// The processes under test and the proxies between them and their
/// dependencies.
struct Cluster<'a> {
    db: &'a TestDb,
    broker: TestBroker,
    poller_db: Proxy,
    poller_amqp: Proxy,
    catchup_db: Proxy,
    server_amqp: [Proxy; 2],
    /// Each server slot's queue name, kept across restarts.
    queues: [String; 2],
    pollers: Vec<Proc>,
    servers: Vec<Proc>,
    /// Whether faults include kill -9.
    kills: bool,
}

impl<'a> Cluster<'a> {
    /// An active poller, a standby and two servers, all healthy.
    fn start(db: &'a TestDb) -> Cluster<'a> {
        let mut cluster = Cluster {
            db,
            broker: TestBroker::without_queue(),
            poller_db: Proxy::to(MYSQL_ADDR),
            poller_amqp: Proxy::to(AMQP_ADDR),
            catchup_db: Proxy::to(MYSQL_ADDR),
            server_amqp: [Proxy::to(AMQP_ADDR), Proxy::to(AMQP_ADDR)],
            queues: [unique("bzpush-chaos"), unique("bzpush-chaos")],
            pollers: Vec::new(),
            servers: Vec::new(),
            kills: env_number("CHAOS_NO_KILL").is_none_or(|n| n == 0),
        };
        populate(&mut cluster);
        cluster
    }
}

/// Starts an active poller, a standby and two servers in `system`.
pub(super) fn populate(system: &mut impl System) {
    let first = system.start_poller(&[ACTIVE]);
    let second = system.start_poller(&[STANDBY]);
    let servers = [system.start_server(0), system.start_server(1)];
    let (pollers, running) = system.processes();
    pollers.extend([first, second]);
    running.extend(servers);
}

/// `poller`, once its log says it took one of `roles`.
pub(super) fn poller_in_role(poller: Bzpush, roles: &[&str]) -> Proc {
    assert!(
        wait_until(Duration::from_secs(20), || {
            let log = poller.log();
            roles.iter().any(|role| log.contains(role))
        }),
        "the poller never logged any of {roles:?}:\n{}",
        poller.log()
    );
    Proc::new("poll", poller)
}

impl System for Cluster<'_> {
    fn processes(&mut self) -> (&mut Vec<Proc>, &mut Vec<Proc>) {
        (&mut self.pollers, &mut self.servers)
    }

    fn start_poller(&self, roles: &[&str]) -> Proc {
        let poller = Bzpush::poll(
            self.db,
            &self.poller_db.addr(),
            &self.poller_amqp.addr(),
            &self.broker.exchange,
            &[("BZPUSH_LOG", "info".to_string())],
        );
        poller_in_role(poller, roles)
    }

    fn start_server(&self, slot: usize) -> Proc {
        let server = Bzpush::serve_at(
            &self.server_amqp[slot].addr(),
            &format!("/={}", self.broker.exchange),
            &[
                ("BZPUSH_QUEUE", format!("queue/guest/{}", self.queues[slot])),
                (
                    "BZPUSH_CATCHUP_DATABASE_URL",
                    self.db.url_at(&self.catchup_db.addr()),
                ),
                ("BZPUSH_LOG", "info".to_string()),
            ],
        );
        server.wait_healthy();
        Proc::new("serve", server)
    }

    fn inject(&mut self, rng: &mut Rng, world: &World, timeline: &mut Timeline) -> &'static str {
        match if self.kills {
            rng.below(6)
        } else {
            2 + rng.below(4)
        } {
            0 => replace_active_poller(self, rng, world, timeline),
            1 => replace_server(self, rng, world, timeline),
            kind @ (2 | 3) => {
                let (proxy, name) = match rng.below(3) {
                    0 => (&self.poller_amqp, "the pollers' broker link".to_string()),
                    n => (
                        &self.server_amqp[n - 1],
                        format!("server {}'s broker link", n - 1),
                    ),
                };
                cut(proxy, kind == 2, &name, rng, timeline);
                if kind == 2 {
                    "sever a broker link"
                } else {
                    "broker link down ~1 s"
                }
            }
            kind => {
                let (proxy, name) = if rng.below(2) == 0 {
                    (&self.poller_db, "the pollers' database link")
                } else {
                    (&self.catchup_db, "the servers' catch-up database link")
                };
                cut(proxy, kind == 4, name, rng, timeline);
                if kind == 4 {
                    "sever a database link"
                } else {
                    "database link down ~1 s"
                }
            }
        }
    }
}

/// Kills the active poller (a random one if none says it is active) and
/// starts another.
pub(super) fn replace_active_poller(
    system: &mut impl System,
    rng: &mut Rng,
    world: &World,
    timeline: &mut Timeline,
) -> &'static str {
    let (pollers, _) = system.processes();
    let active = pollers
        .iter()
        .position(|p| poller_is_active(&p.bzpush))
        .unwrap_or_else(|| rng.below(pollers.len()));
    let mut old = pollers.remove(active);
    old.sample_end(world, false);
    old.bzpush.kill9();
    timeline.note(format!(
        "kill -9 the active poller (pid {})",
        old.bzpush.pid()
    ));
    // The standby usually takes over; but if it is in a backoff after a
    // fault, the new one may be first.
    let mut new = system.start_poller(&[STANDBY, ACTIVE]);
    new.sample_start();
    timeline.note(format!(
        "  started poller pid {} ({})",
        new.bzpush.pid(),
        if poller_is_active(&new.bzpush) {
            "active"
        } else {
            "standby"
        }
    ));
    system.processes().0.push(new);
    "kill -9 the active poller"
}

/// Kills a random server and starts another in its slot, with its queue;
/// its clients reconnect to either server.
pub(super) fn replace_server(
    system: &mut impl System,
    rng: &mut Rng,
    world: &World,
    timeline: &mut Timeline,
) -> &'static str {
    let slot = rng.below(2);
    let old = &mut system.processes().1[slot];
    let addr = old.bzpush.listen_addr();
    world
        .servers
        .write()
        .expect("servers")
        .retain(|a| *a != addr);
    old.sample_end(world, false);
    old.bzpush.kill9();
    timeline.note(format!(
        "kill -9 server {slot} (pid {}, {addr})",
        old.bzpush.pid()
    ));
    let mut new = system.start_server(slot);
    new.sample_start();
    let addr = new.bzpush.listen_addr();
    timeline.note(format!(
        "  restarted server {slot} (pid {}) on {addr}, same queue",
        new.bzpush.pid()
    ));
    world.servers.write().expect("servers").push(addr);
    system.processes().1[slot] = new;
    "kill -9 a server"
}

fn server_addrs(system: &mut impl System) -> Vec<String> {
    let (_, servers) = system.processes();
    servers.iter().map(|s| s.bzpush.listen_addr()).collect()
}

/// Prints the end of every running process's log, and what the
/// servers count: what a stuck pipeline looks like.
fn dump(system: &mut impl System) {
    let (pollers, servers) = system.processes();
    for p in pollers.iter().chain(servers.iter()) {
        let log = p.bzpush.log();
        let lines: Vec<&str> = log.lines().collect();
        println!(
            "chaos: ---- {} pid {}, last lines of its log ----",
            p.name,
            p.bzpush.pid()
        );
        for line in &lines[lines.len().saturating_sub(15)..] {
            println!("chaos: | {line}");
        }
    }
    for p in servers.iter() {
        let addr = p.bzpush.listen_addr();
        println!(
            "chaos: server pid {}: /health {:?}",
            p.bzpush.pid(),
            util::serve::http_get(&addr, "/health")
        );
    }
}

/// How the processes ended on SIGTERM, and how many clients were
/// connected when the servers got it.
#[derive(Default)]
pub(super) struct Stopped {
    exits: Vec<String>,
    connected: u64,
}

/// SIGTERM to every process, servers first; how each ended.
fn stop(system: &mut impl System, world: &World) -> Stopped {
    let connected = world.answered.load(Ordering::SeqCst) as u64;
    let (pollers, servers) = system.processes();
    for p in servers.iter().chain(pollers.iter()) {
        p.bzpush.sigterm();
    }
    let mut exits = Vec::new();
    for p in servers.iter_mut().chain(pollers.iter_mut()) {
        let status = p.bzpush.wait_exit(STOP);
        exits.push(format!(
            "{} pid {}: {}",
            p.name,
            p.bzpush.pid(),
            status.map_or("still running".to_string(), |s| s.to_string())
        ));
    }
    // Their threads read the close frames.
    wait_until(Duration::from_secs(5), || {
        world.shutdown_closes.load(Ordering::SeqCst) >= connected
    });
    Stopped { exits, connected }
}

/// Severs every connection through `proxy`, or refuses connections for
/// about a second.
fn cut(proxy: &Proxy, sever: bool, name: &str, rng: &mut Rng, timeline: &mut Timeline) {
    if sever {
        proxy.sever();
        timeline.note(format!("sever {name}"));
    } else {
        let down = Duration::from_millis(rng.between(DOWN_MS.0, DOWN_MS.1));
        proxy.set_down(true);
        thread::sleep(down);
        proxy.set_down(false);
        timeline.note(format!("{name} down for {down:?}"));
    }
}

/// What the report found.
struct Verdict {
    /// (client, bug) pairs that never saw the bug's latest committed time.
    missed: Vec<String>,
    /// Bugs whose latest change no client ever saw.
    latest_never_seen: usize,
    /// Processes whose memory grew past the bound.
    grew: Vec<String>,
}

/// Prints what the run did and measured.
fn report(
    world: &World,
    faults: &BTreeMap<&'static str, u32>,
    stopped: &Stopped,
    clients: &[Client],
    seed: u64,
) -> Verdict {
    let latest = world.latest.get().expect("latest");
    let mut missed = Vec::new();
    let mut pairs = 0;
    for client in clients {
        for &bug in &client.bugs {
            let Some(want) = latest[(bug - FIRST_BUG) as usize] else {
                continue;
            };
            pairs += 1;
            let got = client.seen.get(&bug).copied();
            if got != Some(want) {
                missed.push(format!(
                    "client {} bug {bug}: latest committed {}, saw {} ({} connections)",
                    client.id,
                    wire(want),
                    got.map_or("nothing".to_string(), wire),
                    client.connections
                ));
            }
        }
    }
    let mut delays: Vec<Duration> = Vec::new();
    let (mut superseded, mut latest_never_seen) = (0, 0);
    for (i, log) in world.bugs.iter().enumerate() {
        let log = log.lock().expect("bug log");
        for change in &log.changes {
            let committed = change.committed.expect("every change was committed");
            match change.first_seen {
                Some(seen) => delays.push(seen.saturating_duration_since(committed)),
                None if latest[i] == Some(change.secs) => latest_never_seen += 1,
                None => superseded += 1,
            }
        }
    }
    delays.sort_unstable();
    let quantile = |q: f64| {
        let i = ((delays.len() as f64 * q) as usize).min(delays.len().saturating_sub(1));
        delays
            .get(i)
            .map_or("-".to_string(), |d| format!("{} ms", d.as_millis()))
    };
    let c = |a: &AtomicU64| a.load(Ordering::SeqCst);
    println!("chaos: ---- report (seed {seed}) ----");
    println!(
        "chaos: changes committed: {} ({} writes did not land, lost to the extension's \
         read-then-update race or a deadlock with the poller's DELETE, and were written again)",
        c(&world.committed),
        c(&world.lost_writes)
    );
    println!("chaos: faults injected: {}", faults.values().sum::<u32>());
    for (kind, n) in faults {
        println!("chaos:   {n:3} {kind}");
    }
    println!(
        "chaos: client connections: {} ({} reconnects), {} failed connects, {} partial answers \
         (client asked again), {} closed by a server before shutdown; at shutdown {} of {} \
         connected clients got a close frame 1001",
        c(&world.connections),
        c(&world.connections).saturating_sub(CLIENTS as u64),
        c(&world.connect_failures),
        c(&world.partial),
        c(&world.server_closes),
        c(&world.shutdown_closes),
        stopped.connected
    );
    println!(
        "chaos: updates received: {}; duplicates (a time the client had seen) {}, older than \
         already seen (on a new connection) {}, back in time within a connection {}",
        c(&world.updates),
        c(&world.duplicates),
        c(&world.stale),
        world.backwards.lock().expect("backwards").len()
    );
    println!(
        "chaos: delivery delay, commit to first sight by a subscriber, over {} changes: p50 {}, \
         p99 {}, max {}; {superseded} changes superseded before anyone saw them",
        delays.len(),
        quantile(0.5),
        quantile(0.99),
        quantile(1.0)
    );
    println!(
        "chaos: (client, bug) pairs at the latest committed time: {} of {pairs}",
        pairs - missed.len()
    );
    let memory = world.rss.lock().expect("rss");
    let grew: Vec<String> = memory
        .iter()
        .filter(|m| m.grew_too_much())
        .map(ToString::to_string)
        .collect();
    let most = memory
        .iter()
        .max_by_key(|m| m.end_kib.saturating_sub(m.start_kib));
    println!(
        "chaos: memory of {} processes, each at start and just before kill -9 or SIGTERM; \
         the most growth: {}",
        memory.len(),
        most.map_or("-".to_string(), ToString::to_string)
    );
    for m in memory.iter().filter(|m| m.last) {
        println!("chaos: rss {m}");
    }
    for exit in &stopped.exits {
        println!("chaos: SIGTERM: {exit}");
    }
    Verdict {
        missed,
        latest_never_seen,
        grew,
    }
}

/// The `bugs` rows the writers update, stamped before the test start.
pub(super) fn setup_bugs(db: &TestDb) {
    let values: Vec<String> = (FIRST_BUG..FIRST_BUG + BUGS)
        .map(|bug| format!("({bug}, '2025-12-31 00:00:00')"))
        .collect();
    db.conn()
        .query_drop(format!(
            "INSERT INTO bugs (bug_id, delta_ts) VALUES {}",
            values.join(",")
        ))
        .expect("insert the bugs");
}

/// Change times: seconds after `2026-01-01 00:00:00` (the test start, the
/// `since` of a client that has seen nothing yet), within January.
fn wire(secs: u32) -> String {
    let (day, rem) = (secs / 86_400, secs % 86_400);
    format!(
        "2026-01-{:02}T{:02}:{:02}:{:02}",
        day + 1,
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn parse_wire(s: &str) -> Option<u32> {
    let rest = s.strip_prefix("2026-01-")?;
    let b = rest.as_bytes();
    if b.len() != 11 || b[2] != b'T' || b[5] != b':' || b[8] != b':' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| rest.get(r)?.parse::<u32>().ok();
    Some((n(0..2)? - 1) * 86_400 + n(3..5)? * 3600 + n(6..8)? * 60 + n(9..11)?)
}

/// A bzpush process and its memory at start.
pub(super) struct Proc {
    name: &'static str,
    pub bzpush: Bzpush,
    rss_start: u64,
    sampled: Instant,
}

impl Proc {
    pub fn new(name: &'static str, bzpush: Bzpush) -> Proc {
        Proc {
            name,
            bzpush,
            rss_start: 0,
            sampled: Instant::now(),
        }
    }

    fn sample_start(&mut self) {
        self.rss_start = rss_kib(self.bzpush.pid());
        self.sampled = Instant::now();
    }

    /// Records its memory now against its memory at start: just before it
    /// is killed, or at the end of the run (`last`).
    fn sample_end(&self, world: &World, last: bool) {
        world.rss.lock().expect("rss").push(Memory {
            name: self.name,
            pid: self.bzpush.pid(),
            start_kib: self.rss_start,
            end_kib: rss_kib(self.bzpush.pid()),
            lived: self.sampled.elapsed(),
            last,
        });
    }
}

/// A process's memory over its life.
struct Memory {
    name: &'static str,
    pid: u32,
    start_kib: u64,
    end_kib: u64,
    lived: Duration,
    /// Still running at the end of the run.
    last: bool,
}

impl Memory {
    fn grew_too_much(&self) -> bool {
        self.end_kib > 3 * self.start_kib + 50 * 1024
    }
}

impl std::fmt::Display for Memory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} pid {}: {} KiB at start, {} KiB {:.0} s later",
            self.name,
            self.pid,
            self.start_kib,
            self.end_kib,
            self.lived.as_secs_f64()
        )
    }
}

/// What a poller logs when it becomes active, or a standby.
pub(super) const ACTIVE: &str = "active: holding";
pub(super) const STANDBY: &str = "standby: ";

/// Whether a poller's latest role line says it is active.
fn poller_is_active(poller: &Bzpush) -> bool {
    let log = poller.log();
    match (log.rfind(ACTIVE), log.rfind(STANDBY)) {
        (Some(a), Some(s)) => a > s,
        (Some(_), None) => true,
        _ => false,
    }
}

/// One change a writer made.
struct Change {
    secs: u32,
    committed: Option<Instant>,
    first_seen: Option<Instant>,
}

#[derive(Default)]
struct BugLog {
    /// In the order written: `secs` ascending.
    changes: Vec<Change>,
    /// The latest committed time.
    latest: Option<u32>,
}

/// What the writers, the clients and the test share.
pub(super) struct World {
    /// Changes per second, all writers together.
    rate: f64,
    /// When the writers started: their times follow its seconds.
    t0: OnceLock<Instant>,
    bugs: Vec<Mutex<BugLog>>,
    /// Every bug's latest committed time, once the writers stopped.
    latest: OnceLock<Vec<Option<u32>>>,
    /// Addresses of the running servers.
    servers: RwLock<Vec<String>>,
    writers_stop: AtomicBool,
    no_reconnect: AtomicBool,
    stop_clients: AtomicBool,
    /// Clients whose current connection got its subscribe answer.
    answered: AtomicUsize,
    /// Per client thread: (client, bug) pairs behind the latest committed.
    pending: Vec<AtomicU64>,
    committed: AtomicU64,
    lost_writes: AtomicU64,
    connections: AtomicU64,
    connect_failures: AtomicU64,
    partial: AtomicU64,
    server_closes: AtomicU64,
    shutdown_closes: AtomicU64,
    updates: AtomicU64,
    duplicates: AtomicU64,
    stale: AtomicU64,
    backwards: Mutex<Vec<String>>,
    anomalies: Mutex<Vec<String>>,
    /// Each process's memory at start and just before it ended.
    rss: Mutex<Vec<Memory>>,
}

impl World {
    fn new(rate: f64) -> World {
        World {
            rate,
            t0: OnceLock::new(),
            bugs: (0..BUGS).map(|_| Mutex::new(BugLog::default())).collect(),
            latest: OnceLock::new(),
            servers: RwLock::new(Vec::new()),
            writers_stop: AtomicBool::new(false),
            no_reconnect: AtomicBool::new(false),
            stop_clients: AtomicBool::new(false),
            answered: AtomicUsize::new(0),
            pending: (0..CLIENT_THREADS)
                .map(|_| AtomicU64::new(u64::MAX))
                .collect(),
            committed: AtomicU64::new(0),
            lost_writes: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            partial: AtomicU64::new(0),
            server_closes: AtomicU64::new(0),
            shutdown_closes: AtomicU64::new(0),
            updates: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            stale: AtomicU64::new(0),
            backwards: Mutex::new(Vec::new()),
            anomalies: Mutex::new(Vec::new()),
            rss: Mutex::new(Vec::new()),
        }
    }

    fn anomaly(&self, what: String) {
        self.anomalies.lock().expect("anomalies").push(what);
    }
}

/// Stops the writers and the clients when dropped.
struct StopOnDrop<'a>(&'a World);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.writers_stop.store(true, Ordering::SeqCst);
        self.0.no_reconnect.store(true, Ordering::SeqCst);
        self.0.stop_clients.store(true, Ordering::SeqCst);
    }
}

/// Changes the bugs `w` owns (no other writer touches them, as no two
/// Bugzilla requests write one bug's row at once) at `world.rate / WRITERS` per
/// second: `bugs.delta_ts` first, then `push_notify` as the extension does,
/// again if the extension's race lost the write.
fn writer(w: usize, world: &World, db: &TestDb, seed: u64) {
    let mut rng = Rng(seed);
    let mut conn = db.conn();
    let owned: Vec<u32> = (FIRST_BUG..FIRST_BUG + BUGS)
        .filter(|b| (b - FIRST_BUG) as usize % WRITERS == w)
        .collect();
    let mut last: HashMap<u32, u32> = HashMap::new();
    let interval = Duration::from_secs_f64(WRITERS as f64 / world.rate);
    let t0 = *world.t0.get().expect("t0");
    let mut next = Instant::now();
    while !world.writers_stop.load(Ordering::SeqCst) {
        let now = Instant::now();
        if next > now {
            thread::sleep(next - now);
        } else if now - next > Duration::from_secs(1) {
            next = now; // behind: no burst to catch up
        }
        next += interval;
        let bug = *rng.pick(&owned);
        let now_secs = 1 + t0.elapsed().as_secs() as u32;
        let secs = last.get(&bug).map_or(now_secs, |l| now_secs.max(l + 1));
        last.insert(bug, secs);
        let log = &world.bugs[(bug - FIRST_BUG) as usize];
        log.lock().expect("bug log").changes.push(Change {
            secs,
            committed: None,
            first_seen: None,
        });
        let sql = wire(secs).replace('T', " ");
        conn.exec_drop("UPDATE bugs SET delta_ts = ? WHERE bug_id = ?", (&sql, bug))
            .expect("update bugs");
        while !TestDb::push_notify_change(&mut conn, bug, Some(&sql)) {
            world.lost_writes.fetch_add(1, Ordering::SeqCst);
        }
        let at = Instant::now();
        let mut log = log.lock().expect("bug log");
        log.latest = Some(secs);
        if let Some(change) = log.changes.last_mut() {
            change.committed = Some(at);
        }
        world.committed.fetch_add(1, Ordering::SeqCst);
    }
}

/// One WebSocket client: its subscriptions, what it saw, its connection.
struct Client {
    id: usize,
    /// Sorted.
    bugs: Vec<u32>,
    /// The latest time seen of each bug, over every connection.
    seen: HashMap<u32, u32>,
    conn: Option<Conn>,
    retry_at: Instant,
    connections: u64,
}

struct Conn {
    ws: WebSocket<mio::net::TcpStream>,
    server: String,
    since: u32,
    answered: bool,
    /// The latest time this connection delivered of each bug, and how many
    /// updates of it.
    last: HashMap<u32, (u32, u32)>,
}

impl Client {
    fn new(id: usize, bugs: Vec<u32>) -> Client {
        Client {
            id,
            bugs,
            seen: HashMap::new(),
            conn: None,
            retry_at: Instant::now(),
            connections: 0,
        }
    }

    /// The oldest of the latest times seen of each bug: nothing newer than
    /// it can have been missed. 0 (the test start) if a bug was never seen.
    fn since(&self) -> u32 {
        self.bugs
            .iter()
            .map(|b| self.seen.get(b).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    fn connect(&mut self, world: &World, rng: &mut Rng) -> Result<(), String> {
        let servers = world.servers.read().expect("servers").clone();
        if servers.is_empty() {
            return Err("no server".into());
        }
        let server = rng.pick(&servers).clone();
        let addr = server.parse().map_err(|e| format!("{server}: {e}"))?;
        let socket =
            TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        socket
            .set_write_timeout(Some(Duration::from_secs(5)))
            .map_err(|e| e.to_string())?;
        let (ws, _) = tungstenite::client::client(format!("ws://{server}/"), socket)
            .map_err(|e| format!("handshake: {e}"))?;
        // The server says nothing before it is asked: nothing is buffered.
        let socket = ws.into_inner();
        socket.set_nonblocking(true).map_err(|e| e.to_string())?;
        let mut ws =
            WebSocket::from_raw_socket(mio::net::TcpStream::from_std(socket), Role::Client, None);
        let since = self.since();
        let subscribe = json!({"command": "subscribe", "bugs": self.bugs, "since": wire(since)});
        ws.send(Message::text(subscribe.to_string()))
            .map_err(|e| format!("subscribe: {e}"))?;
        self.connections += 1;
        world.connections.fetch_add(1, Ordering::SeqCst);
        self.conn = Some(Conn {
            ws,
            server,
            since,
            answered: false,
            last: HashMap::new(),
        });
        Ok(())
    }

    /// Reads every frame that is there. `Err`: the connection is over.
    fn pump(&mut self, world: &World) -> Result<(), String> {
        loop {
            let conn = self.conn.as_mut().expect("connected");
            match conn.ws.read() {
                Ok(Message::Text(text)) => {
                    let frame: Value = serde_json::from_str(text.as_str())
                        .map_err(|e| format!("not JSON: {e}: {text}"))?;
                    self.frame(world, &frame)?;
                }
                Ok(Message::Close(frame)) => {
                    let code = frame.as_ref().map(|f| u16::from(f.code));
                    if !world.no_reconnect.load(Ordering::SeqCst) {
                        world.server_closes.fetch_add(1, Ordering::SeqCst);
                    } else if code == Some(1001) {
                        world.shutdown_closes.fetch_add(1, Ordering::SeqCst);
                    } else {
                        world.anomaly(format!(
                            "client {}: closed with {frame:?} at shutdown",
                            self.id
                        ));
                    }
                    return Err(format!("closed by the server: {frame:?}"));
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                    return Ok(());
                }
                Err(e) => return Err(e.to_string()),
            }
        }
    }

    fn frame(&mut self, world: &World, frame: &Value) -> Result<(), String> {
        let conn = self.conn.as_mut().expect("connected");
        match (frame["command"].as_str(), frame["result"].as_str()) {
            (Some("subscribe"), Some("ok")) if !conn.answered => {
                conn.answered = true;
                world.answered.fetch_add(1, Ordering::SeqCst);
                if frame["partial"] == json!(true) {
                    world.partial.fetch_add(1, Ordering::SeqCst);
                    return Err("partial catch-up: ask again later".into());
                }
                Ok(())
            }
            (Some("update"), None) => {
                world.updates.fetch_add(1, Ordering::SeqCst);
                let bug = frame["bug"].as_u64().map(|b| b as u32);
                let secs = frame["when"].as_str().and_then(parse_wire);
                let (Some(bug), Some(secs)) = (bug, secs) else {
                    world.anomaly(format!("client {}: a bad update {frame}", self.id));
                    return Ok(());
                };
                if !conn.answered || self.bugs.binary_search(&bug).is_err() {
                    world.anomaly(format!(
                        "client {}: update before the answer or for a bug not subscribed: {frame}",
                        self.id
                    ));
                    return Ok(());
                }
                let log = &world.bugs[(bug - FIRST_BUG) as usize];
                {
                    let mut log = log.lock().expect("bug log");
                    match log.changes.binary_search_by_key(&secs, |c| c.secs) {
                        Ok(i) => {
                            let change = &mut log.changes[i];
                            change.first_seen.get_or_insert_with(Instant::now);
                        }
                        Err(_) => world.anomaly(format!(
                            "client {}: bug {bug} at {}, a time no writer wrote",
                            self.id,
                            wire(secs)
                        )),
                    }
                }
                // A catch-up from the database gives a bug's latest time
                // while older changes may still be on their way live; a client
                // is owed those too (README, "What a client is owed"). So right after a bug's first update on
                // the connection, one step back is allowed, and the stream
                // goes on from there; any other step back is reordering.
                let (previous, count) = conn.last.get(&bug).copied().unwrap_or((secs, 0));
                if secs < previous && count == 1 {
                    conn.last.insert(bug, (secs, 2));
                } else if secs < previous {
                    world.backwards.lock().expect("backwards").push(format!(
                        "client {} on {} (since {}): bug {bug} went from {} back to {}",
                        self.id,
                        conn.server,
                        wire(conn.since),
                        wire(previous),
                        wire(secs)
                    ));
                }
                let entry = conn.last.entry(bug).or_insert((secs, 0));
                *entry = (entry.0.max(secs), entry.1 + 1);
                let seen = self.seen.entry(bug).or_insert(0);
                if secs == *seen {
                    world.duplicates.fetch_add(1, Ordering::SeqCst);
                } else if secs < *seen {
                    world.stale.fetch_add(1, Ordering::SeqCst);
                }
                *seen = (*seen).max(secs);
                Ok(())
            }
            _ => {
                world.anomaly(format!("client {}: unexpected frame {frame}", self.id));
                Ok(())
            }
        }
    }

    /// (client, bug) pairs not at the latest committed time.
    fn behind(&self, latest: &[Option<u32>]) -> u64 {
        self.bugs
            .iter()
            .filter(|&&b| {
                latest[(b - FIRST_BUG) as usize].is_some_and(|l| self.seen.get(&b) != Some(&l))
            })
            .count() as u64
    }
}

/// Holds `clients` on one mio poll until `stop_clients`; returns them.
fn client_thread(t: usize, world: &World, mut clients: Vec<Client>, seed: u64) -> Vec<Client> {
    let mut rng = Rng(seed);
    let mut poll = Poll::new().expect("mio poll");
    let mut events = Events::with_capacity(1024);
    let mut last_check = Instant::now();
    let drop_conn = |client: &mut Client, poll: &Poll, rng: &mut Rng, world: &World| {
        if let Some(conn) = client.conn.take() {
            let mut conn = conn;
            let _ = poll.registry().deregister(conn.ws.get_mut());
            if conn.answered {
                world.answered.fetch_sub(1, Ordering::SeqCst);
            }
        }
        client.retry_at = Instant::now() + Duration::from_millis(rng.between(100, 700));
    };
    while !world.stop_clients.load(Ordering::SeqCst) {
        poll.poll(&mut events, Some(Duration::from_millis(20)))
            .or_else(|e| {
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .expect("poll");
        for event in events.iter() {
            let client = &mut clients[event.token().0];
            if client.conn.is_some()
                && let Err(_why) = client.pump(world)
            {
                drop_conn(client, &poll, &mut rng, world);
            }
        }
        let now = Instant::now();
        if !world.no_reconnect.load(Ordering::SeqCst) {
            for (i, client) in clients.iter_mut().enumerate() {
                if client.conn.is_some() || client.retry_at > now {
                    continue;
                }
                match client.connect(world, &mut rng) {
                    Ok(()) => {
                        let ws = &mut client.conn.as_mut().expect("connected").ws;
                        poll.registry()
                            .register(ws.get_mut(), Token(i), Interest::READABLE)
                            .expect("register a client socket");
                        if client.pump(world).is_err() {
                            drop_conn(client, &poll, &mut rng, world);
                        }
                    }
                    Err(_) => {
                        world.connect_failures.fetch_add(1, Ordering::SeqCst);
                        client.retry_at =
                            Instant::now() + Duration::from_millis(rng.between(200, 700));
                    }
                }
            }
        }
        if let Some(latest) = world.latest.get()
            && now - last_check > Duration::from_millis(100)
        {
            last_check = now;
            let behind = clients.iter().map(|c| c.behind(latest)).sum();
            world.pending[t].store(behind, Ordering::SeqCst);
        }
    }
    for client in &mut clients {
        drop_conn(client, &poll, &mut rng, world);
    }
    clients
}
