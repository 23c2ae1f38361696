//! Locks other database sessions hold (SPEC §3.4): an open transaction on
//! a row the poller already read, a table locked whole, a row of `bugs`.
//! None may stall the other bugs' changes past a poll; the log and
//! `/health` say "lock wait", never "database down", and what was held is
//! delivered once it is let go.

use std::thread;
use std::time::{Duration, Instant};

use mysql::prelude::Queryable;
use serde_json::json;

use crate::util::serve::{Client, health};
use crate::util::{self, Bzpush, TestDb, wait_until};

const WAIT: Duration = Duration::from_secs(20);

/// Changes each of `bugs` once a round, every `pause`, for `rounds`
/// rounds, as the PushNotify extension writes them, with times from
/// `first` seconds on; checks that each round reaches `client` within
/// `within` of being written.
fn changes_flow(
    db: &TestDb,
    client: &mut Client,
    bugs: &[u32],
    first: u32,
    rounds: u32,
    within: Duration,
    server: &Bzpush,
) {
    let mut writer = db.conn();
    for round in 0..rounds {
        let (sql, wire) = util::datetime(first + round);
        let written = Instant::now();
        for &bug in bugs {
            // A change the poller's DELETE raced is written again, as
            // Bugzilla's next change of the bug would.
            while !TestDb::push_notify_change(&mut writer, bug, Some(&sql)) {}
        }
        let mut missing: Vec<u32> = bugs.to_vec();
        while !missing.is_empty() {
            let left = within
                .saturating_sub(written.elapsed())
                .max(Duration::from_millis(1));
            let Some(update) = client.try_recv(left) else {
                panic!(
                    "round {round}: bugs {missing:?} not delivered within {within:?} of their \
                     change\n{}",
                    server.log()
                );
            };
            if update["when"] == wire.as_str() {
                let bug = update["bug"].as_u64().unwrap_or_default() as u32;
                missing.retain(|&b| b != bug);
            }
        }
        thread::sleep(Duration::from_millis(300));
    }
}

/// The input: bug 63's row, the highest id, is updated in a transaction
/// left open before `run` starts, while 50 other bugs keep changing.
#[test]
fn a_row_the_poller_already_read_locked_by_an_open_transaction_stalls_nothing_else() {
    a_locked_row_stalls_nothing_else("1000");
}

/// The same in batches of one: the batch after the locked row's holds
/// none, and the row is still locked; the lock wait is said once and
/// lasts, not undone by each batch that has no locked row.
#[test]
fn a_locked_row_in_batches_of_one_is_one_lasting_lock_wait() {
    a_locked_row_stalls_nothing_else("1");
}

fn a_locked_row_stalls_nothing_else(batch_size: &str) {
    let db = TestDb::new();
    // Bugs 100 to 149: below them in the unique bug_id index, bug 63's
    // locked entry is no neighbour that InnoDB's duplicate check of the
    // extension's INSERT would have to lock too (bug 50's would: the
    // extension itself would then wait for the open transaction).
    let others: Vec<u32> = (100..150).collect();
    let (sql, _) = util::datetime(0);
    for &bug in &others {
        assert!(TestDb::push_notify_change(&mut db.conn(), bug, Some(&sql)));
    }
    assert!(TestDb::push_notify_change(&mut db.conn(), 63, Some(&sql)));
    let mut holder = db.conn();
    holder.query_drop("BEGIN").expect("begin");
    holder
        .query_drop("UPDATE push_notify SET delta_ts = '2026-01-01 01:00:00' WHERE bug_id = 63")
        .expect("lock bug 63's row");

    let server = Bzpush::run_on(
        &db,
        &[
            ("BZPUSH_SOURCE", "push_notify".to_string()),
            ("BZPUSH_BATCH_SIZE", batch_size.to_string()),
        ],
    );
    let mut client = Client::subscribed(&server, &[100, 101, 125, 148, 149, 63]);
    let watched = [100, 101, 125, 148, 149];
    changes_flow(
        &db,
        &mut client,
        &watched,
        10,
        5,
        Duration::from_secs(2),
        &server,
    );
    let (status, json) = health(&server);
    assert_eq!(status, 200, "{json}");
    assert_eq!(json["database"], "lock wait", "{json}");
    assert!(
        json["reason"]
            .as_str()
            .is_some_and(|r| r.contains("bug 63")),
        "{json}"
    );
    for _ in 0..10 {
        thread::sleep(Duration::from_millis(150));
        let (_, json) = health(&server);
        assert_eq!(json["database"], "lock wait", "{json}\n{}", server.log());
    }
    let log = server.log();
    assert!(log.contains("lock wait"), "{log}");
    assert!(
        !log.contains("lock wait is over"),
        "said once, and lasts:\n{log}"
    );
    assert!(!log.contains("retrying with backoff"), "no outage:\n{log}");

    // Let go: bug 63's held change arrives, its row goes, the wait ends.
    holder.query_drop("COMMIT").expect("commit");
    let held = json!({"command": "update", "bug": 63, "when": "2026-01-01T01:00:00"});
    let mut seen = Vec::new();
    assert!(
        wait_until(WAIT, || {
            seen.extend(client.try_recv(Duration::from_millis(200)));
            seen.contains(&held)
        }),
        "{seen:?}\n{}",
        server.log()
    );
    assert!(
        wait_until(WAIT, || health(&server).1["database"] == "up"),
        "{}",
        server.log()
    );
    assert!(wait_until(WAIT, || db.push_notify_rows() == 0));
}

/// Siblings: a table locked whole (`LOCK TABLES`, or `checksetup.pl`
/// altering it) holds every statement on it; for each source and each
/// table it reads, the poller says "lock wait" at once rather than
/// waiting for the server's day-long default, and delivers once it ends.
#[test]
fn a_table_locked_whole_is_a_lock_wait_not_an_outage_and_delivery_resumes() {
    for (source, table) in [
        ("push_notify", "push_notify"),
        ("push_notify", "bugs"),
        ("bugs", "bugs"),
    ] {
        let db = TestDb::new();
        let server = Bzpush::run_on(&db, &[("BZPUSH_SOURCE", source.to_string())]);
        let mut client = Client::subscribed(&server, &[7]);
        assert!(
            wait_until(WAIT, || health(&server).1["database"] == "up"),
            "{}",
            server.log()
        );
        let mut holder = db.conn();
        holder
            .query_drop(format!("LOCK TABLES {table} WRITE"))
            .expect("lock the table");
        assert!(
            wait_until(WAIT, || health(&server).1["database"] == "lock wait"),
            "{source}/{table}: {}",
            server.log()
        );
        assert_eq!(health(&server).0, 200);
        // `check`, the unit's ExecStartPre=, says so too, and fails on
        // nothing: the lock is no fault of the setup.
        let checked = Bzpush::run(
            &["check", "run"],
            &[
                ("BZPUSH_DATABASE_URL", db.url()),
                ("BZPUSH_SOURCE", source.to_string()),
                ("BZPUSH_LISTEN", "127.0.0.1:0".to_string()),
                ("BZPUSH_LOCK_NAME", format!("bzpush.{}", db.name)),
            ],
            WAIT,
        );
        assert!(
            checked.stdout.contains(&format!("table {table}"))
                && checked.stdout.contains("holds it locked")
                && !checked.stdout.contains("FAIL"),
            "{source}/{table}:\n{}",
            checked.stdout
        );
        assert_eq!(checked.status.code(), Some(0), "{}", checked.stdout);
        holder.query_drop("UNLOCK TABLES").expect("unlock");
        // A change as Bugzilla makes it: stamped now, in both tables.
        let now: String = db
            .conn()
            .query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%d %H:%i:%s')")
            .expect("NOW()")
            .unwrap_or_default();
        db.set_bug(7, &now);
        assert!(TestDb::push_notify_change(&mut db.conn(), 7, Some(&now)));
        assert_eq!(
            client.recv(WAIT),
            json!({"command": "update", "bug": 7, "when": now.replace(' ', "T")}),
            "{source}/{table}: {}",
            server.log()
        );
        assert!(
            wait_until(WAIT, || health(&server).1["database"] == "up"),
            "{source}/{table}: {}",
            server.log()
        );
        let log = server.log();
        assert!(log.contains("lock wait"), "{source}/{table}: {log}");
        assert!(
            !log.contains("retrying with backoff"),
            "{source}/{table}, no outage:\n{log}"
        );
    }
}

/// Source `bugs` reads without locking: an open transaction on one bug's
/// row (a slow Bugzilla request) holds nothing up, and its change arrives
/// once committed.
#[test]
fn an_open_transaction_on_a_bugs_row_stalls_nothing_with_source_bugs() {
    let db = TestDb::new();
    let server = Bzpush::run_on(&db, &[("BZPUSH_SOURCE", "bugs".to_string())]);
    let mut client = Client::subscribed(&server, &[1, 2, 63]);
    let now: String = db
        .conn()
        .query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%d %H:%i:%s')")
        .expect("NOW()")
        .unwrap_or_default();
    db.set_bug(63, &now);
    let mut holder = db.conn();
    holder.query_drop("BEGIN").expect("begin");
    holder
        .exec_drop(
            "UPDATE bugs SET delta_ts = ? + INTERVAL 1 SECOND WHERE bug_id = 63",
            (&now,),
        )
        .expect("lock bug 63's row");
    for bug in [1, 2] {
        let when: String = db
            .conn()
            .query_first("SELECT DATE_FORMAT(NOW(), '%Y-%m-%d %H:%i:%s')")
            .expect("NOW()")
            .unwrap_or_default();
        db.set_bug(bug, &when);
        let arrived = wait_until(Duration::from_secs(5), || {
            client
                .try_recv(Duration::from_millis(100))
                .is_some_and(|update| update["bug"] == bug)
        });
        assert!(arrived, "bug {bug}\n{}", server.log());
    }
    holder.query_drop("COMMIT").expect("commit");
    // Bug 63's first stamp went out before the lock; its new one now.
    let mut seen = Vec::new();
    assert!(
        wait_until(WAIT, || {
            seen.extend(client.try_recv(Duration::from_millis(200)));
            seen.iter()
                .any(|u| u["bug"] == 63 && u["when"] != now.replace(' ', "T"))
        }),
        "{seen:?}\n{}",
        server.log()
    );
    assert_eq!(health(&server).1["database"], "up");
}
