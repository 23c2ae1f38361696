//! "The operator is never misled": bzpush never lives on looking healthy
//! while it delivers nothing. A pipeline thread that dies ends the process
//! with status 1 (naming the thread), an idle `poll` keeps its broker link
//! known, a changed queue setting keeps `serve` working and is reported,
//! and a silently dead broker link is noticed within a bounded time. All
//! against the real binary, MariaDB and RabbitMQ.

use crate::util;

use std::time::Duration;

use crate::util::run::ExchangeName;
use crate::util::serve::{Client, http_get, ok, t, update};
use crate::util::{AMQP_ADDR, Bzpush, MYSQL_ADDR, Proxy, TestBroker, TestDb, unique, wait_until};
use serde_json::json;

/// Generous bound for an event a test waits for.
const WAIT: Duration = Duration::from_secs(30);

/// The fault injection for tests (`bzpush::shutdown::TEST_PANIC_VAR`).
fn panic_in(thread: &str) -> (&'static str, String) {
    (bzpush::shutdown::TEST_PANIC_VAR, thread.to_string())
}

/// `process` must end by itself with status 1, having logged that
/// `thread` panicked and why it stops.
fn assert_dies_naming(mut process: Bzpush, thread: &str) {
    let status = process.wait_exit(WAIT);
    let log = process.log();
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(1),
        "bzpush lived on (or exited otherwise) after its {thread} thread died:\n{log}"
    );
    let last = log
        .lines()
        .find(|l| l.contains("stopped with status 1"))
        .unwrap_or_default();
    assert!(
        last.contains(&format!("the {thread}")) && last.contains("thread panicked: "),
        "the log does not end saying which thread died and why:\n{log}"
    );
}

// ---- 1. A pipeline thread that dies ends the process ----

#[test]
fn serve_exits_1_when_its_hub_dies() {
    let broker = TestBroker::new();
    assert_dies_naming(Bzpush::serve(&broker, &[panic_in("hub")]), "hub");
}

#[test]
fn serve_exits_1_when_a_writer_dies() {
    let broker = TestBroker::new();
    assert_dies_naming(Bzpush::serve(&broker, &[panic_in("writer")]), "writer");
}

#[test]
fn serve_exits_1_when_a_broker_consumer_dies() {
    let broker = TestBroker::new();
    assert_dies_naming(Bzpush::serve(&broker, &[panic_in("pulse")]), "pulse-0");
}

#[test]
fn serve_exits_1_when_its_catch_up_worker_dies() {
    let broker = TestBroker::new();
    let db = TestDb::new();
    let server = Bzpush::serve(
        &broker,
        &[
            ("BZPUSH_CATCHUP_DATABASE_URL", db.url()),
            panic_in("catchup"),
        ],
    );
    assert_dies_naming(server, "catchup");
}

#[test]
fn run_exits_1_when_its_poller_dies() {
    let db = TestDb::new();
    assert_dies_naming(Bzpush::run_on(&db, &[panic_in("poller")]), "poller");
}

/// The catch-up worker and the poller lose the hub with it: the reason
/// given is still the hub's panic, not their ending.
#[test]
fn run_exits_1_when_its_hub_dies() {
    let db = TestDb::new();
    assert_dies_naming(Bzpush::run_on(&db, &[panic_in("hub")]), "hub");
}

#[test]
fn poll_exits_1_when_its_poller_dies() {
    let db = TestDb::new();
    let exchange = unique("bzpush.test");
    let poller = Bzpush::poll(&db, MYSQL_ADDR, AMQP_ADDR, &exchange, &[panic_in("poller")]);
    assert_dies_naming(poller, "poller");
}

// ---- 6. A silently dead broker link is noticed in seconds ----

/// How long a silently dead broker link may go unnoticed: twice the
/// default heartbeat (10 s) and slack for a loaded machine. With the
/// broker's own 60 s heartbeat it took 118 s.
const NOTICE_DEAD_LINK: Duration = Duration::from_secs(60);

#[test]
fn serve_notices_a_silently_dead_broker_link_and_delivers_after_it_heals() {
    let broker = TestBroker::new();
    let proxy = Proxy::to(AMQP_ADDR);
    let server = Bzpush::serve_at(&proxy.addr(), &format!("/={}", broker.exchange), &[]);
    server.wait_healthy();
    let addr = server.listen_addr();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [1]})),
        ok("subscribe", &[1])
    );
    broker.publish(1, &t(1));
    assert_eq!(client.recv(WAIT), update(1, &t(1)));

    proxy.set_stalled(true);
    assert!(
        wait_until(NOTICE_DEAD_LINK, || http_get(&addr, "/health").0 == 503),
        "/health stayed 200 with the broker link silently dead:\n{}",
        server.log()
    );
    assert!(
        server.log().contains("retrying with backoff"),
        "{}",
        server.log()
    );
    // Published while the link is dead: it waits in serve's durable queue.
    broker.publish(1, &t(2));
    proxy.set_stalled(false);
    assert!(
        wait_until(WAIT, || http_get(&addr, "/health").0 == 200),
        "serve did not reconnect once the link healed:\n{}",
        server.log()
    );
    assert_eq!(client.recv(WAIT), update(1, &t(2)));
}

// ---- 2. An idle poll keeps its broker link known ----

/// Lines of `log` that say the broker link came up.
fn broker_connected_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("broker amqp://") && l.ends_with(": connected"))
        .count()
}

/// Whether a passive declare of `exchange` (what mozillapulse's consumer
/// does before it binds) succeeds now.
fn exchange_exists(connection: &lapin::Connection, exchange: &str) -> bool {
    let Some(Ok(channel)) = util::within(Duration::from_secs(10), connection.create_channel())
    else {
        return false;
    };
    let passive = channel.exchange_declare(
        exchange.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    );
    let exists = matches!(util::within(Duration::from_secs(10), passive), Some(Ok(())));
    if exists {
        let _ = util::within(Duration::from_secs(10), channel.close(200, "done".into()));
    }
    exists
}

#[test]
fn an_idle_poll_declares_its_exchange_at_start() {
    let db = TestDb::new();
    let exchange = ExchangeName::new();
    let connection = util::amqp_connect();
    assert!(!exchange_exists(&connection, &exchange.0));
    let poller = Bzpush::poll(&db, MYSQL_ADDR, AMQP_ADDR, &exchange.0, &[]);
    assert!(
        wait_until(WAIT, || exchange_exists(&connection, &exchange.0)),
        "an idle poll did not declare its exchange:\n{}",
        poller.log()
    );
    assert!(poller.wait_for_log(": connected", WAIT), "{}", poller.log());
    assert_eq!(broker_connected_lines(&poller.log()), 1, "{}", poller.log());
}

#[test]
fn an_idle_poll_logs_a_wrong_broker_password() {
    let db = TestDb::new();
    let exchange = ExchangeName::new();
    let poller = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &exchange.0,
        &[(
            "BZPUSH_AMQP_URL",
            format!("amqp://guest:wrong-password@{AMQP_ADDR}/%2f"),
        )],
    );
    assert!(
        poller.wait_for_log("retrying with backoff", WAIT),
        "an idle poll said nothing about a broker it cannot log in to:\n{}",
        poller.log()
    );
    let log = poller.log();
    let line = log
        .lines()
        .find(|l| l.contains("retrying with backoff"))
        .unwrap_or_default();
    assert!(
        line.contains("broker amqp://guest:***@") && line.contains("BZPUSH_AMQP_URL"),
        "the line does not name the broker and what to check: {line}"
    );
    assert!(!log.contains("wrong-password"), "{log}");
}

#[test]
fn an_idle_poll_logs_a_broker_link_cut_and_its_return() {
    idle_poll_notices_a_broker_fault(Proxy::set_down, WAIT, "its broker link was cut");
}

#[test]
fn an_idle_poll_notices_a_silently_dead_broker_link() {
    idle_poll_notices_a_broker_fault(
        Proxy::set_stalled,
        NOTICE_DEAD_LINK,
        "its broker link died silently",
    );
}

/// An idle poll behind a proxy: `fault(proxy, true)` must be logged within
/// `notice`, and the link's return once the fault is lifted.
fn idle_poll_notices_a_broker_fault(fault: fn(&Proxy, bool), notice: Duration, what: &str) {
    let db = TestDb::new();
    let exchange = ExchangeName::new();
    let proxy = Proxy::to(AMQP_ADDR);
    let poller = Bzpush::poll(&db, MYSQL_ADDR, &proxy.addr(), &exchange.0, &[]);
    assert!(
        wait_until(WAIT, || broker_connected_lines(&poller.log()) == 1),
        "{}",
        poller.log()
    );
    fault(&proxy, true);
    assert!(
        poller.wait_for_log("retrying with backoff", notice),
        "an idle poll did not notice {what}:\n{}",
        poller.log()
    );
    fault(&proxy, false);
    assert!(
        wait_until(WAIT, || broker_connected_lines(&poller.log()) == 2),
        "an idle poll did not say it reconnected:\n{}",
        poller.log()
    );
}

// ---- 5. A changed queue setting keeps serve working ----

/// A serve queue prefix of the test's own; the feed's queue is deleted
/// from the broker at the end of the test.
struct ServeQueue {
    prefix: String,
    queue: String,
}

impl ServeQueue {
    fn for_exchange(exchange: &str) -> ServeQueue {
        let prefix = format!("queue/guest/{}", unique("bzpush-test"));
        ServeQueue {
            queue: format!("{prefix}/{exchange}"),
            prefix,
        }
    }

    fn settings(&self, expires: &str) -> Vec<(&'static str, String)> {
        vec![
            ("BZPUSH_QUEUE", self.prefix.clone()),
            ("BZPUSH_QUEUE_EXPIRES", expires.to_string()),
        ]
    }
}

impl Drop for ServeQueue {
    fn drop(&mut self) {
        let connection = util::amqp_connect();
        if let Some(Ok(channel)) = util::within(WAIT, connection.create_channel()) {
            let delete = channel.queue_delete(self.queue.as_str().into(), Default::default());
            let _ = util::within(WAIT, delete);
        }
        let _ = util::within(WAIT, connection.close(200, "test done".into()));
    }
}

fn advice_lines(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("rabbitmqctl delete_queue"))
        .count()
}

#[test]
fn serve_consumes_its_queue_after_queue_expires_changed_and_says_how_to_apply_it() {
    let broker = TestBroker::new();
    let queue = ServeQueue::for_exchange(&broker.exchange);
    let mut first = Bzpush::serve(&broker, &queue.settings("24h"));
    first.wait_healthy();
    first.sigterm();
    assert_eq!(first.wait_exit(WAIT).and_then(|s| s.code()), Some(0));

    // Through a proxy, to cut the link once: the advice is not repeated.
    let proxy = Proxy::to(AMQP_ADDR);
    let feeds = format!("/={}", broker.exchange);
    let server = Bzpush::serve_at(&proxy.addr(), &feeds, &queue.settings("48h"));
    server.wait_healthy();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [1]})),
        ok("subscribe", &[1])
    );
    broker.publish(1, &t(1));
    assert_eq!(client.recv(WAIT), update(1, &t(1)));
    let log = server.log();
    assert_eq!(advice_lines(&log), 1, "{log}");
    let advice = log
        .lines()
        .find(|l| l.contains("rabbitmqctl delete_queue"))
        .unwrap_or_default();
    assert!(
        advice.contains(&queue.queue) && advice.contains("x-expires"),
        "the advice does not name the queue and what differs: {advice}"
    );

    proxy.sever();
    assert!(
        wait_until(WAIT, || broker_connected_lines(&server.log()) == 2),
        "serve did not reconnect:\n{}",
        server.log()
    );
    broker.publish(1, &t(2));
    // The first update may come again (redelivered after the cut if its
    // ack was still owed): at least once, then the new one.
    let mut next = client.recv(WAIT);
    if next == update(1, &t(1)) {
        next = client.recv(WAIT);
    }
    assert_eq!(next, update(1, &t(2)));
    assert_eq!(advice_lines(&server.log()), 1, "{}", server.log());
}

#[test]
fn check_serve_warns_about_a_queue_declared_with_another_expiry() {
    let broker = TestBroker::new();
    let queue = ServeQueue::for_exchange(&broker.exchange);
    let check = |expires: &str| {
        let mut env = vec![
            ("BZPUSH_AMQP_URL", util::amqp_url_at(AMQP_ADDR)),
            ("BZPUSH_FEEDS", format!("/={}", broker.exchange)),
        ];
        env.extend(queue.settings(expires));
        let done = Bzpush::run(&["check", "serve"], &env, WAIT);
        assert!(
            done.status.success(),
            "check serve failed:\n{}",
            done.stdout
        );
        done.stdout
            .lines()
            .find(|l| l.contains(&format!("queue {:?}", queue.queue)))
            .unwrap_or_else(|| panic!("no line about the queue:\n{}", done.stdout))
            .to_string()
    };
    assert!(check("24h").starts_with("ok    "), "before serve ran");

    // Serve's queue as a 24 h serve left it (a quorum queue, the default).
    let connection = util::amqp_connect();
    let channel = util::broker("open a channel", connection.create_channel());
    let mut arguments = lapin::types::FieldTable::default();
    arguments.insert(
        "x-expires".into(),
        lapin::types::AMQPValue::LongUInt(24 * 3600 * 1000),
    );
    arguments.insert(
        "x-queue-type".into(),
        lapin::types::AMQPValue::LongString("quorum".into()),
    );
    util::broker(
        "declare the queue as serve does",
        channel.queue_declare(
            queue.queue.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            arguments,
        ),
    );

    let same = check("24h");
    assert!(
        same.starts_with("ok    ") && same.contains("exists as configured"),
        "{same}"
    );
    let changed = check("48h");
    assert!(
        changed.starts_with("warn  ")
            && changed.contains("x-expires")
            && changed.contains(&format!(
                "rabbitmqctl delete_queue -p '/' '{}'",
                queue.queue
            )),
        "check does not report the mismatch and its fix: {changed}"
    );
    // The probe changed nothing: the queue still has its 24 h.
    assert!(check("24h").contains("exists as configured"));
}

/// An earlier version's queue is classic; the default is now quorum: serve
/// consumes the classic queue as it is, and the log and check say how to
/// replace it.
#[test]
fn serve_consumes_an_earlier_classic_queue_and_says_how_to_make_it_a_quorum_queue() {
    let broker = TestBroker::new();
    let queue = ServeQueue::for_exchange(&broker.exchange);
    let mut classic = queue.settings("24h");
    classic.push(("BZPUSH_QUEUE_TYPE", "classic".to_string()));
    let mut first = Bzpush::serve(&broker, &classic);
    first.wait_healthy();
    first.sigterm();
    assert_eq!(first.wait_exit(WAIT).and_then(|s| s.code()), Some(0));

    let mut env = vec![
        ("BZPUSH_AMQP_URL", util::amqp_url_at(AMQP_ADDR)),
        ("BZPUSH_FEEDS", format!("/={}", broker.exchange)),
    ];
    env.extend(queue.settings("24h"));
    let checked = Bzpush::run(&["check", "serve"], &env, WAIT);
    assert!(checked.status.success(), "a warning only: {checked:?}");
    let line = checked
        .stdout
        .lines()
        .find(|l| l.contains(&format!("queue {:?}", queue.queue)))
        .unwrap_or_default();
    assert!(
        line.starts_with("warn  ")
            && line.contains("x-queue-type")
            && line.contains("BZPUSH_QUEUE_TYPE quorum")
            && line.contains("rabbitmqctl delete_queue"),
        "{line}"
    );

    let server = Bzpush::serve(&broker, &queue.settings("24h"));
    server.wait_healthy();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [1]})),
        ok("subscribe", &[1])
    );
    broker.publish(1, &t(1));
    assert_eq!(client.recv(WAIT), update(1, &t(1)));
    assert_eq!(advice_lines(&server.log()), 1, "{}", server.log());
}

/// A sibling of a changed queue: the queue deleted under a running serve
/// (`rabbitmqctl delete_queue`, or the operator following the advice
/// above without stopping serve). serve must notice, declare it again
/// and deliver what is published afterwards.
#[test]
fn serve_declares_its_queue_again_when_it_is_deleted_under_it() {
    let broker = TestBroker::new();
    let queue = ServeQueue::for_exchange(&broker.exchange);
    let server = Bzpush::serve(&broker, &queue.settings("2m"));
    server.wait_healthy();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [1]})),
        ok("subscribe", &[1])
    );
    broker.publish(1, &t(1));
    assert_eq!(client.recv(WAIT), update(1, &t(1)));

    let connection = util::amqp_connect();
    let channel = util::broker("open a channel", connection.create_channel());
    util::broker(
        "delete serve's queue",
        channel.queue_delete(queue.queue.as_str().into(), Default::default()),
    );
    assert!(
        wait_until(WAIT, || broker_connected_lines(&server.log()) == 2),
        "serve did not declare its deleted queue again:\n{}",
        server.log()
    );
    assert!(
        server.log().contains("its queue was deleted"),
        "{}",
        server.log()
    );
    broker.publish(1, &t(2));
    assert_eq!(client.recv(WAIT), update(1, &t(2)));
}

#[test]
fn a_standby_poll_logs_a_wrong_broker_password_before_it_takes_over() {
    let db = TestDb::new();
    let exchange = ExchangeName::new();
    let active = Bzpush::poll(&db, MYSQL_ADDR, AMQP_ADDR, &exchange.0, &[]);
    assert!(
        active.wait_for_log("active: holding", WAIT),
        "{}",
        active.log()
    );
    let standby = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &exchange.0,
        &[(
            "BZPUSH_AMQP_URL",
            format!("amqp://guest:wrong-password@{AMQP_ADDR}/%2f"),
        )],
    );
    assert!(
        standby.wait_for_log("retrying with backoff", WAIT),
        "a standby poll said nothing about a broker it cannot log in to:\n{}",
        standby.log()
    );
    let log = standby.log();
    assert!(
        log.contains("standby: ") && log.contains("ACCESS_REFUSED"),
        "{log}"
    );
}
