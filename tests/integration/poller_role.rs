//! The poller's lock and role, and a database that refuses it (README,
//! "The poller lock" and Operations): the default lock name keeps pollers of two databases apart and
//! pollers of one together; who is active shows in the log, systemd's
//! `STATUS=`, `/health`, `/metrics` and `check`; a poller whose old
//! connection still holds the lock ends it; a missing table or privilege is
//! "refused" with its fix, said once and retried slowly, not an outage.
//! Each test has its own database (and user); the lock names derive from
//! the database names, so they are unique too.

use crate::util;

use std::time::Duration;

use crate::util::run::TestUser;
use crate::util::serve::{Client, health, metric};
use crate::util::{
    AMQP_ADDR, Bzpush, MYSQL_ADDR, Proxy, TestBroker, TestDb, admin_conn, wait_until,
};
use mysql::prelude::Queryable;
use serde_json::json;

const WAIT: Duration = Duration::from_secs(20);
/// Long enough for a refused poller's slow retry (30 s) and then some.
const RETRY_WAIT: Duration = Duration::from_secs(60);

/// Lines of `log` that contain every one of `needles`.
fn log_lines(log: &str, needles: &[&str]) -> usize {
    log.lines()
        .filter(|line| needles.iter().all(|n| line.contains(n)))
        .count()
}

#[test]
fn pollers_of_two_databases_are_both_active_and_of_one_database_one_waits_and_says_so() {
    let a = TestDb::new();
    let b = TestDb::new();
    let first = Bzpush::run_url(a.url(), &[]);
    let other = Bzpush::run_url(b.url(), &[]);
    for (server, db) in [(&first, &a), (&other, &b)] {
        assert!(
            server.wait_for_log("active: holding database lock", WAIT),
            "a poller of {} is active:\n{}",
            db.name,
            server.log()
        );
        assert!(
            server
                .log()
                .contains(&format!("\"bzpush.poller.{}\"", db.name)),
            "the lock names the database:\n{}",
            server.log()
        );
        assert!(wait_until(WAIT, || health(server).1["poller"] == "active"));
        assert_eq!(metric(&server.listen_addr(), "bzpush_poller_active"), 1);
    }
    // systemd hears the role (the harness owns each child's notify socket).
    assert!(
        first.wait_for_notice("STATUS=active:", WAIT).is_some(),
        "no STATUS=active: on the notify socket; got {:?}",
        first.notices()
    );

    // A second poller of the first database waits, and says for whom.
    let second = Bzpush::run_url(a.url(), &[]);
    assert!(
        second.wait_for_log("standby: database lock", WAIT),
        "the second poller of one database is a standby:\n{}",
        second.log()
    );
    let id: u64 = admin_conn()
        .exec_first(
            "SELECT IS_USED_LOCK(?)",
            (format!("bzpush.poller.{}", a.name),),
        )
        .expect("ask for the holder")
        .expect("the lock is held");
    let log = second.log();
    assert_eq!(
        log_lines(
            &log,
            &[
                "standby:",
                &format!("held by database connection {id} from 127.0.0.1:")
            ]
        ),
        1,
        "one line names the holder and its host:\n{log}"
    );
    let (status, json) = health(&second);
    assert_eq!(status, 200, "a standby is healthy: {json}");
    assert_eq!(json["poller"], "standby", "{json}");
    assert_eq!(json["lock_holder"]["connection"], id, "{json}");
    assert!(
        json["lock_holder"]["host"]
            .as_str()
            .is_some_and(|h| h.starts_with("127.0.0.1:")),
        "{json}"
    );
    assert_eq!(metric(&second.listen_addr(), "bzpush_poller_active"), 0);
    // A user without the PROCESS privilege sees only its own connections.
    let user = TestUser::new(&[format!("SELECT, DELETE ON `{}`.*", a.name)]);
    let third = Bzpush::run_url(user.url(&a), &[]);
    assert!(
        wait_until(WAIT, || health(&third).1["poller"] == "standby"),
        "{}",
        third.log()
    );
    let (_, json) = health(&third);
    assert_eq!(json["lock_holder"]["connection"], id, "{json}");
    assert_eq!(json["lock_holder"]["host"], "unknown", "{json}");
    assert!(
        third.log().contains(&format!(
            "held by database connection {id} from an unknown host"
        )),
        "{}",
        third.log()
    );

    // check warns, naming the holder, and still passes.
    let finished = Bzpush::run(
        &["check", "run"],
        &[("BZPUSH_DATABASE_URL", a.url())],
        Duration::from_secs(30),
    );
    assert_eq!(
        finished.status.code(),
        Some(0),
        "a held lock is no failure:\n{}",
        finished.stdout
    );
    assert!(
        finished.stdout.lines().any(|l| l.starts_with("warn")
            && l.contains(&format!("held by database connection {id} from 127.0.0.1:"))),
        "check names the holder:\n{}",
        finished.stdout
    );
    let finished = Bzpush::run(
        &["check", "run"],
        &[
            ("BZPUSH_DATABASE_URL", a.url()),
            ("BZPUSH_LOCK_NAME", util::unique("bzpush.free")),
        ],
        Duration::from_secs(30),
    );
    assert!(
        finished
            .stdout
            .contains("free; this poller will be the active one"),
        "{}",
        finished.stdout
    );
}

#[test]
fn a_poller_whose_link_went_silent_ends_its_old_session_and_is_active_again() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let proxy = Proxy::to(MYSQL_ADDR);
    let mut conn = db.conn();
    let poller = Bzpush::poll(&db, &proxy.addr(), AMQP_ADDR, &broker.exchange, &[]);
    assert!(
        poller.wait_for_log("active:", WAIT),
        "the poller takes the lock:\n{}",
        poller.log()
    );
    let (sql, wire) = util::datetime(0);
    TestDb::push_notify_change(&mut conn, 1, Some(&sql));
    let message = broker.recv(WAIT).expect("published before the stall");
    assert_eq!(message.bug_and_time(), (1, wire));

    // The link goes silent: the server keeps the old session, and its lock,
    // while the poller times out and connects again.
    proxy.stall();
    let (sql, wire) = util::datetime(1);
    TestDb::push_notify_change(&mut conn, 2, Some(&sql));
    let message = broker
        .recv(RETRY_WAIT)
        .unwrap_or_else(|| panic!("published after the stall:\n{}", poller.log()));
    assert_eq!(message.bug_and_time(), (2, wire));
    let log = poller.log();
    assert_eq!(
        log_lines(&log, &["previous connection", "ending it"]),
        1,
        "the poller ends its own old session:\n{log}"
    );
    assert_eq!(
        log_lines(&log, &["standby"]),
        0,
        "never a standby of itself:\n{log}"
    );
}

#[test]
fn a_database_without_push_notify_is_refused_with_the_fix_once_not_an_outage() {
    let db = TestDb::new();
    db.conn()
        .query_drop("DROP TABLE push_notify")
        .expect("drop push_notify: stock Bugzilla");
    let server = Bzpush::run_url(db.url(), &[]);
    let addr = server.listen_addr();
    assert!(
        wait_until(WAIT, || health(&server).1["database"] == "refused"),
        "/health says refused:\n{}",
        server.log()
    );
    let (status, json) = health(&server);
    assert_eq!(status, 503, "{json}");
    assert!(
        json["reason"]
            .as_str()
            .is_some_and(|r| r.contains("BZPUSH_SOURCE=bugs") && r.contains("PushNotify")),
        "{json}"
    );

    // The extension is installed: the next slow retry picks it up.
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [7]})),
        json!({"command": "subscribe", "result": "ok", "bugs": [7]})
    );
    db.conn()
        .query_drop(
            "CREATE TABLE push_notify (
               id INT NOT NULL AUTO_INCREMENT PRIMARY KEY,
               bug_id MEDIUMINT NOT NULL,
               delta_ts DATETIME NOT NULL,
               UNIQUE KEY push_notify_idx (bug_id))",
        )
        .expect("create push_notify");
    let (sql, wire) = util::datetime(7);
    TestDb::push_notify_change(&mut db.conn(), 7, Some(&sql));
    assert_eq!(
        client.recv(RETRY_WAIT),
        json!({"command": "update", "bug": 7, "when": wire})
    );
    assert!(wait_until(WAIT, || health(&server).0 == 200));
    assert_eq!(health(&server).1["database"], "up");

    let log = server.log();
    assert_eq!(
        log_lines(&log, &["refused", "BZPUSH_SOURCE=bugs"]),
        1,
        "the fix, once:\n{log}"
    );
    assert_eq!(
        log_lines(&log, &["retrying with backoff"]),
        0,
        "no outage:\n{log}"
    );
    assert_eq!(metric(&addr, "bzpush_notifications_in_total"), 1);
}

#[test]
fn without_delete_one_warning_and_each_notification_counted_once() {
    let db = TestDb::new();
    let user = TestUser::new(&[
        format!("SELECT ON `{}`.push_notify", db.name),
        format!("SELECT ON `{}`.bugs", db.name),
    ]);
    let server = Bzpush::run_url(user.url(&db), &[]);
    let addr = server.listen_addr();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [5]})),
        json!({"command": "subscribe", "result": "ok", "bugs": [5]})
    );
    let (sql, wire) = util::datetime(5);
    TestDb::push_notify_change(&mut db.conn(), 5, Some(&sql));
    assert_eq!(
        client.recv(WAIT),
        json!({"command": "update", "bug": 5, "when": wire})
    );
    assert!(
        wait_until(WAIT, || health(&server).1["database"] == "refused"),
        "/health says refused:\n{}",
        server.log()
    );
    let (status, json) = health(&server);
    assert_eq!(status, 503, "{json}");
    assert!(
        json["reason"].as_str().is_some_and(|r| r.contains(&format!(
            "GRANT SELECT, DELETE ON `{}`.push_notify",
            db.name
        ))),
        "{json}"
    );

    // Granted: the next slow retry, which reads the row again, deletes it.
    admin_conn()
        .query_drop(format!(
            "GRANT DELETE ON `{}`.push_notify TO '{}'@'%'",
            db.name, user.name
        ))
        .expect("grant DELETE");
    assert!(
        wait_until(RETRY_WAIT, || db.push_notify_rows() == 0),
        "the row is deleted once allowed:\n{}",
        server.log()
    );
    assert!(wait_until(WAIT, || health(&server).0 == 200));
    assert_eq!(
        metric(&addr, "bzpush_notifications_in_total"),
        1,
        "read twice, counted once"
    );
    let log = server.log();
    assert_eq!(log_lines(&log, &["refused"]), 1, "one warning:\n{log}");
    // One when the refusal ends, and one at start if a poll came before
    // the change: none per retry.
    let connected = log_lines(&log, &["] database ", "connected"]);
    assert!((1..=2).contains(&connected), "{connected} lines:\n{log}");
    assert_eq!(log_lines(&log, &["retrying with backoff"]), 0, "{log}");
    assert_eq!(
        client.try_recv(Duration::from_millis(500)),
        None,
        "delivered once"
    );
}

#[test]
fn a_wrong_password_is_refused_with_the_fix_not_an_outage() {
    let db = TestDb::new();
    let user = TestUser::new(&[format!("SELECT, DELETE ON `{}`.*", db.name)]);
    let url = user.url(&db).replace(&user.password, "not-the-password");
    let server = Bzpush::run_url(url, &[]);
    assert!(
        wait_until(WAIT, || health(&server).1["database"] == "refused"),
        "/health says refused:\n{}",
        server.log()
    );
    let (status, json) = health(&server);
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["poller"], "none", "{json}");
    assert!(
        json["reason"]
            .as_str()
            .is_some_and(|r| r.contains("Access denied") && r.contains("BZPUSH_DATABASE_URL")),
        "{json}"
    );
    // The log's own thread writes the line: it may come a moment after
    // /health shows the state.
    assert!(server.wait_for_log("refused", WAIT), "{}", server.log());
    let log = server.log();
    assert_eq!(log_lines(&log, &["refused"]), 1, "{log}");
    assert_eq!(log_lines(&log, &["retrying with backoff"]), 0, "{log}");
}

#[test]
fn a_poller_refused_while_active_lets_a_standby_that_works_take_over() {
    let db = TestDb::new();
    let select_only = TestUser::new(&[
        format!("SELECT ON `{}`.push_notify", db.name),
        format!("SELECT ON `{}`.bugs", db.name),
    ]);
    let granted = TestUser::new(&[format!("SELECT, DELETE ON `{}`.*", db.name)]);
    // The lock name derives from the test database's: unique to this test.
    let refused = Bzpush::run_url(select_only.url(&db), &[]);
    assert!(
        refused.wait_for_log("active: holding database lock", WAIT),
        "{}",
        refused.log()
    );
    let working = Bzpush::run_url(granted.url(&db), &[]);
    assert!(
        wait_until(WAIT, || health(&working).1["poller"] == "standby"),
        "{}",
        working.log()
    );
    let mut client = Client::connect(&working.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [3]})),
        json!({"command": "subscribe", "result": "ok", "bugs": [3]})
    );

    // The active poller reads the change, may not delete it, and lets go
    // of the lock: the standby takes over, publishes and deletes it.
    let (sql, wire) = util::datetime(3);
    TestDb::push_notify_change(&mut db.conn(), 3, Some(&sql));
    assert_eq!(
        client.recv(RETRY_WAIT),
        json!({"command": "update", "bug": 3, "when": wire}),
        "the standby took over:\n{}\n{}",
        refused.log(),
        working.log()
    );
    assert!(
        wait_until(WAIT, || db.push_notify_rows() == 0),
        "{}",
        working.log()
    );
    let (status, json) = health(&working);
    assert_eq!((status, &json["poller"]), (200, &json!("active")), "{json}");
    let (status, json) = health(&refused);
    assert_eq!(status, 503, "{json}");
    assert_eq!(json["database"], "refused", "{json}");
    assert_ne!(json["poller"], "active", "{json}");

    // After its slow retry the refused poller waits as a standby, and
    // still says it is refused: waiting proves nothing about DELETE.
    assert!(
        wait_until(RETRY_WAIT, || health(&refused).1["poller"] == "standby"),
        "{}",
        refused.log()
    );
    let (status, json) = health(&refused);
    assert_eq!(
        (status, &json["database"]),
        (503, &json!("refused")),
        "{json}"
    );
    assert!(
        json["reason"].as_str().is_some_and(|r| r.contains(&format!(
            "GRANT SELECT, DELETE ON `{}`.push_notify",
            db.name
        ))),
        "{json}"
    );
    assert_eq!(health(&working).1["poller"], "active");
    assert_eq!(
        log_lines(&refused.log(), &["refused"]),
        1,
        "{}",
        refused.log()
    );
}

/// The same for `poll`: the refused poller has published the change but
/// may not delete it; the standby that takes over publishes it again (a
/// duplicate is allowed, a loss is not) and deletes it.
#[test]
fn a_poll_refused_while_active_lets_a_standby_that_works_publish_and_delete() {
    let db = TestDb::new();
    let broker = TestBroker::new();
    let select_only = TestUser::new(&[
        format!("SELECT ON `{}`.push_notify", db.name),
        format!("SELECT ON `{}`.bugs", db.name),
    ]);
    let granted = TestUser::new(&[format!("SELECT, DELETE ON `{}`.*", db.name)]);
    let as_user = |user: &TestUser| [("BZPUSH_DATABASE_URL", user.url(&db))];
    let refused = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &broker.exchange,
        &as_user(&select_only),
    );
    assert!(
        refused.wait_for_log("active: holding database lock", WAIT),
        "{}",
        refused.log()
    );
    let working = Bzpush::poll(
        &db,
        MYSQL_ADDR,
        AMQP_ADDR,
        &broker.exchange,
        &as_user(&granted),
    );
    assert!(
        working.wait_for_log("standby: database lock", WAIT),
        "{}",
        working.log()
    );

    let (sql, wire) = util::datetime(4);
    TestDb::push_notify_change(&mut db.conn(), 4, Some(&sql));
    assert!(
        wait_until(RETRY_WAIT, || db.push_notify_rows() == 0),
        "the standby took over and deleted the row:\n{}\n{}",
        refused.log(),
        working.log()
    );
    assert!(
        working.wait_for_log("active: holding database lock", WAIT),
        "{}",
        working.log()
    );
    // Published by the refused poller, then again by the one that took
    // over: every copy is this change.
    let message = broker.recv(WAIT).expect("the change is published");
    assert_eq!(message.bug_and_time(), (4, wire.clone()));
    while let Some(message) = broker.recv(Duration::from_millis(500)) {
        assert_eq!(message.bug_and_time(), (4, wire.clone()));
    }
    assert_eq!(
        log_lines(&refused.log(), &["refused"]),
        1,
        "{}",
        refused.log()
    );
}
