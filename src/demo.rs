//! `bzpush demo`: the server of `bzpush run`, fed by a simulated Bugzilla
//! in which [`BUGS`] keep changing, so a newcomer or a client developer
//! sees updates, `since` and `partial` without a Bugzilla.
//!
//! Either way `run`'s poller polls a `push_notify` table that a thread
//! writes as Mozilla's PushNotify extension does. With no database the
//! table is in memory ([`poller::memory`]), and the poller, the hub and the
//! server are `run`'s. With a database server it creates a scratch database
//! of its own (Bugzilla's `bugs` and `push_notify` tables) and runs `run`'s
//! whole pipeline on it, catch-up from the scratch `bugs` table included.
//! It drops that database when it stops, however it stops short of a
//! crash. It must never touch any other database: it creates its scratch
//! database under a fresh name and drops only that name.

use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::ops::RangeInclusive;
use std::thread::{self, JoinHandle};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{info, warn};
use mysql::prelude::Queryable;
use mysql::{Conn, OptsBuilder};

use crate::config::{DatabaseUrl, DemoConfig, PollerConfig, RunConfig, Source};
use crate::database;
use crate::notification::{BugId, ChangeTime};
use crate::poller::{self, memory};
use crate::pulse::rfc3339_utc;
use crate::retry::Link;
use crate::server;
use crate::shutdown::{self, Shutdown};

/// The simulated bugs; the live page subscribes to them by itself.
pub const BUGS: RangeInclusive<u32> = 1..=20;
/// How often one or two of them change: often enough that a page opened
/// now shows a change within a second; each bug changes every few seconds.
const TICK: Duration = Duration::from_millis(500);
/// At most this many of them change per tick (at least one does).
const CHANGES_PER_TICK: u64 = 2;
/// A statement on the scratch database slower than this means it is gone.
const DB_TIMEOUT: Duration = Duration::from_secs(10);
/// Rows the poller reads per poll: far more than a tick writes.
const BATCH_SIZE: usize = 1000;
/// The poller's overlap (source `bugs` only; the demo uses `push_notify`).
const OVERLAP: Duration = Duration::from_secs(30);
/// The poller lock in memory: the process's own.
const MEMORY_LOCK: &str = "bzpush.poller.demo";

/// Binds `addr`. When the address is the default one (`--listen` not
/// given) and its port is taken, say by another demo, any free port on
/// the same address does: the address printed is the one bound.
pub fn bind(addr: SocketAddr, listen_given: bool) -> Result<TcpListener, String> {
    match TcpListener::bind(addr) {
        Ok(listener) => Ok(listener),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse && !listen_given => {
            let listener = TcpListener::bind(SocketAddr::new(addr.ip(), 0))
                .map_err(|e| format!("cannot listen on {} (BZPUSH_LISTEN): {e}", addr.ip()))?;
            if let Ok(bound) = listener.local_addr() {
                warn!("{addr} is busy; the demo listens on {bound} instead (choose with --listen)");
            }
            Ok(listener)
        }
        Err(e) => Err(format!("cannot listen on {addr} (BZPUSH_LISTEN): {e}")),
    }
}

/// Runs the demo on `listener` until `shutdown`. Prints one line to
/// stdout, the page's address, once the demo is ready to serve it.
pub fn run(config: &DemoConfig, listener: TcpListener, shutdown: &Shutdown) -> Result<(), String> {
    let mut server_config = config.server.clone();
    server_config.page_bugs = BUGS.collect();
    server_config.page_note = Some(format!(
        "This is bzpush demo: the Bugzilla behind it is simulated. One or two of \
         bugs {}–{} change every half second, each change shown as it arrives; nothing comes \
         from a real Bugzilla.",
        BUGS.start(),
        BUGS.end()
    ));
    let Some(url) = &config.database else {
        return run_in_memory(config, server_config, listener, shutdown);
    };
    let scratch = Scratch::create(url)?;
    let result = run_on_database(config, &scratch, server_config, listener, shutdown);
    scratch.drop_database();
    result
}

/// The page's address, the one line the demo prints.
fn print_address(addr: SocketAddr) {
    // A browser cannot open 0.0.0.0: the same port answers on loopback.
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    let mut out = io::stdout().lock();
    // Nobody reading stdout is no reason to stop serving.
    let _ = writeln!(out, "http://{}/", SocketAddr::new(ip, addr.port()));
    let _ = out.flush();
}

/// A small pseudo-random generator: which bugs change is all it decides.
struct Dice(u64);

impl Dice {
    fn new() -> Dice {
        let seed = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64);
        Dice(seed | 1)
    }

    /// Some of [`BUGS`], each at most once.
    fn bugs(&mut self) -> Vec<u32> {
        let count = 1 + self.next() % CHANGES_PER_TICK;
        let mut bugs: Vec<u32> = (0..count)
            .map(|_| BUGS.start() + (self.next() % u64::from(BUGS.end() - BUGS.start() + 1)) as u32)
            .collect();
        bugs.sort_unstable();
        bugs.dedup();
        bugs
    }

    fn next(&mut self) -> u64 {
        // xorshift64
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `run`'s server and poller on a simulated Bugzilla database in memory,
/// with a thread writing the simulated changes into it, until `shutdown`.
fn run_in_memory(
    config: &DemoConfig,
    server_config: crate::config::ServerConfig,
    listener: TcpListener,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let addr = listener
        .local_addr()
        .map_err(|e| format!("cannot read the listening address: {e}"))?;
    info!("demo: simulating Bugzilla's database in memory; bugs {BUGS:?} change every {TICK:?}");
    let table = memory::Table::new();
    // Stops the simulator if the server ends on its own (a failure).
    let (mut stop, stopped) = shutdown::channel();
    let simulator = {
        let (table, stop) = (table.clone(), shutdown.clone());
        // Without it the demo shows nothing: its end ends the demo.
        shutdown::spawn_essential(
            "demo-bugzilla".into(),
            thread::Builder::new(),
            shutdown,
            move || simulate_in_memory(&table, &stop, &stopped),
        )
        .map_err(|e| format!("cannot start the simulated Bugzilla: {e}"))?
    };
    let poll_interval = config.poll_interval;
    let result = server::run_fed(
        &server_config,
        config.stale_after,
        "database",
        listener,
        shutdown,
        |sink, metrics| {
            // The server is ready once it runs: connections made before
            // the accept loop wait in the listen backlog.
            print_address(addr);
            let shutdown = shutdown.clone();
            shutdown::spawn_essential(
                "poller".into(),
                thread::Builder::new(),
                &shutdown.clone(),
                move || {
                    poller::run_in_memory(
                        &table,
                        MEMORY_LOCK,
                        poll_interval,
                        BATCH_SIZE,
                        sink,
                        &metrics,
                        &shutdown,
                    )
                },
            )
        },
    )
    .map_err(|e| e.to_string());
    stop.fire();
    join(simulator);
    result
}

/// Writes the simulated changes into `table` until `shutdown` or
/// `stopped`: every tick some bugs change now (UTC).
fn simulate_in_memory(table: &memory::Table, shutdown: &Shutdown, stopped: &Shutdown) {
    let mut dice = Dice::new();
    while !shutdown.sleep(TICK) && !stopped.requested() {
        let now = rfc3339_utc(SystemTime::now());
        let when = ChangeTime::new(&now[..19]);
        for bug in dice.bugs().into_iter().filter_map(BugId::new) {
            table.change(bug, when.clone());
        }
    }
    info!("demo: simulated Bugzilla stopped");
}

/// The demo's own database on the server the user named.
struct Scratch {
    /// The server, without a database: to create and drop the scratch one.
    server: DatabaseUrl,
    name: String,
    url: DatabaseUrl,
}

impl Scratch {
    /// Creates a database under a fresh name with Bugzilla's `bugs` (just
    /// the columns bzpush reads) and PushNotify's `push_notify`, and the
    /// bugs in it. A failure halfway drops what was created.
    fn create(server: &DatabaseUrl) -> Result<Scratch, String> {
        let stamp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        let name = format!("bzpush_demo_{}_{stamp}", std::process::id());
        let scratch = Scratch {
            server: server.clone(),
            url: server.with_database(&name),
            name,
        };
        let mut admin = scratch.admin()?;
        admin
            .query_drop(format!("CREATE DATABASE `{}`", scratch.name))
            .map_err(|e| {
                format!(
                    "cannot create a scratch database on {}: {}; \
                     the account needs CREATE and DROP (or run the demo without --database-url)",
                    scratch.server,
                    database::Sentence(&e)
                )
            })?;
        info!(
            "demo: created scratch database {} on {}",
            scratch.name, scratch.server
        );
        // Filed a day ago: a bug changed now would carry a push_notify row.
        let bugs: Vec<String> = BUGS
            .map(|b| format!("({b}, NOW() - INTERVAL 1 DAY)"))
            .collect();
        let tables = format!(
            "CREATE TABLE `{db}`.bugs (
               bug_id MEDIUMINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
               delta_ts DATETIME NOT NULL,
               KEY bugs_delta_ts_idx (delta_ts));
             CREATE TABLE `{db}`.push_notify (
               id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
               bug_id MEDIUMINT NOT NULL,
               delta_ts DATETIME NOT NULL,
               UNIQUE KEY push_notify_idx (bug_id));
             INSERT INTO `{db}`.bugs (bug_id, delta_ts) VALUES {values}",
            db = scratch.name,
            values = bugs.join(","),
        );
        if let Err(e) = admin.query_drop(tables) {
            scratch.drop_database();
            return Err(format!(
                "cannot create the scratch tables: {}",
                database::Sentence(&e)
            ));
        }
        Ok(scratch)
    }

    /// A connection to the server, in no database, the way every other
    /// connection goes ([`database::connect`]): host `localhost` is the
    /// Unix socket, so an account `'u'@'localhost'` works here as it does
    /// for the poller on the scratch database.
    fn admin(&self) -> Result<Conn, String> {
        let mut server = self.server.clone();
        server.opts = OptsBuilder::from_opts(server.opts)
            .db_name(None::<String>)
            .into();
        database::connect(&server, DB_TIMEOUT).map_err(|e| {
            format!(
                "cannot connect to {}: {}",
                self.server,
                database::Sentence(&e)
            )
        })
    }

    /// Drops the scratch database; says so, or says what is left behind.
    fn drop_database(&self) {
        let dropped = self.admin().and_then(|mut admin| {
            admin
                .query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name))
                .map_err(|e| database::sentence(&e))
        });
        match dropped {
            Ok(()) => info!("demo: dropped scratch database {}", self.name),
            Err(e) => warn!(
                "demo: could not drop scratch database {} on {}: {e}; drop it by hand",
                self.name, self.server
            ),
        }
    }
}

/// `run`'s pipeline on the scratch database, with a thread writing the
/// simulated changes into it, until `shutdown`.
fn run_on_database(
    config: &DemoConfig,
    scratch: &Scratch,
    server_config: crate::config::ServerConfig,
    listener: TcpListener,
    shutdown: &Shutdown,
) -> Result<(), String> {
    let run_config = RunConfig {
        poller: PollerConfig {
            database: scratch.url.clone(),
            source: Source::PushNotify,
            source_given: true,
            poll_interval: config.poll_interval,
            batch_size: BATCH_SIZE,
            overlap: OVERLAP,
            // Server-wide: named for the scratch database, it is this
            // demo's alone.
            lock_name: format!("bzpush.poller.{}", scratch.name),
            // Source push_notify keeps no watermark: nothing to save or
            // replay.
            state_directory: None,
            replay_limit: Duration::ZERO,
            // No broker.
            broker_grace: None,
        },
        server: server_config,
        stale_after: config.stale_after,
        log: config.log,
    };
    // Stops the writer if the server ends on its own (a failure).
    let (mut stop, stopped) = shutdown::channel();
    let writer = {
        let (url, shutdown) = (scratch.url.clone(), shutdown.clone());
        let stop = shutdown.clone();
        shutdown::spawn_essential(
            "demo-bugzilla".into(),
            thread::Builder::new(),
            &shutdown,
            move || simulate_in_database(&url, &stop, &stopped),
        )
        .map_err(|e| format!("cannot start the simulated Bugzilla: {e}"))?
    };
    print_address(listener.local_addr().map_err(|e| e.to_string())?);
    let result = server::run(&run_config, listener, shutdown).map_err(|e| e.to_string());
    stop.fire();
    join(writer);
    result
}

fn join(thread: JoinHandle<()>) {
    if thread.join().is_err() {
        warn!("demo: the simulated Bugzilla's thread panicked");
    }
}

/// Writes the simulated changes into the scratch database until
/// `shutdown` or `stopped`, as Bugzilla with PushNotify does: `bugs.delta_ts`,
/// then the bug's `push_notify` row by id, or a new row. A failed write is
/// logged once per outage and tried again next tick.
fn simulate_in_database(url: &DatabaseUrl, shutdown: &Shutdown, stopped: &Shutdown) {
    let mut link = Link::new("demo database", url.to_string());
    let mut dice = Dice::new();
    let mut conn: Option<Conn> = None;
    while !shutdown.sleep(TICK) && !stopped.requested() {
        let db = match conn.take() {
            Some(db) => Ok(db),
            None => database::connect(url, DB_TIMEOUT),
        };
        let written = db.and_then(|mut db| {
            for bug in dice.bugs() {
                change(&mut db, bug)?;
            }
            Ok(db)
        });
        match written {
            Ok(db) => {
                link.up();
                conn = Some(db);
            }
            Err(e) => link.down(&e),
        }
    }
    info!("demo: simulated Bugzilla stopped");
}

/// One change of `bug`, in one transaction, in PushNotify's order.
fn change(db: &mut Conn, bug: u32) -> Result<(), mysql::Error> {
    let mut tx = db.start_transaction(mysql::TxOpts::default())?;
    tx.query_drop("SET @delta_ts = NOW()")?;
    tx.exec_drop(
        "UPDATE bugs SET delta_ts = @delta_ts WHERE bug_id = ?",
        (bug,),
    )?;
    let id: Option<i64> = tx.exec_first("SELECT id FROM push_notify WHERE bug_id = ?", (bug,))?;
    match id {
        Some(id) => tx.exec_drop(
            "UPDATE push_notify SET delta_ts = @delta_ts WHERE id = ?",
            (id,),
        )?,
        None => tx.exec_drop(
            "INSERT INTO push_notify (bug_id, delta_ts) VALUES (?, @delta_ts)",
            (bug,),
        )?,
    }
    tx.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_tick_changes_some_demo_bugs_once() {
        let mut dice = Dice(42);
        for _ in 0..1000 {
            let bugs = dice.bugs();
            assert!(!bugs.is_empty() && bugs.len() <= CHANGES_PER_TICK as usize);
            assert!(bugs.iter().all(|b| BUGS.contains(b)), "{bugs:?}");
            assert!(bugs.windows(2).all(|w| w[0] < w[1]), "{bugs:?}");
        }
    }
}
