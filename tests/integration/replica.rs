//! A catch-up database that is a replica (SPEC §5, "What a client is
//! owed"): Bugzilla's `shadowdb` is one, and the README asks for a
//! read-only user. Pointed at a replica 60 s behind, `serve` once gave a
//! complete-looking `since` answer without the newest change; it is
//! complete only if the replica holds every change the server has already
//! seen, and `partial` otherwise. `check serve` says it is a replica, and
//! how far behind.

use std::time::Duration;

use mysql::prelude::Queryable;
use serde_json::json;

use crate::util::run::PrivateServer;
use crate::util::serve::{Client, healthy_server, metric};
use crate::util::{Bzpush, TestBroker, wait_until};

const WAIT: Duration = Duration::from_secs(30);

/// A primary and a replica of it that applies each change 60 s late
/// (MariaDB's delayed replication), both private to the test, with
/// Bugzilla's tables in database `bugs`.
fn primary_and_delayed_replica() -> (PrivateServer, PrivateServer) {
    let primary =
        PrivateServer::start_with(&["--log-bin=primary-bin".into(), "--server-id=1".into()]);
    let replica = PrivateServer::start_with(&["--server-id=2".into(), "--read-only".into()]);
    // Both made their own tables; replicate what comes after.
    let status: Option<mysql::Row> = primary
        .conn()
        .query_first("SHOW MASTER STATUS")
        .expect("SHOW MASTER STATUS");
    let status = status.expect("the primary writes a binary log");
    let file: String = status.get("File").expect("a binary log file");
    let position: u64 = status.get("Position").expect("a position");
    let port = primary.addr.rsplit(':').next().unwrap_or_default();
    let mut conn = replica.conn();
    conn.query_drop(format!(
        "CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT={port}, MASTER_USER='root', \
         MASTER_PASSWORD='', MASTER_LOG_FILE='{file}', MASTER_LOG_POS={position}, \
         MASTER_DELAY=60"
    ))
    .expect("point the replica at the primary");
    conn.query_drop("START SLAVE").expect("start replicating");
    (primary, replica)
}

#[test]
fn a_catch_up_replica_behind_the_live_stream_answers_partial_and_check_says_so() {
    let (primary, replica) = primary_and_delayed_replica();
    let broker = TestBroker::new();
    // Healthy: its queue is bound, so what is published now reaches it.
    let server = healthy_server(&broker, &[("BZPUSH_CATCHUP_DATABASE_URL", replica.url())]);
    let addr = server.listen_addr();

    // Bug 7 changes on the primary; the poller publishes it at once; the
    // replica will apply it in a minute.
    let now = primary.now();
    primary
        .conn()
        .exec_drop("INSERT INTO bugs (bug_id, delta_ts) VALUES (7, ?)", (&now,))
        .expect("change bug 7");
    let when = now.replace(' ', "T");
    broker.publish(7, &when);
    let arrived = wait_until(WAIT, || metric(&addr, "bzpush_notifications_in_total") == 1);
    assert!(
        arrived,
        "{}",
        crate::util::serve::http_get(&addr, "/metrics").1
    );

    // A client that last heard an hour ago: the cache, which started with
    // the server, cannot vouch; the replica lacks the change the server
    // saw. Not complete: partial, with what the server has.
    let since = "2000-01-01T00:00:00";
    let mut client = Client::connect(&server.ws_url("/"));
    assert_eq!(
        client.request(json!({"command": "subscribe", "bugs": [7], "since": since})),
        json!({"command": "subscribe", "result": "ok", "bugs": [7], "partial": true}),
        "{}",
        server.log()
    );
    assert_eq!(
        client.recv(WAIT),
        json!({"command": "update", "bug": 7, "when": when})
    );

    let finished = Bzpush::run(
        &["check", "serve"],
        &[
            (
                "BZPUSH_AMQP_URL",
                crate::util::amqp_url_at(crate::util::AMQP_ADDR),
            ),
            ("BZPUSH_FEEDS", format!("/={}", broker.exchange)),
            ("BZPUSH_CATCHUP_DATABASE_URL", replica.url()),
            ("BZPUSH_LISTEN", "127.0.0.1:0".into()),
        ],
        WAIT,
    );
    assert!(
        finished.stdout.lines().any(|l| l.starts_with("warn")
            && l.contains("catch-up database: a replica")
            && l.contains("SQL_Delay 60 s")),
        "{}",
        finished.stdout
    );
}
