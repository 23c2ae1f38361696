//! Health is the outcome (SPEC §6.1, §3.1, §3.4): bzpush judges itself by
//! the changes it owes downstream, measured against `bugs.delta_ts`, not
//! by whether each part says "up". Each input here once looked healthy
//! while delivering nothing, or late without a word: an extension that
//! writes nothing, admin SQL long after a bug's last change, a database
//! gone, a standby `run`, a thread stuck in its work, a stderr nobody
//! reads, and SIGHUP.

use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use serde_json::json;

use crate::util::serve::{Client, health, http_get, metric, pulse_body};
use crate::util::{Bzpush, MYSQL_ADDR, Proxy, TestBroker, TestDb, wait_until};

const WAIT: Duration = Duration::from_secs(20);

/// Waits until `server`'s `/health` says stale, then checks it answers 503
/// and that its reason names every one of `needles`.
fn assert_stale(server: &Bzpush, needles: &[&str]) {
    assert!(
        wait_until(WAIT, || health(server).1["status"] == "stale"),
        "{}",
        server.log()
    );
    let (status, json) = health(server);
    assert_eq!(status, 503, "{json}");
    let reason = json["stale"].as_str().unwrap_or_default();
    assert!(needles.iter().all(|n| reason.contains(n)), "{json}");
}

/// Waits for `bug`'s update at `when` among what `client` receives.
fn delivered(client: &mut Client, bug: u32, when: &str, server: &Bzpush) {
    let wanted = json!({"command": "update", "bug": bug, "when": when});
    let mut seen = Vec::new();
    let arrived = wait_until(WAIT, || {
        seen.extend(client.try_recv(Duration::from_millis(100)));
        seen.contains(&wanted)
    });
    assert!(
        arrived,
        "{wanted} not delivered; got {seen:?}\n{}",
        server.log()
    );
}

/// Lines of `log` that contain every one of `needles`.
fn lines(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .count()
}

/// BMO's ZPushNotify writes nothing until its `enable_simple_push`
/// parameter is on: the table exists and stays empty while bugs change.
/// Every change is delivered from the audit of `bugs.delta_ts`, the cause
/// is said once and shown in `/health`, and counted.
#[test]
fn an_extension_that_writes_nothing_is_caught_by_the_audit_and_named() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[]);
    let mut client = Client::subscribed(&server, &[5, 6]);
    for (bug, offset) in [(5, 0), (6, 1), (5, 2)] {
        let (sql, wire) = db.stamp(offset);
        db.set_bug(bug, &sql);
        delivered(&mut client, bug, &wire, &server);
    }
    let log = server.log();
    assert_eq!(lines(&log, &["enable_simple_push"]), 1, "said once:\n{log}");
    let addr = server.listen_addr();
    assert_eq!(
        metric(&addr, "bzpush_missed_changes_total{cause=\"no_rows\"}"),
        3
    );
    let (status, json) = health(&server);
    assert_eq!(status, 200, "delivered, if late by a poll: {json}");
    assert!(
        json["warnings"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w.as_str().is_some_and(|w| w.contains("enable_simple_push")))),
        "{json}"
    );
    // `check` sees it too, with no poller running.
    drop(server);
    let (sql, _) = db.stamp(3);
    db.set_bug(7, &sql);
    let finished = Bzpush::run(
        &["check", "run"],
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_SOURCE", "push_notify".into()),
            ("BZPUSH_LISTEN", "127.0.0.1:0".into()),
        ],
        WAIT,
    );
    assert!(
        finished
            .stdout
            .lines()
            .any(|l| l.starts_with("warn") && l.contains("enable_simple_push")),
        "{}",
        finished.stdout
    );
}

/// Admin pages write `bugs.delta_ts` by plain SQL (deleting a milestone or
/// a user): no row. Such a change came more than an overlap after the
/// bug's previous one was missed; it is delivered, counted and named.
#[test]
fn admin_sql_long_after_a_bugs_last_change_is_delivered() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[("BZPUSH_OVERLAP", "2s".into())]);
    let mut client = Client::subscribed(&server, &[9]);
    let (sql, wire) = db.stamp(0);
    db.set_bug(9, &sql);
    assert!(TestDb::push_notify_change(&mut db.conn(), 9, Some(&sql)));
    delivered(&mut client, 9, &wire, &server);
    // Well past the overlap since the bug's last change.
    std::thread::sleep(Duration::from_secs(4));
    let (sql, wire) = db.stamp(0);
    db.conn()
        .exec_drop("UPDATE bugs SET delta_ts = ? WHERE bug_id = 9", (&sql,))
        .expect("an admin page's UPDATE");
    delivered(&mut client, 9, &wire, &server);
    assert_eq!(
        metric(
            &server.listen_addr(),
            "bzpush_missed_changes_total{cause=\"plain_sql\"}"
        ),
        1
    );
    assert_eq!(lines(&server.log(), &["plain SQL"]), 1, "{}", server.log());
}

/// `poll` serves no `/health`: a database gone for longer than
/// `BZPUSH_STALE_AFTER` is said in its log, with the reason, once, and
/// its end once it returns.
#[test]
fn poll_says_in_its_log_when_it_is_stale_and_when_it_is_over() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let proxy = Proxy::to(MYSQL_ADDR);
    let poller = Bzpush::poll(
        &db,
        &proxy.addr(),
        crate::util::AMQP_ADDR,
        &broker.exchange,
        &[("BZPUSH_STALE_AFTER", "2s".into())],
    );
    assert!(poller.wait_for_log("active:", WAIT), "{}", poller.log());
    proxy.set_down(true);
    assert!(
        poller.wait_for_log("stale: the poller", WAIT),
        "{}",
        poller.log()
    );
    proxy.set_down(false);
    assert!(
        poller.wait_for_log("no longer stale", WAIT),
        "{}",
        poller.log()
    );
    let log = poller.log();
    assert_eq!(
        lines(&log, &["stale: the poller", "database is down"]),
        1,
        "{log}"
    );
}

/// A database gone for longer than `BZPUSH_STALE_AFTER`: `/health` says
/// "stale", why, and 503; `/metrics` agrees; back to 200 once it returns.
#[test]
fn changes_owed_past_stale_after_make_health_503_with_the_reason() {
    let db = TestDb::new();
    let proxy = Proxy::to(MYSQL_ADDR);
    let server = Bzpush::run_url(
        db.url_at(&proxy.addr()),
        &[
            ("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name)),
            ("BZPUSH_STALE_AFTER", "2s".into()),
        ],
    );
    assert!(
        wait_until(WAIT, || health(&server).0 == 200),
        "{}",
        server.log()
    );
    proxy.set_down(true);
    assert_stale(&server, &["poller", "database is down"]);
    assert_eq!(metric(&server.listen_addr(), "bzpush_stale"), 1);
    proxy.set_down(false);
    assert!(
        wait_until(WAIT, || health(&server).0 == 200),
        "{}",
        server.log()
    );
    assert_eq!(metric(&server.listen_addr(), "bzpush_stale"), 0);
}

/// A standby `run` owes its own clients every change the active one hands
/// to its clients: once one waits past the threshold, its `/health` is 503
/// (a load balancer then sends clients to the active one), the active
/// one's is 200.
#[test]
fn a_standby_run_turns_stale_once_a_change_goes_undelivered() {
    let db = TestDb::new();
    let settings = [("BZPUSH_STALE_AFTER", "2s".to_string())];
    let active = Bzpush::run_on(&db, &settings);
    assert!(active.wait_for_log("active:", WAIT), "{}", active.log());
    let standby = Bzpush::run_on(&db, &settings);
    assert!(standby.wait_for_log("standby:", WAIT), "{}", standby.log());
    assert_eq!(health(&standby).0, 200, "nothing owed yet");
    let (sql, _) = db.stamp(0);
    db.set_bug(3, &sql);
    assert!(TestDb::push_notify_change(&mut db.conn(), 3, Some(&sql)));
    assert_stale(&standby, &["standby"]);
    assert_eq!(health(&active).0, 200);
}

/// The watchdog is fed only while no pipeline thread is stuck in its work:
/// a poller whose statement hangs on a link gone silent stops the pings.
#[test]
fn the_watchdog_stops_while_the_poller_is_stuck_in_a_statement() {
    let db = TestDb::new();
    let proxy = Proxy::to(MYSQL_ADDR);
    let server = Bzpush::run_url(
        db.url_at(&proxy.addr()),
        &[
            ("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name)),
            ("WATCHDOG_USEC", "2000000".into()),
            ("BZPUSH_STALE_AFTER", "3s".into()),
        ],
    );
    let pings = |server: &Bzpush| {
        server
            .notices()
            .iter()
            .filter(|l| *l == "WATCHDOG=1")
            .count()
    };
    assert!(
        wait_until(WAIT, || pings(&server) >= 2),
        "{:?}",
        server.notices()
    );
    proxy.set_stalled(true);
    // The poller is in a statement within a poll; then no ping comes.
    std::thread::sleep(Duration::from_secs(4));
    let before = pings(&server);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(pings(&server), before, "{:?}", server.notices());
    assert!(
        server.wait_for_log("the poller thread has been stuck", WAIT),
        "{}",
        server.log()
    );
    // /health says why it is stale, though the link has not failed yet.
    assert_stale(
        &server,
        &["poller", "its poller thread has been in one piece of work"],
    );
    proxy.set_stalled(false);
}

/// stderr is a pipe nobody reads (journald stuck): `serve` goes on
/// delivering whatever it has to say, and counts the lines it dropped.
#[test]
fn a_stderr_nobody_reads_blocks_no_delivery() {
    let broker = TestBroker::new();
    let env = [
        (
            "BZPUSH_AMQP_URL",
            crate::util::amqp_url_at(crate::util::AMQP_ADDR),
        ),
        ("BZPUSH_FEEDS", format!("/={}", broker.exchange)),
        (
            "BZPUSH_QUEUE",
            crate::util::unique("queue/guest/bzpush-test"),
        ),
        ("BZPUSH_LISTEN", "127.0.0.1:0".into()),
        ("BZPUSH_LOG", "trace".into()),
    ];
    let mut server = Bzpush::start_unread(&["serve"], &env);
    assert!(server.wait_listening(WAIT));
    let addr = server.listen_addr();
    // Well over a pipe's 64 KiB of lines: malformed messages, a flood of
    // changes nobody follows delivered twice (each repeat is a debug line),
    // connections that come and go.
    for n in 0..3 {
        broker.publish_raw(&n.to_string(), b"{\"no payload\": true}");
    }
    let flood: Vec<(u64, String)> = (1000..21_000)
        .map(|bug| (bug, "2026-12-01T00:00:01".to_string()))
        .collect();
    broker.publish_many(&flood);
    broker.publish_many(&flood);
    for _ in 0..100 {
        drop(Client::connect(&format!("ws://{addr}/")));
    }
    let mut client = Client::connect(&format!("ws://{addr}/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [4]}))["result"],
        "ok"
    );
    let when = "2026-12-01T00:00:04";
    broker.publish_raw("4", &pulse_body(&broker.exchange, 4, when));
    assert_eq!(
        client.recv(WAIT),
        json!({"command": "update", "bug": 4, "when": when})
    );
    assert!(
        wait_until(WAIT, || metric(&addr, "bzpush_log_lines_dropped_total") > 0),
        "lines were dropped, not waited for"
    );
    assert_eq!(http_get(&addr, "/health").0, 200);
    // Once read again, the log says how many it dropped.
    server.read_stderr();
    drop(Client::connect(&format!("ws://{addr}/")));
    assert!(
        server.wait_for_log("log lines were dropped", WAIT),
        "{}",
        server.log()
    );
}

/// SIGHUP (a sysadmin's `kill -HUP`, a closing terminal) is logged and
/// ignored: clients stay, changes keep coming, and SIGTERM still stops it
/// cleanly.
#[test]
fn sighup_is_logged_and_ignored() {
    let db = TestDb::new();
    let mut server = Bzpush::run_on(&db, &[]);
    let mut client = Client::subscribed(&server, &[2]);
    let status = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .expect("run kill");
    assert!(status.success());
    assert!(
        server.wait_for_log("SIGHUP: ignored", WAIT),
        "{}",
        server.log()
    );
    let started = Instant::now();
    let (sql, wire) = crate::util::datetime(2);
    assert!(TestDb::push_notify_change(&mut db.conn(), 2, Some(&sql)));
    delivered(&mut client, 2, &wire, &server);
    assert!(server.wait_exit(Duration::ZERO).is_none(), "still running");
    assert!(started.elapsed() < WAIT);
    server.sigterm();
    let exited = server.wait_exit(WAIT).expect("SIGTERM stops it");
    assert_eq!(exited.code(), Some(0));
}

/// `serve` with a catch-up database: a change the database has and no
/// feed received (no poller publishes to this exchange) is owed; past the
/// threshold `/health` says so, and receiving it clears it.
#[test]
fn serve_is_stale_when_its_catch_up_database_has_a_change_no_feed_received() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let server = crate::util::serve::healthy_server(
        &broker,
        &[
            ("BZPUSH_CATCHUP_DATABASE_URL", db.url()),
            ("BZPUSH_STALE_AFTER", "2s".into()),
        ],
    );
    assert!(
        wait_until(WAIT, || health(&server).0 == 200),
        "{}\n{}",
        health(&server).1,
        server.log()
    );
    let (stamp, when) = db.stamp(0);
    db.set_bug(5, &stamp);
    assert_stale(&server, &["catch-up database", "no feed received"]);
    broker.publish(5, &when);
    assert!(
        wait_until(WAIT, || health(&server).0 == 200),
        "{}",
        server.log()
    );
}

/// The consumer's link goes silent (no FIN, no RST) while a burst comes:
/// the broker hands a prefetch window to the dead link and keeps the rest
/// ready in the queue, and the consumer, waiting for messages that never
/// come, would call itself idle. The queue is measured on the broker's
/// side: stale, until the heartbeat replaces the link and all is taken.
#[test]
fn serve_is_stale_while_messages_wait_in_its_queue_untaken() {
    let broker = TestBroker::new();
    let proxy = Proxy::to(crate::util::AMQP_ADDR);
    let server = Bzpush::serve_at(
        &proxy.addr(),
        &format!("/={}", broker.exchange),
        &[
            ("BZPUSH_STALE_AFTER", "2s".into()),
            ("BZPUSH_HEARTBEAT", "5s".into()),
        ],
    );
    server.wait_healthy();
    let mut client = Client::subscribed(&server, &[6]);
    proxy.stall();
    // More than the consumer's prefetch window of 1000.
    let burst: Vec<(u64, String)> = (0..1500)
        .map(|n| (6, format!("2026-12-01T00:{:02}:{:02}", n / 60, n % 60)))
        .collect();
    broker.publish_many(&burst);
    assert_stale(&server, &["queue", "ready"]);
    // The heartbeat notices the dead link; a new one takes it all.
    let last = &burst[burst.len() - 1].1;
    delivered(&mut client, 6, last, &server);
    assert!(
        wait_until(WAIT, || health(&server).0 == 200),
        "{}",
        server.log()
    );
}
