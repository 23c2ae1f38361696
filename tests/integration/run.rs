//! `bzpush run` and `bzpush check` end to end: real MariaDB, real RabbitMQ
//! (for `check poll|serve` and `serve`'s catch-up), the real binary.
//!
//! `run` (README, "bzpush run"): a PushNotify row reaches a WebSocket client and is
//! deleted; /health and /metrics (§6); `since` answered from `bugs.delta_ts`
//! when the cache cannot, complete across restarts (§5); SIGTERM (§7).
//! `serve`'s catch-up database and its `partial` fallback. `check` (§1):
//! passes on a good setup, names the problem on each bad one. Each test has
//! its own database (and exchange, and user).

use crate::util;

use std::time::Duration;

use crate::util::run::{ExchangeName, PrivateServer, TestUser, closed_port};
use crate::util::serve::{Client, http_get, metric, partial, t, update, version};
use crate::util::{AMQP_ADDR, Bzpush, Finished, MYSQL_ADDR, Proxy, TestBroker, TestDb};
use crate::util::{amqp_url_at, datetime, wait_until};
use mysql::prelude::Queryable;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// `2026-01-01 00:00:00` plus `secs` seconds, as SQL writes it.
fn sql(secs: u32) -> String {
    datetime(secs).0
}

/// The subscribe answer without `partial`: the whole object, so an extra
/// field fails the comparison.
fn subscribed(bugs: &[u64]) -> Value {
    json!({"command": "subscribe", "result": "ok", "bugs": bugs})
}

fn subscribe_since(bugs: &[u64], since: &str) -> Value {
    json!({"command": "subscribe", "bugs": bugs, "since": since})
}

/// Asserts that nothing else is queued for `client`: the hub answers in
/// order, so anything queued before would arrive before this answer.
fn assert_nothing_queued(client: &mut Client) {
    assert_eq!(
        client.request(json!({"command": "version"})),
        version(),
        "a frame was queued that should not have been"
    );
}

/// The next `n` frames.
fn recv_n(client: &mut Client, n: usize) -> Vec<Value> {
    (0..n).map(|_| client.recv(WAIT)).collect()
}

// ---- run ----

#[test]
fn run_delivers_a_push_notify_change_and_deletes_its_row() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[]);
    server.wait_healthy();
    let addr = server.listen_addr();

    let (status, body) = http_get(&addr, "/health");
    assert_eq!(status, 200, "/health: {body}");
    let health: Value = serde_json::from_str(&body).expect("/health is JSON");
    assert_eq!(health["database"], "up", "/health: {body}");
    assert_eq!(health["status"], "ok", "/health: {body}");

    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [42]})),
        subscribed(&[42])
    );
    let mut conn = db.conn();
    // Bug 7 first: had it been sent to this client, it would come first.
    assert!(TestDb::push_notify_change(&mut conn, 7, Some(&sql(4))));
    assert!(TestDb::push_notify_change(&mut conn, 42, Some(&sql(5))));
    assert_eq!(client.recv(WAIT), update(42, &t(5)));
    assert!(
        wait_until(WAIT, || db.push_notify_rows() == 0),
        "the poller left {} rows in push_notify",
        db.push_notify_rows()
    );
    assert_nothing_queued(&mut client);
    assert!(metric(&addr, "bzpush_poll_batches_total") >= 1);
    assert!(metric(&addr, "bzpush_notifications_in_total") >= 2);
    assert_eq!(metric(&addr, "bzpush_notifications_out_total"), 1);
}

/// What a client is owed (README): a new `(bug, when)` pair is delivered even when `when` is
/// earlier than the bug's last one. Three ways a stamp goes back: summer
/// time ending in a database on local time (the repeated hour), an NTP step
/// back, and two requests on one bug committing in the other order than
/// they stamped.
#[test]
fn run_delivers_a_change_stamped_earlier_than_the_bugs_last_one() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[]);
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [31, 32, 33, 34]})),
        subscribed(&[31, 32, 33, 34])
    );
    let mut conn = db.conn();
    let delivered = |client: &mut Client, expected: &[Value]| {
        assert_eq!(recv_n(client, expected.len()), expected);
        assert!(
            wait_until(WAIT, || db.push_notify_rows() == 0),
            "the poller left rows in push_notify"
        );
    };

    // The repeated hour at the end of summer time.
    assert!(TestDb::push_notify_change(
        &mut conn,
        31,
        Some("2026-10-25 02:30:00")
    ));
    assert!(TestDb::push_notify_change(
        &mut conn,
        32,
        Some("2026-10-25 02:30:00")
    ));
    delivered(
        &mut client,
        &[
            update(31, "2026-10-25T02:30:00"),
            update(32, "2026-10-25T02:30:00"),
        ],
    );
    assert!(TestDb::push_notify_change(
        &mut conn,
        31,
        Some("2026-10-25 02:10:00")
    ));
    delivered(&mut client, &[update(31, "2026-10-25T02:10:00")]);

    // An NTP step back of a few seconds.
    assert!(TestDb::push_notify_change(
        &mut conn,
        33,
        Some("2026-11-30 12:00:05")
    ));
    delivered(&mut client, &[update(33, "2026-11-30T12:00:05")]);
    assert!(TestDb::push_notify_change(
        &mut conn,
        33,
        Some("2026-11-30 12:00:02")
    ));
    delivered(&mut client, &[update(33, "2026-11-30T12:00:02")]);

    // Request A stamps :10 and is still working; request B stamps :11 and
    // commits first; then A commits.
    let mut late = db.conn();
    let mut a = late
        .start_transaction(mysql::TxOpts::default())
        .expect("begin request A");
    let stamped: String = a
        .query_first("SELECT '2026-11-30 13:00:10'")
        .expect("request A stamps")
        .expect("a stamp");
    assert!(TestDb::push_notify_change(
        &mut conn,
        34,
        Some("2026-11-30 13:00:11")
    ));
    delivered(&mut client, &[update(34, "2026-11-30T13:00:11")]);
    a.exec_drop(
        "INSERT INTO push_notify (bug_id, delta_ts) VALUES (34, ?)
         ON DUPLICATE KEY UPDATE delta_ts = VALUES(delta_ts)",
        (stamped,),
    )
    .expect("request A writes its stamp");
    a.commit().expect("request A commits");
    delivered(&mut client, &[update(34, "2026-11-30T13:00:10")]);
    assert_nothing_queued(&mut client);
}

/// Bugs 1..7 in `bugs`, and what a subscription to `asked` since `t(50)`
/// must get: each changed bug's `delta_ts`, oldest first.
const ASKED: [u64; 6] = [1, 2, 3, 4, 5, 7];

fn seed_bugs(db: &TestDb) {
    db.set_bug(1, &sql(100));
    db.set_bug(2, &sql(300));
    db.set_bug(3, &sql(200));
    db.set_bug(4, &sql(10)); // before since: not sent
    db.set_bug(5, &sql(50)); // exactly since: sent
    db.set_bug(6, &sql(150)); // not asked for
    // Bug 7 is asked for but has no row.
}

#[test]
fn run_answers_since_from_the_database_across_restarts() {
    let db = TestDb::new();
    seed_bugs(&db);

    let mut server = Bzpush::run_on(&db, &[]);
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&ASKED, &t(50))),
        subscribed(&ASKED),
        "a fresh server must answer since from the database, complete"
    );
    assert_eq!(
        recv_n(&mut client, 4),
        [
            update(5, &t(50)),
            update(1, &t(100)),
            update(3, &t(200)),
            update(2, &t(300)),
        ]
    );
    assert_nothing_queued(&mut client);
    // Live updates flow once the catch-up is out.
    db.set_bug(1, &sql(400));
    assert!(TestDb::push_notify_change(
        &mut db.conn(),
        1,
        Some(&sql(400))
    ));
    assert_eq!(client.recv(WAIT), update(1, &t(400)));
    assert!(wait_until(WAIT, || db.push_notify_rows() == 0));
    drop(client);

    // A crash and a restart: the new process's cache is empty, the
    // database still knows; `since` written the other accepted way.
    server.kill9();
    let server = Bzpush::run_on(&db, &[]);
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&ASKED, "2026-01-01 00:00:50Z")),
        subscribed(&ASKED),
        "after a restart, since must still be answered complete"
    );
    assert_eq!(
        recv_n(&mut client, 4),
        [
            update(5, &t(50)),
            update(3, &t(200)),
            update(2, &t(300)),
            update(1, &t(400)),
        ]
    );
    assert_nothing_queued(&mut client);
}

#[test]
fn run_stops_on_sigterm_closing_clients_with_1001() {
    let db = TestDb::new();
    let mut server = Bzpush::run_on(&db, &[]);
    server.wait_healthy();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [1]})),
        subscribed(&[1])
    );
    server.sigterm();
    assert_eq!(client.close_code(WAIT), Some(1001));
    let status = server
        .wait_exit(WAIT)
        .unwrap_or_else(|| panic!("bzpush run still ran after SIGTERM:\n{}", server.log()));
    assert_eq!(status.code(), Some(0), "exit status:\n{}", server.log());
    assert!(server.log().contains("poller stopped"), "{}", server.log());
}

// ---- serve: catch-up from the database ----

#[test]
fn serve_catches_up_from_its_database_and_says_partial_when_it_cannot() {
    let db = TestDb::new();
    db.set_bug(1, &sql(100));
    db.set_bug(2, &sql(300));
    db.set_bug(3, &sql(10));
    let broker = TestBroker::new();
    let proxy = Proxy::to(MYSQL_ADDR);
    proxy.set_down(true);
    let server = Bzpush::serve(
        &broker,
        &[("BZPUSH_CATCHUP_DATABASE_URL", db.url_at(&proxy.addr()))],
    );
    server.wait_healthy();

    // Bug 2's change also comes through the broker: now in the cache.
    let mut watcher = Client::connect(&server.ws_url("/"));
    assert_eq!(
        watcher.request(json!({"command": "subscribe", "bugs": [2]})),
        subscribed(&[2])
    );
    broker.publish(2, &t(300));
    assert_eq!(watcher.recv(WAIT), update(2, &t(300)));

    // The catch-up database is unreachable: the cache answers, partial.
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&[1, 2, 3], &t(50))),
        partial(&[1, 2, 3])
    );
    assert_eq!(client.recv(WAIT), update(2, &t(300)));
    assert_nothing_queued(&mut client);

    // Reachable again: the next catch-up is complete, from the database.
    proxy.set_down(false);
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&[1, 2, 3], &t(50))),
        subscribed(&[1, 2, 3])
    );
    assert_eq!(
        recv_n(&mut client, 2),
        [update(1, &t(100)), update(2, &t(300))]
    );
    assert_nothing_queued(&mut client);
}

/// Records a change of `bug` at `when` (a DATETIME literal) on `server`,
/// in `bugs` and `push_notify`, as Bugzilla does; returns `when` as the
/// update carries it.
fn change_on(server: &PrivateServer, bug: u32, when: &str) -> String {
    let mut conn = server.conn();
    conn.exec_drop(
        "INSERT INTO bugs (bug_id, delta_ts) VALUES (?, ?)
         ON DUPLICATE KEY UPDATE delta_ts = VALUES(delta_ts)",
        (bug, when),
    )
    .expect("set bugs.delta_ts");
    assert!(TestDb::push_notify_change(&mut conn, bug, Some(when)));
    when.replace(' ', "T")
}

/// Issue 8 item 2, a database clock ahead of this host (a Bugzilla
/// database on CET: its NOW() and its stamps an hour ahead of UTC). After a
/// clean restart of `run`, a `since` taken from a stamp before the restart
/// must not be vouched for by the cache: the database answers it.
#[test]
fn run_restarted_on_a_database_clock_ahead_of_the_host_answers_since_from_the_database() {
    let zoned = PrivateServer::start("+01:00");
    let lock = ("BZPUSH_LOCK_NAME", util::unique("bzpush.zoned"));
    let mut server = Bzpush::run_url(zoned.url(), std::slice::from_ref(&lock));
    server.wait_healthy();
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [5, 6]})),
        subscribed(&[5, 6])
    );
    let when6 = change_on(&zoned, 6, &zoned.now());
    assert_eq!(client.recv(WAIT), update(6, &when6));
    let when5 = change_on(&zoned, 5, &zoned.now());
    assert_eq!(client.recv(WAIT), update(5, &when5));
    let mut conn = zoned.conn();
    assert!(
        wait_until(WAIT, || conn
            .query_first::<u64, _>("SELECT COUNT(*) FROM push_notify")
            .ok()
            .flatten()
            == Some(0)),
        "the delivered rows were not deleted"
    );
    server.sigterm();
    assert!(server.wait_exit(WAIT).is_some(), "run did not stop");

    let server = Bzpush::run_url(zoned.url(), std::slice::from_ref(&lock));
    server.wait_healthy();
    // Healthy: the new poller took the lock, and told the hub at once.
    // No change comes after the restart: a stamp seen ahead of this host's
    // clock would show the offset, which the input does not.
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&[5, 6], &when6)),
        subscribed(&[5, 6]),
        "the database can answer since {when6}, complete:\n{}",
        server.log()
    );
    let mut got = recv_n(&mut client, 2);
    got.sort_by_key(|u| u["bug"].as_u64());
    assert_eq!(got, [update(5, &when5), update(6, &when6)]);
    assert_nothing_queued(&mut client);
}

/// Kills every connection to `db` but the poller's (the holder of
/// `lock`, if any): what a server does to a connection idle past its
/// `wait_timeout`. Returns how many it killed.
fn kill_idle_connections(db: &TestDb, lock: Option<&str>) -> usize {
    let mut admin = util::admin_conn();
    let ids: Vec<u64> = admin
        .exec(
            "SELECT ID FROM information_schema.PROCESSLIST
             WHERE DB = ? AND ID <> CONNECTION_ID() AND ID <> COALESCE(IS_USED_LOCK(?), 0)",
            (&db.name, lock.unwrap_or("")),
        )
        .expect("list the test database's connections");
    for id in &ids {
        // Gone already is as good as killed.
        let _ = admin.query_drop(format!("KILL CONNECTION {id}"));
    }
    ids.len()
}

/// Issue 8 item 5: the database closes a connection idle past
/// `wait_timeout` (every quiet night). The next catch-up must reconnect
/// and ask again before anyone is told: complete, and no outage logged.
fn catch_up_survives_a_dropped_idle_connection(server: &Bzpush, db: &TestDb, lock: Option<&str>) {
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&[1, 2, 3], &t(50))),
        subscribed(&[1, 2, 3])
    );
    assert_eq!(
        recv_n(&mut client, 2),
        [update(1, &t(100)), update(2, &t(300))]
    );
    assert!(
        kill_idle_connections(db, lock) >= 1,
        "no catch-up connection to kill"
    );
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(subscribe_since(&[1, 2, 3], &t(50))),
        subscribed(&[1, 2, 3]),
        "the first catch-up after the idle connection was dropped:\n{}",
        server.log()
    );
    assert_eq!(
        recv_n(&mut client, 2),
        [update(1, &t(100)), update(2, &t(300))]
    );
    assert_nothing_queued(&mut client);
    let log = server.log();
    assert!(
        !log.lines()
            .any(|l| l.contains("catch-up database") && l.contains("retrying")),
        "a false outage warning:\n{log}"
    );
}

#[test]
fn run_catch_up_survives_a_dropped_idle_connection() {
    let db = TestDb::new();
    db.set_bug(1, &sql(100));
    db.set_bug(2, &sql(300));
    db.set_bug(3, &sql(10));
    let lock = format!("bzpush.{}", db.name);
    let server = Bzpush::run_on(&db, &[]);
    server.wait_healthy();
    catch_up_survives_a_dropped_idle_connection(&server, &db, Some(&lock));
}

#[test]
fn serve_catch_up_survives_a_dropped_idle_connection() {
    let db = TestDb::new();
    db.set_bug(1, &sql(100));
    db.set_bug(2, &sql(300));
    db.set_bug(3, &sql(10));
    let broker = TestBroker::new();
    let server = Bzpush::serve(&broker, &[("BZPUSH_CATCHUP_DATABASE_URL", db.url())]);
    server.wait_healthy();
    catch_up_survives_a_dropped_idle_connection(&server, &db, None);
}

/// Issue 8 item 4: a storm of clients reconnecting with `since` at once
/// (after an upgrade restart) is answered complete, never `partial` for
/// being many: waiting catch-ups queue and are merged into few queries.
#[test]
fn run_answers_a_reconnect_storm_complete() {
    const CLIENTS: u64 = 4000;
    const BUGS: u64 = 300;
    let db = TestDb::new();
    let mut conn = db.conn();
    // Bug b changed at t(b); a client asks since t(100).
    let values: Vec<String> = (1..=BUGS)
        .map(|b| format!("({b}, '{}')", sql(b as u32)))
        .collect();
    conn.query_drop(format!(
        "INSERT INTO bugs (bug_id, delta_ts) VALUES {}",
        values.join(",")
    ))
    .expect("seed bugs");
    drop(conn);
    // Every client has one address here: the per-address limit (a tenth
    // of the connections by default) is not what this test is about.
    let per_address = ("BZPUSH_MAX_CONNECTIONS_PER_ADDRESS", "10000".to_string());
    let server = Bzpush::run_on(&db, &[per_address]);
    server.wait_healthy();
    let url = server.ws_url("/");
    let mut clients: Vec<Client> = (0..CLIENTS).map(|_| Client::connect(&url)).collect();
    let bugs_of = |i: u64| [i % BUGS + 1, (i + 100) % BUGS + 1, (i + 200) % BUGS + 1];
    for (i, client) in (0..).zip(clients.iter_mut()) {
        client.send(subscribe_since(&bugs_of(i), &t(100)));
    }
    let mut partials = 0;
    for (i, client) in (0..).zip(clients.iter_mut()) {
        let mut bugs = bugs_of(i);
        bugs.sort_unstable();
        let answer = client.recv(WAIT);
        if answer == partial(&bugs) {
            partials += 1;
            continue;
        }
        assert_eq!(answer, subscribed(&bugs), "client {i}");
        let mut expected: Vec<u64> = bugs.iter().copied().filter(|&b| b >= 100).collect();
        expected.sort_unstable();
        let got: Vec<Value> = recv_n(client, expected.len());
        let want: Vec<Value> = expected.iter().map(|&b| update(b, &t(b as u32))).collect();
        assert_eq!(got, want, "client {i}");
    }
    assert_eq!(partials, 0, "{partials} of {CLIENTS} answers were partial");
}

// ---- check ----

/// The source these checks are about, which is not the default.
fn push_notify() -> (&'static str, String) {
    ("BZPUSH_SOURCE", "push_notify".to_string())
}

/// `bzpush check <mode>` with exactly `env`.
/// Listens on port 0 unless `env` says otherwise: `check` binds the listen
/// address, and the default port may be taken by whatever else runs here.
fn check(mode: &str, env: &[(&str, String)]) -> Finished {
    let env: Vec<(&str, String)> = std::iter::once(("BZPUSH_LISTEN", "127.0.0.1:0".to_string()))
        .chain(env.iter().cloned())
        .collect();
    let finished = Bzpush::run(&["check", mode], &env, Duration::from_secs(30));
    eprintln!("check {mode}:\n{}{}", finished.stdout, finished.stderr);
    finished
}

fn assert_passes(finished: &Finished, expected: &[&str]) {
    assert_eq!(
        finished.status.code(),
        Some(0),
        "check failed:\n{}{}",
        finished.stdout,
        finished.stderr
    );
    assert!(!finished.stdout.is_empty(), "check printed nothing");
    for line in finished.stdout.lines() {
        assert!(line.starts_with("ok"), "not ok: {line:?}");
    }
    for needle in expected {
        assert!(
            finished.stdout.contains(needle),
            "no {needle:?} in:\n{}",
            finished.stdout
        );
    }
}

/// Asserts that `check` exited 1 and returns its FAIL lines.
fn assert_fails(finished: &Finished) -> Vec<&str> {
    assert_eq!(
        finished.status.code(),
        Some(1),
        "check should fail:\n{}{}",
        finished.stdout,
        finished.stderr
    );
    let fails: Vec<&str> = finished
        .stdout
        .lines()
        .filter(|l| l.starts_with("FAIL"))
        .collect();
    assert!(!fails.is_empty(), "no FAIL line in:\n{}", finished.stdout);
    fails
}

/// The one FAIL line that contains every one of `needles`.
fn fail_line<'a>(fails: &[&'a str], needles: &[&str]) -> &'a str {
    fails
        .iter()
        .copied()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .unwrap_or_else(|| panic!("no FAIL line with {needles:?} in {fails:#?}"))
}

#[test]
fn check_passes_on_a_good_setup() {
    let db = TestDb::new();
    let exchange = ExchangeName::new();
    let finished = check("run", &[("BZPUSH_DATABASE_URL", db.url()), push_notify()]);
    assert_passes(
        &finished,
        &[
            "database",
            "source push_notify",
            "push_notify: present",
            "DELETE allowed",
            "bugs",
            "database time zone: UTC",
        ],
    );

    let finished = check(
        "poll",
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_AMQP_URL", amqp_url_at(AMQP_ADDR)),
            ("BZPUSH_EXCHANGE", exchange.0.clone()),
            push_notify(),
        ],
    );
    assert_passes(
        &finished,
        &["DELETE allowed", "broker", &format!("{:?}", exchange.0)],
    );
    assert!(
        !finished.stdout.contains("guest:guest"),
        "the broker password was printed:\n{}",
        finished.stdout
    );

    let finished = check(
        "serve",
        &[
            ("BZPUSH_AMQP_URL", amqp_url_at(AMQP_ADDR)),
            ("BZPUSH_FEEDS", format!("/={}", exchange.0)),
            ("BZPUSH_CATCHUP_DATABASE_URL", db.url()),
        ],
    );
    assert_passes(
        &finished,
        &[
            "broker",
            &format!("{:?}", exchange.0),
            "table bugs (catch-up)",
        ],
    );
}

#[test]
fn check_fails_without_a_database() {
    let db = TestDb::new();
    let addr = closed_port();
    let finished = check("run", &[("BZPUSH_DATABASE_URL", db.url_at(&addr))]);
    let fails = assert_fails(&finished);
    fail_line(&fails, &["database", &addr]);
}

#[test]
fn check_fails_without_push_notify_and_points_to_source_bugs() {
    let db = TestDb::new();
    db.conn()
        .query_drop("DROP TABLE push_notify")
        .expect("drop push_notify");
    let finished = check("run", &[("BZPUSH_DATABASE_URL", db.url()), push_notify()]);
    let fails = assert_fails(&finished);
    fail_line(
        &fails,
        &["push_notify", "PushNotify extension", "BZPUSH_SOURCE=bugs"],
    );
    // No privilege would help a table that is not there.
    assert!(
        fails.iter().all(|l| !l.contains("GRANT")),
        "advice to GRANT on a missing table: {fails:#?}"
    );
    // And the advice works.
    let finished = check(
        "run",
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_SOURCE", "bugs".into()),
        ],
    );
    assert_passes(&finished, &["table bugs (source bugs)"]);
}

#[test]
fn check_fails_without_the_delete_privilege_and_hides_the_password() {
    let db = TestDb::new();
    let user = TestUser::new(&[
        format!("SELECT ON `{}`.push_notify", db.name),
        format!("SELECT (bug_id, delta_ts) ON `{}`.bugs", db.name),
    ]);
    let finished = check(
        "run",
        &[("BZPUSH_DATABASE_URL", user.url(&db)), push_notify()],
    );
    let fails = assert_fails(&finished);
    assert_eq!(fails.len(), 1, "only DELETE should fail: {fails:#?}");
    fail_line(&fails, &["push_notify", "DELETE", "GRANT SELECT, DELETE"]);
    assert!(
        finished.stdout.contains("ok    table push_notify: present"),
        "{}",
        finished.stdout
    );
    for text in [&finished.stdout, &finished.stderr] {
        assert!(
            !text.contains(&user.password),
            "the database password was printed:\n{text}"
        );
    }
    assert!(finished.stdout.contains(&format!("{}:***@", user.name)));
}

#[test]
fn check_run_only_warns_without_select_on_bugs() {
    // run works without it, answering `since` partial: not a reason to
    // refuse to start (check is an ExecStartPre=).
    let db = TestDb::new();
    let user = TestUser::new(&[format!("SELECT, DELETE ON `{}`.push_notify", db.name)]);
    let finished = check(
        "run",
        &[("BZPUSH_DATABASE_URL", user.url(&db)), push_notify()],
    );
    assert_eq!(
        finished.status.code(),
        Some(0),
        "check failed:\n{}",
        finished.stdout
    );
    let warn = finished
        .stdout
        .lines()
        .find(|l| l.starts_with("warn"))
        .unwrap_or_else(|| panic!("no warn line in:\n{}", finished.stdout));
    assert!(
        warn.contains("bugs") && warn.contains("GRANT SELECT"),
        "{warn}"
    );
}

#[test]
fn check_fails_without_the_select_privilege_and_says_to_grant_it() {
    let db = TestDb::new();
    let user = TestUser::new(&[format!("SELECT (bug_id, delta_ts) ON `{}`.bugs", db.name)]);
    let finished = check(
        "run",
        &[("BZPUSH_DATABASE_URL", user.url(&db)), push_notify()],
    );
    let fails = assert_fails(&finished);
    let line = fail_line(
        &fails,
        &[
            "push_notify",
            "SELECT command denied",
            "GRANT SELECT, DELETE",
        ],
    );
    // The table is there: installing the extension would not help.
    assert!(!line.contains("PushNotify extension"), "{line}");
}

#[test]
fn check_fails_when_the_broker_is_unreachable() {
    let db = TestDb::new();
    let addr = closed_port();
    let exchange = ExchangeName::new();
    let finished = check(
        "poll",
        &[
            ("BZPUSH_DATABASE_URL", db.url()),
            ("BZPUSH_AMQP_URL", amqp_url_at(&addr)),
            ("BZPUSH_EXCHANGE", exchange.0.clone()),
        ],
    );
    let fails = assert_fails(&finished);
    assert_eq!(fails.len(), 1, "only the broker should fail: {fails:#?}");
    fail_line(&fails, &["broker", &addr]);

    let finished = check(
        "serve",
        &[
            ("BZPUSH_AMQP_URL", amqp_url_at(&addr)),
            ("BZPUSH_FEEDS", format!("/={}", exchange.0)),
        ],
    );
    let fails = assert_fails(&finished);
    fail_line(&fails, &["broker", &addr]);
    for text in [&finished.stdout, &finished.stderr] {
        assert!(!text.contains("guest:guest"), "password printed:\n{text}");
    }
}

/// What check can see of the freshness lag: a change waiting in
/// push_notify past BZPUSH_STALE_AFTER, with no poller to hand it on.
#[test]
fn check_warns_of_changes_waiting_past_the_threshold() {
    let db = TestDb::new();
    db.conn()
        .query_drop(
            "INSERT INTO push_notify (bug_id, delta_ts) VALUES (8, NOW() - INTERVAL 1 HOUR)",
        )
        .expect("a change an hour old");
    let finished = check("run", &[("BZPUSH_DATABASE_URL", db.url()), push_notify()]);
    assert_eq!(finished.status.code(), Some(0), "{}", finished.stdout);
    assert!(
        finished.stdout.lines().any(|l| l.starts_with("warn")
            && l.contains("1 change waiting")
            && l.contains("no poller runs")),
        "{}",
        finished.stdout
    );
}
