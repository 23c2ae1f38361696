//! A broker that answers but will not take what it is given (README,
//! Troubleshooting; SPEC §3.4): a queue of another consumer that refuses
//! messages (the broker nacks them), a resource alarm that blocks every
//! publisher, and the frictions of a URL that points at the wrong place
//! (an empty vhost, TLS to a plain port) or a link that is down.

use crate::util;

use std::collections::HashMap;
use std::thread;
use std::time::{Duration, Instant};

use lapin::options::{BasicPublishOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Channel, Connection};
use mysql::prelude::Queryable;
use serde_json::Value;

use crate::util::serve::http_get;
use crate::util::{
    AMQP_ADDR, BROKER_TIMEOUT, Bzpush, MYSQL_ADDR, PrivateRabbit, Proxy, TestBroker, TestDb,
    amqp_connect, broker, datetime, unique, wait_until, within,
};

const WAIT: Duration = Duration::from_secs(30);

/// A queue of another consumer, bound to `exchange` with `key`, that holds
/// one message and refuses more (`x-max-length: 1`, `x-overflow:
/// reject-publish`), already full: the broker nacks every message routed
/// to it, and delivers it to the other queues. Deleted when dropped.
struct FullQueue {
    name: String,
    connection: Connection,
    channel: Channel,
}

impl FullQueue {
    fn bound(exchange: &str, key: &str) -> FullQueue {
        let connection = amqp_connect();
        let channel = broker("open a channel", connection.create_channel());
        let name = unique("third-party");
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongInt(1));
        arguments.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
        broker(
            "declare the full queue",
            channel.queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            ),
        );
        broker(
            "fill it",
            channel.basic_publish(
                "".into(),
                name.as_str().into(),
                BasicPublishOptions::default(),
                b"already here",
                BasicProperties::default(),
            ),
        );
        broker(
            "bind it",
            channel.queue_bind(
                name.as_str().into(),
                exchange.into(),
                key.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            ),
        );
        FullQueue {
            name,
            connection,
            channel,
        }
    }

    /// Its consumer came back and took everything: here, it is deleted.
    fn delete(&self) {
        broker(
            "delete the full queue",
            self.channel
                .queue_delete(self.name.as_str().into(), Default::default()),
        );
    }
}

impl Drop for FullQueue {
    fn drop(&mut self) {
        let delete = self
            .channel
            .queue_delete(self.name.as_str().into(), Default::default());
        let _ = within(BROKER_TIMEOUT, delete);
        let _ = within(BROKER_TIMEOUT, self.connection.close(200, "done".into()));
    }
}

/// How many times each bug reached the test's queue, until `quiet`
/// passes without a message.
fn tally(broker: &TestBroker, counts: &mut HashMap<u64, usize>, quiet: Duration) {
    while let Some(message) = broker.recv(quiet) {
        *counts.entry(message.bug_and_time().0).or_default() += 1;
    }
}

fn lines_with(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

#[test]
fn a_queue_that_refuses_costs_only_its_changes_a_retry_each_and_is_named_once() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let full = FullQueue::bound(&broker.exchange, "#");
    let mut conn = db.conn();
    // Stamped now, as Bugzilla stamps: a change stamped long ago is owed
    // that long, and the poller would rightly say it is stale.
    let (now, _) = db.stamp(0);
    for bug in 1..=7 {
        assert!(TestDb::push_notify_change(&mut conn, bug, Some(&now)));
    }
    let poller = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &broker.exchange,
        &[
            ("BZPUSH_BATCH_SIZE", "1".to_string()),
            ("BZPUSH_POLL_INTERVAL", "200ms".to_string()),
            ("BZPUSH_LOG", "info".to_string()),
        ],
    );
    // Every change goes out at once: the refusals of one queue hold none
    // of the others back.
    let mut got = Vec::new();
    assert!(
        broker.receive_until(&mut got, Duration::from_secs(10), |g| {
            (1..=7u64).all(|bug| g.iter().any(|(b, _)| *b == bug))
        }),
        "not every change went out: {got:?}\n{}",
        poller.log()
    );
    let started = Instant::now();
    let mut counts: HashMap<u64, usize> = HashMap::new();
    for (bug, _) in &got {
        *counts.entry(*bug).or_default() += 1;
    }
    // Ten seconds of refusals: each change is sent again alone, after 1,
    // 2, 4 and 8 s (the first pause may start late by a poll or so).
    while started.elapsed() < Duration::from_secs(10) {
        tally(&broker, &mut counts, Duration::from_millis(500));
    }
    assert!(
        counts.values().all(|n| (2..=5).contains(n)),
        "each refused change is sent again a few times, not in a loop: {counts:?}"
    );
    assert_eq!(db.push_notify_rows(), 7, "a refused change's row stays");
    let log = poller.log();
    assert_eq!(lines_with(&log, "reject-publish"), 1, "named once:\n{log}");
    assert_eq!(lines_with(&log, "[WARN]"), 1, "one warning:\n{log}");
    assert_eq!(
        lines_with(&log, ": connected"),
        2,
        "the connections stay (one \"connected\" line each for the database and \
         the broker):\n{log}"
    );

    // The queue's consumer comes back: every refused change is taken at
    // its next try, and the rows go.
    full.delete();
    assert!(
        wait_until(WAIT, || db.push_notify_rows() == 0),
        "the rows of the changes the broker took at last stay:\n{}",
        poller.log()
    );
    assert!(
        poller.wait_for_log("took every change it had refused", WAIT),
        "{}",
        poller.log()
    );
    // Nothing confirmed goes out again.
    let mut after = HashMap::new();
    tally(&broker, &mut after, Duration::from_millis(500));
    thread::sleep(Duration::from_secs(3));
    let mut later = HashMap::new();
    tally(&broker, &mut later, Duration::from_millis(500));
    assert!(later.is_empty(), "sent again once taken: {later:?}");
}

/// The input as a user met it: batches of one, changes arriving
/// one at a time, every message refused by another consumer's full queue.
/// A refused change is read again at each poll until the broker takes it:
/// it must not take the one place in a batch from each later change (with
/// source `bugs`, every later change waited behind it for good).
fn later_changes_pass_a_refused_one_in_batches_of_one(source: &str) {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let _full = FullQueue::bound(&broker.exchange, "#");
    let poller = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &broker.exchange,
        &[
            ("BZPUSH_SOURCE", source.to_string()),
            ("BZPUSH_BATCH_SIZE", "1".to_string()),
            ("BZPUSH_POLL_INTERVAL", "200ms".to_string()),
        ],
    );
    assert!(poller.wait_for_log("active:", WAIT), "{}", poller.log());
    let change = |bug: u32| {
        let (sql, wire) = db.stamp(0);
        db.set_bug(bug, &sql);
        if source == "push_notify" {
            assert!(TestDb::push_notify_change(&mut db.conn(), bug, Some(&sql)));
        }
        (u64::from(bug), wire)
    };
    let mut got = Vec::new();
    for bug in 1..=6 {
        let sent = change(bug);
        assert!(
            broker.receive_until(&mut got, Duration::from_secs(5), |g| g.contains(&sent)),
            "bug {bug}'s change waits behind the refused ones: {got:?}\n{}",
            poller.log()
        );
        thread::sleep(Duration::from_millis(300));
    }
}

#[test]
fn later_changes_pass_a_refused_one_in_batches_of_one_source_bugs() {
    later_changes_pass_a_refused_one_in_batches_of_one("bugs");
}

#[test]
fn later_changes_pass_a_refused_one_in_batches_of_one_source_push_notify() {
    later_changes_pass_a_refused_one_in_batches_of_one("push_notify");
}

#[test]
fn source_bugs_keeps_its_watermark_at_a_refused_change_and_replays_it_after_a_restart() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let state = std::env::temp_dir().join(unique("bzpush_state"));
    std::fs::create_dir_all(&state).expect("a state folder");
    let watermark = state.join(format!("bzpush.{}.watermark", db.name));
    // Only bug 1's messages are refused.
    let full = FullQueue::bound(&broker.exchange, "1");
    let mut conn = db.conn();
    conn.query_drop("INSERT INTO bugs (bug_id, delta_ts) VALUES (1, NOW()), (2, NOW())")
        .expect("insert two bugs");
    let env = [
        ("BZPUSH_SOURCE", "bugs".to_string()),
        ("BZPUSH_OVERLAP", "1s".to_string()),
        (
            "BZPUSH_STATE_DIRECTORY",
            state.to_string_lossy().into_owned(),
        ),
        ("BZPUSH_LOG", "info".to_string()),
    ];
    let mut poller = Bzpush::poll(&db, MYSQL_ADDR, AMQP_ADDR, &broker.exchange, &env);
    assert!(poller.wait_for_log("active:", WAIT), "{}", poller.log());
    thread::sleep(Duration::from_secs(2));
    conn.query_drop("UPDATE bugs SET delta_ts = NOW() WHERE bug_id = 1")
        .expect("change bug 1");
    let refused: String = conn
        .query_first("SELECT DATE_FORMAT(delta_ts, '%Y-%m-%dT%H:%i:%s') FROM bugs WHERE bug_id = 1")
        .expect("read it")
        .expect("bug 1");
    thread::sleep(Duration::from_secs(2));
    conn.query_drop("UPDATE bugs SET delta_ts = NOW() WHERE bug_id = 2")
        .expect("change bug 2 later");
    let mut got = Vec::new();
    assert!(
        broker.receive_until(&mut got, WAIT, |g| g.iter().any(|(b, _)| *b == 2)
            && g.contains(&(1, refused.clone()))),
        "{got:?}\n{}",
        poller.log()
    );
    // Long past the overlap, the watermark has not passed the refused
    // change, though a later one was taken.
    thread::sleep(Duration::from_secs(4));
    let saved = std::fs::read_to_string(&watermark).unwrap_or_default();
    assert!(
        !saved.is_empty() && saved.trim_end() <= refused.as_str(),
        "the saved watermark {saved:?} passed the refused change {refused}"
    );

    // A restart replays it; once the queue takes it, it is gone.
    poller.kill9();
    full.delete();
    let restarted = Bzpush::poll(&db, MYSQL_ADDR, AMQP_ADDR, &broker.exchange, &env);
    let mut replayed = Vec::new();
    assert!(
        broker.receive_until(&mut replayed, WAIT, |g| g.contains(&(1, refused.clone()))),
        "the refused change was not replayed: {replayed:?}\n{}",
        restarted.log()
    );
    assert!(
        wait_until(WAIT, || {
            std::fs::read_to_string(&watermark).is_ok_and(|w| w.trim_end() > refused.as_str())
        }),
        "the watermark moves on once the change is taken:\n{}",
        restarted.log()
    );
    let _ = std::fs::remove_dir_all(&state);
}

/// `bzpush check MODE` against the private node `rabbit`.
fn check(mode: &str, env: &[(&'static str, String)]) -> util::Finished {
    Bzpush::run(&["check", mode], env, Duration::from_secs(60))
}

#[test]
fn a_resource_alarm_is_named_within_seconds_leaks_no_connection_and_everything_arrives_after() {
    let rabbit = PrivateRabbit::node();
    let db = TestDb::new();
    let exchange = unique("bzpush.test");
    let listener = rabbit.listen(0, &exchange, false);
    let poller = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        &rabbit.addr(0),
        &exchange,
        &[("BZPUSH_LOG", "info".to_string())],
    );
    let server = Bzpush::serve_at(&rabbit.addr(0), &format!("/={exchange}"), &[]);
    server.wait_healthy();
    let mut conn = db.conn();
    assert!(TestDb::push_notify_change(
        &mut conn,
        1,
        Some(&datetime(1).0)
    ));
    assert_eq!(
        listener.received.recv_timeout(WAIT).ok(),
        Some((1, datetime(1).1))
    );

    rabbit.raise_alarm(0);
    // While idle, within seconds: in the poller's log and serve's /health.
    assert!(
        poller.wait_for_log("resource alarm", Duration::from_secs(10)),
        "the poller did not name the alarm:\n{}",
        poller.log()
    );
    let alarm = |server: &Bzpush| {
        let (_, body) = http_get(&server.listen_addr(), "/health");
        let json: Value = serde_json::from_str(&body).unwrap_or_default();
        json["alarm"].as_str().map(str::to_string)
    };
    assert!(
        wait_until(Duration::from_secs(10), || alarm(&server).is_some()),
        "/health does not name the alarm:\n{}",
        server.log()
    );
    let reason = alarm(&server).unwrap_or_default();
    assert!(reason.contains("memory"), "{reason}");
    let env = [
        ("BZPUSH_DATABASE_URL", db.url()),
        ("BZPUSH_AMQP_URL", rabbit.url(0)),
        ("BZPUSH_EXCHANGE", exchange.clone()),
        ("BZPUSH_FEEDS", format!("/={exchange}")),
    ];
    // A warning, not a failure: check is the units' ExecStartPre=, and
    // an alarm passes.
    for mode in ["poll", "serve"] {
        let checked = check(mode, &env);
        assert!(
            checked
                .stdout
                .lines()
                .any(|l| l.starts_with("warn") && l.contains("resource alarm")),
            "{checked:?}"
        );
        assert!(!checked.stdout.contains("FAIL"), "{checked:?}");
    }

    // Changes wait, past the publisher's 30 s bound on a confirm: the
    // poller keeps its one connection and opens no other.
    for bug in 2..=6 {
        assert!(TestDb::push_notify_change(
            &mut conn,
            bug,
            Some(&datetime(bug).0)
        ));
    }
    thread::sleep(Duration::from_secs(35));
    let polls = rabbit
        .connections(0)
        .into_iter()
        .filter(|(name, _)| name == "bzpush poll")
        .count();
    assert_eq!(polls, 1, "{:?}\n{}", rabbit.connections(0), poller.log());
    assert_eq!(db.push_notify_rows(), 5, "nothing is lost meanwhile");

    rabbit.clear_alarm(0);
    let mut got: Vec<(u64, String)> = Vec::new();
    assert!(
        wait_until(WAIT, || {
            got.extend(listener.received.try_iter());
            (2..=6).all(|bug| got.contains(&(bug, datetime(bug as u32).1)))
        }),
        "not everything arrived once the alarm cleared: {got:?}\n{}",
        poller.log()
    );
    assert!(wait_until(WAIT, || db.push_notify_rows() == 0));
    assert!(
        wait_until(Duration::from_secs(10), || alarm(&server).is_none()),
        "/health still names the alarm"
    );
    assert!(
        server.log().contains("the resource alarm cleared"),
        "{}",
        server.log()
    );
}

#[test]
fn an_empty_vhost_is_refused_saying_how_to_write_the_default_one() {
    let url = format!("amqp://guest:guest@{AMQP_ADDR}/");
    for mode in ["poll", "serve"] {
        let done = Bzpush::run(
            &[mode],
            &[("BZPUSH_AMQP_URL", url.clone())],
            Duration::from_secs(10),
        );
        assert_eq!(done.status.code(), Some(2), "{mode}: {done:?}");
        assert!(
            done.stderr.contains("BZPUSH_AMQP_URL")
                && done.stderr.contains("empty vhost")
                && done
                    .stderr
                    .contains(&format!("amqp://guest:***@{AMQP_ADDR}/%2f")),
            "{mode}: {}",
            done.stderr
        );
    }
}

#[test]
fn amqps_to_a_plain_port_says_so() {
    let broker = TestBroker::without_queue();
    let done = Bzpush::run(
        &["check", "serve"],
        &[
            (
                "BZPUSH_AMQP_URL",
                format!("amqps://guest:guest@{AMQP_ADDR}/%2f"),
            ),
            ("BZPUSH_FEEDS", format!("/={}", broker.exchange)),
        ],
        Duration::from_secs(30),
    );
    assert_eq!(done.status.code(), Some(1), "{done:?}");
    let line = done
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL") && l.contains("broker"))
        .unwrap_or_else(|| panic!("no broker line: {done:?}"));
    assert!(
        line.contains("TLS") && line.contains("without TLS") && !line.contains("corrupt"),
        "{line}"
    );
}

#[test]
fn serve_health_says_why_the_broker_is_down_and_which_node_each_consumer_uses() {
    let broker = TestBroker::without_queue();
    let proxy = Proxy::to(AMQP_ADDR);
    let server = Bzpush::serve_at(&proxy.addr(), &format!("/={}", broker.exchange), &[]);
    server.wait_healthy();
    let health = || {
        let (status, body) = http_get(&server.listen_addr(), "/health");
        let json: Value = serde_json::from_str(&body).unwrap_or_default();
        (status, json)
    };
    let (_, json) = health();
    assert_eq!(
        json["broker_links"][0],
        serde_json::json!({"state": "up", "node": format!("amqp://guest:***@{}/%2f", proxy.addr())}),
        "{json}"
    );
    proxy.set_down(true);
    proxy.sever();
    assert!(wait_until(WAIT, || health().0 == 503), "{}", server.log());
    let (_, json) = health();
    let link = &json["broker_links"][0];
    let reason = link["reason"].as_str().unwrap_or_default();
    assert_eq!(link["state"], "down", "{json}");
    assert!(
        reason.contains(&proxy.addr()) && !reason.contains("guest:guest"),
        "the reason names the node, without its password: {json}"
    );
    proxy.set_down(false);
    assert!(wait_until(WAIT, || health().0 == 200), "{}", server.log());
}
