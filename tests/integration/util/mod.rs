//! The test harness: real MariaDB, real RabbitMQ, the real `bzpush` binary.
//!
//! Each test makes its own uniquely named database, exchange and queue and
//! drops them when it ends, so tests run in parallel without touching each
//! other's data. Faults are real: [`Proxy`] severs TCP connections, and
//! [`Bzpush::kill9`] sends SIGKILL. Each child gets a systemd notify socket
//! the harness owns: where it listens comes from its `STATUS=` line there,
//! as `systemctl status` shows it, not from its log. A service that is down fails the test
//! with how to start it; nothing is skipped. Every wait has a deadline, so a
//! hung test fails instead of hanging CI, and a [`watchdog`] ends a test binary
//! that runs far too long, printing where it hung.
#![allow(dead_code)] // the benchmarks (tests/benchmark) use only part of the harness

pub mod demo;
pub mod frames;
pub mod run;
pub mod serve;
mod watchdog;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use futures_lite::StreamExt;
use futures_lite::future::{self, block_on};
use lapin::options::{
    BasicConsumeOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use mysql::prelude::Queryable;

pub const MYSQL_ADDR: &str = "127.0.0.1:3306";
pub const AMQP_ADDR: &str = "127.0.0.1:5672";

const START_MARIADB: &str = "MariaDB must answer at 127.0.0.1:3306 as root with an empty \
    password. Start it with `start-stop-daemon --start --oknodo --background --exec \
    /usr/sbin/mariadbd`, or run `bash .ci/run`, which installs and starts it";
const START_RABBITMQ: &str = "RabbitMQ must answer at 127.0.0.1:5672 as guest/guest. Start \
    it with `rabbitmq-server -detached && rabbitmqctl await_startup`, or run `bash .ci/run`, \
    which installs and starts it";

/// How long one broker operation may take before the test fails: lapin can
/// leave an operation pending forever on a connection that died under it
/// (see `src/pulse.rs`), and a test must then fail, not hang.
pub const BROKER_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs one lapin operation; fails the test, saying what it was doing, if
/// it errs or is still pending after [`BROKER_TIMEOUT`].
pub fn broker<T, E: std::fmt::Display>(
    doing: &str,
    operation: impl Future<Output = Result<T, E>>,
) -> T {
    broker_within(doing, BROKER_TIMEOUT, operation)
}

/// [`broker`] with a bound of its own, for an operation that takes long.
pub fn broker_within<T, E: std::fmt::Display>(
    doing: &str,
    timeout: Duration,
    operation: impl Future<Output = Result<T, E>>,
) -> T {
    match within(timeout, operation) {
        Some(Ok(value)) => value,
        Some(Err(e)) => panic!("{doing}: {e}"),
        None => panic!(
            "{doing}: no answer from the broker within {timeout:?}. A broker with a \
             disk or memory alarm blocks every publisher: `rabbitmq-diagnostics alarms`"
        ),
    }
}

/// `operation`'s outcome, or `None` if it is still pending after
/// `timeout`: for cleanup, which must neither panic nor hang.
pub fn within<T>(timeout: Duration, operation: impl Future<Output = T>) -> Option<T> {
    block_on(future::or(async { Some(operation.await) }, async {
        async_io::Timer::after(timeout).await;
        None
    }))
}

/// A name no other test (or test run) uses: `prefix_<pid>_<time>_<n>`.
/// Nearly every test asks for one first, so this arms the [`watchdog`].
pub fn unique(prefix: &str) -> String {
    watchdog::arm();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}_{}_{nanos}_{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// SplitMix64: small, seedable, the same sequence everywhere, so a seed
/// printed by a failing test replays it.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// A number in `lo..=hi`.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// True once in `n` times.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }

    /// One of `items` (not empty).
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

/// A process's resident memory in KiB, from `/proc/PID/status`; 0 once it
/// is gone.
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Waits until `check` is true or `timeout` passes; `false` on timeout.
pub fn wait_until(timeout: Duration, check: impl FnMut() -> bool) -> bool {
    wait_until_every(timeout, Duration::from_millis(20), check)
}

/// [`wait_until`], checking every `period`.
pub fn wait_until_every(
    timeout: Duration,
    period: Duration,
    mut check: impl FnMut() -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        thread::sleep(period);
    }
    check()
}

/// `2026-01-01 00:00:00` plus `secs` seconds (less than a day), as a
/// DATETIME literal for SQL and as the `delta_ts` Pulse carries.
pub fn datetime(secs: u32) -> (String, String) {
    assert!(secs < 86_400, "datetime({secs}) must stay within one day");
    let (h, m, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    (
        format!("2026-01-01 {h:02}:{m:02}:{s:02}"),
        format!("2026-01-01T{h:02}:{m:02}:{s:02}"),
    )
}

/// Bugzilla's `push_notify`, and a minimal `bugs` table.
pub const BUGZILLA_TABLES: &str = "CREATE TABLE push_notify (
       id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
       bug_id MEDIUMINT NOT NULL,
       delta_ts DATETIME NOT NULL,
       UNIQUE KEY push_notify_idx (bug_id));
     CREATE TABLE bugs (
       bug_id MEDIUMINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
       short_desc VARCHAR(255) NOT NULL DEFAULT '',
       delta_ts DATETIME NOT NULL,
       KEY bugs_delta_ts_idx (delta_ts))";

/// A database of its own, with Bugzilla's `push_notify` and a minimal
/// `bugs` table, dropped at the end of the test.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub fn new() -> TestDb {
        let name = unique("bzpush_test");
        let mut admin = admin_conn();
        admin
            .query_drop(format!("CREATE DATABASE `{name}`"))
            .expect("create the test database");
        let db = TestDb { name };
        db.conn()
            .query_drop(BUGZILLA_TABLES)
            .expect("create the Bugzilla tables");
        db
    }

    /// The URL bzpush uses to reach this database at `addr`.
    pub fn url_at(&self, addr: &str) -> String {
        format!("mysql://root@{addr}/{}", self.name)
    }

    pub fn url(&self) -> String {
        self.url_at(MYSQL_ADDR)
    }

    pub fn conn(&self) -> mysql::Conn {
        mysql::Conn::new(mysql::Opts::from_url(&self.url()).expect("valid URL"))
            .unwrap_or_else(|e| panic!("{START_MARIADB}: {e}"))
    }

    /// Records a change of `bug` the way the PushNotify extension does: in
    /// one transaction, find the bug's row, then update it in place or
    /// insert it. `delta_ts` is a DATETIME literal, or `None` for NOW().
    ///
    /// Returns whether the change landed in the table. It does not when the
    /// poller deletes the row between the SELECT and the UPDATE: the UPDATE
    /// then matches nothing and the change is lost, exactly as it is with
    /// the real extension (which takes no lock either). Nor when InnoDB
    /// picks the transaction as a deadlock victim (an INSERT racing the
    /// poller's DELETE over the unique `bug_id` index) or its lock wait
    /// times out: the transaction is rolled back, as Bugzilla's whole change
    /// would be. Tests that write while a poller runs expect only the
    /// changes that landed.
    pub fn push_notify_change(conn: &mut mysql::Conn, bug: u32, delta_ts: Option<&str>) -> bool {
        match Self::try_push_notify_change(conn, bug, delta_ts) {
            Ok(landed) => landed,
            // ER_LOCK_DEADLOCK, ER_LOCK_WAIT_TIMEOUT: rolled back.
            Err(mysql::Error::MySqlError(e)) if e.code == 1213 || e.code == 1205 => false,
            Err(e) => panic!("push_notify change of bug {bug}: {e}"),
        }
    }

    fn try_push_notify_change(
        conn: &mut mysql::Conn,
        bug: u32,
        delta_ts: Option<&str>,
    ) -> Result<bool, mysql::Error> {
        // Dropped without a commit on an error: rolled back.
        let mut tx = conn.start_transaction(mysql::TxOpts::default())?;
        let id: Option<i64> =
            tx.exec_first("SELECT id FROM push_notify WHERE bug_id = ?", (bug,))?;
        let ts = delta_ts.map_or("NOW()".to_string(), |t| format!("'{t}'"));
        let landed = match id {
            Some(id) => {
                tx.exec_drop(
                    format!("UPDATE push_notify SET delta_ts = {ts} WHERE id = ?"),
                    (id,),
                )?;
                // Counts changed rows only (no CLIENT_FOUND_ROWS): 0 is also
                // an unchanged NOW() in the same second. A locking read sees
                // the current row, not the transaction's snapshot.
                tx.affected_rows() == 1 || {
                    let current: Option<i64> =
                        tx.exec_first("SELECT id FROM push_notify WHERE id = ? FOR UPDATE", (id,))?;
                    current.is_some()
                }
            }
            None => {
                tx.exec_drop(
                    format!("INSERT INTO push_notify (bug_id, delta_ts) VALUES (?, {ts})"),
                    (bug,),
                )?;
                true
            }
        };
        tx.commit()?;
        Ok(landed)
    }

    /// Fills `push_notify` with one row per bug in `bugs`, all stamped
    /// `delta_ts` (a DATETIME literal), 1000 rows per INSERT: a large
    /// backlog in seconds rather than one transaction per row.
    pub fn push_notify_backlog(&self, bugs: std::ops::Range<u32>, delta_ts: &str) {
        let mut conn = self.conn();
        let bugs: Vec<u32> = bugs.collect();
        for chunk in bugs.chunks(1000) {
            let values: Vec<String> = chunk
                .iter()
                .map(|bug| format!("({bug},'{delta_ts}')"))
                .collect();
            conn.query_drop(format!(
                "INSERT INTO push_notify (bug_id, delta_ts) VALUES {}",
                values.join(",")
            ))
            .expect("insert a backlog chunk");
        }
    }

    /// Rows left in `push_notify`.
    pub fn push_notify_rows(&self) -> u64 {
        self.conn()
            .query_first("SELECT COUNT(*) FROM push_notify")
            .expect("count")
            .unwrap_or(0)
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Ok(mut admin) = try_admin_conn() {
            let _ = admin.query_drop(format!("DROP DATABASE IF EXISTS `{}`", self.name));
        }
    }
}

fn try_admin_conn() -> Result<mysql::Conn, mysql::Error> {
    let opts = mysql::OptsBuilder::new()
        .ip_or_hostname(Some("127.0.0.1"))
        .tcp_port(3306)
        .user(Some("root"))
        .tcp_connect_timeout(Some(Duration::from_secs(5)));
    mysql::Conn::new(opts)
}

pub fn admin_conn() -> mysql::Conn {
    try_admin_conn().unwrap_or_else(|e| panic!("{START_MARIADB}: {e}"))
}

/// A message the test's consumer received.
#[derive(Debug)]
pub struct Received {
    /// When the test's consumer got it from the broker.
    pub at: Instant,
    pub routing_key: String,
    pub properties: BasicProperties,
    pub body: Vec<u8>,
}

impl Received {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("the body is JSON")
    }

    /// `(payload.id, payload.delta_ts)`.
    pub fn bug_and_time(&self) -> (u64, String) {
        let json = self.json();
        let id = json["payload"]["id"]
            .as_u64()
            .expect("payload.id is a number");
        let ts = json["payload"]["delta_ts"]
            .as_str()
            .expect("payload.delta_ts is a string")
            .to_string();
        (id, ts)
    }
}

/// An exchange of its own (topic, durable, as the publisher declares it)
/// with an exclusive queue bound to `#`; deleted at the end of the test.
pub struct TestBroker {
    pub exchange: String,
    connection: Connection,
    /// The test's own queue, if it has one.
    queue: Option<String>,
    received: Receiver<Received>,
}

pub fn amqp_url_at(addr: &str) -> String {
    format!("amqp://guest:guest@{addr}/%2f")
}

/// A connection to the test broker; fails the test saying how to start
/// RabbitMQ if it does not answer.
pub fn amqp_connect() -> Connection {
    let url = amqp_url_at(AMQP_ADDR);
    broker(
        START_RABBITMQ,
        Connection::connect(&url, ConnectionProperties::default()),
    )
}

/// Deletes `exchange` at the end of a test; gives up quietly, since a
/// leftover exchange harms no other test.
pub fn delete_exchange(connection: &Connection, exchange: &str) {
    if let Some(Ok(channel)) = within(BROKER_TIMEOUT, connection.create_channel()) {
        let delete = channel.exchange_delete(exchange.into(), ExchangeDeleteOptions::default());
        let _ = within(BROKER_TIMEOUT, delete);
    }
}

impl TestBroker {
    pub fn new() -> TestBroker {
        let (mut test_broker, channel, queue) = TestBroker::with_queue();
        // The queue is this test's alone and dies with it, so messages are
        // taken as delivered (no_ack): acking each one costs a hand-off to
        // lapin's I/O thread and a frame to the broker, which on a 2-core
        // machine took more CPU than the poller a benchmark measures.
        let mut consumer = broker(
            "consume",
            channel.basic_consume(
                queue.as_str().into(),
                "".into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            ),
        );
        let (tx, received) = crossbeam_channel::unbounded();
        thread::Builder::new()
            .name("test-consumer".into())
            .spawn(move || {
                while let Some(Ok(delivery)) = block_on(consumer.next()) {
                    let at = Instant::now();
                    let message = Received {
                        at,
                        routing_key: delivery.routing_key.to_string(),
                        properties: delivery.properties.clone(),
                        body: delivery.data.clone(),
                    };
                    if tx.send(message).is_err() {
                        break;
                    }
                }
            })
            .expect("spawn the test consumer");
        test_broker.received = received;
        test_broker
    }

    /// An exchange and a queue bound to `#` that nobody consumes: messages
    /// stay in it, for [`TestBroker::queued`] to count, and cost the broker
    /// no deliveries. [`TestBroker::recv`] is not for this one.
    pub fn holding() -> TestBroker {
        TestBroker::with_queue().0
    }

    /// The exchange and its exclusive queue, bound to `#`; the channel that
    /// declared them and the queue's name.
    fn with_queue() -> (TestBroker, Channel, String) {
        let (exchange, connection, channel) = TestBroker::declare_exchange();
        let queue = broker(
            "declare the test queue",
            channel.queue_declare(
                "".into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        );
        broker(
            "bind the test queue",
            channel.queue_bind(
                queue.name().clone(),
                exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        );
        let queue = queue.name().to_string();
        let test_broker = TestBroker {
            exchange,
            connection,
            queue: Some(queue.clone()),
            received: crossbeam_channel::never(),
        };
        (test_broker, channel, queue)
    }

    /// A uniquely named exchange, declared as the publisher declares it;
    /// the connection and channel that declared it.
    fn declare_exchange() -> (String, Connection, Channel) {
        let exchange = unique("bzpush.test");
        let connection = amqp_connect();
        let channel = broker("open a channel", connection.create_channel());
        broker(
            "declare the test exchange",
            bzpush::pulse::declare_exchange(&channel, &exchange),
        );
        (exchange, connection, channel)
    }

    /// How many messages wait in the test queue.
    pub fn queued(&self) -> u32 {
        self.ready_in(self.queue.as_deref().expect("a broker with a queue"))
    }

    /// How many messages wait in `queue`, ready for a consumer (delivered
    /// but unacked ones not counted).
    pub fn ready_in(&self, queue: &str) -> u32 {
        let channel = broker("open a channel", self.connection.create_channel());
        let declared = broker(
            "count the test queue",
            channel.queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            ),
        );
        let _ = within(BROKER_TIMEOUT, channel.close(200, "counted".into()));
        declared.message_count()
    }

    /// The next message, or `None` after `timeout`.
    pub fn recv(&self, timeout: Duration) -> Option<Received> {
        match self.received.recv_timeout(timeout) {
            Ok(m) => Some(m),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => panic!("the test consumer stopped"),
        }
    }

    /// Everything that arrives until nothing has for `quiet`.
    pub fn drain(&self, quiet: Duration) -> Vec<Received> {
        std::iter::from_fn(|| self.recv(quiet)).collect()
    }

    /// Appends each arriving message's `(payload.id, payload.delta_ts)` to
    /// `into` until `done(into)` holds or `timeout` passes; `false` on
    /// timeout.
    pub fn receive_until(
        &self,
        into: &mut Vec<(u64, String)>,
        timeout: Duration,
        mut done: impl FnMut(&[(u64, String)]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if done(into) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            if let Some(message) = self.recv(left.min(Duration::from_millis(100))) {
                into.push(message.bug_and_time());
            }
        }
    }
}

impl Drop for TestBroker {
    fn drop(&mut self) {
        delete_exchange(&self.connection, &self.exchange);
        let _ = within(
            BROKER_TIMEOUT,
            self.connection.close(200, "test done".into()),
        );
    }
}

/// A TCP proxy in front of a service, which the test can cut off: `sever`
/// kills every open connection, `set_down(true)` refuses new ones too,
/// `set_delay` slows every chunk it forwards, `stall` makes the open
/// connections go silent without closing them, and `set_stalled(true)`
/// stops forwarding on every connection, new ones too (a link that dies
/// silently).
pub struct Proxy {
    pub addr: SocketAddr,
    state: Arc<ProxyState>,
}

struct ProxyState {
    down: AtomicBool,
    stop: AtomicBool,
    live: Mutex<Vec<TcpStream>>,
    delay_ms: AtomicU64,
    /// One flag per connection: set, its pipes hold what they read.
    stalled: Mutex<Vec<Arc<AtomicBool>>>,
    /// Set, every pipe holds what it read, on every connection.
    stalled_all: AtomicBool,
    /// When each connection was refused while down.
    refusals: Mutex<Vec<Instant>>,
    /// Chunks read from the clients, toward the target.
    chunks_sent: AtomicU64,
    /// Chunks read either way, numbered in order, and the number of the
    /// last one each way: which side spoke last.
    chunks: AtomicU64,
    last_up: AtomicU64,
    last_down: AtomicU64,
}

impl Proxy {
    pub fn to(target: &str) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let state = Arc::new(ProxyState {
            down: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            live: Mutex::new(Vec::new()),
            delay_ms: AtomicU64::new(0),
            stalled: Mutex::new(Vec::new()),
            stalled_all: AtomicBool::new(false),
            refusals: Mutex::new(Vec::new()),
            chunks_sent: AtomicU64::new(0),
            chunks: AtomicU64::new(0),
            last_up: AtomicU64::new(0),
            last_down: AtomicU64::new(0),
        });
        let target = target.to_string();
        let shared = Arc::clone(&state);
        thread::Builder::new()
            .name("test-proxy".into())
            .spawn(move || {
                for client in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(client) = client else { continue };
                    if shared.down.load(Ordering::SeqCst) {
                        shared
                            .refusals
                            .lock()
                            .expect("proxy lock")
                            .push(Instant::now());
                        continue; // dropped: the client sees the connection close
                    }
                    let Ok(server) = TcpStream::connect(&target) else {
                        continue;
                    };
                    let _ = client.set_nodelay(true);
                    let _ = server.set_nodelay(true);
                    if let (Ok(c2), Ok(s2), Ok(c3), Ok(s3)) = (
                        client.try_clone(),
                        server.try_clone(),
                        client.try_clone(),
                        server.try_clone(),
                    ) {
                        shared.live.lock().expect("proxy lock").extend([c3, s3]);
                        let stalled = Arc::new(AtomicBool::new(false));
                        shared
                            .stalled
                            .lock()
                            .expect("proxy lock")
                            .push(Arc::clone(&stalled));
                        pipe(client, s2, Arc::clone(&shared), Arc::clone(&stalled), true);
                        pipe(server, c2, Arc::clone(&shared), stalled, false);
                    }
                }
            })
            .expect("spawn the proxy");
        Proxy { addr, state }
    }

    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Cuts every connection open through the proxy, mid-stream.
    pub fn sever(&self) {
        for stream in self.state.live.lock().expect("proxy lock").drain(..) {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }

    /// Holds every chunk `delay` before forwarding it, in both directions:
    /// a slow link, so a request and its answer are far apart in time.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.state.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Every connection open now stops forwarding, in both directions,
    /// without closing: a link that went silent (no FIN, no RST). Both
    /// ends wait on it until their own timeouts; new connections work.
    pub fn stall(&self) {
        for flag in self.state.stalled.lock().expect("proxy lock").drain(..) {
            flag.store(true, Ordering::SeqCst);
        }
    }

    /// While stalled, nothing is forwarded either way and nothing is
    /// closed (no FIN, no RST): a link whose packets silently vanish, as
    /// behind a dead router or a firewall that drops state. New connections
    /// are accepted and hang too. What was held is forwarded on resuming,
    /// as TCP retransmits after such an outage.
    pub fn set_stalled(&self, stalled: bool) {
        self.state.stalled_all.store(stalled, Ordering::SeqCst);
    }

    /// When each connection attempt was refused while down, in order: a
    /// client's reconnection attempts, and the pauses between them.
    pub fn refusals(&self) -> Vec<Instant> {
        self.state.refusals.lock().expect("proxy lock").clone()
    }

    /// How many chunks the clients have sent toward the target so far: it
    /// grows with each request a client makes (a query, an ack), so a test
    /// can wait for the client's next one instead of sleeping.
    pub fn chunks_sent(&self) -> u64 {
        self.state.chunks_sent.load(Ordering::SeqCst)
    }

    /// Whether the last chunk through the proxy came from a client: it
    /// answered (an ack, say) everything the target sent it.
    pub fn client_spoke_last(&self) -> bool {
        self.state.last_up.load(Ordering::SeqCst) > self.state.last_down.load(Ordering::SeqCst)
    }

    /// While down, new connections are accepted and closed at once.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
        if down {
            self.sever();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        self.sever();
        let _ = TcpStream::connect(self.addr); // wakes the accept loop
    }
}

/// Forwards `from` to `to`; `upstream` when `from` is the client.
fn pipe(
    mut from: TcpStream,
    mut to: TcpStream,
    state: Arc<ProxyState>,
    stalled: Arc<AtomicBool>,
    upstream: bool,
) {
    let _ = thread::Builder::new()
        .name("test-proxy-pipe".into())
        .spawn(move || {
            let mut buf = [0u8; 16 * 1024];
            loop {
                match from.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let number = state.chunks.fetch_add(1, Ordering::SeqCst) + 1;
                        if upstream {
                            state.chunks_sent.fetch_add(1, Ordering::SeqCst);
                            state.last_up.store(number, Ordering::SeqCst);
                        } else {
                            state.last_down.store(number, Ordering::SeqCst);
                        }
                        let delay = state.delay_ms.load(Ordering::SeqCst);
                        if delay > 0 {
                            thread::sleep(Duration::from_millis(delay));
                        }
                        // Held, not forwarded: holding the chunk also stops
                        // reading, so what follows waits in the kernel's
                        // buffers.
                        while stalled.load(Ordering::SeqCst)
                            || state.stalled_all.load(Ordering::SeqCst)
                        {
                            if state.stop.load(Ordering::SeqCst) {
                                return;
                            }
                            thread::sleep(Duration::from_millis(10));
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                }
            }
            let _ = to.shutdown(Shutdown::Both);
            let _ = from.shutdown(Shutdown::Both);
        });
}

/// A running `bzpush` process; killed when dropped.
pub struct Bzpush {
    child: Child,
    log: Arc<Mutex<String>>,
    notices: Notices,
}

/// The line `bzpush serve` and `run` send systemd once they listen, the
/// address after it.
const LISTENING: &str = "STATUS=serving WebSocket and HTTP on ";

/// A systemd notify socket the test owns, as systemd would pass one in
/// `NOTIFY_SOCKET`: what the child tells systemd (`READY=1`, `STATUS=...`),
/// one entry per line, in order. The harness learns a child's address here,
/// as a sysadmin reads it in `systemctl status`, instead of from its log.
struct Notices {
    /// The `NOTIFY_SOCKET` value: an abstract socket, nothing to clean up.
    name: String,
    lines: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl Notices {
    fn bind() -> Notices {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr as UnixAddr, UnixDatagram};
        let name = unique("bzpush-test-notify");
        let addr = UnixAddr::from_abstract_name(name.as_bytes()).expect("an abstract socket name");
        let socket = UnixDatagram::bind_addr(&addr).expect("bind the test's notify socket");
        // Wakes the reader to look at `stop` now and then.
        socket
            .set_read_timeout(Some(Duration::from_millis(100)))
            .expect("a timeout on the notify socket");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (sink, stopped) = (Arc::clone(&lines), Arc::clone(&stop));
        thread::Builder::new()
            .name("test-notify".into())
            .spawn(move || {
                let mut buf = [0u8; 4096];
                while !stopped.load(Ordering::Relaxed) {
                    match socket.recv(&mut buf) {
                        Ok(n) => {
                            let text = String::from_utf8_lossy(&buf[..n]);
                            let mut lines = sink.lock().expect("notices lock");
                            lines.extend(text.lines().map(str::to_string));
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => panic!("reading the test's notify socket: {e}"),
                    }
                }
            })
            .expect("spawn the notify socket reader");
        Notices {
            name: format!("@{name}"),
            lines,
            stop,
        }
    }
}

impl Drop for Notices {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Bzpush {
    /// Starts `bzpush <args>` with exactly the `BZPUSH_*` variables given
    /// (none inherited from the test's environment).
    pub fn start(args: &[&str], env: &[(&str, String)]) -> Bzpush {
        Bzpush::start_with(args, env, Stdio::null())
    }

    /// As [`Bzpush::start`], with stdout going to `stdout`; `Stdio::piped()`
    /// leaves it to read from [`Bzpush::take_stdout`].
    pub fn start_with(args: &[&str], env: &[(&str, String)], stdout: Stdio) -> Bzpush {
        let notices = Notices::bind();
        let mut child = Bzpush::command(args, env)
            .env("NOTIFY_SOCKET", &notices.name)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the bzpush binary");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&log);
        thread::Builder::new()
            .name("test-stderr".into())
            .spawn(move || {
                for line in BufReader::new(stderr).lines() {
                    let Ok(line) = line else { break };
                    eprintln!("  bzpush| {line}");
                    let mut log = sink.lock().expect("log lock");
                    log.push_str(&line);
                    log.push('\n');
                }
            })
            .expect("spawn the stderr reader");
        Bzpush {
            child,
            log,
            notices,
        }
    }

    /// `bzpush <args>` with exactly the `BZPUSH_*` variables given.
    fn command(args: &[&str], env: &[(&str, String)]) -> Command {
        watchdog::arm();
        let mut command = Command::new(env!("CARGO_BIN_EXE_bzpush"));
        command.args(args);
        for (key, _) in std::env::vars() {
            if key.starts_with("BZPUSH_") || key == "NOTIFY_SOCKET" {
                command.env_remove(key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        command
    }

    /// Runs `bzpush <args>` (environment as for [`Bzpush::start`]) to its
    /// end and returns what it printed; fails the test if it still runs
    /// after `timeout`.
    pub fn run(args: &[&str], env: &[(&str, String)], timeout: Duration) -> Finished {
        let mut child = Bzpush::command(args, env)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the bzpush binary");
        let stdout = read_all(child.stdout.take().expect("piped stdout"));
        let stderr = read_all(child.stderr.take().expect("piped stderr"));
        let deadline = Instant::now() + timeout;
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("bzpush {args:?} still ran after {timeout:?}");
                }
                Err(e) => panic!("waiting for bzpush {args:?}: {e}"),
            }
        };
        // The pipes close when the process exits, so the readers end too.
        let text = |reader: thread::JoinHandle<String>| reader.join().expect("pipe reader");
        Finished {
            status,
            stdout: text(stdout),
            stderr: text(stderr),
        }
    }

    /// `bzpush poll` against `db` (reached at `db_addr`) and the broker at
    /// `amqp_addr`, publishing to `exchange`, with `extra` settings.
    pub fn poll(
        db: &TestDb,
        db_addr: &str,
        amqp_addr: &str,
        exchange: &str,
        extra: &[(&str, String)],
    ) -> Bzpush {
        let mut env = vec![
            ("BZPUSH_DATABASE_URL", db.url_at(db_addr)),
            ("BZPUSH_AMQP_URL", amqp_url_at(amqp_addr)),
            ("BZPUSH_EXCHANGE", exchange.to_string()),
            ("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name)),
            ("BZPUSH_POLL_INTERVAL", "100ms".to_string()),
            ("BZPUSH_LOG", "debug".to_string()),
        ];
        env.extend(extra.iter().cloned());
        Bzpush::start(&["poll"], &env)
    }

    /// The piped stdout of a process started with [`Bzpush::start_with`].
    pub fn take_stdout(&mut self) -> Option<std::process::ChildStdout> {
        self.child.stdout.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the process wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().expect("log lock").clone()
    }

    /// Every line the process sent its notify socket so far (`READY=1`,
    /// `STATUS=...`), in order.
    pub fn notices(&self) -> Vec<String> {
        self.notices.lines.lock().expect("notices lock").clone()
    }

    /// Waits for a notify line starting with `prefix` and returns the first
    /// such line; `None` on timeout.
    pub fn wait_for_notice(&self, prefix: &str, timeout: Duration) -> Option<String> {
        let find = || self.notices().into_iter().find(|l| l.starts_with(prefix));
        let mut found = None;
        wait_until(timeout, || {
            found = find();
            found.is_some()
        });
        found
    }

    /// Waits until the process says (on its notify socket) where it
    /// listens; `false` on timeout.
    pub fn wait_listening(&self, timeout: Duration) -> bool {
        self.wait_for_notice(LISTENING, timeout).is_some()
    }

    /// The address the process listens on, from its `STATUS=` line.
    pub fn listen_addr(&self) -> String {
        let line = self
            .notices()
            .into_iter()
            .find(|l| l.starts_with(LISTENING))
            .unwrap_or_else(|| {
                panic!(
                    "the process never said where it listens; its notices: {:?}, its log:\n{}",
                    self.notices(),
                    self.log()
                )
            });
        line[LISTENING.len()..].to_string()
    }

    /// Waits until the log contains `needle`; `false` on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().contains(needle))
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn sigterm(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -TERM failed");
    }

    /// The exit status, or `None` if still running after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A `bzpush` run that ended: its status and everything it printed.
#[derive(Debug)]
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

/// Reads a pipe to its end on a thread of its own.
fn read_all(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<String> {
    thread::Builder::new()
        .name("test-pipe-reader".into())
        .spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
        .expect("spawn a pipe reader")
}

impl Drop for Bzpush {
    fn drop(&mut self) {
        self.kill9();
    }
}
